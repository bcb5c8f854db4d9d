#!/usr/bin/env bash
# End-to-end benchmark, in one run on this machine: a fast fake Circuit (nginx with canned token, JSON and SSE
# answers), then one after another the fake directly, nginx proxying to it (what a proxy can do here), and the
# release bridge with every safeguard on (subkeys, a policy with limits, the SQLite ledger, Splunk events to a fake
# HEC that accepts them). wrk at concurrency 1 and 64, JSON and SSE. Any error fails the run.
#
#   scripts/bench.sh [--duration SECONDS] [--out FILE]   # about two minutes with the default 6 s per measurement
#   scripts/bench.sh --soak [--soak-seconds 300]          # concurrency 64 for five minutes: RSS must not grow
#
# Needs nginx and wrk (apt-get install nginx-light wrk) and the release binary (BIN_DIR, default .build/release;
# build it with `swift build -c release`). Prints a table; writes JSON to --out (default bench-results.json).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN_DIR=${BIN_DIR:-.build/release}
BRIDGE=$BIN_DIR/oai-to-circuit
duration=6 out=bench-results.json soak=0 soak_seconds=300
while (($#)); do
    case $1 in
        --duration) duration=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --soak) soak=1; shift ;;
        --soak-seconds) soak_seconds=$2; shift 2 ;;
        *) echo "bench.sh: unknown option $1" >&2; exit 64 ;;
    esac
done
for tool in nginx wrk python3; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing (apt-get install nginx-light wrk)" >&2; exit 1; }
done
[[ -x $BRIDGE ]] || { echo "bench.sh: no $BRIDGE: run swift build -c release (or set BIN_DIR)" >&2; exit 1; }

work=$(mktemp -d)
nginx_pid= bridge_pid=
cleanup() {
    [[ -n $bridge_pid ]] && kill "$bridge_pid" 2>/dev/null && wait "$bridge_pid" 2>/dev/null
    [[ -f $work/nginx.pid ]] && kill "$(cat "$work/nginx.pid")" 2>/dev/null
    sleep 0.2
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
circuit=$(free_port) proxy=$(free_port) hec=$(free_port) port=$(free_port)

# --- The fake Circuit, the reference proxy and the fake HEC, all in one nginx ---------------------------------
json='{"id": "chatcmpl-bench", "object": "chat.completion", "created": 1764412245, "model": "gpt-4o", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the benchmark"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}'
chunk() { printf 'data: {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764412245, "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": null}]}\\n\\n' "$1"; }
sse="$(chunk Hello)$(chunk ' from')$(chunk ' the')$(chunk ' benchmark')"
sse+='data: {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764412245, "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}\n\ndata: [DONE]\n\n'
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/body;
    proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi;
    uwsgi_temp_path $work/uwsgi;
    scgi_temp_path $work/scgi;
    keepalive_requests 1000000;
    upstream circuit { server 127.0.0.1:$circuit; keepalive 128; }
    server {
        listen 127.0.0.1:$circuit;
        location = /oauth2/default/v1/token {
            default_type application/json;
            return 200 '{"token_type": "Bearer", "expires_in": 3600, "access_token": "bench-token"}';
        }
        location ~ ^/openai/deployments/bench-sse/chat/completions$ {
            default_type text/event-stream;
            return 200 '$sse';
        }
        location ~ ^/openai/deployments/[^/]+/chat/completions$ {
            default_type application/json;
            return 200 '$json';
        }
    }
    server {
        listen 127.0.0.1:$proxy;
        location / {
            proxy_pass http://circuit;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
    server {
        listen 127.0.0.1:$hec;
        location = /services/collector/event {
            default_type application/json;
            return 200 '{"text": "Success", "code": 0}';
        }
    }
}
EOF
nginx -c "$work/nginx.conf" -p "$work" 2>"$work/nginx-start.log" || { cat "$work/nginx-start.log" >&2; exit 1; }

# --- The bridge, every safeguard on ----------------------------------------------------------------------------
subkey=bench-subkey-0123456789abcdef
cat >"$work/quotas.json" <<EOF
{"_global": {"*": {"requests": 1000000000, "total_tokens": 100000000000, "period": "monthly"}, "o3": {"requests": 0}},
 "$subkey": {"gpt-4o": {"requests": 1000000000, "period": "daily"}}}
EOF
CIRCUIT_CLIENT_ID=bench CIRCUIT_CLIENT_SECRET=bench CIRCUIT_APPKEY=bench \
    CIRCUIT_BASE=http://127.0.0.1:$circuit TOKEN_URL=http://127.0.0.1:$circuit/oauth2/default/v1/token \
    QUOTA_DB_PATH=$work/quota.db QUOTAS_JSON_PATH=$work/quotas.json REQUIRE_SUBKEY=true \
    SPLUNK_HEC_URL=http://127.0.0.1:$hec SPLUNK_HEC_TOKEN=bench-hec \
    "$BRIDGE" serve --host 127.0.0.1 --port "$port" >"$work/bridge.log" 2>&1 </dev/null &
bridge_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "bench.sh: the bridge did not start" >&2; cat "$work/bridge.log" >&2; exit 1; }

# --- wrk ------------------------------------------------------------------------------------------------------
script() {  # stream(0|1) -> a wrk Lua file posting a chat body with the subkey
    local stream=$1 file=$work/post-$1.lua
    local model=gpt-4o extra=
    if ((stream)); then model=bench-sse extra=', "stream": true'; fi
    cat >"$file" <<EOF
wrk.method = "POST"
wrk.body = '{"model": "$model", "messages": [{"role": "user", "content": "hi"}]$extra}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $subkey"
done = function(summary, latency, requests)
    local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout
    io.write(string.format("RESULT %.1f %.1f %.1f %d %d\n", summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99), errors, summary.requests))
end
EOF
    echo "$file"
}
results=()
failed=0
measure() {  # name target-url stream concurrency
    local name=$1 url=$2 stream=$3 connections=$4 threads=1
    ((connections > 1)) && threads=2
    local line
    line=$(wrk -t"$threads" -c"$connections" -d"${duration}s" -s "$(script "$stream")" "$url" | grep '^RESULT') || true
    read -r _ rps p50 p99 errors requests <<<"${line:-RESULT 0 0 0 1 0}"
    ((errors == 0 && requests > 0)) || { echo "bench.sh: $name had $errors errors" >&2; failed=1; }
    results+=("$name|$rps|$p50|$p99|$errors")
    printf '%-34s %10s req/s  p50 %8s µs  p99 %8s µs  errors %s\n' "$name" "$rps" "$p50" "$p99" "$errors"
}
rss() { awk '/VmHWM/ { print $2 }' "/proc/$bridge_pid/status"; }

if ((soak)); then
    echo "soak: concurrency 64, JSON, ${soak_seconds}s; RSS (KiB) every 30 s"
    samples=()
    wrk -t2 -c64 -d"${soak_seconds}s" -s "$(script 0)" "http://127.0.0.1:$port/v1/chat/completions" >"$work/soak.out" &
    wrk_pid=$!
    while kill -0 "$wrk_pid" 2>/dev/null; do
        samples+=("$(awk '/VmRSS/ { print $2 }' "/proc/$bridge_pid/status")")
        echo "  rss ${samples[-1]} KiB"
        sleep 30
    done
    wait "$wrk_pid"
    grep '^RESULT' "$work/soak.out"
    first=${samples[1]:-${samples[0]}} last=${samples[-1]}
    echo "soak: RSS after the first 30 s $first KiB, at the end $last KiB, peak $(rss) KiB"
    python3 -c 'import sys; first, last = int(sys.argv[1]), int(sys.argv[2]); sys.exit(0 if last <= first * 1.10 else 1)' \
        "$first" "$last" || { echo "bench.sh: RSS grew by more than 10% during the soak" >&2; exit 1; }
    exit 0
fi

for stream in 0 1; do
    kind=$([[ $stream == 1 ]] && echo SSE || echo JSON)
    model=$([[ $stream == 1 ]] && echo bench-sse || echo gpt-4o)
    for connections in 1 64; do
        measure "direct  $kind c=$connections" "http://127.0.0.1:$circuit/openai/deployments/$model/chat/completions" "$stream" "$connections"
        measure "nginx   $kind c=$connections" "http://127.0.0.1:$proxy/openai/deployments/$model/chat/completions" "$stream" "$connections"
        measure "bridge  $kind c=$connections" "http://127.0.0.1:$port/v1/chat/completions" "$stream" "$connections"
    done
done
peak=$(rss)
printf 'bridge peak RSS: %s KiB\n' "$peak"
python3 - "$out" "$peak" "${results[@]}" <<'PYEOF'
import json, sys
out, peak, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
results = {}
for row in rows:
    name, rps, p50, p99, errors = row.split("|")
    results[" ".join(name.split())] = {"requests_per_second": float(rps), "p50_us": float(p50), "p99_us": float(p99),
                                       "errors": int(errors)}
summary = {}
for kind in ("JSON", "SSE"):
    direct, nginx, bridge = (results[f"{who} {kind} c=1"] for who in ("direct", "nginx", "bridge"))
    summary[f"{kind} added p50 at c=1 (us)"] = round(bridge["p50_us"] - direct["p50_us"], 1)
    summary[f"{kind} throughput at c=64, share of nginx"] = round(
        results[f"bridge {kind} c=64"]["requests_per_second"] / results[f"nginx {kind} c=64"]["requests_per_second"], 3)
json.dump({"results": results, "summary": summary, "bridge_peak_rss_kib": peak}, open(out, "w"), indent=2)
for key, value in summary.items():
    print(f"{key}: {value}")
PYEOF
exit "$failed"
