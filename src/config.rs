//! Configuration: TOML file -> `FileConfig` (serde, unknown keys rejected with their path) -> `Config`
//! (validated). Precedence is flag > file > default: command-line flags become `key=value` overrides that
//! are applied to the parsed TOML table before it is deserialized, so they go through the same checks.
//!
//! Pure: no threads, sockets or devices. Every key is documented at its default in `config/hearken.toml`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `hearken` looks for its config when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/hearken/hearken.toml";

/// The commented default config shipped in `config/hearken.toml` (and printed by `--print-config`).
pub const DEFAULT_TOML: &str = include_str!("../config/hearken.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: invalid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
    #[error("override `{0}`: expected KEY=VALUE, e.g. turn.end_silence_ms=500")]
    Override(String),
}

impl ConfigError {
    /// The dotted key path this error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A value that must never reach a log line: it prints as `***`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it goes on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole file. Every section and key is optional; missing ones take their default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub audio: AudioConfig,
    pub vad: VadConfig,
    pub turn: TurnConfig,
    pub opus: OpusConfig,
    pub aec: AecConfig,
    pub earcons: EarconConfig,
    pub agent: AgentConfig,
    pub render: RenderConfig,
    pub health: HealthConfig,
    pub stt: SttConfig,
    pub tts: TtsConfig,
    pub log: LogConfig,
}

impl FileConfig {
    /// An agent is configured: a URL, or (HAP) a command.
    pub fn agent_configured(&self) -> bool {
        !self.agent.url.is_empty() || !self.agent.command.is_empty()
    }
}

/// How the agent's text and components are spoken (text-only protocols).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenderConfig {
    /// Characters of one answer spoken at most; the rest is cut with a spoken notice.
    pub max_spoken_chars: u32,
    /// Rows of a table read aloud before "and N more rows".
    pub table_rows: u32,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            max_spoken_chars: 1500,
            table_rows: 5,
        }
    }
}

/// The local health endpoint.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// `127.0.0.1:PORT` or `[::1]:PORT` serves `/healthz` and `/metrics` (Prometheus); empty: off.
    pub listen: String,
}

/// Which input channel feeds the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelSelect {
    /// Average all channels.
    #[default]
    Mix,
    /// Take one channel (0-based).
    Index(u16),
}

impl<'de> Deserialize<'de> for ChannelSelect {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Str(s) if s == "mix" => Ok(ChannelSelect::Mix),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "expected \"mix\" or a channel index, got \"{s}\""
            ))),
            Raw::Int(i) => u16::try_from(i)
                .map(ChannelSelect::Index)
                .map_err(|_| serde::de::Error::custom(format!("channel index out of range: {i}"))),
        }
    }
}

impl Serialize for ChannelSelect {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ChannelSelect::Mix => s.serialize_str("mix"),
            ChannelSelect::Index(i) => s.serialize_u16(*i),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudioConfig {
    /// Capture device: "default", a name (exact, or a unique substring) or an index from `hearken devices`.
    pub input_device: String,
    /// Playback device, chosen the same way.
    pub output_device: String,
    /// "mix" (average all channels) or a 0-based channel index.
    pub input_channel: ChannelSelect,
    /// Capture rate to ask for; 0 takes the device's default.
    pub input_rate_hz: u32,
    /// Playback rate to ask for; 0 takes the device's default.
    pub output_rate_hz: u32,
    /// Hardware period (callback size) to ask for.
    pub period_ms: u32,
    /// Capacity of the capture ring between the input callback and the DSP worker.
    pub capture_ring_ms: u32,
    /// Capacity of the playback ring between the DSP worker and the output callback.
    pub playback_ring_ms: u32,
    /// Software volume for everything played, 0.0-1.0.
    pub volume: f32,
    /// Wait between attempts to (re)open a missing or failed device.
    pub device_retry_ms: u32,
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            input_device: "default".into(),
            output_device: "default".into(),
            input_channel: ChannelSelect::Mix,
            input_rate_hz: 0,
            output_rate_hz: 0,
            period_ms: 10,
            capture_ring_ms: 500,
            playback_ring_ms: 1000,
            volume: 1.0,
            device_retry_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VadEngineKind {
    /// WebRTC's GMM voice activity detector (libfvad-style C code, via `webrtc-vad`).
    Webrtc,
    /// The pure-Rust neural VAD `earshot` (16 ms frames).
    Earshot,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VadConfig {
    pub engine: VadEngineKind,
    /// WebRTC aggressiveness, 0 (least) to 3 (most aggressive at rejecting non-speech).
    pub mode: u8,
    /// WebRTC frame length: 10, 20 or 30 ms.
    pub frame_ms: u32,
    /// earshot score at or above which a frame is speech (0.0-1.0).
    pub threshold: f32,
    /// Continuous speech needed before speech start is reported.
    pub start_ms: u32,
    /// The same while the device is playing, with echo cancellation (a barge-in): the gate has
    /// already told the user from the echo. Above `start_ms` it is taken as `start_ms`.
    pub barge_in_start_ms: u32,
    /// Continuous non-speech needed before speech end is reported.
    pub hangover_ms: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            engine: VadEngineKind::Webrtc,
            mode: 3,
            frame_ms: 30,
            threshold: 0.5,
            start_ms: 60,
            barge_in_start_ms: 30,
            hangover_ms: 150,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BargeIn {
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// Non-speech after the last word that ends the user's turn.
    pub end_silence_ms: u32,
    /// Longest user turn; it is ended there even if the user keeps talking.
    pub max_utterance_ms: u32,
    /// How long to wait for the agent to start answering before giving up with the error earcon;
    /// also how long the agent may hold the floor in silence before the device listens as usual.
    pub response_timeout_ms: u32,
    /// "on": speech over the agent interrupts it; "off": the mic is ignored while the agent speaks.
    pub barge_in: BargeIn,
    /// Speech over the agent must last this long (from its onset) to interrupt it. Unset: 0 with
    /// echo cancellation, 400 without. A candidate is only dropped when its speech has ended first,
    /// and the VAD reports an end `vad.hangover_ms` after the last speech, its start debounce after
    /// it reported the start (`vad.barge_in_start_ms` with echo cancellation, else `vad.start_ms`):
    /// any value up to about debounce + `vad.hangover_ms` (180 / 210 ms by default) drops nothing and
    /// only delays the flush. With echo cancellation the gate has already
    /// told the user from the echo, so the VAD's own debounce is the minimum.
    pub barge_in_min_ms: Option<u32>,
    /// Audio kept from before the detected speech start, so the first syllable is never lost.
    pub preroll_ms: u32,
    /// After playback ends, speech must be sustained like a barge-in for this long (the room's echo tail).
    pub post_playback_mute_ms: u32,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            end_silence_ms: 700,
            max_utterance_ms: 15_000,
            response_timeout_ms: 10_000,
            barge_in: BargeIn::On,
            barge_in_min_ms: None,
            preroll_ms: 300,
            post_playback_mute_ms: 250,
        }
    }
}

impl TurnConfig {
    /// The effective barge-in minimum, given whether echo cancellation runs.
    pub fn barge_in_min_ms(&self, aec: bool) -> u32 {
        self.barge_in_min_ms.unwrap_or(if aec { 0 } else { 400 })
    }
}

/// Acoustic echo cancellation (needs the `aec` cargo feature, on by default).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AecConfig {
    /// Cancel the speaker's echo in the mic signal before the VAD.
    pub enabled: bool,
    /// Starting guess of the speaker-to-mic delay (output and input buffering plus the air); AEC3
    /// finds and tracks the real one.
    pub delay_ms_hint: u32,
    /// Noise suppression on the mic signal, from the same library.
    pub noise_suppression: bool,
    /// Barge-in gate: while the device's voice plays, speech counts only if the echo-cancelled signal
    /// is this many dB above the echo expected from what played.
    pub gate_margin_db: f32,
}

impl Default for AecConfig {
    fn default() -> Self {
        AecConfig {
            enabled: true,
            delay_ms_hint: 40,
            noise_suppression: false,
            gate_margin_db: 10.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpusConfig {
    /// Target bitrate of the uplink (16 kHz mono, VOIP mode).
    pub bitrate_bps: u32,
    /// Frame duration: 10, 20, 40 or 60 ms.
    pub frame_ms: u32,
    /// Encoder complexity 0-10 (lower is cheaper on a small board).
    pub complexity: u8,
    /// In-band forward error correction.
    pub fec: bool,
    /// Discontinuous transmission (fewer bytes in silence).
    pub dtx: bool,
}

impl Default for OpusConfig {
    fn default() -> Self {
        OpusConfig {
            bitrate_bps: 24_000,
            frame_ms: 20,
            complexity: 5,
            fec: false,
            dtx: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EarconConfig {
    pub enabled: bool,
    /// Folder with listening.wav, done.wav, error.wav, working.wav, tool_notice.wav; empty uses the built-in ones.
    pub dir: String,
    /// Earcon level relative to the agent's voice, 0.0-1.0.
    pub volume: f32,
}

impl Default for EarconConfig {
    fn default() -> Self {
        EarconConfig {
            enabled: true,
            dir: String::new(),
            volume: 0.5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolKind {
    /// HAIP 1.1.2: audio both ways.
    Haip,
    /// ARP v1 Minimal Mode: text both ways, through speech-to-text and text-to-speech on the device.
    Arp,
    /// H2A v0.2 (Basic host level): HTTP POST + SSE, text both ways like ARP.
    H2a,
    /// HAP (haive-hap 1.0.1): JSON-RPC 2.0 to a child process (`agent.command`) or an HTTP gateway.
    Hap,
}

impl ProtocolKind {
    /// Carries only text: the device needs speech services.
    pub fn text_only(self) -> bool {
        !matches!(self, ProtocolKind::Haip)
    }
}

/// How the agent token is presented on the WebSocket upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenMode {
    /// `?token=<jwt>` in the URL.
    Query,
    /// `Sec-WebSocket-Protocol: haip, token.<jwt>`.
    Subprotocol,
}

/// Which trust anchors verify the agent's TLS certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsRoots {
    /// Mozilla's web PKI roots, built in.
    Webpki,
    /// The operating system's certificate store.
    Os,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub protocol: ProtocolKind,
    /// Agent endpoint. Empty: no agent; `hearken run` captures, detects speech and logs each turn.
    pub url: String,
    /// File holding the agent token (JWT). Empty: `$CREDENTIALS_DIRECTORY/agent-token` when systemd
    /// provides it, else no token.
    pub token_file: String,
    pub token_mode: TokenMode,
    /// Allow ws:// (unencrypted) to a host other than loopback.
    pub allow_insecure: bool,
    /// Extra CA certificate(s), PEM, for an agent behind a private CA.
    pub ca_file: String,
    pub tls_roots: TlsRoots,
    /// Protocol and WebSocket ping interval.
    pub ping_interval_s: u32,
    /// Without any frame from the agent for this long, the connection is dead.
    pub liveness_timeout_s: u32,
    /// Largest frame accepted from the agent; larger ones end the connection (memory stays bounded).
    pub max_frame_bytes: u32,
    /// Reconnect backoff: first wait and cap (exponential with jitter between them).
    pub reconnect_min_ms: u32,
    pub reconnect_max_ms: u32,
    /// Mic audio held while the agent pauses the channel or the network is down; oldest dropped beyond.
    pub buffer_ms: u32,
    /// ARP: send the spec's renderer `hello` on connect (the reference server rejects it harmlessly).
    pub renderer_hello: bool,
    /// HAP: the agent program and its arguments (JSON-RPC on its stdin/stdout); empty: `url` is an
    /// HTTP gateway.
    pub command: Vec<String>,
    /// HAP: the tool (tools surface) or agent (`agent/*` surface) each turn goes to; empty: chosen
    /// from what the agent lists.
    pub hap_target: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            protocol: ProtocolKind::Haip,
            url: String::new(),
            token_file: String::new(),
            token_mode: TokenMode::Query,
            allow_insecure: false,
            ca_file: String::new(),
            tls_roots: TlsRoots::Webpki,
            ping_interval_s: 30,
            liveness_timeout_s: 90,
            max_frame_bytes: 4 * 1024 * 1024,
            reconnect_min_ms: 1_000,
            reconnect_max_ms: 30_000,
            buffer_ms: 30_000,
            renderer_hello: false,
            command: Vec::new(),
            hap_target: String::new(),
        }
    }
}

/// Which speech-to-text service turns the user's turn into text (for the text-only protocols).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SttBackend {
    /// No speech-to-text.
    None,
    /// A Wyoming server (wyoming-faster-whisper, wyoming-vosk, ...) at `stt.uri`.
    Wyoming,
    /// A local program (`stt.command`) that reads a WAV on stdin and prints the text.
    Command,
}

/// Which text-to-speech service speaks the agent's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TtsBackend {
    /// No text-to-speech.
    None,
    /// A Wyoming server (wyoming-piper, ...) at `tts.uri`.
    Wyoming,
    /// A local program (`tts.command`) that reads the text on stdin and writes audio on stdout.
    Command,
}

/// What the `tts.command` program writes on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TtsOutput {
    /// A WAV stream (16-bit PCM); a data length of 0 or 0xFFFFFFFF, or longer than what arrives, means
    /// "until the end of the stream" (what streaming writers such as espeak-ng put there).
    Wav,
    /// Headerless signed 16-bit little-endian mono at `tts.raw_rate_hz` (e.g. `piper --output_raw`).
    Raw,
}

/// Speech-to-text (`[stt]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SttConfig {
    pub backend: SttBackend,
    /// Wyoming server, `tcp://host:port`.
    pub uri: String,
    /// Program and arguments for the command backend; the turn arrives on stdin as a 16-bit mono WAV,
    /// the text is read from stdout.
    pub command: Vec<String>,
    /// Language code passed to the Wyoming server ("en", "de"); empty: the server's default.
    pub language: String,
    /// Longest wait for the transcript after the end of the turn.
    pub timeout_ms: u32,
}

impl Default for SttConfig {
    fn default() -> Self {
        SttConfig {
            backend: SttBackend::None,
            uri: "tcp://127.0.0.1:10300".into(),
            command: Vec::new(),
            language: String::new(),
            timeout_ms: 30_000,
        }
    }
}

/// Text-to-speech (`[tts]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TtsConfig {
    pub backend: TtsBackend,
    /// Wyoming server, `tcp://host:port`.
    pub uri: String,
    /// Voice name asked of the Wyoming server (as its `info` lists them); empty: the server's default.
    pub voice: String,
    /// Program and arguments for the command backend; the text goes to its stdin.
    pub command: Vec<String>,
    /// What the command writes on stdout.
    pub output: TtsOutput,
    /// Sample rate of `output = "raw"`.
    pub raw_rate_hz: u32,
    /// Longest wait for the next piece of audio (the first one, or the next one of a long text).
    pub timeout_ms: u32,
}

impl Default for TtsConfig {
    fn default() -> Self {
        TtsConfig {
            backend: TtsBackend::Command,
            uri: "tcp://127.0.0.1:10200".into(),
            voice: String::new(),
            command: vec!["espeak-ng".into(), "--stdout".into()],
            output: TtsOutput::Wav,
            raw_rate_hz: 22_050,
            timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when started by systemd (`JOURNAL_STREAM` set), plain text otherwise.
    Auto,
    Text,
    Journald,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// An EnvFilter directive ("info", "hearken=debug"); `RUST_LOG` wins over it, `-v` raises it.
    pub level: String,
    pub format: LogFormat,
    /// Seconds between reports of the real-time counters (xruns, drops); 0 disables.
    pub counters_interval_s: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Auto,
            counters_interval_s: 60,
        }
    }
}

/// A loaded, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub file: FileConfig,
    /// Where it came from ("built-in defaults" or the path).
    pub origin: String,
}

impl std::ops::Deref for Config {
    type Target = FileConfig;
    fn deref(&self) -> &FileConfig {
        &self.file
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            file: FileConfig::default(),
            origin: "built-in defaults".into(),
        }
    }
}

impl Config {
    /// The health endpoint's address, when it is on (validated as loopback).
    pub fn health_addr(&self) -> Option<std::net::SocketAddr> {
        self.file.health.listen.parse().ok()
    }

    /// Whether echo cancellation runs: built with the `aec` feature and `aec.enabled`.
    pub fn render_settings(&self) -> crate::render::RenderSettings {
        crate::render::RenderSettings {
            max_spoken_chars: self.render.max_spoken_chars as usize,
            table_rows: self.render.table_rows as usize,
        }
    }

    pub fn aec_active(&self) -> bool {
        cfg!(feature = "aec") && self.file.aec.enabled
    }

    /// Load `path` (or the built-in defaults when `path` is None), apply `KEY=VALUE` overrides, validate.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                (text, p.display().to_string())
            }
            None => (String::new(), "built-in defaults".to_string()),
        };
        Self::from_toml_str(&text, &origin, overrides)
    }

    /// Parse TOML text, apply overrides, validate.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.to_string(),
                    message: e.message().to_string(),
                })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let file: FileConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                // The path already ends with the unknown key's own name.
                let key = e.path().to_string();
                let message = e.into_inner().message().to_string();
                ConfigError::Key {
                    origin: origin.to_string(),
                    key,
                    message: first_line(&message),
                }
            })?;
        let config = Config {
            file,
            origin: origin.to_string(),
        };
        config.validate()?;
        Ok(config)
    }

    /// The effective config as TOML (what `check-config --print` shows).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.file).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.file;
        let err = |key: &str, message: String| ConfigError::Key {
            origin: self.origin.clone(),
            key: key.to_string(),
            message,
        };
        let range = |key: &str, v: u32, lo: u32, hi: u32| {
            if v < lo || v > hi {
                Err(err(key, format!("must be between {lo} and {hi}, got {v}")))
            } else {
                Ok(())
            }
        };
        let rate = |key: &str, v: u32| {
            if v != 0 && !(8_000..=192_000).contains(&v) {
                Err(err(
                    key,
                    format!("must be 0 (device default) or 8000-192000, got {v}"),
                ))
            } else {
                Ok(())
            }
        };
        let unit = |key: &str, v: f32| {
            if !(0.0..=1.0).contains(&v) {
                Err(err(key, format!("must be between 0.0 and 1.0, got {v}")))
            } else {
                Ok(())
            }
        };
        if c.audio.input_device.trim().is_empty() {
            return Err(err(
                "audio.input_device",
                "must not be empty (use \"default\")".into(),
            ));
        }
        if c.audio.output_device.trim().is_empty() {
            return Err(err(
                "audio.output_device",
                "must not be empty (use \"default\")".into(),
            ));
        }
        rate("audio.input_rate_hz", c.audio.input_rate_hz)?;
        rate("audio.output_rate_hz", c.audio.output_rate_hz)?;
        range("audio.period_ms", c.audio.period_ms, 1, 100)?;
        range("audio.capture_ring_ms", c.audio.capture_ring_ms, 50, 5_000)?;
        range(
            "audio.playback_ring_ms",
            c.audio.playback_ring_ms,
            50,
            10_000,
        )?;
        unit("audio.volume", c.audio.volume)?;
        range(
            "audio.device_retry_ms",
            c.audio.device_retry_ms,
            100,
            60_000,
        )?;

        if c.vad.mode > 3 {
            return Err(err("vad.mode", format!("must be 0-3, got {}", c.vad.mode)));
        }
        if ![10, 20, 30].contains(&c.vad.frame_ms) {
            return Err(err(
                "vad.frame_ms",
                format!("must be 10, 20 or 30, got {}", c.vad.frame_ms),
            ));
        }
        unit("vad.threshold", c.vad.threshold)?;
        range("vad.start_ms", c.vad.start_ms, 0, 1_000)?;
        // Above vad.start_ms it is taken as vad.start_ms (`vad.start_ms = 20` alone must stay valid).
        range("vad.barge_in_start_ms", c.vad.barge_in_start_ms, 0, 1_000)?;
        range("vad.hangover_ms", c.vad.hangover_ms, 0, 2_000)?;

        range("turn.end_silence_ms", c.turn.end_silence_ms, 100, 10_000)?;
        range(
            "turn.max_utterance_ms",
            c.turn.max_utterance_ms,
            1_000,
            120_000,
        )?;
        range(
            "turn.response_timeout_ms",
            c.turn.response_timeout_ms,
            500,
            120_000,
        )?;
        if let Some(v) = c.turn.barge_in_min_ms {
            range("turn.barge_in_min_ms", v, 0, 5_000)?;
        }
        range("turn.preroll_ms", c.turn.preroll_ms, 0, 2_000)?;
        range(
            "turn.post_playback_mute_ms",
            c.turn.post_playback_mute_ms,
            0,
            5_000,
        )?;
        if c.vad.hangover_ms >= c.turn.end_silence_ms {
            return Err(err(
                "vad.hangover_ms",
                format!(
                    "must be shorter than turn.end_silence_ms ({}), got {}",
                    c.turn.end_silence_ms, c.vad.hangover_ms
                ),
            ));
        }

        range("opus.bitrate_bps", c.opus.bitrate_bps, 6_000, 128_000)?;
        range("aec.delay_ms_hint", c.aec.delay_ms_hint, 0, 500)?;
        if !c.health.listen.is_empty() {
            match c.health.listen.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(a) => {
                    return Err(err(
                        "health.listen",
                        format!(
                            "must be a loopback address (127.0.0.1:PORT or [::1]:PORT), got {a}"
                        ),
                    ));
                }
                Err(_) => {
                    return Err(err(
                        "health.listen",
                        format!("not an address:port, got {:?}", c.health.listen),
                    ));
                }
            }
        }
        if !(0.0..=40.0).contains(&c.aec.gate_margin_db) {
            return Err(err(
                "aec.gate_margin_db",
                format!("must be between 0 and 40, got {}", c.aec.gate_margin_db),
            ));
        }
        if ![10, 20, 40, 60].contains(&c.opus.frame_ms) {
            return Err(err(
                "opus.frame_ms",
                format!("must be 10, 20, 40 or 60, got {}", c.opus.frame_ms),
            ));
        }
        if c.opus.complexity > 10 {
            return Err(err(
                "opus.complexity",
                format!("must be 0-10, got {}", c.opus.complexity),
            ));
        }
        unit("earcons.volume", c.earcons.volume)?;
        if !c.earcons.dir.is_empty() && !Path::new(&c.earcons.dir).is_dir() {
            return Err(err(
                "earcons.dir",
                format!("{} is not a folder", c.earcons.dir),
            ));
        }
        if !c.agent.url.is_empty() {
            let url = c.agent.url.as_str();
            let (name, plain, tls) = match c.agent.protocol {
                ProtocolKind::Haip => ("HAIP", "ws://", "wss://"),
                ProtocolKind::Arp => ("ARP", "ws://", "wss://"),
                ProtocolKind::H2a => ("H2A", "http://", "https://"),
                ProtocolKind::Hap => ("HAP", "http://", "https://"),
            };
            if !(url.starts_with(plain) || url.starts_with(tls)) {
                return Err(err(
                    "agent.url",
                    format!("{name} needs a {plain} or {tls} URL, got {url}"),
                ));
            }
            if url.starts_with(plain) && !c.agent.allow_insecure && !is_loopback_url(url) {
                return Err(err(
                    "agent.url",
                    format!(
                        "{plain} (unencrypted) is only allowed to loopback; use {tls} or set agent.allow_insecure = true ({url})"
                    ),
                ));
            }
        }
        if !c.agent.token_file.is_empty() && !Path::new(&c.agent.token_file).is_file() {
            return Err(err(
                "agent.token_file",
                format!("{} is not a readable file", c.agent.token_file),
            ));
        }
        if !c.agent.ca_file.is_empty() && !Path::new(&c.agent.ca_file).is_file() {
            return Err(err(
                "agent.ca_file",
                format!("{} is not a readable file", c.agent.ca_file),
            ));
        }
        range("agent.ping_interval_s", c.agent.ping_interval_s, 1, 3_600)?;
        range(
            "agent.liveness_timeout_s",
            c.agent.liveness_timeout_s,
            2,
            3_600,
        )?;
        if c.agent.liveness_timeout_s <= c.agent.ping_interval_s {
            return Err(err(
                "agent.liveness_timeout_s",
                format!(
                    "must be longer than agent.ping_interval_s ({}), got {}",
                    c.agent.ping_interval_s, c.agent.liveness_timeout_s
                ),
            ));
        }
        if c.agent.command.iter().any(|a| a.is_empty())
            || (!c.agent.command.is_empty() && c.agent.protocol != ProtocolKind::Hap)
        {
            return Err(err(
                "agent.command",
                "only for agent.protocol = \"hap\", and no argument may be empty".into(),
            ));
        }
        if c.agent.protocol == ProtocolKind::Hap
            && !c.agent.command.is_empty()
            && !c.agent.url.is_empty()
        {
            return Err(err(
                "agent.url",
                "HAP takes agent.command (a child process) or agent.url (an HTTP gateway), not both".into(),
            ));
        }
        if c.agent.protocol.text_only() && c.agent_configured() {
            if c.stt.backend == SttBackend::None {
                return Err(err(
                    "stt.backend",
                    "a text-only agent.protocol (arp, h2a, hap) carries only text: the user's turns need a \
                     speech-to-text service (\"wyoming\" or \"command\")"
                        .into(),
                ));
            }
            if c.tts.backend == TtsBackend::None {
                return Err(err(
                    "tts.backend",
                    "a text-only agent.protocol (arp, h2a, hap) carries only text: the agent's answers need a \
                     text-to-speech service (\"command\" or \"wyoming\")"
                        .into(),
                ));
            }
        }
        range(
            "render.max_spoken_chars",
            c.render.max_spoken_chars,
            100,
            1_000_000,
        )?;
        range("render.table_rows", c.render.table_rows, 1, 100)?;
        range(
            "agent.max_frame_bytes",
            c.agent.max_frame_bytes,
            4_096,
            256 * 1024 * 1024,
        )?;
        range(
            "agent.reconnect_min_ms",
            c.agent.reconnect_min_ms,
            10,
            60_000,
        )?;
        range(
            "agent.reconnect_max_ms",
            c.agent.reconnect_max_ms,
            c.agent.reconnect_min_ms,
            600_000,
        )?;
        range("agent.buffer_ms", c.agent.buffer_ms, 0, 300_000)?;
        // Speech services: the URIs are checked even when their backend is off, so switching the
        // backend on later cannot reveal a typo only at the first turn.
        for (key, uri) in [("stt.uri", &c.stt.uri), ("tts.uri", &c.tts.uri)] {
            if let Err(why) = parse_tcp_uri(uri) {
                return Err(err(key, why));
            }
        }
        let program_missing = |argv: &[String]| argv.first().is_none_or(|p| p.trim().is_empty());
        if c.stt.backend == SttBackend::Command && program_missing(&c.stt.command) {
            return Err(err(
                "stt.command",
                "must not be empty when stt.backend = \"command\" (e.g. [\"whisper-stdin\", \"--model\", \"base.en\"])"
                    .into(),
            ));
        }
        if !c
            .stt
            .language
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            return Err(err(
                "stt.language",
                format!(
                    "must be a language code such as \"en\" or \"pt-BR\" (or empty), got {:?}",
                    c.stt.language
                ),
            ));
        }
        range("stt.timeout_ms", c.stt.timeout_ms, 1_000, 600_000)?;
        if c.tts.backend == TtsBackend::Command && program_missing(&c.tts.command) {
            return Err(err(
                "tts.command",
                "must not be empty when tts.backend = \"command\" (e.g. [\"espeak-ng\", \"--stdout\"])"
                    .into(),
            ));
        }
        range("tts.raw_rate_hz", c.tts.raw_rate_hz, 8_000, 192_000)?;
        range("tts.timeout_ms", c.tts.timeout_ms, 1_000, 600_000)?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.log.level) {
            return Err(err("log.level", format!("not a valid filter: {e}")));
        }
        range(
            "log.counters_interval_s",
            c.log.counters_interval_s,
            0,
            86_400,
        )?;
        Ok(())
    }
}

/// Set `a.b.c = value` in `table`. The value is parsed as TOML; if that fails it is taken as a string,
/// so `audio.input_device=hw:1,0` works without quotes.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::Override(assignment.to_string()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::Override(assignment.to_string()));
    }
    let value = parse_value(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut cur = table;
    for p in parts {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(ConfigError::Override(assignment.to_string())),
        };
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Split a Wyoming service URI, `tcp://host:port` (host a name, an IPv4 address or `[IPv6]`), into
/// host and port. The error says what is wrong, for the message that names the key.
pub fn parse_tcp_uri(uri: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("must be tcp://host:port ({why}), got {uri:?}");
    let rest = uri
        .strip_prefix("tcp://")
        .ok_or_else(|| bad("only tcp:// is supported"))?;
    if rest.contains(['/', '?', '#', '@']) {
        return Err(bad("no path, query or user part"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address in [ ]"));
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| bad("the port is missing"))?;
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("the port is missing"))?;
        if host.is_empty() || host.contains(':') {
            return Err(bad("the host is missing, or an IPv6 address without [ ]"));
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host.to_string(), p)),
        _ => Err(bad("the port must be 1-65535")),
    }
}

/// True for ws:// or http:// URLs whose host is loopback (127.0.0.0/8, ::1, localhost).
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "test.toml", &[])
    }

    #[test]
    fn barge_in_min_ms_defaults_to_the_vad_debounce_with_aec() {
        // With echo cancellation a candidate survives any minimum up to vad.start_ms +
        // vad.hangover_ms (it is dropped only by a SpeechEnd before it): 100 was pure latency.
        let t = TurnConfig::default();
        assert_eq!(t.barge_in_min_ms(true), 0);
        assert_eq!(t.barge_in_min_ms(false), 400);
    }

    #[test]
    fn shipped_file_is_every_default() {
        let shipped = load(DEFAULT_TOML).expect("config/hearken.toml loads");
        assert_eq!(shipped.file, FileConfig::default());
    }

    #[test]
    fn shipped_file_names_every_key() {
        // Every key of the default config appears in config/hearken.toml, commented or not.
        let defaults = toml::Value::try_from(FileConfig::default()).expect("serialize");
        let toml::Value::Table(sections) = defaults else {
            panic!("not a table")
        };
        for (section, keys) in sections {
            assert!(
                DEFAULT_TOML.contains(&format!("[{section}]")),
                "section [{section}] missing from config/hearken.toml"
            );
            let toml::Value::Table(keys) = keys else {
                continue;
            };
            for key in keys.keys() {
                assert!(
                    DEFAULT_TOML.contains(&format!("\n{key} = "))
                        || DEFAULT_TOML.contains(&format!("\n# {key} = ")),
                    "{section}.{key} missing from config/hearken.toml"
                );
            }
        }
        // Option keys are not serialized when None; check them by name.
        assert!(DEFAULT_TOML.contains("# barge_in_min_ms = "));
    }

    #[test]
    fn every_key_accepts_a_valid_value() {
        let text = r#"
            [audio]
            input_device = "hw:1,0"
            output_device = "2"
            input_channel = 1
            input_rate_hz = 48000
            output_rate_hz = 44100
            period_ms = 20
            capture_ring_ms = 400
            playback_ring_ms = 2000
            volume = 0.8
            device_retry_ms = 500
            [vad]
            engine = "earshot"
            mode = 1
            frame_ms = 20
            threshold = 0.6
            start_ms = 90
            barge_in_start_ms = 60
            hangover_ms = 300
            [turn]
            end_silence_ms = 900
            max_utterance_ms = 20000
            response_timeout_ms = 5000
            barge_in = "off"
            barge_in_min_ms = 250
            preroll_ms = 500
            post_playback_mute_ms = 100
            [opus]
            bitrate_bps = 16000
            frame_ms = 40
            complexity = 3
            fec = true
            dtx = true
            [health]
            listen = "127.0.0.1:9464"
            [aec]
            enabled = false
            delay_ms_hint = 120
            noise_suppression = true
            gate_margin_db = 6.0
            [earcons]
            enabled = false
            dir = "/"
            volume = 0.2
            [render]
            max_spoken_chars = 300
            table_rows = 2
            [agent]
            protocol = "arp"
            renderer_hello = true
            hap_target = "ask"
            url = "ws://10.0.0.5:8080/_arp/v1"
            token_file = "/etc/hostname"
            token_mode = "subprotocol"
            allow_insecure = true
            ca_file = "/etc/hostname"
            tls_roots = "os"
            ping_interval_s = 10
            liveness_timeout_s = 30
            max_frame_bytes = 65536
            reconnect_min_ms = 500
            reconnect_max_ms = 10000
            buffer_ms = 5000
            [stt]
            backend = "command"
            uri = "tcp://[::1]:10301"
            command = ["whisper-stdin", "--model", "base.en"]
            language = "de"
            timeout_ms = 5000
            [tts]
            backend = "wyoming"
            uri = "tcp://piper.local:10201"
            voice = "en_US-lessac-medium"
            command = ["piper", "--output_raw"]
            output = "raw"
            raw_rate_hz = 16000
            timeout_ms = 10000
            [log]
            level = "hearken=debug"
            format = "json"
            counters_interval_s = 0
        "#;
        let c = load(text).expect("valid");
        assert_eq!(c.audio.input_channel, ChannelSelect::Index(1));
        assert_eq!(c.vad.engine, VadEngineKind::Earshot);
        assert_eq!(c.turn.barge_in, BargeIn::Off);
        assert_eq!(c.turn.barge_in_min_ms(false), 250);
        assert_eq!(c.turn.barge_in_min_ms(true), 250);
        assert_eq!(c.opus.frame_ms, 40);
        assert!(!c.earcons.enabled);
        assert_eq!(c.log.format, LogFormat::Json);
        // Every key in that text differs from its default, so each one was really read.
        let defaults = toml::Value::try_from(FileConfig::default()).expect("ser");
        let loaded = toml::Value::try_from(c.file.clone()).expect("ser");
        let (toml::Value::Table(d), toml::Value::Table(l)) = (defaults, loaded) else {
            panic!()
        };
        for (section, keys) in d {
            let (toml::Value::Table(dk), Some(toml::Value::Table(lk))) = (keys, l.get(&section))
            else {
                panic!("section {section}")
            };
            for (k, v) in dk {
                // agent.command excludes agent.url (HAP takes one or the other): its own test below.
                if section == "agent" && k == "command" {
                    continue;
                }
                assert_ne!(Some(&v), lk.get(&k), "{section}.{k} kept its default");
            }
        }
    }

    #[test]
    fn hap_takes_a_command_or_a_gateway_url() {
        let speech = "[stt]\nbackend = \"wyoming\"\n";
        let c = load(&format!(
            "[agent]\nprotocol = \"hap\"\ncommand = [\"python3\", \"agent.py\"]\nhap_target = \"ask\"\n{speech}"
        ))
        .expect("valid");
        assert!(c.agent_configured());
        assert_eq!(c.agent.command, vec!["python3", "agent.py"]);
        load(&format!(
            "[agent]\nprotocol = \"hap\"\nurl = \"http://127.0.0.1:9000/rpc\"\n{speech}"
        ))
        .expect("a gateway");
        let both = format!(
            "[agent]\nprotocol = \"hap\"\nurl = \"http://127.0.0.1:9000/rpc\"\ncommand = [\"x\"]\n{speech}"
        );
        assert_eq!(load(&both).unwrap_err().key(), Some("agent.url"));
        let not_hap = "[agent]\nprotocol = \"arp\"\ncommand = [\"x\"]\n";
        assert_eq!(load(not_hap).unwrap_err().key(), Some("agent.command"));
        let empty_arg = format!("[agent]\nprotocol = \"hap\"\ncommand = [\"\"]\n{speech}");
        assert_eq!(load(&empty_arg).unwrap_err().key(), Some("agent.command"));
        // A command alone is an agent: it needs speech services like any text-only protocol.
        let e = load("[agent]\nprotocol = \"hap\"\ncommand = [\"x\"]\n").unwrap_err();
        assert_eq!(e.key(), Some("stt.backend"));
    }

    #[test]
    fn a_text_only_protocol_needs_speech_services() {
        let arp = "[agent]\nprotocol = \"arp\"\nurl = \"ws://127.0.0.1:8080/_arp/v1\"\n";
        let e = load(arp).unwrap_err();
        assert_eq!(e.key(), Some("stt.backend"), "{e}");
        let e = load(&format!(
            "{arp}[stt]\nbackend = \"wyoming\"\n[tts]\nbackend = \"none\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key(), Some("tts.backend"), "{e}");
        let ok = load(&format!("{arp}[stt]\nbackend = \"wyoming\"\n")).expect("valid");
        assert!(ok.agent.protocol.text_only());
        // Without an agent (a mic check) nothing is needed.
        load("[agent]\nprotocol = \"arp\"\n").expect("no url, no speech needed");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_path() {
        let e = load("[turn]\nend_silence = 5\n").unwrap_err();
        assert_eq!(e.key(), Some("turn.end_silence"), "{e}");
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = load("[sound]\nx = 1\n").unwrap_err();
        assert_eq!(e.key(), Some("sound"), "{e}");
    }

    #[test]
    fn a_short_start_alone_is_valid() {
        // vad.barge_in_start_ms (default 30) is capped by vad.start_ms, not checked against it.
        let c = Config::from_toml_str("[vad]\nstart_ms = 20", "test", &[]).expect("valid");
        assert_eq!(c.vad.start_ms, 20);
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("[turn]\nend_silence_ms = 50", "turn.end_silence_ms"),
            ("[turn]\nend_silence_ms = \"long\"", "turn.end_silence_ms"),
            ("[turn]\nbarge_in = \"maybe\"", "turn.barge_in"),
            ("[turn]\nbarge_in_min_ms = 9000", "turn.barge_in_min_ms"),
            ("[vad]\nmode = 4", "vad.mode"),
            ("[vad]\nframe_ms = 25", "vad.frame_ms"),
            ("[vad]\nengine = \"silero\"", "vad.engine"),
            ("[vad]\nthreshold = 1.5", "vad.threshold"),
            ("[vad]\nhangover_ms = 800", "vad.hangover_ms"),
            ("[vad]\nbarge_in_start_ms = 1500", "vad.barge_in_start_ms"),
            ("[audio]\ninput_channel = \"left\"", "audio.input_channel"),
            ("[audio]\ninput_channel = -1", "audio.input_channel"),
            ("[audio]\ninput_rate_hz = 300", "audio.input_rate_hz"),
            ("[audio]\nvolume = 2.0", "audio.volume"),
            ("[audio]\ninput_device = \"\"", "audio.input_device"),
            ("[opus]\nframe_ms = 30", "opus.frame_ms"),
            ("[opus]\nbitrate_bps = 1000", "opus.bitrate_bps"),
            ("[opus]\ncomplexity = 11", "opus.complexity"),
            ("[aec]\ndelay_ms_hint = 900", "aec.delay_ms_hint"),
            ("[health]\nlisten = \"0.0.0.0:9464\"", "health.listen"),
            ("[health]\nlisten = \"localhost\"", "health.listen"),
            ("[aec]\ngate_margin_db = -3.0", "aec.gate_margin_db"),
            ("[aec]\nenabled = \"yes\"", "aec.enabled"),
            ("[earcons]\ndir = \"/nonexistent/earcons\"", "earcons.dir"),
            ("[agent]\nurl = \"ftp://x\"", "agent.url"),
            ("[agent]\nurl = \"ws://agent.example/haip\"", "agent.url"),
            ("[agent]\nprotocol = \"sip\"", "agent.protocol"),
            (
                "[agent]\ntoken_file = \"/nonexistent/token\"",
                "agent.token_file",
            ),
            ("[agent]\ntoken_mode = \"header\"", "agent.token_mode"),
            (
                "[agent]\nliveness_timeout_s = 20",
                "agent.liveness_timeout_s",
            ),
            ("[agent]\nreconnect_max_ms = 100", "agent.reconnect_max_ms"),
            ("[stt]\nbackend = \"whisper\"", "stt.backend"),
            ("[stt]\nuri = \"http://127.0.0.1:10300\"", "stt.uri"),
            ("[stt]\nuri = \"tcp://127.0.0.1\"", "stt.uri"),
            ("[stt]\nbackend = \"command\"", "stt.command"),
            (
                "[stt]\nbackend = \"command\"\ncommand = [\"\"]",
                "stt.command",
            ),
            ("[stt]\nlanguage = \"en us\"", "stt.language"),
            ("[stt]\ntimeout_ms = 100", "stt.timeout_ms"),
            ("[tts]\nuri = \"tcp://host:0\"", "tts.uri"),
            ("[tts]\nuri = \"tcp://[::1:10200\"", "tts.uri"),
            ("[tts]\ncommand = []", "tts.command"),
            ("[tts]\noutput = \"mp3\"", "tts.output"),
            ("[tts]\nraw_rate_hz = 1000", "tts.raw_rate_hz"),
            ("[tts]\ntimeout_ms = 900000", "tts.timeout_ms"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[log]\nlevel = \"hearken=loud\"", "log.level"),
        ];
        for (text, key) in cases {
            let e = load(text).expect_err(text);
            assert_eq!(e.key(), Some(key), "{text}: {e}");
            assert!(e.to_string().contains(key), "{e}");
        }
    }

    #[test]
    fn syntax_error_is_reported() {
        let e = load("[turn\n").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file = "[turn]\nend_silence_ms = 900\npreroll_ms = 100\n";
        let c = Config::from_toml_str(
            file,
            "f",
            &[
                "turn.end_silence_ms=500".into(),
                "audio.input_device=hw:1,0".into(),
            ],
        )
        .expect("valid");
        assert_eq!(c.turn.end_silence_ms, 500); // flag
        assert_eq!(c.turn.preroll_ms, 100); // file
        assert_eq!(c.turn.max_utterance_ms, 15_000); // default
        assert_eq!(c.audio.input_device, "hw:1,0"); // unquoted string
        let e = Config::from_toml_str("", "f", &["turn.nope=1".into()]).unwrap_err();
        assert_eq!(e.key(), Some("turn.nope"));
        let e = Config::from_toml_str("", "f", &["novalue".into()]).unwrap_err();
        assert!(matches!(e, ConfigError::Override(_)));
        let e = Config::from_toml_str("", "f", &["turn.preroll_ms=-5".into()]).unwrap_err();
        assert_eq!(e.key(), Some("turn.preroll_ms"));
    }

    #[test]
    fn loopback_urls() {
        for u in [
            "ws://127.0.0.1:8080/x",
            "ws://localhost/",
            "ws://[::1]:9/a",
            "ws://127.9.9.9",
            "ws://u:p@127.0.0.1/",
        ] {
            assert!(is_loopback_url(u), "{u}");
        }
        for u in [
            "ws://10.0.0.1/",
            "ws://example.com",
            "ws://localhost.example.com/",
            "ws://[::2]/",
        ] {
            assert!(!is_loopback_url(u), "{u}");
        }
        assert!(load("[agent]\nurl = \"ws://127.0.0.1:9000/haip\"").is_ok());
    }

    #[test]
    fn tcp_uris() {
        for (uri, host, port) in [
            ("tcp://127.0.0.1:10300", "127.0.0.1", 10300),
            ("tcp://whisper.local:1", "whisper.local", 1),
            ("tcp://[::1]:10200", "::1", 10200),
        ] {
            assert_eq!(parse_tcp_uri(uri), Ok((host.to_string(), port)), "{uri}");
        }
        for uri in [
            "127.0.0.1:10300",
            "unix:///run/whisper.sock",
            "tcp://:10300",
            "tcp://host",
            "tcp://host:",
            "tcp://host:65536",
            "tcp://host:10300/",
            "tcp://[::1]",
            "tcp://::1:10300",
            "tcp://[nope]:1",
        ] {
            let e = parse_tcp_uri(uri).expect_err(uri);
            assert!(e.contains("tcp://host:port"), "{uri}: {e}");
        }
        // Switching a backend to "none" keeps the rest valid; the command may then be empty.
        assert!(load("[tts]\nbackend = \"none\"\ncommand = []").is_ok());
        assert!(load("[stt]\nbackend = \"wyoming\"").is_ok());
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = Config::load(Some(Path::new("/nonexistent/hearken.toml")), &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/hearken.toml"));
    }
}
