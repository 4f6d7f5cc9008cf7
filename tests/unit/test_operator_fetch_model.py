"""``fedfleet fetch-model``: the command an FLJob's ``.status.model.fetch`` prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedfleet import store_args
from fedfleet.cli import main
from fedfleet.core.checkpoint import pack_checkpoint
from fedfleet.store.base import Store, StoreUnavailable
from fedfleet.store.memory import MemoryStore
from fedfleet.tasks.weights_file import load_weights

pytestmark = pytest.mark.unit

KEY = "team-a/mnist"


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    seeded = MemoryStore()
    token = seeded.acquire_lease(KEY, "c", 60)
    assert token is not None
    seeded.commit_checkpoint(KEY, token, 0, 1, b"v1", {})
    seeded.commit_checkpoint(KEY, token, 1, 2, b"newest-model", {})

    def open_seeded(url: str) -> Store:
        assert url == "redis://10.0.0.12:6379/0"
        return seeded

    monkeypatch.setattr(store_args, "open_store", open_seeded)
    return seeded


def test_writes_the_newest_checkpoint(store: MemoryStore, tmp_path: Path) -> None:
    out = tmp_path / "model.bin"
    argv = ["fetch-model", "--store", "redis://10.0.0.12:6379/0", "--job", KEY, "-o", str(out)]
    assert main(argv) == 0
    assert out.read_bytes() == b"newest-model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # no temp file left


def test_a_job_without_a_model_is_an_error(
    store: MemoryStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.bin"
    argv = ["fetch-model", "--store", "redis://10.0.0.12:6379/0", "--job", "x/y", "-o", str(out)]
    assert main(argv) == 1
    assert "no model for job 'x/y'" in capsys.readouterr().err
    assert not out.exists()


def test_an_unreachable_store_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Down(MemoryStore):
        def checkpoint(self, job: str) -> None:
            raise StoreUnavailable("redis at 10.0.0.12:6379 is unavailable")

    monkeypatch.setattr(store_args, "open_store", lambda url: Down())
    argv = ["fetch-model", "--store", "redis://h/0", "--job", KEY, "-o", str(tmp_path / "m")]
    assert main(argv) == 1
    assert "unavailable" in capsys.readouterr().err


def test_the_store_url_is_required(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FEDFLEET_STORE_URL", raising=False)
    parser_default_free = ["fetch-model", "--job", KEY, "-o", str(tmp_path / "m")]
    assert main(parser_default_free) == 2
    assert "--store" in capsys.readouterr().err
    assert main(["fetch-model", "--store", "ftp://x", "--job", KEY, "-o", "m"]) == 2


def test_weights_alone_as_safetensors_named_by_the_manifests_task(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    weights = [np.full((64, 10), 0.25, np.float32), np.arange(10, dtype=np.float32)]
    seeded = MemoryStore()
    token = seeded.acquire_lease(KEY, "c", 60)
    assert token is not None
    seeded.commit_checkpoint(KEY, token, 0, 1, pack_checkpoint(weights, {"m": np.ones(2)}), {})
    monkeypatch.setattr(store_args, "open_store", lambda url: seeded)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "apiVersion: fedfleet.dev/v1alpha1\nkind: FLJob\nmetadata: {name: mnist}\n"
        "spec: {population: p, fleet: {devices: 10}}\n"
    )
    base = ["fetch-model", "--store", "redis://x:6379/0", "--job", KEY]
    named, plain = tmp_path / "m.safetensors", tmp_path / "m.npz"
    assert main([*base, "-o", str(named), "--manifest", str(manifest)]) == 0
    assert main([*base, "-o", str(plain)]) == 0
    got = load_weights(named)
    assert list(got) == ["dense_0.weight", "dense_0.bias"]  # the optimizer state is left out
    np.testing.assert_array_equal(got["dense_0.weight"], weights[0])
    assert list(load_weights(plain)) == ["w.0", "w.1"]
    np.testing.assert_array_equal(load_weights(plain)["w.1"], weights[1])
