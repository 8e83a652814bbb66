//! Agent protocols as sans-IO codecs. A [`Protocol`] turns protocol-neutral [`Uplink`] items into wire
//! frames and wire frames into protocol-neutral [`Downlink`] events. It owns no socket and no clock:
//! time comes in as `now_ms` (monotonic milliseconds) and timers are driven through `poll`/
//! `next_deadline`, so every rule (sequence numbers, credits, replay, heartbeats) is unit-testable.
//!
//! Encode strictly to each spec; decode leniently: unknown event types, unknown fields and malformed
//! frames become [`Downlink::Unknown`] or a [`ProtocolError`] that the session logs and skips.
//!
//! Context: tokio (the session task), but nothing here awaits or blocks.

pub mod arp;
pub mod h2a;
pub mod haip;
pub mod hap;

use std::fmt;

use crate::config::Secret;

/// One WebSocket (or line) frame.
#[derive(Clone, PartialEq, Eq)]
pub enum Wire {
    Text(String),
    Binary(Vec<u8>),
}

impl fmt::Debug for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wire::Text(t) if t.len() > 200 => write!(
                f,
                "Text({}… {} bytes)",
                &t[..(0..=200)
                    .rev()
                    .find(|&i| t.is_char_boundary(i))
                    .unwrap_or(0)],
                t.len()
            ),
            Wire::Text(t) => write!(f, "Text({t})"),
            Wire::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
    }
}

impl Wire {
    pub fn len(&self) -> usize {
        match self {
            Wire::Text(t) => t.len(),
            Wire::Binary(b) => b.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Audio encodings that cross the protocol boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioCodec {
    /// Raw Opus packets, one per chunk.
    Opus,
    /// Little-endian signed 16-bit PCM.
    Pcm16,
    /// A complete WAV file.
    Wav,
}

/// What the device sends, whatever the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Uplink {
    /// The user started a turn.
    TurnStart,
    /// One chunk of the user's audio in the current turn.
    Audio {
        codec: AudioCodec,
        rate_hz: u32,
        channels: u16,
        duration_ms: u32,
        data: Vec<u8>,
    },
    /// The user's turn is over.
    TurnEnd { duration_ms: u64 },
    /// Text from the user (typed, or a transcript).
    Text(String),
    /// Barge-in: cancel the agent's current answer.
    Interrupt,
}

/// State of a tool call the agent makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolState {
    Started,
    Progress,
    Done,
}

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishStatus {
    Ok,
    Cancelled,
    Error,
}

/// What the agent sent, whatever the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Downlink {
    /// Handshake complete; `session` is the id the agent assigned.
    Ready { session: String },
    /// The agent started an answer (a run, a response).
    ResponseStarted { id: String },
    /// A piece of the agent's text.
    TextDelta { message_id: String, text: String },
    /// A text message is complete.
    TextDone { message_id: String },
    /// Agent audio to play.
    Audio {
        codec: AudioCodec,
        rate_hz: u32,
        channels: u16,
        data: Vec<u8>,
    },
    /// The agent is using a tool.
    Tool {
        call_id: String,
        name: String,
        state: ToolState,
    },
    /// A UI component to present (ARP `render`): the raw component, spoken through the renderer's
    /// fallback chain.
    Render {
        component: serde_json::Value,
        tool: Option<String>,
    },
    /// Patch operations on components already presented (ARP `patch`).
    Patch { ops: Vec<serde_json::Value> },
    /// The answer is complete.
    ResponseFinished { id: String, status: FinishStatus },
    /// The agent reported an error. `fatal`: the session cannot go on and must be reopened.
    Error {
        code: String,
        message: String,
        fatal: bool,
    },
    /// Something this client does not act on (logged, skipped).
    Unknown { kind: String, reason: String },
}

/// Details of a connection the codec may put into its handshake.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    pub token: Option<Secret>,
    /// Wall clock, Unix ms (for `ts` fields).
    pub wall_ms: u64,
}

/// What decoding one frame gave.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub events: Vec<Downlink>,
    /// Frames to send in answer (PONG, released audio after a FLOW_UPDATE, ...).
    pub replies: Vec<Wire>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    /// The frame cannot be understood at all; it was skipped.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Something the client may not send now (no session yet, nothing to cancel).
    #[error("cannot send now: {0}")]
    State(String),
}

/// A codec's counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodecStats {
    /// Our audio chunks dropped (oldest first) because the send queue was over its limit.
    pub dropped_audio_frames: u64,
    /// Frames from the peer dropped as repeats (same envelope `id`, or numeric `seq` already seen).
    pub duplicates_dropped: u64,
    /// Frames from the peer dropped because their run was cancelled.
    pub cancelled_run_frames_dropped: u64,
    /// `REPLAY_REQUEST`s we sent for `seq` gaps.
    pub replay_requests_sent: u64,
    /// Frames from the peer we could not read (each an `Err(Malformed)` or a dropped binary envelope).
    pub malformed: u64,
}

/// A sans-IO protocol codec for one connection. Thread contract: used from one task; never blocks.
pub trait Protocol: Send {
    fn name(&self) -> &'static str;
    /// Frames to send as soon as the connection opens (the handshake). Resets per-connection state.
    fn open(&mut self, now_ms: u64, info: &SessionInfo) -> Vec<Wire>;
    /// Frames for one uplink item. May queue (flow control) and return nothing yet.
    fn encode(&mut self, now_ms: u64, up: Uplink) -> Result<Vec<Wire>, ProtocolError>;
    /// Decode one received frame.
    fn decode(&mut self, now_ms: u64, wire: Wire) -> Result<Decoded, ProtocolError>;
    /// Timers (heartbeats, replay requests): frames to send at `now_ms`.
    fn poll(&mut self, now_ms: u64) -> Vec<Wire>;
    /// When `poll` next has something to do.
    fn next_deadline(&self) -> Option<u64>;
    /// Counters so far.
    fn stats(&self) -> CodecStats {
        CodecStats::default()
    }
    /// Protocols without a server handshake are ready as soon as the socket opens: the session id.
    fn ready_on_open(&self) -> Option<String> {
        None
    }
    /// The protocol has no cancel message and a turn is open (an input sent, its answer not complete):
    /// a barge-in must close the connection (and open a new one) to stop it. Asked before the
    /// `Interrupt` is encoded.
    fn cancel_by_reconnect(&self) -> bool {
        false
    }
    /// Events that timers produced (`poll` returns only frames).
    fn take_events(&mut self) -> Vec<Downlink> {
        Vec::new()
    }
}
