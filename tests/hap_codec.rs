//! HAP client codec against the golden data in `tests/fixtures/hap/` (copies of `shared/protocols/data/hap/`): the requests we send
//! have the capture's shape, every response line of the capture decodes or is skipped with a reason,
//! and the JSON-RPC edge cases (error objects, missing ids, out-of-order answers, timeouts, barge-in).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use hearken::protocol::hap::{HapClient, HapSettings, Surface};
use hearken::protocol::{
    Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState, Uplink, Wire,
};
use serde_json::{Value, json};

fn records() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hap/observed-stdio-exchange.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn text(w: &Wire) -> &str {
    match w {
        Wire::Text(t) => t,
        Wire::Binary(_) => panic!("binary"),
    }
}

fn value(w: &Wire) -> Value {
    serde_json::from_str(text(w)).unwrap()
}

/// The capture's line with its `id` replaced.
fn with_id(line: &str, id: u64) -> Wire {
    let mut v: Value = serde_json::from_str(line).unwrap();
    v["id"] = json!(id);
    Wire::Text(v.to_string())
}

fn request_of(recs: &[Value], server: &str, method: &str) -> Value {
    recs.iter()
        .filter(|r| r["server"] == server)
        .map(|r| serde_json::from_str::<Value>(r["request_line"].as_str().unwrap()).unwrap())
        .find(|v| v["method"] == method && v.get("params").is_some() && v["jsonrpc"] == "2.0")
        .unwrap_or_else(|| panic!("{server}: no {method}"))
}

fn response_of(recs: &[Value], server: &str, request_contains: &str) -> String {
    recs.iter()
        .find(|r| {
            r["server"] == server
                && r["request_line"]
                    .as_str()
                    .unwrap()
                    .contains(request_contains)
        })
        .unwrap_or_else(|| panic!("{server}: no {request_contains}"))["response_line"]
        .as_str()
        .unwrap()
        .to_string()
}

const ECHO: &str = "HAPServer+echo tool";
const AGENT: &str = "AgentServer(EchoAgent)";

/// A client through discovery against the captured `tools/list` and server info of `server`.
fn ready_client(recs: &[Value], server: &str, settings: HapSettings) -> (HapClient, String) {
    let mut c = HapClient::new(settings);
    let open = c.open(0, &SessionInfo::default());
    assert_eq!(open.len(), 2);
    let tools = response_of(recs, server, "tools/list\",\"params\":{}}");
    let info = response_of(recs, server, "hap://server/info");
    assert!(c.decode(0, with_id(&tools, 1)).unwrap().events.is_empty());
    let d = c.decode(0, with_id(&info, 2)).unwrap();
    let [Downlink::Ready { session }] = d.events.as_slice() else {
        panic!("{:?}", d.events)
    };
    (c, session.clone())
}

#[test]
fn discovery_requests_match_the_capture_and_ready_names_the_server() {
    let recs = records();
    let mut c = HapClient::new(HapSettings::default());
    let open = c.open(0, &SessionInfo::default());
    // Byte for byte what the capture sent first.
    assert_eq!(
        text(&open[0]),
        recs[0]["request_line"].as_str().unwrap(),
        "tools/list"
    );
    let mut info = request_of(&recs, ECHO, "resources/read");
    info["id"] = json!(2);
    assert_eq!(value(&open[1]), info);

    let (c, session) = ready_client(&recs, ECHO, HapSettings::default());
    assert_eq!(session, "echo-server");
    assert_eq!(c.target(), Some(("tools/call", "echo")));
    let (c, session) = ready_client(&recs, AGENT, HapSettings::default());
    assert_eq!(session, "agent-echo");
    assert_eq!(c.target(), Some(("tools/call", "execute")));
}

#[test]
fn a_turn_is_the_captured_tools_call_and_its_result_is_spoken() {
    let recs = records();
    let (mut c, _) = ready_client(&recs, ECHO, HapSettings::default());
    let sent = c.encode(0, Uplink::Text("hello".into())).unwrap();
    assert_eq!(sent.len(), 1);
    let mut expect = request_of(&recs, ECHO, "tools/call");
    expect["id"] = json!(3);
    assert_eq!(value(&sent[0]), expect);
    let answer = response_of(&recs, ECHO, "\"text\":\"hello\"");
    let d = c.decode(0, with_id(&answer, 3)).unwrap();
    let id = match &d.events[0] {
        Downlink::ResponseStarted { id } => id.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        d.events[1..],
        [
            Downlink::TextDelta {
                message_id: id.clone(),
                text: "hello".into()
            },
            Downlink::TextDone {
                message_id: id.clone()
            },
            Downlink::ResponseFinished {
                id,
                status: FinishStatus::Ok
            },
        ]
    );
    assert!(!c.in_turn());
}

#[test]
fn agent_server_execute_matches_the_capture_and_its_type_error_is_surfaced() {
    let recs = records();
    let (mut c, _) = ready_client(&recs, AGENT, HapSettings::default());
    let sent = c.encode(0, Uplink::Text("hi".into())).unwrap();
    let mut expect = request_of(&recs, AGENT, "tools/call");
    expect["id"] = json!(3);
    assert_eq!(value(&sent[0]), expect);
    let answer = response_of(&recs, AGENT, "input_data");
    let d = c.decode(0, with_id(&answer, 3)).unwrap();
    assert!(matches!(d.events[0], Downlink::ResponseStarted { .. }));
    assert_eq!(
        d.events[1],
        Downlink::Error {
            code: "-32603".into(),
            message: "AgentServer._register_agent_interface.<locals>.execute() got an unexpected \
                      keyword argument 'timeout' (TypeError)"
                .into(),
            fatal: false
        }
    );
    assert!(matches!(
        d.events[2],
        Downlink::ResponseFinished {
            status: FinishStatus::Error,
            ..
        }
    ));
}

#[test]
fn every_captured_response_decodes_or_is_skipped_with_a_reason() {
    let recs = records();
    let mut ok = 0;
    let mut errors = 0;
    let mut skipped = 0;
    for r in &recs {
        let server = r["server"].as_str().unwrap();
        let line = r["response_line"].as_str().unwrap();
        // As the answer to a pending call of ours (its id rewritten when it has a numeric one).
        let (mut c, _) = ready_client(&recs, server, HapSettings::default());
        c.encode(0, Uplink::Text("x".into())).unwrap();
        let v: Value = serde_json::from_str(line).unwrap();
        let wire = if v["id"].is_number() {
            with_id(line, 3)
        } else {
            Wire::Text(line.into())
        };
        let d = c.decode(0, wire).unwrap();
        match d.events.as_slice() {
            [Downlink::Unknown { reason, .. }] => {
                assert!(!reason.is_empty());
                assert!(!v["id"].is_number(), "{line}");
                skipped += 1;
            }
            [
                Downlink::ResponseStarted { .. },
                Downlink::Error { code, message, .. },
                Downlink::ResponseFinished { .. },
            ] => {
                assert_eq!(*code, v["error"]["code"].to_string());
                assert!(message.starts_with(&v["error"]["message"].as_str().unwrap()[..20]));
                errors += 1;
            }
            [Downlink::ResponseStarted { .. }, rest @ ..] => {
                assert!(
                    matches!(
                        rest.last(),
                        Some(Downlink::ResponseFinished {
                            status: FinishStatus::Ok,
                            ..
                        })
                    ),
                    "{line}"
                );
                ok += 1;
            }
            other => panic!("{line}: {other:?}"),
        }
    }
    assert_eq!(recs.len(), 23);
    assert_eq!((ok, errors, skipped), (10, 9, 4));
}

#[test]
fn seed_agent_surface_matches_the_documented_shape() {
    let recs = records();
    let mut c = HapClient::new(HapSettings {
        surface: Surface::Agent,
        agent: Some("echo".into()),
        ..HapSettings::default()
    });
    let open = c.open(0, &SessionInfo::default());
    let mut expect = request_of(&recs, ECHO, "agent/list");
    expect["id"] = json!(1);
    assert_eq!(value(&open[0]), expect);
    let d = c
        .decode(
            0,
            Wire::Text(r#"{"jsonrpc":"2.0","id":1,"result":[{"name":"echo"}]}"#.into()),
        )
        .unwrap();
    assert!(d.events.is_empty());
    assert_eq!(
        value(&d.replies[0]),
        json!({"jsonrpc":"2.0","id":2,"method":"agent/describe","params":{"agent":"echo"}})
    );
    let d = c
        .decode(
            0,
            Wire::Text(r#"{"jsonrpc":"2.0","id":2,"result":{"name":"echo"}}"#.into()),
        )
        .unwrap();
    assert_eq!(
        d.events,
        [Downlink::Ready {
            session: "echo".into()
        }]
    );
    let sent = c.encode(0, Uplink::Text("hi".into())).unwrap();
    let mut expect = request_of(&recs, ECHO, "agent/execute");
    expect["id"] = json!(3);
    assert_eq!(value(&sent[0]), expect);
    let d = c
        .decode(
            0,
            Wire::Text(
                r#"{"jsonrpc":"2.0","result":{"output":"Analysis results","metadata":{"duration":1.5}},"id":3}"#.into(),
            ),
        )
        .unwrap();
    assert!(d.events.contains(&Downlink::TextDelta {
        message_id: match &d.events[0] {
            Downlink::ResponseStarted { id } => id.clone(),
            e => panic!("{e:?}"),
        },
        text: "Analysis results".into()
    }));
}

#[test]
fn auto_falls_back_to_agent_list_and_fails_fatally_when_nothing_answers() {
    let recs = records();
    let mut c = HapClient::new(HapSettings::default());
    c.open(0, &SessionInfo::default());
    // tools/list answered with an error: agent/list is tried.
    let d = c
        .decode(0, Wire::Text(r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"Unknown method: tools/list"}}"#.into()))
        .unwrap();
    assert_eq!(value(&d.replies[0])["method"], "agent/list");
    assert_eq!(value(&d.replies[0])["id"], 3);
    // 1.0.1's answer to agent/list (the capture's): nothing usable is left.
    let d = c
        .decode(0, with_id(&response_of(&recs, ECHO, "agent/list"), 3))
        .unwrap();
    let [
        Downlink::Error {
            code,
            message,
            fatal: true,
        },
    ] = d.events.as_slice()
    else {
        panic!("{:?}", d.events)
    };
    assert_eq!(code, "hap_discovery");
    assert!(
        message.contains("tools/list: Unknown method")
            && message.contains("Method must start with"),
        "{message}"
    );
}

#[test]
fn out_of_order_answers_are_matched_by_id() {
    let recs = records();
    let mut c = HapClient::new(HapSettings::default());
    c.open(0, &SessionInfo::default());
    // The server info first, then tools/list.
    let info = response_of(&recs, ECHO, "hap://server/info");
    assert!(c.decode(0, with_id(&info, 2)).unwrap().events.is_empty());
    // A turn before Ready waits.
    assert!(
        c.encode(0, Uplink::Text("early".into()))
            .unwrap()
            .is_empty()
    );
    let tools = response_of(&recs, ECHO, "tools/list\",\"params\":{}}");
    let d = c.decode(0, with_id(&tools, 1)).unwrap();
    assert_eq!(
        d.events,
        [Downlink::Ready {
            session: "echo-server".into()
        }]
    );
    assert_eq!(value(&d.replies[0])["params"]["arguments"]["text"], "early");
    assert_eq!(value(&d.replies[0])["id"], 3);
}

#[test]
fn responses_with_unknown_or_missing_ids_and_garbage_are_skipped() {
    let recs = records();
    let (mut c, _) = ready_client(&recs, ECHO, HapSettings::default());
    let d = c
        .decode(
            0,
            Wire::Text(r#"{"jsonrpc":"2.0","id":99,"result":"stray"}"#.into()),
        )
        .unwrap();
    assert!(matches!(&d.events[..], [Downlink::Unknown { reason, .. }] if reason.contains("99")));
    let d = c
        .decode(
            0,
            Wire::Text(r#"{"jsonrpc":"2.0","result":"no id"}"#.into()),
        )
        .unwrap();
    assert!(
        matches!(&d.events[..], [Downlink::Unknown { reason, .. }] if reason.contains("without a usable id"))
    );
    for garbage in ["not json", "[1,2]", r#"{"jsonrpc":"2.0","id":3}"#] {
        assert!(
            matches!(
                c.decode(0, Wire::Text(garbage.into())),
                Err(ProtocolError::Malformed(_))
            ),
            "{garbage}"
        );
    }
    assert_eq!(c.stats().malformed, 3);
    let d = c
        .decode(
            0,
            Wire::Text(r#"{"jsonrpc":"2.0","method":"surprise","params":{}}"#.into()),
        )
        .unwrap();
    assert!(matches!(&d.events[..], [Downlink::Unknown { kind, .. }] if kind == "surprise"));
}

#[test]
fn progress_notifications_are_tool_activity() {
    let recs = records();
    let (mut c, _) = ready_client(&recs, ECHO, HapSettings::default());
    c.encode(0, Uplink::Text("look it up".into())).unwrap();
    let progress = |current: u32, state: &str| {
        Wire::Text(json!({"jsonrpc":"2.0","method":"progress","params":{"request_id":3,"current":current,"total":2,"message":"Looking","state":state}}).to_string())
    };
    let d = c.decode(0, progress(0, "started")).unwrap();
    assert!(matches!(d.events[0], Downlink::ResponseStarted { .. }));
    assert!(
        matches!(&d.events[1], Downlink::Tool { state: ToolState::Started, name, .. } if name == "echo")
    );
    let d = c.decode(0, progress(1, "in_progress")).unwrap();
    assert!(matches!(
        d.events[..],
        [Downlink::Tool {
            state: ToolState::Progress,
            ..
        }]
    ));
    let log = r#"{"jsonrpc":"2.0","method":"log","params":{"level":"info","message":"hi","request_id":3}}"#;
    assert!(
        c.decode(0, Wire::Text(log.into()))
            .unwrap()
            .events
            .is_empty()
    );
    let d = c
        .decode(
            0,
            Wire::Text(r#"{"jsonrpc":"2.0","id":3,"result":"found"}"#.into()),
        )
        .unwrap();
    // The still-open activity ends before the text.
    assert!(matches!(
        d.events[0],
        Downlink::Tool {
            state: ToolState::Done,
            ..
        }
    ));
    assert!(matches!(&d.events[1], Downlink::TextDelta { text, .. } if text == "found"));
    assert!(
        !d.events
            .iter()
            .any(|e| matches!(e, Downlink::ResponseStarted { .. }))
    );
}

#[test]
fn barge_in_drops_the_pending_answer_and_counts_it() {
    let recs = records();
    let (mut c, _) = ready_client(&recs, ECHO, HapSettings::default());
    c.encode(0, Uplink::Text("first".into())).unwrap();
    assert!(!c.cancel_by_reconnect());
    assert!(
        c.encode(0, Uplink::Interrupt).unwrap().is_empty(),
        "HAP has no cancel"
    );
    assert!(!c.in_turn());
    let sent = c.encode(0, Uplink::Text("second".into())).unwrap();
    assert_eq!(value(&sent[0])["id"], 4);
    // The first call's progress and answer come late: dropped.
    let late_progress =
        r#"{"jsonrpc":"2.0","method":"progress","params":{"request_id":3,"current":1,"total":2}}"#;
    assert!(
        c.decode(0, Wire::Text(late_progress.into()))
            .unwrap()
            .events
            .is_empty()
    );
    let late = r#"{"jsonrpc":"2.0","id":3,"result":"first answer"}"#;
    assert_eq!(
        c.decode(0, Wire::Text(late.into())).unwrap(),
        Default::default()
    );
    assert_eq!(c.stats().cancelled_run_frames_dropped, 2);
    let d = c
        .decode(
            0,
            Wire::Text(r#"{"jsonrpc":"2.0","id":4,"result":"second answer"}"#.into()),
        )
        .unwrap();
    assert!(
        d.events
            .iter()
            .any(|e| matches!(e, Downlink::TextDelta { text, .. } if text == "second answer"))
    );
}

#[test]
fn a_call_without_an_answer_times_out_through_poll() {
    let recs = records();
    let (mut c, _) = ready_client(
        &recs,
        ECHO,
        HapSettings {
            request_timeout_ms: 1_000,
            ..HapSettings::default()
        },
    );
    c.encode(100, Uplink::Text("anyone?".into())).unwrap();
    c.encode(100, Uplink::Text("queued".into())).unwrap();
    assert_eq!(c.next_deadline(), Some(1_100));
    assert!(c.poll(1_099).is_empty());
    assert!(c.take_events().is_empty());
    let next = c.poll(1_100);
    let events = c.take_events();
    assert!(
        matches!(&events[1], Downlink::Error { code, fatal: false, message } if code == "timeout" && message.contains("tools/call")),
        "{events:?}"
    );
    assert!(matches!(
        events[2],
        Downlink::ResponseFinished {
            status: FinishStatus::Error,
            ..
        }
    ));
    // The queued turn goes now; a late answer to the first is dropped.
    assert_eq!(value(&next[0])["params"]["arguments"]["text"], "queued");
    let late = r#"{"jsonrpc":"2.0","id":3,"result":"late"}"#;
    assert!(
        c.decode(2_000, Wire::Text(late.into()))
            .unwrap()
            .events
            .is_empty()
    );
    assert_eq!(c.stats().cancelled_run_frames_dropped, 1);
}

#[test]
fn discovery_without_an_answer_is_fatal() {
    let mut c = HapClient::new(HapSettings {
        surface: Surface::Tools,
        request_timeout_ms: 500,
        ..HapSettings::default()
    });
    c.open(0, &SessionInfo::default());
    assert!(c.poll(500).is_empty());
    let events = c.take_events();
    assert!(
        matches!(&events[..], [Downlink::Error { fatal: true, .. }]),
        "{events:?}"
    );
    assert_eq!(c.next_deadline(), None);
    assert!(
        c.encode(
            0,
            Uplink::Audio {
                codec: hearken::protocol::AudioCodec::Opus,
                rate_hz: 16_000,
                channels: 1,
                duration_ms: 20,
                data: vec![]
            }
        )
        .is_err()
    );
}

#[test]
fn an_answer_with_a_bare_error_or_neither_result_nor_error_ends_the_call_at_once() {
    let recs = records();
    let (mut c, _) = ready_client(&recs, ECHO, HapSettings::default());
    for (n, answer, said) in [
        (
            3,
            r#"{"jsonrpc":"2.0","id":3,"error":"backend is down"}"#,
            "backend is down",
        ),
        (4, r#"{"jsonrpc":"2.0","id":4,"error":-32000}"#, "-32000"),
        (5, r#"{"jsonrpc":"2.0","id":5}"#, "neither result nor error"),
    ] {
        let sent = c.encode(0, Uplink::Text(format!("turn {n}"))).unwrap();
        assert_eq!(value(&sent[0])["id"], n);
        let d = c.decode(10, Wire::Text(answer.into())).unwrap();
        // Not left to the request timeout: the turn ends now, saying what came.
        assert!(
            d.events.iter().any(
                |e| matches!(e, Downlink::Error { message, fatal: false, .. } if message.contains(said))
            ),
            "{answer}: {:?}",
            d.events
        );
        assert!(
            matches!(
                d.events.last(),
                Some(Downlink::ResponseFinished {
                    status: FinishStatus::Error,
                    ..
                })
            ),
            "{answer}: {:?}",
            d.events
        );
        assert!(!c.in_turn());
        assert_eq!(c.pending_calls(), 0);
    }
    assert_eq!(c.stats().malformed, 3);
    // A message with neither for no call of ours is still just malformed.
    assert!(matches!(
        c.decode(10, Wire::Text(r#"{"jsonrpc":"2.0","id":99}"#.into())),
        Err(ProtocolError::Malformed(_))
    ));
}
