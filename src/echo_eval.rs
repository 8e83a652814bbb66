//! The barge-in evaluation behind `hearken bench barge-in`: far-end / mic WAV pairs (a folder with a
//! `manifest.json`, format in the README) run through the real uplink (echo canceller, gate, VAD,
//! Opus) and the real `TurnMachine`, in 10 ms steps, the far end fed as what the speaker played. Per
//! mix: false barge-ins (echo-only mixes), a missed barge-in (mixes with a user utterance), onset to
//! playback flushed, and the echo return loss enhancement after the first second.
//!
//! Context: a command-line tool and the tests; plain functions over files, no threads.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::audio::StreamFormat;
use crate::audio::earcon::decode_wav;
use crate::config::Config;
use crate::dsp::resample::StreamResampler;
use crate::dsp::uplink::{Uplink, UplinkEvent, UplinkSettings};
use crate::dsp::vad;
use crate::turn::{Action, Input, Ms, State, TurnMachine, TurnSettings};

/// Where the mix starts on the turn machine's clock: before it, a scripted user turn and the agent's
/// answer put the machine in `AgentSpeaking`.
const T0_MS: Ms = 2_000;

/// One entry of `manifest.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Mix {
    pub name: String,
    /// What the speaker played (any rate; mixed to mono).
    pub far: String,
    /// What the mic heard meanwhile.
    pub mic: String,
    /// Where the user starts speaking in the mic track, ms; `null` for an echo-only mix.
    pub onset_ms: Option<u64>,
}

#[derive(Debug, serde::Deserialize)]
struct Manifest {
    mixes: Vec<Mix>,
}

/// Read `DIR/manifest.json`.
pub fn load_set(dir: &Path) -> anyhow::Result<Vec<Mix>> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a manifest", path.display()))?;
    anyhow::ensure!(!m.mixes.is_empty(), "{}: no mixes", path.display());
    Ok(m.mixes)
}

/// What one mix gave.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MixResult {
    pub name: String,
    pub onset_ms: Option<u64>,
    /// Barge-ins where there was no user (echo-only mix, or before the user's onset).
    pub false_barge_ins: u32,
    /// The user spoke and no barge-in came.
    pub missed: bool,
    /// User onset (ground truth) -> playback flushed: the barge-in decision plus one output period.
    pub latency_ms: Option<u64>,
    /// The same from where the VAD placed the onset: what the gate, the turn machine and the flush
    /// add to the VAD's own onset delay.
    pub vad_latency_ms: Option<u64>,
    /// Mic energy / echo-cancelled energy over the far-end frames after the first second (those the
    /// gate took for echo), dB; echo-only mixes only (with a user in the mix it is left out).
    pub erle_db: Option<f64>,
    /// 10 ms frames the gate kept from the VAD, of those with the far end playing.
    pub gated_frames: u64,
    pub far_frames: u64,
    /// Whether the echo canceller ran (feature `aec` and `aec.enabled`).
    pub aec: bool,
}

/// A turn machine in `AgentSpeaking` at `now`: a scripted short user turn and the agent's answer,
/// all before `now`.
fn agent_speaking(settings: &TurnSettings, now: Ms) -> anyhow::Result<TurnMachine> {
    let mut tm = TurnMachine::new(settings.clone());
    let start = now.saturating_sub(T0_MS);
    tm.handle(start, Input::Connected);
    tm.handle(start, Input::SpeechStart { at: start });
    tm.handle(start + 300, Input::SpeechEnd { at: start + 300 });
    let mut t = start + 300;
    while tm.state() == State::UserSpeaking && t < now {
        t += 10;
        tm.handle(t, Input::Tick);
    }
    tm.handle(t, Input::AgentStarted);
    tm.handle(t, Input::PlaybackStarted);
    // Past the post-playback mute of any earcon, at the mix's start.
    tm.handle(now, Input::Tick);
    anyhow::ensure!(
        tm.state() == State::AgentSpeaking,
        "turn machine not in AgentSpeaking (turn.end_silence_ms must be under {} ms)",
        T0_MS - 300
    );
    Ok(tm)
}

/// Run one mix of the set in `dir`.
pub fn evaluate(config: &Config, dir: &Path, mix: &Mix) -> anyhow::Result<MixResult> {
    let read = |f: &str| -> anyhow::Result<crate::audio::earcon::Sound> {
        let p: PathBuf = dir.join(f);
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(decode_wav(std::io::Cursor::new(bytes), f)?)
    };
    let far = read(&mix.far)?;
    let mic = read(&mix.mic)?;
    let aec_on = config.aec_active();
    let mut up = Uplink::new(
        &UplinkSettings {
            input: StreamFormat {
                rate_hz: mic.rate_hz,
                channels: 1,
            },
            channel: config.audio.input_channel,
            vad: config.vad.clone(),
            opus: config.opus.clone(),
            preroll_ms: config.turn.preroll_ms,
            max_stream_ms: config.turn.max_utterance_ms + 2_000,
            aec: aec_on.then(|| config.aec.clone()),
        },
        vad::engine(&config.vad),
    )?;
    let mut far_rs = StreamResampler::new(far.rate_hz, 16_000)?;
    let settings = TurnSettings::from_config(&config.turn, up.aec_active(), true);
    let mut tm = agent_speaking(&settings, T0_MS)?;
    let period = Ms::from(config.audio.period_ms);
    // Block b covers [b*rate/100, (b+1)*rate/100): exact for any rate, no drift between the two.
    let bounds = |rate: u32, b: usize| b * rate as usize / 100;
    let blocks = mic.samples.len() * 100 / mic.rate_hz.max(1) as usize;
    let mut far16 = Vec::with_capacity(400);
    let mut events: Vec<(bool, u64)> = Vec::new();
    let mut false_barge_ins = 0;
    let mut latency_ms = None;
    let mut vad_latency_ms = None;
    let mut in_speech = false;
    let mut erle = (0.0f64, 0.0f64);
    for b in 0..blocks {
        let (f0, f1) = (bounds(far.rate_hz, b), bounds(far.rate_hz, b + 1));
        far16.clear();
        if f1 <= far.samples.len() {
            far_rs.process(&far.samples[f0..f1], |o| far16.extend_from_slice(o));
        } else {
            // The far-end file ran out: the speaker went quiet.
            far16.resize(160, 0.0);
        }
        up.render(&far16);
        let before = up.gate_stats();
        up.process(
            &mic.samples[bounds(mic.rate_hz, b)..bounds(mic.rate_hz, b + 1)],
            &mut |e| match e {
                UplinkEvent::SpeechStart { at } => events.push((true, at)),
                UplinkEvent::SpeechEnd { at } => events.push((false, at)),
                _ => {}
            },
        );
        let after = up.gate_stats();
        erle.0 += after.echo_mic_energy - before.echo_mic_energy;
        erle.1 += after.echo_out_energy - before.echo_out_energy;
        let now = T0_MS + (b as u64 + 1) * 10;
        let mut actions = Vec::new();
        for (start, at) in events.drain(..) {
            in_speech = start;
            let at = T0_MS + vad::samples_to_ms(at);
            let input = if start {
                Input::SpeechStart { at }
            } else {
                Input::SpeechEnd { at }
            };
            actions.extend(tm.handle(now, input));
        }
        actions.extend(tm.handle(now, Input::Tick));
        for a in actions {
            let Action::BargeIn { onset, at } = a else {
                continue;
            };
            let onset_ms = onset.saturating_sub(T0_MS);
            let user = mix.onset_ms.filter(|&u| onset_ms + 100 >= u);
            tracing::debug!(mix = %mix.name, onset_ms, decided_ms = at - T0_MS, user = user.is_some(), "barge-in");
            match user {
                Some(u) if latency_ms.is_none() => {
                    latency_ms = Some((at - T0_MS + period).saturating_sub(u));
                    vad_latency_ms = Some((at + period).saturating_sub(onset));
                }
                Some(_) => {}
                None => {
                    false_barge_ins += 1;
                    // The agent goes on speaking in the recording: so does the machine. Speech the
                    // VAD is still in counts again from here (a user starting during it is caught).
                    tm = agent_speaking(&settings, now)?;
                    if in_speech {
                        let _ = tm.handle(now, Input::SpeechStart { at: now });
                    }
                }
            }
        }
        if latency_ms.is_some() {
            break; // playback is flushed: the rest of the recording would not have happened
        }
    }
    let g = up.gate_stats();
    Ok(MixResult {
        name: mix.name.clone(),
        onset_ms: mix.onset_ms,
        false_barge_ins,
        missed: mix.onset_ms.is_some() && latency_ms.is_none(),
        latency_ms,
        vad_latency_ms,
        erle_db: (mix.onset_ms.is_none() && erle.1 > 0.0).then(|| 10.0 * (erle.0 / erle.1).log10()),
        gated_frames: g.gated_frames,
        far_frames: g.far_frames,
        aec: up.aec_active(),
    })
}

/// All mixes of the set in `dir`.
pub fn evaluate_set(config: &Config, dir: &Path) -> anyhow::Result<Vec<MixResult>> {
    load_set(dir)?
        .iter()
        .map(|m| evaluate(config, dir, m))
        .collect()
}
