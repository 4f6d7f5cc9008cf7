"""The FLJob CRD against the pydantic spec it is generated from, and against the contract.

``crds/fljob.yaml`` is what users apply, so most checks read that file rather than the
generator's output: it must equal ``render_crd_yaml()`` (one source of truth), be a structural
schema the API server accepts, and agree with ``FLJobSpec`` field by field on descriptions,
defaults, enums and ranges. The example manifests are validated against the schema with
``jsonschema`` (OpenAPI 3.0's ``nullable`` and boolean exclusive bounds are draft-4 JSON
Schema plus a null type), and broken manifests are refused naming the broken field, by the
schema and by pydantic alike.
"""

from __future__ import annotations

import copy
import enum
import io
import typing
from collections.abc import Iterator, Mapping
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedfleet import crdgen
from fedfleet.cli import main
from fedfleet.core.spec import Algorithm, Dataset, FLJobSpec, ManifestError, parse_manifest
from fedfleet.crdgen import SchemaGenerationError, render_crd_yaml, spec_schema

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "fljob.yaml"
PEERING_FILE = REPO / "crds" / "kopf-peering.yaml"
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def root(crd: dict[str, Any]) -> Schema:
    schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.fixture(scope="module")
def spec(root: Schema) -> Schema:
    schema: Schema = root["properties"]["spec"]
    return schema


def _nodes(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its dotted path (``[]`` for array items)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")


def _fields(
    model: type[BaseModel], node: Schema, path: str
) -> Iterator[tuple[str, FieldInfo, Schema]]:
    """Every pydantic field at every depth, paired with its CRD node."""
    for name, field in model.model_fields.items():
        alias = field.alias or name
        assert alias in node["properties"], f"{path}.{alias} missing from the CRD"
        sub = node["properties"][alias]
        yield f"{path}.{alias}", field, sub
        child = field.annotation
        if isinstance(child, type) and issubclass(child, BaseModel):
            yield from _fields(child, sub, f"{path}.{alias}")


def _k8s_default(value: Any, schema: Schema) -> Any:
    """Structural defaulting as the API server does it (written independently of crdgen)."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = _k8s_default(out[name], sub)
        return out
    return value


def _to_json_schema(schema: Schema) -> Schema:
    """OpenAPI 3.0 (Kubernetes) -> draft-4 JSON Schema; unknown fields refused, as kubectl's
    default (Strict) field validation does."""
    out: Schema = {
        k: v for k, v in schema.items() if not k.startswith("x-kubernetes") and k != "nullable"
    }
    if schema.get("nullable"):
        out["type"] = [schema["type"], "null"]
    if "properties" in schema:
        out["properties"] = {k: _to_json_schema(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = _to_json_schema(schema["items"])
    return out


def _validator(root: Schema) -> jsonschema.Draft4Validator:
    schema = _to_json_schema(root)
    schema["properties"]["metadata"]["additionalProperties"] = True  # only name is restricted
    return jsonschema.Draft4Validator(schema)


def _example(name: str = "digits") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "deploy" / "examples" / f"{name}.yaml").read_text(encoding="utf-8")
    )
    return doc


# --- one source of truth -------------------------------------------------------------------


def test_crd_file_is_the_generator_output() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == render_crd_yaml(), (
        "crds/fljob.yaml is stale: run "
        "`fedfleet crd --write crds/fljob.yaml --write charts/fedfleet/crds/fljob.yaml`"
    )


def test_rendering_is_stable_and_marked_generated() -> None:
    text = render_crd_yaml()
    assert text == render_crd_yaml()
    assert text.startswith("# Generated by `fedfleet crd`")
    assert "do not edit by hand" in text.splitlines()[0]
    assert "&id" not in text and "*id" not in text  # no YAML anchors


def test_cli_prints_and_writes_the_crd(tmp_path: Path) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["crd"]) == 0
    assert out.getvalue() == render_crd_yaml()
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(["crd", "--write", str(a), "--write", str(b)]) == 0
    assert a.read_text(encoding="utf-8") == b.read_text(encoding="utf-8") == render_crd_yaml()


# --- names, as operator/CONTRACT.md fixes them ---------------------------------------------


def test_names_and_version_follow_the_contract(crd: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "fljobs.fedfleet.dev"
    spec = crd["spec"]
    assert spec["group"] == "fedfleet.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FLJob",
        "listKind": "FLJobList",
        "plural": "fljobs",
        "singular": "fljob",
        "shortNames": ["flj"],
        "categories": ["fedfleet"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["jsonPath"], c["type"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("Phase", ".status.phase", "string"),
        ("Round", ".status.round", "integer"),
        ("Rounds", ".status.rounds", "integer"),
        ("Accuracy", ".status.accuracy", "number"),
        ("Epsilon", ".status.epsilon", "number"),
        ("State", ".status.conditions[-1:].reason", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]


def test_model_and_population_are_immutable(spec: Schema) -> None:
    for name in ("model", "population"):
        [rule] = spec["properties"][name]["x-kubernetes-validations"]
        assert rule["rule"] == "self == oldSelf"
        assert f"spec.{name} is immutable" in rule["message"]
    with_rules = sorted(path for path, node in _nodes(spec) if "x-kubernetes-validations" in node)
    assert with_rules == ["model", "population"]


def test_status_schema_follows_the_contract(root: Schema) -> None:
    status = root["properties"]["status"]
    assert set(status["properties"]) == {
        "phase",
        "round",
        "rounds",
        "modelVersion",
        "accuracy",
        "epsilon",
        "lastRound",
        "startTime",
        "completionTime",
        "observedGeneration",
        "conditions",
        "model",
        "aggregators",
    }
    props = status["properties"]
    assert props["phase"]["enum"] == ["Pending", "Running", "Suspended", "Succeeded", "Failed"]
    assert set(props["lastRound"]["properties"]) == {
        "round",
        "accuracy",
        "loss",
        "reports",
        "epsilon",
    }
    assert set(props["model"]["properties"]) == {
        "store",
        "key",
        "version",
        "fetch",
        "best",
        "fetchBest",
    }
    condition = props["conditions"]["items"]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(
        condition["properties"]
    )
    assert props["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert set(condition["required"]) >= {"type"}  # list-map keys must be required
    assert not any(n.get("x-kubernetes-preserve-unknown-fields") for _, n in _nodes(status))


# --- structural schema ---------------------------------------------------------------------


def test_schema_is_structural(root: Schema) -> None:
    for path, node in _nodes(root):
        for keyword in ("$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "title"):
            assert keyword not in node, f"{path}: {keyword} in a structural schema"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if "properties" in node:
            assert "additionalProperties" not in node, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node:
                assert node[bound] is True, f"{path}: {bound} must be an OpenAPI 3.0 boolean"
                assert ("minimum" if bound == "exclusiveMinimum" else "maximum") in node, path
        if "nullable" in node:
            assert node["nullable"] is True, path
            assert "default" not in node, f"{path}: absent is None; no null default"
    metadata = root["properties"]["metadata"]
    assert set(metadata) == {"type", "properties"}  # the API server allows no more
    assert set(metadata["properties"]) == {"name"}


def test_defaults_validate_against_their_own_schema(root: Schema) -> None:
    validator = _validator(root)
    for path, node in _nodes(root["properties"]["spec"], "spec"):
        if "default" in node:
            sub = jsonschema.Draft4Validator(_to_json_schema(node))
            value = _k8s_default(copy.deepcopy(node["default"]), node)
            errors = [e.message for e in sub.iter_errors(value)]
            assert not errors, f"{path}: default {node['default']!r} is invalid: {errors}"
    assert validator.is_valid(_example())


def test_every_spec_property_has_a_description(spec: Schema) -> None:
    assert spec.get("description")
    for path, node in _nodes(spec, "spec"):
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description", "").strip(), f"{path}.{name} has no description"
            assert "\n" not in sub["description"], f"{path}.{name}: description not one line"


def test_a_field_without_a_docstring_fails_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    class Undocumented(FLJobSpec):
        new_knob: int = 1

    monkeypatch.setattr(crdgen, "FLJobSpec", Undocumented)
    with pytest.raises(SchemaGenerationError, match=r"spec\.newKnob: no description"):
        spec_schema()


# --- agreement with pydantic, field by field -----------------------------------------------


def test_crd_defaults_equal_pydantic_defaults(spec: Schema) -> None:
    applied = _k8s_default({"population": "p"}, spec)
    expected = FLJobSpec(population="p").model_dump(mode="json", by_alias=True, exclude_none=True)
    assert applied == expected
    for path, field, node in _fields(FLJobSpec, spec, "spec"):
        if field.is_required():
            assert "default" not in node, path
            continue
        value = field.get_default(call_default_factory=True)
        if value is None:
            assert "default" not in node, f"{path}: None default must be left out"
            continue
        assert "default" in node, f"{path}: pydantic default {value!r} missing from the CRD"
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
        elif isinstance(value, enum.Enum):
            value = value.value
        assert _k8s_default(copy.deepcopy(node["default"]), node) == value, path


def test_enums_equal_the_str_enums(spec: Schema) -> None:
    seen = literals = 0
    for path, field, node in _fields(FLJobSpec, spec, "spec"):
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, enum.StrEnum):
            assert node["enum"] == [member.value for member in annotation], path
            assert node["type"] == "string", path
            seen += 1
        elif typing.get_origin(annotation) is typing.Literal:
            assert node["enum"] == list(typing.get_args(annotation)), path
            literals += 1
        else:
            assert "enum" not in node, path
    # model.kind, aggregation.algorithm, robustness.aggregator, fleet.dataset,
    # checkpoints.mode, checkpoints.storage.kind
    assert seen == 6
    assert literals == 2  # secureAggregation.ringBits, differentialPrivacy.accountant
    props = spec["properties"]
    assert props["aggregation"]["properties"]["algorithm"]["enum"] == [a.value for a in Algorithm]
    assert props["fleet"]["properties"]["dataset"]["enum"] == [d.value for d in Dataset]


_BOUND_KEYS = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength"}
    | {"minItems", "maxItems", "pattern"}
)


def _pydantic_bounds(field: FieldInfo, type_: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for meta in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
            value = getattr(meta, attr, None)
            if value is None:
                continue
            if attr in ("ge", "gt"):
                out["minimum"] = value
                if attr == "gt":
                    out["exclusiveMinimum"] = True
            elif attr in ("le", "lt"):
                out["maximum"] = value
                if attr == "lt":
                    out["exclusiveMaximum"] = True
            elif attr == "pattern":
                out["pattern"] = value
            else:
                kind = "Items" if type_ == "array" else "Length"
                out[("min" if attr == "min_length" else "max") + kind] = value
    return out


def test_ranges_equal_pydantic_constraints(spec: Schema) -> None:
    for path, field, node in _fields(FLJobSpec, spec, "spec"):
        crd_bounds = {k: v for k, v in node.items() if k in _BOUND_KEYS}
        assert crd_bounds == _pydantic_bounds(field, node["type"]), path


def test_representative_ranges(spec: Schema) -> None:
    props = spec["properties"]
    goal = props["rounds"]["properties"]["goalCount"]
    assert (goal["type"], goal["minimum"]) == ("integer", 1)
    assert "exclusiveMinimum" not in goal
    over = props["rounds"]["properties"]["overSelection"]
    assert (over["type"], over["minimum"], over["maximum"]) == ("number", 1, 10)
    dropout = props["fleet"]["properties"]["dropoutRate"]
    assert (dropout["minimum"], dropout["maximum"]) == (0, 1)
    lr = props["plan"]["properties"]["learningRate"]
    assert (lr["minimum"], lr["exclusiveMinimum"]) == (0, True)  # gt=0
    momentum = props["aggregation"]["properties"]["momentum"]
    assert (momentum["maximum"], momentum["exclusiveMaximum"]) == (1, True)  # lt=1
    target = props["rounds"]["properties"]["targetAccuracy"]
    assert (target["type"], target["nullable"]) == ("number", True)  # float | None
    assert props["model"]["properties"]["hidden"]["maxItems"] == 8
    assert spec["required"] == ["population"]


def test_lifetime_fields_are_optional_whole_seconds(spec: Schema) -> None:
    props = spec["properties"]
    deadline, ttl = props["activeDeadlineSeconds"], props["ttlSecondsAfterFinished"]
    assert (deadline["type"], deadline["minimum"], deadline["nullable"]) == ("integer", 1, True)
    assert (ttl["type"], ttl["minimum"], ttl["nullable"]) == ("integer", 0, True)
    assert "DeadlineExceeded" in deadline["description"]
    assert "store" in ttl["description"]


# --- manifests against the schema ----------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_validate_against_the_crd(root: Schema, path: Path) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator(root).iter_errors(doc)]
    assert not errors
    parse_manifest(doc)  # and pydantic agrees


def _break(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is _MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


_MISSING = object()


@pytest.mark.parametrize(
    ("path", "value", "where", "pydantic_field"),
    [
        (("spec", "rounds", "goalCount"), -3, ["spec", "rounds", "goalCount"], "goalCount"),
        (
            ("spec", "aggregation", "algorithm"),
            "sgd",
            ["spec", "aggregation", "algorithm"],
            "algorithm",
        ),
        (("spec", "population"), _MISSING, ["spec"], "population"),
        (("spec", "fleet", "dropoutRate"), 1.5, ["spec", "fleet", "dropoutRate"], "dropoutRate"),
        (("spec", "plan", "learningRate"), 0, ["spec", "plan", "learningRate"], "learningRate"),
        (("spec", "rounds", "typo"), 1, ["spec", "rounds"], "typo"),
    ],
    ids=["negative-goal", "unknown-algorithm", "no-population", "dropout", "lr-zero", "typo"],
)
def test_invalid_manifests_are_refused_naming_the_field(
    root: Schema, path: tuple[str, ...], value: Any, where: list[str], pydantic_field: str
) -> None:
    doc = _break(_example(), path, value)
    errors = list(_validator(root).iter_errors(doc))
    assert errors, "the CRD schema accepted a broken manifest"
    [error] = errors
    assert list(error.absolute_path) == where
    assert path[-1] in ".".join(map(str, error.absolute_path)) + " " + error.message
    with pytest.raises(ManifestError) as caught:
        parse_manifest(doc)
    assert pydantic_field in str(caught.value)


def test_null_target_accuracy_is_accepted(root: Schema) -> None:
    doc = _break(_example(), ("spec", "rounds", "targetAccuracy"), None)
    assert _validator(root).is_valid(doc)


def test_job_names_must_fit_the_children(root: Schema) -> None:
    validator = _validator(root)
    ok = _example()
    assert validator.is_valid(_break(ok, ("metadata", "name"), "a" * 54))
    assert not validator.is_valid(_break(ok, ("metadata", "name"), "a" * 55))
    assert not validator.is_valid(_break(ok, ("metadata", "name"), "dotted.name"))


# --- the kopf peering CRDs -----------------------------------------------------------------


def _peering_crds() -> dict[str, Mapping[str, Any]]:
    docs = [d for d in yaml.safe_load_all(PEERING_FILE.read_text(encoding="utf-8")) if d]
    return {d["metadata"]["name"]: d for d in docs}


def test_kopf_peering_crds() -> None:
    crds = _peering_crds()
    assert set(crds) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for name, scope, kind in [
        ("clusterkopfpeerings.kopf.dev", "Cluster", "ClusterKopfPeering"),
        ("kopfpeerings.kopf.dev", "Namespaced", "KopfPeering"),
    ]:
        spec = crds[name]["spec"]
        assert (spec["group"], spec["scope"], spec["names"]["kind"]) == ("kopf.dev", scope, kind)
        [version] = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
        # kopf patches status through the main endpoint; a status subresource would drop it.
        assert "subresources" not in version
        root = version["schema"]["openAPIV3Schema"]
        status = root["properties"]["status"]
        assert status == {
            "type": "object",
            "description": status["description"],
            "x-kubernetes-preserve-unknown-fields": True,
        }
        for path, node in _nodes(root):
            assert "type" in node, path


def test_strings_a_yaml_1_1_reader_takes_for_booleans_are_quoted() -> None:
    """The API server reads YAML 1.1, where a bare ``y`` is true: `fleet.data.label`'s default
    once made the whole CRD invalid there while PyYAML read it fine."""
    import re

    from fedfleet.crdgen import _NoAliasDumper, render_crd_yaml

    for word in ("y", "n", "Yes", "off", "null"):
        assert yaml.dump({"a": word}, Dumper=_NoAliasDumper) == f"a: '{word}'\n"
    bare = re.compile(r":\s+(?i:y|n|yes|no|on|off)\s*$", re.M)
    assert not bare.findall(render_crd_yaml())
