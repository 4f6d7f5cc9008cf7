"""The memory estimate of a job (pure): it grows with what drives it and names the field."""

from __future__ import annotations

import math

import pytest

from fedfleet.core.budget import (
    MemoryEstimate,
    estimate_memory,
    format_bytes,
    memory_problem,
    parse_bytes,
)
from fedfleet.core.spec import FLJobSpec
from fedfleet.tasks.builtin import weight_shapes

pytestmark = pytest.mark.unit


def _spec(**fields: object) -> FLJobSpec:
    return FLJobSpec.model_validate({"population": "p", **fields})


def _params(spec: FLJobSpec) -> int:
    return sum(math.prod(shape) for shape in weight_shapes(spec.model))


def estimate(spec: FLJobSpec) -> MemoryEstimate:
    return estimate_memory(spec, _params(spec))


def test_the_estimate_grows_with_devices_and_model_size() -> None:
    small = estimate(_spec()).total
    assert estimate(_spec(fleet={"devices": 100_000})).total > small + 100 * 2**20
    big_model = _spec(model={"kind": "mlp", "inputs": 64, "classes": 10, "hidden": [100_000]})
    assert estimate(big_model).largest()[2] == "spec.model"


def test_a_job_over_the_limit_is_refused_with_the_estimate() -> None:
    spec = _spec(fleet={"devices": 1_000_000})
    problem = memory_problem(spec, 1 << 30, _params(spec))
    assert problem is not None
    assert problem.startswith("spec.fleet.devices: the job needs an estimated ")
    assert format_bytes(estimate(spec).total) in problem
    assert memory_problem(spec, 64 << 30, _params(spec)) is None


@pytest.mark.parametrize(
    ("text", "n"), [("16Gi", 16 << 30), ("512Mi", 512 << 20), ("2G", 2 * 10**9), ("1000", 1000)]
)
def test_sizes_parse_like_kubernetes_quantities(text: str, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "lots", "-1Gi", "nanGi", "inf", "3Xi"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes(text)
