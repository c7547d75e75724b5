#!/bin/sh
# Installs fleet-agent on a systemd device without dpkg (README.md, "Devices without dpkg").
#
#   sh install.sh [--binary FILE] [--unit FILE] [--config FILE]
#
# Run it as root from the unpacked fleet-agent_VERSION_ARCH.tar.gz (deploy/package-deb.sh makes
# it), which holds this script beside fleet-agent, fleet-agent.service and agent.toml; the flags
# point at other copies of those three files.
#
# What it does, the same way as the fleet-agent package:
#   /usr/bin/fleet-agent                      the binary, after checking it is built for this
#                                             device's userland and that it runs here (glibc)
#   /etc/systemd/system/fleet-agent.service   the unit, enabled, never started by a first install
#   /etc/fleet/agent.toml                     the config, installed once; never overwritten once
#                                             modified (a newer default goes to agent.toml.new)
#   /var/lib/fleet-agent, /opt/fleet/app      state and the application's slots
# Running it again changes nothing unless a file changed; a running agent is restarted only when
# its binary or unit changed. It refuses to run where the fleet-agent package is installed.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
binary=$here/fleet-agent
unit=$here/fleet-agent.service
config=$here/agent.toml

BIN=/usr/bin/fleet-agent
UNIT=/etc/systemd/system/fleet-agent.service
CONF=/etc/fleet/agent.toml
# SHA-256 of the config as this script last installed it: tells "modified by the admin"
# from "as installed" (dpkg keeps the same record for a conffile).
CONF_SUM=/etc/fleet/.agent.toml.installed.sha256

say() { printf 'install.sh: %s\n' "$*"; }
die() {
    printf 'install.sh: error: %s\n' "$1" >&2
    [ -z "${2:-}" ] || printf 'hint: %s\n' "$2" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case $1 in
    --binary) binary=${2:?--binary needs a file}; shift ;;
    --unit) unit=${2:?--unit needs a file}; shift ;;
    --config) config=${2:?--config needs a file}; shift ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" "sh install.sh --help" ;;
    esac
    shift
done

[ "$(id -u)" = 0 ] || die "run me as root" "sudo sh $0"
for f in "$binary" "$unit" "$config"; do
    [ -f "$f" ] || die "$f does not exist" \
        "run the install.sh inside the unpacked fleet-agent_VERSION_ARCH.tar.gz, or pass --binary, --unit and --config"
done
if command -v dpkg-query >/dev/null 2>&1 &&
    [ "$(dpkg-query -W -f '${db:Status-Status}' fleet-agent 2>/dev/null)" = installed ]; then
    die "the fleet-agent package is installed here; upgrade it with dpkg instead" \
        "apt install ./fleet-agent_VERSION_ARCH.deb"
fi

# ELF class (byte 4: 1 = 32-bit, 2 = 64-bit) and machine (bytes 18-19, little-endian) of a file.
elf_arch() {
    [ "$(od -An -c -N4 "$1" | tr -d ' ')" = '177ELF' ] || { echo "not-elf"; return; }
    class=$(od -An -tu1 -j4 -N1 "$1" | tr -d ' ')
    machine=$(od -An -tu1 -j18 -N2 "$1" | awk '{ print $1 + 256 * $2 }')
    case $class:$machine in
    2:62) echo x86_64 ;;
    2:183) echo aarch64 ;;
    1:40) echo armv7 ;;
    *) echo "elf-$class-$machine" ;;
    esac
}
# The userland's architecture, not the kernel's: a Raspberry Pi 4 running 32-bit Raspberry Pi OS
# has an aarch64 kernel (uname -m) but can only run armv7 binaries.
want=$(elf_arch "$(readlink -f /bin/sh)")
have=$(elf_arch "$binary")
[ "$have" = "$want" ] || die "$binary is built for $have, this device runs $want binaries" \
    "use the fleet-agent tarball or package for $want (README.md, "Deploy on real devices")"
# Catches a C library older than the one the binary was built against (or the wrong file),
# before anything changes.
if ! out=$("$binary" --help 2>&1); then
    die "$binary does not run here: $out" "README.md, \"Deploy on real devices\", lists the glibc each build needs"
fi
case $out in
*"usage: fleet-agent"*) ;;
*) die "$binary is not fleet-agent (its --help says: $(echo "$out" | head -n 1))" ;;
esac

# changed: the binary or unit differs (a running agent restarts); wrote: any file was written.
changed=
wrote=
sum() { sha256sum <"$1" | cut -d' ' -f1; }
# Installs $1 as $2 with mode $3 unless identical; atomic (rename), so a running agent is undisturbed.
put() {
    if [ -f "$2" ] && [ "$(sum "$1")" = "$(sum "$2")" ]; then
        return 1
    fi
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.install-tmp"
    chmod "$3" "$2.install-tmp"
    mv -f "$2.install-tmp" "$2"
    wrote=1
    say "installed $2"
}
if put "$binary" "$BIN" 0755; then changed=1; fi
if put "$unit" "$UNIT" 0644; then changed=1; fi

new_sum=$(sum "$config")
if [ ! -e "$CONF" ]; then
    # It may hold the broker password.
    put "$config" "$CONF" 0600 || true
    echo "$new_sum" >"$CONF_SUM"
    say "set device.id, device.type, device.region, mqtt.host and trust.keys in $CONF"
else
    current=$(sum "$CONF")
    installed=$(cat "$CONF_SUM" 2>/dev/null || true)
    if [ "$current" = "$new_sum" ]; then
        echo "$new_sum" >"$CONF_SUM"
    elif [ "$current" = "$installed" ]; then
        # Untouched since the last install: the new default replaces it, as dpkg does.
        put "$config" "$CONF" 0600 || true
        echo "$new_sum" >"$CONF_SUM"
    else
        say "kept $CONF: it was modified after it was installed (or not installed by me)"
        if [ "$installed" != "$new_sum" ]; then
            put "$config" "$CONF.new" 0600 || true
            say "the new default is in $CONF.new; merge what you need"
        fi
    fi
fi

mkdir -p /var/lib/fleet-agent /opt/fleet/app

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if ! systemctl is-enabled --quiet fleet-agent.service; then
        systemctl enable --quiet fleet-agent.service
        say "enabled fleet-agent.service"
    fi
    if [ -n "$changed" ] && systemctl is-active --quiet fleet-agent.service; then
        systemctl restart fleet-agent.service
        say "restarted fleet-agent.service"
    elif ! systemctl is-active --quiet fleet-agent.service; then
        say "start it once configured: systemctl start fleet-agent"
    fi
else
    say "systemd is not running here: enable fleet-agent.service once it is"
fi
[ -n "$wrote" ] || say "nothing to do: fleet-agent is installed as given"
