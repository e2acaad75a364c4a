#!/usr/bin/env bash
# The test command: set up, start a throwaway Redis, run the whole suite, stop Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
port=${HOPPATCH_TEST_REDIS_PORT:-6391}
dir=$(mktemp -d)
bash scripts/redis.sh "$port" "$dir"
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
export HOPPATCH_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
.venv/bin/python -m pytest "$@"
