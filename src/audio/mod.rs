//! Audio I/O behind two capabilities, [`Capture`] and [`Playback`].
//!
//! Backends: `cpal` (ALSA; the only module that imports cpal) and `file` (WAV capture paced in real time
//! or as fast as possible; WAV, memory and null playback). A device is opened first (its format is then
//! known, so the rings can be sized) and started second; `start` moves the real-time half of a ring into
//! the device's callback and returns a [`RunningStream`] guard that stops the stream when dropped.
//!
//! Thread contract: devices are opened, started and dropped on the DSP worker thread (cpal streams are
//! not `Send`). The callbacks run on the backend's own threads and only call the `// RT-SAFE:` functions
//! in [`rt`].

pub mod cpal;
pub mod earcon;
pub mod file;
pub mod rt;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use rt::{CaptureWriter, PlaybackReader, PlaybackShared, PlaybackWriter, RtCounters};

/// A file shipped under `audio/` (`rel`, e.g. `fixtures/question.wav`): from the current directory's
/// source tree, the tree this binary was built from, or the installed package (`/usr/share/hearken`).
pub fn data_file(rel: &str) -> Option<std::path::PathBuf> {
    [
        std::path::Path::new("audio").join(rel),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("audio")
            .join(rel),
        std::path::Path::new("/usr/share/hearken").join(rel),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Sample rate and channel count of a stream as the device runs it (samples are always f32 inside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFormat {
    pub rate_hz: u32,
    pub channels: u16,
}

impl std::fmt::Display for StreamFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} Hz, {} ch", self.rate_hz, self.channels)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no {kind} device matches \"{wanted}\" (see `hearken devices`)")]
    NotFound { kind: &'static str, wanted: String },
    #[error("{kind} device \"{wanted}\" is ambiguous: {matches}")]
    Ambiguous {
        kind: &'static str,
        wanted: String,
        matches: String,
    },
    #[error("{kind} device {name}: {message}")]
    Backend {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("{kind} device {name} offers no usable format: {message}")]
    Unsupported {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("{path}: {source}")]
    Wav {
        path: String,
        #[source]
        source: hound::Error,
    },
    #[error("{path}: unsupported WAV ({message})")]
    WavFormat { path: String, message: String },
}

impl DeviceError {
    /// A device that is missing or failing may come back (USB unplugged, ALSA busy); a WAV file that
    /// cannot be read will not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DeviceError::NotFound { .. } | DeviceError::Backend { .. }
        )
    }
}

/// Liveness flags a running stream shares with the worker.
#[derive(Debug, Default)]
pub struct DeviceStatus {
    /// The backend reported a fatal error (device unplugged): reopen it.
    pub failed: AtomicBool,
    /// A file source reached its end: no more input will come.
    pub finished: AtomicBool,
}

impl DeviceStatus {
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// A started stream. Dropping it stops the stream (and, for a WAV sink, finishes the file).
pub trait RunningStream {}

/// A microphone (or a stand-in for one), opened but not started.
///
/// Called on the DSP worker thread; `start` does not block beyond starting the backend.
pub trait Capture {
    fn format(&self) -> StreamFormat;
    /// Human-readable device description for logs.
    fn describe(&self) -> String;
    /// Start delivering interleaved f32 input into `writer` from the backend's callback.
    fn start(
        self: Box<Self>,
        writer: CaptureWriter,
        status: Arc<DeviceStatus>,
    ) -> Result<Box<dyn RunningStream>, DeviceError>;
}

/// A speaker (or a stand-in for one), opened but not started.
///
/// Called on the DSP worker thread; `start` does not block beyond starting the backend.
pub trait Playback {
    fn format(&self) -> StreamFormat;
    fn describe(&self) -> String;
    /// Start pulling interleaved f32 output from `reader` in the backend's callback.
    fn start(
        self: Box<Self>,
        reader: PlaybackReader,
        status: Arc<DeviceStatus>,
    ) -> Result<Box<dyn RunningStream>, DeviceError>;
}

/// Opens devices; called again by the worker whenever a device fails, until it succeeds.
pub trait DeviceFactory: Send {
    fn open_capture(&mut self) -> Result<Box<dyn Capture>, DeviceError>;
    fn open_playback(&mut self) -> Result<Box<dyn Playback>, DeviceError>;
}
