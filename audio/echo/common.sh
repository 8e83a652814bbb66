# Shared by make.sh and make-heldout.sh (sourced): the voices, the room and the manifest. The caller
# sets TMP (a scratch directory) and LEN (seconds per mix). Requires espeak-ng and sox.

SOX=(sox -R -D)   # -R: repeatable noise; -D: no dither
FMT=(-r 16000 -c 1 -b 16 -e signed-integer)

# speak VOICE SPEED TEXT OUT.wav -> 16 kHz mono, silence trimmed, peak -3 dBFS
speak() {
  espeak-ng -v "$1" -s "$2" -w "$TMP/raw.wav" "$3"
  "${SOX[@]}" "$TMP/raw.wav" "${FMT[@]}" "$4" rate -v 16k \
    silence 1 0.01 0.5% reverse silence 1 0.01 0.5% reverse gain -n -3
}

# place IN.wav START_S OUT.wav -> IN starting at START_S, LEN seconds long
place() {
  "${SOX[@]}" "$1" "${FMT[@]}" "$3" pad "$2" "$LEN" trim 0 "$LEN"
}

# room FAR.wav OUT.wav DELAY_MS GAIN_DB HIGHPASS_HZ LOWPASS_HZ REVERB -> what the mic hears of FAR:
# the speaker's band, a small reverb, the level, the delay.
room() {
  "${SOX[@]}" "$1" "${FMT[@]}" "$2" \
    highpass "$5" lowpass "$6" reverb "$7" 50 20 gain "$4" pad "$(printf '0.%03d' "$3")" 0 trim 0 "$LEN"
}

# hiss OUT.wav VOLUME -> white noise, LEN seconds
hiss() {
  "${SOX[@]}" "${FMT[@]}" -n "${FMT[@]}" "$1" synth "$LEN" whitenoise vol "$2"
}

# entry NAME ONSET_MS|null DELAY_MS -> sets ENTRY, the mix's line in manifest.json
entry() {
  ENTRY="{\"name\": \"$1\", \"far\": \"$1_far.wav\", \"mic\": \"$1_mic.wav\", \"onset_ms\": $2, \"delay_ms\": $3}"
}

# mix_room DIR NAME VOICE SPEED DELAY_MS GAIN_DB HIGHPASS LOWPASS REVERB NOISE SENTENCE
#          [ONSET_MS USER_VOICE USER_SPEED USER_GAIN_DB USER_TEXT]
# -> DIR/NAME_far.wav (the agent from 0.2 s) and DIR/NAME_mic.wav (its echo, the noise and, with an
# onset, the user from then); sets ENTRY.
mix_room() {
  local dir="$1" name="$2" voice="$3" speed="$4" delay="$5" gain="$6" hp="$7" lp="$8" rev="$9"
  local noise="${10}" sentence="${11}" onset="${12:-}" uvoice="${13:-}" uspeed="${14:-}"
  local ugain="${15:-0}" utext="${16:-}"
  speak "$voice" "$speed" "$sentence" "$TMP/agent.wav"
  place "$TMP/agent.wav" 0.2 "$dir/${name}_far.wav"
  room "$dir/${name}_far.wav" "$TMP/echo.wav" "$delay" "$gain" "$hp" "$lp" "$rev"
  hiss "$TMP/noise.wav" "$noise"
  if [ -n "$onset" ]; then
    speak "$uvoice" "$uspeed" "$utext" "$TMP/user.wav"
    "${SOX[@]}" "$TMP/user.wav" "${FMT[@]}" "$TMP/user_g.wav" gain "$ugain"
    place "$TMP/user_g.wav" "$(printf '%d.%03d' $((onset / 1000)) $((onset % 1000)))" "$TMP/user_p.wav"
    "${SOX[@]}" -m -v 1 "$TMP/echo.wav" -v 1 "$TMP/user_p.wav" -v 1 "$TMP/noise.wav" "${FMT[@]}" "$dir/${name}_mic.wav"
    entry "$name" "$onset" "$delay"
  else
    "${SOX[@]}" -m -v 1 "$TMP/echo.wav" -v 1 "$TMP/noise.wav" "${FMT[@]}" "$dir/${name}_mic.wav"
    entry "$name" null "$delay"
  fi
}

# jump_room DIR NAME VOICE DELAY1_MS DELAY2_MS SPLIT_S HIGHPASS REVERB NOISE SENTENCE -> an echo-only
# mix whose echo delay jumps from DELAY1 to DELAY2 at SPLIT_S (the sound card's clock slipped), with
# a full-band speaker: the echo canceller's filter no longer matches and lets the echo through until
# it has re-converged. Sets ENTRY.
jump_room() {
  local dir="$1" name="$2" voice="$3" d1="$4" d2="$5" split="$6" hp="$7" rev="$8" noise="$9"
  local sentence="${10}"
  speak "$voice" 165 "$sentence" "$TMP/agent.wav"
  place "$TMP/agent.wav" 0.2 "$dir/${name}_far.wav"
  for d in "$d1" "$d2"; do
    room "$dir/${name}_far.wav" "$TMP/e$d.wav" "$d" -4 "$hp" 7600 "$rev"
  done
  "${SOX[@]}" "$TMP/e$d1.wav" "$TMP/a.wav" trim 0 "$split"
  "${SOX[@]}" "$TMP/e$d2.wav" "$TMP/b.wav" trim "$split"
  "${SOX[@]}" "$TMP/a.wav" "$TMP/b.wav" "$TMP/echo.wav"
  hiss "$TMP/noise.wav" "$noise"
  "${SOX[@]}" -m -v 1 "$TMP/echo.wav" -v 1 "$TMP/noise.wav" "${FMT[@]}" "$dir/${name}_mic.wav"
  entry "$name" null "$d1"
}

# manifest OUT.json ABOUT ENTRY... -> the set's manifest.json
manifest() {
  local out="$1" about="$2"
  shift 2
  local n=$#
  {
    echo "{"
    echo "  \"about\": \"$about\","
    echo "  \"mixes\": ["
    local i=0 e sep
    for e in "$@"; do
      i=$((i + 1))
      sep=","; [ "$i" -eq "$n" ] && sep=""
      echo "    $e$sep"
    done
    echo "  ]"
    echo "}"
  } >"$out"
}
