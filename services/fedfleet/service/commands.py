"""``fedfleet selector|aggregator|coordinator``: run one actor as a uvicorn service.

Every flag has an environment fallback (``FEDFLEET_<NAME>``) so a Kubernetes Deployment can
configure the process from a ConfigMap and Secrets without templating its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedfleet.core.spec import FLJob, ManifestError, load_manifest, with_base_dir

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fedfleet.store.base import Store

__all__ = ["add_service_arguments", "run_service"]

log = logging.getLogger("fedfleet.service")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FEDFLEET_{name}", default)


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest", type=Path, default=_env("MANIFEST"), help="FLJob manifest (FEDFLEET_MANIFEST)"
    )
    parser.add_argument(
        "--store",
        default=_env("STORE_URL", "redis://127.0.0.1:6379/0"),
        help="store URL, redis:// or rediss:// (FEDFLEET_STORE_URL)",
    )
    parser.add_argument(
        "--secret-file",
        default=_env("SECRET_FILE"),
        help="file holding the job secret (FEDFLEET_SECRET_FILE; or FEDFLEET_JOB_SECRET as hex)",
    )
    parser.add_argument(
        "--population-secret-file",
        default=_env("POPULATION_SECRET_FILE"),
        help="selector only: file holding the population secret (hex or raw, >= 16 bytes); "
        "with it the selector enrolls devices (POST /v1/enroll) and accepts their credentials "
        "besides job tokens (FEDFLEET_POPULATION_SECRET_FILE; default: no enrollment)",
    )
    parser.add_argument(
        "--id", default=_env("ACTOR_ID") or _env("POD_NAME"), help="actor id (FEDFLEET_ACTOR_ID)"
    )
    parser.add_argument(
        "--host", default=_env("HOST", "127.0.0.1"), help="bind address (FEDFLEET_HOST)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", "8080") or 8080),
        help="listen port (FEDFLEET_PORT; default 8080)",
    )
    parser.add_argument(
        "--advertise", default=_env("ADVERTISE", ""), help="URL other actors use to reach this one"
    )
    parser.add_argument(
        "--tick",
        type=float,
        default=float(_env("TICK_SECONDS", "0.5") or 0.5),
        help="seconds between the actor's exchanges with the store (FEDFLEET_TICK_SECONDS; 0.5)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=float(_env("LEASE_TTL", "10") or 10),
        help="coordinator only: seconds the job lease lasts without renewal; a standby takes "
        "over this long after the active coordinator dies (FEDFLEET_LEASE_TTL; 10)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=int(_env("MAX_CONNECTIONS", "4096") or 4096),
        help="concurrent connections before the server answers 503; selected devices' plan "
        "polls hold one each (FEDFLEET_MAX_CONNECTIONS; 4096)",
    )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (FEDFLEET_LOG_LEVEL; INFO)",
    )
    parser.add_argument(
        "--active-since",
        type=float,
        default=_env("ACTIVE_SINCE"),
        metavar="EPOCH",
        help="coordinator: when the job's active period began, in Unix seconds, for "
        "spec.activeDeadlineSeconds (FEDFLEET_ACTIVE_SINCE; default: the job's first start)",
    )


def run_service(role: str, args: argparse.Namespace) -> int:
    """Build the role's app and serve it until SIGTERM/SIGINT (graceful shutdown)."""

    from fedfleet.service.ops import configure_logging
    from fedfleet.service.server import run_server
    from fedfleet.store.factory import open_store

    actor_id = args.id or f"{role}-{os.getpid()}"
    configure_logging(args.log_level, actor=actor_id)
    inline = _env("MANIFEST_YAML")
    if args.manifest is None and not inline:
        print(
            "error: --manifest (or FEDFLEET_MANIFEST, or FEDFLEET_MANIFEST_YAML) is required",
            file=sys.stderr,
        )
        return 2
    try:
        job = load_manifest(Path(args.manifest).read_text() if args.manifest else str(inline))
    except OSError as exc:
        print(f"error: cannot read manifest: {exc}", file=sys.stderr)
        return 2
    except ManifestError as exc:
        print(f"error: invalid FLJob in {args.manifest}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.manifest:  # relative task and data paths are the manifest's directory's
        job = with_base_dir(job, str(Path(args.manifest).resolve().parent))
    try:
        store = open_store(args.store)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        app = _build_app(role, args, job, store, actor_id)
    except ValueError as exc:  # the task or its data does not fit (TaskError, DataError)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if app is None:
        return 2
    run_server(app, host=args.host, port=args.port, max_connections=args.max_connections)
    return 0


def _build_app(
    role: str, args: argparse.Namespace, job: FLJob, store: Store, actor_id: str
) -> FastAPI | None:
    from fedfleet.service.enrollment import PopulationKeys
    from fedfleet.service.keys import JobKeys, load_secret

    address = args.advertise or f"http://{args.host}:{args.port}"
    if role == "coordinator":
        from fedfleet.coordinator.app import create_app as coordinator_app

        app = coordinator_app(
            job,
            store,
            actor_id=actor_id,
            tick_seconds=args.tick,
            lease_ttl=args.lease_ttl,
            active_since=args.active_since,
        )
    else:
        try:
            keys = JobKeys.from_secret(load_secret(args.secret_file))
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
        if role == "selector":
            from fedfleet.selector.app import create_app as selector_app

            population_secret = None
            if args.population_secret_file:
                try:
                    population_secret = load_secret(args.population_secret_file)
                    PopulationKeys.from_secret(population_secret, job.spec.population)
                except (OSError, ValueError) as exc:
                    print(f"error: population secret: {exc}", file=sys.stderr)
                    return None
            app = selector_app(
                job,
                store,
                keys,
                actor_id=actor_id,
                address=address,
                tick_seconds=args.tick,
                population_secret=population_secret,
            )
        else:
            from fedfleet.aggregator.app import create_app as aggregator_app
            from fedfleet.aggregator.app import dataset_evaluator

            app = aggregator_app(
                job,
                store,
                keys,
                actor_id=actor_id,
                address=address,
                tick_seconds=args.tick,
                evaluator=dataset_evaluator(job),
            )
    return app
