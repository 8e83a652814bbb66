//! The uplink pipeline: device input (any rate, any channel count, f32 interleaved) -> mono -> 16 kHz
//! -> VAD with hysteresis -> pre-roll -> Opus frames. The worker and the benchmarks run this same code.
//!
//! Streaming: Opus frames are produced from the moment speech starts (pre-roll included) until the
//! turn machine says the turn is over (`stop_stream`), so pauses inside a turn reach the agent too. A
//! stream that is never stopped ends by itself after `max_stream_ms`.
//!
//! Context: DSP worker thread. All buffers are sized in `new`; `process` does not allocate.

use crate::audio::StreamFormat;
use crate::config::{ChannelSelect, OpusConfig, VadConfig};

use super::codec::{MAX_PACKET_BYTES, OpusEncoder, UPLINK_RATE_HZ};
use super::resample::StreamResampler;
use super::vad::{PcmRing, VadEngine, VadEvent, VadStage, ms_to_samples};
use super::{DspError, downmix, to_i16};

/// Largest input block `process` accepts in one call, in frames; larger blocks are split.
const MAX_BLOCK_FRAMES: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkSettings {
    pub input: StreamFormat,
    pub channel: ChannelSelect,
    pub vad: VadConfig,
    pub opus: OpusConfig,
    pub preroll_ms: u32,
    /// Safety cap on one stream when nobody calls `stop_stream`.
    pub max_stream_ms: u32,
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
            vad: VadStage::new(engine, s.vad.start_ms, s.vad.hangover_ms),
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
        })
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

    /// Run VAD, pre-roll and the encoder over `self.pcm[..n]` (16 kHz).
    fn process_pcm(&mut self, n: usize, emit: &mut dyn FnMut(UplinkEvent<'_>)) {
        // Work in 10 ms pieces so speech start is acted on promptly.
        let mut off = 0;
        while off < n {
            let len = (n - off).min(160);
            let start = self.pos;
            let end = start + len as u64;
            if self.streaming {
                self.encode_range(off, len, start, emit);
            }
            self.preroll.push(&self.pcm[off..off + len]);
            let mut started = None;
            let mut ended = None;
            self.vad.push(&self.pcm[off..off + len], |e| match e {
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
            off += len;
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

    fn encode_range(
        &mut self,
        off: usize,
        len: usize,
        start: u64,
        emit: &mut dyn FnMut(UplinkEvent<'_>),
    ) {
        let mut done = 0;
        while done < len {
            let take = (self.frame.len() - self.frame_fill).min(len - done);
            self.frame[self.frame_fill..self.frame_fill + take]
                .copy_from_slice(&self.pcm[off + done..off + done + take]);
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
