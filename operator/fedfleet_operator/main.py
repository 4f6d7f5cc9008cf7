"""Start the operator: ``fedfleet operator`` (or ``python -m fedfleet_operator``).

kopf is started programmatically rather than with ``kopf run``: the handlers go into a registry
of their own (:func:`~fedfleet_operator.handlers.register_all`), the shared
:class:`~fedfleet_operator.context.OperatorContext` goes into kopf's memo, and the options of the
contract — cluster-wide unless ``FEDFLEET_NAMESPACES``, liveness on ``:8080/healthz``, peering
``FEDFLEET_PEERING`` with a priority derived from ``POD_NAME`` — are set in one place.
:func:`start` is the same without argument parsing, for tests that run the operator in a thread
(pass ``stop_flag``/``ready_flag``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedfleet_operator.settings import OperatorSettings, SettingsError, redact_store_url

if TYPE_CHECKING:
    from fedfleet_operator.context import OperatorContext

__all__ = [
    "DEFAULT_LIVENESS",
    "QuietStatusTimer",
    "add_arguments",
    "build_context",
    "default_liveness",
    "main",
    "run",
    "start",
]

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
"""Where kopf serves the liveness probe when the pod's IP is unknown; the chart's
``livenessProbe`` points at port 8080."""


def default_liveness(env: Mapping[str, str] | None = None) -> str:
    """``http://$POD_IP:8080/healthz`` when ``POD_IP`` is set, else :data:`DEFAULT_LIVENESS`.

    Binding the pod's own address rather than every address keeps the probe endpoint off other
    addresses where the pod shares a network namespace (``hostNetwork``, where actor pods may
    also listen on 8080); the kubelet probes the pod IP either way.
    """
    pod_ip = (os.environ if env is None else env).get("POD_IP", "").strip()
    if not pod_ip:
        return DEFAULT_LIVENESS
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:8080/healthz"


EXIT_OK, EXIT_USAGE = 0, 2
LOG_FORMATS = ("full", "plain", "json")
"""kopf's log formats (``kopf.LogFormat``), spelled out so that building ``fedfleet``'s parser
does not import kopf: every ``fedfleet`` command builds every subcommand's arguments."""

log = logging.getLogger("fedfleet.operator")


class QuietStatusTimer(logging.Filter):
    """Drops kopf's "Timer 'status' succeeded." lines: kopf logs every successful timer run at
    INFO, which is one line per FLJob every few seconds and buries everything else. Failures
    and the operator's own messages still get through; ``--verbose`` keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and record.getMessage().startswith(
                ("Timer 'status' succeeded", "Timer 'population-status' succeeded")
            )
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fedfleet operator``; everything else comes from the environment
    (``FEDFLEET_STORE_URL`` and friends, see ``operator/CONTRACT.md``)."""
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="run without kopf peering (no ClusterKopfPeering needed): one replica, tests",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        default=default_liveness(),
        help="serve kopf's liveness probe here (default http://$POD_IP:8080/healthz, or "
        f"{DEFAULT_LIVENESS} without POD_IP; e.g. http://127.0.0.1:8080/healthz off-cluster; "
        "empty: none)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        dest="namespaces",
        action="append",
        metavar="NS",
        help="watch this namespace (repeatable; default $FEDFLEET_NAMESPACES, else all)",
    )
    parser.add_argument(
        "--peering", metavar="NAME", help="ClusterKopfPeering name (default $FEDFLEET_PEERING)"
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="full",
        help="kopf's log format (full)",
    )


def build_context(settings: OperatorSettings) -> OperatorContext:
    """The real context: a Kubernetes client from the service account (or kubeconfig), the
    store every job uses, Events through kopf."""
    from fedfleet.store.factory import open_store
    from fedfleet_operator.context import OperatorContext
    from fedfleet_operator.events import KopfEvents
    from fedfleet_operator.kube import KubeClient, load_api_client

    api = load_api_client()
    return OperatorContext(
        settings=settings,
        kube=KubeClient(api, timeout=settings.api_timeout),
        store=open_store(settings.store_url),
        events=KopfEvents(),
    )


def start(
    ctx: OperatorContext,
    *,
    standalone: bool = False,
    liveness_endpoint: str | None = DEFAULT_LIVENESS,
    **kopf_options: Any,
) -> None:
    """Run kopf with the operator's handlers until it is stopped (a signal, or a
    ``stop_flag`` in ``kopf_options``). Blocks."""
    import kopf

    from fedfleet_operator.context import MEMO_KEY
    from fedfleet_operator.handlers import register_all

    settings = ctx.settings
    registry = kopf.OperatorRegistry()
    register_all(registry, settings)
    memo = kopf.Memo()
    memo[MEMO_KEY] = ctx
    kopf.run(
        registry=registry,
        memo=memo,
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness_endpoint or None,
        peering_name=None if standalone else settings.peering,
        standalone=True if standalone else None,
        priority=settings.priority,
        **kopf_options,
    )


def run(args: argparse.Namespace) -> int:
    """``fedfleet operator``: returns the exit status (2 for a configuration error)."""
    try:
        settings = OperatorSettings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    overrides: dict[str, Any] = {}
    if args.namespaces:
        overrides["namespaces"] = tuple(args.namespaces)
    if args.peering:
        overrides["peering"] = args.peering
    settings = dataclasses.replace(settings, **overrides)
    import kopf  # here, not at the top: see LOG_FORMATS

    kopf.configure(
        verbose=args.verbose, quiet=args.quiet, log_format=kopf.LogFormat[args.log_format.upper()]
    )
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(QuietStatusTimer())
    try:
        ctx = build_context(settings)
    except Exception as exc:  # no kubeconfig, no service account, a bad store URL
        print(f"error: cannot start the operator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    scope = ", ".join(settings.namespaces) if settings.namespaces else "all namespaces"
    log.info(
        "fedfleet operator watching %s; store %s; %s",
        scope,
        redact_store_url(settings.store_url),
        "standalone" if args.standalone else f"peering {settings.peering}",
    )
    try:
        start(ctx, standalone=args.standalone, liveness_endpoint=args.liveness)
    finally:
        ctx.store.close()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedfleet-operator", description="the fedfleet FLJob operator (kopf)"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
