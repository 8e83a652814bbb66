//! The device's event stream: what `hearken run --events jsonl` prints, one JSON object per line, for
//! LED ring drivers and test harnesses. Every event has `event` (its type), `audio_ms` (position on the
//! audio clock: ms of microphone input processed) and `wall` (RFC 3339 UTC, ms precision). The schema is
//! documented in the README; fields are only ever added.

use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use crate::audio::earcon::Earcon;
use crate::turn::{DiscardReason, EndReason, State};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    DeviceOpened {
        input: String,
        output: String,
        vad: String,
    },
    DeviceError {
        message: String,
        retry_ms: u32,
    },
    SpeechStart,
    SpeechEnd,
    TurnStart,
    TurnEnd {
        duration_ms: u64,
        frames: u32,
        reason: EndReason,
    },
    BargeIn {
        onset_ms: u64,
    },
    Discarded {
        onset_ms: u64,
        reason: DiscardReason,
    },
    StateChange {
        from: State,
        to: State,
    },
    Earcon {
        earcon: Earcon,
    },
    PlaybackFlushed {
        output_ms: u64,
    },
    ResponseTimeout,
    InputEnded,
    /// Last event of a run.
    Summary {
        turns: u32,
        frames: u64,
        barge_ins: u32,
        xruns: u64,
        capture_dropped: u64,
        peak_rss_kib: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    #[serde(flatten)]
    pub kind: EventKind,
    pub audio_ms: u64,
    pub wall: String,
}

impl Event {
    pub fn new(kind: EventKind, audio_ms: u64) -> Self {
        Event {
            kind,
            audio_ms,
            wall: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }
}

/// Where events go.
pub enum EventSink {
    None,
    /// JSON lines on a writer (stdout for `--events jsonl`).
    JsonLines(Box<dyn Write + Send>),
}

impl EventSink {
    pub fn emit(&mut self, e: &Event) {
        if let EventSink::JsonLines(w) = self {
            // serde_json cannot fail on these types; a closed stdout is not worth dying for.
            if let Ok(line) = serde_json::to_string(e) {
                let _ = writeln!(w, "{line}");
                let _ = w.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_flat_with_type_and_times() {
        let e = Event::new(
            EventKind::TurnEnd {
                duration_ms: 1370,
                frames: 84,
                reason: EndReason::Silence,
            },
            2571,
        );
        let v: serde_json::Value = serde_json::to_value(&e).expect("json");
        assert_eq!(v["event"], "turn_end");
        assert_eq!(v["audio_ms"], 2571);
        assert_eq!(v["duration_ms"], 1370);
        assert_eq!(v["reason"], "silence");
        assert!(humantime::parse_rfc3339(v["wall"].as_str().expect("wall")).is_ok());
        let s = Event::new(
            EventKind::StateChange {
                from: State::Idle,
                to: State::UserSpeaking,
            },
            5,
        );
        let v: serde_json::Value = serde_json::to_value(&s).expect("json");
        assert_eq!(
            (v["from"].as_str(), v["to"].as_str()),
            (Some("idle"), Some("user_speaking"))
        );
    }
}
