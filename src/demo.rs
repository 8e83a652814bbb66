//! `hearken demo`: the whole device against a built-in agent over a real loopback WebSocket, with no
//! sound card: a scripted conversation from `audio/fixtures` is played into the pipeline in real time (a
//! question, a barge-in while the agent answers, a last question), what the speaker would have played
//! goes to a WAV, and a timeline a person can read is printed, then a summary of latencies.
//! `--live` uses the real microphone and speaker instead of the script.
//!
//! `--protocol haip` (the default) streams audio both ways. `--protocol arp` speaks text: the turns go
//! through speech-to-text (the `[stt]` service, or else a local Wyoming server with pocketsphinx that
//! `scripts/deps.sh` sets up) and the answers through text-to-speech (`[tts]`, espeak-ng by default).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::agent::haip::{self as agent, AgentSettings, ToolCall};
use crate::audio::earcon::decode_wav;
use crate::audio::file::{OutputKind, RoomEcho};
use crate::cli::AgentProtocol;
use crate::config::{Config, ProtocolKind, SttBackend};
use crate::events::EventSink;
use crate::service::{self, Io, RunOptions, RunReport};
use crate::voice::Speech;

/// The scripted conversation: (fixture, silence before it in ms). Built into one 16 kHz WAV.
pub const SCRIPT: [(&str, u32); 3] = [
    // The question; its answer (the user's words played back, then a tone) starts about 4 s in.
    ("question.wav", 500),
    // "Stop, wait a moment" starts while the agent is still answering: a barge-in.
    ("barge_in.wav", 600),
    // After the second answer has played out, one more question (the agent calls a slow tool).
    ("one_utterance.wav", 3_200),
];
/// Silence after the last question so its answer can play out.
pub const SCRIPT_TAIL_MS: u32 = 4_500;

/// The ARP demo's script: the same turns, with room for speech-to-text and for spoken answers
/// (about 7 s each with espeak-ng).
pub const ARP_SCRIPT: [(&str, u32); 3] = [
    ("question.wav", 500),
    // 2.5 s after the question: the answer is being spoken.
    ("barge_in.wav", 2_500),
    ("one_utterance.wav", 12_000),
];
pub const ARP_SCRIPT_TAIL_MS: u32 = 12_000;

const DEMO_TOKEN: &str = "hearken-demo-token";

pub struct DemoOptions {
    pub live: bool,
    pub output: PathBuf,
    /// Scripted mode: put mic and speaker in a simulated room (the speaker is heard by the mic).
    pub echo: bool,
    pub protocol: AgentProtocol,
}

/// The simulated room of the scripted demo: a small speaker next to the mic.
pub const DEMO_ROOM: RoomEcho = RoomEcho {
    delay_ms: 40,
    gain_db: -6.0,
};

/// Where the fixtures are (source tree or installed package).
pub fn fixtures_dir() -> anyhow::Result<PathBuf> {
    crate::audio::data_file("fixtures/question.wav")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .context("the demo needs audio/fixtures: run it from the source tree")
}

/// Concatenate the demo's script into one 16 kHz mono WAV at `out`; returns its length in ms.
pub fn build_script(dir: &Path, out: &Path) -> anyhow::Result<u64> {
    write_script(dir, &SCRIPT, SCRIPT_TAIL_MS, out)
}

/// Concatenate `parts` (a 16 kHz fixture in `dir` after that many ms of silence), then `tail_ms` of
/// silence, into one 16 kHz mono WAV at `out`; returns its length in ms.
pub fn write_script(
    dir: &Path,
    parts: &[(&str, u32)],
    tail_ms: u32,
    out: &Path,
) -> anyhow::Result<u64> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(out, spec)
        .with_context(|| format!("cannot write {}", out.display()))?;
    let silence = |w: &mut hound::WavWriter<_>, ms: u32| -> anyhow::Result<()> {
        for _ in 0..ms * 16 {
            w.write_sample(0i16)?;
        }
        Ok(())
    };
    for &(file, gap_ms) in parts {
        silence(&mut w, gap_ms)?;
        let bytes = std::fs::read(dir.join(file))?;
        let sound = decode_wav(std::io::Cursor::new(bytes), file)?;
        anyhow::ensure!(sound.rate_hz == 16_000, "{file} is not 16 kHz");
        for s in sound.samples {
            w.write_sample((s * 32767.0).round() as i16)?;
        }
    }
    silence(&mut w, tail_ms)?;
    let total = w.len() as u64;
    w.finalize()?;
    Ok(total / 16)
}

/// Run the demo; prints the timeline and the summary.
/// The built-in agent the demo talks to.
enum DemoAgent {
    Haip(agent::AgentHandle),
    Arp(crate::agent::arp::AgentHandle),
    H2a(crate::agent::h2a::AgentHandle),
    /// A child process (`hearken agent --protocol hap`) the device starts itself.
    Hap,
}

pub fn run(mut config: Config, opts: &DemoOptions) -> anyhow::Result<()> {
    let rt = service::runtime()?;
    rt.block_on(async move {
        let shutdown = service::signal_shutdown();
        let tmp = std::env::temp_dir().join(format!("hearken-demo-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let (agent, speech, _speech_server) = match opts.protocol {
            AgentProtocol::Haip => {
                let token_file = tmp.join("agent-token");
                std::fs::write(&token_file, DEMO_TOKEN)?;
                let settings = AgentSettings {
                    token: Some(DEMO_TOKEN.into()),
                    // The last question makes the agent "look something up" for 2.5 s: the working
                    // earcon, then the spoken notice, then the answer.
                    tool_call: Some(ToolCall {
                        name: "weather_lookup".into(),
                        ms: 2_500,
                        on_turn: Some(3),
                    }),
                    ..AgentSettings::default()
                };
                let (addr, handle) = agent::spawn("127.0.0.1:0".parse()?, settings).await?;
                println!("built-in HAIP agent listening on ws://{addr}/haip");
                config.file.agent.protocol = ProtocolKind::Haip;
                config.file.agent.url = format!("ws://{addr}/haip");
                config.file.agent.token_file = token_file.display().to_string();
                (DemoAgent::Haip(handle), None, None)
            }
            AgentProtocol::Arp => {
                let (speech, server) = demo_speech(&config).await?;
                let handle = crate::agent::arp::spawn(
                    "127.0.0.1:0".parse()?,
                    crate::agent::arp::AgentSettings::default(),
                )
                .await?;
                println!("built-in ARP agent listening on {}", handle.url());
                config.file.agent.protocol = ProtocolKind::Arp;
                config.file.agent.url = handle.url();
                config.file.agent.token_file = String::new();
                (DemoAgent::Arp(handle), Some(speech), server)
            }
            AgentProtocol::H2a => {
                let (speech, server) = demo_speech(&config).await?;
                let handle = crate::agent::h2a::spawn(
                    "127.0.0.1:0".parse()?,
                    crate::agent::h2a::AgentSettings::default(),
                )
                .await?;
                println!("built-in H2A agent listening on {}", handle.url());
                config.file.agent.protocol = ProtocolKind::H2a;
                config.file.agent.url = handle.url();
                config.file.agent.token_file = String::new();
                (DemoAgent::H2a(handle), Some(speech), server)
            }
            AgentProtocol::Hap => {
                let (speech, server) = demo_speech(&config).await?;
                let exe = std::env::current_exe().context("the demo starts itself as the HAP agent")?;
                config.file.agent.protocol = ProtocolKind::Hap;
                config.file.agent.url = String::new();
                config.file.agent.token_file = String::new();
                config.file.agent.command = vec![
                    exe.display().to_string(),
                    "agent".into(),
                    "--protocol".into(),
                    "hap".into(),
                ];
                println!(
                    "built-in HAP agent: started by the device as a child process, JSON-RPC on its \
                     stdin/stdout ({})",
                    config.agent.command.join(" ")
                );
                (DemoAgent::Hap, Some(speech), server)
            }
        };
        let io = if opts.live {
            println!("live: speak into the microphone; Ctrl-C ends the demo");
            Io::Live
        } else {
            let script = tmp.join("script.wav");
            let ms = match opts.protocol {
                AgentProtocol::Haip => build_script(&fixtures_dir()?, &script)?,
                AgentProtocol::Arp | AgentProtocol::H2a | AgentProtocol::Hap => {
                    write_script(&fixtures_dir()?, &ARP_SCRIPT, ARP_SCRIPT_TAIL_MS, &script)?
                }
            };
            println!(
                "playing a scripted conversation of {:.1} s in real time (question, barge-in, question)",
                ms as f64 / 1000.0
            );
            if opts.echo {
                println!(
                    "simulated room: the mic hears the speaker {} ms late at {} dB{}",
                    DEMO_ROOM.delay_ms,
                    DEMO_ROOM.gain_db,
                    if config.aec_active() {
                        " (echo cancellation on)"
                    } else {
                        " (echo cancellation OFF: expect the device to interrupt itself)"
                    }
                );
                Io::Room {
                    input: script,
                    output: OutputKind::Wav(opts.output.clone()),
                    room: DEMO_ROOM,
                }
            } else {
                Io::File {
                    input: script,
                    output: OutputKind::Wav(opts.output.clone()),
                    realtime: true,
                }
            }
        };
        let report = service::run(
            config.clone(),
            RunOptions {
                io,
                events: EventSink::Timeline(Box::new(std::io::stdout())),
                record_events: true,
                speech,
            },
            shutdown,
        )
        .await?;
        let _ = std::fs::remove_dir_all(&tmp);
        print_summary(&config, &report, opts);
        match agent {
            DemoAgent::Haip(h) => {
                let stats = h.stats();
                println!(
                    "agent saw: {} connection(s), {} turn(s), {} run(s) ({} cancelled), {} protocol violation(s)",
                    stats.connections, stats.turns, stats.runs_started, stats.runs_cancelled, stats.violations.len()
                );
                for v in &stats.violations {
                    println!("  violation: {v}");
                }
            }
            DemoAgent::Arp(h) => {
                let stats = h.stats();
                println!(
                    "agent saw: {} connection(s), {} input(s), {} turn(s) answered, {} cut short by a \
                     barge-in, {} protocol violation(s)",
                    stats.connections,
                    stats.inputs.len(),
                    stats.turns_completed,
                    stats.turns_cancelled,
                    stats.violations.len()
                );
                for v in &stats.violations {
                    println!("  violation: {v}");
                }
            }
            DemoAgent::Hap => println!(
                "agent: the HAP child process records nothing here (its log goes to the device's \
                 log, target hearken::agent_stderr)"
            ),
            DemoAgent::H2a(h) => {
                let stats = h.stats();
                println!(
                    "agent saw: {} session(s) opened, {} resumed, {} message(s), {} answer(s) \
                     completed, {} interrupted ({} interrupt signal(s), slowest interrupt -> end {} ms), \
                     {} protocol violation(s)",
                    stats.sessions_opened,
                    stats.resumes,
                    stats.messages.len(),
                    stats.responses_completed,
                    stats.responses_interrupted,
                    stats.interrupts,
                    stats.max_interrupt_to_end_ms,
                    stats.violations.len()
                );
                for v in &stats.violations {
                    println!("  violation: {v}");
                }
            }
        }
        anyhow::Ok(())
    })
}

/// A local Wyoming server (pocketsphinx speech-to-text) the ARP demo starts when no `[stt]` service
/// is configured. Killed when dropped.
pub struct SpeechServer {
    _child: tokio::process::Child,
}

/// Speech services for the ARP demo: `[tts]` (espeak-ng by default), and `[stt]` or, when that is
/// "none", the Wyoming server of `tests/wyoming_server.py` on pocketsphinx, in the venv that
/// `scripts/deps.sh` makes.
pub async fn demo_speech(config: &Config) -> anyhow::Result<(Speech, Option<SpeechServer>)> {
    let tts = crate::speech::tts_from_config(config).context(
        "tts.backend = \"none\": the ARP demo speaks its answers, it needs text-to-speech",
    )?;
    if config.tts.backend == crate::config::TtsBackend::Command
        && let Some(program) = config.tts.command.first()
        && !on_path(program)
    {
        anyhow::bail!(
            "tts.command: {program} is not installed (scripts/deps.sh installs espeak-ng), or set [tts]"
        );
    }
    if config.stt.backend != SttBackend::None {
        let stt = crate::speech::stt_from_config(config).context("[stt]")?;
        println!(
            "speech-to-text: {}; text-to-speech: {}",
            stt.describe(),
            tts.describe()
        );
        return Ok((Speech { stt, tts }, None));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/wyoming_server.py");
    let venv = std::env::var_os("HEARKEN_SPEECH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/speech-venv"));
    let python = venv.join("bin/python");
    if !script.is_file() || !python.is_file() {
        anyhow::bail!(
            "the ARP demo needs speech-to-text: set [stt] (a Wyoming service such as \
             wyoming-faster-whisper, or a command), or run scripts/deps.sh, which sets up pocketsphinx \
             for the demo in {}",
            venv.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let uri = format!("tcp://127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("--uri")
        .arg(&uri)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", script.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let ready = async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "READY" {
                // Keep draining its reports so the pipe never fills.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return true;
            }
        }
        false
    };
    match tokio::time::timeout(std::time::Duration::from_secs(30), ready).await {
        Ok(true) => {}
        _ => anyhow::bail!(
            "the demo's Wyoming speech server did not start ({})",
            script.display()
        ),
    }
    let stt: std::sync::Arc<dyn crate::speech::SpeechToText> =
        std::sync::Arc::new(crate::speech::WyomingStt::new(&uri));
    println!(
        "speech-to-text: pocketsphinx behind a local Wyoming server ({uri}); text-to-speech: {}",
        tts.describe()
    );
    Ok((Speech { stt, tts }, Some(SpeechServer { _child: child })))
}

fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// p-th percentile (0-100) of `v` (nearest rank).
pub fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s.get(rank - 1).copied()
}

fn print_summary(config: &Config, r: &RunReport, opts: &DemoOptions) {
    println!("\n== summary");
    println!(
        "turns {}, frames sent {}, agent runs {}, barge-ins {}, reconnects {}",
        r.turns.len(),
        r.frames_sent,
        r.agent_runs,
        r.barge_ins,
        r.agent_disconnects
    );
    let ms =
        |us: Option<u64>| us.map_or("-".to_string(), |u| format!("{:.2} ms", u as f64 / 1000.0));
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\n== latency (this run; targets from the HAIP issue)");
    if opts.protocol == AgentProtocol::Haip {
        // Capture -> socket: a live frame's last sample to its bytes written to the WebSocket.
        let frame_ms = config.opus.frame_ms as u64;
        let p99 = percentile(&r.frame_to_socket_us, 99.0);
        println!(
            "mic frame captured -> on the socket: p50 {}, p99 {} over {} live frames \
             (target: p99 under 5 ms beyond the {frame_ms} ms frame: {})",
            ms(percentile(&r.frame_to_socket_us, 50.0)),
            ms(p99),
            r.frame_to_socket_us.len(),
            verdict(p99.is_some_and(|u| u < 5_000)),
        );
        let end = config.turn.end_silence_ms as u64;
        let worst = r.speech_end_to_turn_sent_ms.iter().copied().max();
        println!(
            "end of speech -> end of turn sent: {} (end_silence_ms {end}; worst {}, ratio {}; \
             target: at most +20 ms: {})",
            r.speech_end_to_turn_sent_ms
                .iter()
                .map(|t| format!("{t} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            worst.map_or("-".into(), |w| format!("+{} ms", w.saturating_sub(end))),
            worst.map_or("-".into(), |w| format!(
                "{:.3}",
                w as f64 / end.max(1) as f64
            )),
            verdict(worst.is_some_and(|w| w <= end + 20)),
        );
    }
    let min = config.turn.barge_in_min_ms(config.aec_active()) as u64;
    println!(
        "barge-in onset in the mic -> playback flushed: p50 {}, p95 {} over {} barge-in(s) \
         (the VAD's decision, at least turn.barge_in_min_ms {min} after the onset)",
        percentile(&r.barge_in_flush_ms, 50.0).map_or("-".into(), |v| format!("{v} ms")),
        percentile(&r.barge_in_flush_ms, 95.0).map_or("-".into(), |v| format!("{v} ms")),
        r.barge_in_flush_ms.len(),
    );
    match &r.echo {
        Some(e) => println!(
            "echo cancellation: ERLE {} after the first second (AEC3's own estimate {}) over {} frames \
             of the device's voice, speaker-to-mic delay estimate {}, {} frames kept from the VAD by \
             the barge-in gate",
            e.erle_db.map_or("-".into(), |v| format!("{v:.1} dB")),
            e.aec3_erle_db.map_or("-".into(), |v| format!("{v:.1} dB")),
            e.far_frames,
            e.delay_ms.map_or("-".into(), |v| format!("{v} ms")),
            e.gated_frames,
        ),
        None => println!("echo cancellation: off"),
    }
    println!(
        "link: {} connection(s), {} duplicate(s) dropped, {} frame(s) of cancelled runs dropped, \
         {} replay request(s), {} unreadable frame(s) skipped",
        r.link.connections,
        r.link.duplicates_dropped,
        r.link.cancelled_run_frames_dropped,
        r.link.replay_requests_sent,
        r.link.malformed,
    );
    if opts.protocol != AgentProtocol::Haip {
        let ms = |v: Option<u64>| v.map_or("-".into(), |u| format!("{:.0} ms", u as f64 / 1000.0));
        println!(
            "speech: {} turn(s) as text, {} with no words; first agent text -> first synthesized \
             audio at the speaker: p50 {}, max {} over {} answer(s) (where the agent streams word by \
             word, this includes the first sentence's arrival)",
            r.user_texts.len(),
            r.not_understood,
            ms(percentile(&r.first_speech_us, 50.0)),
            ms(r.first_speech_us.iter().copied().max()),
            r.first_speech_us.len(),
        );
        for t in &r.user_texts {
            println!("user said: \"{t}\"");
        }
        for t in &r.components_spoken {
            println!("component spoken: \"{t}\"");
        }
    }
    for t in &r.agent_texts {
        println!("agent said: \"{t}\"");
    }
    if !opts.live {
        println!("what the speaker played: {}", opts.output.display());
    }
}
