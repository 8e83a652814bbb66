//! HAP over its HTTP POST transport with TLS: a small JSON-RPC gateway (what a deployment puts in front
//! of a HAP agent, which itself only speaks stdio) serves the built-in agent over HTTPS with a
//! certificate from a test CA. With that CA as `agent.ca_file` a whole discovery and a turn work; with
//! another CA the first request fails with a TLS error that says why.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hearken::agent::hap::{self as agent, AgentSettings};
use hearken::config::TlsRoots;
use hearken::protocol::hap::{HapClient, HapSettings};
use hearken::protocol::{Downlink, FinishStatus, Protocol, SessionInfo, Uplink, Wire};
use hearken::transport::http::{self, HttpSettings};
use hearken::transport::{AgentConnection, TransportError};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, rustls};

const NO_HANG: Duration = Duration::from_secs(10);

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("hearken-hap-https-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One request's body through a fresh built-in agent: the body as one line on its stdin, its lines
/// read back until the response (notifications before it are dropped: HTTP has one answer).
async fn through_agent(body: &str) -> String {
    let (mut ours, theirs) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(theirs);
    let settings = AgentSettings {
        lookup_ms: 0,
        ..AgentSettings::default()
    };
    let server = tokio::spawn(agent::serve_stdio(r, w, settings));
    ours.write_all(body.trim().as_bytes()).await.unwrap();
    ours.write_all(b"\n").await.unwrap();
    let mut lines = BufReader::new(ours).lines();
    let mut answer = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v.get("method").is_none() {
            answer = line;
            break;
        }
    }
    server.abort();
    answer
}

/// An HTTPS JSON-RPC gateway on 127.0.0.1 with `server` TLS; answers every POST through the agent.
/// Returns the port and how many requests it answered.
async fn gateway(
    server: Arc<rustls::ServerConfig>,
) -> (
    u16,
    Arc<std::sync::atomic::AtomicU32>,
    tokio::task::JoinHandle<()>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(server);
    let answered = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let count = answered.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                // A client that does not trust us aborts the handshake: nothing to answer.
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut raw = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&raw).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            assert!(head.starts_with("POST /hap HTTP/1.1\r\n"), "{head}");
                            break body[..len].to_string();
                        }
                    }
                };
                let answer = through_agent(&body).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    (port, answered, task)
}

fn settings(port: u16, ca_file: PathBuf) -> HttpSettings {
    HttpSettings {
        url: format!("https://localhost:{port}/hap"),
        token: None,
        allow_insecure: false,
        ca_file: Some(ca_file),
        // Only the test CA: the machine's own roots play no part.
        roots: TlsRoots::Webpki,
        max_body_bytes: 1 << 20,
        request_timeout: Duration::from_secs(5),
    }
}

/// Feeds the connection's answers to the codec until `pred` holds for an event; returns every event.
async fn run_until(
    codec: &mut HapClient,
    conn: &mut http::HttpConnection,
    t0: std::time::Instant,
    pred: impl Fn(&Downlink) -> bool,
) -> Vec<Downlink> {
    let mut events = Vec::new();
    loop {
        let wire = tokio::time::timeout(NO_HANG, conn.recv())
            .await
            .expect("no hang")
            .expect("an answer")
            .expect("no transport error");
        let d = codec.decode(t0.elapsed().as_millis() as u64, wire).unwrap();
        for w in d.replies {
            conn.send(w).await.unwrap();
        }
        let done = d.events.iter().any(&pred);
        events.extend(d.events);
        if done {
            return events;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_rpc_over_https_with_a_test_ca() {
    let tmp = Scratch::new("ok");
    let pki = common::test_pki(&["localhost"]);
    let ca = tmp.0.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (port, answered, gw) = gateway(pki.server).await;

    let mut conn = http::connect(&settings(port, ca)).await.unwrap();
    let mut codec = HapClient::new(HapSettings::default());
    let t0 = std::time::Instant::now();
    for w in codec.open(0, &SessionInfo::default()) {
        conn.send(w).await.unwrap();
    }
    // Discovery (tools/list, resources/read hap://server/info) over TLS.
    let events = run_until(&mut codec, &mut conn, t0, |e| {
        matches!(e, Downlink::Ready { .. })
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Downlink::Ready { session } if session == "hearken-hap")),
        "{events:?}"
    );
    assert_eq!(codec.target(), Some(("tools/call", "ask")));
    // A turn: one tools/call, its answer spoken.
    for w in codec
        .encode(
            t0.elapsed().as_millis() as u64,
            Uplink::Text("Turn on the lights".into()),
        )
        .unwrap()
    {
        let Wire::Text(t) = &w else { panic!() };
        assert!(t.contains("\"method\":\"tools/call\""), "{t}");
        conn.send(w).await.unwrap();
    }
    let events = run_until(&mut codec, &mut conn, t0, |e| {
        matches!(e, Downlink::ResponseFinished { .. })
    })
    .await;
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Downlink::TextDelta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(text.starts_with("You said: Turn on the lights."), "{text}");
    assert!(events.iter().any(|e| matches!(
        e,
        Downlink::ResponseFinished {
            status: FinishStatus::Ok,
            ..
        }
    )));
    assert_eq!(answered.load(std::sync::atomic::Ordering::Relaxed), 3);
    gw.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_a_clear_tls_error() {
    let tmp = Scratch::new("wrong-ca");
    let pki = common::test_pki(&["localhost"]);
    let other = common::test_pki(&["localhost"]);
    let ca = tmp.0.join("other-ca.pem");
    std::fs::write(&ca, &other.ca_pem).unwrap();
    let (port, answered, gw) = gateway(pki.server).await;

    let mut conn = http::connect(&settings(port, ca)).await.unwrap();
    conn.send(Wire::Text(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#.into(),
    ))
    .await
    .unwrap();
    let e = tokio::time::timeout(NO_HANG, conn.recv())
        .await
        .expect("no hang")
        .expect("an outcome")
        .expect_err("the server is not trusted");
    let msg = e.to_string();
    assert!(matches!(e, TransportError::Tls(_)), "{msg}");
    // It says what is wrong with the certificate (the other CA has the same name, so rustls finds
    // it and the signature does not check) and where trust comes from.
    assert!(
        msg.contains("invalid peer certificate: BadSignature"),
        "{msg}"
    );
    assert!(msg.contains("agent.ca_file"), "{msg}");
    assert!(e.is_transient());
    assert_eq!(answered.load(std::sync::atomic::Ordering::Relaxed), 0);
    gw.abort();
}
