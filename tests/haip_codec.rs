//! HAIP client codec, black-box: golden frames from the reference servers, schema validity of everything
//! we encode, and the behaviour rules (binary vs base64, barge-in, de-duplication, replay, pause,
//! credit, bad input, errors, heartbeats). Fixtures: `tests/fixtures/haip/` (see its README).

// The rig helpers below are not #[test] fns, so clippy.toml's allow-unwrap-in-tests misses them.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;

use hearken::config::Secret;
use hearken::protocol::haip::{ACCEPT_EVENTS, HaipClient, HaipSettings};
use hearken::protocol::{
    AudioCodec, Decoded, Downlink, FinishStatus, Protocol, ProtocolError, SessionInfo, ToolState,
    Uplink, Wire,
};
use serde_json::{Value, json};
use uuid::Uuid;

const SESSION: &str = "9fbf9672-7d40-43cc-9b52-65dccc1855ed";
const WALL_MS: u64 = 1_795_315_057_000;
const SCHEMA: &str = "haip-v1.1.2-message-envelope.schema.at-f8dfe4d.json";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/haip")
        .join(name)
}

fn read_json(name: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn capture(name: &str) -> Vec<Value> {
    fs::read_to_string(fixture(name))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "frame")
        .collect()
}

/// A capture line as the wire frame it stood for (binary frames are zeros of the recorded size).
fn capture_wire(line: &Value) -> Wire {
    match line["ws"].as_str() {
        Some("binary") => Wire::Binary(vec![0; line["bytes"].as_u64().unwrap() as usize]),
        _ => Wire::Text(line["frame"].to_string()),
    }
}

fn wire(v: &Value) -> Wire {
    Wire::Text(v.to_string())
}

fn json_of(w: &Wire) -> Value {
    match w {
        Wire::Text(t) => serde_json::from_str(t).unwrap(),
        Wire::Binary(b) => panic!("expected a text frame, got {} binary bytes", b.len()),
    }
}

fn texts(ws: &[Wire]) -> Vec<Value> {
    ws.iter()
        .filter(|w| matches!(w, Wire::Text(_)))
        .map(json_of)
        .collect()
}

fn types(ws: &[Wire]) -> Vec<String> {
    texts(ws)
        .iter()
        .map(|v| v["type"].as_str().unwrap().to_owned())
        .collect()
}

fn info() -> SessionInfo {
    SessionInfo {
        token: None,
        wall_ms: WALL_MS,
    }
}

fn opus(n: u8) -> Uplink {
    Uplink::Audio {
        codec: AudioCodec::Opus,
        rate_hz: 16_000,
        channels: 1,
        duration_ms: 20,
        data: vec![n; 40],
    }
}

fn pcm(bytes: usize, first: u8) -> Uplink {
    let mut data = vec![0u8; bytes];
    data[0] = first;
    Uplink::Audio {
        codec: AudioCodec::Pcm16,
        rate_hz: 16_000,
        channels: 1,
        duration_ms: 20,
        data,
    }
}

/// The agent side: builds frames with its own `seq` style.
struct Agent {
    seq: u64,
    numeric: bool,
}

impl Agent {
    fn numeric() -> Self {
        Agent {
            seq: 0,
            numeric: true,
        }
    }
    /// Like the reference servers: `Date.now()` plus base36 noise.
    fn reference() -> Self {
        Agent {
            seq: 0,
            numeric: false,
        }
    }
    fn frame(&mut self, channel: &str, ty: &str, payload: Value) -> Value {
        self.seq += 1;
        let seq = if self.numeric {
            self.seq.to_string()
        } else {
            format!("{}x{}q", WALL_MS + self.seq, self.seq)
        };
        json!({
            "id": Uuid::new_v4().to_string(), "session": SESSION, "seq": seq,
            "ts": (WALL_MS + self.seq).to_string(), "channel": channel, "type": ty, "payload": payload,
        })
    }
    fn hai(&mut self, binary: bool, credit: Option<(u64, u64)>) -> Value {
        let mut caps = json!({ "binary_frames": binary });
        if let Some((m, b)) = credit {
            caps["flow_control"] =
                json!({ "initial_credit_messages": m, "initial_credit_bytes": b });
        }
        self.frame(
            "SYSTEM",
            "HAI",
            json!({ "haip_version": "1.1.2", "accept_major": [1], "accept_events": ACCEPT_EVENTS,
                    "capabilities": caps }),
        )
    }
}

/// A client plus everything it sent, with a clock.
struct Rig {
    c: HaipClient,
    agent: Agent,
    sent: Vec<Wire>,
    now: u64,
}

impl Rig {
    fn new(settings: HaipSettings, agent: Agent) -> Self {
        Rig {
            c: HaipClient::new(settings),
            agent,
            sent: Vec::new(),
            now: 1_000,
        }
    }
    /// Opened, and the agent's HAI received.
    fn ready(settings: HaipSettings, binary: bool, credit: Option<(u64, u64)>) -> Self {
        let mut r = Rig::new(settings, Agent::numeric());
        r.open();
        let hai = r.agent.hai(binary, credit);
        let d = r.dec(&hai).unwrap();
        assert_eq!(
            d.events,
            vec![Downlink::Ready {
                session: SESSION.into()
            }]
        );
        r
    }
    fn open(&mut self) -> Vec<Wire> {
        let w = self.c.open(self.now, &info());
        self.sent.extend(w.clone());
        w
    }
    fn enc(&mut self, up: Uplink) -> Vec<Wire> {
        let w = self.c.encode(self.now, up).unwrap();
        self.sent.extend(w.clone());
        w
    }
    fn dec_wire(&mut self, w: Wire) -> Result<Decoded, ProtocolError> {
        let d = self.c.decode(self.now, w)?;
        self.sent.extend(d.replies.clone());
        Ok(d)
    }
    fn dec(&mut self, v: &Value) -> Result<Decoded, ProtocolError> {
        self.dec_wire(wire(v))
    }
    /// The agent sends `ty` on `channel`.
    fn agent_sends(&mut self, channel: &str, ty: &str, payload: Value) -> Decoded {
        let f = self.agent.frame(channel, ty, payload);
        self.dec(&f).unwrap()
    }
    fn poll(&mut self, now: u64) -> Vec<Wire> {
        self.now = now;
        let w = self.c.poll(now);
        self.sent.extend(w.clone());
        w
    }
}

fn assert_malformed(r: Result<Decoded, ProtocolError>) -> String {
    match r {
        Err(ProtocolError::Malformed(reason)) => {
            assert!(!reason.is_empty());
            reason
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------ golden

#[test]
fn every_golden_frame_decodes_or_is_malformed() {
    for name in [
        "observed-ws-server-at-f8dfe4d.jsonl",
        "observed-ws-server-at-f04a2f3.jsonl",
    ] {
        let mut c = HaipClient::new(HaipSettings::default());
        c.open(0, &info());
        let lines = capture(name);
        assert!(lines.len() > 15, "{name}");
        for (i, line) in lines.iter().enumerate() {
            match c.decode(i as u64, capture_wire(line)) {
                Ok(_) => {}
                Err(ProtocolError::Malformed(reason)) => assert!(!reason.is_empty()),
                Err(e) => panic!("{name} frame {}: {e}", line["n"]),
            }
        }
    }
    let mut c = HaipClient::new(HaipSettings::default());
    c.open(0, &info());
    let examples = read_json("readme-examples-v1.1.2.at-f8dfe4d.json");
    let mut frames = Vec::new();
    for ex in examples["examples"].as_array().unwrap() {
        match &ex["value"] {
            Value::Array(a) => frames.extend(a.iter().cloned()),
            v => frames.push(v.clone()),
        }
    }
    frames.push(read_json("readme-handshake-example-v1.1.2.at-f8dfe4d.json"));
    assert_eq!(frames.len(), 6);
    for f in &frames {
        match c.decode(0, wire(f)) {
            Ok(_) | Err(ProtocolError::Malformed(_)) => {}
            Err(e) => panic!("{f}: {e}"),
        }
    }
}

#[test]
fn golden_f8dfe4d_server_frames_map_as_expected() {
    let mut c = HaipClient::new(HaipSettings::default());
    let hello = c.open(0, &info());
    let local_session = json_of(&hello[0])["session"].as_str().unwrap().to_owned();
    assert_ne!(local_session, SESSION);
    let mut by_n = std::collections::BTreeMap::new();
    for line in capture("observed-ws-server-at-f8dfe4d.jsonl") {
        if line["dir"] != "S->C" {
            continue;
        }
        let n = line["n"].as_u64().unwrap();
        by_n.insert(n, c.decode(n * 10, capture_wire(&line)).unwrap());
    }
    assert_eq!(
        by_n[&1].events,
        vec![Downlink::Ready {
            session: SESSION.into()
        }]
    );
    assert_eq!(c.session(), SESSION);
    assert_eq!(
        by_n[&7].events,
        vec![Downlink::TextDelta {
            message_id: "ae580edb-22aa-48b1-be38-295f55ec7cd3".into(),
            text: "Echo: ".into()
        }]
    );
    assert_eq!(
        by_n[&8].events,
        vec![Downlink::TextDelta {
            message_id: "0721c1ef-a3b6-46c8-9804-22ca0e449590".into(),
            text: "Echo: Hello agent".into()
        }]
    );
    let call = "8772929d-a99c-46c3-9cd2-f088d791e5ff";
    assert_eq!(
        by_n[&14].events,
        vec![Downlink::Tool {
            call_id: call.into(),
            name: String::new(),
            state: ToolState::Progress
        }]
    );
    for n in [15, 16] {
        assert_eq!(
            by_n[&n].events,
            vec![Downlink::Tool {
                call_id: call.into(),
                name: String::new(),
                state: ToolState::Done
            }]
        );
    }
    assert_eq!(
        by_n[&19].events,
        vec![Downlink::Error {
            code: "RUN_NOT_FOUND".into(),
            message: "Run not found".into(),
            fatal: false
        }]
    );
    assert!(
        matches!(&by_n[&21].events[..], [Downlink::Error { code, fatal: false, .. }] if code == "UNSUPPORTED_TYPE")
    );
    assert!(
        matches!(&by_n[&31].events[..], [Downlink::Error { code, fatal: false, .. }] if code == "INVALID_MESSAGE")
    );
    // The replay echo of the client's own START (no text) and PART.
    assert!(by_n[&26].events.is_empty());
    assert_eq!(
        by_n[&27].events,
        vec![Downlink::TextDelta {
            message_id: "60601838-7990-42df-8539-b5ef395a00fc".into(),
            text: "Hello agent".into()
        }]
    );
    // Server PINGs get a PONG carrying their nonce, in our adopted session.
    for (n, nonce) in [
        (24, "38d7b800-98d6-4755-864f-6f54a46d2818"),
        (32, "8c5fd0af-e4f1-4f1e-8eb0-afaaaa33fc7f"),
    ] {
        assert!(by_n[&n].events.is_empty());
        let replies = texts(&by_n[&n].replies);
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0]["type"], "PONG");
        assert_eq!(replies[0]["channel"], "SYSTEM");
        assert_eq!(replies[0]["payload"], json!({ "nonce": nonce }));
        assert_eq!(replies[0]["session"], SESSION);
        // The reference server's seq is not numeric: no ack.
        assert!(replies[0].get("ack").is_none());
    }
    assert!(by_n[&29].events.is_empty() && by_n[&29].replies.is_empty());
    assert_eq!(c.last_pong_ms(), Some(290));
    assert_eq!(c.stats().malformed, 0);
}

#[test]
fn golden_full_exchange_through_one_codec() {
    // Both directions through one codec: the client's TOOL_CALL names the tool for the server's
    // TOOL_UPDATE/DONE, the server's replay echo is dropped by id, the binary pair is joined.
    let mut c = HaipClient::new(HaipSettings::default());
    c.open(0, &info());
    let mut events = Vec::new();
    for line in capture("observed-ws-server-at-f8dfe4d.jsonl") {
        let n = line["n"].as_u64().unwrap();
        match c.decode(n, capture_wire(&line)) {
            Ok(d) => events.extend(d.events.into_iter().map(|e| (n, e))),
            Err(e) => panic!("frame {n}: {e}"),
        }
    }
    let tool_names: Vec<(u64, String)> = events
        .iter()
        .filter_map(|(n, e)| match e {
            Downlink::Tool { name, .. } => Some((*n, name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        tool_names,
        vec![
            (13, "echo".into()),
            (14, "echo".into()),
            (15, "echo".into()),
            (16, "echo".into())
        ]
    );
    let audio: Vec<(u64, usize)> = events
        .iter()
        .filter_map(|(n, e)| match e {
            Downlink::Audio {
                codec: AudioCodec::Pcm16,
                rate_hz: 16_000,
                channels: 1,
                data,
            } => Some((*n, data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(audio, vec![(11, 640), (12, 32)]);
    assert_eq!(c.stats().duplicates_dropped, 2); // frames 26 and 27 repeat ids of 4 and 5
    assert_eq!(c.stats().malformed, 0);

    // The D2 capture: HAI still gives Ready; D2 types are Unknown; the lone binary frame is malformed.
    let mut c = HaipClient::new(HaipSettings::default());
    c.open(0, &info());
    let mut unknown = Vec::new();
    let mut malformed = Vec::new();
    for line in capture("observed-ws-server-at-f04a2f3.jsonl") {
        let n = line["n"].as_u64().unwrap();
        match c.decode(n, capture_wire(&line)) {
            Ok(d) => {
                for e in d.events {
                    match e {
                        Downlink::Ready { session } => {
                            assert_eq!(session, "e9f8099d-7c8c-4aae-8cb3-fa5b09e24b2b")
                        }
                        Downlink::Unknown { kind, .. } => unknown.push(kind),
                        _ => {}
                    }
                }
            }
            Err(ProtocolError::Malformed(_)) => malformed.push(n),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(malformed, vec![16]);
    assert!(unknown.contains(&"MESSAGE".to_owned()));
    assert!(unknown.contains(&"TRANSACTION_START".to_owned()));
    assert!(unknown.contains(&"AUDIO".to_owned()));
}

// ------------------------------------------------------------------------------------------ schema

#[test]
fn everything_we_encode_is_schema_valid_and_well_sequenced() {
    let schema = read_json(SCHEMA);
    let validator = jsonschema::draft7::new(&schema).unwrap();
    let mut all: Vec<Wire> = Vec::new();

    // 1. Binary mode, numeric agent: the whole repertoire.
    let mut r = Rig::new(
        HaipSettings {
            ping_interval_ms: 10_000,
            ..HaipSettings::default()
        },
        Agent::numeric(),
    );
    r.open();
    let local = json_of(&r.sent[0])["session"].as_str().unwrap().to_owned();
    r.enc(Uplink::TurnStart); // queued until the agent's HAI
    let hai = r.agent.hai(true, Some((1000, 1 << 20)));
    r.dec(&hai).unwrap();
    for i in 0..50 {
        r.enc(opus(i));
    }
    r.enc(Uplink::TurnEnd { duration_ms: 1000 });
    r.enc(Uplink::Text("what's the weather".into()));
    let run = Uuid::new_v4().to_string();
    r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": run }));
    r.enc(Uplink::Interrupt);
    r.agent_sends("SYSTEM", "PING", json!({ "nonce": "n-7" }));
    r.poll(11_000); // our PING
    r.agent.seq += 2; // the agent's seq jumps: a gap
    r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": Uuid::new_v4().to_string(), "text": "x" }),
    );
    r.poll(11_600); // REPLAY_REQUEST
    for _ in 0..130 {
        r.agent_sends(
            "AGENT",
            "TEXT_MESSAGE_PART",
            json!({ "message_id": Uuid::new_v4().to_string(), "text": "y" }),
        );
    } // our FLOW_UPDATE grant
    r.agent_sends(
        "SYSTEM",
        "REPLAY_REQUEST",
        json!({ "from_seq": "2", "to_seq": "4" }),
    );
    let mut crit = r.agent.frame("AGENT", "TEXT_MESSAGE_PART", json!({}));
    crit["crit"] = json!(true);
    crit["x_ext"] = json!(1);
    r.dec(&crit).unwrap(); // ERROR UNSUPPORTED_TYPE
    r.poll(11_000 + 6 * 60_000); // the replay window expires
    r.agent_sends("SYSTEM", "REPLAY_REQUEST", json!({ "from_seq": "1" })); // ERROR REPLAY_TOO_OLD
    let sent = std::mem::take(&mut r.sent);
    let kinds = types(&sent);
    for ty in [
        "HAI",
        "TEXT_MESSAGE_START",
        "AUDIO_CHUNK",
        "TEXT_MESSAGE_END",
        "RUN_CANCEL",
        "PONG",
        "PING",
        "REPLAY_REQUEST",
        "FLOW_UPDATE",
        "ERROR",
    ] {
        assert!(kinds.iter().any(|k| k == ty), "no {ty} in {kinds:?}");
    }
    // + the replayed seqs 2..=4: 2 is the turn's TEXT_MESSAGE_START, 3 and 4 are audio.
    assert_eq!(kinds.iter().filter(|k| *k == "AUDIO_CHUNK").count(), 50 + 2);
    assert_eq!(
        kinds.iter().filter(|k| *k == "TEXT_MESSAGE_START").count(),
        1 + 1 + 1
    );
    let errors: Vec<String> = texts(&sent)
        .iter()
        .filter(|v| v["type"] == "ERROR")
        .map(|v| v["payload"]["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(errors, vec!["UNSUPPORTED_TYPE", "REPLAY_TOO_OLD"]);
    // Binary pairs: every bin_len envelope is followed by exactly that many bytes.
    for (i, w) in sent.iter().enumerate() {
        if let Wire::Text(_) = w {
            let v = json_of(w);
            if let Some(n) = v.get("bin_len") {
                assert!(v["payload"].get("data").is_none());
                assert_eq!(v["bin_mime"], "audio/opus");
                assert!(
                    matches!(&sent[i + 1], Wire::Binary(b) if b.len() as u64 == n.as_u64().unwrap())
                );
            }
        } else {
            assert!(matches!(sent[i - 1], Wire::Text(_)));
        }
    }
    // Sequencing: ids unique except replays (which repeat a frame verbatim); seq 1, 2, 3, ...
    let mut seen = std::collections::HashSet::new();
    let mut expect = 1u64;
    for v in texts(&sent) {
        let id = v["id"].as_str().unwrap().to_owned();
        if !seen.insert(id) {
            continue;
        }
        assert_eq!(v["seq"], expect.to_string(), "{v}");
        expect += 1;
        let ts: u64 = v["ts"].as_str().unwrap().parse().unwrap();
        assert!((WALL_MS..WALL_MS + 10 * 60_000).contains(&ts));
        let want_session = if v["type"] == "HAI" {
            local.as_str()
        } else {
            SESSION
        };
        assert_eq!(v["session"], want_session, "{v}");
    }
    // The agent's seq is numeric: later frames ack it (HAI 1, RUN_STARTED 2, PING 3, then a jump to 6:
    // the gap at 4..=5 holds the ack at 3).
    let last = texts(&sent).into_iter().last().unwrap();
    assert_eq!(last["ack"], "3");
    all.extend(sent);

    // 2. Base64 mode (agent without binary_frames), PCM at another rate, and an implicit turn start.
    let mut r = Rig::ready(HaipSettings::default(), false, None);
    for i in 0..50 {
        r.enc(pcm(640, i));
    }
    r.enc(Uplink::Audio {
        codec: AudioCodec::Pcm16,
        rate_hz: 24_000,
        channels: 1,
        duration_ms: 0,
        data: vec![0; 960],
    });
    r.enc(Uplink::TurnEnd { duration_ms: 1000 });
    let sent = std::mem::take(&mut r.sent);
    let chunks: Vec<Value> = texts(&sent)
        .into_iter()
        .filter(|v| v["type"] == "AUDIO_CHUNK")
        .collect();
    assert_eq!(chunks.len(), 51);
    assert_eq!(chunks[0]["payload"]["mime"], "audio/pcm");
    assert_eq!(chunks[0]["payload"]["duration_ms"], "20");
    assert_eq!(
        chunks[50]["payload"]["mime"],
        "audio/pcm;rate=24000;channels=1"
    );
    assert_eq!(chunks[50]["payload"]["duration_ms"], "20"); // computed from 960 bytes at 24 kHz
    assert!(sent.iter().all(|w| matches!(w, Wire::Text(_))));
    all.extend(sent);

    // 3. Resume (numeric agent), and VERSION_INCOMPATIBLE to a MAJOR-2-only agent.
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    r.agent_sends("AGENT", "RUN_STARTED", json!({}));
    let again = r.open();
    let hai = json_of(&again[0]);
    assert_eq!(hai["payload"]["last_rx_seq"], "2");
    assert_eq!(hai["session"], SESSION);
    all.extend(again);
    let mut r = Rig::new(HaipSettings::default(), Agent::numeric());
    r.open();
    let mut hai = r.agent.hai(true, None);
    hai["payload"]["accept_major"] = json!([2]);
    let d = r.dec(&hai).unwrap();
    assert!(
        matches!(&d.events[..], [Downlink::Error { code, fatal: true, .. }] if code == "VERSION_INCOMPATIBLE")
    );
    assert_eq!(types(&d.replies), vec!["ERROR"]);
    all.extend(std::mem::take(&mut r.sent));

    let mut checked = 0;
    for w in &all {
        if let Wire::Text(_) = w {
            let v = json_of(w);
            let errs: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
            assert!(errs.is_empty(), "{v}\n{errs:#?}");
            checked += 1;
        }
    }
    assert!(checked >= 120, "{checked}"); // every text frame of the three parts above
}

#[test]
fn hai_carries_capabilities_and_optional_auth() {
    let mut c = HaipClient::new(HaipSettings {
        binary: false,
        ..HaipSettings::default()
    });
    let hai = json_of(&c.open(5, &info())[0]);
    assert_eq!(hai["seq"], "1");
    assert_eq!(hai["channel"], "SYSTEM");
    assert!(hai.get("ack").is_none());
    assert_eq!(hai["ts"], WALL_MS.to_string());
    let p = &hai["payload"];
    assert_eq!(p["haip_version"], "1.1.2");
    assert_eq!(p["accept_major"], json!([1]));
    assert_eq!(p["accept_events"].as_array().unwrap().len(), 22);
    assert_eq!(p["capabilities"]["binary_frames"], false);
    assert!(
        p["capabilities"]["flow_control"]["initial_credit_messages"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(
        p["capabilities"]["flow_control"]["initial_credit_bytes"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(p.get("auth").is_none() && p.get("last_rx_seq").is_none());
    let token = SessionInfo {
        token: Some(Secret::new("jwt.abc")),
        wall_ms: WALL_MS,
    };
    let hai = json_of(&c.open(5, &token)[0]);
    assert!(hai["payload"].get("auth").is_none()); // off by default
    let mut c = HaipClient::new(HaipSettings {
        auth_in_hai: true,
        ..HaipSettings::default()
    });
    let hai = json_of(&c.open(5, &token)[0]);
    assert_eq!(hai["payload"]["auth"], json!({ "token": "Bearer jwt.abc" }));
}

// ------------------------------------------------------------------------------------------ behaviour

#[test]
fn binary_only_when_the_agent_advertises_it_and_settings_allow() {
    for (ours, theirs, want_binary) in [
        (true, true, true),
        (true, false, false),
        (false, true, false),
    ] {
        let mut r = Rig::ready(
            HaipSettings {
                binary: ours,
                ..HaipSettings::default()
            },
            theirs,
            None,
        );
        r.enc(Uplink::TurnStart);
        let w = r.enc(pcm(640, 7));
        let env = json_of(&w[0]);
        assert_eq!(env["type"], "AUDIO_CHUNK");
        assert_eq!(env["channel"], "AUDIO_IN");
        assert_eq!(env["payload"]["mime"], "audio/pcm");
        assert_eq!(env["payload"]["duration_ms"], "20");
        if want_binary {
            assert_eq!(w.len(), 2);
            assert_eq!(env["bin_len"], 640);
            assert_eq!(env["bin_mime"], "audio/pcm");
            assert!(env["payload"].get("data").is_none());
            assert!(matches!(&w[1], Wire::Binary(b) if b.len() == 640 && b[0] == 7));
        } else {
            assert_eq!(w.len(), 1);
            assert!(env.get("bin_len").is_none() && env.get("bin_mime").is_none());
            use base64::Engine as _;
            let data = base64::engine::general_purpose::STANDARD
                .decode(env["payload"]["data"].as_str().unwrap())
                .unwrap();
            assert_eq!(data.len(), 640);
            assert_eq!(data[0], 7);
        }
    }
}

#[test]
fn one_turn_is_one_message_id_and_text_gets_its_own() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let start = json_of(&r.enc(Uplink::TurnStart)[0]);
    assert_eq!(start["type"], "TEXT_MESSAGE_START");
    assert_eq!(start["channel"], "USER");
    assert_eq!(start["payload"]["author"], "user");
    let m = start["payload"]["message_id"].clone();
    let a = json_of(&r.enc(opus(1))[0]);
    assert_eq!(a["payload"]["message_id"], m);
    assert_eq!(a["payload"]["mime"], "audio/opus");
    let end = json_of(&r.enc(Uplink::TurnEnd { duration_ms: 20 })[0]);
    assert_eq!(end["type"], "TEXT_MESSAGE_END");
    assert_eq!(end["channel"], "USER");
    assert_eq!(end["payload"], json!({ "message_id": m }));
    assert!(matches!(
        r.c.encode(0, Uplink::TurnEnd { duration_ms: 0 }),
        Err(ProtocolError::State(_))
    ));
    let t = texts(&r.enc(Uplink::Text("hi there".into())));
    assert_eq!(t.len(), 2);
    assert_eq!(t[0]["type"], "TEXT_MESSAGE_START");
    assert_eq!(t[0]["payload"]["text"], "hi there");
    assert_eq!(t[1]["type"], "TEXT_MESSAGE_END");
    assert_eq!(t[0]["payload"]["message_id"], t[1]["payload"]["message_id"]);
    assert_ne!(t[0]["payload"]["message_id"], m);
    // Audio with no open turn opens one.
    let w = texts(&r.enc(opus(2)));
    assert_eq!(
        w.iter()
            .map(|v| v["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["TEXT_MESSAGE_START", "AUDIO_CHUNK"]
    );
    assert_eq!(w[0]["payload"]["message_id"], w[1]["payload"]["message_id"]);
}

#[test]
fn frames_before_the_agent_hai_wait_and_take_its_session() {
    let mut r = Rig::new(HaipSettings::default(), Agent::reference());
    r.open();
    assert!(r.enc(Uplink::TurnStart).is_empty());
    assert!(r.enc(opus(1)).is_empty());
    assert!(r.enc(Uplink::TurnEnd { duration_ms: 20 }).is_empty());
    assert_eq!(r.c.queued_frames(), 3);
    let hai = r.agent.hai(false, None);
    let d = r.dec(&hai).unwrap();
    assert_eq!(
        types(&d.replies),
        vec!["TEXT_MESSAGE_START", "AUDIO_CHUNK", "TEXT_MESSAGE_END"]
    );
    for (i, v) in texts(&d.replies).iter().enumerate() {
        assert_eq!(v["session"], SESSION);
        assert_eq!(v["seq"], (i + 2).to_string());
        assert!(v.get("ack").is_none()); // non-numeric agent seq
    }
    assert_eq!(r.c.queued_frames(), 0);
}

#[test]
fn interrupt_cancels_the_open_run_and_drops_its_late_frames() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let run = Uuid::new_v4().to_string();
    let d = r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": run }));
    assert_eq!(
        d.events,
        vec![Downlink::ResponseStarted { id: run.clone() }]
    );
    assert_eq!(r.c.open_run(), Some(run.as_str()));
    let w = texts(&r.enc(Uplink::Interrupt));
    assert_eq!(w.len(), 1);
    assert_eq!(w[0]["type"], "RUN_CANCEL");
    assert_eq!(w[0]["channel"], "USER");
    assert_eq!(w[0]["run_id"], run);
    assert_eq!(w[0]["payload"], json!({ "run_id": run }));
    assert_eq!(r.c.open_run(), None);

    // Late frames of that run: text, a binary audio pair, the finish.
    let mut part = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": Uuid::new_v4().to_string(), "text": "late" }),
    );
    part["run_id"] = json!(run);
    assert_eq!(r.dec(&part).unwrap(), Decoded::default());
    let mut audio = r.agent.frame(
        "AUDIO_OUT",
        "AUDIO_CHUNK",
        json!({ "message_id": Uuid::new_v4().to_string(), "mime": "audio/opus" }),
    );
    audio["run_id"] = json!(run);
    audio["bin_len"] = json!(3);
    audio["bin_mime"] = json!("audio/opus");
    assert_eq!(r.dec(&audio).unwrap(), Decoded::default());
    assert_eq!(
        r.dec_wire(Wire::Binary(vec![1, 2, 3])).unwrap(),
        Decoded::default()
    );
    let d = r.agent_sends(
        "AGENT",
        "RUN_FINISHED",
        json!({ "run_id": run, "status": "CANCELLED" }),
    );
    assert_eq!(d, Decoded::default());
    assert_eq!(r.c.stats().cancelled_run_frames_dropped, 3);

    // Another run is unaffected.
    let other = Uuid::new_v4().to_string();
    let d = r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": other }));
    assert_eq!(
        d.events,
        vec![Downlink::ResponseStarted { id: other.clone() }]
    );
    let mut part = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "fresh" }),
    );
    part["run_id"] = json!(other);
    assert_eq!(r.dec(&part).unwrap().events.len(), 1);
    let d = r.agent_sends(
        "AGENT",
        "RUN_FINISHED",
        json!({ "run_id": other, "status": "OK" }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::ResponseFinished {
            id: other,
            status: FinishStatus::Ok
        }]
    );
    assert_eq!(r.c.stats().cancelled_run_frames_dropped, 3);
}

#[test]
fn interrupt_before_the_run_starts_cancels_the_next_run() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    // The user's turn went; its answer has not started when the user speaks again.
    r.enc(Uplink::TurnStart);
    r.enc(Uplink::TurnEnd { duration_ms: 900 });
    assert!(r.enc(Uplink::Interrupt).is_empty());
    let run = Uuid::new_v4().to_string();
    let f = r
        .agent
        .frame("AGENT", "RUN_STARTED", json!({ "run_id": run }));
    let d = r.dec(&f).unwrap();
    assert!(d.events.is_empty());
    let replies = texts(&d.replies);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["type"], "RUN_CANCEL");
    assert_eq!(replies[0]["run_id"], run);
    assert_eq!(replies[0]["payload"]["run_id"], run);
    let mut late = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_START",
        json!({ "message_id": "m", "text": "no" }),
    );
    late["run_id"] = json!(run);
    assert_eq!(r.dec(&late).unwrap(), Decoded::default());
    assert_eq!(r.c.stats().cancelled_run_frames_dropped, 2);
    // Only that one run.
    let next = Uuid::new_v4().to_string();
    let d = r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": next }));
    assert_eq!(d.events, vec![Downlink::ResponseStarted { id: next }]);
    assert!(d.replies.is_empty());
}

#[test]
fn interrupt_after_the_answer_finished_cancels_nothing() {
    // The agent sent its whole answer faster than it plays; the user barges in over the rest of
    // the playback and asks again. The answer to that must not be cancelled.
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    r.enc(Uplink::TurnStart);
    r.enc(Uplink::TurnEnd { duration_ms: 900 });
    let run = Uuid::new_v4().to_string();
    r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": run }));
    r.agent_sends(
        "AGENT",
        "RUN_FINISHED",
        json!({ "run_id": run, "status": "OK" }),
    );
    // Barge-in during the playback tail: nothing open to cancel.
    assert!(r.enc(Uplink::Interrupt).is_empty());
    r.enc(Uplink::TurnStart);
    r.enc(Uplink::TurnEnd { duration_ms: 700 });
    let next = Uuid::new_v4().to_string();
    let d = r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": next }));
    assert_eq!(d.events, vec![Downlink::ResponseStarted { id: next }]);
    assert!(d.replies.is_empty(), "{:?}", d.replies);
}

#[test]
fn duplicates_are_dropped_by_id_and_by_seq() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let f = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "a" }),
    );
    assert_eq!(r.dec(&f).unwrap().events.len(), 1);
    assert_eq!(r.dec(&f).unwrap(), Decoded::default()); // same id
    let mut again = f.clone();
    again["id"] = json!(Uuid::new_v4().to_string()); // new id, old seq
    assert_eq!(r.dec(&again).unwrap(), Decoded::default());
    let mut older = f.clone();
    older["id"] = json!(Uuid::new_v4().to_string());
    older["seq"] = json!("1");
    assert_eq!(r.dec(&older).unwrap(), Decoded::default());
    assert_eq!(r.c.stats().duplicates_dropped, 3);
    // Non-numeric seqs are never compared, only ids.
    let mut free = f.clone();
    free["id"] = json!(Uuid::new_v4().to_string());
    free["seq"] = json!("1795315057042yhbzj9u4b");
    assert_eq!(r.dec(&free).unwrap().events.len(), 1);
    assert_eq!(r.dec(&free).unwrap(), Decoded::default());
    assert_eq!(r.c.stats().duplicates_dropped, 4);
}

#[test]
fn a_seq_gap_is_requested_once_after_the_replay_wait() {
    let settings = HaipSettings {
        ping_interval_ms: 0,
        ..HaipSettings::default()
    };
    let mut r = Rig::ready(settings, true, None); // agent HAI = seq 1
    r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "2" }),
    );
    assert_eq!(r.c.next_deadline(), None);
    r.now = 2_000;
    r.agent.seq += 2; // 3 and 4 go missing
    let d = r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "5" }),
    );
    assert_eq!(d.events.len(), 1); // delivered anyway
    assert_eq!(r.c.next_deadline(), Some(2_500));
    assert!(r.poll(2_499).is_empty());
    let w = texts(&r.poll(2_500));
    assert_eq!(w.len(), 1);
    assert_eq!(w[0]["type"], "REPLAY_REQUEST");
    assert_eq!(w[0]["channel"], "SYSTEM");
    assert_eq!(w[0]["payload"], json!({ "from_seq": "3", "to_seq": "4" }));
    assert_eq!(w[0]["ack"], "2");
    assert!(r.poll(3_000).is_empty());
    assert!(r.poll(60_000).is_empty());
    assert_eq!(r.c.stats().replay_requests_sent, 1);
    assert_eq!(r.c.next_deadline(), None);
    // The replayed frames fill the gap; ack moves past 5.
    for s in ["3", "4"] {
        let mut f = r.agent.frame(
            "AGENT",
            "TEXT_MESSAGE_PART",
            json!({ "message_id": "m", "text": s }),
        );
        f["seq"] = json!(s);
        assert_eq!(r.dec(&f).unwrap().events.len(), 1);
    }
    r.agent.seq = 5;
    let w = texts(&r.enc(Uplink::Text("x".into())));
    assert_eq!(w[0]["ack"], "5");

    // A gap filled before the wait ends is never requested.
    let mut r = Rig::ready(
        HaipSettings {
            ping_interval_ms: 0,
            ..HaipSettings::default()
        },
        true,
        None,
    );
    let mut f3 = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "3" }),
    );
    f3["seq"] = json!("3");
    r.dec(&f3).unwrap();
    assert_eq!(r.c.next_deadline(), Some(1_500));
    let mut f2 = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "2" }),
    );
    f2["seq"] = json!("2");
    r.dec(&f2).unwrap();
    assert!(r.poll(5_000).is_empty());
    assert_eq!(r.c.stats().replay_requests_sent, 0);
}

#[test]
fn pause_holds_audio_drops_oldest_beyond_the_limit_and_resume_releases_in_order() {
    let mut r = Rig::ready(
        HaipSettings {
            buffer_limit_bytes: 2_000,
            ..HaipSettings::default()
        },
        true,
        None,
    );
    let run = Uuid::new_v4().to_string();
    r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": run }));
    assert_eq!(types(&r.enc(Uplink::TurnStart)), vec!["TEXT_MESSAGE_START"]);
    let d = r.agent_sends("SYSTEM", "PAUSE_CHANNEL", json!({ "channel": "AUDIO_IN" }));
    assert!(d.events.is_empty() && d.replies.is_empty());
    const CHUNKS: u8 = 15;
    for i in 0..CHUNKS {
        assert!(r.enc(pcm(200, i)).is_empty());
    }
    assert_eq!(r.c.stats().dropped_audio_frames, 5); // 10 x 200 bytes fit
    assert_eq!(r.c.queued_bytes(), 2_000);
    // The turn end waits behind its audio, and text behind the turn end; neither is ever dropped,
    // but both count against the limit, so they push out more of the oldest audio.
    assert!(r.enc(Uplink::TurnEnd { duration_ms: 200 }).is_empty());
    assert!(r.enc(Uplink::Text("typed".into())).is_empty());
    let dropped = r.c.stats().dropped_audio_frames;
    assert!(dropped > 5);
    // A cancel is not held back by the paused channel.
    assert_eq!(types(&r.enc(Uplink::Interrupt)), vec!["RUN_CANCEL"]);

    let d = r.agent_sends("SYSTEM", "RESUME_CHANNEL", json!({ "channel": "AUDIO_IN" }));
    let kinds = types(&d.replies);
    let kept = usize::from(CHUNKS) - dropped as usize;
    assert!(kept > 0, "the limit must still hold some audio");
    let mut want = vec!["AUDIO_CHUNK"; kept];
    want.extend(["TEXT_MESSAGE_END", "TEXT_MESSAGE_START", "TEXT_MESSAGE_END"]);
    assert_eq!(kinds, want);
    let firsts: Vec<u8> = d
        .replies
        .iter()
        .filter_map(|w| match w {
            Wire::Binary(b) => Some(b[0]),
            _ => None,
        })
        .collect();
    assert_eq!(firsts, (CHUNKS - kept as u8..CHUNKS).collect::<Vec<u8>>()); // the newest, in order
    // Binary pairs stay together, seqs stay contiguous.
    assert!(matches!(d.replies[1], Wire::Binary(_)));
    let seqs: Vec<u64> = texts(&d.replies)
        .iter()
        .map(|v| v["seq"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(r.c.queued_frames(), 0);
}

#[test]
fn credit_from_the_agent_hai_holds_frames_until_flow_update() {
    let mut r = Rig::ready(HaipSettings::default(), true, Some((3, 1 << 20)));
    r.enc(Uplink::TurnStart);
    for i in 0..3 {
        assert_eq!(types(&r.enc(opus(i))), vec!["AUDIO_CHUNK"]);
    }
    assert!(r.enc(opus(3)).is_empty());
    assert!(r.enc(opus(4)).is_empty());
    let d = r.agent_sends(
        "SYSTEM",
        "FLOW_UPDATE",
        json!({ "channel": "AUDIO_IN", "add_messages": 1, "add_bytes": 1000 }),
    );
    assert_eq!(types(&d.replies), vec!["AUDIO_CHUNK"]);
    assert!(matches!(&d.replies[1], Wire::Binary(b) if b[0] == 3));
    // The README spells channels in lower case with a dash.
    let d = r.agent_sends(
        "SYSTEM",
        "FLOW_UPDATE",
        json!({ "channel": "audio-in", "add_messages": 5 }),
    );
    assert!(matches!(&d.replies[1], Wire::Binary(b) if b[0] == 4));

    // SYSTEM: our HAI used one of the 3, so two PONGs go and the third waits.
    for nonce in ["a", "b"] {
        let d = r.agent_sends("SYSTEM", "PING", json!({ "nonce": nonce }));
        assert_eq!(types(&d.replies), vec!["PONG"]);
    }
    let d = r.agent_sends("SYSTEM", "PING", json!({ "nonce": "c" }));
    assert!(d.replies.is_empty());
    let d = r.agent_sends(
        "SYSTEM",
        "FLOW_UPDATE",
        json!({ "channel": "SYSTEM", "add_messages": 1 }),
    );
    assert_eq!(texts(&d.replies)[0]["payload"]["nonce"], "c");

    // Byte credit: a 600-byte chunk fits in 1000, the next one waits for add_bytes.
    let mut r = Rig::ready(HaipSettings::default(), true, Some((100, 1_000)));
    r.enc(Uplink::TurnStart);
    assert_eq!(r.enc(pcm(600, 1)).len(), 2);
    assert!(r.enc(pcm(600, 2)).is_empty());
    let d = r.agent_sends(
        "SYSTEM",
        "FLOW_UPDATE",
        json!({ "channel": "AUDIO_IN", "add_bytes": 200 }),
    );
    assert_eq!(d.replies.len(), 2);
}

#[test]
fn bad_input_is_rejected_and_the_codec_keeps_working() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let good = |r: &mut Rig| {
        let d = r.agent_sends(
            "AGENT",
            "TEXT_MESSAGE_PART",
            json!({ "message_id": "m", "text": "ok" }),
        );
        assert_eq!(
            d.events,
            vec![Downlink::TextDelta {
                message_id: "m".into(),
                text: "ok".into()
            }]
        );
    };
    let bad_texts = [
        "{not json".to_owned(),
        "[1,2,3]".to_owned(),
        json!({ "id": Uuid::new_v4().to_string(), "payload": {} }).to_string(),
        json!({ "id": Uuid::new_v4().to_string(), "type": 5, "payload": {} }).to_string(),
    ];
    for (i, t) in bad_texts.iter().enumerate() {
        assert_malformed(r.dec_wire(Wire::Text(t.clone())));
        assert_eq!(r.c.stats().malformed, i as u64 + 1);
        good(&mut r);
    }
    let bad_frames = [
        r.agent.frame("AGENT", "TEXT_MESSAGE_PART", json!(42)),
        r.agent
            .frame("AGENT", "TEXT_MESSAGE_PART", json!({ "text": "no id" })),
        r.agent.frame(
            "AGENT",
            "TEXT_MESSAGE_PART",
            json!({ "message_id": 7, "text": "x" }),
        ),
        r.agent.frame(
            "AUDIO_OUT",
            "AUDIO_CHUNK",
            json!({ "message_id": "m", "mime": "audio/opus", "data": "!!not base64!!" }),
        ),
        r.agent.frame(
            "AUDIO_OUT",
            "AUDIO_CHUNK",
            json!({ "mime": "audio/opus", "data": "AAAA" }),
        ),
        r.agent
            .frame("SYSTEM", "ERROR", json!({ "message": "no code" })),
        r.agent.frame(
            "SYSTEM",
            "FLOW_UPDATE",
            json!({ "channel": "AUDIO_IN", "add_messages": "many" }),
        ),
    ];
    for f in &bad_frames {
        let reason = assert_malformed(r.dec(f));
        assert!(!reason.is_empty());
        good(&mut r);
    }
    // A binary frame with no envelope.
    assert_malformed(r.dec_wire(Wire::Binary(vec![0; 8])));
    good(&mut r);
    // An envelope whose binary frame never comes: the next text frame still decodes.
    let mut env = r.agent.frame(
        "AUDIO_OUT",
        "AUDIO_CHUNK",
        json!({ "message_id": "m", "mime": "audio/opus" }),
    );
    env["bin_len"] = json!(4);
    assert_eq!(r.dec(&env).unwrap(), Decoded::default());
    let before = r.c.stats().malformed;
    let f = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "ok" }),
    );
    let d = r.dec(&f).unwrap();
    assert!(matches!(&d.events[0], Downlink::Unknown { kind, .. } if kind == "AUDIO_CHUNK"));
    assert_eq!(
        d.events[1],
        Downlink::TextDelta {
            message_id: "m".into(),
            text: "ok".into()
        }
    );
    assert_eq!(r.c.stats().malformed, before + 1);
    // A binary frame of the wrong size: malformed, and the envelope is gone.
    let mut env = r.agent.frame(
        "AUDIO_OUT",
        "AUDIO_CHUNK",
        json!({ "message_id": "m", "mime": "audio/opus" }),
    );
    env["bin_len"] = json!(4);
    r.dec(&env).unwrap();
    assert_malformed(r.dec_wire(Wire::Binary(vec![0; 3])));
    assert_malformed(r.dec_wire(Wire::Binary(vec![0; 4])));
    good(&mut r);
    // Unknown types are Unknown, not errors.
    let d = r.agent_sends("USER", "NOPE", json!({}));
    assert!(matches!(&d.events[..], [Downlink::Unknown { kind, .. }] if kind == "NOPE"));
    // Unknown audio MIME.
    let d = r.agent_sends(
        "AUDIO_OUT",
        "AUDIO_CHUNK",
        json!({ "message_id": "m", "mime": "audio/mpeg", "data": "AAAA" }),
    );
    assert!(matches!(&d.events[..], [Downlink::Unknown { kind, .. }] if kind == "AUDIO_CHUNK"));
    good(&mut r);
    assert_eq!(r.c.stats().malformed, 4 + 7 + 1 + 1 + 2);
}

#[test]
fn lenient_envelopes_are_accepted_but_crit_unknown_fields_are_not() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let mut f = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "a" }),
    );
    f["transaction"] = json!("null");
    f["x_vendor"] = json!({ "k": 1 });
    f["seq"] = json!("1795315057042yhbzj9u4b");
    f["pv"] = json!(1);
    f["crit"] = json!(false);
    assert_eq!(r.dec(&f).unwrap().events.len(), 1);
    // After a non-numeric seq we do not ack.
    let w = texts(&r.enc(Uplink::Text("x".into())));
    assert!(w[0].get("ack").is_none());

    let mut f = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "a" }),
    );
    f["crit"] = json!(true);
    f["x_vendor"] = json!(1);
    let d = r.dec(&f).unwrap();
    assert!(
        matches!(&d.events[..], [Downlink::Unknown { kind, reason }] if kind == "TEXT_MESSAGE_PART" && reason.contains("x_vendor"))
    );
    let e = texts(&d.replies);
    assert_eq!(e[0]["type"], "ERROR");
    assert_eq!(e[0]["payload"]["code"], "UNSUPPORTED_TYPE");
    assert_eq!(e[0]["payload"]["related_id"], f["id"]);
    // crit with only known fields is fine.
    let mut f = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "b" }),
    );
    f["crit"] = json!(true);
    assert_eq!(r.dec(&f).unwrap().events.len(), 1);
}

#[test]
fn message_aliases_map_like_text_message() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let m = Uuid::new_v4().to_string();
    let d = r.agent_sends(
        "AGENT",
        "MESSAGE_START",
        json!({ "message_id": m, "author": "agent", "text": "Hel" }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::TextDelta {
            message_id: m.clone(),
            text: "Hel".into()
        }]
    );
    let d = r.agent_sends(
        "AGENT",
        "MESSAGE_PART",
        json!({ "message_id": m, "text": "lo" }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::TextDelta {
            message_id: m.clone(),
            text: "lo".into()
        }]
    );
    let d = r.agent_sends("AGENT", "MESSAGE_END", json!({ "message_id": m }));
    assert_eq!(
        d.events,
        vec![Downlink::TextDone {
            message_id: m.clone()
        }]
    );
    let d = r.agent_sends("AGENT", "TEXT_MESSAGE_START", json!({ "message_id": m }));
    assert!(d.events.is_empty());
    let d = r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_END",
        json!({ "message_id": m, "tokens": "12" }),
    );
    assert_eq!(d.events, vec![Downlink::TextDone { message_id: m }]);
}

#[test]
fn agent_audio_tools_and_runs_map_to_downlink() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let d = r.agent_sends(
        "AUDIO_OUT",
        "AUDIO_CHUNK",
        json!({ "message_id": "m", "mime": "audio/opus", "data": "AQID", "duration_ms": "20" }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::Audio {
            codec: AudioCodec::Opus,
            rate_hz: 48_000,
            channels: 1,
            data: vec![1, 2, 3]
        }]
    );
    let d = r.agent_sends(
        "AGENT",
        "AUDIO_CHUNK",
        json!({ "message_id": "m", "mime": "audio/pcm;rate=24000", "data": "AQIDBA" }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::Audio {
            codec: AudioCodec::Pcm16,
            rate_hz: 24_000,
            channels: 1,
            data: vec![1, 2, 3, 4]
        }]
    );
    let mut env = r.agent.frame(
        "AUDIO_OUT",
        "AUDIO_CHUNK",
        json!({ "message_id": "m", "mime": "audio/L16;rate=8000;channels=1" }),
    );
    env["bin_len"] = json!(4);
    env["bin_mime"] = json!("audio/L16");
    assert_eq!(r.dec(&env).unwrap(), Decoded::default());
    let d = r.dec_wire(Wire::Binary(vec![0, 1, 0, 2])).unwrap();
    assert_eq!(
        d.events,
        vec![Downlink::Audio {
            codec: AudioCodec::Pcm16,
            rate_hz: 8_000,
            channels: 1,
            data: vec![1, 0, 2, 0]
        }]
    );

    let call = Uuid::new_v4().to_string();
    let d = r.agent_sends(
        "AGENT",
        "TOOL_CALL",
        json!({ "call_id": call, "tool": "weather", "params": {} }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::Tool {
            call_id: call.clone(),
            name: "weather".into(),
            state: ToolState::Started
        }]
    );
    let d = r.agent_sends(
        "AGENT",
        "TOOL_UPDATE",
        json!({ "call_id": call, "status": "RUNNING", "progress": 50 }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::Tool {
            call_id: call.clone(),
            name: "weather".into(),
            state: ToolState::Progress
        }]
    );
    let d = r.agent_sends(
        "AGENT",
        "TOOL_DONE",
        json!({ "call_id": call, "status": "OK", "result": {} }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::Tool {
            call_id: call,
            name: "weather".into(),
            state: ToolState::Done
        }]
    );
    let unknown_call = Uuid::new_v4().to_string();
    let d = r.agent_sends("AGENT", "TOOL_DONE", json!({ "call_id": unknown_call }));
    assert_eq!(
        d.events,
        vec![Downlink::Tool {
            call_id: unknown_call,
            name: String::new(),
            state: ToolState::Done
        }]
    );

    // run_id from the payload when the envelope has none.
    let d = r.agent_sends("AGENT", "RUN_STARTED", json!({ "run_id": "r1" }));
    assert_eq!(
        d.events,
        vec![Downlink::ResponseStarted { id: "r1".into() }]
    );
    let d = r.agent_sends(
        "AGENT",
        "RUN_FINISHED",
        json!({ "run_id": "r1", "status": "CANCELLED" }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::ResponseFinished {
            id: "r1".into(),
            status: FinishStatus::Cancelled
        }]
    );
    let mut f = r.agent.frame(
        "AGENT",
        "RUN_ERROR",
        json!({ "code": "TOOL_EXECUTION_ERROR", "message": "boom" }),
    );
    f["run_id"] = json!("r2");
    let d = r.dec(&f).unwrap();
    assert_eq!(
        d.events,
        vec![
            Downlink::Error {
                code: "TOOL_EXECUTION_ERROR".into(),
                message: "boom".into(),
                fatal: false
            },
            Downlink::ResponseFinished {
                id: "r2".into(),
                status: FinishStatus::Error
            },
        ]
    );
    assert_eq!(r.c.open_run(), None);
}

#[test]
fn error_codes_fatal_or_not() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    for (code, fatal) in [
        ("VERSION_INCOMPATIBLE", true),
        ("AUTHENTICATION_FAILED", true),
        ("RESUME_FAILED", true),
        ("PROTOCOL_VIOLATION", true),
        ("INSUFFICIENT_CREDITS", false),
        ("UNSUPPORTED_TYPE", false),
        ("RUN_NOT_FOUND", false),
        ("FLOW_CONTROL_VIOLATION", false),
        ("NOT HAI", false),
        ("SOMETHING_NEW", false),
    ] {
        let d = r.agent_sends("SYSTEM", "ERROR", json!({ "code": code, "message": "m" }));
        assert_eq!(
            d.events,
            vec![Downlink::Error {
                code: code.into(),
                message: "m".into(),
                fatal
            }],
            "{code}"
        );
    }
}

#[test]
fn resume_presents_the_last_session_and_resume_failed_forgets_it() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "2" }),
    );
    r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "3" }),
    );
    let hai = json_of(&r.open()[0]);
    assert_eq!(hai["session"], SESSION);
    assert_eq!(hai["payload"]["last_rx_seq"], "3");
    assert_eq!(hai["seq"], "1");
    // The agent resumes: its HAI is seq 4; frames up to 3 are old news.
    let d = r.agent_sends(
        "SYSTEM",
        "HAI",
        json!({ "haip_version": "1.1.2", "accept_major": [1], "accept_events": ACCEPT_EVENTS }),
    );
    assert_eq!(
        d.events,
        vec![Downlink::Ready {
            session: SESSION.into()
        }]
    );
    let mut old = r.agent.frame(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "3" }),
    );
    old["seq"] = json!("3");
    r.agent.seq -= 1; // `old` did not use up a new seq
    assert_eq!(r.dec(&old).unwrap(), Decoded::default());
    let d = r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "5" }),
    );
    assert_eq!(d.events.len(), 1);
    // The agent cannot resume next time.
    let hai = json_of(&r.open()[0]);
    assert_eq!(hai["payload"]["last_rx_seq"], "5");
    let d = r.agent_sends(
        "SYSTEM",
        "ERROR",
        json!({ "code": "RESUME_FAILED", "message": "gone" }),
    );
    assert!(matches!(
        &d.events[..],
        [Downlink::Error { fatal: true, .. }]
    ));
    let hai = json_of(&r.open()[0]);
    assert_ne!(hai["session"], SESSION);
    assert!(hai["payload"].get("last_rx_seq").is_none());

    // A reference server (non-numeric seq) is never resumed.
    let mut r = Rig::new(HaipSettings::default(), Agent::reference());
    r.open();
    let hai = r.agent.hai(true, None);
    r.dec(&hai).unwrap();
    r.agent_sends(
        "AGENT",
        "TEXT_MESSAGE_PART",
        json!({ "message_id": "m", "text": "2" }),
    );
    let hai = json_of(&r.open()[0]);
    assert!(hai["payload"].get("last_rx_seq").is_none());
    assert_ne!(hai["session"], SESSION);
}

#[test]
fn reconnect_keeps_user_content_and_reannounces_the_open_turn() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let start = json_of(&r.enc(Uplink::TurnStart)[0]);
    r.enc(opus(1));
    let hai = json_of(&r.open()[0]); // the connection dropped mid-turn
    assert_eq!(hai["type"], "HAI");
    assert!(r.enc(opus(2)).is_empty());
    // A PING before the new agent's HAI is answered, but only once the handshake is done.
    assert!(
        r.agent_sends("SYSTEM", "PING", json!({ "nonce": "early" }))
            .replies
            .is_empty()
    );
    let mut r2_agent = Agent::reference();
    let hai = r2_agent.hai(true, None);
    let d = r.dec(&hai).unwrap();
    let t = texts(&d.replies);
    assert_eq!(
        t.iter()
            .map(|v| v["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["TEXT_MESSAGE_START", "AUDIO_CHUNK", "PONG"]
    );
    assert_eq!(t[2]["payload"]["nonce"], "early");
    assert_eq!(
        t[0]["payload"]["message_id"],
        start["payload"]["message_id"]
    );
    assert_eq!(
        t[1]["payload"]["message_id"],
        start["payload"]["message_id"]
    );
    assert_eq!(t[0]["seq"], "2");
}

#[test]
fn peer_replay_requests_resend_our_frames_or_say_too_old() {
    let mut r = Rig::ready(HaipSettings::default(), false, None);
    r.enc(Uplink::Text("a".into())); // seq 2, 3
    let before: Vec<Value> = texts(&r.sent);
    let d = r.agent_sends(
        "SYSTEM",
        "REPLAY_REQUEST",
        json!({ "from_seq": "2", "to_seq": "3" }),
    );
    let again = texts(&d.replies);
    assert_eq!(again, before[1..3].to_vec()); // verbatim, same ids and seqs
    let d = r.agent_sends("SYSTEM", "REPLAY_REQUEST", json!({ "from_seq": "9" }));
    assert!(d.replies.is_empty()); // nothing sent there yet
    r.poll(r.now + 6 * 60_000);
    let d = r.agent_sends("SYSTEM", "REPLAY_REQUEST", json!({ "from_seq": "1" }));
    let e = texts(&d.replies);
    assert_eq!(e.last().unwrap()["type"], "ERROR");
    assert_eq!(e.last().unwrap()["payload"]["code"], "REPLAY_TOO_OLD");
}

#[test]
fn we_grant_the_agent_more_credit_as_it_uses_it() {
    let mut r = Rig::ready(HaipSettings::default(), true, None);
    let mut grants = Vec::new();
    for _ in 0..300 {
        let d = r.agent_sends(
            "AGENT",
            "TEXT_MESSAGE_PART",
            json!({ "message_id": "m", "text": "x" }),
        );
        grants.extend(texts(&d.replies));
    }
    assert_eq!(grants.len(), 2);
    for g in &grants {
        assert_eq!(g["type"], "FLOW_UPDATE");
        assert_eq!(g["channel"], "SYSTEM");
        assert_eq!(g["payload"]["channel"], "AGENT");
        assert_eq!(g["payload"]["add_messages"], 128);
    }
}

#[test]
fn ping_pong_and_the_ping_timer() {
    let mut r = Rig::new(
        HaipSettings {
            ping_interval_ms: 1_000,
            ..HaipSettings::default()
        },
        Agent::numeric(),
    );
    r.now = 0;
    assert_eq!(r.c.next_deadline(), None);
    r.open();
    let hai = r.agent.hai(true, None);
    r.dec(&hai).unwrap();
    assert_eq!(r.c.next_deadline(), Some(1_000));
    assert!(r.poll(999).is_empty());
    let p = texts(&r.poll(1_000));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["type"], "PING");
    assert_eq!(p[0]["channel"], "SYSTEM");
    assert_eq!(p[0]["payload"], json!({ "nonce": "1" }));
    assert_eq!(r.c.next_deadline(), Some(2_000));
    assert_eq!(texts(&r.poll(2_000))[0]["payload"]["nonce"], "2");
    // Late poll: one PING, not a burst.
    let p = texts(&r.poll(5_500));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["payload"]["nonce"], "3");
    assert_eq!(r.c.next_deadline(), Some(6_500));
    let d = r.agent_sends("SYSTEM", "PONG", json!({ "nonce": "3" }));
    assert_eq!(d, Decoded::default());
    assert_eq!(r.c.last_pong_ms(), Some(5_500));

    let d = r.agent_sends("SYSTEM", "PING", json!({ "nonce": "abc" }));
    assert!(d.events.is_empty());
    let pong = texts(&d.replies);
    assert_eq!(pong[0]["type"], "PONG");
    assert_eq!(pong[0]["payload"], json!({ "nonce": "abc" }));
    let d = r.agent_sends("SYSTEM", "PING", json!({}));
    assert_eq!(texts(&d.replies)[0]["payload"], json!({}));
    // Disabled.
    let mut c = HaipClient::new(HaipSettings {
        ping_interval_ms: 0,
        ..HaipSettings::default()
    });
    c.open(0, &info());
    assert_eq!(c.next_deadline(), None);
    assert!(c.poll(1_000_000).is_empty());
}

#[test]
fn events_the_agent_does_not_accept_are_refused() {
    let mut r = Rig::new(HaipSettings::default(), Agent::numeric());
    r.open();
    let hai = r.agent.frame(
        "SYSTEM",
        "HAI",
        json!({ "haip_version": "1.1.2", "accept_major": [1], "accept_events": ["HAI", "PING", "PONG", "ERROR"] }),
    );
    r.dec(&hai).unwrap();
    assert!(matches!(
        r.c.encode(0, opus(1)),
        Err(ProtocolError::State(_))
    ));
    assert!(matches!(
        r.c.encode(0, Uplink::Text("x".into())),
        Err(ProtocolError::State(_))
    ));
    let d = r.agent_sends("SYSTEM", "PING", json!({ "nonce": "1" }));
    assert_eq!(types(&d.replies), vec!["PONG"]);
}
