#!/usr/bin/env bash
# End-to-end benchmark, in one run on this machine: a fast fake Circuit (nginx with canned token, JSON and SSE
# answers), then one after another the fake directly, nginx proxying to it (what a proxy can do here), and the
# release bridge with every safeguard on (subkeys, a policy with limits, the SQLite ledger, Splunk events to a fake
# HEC that accepts them). wrk at concurrency 1 and 64, JSON and SSE. Any error fails the run.
#
# Concurrency 1 is measured in rounds (five of 2 s by default): each round measures the fake directly, nginx and the
# bridge back to back, each round starting one further along that order, so that a noisy stretch of a shared VM
# falls on all three alike, and a figure at c=1 is the median of its rounds. The latency the bridge adds is the median of the rounds' differences (bridge minus direct);
# each round's difference is printed and kept in the JSON too.
#
# Then two more of the performance issue's targets, each against a bridge of its own (same settings, fresh database),
# one bridge running at a time:
# - Splunk down or slow: the bridge's JSON c=64 run again, with SPLUNK_HEC_URL at a closed port, then at a HEC that
#   takes every batch but answers only after 5 s, the bridge's HEC timeout (scripts/bench_slow_hec.py), each
#   compared with a fresh bridge with Splunk accepting measured in the same round; three such rounds of
#   --round-seconds each, in turning order, and the median of the rounds' changes. Target: requests/s and p99 within 15% of the run
#   with Splunk accepting (a change for the better is no miss).
# - Streaming first byte: a python fake Circuit (scripts/bench_first_byte.py) sends a stream's first event, pauses
#   20 ms, then the rest; its client notes when the first byte arrives, 300 sequential streams each directly (what
#   measuring costs), through nginx (proxy_buffering off: what forwarding costs at best) and through the bridge.
#   Timed with the kernel's socket timestamps (sent by the fake, received by the client), so that the python
#   processes' own scheduling stays out; their clocks' figures are in the JSON too. Target: through the bridge,
#   p99 within 1 ms of Circuit sending it.
# Each measurement also prints the share of CPU time the hypervisor took from this VM while it ran (/proc/stat).
# A missed target is printed (TARGET MISS) and recorded in the JSON; it does not fail the run.
#
#   scripts/bench.sh [--duration SECONDS] [--out FILE]   # about 2.5 minutes with the default 6 s per measurement
#       [--rounds 5] [--round-seconds 2]                  # c=1 rounds; seconds per round (c=1, Splunk variants)
#       [--skip-splunk-variants] [--skip-first-byte] [--first-byte-streams 300]
#   scripts/bench.sh --soak [--soak-seconds 300]          # concurrency 64 for five minutes: RSS must not grow
#
# Needs nginx, wrk, python3 and curl (apt-get install nginx-light wrk) and the release binary (BIN_DIR, default
# .build/release; build it with `swift build -c release`). Prints a table; writes JSON to --out (default
# bench-results.json).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN_DIR=${BIN_DIR:-.build/release}
BRIDGE=$BIN_DIR/oai-to-circuit
duration=6 out=bench-results.json soak=0 soak_seconds=300 rounds=5 round_seconds=2
splunk_variants=1 first_byte=1 first_byte_streams=300
while (($#)); do
    case $1 in
        --duration) duration=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --round-seconds) round_seconds=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --soak) soak=1; shift ;;
        --soak-seconds) soak_seconds=$2; shift 2 ;;
        --skip-splunk-variants) splunk_variants=0; shift ;;
        --skip-first-byte) first_byte=0; shift ;;
        --first-byte-streams) first_byte_streams=$2; shift 2 ;;
        *) echo "bench.sh: unknown option $1" >&2; exit 64 ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ && $round_seconds =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --rounds and --round-seconds take whole numbers from 1" >&2; exit 64; }
for tool in nginx wrk python3 curl; do  # apt-get install nginx-light wrk python3 curl
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing" >&2; exit 1; }
done
[[ -x $BRIDGE ]] || { echo "bench.sh: no $BRIDGE: run swift build -c release (or set BIN_DIR)" >&2; exit 1; }

work=$(mktemp -d)
nginx_pid= bridge_pid= bridge_log= slow_hec_pid=
cleanup() {
    stop_bridge
    local pid
    for pid in $slow_hec_pid $nginx_pid; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
# Ctrl-C ends the run, not only the wrk or python measurement that catches it (the EXIT trap then cleans up).
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
wait_listening() {  # port log: until something accepts on the port; else the log, and the run fails
    for _ in $(seq 50); do (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done
    echo "bench.sh: nothing listens on port $1" >&2
    cat "$2" >&2
    exit 1
}
circuit=$(free_port) proxy=$(free_port) hec=$(free_port) port=$(free_port)
fb_upstream=$(free_port) fb_proxy=$(free_port)  # the python stream fake, and nginx in front of it

# --- The fake Circuit, the reference proxies and the fake HEC, all in one nginx --------------------------------
json='{"id": "chatcmpl-bench", "object": "chat.completion", "created": 1764412245, "model": "gpt-4o", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the benchmark"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}'
chunk() { printf 'data: {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764412245, "model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": null}]}\\n\\n' "$1"; }
sse="$(chunk Hello)$(chunk ' from')$(chunk ' the')$(chunk ' benchmark')"
sse+='data: {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764412245, "model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}}\n\ndata: [DONE]\n\n'
cat >"$work/nginx.conf" <<EOF
daemon off;  # a child of this script, which waits for it when it stops it
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
    upstream firstbyte { server 127.0.0.1:$fb_upstream; keepalive 8; }
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
        listen 127.0.0.1:$fb_proxy;
        location / {
            proxy_pass http://firstbyte;
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
nginx -c "$work/nginx.conf" -p "$work" 2>"$work/nginx-start.log" &
nginx_pid=$!
wait_listening "$hec" "$work/nginx-start.log"  # nginx opens all its ports at once

# --- The bridge, every safeguard on ----------------------------------------------------------------------------
subkey=bench-subkey-0123456789abcdef
cat >"$work/quotas.json" <<EOF
{"_global": {"*": {"requests": 1000000000, "total_tokens": 100000000000, "period": "monthly"}, "o3": {"requests": 0}},
 "$subkey": {"gpt-4o": {"requests": 1000000000, "period": "daily"}}}
EOF
start_bridge() {  # name circuit-base hec-url port: one bridge at a time, each with a database of its own
    local name=$1 base=$2 hec_url=$3 listen=$4
    # The token still comes from the nginx fake. A short shutdown grace: nothing is in flight when the bench stops
    # a bridge, and with Splunk down the shipper's drain would otherwise hold the stop for the whole 30 s default.
    CIRCUIT_CLIENT_ID=bench CIRCUIT_CLIENT_SECRET=bench CIRCUIT_APPKEY=bench \
        CIRCUIT_BASE=$base TOKEN_URL=http://127.0.0.1:$circuit/oauth2/default/v1/token \
        QUOTA_DB_PATH=$work/quota-$name.db QUOTAS_JSON_PATH=$work/quotas.json REQUIRE_SUBKEY=true \
        SPLUNK_HEC_URL=$hec_url SPLUNK_HEC_TOKEN=bench-hec SHUTDOWN_GRACE_SECONDS=2 \
        "$BRIDGE" serve --host 127.0.0.1 --port "$listen" >"$work/bridge-$name.log" 2>&1 </dev/null &
    bridge_pid=$! bridge_log=$work/bridge-$name.log
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$listen/health" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "bench.sh: the bridge ($name) did not start" >&2
    cat "$bridge_log" >&2
    exit 1
}
check_bridge() {  # a bridge that died mid-run fails it, with the end of its log (the temp dir goes with the run)
    [[ -z $bridge_pid ]] || kill -0 "$bridge_pid" 2>/dev/null && return
    echo "bench.sh: the bridge (pid $bridge_pid) is gone; the end of its log:" >&2
    grep -v " info request " "$bridge_log" | tail -20 >&2
    exit 1
}
stop_bridge() {  # gracefully, then for good should it hang
    [[ -n $bridge_pid ]] || return 0
    kill "$bridge_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$bridge_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$bridge_pid" 2>/dev/null || true
    wait "$bridge_pid" 2>/dev/null || true
    bridge_pid=
}
start_bridge main "http://127.0.0.1:$circuit" "http://127.0.0.1:$hec" "$port"

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
cpu_times() { awk '/^cpu / { print $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }  # steal, all
measure() {  # name target-url stream concurrency [seconds]
    local name=$1 url=$2 stream=$3 connections=$4 seconds=${5:-$duration} threads=1
    ((connections > 1)) && threads=2
    local line before after steal
    before=$(cpu_times)
    line=$(wrk -t"$threads" -c"$connections" -d"${seconds}s" -s "$(script "$stream")" "$url" | grep '^RESULT') || true
    after=$(cpu_times)
    # The share of the machine's CPU time the hypervisor gave to others while this ran: the VM ran slower by it.
    steal=$(awk -v b="$before" -v a="$after" 'BEGIN { split(b, x); split(a, y); t = y[2] - x[2]; printf "%.1f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }')
    read -r _ rps p50 p99 errors requests <<<"${line:-RESULT 0 0 0 1 0}"
    check_bridge
    ((errors == 0 && requests > 0)) || { echo "bench.sh: $name had $errors errors" >&2; failed=1; }
    results+=("$name|$rps|$p50|$p99|$errors|$steal")
    printf '%-38s %10s req/s  p50 %8s µs  p99 %8s µs  errors %s  steal %s%%\n' "$name" "$rps" "$p50" "$p99" "$errors" "$steal"
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

bridge_url=http://127.0.0.1:$port/v1/chat/completions
# Two seconds of traffic before the first measurement, as a running bridge would have had: its first request fetches
# the token, and a new database file grows its WAL and tables (at c=1, about 4 µs more in the first seconds).
wrk -t1 -c1 -d2s -s "$(script 0)" "$bridge_url" >/dev/null
for stream in 0 1; do
    kind=$([[ $stream == 1 ]] && echo SSE || echo JSON)
    model=$([[ $stream == 1 ]] && echo bench-sse || echo gpt-4o)
    targets=("direct http://127.0.0.1:$circuit/openai/deployments/$model/chat/completions"
        "nginx http://127.0.0.1:$proxy/openai/deployments/$model/chat/completions" "bridge $bridge_url")
    for round in $(seq "$rounds"); do
        # Each round starts one further along (direct, nginx, bridge; then nginx, bridge, direct; ...), so that a
        # machine slowing down or speeding up during the run favours none of the three.
        for i in 0 1 2; do
            read -r who url <<<"${targets[(round - 1 + i) % 3]}"
            measure "$who $kind c=1 #$round" "$url" "$stream" 1 "$round_seconds"
        done
    done
    measure "direct  $kind c=64" "http://127.0.0.1:$circuit/openai/deployments/$model/chat/completions" "$stream" 64
    measure "nginx   $kind c=64" "http://127.0.0.1:$proxy/openai/deployments/$model/chat/completions" "$stream" 64
    measure "bridge  $kind c=64" "$bridge_url" "$stream" 64
done
peak=$(rss)
printf 'bridge peak RSS: %s KiB\n' "$peak"
stop_bridge  # the bridges that follow run alone, as this one did

# --- Splunk down, then slow: the bridge's JSON c=64 run again --------------------------------------------------
warm_up() {  # a fresh bridge's first request fetches the token and opens the ledger: not what is measured
    curl -sf -o /dev/null -H "Authorization: Bearer $subkey" -H 'Content-Type: application/json' \
        -d '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}' "$bridge_url" ||
        { echo "bench.sh: the bridge's first request failed" >&2; exit 1; }
}
if ((splunk_variants)); then
    # Three rounds of accepting, down and slow, each a fresh bridge with a fresh database measured for
    # --round-seconds, so that a noisy stretch falls on all three alike. The baseline is a fresh bridge too: a
    # fresh database is faster than one that has taken the main run's requests, which would flatter the variants.
    closed=$(free_port)  # bound and let go: nothing listens there, so connections are refused
    slow=$(free_port)
    python3 scripts/bench_slow_hec.py --port "$slow" --delay 5 2>"$work/slow-hec.log" &
    slow_hec_pid=$!
    wait_listening "$slow" "$work/slow-hec.log"
    variants=("accepting $hec" "down $closed" "slow $slow")
    for round in 1 2 3; do
        for i in 0 1 2; do  # each round starts one further along, as at c=1
            read -r state hec_port <<<"${variants[(round - 1 + i) % 3]}"
            start_bridge "splunk-$state-$round" "http://127.0.0.1:$circuit" "http://127.0.0.1:$hec_port" "$port"
            warm_up
            measure "bridge  JSON c=64 Splunk $state #$round" "$bridge_url" 0 64 "$round_seconds"
            stop_bridge
        done
    done
    kill "$slow_hec_pid" 2>/dev/null || true
    wait "$slow_hec_pid" 2>/dev/null || true
    slow_hec_pid=
fi

# --- Streaming first byte: a bridge whose Circuit is the python stream fake ------------------------------------
if ((first_byte)); then
    path=/openai/deployments/bench-first-byte/chat/completions
    start_bridge first-byte "http://127.0.0.1:$fb_upstream" "http://127.0.0.1:$hec" "$port"
    python3 scripts/bench_first_byte.py --upstream-port "$fb_upstream" --subkey "$subkey" \
        --streams "$first_byte_streams" --out "$work/first-byte.json" \
        --target "direct=http://127.0.0.1:$fb_upstream$path" --target "nginx=http://127.0.0.1:$fb_proxy$path" \
        --target "bridge=$bridge_url" || { echo "bench.sh: the first-byte measurement failed" >&2; failed=1; }
    check_bridge
    stop_bridge
fi

# --- Summary, targets, JSON ------------------------------------------------------------------------------------
python3 - "$out" "$peak" "$work/first-byte.json" "${results[@]}" <<'PYEOF'
import json, os, statistics, sys
out, peak, first_byte_file, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
results, rounds = {}, {}
for row in rows:
    name, rps, p50, p99, errors, steal = row.split("|")
    figures = {"requests_per_second": float(rps), "p50_us": float(p50), "p99_us": float(p99), "errors": int(errors),
               "steal_percent": float(steal)}
    name, _, number = " ".join(name.split()).partition(" #")
    if number:
        rounds.setdefault(name, []).append(figures)
    else:
        results[name] = figures
# A figure at c=1 is the median of its rounds (each round's figures are kept beside it).
for name, measured in rounds.items():
    results[name] = {key: statistics.median(m[key] for m in measured) for key in ("requests_per_second", "p50_us", "p99_us", "steal_percent")}
    results[name]["errors"] = sum(m["errors"] for m in measured)
    results[name]["rounds"] = measured
summary, targets = {}, []
for kind in ("JSON", "SSE"):
    # Paired: each round's bridge against the direct call measured in the same round.
    differences = [b["p50_us"] - d["p50_us"] for d, b in zip(rounds[f"direct {kind} c=1"], rounds[f"bridge {kind} c=1"])]
    summary[f"{kind} added p50 at c=1 (us)"] = round(statistics.median(differences), 1)
    summary[f"{kind} added p50 at c=1, each round (us)"] = [round(d, 1) for d in differences]
    summary[f"{kind} throughput at c=64, share of nginx"] = round(
        results[f"bridge {kind} c=64"]["requests_per_second"] / results[f"nginx {kind} c=64"]["requests_per_second"], 3)

# The issue's targets for the main run.
added = summary["JSON added p50 at c=1 (us)"]
targets.append({"target": "latency added over the direct call at c=1, JSON, p50 at most 250 µs", "us": added,
                "met": added <= 250,
                "shown": f"{added} µs (median of {len(summary['JSON added p50 at c=1, each round (us)'])} rounds)"})
share = summary["JSON throughput at c=64, share of nginx"]
targets.append({"target": "JSON throughput at c=64 at least 25% of nginx's", "share": share, "met": share >= 0.25,
                "shown": f"{share:.1%}"})
targets.append({"target": "bridge peak RSS at most 64 MiB", "kib": peak, "met": peak <= 64 * 1024,
                "shown": f"{peak / 1024:.1f} MiB"})

# Splunk down or slow must change throughput and p99 by less than 15%; a change for the better is no miss.
# Each round's variant against the bridge with Splunk accepting measured in the same round; the median of the rounds.
splunk = {}
for state in ("down", "slow"):
    pairs = list(zip(rounds.get("bridge JSON c=64 Splunk accepting", []), rounds.get(f"bridge JSON c=64 Splunk {state}", [])))
    if not pairs or not all(a["p99_us"] and a["requests_per_second"] and v["requests_per_second"] for a, v in pairs):
        continue  # skipped, or wrk failed
    variant = results[f"bridge JSON c=64 Splunk {state}"]
    rps_change = statistics.median(v["requests_per_second"] / a["requests_per_second"] - 1 for a, v in pairs)
    p99_change = statistics.median(v["p99_us"] / a["p99_us"] - 1 for a, v in pairs)
    splunk[state] = {"requests_per_second": variant["requests_per_second"], "p99_us": variant["p99_us"],
                     "requests_per_second_change": round(rps_change, 3), "p99_change": round(p99_change, 3)}
    targets.append({"target": f"Splunk {state}: requests/s at c=64 within 15% of Splunk accepting",
                    "change": round(rps_change, 3), "met": rps_change > -0.15, "shown": f"{rps_change:+.1%}"})
    targets.append({"target": f"Splunk {state}: p99 at c=64 within 15% of Splunk accepting",
                    "change": round(p99_change, 3), "met": p99_change < 0.15, "shown": f"{p99_change:+.1%}"})

first_byte = None
if os.path.exists(first_byte_file):
    first_byte = json.load(open(first_byte_file))
    bridge = first_byte["targets"]["bridge"]
    for who in ("direct", "nginx"):  # what measuring costs, and what forwarding costs at best
        summary[f"first byte {who}, p99 (us)"] = first_byte["targets"][who]["p99_us"]
    # When measuring alone (direct) or nginx proxying the same streams misses too, the machine decides the figure.
    over = [f"{who} {first_byte['targets'][who]['p99_us']} µs" for who in ("direct", "nginx")
            if first_byte["targets"][who]["p99_us"] > 1000]
    shown = f"{bridge['p99_us']} µs" + (f" (inconclusive here: p99 {', '.join(over)})" if over else "")
    targets.append({"target": "stream's first byte through the bridge within 1 ms of Circuit sending it (p99)",
                    "p99_us": bridge["p99_us"], "met": bridge["p99_us"] <= 1000, "inconclusive": bool(over),
                    "measured_with": first_byte["measured_with"], "shown": shown})

for key, value in summary.items():
    print(f"{key}: {value}")
for target in targets:
    print(f"{'target met' if target['met'] else 'TARGET MISS'}: {target['target']}: {target.pop('shown')}")
json.dump({"results": results, "summary": summary, "bridge_peak_rss_kib": peak, "splunk_variants": splunk,
           "first_byte": first_byte, "targets": targets}, open(out, "w"), indent=2)
PYEOF
echo "wall time: ${SECONDS}s"
exit "$failed"
