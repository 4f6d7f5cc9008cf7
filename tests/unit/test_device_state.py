"""Unit tests of a real device's state directory: permissions, atomic JSON, identity checks,
the schedule and reported rounds, and the lock that keeps a second process out."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedfleet.device.state import (
    REPORTED_KEPT,
    Identity,
    StateDir,
    StateError,
    StateLocked,
    atomic_write_json,
)

pytestmark = pytest.mark.unit


def _identity(**changes: object) -> Identity:
    raw: dict[str, object] = {
        "server": "http://127.0.0.1:8080",
        "population": "pop",
        "device_id": "d-" + "a" * 24,
        "credential": "v1.payload.sig",
        "issued_at": 1000.0,
        "expires_at": 2000.0,
        "renew_after": 1500.0,
    }
    raw.update(changes)
    return Identity.from_dict(raw)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_directory_is_private_even_if_it_existed_open(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    StateDir(d)
    assert _mode(d) == 0o700


def test_identity_round_trip_is_0600_and_public_view_hides_the_credential(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    assert state.load_identity() is None
    ident = _identity()
    state.save_identity(ident)
    assert _mode(state.identity_path) == 0o600
    assert state.load_identity() == ident
    public = ident.public()
    assert "credential" not in public
    assert ident.credential not in json.dumps(public)
    state.clear_identity()
    assert state.load_identity() is None


@pytest.mark.parametrize(
    "change",
    [
        {"device_id": "../../etc/passwd"},
        {"device_id": 7},
        {"credential": "x" * 513},
        {"credential": ""},
        {"expires_at": "soon"},
        {"issued_at": float("nan")},
    ],
)
def test_malformed_identity_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(StateError):
        _identity(**change)


def test_corrupt_identity_file_is_a_clear_error(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.identity_path.write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        state.load_identity()
    state.identity_path.write_text("[1, 2]")
    with pytest.raises(StateError, match="JSON object"):
        state.load_identity()


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": [1, 2, 3]})
    assert json.loads(path.read_text()) == {"b": [1, 2, 3]}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert _mode(path) == 0o600


def test_schedule_and_reported_rounds_persist_bounded(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.load_next_checkin() == 0.0
    assert state.load_reported() == []
    keys = [f"job/r{i}" for i in range(REPORTED_KEPT + 10)]
    state.save_schedule(1234.5, keys)
    again = StateDir(tmp_path)
    assert again.load_next_checkin() == 1234.5
    assert again.load_reported() == keys[-REPORTED_KEPT:]


def test_data_files_are_remembered_by_hash(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.loaded_data() == {}
    state.record_data("ab" * 32, {"path": "a.npz", "added": 5})
    state.record_data("cd" * 32, {"path": "b.npz", "added": 7})
    assert set(StateDir(tmp_path).loaded_data()) == {"ab" * 32, "cd" * 32}


def test_second_holder_of_the_lock_is_refused_and_can_take_it_after_release(
    tmp_path: Path,
) -> None:
    first, second = StateDir(tmp_path), StateDir(tmp_path)
    first.lock()
    with pytest.raises(StateLocked, match="in use by another"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_lock_excludes_another_process_and_dies_with_it(tmp_path: Path) -> None:
    code = (
        "import sys, time; from fedfleet.device.state import StateDir; "
        "StateDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(StateLocked):
            StateDir(tmp_path).lock()
    finally:
        proc.kill()
        proc.wait()
    StateDir(tmp_path).lock()  # the kernel released the dead process's lock
