#!/usr/bin/env bash
# Cross-build hearken for an ARM board without Docker, on Debian or Ubuntu (x86_64 host):
#   cross/build.sh aarch64-unknown-linux-gnu     # Raspberry Pi OS 64-bit, Pi 3/4/5, Zero 2 W
#   cross/build.sh armv7-unknown-linux-gnueabihf # Raspberry Pi OS 32-bit
# Installs what it needs (as root, or through sudo; see cross/env.sh): the cross gcc, the target's ALSA
# headers through Debian multiarch, cmake (libopus), and the Rust target. Further arguments go to
# `cargo build`. Prints the binary and its size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
# shellcheck source=cross/env.sh
. cross/env.sh "${1:-aarch64-unknown-linux-gnu}"
cargo build --release --locked --target "$CROSS_TARGET" "${@:2}"
bin="target/$CROSS_TARGET/release/hearken"
size=$(stat -c %s "$bin")
awk -v b="$bin" -v s="$size" 'BEGIN { printf "cross/build.sh: %s: %d bytes (%.1f MiB, stripped)\n", b, s, s / 1048576 }'
