//! Signal processing between the device rings and the rest of the service: downmix, resampling, voice
//! activity detection with pre-roll, Opus encode (uplink) and decode (downlink), and the worker thread
//! that runs them every 10 ms.
//!
//! Context: everything here runs on the DSP worker thread (`worker.rs`) or in benchmarks; nothing touches
//! tokio, sockets or cpal.

#[cfg(feature = "aec")]
pub mod aec;
pub mod codec;
pub mod downlink;
pub mod resample;
pub mod uplink;
pub mod vad;
pub mod worker;

use crate::config::ChannelSelect;

#[derive(Debug, thiserror::Error)]
pub enum DspError {
    #[error("resampler: {0}")]
    Resampler(String),
    #[error("opus: {0}")]
    Opus(String),
    #[error("audio format: {0}")]
    Format(String),
}

/// Interleaved `input` with `channels` channels -> mono `out` (one sample per frame). `out` must hold
/// `input.len() / channels` samples; returns how many were written.
pub fn downmix(input: &[f32], channels: usize, select: ChannelSelect, out: &mut [f32]) -> usize {
    let channels = channels.max(1);
    let frames = (input.len() / channels).min(out.len());
    match select {
        _ if channels == 1 => out[..frames].copy_from_slice(&input[..frames]),
        ChannelSelect::Mix => {
            let scale = 1.0 / channels as f32;
            for (o, f) in out[..frames].iter_mut().zip(input.chunks_exact(channels)) {
                *o = f.iter().sum::<f32>() * scale;
            }
        }
        ChannelSelect::Index(i) => {
            let i = (i as usize).min(channels - 1);
            for (o, f) in out[..frames].iter_mut().zip(input.chunks_exact(channels)) {
                *o = f[i];
            }
        }
    }
    frames
}

/// f32 in [-1, 1] -> i16, saturating.
#[inline]
pub fn to_i16(x: f32) -> i16 {
    (x * 32768.0).clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downmix_mixes_or_selects() {
        let stereo = [1.0, 0.0, 0.5, 0.5, -1.0, 1.0];
        let mut out = [9.0; 3];
        assert_eq!(downmix(&stereo, 2, ChannelSelect::Mix, &mut out), 3);
        assert_eq!(out, [0.5, 0.5, 0.0]);
        downmix(&stereo, 2, ChannelSelect::Index(1), &mut out);
        assert_eq!(out, [0.0, 0.5, 1.0]);
        downmix(&stereo, 2, ChannelSelect::Index(7), &mut out); // clamped to the last channel
        assert_eq!(out, [0.0, 0.5, 1.0]);
        assert_eq!(to_i16(1.5), i16::MAX);
        assert_eq!(to_i16(-1.0), i16::MIN);
    }
}
