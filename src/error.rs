//! Top-level error type. Each variant keeps its source; `is_transient` tells the service whether to retry
//! (devices, network) or exit (bad config, unsupported format).

use std::path::PathBuf;

/// Exit code for a configuration error: distinct so systemd's `RestartPreventExitStatus=` can stop a
/// restart loop on a config that will never load.
pub const EXIT_CONFIG: i32 = 78; // EX_CONFIG from sysexits.h

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("audio device: {0}")]
    Device(#[from] crate::audio::DeviceError),
    #[error("dsp: {0}")]
    Dsp(#[from] crate::dsp::DspError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// True when retrying later may succeed (a device that is unplugged or busy); false when the same
    /// input will always fail (bad config, a file that cannot be decoded).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Config(_) => false,
            Error::Device(e) => e.is_transient(),
            Error::Dsp(_) => false,
            Error::Io { .. } => false,
        }
    }

    /// Process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => EXIT_CONFIG,
            _ => 1,
        }
    }
}
