#!/usr/bin/env bash
# Build a held-out echo-cancellation set: the same kind of far-end / mic pairs as make.sh, but with
# other voices, sentences, speeds, rooms (reverb, level, delay 10-80 ms), speaker bands (the cheap
# 250 Hz - 3.8 kHz one and a full-band one) and users: the check that what works on the committed
# set is not fitted to it (the README has the figures; set b was never used for a choice). Not
# committed (it is made in a few seconds); `hearken bench barge-in --set OUT` runs it.
#
# Requires espeak-ng (1.51 used) and sox (14.4.2 used). Usage: audio/echo/make-heldout.sh OUT_DIR [a|b]
# Variants a (h_*) and b (f_*) have the same rooms and different sentences, voices and users.
set -euo pipefail

OUT="${1:?usage: make-heldout.sh OUT_DIR [a|b]}"
VARIANT="${2:-a}"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

LEN=6.0
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

entries=()

# mix NAME VOICE SPEED DELAY_MS GAIN_DB LOWPASS REVERB NOISE SENTENCE [ONSET_MS UVOICE UGAIN UTEXT]
mix() {
  local user=()
  [ -n "${10:-}" ] && user=("${10}" "${11}" 170 "${12}" "${13}")
  mix_room "$OUT" "$1" "$2" "$3" "$4" "$5" 200 "$6" "$7" "$8" "$9" "${user[@]}"
  entries+=("$ENTRY")
}

# jump NAME VOICE DELAY1_MS DELAY2_MS SPLIT_S SENTENCE: the echo delay jumps (see jump_room).
jump() {
  jump_room "$OUT" "$1" "$2" "$3" "$4" "$5" 200 40 0.004 "$6"
  entries+=("$ENTRY")
}

case "$VARIANT" in
a)
S1="Sure. I have moved your dentist appointment to Thursday at nine thirty, and I will remind you an hour before."
S2="The capital of Australia is Canberra, not Sydney, which surprises a lot of people who visit."
S3="Playing your relaxing evening playlist in the living room, starting with a piano piece by Satie."
S4="It is currently seven degrees outside with light rain, so you might want to take an umbrella."
S5="Six hundred grams of flour, two teaspoons of salt, and a little more than half a litre of warm water."
S6="Your package was shipped this morning and should arrive the day after tomorrow before noon."

mix h_echo_a   en-us+m3       160 15 -3  3800 40 0.003 "$S1"
mix h_echo_b   en-gb          175 30 -5  7600 30 0.005 "$S2"
mix h_echo_c   en-us+f4       150 50 -2  3800 60 0.003 "$S3"
mix h_echo_d   en-gb-x-rp     180 70 -7  7600 50 0.008 "$S4"
mix h_echo_e   en-us+m7       165 25 -4  7600 40 0.004 "$S5"
mix h_echo_f   en-029         155 80 -3  3800 30 0.006 "$S6"
S7="Absolutely! Here are three ideas: a picnic by the river, a museum visit, or a cooking class downtown."
mix h_echo_g   en-us+f2       200 40  0  7600 30 0.010 "$S7"
mix h_echo_h   en-gb-scotland 170 20 -1  3800 70 0.002 "$S2"
jump h_jump_up   en-us        20 70 2.5 "$S4"
jump h_jump_down en-us+m3     70 20 2.5 "$S6"
mix h_barge_a  en-us+m3       160 15 -3  3800 40 0.003 "$S1" 2100 en-us+f2       -2 "Wait, not Thursday."
mix h_barge_b  en-gb          175 30 -5  7600 30 0.005 "$S2" 1500 en-gb-scotland  0 "Okay, stop."
mix h_barge_c  en-us+f4       150 50 -2  3800 60 0.003 "$S3" 2800 en-us+m1       -3 "Pause."
mix h_barge_d  en-gb-x-rp     180 70 -7  7600 50 0.008 "$S4" 1900 en-us+f3       -4 "Thanks, that's enough."
mix h_barge_e  en-us+m7       165 25 -4  7600 40 0.004 "$S5" 3300 en-gb+f4       -1 "Hang on, how much salt?"
mix h_barge_f  en-029         155 80 -3  3800 30 0.006 "$S6" 2400 en-us+m2       -2 "Fine, thank you."
;;
b)
S1="Okay. The train to Edinburgh leaves from platform four at ten past eleven and takes about four hours."
S2="Bananas are berries, but strawberries are not, at least according to botanists who study these things."
S3="Turning off the lights in the kitchen and the hallway, and setting the heating to nineteen degrees."
S4="Tomorrow looks windy in the morning, with sunny spells in the afternoon and a low of four degrees."
S5="Whisk three eggs with a pinch of salt, melt the butter in a pan, and pour them in on a low heat."
S6="You have two new messages, one from your sister about dinner and one from the library about a book."

mix f_echo_a   en-us+m3       160 15 -3  3800 40 0.003 "$S1"
mix f_echo_b   en-gb          175 30 -5  7600 30 0.005 "$S2"
mix f_echo_c   en-us+f4       150 50 -2  3800 60 0.003 "$S3"
mix f_echo_d   en-gb-x-rp     180 70 -7  7600 50 0.008 "$S4"
mix f_echo_e   en-us+m7       165 25 -4  7600 40 0.004 "$S5"
mix f_echo_f   en-029         155 80 -3  3800 30 0.006 "$S6"
S7="Great question! Octopuses have three hearts, blue blood, and they can taste things with their arms."
mix f_echo_g   en-us+f2       200 40  0  7600 30 0.010 "$S7"
mix f_echo_h   en-gb-scotland 170 20 -1  3800 70 0.002 "$S2"
jump f_jump_up   en-us        20 70 2.5 "$S4"
jump f_jump_down en-us+m3     70 20 2.5 "$S6"
mix f_barge_a  en-us+m3       160 15 -3  3800 40 0.003 "$S1" 2600 en-us+f5       -2 "Sorry, which platform?"
mix f_barge_b  en-gb          175 30 -5  7600 30 0.005 "$S2" 2000 en-us+m4  0 "Stop it."
mix f_barge_c  en-us+f4       150 50 -2  3800 60 0.003 "$S3" 1700 en-gb+f2       -3 "Quiet please."
mix f_barge_d  en-gb-x-rp     180 70 -7  7600 50 0.008 "$S4" 3100 en-gb-x-rp       -4 "No no no."
mix f_barge_e  en-us+m7       165 25 -4  7600 40 0.004 "$S5" 2300 en-us+f1       -1 "Excuse me?"
mix f_barge_f  en-029         155 80 -3  3800 30 0.006 "$S6" 2900 en-029       -2 "Skip that one."
;;
*) echo "variant must be a or b, got $VARIANT" >&2; exit 2 ;;
esac

manifest "$OUT/manifest.json" "held-out set made by make-heldout.sh: other voices, sentences, rooms and users than make.sh's" "${entries[@]}"
echo "wrote ${#entries[@]} mixes and manifest.json to $OUT"
