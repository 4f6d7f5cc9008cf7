#!/usr/bin/env bash
# One entry point for a fresh machine: sets up what fedfleet needs (a virtualenv with the
# package and its dev tools, and redis-server; later tiers add the cluster binaries), cached so
# a second run is fast, then runs the demo job or every test tier.
#
#   bash deploy/dev.sh demo   # set up, then train the digits example embedded
#   bash deploy/dev.sh test   # set up, then lint, type-check and run every test tier
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv="$repo/.venv"
python=${PYTHON:-python3}

setup_python() {
  local stamp="$venv/.fedfleet-stamp" want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  echo "==> setting up $venv"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[dev]"
  echo "$want" >"$stamp"
}

setup_redis() {
  # Tests and the dev runs start their own redis-server on a free loopback port, so only the
  # binary is needed; a system service the package may start is stopped again.
  command -v redis-server >/dev/null && return
  echo "==> installing redis-server"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "redis-server is missing: install it (needs root)" >&2; exit 1; }
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  { "${sudo[@]}" service redis-server stop || true; } >/dev/null 2>&1
}

setup() {
  setup_python
  setup_redis
}

run_tests() {
  export PATH="$venv/bin:$PATH"
  echo "==> ruff";          ruff check .
  echo "==> ruff format";   ruff format --check .
  echo "==> mypy --strict"; mypy
  echo "==> import layers"; lint-imports --no-cache
  echo "==> pytest";        python -m pytest "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)  setup_python; exec "$venv/bin/fedfleet" demo "$@" ;;
  test)  setup; run_tests "$@" ;;
  setup) setup ;;
  *) echo "usage: bash deploy/dev.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
