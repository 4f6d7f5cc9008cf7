"""A real Kubernetes node on this host, for a running ``ControlPlane``: containerd + runc, the
bridge CNI plugin, a kubelet, kube-proxy and CoreDNS, running containers from the images
deploy/build-images.sh built (no registry is contacted).

Usage::

    with ControlPlane(advertise_address=host_ip()) as cp, RealNode(cp) as node:
        cp.kubectl("get", "nodes", "-o", "wide")

Why each setting is what it is: /work/shared/notes/real-node.md (``failCgroupV1: false``,
``restrict_oom_score_adj``, the local pause image, the non-loopback apiserver address).

Everything of the node's own (containerd root/state/socket, kubelet root, CNI config and IPAM,
logs, certificates) lives in one short temp dir. What the node changes on the host anyway
(sysctls, iptables-nft tables, the bridge, ``/kubepods`` cgroups, mounts, /run/netns,
/var/lib/cni, /var/lib/kubelet/device-plugins, ...) is recorded by ``HostSnapshot`` before
anything starts and restored at ``stop()``; the snapshot is also saved next to the host-wide
lock, so ``python -m tests.cluster.realnode --cleanup`` repairs a host a killed run left. Two
real nodes can never run at once: the bridge, CIDRs and KUBE-* chains are host-global, so
``start()`` takes an exclusive ``flock`` on ``hoststate.LOCK_FILE`` first.

The node's processes run under ``nice -n 19`` (containers inherit it from containerd).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.cluster.controlplane import (
    ControlPlane,
    _cert_pem,
    _issue,
    _key_pem,
    _name,
    free_port,
)
from tests.cluster.hoststate import (
    STATE_FILE,
    HostSnapshot,
    acquire_host_lock,
    mounts_under,
    pids_with_arg,
    repair_host,
)

__all__ = [
    "NodeBinaries",
    "NodeImages",
    "RealNode",
    "RealNodeError",
    "host_ip",
]

POD_CIDR = "10.88.0.0/24"
BRIDGE_IP = "10.88.0.1"
BRIDGE = "rnbr0"


class RealNodeError(RuntimeError):
    """A node component failed, a prerequisite is missing, or another real node runs."""


def _read_env(path: Path, hint: str) -> dict[str, str]:
    if not path.is_file():
        raise RealNodeError(f"no {path}; {hint}")
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"export (\w+)=(.*)", line.strip()):
            values[m[1]] = m[2]
    return values


def _cache() -> Path:
    cache = os.environ.get("FEDFLEET_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedfleet"
    )
    return Path(cache)


@dataclass(frozen=True)
class NodeBinaries:
    kubelet: str
    kube_proxy: str
    coredns: str
    containerd: str
    ctr: str
    cni_bin_dir: str

    @classmethod
    def load(cls) -> NodeBinaries:
        """From deploy/build-node.sh's node-env.sh; never builds."""
        v = _read_env(_cache() / "bin" / "node-env.sh", "build it: bash deploy/build-node.sh")
        try:
            return cls(
                v["FEDFLEET_KUBELET"],
                v["FEDFLEET_KUBE_PROXY"],
                v["FEDFLEET_COREDNS"],
                v["FEDFLEET_CONTAINERD"],
                v["FEDFLEET_CTR"],
                v["FEDFLEET_CNI_BIN_DIR"],
            )
        except KeyError as exc:
            raise RealNodeError(f"node-env.sh lacks {exc}; rerun deploy/build-node.sh") from None


@dataclass(frozen=True)
class NodeImages:
    """Image name -> docker-archive, from deploy/build-images.sh's env.sh; ``names``: the
    image's name by its role there (``pause``, ``redis``, ``services``, ``operator``)."""

    pause: str
    archives: dict[str, str]
    names: dict[str, str]

    @classmethod
    def load(cls) -> NodeImages:
        v = _read_env(_cache() / "images" / "env.sh", "build them: bash deploy/build-images.sh")
        archives = {}
        names = {}
        for key, name in v.items():
            if key.startswith("FEDFLEET_IMAGE_") and not key.endswith("_TAR"):
                tar = v.get(key + "_TAR", "")
                if not os.path.isfile(tar):
                    raise RealNodeError(f"{key}_TAR={tar!r} is missing; run deploy/build-images.sh")
                archives[name] = tar
                names[key.removeprefix("FEDFLEET_IMAGE_").lower()] = name
        if "FEDFLEET_IMAGE_PAUSE" not in v:
            raise RealNodeError("images env.sh names no pause image; run deploy/build-images.sh")
        return cls(pause=v["FEDFLEET_IMAGE_PAUSE"], archives=archives, names=names)


def host_ip() -> str:
    """The host's source address for its default route (the node IP and apiserver address)."""
    out = subprocess.run(
        ["ip", "-4", "route", "get", "1.1.1.1"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"\bsrc (\S+)", out)
    if not m:
        raise RealNodeError(f"no source address in `ip route get`: {out!r}")
    return m[1]


class RealNode:
    """containerd + kubelet + kube-proxy + CoreDNS as one node ``name`` of ``cp``'s cluster.

    ``cp`` must run with a non-loopback ``advertise_address`` (the node IP by default).
    Attributes after ``start()``: ``workdir``, ``ctr_cmd`` (argv prefix for ``ctr``),
    ``startup_seconds`` (phase timings), ``restored`` (what ``stop()`` undid),
    ``host_diff`` (what still differs from the snapshot after ``stop()``: empty is success).
    """

    COMPONENTS = ("containerd", "kubelet", "kube-proxy", "coredns")

    def __init__(
        self,
        cp: ControlPlane,
        *,
        name: str = "realnode",
        binaries: NodeBinaries | None = None,
        images: NodeImages | None = None,
        keep: bool | None = None,
        startup_timeout: float = 180.0,
        lock_timeout: float = 0.0,
        verbosity: int = 1,
        nice: int = 19,
    ) -> None:
        if not cp.advertise_address:
            raise RealNodeError("the ControlPlane needs advertise_address= (a non-loopback IP)")
        self.cp = cp
        self.name = name
        self.node_ip = cp.advertise_address
        self.binaries = binaries if binaries is not None else NodeBinaries.load()
        self.images = images if images is not None else NodeImages.load()
        self.keep = keep if keep is not None else os.environ.get("FEDFLEET_KEEP_CLUSTER") == "1"
        self.startup_timeout = startup_timeout
        self.lock_timeout = lock_timeout
        self.verbosity = verbosity
        # The node's processes (and so its containers) run at this niceness: 19 beside other
        # work (the smoke script), 0 for the test tier, whose pods are the system under test.
        self._nice = ["nice", "-n", str(nice)]
        self.workdir = Path("/nonexistent")
        self.startup_seconds: dict[str, float] = {}
        self.restored: list[str] = []
        self.host_diff: list[str] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: IO[str] | None = None
        self._snapshot: HostSnapshot | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> RealNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> RealNode:
        t0 = time.monotonic()
        self._lock = acquire_host_lock(self.lock_timeout)
        try:
            if STATE_FILE.exists():  # a killed run's leftovers: repair the host first
                self.restored += repair_host(BRIDGE)
            self._snapshot = HostSnapshot.take()
            self._snapshot.save(STATE_FILE)
            self.workdir = Path(tempfile.mkdtemp(prefix="ffrn-", dir="/tmp"))
            (self.workdir / "logs").mkdir()
            self._write_certs()
            self._start_containerd()
            self.startup_seconds["containerd"] = time.monotonic() - t0
            self._import_images()
            self.startup_seconds["images"] = time.monotonic() - t0
            self._setup_network()
            self._start_kubelet()
            self._start_kube_proxy()
            self._start_coredns()
            self.wait_ready()
            self.startup_seconds["ready"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything, then restore the host from the snapshot (always, even after a
        failed start), then release the lock. ``host_diff`` says what could not be restored."""
        try:
            t0 = time.monotonic()
            for name, proc in self._procs.items():
                if proc.poll() is not None:  # died before stop(): say how
                    self.restored.append(f"NOTE: {name} had exited with {proc.returncode}")
            for name in ("coredns", "kube-proxy", "kubelet"):
                self._terminate(name)
            t1 = time.monotonic()
            if self._snapshot is not None:
                # Every container process (they are all in the new /kubepods cgroups): their
                # shims then have nothing left, and containerd's own state goes with workdir.
                self._snapshot.kill_node_cgroup_tasks(self.restored)
            t2 = time.monotonic()
            self._terminate("containerd")
            self._kill_shims()
            t3 = time.monotonic()
            if self._snapshot is not None:
                self.restored += self._snapshot.restore([self.workdir], BRIDGE)
                self.restored.append(
                    f"timings: node processes {t1 - t0:.1f} s, containers {t2 - t1:.1f} s, "
                    f"containerd {t3 - t2:.1f} s, host restore {time.monotonic() - t3:.1f} s"
                )
                self.host_diff = self._snapshot.diff()
                if not self.host_diff:
                    STATE_FILE.unlink(missing_ok=True)
                self._snapshot = None
            if self.workdir.is_dir() and not self.keep:
                if mounts_under(self.workdir):
                    self.restored.append(f"NOT removing {self.workdir}: mounts left")
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    # -- helpers ----------------------------------------------------------------------------

    @property
    def ctr_cmd(self) -> list[str]:
        sock = self.workdir / "containerd" / "containerd.sock"
        return [self.binaries.ctr, "-a", str(sock), "-n", "k8s.io"]

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return f"(no log for {name})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RealNodeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            out = self.cp.kubectl("get", "node", self.name, "-o", "json")
            if out.returncode == 0:
                conds = json.loads(out.stdout).get("status", {}).get("conditions", [])
                ready = [c for c in conds if c.get("type") == "Ready"]
                if ready and ready[0].get("status") == "True":
                    return
                last = json.dumps(ready)
            else:
                last = out.stderr.strip()
            time.sleep(1)
        raise RealNodeError(
            f"node {self.name} not Ready after {self.startup_timeout} s ({last}):\n"
            f"{self.log_tail('kubelet')}"
        )

    # -- internals --------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        try:
            self._procs[name] = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *self._nice, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()

    def _terminate(self, name: str, timeout: float = 5) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _write(self, rel: str, text: str, mode: int = 0o644) -> Path:
        path = self.workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    def _write_certs(self) -> None:
        pki = self.cp.pki
        ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
        issued = {
            # The Node authorizer's identity for this node.
            "kubelet-client": _issue(
                ca_key, ca_cert, _name(f"system:node:{self.name}", "system:nodes"), server=False
            ),
            # Bound to system:node-proxier by the default RBAC.
            "kube-proxy": _issue(ca_key, ca_cert, _name("system:kube-proxy"), server=False),
            # The kubelet's serving cert: the apiserver checks it (--kubelet-certificate-authority).
            "kubelet-serving": _issue(
                ca_key,
                ca_cert,
                _name(self.name),
                server=True,
                dns=[self.name],
                ips=[self.node_ip, "127.0.0.1"],
            ),
        }
        for stem, (key, cert) in issued.items():
            self._write(f"pki/{stem}.crt", _cert_pem(cert).decode())
            self._write(f"pki/{stem}.key", _key_pem(key).decode(), 0o600)
            self._write(f"{stem}.kubeconfig", self._kubeconfig(stem), 0o600)

    def _kubeconfig(self, stem: str) -> str:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "c",
                    "cluster": {
                        "server": self.cp.server,
                        "certificate-authority": str(self.cp.ca_file),
                    },
                }
            ],
            "users": [
                {
                    "name": "u",
                    "user": {
                        "client-certificate": str(self.workdir / f"pki/{stem}.crt"),
                        "client-key": str(self.workdir / f"pki/{stem}.key"),
                    },
                }
            ],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        return json.dumps(cfg, indent=2)

    def _start_containerd(self) -> None:
        d = self.workdir / "containerd"
        config = f"""version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.images.pause}"
  # This VM withholds CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (note, pitfall 1).
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{self.binaries.cni_bin_dir}"
    conf_dir = "{self.workdir}/cni/net.d"
"""
        cfg = self._write("containerd/config.toml", config)
        self._spawn("containerd", [self.binaries.containerd, "--config", str(cfg)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check_alive()
            if subprocess.run([*self.ctr_cmd, "version"], capture_output=True).returncode == 0:
                return
            time.sleep(0.3)
        raise RealNodeError(f"containerd did not answer in 60 s:\n{self.log_tail('containerd')}")

    def _import_images(self) -> None:
        """Import every archive, two at a time (the unpacking is CPU-bound; images that share
        layers share their content, so the second of them writes only its own)."""

        def one(item: tuple[str, str]) -> tuple[str, float, str]:
            name, tar = item
            t0 = time.monotonic()
            proc = subprocess.run(
                [*self._nice, *self.ctr_cmd, "images", "import", tar],
                capture_output=True,
                text=True,
            )
            return name, time.monotonic() - t0, proc.stderr.strip() if proc.returncode else ""

        with ThreadPoolExecutor(max_workers=2) as pool:
            # biggest first, so the two workers finish close together
            items = sorted(self.images.archives.items(), key=lambda kv: -os.path.getsize(kv[1]))
            for name, seconds, error in pool.map(one, items):
                if error:
                    raise RealNodeError(f"ctr images import of {name} failed: {error}")
                self.startup_seconds[f"import {name}"] = seconds

    def tag_image(self, source: str, target: str) -> None:
        """Give an imported image a second name (a user's image built FROM it unchanged, as
        their registry would serve it; nothing is pulled: pods use pull policy Never or
        IfNotPresent)."""
        proc = subprocess.run(
            [*self.ctr_cmd, "images", "tag", "--force", source, target],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RealNodeError(f"ctr images tag {source} {target}: {proc.stderr.strip()}")

    def _setup_network(self) -> None:
        # The bridge exists before CoreDNS binds to its address (the CNI plugin adopts it).
        for argv in (
            ["ip", "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE],
            ["ip", "link", "set", BRIDGE, "up"],
        ):
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RealNodeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        conflist = {
            "cniVersion": "1.0.0",
            "name": "fedfleet-realnode",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        self._write("cni/net.d/10-fedfleet.conflist", json.dumps(conflist, indent=2))

    def _start_kubelet(self) -> None:
        w = self.workdir
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # 1.35 refuses cgroup v1 hosts otherwise (note, pitfall 2)
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{w}/containerd/containerd.sock",
            "address": self.node_ip,
            "port": free_port(),
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "readOnlyPort": 0,
            "tlsCertFile": str(w / "pki/kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(w / "pki/kubelet-serving.key"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.cp.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [BRIDGE_IP],
            "clusterDomain": "cluster.local",
            "podLogsDir": str(w / "pod-logs"),
            "volumePluginDir": str(w / "kubelet-volume-plugins"),
            "failSwapOn": False,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "2%",
                "imagefs.available": "2%",
                "nodefs.inodesFree": "2%",
            },
            "imageGCHighThresholdPercent": 100,
            "serializeImagePulls": False,
        }
        cfg = self._write("kubelet-config.json", json.dumps(config, indent=2))
        self._spawn(
            "kubelet",
            [
                self.binaries.kubelet,
                f"--config={cfg}",
                f"--kubeconfig={w / 'kubelet-client.kubeconfig'}",
                f"--root-dir={w / 'kubelet'}",
                f"--cert-dir={w / 'kubelet-certs'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.node_ip}",
                f"--v={self.verbosity}",
            ],
        )

    def _start_kube_proxy(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.workdir / "kube-proxy.kubeconfig")},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": self.name,
            "bindAddress": self.node_ip,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "nodePortAddresses": [f"{self.node_ip}/32"],  # keep NodePorts off loopback
            # 0: leave the host's conntrack table size and timeouts as they are.
            "conntrack": {
                "maxPerCore": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        cfg = self._write("kube-proxy-config.json", json.dumps(config, indent=2))
        self._spawn(
            "kube-proxy",
            [self.binaries.kube_proxy, f"--config={cfg}", f"--v={self.verbosity}"],
        )

    def _start_coredns(self) -> None:
        corefile = f""".:53 {{
    bind {BRIDGE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.cp.kubeconfig} fedfleet
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 30
}}
"""
        cfg = self._write("Corefile", corefile)
        self._spawn("coredns", [self.binaries.coredns, "-conf", str(cfg)])

    def _kill_shims(self) -> None:
        """containerd-shim-runc-v2 processes detach from containerd; end the ones that name
        this node's containerd socket (by pid, never by process name)."""
        marker = str(self.workdir / "containerd")
        for pid in pids_with_arg(marker):
            try:
                os.kill(pid, signal.SIGKILL)
                self.restored.append(f"SIGKILL leftover {pid} ({marker})")
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    from tests.cluster.realnode_smoke import main

    sys.exit(main())
