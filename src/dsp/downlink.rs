//! The downlink pipeline: agent audio (Opus packets, 16-bit PCM at any rate, or f32 mono such as
//! earcons and synthesized speech) -> mono f32 -> output device rate -> device channels, with the
//! software volume applied.
//!
//! Context: DSP worker thread (and benchmarks). Resamplers are created the first time a source rate is
//! seen (a handful per session) and kept; after that nothing allocates.

use crate::audio::StreamFormat;

use super::DspError;
use super::codec::{DOWNLINK_RATE_HZ, MAX_DECODED_SAMPLES, OpusDecoder};
use super::resample::StreamResampler;

/// One piece of audio to play.
#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkAudio {
    /// One Opus packet.
    Opus(Vec<u8>),
    /// Little-endian signed 16-bit PCM, interleaved.
    Pcm16 {
        rate_hz: u32,
        channels: u16,
        data: Vec<u8>,
    },
    /// Mono f32 samples.
    Mono { rate_hz: u32, samples: Vec<f32> },
}

pub struct Downlink {
    out: StreamFormat,
    volume: f32,
    decoder: OpusDecoder,
    decoded: Vec<f32>,
    resamplers: Vec<StreamResampler>,
    interleaved: Vec<f32>,
    decode_errors: u64,
}

const BLOCK: usize = MAX_DECODED_SAMPLES;

impl Downlink {
    pub fn new(out: StreamFormat, volume: f32) -> Result<Self, DspError> {
        if out.channels == 0 || out.rate_hz == 0 {
            return Err(DspError::Format(format!("unusable output format {out}")));
        }
        Ok(Downlink {
            out,
            volume,
            decoder: OpusDecoder::new()?,
            decoded: vec![0.0; BLOCK],
            resamplers: Vec::with_capacity(4),
            interleaved: Vec::with_capacity(BLOCK * 8 * out.channels as usize),
            decode_errors: 0,
        })
    }

    pub fn format(&self) -> StreamFormat {
        self.out
    }

    pub fn decode_errors(&self) -> u64 {
        self.decode_errors
    }

    /// Forget partial state (after a flush or between streams).
    pub fn reset(&mut self) {
        self.decoder.reset();
        for r in &mut self.resamplers {
            r.reset();
        }
    }

    /// Convert `audio`; `emit` receives interleaved samples in the output format.
    pub fn push(
        &mut self,
        audio: &DownlinkAudio,
        emit: &mut dyn FnMut(&[f32]),
    ) -> Result<(), DspError> {
        match audio {
            DownlinkAudio::Opus(packet) => {
                let n = match self.decoder.decode(packet, &mut self.decoded) {
                    Ok(n) => n,
                    Err(e) => {
                        self.decode_errors += 1;
                        return Err(e);
                    }
                };
                let Downlink { decoded, .. } = self;
                let block = std::mem::take(decoded);
                self.mono(DOWNLINK_RATE_HZ, &block[..n], emit)?;
                self.decoded = block;
            }
            DownlinkAudio::Pcm16 {
                rate_hz,
                channels,
                data,
            } => {
                let ch = (*channels).max(1) as usize;
                let mut block = std::mem::take(&mut self.decoded);
                for frames in data.chunks(BLOCK * 2 * ch) {
                    let mut n = 0;
                    for f in frames.chunks_exact(2 * ch) {
                        let sum: f32 = f
                            .chunks_exact(2)
                            .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
                            .sum();
                        block[n] = sum / ch as f32;
                        n += 1;
                    }
                    if let Err(e) = self.mono(*rate_hz, &block[..n], emit) {
                        self.decoded = block;
                        return Err(e);
                    }
                }
                self.decoded = block;
            }
            DownlinkAudio::Mono { rate_hz, samples } => self.push_mono(*rate_hz, samples, emit)?,
        }
        Ok(())
    }

    /// Play mono f32 at `rate_hz` (earcons, synthesized speech) without copying it first.
    pub fn push_mono(
        &mut self,
        rate_hz: u32,
        samples: &[f32],
        emit: &mut dyn FnMut(&[f32]),
    ) -> Result<(), DspError> {
        for c in samples.chunks(BLOCK) {
            self.mono(rate_hz, c, emit)?;
        }
        Ok(())
    }

    /// Mono at `rate_hz` -> output format.
    fn mono(
        &mut self,
        rate_hz: u32,
        samples: &[f32],
        emit: &mut dyn FnMut(&[f32]),
    ) -> Result<(), DspError> {
        if rate_hz == 0 {
            return Err(DspError::Format("audio with a sample rate of 0".into()));
        }
        let idx = match self.resamplers.iter().position(|r| r.rates().0 == rate_hz) {
            Some(i) => i,
            None => {
                self.resamplers
                    .push(StreamResampler::new(rate_hz, self.out.rate_hz)?);
                self.resamplers.len() - 1
            }
        };
        let ch = self.out.channels as usize;
        let volume = self.volume;
        let Downlink {
            resamplers,
            interleaved,
            ..
        } = self;
        resamplers[idx].process(samples, |out| {
            interleaved.clear();
            for s in out {
                let v = s * volume;
                for _ in 0..ch {
                    interleaved.push(v);
                }
            }
            emit(interleaved);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OpusConfig;
    use crate::dsp::codec::OpusEncoder;

    #[test]
    fn pcm16_is_resampled_and_upmixed() {
        let out = StreamFormat {
            rate_hz: 48_000,
            channels: 2,
        };
        let mut d = Downlink::new(out, 0.5).expect("downlink");
        let data: Vec<u8> = (0..1600).flat_map(|_| 16384i16.to_le_bytes()).collect();
        let mut got = Vec::new();
        d.push(
            &DownlinkAudio::Pcm16 {
                rate_hz: 16_000,
                channels: 1,
                data,
            },
            &mut |s| got.extend_from_slice(s),
        )
        .expect("push");
        // 100 ms at 16 kHz -> about 100 ms at 48 kHz stereo (minus the filter's chunk in flight).
        assert!(
            got.len() >= 2 * 4000 && got.len() <= 2 * 4800,
            "{}",
            got.len()
        );
        // Past the filter's start-up, a DC level of 0.5 at volume 0.5 is 0.25 on both channels.
        let mid = &got[got.len() / 2..got.len() / 2 + 2];
        assert!((mid[0] - 0.25).abs() < 0.01 && mid[0] == mid[1], "{mid:?}");
    }

    #[test]
    fn opus_round_trip_keeps_a_tone() {
        let mut enc = OpusEncoder::new(&OpusConfig::default()).expect("enc");
        let out = StreamFormat {
            rate_hz: 48_000,
            channels: 1,
        };
        let mut d = Downlink::new(out, 1.0).expect("downlink");
        let mut got = Vec::new();
        let mut packet = vec![0u8; 4000];
        let tone: Vec<i16> = (0..16_000)
            .map(|i| {
                (8000.0 * (2.0 * std::f32::consts::PI * 300.0 * i as f32 / 16_000.0).sin()) as i16
            })
            .collect();
        for f in tone.chunks_exact(320) {
            let n = enc.encode(f, &mut packet).expect("encode");
            d.push(&DownlinkAudio::Opus(packet[..n].to_vec()), &mut |s| {
                got.extend_from_slice(s)
            })
            .expect("decode");
        }
        assert_eq!(got.len(), 48_000);
        let rms = (got[24_000..].iter().map(|x| x * x).sum::<f32>() / 24_000.0).sqrt();
        let expect = 8000.0 / 32768.0 / 2f32.sqrt();
        assert!((rms - expect).abs() / expect < 0.2, "rms {rms} vs {expect}");
        assert!(
            d.push(&DownlinkAudio::Opus(vec![0xff, 0xff, 0xff]), &mut |_| {})
                .is_err()
        );
        assert_eq!(d.decode_errors(), 1);
    }
}
