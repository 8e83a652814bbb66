#!/usr/bin/env bash
# Build the echo-cancellation evaluation set: far-end / mic WAV pairs plus manifest.json, the format
# `hearken bench barge-in --set DIR` reads (see the README, "Echo cancellation").
#
# far  = the agent speaking (espeak-ng, en-us), exactly what the speaker was given;
# mic  = that far end as a cheap speaker and a room return it: attenuated, delayed (10-80 ms),
#        band-limited (speaker and mic), a short reverb, a little white noise; in the barge-in
#        mixes a user utterance (another voice) starts at a known time (onset_ms).
#
# Requires espeak-ng (1.51 used) and sox (14.4.2 used). Usage: audio/echo/make.sh [OUT_DIR]
# (default: next to this script, which is the committed set the tests use).
set -euo pipefail

OUT="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

LEN=5.0           # seconds per mix
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

entries=()
jumps=()

# mix NAME DELAY_MS ECHO_GAIN_DB SENTENCE [USER_ONSET_MS USER_GAIN_DB USER_TEXT]: the agent in en-us,
# a cheap speaker (250 Hz - 3.8 kHz), a small reverb, a little noise; the user in en-gb+f3.
mix() {
  local user=()
  [ -n "${5:-}" ] && user=("$5" en-gb+f3 165 "$6" "$7")
  mix_room "$OUT" "$1" en-us 165 "$2" "$3" 250 3800 30 0.003 "$4" "${user[@]}"
  entries+=("$ENTRY")
}

# jump NAME DELAY1_MS DELAY2_MS SENTENCE -> OUT/jump: the echo delay jumps at 2.5 s (see jump_room).
jump() {
  mkdir -p "$OUT/jump"
  jump_room "$OUT/jump" "$1" en-us "$2" "$3" 2.5 250 30 0.003 "$4"
  jumps+=("$ENTRY")
}

mix echo_10ms  10 -4  "The forecast for tomorrow is sunny with a light breeze and a high of twenty two degrees."
mix echo_35ms  35 -6  "I have added milk, eggs and bread to your shopping list, and set a timer for ten minutes."
mix echo_60ms  60 -3  "Your next meeting is at three o'clock in the small conference room on the second floor."
mix echo_80ms  80 -8  "Here is a short story about a lighthouse keeper who lived alone on a rocky island."
mix barge_20ms 20 -4  "The forecast for tomorrow is sunny with a light breeze and a high of twenty two degrees." 2200 0 "Stop, wait a moment."
mix barge_45ms 45 -6  "I have added milk, eggs and bread to your shopping list, and set a timer for ten minutes." 1800 -2 "No, cancel that."
mix barge_65ms 65 -3  "Your next meeting is at three o'clock in the small conference room on the second floor." 2600 0 "Hey, hold on."
mix barge_80ms 80 -8  "Here is a short story about a lighthouse keeper who lived alone on a rocky island." 3000 -4 "Actually, never mind."

manifest "$OUT/manifest.json" "far = what the speaker played, mic = its echo (delay_ms, band-limited, reverb, noise) plus, where onset_ms is set, a user utterance starting then; made by make.sh" "${entries[@]}"
jump jump_20_70ms 20 70 "I have added milk, eggs and bread to your shopping list, and set a timer for ten minutes."
jump jump_70_20ms 70 20 "Here is a short story about a lighthouse keeper who lived alone on a rocky island."
manifest "$OUT/jump/manifest.json" "echo-only mixes whose echo delay jumps at 2.5 s (a clock slip), full-band speaker; made by ../make.sh" "${jumps[@]}"
echo "wrote ${#entries[@]} mixes and manifest.json to $OUT, ${#jumps[@]} to $OUT/jump"
