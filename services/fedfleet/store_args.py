"""The ``--store`` option of the commands that read a job's store from outside the job.

``fedfleet fetch-model``, ``fedfleet report`` and ``fedfleet dashboard`` all take the store
the same way (a URL, with ``$FEDFLEET_STORE_URL`` as the default) and refuse a missing or
malformed one the same way (exit 2), so the option and its checks live here once.
"""

from __future__ import annotations

import argparse
import os
import sys

from fedfleet.store.base import Store
from fedfleet.store.factory import open_store

__all__ = ["add_store_argument", "store_from_args"]


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=os.environ.get("FEDFLEET_STORE_URL"),
        metavar="URL",
        help="store URL, redis://host:6379/0 (default $FEDFLEET_STORE_URL; the password may "
        "also come from $FEDFLEET_REDIS_PASSWORD)",
    )


def store_from_args(args: argparse.Namespace) -> Store | None:
    """The store ``--store`` names, or None after printing why it cannot be used."""
    if not args.store:
        print("error: --store (or $FEDFLEET_STORE_URL) is required", file=sys.stderr)
        return None
    try:
        return open_store(args.store)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
