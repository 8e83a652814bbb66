#!/usr/bin/env bash
# Regenerate the hearken earcons: 16 kHz mono 16-bit WAV, peak -12 dBFS,
# 5 ms fade-in/fade-out on every tone so nothing clicks.
# Requires: sox (14.4.2 used).
# Usage: audio/earcons/make.sh   (from anywhere; writes next to this script)
set -euo pipefail

OUT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# -R repeatable, -D no auto-dither (silent gaps stay digital zero)
SOX=(sox -R -D)
# format options are given for the null input (-n) AND the output, otherwise
# the null input defaults to 48 kHz and sox resamples behind our back
FMT=(-r 16000 -c 1 -b 16 -e signed-integer)
FADE=0.005
PEAK=-12

# tone SECONDS FREQ_HZ OUT.wav [TYPE] [extra effects...]
tone() {
  local dur="$1" freq="$2" out="$3" type="${4:-sine}"
  shift 4 || shift $#
  "${SOX[@]}" "${FMT[@]}" -n "${FMT[@]}" "$out" \
    synth "$dur" "$type" "$freq" gain -6 "$@" fade h "$FADE" "$dur" "$FADE"
}

gap() { "${SOX[@]}" "${FMT[@]}" -n "${FMT[@]}" "$2" trim 0 "$1"; }

# listening: rising two-tone chirp, 660 Hz then 880 Hz, 75 ms each (150 ms)
tone 0.075 660 "$TMP/t1.wav"
tone 0.075 880 "$TMP/t2.wav"
"${SOX[@]}" "$TMP/t1.wav" "$TMP/t2.wav" "$OUT/listening.wav" gain -n "$PEAK"

# done: falling two-tone, 880 Hz then 660 Hz (150 ms)
"${SOX[@]}" "$TMP/t2.wav" "$TMP/t1.wav" "$OUT/done.wav" gain -n "$PEAK"

# error: low double buzz, two 100 ms 220 Hz square blips softened by a
# 1.5 kHz low-pass, 100 ms apart (300 ms total)
tone 0.1 220 "$TMP/buzz.wav" square lowpass 1500
gap 0.1 "$TMP/gap.wav"
"${SOX[@]}" "$TMP/buzz.wav" "$TMP/gap.wav" "$TMP/buzz.wav" "$OUT/error.wav" gain -n "$PEAK"

# working: soft 1 kHz "thinking" tick, 60 ms, meant to be looped by the
# player (5 ms fade-in, then a 45 ms half-sine decay so it sounds like a tick)
"${SOX[@]}" "${FMT[@]}" -n "${FMT[@]}" "$OUT/working.wav" \
  synth 0.06 sine 1000 fade h "$FADE" 0.06 0.045 gain -n "$PEAK"

# tool_notice: the short spoken notice played when a tool call runs long ("One moment."),
# espeak-ng en-us at 165 wpm, leading/trailing silence trimmed, 16 kHz, peak -6 dBFS.
# Requires espeak-ng as well.
espeak-ng -v en-us -s 165 -w "$TMP/notice.wav" "One moment."
"${SOX[@]}" "$TMP/notice.wav" "${FMT[@]}" "$OUT/tool_notice.wav" \
  silence 1 0.01 0.5% reverse silence 1 0.01 0.5% reverse rate -v 16k gain -n -6

echo "earcons written to $OUT"
