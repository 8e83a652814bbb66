//! Acoustic echo cancellation at 16 kHz in 10 ms frames: WebRTC's AEC3 from `sonora`, a pure-Rust
//! port (cargo feature `aec`, on by default), its block processor driven here (see `Aec3`) so that
//! its linear filter output, before the suppressor, is there for the barge-in gate. The far end is exactly what the output callback played
//! (the playback ring's tap, resampled to 16 kHz), fed in the order it played; AEC3 estimates and
//! tracks the delay between it and its echo in the mic signal itself (`aec.delay_ms_hint` is only its
//! starting point). Optional noise suppression comes from the same library.
//!
//! Besides cancelling, every capture frame is measured: mic energy before, energy after (suppressed,
//! and linear: overall and above 4 kHz), and the far-end energy of the last `FAR_WINDOW_MS` (overall
//! and above 4 kHz). The barge-in gate (in the uplink) uses them to tell the
//! user from the residual of the device's own voice.
//!
//! Context: DSP worker thread. Buffers are sized in `new`.

use std::collections::VecDeque;

use crate::config::AecConfig;

/// Samples in one 10 ms frame at 16 kHz.
pub const FRAME: usize = 160;
/// How far back the far end counts as "playing" for the gate (covers the echo path and its tail).
pub const FAR_WINDOW_MS: usize = 300;
/// Far-end energy (mean square) above which the device's own voice counts as playing (-60 dBFS).
pub const FAR_ACTIVE: f32 = 1e-6;
/// With the far end quiet this long beyond `FAR_WINDOW_MS`, there is no echo to cancel: the mic goes
/// through untouched (the canceller still runs, to keep its state), so the user's words are not
/// filtered or suppressed for nothing. Not with noise suppression on, which is wanted all the time.
const BYPASS_AFTER_FRAMES: u32 = 50;
/// Delays between the far end as fed and its echo in the mic the coherence looks at, at least
/// (`aec.delay_ms_hint` + 100 ms if more): the room, plus the output and input buffering (the far end
/// is tapped when it is handed to the sound card, before it is heard).
const COHERENCE_MAX_LAG_MS: usize = 300;
/// Render frames that may be ahead of the capture frames (half a second).
const MAX_RENDER_CREDIT: i64 = 50;

/// Energies of one capture frame (mean square, full scale = 1.0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FrameLevels {
    /// The mic, before cancellation.
    pub mic: f32,
    /// After cancellation (and noise suppression, when on).
    pub out: f32,
    /// AEC3's linear filter output, before its suppressor (and before noise suppression).
    pub linear: f32,
    /// The linear output in each of the `BANDS`.
    pub linear_bands: [f32; BANDS],
    /// Loudest far-end frame of the last `FAR_WINDOW_MS`.
    pub far: f32,
    /// Loudest far-end frame of the last `FAR_WINDOW_MS` in each of the `BANDS`.
    pub far_bands: [f32; BANDS],
}

/// Running figures for logs, the bench and the demo.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct AecStats {
    /// Capture frames processed.
    pub frames: u64,
    /// Far-end frames fed.
    pub render_frames: u64,
    /// Capture frames passed through untouched because nothing had played for a while.
    pub bypassed_frames: u64,
    /// AEC3's echo return loss enhancement, dB, when it has one.
    pub erle_db: Option<f64>,
    /// AEC3's current delay estimate between far end and mic, ms.
    pub delay_ms: Option<i32>,
}

/// AEC3 (through `sonora-aec3`'s block processor) as sonora's `AudioProcessing` runs it at 16 kHz,
/// driven here so that the linear filter's output (the mic minus the estimated echo, before the
/// suppressor) is available: during double talk AEC3's suppressor also removes the user's unvoiced
/// sounds ("s", "t"), the linear output keeps them, and the barge-in gate needs them for the onset.
/// Same processing as the library's: high-pass on the capture, 64-sample blocks, float samples in
/// 16-bit scale, the delay hint, optional noise suppression (analysed before, applied after).
struct Aec3 {
    block_processor: sonora_aec3::block_processor::BlockProcessor,
    high_pass: sonora::high_pass_filter::HighPassFilter,
    noise_suppressor: Option<sonora_ns::noise_suppressor::NoiseSuppressor>,
    delay_hint_ms: i32,
    /// Capture samples (16-bit scale) not yet a whole block.
    cap_pending: [f32; BLOCK],
    cap_pending_fill: usize,
    /// Processed samples waiting to be framed: suppressed output and linear output, same timing.
    /// Primed with one block of zeros (the library's block framer does the same: 4 ms of latency).
    out_fifo: [f32; FIFO],
    lin_fifo: [f32; FIFO],
    fifo_fill: usize,
    /// Render samples not yet a whole block.
    render_pending: [f32; BLOCK],
    render_pending_fill: usize,
    block: sonora_aec3::block::Block,
    linear_block: sonora_aec3::block::Block,
    /// The high-pass filter's working buffer (its API takes channels as vectors; sized once).
    hp_buf: [Vec<f32>; 1],
}

/// AEC3's block: 4 ms at 16 kHz.
const BLOCK: usize = sonora_aec3::common::BLOCK_SIZE;
/// Output FIFO: the priming block, one frame, and the block that overshoots it.
const FIFO: usize = FRAME + 2 * BLOCK;
/// Full scale of the library's float samples.
const S16: f32 = 32768.0;

impl Aec3 {
    fn new(cfg: &AecConfig) -> Self {
        let mut config = sonora_aec3::config::EchoCanceller3Config::default();
        config.filter.export_linear_aec_output = true;
        let block_processor =
            sonora_aec3::block_processor::BlockProcessor::new(&config, 16_000, 1, 1);
        let noise_suppressor = cfg.noise_suppression.then(|| {
            sonora_ns::noise_suppressor::NoiseSuppressor::with_level(
                sonora_ns::config::SuppressionLevel::K12dB, // the library's "Moderate"
            )
        });
        Aec3 {
            block_processor,
            high_pass: sonora::high_pass_filter::HighPassFilter::new(16_000, 1),
            noise_suppressor,
            // Clamped like the library does; the config already checks the range.
            delay_hint_ms: (cfg.delay_ms_hint as i32).clamp(0, 500),
            cap_pending: [0.0; BLOCK],
            cap_pending_fill: 0,
            out_fifo: [0.0; FIFO],
            lin_fifo: [0.0; FIFO],
            fifo_fill: BLOCK,
            render_pending: [0.0; BLOCK],
            render_pending_fill: 0,
            block: sonora_aec3::block::Block::new(1, 1),
            linear_block: sonora_aec3::block::Block::new(1, 1),
            hp_buf: [vec![0.0; FRAME]],
        }
    }

    /// One far-end frame (full scale 1.0).
    fn render(&mut self, frame: &[f32; FRAME]) {
        for &s in frame {
            self.render_pending[self.render_pending_fill] = s * S16;
            self.render_pending_fill += 1;
            if self.render_pending_fill == BLOCK {
                self.render_pending_fill = 0;
                self.block
                    .view_mut(0, 0)
                    .copy_from_slice(&self.render_pending);
                self.block_processor.buffer_render(&self.block);
            }
        }
    }

    /// One capture frame (full scale 1.0) -> suppressed output and linear filter output.
    fn capture(&mut self, input: &[f32; FRAME], out: &mut [f32; FRAME], linear: &mut [f32; FRAME]) {
        let saturated = input.iter().any(|s| s.abs() * S16 >= 32_700.0);
        for (d, s) in self.hp_buf[0].iter_mut().zip(input) {
            *d = s * S16;
        }
        self.high_pass.process_channels(&mut self.hp_buf);
        if let Some(ns) = &mut self.noise_suppressor
            && let Ok(frame) = <&[f32; FRAME]>::try_from(self.hp_buf[0].as_slice())
        {
            ns.analyze(frame);
        }
        self.block_processor
            .set_audio_buffer_delay(self.delay_hint_ms);
        for i in 0..FRAME {
            self.cap_pending[self.cap_pending_fill] = self.hp_buf[0][i];
            self.cap_pending_fill += 1;
            if self.cap_pending_fill == BLOCK {
                self.cap_pending_fill = 0;
                self.block.view_mut(0, 0).copy_from_slice(&self.cap_pending);
                self.block_processor.process_capture(
                    false,
                    saturated,
                    Some(&mut self.linear_block),
                    &mut self.block,
                );
                let n = self.fifo_fill;
                self.out_fifo[n..n + BLOCK].copy_from_slice(self.block.view(0, 0));
                self.lin_fifo[n..n + BLOCK].copy_from_slice(self.linear_block.view(0, 0));
                self.fifo_fill += BLOCK;
            }
        }
        // Always at least one frame: the priming block plus 2.5 blocks a frame (see FIFO).
        let n = self.fifo_fill.min(FRAME);
        out[..n].copy_from_slice(&self.out_fifo[..n]);
        linear[..n].copy_from_slice(&self.lin_fifo[..n]);
        self.out_fifo.copy_within(n..self.fifo_fill, 0);
        self.lin_fifo.copy_within(n..self.fifo_fill, 0);
        self.fifo_fill -= n;
        if let Some(ns) = &mut self.noise_suppressor {
            ns.process(out);
        }
        for s in out.iter_mut().chain(linear.iter_mut()) {
            *s = (*s / S16).clamp(-1.0, 1.0);
        }
    }

    fn metrics(&self) -> sonora_aec3::block_processor::BlockProcessorMetricsOutput {
        self.block_processor.get_metrics()
    }
}

/// One biquad section (transposed direct form II).
#[derive(Debug, Clone, Copy)]
struct Biquad {
    b: [f32; 3],
    a: [f32; 2],
    z: [f32; 2],
}

impl Biquad {
    /// Second-order Butterworth at `fc_hz` (16 kHz), bilinear transform: K = tan(pi fc / fs).
    fn butterworth(fc_hz: f32, high_pass: bool) -> Self {
        let k = (std::f32::consts::PI * fc_hz / 16_000.0).tan();
        let n = 1.0 / (1.0 + std::f32::consts::SQRT_2 * k + k * k);
        let b = if high_pass {
            [n, -2.0 * n, n]
        } else {
            [k * k * n, 2.0 * k * k * n, k * k * n]
        };
        Biquad {
            b,
            a: [
                2.0 * (k * k - 1.0) * n,
                (1.0 - std::f32::consts::SQRT_2 * k + k * k) * n,
            ],
            z: [0.0; 2],
        }
    }

    fn process(&mut self, x: f32) -> f32 {
        let y = self.b[0] * x + self.z[0];
        self.z[0] = self.b[1] * x - self.a[0] * y + self.z[1];
        self.z[1] = self.b[2] * x - self.a[1] * y;
        y
    }
}

/// The bands the barge-in gate also looks at, where a voice has energy and its echo through a small
/// speaker little: above 4 kHz (fricatives and bursts: "s", "t"). A band below 200 Hz (the
/// fundamental, nasals) was tried and dropped: the echo's residual there varies too much (false
/// barge-ins on the evaluation set).
pub const BANDS: usize = 1;
/// Cut-off (Hz) and kind (high-pass?) of each band's filter.
const BAND_FILTERS: [(f32, bool); BANDS] = [(4_000.0, true)];

/// One band's filter: two cascaded Butterworth sections (24 dB an octave), state kept across frames.
#[derive(Debug, Clone, Copy)]
struct BandFilter([Biquad; 2]);

impl BandFilter {
    fn new(band: usize) -> Self {
        let (fc, high) = BAND_FILTERS[band];
        BandFilter([Biquad::butterworth(fc, high); 2])
    }

    /// Energy (mean square) of `x` in the band.
    fn energy(&mut self, x: &[f32]) -> f32 {
        let [first, second] = &mut self.0;
        let mut acc = 0.0;
        for &s in x {
            let y = second.process(first.process(s));
            acc += y * y;
        }
        acc / x.len().max(1) as f32
    }
}

/// Decimation from 16 kHz to the coherence's 2 kHz.
const COH_DECIMATE: usize = 8;
/// Coherence samples per 10 ms frame.
const COH_FRAME: usize = FRAME / COH_DECIMATE;
/// The window the correlation is taken over: 60 ms.
const COH_WINDOW: usize = 6 * COH_FRAME;
/// Below this mic energy in the window (mean square, -60 dBFS) there is nothing to correlate.
const COH_MIN_ENERGY: f32 = 1e-6;

/// Does the mic sound like what the speaker played, whatever the canceller makes of it? The
/// largest normalised correlation, over every speaker-to-mic delay up to `max_lag`, between the
/// last 60 ms of the mic and of the far end, both low-passed at 800 Hz and taken at 2 kHz (where a
/// voice, and its echo through a small speaker, have most of their energy). Either sign counts. The
/// cost, 72 k multiply-adds a frame for 300 ms of delays, is only paid for frames the gate would pass.
///
/// The echo alone keeps it high (0.7 typical: the room's reverb and noise take the rest), when the
/// user speaks over it it falls (another voice does not correlate with the far end). What it is for:
/// when the echo path changes (a sound card's clock slip makes the delay jump), AEC3's filter no
/// longer matches and passes the echo through, and the gate's level tests take it for the user;
/// the correlation still finds the echo, at its new delay.
struct EchoCoherence {
    lp_far: [Biquad; 2],
    lp_mic: [Biquad; 2],
    /// The far end at 2 kHz, oldest first: the window plus every delay.
    far: Box<[f32]>,
    /// The mic at 2 kHz, oldest first.
    mic: [f32; COH_WINDOW],
    /// Running sums of the far end's squares (`prefix[i]` = sum of `far[..i]`), per frame.
    prefix: Box<[f64]>,
    max_lag: usize,
}

impl EchoCoherence {
    fn new(max_lag_ms: usize) -> Self {
        let max_lag = max_lag_ms * 16_000 / COH_DECIMATE / 1000;
        EchoCoherence {
            lp_far: [Biquad::butterworth(800.0, false); 2],
            lp_mic: [Biquad::butterworth(800.0, false); 2],
            far: vec![0.0; COH_WINDOW + max_lag].into_boxed_slice(),
            mic: [0.0; COH_WINDOW],
            prefix: vec![0.0; COH_WINDOW + max_lag + 1].into_boxed_slice(),
            max_lag,
        }
    }

    fn decimate(filters: &mut [Biquad; 2], x: &[f32; FRAME], out: &mut [f32]) {
        let [a, b] = filters;
        for (i, &s) in x.iter().enumerate() {
            let y = b.process(a.process(s));
            if i % COH_DECIMATE == COH_DECIMATE - 1 {
                out[i / COH_DECIMATE] = y;
            }
        }
    }

    /// One far-end frame, as played.
    fn render(&mut self, x: &[f32; FRAME]) {
        let n = self.far.len();
        self.far.copy_within(COH_FRAME.., 0);
        Self::decimate(&mut self.lp_far, x, &mut self.far[n - COH_FRAME..]);
    }

    /// One mic frame (same period as the last far-end frame).
    fn capture(&mut self, x: &[f32; FRAME]) {
        self.mic.copy_within(COH_FRAME.., 0);
        Self::decimate(&mut self.lp_mic, x, &mut self.mic[COH_WINDOW - COH_FRAME..]);
    }

    /// The correlation over the last window, 0.0 to 1.0 (0.0 when the mic or the far end is too
    /// quiet to tell). Only computed when asked: the gate asks when a frame would pass.
    fn correlate(&mut self) -> f32 {
        let em: f32 = self.mic.iter().map(|s| s * s).sum();
        if em < COH_MIN_ENERGY * COH_WINDOW as f32 {
            return 0.0;
        }
        // f64: a loud far end followed by a quiet stretch must not lose the quiet part's energy.
        let mut acc = 0.0f64;
        self.prefix[0] = 0.0;
        for (i, s) in self.far.iter().enumerate() {
            acc += f64::from(*s) * f64::from(*s);
            self.prefix[i + 1] = acc;
        }
        let n = self.far.len();
        let em = f64::from(em);
        let mut best = 0.0f64;
        for lag in 0..=self.max_lag {
            // The far end `lag` samples before the mic window.
            let (from, to) = (n - COH_WINDOW - lag, n - lag);
            let ef = self.prefix[to] - self.prefix[from];
            if ef < f64::from(COH_MIN_ENERGY) * 1e-2 * COH_WINDOW as f64 {
                continue;
            }
            // Either sign: a speaker wired the other way round gives the echo inverted.
            let c = f64::from(dot(&self.mic, &self.far[from..to]));
            best = best.max(c * c / (em * ef));
        }
        best.sqrt().min(1.0) as f32
    }
}

pub struct EchoCanceller {
    aec3: Aec3,
    /// The linear output and the far end in each of the `BANDS`.
    linear_bands: [BandFilter; BANDS],
    far_bands: [BandFilter; BANDS],
    /// Far-end band energies of the last `FAR_WINDOW_MS`.
    far_bands_recent: VecDeque<[f32; BANDS]>,
    render_frame: [f32; FRAME],
    render_fill: usize,
    cap_in: [f32; FRAME],
    cap_out: [f32; FRAME],
    /// AEC3's linear filter output for the last capture frame (before its suppressor).
    cap_linear: [f32; FRAME],
    /// The same as 16-bit samples, for the VAD.
    linear_i16: [i16; FRAME],
    /// Far-end frame energies of the last `FAR_WINDOW_MS`.
    far_recent: VecDeque<f32>,
    /// Capture frames since the far end was last playing.
    quiet_frames: u32,
    /// Render frames fed minus capture frames processed: when the far end stops coming (the tap
    /// stalled, a far-end file ran out), capture frames count as silence played.
    render_credit: i64,
    /// Noise suppression runs: the mic always goes through the library then.
    noise_suppression: bool,
    coherence: EchoCoherence,
    /// The far end was playing at the last capture frame.
    far_playing: bool,
    stats: AecStats,
}

impl EchoCanceller {
    pub fn new(cfg: &AecConfig) -> Self {
        EchoCanceller {
            aec3: Aec3::new(cfg),
            linear_bands: std::array::from_fn(BandFilter::new),
            far_bands: std::array::from_fn(BandFilter::new),
            far_bands_recent: VecDeque::with_capacity(FAR_WINDOW_MS / 10 + 1),
            render_frame: [0.0; FRAME],
            render_fill: 0,
            cap_in: [0.0; FRAME],
            cap_out: [0.0; FRAME],
            cap_linear: [0.0; FRAME],
            linear_i16: [0; FRAME],
            far_recent: VecDeque::with_capacity(FAR_WINDOW_MS / 10 + 1),
            quiet_frames: BYPASS_AFTER_FRAMES,
            render_credit: 0,
            noise_suppression: cfg.noise_suppression,
            coherence: EchoCoherence::new(
                COHERENCE_MAX_LAG_MS.max(cfg.delay_ms_hint as usize + 100),
            ),
            far_playing: false,
            stats: AecStats::default(),
        }
    }

    /// How much the canceller's linear output for the last capture frames correlates with the far
    /// end at the best delay, 0.0-1.0 (see `EchoCoherence`): how much of what the filter left is
    /// still the device's own voice. 0.0 while nothing plays.
    pub fn coherence(&mut self) -> f32 {
        if self.far_playing {
            self.coherence.correlate()
        } else {
            0.0
        }
    }

    /// Far-end samples (16 kHz mono, as played), in playing order; any length.
    pub fn render(&mut self, samples: &[f32]) {
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (FRAME - self.render_fill).min(rest.len());
            self.render_frame[self.render_fill..self.render_fill + take]
                .copy_from_slice(&rest[..take]);
            self.render_fill += take;
            rest = &rest[take..];
            if self.render_fill == FRAME {
                self.render_fill = 0;
                let e = energy(&self.render_frame);
                let mut bands = [0.0; BANDS];
                for (b, f) in bands.iter_mut().zip(self.far_bands.iter_mut()) {
                    *b = f.energy(&self.render_frame);
                }
                self.push_far(e, bands);
                // Bounded: a long run of far end without mic (the input stalled) must not keep the
                // level from decaying once the mic is back and the far end has stopped.
                self.render_credit = (self.render_credit + 1).min(MAX_RENDER_CREDIT);
                self.aec3.render(&self.render_frame);
                self.coherence.render(&self.render_frame);
                self.stats.render_frames += 1;
            }
        }
    }

    fn push_far(&mut self, e: f32, bands: [f32; BANDS]) {
        if self.far_recent.len() == FAR_WINDOW_MS / 10 {
            self.far_recent.pop_front();
            self.far_bands_recent.pop_front();
        }
        self.far_recent.push_back(e);
        self.far_bands_recent.push_back(bands);
    }

    /// Cancel the echo in one 10 ms capture frame, in place.
    pub fn capture(&mut self, frame: &mut [i16; FRAME]) -> FrameLevels {
        // One render frame is due per capture frame; a missing one was silence (the level must not
        // freeze at the last loud frame).
        if self.render_credit <= 0 {
            self.push_far(0.0, [0.0; BANDS]);
            self.coherence.render(&[0.0; FRAME]);
        } else {
            self.render_credit -= 1;
        }
        for (d, s) in self.cap_in.iter_mut().zip(frame.iter()) {
            *d = f32::from(*s) / 32768.0;
        }
        let mic = energy(&self.cap_in);

        self.aec3
            .capture(&self.cap_in, &mut self.cap_out, &mut self.cap_linear);
        // No far end yet (nothing has played): the gate has nothing to compare with.
        let far = self.far_recent.iter().copied().fold(0.0, f32::max);
        self.coherence.capture(&self.cap_linear);
        self.far_playing = far >= FAR_ACTIVE;
        let mut far_bands = [0.0f32; BANDS];
        for e in &self.far_bands_recent {
            for (m, x) in far_bands.iter_mut().zip(e) {
                *m = m.max(*x);
            }
        }
        let mut linear_bands = [0.0; BANDS];
        for (b, f) in linear_bands.iter_mut().zip(self.linear_bands.iter_mut()) {
            *b = f.energy(&self.cap_linear);
        }
        if far >= FAR_ACTIVE {
            self.quiet_frames = 0;
        } else {
            self.quiet_frames = self.quiet_frames.saturating_add(1);
        }
        if self.quiet_frames > BYPASS_AFTER_FRAMES && !self.noise_suppression {
            self.cap_out = self.cap_in;
            self.cap_linear = self.cap_in;
            self.stats.bypassed_frames += 1;
        } else {
            for (d, s) in frame.iter_mut().zip(self.cap_out.iter()) {
                *d = super::to_i16(*s);
            }
        }
        self.stats.frames += 1;
        if self.stats.frames.is_multiple_of(100) {
            let m = self.aec3.metrics();
            self.stats.erle_db = Some(m.echo_return_loss_enhancement);
            self.stats.delay_ms = Some(m.delay_ms);
        }
        for (d, s) in self.linear_i16.iter_mut().zip(self.cap_linear.iter()) {
            *d = super::to_i16(*s);
        }
        FrameLevels {
            mic,
            out: energy(&self.cap_out),
            linear: energy(&self.cap_linear),
            linear_bands,
            far,
            far_bands,
        }
    }

    /// AEC3's linear filter output for the last capture frame: the mic minus the estimated echo,
    /// before the suppressor (the mic itself when passed through).
    pub fn linear_frame(&self) -> &[i16; FRAME] {
        &self.linear_i16
    }

    pub fn stats(&self) -> AecStats {
        self.stats
    }
}

/// Dot product of two slices of the same length, in eight lanes (so that it vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Mean square of `x`.
pub fn energy(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    x.iter().map(|s| s * s).sum::<f32>() / x.len() as f32
}

/// `e` (mean square) in dB full scale; -120 for silence.
pub fn db(e: f32) -> f32 {
    if e <= 1e-12 { -120.0 } else { 10.0 * e.log10() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: &mut u32) -> Vec<i16> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((*seed >> 16) as i16) / 16
            })
            .collect()
    }

    fn run(cfg: &AecConfig) -> (f32, f32) {
        let mut aec = EchoCanceller::new(cfg);
        let mut seed = 7;
        let (mut mic, mut out) = (0.0, 0.0);
        for i in 0..300 {
            let mut frame = [0i16; FRAME];
            frame.copy_from_slice(&noise(FRAME, &mut seed));
            aec.render(&[0.0; FRAME]);
            let l = aec.capture(&mut frame);
            if i >= 100 {
                mic += l.mic;
                out += l.out;
            }
        }
        (mic, out)
    }

    /// Speech-like far end: noise through a resonance, in bursts, so the echo has a low band.
    fn voiceish(n: usize, seed: &mut u32) -> Vec<f32> {
        let raw = noise(n, seed);
        let mut lp = [Biquad::butterworth(600.0, false); 2];
        raw.iter()
            .enumerate()
            .map(|(i, &s)| {
                let on = (i / 3200) % 3 != 2; // 200 ms on, 100 ms off
                let x = lp[0].process(f32::from(s) / 2048.0);
                let y = lp[1].process(x);
                if on { y } else { 0.0 }
            })
            .collect()
    }

    /// Coherence per 10 ms frame of `mic` against `far`.
    fn coherence_of(far: &[f32], mic: &[f32]) -> Vec<f32> {
        let mut c = EchoCoherence::new(COHERENCE_MAX_LAG_MS);
        far.chunks_exact(FRAME)
            .zip(mic.chunks_exact(FRAME))
            .map(|(f, m)| {
                c.render(f.try_into().unwrap());
                c.capture(m.try_into().unwrap());
                c.correlate()
            })
            .collect()
    }

    fn delayed(x: &[f32], by: usize, gain: f32) -> Vec<f32> {
        (0..x.len())
            .map(|i| i.checked_sub(by).map_or(0.0, |j| x[j] * gain))
            .collect()
    }

    fn median(mut v: Vec<f32>) -> f32 {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    }

    #[test]
    fn the_echo_correlates_with_the_far_end_another_voice_does_not() {
        let mut seed = 3;
        let far = voiceish(FRAME * 300, &mut seed);
        // The echo 45 ms later, quieter, plus a little noise.
        let hiss = noise(far.len(), &mut seed);
        let echo: Vec<f32> = delayed(&far, 720, 0.3)
            .iter()
            .zip(&hiss)
            .map(|(e, n)| e + f32::from(*n) / 32768.0 * 0.01)
            .collect();
        let c = coherence_of(&far, &echo);
        assert!(median(c[20..].to_vec()) > 0.8, "{:?}", &c[20..40]);
        // Another voice (an independent signal of the same kind) at the mic.
        let user = voiceish(far.len(), &mut seed);
        let c = coherence_of(&far, &user);
        assert!(median(c[20..].to_vec()) < 0.4, "{:?}", &c[20..40]);
        // The echo moves from 70 to 20 ms (a clock slip): at its new delay it still correlates.
        let (before, after) = (delayed(&far, 1120, 0.3), delayed(&far, 320, 0.3));
        let split = FRAME * 150;
        let jumped: Vec<f32> = before[..split]
            .iter()
            .chain(&after[split..])
            .copied()
            .collect();
        let c = coherence_of(&far, &jumped);
        // Once the 60 ms window holds only the new delay; 0.0 is the far end's pauses.
        let after_jump: Vec<f32> = c[150 + 6..250]
            .iter()
            .copied()
            .filter(|&x| x > 0.0)
            .collect();
        assert!(after_jump.len() > 50, "{after_jump:?}");
        assert!(after_jump.iter().all(|&x| x >= 0.5), "{after_jump:?}");
    }

    #[test]
    fn coherence_is_zero_when_nothing_plays_or_the_mic_is_quiet() {
        let mut aec = EchoCanceller::new(&AecConfig::default());
        let mut frame = [1000i16; FRAME];
        aec.render(&[0.0; FRAME]);
        aec.capture(&mut frame);
        assert_eq!(aec.coherence(), 0.0);
        let mut c = EchoCoherence::new(COHERENCE_MAX_LAG_MS);
        c.render(&[0.1; FRAME]);
        c.capture(&[0.0; FRAME]);
        assert_eq!(c.correlate(), 0.0);
    }

    #[test]
    fn with_nothing_played_the_mic_passes_untouched() {
        let (mic, out) = run(&AecConfig::default());
        assert!((mic - out).abs() <= mic * 1e-6, "{mic} {out}");
    }

    #[test]
    fn noise_suppression_lowers_steady_noise() {
        let cfg = AecConfig {
            noise_suppression: true,
            ..AecConfig::default()
        };
        let (mic, out) = run(&cfg);
        // Moderate suppression: several dB off white noise once it has adapted.
        assert!(db(out) < db(mic) - 6.0, "{} -> {} dB", db(mic), db(out));
    }

    #[test]
    fn an_echo_of_what_played_is_cancelled() {
        let mut aec = EchoCanceller::new(&AecConfig::default());
        let mut seed = 11;
        // Far end: noise bursts; mic: the same, 20 ms later at half the level.
        let far: Vec<i16> = noise(FRAME * 400, &mut seed);
        let (mut mic_e, mut out_e) = (0.0, 0.0);
        for i in 0..400 {
            let f: Vec<f32> = far[i * FRAME..(i + 1) * FRAME]
                .iter()
                .map(|s| f32::from(*s) / 32768.0)
                .collect();
            aec.render(&f);
            let mut frame = [0i16; FRAME];
            for (k, d) in frame.iter_mut().enumerate() {
                let j = (i * FRAME + k).checked_sub(320);
                *d = j.map_or(0, |j| far[j] / 2);
            }
            let l = aec.capture(&mut frame);
            if i >= 200 {
                mic_e += l.mic;
                out_e += l.out;
            }
        }
        assert!(
            db(mic_e) - db(out_e) > 20.0,
            "ERLE {} dB",
            db(mic_e) - db(out_e)
        );
    }
}
