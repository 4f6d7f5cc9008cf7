"""Record the host-global state a real Kubernetes node changes, and put it back.

A kubelet, kube-proxy, containerd and the bridge CNI plugin change things outside any directory
they are given (see /work/shared/notes/real-node.md, pitfalls 5 and 6): sysctls, nftables /
iptables-nft tables, a bridge and veths, ``/kubepods`` cgroups in every hierarchy, mounts,
``/run/netns``, ``/var/lib/cni``, ``/var/lib/kubelet/device-plugins``, ``/run/containerd``...
``HostSnapshot.take()`` records all of it before the node starts; ``restore()`` kills what runs
in cgroups that were not there, unmounts what was not mounted, deletes links, nft tables, cgroups
and paths that did not exist, rewrites changed sysctls and tables, and ``diff()`` lists what
still differs (empty when the host is as it was). A snapshot is JSON, so a crashed run can be
repaired by the next one (``python -m tests.cluster.realnode --cleanup``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "CANDIDATE_PATHS",
    "LOCK_FILE",
    "STATE_FILE",
    "HostSnapshot",
    "HostStateError",
    "acquire_host_lock",
    "mounts_under",
    "pids_with_arg",
    "repair_host",
]

# One real node per host: its lock, and the snapshot a run keeps while it holds it (left behind
# only by a killed run, which repair_host() then undoes).
LOCK_FILE = Path("/run/lock/fedfleet-realnode.lock")
STATE_FILE = Path("/run/lock/fedfleet-realnode.state.json")

# Paths a node may create although it was told to keep to its own directory.
CANDIDATE_PATHS = (
    "/run/netns",
    "/run/containerd",
    "/run/xtables.lock",
    "/run/kubernetes",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/kube-proxy",
    "/var/log/containers",
    "/var/log/pods",
    "/usr/libexec/kubernetes",
    "/opt/containerd",
    "/opt/cni",
    "/etc/cni",
    "/etc/kubernetes",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
# What restore() may touch, so that another tool's work beside the node is never undone:
# cgroups and links by name, mounts by where they are (plus the node's own work dir).
NODE_CGROUPS = re.compile(r"^(kubepods.*|k8s\.io)$")
NODE_LINKS = re.compile(r"^(veth.*|cni\d+|rnbr\d+)$")
# Sysctls that change on their own: never compared, never written.
VOLATILE_SYSCTL = re.compile(
    r"^(fs\.(dentry-state|file-nr|inode-nr|inode-state|aio-nr|quota\..*)"
    r"|kernel\.(ns_last_pid|random\..*|pty\.nr|tainted)"
    r"|net\.netfilter\.nf_conntrack_count"
    r"|net\.ipv[46]\.(conf|neigh)\.[^.]+\.stable_secret)$"
)
# Written first: turning ip_forward back off rewrites every interface's `forwarding`.
FIRST_SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


class HostStateError(RuntimeError):
    """The host could not be locked or put back as recorded."""


def _run(*argv: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def read_sysctls() -> dict[str, str]:
    """Every readable, writable sysctl (dotted name -> value), except the volatile ones."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk("/proc/sys"):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if not os.stat(path).st_mode & 0o200:
                    continue
                with open(path, encoding="utf-8", errors="replace") as fh:
                    value = fh.read().strip()
            except OSError:
                continue
            key = path[len("/proc/sys/") :].replace("/", ".")
            if not VOLATILE_SYSCTL.match(key):
                out[key] = value
    return out


def read_nft_tables() -> dict[str, str]:
    """'family name' -> `nft list table` text, for every nftables table (iptables-nft's too)."""
    if shutil.which("nft") is None:
        raise RuntimeError("the nft binary is missing: install nftables (deploy/build-node.sh)")
    tables: dict[str, str] = {}
    for line in _run("nft", "list", "tables").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table":
            key = f"{parts[1]} {parts[2]}"
            tables[key] = _run("nft", "list", "table", parts[1], parts[2])
    return tables


def read_links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def read_mounts() -> list[str]:
    """Mount points with their source and type, in mount order (mountinfo)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        out.append(f"{fields[4]} {fields[sep + 1]} {fields[sep + 2]}")
    return out


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below ``path``."""
    prefix = str(path).rstrip("/")
    return [
        m.split()[0]
        for m in read_mounts()
        if m.split()[0] == prefix or m.split()[0].startswith(prefix + "/")
    ]


def cgroup_hierarchies() -> list[Path]:
    return sorted(
        p for p in CGROUP_ROOT.iterdir() if p.is_dir() and (p / "cgroup.procs").exists()
    ) or [CGROUP_ROOT]


def read_cgroups() -> dict[str, list[str]]:
    """Top-level cgroup directories of every hierarchy."""
    return {str(h): sorted(d.name for d in h.iterdir() if d.is_dir()) for h in cgroup_hierarchies()}


@dataclass
class HostSnapshot:
    sysctls: dict[str, str] = field(default_factory=dict)
    nft: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def take(cls) -> HostSnapshot:
        return cls(
            sysctls=read_sysctls(),
            nft=read_nft_tables(),
            links=read_links(),
            mounts=read_mounts(),
            cgroups=read_cgroups(),
            paths={p: os.path.lexists(p) for p in CANDIDATE_PATHS},
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> HostSnapshot:
        data = json.loads(path.read_text())
        return cls(**data)

    # -- comparing ----------------------------------------------------------------------------

    def diff(self) -> list[str]:
        """What differs now from this snapshot, one line each (empty: restored)."""
        now = HostSnapshot.take()
        out: list[str] = []
        for key in sorted(set(self.sysctls) & set(now.sysctls)):
            if self.sysctls[key] != now.sysctls[key]:
                out.append(f"sysctl {key}: {self.sysctls[key]!r} -> {now.sysctls[key]!r}")
        for key in sorted(set(self.nft) | set(now.nft)):
            if key not in now.nft:
                out.append(f"nft table {key}: missing")
            elif key not in self.nft:
                out.append(f"nft table {key}: new")
            elif self.nft[key] != now.nft[key]:
                out.append(f"nft table {key}: changed")
        out += [f"link {n}: new" for n in sorted(set(now.links) - set(self.links))]
        out += [f"link {n}: missing" for n in sorted(set(self.links) - set(now.links))]
        out += [f"mount {m}: new" for m in now.mounts if m not in self.mounts]
        out += [f"mount {m}: missing" for m in self.mounts if m not in now.mounts]
        for h, dirs in now.cgroups.items():
            out += [f"cgroup {h}/{d}: new" for d in dirs if d not in self.cgroups.get(h, [])]
        for p, existed in self.paths.items():
            if os.path.lexists(p) != existed:
                out.append(f"path {p}: {'missing' if existed else 'new'}")
        return out

    # -- restoring ----------------------------------------------------------------------------

    def restore(self, workdirs: list[Path] | None = None, bridge: str = "rnbr0") -> list[str]:
        """Put the host back as recorded; returns what was done (for the log). Best effort per
        item: one failure does not stop the rest; ``diff()`` afterwards says what is left.

        Only the node's things are undone: new ``kubepods*``/``k8s.io`` cgroups, new veth/cni
        links and ``bridge``, new mounts under a ``workdirs`` or ``CANDIDATE_PATHS`` entry."""
        done: list[str] = []
        prefixes = [*CANDIDATE_PATHS, *(str(w) for w in workdirs or [])]
        self.kill_node_cgroup_tasks(done)
        self._unmount_new(done, prefixes)
        self._remove_netns(done)
        self._delete_links(done, bridge)
        self._restore_nft(done)
        self._restore_sysctls(done)
        self._remove_cgroups(done)
        self._remove_paths(done)
        return done

    def _new_cgroup_dirs(self) -> list[Path]:
        out = []
        for h in cgroup_hierarchies():
            before = set(self.cgroups.get(str(h), []))
            out += [
                d
                for d in h.iterdir()
                if d.is_dir() and d.name not in before and NODE_CGROUPS.match(d.name)
            ]
        return out

    def kill_node_cgroup_tasks(self, done: list[str]) -> None:
        """SIGKILL every process in a node cgroup (kubepods*, k8s.io) that is new."""
        deadline = time.monotonic() + 20
        while True:
            pids: set[int] = set()
            for top in self._new_cgroup_dirs():
                for procs in top.rglob("cgroup.procs"):
                    try:
                        pids |= {int(x) for x in procs.read_text().split()}
                    except OSError:
                        continue
            pids.discard(os.getpid())
            if not pids or time.monotonic() > deadline:
                if pids:
                    done.append(f"FAILED to kill {sorted(pids)} in new cgroups")
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            done.append(f"SIGKILL {len(pids)} processes in new cgroups")
            time.sleep(0.5)

    def _unmount_new(self, done: list[str], prefixes: list[str]) -> None:
        def ours(entry: str) -> bool:
            point = entry.split()[0]
            return entry not in self.mounts and any(
                point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes
            )

        for _ in range(10):
            new = [m for m in read_mounts() if ours(m)]
            if not new:
                return
            for entry in reversed(new):
                point = entry.split()[0]
                if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True)
                done.append(f"umount {point}")
        done.append(f"FAILED: mounts left: {[m for m in read_mounts() if ours(m)]}")

    def _remove_netns(self, done: list[str]) -> None:
        netns = Path("/run/netns")
        if not netns.is_dir():
            return  # (a /run/netns the node created goes whole with the other new paths)
        for ns in netns.glob("cni-*"):
            if not mounts_under(ns):
                ns.unlink(missing_ok=True)
                done.append(f"rm {ns}")

    def _delete_links(self, done: list[str], bridge: str) -> None:
        for name in sorted(set(read_links()) - set(self.links)):
            if name != bridge and not NODE_LINKS.match(name):
                continue
            if subprocess.run(["ip", "link", "delete", name], capture_output=True).returncode == 0:
                done.append(f"ip link delete {name}")

    def _restore_nft(self, done: list[str]) -> None:
        now = read_nft_tables()
        for key, text in now.items():
            if self.nft.get(key) == text:
                continue
            family, name = key.split()
            _run("nft", "delete", "table", family, name, check=False)
            done.append(f"nft delete table {key}")
        for key, text in self.nft.items():
            if now.get(key) != text:
                _run("nft", "-f", "-", input=text, check=False)
                done.append(f"nft restore table {key}")

    def _restore_sysctls(self, done: list[str]) -> None:
        now = read_sysctls()
        keys = [k for k in FIRST_SYSCTLS if k in self.sysctls]
        keys += sorted(k for k in self.sysctls if k not in FIRST_SYSCTLS)
        for key in keys:
            if key not in now or now[key] == self.sysctls[key]:
                continue
            path = "/proc/sys/" + key.replace(".", "/")
            try:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(self.sysctls[key])
                done.append(f"sysctl {key}={self.sysctls[key]} (was {now[key]})")
            except OSError as exc:
                done.append(f"FAILED sysctl {key}: {exc}")
            now = read_sysctls() if key in FIRST_SYSCTLS else now

    def _remove_cgroups(self, done: list[str]) -> None:
        for top in self._new_cgroup_dirs():
            # Children first: a cgroup directory is removed with rmdir once it is empty.
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
                done.append(f"rmdir {top}")
            except OSError as exc:
                done.append(f"FAILED rmdir {top}: {exc}")

    def _remove_paths(self, done: list[str]) -> None:
        for p, existed in self.paths.items():
            if existed or not os.path.lexists(p):
                continue
            if mounts_under(p):
                done.append(f"FAILED: {p} still has mounts {mounts_under(p)}; not removed")
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
            done.append(f"rm -r {p}")


def acquire_host_lock(timeout: float = 0.0) -> IO[str]:
    """The host-wide real-node lock (an exclusive flock on LOCK_FILE), held while the returned
    file stays open; HostStateError if another holder keeps it for ``timeout`` seconds."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fh = LOCK_FILE.open("a")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.close()
                raise HostStateError(
                    f"another real node runs on this host (it holds {LOCK_FILE})"
                ) from None
            time.sleep(1)


def pids_with_arg(marker: str) -> list[int]:
    """Pids of processes with ``marker`` in an argument (their cmdline)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in arg for arg in cmdline):
            pids.append(int(entry.name))
    return pids


def repair_host(bridge: str) -> list[str]:
    """Restore the host from the snapshot a killed run left in STATE_FILE (caller holds the
    lock): kill that run's node processes, then restore everything the snapshot recorded."""
    snap = HostSnapshot.load(STATE_FILE)
    done = []
    for pid in pids_with_arg("/tmp/ffrn-"):
        try:
            os.kill(pid, signal.SIGKILL)
            done.append(f"SIGKILL leftover node process {pid}")
        except ProcessLookupError:
            pass
    time.sleep(1)
    # The killed run's work dirs (only one real node runs at a time: the caller holds the lock).
    workdirs = [p for p in Path("/tmp").glob("ffrn-*") if not p.name.startswith("ffrn-tree-")]
    done += snap.restore(workdirs, bridge)
    left = snap.diff()
    if left:
        raise HostStateError(f"could not repair the host from {STATE_FILE}: {left}")
    for w in workdirs:
        if not mounts_under(w):
            shutil.rmtree(w, ignore_errors=True)
            done.append(f"rm -r {w}")
    STATE_FILE.unlink()
    return done
