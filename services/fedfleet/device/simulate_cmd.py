"""``fedfleet simulate``: drive a deployed job with a simulated fleet over HTTP.

The embedded runner brings its own fleet; a deployment (``fedfleet up``, or the actors on
Kubernetes) has none, so this command plays the phones: the manifest's ``spec.fleet`` devices,
with their shards of the real dataset, availability curve and drop-outs, check in at the given
selector URLs in real time (see :mod:`fedfleet.device.http_fleet`). The job secret stands in for
enrollment: it is what device tokens are derived from.

It runs until ``--duration`` passes, the job ends (with ``--coordinator``), or SIGINT/SIGTERM,
and prints a stats line every ``--stats-every`` seconds. Like the actor commands, every flag has
an environment fallback (``FEDFLEET_<NAME>``) so a pod can run it without a templated command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from fedfleet.core.spec import FLJob, ManifestError, load_manifest, with_base_dir

__all__ = ["add_arguments", "parse_devices", "run"]

log = logging.getLogger("fedfleet.simulate")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FEDFLEET_{name}", default)


def parse_devices(text: str) -> range:
    """``START:STOP`` (half-open, 0-based), for splitting one fleet over several processes."""
    start, sep, stop = text.partition(":")
    try:
        lo, hi = int(start or 0), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP, got {text!r}") from None
    if not sep or lo < 0 or hi <= lo:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP with 0 <= START < STOP, got {text!r}"
        )
    return range(lo, hi)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedfleet simulate``.

    Called for every ``fedfleet`` invocation (the parser is built whole), so it imports nothing
    heavy and never fails: environment fallbacks are strings that argparse converts, and
    reports as usage errors, only when ``simulate`` itself runs.
    """
    env_selectors = [u for u in (_env("SELECTORS") or "").split(",") if u.strip()]
    parser.add_argument(
        "manifest",
        type=Path,
        nargs="?",
        default=_env("MANIFEST"),
        metavar="MANIFEST",
        help="FLJob YAML file (FEDFLEET_MANIFEST)",
    )
    parser.add_argument(
        "--selector",
        dest="selectors",
        action="append",
        metavar="URL",
        help="selector base URL; repeat for several, each check-in picks one at random "
        "(FEDFLEET_SELECTORS, comma-separated)",
    )
    parser.set_defaults(env_selectors=env_selectors)
    parser.add_argument(
        "--secret-file",
        default=_env("SECRET_FILE"),
        help="file holding the job secret, from which device tokens are derived "
        "(FEDFLEET_SECRET_FILE; or FEDFLEET_JOB_SECRET as hex)",
    )
    parser.add_argument(
        "--time-scale",
        type=_positive,
        default=_env("TIME_SCALE", "1.0"),
        metavar="X",
        help="multiply simulated training time and device think times by X; the server's "
        "reconnect windows are obeyed as given (FEDFLEET_TIME_SCALE, default 1.0)",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=_env("DURATION"),
        metavar="S",
        help="stop after S seconds (FEDFLEET_DURATION; default: until interrupted)",
    )
    parser.add_argument(
        "--coordinator",
        default=_env("COORDINATOR_URL"),
        metavar="URL",
        help="coordinator base URL: stop when its /v1/status reports the job Succeeded or "
        "Failed (FEDFLEET_COORDINATOR_URL)",
    )
    parser.add_argument(
        "--devices",
        type=parse_devices,
        default=_env("DEVICES"),
        metavar="START:STOP",
        help="simulate only these of the manifest's fleet.devices (FEDFLEET_DEVICES)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=_env("CONCURRENCY", "64"),
        help="concurrent check-ins (FEDFLEET_CONCURRENCY, default 64)",
    )
    parser.add_argument(
        "--stats-every",
        type=_positive,
        default=_env("STATS_EVERY", "5"),
        metavar="S",
        help="print a stats line every S seconds (default 5)",
    )
    parser.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "WARNING"),
        help="DEBUG, INFO, WARNING or ERROR (FEDFLEET_LOG_LEVEL; WARNING)",
    )


def _load(path: Path | None) -> FLJob | str:
    if path is None:
        return "error: a MANIFEST (or FEDFLEET_MANIFEST) is required"
    try:
        job = load_manifest(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        return f"error: cannot read manifest {path}: {exc.strerror or exc}"
    except UnicodeDecodeError as exc:
        return f"error: manifest {path} is not UTF-8 text: {exc}"
    except ManifestError as exc:
        return "\n".join([f"error: invalid FLJob in {path}:", *(f"  - {p}" for p in exc.problems)])
    # Relative task and data paths are the manifest's directory's.
    return with_base_dir(job, str(Path(path).resolve().parent))


FINISHED = ("Succeeded", "Failed")


async def _job_phase(coordinator: str) -> str | None:
    """The job's phase as the coordinator reports it (None when it cannot be read)."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            r = await client.get(f"{coordinator.rstrip('/')}/v1/status")
        body = r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return None
    state = body.get("state") if isinstance(body, dict) else None
    phase = state.get("phase") if isinstance(state, dict) else None
    return phase if isinstance(phase, str) else None


async def _simulate(args: argparse.Namespace, job: FLJob, selectors: list[str]) -> str:
    from fedfleet.device.http_fleet import HttpFleet
    from fedfleet.service.keys import JobKeys, load_secret

    keys = JobKeys.from_secret(load_secret(args.secret_file))
    fleet = HttpFleet(
        job,
        selectors,
        keys,
        time_scale=args.time_scale,
        devices=args.devices,
        concurrency=args.concurrency,
    )
    stop = asyncio.Event()
    why = ["interrupted"]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    started = time.monotonic()
    print(
        f"simulating {len(fleet.devices)} devices of {job.name} against "
        f"{', '.join(selectors)} (time scale {args.time_scale})",
        flush=True,
    )

    async def watch() -> None:
        last_print = last_status = started
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, args.stats_every))
            now = time.monotonic()
            if now - last_print >= args.stats_every:
                last_print = now
                print(f"[{now - started:7.1f}s] {fleet.stats.line()}", flush=True)
            if args.coordinator and now - last_status >= 2.0:
                last_status = now
                phase = await _job_phase(args.coordinator)
                if phase in FINISHED:
                    why[0] = f"job {phase}"
                    stop.set()

    watcher = asyncio.create_task(watch())
    try:
        if args.duration is None:
            stats = await fleet.run(stop)
        else:
            stats = await fleet.run(started + args.duration, stop_when=stop.is_set)
            if not stop.is_set():
                why[0] = "duration reached"
    finally:
        stop.set()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    print(f"[{time.monotonic() - started:7.1f}s] {stats.line()}", flush=True)
    return why[0]


def run(args: argparse.Namespace) -> int:
    """Handler of ``fedfleet simulate``; returns the exit status."""
    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    loaded = _load(args.manifest)
    if isinstance(loaded, str):
        print(loaded, file=sys.stderr)
        return EXIT_USAGE
    selectors: list[str] = args.selectors or args.env_selectors
    if not selectors:
        print(
            "error: at least one --selector URL (or FEDFLEET_SELECTORS) is required",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.devices is not None and args.devices.stop > loaded.spec.fleet.devices:
        print(
            f"error: --devices {args.devices.start}:{args.devices.stop} goes beyond the "
            f"manifest's fleet.devices ({loaded.spec.fleet.devices})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    bad = [u for u in selectors if not u.startswith(("http://", "https://"))]
    if bad:
        print(f"error: selector URLs must start with http:// or https://: {bad}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from fedfleet.service.keys import JobKeys, load_secret

        JobKeys.from_secret(load_secret(args.secret_file))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    from fedfleet.device.userdata import DataError
    from fedfleet.tasks import TaskError

    try:
        why = asyncio.run(_simulate(args, loaded, selectors))
    except (TaskError, DataError) as exc:  # the task or the fleet's data do not load
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        why = "interrupted"
    print(f"stopped ({why}) after {time.monotonic() - started:.1f}s", flush=True)
    return EXIT_FAILED if why == "job Failed" else EXIT_OK
