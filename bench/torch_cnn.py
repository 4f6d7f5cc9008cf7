"""Benchmark of a framework task: the PyTorch CNN example, fedfleet embedded beside Flower 1.42.

Both run the same work in the same run on the same machine: ``examples/pytorch-cnn/fljob.yaml``
(a small CNN on MNIST-5k, 100 devices of two label shards, 20 per round, 40 rounds, E=2, B=10,
SGD lr 0.05 momentum 0.5) with drop-outs off and no over-selection, so both train exactly 20
devices per round; the data split is the fleet's own (written to an ``.npz`` for Flower) and
Flower starts from fedfleet's version-0 weights. By default (``--flower-sampling replay``)
Flower's round r trains the very devices whose reports made fedfleet's model version r, each
with the batch-order seed it had in fedfleet, so the two differ only in the system around the
training (at 10 rounds of this split, one random client sample's accuracy varies by +-7
points, which would hide any real difference). Each run prints:

- wall time and final accuracy of each, and fedfleet / Flower (issue 10's target: <= 0.2, with
  accuracy within 2 points);
- fedfleet's system overhead: the devices' own compute (``train`` and, with federated
  evaluation, ``evaluate`` of the task, timed inside the run) against the wall time, as
  wall / compute (target <= 1.3) and as (wall - compute) / wall; server-side evaluation is
  shown apart (it is work the system does, not the devices);
- the load average before and after (the figures mean little on a busy machine).

Flower runs in its own virtualenv ``${FEDFLEET_CACHE:-~/.cache/fedfleet}/bench-flower-torch-venv``
(flwr[simulation] 1.42.0, torch, numpy), made once with the project's uv (its wheel cache holds
torch already) or pip. A report, not a test: exit 0 whatever the figures.

    python bench/torch_cnn.py [--runs 3] [--rounds N] [--skip-flower] [--train-workers N]
        [--flower-sampling replay|uniform]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MANIFEST = HERE.parent / "examples" / "pytorch-cnn" / "fljob.yaml"
FLOWER_TIMEOUT_SECONDS = 1200.0
"""Default bound on one Flower run (``--flower-timeout``)."""
TARGET_VS_FLOWER = 0.2
TARGET_ACCURACY_GAP_POINTS = 2.0
TARGET_OVERHEAD = 1.3


def cache_dir() -> Path:
    return Path(os.environ.get("FEDFLEET_CACHE") or Path.home() / ".cache" / "fedfleet")


def flower_requirements() -> tuple[str, ...]:
    import torch

    version = torch.__version__.split("+", 1)[0]  # the project's torch: its wheel is cached
    return ("flwr[simulation]==1.42.0", f"torch=={version}", "numpy")


def ensure_flower_venv() -> tuple[Path, str]:
    """The Flower virtualenv's python (made once, stamped with its requirements)."""
    venv = cache_dir() / "bench-flower-torch-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".fedfleet-bench-stamp"
    reqs = flower_requirements()
    want = hashlib.sha256(
        "\n".join((*reqs, platform.python_version(), "bytecode")).encode()
    ).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return python, "reused"
    t0 = time.perf_counter()
    print(f"==> setting up {venv} (once)", flush=True)
    uv = next(iter(sorted((cache_dir() / "tools").glob("uv-*/bin/uv"))), None)
    base = shutil.which("python3") or sys.executable
    if uv is not None:
        env = {**os.environ, "UV_CACHE_DIR": str(cache_dir() / "uv")}
        make = [str(uv), "venv", "--clear", "--quiet", "--seed", "--python", base, str(venv)]
        subprocess.run(make, check=True, env=env)
        # Compiled like the project's venv (deploy/dev.sh): each of Ray's worker processes
        # imports torch and torch._dynamo, 10 s from source against 3 s from bytecode.
        install = [str(uv), "pip", "install", "--quiet", "--compile-bytecode", "--python",
                   str(python), *reqs]  # fmt: skip
        subprocess.run(install, check=True, env=env)
    else:
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *reqs], check=True)
    stamp.write_text(want + "\n")
    return python, f"built in {time.perf_counter() - t0:.0f}s"


def bench_job(rounds: int | None) -> Any:
    """The example's job with drop-outs off and no over-selection (equal work to Flower)."""
    import yaml

    from fedfleet.core.spec import parse_manifest, with_base_dir

    doc = yaml.safe_load(MANIFEST.read_text())
    doc["spec"]["fleet"]["dropoutRate"] = 0.0
    doc["spec"]["rounds"]["overSelection"] = 1.0
    if rounds is not None:
        doc["spec"]["rounds"]["total"] = rounds
    return with_base_dir(parse_manifest(doc), str(MANIFEST.parent))


@dataclass
class Timer:
    seconds: float = 0.0
    calls: int = 0


@dataclass
class Schedule:
    """Which devices' reports made each committed model, and the shuffle seed each trained
    with: what Flower replays (``--flower-sampling replay``)."""

    trained: dict[tuple[str, str], tuple[int, int]]
    """(round key, device id) -> (model version trained from, torch generator seed)."""
    accepted: list[tuple[str, str]]
    """(round key, device id) of every report an aggregator accepted, in order."""

    def rounds(self) -> list[list[list[int]]]:
        """Per committed round (model version 0, 1, ...): [device index, seed] pairs."""
        out: dict[int, list[list[int]]] = {}
        for key in self.accepted:
            version, seed = self.trained[key]
            out.setdefault(version, []).append([int(key[1].rsplit("-", 1)[1]), seed])
        return [sorted(out[v]) for v in sorted(out)]


@contextlib.contextmanager
def recorded_schedule() -> Iterator[Schedule]:
    """Record each device's training (its device id, model version and the seed of the torch
    generator that shuffles its batches) and each accepted report.

    The seed is peeked from a copy of the device's generator: ``TorchTask.train`` draws it
    first thing (``rng.integers(2**62)``), and nothing draws from it in between."""
    import copy

    import fedfleet.aggregator.actor as aggregator
    import fedfleet.device.runtime as runtime

    schedule = Schedule({}, [])
    lock = threading.Lock()
    real_execute, real_accept = runtime.FLRuntime.execute, aggregator.Aggregator.accept

    def execute(self: Any, task: Any, now: float, still_eligible: Any) -> Any:
        seed = int(copy.deepcopy(self.rng).integers(2**62))
        with lock:
            schedule.trained[(task.assignment.round_key, self.device_id)] = (
                task.model_version,
                seed,
            )
        return real_execute(self, task, now, still_eligible)

    def accept(self: Any, env: Any) -> None:
        real_accept(self, env)
        with lock:
            schedule.accepted.append((env.round_key, env.device_id))

    runtime.FLRuntime.execute = execute  # type: ignore[method-assign]
    aggregator.Aggregator.accept = accept  # type: ignore[method-assign]
    try:
        yield schedule
    finally:
        runtime.FLRuntime.execute = real_execute  # type: ignore[method-assign]
        aggregator.Aggregator.accept = real_accept  # type: ignore[method-assign]


@contextlib.contextmanager
def timed_task(job: Any) -> Iterator[dict[str, Timer]]:
    """Time the task's own train/evaluate calls (devices) and the server-side evaluation."""
    import fedfleet.embedded as embedded
    from fedfleet.tasks import task_of

    task = task_of(job).task
    timers = {"train": Timer(), "evaluate": Timer(), "server_evaluate": Timer()}
    lock = threading.Lock()
    server = threading.local()

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if getattr(server, "active", False) and name == "evaluate":
                return fn(*args, **kwargs)  # counted by the server-side wrapper
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    timers[name].seconds += time.perf_counter() - t0
                    timers[name].calls += 1

        return run

    real_evaluator = embedded.task_evaluator

    def evaluator(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        inner = real_evaluator(*args, **kwargs)

        def run(weights: Any) -> Any:
            server.active = True
            t0 = time.perf_counter()
            try:
                return inner(weights)
            finally:
                server.active = False
                timers["server_evaluate"].seconds += time.perf_counter() - t0
                timers["server_evaluate"].calls += 1

        return run

    task.train = wrap("train", task.train)  # type: ignore[method-assign]
    task.evaluate = wrap("evaluate", task.evaluate)  # type: ignore[method-assign]
    embedded.task_evaluator = evaluator  # type: ignore[assignment]
    try:
        yield timers
    finally:
        del task.train, task.evaluate  # back to the class's methods
        embedded.task_evaluator = real_evaluator


def run_fedfleet(job: Any, workers: int | None) -> tuple[dict[str, Any], Schedule]:
    from fedfleet.embedded import EmbeddedOptions, run_job

    with recorded_schedule() as schedule, timed_task(job) as timers:
        t0 = time.perf_counter()
        result = run_job(job, options=EmbeddedOptions(train_workers=workers))
        wall = time.perf_counter() - t0
    compute = timers["train"].seconds + timers["evaluate"].seconds
    return {
        "wall": wall,
        "accuracy": result.final_accuracy,
        "rounds": result.model_version,
        "trainings": timers["train"].calls,
        "device_compute": compute,
        "server_evaluate": timers["server_evaluate"].seconds,
        "overhead": wall / compute if compute else None,
        "overhead_share": (wall - compute) / wall,
        "reports": sum(r.reported for r in result.rounds),
    }, schedule


def write_flower_inputs(job: Any, folder: Path) -> tuple[Path, str]:
    """The fleet's own split and version 0, and the hyper-parameters, for the Flower script."""
    from fedfleet.device.datasets import prepare
    from fedfleet.tasks import task_of

    split = prepare(job.spec.fleet, job.spec.evaluation)
    assert split.test is not None
    initial = task_of(job).initial
    data = folder / "split.npz"
    np.savez(
        data,
        x_train=split.train["x"],
        y_train=split.train["y"],
        x_test=split.test["x"],
        y_test=split.test["y"],
        shards=np.concatenate(split.shards),
        offsets=np.cumsum([0, *(len(s) for s in split.shards)]),
        init_count=np.array(len(initial)),
        **{f"init_{i}": w for i, w in enumerate(initial)},
    )
    spec, cfg = job.spec, job.spec.task.config
    config = {
        "devices": spec.fleet.devices,
        "goal": spec.rounds.goal_count,
        "rounds": spec.rounds.total,
        "local_epochs": spec.plan.local_epochs,
        "batch_size": spec.plan.batch_size,
        "learning_rate": spec.plan.learning_rate,
        "momentum": float(cfg.get("momentum", 0.0)),
        "channels": int(cfg.get("channels", 16)),
    }
    return data, json.dumps(config)


def run_flower(python: Path, data: Path, config: str, timeout: float) -> dict[str, Any]:
    """One Flower run in its own session, so that a hung Ray (its raylet was once seen to die
    at start-up under load, leaving the driver waiting) is killed with all its processes."""
    log = cache_dir() / "bench-flower-torch-last.log"
    cmd = [str(python), str(HERE / "flower_torch_cnn.py"), "--data", str(data), "--config", config]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        log.write_text(stdout + "\n--- stderr ---\n" + stderr)
        return {"error": f"no result after {timeout:.0f} s (killed); see {log}"}
    log.write_text(stdout + "\n--- stderr ---\n" + stderr)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}, no result line; see {log}"}
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="override the 40 rounds")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--flower-timeout", type=float, default=FLOWER_TIMEOUT_SECONDS)
    parser.add_argument(
        "--flower-sampling",
        choices=("replay", "uniform"),
        default="replay",
        help="replay: Flower trains the devices (and batch orders) of fedfleet's run, round by "
        "round, so the accuracies compare like for like; uniform: Flower's own random sampling "
        "(at 10 rounds of this non-IID split, one draw's accuracy varies by +-7 points)",
    )
    parser.add_argument(
        "--train-workers",
        type=int,
        default=None,
        help="devices fedfleet trains at once (default: one per CPU, as `fedfleet run`); "
        "wall/compute is the system overhead only with 1 (with more, compute sums the "
        "threads' time)",
    )
    args = parser.parse_args()
    job = bench_job(args.rounds)
    python: Path | None = None
    if not args.skip_flower:
        python, how = ensure_flower_venv()
        print(f"==> Flower venv {how}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedfleet-bench-") as tmp:
        data, config = write_flower_inputs(job, Path(tmp))
        from fedfleet.embedded import EmbeddedOptions, train_workers
        from fedfleet.tasks import task_of

        params = task_of(job).num_parameters
        workers = train_workers(job, EmbeddedOptions(train_workers=args.train_workers))
        for run in range(1, args.runs + 1):
            before = load()
            ff, schedule = run_fedfleet(job, args.train_workers)
            run_config = config
            plan = schedule.rounds()
            fl: dict[str, Any] = {"error": "skipped"}
            if args.flower_sampling == "replay":
                replay = Path(tmp) / f"schedule-{run}.json"
                replay.write_text(json.dumps(plan))
                run_config = json.dumps({**json.loads(config), "schedule": str(replay)})
                if len(plan) != ff["rounds"] or sum(map(len, plan)) != ff["reports"]:
                    fl["error"] = (
                        f"cannot replay: {len(plan)} rounds of {sum(map(len, plan))} reports "
                        f"recorded, fedfleet committed {ff['rounds']} of {ff['reports']}"
                    )
            if python is not None and fl["error"] == "skipped":
                fl = run_flower(python, data, run_config, args.flower_timeout)
            row = {"run": run, "load_before": before, "load_after": load(), "fedfleet": ff,
                   "flower": fl}  # fmt: skip
            if "error" not in fl and fl.get("parameters") != params:
                fl["error"] = f"Flower's model has {fl.get('parameters')} parameters, not {params}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nPyTorch CNN ({params:,} parameters), {job.spec.rounds.total} rounds x "
          f"{job.spec.rounds.goal_count} devices; torch threads 1 per device; fedfleet trains "
          f"{workers} at once; Flower sampling: {args.flower_sampling}")  # fmt: skip
    header = (
        f"{'run':>3} {'load before/after (1/5/15 min)':>36} {'fedfleet s':>10} {'acc':>6} "
        f"{'flower s':>9} {'acc':>6} {'ff/flower':>9} {'gap pt':>6} "
        f"{'compute s':>9} {'wall/comp':>9} {'ovh share':>9} {'srv eval s':>10}"
    )
    print(header)
    for row in rows:
        ff, fl = row["fedfleet"], row["flower"]
        ok = "error" not in fl
        ratio = ff["wall"] / fl["wall_seconds"] if ok else None
        gap = 100 * abs(ff["accuracy"] - fl["final_accuracy"]) if ok else None
        # With several workers, compute sums the threads' time: not the system's overhead.
        overhead = f"{ff['overhead']:.3f}" if workers == 1 else "-"
        share = f"{ff['overhead_share']:.3f}" if workers == 1 else "-"
        print(
            f"{row['run']:>3} {row['load_before'] + ' / ' + row['load_after']:>36} "
            f"{ff['wall']:>10.1f} {ff['accuracy']:>6.4f} "
            f"{(fl['wall_seconds'] if ok else float('nan')):>9.1f} "
            f"{(fl['final_accuracy'] if ok else float('nan')):>6.4f} "
            f"{(ratio if ratio is not None else float('nan')):>9.3f} "
            f"{(gap if gap is not None else float('nan')):>6.2f} "
            f"{ff['device_compute']:>9.1f} {overhead:>9} {share:>9} "
            f"{ff['server_evaluate']:>10.2f}"
        )
        if not ok:
            print(f"    flower: {fl['error']}")
    print(
        f"targets: fedfleet/flower <= {TARGET_VS_FLOWER}, accuracy gap <= "
        f"{TARGET_ACCURACY_GAP_POINTS} pt, wall/compute <= {TARGET_OVERHEAD} (read with "
        "--train-workers 1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
