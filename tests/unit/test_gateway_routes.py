"""The population gateway's pure logic: route entries, the offer order, route tickets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fedfleet.gateway.routes import (
    Route,
    RouteKeys,
    offer_order,
    parse_routes,
    route_id,
    route_scope,
)


def _route(job: str, *, actor: str = "selector-0", priority: int = 0, weight: int = 1,
           open: bool = True) -> Route:  # fmt: skip
    return Route(
        job=job,
        actor=actor,
        address="http://127.0.0.9:8080",
        priority=priority,
        weight=weight,
        open=open,
        report_limit=1000,
        secagg_limit=2000,
    )


def test_an_entry_round_trips_and_its_id_names_job_and_actor() -> None:
    r = _route("ns/a")
    assert Route.from_json(r.to_json()) == r
    assert r.id == route_id("ns/a", "selector-0") != route_id("ns/b", "selector-0")
    assert len(r.id) == 16


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"job": "a"}',
        _route("a").to_json().replace('"weight":1', '"weight":0'),
        _route("a").to_json().replace('"weight":1', '"weight":"1"'),
        _route("a").to_json().replace('"open":true', '"open":1'),
        _route("a").to_json().replace("http://", "file://"),
        _route("a").to_json()[:-1] + ',"extra":1}',
    ],
)
def test_malformed_entries_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Route.from_json(text)


def test_parse_routes_drops_entries_that_do_not_parse_or_sit_under_another_id() -> None:
    good, other = _route("a"), _route("b")
    routes, bad = parse_routes({good.id: good.to_json(), "0" * 16: other.to_json(), "x": "{"})
    assert routes == {good.id: good}
    assert sorted(bad) == sorted(["0" * 16, "x"])


def test_higher_priority_first_full_jobs_last_and_only_one_of_them() -> None:
    low, high = _route("low", priority=0), _route("high", priority=5)
    full_high = _route("full-high", priority=5, open=False)
    full_low = _route("full-low", priority=0, open=False)
    order = offer_order([low, full_low, full_high, high], random.Random(1))
    assert order == [high, low, full_high]
    assert offer_order([], random.Random(1)) == []
    # Nobody has room: the top priority's pacing window is the answer.
    assert offer_order([full_low, full_high], random.Random(1)) == [full_high]


def test_equal_priority_jobs_are_offered_first_in_proportion_to_their_weights() -> None:
    rng = random.Random(7)
    jobs = [_route("a", weight=3), _route("b", weight=1), _route("c", weight=0 + 4)]
    firsts = Counter(offer_order(jobs, rng)[0].job for _ in range(8000))
    for job, share in (("a", 3 / 8), ("b", 1 / 8), ("c", 4 / 8)):
        assert abs(firsts[job] / 8000 - share) < 0.025, firsts


def test_a_jobs_selectors_stay_together_in_the_order() -> None:
    routes = [_route("a", actor="s0"), _route("b"), _route("a", actor="s1")]
    for seed in range(20):
        jobs = [r.job for r in offer_order(routes, random.Random(seed))]
        assert jobs in (["a", "a", "b"], ["b", "a", "a"])


def test_route_tickets_bind_route_round_device_and_inner_ticket() -> None:
    keys = RouteKeys(b"s" * 32)
    wrapped = keys.wrap("0123456789abcdef", "a12", "d-1", "f" * 64)
    assert len(wrapped) <= 128  # fits the device API's ticket header
    got = keys.unwrap(wrapped, "a12", "d-1")
    assert got is not None and got.route == "0123456789abcdef" and got.ticket == "f" * 64
    assert keys.unwrap(wrapped, "a13", "d-1") is None
    assert keys.unwrap(wrapped, "a12", "d-2") is None
    assert RouteKeys(b"t" * 32).unwrap(wrapped, "a12", "d-1") is None
    tampered = wrapped.replace("0123456789abcdef", "0123456789abcdee")
    assert keys.unwrap(tampered, "a12", "d-1") is None
    assert keys.unwrap(wrapped[:-1] + "e", "a12", "d-1") is None
    for junk in ("", "g1", "g1...", "f" * 64, "g1.0123456789abcdef.x.é"):
        assert keys.unwrap(junk, "a12", "d-1") is None


def test_a_population_scope_is_its_name_and_secret() -> None:
    a = route_scope("phones", b"a" * 32)
    assert a == route_scope("phones", b"a" * 32) and a.startswith("phones.")
    # The same name in another namespace (another secret) never shares the routes.
    assert route_scope("phones", b"b" * 32) != a
    assert route_scope("tablets", b"a" * 32) != a
