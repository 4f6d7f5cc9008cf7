"""``fedfleet population token`` and the usage errors of ``fedfleet population revoke``."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from fedfleet.cli import main
from fedfleet.redis_server import free_port
from fedfleet.service import ops

pytestmark = pytest.mark.unit


def test_token_prints_the_enroll_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = bytes(range(32))
    path = tmp_path / "population-secret"
    path.write_text(secret.hex())
    assert main(["population", "token", "--secret-file", str(path)]) == 0
    expected = hmac.new(secret, b"fedfleet/population/enroll", hashlib.sha256).hexdigest()
    assert capsys.readouterr().out == expected + "\n"


def test_token_refuses_a_short_or_missing_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDFLEET_POPULATION_SECRET_FILE", raising=False)
    short = tmp_path / "short"
    short.write_text("abcd")
    assert main(["population", "token", "--secret-file", str(short)]) == 2
    assert "16 bytes" in capsys.readouterr().err
    assert main(["population", "token", "--secret-file", str(tmp_path / "absent")]) == 2
    assert "population secret" in capsys.readouterr().err
    assert main(["population", "token"]) == 2
    assert "--secret-file" in capsys.readouterr().err


def test_revoke_refuses_bad_input_before_touching_a_store(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDFLEET_STORE_URL", raising=False)
    store = f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"  # nothing listens there
    argv = ["population", "revoke", "--store", store, "--population", "phones"]
    assert main([*argv, "d-1", "not a device"]) == 2
    assert "not a device id" in capsys.readouterr().err
    assert main(["population", "revoke", "--store", store, "--population", "a{b}", "d-1"]) == 2
    assert main(["population", "revoke", "--population", "phones", "d-1"]) == 2
    assert "--store" in capsys.readouterr().err
    assert main([*argv, "d-1"]) == 1  # the store is unreachable
    assert "unavailable" in capsys.readouterr().err


def test_a_selector_refuses_a_bad_population_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the service would take over the process's logging: not in a test process
    monkeypatch.setattr(ops, "configure_logging", lambda *a, **k: None)
    manifest = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "digits.yaml"
    job_secret = tmp_path / "job-secret"
    job_secret.write_text("ab" * 32)
    short = tmp_path / "population-secret"
    short.write_text("abcd")
    argv = ["selector", "--manifest", str(manifest), "--secret-file", str(job_secret),
            "--store", f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"]  # fmt: skip
    assert main([*argv, "--population-secret-file", str(short)]) == 2
    assert "population secret" in capsys.readouterr().err
    assert main([*argv, "--population-secret-file", str(tmp_path / "absent")]) == 2
    assert "population secret" in capsys.readouterr().err
