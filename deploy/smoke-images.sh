#!/usr/bin/env bash
# Smoke-test the archives deploy/build-images.sh wrote, with runc and no daemon: each docker-archive
# is unpacked layer by layer (whiteouts applied, as a runtime would) and run as the image says
# (its entrypoint, user, env, workdir) with a read-only root filesystem and a tmpfs at /tmp (the
# chart's emptyDir), in its own namespaces. Not a pytest test: it needs root and the images.
#
#   bash deploy/smoke-images.sh [path/to/images/env.sh]
#
# Checks: each archive names its image as env.sh says; `fedfleet --help` in the services image
# and `fedfleet operator --help` in the operator image, as uid 65534; that the root is read-only
# there; `redis-server --version` as uid 999. Everything it creates is under
# $CACHE/images/smoke.* and removed at exit (runc's state too).
set -euo pipefail

CACHE=${FEDFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedfleet}
env_sh=${1:-$CACHE/images/env.sh}
log() { printf '[smoke-images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (runc)"
[[ -f $env_sh ]] || die "no $env_sh: run bash deploy/build-images.sh first"
# shellcheck source=/dev/null
source "$env_sh"
if ! command -v runc >/dev/null; then
    log "installing Debian's runc"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends runc >/dev/null
fi

# Shared with other smoke runs, exclusive of build-images.sh (which rewrites and prunes archives).
exec 9>"$CACHE/images/.lock"
flock -s 9
work=$(mktemp -d "$CACHE/images/smoke.XXXXXX")
cleanup() {
    local c
    for c in $(runc --root "$work/runc" list -q 2>/dev/null); do
        runc --root "$work/runc" delete -f "$c" >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# unpack <archive> <name> <dir>: the image's layers into <dir>/rootfs, its config into
# <dir>/image.json; fails if the archive does not carry <name>.
unpack() {
    python3 - "$@" <<'EOF'
import json, os, shutil, sys, tarfile
archive, name, out = sys.argv[1:]
rootfs = os.path.join(out, "rootfs")
os.makedirs(rootfs)
with tarfile.open(archive) as outer:
    (manifest,) = json.load(outer.extractfile("manifest.json"))
    if name not in manifest["RepoTags"]:
        sys.exit(f"{archive} names {manifest['RepoTags']}, not {name}")
    config = json.load(outer.extractfile(manifest["Config"]))
    for layer in manifest["Layers"]:
        with tarfile.open(fileobj=outer.extractfile(layer), mode="r|") as tar:
            for member in tar:
                path = os.path.normpath(member.name).lstrip("/")
                if path.startswith(".."):
                    sys.exit(f"{archive}: layer entry outside the root: {member.name}")
                head, base = os.path.split(path)
                target = os.path.join(rootfs, head)
                if base == ".wh..wh..opq":  # opaque: the lower layers' entries of this dir go
                    for entry in os.listdir(target):
                        p = os.path.join(target, entry)
                        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                    continue
                if base.startswith(".wh."):  # whiteout: the lower layers' entry goes
                    p = os.path.join(target, base[4:])
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p)
                    elif os.path.lexists(p):
                        os.remove(p)
                    continue
                p = os.path.join(rootfs, path)
                if os.path.lexists(p) and not (os.path.isdir(p) and member.isdir()):
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                tar.extract(member, rootfs, numeric_owner=True, filter="fully_trusted")
json.dump(config["config"], open(os.path.join(out, "image.json"), "w"))
EOF
}

# run_image <archive> <name> <expected uid> <want in output> <args...>: run the image's
# entrypoint with <args> (or, if the first arg is --exec, replace the entrypoint entirely).
n=0
run_image() {
    local tar=$1 name=$2 uid=$3 want=$4 bundle out rc=0
    shift 4
    n=$((n + 1))
    bundle=$work/image-$(basename "$tar" .tar)
    [[ -d $bundle/rootfs ]] || unpack "$tar" "$name" "$bundle"
    (cd "$bundle" && rm -f config.json && runc spec)
    python3 - "$bundle" "$@" <<'EOF'
import json, sys
bundle, *args = sys.argv[1:]
spec = json.load(open(f"{bundle}/config.json"))
image = json.load(open(f"{bundle}/image.json"))
user = image.get("User") or "0:0"
uid, _, gid = user.partition(":")
if args and args[0] == "--exec":
    argv = args[1:]
else:
    argv = (image.get("Entrypoint") or []) + (args or image.get("Cmd") or [])
spec["process"].update(
    terminal=False, args=argv, env=image.get("Env") or [], cwd=image.get("WorkingDir") or "/",
    user={"uid": int(uid), "gid": int(gid or uid)},
)
spec["root"] = {"path": f"{bundle}/rootfs", "readonly": True}
spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777", "size=64m"]})
json.dump(spec, open(f"{bundle}/config.json", "w"))
EOF
    out=$(cd "$bundle" && runc --root "$work/runc" run "smoke$n-$$" 2>&1) || rc=$?
    ((rc == 0)) || die "$name $*: exit $rc: $out"
    [[ $out == *"$want"* ]] || die "$name $*: output lacks '$want': $out"
    local got
    got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["process"]["user"]["uid"])' "$bundle/config.json")
    [[ $got == "$uid" ]] || die "$name runs as uid $got, want $uid (the image's USER)"
    local what=${*//$'\n'/ }
    log "ok: $name ${what:0:50} (uid $uid, read-only root) -> ${out%%$'\n'*}"
}

t0=$(date +%s)
run_image "$FEDFLEET_IMAGE_SERVICES_TAR" "$FEDFLEET_IMAGE_SERVICES" 65534 "coordinator" --help
run_image "$FEDFLEET_IMAGE_SERVICES_TAR" "$FEDFLEET_IMAGE_SERVICES" 65534 "uid=65534 ro=30" \
    --exec python3 -c 'import os, errno
try:
    open("/fedfleet-write-test", "w")
    print("root is writable")
except OSError as e:
    print(f"uid={os.getuid()} ro={e.errno}")'
run_image "$FEDFLEET_IMAGE_OPERATOR_TAR" "$FEDFLEET_IMAGE_OPERATOR" 65534 "usage" operator --help
run_image "$FEDFLEET_IMAGE_REDIS_TAR" "$FEDFLEET_IMAGE_REDIS" 999 "Redis server v=7" \
    --exec redis-server --version
log "all images ran in $(($(date +%s) - t0)) s"
