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
    /// The whole device against the built-in agent, no sound card needed: a scripted conversation
    /// with a barge-in, a readable timeline and latency figures.
    Demo(DemoArgs),
    /// Serve the built-in reference agent for other devices.
    Agent(AgentArgs),
}

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Use the real microphone and speaker instead of the scripted conversation.
    #[arg(long)]
    pub live: bool,
    /// Where to write what the speaker would have played.
    #[arg(long, value_name = "WAV", default_value = "hearken-demo.wav")]
    pub output: PathBuf,
    /// Scripted mode: no simulated room (by default the speaker's output reaches the mic again,
    /// 40 ms late and 6 dB down, so the echo canceller has to keep the device from interrupting
    /// itself).
    #[arg(long)]
    pub no_echo: bool,
    /// Protocol between the device and the built-in agent: haip (audio both ways) or arp (text both
    /// ways, through speech-to-text and text-to-speech on the device).
    #[arg(long, value_enum, default_value = "haip")]
    pub protocol: AgentProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentProtocol {
    Haip,
    Arp,
    H2a,
    /// JSON-RPC on this process's stdin and stdout (start it as a device's `agent.command`).
    Hap,
}

#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    #[arg(long, value_enum, default_value = "haip")]
    pub protocol: AgentProtocol,
    /// Address to listen on. Loopback by default; the agent has no TLS, so expose it with care.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Token devices must present (?token= or Sec-WebSocket-Protocol). Default: none required.
    #[arg(long, env = "HEARKEN_AGENT_TOKEN")]
    pub token: Option<String>,
    /// Test hook (HAP): exit, mid-call, on the Nth tool or agent call (an agent that dies mid-turn).
    #[arg(long, hide = true, value_name = "N")]
    pub exit_on_call: Option<u32>,
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

#[derive(Debug, Subcommand, Clone)]
pub enum BenchCommand {
    /// Barge-in with echo cancellation on far-end / mic WAV pairs: false and missed barge-ins,
    /// onset -> flush latency, ERLE; per mix and in total.
    /// The folder is given as `--set DIR` (a `--set` value without `=` is the set, not a config
    /// override) or as the argument; default: the committed set, `audio/echo`.
    BargeIn {
        /// Folder with the far-end / mic pairs and their manifest.json.
        #[arg(value_name = "DIR", id = "eval_set")]
        set: Option<PathBuf>,
    },
    /// Text-to-speech through the renderer: the first agent delta to the first synthesized audio at
    /// the speaker, against the first sentence's own synthesis time ([tts], espeak-ng by default).
    Speech,
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchCommand>,
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
