"""The ``fedfleet`` command, the report files and the progress displays, without a real job.

``run`` and ``demo`` are driven against a stand-in ``fedfleet.embedded`` module that returns a
hand-made :class:`JobResult`, so these tests check the wiring (exit codes, files, messages)
and never train anything.
"""

from __future__ import annotations

import io
import json
import sys
import types
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from fedfleet.cli import EXAMPLES, SUBCOMMANDS, main
from fedfleet.core.checkpoint import pack_checkpoint
from fedfleet.core.spec import FLJob, load_manifest
from fedfleet.progress import LineProgress, LiveProgress, QuietProgress, make_progress
from fedfleet.report import summary_rows, write_plot, write_report
from fedfleet.results import JobResult, ProgressSink, RoundRecord
from fedfleet.tasks.weights_file import load_weights

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEPLOY_EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

VALID = """\
apiVersion: fedfleet.dev/v1alpha1
kind: FLJob
metadata:
  name: tiny
spec:
  population: tiny-demo
  rounds: {total: 3, goalCount: 2}
  fleet: {devices: 10}
"""


# A real checkpoint of the default model (softmax 64 -> 10): run writes it out as safetensors.
FINAL_WEIGHTS = [np.full((64, 10), 0.5, np.float32), np.arange(10, dtype=np.float32)]
MODEL_BYTES = pack_checkpoint(FINAL_WEIGHTS, {"m": np.zeros(3)})


def _result(job: str = "tiny", *, succeeded: bool = True) -> JobResult:
    rounds = [
        RoundRecord(1, 3, 2, 1, False, 0.50, 1.20, 0.4, sim_seconds=30.0, model_version=1),
        RoundRecord(2, 3, 1, 2, True, None, None, 0.3, sim_seconds=120.0, reason="too few reports"),
        RoundRecord(2, 3, 2, 0, False, 0.70, 0.80, 0.4, sim_seconds=25.0, model_version=2),
        RoundRecord(3, 3, 2, 1, False, 0.80, 0.60, 0.5, sim_seconds=28.0, model_version=3),
    ]
    return JobResult(
        job=job,
        rounds=rounds,
        wall_seconds=1.6,
        sim_seconds=203.0,
        model_version=3,
        final_accuracy=0.80,
        final_loss=0.60,
        succeeded=succeeded,
        reason="rounds" if succeeded else "stopped",
        model_bytes=MODEL_BYTES,
    )


@pytest.fixture
def fake_runner(monkeypatch: pytest.MonkeyPatch) -> list[FLJob]:
    """Stand in for fedfleet.embedded; records the jobs it was asked to run."""
    calls: list[FLJob] = []

    def run_job(job: FLJob, *, progress: ProgressSink | None = None) -> JobResult:
        calls.append(job)
        result = _result(job.name)
        for record in result.rounds:
            if progress is not None:
                progress.round_started(record.round, record.selected)
                progress.round_ended(record)
        return result

    module = types.ModuleType("fedfleet.embedded")
    module.run_job = run_job  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fedfleet.embedded", module)
    return calls


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- invalid manifests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (VALID + "  aggregation: {algorithm: fedsgd}\n", "spec.aggregation.algorithm"),
        (VALID.replace("goalCount: 2", "goalCount: -3"), "spec.rounds.goalCount"),
        (VALID.replace("  population: tiny-demo\n", ""), "spec.population"),
        ("spec: [unclosed\n  : {\n", "not valid YAML"),
        ("just a string\n", "(document)"),
    ],
    ids=["unknown-algorithm", "negative-goal-count", "missing-population", "not-yaml", "scalar"],
)
def test_run_invalid_manifest_exits_2_naming_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake_runner: list[FLJob],
    text: str,
    field: str,
) -> None:
    path = _write(tmp_path, text)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid FLJob in {path}:\n")
    assert field in err
    assert "Traceback" not in err
    assert fake_runner == []  # nothing ran
    assert not (tmp_path / "out").exists()


def test_run_error_lists_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = VALID.replace("goalCount: 2", "goalCount: 0") + "  plan: {batchSize: 0}\n"
    assert main(["run", str(_write(tmp_path, text))]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines[1:]) == [
        "  - spec.plan.batchSize: Input should be greater than or equal to 1",
        "  - spec.rounds.goalCount: Input should be greater than or equal to 1",
    ]


def test_run_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["run", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: manifest not found: {missing}\n"


def test_validate_invalid_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, VALID + "  aggregation: {algorithm: fedsgd}\n")
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert "spec.aggregation.algorithm" in captured.err
    assert captured.out == ""


def test_usage_error_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# --- examples --------------------------------------------------------------------------------


def test_deploy_examples_exist() -> None:
    assert sorted(p.stem for p in DEPLOY_EXAMPLES) == sorted(EXAMPLES)


@pytest.mark.parametrize("path", DEPLOY_EXAMPLES, ids=lambda p: p.name)
def test_validate_deploy_example(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    normalized = load_manifest(out)  # the output is itself a valid manifest ...
    assert normalized == load_manifest(path.read_text(encoding="utf-8"))  # ... of the same job
    doc = yaml.safe_load(out)
    assert doc["spec"]["aggregation"]["momentum"] == 0.9  # defaults filled in
    assert doc["metadata"]["name"] == path.stem


@pytest.mark.parametrize("name", EXAMPLES)
def test_packaged_example_equals_deploy_copy(name: str) -> None:
    packaged = (resources.files("fedfleet") / "examples" / f"{name}.yaml").read_bytes()
    assert packaged == (REPO / "deploy" / "examples" / f"{name}.yaml").read_bytes()


def test_room_for_more_subcommands() -> None:
    assert {"run", "demo", "validate"} <= SUBCOMMANDS.keys()


# --- run / demo against the stand-in runner ------------------------------------------------


def test_run_writes_model_plot_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_runner: list[FLJob]
) -> None:
    out, extra = tmp_path / "out", tmp_path / "elsewhere" / "report.json"
    code = main(["run", str(_write(tmp_path, VALID)), "--out", str(out), "--report", str(extra)])
    assert code == 0
    assert [job.name for job in fake_runner] == ["tiny"]
    assert (out / "tiny.model").read_bytes() == MODEL_BYTES
    weights = load_weights(out / "tiny.safetensors")
    assert list(weights) == ["dense_0.weight", "dense_0.bias"]
    for got, want in zip(weights.values(), FINAL_WEIGHTS, strict=True):
        np.testing.assert_array_equal(got, want)
    assert (out / "tiny.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "tiny.json").read_text())["totals"]["rounds"] == 3
    assert json.loads(extra.read_text()) == json.loads((out / "tiny.json").read_text())
    stdout = capsys.readouterr().out
    # Not a terminal under pytest, so one plain line per attempt, then where each file went.
    assert "round 2/3  selected 3  reports 1  dropped 2  ABANDONED (too few reports)" in stdout
    for path in (out / "tiny.model", out / "tiny.png", out / "tiny.json", extra):
        assert str(path) in stdout
    assert str(out / "tiny.safetensors") in stdout


def test_run_out_may_name_the_weights_file(tmp_path: Path, fake_runner: list[FLJob]) -> None:
    target = tmp_path / "final" / "model.npz"
    target.parent.mkdir()
    assert main(["run", str(_write(tmp_path, VALID)), "--out", str(target), "--quiet"]) == 0
    weights = load_weights(target)
    np.testing.assert_array_equal(weights["dense_0.bias"], FINAL_WEIGHTS[1])
    assert (target.parent / "tiny.json").exists()


def test_run_quiet_has_no_round_lines_and_unsuccessful_job_exits_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fake_runner: list[FLJob],
) -> None:
    module = sys.modules["fedfleet.embedded"]
    monkeypatch.setattr(
        module, "run_job", lambda job, progress=None: _result(job.name, succeeded=False)
    )
    code = main(["run", str(_write(tmp_path, VALID)), "--out", str(tmp_path), "--quiet"])
    assert code == 1
    stdout = capsys.readouterr().out
    assert "round 1/" not in stdout
    assert "failed (stopped)" in stdout


def test_run_default_out_is_runs_job_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_runner: list[FLJob]
) -> None:
    manifest = _write(tmp_path, VALID)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(manifest), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == [
        "tiny.json",
        "tiny.model",
        "tiny.png",
        "tiny.safetensors",
    ]


def test_demo_runs_the_packaged_digits_example(
    tmp_path: Path, fake_runner: list[FLJob], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    assert [job.name for job in fake_runner] == ["digits"]
    assert fake_runner[0] == load_manifest((REPO / "deploy/examples/digits.yaml").read_text())
    assert (tmp_path / "digits.png").exists()


# --- report --------------------------------------------------------------------------------


def test_write_report_has_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "report.json"
    write_report(_result(), path)
    report = json.loads(path.read_text())
    assert report["job"] == "tiny"
    assert len(report["rounds"]) == 4
    for row in report["rounds"]:
        assert {
            "round",
            "selected",
            "reported",
            "dropped",
            "abandoned",
            "accuracy",
            "loss",
            "seconds",
        } <= row.keys()
    totals = report["totals"]
    assert {"rounds", "final_accuracy", "wall_seconds"} <= totals.keys()
    assert (totals["rounds"], totals["abandoned"], totals["final_accuracy"]) == (3, 1, 0.8)


@pytest.mark.parametrize(
    "result",
    [_result(), JobResult(job="empty")],
    ids=["with-abandoned", "no-rounds"],
)
def test_write_plot_writes_a_png(tmp_path: Path, result: JobResult) -> None:
    path = tmp_path / "plot.png"
    write_plot(result, path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_summary_rows() -> None:
    rows = dict(summary_rows(_result()))
    assert list(rows) == [
        "Rounds committed",
        "Attempts",
        "Abandoned",
        "Final accuracy",
        "Final loss",
        "Model version",
        "Wall seconds",
        "Simulated seconds",
        "Outcome",
    ]
    assert (rows["Rounds committed"], rows["Attempts"], rows["Abandoned"]) == ("3", "4", "1")
    assert rows["Final accuracy"] == "80.00%"
    assert rows["Outcome"] == "succeeded (all rounds done)"
    assert dict(summary_rows(JobResult(job="x")))["Final loss"] == "n/a"


# --- progress ------------------------------------------------------------------------------


def _feed(sink: ProgressSink) -> None:
    for record in _result().rounds:
        sink.round_started(record.round, record.selected)
        sink.round_ended(record)


def test_make_progress_picks_by_terminal() -> None:
    assert isinstance(make_progress(3, Console(file=io.StringIO())), LineProgress)
    tty = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(make_progress(3, tty), LiveProgress)


def test_line_progress_one_line_per_attempt() -> None:
    buf = io.StringIO()
    with LineProgress(3, Console(file=buf, width=40)) as sink:
        _feed(sink)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4  # no wrapping even on a narrow console
    assert lines[0].startswith("round 1/3  selected 3  reports 2  dropped 1  loss 1.2000")
    assert "accuracy 50.00%" in lines[0]


def test_live_progress_renders_rows_and_bar() -> None:
    buf = io.StringIO()
    with LiveProgress(3, Console(file=buf, force_terminal=True, width=120)) as sink:
        _feed(sink)
    text = buf.getvalue()
    assert "abandoned: too few reports" in text
    assert "3/3" in text
    assert "80.00%" in text


def test_quiet_progress_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with QuietProgress() as sink:
        _feed(sink)
    assert capsys.readouterr() == ("", "")
