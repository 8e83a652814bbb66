//! The health endpoint during a real session against the built-in agent: `/metrics` parses as the
//! Prometheus text format and its counters move with the run; `/healthz` reports state and the link.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use hearken::agent::haip::{self as agent, AgentSettings};
use hearken::config::Config;
use hearken::events::EventSink;
use hearken::service::{self, Io, RunOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

async fn get(port: u16, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let (head, body) = buf.split_once("\r\n\r\n").expect("a response");
    (head.to_string(), body.to_string())
}

/// Parse the text format: every sample belongs to a family declared by `# TYPE`; values are numbers.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(["counter", "gauge", "histogram"].contains(&ty), "{line}");
            types.insert(name.to_string(), ty.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (key, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = value.parse().expect("a number");
        let name = key.split('{').next().expect("name");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample without TYPE: {line}");
        samples.insert(key.to_string(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_a_session() {
    let (addr, a) = agent::spawn(
        "127.0.0.1:0".parse().expect("addr"),
        AgentSettings::default(),
    )
    .await
    .expect("agent");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let cfg = Config::from_toml_str(
        "",
        "test",
        &[
            format!("agent.url=\"ws://{addr}/haip\""),
            format!("health.listen=\"127.0.0.1:{port}\""),
        ],
    )
    .expect("config");
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("audio/fixtures/one_utterance.wav");
    let (output, _) = service::memory_output();
    let (_stop, shutdown) = watch::channel(false);
    let run = tokio::spawn(service::run(
        cfg,
        RunOptions {
            io: Io::File {
                input,
                output,
                realtime: true,
            },
            events: EventSink::None,
            record_events: false,
            speech: None,
        },
        shutdown,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (head, body) = get(port, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let before = parse(&body);
    assert_eq!(before["hearken_turns_total"], 0.0);
    let (_, health) = get(port, "/healthz").await;
    let h: serde_json::Value = serde_json::from_str(&health).expect("json");
    assert_eq!(h["agent_configured"], true);
    assert!(h["last_turn"].is_null());

    // After the user's turn has reached the agent and its answer has started.
    assert!(
        a.log()
            .wait_for(Duration::from_secs(10), |s| s.runs_started >= 1)
            .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, body) = get(port, "/metrics").await;
    let after = parse(&body);
    assert_eq!(after["hearken_turns_total"], 1.0);
    assert!(after["hearken_uplink_bytes_total"] > 1_000.0, "{after:?}");
    assert!(after["hearken_downlink_bytes_total"] > 0.0, "{after:?}");
    assert_eq!(after["hearken_agent_connected"], 1.0);
    assert_eq!(after["hearken_end_of_turn_seconds_count"], 1.0);
    assert!(after["hearken_frame_to_socket_seconds_count"] > 10.0);
    // Cumulative buckets: +Inf holds every observation.
    assert_eq!(
        after["hearken_frame_to_socket_seconds_bucket{le=\"+Inf\"}"],
        after["hearken_frame_to_socket_seconds_count"]
    );
    let (_, health) = get(port, "/healthz").await;
    let h: serde_json::Value = serde_json::from_str(&health).expect("json");
    assert_eq!(h["connected"], true);
    assert!(
        h["last_turn"]["duration_ms"]
            .as_u64()
            .is_some_and(|d| d > 500),
        "{h}"
    );
    assert!(h["state"].is_string());
    let (head, _) = get(port, "/nope").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    let report = run.await.expect("join").expect("run");
    assert_eq!(report.turns.len(), 1);
}

#[test]
fn the_endpoint_must_be_loopback() {
    let e = Config::from_toml_str("", "test", &["health.listen=\"0.0.0.0:9464\"".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("health.listen") && e.contains("loopback"), "{e}");
}
