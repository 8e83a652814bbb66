//! The speech services against real programs: the Wyoming client against a real Wyoming server
//! (`tests/wyoming_server.py`: the official `wyoming` package, TTS by espeak-ng, STT by pocketsphinx,
//! in the venv `scripts/deps.sh` makes), and the command backends against espeak-ng, sh and
//! pocketsphinx. Raw TCP listeners stand in for servers only to inject faults (garbage, silence, a
//! dropped connection) that a correct server never produces.
//!
//! A test that needs Python or espeak-ng skips with a message on stderr only when the program is not
//! installed at all; with python3 present but no venv, it fails and says to run `scripts/deps.sh`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearken::dsp::resample::StreamResampler;
use hearken::speech::command::wav_bytes;
use hearken::speech::{
    CancellationToken, CommandStt, CommandTts, Pcm, SpeechError, SpeechToText, StdoutAudio,
    TextToSpeech, WyomingStt, WyomingTts,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// pocketsphinx's general English model recognises espeak-ng's formant voice poorly; measured over
/// 14 sentences and 12 voice/speed/resampler combinations, this one came through best (mean word
/// overlap 0.96, worst 0.62), with the voice "en-us+m1" at 130 words per minute ("the quick brown
/// fox jumps over the lazy dog" averaged 0.20).
const ROUND_TRIP_SENTENCE: &str = "i think it is going to rain today";
const ROUND_TRIP_VOICE: &str = "en-us+m1";
const MIN_WORD_OVERLAP: f64 = 0.6;

/// Written to the real stderr, past the test harness's capture, so a skip is always seen.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

fn runs(program: &str, arg: &str) -> bool {
    std::process::Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_espeak(test: &str) -> bool {
    if runs("espeak-ng", "--version") {
        return true;
    }
    skip(
        test,
        "espeak-ng is not installed (scripts/deps.sh installs it)",
    );
    false
}

/// The speech venv's python: `$HEARKEN_SPEECH_VENV/bin/python`, else `<target dir>/speech-venv`
/// (for a cross build, `CARGO_TARGET_TMPDIR` is `<target dir>/<triple>/tmp`: the nearest ancestor
/// that has one).
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("HEARKEN_SPEECH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let mut dirs = tmp.ancestors().skip(1).map(|d| d.join("speech-venv"));
            let first = tmp.parent().expect("target dir").join("speech-venv");
            dirs.find(|v| v.is_dir()).unwrap_or(first)
        });
    venv.join("bin").join("python")
}

/// The venv's python; `None` (skip) only when there is no Python at all.
fn python(test: &str) -> Option<PathBuf> {
    let py = venv_python();
    if py.exists() {
        return Some(py);
    }
    if runs("python3", "--version") {
        panic!(
            "{test}: no speech venv at {} although python3 is installed: run scripts/deps.sh \
             (or set HEARKEN_SPEECH_VENV)",
            py.display()
        );
    }
    skip(test, "no Python (python3) on this machine");
    None
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `tests/wyoming_server.py` on a free loopback port; killed on drop.
struct Server {
    child: std::process::Child,
    uri: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn start(python: &Path) -> Server {
        let port = free_port();
        let uri = format!("tcp://127.0.0.1:{port}");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wyoming_server.py");
        let mut child = std::process::Command::new(python)
            .arg(&script)
            .args(["--uri", &uri, "--espeak", "espeak-ng"])
            // Kept open: the server exits when it closes, so it cannot outlive this process.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the Wyoming test server");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for (pipe, prefix) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
                "",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
                "stderr: ",
            ),
        ] {
            let Some(pipe) = pipe else { continue };
            let lines = lines.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(format!("{prefix}{line}"));
                }
            });
        }
        let server = Server { child, uri, lines };
        if server
            .wait_line("READY", Duration::from_secs(60))
            .await
            .is_none()
        {
            panic!(
                "the Wyoming test server did not start: {:?}",
                server.lines.lock().expect("lines")
            );
        }
        server
    }

    fn find(&self, prefix: &str) -> Option<String> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .find(|l| l.starts_with(prefix))
            .cloned()
    }

    /// The first report line starting with `prefix`, waiting up to `limit` for it.
    async fn wait_line(&self, prefix: &str, limit: Duration) -> Option<String> {
        let until = Instant::now() + limit;
        loop {
            if let Some(l) = self.find(prefix) {
                return Some(l);
            }
            if Instant::now() > until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a synthesis and collect what it sends, with each chunk's arrival time from the call.
async fn speak(
    tts: &dyn TextToSpeech,
    text: &str,
) -> (
    Result<hearken::speech::SynthStats, SpeechError>,
    Vec<(Duration, Pcm)>,
    Duration,
) {
    let (tx, mut rx) = mpsc::channel::<Pcm>(8);
    let t0 = Instant::now();
    let collect = async {
        let mut got = Vec::new();
        while let Some(pcm) = rx.recv().await {
            got.push((t0.elapsed(), pcm));
        }
        got
    };
    let (r, got) = tokio::join!(tts.synthesize(text, tx, CancellationToken::new()), collect);
    (r, got, t0.elapsed())
}

fn samples_of(chunks: &[(Duration, Pcm)]) -> (u32, Vec<i16>) {
    let rate = chunks.first().map_or(0, |(_, p)| p.rate_hz);
    assert!(
        chunks.iter().all(|(_, p)| p.rate_hz == rate),
        "one rate per synthesis"
    );
    (
        rate,
        chunks.iter().flat_map(|(_, p)| p.samples.clone()).collect(),
    )
}

/// `samples` at `rate_hz` -> 16 kHz with hearken's own resampler (what the uplink would do).
fn to_16k(rate_hz: u32, samples: &[i16]) -> Vec<i16> {
    let mut r = StreamResampler::new(rate_hz, 16_000).expect("resampler");
    let mut input: Vec<f32> = samples.iter().map(|&s| s as f32 / 32768.0).collect();
    // Flush the resampler's last partial chunk.
    input.extend(std::iter::repeat_n(0.0, rate_hz as usize / 20));
    let mut out = Vec::new();
    r.process(&input, |o| {
        out.extend(
            o.iter()
                .map(|&x| (x * 32767.0).clamp(-32768.0, 32767.0) as i16),
        )
    });
    out
}

/// Share of the reference's words that the transcript contains.
fn word_overlap(reference: &str, transcript: &str) -> f64 {
    let heard: Vec<String> = transcript
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    let words: Vec<&str> = reference.split_whitespace().collect();
    let found = words
        .iter()
        .filter(|w| heard.iter().any(|h| h == *w))
        .count();
    found as f64 / words.len() as f64
}

fn long_text(sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("This is sentence number {i} of a long answer that goes on and on."))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn wyoming_info_lists_the_servers_programs() {
    let test = "wyoming_info_lists_the_servers_programs";
    let Some(py) = python(test) else { return };
    if !have_espeak(test) {
        return;
    }
    let server = Server::start(&py).await;
    let info = WyomingTts::new(&server.uri).info().await.expect("info");
    println!("info: {}", info.summary());
    assert_eq!(info.tts.len(), 1);
    assert_eq!(info.tts[0].name, "espeak-ng");
    assert!(info.tts[0].installed);
    assert!(
        info.tts[0]
            .models
            .iter()
            .any(|v| v.name == ROUND_TRIP_VOICE),
        "{:?}",
        info.tts[0].models
    );
    assert_eq!(info.asr[0].name, "pocketsphinx");
    assert_eq!(info.asr[0].models[0].languages, vec!["en"]);
    // The STT client asks the same way.
    let again = WyomingStt::new(&server.uri).info().await.expect("info");
    assert_eq!(again, info);
    // And the start-up report asks both configured services.
    let config = hearken::config::Config::from_toml_str(
        "",
        "test",
        &[
            "stt.backend=wyoming".into(),
            format!("stt.uri={}", server.uri),
            "tts.backend=wyoming".into(),
            format!("tts.uri={}", server.uri),
        ],
    )
    .expect("config");
    let report = hearken::speech::wyoming_info(&config).await;
    let sections: Vec<&str> = report.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(sections, ["stt", "tts"]);
    for (_, service, answer) in report {
        assert_eq!(service, format!("wyoming {}", server.uri));
        assert_eq!(answer.expect("info"), info);
    }
}

#[tokio::test]
async fn wyoming_round_trip_tts_then_stt() {
    let test = "wyoming_round_trip_tts_then_stt";
    let Some(py) = python(test) else { return };
    if !have_espeak(test) {
        return;
    }
    let server = Server::start(&py).await;

    let tts = WyomingTts::new(&server.uri).with_voice(ROUND_TRIP_VOICE);
    let (r, chunks, total) = speak(&tts, ROUND_TRIP_SENTENCE).await;
    let stats = r.expect("synthesis");
    let (rate, samples) = samples_of(&chunks);
    let done = server
        .wait_line("SYNTH done", Duration::from_secs(5))
        .await
        .expect("the server finished");
    let sent: usize = done["SYNTH done ".len()..].trim().parse().expect("count");
    println!(
        "wyoming tts: {} chunks ({} from the server), {} ms of audio at {rate} Hz, first chunk after {:?} ms, all in {total:?}",
        chunks.len(),
        sent,
        stats.audio_ms,
        stats.first_chunk_ms
    );
    assert_eq!(rate, 22_050, "espeak-ng's rate, passed on as it is");
    // Each server chunk went on by itself, as it came.
    assert_eq!(chunks.len(), sent);
    assert!(chunks.len() > 10);
    assert!(
        (1_500..6_000).contains(&stats.audio_ms),
        "{} ms",
        stats.audio_ms
    );
    // Summed per chunk, so within a millisecond of the whole.
    assert!(
        stats
            .audio_ms
            .abs_diff(samples.len() as u64 * 1000 / 22_050)
            <= 1
    );
    assert!(stats.first_chunk_ms.is_some());

    let speech = to_16k(rate, &samples);
    let stt = WyomingStt::new(&server.uri).with_language("en");
    let (tx, rx) = mpsc::channel::<Vec<i16>>(16);
    let feed = async {
        let mut parts = speech.chunks(320); // 20 ms, as the uplink delivers them
        tx.send(parts.next().expect("audio").to_vec())
            .await
            .expect("send");
        // The first chunk reaches the server before the rest of the turn exists: streamed, not
        // collected.
        assert!(
            server
                .wait_line("STT first-chunk", Duration::from_secs(5))
                .await
                .is_some(),
            "the first chunk was not forwarded while the turn went on"
        );
        for part in parts {
            tx.send(part.to_vec()).await.expect("send");
        }
        drop(tx);
    };
    let (transcript, ()) = tokio::join!(stt.transcribe(16_000, rx, CancellationToken::new()), feed);
    let transcript = transcript.expect("transcript");
    let overlap = word_overlap(ROUND_TRIP_SENTENCE, &transcript.text);
    println!(
        "round trip: {ROUND_TRIP_SENTENCE:?} -> {:?} (language {:?}), word overlap {overlap:.2}",
        transcript.text, transcript.language
    );
    assert_eq!(transcript.language.as_deref(), Some("en"));
    assert!(
        overlap >= MIN_WORD_OVERLAP,
        "overlap {overlap:.2} < {MIN_WORD_OVERLAP}: {:?}",
        transcript.text
    );
}

#[tokio::test]
async fn wyoming_cancel_stops_a_long_synthesis_at_once() {
    let test = "wyoming_cancel_stops_a_long_synthesis_at_once";
    let Some(py) = python(test) else { return };
    if !have_espeak(test) {
        return;
    }
    let server = Server::start(&py).await;
    let tts = Arc::new(WyomingTts::new(&server.uri));
    // About 25 minutes of speech: far more than the socket buffers hold, so the server is still
    // sending when the cancel comes.
    let text = long_text(400);
    let (tx, mut rx) = mpsc::channel::<Pcm>(2);
    let cancel = CancellationToken::new();
    let task = {
        let (tts, cancel) = (tts.clone(), cancel.clone());
        tokio::spawn(async move { tts.synthesize(&text, tx, cancel).await })
    };
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("first chunk in time")
        .expect("a chunk");
    assert_eq!(first.rate_hz, 22_050);
    // The first chunk came while the server was still synthesizing and sending.
    assert!(server.find("SYNTH").is_none(), "{:?}", server.find("SYNTH"));
    // Let the pipeline fill up: the client waits for room in `out`, the server for the socket.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    cancel.cancel();
    let r = task.await.expect("task");
    let took = t0.elapsed();
    assert!(matches!(r, Err(SpeechError::Cancelled)), "{r:?}");
    assert!(took < Duration::from_millis(250), "cancel took {took:?}");
    // Only what was already queued before the cancel; then the sender is gone.
    let mut queued = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
        queued += 1;
    }
    assert!(queued <= 2, "{queued} chunks after the cancel");
    assert!(rx.recv().await.is_none(), "the sender is dropped");
    // The server saw the connection go and stopped espeak-ng.
    let aborted = server
        .wait_line("SYNTH aborted", Duration::from_secs(5))
        .await;
    println!("cancel returned after {took:?}; server: {aborted:?}");
    assert!(
        aborted.is_some(),
        "{:?}",
        server.lines.lock().expect("lines")
    );
    assert!(server.find("SYNTH done").is_none());
}

#[tokio::test]
async fn wyoming_unknown_voice_is_the_servers_error() {
    let test = "wyoming_unknown_voice_is_the_servers_error";
    let Some(py) = python(test) else { return };
    if !have_espeak(test) {
        return;
    }
    let server = Server::start(&py).await;
    let tts = WyomingTts::new(&server.uri).with_voice("xx-no-such-voice");
    let (r, chunks, _) = speak(&tts, "hello").await;
    assert!(chunks.is_empty());
    match r {
        Err(SpeechError::Failed { service, reason }) => {
            assert_eq!(service, format!("wyoming {}", server.uri));
            assert!(reason.contains("voice does not exist"), "{reason}");
            assert!(reason.contains("code tts-failed"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn wyoming_absent_server_is_unavailable_quickly() {
    let uri = format!("tcp://127.0.0.1:{}", free_port());
    let t0 = Instant::now();
    let (r, _, _) = speak(&WyomingTts::new(&uri), "hello").await;
    let (_tx, rx) = mpsc::channel(1);
    let s = WyomingStt::new(&uri)
        .transcribe(16_000, rx, CancellationToken::new())
        .await;
    let took = t0.elapsed();
    for e in [r.map(|_| ()).unwrap_err(), s.map(|_| ()).unwrap_err()] {
        let msg = e.to_string();
        assert!(matches!(e, SpeechError::Unavailable { .. }), "{e:?}");
        assert!(msg.contains(&format!("nothing listens at {uri}")), "{msg}");
    }
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// A listener that answers every connection with `reply` after reading `lines` header lines.
async fn fake_server(lines: usize, reply: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("tcp://{}", l.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                // Bytes, not lines of text: audio payloads are not UTF-8.
                let mut line = Vec::new();
                for _ in 0..lines {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                let _ = w.write_all(reply).await;
                // Keep the connection open until the client goes.
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink).await;
            });
        }
    });
    (uri, task)
}

#[tokio::test]
async fn wyoming_garbage_is_a_protocol_error() {
    // An HTTP server where a Wyoming server should be.
    let (uri, _server) = fake_server(1, b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    let (r, _, _) = speak(&WyomingTts::new(&uri), "hello").await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(vec![0i16; 160]).await.expect("send");
    drop(tx);
    let s = WyomingStt::new(&uri)
        .transcribe(16_000, rx, CancellationToken::new())
        .await;
    for e in [r.map(|_| ()).unwrap_err(), s.map(|_| ()).unwrap_err()] {
        match &e {
            SpeechError::Protocol { service, reason } => {
                assert_eq!(service, &format!("wyoming {uri}"));
                assert!(reason.contains("HTTP/1.1 400 Bad Request"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn wyoming_skips_unknown_events_and_retries_a_dropped_connection() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("tcp://{}", l.local_addr().expect("addr"));
    let accepted = Arc::new(Mutex::new(0));
    let server = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            // First connection: read the request, then drop it (a proxy in front of a restarting
            // server). Second: a real answer with an unknown event, data in data_length, and a
            // chunk split mid-sample.
            let (s, _) = l.accept().await.expect("accept");
            *accepted.lock().expect("count") += 1;
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.expect("request");
            drop(r);
            let (s, _) = l.accept().await.expect("accept");
            *accepted.lock().expect("count") += 1;
            let mut r = BufReader::new(s);
            let mut request = String::new();
            r.read_line(&mut request).await.expect("request");
            let mut reply = Vec::new();
            reply.extend_from_slice(b"{\"type\":\"x-vendor-thing\",\"payload_length\":3}\nabc");
            let start = br#"{"rate":16000,"width":2,"channels":1}"#;
            reply.extend_from_slice(
                format!(
                    "{{\"type\":\"audio-start\",\"data_length\":{},\"version\":\"1.5.4\"}}\n",
                    start.len()
                )
                .as_bytes(),
            );
            reply.extend_from_slice(start);
            let pcm: Vec<u8> = (0..100i16).flat_map(|s| s.to_le_bytes()).collect();
            for part in [&pcm[..51], &pcm[51..]] {
                reply.extend_from_slice(
                    format!(
                        "{{\"type\":\"audio-chunk\",\"data\":{{\"rate\":16000,\"width\":2,\"channels\":1}},\"payload_length\":{}}}\n",
                        part.len()
                    )
                    .as_bytes(),
                );
                reply.extend_from_slice(part);
            }
            reply.extend_from_slice(b"{\"type\":\"audio-stop\"}\n");
            r.get_mut().write_all(&reply).await.expect("reply");
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink).await;
            request
        })
    };
    let tts = WyomingTts::new(&uri).with_voice("en_US-lessac-medium");
    let (r, chunks, _) = speak(&tts, "hello there").await;
    let stats = r.expect("synthesis after one retry");
    let (rate, samples) = samples_of(&chunks);
    assert_eq!(rate, 16_000);
    assert_eq!(samples, (0..100i16).collect::<Vec<_>>());
    assert_eq!(stats.audio_ms, 6);
    assert_eq!(*accepted.lock().expect("count"), 2);
    // The retry sent the same request again.
    let request: serde_json::Value =
        serde_json::from_str(&server.await.expect("server")).expect("json");
    assert_eq!(
        request,
        serde_json::json!({"type": "synthesize",
            "data": {"text": "hello there", "voice": {"name": "en_US-lessac-medium"}}})
    );
}

#[tokio::test]
async fn wyoming_request_is_what_the_protocol_says() {
    // The request lines exactly as a Wyoming server reads them.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("tcp://{}", l.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        let (s, _) = l.accept().await.expect("accept");
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.expect("read") == 0 {
                break;
            }
            let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
            let n = v["payload_length"].as_u64().unwrap_or(0) as usize;
            let mut payload = vec![0u8; n];
            r.read_exact(&mut payload).await.expect("payload");
            let stop = v["type"] == "audio-stop";
            seen.push((v, payload));
            if stop {
                r.get_mut()
                    .write_all(b"{\"type\":\"transcript\",\"data\":{\"text\":\" hello  \"}}\n")
                    .await
                    .expect("reply");
            }
        }
        seen
    });
    let (tx, rx) = mpsc::channel(4);
    tx.send(vec![1i16, -2]).await.expect("send");
    tx.send(vec![]).await.expect("send");
    tx.send(vec![3i16]).await.expect("send");
    drop(tx);
    let t = WyomingStt::new(&uri)
        .with_language("de")
        .transcribe(8_000, rx, CancellationToken::new())
        .await
        .expect("transcript");
    assert_eq!(t.text, "hello");
    assert_eq!(t.language, None);
    let seen = server.await.expect("server");
    let kinds: Vec<&str> = seen
        .iter()
        .map(|(v, _)| v["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "transcribe",
            "audio-start",
            "audio-chunk",
            "audio-chunk",
            "audio-stop"
        ]
    );
    assert_eq!(seen[0].0["data"]["language"], "de");
    for (v, _) in &seen[1..4] {
        assert_eq!(
            v["data"],
            serde_json::json!({"rate": 8000, "width": 2, "channels": 1})
        );
    }
    assert_eq!(seen[2].1, [1, 0, 0xFE, 0xFF]);
    assert_eq!(seen[3].1, [3, 0]);
}

#[tokio::test]
async fn wyoming_silent_server_times_out() {
    // Accepts, reads, never answers.
    let (uri, _server) = fake_server(usize::MAX, b"").await;
    let t0 = Instant::now();
    let tts = WyomingTts::new(&uri).with_timeout(Duration::from_millis(300));
    let (r, _, _) = speak(&tts, "hello").await;
    match r {
        Err(SpeechError::Timeout { what, ms, .. }) => {
            assert_eq!(what, "waiting for the first audio");
            assert_eq!(ms, 300);
        }
        other => panic!("{other:?}"),
    }
    // STT: the user's turn takes as long as it takes; the timeout counts from its end.
    let stt = WyomingStt::new(&uri).with_timeout(Duration::from_millis(300));
    let (tx, rx) = mpsc::channel(4);
    let feed = async {
        tx.send(vec![0i16; 160]).await.expect("send");
        tokio::time::sleep(Duration::from_millis(600)).await;
        drop(tx);
        Instant::now()
    };
    let (s, turn_end) = tokio::join!(stt.transcribe(16_000, rx, CancellationToken::new()), feed);
    assert!(
        matches!(&s, Err(SpeechError::Timeout { what, .. }) if what == "waiting for the transcript"),
        "{s:?}"
    );
    let after_turn = turn_end.elapsed();
    assert!(after_turn < Duration::from_millis(1_000), "{after_turn:?}");
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn command_tts_espeak_streams_a_sentence() {
    let test = "command_tts_espeak_streams_a_sentence";
    if !have_espeak(test) {
        return;
    }
    let tts = CommandTts::new(
        vec!["espeak-ng".into(), "--stdout".into()],
        StdoutAudio::Wav,
    );
    assert_eq!(tts.describe(), "command espeak-ng");
    let (r, chunks, total) = speak(&tts, "The weather today is sunny with a light breeze.").await;
    let stats = r.expect("synthesis");
    let (rate, samples) = samples_of(&chunks);
    println!(
        "espeak-ng: first chunk after {:?} ms, {} chunks, {} ms of audio, all in {total:?}",
        stats.first_chunk_ms,
        chunks.len(),
        stats.audio_ms
    );
    assert_eq!(rate, 22_050);
    assert!(chunks.len() >= 2, "{} chunks", chunks.len());
    assert!(
        (1_500..6_000).contains(&stats.audio_ms),
        "{}",
        stats.audio_ms
    );
    assert!(
        stats
            .audio_ms
            .abs_diff(samples.len() as u64 * 1000 / 22_050)
            <= 1
    );
    let peak = samples.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0);
    assert!(peak > 3_000, "speech, not silence: peak {peak}");
}

#[tokio::test]
async fn command_tts_first_chunk_before_the_program_exits() {
    let test = "command_tts_first_chunk_before_the_program_exits";
    if !have_espeak(test) {
        return;
    }
    // espeak-ng writes all its audio (in tens of milliseconds), then the program lingers two seconds
    // before it exits.
    let tts = CommandTts::new(
        vec![
            "sh".into(),
            "-c".into(),
            "espeak-ng --stdout; sleep 2".into(),
        ],
        StdoutAudio::Wav,
    );
    let (r, chunks, total) = speak(&tts, &long_text(10)).await;
    let stats = r.expect("synthesis");
    let first = chunks.first().expect("audio").0;
    let last = chunks.last().expect("audio").0;
    println!(
        "{} chunks, first at {first:?}, last at {last:?}, exit seen at {total:?}, {} ms of audio",
        chunks.len(),
        stats.audio_ms
    );
    assert!(stats.audio_ms > 30_000, "{}", stats.audio_ms);
    assert!(first < Duration::from_millis(1_000), "{first:?}");
    assert!(last < Duration::from_millis(1_800), "{last:?}");
    assert!(total >= Duration::from_millis(2_000), "{total:?}");
}

#[tokio::test]
async fn command_tts_cancel_kills_the_child() {
    let test = "command_tts_cancel_kills_the_child";
    if !have_espeak(test) {
        return;
    }
    let dir = tempdir();
    let pidfile = dir.join("pid");
    let tts = Arc::new(CommandTts::new(
        vec![
            "sh".into(),
            "-c".into(),
            format!("echo $$ > {}; exec espeak-ng --stdout", pidfile.display()),
        ],
        StdoutAudio::Wav,
    ));
    let (tx, mut rx) = mpsc::channel::<Pcm>(1);
    let cancel = CancellationToken::new();
    let task = {
        let (tts, cancel) = (tts.clone(), cancel.clone());
        tokio::spawn(async move { tts.synthesize(&long_text(200), tx, cancel).await })
    };
    rx.recv().await.expect("first chunk");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(alive(pid), "espeak-ng runs (blocked on its full pipe)");
    let t0 = Instant::now();
    cancel.cancel();
    let r = task.await.expect("task");
    assert!(matches!(r, Err(SpeechError::Cancelled)), "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    let until = Instant::now() + Duration::from_secs(2);
    while alive(pid) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "espeak-ng (pid {pid}) gone {:?} after the cancel",
        t0.elapsed()
    );
    assert!(!alive(pid), "pid {pid} still runs after the cancel");
}

/// Running (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn tempdir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "speech-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[tokio::test]
async fn command_tts_missing_program_is_unavailable() {
    let tts = CommandTts::new(vec!["hearken-no-such-tts".into()], StdoutAudio::Wav);
    let (r, _, took) = speak(&tts, "hello").await;
    match r {
        Err(SpeechError::Unavailable { service, reason }) => {
            assert_eq!(service, "command hearken-no-such-tts");
            assert!(
                reason.contains("\"hearken-no-such-tts\" not found"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(1));
}

#[tokio::test]
async fn command_tts_failure_carries_status_and_stderr() {
    let tts = CommandTts::new(
        vec![
            "sh".into(),
            "-c".into(),
            "cat >/dev/null; echo 'loading voice xx' >&2; echo 'voice xx not found' >&2; exit 3"
                .into(),
        ],
        StdoutAudio::Wav,
    );
    let (r, _, _) = speak(&tts, "hello").await;
    match r {
        Err(SpeechError::Failed { reason, .. }) => {
            assert_eq!(
                reason,
                "exit status: 3; stderr: loading voice xx | voice xx not found"
            );
        }
        other => panic!("{other:?}"),
    }
    if !have_espeak("command_tts_failure_carries_status_and_stderr (espeak-ng part)") {
        return;
    }
    let tts = CommandTts::new(
        vec![
            "espeak-ng".into(),
            "-v".into(),
            "xx-no-such-voice".into(),
            "--stdout".into(),
        ],
        StdoutAudio::Wav,
    );
    let (r, chunks, _) = speak(&tts, "hello").await;
    assert!(chunks.is_empty());
    match r {
        Err(SpeechError::Failed { service, reason }) => {
            assert_eq!(service, "command espeak-ng");
            assert!(reason.starts_with("exit status: 1"), "{reason}");
            assert!(reason.contains("voice does not exist"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn command_tts_raw_output_and_timeout() {
    let test = "command_tts_raw_output_and_timeout";
    if have_espeak(test) {
        let text = "Raw audio without a header.";
        let wav = CommandTts::new(
            vec!["espeak-ng".into(), "--stdout".into()],
            StdoutAudio::Wav,
        );
        let (r, wav_chunks, _) = speak(&wav, text).await;
        r.expect("wav");
        // The same audio with its 44-byte header cut off.
        let raw = CommandTts::new(
            vec![
                "sh".into(),
                "-c".into(),
                "espeak-ng --stdout | tail -c +45".into(),
            ],
            StdoutAudio::Raw { rate_hz: 22_050 },
        );
        let (r, raw_chunks, _) = speak(&raw, text).await;
        r.expect("raw");
        assert_eq!(samples_of(&raw_chunks), samples_of(&wav_chunks));
    }
    // A program that never writes anything.
    let tts = CommandTts::new(vec!["sleep".into(), "10".into()], StdoutAudio::Wav)
        .with_timeout(Duration::from_millis(300));
    let (r, _, took) = speak(&tts, "hello").await;
    assert!(
        matches!(&r, Err(SpeechError::Timeout { what, ms: 300, .. }) if what == "waiting for the first audio"),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Output that is not a WAV.
    let tts = CommandTts::new(
        vec!["sh".into(), "-c".into(), "echo 'usage: tts TEXT'".into()],
        StdoutAudio::Wav,
    );
    let (r, _, _) = speak(&tts, "hello").await;
    assert!(
        matches!(&r, Err(SpeechError::Protocol { reason, .. }) if reason.contains("not a WAV")),
        "{r:?}"
    );
}

async fn listen(
    stt: &dyn SpeechToText,
    rate_hz: u32,
    audio: &[i16],
) -> Result<String, SpeechError> {
    let (tx, rx) = mpsc::channel(8);
    let feed = async {
        for part in audio.chunks(rate_hz as usize / 50) {
            tx.send(part.to_vec()).await.expect("send");
        }
        drop(tx);
    };
    let (r, ()) = tokio::join!(stt.transcribe(rate_hz, rx, CancellationToken::new()), feed);
    r.map(|t| t.text)
}

#[tokio::test]
async fn command_stt_gets_the_turn_as_a_wav() {
    // Prints the number of bytes it read and the first 44 of them in hex.
    let stt = CommandStt::new(vec![
        "sh".into(),
        "-c".into(),
        r#"f=$(mktemp); cat > "$f"; echo "$(wc -c < "$f")"; head -c 44 "$f" | od -An -tx1 -v; rm -f "$f""#
            .into(),
    ]);
    let audio: Vec<i16> = (0..1_600).map(|i| (i * 7 % 2_000 - 1_000) as i16).collect();
    let text = listen(&stt, 16_000, &audio).await.expect("transcript");
    let header: String = wav_bytes(16_000, &audio)[..44]
        .iter()
        .map(|b| format!(" {b:02x}"))
        .collect();
    // Lines and runs of spaces come back as one line of words.
    assert_eq!(text, format!("{}{header}", 44 + 2 * audio.len()));
}

#[tokio::test]
async fn command_stt_failure_cancel_and_missing_program() {
    let stt = CommandStt::new(vec![
        "sh".into(),
        "-c".into(),
        "cat >/dev/null; echo 'model base.en not found' >&2; exit 2".into(),
    ]);
    match listen(&stt, 16_000, &[0; 3_200]).await {
        Err(SpeechError::Failed { reason, .. }) => {
            assert_eq!(reason, "exit status: 2; stderr: model base.en not found")
        }
        other => panic!("{other:?}"),
    }
    // Cancelled while the user still speaks.
    let (tx, rx) = mpsc::channel(4);
    let cancel = CancellationToken::new();
    let stopper = async {
        tx.send(vec![0i16; 160]).await.expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
        Instant::now()
    };
    let (r, at) = tokio::join!(stt.transcribe(16_000, rx, cancel.clone()), stopper);
    assert!(matches!(r, Err(SpeechError::Cancelled)), "{r:?}");
    assert!(
        at.elapsed() < Duration::from_millis(250),
        "{:?}",
        at.elapsed()
    );
    drop(tx);
    let stt = CommandStt::new(vec!["/nonexistent/whisper".into()]);
    match listen(&stt, 16_000, &[0; 160]).await {
        Err(SpeechError::Unavailable { service, reason }) => {
            assert_eq!(service, "command whisper");
            assert!(
                reason.contains("\"/nonexistent/whisper\" not found"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// pocketsphinx behind the command backend: the turn as a WAV on stdin, the words on stdout.
const POCKETSPHINX_STT: &str = r#"
import io, sys, wave
from pocketsphinx import Decoder
w = wave.open(io.BytesIO(sys.stdin.buffer.read()))
assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2), w.getparams()
d = Decoder(samprate=16000, loglevel="FATAL")
d.start_utt()
d.process_raw(w.readframes(w.getnframes()), False, True)
d.end_utt()
print(d.hyp().hypstr if d.hyp() else "")
"#;

#[tokio::test]
async fn command_round_trip_espeak_to_pocketsphinx() {
    let test = "command_round_trip_espeak_to_pocketsphinx";
    let Some(py) = python(test) else { return };
    if !have_espeak(test) {
        return;
    }
    let tts = CommandTts::new(
        vec![
            "espeak-ng".into(),
            "-v".into(),
            ROUND_TRIP_VOICE.into(),
            "-s".into(),
            "130".into(),
            "--stdout".into(),
        ],
        StdoutAudio::Wav,
    );
    let (r, chunks, _) = speak(&tts, ROUND_TRIP_SENTENCE).await;
    r.expect("synthesis");
    let (rate, samples) = samples_of(&chunks);
    let stt = CommandStt::new(vec![
        py.display().to_string(),
        "-c".into(),
        POCKETSPHINX_STT.into(),
    ])
    .with_timeout(Duration::from_secs(60));
    let text = listen(&stt, 16_000, &to_16k(rate, &samples))
        .await
        .expect("transcript");
    let overlap = word_overlap(ROUND_TRIP_SENTENCE, &text);
    println!("command round trip: {ROUND_TRIP_SENTENCE:?} -> {text:?}, word overlap {overlap:.2}");
    assert!(overlap >= MIN_WORD_OVERLAP, "{overlap:.2}: {text:?}");
}
