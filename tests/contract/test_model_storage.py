"""Model history on every storage backend: Redis, a directory, and a real S3 server (versitygw).

One contract for the three backends of :mod:`fedfleet.store.history` (each test runs on each),
with the job's store a real Redis: objects round-trip, a history of N is kept with the best,
``fedfleet fetch-model`` gets a chosen version and the best one back as safetensors, and a
failed write leaves the previous committed version intact.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.core.checkpoint import pack_checkpoint
from fedfleet.core.model_history import CheckpointsSpec, StorageKind
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.history import (
    ModelMissing,
    ModelStorage,
    ModelStorageError,
    checkpoint_bytes,
    commit_model,
    read_index,
)
from fedfleet.store.history.base import version_of
from fedfleet.store.history.files import FileModels
from fedfleet.store.history.redis_models import models_in_store
from fedfleet.store.redis import RedisStore
from fedfleet.tasks.weights_file import load_weights
from fedfleet_operator.handlers.delete import delete_stored_job
from tests.redis_server import RedisServer
from tests.s3_server import S3Server

pytestmark = pytest.mark.contract

JOB = "team-a/digits"


@dataclass
class Backend:
    kind: StorageKind
    store: Store
    models: ModelStorage
    storage_url: str | None
    """What ``fetch-model --storage`` takes for it (None: models live in the store)."""
    s3: S3Server | None = None


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(params=[StorageKind.redis, StorageKind.filesystem, StorageKind.s3])
def backend(
    request: pytest.FixtureRequest,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Backend]:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    kind: StorageKind = request.param
    # every test has its own job folder, so runs against one server stay apart
    if kind is StorageKind.redis:
        result = Backend(kind, store, models_in_store(store), None)
    elif kind is StorageKind.filesystem:
        root = tmp_path / "models"
        result = Backend(kind, store, FileModels(root), f"file://{root}")
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        prefix = f"t{secrets.token_hex(4)}"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.credentials[0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.credentials[1])
        url = f"s3://{server.bucket}/{prefix}?endpoint={server.endpoint}"
        result = Backend(kind, store, server.models(prefix=prefix), url, server)
    yield result
    if kind is StorageKind.redis:
        result.models.delete_job(JOB)
    result.models.close()
    store.close()


def _model(version: int) -> bytes:
    """A real checkpoint (two named arrays and optimizer state), distinct per version."""
    w = [np.full((3, 2), version, np.float32), np.arange(2, dtype=np.float32) * version]
    return pack_checkpoint(w, {"m": np.zeros(2, np.float32)})


def _token(store: Store) -> int:
    """The master's fencing token: a new lease, or the one this test already holds."""
    token = store.acquire_lease(JOB, "master", 60)
    if token is None:
        lease = store.lease(JOB)
        assert lease is not None
        token = lease.token
    return token


def _commit_all(b: Backend, policy: CheckpointsSpec, values: list[float], metric: str) -> None:
    token = _token(b.store)
    for i, value in enumerate(values):
        version = commit_model(
            b.store, b.models, policy, JOB, token, i, i + 1, _model(i + 1), {metric: value}
        )
        assert version == i + 1


def _stored_versions(models: ModelStorage) -> list[int]:
    return sorted(v for n in models.names(JOB) if (v := version_of(n)) is not None)


def test_objects_round_trip(backend: Backend) -> None:
    m = backend.models
    m.put(JOB, "v00000001-0123456789abcdef.ckpt", b"one")
    m.put(JOB, "v00000002-0123456789abcdef.ckpt", b"\x00" * 100_000)
    assert m.get(JOB, "v00000001-0123456789abcdef.ckpt") == b"one"
    assert len(m.get(JOB, "v00000002-0123456789abcdef.ckpt")) == 100_000
    assert m.names(JOB) == ["v00000001-0123456789abcdef.ckpt", "v00000002-0123456789abcdef.ckpt"]
    assert m.names("team-a/other") == []
    m.delete(JOB, "v00000001-0123456789abcdef.ckpt")
    with pytest.raises(ModelMissing):
        m.get(JOB, "v00000001-0123456789abcdef.ckpt")
    assert m.delete_job(JOB) == 1
    assert m.names(JOB) == []


@pytest.mark.parametrize("name", ["../../etc/passwd", "v1.ckpt", "index.json/../x"])
def test_names_that_are_not_model_objects_are_refused(backend: Backend, name: str) -> None:
    with pytest.raises(ValueError):
        backend.models.put(JOB, name, b"x")
    with pytest.raises(ValueError):
        backend.models.get("../team-a", "index.json")


def test_a_history_of_n_keeps_the_newest_and_the_best(backend: Backend) -> None:
    policy = CheckpointsSpec(keep=3, keep_best=True, metric="accuracy")
    accuracies = [0.50, 0.91, 0.60, 0.70, 0.65, 0.62, 0.61, 0.60]
    _commit_all(backend, policy, accuracies, "accuracy")

    assert _stored_versions(backend.models) == [2, 6, 7, 8]  # best (0.91) + the newest three
    index = read_index(backend.models, JOB)
    assert index is not None
    assert index["best"]["version"] == 2 and index["best"]["value"] == pytest.approx(0.91)
    assert [e["version"] for e in index["models"]] == [2, 6, 7, 8]
    assert index["latest"] == 8
    checkpoint = backend.store.checkpoint(JOB)
    assert checkpoint is not None and checkpoint.version == 8
    if backend.kind is not StorageKind.redis:
        assert len(checkpoint.data) < 1000  # the store holds a reference, not the model
    assert checkpoint_bytes(backend.store, checkpoint) == _model(8)
    for entry in index["models"]:
        assert backend.models.get(JOB, entry["object"]) == _model(entry["version"])


def test_loss_ranks_lower_is_better_and_keep_best_off_keeps_only_the_newest(
    backend: Backend,
) -> None:
    _commit_all(backend, CheckpointsSpec(keep=2, metric="loss"), [0.9, 0.2, 0.5, 0.4], "loss")
    assert _stored_versions(backend.models) == [2, 3, 4]
    index = read_index(backend.models, JOB)
    assert index is not None and index["best"]["version"] == 2 and not index["higherIsBetter"]

    policy = CheckpointsSpec(keep=2, keep_best=False, metric="loss")
    token = _token(backend.store)
    commit_model(backend.store, backend.models, policy, JOB, token, 4, 5, _model(5), {"loss": 0.9})
    assert _stored_versions(backend.models) == [4, 5]


def test_fetch_model_gets_a_chosen_version_and_the_best_as_safetensors(
    backend: Backend, redis_url: str, tmp_path: Path
) -> None:
    _commit_all(backend, CheckpointsSpec(keep=2), [0.3, 0.8, 0.4, 0.5], "accuracy")
    # The job's record is under the test's key prefix, which fetch-model does not read: it
    # finds the models in Redis (kept apart from the record) or, with --storage, in their
    # directory or bucket, as it does once the FLJob is gone.
    out = tmp_path / "out"
    out.mkdir()

    def fetch(version: str, *extra: str) -> dict[str, np.ndarray]:
        path = out / f"{version}-{len(extra)}.safetensors"
        argv = ["fetch-model", "--job", JOB, "--version", version, "-o", str(path), *extra]
        assert main(argv) == 0
        return load_weights(path)

    sources: list[tuple[str, ...]] = []
    if backend.storage_url is not None:
        sources.append(("--storage", backend.storage_url))
    if backend.kind is StorageKind.redis:
        sources.append(("--store", redis_url))
    for source in sources:
        best = fetch("best", *source)
        assert np.all(best["w.0"] == 2)  # version 2 had the best accuracy
        chosen = fetch("4", *source)
        assert np.all(chosen["w.0"] == 4) and chosen["w.1"][1] == 4
        latest = fetch("latest", *source)
        assert np.all(latest["w.0"] == 4)
        raw = out / "raw.bin"
        assert main(["fetch-model", "--job", JOB, "--version", "1", "-o", str(raw), *source]) == 1
        assert not raw.exists()  # version 1 was pruned: a clear error, nothing written


def test_a_failed_write_leaves_the_previous_version_committed(
    backend: Backend, redis_server: RedisServer
) -> None:
    policy = CheckpointsSpec(keep=2)
    _commit_all(backend, policy, [0.4, 0.5], "accuracy")
    token = _token(backend.store)

    if backend.kind is StorageKind.redis:
        redis_server.stop()  # the models' Redis (here also the store) is down
        try:
            with pytest.raises(StoreUnavailable):
                commit_model(backend.store, backend.models, policy, JOB, token, 2, 3, _model(3), {})
        finally:
            redis_server.start()
    elif backend.kind is StorageKind.filesystem:
        assert isinstance(backend.models, FileModels)
        folder = backend.models.root / JOB
        aside = folder.with_name("aside")
        folder.rename(aside)
        folder.write_bytes(b"not a directory")  # the job's folder cannot take the write
        with pytest.raises(ModelStorageError):
            commit_model(backend.store, backend.models, policy, JOB, token, 2, 3, _model(3), {})
        folder.unlink()
        aside.rename(folder)
    else:
        assert backend.s3 is not None
        backend.s3.stop()  # the S3 server is down: the PUT cannot complete
        try:
            with pytest.raises(ModelStorageError):
                commit_model(backend.store, backend.models, policy, JOB, token, 2, 3, _model(3), {})
        finally:
            backend.s3.start()

    checkpoint = backend.store.checkpoint(JOB)
    assert checkpoint is not None and checkpoint.version == 2
    assert backend.store.model_version(JOB) == 2
    assert len(backend.store.metrics(JOB)) == 2
    assert checkpoint_bytes(backend.store, checkpoint) == _model(2)
    # and the job goes on from there
    commit_model(backend.store, backend.models, policy, JOB, token, 2, 3, _model(3), {})
    assert _stored_versions(backend.models) == [2, 3]


def test_models_outlive_the_jobs_record_and_a_new_job_of_the_same_name(backend: Backend) -> None:
    policy = CheckpointsSpec(keep=2)
    _commit_all(backend, policy, [0.4, 0.9, 0.5], "accuracy")
    old = set(backend.models.names(JOB))
    backend.store.delete_job(JOB)  # what deleting the FLJob does without deleteWithJob
    assert set(backend.models.names(JOB)) == old

    _commit_all(backend, policy, [0.1, 0.2, 0.3], "accuracy")  # a new job, same name
    names = set(backend.models.names(JOB))
    assert old - {"index.json"} <= names  # none of the earlier job's models was pruned
    archived = [n for n in names if n.startswith("index-")]
    assert len(archived) == 1
    earlier = json.loads(backend.models.get(JOB, archived[0]))
    assert earlier["best"]["version"] == 2
    index = read_index(backend.models, JOB)
    assert index is not None and [e["version"] for e in index["models"]] == [2, 3]
    assert index["best"]["value"] == pytest.approx(0.3)
    assert backend.models.get(JOB, index["best"]["object"]) == _model(3)


def test_delete_job_removes_every_model(backend: Backend) -> None:
    _commit_all(backend, CheckpointsSpec(keep=3), [0.1, 0.2], "accuracy")
    assert backend.models.delete_job(JOB) == 3  # two models and the index
    assert backend.models.names(JOB) == []
    if backend.kind is StorageKind.filesystem:
        assert isinstance(backend.models, FileModels)
        assert not (backend.models.root / JOB).exists()
        shutil.rmtree(backend.models.root)


def test_the_operator_deletes_s3_models_with_the_credentials_secret_of_the_job(
    s3_server: S3Server, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator's own environment holds no S3 credentials: deleteWithJob reads the Secret
    # the job names (the actors get the same Secret as environment variables).
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    prefix = f"t{secrets.token_hex(4)}"
    storage = {
        "kind": "s3",
        "bucket": s3_server.bucket,
        "prefix": prefix,
        "endpoint": s3_server.endpoint,
        "credentialsSecret": "s3-creds",
    }
    spec = {"checkpoints": {"keep": 2, "deleteWithJob": True, "storage": storage}}
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    models = s3_server.models(prefix=prefix)
    try:
        backend = Backend(StorageKind.s3, store, models, None, s3_server)
        _commit_all(
            backend, CheckpointsSpec.model_validate(spec["checkpoints"]), [0.1, 0.2], "accuracy"
        )
        assert len(models.names(JOB)) == 3  # two models and the index
        key, secret, _ = s3_server.credentials
        secrets_of_ns = {"s3-creds": {"accessKeyId": key, "secretAccessKey": secret}}

        removed, removed_models = delete_stored_job(store, JOB, spec, secrets_of_ns.get)

        assert removed > 0 and removed_models == 3
        assert models.names(JOB) == [] and store.checkpoint(JOB) is None
    finally:
        models.close()
        store.close()
