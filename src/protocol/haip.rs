//! HAIP 1.1.2 client codec: spec `haiprotocol/haip@f8dfe4d` (the "D1" dialect), sans-IO.
//!
//! Encode strictly: every frame we build validates against the README envelope schema (UUIDv4 ids,
//! per-connection numeric `seq` from "1", cumulative `ack`, epoch-ms `ts`, no extra keys). Decode
//! leniently: the reference servers' non-numeric `seq`, the later `MESSAGE_*` names, D2's
//! `transaction` field, extra envelope fields, unknown types (-> [`Downlink::Unknown`]). A frame we
//! cannot read at all is an `Err(ProtocolError::Malformed)` that the session logs and skips; the codec
//! keeps working.
//!
//! Conventions where the spec is silent (see `shared/protocols/haip.md`):
//! - **One voice turn = one `message_id` M.** `Uplink::TurnStart` sends `TEXT_MESSAGE_START{M,
//!   author:"user"}` on USER, each `Uplink::Audio` an `AUDIO_CHUNK{M}` on AUDIO_IN, and `TurnEnd` sends
//!   `TEXT_MESSAGE_END{M}` on USER: HAIP has no end-of-audio event, so that END marks the end of the
//!   user's spoken turn. Audio without an open turn opens one; a second `TurnStart` closes the first.
//!   `Uplink::Text` is a START carrying the text plus an END, under a fresh message id.
//! - **Audio MIME.** `audio/opus`: one raw Opus packet per chunk, decoded at 48 kHz (mono unless a
//!   `channels=` parameter says otherwise). `audio/pcm` (little-endian s16) and `audio/L16` (RFC 2586,
//!   big-endian, swapped to little-endian here) take `;rate=N;channels=N`, default 16 kHz mono; we
//!   send bare `audio/pcm` when the chunk is `uplink_rate_hz` mono. `audio/wav`: a whole RIFF file per
//!   chunk. `duration_ms` is a decimal string.
//! - **Binary mode** only when the peer's HAI advertised `binary_frames` and
//!   [`HaipSettings::binary`] allows it: a JSON envelope with `bin_len`/`bin_mime` and no `data`, then
//!   exactly one binary frame; the two always leave together. Otherwise base64 `data`.
//! - **Credit.** The `flow_control` in a HAI is what its *sender grants the peer*, per channel, in
//!   messages and bytes (absent = unlimited). Each frame costs 1 message plus bytes: `bin_len` in binary
//!   mode, the decoded length of base64 audio, the JSON length of any other frame. Our own HAI (sent
//!   before credit is known) is charged when the peer's HAI arrives. What we grant the peer
//!   ([`GRANT_MESSAGES`], [`GRANT_BYTES`]) is topped up with `FLOW_UPDATE` once half is used.
//! - **Send queue.** Frames wait in one bounded FIFO while no peer HAI has arrived, their channel is
//!   paused or out of credit. A frame never overtakes an earlier one on its channel, and the turn frames
//!   (START, audio, END) keep their relative order across USER and AUDIO_IN; `RUN_CANCEL`, PING, PONG
//!   and our control frames may overtake. Over `buffer_limit_bytes` the *oldest audio* is dropped and
//!   counted; turn boundaries, text and `RUN_CANCEL` are never dropped. `seq`, `ts`, `ack` and the
//!   session are stamped when a frame leaves, so queued frames carry the server's session.
//! - **Barge-in.** `Uplink::Interrupt` sends `RUN_CANCEL{run_id}` (envelope `run_id` too) for the most
//!   recent open run; with none open it cancels the *next* run to appear (its `RUN_STARTED` or first
//!   frame tagged with a new `run_id`). Every later frame of a cancelled run is dropped and counted.
//!   The reference server never confirms a cancel, so playback must already be flushed locally.
//! - **Reliability.** De-duplication by envelope `id` (last [`SEEN_IDS`]); numeric `seq` only as a hint:
//!   `<=` the last in-order one is a duplicate, a jump opens a gap that gets one `REPLAY_REQUEST` after
//!   `replay_wait_ms`. `ack` is sent only while the peer's `seq` is numeric. Resume (`last_rx_seq` and
//!   the old session in our HAI) only when the last connection had numeric in-order `seq`s; any other
//!   server session means a fresh start, and `ERROR RESUME_FAILED` forgets the resume point.
//! - **Errors.** `VERSION_INCOMPATIBLE`, `AUTHENTICATION_FAILED`, `RESUME_FAILED` and
//!   `PROTOCOL_VIOLATION` are fatal (reopen); every other code (`INSUFFICIENT_CREDITS`,
//!   `UNSUPPORTED_TYPE` for our PONG, `RUN_NOT_FOUND`, ...) is not. `RUN_ERROR` ends a run, never the
//!   session. With `crit:true`, unknown *envelope* fields make the frame `Unknown` and we answer
//!   `ERROR UNSUPPORTED_TYPE` as the spec requires.
//!
//! Context: the tokio session task; nothing here blocks, sleeps, reads a clock or does I/O.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tracing::{debug, trace, warn};
use uuid::Uuid;

use super::{
    AudioCodec, Decoded, Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState,
    Uplink, Wire,
};

/// The spec version this client implements and advertises.
pub const HAIP_VERSION: &str = "1.1.2";

/// The 22 D1 event types, in spec order: what our HAI accepts.
pub const ACCEPT_EVENTS: [&str; 22] = [
    "HAI",
    "RUN_STARTED",
    "RUN_FINISHED",
    "RUN_CANCEL",
    "RUN_ERROR",
    "PING",
    "PONG",
    "REPLAY_REQUEST",
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_PART",
    "TEXT_MESSAGE_END",
    "AUDIO_CHUNK",
    "TOOL_CALL",
    "TOOL_UPDATE",
    "TOOL_DONE",
    "TOOL_CANCEL",
    "TOOL_LIST",
    "TOOL_SCHEMA",
    "ERROR",
    "FLOW_UPDATE",
    "PAUSE_CHANNEL",
    "RESUME_CHANNEL",
];

/// Messages per channel we grant the peer in our HAI (`initial_credit_messages`).
pub const GRANT_MESSAGES: u64 = 256;
/// Bytes per channel we grant the peer in our HAI (`initial_credit_bytes`).
pub const GRANT_BYTES: u64 = 4 * 1024 * 1024;
/// `ERROR` codes after which the session cannot go on; every other code is non-fatal.
pub const FATAL_ERROR_CODES: [&str; 4] = [
    "VERSION_INCOMPATIBLE",
    "AUTHENTICATION_FAILED",
    "RESUME_FAILED",
    "PROTOCOL_VIOLATION",
];
/// How many envelope ids we remember for de-duplication.
pub const SEEN_IDS: usize = 1024;

/// Our sent frames kept for the peer's REPLAY_REQUEST: this many, for at most `REPLAY_WINDOW_MS`.
const REPLAY_WINDOW_FRAMES: usize = 1000;
const REPLAY_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Out-of-order numeric seqs remembered beyond a gap; past this the oldest gap is given up.
const MAX_AHEAD: usize = 1024;
const MAX_GAPS: usize = 64;
const MAX_RUNS: usize = 64;
const MAX_OPEN_RUNS: usize = 16;
const MAX_TOOL_NAMES: usize = 256;
const MAX_RX_CHANNELS: usize = 32;
/// Queued PING/PONG/FLOW_UPDATE/REPLAY_REQUEST/ERROR/RUN_CANCEL frames; more are dropped (they are
/// answers to the peer, which cannot outgrow this unless the peer misbehaves).
const MAX_QUEUED_CONTROL: usize = 64;
/// Rough envelope size used to account queued non-audio frames against the buffer limit.
const ENVELOPE_OVERHEAD: usize = 256;

const SYSTEM: &str = "SYSTEM";
const USER: &str = "USER";
const AUDIO_IN: &str = "AUDIO_IN";
const CHANNELS: [&str; 5] = ["USER", "AGENT", "SYSTEM", "AUDIO_IN", "AUDIO_OUT"];

/// Envelope fields we know (D1 schema, plus D2's `transaction` and envelope `related_id`).
const ENVELOPE_FIELDS: [&str; 16] = [
    "id",
    "session",
    "seq",
    "ack",
    "ts",
    "channel",
    "type",
    "payload",
    "pv",
    "crit",
    "bin_len",
    "bin_mime",
    "run_id",
    "thread_id",
    "transaction",
    "related_id",
];

/// Base64 as peers actually send it: padding optional.
const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Knobs of the HAIP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaipSettings {
    /// Interval of our protocol `PING` on SYSTEM, counted from `open`; 0 disables it.
    pub ping_interval_ms: u64,
    /// How long a numeric `seq` gap may stay open before we send one `REPLAY_REQUEST`.
    pub replay_wait_ms: u64,
    /// Bytes of frames held while no peer HAI has arrived or a channel is paused or out of credit.
    /// Beyond it the oldest audio chunks are dropped (and counted).
    pub buffer_limit_bytes: usize,
    /// Use binary mode for our audio when the peer's HAI advertises `binary_frames`; also what our
    /// HAI advertises.
    pub binary: bool,
    /// Also put the token in our HAI as `payload.auth = {"token": "Bearer <jwt>"}` (the D2 servers
    /// want it there). Off by default: a strict D1 peer rejects the extra key.
    pub auth_in_hai: bool,
    /// The PCM rate agreed out of band for a bare `audio/pcm`: PCM chunks at this rate (mono) are sent
    /// as `audio/pcm`, others as `audio/pcm;rate=N;channels=N`.
    pub uplink_rate_hz: u32,
}

impl Default for HaipSettings {
    fn default() -> Self {
        HaipSettings {
            ping_interval_ms: 30_000,
            replay_wait_ms: 500,
            // 30 s of 16 kHz s16 PCM; far more of Opus.
            buffer_limit_bytes: 1024 * 1024,
            binary: true,
            auth_in_hai: false,
            uplink_rate_hz: 16_000,
        }
    }
}

/// Counters since the client was created (they survive reconnects).
pub type HaipStats = super::CodecStats;

/// A HAIP 1.1.2 client connection codec. See the module docs for the conventions.
#[derive(Debug)]
pub struct HaipClient {
    settings: HaipSettings,
    stats: HaipStats,
    // Connection clock: `ts` = wall_ms + (now - open_now_ms).
    open_now_ms: u64,
    wall_ms: u64,
    // Send side.
    session: String,
    peer: Option<Peer>,
    next_seq: u64,
    credits: HashMap<&'static str, Credit>,
    paused: HashSet<&'static str>,
    pre_hai_costs: Vec<(&'static str, u64)>,
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    replay: VecDeque<Sent>,
    /// `message_id` of the open voice turn.
    turn: Option<String>,
    // Receive side.
    seen_ids: HashSet<String>,
    seen_order: VecDeque<String>,
    rx_in_order: Option<u64>,
    rx_ahead: BTreeSet<u64>,
    gaps: Vec<Gap>,
    peer_seq_numeric: bool,
    pending_bin: Option<PendingBinary>,
    rx_used: HashMap<String, (u64, u64)>,
    last_rx_ms: Option<u64>,
    last_pong_ms: Option<u64>,
    tool_names: VecDeque<(String, String)>,
    // Runs.
    known_runs: VecDeque<String>,
    open_runs: VecDeque<String>,
    cancelled_runs: VecDeque<String>,
    cancel_next: bool,
    /// A user turn (or text) was sent and no run has started since: an answer is on its way.
    answer_due: bool,
    // Timers.
    next_ping_ms: Option<u64>,
    ping_counter: u64,
    // Resume: the point of the last connection, and the one presented in this connection's HAI.
    resume: Option<ResumePoint>,
    resuming: Option<ResumePoint>,
}

/// What the peer's HAI told us.
#[derive(Debug, Clone)]
struct Peer {
    binary: bool,
    /// Initial send credit per channel.
    initial: Credit,
    /// `accept_events`; `None` when absent or empty (then anything goes).
    accepts: Option<HashSet<String>>,
}

impl Peer {
    fn accepts(&self, ty: &str) -> bool {
        let Some(set) = &self.accepts else {
            return true;
        };
        // A D1' peer may list the MESSAGE_* names for our TEXT_MESSAGE_* frames.
        set.contains(ty)
            || ty
                .strip_prefix("TEXT_")
                .is_some_and(|alias| set.contains(alias))
    }
}

/// Send credit on one channel; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Credit {
    messages: Option<u64>,
    bytes: Option<u64>,
}

impl Credit {
    fn allows(&self, cost_bytes: u64) -> bool {
        self.messages.is_none_or(|m| m >= 1) && self.bytes.is_none_or(|b| b >= cost_bytes)
    }
    fn charge(&mut self, cost_bytes: u64) {
        if let Some(m) = &mut self.messages {
            *m = m.saturating_sub(1);
        }
        if let Some(b) = &mut self.bytes {
            *b = b.saturating_sub(cost_bytes);
        }
    }
    fn add(&mut self, messages: u64, bytes: u64) {
        if let Some(m) = &mut self.messages {
            *m = m.saturating_add(messages);
        }
        if let Some(b) = &mut self.bytes {
            *b = b.saturating_add(bytes);
        }
    }
}

/// Why a frame is queued; decides ordering, dropping and what survives a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    TurnStart,
    TurnEnd,
    Audio,
    Text,
    Cancel,
    Ping,
    Pong,
    Control,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Ordered with every earlier turn frame and every earlier frame on its channel.
    Turn,
    /// Ordered with every earlier frame on its channel.
    Free,
    /// May overtake anything.
    Priority,
}

impl Kind {
    fn lane(self) -> Lane {
        match self {
            Kind::TurnStart | Kind::TurnEnd | Kind::Audio => Lane::Turn,
            Kind::Text => Lane::Free,
            Kind::Cancel | Kind::Ping | Kind::Pong | Kind::Control => Lane::Priority,
        }
    }
    /// User content outlives the connection; answers to the old peer do not.
    fn survives_reconnect(self) -> bool {
        matches!(
            self,
            Kind::TurnStart | Kind::TurnEnd | Kind::Audio | Kind::Text
        )
    }
}

#[derive(Debug)]
enum Body {
    Event {
        ty: &'static str,
        payload: Value,
        run_id: Option<String>,
    },
    Audio {
        message_id: String,
        mime: String,
        duration_ms: Option<u64>,
        data: Vec<u8>,
    },
}

/// A frame waiting to leave. Envelope fields are stamped when it does.
#[derive(Debug)]
struct Pending {
    channel: &'static str,
    kind: Kind,
    /// Bytes it holds against `buffer_limit_bytes`.
    size: usize,
    body: Body,
}

impl Pending {
    fn event(channel: &'static str, kind: Kind, ty: &'static str, payload: Value) -> Self {
        let size = ENVELOPE_OVERHEAD + serde_json::to_string(&payload).map_or(0, |s| s.len());
        Pending {
            channel,
            kind,
            size,
            body: Body::Event {
                ty,
                payload,
                run_id: None,
            },
        }
    }
    fn ty(&self) -> &'static str {
        match &self.body {
            Body::Event { ty, .. } => ty,
            Body::Audio { .. } => "AUDIO_CHUNK",
        }
    }
    fn message_id(&self) -> Option<&str> {
        match &self.body {
            Body::Event { payload, .. } => payload.get("message_id").and_then(Value::as_str),
            Body::Audio { message_id, .. } => Some(message_id),
        }
    }
}

/// One of our frames in the replay window.
#[derive(Debug)]
struct Sent {
    seq: u64,
    at_ms: u64,
    channel: &'static str,
    cost: u64,
    wires: Vec<Wire>,
}

/// Numeric seqs `from..=to` not yet received.
#[derive(Debug, Clone, Copy)]
struct Gap {
    from: u64,
    to: u64,
    due_ms: u64,
    requested: bool,
}

/// A `bin_len` envelope waiting for its binary frame. `mime: None`: swallow the bytes.
#[derive(Debug)]
struct PendingBinary {
    ty: String,
    bin_len: usize,
    mime: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ResumePoint {
    session: String,
    last_rx_seq: u64,
}

/// The envelope as we send it; field order follows the spec table.
#[derive(Serialize)]
struct OutEnvelope<'a> {
    id: String,
    session: &'a str,
    seq: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<String>,
    ts: String,
    channel: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bin_len: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bin_mime: Option<&'a str>,
    payload: &'a Value,
}

fn malformed(reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed(reason.into())
}

fn new_id() -> String {
    Uuid::new_v4().to_string()
}

/// The schema's `uuid` pattern: hyphenated, version 1-5, RFC 4122 variant.
fn is_schema_uuid(s: &str) -> bool {
    s.len() == 36
        && Uuid::try_parse(s).is_ok_and(|u| {
            matches!(u.get_version_num(), 1..=5) && u.get_variant() == uuid::Variant::RFC4122
        })
}

fn push_bounded(list: &mut VecDeque<String>, item: String, cap: usize) {
    list.push_back(item);
    while list.len() > cap {
        list.pop_front();
    }
}

/// D1 type for a received `type`, accepting the D1' `MESSAGE_*` names.
fn canonical_type(ty: &str) -> Option<&'static str> {
    match ty {
        "MESSAGE_START" => Some("TEXT_MESSAGE_START"),
        "MESSAGE_PART" => Some("TEXT_MESSAGE_PART"),
        "MESSAGE_END" => Some("TEXT_MESSAGE_END"),
        other => ACCEPT_EVENTS.iter().copied().find(|e| *e == other),
    }
}

/// One of our channel names for a channel the peer names ("audio-in" as in the README = AUDIO_IN).
fn known_channel(name: &str) -> Option<&'static str> {
    let norm: String = name
        .trim()
        .chars()
        .map(|c| {
            if c == '-' {
                '_'
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect();
    CHANNELS.iter().copied().find(|c| *c == norm)
}

/// A numeric `seq`: the schema's uint64 string, or (leniently) a JSON integer.
fn parse_seq(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(s)
            if (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            s.parse().ok()
        }
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn req_str<'a>(p: &'a Map<String, Value>, key: &str, ty: &str) -> Result<&'a str, ProtocolError> {
    match p.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(malformed(format!(
            "{ty} {key} is {}, not a string",
            json_type(other)
        ))),
        None => Err(malformed(format!("{ty} without {key}"))),
    }
}

fn opt_str<'a>(
    p: &'a Map<String, Value>,
    key: &str,
    ty: &str,
) -> Result<Option<&'a str>, ProtocolError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => req_str(p, key, ty).map(Some),
    }
}

fn opt_u64(p: &Map<String, Value>, key: &str, ty: &str) -> Result<Option<u64>, ProtocolError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| malformed(format!("{ty} {key} is not a non-negative integer"))),
    }
}

/// A uint64 field sent as a string (or, leniently, a number).
fn opt_seq_field(
    p: &Map<String, Value>,
    key: &str,
    ty: &str,
) -> Result<Option<u64>, ProtocolError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        v => parse_seq(v)
            .map(Some)
            .ok_or_else(|| malformed(format!("{ty} {key} is not a uint64 string"))),
    }
}

/// Decoded length of a base64 string, for credit accounting before decoding.
fn b64_decoded_len(s: &str) -> u64 {
    let body = s.trim_end_matches('=').len() as u64;
    body * 3 / 4
}

/// `(rate_hz, channels)` from a WAV file's `fmt ` chunk.
fn wav_format(b: &[u8]) -> Option<(u32, u16)> {
    if b.get(0..4)? != b"RIFF" || b.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut pos = 12usize;
    loop {
        let id = b.get(pos..pos + 4)?;
        let size = u32::from_le_bytes(b.get(pos + 4..pos + 8)?.try_into().ok()?) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            let channels = u16::from_le_bytes(b.get(body + 2..body + 4)?.try_into().ok()?);
            let rate = u32::from_le_bytes(b.get(body + 4..body + 8)?.try_into().ok()?);
            return Some((rate, channels));
        }
        // Chunks are padded to even sizes.
        pos = body.checked_add(size)?.checked_add(size & 1)?;
    }
}

/// Agent audio for a MIME type (see the module docs for the conventions).
fn audio_downlink(mime: &str, mut data: Vec<u8>) -> Result<Downlink, ProtocolError> {
    let mut parts = mime.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let (mut rate, mut channels) = (None, None);
    for param in parts {
        if let Some((k, v)) = param.split_once('=') {
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "rate" => rate = Some(v),
                "channels" => channels = Some(v),
                _ => {}
            }
        }
    }
    let rate_hz = match rate {
        None => 16_000,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|r| (1..=384_000).contains(r))
            .ok_or_else(|| malformed(format!("audio mime {mime:?}: bad rate")))?,
    };
    let channels = match channels {
        None => 1,
        Some(v) => v
            .parse::<u16>()
            .ok()
            .filter(|c| (1..=8).contains(c))
            .ok_or_else(|| malformed(format!("audio mime {mime:?}: bad channels")))?,
    };
    match essence.as_str() {
        "audio/opus" => Ok(Downlink::Audio {
            codec: AudioCodec::Opus,
            rate_hz: 48_000,
            channels,
            data,
        }),
        "audio/pcm" | "audio/l16" => {
            if !data.len().is_multiple_of(2 * usize::from(channels)) {
                return Err(malformed(format!(
                    "{} bytes of {mime} is not whole {channels}-channel s16 frames",
                    data.len()
                )));
            }
            if essence == "audio/l16" {
                // RFC 2586: network byte order.
                for pair in data.chunks_exact_mut(2) {
                    pair.swap(0, 1);
                }
            }
            Ok(Downlink::Audio {
                codec: AudioCodec::Pcm16,
                rate_hz,
                channels,
                data,
            })
        }
        "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => {
            let (rate_hz, channels) = wav_format(&data)
                .ok_or_else(|| malformed("audio/wav chunk without a RIFF/WAVE fmt header"))?;
            Ok(Downlink::Audio {
                codec: AudioCodec::Wav,
                rate_hz,
                channels,
                data,
            })
        }
        _ => Ok(Downlink::Unknown {
            kind: "AUDIO_CHUNK".into(),
            reason: format!("unsupported audio mime {mime:?}"),
        }),
    }
}

impl HaipClient {
    pub fn new(settings: HaipSettings) -> Self {
        HaipClient {
            settings,
            stats: HaipStats::default(),
            open_now_ms: 0,
            wall_ms: 0,
            session: new_id(),
            peer: None,
            next_seq: 1,
            credits: HashMap::new(),
            paused: HashSet::new(),
            pre_hai_costs: Vec::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            replay: VecDeque::new(),
            turn: None,
            seen_ids: HashSet::new(),
            seen_order: VecDeque::new(),
            rx_in_order: None,
            rx_ahead: BTreeSet::new(),
            gaps: Vec::new(),
            peer_seq_numeric: false,
            pending_bin: None,
            rx_used: HashMap::new(),
            last_rx_ms: None,
            last_pong_ms: None,
            tool_names: VecDeque::new(),
            known_runs: VecDeque::new(),
            open_runs: VecDeque::new(),
            cancelled_runs: VecDeque::new(),
            cancel_next: false,
            answer_due: false,
            next_ping_ms: None,
            ping_counter: 0,
            resume: None,
            resuming: None,
        }
    }

    pub fn settings(&self) -> &HaipSettings {
        &self.settings
    }

    pub fn stats(&self) -> HaipStats {
        self.stats
    }

    /// The session our frames carry: the server's once its HAI arrived, else a local (or resumed) id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The peer's HAI has arrived on this connection.
    pub fn is_ready(&self) -> bool {
        self.peer.is_some()
    }

    /// Frames waiting in the send queue, and the bytes they hold against `buffer_limit_bytes`.
    pub fn queued_frames(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// When the last frame (of any kind) and the last PONG arrived, in `now_ms` time.
    pub fn last_rx_ms(&self) -> Option<u64> {
        self.last_rx_ms
    }

    pub fn last_pong_ms(&self) -> Option<u64> {
        self.last_pong_ms
    }

    /// The run an `Interrupt` would cancel now.
    pub fn open_run(&self) -> Option<&str> {
        self.open_runs.back().map(String::as_str)
    }

    fn ts(&self, now_ms: u64) -> u64 {
        self.wall_ms
            .saturating_add(now_ms.saturating_sub(self.open_now_ms))
    }

    fn ack(&self) -> Option<u64> {
        if self.peer_seq_numeric {
            self.rx_in_order
        } else {
            None
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn envelope(
        &self,
        seq: u64,
        now_ms: u64,
        channel: &str,
        ty: &str,
        payload: &Value,
        run_id: Option<&str>,
        bin: Option<(usize, &str)>,
    ) -> Option<String> {
        let env = OutEnvelope {
            id: new_id(),
            session: &self.session,
            seq: seq.to_string(),
            ack: self.ack().map(|a| a.to_string()),
            ts: self.ts(now_ms).to_string(),
            channel,
            ty,
            run_id,
            bin_len: bin.map(|b| b.0),
            bin_mime: bin.map(|b| b.1),
            payload,
        };
        match serde_json::to_string(&env) {
            Ok(s) => Some(s),
            Err(e) => {
                // Unreachable: strings and JSON values only.
                warn!(error = %e, ty, "haip: cannot serialize a frame; dropped");
                None
            }
        }
    }

    fn credit_mut(&mut self, channel: &'static str) -> &mut Credit {
        let initial = self.peer.as_ref().map(|p| p.initial).unwrap_or_default();
        self.credits.entry(channel).or_insert(initial)
    }

    fn peer_accepts(&self, ty: &str) -> bool {
        self.peer.as_ref().is_none_or(|p| p.accepts(ty))
    }

    fn check_accepts(&self, ty: &str) -> Result<(), ProtocolError> {
        if self.peer_accepts(ty) {
            Ok(())
        } else {
            Err(ProtocolError::State(format!(
                "the agent's HAI does not accept {ty}"
            )))
        }
    }

    // ---------------------------------------------------------------- send queue

    fn enqueue(&mut self, p: Pending) {
        if !p.kind.survives_reconnect()
            && p.kind != Kind::Cancel
            && self
                .queue
                .iter()
                .filter(|q| !q.kind.survives_reconnect())
                .count()
                >= MAX_QUEUED_CONTROL
        {
            debug!(ty = p.ty(), "haip: control queue full; frame dropped");
            return;
        }
        self.queued_bytes += p.size;
        self.queue.push_back(p);
    }

    /// Hold at most `buffer_limit_bytes`: drop the oldest audio. Runs after a release, so a frame
    /// that leaves at once (a `RUN_CANCEL` while audio is paused) never pushes audio out.
    fn trim_queue(&mut self) {
        while self.queued_bytes > self.settings.buffer_limit_bytes {
            let Some(i) = self.queue.iter().position(|q| q.kind == Kind::Audio) else {
                break;
            };
            self.remove_queued(i);
            self.stats.dropped_audio_frames += 1;
            trace!("haip: send queue over its limit; oldest audio chunk dropped");
        }
    }

    fn remove_queued(&mut self, i: usize) -> Option<Pending> {
        let p = self.queue.remove(i)?;
        self.queued_bytes = self.queued_bytes.saturating_sub(p.size);
        Some(p)
    }

    /// Send what may go now, in queue order subject to the lane rules.
    fn release(&mut self, now_ms: u64) -> Vec<Wire> {
        let out = self.release_in_order(now_ms);
        self.trim_queue();
        out
    }

    fn release_in_order(&mut self, now_ms: u64) -> Vec<Wire> {
        let mut out = Vec::new();
        if self.peer.is_none() {
            return out;
        }
        let mut blocked: Vec<&'static str> = Vec::new();
        let mut turn_blocked = false;
        let mut i = 0;
        while i < self.queue.len() {
            let (channel, kind, ty) = {
                let p = &self.queue[i];
                (p.channel, p.kind, p.ty())
            };
            let lane = kind.lane();
            let in_order = match lane {
                Lane::Priority => true,
                Lane::Free => !blocked.contains(&channel),
                Lane::Turn => !turn_blocked && !blocked.contains(&channel),
            };
            if in_order && !self.paused.contains(channel) {
                if !self.peer_accepts(ty) {
                    warn!(
                        ty,
                        "haip: the agent does not accept this event type; frame dropped"
                    );
                    self.remove_queued(i);
                    continue;
                }
                if let Some(wires) = self.try_send(i, now_ms) {
                    out.extend(wires);
                    continue;
                }
            }
            if lane != Lane::Priority && !blocked.contains(&channel) {
                blocked.push(channel);
            }
            if lane == Lane::Turn {
                turn_blocked = true;
            }
            i += 1;
        }
        out
    }

    /// Stamp and send queue entry `i` if its channel has the credit.
    fn try_send(&mut self, i: usize, now_ms: u64) -> Option<Vec<Wire>> {
        let seq = self.next_seq;
        let binary = self.settings.binary && self.peer.as_ref().is_some_and(|p| p.binary);
        let p = self.queue.get(i)?;
        let channel = p.channel;
        let (text, cost, with_binary) = match &p.body {
            Body::Event {
                ty,
                payload,
                run_id,
            } => {
                let text =
                    self.envelope(seq, now_ms, channel, ty, payload, run_id.as_deref(), None)?;
                let cost = text.len() as u64;
                (text, cost, false)
            }
            Body::Audio {
                message_id,
                mime,
                duration_ms,
                data,
            } => {
                let mut payload = Map::new();
                payload.insert("message_id".into(), json!(message_id));
                payload.insert("mime".into(), json!(mime));
                if !binary {
                    payload.insert("data".into(), json!(STANDARD.encode(data)));
                }
                if let Some(d) = duration_ms {
                    payload.insert("duration_ms".into(), json!(d.to_string()));
                }
                let bin = binary.then_some((data.len(), mime.as_str()));
                let payload = Value::Object(payload);
                let text =
                    self.envelope(seq, now_ms, channel, "AUDIO_CHUNK", &payload, None, bin)?;
                (text, data.len() as u64, binary)
            }
        };
        let credit = self.credit_mut(channel);
        if !credit.allows(cost) {
            return None;
        }
        credit.charge(cost);
        self.next_seq += 1;
        let p = self.remove_queued(i)?;
        trace!(seq, channel, ty = p.ty(), "haip: send");
        let mut wires = vec![Wire::Text(text)];
        if with_binary && let Body::Audio { data, .. } = p.body {
            wires.push(Wire::Binary(data));
        }
        self.remember_sent(seq, now_ms, channel, cost, &wires);
        Some(wires)
    }

    fn remember_sent(
        &mut self,
        seq: u64,
        now_ms: u64,
        channel: &'static str,
        cost: u64,
        wires: &[Wire],
    ) {
        self.replay.push_back(Sent {
            seq,
            at_ms: now_ms,
            channel,
            cost,
            wires: wires.to_vec(),
        });
        self.prune_replay(now_ms);
    }

    fn prune_replay(&mut self, now_ms: u64) {
        while self.replay.len() > REPLAY_WINDOW_FRAMES
            || self
                .replay
                .front()
                .is_some_and(|s| s.at_ms.saturating_add(REPLAY_WINDOW_MS) < now_ms)
        {
            self.replay.pop_front();
        }
    }

    fn queue_error(&mut self, code: &str, message: &str, related_id: Option<&str>) {
        let mut payload = json!({ "code": code, "message": message });
        if let (Some(id), Value::Object(m)) =
            (related_id.filter(|id| is_schema_uuid(id)), &mut payload)
        {
            m.insert("related_id".into(), json!(id));
        }
        self.enqueue(Pending::event(SYSTEM, Kind::Control, "ERROR", payload));
    }

    fn queue_pong(&mut self, nonce: Option<&str>) {
        // Only the latest answer matters if SYSTEM is stalled.
        while let Some(i) = self.queue.iter().position(|p| p.kind == Kind::Pong) {
            self.remove_queued(i);
        }
        let payload = match nonce {
            Some(n) => json!({ "nonce": n }),
            None => json!({}),
        };
        self.enqueue(Pending::event(SYSTEM, Kind::Pong, "PONG", payload));
    }

    /// Grant the peer more credit on `channel`, merging with a grant still queued.
    fn queue_flow_update(&mut self, channel: &str, messages: u64, bytes: u64) {
        let (messages, bytes) = (messages.max(1), bytes.max(1));
        for p in self.queue.iter_mut() {
            if let Body::Event { ty, payload, .. } = &mut p.body
                && *ty == "FLOW_UPDATE"
                && payload.get("channel").and_then(Value::as_str) == Some(channel)
            {
                if let Value::Object(m) = payload {
                    let old_m = m.get("add_messages").and_then(Value::as_u64).unwrap_or(0);
                    let old_b = m.get("add_bytes").and_then(Value::as_u64).unwrap_or(0);
                    m.insert("add_messages".into(), json!(old_m.saturating_add(messages)));
                    m.insert("add_bytes".into(), json!(old_b.saturating_add(bytes)));
                }
                return;
            }
        }
        let payload = json!({ "channel": channel, "add_messages": messages, "add_bytes": bytes });
        self.enqueue(Pending::event(
            SYSTEM,
            Kind::Control,
            "FLOW_UPDATE",
            payload,
        ));
    }

    // ---------------------------------------------------------------- uplink

    fn start_turn(&mut self) -> String {
        let id = new_id();
        self.enqueue(Pending::event(
            USER,
            Kind::TurnStart,
            "TEXT_MESSAGE_START",
            json!({ "message_id": id, "author": "user" }),
        ));
        self.turn = Some(id.clone());
        id
    }

    fn end_turn(&mut self) -> Result<(), ProtocolError> {
        let Some(id) = self.turn.take() else {
            return Err(ProtocolError::State("TurnEnd without an open turn".into()));
        };
        self.enqueue(Pending::event(
            USER,
            Kind::TurnEnd,
            "TEXT_MESSAGE_END",
            json!({ "message_id": id }),
        ));
        self.answer_due = true;
        Ok(())
    }

    fn uplink_mime(&self, codec: AudioCodec, rate_hz: u32, channels: u16) -> String {
        match codec {
            AudioCodec::Opus => "audio/opus".into(),
            AudioCodec::Wav => "audio/wav".into(),
            AudioCodec::Pcm16 if rate_hz == self.settings.uplink_rate_hz && channels == 1 => {
                "audio/pcm".into()
            }
            AudioCodec::Pcm16 => format!("audio/pcm;rate={rate_hz};channels={channels}"),
        }
    }

    fn cancel_run(&mut self, run_id: String) {
        self.open_runs.retain(|r| *r != run_id);
        debug!(run_id, "haip: cancelling run");
        let mut p = Pending::event(
            USER,
            Kind::Cancel,
            "RUN_CANCEL",
            json!({ "run_id": run_id }),
        );
        if let Body::Event { run_id: r, .. } = &mut p.body {
            *r = Some(run_id.clone());
        }
        push_bounded(&mut self.cancelled_runs, run_id, MAX_RUNS);
        self.enqueue(p);
    }

    // ---------------------------------------------------------------- downlink

    fn remember_id(&mut self, id: &str) -> bool {
        if self.seen_ids.contains(id) {
            return false;
        }
        self.seen_ids.insert(id.to_owned());
        self.seen_order.push_back(id.to_owned());
        while self.seen_order.len() > SEEN_IDS {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen_ids.remove(&old);
            }
        }
        true
    }

    fn update_resume_point(&mut self) {
        if let (Some(last), true) = (self.rx_in_order, self.peer.is_some()) {
            self.resume = Some(ResumePoint {
                session: self.session.clone(),
                last_rx_seq: last,
            });
        }
    }

    /// Track a numeric seq from the peer; `false` = a duplicate to drop.
    fn accept_seq(&mut self, now_ms: u64, s: u64) -> bool {
        let Some(last) = self.rx_in_order else {
            self.rx_in_order = Some(s);
            self.update_resume_point();
            return true;
        };
        if s <= last {
            return false;
        }
        if s == last + 1 {
            self.advance_to(s);
            return true;
        }
        let max_seen = self.rx_ahead.last().copied().unwrap_or(last).max(last);
        if !self.rx_ahead.insert(s) {
            return false;
        }
        if s > max_seen + 1 {
            debug!(from = max_seen + 1, to = s - 1, "haip: seq gap");
            self.gaps.push(Gap {
                from: max_seen + 1,
                to: s - 1,
                due_ms: now_ms.saturating_add(self.settings.replay_wait_ms),
                requested: false,
            });
        }
        while self.rx_ahead.len() > MAX_AHEAD || self.gaps.len() > MAX_GAPS {
            self.skip_first_gap();
        }
        true
    }

    fn advance_to(&mut self, s: u64) {
        let mut last = s;
        while last < u64::MAX && self.rx_ahead.remove(&(last + 1)) {
            last += 1;
        }
        self.rx_in_order = Some(last);
        self.gaps.retain(|g| g.to > last);
        for g in &mut self.gaps {
            g.from = g.from.max(last.saturating_add(1));
        }
        self.update_resume_point();
    }

    /// Give up on the oldest missing range: deliver-order resumes at the next seq we hold.
    fn skip_first_gap(&mut self) {
        match self.rx_ahead.pop_first() {
            Some(first) => self.advance_to(first),
            None => self.gaps.clear(),
        }
    }

    /// Charge what the peer sent against the credit we granted; top it up at half use.
    fn account_rx(&mut self, channel: &str, cost: u64) {
        if channel.is_empty()
            || (!self.rx_used.contains_key(channel) && self.rx_used.len() >= MAX_RX_CHANNELS)
        {
            return;
        }
        let used = self.rx_used.entry(channel.to_owned()).or_default();
        used.0 += 1;
        used.1 = used.1.saturating_add(cost);
        if used.0 >= GRANT_MESSAGES / 2 || used.1 >= GRANT_BYTES / 2 {
            let (m, b) = std::mem::take(used);
            self.queue_flow_update(channel, m, b);
        }
    }

    /// Decide about a frame tagged with `run_id`; `true` = drop it (cancelled run).
    fn screen_run(&mut self, run_id: &str) -> bool {
        if self.cancelled_runs.iter().any(|r| r == run_id) {
            self.stats.cancelled_run_frames_dropped += 1;
            return true;
        }
        if !self.known_runs.iter().any(|r| r == run_id) {
            push_bounded(&mut self.known_runs, run_id.to_owned(), MAX_RUNS);
            self.answer_due = false;
            if self.cancel_next {
                // The user barged in before this run existed.
                self.cancel_next = false;
                self.cancel_run(run_id.to_owned());
                self.stats.cancelled_run_frames_dropped += 1;
                return true;
            }
            push_bounded(&mut self.open_runs, run_id.to_owned(), MAX_OPEN_RUNS);
        }
        false
    }

    fn close_run(&mut self, run_id: Option<&str>) {
        if let Some(r) = run_id {
            self.open_runs.retain(|o| o != r);
        }
    }

    fn tool_name(&self, call_id: &str) -> String {
        self.tool_names
            .iter()
            .rev()
            .find(|(c, _)| c == call_id)
            .map(|(_, n)| n.clone())
            .unwrap_or_default()
    }

    fn decode_binary(&mut self, bytes: Vec<u8>, out: &mut Decoded) -> Result<(), ProtocolError> {
        let Some(p) = self.pending_bin.take() else {
            return Err(malformed(format!(
                "binary frame of {} bytes without a bin_len envelope before it",
                bytes.len()
            )));
        };
        if bytes.len() != p.bin_len {
            return Err(malformed(format!(
                "binary frame of {} bytes after a {} envelope announcing bin_len {}; both dropped",
                bytes.len(),
                p.ty,
                p.bin_len
            )));
        }
        if let Some(mime) = p.mime {
            out.events.push(audio_downlink(&mime, bytes)?);
        }
        Ok(())
    }

    fn decode_text(
        &mut self,
        now_ms: u64,
        text: &str,
        out: &mut Decoded,
    ) -> Result<(), ProtocolError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
        let Value::Object(env) = value else {
            return Err(malformed(format!(
                "frame is {}, not a JSON object",
                json_type(&value)
            )));
        };
        let ty = match env.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(other) => {
                return Err(malformed(format!(
                    "type is {}, not a string",
                    json_type(other)
                )));
            }
            None => return Err(malformed("frame without type")),
        };
        let kind = canonical_type(ty);
        let channel = env
            .get("channel")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let bin_len = match env.get("bin_len") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| malformed("bin_len is not a non-negative integer"))?,
            ),
        };
        let inline_data = env.get("payload").and_then(|p| p.get("data"));
        // Binary mode: the next frame belongs to this envelope whatever becomes of it (dropped as a
        // duplicate, as cancelled, or malformed), so arm the wait before any early return.
        if let (Some(n), None) = (bin_len, inline_data) {
            self.pending_bin = Some(PendingBinary {
                ty: ty.to_owned(),
                bin_len: n,
                mime: None,
            });
        }
        let rx_cost = match (bin_len, inline_data.and_then(Value::as_str)) {
            (_, Some(d)) => b64_decoded_len(d),
            (Some(n), None) => n as u64,
            (None, None) => text.len() as u64,
        };
        self.account_rx(channel, rx_cost);

        let id = env.get("id").and_then(Value::as_str);
        if let Some(id) = id
            && !self.remember_id(id)
        {
            self.stats.duplicates_dropped += 1;
            trace!(id, ty, "haip: duplicate id dropped");
            return Ok(());
        }
        let seq = parse_seq(env.get("seq"));
        let is_hai = kind == Some("HAI");
        // The peer's HAI re-bases the sequence instead (see on_hai).
        if !is_hai {
            self.peer_seq_numeric = seq.is_some();
            if let Some(s) = seq
                && !self.accept_seq(now_ms, s)
            {
                self.stats.duplicates_dropped += 1;
                trace!(seq = s, ty, "haip: duplicate seq dropped");
                return Ok(());
            }
        }
        if env.get("crit") == Some(&Value::Bool(true)) {
            let unknown: Vec<&str> = env
                .keys()
                .map(String::as_str)
                .filter(|k| !ENVELOPE_FIELDS.contains(k))
                .collect();
            if !unknown.is_empty() {
                let reason = format!("crit envelope with unknown field(s) {}", unknown.join(", "));
                self.queue_error("UNSUPPORTED_TYPE", &reason, id);
                out.events.push(Downlink::Unknown {
                    kind: ty.to_owned(),
                    reason,
                });
                return Ok(());
            }
        }
        let Some(kind) = kind else {
            out.events.push(Downlink::Unknown {
                kind: ty.to_owned(),
                reason: "unknown event type".into(),
            });
            return Ok(());
        };
        let empty = Map::new();
        let payload = match env.get("payload") {
            None => &empty,
            Some(Value::Object(p)) => p,
            Some(other) => {
                return Err(malformed(format!(
                    "{kind} payload is {}, not an object",
                    json_type(other)
                )));
            }
        };
        let run_id = env.get("run_id").and_then(Value::as_str).or_else(|| {
            kind.starts_with("RUN_")
                .then(|| payload.get("run_id").and_then(Value::as_str))
                .flatten()
        });
        if !is_hai
            && let Some(r) = run_id.filter(|r| !r.is_empty())
            && self.screen_run(r)
        {
            trace!(run_id = r, ty, "haip: frame of a cancelled run dropped");
            return Ok(());
        }

        match kind {
            "HAI" => {
                let session = env.get("session").and_then(Value::as_str);
                self.on_hai(session, payload, seq, out);
            }
            "RUN_STARTED" => out.events.push(Downlink::ResponseStarted {
                id: run_id.unwrap_or_default().to_owned(),
            }),
            "RUN_FINISHED" => {
                let status = match opt_str(payload, "status", kind)? {
                    Some("CANCELLED") => FinishStatus::Cancelled,
                    Some("ERROR") => FinishStatus::Error,
                    _ => FinishStatus::Ok,
                };
                self.close_run(run_id);
                out.events.push(Downlink::ResponseFinished {
                    id: run_id.unwrap_or_default().to_owned(),
                    status,
                });
            }
            "RUN_ERROR" => {
                let code = opt_str(payload, "code", kind)?.unwrap_or("RUN_ERROR");
                let message = opt_str(payload, "message", kind)?.unwrap_or_default();
                self.close_run(run_id);
                out.events.push(Downlink::Error {
                    code: code.to_owned(),
                    message: message.to_owned(),
                    fatal: false,
                });
                out.events.push(Downlink::ResponseFinished {
                    id: run_id.unwrap_or_default().to_owned(),
                    status: FinishStatus::Error,
                });
            }
            "PING" => {
                let nonce = opt_str(payload, "nonce", kind)?;
                self.queue_pong(nonce);
            }
            "PONG" => self.last_pong_ms = Some(now_ms),
            "REPLAY_REQUEST" => self.on_replay_request(now_ms, payload, out)?,
            "TEXT_MESSAGE_START" => {
                let message_id = req_str(payload, "message_id", kind)?;
                if let Some(text) = opt_str(payload, "text", kind)?.filter(|t| !t.is_empty()) {
                    out.events.push(Downlink::TextDelta {
                        message_id: message_id.to_owned(),
                        text: text.to_owned(),
                    });
                }
            }
            "TEXT_MESSAGE_PART" => {
                let message_id = req_str(payload, "message_id", kind)?;
                let text = req_str(payload, "text", kind)?;
                if !text.is_empty() {
                    out.events.push(Downlink::TextDelta {
                        message_id: message_id.to_owned(),
                        text: text.to_owned(),
                    });
                }
            }
            "TEXT_MESSAGE_END" => {
                let message_id = req_str(payload, "message_id", kind)?;
                out.events.push(Downlink::TextDone {
                    message_id: message_id.to_owned(),
                });
            }
            "AUDIO_CHUNK" => self.on_audio(&env, payload, out)?,
            "TOOL_CALL" | "TOOL_UPDATE" | "TOOL_DONE" => {
                let call_id = req_str(payload, "call_id", kind)?;
                let (name, state) = match kind {
                    "TOOL_CALL" => {
                        let tool = req_str(payload, "tool", kind)?;
                        self.tool_names
                            .push_back((call_id.to_owned(), tool.to_owned()));
                        while self.tool_names.len() > MAX_TOOL_NAMES {
                            self.tool_names.pop_front();
                        }
                        (tool.to_owned(), ToolState::Started)
                    }
                    "TOOL_UPDATE" => (self.tool_name(call_id), ToolState::Progress),
                    _ => (self.tool_name(call_id), ToolState::Done),
                };
                out.events.push(Downlink::Tool {
                    call_id: call_id.to_owned(),
                    name,
                    state,
                });
            }
            "ERROR" => {
                let code = req_str(payload, "code", kind)?;
                let message = opt_str(payload, "message", kind)?.unwrap_or_default();
                match code {
                    // Our gap requests cannot be served: stop waiting for those seqs.
                    "REPLAY_TOO_OLD" => {
                        while !self.gaps.is_empty() {
                            self.skip_first_gap();
                        }
                    }
                    "RESUME_FAILED" => {
                        self.resume = None;
                        self.resuming = None;
                    }
                    _ => {}
                }
                out.events.push(Downlink::Error {
                    code: code.to_owned(),
                    message: message.to_owned(),
                    fatal: FATAL_ERROR_CODES.contains(&code),
                });
            }
            "FLOW_UPDATE" => {
                let ch = req_str(payload, "channel", kind)?;
                let messages = opt_u64(payload, "add_messages", kind)?.unwrap_or(0);
                let bytes = opt_u64(payload, "add_bytes", kind)?.unwrap_or(0);
                match known_channel(ch) {
                    Some(c) => {
                        debug!(channel = c, messages, bytes, "haip: credit granted");
                        self.credit_mut(c).add(messages, bytes);
                    }
                    None => debug!(channel = ch, "haip: credit for a channel we do not use"),
                }
            }
            "PAUSE_CHANNEL" | "RESUME_CHANNEL" => {
                let ch = req_str(payload, "channel", kind)?;
                match known_channel(ch) {
                    Some(c) if kind == "PAUSE_CHANNEL" => {
                        debug!(channel = c, "haip: channel paused by the agent");
                        self.paused.insert(c);
                    }
                    Some(c) => {
                        debug!(channel = c, "haip: channel resumed by the agent");
                        self.paused.remove(c);
                    }
                    None => debug!(
                        channel = ch,
                        "haip: pause/resume of a channel we do not use"
                    ),
                }
            }
            // RUN_CANCEL, TOOL_CANCEL, TOOL_LIST, TOOL_SCHEMA.
            other => out.events.push(Downlink::Unknown {
                kind: other.to_owned(),
                reason: "not acted on by a voice client".into(),
            }),
        }
        Ok(())
    }

    fn on_hai(
        &mut self,
        session: Option<&str>,
        payload: &Map<String, Value>,
        seq: Option<u64>,
        out: &mut Decoded,
    ) {
        if self.peer.is_some() {
            out.events.push(Downlink::Unknown {
                kind: "HAI".into(),
                reason: "second HAI on this connection ignored".into(),
            });
            return;
        }
        let resumed = match (&self.resuming, session) {
            (Some(rp), Some(s)) => rp.session == s,
            _ => false,
        };
        if let Some(s) = session {
            self.session = s.to_owned();
        }
        let caps = payload.get("capabilities").and_then(Value::as_object);
        let binary = caps
            .and_then(|c| c.get("binary_frames"))
            .or_else(|| payload.get("binary_frames"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let fc = caps
            .and_then(|c| c.get("flow_control"))
            .and_then(Value::as_object);
        let initial = Credit {
            messages: fc
                .and_then(|f| f.get("initial_credit_messages"))
                .and_then(Value::as_u64),
            bytes: fc
                .and_then(|f| f.get("initial_credit_bytes"))
                .and_then(Value::as_u64),
        };
        let accepts = match payload.get("accept_events") {
            Some(Value::Array(a)) if !a.is_empty() => Some(
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => None,
        };
        self.peer = Some(Peer {
            binary,
            initial,
            accepts,
        });
        self.credits.clear();
        for (channel, cost) in std::mem::take(&mut self.pre_hai_costs) {
            self.credit_mut(channel).charge(cost);
        }
        self.rx_ahead.clear();
        self.gaps.clear();
        self.peer_seq_numeric = seq.is_some();
        self.rx_in_order = match (&self.resuming, resumed) {
            (Some(rp), true) => Some(if seq == Some(rp.last_rx_seq + 1) {
                rp.last_rx_seq + 1
            } else {
                rp.last_rx_seq
            }),
            _ => seq,
        };
        self.resuming = None;
        if !resumed {
            self.resume = None;
        }
        self.update_resume_point();

        let majors_ok = match payload.get("accept_major") {
            Some(Value::Array(a)) => a.iter().any(|m| m.as_u64() == Some(1)),
            _ => true,
        };
        if !majors_ok {
            let message = "the agent does not accept HAIP major version 1";
            self.queue_error("VERSION_INCOMPATIBLE", message, None);
            out.events.push(Downlink::Error {
                code: "VERSION_INCOMPATIBLE".into(),
                message: message.into(),
                fatal: true,
            });
            return;
        }
        debug!(
            session = %self.session,
            binary,
            resumed,
            credit_messages = ?initial.messages,
            credit_bytes = ?initial.bytes,
            "haip: agent HAI"
        );
        out.events.push(Downlink::Ready {
            session: self.session.clone(),
        });
    }

    fn on_audio(
        &mut self,
        env: &Map<String, Value>,
        payload: &Map<String, Value>,
        out: &mut Decoded,
    ) -> Result<(), ProtocolError> {
        const TY: &str = "AUDIO_CHUNK";
        req_str(payload, "message_id", TY)?;
        let mime = match opt_str(payload, "mime", TY)? {
            Some(m) => m,
            None => env
                .get("bin_mime")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("AUDIO_CHUNK without mime"))?,
        };
        match payload.get("data") {
            // The SDK sends data *and* bin_len in one frame; the inline data wins and no binary
            // frame is awaited.
            Some(Value::String(d)) => {
                let bytes = B64_LENIENT
                    .decode(d.trim())
                    .map_err(|e| malformed(format!("AUDIO_CHUNK data is not base64: {e}")))?;
                out.events.push(audio_downlink(mime, bytes)?);
            }
            Some(other) => {
                return Err(malformed(format!(
                    "AUDIO_CHUNK data is {}, not a string",
                    json_type(other)
                )));
            }
            None => match self.pending_bin.as_mut() {
                Some(p) => p.mime = Some(mime.to_owned()),
                None => return Err(malformed("AUDIO_CHUNK with neither data nor bin_len")),
            },
        }
        Ok(())
    }

    fn on_replay_request(
        &mut self,
        now_ms: u64,
        payload: &Map<String, Value>,
        out: &mut Decoded,
    ) -> Result<(), ProtocolError> {
        const TY: &str = "REPLAY_REQUEST";
        let from = opt_seq_field(payload, "from_seq", TY)?
            .ok_or_else(|| malformed("REPLAY_REQUEST without from_seq"))?
            .max(1);
        let to = opt_seq_field(payload, "to_seq", TY)?.unwrap_or(u64::MAX);
        self.prune_replay(now_ms);
        let last_sent = self.next_seq - 1;
        if from > last_sent || to < from {
            return Ok(());
        }
        let oldest = self.replay.front().map_or(self.next_seq, |s| s.seq);
        if from < oldest {
            let message = format!("seq {from} is outside the replay window (oldest {oldest})");
            self.queue_error("REPLAY_TOO_OLD", &message, None);
            return Ok(());
        }
        // A replay answers the peer's explicit request: it goes at once, charged but not held back.
        let mut charges = Vec::new();
        for s in self.replay.iter().filter(|s| s.seq >= from && s.seq <= to) {
            out.replies.extend(s.wires.iter().cloned());
            charges.push((s.channel, s.cost));
        }
        debug!(
            from,
            to,
            frames = charges.len(),
            "haip: replaying for the agent"
        );
        for (channel, cost) in charges {
            self.credit_mut(channel).charge(cost);
        }
        Ok(())
    }
}

impl Protocol for HaipClient {
    fn name(&self) -> &'static str {
        "haip"
    }

    fn open(&mut self, now_ms: u64, info: &SessionInfo) -> Vec<Wire> {
        self.open_now_ms = now_ms;
        self.wall_ms = info.wall_ms;
        self.peer = None;
        self.credits.clear();
        self.paused.clear();
        self.pre_hai_costs.clear();
        self.next_seq = 1;
        self.replay.clear();
        self.rx_in_order = None;
        self.rx_ahead.clear();
        self.gaps.clear();
        self.peer_seq_numeric = false;
        self.pending_bin = None;
        self.rx_used.clear();
        self.last_rx_ms = None;
        self.last_pong_ms = None;
        self.open_runs.clear();
        self.cancel_next = false;
        self.ping_counter = 0;
        self.next_ping_ms =
            (self.settings.ping_interval_ms > 0).then(|| now_ms + self.settings.ping_interval_ms);

        // User content queued while disconnected goes to the new peer; answers to the old one do not.
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for p in std::mem::take(&mut self.queue) {
            if p.kind.survives_reconnect() {
                kept.push_back(p);
            }
        }
        self.queue = kept;
        self.queued_bytes = self.queue.iter().map(|p| p.size).sum();
        // A turn whose START went to the old peer is announced again to the new one.
        if let Some(id) = self.turn.clone() {
            let announced = self
                .queue
                .iter()
                .any(|p| p.kind == Kind::TurnStart && p.message_id() == Some(id.as_str()));
            if !announced {
                let p = Pending::event(
                    USER,
                    Kind::TurnStart,
                    "TEXT_MESSAGE_START",
                    json!({ "message_id": id, "author": "user" }),
                );
                self.queued_bytes += p.size;
                self.queue.push_front(p);
            }
        }

        self.resuming = self.resume.clone();
        self.session = match &self.resuming {
            Some(rp) => rp.session.clone(),
            None => new_id(),
        };

        let mut payload = Map::new();
        payload.insert("haip_version".into(), json!(HAIP_VERSION));
        payload.insert("accept_major".into(), json!([1]));
        payload.insert("accept_events".into(), json!(ACCEPT_EVENTS));
        payload.insert(
            "capabilities".into(),
            json!({
                "binary_frames": self.settings.binary,
                "flow_control": {
                    "initial_credit_messages": GRANT_MESSAGES,
                    "initial_credit_bytes": GRANT_BYTES,
                },
            }),
        );
        if let Some(rp) = &self.resuming {
            payload.insert("last_rx_seq".into(), json!(rp.last_rx_seq.to_string()));
        }
        if self.settings.auth_in_hai
            && let Some(token) = info.token.as_ref().filter(|t| !t.is_empty())
        {
            payload.insert(
                "auth".into(),
                json!({ "token": format!("Bearer {}", token.expose()) }),
            );
        }
        let payload = Value::Object(payload);
        let Some(text) = self.envelope(1, now_ms, SYSTEM, "HAI", &payload, None, None) else {
            return Vec::new();
        };
        self.next_seq = 2;
        let cost = text.len() as u64;
        self.pre_hai_costs.push((SYSTEM, cost));
        let wires = vec![Wire::Text(text)];
        self.remember_sent(1, now_ms, SYSTEM, cost, &wires);
        debug!(
            session = %self.session,
            resuming = self.resuming.is_some(),
            queued = self.queue.len(),
            "haip: HAI sent"
        );
        wires
    }

    fn encode(&mut self, now_ms: u64, up: Uplink) -> Result<Vec<Wire>, ProtocolError> {
        match up {
            Uplink::TurnStart => {
                self.check_accepts("TEXT_MESSAGE_START")?;
                if self.turn.is_some() {
                    self.end_turn()?;
                }
                self.start_turn();
            }
            Uplink::Audio {
                codec,
                rate_hz,
                channels,
                duration_ms,
                data,
            } => {
                self.check_accepts("AUDIO_CHUNK")?;
                let message_id = match self.turn.clone() {
                    Some(id) => id,
                    None => self.start_turn(),
                };
                let duration_ms = if duration_ms > 0 {
                    Some(u64::from(duration_ms))
                } else if codec == AudioCodec::Pcm16 && rate_hz > 0 && channels > 0 {
                    let frames = data.len() as u64 / (2 * u64::from(channels));
                    Some(frames * 1000 / u64::from(rate_hz))
                } else {
                    None
                };
                let mime = self.uplink_mime(codec, rate_hz, channels);
                self.enqueue(Pending {
                    channel: AUDIO_IN,
                    kind: Kind::Audio,
                    size: data.len(),
                    body: Body::Audio {
                        message_id,
                        mime,
                        duration_ms,
                        data,
                    },
                });
            }
            Uplink::TurnEnd { .. } => self.end_turn()?,
            Uplink::Text(text) => {
                self.check_accepts("TEXT_MESSAGE_START")?;
                let id = new_id();
                self.enqueue(Pending::event(
                    USER,
                    Kind::Text,
                    "TEXT_MESSAGE_START",
                    json!({ "message_id": id, "author": "user", "text": text }),
                ));
                self.enqueue(Pending::event(
                    USER,
                    Kind::Text,
                    "TEXT_MESSAGE_END",
                    json!({ "message_id": id }),
                ));
                self.answer_due = true;
            }
            Uplink::Interrupt => match self.open_runs.back().cloned() {
                Some(run) => self.cancel_run(run),
                None if self.answer_due => {
                    debug!(
                        "haip: interrupt before the agent started a run; cancelling the next one"
                    );
                    self.cancel_next = true;
                }
                // The answer is complete on the wire (its run finished) and only its playback is
                // being cut: there is nothing to cancel, and the next run is the answer to what
                // the user says now.
                None => {
                    debug!("haip: interrupt after the answer's run finished; nothing to cancel")
                }
            },
        }
        Ok(self.release(now_ms))
    }

    fn decode(&mut self, now_ms: u64, wire: Wire) -> Result<Decoded, ProtocolError> {
        self.last_rx_ms = Some(now_ms);
        let mut out = Decoded::default();
        let result = match wire {
            Wire::Binary(bytes) => self.decode_binary(bytes, &mut out),
            Wire::Text(text) => {
                if let Some(p) = self.pending_bin.take() {
                    self.stats.malformed += 1;
                    debug!(ty = %p.ty, bin_len = p.bin_len, "haip: announced binary frame never came");
                    out.events.push(Downlink::Unknown {
                        kind: p.ty,
                        reason: format!(
                            "the {}-byte binary frame announced by bin_len never came; envelope dropped",
                            p.bin_len
                        ),
                    });
                }
                self.decode_text(now_ms, &text, &mut out)
            }
        };
        match result {
            Ok(()) => {
                out.replies.extend(self.release(now_ms));
                Ok(out)
            }
            Err(e) => {
                self.stats.malformed += 1;
                Err(e)
            }
        }
    }

    fn poll(&mut self, now_ms: u64) -> Vec<Wire> {
        if let Some(due) = self.next_ping_ms
            && now_ms >= due
        {
            let interval = self.settings.ping_interval_ms.max(1);
            let mut next = due.saturating_add(interval);
            if next <= now_ms {
                next = now_ms.saturating_add(interval);
            }
            self.next_ping_ms = Some(next);
            // No pile-up while SYSTEM is stalled: one PING in the queue is enough.
            if !self.queue.iter().any(|p| p.kind == Kind::Ping) {
                self.ping_counter += 1;
                let nonce = self.ping_counter.to_string();
                self.enqueue(Pending::event(
                    SYSTEM,
                    Kind::Ping,
                    "PING",
                    json!({ "nonce": nonce }),
                ));
            }
        }
        let mut requests = Vec::new();
        for g in self
            .gaps
            .iter_mut()
            .filter(|g| !g.requested && now_ms >= g.due_ms)
        {
            g.requested = true;
            // Only what is still missing inside the gap (bounded walk: `rx_ahead` is capped).
            let (mut first, mut last) = (g.from, g.to);
            while first <= last && self.rx_ahead.contains(&first) {
                first += 1;
            }
            while last > first && self.rx_ahead.contains(&last) {
                last -= 1;
            }
            if first <= last && !self.rx_ahead.contains(&first) {
                requests.push((first, last));
            }
        }
        for (from, to) in requests {
            debug!(from, to, "haip: requesting replay");
            self.stats.replay_requests_sent += 1;
            self.enqueue(Pending::event(
                SYSTEM,
                Kind::Control,
                "REPLAY_REQUEST",
                json!({ "from_seq": from.to_string(), "to_seq": to.to_string() }),
            ));
        }
        self.release(now_ms)
    }

    fn next_deadline(&self) -> Option<u64> {
        let gap = self
            .gaps
            .iter()
            .filter(|g| !g.requested)
            .map(|g| g.due_ms)
            .min();
        match (self.next_ping_ms, gap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn stats(&self) -> super::CodecStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_conventions() {
        let pcm = |m: &str, d: Vec<u8>| audio_downlink(m, d);
        assert_eq!(
            pcm("audio/opus", vec![1, 2, 3]).unwrap(),
            Downlink::Audio {
                codec: AudioCodec::Opus,
                rate_hz: 48_000,
                channels: 1,
                data: vec![1, 2, 3]
            }
        );
        assert_eq!(
            pcm("audio/pcm", vec![0; 4]).unwrap(),
            Downlink::Audio {
                codec: AudioCodec::Pcm16,
                rate_hz: 16_000,
                channels: 1,
                data: vec![0; 4]
            }
        );
        assert_eq!(
            pcm("Audio/PCM; rate=24000; channels=2", vec![0; 8]).unwrap(),
            Downlink::Audio {
                codec: AudioCodec::Pcm16,
                rate_hz: 24_000,
                channels: 2,
                data: vec![0; 8]
            }
        );
        // L16 is big-endian on the wire (RFC 2586): swapped to our little-endian.
        assert_eq!(
            pcm("audio/L16;rate=8000", vec![0x12, 0x34]).unwrap(),
            Downlink::Audio {
                codec: AudioCodec::Pcm16,
                rate_hz: 8_000,
                channels: 1,
                data: vec![0x34, 0x12]
            }
        );
        assert!(matches!(
            pcm("audio/pcm;channels=2", vec![0; 6]),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            pcm("audio/pcm;rate=fast", vec![0; 2]),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            pcm("audio/mpeg", vec![0; 2]).unwrap(),
            Downlink::Unknown { .. }
        ));
    }

    #[test]
    fn wav_header_gives_rate_and_channels() {
        let mut wav = Vec::new();
        wav.extend_from_slice(b"RIFF\x00\x00\x00\x00WAVE");
        wav.extend_from_slice(b"LIST\x03\x00\x00\x00abc\x00"); // odd chunk, padded
        wav.extend_from_slice(b"fmt \x10\x00\x00\x00");
        wav.extend_from_slice(&1u16.to_le_bytes());
        wav.extend_from_slice(&2u16.to_le_bytes());
        wav.extend_from_slice(&22_050u32.to_le_bytes());
        wav.extend_from_slice(&[0; 8]);
        assert_eq!(wav_format(&wav), Some((22_050, 2)));
        assert!(matches!(
            audio_downlink("audio/x-wav", wav).unwrap(),
            Downlink::Audio {
                codec: AudioCodec::Wav,
                rate_hz: 22_050,
                channels: 2,
                ..
            }
        ));
        assert_eq!(wav_format(b"RIFF\0\0\0\0WAVEdata"), None);
        assert!(audio_downlink("audio/wav", b"nope".to_vec()).is_err());
    }

    #[test]
    fn seq_and_names() {
        assert_eq!(parse_seq(Some(&json!("42"))), Some(42));
        assert_eq!(parse_seq(Some(&json!(7))), Some(7));
        assert_eq!(parse_seq(Some(&json!("1795315057042yhbzj9u4b"))), None);
        assert_eq!(parse_seq(Some(&json!(""))), None);
        assert_eq!(parse_seq(Some(&json!("-1"))), None);
        assert_eq!(parse_seq(None), None);
        assert_eq!(canonical_type("MESSAGE_PART"), Some("TEXT_MESSAGE_PART"));
        assert_eq!(canonical_type("NOPE"), None);
        assert_eq!(known_channel("audio-in"), Some("AUDIO_IN"));
        assert_eq!(known_channel("SYSTEM"), Some("SYSTEM"));
        assert_eq!(known_channel("video"), None);
        assert!(is_schema_uuid(&new_id()));
        assert!(!is_schema_uuid("not-a-uuid"));
        assert_eq!(b64_decoded_len("AAAA"), 3);
        assert_eq!(b64_decoded_len("AAA="), 2);
    }

    #[test]
    fn credit_accounting() {
        let mut c = Credit {
            messages: Some(1),
            bytes: Some(10),
        };
        assert!(c.allows(10));
        assert!(!c.allows(11));
        c.charge(10);
        assert!(!c.allows(0));
        c.add(1, 5);
        assert!(c.allows(5));
        let mut unlimited = Credit::default();
        unlimited.charge(u64::MAX);
        assert!(unlimited.allows(u64::MAX));
    }

    #[test]
    fn gap_tracking_absorbs_out_of_order_and_gives_up_when_told() {
        let mut c = HaipClient::new(HaipSettings::default());
        assert!(c.accept_seq(0, 1));
        assert!(c.accept_seq(0, 4)); // gap 2..=3
        assert!(c.accept_seq(0, 3));
        assert!(!c.accept_seq(0, 3));
        assert_eq!(c.rx_in_order, Some(1));
        assert_eq!(c.gaps.len(), 1);
        assert!(c.accept_seq(0, 2));
        assert_eq!(c.rx_in_order, Some(4));
        assert!(c.gaps.is_empty());
        assert!(c.accept_seq(0, 10));
        c.skip_first_gap();
        assert_eq!(c.rx_in_order, Some(10));
        assert!(c.gaps.is_empty());
    }
}
