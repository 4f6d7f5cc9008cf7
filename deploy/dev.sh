#!/usr/bin/env bash
# One entry point for a fresh machine: sets up what fedfleet needs (a virtualenv with the
# package and its dev tools; later tiers add redis-server and the cluster binaries), cached so
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
  test)  setup_python; run_tests "$@" ;;
  setup) setup_python ;;
  *) echo "usage: bash deploy/dev.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
