//! Black-box tests of the WebSocket transport against small in-test servers on 127.0.0.1:0
//! (tokio-tungstenite, and tokio-rustls for wss:// with a CA made by rcgen). No internet needed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::test_pki;
use futures_util::{SinkExt, StreamExt};
use hearken::config::{Secret, TlsRoots, TokenMode};
use hearken::protocol::Wire;
use hearken::transport::ws::{TransportError, WsSettings, connect};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const LIMIT: usize = 64 * 1024;

fn settings(url: String) -> WsSettings {
    WsSettings {
        url,
        token: None,
        token_mode: TokenMode::Query,
        allow_insecure: false,
        ca_file: None,
        roots: TlsRoots::Webpki,
        max_frame_bytes: LIMIT,
        connect_timeout: Duration::from_secs(5),
    }
}

/// What the server saw of the upgrade request.
#[derive(Debug, Default, Clone)]
struct Seen {
    uri: String,
    protocol: Option<String>,
}

/// How the server answers the upgrade.
#[derive(Debug, Default, Clone, Copy)]
struct Answer {
    /// Put this in the response's `Sec-WebSocket-Protocol`.
    select_protocol: Option<&'static str>,
    /// Refuse the upgrade with this HTTP status.
    reject: Option<u16>,
}

/// The server side of the upgrade: records the request, answers per [`Answer`].
struct Upgrade {
    answer: Answer,
    seen: Arc<Mutex<Seen>>,
}

impl Callback for Upgrade {
    fn on_request(self, req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
        *self.seen.lock().expect("seen lock") = Seen {
            uri: req.uri().to_string(),
            protocol: req
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().expect("ASCII header").to_owned()),
        };
        if let Some(code) = self.answer.reject {
            let mut e = ErrorResponse::new(Some("invalid token".into()));
            *e.status_mut() = StatusCode::from_u16(code).expect("status code");
            return Err(e);
        }
        if let Some(p) = self.answer.select_protocol {
            resp.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(p));
        }
        Ok(resp)
    }
}

async fn accept_ws<S>(stream: S, answer: Answer) -> (Result<WebSocketStream<S>, WsError>, Seen)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let seen = Arc::new(Mutex::new(Seen::default()));
    let upgrade = Upgrade {
        answer,
        seen: seen.clone(),
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, upgrade).await;
    let seen = seen.lock().expect("seen lock").clone();
    (ws, seen)
}

/// A plain server for one connection: the upgrade is answered per `answer`, then `run` gets the socket.
/// The task returns what the server saw and what `run` returned.
async fn serve_one<F, Fut, T>(
    answer: Answer,
    run: F,
) -> (u16, tokio::task::JoinHandle<(Seen, Option<T>)>)
where
    F: FnOnce(WebSocketStream<tokio::net::TcpStream>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let (ws, seen) = accept_ws(tcp, answer).await;
        match ws {
            Ok(ws) => (seen, Some(run(ws).await)),
            Err(_) => (seen, None),
        }
    });
    (port, task)
}

fn text(s: &str) -> Message {
    Message::Text(s.into())
}

#[tokio::test]
async fn text_binary_and_pings_round_trip() {
    let (port, server) = serve_one(Answer::default(), |mut ws| async move {
        let mut got_close = false;
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) if t == "ping-me" => {
                    ws.send(Message::Ping("p".into())).await.unwrap();
                    // The client answers without being asked (it is inside recv()).
                    match ws.next().await {
                        Some(Ok(Message::Pong(p))) if &p[..] == b"p" => {
                            ws.send(text("pong seen")).await.unwrap()
                        }
                        other => panic!("expected the client's pong, got {other:?}"),
                    }
                }
                m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await.unwrap(),
                Message::Ping(_) => ws.send(text("ping seen")).await.unwrap(),
                Message::Close(_) => got_close = true,
                _ => {}
            }
        }
        got_close
    })
    .await;

    let mut c = connect(&settings(format!("ws://127.0.0.1:{port}/haip")))
        .await
        .unwrap();
    assert_eq!(c.subprotocol(), None);
    let t0 = c.last_rx();

    c.send(Wire::Text("hello".into())).await.unwrap();
    assert_eq!(c.recv().await.unwrap().unwrap(), Wire::Text("hello".into()));
    let bin = vec![0u8, 1, 2, 255];
    c.send(Wire::Binary(bin.clone())).await.unwrap();
    assert_eq!(c.recv().await.unwrap().unwrap(), Wire::Binary(bin));
    // Just under the limit passes.
    let big = vec![7u8; LIMIT - 16];
    c.send(Wire::Binary(big.clone())).await.unwrap();
    assert_eq!(c.recv().await.unwrap().unwrap(), Wire::Binary(big));

    c.send(Wire::Text("ping-me".into())).await.unwrap();
    assert_eq!(
        c.recv().await.unwrap().unwrap(),
        Wire::Text("pong seen".into())
    );
    c.ping().await;
    assert_eq!(
        c.recv().await.unwrap().unwrap(),
        Wire::Text("ping seen".into())
    );
    assert!(c.last_rx() > t0);

    c.close().await;
    assert!(c.recv().await.is_none());
    let (seen, got_close) = server.await.unwrap();
    assert_eq!(seen.uri, "/haip");
    assert_eq!(seen.protocol, None);
    assert_eq!(got_close, Some(true), "the server saw a close frame");
}

#[tokio::test]
async fn token_in_query_is_percent_encoded() {
    for (path, expect) in [
        ("/haip?v=1", "/haip?v=1&token=a%20b%2Bc%2F%C3%A9.x"),
        ("/haip", "/haip?token=a%20b%2Bc%2F%C3%A9.x"),
        ("", "/?token=a%20b%2Bc%2F%C3%A9.x"),
    ] {
        let (port, server) = serve_one(Answer::default(), |mut ws| async move {
            ws.send(text("hi")).await.unwrap();
        })
        .await;
        let mut s = settings(format!("ws://127.0.0.1:{port}{path}"));
        s.token = Some(Secret::new("a b+c/é.x"));
        let mut c = connect(&s).await.unwrap();
        assert_eq!(c.recv().await.unwrap().unwrap(), Wire::Text("hi".into()));
        let (seen, _) = server.await.unwrap();
        assert_eq!(seen.uri, expect);
        assert_eq!(seen.protocol, None, "no subprotocol offered in query mode");
    }
}

#[tokio::test]
async fn token_as_subprotocol() {
    let answer = Answer {
        select_protocol: Some("haip"),
        ..Answer::default()
    };
    let (port, server) = serve_one(answer, |mut ws| async move {
        ws.send(text("hi")).await.unwrap();
    })
    .await;
    let mut s = settings(format!("ws://127.0.0.1:{port}/haip/websocket"));
    s.token = Some(Secret::new("h.p.s"));
    s.token_mode = TokenMode::Subprotocol;
    let mut c = connect(&s).await.unwrap();
    assert_eq!(c.subprotocol(), Some("haip"));
    assert_eq!(c.recv().await.unwrap().unwrap(), Wire::Text("hi".into()));
    let (seen, _) = server.await.unwrap();
    assert_eq!(seen.protocol.as_deref(), Some("haip, token.h.p.s"));
    assert_eq!(seen.uri, "/haip/websocket", "no token in the URL");

    // An agent that ignores the subprotocol: the client must fail the handshake (RFC 6455 and
    // tungstenite), with a message that points at token_mode.
    let (port, _server) = serve_one(Answer::default(), |_ws| async {}).await;
    s.url = format!("ws://127.0.0.1:{port}/");
    let e = connect(&s).await.unwrap_err();
    assert!(
        matches!(&e, TransportError::Handshake(m) if m.contains("token_mode")),
        "{e}"
    );
    assert!(!e.to_string().contains("h.p.s"), "token leaked: {e}");

    // An agent that selects a subprotocol nobody offered.
    let answer = Answer {
        select_protocol: Some("other"),
        ..Answer::default()
    };
    let (port, _server) = serve_one(answer, |_ws| async {}).await;
    s.url = format!("ws://127.0.0.1:{port}/");
    let e = connect(&s).await.unwrap_err();
    assert!(matches!(e, TransportError::Handshake(_)), "{e}");
}

#[tokio::test]
async fn http_401_and_403_are_auth_errors() {
    for (status, auth) in [(401, true), (403, true), (500, false), (404, false)] {
        let answer = Answer {
            reject: Some(status),
            ..Answer::default()
        };
        let (port, _server) = serve_one(answer, |_ws| async {}).await;
        let mut s = settings(format!("ws://127.0.0.1:{port}/haip"));
        s.token = Some(Secret::new("secret-token"));
        let e = connect(&s).await.unwrap_err();
        assert_eq!(e.is_auth(), auth, "{status}: {e}");
        assert!(e.is_transient());
        assert!(e.to_string().contains(&status.to_string()), "{e}");
        assert!(!e.to_string().contains("secret-token"), "token leaked: {e}");
        if !auth {
            assert!(matches!(e, TransportError::Handshake(_)), "{e}");
        }
    }
}

#[tokio::test]
async fn close_1008_is_an_auth_error_and_other_closes_are_closed() {
    for (code, reason) in [
        (CloseCode::Policy, "Invalid token"),
        (CloseCode::Away, "going away"),
    ] {
        let (port, server) = serve_one(Answer::default(), move |mut ws| async move {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            ws.close(Some(frame)).await.unwrap();
            // The client answers the close frame.
            let mut answered = false;
            while let Some(Ok(m)) = ws.next().await {
                answered |= m.is_close();
            }
            answered
        })
        .await;
        let mut c = connect(&settings(format!("ws://127.0.0.1:{port}/")))
            .await
            .unwrap();
        let e = c.recv().await.unwrap().unwrap_err();
        if code == CloseCode::Policy {
            assert!(e.is_auth(), "{e}");
            assert!(e.to_string().contains("Invalid token"), "{e}");
        } else {
            match &e {
                TransportError::Closed { code, reason } => {
                    assert_eq!((*code, reason.as_str()), (1001, "going away"))
                }
                _ => panic!("{e}"),
            }
        }
        assert!(c.recv().await.is_none(), "nothing after the close");
        let (_, answered) = server.await.unwrap();
        assert_eq!(answered, Some(true), "the client answered the close frame");
    }
}

#[tokio::test]
async fn dropped_tcp_is_closed_1006() {
    let (port, _server) = serve_one(Answer::default(), |ws| async move {
        drop(ws.into_inner());
    })
    .await;
    let mut c = connect(&settings(format!("ws://127.0.0.1:{port}/")))
        .await
        .unwrap();
    match c.recv().await {
        Some(Err(TransportError::Closed { code: 1006, .. })) => {}
        other => panic!("{other:?}"),
    }
    assert!(c.recv().await.is_none());
}

#[tokio::test]
async fn plain_ws_only_to_loopback_unless_allowed() {
    let t0 = Instant::now();
    let e = connect(&settings("ws://10.1.2.3:9/haip".into()))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Insecure(_)), "{e}");
    assert!(!e.is_transient());
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "refused without connecting"
    );

    for host in ["127.0.0.1", "localhost"] {
        let (port, _server) = serve_one(Answer::default(), |mut ws| async move {
            ws.send(text("ok")).await.unwrap();
        })
        .await;
        let mut c = connect(&settings(format!("ws://{host}:{port}/")))
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap().unwrap(), Wire::Text("ok".into()));
    }
}

#[tokio::test]
async fn oversize_message_is_too_large() {
    // One 50 MB frame against a 64 KiB limit: refused from its header, never buffered.
    let (port, server) = serve_one(Answer::default(), |ws| async move {
        // Sending and reading apart: the client stops reading, so the 50 MB may never drain.
        let (mut tx, mut rx) = ws.split();
        let sending = tokio::spawn(async move {
            let _ = tx.send(Message::Binary(vec![0u8; 50_000_000].into())).await;
        });
        // The client says why it gives up.
        let code = match rx.next().await {
            Some(Ok(Message::Close(Some(f)))) => Some(u16::from(f.code)),
            _ => None,
        };
        sending.abort();
        code
    })
    .await;
    let mut c = connect(&settings(format!("ws://127.0.0.1:{port}/")))
        .await
        .unwrap();
    match c.recv().await {
        Some(Err(TransportError::TooLarge { limit })) => assert_eq!(limit, LIMIT),
        other => panic!("{other:?}"),
    }
    assert!(c.recv().await.is_none(), "the connection is finished");
    c.close().await;
    let (_, code) = server.await.unwrap();
    assert_eq!(code, Some(Some(1009)), "closed with 1009 message too big");

    // Two frames under the limit that make a message over it.
    let (port, _server) = serve_one(Answer::default(), |mut ws| async move {
        let half = vec![1u8; LIMIT / 2 + 1024];
        let first = Frame::message(half.clone(), OpCode::Data(Data::Binary), false);
        let rest = Frame::message(half, OpCode::Data(Data::Continue), true);
        let _ = ws.send(Message::Frame(first)).await;
        let _ = ws.send(Message::Frame(rest)).await;
        let _ = ws.next().await;
    })
    .await;
    let mut c = connect(&settings(format!("ws://127.0.0.1:{port}/")))
        .await
        .unwrap();
    match c.recv().await {
        Some(Err(e @ TransportError::TooLarge { .. })) => assert!(e.is_transient()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn handshake_timeout() {
    // Accepts TCP, never answers the upgrade.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(tcp);
    });
    let mut s = settings(format!("ws://127.0.0.1:{port}/"));
    s.connect_timeout = Duration::from_millis(300);
    let t0 = Instant::now();
    let e = connect(&s).await.unwrap_err();
    assert!(matches!(e, TransportError::Timeout), "{e}");
    assert!(e.is_transient());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn connection_refused_is_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let e = connect(&settings(format!("ws://127.0.0.1:{port}/")))
        .await
        .unwrap_err();
    assert!(matches!(e, TransportError::Connect(_)), "{e}");
    assert!(e.is_transient());
}

/// A wss:// echo server (greets with "secure") on 127.0.0.1 for any number of connections.
async fn serve_tls(server: Arc<rustls::ServerConfig>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that distrusts the certificate aborts here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let (Ok(mut ws), _) = accept_ws(tls, Answer::default()).await {
                    let _ = ws.send(text("secure")).await;
                    while let Some(Ok(m)) = ws.next().await {
                        if let Message::Text(_) | Message::Binary(_) = m {
                            let _ = ws.send(m).await;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Writes a PEM file that is removed when dropped.
struct TempPem(std::path::PathBuf);

impl TempPem {
    fn new(tag: &str, pem: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "hearken-transport-ws-{}-{tag}.pem",
            std::process::id()
        ));
        std::fs::write(&path, pem).expect("write PEM");
        TempPem(path)
    }
}

impl Drop for TempPem {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn wss_with_a_private_ca() {
    let pki = test_pki(&["localhost", "127.0.0.1"]);
    let ca = TempPem::new("ca", &pki.ca_pem);
    let port = serve_tls(pki.server.clone()).await;

    for host in ["localhost", "127.0.0.1"] {
        let mut s = settings(format!("wss://{host}:{port}/haip"));
        s.ca_file = Some(ca.0.clone());
        let mut c = connect(&s).await.unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(
            c.recv().await.unwrap().unwrap(),
            Wire::Text("secure".into())
        );
        c.send(Wire::Binary(vec![9; 1000])).await.unwrap();
        assert_eq!(
            c.recv().await.unwrap().unwrap(),
            Wire::Binary(vec![9; 1000])
        );
        c.close().await;
    }

    // The same server without the private CA: the web PKI roots do not trust it.
    let e = connect(&settings(format!("wss://localhost:{port}/haip")))
        .await
        .unwrap_err();
    assert!(matches!(&e, TransportError::Tls(_)), "{e}");
    assert!(e.is_transient());
}

#[tokio::test]
async fn wss_certificate_for_another_name_is_a_tls_error() {
    let pki = test_pki(&["agent.example"]);
    let ca = TempPem::new("other-ca", &pki.ca_pem);
    let port = serve_tls(pki.server.clone()).await;
    let mut s = settings(format!("wss://127.0.0.1:{port}/haip"));
    s.ca_file = Some(ca.0.clone());
    let e = connect(&s).await.unwrap_err();
    assert!(
        matches!(&e, TransportError::Tls(m) if m.contains("not valid for name")),
        "{e}"
    );
}

#[tokio::test]
async fn wss_to_a_plain_server_is_a_tls_error() {
    let (port, _server) = serve_one(Answer::default(), |_ws| async {}).await;
    let mut s = settings(format!("wss://127.0.0.1:{port}/"));
    s.connect_timeout = Duration::from_secs(3);
    let e = connect(&s).await.unwrap_err();
    assert!(matches!(e, TransportError::Tls(_)), "{e}");
}
