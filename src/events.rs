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
    AgentConnected {
        session: String,
    },
    AgentDisconnected {
        reason: String,
        retry_ms: u64,
    },
    /// The agent started answering.
    AgentResponse {
        id: String,
    },
    /// A complete text message from the agent.
    AgentText {
        text: String,
    },
    AgentFinished {
        id: String,
        status: String,
    },
    AgentError {
        code: String,
        message: String,
    },
    AgentTool {
        name: String,
        state: String,
    },
    /// Text-only protocols: what speech-to-text heard, and what went to the agent.
    UserText {
        said: String,
        text: String,
    },
    /// Text-only protocols: the user's turn gave no text.
    NotUnderstood {
        reason: String,
    },
    /// Text-only protocols: a component the agent showed, as it was spoken.
    AgentComponent {
        kind: String,
        text: String,
    },
    /// Frames of the user's turn that reached the agent (HAIP), or the speech-to-text service
    /// (`to_speech_to_text`: the text-only protocols, whose agent gets the transcript).
    FramesSent {
        frames: u64,
        to_speech_to_text: bool,
    },
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
            wall: wall_now(),
        }
    }
}

/// The wall clock now, RFC 3339 in UTC with milliseconds.
pub fn wall_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Where events go.
pub enum EventSink {
    None,
    /// JSON lines on a writer (stdout for `--events jsonl`).
    JsonLines(Box<dyn Write + Send>),
    /// A timeline a person can read (`hearken demo`).
    Timeline(Box<dyn Write + Send>),
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
        if let EventSink::Timeline(w) = self
            && let Some(text) = timeline_line(&e.kind)
        {
            let _ = writeln!(w, "[{:>7.2} s] {text}", e.audio_ms as f64 / 1000.0);
            let _ = w.flush();
        }
    }
}

/// One line of the human-readable timeline, or None for events too small to show.
pub fn timeline_line(kind: &EventKind) -> Option<String> {
    Some(match kind {
        EventKind::DeviceOpened { input, output, vad } => {
            format!("devices open: mic {input}, speaker {output}, VAD {vad}")
        }
        EventKind::DeviceError { message, retry_ms } => {
            format!("audio device error: {message} (retry in {retry_ms} ms)")
        }
        EventKind::TurnStart => "user turn starts".into(),
        EventKind::TurnEnd {
            duration_ms,
            frames,
            reason,
        } => format!(
            "user turn ends ({reason:?}): {:.2} s of speech, {frames} Opus frames",
            *duration_ms as f64 / 1000.0
        ),
        EventKind::BargeIn { onset_ms } => format!(
            "BARGE-IN: the user spoke over the agent (speech began at {:.2} s)",
            *onset_ms as f64 / 1000.0
        ),
        EventKind::PlaybackFlushed { output_ms } => format!(
            "playback flushed (speaker position {:.2} s)",
            *output_ms as f64 / 1000.0
        ),
        EventKind::Discarded { reason, .. } => format!("speech ignored ({reason:?})"),
        EventKind::ResponseTimeout => "no answer from the agent in time".into(),
        EventKind::InputEnded => "input ended".into(),
        EventKind::AgentConnected { session } => format!("agent connected (session {session})"),
        EventKind::AgentDisconnected { reason, retry_ms } => {
            format!("agent link down: {reason}; reconnecting in {retry_ms} ms")
        }
        EventKind::AgentResponse { id } => format!("agent answers (run {id})"),
        EventKind::AgentText { text } => format!("agent says: \"{text}\""),
        EventKind::AgentFinished { status, .. } => format!("agent run finished: {status}"),
        EventKind::AgentError { code, message } => format!("agent error {code}: {message}"),
        EventKind::AgentTool { name, state } => format!("agent tool {name}: {state}"),
        EventKind::UserText { said, text } if said == text => format!("user said: \"{said}\""),
        EventKind::UserText { said, text } => {
            format!("user said: \"{said}\" (sent as the answer \"{text}\")")
        }
        EventKind::NotUnderstood { reason } => format!("the turn gave no text: {reason}"),
        EventKind::AgentComponent { kind, text } => format!("agent shows a {kind}: \"{text}\""),
        EventKind::Earcon {
            earcon: Earcon::Working,
        } => "speaker: \"working\" earcon".into(),
        EventKind::Earcon {
            earcon: Earcon::ToolNotice,
        } => "speaker: \"One moment.\" (the tool is taking a while)".into(),
        EventKind::Earcon {
            earcon: Earcon::Error,
        } => "speaker: error earcon".into(),
        EventKind::FramesSent {
            frames,
            to_speech_to_text: false,
        } => format!("{frames} frames of the turn sent to the agent"),
        EventKind::FramesSent {
            frames,
            to_speech_to_text: true,
        } => format!("{frames} frames of the turn sent to speech-to-text"),
        EventKind::Summary {
            turns, barge_ins, ..
        } => format!("done: {turns} turns, {barge_ins} barge-ins"),
        _ => return None,
    })
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

    #[test]
    fn the_timeline_says_where_the_frames_of_a_turn_went() {
        let line = |to_speech_to_text| {
            timeline_line(&EventKind::FramesSent {
                frames: 12,
                to_speech_to_text,
            })
        };
        assert_eq!(
            line(false).as_deref(),
            Some("12 frames of the turn sent to the agent")
        );
        assert_eq!(
            line(true).as_deref(),
            Some("12 frames of the turn sent to speech-to-text")
        );
    }
}
