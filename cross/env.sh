# Sourced, not run: `. cross/env.sh TARGET` (bash). Sets up this shell to build (and, under
# qemu-user, test) hearken for an ARM target from an x86_64 Debian or Ubuntu host, without Docker:
# installs what is missing (as root, or through sudo): the cross gcc and libc, the target's ALSA
# headers through Debian multiarch, cmake (libopus) and pkg-config, and the Rust target; then exports
# the linker, the C compiler and archiver for cc-rs, pkg-config's search path for alsa-sys, and
# QEMU_LD_PREFIX (where qemu-user finds the target's dynamic loader and libraries).
# Used by cross/build.sh and .ci/run. Sets CROSS_TARGET, CROSS_ARCH (Debian) and CROSS_TRIPLE (GNU).

CROSS_TARGET="${1:-aarch64-unknown-linux-gnu}"
case "$CROSS_TARGET" in
  aarch64-unknown-linux-gnu) CROSS_ARCH=arm64; CROSS_TRIPLE=aarch64-linux-gnu ;;
  armv7-unknown-linux-gnueabihf) CROSS_ARCH=armhf; CROSS_TRIPLE=arm-linux-gnueabihf ;;
  *)
    echo "cross/env.sh: unsupported target $CROSS_TARGET (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)" >&2
    return 2 ;;
esac

cross_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo DEBIAN_FRONTEND=noninteractive "$@"; fi
}

cross_missing=()
for cross_pkg in "gcc-$CROSS_TRIPLE" "libc6-dev-$CROSS_ARCH-cross" "libasound2-dev:$CROSS_ARCH" cmake pkg-config; do
  # dpkg-query -W, not dpkg -s: with a foreign architecture added, `dpkg -s` calls a package
  # installed for two architectures ambiguous.
  dpkg-query -W -f='${Status}\n' "$cross_pkg" 2>/dev/null | grep -q '^install ok installed$' ||
    cross_missing+=("$cross_pkg")
done
if [ "${#cross_missing[@]}" -gt 0 ]; then
  echo "cross/env.sh: installing ${cross_missing[*]}" >&2
  dpkg --print-foreign-architectures | grep -qx "$CROSS_ARCH" || cross_as_root dpkg --add-architecture "$CROSS_ARCH"
  # A mirror in mid-sync can fail one index (seen: bookworm-security armhf); the install below still
  # fails loudly if a package it needs is really missing.
  for cross_try in 1 2 3; do
    if cross_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq; then break; fi
    echo "cross/env.sh: apt-get update reported errors (try $cross_try of 3)" >&2
    if [ "$cross_try" -lt 3 ]; then sleep 10; fi
  done
  cross_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${cross_missing[@]}"
fi
rustup target list --installed | grep -qx "$CROSS_TARGET" || rustup target add "$CROSS_TARGET"

cross_upper="$(echo "$CROSS_TARGET" | tr 'a-z-' 'A-Z_')"
cross_under="${CROSS_TARGET//-/_}"
export "CARGO_TARGET_${cross_upper}_LINKER=$CROSS_TRIPLE-gcc"
export "CC_${cross_under}=$CROSS_TRIPLE-gcc" "AR_${cross_under}=$CROSS_TRIPLE-ar"
# alsa-sys finds the target's ALSA through pkg-config.
export PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_LIBDIR="/usr/lib/$CROSS_TRIPLE/pkgconfig:/usr/share/pkgconfig"
if [ "$CROSS_ARCH" = armhf ]; then
  # libopus (built by cmake) gets NEON on armv7.
  export "CFLAGS_${cross_under}=-mfpu=neon-vfpv4 -mfloat-abi=hard"
fi
# For qemu-user (qemu-aarch64-static, qemu-arm-static): where the target's loader and libraries are
# found. "/": the target's own multiarch libc6 (/lib/$CROSS_TRIPLE, pulled in by libasound2-dev:ARCH),
# as on the board. Not /usr/$CROSS_TRIPLE: that is the cross toolchain's libc (libc6-dev-ARCH-cross,
# an older glibc build), and its loader would pick up the multiarch libc.so.6 through the host's
# ld.so.cache: a mismatched pair, under which pthread_create spins forever (seen on Debian 12).
export QEMU_LD_PREFIX=/
unset cross_missing cross_pkg cross_try cross_upper cross_under
