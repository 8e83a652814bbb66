//! Sound-card devices through cpal (ALSA on Linux). This is the only module that imports cpal.
//!
//! Context: device selection, `open`, `start` and [`list_devices`] run on the DSP worker (or on the CLI's
//! main thread for `hearken devices`). The data callbacks run on cpal's own audio threads and do nothing
//! but call [`input_callback`] / [`output_callback`], which only use the `// RT-SAFE:` ring functions of
//! [`super::rt`]. The error callbacks run on those threads too, outside the data path: they bump the
//! xrun counter, log (rate-limited) and raise [`DeviceStatus::failed`] when the device is gone.
//!
//! Any sample format and channel count cpal offers is accepted; samples are f32 everywhere else.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use ::cpal::{
    BufferSize, BuildStreamError, FromSample, Sample, SampleFormat, SampleRate, SizedSample,
    StreamConfig, StreamError, SupportedBufferSize, SupportedStreamConfig,
    SupportedStreamConfigRange,
};

use super::{
    Capture, CaptureWriter, DeviceError, DeviceFactory, DeviceStatus, Playback, PlaybackReader,
    RtCounters, RunningStream, StreamFormat,
};
use crate::config::AudioConfig;

/// Frames of f32 scratch the output callback renders into before converting to a non-f32 device
/// format. Larger device buffers are handled in several chunks, so this only needs to be generous.
const SCRATCH_FRAMES: usize = 8192;

/// Consecutive stream errors without any audio moving in between after which the device is taken
/// as gone. ALSA reports an unplugged card as an endless stream of POLLERR / ENODEV errors rather
/// than `DeviceNotAvailable`.
const MAX_ERRORS_WITHOUT_PROGRESS: u32 = 64;

/// Rates tried, after the requested one and the device default, before giving up on an exact rate.
const FALLBACK_RATES_HZ: [u32; 3] = [48_000, 44_100, 16_000];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Input,
    Output,
}

impl Direction {
    fn kind(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Real-time callback bodies
// ---------------------------------------------------------------------------------------------

/// Body of the input data callback: convert one buffer of device samples to f32 into the ring.
// RT-SAFE: one call to `CaptureWriter::push_converted` (per-sample arithmetic straight into the
// ring's preallocated storage, relaxed atomics); no allocation, lock or log.
pub fn input_callback<T>(writer: &mut CaptureWriter, data: &[T])
where
    T: Sample,
    f32: FromSample<T>,
{
    writer.push_converted(data, |s| f32::from_sample(s));
}

/// Body of the output data callback: render f32 from the ring into `scratch`, convert into `out`.
///
/// `scratch` is preallocated by the caller; its length must be a multiple of the channel count.
/// Device buffers longer than `scratch` are rendered in several chunks. Samples are clamped to
/// [-1, 1] first, so integer formats saturate instead of wrapping (24-bit samples would otherwise
/// spill into the padding byte).
// RT-SAFE: `PlaybackReader::render` on a slice of the preallocated scratch, then in-place
// conversion; no allocation, lock or log.
pub fn output_callback<T>(reader: &mut PlaybackReader, scratch: &mut [f32], out: &mut [T])
where
    T: Sample + FromSample<f32>,
{
    if scratch.is_empty() {
        // A wiring bug, not a device condition: play silence rather than panic in the callback.
        out.fill(T::EQUILIBRIUM);
        return;
    }
    for chunk in out.chunks_mut(scratch.len()) {
        let rendered = &mut scratch[..chunk.len()];
        reader.render(rendered);
        for (dst, src) in chunk.iter_mut().zip(rendered.iter()) {
            *dst = T::from_sample(src.clamp(-1.0, 1.0));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Device selection (pure part first)
// ---------------------------------------------------------------------------------------------

/// Pick a device from `names` (in `hearken devices` order): an integer is an index; otherwise an
/// exact name, then an exact name ignoring case, then a unique case-insensitive substring.
/// "default" is handled by the caller (the host's default device need not be in the list).
fn match_device(names: &[String], wanted: &str, kind: &'static str) -> Result<usize, DeviceError> {
    let wanted = wanted.trim();
    let not_found = || DeviceError::NotFound {
        kind,
        wanted: wanted.to_string(),
    };
    if let Ok(index) = wanted.parse::<i64>() {
        return usize::try_from(index)
            .ok()
            .filter(|&i| i < names.len())
            .ok_or_else(not_found);
    }
    let pick = |hits: Vec<usize>| -> Result<Option<usize>, DeviceError> {
        match hits.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            many => Err(DeviceError::Ambiguous {
                kind,
                wanted: wanted.to_string(),
                matches: many
                    .iter()
                    .map(|&i| format!("[{i}] \"{}\"", names[i]))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    };
    let positions = |pred: &dyn Fn(&str) -> bool| -> Vec<usize> {
        names
            .iter()
            .enumerate()
            .filter(|(_, n)| pred(n))
            .map(|(i, _)| i)
            .collect()
    };
    if let Some(i) = pick(positions(&|n| n == wanted))? {
        return Ok(i);
    }
    let lower = wanted.to_lowercase();
    if let Some(i) = pick(positions(&|n| n.to_lowercase() == lower))? {
        return Ok(i);
    }
    if lower.is_empty() {
        return Err(not_found());
    }
    pick(positions(&|n| n.to_lowercase().contains(&lower)))?.ok_or_else(not_found)
}

fn is_default(wanted: &str) -> bool {
    let wanted = wanted.trim();
    wanted.is_empty() || wanted == "default"
}

fn backend_error(dir: Direction, name: &str, err: impl std::fmt::Display) -> DeviceError {
    DeviceError::Backend {
        kind: dir.kind(),
        name: name.to_string(),
        message: err.to_string(),
    }
}

/// The host's input (resp. output) devices with their names, in enumeration order: the indices
/// `hearken devices` prints and `input_device = "2"` refers to.
fn device_list(
    host: &::cpal::Host,
    dir: Direction,
) -> Result<Vec<(String, ::cpal::Device)>, DeviceError> {
    let devices = match dir {
        Direction::Input => host.input_devices(),
        Direction::Output => host.output_devices(),
    }
    .map_err(|e| backend_error(dir, host.id().name(), e))?;
    Ok(devices
        .enumerate()
        .map(|(i, d)| {
            let name = d
                .name()
                .unwrap_or_else(|e| format!("<unnamed device {i}: {e}>"));
            (name, d)
        })
        .collect())
}

fn default_device(host: &::cpal::Host, dir: Direction) -> Option<::cpal::Device> {
    match dir {
        Direction::Input => host.default_input_device(),
        Direction::Output => host.default_output_device(),
    }
}

fn find_device(
    host: &::cpal::Host,
    dir: Direction,
    wanted: &str,
) -> Result<(String, ::cpal::Device), DeviceError> {
    if is_default(wanted) {
        let device = default_device(host, dir).ok_or_else(|| DeviceError::NotFound {
            kind: dir.kind(),
            wanted: wanted.to_string(),
        })?;
        let name = device.name().unwrap_or_else(|_| "default".to_string());
        return Ok((name, device));
    }
    let mut list = device_list(host, dir)?;
    let names: Vec<String> = list.iter().map(|(n, _)| n.clone()).collect();
    let index = match_device(&names, wanted, dir.kind())?;
    Ok(list.swap_remove(index))
}

/// Find an input device: "default", an index from `hearken devices`, an exact name or a unique
/// case-insensitive substring of one.
fn find_input(host: &::cpal::Host, wanted: &str) -> Result<(String, ::cpal::Device), DeviceError> {
    find_device(host, Direction::Input, wanted)
}

/// Find an output device, chosen like [`find_input`].
fn find_output(host: &::cpal::Host, wanted: &str) -> Result<(String, ::cpal::Device), DeviceError> {
    find_device(host, Direction::Output, wanted)
}

// ---------------------------------------------------------------------------------------------
// Stream configuration (pure)
// ---------------------------------------------------------------------------------------------

/// Preference among the sample formats we can convert; `None` for a format this build cannot
/// handle (cpal's `SampleFormat` is non-exhaustive).
fn format_rank(format: SampleFormat) -> Option<u8> {
    Some(match format {
        SampleFormat::F32 => 10,
        SampleFormat::I16 => 9,
        SampleFormat::I32 => 8,
        SampleFormat::I24 => 7,
        SampleFormat::F64 => 6,
        SampleFormat::U16 => 5,
        SampleFormat::I8 => 4,
        SampleFormat::U8 => 3,
        SampleFormat::U32 => 2,
        SampleFormat::I64 => 1,
        SampleFormat::U64 => 0,
        _ => return None,
    })
}

/// Choose a stream configuration: the requested rate if nonzero and offered, else the device's
/// default rate, else a common rate, else the offered rate nearest 48 kHz. Among the ranges that
/// have the rate, prefer the default config's channel count and format, then the better format,
/// then fewer channels.
fn choose_config(
    ranges: &[SupportedStreamConfigRange],
    requested_hz: u32,
    default: Option<&SupportedStreamConfig>,
) -> Option<SupportedStreamConfig> {
    let usable: Vec<&SupportedStreamConfigRange> = ranges
        .iter()
        .filter(|r| r.channels() > 0 && format_rank(r.sample_format()).is_some())
        .collect();
    let score = |r: &SupportedStreamConfigRange| {
        (
            default.is_some_and(|d| d.channels() == r.channels()),
            default.is_some_and(|d| d.sample_format() == r.sample_format()),
            format_rank(r.sample_format()).unwrap_or(0),
            std::cmp::Reverse(r.channels()),
        )
    };
    let targets = [requested_hz]
        .into_iter()
        .chain(default.map(|d| d.sample_rate().0))
        .chain(FALLBACK_RATES_HZ)
        .filter(|&hz| hz > 0);
    for hz in targets {
        let rate = SampleRate(hz);
        let best = usable
            .iter()
            .filter(|r| r.min_sample_rate() <= rate && rate <= r.max_sample_rate())
            .max_by_key(|r| score(r));
        if let Some(r) = best {
            return (**r).try_with_sample_rate(rate);
        }
    }
    let best = usable.into_iter().max_by_key(|r| score(r))?;
    let hz = FALLBACK_RATES_HZ[0].clamp(best.min_sample_rate().0, best.max_sample_rate().0);
    best.try_with_sample_rate(SampleRate(hz))
}

/// One period of `period_ms` as a fixed buffer size, if the device allows it.
fn buffer_size(supported: &SupportedBufferSize, rate_hz: u32, period_ms: u32) -> BufferSize {
    let frames = u64::from(rate_hz) * u64::from(period_ms) / 1000;
    match (supported, u32::try_from(frames)) {
        (SupportedBufferSize::Range { min, max }, Ok(frames))
            if frames > 0 && *min <= frames && frames <= *max =>
        {
            BufferSize::Fixed(frames)
        }
        _ => BufferSize::Default,
    }
}

/// Describe a device's configuration ranges compactly: ALSA plug devices list every channel count
/// times every format (hundreds of ranges), so ranges that differ only in channels or format are
/// merged into one line such as "1-32 ch, 4000-192000 Hz, i16/i32/f32, buffer 1-65536 frames".
fn summarize_ranges(ranges: &[SupportedStreamConfigRange]) -> Vec<String> {
    type Common = (u32, u32, SupportedBufferSize);
    let common = |r: &SupportedStreamConfigRange| -> Common {
        (
            r.min_sample_rate().0,
            r.max_sample_rate().0,
            *r.buffer_size(),
        )
    };
    // Channel counts per (rates, buffer, format), then formats per (rates, buffer, channel set).
    let mut by_format: Vec<(Common, SampleFormat, Vec<u16>)> = Vec::new();
    for r in ranges {
        let key = (common(r), r.sample_format());
        match by_format.iter_mut().find(|(c, f, _)| (*c, *f) == key) {
            Some((_, _, channels)) => channels.push(r.channels()),
            None => by_format.push((key.0, key.1, vec![r.channels()])),
        }
    }
    let mut by_channels: Vec<(Common, Vec<u16>, Vec<SampleFormat>)> = Vec::new();
    for (c, format, mut channels) in by_format {
        channels.sort_unstable();
        channels.dedup();
        match by_channels
            .iter_mut()
            .find(|(c2, ch2, _)| *c2 == c && *ch2 == channels)
        {
            Some((_, _, formats)) => formats.push(format),
            None => by_channels.push((c, channels, vec![format])),
        }
    }
    by_channels
        .into_iter()
        .map(|((min, max, buffer), channels, formats)| {
            let rates = if min == max {
                format!("{min} Hz")
            } else {
                format!("{min}-{max} Hz")
            };
            let buffer = match buffer {
                SupportedBufferSize::Range { min, max } => format!("buffer {min}-{max} frames"),
                SupportedBufferSize::Unknown => "buffer size unknown".to_string(),
            };
            let formats: Vec<String> = formats.iter().map(ToString::to_string).collect();
            format!(
                "{} ch, {rates}, {}, {buffer}",
                compress_runs(&channels),
                formats.join("/")
            )
        })
        .collect()
}

/// "1-4, 6, 8" for [1, 2, 3, 4, 6, 8] (input sorted and deduplicated).
fn compress_runs(values: &[u16]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            values[i].to_string()
        } else {
            format!("{}-{}", values[i], values[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// True if a backend error text says the device has disappeared (USB card unplugged).
fn is_device_gone(description: &str) -> bool {
    let d = description.to_lowercase();
    d.contains("enodev") || d.contains("no such device")
}

// ---------------------------------------------------------------------------------------------
// Opening and starting
// ---------------------------------------------------------------------------------------------

/// A device with its chosen configuration, not yet streaming.
struct Opened {
    device: ::cpal::Device,
    name: String,
    config: StreamConfig,
    sample_format: SampleFormat,
}

impl Opened {
    fn open(
        dir: Direction,
        wanted: &str,
        requested_hz: u32,
        period_ms: u32,
    ) -> Result<Self, DeviceError> {
        let host = ::cpal::default_host();
        let (name, device) = match dir {
            Direction::Input => find_input(&host, wanted)?,
            Direction::Output => find_output(&host, wanted)?,
        };
        let (ranges, default) = match dir {
            Direction::Input => (
                device
                    .supported_input_configs()
                    .map(|r| r.collect::<Vec<_>>()),
                device.default_input_config().ok(),
            ),
            Direction::Output => (
                device
                    .supported_output_configs()
                    .map(|r| r.collect::<Vec<_>>()),
                device.default_output_config().ok(),
            ),
        };
        let ranges = ranges.map_err(|e| backend_error(dir, &name, e))?;
        let chosen = choose_config(&ranges, requested_hz, default.as_ref()).ok_or_else(|| {
            DeviceError::Unsupported {
                kind: dir.kind(),
                name: name.clone(),
                message: if ranges.is_empty() {
                    "it lists no configurations".to_string()
                } else {
                    summarize_ranges(&ranges).join("; ")
                },
            }
        })?;
        let rate_hz = chosen.sample_rate().0;
        if requested_hz != 0 && rate_hz != requested_hz {
            tracing::warn!(
                device = %name,
                requested_hz,
                rate_hz,
                "{} device does not offer the requested rate; using its rate",
                dir.kind()
            );
        }
        let config = StreamConfig {
            channels: chosen.channels(),
            sample_rate: chosen.sample_rate(),
            buffer_size: buffer_size(chosen.buffer_size(), rate_hz, period_ms),
        };
        tracing::debug!(device = %name, ?config, format = %chosen.sample_format(), "{} device opened", dir.kind());
        Ok(Opened {
            device,
            name,
            config,
            sample_format: chosen.sample_format(),
        })
    }

    fn format(&self) -> StreamFormat {
        StreamFormat {
            rate_hz: self.config.sample_rate.0,
            channels: self.config.channels,
        }
    }

    fn describe(&self) -> String {
        let period = match self.config.buffer_size {
            BufferSize::Fixed(frames) => format!("{frames} frames"),
            BufferSize::Default => "default".to_string(),
        };
        format!(
            "{} ({}, {}, period {period})",
            self.name,
            self.format(),
            self.sample_format
        )
    }

    fn build_error(&self, dir: Direction, err: BuildStreamError) -> DeviceError {
        match err {
            BuildStreamError::StreamConfigNotSupported | BuildStreamError::InvalidArgument => {
                DeviceError::Unsupported {
                    kind: dir.kind(),
                    name: self.name.clone(),
                    message: format!("{} {}: {err}", self.format(), self.sample_format),
                }
            }
            other => backend_error(dir, &self.name, other),
        }
    }

    fn unsupported_format(&self, dir: Direction) -> DeviceError {
        DeviceError::Unsupported {
            kind: dir.kind(),
            name: self.name.clone(),
            message: format!("sample format {}", self.sample_format),
        }
    }
}

/// The error callback: counts xruns, logs the first and then every power-of-two-th, and marks the
/// device failed when it is gone (explicitly, or by a run of errors with no audio moving).
fn error_handler(
    dir: Direction,
    name: String,
    status: Arc<DeviceStatus>,
    counters: Arc<RtCounters>,
) -> impl FnMut(StreamError) + Send + 'static {
    let progress = move |c: &RtCounters| match dir {
        Direction::Input => c.captured_frames.load(Ordering::Relaxed),
        Direction::Output => c.rendered_frames.load(Ordering::Relaxed),
    };
    let mut last_progress = progress(&counters);
    let mut errors_since_progress = 0u32;
    move |err: StreamError| {
        let now = progress(&counters);
        if now != last_progress {
            last_progress = now;
            errors_since_progress = 0;
        }
        errors_since_progress = errors_since_progress.saturating_add(1);
        let gone = match &err {
            StreamError::DeviceNotAvailable => true,
            StreamError::BackendSpecific { err } => is_device_gone(&err.description),
        };
        if gone || errors_since_progress >= MAX_ERRORS_WITHOUT_PROGRESS {
            if !status.failed.swap(true, Ordering::AcqRel) {
                tracing::warn!(device = %name, "{} device failed: {err}", dir.kind());
            }
            return;
        }
        let n = counters.xruns.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(device = %name, xruns = n, "{} stream error: {err}", dir.kind());
        }
    }
}

/// A running cpal stream; dropping it stops the device.
struct CpalStream {
    _stream: ::cpal::Stream,
}

impl RunningStream for CpalStream {}

fn build_input<T>(
    opened: &Opened,
    mut writer: CaptureWriter,
    on_error: impl FnMut(StreamError) + Send + 'static,
) -> Result<::cpal::Stream, BuildStreamError>
where
    T: SizedSample,
    f32: FromSample<T>,
{
    opened.device.build_input_stream(
        &opened.config,
        move |data: &[T], _: &::cpal::InputCallbackInfo| input_callback(&mut writer, data),
        on_error,
        None,
    )
}

fn build_output<T>(
    opened: &Opened,
    mut reader: PlaybackReader,
    on_error: impl FnMut(StreamError) + Send + 'static,
) -> Result<::cpal::Stream, BuildStreamError>
where
    T: SizedSample + FromSample<f32>,
{
    // Allocated here, once; the callback only borrows it.
    let mut scratch = vec![0.0f32; SCRATCH_FRAMES * usize::from(opened.config.channels.max(1))];
    opened.device.build_output_stream(
        &opened.config,
        move |out: &mut [T], _: &::cpal::OutputCallbackInfo| {
            output_callback(&mut reader, &mut scratch, out)
        },
        on_error,
        None,
    )
}

fn build_output_f32(
    opened: &Opened,
    mut reader: PlaybackReader,
    on_error: impl FnMut(StreamError) + Send + 'static,
) -> Result<::cpal::Stream, BuildStreamError> {
    opened.device.build_output_stream(
        &opened.config,
        // RT-SAFE: `PlaybackReader::render` straight into the device buffer.
        move |out: &mut [f32], _: &::cpal::OutputCallbackInfo| reader.render(out),
        on_error,
        None,
    )
}

fn play(
    opened: &Opened,
    dir: Direction,
    stream: ::cpal::Stream,
) -> Result<Box<dyn RunningStream>, DeviceError> {
    stream
        .play()
        .map_err(|e| backend_error(dir, &opened.name, e))?;
    tracing::info!(device = %opened.describe(), "{} stream started", dir.kind());
    Ok(Box::new(CpalStream { _stream: stream }))
}

/// A sound-card microphone.
pub struct CpalCapture {
    opened: Opened,
}

impl CpalCapture {
    /// Open `cfg.input_device` at `cfg.input_rate_hz` (0: the device default) with a period of
    /// `cfg.period_ms` if the device allows it. Blocks only while ALSA probes the device.
    pub fn open(cfg: &AudioConfig) -> Result<Self, DeviceError> {
        Ok(CpalCapture {
            opened: Opened::open(
                Direction::Input,
                &cfg.input_device,
                cfg.input_rate_hz,
                cfg.period_ms,
            )?,
        })
    }
}

impl Capture for CpalCapture {
    fn format(&self) -> StreamFormat {
        self.opened.format()
    }

    fn describe(&self) -> String {
        self.opened.describe()
    }

    fn start(
        self: Box<Self>,
        writer: CaptureWriter,
        status: Arc<DeviceStatus>,
    ) -> Result<Box<dyn RunningStream>, DeviceError> {
        let dir = Direction::Input;
        let o = &self.opened;
        let on_error = error_handler(dir, o.name.clone(), status, writer.counters());
        let built = match o.sample_format {
            SampleFormat::I8 => build_input::<i8>(o, writer, on_error),
            SampleFormat::I16 => build_input::<i16>(o, writer, on_error),
            SampleFormat::I24 => build_input::<::cpal::I24>(o, writer, on_error),
            SampleFormat::I32 => build_input::<i32>(o, writer, on_error),
            SampleFormat::I64 => build_input::<i64>(o, writer, on_error),
            SampleFormat::U8 => build_input::<u8>(o, writer, on_error),
            SampleFormat::U16 => build_input::<u16>(o, writer, on_error),
            SampleFormat::U32 => build_input::<u32>(o, writer, on_error),
            SampleFormat::U64 => build_input::<u64>(o, writer, on_error),
            SampleFormat::F32 => build_input::<f32>(o, writer, on_error),
            SampleFormat::F64 => build_input::<f64>(o, writer, on_error),
            _ => return Err(o.unsupported_format(dir)),
        };
        let stream = built.map_err(|e| o.build_error(dir, e))?;
        play(o, dir, stream)
    }
}

/// A sound-card speaker.
pub struct CpalPlayback {
    opened: Opened,
}

impl CpalPlayback {
    /// Open `cfg.output_device` at `cfg.output_rate_hz` (0: the device default) with a period of
    /// `cfg.period_ms` if the device allows it. Blocks only while ALSA probes the device.
    pub fn open(cfg: &AudioConfig) -> Result<Self, DeviceError> {
        Ok(CpalPlayback {
            opened: Opened::open(
                Direction::Output,
                &cfg.output_device,
                cfg.output_rate_hz,
                cfg.period_ms,
            )?,
        })
    }
}

impl Playback for CpalPlayback {
    fn format(&self) -> StreamFormat {
        self.opened.format()
    }

    fn describe(&self) -> String {
        self.opened.describe()
    }

    fn start(
        self: Box<Self>,
        reader: PlaybackReader,
        status: Arc<DeviceStatus>,
    ) -> Result<Box<dyn RunningStream>, DeviceError> {
        let dir = Direction::Output;
        let o = &self.opened;
        let on_error = error_handler(dir, o.name.clone(), status, reader.counters());
        let built = match o.sample_format {
            SampleFormat::I8 => build_output::<i8>(o, reader, on_error),
            SampleFormat::I16 => build_output::<i16>(o, reader, on_error),
            SampleFormat::I24 => build_output::<::cpal::I24>(o, reader, on_error),
            SampleFormat::I32 => build_output::<i32>(o, reader, on_error),
            SampleFormat::I64 => build_output::<i64>(o, reader, on_error),
            SampleFormat::U8 => build_output::<u8>(o, reader, on_error),
            SampleFormat::U16 => build_output::<u16>(o, reader, on_error),
            SampleFormat::U32 => build_output::<u32>(o, reader, on_error),
            SampleFormat::U64 => build_output::<u64>(o, reader, on_error),
            SampleFormat::F32 => build_output_f32(o, reader, on_error),
            SampleFormat::F64 => build_output::<f64>(o, reader, on_error),
            _ => return Err(o.unsupported_format(dir)),
        };
        let stream = built.map_err(|e| o.build_error(dir, e))?;
        play(o, dir, stream)
    }
}

/// Opens the configured sound-card devices (again after each failure).
pub struct CpalDevices {
    cfg: AudioConfig,
}

impl CpalDevices {
    pub fn new(cfg: AudioConfig) -> Self {
        CpalDevices { cfg }
    }
}

impl DeviceFactory for CpalDevices {
    fn open_capture(&mut self) -> Result<Box<dyn Capture>, DeviceError> {
        Ok(Box::new(CpalCapture::open(&self.cfg)?))
    }

    fn open_playback(&mut self) -> Result<Box<dyn Playback>, DeviceError> {
        Ok(Box::new(CpalPlayback::open(&self.cfg)?))
    }
}

// ---------------------------------------------------------------------------------------------
// `hearken devices`
// ---------------------------------------------------------------------------------------------

/// Text for `hearken devices`: the host, then every input and output device with its index (what
/// `input_device = "N"` refers to), a `(default)` mark, and each configuration range it offers.
/// A machine without sound cards gets "(none)" lists, not an error. ALSA may print its own probing
/// complaints to stderr meanwhile.
pub fn list_devices() -> Result<String, DeviceError> {
    let host = ::cpal::default_host();
    let mut lines = vec![format!("Host: {}", host.id().name())];
    for (dir, title) in [
        (Direction::Input, "Inputs:"),
        (Direction::Output, "Outputs:"),
    ] {
        lines.push(title.to_string());
        let default_name = default_device(&host, dir).and_then(|d| d.name().ok());
        let list = match device_list(&host, dir) {
            Ok(list) => list,
            Err(e) => {
                lines.push(format!("  (cannot list devices: {e})"));
                continue;
            }
        };
        if list.is_empty() {
            lines.push("  (none)".to_string());
        }
        for (i, (name, device)) in list.iter().enumerate() {
            let mark = if default_name.as_deref() == Some(name.as_str()) {
                " (default)"
            } else {
                ""
            };
            lines.push(format!("  [{i}] {name}{mark}"));
            let ranges = match dir {
                Direction::Input => device.supported_input_configs().map(|r| r.collect()),
                Direction::Output => device.supported_output_configs().map(|r| r.collect()),
            };
            match ranges {
                Ok(ranges) => {
                    let ranges: Vec<SupportedStreamConfigRange> = ranges;
                    if ranges.is_empty() {
                        lines.push("      (no configurations)".to_string());
                    }
                    lines.extend(
                        summarize_ranges(&ranges)
                            .into_iter()
                            .map(|line| format!("      {line}")),
                    );
                }
                Err(e) => lines.push(format!("      (configurations unavailable: {e})")),
            }
        }
    }
    lines.push(String::new());
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::rt::{FlushHandle, capture_ring, playback_ring};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn alsa_like() -> Vec<String> {
        names(&[
            "default",
            "pipewire",
            "hw:CARD=USB,DEV=0",
            "plughw:CARD=USB,DEV=0",
            "hw:CARD=seeed2micvoicec,DEV=0",
            "Loopback",
        ])
    }

    #[test]
    fn matches_exact_name() {
        let n = alsa_like();
        assert_eq!(match_device(&n, "hw:CARD=USB,DEV=0", "input").ok(), Some(2));
        assert_eq!(match_device(&n, "  pipewire ", "input").ok(), Some(1));
    }

    #[test]
    fn exact_name_wins_over_substring() {
        let n = names(&["USB Mic", "USB Mic (2)"]);
        assert_eq!(match_device(&n, "USB Mic", "input").ok(), Some(0));
        // Exact ignoring case still beats substring.
        assert_eq!(match_device(&n, "usb mic", "input").ok(), Some(0));
    }

    #[test]
    fn matches_index() {
        let n = alsa_like();
        assert_eq!(match_device(&n, "0", "input").ok(), Some(0));
        assert_eq!(match_device(&n, "5", "input").ok(), Some(5));
        assert!(matches!(
            match_device(&n, "6", "input"),
            Err(DeviceError::NotFound { kind: "input", .. })
        ));
        assert!(matches!(
            match_device(&n, "-1", "output"),
            Err(DeviceError::NotFound { kind: "output", .. })
        ));
    }

    #[test]
    fn matches_unique_substring_ignoring_case() {
        let n = alsa_like();
        assert_eq!(match_device(&n, "SEEED", "input").ok(), Some(4));
        assert_eq!(match_device(&n, "loop", "input").ok(), Some(5));
    }

    #[test]
    fn ambiguous_substring_lists_every_match() {
        let n = alsa_like();
        match match_device(&n, "usb", "output") {
            Err(DeviceError::Ambiguous {
                kind,
                wanted,
                matches,
            }) => {
                assert_eq!(kind, "output");
                assert_eq!(wanted, "usb");
                assert!(matches.contains("[2] \"hw:CARD=USB,DEV=0\""), "{matches}");
                assert!(
                    matches.contains("[3] \"plughw:CARD=USB,DEV=0\""),
                    "{matches}"
                );
                assert!(!matches.contains("seeed"), "{matches}");
            }
            other => panic!("expected Ambiguous, got {other:?}"),
        }
    }

    #[test]
    fn duplicate_exact_names_are_ambiguous() {
        let n = names(&["Mic", "Mic"]);
        assert!(matches!(
            match_device(&n, "Mic", "input"),
            Err(DeviceError::Ambiguous { .. })
        ));
        assert_eq!(match_device(&n, "1", "input").ok(), Some(1));
    }

    #[test]
    fn no_match_is_not_found() {
        let n = alsa_like();
        assert!(matches!(
            match_device(&n, "bluetooth", "input"),
            Err(DeviceError::NotFound { .. })
        ));
        assert!(matches!(
            match_device(&[], "mic", "input"),
            Err(DeviceError::NotFound { .. })
        ));
        assert!(matches!(
            match_device(&[], "0", "input"),
            Err(DeviceError::NotFound { .. })
        ));
        assert!(is_default("default") && is_default("") && !is_default("Default Mic"));
    }

    fn range(ch: u16, min: u32, max: u32, f: SampleFormat) -> SupportedStreamConfigRange {
        SupportedStreamConfigRange::new(
            ch,
            SampleRate(min),
            SampleRate(max),
            SupportedBufferSize::Range { min: 32, max: 8192 },
            f,
        )
    }

    #[test]
    fn config_prefers_requested_rate_then_default() {
        let ranges = [
            range(2, 8_000, 48_000, SampleFormat::I16),
            range(2, 44_100, 44_100, SampleFormat::F32),
        ];
        let default = ranges[1].with_max_sample_rate();
        let c = choose_config(&ranges, 16_000, Some(&default)).expect("config");
        assert_eq!(
            (c.sample_rate().0, c.sample_format()),
            (16_000, SampleFormat::I16)
        );
        // Requested rate not offered: the default's rate, in the default's format.
        let c = choose_config(&ranges, 96_000, Some(&default)).expect("config");
        assert_eq!(
            (c.sample_rate().0, c.sample_format()),
            (44_100, SampleFormat::F32)
        );
        let c = choose_config(&ranges, 0, Some(&default)).expect("config");
        assert_eq!(c.sample_rate().0, 44_100);
    }

    #[test]
    fn config_accepts_any_format_and_channel_count() {
        let ranges = [range(6, 16_000, 16_000, SampleFormat::I24)];
        let c = choose_config(&ranges, 0, None).expect("config");
        assert_eq!(
            (c.channels(), c.sample_rate().0, c.sample_format()),
            (6, 16_000, SampleFormat::I24)
        );
        let ranges = [range(1, 22_050, 22_050, SampleFormat::U8)];
        let c = choose_config(&ranges, 16_000, None).expect("config");
        assert_eq!(c.sample_rate().0, 22_050);
        assert!(choose_config(&[], 16_000, None).is_none());
    }

    #[test]
    fn config_prefers_default_channels_then_format() {
        let ranges = [
            range(1, 8_000, 48_000, SampleFormat::F32),
            range(2, 8_000, 48_000, SampleFormat::I16),
            range(2, 8_000, 48_000, SampleFormat::I32),
        ];
        let default = ranges[1].with_max_sample_rate();
        let c = choose_config(&ranges, 16_000, Some(&default)).expect("config");
        assert_eq!((c.channels(), c.sample_format()), (2, SampleFormat::I16));
        let c = choose_config(&ranges, 16_000, None).expect("config");
        assert_eq!((c.channels(), c.sample_format()), (1, SampleFormat::F32));
    }

    #[test]
    fn buffer_size_fixed_only_within_range() {
        let r = SupportedBufferSize::Range { min: 64, max: 4096 };
        assert_eq!(buffer_size(&r, 48_000, 10), BufferSize::Fixed(480));
        assert_eq!(buffer_size(&r, 8_000, 5), BufferSize::Default);
        assert_eq!(buffer_size(&r, 48_000, 100), BufferSize::Default);
        assert_eq!(buffer_size(&r, 48_000, 0), BufferSize::Default);
        assert_eq!(
            buffer_size(&SupportedBufferSize::Unknown, 48_000, 10),
            BufferSize::Default
        );
    }

    #[test]
    fn device_listing_merges_ranges() {
        let mut ranges = Vec::new();
        for f in [SampleFormat::I16, SampleFormat::F32] {
            for ch in 1..=32 {
                ranges.push(range(ch, 4_000, 192_000, f));
            }
        }
        ranges.push(range(2, 48_000, 48_000, SampleFormat::I32));
        ranges.push(range(6, 48_000, 48_000, SampleFormat::I32));
        assert_eq!(
            summarize_ranges(&ranges),
            [
                "1-32 ch, 4000-192000 Hz, i16/f32, buffer 32-8192 frames",
                "2, 6 ch, 48000 Hz, i32, buffer 32-8192 frames",
            ]
        );
        assert_eq!(compress_runs(&[1, 2, 3, 4, 6, 8, 9]), "1-4, 6, 8-9");
        assert!(summarize_ranges(&[]).is_empty());
    }

    fn backend(description: &str) -> StreamError {
        StreamError::BackendSpecific {
            err: ::cpal::BackendSpecificError {
                description: description.to_string(),
            },
        }
    }

    #[test]
    fn error_callback_counts_xruns_and_detects_a_dead_device() {
        let counters = Arc::new(RtCounters::default());
        let status = Arc::new(DeviceStatus::default());
        let mut on_error = error_handler(
            Direction::Input,
            "mic".into(),
            status.clone(),
            counters.clone(),
        );
        // Occasional errors while audio keeps flowing are xruns.
        for _ in 0..200 {
            on_error(backend("`alsa::poll()` returned POLLERR"));
            counters.captured_frames.fetch_add(480, Ordering::Relaxed);
        }
        assert_eq!(counters.snapshot().xruns, 200);
        assert!(!status.is_failed());
        // An endless run of errors with nothing captured in between: the card is gone.
        for _ in 0..MAX_ERRORS_WITHOUT_PROGRESS {
            on_error(backend("`alsa::poll()` returned POLLERR"));
        }
        assert!(status.is_failed());

        let status = Arc::new(DeviceStatus::default());
        let mut on_error = error_handler(
            Direction::Output,
            "spk".into(),
            status.clone(),
            counters.clone(),
        );
        on_error(backend("failed with error 'ENODEV: No such device'"));
        assert!(status.is_failed());
        let status = Arc::new(DeviceStatus::default());
        let mut on_error = error_handler(Direction::Output, "spk".into(), status.clone(), counters);
        on_error(StreamError::DeviceNotAvailable);
        assert!(status.is_failed());
    }

    #[test]
    fn recognises_unplugged_device_errors() {
        assert!(is_device_gone(
            "ALSA function 'snd_pcm_poll_descriptors_revents' failed with error 'ENODEV: No such device'"
        ));
        assert!(!is_device_gone("`alsa::poll()` spuriously returned"));
    }

    #[test]
    fn input_callback_converts_integer_formats() {
        let c = Arc::new(RtCounters::default());
        let (mut w, mut r) = capture_ring(16, 1, c.clone());
        input_callback(&mut w, &[i16::MIN, 0i16]);
        input_callback(&mut w, &[128u8, 0u8]);
        input_callback(&mut w, &[0.25f32]);
        let mut buf = [9.0f32; 5];
        let (got, _) = r.pop_partial_slice(&mut buf);
        assert_eq!(got.len(), 5);
        assert_eq!(buf, [-1.0, 0.0, 0.0, -1.0, 0.25]);
        assert_eq!(c.snapshot().captured_frames, 5);
    }

    #[test]
    fn output_callback_renders_in_scratch_sized_chunks_and_clamps() {
        let c = Arc::new(RtCounters::default());
        let (mut w, mut r) = playback_ring(64, 2, 4, c.clone(), &FlushHandle::default());
        w.write(&[0.5, -0.5, 2.0, -2.0, 0.0, 0.25]);
        let mut scratch = [0.0f32; 4]; // two stereo frames: the 8-sample buffer takes two chunks
        let mut out = [1i16; 8];
        output_callback(&mut r, &mut scratch, &mut out);
        assert_eq!(out, [16384, -16384, i16::MAX, i16::MIN, 0, 8192, 0, 0]);
        assert_eq!(c.snapshot().rendered_frames, 4);
        // Silence on an unsigned format is the midpoint, not zero.
        let mut out = [0u8; 4];
        output_callback(&mut r, &mut scratch, &mut out);
        assert_eq!(out, [128; 4]);
        // Misuse degrades to silence rather than a panic in the audio thread.
        let mut out = [7i16; 4];
        output_callback(&mut r, &mut [], &mut out);
        assert_eq!(out, [0; 4]);
    }
}
