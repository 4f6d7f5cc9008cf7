"""``fedfleet device``: run one real device, feed its Example Store, show its state.

* ``fedfleet device run --server URL --population NAME --enroll-token TOKEN --data FILE
  --state DIR`` runs one :class:`~fedfleet.device.agent.DeviceAgent` until SIGTERM / SIGINT
  (exit 0: a running task is aborted, the state is saved). ``--data`` is loaded into the Example
  Store once per file content (its sha256 is remembered in the state directory: a changed file
  adds its examples again). Exit 3 when the server refuses the stored credential, 2 for a
  usage problem (bad data, state directory in use, enrollment refused).
* ``fedfleet device add-examples --state DIR --data FILE`` adds a file's examples.
* ``fedfleet device status --state DIR`` prints the identity (never the credential), the next
  check-in and the example count.

Data files are ``.npz`` (``numpy.savez``, loaded without pickle): every array is a field of the
records, under its own name. The built-in tasks read ``x`` (features, float) and ``y``
(integer labels); another task reads whatever fields its ``decode`` takes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedfleet.device.agent import (
    BUILTIN_TASKS,
    CredentialRefused,
    DeviceAgent,
    EnrollmentRefused,
)
from fedfleet.device.example_store import ExampleStore
from fedfleet.device.signals import ConditionsError, SystemSignals, read_conditions_file
from fedfleet.device.state import StateDir, StateError

__all__ = ["add_arguments", "load_records", "run"]

EXIT_OK, EXIT_USAGE, EXIT_CREDENTIAL = 0, 2, 3


class _Usage(Exception):
    pass


def load_records(path: Path) -> dict[str, NDArray[Any]]:
    """The arrays of an ``.npz`` file as record fields (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            records = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _Usage(f"--data {path}: not a readable .npz file: {exc}") from None
    if not records:
        raise _Usage(f"--data {path}: holds no arrays")
    return records


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _store(args: argparse.Namespace, state: StateDir) -> ExampleStore:
    return ExampleStore(
        state.examples_path, max_examples=args.max_examples, ttl_seconds=args.example_ttl
    )


def _add(store: ExampleStore, path: Path) -> int:
    records = load_records(path)
    try:
        return store.add(records, time.time())
    except ValueError as exc:
        raise _Usage(f"--data {path}: {exc}") from None


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=Path, required=True, help="the device's state directory")
    parser.add_argument(
        "--max-examples", type=int, default=10_000, help="Example Store cap (oldest evicted)"
    )
    parser.add_argument(
        "--example-ttl",
        type=float,
        default=30 * 86400.0,
        metavar="SECONDS",
        help="how long an example may be used after it was added (30 days)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="device_command",
        metavar="ACTION",
        required=True,
        help="run (one device until stopped), add-examples, status",
    )
    run_p = sub.add_parser("run", help="run one device until SIGTERM/SIGINT")
    _store_args(run_p)
    run_p.add_argument("--server", required=True, help="the population's endpoint URL")
    run_p.add_argument("--population", required=True, help="the population to join")
    run_p.add_argument(
        "--enroll-token",
        default=os.environ.get("FEDFLEET_ENROLL_TOKEN"),
        help="the population's enrollment token (first start only; env FEDFLEET_ENROLL_TOKEN)",
    )
    run_p.add_argument("--data", type=Path, help=".npz of examples, loaded once per content")
    run_p.add_argument(
        "--ca-file",
        default=os.environ.get("FEDFLEET_CA_FILE"),
        help="PEM of a private CA to trust for an https:// server, besides the system's "
        "(env FEDFLEET_CA_FILE)",
    )
    run_p.add_argument(
        "--allow-task",
        action="append",
        default=[],
        metavar="REF",
        help="also run this task ref (module:attribute; repeatable; built-in tasks always)",
    )
    run_p.add_argument(
        "--conditions",
        type=Path,
        help="JSON file of app signals overriding charging/idle/unmetered (re-read each time)",
    )
    run_p.add_argument("--metered", action="store_true", help="the network is metered")
    run_p.add_argument(
        "--max-load", type=float, default=0.5, help="idle below this 1-minute load per CPU"
    )
    run_p.add_argument(
        "--re-enroll", action="store_true", help="forget the identity and enroll again"
    )
    run_p.add_argument(
        "--recheck-seconds",
        type=float,
        default=60.0,
        help="how long an ineligible device waits before it looks again",
    )
    run_p.add_argument(
        "--rest-seconds", type=float, default=10.0, help="rest after a report (+-50%%)"
    )
    run_p.set_defaults(device_handler=_run)
    add_p = sub.add_parser("add-examples", help="add an .npz file's examples to the store")
    _store_args(add_p)
    add_p.add_argument("--data", type=Path, required=True, help=".npz of examples to add")
    add_p.set_defaults(device_handler=_add_examples)
    status_p = sub.add_parser("status", help="print identity, next check-in, example count")
    _store_args(status_p)
    status_p.set_defaults(device_handler=_status)


def run(args: argparse.Namespace) -> int:
    try:
        return int(args.device_handler(args))
    except (_Usage, StateError, ConditionsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per outcome, not request
    if args.conditions is not None:
        read_conditions_file(args.conditions)  # a bad file is a usage error now, not later
    state = StateDir(args.state)
    state.lock()
    store = _store(args, state)
    try:
        if args.data is not None:
            sha = _sha256(args.data)
            if sha not in state.loaded_data():
                added = _add(store, args.data)
                state.record_data(sha, {"path": str(args.data), "added": added})
                logging.getLogger("fedfleet.device").info(
                    "loaded %d examples from %s", added, args.data
                )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        agent = DeviceAgent(
            args.server,
            args.population,
            state,
            store,
            conditions=SystemSignals(
                metered=args.metered, max_load=args.max_load, overrides=args.conditions
            ),
            allowed_tasks=BUILTIN_TASKS | set(args.allow_task),
            enroll_token=args.enroll_token,
            re_enroll=args.re_enroll,
            recheck_seconds=args.recheck_seconds,
            rest_seconds=args.rest_seconds,
            ca_file=args.ca_file,
        )
        try:
            agent.run(stop)
        except CredentialRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CREDENTIAL
        except EnrollmentRefused as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    finally:
        store.close()
        state.unlock()


def _add_examples(args: argparse.Namespace) -> int:
    state = StateDir(args.state)
    with _store(args, state) as store:
        added = _add(store, args.data)
        total = store.count(time.time())
    print(f"added {added} examples ({total} in the store)")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    if not args.state.is_dir():
        raise _Usage(f"no state directory at {args.state}")
    state = StateDir(args.state)
    identity = state.load_identity()
    now = time.time()
    lines: list[tuple[str, object]] = []
    if identity is None:
        lines.append(("enrolled", "no"))
    else:
        for key, value in identity.public().items():
            lines.append((key, _at(value, now) if key.endswith(("_at", "_after")) else value))
    nxt = state.load_next_checkin()
    lines.append(("next_checkin", _at(nxt, now) if nxt > 0 else "now"))
    lines.append(("reported_rounds", len(state.load_reported())))
    count = 0
    if state.examples_path.exists():
        with _store(args, state) as store:
            count = store.count(now)
    lines.append(("examples", count))
    for key, value in lines:
        print(f"{key}: {value}")
    return EXIT_OK


def _at(value: object, now: float) -> str:
    from datetime import UTC, datetime

    t = float(value)  # type: ignore[arg-type]
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    return f"{stamp} ({t - now:+.0f}s)"
