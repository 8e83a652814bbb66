//! Speech services for the text-only protocols (ARP, H2A, HAP): the user's turn becomes text
//! ([`SpeechToText`]) and the agent's text becomes speech ([`TextToSpeech`]). Backends: `wyoming` (a
//! client of the Wyoming protocol, so the wyoming-faster-whisper / wyoming-piper services that Home
//! Assistant users run can be used) and `command` (a local program such as espeak-ng or piper).
//! [`stt_from_config`] and [`tts_from_config`] build the ones `[stt]` and `[tts]` name.
//!
//! Context: tokio. Every call is cancellable through a [`CancellationToken`]: a barge-in cancels the
//! synthesis in flight, and the backend stops at once (the child is killed, the socket dropped).

pub mod command;
pub mod wyoming;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
pub use tokio_util::sync::CancellationToken;

use crate::config::{Config, SttBackend, TtsBackend, TtsOutput};
pub use command::{CommandStt, CommandTts, StdoutAudio};
pub use wyoming::{WyomingInfo, WyomingStt, WyomingTts};

/// Mono signed 16-bit PCM at `rate_hz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pcm {
    pub rate_hz: u32,
    pub samples: Vec<i16>,
}

impl Pcm {
    pub fn duration_ms(&self) -> u64 {
        if self.rate_hz == 0 {
            return 0;
        }
        self.samples.len() as u64 * 1000 / self.rate_hz as u64
    }
}

/// What speech-to-text heard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    pub text: String,
    /// Language the service reported, if any.
    pub language: Option<String>,
}

/// Figures of one synthesis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SynthStats {
    /// Audio produced, in ms.
    pub audio_ms: u64,
    /// From the call to the first chunk sent to `out`.
    pub first_chunk_ms: Option<u64>,
}

/// Why a speech call failed. Every variant names the service so the log says which one to fix.
#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    /// The service cannot be reached or the program cannot be started.
    #[error("{service} is unavailable: {reason}")]
    Unavailable { service: String, reason: String },
    /// The service did not answer in time.
    #[error("{service} timed out after {ms} ms ({what})")]
    Timeout {
        service: String,
        what: String,
        ms: u64,
    },
    /// The service answered something that does not follow its protocol.
    #[error("{service} sent something unexpected: {reason}")]
    Protocol { service: String, reason: String },
    /// The service ran and reported a failure (exit status, error event).
    #[error("{service} failed: {reason}")]
    Failed { service: String, reason: String },
    /// Cancelled by the caller (barge-in, shutdown). Not an error to report.
    #[error("cancelled")]
    Cancelled,
}

/// A boxed future, so the traits stay object-safe (`Arc<dyn TextToSpeech>`).
pub type SpeechFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SpeechError>> + Send + 'a>>;

/// Speech-to-text. Thread contract: called from tokio tasks; `transcribe` never blocks a runtime
/// thread (programs and sockets are driven asynchronously).
pub trait SpeechToText: Send + Sync {
    /// For logs: "wyoming tcp://host:10300", "command whisper-cli".
    fn describe(&self) -> String;
    /// Transcribe one utterance. `audio` yields mono chunks at `rate_hz` while the user speaks and
    /// closes at the end of the turn; a streaming backend forwards chunks as they come, others
    /// collect them. Returns when the transcript is in, or `Cancelled` as soon as `cancel` fires.
    fn transcribe<'a>(
        &'a self,
        rate_hz: u32,
        audio: mpsc::Receiver<Vec<i16>>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, Transcript>;
}

/// Text-to-speech. Thread contract: as [`SpeechToText`].
pub trait TextToSpeech: Send + Sync {
    fn describe(&self) -> String;
    /// Speak `text`. Audio goes to `out` in chunks as soon as the backend yields them (the first chunk
    /// before the whole sentence is synthesized where the backend streams). Returns when done, or
    /// `Cancelled` at once when `cancel` fires (nothing more is sent to `out` after that).
    fn synthesize<'a>(
        &'a self,
        text: &'a str,
        out: mpsc::Sender<Pcm>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, SynthStats>;
}

/// The `[stt]` service, or `None` for `stt.backend = "none"`. The config is validated already, so
/// this cannot fail; a service that is down shows at the first call (`Unavailable`).
pub fn stt_from_config(config: &Config) -> Option<Arc<dyn SpeechToText>> {
    let c = &config.stt;
    let timeout = Duration::from_millis(c.timeout_ms as u64);
    match c.backend {
        SttBackend::None => None,
        SttBackend::Wyoming => Some(Arc::new(
            WyomingStt::new(&c.uri)
                .with_language(&c.language)
                .with_timeout(timeout),
        )),
        SttBackend::Command => Some(Arc::new(
            CommandStt::new(c.command.clone()).with_timeout(timeout),
        )),
    }
}

/// The `[tts]` service, or `None` for `tts.backend = "none"`; see [`stt_from_config`].
pub fn tts_from_config(config: &Config) -> Option<Arc<dyn TextToSpeech>> {
    let c = &config.tts;
    let timeout = Duration::from_millis(c.timeout_ms as u64);
    match c.backend {
        TtsBackend::None => None,
        TtsBackend::Wyoming => Some(Arc::new(
            WyomingTts::new(&c.uri)
                .with_voice(&c.voice)
                .with_timeout(timeout),
        )),
        TtsBackend::Command => {
            let output = match c.output {
                TtsOutput::Wav => StdoutAudio::Wav,
                TtsOutput::Raw => StdoutAudio::Raw {
                    rate_hz: c.raw_rate_hz,
                },
            };
            Some(Arc::new(
                CommandTts::new(c.command.clone(), output).with_timeout(timeout),
            ))
        }
    }
}

/// What the configured Wyoming servers offer, for the start-up log: one entry (section, service,
/// answer) for each of `[stt]` and `[tts]` whose backend is "wyoming", asked in turn. A server that is
/// down gives its error here and is tried again at each call.
pub async fn wyoming_info(
    config: &Config,
) -> Vec<(&'static str, String, Result<WyomingInfo, SpeechError>)> {
    let mut out = Vec::new();
    if config.stt.backend == SttBackend::Wyoming {
        let stt = WyomingStt::new(&config.stt.uri)
            .with_timeout(Duration::from_millis(config.stt.timeout_ms as u64));
        out.push(("stt", stt.describe(), stt.info().await));
    }
    if config.tts.backend == TtsBackend::Wyoming {
        let tts = WyomingTts::new(&config.tts.uri)
            .with_timeout(Duration::from_millis(config.tts.timeout_ms as u64));
        out.push(("tts", tts.describe(), tts.info().await));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(overrides: &[&str]) -> Config {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::from_toml_str("", "test", &o).expect("valid")
    }

    #[test]
    fn backends_from_config() {
        let c = config(&[]);
        assert!(stt_from_config(&c).is_none(), "stt is off by default");
        let tts = tts_from_config(&c).expect("espeak-ng by default");
        assert_eq!(tts.describe(), "command espeak-ng");

        let c = config(&[
            "stt.backend=wyoming",
            "stt.uri=tcp://whisper.local:10300",
            "tts.backend=wyoming",
        ]);
        assert_eq!(
            stt_from_config(&c).expect("wyoming").describe(),
            "wyoming tcp://whisper.local:10300"
        );
        assert_eq!(
            tts_from_config(&c).expect("wyoming").describe(),
            "wyoming tcp://127.0.0.1:10200"
        );

        let c = config(&[
            "stt.backend=command",
            "stt.command=[\"/opt/stt/bin/transcribe\"]",
            "tts.backend=none",
        ]);
        assert_eq!(
            stt_from_config(&c).expect("command").describe(),
            "command transcribe"
        );
        assert!(tts_from_config(&c).is_none());
    }

    #[tokio::test]
    async fn wyoming_info_asks_only_wyoming_backends() {
        assert!(wyoming_info(&config(&[])).await.is_empty());
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let uri = format!("tcp://127.0.0.1:{port}");
        let c = config(&[
            "stt.backend=wyoming",
            &format!("stt.uri={uri}"),
            "tts.backend=none",
        ]);
        let got = wyoming_info(&c).await;
        assert_eq!(got.len(), 1);
        let (section, service, answer) = &got[0];
        assert_eq!(
            (*section, service.as_str()),
            ("stt", format!("wyoming {uri}").as_str())
        );
        assert!(
            matches!(answer, Err(SpeechError::Unavailable { .. })),
            "{answer:?}"
        );
    }
}
