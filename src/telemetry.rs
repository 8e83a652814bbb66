//! Logging: tracing with an EnvFilter (`RUST_LOG` wins, then `-v`, then `[log] level`), to journald when
//! systemd started us (`JOURNAL_STREAM` is set) and to stderr otherwise (stdout carries `--events`).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::{LogConfig, LogFormat};

/// Install the global subscriber. `verbosity` is the number of `-v` flags.
pub fn init(cfg: &LogConfig, verbosity: u8) {
    let level = match verbosity {
        0 => cfg.level.clone(),
        1 => format!("{},hearken=debug", cfg.level),
        _ => format!("{},hearken=trace", cfg.level),
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match cfg.format {
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let fallback = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
    };
    let result = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(j) => registry
                .with(j.with_syslog_identifier("hearken".into()))
                .try_init(),
            Err(e) => {
                let r = registry.with(fallback()).try_init();
                tracing::warn!(error = %e, "journald unavailable; logging to stderr");
                r
            }
        },
        LogFormat::Json => registry
            .with(fallback().json().flatten_event(true))
            .try_init(),
        _ => registry.with(fallback()).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
