//! Command line (clap derive). `hearken` alone means `hearken run`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "hearken",
    version,
    about = "Voice device for AI agents: mic -> speech -> agent -> speaker"
)]
pub struct Cli {
    /// Config file (default: /etc/hearken/hearken.toml if it exists, else built-in defaults).
    #[arg(long, short = 'c', global = true, env = "HEARKEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set turn.end_silence_ms=500 (repeatable; wins over the file).
    #[arg(long = "set", short = 's', global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// More logging (-v debug, -vv trace). RUST_LOG wins.
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print the default config, every key commented, and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the device (the default).
    Run(RunArgs),
    /// List audio devices and the formats they support.
    Devices,
    /// Load and validate the config, print the effective values, exit non-zero on error.
    CheckConfig,
    /// Measure the audio pipeline (stages alone and together) and a whole file run.
    Bench(BenchArgs),
}

#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// Use this WAV file as the microphone instead of a capture device.
    #[arg(long, value_name = "WAV")]
    pub input: Option<PathBuf>,
    /// Write what the speaker would play to this WAV instead of a playback device.
    #[arg(long, value_name = "WAV")]
    pub output: Option<PathBuf>,
    /// With --input: pace the file in real time instead of as fast as possible.
    #[arg(long)]
    pub realtime: bool,
    /// Capture device (overrides audio.input_device).
    #[arg(long)]
    pub input_device: Option<String>,
    /// Playback device (overrides audio.output_device).
    #[arg(long)]
    pub output_device: Option<String>,
    /// Write every event to stdout in this format.
    #[arg(long, value_enum)]
    pub events: Option<EventFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventFormat {
    /// One JSON object per line.
    Jsonl,
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Seconds of audio per measurement.
    #[arg(long, default_value_t = 20)]
    pub seconds: u32,
    /// Repetitions (the best of them is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: u32,
    /// Fixture for the whole-file run and its RSS (default: the built-in 48 kHz stereo fixture).
    #[arg(long, value_name = "WAV")]
    pub input: Option<PathBuf>,
}

impl RunArgs {
    /// Flags that map onto config keys, as `--set` overrides (flag > file > default).
    pub fn overrides(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(d) = &self.input_device {
            v.push(format!("audio.input_device={}", toml_string(d)));
        }
        if let Some(d) = &self.output_device {
            v.push(format!("audio.output_device={}", toml_string(d)));
        }
        v
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
