//! Voice activity detection: a small engine trait (WebRTC's GMM detector by default, or the pure-Rust
//! `earshot` net), start/stop hysteresis, and the pre-roll ring that keeps the audio from just before
//! speech was detected.
//!
//! Context: DSP worker thread (the WebRTC VAD is `!Send`, so engines are built on that thread).
//! Positions are in 16 kHz samples since the stream started; nothing here allocates after `new`.

use std::collections::VecDeque;

use crate::config::{VadConfig, VadEngineKind};

/// Sample rate of everything in this module.
pub const RATE_HZ: u32 = 16_000;

/// A frame classifier. Frames are 16 kHz mono i16 of exactly `frame_samples()` samples.
pub trait VadEngine {
    fn name(&self) -> &'static str;
    fn frame_samples(&self) -> usize;
    fn is_speech(&mut self, frame: &[i16]) -> bool;
    fn reset(&mut self);
}

pub struct WebRtcVad {
    vad: webrtc_vad::Vad,
    mode: u8,
    frame_samples: usize,
}

impl WebRtcVad {
    pub fn new(mode: u8, frame_ms: u32) -> Self {
        let mut v = WebRtcVad {
            vad: webrtc_vad::Vad::new_with_rate(webrtc_vad::SampleRate::Rate16kHz),
            mode,
            frame_samples: (RATE_HZ * frame_ms / 1000) as usize,
        };
        v.reset();
        v
    }
}

fn webrtc_mode(mode: u8) -> webrtc_vad::VadMode {
    match mode {
        0 => webrtc_vad::VadMode::Quality,
        1 => webrtc_vad::VadMode::LowBitrate,
        2 => webrtc_vad::VadMode::Aggressive,
        _ => webrtc_vad::VadMode::VeryAggressive,
    }
}

impl VadEngine for WebRtcVad {
    fn name(&self) -> &'static str {
        "webrtc"
    }
    fn frame_samples(&self) -> usize {
        self.frame_samples
    }
    fn is_speech(&mut self, frame: &[i16]) -> bool {
        // The only error is a wrong frame length, which the caller rules out.
        self.vad.is_voice_segment(frame).unwrap_or(false)
    }
    fn reset(&mut self) {
        self.vad.reset();
        self.vad.set_mode(webrtc_mode(self.mode));
        self.vad.set_sample_rate(webrtc_vad::SampleRate::Rate16kHz);
    }
}

pub struct EarshotVad {
    detector: Box<earshot::Detector>,
    threshold: f32,
}

impl EarshotVad {
    pub fn new(threshold: f32) -> Self {
        EarshotVad {
            detector: earshot::Detector::default_boxed(),
            threshold,
        }
    }
}

impl VadEngine for EarshotVad {
    fn name(&self) -> &'static str {
        "earshot"
    }
    fn frame_samples(&self) -> usize {
        256 // 16 ms, fixed by the model
    }
    fn is_speech(&mut self, frame: &[i16]) -> bool {
        self.detector.predict_i16(frame) >= self.threshold
    }
    fn reset(&mut self) {
        self.detector.reset();
    }
}

/// Build the engine the config asks for.
pub fn engine(cfg: &VadConfig) -> Box<dyn VadEngine> {
    match cfg.engine {
        VadEngineKind::Webrtc => Box::new(WebRtcVad::new(cfg.mode, cfg.frame_ms)),
        VadEngineKind::Earshot => Box::new(EarshotVad::new(cfg.threshold)),
    }
}

/// What the hysteresis reports. Positions are in 16 kHz samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// Speech has lasted `start_ms`; it began at `at`.
    SpeechStart { at: u64 },
    /// Non-speech has lasted `hangover_ms`; speech ended at `at`.
    SpeechEnd { at: u64 },
}

/// Debounces frame decisions: speech must last `start` samples to start and silence `hangover` samples
/// to end; the reported positions are where the speech really started and ended. While the device
/// plays (`set_playing`), speech starts after `barge_in_start` instead: the barge-in gate has already
/// told the user from the echo, and every millisecond here is a millisecond the device talks over
/// the user.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    start: u64,
    barge_in_start: u64,
    playing: bool,
    hangover: u64,
    speaking: bool,
    run_start: Option<u64>,
    last_voiced_end: u64,
}

impl Hysteresis {
    pub fn new(start_ms: u32, hangover_ms: u32) -> Self {
        Hysteresis {
            start: ms_to_samples(start_ms),
            barge_in_start: ms_to_samples(start_ms),
            playing: false,
            hangover: ms_to_samples(hangover_ms),
            speaking: false,
            run_start: None,
            last_voiced_end: 0,
        }
    }

    pub fn is_speaking(&self) -> bool {
        self.speaking
    }

    /// Speech needed to start while the device plays (at most `start_ms`).
    pub fn with_barge_in_start(mut self, ms: u32) -> Self {
        self.barge_in_start = ms_to_samples(ms).min(self.start);
        self
    }

    /// Whether the device is playing now (the far end of the echo canceller is active).
    pub fn set_playing(&mut self, playing: bool) {
        self.playing = playing;
    }

    /// One frame's decision.
    pub fn update(&mut self, frame_start: u64, frame_len: u64, voiced: bool) -> Option<VadEvent> {
        let frame_end = frame_start + frame_len;
        if self.speaking {
            if voiced {
                self.last_voiced_end = frame_end;
            } else if frame_end - self.last_voiced_end >= self.hangover.max(1) {
                self.speaking = false;
                self.run_start = None;
                return Some(VadEvent::SpeechEnd {
                    at: self.last_voiced_end,
                });
            }
            return None;
        }
        if !voiced {
            self.run_start = None;
            return None;
        }
        let start = *self.run_start.get_or_insert(frame_start);
        self.last_voiced_end = frame_end;
        let needed = if self.playing {
            self.barge_in_start
        } else {
            self.start
        };
        if frame_end - start >= needed.max(1) {
            self.speaking = true;
            return Some(VadEvent::SpeechStart { at: start });
        }
        None
    }

    /// End of input: close any open speech at its last voiced sample.
    pub fn finish(&mut self) -> Option<VadEvent> {
        if self.speaking {
            self.speaking = false;
            return Some(VadEvent::SpeechEnd {
                at: self.last_voiced_end,
            });
        }
        None
    }

    pub fn reset(&mut self) {
        self.speaking = false;
        self.run_start = None;
    }
}

pub fn ms_to_samples(ms: u32) -> u64 {
    ms as u64 * RATE_HZ as u64 / 1000
}

pub fn samples_to_ms(samples: u64) -> u64 {
    samples * 1000 / RATE_HZ as u64
}

/// Energy of 10 ms blocks against a tracked noise floor. The VAD engines misjudge steady noise right
/// after they start (WebRTC's noise model starts empty) and hold speech for a few frames after it ends
/// (their internal hangover); an energy gate fixes the first and locates the true edges for the second.
struct EnergyTrack {
    /// dBFS of the last blocks, oldest first, with the position of the newest block's end.
    db: VecDeque<f32>,
    /// Block being filled.
    acc: f64,
    fill: usize,
    /// End position (samples) of the newest complete block.
    end: u64,
}

/// Energy block: 10 ms.
const BLOCK: usize = 160;
/// Noise floor = minimum block energy over this many blocks (1 s): speech has gaps, noise does not.
const FLOOR_BLOCKS: usize = 100;
/// History kept for edge refinement (3 s).
const HISTORY_BLOCKS: usize = 300;
/// Furthest an onset is moved back before the first voiced frame (150 ms).
const BACK_BLOCKS: usize = 15;
/// A block is loud when it is this far above the floor.
pub const GATE_DB: f32 = 9.0;
const SILENT_DB: f32 = -100.0;

impl EnergyTrack {
    fn new() -> Self {
        EnergyTrack {
            db: VecDeque::with_capacity(HISTORY_BLOCKS),
            acc: 0.0,
            fill: 0,
            end: 0,
        }
    }

    fn push(&mut self, samples: &[i16]) {
        for &s in samples {
            self.acc += (s as f64) * (s as f64);
            self.fill += 1;
            if self.fill == BLOCK {
                let mean = self.acc / BLOCK as f64 / (32768.0 * 32768.0);
                let db = if mean > 0.0 {
                    (10.0 * mean.log10()).max(SILENT_DB as f64) as f32
                } else {
                    SILENT_DB
                };
                if self.db.len() == HISTORY_BLOCKS {
                    self.db.pop_front();
                }
                self.db.push_back(db);
                self.end += BLOCK as u64;
                self.acc = 0.0;
                self.fill = 0;
            }
        }
    }

    fn floor(&self) -> f32 {
        self.db
            .iter()
            .rev()
            .take(FLOOR_BLOCKS)
            .fold(f32::INFINITY, |m, x| m.min(*x))
    }

    /// Energy of the block starting at `pos` (a multiple of BLOCK), if still in the history.
    fn at(&self, pos: u64) -> Option<f32> {
        let start = self.end.checked_sub((self.db.len() * BLOCK) as u64)?;
        if pos < start || pos >= self.end {
            return None;
        }
        self.db
            .get(((pos - start) / BLOCK as u64) as usize)
            .copied()
    }

    fn loud(&self, pos: u64, floor: f32) -> bool {
        self.at(pos).is_some_and(|e| e > floor + GATE_DB)
    }

    /// Any loud block overlapping [from, to)?
    fn any_loud(&self, from: u64, to: u64) -> bool {
        let floor = self.floor();
        let mut b = from / BLOCK as u64 * BLOCK as u64;
        while b < to {
            if self.loud(b, floor) {
                return true;
            }
            b += BLOCK as u64;
        }
        false
    }

    /// Where the speech that the engine first voiced at `from` really began: back over the contiguous
    /// loud blocks before it (unvoiced onsets such as "s" or "t", at most `BACK_BLOCKS`), or forward
    /// to the first loud block of the frame [from, to). `from` itself if none is loud.
    fn onset(&self, from: u64, to: u64) -> u64 {
        let floor = self.floor();
        let blk = BLOCK as u64;
        let first = from / blk * blk;
        if self.loud(first, floor) {
            // Walk back over loud blocks, bridging single quiet blocks (stop closures).
            let mut b = first;
            let mut steps = 0;
            while steps < BACK_BLOCKS && b >= blk {
                if self.loud(b - blk, floor) {
                    b -= blk;
                    steps += 1;
                } else if b >= 2 * blk && steps + 1 < BACK_BLOCKS && self.loud(b - 2 * blk, floor) {
                    b -= 2 * blk;
                    steps += 2;
                } else {
                    break;
                }
            }
            return b;
        }
        let mut b = first + blk;
        while b < to {
            if self.loud(b, floor) {
                return b;
            }
            b += blk;
        }
        from
    }

    /// End of the last loud block in (from, to], or `to`.
    fn last_loud_end(&self, from: u64, to: u64) -> u64 {
        let floor = self.floor();
        let mut b = to / BLOCK as u64 * BLOCK as u64;
        while b >= from + BLOCK as u64 {
            b -= BLOCK as u64;
            if self.loud(b, floor) {
                return (b + BLOCK as u64).min(to);
            }
        }
        to
    }
}

/// Engine + framing + energy gate + hysteresis over a 16 kHz i16 stream.
pub struct VadStage {
    engine: Box<dyn VadEngine>,
    frame: Vec<i16>,
    fill: usize,
    pos: u64,
    hysteresis: Hysteresis,
    energy: EnergyTrack,
    speech_from: u64,
    /// Samples of the frame being filled that the barge-in gate let through (see `set_gate`).
    gate_passed: usize,
    /// Whether the samples being pushed passed the gate.
    gate_open: bool,
}

impl VadStage {
    pub fn new(engine: Box<dyn VadEngine>, start_ms: u32, hangover_ms: u32) -> Self {
        let n = engine.frame_samples();
        VadStage {
            engine,
            frame: vec![0; n],
            fill: 0,
            pos: 0,
            hysteresis: Hysteresis::new(start_ms, hangover_ms),
            energy: EnergyTrack::new(),
            speech_from: 0,
            gate_passed: 0,
            gate_open: true,
        }
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn is_speaking(&self) -> bool {
        self.hysteresis.is_speaking()
    }

    /// See [`Hysteresis::with_barge_in_start`].
    pub fn with_barge_in_start(mut self, ms: u32) -> Self {
        self.hysteresis = self.hysteresis.with_barge_in_start(ms);
        self
    }

    /// See [`Hysteresis::set_playing`].
    pub fn set_playing(&mut self, playing: bool) {
        self.hysteresis.set_playing(playing);
    }

    /// Whether the barge-in gate let the samples pushed next through (silence where it did not).
    /// While the device plays, a frame only counts towards a speech start if the gate let at least
    /// two thirds of its samples through (with 30 ms webrtc frames: two of its three 10 ms frames;
    /// with 20 ms or earshot's 16 ms frames, all of them): with the short barge-in debounce one
    /// frame starts speech, and a single 10 ms slip of the echo (the first frame after a delay
    /// jump) must not.
    pub fn set_gate(&mut self, open: bool) {
        self.gate_open = open;
    }

    /// Classify `samples`; `emit` gets each start/end as it is decided. Edges are placed on 10 ms
    /// energy blocks: the start on the first loud block of the first voiced frame, the end after the
    /// last loud block of the speech (before the engine's own hangover).
    pub fn push(&mut self, mut samples: &[i16], mut emit: impl FnMut(VadEvent)) {
        let n = self.frame.len();
        while !samples.is_empty() {
            let take = (n - self.fill).min(samples.len());
            self.frame[self.fill..self.fill + take].copy_from_slice(&samples[..take]);
            self.energy.push(&samples[..take]);
            if self.gate_open {
                self.gate_passed += take;
            }
            self.fill += take;
            samples = &samples[take..];
            if self.fill == n {
                let start = self.pos;
                let end = start + n as u64;
                // Only for a start: once speech runs, its end is the hangover's business.
                let gated_out = self.hysteresis.playing
                    && !self.hysteresis.is_speaking()
                    && self.gate_passed * 3 < n * 2;
                self.gate_passed = 0;
                let voiced = !gated_out
                    && self.engine.is_speech(&self.frame)
                    && self.energy.any_loud(start, end.min(self.energy.end));
                match self.hysteresis.update(start, n as u64, voiced) {
                    Some(VadEvent::SpeechStart { at }) => {
                        let at = self.energy.onset(at, end);
                        self.speech_from = at;
                        emit(VadEvent::SpeechStart { at });
                    }
                    Some(VadEvent::SpeechEnd { at }) => {
                        emit(VadEvent::SpeechEnd {
                            at: self.energy.last_loud_end(self.speech_from, at),
                        });
                    }
                    None => {}
                }
                self.pos = end;
                self.fill = 0;
            }
        }
    }

    /// End of input.
    pub fn finish(&mut self) -> Option<VadEvent> {
        match self.hysteresis.finish() {
            Some(VadEvent::SpeechEnd { at }) => Some(VadEvent::SpeechEnd {
                at: self.energy.last_loud_end(self.speech_from, at),
            }),
            other => other,
        }
    }
}

/// The last `capacity` samples, for the pre-roll. Never grows after `new`.
pub struct PcmRing {
    buf: VecDeque<i16>,
    capacity: usize,
}

impl PcmRing {
    pub fn new(capacity: usize) -> Self {
        PcmRing {
            buf: VecDeque::with_capacity(capacity.max(1)),
            capacity,
        }
    }

    pub fn push(&mut self, samples: &[i16]) {
        if self.capacity == 0 {
            return;
        }
        let samples = &samples[samples.len().saturating_sub(self.capacity)..];
        let excess = (self.buf.len() + samples.len()).saturating_sub(self.capacity);
        self.buf.drain(..excess);
        self.buf.extend(samples.iter().copied());
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The last `n` samples (or all of them), oldest first, as two slices.
    pub fn tail(&self, n: usize) -> (&[i16], &[i16]) {
        let skip = self.buf.len().saturating_sub(n);
        let (a, b) = self.buf.as_slices();
        if skip >= a.len() {
            (&b[skip - a.len()..], &[])
        } else {
            (&a[skip..], b)
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_needs_start_and_hangover() {
        let mut h = Hysteresis::new(60, 150); // 960 and 2400 samples
        let f = 480u64; // 30 ms
        assert_eq!(h.update(0, f, true), None);
        assert_eq!(h.update(f, f, false), None); // a 30 ms blip is not speech
        assert_eq!(h.update(2 * f, f, true), None);
        assert_eq!(
            h.update(3 * f, f, true),
            Some(VadEvent::SpeechStart { at: 2 * f })
        );
        assert_eq!(h.update(4 * f, f, true), None);
        // 120 ms of silence is shorter than the hangover: still speaking.
        for i in 5..9 {
            assert_eq!(h.update(i * f, f, false), None);
        }
        assert_eq!(h.update(9 * f, f, true), None);
        for i in 10..14 {
            assert_eq!(h.update(i * f, f, false), None);
        }
        assert_eq!(
            h.update(14 * f, f, false),
            Some(VadEvent::SpeechEnd { at: 10 * f })
        );
        assert!(!h.is_speaking());
    }

    #[test]
    fn while_playing_speech_starts_after_the_barge_in_debounce() {
        let f = 480u64; // 30 ms
        let mut h = Hysteresis::new(60, 150).with_barge_in_start(30);
        h.set_playing(true);
        assert_eq!(h.update(0, f, false), None);
        assert_eq!(h.update(f, f, true), Some(VadEvent::SpeechStart { at: f }));
        // Not playing: the full start debounce again.
        let mut h = Hysteresis::new(60, 150).with_barge_in_start(30);
        assert_eq!(h.update(0, f, true), None);
        assert_eq!(h.update(f, f, true), Some(VadEvent::SpeechStart { at: 0 }));
        // It never exceeds start_ms.
        let mut h = Hysteresis::new(30, 150).with_barge_in_start(500);
        h.set_playing(true);
        assert_eq!(h.update(0, f, true), Some(VadEvent::SpeechStart { at: 0 }));
    }

    /// Speech-like test frames for the VAD stage: a loud 200 Hz tone.
    fn tone(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| {
                ((i as f32 * 2.0 * std::f32::consts::PI * 200.0 / 16_000.0).sin() * 8000.0) as i16
            })
            .collect()
    }

    #[test]
    fn while_playing_a_frame_the_gate_mostly_held_back_is_not_speech() {
        struct Always;
        impl VadEngine for Always {
            fn name(&self) -> &'static str {
                "always"
            }
            fn frame_samples(&self) -> usize {
                480
            }
            fn is_speech(&mut self, _: &[i16]) -> bool {
                true
            }
            fn reset(&mut self) {}
        }
        let run = |passed: [bool; 3]| {
            let mut v = VadStage::new(Box::new(Always), 60, 150).with_barge_in_start(30);
            v.set_playing(true);
            let mut started = false;
            let t = tone(160);
            // Quiet first (the energy gate's noise floor), then one 30 ms frame, on the VAD's grid.
            v.set_gate(true);
            for _ in 0..48 {
                v.push(&[0; 160], |_| {});
            }
            for p in passed {
                v.set_gate(p);
                let frame: &[i16] = if p { &t } else { &[0; 160] };
                v.push(frame, |e| {
                    started |= matches!(e, VadEvent::SpeechStart { .. })
                });
            }
            started
        };
        assert!(run([true, true, true]));
        assert!(run([false, true, true]));
        // One 10 ms slip of the echo through the gate: not a barge-in.
        assert!(!run([false, true, false]));
    }

    #[test]
    fn finish_closes_open_speech() {
        let mut h = Hysteresis::new(30, 150);
        h.update(0, 480, true);
        assert_eq!(h.finish(), Some(VadEvent::SpeechEnd { at: 480 }));
        assert_eq!(h.finish(), None);
    }

    #[test]
    fn pcm_ring_keeps_the_tail() {
        let mut r = PcmRing::new(5);
        r.push(&[1, 2, 3]);
        r.push(&[4, 5, 6, 7]);
        let (a, b) = r.tail(10);
        assert_eq!([a, b].concat(), vec![3, 4, 5, 6, 7]);
        let (a, b) = r.tail(2);
        assert_eq!([a, b].concat(), vec![6, 7]);
        r.push(&[8, 9, 10, 11, 12, 13]);
        let (a, b) = r.tail(5);
        assert_eq!([a, b].concat(), vec![9, 10, 11, 12, 13]);
    }

    #[test]
    fn engines_reject_silence() {
        for mut e in [
            Box::new(WebRtcVad::new(3, 30)) as Box<dyn VadEngine>,
            Box::new(EarshotVad::new(0.5)),
        ] {
            let frame = vec![0i16; e.frame_samples()];
            for _ in 0..20 {
                assert!(!e.is_speech(&frame), "{}", e.name());
            }
        }
    }
}
