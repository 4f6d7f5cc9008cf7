"""``spec.checkpoints``: which models are kept and which is best, and what the operator does
with it (the best model in the status, storage in the actors' pods, deletion with the job)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.core.checkpoint import pack_checkpoint
from fedfleet.core.model_history import (
    CHECKPOINT_FIELD,
    CheckpointsSpec,
    MetricMode,
    StorageKind,
    best_version,
    higher_is_better,
    kept_models,
)
from fedfleet.core.spec import ManifestError
from fedfleet.report import summary_rows
from fedfleet.results import JobResult
from fedfleet.store.history import ModelStorageError, commit_model
from fedfleet.store.history.files import FileModels
from fedfleet.store.history.redis_models import models_in_store
from fedfleet.store.memory import MemoryStore
from fedfleet_operator.handlers.delete import delete_stored_job, models_out_of_reach
from fedfleet_operator.naming import ChildRole
from fedfleet_operator.settings import OperatorSettings
from fedfleet_operator.status import model_location, status_from_store
from tests.unit.test_operator_builders import STORE, container, deployments, make_job

pytestmark = pytest.mark.unit

KEY = "team-a/mnist"
NOW = datetime(2025, 3, 1, 12, tzinfo=UTC)


def record(version: int, **metrics: Any) -> dict[str, Any]:
    name = f"v{version:08d}-{version:016x}.ckpt"
    return {"model_version": version, "round": version, CHECKPOINT_FIELD: name, **metrics}


# -- the policy -----------------------------------------------------------------------------------


def test_the_newest_n_and_the_best_are_kept() -> None:
    records = [record(v, accuracy=a) for v, a in enumerate([0.2, 0.9, 0.3, 0.4, 0.5], start=1)]
    kept, best = kept_models(records, CheckpointsSpec(keep=2))
    assert [m.version for m in kept] == [2, 4, 5]
    assert best is not None and best.version == 2 and best.value == 0.9
    kept, best = kept_models(records, CheckpointsSpec(keep=2, keep_best=False))
    assert [m.version for m in kept] == [4, 5] and best is None
    kept, _ = kept_models(records, CheckpointsSpec(keep=10))
    assert [m.version for m in kept] == [1, 2, 3, 4, 5]


def test_metric_direction() -> None:
    assert higher_is_better("accuracy") and higher_is_better("federated_accuracy")
    assert not higher_is_better("loss") and not higher_is_better("train_loss")
    assert not higher_is_better("rmse") and not higher_is_better("word_error_rate")
    assert higher_is_better("loss", MetricMode.max) and not higher_is_better("r2", MetricMode.min)
    records = [record(1, loss=0.5), record(2, loss=0.2), record(3, loss=0.3)]
    best = best_version(records, "loss")
    assert best is not None and best.version == 2
    best = best_version(records, "loss", MetricMode.max)
    assert best is not None and best.version == 1


def test_ties_go_to_the_newer_and_rounds_without_the_metric_are_never_best() -> None:
    records = [record(1, accuracy=0.8), record(2), record(3, accuracy=0.8), record(4)]
    best = best_version(records, "accuracy")
    assert best is not None and best.version == 3
    assert best_version([record(1), record(2)], "accuracy") is None
    # a record with a non-finite or non-numeric value does not rank
    assert (
        best_version([record(1, accuracy=float("nan")), record(2, accuracy="x")], "accuracy")
        is None
    )
    # records without a stored object (committed before histories) are not models to keep
    assert kept_models([{"model_version": 1, "accuracy": 0.9}], CheckpointsSpec()) == ([], None)


def test_the_spec_refuses_storage_fields_of_another_kind() -> None:
    job = make_job(checkpoints={"keep": 5, "storage": {"kind": "filesystem", "path": "/models"}})
    assert job.spec.checkpoints.storage.kind is StorageKind.filesystem
    assert make_job().spec.checkpoints == CheckpointsSpec()  # keep 1 + best, in Redis
    bad: list[dict[str, Any]] = [
        {"storage": {"kind": "filesystem"}},
        {"storage": {"kind": "s3"}},
        {"storage": {"kind": "s3", "bucket": "b", "path": "/x"}},
        {"storage": {"kind": "redis", "bucket": "models"}},
        {"storage": {"kind": "filesystem", "path": "relative/dir"}},
        {"keep": 0},
        {"metric": "a b"},
        {"storage": {"kind": "s3", "bucket": "b", "endpoint": "http://user:pw@host"}},
    ]
    for checkpoints in bad:
        with pytest.raises(ManifestError):
            make_job(checkpoints=checkpoints)


def test_the_summary_names_the_best_model() -> None:
    result = JobResult(
        job="t", model_version=5, best_model={"version": 2, "round": 2, "loss": 0.25}
    )
    assert dict(summary_rows(result))["Best model"] == "version 2 (round 2, loss 0.2500)"
    assert "Best model" not in dict(summary_rows(JobResult(job="t")))


# -- the operator ---------------------------------------------------------------------------------


def test_the_status_names_the_best_model_and_fetches_it_without_the_password() -> None:
    metrics = [record(1, accuracy=0.7), record(2, accuracy=0.9), record(3, accuracy=0.8)]
    location = model_location(KEY, STORE, 3, metrics, CheckpointsSpec(keep=1))
    assert location["best"] == {"version": 2, "round": 2, "metric": "accuracy", "value": 0.9}
    assert location["fetchBest"] == (
        "fedfleet fetch-model --store redis://10.0.0.12:6379/0 --store-secret "
        "team-a/mnist-secret --job team-a/mnist --version best -o best.safetensors"
    )
    assert "s3cret" not in repr(location)
    by_loss = model_location(KEY, STORE, 3, metrics, CheckpointsSpec(metric="missing"))
    assert "best" not in by_loss and "fetchBest" not in by_loss

    state = {"phase": "Running", "round": 3, "model_version": 3}
    status = status_from_store(state, metrics, key=KEY, store_url=STORE, generation=1, now=NOW)
    assert status["model"]["best"]["version"] == 2
    # between commits the operator reads no metrics: the best stays named
    again = status_from_store(
        state, [], key=KEY, store_url=STORE, generation=1, now=NOW, previous=dict(status)
    )
    assert again["model"]["best"]["version"] == 2


def test_filesystem_storage_mounts_the_claim_in_selectors_and_aggregators() -> None:
    job = make_job(
        checkpoints={"storage": {"kind": "filesystem", "path": "/models", "claimName": "models"}}
    )
    pods = deployments(job, OperatorSettings(store_url=STORE, pod_name="op-0"))
    for role, deployment in pods.items():
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        mounts = container(deployment)["volumeMounts"]
        has = {"name": "models", "persistentVolumeClaim": {"claimName": "models"}} in volumes
        assert has == (role is not ChildRole.coordinator)
        assert ({"name": "models", "mountPath": "/models"} in mounts) == has


def test_s3_credentials_come_from_the_named_secret_never_the_spec() -> None:
    job = make_job(
        checkpoints={"storage": {"kind": "s3", "bucket": "models", "credentialsSecret": "s3-creds"}}
    )
    pods = deployments(job, OperatorSettings(store_url=STORE, pod_name="op-0"))
    env = {e["name"]: e for e in container(pods[ChildRole.aggregator])["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "accessKeyId"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "secretAccessKey"}
    }
    coordinator = {e["name"] for e in container(pods[ChildRole.coordinator])["env"]}
    assert "AWS_ACCESS_KEY_ID" not in coordinator


@pytest.mark.parametrize("delete_with_job", [False, True])
def test_deleting_the_job_keeps_its_models_unless_delete_with_job(
    delete_with_job: bool,
) -> None:
    store = MemoryStore()
    spec = {"checkpoints": {"keep": 2, "deleteWithJob": delete_with_job}}  # Redis (default)
    policy = CheckpointsSpec.model_validate(spec["checkpoints"])
    models = models_in_store(store)
    token = store.acquire_lease(KEY, "master", 60)
    assert token is not None
    for v in range(3):
        data = pack_checkpoint([np.full(2, v, np.float32)], {})
        commit_model(store, models, policy, KEY, token, v, v + 1, data, {"accuracy": v / 10})
    before = models.names(KEY)
    assert len(before) == 3  # versions 2 and 3, and the index

    removed, removed_models = delete_stored_job(store, KEY, spec)

    assert removed > 0 and store.checkpoint(KEY) is None and store.metrics(KEY) == []
    if delete_with_job:
        assert removed_models == 3 and models.names(KEY) == []
    else:
        assert removed_models == 0 and models.names(KEY) == before
    assert models_out_of_reach(spec) is None


def test_models_on_a_filesystem_stay_and_say_why(tmp_path: Path) -> None:
    # A filesystem (a PVC) is mounted in the job's pods, never in the operator: deleteWithJob
    # cannot reach it, so the models stay and the reason names where they are.
    store = MemoryStore()
    models = FileModels(tmp_path)
    models.put(KEY, "index.json", b"{}")
    storage = {"kind": "filesystem", "path": str(tmp_path), "claimName": "models"}
    spec = {"checkpoints": {"deleteWithJob": True, "storage": storage}}
    assert delete_stored_job(store, KEY, spec) == (0, 0)
    assert models.names(KEY) == ["index.json"]
    reason = models_out_of_reach(spec)
    assert reason is not None and str(tmp_path) in reason and "PVC models" in reason
    assert models_out_of_reach({"checkpoints": {"storage": storage}}) is None  # kept anyway


@pytest.mark.parametrize(
    ("secret", "message"),
    [(None, "not found"), ({"accessKeyId": "k"}, "lacks accessKeyId or secretAccessKey")],
)
def test_s3_deletion_needs_the_credentials_secret(
    secret: dict[str, str] | None, message: str
) -> None:
    store = MemoryStore()
    storage = {
        "kind": "s3",
        "bucket": "models",
        "endpoint": "http://127.0.0.1:9",
        "credentialsSecret": "s3",
    }
    spec = {"checkpoints": {"deleteWithJob": True, "storage": storage}}
    asked: list[str] = []

    def read(name: str) -> dict[str, str] | None:
        asked.append(name)
        return secret

    with pytest.raises(ModelStorageError, match=message):
        delete_stored_job(store, KEY, spec, read)
    assert asked == ["s3"]


def test_a_spec_that_does_not_parse_keeps_the_models(tmp_path: Path) -> None:
    store = MemoryStore()
    models = FileModels(tmp_path)
    models.put(KEY, "index.json", b"{}")
    spec = {"checkpoints": {"deleteWithJob": "yes", "storage": {"kind": "filesystem"}}}
    assert delete_stored_job(store, KEY, spec) == (0, 0)
    assert models.names(KEY) == ["index.json"]


def test_memory_models_are_shared_through_the_actors_store_wrappers() -> None:
    # Each in-process actor reaches the one memory store through its own telemetry and events
    # wrappers; the models one commits must be the models another reads.
    from prometheus_client import CollectorRegistry

    from fedfleet.service.telemetry import timed_store
    from fedfleet.store.events import publishing
    from fedfleet.store.history.redis_models import models_in_store
    from fedfleet.store.memory import MemoryStore

    store = MemoryStore()
    aggregator_view = publishing(timed_store(store, CollectorRegistry()))
    selector_view = publishing(timed_store(store, CollectorRegistry()))
    assert models_in_store(aggregator_view) is models_in_store(selector_view)
    assert models_in_store(aggregator_view) is models_in_store(store)
    assert models_in_store(MemoryStore()) is not models_in_store(store)
