#!/usr/bin/env bash
# One entry point for a fresh machine: sets up everything fedfleet and its tests need, then runs
# the demo job or every test tier.
#
#   bash deploy/dev.sh demo    # set up Python, then train the digits example embedded
#   bash deploy/dev.sh test    # set up everything, then lint, type-check and run every test tier
#   bash deploy/dev.sh setup   # only the setup of `test`
#   bash deploy/dev.sh images  # only the container images (deploy/build-images.sh)
#
# Setup happens here, before pytest starts, never inside a test fixture:
#   - Debian packages (redis-server, chromium, and what the real node and the image builds run:
#     containerd, runc, the CNI plugins, conntrack, iptables, nftables, buildah, debootstrap),
#     with one `apt-get update` when something is missing;
#   - uv, pinned, and the project's virtualenv (.venv in the clone) installed by uv from its
#     wheel cache;
#   - the cluster binaries (etcd, kube-apiserver and friends, kubectl, helm), built from Go
#     modules by deploy/build-binaries.sh, then the node's (kubelet, kube-proxy, CoreDNS) by
#     deploy/build-node.sh, in the background while the rest is set up;
#   - the container images the cluster tier's real node runs (pause, redis, and
#     fedfleet/services and fedfleet/operator from deploy/docker/), built daemonlessly with
#     buildah by deploy/build-images.sh, each keyed by its content, in the background as well
#     (a change to the Python sources rebuilds only the wheel layer: seconds);
#   - an S3-compatible server (versitygw) for the model-storage tests, built from Go modules by
#     deploy/build-s3-server.sh, in the background as well;
#   - for the browser tier: Debian's chromium and a pinned playwright-core from npm (the client
#     library only: it downloads no browser of its own).
# Everything slow is cached OUTSIDE the clone, keyed by version, under
# ${FEDFLEET_CACHE:-$XDG_CACHE_HOME/fedfleet or ~/.cache/fedfleet}: uv's wheel cache, the Go
# module and build caches and the built binaries. A fresh clone on a warm machine reaches pytest
# in well under a minute; a fresh machine pays the Go build once (see the README for times).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv="$repo/.venv"
python=${PYTHON:-python3}
cache=${FEDFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedfleet}
export FEDFLEET_CACHE=$cache
UV_VERSION=0.13.9
uv="$cache/tools/uv-$UV_VERSION/bin/uv"
export UV_CACHE_DIR="$cache/uv"
# Go's caches live with ours (not under a possibly empty $HOME/go), shared by every clone.
export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
# Debian packages the test tiers run for real: Redis, the browser, the real node (containerd,
# runc, CNI plugins, conntrack, iptables, nftables) and the daemonless image build (buildah,
# debootstrap, gcc for the pause binary). build-node.sh and build-images.sh install the same
# when run alone; here they are installed once, before either starts.
APT_PACKAGES=(redis-server chromium containerd runc containernetworking-plugins conntrack
  iptables nftables buildah debootstrap gcc libc6-dev)

say() { printf '==> %s\n' "$*"; }
die() { printf 'dev.sh: ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s; }
declare -A took=()

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; return; fi
  command -v sudo >/dev/null || die "needs root to run: $* (install sudo or run as root)"
  sudo "$@"
}

setup_apt() {
  local t0 missing=() p
  t0=$(now)
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    # Tests start their own redis-server on a free loopback port, and their own containerd;
    # stop system ones the packages may have started.
    { as_root service redis-server stop || true; } >/dev/null 2>&1
    { as_root service containerd stop || true; } >/dev/null 2>&1
  fi
  took[apt]=$(($(now) - t0))
}

setup_uv() {
  [[ -x $uv ]] && return
  say "installing uv $UV_VERSION into $cache/tools"
  local dir="$cache/tools/uv-$UV_VERSION"
  rm -rf "$dir.tmp"
  "$python" -m venv "$dir.tmp" || die "$python -m venv failed (install python3-venv)"
  "$dir.tmp/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" \
    || die "pip install uv==$UV_VERSION failed"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  # The venv's scripts name their interpreter by the .tmp path; call uv's binary directly.
  [[ -x $uv ]] || die "uv is missing at $uv"
}

setup_python() {
  local t0 stamp="$venv/.fedfleet-stamp" want
  t0=$(now)
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    took[python]=$(($(now) - t0))
    return
  fi
  setup_uv
  say "setting up $venv (uv, wheel cache in $UV_CACHE_DIR)"
  rm -rf "$venv"
  "$uv" venv --quiet --seed --python "$(command -v "$python")" "$venv" || die "uv venv failed"
  "$uv" pip install --quiet --python "$venv/bin/python" -e ".[dev]" \
    || die "installing the Python packages failed (uv pip install -e .[dev])"
  echo "$want" >"$stamp"
  took[python]=$(($(now) - t0))
}

# The browser tests drive Debian's chromium with Playwright from a small Node script. Only
# playwright-core is installed (no browser download), pinned, once per machine outside the clone;
# the tests find it through FEDFLEET_NODE_PATH (its node_modules folder).
PLAYWRIGHT_VERSION=1.65.1
setup_node() {
  local t0 dir="$cache/node/playwright-core-$PLAYWRIGHT_VERSION"
  t0=$(now)
  if [[ ! -f $dir/node_modules/playwright-core/package.json ]]; then
    command -v npm >/dev/null || die "npm is missing: the browser tests need Node.js 20 and npm"
    say "installing playwright-core $PLAYWRIGHT_VERSION into $dir"
    rm -rf "$dir.tmp"
    npm install --prefix "$dir.tmp" --no-audit --no-fund --loglevel=error \
      "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null \
      || die "npm install playwright-core@$PLAYWRIGHT_VERSION failed"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
  fi
  export FEDFLEET_NODE_PATH="$dir/node_modules"
  setup_typescript
  took[node]=$(($(now) - t0))
}

# The TypeScript device client (clients/typescript) is compiled with a pinned tsc and Node's
# type definitions, installed once per machine under the cache like playwright-core; the build
# itself is a few seconds and runs on every setup (its output, dist/, is not committed). The
# tests run the built client with node (FEDFLEET_TS_CLIENT names its dist/ folder).
TYPESCRIPT_VERSION=5.9.3
NODE_TYPES_VERSION=20.19.43
setup_typescript() {
  local dir="$cache/node/typescript-$TYPESCRIPT_VERSION-node-$NODE_TYPES_VERSION"
  if [[ ! -f $dir/node_modules/typescript/package.json || ! -f $dir/node_modules/@types/node/package.json ]]; then
    command -v npm >/dev/null || die "npm is missing: the TypeScript client needs Node.js 20 and npm"
    say "installing typescript $TYPESCRIPT_VERSION and @types/node $NODE_TYPES_VERSION into $dir"
    rm -rf "$dir.tmp"
    npm install --prefix "$dir.tmp" --no-audit --no-fund --loglevel=error \
      "typescript@$TYPESCRIPT_VERSION" "@types/node@$NODE_TYPES_VERSION" >/dev/null \
      || die "npm install typescript@$TYPESCRIPT_VERSION @types/node@$NODE_TYPES_VERSION failed"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
  fi
  say "building clients/typescript (tsc $TYPESCRIPT_VERSION)"
  rm -rf clients/typescript/dist
  node "$dir/node_modules/typescript/bin/tsc" -p clients/typescript \
    --typeRoots "$dir/node_modules/@types" || die "tsc failed on clients/typescript"
  export FEDFLEET_TS_CLIENT="$repo/clients/typescript/dist"
}

# The cluster binaries take 15-20 minutes to build on a fresh 2-core machine, so they build in
# the background while Debian and Python packages install; the node's binaries (kubelet,
# kube-proxy, CoreDNS) follow them in the same job, reusing their compiled packages;
# wait_binaries joins the build.
# Runs "$@" in the background; its own wall time (not the time until it is joined) goes to
# the file $1 names, for the summary line.
timed_bg() {
  local seconds_file=$1
  shift
  rm -f "$seconds_file"
  { t=$(now); rc=0; "$@" || rc=$?; echo $(($(now) - t)) >"$seconds_file"; exit $rc; } &
}

binaries_pid=""
binaries_out="$cache/logs/build-binaries.out"
node_out="$cache/logs/build-node.out"
build_binaries_then_node() {
  bash deploy/build-binaries.sh >"$binaries_out" && bash deploy/build-node.sh >"$node_out"
}
start_binaries() {
  mkdir -p "$cache/logs"
  timed_bg "$binaries_out.seconds" build_binaries_then_node
  binaries_pid=$!
}

wait_binaries() {
  local rc=0
  wait "$binaries_pid" || rc=$?
  took[binaries]=$(cat "$binaries_out.seconds" 2>/dev/null || echo '?')
  ((rc == 0)) || die "building the cluster or node binaries failed (exit $rc): see the [build-binaries] or [build-node] lines above"
  local bin_dir
  bin_dir=$(tail -n 1 "$binaries_out")
  [[ -f $bin_dir/env.sh ]] || die "deploy/build-binaries.sh printed no bin dir with an env.sh"
  [[ -f $(tail -n 1 "$node_out") ]] || die "deploy/build-node.sh printed no env.sh"
  # The tests read the binaries from here; they never build anything themselves.
  export FEDFLEET_BINARIES="$bin_dir/env.sh"
}

# The images: debootstrap and pip (minutes) on a fresh machine, a wheel layer (seconds) after a
# source change, nothing when cached. They need the Debian packages, so they start after apt.
images_pid=""
images_out="$cache/logs/build-images.out"
start_images() {
  mkdir -p "$cache/logs"
  timed_bg "$images_out.seconds" as_root env FEDFLEET_CACHE="$cache" GOMODCACHE="$GOMODCACHE" \
    GOCACHE="$GOCACHE" bash deploy/build-images.sh >"$images_out"
  images_pid=$!
}

wait_images() {
  local rc=0
  wait "$images_pid" || rc=$?
  took[images]=$(cat "$images_out.seconds" 2>/dev/null || echo '?')
  ((rc == 0)) || die "building the container images failed (exit $rc): see the [build-images] lines above"
  [[ -f $(tail -n 1 "$images_out") ]] || die "deploy/build-images.sh printed no env.sh"
}

# The S3-compatible server the model-storage tests run (tests/s3_server.py reads its env file).
s3_pid=""
s3_out="$cache/logs/build-s3-server.out"
start_s3_server() {
  mkdir -p "$cache/logs"
  timed_bg "$s3_out.seconds" bash deploy/build-s3-server.sh >"$s3_out"
  s3_pid=$!
}

wait_s3_server() {
  local rc=0
  wait "$s3_pid" || rc=$?
  took[s3]=$(cat "$s3_out.seconds" 2>/dev/null || echo '?')
  ((rc == 0)) || die "building the S3 server failed (exit $rc): see the [build-s3-server] lines above"
}

setup_all() {
  local t0
  t0=$(now)
  start_binaries
  start_s3_server
  setup_apt
  start_images
  setup_python
  setup_node
  wait_binaries
  wait_s3_server
  wait_images
  say "setup done in $(($(now) - t0)) s (apt ${took[apt]} s, python ${took[python]} s, node ${took[node]} s, cluster and node binaries ${took[binaries]} s, s3 server ${took[s3]} s, images ${took[images]} s)"
}

run_tests() {
  export PATH="$venv/bin:$PATH"
  local t0
  t0=$(now)
  say "ruff";          ruff check .
  say "ruff format";   ruff format --check .
  say "mypy --strict"; mypy
  say "import layers"; lint-imports --no-cache
  say "pytest";        python -m pytest "$@"
  say "lint and tests done in $(($(now) - t0)) s"
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)  setup_python; exec "$venv/bin/fedfleet" demo "$@" ;;
  test)  setup_all; run_tests "$@" ;;
  setup) setup_all ;;
  images) exec bash deploy/build-images.sh "$@" ;;
  *) echo "usage: bash deploy/dev.sh demo|test|setup|images [args...]" >&2; exit 2 ;;
esac
