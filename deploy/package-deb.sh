#!/usr/bin/env bash
# Builds the Debian packages fleet-agent, fleet-coordinator and fleetctl from binaries that are
# already built (README.md, "Deploy on real devices"):
#
#   deploy/package-deb.sh [--arch amd64|arm64] [--bin-dir DIR] [--version VERSION] [--out DIR] [PACKAGE...]
#
#   --arch     Debian architecture of the binaries [default: this machine's]
#   --bin-dir  where fleet-agent, fleet-coordinator and fleetctl are [default: target/release for
#              this machine's architecture, target/cross/aarch64-unknown-linux-gnu/release for arm64]
#   --version  Debian version [default: the workspace version, revision 1: 0.1.0-1]
#   --out      where the .deb files go [default: target/deb]
#   PACKAGE    fleet-agent, fleet-coordinator, fleetctl [default: all three]
#
# Prints the path of each package built, and of fleet-agent_VERSION_ARCH.tar.gz (the agent's files
# with deploy/install.sh, for devices without dpkg). Build the binaries first:
#   cargo build --release -p fleet-agent -p fleet-coordinator -p fleetctl     # amd64 (this machine)
#   deploy/cross-build.sh aarch64-unknown-linux-gnu --release                 # arm64
#
# Design: a plain `dpkg-deb --build` rather than cargo-deb. Every file of a package and every line
# of its maintainer scripts is in this repository (deploy/debian/), nothing is generated behind
# the scenes, no tool has to be installed in CI, and packaging a cross-built binary is the same
# step as packaging a native one. Binaries are stripped on the way in (a no-op for the release
# profile, which strips already), so a debug build packages small enough for tests.
#
# Needs dpkg-deb, readelf and strip (binutils; aarch64-linux-gnu-strip for arm64).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '5,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

host_arch=$(dpkg --print-architecture)
arch=$host_arch
bin_dir=
version=
out=target/deb
packages=()
while (($#)); do
    case $1 in
    --arch | --bin-dir | --version | --out)
        [[ $# -ge 2 ]] || usage
        case $1 in
        --arch) arch=$2 ;;
        --bin-dir) bin_dir=$2 ;;
        --version) version=$2 ;;
        --out) out=$2 ;;
        esac
        shift
        ;;
    fleet-agent | fleet-coordinator | fleetctl) packages+=("$1") ;;
    *) usage ;;
    esac
    shift
done
((${#packages[@]})) || packages=(fleet-agent fleet-coordinator fleetctl)

# The ELF machine each Debian architecture's binaries must have (readelf -h), the strip that
# understands them, and where the release build puts them.
case $arch in
amd64) machine='Advanced Micro Devices X86-64' strip=strip triple=x86_64-unknown-linux-gnu ;;
arm64) machine='AArch64' strip=aarch64-linux-gnu-strip triple=aarch64-unknown-linux-gnu ;;
*)
    echo "package-deb: architecture $arch is not packaged (amd64, arm64); armv7: deploy/README.md" >&2
    exit 2
    ;;
esac
if [[ -z $bin_dir ]]; then
    if [[ $arch == "$host_arch" ]]; then bin_dir=target/release; else bin_dir=target/cross/$triple/release; fi
fi
if [[ -z $version ]]; then
    version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)-1
fi
[[ $version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || {
    echo "package-deb: $version is not a Debian version" >&2
    exit 2
}
command -v "$strip" >/dev/null || {
    echo "package-deb: $strip not found (apt-get install -y binutils; arm64: binutils-aarch64-linux-gnu)" >&2
    exit 1
}
mkdir -p "$out"
out=$(cd "$out" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Installs binary NAME from the bin dir, stripped, after checking it is built for $arch.
add_binary() {
    local name=$1 dest=$2 src=$bin_dir/$1
    if [[ ! -f $src ]]; then
        echo "package-deb: $src is not built" >&2
        if [[ $arch == "$host_arch" ]]; then
            echo "hint: cargo build --release -p $name" >&2
        else
            echo "hint: deploy/cross-build.sh $triple --release" >&2
        fi
        exit 1
    fi
    if ! readelf -h "$src" | grep -q "Machine: *$machine\$"; then
        echo "package-deb: $src is not an $arch binary ($(readelf -h "$src" | sed -n 's/ *Machine: *//p'))" >&2
        exit 1
    fi
    install -d "$(dirname "$dest")"
    "$strip" -o "$dest" "$src"
    chmod 0755 "$dest"
}

# The lowest glibc the binary runs on: the newest GLIBC_x.y symbol version it needs.
glibc_needed() {
    readelf -W -V "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1
}

# The packaged /etc/fleet/agent.toml: deploy/agent.toml with the example's device id and release
# key blanked. The example key is RFC 8032's test key, whose secret is published: a device must
# never trust it by default. Until both are set the agent exits 3 (invalid configuration), which
# its unit does not restart, so an unconfigured agent cannot run even after a reboot.
agent_config() {
    {
        echo "# Installed by the fleet-agent package: set device.id, device.type, device.region,"
        echo "# mqtt.host and trust.keys, then \`systemctl start fleet-agent\`. Until device.id and"
        echo "# trust.keys are set the agent refuses to start (exit code 3, invalid configuration)."
        echo "#"
        sed -e 's/^id = .*/id = ""/' -e 's/^keys = .*/keys = []/' deploy/agent.toml
    } >"$1"
    # deploy/agent.toml changed shape: fail here rather than ship the example's values.
    grep -qx 'id = ""' "$1" && grep -qx 'keys = \[\]' "$1" || {
        echo "package-deb: deploy/agent.toml no longer has an 'id = …' and a 'keys = …' line to blank" >&2
        exit 1
    }
}

maintainer="${DEBFULLNAME:-fleet maintainers} <${DEBEMAIL:-fleet@fleet-rollouts.invalid}>"

# A one-entry Debian changelog naming the commit the package was built from.
changelog() {
    local commit
    commit=$(git describe --always --dirty 2>/dev/null || echo unknown)
    printf '%s (%s) unstable; urgency=medium\n\n  * Built from fleet %s by deploy/package-deb.sh.\n\n -- %s  %s\n' \
        "$1" "$version" "$commit" "$maintainer" "$(date -R)"
}

build() {
    local pkg=$1 dir=$scratch/$1
    local description depends extra_depends=
    install -d "$dir/DEBIAN" "$dir/usr/share/doc/$pkg"
    install -m 0644 deploy/debian/copyright "$dir/usr/share/doc/$pkg/copyright"
    changelog "$pkg" | gzip -9n >"$dir/usr/share/doc/$pkg/changelog.Debian.gz"
    case $pkg in
    fleet-agent)
        add_binary fleet-agent "$dir/usr/bin/fleet-agent"
        install -D -m 0644 systemd/fleet-agent.service "$dir/lib/systemd/system/fleet-agent.service"
        install -d "$dir/etc/fleet"
        agent_config "$dir/etc/fleet/agent.toml"
        # It may hold the broker password.
        chmod 0600 "$dir/etc/fleet/agent.toml"
        description="fleet device agent: health-gated application updates
 Runs on every device as a systemd service: pulls its desired release over MQTT,
 installs it into the standby of two slots, swaps atomically, proves it on a
 local trial and rolls back by itself when the new version is bad.
 .
 Installing enables the service but does not start it: set the device id,
 type, region, broker and release key in /etc/fleet/agent.toml first."
        ;;
    fleet-coordinator)
        add_binary fleet-coordinator "$dir/usr/bin/fleet-coordinator"
        install -D -m 0644 systemd/fleet-coordinator.service \
            "$dir/lib/systemd/system/fleet-coordinator.service"
        install -D -m 0644 deploy/debian/fleet-coordinator/user.conf \
            "$dir/lib/systemd/system/fleet-coordinator.service.d/user.conf"
        install -D -m 0644 deploy/coordinator.toml "$dir/etc/fleet/coordinator.toml"
        extra_depends=", passwd"
        description="fleet coordinator: device registry and health-gated rollouts
 Runs on a gateway as a systemd service, as the system user fleet: an embedded
 MQTT broker (or an external one), the device registry and audit trail in
 SQLite, canary and percentage waves gated on application health, automatic
 rollback.
 .
 Installing enables the service but does not start it: set the release keys
 and listen addresses in /etc/fleet/coordinator.toml first."
        ;;
    fleetctl)
        add_binary fleetctl "$dir/usr/bin/fleetctl"
        description="fleet operator command line
 Plan, start, watch, approve and roll back fleet rollouts; inspect the device
 registry and the audit trail; make release keys and sign manifests."
        ;;
    esac
    depends="libc6 (>= $(glibc_needed "$dir/usr/bin/$pkg")), libgcc-s1$extra_depends"

    local script
    for script in postinst prerm postrm; do
        if [[ -f deploy/debian/$pkg/$script ]]; then
            install -m 0755 "deploy/debian/$pkg/$script" "$dir/DEBIAN/$script"
        fi
    done
    # Every file under /etc is a conffile: dpkg keeps the admin's version on upgrade.
    if [[ -d $dir/etc ]]; then
        (cd "$dir" && find etc -type f | sed 's|^|/|' | sort) >"$dir/DEBIAN/conffiles"
    fi
    (cd "$dir" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
        xargs -0 md5sum) >"$dir/DEBIAN/md5sums"
    local size
    size=$(du -sk --exclude=DEBIAN "$dir" | cut -f1)
    cat >"$dir/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Homepage: https://github.com/fleet-rollouts/fleet
Description: $description
EOF
    local deb=$out/${pkg}_${version}_${arch}.deb
    dpkg-deb --root-owner-group -Z"${FLEET_DEB_COMPRESSION:-xz}" --build "$dir" "$deb" >/dev/null
    echo "$deb"
    [[ $pkg == fleet-agent ]] && tarball "$dir"
    return 0
}

# fleet-agent_VERSION_ARCH.tar.gz for devices without dpkg: the package's binary, unit and
# config beside deploy/install.sh, which installs them the way the package does.
tarball() {
    local staged=$1 name=fleet-agent_${version}_${arch}
    local dir=$scratch/tar/$name
    install -d "$dir"
    install -m 0755 deploy/install.sh "$dir/install.sh"
    install -m 0755 "$staged/usr/bin/fleet-agent" "$dir/fleet-agent"
    install -m 0644 "$staged/lib/systemd/system/fleet-agent.service" "$dir/fleet-agent.service"
    install -m 0600 "$staged/etc/fleet/agent.toml" "$dir/agent.toml"
    tar -C "$scratch/tar" --owner=0 --group=0 --numeric-owner -czf "$out/$name.tar.gz" "$name"
    echo "$out/$name.tar.gz"
}

for pkg in "${packages[@]}"; do
    build "$pkg"
done
