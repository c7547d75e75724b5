#!/usr/bin/env bash
# Builds fleet's deployables for a device architecture with Debian's rustc (README.md,
# "Deploy on real devices"):
#
#   deploy/cross-build.sh TARGET [--release] [-p PACKAGE]...
#
#   TARGET    aarch64-unknown-linux-gnu (Jetson, Raspberry Pi 4/5 on 64-bit OS, ARM gateways)
#             armv7-unknown-linux-gnueabihf (32-bit Raspberry Pi OS: needs Debian's armhf std,
#             which did not install here; deploy/README.md, "armv7")
#   --release the workspace's release profile (LTO, stripped): what packages ship
#   -p        packages to build; default fleet-agent, fleet-coordinator and fleetctl
#
# Binaries land in target/cross/TARGET/{debug,release}/ (FLEET_CROSS_TARGET_DIR moves it). The
# separate target directory matters: the host build in target/ uses rustup's rustc, and sharing a
# directory between two compilers would make each rebuild everything the other built.
#
# Needs (Debian 12, as root, once):
#   dpkg --add-architecture arm64 && apt-get update
#   apt-get install -y rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
#       libc6-dev-arm64-cross qemu-user-static
# The linker and the qemu runner are set in .cargo/config.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '5,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

target=${1:-}
[[ -n $target && $target != -* ]] || usage
shift
profile=debug
packages=()
while (($#)); do
    case $1 in
    --release) profile=release ;;
    -p)
        [[ $# -ge 2 ]] || usage
        packages+=("$2")
        shift
        ;;
    -h | --help) usage ;;
    *) usage ;;
    esac
    shift
done
((${#packages[@]})) || packages=(fleet-agent fleet-coordinator fleetctl)

# Debian's rustc and the cross toolchain's prefix for each target, and what installs them.
case $target in
aarch64-unknown-linux-gnu)
    gcc=aarch64-linux-gnu-gcc
    apt="dpkg --add-architecture arm64 && apt-get update && apt-get install -y rustc-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static"
    ;;
armv7-unknown-linux-gnueabihf)
    gcc=arm-linux-gnueabihf-gcc
    apt="dpkg --add-architecture armhf && apt-get update && apt-get install -y rustc-web libstd-rust-web-dev:armhf gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static"
    ;;
*)
    echo "cross-build: unknown target $target (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" >&2
    echo "hint: for this machine's own architecture use \`cargo build --release\`" >&2
    exit 2
    ;;
esac

rustc=${FLEET_CROSS_RUSTC:-/usr/bin/rustc}
missing=()
[[ -x $rustc ]] || missing+=("$rustc (Debian's rustc-web)")
command -v "$gcc" >/dev/null || missing+=("$gcc")
if [[ -x $rustc ]]; then
    sysroot=$("$rustc" --print sysroot)
    [[ -d $sysroot/lib/rustlib/$target/lib ]] ||
        missing+=("the $target standard library for $("$rustc" --version) in $sysroot/lib/rustlib")
fi
if ((${#missing[@]})); then
    printf 'cross-build: missing %s\n' "${missing[@]}" >&2
    echo "hint (Debian 12, as root): $apt" >&2
    exit 1
fi

target_dir=${FLEET_CROSS_TARGET_DIR:-target/cross}
args=(build --target "$target" --target-dir "$target_dir")
[[ $profile == release ]] && args+=(--release)
for p in "${packages[@]}"; do args+=(-p "$p"); done

echo "cross-build: $("$rustc" --version) → $target_dir/$target/$profile (${packages[*]})" >&2
RUSTC=$rustc cargo "${args[@]}"
