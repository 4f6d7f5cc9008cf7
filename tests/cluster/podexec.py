"""Exec helper of the node agent: becomes one container process.

Run by the agent (as root) as ``python -I -S podexec.py SPEC.json``; standard library only, so it
starts in a few milliseconds. It reads and deletes the spec, then either

* creates the container's sandbox: a private mount namespace (``unshare(CLONE_NEWNS)``, mount
  propagation of ``/`` made private, like ``unshare --mount --propagation private``) and UTS
  namespace (hostname = the pod's hostname), then bind-mounts each volume (and the pod's
  ``/etc/hosts``) at its mountPath, read-only where asked; or
* joins the mount/UTS namespaces of a running container (``join_pid``: exec probes),

then drops privileges (setgroups/setgid/setuid), sets ``PR_SET_PDEATHSIG`` so the process dies
with the agent, changes to the working directory and ``execve``\\ s the resolved command with the
container's environment. Any failure before exec prints one line to stderr and exits 128.

Spec keys: ``path`` (resolved executable), ``argv``, ``env`` (dict), ``cwd``, ``uid``, ``gid``,
``groups``, ``hostname``, ``mounts`` ([{source, target, read_only}]), ``expose``
([{cover, keep: [paths]}]: private directories to cover with a tmpfs, re-exposing only ``keep``;
each mount may also carry ``keep``: paths below its target bound back on top of it),
``read_only_root`` (remount ``/`` read-only after the volume mounts), ``no_new_privs``
(allowPrivilegeEscalation: false), ``join_pid``, ``agent_pid``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(
    source: str | None, target: str, flags: int, fstype: str | None = None, data: str | None = None
) -> None:
    src = source.encode() if source is not None else None
    fs = fstype.encode() if fstype is not None else None
    opts = data.encode() if data is not None else None
    _check(
        _libc.mount(src, target.encode(), fs, ctypes.c_ulong(flags), opts),
        f"mount {source} {target}",
    )


def _expose(entries: list[dict[str, object]]) -> None:
    """Cover each private directory (e.g. /root, mode 0700) with an empty tmpfs (0755) and
    bind-mount back only the paths a non-root container needs below it (e.g. the Python
    installation the repo's venv points into)."""
    for entry in entries:
        cover = str(entry["cover"])
        keep = [str(k) for k in entry.get("keep") or []]  # type: ignore[attr-defined]
        fds = [(k, os.open(k, os.O_PATH)) for k in keep]
        try:
            _mount("tmpfs", cover, MS_NOSUID | MS_NODEV, "tmpfs", "mode=0755,size=1m")
            for path, fd in fds:
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(path, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "a").close()
                _mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC)
        finally:
            for _, fd in fds:
                os.close(fd)


def _sandbox(spec: dict[str, object]) -> None:
    join_pid = spec.get("join_pid")
    if isinstance(join_pid, int) and join_pid > 0:
        for ns, flag in (("mnt", CLONE_NEWNS), ("uts", CLONE_NEWUTS)):
            fd = os.open(f"/proc/{join_pid}/ns/{ns}", os.O_RDONLY)
            try:
                _check(_libc.setns(fd, flag), f"setns {ns} of pid {join_pid}")
            finally:
                os.close(fd)
        return
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    mounts = spec.get("mounts") or []
    assert isinstance(mounts, list)
    # Open every source first: a volume mounted over e.g. /tmp must not hide the sources of the
    # mounts after it (they live in the agent's state dir).
    fds = [os.open(str(m["source"]), os.O_PATH) for m in mounts]
    # ...and so must the paths a volume would hide that the container runs from (bound back).
    kept = [[(str(k), os.open(str(k), os.O_PATH)) for k in m.get("keep") or []] for m in mounts]
    expose = spec.get("expose") or []
    assert isinstance(expose, list)
    _expose(expose)
    hostname = str(spec.get("hostname") or "")
    if hostname:
        raw = hostname.encode()
        _check(_libc.sethostname(raw, len(raw)), "sethostname")
    for m, fd, keep in zip(mounts, fds, kept, strict=True):
        source, target = f"/proc/self/fd/{fd}", str(m["target"])
        if not os.path.lexists(target):  # e.g. nested inside another volume
            if os.path.isdir(source):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
        _mount(source, target, MS_BIND | MS_REC)
        if m.get("read_only"):
            _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
        for path, kfd in keep:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{kfd}", path, MS_BIND | MS_REC)
            os.close(kfd)
    if spec.get("read_only_root"):  # securityContext.readOnlyRootFilesystem; volumes stay as set
        _mount(None, "/", MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: podexec.py SPEC.json", file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as fh:
            spec = json.load(fh)
        os.unlink(argv[1])
        _sandbox(spec)
        gid, uid = spec.get("gid"), spec.get("uid")
        if gid is not None or uid is not None:
            os.setgroups([int(g) for g in spec.get("groups") or []])
        if gid is not None:
            os.setgid(int(gid))
        if uid is not None:
            os.setuid(int(uid))
        # After the credential change (which clears it): die with the agent.
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        if os.getppid() != int(spec.get("agent_pid") or os.getppid()):
            return 137  # the agent is already gone
        if spec.get("no_new_privs"):  # allowPrivilegeEscalation: false
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        os.chdir(str(spec.get("cwd") or "/"))
        os.umask(0o022)
        env = {str(k): str(v) for k, v in dict(spec["env"]).items()}
        os.execve(str(spec["path"]), [str(a) for a in spec["argv"]], env)
    except Exception as exc:
        print(f"fedfleet-agent: cannot start container: {exc}", file=sys.stderr, flush=True)
        return 128
    return 128  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv))
