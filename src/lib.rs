//! hearken: a voice device for AI agents.
//!
//! Layout: `audio` (devices behind `Capture`/`Playback`, real-time rings) -> `dsp` (the worker thread:
//! downmix, resample, VAD, pre-roll, Opus) -> `service` (tokio: `turn::TurnMachine`, event output) and
//! back to the speaker through the same worker. `config` loads and validates the TOML file, `telemetry`
//! sets up logging, `events` is the JSON-lines event stream, `bench` the built-in benchmarks.
//! `turn`, `dsp` and `config` never touch sockets, tokio or cpal: they are unit-tested without hardware.

pub mod agent;
pub mod audio;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dsp;
pub mod echo_eval;
pub mod error;
pub mod events;
pub mod health;
pub mod link;
pub mod notify;
pub mod protocol;
pub mod render;
pub mod service;
pub mod speech;
pub mod telemetry;
pub mod transport;
pub mod turn;
pub mod voice;

pub use error::Error;
