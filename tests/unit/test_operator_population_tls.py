"""FLPopulation, part two, without a cluster: the gateway serving https from the user's
``kubernetes.io/tls`` Secret (``spec.gateway.tls``: the Secret mounted read-only, the two env
vars, https probes, an ``https://`` endpoint; nothing changes without it), and the handlers
making the selectors of jobs created before their population serve it (a strategic-merge patch
of each unfinished job's selector Deployment, against the fake API of the population tests)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fedfleet.core.population_spec import FLPopulationSpec
from fedfleet_operator.builders import build_selector_deployment, spec_hash
from fedfleet_operator.population import (
    InvalidPopulation,
    PopulationRef,
    build_gateway_deployment,
    gateway_without_tls_patch,
    population_from_body,
    population_status,
    selector_population_patch,
    with_population,
)
from tests.unit.test_operator_population import (
    NS,
    POP,
    SETTINGS,
    Events,
    FakeKube,
    _applied,
    _ctx,
    _job,
    _population,
    _run,
    strategic_merge,
)

pytestmark = pytest.mark.unit

TLS = {"gateway": {"tls": {"secretName": "phones-tls"}}}


def _container(spec: FLPopulationSpec) -> dict[str, Any]:
    pod = build_gateway_deployment(POP, NS, spec, SETTINGS)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return {"pod": pod, **container}


# -- TLS ------------------------------------------------------------------------------------------


def test_a_gateway_with_tls_mounts_the_certificate_and_serves_and_probes_https() -> None:
    got = _container(population_from_body(POP, TLS))
    pod = got["pod"]
    env = {e["name"]: e.get("value") for e in got["env"]}
    cert, key = Path(env["FEDFLEET_TLS_CERT_FILE"]), Path(env["FEDFLEET_TLS_KEY_FILE"])
    assert cert.parent == key.parent and cert.name == "tls.crt" and key.name == "tls.key"
    [mount] = [m for m in got["volumeMounts"] if m["mountPath"] == str(cert.parent)]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {
        "secretName": "phones-tls",
        "defaultMode": 0o440,  # read-only for the gateway's group (fsGroup), as the other secret
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
    }
    assert pod["securityContext"] == {"fsGroup": 65534}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert got[probe]["httpGet"]["scheme"] == "HTTPS", probe
    # The population secret is mounted as before, beside the certificate.
    assert env["FEDFLEET_POPULATION_SECRET_FILE"] == (
        "/var/run/fedfleet/population/population-secret"
    )
    assert str(cert.parent) != "/var/run/fedfleet/population"
    status = population_status(POP, NS, population_from_body(POP, TLS), [])
    assert status["endpoint"] == "https://phones-devices.team-a.svc:8080"


def test_without_tls_the_gateway_is_built_as_before() -> None:
    plain = build_gateway_deployment(POP, NS, FLPopulationSpec(), SETTINGS)
    served = build_gateway_deployment(POP, NS, population_from_body(POP, TLS), SETTINGS)
    text = json.dumps(plain)
    assert "HTTPS" not in text and "TLS" not in text and "tls" not in text
    # Take the TLS additions away: what remains is the plain gateway.
    undone = copy.deepcopy(served)
    pod = undone["spec"]["template"]["spec"]
    [container] = pod["containers"]
    container["env"] = [e for e in container["env"] if "TLS" not in e["name"]]
    container["volumeMounts"].pop()
    pod["volumes"].pop()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        del container[probe]["httpGet"]["scheme"]  # type: ignore[misc]
    assert undone == plain
    assert population_status(POP, NS, FLPopulationSpec(), [])["endpoint"].startswith("http://")


@pytest.mark.parametrize(
    ("tls", "field"),
    [
        ({}, "spec.gateway.tls.secretName"),
        ({"secretName": ""}, "spec.gateway.tls.secretName"),
        ({"secretName": "Not_A_Name"}, "spec.gateway.tls.secretName"),
        ({"secretName": "ok", "caFile": "x"}, "spec.gateway.tls.caFile"),
        ("phones-tls", "spec.gateway.tls"),
    ],
)
def test_an_unusable_tls_setting_is_refused_naming_the_field(tls: Any, field: str) -> None:
    with pytest.raises(InvalidPopulation, match=field.replace(".", r"\.")):
        population_from_body(POP, {"gateway": {"tls": tls}})


def test_the_tls_secret_of_a_population_goes_to_the_gateway_through_the_handler() -> None:
    kube = FakeKube()
    patch = _run(_ctx(kube), _population(TLS))
    pod = kube.objects[("Deployment", "phones-gateway")]["spec"]["template"]["spec"]
    secrets = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
    assert secrets == ["phones-enrollment", "phones-tls"]
    assert ("Secret", "phones-tls") not in kube.objects  # the user's: never written
    assert patch["status"]["endpoint"] == "https://phones-devices.team-a.svc:8080"


def _with_http_probes(body: Any) -> Any:
    out = copy.deepcopy(body)
    [container] = out["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["httpGet"]["scheme"] = "HTTP"  # the API server's default
    return out


def test_taking_tls_out_of_the_spec_takes_it_off_the_gateway() -> None:
    plain = build_gateway_deployment(POP, NS, FLPopulationSpec(), SETTINGS)
    served = build_gateway_deployment(POP, NS, population_from_body(POP, TLS), SETTINGS)
    patch = gateway_without_tls_patch(POP, NS)
    # What the API server makes of the plain body patched over the TLS gateway keeps the TLS
    # env, mount and volume (a strategic merge never removes); the second patch takes them off.
    kept = strategic_merge(served, plain)
    assert "FEDFLEET_TLS_CERT_FILE" in json.dumps(kept)
    assert strategic_merge(kept, patch) == _with_http_probes(plain)
    # On a gateway that never had TLS it changes nothing but what the API server defaults.
    assert strategic_merge(plain, patch) == _with_http_probes(plain)
    # Through the handler: the second patch is sent only when the spec has no TLS.
    kube = FakeKube()
    ctx = _ctx(kube)
    _run(ctx, _population(TLS))
    with_tls = kube.objects[("Deployment", "phones-gateway")]
    assert (
        with_tls["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["scheme"]
        == "HTTPS"
    )
    _run(ctx, _population())
    got = copy.deepcopy(kube.objects[("Deployment", "phones-gateway")])
    del got["metadata"]["ownerReferences"]
    assert got == _with_http_probes(plain)


# -- jobs created before their population ---------------------------------------------------------


def _fljob(name: str, population: str = POP, phase: str | None = "Running") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {"population": population},
        "status": {"phase": phase} if phase else {},
    }


def test_the_patch_makes_a_plain_selector_deployment_what_with_population_builds() -> None:
    job = _job()
    plain = build_selector_deployment(job, NS, SETTINGS, spec_hash(job.spec))
    ref = PopulationRef(POP, "own-secret")
    patch = selector_population_patch(job.name, NS, ref)
    assert patch["metadata"] == {"name": "mnist-selector", "namespace": NS}
    assert "selector" not in patch["spec"] and "replicas" not in patch["spec"]  # only additions
    merged = strategic_merge(plain, patch)
    assert merged == with_population(plain, ref)
    assert strategic_merge(merged, patch) == merged  # patching again changes nothing


def test_creating_a_population_makes_the_selectors_of_its_running_jobs_serve_it() -> None:
    # Three jobs whose children exist before the population does, so they were built plain.
    kube = FakeKube()
    for name, population in (("early", POP), ("done", POP), ("other", "watches")):
        _applied(kube, _job(name, population=population))
    before = copy.deepcopy(kube.objects)
    kube.fljobs = [
        _fljob("early"),
        _fljob("done", phase="Succeeded"),  # finished: its selectors are not touched
        _fljob("other", population="watches"),
        _fljob("new", phase=None),  # its children not made yet: nothing is created for it
    ]
    events = Events()
    ctx = _ctx(kube, events)
    raw = _population({"enrollment": {"secretName": "own-secret"}})
    _run(ctx, raw)
    served = with_population(
        before[("Deployment", "early-selector")],  # type: ignore[arg-type]
        PopulationRef(POP, "own-secret"),
    )
    assert kube.objects[("Deployment", "early-selector")] == served
    for key, body in before.items():
        if key != ("Deployment", "early-selector"):
            assert kube.objects[key] == body, key  # every other object as it was
    assert ("Deployment", "new-selector") not in kube.objects
    # The operator restarting (resume) converges to the same Deployment.
    _run(ctx, raw)
    assert kube.objects[("Deployment", "early-selector")] == served
    # The job's own next reconcile now builds exactly what the patch made: no second rollout.
    kube.populations[POP] = raw
    rebuilt = _applied(kube, _job("early"))["early-selector"]
    assert rebuilt == served
