"""The actors' job-level metrics, scraped from a running deployment and held to the store.

A job runs to the end in the deployed shape (actors as processes over the session's real
redis-server, a fleet over HTTP, federated evaluation on); then each actor's ``/metrics`` is
scraped and every series is compared with what the store recorded: the version and round
gauges equal the store's model version, accuracy and loss equal the last committed metrics
row (server-side and federated), the attempt counters equal the store's attempt history by
outcome and reason, the histograms observed what happened, and no label names a device or an
attempt. A check-in with a bad token is counted as refused.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedfleet.service.telemetry import reason_label
from tests.integration.deployed import small_job
from tests.integration.live_job import live_job

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

ALLOWED_LABELS = {"fljob", "population", "outcome", "reason", "source", "phase", "state", "op"}
ALLOWED_LABELS |= {"status", "le"}  # HTTP status of reports; histogram buckets
DEVICE_ID = re.compile(r"dev-[0-9]+")


def _scrape(url: str) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _by_label(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(dict(labels)[k] for k in keys): v for (n, labels), v in samples.items() if n == name
    }


@pytest.mark.timeout(900)  # bounds a hang on a loaded machine; not a performance check
def test_metrics_of_a_running_deployment_match_the_store(redis_url: str) -> None:
    job = small_job(
        f"metrics-{secrets.token_hex(3)}", rounds={"total": 4}, evaluation={"federated": True}
    )
    lb = {"fljob": job.name, "population": job.spec.population}
    with live_job(job, redis_url) as d:
        store = d.store
        deadline = time.monotonic() + 600  # bounds a hang; the job takes seconds when idle
        while store.job_state(job.key).get("phase") != "Succeeded":
            assert time.monotonic() < deadline, store.job_state(job.key)
            time.sleep(0.2)
        [selector_url] = d.urls("selector")
        refused = httpx.post(
            f"{selector_url}/v1/checkin",
            json={"device_id": "dev-000001"},
            headers={"authorization": "Bearer forged", "x-fedfleet-device": "dev-000001"},
            timeout=30,
        )
        assert refused.status_code == 401
        # the tick that published Succeeded sets the gauges as it ends
        while (
            _value(_scrape(d.urls("coordinator")[0]), "fedfleet_job_phase", **lb, phase="Succeeded")
            != 1
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        scraped = {
            role: _scrape(d.urls(role)[0]) for role in ("coordinator", "selector", "aggregator")
        }
        version = store.model_version(job.key)
        history = store.metrics(job.key)
        attempts = store.attempts(job.key)
        state = store.job_state(job.key)

    c = scraped["coordinator"]
    # per-job gauges equal the store
    assert version == 4
    assert _value(c, "fedfleet_job_model_version", **lb) == version
    assert _value(c, "fedfleet_job_round", **lb) == state["round"] == version
    phases = _by_label(c, "fedfleet_job_phase", "phase")
    assert phases[("Succeeded",)] == 1 and sum(phases.values()) == 1
    last = history[-1]
    assert _value(c, "fedfleet_job_accuracy", **lb, source="server") == last["accuracy"]
    assert _value(c, "fedfleet_job_loss", **lb, source="server") == last["loss"]
    assert "federated_accuracy" in last  # evaluation.federated is on
    assert _value(c, "fedfleet_job_accuracy", **lb, source="federated") == pytest.approx(
        last["federated_accuracy"]
    )
    assert _value(c, "fedfleet_job_epsilon", **lb) is None  # no DP here
    committed = [a for a in attempts if not a["abandoned"]]
    assert len(committed) == version
    assert _value(c, "fedfleet_job_last_commit_timestamp_seconds", **lb) == pytest.approx(
        max(a["ended_at"] for a in committed)
    )

    # attempt counters equal the store's attempt history, by outcome and reason
    expected = Counter(
        ("abandoned" if a["abandoned"] else "committed", reason_label(a["reason"]))
        for a in attempts
    )
    counted = _by_label(c, "fedfleet_attempts_total", "outcome", "reason")
    assert counted == {k: float(v) for k, v in expected.items()}
    errors = sum(_by_label(c, "fedfleet_commit_errors_total", "reason").values())
    failed = [a for a in attempts if reason_label(a["reason"]) in ("commit-refused", "no-commit")]
    assert errors == len(failed)

    # the round-duration histogram saw every attempt; devices add up over the attempts
    durations = _by_label(c, "fedfleet_round_duration_seconds_count", "outcome")
    assert durations[("committed",)] == len(committed)
    assert sum(durations.values()) == len(attempts)
    took = _value(c, "fedfleet_round_duration_seconds_sum", **lb, outcome="committed")
    assert took is not None and took > 0
    devices = _by_label(c, "fedfleet_round_devices_total", "state")
    for state_name in ("selected", "reported", "dropped"):
        assert devices[(state_name,)] == sum(a[state_name] for a in attempts), state_name
    assert devices[("reported",)] >= version * job.spec.rounds.minimum_count
    ratio = _value(c, "fedfleet_round_dropout_ratio", **lb)
    assert ratio is not None and 0.0 <= ratio <= 1.0
    assert _value(c, "fedfleet_round_selected_devices", **lb) == attempts[-1]["selected"]

    # the selector: check-ins by answer, the forged one refused
    s = scraped["selector"]
    answers = _by_label(s, "fedfleet_checkins_total", "outcome")
    assert answers[("selected",)] >= devices[("selected",)] > 0
    assert answers[("refused",)] == 1
    assert ("reconnect",) in answers

    # the aggregator: every accepted update's size observed, each at least the model's bytes
    a = scraped["aggregator"]
    accepted = _value(a, "fedfleet_aggregated_reports_total", status="202")
    sizes = _value(a, "fedfleet_update_size_bytes_count", **lb)
    assert accepted is not None and sizes is not None and sizes >= accepted > 0
    model_bytes = 4 * (64 * 10 + 10)
    total = _value(a, "fedfleet_update_size_bytes_sum", **lb)
    assert total is not None and total >= sizes * model_bytes

    # every actor timed its store calls; no label names a device or an attempt
    for role, samples in scraped.items():
        calls = sum(v for (n, _), v in samples.items() if n == "fedfleet_store_seconds_count")
        assert calls > 0, role
        for (name, labels), _ in samples.items():
            for key, value in labels:
                assert key in ALLOWED_LABELS, (role, name, key)
                assert not DEVICE_ID.search(value), (role, name, key, value)
                if key == "fljob":
                    assert value == job.name
                if key == "population":
                    assert value == job.spec.population
