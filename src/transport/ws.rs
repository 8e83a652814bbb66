//! WebSocket transport: `ws://` over TCP, `wss://` over rustls (`ring` provider), tokio-tungstenite on top.
//!
//! One [`connect`] is one connection attempt: parse the URL, refuse `ws://` to a non-loopback host unless
//! `allow_insecure`, TCP connect (Nagle off: audio frames are small and latency-bound), TLS with SNI,
//! the upgrade with the token as `?token=` or in `Sec-WebSocket-Protocol`, all under one
//! `connect_timeout`. Reconnecting (with [`super::Backoff`]), re-reading the token ([`read_token`]) and
//! liveness ([`WsConnection::last_rx`]) are the session's job.
//!
//! Incoming frames and messages are capped at `max_frame_bytes`: tungstenite checks the length in the
//! frame header before it allocates, so an oversized frame costs no memory; it ends the connection.
//!
//! The token never reaches a log line or an error message: it travels only in the request built here.
//! (tungstenite itself traces the raw request at `log` level TRACE; keep `tungstenite=trace` off.)
//!
//! Context: tokio (the session task). [`WsConnection::recv`] is cancel-safe, so it can sit in a
//! `tokio::select!` next to the session's channels; [`WsConnection::send`] is not (a cancelled send may
//! have written part of a frame: drop the connection then).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, RootCertStore, pki_types::ServerName};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::http::{self, HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tracing::{debug, trace, warn};

use crate::config::{AgentConfig, Secret, TlsRoots, TokenMode, is_loopback_url};
use crate::protocol::Wire;

/// Used when the caller has no better value: DNS + TCP + TLS + upgrade together.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`WsConnection::close`] waits for the agent to answer the close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The subprotocol offered when the token travels in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL: &str = "haip";

/// File name of the token under `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=agent-token:...`).
pub const CREDENTIAL_NAME: &str = "agent-token";

/// Close code for an invalid token (RFC 6455 "policy violation"; HAIP §6).
const CLOSE_POLICY: u16 = 1008;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URL cannot be used at all (config error).
    #[error("agent.url: {0}")]
    Url(String),
    /// `ws://` or `http://` to a host that is not loopback without `allow_insecure` (config error).
    #[error(
        "refusing an unencrypted connection (ws:// or http://) to {0}: use wss:// or https://, or set agent.allow_insecure = true"
    )]
    Insecure(String),
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
    /// The agent rejected the token: HTTP 401/403 at the upgrade, or close code 1008.
    #[error("agent rejected the credentials: {0}")]
    Auth(String),
    #[error("agent closed the connection ({code}{}{reason})", if reason.is_empty() { "" } else { ": " })]
    Closed { code: u16, reason: String },
    /// A frame or message from the agent exceeded `max_frame_bytes`; the connection is unusable.
    #[error("agent sent a message over agent.max_frame_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("connection: {0}")]
    Io(String),
    #[error("timed out connecting to the agent")]
    Timeout,
    /// The agent program could not be started (stdio transport).
    #[error("agent.command: cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// The agent process ended (stdio transport): its exit status and the last lines of its stderr.
    #[error("agent process {status}{}{stderr}", if stderr.is_empty() { "" } else { "; stderr: " })]
    Exited { status: String, stderr: String },
}

impl TransportError {
    /// The agent refused the token: re-read it (it may have been renewed) before reconnecting.
    pub fn is_auth(&self) -> bool {
        matches!(self, TransportError::Auth(_))
    }

    /// Retrying later may succeed. A URL that cannot work, or an agent program that is missing or not
    /// executable, is permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Url(_) | TransportError::Insecure(_) => false,
            // A missing or non-executable program stays missing.
            TransportError::Spawn { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ),
            _ => true,
        }
    }
}

/// Everything one connection attempt needs. `Debug` prints the token as `***`.
#[derive(Debug, Clone)]
pub struct WsSettings {
    pub url: String,
    pub token: Option<Secret>,
    pub token_mode: TokenMode,
    pub allow_insecure: bool,
    /// Extra trust anchors (PEM, one or more certificates), added to `roots`.
    pub ca_file: Option<PathBuf>,
    pub roots: TlsRoots,
    /// Largest incoming frame and message.
    pub max_frame_bytes: usize,
    pub connect_timeout: Duration,
}

impl WsSettings {
    /// Settings from the `[agent]` section; `token` from [`read_token`] (read again for every attempt).
    pub fn from_config(cfg: &AgentConfig, token: Option<Secret>) -> Self {
        WsSettings {
            url: cfg.url.clone(),
            token,
            token_mode: cfg.token_mode,
            allow_insecure: cfg.allow_insecure,
            ca_file: (!cfg.ca_file.is_empty()).then(|| PathBuf::from(&cfg.ca_file)),
            roots: cfg.tls_roots,
            max_frame_bytes: cfg.max_frame_bytes as usize,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// The agent token: `agent.token_file`, else `$CREDENTIALS_DIRECTORY/agent-token` when systemd provides
/// it, else none. Surrounding whitespace is trimmed; an empty file counts as no token. Blocking file
/// I/O on a tiny file; call it before each connection attempt so a renewed token is picked up.
pub fn read_token(cfg: &AgentConfig) -> Result<Option<Secret>, TransportError> {
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    read_token_from(cfg, creds.as_deref())
}

fn read_token_from(
    cfg: &AgentConfig,
    credentials_dir: Option<&Path>,
) -> Result<Option<Secret>, TransportError> {
    let path = if !cfg.token_file.is_empty() {
        PathBuf::from(&cfg.token_file)
    } else {
        match credentials_dir.map(|d| d.join(CREDENTIAL_NAME)) {
            Some(p) if p.is_file() => p,
            _ => return Ok(None),
        }
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TransportError::Io(format!("agent token {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        warn!(path = %path.display(), "agent token file is empty; connecting without a token");
        return Ok(None);
    }
    Ok(Some(Secret::new(token)))
}

/// One open WebSocket to the agent.
pub struct WsConnection {
    stream: WebSocketStream<MaybeTls>,
    limit: usize,
    last_rx: Instant,
    subprotocol: Option<String>,
    /// A close frame already read, not yet handed to the caller (keeps `recv` cancel-safe).
    pending: Option<TransportError>,
    /// The stream ended or failed: nothing more will come.
    done: bool,
    /// An oversized frame stopped reading mid-frame: the socket must not be read again (tungstenite
    /// would go on to allocate the frame), but a close frame can still be written.
    too_large: bool,
}

impl std::fmt::Debug for WsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConnection")
            .field("tls", &matches!(self.stream.get_ref(), MaybeTls::Tls(_)))
            .field("subprotocol", &self.subprotocol)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl WsConnection {
    /// Send one frame and flush it. Not cancel-safe: if the future is dropped mid-write, drop the
    /// connection too.
    pub async fn send(&mut self, frame: Wire) -> Result<(), TransportError> {
        let msg = match frame {
            Wire::Text(t) => Message::Text(t.into()),
            Wire::Binary(b) => Message::Binary(b.into()),
        };
        self.stream
            .send(msg)
            .await
            .map_err(|e| stream_error(e, self.limit))
    }

    /// The next data frame from the agent. Pings are answered (the pong goes out on this or the next
    /// read or write) and pongs only refresh [`Self::last_rx`]. A close frame gives
    /// `Err(Auth)` for code 1008 and `Err(Closed)` otherwise; after any error, `None`.
    ///
    /// Cancel-safe: dropping the future loses no frame.
    pub async fn recv(&mut self) -> Option<Result<Wire, TransportError>> {
        if let Some(e) = self.pending.take() {
            return Some(Err(e));
        }
        if self.done {
            return None;
        }
        loop {
            let msg = match self.stream.next().await {
                Some(Ok(msg)) => msg,
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    if let WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) = &e
                    {
                        self.too_large = true;
                        warn!(
                            size,
                            max_size,
                            "agent sent a message over agent.max_frame_bytes; dropping the connection"
                        );
                    }
                    return Some(Err(stream_error(e, self.limit)));
                }
            };
            self.last_rx = Instant::now();
            match msg {
                Message::Text(t) => return Some(Ok(Wire::Text(t.as_str().to_owned()))),
                Message::Binary(b) => return Some(Ok(Wire::Binary(Vec::from(b)))),
                Message::Ping(_) => trace!("ws ping from agent"),
                Message::Pong(_) => trace!("ws pong from agent"),
                Message::Frame(_) => {}
                Message::Close(frame) => {
                    self.done = true;
                    let (code, reason) = frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.as_str().to_owned())
                    });
                    debug!(code, reason = %reason, "agent closed the WebSocket");
                    self.pending = Some(if code == CLOSE_POLICY {
                        TransportError::Auth(if reason.is_empty() {
                            "close code 1008".into()
                        } else {
                            format!("close code 1008: {reason}")
                        })
                    } else {
                        TransportError::Closed { code, reason }
                    });
                    // Push out tungstenite's queued close reply so the agent sees a clean close.
                    let _ = tokio::time::timeout(CLOSE_WAIT, self.stream.flush()).await;
                    return self.pending.take().map(Err);
                }
            }
        }
    }

    /// Send a WebSocket ping (the agent answers with a pong, which refreshes [`Self::last_rx`]).
    /// Best effort: a socket that cannot take a ping fails the next `recv` or `send`, or the liveness
    /// check, so the error is only logged here.
    pub async fn ping(&mut self) {
        if let Err(e) = self.stream.send(Message::Ping(Bytes::new())).await {
            debug!(error = %stream_error(e, self.limit), "ws ping not sent");
        }
    }

    /// Close gracefully: send a close frame and wait (at most ~1 s) for the agent's reply. Best effort;
    /// the connection is finished afterwards either way.
    pub async fn close(&mut self) {
        if self.too_large {
            // 1009 "message too big", without waiting for the reply: reading is off limits.
            self.too_large = false;
            let frame = CloseFrame {
                code: CloseCode::Size,
                reason: "message too big".into(),
            };
            let _ = tokio::time::timeout(CLOSE_WAIT, self.stream.close(Some(frame))).await;
            return;
        }
        if self.done {
            return;
        }
        self.done = true;
        let stream = &mut self.stream;
        let graceful = async {
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            if let Err(e) = stream.close(Some(frame)).await {
                debug!(error = %e, "ws close");
                return;
            }
            while let Some(Ok(_)) = stream.next().await {}
        };
        if tokio::time::timeout(CLOSE_WAIT, graceful).await.is_err() {
            debug!("agent did not answer the close frame in time");
        }
    }

    /// When the last frame of any kind (data, ping, pong, close) arrived. Updated only while
    /// [`Self::recv`] is being polled.
    pub fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// The subprotocol the agent selected, if any.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.as_deref()
    }
}

/// Open a connection. See the module doc for the steps.
impl super::AgentConnection for WsConnection {
    fn send(&mut self, frame: Wire) -> super::TransportFuture<'_, Result<(), TransportError>> {
        Box::pin(WsConnection::send(self, frame))
    }
    fn recv(&mut self) -> super::TransportFuture<'_, Option<Result<Wire, TransportError>>> {
        Box::pin(WsConnection::recv(self))
    }
    fn ping(&mut self) -> super::TransportFuture<'_, ()> {
        Box::pin(WsConnection::ping(self))
    }
    fn close(&mut self) -> super::TransportFuture<'_, ()> {
        Box::pin(WsConnection::close(self))
    }
    fn last_rx(&self) -> Instant {
        WsConnection::last_rx(self)
    }
}

pub async fn connect(s: &WsSettings) -> Result<WsConnection, TransportError> {
    let url = WsUrl::parse(&s.url)?;
    if !url.tls && !s.allow_insecure && !is_loopback_url(&s.url) {
        return Err(TransportError::Insecure(url.host.clone()));
    }
    let request = build_request(&url, s)?;
    // Local work (trust anchors, server name) before the network, so its errors come first.
    let tls = if url.tls {
        let name = ServerName::try_from(url.host.clone()).map_err(|_| {
            TransportError::Url(format!("{} is not a valid TLS server name", url.host))
        })?;
        Some((tls_connector(s)?, name))
    } else {
        None
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(s.max_frame_bytes))
        .max_frame_size(Some(s.max_frame_bytes));
    debug!(url = %url.redacted(), "connecting to agent");

    let attempt = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(TransportError::Connect)?;
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY");
        }
        let io = match tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| tls_handshake_error(&e))?;
                MaybeTls::Tls(Box::new(tls))
            }
            None => MaybeTls::Plain(tcp),
        };
        tokio_tungstenite::client_async_with_config(request, io, Some(config))
            .await
            .map_err(handshake_error)
    };
    let (stream, response) = tokio::time::timeout(s.connect_timeout, attempt)
        .await
        .map_err(|_| TransportError::Timeout)??;

    let subprotocol = response
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    debug!(url = %url.redacted(), tls = url.tls, subprotocol = ?subprotocol, "agent WebSocket open");
    Ok(WsConnection {
        stream,
        limit: s.max_frame_bytes,
        last_rx: Instant::now(),
        subprotocol,
        pending: None,
        done: false,
        too_large: false,
    })
}

/// The parts of a ws:// or wss:// URL a connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WsUrl {
    tls: bool,
    /// Without brackets for IPv6.
    host: String,
    port: u16,
    /// Present only when the URL names a port (the Host header then carries it).
    explicit_port: bool,
    /// Starts with `/`; the query, if any, included; no fragment.
    path_query: String,
}

impl WsUrl {
    fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::Url(format!("{why} ({})", redact_url(url)));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected ws://host[:port]/path or wss://..."))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "ws" => false,
            "wss" => true,
            _ => return Err(bad("the scheme must be ws or wss")),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_query) = rest.split_at(split);
        if authority.contains('@') {
            return Err(bad(
                "credentials in the URL are not supported; use agent.token_file",
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("invalid IPv6 address"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("invalid port"))?),
            };
            (host, port)
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
        let path_query = if path_query.starts_with('/') {
            path_query.to_owned()
        } else {
            format!("/{path_query}")
        };
        Ok(WsUrl {
            tls,
            host: host.to_owned(),
            port,
            explicit_port,
            path_query,
        })
    }

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

    fn scheme(&self) -> &'static str {
        if self.tls { "wss" } else { "ws" }
    }

    /// For logs: no query (it may hold a token).
    fn redacted(&self) -> String {
        let path = self.path_query.split('?').next().unwrap_or_default();
        format!("{}://{}{path}", self.scheme(), self.authority())
    }
}

/// A URL fit for an error message: no query or fragment (a token may be there), no userinfo.
fn redact_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{}", &rest[end..]),
        None => url.to_owned(),
    }
}

/// The upgrade request, with the token where `token_mode` says.
fn build_request(url: &WsUrl, s: &WsSettings) -> Result<http::Request<()>, TransportError> {
    let token = s.token.as_ref().filter(|t| !t.is_empty());
    let mut path_query = url.path_query.clone();
    if let (Some(t), TokenMode::Query) = (token, s.token_mode) {
        append_query(&mut path_query, "token", t.expose());
    }
    let uri = format!("{}://{}{path_query}", url.scheme(), url.authority());
    // The error text of a bad URI does not include the URI, so the token cannot leak through it.
    let mut request = uri
        .into_client_request()
        .map_err(|e| TransportError::Url(format!("{}: {e}", url.redacted())))?;
    if s.token_mode == TokenMode::Subprotocol {
        let offer = match token {
            Some(t) => format!("{SUBPROTOCOL}, token.{}", t.expose()),
            None => SUBPROTOCOL.to_owned(),
        };
        let mut value = HeaderValue::from_str(&offer).map_err(|_| {
            TransportError::Auth("the token has characters not allowed in an HTTP header".into())
        })?;
        value.set_sensitive(true);
        request
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    Ok(request)
}

/// Append `key=value` (percent-encoded) to a path that may already have a query.
fn append_query(path_query: &mut String, key: &str, value: &str) {
    match path_query.find('?') {
        None => path_query.push('?'),
        Some(i) if i + 1 == path_query.len() || path_query.ends_with('&') => {}
        Some(_) => path_query.push('&'),
    }
    path_query.push_str(key);
    path_query.push('=');
    percent_encode_into(path_query, value);
}

/// RFC 3986: everything but the unreserved characters is escaped.
fn percent_encode_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
}

/// rustls with the ring provider, TLS 1.2+, the chosen roots plus `ca_file`. Built per attempt, so a
/// renewed `ca_file` or OS store is picked up on reconnect.
pub(crate) fn tls_connector(s: &WsSettings) -> Result<TlsConnector, TransportError> {
    let mut roots = RootCertStore::empty();
    match s.roots {
        TlsRoots::Webpki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        TlsRoots::Os => {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                warn!(error = %e, "reading the OS certificate store");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            debug!(added, ignored, "OS trust anchors");
        }
    }
    if let Some(path) = &s.ca_file {
        add_pem_roots(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err(TransportError::Tls(
            "no trust anchors: the OS certificate store is empty and agent.ca_file is unset".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The upgrade is HTTP/1.1; say so, for servers that would otherwise pick h2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A failed TLS handshake with the agent. A certificate this device does not trust gets a hint at the
/// keys that decide trust (the bare rustls text, "invalid peer certificate: UnknownIssuer", names none).
pub(crate) fn tls_handshake_error(e: &std::io::Error) -> TransportError {
    let text = e.to_string();
    if text.contains("invalid peer certificate") {
        TransportError::Tls(format!(
            "{text} (the agent's certificate is not trusted: agent.ca_file names the CA that \
             signed it, agent.tls_roots which store is trusted besides)"
        ))
    } else {
        TransportError::Tls(text)
    }
}

fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), TransportError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |e: &dyn std::fmt::Display| {
        TransportError::Tls(format!("agent.ca_file {}: {e}", path.display()))
    };
    let mut n = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        n += 1;
    }
    if n == 0 {
        return Err(bad(&"no PEM certificate in the file"));
    }
    debug!(path = %path.display(), certificates = n, "extra trust anchors");
    Ok(())
}

fn handshake_error(e: WsError) -> TransportError {
    match e {
        WsError::Http(response) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .and_then(|b| {
                    b.lines()
                        .next()
                        .map(|l| l.chars().take(120).collect::<String>())
                })
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                TransportError::Auth(format!("HTTP {status} at the upgrade{body}"))
            } else {
                TransportError::Handshake(format!("HTTP {status} instead of an upgrade{body}"))
            }
        }
        WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(why)) => {
            TransportError::Handshake(format!(
                "{why}; agent.token_mode = \"subprotocol\" needs an agent that selects \"{SUBPROTOCOL}\", \
                 otherwise use token_mode = \"query\""
            ))
        }
        WsError::Io(e) => TransportError::Io(e.to_string()),
        other => TransportError::Handshake(other.to_string()),
    }
}

fn stream_error(e: WsError, limit: usize) -> TransportError {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            TransportError::TooLarge { limit }
        }
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Protocol(ProtocolError::SendAfterClosing) => TransportError::Closed {
            code: 1006,
            reason: "connection already closed".into(),
        },
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => TransportError::Closed {
            code: 1006,
            reason: "connection dropped without a close frame".into(),
        },
        WsError::Io(e) => TransportError::Io(e.to_string()),
        other => TransportError::Io(other.to_string()),
    }
}

/// TCP or TLS-over-TCP, so one `WebSocketStream` type serves both.
enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> WsSettings {
        WsSettings {
            url: url.into(),
            token: None,
            token_mode: TokenMode::Query,
            allow_insecure: false,
            ca_file: None,
            roots: TlsRoots::Webpki,
            max_frame_bytes: 1 << 16,
            connect_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn parses_urls() {
        let u = WsUrl::parse("wss://agent.example/haip/websocket?x=1#frag").unwrap();
        assert_eq!(
            u,
            WsUrl {
                tls: true,
                host: "agent.example".into(),
                port: 443,
                explicit_port: false,
                path_query: "/haip/websocket?x=1".into(),
            }
        );
        assert_eq!(u.authority(), "agent.example");
        assert_eq!(u.redacted(), "wss://agent.example/haip/websocket");

        let u = WsUrl::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!((u.tls, u.port, u.path_query.as_str()), (false, 8080, "/"));
        assert_eq!(u.authority(), "127.0.0.1:8080");

        let u = WsUrl::parse("WS://[::1]:9/a?b").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(u.authority(), "[::1]:9");
        assert_eq!(u.path_query, "/a?b");

        let u = WsUrl::parse("ws://[fe80::1]?q=1").unwrap();
        assert_eq!((u.port, u.path_query.as_str()), (80, "/?q=1"));
        assert_eq!(u.authority(), "[fe80::1]");

        for bad in [
            "http://x/",
            "x/",
            "ws://",
            "ws:///path",
            "ws://h:0/",
            "ws://h:70000/",
            "ws://h:port/",
            "ws://[::1/",
            "ws://[nope]/",
            "ws://[::1]x/",
            "ws://user:secret@h/",
        ] {
            let e = WsUrl::parse(bad).unwrap_err();
            assert!(matches!(e, TransportError::Url(_)), "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        assert_eq!(
            redact_url("wss://u:secret@h:1/p?token=secret#x"),
            "wss://***@h:1/p"
        );
        assert_eq!(redact_url("nonsense?token=secret"), "nonsense");
    }

    #[test]
    fn query_token_is_appended_and_encoded() {
        let mut p = "/haip".to_owned();
        append_query(&mut p, "token", "a.b-c_d~e");
        assert_eq!(p, "/haip?token=a.b-c_d~e");
        let mut p = "/haip?x=1".to_owned();
        append_query(&mut p, "token", "a b+c/é&=");
        assert_eq!(p, "/haip?x=1&token=a%20b%2Bc%2F%C3%A9%26%3D");
        let mut p = "/?".to_owned();
        append_query(&mut p, "token", "t");
        assert_eq!(p, "/?token=t");
        let mut p = "/?a=1&".to_owned();
        append_query(&mut p, "token", "t");
        assert_eq!(p, "/?a=1&token=t");
    }

    #[test]
    fn request_carries_the_token_where_configured() {
        let url = WsUrl::parse("ws://127.0.0.1:9/haip?v=1").unwrap();
        let mut s = settings("ws://127.0.0.1:9/haip?v=1");
        s.token = Some(Secret::new("jwt.x.y"));
        let r = build_request(&url, &s).unwrap();
        assert_eq!(
            r.uri().to_string(),
            "ws://127.0.0.1:9/haip?v=1&token=jwt.x.y"
        );
        assert!(r.headers().get(header::SEC_WEBSOCKET_PROTOCOL).is_none());
        assert_eq!(r.headers()["host"], "127.0.0.1:9");

        s.token_mode = TokenMode::Subprotocol;
        let r = build_request(&url, &s).unwrap();
        assert_eq!(r.uri().to_string(), "ws://127.0.0.1:9/haip?v=1");
        let h = &r.headers()[header::SEC_WEBSOCKET_PROTOCOL];
        assert_eq!(h, "haip, token.jwt.x.y");
        assert!(h.is_sensitive());

        s.token = None;
        let r = build_request(&url, &s).unwrap();
        assert_eq!(r.headers()[header::SEC_WEBSOCKET_PROTOCOL], "haip");
        s.token_mode = TokenMode::Query;
        let r = build_request(&url, &s).unwrap();
        assert_eq!(r.uri().to_string(), "ws://127.0.0.1:9/haip?v=1");

        let url = WsUrl::parse("wss://agent.example/x").unwrap();
        let r = build_request(&url, &settings("wss://agent.example/x")).unwrap();
        assert_eq!(r.headers()["host"], "agent.example");

        s.token_mode = TokenMode::Subprotocol;
        s.token = Some(Secret::new("bad\ntoken"));
        let e = build_request(&WsUrl::parse("ws://h/").unwrap(), &s).unwrap_err();
        assert!(e.is_auth() && !e.to_string().contains("bad"), "{e}");
    }

    #[tokio::test]
    async fn insecure_policy() {
        let e = connect(&settings("ws://10.1.2.3:9/haip"))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Insecure(_)), "{e}");
        assert!(!e.is_transient());
        let e = connect(&settings("ftp://x/")).await.unwrap_err();
        assert!(matches!(e, TransportError::Url(_)) && !e.is_transient());
    }

    #[test]
    fn bad_ca_file_is_a_tls_error() {
        let mut s = settings("wss://h/");
        s.ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        let e = tls_connector(&s).err().unwrap();
        assert!(
            matches!(&e, TransportError::Tls(m) if m.contains("/nonexistent/ca.pem")),
            "{e}"
        );
        s.ca_file = Some(PathBuf::from("Cargo.toml"));
        let e = tls_connector(&s).err().unwrap();
        assert!(
            matches!(&e, TransportError::Tls(m) if m.contains("no PEM")),
            "{e}"
        );
        s.ca_file = None;
        assert!(tls_connector(&s).is_ok());
    }

    #[test]
    fn classification() {
        use TransportError as E;
        assert!(E::Auth("x".into()).is_auth() && E::Auth("x".into()).is_transient());
        for e in [
            E::Connect(io::Error::from(io::ErrorKind::ConnectionRefused)),
            E::Tls("x".into()),
            E::Handshake("x".into()),
            E::Closed {
                code: 1000,
                reason: String::new(),
            },
            E::TooLarge { limit: 1 },
            E::Io("x".into()),
            E::Timeout,
        ] {
            assert!(e.is_transient() && !e.is_auth(), "{e}");
        }
        assert_eq!(
            E::Closed {
                code: 1001,
                reason: "bye".into()
            }
            .to_string(),
            "agent closed the connection (1001: bye)"
        );
        assert_eq!(
            E::Closed {
                code: 1005,
                reason: String::new()
            }
            .to_string(),
            "agent closed the connection (1005)"
        );
    }

    #[test]
    fn token_sources() {
        let dir = std::env::temp_dir().join(format!("hearken-ws-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = AgentConfig::default();

        // Nothing configured, no credentials directory.
        assert!(read_token_from(&cfg, None).unwrap().is_none());
        // Credentials directory without the file.
        assert!(read_token_from(&cfg, Some(&dir)).unwrap().is_none());
        // systemd credential, trimmed.
        std::fs::write(dir.join(CREDENTIAL_NAME), "  cred.jwt\n").unwrap();
        let t = read_token_from(&cfg, Some(&dir)).unwrap().unwrap();
        assert_eq!(t.expose(), "cred.jwt");
        // token_file wins.
        let file = dir.join("token");
        std::fs::write(&file, "file.jwt\r\n").unwrap();
        cfg.token_file = file.display().to_string();
        let t = read_token_from(&cfg, Some(&dir)).unwrap().unwrap();
        assert_eq!(t.expose(), "file.jwt");
        // Empty file: no token.
        std::fs::write(&file, " \n").unwrap();
        assert!(read_token_from(&cfg, Some(&dir)).unwrap().is_none());
        // Missing token_file: an error naming it.
        cfg.token_file = dir.join("missing").display().to_string();
        let e = read_token_from(&cfg, None).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn settings_from_config() {
        let cfg = AgentConfig {
            url: "wss://a/".into(),
            ca_file: "/etc/ca.pem".into(),
            max_frame_bytes: 1234,
            ..AgentConfig::default()
        };
        let s = WsSettings::from_config(&cfg, Some(Secret::new("hunter2")));
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(s.max_frame_bytes, 1234);
        assert!(!format!("{s:?}").contains("hunter2"));
        let s = WsSettings::from_config(&AgentConfig::default(), None);
        assert!(s.ca_file.is_none());
    }
}
