"""``fedfleet dashboard``: serve the live web dashboard of a store's jobs with uvicorn.

Binds 127.0.0.1 unless told otherwise; then only loopback ``Host`` headers are answered. On
another address (a pod behind a Service, say) any Host is accepted unless ``--allowed-host``
names them. The store URL is printed without its password.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from fedfleet.store_args import add_store_argument, store_from_args

__all__ = ["add_arguments", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    parser.add_argument(
        "--host",
        default=os.environ.get("FEDFLEET_DASHBOARD_HOST", "127.0.0.1"),
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("FEDFLEET_DASHBOARD_PORT", "8090"),  # argparse applies type
        help="port to listen on (default 8090)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the page refreshes (default 2)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="accept only this Host header (repeatable; default: loopback names when "
        "listening on loopback, any otherwise)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, explicit: list[str] | None) -> list[str] | None:
    """Host headers to accept: the explicit list, loopback names on loopback, else any."""
    from fedfleet.dashboard.app import LOOPBACK_HOSTS

    if explicit:
        return list(explicit)
    return list(LOOPBACK_HOSTS) if _is_loopback(host) else None


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536 or not args.interval > 0:
        print("error: --port must be 1-65535 and --interval positive", file=sys.stderr)
        return EXIT_USAGE
    import uvicorn

    from fedfleet.dashboard.app import create_app
    from fedfleet.dashboard.views import redact_store_url

    store = store_from_args(args)
    if store is None:
        return EXIT_USAGE
    label = redact_store_url(args.store)
    app = create_app(
        store,
        store_label=label,
        interval=args.interval,
        allowed_hosts=allowed_hosts(args.host, args.allowed_host),
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"fedfleet dashboard of {label} on http://{shown}:{args.port}/", file=sys.stderr)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
    finally:
        store.close()
    return EXIT_OK
