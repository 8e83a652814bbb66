//! The built-in ARP agent: ARP v1 Minimal Mode served as arp-go serves it (`GET /_arp/v1` upgraded to
//! a WebSocket, `hello` first, one JSON message plus `\n` per text frame, inputs taken one turn at a
//! time, `error` frames non-fatal, a renderer `hello` answered with "unknown message type: hello").
//!
//! Each text input is answered with streamed deltas (the first sentence names what it heard), a
//! `tool_start`/`tool_end` pair around a `table` render (so the renderer's fallbacks are exercised),
//! one more sentence and `commit{final:true}`. The input `fail` gives `error` then `commit`, as the
//! reference demo does. Strict where the spec is: every input must carry `v:1`, `input_type`, the same
//! client-held `session_id` (across reconnects too) and non-empty text; a second input before the
//! commit is a violation (it is queued, as the reference does). Violations go to the shared log.
//!
//! Context: tokio; each connection is a task.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::protocol::arp::ARP_PATH;

/// The components the agent says it may send (what arp-go advertises).
const COMPONENTS: &[&str] = &[
    "text",
    "status-card",
    "table",
    "code-block",
    "diff",
    "key-value",
    "progress",
    "chart",
    "form",
    "confirm",
    "choices",
    "product-cards",
    "markdown",
    "image",
];

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Pause between streamed deltas (one word each).
    pub delta_ms: u64,
    /// How long the `lookup` tool runs.
    pub tool_ms: u64,
    /// First sentence; `{text}` is what the user said.
    pub reply: String,
    /// Sentence after the table.
    pub closing: String,
    /// Close the first connection after this many deltas of a reply (the agent "dies" mid-turn).
    pub drop_after_deltas: Option<u32>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            delta_ms: 30,
            tool_ms: 300,
            reply: "You said: {text}. Let me look that up.".into(),
            closing: "That is all I found.".into(),
            drop_after_deltas: None,
        }
    }
}

/// What the agent saw, shared with tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStats {
    pub connections: u64,
    /// Text of every input, in order of arrival.
    pub inputs: Vec<String>,
    /// Turns answered to their commit.
    pub turns_completed: u64,
    /// Turns whose connection closed before the commit (a barge-in closes the socket).
    pub turns_cancelled: u64,
    /// Renderer hellos received (and rejected, as the reference does).
    pub hellos: u64,
    /// The session id of the first input.
    pub session_id: Option<String>,
    /// Spec violations by the device, with the frame's context.
    pub violations: Vec<String>,
}

/// The agent's shared record ([`AgentStats`]).
pub type AgentLog = super::SharedLog<AgentStats>;

impl AgentLog {
    fn violation(&self, conn: u64, what: String) {
        tracing::warn!(conn, %what, "ARP violation by the device");
        self.update(|s| s.violations.push(format!("conn {conn}: {what}")));
    }
}

/// A running agent (from [`spawn`]); its url is `ws://<addr>/_arp/v1`. Dropping it shuts it down.
pub type AgentHandle = super::AgentHandle<AgentStats>;

/// Binds `addr`, serves ARP in a background task.
pub async fn spawn(addr: SocketAddr, settings: AgentSettings) -> io::Result<AgentHandle> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (tx, rx) = watch::channel(false);
    let log = AgentLog::default();
    let task = tokio::spawn(serve_with_log(listener, settings, rx, log.clone()));
    Ok(AgentHandle::new(
        local,
        format!("ws://{local}{ARP_PATH}"),
        log,
        tx,
        task,
    ))
}

/// Serves ARP on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    settings: AgentSettings,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    serve_with_log(listener, settings, shutdown, AgentLog::default()).await
}

async fn serve_with_log(
    listener: TcpListener,
    settings: AgentSettings,
    mut shutdown: watch::Receiver<bool>,
    log: AgentLog,
) -> io::Result<()> {
    let settings = Arc::new(settings);
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    tracing::info!(addr = ?listener.local_addr().ok(), "ARP agent listening");
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    next_id += 1;
                    tasks.spawn(handle(tcp, peer, next_id, settings.clone(), log.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = shutdown.changed() => if changed.is_err() { break },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Only `/_arp/v1` is upgraded (arp-go serves nothing else over WebSocket).
#[allow(clippy::result_large_err)] // the callback signature is tungstenite's
fn check_path(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() == ARP_PATH {
        Ok(resp)
    } else {
        let mut e = ErrorResponse::new(Some(format!("no ARP endpoint at {}", req.uri().path())));
        *e.status_mut() = StatusCode::NOT_FOUND;
        Err(e)
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    settings: Arc<AgentSettings>,
    log: AgentLog,
    shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let ws = match tokio_tungstenite::accept_hdr_async(tcp, check_path).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "ARP upgrade refused");
            return;
        }
    };
    log.update(|s| s.connections += 1);
    tracing::info!(conn = id, %peer, "ARP connection open");
    let mut conn = Conn {
        id,
        ws,
        settings,
        log,
        shutdown,
        queue: Vec::new(),
    };
    let _ = conn.run().await;
    tracing::info!(conn = id, %peer, "ARP connection closed");
}

struct Conn {
    id: u64,
    ws: WebSocketStream<TcpStream>,
    settings: Arc<AgentSettings>,
    log: AgentLog,
    shutdown: watch::Receiver<bool>,
    /// Inputs that arrived during a turn.
    queue: Vec<String>,
}

/// Why a connection loop ended.
enum Closed {
    ByPeer,
    Shutdown,
}

impl Conn {
    async fn send(&mut self, v: Value) -> Result<(), Closed> {
        // Like Go's json.Encoder: compact JSON and a newline.
        self.ws
            .send(Message::text(format!("{v}\n")))
            .await
            .map_err(|_| Closed::ByPeer)
    }

    async fn run(&mut self) -> Result<(), Closed> {
        let hello = json!({"v":1,"type":"hello","capabilities":{"components":COMPONENTS,"features":["streaming","input"]}});
        self.send(hello).await?;
        loop {
            let text = match self.queue.first() {
                Some(_) => self.queue.remove(0),
                None => match self.next_input(false).await? {
                    Some(t) => t,
                    None => continue,
                },
            };
            self.answer(&text).await?;
        }
    }

    /// Reads one frame; `Some(text)` for a valid input. During a turn (`busy`) inputs are queued.
    async fn next_input(&mut self, busy: bool) -> Result<Option<String>, Closed> {
        let msg = tokio::select! {
            m = self.ws.next() => m,
            _ = self.shutdown.changed() => {
                let _ = self.ws.close(None).await;
                return Err(Closed::Shutdown);
            }
        };
        let text = match msg {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Err(Closed::ByPeer),
            Some(Ok(Message::Text(t))) => t.to_string(),
            Some(Ok(Message::Binary(_))) => {
                self.log.violation(self.id, "binary frame".into());
                self.error("invalid message format", None).await?;
                return Ok(None);
            }
            Some(Ok(_)) => return Ok(None), // ping/pong
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            self.log.violation(self.id, format!("not JSON: {text:.80}"));
            self.error("invalid message format", None).await?;
            return Ok(None);
        };
        let session = v
            .get("session_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        match v.get("type").and_then(Value::as_str) {
            Some("input") => {}
            Some("hello") => {
                self.log.update(|s| s.hellos += 1);
                self.error("unknown message type: hello", None).await?;
                return Ok(None);
            }
            other => {
                self.log
                    .violation(self.id, format!("unknown message type {other:?}"));
                let msg = format!("unknown message type: {}", other.unwrap_or(""));
                self.error(&msg, session.as_deref()).await?;
                return Ok(None);
            }
        }
        if v.get("v").and_then(Value::as_u64) != Some(1) {
            self.log
                .violation(self.id, format!("input without v:1: {v}"));
        }
        match &session {
            None => self
                .log
                .violation(self.id, "input without session_id".into()),
            Some(sid) => {
                let first = self.log.snapshot().session_id;
                match first {
                    None => self.log.update(|s| s.session_id = Some(sid.clone())),
                    Some(f) if f != *sid => self
                        .log
                        .violation(self.id, format!("session_id changed from {f} to {sid}")),
                    Some(_) => {}
                }
            }
        }
        if v.get("input_type").and_then(Value::as_str) != Some("text") {
            self.log
                .violation(self.id, format!("input_type is not \"text\": {v}"));
        }
        let said = v
            .pointer("/data/text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if said.trim().is_empty() {
            self.log.violation(self.id, "empty input".into());
            self.error("empty input", session.as_deref()).await?;
            return Ok(None);
        }
        self.log.update(|s| s.inputs.push(said.clone()));
        if busy {
            self.log.violation(
                self.id,
                "input sent before the previous turn's commit".into(),
            );
            self.queue.push(said);
            return Ok(None);
        }
        Ok(Some(said))
    }

    async fn error(&mut self, msg: &str, session: Option<&str>) -> Result<(), Closed> {
        let mut v = json!({"v":1,"type":"error","payload":{"error":msg}});
        if let Some(s) = session {
            v["session_id"] = json!(s);
        }
        self.send(v).await
    }

    /// Waits `ms` while still reading frames, so a closed socket ends the turn at once.
    async fn pause(&mut self, ms: u64) -> Result<(), Closed> {
        let until = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(()),
                r = self.next_input(true) => { r?; }
            }
        }
    }

    async fn answer(&mut self, said: &str) -> Result<(), Closed> {
        let sid = self.log.snapshot().session_id;
        let frame = |ty: &str, extra: Value| {
            let mut v = json!({"v":1,"type":ty});
            if let Some(s) = &sid {
                v["session_id"] = json!(s);
            }
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v
        };
        let r = self.answer_with(said, &frame).await;
        match &r {
            Ok(()) => self.log.update(|s| s.turns_completed += 1),
            Err(_) => self.log.update(|s| s.turns_cancelled += 1),
        }
        r
    }

    async fn answer_with(
        &mut self,
        said: &str,
        frame: &(dyn Fn(&str, Value) -> Value + Sync),
    ) -> Result<(), Closed> {
        if said.trim() == "fail" {
            self.send(frame("error", json!({"payload":{"error":"boom"}})))
                .await?;
            return self.send(frame("commit", json!({"final": true}))).await;
        }
        let first = self
            .settings
            .reply
            .replace("{text}", said.trim_end_matches('.'));
        let mut sent = 0u32;
        let drop_after = if self.id == 1 {
            self.settings.drop_after_deltas
        } else {
            None
        };
        for word in words(&first) {
            self.send(frame("delta", json!({"payload":{"delta":word}})))
                .await?;
            sent += 1;
            if drop_after == Some(sent) {
                tracing::info!(
                    conn = self.id,
                    "dropping the connection mid-reply (test hook)"
                );
                let _ = self.ws.close(None).await;
                return Err(Closed::ByPeer);
            }
            self.pause(self.settings.delta_ms).await?;
        }
        let args = json!({"q": said}).to_string();
        self.send(frame(
            "tool_start",
            json!({"payload":{"args":args,"tool":"lookup"}}),
        ))
        .await?;
        self.pause(self.settings.tool_ms).await?;
        let table = json!({"id":format!("c_{}", self.id),"type":"table","props":{"title":"Sales",
            "headers":["Region","Q1"],"rows":[["North","100"],["South","200"]]}});
        self.send(frame(
            "render",
            json!({"components":[table],"tool_name":"lookup"}),
        ))
        .await?;
        self.send(frame(
            "tool_end",
            json!({"payload":{"ok":true,"tool":"lookup"}}),
        ))
        .await?;
        let closing = self.settings.closing.clone();
        for word in words(&format!(" {closing}")) {
            self.send(frame("delta", json!({"payload":{"delta":word}})))
                .await?;
            self.pause(self.settings.delta_ms).await?;
        }
        self.send(frame("commit", json!({"final": true}))).await
    }
}

/// "a b c" -> ["a", " b", " c"]: the pieces a streaming model sends.
fn words(s: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, w) in s.split(' ').enumerate() {
        if i == 0 {
            if !w.is_empty() {
                out.push(w.to_string());
            }
        } else {
            out.push(format!(" {w}"));
        }
    }
    out
}

impl From<Closed> for io::Error {
    fn from(c: Closed) -> io::Error {
        match c {
            Closed::ByPeer => io::Error::new(io::ErrorKind::ConnectionReset, "closed by the peer"),
            Closed::Shutdown => io::Error::other("shutdown"),
        }
    }
}
