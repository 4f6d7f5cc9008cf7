"""The FLPopulation CRD against the pydantic spec it is generated from.

``crds/flpopulation.yaml`` must be what ``fedfleet crd --kind flpopulation`` prints, its
``spec`` schema must name exactly the fields of ``FLPopulationSpec`` with their defaults, enums
and bounds, and it must accept a good FLPopulation and refuse the bad ones the operator
refuses (checked with ``jsonschema`` as ``tests/unit/test_crd.py`` does for FLJob).
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from fedfleet.cli import main
from fedfleet.core.population_spec import FLPopulationSpec, GatewayResources, ServiceType
from fedfleet.crdgen_population import render_population_crd_yaml
from tests.unit.test_crd import _to_json_schema

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "flpopulation.yaml"

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> Schema:
    doc: Schema = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    return doc


def _root(crd: Schema) -> Schema:
    root: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


def test_the_file_is_the_generators_output_and_the_cli_prints_it() -> None:
    text = CRD_FILE.read_text(encoding="utf-8")
    assert text == render_population_crd_yaml(), (
        "crds/flpopulation.yaml is stale: run `fedfleet crd --kind flpopulation --write "
        "crds/flpopulation.yaml --write charts/fedfleet/crds/flpopulation.yaml`"
    )
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["crd", "--kind", "flpopulation"]) == 0
    assert out.getvalue() == text
    chart = REPO / "charts" / "fedfleet" / "crds" / "flpopulation.yaml"
    assert chart.read_text(encoding="utf-8") == text


def test_names_scope_and_status_subresource(crd: Schema) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "flpopulations.fedfleet.dev"
    assert spec["group"] == "fedfleet.dev" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"], names["shortNames"]) == (
        "FLPopulation",
        "flpopulations",
        "flpopulation",
        ["flpop"],
    )
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    status = _root(crd)["properties"]["status"]["properties"]
    assert {"endpoint", "enrollmentSecret", "jobs"} <= set(status)


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _compare(schema: Schema, model: type[BaseModel], path: str) -> None:
    """Every field of ``model`` is a property of ``schema`` and nothing else is; defaults and
    nested models agree."""
    fields = _fields(model)
    assert set(schema["properties"]) == set(fields), path
    for alias, field in fields.items():
        prop = schema["properties"][alias]
        assert prop.get("description"), f"{path}.{alias} has no description"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            assert prop["type"] == "object" and prop.get("default") == {}, f"{path}.{alias}"
            _compare(prop, annotation, f"{path}.{alias}")


def test_the_spec_schema_has_exactly_the_models_fields(crd: Schema) -> None:
    spec = _root(crd)["properties"]["spec"]
    _compare(spec, FLPopulationSpec, "spec")
    service = spec["properties"]["service"]["properties"]
    assert service["type"]["enum"] == [t.value for t in ServiceType]
    assert service["type"]["default"] == "ClusterIP"
    assert (service["port"]["default"], service["port"]["minimum"], service["port"]["maximum"]) == (
        8080,
        1,
        65535,
    )
    assert service["annotations"]["additionalProperties"] == {"type": "string"}
    secret_name = spec["properties"]["enrollment"]["properties"]["secretName"]
    assert secret_name["nullable"] is True and secret_name["maxLength"] == 253
    gateway = spec["properties"]["gateway"]["properties"]
    replicas = gateway["replicas"]
    assert (replicas["default"], replicas["minimum"], replicas["maximum"]) == (1, 1, 50)
    resources = gateway["resources"]
    assert resources["nullable"] is True and "default" not in resources
    _compare(resources, GatewayResources, "spec.gateway.resources")
    for part in ("requests", "limits"):
        assert set(resources["properties"][part]["properties"]) == {"cpu", "memory"}


def _doc(spec: Schema, name: str = "phones") -> Schema:
    return {
        "apiVersion": "fedfleet.dev/v1alpha1",
        "kind": "FLPopulation",
        "metadata": {"name": name},
        "spec": spec,
    }


def _validator(crd: Schema) -> jsonschema.Draft4Validator:
    schema = _to_json_schema(_root(crd))
    schema["properties"]["metadata"]["additionalProperties"] = True
    return jsonschema.Draft4Validator(schema)


def test_the_schema_accepts_a_good_population(crd: Schema) -> None:
    good = _doc(
        {
            "service": {"type": "LoadBalancer", "port": 443, "annotations": {"a/b": "c"}},
            "enrollment": {"secretName": "phones-own.secret"},
            "gateway": {
                "replicas": 50,
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"cpu": "2", "memory": "1.5Gi"},
                },
            },
        }
    )
    assert list(_validator(crd).iter_errors(good)) == []
    assert list(_validator(crd).iter_errors(_doc({}))) == []


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        (_doc({"service": {"type": "ExternalName"}}), "type"),
        (_doc({"service": {"port": 0}}), "port"),
        (_doc({"service": {"port": 70000}}), "port"),
        (_doc({"service": {"annotations": {"a": 1}}}), "annotations"),
        (_doc({"enrollment": {"secretName": "Not_A_Name"}}), "secretName"),
        (_doc({"enrollment": {"rotate": True}}), "enrollment"),
        (_doc({"gateway": {"replicas": 0}}), "replicas"),
        (_doc({"gateway": {"replicas": 51}}), "replicas"),
        (_doc({"gateway": {"replicas": "2"}}), "replicas"),
        (_doc({"gateway": {"resources": {"requests": {"cpu": "lots"}}}}), "cpu"),
        (_doc({"gateway": {"resources": {"limits": {"memory": "-1Gi"}}}}), "memory"),
        (_doc({"gateway": {"resources": {"requests": {"gpu": "1"}}}}), "requests"),
        (_doc({}, name="with.dots"), "name"),
        (_doc({}, name="p" * 56), "name"),
    ],
)
def test_the_schema_refuses_what_the_operator_refuses(crd: Schema, doc: Schema, where: str) -> None:
    errors = list(_validator(crd).iter_errors(doc))
    assert errors, doc
    assert any(
        where in "/".join(str(p) for p in e.absolute_path) or where in e.message for e in errors
    )
