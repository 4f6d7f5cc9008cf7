"""How much memory a job needs, estimated from its spec before anything is allocated.

A manifest can be valid field by field and still never run: a model of a billion parameters,
or ten million simulated devices, passed ``fedfleet validate`` and then exhausted the machine
in ``fedfleet run``. :func:`estimate_memory` adds up what a run holds at its peak — the
simulated fleet, the dataset, and the model in each of the places it lives at once — and
:func:`memory_problem` refuses a job over a limit with the estimate and its largest part in the
message. The figures are deliberately rough upper bounds (bytes, not a profile): they only
have to separate "fits" from "cannot possibly fit".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from fedfleet.core.spec import Algorithm, Dataset, FLJobSpec

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "MemoryEstimate",
    "estimate_memory",
    "format_bytes",
    "memory_problem",
    "parse_bytes",
]

DEFAULT_MEMORY_LIMIT: Final = 16 << 30
"""Refuse jobs estimated above 16 GiB unless told otherwise (``FEDFLEET_MAX_MEMORY``)."""

DEVICE_BYTES: Final = 3 << 10
"""A simulated device's runtime, random generator and example views (about 2 KiB measured
with tracemalloc on the digits fleet; rounded up)."""

DATASET_EXAMPLES: Final = {Dataset.digits: 1797, Dataset.mnist: 5000}
"""Examples of each packaged dataset (float32 features, three copies while it is split)."""


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Estimated peak bytes of a run, by part; the field each part grows with."""

    parts: dict[str, tuple[int, str, str]]
    """name -> (bytes, the spec field that drives it, how it was computed)."""

    @property
    def total(self) -> int:
        return sum(b for b, _, _ in self.parts.values())

    def largest(self) -> tuple[str, int, str, str]:
        name, (size, field, how) = max(self.parts.items(), key=lambda kv: kv[1][0])
        return name, size, field, how


def estimate_memory(spec: FLJobSpec, params: int) -> MemoryEstimate:
    """Peak bytes of an embedded run of ``spec`` (``fedfleet run``; ``up`` is no larger) whose
    model has ``params`` parameters (the task's; core knows no model)."""
    model = 4 * params
    aggregators = spec.actors.aggregator_count(spec.rounds)
    in_flight = spec.rounds.selection_target
    moments = {Algorithm.fedavg: 0, Algorithm.fedavgm: 1}.get(spec.aggregation.algorithm, 2)
    # Global model, its encoded checkpoint, the candidate, optimizer moments; a float64
    # running sum per aggregator; one update per device training at once (each is held from
    # training until it is reported).
    model_copies = 3 + moments
    model_bytes = model * model_copies + 8 * params * aggregators + model * in_flight
    examples = DATASET_EXAMPLES.get(spec.fleet.dataset, 5000)
    data_bytes = 3 * 4 * examples * spec.model.inputs
    return MemoryEstimate(
        {
            "model": (
                model_bytes,
                "spec.task" if spec.task is not None else "spec.model",
                f"{params:,} parameters x ({model_copies} copies + {aggregators} "
                f"aggregator sums + {in_flight} updates in flight)",
            ),
            "fleet": (
                DEVICE_BYTES * spec.fleet.devices,
                "spec.fleet.devices",
                f"{spec.fleet.devices:,} simulated devices x {DEVICE_BYTES} bytes",
            ),
            "data": (data_bytes, "spec.fleet.dataset", f"{examples:,} examples"),
        }
    )


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_UNITS: Final = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_IUNITS: Final = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"16Gi"``, ``"512Mi"``, ``"2G"`` or a plain number of bytes (Kubernetes quantities)."""
    raw = text.strip().lower().removesuffix("b")
    digits = raw.rstrip("kmgti")
    unit = raw[len(digits) :]
    factor = _IUNITS.get(unit) or _UNITS.get(unit)
    try:
        value = float(digits)
    except ValueError:
        value = math.nan
    if factor is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (use bytes or a unit such as 16Gi)")
    return int(value * factor)


def memory_problem(spec: FLJobSpec, limit: int, params: int) -> str | None:
    """Why ``spec`` cannot run within ``limit`` bytes, naming its largest part; or ``None``."""
    estimate = estimate_memory(spec, params)
    if estimate.total <= limit:
        return None
    name, size, field, how = estimate.largest()
    return (
        f"{field}: the job needs an estimated {format_bytes(estimate.total)} of memory, more "
        f"than the limit of {format_bytes(limit)}; most of it is the {name} "
        f"({format_bytes(size)}: {how}). Shrink it, or raise the limit with --max-memory "
        "(FEDFLEET_MAX_MEMORY) if the machine has that much"
    )
