//! The built-in HAIP 1.1.2 agent, driven by a raw WebSocket client that writes its JSON frames by hand:
//! handshake, voice turns (base64 and binary mode), barge-in, strictness (each client mistake is an
//! ERROR frame and a recorded violation), tokens, credits both ways, replay and the injected faults.
//! Every frame the agent sends is checked against the 1.1.2 envelope schema when the schema file is
//! found (`tests/fixtures/haip/` or the shared protocol notes next to the repository).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::{SinkExt, StreamExt};
use hearken::agent::haip::{self, AgentHandle, AgentSettings, Inject};
use hearken::config::OpusConfig;
use hearken::dsp::codec::{MAX_DECODED_SAMPLES, MAX_PACKET_BYTES, OpusDecoder, OpusEncoder};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

const STEP: Duration = Duration::from_secs(5);

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now_ms() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        .to_string()
}

fn schema() -> Option<&'static jsonschema::Validator> {
    static SCHEMA: std::sync::OnceLock<Option<jsonschema::Validator>> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let name = "haip-v1.1.2-message-envelope.schema.at-f8dfe4d.json";
            let candidates = [
                root.join("tests/fixtures/haip").join(name),
                root.join("tests/fixtures/haip/haip-v1.1.2-message-envelope.schema.json"),
                root.join("../shared/protocols/data/haip").join(name),
            ];
            let path = candidates.iter().find(|p| p.is_file())?;
            let text = std::fs::read_to_string(path).expect("read schema");
            let value: Value = serde_json::from_str(&text).expect("schema JSON");
            Some(jsonschema::validator_for(&value).expect("compile schema"))
        })
        .as_ref()
}

/// 20 ms Opus packets of a voice-like tone (16 kHz mono), as the device sends them.
fn opus_packets(n: usize) -> Vec<Vec<u8>> {
    let mut enc = OpusEncoder::new(&OpusConfig::default()).expect("encoder");
    let frame = enc.frame_samples();
    let mut out = vec![0u8; MAX_PACKET_BYTES];
    (0..n)
        .map(|k| {
            let pcm: Vec<i16> = (0..frame)
                .map(|i| {
                    let t = (k * frame + i) as f64 / 16_000.0;
                    let s = (2.0 * std::f64::consts::PI * 220.0 * t).sin()
                        + 0.5 * (2.0 * std::f64::consts::PI * 660.0 * t).sin();
                    (s * 8_000.0) as i16
                })
                .collect();
            let len = enc.encode(&pcm, &mut out).expect("encode");
            out[..len].to_vec()
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Frame {
    v: Value,
    raw: String,
    bin: Option<Vec<u8>>,
}

impl Frame {
    fn ty(&self) -> &str {
        self.v["type"].as_str().unwrap_or_default()
    }
    fn channel(&self) -> &str {
        self.v["channel"].as_str().unwrap_or_default()
    }
    fn seq(&self) -> u64 {
        self.v["seq"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("numeric seq")
    }
    fn run_id(&self) -> Option<&str> {
        self.v["run_id"].as_str()
    }
    fn p(&self, k: &str) -> &Value {
        &self.v["payload"][k]
    }
}

#[derive(Debug)]
enum Got {
    Frame(Frame),
    /// Close frame (code, reason), or `None` for a connection that vanished without one.
    Closed(Option<(u16, String)>),
}

struct Client {
    ws: Ws,
    session: String,
    seq: u64,
    /// Highest seq received in order (our `ack`).
    last_rx: u64,
    backlog: VecDeque<Got>,
    received: Vec<Frame>,
    /// Send credit per channel, from the agent's HAI and FLOW_UPDATEs.
    credit: HashMap<String, u64>,
    initial_credit: u64,
}

impl Client {
    /// Connects and reads the agent's HAI (sent on open).
    async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        Client::with_ws(ws).await
    }

    async fn with_ws(ws: Ws) -> Client {
        let mut c = Client {
            ws,
            session: String::new(),
            seq: 0,
            last_rx: 0,
            backlog: VecDeque::new(),
            received: Vec::new(),
            credit: HashMap::new(),
            initial_credit: u64::MAX,
        };
        let hai = c.frame().await;
        assert_eq!(hai.ty(), "HAI");
        assert_eq!(hai.channel(), "SYSTEM");
        assert_eq!(hai.seq(), 1);
        assert_eq!(hai.p("haip_version"), "1.1.2");
        assert_eq!(hai.p("accept_major"), &json!([1]));
        assert_eq!(hai.p("accept_events").as_array().expect("events").len(), 22);
        c.session = hai.v["session"].as_str().expect("session").to_string();
        c.initial_credit = hai.p("capabilities")["flow_control"]["initial_credit_messages"]
            .as_u64()
            .expect("credit");
        c
    }

    /// Connect and send our HAI.
    async fn handshake(url: &str, binary: bool, grant: Option<u64>) -> Client {
        let mut c = Client::connect(url).await;
        let mut caps = json!({ "binary_frames": binary });
        if let Some(n) = grant {
            caps["flow_control"] =
                json!({"initial_credit_messages": n, "initial_credit_bytes": 1_048_576});
        }
        let p = json!({
            "haip_version": "1.1.2",
            "accept_major": [1],
            "accept_events": haip::EVENT_TYPES,
            "capabilities": caps,
        });
        c.send("SYSTEM", "HAI", p).await;
        c
    }

    fn envelope(&mut self, channel: &str, ty: &str, payload: Value) -> Value {
        self.seq += 1;
        let mut v = json!({
            "id": uuid(),
            "session": self.session,
            "seq": self.seq.to_string(),
            "ts": now_ms(),
            "channel": channel,
            "type": ty,
            "payload": payload,
        });
        if self.last_rx > 0 {
            v["ack"] = json!(self.last_rx.to_string());
        }
        v
    }

    async fn send_raw(&mut self, v: &Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    async fn send_bin(&mut self, b: &[u8]) {
        self.ws
            .send(Message::binary(b.to_vec()))
            .await
            .expect("send binary");
    }

    /// Waits for credit on `channel` (reading, and keeping, frames until a FLOW_UPDATE grants it).
    async fn take_credit(&mut self, channel: &str) {
        loop {
            let c = self
                .credit
                .entry(channel.to_string())
                .or_insert(self.initial_credit);
            if *c > 0 {
                *c -= 1;
                return;
            }
            let g = self.read().await;
            self.backlog.push_back(g);
        }
    }

    /// Sends one frame within our credit.
    async fn send(&mut self, channel: &str, ty: &str, payload: Value) -> Value {
        self.take_credit(channel).await;
        let v = self.envelope(channel, ty, payload);
        self.send_raw(&v).await;
        v
    }

    async fn send_audio_binary(&mut self, mid: &str, packet: &[u8]) {
        self.take_credit("AUDIO_IN").await;
        let mut v = self.envelope(
            "AUDIO_IN",
            "AUDIO_CHUNK",
            json!({"message_id": mid, "mime": "audio/opus", "duration_ms": "20"}),
        );
        v["bin_len"] = json!(packet.len());
        v["bin_mime"] = json!("audio/opus");
        self.send_raw(&v).await;
        self.send_bin(packet).await;
    }

    /// One voice turn per the device's convention; returns the message id.
    async fn voice_turn(&mut self, packets: &[Vec<u8>], binary: bool) -> String {
        let mid = uuid();
        self.send(
            "USER",
            "TEXT_MESSAGE_START",
            json!({"message_id": mid, "author": "user"}),
        )
        .await;
        for p in packets {
            if binary {
                self.send_audio_binary(&mid, p).await;
            } else {
                let payload = json!({"message_id": mid, "mime": "audio/opus",
                    "duration_ms": "20", "data": B64.encode(p)});
                self.send("AUDIO_IN", "AUDIO_CHUNK", payload).await;
            }
        }
        self.send("USER", "TEXT_MESSAGE_END", json!({"message_id": mid}))
            .await;
        mid
    }

    async fn text_turn(&mut self, start_text: &str, parts: &[&str]) {
        let mid = uuid();
        self.send(
            "USER",
            "TEXT_MESSAGE_START",
            json!({"message_id": mid, "author": "user", "text": start_text}),
        )
        .await;
        for t in parts {
            self.send(
                "USER",
                "TEXT_MESSAGE_PART",
                json!({"message_id": mid, "text": t}),
            )
            .await;
        }
        self.send("USER", "TEXT_MESSAGE_END", json!({"message_id": mid}))
            .await;
    }

    /// Reads one frame off the socket (pairs a bin_len envelope with its binary frame, checks the
    /// schema, tracks seq and credit).
    async fn read(&mut self) -> Got {
        self.read_timeout(STEP)
            .await
            .expect("no frame from the agent within 5 s")
    }

    async fn read_timeout(&mut self, d: Duration) -> Option<Got> {
        let msg = match tokio::time::timeout(d, self.ws.next()).await {
            Err(_) => return None,
            Ok(m) => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t.to_string(),
            Some(Ok(Message::Close(cf))) => {
                return Some(Got::Closed(
                    cf.map(|c| (u16::from(c.code), c.reason.to_string())),
                ));
            }
            Some(Ok(Message::Binary(b))) => {
                panic!("binary frame without an envelope ({} bytes)", b.len())
            }
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
            None | Some(Err(_)) => return Some(Got::Closed(None)),
        };
        let v: Value = serde_json::from_str(&text).expect("agent frame is JSON");
        if let Some(validator) = schema() {
            let errs: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
            assert!(
                errs.is_empty(),
                "agent frame fails the schema: {errs:?}\n{text}"
            );
        }
        let bin = match v.get("bin_len").and_then(Value::as_u64) {
            Some(n) => match tokio::time::timeout(STEP, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    assert_eq!(b.len() as u64, n, "binary frame length != bin_len");
                    assert!(v["payload"].get("data").is_none(), "binary mode with data");
                    Some(b.to_vec())
                }
                other => {
                    panic!("expected the binary frame after a bin_len envelope, got {other:?}")
                }
            },
            None => None,
        };
        let f = Frame { v, raw: text, bin };
        if f.seq() == self.last_rx + 1 {
            self.last_rx = f.seq();
        }
        if f.ty() == "FLOW_UPDATE"
            && let Some(n) = f.p("add_messages").as_u64()
        {
            let ch = f.p("channel").as_str().expect("channel").to_string();
            *self.credit.entry(ch).or_insert(self.initial_credit) += n;
        }
        self.received.push(f.clone());
        Some(Got::Frame(f))
    }

    async fn next(&mut self) -> Got {
        match self.backlog.pop_front() {
            Some(g) => g,
            None => self.read().await,
        }
    }

    async fn frame(&mut self) -> Frame {
        match self.next().await {
            Got::Frame(f) => f,
            Got::Closed(c) => panic!("connection closed: {c:?}"),
        }
    }

    /// Frames up to and including the first one that matches.
    async fn until(&mut self, pred: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let f = self.frame().await;
            let done = pred(&f);
            out.push(f);
            if done {
                return out;
            }
        }
    }

    /// Frames that arrive within `d` (none expected to close the connection).
    async fn quiet_for(&mut self, d: Duration) -> Vec<Frame> {
        let mut out: Vec<Frame> = Vec::new();
        while let Some(g) = self.backlog.pop_front() {
            if let Got::Frame(f) = g {
                out.push(f);
            }
        }
        let end = Instant::now() + d;
        while let Some(g) = self
            .read_timeout(end.saturating_duration_since(Instant::now()))
            .await
        {
            match g {
                Got::Frame(f) => out.push(f),
                Got::Closed(c) => panic!("connection closed: {c:?}"),
            }
        }
        out
    }

    async fn expect_error(&mut self, code: &str) -> Frame {
        let frames = self.until(|f| f.ty() == "ERROR").await;
        let e = frames.last().expect("frame").clone();
        assert_eq!(e.p("code"), code, "{}", e.raw);
        assert_eq!(e.channel(), "SYSTEM");
        e
    }

    async fn expect_close(&mut self) -> Option<(u16, String)> {
        loop {
            match self.next().await {
                Got::Closed(c) => return c,
                Got::Frame(_) => {}
            }
        }
    }
}

async fn start(settings: AgentSettings) -> (AgentHandle, String) {
    let (_, h) = haip::spawn("127.0.0.1:0".parse().expect("addr"), settings)
        .await
        .expect("spawn agent");
    let url = h.url();
    (h, url)
}

fn fast() -> AgentSettings {
    AgentSettings {
        pace_realtime: false,
        ..AgentSettings::default()
    }
}

/// What one run carried.
#[derive(Debug, Default)]
struct Reply {
    run_id: String,
    text: String,
    opus: Vec<Vec<u8>>,
    pcm: Vec<u8>,
    pcm_ms: u64,
    binary_chunks: usize,
    status: String,
}

fn reply_of(frames: &[Frame]) -> Reply {
    let started = frames
        .iter()
        .find(|f| f.ty() == "RUN_STARTED")
        .expect("RUN_STARTED");
    let run_id = started.p("run_id").as_str().expect("run_id").to_string();
    assert_eq!(started.run_id(), Some(run_id.as_str()));
    let mut r = Reply {
        run_id: run_id.clone(),
        ..Reply::default()
    };
    let mut reply_mid = None;
    for f in frames
        .iter()
        .filter(|f| f.run_id() == Some(run_id.as_str()))
    {
        match f.ty() {
            "TEXT_MESSAGE_START" | "TEXT_MESSAGE_PART" | "TEXT_MESSAGE_END" => {
                assert_eq!(f.channel(), "AGENT");
                let mid = f.p("message_id").as_str().expect("message_id").to_string();
                assert_eq!(reply_mid.get_or_insert(mid.clone()), &mid);
                r.text.push_str(f.p("text").as_str().unwrap_or_default());
            }
            "AUDIO_CHUNK" => {
                assert_eq!(f.channel(), "AUDIO_OUT");
                let bytes = match &f.bin {
                    Some(b) => {
                        r.binary_chunks += 1;
                        assert_eq!(&f.v["bin_mime"], f.p("mime"));
                        b.clone()
                    }
                    None => B64
                        .decode(f.p("data").as_str().expect("data"))
                        .expect("base64"),
                };
                let ms: u64 = f
                    .p("duration_ms")
                    .as_str()
                    .expect("duration")
                    .parse()
                    .expect("ms");
                match f.p("mime").as_str().expect("mime") {
                    "audio/opus" => r.opus.push(bytes),
                    "audio/pcm;rate=16000" => {
                        r.pcm.extend(bytes);
                        r.pcm_ms += ms;
                    }
                    other => panic!("unexpected mime {other}"),
                }
            }
            "RUN_FINISHED" => {
                assert_eq!(f.channel(), "AGENT");
                r.status = f.p("status").as_str().expect("status").to_string();
            }
            "RUN_STARTED" => assert_eq!(f.channel(), "AGENT"),
            other => panic!("unexpected {other} in the run"),
        }
    }
    r
}

fn assert_clean(h: &AgentHandle) {
    let v = h.log().violations();
    assert!(v.is_empty(), "the client broke the protocol: {v:#?}");
}

fn assert_seqs_consecutive(frames: &[Frame]) {
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.seq(), i as u64 + 1, "seq gap at {}", f.raw);
    }
}

#[tokio::test]
async fn voice_turn_in_base64_is_answered_and_played_back() {
    let (h, url) = start(fast()).await;
    let mut c = Client::handshake(&url, false, None).await;
    let packets = opus_packets(20);
    c.voice_turn(&packets, false).await;
    let frames = c.until(|f| f.ty() == "RUN_FINISHED").await;
    let r = reply_of(&frames);
    assert_eq!(r.text, "I heard 0.4 seconds of audio.");
    assert_eq!(
        r.opus, packets,
        "the played-back packets are the user's own"
    );
    assert_eq!(
        r.binary_chunks, 0,
        "the client did not advertise binary_frames"
    );
    assert_eq!(r.pcm_ms, 300);
    assert_eq!(r.pcm.len(), 300 * 16 * 2);
    assert_eq!(r.status, "OK");
    // The played-back packets decode.
    let mut dec = OpusDecoder::new().expect("decoder");
    let mut out = vec![0f32; MAX_DECODED_SAMPLES];
    for p in &r.opus {
        assert_eq!(dec.decode(p, &mut out).expect("decode"), 960);
    }
    // Text before audio, RUN_FINISHED last, every frame numbered from 1 and acking our frames.
    let first_audio = frames
        .iter()
        .position(|f| f.ty() == "AUDIO_CHUNK")
        .expect("audio");
    let text_end = frames
        .iter()
        .position(|f| f.ty() == "TEXT_MESSAGE_END")
        .expect("end");
    assert!(text_end < first_audio);
    assert_seqs_consecutive(&c.received);
    assert_eq!(
        frames.last().expect("last").v["ack"],
        json!(c.seq.to_string())
    );
    for f in &frames {
        assert_eq!(f.v["session"], json!(c.session));
    }

    let s = h.stats();
    assert_eq!(s.handshakes, 1);
    assert_eq!(s.turns, 1);
    assert_eq!(s.turn_records[0].audio_ms, 400);
    assert_eq!(s.turn_records[0].audio_chunks, 20);
    assert_eq!(s.turn_records[0].audio_mime.as_deref(), Some("audio/opus"));
    assert_eq!(
        (s.runs_started, s.runs_finished, s.runs_cancelled),
        (1, 1, 0)
    );
    assert_eq!(s.audio_chunks_sent, 35);
    assert_clean(&h);
}

#[tokio::test]
async fn voice_turn_in_binary_mode_both_ways() {
    let (h, url) = start(fast()).await;
    let mut c = Client::handshake(&url, true, None).await;
    let packets = opus_packets(10);
    c.voice_turn(&packets, true).await;
    let frames = c.until(|f| f.ty() == "RUN_FINISHED").await;
    let r = reply_of(&frames);
    assert_eq!(r.text, "I heard 0.2 seconds of audio.");
    assert_eq!(r.opus, packets);
    assert_eq!(r.binary_chunks, 10 + 15, "every agent chunk in binary mode");
    assert_eq!(r.status, "OK");
    let s = h.stats();
    assert_eq!(s.turn_records[0].binary_chunks, 10);
    assert_clean(&h);
}

#[tokio::test]
async fn text_turn_is_answered_with_the_text() {
    let (h, url) = start(AgentSettings {
        text_reply_parts: false,
        reply_tone_ms: 0,
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    c.text_turn("hello ", &["agent", "!"]).await;
    let frames = c.until(|f| f.ty() == "RUN_FINISHED").await;
    let start = frames
        .iter()
        .find(|f| f.ty() == "TEXT_MESSAGE_START")
        .expect("start");
    assert_eq!(start.p("text"), "You said: hello agent!");
    assert_eq!(start.p("author"), "agent");
    let r = reply_of(&frames);
    assert!(r.opus.is_empty() && r.pcm.is_empty());
    assert_eq!(h.stats().turn_records[0].text, "hello agent!");
    assert_clean(&h);
}

#[tokio::test]
async fn run_cancel_mid_reply_stops_the_audio() {
    let (h, url) = start(AgentSettings {
        reply_tone_ms: 3_000,
        ..AgentSettings::default()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    c.voice_turn(&opus_packets(5), false).await;
    let frames = c.until(|f| f.ty() == "AUDIO_CHUNK").await;
    let run_id = reply_of(&frames).run_id;
    // A bit of the reply plays, then the user barges in.
    c.until(|f| f.ty() == "AUDIO_CHUNK" && f.p("mime") == "audio/pcm;rate=16000")
        .await;
    let mut cancel = c.envelope("USER", "RUN_CANCEL", json!({"run_id": run_id}));
    cancel["run_id"] = json!(run_id);
    c.take_credit("USER").await;
    let sent_at = Instant::now();
    c.send_raw(&cancel).await;
    let rest = c.until(|f| f.ty() == "RUN_FINISHED").await;
    assert!(
        sent_at.elapsed() < Duration::from_millis(500),
        "cancel took {:?}",
        sent_at.elapsed()
    );
    let fin = rest.last().expect("finished");
    assert_eq!(fin.p("status"), "CANCELLED");
    assert_eq!(fin.run_id(), Some(run_id.as_str()));
    let late = c.quiet_for(Duration::from_millis(300)).await;
    assert!(
        late.iter().all(|f| f.run_id() != Some(run_id.as_str())),
        "frames of the cancelled run after RUN_FINISHED: {late:?}"
    );
    let chunks = c
        .received
        .iter()
        .filter(|f| f.ty() == "AUDIO_CHUNK")
        .count();
    assert!(
        chunks < 5 + 150 / 2,
        "the reply was not cut short: {chunks} chunks"
    );

    // A cancel for a run that never existed is an error.
    let bogus = uuid();
    let mut cancel = c.envelope("USER", "RUN_CANCEL", json!({"run_id": bogus}));
    cancel["run_id"] = json!(bogus);
    c.take_credit("USER").await;
    c.send_raw(&cancel).await;
    c.expect_error("RUN_NOT_FOUND").await;

    let s = h.stats();
    assert_eq!(
        (s.runs_started, s.runs_finished, s.runs_cancelled),
        (1, 0, 1)
    );
    assert_eq!(s.cancels_received, 2);
    assert_eq!(s.violations.len(), 1);
    assert_eq!(s.violations[0].code, "RUN_NOT_FOUND");
}

#[tokio::test]
async fn ignore_cancel_injection_finishes_the_run() {
    let (h, url) = start(AgentSettings {
        reply_tone_ms: 200,
        inject: Inject {
            ignore_cancel: true,
            ..Inject::default()
        },
        ..AgentSettings::default()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    c.voice_turn(&opus_packets(3), false).await;
    let frames = c.until(|f| f.ty() == "AUDIO_CHUNK").await;
    let run_id = reply_of(&frames).run_id;
    c.send("USER", "RUN_CANCEL", json!({"run_id": run_id}))
        .await;
    let rest = c.until(|f| f.ty() == "RUN_FINISHED").await;
    assert_eq!(rest.last().expect("fin").p("status"), "OK");
    let s = h.stats();
    assert_eq!(
        (s.cancels_received, s.cancels_ignored, s.runs_finished),
        (1, 1, 1)
    );
    assert_clean(&h);
}

/// Sends `v` raw on a fresh, handshaken connection and expects one ERROR `code` and one violation.
async fn expect_violation(
    url: &str,
    h: &AgentHandle,
    code: &str,
    make: impl FnOnce(&mut Client) -> Value,
) {
    let before = h.log().violations().len();
    let mut c = Client::handshake(url, true, None).await;
    let v = make(&mut c);
    c.send_raw(&v).await;
    let e = c.expect_error(code).await;
    assert!(!e.p("message").as_str().expect("message").is_empty());
    let vs = h.log().violations();
    assert_eq!(vs.len(), before + 1, "{vs:#?}");
    assert_eq!(vs[before].code, code);
}

#[tokio::test]
async fn strict_envelope_and_payload_checks() {
    let (h, url) = start(fast()).await;
    // seq skipping ahead
    expect_violation(&url, &h, "SEQ_VIOLATION", |c| {
        c.seq += 1;
        c.envelope("SYSTEM", "PING", json!({"nonce": "a"}))
    })
    .await;
    // the same frame twice
    {
        let before = h.log().violations().len();
        let mut c = Client::handshake(&url, false, None).await;
        let ping = c.send("SYSTEM", "PING", json!({"nonce": "b"})).await;
        c.send_raw(&ping).await;
        c.expect_error("SEQ_VIOLATION").await;
        let pongs = c.received.iter().filter(|f| f.ty() == "PONG").count();
        assert_eq!(pongs, 1, "the duplicate is not answered");
        assert_eq!(h.log().violations().len(), before + 1);
    }
    // unknown envelope field
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        let mut v = c.envelope("SYSTEM", "PING", json!({}));
        v["foo"] = json!(1);
        v
    })
    .await;
    // ... marked critical
    expect_violation(&url, &h, "UNSUPPORTED_TYPE", |c| {
        let mut v = c.envelope("SYSTEM", "PING", json!({}));
        v["foo"] = json!(1);
        v["crit"] = json!(true);
        v
    })
    .await;
    // unknown type
    expect_violation(&url, &h, "UNSUPPORTED_TYPE", |c| {
        c.envelope("SYSTEM", "MESSAGE_START", json!({}))
    })
    .await;
    // non-numeric seq
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        let mut v = c.envelope("SYSTEM", "PING", json!({}));
        v["seq"] = json!("1795315057042yhbzj9u4b");
        v
    })
    .await;
    // numeric ts as a JSON number
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        let mut v = c.envelope("SYSTEM", "PING", json!({}));
        v["ts"] = json!(1_795_315_057_042u64);
        v
    })
    .await;
    // bad base64
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        c.envelope(
            "AUDIO_IN",
            "AUDIO_CHUNK",
            json!({"message_id": uuid(), "mime": "audio/opus", "duration_ms": "20", "data": "not base64!"}),
        )
    })
    .await;
    // duration_ms as a number, extra payload keys
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        c.envelope(
            "AUDIO_IN",
            "AUDIO_CHUNK",
            json!({"message_id": uuid(), "mime": "audio/pcm", "duration_ms": 20, "sample_rate": "16000", "data": "AAAA"}),
        )
    })
    .await;
    // binary mode with data as well
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        let mut v = c.envelope(
            "AUDIO_IN",
            "AUDIO_CHUNK",
            json!({"message_id": uuid(), "mime": "audio/opus", "data": "AAAA"}),
        );
        v["bin_len"] = json!(0);
        v["bin_mime"] = json!("audio/opus");
        v
    })
    .await;
    // session other than the one the agent issued
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        let mut v = c.envelope("SYSTEM", "PING", json!({}));
        v["session"] = json!(uuid());
        v
    })
    .await;
    // ack of a frame the agent never sent
    expect_violation(&url, &h, "SEQ_VIOLATION", |c| {
        let mut v = c.envelope("SYSTEM", "PING", json!({}));
        v["ack"] = json!("99");
        v
    })
    .await;
    // a PART for a message that was never started
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        c.envelope(
            "USER",
            "TEXT_MESSAGE_PART",
            json!({"message_id": uuid(), "text": "x"}),
        )
    })
    .await;
    // a UUIDv7 id
    expect_violation(&url, &h, "PROTOCOL_VIOLATION", |c| {
        let mut v = c.envelope("SYSTEM", "PING", json!({}));
        v["id"] = json!("01890a5d-ac96-774b-bcce-b302099a8057");
        v
    })
    .await;
    let s = h.stats();
    assert_eq!(s.handshakes, 14);
    assert_eq!(s.violations.len(), 14, "{:#?}", s.violations);
}

#[tokio::test]
async fn binary_frames_must_follow_their_envelope() {
    let (h, url) = start(fast()).await;
    let mut c = Client::handshake(&url, true, None).await;
    // A binary frame out of nowhere.
    c.send_bin(&[1, 2, 3]).await;
    c.expect_error("PROTOCOL_VIOLATION").await;
    // An envelope announcing 4 bytes, then 3.
    let mid = uuid();
    c.send("USER", "TEXT_MESSAGE_START", json!({"message_id": mid}))
        .await;
    let mut v = c.envelope(
        "AUDIO_IN",
        "AUDIO_CHUNK",
        json!({"message_id": mid, "mime": "audio/opus", "duration_ms": "20"}),
    );
    v["bin_len"] = json!(4);
    v["bin_mime"] = json!("audio/opus");
    c.take_credit("AUDIO_IN").await;
    c.send_raw(&v).await;
    c.send_bin(&[1, 2, 3]).await;
    c.expect_error("PROTOCOL_VIOLATION").await;
    // An envelope announcing a binary frame, then a text frame.
    let mut v = c.envelope(
        "AUDIO_IN",
        "AUDIO_CHUNK",
        json!({"message_id": mid, "mime": "audio/opus", "duration_ms": "20"}),
    );
    v["bin_len"] = json!(2);
    v["bin_mime"] = json!("audio/opus");
    c.take_credit("AUDIO_IN").await;
    c.send_raw(&v).await;
    c.send("SYSTEM", "PING", json!({"nonce": "n"})).await;
    c.expect_error("PROTOCOL_VIOLATION").await;
    assert_eq!(h.log().violations().len(), 3);

    // Binary mode is refused where the agent did not advertise it.
    let (h2, url2) = start(AgentSettings {
        binary_frames: false,
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url2, true, None).await;
    c.send("USER", "TEXT_MESSAGE_START", json!({"message_id": mid}))
        .await;
    c.send_audio_binary(&mid, &[9; 10]).await;
    c.expect_error("PROTOCOL_VIOLATION").await;
    let vs = h2.log().violations();
    assert_eq!(vs.len(), 1);
    assert!(vs[0].message.contains("binary_frames"), "{}", vs[0]);
}

#[tokio::test]
async fn handshake_must_come_first_and_share_major_1() {
    let (h, url) = start(fast()).await;
    // First frame not HAI: ERROR, then close 1002.
    let mut c = Client::connect(&url).await;
    let v = c.envelope("SYSTEM", "PING", json!({}));
    c.send_raw(&v).await;
    c.expect_error("PROTOCOL_VIOLATION").await;
    assert_eq!(c.expect_close().await.map(|c| c.0), Some(1002));

    // A HAI without accept_events.
    let mut c = Client::connect(&url).await;
    let v = c.envelope(
        "SYSTEM",
        "HAI",
        json!({"haip_version": "1.1.2", "accept_major": [1]}),
    );
    c.send_raw(&v).await;
    c.expect_error("PROTOCOL_VIOLATION").await;
    assert_eq!(c.expect_close().await.map(|c| c.0), Some(1002));

    // No common MAJOR.
    let mut c = Client::connect(&url).await;
    let v = c.envelope(
        "SYSTEM",
        "HAI",
        json!({"haip_version": "2.0.0", "accept_major": [2], "accept_events": ["HAI", "ERROR"]}),
    );
    c.send_raw(&v).await;
    c.expect_error("VERSION_INCOMPATIBLE").await;
    assert_eq!(c.expect_close().await.map(|c| c.0), Some(1002));

    // The client's first HAI may carry its own session (it may not have seen ours yet).
    let mut c = Client::connect(&url).await;
    let mut v = c.envelope(
        "SYSTEM",
        "HAI",
        json!({"haip_version": "1.1.2", "accept_major": [1], "accept_events": haip::EVENT_TYPES}),
    );
    v["session"] = json!(uuid());
    c.send_raw(&v).await;
    c.send("SYSTEM", "PING", json!({"nonce": "ok"})).await;
    let pong = c.until(|f| f.ty() == "PONG" || f.ty() == "ERROR").await;
    assert_eq!(pong.last().expect("pong").p("nonce"), "ok");

    let s = h.stats();
    assert_eq!(s.violations.len(), 3, "{:#?}", s.violations);
    assert_eq!(s.handshakes, 1);
}

#[tokio::test]
async fn token_is_required_when_set() {
    let (h, url) = start(AgentSettings {
        token: Some("s3cret".into()),
        ..fast()
    })
    .await;
    for bad in [url.clone(), format!("{url}?token=nope")] {
        let (mut ws, _) = tokio_tungstenite::connect_async(bad.as_str())
            .await
            .expect("the upgrade itself is accepted");
        match tokio::time::timeout(STEP, ws.next()).await.expect("close") {
            Some(Ok(Message::Close(Some(cf)))) => {
                assert_eq!(u16::from(cf.code), 1008);
                assert_eq!(cf.reason.as_str(), "Invalid token");
            }
            other => panic!("expected close 1008 before any frame, got {other:?}"),
        }
    }
    // ?token= works, and so does the subprotocol form.
    let c = Client::connect(&format!("{url}?token=s3cret")).await;
    assert!(!c.session.is_empty());
    let mut req = url.as_str().into_client_request().expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "haip, token.s3cret".parse().expect("header"),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"haip"[..])
    );
    Client::with_ws(ws).await;
    let s = h.stats();
    assert_eq!(s.auth_rejected, 2);
    assert_eq!(s.connections, 4);
}

#[tokio::test]
async fn credit_is_enforced_and_replenished() {
    // With replenishment: a turn much longer than the grant flows, paced by FLOW_UPDATEs.
    let (h, url) = start(AgentSettings {
        initial_credit_messages: 4,
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    assert_eq!(c.initial_credit, 4);
    c.voice_turn(&opus_packets(30), false).await;
    let frames = c.until(|f| f.ty() == "RUN_FINISHED").await;
    assert_eq!(reply_of(&frames).text, "I heard 0.6 seconds of audio.");
    let updates: Vec<&Frame> = c
        .received
        .iter()
        .filter(|f| f.ty() == "FLOW_UPDATE" && f.p("channel") == "AUDIO_IN")
        .collect();
    assert!(updates.len() >= 13, "{} FLOW_UPDATEs", updates.len());
    assert!(
        updates
            .iter()
            .all(|f| f.channel() == "SYSTEM" && f.p("add_messages").as_u64() >= Some(1))
    );
    let s = h.stats();
    assert!(
        s.flow_updates_sent >= 14 && s.credit_granted_messages >= 28,
        "{s:?}"
    );
    assert_clean(&h);

    // Without: the frame past the grant is refused.
    let (h, url) = start(AgentSettings {
        initial_credit_messages: 2,
        replenish: false,
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await; // HAI: 1 of 2 on SYSTEM
    c.send("SYSTEM", "PING", json!({"nonce": "1"})).await; // 2 of 2
    let v = c.envelope("SYSTEM", "PING", json!({"nonce": "2"}));
    c.send_raw(&v).await; // over
    c.expect_error("FLOW_CONTROL_VIOLATION").await;
    let pongs = c.received.iter().filter(|f| f.ty() == "PONG").count();
    assert_eq!(pongs, 1);
    assert_eq!(h.log().violations()[0].code, "FLOW_CONTROL_VIOLATION");
}

#[tokio::test]
async fn agent_obeys_client_credit_and_pause() {
    let (h, url) = start(AgentSettings {
        reply_tone_ms: 0,
        ..fast()
    })
    .await;
    // The client grants the agent 3 messages per channel.
    let mut c = Client::handshake(&url, false, Some(3)).await;
    c.send("SYSTEM", "PAUSE_CHANNEL", json!({"channel": "AUDIO_OUT"}))
        .await;
    c.voice_turn(&opus_packets(2), false).await;
    let held = c.quiet_for(Duration::from_millis(300)).await;
    let types: Vec<&str> = held.iter().map(Frame::ty).collect();
    assert_eq!(
        types,
        ["RUN_STARTED", "TEXT_MESSAGE_START", "TEXT_MESSAGE_PART"]
    );
    c.send(
        "SYSTEM",
        "FLOW_UPDATE",
        json!({"channel": "AGENT", "add_messages": 100}),
    )
    .await;
    let more = c.until(|f| f.ty() == "TEXT_MESSAGE_END").await;
    assert!(more.iter().all(|f| f.channel() == "AGENT"));
    assert!(
        c.quiet_for(Duration::from_millis(300)).await.is_empty(),
        "AUDIO_OUT is paused"
    );
    c.send("SYSTEM", "RESUME_CHANNEL", json!({"channel": "AUDIO_OUT"}))
        .await;
    let rest = c.until(|f| f.ty() == "RUN_FINISHED").await;
    assert_eq!(rest.iter().filter(|f| f.ty() == "AUDIO_CHUNK").count(), 2);
    assert!(h.stats().outbound_holds >= 2);
    assert_clean(&h);
}

#[tokio::test]
async fn replay_request_returns_the_original_frames() {
    let (h, url) = start(fast()).await;
    let mut c = Client::handshake(&url, false, None).await;
    c.text_turn("hi", &[]).await;
    c.until(|f| f.ty() == "RUN_FINISHED").await;
    let originals: Vec<String> = c.received[1..4].iter().map(|f| f.raw.clone()).collect();
    c.send(
        "SYSTEM",
        "REPLAY_REQUEST",
        json!({"from_seq": "2", "to_seq": "4"}),
    )
    .await;
    let mut replayed = Vec::new();
    for _ in 0..3 {
        replayed.push(c.frame().await.raw);
    }
    assert_eq!(replayed, originals, "same id, seq and content");
    // from after to is a client mistake.
    c.send(
        "SYSTEM",
        "REPLAY_REQUEST",
        json!({"from_seq": "4", "to_seq": "2"}),
    )
    .await;
    c.expect_error("PROTOCOL_VIOLATION").await;
    assert_eq!(h.stats().replay_requests_served, 1);
    assert_eq!(h.stats().frames_replayed, 3);
}

#[tokio::test]
async fn replay_outside_the_window_is_too_old() {
    let (h, url) = start(AgentSettings {
        initial_credit_messages: 5_000,
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    for i in 0..1_001 {
        c.send("SYSTEM", "PING", json!({"nonce": i.to_string()}))
            .await;
        if i % 100 == 0 {
            // Read as we go, so neither side's socket buffer fills.
            let nonce = i.to_string();
            c.until(|f| f.ty() == "PONG" && f.p("nonce") == nonce.as_str())
                .await;
        }
    }
    c.send(
        "SYSTEM",
        "REPLAY_REQUEST",
        json!({"from_seq": "1", "to_seq": "5"}),
    )
    .await;
    c.expect_error("REPLAY_TOO_OLD").await;
    assert_eq!(h.stats().pings_answered, 1_001);
    assert_clean(&h);
}

#[tokio::test]
async fn skipped_seq_is_recovered_by_replay() {
    let (h, url) = start(AgentSettings {
        inject: Inject {
            skip_seq_once: Some(3),
            ..Inject::default()
        },
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    c.text_turn("hi", &[]).await;
    c.until(|f| f.ty() == "RUN_FINISHED").await;
    let seqs: Vec<u64> = c.received.iter().map(Frame::seq).collect();
    assert_eq!(&seqs[..3], &[1, 2, 4], "frame 3 never arrived");
    assert_eq!(c.last_rx, 2);
    c.send(
        "SYSTEM",
        "REPLAY_REQUEST",
        json!({"from_seq": "3", "to_seq": "3"}),
    )
    .await;
    let missing = c.frame().await;
    assert_eq!(missing.seq(), 3);
    assert_eq!(missing.ty(), "TEXT_MESSAGE_START");
    assert_eq!(missing.run_id(), c.received[1].run_id());
    // Our ack may now move past the gap.
    c.last_rx = c.received.iter().map(Frame::seq).max().expect("seq");
    c.send("SYSTEM", "PING", json!({"nonce": "after"})).await;
    c.until(|f| f.ty() == "PONG").await;
    assert_clean(&h);
}

#[tokio::test]
async fn acking_past_a_gap_is_a_violation() {
    let (h, url) = start(AgentSettings {
        inject: Inject {
            skip_seq_once: Some(2),
            ..Inject::default()
        },
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    c.send("SYSTEM", "PING", json!({"nonce": "a"})).await; // PONG is seq 2, withheld
    c.send("SYSTEM", "PING", json!({"nonce": "b"})).await; // PONG seq 3
    c.until(|f| f.p("nonce") == "b").await;
    c.last_rx = 3; // a client that ignores the gap
    c.send("SYSTEM", "PING", json!({"nonce": "c"})).await;
    c.expect_error("SEQ_VIOLATION").await;
    assert_eq!(h.log().violations().len(), 1);
}

#[tokio::test]
async fn duplicate_and_drop_injections() {
    let (h, url) = start(AgentSettings {
        inject: Inject {
            duplicate_every: Some(2),
            drop_after_frames: Some(5),
            ..Inject::default()
        },
        ..fast()
    })
    .await;
    let mut c = Client::handshake(&url, false, None).await;
    c.text_turn("hi", &[]).await;
    let mut got = Vec::new();
    let closed = loop {
        match c.next().await {
            Got::Frame(f) => got.push(f),
            Got::Closed(cf) => break cf,
        }
    };
    assert_eq!(closed, None, "dropped without a close frame");
    // 5 frames sent, the 2nd and 4th twice (same id and seq); the HAI was read by connect().
    let ids: Vec<(u64, String)> = std::iter::once(&c.received[0])
        .chain(&got)
        .map(|f| (f.seq(), f.v["id"].as_str().expect("id").to_string()))
        .collect();
    let seqs: Vec<u64> = ids.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [1, 2, 2, 3, 4, 4, 5]);
    assert_eq!(ids[1], ids[2]);
    assert_eq!(h.stats().frames_sent, 5);
}

#[tokio::test]
async fn shutdown_closes_connections_with_1001() {
    let (h, url) = start(fast()).await;
    let mut c = Client::handshake(&url, false, None).await;
    c.send("SYSTEM", "PING", json!({"nonce": "x"})).await;
    c.until(|f| f.ty() == "PONG").await;
    let shut = tokio::spawn(h.shutdown());
    assert_eq!(c.expect_close().await.map(|c| c.0), Some(1001));
    shut.await.expect("join").expect("shutdown");
}
