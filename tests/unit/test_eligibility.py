"""Eligibility checks on both sides of a check-in."""

from __future__ import annotations

import pytest

from fedfleet.core.eligibility import ineligibility_reason, is_eligible
from fedfleet.core.protocol import CheckIn
from fedfleet.core.spec import EligibilitySpec

pytestmark = pytest.mark.unit


def _c(**kw: object) -> CheckIn:
    base: dict[str, object] = {
        "device_id": "d",
        "population": "p",
        "charging": True,
        "unmetered": True,
        "idle": True,
        "num_examples": 5,
    }
    base.update(kw)
    return CheckIn(**base)  # type: ignore[arg-type]


def test_default_policy_needs_charging_unmetered_idle_and_data() -> None:
    spec = EligibilitySpec()
    assert is_eligible(spec, _c())
    assert not is_eligible(spec, _c(charging=False))
    assert not is_eligible(spec, _c(unmetered=False))
    assert not is_eligible(spec, _c(idle=False))
    assert not is_eligible(spec, _c(num_examples=0))


def test_relaxed_policy_and_minimum_examples() -> None:
    spec = EligibilitySpec(
        require_charging=False, require_unmetered=False, require_idle=False, min_examples=10
    )
    assert is_eligible(spec, _c(charging=False, unmetered=False, idle=False, num_examples=10))
    assert (
        ineligibility_reason(spec, charging=True, unmetered=True, idle=True, num_examples=9)
        == "too-few-examples"
    )
