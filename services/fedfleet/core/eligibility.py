"""Device eligibility: who may work for a population right now.

Checked twice, as in Bonawitz et al.: the device's runtime gates its own check-ins, and the
selector re-checks what the device reports, so a misbehaving client cannot talk itself in.
"""

from __future__ import annotations

from fedfleet.core.protocol import CheckIn
from fedfleet.core.spec import EligibilitySpec

__all__ = ["ineligibility_reason", "is_eligible"]


def ineligibility_reason(
    spec: EligibilitySpec, *, charging: bool, unmetered: bool, idle: bool, num_examples: int
) -> str | None:
    """The first reason a device with these conditions may not work, or None if it may."""
    if spec.require_charging and not charging:
        return "not-charging"
    if spec.require_unmetered and not unmetered:
        return "metered-network"
    if spec.require_idle and not idle:
        return "not-idle"
    if num_examples < max(spec.min_examples, 1):
        return "too-few-examples"
    return None


def is_eligible(spec: EligibilitySpec, checkin: CheckIn) -> bool:
    return (
        ineligibility_reason(
            spec,
            charging=checkin.charging,
            unmetered=checkin.unmetered,
            idle=checkin.idle,
            num_examples=checkin.num_examples,
        )
        is None
    )
