"""Unit tests of ``fedfleet device``: data files loaded once per content, add-examples, status
without the credential, the state lock, and clear errors for bad input (no network needed: a
device that is not enrolled and has no token stops before its first request)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedfleet.cli import main
from fedfleet.device.state import Identity, StateDir

pytestmark = pytest.mark.unit

NOWHERE = "http://127.0.0.1:9"


def _npz(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((n, 64)).astype(np.float32), y=rng.integers(0, 10, n))
    return path


def _run(state: Path, data: Path, *extra: str) -> int:
    return main(
        [
            *("device", "run", "--server", NOWHERE, "--population", "p"),
            *("--state", str(state), "--data", str(data), *extra),
        ]
    )


def _examples(state: Path, capsys: pytest.CaptureFixture[str]) -> int:
    capsys.readouterr()
    assert main(["device", "status", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("examples: "))
    return int(line.split(": ")[1])


def test_data_is_loaded_once_per_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, data = tmp_path / "state", _npz(tmp_path / "d.npz", 30)
    # Not enrolled and no token: a usage error, after the data was loaded.
    assert _run(state, data) == 2
    assert "--enroll-token" in capsys.readouterr().err
    assert _examples(state, capsys) == 30
    assert _run(state, data) == 2
    assert _examples(state, capsys) == 30  # same content: not added again
    _npz(data, 12, seed=1)
    assert _run(state, data) == 2
    assert _examples(state, capsys) == 42  # a changed file adds its examples
    assert main(["device", "add-examples", "--state", str(state), "--data", str(data)]) == 0
    assert _examples(state, capsys) == 54


def test_status_shows_identity_but_never_the_credential(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = StateDir(tmp_path / "s")
    secret = "v1.eyJzdWIiOiJkLTEifQ.c2VjcmV0LXNpZ25hdHVyZQ"
    state.save_identity(Identity(NOWHERE, "p", "d-" + "1" * 24, secret, 1e9, 2e9, 1.5e9))
    state.save_schedule(1.7e9, ["r1"])
    assert main(["device", "status", "--state", str(state.path)]) == 0
    out = capsys.readouterr().out
    assert "device_id: d-" + "1" * 24 in out
    assert "expires_at: 2033-05-18" in out
    assert "next_checkin: 2023-11-14" in out
    assert "reported_rounds: 1" in out
    assert secret not in out and "c2VjcmV0" not in out


def test_a_second_process_on_the_state_dir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = StateDir(tmp_path / "s")
    holder.lock()
    try:
        assert _run(holder.path, _npz(tmp_path / "d.npz", 3)) == 2
        assert "in use by another" in capsys.readouterr().err
    finally:
        holder.unlock()


def test_state_of_another_population_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = StateDir(tmp_path / "s")
    state.save_identity(Identity(NOWHERE, "other", "d-" + "2" * 24, "v1.a.b", 1e9, 2e9, 1.5e9))
    assert _run(state.path, _npz(tmp_path / "d.npz", 3)) == 2
    assert "belongs to population 'other'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["garbage", "pickle", "mismatch", "conditions"])
def test_bad_input_is_a_clear_error_and_adds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    state = tmp_path / "s"
    data = _npz(tmp_path / "ok.npz", 5)
    extra: list[str] = []
    if kind == "garbage":
        data = tmp_path / "bad.npz"
        data.write_bytes(b"not a zip")
    elif kind == "pickle":
        data = tmp_path / "obj.npz"
        np.savez(data, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    elif kind == "mismatch":
        data = tmp_path / "short.npz"
        np.savez(data, x=np.zeros((3, 64)), y=np.zeros(2, np.int64))
    else:
        bad = tmp_path / "c.json"
        bad.write_text(json.dumps({"charging": "yes"}))
        extra = ["--conditions", str(bad)]
    assert _run(state, data, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not state.exists() or _examples(state, capsys) == 0


def test_status_of_a_missing_state_dir_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["device", "status", "--state", str(tmp_path / "nope")]) == 2
    assert "no state directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
