"""The real-node smoke run (``python -m tests.cluster.realnode --smoke``): not a pytest test,
a script that starts a control plane and a real node, shows the node Ready on containerd, runs
pods from the services image as uid 65534 with a read-only root, checks a Service ClusterIP and
cluster DNS from inside a pod, then stops everything and shows the host as it was (iptables-save,
``nft list ruleset`` and the watched sysctls, before and after). Exit status 0 only if all of it
held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from tests.cluster.controlplane import ControlPlane, ControlPlaneError
from tests.cluster.hoststate import STATE_FILE, HostStateError, acquire_host_lock, repair_host
from tests.cluster.realnode import BRIDGE, NodeImages, RealNode, RealNodeError, host_ip

__all__ = ["main", "smoke"]

WATCHED_SYSCTLS = (
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
    "net.ipv4.ip_forward",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)

WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      securityContext: {runAsUser: 65534, runAsGroup: 65534, runAsNonRoot: true}
      containers:
      - name: web
        image: IMAGE
        imagePullPolicy: Never
        command: [python3, -c]
        args:
        - |
          import http.server, os, socket
          class H(http.server.BaseHTTPRequestHandler):
              def do_GET(self):
                  body = f"hello from {socket.gethostname()}".encode()
                  self.send_response(200); self.end_headers(); self.wfile.write(body)
          http.server.HTTPServer(("", 8080), H).serve_forever()
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 2}
        resources: {limits: {memory: 256Mi, cpu: 500m}}
        securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""

CLIENT = """
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: Never
  securityContext: {runAsUser: 65534, runAsGroup: 65534, runAsNonRoot: true}
  containers:
  - name: client
    image: IMAGE
    imagePullPolicy: Never
    command: [python3, -c]
    args:
    - |
      import json, os, socket, urllib.request
      out = {"uid": os.getuid()}
      try:
          open("/probe", "w")
          out["rootfs"] = "writable"
      except OSError as exc:
          out["rootfs"] = f"errno {exc.errno}"
      out["dns"] = socket.gethostbyname("web.default.svc.cluster.local")
      out["dns_kubernetes"] = socket.gethostbyname("kubernetes.default")
      seen = set()
      for i in range(30):
          url = "http://web/" if i % 2 else f"http://{os.environ['WEB_SERVICE_HOST']}/"
          seen.add(urllib.request.urlopen(url, timeout=10).read().decode())
      out["backends"] = sorted(seen)
      print(json.dumps(out))
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
"""


def _host_view() -> dict[str, str]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    view = {"iptables-save": _strip_comments(run("iptables-save"))}
    view["ip6tables-save"] = _strip_comments(run("ip6tables-save"))
    view["nft list ruleset"] = run("nft", "list", "ruleset")
    for key in WATCHED_SYSCTLS:
        view[key] = run("sysctl", "-n", key).strip()
    view["links"] = " ".join(sorted(os.listdir("/sys/class/net")))
    return view


def _strip_comments(text: str) -> str:
    # iptables-save stamps its output with the time; only the rules matter.
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def _wait(what: str, check: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(1)
    raise RealNodeError(f"timed out after {timeout} s waiting for {what}")


def smoke() -> int:
    images = NodeImages.load()
    services = next(n for n in images.archives if "/services:" in n)
    before = _host_view()
    print(
        "host before:",
        json.dumps(before["nft list ruleset"]),
        {k: before[k] for k in WATCHED_SYSCTLS},
    )
    failures: list[str] = []
    t0 = time.monotonic()
    with ControlPlane(advertise_address=host_ip()) as cp:
        print(f"control plane up in {time.monotonic() - t0:.1f} s: {cp.server}")
        node = RealNode(cp, images=images)
        try:
            node.start()
            print(
                "node startup (s from start):",
                json.dumps({k: round(v, 1) for k, v in node.startup_seconds.items()}),
            )
            print(cp.kubectl("get", "nodes", "-o", "wide").stdout)
            wide = cp.kubectl(
                "get", "nodes", "-o", "jsonpath={.items[0].status.nodeInfo.containerRuntimeVersion}"
            ).stdout
            if not wide.startswith("containerd://"):
                failures.append(f"runtime is {wide!r}, not containerd")
            cp.kubectl("apply", "-f", "-", input=WEB.replace("IMAGE", services), check=True)
            took = _wait(
                "web ready",
                lambda: (
                    cp.kubectl(
                        "get", "deploy", "web", "-o", "jsonpath={.status.readyReplicas}"
                    ).stdout
                    == "2"
                ),
                240,
            )
            print(f"web: 2/2 pods ready {took:.1f} s after apply")
            # Both in the Service's EndpointSlice before the client runs (readyReplicas can
            # come first), then one kube-proxy sync.
            _wait(
                "2 ready web endpoints",
                lambda: (
                    cp.kubectl(
                        "get",
                        "endpointslices",
                        "-l",
                        "kubernetes.io/service-name=web",
                        "-o",
                        "jsonpath={.items[*].endpoints[?(@.conditions.ready==true)].addresses[0]}",
                    ).stdout.count(".")
                    == 6
                ),
                60,
            )
            time.sleep(2)
            cp.kubectl("apply", "-f", "-", input=CLIENT.replace("IMAGE", services), check=True)
            phase = ""

            def client_done() -> bool:
                nonlocal phase
                phase = cp.kubectl("get", "pod", "client", "-o", "jsonpath={.status.phase}").stdout
                return phase in ("Succeeded", "Failed")

            _wait("client pod to finish", client_done, 180)
            logs = cp.kubectl("logs", "client").stdout.strip()
            print(f"client pod {phase}: {logs}")
            print(cp.kubectl("get", "pods,svc", "-o", "wide").stdout)
            if phase != "Succeeded":
                failures.append(f"client pod {phase}: {logs}")
            else:
                got = json.loads(logs.splitlines()[-1])
                svc_ip = cp.kubectl("get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}").stdout
                if got["uid"] != 65534:
                    failures.append(f"uid {got['uid']}")
                if got["rootfs"] != "errno 30":
                    failures.append(f"root fs {got['rootfs']} (want EROFS, errno 30)")
                if got["dns"] != svc_ip:
                    failures.append(f"DNS web -> {got['dns']}, ClusterIP {svc_ip}")
                if len(got["backends"]) != 2:
                    failures.append(f"backends {got['backends']}: want both web pods")
        except BaseException as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            for name in RealNode.COMPONENTS:
                print(f"--- {name} log tail ---\n{node.log_tail(name, 15)}", file=sys.stderr)
        finally:
            t_stop = time.monotonic()
            node.stop()
            print(f"node stopped and host restored in {time.monotonic() - t_stop:.1f} s")
            for line in node.restored:
                print("  restore:", line)
    after = _host_view()
    for key in before:
        if before[key] != after[key]:
            failures.append(f"host {key} differs after teardown: {before[key]!r} -> {after[key]!r}")
    print("host diff (HostSnapshot.diff):", node.host_diff or "none")
    failures += [f"host: {d}" for d in node.host_diff]
    print("host after == before for:", ", ".join(k for k in before if before[k] == after[k]))
    if failures:
        print("SMOKE FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("SMOKE OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.realnode", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--smoke", action="store_true", help="start a cluster, check it, stop")
    group.add_argument("--cleanup", action="store_true", help="repair a host a killed run left")
    args = parser.parse_args(argv)
    if args.cleanup:
        try:
            with acquire_host_lock():
                if not STATE_FILE.exists():
                    print("nothing to repair")
                    return 0
                for line in repair_host(BRIDGE):
                    print(line)
                return 0
        except HostStateError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    try:
        return smoke()
    except (RealNodeError, ControlPlaneError, HostStateError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
