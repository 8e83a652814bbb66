//! Acoustic echo cancellation at 16 kHz in 10 ms frames: WebRTC's AEC3 through `sonora`, a pure-Rust
//! port (cargo feature `aec`, on by default). The far end is exactly what the output callback played
//! (the playback ring's tap, resampled to 16 kHz), fed in the order it played; AEC3 estimates and
//! tracks the delay between it and its echo in the mic signal itself (`aec.delay_ms_hint` is only its
//! starting point). Optional noise suppression comes from the same library.
//!
//! Besides cancelling, every capture frame is measured: mic energy before, energy after, and the
//! far-end energy of the last `FAR_WINDOW_MS`. The barge-in gate (in the uplink) uses them to tell the
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
/// Render frames that may be ahead of the capture frames (half a second).
const MAX_RENDER_CREDIT: i64 = 50;

/// Energies of one capture frame (mean square, full scale = 1.0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FrameLevels {
    /// The mic, before cancellation.
    pub mic: f32,
    /// After cancellation (and noise suppression, when on).
    pub out: f32,
    /// Loudest far-end frame of the last `FAR_WINDOW_MS`.
    pub far: f32,
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

pub struct EchoCanceller {
    apm: sonora::AudioProcessing,
    render_frame: [f32; FRAME],
    render_fill: usize,
    render_out: [f32; FRAME],
    cap_in: [f32; FRAME],
    cap_out: [f32; FRAME],
    /// Far-end frame energies of the last `FAR_WINDOW_MS`.
    far_recent: VecDeque<f32>,
    /// Capture frames since the far end was last playing.
    quiet_frames: u32,
    /// Render frames fed minus capture frames processed: when the far end stops coming (the tap
    /// stalled, a far-end file ran out), capture frames count as silence played.
    render_credit: i64,
    /// Noise suppression runs: the mic always goes through the library then.
    noise_suppression: bool,
    stats: AecStats,
}

impl EchoCanceller {
    pub fn new(cfg: &AecConfig) -> Self {
        use sonora::config::{EchoCanceller as Ec, NoiseSuppression, NoiseSuppressionLevel};
        let config = sonora::Config {
            echo_canceller: Some(Ec::default()),
            noise_suppression: cfg.noise_suppression.then(|| NoiseSuppression {
                level: NoiseSuppressionLevel::Moderate,
                ..NoiseSuppression::default()
            }),
            ..Default::default()
        };
        let mut apm = sonora::AudioProcessing::builder()
            .config(config)
            .capture_config(sonora::StreamConfig::new(16_000, 1))
            .render_config(sonora::StreamConfig::new(16_000, 1))
            .build();
        // Clamped to 0-500 by the library; the config already checks the range.
        let _ = apm.set_stream_delay_ms(cfg.delay_ms_hint as i32);
        EchoCanceller {
            apm,
            render_frame: [0.0; FRAME],
            render_fill: 0,
            render_out: [0.0; FRAME],
            cap_in: [0.0; FRAME],
            cap_out: [0.0; FRAME],
            far_recent: VecDeque::with_capacity(FAR_WINDOW_MS / 10 + 1),
            quiet_frames: BYPASS_AFTER_FRAMES,
            render_credit: 0,
            noise_suppression: cfg.noise_suppression,
            stats: AecStats::default(),
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
                self.push_far(e);
                // Bounded: a long run of far end without mic (the input stalled) must not keep the
                // level from decaying once the mic is back and the far end has stopped.
                self.render_credit = (self.render_credit + 1).min(MAX_RENDER_CREDIT);
                // The render output is unused (no render-side processing is configured).
                let _ = self
                    .apm
                    .process_render_f32(&[&self.render_frame], &mut [&mut self.render_out]);
                self.stats.render_frames += 1;
            }
        }
    }

    fn push_far(&mut self, e: f32) {
        if self.far_recent.len() == FAR_WINDOW_MS / 10 {
            self.far_recent.pop_front();
        }
        self.far_recent.push_back(e);
    }

    /// Cancel the echo in one 10 ms capture frame, in place.
    pub fn capture(&mut self, frame: &mut [i16; FRAME]) -> FrameLevels {
        // One render frame is due per capture frame; a missing one was silence (the level must not
        // freeze at the last loud frame).
        if self.render_credit <= 0 {
            self.push_far(0.0);
        } else {
            self.render_credit -= 1;
        }
        for (d, s) in self.cap_in.iter_mut().zip(frame.iter()) {
            *d = f32::from(*s) / 32768.0;
        }
        let mic = energy(&self.cap_in);
        if self
            .apm
            .process_capture_f32(&[&self.cap_in], &mut [&mut self.cap_out])
            .is_err()
        {
            // Unusable frame: pass it through uncancelled rather than lose the user's audio.
            self.cap_out = self.cap_in;
        }
        // No far end yet (nothing has played): the gate has nothing to compare with.
        let far = self.far_recent.iter().copied().fold(0.0, f32::max);
        if far >= FAR_ACTIVE {
            self.quiet_frames = 0;
        } else {
            self.quiet_frames = self.quiet_frames.saturating_add(1);
        }
        if self.quiet_frames > BYPASS_AFTER_FRAMES && !self.noise_suppression {
            self.cap_out = self.cap_in;
            self.stats.bypassed_frames += 1;
        } else {
            for (d, s) in frame.iter_mut().zip(self.cap_out.iter()) {
                *d = super::to_i16(*s);
            }
        }
        self.stats.frames += 1;
        if self.stats.frames.is_multiple_of(100) {
            let st = self.apm.statistics();
            self.stats.erle_db = st.echo_return_loss_enhancement;
            self.stats.delay_ms = st.delay_ms;
        }
        FrameLevels {
            mic,
            out: energy(&self.cap_out),
            far,
        }
    }

    pub fn stats(&self) -> AecStats {
        self.stats
    }
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
