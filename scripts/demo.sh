#!/usr/bin/env bash
# The main job: a real patch of the built-in Gemma 3 270M through the real service.
# Starts Redis, the API and a worker, submits the shipped examples over HTTP, waits, prints the result; then
# submits a second release's failures as a patch on top of the first, re-checking the first patch's probes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
port=${HOPPATCH_DEMO_REDIS_PORT:-6392}
api_port=${HOPPATCH_DEMO_API_PORT:-8000}
run=.hoppatch/demo
mkdir -p "$run"
bash scripts/redis.sh "$port" "$run/redis"
export HOPPATCH_REDIS_URL="redis://127.0.0.1:$port/0" HOPPATCH_AUTH=off HOPPATCH_ARTIFACT_DIR="$PWD/.hoppatch/artifacts"
export HOPPATCH_WORKER_METRICS_PORT=${HOPPATCH_WORKER_METRICS_PORT:-9101}
.venv/bin/hoppatch serve --port "$api_port" >"$run/api.log" 2>&1 &
api=$!
.venv/bin/hoppatch worker >"$run/worker.log" 2>&1 &
worker=$!
trap 'kill $api $worker 2>/dev/null; wait $api $worker 2>/dev/null; redis-cli -p "$port" shutdown >/dev/null 2>&1 || true' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$api_port/readyz" >/dev/null && break; sleep 0.2; done
echo "API on http://127.0.0.1:$api_port (auth off for the demo), worker pid $worker; logs in $run/"
out=".hoppatch/demo-artifacts/$(date +%Y%m%d-%H%M%S)"
started=$(date +%s)
.venv/bin/hoppatch submit --server "http://127.0.0.1:$api_port" --model builtin:gemma-3-270m \
  --examples examples/gemma-3-270m.json --preamble-file examples/preamble.txt \
  --wait --download "$out" --json "$@" | tee "$run/first.out"
echo "end-to-end $(( $(date +%s) - started )) s; artifacts downloaded to $out"
first=$(head -1 "$run/first.out")
echo "next release: new failures, patched on top of $first; its probes are re-run as a regression check"
.venv/bin/hoppatch submit --server "http://127.0.0.1:$api_port" --model builtin:gemma-3-270m \
  --examples examples/gemma-3-270m-next.json --preamble-file examples/preamble.txt \
  --base-patch "$first" --fail-on-regression --download "$out-stacked" --json "$@"
echo "stacked patch downloaded to $out-stacked; apply both in order with:"
echo "  .venv/bin/hoppatch apply --model builtin:gemma-3-270m --delta $out/delta.safetensors --delta $out-stacked/delta.safetensors --out DIR"
echo "worker metrics (http://127.0.0.1:$HOPPATCH_WORKER_METRICS_PORT/metrics):"
curl -s "http://127.0.0.1:$HOPPATCH_WORKER_METRICS_PORT/metrics" \
  | grep -E '^hoppatch_worker_(jobs_total|stage_seconds_sum|examples_patched_total|model_cache_total|model_load_seconds_sum)' || true
