//! The built-in H2A agent: H2A v0.2 at the Standard agent level, served over HTTP/1.1 (hyper) as the
//! digest describes (`../shared/protocols/h2a.md`).
//!
//! - `GET /.well-known/h2a-agent.json`: the AgentCard (`endpoint.h2a` = `http://<addr>/h2a`), or with
//!   [`AgentSettings::mock_discovery`] only `GET /.well-known/h2a.json` with the TS mock's relative
//!   `"/h2a/session"` (to exercise the host's fallback); `GET /h2a/health`.
//! - `POST /h2a/session` with `session.open` answers a `text/event-stream`: `session.ack` (a server id
//!   of 244 random bits, negotiated frame types = the host's list plus `error`/`end`, level = the lower
//!   of the two), then every frame and presence update of the session, `: keepalive` comments when
//!   idle. `session.resume` re-attaches the session to the new stream and replays every buffered frame
//!   above `lastReceivedSequence`; an unknown session or an exhausted buffer gives `STATE_SYNC_ERROR`.
//! - `POST /h2a/signal` (`X-H2A-Session` required: 400 without, 404 unknown) answers `{"ok":true}` at
//!   once and works in the background. A `message` is answered with `presence conversing`, streamed
//!   text deltas ("You said: <text>." and one more sentence) around a `tool_card` running/completed
//!   pair, `end {reason:"complete"}` and `presence rest`. `interrupt` stops the stream within one delta
//!   pause (well under 1 s) and sends `end {reason:"interrupted"}`. Rate limits (S2.3): message 30/min,
//!   interrupt 10/min, confirm/deny 30/min; excess gets `error RATE_LIMITED` with `retryAfter`.
//! - Every host request is checked against the rules of `data/h2a/schema/messages.schema.json` (the
//!   checks are written out here: the schema crate is a dev-dependency) and the digest's MUSTs (no
//!   host-proposed session id, `X-H2A-Session` on signals, confirm/deny naming a pending confirmation);
//!   violations go to the shared [`AgentLog`]. Every request body is kept for tests to validate
//!   against the schemas themselves.
//! - Test hooks: [`AgentSettings::drop_after_frames`] (the stream is cut mid-response once; the answer
//!   goes on into the replay buffer), a message containing `/flood` (more than 500 frames), a message
//!   containing `/confirm` (a `confirmation` frame, answered by the `confirm`/`deny` signal).
//!
//! Context: tokio; each HTTP connection and each response is a task.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Frames kept for replay after a drop.
const REPLAY_FRAMES: usize = 2_000;
/// Largest request body accepted.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Pause between streamed text deltas (one word each).
    pub delta_ms: u64,
    /// How long the `lookup` tool "runs".
    pub tool_ms: u64,
    /// Second sentence of every answer.
    pub closing: String,
    /// `: keepalive` comment interval on idle streams.
    pub keepalive_ms: u64,
    /// Require `Authorization: Bearer <token>` on every request.
    pub token: Option<String>,
    /// Serve the card only where the TS mock does, with its relative endpoint.
    pub mock_discovery: bool,
    /// Cut the first stream after this many frames of a response (the answer goes on into the replay
    /// buffer, for a resume to fetch).
    pub drop_after_frames: Option<u32>,
    /// Text frames a `/flood` message gets.
    pub flood_frames: u32,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            delta_ms: 30,
            tool_ms: 100,
            closing: "I am the hearken reference agent.".into(),
            keepalive_ms: 15_000,
            token: None,
            mock_discovery: false,
            drop_after_frames: None,
            flood_frames: 600,
        }
    }
}

/// What the agent saw, shared with tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentStats {
    pub sessions_opened: u64,
    pub resumes: u64,
    /// Resumes answered with a replay of at least one frame.
    pub frames_replayed: u64,
    /// `message` texts, in order.
    pub messages: Vec<String>,
    pub interrupts: u64,
    /// Interrupts that stopped a response (the rest found nothing streaming or were over the limit).
    pub interrupts_honoured: u64,
    /// Longest time from an interrupt to its `end` frame.
    pub max_interrupt_to_end_ms: u64,
    pub responses_completed: u64,
    pub responses_interrupted: u64,
    /// `(frameId, choice)` of every confirm; frame ids of every deny.
    pub confirms: Vec<(String, String)>,
    pub denies: Vec<String>,
    /// Streams cut by the drop hook.
    pub drops: u64,
    /// Frames of responses sent (or buffered for a resume), every session.
    pub frames_sent: u64,
    /// Every JSON body the host sent, `(path, X-H2A-Session, body)`.
    pub requests: Vec<(String, Option<String>, Value)>,
    /// Cards served.
    pub cards: u64,
    pub violations: Vec<String>,
}

#[derive(Clone, Default)]
pub struct AgentLog(Arc<Mutex<AgentStats>>);

impl AgentLog {
    fn lock(&self) -> MutexGuard<'_, AgentStats> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> AgentStats {
        self.lock().clone()
    }

    fn update(&self, f: impl FnOnce(&mut AgentStats)) {
        f(&mut self.lock());
    }

    fn violation(&self, what: String) {
        tracing::warn!(%what, "H2A violation by the host");
        self.update(|s| s.violations.push(what));
    }

    /// Waits until `pred` holds (true) or `timeout` passes (false).
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&AgentStats) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.lock()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl fmt::Debug for AgentLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.lock().fmt(f)
    }
}

/// One session's state.
struct Session {
    seq: u64,
    next_id: u64,
    /// Serialized SSE events of frames, by sequence.
    buffer: VecDeque<(u64, Bytes)>,
    /// Buffer was trimmed up to here (frames at or below are gone).
    trimmed_to: u64,
    stream: Option<mpsc::Sender<Bytes>>,
    frame_types: Vec<String>,
    /// The response streaming now: its cancel flag.
    current: Option<(u64, watch::Sender<Option<Instant>>)>,
    responses: u64,
    confirmation: Option<(String, Vec<String>, tokio::sync::oneshot::Sender<bool>)>,
    limits: HashMap<&'static str, VecDeque<Instant>>,
    dropped_once: bool,
}

impl Session {
    fn new(frame_types: Vec<String>) -> Self {
        Session {
            seq: 0,
            next_id: 0,
            buffer: VecDeque::new(),
            trimmed_to: 0,
            stream: None,
            frame_types,
            current: None,
            responses: 0,
            confirmation: None,
            limits: HashMap::new(),
            dropped_once: false,
        }
    }

    fn send_raw(&mut self, b: Bytes) {
        if let Some(tx) = &self.stream
            && tx.try_send(b).is_err()
        {
            // Gone (or hopelessly behind): the host must resume.
            self.stream = None;
        }
    }

    /// Send an `agent.frame` (sequence and id assigned here).
    fn frame(&mut self, mut frame: Value) {
        let ft = frame["frameType"].as_str().unwrap_or_default();
        if !self.frame_types.iter().any(|t| t == ft) {
            // AS-9: only negotiated frame types are sent.
            tracing::debug!(
                frame_type = ft,
                "H2A agent: frame type not negotiated; not sent"
            );
            return;
        }
        self.seq += 1;
        self.next_id += 1;
        let id = format!("frm_{:04}", self.next_id);
        frame["type"] = json!("agent.frame");
        frame["id"] = json!(id);
        frame["sequence"] = json!(self.seq);
        let ev = Bytes::from(format!("event: agent.frame\nid: {id}\ndata: {frame}\n\n"));
        self.buffer.push_back((self.seq, ev.clone()));
        while self.buffer.len() > REPLAY_FRAMES {
            if let Some((s, _)) = self.buffer.pop_front() {
                self.trimmed_to = s;
            }
        }
        self.send_raw(ev);
    }

    fn presence(&mut self, state: &str) {
        self.next_id += 1;
        let id = format!("prs_{:04}", self.next_id);
        let p = json!({"type": "presence.update", "state": state, "confidence": 1.0});
        self.send_raw(Bytes::from(format!(
            "event: presence.update\nid: {id}\ndata: {p}\n\n"
        )));
    }

    /// Counts one `kind` signal; false when over `per_min`.
    fn rate_ok(&mut self, kind: &'static str, per_min: usize) -> bool {
        let now = Instant::now();
        let q = self.limits.entry(kind).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            q.pop_front();
        }
        if q.len() >= per_min {
            return false;
        }
        q.push_back(now);
        true
    }
}

type Sessions = Arc<Mutex<HashMap<String, Arc<Mutex<Session>>>>>;

struct Shared {
    settings: AgentSettings,
    log: AgentLog,
    sessions: Sessions,
    addr: SocketAddr,
    /// Turns true at shutdown: responses still streaming stop with the server, as a killed agent's
    /// would.
    shutdown: watch::Receiver<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running agent (from [`spawn`]). Dropping it shuts the agent down.
pub struct AgentHandle {
    addr: SocketAddr,
    log: AgentLog,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl AgentHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the origin the host discovers from.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> &AgentLog {
        &self.log
    }

    pub fn stats(&self) -> AgentStats {
        self.log.snapshot()
    }

    pub async fn shutdown(mut self) -> io::Result<()> {
        let _ = self.shutdown.send(true);
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Binds `addr`, serves H2A in a background task.
pub async fn spawn(addr: SocketAddr, settings: AgentSettings) -> io::Result<AgentHandle> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (tx, rx) = watch::channel(false);
    let log = AgentLog::default();
    let task = tokio::spawn(serve_with_log(listener, settings, rx, log.clone()));
    Ok(AgentHandle {
        addr: local,
        log,
        shutdown: tx,
        task: Some(task),
    })
}

/// Serves H2A on `listener` until `shutdown` turns true.
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
    let shared = Arc::new(Shared {
        settings,
        log,
        sessions: Arc::default(),
        addr: listener.local_addr()?,
        shutdown: shutdown.clone(),
    });
    let mut tasks = JoinSet::new();
    tracing::info!(addr = %shared.addr, "H2A agent listening");
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        let svc = service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(route(shared, req).await) }
                        });
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await
                        {
                            tracing::debug!(error = %e, "H2A agent connection ended");
                        }
                    });
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

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

fn card(shared: &Shared) -> Value {
    let base = format!("http://{}", shared.addr);
    let endpoint = if shared.settings.mock_discovery {
        json!({"h2a": "/h2a/session"})
    } else {
        json!({
            "h2a": format!("{base}/h2a"),
            "agentCard": format!("{base}/.well-known/h2a-agent.json"),
            "healthCheck": format!("{base}/h2a/health"),
        })
    };
    json!({
        "h2a": "0.2",
        "version": "0.2",
        "name": "hearken reference agent",
        "description": "Answers what it heard, for tests and the demo",
        "identity": {"language": "en", "formality": "adaptive"},
        "capabilities": {"streaming": true, "presence": true, "stateObservation": false,
            "uiOrchestration": false, "multimodal": ["text"], "interruptible": true},
        "conformance": "standard",
        "presence": {"states": ["rest", "attentive", "conversing"], "defaultState": "rest"},
        "frameTypes": ["text", "tool_card", "confirmation", "progress", "error", "end"],
        "endpoint": endpoint,
        "authentication": {"schemes": [if shared.settings.token.is_some() { "bearer" } else { "none" }]},
    })
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(t) = &shared.settings.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.strip_prefix("Bearer ") == Some(t.as_str()));
        if !ok {
            return json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"ok": false, "error": "AUTHENTICATION_REQUIRED"}),
            );
        }
    }
    let card_path = if shared.settings.mock_discovery {
        "/.well-known/h2a.json"
    } else {
        "/.well-known/h2a-agent.json"
    };
    match (method, path.as_str()) {
        (Method::GET, p) if p == card_path => {
            shared.log.update(|s| s.cards += 1);
            json_response(StatusCode::OK, &card(&shared))
        }
        (Method::GET, "/h2a/health") => {
            let n = lock(&shared.sessions).len();
            json_response(
                StatusCode::OK,
                &json!({"status": "healthy", "h2a": "0.2",
                    "agent": {"name": "hearken reference agent", "conformance": "standard", "version": "0.2"},
                    "activeSessions": n, "checks": {}}),
            )
        }
        (Method::POST, "/h2a/session") => match read_json(&shared, req, &path).await {
            Ok((_, body)) => session(shared, body).await,
            Err(r) => r,
        },
        (Method::POST, "/h2a/signal") => match read_json(&shared, req, &path).await {
            Ok((sid, body)) => signal(shared, sid, body),
            Err(r) => r,
        },
        (m, p) => full(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no route {m} {p}"),
        ),
    }
}

async fn read_json(
    shared: &Shared,
    req: Request<Incoming>,
    path: &str,
) -> Result<(Option<String>, Value), Response<Body>> {
    let sid = req
        .headers()
        .get("X-H2A-Session")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ct_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !ct_json {
        shared.log.violation(format!(
            "POST {path} without Content-Type: application/json"
        ));
    }
    let body = http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes());
    let Ok(bytes) = body else {
        return Err(full(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            "too large",
        ));
    };
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            shared
                .log
                .violation(format!("POST {path}: body is not JSON: {e}"));
            return Err(json_response(
                StatusCode::BAD_REQUEST,
                &json!({"ok": false, "error": "invalid JSON"}),
            ));
        }
    };
    shared
        .log
        .update(|s| s.requests.push((path.to_string(), sid.clone(), v.clone())));
    Ok((sid, v))
}

/// The schema's checks for the messages a host sends (written out; see the module docs).
pub fn check_host_message(v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let Some(obj) = v.as_object() else {
        return vec!["not a JSON object".into()];
    };
    let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let is_str = |k: &str| obj.get(k).is_none_or(Value::is_string);
    match ty {
        "session.open" => {
            if obj.contains_key("sessionId") {
                errs.push(
                    "session.open proposes a sessionId (ids are server-generated, S2.1)".into(),
                );
            }
            if let Some(l) = obj.get("locale") {
                let ok = l.as_str().is_some_and(|l| {
                    let b = l.as_bytes();
                    (b.len() == 2
                        || (b.len() == 5
                            && b[2] == b'-'
                            && b[3..].iter().all(u8::is_ascii_uppercase)))
                        && b[..2].iter().all(u8::is_ascii_lowercase)
                });
                if !ok {
                    errs.push(format!(
                        "locale {l} does not match ^[a-z]{{2}}(-[A-Z]{{2}})?$"
                    ));
                }
            }
            if !is_str("resumeFrom") || !is_str("timezone") {
                errs.push("resumeFrom/timezone must be strings".into());
            }
            match obj.get("hostCapabilities") {
                None => {
                    errs.push("session.open without hostCapabilities (v0.2 requires them)".into())
                }
                Some(h) => {
                    let rendering_ok = h.get("rendering").is_none_or(|r| {
                        r.as_array().is_some_and(|a| a.iter().all(Value::is_string))
                    });
                    if !rendering_ok {
                        errs.push("hostCapabilities.rendering must be an array of strings".into());
                    }
                    for k in ["stateSync", "orchestration"] {
                        if h.get(k).is_some_and(|b| !b.is_boolean()) {
                            errs.push(format!("hostCapabilities.{k} must be a boolean"));
                        }
                    }
                }
            }
        }
        "session.resume" => {
            if !obj.get("sessionId").is_some_and(Value::is_string) {
                errs.push("session.resume without a string sessionId".into());
            }
            if obj
                .get("lastReceivedSequence")
                .and_then(Value::as_u64)
                .is_none()
            {
                errs.push("session.resume without an integer lastReceivedSequence >= 0".into());
            }
        }
        "user.signal" => {
            const SIGNALS: &[&str] = &[
                "message",
                "confirm",
                "deny",
                "interrupt",
                "redirect",
                "context_change",
                "feedback",
                "session_switch",
            ];
            let st = obj.get("signalType").and_then(Value::as_str);
            if !st.is_some_and(|s| SIGNALS.contains(&s)) {
                errs.push(format!(
                    "signalType {:?} not in the schema's enum",
                    obj.get("signalType")
                ));
            }
            let c = obj.get("content");
            match st {
                Some("message") => {
                    let ok = c.is_some_and(|c| {
                        c.as_str().is_some_and(|s| !s.is_empty())
                            || c.get("text")
                                .and_then(Value::as_str)
                                .is_some_and(|s| !s.is_empty())
                    });
                    if !ok {
                        errs.push("message without text".into());
                    }
                }
                Some("interrupt") => {
                    let ok = c
                        .and_then(|c| c.get("scope"))
                        .and_then(Value::as_str)
                        .is_some_and(|s| s == "current" || s == "all");
                    if !ok {
                        errs.push("interrupt without scope current|all".into());
                    }
                }
                Some("confirm") => {
                    let ok = c.is_some_and(|c| {
                        c.get("frameId").is_some_and(Value::is_string)
                            && c.get("choice").is_some_and(Value::is_string)
                    });
                    if !ok {
                        errs.push("confirm without frameId and choice".into());
                    }
                }
                Some("deny")
                    if !c.is_some_and(|c| c.get("frameId").is_some_and(Value::is_string)) =>
                {
                    errs.push("deny without frameId".into());
                }
                _ => {}
            }
        }
        "state.snapshot" | "state.diff" => {
            if !obj.get("timestamp").is_some_and(Value::is_string) {
                errs.push(format!("{ty} without timestamp"));
            }
        }
        other => errs.push(format!("message type {other:?} is not a host message")),
    }
    errs
}

fn sse_response(
    rx: mpsc::Receiver<Bytes>,
    keepalive_ms: u64,
    session_header: &str,
) -> Response<Body> {
    let keepalive = Duration::from_millis(keepalive_ms.max(10));
    let stream = futures_util::stream::unfold(rx, move |mut rx| async move {
        let item = match tokio::time::timeout(keepalive, rx.recv()).await {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(_) => Bytes::from_static(b": keepalive\n\n"),
        };
        Some((Ok::<_, Infallible>(Frame::data(item)), rx))
    });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(session_header) {
        h.insert("X-H2A-Session", v);
    }
    r
}

fn new_session_id() -> String {
    format!(
        "ses_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

async fn session(shared: Arc<Shared>, body: Value) -> Response<Body> {
    for e in check_host_message(&body) {
        shared.log.violation(format!("POST /h2a/session: {e}"));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(4_096);
    match body.get("type").and_then(Value::as_str) {
        Some("session.open") => {
            let host: Vec<String> = body
                .pointer("/hostCapabilities/rendering")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_else(|| vec!["text".into()]);
            let ours = [
                "text",
                "tool_card",
                "confirmation",
                "progress",
                "error",
                "end",
            ];
            let mut types: Vec<String> = ours
                .iter()
                .filter(|t| host.iter().any(|h| h == *t))
                .map(|t| t.to_string())
                .collect();
            for t in ["error", "end"] {
                if !types.iter().any(|x| x == t) {
                    types.push(t.into());
                }
            }
            let level = match body
                .pointer("/hostCapabilities/conformanceLevel")
                .and_then(Value::as_str)
            {
                Some("basic") | None => "basic",
                _ => "standard",
            };
            let id = new_session_id();
            let ack = json!({"type": "session.ack", "sessionId": id, "negotiatedCapabilities": {
                "frameTypes": types, "conformanceLevel": level, "stateSync": false,
                "orchestration": false, "presence": true}});
            let _ = tx.try_send(Bytes::from(format!("event: session.ack\ndata: {ack}\n\n")));
            let mut s = Session::new(types);
            s.stream = Some(tx);
            lock(&shared.sessions).insert(id.clone(), Arc::new(Mutex::new(s)));
            shared.log.update(|s| s.sessions_opened += 1);
            tracing::info!(session = %id, "H2A session opened");
            sse_response(rx, shared.settings.keepalive_ms, &id)
        }
        Some("session.resume") => {
            let id = body
                .get("sessionId")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let last = body
                .get("lastReceivedSequence")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let sess = lock(&shared.sessions).get(&id).cloned();
            shared.log.update(|s| s.resumes += 1);
            let sync_error = |why: &str| {
                let f = json!({"type": "agent.frame", "id": "frm_sync", "frameType": "error",
                    "content": {"code": "STATE_SYNC_ERROR", "message": why, "severity": "error"},
                    "fallbackText": "The session could not be resumed."});
                Bytes::from(format!("event: agent.frame\ndata: {f}\n\n"))
            };
            match sess {
                None => {
                    let _ = tx.try_send(sync_error("unknown session"));
                    drop(tx);
                    sse_response(rx, shared.settings.keepalive_ms, "")
                }
                Some(sess) => {
                    let mut s = lock(&sess);
                    if last < s.trimmed_to || last > s.seq {
                        let _ = tx
                            .try_send(sync_error("the replay buffer does not reach back that far"));
                        drop(tx);
                        drop(s);
                        return sse_response(rx, shared.settings.keepalive_ms, &id);
                    }
                    let ack = json!({"type": "session.ack", "sessionId": id, "resumedFromSequence": last});
                    let _ =
                        tx.try_send(Bytes::from(format!("event: session.ack\ndata: {ack}\n\n")));
                    let mut n = 0;
                    for (seq, ev) in &s.buffer {
                        if *seq > last {
                            let _ = tx.try_send(ev.clone());
                            n += 1;
                        }
                    }
                    s.stream = Some(tx);
                    drop(s);
                    shared.log.update(|st| st.frames_replayed += n);
                    tracing::info!(session = %id, last, replayed = n, "H2A session resumed");
                    sse_response(rx, shared.settings.keepalive_ms, &id)
                }
            }
        }
        other => {
            shared
                .log
                .violation(format!("POST /h2a/session with type {other:?}"));
            json_response(StatusCode::BAD_REQUEST, &json!({"ok": false}))
        }
    }
}

fn signal(shared: Arc<Shared>, sid: Option<String>, body: Value) -> Response<Body> {
    let Some(sid) = sid else {
        shared
            .log
            .violation("POST /h2a/signal without X-H2A-Session".into());
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "Missing X-H2A-Session",
        );
    };
    let Some(sess) = lock(&shared.sessions).get(&sid).cloned() else {
        shared
            .log
            .violation(format!("POST /h2a/signal for unknown session {sid}"));
        return json_response(StatusCode::NOT_FOUND, &json!({"ok": false}));
    };
    for e in check_host_message(&body) {
        shared.log.violation(format!("POST /h2a/signal: {e}"));
    }
    if body.get("type").and_then(Value::as_str) != Some("user.signal") {
        // Snapshots and diffs: accepted, not acted on.
        return json_response(StatusCode::OK, &json!({"ok": true}));
    }
    let st = body.get("signalType").and_then(Value::as_str).unwrap_or("");
    let content = body.get("content").cloned().unwrap_or(Value::Null);
    let limit = match st {
        "message" => Some(("message", 30)),
        "interrupt" => Some(("interrupt", 10)),
        "confirm" | "deny" => Some(("confirm", 30)),
        _ => None,
    };
    {
        let mut s = lock(&sess);
        if let Some((kind, n)) = limit
            && !s.rate_ok(kind, n)
        {
            shared
                .log
                .violation(format!("{st} over the agent's {n}/min limit"));
            s.frame(
                json!({"frameType": "error", "content": {"code": "RATE_LIMITED",
                "message": format!("Too many {st} signals. Please wait."), "retryAfter": 30,
                "severity": "warning"}, "fallbackText": "Rate limited. Wait 30 seconds."}),
            );
            return json_response(StatusCode::OK, &json!({"ok": true}));
        }
    }
    match st {
        "message" => {
            let text = content
                .as_str()
                .or_else(|| content.get("text").and_then(Value::as_str))
                .unwrap_or("")
                .to_string();
            shared.log.update(|s| s.messages.push(text.clone()));
            let (cancel_tx, cancel_rx) = watch::channel(None);
            let n = {
                let mut s = lock(&sess);
                s.responses += 1;
                let n = s.responses;
                if let Some((_, old)) = s.current.replace((n, cancel_tx)) {
                    // A new message supersedes a response still streaming.
                    let _ = old.send(Some(Instant::now()));
                }
                n
            };
            let mut down = shared.shutdown.clone();
            let response = respond(shared.clone(), sess, n, text, cancel_rx);
            tokio::spawn(async move {
                tokio::select! {
                    _ = response => {}
                    _ = down.wait_for(|d| *d) => {}
                }
            });
        }
        "interrupt" => {
            shared.log.update(|s| s.interrupts += 1);
            let s = lock(&sess);
            if let Some((_, c)) = &s.current {
                let _ = c.send(Some(Instant::now()));
            }
        }
        "confirm" | "deny" => {
            let frame_id = content
                .get("frameId")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let mut s = lock(&sess);
            match s.confirmation.take() {
                Some((id, options, tx)) if id == frame_id => {
                    if st == "confirm" {
                        let choice = content
                            .get("choice")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string();
                        if !options.contains(&choice) {
                            shared.log.violation(format!(
                                "confirm choice {choice:?} is not an option of {id}"
                            ));
                        }
                        shared.log.update(|l| l.confirms.push((frame_id, choice)));
                        let _ = tx.send(true);
                    } else {
                        shared.log.update(|l| l.denies.push(frame_id));
                        let _ = tx.send(false);
                    }
                }
                other => {
                    s.confirmation = other;
                    shared.log.violation(format!(
                        "{st} for {frame_id:?}, which is not a pending confirmation"
                    ));
                }
            }
        }
        _ => {}
    }
    json_response(StatusCode::OK, &json!({"ok": true}))
}

/// Streams one answer; stops at an interrupt (checked between frames) with `end {interrupted}`.
async fn respond(
    shared: Arc<Shared>,
    sess: Arc<Mutex<Session>>,
    n: u64,
    text: String,
    mut cancel: watch::Receiver<Option<Instant>>,
) {
    let st = &shared.settings;
    let frames_sent = std::sync::atomic::AtomicU32::new(0);
    // Send one frame unless interrupted; false when the response must stop.
    let send = |f: Value| -> bool {
        let mut s = lock(&sess);
        if cancel.borrow().is_some() {
            return false;
        }
        s.frame(f);
        shared.log.update(|l| l.frames_sent += 1);
        let n = frames_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if st.drop_after_frames == Some(n) && !s.dropped_once {
            s.dropped_once = true;
            s.stream = None;
            shared.log.update(|l| l.drops += 1);
            tracing::info!("H2A agent: dropping the stream mid-response (test hook)");
        }
        true
    };
    let pause = |ms: u64| {
        let mut c = cancel.clone();
        async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
                _ = c.wait_for(|v| v.is_some()) => false,
            }
        }
    };
    lock(&sess).presence("conversing");
    let mut ok = true;
    if text.contains("/flood") {
        for i in 0..st.flood_frames {
            if !send(
                json!({"frameType": "text", "content": format!("w{i} "), "streaming": true,
                "final": false}),
            ) {
                ok = false;
                break;
            }
            if i % 50 == 49 {
                tokio::task::yield_now().await;
            }
        }
    } else if text.contains("/confirm") {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut s = lock(&sess);
            let id = format!("frm_{:04}", s.next_id + 1);
            s.confirmation = Some((id, vec!["confirm".into(), "deny".into()], tx));
        }
        ok = send(
            json!({"frameType": "confirmation", "content": {"action": "archive_project",
            "description": "Archive project Alpha?", "tier": "confirmable",
            "options": [{"id": "confirm", "label": "Archive", "destructive": true},
                        {"id": "deny", "label": "Cancel", "default": true}], "timeout": 60},
            "fallbackText": "Confirm: Archive project Alpha?"}),
        );
        if ok {
            let mut c = cancel.clone();
            let answer = tokio::select! {
                a = rx => a.ok(),
                _ = c.wait_for(|v| v.is_some()) => None,
                _ = tokio::time::sleep(Duration::from_secs(60)) => Some(false),
            };
            let reply = match answer {
                Some(true) => "Done: the project is archived.",
                Some(false) => "Cancelled: nothing was archived.",
                None => "",
            };
            ok = !reply.is_empty()
                && send(json!({"frameType": "text", "content": reply, "final": true}));
        }
    } else {
        let first = format!("You said: {}.", text.trim_end_matches(['.', '!', '?']));
        let words: Vec<&str> = first.split(' ').collect();
        for (i, w) in words.iter().enumerate() {
            let last = i + 1 == words.len();
            let _ = last;
            let chunk = format!("{w} ");
            if !send(
                json!({"frameType": "text", "content": chunk, "streaming": true, "final": false}),
            ) || !pause(st.delta_ms).await
            {
                ok = false;
                break;
            }
        }
        if ok {
            ok = send(
                json!({"frameType": "tool_card", "content": {"tool": "lookup", "status": "running",
                "input": {"query": text}}, "fallbackText": "Looking that up."}),
            ) && pause(st.tool_ms).await
                && send(
                    json!({"frameType": "tool_card", "content": {"tool": "lookup",
                    "status": "completed", "output": {"results": 1}, "duration": st.tool_ms},
                    "fallbackText": "Used lookup."}),
                );
        }
        if ok {
            let words: Vec<&str> = st.closing.split(' ').collect();
            for (i, w) in words.iter().enumerate() {
                let last = i + 1 == words.len();
                let chunk = if last { w.to_string() } else { format!("{w} ") };
                if !send(
                    json!({"frameType": "text", "content": chunk, "streaming": true, "final": last}),
                ) || (!last && !pause(st.delta_ms).await)
                {
                    ok = false;
                    break;
                }
            }
        }
    }
    let interrupted_at = *cancel.borrow_and_update();
    let mut s = lock(&sess);
    if ok && interrupted_at.is_none() {
        s.frame(json!({"frameType": "end", "content": {"reason": "complete"}}));
        shared.log.update(|l| l.responses_completed += 1);
    } else {
        s.frame(json!({"frameType": "end", "content": {"reason": "interrupted"}}));
        let ms = interrupted_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        shared.log.update(|l| {
            l.responses_interrupted += 1;
            l.interrupts_honoured += 1;
            l.max_interrupt_to_end_ms = l.max_interrupt_to_end_ms.max(ms);
        });
    }
    if s.current.as_ref().is_some_and(|(m, _)| *m == n) {
        s.current = None;
        s.confirmation = None;
        s.presence("rest");
    }
}
