"""``fedfleet population``: what an operator does to a population's devices from outside.

* ``fedfleet population token --secret-file F`` prints the population's enroll token (what an
  app or a device installer is given; it can only enroll new devices);
* ``fedfleet population revoke --store URL --population NAME DEVICE_ID...`` revokes devices:
  every credential issued to them until now is refused — on renewal at once, on check-ins and
  checkpoint downloads once each selector's next tick has read the revocation. A revoked
  device must enroll again (under a new device id);
* ``fedfleet population gateway --population NAME --population-secret-file F --store URL``
  serves the population's one device endpoint (:mod:`fedfleet.gateway`) until SIGTERM: it
  enrolls devices and routes their check-ins to the population's running jobs. On
  Kubernetes the operator runs it for each FLPopulation; every flag has a ``FEDFLEET_*``
  environment fallback.

Exit status: 0 done, 1 the store could not be reached, 2 a usage error (a bad secret file, a
malformed device id, no store).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable

from fedfleet.service.enrollment import enroll_token
from fedfleet.service.keys import load_secret
from fedfleet.store.base import StoreUnavailable
from fedfleet.store_args import add_store_argument, store_from_args

__all__ = ["add_arguments", "run"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
"""A device id as the device API takes it (``fedfleet.selector.doors.ID``)."""

Action = Callable[[argparse.Namespace], int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="token, revoke or gateway"
    )
    token = sub.add_parser(
        "token",
        help="print the population's enroll token",
        description="Print the enroll token derived from the population secret.",
    )
    token.add_argument(
        "--secret-file",
        default=os.environ.get("FEDFLEET_POPULATION_SECRET_FILE"),
        help="file holding the population secret, hex or raw, >= 16 bytes "
        "(default $FEDFLEET_POPULATION_SECRET_FILE)",
    )
    token.set_defaults(population_action=_token)
    revoke = sub.add_parser(
        "revoke",
        help="revoke devices: their credentials issued until now are refused",
        description="Revoke devices of a population: every credential issued to them until "
        "now is refused (at once on renewal, within a selector tick on check-in).",
    )
    add_store_argument(revoke)
    revoke.add_argument("--population", required=True, help="the population's name")
    revoke.add_argument("device_ids", nargs="+", metavar="DEVICE_ID", help="the devices to revoke")
    revoke.set_defaults(population_action=_revoke)
    gateway = sub.add_parser(
        "gateway",
        help="serve the population's device endpoint in front of its jobs' selectors",
        description="Serve the population's one device endpoint: enrollment, and check-ins "
        "routed to its running jobs by spec.scheduling (priority, weight).",
    )
    _gateway_arguments(gateway)
    gateway.set_defaults(population_action=_gateway)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FEDFLEET_{name}", default)


def _gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--population", default=_env("POPULATION"), help="its name (FEDFLEET_POPULATION)"
    )
    parser.add_argument(
        "--population-secret-file",
        default=_env("POPULATION_SECRET_FILE"),
        help="file holding the population secret, hex or raw, >= 16 bytes "
        "(FEDFLEET_POPULATION_SECRET_FILE)",
    )
    parser.add_argument(
        "--store",
        default=_env("STORE_URL", "redis://127.0.0.1:6379/0"),
        help="the jobs' store URL; the password may come from $FEDFLEET_REDIS_PASSWORD "
        "(FEDFLEET_STORE_URL)",
    )
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address")
    parser.add_argument("--port", type=int, default=int(_env("PORT", "8080") or 8080))
    parser.add_argument(
        "--tick",
        type=float,
        default=float(_env("TICK_SECONDS", "0.5") or 0.5),
        help="seconds between reads of the jobs' routes (FEDFLEET_TICK_SECONDS; 0.5)",
    )
    parser.add_argument(
        "--id", default=_env("ACTOR_ID") or _env("POD_NAME"), help="its id, for logs"
    )
    parser.add_argument(
        "--max-connections", type=int, default=int(_env("MAX_CONNECTIONS", "4096") or 4096)
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--tls-cert-file",
        default=_env("TLS_CERT_FILE"),
        help="serve https with this PEM certificate chain (FEDFLEET_TLS_CERT_FILE; with "
        "--tls-key-file; default plain http, for TLS terminated in front of the gateway)",
    )
    parser.add_argument(
        "--tls-key-file",
        default=_env("TLS_KEY_FILE"),
        help="its private key (FEDFLEET_TLS_KEY_FILE)",
    )


def run(args: argparse.Namespace) -> int:
    action: Action = args.population_action
    return action(args)


def _token(args: argparse.Namespace) -> int:
    if not args.secret_file:
        print(
            "error: --secret-file (or $FEDFLEET_POPULATION_SECRET_FILE) is required",
            file=sys.stderr,
        )
        return 2
    try:
        print(enroll_token(load_secret(args.secret_file)))
    except (OSError, ValueError) as exc:
        print(f"error: population secret: {exc}", file=sys.stderr)
        return 2
    return 0


def _revoke(args: argparse.Namespace) -> int:
    bad = [d for d in args.device_ids if not _ID.match(d)]
    if bad:
        print(f"error: not a device id: {bad[0][:130]!r}", file=sys.stderr)
        return 2
    if not args.population or any(c in args.population for c in "{}"):
        print("error: --population must be a non-empty name without braces", file=sys.stderr)
        return 2
    store = store_from_args(args)
    if store is None:
        return 2
    at = time.time()
    try:
        for device in args.device_ids:
            store.revoke_device(args.population, device, at)
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    for device in args.device_ids:
        print(f"revoked {device} in {args.population}: credentials issued until {stamp} refused")
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from fedfleet.gateway.app import create_app
    from fedfleet.service.enrollment import PopulationKeys
    from fedfleet.service.ops import configure_logging
    from fedfleet.service.server import run_server
    from fedfleet.store.factory import open_store

    actor_id = args.id or f"gateway-{os.getpid()}"
    configure_logging(args.log_level, actor=actor_id)
    if not args.population or not args.population_secret_file:
        print("error: --population and --population-secret-file are required", file=sys.stderr)
        return 2
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        print("error: --tls-cert-file and --tls-key-file go together", file=sys.stderr)
        return 2
    tls: dict[str, str] = {}
    if args.tls_cert_file:
        for path in (args.tls_cert_file, args.tls_key_file):
            if not os.access(path, os.R_OK):
                print(f"error: cannot read {path}", file=sys.stderr)
                return 2
        tls = {"ssl_certfile": args.tls_cert_file, "ssl_keyfile": args.tls_key_file}
    try:
        secret = load_secret(args.population_secret_file)
        PopulationKeys.from_secret(secret, args.population)
        store = open_store(args.store)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(args.population, secret, store, actor_id=actor_id, tick_seconds=args.tick)
    run_server(app, host=args.host, port=args.port, max_connections=args.max_connections, **tls)
    return 0
