"""fedfleet end to end on a real node (``python -m tests.cluster.realnode --smoke --e2e``):
``helm install`` + ``helm test`` of charts/fedfleet with the locally built Redis image, the
digits FLJob applied, and the simulated fleet run as a pod from the services image (manifest
from a ConfigMap, the job secret from a secretKeyRef, the selector pod IPs as its targets) until
the FLJob is Succeeded. Returns the failures (empty: it all held). Not a pytest test: the
groundwork the cluster tier's real-node fixtures will build on.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.cluster.controlplane import ControlPlane
from tests.cluster.realnode import NodeImages

__all__ = ["fedfleet_end_to_end"]

REPO = Path(__file__).resolve().parents[2]
NS = "fedfleet-system"

FLEET_SCRIPT = """
import asyncio, os, yaml
from fedfleet.core.spec import parse_manifest
from fedfleet.device.http_fleet import HttpFleet
from fedfleet.service.keys import JobKeys
from fedfleet.up import UpOptions

doc = yaml.safe_load(open("/fleet/job.yaml"))
doc["metadata"] = {"name": os.environ["JOB"], "namespace": os.environ["NS"]}
urls = [f"http://{ip}:8080" for ip in os.environ["SELECTORS"].split(",")]
print("fleet against", urls, flush=True)
up = UpOptions()
extra = {"rest_rounds": up.rest_rounds} if hasattr(up, "rest_rounds") else {}  # newer images
fleet = HttpFleet(
    parse_manifest(doc),
    urls,
    JobKeys.from_secret(bytes.fromhex(os.environ["JOB_SECRET"])),
    time_scale=0.01,
    rest_seconds=up.rest_seconds,
    **extra,
)
asyncio.run(fleet.run())
"""


def _json(cp: ControlPlane, *args: str) -> Any:
    out = cp.kubectl(*args, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def _ready_ips(cp: ControlPlane, selector: str) -> list[str]:
    pods = _json(cp, "get", "pods", "-n", NS, "-l", selector) or {"items": []}
    return sorted(
        p["status"]["podIP"]
        for p in pods["items"]
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    )


def fedfleet_end_to_end(
    cp: ControlPlane, images: NodeImages, repo: Path = REPO, timeout: float = 1200
) -> list[str]:
    """``repo``: where charts/fedfleet and deploy/examples come from; they must match the
    images' sources (the operator refuses CRD fields it does not know: InvalidSpec)."""
    t0 = time.monotonic()
    redis = next(n for n in images.archives if "/redis:" in n)
    redis_repo, redis_tag = redis.rsplit(":", 1)
    helm = [cp.binaries.helm, f"--kubeconfig={cp.kubeconfig}"]

    def run_helm(*args: str, timeout_s: float = 400) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*helm, *args], capture_output=True, text=True, timeout=timeout_s)

    install = run_helm(
        "install",
        "fedfleet",
        str(repo / "charts" / "fedfleet"),
        "-n",
        NS,
        "--create-namespace",
        "--set",
        f"redis.image.repository={redis_repo},redis.image.tag={redis_tag},redis.persistence.enabled=false",
        "--wait",
        "--timeout",
        "300s",
    )
    if install.returncode != 0:
        return [f"helm install failed: {install.stderr.strip()}"]
    print(f"helm install --wait: {time.monotonic() - t0:.1f} s")
    test = run_helm("test", "fedfleet", "-n", NS, "--timeout", "180s")
    print("helm test:", test.stdout.strip().splitlines()[-6:] if test.stdout else test.stderr)
    if test.returncode != 0:
        return [f"helm test failed: {test.stdout} {test.stderr}"]
    t1 = time.monotonic()
    cp.kubectl("apply", "-n", NS, "-f", str(repo / "deploy/examples/digits.yaml"), check=True)
    selectors: list[str] = []
    while time.monotonic() - t1 < 300 and not selectors:
        time.sleep(2)
        selectors = _ready_ips(cp, "fedfleet.dev/job=digits,fedfleet.dev/role=selector")
        job = _json(cp, "get", "fljob", "digits", "-n", NS) or {}
        bad = [
            c
            for c in job.get("status", {}).get("conditions", [])
            if c.get("type") == "Invalid" and c.get("status") == "True"
        ]
        if bad or job.get("status", {}).get("state") == "InvalidSpec":
            events = cp.kubectl("get", "events", "-n", NS, "--field-selector=reason=InvalidSpec")
            return [
                "the operator refused the FLJob (InvalidSpec): are the images older than "
                f"{repo}'s chart and CRD? {json.dumps(bad)} {events.stdout.strip()[-600:]}"
            ]
    if not selectors:
        return ["no selector pod became ready in 300 s"]
    print(f"digits actors ready {time.monotonic() - t1:.1f} s after apply; selectors {selectors}")
    print(cp.kubectl("get", "pods", "-n", NS, "-o", "wide").stdout)
    services = next(n for n in images.archives if "/services:" in n)
    job_yaml = (repo / "deploy/examples/digits.yaml").read_text()
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "fleet"},
        "data": {"job.yaml": job_yaml, "fleet.py": FLEET_SCRIPT},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "fleet"},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsUser": 65534, "runAsGroup": 65534, "runAsNonRoot": True},
            "volumes": [{"name": "fleet", "configMap": {"name": "fleet"}}],
            "containers": [
                {
                    "name": "fleet",
                    "image": services,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "/fleet/fleet.py"],
                    "env": [
                        {"name": "JOB", "value": "digits"},
                        {"name": "NS", "value": NS},
                        {"name": "SELECTORS", "value": ",".join(selectors)},
                        {
                            "name": "JOB_SECRET",
                            "valueFrom": {
                                "secretKeyRef": {"name": "digits-secret", "key": "job-secret"}
                            },
                        },
                    ],
                    "volumeMounts": [{"name": "fleet", "mountPath": "/fleet"}],
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                    },
                }
            ],
        },
    }
    for obj in (cm, pod):
        cp.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(obj), check=True)
    t2 = time.monotonic()
    status: dict[str, Any] = {}
    last_print = 0.0
    while time.monotonic() - t2 < timeout:
        job = _json(cp, "get", "fljob", "digits", "-n", NS) or {}
        status = job.get("status", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        if time.monotonic() - last_print > 60:
            last_print = time.monotonic()
            print(
                f"  {time.monotonic() - t2:.0f} s: round {status.get('round')} "
                f"phase {status.get('phase')} accuracy {status.get('accuracy')}"
            )
        time.sleep(5)
    print(cp.kubectl("get", "fljobs", "-n", NS).stdout)
    print(f"digits: {status.get('phase')} in {time.monotonic() - t2:.0f} s of fleet")
    failures = []
    if status.get("phase") != "Succeeded" or status.get("round") != 50:
        logs = cp.kubectl("logs", "-n", NS, "fleet", "--tail=20").stdout
        failures.append(f"digits did not succeed: {json.dumps(status)[:600]}\nfleet log:\n{logs}")
    cp.kubectl("delete", "pod", "fleet", "-n", NS, "--grace-period=1", "--wait=false")
    return failures
