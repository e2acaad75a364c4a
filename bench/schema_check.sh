#!/usr/bin/env bash
# `schemathesis run --checks all` against a live API with a worker and Redis: the schema tells the truth.
# Usage: bash bench/schema_check.sh [extra schemathesis options]. Exits with schemathesis's status.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis_port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
bash scripts/redis.sh "$redis_port" "$work/redis"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
export HOPPATCH_REDIS_URL="redis://127.0.0.1:$redis_port/0" HOPPATCH_ARTIFACT_DIR="$work/artifacts"
export HOPPATCH_WORKER_METRICS_PORT=0 HOPPATCH_CACHE="$work/cache" HOPPATCH_TENANT_RATE=0
.venv/bin/hoppatch serve --port "$port" >"$work/api.log" 2>&1 & pids+=($!)
.venv/bin/hoppatch worker >"$work/worker.log" 2>&1 & pids+=($!)
key=$(.venv/bin/hoppatch keys create --tenant schema-check 2>/dev/null)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.3
done
.venv/bin/schemathesis --config-file bench/schemathesis.toml run "http://127.0.0.1:$port/schema/openapi.json" \
  --checks all --header "X-API-Key: $key" --max-examples 60 --phases examples,coverage,fuzzing,stateful --workers 2 "$@" </dev/null
