//! ARP Minimal Mode codec against the golden data in `tests/fixtures/arp/` (copies of `shared/protocols/data/arp/`): the arp-go
//! capture and the spec's examples. Every agent frame decodes or is skipped with a reason, the frames
//! we send match what the reference renderer sent, and the captured conversation is rendered to the
//! spoken text below.

// The replay helpers are not #[test] fns, so clippy.toml's allow-unwrap-in-tests misses them.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use hearken::protocol::arp::{ArpClient, ArpSettings, ERROR_COMMIT_WAIT_MS, renderer_hello};
use hearken::protocol::{
    Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState, Uplink, Wire,
};
use hearken::render::Renderer;
use serde_json::{Value, json};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arp")
}

fn records(name: &str) -> Vec<Value> {
    let path = data_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("jsonl record"))
        .collect()
}

fn client(session: &str) -> ArpClient {
    let mut c = ArpClient::new(ArpSettings {
        session_id: session.into(),
        send_hello: false,
    });
    assert!(c.open(0, &SessionInfo::default()).is_empty());
    c
}

/// Agent frames are sent as arp-go sends them: compact JSON plus "\n".
fn wire(frame: &Value) -> Wire {
    Wire::Text(format!("{frame}\n"))
}

#[derive(Default)]
struct Case {
    name: String,
    spoken: Vec<String>,
    events: Vec<Downlink>,
}

/// Replays the arp-go capture through the codec and the renderer, case by case.
fn replay_capture() -> Vec<Case> {
    let mut c = client("s1");
    let mut r = Renderer::default();
    let mut cases: Vec<Case> = Vec::new();
    for rec in records("observed-arp-go-exchange.jsonl") {
        let name = rec["case"].as_str().unwrap().to_string();
        if cases.last().is_none_or(|k| k.name != name) {
            cases.push(Case {
                name: name.clone(),
                ..Case::default()
            });
        }
        let case = cases.last_mut().unwrap();
        match rec["dir"].as_str().unwrap() {
            "renderer->agent" => {
                let Some(frame) = rec.get("frame") else {
                    continue; // the raw non-JSON line: nothing we would ever send
                };
                match (frame["type"].as_str(), frame["input_type"].as_str()) {
                    (Some("input"), Some("text")) => {
                        let text = frame["data"]["text"].as_str().unwrap();
                        let sent = c.encode(0, Uplink::Text(text.into()));
                        if text.is_empty() {
                            assert!(matches!(sent, Err(ProtocolError::State(_))), "{sent:?}");
                            continue;
                        }
                        let sent = sent.unwrap();
                        assert_eq!(sent.len(), 1, "{name}");
                        let Wire::Text(t) = &sent[0] else {
                            panic!("binary")
                        };
                        let ours: Value = serde_json::from_str(t).unwrap();
                        if frame.get("session_id").is_some() && frame["v"] == 1 {
                            assert_eq!(ours, *frame, "{name}: our input differs from the capture");
                        } else {
                            // We always send v:1 and our session id.
                            assert_eq!(ours["data"], frame["data"], "{name}");
                            assert_eq!(ours["v"], 1);
                            assert_eq!(ours["session_id"], "s1");
                        }
                    }
                    (Some("input"), _) => {
                        // action / form_submit / voice: a voice renderer answers in text; open the
                        // turn the same way.
                        c.encode(0, Uplink::Text(format!("({name})"))).unwrap();
                    }
                    _ => {}
                }
            }
            "agent->renderer" => {
                let frame = &rec["frame"];
                let d = c
                    .decode(0, wire(frame))
                    .unwrap_or_else(|e| panic!("{name}: {frame} did not decode: {e}"));
                assert!(
                    d.replies.is_empty(),
                    "{name}: nothing queued, nothing to send"
                );
                for e in d.events {
                    if let Downlink::Unknown { reason, .. } = &e {
                        assert!(!reason.is_empty());
                    }
                    case.spoken.extend(r.on_downlink(&e));
                    case.events.push(e);
                }
            }
            other => panic!("dir {other}"),
        }
    }
    cases
}

#[test]
fn every_agent_frame_of_the_capture_decodes_or_is_skipped_with_a_reason() {
    let cases = replay_capture();
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), 11, "{names:?}");
    for case in &cases {
        for e in &case.events {
            if let Downlink::Unknown { kind, reason } = e {
                panic!("{}: {kind} skipped ({reason})", case.name);
            }
        }
    }
}

#[test]
fn the_captured_conversation_is_spoken_as_expected() {
    let cases = replay_capture();
    let spoken = |name: &str| -> Vec<String> {
        cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name}"))
            .spoken
            .clone()
    };
    let table = "Sales. 2 rows. Region North, Q1 100. Region South, Q1 200.";
    let chart = "Sales. North: Q1 100. South: Q1 200.";
    // One sentence at a time goes to speech synthesis; compare the whole of each case.
    let spoken = |name: &str| spoken(name).join(" ");
    let turn = |said: &str| format!("{said} {table} {chart}");
    assert_eq!(spoken("text input"), turn("You said: hi"));
    // The server flattens non-text input to JSON: a voice device reads the braces' words only.
    assert_eq!(
        spoken("action input"),
        turn("You said: [Action: confirm] {\"action\":\"confirm\"}")
    );
    assert_eq!(spoken("missing session_id"), turn("You said: x"));
    assert_eq!(spoken("v=2"), turn("You said: v2"));
    // Errors are not spoken by the renderer (the device plays its error earcon).
    assert_eq!(spoken("error path"), "");

    let events = |name: &str| {
        cases
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .events
            .clone()
    };
    let ev = events("text input");
    assert!(matches!(ev[0], Downlink::ResponseStarted { .. }), "{ev:?}");
    let tools: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            Downlink::Tool { name, state, .. } => Some((name.as_str(), *state)),
            _ => None,
        })
        .collect();
    assert_eq!(
        tools,
        vec![("lookup", ToolState::Started), ("lookup", ToolState::Done)]
    );
    assert!(matches!(
        ev.last(),
        Some(Downlink::ResponseFinished {
            status: FinishStatus::Ok,
            ..
        })
    ));
    // fail: error, then commit: the turn ends with status Error.
    let ev = events("error path");
    assert!(matches!(&ev[0], Downlink::Error { fatal: false, message, .. } if message == "boom"));
    assert!(matches!(
        ev.last(),
        Some(Downlink::ResponseFinished {
            status: FinishStatus::Error,
            ..
        })
    ));
}

#[test]
fn the_spec_examples_decode_and_render() {
    let mut c = client("sess_001");
    let mut r = Renderer::default();
    c.encode(0, Uplink::Text("show results".into())).unwrap();
    let mut spoken = Vec::new();
    for rec in records("spec-minimal-mode-examples.jsonl") {
        if rec["dir"] != "agent->renderer" {
            continue;
        }
        let d = c.decode(0, wire(&rec["frame"])).unwrap();
        for e in &d.events {
            spoken.extend(r.on_downlink(e));
        }
    }
    assert_eq!(
        spoken.join(" "),
        [
            // B.2: a table, then a patch adding a row, then the commit.
            "Results. 1 row. Name Widget A, Price $29.99.",
            "Results. 2 rows. Name Widget A, Price $29.99. Name Widget B, Price $39.99.",
            // 16.3: a table with its props elided.
            "0 rows.",
            // 10.4: a chart with a precomputed table fallback: the fallback is read.
            "Sales by Region. 4 rows. Region North, Q1 Sales 100. Region South, Q1 Sales 200.",
            "Region East, Q1 Sales 150. Region West, Q1 Sales 300.",
        ]
        .join(" ")
    );
}

#[test]
fn the_renderer_hello_is_opt_in_and_its_rejection_is_swallowed() {
    let mut c = ArpClient::new(ArpSettings {
        session_id: "s1".into(),
        send_hello: true,
    });
    let hello = c.open(0, &SessionInfo::default());
    assert_eq!(hello, vec![Wire::Text(renderer_hello().to_string())]);
    let spec = records("spec-minimal-mode-examples.jsonl");
    let spec_hello = &spec[0]["frame"];
    assert_eq!(spec_hello["type"], "hello");
    let ours: Value = serde_json::from_str(match &hello[0] {
        Wire::Text(t) => t,
        Wire::Binary(_) => unreachable!(),
    })
    .unwrap();
    assert_eq!(ours["v"], spec_hello["v"]);
    assert!(
        ours["capabilities"]["components"]
            .as_array()
            .unwrap()
            .contains(&json!("text"))
    );
    let rejection = json!({"v":1,"type":"error","payload":{"error":"unknown message type: hello"}});
    let d = c.decode(0, wire(&rejection)).unwrap();
    assert!(
        matches!(&d.events[..], [Downlink::Unknown { reason, .. }] if reason.contains("hello"))
    );
    // The same error later is a real one.
    let d = c.decode(0, wire(&rejection)).unwrap();
    assert!(matches!(&d.events[..], [Downlink::Error { .. }]));
}

#[test]
fn one_turn_at_a_time_the_next_input_waits_for_the_commit() {
    let mut c = client("s1");
    assert_eq!(c.encode(0, Uplink::Text("first".into())).unwrap().len(), 1);
    assert!(
        c.encode(0, Uplink::Text("second".into()))
            .unwrap()
            .is_empty()
    );
    c.decode(
        0,
        wire(&json!({"v":1,"type":"delta","payload":{"delta":"ok"}})),
    )
    .unwrap();
    let d = c
        .decode(0, wire(&json!({"v":1,"type":"commit","final":true})))
        .unwrap();
    assert_eq!(d.replies.len(), 1);
    let Wire::Text(t) = &d.replies[0] else {
        panic!()
    };
    assert!(t.contains("\"second\""), "{t}");
    assert!(c.in_turn());
}

#[test]
fn an_error_without_a_commit_ends_the_turn_after_a_wait() {
    let mut c = client("s1");
    c.encode(0, Uplink::Text("x".into())).unwrap();
    c.encode(0, Uplink::Text("y".into())).unwrap();
    let d = c
        .decode(
            100,
            wire(&json!({"v":1,"type":"error","payload":{"error":"empty input"}})),
        )
        .unwrap();
    assert!(matches!(
        &d.events[..],
        [Downlink::Error { fatal: false, .. }]
    ));
    assert_eq!(c.next_deadline(), Some(100 + ERROR_COMMIT_WAIT_MS));
    assert!(c.poll(100 + ERROR_COMMIT_WAIT_MS - 1).is_empty());
    let next = c.poll(100 + ERROR_COMMIT_WAIT_MS);
    assert_eq!(next.len(), 1, "the queued input goes");
    let ev = c.take_events();
    assert!(matches!(
        &ev[..],
        [Downlink::ResponseFinished {
            status: FinishStatus::Error,
            ..
        }]
    ));
}

#[test]
fn bad_frames_are_errors_with_reasons_and_nothing_breaks() {
    let mut c = client("s1");
    for bad in [
        Wire::Text("hello there".into()),
        Wire::Text("{\"v\":1}".into()),
        Wire::Binary(vec![1, 2, 3]),
        Wire::Text("{\"v\":1,\"type\":\"render\"}".into()),
        Wire::Text("{\"v\":1,\"type\":\"patch\",\"ops\":5}".into()),
    ] {
        match c.decode(0, bad.clone()) {
            Err(ProtocolError::Malformed(reason)) => assert!(!reason.is_empty()),
            other => panic!("{bad:?} gave {other:?}"),
        }
    }
    assert_eq!(c.stats().malformed, 5);
    let d = c
        .decode(0, wire(&json!({"v":1,"type":"frame_ack","commit_seq":1})))
        .unwrap();
    assert!(matches!(&d.events[..], [Downlink::Unknown { kind, .. }] if kind == "frame_ack"));
    // Late frames of a cancelled turn are not spoken as a new answer.
    let d = c
        .decode(
            0,
            wire(&json!({"v":1,"type":"delta","payload":{"delta":"late"}})),
        )
        .unwrap();
    assert!(matches!(&d.events[..], [Downlink::Unknown { .. }]));
    // Fields under payload or top-level; render components under payload too (the TS client).
    c.encode(0, Uplink::Text("q".into())).unwrap();
    let d = c
        .decode(0, wire(&json!({"v":1,"type":"render","payload":{"components":[{"type":"text","props":{"text":"t"}}],"tool":"x"}})))
        .unwrap();
    assert!(
        d.events
            .iter()
            .any(|e| matches!(e, Downlink::Render { tool: Some(t), .. } if t == "x"))
    );
}

#[test]
fn barge_in_has_no_message_the_link_reconnects() {
    let mut c = client("s1");
    // Nothing to cancel before an input, and no handshake to wait for.
    assert!(!c.cancel_by_reconnect());
    assert_eq!(c.ready_on_open().as_deref(), Some("s1"));
    c.encode(0, Uplink::Text("q".into())).unwrap();
    assert!(c.cancel_by_reconnect());
    assert!(matches!(
        c.encode(0, Uplink::Interrupt),
        Err(ProtocolError::State(_))
    ));
    assert!(!c.in_turn());
    assert!(
        c.encode(0, Uplink::TurnEnd { duration_ms: 5 })
            .unwrap()
            .is_empty()
    );
    assert!(
        c.encode(
            0,
            Uplink::Audio {
                codec: hearken::protocol::AudioCodec::Opus,
                rate_hz: 16000,
                channels: 1,
                duration_ms: 20,
                data: vec![0]
            }
        )
        .is_err()
    );
}
