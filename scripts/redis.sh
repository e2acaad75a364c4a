#!/usr/bin/env bash
# Start a private redis-server for the demo or the tests: `scripts/redis.sh PORT DIR` (AOF fsynced on every write, noeviction).
set -euo pipefail
port=$1 dir=$2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)  # redis-server resolves paths after it changes into --dir
redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always \
  --maxmemory-policy noeviction --save "" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
for _ in $(seq 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "redis-server did not start on port $port (see $dir/redis.log)" >&2
exit 1
