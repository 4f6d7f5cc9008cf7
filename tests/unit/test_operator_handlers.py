"""The operator's handlers called as kopf calls them, against a fake Kubernetes API, the
in-memory store and recorded Events: creation, Invalid specs, resizing, policy roll-outs,
suspend/resume, progress and completion, an unreachable store, and cleanup on deletion."""

from __future__ import annotations

import base64
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import kopf
import pytest

from fedfleet.store.base import StoreUnavailable
from fedfleet.store.memory import MemoryStore
from fedfleet_operator.builders import is_job_secret
from fedfleet_operator.conditions import INVALID, READY, Reason, find_condition, rfc3339
from fedfleet_operator.context import MEMO_KEY, OperatorContext
from fedfleet_operator.handlers import register_all
from fedfleet_operator.handlers.create import on_create
from fedfleet_operator.handlers.delete import on_delete
from fedfleet_operator.handlers.startup import configure_kopf, probe_store
from fedfleet_operator.handlers.status import sync_status
from fedfleet_operator.handlers.update import on_resume, on_update
from fedfleet_operator.kube import StatusWriteError
from fedfleet_operator.main import QuietStatusTimer, default_liveness
from fedfleet_operator.naming import ANNOTATION_SPEC_HASH
from fedfleet_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

NS, NAME, KEY, UID = "team-a", "mnist", "team-a/mnist", "uid-123"
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
ACTORS = {
    ("Deployment", "mnist-coordinator"),
    ("Deployment", "mnist-selector"),
    ("Deployment", "mnist-aggregator"),
    ("Service", "mnist-selector"),
}
PLAN = {("ConfigMap", "mnist-plan"), ("Secret", "mnist-secret")}


# -- fakes ----------------------------------------------------------------------------------------


@dataclass
class FakeKube:
    """Objects by (kind, name) in one namespace; apply merges like a patch would. The FLJob
    itself is ``fljob`` (the world's object): status writes merge into it, refused with 409
    when its resourceVersion moved on, and refused outright while ``status_api_down``."""

    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    writes: int = 0
    fljob: dict[str, Any] = field(default_factory=dict)
    status_writes: list[dict[str, Any]] = field(default_factory=list)
    status_api_down: bool = False
    fljob_deleted: bool = False
    pod_annotations: dict[str, dict[str, str]] = field(default_factory=dict)
    populations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def patch_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None
    ) -> None:
        assert (namespace, name) == (NS, NAME)
        if self.status_api_down:
            raise StatusWriteError("status of team-a/mnist: 503 Service Unavailable")
        meta = self.fljob["metadata"]
        if resource_version is not None and resource_version != meta["resourceVersion"]:
            raise StatusWriteError("status of team-a/mnist: 409 Conflict")
        self.fljob.setdefault("status", {}).update(copy.deepcopy(dict(status)))
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        self.status_writes.append(copy.deepcopy(dict(status)))

    def delete_fljob(self, namespace: str, name: str) -> bool:
        assert (namespace, name) == (NS, NAME)
        deleted, self.fljob_deleted = not self.fljob_deleted, True
        return deleted

    def apply(self, body: Mapping[str, Any]) -> None:
        assert body["metadata"]["namespace"] == NS
        self.writes += 1
        self.objects[(str(body["kind"]), str(body["metadata"]["name"]))] = copy.deepcopy(dict(body))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self.objects.pop((kind, name), None) is not None

    def read_population(self, namespace: str, name: str) -> dict[str, Any] | None:
        assert namespace == NS
        return copy.deepcopy(self.populations.get(name))

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        secret = self.objects.get(("Secret", name))
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        assert namespace == NS
        self.writes += 1
        self.objects[("Deployment", name)]["spec"]["replicas"] = replicas

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> bool:
        assert namespace == NS
        self.pod_annotations.setdefault(name, {}).update(annotations)
        return True

    def replicas(self, role: str) -> int:
        return int(self.objects[("Deployment", f"{NAME}-{role}")]["spec"]["replicas"])

    def spec_hash(self, role: str) -> str:
        d = self.objects[("Deployment", f"{NAME}-{role}")]
        return str(d["spec"]["template"]["metadata"]["annotations"][ANNOTATION_SPEC_HASH])


@dataclass
class RecordedEvents:
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def info(self, body: kopf.Body, *, reason: str, message: str) -> None:
        self.events.append(("Normal", reason, message))

    def warn(self, body: kopf.Body, *, reason: str, message: str) -> None:
        self.events.append(("Warning", reason, message))

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.events]


class FlakyStore(MemoryStore):
    """The memory store, unreachable while ``down`` is set."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("redis at 10.0.0.12:6379 is unavailable: connection refused")

    def job_state(self, job: str) -> dict[str, Any]:
        self._check()
        return super().job_state(job)

    def metrics(self, job: str) -> list[dict[str, Any]]:
        self._check()
        return super().metrics(job)

    def delete_job(self, job: str) -> int:
        self._check()
        return super().delete_job(job)


@dataclass
class World:
    kube: FakeKube
    store: FlakyStore
    events: RecordedEvents
    memo: kopf.Memo
    logger: logging.Logger
    raw: dict[str, Any]
    now: list[datetime]

    def body(self) -> kopf.Body:
        return kopf.Body(cast(kopf.RawBody, copy.deepcopy(self.raw)))

    def set_spec(self, **changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        old = copy.deepcopy(self.raw["spec"])
        for key, value in changes.items():
            if isinstance(value, dict):
                self.raw["spec"][key] = {**self.raw["spec"].get(key, {}), **value}
            else:
                self.raw["spec"][key] = value
        self.raw["metadata"]["generation"] += 1
        return old, copy.deepcopy(self.raw["spec"])

    def apply(self, patch: kopf.Patch) -> None:
        """What kopf does with the handler's patch: merge it into the object's status."""
        if patch.get("status"):
            self.raw.setdefault("status", {}).update(copy.deepcopy(dict(patch["status"])))
            meta = self.raw["metadata"]
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)

    def call(self, handler: Any, **kwargs: Any) -> kopf.Patch:
        patch = kopf.Patch()
        try:
            handler(body=self.body(), patch=patch, memo=self.memo, logger=self.logger, **kwargs)
        finally:
            self.apply(patch)
        return patch

    def update(self, **changes: Any) -> kopf.Patch:
        old, new = self.set_spec(**changes)
        return self.call(on_update, old=old, new=new)

    def tick(self, minutes: float = 0.1, body: kopf.Body | None = None) -> dict[str, Any]:
        """One run of the status timer (on ``body``, a view of the object kopf may hold from
        earlier, else the current one); returns what it wrote to the status."""
        self.now[0] += timedelta(minutes=minutes)
        before = len(self.kube.status_writes)
        patch = kopf.Patch()
        sync_status(body=body or self.body(), patch=patch, memo=self.memo, logger=self.logger)
        assert not patch, "the timer writes the status itself, never through kopf's patch"
        written: dict[str, Any] = {}
        for fields in self.kube.status_writes[before:]:
            written.update(fields)
        return written

    def status(self) -> dict[str, Any]:
        return dict(self.raw.get("status", {}))

    def condition(self, type_: str) -> Mapping[str, Any]:
        found = find_condition(self.status().get("conditions", []), type_)
        assert found is not None, type_
        return found

    def coordinator_reports(self, *, rounds: int, accuracy: float = 0.8, **state: Any) -> None:
        """What the coordinator and the master aggregator write while the job runs."""
        token = self.store.acquire_lease(KEY, "coordinator-0", 60)
        assert token is not None
        for r in range(self.store.model_version(KEY) + 1, rounds + 1):
            self.store.commit_checkpoint(
                KEY, token, r - 1, r, b"model", {"accuracy": accuracy, "loss": 0.4, "reports": 10}
            )
        self.store.put_job_state(
            KEY,
            token,
            {
                "phase": "Running",
                "rounds": 5,
                "round": rounds,
                "model_version": rounds,
                "start_time": T0.timestamp(),
                **state,
            },
        )
        self.store.release_lease(KEY, "coordinator-0", token)


@pytest.fixture
def world() -> World:
    store = FlakyStore()
    kube, events, now = FakeKube(), RecordedEvents(), [T0]
    settings = OperatorSettings(
        store_url="redis://:pw@10.0.0.12:6379/0", pod_name="op-0", cleanup_attempts=3
    )
    ctx = OperatorContext(settings, kube, store, events, clock=lambda: now[0])
    memo = kopf.Memo()
    memo[MEMO_KEY] = ctx
    raw: dict[str, Any] = {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLJob",
        "metadata": {
            "name": NAME,
            "namespace": NS,
            "uid": UID,
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {
            "population": "phones",
            "rounds": {"total": 5, "goalCount": 1000},
            "fleet": {"devices": 2000},
            "actors": {"selectors": 2},
        },
    }
    kube.fljob = raw
    return World(kube, store, events, memo, logging.getLogger("test.operator"), raw, now)


# -- create ---------------------------------------------------------------------------------------


def test_create_makes_the_children_owned_by_the_job(world: World) -> None:
    world.call(on_create)
    assert set(world.kube.objects) == PLAN | ACTORS
    for obj in world.kube.objects.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (ref["uid"], ref["kind"], ref["controller"]) == (UID, "FLJob", True)
    status = world.status()
    assert (status["phase"], status["observedGeneration"], status["rounds"]) == ("Pending", 1, 5)
    assert world.condition(INVALID)["status"] == "False"
    assert world.events.reasons() == [Reason.CHILDREN_APPLIED]
    assert (world.kube.replicas("coordinator"), world.kube.replicas("aggregator")) == (2, 3)
    secret = world.kube.read_secret(NS, "mnist-secret") or {}
    assert is_job_secret(secret["job-secret"]) and secret["redis-password"] == "pw"


def test_create_again_keeps_the_job_secret(world: World) -> None:
    world.call(on_create)
    first = world.kube.read_secret(NS, "mnist-secret")
    world.call(on_resume)
    assert world.kube.read_secret(NS, "mnist-secret") == first


def test_invalid_create_has_no_children_and_no_retry(world: World) -> None:
    world.raw["spec"]["rounds"]["goalCount"] = 5000  # more than fleet.devices
    with pytest.raises(kopf.PermanentError, match="goalCount"):
        world.call(on_create)
    assert world.kube.objects == {}
    assert world.status()["phase"] == "Pending"
    invalid = world.condition(INVALID)
    assert (invalid["status"], invalid["reason"]) == ("True", Reason.INVALID_SPEC)
    assert "exceeds fleet.devices" in invalid["message"]
    assert world.condition(READY)["reason"] == Reason.INVALID_SPEC
    assert world.events.events[-1][:2] == ("Warning", Reason.INVALID_SPEC)


def test_fixing_an_invalid_spec_creates_the_children(world: World) -> None:
    world.raw["spec"]["rounds"]["goalCount"] = 5000
    with pytest.raises(kopf.PermanentError):
        world.call(on_create)
    world.update(rounds={"goalCount": 100})
    assert set(world.kube.objects) == PLAN | ACTORS
    assert world.condition(INVALID)["status"] == "False"
    assert world.condition(READY)["reason"] == Reason.WAITING_FOR_COORDINATOR


# -- update ---------------------------------------------------------------------------------------


def test_resizing_changes_replicas_without_a_roll(world: World) -> None:
    world.call(on_create)
    before = world.kube.spec_hash("coordinator")
    world.update(actors={"selectors": 5, "maxAggregators": 2})
    assert (world.kube.replicas("selector"), world.kube.replicas("aggregator")) == (5, 2)
    assert world.kube.spec_hash("coordinator") == before


def test_policy_change_rolls_the_actors_and_rerenders_the_plan(world: World) -> None:
    world.call(on_create)
    before = world.kube.spec_hash("coordinator")
    world.update(rounds={"total": 9})
    for role in ("coordinator", "selector", "aggregator"):
        assert world.kube.spec_hash(role) != before
    plan = world.kube.objects[("ConfigMap", "mnist-plan")]["data"]["fljob.yaml"]
    assert "total: 9" in plan
    assert world.status()["observedGeneration"] == 2


def test_suspend_and_resume(world: World) -> None:
    world.call(on_create)
    world.update(suspend=True)
    assert {world.kube.replicas(r) for r in ("coordinator", "selector", "aggregator")} == {0}
    assert world.status()["phase"] == "Suspended"
    assert Reason.SUSPENDED in world.events.reasons()
    world.update(suspend=False)
    assert world.kube.replicas("coordinator") == 2
    assert world.status()["phase"] == "Pending"
    assert Reason.RESUMED in world.events.reasons()


def test_invalid_update_changes_nothing(world: World) -> None:
    world.call(on_create)
    world.coordinator_reports(rounds=2)
    world.tick()
    children = copy.deepcopy(world.kube.objects)
    with pytest.raises(kopf.PermanentError):
        world.update(rounds={"goalCount": 5000})
    assert world.kube.objects == children
    assert world.status()["phase"] == "Running"
    assert world.condition(INVALID)["status"] == "True"
    world.tick()  # the timer keeps reporting progress, and keeps the job marked Invalid
    assert world.status()["phase"] == "Running"
    assert world.condition(INVALID)["status"] == "True"
    assert world.condition(READY)["status"] == "True"


def test_finished_jobs_get_no_actors_back(world: World) -> None:
    world.call(on_create)
    world.raw["status"]["phase"] = "Succeeded"
    for key in ACTORS:
        world.kube.objects.pop(key)
    world.update(actors={"selectors": 4})
    assert set(world.kube.objects) == PLAN


# -- status timer ---------------------------------------------------------------------------------


def test_progress_flows_from_the_store(world: World) -> None:
    world.call(on_create)
    world.tick()
    assert world.status()["phase"] == "Pending"
    world.coordinator_reports(rounds=2, accuracy=0.75)
    world.tick()
    status = world.status()
    assert (status["phase"], status["round"], status["accuracy"]) == ("Running", 2, 0.75)
    assert status["lastRound"]["round"] == 2
    assert status["model"]["key"] == KEY and "pw" not in status["model"]["store"]
    assert world.condition(READY)["status"] == "True"


def test_an_idle_job_costs_no_status_writes(world: World) -> None:
    world.call(on_create)
    world.coordinator_reports(rounds=2)
    world.tick()
    assert world.tick() == {}


def test_success_removes_the_actors_and_says_where_the_model_is(world: World) -> None:
    world.call(on_create)
    world.coordinator_reports(
        rounds=5, accuracy=0.9, phase="Succeeded", reason="rounds", completion_time=T0.timestamp()
    )
    world.tick()
    assert set(world.kube.objects) == PLAN
    status = world.status()
    assert status["phase"] == "Succeeded" and status["completionTime"] == "2025-03-01T12:00:00Z"
    assert world.condition("Complete")["status"] == "True"
    kind, reason, message = world.events.events[-1]
    assert (kind, reason) == ("Normal", Reason.SUCCEEDED)
    assert (
        "fedfleet fetch-model --store redis://10.0.0.12:6379/0 --store-secret "
        "team-a/mnist-secret --job team-a/mnist" in message
    )
    world.store.down = True  # a finished job's status no longer reads the store
    assert world.tick() == {}


def test_unreachable_store_is_a_condition_not_an_error(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.call(on_create)
    world.coordinator_reports(rounds=2)
    world.tick()
    before = world.status()
    world.store.down = True
    with caplog.at_level(logging.WARNING, logger="test.operator"):
        world.tick()
        world.tick()
    ready = world.condition(READY)
    assert (ready["status"], ready["reason"]) == ("False", Reason.STORE_UNAVAILABLE)
    after = world.status()
    assert {k: v for k, v in after.items() if k != "conditions"} == {
        k: v for k, v in before.items() if k != "conditions"
    }
    assert len([r for r in caplog.records if "cannot read progress" in r.message]) == 1
    world.store.down = False
    world.tick()
    assert world.condition(READY)["reason"] == Reason.RUNNING


# -- completion is level-triggered (the status that stayed Running) ----------------------------


def _complete_in_store(world: World, rounds: int = 5) -> None:
    world.coordinator_reports(
        rounds=rounds,
        accuracy=0.9,
        phase="Succeeded",
        reason="rounds",
        completion_time=world.now[0].timestamp(),
    )


def test_a_status_write_that_fails_at_completion_is_retried_not_lost(world: World) -> None:
    # The cluster run's race: the Event went out, the status write did not. A write that
    # fails now fails the handler (kopf retries it after one interval) and nothing is
    # announced before the status says so.
    world.call(on_create)
    world.coordinator_reports(rounds=4)
    world.tick()
    _complete_in_store(world)
    world.kube.status_api_down = True
    with pytest.raises(kopf.TemporaryError) as caught:
        world.tick()
    assert caught.value.delay == world.memo[MEMO_KEY].settings.status_interval
    assert world.status()["phase"] == "Running"
    assert Reason.SUCCEEDED not in world.events.reasons()
    world.kube.status_api_down = False
    written = world.tick()
    assert written["phase"] == "Succeeded"
    assert world.events.reasons().count(Reason.SUCCEEDED) == 1
    assert set(world.kube.objects) == PLAN
    world.tick()
    assert world.events.reasons().count(Reason.SUCCEEDED) == 1


def test_a_slow_timer_with_an_outdated_view_writes_nothing(world: World) -> None:
    # kopf handed the timer the object as it was before the job finished; meanwhile a
    # restarted operator's resume handler found the job finished and said so. The slow
    # timer's write is refused (the object moved on), so whatever it computed from its old
    # view cannot land, and the job is announced once.
    world.call(on_create)
    world.coordinator_reports(rounds=4)
    world.tick()
    stale = world.body()
    _complete_in_store(world)
    world.call(on_resume)  # the replacement operator starts
    assert world.status()["phase"] == "Succeeded"
    with pytest.raises(kopf.TemporaryError, match="409"):
        world.tick(body=stale)
    assert world.status()["phase"] == "Succeeded"
    assert world.events.reasons().count(Reason.SUCCEEDED) == 1
    assert world.tick() == {}  # the next run, on the fresh object, has nothing to fix


def test_an_operator_restart_brings_a_finished_job_to_the_stores_truth(world: World) -> None:
    # The old operator died between the job's completion and its status write (or its timer
    # was gone): the replacement's resume handler, not only its timer, settles the job.
    world.call(on_create)
    world.coordinator_reports(rounds=3)
    world.tick()
    _complete_in_store(world)
    world.call(on_resume)
    status = world.status()
    assert (status["phase"], status["round"]) == ("Succeeded", 5)
    assert world.condition("Complete")["reason"] == Reason.ROUNDS_COMPLETED
    assert status["conditions"][-1]["type"] == "Complete"
    assert set(world.kube.objects) == PLAN  # no actors recreated for a finished job
    assert world.events.reasons().count(Reason.SUCCEEDED) == 1


def test_any_spec_change_brings_a_finished_job_to_the_stores_truth(world: World) -> None:
    world.call(on_create)
    world.coordinator_reports(rounds=3)
    world.tick()
    _complete_in_store(world)
    world.update(actors={"selectors": 3})
    assert world.status()["phase"] == "Succeeded"
    assert set(world.kube.objects) == PLAN


def test_a_job_failed_on_commits_keeps_its_actors_and_says_why(world: World) -> None:
    world.call(on_create)
    world.coordinator_reports(rounds=2, phase="Failed", reason="commit-failures")
    world.tick()
    assert world.status()["phase"] == "Failed"
    failed = world.condition("Failed")
    assert (failed["status"], failed["reason"]) == ("True", Reason.COMMIT_FAILURES)
    assert world.status()["conditions"][-1]["type"] == "Failed"
    assert set(world.kube.objects) == PLAN | ACTORS  # their logs explain the failure
    assert world.events.events[-1][:2] == ("Warning", Reason.COMMIT_FAILURES)


# -- suspend / resume reasons, activeDeadlineSeconds, ttlSecondsAfterFinished ---------------------


def _active_since(world: World) -> str | None:
    env = world.kube.objects[("Deployment", "mnist-coordinator")]["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    return next((e["value"] for e in env if e["name"] == "FEDFLEET_ACTIVE_SINCE"), None)


def test_suspended_and_resumed_are_the_reasons(world: World) -> None:
    world.call(on_create)
    assert world.condition("Suspended")["reason"] == Reason.NOT_SUSPENDED
    world.update(suspend=True)
    assert world.condition("Suspended")["reason"] == Reason.SUSPENDED
    assert world.status()["conditions"][-1]["type"] == "Suspended"
    world.update(suspend=False)
    resumed = world.condition("Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", Reason.RESUMED)
    world.coordinator_reports(rounds=1)
    world.tick()
    assert world.condition("Suspended")["reason"] == Reason.RESUMED  # and it stays so


def test_the_deadline_clock_starts_at_creation_and_restarts_on_resume(world: World) -> None:
    world.raw["spec"]["activeDeadlineSeconds"] = 600
    world.call(on_create)
    assert world.status()["startTime"] == "2025-03-01T12:00:00Z"
    assert _active_since(world) == str(int(T0.timestamp()))
    world.now[0] += timedelta(minutes=5)
    world.update(suspend=True)
    assert world.status()["startTime"] == "2025-03-01T12:00:00Z"
    world.now[0] += timedelta(minutes=15)  # suspended past the deadline: its clock is stopped
    world.tick(minutes=0)
    assert world.store.job_state(KEY) == {}  # nothing ended
    world.update(suspend=False)
    assert world.status()["startTime"] == "2025-03-01T12:20:00Z"
    assert _active_since(world) == str(int((T0 + timedelta(minutes=20)).timestamp()))
    world.call(on_resume)  # an operator restart keeps the clock where it is
    assert world.status()["startTime"] == "2025-03-01T12:20:00Z"


def test_the_operator_ends_a_job_past_its_deadline_when_no_coordinator_runs(
    world: World,
) -> None:
    world.raw["spec"]["activeDeadlineSeconds"] = 60
    world.call(on_create)
    world.tick(minutes=0.5)
    assert world.store.job_state(KEY) == {}
    world.tick(minutes=1)  # past it, and no coordinator ever took the job
    state = world.store.job_state(KEY)
    assert (state["phase"], state["reason"]) == ("Failed", "deadline-exceeded")
    status = world.status()
    assert status["phase"] == "Failed" and "completionTime" in status
    failed = world.condition("Failed")
    assert (failed["status"], failed["reason"]) == ("True", Reason.DEADLINE_EXCEEDED)
    assert status["conditions"][-1]["reason"] == Reason.DEADLINE_EXCEEDED  # the State column
    assert set(world.kube.objects) == PLAN  # a deadline also releases the actors
    assert world.events.events[-1][:2] == ("Warning", Reason.DEADLINE_EXCEEDED)


def test_a_running_coordinator_keeps_its_deadline_to_itself(world: World) -> None:
    world.raw["spec"]["activeDeadlineSeconds"] = 60
    world.call(on_create)
    token = world.store.acquire_lease(KEY, "coordinator-0", 600)
    assert token is not None
    world.store.put_job_state(KEY, token, {"phase": "Running", "round": 1, "model_version": 0})
    world.tick(minutes=2)
    assert world.store.job_state(KEY)["phase"] == "Running"  # the lease holder decides
    assert world.store.lease(KEY) is not None and world.store.lease(KEY).holder == "coordinator-0"


def test_ttl_removes_the_children_then_the_job_and_keeps_the_model(world: World) -> None:
    world.raw["spec"]["ttlSecondsAfterFinished"] = 120
    world.call(on_create)
    _complete_in_store(world)
    world.tick()
    assert world.status()["phase"] == "Succeeded" and set(world.kube.objects) == PLAN
    world.tick(minutes=1)
    assert not world.kube.fljob_deleted
    world.tick(minutes=1.5)
    assert world.kube.objects == {} and world.kube.fljob_deleted
    assert world.events.events[-1][1] == Reason.TTL_EXPIRED
    world.call(on_delete, retry=0)  # the finalizer of the job the TTL removed
    assert world.store.checkpoint(KEY) is not None  # the model stays in the store


def test_a_new_job_of_a_ttl_removed_name_waits_until_the_old_record_is_gone(
    world: World,
) -> None:
    _complete_in_store(world)  # an earlier "mnist", removed by its TTL, left its keys
    world.now[0] += timedelta(hours=1)
    world.raw["metadata"]["creationTimestamp"] = rfc3339(world.now[0])
    with pytest.raises(kopf.PermanentError, match="earlier job named team-a/mnist"):
        world.call(on_create)
    assert world.kube.objects == {}  # nothing started against someone else's record
    assert world.status()["phase"] == "Pending"
    assert "fedfleet fetch-model" in world.condition(INVALID)["message"]
    assert world.tick() == {}  # the timer does not take the old record for this job's
    world.call(on_delete, retry=0)  # deleting this FLJob removes the old record
    assert world.store.job_state(KEY) == {}
    world.raw.pop("status")
    world.call(on_create)
    assert set(world.kube.objects) == PLAN | ACTORS


def test_deleting_a_finished_job_before_its_ttl_cleans_the_store(world: World) -> None:
    world.raw["spec"]["ttlSecondsAfterFinished"] = 3600
    world.call(on_create)
    _complete_in_store(world)
    world.tick()
    world.call(on_delete, retry=0)
    assert world.store.checkpoint(KEY) is None


# -- delete ---------------------------------------------------------------------------------------


def test_delete_removes_the_job_from_the_store(world: World) -> None:
    world.call(on_create)
    world.coordinator_reports(rounds=2)
    world.call(on_delete, retry=0)
    assert world.store.job_state(KEY) == {} and world.store.checkpoint(KEY) is None


def test_delete_retries_a_dead_store_then_lets_go(world: World) -> None:
    world.coordinator_reports(rounds=1)
    world.store.down = True
    for retry in (0, 1):
        with pytest.raises(kopf.TemporaryError) as caught:
            world.call(on_delete, retry=retry)
        assert caught.value.delay == 10.0
    world.call(on_delete, retry=2)  # the third of cleanup_attempts=3: give up, no exception
    kind, reason, message = world.events.events[-1]
    assert (kind, reason) == ("Warning", Reason.CLEANUP_SKIPPED)
    assert KEY in message


def test_delete_with_job_on_a_pvc_keeps_the_models_and_warns_where_they_are(world: World) -> None:
    world.raw["spec"]["checkpoints"] = {
        "deleteWithJob": True,
        "storage": {"kind": "filesystem", "path": "/models", "claimName": "team-models"},
    }
    world.call(on_create)
    world.coordinator_reports(rounds=1)
    world.call(on_delete, retry=0)
    assert world.store.job_state(KEY) == {}  # the record goes
    kind, reason, message = world.events.events[-1]
    assert (kind, reason) == ("Warning", Reason.MODELS_KEPT)
    assert "/models on PVC team-models" in message


# -- startup --------------------------------------------------------------------------------------


def test_handlers_register_in_a_registry_of_their_own() -> None:
    settings = OperatorSettings(store_url="redis://r/0", status_interval=2.0)
    register_all(kopf.OperatorRegistry(), settings)  # decorators accept every option we pass


def test_kopf_settings_follow_the_contract(world: World) -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(
        settings, OperatorSettings(store_url="redis://r/0", peering="fleet", pod_name="p")
    )
    assert settings.persistence.finalizer == "fedfleet.dev/cleanup"
    progress = settings.persistence.progress_storage
    diffbase = settings.persistence.diffbase_storage
    assert isinstance(progress, kopf.AnnotationsProgressStorage)
    assert isinstance(diffbase, kopf.AnnotationsDiffBaseStorage)
    assert progress.prefix == "fedfleet.dev" and diffbase.prefix == "fedfleet.dev"
    assert diffbase.key == "last-handled-configuration"
    assert settings.posting.enabled and settings.posting.reporting_component == "fedfleet-operator"
    assert (settings.peering.name, settings.peering.clusterwide) == ("fleet", True)
    assert settings.peering.priority >= 1


def test_probe_reports_the_store_without_failing(world: World) -> None:
    assert probe_store(memo=world.memo) == "ok"
    world.store.down = True
    assert probe_store(memo=world.memo).startswith("unavailable")


def test_liveness_binds_the_pod_ip_when_known() -> None:
    assert default_liveness({}) == "http://0.0.0.0:8080/healthz"
    assert default_liveness({"POD_IP": "127.0.0.7"}) == "http://127.0.0.7:8080/healthz"
    assert default_liveness({"POD_IP": "fd00::7"}) == "http://[fd00::7]:8080/healthz"


def test_successful_status_timer_runs_are_not_logged() -> None:
    quiet = QuietStatusTimer()

    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    assert not quiet.filter(record(logging.INFO, "Timer 'status' succeeded."))
    assert quiet.filter(record(logging.ERROR, "Timer 'status' failed with an exception."))
    assert quiet.filter(record(logging.INFO, "Creation is processed: 1 succeeded; 0 failed."))


# -- the aggregator pool ------------------------------------------------------------------------


def test_the_timer_sizes_the_pool_of_a_running_job_and_writes_only_decisions(world: World) -> None:
    world.call(on_create)
    assert world.kube.replicas("aggregator") == 3  # 1,300 devices / 500
    world.coordinator_reports(rounds=1)
    for i in range(3):  # three aggregators registered, each with a 4 MB update to fold
        world.store.register(KEY, "aggregator", f"agg-{i}", f"http://10.0.0.{i}:8080", 60)
        world.store.put_actor_load(KEY, f"agg-{i}", {"update_bytes": 4_000_000})
    first = world.tick()
    pool = first["aggregators"]
    # 1,300 x 4 MB over a 60 s round is 87 MB/s: three at 32 MiB/s each
    assert (pool["replicas"], pool["desired"], pool["current"]) == (3, 3, 3)
    assert "aggregators" not in world.tick()  # nothing decided: no write for the pool
    world.store.put_actor_load(KEY, "agg-0", {"update_bytes": 4_000_000, "bytes_per_second": 4e8})
    grown = world.tick()["aggregators"]  # measured 400 MB/s: scale up at once
    assert grown["replicas"] == world.kube.replicas("aggregator") == 12
    assert "AggregatorsScaledUp" in world.events.reasons()
