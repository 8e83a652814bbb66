//! HTTP(S) transport for agents that answer a `POST` with a Server-Sent Events body (H2A): hyper 1.x
//! HTTP/1.1 over TCP, or over rustls (`ring` provider, the same trust setup as [`super::ws`]).
//!
//! - [`SseParser`]: a pure, incremental W3C event-stream parser (CRLF / LF / CR line ends, multi-line
//!   `data:`, `:` comments, `id:`, `event:`, `retry:`, an optional BOM), fed arbitrary byte splits.
//! - [`connect`]: one connection attempt to an H2A agent: the `http://` rule (refused to a
//!   non-loopback host unless `allow_insecure`), AgentCard discovery (`/.well-known/h2a-agent.json`,
//!   then the TS mock's `/.well-known/h2a.json`; a URL ending in `.json` is the card itself), and the
//!   endpoint base from `endpoint.h2a` (relative values resolved against the card's origin, a trailing
//!   `/session` stripped).
//! - [`H2aConnection`] (an [`AgentConnection`]): `send` takes the codec's envelope
//!   ([`crate::protocol::h2a::H2aPost`]: `{"post": "session"|"signal", "session"?: id, "body": {..}}`).
//!   A `session` post is awaited: its `text/event-stream` answer becomes the stream `recv` reads
//!   (replacing an earlier one). A `signal` post carries `X-H2A-Session` and runs in the background
//!   (the TS mock holds a signal's answer until its whole reply has streamed), so a barge-in is never
//!   stuck behind a message; its failure comes out of the next `recv`. At most 8 are in flight; a
//!   ninth waits for one of them. `recv` yields each event's
//!   `data` as [`Wire::Text`]; comments (keepalives) only refresh [`AgentConnection::last_rx`].
//!
//! Every request carries `Authorization: Bearer <token>` when a token is set (marked sensitive, never
//! logged). One-shot answers are capped at [`SseSettings::max_response_bytes`], each SSE event at
//! `max_event_bytes`. Keepalive and reconnect are the link's job.
//!
//! Context: tokio (the link task). Each HTTP connection is driven by a spawned task that the
//! [`H2aConnection`] aborts when dropped. `recv` is cancel-safe; `send` of a `session` post is not
//! (drop the connection if it is cancelled).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::rustls::pki_types::ServerName;
use tracing::{debug, trace, warn};

use super::{AgentConnection, TransportError, TransportFuture};
use crate::config::{AgentConfig, Secret, TlsRoots, TokenMode, is_loopback_url};
use crate::protocol::Wire;
use crate::transport::ws::{self, DEFAULT_CONNECT_TIMEOUT, WsSettings};

/// The spec's discovery path.
pub const CARD_PATH: &str = "/.well-known/h2a-agent.json";
/// Where the TypeScript mock agent serves its card.
pub const MOCK_CARD_PATH: &str = "/.well-known/h2a.json";
/// One-shot requests (card, signals): headers and body together.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest one-shot answer (the card, a signal's `{"ok":true}`).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Signals in flight at once; more is a stuck agent.
const MAX_SIGNALS_IN_FLIGHT: usize = 8;

// ------------------------------------------------------------------------------------ SSE parser

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (or `"message"` when the event named none).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id (`id:`) seen so far in the stream.
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("SSE event over {limit} bytes")]
    TooLarge { limit: usize },
}

/// Incremental W3C event-stream parser. Pure: bytes in, events out.
#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    /// The last line ended with CR: a LF right after it is part of the same line end.
    after_cr: bool,
    started: bool,
    data: String,
    has_data: bool,
    event: String,
    last_id: String,
    retry_ms: Option<u64>,
    comments: u64,
    max_event_bytes: usize,
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            started: false,
            data: String::new(),
            has_data: false,
            event: String::new(),
            last_id: String::new(),
            retry_ms: None,
            comments: 0,
            max_event_bytes,
        }
    }

    /// The reconnection time the server asked for (`retry:`), if any.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Comment lines seen (keepalives).
    pub fn comments(&self) -> u64 {
        self.comments
    }

    /// Feed the next bytes; complete events are appended to `out`.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if !self.started {
            // A UTF-8 BOM may open the stream (possibly split across chunks).
            let bom = [0xEF, 0xBB, 0xBF];
            let have = self.line.len();
            let need = 3 - have;
            let take = need.min(chunk.len());
            let candidate: Vec<u8> = self
                .line
                .iter()
                .copied()
                .chain(chunk[..take].iter().copied())
                .collect();
            if bom.starts_with(&candidate) {
                if candidate.len() < 3 {
                    self.line = candidate;
                    return Ok(());
                }
                self.line.clear();
                chunk = &chunk[take..];
                self.started = true;
            } else {
                self.started = true;
            }
        }
        for &b in chunk {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                b'\n' => self.end_line(out),
                _ => {
                    if self.line.len() + self.data.len() >= self.max_event_bytes {
                        return Err(SseError::TooLarge {
                            limit: self.max_event_bytes,
                        });
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(&line);
        if line.is_empty() {
            if self.has_data {
                let mut data = std::mem::take(&mut self.data);
                if data.ends_with('\n') {
                    data.pop();
                }
                let event = std::mem::take(&mut self.event);
                out.push(SseEvent {
                    event: if event.is_empty() {
                        "message".into()
                    } else {
                        event
                    },
                    data,
                    id: self.last_id.clone(),
                });
            }
            self.has_data = false;
            self.data.clear();
            self.event.clear();
            return;
        }
        if line.starts_with(':') {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                self.has_data = true;
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.last_id = value.to_string(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
    }
}

// ------------------------------------------------------------------------------------ URLs

/// An http(s) origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tls: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
    explicit_port: bool,
}

impl Origin {
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.explicit_port {
            format!("{host}:{}", self.port)
        } else {
            host
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}://{}{path}",
            if self.tls { "https" } else { "http" },
            self.authority()
        )
    }
}

/// Split an http(s) URL into its origin and path (with query; no fragment).
pub fn parse_http_url(url: &str) -> Result<(Origin, String), TransportError> {
    let bad = |why: &str| {
        TransportError::Url(format!(
            "{why} ({})",
            url.split(['?', '#']).next().unwrap_or_default()
        ))
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected http(s)://host[:port]/path"))?;
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        _ => return Err(bad("the scheme must be http or https")),
    };
    let rest = rest.split('#').next().unwrap_or_default();
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        return Err(bad(
            "credentials in the URL are not supported; use agent.token_file",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("invalid IPv6 address"));
        }
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| bad("invalid port"))?),
            ),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let explicit_port = port.is_some();
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("invalid port"))?,
        None if tls => 443,
        None => 80,
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Ok((
        Origin {
            tls,
            host: host.to_string(),
            port,
            explicit_port,
        },
        path,
    ))
}

/// The H2A endpoint base: `{base}/session`, `{base}/signal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub origin: Origin,
    /// No trailing `/`, e.g. `/h2a`.
    pub base_path: String,
}

impl Endpoint {
    pub fn url(&self, route: &str) -> String {
        self.origin.url(&format!("{}/{route}", self.base_path))
    }
}

/// `endpoint.h2a` of a card fetched from `card_origin`: absolute or relative, `/session` stripped.
pub fn resolve_endpoint(card_origin: &Origin, h2a: &str) -> Result<Endpoint, TransportError> {
    let (origin, path) = if h2a.contains("://") {
        parse_http_url(h2a)?
    } else if h2a.starts_with('/') {
        (card_origin.clone(), h2a.to_string())
    } else {
        (card_origin.clone(), format!("/{h2a}"))
    };
    let path = path.split('?').next().unwrap_or_default();
    let mut base = path.trim_end_matches('/').to_string();
    if let Some(b) = base.strip_suffix("/session") {
        base = b.to_string();
    }
    Ok(Endpoint {
        origin,
        base_path: base,
    })
}

// ------------------------------------------------------------------------------------ HTTP client

/// Everything one connection attempt needs. `Debug` prints the token as `***`.
#[derive(Debug, Clone)]
pub struct SseSettings {
    /// The agent's origin, its card URL (ending in `.json`), or its endpoint base.
    pub url: String,
    pub token: Option<Secret>,
    pub allow_insecure: bool,
    pub ca_file: Option<PathBuf>,
    pub roots: TlsRoots,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_response_bytes: usize,
    /// Largest single SSE event.
    pub max_event_bytes: usize,
}

impl SseSettings {
    pub fn from_config(cfg: &AgentConfig, token: Option<Secret>) -> Self {
        SseSettings {
            url: cfg.url.clone(),
            token,
            allow_insecure: cfg.allow_insecure,
            ca_file: (!cfg.ca_file.is_empty()).then(|| PathBuf::from(&cfg.ca_file)),
            roots: cfg.tls_roots,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_event_bytes: cfg.max_frame_bytes as usize,
        }
    }

    fn check_insecure(&self, origin: &Origin) -> Result<(), TransportError> {
        let url = origin.url("/");
        if !origin.tls && !self.allow_insecure && !is_loopback_url(&url) {
            return Err(TransportError::Insecure(origin.authority()));
        }
        Ok(())
    }
}

/// Aborts the task driving an HTTP connection when dropped.
#[derive(Debug)]
struct ConnTask(AbortHandle);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// Opens HTTP/1.1 connections with the configured TLS.
#[derive(Clone)]
struct Dialer {
    settings: SseSettings,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Dialer {
    fn new(settings: SseSettings) -> Result<Self, TransportError> {
        let ws_like = WsSettings {
            url: settings.url.clone(),
            token: None,
            token_mode: TokenMode::Query,
            allow_insecure: settings.allow_insecure,
            ca_file: settings.ca_file.clone(),
            roots: settings.roots,
            max_frame_bytes: settings.max_event_bytes,
            connect_timeout: settings.connect_timeout,
        };
        let needs_tls = settings.url.to_ascii_lowercase().starts_with("https://");
        let tls = if needs_tls {
            Some(ws::tls_connector(&ws_like)?)
        } else {
            None
        };
        Ok(Dialer { settings, tls })
    }

    async fn dial(&self, origin: &Origin) -> Result<(Sender, ConnTask), TransportError> {
        self.settings.check_insecure(origin)?;
        let fut = async {
            let tcp = TcpStream::connect((origin.host.as_str(), origin.port))
                .await
                .map_err(TransportError::Connect)?;
            let _ = tcp.set_nodelay(true);
            if origin.tls {
                let tls = match &self.tls {
                    Some(t) => t.clone(),
                    None => {
                        let ws_like = WsSettings {
                            url: origin.url("/"),
                            token: None,
                            token_mode: TokenMode::Query,
                            allow_insecure: false,
                            ca_file: self.settings.ca_file.clone(),
                            roots: self.settings.roots,
                            max_frame_bytes: 0,
                            connect_timeout: self.settings.connect_timeout,
                        };
                        ws::tls_connector(&ws_like)?
                    }
                };
                let name = ServerName::try_from(origin.host.clone())
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ws::tls_handshake_error(&e))?;
                handshake(stream).await
            } else {
                handshake(tcp).await
            }
        };
        tokio::time::timeout(self.settings.connect_timeout, fut)
            .await
            .map_err(|_| TransportError::Timeout)?
    }

    fn request(
        &self,
        method: &str,
        origin: &Origin,
        path: &str,
        session: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>, TransportError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, origin.authority())
            .header(
                header::USER_AGENT,
                concat!("hearken/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = self.settings.token.as_ref().filter(|t| !t.is_empty()) {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", t.expose())).map_err(|_| {
                TransportError::Auth(
                    "the token has characters not allowed in an HTTP header".into(),
                )
            })?;
            v.set_sensitive(true);
            b = b.header(header::AUTHORIZATION, v);
        }
        if let Some(s) = session {
            let v = HeaderValue::from_str(s)
                .map_err(|_| TransportError::Io("session id not fit for a header".into()))?;
            b = b.header("X-H2A-Session", v);
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| TransportError::Url(e.to_string()))
    }
}

async fn handshake<S>(io: S) -> Result<(Sender, ConnTask), TransportError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| TransportError::Handshake(e.to_string()))?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            trace!(error = %e, "HTTP connection ended");
        }
    });
    Ok((sender, ConnTask(task.abort_handle())))
}

fn status_error(status: StatusCode, what: &str, body: &[u8]) -> TransportError {
    let text: String = String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(120)
        .collect();
    let detail = if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            TransportError::Auth(format!("HTTP {status} for {what}{detail}"))
        }
        s if s.is_server_error() || s == StatusCode::NOT_FOUND || s == StatusCode::GONE => {
            TransportError::Closed {
                code: s.as_u16(),
                reason: format!("{what}{detail}"),
            }
        }
        s => TransportError::Handshake(format!("HTTP {s} for {what}{detail}")),
    }
}

/// Read a whole body, at most `limit` bytes.
async fn read_limited(body: &mut Incoming, limit: usize) -> Result<Vec<u8>, TransportError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| TransportError::Io(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(TransportError::TooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// One request on a fresh or idle connection, the whole answer read (bounded).
async fn one_shot(
    dialer: &Dialer,
    sender: Option<(Sender, ConnTask)>,
    origin: &Origin,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Vec<u8>, Option<(Sender, ConnTask)>), TransportError> {
    let fut = async {
        let (mut sender, task) = match sender {
            Some(s) => s,
            None => dialer.dial(origin).await?,
        };
        sender
            .ready()
            .await
            .map_err(|e| TransportError::Io(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| TransportError::Io(e.to_string()))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let bytes = read_limited(&mut body, dialer.settings.max_response_bytes).await?;
        let reusable = (!sender.is_closed()).then_some((sender, task));
        Ok((status, bytes, reusable))
    };
    tokio::time::timeout(dialer.settings.request_timeout, fut)
        .await
        .map_err(|_| TransportError::Timeout)?
}

/// GET a JSON document.
async fn get_json(
    dialer: &Dialer,
    origin: &Origin,
    path: &str,
) -> Result<(StatusCode, Value), TransportError> {
    let req = dialer.request("GET", origin, path, None, None)?;
    let (status, body, _) = one_shot(dialer, None, origin, req).await?;
    if !status.is_success() {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_slice(&body)
        .map_err(|e| TransportError::Handshake(format!("{path} is not JSON: {e}")))?;
    Ok((status, v))
}

/// Find the AgentCard and the endpoint base for `settings.url`.
pub async fn discover(settings: &SseSettings) -> Result<(Value, Endpoint), TransportError> {
    let dialer = Dialer::new(settings.clone())?;
    discover_with(&dialer).await
}

async fn discover_with(dialer: &Dialer) -> Result<(Value, Endpoint), TransportError> {
    let (origin, path) = parse_http_url(&dialer.settings.url)?;
    dialer.settings.check_insecure(&origin)?;
    let path_only = path.split('?').next().unwrap_or_default().to_string();
    let candidates: Vec<String> = if path_only.ends_with(".json") {
        vec![path.clone()]
    } else {
        vec![CARD_PATH.into(), MOCK_CARD_PATH.into()]
    };
    for p in &candidates {
        let (status, card) = get_json(dialer, &origin, p).await?;
        if status.is_success() {
            let Some(h2a) = card
                .get("endpoint")
                .and_then(|e| e.get("h2a"))
                .and_then(Value::as_str)
            else {
                return Err(TransportError::Handshake(format!(
                    "the AgentCard at {p} has no endpoint.h2a"
                )));
            };
            let endpoint = resolve_endpoint(&origin, h2a)?;
            dialer.settings.check_insecure(&endpoint.origin)?;
            debug!(card = p.as_str(), endpoint = %endpoint.url("session"), name = ?card.get("name"), "H2A agent discovered");
            return Ok((card, endpoint));
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(status_error(status, p, &[]));
        }
        debug!(path = p.as_str(), %status, "no AgentCard here");
    }
    if path_only.len() > 1 && !path_only.ends_with(".json") {
        // No card, but the URL names the endpoint base itself.
        let endpoint = resolve_endpoint(&origin, &path_only)?;
        warn!(endpoint = %endpoint.url("session"), "no H2A AgentCard found; using agent.url as the endpoint base");
        return Ok((Value::Null, endpoint));
    }
    Err(TransportError::Handshake(format!(
        "no H2A AgentCard at {CARD_PATH} or {MOCK_CARD_PATH}"
    )))
}

/// An outgoing envelope (the codec's `H2aPost`; the fields are the contract).
#[derive(Debug, Deserialize)]
struct Envelope {
    post: String,
    #[serde(default)]
    session: Option<String>,
    body: Value,
}

/// One H2A agent session over HTTP: the SSE stream of the last `session` post, plus signal posts.
pub struct H2aConnection {
    dialer: Dialer,
    endpoint: Endpoint,
    card: Value,
    stream: Option<(Incoming, ConnTask)>,
    parser: SseParser,
    ready: VecDeque<Wire>,
    idle: Option<(Sender, ConnTask)>,
    idle_rx: mpsc::Receiver<(Sender, ConnTask)>,
    idle_tx: mpsc::Sender<(Sender, ConnTask)>,
    failures_rx: mpsc::Receiver<TransportError>,
    failures_tx: mpsc::Sender<TransportError>,
    signals: JoinSet<()>,
    last_rx: Instant,
    closed: bool,
}

impl std::fmt::Debug for H2aConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2aConnection")
            .field("endpoint", &self.endpoint)
            .field("streaming", &self.stream.is_some())
            .finish_non_exhaustive()
    }
}

/// Discover the agent (see the module docs). The stream opens with the codec's first frame
/// (`session.open` or `session.resume`), which the link sends right after this returns.
pub async fn connect(
    cfg: &AgentConfig,
    token: Option<Secret>,
) -> Result<H2aConnection, TransportError> {
    connect_with(SseSettings::from_config(cfg, token)).await
}

/// [`connect`] with explicit settings.
pub async fn connect_with(settings: SseSettings) -> Result<H2aConnection, TransportError> {
    let dialer = Dialer::new(settings)?;
    let (card, endpoint) = discover_with(&dialer).await?;
    let (idle_tx, idle_rx) = mpsc::channel(MAX_SIGNALS_IN_FLIGHT);
    let (failures_tx, failures_rx) = mpsc::channel(MAX_SIGNALS_IN_FLIGHT);
    let max_event = dialer.settings.max_event_bytes;
    Ok(H2aConnection {
        dialer,
        endpoint,
        card,
        stream: None,
        parser: SseParser::new(max_event),
        ready: VecDeque::new(),
        idle: None,
        idle_rx,
        idle_tx,
        failures_rx,
        failures_tx,
        signals: JoinSet::new(),
        last_rx: Instant::now(),
        closed: false,
    })
}

impl H2aConnection {
    /// The AgentCard (`Null` when the URL named the endpoint base and no card was found).
    pub fn card(&self) -> &Value {
        &self.card
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn open_stream(&mut self, body: Vec<u8>) -> Result<(), TransportError> {
        let path = format!("{}/session", self.endpoint.base_path);
        let mut req =
            self.dialer
                .request("POST", &self.endpoint.origin, &path, None, Some(body))?;
        req.headers_mut().insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let fut = async {
            let (mut sender, task) = self.dialer.dial(&self.endpoint.origin).await?;
            sender
                .ready()
                .await
                .map_err(|e| TransportError::Io(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| TransportError::Io(e.to_string()))?;
            Ok::<_, TransportError>((resp, task))
        };
        let (resp, task) = tokio::time::timeout(self.dialer.settings.connect_timeout, fut)
            .await
            .map_err(|_| TransportError::Timeout)??;
        let status = resp.status();
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
        let mut body = resp.into_body();
        if !status.is_success() || !is_sse {
            let text = read_limited(&mut body, 4096).await.unwrap_or_default();
            if status.is_success() {
                return Err(TransportError::Handshake(format!(
                    "POST {path} answered without text/event-stream"
                )));
            }
            return Err(status_error(status, &format!("POST {path}"), &text));
        }
        debug!(url = %self.endpoint.url("session"), "H2A event stream open");
        self.stream = Some((body, task));
        self.parser = SseParser::new(self.dialer.settings.max_event_bytes);
        self.last_rx = Instant::now();
        Ok(())
    }

    async fn post_signal(
        &mut self,
        session: Option<String>,
        body: Vec<u8>,
    ) -> Result<(), TransportError> {
        while self.signals.try_join_next().is_some() {}
        if self.signals.len() >= MAX_SIGNALS_IN_FLIGHT {
            // Back-pressure: wait for one to be answered (each is bounded by request_timeout).
            let wait = self.dialer.settings.request_timeout;
            if tokio::time::timeout(wait, self.signals.join_next())
                .await
                .is_err()
            {
                return Err(TransportError::Io(format!(
                    "{MAX_SIGNALS_IN_FLIGHT} signals unanswered: the agent is stuck"
                )));
            }
        }
        if self.idle.is_none() {
            self.idle = self.idle_rx.try_recv().ok();
        }
        let path = format!("{}/signal", self.endpoint.base_path);
        let req = self.dialer.request(
            "POST",
            &self.endpoint.origin,
            &path,
            session.as_deref(),
            Some(body),
        )?;
        let reuse = self.idle.take().filter(|(s, _)| s.is_ready());
        let dialer = self.dialer.clone();
        let origin = self.endpoint.origin.clone();
        let idle_tx = self.idle_tx.clone();
        let failures = self.failures_tx.clone();
        self.signals.spawn(async move {
            match one_shot(&dialer, reuse, &origin, req).await {
                Ok((status, body, reusable)) => {
                    if let Some(r) = reusable {
                        let _ = idle_tx.try_send(r);
                    }
                    if status.is_success() {
                        trace!(%status, "H2A signal accepted");
                    } else if status == StatusCode::TOO_MANY_REQUESTS
                        || status == StatusCode::BAD_REQUEST
                    {
                        // The agent refused this one signal; the session goes on.
                        warn!(%status, body = %String::from_utf8_lossy(&body).chars().take(120).collect::<String>(), "H2A signal refused");
                    } else {
                        let _ = failures.try_send(status_error(status, &format!("POST {path}"), &body));
                    }
                }
                Err(e) => {
                    let _ = failures.try_send(e);
                }
            }
        });
        Ok(())
    }

    async fn recv_inner(&mut self) -> Option<Result<Wire, TransportError>> {
        loop {
            if let Some(w) = self.ready.pop_front() {
                return Some(Ok(w));
            }
            if self.closed {
                return None;
            }
            let Some((body, _)) = self.stream.as_mut() else {
                // No stream yet: only a failed signal can wake us.
                return self.failures_rx.recv().await.map(Err);
            };
            let frame = tokio::select! {
                f = body.frame() => f,
                e = self.failures_rx.recv() => {
                    if let Some(e) = e {
                        return Some(Err(e));
                    }
                    continue;
                }
            };
            match frame {
                None => {
                    debug!("H2A event stream ended");
                    self.stream = None;
                    return None;
                }
                Some(Err(e)) => {
                    self.stream = None;
                    return Some(Err(TransportError::Io(e.to_string())));
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    self.last_rx = Instant::now();
                    let mut events = Vec::new();
                    if let Err(e) = self.parser.feed(&data, &mut events) {
                        self.stream = None;
                        return Some(Err(match e {
                            SseError::TooLarge { limit } => TransportError::TooLarge { limit },
                        }));
                    }
                    for ev in events {
                        trace!(event = %ev.event, id = %ev.id, bytes = ev.data.len(), "SSE event");
                        self.ready.push_back(Wire::Text(ev.data));
                    }
                }
            }
        }
    }
}

impl AgentConnection for H2aConnection {
    fn send(&mut self, frame: Wire) -> TransportFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let Wire::Text(text) = frame else {
                return Err(TransportError::Io("H2A sends JSON text only".into()));
            };
            let env: Envelope = serde_json::from_str(&text)
                .map_err(|e| TransportError::Io(format!("not an H2A post envelope: {e}")))?;
            let body =
                serde_json::to_vec(&env.body).map_err(|e| TransportError::Io(e.to_string()))?;
            match env.post.as_str() {
                "session" => self.open_stream(body).await,
                "signal" => self.post_signal(env.session, body).await,
                other => Err(TransportError::Io(format!("unknown H2A route {other:?}"))),
            }
        })
    }

    fn recv(&mut self) -> TransportFuture<'_, Option<Result<Wire, TransportError>>> {
        Box::pin(self.recv_inner())
    }

    fn ping(&mut self) -> TransportFuture<'_, ()> {
        // SSE has no client ping: the agent's comment keepalives refresh `last_rx`.
        Box::pin(async {})
    }

    fn close(&mut self) -> TransportFuture<'_, ()> {
        Box::pin(async move {
            self.closed = true;
            self.stream = None;
            self.idle = None;
            self.signals.abort_all();
        })
    }

    fn last_rx(&self) -> Instant {
        self.last_rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new(1 << 16);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        out
    }

    fn ev(event: &str, data: &str, id: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: id.into(),
        }
    }

    #[test]
    fn parses_fields_comments_and_multiline_data() {
        let s = b": keepalive\nevent: agent.frame\nid: frm_1\ndata: {\"a\":\ndata:1}\nretry: 1500\nunknown: x\n\n";
        let mut p = SseParser::new(1 << 16);
        let mut out = Vec::new();
        p.feed(s, &mut out).unwrap();
        assert_eq!(out, vec![ev("agent.frame", "{\"a\":\n1}", "frm_1")]);
        assert_eq!(p.retry_ms(), Some(1500));
        assert_eq!(p.comments(), 1);
    }

    #[test]
    fn every_byte_split_gives_the_same_events() {
        let s: &[u8] = b"\xEF\xBB\xBFevent: a\r\ndata: one\r\n\r\ndata:two\rdata:  three\r\rid: 7\ndata\n\n: c\n\ndata: \xC3\xA9\n\n";
        let whole = parse_all(&[s]);
        assert_eq!(
            whole,
            vec![
                ev("a", "one", ""),
                ev("message", "two\n three", ""),
                ev("message", "", "7"),
                ev("message", "é", "7"),
            ]
        );
        for i in 0..=s.len() {
            for j in i..=s.len() {
                assert_eq!(
                    parse_all(&[&s[..i], &s[i..j], &s[j..]]),
                    whole,
                    "split {i}/{j}"
                );
            }
        }
        // Byte by byte.
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole);
    }

    #[test]
    fn edge_cases() {
        // No data: no event, and the event name does not leak into the next one.
        assert_eq!(
            parse_all(&[b"event: x\n\ndata: y\n\n"]),
            vec![ev("message", "y", "")]
        );
        // An unterminated event is not dispatched.
        assert!(parse_all(&[b"data: y\n"]).is_empty());
        // retry with non-digits is ignored; id with NUL is ignored.
        let mut p = SseParser::new(1024);
        let mut out = Vec::new();
        p.feed(b"retry: 1s\nid: a\0b\ndata: z\n\n", &mut out)
            .unwrap();
        assert_eq!(p.retry_ms(), None);
        assert_eq!(out, vec![ev("message", "z", "")]);
        // Only one leading space is removed; a colon-less line is a field with an empty value.
        assert_eq!(
            parse_all(&[b"data:   x\n\n"]),
            vec![ev("message", "  x", "")]
        );
        // A BOM only at the very start.
        assert_eq!(parse_all(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]).len(), 1);
    }

    #[test]
    fn oversized_events_are_refused() {
        let mut p = SseParser::new(16);
        let mut out = Vec::new();
        assert_eq!(
            p.feed(b"data: 0123456789abcdef\n\n", &mut out),
            Err(SseError::TooLarge { limit: 16 })
        );
        let mut p = SseParser::new(16);
        p.feed(b"data: 0123\ndata: 4567\n", &mut out).unwrap();
        assert!(p.feed(b"data: 89ab\n", &mut out).is_err());
    }

    #[test]
    fn urls_and_endpoints() {
        let (o, p) = parse_http_url("https://agent.example.com/h2a?x=1#f").unwrap();
        assert_eq!((o.tls, o.port, p.as_str()), (true, 443, "/h2a?x=1"));
        let (o, p) = parse_http_url("http://[::1]:8100").unwrap();
        assert_eq!((o.host.as_str(), o.port, p.as_str()), ("::1", 8100, "/"));
        assert_eq!(o.authority(), "[::1]:8100");
        for bad in ["ws://x/", "http://", "http://u:p@h/", "http://h:0/", "x"] {
            assert!(
                matches!(parse_http_url(bad), Err(TransportError::Url(_))),
                "{bad}"
            );
        }
        let (o, _) = parse_http_url("http://127.0.0.1:8100/").unwrap();
        let e = resolve_endpoint(&o, "https://agent.example.com/h2a").unwrap();
        assert_eq!(e.url("signal"), "https://agent.example.com/h2a/signal");
        let e = resolve_endpoint(&o, "/h2a/session").unwrap();
        assert_eq!(e.url("session"), "http://127.0.0.1:8100/h2a/session");
        let e = resolve_endpoint(&o, "/h2a/").unwrap();
        assert_eq!(e.base_path, "/h2a");
    }

    #[tokio::test]
    async fn insecure_rule() {
        let s = SseSettings {
            url: "http://10.1.2.3:8100/".into(),
            token: None,
            allow_insecure: false,
            ca_file: None,
            roots: TlsRoots::Webpki,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            max_response_bytes: 1024,
            max_event_bytes: 1024,
        };
        let e = connect_with(s.clone()).await.unwrap_err();
        assert!(matches!(e, TransportError::Insecure(_)), "{e}");
        assert!(!e.is_transient());
        // Loopback is fine (nothing listens: a connect error, not a policy error).
        let mut l = s;
        l.url = "http://127.0.0.1:1/".into();
        let e = connect_with(l).await.unwrap_err();
        assert!(!matches!(e, TransportError::Insecure(_)), "{e}");
    }
}
