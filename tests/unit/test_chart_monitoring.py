"""The chart's monitoring objects: ServiceMonitor, PodMonitor, PrometheusRule, Grafana dashboard.

Rendered by the real helm (as in test_chart.py) and parsed: each object is off by default and
renders when enabled; the monitors select exactly the pods and ports the operator's builders
make (checked against the builders' own output, not copied labels); every alert and dashboard
query is well-formed PromQL (tests/unit/promql.py) reading only :data:`ACTOR_METRICS` (which
tests/integration/test_chart_metrics.py holds to what the actors really expose) or the
kube-state-metrics series named; the dashboard is valid JSON Grafana can load.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from fedfleet.core.spec import FLJob, parse_manifest
from fedfleet_operator.builders import (
    build_aggregator_deployment,
    build_coordinator_deployment,
    build_selector_deployment,
    build_selector_service,
)
from fedfleet_operator.naming import ChildRole
from fedfleet_operator.reconcile import spec_hash
from fedfleet_operator.settings import OperatorSettings
from tests.binaries import BinariesMissing, read_binaries_env
from tests.unit.promql import check, metric_names
from tests.unit.test_chart import CHART, KUBE_VERSION, RELEASE, Helm, _one, _run, render

pytestmark = pytest.mark.unit

ACTOR_METRICS = frozenset(
    {
        "fedfleet_checkins_total",
        "fedfleet_reports_total",
        "fedfleet_aggregated_reports_total",
        "fedfleet_selected_waiting",
        "fedfleet_store_up",
        "fedfleet_coordinator_leader",
        # job-level series (fedfleet.service.telemetry)
        "fedfleet_job_round",
        "fedfleet_job_model_version",
        "fedfleet_job_accuracy",
        "fedfleet_job_loss",
        "fedfleet_job_epsilon",
        "fedfleet_job_last_commit_timestamp_seconds",
        "fedfleet_job_phase",
        "fedfleet_attempts_total",
        "fedfleet_commit_errors_total",
        "fedfleet_round_duration_seconds_bucket",
        "fedfleet_round_selected_devices",
        "fedfleet_round_reported_devices",
        "fedfleet_round_dropped_devices",
        "fedfleet_round_dropout_ratio",
        "fedfleet_round_devices_total",
        "fedfleet_update_size_bytes_bucket",
        "fedfleet_store_seconds_bucket",
    }
)
"""Series the actors expose on /metrics, as the alerts and the dashboard use them."""
SCRAPE_METRICS = frozenset({"up"})
KUBE_STATE_METRICS = frozenset({"kube_deployment_status_replicas_unavailable"})

ALL_ON = [
    "--set",
    "monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,"
    "monitoring.prometheusRule.enabled=true,monitoring.grafanaDashboard.enabled=true",
]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
NS = "team-a"

Obj = dict[str, Any]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        binary = read_binaries_env()["FEDFLEET_HELM"]
    except BinariesMissing as exc:
        pytest.fail(f"cannot test the chart: {exc}", pytrace=False)
    return Helm(binary, str(tmp_path_factory.mktemp("helm-home")))


def _job() -> FLJob:
    return parse_manifest(
        {
            "apiVersion": "fedfleet.dev/v1alpha1",
            "kind": "FLJob",
            "metadata": {"name": "digits", "namespace": NS},
            "spec": {"population": "p", "model": {"kind": "softmax", "inputs": 4, "classes": 2}},
        }
    )


def _actor_pods() -> dict[ChildRole, Obj]:
    job, settings = _job(), OperatorSettings(store_url="redis://r:6379/0", pod_name="op-0")
    h = spec_hash(job.spec)
    built = {
        ChildRole.coordinator: build_coordinator_deployment(job, NS, settings, h),
        ChildRole.selector: build_selector_deployment(job, NS, settings, h),
        ChildRole.aggregator: build_aggregator_deployment(job, NS, settings, h),
    }
    return {role: dict(d["spec"]["template"]) for role, d in built.items()}


def _matches(selector: Obj, labels: dict[str, str]) -> bool:
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for rule in selector.get("matchExpressions", []):
        assert rule["operator"] == "In", rule
        if labels.get(rule["key"]) not in rule["values"]:
            return False
    return True


def _relabeled(relabelings: list[Obj], pod_labels: dict[str, str]) -> dict[str, str]:
    """Apply the relabelings' replace rules to the meta labels Prometheus gives a pod."""
    meta = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^A-Za-z0-9_]", "_", k): v
        for k, v in pod_labels.items()
    }
    out = {}
    for rule in relabelings:
        assert rule.get("action", "replace") == "replace"
        out[rule["targetLabel"]] = ";".join(meta[s] for s in rule["sourceLabels"])
    return out


def _grafana_vars(expr: str) -> str:
    """A panel query as Prometheus receives it once Grafana filled in its variables."""
    return expr.replace("$__rate_interval", "1m").replace("$namespace", "ns").replace("$job", "j")


# -- on and off -------------------------------------------------------------------------------


def test_monitoring_is_off_by_default(helm: Helm) -> None:
    objs = render(helm)
    assert not [o for o in objs if o["kind"] in MONITORING_KINDS]
    assert not [o for o in objs if o["kind"] == "ConfigMap"]


def test_everything_on_lints_and_renders(helm: Helm) -> None:
    proc = _run(helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *ALL_ON)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objs = render(helm, *ALL_ON, "--set", "monitoring.labels.release=kps")
    for kind in MONITORING_KINDS:
        obj = _one(objs, kind)
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["labels"]["release"] == "kps"
        assert len(obj["metadata"]["name"]) <= 63
    assert _one(objs, "ConfigMap", "monitoring")["metadata"]["labels"].get("release") is None


# -- scraping -----------------------------------------------------------------------------------


def test_service_monitor_scrapes_the_selectors_service(helm: Helm) -> None:
    monitor = _one(render(helm, *ALL_ON), "ServiceMonitor")
    service = build_selector_service(_job(), NS)
    assert _matches(monitor["spec"]["selector"], dict(service["metadata"]["labels"]))
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "30s")
    pods = _actor_pods()
    labels = _relabeled(endpoint["relabelings"], pods[ChildRole.selector]["metadata"]["labels"])
    assert labels == {"fedfleet_job": "digits", "fedfleet_role": "selector"}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_pod_monitor_scrapes_coordinators_and_aggregators_once(helm: Helm) -> None:
    monitor = _one(render(helm, *ALL_ON), "PodMonitor")
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    for role, pod in _actor_pods().items():
        labels = pod["metadata"]["labels"]
        # the selectors are the ServiceMonitor's: no pod is scraped twice
        assert _matches(monitor["spec"]["selector"], labels) == (role != ChildRole.selector)
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert endpoint["port"] in ports
        assert _relabeled(endpoint["relabelings"], labels)["fedfleet_role"] == role.value


def test_monitors_follow_the_watched_namespaces(helm: Helm) -> None:
    objs = render(helm, *ALL_ON, "--set", "operator.watchNamespaces={team-a,team-b}")
    for kind in ("ServiceMonitor", "PodMonitor"):
        assert _one(objs, kind)["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


# -- alerts -------------------------------------------------------------------------------------


def _rules(objs: list[Obj]) -> dict[str, Obj]:
    groups = _one(objs, "PrometheusRule")["spec"]["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def test_alerts_are_well_formed_and_read_existing_metrics(helm: Helm) -> None:
    rules = _rules(render(helm, *ALL_ON))
    assert len(rules) >= 5
    for name, rule in rules.items():
        check(rule["expr"])
        assert metric_names(rule["expr"]) <= ACTOR_METRICS | SCRAPE_METRICS | KUBE_STATE_METRICS
        assert re.fullmatch(r"([0-9]+[smhd])+", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        for text in rule["annotations"].values():  # Go templates of Alertmanager, balanced
            assert text.count("{{") == text.count("}}"), (name, text)


def test_the_alerts_the_issue_asks_for(helm: Helm) -> None:
    rules = _rules(render(helm, *ALL_ON))
    exprs = {name: rule["expr"] for name, rule in rules.items()}
    assert 'up{fedfleet_role=~"selector|aggregator"} == 0' in exprs.values()  # down
    assert any("fedfleet_store_up" in e and "== 0" in e for e in exprs.values())  # Redis down
    assert any("replicas_unavailable" in e and "selector|aggregator" in e for e in exprs.values())
    assert any("fedfleet_coordinator_leader" in e for e in exprs.values())
    # no commit in N minutes while Running: the last commit's age, only for a Running job
    no_commit = exprs["FedfleetNoCommit"]
    assert 'fedfleet_job_phase{phase="Running"}' in no_commit
    assert "time() - fedfleet_job_last_commit_timestamp_seconds" in no_commit
    assert no_commit.endswith("> 1800")  # noCommitMinutes: 30 by default
    # commit errors: any failed commit in the window, by default
    assert "increase(fedfleet_commit_errors_total[1h])" in exprs["FedfleetCommitErrors"]
    assert exprs["FedfleetCommitErrors"].endswith("> 0")
    # a job Failed
    assert exprs["FedfleetJobFailed"].startswith(
        'max by (namespace, fedfleet_job) (fedfleet_job_phase{phase="Failed"}) == 1'
    )
    for name in ("FedfleetNoCommit", "FedfleetCommitErrors", "FedfleetJobFailed"):
        assert "by (namespace, fedfleet_job)" in exprs[name], name  # one alert per job


def test_alert_thresholds_come_from_values(helm: Helm) -> None:
    rules = _rules(
        render(
            helm,
            *ALL_ON,
            "--set",
            "monitoring.prometheusRule.storeDownFor=7m,monitoring.prometheusRule.stalledFor=1h",
            "--set-json",
            "monitoring.prometheusRule.refusedReportsRatio=0.25",
        )
    )
    assert rules["FedfleetStoreDown"]["for"] == "7m"
    assert "[1h]" in rules["FedfleetNoDevicesSelected"]["expr"]
    assert rules["FedfleetReportsRefused"]["expr"].endswith("> 0.25")
    rules = _rules(
        render(
            helm,
            *ALL_ON,
            "--set",
            "monitoring.prometheusRule.noCommitMinutes=90,"
            "monitoring.prometheusRule.commitErrorsWindow=6h,"
            "monitoring.prometheusRule.commitErrorsAllowed=3,"
            "monitoring.prometheusRule.jobFailedFor=10m",
        )
    )
    assert rules["FedfleetNoCommit"]["expr"].endswith("> 5400")
    assert "[6h]" in rules["FedfleetCommitErrors"]["expr"]
    assert rules["FedfleetCommitErrors"]["expr"].endswith("> 3")
    assert rules["FedfleetJobFailed"]["for"] == "10m"


# -- the Grafana dashboard ----------------------------------------------------------------------


def test_grafana_dashboard_configmap(helm: Helm) -> None:
    objs = render(
        helm,
        *ALL_ON,
        "--set",
        "monitoring.grafanaDashboard.namespace=grafana,monitoring.grafanaDashboard.folder=FL",
    )
    cm = _one(objs, "ConfigMap", "monitoring")
    meta = cm["metadata"]
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert (meta["namespace"], meta["annotations"]["grafana_folder"]) == ("grafana", "FL")
    dashboard = json.loads(cm["data"]["fedfleet.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "fedfleet.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 6
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    seen: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel["targets"]:
            expr = _grafana_vars(target["expr"])
            check(expr)
            seen |= metric_names(expr)
    assert seen <= ACTOR_METRICS | SCRAPE_METRICS
    assert seen >= ACTOR_METRICS  # every metric the actors expose is on the dashboard
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            inner = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            assert inner is not None, query
            check(_grafana_vars(inner[1]))


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "monitoring.bogus=1",
        "monitoring.serviceMonitor.interval=soon",
        "monitoring.prometheusRule.refusedReportsRatio=2",
        "monitoring.grafanaDashboard.label=",
        "monitoring.podMonitor.extra=1",
        "monitoring.prometheusRule.noCommitMinutes=0",
        "monitoring.prometheusRule.commitErrorsWindow=hourly",
        "monitoring.prometheusRule.commitErrorsAllowed=-1",
        "monitoring.prometheusRule.jobFailedFor=now",
    ],
)
def test_monitoring_values_are_checked(helm: Helm, setting: str) -> None:
    proc = _run(
        helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, "--set", setting
    )
    assert proc.returncode != 0 and "schema" in proc.stderr, setting


# -- the web dashboard Deployment ---------------------------------------------------------------


def _component(obj: Obj) -> str | None:
    labels: dict[str, str] = obj["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component")


def test_web_dashboard_is_off_by_default(helm: Helm) -> None:
    assert not [o for o in render(helm) if _component(o) == "dashboard"]


@pytest.mark.parametrize("extra", [[], ["--set", "redis.external.url=redis://r:6379/1"]])
def test_web_dashboard_deployment(helm: Helm, extra: list[str]) -> None:
    objs = render(helm, "--set", "dashboard.enabled=true,dashboard.interval=3", *extra)
    deployment = _one(objs, "Deployment", "dashboard")
    service = _one(objs, "Service", "dashboard")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    others = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet") and o != deployment]
    assert not any(
        service["spec"]["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()
        for o in others
    )
    assert service["spec"]["type"] == "ClusterIP"
    [container] = pod["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["fedfleet", "dashboard"]
    assert command[command.index("--interval") + 1] == "3"
    port = command[command.index("--port") + 1]
    assert service["spec"]["ports"][0]["targetPort"] == int(port)
    assert container["ports"][0]["containerPort"] == int(port)
    assert container["readinessProbe"]["httpGet"]["port"] == int(port)
    env = {e["name"]: e for e in container["env"]}
    operator = _one(objs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    operator_env = {e["name"]: e for e in operator["env"]}
    assert env["FEDFLEET_STORE_URL"] == operator_env["FEDFLEET_STORE_URL"]
    assert env.get("FEDFLEET_REDIS_PASSWORD") == operator_env.get("FEDFLEET_REDIS_PASSWORD")
    assert all("value" not in e or "PASSWORD" not in e["name"] for e in env.values())
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False  # it needs no Kubernetes API
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
