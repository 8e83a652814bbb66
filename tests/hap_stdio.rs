//! HAP end to end: the stdio transport against real child processes (`sh -c` scripts: an exit
//! mid-request, garbage, a huge line, a missing program) and the HAP client against the built-in
//! agent over `tokio::io::duplex` (a full turn with progress, the seed surface, the test hooks, a
//! barge-in with answers out of order, the agent's strictness on the capture's requests).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use hearken::agent::hap::{self as agent, AgentLog, AgentSettings, Served};
use hearken::protocol::hap::{HapClient, HapSettings, Surface};
use hearken::protocol::{
    Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState, Uplink, Wire,
};
use hearken::transport::stdio::{self, StdioConnection, StdioSettings};
use hearken::transport::{AgentConnection, TransportError};
use serde_json::Value;

const NO_HANG: Duration = Duration::from_secs(10);

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[tokio::test]
async fn a_missing_program_is_a_clear_permanent_error() {
    let e = stdio::connect(&["/nonexistent/hap-agent".to_string()])
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Spawn { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/hap-agent"), "{e}");
    assert!(!e.is_transient());
    assert!(stdio::connect(&[]).await.is_err());
}

#[tokio::test]
async fn a_child_that_exits_mid_request_reports_its_status_and_stderr() {
    let mut c = stdio::connect(&sh(
        "read line; echo \"got $line\" >&2; echo 'fatal: out of cheese' >&2; exit 3",
    ))
    .await
    .unwrap();
    assert!(c.pid().is_some());
    c.send(Wire::Text(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#.into(),
    ))
    .await
    .unwrap();
    let r = tokio::time::timeout(NO_HANG, c.recv())
        .await
        .expect("no hang");
    let e = r.unwrap().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, TransportError::Exited { .. }), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(
        msg.contains("fatal: out of cheese") && msg.contains("tools/list"),
        "{msg}"
    );
    assert!(e.is_transient());
    // After the error the connection is closed, not stuck.
    assert!(
        tokio::time::timeout(NO_HANG, c.recv())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn garbage_lines_are_passed_up_for_the_codec_to_reject() {
    let mut c = stdio::connect(&sh(
        r#"printf 'garbage here\n\n\r\n{"jsonrpc":"2.0","id":1,"result":[]}\r\nno newline at the end'"#,
    ))
    .await
    .unwrap();
    let mut lines = Vec::new();
    while let Some(r) = tokio::time::timeout(NO_HANG, c.recv()).await.unwrap() {
        match r {
            Ok(Wire::Text(t)) => lines.push(t),
            Ok(Wire::Binary(_)) => panic!("binary"),
            Err(e) => {
                assert!(e.to_string().contains("exit status: 0"), "{e}");
                break;
            }
        }
    }
    assert_eq!(
        lines,
        [
            "garbage here",
            r#"{"jsonrpc":"2.0","id":1,"result":[]}"#,
            "no newline at the end"
        ]
    );
    let mut codec = HapClient::new(HapSettings::default());
    codec.open(0, &SessionInfo::default());
    assert!(matches!(
        codec.decode(0, Wire::Text(lines[0].clone())),
        Err(ProtocolError::Malformed(_))
    ));
    assert_eq!(codec.stats().malformed, 1);
}

#[tokio::test]
async fn a_huge_line_is_an_error_and_is_not_buffered() {
    let mut c = stdio::connect_with(&StdioSettings {
        max_line_bytes: 64 * 1024,
        ..StdioSettings::new(&sh("head -c 5000000 /dev/zero | tr '\\0' a; echo; sleep 5"))
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(NO_HANG, c.recv())
        .await
        .expect("no hang");
    assert!(
        matches!(r, Some(Err(TransportError::TooLarge { limit: 65_536 }))),
        "{r:?}"
    );
    assert!(c.recv().await.is_none());
    // Dropping the connection kills the sleeping child (kill_on_drop).
    drop(c);
}

#[tokio::test]
async fn close_stops_a_child_that_ignores_stdin() {
    let mut c = stdio::connect(&sh("sleep 30")).await.unwrap();
    let t = std::time::Instant::now();
    c.close().await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(c.pid().is_none(), "the child was reaped");
}

/// The client's side of a duplex pair served by the built-in agent.
struct Session {
    conn: StdioConnection,
    codec: HapClient,
    log: AgentLog,
    agent: tokio::task::JoinHandle<std::io::Result<Served>>,
    events: Vec<Downlink>,
    now_ms: u64,
}

impl Session {
    fn start(agent_settings: AgentSettings, settings: HapSettings) -> Session {
        let (client_end, agent_end) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(agent_end);
        let (cr, cw) = tokio::io::split(client_end);
        let log = AgentLog::default();
        let agent = tokio::spawn(agent::serve_stdio_with_log(
            ar,
            aw,
            agent_settings,
            log.clone(),
        ));
        Session {
            conn: StdioConnection::from_streams(cr, cw, 1 << 20),
            codec: HapClient::new(settings),
            log,
            agent,
            events: Vec::new(),
            now_ms: 0,
        }
    }

    async fn send(&mut self, wires: Vec<Wire>) {
        for w in wires {
            self.conn.send(w).await.unwrap();
        }
    }

    async fn open(&mut self) -> String {
        let w = self.codec.open(0, &SessionInfo::default());
        self.send(w).await;
        match self.until(|e| matches!(e, Downlink::Ready { .. })).await {
            Downlink::Ready { session } => session,
            _ => unreachable!(),
        }
    }

    /// Reads and decodes frames (and fires the codec's timers) until an event matches.
    async fn until(&mut self, pred: impl Fn(&Downlink) -> bool) -> Downlink {
        self.until_all(pred).await.pop().unwrap()
    }

    /// Like [`Session::until`], returning every event up to and including the match.
    async fn until_all(&mut self, pred: impl Fn(&Downlink) -> bool) -> Vec<Downlink> {
        let deadline = tokio::time::Instant::now() + NO_HANG;
        loop {
            if let Some(i) = self.events.iter().position(&pred) {
                return self.events.drain(..=i).collect();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no hang: {:?}",
                self.events
            );
            match tokio::time::timeout(Duration::from_millis(50), self.conn.recv()).await {
                Err(_) => {
                    self.now_ms += 50;
                    let w = self.codec.poll(self.now_ms);
                    self.events.extend(self.codec.take_events());
                    self.send(w).await;
                }
                Ok(None) => panic!("closed; events {:?}", self.events),
                Ok(Some(Err(e))) => panic!("{e}"),
                Ok(Some(Ok(wire))) => match self.codec.decode(self.now_ms, wire) {
                    Ok(d) => {
                        self.events.extend(d.events);
                        self.send(d.replies).await;
                    }
                    Err(e) => self.events.push(Downlink::Unknown {
                        kind: "malformed".into(),
                        reason: e.to_string(),
                    }),
                },
            }
        }
    }

    async fn say(&mut self, text: &str) -> Vec<Downlink> {
        let w = self
            .codec
            .encode(self.now_ms, Uplink::Text(text.into()))
            .unwrap();
        self.send(w).await;
        self.until_all(|e| matches!(e, Downlink::ResponseFinished { .. }))
            .await
    }

    fn said(events: &[Downlink]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Downlink::TextDelta { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }
}

fn quick() -> AgentSettings {
    AgentSettings {
        lookup_ms: 60,
        ..AgentSettings::default()
    }
}

#[tokio::test]
async fn a_full_turn_with_the_builtin_agent() {
    let mut s = Session::start(quick(), HapSettings::default());
    assert_eq!(s.open().await, "hearken-hap");
    assert_eq!(s.codec.target(), Some(("tools/call", "ask")));
    s.events.clear();
    let ev = s.say("what is the weather").await;
    let states: Vec<ToolState> = ev
        .iter()
        .filter_map(|e| match e {
            Downlink::Tool { state, name, .. } => {
                assert_eq!(name, "ask");
                Some(*state)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            ToolState::Started,
            ToolState::Progress,
            ToolState::Progress,
            ToolState::Done
        ]
    );
    assert!(matches!(ev[0], Downlink::ResponseStarted { .. }));
    assert_eq!(
        Session::said(&ev),
        ["You said: what is the weather. I looked it up, and that is all I found."]
    );
    assert!(matches!(
        ev.last(),
        Some(Downlink::ResponseFinished {
            status: FinishStatus::Ok,
            ..
        })
    ));
    let log = s.log.snapshot();
    assert_eq!(log.methods, ["tools/list", "resources/read", "tools/call"]);
    assert_eq!(log.inputs, ["what is the weather"]);
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    // The client closing its side ends the agent.
    s.conn.close().await;
    assert_eq!(s.agent.await.unwrap().unwrap(), Served::Eof);
}

#[tokio::test]
async fn the_seed_agent_surface_with_the_builtin_agent() {
    let mut s = Session::start(
        AgentSettings {
            seed_methods: true,
            ..quick()
        },
        HapSettings {
            surface: Surface::Agent,
            agent: Some("hearken-hap".into()),
            ..HapSettings::default()
        },
    );
    assert_eq!(s.open().await, "hearken-hap");
    assert_eq!(s.codec.target(), Some(("agent/execute", "hearken-hap")));
    let ev = s.say("hello there").await;
    assert_eq!(
        Session::said(&ev),
        ["You said: hello there. I looked it up, and that is all I found."]
    );
    let log = s.log.snapshot();
    assert_eq!(
        log.methods,
        ["agent/list", "agent/describe", "agent/execute"]
    );
    assert!(log.violations.is_empty(), "{:?}", log.violations);
}

#[tokio::test]
async fn an_error_object_is_surfaced_with_code_and_message() {
    let mut s = Session::start(
        AgentSettings {
            error_on_call: Some((-32005, "the lookup service is down".into())),
            ..quick()
        },
        HapSettings::default(),
    );
    s.open().await;
    let ev = s.say("anything").await;
    assert!(ev.contains(&Downlink::Error {
        code: "-32005".into(),
        message: "the lookup service is down (AgentError)".into(),
        fatal: false
    }));
    assert!(matches!(
        ev.last(),
        Some(Downlink::ResponseFinished {
            status: FinishStatus::Error,
            ..
        })
    ));
    assert!(Session::said(&ev).is_empty());
}

#[tokio::test]
async fn garbage_before_an_answer_is_skipped_and_the_turn_completes() {
    let mut s = Session::start(
        AgentSettings {
            garbage_before_answer: true,
            ..quick()
        },
        HapSettings::default(),
    );
    s.open().await;
    let ev = s.say("one").await;
    assert!(ev.iter().any(|e| matches!(e, Downlink::Unknown { kind, reason } if kind == "malformed" && reason.contains("not JSON"))));
    assert_eq!(Session::said(&ev).len(), 1);
    assert_eq!(s.codec.stats().malformed, 1);
}

#[tokio::test]
async fn an_agent_that_exits_mid_call_closes_the_stream_without_a_hang() {
    let mut s = Session::start(
        AgentSettings {
            exit_on_call: Some(1),
            ..quick()
        },
        HapSettings::default(),
    );
    s.open().await;
    let w = s.codec.encode(0, Uplink::Text("bye".into())).unwrap();
    s.send(w).await;
    assert_eq!(s.agent.await.unwrap().unwrap(), Served::ExitRequested);
    // The agent task dropped its ends: the client sees the close.
    let r = tokio::time::timeout(NO_HANG, s.conn.recv())
        .await
        .expect("no hang");
    assert!(r.is_none(), "{r:?}");
    assert!(
        s.codec.in_turn(),
        "the call stays pending; the link reconnects"
    );
}

#[tokio::test]
async fn a_timeout_ends_a_call_the_agent_never_answers() {
    let mut s = Session::start(
        AgentSettings {
            lookup_ms: 3_000,
            progress_steps: 1,
            ..AgentSettings::default()
        },
        HapSettings {
            request_timeout_ms: 300,
            ..HapSettings::default()
        },
    );
    s.open().await;
    let ev = s.say("slow").await;
    assert!(
        ev.iter()
            .any(|e| matches!(e, Downlink::Error { code, .. } if code == "timeout")),
        "{ev:?}"
    );
}

#[tokio::test]
async fn barge_in_drops_the_pending_answer_even_out_of_order() {
    let mut s = Session::start(
        AgentSettings {
            out_of_order: true,
            out_of_order_wait_ms: 5_000,
            lookup_ms: 90,
            ..AgentSettings::default()
        },
        HapSettings::default(),
    );
    s.open().await;
    let w = s
        .codec
        .encode(0, Uplink::Text("first question".into()))
        .unwrap();
    s.send(w).await;
    // The agent is working on it ...
    s.until(|e| {
        matches!(
            e,
            Downlink::Tool {
                state: ToolState::Started,
                ..
            }
        )
    })
    .await;
    // ... when the user barges in and asks something else.
    assert!(s.codec.encode(0, Uplink::Interrupt).unwrap().is_empty());
    let ev = s.say("second question").await;
    // The second answer comes first (out of order), then the first one, which is dropped.
    assert_eq!(
        Session::said(&ev),
        ["You said: second question. I looked it up, and that is all I found."]
    );
    let deadline = tokio::time::Instant::now() + NO_HANG;
    while s.codec.stats().cancelled_run_frames_dropped == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        let wire = tokio::time::timeout(NO_HANG, s.conn.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let d = s.codec.decode(0, wire).unwrap();
        assert!(Session::said(&d.events).is_empty(), "{:?}", d.events);
    }
    assert_eq!(
        s.log.snapshot().inputs,
        ["first question", "second question"]
    );
    assert!(s.log.snapshot().violations.is_empty());
}

/// The capture's requests, sent raw to the built-in agent set up like the captured echo server:
/// the same ids and the same error codes come back, and every bad request is a violation.
#[tokio::test]
async fn the_builtin_agent_answers_the_captured_requests_like_haive_hap() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hap/observed-stdio-exchange.jsonl");
    let recs: Vec<Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["server"] == "HAPServer+echo tool")
        .collect();
    let mut s = Session::start(
        AgentSettings {
            name: "echo-server".into(),
            tool: "echo".into(),
            lookup_ms: 0,
            ..AgentSettings::default()
        },
        HapSettings::default(),
    );
    for r in &recs {
        let request = r["request_line"].as_str().unwrap();
        let want: Value = serde_json::from_str(r["response_line"].as_str().unwrap()).unwrap();
        s.conn.send(Wire::Text(request.into())).await.unwrap();
        let got: Value = loop {
            let Some(Ok(Wire::Text(t))) =
                tokio::time::timeout(NO_HANG, s.conn.recv()).await.unwrap()
            else {
                panic!("closed")
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v.get("method").is_none() {
                break v; // not the log notification
            }
        };
        assert_eq!(got["jsonrpc"], "2.0");
        assert_eq!(got["id"], want["id"], "{request}");
        if request.contains("resources/list") {
            // 1.0.1 fails here by a bug of its own (§8); ours lists its resource.
            assert!(got["result"].is_array());
            continue;
        }
        assert_eq!(
            got["error"]["code"], want["error"]["code"],
            "{request}: {got}"
        );
        assert_eq!(
            got.get("result").is_some(),
            want.get("result").is_some(),
            "{request}"
        );
    }
    let v = s.log.snapshot().violations;
    let has = |what: &str| v.iter().any(|x| x.contains(what));
    for what in [
        "not JSON",
        "a batch",
        "without id",
        "not an integer",
        "used twice",
        "extra top-level key",
        "not \"jsonrpc\":\"2.0\"",
        "unknown method \"agents/list\"",
        "unknown method \"agent/execute\"",
        "unknown tool \"nope\"",
        "without text",
    ] {
        assert!(has(what), "{what}: {v:?}");
    }
}
