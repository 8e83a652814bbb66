//! File-backed devices: `WavCapture` (a WAV file as the microphone, paced in real time or as fast as the
//! DSP worker takes it) and `WavPlayback` / `MemoryPlayback` / `NullPlayback` (what the speaker would
//! have played). They stand in for a sound card, so each runs a clock thread that calls the same
//! `// RT-SAFE:` ring functions a cpal callback calls, one period at a time.
//!
//! In fast mode there is no wall clock: the capture thread pushes as fast as the ring drains, and
//! playback renders exactly as many frames as capture has produced (converted to its own rate), so the
//! output file lines up with the input. After the input ends, playback renders only what is queued.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{
    Capture, CaptureWriter, DeviceError, DeviceFactory, DeviceStatus, Playback, PlaybackReader,
    RunningStream, StreamFormat,
};

/// How a file device's clock runs.
#[derive(Debug, Clone)]
pub enum Pacing {
    /// One period per period of wall time, like a sound card.
    Realtime,
    /// As fast as the consumer allows; capture and playback share this clock.
    Fast(Arc<FileClock>),
}

/// Shared clock of the fast file devices: seconds of input produced so far, as a frame count.
#[derive(Debug, Default)]
pub struct FileClock {
    input_frames: AtomicU64,
    input_rate_hz: AtomicU64,
    input_done: AtomicBool,
}

impl FileClock {
    fn input_seconds_x(&self, rate_hz: u32) -> u64 {
        let in_rate = self.input_rate_hz.load(Ordering::Acquire).max(1);
        self.input_frames.load(Ordering::Acquire) * rate_hz as u64 / in_rate
    }
}

const PERIOD_MS: u32 = 10;

/// A WAV file as the microphone.
pub struct WavCapture {
    path: PathBuf,
    reader: hound::WavReader<BufReader<File>>,
    pacing: Pacing,
    /// Extra silence appended after the file, so a turn that ends with the file can close.
    tail_ms: u32,
    /// A simulated room's echo of the speaker, added to the file's samples, and its delay in samples.
    air: Option<rtrb::Consumer<f32>>,
    air_delay: usize,
}

/// A simulated room for file runs (the demo): what the speaker plays reaches the mic again, late and
/// quieter, as it would from a real speaker next to a real mic. The echo canceller has to earn its
/// keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoomEcho {
    /// Speaker to mic, ms.
    pub delay_ms: u32,
    /// Level of the echo against what was played, dB (negative).
    pub gain_db: f32,
}

/// The speaker's end of the simulated room: mono, resampled to the mic's rate, attenuated.
struct AirOut {
    producer: rtrb::Producer<f32>,
    to_mic: crate::dsp::resample::MonoResampler,
    gain: f32,
}

impl AirOut {
    fn push(&mut self, played: &[f32], channels: usize) {
        let out = self.to_mic.process(played, channels);
        for x in out.iter_mut() {
            *x *= self.gain;
        }
        // A full room ring (the mic side stalled) just loses echo, which is harmless here.
        let _ = self.producer.push_partial_slice(out);
    }
}

impl WavCapture {
    pub fn open(path: &Path, pacing: Pacing, tail_ms: u32) -> Result<Self, DeviceError> {
        let reader = hound::WavReader::open(path).map_err(|source| DeviceError::Wav {
            path: path.display().to_string(),
            source,
        })?;
        let spec = reader.spec();
        let ok = match spec.sample_format {
            hound::SampleFormat::Int => matches!(spec.bits_per_sample, 8 | 16 | 24 | 32),
            hound::SampleFormat::Float => spec.bits_per_sample == 32,
        };
        if !ok || spec.channels == 0 {
            return Err(DeviceError::WavFormat {
                path: path.display().to_string(),
                message: format!(
                    "{:?} {} bit, {} channels",
                    spec.sample_format, spec.bits_per_sample, spec.channels
                ),
            });
        }
        Ok(WavCapture {
            path: path.to_path_buf(),
            reader,
            pacing,
            tail_ms,
            air: None,
            air_delay: 0,
        })
    }
}

/// Guard of a file device's clock thread: stops and joins it on drop.
struct ClockThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl RunningStream for ClockThread {}

impl Drop for ClockThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn spawn_clock(
    name: &str,
    body: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
) -> Result<ClockThread, DeviceError> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || body(s))
        .map_err(|e| DeviceError::Backend {
            kind: "file",
            name: name.into(),
            message: e.to_string(),
        })?;
    Ok(ClockThread {
        stop,
        handle: Some(handle),
    })
}

/// Sleep until `start + n * period`; returns false if asked to stop meanwhile.
fn pace(start: Instant, n: u64, stop: &AtomicBool) -> bool {
    let due = start + Duration::from_millis(n * PERIOD_MS as u64);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
    !stop.load(Ordering::Acquire)
}

impl Capture for WavCapture {
    fn format(&self) -> StreamFormat {
        let spec = self.reader.spec();
        StreamFormat {
            rate_hz: spec.sample_rate,
            channels: spec.channels,
        }
    }

    fn describe(&self) -> String {
        format!("WAV file {} ({})", self.path.display(), self.format())
    }

    fn start(
        self: Box<Self>,
        mut writer: CaptureWriter,
        status: Arc<DeviceStatus>,
    ) -> Result<Box<dyn RunningStream>, DeviceError> {
        let format = self.format();
        let spec = self.reader.spec();
        let period = (format.rate_hz * PERIOD_MS / 1000) as usize * format.channels as usize;
        let tail = (format.rate_hz as u64 * self.tail_ms as u64 / 1000) as usize
            * format.channels as usize;
        let pacing = self.pacing.clone();
        if let Pacing::Fast(clock) = &pacing {
            clock
                .input_rate_hz
                .store(format.rate_hz as u64, Ordering::Release);
        }
        let mut reader = self.reader;
        let mut air = self.air;
        let room_delay = self.air_delay;
        let channels = format.channels.max(1) as usize;
        let path = self.path.display().to_string();
        let guard = spawn_clock("hearken-wav-in", move |stop| {
            let mut samples = read_samples(&mut reader, spec, &path)
                .chain(std::iter::repeat_n(0.0f32, tail))
                .peekable();
            let mut buf = vec![0.0f32; period];
            let start = Instant::now();
            let mut n = 0u64;
            while samples.peek().is_some() {
                let mut len = 0;
                for slot in buf.iter_mut() {
                    match samples.next() {
                        Some(s) => {
                            *slot = s;
                            len += 1;
                        }
                        None => break,
                    }
                }
                match &pacing {
                    Pacing::Realtime => {
                        n += 1;
                        if !pace(start, n, &stop) {
                            return;
                        }
                    }
                    Pacing::Fast(_) => {
                        // Back-pressure instead of a clock: wait for the worker to make room.
                        while writer.space() < len {
                            if stop.load(Ordering::Acquire) {
                                return;
                            }
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                }
                if let Some(air) = &mut air {
                    // The room: the speaker's echo, one sample per frame, onto every channel. If the
                    // speaker's clock thread is late, wait for it (up to 100 ms): the two clocks then
                    // slip together and the echo's delay stays what the room says, as in a real room.
                    let frames = len / channels;
                    let waited = Instant::now();
                    while air.slots() < frames
                        && waited.elapsed() < Duration::from_millis(100)
                        && !stop.load(Ordering::Acquire)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    // After a long stall the speaker side may have pushed more than the room holds:
                    // drop the surplus so the delay goes back to what the room says.
                    let surplus = air.slots().saturating_sub(room_delay + 2 * frames);
                    if surplus > 0
                        && let Ok(chunk) = air.read_chunk(surplus)
                    {
                        chunk.commit_all();
                    }
                    for f in buf[..len].chunks_mut(channels) {
                        let e = air.pop().unwrap_or(0.0);
                        for x in f {
                            *x = (*x + e).clamp(-1.0, 1.0);
                        }
                    }
                }
                writer.push(&buf[..len]);
                if let Pacing::Fast(clock) = &pacing {
                    clock
                        .input_frames
                        .fetch_add((len / format.channels as usize) as u64, Ordering::AcqRel);
                }
            }
            if let Pacing::Fast(clock) = &pacing {
                clock.input_done.store(true, Ordering::Release);
            }
            status.finished.store(true, Ordering::Release);
        })?;
        Ok(Box::new(guard))
    }
}

/// All samples of a WAV as f32 in [-1, 1]; a read error ends the stream with a log line.
fn read_samples<'a>(
    reader: &'a mut hound::WavReader<BufReader<File>>,
    spec: hound::WavSpec,
    path: &'a str,
) -> Box<dyn Iterator<Item = f32> + Send + 'a> {
    let log_err = move |e: hound::Error| {
        tracing::warn!(file = path, error = %e, "WAV read error; input ends here");
    };
    match spec.sample_format {
        hound::SampleFormat::Float => Box::new(
            reader
                .samples::<f32>()
                .map_while(move |s| s.map_err(log_err).ok()),
        ),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            Box::new(
                reader
                    .samples::<i32>()
                    .map_while(move |s| s.map_err(log_err).ok())
                    .map(move |s| s as f32 * scale),
            )
        }
    }
}

/// Where rendered output goes.
enum Sink {
    Wav {
        path: PathBuf,
        writer: hound::WavWriter<std::io::BufWriter<File>>,
    },
    Memory(Arc<Mutex<Vec<f32>>>),
    Null,
}

impl Sink {
    fn write(&mut self, samples: &[f32]) {
        match self {
            Sink::Wav { path, writer } => {
                for s in samples {
                    let v = (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
                    if let Err(e) = writer.write_sample(v) {
                        tracing::error!(file = %path.display(), error = %e, "cannot write output WAV");
                        break;
                    }
                }
            }
            Sink::Memory(buf) => {
                if let Ok(mut b) = buf.lock() {
                    b.extend_from_slice(samples);
                }
            }
            Sink::Null => {}
        }
    }

    fn finish(self) {
        if let Sink::Wav { path, writer } = self
            && let Err(e) = writer.finalize()
        {
            tracing::error!(file = %path.display(), error = %e, "cannot finish output WAV");
        }
    }
}

/// A file-like speaker: WAV file, memory buffer or nothing.
pub struct FilePlayback {
    sink: Sink,
    format: StreamFormat,
    pacing: Pacing,
    label: String,
    air: Option<AirOut>,
}

/// Shorthand constructors, named after what they play into.
pub struct WavPlayback;
pub struct MemoryPlayback;
pub struct NullPlayback;

impl WavPlayback {
    /// Write what would have played to `path` (16-bit PCM).
    pub fn create(
        path: &Path,
        format: StreamFormat,
        pacing: Pacing,
    ) -> Result<FilePlayback, DeviceError> {
        let spec = hound::WavSpec {
            channels: format.channels,
            sample_rate: format.rate_hz,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::create(path, spec).map_err(|source| DeviceError::Wav {
            path: path.display().to_string(),
            source,
        })?;
        Ok(FilePlayback {
            sink: Sink::Wav {
                path: path.to_path_buf(),
                writer,
            },
            format,
            pacing,
            label: format!("WAV file {}", path.display()),
            air: None,
        })
    }
}

impl MemoryPlayback {
    /// Collect what would have played in `buffer` (interleaved f32).
    pub fn create(
        buffer: Arc<Mutex<Vec<f32>>>,
        format: StreamFormat,
        pacing: Pacing,
    ) -> FilePlayback {
        FilePlayback {
            sink: Sink::Memory(buffer),
            format,
            pacing,
            label: "memory".into(),
            air: None,
        }
    }
}

impl NullPlayback {
    pub fn create(format: StreamFormat, pacing: Pacing) -> FilePlayback {
        FilePlayback {
            sink: Sink::Null,
            format,
            pacing,
            label: "null".into(),
            air: None,
        }
    }
}

impl Playback for FilePlayback {
    fn format(&self) -> StreamFormat {
        self.format
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.label, self.format)
    }

    fn start(
        self: Box<Self>,
        mut reader: PlaybackReader,
        _status: Arc<DeviceStatus>,
    ) -> Result<Box<dyn RunningStream>, DeviceError> {
        let format = self.format;
        let frames = (format.rate_hz * PERIOD_MS / 1000) as u64;
        let period = frames as usize * format.channels as usize;
        let pacing = self.pacing;
        let mut sink = self.sink;
        let mut air = self.air;
        let channels = format.channels.max(1) as usize;
        let shared = reader.shared().clone();
        let guard = spawn_clock("hearken-file-out", move |stop| {
            let mut buf = vec![0.0f32; period];
            let start = Instant::now();
            let mut n = 0u64;
            loop {
                match &pacing {
                    Pacing::Realtime => {
                        n += 1;
                        if !pace(start, n, &stop) {
                            break;
                        }
                    }
                    Pacing::Fast(clock) => {
                        // Render no further than the input has got; after it ends, only what is queued.
                        loop {
                            let stopping = stop.load(Ordering::Acquire);
                            let behind = clock.input_seconds_x(format.rate_hz) >= (n + 1) * frames;
                            let done = clock.input_done.load(Ordering::Acquire);
                            if behind || (done && shared.queued_samples() > 0) {
                                break;
                            }
                            if stopping {
                                sink.finish();
                                return;
                            }
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        n += 1;
                    }
                }
                reader.render(&mut buf);
                if let Some(air) = &mut air {
                    air.push(&buf, channels);
                }
                sink.write(&buf);
            }
            sink.finish();
        })?;
        Ok(Box::new(guard))
    }
}

/// Device factory for file-based runs: a WAV as the mic and a file-like speaker.
pub struct FileDevices {
    pub input: Option<PathBuf>,
    pub output: OutputKind,
    pub output_format: StreamFormat,
    pub pacing: Pacing,
    pub tail_ms: u32,
    opened_input: bool,
    room: Option<RoomEcho>,
    /// The room ring's speaker end and the mic's rate, between opening the mic and the speaker.
    air_producer: Option<(rtrb::Producer<f32>, u32)>,
}

/// Where a file-based run's speaker goes.
#[derive(Clone)]
pub enum OutputKind {
    Wav(PathBuf),
    Memory(Arc<Mutex<Vec<f32>>>),
    Null,
}

impl FileDevices {
    pub fn new(
        input: Option<PathBuf>,
        output: OutputKind,
        output_format: StreamFormat,
        pacing: Pacing,
        tail_ms: u32,
    ) -> Self {
        FileDevices {
            input,
            output,
            output_format,
            pacing,
            tail_ms,
            opened_input: false,
            room: None,
            air_producer: None,
        }
    }

    /// Put the mic and the speaker in a simulated room (real-time pacing only).
    pub fn with_room(mut self, room: RoomEcho) -> Self {
        self.room = Some(room);
        self
    }
}

impl DeviceFactory for FileDevices {
    fn open_capture(&mut self) -> Result<Box<dyn Capture>, DeviceError> {
        let Some(input) = &self.input else {
            return Err(DeviceError::NotFound {
                kind: "input",
                wanted: "(no input file given)".into(),
            });
        };
        if self.opened_input {
            // A file is played once; a second open would replay it.
            return Err(DeviceError::WavFormat {
                path: input.display().to_string(),
                message: "input already consumed".into(),
            });
        }
        self.opened_input = true;
        let mut cap = WavCapture::open(input, self.pacing.clone(), self.tail_ms)?;
        if let Some(room) = self.room {
            let rate = cap.format().rate_hz;
            // One second of room, primed with the delay's worth of silence.
            let (mut p, c) = rtrb::RingBuffer::new(rate as usize);
            let delay = (rate as u64 * u64::from(room.delay_ms) / 1000) as usize;
            for _ in 0..delay.min(rate as usize / 2) {
                let _ = p.push(0.0);
            }
            self.air_producer = Some((p, rate));
            cap.air = Some(c);
            cap.air_delay = delay;
        }
        Ok(Box::new(cap))
    }

    fn open_playback(&mut self) -> Result<Box<dyn Playback>, DeviceError> {
        let f = self.output_format;
        let mut out = match &self.output {
            OutputKind::Wav(p) => WavPlayback::create(p, f, self.pacing.clone())?,
            OutputKind::Memory(b) => MemoryPlayback::create(b.clone(), f, self.pacing.clone()),
            OutputKind::Null => NullPlayback::create(f, self.pacing.clone()),
        };
        if let (Some(room), Some((producer, mic_rate))) = (self.room, self.air_producer.take()) {
            let period = (f.rate_hz * PERIOD_MS / 1000) as usize;
            let to_mic = crate::dsp::resample::MonoResampler::new(f.rate_hz, mic_rate, period)
                .map_err(|e| DeviceError::Backend {
                    kind: "file",
                    name: "room".into(),
                    message: e.to_string(),
                })?;
            out.air = Some(AirOut {
                producer,
                to_mic,
                gain: 10f32.powf(room.gain_db / 20.0),
            });
        }
        Ok(Box::new(out))
    }
}
