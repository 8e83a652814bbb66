//! Opus: the uplink encoder (16 kHz mono, VOIP mode, 20 ms frames by default) and the downlink decoder
//! (any Opus stream, decoded at 48 kHz mono, Opus's native rate).
//!
//! Context: DSP worker thread. Encode and decode write into caller-provided buffers; no allocation.

use crate::config::OpusConfig;

use super::DspError;

/// Uplink sample rate.
pub const UPLINK_RATE_HZ: u32 = 16_000;
/// Downlink decode rate.
pub const DOWNLINK_RATE_HZ: u32 = 48_000;
/// Largest Opus packet we produce or accept (RFC 6716 allows 1275 bytes per frame, 120 ms max).
pub const MAX_PACKET_BYTES: usize = 1275 * 3;
/// Largest decoded frame: 120 ms at 48 kHz.
pub const MAX_DECODED_SAMPLES: usize = 5760;

pub struct OpusEncoder {
    enc: opus::Encoder,
    frame_samples: usize,
}

fn opus_err(what: &str) -> impl Fn(opus::Error) -> DspError + '_ {
    move |e| DspError::Opus(format!("{what}: {e}"))
}

impl OpusEncoder {
    pub fn new(cfg: &OpusConfig) -> Result<Self, DspError> {
        let mut enc = opus::Encoder::new(
            UPLINK_RATE_HZ,
            opus::Channels::Mono,
            opus::Application::Voip,
        )
        .map_err(opus_err("encoder"))?;
        enc.set_bitrate(opus::Bitrate::Bits(cfg.bitrate_bps as i32))
            .map_err(opus_err("bitrate"))?;
        enc.set_complexity(cfg.complexity as i32)
            .map_err(opus_err("complexity"))?;
        enc.set_inband_fec(cfg.fec).map_err(opus_err("fec"))?;
        if cfg.fec {
            enc.set_packet_loss_perc(10)
                .map_err(opus_err("packet loss"))?;
        }
        enc.set_dtx(cfg.dtx).map_err(opus_err("dtx"))?;
        enc.set_signal(opus::Signal::Voice)
            .map_err(opus_err("signal"))?;
        Ok(OpusEncoder {
            enc,
            frame_samples: (UPLINK_RATE_HZ * cfg.frame_ms / 1000) as usize,
        })
    }

    /// Samples per frame (320 for 20 ms).
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Encode one frame of exactly `frame_samples()` samples into `out`; returns the packet length.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> Result<usize, DspError> {
        self.enc.encode(pcm, out).map_err(opus_err("encode"))
    }

    /// Start a new stream (a new utterance).
    pub fn reset(&mut self) {
        let _ = self.enc.reset_state();
    }
}

pub struct OpusDecoder {
    dec: opus::Decoder,
}

impl OpusDecoder {
    pub fn new() -> Result<Self, DspError> {
        Ok(OpusDecoder {
            dec: opus::Decoder::new(DOWNLINK_RATE_HZ, opus::Channels::Mono)
                .map_err(opus_err("decoder"))?,
        })
    }

    /// Decode one packet to 48 kHz mono into `out` (at least `MAX_DECODED_SAMPLES` long); returns the
    /// number of samples. A corrupt packet is an error the caller logs and skips.
    pub fn decode(&mut self, packet: &[u8], out: &mut [f32]) -> Result<usize, DspError> {
        self.dec
            .decode_float(packet, out, false)
            .map_err(opus_err("decode"))
    }

    pub fn reset(&mut self) {
        let _ = self.dec.reset_state();
    }
}

/// Decodes the uplink's own Opus back to 16-bit PCM at a rate of the caller's choice: the speech
/// bridge transcribes what the user said from the frames the turn machine sends.
pub struct OpusDecoderPcm {
    dec: opus::Decoder,
}

impl OpusDecoderPcm {
    pub fn new(rate_hz: u32) -> Result<Self, DspError> {
        Ok(OpusDecoderPcm {
            dec: opus::Decoder::new(rate_hz, opus::Channels::Mono).map_err(opus_err("decoder"))?,
        })
    }

    /// Decode one packet into `out` (at least `MAX_DECODED_SAMPLES` long); returns the samples.
    pub fn decode(&mut self, packet: &[u8], out: &mut [i16]) -> Result<usize, DspError> {
        self.dec
            .decode(packet, out, false)
            .map_err(opus_err("decode"))
    }

    pub fn reset(&mut self) {
        let _ = self.dec.reset_state();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_packets() {
        let mut d = OpusDecoder::new().expect("decoder");
        let mut out = vec![0.0; MAX_DECODED_SAMPLES];
        // A code-3 packet claiming 63 frames of 60 ms is invalid.
        assert!(d.decode(&[0xff, 0xff, 0xff], &mut out).is_err());
    }
}
