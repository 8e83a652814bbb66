//! Reference HAIP agent: the server side of HAIP 1.1.2 as written at `haiprotocol/haip@f8dfe4d`
//! (README envelope schema + `docs/api-reference/openapi.json`), strict enough to catch the device's
//! mistakes.
//!
//! Per connection: the token is checked on the upgrade (`?token=` or `Sec-WebSocket-Protocol: haip,
//! token.<t>`; a bad one is answered with close 1008 "Invalid token" before any frame, like the
//! reference server). Our `HAI` goes out at once. Every client frame is then checked against the
//! envelope schema and the payload schema of its type, plus the rules the prose states: `seq` from "1"
//! in steps of one, unique `id`s, our `session` after the handshake, `HAI` first, binary mode only as
//! advertised (one binary frame of exactly `bin_len` bytes right after its envelope, no `data`), and
//! per-channel credit (one message per frame, audio bytes as `bin_len` or decoded length). A violation
//! is recorded in the [`AgentLog`] and answered with `ERROR` (non-fatal unless the handshake is broken).
//!
//! A user turn (`TEXT_MESSAGE_START` .. `AUDIO_CHUNK`s .. `TEXT_MESSAGE_END`, one `message_id`) starts a
//! run: `RUN_STARTED`, the reply text on AGENT, the user's audio played back and a 440 Hz tone on
//! AUDIO_OUT (paced in real time, so a `RUN_CANCEL` can land mid-reply), `RUN_FINISHED`. Outbound frames
//! obey the credit the client granted in its `HAI` and its `FLOW_UPDATE`/`PAUSE_CHANNEL`/
//! `RESUME_CHANNEL`; the last 1000 frames are kept for `REPLAY_REQUEST`.
//!
//! The protocol state ([`Conn`]) is sans-IO; one task per connection drives it with `select!` over the
//! socket, the run's pacing deadline, a heartbeat and shutdown.
//!
//! Context: tokio. One task per connection; the shared [`AgentLog`] is a `std` mutex held only for
//! short, non-async updates.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// The version this agent implements and advertises.
/// The spec version and its 22 event types (D1): the same spec data the client codec uses. The agent
/// accepts all of them.
pub use crate::protocol::haip::{ACCEPT_EVENTS as EVENT_TYPES, HAIP_VERSION};

/// Mime of the reply tone.
pub const TONE_MIME: &str = "audio/pcm;rate=16000";

/// Frames kept for `REPLAY_REQUEST` (the spec asks for at least 1000 messages or 5 minutes).
const REPLAY_WINDOW_FRAMES: usize = 1000;
/// Frame ids remembered for duplicate detection.
const SEEN_IDS: usize = 4096;
/// Ended message ids remembered (audio or text for them is a violation).
const ENDED_IDS: usize = 256;
/// A paced audio clock further behind than this was stalled (pause, credit): restart it at now
/// rather than bursting the backlog.
const PACE_SLACK: Duration = Duration::from_millis(100);
/// Frames sent per loop turn before the socket is read again.
const SEND_BURST: usize = 64;
/// User audio kept per message for the playback (bounds memory on a runaway utterance).
const MAX_ECHO_BYTES: usize = 8 * 1024 * 1024;
const TONE_HZ: f64 = 440.0;
const TONE_RATE_HZ: u32 = 16_000;

const PROTOCOL_VIOLATION: &str = "PROTOCOL_VIOLATION";
const SEQ_VIOLATION: &str = "SEQ_VIOLATION";

// ---------------------------------------------------------------------------------------------------
// Settings and the shared log
// ---------------------------------------------------------------------------------------------------

/// What the agent does. `Default` is what `hearken agent` runs.
#[derive(Clone)]
pub struct AgentSettings {
    /// Required token (`?token=` or `Sec-WebSocket-Protocol: haip, token.<t>`); `None`: no auth.
    pub token: Option<String>,
    /// Credit granted to the client per channel in our `HAI` (messages, at least 1). Default 64.
    pub initial_credit_messages: u64,
    /// Byte credit per channel in our `HAI`: audio bytes (`bin_len`, or decoded `data`). Default 1 MiB.
    pub initial_credit_bytes: u64,
    /// Send `FLOW_UPDATE` as the client uses credit (once half of the initial grant is used).
    pub replenish: bool,
    /// Advertise (and accept) binary frames.
    pub binary_frames: bool,
    /// Length of the 440 Hz tone after the played-back audio; 0: none.
    pub reply_tone_ms: u32,
    /// Stream the reply text as `TEXT_MESSAGE_PART`s (one per word) instead of `START.text`.
    pub text_reply_parts: bool,
    /// Size of the agent's tone chunks.
    pub chunk_ms: u32,
    /// Send audio chunks at real-time pace (so barge-in can land mid-reply). Tests may turn it off.
    pub pace_realtime: bool,
    /// Protocol `PING` to the client at this interval; `None`: never.
    pub ping_interval: Option<Duration>,
    /// Call a (pretend) tool before answering: `TOOL_CALL`, then `TOOL_DONE` after `ms`.
    pub tool_call: Option<ToolCall>,
    /// Fault injection for tests.
    pub inject: Inject,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            token: None,
            initial_credit_messages: 64,
            initial_credit_bytes: 1024 * 1024,
            replenish: true,
            binary_frames: true,
            reply_tone_ms: 300,
            text_reply_parts: true,
            chunk_ms: 20,
            pace_realtime: true,
            ping_interval: Some(Duration::from_secs(30)),
            tool_call: None,
            inject: Inject::default(),
        }
    }
}

impl fmt::Debug for AgentSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token never reaches a log line.
        f.debug_struct("AgentSettings")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("initial_credit_messages", &self.initial_credit_messages)
            .field("initial_credit_bytes", &self.initial_credit_bytes)
            .field("replenish", &self.replenish)
            .field("binary_frames", &self.binary_frames)
            .field("reply_tone_ms", &self.reply_tone_ms)
            .field("text_reply_parts", &self.text_reply_parts)
            .field("chunk_ms", &self.chunk_ms)
            .field("pace_realtime", &self.pace_realtime)
            .field("ping_interval", &self.ping_interval)
            .field("tool_call", &self.tool_call)
            .field("inject", &self.inject)
            .finish()
    }
}

/// A tool call the agent makes before it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The tool's name in `TOOL_CALL`.
    pub name: String,
    /// How long it "runs" before `TOOL_DONE` (paced like audio; immediate without `pace_realtime`).
    pub ms: u32,
    /// Only for this turn of a connection (1-based); `None`: every turn.
    pub on_turn: Option<u64>,
}

/// Faults the agent injects, per connection (test hooks; all off by default).
#[derive(Debug, Clone, Default)]
pub struct Inject {
    /// The frame numbered `seq` is built and kept in the replay window but never sent: the client
    /// sees a gap and should `REPLAY_REQUEST` it.
    pub skip_seq_once: Option<u64>,
    /// Every n-th frame is sent twice (same `id` and `seq`).
    pub duplicate_every: Option<u32>,
    /// After sending this many frames, drop the connection without a close frame ("agent killed").
    pub drop_after_frames: Option<u32>,
    /// Accept `RUN_CANCEL` but keep sending the run (it finishes `OK`).
    pub ignore_cancel: bool,
    /// Answer as the reference server (`@f8dfe4d`) does: no `RUN_STARTED` or `RUN_FINISHED`, and
    /// no `run_id` on the reply's frames, so nothing tells the client the answer is over.
    pub no_runs: bool,
}

/// A protocol violation by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Connection number (1-based, in accept order).
    pub connection: u64,
    /// The `ERROR` code sent for it (`PROTOCOL_VIOLATION`, `SEQ_VIOLATION`, ...).
    pub code: String,
    pub message: String,
    /// `type` and `seq` of the offending frame, when it had them.
    pub frame_type: Option<String>,
    pub frame_seq: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[conn {}] {}: {}",
            self.connection, self.code, self.message
        )?;
        if let Some(t) = &self.frame_type {
            write!(f, " (type {t}")?;
            if let Some(s) = &self.frame_seq {
                write!(f, ", seq {s}")?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// One user turn the agent received (recorded at its `TEXT_MESSAGE_END`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnRecord {
    pub connection: u64,
    pub message_id: String,
    /// Sum of the chunks' `duration_ms`.
    pub audio_ms: u64,
    pub audio_chunks: u32,
    /// Chunks that came in binary mode.
    pub binary_chunks: u32,
    /// Mime of the first audio chunk.
    pub audio_mime: Option<String>,
    /// `START.text` followed by the `PART`s.
    pub text: String,
}

/// Everything the agent observed, summed over all connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// WebSocket upgrades accepted (including those then closed for a bad token).
    pub connections: u64,
    /// Upgrades closed with 1008 "Invalid token".
    pub auth_rejected: u64,
    /// Valid client `HAI`s.
    pub handshakes: u64,
    pub frames_received: u64,
    /// Frames sent (envelopes; a binary-mode chunk counts once), replays excluded.
    pub frames_sent: u64,
    pub audio_chunks_sent: u64,
    /// User turns completed (`TEXT_MESSAGE_END` of a started message), and what each held.
    pub turns: u64,
    pub turn_records: Vec<TurnRecord>,
    pub runs_started: u64,
    /// Runs that ended with `RUN_FINISHED{status:"OK"}`.
    pub runs_finished: u64,
    /// Runs that ended with `RUN_FINISHED{status:"CANCELLED"}`.
    pub runs_cancelled: u64,
    pub cancels_received: u64,
    /// Cancels not acted on: `inject.ignore_cancel`, or the run had already finished (a race, not an error).
    pub cancels_ignored: u64,
    /// Client protocol violations, in order. A conforming device leaves this empty.
    pub violations: Vec<Violation>,
    pub replay_requests_served: u64,
    pub frames_replayed: u64,
    /// `FLOW_UPDATE`s we sent and the credit they granted (beyond the initial grant).
    pub flow_updates_sent: u64,
    pub credit_granted_messages: u64,
    pub credit_granted_bytes: u64,
    pub pings_answered: u64,
    pub pongs_received: u64,
    /// `ERROR`/`RUN_ERROR` frames the client sent us, as "CODE: message".
    pub client_errors: Vec<String>,
    /// Times our output had to wait for the client (paused channel or no credit left).
    pub outbound_holds: u64,
    /// Frames not sent because the client's `accept_events` left their type out.
    pub frames_suppressed: u64,
}

/// The agent's shared, cloneable record of what happened ([`AgentStats`]).
pub type AgentLog = super::SharedLog<AgentStats>;

impl AgentLog {
    /// The violations recorded so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.lock().violations.clone()
    }
}

// ---------------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------------

/// A running agent (from [`spawn`]); its url is `ws://<addr>/haip/websocket` (the agent accepts any
/// path). Dropping it shuts the agent down.
pub type AgentHandle = super::AgentHandle<AgentStats>;

/// Binds `addr` (e.g. `127.0.0.1:0`), serves plain WebSocket on it in a background task, and returns
/// the bound address and a handle with the shared [`AgentLog`].
pub async fn spawn(
    addr: SocketAddr,
    settings: AgentSettings,
) -> io::Result<(SocketAddr, AgentHandle)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (tx, rx) = watch::channel(false);
    let log = AgentLog::new();
    let task = tokio::spawn(serve_with_log(listener, settings, None, rx, log.clone()));
    Ok((
        local,
        AgentHandle::new(local, format!("ws://{local}/haip/websocket"), log, tx, task),
    ))
}

/// Serves HAIP on `listener` until `shutdown` turns true (or its sender is dropped). Each connection
/// runs in its own task; on shutdown they are closed with 1001 and given 2 s to finish.
pub async fn serve(
    listener: TcpListener,
    settings: AgentSettings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    serve_with_log(listener, settings, tls, shutdown, AgentLog::new()).await
}

/// [`serve`], recording into `log`.
pub async fn serve_with_log(
    listener: TcpListener,
    settings: AgentSettings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    log: AgentLog,
) -> io::Result<()> {
    let settings = Arc::new(settings);
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "HAIP agent listening");
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    next_id += 1;
                    let ctx = ConnCtx {
                        id: next_id,
                        settings: settings.clone(),
                        log: log.clone(),
                        shutdown: shutdown.clone(),
                    };
                    tasks.spawn(handle_tcp(tcp, peer, tls.clone(), ctx));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    tracing::info!("HAIP agent stopped");
    Ok(())
}

struct ConnCtx {
    id: u64,
    settings: Arc<AgentSettings>,
    log: AgentLog,
    shutdown: watch::Receiver<bool>,
}

async fn handle_tcp(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: ConnCtx,
) {
    let _ = tcp.set_nodelay(true);
    match tls {
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(stream) => handle_ws(stream, peer, ctx).await,
            Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        },
        None => handle_ws(tcp, peer, ctx).await,
    }
}

/// Token check on the upgrade request: `(token ok, client offered the "haip" subprotocol)`.
fn check_upgrade(req: &Request, expected: Option<&str>) -> (bool, bool) {
    let offered: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    let offers_haip = offered.iter().any(|p| p == "haip");
    let Some(expected) = expected else {
        return (true, offers_haip);
    };
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| percent_decode(v))
    });
    let from_protocol = offered
        .iter()
        .find_map(|p| p.strip_prefix("token.").map(str::to_string));
    let ok = [from_query, from_protocol]
        .into_iter()
        .flatten()
        .any(|t| constant_time_eq(t.as_bytes(), expected.as_bytes()));
    (ok, offers_haip)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The upgrade callback: notes whether the token is right (the verdict is delivered after the
/// upgrade, as close 1008) and selects the `haip` subprotocol when the client offers it.
struct Upgrade<'a> {
    expected: Option<&'a str>,
    token_ok: &'a mut bool,
}

impl Callback for Upgrade<'_> {
    fn on_request(self, req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
        let (ok, offers_haip) = check_upgrade(req, self.expected);
        *self.token_ok = ok;
        if offers_haip {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("haip"));
        }
        Ok(resp)
    }
}

async fn handle_ws<S>(stream: S, peer: SocketAddr, ctx: ConnCtx)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut token_ok = false;
    let callback = Upgrade {
        expected: ctx.settings.token.as_deref(),
        token_ok: &mut token_ok,
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async(stream, callback).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
            return;
        }
    };
    ctx.log.update(|s| s.connections += 1);
    if !token_ok {
        // Like the reference server: accept the upgrade, then close 1008 before any frame.
        tracing::info!(conn = ctx.id, %peer, "rejected: invalid token");
        ctx.log.update(|s| s.auth_rejected += 1);
        close_and_drain(&mut ws, CloseCode::Policy, "Invalid token").await;
        return;
    }
    tracing::info!(conn = ctx.id, %peer, "HAIP connection open");
    let conn = Conn::new(
        ctx.id,
        ctx.settings.clone(),
        ctx.log.clone(),
        Instant::now(),
    );
    drive(ws, conn, ctx.shutdown, ctx.settings.ping_interval).await;
    tracing::info!(conn = ctx.id, %peer, "HAIP connection closed");
}

async fn close_and_drain<S>(ws: &mut WebSocketStream<S>, code: CloseCode, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.to_string().into(),
    };
    let _ = ws.close(Some(frame)).await;
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The connection loop: send what is ready, then wait for a frame, the pacing deadline, the heartbeat
/// or shutdown, whichever comes first (so a `RUN_CANCEL` is read while a reply is being paced out).
async fn drive<S>(
    mut ws: WebSocketStream<S>,
    mut conn: Conn,
    mut shutdown: watch::Receiver<bool>,
    ping_interval: Option<Duration>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let far = Duration::from_secs(86_400 * 365);
    let period = ping_interval.unwrap_or(far).max(Duration::from_millis(10));
    let mut ping = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        let mut sent = 0;
        while sent < SEND_BURST {
            let Some(tx) = conn.poll_transmit(Instant::now()) else {
                break;
            };
            sent += 1;
            for m in tx.messages {
                if ws.feed(m).await.is_err() {
                    return;
                }
            }
            if tx.drop_connection {
                // Fault injection: vanish without a close frame.
                let _ = ws.flush().await;
                tracing::info!(conn = conn.id, "inject: dropping the connection");
                return;
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
        if let Some((code, reason)) = conn.close.clone() {
            close_and_drain(&mut ws, code, &reason).await;
            return;
        }
        let deadline = if sent >= SEND_BURST {
            Some(Instant::now())
        } else {
            conn.next_deadline()
        };
        let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + far));
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => conn.on_text(t.as_str()),
                Some(Ok(Message::Binary(b))) => conn.on_binary(&b),
                Some(Ok(Message::Close(_))) | None => {
                    let _ = ws.flush().await;
                    return;
                }
                Some(Ok(_)) => {} // WebSocket ping/pong: tungstenite answers on the next flush
                Some(Err(e)) => {
                    tracing::debug!(conn = conn.id, error = %e, "read failed");
                    return;
                }
            },
            _ = sleep, if deadline.is_some() => {}
            _ = ping.tick(), if ping_interval.is_some() => conn.queue_ping(),
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    close_and_drain(&mut ws, CloseCode::Away, "agent shutting down").await;
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Validation (the envelope schema of haip@f8dfe4d, written out)
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Str,
    MaxLen(usize),
    Uuid,
    U64,
    Channel,
    Event,
    Int(i128, i128),
    Num(f64, f64),
    Bool,
    Obj,
    Any,
    OneOf(&'static [&'static str]),
    Ints,
    Events,
    Base64,
    Tools,
}

struct Shape {
    required: &'static [&'static str],
    props: &'static [(&'static str, Kind)],
    /// `additionalProperties: false`
    closed: bool,
}

const ENVELOPE: Shape = Shape {
    required: &["id", "session", "seq", "ts", "channel", "type", "payload"],
    props: &[
        ("id", Kind::Uuid),
        ("session", Kind::Uuid),
        ("seq", Kind::U64),
        ("ack", Kind::U64),
        ("ts", Kind::U64),
        ("channel", Kind::Channel),
        ("type", Kind::Event),
        ("payload", Kind::Obj),
        ("pv", Kind::Int(0, 255)),
        ("crit", Kind::Bool),
        ("bin_len", Kind::Int(0, u64::MAX as i128)),
        ("bin_mime", Kind::Str),
        ("run_id", Kind::Uuid),
        ("thread_id", Kind::MaxLen(128)),
    ],
    closed: true,
};

const ERROR_SHAPE: Shape = Shape {
    required: &["code", "message"],
    props: &[
        ("code", Kind::Str),
        ("message", Kind::Str),
        ("related_id", Kind::Uuid),
        ("detail", Kind::Obj),
    ],
    closed: true,
};

const STATUS: &[&str] = &["OK", "CANCELLED", "ERROR"];

fn payload_shape(ty: &str) -> Option<Shape> {
    use Kind::*;
    fn s(
        required: &'static [&'static str],
        props: &'static [(&'static str, Kind)],
        closed: bool,
    ) -> Option<Shape> {
        Some(Shape {
            required,
            props,
            closed,
        })
    }
    match ty {
        "HAI" => s(
            &["haip_version", "accept_major", "accept_events"],
            &[
                ("haip_version", Str),
                ("accept_major", Ints),
                ("accept_events", Events),
                ("capabilities", Obj),
                ("binary_frames", Bool),
                ("max_concurrent_runs", Int(1, i64::MAX as i128)),
                ("last_rx_seq", U64),
            ],
            true,
        ),
        "RUN_STARTED" => s(&[], &[], false),
        "RUN_FINISHED" => s(&[], &[("status", OneOf(STATUS)), ("summary", Str)], true),
        "RUN_CANCEL" => s(&["run_id"], &[("run_id", Uuid)], true),
        "RUN_ERROR" | "ERROR" => Some(ERROR_SHAPE),
        "PING" | "PONG" => s(&[], &[("nonce", Str)], true),
        "REPLAY_REQUEST" => s(&["from_seq"], &[("from_seq", U64), ("to_seq", U64)], true),
        "TEXT_MESSAGE_START" => s(
            &["message_id"],
            &[("message_id", Uuid), ("author", Str), ("text", Str)],
            true,
        ),
        "TEXT_MESSAGE_PART" => s(
            &["message_id", "text"],
            &[("message_id", Uuid), ("text", Str)],
            true,
        ),
        "TEXT_MESSAGE_END" => s(
            &["message_id"],
            &[("message_id", Uuid), ("tokens", U64)],
            true,
        ),
        "AUDIO_CHUNK" => s(
            &["message_id", "mime"],
            &[
                ("message_id", Uuid),
                ("mime", Str),
                ("data", Base64),
                ("duration_ms", U64),
            ],
            true,
        ),
        "TOOL_CALL" => s(
            &["call_id", "tool"],
            &[("call_id", Uuid), ("tool", Str), ("params", Obj)],
            true,
        ),
        "TOOL_UPDATE" => s(
            &["call_id", "status"],
            &[
                ("call_id", Uuid),
                ("status", OneOf(&["QUEUED", "RUNNING", "CANCELLING"])),
                ("progress", Num(0.0, 100.0)),
                ("partial", Any),
            ],
            true,
        ),
        "TOOL_DONE" => s(
            &["call_id"],
            &[
                ("call_id", Uuid),
                ("status", OneOf(STATUS)),
                ("result", Any),
            ],
            true,
        ),
        "TOOL_CANCEL" => s(&["call_id"], &[("call_id", Uuid), ("reason", Str)], true),
        "TOOL_LIST" => s(&["tools"], &[("tools", Tools)], true),
        "TOOL_SCHEMA" => s(&["tool", "schema"], &[("tool", Str), ("schema", Obj)], true),
        "FLOW_UPDATE" => s(
            &["channel"],
            &[
                ("channel", Str),
                ("add_messages", Int(1, u64::MAX as i128)),
                ("add_bytes", Int(1, u64::MAX as i128)),
            ],
            true,
        ),
        "PAUSE_CHANNEL" | "RESUME_CHANNEL" => s(&["channel"], &[("channel", Str)], true),
        _ => None,
    }
}

/// `^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[1-5][0-9A-Fa-f]{3}-[89ABab][0-9A-Fa-f]{3}-[0-9A-Fa-f]{12}$`
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            14 => (b'1'..=b'5').contains(c),
            19 => b"89abAB".contains(c),
            _ => c.is_ascii_hexdigit(),
        })
}

/// `^[0-9]{1,20}$` that also fits a u64.
pub fn parse_u64str(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn is_channel(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// A JSON Schema "integer": any number with no fractional part.
fn as_int(v: &Value) -> Option<i128> {
    if let Some(i) = v.as_i64() {
        return Some(i as i128);
    }
    if let Some(u) = v.as_u64() {
        return Some(u as i128);
    }
    v.as_f64()
        .filter(|f| f.is_finite() && f.fract() == 0.0)
        .map(|f| f as i128)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

fn kind_error(v: &Value, kind: Kind) -> Option<String> {
    let bad = |what: &str| Some(format!("expected {what}, got {}", short(v)));
    match kind {
        Kind::Any => None,
        Kind::Str => (!v.is_string()).then(|| bad("a string")).flatten(),
        Kind::MaxLen(n) => match v.as_str() {
            Some(s) if s.chars().count() <= n => None,
            Some(_) => Some(format!("longer than {n} characters")),
            None => bad("a string"),
        },
        Kind::Uuid => match v.as_str() {
            Some(s) if is_uuid(s) => None,
            _ => bad("a UUID (version 1-5)"),
        },
        Kind::U64 => match v.as_str() {
            Some(s) if parse_u64str(s).is_some() => None,
            _ => bad("a decimal uint64 string"),
        },
        Kind::Channel => match v.as_str() {
            Some(s) if is_channel(s) => None,
            _ => bad("a channel name ([A-Za-z0-9_-]{1,128})"),
        },
        Kind::Event => match v.as_str() {
            Some(s) if EVENT_TYPES.contains(&s) => None,
            _ => bad("a HAIP 1.1.2 event type"),
        },
        Kind::Int(lo, hi) => match as_int(v) {
            Some(i) if (lo..=hi).contains(&i) => None,
            _ => bad(&format!("an integer in {lo}..={hi}")),
        },
        Kind::Num(lo, hi) => match v.as_f64() {
            Some(f) if (lo..=hi).contains(&f) => None,
            _ => bad(&format!("a number in {lo}..={hi}")),
        },
        Kind::Bool => (!v.is_boolean()).then(|| bad("a boolean")).flatten(),
        Kind::Obj => (!v.is_object()).then(|| bad("an object")).flatten(),
        Kind::OneOf(set) => match v.as_str() {
            Some(s) if set.contains(&s) => None,
            _ => bad(&format!("one of {set:?}")),
        },
        Kind::Ints => match v.as_array() {
            Some(a) if a.iter().all(|x| as_int(x).is_some()) => None,
            _ => bad("an array of integers"),
        },
        Kind::Events => match v.as_array() {
            Some(a) => a
                .iter()
                .find(|x| kind_error(x, Kind::Event).is_some())
                .map(|x| format!("unknown event type {}", short(x))),
            None => bad("an array of event types"),
        },
        Kind::Base64 => match v.as_str() {
            Some(s) => BASE64
                .decode(s)
                .err()
                .map(|e| format!("not valid base64 (RFC 4648, padded): {e}")),
            None => bad("a base64 string"),
        },
        Kind::Tools => {
            let tool_ok = |t: &Value| {
                t.as_object().is_some_and(|o| {
                    let mut errs = Vec::new();
                    check_shape(o, &TOOL_ENTRY, "", &mut errs);
                    errs.is_empty()
                })
            };
            match v.as_array() {
                Some(a) if a.iter().all(tool_ok) => None,
                _ => bad("an array of {name, description}"),
            }
        }
    }
}

const TOOL_ENTRY: Shape = Shape {
    required: &["name"],
    props: &[("name", Kind::Str), ("description", Kind::Str)],
    closed: true,
};

/// Checks `obj` against `shape`; appends messages to `errs`; returns the number of unknown fields.
fn check_shape(
    obj: &Map<String, Value>,
    shape: &Shape,
    what: &str,
    errs: &mut Vec<String>,
) -> usize {
    for r in shape.required {
        if !obj.contains_key(*r) {
            errs.push(format!("{what}: missing required field `{r}`"));
        }
    }
    let mut unknown = 0;
    for (k, v) in obj {
        match shape.props.iter().find(|(name, _)| name == k) {
            Some((_, kind)) => {
                if let Some(e) = kind_error(v, *kind) {
                    errs.push(format!("{what}.{k}: {e}"));
                }
            }
            None if shape.closed => {
                unknown += 1;
                errs.push(format!("{what}: unknown field `{k}`"));
            }
            None => {}
        }
    }
    unknown
}

/// The prose rules on `HAI.capabilities` (the schema leaves the object open).
fn check_capabilities(caps: &Map<String, Value>, errs: &mut Vec<String>) {
    let checks: [(&str, Kind); 3] = [
        ("binary_frames", Kind::Bool),
        ("max_concurrent_runs", Kind::Int(1, i64::MAX as i128)),
        ("signed_envelopes", Kind::Bool),
    ];
    for (k, kind) in checks {
        if let Some(e) = caps.get(k).and_then(|v| kind_error(v, kind)) {
            errs.push(format!("HAI.capabilities.{k}: {e}"));
        }
    }
    match caps.get("flow_control") {
        None => {}
        Some(Value::Object(fc)) => {
            for k in ["initial_credit_messages", "initial_credit_bytes"] {
                if let Some(e) = fc
                    .get(k)
                    .and_then(|v| kind_error(v, Kind::Int(1, u64::MAX as i128)))
                {
                    errs.push(format!("HAI.capabilities.flow_control.{k}: {e}"));
                }
            }
        }
        Some(v) => errs.push(format!(
            "HAI.capabilities.flow_control: expected an object, got {}",
            short(v)
        )),
    }
}

// ---------------------------------------------------------------------------------------------------
// One connection (sans-IO)
// ---------------------------------------------------------------------------------------------------

/// What the client said in its `HAI`.
struct PeerHai {
    accept: HashSet<String>,
    binary_frames: bool,
    /// Credit the client grants us per channel; `None`: unlimited.
    credit_messages: Option<u64>,
    credit_bytes: Option<u64>,
}

/// Credit we granted the client on one channel.
struct Grant {
    messages_left: u64,
    bytes_left: u64,
}

/// What we used of the client's grant on one channel, and what it added since.
#[derive(Default)]
struct OutUse {
    used_messages: u64,
    used_bytes: u64,
    added_messages: u64,
    added_bytes: u64,
}

#[derive(Clone, Default)]
struct FrameCtx {
    ty: Option<String>,
    seq: Option<String>,
    /// The frame's `id` when it is a valid UUID (for `related_id`).
    id: Option<String>,
}

impl FrameCtx {
    fn of(env: &Map<String, Value>) -> Self {
        let s = |k: &str| env.get(k).and_then(Value::as_str).map(str::to_string);
        FrameCtx {
            ty: s("type"),
            seq: s("seq"),
            id: s("id").filter(|i| is_uuid(i)),
        }
    }
}

struct AudioMeta {
    message_id: String,
    mime: String,
    duration_ms: Option<u64>,
}

/// A `bin_len` envelope is waiting for its binary frame.
struct PendingBin {
    len: u64,
    ctx: FrameCtx,
    /// The chunk it carries, when the envelope was valid.
    audio: Option<AudioMeta>,
}

struct UserAudio {
    bytes: Vec<u8>,
    mime: String,
    duration_ms: Option<u64>,
}

#[derive(Default)]
struct UserMsg {
    started: bool,
    text: String,
    audio: Vec<UserAudio>,
    audio_ms: u64,
    audio_bytes: usize,
    audio_chunks: u32,
    binary_chunks: u32,
}

/// A frame to send; envelope fields are filled in when it goes out.
struct OutFrame {
    channel: &'static str,
    ty: &'static str,
    payload: Map<String, Value>,
    run_id: Option<String>,
    /// AUDIO_CHUNK bytes: binary frame or `payload.data`, decided by the client's `binary_frames`.
    audio: Option<(Vec<u8>, String)>,
    /// Advances the run's pacing clock by this much once sent (audio, a tool's run time).
    duration_ms: u64,
    /// Waits for the pacing clock (audio chunks, the end of a tool call).
    paced: bool,
}

impl OutFrame {
    fn new(channel: &'static str, ty: &'static str, payload: Value) -> Self {
        OutFrame {
            channel,
            ty,
            payload: match payload {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            run_id: None,
            audio: None,
            duration_ms: 0,
            paced: false,
        }
    }

    fn audio_bytes(&self) -> u64 {
        self.audio.as_ref().map_or(0, |(b, _)| b.len() as u64)
    }
}

struct Run {
    id: String,
    steps: VecDeque<OutFrame>,
    started: bool,
    cancelled: bool,
}

/// Frames kept for replay, as sent.
struct Sent {
    seq: u64,
    messages: Vec<Message>,
}

/// What to put on the socket now.
struct Transmit {
    messages: Vec<Message>,
    drop_connection: bool,
}

struct Conn {
    id: u64,
    s: Arc<AgentSettings>,
    log: AgentLog,
    session: String,
    // Inbound.
    hai: Option<PeerHai>,
    last_in_seq: u64,
    peer_ack: u64,
    seen_ids: HashSet<String>,
    seen_order: VecDeque<String>,
    pending_bin: Option<PendingBin>,
    grants: HashMap<String, Grant>,
    msgs: HashMap<String, UserMsg>,
    ended: VecDeque<String>,
    // Outbound.
    next_seq: u64,
    out_use: HashMap<String, OutUse>,
    paused: HashSet<String>,
    replays: VecDeque<Message>,
    control: VecDeque<OutFrame>,
    runs: VecDeque<Run>,
    done_runs: HashSet<String>,
    audio_clock: Instant,
    window: VecDeque<Sent>,
    envelopes_sent: u64,
    skip_done: bool,
    /// User turns completed on this connection.
    turns_here: u64,
    /// The frame withheld by `inject.skip_seq_once`, until the client asks for it.
    lost_seq: Option<u64>,
    holding: bool,
    ping_nonce: u64,
    close: Option<(CloseCode, String)>,
}

impl Conn {
    fn new(id: u64, s: Arc<AgentSettings>, log: AgentLog, now: Instant) -> Self {
        let mut c = Conn {
            id,
            s,
            log,
            session: uuid::Uuid::new_v4().to_string(),
            hai: None,
            last_in_seq: 0,
            peer_ack: 0,
            seen_ids: HashSet::new(),
            seen_order: VecDeque::new(),
            pending_bin: None,
            grants: HashMap::new(),
            msgs: HashMap::new(),
            ended: VecDeque::new(),
            next_seq: 1,
            out_use: HashMap::new(),
            paused: HashSet::new(),
            replays: VecDeque::new(),
            control: VecDeque::new(),
            runs: VecDeque::new(),
            done_runs: HashSet::new(),
            audio_clock: now,
            window: VecDeque::new(),
            envelopes_sent: 0,
            skip_done: false,
            turns_here: 0,
            lost_seq: None,
            holding: false,
            ping_nonce: 0,
            close: None,
        };
        // Our HAI goes first, before anything is read (as both reference servers do).
        let hai = json!({
            "haip_version": HAIP_VERSION,
            "accept_major": [1],
            "accept_events": EVENT_TYPES,
            "capabilities": {
                "binary_frames": c.s.binary_frames,
                "max_concurrent_runs": 1,
                "flow_control": {
                    "initial_credit_messages": c.initial_messages(),
                    "initial_credit_bytes": c.initial_bytes(),
                }
            }
        });
        c.control.push_back(OutFrame::new("SYSTEM", "HAI", hai));
        c
    }

    fn initial_messages(&self) -> u64 {
        self.s.initial_credit_messages.max(1)
    }

    fn initial_bytes(&self) -> u64 {
        self.s.initial_credit_bytes.max(1)
    }

    // --- recording -------------------------------------------------------------------------------

    fn violation(&mut self, code: &str, message: String, ctx: &FrameCtx) {
        tracing::warn!(conn = self.id, code, ty = ?ctx.ty, seq = ?ctx.seq, "client violation: {message}");
        let v = Violation {
            connection: self.id,
            code: code.to_string(),
            message: message.clone(),
            frame_type: ctx.ty.clone(),
            frame_seq: ctx.seq.clone(),
        };
        self.log.update(|s| s.violations.push(v));
        self.send_error(code, &message, ctx);
    }

    fn send_error(&mut self, code: &str, message: &str, ctx: &FrameCtx) {
        let mut p = json!({ "code": code, "message": message });
        if let Some(id) = &ctx.id {
            p["related_id"] = json!(id);
        }
        self.control.push_back(OutFrame::new("SYSTEM", "ERROR", p));
    }

    fn fatal(&mut self, reason: &str) {
        if self.close.is_none() {
            self.close = Some((CloseCode::Protocol, reason.to_string()));
        }
    }

    // --- inbound ---------------------------------------------------------------------------------

    fn on_binary(&mut self, data: &Bytes) {
        if self.close.is_some() {
            return;
        }
        match self.pending_bin.take() {
            None => self.violation(
                PROTOCOL_VIOLATION,
                format!(
                    "binary frame of {} bytes without a bin_len envelope right before it",
                    data.len()
                ),
                &FrameCtx::default(),
            ),
            Some(p) if p.len != data.len() as u64 => self.violation(
                PROTOCOL_VIOLATION,
                format!(
                    "binary frame is {} bytes, its envelope's bin_len is {}",
                    data.len(),
                    p.len
                ),
                &p.ctx,
            ),
            Some(p) => {
                if let Some(a) = p.audio {
                    self.add_audio(a, data.to_vec(), true);
                }
            }
        }
    }

    fn on_text(&mut self, text: &str) {
        if self.close.is_some() {
            return;
        }
        self.log.update(|s| s.frames_received += 1);
        tracing::trace!(conn = self.id, "<- {text}");
        if let Some(p) = self.pending_bin.take() {
            self.violation(
                PROTOCOL_VIOLATION,
                format!(
                    "expected the binary frame of {} bytes announced by bin_len, got a text frame",
                    p.len
                ),
                &p.ctx,
            );
        }
        let env = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(env)) => env,
            Ok(other) => {
                let msg = format!("frame is not a JSON object: {}", short(&other));
                return self.reject_unparsed(msg);
            }
            Err(e) => return self.reject_unparsed(format!("frame is not JSON: {e}")),
        };
        let ctx = FrameCtx::of(&env);
        let bin_len = env.get("bin_len").and_then(as_int).filter(|n| *n >= 0);
        if let Some(n) = bin_len {
            // Consume the binary frame that follows whatever becomes of this envelope.
            self.pending_bin = Some(PendingBin {
                len: n as u64,
                ctx: ctx.clone(),
                audio: None,
            });
        }
        let mut errs = Vec::new();
        let unknown = check_shape(&env, &ENVELOPE, "envelope", &mut errs);
        let ty = env.get("type").and_then(Value::as_str).unwrap_or_default();
        let known_type = EVENT_TYPES.contains(&ty);

        // Sequence: from 1, +1 per message. A repeat is dropped; a jump is reported and resynced to,
        // so one mistake gives one violation.
        if let Some(seq) = env
            .get("seq")
            .and_then(Value::as_str)
            .and_then(parse_u64str)
        {
            let expected = self.last_in_seq + 1;
            if seq < expected {
                let msg = format!("seq {seq} was already received (expected {expected})");
                return self.violation(SEQ_VIOLATION, msg, &ctx);
            }
            if seq > expected {
                let msg = format!("seq {seq} skips ahead (expected {expected})");
                self.violation(SEQ_VIOLATION, msg, &ctx);
            }
            self.last_in_seq = seq;
        }
        if let Some(id) = &ctx.id {
            if self.seen_ids.contains(id) {
                let msg = format!("duplicate id {id}");
                return self.violation(PROTOCOL_VIOLATION, msg, &ctx);
            }
            self.seen_ids.insert(id.clone());
            self.seen_order.push_back(id.clone());
            if self.seen_order.len() > SEEN_IDS
                && let Some(old) = self.seen_order.pop_front()
            {
                self.seen_ids.remove(&old);
            }
        }

        // Handshake: the client's first frame is its HAI (on SYSTEM); it may carry its own session
        // because it cannot have seen ours yet. Everything after it carries ours.
        let first_hai = self.hai.is_none();
        if first_hai && ty != "HAI" {
            let msg = format!("the first frame must be HAI, got {}", short(&json!(ty)));
            self.violation(PROTOCOL_VIOLATION, msg, &ctx);
            return self.fatal("HAI expected first");
        }
        let second_hai = !first_hai && ty == "HAI";
        if second_hai {
            errs.push("HAI was already received on this connection".to_string());
        }
        if !first_hai
            && let Some(session) = env.get("session").and_then(Value::as_str)
            && session != self.session
        {
            errs.push(format!(
                "session {session} is not the session this agent issued ({})",
                self.session
            ));
        }
        if ty == "HAI" && env.get("channel").and_then(Value::as_str) != Some("SYSTEM") {
            errs.push("HAI must be sent on channel SYSTEM".to_string());
        }
        if let Some(ack) = env
            .get("ack")
            .and_then(Value::as_str)
            .and_then(parse_u64str)
        {
            self.check_ack(ack, &ctx);
        }

        // Flow control: one message per frame, audio bytes as bin_len or decoded length.
        let payload = env.get("payload").and_then(Value::as_object);
        let data_len = payload
            .and_then(|p| p.get("data"))
            .and_then(Value::as_str)
            .and_then(|d| BASE64.decode(d).ok())
            .map_or(0, |d| d.len() as u64);
        let bytes = bin_len.map_or(data_len, |n| n as u64);
        if let Some(channel) = env
            .get("channel")
            .and_then(Value::as_str)
            .filter(|c| is_channel(c))
            && !self.charge_inbound(channel, bytes)
        {
            let msg = format!("no credit left on channel {channel}");
            return self.violation("FLOW_CONTROL_VIOLATION", msg, &ctx);
        }

        if let (true, Some(p)) = (known_type, payload)
            && let Some(shape) = payload_shape(ty)
        {
            check_shape(p, &shape, ty, &mut errs);
            self.check_rules(ty, &env, p, &mut errs);
        }
        if !errs.is_empty() {
            let crit = env.get("crit").and_then(Value::as_bool) == Some(true);
            let code = if !known_type || (crit && unknown > 0) {
                "UNSUPPORTED_TYPE"
            } else {
                PROTOCOL_VIOLATION
            };
            self.violation(code, errs.join("; "), &ctx);
            if first_hai {
                self.fatal("invalid HAI");
            }
            return;
        }
        if let Some(p) = payload {
            self.dispatch(ty, &env, p, &ctx);
        }
    }

    /// A frame that is not a JSON object: reported; before the handshake it ends the connection.
    fn reject_unparsed(&mut self, msg: String) {
        self.violation(PROTOCOL_VIOLATION, msg, &FrameCtx::default());
        if self.hai.is_none() {
            self.fatal("HAI expected first");
        }
    }

    fn check_ack(&mut self, ack: u64, ctx: &FrameCtx) {
        let last_sent = self.next_seq - 1;
        let msg = if ack > last_sent {
            Some(format!(
                "ack {ack} is beyond the last seq this agent sent ({last_sent})"
            ))
        } else if ack < self.peer_ack {
            Some(format!("ack went back from {} to {ack}", self.peer_ack))
        } else {
            self.lost_seq.filter(|l| ack >= *l).map(|lost| {
                format!(
                    "ack {ack} covers seq {lost}, which was never delivered (the gap was not replayed)"
                )
            })
        };
        self.peer_ack = self.peer_ack.max(ack);
        if let Some(msg) = msg {
            self.violation(SEQ_VIOLATION, msg, ctx);
        }
    }

    /// Rules beyond the per-type payload schema.
    fn check_rules(
        &self,
        ty: &str,
        env: &Map<String, Value>,
        p: &Map<String, Value>,
        errs: &mut Vec<String>,
    ) {
        let has_len = env.contains_key("bin_len");
        if has_len != env.contains_key("bin_mime") {
            errs.push("bin_len and bin_mime must appear together".to_string());
        }
        if has_len && !self.s.binary_frames {
            errs.push(
                "binary mode used, but this agent's HAI did not advertise binary_frames"
                    .to_string(),
            );
        }
        match ty {
            "HAI" => {
                if let Some(Value::Object(caps)) = p.get("capabilities") {
                    check_capabilities(caps, errs);
                }
            }
            "AUDIO_CHUNK" => {
                if has_len && p.contains_key("data") {
                    errs.push("binary mode: the payload must not contain data".to_string());
                }
                if !has_len && !p.contains_key("data") {
                    errs.push(
                        "AUDIO_CHUNK carries neither payload.data nor a binary frame".to_string(),
                    );
                }
                let channel = env
                    .get("channel")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if !matches!(channel, "AUDIO_IN" | "USER") {
                    errs.push(format!("client audio belongs on AUDIO_IN, not {channel}"));
                }
            }
            "RUN_CANCEL" => {
                if let (Some(e), Some(pl)) = (env.get("run_id"), p.get("run_id"))
                    && e != pl
                {
                    errs.push(format!(
                        "envelope run_id {} differs from payload run_id {}",
                        short(e),
                        short(pl)
                    ));
                }
            }
            _ => {}
        }
    }

    /// Charges one message (and `bytes`) of the client's credit on `channel`; false when exceeded.
    /// Replenishes once half of the initial grant is used.
    fn charge_inbound(&mut self, channel: &str, bytes: u64) -> bool {
        let (init_m, init_b) = (self.initial_messages(), self.initial_bytes());
        let g = self.grants.entry(channel.to_string()).or_insert(Grant {
            messages_left: init_m,
            bytes_left: init_b,
        });
        if g.messages_left == 0 || g.bytes_left < bytes {
            return false;
        }
        g.messages_left -= 1;
        g.bytes_left -= bytes;
        if !self.s.replenish {
            return true;
        }
        let add_m = if g.messages_left <= init_m / 2 {
            init_m - g.messages_left
        } else {
            0
        };
        let add_b = if g.bytes_left <= init_b / 2 {
            init_b - g.bytes_left
        } else {
            0
        };
        if add_m == 0 && add_b == 0 {
            return true;
        }
        g.messages_left += add_m;
        g.bytes_left += add_b;
        let mut p = json!({ "channel": channel });
        if add_m > 0 {
            p["add_messages"] = json!(add_m);
        }
        if add_b > 0 {
            p["add_bytes"] = json!(add_b);
        }
        self.log.update(|s| {
            s.flow_updates_sent += 1;
            s.credit_granted_messages += add_m;
            s.credit_granted_bytes += add_b;
        });
        self.control
            .push_back(OutFrame::new("SYSTEM", "FLOW_UPDATE", p));
        true
    }

    fn dispatch(
        &mut self,
        ty: &str,
        env: &Map<String, Value>,
        p: &Map<String, Value>,
        ctx: &FrameCtx,
    ) {
        let str_of = |k: &str| {
            p.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        match ty {
            "HAI" => self.on_hai(p, ctx),
            "PING" => {
                let mut reply = json!({});
                if let Some(n) = p.get("nonce") {
                    reply["nonce"] = n.clone();
                }
                self.log.update(|s| s.pings_answered += 1);
                self.control
                    .push_back(OutFrame::new("SYSTEM", "PONG", reply));
            }
            "PONG" => self.log.update(|s| s.pongs_received += 1),
            "TEXT_MESSAGE_START" => {
                let id = str_of("message_id");
                if self.ended.contains(&id) {
                    let msg = format!("TEXT_MESSAGE_START for message {id}, which already ended");
                    return self.violation(PROTOCOL_VIOLATION, msg, ctx);
                }
                let m = self.msgs.entry(id.clone()).or_default();
                if m.started {
                    let msg = format!("second TEXT_MESSAGE_START for message {id}");
                    return self.violation(PROTOCOL_VIOLATION, msg, ctx);
                }
                m.started = true;
                m.text.insert_str(0, &str_of("text"));
            }
            "TEXT_MESSAGE_PART" => {
                let id = str_of("message_id");
                match self.msgs.get_mut(&id) {
                    Some(m) if m.started => m.text.push_str(&str_of("text")),
                    _ => {
                        let msg =
                            format!("TEXT_MESSAGE_PART for message {id}, which was not started");
                        self.violation(PROTOCOL_VIOLATION, msg, ctx);
                    }
                }
            }
            "TEXT_MESSAGE_END" => {
                let id = str_of("message_id");
                match self.msgs.remove(&id) {
                    Some(m) if m.started => {
                        self.ended.push_back(id.clone());
                        if self.ended.len() > ENDED_IDS {
                            self.ended.pop_front();
                        }
                        self.start_turn(id, m);
                    }
                    other => {
                        if let Some(m) = other {
                            self.msgs.insert(id.clone(), m);
                        }
                        let msg =
                            format!("TEXT_MESSAGE_END for message {id}, which was not started");
                        self.violation(PROTOCOL_VIOLATION, msg, ctx);
                    }
                }
            }
            "AUDIO_CHUNK" => {
                let meta = AudioMeta {
                    message_id: str_of("message_id"),
                    mime: str_of("mime"),
                    duration_ms: p
                        .get("duration_ms")
                        .and_then(Value::as_str)
                        .and_then(parse_u64str),
                };
                if self.ended.contains(&meta.message_id) {
                    let msg = format!(
                        "AUDIO_CHUNK for message {}, which already ended",
                        meta.message_id
                    );
                    return self.violation(PROTOCOL_VIOLATION, msg, ctx);
                }
                if env.contains_key("bin_len") {
                    if let Some(pending) = self.pending_bin.as_mut() {
                        pending.audio = Some(meta);
                    }
                } else {
                    let data = p.get("data").and_then(Value::as_str).unwrap_or_default();
                    // Validated above, so this decodes.
                    let bytes = BASE64.decode(data).unwrap_or_default();
                    self.add_audio(meta, bytes, false);
                }
            }
            "RUN_CANCEL" => self.on_cancel(&str_of("run_id"), ctx),
            "REPLAY_REQUEST" => self.on_replay(p, ctx),
            "FLOW_UPDATE" => {
                let u = self.out_use.entry(str_of("channel")).or_default();
                let add = |k: &str| p.get(k).and_then(as_int).map_or(0, |n| n as u64);
                u.added_messages = u.added_messages.saturating_add(add("add_messages"));
                u.added_bytes = u.added_bytes.saturating_add(add("add_bytes"));
            }
            "PAUSE_CHANNEL" => {
                self.paused.insert(str_of("channel"));
            }
            "RESUME_CHANNEL" => {
                self.paused.remove(&str_of("channel"));
            }
            "ERROR" | "RUN_ERROR" => {
                let e = format!("{}: {}", str_of("code"), str_of("message"));
                tracing::info!(conn = self.id, "client sent {ty} {e}");
                self.log.update(|s| s.client_errors.push(e));
            }
            "TOOL_CALL" => {
                self.send_error("UNSUPPORTED_TYPE", "this agent has no tools", ctx);
            }
            // RUN_STARTED/RUN_FINISHED/TOOL_* from a client are legal and mean nothing to this agent.
            _ => tracing::debug!(conn = self.id, "ignoring {ty}"),
        }
    }

    fn on_hai(&mut self, p: &Map<String, Value>, ctx: &FrameCtx) {
        let caps = p.get("capabilities").and_then(Value::as_object);
        let fc = caps
            .and_then(|c| c.get("flow_control"))
            .and_then(Value::as_object);
        let credit = |k: &str| fc.and_then(|f| f.get(k)).and_then(as_int).map(|n| n as u64);
        let accept: HashSet<String> = p
            .get("accept_events")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let binary = caps
            .and_then(|c| c.get("binary_frames"))
            .or_else(|| p.get("binary_frames"))
            .and_then(Value::as_bool)
            == Some(true);
        self.hai = Some(PeerHai {
            accept,
            binary_frames: binary,
            credit_messages: credit("initial_credit_messages"),
            credit_bytes: credit("initial_credit_bytes"),
        });
        let majors = p.get("accept_major").and_then(Value::as_array);
        if !majors.is_some_and(|m| m.iter().any(|v| as_int(v) == Some(1))) {
            let msg = format!(
                "no common MAJOR version: this agent speaks 1, the client accepts {}",
                p.get("accept_major").map(short).unwrap_or_default()
            );
            self.violation("VERSION_INCOMPATIBLE", msg, ctx);
            return self.fatal("VERSION_INCOMPATIBLE");
        }
        self.log.update(|s| s.handshakes += 1);
        tracing::info!(conn = self.id, binary, "handshake complete");
        // Resumption is not offered: every connection is a new session.
        if let Some(last) = p.get("last_rx_seq").and_then(Value::as_str)
            && last != "0"
        {
            self.send_error("RESUME_FAILED", "this agent does not resume sessions", ctx);
        }
    }

    fn add_audio(&mut self, a: AudioMeta, bytes: Vec<u8>, binary: bool) {
        let m = self.msgs.entry(a.message_id).or_default();
        m.audio_chunks += 1;
        m.binary_chunks += u32::from(binary);
        m.audio_ms += a.duration_ms.unwrap_or(0);
        if m.audio_bytes + bytes.len() <= MAX_ECHO_BYTES {
            m.audio_bytes += bytes.len();
            m.audio.push(UserAudio {
                bytes,
                mime: a.mime,
                duration_ms: a.duration_ms,
            });
        }
    }

    fn on_cancel(&mut self, run_id: &str, ctx: &FrameCtx) {
        self.log.update(|s| s.cancels_received += 1);
        let ignore = self.s.inject.ignore_cancel;
        match self.runs.front_mut() {
            Some(run) if run.id == run_id && run.started && !run.cancelled => {
                if ignore {
                    tracing::info!(conn = self.id, run_id, "inject: ignoring RUN_CANCEL");
                    self.log.update(|s| s.cancels_ignored += 1);
                    return;
                }
                tracing::info!(conn = self.id, run_id, "run cancelled");
                run.cancelled = true;
                run.steps.clear();
                let mut fin =
                    OutFrame::new("AGENT", "RUN_FINISHED", json!({"status": "CANCELLED"}));
                fin.run_id = Some(run.id.clone());
                run.steps.push_back(fin);
            }
            Some(run) if run.id == run_id => {
                self.log.update(|s| s.cancels_ignored += 1);
            }
            _ if self.done_runs.contains(run_id) => {
                // Crossed with our RUN_FINISHED: nothing left to stop.
                self.log.update(|s| s.cancels_ignored += 1);
            }
            _ => {
                let msg = format!("RUN_CANCEL for run {run_id}, which this agent never started");
                self.violation("RUN_NOT_FOUND", msg, ctx);
            }
        }
    }

    fn on_replay(&mut self, p: &Map<String, Value>, ctx: &FrameCtx) {
        let last_sent = self.next_seq - 1;
        let seq_of = |k: &str| p.get(k).and_then(Value::as_str).and_then(parse_u64str);
        let from = seq_of("from_seq").unwrap_or(0);
        let to = seq_of("to_seq").unwrap_or(last_sent);
        if from > to {
            let msg = format!("REPLAY_REQUEST from_seq {from} is after to_seq {to}");
            return self.violation(PROTOCOL_VIOLATION, msg, ctx);
        }
        if to > last_sent {
            let msg =
                format!("REPLAY_REQUEST to_seq {to} is beyond the last seq sent ({last_sent})");
            self.violation(PROTOCOL_VIOLATION, msg, ctx);
        }
        let oldest = self.window.front().map_or(self.next_seq, |s| s.seq);
        if from < oldest && oldest > 1 {
            let msg = format!("seq {from} is no longer kept (oldest kept: {oldest})");
            return self.send_error("REPLAY_TOO_OLD", &msg, ctx);
        }
        let mut n = 0;
        for sent in self.window.iter().filter(|s| (from..=to).contains(&s.seq)) {
            self.replays.extend(sent.messages.iter().cloned());
            n += 1;
        }
        if self.lost_seq.is_some_and(|l| (from..=to).contains(&l)) {
            self.lost_seq = None;
        }
        tracing::debug!(conn = self.id, from, to, frames = n, "replay");
        self.log.update(|s| {
            s.replay_requests_served += 1;
            s.frames_replayed += n;
        });
    }

    // --- the reply -------------------------------------------------------------------------------

    fn start_turn(&mut self, message_id: String, m: UserMsg) {
        let rec = TurnRecord {
            connection: self.id,
            message_id: message_id.clone(),
            audio_ms: m.audio_ms,
            audio_chunks: m.audio_chunks,
            binary_chunks: m.binary_chunks,
            audio_mime: m.audio.first().map(|a| a.mime.clone()),
            text: m.text.clone(),
        };
        tracing::info!(
            conn = self.id,
            message_id,
            audio_ms = m.audio_ms,
            chunks = m.audio_chunks,
            "user turn"
        );
        self.log.update(|s| {
            s.turns += 1;
            s.turn_records.push(rec);
        });

        let run_id = uuid::Uuid::new_v4().to_string();
        let reply_id = uuid::Uuid::new_v4().to_string();
        let text = if m.audio_chunks > 0 {
            format!(
                "I heard {:.1} seconds of audio.",
                m.audio_ms as f64 / 1000.0
            )
        } else {
            format!("You said: {}", m.text)
        };
        let mut steps = VecDeque::new();
        let runs = !self.s.inject.no_runs;
        if runs {
            steps.push_back(OutFrame::new(
                "AGENT",
                "RUN_STARTED",
                json!({"run_id": run_id}),
            ));
        }
        self.turns_here += 1;
        if let Some(tool) = self
            .s
            .tool_call
            .as_ref()
            .filter(|t| t.on_turn.is_none_or(|n| n == self.turns_here))
        {
            let call_id = uuid::Uuid::new_v4().to_string();
            let mut call = OutFrame::new(
                "AGENT",
                "TOOL_CALL",
                json!({"call_id": call_id, "tool": tool.name, "params": {}}),
            );
            call.duration_ms = u64::from(tool.ms);
            steps.push_back(call);
            let mut done = OutFrame::new(
                "AGENT",
                "TOOL_DONE",
                json!({"call_id": call_id, "status": "OK", "result": {"ok": true}}),
            );
            done.paced = true;
            steps.push_back(done);
        }
        if self.s.text_reply_parts {
            steps.push_back(OutFrame::new(
                "AGENT",
                "TEXT_MESSAGE_START",
                json!({"message_id": reply_id, "author": "agent"}),
            ));
            for word in text.split_inclusive(' ') {
                steps.push_back(OutFrame::new(
                    "AGENT",
                    "TEXT_MESSAGE_PART",
                    json!({"message_id": reply_id, "text": word}),
                ));
            }
        } else {
            steps.push_back(OutFrame::new(
                "AGENT",
                "TEXT_MESSAGE_START",
                json!({"message_id": reply_id, "author": "agent", "text": text}),
            ));
        }
        steps.push_back(OutFrame::new(
            "AGENT",
            "TEXT_MESSAGE_END",
            json!({"message_id": reply_id}),
        ));
        let chunk_ms = u64::from(self.s.chunk_ms.max(1));
        let audio = m
            .audio
            .into_iter()
            .map(|a| (a.bytes, a.mime, a.duration_ms.unwrap_or(chunk_ms)))
            .chain(
                tone_chunks(self.s.reply_tone_ms, self.s.chunk_ms)
                    .into_iter()
                    .map(|(b, ms)| (b, TONE_MIME.to_string(), ms)),
            );
        for (bytes, mime, ms) in audio {
            let mut f = OutFrame::new(
                "AUDIO_OUT",
                "AUDIO_CHUNK",
                json!({"message_id": reply_id, "mime": mime, "duration_ms": ms.to_string()}),
            );
            f.audio = Some((bytes, mime));
            f.duration_ms = ms;
            f.paced = true;
            steps.push_back(f);
        }
        if runs {
            steps.push_back(OutFrame::new(
                "AGENT",
                "RUN_FINISHED",
                json!({"status": "OK"}),
            ));
            for f in &mut steps {
                f.run_id = Some(run_id.clone());
            }
        }
        self.runs.push_back(Run {
            id: run_id,
            steps,
            started: false,
            cancelled: false,
        });
    }

    fn queue_ping(&mut self) {
        if self.hai.is_some() && self.close.is_none() {
            self.ping_nonce += 1;
            let p = json!({"nonce": self.ping_nonce.to_string()});
            self.control.push_back(OutFrame::new("SYSTEM", "PING", p));
        }
    }

    // --- outbound --------------------------------------------------------------------------------

    fn accepts(&self, ty: &str) -> bool {
        ty == "HAI" || self.hai.as_ref().is_none_or(|h| h.accept.contains(ty))
    }

    /// Paused, or out of the credit the client granted us on `channel`.
    fn can_send(&self, channel: &str, bytes: u64) -> bool {
        if self.paused.contains(channel) {
            return false;
        }
        let Some(h) = &self.hai else {
            return true;
        };
        let zero = OutUse::default();
        let u = self.out_use.get(channel).unwrap_or(&zero);
        let msgs_ok = h
            .credit_messages
            .is_none_or(|m| m.saturating_add(u.added_messages) > u.used_messages);
        let bytes_ok = bytes == 0
            || h.credit_bytes
                .is_none_or(|b| b.saturating_add(u.added_bytes) >= u.used_bytes + bytes);
        msgs_ok && bytes_ok
    }

    fn hold(&mut self) {
        if !self.holding {
            self.holding = true;
            self.log.update(|s| s.outbound_holds += 1);
        }
    }

    /// The next thing to put on the socket, if anything may go now.
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(m) = self.replays.pop_front() {
            return Some(Transmit {
                messages: vec![m],
                drop_connection: false,
            });
        }
        while let Some(f) = self.control.front() {
            if !self.accepts(f.ty) {
                self.control.pop_front();
                self.log.update(|s| s.frames_suppressed += 1);
                continue;
            }
            if !self.can_send(f.channel, 0) {
                self.hold();
                break;
            }
            let f = self.control.pop_front()?;
            return Some(self.emit(f));
        }
        loop {
            let run = self.runs.front_mut()?;
            let Some(step) = run.steps.front() else {
                self.runs.pop_front();
                continue;
            };
            let (ty, channel, bytes, paced, advance_ms) = (
                step.ty,
                step.channel,
                step.audio_bytes(),
                step.paced,
                step.duration_ms,
            );
            if !self.accepts(ty) {
                if let Some(run) = self.runs.front_mut() {
                    run.steps.pop_front();
                }
                self.log.update(|s| s.frames_suppressed += 1);
                continue;
            }
            if paced && self.s.pace_realtime && now < self.audio_clock {
                return None;
            }
            if !self.can_send(channel, bytes) {
                self.hold();
                return None;
            }
            let run = self.runs.front_mut()?;
            let step = run.steps.pop_front()?;
            if step.ty == "RUN_STARTED" {
                run.started = true;
                self.audio_clock = now;
                tracing::info!(conn = self.id, run_id = %run.id, "run started");
                self.log.update(|s| s.runs_started += 1);
            }
            if step.ty == "RUN_FINISHED" {
                let cancelled = step.payload.get("status") == Some(&json!("CANCELLED"));
                self.done_runs.insert(run.id.clone());
                self.runs.pop_front();
                self.log.update(|s| {
                    if cancelled {
                        s.runs_cancelled += 1
                    } else {
                        s.runs_finished += 1
                    }
                });
            }
            if advance_ms > 0 {
                // Real-time pacing: next chunk when this one has played. After a stall (pause, no
                // credit) restart the clock instead of bursting the backlog.
                if now > self.audio_clock + PACE_SLACK {
                    self.audio_clock = now;
                }
                self.audio_clock += Duration::from_millis(advance_ms);
            }
            return Some(self.emit(step));
        }
    }

    /// When the run's next paced audio chunk is due (if it is not blocked on the client).
    fn next_deadline(&self) -> Option<Instant> {
        let step = self.runs.front()?.steps.front()?;
        (step.paced && self.s.pace_realtime && self.can_send(step.channel, step.audio_bytes()))
            .then_some(self.audio_clock)
    }

    /// Fills in the envelope, charges credit, keeps the frame for replay, applies injected faults.
    fn emit(&mut self, f: OutFrame) -> Transmit {
        self.holding = false;
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut env = Map::new();
        env.insert("id".into(), json!(uuid::Uuid::new_v4().to_string()));
        env.insert("session".into(), json!(self.session));
        env.insert("seq".into(), json!(seq.to_string()));
        if self.last_in_seq > 0 {
            env.insert("ack".into(), json!(self.last_in_seq.to_string()));
        }
        env.insert("ts".into(), json!(epoch_ms().to_string()));
        env.insert("channel".into(), json!(f.channel));
        env.insert("type".into(), json!(f.ty));
        if let Some(r) = &f.run_id {
            env.insert("run_id".into(), json!(r));
        }
        let mut payload = f.payload;
        let mut binary = None;
        let bytes = match f.audio {
            Some((data, mime)) => {
                let n = data.len() as u64;
                if self.hai.as_ref().is_some_and(|h| h.binary_frames) {
                    env.insert("bin_len".into(), json!(n));
                    env.insert("bin_mime".into(), json!(mime));
                    binary = Some(data);
                } else {
                    payload.insert("data".into(), json!(BASE64.encode(&data)));
                }
                n
            }
            None => 0,
        };
        env.insert("payload".into(), Value::Object(payload));
        let u = self.out_use.entry(f.channel.to_string()).or_default();
        u.used_messages += 1;
        u.used_bytes += bytes;

        let text = Value::Object(env).to_string();
        tracing::trace!(conn = self.id, "-> {text}");
        let mut messages = vec![Message::text(text)];
        if let Some(b) = binary {
            messages.push(Message::binary(b));
        }
        self.window.push_back(Sent {
            seq,
            messages: messages.clone(),
        });
        if self.window.len() > REPLAY_WINDOW_FRAMES {
            self.window.pop_front();
        }
        let audio = f.ty == "AUDIO_CHUNK";
        self.log.update(|s| {
            s.frames_sent += 1;
            s.audio_chunks_sent += u64::from(audio);
        });

        let inject = &self.s.inject;
        if inject.skip_seq_once == Some(seq) && !self.skip_done {
            tracing::info!(conn = self.id, seq, "inject: withholding frame");
            self.skip_done = true;
            self.lost_seq = Some(seq);
            return Transmit {
                messages: Vec::new(),
                drop_connection: false,
            };
        }
        self.envelopes_sent += 1;
        if inject
            .duplicate_every
            .is_some_and(|k| k > 0 && self.envelopes_sent.is_multiple_of(u64::from(k)))
        {
            messages.extend(messages.clone());
        }
        let drop_connection = inject
            .drop_after_frames
            .is_some_and(|n| self.envelopes_sent >= u64::from(n));
        Transmit {
            messages,
            drop_connection,
        }
    }
}

fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// `total_ms` of a 440 Hz tone, 16 kHz s16le mono, in `chunk_ms` pieces, with 5 ms fades (no clicks).
fn tone_chunks(total_ms: u32, chunk_ms: u32) -> Vec<(Vec<u8>, u64)> {
    let per_ms = (TONE_RATE_HZ / 1000) as usize;
    let total = total_ms as usize * per_ms;
    let fade = (5 * per_ms).min(total / 2).max(1);
    let samples: Vec<i16> = (0..total)
        .map(|i| {
            let env = (i.min(total - 1 - i) as f64 / fade as f64).min(1.0);
            let t = i as f64 / f64::from(TONE_RATE_HZ);
            (0.25 * env * (2.0 * std::f64::consts::PI * TONE_HZ * t).sin() * f64::from(i16::MAX))
                as i16
        })
        .collect();
    samples
        .chunks(chunk_ms.max(1) as usize * per_ms)
        .map(|c| {
            let bytes = c.iter().flat_map(|s| s.to_le_bytes()).collect();
            (bytes, (c.len() / per_ms) as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_pattern_follows_the_schema() {
        assert!(is_uuid(&uuid::Uuid::new_v4().to_string()));
        assert!(is_uuid("9fbf9672-7d40-43cc-9b52-65dccc1855ed"));
        // v7 fails the 1.1.2 pattern, as does a bad variant.
        assert!(!is_uuid("01890a5d-ac96-774b-bcce-b302099a8057"));
        assert!(!is_uuid("9fbf9672-7d40-43cc-7b52-65dccc1855ed"));
        assert!(!is_uuid("9fbf96727d4043cc9b5265dccc1855ed"));
    }

    #[test]
    fn uint64_strings() {
        assert_eq!(parse_u64str("1"), Some(1));
        assert_eq!(parse_u64str("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64str("18446744073709551616"), None);
        assert_eq!(parse_u64str(""), None);
        assert_eq!(parse_u64str("-1"), None);
        assert_eq!(parse_u64str("1795315057042yhbzj9u4b"), None);
    }

    #[test]
    fn shapes_reject_unknown_and_missing_fields() {
        let p =
            json!({"message_id": "x", "mime": "audio/opus", "data": "!!", "sample_rate": "16000"});
        let mut errs = Vec::new();
        let unknown = check_shape(
            p.as_object().expect("object"),
            &payload_shape("AUDIO_CHUNK").expect("shape"),
            "AUDIO_CHUNK",
            &mut errs,
        );
        assert_eq!(unknown, 1);
        assert_eq!(errs.len(), 3, "{errs:?}"); // bad uuid, bad base64, unknown field
        let mut errs = Vec::new();
        check_shape(&Map::new(), &ENVELOPE, "envelope", &mut errs);
        assert_eq!(errs.len(), 7);
    }

    #[test]
    fn tone_is_chunked_and_sized() {
        let chunks = tone_chunks(300, 20);
        assert_eq!(chunks.len(), 15);
        assert!(chunks.iter().all(|(b, ms)| b.len() == 640 && *ms == 20));
        assert_eq!(tone_chunks(0, 20).len(), 0);
        let odd = tone_chunks(50, 20);
        assert_eq!(odd.iter().map(|(_, ms)| ms).sum::<u64>(), 50);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb%zz%4"), "a.b%zz%4");
    }
}
