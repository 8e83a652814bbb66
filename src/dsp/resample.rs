//! Streaming mono resampler over rubato's FFT resampler with fixed input and output chunks.
//!
//! Context: DSP worker thread. All buffers are allocated in `new`; `process` allocates nothing.
//! Equal rates pass samples straight through.

use rubato::{FftFixedInOut, Resampler};

use super::DspError;

pub struct StreamResampler {
    inner: Option<FftFixedInOut<f32>>,
    in_buf: Vec<f32>,
    in_len: usize,
    out_buf: Vec<f32>,
    in_hz: u32,
    out_hz: u32,
}

impl StreamResampler {
    /// A resampler from `in_hz` to `out_hz` working in chunks of about 10 ms of input.
    pub fn new(in_hz: u32, out_hz: u32) -> Result<Self, DspError> {
        if in_hz == out_hz {
            return Ok(StreamResampler {
                inner: None,
                in_buf: Vec::new(),
                in_len: 0,
                out_buf: Vec::new(),
                in_hz,
                out_hz,
            });
        }
        let chunk = (in_hz / 100).max(1) as usize;
        let inner = FftFixedInOut::<f32>::new(in_hz as usize, out_hz as usize, chunk, 1)
            .map_err(|e| DspError::Resampler(format!("{in_hz} Hz -> {out_hz} Hz: {e}")))?;
        let in_buf = vec![0.0; inner.input_frames_max()];
        let out_buf = vec![0.0; inner.output_frames_max()];
        Ok(StreamResampler {
            inner: Some(inner),
            in_buf,
            in_len: 0,
            out_buf,
            in_hz,
            out_hz,
        })
    }

    pub fn rates(&self) -> (u32, u32) {
        (self.in_hz, self.out_hz)
    }

    /// Input frames per chunk (1 when passing through).
    pub fn chunk_in(&self) -> usize {
        self.inner.as_ref().map_or(1, |r| r.input_frames_next())
    }

    /// Output delay of the filter, in output frames.
    pub fn delay_out(&self) -> usize {
        self.inner.as_ref().map_or(0, |r| r.output_delay())
    }

    /// Feed `input`; `emit` is called with each chunk of output as it becomes available.
    pub fn process(&mut self, mut input: &[f32], mut emit: impl FnMut(&[f32])) {
        let Some(inner) = self.inner.as_mut() else {
            if !input.is_empty() {
                emit(input);
            }
            return;
        };
        while !input.is_empty() {
            let need = inner.input_frames_next() - self.in_len;
            let take = need.min(input.len());
            self.in_buf[self.in_len..self.in_len + take].copy_from_slice(&input[..take]);
            self.in_len += take;
            input = &input[take..];
            if self.in_len == inner.input_frames_next() {
                let wave_in = [&self.in_buf[..self.in_len]];
                let mut wave_out = [&mut self.out_buf[..]];
                // Sizes are the resampler's own, so this cannot fail; on a bug drop the chunk.
                if let Ok((_, out_len)) = inner.process_into_buffer(&wave_in, &mut wave_out, None) {
                    emit(&self.out_buf[..out_len]);
                }
                self.in_len = 0;
            }
        }
    }

    /// Drop buffered input and the filter's state (after a flush).
    pub fn reset(&mut self) {
        self.in_len = 0;
        if let Some(r) = self.inner.as_mut() {
            r.reset();
        }
    }
}

/// Interleaved audio of any channel count -> mono (channels averaged) -> another rate. For the copies
/// of the speaker's output (the echo canceller's far end, the simulated room). Buffers sized in `new`
/// for blocks of up to `max_frames` frames.
pub struct MonoResampler {
    resampler: StreamResampler,
    mono: Vec<f32>,
    out: Vec<f32>,
}

impl MonoResampler {
    pub fn new(in_hz: u32, out_hz: u32, max_frames: usize) -> Result<Self, DspError> {
        Ok(MonoResampler {
            resampler: StreamResampler::new(in_hz, out_hz)?,
            mono: vec![0.0; max_frames],
            out: Vec::with_capacity(
                max_frames * (out_hz as usize).div_ceil(in_hz.max(1) as usize) + 4096,
            ),
        })
    }

    /// `input` (interleaved, `channels` channels, at most `max_frames` frames) at the output rate.
    pub fn process(&mut self, input: &[f32], channels: usize) -> &mut [f32] {
        let frames = super::downmix(
            input,
            channels,
            crate::config::ChannelSelect::Mix,
            &mut self.mono,
        );
        self.out.clear();
        let MonoResampler {
            resampler,
            mono,
            out,
        } = self;
        resampler.process(&mono[..frames], |o| out.extend_from_slice(o));
        &mut self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, hz: f32, secs: f32) -> Vec<f32> {
        (0..(rate as f32 * secs) as usize)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * hz * i as f32 / rate as f32).sin())
            .collect()
    }

    #[test]
    fn converts_rates_and_keeps_a_tone() {
        for (a, b) in [
            (48_000, 16_000),
            (44_100, 16_000),
            (16_000, 48_000),
            (22_050, 48_000),
        ] {
            let mut r = StreamResampler::new(a, b).expect("rates");
            let input = tone(a, 440.0, 1.0);
            let mut out = Vec::new();
            // Odd-sized pushes, as a device callback would deliver them.
            for c in input.chunks(333) {
                r.process(c, |o| out.extend_from_slice(o));
            }
            let expect = b as usize;
            assert!(
                out.len() <= expect && out.len() + 2 * (b as usize / 50) >= expect,
                "{a}->{b}: {}",
                out.len()
            );
            // Past the filter delay, the output is the same 440 Hz tone at the new rate.
            let d = r.delay_out();
            let reference = tone(b, 440.0, 1.0);
            let n = out.len() - d;
            let err: f32 = (0..n)
                .map(|i| (out[i + d] - reference[i]).powi(2))
                .sum::<f32>()
                / n as f32;
            let pow: f32 = reference[..n].iter().map(|x| x * x).sum::<f32>() / n as f32;
            let snr_db = 10.0 * (pow / err).log10();
            // Integer ratios align to the sample; others keep a fraction-of-a-sample delay that the
            // comparison counts as error, so their floor is lower.
            let floor = if a % b == 0 || b % a == 0 { 40.0 } else { 25.0 };
            assert!(snr_db > floor, "{a}->{b}: SNR {snr_db:.1} dB");
            let out_pow: f32 = out[d..].iter().map(|x| x * x).sum::<f32>() / n as f32;
            assert!(
                (out_pow / pow - 1.0).abs() < 0.02,
                "{a}->{b}: level changed"
            );
        }
    }

    #[test]
    fn equal_rates_pass_through() {
        let mut r = StreamResampler::new(16_000, 16_000).expect("rates");
        let mut out = Vec::new();
        r.process(&[0.1, 0.2], |o| out.extend_from_slice(o));
        assert_eq!(out, vec![0.1, 0.2]);
    }
}
