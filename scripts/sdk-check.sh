#!/usr/bin/env bash
# End-to-end check that the official `openai` Python SDK works through the bridge:
# starts fake-circuit and the bridge on 127.0.0.1, runs scripts/sdk_check.py against
# them, and checks that invalid configuration stops the bridge with status 78.
# Usage (after `swift build`): [BIN_DIR=.build/debug] bash scripts/sdk-check.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN_DIR=${BIN_DIR:-.build/debug}
BRIDGE=$BIN_DIR/oai-to-circuit
FAKE=$BIN_DIR/fake-circuit
VENV=.build-venv-sdk
PY=$VENV/bin/python

# All test traffic stays on loopback, even where a proxy is configured for pip.
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

passed=0 failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

work=$(mktemp -d)
fake_pid= hec_pid= bridge_pid= log_shown=
show_bridge_log() {
    [[ -n $log_shown || ! -s $work/bridge.log ]] && return 0
    log_shown=1
    echo "--- bridge log ---"; cat "$work/bridge.log"; echo "--- end of bridge log ---"
}
stop() {  # SIGTERM, then SIGKILL if it has not gone within 5 s
    [[ -n $1 ]] || return 0
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
on_exit() {
    local status=$?
    stop "$bridge_pid"; stop "$fake_pid"; stop "$hec_pid"
    (( status == 0 )) || show_bridge_log
    rm -rf "$work"
}
trap on_exit EXIT

for _ in $(seq 100); do [[ -x $BRIDGE && -x $FAKE ]] && break; sleep 0.1; done
[[ -x $BRIDGE && -x $FAKE ]] || { echo "missing $BRIDGE or $FAKE: run swift build first" >&2; exit 1; }

# A private virtualenv, so the SDK never touches the system Python. Debian's python3
# may lack ensurepip (package python3-venv): then make the venv without pip and
# install into it with the system pip.
if ! "$PY" -c 'import openai' 2>/dev/null; then
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"; python3 -m venv --without-pip "$VENV"
    fi
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --disable-pip-version-check openai
    else
        python3 -m pip --python "$PY" install --quiet --disable-pip-version-check openai
    fi
fi

# fake-circuit picks its own ports and announces them in one line; wait for the whole line.
"$FAKE" >"$work/fake.out" 2>"$work/fake.log" </dev/null &
fake_pid=$!
line=
for _ in $(seq 100); do
    if [[ $(wc -l <"$work/fake.out") -ge 1 ]]; then line=$(head -n 1 "$work/fake.out"); break; fi
    kill -0 "$fake_pid" 2>/dev/null || break
    sleep 0.1
done
url='http://127\.0\.0\.1:[0-9]+'
if [[ ! $line =~ ^CIRCUIT_BASE=($url)\ TOKEN_URL=($url/[^ ]+)$ ]]; then
    echo "fake-circuit did not announce its ports; got: '$line'" >&2; cat "$work/fake.log" >&2; exit 1
fi
circuit_base=${BASH_REMATCH[1]} token_url=${BASH_REMATCH[2]}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
# Splunk HEC is down (nothing listens on its port) until the SIGKILL check below starts a fake one there.
hec_port=$(free_port)
hec_url=http://127.0.0.1:$hec_port/services/collector/event

# A clean environment: a developer's own CIRCUIT_*/SPLUNK_* settings must not leak in.
bridge_env=(env -i "PATH=$PATH" "HOME=${HOME:-/tmp}"
    CIRCUIT_CLIENT_ID=client-id CIRCUIT_CLIENT_SECRET=client-secret CIRCUIT_APPKEY=test-appkey
    "CIRCUIT_BASE=$circuit_base" "TOKEN_URL=$token_url" REQUIRE_SUBKEY=true LOG_LEVEL=info
    "QUOTA_DB_PATH=$work/quota.db" "QUOTAS_JSON_PATH=$work/quotas.json"
    "SPLUNK_HEC_URL=$hec_url" SPLUNK_HEC_TOKEN=hec-token)

# The subkeys sdk_check.py uses: o3 blocked for one, one gpt-4o request a day for another.
cat >"$work/quotas.json" <<'EOF'
{"team-member-subkey": {"o3": {"requests": 0}},
 "limited-subkey": {"gpt-4o": {"requests": 1, "period": "daily"}},
 "once-subkey": {"gpt-4o": {"requests": 1}}}
EOF

port=$(free_port)
start_bridge() {
    "${bridge_env[@]}" "$BRIDGE" serve --host 127.0.0.1 --port "$port" >>"$work/bridge.log" 2>&1 </dev/null &
    bridge_pid=$!
}
wait_healthy() {  # at most ~10 s for /health to answer 200
    "$PY" - "$port" <<'PYEOF'
import sys, time, urllib.request
for _ in range(100):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
PYEOF
}
start_bridge
if wait_healthy; then pass "bridge: /health answers 200"; else fail "bridge: /health never answered 200"; fi
if grep "listening" "$work/bridge.log" | grep -qw "port=$port"; then pass "bridge: logs listening port=$port"
else fail "bridge: no 'listening ... port=$port' log line"; fi

if (( failed == 0 )); then
    sdk_status=0
    BASE_URL="http://127.0.0.1:$port/v1" "$PY" scripts/sdk_check.py | tee "$work/sdk.out" || sdk_status=$?
    sdk_passed=$(grep -c '^PASS ' "$work/sdk.out" || true)
    sdk_failed=$(grep -c '^FAIL ' "$work/sdk.out" || true)
    passed=$((passed + sdk_passed)) failed=$((failed + sdk_failed))
    if (( sdk_status != 0 && sdk_failed == 0 )); then fail "sdk_check.py exited with status $sdk_status"; fi
fi

# One chat request through the bridge; prints the HTTP status.
chat() {  # subkey, model
    "$PY" - "$port" "$1" "$2" <<'PYEOF'
import json, sys, urllib.error, urllib.request
port, subkey, model = sys.argv[1:4]
body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Authorization": f"Bearer {subkey}", "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        print(response.status)
except urllib.error.HTTPError as e:
    print(e.code)
PYEOF
}

# SIGHUP reloads the policy at once (and does not stop the bridge).
cat >"$work/quotas.json" <<'EOF'
{"team-member-subkey": {"o3": {"requests": 0}},
 "limited-subkey": {"gpt-4o": {"requests": 1, "period": "daily"}},
 "once-subkey": {"gpt-4o": {"requests": 1}},
 "new-member": {}}
EOF
kill -HUP "$bridge_pid"
for _ in $(seq 50); do grep -q 'quota policy loaded.*trigger=SIGHUP' "$work/bridge.log" && break; sleep 0.1; done
if kill -0 "$bridge_pid" 2>/dev/null && grep -q 'quota policy loaded.*trigger=SIGHUP' "$work/bridge.log" \
    && [[ $(chat new-member gpt-4o) == 200 ]]; then pass "quotas: SIGHUP reloads the policy"
else fail "quotas: SIGHUP did not reload the policy"; fi

# Every answer a client received is in the ledger, even when the bridge is killed right after.
once=$(chat once-subkey gpt-4o)
for _ in $(seq 20); do chat new-member gpt-4o-mini >/dev/null; done
kill -KILL "$bridge_pid"; wait "$bridge_pid" 2>/dev/null || true; bridge_pid=
counted=$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(
    "SELECT requests FROM usage WHERE subkey = ? AND model = ?", ("new-member", "gpt-4o-mini")).fetchone()[0])' "$work/quota.db")
if [[ $counted == 20 ]]; then pass "ledger: 20 answers, SIGKILL, 20 in the ledger"
else fail "ledger: $counted of 20 answers in the ledger after SIGKILL"; fi

# Splunk was down all along: every answered request's usage event waits in the outbox, and ships once Splunk is
# up and the bridge starts again.
answered=$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(
    "SELECT count(*) FROM request_log").fetchone()[0])' "$work/quota.db")
"$FAKE" hec "$hec_port" "$work/hec-events.jsonl" >"$work/hec.out" 2>"$work/hec.log" </dev/null &
hec_pid=$!
for _ in $(seq 100); do grep -q '^HEC_URL=' "$work/hec.out" && break; sleep 0.1; done
start_bridge
delivered=0
for _ in $(seq 200); do
    delivered=$(python3 - "$work/hec-events.jsonl" <<'PYEOF'
import json, os, sys
path = sys.argv[1]
events = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
usage = [e["event"]["request_id"] for e in events if e["sourcetype"] == "llm:usage"]
# Each once: Splunk refused connections until it started, so nothing can have been sent twice.
print(len(usage) if len(usage) == len(set(usage)) else -1)
PYEOF
)
    (( delivered >= answered )) && break
    sleep 0.1
done
if (( answered > 20 && delivered == answered )); then
    pass "splunk: HEC down, SIGKILL, restart: all $answered usage events delivered"
else fail "splunk: $delivered of $answered usage events delivered after the restart"; fi
if grep -q '"sourcetype":"llm:usage:error"' "$work/hec-events.jsonl" 2>/dev/null \
    && ! grep -q 'member-subkey\|new-member\|hec-token' "$work/hec-events.jsonl"; then
    pass "splunk: error events delivered, no subkey or token in any event"
else fail "splunk: error events missing, or a secret in the events"; fi
if "${bridge_env[@]}" "$BRIDGE" hec test >"$work/hec-test.out" 2>&1 && grep -q '^ok: Splunk indexed' "$work/hec-test.out" \
    && ! "${bridge_env[@]}" SPLUNK_HEC_TOKEN=wrong "$BRIDGE" hec test >"$work/hec-bad.out" 2>&1 \
    && grep -q '^problem: bad token' "$work/hec-bad.out"; then
    pass "hec test: ok with the right token, diagnoses a wrong one"
else fail "hec test: $(head -c 500 "$work/hec-test.out") / $(head -c 500 "$work/hec-bad.out" 2>/dev/null)"; fi
# A lifetime limit, so that the check means the same on either side of midnight.
if wait_healthy && [[ $once == 200 && $(chat once-subkey gpt-4o) == 429 ]]; then pass "quotas: a used-up limit survives a restart"
else fail "quotas: a used-up limit was forgotten across a restart"; fi

# The operator commands, on the same files.
if "$BRIDGE" quotas check "$work/quotas.json" --db "$work/quota.db" >"$work/check.out" 2>&1 \
    && grep -q 'valid; 4 subkeys' "$work/check.out" && ! grep -q 'member' "$work/check.out"; then
    pass "quotas check: valid, no plaintext key"
else fail "quotas check: $(head -c 500 "$work/check.out")"; fi
if "$BRIDGE" usage report --db "$work/quota.db" --by model --format json >"$work/report.json" 2>&1 \
    && python3 -c 'import json, sys; rows = {r["model"]: r["requests"] for r in json.load(open(sys.argv[1]))}
sys.exit(rows.get("gpt-4o-mini") != 20)' "$work/report.json"; then
    pass "usage report: JSON by model"
else fail "usage report: $(head -c 500 "$work/report.json")"; fi

# Managed keys, through the binary and the running bridge: a key from `keys create` works at once with the
# openai SDK, its events name it, and once revoked it is refused on its next request; its secret is nowhere on disk.
key=$("${bridge_env[@]}" "$BRIDGE" keys create --name "SDK check" --email sdk@example.com --json 2>"$work/keys.err" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])') || key=
if [[ -n $key ]] && "$PY" - "$port" "$key" <<'PYEOF'; then pass "keys: a new key works at once with the SDK"
import sys, openai
client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key=sys.argv[2])
reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
assert reply.choices[0].message.content == "Hello from fake Circuit", reply
PYEOF
else fail "keys: a new key did not work: $(head -c 500 "$work/keys.err")"; fi
key_id=$(cut -d_ -f2 <<<"$key")
for _ in $(seq 100); do grep -q "\"key_id\":\"$key_id\"" "$work/hec-events.jsonl" 2>/dev/null && break; sleep 0.1; done
if grep "\"key_id\":\"$key_id\"" "$work/hec-events.jsonl" 2>/dev/null | grep -q '"friendly_name":"SDK check","email":"sdk@example.com"'; then
    pass "keys: Splunk events carry the key's id, name and e-mail"
else fail "keys: no Splunk event names key $key_id"; fi
if "${bridge_env[@]}" "$BRIDGE" keys revoke "SDK check" --reason "sdk check" >"$work/keys.out" 2>&1 \
    && [[ $(chat "$key" gpt-4o | tee "$work/revoked.status") == 403 ]]; then pass "keys: a revoked key is refused on its next request"
else fail "keys: revoke: $(cat "$work/revoked.status" 2>/dev/null) $(head -c 500 "$work/keys.out")"; fi
if [[ -n $key ]] && ! grep -rqF -- "${key##*_}" "$work"; then pass "keys: the secret is in no file (database, WAL, logs, events)"
else fail "keys: the secret was found on disk"; fi
# The earlier bridge's plaintext subkeys become managed keys; clients keep them, the database forgets them.
if "${bridge_env[@]}" "$BRIDGE" keys import --from-quotas "$work/quotas.json" >"$work/import.out" 2>&1 \
    && grep -q '4 imported' "$work/import.out" && [[ $(chat new-member gpt-4o) == 200 ]] \
    && [[ $(chat once-subkey gpt-4o) == 429 ]] \
    && [[ $(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(
        "SELECT count(*) FROM usage WHERE subkey LIKE ? OR subkey LIKE ?", ("%member%", "%subkey%")).fetchone()[0])' "$work/quota.db") == 0 ]]
then pass "keys: import keeps clients' subkeys and allowances, and no plaintext key stays in the ledger"
else fail "keys: import: $(head -c 800 "$work/import.out")"; fi

# Invalid configuration must exit 78 (EX_CONFIG) with a message naming the culprit.
expect_config_error() {  # name, text stderr must contain, command (env assignments first)...
    local name=$1 want=$2 status=0
    shift 2
    timeout 20 "${bridge_env[@]}" "$@" >"$work/config.out" 2>"$work/config.err" </dev/null || status=$?
    if (( status == 78 )) && grep -qF -- "$want" "$work/config.err"; then pass "config: $name"
    else fail "config: $name: status $status, stderr: $(head -c 500 "$work/config.err")"; fi
}
expect_config_error "REQUIRE_SUBKEY=maybe exits 78" REQUIRE_SUBKEY \
    REQUIRE_SUBKEY=maybe "$BRIDGE" serve --host 127.0.0.1 --port 0
expect_config_error "UPSTREAM_TIMEOUT_SECONDS=abc exits 78" UPSTREAM_TIMEOUT_SECONDS \
    UPSTREAM_TIMEOUT_SECONDS=abc "$BRIDGE" serve --host 127.0.0.1 --port 0
expect_config_error "missing certificate exits 78" "oai-to-circuit cert generate" \
    "$BRIDGE" serve --host 127.0.0.1 --ssl-only --ssl-port 0 --cert /nonexistent.pem --key /nonexistent-key.pem
echo '{"k": {"*": {"period": "weekly"}}}' >"$work/bad-quotas.json"
expect_config_error "an invalid policy exits 78" "QUOTAS_JSON_PATH: $work/bad-quotas.json: subkey entry #1" \
    "QUOTAS_JSON_PATH=$work/bad-quotas.json" "$BRIDGE" serve --host 127.0.0.1 --port 0

# SIGINT is a clean shutdown: exit status 0.
stop_status=0
kill -INT "$bridge_pid"
wait "$bridge_pid" || stop_status=$?
bridge_pid=
if (( stop_status == 0 )) && grep -q "stopped" "$work/bridge.log"; then pass "shutdown: SIGINT exits 0"
else fail "shutdown: SIGINT gave status $stop_status"; fi

# HTTPS with a certificate from `cert generate`, checked by Python's OpenSSL: another TLS stack than the bridge's.
"$BRIDGE" cert generate --hostname localhost --cert "$work/cert.pem" --key "$work/key.pem" >/dev/null
if "$BRIDGE" cert generate --cert "$work/cert.pem" --key "$work/key.pem" >/dev/null 2>&1; then
    fail "cert: overwrote existing files without --force"
else pass "cert: refuses to overwrite without --force"; fi
if [[ $(stat -c %a "$work/key.pem") == 600 ]]; then pass "cert: key file is 0600"; else fail "cert: key file mode $(stat -c %a "$work/key.pem")"; fi
tls_port=$(free_port)
: >"$work/bridge.log"
"${bridge_env[@]}" "$BRIDGE" --host 127.0.0.1 --ssl-only --ssl-port "$tls_port" --cert "$work/cert.pem" --key "$work/key.pem" \
    >"$work/bridge.log" 2>&1 </dev/null &
bridge_pid=$!
if "$PY" - "$tls_port" "$work/cert.pem" <<'PYEOF'; then pass "https: openai SDK over --ssl-only, verifying the certificate"
import ssl, sys, time, urllib.request, openai
port, cert = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=cert)  # trusts only the generated certificate
for _ in range(100):
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context, timeout=1) as response:
            if response.status == 200:
                break
    except OSError:
        time.sleep(0.1)
# Newer SDKs ship httpx2 as their default transport; older ones httpx.
client_class = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient
for host in ("127.0.0.1", "localhost"):
    client = openai.OpenAI(base_url=f"https://{host}:{port}/v1", api_key="team-member-subkey",
                           http_client=client_class(verify=context))
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello from fake Circuit", reply
PYEOF
else fail "https: openai SDK over --ssl-only"; fi
stop_status=0
kill -TERM "$bridge_pid"
wait "$bridge_pid" || stop_status=$?
bridge_pid=
if (( stop_status == 0 )); then pass "shutdown: SIGTERM exits 0"; else fail "shutdown: SIGTERM gave status $stop_status"; fi

(( failed == 0 )) || show_bridge_log
echo "$passed passed, $failed failed"
(( failed == 0 ))
