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

SOX=(sox -R -D)   # -R: repeatable noise; -D: no dither
FMT=(-r 16000 -c 1 -b 16 -e signed-integer)
LEN=5.0           # seconds per mix

# speak VOICE TEXT OUT.wav -> 16 kHz mono, silence trimmed, peak -3 dBFS
speak() {
  espeak-ng -v "$1" -s 165 -w "$TMP/raw.wav" "$2"
  "${SOX[@]}" "$TMP/raw.wav" "${FMT[@]}" "$3" rate -v 16k \
    silence 1 0.01 0.5% reverse silence 1 0.01 0.5% reverse gain -n -3
}

# place IN.wav START_S OUT.wav -> IN starting at START_S, LEN seconds long
place() {
  "${SOX[@]}" "$1" "${FMT[@]}" "$3" pad "$2" "$LEN" trim 0 "$LEN"
}

entries=()

# mix NAME DELAY_MS ECHO_GAIN_DB SENTENCE [USER_ONSET_MS USER_GAIN_DB USER_TEXT]
mix() {
  local name="$1" delay="$2" gain="$3" sentence="$4" onset="${5:-}" ugain="${6:-0}" utext="${7:-}"
  speak en-us "$sentence" "$TMP/agent.wav"
  place "$TMP/agent.wav" 0.2 "$OUT/${name}_far.wav"
  # The room: speaker band (250 Hz - 3.8 kHz), a small reverb, the delay, the level.
  "${SOX[@]}" "$OUT/${name}_far.wav" "${FMT[@]}" "$TMP/echo.wav" \
    highpass 250 lowpass 3800 reverb 30 50 20 gain "$gain" pad "$(printf '0.%03d' "$delay")" 0 trim 0 "$LEN"
  "${SOX[@]}" "${FMT[@]}" -n "${FMT[@]}" "$TMP/noise.wav" synth "$LEN" whitenoise vol 0.003
  if [ -n "$onset" ]; then
    speak en-gb+f3 "$utext" "$TMP/user.wav"
    "${SOX[@]}" "$TMP/user.wav" "${FMT[@]}" "$TMP/user_g.wav" gain "$ugain"
    place "$TMP/user_g.wav" "$(printf '%d.%03d' $((onset / 1000)) $((onset % 1000)))" "$TMP/user_p.wav"
    "${SOX[@]}" -m -v 1 "$TMP/echo.wav" -v 1 "$TMP/user_p.wav" -v 1 "$TMP/noise.wav" "${FMT[@]}" "$OUT/${name}_mic.wav"
    entries+=("{\"name\": \"$name\", \"far\": \"${name}_far.wav\", \"mic\": \"${name}_mic.wav\", \"onset_ms\": $onset, \"delay_ms\": $delay}")
  else
    "${SOX[@]}" -m -v 1 "$TMP/echo.wav" -v 1 "$TMP/noise.wav" "${FMT[@]}" "$OUT/${name}_mic.wav"
    entries+=("{\"name\": \"$name\", \"far\": \"${name}_far.wav\", \"mic\": \"${name}_mic.wav\", \"onset_ms\": null, \"delay_ms\": $delay}")
  fi
}

# jump NAME DELAY1_MS DELAY2_MS SENTENCE -> OUT/jump: an echo-only mix whose echo delay jumps from
# DELAY1 to DELAY2 at 2.5 s (the sound card's clock slipped), with a full-band speaker; the echo
# canceller's filter no longer matches and lets the echo through until it has re-converged.
jump() {
  local name="$1" d1="$2" d2="$3" sentence="$4"
  mkdir -p "$OUT/jump"
  speak en-us "$sentence" "$TMP/agent.wav"
  place "$TMP/agent.wav" 0.2 "$OUT/jump/${name}_far.wav"
  for d in "$d1" "$d2"; do
    "${SOX[@]}" "$OUT/jump/${name}_far.wav" "${FMT[@]}" "$TMP/e$d.wav" \
      highpass 250 lowpass 7600 reverb 30 50 20 gain -4 pad "$(printf '0.%03d' "$d")" 0 trim 0 "$LEN"
  done
  "${SOX[@]}" "$TMP/e$d1.wav" "$TMP/a.wav" trim 0 2.5
  "${SOX[@]}" "$TMP/e$d2.wav" "$TMP/b.wav" trim 2.5
  "${SOX[@]}" "$TMP/a.wav" "$TMP/b.wav" "$TMP/echo.wav"
  "${SOX[@]}" "${FMT[@]}" -n "${FMT[@]}" "$TMP/noise.wav" synth "$LEN" whitenoise vol 0.003
  "${SOX[@]}" -m -v 1 "$TMP/echo.wav" -v 1 "$TMP/noise.wav" "${FMT[@]}" "$OUT/jump/${name}_mic.wav"
  jumps+=("{\"name\": \"$name\", \"far\": \"${name}_far.wav\", \"mic\": \"${name}_mic.wav\", \"onset_ms\": null, \"delay_ms\": $d1}")
}
jumps=()

mix echo_10ms  10 -4  "The forecast for tomorrow is sunny with a light breeze and a high of twenty two degrees."
mix echo_35ms  35 -6  "I have added milk, eggs and bread to your shopping list, and set a timer for ten minutes."
mix echo_60ms  60 -3  "Your next meeting is at three o'clock in the small conference room on the second floor."
mix echo_80ms  80 -8  "Here is a short story about a lighthouse keeper who lived alone on a rocky island."
mix barge_20ms 20 -4  "The forecast for tomorrow is sunny with a light breeze and a high of twenty two degrees." 2200 0 "Stop, wait a moment."
mix barge_45ms 45 -6  "I have added milk, eggs and bread to your shopping list, and set a timer for ten minutes." 1800 -2 "No, cancel that."
mix barge_65ms 65 -3  "Your next meeting is at three o'clock in the small conference room on the second floor." 2600 0 "Hey, hold on."
mix barge_80ms 80 -8  "Here is a short story about a lighthouse keeper who lived alone on a rocky island." 3000 -4 "Actually, never mind."

{
  echo "{"
  echo "  \"about\": \"far = what the speaker played, mic = its echo (delay_ms, band-limited, reverb, noise) plus, where onset_ms is set, a user utterance starting then; made by make.sh\","
  echo "  \"mixes\": ["
  for i in "${!entries[@]}"; do
    sep=","; [ "$i" -eq $(( ${#entries[@]} - 1 )) ] && sep=""
    echo "    ${entries[$i]}$sep"
  done
  echo "  ]"
  echo "}"
} >"$OUT/manifest.json"
jump jump_20_70ms 20 70 "I have added milk, eggs and bread to your shopping list, and set a timer for ten minutes."
jump jump_70_20ms 70 20 "Here is a short story about a lighthouse keeper who lived alone on a rocky island."
{
  echo "{"
  echo "  \"about\": \"echo-only mixes whose echo delay jumps at 2.5 s (a clock slip), full-band speaker; made by ../make.sh\","
  echo "  \"mixes\": ["
  for i in "${!jumps[@]}"; do
    sep=","; [ "$i" -eq $(( ${#jumps[@]} - 1 )) ] && sep=""
    echo "    ${jumps[$i]}$sep"
  done
  echo "  ]"
  echo "}"
} >"$OUT/jump/manifest.json"
echo "wrote ${#entries[@]} mixes and manifest.json to $OUT, ${#jumps[@]} to $OUT/jump"
