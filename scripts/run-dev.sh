#!/usr/bin/env bash
# Set up and run the whole app on a CPU dev box: install, fetch the offline models,
# load both sample stores' knowledge (tenants lumen and voltmart) into Milvus Lite, then
# `serve run` the dev config.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# Ray Serve's throughput-optimized mode behind its HAProxy ingress, a slower controller loop,
# metrics export and log-file scan, no idle worker started ahead or kept (docs/deploying.md,
# "Ray settings for serving").
export RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_PROXY_USE_GRPC=1
export RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5 RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000
export RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0 LOG_NAME_UPDATE_INTERVAL_S=5 RAY_prestart_worker_first_driver=0
export RAY_num_workers_soft_limit=0
# An orchestrator replica that stops stays open 1 s for HAProxy (on this box) to drop it, not
# Ray's 30 s (meant for a load balancer elsewhere), which every Ctrl-C would wait out.
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=1
config=serve_config.dev.yaml
port="${PORT:-8000}"

scripts/bootstrap.sh cpu,devmodels
.venv/bin/cs-fetch-models --dest models
# Milvus Lite admits one process per file: load the knowledge base before the app opens it.
.venv/bin/cs-knowledge-sync --config "$config" --sources knowledge_sync/samples/sources.dev.yaml --no-progress

# The example storefront (orders, tickets, coupons) that the dev config's tools call, and its
# product page with the chat widget. Its shopper tokens are signed with LUMEN_WIDGET_SECRET,
# which the app checks them with (tenants[].widget.secret_env): one random secret per run.
export LUMEN_WIDGET_SECRET="${LUMEN_WIDGET_SECRET:-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))')}"
.venv/bin/python -m examples.storefront --port 8100 --db data/storefront.db --app-url "http://127.0.0.1:${port}" &
shop_pid=$!
# HAProxy outlives an app that was killed rather than stopped (`ray stop --force`, a crash):
# orphaned, it keeps the port and the next start fails. Stop such a leftover of a dev app
# (its config in HAProxy's default folder, its parent no HAProxy manager of a running app).
for pid in $(pgrep -f "haproxy -db -f /tmp/haproxy-serve/" || true); do
    parent=$(ps -o ppid= -p "$pid" | tr -d ' ')
    ps -o args= -p "$parent" | grep -q HAProxyManager || kill "$pid"
done
start=$(date +%s)
.venv/bin/serve run "$config" &
serve_pid=$!
trap 'kill -TERM "$serve_pid" "$shop_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null' EXIT INT TERM
# The proxy accepts connections before the replicas are ready: wait for /healthz to say ok.
until curl -sf -o /dev/null "http://127.0.0.1:${port}/healthz"; do
    kill -0 "$serve_pid" 2>/dev/null || { echo "serve run exited; see the log above" >&2; exit 1; }
    sleep 2
done
cat <<MSG

The customer-service app is up after $(( $(date +%s) - start )) s at http://127.0.0.1:${port}
  API docs: http://127.0.0.1:${port}/docs     health: http://127.0.0.1:${port}/healthz
  The storefront's product page with the chat widget: http://127.0.0.1:8100/products/LH-LINEN-01
  The operators' console: http://127.0.0.1:${port}/console  (key dev-lumen-operator-key, or dev-admin-key)
  Prometheus metrics: http://127.0.0.1:$(cat /tmp/ray/session_latest/metrics_export_port_* 2>/dev/null | head -1)/metrics
Try:
  curl -s http://127.0.0.1:${port}/v1/chat -H 'Authorization: Bearer dev-lumen-key' \\
       -H 'Content-Type: application/json' \\
       -d '{"user_id": "shopper-1", "message": "How many days do I have to return an item?"}'
  (order questions such as "Where is order LH-1001?" call the example storefront at :8100)
What shoppers asked, and how it went (tenants, keys and records live in data/control-plane.db):
  curl -s http://127.0.0.1:${port}/admin/tenants/lumen/insights -H 'X-API-Key: dev-lumen-operator-key'
  (docs/control-plane.md: tenants and keys at runtime, reviews, exports, the loop to a new adapter)
Stop with Ctrl-C.
MSG
wait "$serve_pid"
