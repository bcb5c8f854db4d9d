#!/usr/bin/env bash
# Checks what deploy/ and scripts/install.sh ship: the unit passes `systemd-analyze verify` (in a temporary root
# where its ExecStart exists) with no warning and rates 2.0 or lower in `systemd-analyze security`; install.sh
# installs into a temporary root, a second run changes nothing, and --upgrade backs up the database and binary.
# Usage (after `swift build`): [BIN_DIR=.build/debug] bash scripts/deploy-check.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN_DIR=${BIN_DIR:-.build/debug}
BRIDGE=$BIN_DIR/oai-to-circuit
UNIT=deploy/oai-to-circuit.service

passed=0 failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

[[ -x $BRIDGE ]] || { echo "missing $BRIDGE: run swift build first" >&2; exit 1; }
command -v systemd-analyze >/dev/null || { echo "systemd-analyze is missing (apt-get install systemd)" >&2; exit 1; }

# --- The unit -------------------------------------------------------------------------------------------------
# A root with systemd's own units (for the targets it names), /bin/kill (ExecReload) and the binary (ExecStart).
root=$work/verify-root
mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/usr/local/bin" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp /usr/bin/kill "$root/usr/bin/kill"
cp "$BRIDGE" "$root/usr/local/bin/oai-to-circuit"
cp "$UNIT" "$root/etc/systemd/system/"
if systemd-analyze verify --root="$root" /etc/systemd/system/oai-to-circuit.service >"$work/verify.out" 2>&1 \
    && [[ ! -s $work/verify.out ]]; then
    pass "unit: systemd-analyze verify, no warning"
else fail "unit: systemd-analyze verify: $(head -c 800 "$work/verify.out")"; fi
# The check must be able to fail: a misspelt key is reported.
sed 's/^NoNewPrivileges=yes/NoNewPrivilege=yes/' "$UNIT" >"$root/etc/systemd/system/oai-to-circuit.service"
if systemd-analyze verify --root="$root" /etc/systemd/system/oai-to-circuit.service 2>&1 | grep -q "Unknown key"; then
    pass "unit: verify reports a misspelt key"
else fail "unit: verify did not report a misspelt key"; fi

exposure=$(systemd-analyze security --offline=true "$UNIT" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for oai-to-circuit.service: \([0-9.]*\).*/\1/p')
if [[ -n $exposure ]] && awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }'; then
    pass "unit: security exposure $exposure (at most 2.0)"
else fail "unit: security exposure '${exposure:-unknown}' (must be at most 2.0)"; fi
if grep -Eq '^RestartPreventExitStatus=(.* )?78( .*)?$' "$UNIT" && grep -q '^Type=notify$' "$UNIT" \
    && grep -q '^StartLimitBurst=' "$UNIT" && awk '/^\[Unit\]/{u=1} /^\[Service\]/{u=0} u && /^StartLimit/ {n++} END {exit n < 2}' "$UNIT"; then
    pass "unit: notify type, no restart on exit 78, start limit in [Unit] where systemd applies it"
else fail "unit: Type=notify, RestartPreventExitStatus=78 or the [Unit] start limit is missing"; fi

# --- sd_notify from the real binary, as systemd would receive it ------------------------------------------------
notify_log=$work/notify.log
python3 - "$work/notify.sock" "$notify_log" <<'PYEOF' &
import socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sys.argv[1])
sock.settimeout(20)
with open(sys.argv[2], "w") as log:
    try:
        while True:
            message = sock.recv(4096).decode()
            log.write(message.replace("\n", " ") + "\n")
            log.flush()
            if message.startswith("STOPPING=1"):
                break
    except socket.timeout:
        pass
PYEOF
listener=$!
for _ in $(seq 50); do [[ -S $work/notify.sock ]] && break; sleep 0.1; done
# With HTTP and HTTPS: READY=1 waits for both listeners.
"$BRIDGE" cert generate --cert "$work/cert.pem" --key "$work/key.pem" >/dev/null
env -i "PATH=$PATH" "NOTIFY_SOCKET=$work/notify.sock" WATCHDOG_USEC=200000 "QUOTA_DB_PATH=$work/notify.db" \
    "QUOTAS_JSON_PATH=$work/none.json" "$BRIDGE" serve --host 127.0.0.1 --port 0 --ssl --ssl-port 0 \
    --cert "$work/cert.pem" --key "$work/key.pem" >"$work/notify-bridge.log" 2>&1 &
bridge=$!
for _ in $(seq 100); do grep -q '^READY=1' "$notify_log" 2>/dev/null && grep -q '^WATCHDOG=1' "$notify_log" && break; sleep 0.1; done
kill -TERM "$bridge"
status=0
wait "$bridge" || status=$?
wait "$listener" || true
ready=$(grep '^READY=1 STATUS=listening on ' "$notify_log" || true)
if [[ $ready =~ http\ 127\.0\.0\.1:[0-9]+ && $ready =~ https\ 127\.0\.0\.1:[0-9]+ && $ready == *" MAINPID=$bridge" ]] \
    && grep -q '^WATCHDOG=1$' "$notify_log" && grep -q '^STOPPING=1 .* EXTEND_TIMEOUT_USEC=45000000$' "$notify_log" \
    && ((status == 0)); then
    pass "sd_notify: READY=1 once both listeners accept, WATCHDOG=1 pings, STOPPING=1 on SIGTERM, exit 0"
else fail "sd_notify: status $status, messages: $(head -c 600 "$notify_log")"; fi

# --- install.sh into a temporary root, twice ------------------------------------------------------------------
target=$work/root
mkdir -p "$target"
install_run() { bash scripts/install.sh --prefix "$target" --no-systemctl --binary "$BRIDGE" "$@"; }
if install_run >"$work/install1.out" 2>&1; then pass "install.sh: first run"
else fail "install.sh: first run: $(tail -c 800 "$work/install1.out")"; fi
mode() { stat -c '%a %u:%g' "$target$1"; }
uid=$(awk -F: '$1 == "oai-bridge" { print $3 }' "$target/etc/passwd" 2>/dev/null || true)
gid=$(awk -F: '$1 == "oai-bridge" { print $3 }' "$target/etc/group" 2>/dev/null || true)
expected=(
    "/usr/local/bin/oai-to-circuit|755 0:0"
    "/etc/systemd/system/oai-to-circuit.service|644 0:0"
    "/etc/oai-to-circuit|750 0:$gid"
    "/etc/oai-to-circuit/credentials.env|640 0:$gid"
    "/etc/oai-to-circuit/quotas.json|640 0:$gid"
    "/var/lib/oai-to-circuit|750 $uid:$gid"
)
wrong=
for entry in "${expected[@]}"; do
    path=${entry%%|*} want=${entry#*|}
    if [[ $EUID -ne 0 ]]; then want=${want%% *}; got=$(stat -c %a "$target$path" 2>/dev/null || echo missing)
    else got=$(mode "$path" 2>/dev/null || echo missing); fi
    [[ $got == "$want" ]] || wrong+=" $path: $got (want $want);"
done
if [[ -n $uid || $EUID -ne 0 ]] && [[ -z $wrong ]]; then pass "install.sh: user, files, owners and modes"
else fail "install.sh: uid '$uid';$wrong"; fi
if grep -qx 'QUOTAS_JSON_PATH=/etc/oai-to-circuit/quotas.json' "$target/etc/oai-to-circuit/credentials.env" \
    && grep -qx 'QUOTA_DB_PATH=/var/lib/oai-to-circuit/quota.db' "$target/etc/oai-to-circuit/credentials.env"; then
    pass "install.sh: the installed credentials.env names the service's database and policy"
else fail "install.sh: credentials.env lacks the service's paths"; fi
if grep -q "INSTALLATION.md" <(ls "$target/usr/local/share/doc/oai-to-circuit") 2>/dev/null \
    && grep -q "Next steps" "$work/install1.out"; then pass "install.sh: docs installed, next steps printed"
else fail "install.sh: docs or next steps missing"; fi

# Configuration an operator edited survives; a second run changes nothing else, not even a file's time.
echo "CIRCUIT_CLIENT_ID=edited" >>"$target/etc/oai-to-circuit/credentials.env"
echo '{"_global": {"*": {"requests": 1}}}' >"$target/etc/oai-to-circuit/quotas.json"
snapshot() { (cd "$target" && find . -printf '%p %m %u %g %s %T@\n' | sort; find . -type f -exec md5sum {} + | sort); }
snapshot >"$work/before"
if install_run >"$work/install2.out" 2>&1 && snapshot >"$work/after" && cmp -s "$work/before" "$work/after" \
    && grep -q "kept the existing" "$work/install2.out"; then
    pass "install.sh: a second run keeps the configuration and changes nothing"
else fail "install.sh: second run: $(diff "$work/before" "$work/after" | head -c 800) $(tail -c 400 "$work/install2.out")"; fi

# --upgrade: the database (with its WAL) and the binary in use are backed up before the binary is replaced.
database=$target/var/lib/oai-to-circuit/quota.db
"$BRIDGE" keys create --name "Deploy check" --db "$database" --create-db >/dev/null 2>&1
cp "$target/usr/local/bin/oai-to-circuit" "$work/new-binary"
printf '#!/bin/sh\necho "oai-to-circuit 0.0.1-old"\n' >"$target/usr/local/bin/oai-to-circuit"
chmod 755 "$target/usr/local/bin/oai-to-circuit"
if install_run --upgrade >"$work/upgrade.out" 2>&1; then
    backup=$(ls -d "$target"/var/lib/oai-to-circuit/backups/* 2>/dev/null | head -n 1)
    if [[ -n $backup ]] && grep -q "0.0.1-old" "$backup/oai-to-circuit" && [[ -s $backup/quota.db ]] \
        && python3 -c 'import sqlite3, sys; assert sqlite3.connect(sys.argv[1]).execute(
            "SELECT count(*) FROM managed_key").fetchone()[0] == 1' "$backup/quota.db" \
        && cmp -s "$target/usr/local/bin/oai-to-circuit" "$work/new-binary"; then
        pass "install.sh --upgrade: database and old binary backed up, binary replaced"
    else fail "install.sh --upgrade: backup or replacement missing: $(tail -c 600 "$work/upgrade.out")"; fi
else fail "install.sh --upgrade: $(tail -c 800 "$work/upgrade.out")"; fi
# A unit of the same name that runs something else (the earlier bridge) is left alone; ours goes beside it.
other=$work/other-root
mkdir -p "$other/etc/systemd/system"
printf '[Service]\nExecStart=/usr/bin/python3 /opt/oai-to-circuit/app.py\n' >"$other/etc/systemd/system/oai-to-circuit.service"
cp "$other/etc/systemd/system/oai-to-circuit.service" "$work/python-unit"
if bash scripts/install.sh --prefix "$other" --binary "$BRIDGE" >"$work/other.out" 2>&1 \
    && cmp -s "$work/python-unit" "$other/etc/systemd/system/oai-to-circuit.service" \
    && cmp -s "$UNIT" "$other/etc/systemd/system/oai-to-circuit.service.new"; then
    pass "install.sh: leaves a unit that runs the earlier bridge alone, writes ours as .service.new"
else fail "install.sh: foreign unit: $(tail -c 600 "$work/other.out")"; fi
if bash scripts/install.sh --bogus >/dev/null 2>&1; then fail "install.sh: accepted an unknown option"
else pass "install.sh: refuses an unknown option"; fi

echo "$passed passed, $failed failed"
((failed == 0))
