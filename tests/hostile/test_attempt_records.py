"""A store outage between an attempt's final state and its record loses no record.

The coordinator stores a committed attempt as committed (and configures the next round)
before it writes the attempt's record; if the store fails in between, the record is written
at the next tick, exactly once, before any later attempt's.
"""

from __future__ import annotations

from typing import Any

import pytest

from fedfleet.store.base import StoreUnavailable
from tests.hostile.test_poisoning import World, _job

pytestmark = pytest.mark.hostile


def test_a_record_lost_to_an_outage_is_written_at_the_next_tick_once() -> None:
    world = World(_job())
    store = world.store
    real_record = store.record_attempt
    failures: list[int] = []

    def record_attempt(job: str, token: int, record: dict[str, Any]) -> None:
        if not failures:  # the first record: the store goes away right before it
            failures.append(record["attempt"])
            raise StoreUnavailable("redis at test is unavailable: connection refused")
        real_record(job, token, record)

    store.record_attempt = record_attempt  # type: ignore[method-assign]
    tick = world.tick

    def tolerant_tick(dt: float = 0.5) -> None:
        try:
            tick(dt)
        except StoreUnavailable:
            pass  # what the service's ticker does: log it, tick again

    world.tick = tolerant_tick  # type: ignore[method-assign]
    assert world.round() == ""
    assert world.round() == ""
    assert failures, "the outage never happened"
    records = store.attempts(world.job.key)
    committed = [r for r in records if not r["abandoned"]]
    assert [r["model_version"] for r in committed] == [1, 2]
    assert [r["attempt"] for r in records].count(failures[0]) == 1
    assert store.model_version(world.job.key) == 2
