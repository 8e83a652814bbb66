#!/usr/bin/env bash
# Cross-build hearken for an ARM board without Docker, on Debian or Ubuntu (x86_64 host):
#   cross/build.sh aarch64-unknown-linux-gnu     # Raspberry Pi OS 64-bit, Pi 3/4/5, Zero 2 W
#   cross/build.sh armv7-unknown-linux-gnueabihf # Raspberry Pi OS 32-bit
# Installs what it needs (as root, or through sudo): the cross gcc, the target's ALSA headers through
# Debian multiarch, cmake (libopus), and the Rust target. Prints the binary and its size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target="${1:-aarch64-unknown-linux-gnu}"
case "$target" in
  aarch64-unknown-linux-gnu) arch=arm64; triple=aarch64-linux-gnu ;;
  armv7-unknown-linux-gnueabihf) arch=armhf; triple=arm-linux-gnueabihf ;;
  *) echo "cross/build.sh: unsupported target $target (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" >&2; exit 2 ;;
esac

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
pkgs=("gcc-$triple" "libc6-dev-$arch-cross" "libasound2-dev:$arch" cmake pkg-config)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed$' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  dpkg --print-foreign-architectures | grep -qx "$arch" || as_root dpkg --add-architecture "$arch"
  # A mirror in mid-sync can fail one index (seen: bookworm-security armhf); the install below still
  # fails loudly if a package it needs is really missing.
  as_root apt-get update -qq || echo "cross/build.sh: apt-get update reported errors; trying the install anyway" >&2
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

t_upper="$(echo "$target" | tr 'a-z-' 'A-Z_')"
t_under="${target//-/_}"
export "CARGO_TARGET_${t_upper}_LINKER=$triple-gcc"
export "CC_${t_under}=$triple-gcc" "AR_${t_under}=$triple-ar"
# alsa-sys finds the target's ALSA through pkg-config.
export PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_LIBDIR="/usr/lib/$triple/pkgconfig:/usr/share/pkgconfig"
if [ "$arch" = armhf ]; then
  # libopus (built by cmake) gets NEON on armv7.
  export "CFLAGS_${t_under}=-mfpu=neon-vfpv4 -mfloat-abi=hard"
fi
cargo build --release --locked --target "$target" "${@:2}"
bin="target/$target/release/hearken"
size=$(stat -c %s "$bin")
printf 'cross/build.sh: %s: %s bytes (%.1f MiB, stripped)\n' "$bin" "$size" "$(echo "$size / 1048576" | bc -l)"
