"""A node agent for the test cluster: a tiny kubelet that runs pods as local processes.

Run as a process (what ``NodeAgent`` does)::

    python tests/cluster/nodeagent.py --kubeconfig admin.kubeconfig --node-name node-0 \\
        --state-dir /tmp/agent [--path-prefix /work/main/.venv/bin] [--max-backoff 10]

It registers a Node (Ready, big capacity, InternalIP 127.0.0.1) and renews its Lease in
kube-node-lease, watches the pods bound to it and the Services of the cluster, and for each pod:

* gives it a loopback IP 127.0.0.x (from 127.0.0.10 up, distinct per pod, freed on deletion);
* materializes its volumes (emptyDir, configMap, secret, downwardAPI, hostPath, projected incl.
  the service-account token from a TokenRequest bound to the pod) under the state dir;
* runs each container's command/args (``$(VAR)`` expanded like the kubelet) with the
  environment the kubelet would build (env, envFrom, fieldRef, resourceFieldRef,
  configMapKeyRef, secretKeyRef, Service env vars) through ``podexec.py``: a private mount and
  UTS namespace with each volume and a per-pod ``/etc/hosts`` bind-mounted in place, hostname =
  the pod's, runAsUser/runAsGroup/fsGroup/supplementalGroups, runAsNonRoot (refused as root),
  readOnlyRootFilesystem (``/`` remounted read-only; volumes keep their mode),
  allowPrivilegeEscalation: false (no_new_privs), workingDir; ``command[0]`` is looked up in
  the container's PATH, which starts with ``--path-prefix`` (the repo's venv), then /usr/bin;
* runs startup/readiness/liveness probes (httpGet, tcpSocket, exec), restarts containers per
  restartPolicy with exponential back-off, and PATCHes the pod status (phase, IPs, conditions,
  container statuses);
* on deletion: SIGTERM to the process group, SIGKILL after the grace period (capped), then
  deletes the pod object with gracePeriodSeconds=0, as the kubelet does.

Services: Kubernetes refuses loopback Endpoints, so the agent owns a loopback address per
ClusterIP Service (127.0.1.x, then 127.0.2.x) and runs a userspace TCP proxy on each Service
port there, forwarding round-robin to the READY pods that match the selector. Those addresses are
what ``<SVC>_SERVICE_HOST`` gives, and what the Service's DNS names resolve to through each pod's
``/etc/hosts`` (``svc``, ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.cluster.local``); the
ClusterIP itself (10.0.0.x) is not reachable. ``KUBERNETES_SERVICE_HOST/PORT`` point at the real
apiserver; ``kubernetes.default.svc`` resolves to a proxy on port 443 in front of it.

Logs: ``<state>/agent.log`` (the agent), ``<state>/logs/<ns>_<pod>_<uid>/<container>/<n>.log``
(stdout+stderr of restart n, like /var/log/pods). The agent also serves the kubelet's
``/containerLogs`` endpoint over HTTPS on 127.0.0.1 so ``kubectl logs`` works.

Where this differs from a kubelet (containers share the host's filesystem):

* The image is ignored (logged); a container without ``command`` cannot run. With
  restartPolicy Never the pod fails (phase Failed, reason ``NoCommand``); otherwise the
  container stays Waiting with reason ``NoCommand`` (a Failed pod would make its ReplicaSet
  create replacements at ~10 pods/s).
* What containers run from (the repo, its venv, the Python it points into) stays visible: a
  volume mounted above it (an emptyDir at /tmp over a checkout in /tmp) gets those paths
  bound back on top; a mountPath equal to one of them is a CreateContainerConfigError.
  Missing mount points are created on the host and removed again (if still empty) when the
  agent exits.
* Non-root containers: directories others cannot traverse on the way to the interpreter
  (e.g. /root holding pyenv's Python) are covered with an empty tmpfs in the container's mount
  namespace and only the needed subtree is bind-mounted back.
* No PID/network namespaces: all pods share the host's loopback. Containers are killed by
  process group; a child that starts its own session escapes that, and if the agent itself is
  SIGKILLed only each container's main process dies with it (PR_SET_PDEATHSIG).
* Not implemented: capabilities, lifecycle hooks, grpc probes, ``kubectl exec``/``attach``/
  ``port-forward``, resource limits, image pulls, PersistentVolumeClaims.

Only loopback addresses are ever bound or dialled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import math
import os
import platform
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

__all__ = ["DEFAULT_PATH_PREFIX", "NodeAgent", "NodeAgentError", "main"]

log = logging.getLogger("nodeagent")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH_PREFIX = str(REPO / ".venv" / "bin")
PODEXEC = str(Path(__file__).resolve().with_name("podexec.py"))
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
AGENT_VERSION = "fedfleet-agent://0.1"
Obj = dict[str, Any]


class NodeAgentError(RuntimeError):
    """The agent process failed to start or died."""


# == small helpers =================================================================================


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (third_party/forked/golang/expansion): ``$$`` is an
    escaped ``$``, an unknown ``$(VAR)`` stays as it is, an unterminated one too."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    n = len(text)
    while cursor < n:
        if text[cursor] == "$" and cursor + 1 < n:
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                end = rest.find(")", 1)
                if end == -1:
                    out.append("$" + rest)
                    advance = len(rest)
                else:
                    name = rest[1:end]
                    value = lookup(name)
                    out.append(value if value is not None else f"$({name})")
                    advance = end + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


_QTY = re.compile(r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
_SUFFIX = {
    None: 1.0,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}


def parse_quantity(q: object) -> float:
    if isinstance(q, int | float):
        return float(q)
    m = _QTY.match(str(q).strip())
    if not m:
        raise ValueError(f"bad quantity {q!r}")
    if m.group(2):
        return float(m.group(1) + m.group(2))
    return float(m.group(1)) * _SUFFIX[m.group(3)]


def write_private(path: Path, text: str) -> None:
    """Write a file only root can read (it holds the container's env, secrets included)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def env_name_of(service_name: str) -> str:
    return service_name.upper().replace("-", "_")


_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class IPPool:
    """Loopback addresses 127.0.<b>.<c> for b in ``blocks``, c in [first, 254]."""

    def __init__(self, blocks: list[int], first: int) -> None:
        self._free = [
            f"127.0.{b}.{c}" for b in blocks for c in range(first if b == blocks[0] else 1, 255)
        ]
        self._free.reverse()
        self._used: set[str] = set()

    def take(self) -> str:
        if not self._free:
            raise RuntimeError("loopback address pool exhausted")
        ip = self._free.pop()
        self._used.add(ip)
        return ip

    def give(self, ip: str) -> None:
        if ip in self._used:
            self._used.discard(ip)
            self._free.append(ip)
            self._free.sort(key=lambda a: tuple(int(x) for x in a.split(".")), reverse=True)


# == the API client ================================================================================


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Relist(Exception):
    pass


@dataclasses.dataclass
class KubeConfig:
    server: str
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    token: str | None

    @classmethod
    def load(cls, path: Path, scratch: Path) -> KubeConfig:
        cfg = yaml.safe_load(path.read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        scratch.mkdir(parents=True, exist_ok=True)

        def file_of(obj: Obj, key: str) -> str | None:
            if obj.get(key):
                p = Path(obj[key])
                return str(p if p.is_absolute() else path.parent / p)
            if obj.get(key + "-data"):
                out = scratch / key
                out.write_bytes(base64.b64decode(obj[key + "-data"]))
                out.chmod(0o600)
                return str(out)
            return None

        return cls(
            server=str(cluster["server"]).rstrip("/"),
            ca_file=file_of(cluster, "certificate-authority"),
            cert_file=file_of(user, "client-certificate"),
            key_file=file_of(user, "client-key"),
            token=user.get("token"),
        )


class Api:
    def __init__(self, cfg: KubeConfig) -> None:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
        if cfg.cert_file and cfg.key_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        headers = {"User-Agent": "fedfleet-nodeagent/0.1"}
        if cfg.token:
            headers["Authorization"] = f"Bearer {cfg.token}"
        self.cfg = cfg
        self.client = httpx.AsyncClient(
            base_url=cfg.server,
            verify=ctx,
            headers=headers,
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: object = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> Obj | None:
        headers = {"Content-Type": content_type} if body is not None else {}
        content = json.dumps(body).encode() if body is not None else None
        resp = await self.client.request(
            method, path, params=params, content=content, headers=headers
        )
        if resp.status_code == 404 and missing_ok:
            return None
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, resp.text)
        if not resp.content:
            return {}
        data = resp.json()
        return data if isinstance(data, dict) else {}

    async def get(self, path: str, params: dict[str, str] | None = None) -> Obj | None:
        return await self.request("GET", path, params=params, missing_ok=True)

    async def merge_patch(self, path: str, body: Obj) -> Obj | None:
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def reflect(
        self,
        path: str,
        params: dict[str, str],
        handler: Callable[[str, Obj], None],
        synced: asyncio.Event,
    ) -> None:
        """List+watch ``path`` forever (until cancelled): ADDED/MODIFIED/DELETED to handler."""
        known: dict[str, Obj] = {}
        while True:
            try:
                lst = await self.request("GET", path, params=params)
                assert lst is not None
                rv = str(meta(lst).get("resourceVersion", ""))
                fresh = {str(meta(o)["uid"]): o for o in lst.get("items") or []}
                for uid, obj in known.items():
                    if uid not in fresh:
                        handler("DELETED", obj)
                for uid, obj in fresh.items():
                    handler("MODIFIED" if uid in known else "ADDED", obj)
                known = fresh
                synced.set()
                while True:
                    wparams = dict(params)
                    wparams.update(
                        watch="1",
                        resourceVersion=rv,
                        allowWatchBookmarks="true",
                        timeoutSeconds="240",
                    )
                    timeout = httpx.Timeout(30.0, read=300.0)
                    async with self.client.stream(
                        "GET", path, params=wparams, timeout=timeout
                    ) as resp:
                        if resp.status_code == 410:
                            raise Relist
                        if resp.status_code >= 400:
                            raise ApiError(resp.status_code, (await resp.aread()).decode())
                        async for line in resp.aiter_lines():
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            kind, obj = event.get("type"), event.get("object") or {}
                            if kind == "ERROR":
                                if obj.get("code") == 410:
                                    raise Relist
                                raise ApiError(int(obj.get("code") or 500), json.dumps(obj))
                            rv = str(meta(obj).get("resourceVersion", rv))
                            if kind == "BOOKMARK":
                                continue
                            uid = str(meta(obj).get("uid"))
                            if kind == "DELETED":
                                known.pop(uid, None)
                            else:
                                known[uid] = obj
                            handler(str(kind), obj)
            except asyncio.CancelledError:
                raise
            except Relist:
                continue
            except Exception as exc:
                log.warning("watch %s: %s; relisting in 1 s", path, exc)
                await asyncio.sleep(1.0)


# == service proxies ===============================================================================


class ServiceProxy:
    """TCP listeners on one loopback address, one per Service port."""

    def __init__(self, agent: Agent, svc: Obj, ip: str) -> None:
        self.agent = agent
        self.svc = svc
        self.ip = ip
        self.servers: dict[int, asyncio.Server] = {}
        self.rr = 0
        self.conns: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    @property
    def key(self) -> tuple[str, str]:
        return (meta(self.svc)["namespace"], meta(self.svc)["name"])

    def tcp_ports(self) -> list[Obj]:
        return [
            p
            for p in self.svc.get("spec", {}).get("ports") or []
            if p.get("protocol", "TCP") == "TCP"
        ]

    async def sync(self) -> None:
        async with self._lock:
            want = {int(p["port"]): p for p in self.tcp_ports()}
            for port in list(self.servers):
                if port not in want:
                    self.servers.pop(port).close()
            for port in want:
                if port in self.servers:
                    continue
                try:
                    server = await asyncio.start_server(
                        functools.partial(_proxy_conn, self, port=port),
                        host=self.ip,
                        port=port,
                        reuse_address=True,
                    )
                except OSError as exc:
                    log.error(
                        "service %s/%s: cannot listen on %s:%s: %s", *self.key, self.ip, port, exc
                    )
                    continue
                self.servers[port] = server
                log.info("service %s/%s: proxy %s:%s", *self.key, self.ip, port)

    async def close(self) -> None:
        async with self._lock:
            for server in self.servers.values():
                server.close()
            self.servers.clear()
        for task in list(self.conns):
            task.cancel()

    def backend(self, port: int) -> tuple[str, int] | None:
        spec_port = next((p for p in self.tcp_ports() if int(p["port"]) == port), None)
        if spec_port is None:
            return None
        return self.agent.pick_backend(self, spec_port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _proxy_conn(
    proxy: ServiceProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, port: int
) -> None:
    upstream_w: asyncio.StreamWriter | None = None
    task = asyncio.current_task()
    if task is not None:
        proxy.conns.add(task)
        task.add_done_callback(proxy.conns.discard)
    try:
        backend = proxy.backend(port)
        if backend is None:
            log.info("service %s/%s:%s: no ready endpoint", *proxy.key, port)
            return
        upstream_r, up_w = await asyncio.wait_for(asyncio.open_connection(*backend), 5.0)
        upstream_w = up_w
        await asyncio.gather(_pipe(reader, up_w), _pipe(upstream_r, writer))
    except (OSError, TimeoutError) as exc:
        log.info("service %s/%s:%s: %s", *proxy.key, port, exc)
    finally:
        for w in (writer, upstream_w):
            if w is not None:
                w.close()


# == pods ==========================================================================================


class ConfigError(Exception):
    """CreateContainerConfigError: a referenced ConfigMap/Secret/key is missing, etc."""


class VolumeError(Exception):
    """A volume cannot be set up (missing source, unsupported type)."""


class NoCommand(Exception):
    pass


def private_covers(paths: list[str]) -> list[dict[str, Any]]:
    """For each path a non-root container needs (the interpreter, the venv, the repo): every
    ancestor directory that others cannot traverse (e.g. /root, 0700, holding pyenv's Python),
    with the child paths to re-expose below it. podexec covers those directories with a tmpfs."""
    covers: dict[str, set[str]] = {}
    for raw in paths:
        p = Path(os.path.realpath(raw))
        parts = p.parts
        for i in range(1, len(parts)):
            d = Path(*parts[:i])
            try:
                mode = d.stat().st_mode
            except OSError:
                break
            if not mode & 0o001:
                covers.setdefault(str(d), set()).add(str(Path(*parts[: i + 1])))
    return [
        {"cover": c, "keep": sorted(k)}
        for c, k in sorted(covers.items(), key=lambda kv: kv[0].count("/"))
    ]


@dataclasses.dataclass
class Launch:
    path: str | None  # None: executable not found
    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int | None
    gid: int | None
    groups: list[int]
    mounts: list[dict[str, Any]]
    expose: list[dict[str, Any]]
    read_only_root: bool
    no_new_privs: bool


class Container:
    """One container (or init container) of a pod and its restart loop."""

    def __init__(self, pod: PodRuntime, spec: Obj, *, init: bool) -> None:
        self.pod = pod
        self.spec = spec
        self.name = str(spec["name"])
        self.init = init
        self.restart_count = 0
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Obj = {}
        self.ready = False
        self.started = False
        self.pid: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.done = False  # terminal: will not run again
        self.exit_code: int | None = None
        self.env: dict[str, str] = {}
        self.launch: Launch | None = None
        self._kill_reason: str | None = None
        self._probe_tasks: list[asyncio.Task[None]] = []

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> Obj:
        st: Obj = {
            "name": self.name,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "image": self.spec.get("image", ""),
            "imageID": f"{AGENT_VERSION}/image/{self.spec.get('image', '')}",
            "started": self.started,
        }
        if self.pid is not None:
            st["containerID"] = f"fedfleet-agent://{self.pid}"
        return st

    def _set(self, state: Obj) -> None:
        self.state = state
        self.pod.dirty()

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        agent = self.pod.agent
        backoff = agent.initial_backoff
        while not self.pod.stopping:
            try:
                launch = await self.pod.build_launch(self)
            except ConfigError as exc:
                self._set(
                    {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                )
                self.pod.event("Warning", "Failed", f"Error: {exc}", self.name)
                await self.pod.sleep(2.0)
                continue
            except NoCommand as exc:
                self.pod.event("Warning", "NoCommand", str(exc), self.name)
                if self.pod.spec.get("restartPolicy", "Always") != "Never":
                    # Failing the pod would make a ReplicaSet replace it at once, forever (~10
                    # pods/s here): stay Waiting instead, like CreateContainerConfigError.
                    self._set({"waiting": {"reason": "NoCommand", "message": str(exc)}})
                    self.done = True
                    return
                ts = now_rfc3339()
                self.exit_code = 127
                self._set(
                    {
                        "terminated": {
                            "exitCode": 127,
                            "reason": "NoCommand",
                            "message": str(exc),
                            "startedAt": ts,
                            "finishedAt": ts,
                        }
                    }
                )
                self.done = True
                self.pod.fail("NoCommand", str(exc))
                return
            started_at = now_rfc3339()
            t0 = time.monotonic()
            if launch.path is None:
                msg = (
                    f'exec: "{launch.argv[0]}": executable file not found in $PATH '
                    f"(PATH={launch.env.get('PATH', '')})"
                )
                rc, reason = 128, "StartError"
                self.pod.event("Warning", "Failed", f"Error: {msg}", self.name)
                self.exit_code = rc
                self._set(
                    {
                        "terminated": {
                            "exitCode": rc,
                            "reason": reason,
                            "message": msg,
                            "startedAt": started_at,
                            "finishedAt": now_rfc3339(),
                        }
                    }
                )
            else:
                rc = await self._run_once(launch, started_at)
            if self.pod.stopping:
                self.done = True
                return
            if not self._should_restart(rc):
                self.done = True
                self.pod.dirty()
                return
            if time.monotonic() - t0 > 60:
                backoff = agent.initial_backoff
            self.last_state = self.state
            msg = (
                f"back-off {backoff:g}s restarting failed container={self.name} pod={self.pod.name}"
            )
            self._set({"waiting": {"reason": "CrashLoopBackOff", "message": msg}})
            self.pod.event(
                "Warning", "BackOff", f"Back-off restarting failed container {self.name}", self.name
            )
            await self.pod.sleep(backoff)
            backoff = min(backoff * 2, agent.max_backoff)
            if self.pod.stopping:
                self.done = True
                return
            self.restart_count += 1

    def _should_restart(self, rc: int) -> bool:
        policy = self.pod.spec.get("restartPolicy", "Always")
        if self.init:
            return rc != 0 and policy != "Never"
        if policy == "Always":
            return True
        if policy == "OnFailure":
            return rc != 0
        return False

    async def _run_once(self, launch: Launch, started_at: str) -> int:
        agent = self.pod.agent
        log_dir = self.pod.log_dir / self.name
        log_dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.pod.dir / f".exec-{self.name}-{uuid.uuid4().hex[:8]}.json"
        write_private(
            spec_path,
            json.dumps(
                {
                    "path": launch.path,
                    "argv": launch.argv,
                    "env": launch.env,
                    "cwd": launch.cwd,
                    "uid": launch.uid,
                    "gid": launch.gid,
                    "groups": launch.groups,
                    "hostname": self.pod.hostname,
                    "mounts": launch.mounts,
                    "expose": launch.expose,
                    "read_only_root": launch.read_only_root,
                    "no_new_privs": launch.no_new_privs,
                    "agent_pid": os.getpid(),
                }
            ),
        )
        self._kill_reason = None
        with (log_dir / f"{self.restart_count}.log").open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                agent.python,
                "-I",
                "-S",
                PODEXEC,
                str(spec_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self.launch = launch
        image = self.spec.get("image", "")
        log.info(
            "pod %s container %s: started pid %s (image %r ignored): %s",
            self.pod.key,
            self.name,
            self.pid,
            image,
            launch.argv,
        )
        self.pod.event(
            "Normal", "Started", f"Started container {self.name} (pid {self.pid})", self.name
        )
        self._set({"running": {"startedAt": started_at}})
        self._start_probes()
        rc_raw = await self.proc.wait()
        for task in self._probe_tasks:
            task.cancel()
        self._probe_tasks.clear()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the rest of the group dies with its leader
        self.ready = False
        self.started = False
        rc = rc_raw if rc_raw >= 0 else 128 - rc_raw
        self.exit_code = rc
        reason = "Completed" if rc == 0 else "Error"
        term: Obj = {
            "exitCode": rc,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"fedfleet-agent://{self.pid}",
        }
        if rc_raw < 0:
            term["signal"] = -rc_raw
        if self._kill_reason:
            term["message"] = self._kill_reason
        log.info("pod %s container %s: pid %s exited %s", self.pod.key, self.name, self.pid, rc)
        self._set({"terminated": term})
        self.proc = None
        return rc

    async def stop(self, grace: float, reason: str = "") -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; returns when it is gone."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        self._kill_reason = reason or None
        pid = proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=max(grace, 0.0))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=10.0)

    # -- probes ---------------------------------------------------------------------------------

    def _start_probes(self) -> None:
        startup = self.spec.get("startupProbe")
        if self.init:
            self.started = False
            return
        if startup:
            self._probe_tasks.append(asyncio.create_task(self._probe_loop("startup", startup)))
        else:
            self._after_startup()

    def _after_startup(self) -> None:
        self.started = True
        readiness = self.spec.get("readinessProbe")
        liveness = self.spec.get("livenessProbe")
        if readiness:
            self._probe_tasks.append(asyncio.create_task(self._probe_loop("readiness", readiness)))
        else:
            self.ready = True
        if liveness:
            self._probe_tasks.append(asyncio.create_task(self._probe_loop("liveness", liveness)))
        self.pod.dirty()

    async def _probe_loop(self, kind: str, probe: Obj) -> None:
        delay = float(probe.get("initialDelaySeconds") or 0)
        period = max(float(probe.get("periodSeconds") or 10), 1.0)
        timeout = max(float(probe.get("timeoutSeconds") or 1), 1.0)
        need_ok = int(probe.get("successThreshold") or 1)
        need_fail = int(probe.get("failureThreshold") or 3)
        oks = fails = 0
        await asyncio.sleep(delay)
        while self.proc is not None and self.proc.returncode is None:
            ok, detail = await self._probe_once(probe, timeout)
            if ok:
                oks, fails = oks + 1, 0
            else:
                oks, fails = 0, fails + 1
                self.pod.event(
                    "Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {detail}", self.name
                )
            if kind == "readiness":
                if ok and oks >= need_ok and not self.ready:
                    self.ready = True
                    self.pod.dirty()
                elif not ok and fails >= need_fail and self.ready:
                    self.ready = False
                    self.pod.dirty()
            elif not ok and fails >= need_fail:
                msg = f"Container {self.name} failed {kind} probe, will be restarted"
                log.info("pod %s: %s (%s)", self.pod.key, msg, detail)
                self.pod.event("Normal", "Killing", msg, self.name)
                grace = probe.get("terminationGracePeriodSeconds")
                await self.stop(self.pod.grace_seconds(grace), msg)
                return
            elif kind == "startup" and ok:
                self._after_startup()
                return
            await asyncio.sleep(period)

    def _port(self, port: object) -> int:
        if isinstance(port, int):
            return port
        if str(port).isdigit():
            return int(str(port))
        for p in self.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    async def _probe_once(self, probe: Obj, timeout: float) -> tuple[bool, str]:
        try:
            if "httpGet" in probe:
                hg = probe["httpGet"]
                host = hg.get("host") or self.pod.ip
                scheme = str(hg.get("scheme") or "HTTP").lower()
                path = hg.get("path") or "/"
                if not path.startswith("/"):
                    path = "/" + path
                url = f"{scheme}://{host}:{self._port(hg.get('port'))}{path}"
                headers = {"User-Agent": "kube-probe/1.35", "Accept": "*/*"}
                headers.update({h["name"]: h["value"] for h in hg.get("httpHeaders") or []})
                resp = await self.pod.agent.probe_client.get(url, headers=headers, timeout=timeout)
                if 200 <= resp.status_code < 400:
                    return True, ""
                return False, f"HTTP probe failed with statuscode: {resp.status_code}"
            if "tcpSocket" in probe:
                ts = probe["tcpSocket"]
                host = ts.get("host") or self.pod.ip
                _, w = await asyncio.wait_for(
                    asyncio.open_connection(host, self._port(ts.get("port"))), timeout
                )
                w.close()
                return True, ""
            if "exec" in probe:
                return await self._exec_probe(list(probe["exec"].get("command") or []), timeout)
            return False, "unsupported probe type (grpc is not implemented by the node agent)"
        except (httpx.HTTPError, OSError, TimeoutError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"

    async def _exec_probe(self, command: list[str], timeout: float) -> tuple[bool, str]:
        launch, pid = self.launch, self.pid
        if launch is None or pid is None or not command:
            return False, "container not running"
        path = self.pod.agent.which(command[0], launch.env.get("PATH", ""))
        if path is None:
            return False, f"exec: {command[0]!r}: executable file not found in $PATH"
        spec_path = self.pod.dir / f".probe-{uuid.uuid4().hex[:8]}.json"
        write_private(
            spec_path,
            json.dumps(
                {
                    "path": path,
                    "argv": command,
                    "env": launch.env,
                    "cwd": launch.cwd,
                    "uid": launch.uid,
                    "gid": launch.gid,
                    "groups": launch.groups,
                    "join_pid": pid,
                    "agent_pid": os.getpid(),
                }
            ),
        )
        proc = await asyncio.create_subprocess_exec(
            self.pod.agent.python,
            "-I",
            "-S",
            PODEXEC,
            str(spec_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return False, f"command timed out after {timeout:g}s"
        finally:
            spec_path.unlink(missing_ok=True)
        if proc.returncode == 0:
            return True, ""
        return False, f"exit code {proc.returncode}: {out.decode(errors='replace')[-300:]}"


class PodRuntime:
    """Everything the agent does for one pod."""

    def __init__(self, agent: Agent, pod: Obj) -> None:
        self.agent = agent
        self.pod = pod
        m = meta(pod)
        self.uid = str(m["uid"])
        self.namespace = str(m["namespace"])
        self.name = str(m["name"])
        self.key = f"{self.namespace}/{self.name}"
        self.spec: Obj = pod.get("spec") or {}
        self.hostname = str(self.spec.get("hostname") or self.name)[:63]
        self.ip = agent.pod_ips.take()
        self.dir = agent.state_dir / "pods" / self.uid
        self.vol_dir = self.dir / "volumes"
        self.log_dir = agent.logs_dir / f"{self.namespace}_{self.name}_{self.uid}"
        self.hosts_file = self.dir / "etc-hosts"
        self.start_time = now_rfc3339()
        self.init_containers = [
            Container(self, c, init=True) for c in self.spec.get("initContainers") or []
        ]
        self.containers = [
            Container(self, c, init=False) for c in self.spec.get("containers") or []
        ]
        self.initialized = not self.init_containers
        self.terminating = False
        self.failed: tuple[str, str] | None = None
        self.phase = "Pending"
        self.conditions: dict[str, Obj] = {}
        self._dirty = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_status: Obj | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._tokens: dict[str, tuple[str, float]] = {}  # cache key -> (token, refresh at)
        self.gone = False  # the pod object no longer exists
        self._events: dict[str, float] = {}

    # -- small things -----------------------------------------------------------------------------

    def dirty(self) -> None:
        self._dirty.set()

    @property
    def stopping(self) -> bool:
        """Terminating, or failed: no container starts again."""
        return self.terminating or self.failed is not None

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake as soon as the pod starts terminating."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def event(self, type_: str, reason: str, message: str, container: str | None = None) -> None:
        key = f"{reason}|{container}|{message}"
        now = time.monotonic()
        if now - self._events.get(key, -1e9) < 30.0:  # the same event at most every 30 s
            return
        self._events[key] = now
        self.agent.event(self.pod, type_, reason, message, container)

    def fail(self, reason: str, message: str) -> None:
        """Make the pod Failed: its other containers are stopped and none restarts."""
        if self.failed is None:
            self.failed = (reason, message)
            self._wake.set()
            log.info("pod %s: failed: %s: %s", self.key, reason, message)
            self.agent.spawn(
                asyncio.gather(*(c.stop(self.grace_seconds(), reason) for c in self.containers))
            )
        self.dirty()

    def grace_seconds(self, override: object = None) -> float:
        m = meta(self.pod)
        grace = override
        if grace is None:
            grace = m.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.spec.get("terminationGracePeriodSeconds", 30)
        return min(float(str(grace)), self.agent.max_grace)

    def update(self, pod: Obj) -> None:
        self.pod = pod
        if meta(pod).get("deletionTimestamp") and not self.terminating:
            self._tasks.append(asyncio.create_task(self.terminate(delete=True)))

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o711)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._tasks.append(asyncio.create_task(self._status_loop()))
        self._tasks.append(asyncio.create_task(self._main()))
        log.info("pod %s (%s): accepted, ip %s", self.key, self.uid, self.ip)

    # -- main flow --------------------------------------------------------------------------------

    async def _main(self) -> None:
        try:
            self.dirty()
            while not self.terminating:
                try:
                    await self.setup_volumes()
                    self.write_hosts()
                    break
                except VolumeError as exc:
                    msg = f"MountVolume.SetUp failed: {exc}"
                    log.warning("pod %s: %s", self.key, msg)
                    self.event("Warning", "FailedMount", msg)
                    for c in self.init_containers[:1] or self.containers:
                        c.state = {"waiting": {"reason": "ContainerCreating", "message": msg}}
                    self.dirty()
                    await self.sleep(2.0)
            self._tasks.append(asyncio.create_task(self._refresh_loop()))
            for c in self.init_containers:
                if self.terminating:
                    return
                await c.run()
                if c.exit_code != 0:
                    if not self.terminating:
                        self.fail(
                            "Failed", f"init container {c.name} failed with exit code {c.exit_code}"
                        )
                    return
            self.initialized = True
            self.dirty()
            if self.terminating or self.failed:
                return
            await asyncio.gather(*(c.run() for c in self.containers))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("pod %s: agent error", self.key)
            self.fail("AgentError", f"node agent error: {exc}")
        finally:
            self.dirty()

    async def terminate(self, *, delete: bool, grace: float | None = None) -> None:
        """Stop every container (SIGTERM, grace, SIGKILL); then delete the pod object."""
        if self.terminating:
            return
        self.terminating = True
        self._wake.set()
        g = self.grace_seconds() if grace is None else grace
        log.info("pod %s: terminating (grace %.0f s)", self.key, g)
        await asyncio.gather(
            *(c.stop(g, "pod terminating") for c in self.init_containers + self.containers)
        )
        self.dirty()
        if delete and not self.gone:
            # let the final container states reach the API first (best effort)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_status(), 5.0)
            try:
                await self.agent.api.request(
                    "DELETE",
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                    body={
                        "kind": "DeleteOptions",
                        "apiVersion": "v1",
                        "gracePeriodSeconds": 0,
                        "preconditions": {"uid": self.uid},
                    },
                    missing_ok=True,
                )
                log.info("pod %s: deleted", self.key)
            except ApiError as exc:
                if exc.status != 409:  # 409: uid precondition failed: another pod now
                    log.warning("pod %s: delete failed: %s", self.key, exc)
        self.agent.forget(self)

    async def cleanup(self) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.agent.pod_ips.give(self.ip)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- status -----------------------------------------------------------------------------------

    def _condition(self, type_: str, status: bool, reason: str = "", message: str = "") -> Obj:
        value = "True" if status else "False"
        old = self.conditions.get(type_)
        cond: Obj = {
            "type": type_,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"]
            if old and old["status"] == value
            else now_rfc3339(),
        }
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        self.conditions[type_] = cond
        return cond

    def _compute_phase(self) -> str:
        if self.phase in ("Succeeded", "Failed"):
            return self.phase
        if self.failed is not None:
            return "Failed"
        if not self.initialized:
            return "Pending"
        policy = self.spec.get("restartPolicy", "Always")
        running = waiting = stopped = succeeded = 0
        for c in self.containers:
            if "running" in c.state:
                running += 1
            elif "terminated" in c.state:
                stopped += 1
                if c.state["terminated"].get("exitCode") == 0:
                    succeeded += 1
            elif c.last_state.get("terminated"):
                stopped += 1
            else:
                waiting += 1
        if self.terminating and not running and all(c.proc is None for c in self.containers):
            # like the kubelet (>= 1.27): a deleted pod ends in a terminal phase
            ok = stopped == succeeded == len(self.containers)
            return "Succeeded" if ok else "Failed"
        if waiting:
            return "Pending"
        if running:
            return "Running"
        if stopped:
            if not all(c.done for c in self.containers):
                return "Running"
            if policy == "Always":
                return "Running"
            if stopped == succeeded:
                return "Succeeded"
            if policy == "Never":
                return "Failed"
            return "Running"
        return "Pending"

    def compute_status(self) -> Obj:
        self.phase = self._compute_phase()
        terminal = self.phase in ("Succeeded", "Failed")
        not_ready = [c.name for c in self.containers if not c.ready]
        msg = f"containers with unready status: [{' '.join(not_ready)}]" if not_ready else ""
        reason = "PodCompleted" if terminal else ("ContainersNotReady" if not_ready else "")
        init_pending = [c.name for c in self.init_containers if c.exit_code != 0]
        scheduled = next(
            (
                c
                for c in (self.pod.get("status") or {}).get("conditions") or []
                if c.get("type") == "PodScheduled"
            ),
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": self.start_time,
            },
        )
        conditions = [
            self._condition("PodReadyToStartContainers", not terminal),
            self._condition(
                "Initialized",
                self.initialized or terminal,
                "" if self.initialized or terminal else "ContainersNotInitialized",
                ""
                if self.initialized or terminal
                else f"containers with incomplete status: [{' '.join(init_pending)}]",
            ),
            self._condition("Ready", not not_ready and not terminal, reason, msg),
            self._condition("ContainersReady", not not_ready and not terminal, reason, msg),
            scheduled,
        ]
        status: Obj = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
            "initContainerStatuses": [c.status() for c in self.init_containers] or None,
            "reason": self.failed[0] if self.failed else None,
            "message": self.failed[1] if self.failed else None,
        }
        return status

    async def _flush_status(self) -> None:
        status = self.compute_status()
        comparable = json.dumps(status, sort_keys=True)
        if (
            self._last_status is not None
            and json.dumps(self._last_status, sort_keys=True) == comparable
        ):
            return
        await self.agent.api.merge_patch(
            f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
            {"metadata": {"uid": self.uid}, "status": status},
        )
        self._last_status = status

    async def _status_loop(self) -> None:
        while not self.gone:
            await self._dirty.wait()
            self._dirty.clear()
            if self.gone:
                return
            await asyncio.sleep(0.05)  # coalesce bursts
            try:
                await self._flush_status()
            except ApiError as exc:
                if exc.status in (404, 409, 422) and self.terminating:
                    return
                if exc.status == 404:
                    return
                log.warning("pod %s: status update failed: %s", self.key, exc)
                if exc.status == 422:  # invalid: retrying the same status cannot help
                    continue
                await asyncio.sleep(1.0)
                self.dirty()
            except (httpx.HTTPError, OSError) as exc:
                log.warning("pod %s: status update failed: %s", self.key, exc)
                await asyncio.sleep(1.0)
                self.dirty()

    # -- env --------------------------------------------------------------------------------------

    def field(self, path: str) -> str:
        m = meta(self.pod)
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": str(self.spec.get("nodeName", "")),
            "spec.serviceAccountName": str(self.spec.get("serviceAccountName", "")),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        sub = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
        if sub:
            return str((m.get(sub.group(1)) or {}).get(sub.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            items = m.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise ConfigError(f"unsupported fieldRef {path!r}")

    def resource_field(self, ref: Obj, default_container: Container | None) -> str:
        cname = ref.get("containerName") or (default_container.name if default_container else "")
        cspec = next(
            (c.spec for c in self.containers + self.init_containers if c.name == cname), {}
        )
        resource = str(ref["resource"])
        kind, _, res = resource.partition(".")
        resources = cspec.get("resources") or {}
        value = (resources.get(kind) or {}).get(res)
        if value is None and kind == "requests":
            value = (resources.get("limits") or {}).get(res)
        if value is None:
            value = self.agent.allocatable.get(res, "0") if kind == "limits" else "0"
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(max(math.ceil(parse_quantity(value) / divisor), 1 if res == "cpu" else 0))

    async def _get(self, kind: str, name: str, optional: bool) -> Obj | None:
        obj = await self.agent.api.get(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")
        if obj is None and not optional:
            raise ConfigError(f'{kind[:-1]} "{name}" not found')
        return obj

    @staticmethod
    def _data(kind: str, obj: Obj) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if kind == "secrets":
            for k, v in (obj.get("data") or {}).items():
                out[k] = base64.b64decode(v)
            for k, v in (obj.get("stringData") or {}).items():
                out[k] = str(v).encode()
        else:
            for k, v in (obj.get("data") or {}).items():
                out[k] = str(v).encode()
            for k, v in (obj.get("binaryData") or {}).items():
                out[k] = base64.b64decode(v)
        return out

    def service_env(self) -> dict[str, str]:
        agent = self.agent
        env: dict[str, str] = {}
        links = self.spec.get("enableServiceLinks", True) is not False
        for proxy in list(agent.services.values()):
            ns, name = proxy.key
            if (ns, name) == ("default", "kubernetes"):
                continue
            if ns != self.namespace or not links:
                continue
            ports = proxy.tcp_ports()
            if not ports:
                continue
            prefix = env_name_of(name)
            host = proxy.ip
            env[f"{prefix}_SERVICE_HOST"] = host
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
            for p in ports:
                if p.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{env_name_of(p['name'])}"] = str(p["port"])
            first = ports[0]
            env[f"{prefix}_PORT"] = f"tcp://{host}:{first['port']}"
            for p in ports:
                base = f"{prefix}_PORT_{p['port']}_TCP"
                env[base] = f"tcp://{host}:{p['port']}"
                env[f"{base}_PROTO"] = "tcp"
                env[f"{base}_PORT"] = str(p["port"])
                env[f"{base}_ADDR"] = host
        host, port = agent.apiserver_host, str(agent.apiserver_port)
        env.update(
            {
                "KUBERNETES_SERVICE_HOST": host,
                "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
                f"KUBERNETES_PORT_{port}_TCP_PORT": port,
                f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
            }
        )
        return env

    async def build_launch(self, c: Container) -> Launch:
        spec = c.spec
        service_env = self.service_env()
        tmp: dict[str, str] = {}
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix") or ""
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                if key not in src:
                    continue
                ref = src[key]
                obj = await self._get(kind, ref["name"], bool(ref.get("optional")))
                if obj is None:
                    continue
                for k, v in self._data(kind, obj).items():
                    if _ENV_NAME.match(prefix + k):
                        tmp[prefix + k] = v.decode(errors="replace")

        def lookup(name: str) -> str | None:
            if name in tmp:
                return tmp[name]
            return service_env.get(name)

        for var in spec.get("env") or []:
            name = var["name"]
            if var.get("value"):
                tmp[name] = expand(str(var["value"]), lookup)
                continue
            vf = var.get("valueFrom")
            if not vf:
                tmp[name] = ""
                continue
            if "fieldRef" in vf:
                tmp[name] = self.field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                tmp[name] = self.resource_field(vf["resourceFieldRef"], c)
            else:
                for kind, key in (("configmaps", "configMapKeyRef"), ("secrets", "secretKeyRef")):
                    if key not in vf:
                        continue
                    ref = vf[key]
                    optional = bool(ref.get("optional"))
                    obj = await self._get(kind, ref["name"], optional)
                    if obj is None:
                        break
                    data = self._data(kind, obj)
                    if ref["key"] not in data:
                        if optional:
                            break
                        raise ConfigError(
                            f"couldn't find key {ref['key']} in {kind[:-1]} "
                            f"{self.namespace}/{ref['name']}"
                        )
                    tmp[name] = data[ref["key"]].decode(errors="replace")
        env = dict(tmp)
        for key, value in service_env.items():
            env.setdefault(key, value)

        # identity
        psc = self.spec.get("securityContext") or {}
        csc = spec.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root and (uid is None or int(uid) == 0):
            raise ConfigError("container has runAsNonRoot and image will run as root")
        pw = None
        if uid is not None:
            with contextlib.suppress(KeyError):
                pw = pwd.getpwuid(int(uid))
            if gid is None:
                gid = pw.pw_gid if pw else 0
        groups: list[int] = []
        if psc.get("fsGroup") is not None:
            groups.append(int(psc["fsGroup"]))
        groups += [int(g) for g in psc.get("supplementalGroups") or []]
        if gid is not None and int(gid) not in groups:
            groups.insert(0, int(gid))
        env.setdefault("PATH", self.agent.default_path)
        env.setdefault("HOSTNAME", self.hostname)
        env.setdefault("HOME", (pw.pw_dir if pw else "/") if uid not in (None, 0) else "/root")

        command = [str(x) for x in spec.get("command") or []]
        if not command:
            raise NoCommand(
                f"container {c.name!r} has no command: the fedfleet node agent runs commands on "
                f"the host and cannot use the image's entrypoint (image {spec.get('image')!r})"
            )

        def final(name: str) -> str | None:
            return env.get(name)

        argv = [expand(a, final) for a in command + [str(x) for x in spec.get("args") or []]]
        path = self.agent.which(argv[0], env["PATH"])

        cwd = str(spec.get("workingDir") or "/")
        if cwd != "/":
            self.agent.ensure_target(cwd, is_dir=True)
        return Launch(
            path=path,
            argv=argv,
            env=env,
            cwd=cwd,
            uid=None if uid is None else int(uid),
            gid=None if gid is None else int(gid),
            groups=groups,
            mounts=self._mounts(c),
            expose=self.agent.expose if uid not in (None, 0) else [],
            read_only_root=bool(csc.get("readOnlyRootFilesystem")),
            no_new_privs=csc.get("allowPrivilegeEscalation") is False,
        )

    def _mounts(self, c: Container) -> list[dict[str, Any]]:
        mounts: list[dict[str, Any]] = []
        targets: list[str] = []
        for vm in sorted(c.spec.get("volumeMounts") or [], key=lambda v: v["mountPath"].count("/")):
            source = self.vol_dir / vm["name"]
            sub = vm.get("subPath") or ""
            if vm.get("subPathExpr"):
                sub = expand(vm["subPathExpr"], lambda n: None)
            if sub:
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True, exist_ok=True)
            target = os.path.normpath(vm["mountPath"])
            if target in self.agent.needed_paths:
                raise ConfigError(
                    f"volumeMount {vm['name']!r} at {target} would replace {target}, which the "
                    "node agent's containers run from (it runs them on the host's filesystem); "
                    "choose another mountPath"
                )
            # Paths the containers run from (the repo, its venv, the Python installation) that
            # live below the mount, e.g. a checkout under /tmp and an emptyDir at /tmp: they
            # are bound back on top of the volume, outermost only.
            below = sorted(p for p in self.agent.needed_paths if p.startswith(target + "/"))
            keep = [p for p in below if not any(p.startswith(q + "/") for q in below)]
            nested = any(target.startswith(t.rstrip("/") + "/") for t in targets)
            if not nested:
                self.agent.ensure_target(target, is_dir=source.is_dir())
            targets.append(target)
            mounts.append(
                {
                    "source": str(source),
                    "target": target,
                    "read_only": bool(vm.get("readOnly")),
                    "keep": keep,
                }
            )
        if not any(t == "/etc/hosts" for t in targets):
            mounts.append(
                {"source": str(self.hosts_file), "target": "/etc/hosts", "read_only": True}
            )
        return mounts

    # -- volumes ----------------------------------------------------------------------------------

    def _fs_owner(self) -> tuple[int, int]:
        psc = self.spec.get("securityContext") or {}
        fs_group = psc.get("fsGroup")
        return -1, int(fs_group) if fs_group is not None else -1

    def _write_file(self, root: Path, rel: str, data: bytes, mode: int) -> None:
        rel = rel.lstrip("/")
        if ".." in Path(rel).parts:
            raise VolumeError(f"bad path {rel!r}")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        owner, group = self._fs_owner()
        if group >= 0:
            os.chown(tmp, owner, group)
        os.replace(tmp, path)

    def _items(
        self,
        root: Path,
        data: dict[str, bytes],
        items: list[Obj] | None,
        default_mode: int,
        what: str,
    ) -> None:
        if items:
            for it in items:
                if it["key"] not in data:
                    raise VolumeError(f"{what}: key {it['key']!r} not found")
                self._write_file(
                    root, it["path"], data[it["key"]], int(it.get("mode", default_mode))
                )
        else:
            for k, v in data.items():
                self._write_file(root, k, v, default_mode)

    async def _token(self, sa: str, source: Obj) -> str:
        exp = int(source.get("expirationSeconds") or 3607)
        aud = source.get("audience") or ""
        key = f"{sa}|{aud}|{exp}"
        cached = self._tokens.get(key)
        if cached and time.time() < cached[1]:
            return cached[0]
        body: Obj = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": exp,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.name,
                    "uid": self.uid,
                },
            },
        }
        if aud:
            body["spec"]["audiences"] = [aud]
        try:
            resp = await self.agent.api.request(
                "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", body=body
            )
        except ApiError as exc:
            raise VolumeError(
                f"TokenRequest for serviceaccount {self.namespace}/{sa}: {exc}"
            ) from exc
        assert resp is not None
        token = str(resp["status"]["token"])
        self._tokens[key] = (token, time.time() + 0.8 * exp)
        return token

    async def _downward(self, root: Path, items: list[Obj], default_mode: int) -> None:
        for it in items:
            if "fieldRef" in it:
                value = self.field(it["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in it:
                value = self.resource_field(it["resourceFieldRef"], None)
            else:
                continue
            self._write_file(root, it["path"], value.encode(), int(it.get("mode", default_mode)))

    async def setup_volumes(self) -> None:
        self.vol_dir.mkdir(parents=True, exist_ok=True)
        sa = str(self.spec.get("serviceAccountName") or "default")
        for vol in self.spec.get("volumes") or []:
            name = vol["name"]
            root = self.vol_dir / name
            try:
                await self._setup_volume(vol, root, sa)
            except ConfigError as exc:
                raise VolumeError(f'volume "{name}": {exc}') from exc

    async def _setup_volume(self, vol: Obj, root: Path, sa: str) -> None:
        if "emptyDir" in vol:
            if not root.exists():
                root.mkdir(parents=True)
                root.chmod(0o777)
            return
        if "hostPath" in vol:
            hp = vol["hostPath"]
            if root.is_symlink() or root.exists():
                return
            target = Path(hp["path"])
            if hp.get("type") in ("DirectoryOrCreate",) and not target.exists():
                target.mkdir(parents=True, exist_ok=True)
            if hp.get("type") == "FileOrCreate" and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            if not target.exists():
                raise VolumeError(f"hostPath {target} does not exist")
            root.parent.mkdir(parents=True, exist_ok=True)
            root.symlink_to(target)
            return
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        if "configMap" in vol or "secret" in vol:
            kind = "configmaps" if "configMap" in vol else "secrets"
            src = vol["configMap"] if kind == "configmaps" else vol["secret"]
            name = src.get("name") or src.get("secretName")
            obj = await self._get(kind, str(name), bool(src.get("optional")))
            if obj is None:
                return
            self._items(
                root,
                self._data(kind, obj),
                src.get("items"),
                int(src.get("defaultMode", 0o644)),
                f"{kind[:-1]} {name}",
            )
            return
        if "downwardAPI" in vol:
            dw = vol["downwardAPI"]
            await self._downward(root, dw.get("items") or [], int(dw.get("defaultMode", 0o644)))
            return
        if "projected" in vol:
            pj = vol["projected"]
            mode = int(pj.get("defaultMode", 0o644))
            for source in pj.get("sources") or []:
                if "serviceAccountToken" in source:
                    st = source["serviceAccountToken"]
                    token = await self._token(sa, st)
                    self._write_file(root, st["path"], token.encode(), mode)
                elif "configMap" in source or "secret" in source:
                    kind = "configmaps" if "configMap" in source else "secrets"
                    src = source["configMap"] if kind == "configmaps" else source["secret"]
                    obj = await self._get(kind, str(src["name"]), bool(src.get("optional")))
                    if obj is not None:
                        self._items(
                            root,
                            self._data(kind, obj),
                            src.get("items"),
                            mode,
                            f"{kind[:-1]} {src['name']}",
                        )
                elif "downwardAPI" in source:
                    await self._downward(root, source["downwardAPI"].get("items") or [], mode)
                else:
                    raise VolumeError(f"unsupported projected source {sorted(source)}")
            return
        kinds = sorted(k for k in vol if k != "name")
        raise VolumeError(f"volume type {kinds} is not supported by the fedfleet node agent")

    async def _refresh_loop(self) -> None:
        """Keep configMap/secret/projected volumes (and the token) current, like the kubelet."""
        while not self.terminating:
            await asyncio.sleep(self.agent.volume_refresh)
            try:
                await self.setup_volumes()
            except (VolumeError, ApiError, httpx.HTTPError, OSError) as exc:
                log.info("pod %s: volume refresh: %s", self.key, exc)

    def write_hosts(self) -> None:
        lines = [
            "# Kubernetes-managed hosts file (fedfleet node agent).",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        names = [self.hostname]
        if self.spec.get("subdomain"):
            names.insert(
                0, f"{self.hostname}.{self.spec['subdomain']}.{self.namespace}.svc.cluster.local"
            )
        lines.append(f"{self.ip}\t{' '.join(names)}")
        for alias in self.spec.get("hostAliases") or []:
            lines.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames') or [])}")
        lines.append("# Services (the agent's loopback proxies)")
        for proxy in sorted(self.agent.services.values(), key=lambda p: p.key):
            ns, name = proxy.key
            fqdn = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == self.namespace:
                fqdn.append(name)
            lines.append(f"{proxy.ip}\t{' '.join(fqdn)}")
        data = "\n".join(lines) + "\n"
        # rewrite in place: the file is bind-mounted, a rename would detach it
        with open(self.hosts_file, "a+", encoding="utf-8") as fh:
            fh.seek(0)
            if fh.read() == data:
                return
            fh.seek(0)
            fh.truncate()
            fh.write(data)
        os.chmod(self.hosts_file, 0o644)


# == the agent =====================================================================================


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node_name: str = args.node_name
        self.state_dir = Path(args.state_dir).resolve()
        self.logs_dir = self.state_dir / "logs"
        self.python = sys.executable
        self.path_prefix: str = args.path_prefix
        self.default_path = ":".join(
            [p for p in args.path_prefix.split(":") if p]
            + ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        )
        self.initial_backoff: float = args.initial_backoff
        self.max_backoff: float = args.max_backoff
        self.max_grace: float = args.max_grace
        self.volume_refresh: float = args.volume_refresh
        self.cfg = KubeConfig.load(Path(args.kubeconfig), self.state_dir / "kubeconfig-data")
        url = httpx.URL(self.cfg.server)
        self.apiserver_host = str(url.host)
        self.apiserver_port = int(url.port or 443)
        self.api = Api(self.cfg)
        self.probe_client = httpx.AsyncClient(
            verify=False,
            follow_redirects=False,
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,
        )
        self.pod_ips = IPPool([0, 3, 4, 5], first=10)
        self.svc_ips = IPPool([1, 2], first=1)
        self.pods: dict[str, PodRuntime] = {}
        self.services: dict[tuple[str, str], ServiceProxy] = {}
        self.allocatable = {
            "cpu": args.cpu,
            "memory": args.memory,
            "pods": str(args.max_pods),
            "ephemeral-storage": "100Gi",
        }
        self.created_targets: list[tuple[str, bool]] = []
        needed = [sys.base_prefix, sys.prefix, str(REPO), *args.path_prefix.split(":")]
        needed = [p for p in needed + list(args.expose) if p]
        self.needed_paths = sorted({os.path.realpath(p) for p in needed} | set(needed))
        self.expose = private_covers(needed)
        self._bg: set[asyncio.Task[Any]] = set()
        self.log_server_port = 0
        self.log_server: asyncio.Server | None = None
        self.tls_cert: str | None = args.tls_cert
        self.tls_key: str | None = args.tls_key
        self._node_since = now_rfc3339()
        self._boot_id = str(uuid.uuid4())
        self._kube_version = "v0.0.0"

    # -- utilities ------------------------------------------------------------------------------

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def which(self, cmd: str, path: str) -> str | None:
        if "/" in cmd:
            return cmd if os.access(cmd, os.X_OK) else None
        return shutil.which(cmd, path=path)

    def ensure_target(self, target: str, *, is_dir: bool) -> None:
        """Create a missing mount point / working directory on the host, remembered so the agent
        removes it again (if still empty) when it exits."""
        p = Path(target)
        if p.exists() or p.is_symlink():
            return
        missing: list[Path] = []
        q = p
        while not q.exists():
            missing.append(q)
            q = q.parent
        if is_dir:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        for m in reversed(missing):
            self.created_targets.append((str(m), m.is_dir()))

    def remove_created_targets(self) -> None:
        for path, is_dir in reversed(self.created_targets):
            with contextlib.suppress(OSError):
                if is_dir:
                    os.rmdir(path)
                elif os.path.getsize(path) == 0:
                    os.unlink(path)

    def event(self, pod: Obj, type_: str, reason: str, message: str, container: str | None) -> None:
        m = meta(pod)
        ts = now_rfc3339()
        involved: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": m.get("namespace"),
            "name": m.get("name"),
            "uid": m.get("uid"),
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{m.get('name')}.{uuid.uuid4().hex[:16]}",
                "namespace": m.get("namespace"),
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1000],
            "type": type_,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }

        async def post() -> None:
            with contextlib.suppress(Exception):
                await self.api.request(
                    "POST", f"/api/v1/namespaces/{m.get('namespace')}/events", body=body
                )

        self.spawn(post())

    # -- node + lease -----------------------------------------------------------------------------

    def node_status(self) -> Obj:
        ts = now_rfc3339()
        conds = [
            (
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            (
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            ("Ready", "True", "KubeletReady", "fedfleet node agent is posting ready status"),
        ]
        return {
            "capacity": self.allocatable,
            "allocatable": self.allocatable,
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": msg,
                    "lastHeartbeatTime": ts,
                    "lastTransitionTime": self._node_since,
                }
                for t, s, r, msg in conds
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server_port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name)),
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": "fedfleet node agent (local processes)",
                "containerRuntimeVersion": AGENT_VERSION,
                "kubeletVersion": self._kube_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                    platform.machine(), platform.machine()
                ),
            },
        }

    async def register_node(self) -> None:
        version = await self.api.get("/version")
        self._kube_version = str((version or {}).get("gitVersion", "v0.0.0"))
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64" if platform.machine() == "x86_64" else platform.machine(),
            "fedfleet.dev/node-agent": "true",
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
        }
        try:
            await self.api.request("POST", "/api/v1/nodes", body=node)
            log.info("node %s registered", self.node_name)
        except ApiError as exc:
            if exc.status != 409:
                raise
            await self.api.merge_patch(
                f"/api/v1/nodes/{self.node_name}", {"metadata": {"labels": labels}}
            )
            log.info("node %s exists; taking it over", self.node_name)
        await self.api.merge_patch(
            f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()}
        )
        await self.renew_lease()

    async def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": 40,
            "renewTime": now_micro(),
        }
        try:
            await self.api.merge_patch(path, {"spec": spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = await self.api.get(f"/api/v1/nodes/{self.node_name}")
            owner = [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": self.node_name,
                    "uid": meta(node or {}).get("uid"),
                }
            ]
            await self.api.request(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                body={
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.node_name, "ownerReferences": owner},
                    "spec": spec,
                },
            )

    async def heartbeat_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(10.0)
            n += 1
            try:
                await self.renew_lease()
                if n % 6 == 0:
                    await self.api.merge_patch(
                        f"/api/v1/nodes/{self.node_name}/status", {"status": self.node_status()}
                    )
            except (ApiError, httpx.HTTPError, OSError) as exc:
                log.warning("heartbeat: %s", exc)

    # -- pods -------------------------------------------------------------------------------------

    def on_pod(self, kind: str, pod: Obj) -> None:
        m = meta(pod)
        uid = str(m.get("uid"))
        rt = self.pods.get(uid)
        if kind == "DELETED":
            if rt is not None:
                rt.gone = True
                self.spawn(rt.terminate(delete=False, grace=0.0))
            return
        if rt is not None:
            rt.update(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if m.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
            if m.get("deletionTimestamp"):
                self.spawn(self._delete_now(pod))
            return
        rt = PodRuntime(self, pod)
        self.pods[uid] = rt
        rt.start()

    async def _delete_now(self, pod: Obj) -> None:
        m = meta(pod)
        with contextlib.suppress(ApiError, httpx.HTTPError):
            await self.api.request(
                "DELETE",
                f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": m["uid"]}},
                missing_ok=True,
            )

    def forget(self, rt: PodRuntime) -> None:
        if self.pods.get(rt.uid) is rt:
            del self.pods[rt.uid]
        rt.gone = True
        rt.dirty()
        self.spawn(rt.cleanup())
        log.info("pod %s: released ip %s", rt.key, rt.ip)

    def pick_backend(self, proxy: ServiceProxy, port: Obj) -> tuple[str, int] | None:
        ns, name = proxy.key
        if (ns, name) == ("default", "kubernetes"):
            return (self.apiserver_host, self.apiserver_port)
        spec = proxy.svc.get("spec") or {}
        selector = spec.get("selector") or {}
        if not selector:
            return None
        not_ready_ok = bool(spec.get("publishNotReadyAddresses"))
        target = port.get("targetPort", port["port"])
        candidates: list[tuple[str, int]] = []
        for rt in sorted(self.pods.values(), key=lambda r: r.ip):
            if rt.namespace != ns or rt.terminating or rt.phase in ("Succeeded", "Failed"):
                continue
            labels = meta(rt.pod).get("labels") or {}
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            if not not_ready_ok and not (rt.containers and all(c.ready for c in rt.containers)):
                continue
            if isinstance(target, int) or str(target).isdigit():
                candidates.append((rt.ip, int(str(target))))
                continue
            for c in rt.containers:
                found = next(
                    (p for p in c.spec.get("ports") or [] if p.get("name") == target), None
                )
                if found:
                    candidates.append((rt.ip, int(found["containerPort"])))
                    break
        if not candidates:
            return None
        proxy.rr += 1
        return candidates[proxy.rr % len(candidates)]

    # -- services ---------------------------------------------------------------------------------

    def on_service(self, kind: str, svc: Obj) -> None:
        m = meta(svc)
        key = (str(m["namespace"]), str(m["name"]))
        spec = svc.get("spec") or {}
        cluster_ip = spec.get("clusterIP")
        wanted = (
            kind != "DELETED"
            and cluster_ip not in (None, "", "None")
            and spec.get("type") != "ExternalName"
        )
        proxy = self.services.get(key)
        if not wanted:
            if proxy is not None:
                del self.services[key]
                self.svc_ips.give(proxy.ip)
                self.spawn(proxy.close())
        else:
            if proxy is None:
                proxy = ServiceProxy(self, svc, self.svc_ips.take())
                self.services[key] = proxy
            proxy.svc = svc
            self.spawn(proxy.sync())
        for rt in list(self.pods.values()):
            if rt.hosts_file.parent.exists():
                with contextlib.suppress(OSError):
                    rt.write_hosts()

    # -- kubectl logs -----------------------------------------------------------------------------

    def find_log_files(self, ns: str, name: str, container: str) -> list[Path]:
        dirs = sorted(self.logs_dir.glob(f"{ns}_{name}_*"), key=lambda p: p.stat().st_mtime)
        if not dirs:
            return []
        cdir = dirs[-1] / container
        return sorted(cdir.glob("*.log"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)

    def _writing_log(self, ns: str, pod_name: str, cname: str, path: Path) -> bool:
        """Is a running container instance still writing ``path``?"""
        for rt in self.pods.values():
            if rt.namespace == ns and rt.name == pod_name and not rt.gone:
                for c in rt.containers + rt.init_containers:
                    if c.name == cname:
                        return c.proc is not None and path.stem == str(c.restart_count)
        return False

    async def serve_logs(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Minimal kubelet API: ``GET /containerLogs/<ns>/<pod>/<container>`` with tailLines,
        previous, limitBytes and follow."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            request_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
            parts = request_line.split(" ")
            url = httpx.URL(parts[1] if len(parts) > 1 else "/")
            segs = url.path.strip("/").split("/")
            if len(segs) != 4 or segs[0] != "containerLogs":
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return
            _, ns, pod_name, cname = segs
            files = self.find_log_files(ns, pod_name, cname)
            q = url.params
            previous = q.get("previous") == "true"
            if previous:
                files = files[-2:-1]
            elif files:
                files = files[-1:]
            contents = [f.read_bytes() for f in files]
            last_bytes = contents[-1] if contents else b""
            data = b"".join(contents)
            tail = q.get("tailLines")
            if tail is not None and tail.isdigit():
                lines = data.splitlines(keepends=True)
                data = b"".join(lines[-int(tail) :]) if int(tail) > 0 else b""
            limit = q.get("limitBytes")
            if limit is not None and limit.isdigit():
                data = data[: int(limit)]
            follow = q.get("follow") == "true" and not previous and bool(files)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + (b"" if follow else f"Content-Length: {len(data)}\r\n".encode())
                + b"\r\n"
                + data
            )
            await writer.drain()
            if follow:
                path = files[-1]
                pos = len(last_bytes)
                deadline = time.monotonic() + 3600
                while time.monotonic() < deadline:
                    running = self._writing_log(ns, pod_name, cname, path)
                    size = path.stat().st_size if path.exists() else pos
                    if size > pos:
                        with path.open("rb") as fh:
                            fh.seek(pos)
                            chunk = fh.read(size - pos)
                        pos += len(chunk)
                        writer.write(chunk)
                        await writer.drain()
                    if not running:
                        break
                    await asyncio.sleep(0.3)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def start_log_server(self) -> None:
        ctx: ssl.SSLContext | None = None
        if self.tls_cert and self.tls_key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        else:
            log.info("no --tls-cert/--tls-key: `kubectl logs` is unavailable")
            return
        self.log_server = await asyncio.start_server(
            self.serve_logs, host="127.0.0.1", port=0, ssl=ctx
        )
        self.log_server_port = int(self.log_server.sockets[0].getsockname()[1])
        log.info("kubelet log endpoint on https://127.0.0.1:%s", self.log_server_port)

    # -- run --------------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        await self.start_log_server()
        await self.register_node()
        pods_synced, svcs_synced = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(self.heartbeat_loop()),
            asyncio.create_task(
                self.api.reflect("/api/v1/services", {}, self.on_service, svcs_synced)
            ),
        ]
        await asyncio.wait_for(svcs_synced.wait(), 30.0)
        tasks.append(
            asyncio.create_task(
                self.api.reflect(
                    "/api/v1/pods",
                    {"fieldSelector": f"spec.nodeName={self.node_name}"},
                    self.on_pod,
                    pods_synced,
                )
            )
        )
        await asyncio.wait_for(pods_synced.wait(), 30.0)
        (self.state_dir / "ready").write_text(
            json.dumps({"pid": os.getpid(), "kubelet_port": self.log_server_port})
        )
        log.info("node agent %s ready", self.node_name)
        await stop.wait()
        log.info("node agent shutting down")
        for task in tasks:
            task.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        pods = list(self.pods.values())
        for rt in pods:
            rt.terminating = True
            rt._wake.set()
        await asyncio.gather(
            *(
                c.stop(min(rt.grace_seconds(), 3.0), "node agent stopping")
                for rt in pods
                for c in rt.containers + rt.init_containers
            ),
            return_exceptions=True,
        )
        for rt in pods:
            await rt.cleanup()
        for proxy in list(self.services.values()):
            await proxy.close()
        if self.log_server is not None:
            self.log_server.close()
        for task in list(self._bg):
            task.cancel()
        await self.api.close()
        await self.probe_client.aclose()
        self.remove_created_targets()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="node-0")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument(
        "--path-prefix", default=DEFAULT_PATH_PREFIX, help="prepended to containers' PATH"
    )
    parser.add_argument("--initial-backoff", type=float, default=1.0)
    parser.add_argument("--max-backoff", type=float, default=10.0)
    parser.add_argument("--max-grace", type=float, default=10.0, help="cap on termination grace")
    parser.add_argument("--volume-refresh", type=float, default=30.0)
    parser.add_argument("--cpu", default="32")
    parser.add_argument("--memory", default="64Gi")
    parser.add_argument("--max-pods", type=int, default=250)
    parser.add_argument(
        "--expose",
        action="append",
        default=[],
        help="another host path non-root containers must reach (private ancestors get covered)",
    )
    parser.add_argument("--tls-cert", help="serving cert for the kubelet log endpoint")
    parser.add_argument("--tls-key")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(Path(args.state_dir) / "agent.log"),
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        log.warning("not root: mount namespaces and runAsUser will fail")
    asyncio.run(Agent(args).run())
    return 0


# == the parent-side handle ========================================================================


class NodeAgent:
    """Runs ``nodeagent.py`` as a subprocess; a context manager.

    ``start()`` returns once the Node is registered and the agent has synced its pods.
    """

    def __init__(
        self,
        kubeconfig: Path | str,
        *,
        node_name: str = "node-0",
        state_dir: Path | None = None,
        path_prefix: str = DEFAULT_PATH_PREFIX,
        python: str = sys.executable,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        extra_args: list[str] | None = None,
        keep: bool | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.node_name = node_name
        self._own_dir = state_dir is None
        self.state_dir = (
            Path(tempfile.mkdtemp(prefix="fedfleet-agent-")) if state_dir is None else state_dir
        )
        self.path_prefix = path_prefix
        self.python = python
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.extra_args = list(extra_args or [])
        self.keep = keep if keep is not None else os.environ.get("FEDFLEET_KEEP_CLUSTER") == "1"
        self.startup_timeout = startup_timeout
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "agent.log"

    def __enter__(self) -> NodeAgent:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> NodeAgent:
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "ready").unlink(missing_ok=True)
        argv = [
            self.python,
            str(Path(__file__).resolve()),
            f"--kubeconfig={self.kubeconfig}",
            f"--node-name={self.node_name}",
            f"--state-dir={self.state_dir}",
            f"--path-prefix={self.path_prefix}",
            *self.extra_args,
        ]
        if self.tls_cert and self.tls_key:
            argv += [f"--tls-cert={self.tls_cert}", f"--tls-key={self.tls_key}"]
        out = (self.state_dir / "agent.stdout.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + self.startup_timeout
        while not (self.state_dir / "ready").exists():
            if self._proc.poll() is not None:
                raise NodeAgentError(
                    f"node agent exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise NodeAgentError(
                    f"node agent not ready after {self.startup_timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._own_dir and not self.keep:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        chunks = []
        for name in ("agent.log", "agent.stdout.log"):
            path = self.state_dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(chunks) or "(no agent log)"

    def _pod_dirs(self, namespace: str, name: str) -> Iterator[Path]:
        yield from sorted(
            self.logs_dir.glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime
        )

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """stdout+stderr of a pod's containers (all restarts, oldest first) of the most recent pod
        with that name; one container or all of them (each under a ``==> name <==`` header)."""
        dirs = list(self._pod_dirs(namespace, name))
        if not dirs:
            return ""
        pod_dir = dirs[-1]
        cdirs = (
            [pod_dir / container]
            if container
            else sorted(p for p in pod_dir.iterdir() if p.is_dir())
        )
        out: list[str] = []
        for cdir in cdirs:
            files = sorted(
                cdir.glob("*.log"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1
            )
            text = "".join(f.read_text(errors="replace") for f in files)
            out.append(text if container else f"==> {cdir.name} <==\n{text}")
        return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
