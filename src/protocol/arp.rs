//! ARP v1 Minimal Mode (the flat JSON messages of arp-go `b36d884` and the Haira runtime), renderer
//! side, at the spec's Minimal renderer level. See `../shared/protocols/arp.md`.
//!
//! - Connect to `/_arp/v1`; no subprotocol is required. The server's `hello` is accepted but not
//!   required (the session is usable as soon as the socket opens); ours is sent only when
//!   `send_hello` is set, and the "unknown message type: hello" error the reference server answers it
//!   with is swallowed.
//! - The session id is ours (a UUID made once per device run) and rides on every `input`; nothing is
//!   replayed after a reconnect.
//! - Each transcript goes as `input{input_type:"text"}`, one turn at a time: a second input waits
//!   until the first turn's `commit{final:true}`.
//! - `delta` text is streamed, `render`/`patch` go to the renderer, `tool_start`/`tool_end` are tool
//!   activity, `error` is not fatal (the turn still ends at its `commit`; an error with no commit ends
//!   the turn after [`ERROR_COMMIT_WAIT_MS`]).
//! - No cancel message exists: a barge-in closes the socket ([`Protocol::cancel_by_reconnect`]).
//! - Decoding is lenient: fields are read top-level or under `payload`, `v` is not checked, unknown
//!   types become [`Downlink::Unknown`], non-JSON frames a [`ProtocolError::Malformed`].
//!
//! Context: the link task; sans-IO, never blocks.

use std::collections::VecDeque;

use serde_json::{Value, json};

use super::{
    CodecStats, Decoded, Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState,
    Uplink, Wire,
};

/// The WebSocket path arp-go and Haira serve.
pub const ARP_PATH: &str = "/_arp/v1";

/// After an `error` in a turn, how long to wait for the turn's `commit` before ending it locally
/// (the reference server sends none when the handler fails before any output).
pub const ERROR_COMMIT_WAIT_MS: u64 = 3_000;

#[derive(Debug, Clone)]
pub struct ArpSettings {
    /// The client-held session id sent on every input.
    pub session_id: String,
    /// Send the spec's renderer `hello` on connect (the reference server rejects it, harmlessly).
    pub send_hello: bool,
}

impl Default for ArpSettings {
    fn default() -> Self {
        ArpSettings {
            session_id: uuid::Uuid::new_v4().to_string(),
            send_hello: false,
        }
    }
}

/// The capabilities a voice renderer at the Minimal level advertises.
pub fn renderer_hello() -> Value {
    json!({"v": 1, "type": "hello", "capabilities": {"components": ["text"], "features": ["voice-input"]}})
}

#[derive(Debug, Default)]
struct Turn {
    id: String,
    /// Something of the answer arrived (delta, render, tool).
    started: bool,
    text: bool,
    errored: bool,
    /// When an error with no commit yet ends the turn.
    error_deadline: Option<u64>,
    /// Tool calls in flight: (tool name, call id).
    tools: Vec<(String, String)>,
}

/// An ARP Minimal Mode renderer connection codec.
#[derive(Debug)]
pub struct ArpClient {
    settings: ArpSettings,
    turn: Option<Turn>,
    turns: u64,
    /// Makes answer ids unique across connections (each connection has a codec of its own), so late
    /// frames of a cancelled answer are never taken for the next one.
    id_prefix: String,
    tool_calls: u64,
    /// Inputs waiting for the current turn to end.
    queue: VecDeque<String>,
    hello_sent: bool,
    /// The components and features the server said it may send.
    server_capabilities: Option<Value>,
    events: Vec<Downlink>,
    stats: CodecStats,
}

impl ArpClient {
    pub fn new(settings: ArpSettings) -> Self {
        ArpClient {
            settings,
            turn: None,
            turns: 0,
            id_prefix: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            tool_calls: 0,
            queue: VecDeque::new(),
            hello_sent: false,
            server_capabilities: None,
            events: Vec::new(),
            stats: CodecStats::default(),
        }
    }

    pub fn session_id(&self) -> &str {
        &self.settings.session_id
    }

    /// What the server's `hello` listed, once it came.
    pub fn server_capabilities(&self) -> Option<&Value> {
        self.server_capabilities.as_ref()
    }

    /// A turn is open (an input sent, its commit not yet in).
    pub fn in_turn(&self) -> bool {
        self.turn.is_some()
    }

    fn input_frame(&mut self, text: String) -> Wire {
        self.turns += 1;
        self.turn = Some(Turn {
            id: format!("arp-{}-{}", self.id_prefix, self.turns),
            ..Turn::default()
        });
        let frame = json!({
            "v": 1,
            "type": "input",
            "session_id": self.settings.session_id,
            "input_type": "text",
            "data": {"text": text},
        });
        Wire::Text(frame.to_string())
    }

    /// End the current turn; the next queued input (if any) goes out.
    fn end_turn(&mut self, status: FinishStatus, out: &mut Vec<Downlink>) -> Vec<Wire> {
        if let Some(t) = self.turn.take() {
            if t.text {
                out.push(Downlink::TextDone {
                    message_id: t.id.clone(),
                });
            }
            for (name, call_id) in t.tools {
                out.push(Downlink::Tool {
                    call_id,
                    name,
                    state: ToolState::Done,
                });
            }
            out.push(Downlink::ResponseFinished { id: t.id, status });
        }
        match self.queue.pop_front() {
            Some(text) => vec![self.input_frame(text)],
            None => Vec::new(),
        }
    }

    /// The current turn, marked started; `ResponseStarted` goes out the first time.
    fn started(&mut self, out: &mut Vec<Downlink>) -> Option<&mut Turn> {
        let t = self.turn.as_mut()?;
        if !t.started {
            t.started = true;
            out.push(Downlink::ResponseStarted { id: t.id.clone() });
        }
        // Output after an error means the agent goes on; its commit will come.
        t.error_deadline = None;
        Some(t)
    }

    fn malformed(&mut self, reason: String) -> ProtocolError {
        self.stats.malformed += 1;
        ProtocolError::Malformed(reason)
    }
}

/// A field top-level or under `payload` (the reference client accepts both).
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key)
        .or_else(|| v.get("payload").and_then(|p| p.get(key)))
}

fn field_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    field(v, key).and_then(Value::as_str)
}

impl Protocol for ArpClient {
    fn name(&self) -> &'static str {
        "arp"
    }

    fn open(&mut self, _now_ms: u64, _info: &SessionInfo) -> Vec<Wire> {
        // Nothing survives a reconnect: the link re-sends what the agent had not answered.
        self.turn = None;
        self.queue.clear();
        self.server_capabilities = None;
        self.hello_sent = self.settings.send_hello;
        if self.settings.send_hello {
            vec![Wire::Text(renderer_hello().to_string())]
        } else {
            Vec::new()
        }
    }

    fn encode(&mut self, _now_ms: u64, up: Uplink) -> Result<Vec<Wire>, ProtocolError> {
        match up {
            Uplink::Text(text) => {
                let text = text.trim().to_string();
                if text.is_empty() {
                    // The server would answer "empty input" and no commit.
                    return Err(ProtocolError::State("empty input is not sent".into()));
                }
                if self.turn.is_some() {
                    // One turn at a time: it goes when this turn's commit arrives.
                    self.queue.push_back(text);
                    return Ok(Vec::new());
                }
                Ok(vec![self.input_frame(text)])
            }
            // The turn's audio became the text above (speech-to-text on the device).
            Uplink::TurnStart | Uplink::TurnEnd { .. } => Ok(Vec::new()),
            Uplink::Audio { .. } => Err(ProtocolError::State(
                "ARP carries no audio; the turn goes as its transcript".into(),
            )),
            Uplink::Interrupt => {
                // No cancel message: the link closes the socket. Whatever comes late is not ours.
                self.turn = None;
                self.queue.clear();
                Err(ProtocolError::State(
                    "ARP has no cancel message; the connection is closed instead".into(),
                ))
            }
        }
    }

    fn decode(&mut self, now_ms: u64, wire: Wire) -> Result<Decoded, ProtocolError> {
        let text = match wire {
            Wire::Text(t) => t,
            Wire::Binary(b) => {
                return Err(self.malformed(format!(
                    "binary frame of {} bytes (ARP sends JSON text frames)",
                    b.len()
                )));
            }
        };
        // arp-go ends every frame with "\n".
        let v: Value = serde_json::from_str(text.trim())
            .map_err(|e| self.malformed(format!("not JSON: {e}")))?;
        let Some(ty) = v.get("type").and_then(Value::as_str).map(str::to_string) else {
            return Err(self.malformed("no \"type\"".into()));
        };
        if let Some(ver) = v.get("v").and_then(Value::as_u64)
            && ver != 1
        {
            tracing::debug!(v = ver, "ARP frame with an unexpected version; read as v1");
        }
        let mut out = Vec::new();
        let mut replies = Vec::new();
        match ty.as_str() {
            "hello" => {
                self.server_capabilities = v.get("capabilities").cloned();
                tracing::debug!(capabilities = ?self.server_capabilities, "ARP server hello");
            }
            "delta" => {
                let delta = field_str(&v, "delta").unwrap_or("");
                match self.started(&mut out) {
                    Some(t) => {
                        if !delta.is_empty() {
                            t.text = true;
                            let message_id = t.id.clone();
                            out.push(Downlink::TextDelta {
                                message_id,
                                text: delta.to_string(),
                            });
                        }
                    }
                    None => out.push(Downlink::Unknown {
                        kind: ty,
                        reason: "delta outside a turn (late text of a cancelled turn?)".into(),
                    }),
                }
            }
            "tool_start" | "tool_end" => {
                let name = field_str(&v, "tool")
                    .or_else(|| field_str(&v, "tool_name"))
                    .unwrap_or("tool")
                    .to_string();
                let start = ty == "tool_start";
                if start {
                    self.tool_calls += 1;
                }
                let n = self.tool_calls;
                match self.started(&mut out) {
                    Some(t) => {
                        let call_id = if start {
                            let id = format!("{}-tool-{n}", t.id);
                            t.tools.push((name.clone(), id.clone()));
                            id
                        } else if let Some(i) = t.tools.iter().position(|(n, _)| *n == name) {
                            t.tools.remove(i).1
                        } else {
                            format!("{}-tool-{name}", t.id)
                        };
                        if !start && field(&v, "ok").and_then(Value::as_bool) == Some(false) {
                            tracing::info!(tool = %name, "ARP tool reported failure");
                        }
                        out.push(Downlink::Tool {
                            call_id,
                            name,
                            state: if start {
                                ToolState::Started
                            } else {
                                ToolState::Done
                            },
                        });
                    }
                    None => out.push(Downlink::Unknown {
                        kind: ty,
                        reason: "tool activity outside a turn".into(),
                    }),
                }
            }
            "render" => {
                let components = field(&v, "components").and_then(Value::as_array).cloned();
                let tool = field_str(&v, "tool_name")
                    .or_else(|| field_str(&v, "tool"))
                    .map(str::to_string);
                match components {
                    Some(cs) => {
                        let _ = self.started(&mut out);
                        for c in cs {
                            if c.is_object() {
                                out.push(Downlink::Render {
                                    component: c,
                                    tool: tool.clone(),
                                });
                            } else {
                                out.push(Downlink::Unknown {
                                    kind: ty.clone(),
                                    reason: "a component that is not an object".into(),
                                });
                            }
                        }
                    }
                    None => {
                        return Err(self.malformed("render without \"components\"".into()));
                    }
                }
            }
            "patch" => match field(&v, "ops").and_then(Value::as_array) {
                Some(ops) => {
                    let ops = ops.clone();
                    let _ = self.started(&mut out);
                    out.push(Downlink::Patch { ops });
                }
                None => return Err(self.malformed("patch without \"ops\"".into())),
            },
            "error" => {
                let message = field_str(&v, "error")
                    .or_else(|| field_str(&v, "message"))
                    .unwrap_or("unspecified error")
                    .to_string();
                if self.hello_sent && message.contains("unknown message type: hello") {
                    self.hello_sent = false;
                    out.push(Downlink::Unknown {
                        kind: ty,
                        reason: "the server does not take a renderer hello (expected)".into(),
                    });
                } else {
                    if let Some(t) = self.turn.as_mut() {
                        t.errored = true;
                        if !t.started {
                            t.error_deadline = Some(now_ms + ERROR_COMMIT_WAIT_MS);
                        }
                    }
                    out.push(Downlink::Error {
                        code: "arp_error".into(),
                        message,
                        fatal: false,
                    });
                }
            }
            "commit" => {
                let final_ = field(&v, "final").and_then(Value::as_bool).unwrap_or(false);
                if !final_ {
                    out.push(Downlink::Unknown {
                        kind: ty,
                        reason: "commit without final (not an end of turn)".into(),
                    });
                } else if let Some(t) = &self.turn {
                    let status = if t.errored && !t.text {
                        FinishStatus::Error
                    } else {
                        FinishStatus::Ok
                    };
                    replies = self.end_turn(status, &mut out);
                } else {
                    out.push(Downlink::Unknown {
                        kind: ty,
                        reason: "commit outside a turn".into(),
                    });
                }
            }
            other => out.push(Downlink::Unknown {
                kind: other.to_string(),
                reason: "ARP message type not in Minimal Mode".into(),
            }),
        }
        Ok(Decoded {
            events: out,
            replies,
        })
    }

    fn poll(&mut self, now_ms: u64) -> Vec<Wire> {
        let due = self
            .turn
            .as_ref()
            .and_then(|t| t.error_deadline)
            .is_some_and(|d| now_ms >= d);
        if !due {
            return Vec::new();
        }
        tracing::info!("ARP turn ended by an error with no commit");
        let mut events = Vec::new();
        let wires = self.end_turn(FinishStatus::Error, &mut events);
        self.events.extend(events);
        wires
    }

    fn next_deadline(&self) -> Option<u64> {
        self.turn.as_ref().and_then(|t| t.error_deadline)
    }

    fn stats(&self) -> CodecStats {
        self.stats
    }

    fn ready_on_open(&self) -> Option<String> {
        Some(self.settings.session_id.clone())
    }

    fn cancel_by_reconnect(&self) -> bool {
        // Only an answer still streaming needs the socket closed; after its commit, stopping the
        // speaker is all a barge-in has to do.
        self.turn.is_some()
    }

    fn take_events(&mut self) -> Vec<Downlink> {
        std::mem::take(&mut self.events)
    }
}
