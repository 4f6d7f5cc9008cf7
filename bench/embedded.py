"""Benchmark of the embedded runner: fedfleet against Flower and a bare numpy floor.

All three run the same workload (``bench/workload.py``) in the same run on the same machine,
and the report prints each one's wall time and final accuracy and the ratios between them:

- fedfleet / Flower wall time, target <= 0.1 (Flower 1.42's Ray simulation engine);
- fedfleet / floor wall time, target <= 5 (a numpy loop with no system around it);
- |fedfleet - floor| final accuracy, target <= 3 points (same algorithm, same work).

fedfleet and the floor run ``--repeats`` times (median wall time), Flower once: it is slow and
its spread is small next to the ratio. Flower runs in its own cached virtualenv under
``${FEDFLEET_CACHE:-~/.cache/fedfleet}/bench-flower-venv`` as a subprocess; its wall time is
measured inside that process around ``run_simulation`` so virtualenv start-up is not charged
to it. OPENBLAS_CORETYPE is left as the environment has it (all three share it) and printed.

This is a report, not a test: it exits 0 whatever the figures (non-zero only on bad usage).

    python bench/embedded.py [--skip-flower] [--rounds N] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import floor
import workload as w

HERE = Path(__file__).resolve().parent
FLOWER_REQUIREMENTS = ("flwr[simulation]==1.42.0", "scikit-learn", "numpy")
"""What the Flower virtualenv holds; a change here rebuilds it (the stamp is their hash)."""
FLOWER_TIMEOUT_SECONDS = 1800.0
"""Upper bound on one Flower run (about a minute is usual on 2 cores)."""

TARGET_VS_FLOWER = 0.1
TARGET_VS_FLOOR = 5.0
TARGET_ACCURACY_GAP_POINTS = 3.0


@dataclass
class Measured:
    """One implementation's figures; ``error`` says why there are none."""

    name: str
    walls: list[float] = field(default_factory=list)
    final_accuracy: float | None = None
    error: str = ""
    note: str = ""

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None


def cache_dir() -> Path:
    return Path(os.environ.get("FEDFLEET_CACHE") or Path.home() / ".cache" / "fedfleet")


def ensure_flower_venv() -> tuple[Path, float, bool]:
    """Create or reuse the Flower virtualenv; returns (its python, seconds taken, reused)."""
    venv = cache_dir() / "bench-flower-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".fedfleet-bench-stamp"
    base = shutil.which("python3") or sys.executable
    want = hashlib.sha256(
        "\n".join((*FLOWER_REQUIREMENTS, platform.python_version())).encode()
    ).hexdigest()
    start = time.perf_counter()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return python, time.perf_counter() - start, True
    print(f"==> setting up {venv} (once; cached by {stamp.name})", flush=True)
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *FLOWER_REQUIREMENTS], check=True)
    stamp.write_text(want + "\n")
    return python, time.perf_counter() - start, False


def run_flower(rounds: int) -> Measured:
    result = Measured("flower 1.42 (ray)")
    try:
        python, setup_seconds, reused = ensure_flower_venv()
    except (subprocess.CalledProcessError, OSError) as exc:
        result.error = f"could not set up the Flower virtualenv: {exc}"
        return result
    result.note = f"venv {'reused' if reused else 'built'} in {setup_seconds:.1f}s"
    log = cache_dir() / "bench-flower-last.log"
    try:
        proc = subprocess.run(
            [str(python), str(HERE / "flower_digits.py"), "--rounds", str(rounds)],
            capture_output=True,
            text=True,
            timeout=FLOWER_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {FLOWER_TIMEOUT_SECONDS:.0f}s"
        return result
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        result.error = f"exit {proc.returncode}, no result line; see {log}"
        return result
    figures = json.loads(lines[-1])
    result.walls = [float(figures["wall_seconds"])]
    result.final_accuracy = float(figures["final_accuracy"])
    return result


def run_floor(rounds: int, repeats: int) -> Measured:
    result = Measured("numpy floor")
    for _ in range(repeats):
        run = floor.run(rounds)
        result.walls.append(run.wall_seconds)
        result.final_accuracy = run.final_accuracy
    return result


def run_fedfleet(rounds: int, repeats: int) -> Measured:
    """fedfleet's embedded runner; wall time is measured here around ``run_job``, like the rest."""
    result = Measured("fedfleet embedded")
    try:
        from fedfleet.embedded import run_job
    except ImportError as exc:
        result.error = f"fedfleet.embedded is not importable yet ({exc})"
        return result
    job = w.fljob(rounds)
    reported: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            out = run_job(job)
        except Exception as exc:  # a report: show the failure, do not crash the other rows
            traceback.print_exc()
            result.walls.clear()
            result.error = f"run_job raised {type(exc).__name__}: {exc}"
            return result
        result.walls.append(time.perf_counter() - start)
        reported.append(out.wall_seconds)
        result.final_accuracy = out.final_accuracy
        committed = [r for r in out.rounds if not r.abandoned]
        evaluated = sum(r.accuracy is not None for r in committed)
        full = sum(r.reported == w.DEVICES_PER_ROUND for r in committed)
        if not len(out.rounds) == len(committed) == evaluated == full == rounds:
            # Not the same work as the others: say so next to the figures.
            result.error = (
                f"ran {len(out.rounds)} attempts, {len(committed)} committed, {evaluated} "
                f"evaluated, {full} with {w.DEVICES_PER_ROUND} reports; expected {rounds} of each"
            )
    result.note = f"its own JobResult.wall_seconds: median {statistics.median(reported):.3f}s"
    return result


def verdict(value: float | None, ok: Callable[[float], bool]) -> str:
    if value is None:
        return "n/a "
    return "PASS" if ok(value) else "MISS"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def report(measured: list[Measured], fedfleet: Measured, flower: Measured, base: Measured) -> None:
    print()
    print(f"{'implementation':<22}{'wall s':>10}{'runs':>6}{'final acc':>11}  notes")
    for m in measured:
        wall = f"{m.wall:.3f}" if m.wall is not None else "-"
        acc = f"{m.final_accuracy:.4f}" if m.final_accuracy is not None else "-"
        notes = "; ".join(s for s in (m.note, m.error and f"ERROR: {m.error}") if s)
        print(f"{m.name:<22}{wall:>10}{len(m.walls):>6}{acc:>11}  {notes}")

    def ratio(a: Measured, b: Measured) -> float | None:
        return a.wall / b.wall if a.wall is not None and b.wall else None

    vs_flower = ratio(fedfleet, flower)
    vs_floor = ratio(fedfleet, base)
    gap = (
        abs(fedfleet.final_accuracy - base.final_accuracy) * 100
        if fedfleet.final_accuracy is not None and base.final_accuracy is not None
        else None
    )

    def show(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    print()
    print(f"{'check':<40}{'value':>10}{'target':>10}  verdict")
    rows = [
        ("fedfleet / flower wall time", show(vs_flower, ".3f"), f"<= {TARGET_VS_FLOWER}",
         verdict(vs_flower, lambda v: v <= TARGET_VS_FLOWER)),
        ("fedfleet / floor wall time", show(vs_floor, ".2f"), f"<= {TARGET_VS_FLOOR:g}",
         verdict(vs_floor, lambda v: v <= TARGET_VS_FLOOR)),
        ("|fedfleet - floor| accuracy, points", show(gap, ".2f"),
         f"<= {TARGET_ACCURACY_GAP_POINTS:g}",
         verdict(gap, lambda v: v <= TARGET_ACCURACY_GAP_POINTS)),
    ]  # fmt: skip
    for name, value, target, mark in rows:
        print(f"{name:<40}{value:>10}{target:>10}  {mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-flower", action="store_true", help="do not run Flower")
    parser.add_argument("--rounds", type=int, default=w.ROUNDS, help="rounds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of fedfleet and floor")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")

    print(f"fedfleet embedded benchmark, {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"workload: digits, {w.DEVICES} devices x {w.SHARDS_PER_DEVICE} label shards, "
        f"{w.DEVICES_PER_ROUND}/round, {args.rounds} rounds, E={w.LOCAL_EPOCHS} "
        f"B={w.BATCH_SIZE} lr={w.LEARNING_RATE}, softmax 64->10, FedAvg"
    )
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores, "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
        f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}"
    )
    print(f"load average at start: {load_average()}", flush=True)

    print(f"==> floor x{args.repeats}", flush=True)
    base = run_floor(args.rounds, args.repeats)
    print(f"==> fedfleet x{args.repeats}", flush=True)
    fedfleet = run_fedfleet(args.rounds, args.repeats)
    if args.skip_flower:
        flower = Measured("flower 1.42 (ray)", note="skipped (--skip-flower)")
    else:
        print("==> flower x1 (slow: starts Ray)", flush=True)
        flower = run_flower(args.rounds)

    report([fedfleet, flower, base], fedfleet, flower, base)
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
