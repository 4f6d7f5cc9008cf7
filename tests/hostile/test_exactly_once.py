"""Exactly once, per device per round: across aggregators, selectors and aborts.

The tests of this module share one round (goal 3; four devices selected, assigned alternately
to aggregator-0 and aggregator-1) and run in order: each device's update is distinct, so the
committed model at the end shows which reports were counted, and how often. Which four of the
checking-in devices the selectors chose is theirs to decide, so the tests name them by role
(``A``..``D``, in the order they were selected), never by device id.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from fedfleet.core.checkpoint import unpack_checkpoint
from fedfleet.core.serde import decode_arrays
from fedfleet.tasks import task_of
from fedfleet.tasks.builtin import init_weights
from tests.hostile.harness import Live, good_update

pytestmark = pytest.mark.hostile


def _role(live: Live, role: str) -> str:
    """The device playing ``role``: A, B, C and D are the selected devices in selection order."""
    selected = list(live.tickets)
    assert len(selected) == 4, selected
    return selected["ABCD".index(role)]


def _update(live: Live, device: str) -> bytes:
    return good_update(live.job, 10 + list(live.tickets).index(device))


def _total(live: Live, kind: str) -> int:
    return sum(live.store.counts(live.job.key, live.round_key, kind).values())


def _eventually(check: object, what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_report_is_counted_once_whichever_aggregator_gets_it(live: Live) -> None:
    a = _role(live, "A")
    first = live.report(a, body=_update(live, a))
    assert first.status_code == 202, first.text
    other = live.other_aggregator(a)
    for selector in (0, 1):
        for aggregator in (other, live.assigned[a]):
            again = live.report(a, aggregator=aggregator, body=_update(live, a), selector=selector)
            assert again.status_code == 409, again.text
            assert "already reported" in again.json()["detail"]
    assert live.folded() == 1
    assert _total(live, "reported") == 1


def test_a_report_after_the_devices_own_abort_is_refused(live: Live) -> None:
    b = _role(live, "B")
    assert live.abort(b).status_code == 202
    for selector in (0, 1):
        for aggregator in live.aggregator_urls:
            r = live.report(b, aggregator=aggregator, body=_update(live, b), selector=selector)
            assert r.status_code == 409, r.text
            assert "aborted" in r.json()["detail"]
    assert live.folded() == 1
    _eventually(lambda: _total(live, "dropped") == 1, "the abort was never counted")
    # Repeating the abort, at either selector, counts nothing more.
    assert live.abort(b, selector=0).status_code == 202
    assert live.abort(b, selector=1).status_code == 202
    time.sleep(0.3)  # several selector ticks: a second count would have been flushed
    assert _total(live, "dropped") == 1


def test_an_abort_after_a_report_is_not_a_drop(live: Live) -> None:
    a = _role(live, "A")
    assert live.abort(a, selector=1).status_code == 202
    time.sleep(0.3)
    assert _total(live, "dropped") == 1
    assert _total(live, "reported") == 1


def test_an_unknown_aggregator_is_a_client_error(live: Live) -> None:
    c = _role(live, "C")
    for selector in (0, 1):
        r = live.report(c, aggregator="aggregator-9", body=_update(live, c), selector=selector)
        assert 400 <= r.status_code < 500, r.text
        assert "retry-after" not in r.headers
        s = httpx.post(
            f"{live.selector_urls[selector]}/v1/secagg/{live.round_key}/advertise",
            content=b"{}",
            headers={**live.ticketed_headers(c), "x-fedfleet-aggregator": "aggregator-9"},
            timeout=10,
        )
        assert 400 <= s.status_code < 500, s.text
        assert "retry-after" not in s.headers
    assert live.folded() == 1


def test_a_device_racing_to_both_aggregators_is_counted_once(live: Live) -> None:
    c = _role(live, "C")
    routes = [(agg, s) for agg in live.aggregator_urls for s in (0, 1)] * 2
    body = _update(live, c)
    with ThreadPoolExecutor(len(routes)) as pool:
        answers = list(
            pool.map(
                lambda route: live.report(c, aggregator=route[0], body=body, selector=route[1]),
                routes,
            )
        )
    codes = sorted(r.status_code for r in answers)
    assert codes.count(202) == 1, codes
    assert set(codes) == {202, 409}, codes
    assert live.folded() == 2
    assert _total(live, "reported") == 2


def test_the_round_commits_each_device_once(live: Live) -> None:
    a = _role(live, "A")
    c = _role(live, "C")
    d = _role(live, "D")
    before_version, _ = live.committed()
    r = live.report(d, body=_update(live, d))
    assert r.status_code == 202, r.text
    _eventually(lambda: live.committed()[0] > before_version, "the full round never committed", 60)
    history = live.store.metrics(live.job.key)
    assert history[-1]["reports"] == 3
    _, data = live.committed()
    weights, _ = unpack_checkpoint(data, task_of(live.job).shapes)
    old = init_weights(live.job.spec.model)  # the round trained from version 0
    updates = [
        decode_arrays(_update(live, d), expected_shapes=[w.shape for w in old]) for d in (a, c, d)
    ]
    # FedAvg with equal weights (10 examples each): old + the plain mean of the three updates.
    for i, w in enumerate(weights):
        expected = old[i] + np.mean([u[i] for u in updates], axis=0)
        np.testing.assert_allclose(w, expected, rtol=0, atol=1e-6)
