"""The operator sizes a running job's aggregator pool from what real aggregators publish.

Two jobs identical but for their model (the built-in MLP with 10x the softmax's parameters)
run real :class:`~fedfleet.aggregator.actor.Aggregator` actors over a real ``redis-server``;
they register and publish their load (the update size from the task's initial weights, their
measured rates). The operator's own handlers — create, the status timer, a spec update — run
against that store with a recording Kubernetes client (the one part that is not real: there
is no API server in this tier; ``tests/cluster`` has one). The larger model gets more
aggregators; when the job's selection shrinks, the pool drains and shrinks back.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import pytest

from fedfleet.aggregator.actor import Aggregator
from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet.store.redis import RedisStore
from fedfleet_operator.context import MEMO_KEY, OperatorContext
from fedfleet_operator.handlers.create import on_create
from fedfleet_operator.handlers.status import sync_status
from fedfleet_operator.handlers.update import on_update
from fedfleet_operator.pool import POD_DELETION_COST, Reason
from fedfleet_operator.settings import OperatorSettings

NS = "team-a"


@dataclass
class RecordingKube:
    """Children by (kind, name), the FLJob's status and the pods' annotations, in memory."""

    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    pod_annotations: dict[str, dict[str, str]] = field(default_factory=dict)

    def apply(self, body: Mapping[str, Any]) -> None:
        self.objects[(str(body["kind"]), str(body["metadata"]["name"]))] = copy.deepcopy(dict(body))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self.objects.pop((kind, name), None) is not None

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return None

    def read_population(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None  # no FLPopulation: the selectors are built as without one

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None
    ) -> None:
        self.status.setdefault(name, {}).update(copy.deepcopy(dict(status)))

    def delete_fljob(self, namespace: str, name: str) -> bool:
        return False

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.objects[("Deployment", name)]["spec"]["replicas"] = replicas

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> bool:
        self.pod_annotations.setdefault(name, {}).update(annotations)
        return True

    def replicas(self, job: str) -> int:
        return int(self.objects[("Deployment", f"{job}-aggregator")]["spec"]["replicas"])


@dataclass
class Events:
    posted: list[tuple[str, str]] = field(default_factory=list)

    def info(self, body: kopf.Body, *, reason: str, message: str) -> None:
        self.posted.append((reason, message))

    def warn(self, body: kopf.Body, *, reason: str, message: str) -> None:
        self.posted.append((reason, message))


def _doc(name: str, model: dict[str, Any], goal: int = 20) -> dict[str, Any]:
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": {
            "population": "phones",
            "model": model,
            # 26 devices a round (one aggregator by devices); rounds of 8 s until one commits.
            "rounds": {"goalCount": goal, "selectionTimeoutSeconds": 8},
            "fleet": {"devices": 200},
            "actors": {
                "devicesPerAggregator": 26,
                "aggregatorBytesPerSecond": 16 * 1024,
                "scaleDownStabilizationSeconds": 0,
            },
        },
    }


SMALL = {"kind": "softmax", "inputs": 64, "classes": 10}  # 650 parameters
LARGE = {"kind": "mlp", "inputs": 64, "classes": 10, "hidden": [86]}  # 6,460: 9.9x


@dataclass
class Operator:
    ctx: OperatorContext
    kube: RecordingKube
    events: Events
    store: RedisStore
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, Aggregator]] = field(default_factory=dict)

    def _call(self, handler: Any, name: str, **kw: Any) -> None:
        memo = kopf.Memo()
        memo[MEMO_KEY] = self.ctx
        raw = copy.deepcopy(self.bodies[name])
        raw["status"] = copy.deepcopy(self.kube.status.get(name, {}))
        patch = kopf.Patch()
        handler(
            body=kopf.Body(cast(kopf.RawBody, raw)),
            patch=patch,
            memo=memo,
            logger=logging.getLogger("test"),
            **kw,
        )
        if patch.get("status"):
            self.kube.status.setdefault(name, {}).update(dict(patch["status"]))

    def create(self, doc: dict[str, Any]) -> FLJob:
        name = doc["metadata"]["name"]
        self.bodies[name] = doc
        self._call(on_create, name)
        job = parse_manifest({k: v for k, v in doc.items() if k != "status"})
        token = self.store.acquire_lease(job.key, "coordinator-0", 60)
        assert token is not None
        self.store.put_job_state(job.key, token, {"phase": "Running", "model_version": 0})
        self.pods[name] = {}
        return job

    def run_pods(self, job: FLJob) -> None:
        """What the Deployment does: as many aggregators as its replicas, each registered
        and publishing its load on its tick."""
        pods = self.pods[job.name]
        want = self.kube.replicas(job.name)
        i = 0
        while len(pods) < want:
            pod = f"{job.name}-aggregator-{i}"
            if pod not in pods and pod not in self.kube.pod_annotations:
                pods[pod] = Aggregator(job, self.store, actor_id=pod, secret=b"s" * 32)
            i += 1
        removed = [p for p in pods if POD_DELETION_COST in self.kube.pod_annotations.get(p, {})]
        for pod in removed[: max(0, len(pods) - want)]:  # the ReplicaSet deletes those first
            pods.pop(pod).stop()
            self.store.deregister(job.key, "aggregator", pod)
        for agg in pods.values():
            agg.tick(time.time())

    def tick(self, job: FLJob) -> dict[str, Any]:
        self.run_pods(job)
        self._call(sync_status, job.name)
        return dict(self.kube.status[job.name]["aggregators"])

    def update(self, job: FLJob, **rounds: Any) -> FLJob:
        body = self.bodies[job.name]
        old = copy.deepcopy(body["spec"])
        body["spec"]["rounds"].update(rounds)
        body["metadata"]["generation"] += 1
        self._call(on_update, job.name, old=old, new=copy.deepcopy(body["spec"]))
        return parse_manifest({k: v for k, v in body.items() if k != "status"})


@pytest.fixture
def operator(redis_url: str, redis_prefix: str) -> Iterator[Operator]:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    kube, events = RecordingKube(), Events()
    settings = OperatorSettings(store_url="redis://10.0.0.12:6379/0", pod_name="op-0")
    ctx = OperatorContext(settings, kube, store, events, clock=lambda: datetime.now(UTC))
    yield Operator(ctx, kube, events, store)
    store.close()


def test_a_ten_times_larger_model_gets_more_aggregators_and_the_pool_shrinks_again(
    operator: Operator,
) -> None:
    small = operator.create(_doc("small", SMALL))
    large = operator.create(_doc("large", LARGE))
    assert operator.kube.replicas("small") == operator.kube.replicas("large") == 1  # by devices

    # The first aggregator of each registers and publishes the update size; the status timer
    # sizes the pool from it.
    small_pool = operator.tick(small)
    large_pool = operator.tick(large)
    loads = operator.store.actor_loads(large.key)
    assert [x["update_bytes"] for x in loads.values()] == [4 * 6460]
    assert small_pool["replicas"] == 1, small_pool  # 26 x 2.6 kB / 8 s fits one at 16 KiB/s
    # 26 x 25.8 kB / 8 s = 82 kB/s: six at 16 KiB/s each
    assert large_pool["replicas"] == large_pool["desired"] == 6, large_pool
    assert operator.kube.replicas("large") == 6
    assert Reason.SCALED_UP in [r for r, _ in operator.events.posted]
    assert "bytes" in large_pool["reason"]
    assert operator.tick(small)["replicas"] == 1  # and it stays so

    # The Deployment runs them; they register. Selection shrinks to 7 devices a round.
    operator.tick(large)
    assert operator.tick(large)["current"] == 6
    large = operator.update(large, goalCount=5)
    assert operator.kube.replicas("large") == 6  # a spec change keeps the sized pool
    drained = operator.tick(large)
    # 7 x 25.8 kB / 8 s = 22 kB/s: two at 16 KiB/s each, and still two at 70% of that.
    assert len(drained["draining"]) == 4 and drained["desired"] == 2, drained
    assert operator.store.draining(large.key) == set(drained["draining"])
    removed = operator.tick(large)  # seen draining a tick ago and holding no round: removed
    assert sorted(removed["leaving"]) == sorted(drained["draining"])
    assert set(operator.kube.pod_annotations) == set(drained["draining"])  # lowest cost
    assert operator.kube.replicas("large") == 2
    settled = operator.tick(large)  # the removed pods went
    assert (settled["replicas"], settled["current"], settled["draining"]) == (2, 2, [])
    assert operator.store.draining(large.key) == set()
    reasons = [r for r, _ in operator.events.posted]
    assert reasons.index(Reason.DRAINING) < reasons.index(Reason.SCALED_DOWN)
