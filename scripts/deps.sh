#!/usr/bin/env bash
# Install what a fresh Debian / Raspberry Pi OS machine with only Rust lacks to build and test hearken:
#   libasound2-dev  ALSA headers for cpal (found through pkg-config)
#   pkg-config      how alsa-sys finds them
#   cmake           builds the bundled libopus (opus crate)
#   build-essential only when there is no C compiler (webrtc-vad, libopus and ring compile C)
# plus the rustfmt and clippy components. Idempotent: checks first, installs only what is missing,
# and touches nothing (no apt-get update) when everything is there. Runs as root or through sudo.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

say() { printf 'deps: %s\n' "$*"; }

installed() {
    # Require "install ok installed" (a removed package whose config files remain is not). dpkg-query -W
    # rather than dpkg -s: with a foreign architecture added (cross builds), `dpkg -s` calls a package
    # installed for two architectures ambiguous and fails.
    dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo DEBIAN_FRONTEND=noninteractive "$@"
    else
        say "not root and no sudo: run as root: $*" >&2
        exit 1
    fi
}

if ! command -v dpkg >/dev/null 2>&1; then
    say "no dpkg: not Debian-like; install ALSA headers, pkg-config, cmake and a C compiler yourself" >&2
    exit 1
fi

wanted=(libasound2-dev pkg-config cmake)
if ! command -v cc >/dev/null 2>&1; then
    wanted+=(build-essential)
fi

missing=()
for pkg in "${wanted[@]}"; do
    if ! installed "$pkg"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    say "system packages present: ${wanted[*]}"
else
    say "installing: ${missing[*]}"
    # A mirror in mid-sync can fail one index; the install below still fails loudly if a package it
    # needs is really unavailable.
    as_root apt-get update -qq || say "apt-get update reported errors; trying the install anyway" >&2
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
    say "installed: ${missing[*]}"
fi

if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
    say "rustfmt and clippy present"
elif command -v rustup >/dev/null 2>&1; then
    say "adding rustup components rustfmt clippy"
    rustup component add rustfmt clippy
else
    say "cargo fmt / cargo clippy missing and no rustup: install rustfmt and clippy for this toolchain" >&2
    exit 1
fi
