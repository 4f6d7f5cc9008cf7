"""Digits accuracy with DP-FedAvg at epsilon about 8 against no DP (and what SecAgg costs).

Four embedded jobs run on the same workload in the same run: ``deploy/examples/digits-private.yaml``
as shipped (Secure Aggregation + DP, epsilon budget 8), the same job with DP only, with Secure
Aggregation only, and with neither. Every variant runs exactly as many rounds as the private
job does before its budget is spent (about 40), so the accuracy difference is the price of the
privacy, not of a shorter job. The non-DP variants keep the capped weights (``exampleWeightCap``)
so only the noise and the clipping differ.

DP noise is drawn from the OS's entropy, so each DP job is repeated ``--repeats`` times with
fleet seeds 0..repeats-1 and the table prints the mean, the minimum and the maximum final
accuracy, epsilon and the mean wall time. Secure Aggregation changes no number (the sum it
returns is the plaintext sum up to fixed-point rounding), only the time: its wall-time column
is the cost of running the protocol for every group of 50 devices in this one process.

This is a report, not a test: it exits 0 whatever the figures.

    python bench/privacy.py [--repeats N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fedfleet.core.spec import FLJob, load_manifest, parse_manifest
from fedfleet.embedded import run_job

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "digits-private.yaml"


def variant(base: FLJob, *, secagg: bool, dp: bool, rounds: int | None, seed: int) -> FLJob:
    doc: dict[str, Any] = base.model_dump(by_alias=True, mode="json")
    spec = doc["spec"]
    spec["fleet"]["seed"] = seed
    spec["aggregation"]["secureAggregation"]["enabled"] = secagg
    spec["aggregation"]["differentialPrivacy"]["enabled"] = dp
    if not dp:
        spec["aggregation"]["differentialPrivacy"]["epsilonBudget"] = None
    if rounds is not None:
        spec["rounds"]["total"] = rounds
    return parse_manifest(doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    base = load_manifest(EXAMPLE.read_text())
    print(
        f"workload: {EXAMPLE.name}: {base.spec.fleet.devices} devices, goal count "
        f"{base.spec.rounds.goal_count}, {base.spec.fleet.dataset.value}, repeats {args.repeats}"
    )
    rows = []
    rounds: int | None = None
    for name, secagg, dp in [
        ("SecAgg + DP (as shipped)", True, True),
        ("DP only", False, True),
        ("SecAgg only", True, False),
        ("no privacy", False, False),
    ]:
        accs: list[float] = []
        walls: list[float] = []
        eps: float | None = None
        for seed in range(args.repeats):
            job = variant(base, secagg=secagg, dp=dp, rounds=rounds, seed=seed)
            t0 = time.perf_counter()
            result = run_job(job)
            walls.append(time.perf_counter() - t0)
            if result.final_accuracy is not None:
                accs.append(result.final_accuracy)
            eps = result.epsilon
            if rounds is None:
                rounds = result.model_version  # every variant runs the private job's rounds
        rows.append((name, rounds, accs, eps, statistics.mean(walls)))
        print(f"  done: {name}", file=sys.stderr, flush=True)
    print()
    print(
        f"{'variant':<26} {'rounds':>6} {'acc mean':>9} {'min':>7} {'max':>7} "
        f"{'epsilon':>8} {'wall s':>7}"
    )
    for name, n, accs, eps, wall in rows:
        eps_s = "-" if eps is None else f"{eps:.2f}"
        print(
            f"{name:<26} {n:>6} {statistics.mean(accs):>9.4f} {min(accs):>7.4f} "
            f"{max(accs):>7.4f} {eps_s:>8} {wall:>7.1f}"
        )
    dp_acc = statistics.mean(rows[0][2])
    plain = statistics.mean(rows[3][2])
    print(
        f"\naccuracy cost of DP at epsilon {rows[0][3]:.2f} (delta "
        f"{base.spec.aggregation.differential_privacy.delta:g}): "
        f"{(plain - dp_acc) * 100:.1f} points ({dp_acc:.4f} vs {plain:.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
