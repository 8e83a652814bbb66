//! H2A v0.2 "Candidate" (PDangelmaier/h2a-protocol, tolerant of v0.1 agents), host side, at the Basic
//! host level HB-1..HB-10. See `../shared/protocols/h2a.md`.
//!
//! H2A is HTTP, not a socket of frames: the host `POST`s `session.open` to `{base}/session` and reads
//! the agent's frames from that response's SSE body; everything else is a `POST` to `{base}/signal`
//! with `X-H2A-Session`. The codec stays sans-IO by addressing each outgoing [`Wire::Text`] with a small
//! JSON envelope that [`crate::transport::sse::H2aConnection`] turns into the request:
//!
//! ```json
//! {"post": "session", "body": {"type": "session.open", ...}}
//! {"post": "signal", "session": "ses_7f3a9b2c", "body": {"type": "user.signal", ...}}
//! ```
//!
//! `post` is the path under the endpoint base, `session` (signals only) becomes the `X-H2A-Session`
//! header, `body` is the JSON sent as is ([`H2aPost`]). A `session` post whose answer is an SSE stream
//! replaces the connection's stream. Incoming, each SSE event's `data` is one [`Wire::Text`].
//!
//! - `open` sends `session.open` (rendering `text`, `error`, `end`, `confirmation`, `progress`,
//!   `tool_card`; no session id proposed), or `session.resume` with the highest `sequence` seen when a
//!   session from an earlier connection is known ([`ResumeState`], shared across codecs). A refused
//!   resume (`STATE_SYNC_ERROR`, `SESSION_EXPIRED`, an ack for another id, or a resume that never got
//!   its ack) opens a new session.
//! - `session.ack` gives [`Downlink::Ready`]; transcripts sent before it wait for it. After a
//!   resumed ack, a re-sent transcript the session had already got as a `message` (its answer not
//!   begun at the drop, [`ResumePoint::sent_unanswered`]) is held for its answer on the resumed stream
//!   and sent again only if none begins within [`RESUME_REPLAY_WAIT_MS`]: never answered twice.
//! - Each [`Uplink::Text`] goes as a `message` (`content: {text}`); with a confirmation pending, the
//!   renderer's `[Confirmed] ..` / `[Denied] ..` answers go as `confirm` / `deny` instead; one left
//!   unanswered past its `timeout` is denied (`reason: "timeout"`).
//! - `text` frames (a string or `{text, format}`, markup stripped) are [`Downlink::TextDelta`]s until
//!   `final`; `end` (or a terminal `error`) finishes the response. `error` frames are
//!   [`Downlink::Error`]; `RATE_LIMITED` also holds signals back for `retryAfter` s.
//! - `tool_card` and `progress` are [`Downlink::Tool`]; `confirmation` is a [`Downlink::Render`] of a
//!   `confirm` component; presence is [`Downlink::Unknown`] with kind `presence:<state>`; every other
//!   frame type is spoken from its `fallbackText` (a [`Downlink::TextDelta`]/[`Downlink::TextDone`]
//!   pair).
//! - [`Uplink::Interrupt`] sends `interrupt {scope:"current"}` once per response and at most
//!   [`INTERRUPT_LIMIT_PER_MIN`] a minute; the interrupted response's late frames are dropped
//!   (counted in [`CodecStats::cancelled_run_frames_dropped`]) until its `end` or the next message.
//!   That message waits for the `end` at most [`INTERRUPT_END_WAIT_MS`].
//! - Limits per response (security addendum S3): [`MAX_FRAMES_PER_RESPONSE`], [`MAX_BYTES_PER_RESPONSE`],
//!   [`MAX_RESPONSE_MS`]; beyond them the response is closed locally, an `interrupt` goes out, a
//!   non-fatal [`Downlink::Error`] is emitted and the rest of the response is dropped.
//! - Frames with a `sequence` not above the highest seen are duplicates (a resume replay) and dropped.
//!
//! Context: the link task; sans-IO, never blocks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    CodecStats, Decoded, Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState,
    Uplink, Wire,
};

/// Security addendum S3: frames per response.
pub const MAX_FRAMES_PER_RESPONSE: u32 = 500;
/// Security addendum S3: bytes (SSE `data`) per response.
pub const MAX_BYTES_PER_RESPONSE: usize = 5 * 1024 * 1024;
/// Security addendum S3: how long one response may stream.
pub const MAX_RESPONSE_MS: u64 = 300_000;
/// The agent's default `interrupt` rate limit (S2.3): we never send more.
pub const INTERRUPT_LIMIT_PER_MIN: usize = 10;
/// After an interrupt, how long to wait for the response's `end` before treating it as over (the
/// Python reference sends none).
pub const INTERRUPT_END_WAIT_MS: u64 = 2_000;
/// A `session.resume` without its ack by now is treated as refused.
pub const RESUME_ACK_WAIT_MS: u64 = 5_000;
/// After a resumed ack, how long to wait for the answer to a message the session had already got
/// before asking again (digest ambiguity 4: neither reference replays).
pub const RESUME_REPLAY_WAIT_MS: u64 = 5_000;

/// Where the transport sends one outgoing body. Serialised as the envelope in the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct H2aPost {
    /// `"session"` or `"signal"`: the path under the endpoint base.
    pub post: String,
    /// The `X-H2A-Session` header (signals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub body: Value,
}

impl H2aPost {
    pub fn to_wire(&self) -> Wire {
        Wire::Text(serde_json::to_string(self).unwrap_or_default())
    }

    pub fn from_wire(w: &Wire) -> Option<H2aPost> {
        match w {
            Wire::Text(t) => serde_json::from_str(t).ok(),
            Wire::Binary(_) => None,
        }
    }
}

/// What a resume needs, kept across connections (the link makes a codec per connection: give each the
/// same handle).
#[derive(Debug, Clone, Default)]
pub struct ResumeState(Arc<Mutex<ResumePoint>>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// The session the agent acknowledged last.
    pub session: Option<String>,
    /// The highest `sequence` received in it.
    pub last_sequence: u64,
    /// A resume was sent and has not been acknowledged (a second attempt opens a new session).
    pub resume_pending: bool,
    /// The id of the response that was streaming when the connection dropped: a resumed session
    /// continues it under the same id, so the device goes on speaking it instead of starting over.
    pub open_response: Option<String>,
    /// Messages the session got whose answer has not begun, oldest first. The link re-sends them
    /// after a drop; a resumed session answers them itself, so they are held, not sent twice.
    pub sent_unanswered: Vec<String>,
    /// The response streaming at the drop had been cancelled (a barge-in, a limit) and had not
    /// ended: what a resumed session replays of it is dropped too, until its `end`.
    pub cancelled_open: bool,
}

impl ResumeState {
    pub fn get(&self) -> ResumePoint {
        self.0.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut ResumePoint)) {
        if let Ok(mut p) = self.0.lock() {
            f(&mut p);
        }
    }
}

#[derive(Debug, Clone)]
pub struct H2aSettings {
    /// `session.open` `locale` (`^[a-z]{2}(-[A-Z]{2})?$`).
    pub locale: String,
    /// Try `session.resume` after a drop.
    pub resume: bool,
    pub resume_state: ResumeState,
}

impl Default for H2aSettings {
    fn default() -> Self {
        H2aSettings {
            locale: "en-US".into(),
            resume: true,
            resume_state: ResumeState::default(),
        }
    }
}

/// The frame types a voice host renders (text and the ones it speaks or sounds).
pub const RENDERING: &[&str] = &[
    "text",
    "error",
    "end",
    "confirmation",
    "progress",
    "tool_card",
];

#[derive(Debug, Default)]
struct Response {
    id: String,
    started_ms: u64,
    frames: u32,
    bytes: usize,
    /// Text message id of the open text, if any.
    text_open: bool,
    messages: u32,
    /// Interrupted (or over a limit): its frames are dropped until `end`.
    cancelled: bool,
    /// Until then, the next message waits for the cancelled response's `end`. Past it (`None` again)
    /// the response lingers: its frames are still dropped until an `end`, but the next message goes
    /// at once and ends it.
    cancel_deadline: Option<u64>,
    /// Tool calls in flight: (key, call id, name).
    tools: Vec<(String, String, String)>,
    /// Inside an HTML tag across deltas.
    in_tag: bool,
}

#[derive(Debug, Clone)]
struct Confirm {
    frame_id: String,
    confirm_choice: String,
    /// `content.timeout`: unanswered by then, it is denied (TV-4).
    deadline_ms: Option<u64>,
}

/// An H2A Basic-level host codec.
#[derive(Debug)]
pub struct H2aClient {
    settings: H2aSettings,
    session: Option<String>,
    /// `session.resume` sent on this connection, ack not yet in.
    resuming: Option<u64>,
    queue: VecDeque<Uplink>,
    response: Option<Response>,
    responses: u64,
    id_prefix: String,
    confirm: Option<Confirm>,
    /// Signals are held until then (RATE_LIMITED `retryAfter`).
    blocked_until_ms: u64,
    interrupts_ms: VecDeque<u64>,
    last_sequence: u64,
    /// After a resumed ack: re-sent messages the session already has, waiting for their answer on
    /// the resumed stream until `held_until`, then asked again.
    held: VecDeque<String>,
    held_until: Option<u64>,
    events: Vec<Downlink>,
    stats: CodecStats,
}

impl H2aClient {
    pub fn new(settings: H2aSettings) -> Self {
        H2aClient {
            settings,
            session: None,
            resuming: None,
            queue: VecDeque::new(),
            response: None,
            responses: 0,
            id_prefix: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            confirm: None,
            blocked_until_ms: 0,
            interrupts_ms: VecDeque::new(),
            last_sequence: 0,
            held: VecDeque::new(),
            held_until: None,
            events: Vec::new(),
            stats: CodecStats::default(),
        }
    }

    /// The session id the agent acknowledged on this connection.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// The highest `sequence` received.
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// A response is streaming (or awaited after a message).
    pub fn in_response(&self) -> bool {
        self.response.as_ref().is_some_and(|r| !Self::lingering(r))
    }

    /// A cancelled response whose `end` did not come in time (an agent that ignores the interrupt
    /// and streams on, or sends no `end` after it).
    fn lingering(r: &Response) -> bool {
        r.cancelled && r.cancel_deadline.is_none()
    }

    /// A message is about to go: a lingering cancelled response is over for good (what follows is
    /// the new one's).
    fn drop_lingering(&mut self) {
        if self.response.as_ref().is_some_and(Self::lingering) {
            self.cancelled_over();
        }
    }

    /// The `session.open` body (strict: no proposed id).
    pub fn session_open(&self) -> Value {
        json!({
            "type": "session.open",
            "hostCapabilities": {
                "rendering": RENDERING,
                "conformanceLevel": "basic",
                "stateSync": false,
                "orchestration": false,
                "accessibility": {"screenReader": false, "reducedMotion": true, "voiceOnly": true},
            },
            "locale": self.settings.locale,
        })
    }

    fn session_post(body: Value) -> Wire {
        H2aPost {
            post: "session".into(),
            session: None,
            body,
        }
        .to_wire()
    }

    fn signal(&self, signal_type: &str, content: Value) -> Result<Wire, ProtocolError> {
        let session = self
            .session
            .clone()
            .ok_or_else(|| ProtocolError::State("no H2A session yet".into()))?;
        Ok(H2aPost {
            post: "signal".into(),
            session: Some(session),
            body: json!({"type": "user.signal", "signalType": signal_type, "content": content}),
        }
        .to_wire())
    }

    fn new_session(&mut self) -> Wire {
        self.settings.resume_state.update(|p| {
            *p = ResumePoint::default();
        });
        self.resuming = None;
        self.session = None;
        self.last_sequence = 0;
        Self::session_post(self.session_open())
    }

    /// A response begins: the answer to a message just sent (`continuing` false: always a new id), or
    /// frames with no response open (`continuing` true: on a resumed session, the one the drop cut
    /// goes on under its id).
    fn begin_response(&mut self, now_ms: u64, continuing: bool) {
        let point = self.settings.resume_state.get();
        let id = match point.open_response {
            Some(id) if continuing && point.session.is_some() && point.session == self.session => {
                id
            }
            _ => {
                self.responses += 1;
                format!("h2a-{}-{}", self.id_prefix, self.responses)
            }
        };
        let open = id.clone();
        self.settings
            .resume_state
            .update(|p| p.open_response = Some(open));
        self.response = Some(Response {
            id,
            started_ms: now_ms,
            ..Response::default()
        });
    }

    /// Text messages carry their response's id (as the other codecs do), so the voice bridge's
    /// cancelled-answer filter applies to them too.
    fn text_id(r: &Response) -> String {
        r.id.clone()
    }

    /// The oldest message sent has its answer begun (or ended without one): the session needs it no
    /// more, and a held one is answered.
    fn message_settled(
        state: &ResumeState,
        held: &mut VecDeque<String>,
        held_until: &mut Option<u64>,
    ) {
        state.update(|p| {
            if !p.sent_unanswered.is_empty() {
                p.sent_unanswered.remove(0);
            }
        });
        if held.pop_front().is_some() && held.is_empty() {
            *held_until = None;
        }
    }

    /// The cancelled response is over (its `end`, a terminal error, or the wait for them ran out).
    fn cancelled_over(&mut self) {
        self.response = None;
        self.settings
            .resume_state
            .update(|p| p.cancelled_open = false);
    }

    /// Close the open response (if any) with `status`.
    fn finish(&mut self, status: FinishStatus, out: &mut Vec<Downlink>) {
        self.settings
            .resume_state
            .update(|p| p.open_response = None);
        if let Some(r) = self.response.take() {
            if r.frames == 0 && !r.cancelled {
                Self::message_settled(
                    &self.settings.resume_state,
                    &mut self.held,
                    &mut self.held_until,
                );
            }
            if r.cancelled {
                // Already closed locally at the interrupt or the limit.
                return;
            }
            if r.text_open {
                out.push(Downlink::TextDone {
                    message_id: Self::text_id(&r),
                });
            }
            for (_, call_id, name) in r.tools {
                out.push(Downlink::Tool {
                    call_id,
                    name,
                    state: ToolState::Done,
                });
            }
            out.push(Downlink::ResponseFinished { id: r.id, status });
        }
    }

    /// Close the response locally: emitted as finished now, its remaining frames dropped.
    fn cancel_response(&mut self, now_ms: u64, status: FinishStatus, out: &mut Vec<Downlink>) {
        if let Some(r) = self.response.as_mut() {
            if r.cancelled {
                return;
            }
            if r.frames == 0 {
                Self::message_settled(
                    &self.settings.resume_state,
                    &mut self.held,
                    &mut self.held_until,
                );
            }
            // Closed here: nothing continues it after a resume (its replayed rest is dropped), and
            // its id is not reused (the voice bridge drops every later event of a cancelled answer
            // by that id).
            self.settings.resume_state.update(|p| {
                p.open_response = None;
                p.cancelled_open = true;
            });
            r.cancelled = true;
            r.cancel_deadline = Some(now_ms + INTERRUPT_END_WAIT_MS);
            if r.text_open {
                r.text_open = false;
                out.push(Downlink::TextDone {
                    message_id: Self::text_id(r),
                });
            }
            for (_, call_id, name) in std::mem::take(&mut r.tools) {
                out.push(Downlink::Tool {
                    call_id,
                    name,
                    state: ToolState::Done,
                });
            }
            out.push(Downlink::ResponseFinished {
                id: r.id.clone(),
                status,
            });
        }
    }

    /// An interrupt signal, if the rate limit allows one now.
    fn interrupt_signal(&mut self, now_ms: u64) -> Option<Wire> {
        while self
            .interrupts_ms
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) >= 60_000)
        {
            self.interrupts_ms.pop_front();
        }
        if now_ms < self.blocked_until_ms {
            tracing::info!("h2a: interrupt not sent (the agent asked us to wait); stopped locally");
            return None;
        }
        if self.interrupts_ms.len() >= INTERRUPT_LIMIT_PER_MIN {
            tracing::info!("h2a: interrupt not sent (10 per minute already); stopped locally");
            return None;
        }
        let w = self.signal("interrupt", json!({"scope": "current"})).ok()?;
        self.interrupts_ms.push_back(now_ms);
        Some(w)
    }

    fn encode_text(&mut self, now_ms: u64, text: String) -> Result<Vec<Wire>, ProtocolError> {
        if let Some(c) = self.confirm.take() {
            if let Some(label) = text.strip_prefix("[Confirmed]") {
                tracing::debug!(label = label.trim(), "h2a: confirmation confirmed");
                return Ok(vec![self.signal(
                    "confirm",
                    json!({"frameId": c.frame_id, "choice": c.confirm_choice}),
                )?]);
            }
            if text.starts_with("[Denied]") {
                return Ok(vec![self.signal(
                    "deny",
                    json!({"frameId": c.frame_id, "reason": "Declined by voice"}),
                )?]);
            }
            // Anything else settles the question; it goes as a message.
        }
        self.drop_lingering();
        if self.response.is_some() || !self.held.is_empty() {
            // One response at a time: the agent answers in order anyway, and late frames of an
            // interrupted response would otherwise be read as the new one's. It goes at the `end`
            // (at most INTERRUPT_END_WAIT_MS after an interrupt), or after the held messages.
            self.queue.push_back(Uplink::Text(text));
            return Ok(Vec::new());
        }
        let w = self.signal("message", json!({"text": text}))?;
        self.settings
            .resume_state
            .update(|p| p.sent_unanswered.push(text));
        self.begin_response(now_ms, false);
        Ok(vec![w])
    }

    fn flush_queue(&mut self, now_ms: u64) -> Vec<Wire> {
        let mut out = Vec::new();
        if !self.queue.is_empty()
            && self.held.is_empty()
            && self.session.is_some()
            && now_ms >= self.blocked_until_ms
        {
            self.drop_lingering();
        }
        while self.response.is_none()
            && self.held.is_empty()
            && self.session.is_some()
            && now_ms >= self.blocked_until_ms
        {
            let Some(up) = self.queue.pop_front() else {
                break;
            };
            match self.encode(now_ms, up) {
                Ok(w) => out.extend(w),
                Err(e) => tracing::debug!(error = %e, "h2a: queued item not sent"),
            }
        }
        out
    }

    fn malformed(&mut self, reason: String) -> ProtocolError {
        self.stats.malformed += 1;
        ProtocolError::Malformed(reason)
    }

    fn on_ack(&mut self, now_ms: u64, v: &Value, out: &mut Vec<Downlink>) -> Vec<Wire> {
        let Some(id) = v.get("sessionId").and_then(Value::as_str) else {
            out.push(Downlink::Unknown {
                kind: "session.ack".into(),
                reason: "no sessionId".into(),
            });
            return Vec::new();
        };
        // Server ids are unique: an ack naming the session we had is that session, resumed (the TS
        // mock re-acks a live session without `resumedFromSequence` and continues its sequence).
        let was_resuming = self.resuming.take().is_some();
        let resumed_ok = self.settings.resume_state.get().session.as_deref() == Some(id);
        if resumed_ok {
            tracing::info!(session = id, from = ?v.get("resumedFromSequence"), "h2a: session resumed");
        } else if was_resuming {
            tracing::info!("h2a: resume answered with a new session");
        }
        if !resumed_ok {
            self.last_sequence = 0;
        }
        let last = self.last_sequence;
        let id = id.to_string();
        self.settings.resume_state.update(|p| {
            p.session = Some(id.clone());
            p.last_sequence = last;
            p.resume_pending = false;
        });
        self.session = Some(id.clone());
        if resumed_ok {
            // The link re-sent every turn it saw no answer to. Those this session already got, it
            // answers on the resumed stream: hold them, and ask again only if nothing comes.
            for t in self.settings.resume_state.get().sent_unanswered {
                let pos = self
                    .queue
                    .iter()
                    .position(|u| matches!(u, Uplink::Text(x) if *x == t));
                if let Some(i) = pos {
                    self.queue.remove(i);
                    self.held.push_back(t);
                }
            }
            if !self.held.is_empty() {
                tracing::info!(
                    held = self.held.len(),
                    "h2a: the resumed session has the unanswered messages; waiting for the answers"
                );
                self.held_until = Some(now_ms + RESUME_REPLAY_WAIT_MS);
            }
        }
        out.push(Downlink::Ready { session: id });
        self.flush_queue(now_ms)
    }

    fn on_frame(&mut self, now_ms: u64, v: &Value, bytes: usize) -> (Vec<Downlink>, Vec<Wire>) {
        let mut out = Vec::new();
        let mut replies = Vec::new();
        let frame_type = v
            .get("frameType")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let frame_id = v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(seq) = v.get("sequence").and_then(Value::as_u64) {
            if seq <= self.last_sequence && self.last_sequence > 0 {
                self.stats.duplicates_dropped += 1;
                out.push(Downlink::Unknown {
                    kind: format!("frame:{frame_type}"),
                    reason: format!("sequence {seq} already received (replay duplicate)"),
                });
                return (out, replies);
            }
            self.last_sequence = seq;
            self.settings
                .resume_state
                .update(|p| p.last_sequence = p.last_sequence.max(seq));
        }
        let content = v.get("content").cloned().unwrap_or(Value::Null);

        // Session-level errors may come outside any response.
        if frame_type == "error" {
            return self.on_error(now_ms, v, &content);
        }
        if self.response.is_none() {
            let point = self.settings.resume_state.get();
            if point.cancelled_open && point.session.is_some() && point.session == self.session {
                // The rest of an answer cancelled before the drop, replayed by the resumed
                // session: dropped as its live frames were.
                self.response = Some(Response {
                    cancelled: true,
                    cancel_deadline: Some(now_ms + INTERRUPT_END_WAIT_MS),
                    ..Response::default()
                });
            } else {
                // Agent-initiated (a replay after resume, a toast): a response of its own.
                self.begin_response(now_ms, true);
            }
        }
        let Some(r) = self.response.as_mut() else {
            return (out, replies);
        };
        if r.cancelled {
            self.stats.cancelled_run_frames_dropped += 1;
            if frame_type == "end" {
                self.cancelled_over();
                replies.extend(self.flush_queue(now_ms));
            }
            return (out, replies);
        }
        r.frames += 1;
        r.bytes += bytes;
        if r.frames == 1 {
            out.push(Downlink::ResponseStarted { id: r.id.clone() });
            Self::message_settled(
                &self.settings.resume_state,
                &mut self.held,
                &mut self.held_until,
            );
        }
        let over = if r.frames > MAX_FRAMES_PER_RESPONSE {
            Some(format!(
                "more than {MAX_FRAMES_PER_RESPONSE} frames in one response"
            ))
        } else if r.bytes > MAX_BYTES_PER_RESPONSE {
            Some(format!(
                "more than {} MB in one response",
                MAX_BYTES_PER_RESPONSE / (1024 * 1024)
            ))
        } else {
            None
        };
        if let Some(why) = over {
            self.over_limit(now_ms, why, &mut out, &mut replies);
            return (out, replies);
        }
        match frame_type.as_str() {
            "text" => {
                let (text, format) = match &content {
                    Value::String(s) => (s.clone(), "markdown"),
                    Value::Object(m) => (
                        m.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        m.get("format")
                            .and_then(Value::as_str)
                            .unwrap_or("markdown"),
                    ),
                    _ => (String::new(), "plain"),
                };
                let text = strip_markup(&text, format, &mut r.in_tag);
                if !r.text_open && !text.is_empty() {
                    r.text_open = true;
                    r.messages += 1;
                }
                if !text.is_empty() {
                    out.push(Downlink::TextDelta {
                        message_id: Self::text_id(r),
                        text,
                    });
                }
                let final_ = v.get("final").and_then(Value::as_bool).unwrap_or(true);
                if final_ && r.text_open {
                    r.text_open = false;
                    out.push(Downlink::TextDone {
                        message_id: Self::text_id(r),
                    });
                }
            }
            "end" => {
                let status = match content.get("reason").and_then(Value::as_str) {
                    Some("interrupted") | Some("barge_in") => FinishStatus::Cancelled,
                    _ => FinishStatus::Ok,
                };
                self.finish(status, &mut out);
                replies.extend(self.flush_queue(now_ms));
            }
            "tool_card" => {
                let name = content
                    .get("tool")
                    .and_then(Value::as_str)
                    .unwrap_or("tool")
                    .to_string();
                let running = content.get("status").and_then(Value::as_str) == Some("running");
                tool_event(r, &mut out, format!("tool:{name}"), name, !running);
            }
            "progress" => {
                let task = content
                    .get("task")
                    .and_then(Value::as_str)
                    .unwrap_or("task")
                    .to_string();
                let done = content
                    .get("percent")
                    .and_then(Value::as_f64)
                    .is_some_and(|p| p >= 100.0);
                tool_event(r, &mut out, format!("progress:{task}"), task, done);
            }
            "confirmation" => {
                let options: Vec<&Value> = content
                    .get("options")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                let is_deny = |o: &&Value| {
                    matches!(
                        o.get("id").and_then(Value::as_str),
                        Some("deny" | "cancel" | "no" | "reject")
                    )
                };
                let confirm = options
                    .iter()
                    .find(|o| !is_deny(o))
                    .copied()
                    .cloned()
                    .unwrap_or_else(|| json!({"id": "confirm", "label": "Confirm"}));
                let deny = options
                    .iter()
                    .find(|o| is_deny(o))
                    .copied()
                    .cloned()
                    .unwrap_or_else(|| json!({"id": "deny", "label": "Cancel"}));
                let label = |o: &Value, d: &str| {
                    o.get("label")
                        .and_then(Value::as_str)
                        .unwrap_or(d)
                        .to_string()
                };
                let description = content
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| {
                        v.get("fallbackText")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                self.confirm = Some(Confirm {
                    frame_id: frame_id.clone(),
                    confirm_choice: confirm
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or("confirm")
                        .to_string(),
                    deadline_ms: content
                        .get("timeout")
                        .and_then(Value::as_u64)
                        .map(|s| now_ms + s * 1000),
                });
                out.push(Downlink::Render {
                    component: json!({
                        "type": "confirm",
                        "id": frame_id,
                        "props": {
                            "message": description,
                            "confirm_label": label(&confirm, "Confirm"),
                            "deny_label": label(&deny, "Cancel"),
                        },
                    }),
                    tool: None,
                });
            }
            other => {
                let fallback = v
                    .get("fallbackText")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| builtin_fallback(other, &content, v));
                match fallback {
                    Some(text) if !text.trim().is_empty() => {
                        if r.text_open {
                            r.text_open = false;
                            out.push(Downlink::TextDone {
                                message_id: Self::text_id(r),
                            });
                        }
                        r.messages += 1;
                        let message_id = Self::text_id(r);
                        out.push(Downlink::TextDelta {
                            message_id: message_id.clone(),
                            text: text.trim().to_string(),
                        });
                        out.push(Downlink::TextDone { message_id });
                    }
                    _ => out.push(Downlink::Unknown {
                        kind: format!("frame:{other}"),
                        reason: "frame type not rendered and no fallbackText".into(),
                    }),
                }
            }
        }
        (out, replies)
    }

    fn over_limit(
        &mut self,
        now_ms: u64,
        why: String,
        out: &mut Vec<Downlink>,
        replies: &mut Vec<Wire>,
    ) {
        tracing::warn!(%why, "h2a: response over the security limit; closed");
        self.cancel_response(now_ms, FinishStatus::Error, out);
        out.push(Downlink::Error {
            code: "limit_exceeded".into(),
            message: why,
            fatal: false,
        });
        replies.extend(self.interrupt_signal(now_ms));
    }

    fn on_error(&mut self, now_ms: u64, v: &Value, content: &Value) -> (Vec<Downlink>, Vec<Wire>) {
        let mut out = Vec::new();
        let mut replies = Vec::new();
        let code = content
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or("INTERNAL_ERROR")
            .to_string();
        let message = content
            .get("message")
            .and_then(Value::as_str)
            .or_else(|| v.get("fallbackText").and_then(Value::as_str))
            .unwrap_or("agent error")
            .to_string();
        let severity = content
            .get("severity")
            .and_then(Value::as_str)
            .unwrap_or("error");
        if let Some(r) = self.response.as_ref()
            && r.cancelled
        {
            // An error ends the cancelled response as well as an end would.
            self.stats.cancelled_run_frames_dropped += 1;
            self.cancelled_over();
            return (out, self.flush_queue(now_ms));
        }
        if code == "RATE_LIMITED" {
            let secs = content
                .get("retryAfter")
                .and_then(Value::as_u64)
                .unwrap_or(30);
            self.blocked_until_ms = now_ms + secs * 1000;
        }
        let resume_refused = matches!(code.as_str(), "STATE_SYNC_ERROR" | "SESSION_EXPIRED")
            && (self.resuming.is_some() || self.session.is_none() || code == "SESSION_EXPIRED");
        let fatal = severity == "fatal" || code == "AUTHENTICATION_REQUIRED";
        out.push(Downlink::Error {
            code: code.clone(),
            message,
            fatal: fatal && !resume_refused,
        });
        let terminal = matches!(severity, "error" | "fatal") || code == "RATE_LIMITED";
        if terminal {
            self.finish(FinishStatus::Error, &mut out);
        }
        if resume_refused {
            tracing::info!(%code, "h2a: session cannot be resumed; opening a new one");
            self.finish(FinishStatus::Error, &mut out);
            replies.push(self.new_session());
        } else if terminal {
            replies.extend(self.flush_queue(now_ms));
        }
        (out, replies)
    }
}

fn tool_event(r: &mut Response, out: &mut Vec<Downlink>, key: String, name: String, done: bool) {
    let pos = r.tools.iter().position(|(k, _, _)| *k == key);
    match (pos, done) {
        (Some(i), true) => {
            let (_, call_id, name) = r.tools.remove(i);
            out.push(Downlink::Tool {
                call_id,
                name,
                state: ToolState::Done,
            });
        }
        (Some(i), false) => out.push(Downlink::Tool {
            call_id: r.tools[i].1.clone(),
            name,
            state: ToolState::Progress,
        }),
        (None, _) => {
            let call_id = format!("{}-{key}", r.id);
            out.push(Downlink::Tool {
                call_id: call_id.clone(),
                name: name.clone(),
                state: ToolState::Started,
            });
            if done {
                out.push(Downlink::Tool {
                    call_id,
                    name,
                    state: ToolState::Done,
                });
            } else {
                r.tools.push((key, call_id, name));
            }
        }
    }
}

/// Spoken text for a non-text frame without `fallbackText` (voice extension's spoken rendering).
fn builtin_fallback(frame_type: &str, content: &Value, v: &Value) -> Option<String> {
    let s = |k: &str| content.get(k).and_then(Value::as_str).map(str::to_string);
    match frame_type {
        "toast" => s("message"),
        "artifact" => s("name").map(|n| format!("{n} is ready.")),
        "state_delta" => v
            .get("metadata")
            .and_then(|m| m.get("narration"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// Text fit for speech: HTML tags dropped (`in_tag` carries an open tag across deltas), markdown
/// emphasis, code and heading marks removed, links reduced to their text.
pub fn strip_markup(text: &str, format: &str, in_tag: &mut bool) -> String {
    let mut out = String::with_capacity(text.len());
    if format == "plain" {
        return text.to_string();
    }
    let mut chars = text.chars().peekable();
    let mut line_start = true;
    while let Some(c) = chars.next() {
        if *in_tag {
            if c == '>' {
                *in_tag = false;
            }
            continue;
        }
        if format == "html" && c == '<' {
            *in_tag = true;
            continue;
        }
        if format == "html" && c == '&' {
            // The few entities text uses.
            let rest: String = chars.clone().take(6).collect();
            let (rep, n) = if rest.starts_with("amp;") {
                ("&", 4)
            } else if rest.starts_with("lt;") {
                ("<", 3)
            } else if rest.starts_with("gt;") {
                (">", 3)
            } else if rest.starts_with("quot;") {
                ("\"", 5)
            } else if rest.starts_with("nbsp;") {
                (" ", 5)
            } else {
                ("&", 0)
            };
            out.push_str(rep);
            for _ in 0..n {
                chars.next();
            }
            continue;
        }
        if format == "markdown" {
            match c {
                '*' | '`' | '~' => continue,
                '#' if line_start => {
                    while chars.peek() == Some(&'#') {
                        chars.next();
                    }
                    if chars.peek() == Some(&' ') {
                        chars.next();
                    }
                    continue;
                }
                '[' => continue,
                ']' if chars.peek() == Some(&'(') => {
                    // Skip the link target.
                    for n in chars.by_ref() {
                        if n == ')' {
                            break;
                        }
                    }
                    continue;
                }
                _ => {}
            }
        }
        line_start = c == '\n';
        out.push(c);
    }
    out
}

impl Protocol for H2aClient {
    fn name(&self) -> &'static str {
        "h2a"
    }

    fn open(&mut self, now_ms: u64, _info: &SessionInfo) -> Vec<Wire> {
        // Per connection: the stream is new, nothing of the last one is in flight any more. The link
        // re-sends what the agent had not answered.
        self.session = None;
        self.resuming = None;
        self.queue.clear();
        self.held.clear();
        self.held_until = None;
        self.response = None;
        self.confirm = None;
        let prev = self.settings.resume_state.get();
        match prev.session {
            Some(id) if self.settings.resume && !prev.resume_pending => {
                self.last_sequence = self.last_sequence.max(prev.last_sequence);
                self.resuming = Some(now_ms + RESUME_ACK_WAIT_MS);
                self.settings
                    .resume_state
                    .update(|p| p.resume_pending = true);
                vec![Self::session_post(json!({
                    "type": "session.resume",
                    "sessionId": id,
                    "lastReceivedSequence": self.last_sequence,
                }))]
            }
            _ => vec![self.new_session()],
        }
    }

    fn encode(&mut self, now_ms: u64, up: Uplink) -> Result<Vec<Wire>, ProtocolError> {
        match up {
            Uplink::Text(text) => {
                let text = text.trim().to_string();
                if text.is_empty() {
                    return Err(ProtocolError::State("empty message is not sent".into()));
                }
                if self.session.is_none() || now_ms < self.blocked_until_ms {
                    // Before the ack, or while the agent asked us to wait (RATE_LIMITED).
                    self.queue.push_back(Uplink::Text(text));
                    return Ok(Vec::new());
                }
                self.encode_text(now_ms, text)
            }
            Uplink::TurnStart | Uplink::TurnEnd { .. } => Ok(Vec::new()),
            Uplink::Audio { .. } => Err(ProtocolError::State(
                "H2A carries no audio; the turn goes as its transcript".into(),
            )),
            Uplink::Interrupt => {
                // Queued transcripts are of the turn being interrupted's past: keep them.
                let Some(r) = self.response.as_ref() else {
                    return Err(ProtocolError::State("no response to interrupt".into()));
                };
                if r.cancelled {
                    return Ok(Vec::new());
                }
                // The device stopped its speech already: the local close emits nothing (the link
                // and the voice bridge treat the answer as cancelled), it only drops what comes late.
                let mut ignored = Vec::new();
                self.cancel_response(now_ms, FinishStatus::Cancelled, &mut ignored);
                Ok(self.interrupt_signal(now_ms).into_iter().collect())
            }
        }
    }

    fn decode(&mut self, now_ms: u64, wire: Wire) -> Result<Decoded, ProtocolError> {
        let text = match wire {
            Wire::Text(t) => t,
            Wire::Binary(b) => {
                return Err(self.malformed(format!(
                    "binary frame of {} bytes (H2A sends SSE text)",
                    b.len()
                )));
            }
        };
        let bytes = text.len();
        let v: Value = serde_json::from_str(text.trim())
            .map_err(|e| self.malformed(format!("SSE data is not JSON: {e}")))?;
        let Some(ty) = v.get("type").and_then(Value::as_str).map(str::to_string) else {
            return Err(self.malformed("no \"type\"".into()));
        };
        let mut out = Vec::new();
        let mut replies = Vec::new();
        match ty.as_str() {
            "session.ack" => replies = self.on_ack(now_ms, &v, &mut out),
            "agent.frame" => {
                let (o, r) = self.on_frame(now_ms, &v, bytes);
                out = o;
                replies = r;
            }
            "presence.update" => {
                let state = v.get("state").and_then(Value::as_str).unwrap_or("unknown");
                out.push(Downlink::Unknown {
                    kind: format!("presence:{state}"),
                    reason: "presence update".into(),
                });
            }
            other => out.push(Downlink::Unknown {
                kind: other.to_string(),
                reason: "not an H2A core event".into(),
            }),
        }
        // The interrupt's local close may have produced events.
        let mut events = std::mem::take(&mut self.events);
        events.extend(out);
        Ok(Decoded { events, replies })
    }

    fn poll(&mut self, now_ms: u64) -> Vec<Wire> {
        let mut wires = Vec::new();
        if self.resuming.is_some_and(|d| now_ms >= d) {
            tracing::info!("h2a: no ack for the resume; opening a new session");
            wires.push(self.new_session());
        }
        if let Some(c) = &self.confirm
            && c.deadline_ms.is_some_and(|d| now_ms >= d)
            && let Some(c) = self.confirm.take()
        {
            tracing::info!(frame = %c.frame_id, "h2a: confirmation timed out; denied");
            wires.extend(
                self.signal("deny", json!({"frameId": c.frame_id, "reason": "timeout"}))
                    .ok(),
            );
        }
        if self.held_until.is_some_and(|d| now_ms >= d) {
            // Nothing of their answers came on the resumed stream: ask again, in order, first.
            tracing::info!(
                held = self.held.len(),
                "h2a: no answer on the resumed session; asking again"
            );
            self.held_until = None;
            let held = std::mem::take(&mut self.held);
            self.settings.resume_state.update(|p| {
                p.sent_unanswered.retain(|t| !held.contains(t));
            });
            for t in held.into_iter().rev() {
                self.queue.push_front(Uplink::Text(t));
            }
        }
        let mut events = Vec::new();
        if let Some(r) = self.response.as_mut() {
            if r.cancelled {
                if r.cancel_deadline.is_some_and(|d| now_ms >= d) {
                    // No end after the interrupt (the Python reference drops it; the TS mock
                    // streams on): the next message need not wait any more, but what comes of
                    // this one is still dropped until an end or that message.
                    r.cancel_deadline = None;
                }
            } else if r.frames > 0 && now_ms.saturating_sub(r.started_ms) >= MAX_RESPONSE_MS {
                let mut replies = Vec::new();
                self.over_limit(
                    now_ms,
                    format!(
                        "response streamed for more than {} s",
                        MAX_RESPONSE_MS / 1000
                    ),
                    &mut events,
                    &mut replies,
                );
                wires.extend(replies);
            }
        }
        wires.extend(self.flush_queue(now_ms));
        self.events.extend(events);
        wires
    }

    fn next_deadline(&self) -> Option<u64> {
        let mut d = self.resuming.or(self.held_until);
        if let (Some(a), Some(b)) = (self.resuming, self.held_until) {
            d = Some(a.min(b));
        }
        let mut take = |x: Option<u64>| {
            if let Some(x) = x {
                d = Some(d.map_or(x, |d| d.min(x)));
            }
        };
        if let Some(r) = &self.response {
            if r.cancelled {
                take(r.cancel_deadline);
            } else if r.frames > 0 {
                take(Some(r.started_ms + MAX_RESPONSE_MS));
            }
        }
        take(self.confirm.as_ref().and_then(|c| c.deadline_ms));
        if !self.queue.is_empty() && self.blocked_until_ms > 0 {
            take(Some(self.blocked_until_ms));
        }
        d
    }

    fn stats(&self) -> CodecStats {
        self.stats
    }

    fn take_events(&mut self) -> Vec<Downlink> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_stripped_for_speech() {
        let mut t = false;
        assert_eq!(
            strip_markup("# Hi **there** `x` [a](http://b)", "markdown", &mut t),
            "Hi there x a"
        );
        assert_eq!(strip_markup("<b>bold", "html", &mut t), "bold");
        assert_eq!(strip_markup("<a href=\"", "html", &mut t), "");
        assert!(t);
        assert_eq!(
            strip_markup("x\">link</a> &amp; co", "html", &mut t),
            "link & co"
        );
        assert_eq!(strip_markup("*plain*", "plain", &mut t), "*plain*");
    }

    #[test]
    fn envelope_round_trip() {
        let p = H2aPost {
            post: "signal".into(),
            session: Some("s".into()),
            body: json!({"a": 1}),
        };
        assert_eq!(H2aPost::from_wire(&p.to_wire()), Some(p));
        assert!(H2aPost::from_wire(&Wire::Text("nope".into())).is_none());
    }
}
