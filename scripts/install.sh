#!/usr/bin/env bash
# Installs oai-to-circuit as a systemd service, or upgrades an installed one. Safe to run again: it never
# overwrites configuration, and a second run changes nothing.
#
#   sudo scripts/install.sh                      # build release (Swift runtime linked in), install, daemon-reload
#   sudo scripts/install.sh --upgrade            # back up the database and binary, replace the binary, restart
#   scripts/install.sh --prefix /tmp/root --no-systemctl --binary .build/debug/oai-to-circuit   # a test root
#
# Options:
#   --prefix DIR     install under DIR instead of / (the user is added to DIR/etc/passwd; implies --no-systemctl)
#   --binary PATH    install this binary instead of building one (swift build -c release)
#   --no-systemctl   do not run systemctl (no daemon-reload, stop or start)
#   --upgrade        back up the database and the binary in use, replace the binary, restart the service
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix= binary= systemctl=1 upgrade=0
while (($#)); do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --binary=*) binary=${1#*=}; shift ;;
        --no-systemctl) systemctl=0; shift ;;
        --upgrade) upgrade=1; shift ;;
        -h | --help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
done

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

root=${prefix%/}
[[ -z $root || -d $root ]] || die "--prefix $prefix is not a directory"
# A test root or an image: never drive the host's services from it.
[[ -z $root ]] || systemctl=0
user=oai-bridge
bin_dir=$root/usr/local/bin
unit_dir=$root/etc/systemd/system
conf_dir=$root/etc/oai-to-circuit
state_dir=$root/var/lib/oai-to-circuit
doc_dir=$root/usr/local/share/doc/oai-to-circuit
unit=oai-to-circuit.service
installed=$bin_dir/oai-to-circuit

if [[ $EUID -ne 0 ]]; then
    [[ -n $root ]] || die "run as root (sudo): it creates the $user user and gives files to it"
    say "not root: files are installed, but no user is created and no owner is set"
fi

# 1. The binary: given, or built now with the Swift runtime linked in, so the service (which cannot read a
#    toolchain under /home, and must survive a toolchain upgrade) needs only the system's libraries.
if [[ -z $binary ]]; then
    command -v swift >/dev/null || die "swift is not installed: build elsewhere and pass --binary PATH"
    say "building the release binary (this takes a few minutes)"
    (cd "$repo" && swift build -c release --static-swift-stdlib --product oai-to-circuit >/dev/null)
    binary=$(cd "$repo" && swift build -c release --static-swift-stdlib --show-bin-path)/oai-to-circuit
fi
[[ -x $binary ]] || die "$binary is not an executable"
version=$("$binary" --version) || die "$binary does not run"
runtime=$(ldd "$binary" 2>/dev/null | awk '/libswiftCore/ { print $3 }' || true)
if [[ -n $runtime ]]; then
    case $runtime in
        /home/* | /root/* | not) die "$binary loads the Swift runtime from ${runtime%/*}, which the sandboxed service cannot
read: build it with 'swift build -c release --static-swift-stdlib'" ;;
        *) say "note: $binary loads the Swift runtime from ${runtime%/*}; a toolchain upgrade there can break the service
(build with --static-swift-stdlib to avoid it)" ;;
    esac
fi

# 2. The service's user and group: system, no login, no home of its own.
if [[ $EUID -eq 0 ]]; then
    if [[ -n $root ]]; then
        mkdir -p "$root/etc"
        for file in passwd group shadow gshadow; do [[ -e $root/etc/$file ]] || : >"$root/etc/$file"; done
        lookup() { awk -F: -v name="$user" '$1 == name { print $3 }' "$root/etc/$1"; }
        [[ -n $(lookup group) ]] || groupadd --prefix "$root" --system "$user"
        if [[ -z $(lookup passwd) ]]; then
            useradd --prefix "$root" --system --gid "$user" --home-dir /var/lib/oai-to-circuit --no-create-home \
                --shell /usr/sbin/nologin "$user"
            say "created the system user $user in $root/etc/passwd"
        fi
        uid=$(lookup passwd) gid=$(lookup group)
    else
        # The unit names the group too: it must exist even when an older user of this name was made without it.
        getent group "$user" >/dev/null || groupadd --system "$user"
        if ! getent passwd "$user" >/dev/null; then
            useradd --system --gid "$user" --home-dir /var/lib/oai-to-circuit --no-create-home \
                --shell /usr/sbin/nologin "$user"
            say "created the system user $user"
        fi
        uid=$(id -u "$user") gid=$(getent group "$user" | cut -d: -f3)
    fi
fi
# own OWNER:GROUP MODE PATH: sets what it can (owners only as root).
own() {
    chmod "$2" "$3"
    if [[ $EUID -eq 0 ]]; then chown "$1" "$3"; fi
}

# 3. Directories. Configuration holds secrets: readable by the service's group only; state is the service's.
mkdir -p "$bin_dir" "$unit_dir" "$doc_dir" "$conf_dir" "$state_dir"
own "0:${gid:-0}" 0750 "$conf_dir"
own "${uid:-0}:${gid:-0}" 0750 "$state_dir"
# One run at a time.
exec 9>>"$state_dir/.install.lock"
flock -n 9 || die "another install.sh is running"

# 4. Upgrade: stop, back up the database (with its WAL) and the binary in use, so either can be put back.
stamp=$(date -u +%Y%m%dT%H%M%SZ)
was_active=0
if ((upgrade)); then
    [[ -x $installed ]] || die "--upgrade: nothing installed at $installed"
    # Started again afterwards if it ran, or is enabled (a previous upgrade may have left it stopped or failed).
    if ((systemctl)) && { systemctl is-active --quiet "$unit" || systemctl is-enabled --quiet "$unit"; }; then
        was_active=1
        say "stopping $unit"
        systemctl stop "$unit"
    fi
    backup=$state_dir/backups/$stamp
    trap 'echo "install.sh: the upgrade failed; the previous binary and database are in $backup" >&2' ERR
    mkdir -p "$backup"
    own "0:0" 0700 "$state_dir/backups"
    own "0:0" 0700 "$backup"
    cp -p "$installed" "$backup/oai-to-circuit"
    database=$state_dir/quota.db
    if [[ -e $database ]]; then
        # SQLite's online backup gives a consistent copy even if a bridge is still writing; without Python, the
        # files themselves (consistent once the service is stopped).
        if ! python3 -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))' \
            "$database" "$backup/quota.db" 2>/dev/null; then
            for file in "$database" "$database-wal"; do [[ -e $file ]] && cp -p "$file" "$backup/"; done
        fi
    fi
    say "backed up $("$installed" --version 2>/dev/null || echo 'the old binary') and the database to $backup"
fi

# 5. The binary, replaced atomically (a running process keeps its old file until it restarts).
replaced=0
if [[ -e $installed ]] && cmp -s "$binary" "$installed"; then
    say "the binary at $installed is already $version"
else
    replaced=1
    install -m 0755 "$binary" "$installed.new"
    [[ $EUID -ne 0 ]] || chown 0:0 "$installed.new"
    mv -f "$installed.new" "$installed"
    say "installed $version to $installed"
fi

# 6. The unit is the package's, so it is replaced; local changes belong in `systemctl edit` drop-ins. A unit of this
#    name that runs something else (the earlier Python bridge) is left alone until the switch: replacing it under a
#    running service would arm our watchdog against it.
if [[ -e $unit_dir/$unit ]] && ! grep -q '^ExecStart=/usr/local/bin/oai-to-circuit ' "$unit_dir/$unit"; then
    install -m 0644 "$repo/deploy/$unit" "$unit_dir/$unit.new"
    say "$unit_dir/$unit runs something else (the earlier bridge?): ours is $unit_dir/$unit.new;"
    say "switch when ready (docs/MIGRATING.md): stop it, back up, move $unit.new over it, daemon-reload, start"
elif ! cmp -s "$repo/deploy/$unit" "$unit_dir/$unit"; then
    install -m 0644 "$repo/deploy/$unit" "$unit_dir/$unit"
    say "installed $unit_dir/$unit"
fi

# 7. Configuration from the examples, only where none exists; the examples themselves are refreshed beside it.
for example in credentials.env quotas.json; do
    if ! cmp -s "$repo/deploy/$example.example" "$conf_dir/$example.example"; then
        install -m 0640 "$repo/deploy/$example.example" "$conf_dir/$example.example"
        [[ $EUID -ne 0 ]] || chown "0:$gid" "$conf_dir/$example.example"
    fi
    if [[ -e $conf_dir/$example ]]; then
        say "kept the existing $conf_dir/$example"
    else
        install -m 0640 "$repo/deploy/$example.example" "$conf_dir/$example"
        [[ $EUID -ne 0 ]] || chown "0:$gid" "$conf_dir/$example"
        # The service's paths, set, so that `--env-file` gives the keys and quotas commands the service's files.
        [[ $example != credentials.env ]] \
            || sed -i 's|^# \(QUOTA_DB_PATH=/var/lib/\)|\1|; s|^# \(QUOTAS_JSON_PATH=/etc/\)|\1|' "$conf_dir/$example"
        say "created $conf_dir/$example from its example: fill it in"
    fi
done

# 8. Documentation.
for doc in "$repo"/README.md "$repo"/docs/*.md; do
    [[ -e $doc ]] && ! cmp -s "$doc" "$doc_dir/${doc##*/}" && install -m 0644 "$doc" "$doc_dir/"
done

# 9. systemd.
if ((systemctl)); then
    systemctl daemon-reload
    if ((upgrade)) && ((was_active)); then
        say "starting $unit"
        systemctl start "$unit"
        systemctl is-active --quiet "$unit" && say "$unit is running $version"
    elif ((replaced)) && ! ((upgrade)) && systemctl is-active --quiet "$unit"; then
        say "$unit still runs the previous binary: use --upgrade (or restart it) to switch"
    fi
fi

if ((upgrade)); then
    say "upgrade done; to go back: stop the service, copy $backup/oai-to-circuit to $installed (and the database"
    say "files to $state_dir if you must), start it again"
    exit 0
fi
cat <<EOF

Next steps:
  1. Fill in $conf_dir/credentials.env (CIRCUIT_CLIENT_ID, CIRCUIT_CLIENT_SECRET, CIRCUIT_APPKEY; Splunk HEC if used).
  2. Edit $conf_dir/quotas.json, then check it:  sudo oai-to-circuit quotas check $conf_dir/quotas.json
  3. Start it:                 sudo systemctl enable --now $unit
  4. Watch it:                 systemctl status $unit; journalctl -u $unit -f
  5. Give people keys:         sudo -u $user oai-to-circuit keys create --name "Alice" --template standard \\
                                 --env-file $conf_dir/credentials.env --db $state_dir/quota.db
  6. Test it:                  curl -s http://localhost:12000/health
Upgrades later: sudo scripts/install.sh --upgrade
EOF
