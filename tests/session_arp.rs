//! The whole device against the built-in ARP agent over real loopback WebSockets, in real time: the
//! user's turn goes through speech-to-text, the transcript to the agent as ARP `input`, the agent's
//! streamed deltas and its table through the renderer to text-to-speech and out of the speaker.
//!
//! The speech services here are doubles with the real contract (streamed, cancellable), so the tests
//! check the bridge, the renderer, the link and the protocol, not a recogniser: the STT double
//! answers each turn with the next line of a script once the turn's audio is in, the TTS double turns
//! each word into 120 ms of a 440 Hz tone, streamed in 40 ms chunks, and records what it was asked.
//! Real backends are tested against real services in `tests/speech.rs`.
//!
//! Under emulation (`$HEARKEN_TEST_RUNNER`, qemu-user in CI) the sessions run one at a time, and the
//! HAP agent child is started through the runner.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::one_at_a_time_when_emulated;
use hearken::agent::arp::{self as agent, AgentHandle, AgentSettings};
use hearken::config::Config;
use hearken::demo::write_script;
use hearken::events::{EventKind, EventSink};
use hearken::service::{self, Io, RunOptions, RunReport};
use hearken::speech::{
    CancellationToken, Pcm, SpeechError, SpeechFuture, SpeechToText, SynthStats, TextToSpeech,
    Transcript,
};
use hearken::voice::Speech;
use tokio::sync::{mpsc, watch};

const TTS_RATE_HZ: u32 = 16_000;
const WORD_MS: u64 = 120;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("audio/fixtures")
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("hearken-arp-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
    fn script(&self, parts: &[(&str, u32)], tail_ms: u32) -> PathBuf {
        let p = self.0.join("script.wav");
        write_script(&fixtures(), parts, tail_ms, &p).expect("script");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Answers turn N with `lines[N]`; records the audio length of each turn.
struct ScriptStt {
    lines: Vec<String>,
    turns: Mutex<Vec<u64>>,
}

impl SpeechToText for ScriptStt {
    fn describe(&self) -> String {
        "script".into()
    }
    fn transcribe<'a>(
        &'a self,
        rate_hz: u32,
        mut audio: mpsc::Receiver<Vec<i16>>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, Transcript> {
        Box::pin(async move {
            let mut samples = 0u64;
            loop {
                tokio::select! {
                    c = audio.recv() => match c {
                        Some(c) => samples += c.len() as u64,
                        None => break,
                    },
                    _ = cancel.cancelled() => return Err(SpeechError::Cancelled),
                }
            }
            let mut turns = self.turns.lock().expect("turns");
            let n = turns.len();
            turns.push(samples * 1000 / rate_hz as u64);
            Ok(Transcript {
                text: self.lines.get(n).cloned().unwrap_or_default(),
                language: None,
            })
        })
    }
}

#[derive(Default)]
struct ToneTts {
    /// Time to synthesize each 40 ms chunk (default 2 ms, far faster than real time).
    chunk_synth_ms: Option<u64>,
    asked: Mutex<Vec<String>>,
    cancelled: Mutex<Vec<String>>,
}

impl TextToSpeech for ToneTts {
    fn describe(&self) -> String {
        "tone".into()
    }
    fn synthesize<'a>(
        &'a self,
        text: &'a str,
        out: mpsc::Sender<Pcm>,
        cancel: CancellationToken,
    ) -> SpeechFuture<'a, SynthStats> {
        Box::pin(async move {
            self.asked.lock().expect("asked").push(text.to_string());
            let words = text.split_whitespace().count() as u64;
            let chunk_ms = 40;
            let chunks = words * WORD_MS / chunk_ms;
            let n = (TTS_RATE_HZ as u64 * chunk_ms / 1000) as usize;
            let mut t = 0usize;
            for _ in 0..chunks {
                // Synthesis takes a little time per chunk, as a real engine's does.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(self.chunk_synth_ms.unwrap_or(2))) => {}
                    _ = cancel.cancelled() => {
                        self.cancelled.lock().expect("cancelled").push(text.to_string());
                        return Err(SpeechError::Cancelled);
                    }
                }
                let samples: Vec<i16> = (0..n)
                    .map(|i| {
                        let ph = 2.0 * std::f32::consts::PI * 440.0 * (t + i) as f32
                            / TTS_RATE_HZ as f32;
                        (ph.sin() * 8000.0) as i16
                    })
                    .collect();
                t += n;
                if out
                    .send(Pcm {
                        rate_hz: TTS_RATE_HZ,
                        samples,
                    })
                    .await
                    .is_err()
                {
                    return Err(SpeechError::Cancelled);
                }
            }
            Ok(SynthStats {
                audio_ms: chunks * chunk_ms,
                first_chunk_ms: Some(2),
            })
        })
    }
}

fn config(url: &str, extra: &[&str]) -> Config {
    let mut o = vec![
        "agent.protocol=\"arp\"".to_string(),
        // Validation wants a speech-to-text service for ARP; the tests hand their doubles to the
        // run instead (RunOptions::speech), so this one is never called.
        "stt.backend=\"wyoming\"".to_string(),
        format!("agent.url=\"{url}\""),
        "agent.reconnect_min_ms=200".to_string(),
        "agent.reconnect_max_ms=2000".to_string(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    Config::from_toml_str("", "test", &o).expect("config")
}

async fn start_agent(settings: AgentSettings) -> AgentHandle {
    agent::spawn("127.0.0.1:0".parse().expect("addr"), settings)
        .await
        .expect("agent")
}

async fn run_device(config: Config, script: PathBuf, speech: Speech) -> (RunReport, Vec<f32>) {
    let (output, played) = service::memory_output();
    let (_stop, shutdown) = watch::channel(false);
    let report = service::run(
        config,
        RunOptions {
            io: Io::File {
                input: script,
                output,
                realtime: true,
            },
            events: EventSink::None,
            record_events: true,
            speech: Some(speech),
        },
        shutdown,
    )
    .await
    .expect("device run");
    let played = played.lock().expect("speaker").clone();
    (report, played)
}

fn speech(lines: &[&str]) -> (Speech, Arc<ScriptStt>, Arc<ToneTts>) {
    speech_with(lines, ToneTts::default())
}

fn speech_with(lines: &[&str], tts: ToneTts) -> (Speech, Arc<ScriptStt>, Arc<ToneTts>) {
    let stt = Arc::new(ScriptStt {
        lines: lines.iter().map(|s| s.to_string()).collect(),
        turns: Mutex::new(Vec::new()),
    });
    let tts = Arc::new(tts);
    (
        Speech {
            stt: stt.clone(),
            tts: tts.clone(),
        },
        stt,
        tts,
    )
}

/// Milliseconds of the speaker buffer (48 kHz) louder than -40 dBFS, in 10 ms blocks.
fn active_ms(played: &[f32]) -> usize {
    played
        .chunks(480)
        .filter(|b| (b.iter().map(|s| s * s).sum::<f32>() / b.len() as f32).sqrt() > 0.01)
        .count()
        * 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voice_turn_goes_as_text_and_the_answer_is_spoken_sentence_by_sentence() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("turn");
    let a = start_agent(AgentSettings::default()).await;
    let (sp, stt, tts) = speech(&["How long will it take to get to work today"]);
    let script = tmp.script(&[("question.wav", 300)], 3_000);
    let (report, played) = run_device(config(&a.url(), &[]), script, sp).await;

    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(s.inputs, vec!["How long will it take to get to work today"]);
    assert_eq!(s.turns_completed, 1);
    // The turn's audio reached speech-to-text: the question is about 2.5 s long.
    let turns = stt.turns.lock().expect("turns").clone();
    assert_eq!(turns.len(), 1);
    assert!((2_000..4_500).contains(&turns[0]), "{turns:?}");
    assert_eq!(report.user_texts, s.inputs);
    // Sentence by sentence, in order, with the table read through its fallback.
    let asked = tts.asked.lock().expect("asked").clone();
    assert_eq!(
        asked,
        vec![
            "You said: How long will it take to get to work today.",
            "Let me look that up.",
            "Sales.",
            "2 rows.",
            "Region North, Q1 100.",
            "Region South, Q1 200.",
            "That is all I found.",
        ]
    );
    assert_eq!(
        report.components_spoken,
        vec!["Sales. 2 rows. Region North, Q1 100. Region South, Q1 200."]
    );
    // Every word was played: 26 words at 120 ms (the tone), give or take a block.
    let words: usize = asked.iter().map(|t| t.split_whitespace().count()).sum();
    let expected = words * WORD_MS as usize;
    let got = active_ms(&played);
    assert!(
        got + 100 >= expected && got <= expected + 1_000,
        "played {got} ms, expected about {expected} ms (plus earcons)"
    );
    // The tool call played the "working" earcon, the answer ended after its speech was queued, and
    // the device went back to listening.
    let kinds: Vec<&EventKind> = report.events.iter().map(|e| &e.kind).collect();
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, EventKind::AgentTool { name, .. } if name == "lookup"))
    );
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, EventKind::AgentFinished { status, .. } if status == "ok"))
    );
    assert!(matches!(
        kinds
            .iter()
            .rev()
            .find(|k| matches!(k, EventKind::StateChange { .. })),
        Some(EventKind::StateChange {
            to: hearken::turn::State::Idle,
            ..
        })
    ));
    // The first sentence was spoken as soon as it was complete: its 11 words stream in at 30 ms
    // each (about 330 ms), long before the answer's end (the tool alone takes 300 ms more).
    assert_eq!(report.first_speech_us.len(), 1);
    assert!(
        (300_000..550_000).contains(&report.first_speech_us[0]),
        "{:?}",
        report.first_speech_us
    );
    assert_eq!(report.agent_connects, 1);
}

/// A long first sentence the user talks over; `delta_ms` sets whether the agent is still streaming
/// it (the socket must close) or has already committed (only the speaker stops).
/// Returns the report, the agent's record, what was synthesized for the first answer, and the
/// sentences whose synthesis was cancelled.
async fn barge_in(delta_ms: u64) -> (RunReport, agent::AgentStats, Vec<String>, Vec<String>) {
    let tmp = Scratch::new(&format!("barge-{delta_ms}"));
    let a = start_agent(AgentSettings {
        reply: "You said: {text}. This answer goes on for a long while, with many words, so that \
                the user has every reason to interrupt it before it is over, and the speaker is \
                still busy speaking when the user starts to talk again."
            .into(),
        delta_ms,
        ..AgentSettings::default()
    })
    .await;
    // Synthesis a little faster than real time (30 ms per 40 ms chunk), as a streaming service
    // delivers it: the long sentence is still being synthesized when the user speaks.
    let (sp, _stt, tts) = speech_with(
        &["What is the weather", "Stop wait a moment"],
        ToneTts {
            chunk_synth_ms: Some(30),
            ..ToneTts::default()
        },
    );
    let script = tmp.script(&[("question.wav", 300), ("barge_in.wav", 2_500)], 3_000);
    let (report, _) = run_device(config(&a.url(), &[]), script, sp).await;
    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(
        report.barge_ins,
        1,
        "{:#?}",
        report
            .events
            .iter()
            .filter_map(|e| hearken::events::timeline_line(&e.kind).map(|l| (e.audio_ms, l)))
            .collect::<Vec<_>>()
    );
    assert_eq!(s.inputs, vec!["What is the weather", "Stop wait a moment"]);
    assert_eq!(report.barge_in_flush_ms.len(), 1);
    // Deliberate reconnects are not lost connections.
    assert_eq!(report.agent_disconnects, 0);
    assert_eq!(report.agent_connects, 1);
    let asked = tts.asked.lock().expect("asked").clone();
    let cancelled = tts.cancelled.lock().expect("cancelled").clone();
    // What was synthesized for the first answer: nothing after the sentence the user talked over.
    let second = asked
        .iter()
        .position(|t| t.starts_with("You said: Stop wait a moment"))
        .expect("the second answer was spoken");
    let first: Vec<String> = asked[..second].to_vec();
    let after_long = first
        .iter()
        .skip_while(|t| !t.starts_with("This answer goes on"))
        .skip(1)
        .count();
    assert_eq!(after_long, 0, "{asked:?}");
    (report, s, first, cancelled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_while_the_agent_streams_closes_the_socket_and_the_next_turn_is_answered() {
    let _turn = one_at_a_time_when_emulated().await;
    // 150 ms a word: the agent is still streaming the long sentence when the user speaks.
    let (_, s, first, _) = barge_in(150).await;
    // The long sentence never completed: its late deltas were discarded with the connection.
    assert_eq!(first, vec!["You said: What is the weather."]);
    // ARP has no cancel: the socket closed mid-answer and a new connection took the next turn,
    // with the same session id (the agent checks it).
    assert_eq!(s.turns_cancelled, 1);
    assert_eq!(s.connections, 2);
    assert_eq!(s.turns_completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_after_the_commit_only_stops_the_speaker() {
    let _turn = one_at_a_time_when_emulated().await;
    // The answer is all in (commit) long before its speech ends: no reconnect is needed.
    let (_, s, _, cancelled) = barge_in(10).await;
    // The long sentence was being synthesized: that synthesis was cancelled at once.
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    assert!(
        cancelled[0].starts_with("This answer goes on"),
        "{cancelled:?}"
    );
    assert_eq!(s.turns_cancelled, 0);
    assert_eq!(s.connections, 1);
    assert_eq!(s.turns_completed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_with_no_words_plays_the_error_earcon_and_sends_nothing() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("empty");
    let a = start_agent(AgentSettings::default()).await;
    let (sp, _, tts) = speech(&[""]);
    let script = tmp.script(&[("one_utterance.wav", 300)], 1_500);
    let (report, _) = run_device(config(&a.url(), &[]), script, sp).await;
    assert_eq!(report.not_understood, 1);
    assert!(a.stats().inputs.is_empty());
    assert!(tts.asked.lock().expect("asked").is_empty());
    assert!(report.events.iter().any(|e| matches!(
        e.kind,
        EventKind::Earcon {
            earcon: hearken::audio::earcon::Earcon::Error
        }
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_dying_mid_answer_loses_no_turn() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("drop");
    // The first connection dies after 3 deltas of the first answer.
    let a = start_agent(AgentSettings {
        drop_after_deltas: Some(3),
        ..AgentSettings::default()
    })
    .await;
    let (sp, _, _) = speech(&["Turn on the kitchen lights", "How long will it take"]);
    let script = tmp.script(
        &[("one_utterance.wav", 300), ("question.wav", 3_000)],
        3_000,
    );
    let (report, _) = run_device(config(&a.url(), &[]), script, sp).await;
    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert!(s.connections >= 2, "{s:?}");
    assert_eq!(report.agent_disconnects, 1);
    // The second turn reached the agent over the new connection and was answered.
    assert_eq!(
        s.inputs.last().map(String::as_str),
        Some("How long will it take")
    );
    assert!(s.turns_completed >= 1);
}

/// Whether `program` runs at all (for the one test that needs real speech services).
fn runs(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_speech_services_a_turn_through_pocketsphinx_and_espeak_ng() {
    let _turn = one_at_a_time_when_emulated().await;
    if !runs("python3") || !runs("espeak-ng") {
        eprintln!(
            "SKIPPED real_speech_services: python3 or espeak-ng is not installed (scripts/deps.sh installs them)"
        );
        return;
    }
    let tmp = Scratch::new("real");
    let a = start_agent(AgentSettings::default()).await;
    // What `hearken demo --protocol arp` uses: espeak-ng through the command backend, and
    // pocketsphinx behind the local Wyoming server (tests/wyoming_server.py, on the official
    // `wyoming` package) in the venv scripts/deps.sh makes.
    let base = Config::from_toml_str("", "test", &[]).expect("config");
    let (sp, _server) = hearken::demo::demo_speech(&base)
        .await
        .expect("speech services (run scripts/deps.sh for the venv)");
    let script = tmp.script(&[("question.wav", 300)], 9_000);
    let (report, played) = run_device(config(&a.url(), &[]), script, sp).await;
    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(report.not_understood, 0);
    assert_eq!(report.user_texts.len(), 1, "{:?}", report.user_texts);
    assert_eq!(s.inputs, report.user_texts);
    // pocketsphinx's general model on espeak-ng's voice in the fixture: most words, not all.
    let said = "how long will it take to get to work today";
    let heard = report.user_texts[0].to_lowercase();
    let hits = said
        .split_whitespace()
        .filter(|w| heard.split_whitespace().any(|h| h == *w))
        .count();
    assert!(
        hits * 10 >= said.split_whitespace().count() * 4,
        "heard {heard:?}"
    );
    assert_eq!(s.turns_completed, 1);
    // The answer was spoken: espeak-ng's speech of four sentences and a table is many seconds long.
    assert!(
        active_ms(&played) > 4_000,
        "played {} ms",
        active_ms(&played)
    );
    assert_eq!(report.first_speech_us.len(), 1);
}

// The same path over H2A (HTTP POST + SSE): the voice bridge is protocol-neutral, the codec and the
// transport differ, and barge-in is an `interrupt` signal instead of a closed socket.

fn h2a_config(url: &str) -> Config {
    Config::from_toml_str(
        "",
        "test",
        &[
            "agent.protocol=\"h2a\"".to_string(),
            format!("agent.url=\"{url}\""),
            "stt.backend=\"wyoming\"".to_string(),
            "agent.reconnect_min_ms=200".to_string(),
            "agent.reconnect_max_ms=2000".to_string(),
        ],
    )
    .expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2a_a_voice_turn_goes_as_a_message_and_the_answer_is_spoken() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("h2a-turn");
    let a = hearken::agent::h2a::spawn(
        "127.0.0.1:0".parse().expect("addr"),
        hearken::agent::h2a::AgentSettings::default(),
    )
    .await
    .expect("agent");
    let (sp, _, tts) = speech(&["How long will it take to get to work today"]);
    let script = tmp.script(&[("question.wav", 300)], 3_000);
    let (report, played) = run_device(h2a_config(&a.url()), script, sp).await;
    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(s.sessions_opened, 1);
    assert_eq!(
        s.messages,
        vec!["How long will it take to get to work today"]
    );
    assert_eq!(s.responses_completed, 1);
    let asked = tts.asked.lock().expect("asked").clone();
    assert_eq!(
        asked.first().map(String::as_str),
        Some("You said: How long will it take to get to work today.")
    );
    assert!(
        active_ms(&played) >= 1_000,
        "played {} ms",
        active_ms(&played)
    );
    assert!(
        report
            .events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::AgentTool { .. }))
    );
    assert!(
        report
            .events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::AgentFinished { status, .. } if status == "ok"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2a_barge_in_sends_interrupt_and_the_next_turn_is_answered() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("h2a-barge");
    let a = hearken::agent::h2a::spawn(
        "127.0.0.1:0".parse().expect("addr"),
        hearken::agent::h2a::AgentSettings {
            // 150 ms a word: still streaming the long second sentence when the user speaks.
            delta_ms: 150,
            closing: "This answer goes on for a long while, with many words, so that the user has \
                      every reason to interrupt it before it is over, and the speaker is still busy."
                .into(),
            ..hearken::agent::h2a::AgentSettings::default()
        },
    )
    .await
    .expect("agent");
    let (sp, _, _) = speech(&["What is the weather", "Stop wait a moment"]);
    let script = tmp.script(&[("question.wav", 300), ("barge_in.wav", 2_500)], 4_000);
    let (report, _) = run_device(h2a_config(&a.url()), script, sp).await;
    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(report.barge_ins, 1);
    assert_eq!(s.interrupts, 1, "{s:?}");
    assert_eq!(s.interrupts_honoured, 1);
    assert!(s.max_interrupt_to_end_ms < 1_000);
    assert_eq!(s.responses_interrupted, 1);
    assert_eq!(
        s.messages,
        vec!["What is the weather", "Stop wait a moment"]
    );
    // One session throughout: an interrupt needs no reconnect.
    assert_eq!(s.sessions_opened, 1);
    assert_eq!(report.agent_disconnects, 0);
}

// And over HAP: JSON-RPC 2.0 to the built-in agent, which the device starts itself as a child
// process (`hearken agent --protocol hap`), one message per line on its stdin and stdout.

fn hap_config() -> Config {
    Config::from_toml_str(
        "",
        "test",
        &[
            "agent.protocol=\"hap\"".to_string(),
            format!(
                "agent.command={:?}",
                [
                    common::hearken_argv(),
                    vec!["agent".into(), "--protocol".into(), "hap".into()]
                ]
                .concat()
            ),
            "stt.backend=\"wyoming\"".to_string(),
            "agent.reconnect_min_ms=200".to_string(),
            "agent.reconnect_max_ms=2000".to_string(),
        ],
    )
    .expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hap_a_voice_turn_is_a_tool_call_to_a_child_process_and_its_result_is_spoken() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("hap-turn");
    let (sp, _, tts) = speech(&["How long will it take", "Turn on the lights"]);
    let script = tmp.script(
        &[("question.wav", 300), ("one_utterance.wav", 6_000)],
        4_000,
    );
    let (report, played) = run_device(hap_config(), script, sp).await;
    assert_eq!(report.agent_connects, 1, "{:?}", report.user_texts);
    assert_eq!(
        report.user_texts,
        vec!["How long will it take", "Turn on the lights"]
    );
    let asked = tts.asked.lock().expect("asked").clone();
    assert!(
        asked
            .iter()
            .any(|t| t == "You said: How long will it take."),
        "{asked:?}"
    );
    assert!(
        asked.iter().any(|t| t == "You said: Turn on the lights."),
        "{asked:?}"
    );
    assert!(active_ms(&played) >= 1_000);
    // The agent's progress notifications are tool activity: the "working" earcon.
    assert!(report.events.iter().any(|e| matches!(
        e.kind,
        EventKind::Earcon {
            earcon: hearken::audio::earcon::Earcon::Working
        }
    )));
    let finished = report
        .events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::AgentFinished { status, .. } if status == "ok"))
        .count();
    assert_eq!(finished, 2);
    assert_eq!(report.link.malformed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2a_an_answer_over_the_limits_is_cut_the_user_is_told_and_the_device_goes_on() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("h2a-flood");
    let a = hearken::agent::h2a::spawn(
        "127.0.0.1:0".parse().expect("addr"),
        hearken::agent::h2a::AgentSettings::default(),
    )
    .await
    .expect("agent");
    // The agent answers a message containing "/flood" with 600 text frames (the limit is 500).
    let (sp, _, tts) = speech(&["please /flood me", "How long will it take"]);
    let script = tmp.script(
        &[("question.wav", 300), ("one_utterance.wav", 12_000)],
        4_000,
    );
    // A short spoken budget, so what is said of the cut answer has ended before the next turn.
    let mut config = h2a_config(&a.url());
    config.file.render.max_spoken_chars = 300;
    let (report, _) = run_device(config, script, sp).await;
    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(
        s.messages,
        vec!["please /flood me", "How long will it take"]
    );
    // Cut with an error (the error earcon tells the user), and the next turn is answered.
    assert!(
        report.events.iter().any(
            |e| matches!(&e.kind, EventKind::AgentError { code, .. } if code == "limit_exceeded")
        ),
        "no limit error"
    );
    let asked = tts.asked.lock().expect("asked").clone();
    // What the user hears of it: the start, then the renderer's notice that the rest is too long.
    assert!(
        asked.iter().any(|t| t == hearken::render::CAP_NOTICE),
        "{asked:?}"
    );
    // Then the error earcon: the answer ended in an error.
    assert!(report.events.iter().any(|e| matches!(
        e.kind,
        EventKind::Earcon {
            earcon: hearken::audio::earcon::Earcon::Error
        }
    )));
    assert!(
        asked
            .iter()
            .any(|t| t == "You said: How long will it take."),
        "{asked:?}"
    );
    assert_eq!(report.agent_disconnects, 0, "the session survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2a_a_stream_cut_mid_answer_is_resumed_and_the_answer_completes() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("h2a-drop");
    let a = hearken::agent::h2a::spawn(
        "127.0.0.1:0".parse().expect("addr"),
        hearken::agent::h2a::AgentSettings {
            drop_after_frames: Some(4),
            ..hearken::agent::h2a::AgentSettings::default()
        },
    )
    .await
    .expect("agent");
    let (sp, _, tts) = speech(&["How long will it take", "Turn on the lights"]);
    let script = tmp.script(
        &[("question.wav", 300), ("one_utterance.wav", 6_000)],
        4_000,
    );
    let (report, _) = run_device(h2a_config(&a.url()), script, sp).await;
    let s = a.stats();
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert_eq!(s.drops, 1);
    assert_eq!(s.resumes, 1, "{s:?}");
    assert_eq!(s.sessions_opened, 1, "resumed, not reopened");
    assert_eq!(report.agent_disconnects, 1);
    // Nothing lost, nothing twice: each answer's first sentence was spoken once.
    let asked = tts.asked.lock().expect("asked").clone();
    for said in [
        "You said: How long will it take.",
        "You said: Turn on the lights.",
    ] {
        assert_eq!(
            asked.iter().filter(|t| *t == said).count(),
            1,
            "{said}: {asked:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hap_a_barge_in_stops_the_speaker_and_the_next_turn_is_answered() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("hap-barge");
    let (sp, _, tts) = speech(&["What is the weather", "Stop wait a moment"]);
    // The answer's speech (about 2 s of tone) is still playing when "stop" starts.
    let script = tmp.script(&[("question.wav", 300), ("barge_in.wav", 500)], 4_000);
    // Without echo cancellation: this is about HAP's barge-in path. (With it, the gate starts out
    // pessimistic and needs a second or two of the device's first speech to learn that no echo
    // reaches this mic at all, which is longer than this short answer.)
    let mut config = hap_config();
    config.file.aec.enabled = false;
    let (report, _) = run_device(config, script, sp).await;
    assert_eq!(
        report.barge_ins,
        1,
        "{:#?}",
        report
            .events
            .iter()
            .filter_map(|e| hearken::events::timeline_line(&e.kind).map(|l| (e.audio_ms, l)))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        report.user_texts,
        vec!["What is the weather", "Stop wait a moment"]
    );
    let asked = tts.asked.lock().expect("asked").clone();
    assert!(
        asked.iter().any(|t| t == "You said: Stop wait a moment."),
        "{asked:?}"
    );
    assert_eq!(report.agent_disconnects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hap_the_agent_process_dying_mid_call_is_restarted_and_the_turn_is_answered() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("hap-kill");
    // The first child exits in the middle of its first call; the restarted one behaves.
    let flag = tmp.0.join("died-once");
    let mut config = hap_config();
    config.file.agent.command = vec![
        "sh".into(),
        "-c".into(),
        "if mkdir \"$0\" 2>/dev/null; then exec \"$@\" agent --protocol hap --exit-on-call 1; \
         else exec \"$@\" agent --protocol hap; fi"
            .into(),
        flag.display().to_string(),
    ];
    // The binary (through the runner when emulated) is "$@".
    config.file.agent.command.extend(common::hearken_argv());
    let (sp, _, tts) = speech(&["How long will it take"]);
    let script = tmp.script(&[("question.wav", 300)], 5_000);
    let (report, _) = run_device(config, script, sp).await;
    assert!(flag.is_dir(), "the first child ran");
    assert_eq!(report.agent_disconnects, 1, "{:?}", report.events.len());
    assert_eq!(report.agent_connects, 2);
    // The user's words were kept and answered by the new process, once.
    let asked = tts.asked.lock().expect("asked").clone();
    assert_eq!(
        asked
            .iter()
            .filter(|t| *t == "You said: How long will it take.")
            .count(),
        1,
        "{asked:?}"
    );
}

/// Refuses the first call at once, as a speech service that is restarting does; transcribes the
/// rest, answering with how much audio it got.
struct FlakyStt {
    calls: Mutex<u32>,
}

impl SpeechToText for FlakyStt {
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn transcribe<'a>(
        &'a self,
        rate_hz: u32,
        mut audio: mpsc::Receiver<Vec<i16>>,
        _cancel: CancellationToken,
    ) -> SpeechFuture<'a, Transcript> {
        Box::pin(async move {
            let n = {
                let mut c = self.calls.lock().expect("calls");
                *c += 1;
                *c
            };
            if n == 1 {
                return Err(SpeechError::Unavailable {
                    service: "flaky".into(),
                    reason: "restarting".into(),
                });
            }
            let mut samples = 0u64;
            while let Some(c) = audio.recv().await {
                samples += c.len() as u64;
            }
            Ok(Transcript {
                text: format!("heard {} ms", samples * 1000 / rate_hz as u64),
                language: None,
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speech_service_away_at_the_start_of_a_turn_still_gets_the_whole_turn() {
    let _turn = one_at_a_time_when_emulated().await;
    let tmp = Scratch::new("flaky");
    let a = start_agent(AgentSettings::default()).await;
    let stt = Arc::new(FlakyStt {
        calls: Mutex::new(0),
    });
    let sp = Speech {
        stt: stt.clone(),
        tts: Arc::new(ToneTts::default()),
    };
    let script = tmp.script(&[("question.wav", 300)], 4_000);
    let (report, _) = run_device(config(&a.url(), &[]), script, sp).await;
    assert_eq!(*stt.calls.lock().expect("calls"), 2);
    // The retry waited for the end of the turn: it got all of it (about 2.5 s of speech plus
    // pre-roll and the end silence), not the part said before the retry.
    assert_eq!(report.user_texts.len(), 1, "{:?}", report.user_texts);
    let ms: u64 = report.user_texts[0]
        .trim_start_matches("heard ")
        .trim_end_matches(" ms")
        .parse()
        .expect("a number");
    assert!(ms >= 2_500, "{ms} ms");
    assert_eq!(a.stats().inputs, report.user_texts);
}
