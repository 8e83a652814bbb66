//! The uplink pipeline: device input (any rate, any channel count, f32 interleaved) -> mono -> 16 kHz
//! -> VAD with hysteresis -> pre-roll -> Opus frames. The worker and the benchmarks run this same code.
//!
//! Streaming: Opus frames are produced from the moment speech starts (pre-roll included) until the
//! turn machine says the turn is over (`stop_stream`), so pauses inside a turn reach the agent too. A
//! stream that is never stopped ends by itself after `max_stream_ms`.
//!
//! Echo cancellation (feature `aec`, `aec.enabled`): the far end (what the speaker played, 16 kHz) comes
//! in through `render`; each 10 ms of mic audio is cancelled before the pre-roll, the VAD and the
//! encoder. The barge-in gate then decides what the VAD may hear: while the device's voice plays, a
//! frame whose echo-cancelled energy is not `aec.gate_margin_db` above the echo expected from the far
//! end reaches the VAD as silence (the encoder still gets the real audio).
//!
//! Context: DSP worker thread. All buffers are sized in `new`; `process` does not allocate.

use crate::audio::StreamFormat;
use crate::config::{AecConfig, ChannelSelect, OpusConfig, VadConfig};

use super::codec::{MAX_PACKET_BYTES, OpusEncoder, UPLINK_RATE_HZ};
use super::resample::StreamResampler;
use super::vad::{PcmRing, VadEngine, VadEvent, VadStage, ms_to_samples};
use super::{DspError, downmix, to_i16};

/// Largest input block `process` accepts in one call, in frames; larger blocks are split.
const MAX_BLOCK_FRAMES: usize = 4096;
/// Below this (-65 dBFS) a cancelled frame is never speech over the far end.
#[cfg(feature = "aec")]
const NEAR_FLOOR: f32 = 3e-7;
/// The residual echo (after cancellation, against the far end) assumed before any is measured: 0 dB,
/// the pessimistic guess, so the first words of the device's voice cannot pass for the user.
#[cfg(feature = "aec")]
const INITIAL_ECHO_GAIN_DB: f32 = 0.0;
/// The echo path's loss assumed before any is measured: the echo as loud as what played.
#[cfg(feature = "aec")]
const INITIAL_MIC_ECHO_DB: f32 = 0.0;
/// How much louder than its usual echo the mic must be for near-end speech (power ratio, 1 dB).
#[cfg(feature = "aec")]
const MIC_MARGIN: f32 = 1.0;
/// Far-end frames before the ERLE figure starts counting (the canceller converges meanwhile).
#[cfg(feature = "aec")]
const CONVERGED_FRAMES: u64 = 100;
#[cfg(feature = "aec")]
const MIN_ECHO_GAIN_DB: f32 = -60.0;
/// How much louder than its usual echo the mic must be to be near-end sound whatever the canceller
/// says (power ratio, 20 dB).
#[cfg(feature = "aec")]
const NEAR_CERTAIN: f32 = 100.0;
/// How fast a band's noise floor may rise per 10 ms frame (power ratio, 0.05 dB: 5 dB a second).
#[cfg(feature = "aec")]
const BAND_FLOOR_RISE: f32 = 1.011_579;
/// The canceller's linear output this coherent with the far end (`EchoCanceller::coherence`) is
/// the device's own voice, whatever its level: the echo let through after a delay jump keeps 0.7 and
/// more; the user's voice over the echo 0.2-0.5 on the evaluation sets (short evidence, just after an
/// onset, correlates by chance at some of the 600 delays and signs looked at).
#[cfg(feature = "aec")]
const ECHO_COHERENT: f32 = 0.6;
/// What the barge-in gate makes of one frame.
#[cfg(feature = "aec")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// The cancelled frame goes to the VAD.
    Pass,
    /// Near-end by the canceller's linear filter output (before its suppressor, which takes the
    /// user's unvoiced sounds for echo during double talk): that output goes to the VAD.
    PassLinear,
    /// Near-end for certain, but the canceller suppressed it: the raw frame goes on instead.
    PassRaw,
    /// Taken for echo: the VAD hears silence.
    Block,
}
/// Lowest the mic's usual echo goes on frames of digital silence alone (dB against the far end).
#[cfg(feature = "aec")]
const SILENT_MIC_ECHO_FLOOR_DB: f32 = -30.0;
/// The level (mean power, -100 dBFS) a frame of digital zeros is taken to have.
#[cfg(feature = "aec")]
const SILENT_FRAME: f32 = 1e-10;

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkSettings {
    pub input: StreamFormat,
    pub channel: ChannelSelect,
    pub vad: VadConfig,
    pub opus: OpusConfig,
    pub preroll_ms: u32,
    /// Safety cap on one stream when nobody calls `stop_stream`.
    pub max_stream_ms: u32,
    /// Echo cancellation and the barge-in gate; `None`: off (or built without the `aec` feature).
    pub aec: Option<AecConfig>,
}

/// What the uplink produces. Positions are in 16 kHz samples since the stream started.
#[derive(Debug, PartialEq)]
pub enum UplinkEvent<'a> {
    SpeechStart {
        at: u64,
    },
    SpeechEnd {
        at: u64,
    },
    /// One Opus frame of the current stream. `at` is where its audio starts.
    Frame {
        seq: u64,
        at: u64,
        samples: usize,
        packet: &'a [u8],
        /// Encoded as its last sample arrived (false for pre-roll frames sent in a burst).
        live: bool,
    },
    /// The stream ended by itself (`max_stream_ms`).
    StreamCapped {
        at: u64,
    },
}

/// What the barge-in gate did so far (for logs, the bench and the demo).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GateStats {
    /// 10 ms frames processed while the far end was playing.
    pub far_frames: u64,
    /// Of those, frames the gate kept from the VAD as echo.
    pub gated_frames: u64,
    /// Mic and echo-cancelled energy summed over the frames the gate took for echo, after the first
    /// second of the far end (for ERLE after convergence).
    pub echo_mic_energy: f64,
    pub echo_out_energy: f64,
}

impl GateStats {
    /// Echo return loss enhancement over the frames counted, dB (mic energy / cancelled energy).
    pub fn erle_db(&self) -> Option<f64> {
        (self.echo_out_energy > 0.0 && self.echo_mic_energy > 0.0)
            .then(|| 10.0 * (self.echo_mic_energy / self.echo_out_energy).log10())
    }
}

pub struct Uplink {
    channels: usize,
    select: ChannelSelect,
    mono: Vec<f32>,
    resampler: StreamResampler,
    pcm: Vec<i16>,
    vad: VadStage,
    preroll: PcmRing,
    preroll_samples: u64,
    encoder: OpusEncoder,
    frame: Vec<i16>,
    frame_fill: usize,
    packet: Vec<u8>,
    streaming: bool,
    stream_started: u64,
    max_stream: u64,
    /// 16 kHz samples processed so far.
    pos: u64,
    seq: u64,
    encode_errors: u64,
    /// 10 ms of 16 kHz audio being gathered for the canceller and the VAD.
    stage: [i16; 160],
    stage_fill: usize,
    /// What the VAD hears of the staged frame (silence where the gate says echo).
    vad_frame: [i16; 160],
    #[cfg(feature = "aec")]
    aec: Option<super::aec::EchoCanceller>,
    /// Gate margin as a power ratio.
    #[cfg(feature = "aec")]
    gate_margin: f32,
    /// Cancelled energy / far-end energy while only the far end played, dB: the residual echo's
    /// level relative to what played, tracked.
    #[cfg(feature = "aec")]
    echo_gain_db: f32,
    /// The same in each of the gate's bands (linear output against the far end, both filtered).
    #[cfg(feature = "aec")]
    band_gain_db: [f32; super::aec::BANDS],
    /// The linear output's noise floor in each band: follows it down at once, up 5 dB a second.
    #[cfg(feature = "aec")]
    band_floor: [f32; super::aec::BANDS],
    /// Mic energy / far-end energy on echo-only frames, dB (the echo path's loss), tracked.
    #[cfg(feature = "aec")]
    mic_echo_db: f32,
    /// The gate's last decision (for logging its changes).
    #[cfg(feature = "aec")]
    gate_open: bool,
    gate: GateStats,
}

impl Uplink {
    pub fn new(s: &UplinkSettings, engine: Box<dyn VadEngine>) -> Result<Self, DspError> {
        if s.input.channels == 0 || s.input.rate_hz == 0 {
            return Err(DspError::Format(format!(
                "unusable input format {}",
                s.input
            )));
        }
        let resampler = StreamResampler::new(s.input.rate_hz, UPLINK_RATE_HZ)?;
        let encoder = OpusEncoder::new(&s.opus)?;
        let preroll_samples = ms_to_samples(s.preroll_ms);
        let vad_frame = engine.frame_samples() as u64;
        // Speech is reported start_ms (+ one VAD frame) after it began: keep that much on top.
        let ring = preroll_samples + ms_to_samples(s.vad.start_ms) + 2 * vad_frame + 2 * 1600;
        let frame_samples = encoder.frame_samples();
        // The resampler emits at most one chunk's output per chunk's input; size for the worst case.
        let max_out = MAX_BLOCK_FRAMES * UPLINK_RATE_HZ as usize / s.input.rate_hz as usize + 4096;
        Ok(Uplink {
            channels: s.input.channels as usize,
            select: s.channel,
            mono: vec![0.0; MAX_BLOCK_FRAMES],
            resampler,
            pcm: vec![0; max_out],
            vad: VadStage::new(engine, s.vad.start_ms, s.vad.hangover_ms)
                .with_barge_in_start(s.vad.barge_in_start_ms),
            preroll: PcmRing::new(ring as usize),
            preroll_samples,
            encoder,
            frame: vec![0; frame_samples],
            frame_fill: 0,
            packet: vec![0; MAX_PACKET_BYTES],
            streaming: false,
            stream_started: 0,
            max_stream: ms_to_samples(s.max_stream_ms),
            pos: 0,
            seq: 0,
            encode_errors: 0,
            stage: [0; 160],
            stage_fill: 0,
            vad_frame: [0; 160],
            #[cfg(feature = "aec")]
            aec: s.aec.as_ref().map(super::aec::EchoCanceller::new),
            #[cfg(feature = "aec")]
            gate_margin: s
                .aec
                .as_ref()
                .map_or(1.0, |a| 10f32.powf(a.gate_margin_db / 10.0)),
            #[cfg(feature = "aec")]
            echo_gain_db: INITIAL_ECHO_GAIN_DB,
            #[cfg(feature = "aec")]
            band_gain_db: [INITIAL_ECHO_GAIN_DB; super::aec::BANDS],
            #[cfg(feature = "aec")]
            band_floor: [1.0; super::aec::BANDS],
            #[cfg(feature = "aec")]
            gate_open: true,
            #[cfg(feature = "aec")]
            mic_echo_db: INITIAL_MIC_ECHO_DB,
            gate: GateStats::default(),
        })
    }

    /// Whether echo cancellation runs in this pipeline.
    pub fn aec_active(&self) -> bool {
        #[cfg(feature = "aec")]
        {
            self.aec.is_some()
        }
        #[cfg(not(feature = "aec"))]
        {
            false
        }
    }

    /// Far-end samples at 16 kHz (what the speaker played), in playing order. Call before the mic
    /// audio of the same period.
    pub fn render(&mut self, far: &[f32]) {
        #[cfg(feature = "aec")]
        if let Some(aec) = &mut self.aec {
            aec.render(far);
        }
        #[cfg(not(feature = "aec"))]
        let _ = far;
    }

    /// The canceller's own figures, when it runs.
    #[cfg(feature = "aec")]
    pub fn aec_stats(&self) -> Option<super::aec::AecStats> {
        self.aec.as_ref().map(|a| a.stats())
    }

    pub fn gate_stats(&self) -> GateStats {
        self.gate
    }

    /// 16 kHz samples processed so far (the audio clock of the service).
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    pub fn vad_name(&self) -> &'static str {
        self.vad.engine_name()
    }

    pub fn encode_errors(&self) -> u64 {
        self.encode_errors
    }

    /// The turn is over: stop producing frames until speech starts again.
    pub fn stop_stream(&mut self) {
        self.streaming = false;
        self.frame_fill = 0;
        self.encoder.reset();
    }

    /// Process one block of interleaved device input.
    pub fn process(&mut self, input: &[f32], emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        let block = MAX_BLOCK_FRAMES * self.channels;
        for chunk in input.chunks(block) {
            let frames = downmix(chunk, self.channels, self.select, &mut self.mono);
            // Split borrows: the resampler's callback works on the rest of the pipeline.
            let Uplink {
                resampler,
                mono,
                pcm,
                ..
            } = self;
            let mut n = 0;
            resampler.process(&mono[..frames], |out| {
                for (d, s) in pcm[n..n + out.len()].iter_mut().zip(out) {
                    *d = to_i16(*s);
                }
                n += out.len();
            });
            self.process_pcm(n, emit);
        }
    }

    /// End of input: close open speech (the stream stays open until `stop_stream`).
    pub fn finish(&mut self, emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        if let Some(VadEvent::SpeechEnd { at }) = self.vad.finish() {
            emit(UplinkEvent::SpeechEnd { at });
        }
    }

    /// Gather `self.pcm[..n]` (16 kHz) into 10 ms frames for [`Uplink::process_frame`].
    fn process_pcm(&mut self, n: usize, emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        let mut off = 0;
        while off < n {
            let take = (160 - self.stage_fill).min(n - off);
            self.stage[self.stage_fill..self.stage_fill + take]
                .copy_from_slice(&self.pcm[off..off + take]);
            self.stage_fill += take;
            off += take;
            if self.stage_fill == 160 {
                self.stage_fill = 0;
                self.process_frame(emit);
            }
        }
    }

    /// Cancel the echo in the staged frame, gate it, then run the pre-roll, VAD and encoder over it.
    fn process_frame(&mut self, emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        self.vad_frame = self.stage;
        #[cfg(feature = "aec")]
        if let Some(aec) = &mut self.aec {
            let raw = self.stage;
            let levels = aec.capture(&mut self.stage);
            self.vad_frame = self.stage;
            // While the device plays, the gate decides what is the user: the VAD's shorter
            // barge-in debounce applies (`vad.barge_in_start_ms`).
            self.vad.set_playing(levels.far >= super::aec::FAR_ACTIVE);
            let gate = self.gate(levels);
            self.vad.set_gate(gate != Gate::Block);
            match gate {
                Gate::Pass => {}
                Gate::PassLinear => {
                    if let Some(aec) = &self.aec {
                        self.vad_frame = *aec.linear_frame();
                    }
                }
                Gate::PassRaw => {
                    self.stage = raw;
                    self.vad_frame = raw;
                }
                Gate::Block => self.vad_frame = [0; 160],
            }
        }
        // The staged (cancelled) frame is the pipeline's input from here on. Not written back into
        // `pcm`: `process_pcm` is still reading the rest of its input from there.
        {
            let len = 160usize;
            let start = self.pos;
            let end = start + len as u64;
            if self.streaming {
                self.encode_stage(start, emit);
            }
            self.preroll.push(&self.stage);
            let mut started = None;
            let mut ended = None;
            self.vad.push(&self.vad_frame, |e| match e {
                VadEvent::SpeechStart { at } => started = Some(at),
                VadEvent::SpeechEnd { at } => ended = Some(at),
            });
            self.pos = end;
            if let Some(at) = ended {
                emit(UplinkEvent::SpeechEnd { at });
            }
            if let Some(at) = started {
                emit(UplinkEvent::SpeechStart { at });
                if !self.streaming {
                    self.begin_stream(at, end, emit);
                }
            }
            if self.streaming && end - self.stream_started >= self.max_stream.max(1) {
                self.stop_stream();
                emit(UplinkEvent::StreamCapped { at: end });
            }
        }
    }

    /// The barge-in gate for one frame: may the VAD hear it?
    #[cfg(feature = "aec")]
    fn gate(&mut self, l: super::aec::FrameLevels) -> Gate {
        if l.far < super::aec::FAR_ACTIVE {
            return Gate::Pass; // nothing is playing: no echo to tell apart
        }
        self.gate.far_frames += 1;
        // The echo to expect: the loudest recent far end through the echo path, after cancellation.
        let expected = l.far * 10f32.powf(self.echo_gain_db / 10.0);
        // And the mic itself must be louder than the echo it usually gets from that far end: when the
        // canceller slips (a delay jump, a tone), its residual grows but the mic does not, while the
        // user's voice adds to the mic.
        let mic_echo = l.far * 10f32.powf(self.mic_echo_db / 10.0);
        let mic_above_echo = l.mic > mic_echo * MIC_MARGIN;
        let cancelled_passes =
            l.out > expected * self.gate_margin && l.out > NEAR_FLOOR && mic_above_echo;
        // AEC3's linear filter output keeps what its suppressor removes of the user during double
        // talk (an "s" under the device's vowels). Above 4 kHz (see `aec::BANDS`) a voice's
        // fricatives and bursts are strong, the echo of a voice weak: the band's linear output
        // against the residual learnt in it (so a speaker that does play it raises the bar) and its
        // noise floor. Not broadband: the linear residual swings too much with the far end (false
        // barge-ins on a full-band echo, the evaluation set's make.sh with `lowpass 7600`).
        let mut expected_band = [0.0; super::aec::BANDS];
        let mut band_passes = false;
        for (b, expected) in expected_band.iter_mut().enumerate() {
            let x = l.linear_bands[b];
            let floor = &mut self.band_floor[b];
            // Never down to 0: a frame of zeros (a muted mic) would pin it there.
            *floor = if x < *floor {
                x.max(SILENT_FRAME)
            } else {
                *floor * BAND_FLOOR_RISE
            };
            *expected = (l.far_bands[b] * 10f32.powf(self.band_gain_db[b] / 10.0)).max(*floor);
            band_passes |= x > *expected * self.gate_margin && x > NEAR_FLOOR;
        }
        // And never when the canceller slips (a delay jump, a filter reset: the linear output grows
        // past the mic itself while the mic stays at its usual echo; seen in `hearken demo`).
        let linear = !cancelled_passes && band_passes && mic_above_echo && l.linear < l.mic;
        // The mic far louder than any echo it has had: near-end sound for certain, whatever the
        // canceller made of it. AEC3 that has never seen an echo (no echo path: headphones, a
        // speaker far away) suppresses the near end too; the raw frame is then the one to keep.
        let raw =
            !cancelled_passes && !linear && l.mic > mic_echo * NEAR_CERTAIN && l.mic > NEAR_FLOOR;
        // And never when what the filter left still sounds like the far end: the echo path has
        // changed (a delay jump after a clock slip), AEC3's filter no longer matches and lets the
        // echo through at full level, which every level test above takes for the user.
        // Computed only for a frame that would pass (most of the device's voice is blocked above).
        let coherence = match &mut self.aec {
            Some(aec) if cancelled_passes || linear || raw => aec.coherence(),
            _ => 0.0,
        };
        let echo_left = coherence >= ECHO_COHERENT;
        let (cancelled_passes, linear, raw) = if echo_left {
            (false, false, false)
        } else {
            (cancelled_passes, linear, raw)
        };
        let passes = cancelled_passes || linear || raw;
        tracing::trace!(
            at_ms = self.pos / 16,
            mic_db = super::aec::db(l.mic),
            mic_echo_db = super::aec::db(mic_echo),
            out_db = super::aec::db(l.out),
            expected_echo_db = super::aec::db(expected),
            linear_db = super::aec::db(l.linear),
            high_db = super::aec::db(l.linear_bands[0]),
            expected_high_db = super::aec::db(expected_band[0]),
            far_db = super::aec::db(l.far),
            coherence,
            passes,
            "gate frame"
        );
        if passes != self.gate_open {
            // Every opening and closing, with its evidence: what a barge-in decision rests on.
            self.gate_open = passes;
            tracing::debug!(
                open = passes,
                raw,
                linear,
                echo_left,
                coherence,
                out_db = super::aec::db(l.out),
                expected_echo_db = super::aec::db(expected),
                high_db = super::aec::db(l.linear_bands[0]),
                expected_high_db = super::aec::db(expected_band[0]),
                mic_echo_db = super::aec::db(mic_echo),
                margin_db = super::aec::db(self.gate_margin),
                mic_db = super::aec::db(l.mic),
                far_db = super::aec::db(l.far),
                at_ms = self.pos / 16,
                "barge-in gate"
            );
        }
        if !passes {
            self.gate.gated_frames += 1;
            // ERLE over what the gate took for echo, once the canceller has had a second to converge.
            if self.gate.far_frames > CONVERGED_FRAMES {
                self.gate.echo_mic_energy += f64::from(l.mic);
                self.gate.echo_out_energy += f64::from(l.out);
            }
            // Learn the residual echo level from frames that look like echo only: an 80th
            // percentile of out/far in dB (up 1.2 dB, down 0.3 dB a frame), so a loud moment of the
            // echo raises it quickly and the user's own (passing) frames never do.
            // A frame of digital silence (a muted mic, a file's gap) is the strongest evidence of no
            // echo: it counts as an echo at the floor, so the estimates still come down.
            if l.far > 0.0 {
                let g_db = super::aec::db(l.out.max(SILENT_FRAME) / l.far);
                self.echo_gain_db += if g_db > self.echo_gain_db { 1.2 } else { -0.3 };
                self.echo_gain_db = self.echo_gain_db.clamp(MIN_ECHO_GAIN_DB, 10.0);
                let bands = l.linear_bands.iter().zip(l.far_bands.iter());
                for (gain, (&x, &far)) in self.band_gain_db.iter_mut().zip(bands) {
                    if far > 0.0 {
                        let g_db = super::aec::db(x.max(SILENT_FRAME) / far);
                        *gain += if g_db > *gain { 1.2 } else { -0.3 };
                        *gain = gain.clamp(MIN_ECHO_GAIN_DB, 10.0);
                    }
                }
            }
            if l.far > 0.0 {
                let g_db = super::aec::db(l.mic.max(SILENT_FRAME) / l.far);
                if g_db > self.mic_echo_db {
                    self.mic_echo_db += 0.4;
                } else if l.mic > SILENT_FRAME || self.mic_echo_db > SILENT_MIC_ECHO_FLOOR_DB {
                    // Silence alone takes the estimate no lower than the floor: a mic that was
                    // muted for a while must not make real echo afterwards pass for the user.
                    self.mic_echo_db -= 0.1;
                }
                self.mic_echo_db = self.mic_echo_db.clamp(MIN_ECHO_GAIN_DB, 20.0);
            }
        }
        match (cancelled_passes, linear, raw) {
            (true, _, _) => Gate::Pass,
            (_, true, _) => Gate::PassLinear,
            (_, _, true) => Gate::PassRaw,
            _ => Gate::Block,
        }
    }

    /// Start a stream at `at - preroll`, feeding the encoder from the pre-roll ring up to `now`.
    fn begin_stream(&mut self, at: u64, now: u64, emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        let from = at.saturating_sub(self.preroll_samples);
        let want = (now - from) as usize;
        self.streaming = true;
        self.frame_fill = 0;
        self.encoder.reset();
        let (a, b) = self.preroll.tail(want);
        let got = (a.len() + b.len()) as u64;
        self.stream_started = now - got;
        let mut at = self.stream_started;
        // The ring is not borrowed by the encoder: copy through the frame buffer piecewise.
        let (a_len, b_len) = (a.len(), b.len());
        for (part, len) in [(0usize, a_len), (1, b_len)] {
            let mut done = 0;
            while done < len {
                let (a, b) = self.preroll.tail(want);
                let src = if part == 0 { a } else { b };
                let take = (self.frame.len() - self.frame_fill).min(len - done);
                self.frame[self.frame_fill..self.frame_fill + take]
                    .copy_from_slice(&src[done..done + take]);
                self.frame_fill += take;
                done += take;
                if self.frame_fill == self.frame.len() {
                    self.emit_frame(at, false, emit);
                    at += self.frame.len() as u64;
                }
            }
        }
    }

    /// Feed the staged 10 ms frame (`start`: its first sample) to the encoder.
    fn encode_stage(&mut self, start: u64, emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        let len = self.stage.len();
        let mut done = 0;
        while done < len {
            let take = (self.frame.len() - self.frame_fill).min(len - done);
            self.frame[self.frame_fill..self.frame_fill + take]
                .copy_from_slice(&self.stage[done..done + take]);
            self.frame_fill += take;
            done += take;
            if self.frame_fill == self.frame.len() {
                let frame_start = start + done as u64 - self.frame.len() as u64;
                self.emit_frame(frame_start, true, emit);
            }
        }
    }

    fn emit_frame(&mut self, at: u64, live: bool, emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        self.frame_fill = 0;
        match self.encoder.encode(&self.frame, &mut self.packet) {
            Ok(len) => {
                self.seq += 1;
                emit(UplinkEvent::Frame {
                    seq: self.seq,
                    at,
                    samples: self.frame.len(),
                    packet: &self.packet[..len],
                    live,
                });
            }
            Err(_) => self.encode_errors += 1,
        }
    }
}
