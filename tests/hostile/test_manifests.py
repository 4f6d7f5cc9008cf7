"""Manifests that cannot run are refused before anything runs: exit 2, the field named, no
traceback — and where the API server has a rule (types, unknown fields), it refuses too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fedfleet.cli import main
from fedfleet.crdgen import crd_document

pytestmark = pytest.mark.hostile

ROOT = Path(__file__).resolve().parents[2]
DIGITS = (ROOT / "deploy" / "examples" / "digits.yaml").read_text(encoding="utf-8")


def _with(path: str, value: Any, text: str = DIGITS) -> str:
    doc = yaml.safe_load(text)
    node = doc
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return yaml.safe_dump(doc, sort_keys=False)


def _replace(old: str, new: str) -> str:
    assert old in DIGITS
    return DIGITS.replace(old, new, 1)


def _laughs(under: str) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    bomb = "\n".join("  " + line for line in lines)
    return DIGITS.replace(
        "metadata:\n  name: digits", f"metadata:\n  name: digits\n  {under}:\n{bomb}"
    )


def _deep(levels: int) -> str:
    return DIGITS + "status:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(levels))


# (id, manifest text, what the error must name)
REFUSED: list[tuple[str, str, str]] = [
    ("inf-float", _with("spec.fleet.availability", {"peakAtSeconds": float("inf")}),
     "spec.fleet.availability.peakAtSeconds"),
    ("inf-literal", _replace("    seed: 0", "    seed: 0\n    trainSeconds: .inf"),
     "spec.fleet.trainSeconds"),
    ("nan", _replace("learningRate: 0.1", "learningRate: .nan"), "spec.plan.learningRate"),
    ("negative-inf", _replace("overSelection: 1.3", "overSelection: -.inf"),
     "spec.rounds.overSelection"),
    ("hundreds-of-gib", _with("spec.model", {"kind": "mlp", "inputs": 64, "classes": 10,
                                             "hidden": [1_000_000, 100_000]}), "spec.model"),
    ("ten-million-devices", _replace("devices: 200", "devices: 10000000"), "spec.fleet.devices"),
    ("braces-in-name", _replace("name: digits", 'name: "{digits}"'), "metadata.name"),
    ("upper-case-name", _replace("name: digits", "name: Digits"), "metadata.name"),
    ("dotted-name", _replace("name: digits", "name: a.b"), "metadata.name"),
    ("name-too-long", _replace("name: digits", "name: " + "d" * 60), "metadata.name"),
    ("colon-in-name", _replace("name: digits", 'name: "a:b"'), "metadata.name"),
    ("bad-namespace", _replace("name: digits", "name: digits\n  namespace: Team_A"),
     "metadata.namespace"),
    ("loose-boolean", _replace("requireCharging: true", 'requireCharging: "yes"'),
     "spec.eligibility.requireCharging"),
    ("bool-for-string", _replace("population: digits-demo", "population: true"),
     "spec.population"),
    ("numeric-string", _replace("goalCount: 20", 'goalCount: "20"'), "spec.rounds.goalCount"),
    ("float-for-int", _replace("goalCount: 20", "goalCount: 20.5"), "spec.rounds.goalCount"),
    ("string-for-float", _replace("learningRate: 0.1", 'learningRate: "0.1"'),
     "spec.plan.learningRate"),
    ("date-for-string", _replace("population: digits-demo", "population: 2024-01-01"),
     "(document)"),
    ("unknown-top-level", DIGITS + "specs: {}\n", "specs"),
    ("unknown-nested", _replace("localEpochs: 5", "localEpochs: 5\n    localEpoch: 9"),
     "spec.plan.localEpoch"),
    ("duplicate-spec", DIGITS + "spec: {population: other}\n", "duplicate key 'spec'"),
    ("duplicate-nested", _replace("total: 50", "total: 50\n    total: 5"), "duplicate key 'total'"),
    ("billion-laughs-in-metadata", _laughs("labels"), "(document)"),
    ("deep-nesting", _deep(300), "nested deeper"),
    ("deep-flow-nesting", DIGITS + "status: " + "[" * 100_000 + "]" * 100_000 + "\n",
     "(document)"),
    ("huge", DIGITS + "status:\n  pad: " + "x" * (2 << 20) + "\n", "bytes"),
    ("bool-in-metadata", _replace("name: digits", "name: true"), "metadata.name"),
    ("python-tag", DIGITS + "status: !!python/object:os.system {}\n", "not valid YAML"),
    ("not-a-mapping", "- just\n- a list\n", "(document)"),
    ("empty", "", "(document)"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "field"), [(t, f) for _, t, f in REFUSED],
                         ids=[i for i, _, _ in REFUSED])  # fmt: skip
def test_validate_refuses_naming_the_field(
    text: str, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert field in captured.err
    assert "Traceback" not in captured.err
    assert len(captured.err) < 4096  # the message names the problem, it does not dump input


@pytest.mark.parametrize("command", ["run", "up"])
def test_run_and_up_refuse_before_running(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(_replace("devices: 200", "devices: 10000000"), encoding="utf-8")
    out = tmp_path / "out"
    assert main([command, str(path), "--out", str(out)]) == 2
    assert not out.exists()  # nothing started, nothing written
    assert "spec.fleet.devices" in capsys.readouterr().err


def test_the_memory_limit_is_configurable_and_the_estimate_is_in_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(_replace("devices: 200", "devices: 900000"), encoding="utf-8")
    assert main(["validate", str(path), "--max-memory", "1Gi"]) == 2
    err = capsys.readouterr().err
    assert "spec.fleet.devices" in err and "estimated 2.6 GiB" in err and "1.0 GiB" in err
    assert main(["validate", str(path), "--max-memory", "4Gi"]) == 0


def test_bombs_end_in_a_clear_refusal_in_a_fresh_process(tmp_path: Path) -> None:
    deep = DIGITS + "status: " + "[" * 200_000 + "]" * 200_000 + "\n"
    for name, text in (("laughs", _laughs("annotations")), ("deep", deep)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, "-m", "fedfleet.cli", "validate", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "(document)" in proc.stderr


# -- the same strictness as the API server -------------------------------------------------------

_SPEC_SCHEMA = crd_document()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
    "spec"
]
TYPE_CASES = ["loose-boolean", "bool-for-string", "numeric-string", "float-for-int",
              "string-for-float", "unknown-nested", "ten-million-devices"]  # fmt: skip


@pytest.mark.parametrize("case", TYPE_CASES)
def test_the_crd_schema_refuses_what_validate_refuses(case: str) -> None:
    text = next(t for i, t, _ in REFUSED if i == case)
    spec = yaml.safe_load(text)["spec"]
    validator = jsonschema.Draft4Validator(_strict(_SPEC_SCHEMA))
    assert list(validator.iter_errors(spec)), f"the CRD schema accepts {case}"


@pytest.mark.parametrize("example", sorted((ROOT / "deploy" / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)  # fmt: skip
def test_both_accept_the_examples(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(example)]) == 0
    spec = yaml.safe_load(example.read_text(encoding="utf-8"))["spec"]
    jsonschema.Draft4Validator(_strict(_SPEC_SCHEMA)).validate(spec)


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with kubectl's default strict field
    validation: an object's unknown properties are errors."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema
