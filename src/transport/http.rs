//! HTTP POST transport for a JSON-RPC gateway (HAP defines none; a deployment puts its own in front
//! of an agent): every frame the codec sends is one `POST` of `application/json` to the configured
//! URL, and the response body is the frame received. An empty 2xx body (202/204) yields nothing; a
//! 4xx/5xx whose body is a JSON-RPC response (an error for that call) is received like a 2xx, any
//! other is a connection error.
//!
//! - A small HTTP/1.1 client on tokio: one TCP (or rustls TLS, the WebSocket transport's trust setup)
//!   connection per request, `Connection: close`, `Content-Length` or chunked bodies, the whole
//!   exchange under `request_timeout`, bodies over `max_body_bytes` refused.
//! - `http://` to a host that is not loopback is refused unless `allow_insecure`.
//! - The token goes as `Authorization: Bearer`; 401/403 is [`TransportError::Auth`]. It never reaches
//!   a log line or an error message.
//! - Requests run concurrently inside the connection: `send` only queues one, `recv` yields answers
//!   as they complete (in any order; the codec matches them by id). Nothing is spawned.
//!
//! Context: tokio (the link task). `recv` is cancel-safe (the requests live in the connection).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use super::ws::{self, WsSettings};
use super::{AgentConnection, TransportError, TransportFuture};
use crate::config::{AgentConfig, Secret, TlsRoots, TokenMode, is_loopback_url};
use crate::protocol::Wire;

/// Default for [`HttpSettings::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Room for the status line and headers, on top of the body limit.
const HEAD_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub url: String,
    pub token: Option<Secret>,
    pub allow_insecure: bool,
    pub ca_file: Option<std::path::PathBuf>,
    pub roots: TlsRoots,
    pub max_body_bytes: usize,
    /// Connect, send and read the whole answer.
    pub request_timeout: Duration,
}

impl HttpSettings {
    /// From the `[agent]` section (`url`, `allow_insecure`, `ca_file`, `tls_roots`, `max_frame_bytes`).
    pub fn from_config(cfg: &AgentConfig, token: Option<Secret>) -> Self {
        HttpSettings {
            url: cfg.url.clone(),
            token,
            allow_insecure: cfg.allow_insecure,
            ca_file: (!cfg.ca_file.is_empty()).then(|| cfg.ca_file.clone().into()),
            roots: cfg.tls_roots,
            max_body_bytes: cfg.max_frame_bytes as usize,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpUrl {
    tls: bool,
    host: String,
    port: u16,
    /// The Host header.
    authority: String,
    path_query: String,
}

impl HttpUrl {
    fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = |why: &str| {
            let shown = url.split(['?', '#']).next().unwrap_or_default();
            TransportError::Url(format!("{why} ({shown})"))
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected http://host[:port]/path or https://..."))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path_query) = rest.split_at(split);
        if authority.contains('@') {
            return Err(bad(
                "credentials in the URL are not supported; use agent.token_file",
            ));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
                (h, after.strip_prefix(':'))
            }
            None => match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
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
            path_query.to_string()
        } else {
            format!("/{path_query}")
        };
        Ok(HttpUrl {
            tls,
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path_query,
        })
    }
}

type Exchange = Pin<Box<dyn Future<Output = Result<Option<String>, TransportError>> + Send>>;

/// A JSON-RPC-over-POST endpoint. No socket stays open between requests.
pub struct HttpConnection {
    shared: Arc<Shared>,
    inflight: FuturesUnordered<Exchange>,
    last_rx: Instant,
}

struct Shared {
    url: HttpUrl,
    token: Option<Secret>,
    tls: Option<TlsConnector>,
    max_body_bytes: usize,
    timeout: Duration,
}

/// Checks the URL and the insecure policy and prepares TLS; no request is made yet.
pub async fn connect(s: &HttpSettings) -> Result<HttpConnection, TransportError> {
    let url = HttpUrl::parse(&s.url)?;
    if !url.tls && !s.allow_insecure && !is_loopback_url(&s.url) {
        return Err(TransportError::Insecure(url.host.clone()));
    }
    let tls = if url.tls {
        let ws = WsSettings {
            url: s.url.clone(),
            token: None,
            token_mode: TokenMode::Query,
            allow_insecure: s.allow_insecure,
            ca_file: s.ca_file.clone(),
            roots: s.roots,
            max_frame_bytes: s.max_body_bytes,
            connect_timeout: s.request_timeout,
        };
        Some(ws::tls_connector(&ws)?)
    } else {
        None
    };
    Ok(HttpConnection {
        shared: Arc::new(Shared {
            url,
            token: s.token.clone(),
            tls,
            max_body_bytes: s.max_body_bytes,
            timeout: s.request_timeout,
        }),
        inflight: FuturesUnordered::new(),
        last_rx: Instant::now(),
    })
}

impl Shared {
    fn request(&self, body: &str) -> Vec<u8> {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\nUser-Agent: hearken/{}\r\n",
            self.url.path_query,
            self.url.authority,
            body.len(),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = self.token.as_ref().filter(|t| !t.is_empty()) {
            head.push_str("Authorization: Bearer ");
            head.push_str(t.expose());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }

    async fn post(self: Arc<Self>, body: String) -> Result<Option<String>, TransportError> {
        let limit = self.max_body_bytes;
        let work = async {
            let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
                .await
                .map_err(TransportError::Connect)?;
            let _ = tcp.set_nodelay(true);
            let req = self.request(&body);
            match &self.tls {
                None => exchange(tcp, &req, limit).await,
                Some(tls) => {
                    let name = ServerName::try_from(self.url.host.clone())
                        .map_err(|e| TransportError::Url(format!("{}: {e}", self.url.host)))?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| ws::tls_handshake_error(&e))?;
                    exchange(stream, &req, limit).await
                }
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| TransportError::Timeout)?
    }
}

/// One request, one response, the connection closed by the server.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &[u8],
    limit: usize,
) -> Result<Option<String>, TransportError> {
    let io = |e: std::io::Error| TransportError::Io(e.to_string());
    s.write_all(req).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(n) => n,
            // Some TLS servers close without close_notify; what came is complete per its framing.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(io(e)),
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        if raw.len() > limit + HEAD_BYTES {
            return Err(TransportError::TooLarge { limit });
        }
        if let Some(done) = complete(&raw) {
            raw.truncate(done);
            break;
        }
    }
    parse_response(&raw, limit)
}

/// Where the response ends, when its framing says so (Content-Length, or the last chunk).
fn complete(raw: &[u8]) -> Option<usize> {
    let head_end = find(raw, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        // Walk the chunks: searching for "0\r\n\r\n" would also find it inside a chunk (a size
        // ending in 0 before data that starts with a blank line) and cut the body short.
        return chunked_end(&raw[head_end..]).map(|n| head_end + n);
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())?;
    (raw.len() >= head_end + len).then_some(head_end + len)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(raw: &[u8], limit: usize) -> Result<Option<String>, TransportError> {
    let bad = |why: &str| TransportError::Io(format!("HTTP response: {why}"));
    let head_end = find(raw, b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        match length {
            Some(n) if rest.len() >= n => rest[..n].to_vec(),
            Some(_) => return Err(bad("body shorter than its Content-Length")),
            None => rest.to_vec(),
        }
    };
    if body.len() > limit {
        return Err(TransportError::TooLarge { limit });
    }
    let text = String::from_utf8_lossy(&body).trim().to_string();
    match status {
        200..=299 => Ok((!text.is_empty()).then_some(text)),
        401 | 403 => Err(TransportError::Auth(format!(
            "HTTP {status} from the agent"
        ))),
        // JSON-RPC over HTTP commonly answers a failed call with 4xx/5xx and the JSON-RPC error as
        // the body: that is the call's answer (the codec ends the turn with its message), not a
        // broken connection to drop and retry.
        _ if is_json_rpc_response(&text) => Ok(Some(text)),
        _ => {
            let first: String = text
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect();
            Err(TransportError::Io(format!(
                "HTTP {status} from the agent: {first}"
            )))
        }
    }
}

/// One chunk-size line at the start of `b`: the size and the length of the line with its CRLF.
fn chunk_size(b: &[u8]) -> Option<(usize, usize)> {
    let eol = find(b, b"\r\n")?;
    let size_text = std::str::from_utf8(&b[..eol]).ok()?;
    let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
    Some((size, eol + 2))
}

/// The length of a complete chunked body at the start of `b` (its last chunk and trailers included);
/// `None` while incomplete or when it cannot be read.
fn chunked_end(b: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    loop {
        let (size, line) = chunk_size(&b[at..])?;
        at += line;
        if size == 0 {
            // Trailer lines, then an empty one.
            loop {
                let eol = find(&b[at..], b"\r\n")?;
                at += eol + 2;
                if eol == 0 {
                    return Some(at);
                }
            }
        }
        // A size near usize::MAX from a broken or hostile server must not overflow.
        let next = at.checked_add(size)?.checked_add(2)?;
        if b.len() < next {
            return None;
        }
        at = next;
    }
}

/// A JSON-RPC response object: `jsonrpc`, an `id`, and a `result` or an `error`.
fn is_json_rpc_response(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| {
        v.get("jsonrpc").is_some()
            && v.get("id").is_some()
            && (v.get("error").is_some() || v.get("result").is_some())
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let (size, line) = chunk_size(b)?;
        b = &b[line..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size.checked_add(2)? {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

impl HttpConnection {
    async fn next_answer(&mut self) -> Option<Result<Wire, TransportError>> {
        loop {
            match self.inflight.next().await {
                // Nothing in flight: nothing can come until the next send.
                None => std::future::pending::<()>().await,
                Some(Ok(Some(body))) => {
                    self.last_rx = Instant::now();
                    return Some(Ok(Wire::Text(body)));
                }
                Some(Ok(None)) => self.last_rx = Instant::now(),
                Some(Err(e)) => return Some(Err(e)),
            }
        }
    }
}

impl AgentConnection for HttpConnection {
    fn send(&mut self, frame: Wire) -> TransportFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let Wire::Text(body) = frame else {
                return Err(TransportError::Io(
                    "HTTP POST carries JSON text only".into(),
                ));
            };
            let shared = self.shared.clone();
            self.inflight.push(Box::pin(shared.post(body)));
            Ok(())
        })
    }

    fn recv(&mut self) -> TransportFuture<'_, Option<Result<Wire, TransportError>>> {
        Box::pin(self.next_answer())
    }

    fn ping(&mut self) -> TransportFuture<'_, ()> {
        Box::pin(async {})
    }

    fn close(&mut self) -> TransportFuture<'_, ()> {
        // Requests still in flight are abandoned (their sockets close when dropped).
        self.inflight = FuturesUnordered::new();
        Box::pin(async {})
    }

    fn last_rx(&self) -> Instant {
        // No connection to lose between requests; a request that fails is reported by `recv`.
        Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn settings(url: &str) -> HttpSettings {
        HttpSettings {
            url: url.into(),
            token: Some(Secret::new("sekrit")),
            allow_insecure: false,
            ca_file: None,
            roots: TlsRoots::Webpki,
            max_body_bytes: 4096,
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Answers each connection with the next canned response; returns the requests it read.
    async fn server(answers: Vec<&'static str>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hap/rpc?x=1", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for a in answers {
                let (mut s, _) = l.accept().await.unwrap();
                let mut raw = Vec::new();
                let mut chunk = [0u8; 4096];
                while complete(&raw).is_none() {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    raw.extend_from_slice(&chunk[..n]);
                }
                seen.push(String::from_utf8(raw).unwrap());
                s.write_all(a.as_bytes()).await.unwrap();
            }
            seen
        });
        (url, task)
    }

    #[tokio::test]
    async fn posts_and_reads_answers() {
        let (url, task) = server(vec![
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":[]}",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"jsonrpc\":\"2.0\"\r\n13\r\n,\"id\":2,\"result\":7}\r\n0\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let mut c = connect(&settings(&url)).await.unwrap();
        for id in 1..=4 {
            c.send(Wire::Text(format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/list\",\"params\":{{}}}}"
            )))
            .await
            .unwrap();
            if id < 3 {
                let Some(Ok(Wire::Text(t))) = c.recv().await else {
                    panic!()
                };
                assert!(t.contains(&format!("\"id\":{id}")), "{t}");
            }
        }
        // The 204 yields nothing; the 401 is an auth error.
        let e = c.recv().await.unwrap().unwrap_err();
        assert!(e.is_auth(), "{e}");
        let seen = task.await.unwrap();
        assert!(
            seen[0].starts_with("POST /hap/rpc?x=1 HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("Authorization: Bearer sekrit\r\n"));
        assert!(seen[0].contains("Content-Type: application/json\r\n"));
        assert!(seen[0].ends_with("\"method\":\"tools/list\",\"params\":{}}"));
        assert!(!e.to_string().contains("sekrit"));
    }

    #[tokio::test]
    async fn a_json_rpc_error_with_an_error_status_is_the_calls_answer() {
        let (url, task) = server(vec![
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 81\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":3,\"error\":{\"code\":-32603,\"message\":\"Tool not found: nope\"}}",
            "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 25\r\n\r\n{\"error\":\"upstream down\"}",
        ])
        .await;
        let mut c = connect(&settings(&url)).await.unwrap();
        c.send(Wire::Text("{}".into())).await.unwrap();
        let Some(Ok(Wire::Text(t))) = c.recv().await else {
            panic!("the JSON-RPC error is passed up")
        };
        assert!(t.contains("Tool not found: nope"), "{t}");
        // JSON that is not a JSON-RPC response is still an HTTP error.
        c.send(Wire::Text("{}".into())).await.unwrap();
        let e = c.recv().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("HTTP 502"), "{e}");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn errors_and_policy() {
        let (url, task) =
            server(vec!["HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\nboom\n"]).await;
        let mut c = connect(&settings(&url)).await.unwrap();
        c.send(Wire::Text("{}".into())).await.unwrap();
        let e = c.recv().await.unwrap().unwrap_err();
        assert!(
            e.to_string().contains("HTTP 500") && e.to_string().contains("boom"),
            "{e}"
        );
        task.await.unwrap();
        let e = connect(&settings("http://10.1.2.3/rpc"))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, TransportError::Insecure(_)), "{e}");
        // It names the scheme that was used (not only the WebSocket one) and the way out.
        assert!(
            e.to_string().contains("http://") && e.to_string().contains("https://"),
            "{e}"
        );
        for bad in ["ws://h/", "http://", "http://h:0/", "http://u:p@h/"] {
            assert!(
                matches!(
                    connect(&settings(bad)).await.err().unwrap(),
                    TransportError::Url(_)
                ),
                "{bad}"
            );
        }
        let u = HttpUrl::parse("https://[::1]:8443/a").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path_query.as_str()),
            (true, "::1", 8443, "/a")
        );
        assert!(
            connect(&settings("https://agent.example/rpc"))
                .await
                .is_ok()
        );
        assert_eq!(dechunk(b"3\r\nabc\r\n0\r\n\r\n").unwrap(), b"abc");
    }

    #[test]
    fn chunked_bodies_end_where_their_chunks_say() {
        // A chunk of 0x10 bytes whose data starts with a blank line: "10\r\n\r\n" holds
        // "0\r\n\r\n", which is not the end.
        let body = b"10\r\n\r\n{\"id\":1,\"a\":2}\r\n0\r\n\r\n";
        assert_eq!(chunked_end(body), Some(body.len()));
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let raw = [&head[..], &body[..]].concat();
        assert_eq!(complete(&raw), Some(raw.len()));
        assert_eq!(
            parse_response(&raw, 4096).unwrap().as_deref(),
            Some("{\"id\":1,\"a\":2}")
        );
        // Incomplete: not yet; trailers are part of it.
        assert_eq!(chunked_end(&body[..body.len() - 2]), None);
        let trailers = b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(chunked_end(trailers), Some(trailers.len()));
        assert_eq!(chunked_end(&trailers[..trailers.len() - 2]), None);
    }

    #[test]
    fn a_huge_chunk_size_is_an_error_not_a_panic() {
        let body = b"ffffffffffffffff\r\nabc\r\n0\r\n\r\n";
        assert_eq!(chunked_end(body), None);
        assert_eq!(dechunk(body), None);
        let raw = [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            &body[..],
        ]
        .concat();
        assert!(parse_response(&raw, 4096).is_err());
    }
}
