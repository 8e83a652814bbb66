//! A client of the Wyoming protocol: the speech services Home Assistant users already run
//! (wyoming-faster-whisper on port 10300, wyoming-piper on 10200, ...).
//!
//! Wire format: every event is one JSON header line, `{"type": ..., "data": {...}, "data_length": N,
//! "payload_length": M}\n`, then N bytes of extra JSON data (merged into `data`, winning over it), then M
//! bytes of binary payload. hearken writes `data` inline in the header (every server version reads
//! that; `data_length` came later) and reads both forms. The exchanges used here:
//!
//! - `describe` -> `info` ([`WyomingStt::info`], [`WyomingTts::info`], logged at start-up);
//! - speech-to-text: `transcribe {language?}`, `audio-start {rate, width, channels}`, one `audio-chunk`
//!   (same fields + PCM payload) per chunk of the turn as it arrives, `audio-stop`; the answer is
//!   `transcript {text, language?}` (streaming servers send `transcript-start/chunk/stop` first: skipped);
//! - text-to-speech: `synthesize {text, voice?: {name}}` -> `audio-start`, `audio-chunk`*, `audio-stop`,
//!   each chunk forwarded to the caller as it arrives;
//! - `error {text, code?}` from the server ends the call as [`SpeechError::Failed`].
//!
//! Decoding is lenient: unknown events and fields are logged and skipped; a line that is not a JSON
//! event is [`SpeechError::Protocol`]. Sizes are capped (header line, extra data, payload) so a broken
//! server cannot make hearken allocate without bound.
//!
//! One TCP connection per call, as Home Assistant does: nothing idles between turns and a restarted
//! server needs no reconnect logic. A connection that the server accepts and then drops before
//! answering anything (Docker's port proxy does that while the container restarts) is retried once,
//! provided nothing of the call has been used yet (no audio taken from the turn, none sent on).
//!
//! Timeouts: connecting (DNS + TCP) is bounded by `connect_timeout` (past it the service is
//! `Unavailable`); after that `timeout` bounds every wait on the server (each write, the transcript
//! after the end of the turn, each next event of a synthesis), never the time the caller takes (the
//! user still talking, playback applying backpressure to `out`). Cancellation drops the connection at
//! once, which is how a Wyoming server learns to stop.
//!
//! Context: tokio. Nothing here spawns tasks or threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tracing::{debug, trace};

use super::{
    CancellationToken, Pcm, SpeechError, SpeechFuture, SpeechToText, SynthStats, TextToSpeech,
    Transcript,
};
use crate::config::parse_tcp_uri;

/// DNS + TCP connect, unless the caller sets another.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits on the server, unless the caller sets another (`stt.timeout_ms` / `tts.timeout_ms`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest header line accepted. Real headers are a few hundred bytes; data may be inline, and an
/// `info` with every voice of a TTS server goes in `data_length` bytes instead.
const MAX_HEADER_BYTES: usize = 1024 * 1024;
/// Longest extra data (wyoming-piper's `info` lists hundreds of voices: well under a megabyte).
const MAX_DATA_BYTES: usize = 8 * 1024 * 1024;
/// Longest payload: an audio chunk is a few kilobytes; a whole sentence in one chunk stays far below.
const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;
/// Wait before the single retry of a connection dropped before its first answer (a proxy in front
/// of a restarting server drops at once; retrying in the same millisecond would meet the same fate).
const RETRY_WAIT: Duration = Duration::from_millis(200);

/// One Wyoming event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub kind: String,
    pub data: Map<String, Value>,
    pub payload: Vec<u8>,
}

impl Event {
    pub fn new(kind: &str) -> Self {
        Event {
            kind: kind.to_string(),
            ..Event::default()
        }
    }

    /// With `data`, which must be a JSON object (anything else is ignored).
    pub fn with_data(mut self, data: Value) -> Self {
        if let Value::Object(m) = data {
            self.data = m;
        }
        self
    }

    pub fn with_payload(mut self, payload: Vec<u8>) -> Self {
        self.payload = payload;
        self
    }

    /// The event on the wire: header line (data inline), then the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut header = Map::new();
        header.insert("type".into(), Value::String(self.kind.clone()));
        if !self.data.is_empty() {
            header.insert("data".into(), Value::Object(self.data.clone()));
        }
        if !self.payload.is_empty() {
            header.insert("payload_length".into(), json!(self.payload.len()));
        }
        // Serializing a map of strings and numbers cannot fail.
        let mut out = serde_json::to_vec(&Value::Object(header)).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Why reading an event failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or ended inside an event.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a Wyoming event.
    #[error("{0}")]
    Malformed(String),
}

/// Read one event; `Ok(None)` at a clean end of stream (between events). Blank lines are skipped.
/// Not cancel-safe (a partial header would be lost): callers drop the connection when they stop.
pub async fn read_event<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Event>, WireError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut *r)
            .take(MAX_HEADER_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_HEADER_BYTES {
                return Err(WireError::Malformed(format!(
                    "a header line longer than {MAX_HEADER_BYTES} bytes"
                )));
            }
            return Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside an event header",
            )));
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            break;
        }
    }
    let header: Value = serde_json::from_slice(&line).map_err(|e| {
        WireError::Malformed(format!("not a JSON event header ({e}): {}", excerpt(&line)))
    })?;
    let Value::Object(mut header) = header else {
        return Err(WireError::Malformed(format!(
            "event header is not a JSON object: {}",
            excerpt(&line)
        )));
    };
    let kind = match header.remove("type") {
        Some(Value::String(t)) if !t.is_empty() => t,
        _ => {
            return Err(WireError::Malformed(format!(
                "event header without a \"type\": {}",
                excerpt(&line)
            )));
        }
    };
    let mut data = match header.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(WireError::Malformed(format!(
                "{kind}: \"data\" is not an object: {other}"
            )));
        }
    };
    let data_length = length_field(&header, "data_length", &kind, MAX_DATA_BYTES)?;
    let payload_length = length_field(&header, "payload_length", &kind, MAX_PAYLOAD_BYTES)?;
    if data_length > 0 {
        let mut extra = vec![0u8; data_length];
        r.read_exact(&mut extra).await?;
        match serde_json::from_slice::<Value>(&extra) {
            Ok(Value::Object(m)) => data.extend(m),
            Ok(_) => {
                return Err(WireError::Malformed(format!(
                    "{kind}: extra data is not a JSON object"
                )));
            }
            Err(e) => {
                return Err(WireError::Malformed(format!(
                    "{kind}: extra data is not JSON ({e})"
                )));
            }
        }
    }
    let mut payload = vec![0u8; payload_length];
    if payload_length > 0 {
        r.read_exact(&mut payload).await?;
    }
    Ok(Some(Event {
        kind,
        data,
        payload,
    }))
}

fn length_field(
    header: &Map<String, Value>,
    key: &str,
    kind: &str,
    max: usize,
) -> Result<usize, WireError> {
    match header.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= max => Ok(n as usize),
            Some(n) => Err(WireError::Malformed(format!(
                "{kind}: {key} {n} is over the limit of {max} bytes"
            ))),
            None => Err(WireError::Malformed(format!(
                "{kind}: {key} is not a length: {v}"
            ))),
        },
    }
}

/// The start of a bad line, printable, for the error message.
fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    let mut out: String = text.chars().take(80).collect();
    if text.chars().count() > 80 {
        out.push('…');
    }
    format!("{out:?}")
}

/// Audio format fields of `audio-start` / `audio-chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFormat {
    pub rate_hz: u32,
    /// Bytes per sample.
    pub width: u32,
    pub channels: u32,
}

impl AudioFormat {
    /// hearken's side of every exchange: mono 16-bit.
    pub fn mono16(rate_hz: u32) -> Self {
        AudioFormat {
            rate_hz,
            width: 2,
            channels: 1,
        }
    }

    fn to_data(self) -> Value {
        json!({"rate": self.rate_hz, "width": self.width, "channels": self.channels})
    }

    /// From an event's data; `None` when the fields are absent, an error when they are nonsense.
    fn from_data(kind: &str, data: &Map<String, Value>) -> Result<Option<Self>, String> {
        let field = |k: &str| data.get(k).and_then(Value::as_u64);
        match (field("rate"), field("width"), field("channels")) {
            (None, None, None) => Ok(None),
            (Some(rate), Some(width), Some(channels))
                if (1_000..=384_000).contains(&rate)
                    && (1..=4).contains(&width)
                    && (1..=16).contains(&channels) =>
            {
                Ok(Some(AudioFormat {
                    rate_hz: rate as u32,
                    width: width as u32,
                    channels: channels as u32,
                }))
            }
            _ => Err(format!(
                "{kind}: bad audio format (rate {:?}, width {:?}, channels {:?})",
                data.get("rate"),
                data.get("width"),
                data.get("channels")
            )),
        }
    }
}

/// What a server offers, from its `info` answer to `describe`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WyomingInfo {
    /// Speech-to-text programs.
    pub asr: Vec<WyomingProgram>,
    /// Text-to-speech programs.
    pub tts: Vec<WyomingProgram>,
    /// The whole `info` data, for anything not picked out here (wake, intent, handle, satellite).
    pub raw: Map<String, Value>,
}

/// One program of an `info`: an ASR program with its models, or a TTS program with its voices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WyomingProgram {
    pub name: String,
    pub description: Option<String>,
    pub version: Option<String>,
    pub installed: bool,
    /// ASR models or TTS voices.
    pub models: Vec<WyomingModel>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WyomingModel {
    pub name: String,
    pub languages: Vec<String>,
    pub installed: bool,
}

impl WyomingInfo {
    fn from_data(data: Map<String, Value>) -> Self {
        let programs = |key: &str, models_key: &str| -> Vec<WyomingProgram> {
            let Some(Value::Array(list)) = data.get(key) else {
                return Vec::new();
            };
            list.iter()
                .filter_map(Value::as_object)
                .map(|p| WyomingProgram {
                    name: str_field(p, "name").unwrap_or_default(),
                    description: str_field(p, "description"),
                    version: str_field(p, "version"),
                    installed: p.get("installed").and_then(Value::as_bool).unwrap_or(false),
                    models: p
                        .get(models_key)
                        .and_then(Value::as_array)
                        .map(|ms| {
                            ms.iter()
                                .filter_map(Value::as_object)
                                .map(|m| WyomingModel {
                                    name: str_field(m, "name").unwrap_or_default(),
                                    languages: m
                                        .get("languages")
                                        .and_then(Value::as_array)
                                        .map(|ls| {
                                            ls.iter()
                                                .filter_map(Value::as_str)
                                                .map(str::to_string)
                                                .collect()
                                        })
                                        .unwrap_or_default(),
                                    installed: m
                                        .get("installed")
                                        .and_then(Value::as_bool)
                                        .unwrap_or(false),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        };
        WyomingInfo {
            asr: programs("asr", "models"),
            tts: programs("tts", "voices"),
            raw: data,
        }
    }

    /// One line for the start-up log: "asr: faster-whisper 2.4.0 (3 models: tiny-int8 [en], ...)".
    pub fn summary(&self) -> String {
        let list = |label: &str, what: &str, ps: &[WyomingProgram]| -> Option<String> {
            if ps.is_empty() {
                return None;
            }
            let progs: Vec<String> = ps
                .iter()
                .map(|p| {
                    let mut s = p.name.clone();
                    if let Some(v) = &p.version {
                        s.push(' ');
                        s.push_str(v);
                    }
                    let shown: Vec<String> = p
                        .models
                        .iter()
                        .take(3)
                        .map(|m| format!("{} [{}]", m.name, m.languages.join(",")))
                        .collect();
                    let more = if p.models.len() > 3 { ", ..." } else { "" };
                    format!(
                        "{s} ({} {what}: {}{more})",
                        p.models.len(),
                        shown.join(", ")
                    )
                })
                .collect();
            Some(format!("{label}: {}", progs.join("; ")))
        };
        let parts: Vec<String> = [
            list("asr", "models", &self.asr),
            list("tts", "voices", &self.tts),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            "no asr or tts programs".into()
        } else {
            parts.join("; ")
        }
    }
}

fn str_field(m: &Map<String, Value>, key: &str) -> Option<String> {
    m.get(key).and_then(Value::as_str).map(str::to_string)
}

/// A failure of one attempt, and whether a fresh connection may try again.
struct Failure {
    error: SpeechError,
    /// The server dropped the connection before answering anything (and, for the caller to add,
    /// nothing of the call was used yet).
    retry: bool,
}

impl From<SpeechError> for Failure {
    fn from(error: SpeechError) -> Self {
        Failure {
            error,
            retry: false,
        }
    }
}

/// The connection of one call, in halves so the turn's audio can go up while events come down.
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Some event has come from the server: the connection was not stale. (Atomic only so that the
    /// call's future stays `Send`; one task touches it.)
    answered: AtomicBool,
}

/// Where a server is and how long to wait for it. Shared by [`WyomingStt`] and [`WyomingTts`].
#[derive(Debug, Clone)]
struct Client {
    uri: String,
    service: String,
    connect_timeout: Duration,
    timeout: Duration,
}

impl Client {
    fn new(uri: &str) -> Self {
        Client {
            uri: uri.to_string(),
            service: format!("wyoming {uri}"),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    fn unavailable(&self, reason: String) -> SpeechError {
        SpeechError::Unavailable {
            service: self.service.clone(),
            reason,
        }
    }

    fn timed_out(&self, what: &str, limit: Duration) -> SpeechError {
        SpeechError::Timeout {
            service: self.service.clone(),
            what: what.to_string(),
            ms: limit.as_millis() as u64,
        }
    }

    fn protocol(&self, reason: String) -> SpeechError {
        SpeechError::Protocol {
            service: self.service.clone(),
            reason,
        }
    }

    fn failed(&self, reason: String) -> SpeechError {
        SpeechError::Failed {
            service: self.service.clone(),
            reason,
        }
    }

    async fn connect(&self) -> Result<Conn, SpeechError> {
        let (host, port) = parse_tcp_uri(&self.uri).map_err(|e| self.unavailable(e))?;
        let stream = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((host.as_str(), port)),
        )
        .await
        // Unreachable rather than slow: nothing has been asked of the service yet.
        .map_err(|_| {
            self.unavailable(format!(
                "no answer from {} within {} ms",
                self.uri,
                self.connect_timeout.as_millis()
            ))
        })?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                self.unavailable(format!("nothing listens at {} ({e})", self.uri))
            } else {
                self.unavailable(format!("cannot connect to {}: {e}", self.uri))
            }
        })?;
        // Audio chunks are small and latency-bound.
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Ok(Conn {
            reader: BufReader::new(r),
            writer: w,
            answered: AtomicBool::new(false),
        })
    }

    /// Write one event, bounded by `timeout` (a server that stops reading is dead).
    async fn write(
        &self,
        writer: &mut OwnedWriteHalf,
        answered: &AtomicBool,
        event: &Event,
    ) -> Result<(), Failure> {
        trace!(service = %self.service, event = %event.kind, bytes = event.payload.len(), "wyoming send");
        match tokio::time::timeout(self.timeout, writer.write_all(&event.encode())).await {
            Err(_) => Err(self
                .timed_out(&format!("sending {}", event.kind), self.timeout)
                .into()),
            Ok(Err(e)) => Err(Failure {
                error: self.failed(format!("connection lost sending {}: {e}", event.kind)),
                retry: !answered.load(Ordering::Relaxed),
            }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// The next event; `waiting_for` names it in errors. Bounded by `timeout` when `bounded`.
    async fn read(
        &self,
        reader: &mut BufReader<OwnedReadHalf>,
        answered: &AtomicBool,
        waiting_for: &str,
        bounded: bool,
    ) -> Result<Event, Failure> {
        let outcome = if bounded {
            match tokio::time::timeout(self.timeout, read_event(reader)).await {
                Err(_) => return Err(self.timed_out(waiting_for, self.timeout).into()),
                Ok(r) => r,
            }
        } else {
            read_event(reader).await
        };
        match outcome {
            Ok(Some(ev)) => {
                answered.store(true, Ordering::Relaxed);
                trace!(service = %self.service, event = %ev.kind, bytes = ev.payload.len(), "wyoming recv");
                Ok(ev)
            }
            Ok(None) => Err(Failure {
                error: self.failed(format!("closed the connection {waiting_for}")),
                retry: !answered.load(Ordering::Relaxed),
            }),
            Err(WireError::Io(e)) => Err(Failure {
                error: self.failed(format!("connection lost {waiting_for}: {e}")),
                retry: !answered.load(Ordering::Relaxed),
            }),
            Err(WireError::Malformed(m)) => Err(self.protocol(m).into()),
        }
    }

    async fn send(&self, conn: &mut Conn, event: &Event) -> Result<(), Failure> {
        self.write(&mut conn.writer, &conn.answered, event).await
    }

    async fn next(&self, conn: &mut Conn, waiting_for: &str) -> Result<Event, Failure> {
        self.read(&mut conn.reader, &conn.answered, waiting_for, true)
            .await
    }

    /// An `error` event as the call's failure.
    fn server_error(&self, ev: &Event) -> SpeechError {
        let text = str_field(&ev.data, "text").unwrap_or_else(|| "(no text)".into());
        match str_field(&ev.data, "code") {
            Some(code) => self.failed(format!("{text} (code {code})")),
            None => self.failed(text),
        }
    }

    fn skip(&self, ev: &Event, during: &str) {
        debug!(service = %self.service, event = %ev.kind, during, "wyoming: skipping an event");
    }

    /// Run `attempt` and, if it fails in a way that allows it, once more on a new connection.
    async fn with_retry<T, F, Fut>(&self, mut attempt: F) -> Result<T, SpeechError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        match attempt().await {
            Err(f) if f.retry => {
                self.note_retry(&f).await;
                attempt().await.map_err(|f| f.error)
            }
            r => r.map_err(|f| f.error),
        }
    }

    /// Log the first failure and wait a moment before the retry.
    async fn note_retry(&self, f: &Failure) {
        debug!(service = %self.service, error = %f.error, "dropped before any answer; retrying on a new connection");
        tokio::time::sleep(RETRY_WAIT).await;
    }

    async fn info(&self) -> Result<WyomingInfo, SpeechError> {
        self.with_retry(|| self.info_once()).await
    }

    async fn info_once(&self) -> Result<WyomingInfo, Failure> {
        let mut conn = self.connect().await?;
        self.send(&mut conn, &Event::new("describe")).await?;
        loop {
            let ev = self.next(&mut conn, "waiting for info").await?;
            match ev.kind.as_str() {
                "info" => return Ok(WyomingInfo::from_data(ev.data)),
                "error" => return Err(self.server_error(&ev).into()),
                _ => self.skip(&ev, "describe"),
            }
        }
    }
}

/// Run `work` unless `cancel` fires first; then `work` is dropped, and with it the connection.
async fn cancellable<T>(
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = Result<T, SpeechError>>,
) -> Result<T, SpeechError> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(SpeechError::Cancelled),
        r = work => r,
    }
}

/// Speech-to-text on a Wyoming server (wyoming-faster-whisper, wyoming-vosk, ...). The turn's audio is
/// streamed to the server while the user speaks.
#[derive(Debug, Clone)]
pub struct WyomingStt {
    client: Client,
    language: Option<String>,
}

impl WyomingStt {
    /// A client of the server at `uri` (`tcp://host:port`). Nothing is connected until a call; a bad
    /// URI fails each call as [`SpeechError::Unavailable`].
    pub fn new(uri: &str) -> Self {
        WyomingStt {
            client: Client::new(uri),
            language: None,
        }
    }

    /// Ask for this language ("en"); empty: the server's default.
    pub fn with_language(mut self, language: &str) -> Self {
        self.language = (!language.is_empty()).then(|| language.to_string());
        self
    }

    /// Bound on every wait on the server (not on the user's speech).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.client.timeout = timeout;
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.client.connect_timeout = timeout;
        self
    }

    /// What the server offers (`describe` -> `info`).
    pub async fn info(&self) -> Result<WyomingInfo, SpeechError> {
        self.client.info().await
    }

    async fn transcribe_once(
        &self,
        rate_hz: u32,
        audio: &mut mpsc::Receiver<Vec<i16>>,
    ) -> Result<Transcript, Failure> {
        let c = &self.client;
        let mut conn = c.connect().await?;
        let mut request = Map::new();
        if let Some(lang) = &self.language {
            request.insert("language".into(), Value::String(lang.clone()));
        }
        let format = AudioFormat::mono16(rate_hz);
        c.send(
            &mut conn,
            &Event::new("transcribe").with_data(Value::Object(request)),
        )
        .await?;
        c.send(
            &mut conn,
            &Event::new("audio-start").with_data(format.to_data()),
        )
        .await?;

        let Conn {
            reader,
            writer,
            answered,
        } = &mut conn;
        let answered = &*answered;
        // Once audio has been taken from the turn, a retry could not send it again.
        let consumed = AtomicBool::new(false);
        let uplink = async {
            while let Some(chunk) = audio.recv().await {
                if chunk.is_empty() {
                    continue;
                }
                consumed.store(true, Ordering::Relaxed);
                let payload: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
                let ev = Event::new("audio-chunk")
                    .with_data(format.to_data())
                    .with_payload(payload);
                c.write(writer, answered, &ev).await?;
            }
            c.write(writer, answered, &Event::new("audio-stop")).await
        };
        let downlink = async {
            loop {
                // Unbounded here: the deadline below starts at the end of the turn.
                let ev = c
                    .read(reader, answered, "before the transcript", false)
                    .await?;
                match ev.kind.as_str() {
                    "transcript" => {
                        return Ok(Transcript {
                            text: str_field(&ev.data, "text")
                                .unwrap_or_default()
                                .trim()
                                .to_string(),
                            language: str_field(&ev.data, "language"),
                        });
                    }
                    "error" => return Err(Failure::from(c.server_error(&ev))),
                    // transcript-start/-chunk/-stop of streaming servers: the final transcript follows.
                    _ => c.skip(&ev, "transcribe"),
                }
            }
        };
        tokio::pin!(uplink, downlink);
        // The server has no reason to answer before the end of the turn: the wait for the transcript
        // is bounded from there.
        let deadline = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(deadline);
        let mut turn_over = false;
        let no_retry_once_used = |mut f: Failure| {
            f.retry = f.retry && !consumed.load(Ordering::Relaxed);
            f
        };
        loop {
            tokio::select! {
                r = &mut uplink, if !turn_over => {
                    r.map_err(no_retry_once_used)?;
                    turn_over = true;
                    deadline.as_mut().reset(tokio::time::Instant::now() + c.timeout);
                }
                // A server with its own end-of-speech detection may answer before the turn ends.
                r = &mut downlink => return r.map_err(no_retry_once_used),
                _ = &mut deadline, if turn_over => {
                    return Err(c.timed_out("waiting for the transcript", c.timeout).into());
                }
            }
        }
    }
}

impl SpeechToText for WyomingStt {
    fn describe(&self) -> String {
        self.client.service.clone()
    }

    fn transcribe<'a>(
        &'a self,
        rate_hz: u32,
        mut audio: mpsc::Receiver<Vec<i16>>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, Transcript> {
        Box::pin(async move {
            // As `Client::with_retry`, written out: the attempt borrows the turn's audio mutably.
            let work = async {
                match self.transcribe_once(rate_hz, &mut audio).await {
                    Err(f) if f.retry => {
                        self.client.note_retry(&f).await;
                        self.transcribe_once(rate_hz, &mut audio)
                            .await
                            .map_err(|f| f.error)
                    }
                    r => r.map_err(|f| f.error),
                }
            };
            cancellable(&cancel, work).await
        })
    }
}

/// Text-to-speech on a Wyoming server (wyoming-piper, ...). Audio is forwarded chunk by chunk as the
/// server sends it.
#[derive(Debug, Clone)]
pub struct WyomingTts {
    client: Client,
    voice: Option<String>,
}

impl WyomingTts {
    /// A client of the server at `uri` (`tcp://host:port`); see [`WyomingStt::new`].
    pub fn new(uri: &str) -> Self {
        WyomingTts {
            client: Client::new(uri),
            voice: None,
        }
    }

    /// Ask for this voice, by the name the server's `info` lists; empty: the server's default.
    pub fn with_voice(mut self, voice: &str) -> Self {
        self.voice = (!voice.is_empty()).then(|| voice.to_string());
        self
    }

    /// Bound on every wait on the server: the first chunk, and each next one.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.client.timeout = timeout;
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.client.connect_timeout = timeout;
        self
    }

    /// What the server offers (`describe` -> `info`).
    pub async fn info(&self) -> Result<WyomingInfo, SpeechError> {
        self.client.info().await
    }

    async fn synthesize_once(
        &self,
        text: &str,
        out: &mpsc::Sender<Pcm>,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<SynthStats, Failure> {
        let c = &self.client;
        let mut conn = c.connect().await?;
        let mut request = Map::new();
        request.insert("text".into(), Value::String(text.to_string()));
        if let Some(voice) = &self.voice {
            request.insert("voice".into(), json!({ "name": voice }));
        }
        c.send(
            &mut conn,
            &Event::new("synthesize").with_data(Value::Object(request)),
        )
        .await?;
        let mut stream_format: Option<AudioFormat> = None;
        let mut stats = SynthStats::default();
        let mut audio_us: u64 = 0;
        // A sample split across two chunks waits here for its other byte.
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let waiting = if stats.first_chunk_ms.is_none() {
                "waiting for the first audio"
            } else {
                "waiting for more audio"
            };
            let ev = c.next(&mut conn, waiting).await?;
            match ev.kind.as_str() {
                "audio-start" => {
                    stream_format = AudioFormat::from_data(&ev.kind, &ev.data)
                        .map_err(|m| Failure::from(c.protocol(m)))?;
                    carry.clear();
                }
                "audio-chunk" => {
                    let format = AudioFormat::from_data(&ev.kind, &ev.data)
                        .map_err(|m| Failure::from(c.protocol(m)))?
                        .or(stream_format)
                        .ok_or_else(|| {
                            Failure::from(c.protocol(
                                "audio-chunk without a format and no audio-start before it".into(),
                            ))
                        })?;
                    if format.width != 2 {
                        return Err(c
                            .protocol(format!(
                                "audio-chunk of {}-byte samples; hearken takes 16-bit audio",
                                format.width
                            ))
                            .into());
                    }
                    carry.extend_from_slice(&ev.payload);
                    let samples = take_mono16(&mut carry, format.channels as usize);
                    if samples.is_empty() {
                        continue;
                    }
                    audio_us += samples.len() as u64 * 1_000_000 / format.rate_hz as u64;
                    let pcm = Pcm {
                        rate_hz: format.rate_hz,
                        samples,
                    };
                    // Backpressure from playback is not the server's delay: no timeout here.
                    let Ok(permit) = out.reserve().await else {
                        // Nobody listens any more: as good as cancelled.
                        return Err(SpeechError::Cancelled.into());
                    };
                    // Checked after the wait, so nothing goes out once the caller has cancelled.
                    if cancel.is_cancelled() {
                        return Err(SpeechError::Cancelled.into());
                    }
                    permit.send(pcm);
                    stats
                        .first_chunk_ms
                        .get_or_insert(started.elapsed().as_millis() as u64);
                }
                "audio-stop" => {
                    stats.audio_ms = audio_us / 1_000;
                    return Ok(stats);
                }
                "error" => return Err(c.server_error(&ev).into()),
                _ => c.skip(&ev, "synthesize"),
            }
        }
    }
}

/// Whole frames of 16-bit little-endian `channels`-channel audio from the front of `bytes`, mixed to
/// mono; a partial frame stays in `bytes`.
fn take_mono16(bytes: &mut Vec<u8>, channels: usize) -> Vec<i16> {
    let frame = 2 * channels.max(1);
    let whole = bytes.len() / frame * frame;
    let samples = bytes[..whole]
        .chunks_exact(frame)
        .map(|f| {
            let sum: i32 = f
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as i32)
                .sum();
            (sum / channels.max(1) as i32) as i16
        })
        .collect();
    bytes.drain(..whole);
    samples
}

impl TextToSpeech for WyomingTts {
    fn describe(&self) -> String {
        self.client.service.clone()
    }

    fn synthesize<'a>(
        &'a self,
        text: &'a str,
        out: mpsc::Sender<Pcm>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, SynthStats> {
        Box::pin(async move {
            let started = Instant::now();
            if text.trim().is_empty() {
                return Ok(SynthStats::default());
            }
            // A retry is only possible while no audio went out: nothing is resent twice.
            let work = self
                .client
                .with_retry(|| self.synthesize_once(text, &out, &cancel, started));
            cancellable(&cancel, work).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decode(bytes: &[u8]) -> Vec<Result<Event, String>> {
        let mut r = BufReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match read_event(&mut r).await {
                Ok(Some(ev)) => out.push(Ok(ev)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn encode_decode_round_trip() {
        let ev = Event::new("audio-chunk")
            .with_data(json!({"rate": 16000, "width": 2, "channels": 1}))
            .with_payload(vec![1, 2, 3, 4]);
        let wire = ev.encode();
        let line_end = wire.iter().position(|&b| b == b'\n').expect("newline");
        let header: Value = serde_json::from_slice(&wire[..line_end]).expect("json");
        assert_eq!(header["type"], "audio-chunk");
        assert_eq!(header["payload_length"], 4);
        assert_eq!(header["data"]["rate"], 16000);
        assert_eq!(&wire[line_end + 1..], &[1, 2, 3, 4]);
        let back = decode(&wire).await;
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref().expect("event"), &ev);
        // No data and no payload: just the type.
        assert_eq!(
            Event::new("describe").encode(),
            b"{\"type\":\"describe\"}\n"
        );
    }

    #[tokio::test]
    async fn extra_data_is_merged_over_inline_data() {
        // What the Python library writes: data in data_length bytes after the header.
        let extra = br#"{"text":"hello","language":"en"}"#;
        let mut wire = format!(
            "{{\"type\":\"transcript\",\"data\":{{\"text\":\"old\",\"x\":1}},\"data_length\":{},\"version\":\"1.5.4\"}}\n",
            extra.len()
        )
        .into_bytes();
        wire.extend_from_slice(extra);
        wire.extend_from_slice(b"\n{\"type\":\"audio-stop\"}\n");
        let evs = decode(&wire).await;
        let ev = evs[0].as_ref().expect("transcript");
        assert_eq!(ev.data["text"], "hello");
        assert_eq!(ev.data["language"], "en");
        assert_eq!(ev.data["x"], 1);
        // The blank line between events is skipped.
        assert_eq!(evs[1].as_ref().expect("stop").kind, "audio-stop");
        assert_eq!(evs.len(), 2);
    }

    #[tokio::test]
    async fn malformed_input_is_named() {
        for (wire, want) in [
            (&b"hello there\n"[..], "not a JSON event header"),
            (b"[1,2]\n", "not a JSON object"),
            (b"{\"data\":{}}\n", "without a \"type\""),
            (
                b"{\"type\":\"x\",\"data\":5}\n",
                "\"data\" is not an object",
            ),
            (b"{\"type\":\"x\",\"payload_length\":-1}\n", "not a length"),
            (
                b"{\"type\":\"x\",\"payload_length\":99999999999}\n",
                "over the limit",
            ),
            (
                b"{\"type\":\"x\",\"data_length\":3}\nabc",
                "extra data is not JSON",
            ),
            (b"{\"type\":\"x\",\"payload_length\":10}\nabc", "early eof"),
            (b"{\"type\":\"x\"", "inside an event header"),
        ] {
            let evs = decode(wire).await;
            let last = evs.last().expect("something");
            let e = last.as_ref().expect_err(&String::from_utf8_lossy(wire));
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        let long = vec![b'x'; MAX_HEADER_BYTES + 10];
        let evs = decode(&long).await;
        assert!(evs[0].as_ref().expect_err("long").contains("longer than"));
    }

    #[test]
    fn audio_format_and_mono_mix() {
        let d = json!({"rate": 22050, "width": 2, "channels": 2, "timestamp": 0});
        let Value::Object(m) = d else { panic!() };
        assert_eq!(
            AudioFormat::from_data("audio-start", &m),
            Ok(Some(AudioFormat {
                rate_hz: 22050,
                width: 2,
                channels: 2
            }))
        );
        assert_eq!(AudioFormat::from_data("audio-start", &Map::new()), Ok(None));
        let Value::Object(bad) = json!({"rate": 0, "width": 2, "channels": 1}) else {
            panic!()
        };
        assert!(AudioFormat::from_data("audio-chunk", &bad).is_err());
        // Stereo frames (100, 300) and (-4, -6), then half a frame.
        let mut bytes: Vec<u8> = [100i16, 300, -4, -6]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        bytes.extend_from_slice(&[7, 0, 9]);
        assert_eq!(take_mono16(&mut bytes, 2), vec![200, -5]);
        assert_eq!(bytes, vec![7, 0, 9]);
    }

    #[test]
    fn info_summary() {
        let Value::Object(data) = json!({
            "asr": [{"name": "faster-whisper", "version": "2.4.0", "installed": true,
                     "attribution": {"name": "x", "url": "y"},
                     "models": [{"name": "tiny-int8", "languages": ["en"], "installed": true}]}],
            "tts": [],
            "wake": [{"name": "openwakeword"}]
        }) else {
            panic!()
        };
        let info = WyomingInfo::from_data(data);
        assert_eq!(info.asr.len(), 1);
        assert_eq!(info.asr[0].models[0].languages, vec!["en"]);
        assert!(info.tts.is_empty());
        assert!(info.raw.contains_key("wake"));
        assert_eq!(
            info.summary(),
            "asr: faster-whisper 2.4.0 (1 models: tiny-int8 [en])"
        );
    }
}
