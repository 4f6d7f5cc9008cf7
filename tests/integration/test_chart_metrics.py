"""The series the chart's alerts and Grafana dashboard read are ones the actors expose.

The chart test (tests/unit/test_chart_monitoring.py) holds every alert and panel to
``ACTOR_METRICS``; this test holds ``ACTOR_METRICS`` to the real ``/metrics`` of a coordinator,
a selector and an aggregator served by uvicorn (scraped once each has ticked), so renaming a
metric in an actor without updating the chart fails here.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedfleet.aggregator.app import create_app as aggregator_app
from fedfleet.coordinator.app import create_app as coordinator_app
from fedfleet.selector.app import create_app as selector_app
from fedfleet.service.keys import JobKeys, new_secret
from fedfleet.store.memory import MemoryStore
from tests.integration.deployed import small_job
from tests.unit.test_chart_monitoring import ACTOR_METRICS
from tests.uvicorn_thread import listen, serve

pytestmark = pytest.mark.integration


def _series(text: str) -> set[str]:
    """Series names a Prometheus scrape of this text stores (counters gain ``_total``)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
        names |= {sample.name for sample in family.samples}
    return names


def test_actors_expose_every_metric_the_chart_reads() -> None:
    job = small_job("chart-metrics")
    store = MemoryStore()
    keys = JobKeys.from_secret(new_secret())
    exposed: dict[str, set[str]] = {}
    with ExitStack() as stack:
        sock, agg_url = listen()
        apps = {
            "coordinator": (coordinator_app(job, store, actor_id="c-0", tick_seconds=0.1), None),
            "aggregator": (aggregator_app(job, store, keys, actor_id="a-0", address=agg_url), sock),
        }
        sel_sock, sel_url = listen()
        apps["selector"] = (
            selector_app(job, store, keys, actor_id="s-0", address=sel_url),
            sel_sock,
        )
        for role, (app, s) in apps.items():
            url = stack.enter_context(serve(app, sock=s))
            deadline = time.monotonic() + 60  # bounds a hang: a tick has reached the store
            while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, role
                time.sleep(0.05)
            response = httpx.get(f"{url}/metrics", timeout=10)
            assert response.status_code == 200
            exposed[role] = _series(response.text)
    everything = set().union(*exposed.values())
    assert ACTOR_METRICS <= everything, sorted(ACTOR_METRICS - everything)
    assert "fedfleet_store_up" in exposed["selector"] & exposed["aggregator"]
    assert "fedfleet_coordinator_leader" in exposed["coordinator"]
    for role, names in exposed.items():  # every actor times its store calls
        assert "fedfleet_store_seconds_bucket" in names, role
