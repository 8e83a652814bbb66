#!/usr/bin/env bash
# Install what a fresh Debian / Raspberry Pi OS machine with only Rust lacks to build and test hearken:
#   libasound2-dev  ALSA headers for cpal (found through pkg-config)
#   pkg-config      how alsa-sys finds them
#   cmake           builds the bundled libopus (opus crate)
#   build-essential only when there is no C compiler (webrtc-vad, libopus and ring compile C)
#   espeak-ng       the speech tests' TTS (the default tts.command, and the test Wyoming server)
#   python3, python3-venv  only when `python3 -m venv` cannot make a venv with pip
# plus the rustfmt and clippy components, and a Python venv for the speech tests' real Wyoming server
# (tests/wyoming_server.py): the official `wyoming` package and `pocketsphinx` (with its English model)
# from PyPI, pinned, at $HEARKEN_SPEECH_VENV or else target/speech-venv (under $CARGO_TARGET_DIR when
# that is set), where tests/speech.rs looks. A venv because Debian's python3 refuses a system-wide pip
# install (PEP 668). Idempotent: checks first, installs only what is missing, and touches nothing (no
# apt-get update, no pip) when everything is there. Runs as root or through sudo.
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

# Pinned: the versions the speech tests were written against. wyoming is pure Python; pocketsphinx
# has binary wheels for x86-64 and arm64 Linux, so nothing compiles there (32-bit ARM would build it
# from source).
SPEECH_PIP=(wyoming==1.10.2 pocketsphinx==5.1.1)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HEARKEN_SPEECH_VENV:-${CARGO_TARGET_DIR:-$repo/target}/speech-venv}"
# Relative to where cargo runs, as cargo takes a relative CARGO_TARGET_DIR.
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac

# True when python3 can make a venv with pip in it (Debian splits ensurepip into python3-venv).
venv_works() {
    command -v python3 >/dev/null 2>&1 || return 1
    local probe
    probe="$(mktemp -d)"
    if python3 -m venv "$probe/v" >/dev/null 2>&1 && [ -x "$probe/v/bin/pip" ]; then
        rm -rf "$probe"
        return 0
    fi
    rm -rf "$probe"
    return 1
}

# True when the venv has exactly the pinned packages and they import.
venv_ready() {
    [ -x "$venv/bin/python" ] || return 1
    "$venv/bin/python" - "${SPEECH_PIP[@]}" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
import wyoming.server, pocketsphinx  # noqa: E401,F401
PY
}

wanted=(libasound2-dev pkg-config cmake espeak-ng)
if ! command -v cc >/dev/null 2>&1; then
    wanted+=(build-essential)
fi
# Only when it would be used: an existing venv needs no python3-venv.
if ! venv_ready && ! venv_works; then
    command -v python3 >/dev/null 2>&1 || wanted+=(python3)
    wanted+=(python3-venv)
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

if venv_ready; then
    say "speech test venv present: $venv (${SPEECH_PIP[*]})"
else
    say "making the speech test venv: $venv (${SPEECH_PIP[*]})"
    # --clear: a half-made or outdated venv is rebuilt rather than patched.
    python3 -m venv --clear "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${SPEECH_PIP[@]}"
    venv_ready || { say "the speech test venv at $venv is still incomplete" >&2; exit 1; }
    say "speech test venv ready"
fi
