//! Wiring: starts the DSP worker on the chosen devices, runs the TurnMachine on tokio over the worker's
//! events, carries out its actions (stop the stream, flush playback, earcons, frames to the agent), writes
//! the event stream, and shuts down on SIGTERM/SIGINT or when a file input has been fully processed.
//!
//! Without an agent (issue-2 scope, and a mic check on a fresh Pi), each turn is logged with its start,
//! end, duration and the number of Opus frames encoded.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::audio::earcon::{Earcon, Earcons};
use crate::audio::file::{FileClock, FileDevices, OutputKind, Pacing};
use crate::audio::rt::RtSnapshot;
use crate::audio::{Capture, DeviceError, DeviceFactory, Playback, StreamFormat};
use crate::cli::{EventFormat, RunArgs};
use crate::config::Config;
use crate::dsp::worker::{self, Control, WorkerEvent, WorkerSettings};
use crate::events::{Event, EventKind, EventSink};
use crate::turn::{Action, EndReason, Input, State, TurnMachine, TurnSettings};

/// Where audio comes from and goes to.
pub enum Io {
    /// Sound card through cpal.
    Live,
    /// WAV in (fast or real time); speaker to a WAV, to memory or nowhere.
    File {
        input: PathBuf,
        output: OutputKind,
        realtime: bool,
    },
    /// Live microphone, speaker to a WAV file.
    LiveToFile { output: PathBuf },
}

pub struct RunOptions {
    pub io: Io,
    pub events: EventSink,
    /// Keep every event in the report (tests, demo).
    pub record_events: bool,
}

/// One user turn as the service saw it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TurnReport {
    pub start_ms: u64,
    pub end_ms: u64,
    pub duration_ms: u64,
    pub frames: u32,
    pub reason: EndReason,
}

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunReport {
    pub turns: Vec<TurnReport>,
    pub speech: Vec<(u64, u64)>,
    pub frames_sent: u64,
    pub barge_ins: u32,
    /// Barge-in onset in the mic -> playback faded, in audio ms.
    pub barge_in_flush_ms: Vec<u64>,
    pub counters: RtSnapshot,
    pub events: Vec<Event>,
    pub peak_rss_kib: Option<u64>,
    pub audio_ms: u64,
}

/// `hearken run`: build the runtime, run until done or signalled, print a summary.
pub fn run_cli(config: Config, args: &RunArgs) -> anyhow::Result<()> {
    let io = match (&args.input, &args.output) {
        (Some(input), out) => Io::File {
            input: input.clone(),
            output: out.clone().map_or(OutputKind::Null, OutputKind::Wav),
            realtime: args.realtime,
        },
        (None, Some(output)) => Io::LiveToFile {
            output: output.clone(),
        },
        (None, None) => Io::Live,
    };
    let events = match args.events {
        Some(EventFormat::Jsonl) => EventSink::JsonLines(Box::new(std::io::stdout())),
        None => EventSink::None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = rt.block_on(async move {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        run(
            config,
            RunOptions {
                io,
                events,
                record_events: false,
            },
            rx,
        )
        .await
    })?;
    tracing::info!(
        turns = report.turns.len(),
        frames = report.frames_sent,
        audio_ms = report.audio_ms,
        peak_rss_kib = report.peak_rss_kib,
        xruns = report.counters.xruns,
        capture_dropped = report.counters.capture_dropped,
        "done"
    );
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Devices for the run: capture from one factory, playback from another.
struct SplitDevices {
    capture: Box<dyn DeviceFactory>,
    playback: Box<dyn DeviceFactory>,
}

impl DeviceFactory for SplitDevices {
    fn open_capture(&mut self) -> Result<Box<dyn Capture>, DeviceError> {
        self.capture.open_capture()
    }
    fn open_playback(&mut self) -> Result<Box<dyn Playback>, DeviceError> {
        self.playback.open_playback()
    }
}

fn output_format(config: &Config) -> StreamFormat {
    StreamFormat {
        rate_hz: match config.audio.output_rate_hz {
            0 => 48_000,
            r => r,
        },
        channels: 1,
    }
}

/// Run the device until `shutdown` turns true, the worker stops, or a file input is done.
pub async fn run(
    config: Config,
    mut opts: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<RunReport> {
    let earcons = if config.earcons.enabled {
        Some(
            Earcons::load(&config.earcons.dir, config.earcons.volume)
                .map_err(crate::Error::from)?,
        )
    } else {
        None
    };
    let (devices, fast, live): (Box<dyn DeviceFactory>, bool, bool) = match &opts.io {
        Io::Live => (
            Box::new(crate::audio::cpal::CpalDevices::new(config.audio.clone())),
            false,
            true,
        ),
        Io::LiveToFile { output } => (
            Box::new(SplitDevices {
                capture: Box::new(crate::audio::cpal::CpalDevices::new(config.audio.clone())),
                playback: Box::new(FileDevices::new(
                    None,
                    OutputKind::Wav(output.clone()),
                    output_format(&config),
                    Pacing::Realtime,
                    0,
                )),
            }),
            false,
            true,
        ),
        Io::File {
            input,
            output,
            realtime,
        } => {
            let pacing = if *realtime {
                Pacing::Realtime
            } else {
                Pacing::Fast(Arc::new(FileClock::default()))
            };
            (
                Box::new(FileDevices::new(
                    Some(input.clone()),
                    output.clone(),
                    output_format(&config),
                    pacing,
                    0,
                )),
                !*realtime,
                false,
            )
        }
    };
    if !config.agent.url.is_empty() {
        tracing::warn!(
            url = %config.agent.url,
            "agent protocols are not built in yet; running without an agent (turns are logged)"
        );
    }
    let turn_settings = TurnSettings::from_config(&config.turn, false, false);
    let mut handle = worker::spawn(
        WorkerSettings {
            config: config.clone(),
            earcons,
            fast,
        },
        devices,
    )
    .context("cannot start the DSP thread")?;

    let mut tm = TurnMachine::new(turn_settings);
    let mut report = RunReport::default();
    let mut ctx = Ctx {
        sink: &mut opts.events,
        record: opts.record_events,
        report: &mut report,
        now: 0,
    };
    let mut opened_once = false;
    let mut input_ended = false;
    let mut playing = false;
    let mut ticks_since_request = u32::MAX;
    let mut turn_start = 0u64;
    let mut speech_start = None;
    let mut pending_barge_in: Option<u64> = None;
    let mut ended_at = None::<Instant>;
    let mut counters_timer = tokio::time::interval(Duration::from_secs(
        config.log.counters_interval_s.max(1) as u64,
    ));
    counters_timer.tick().await;
    loop {
        let ev = tokio::select! {
            ev = handle.events.recv() => ev,
            _ = shutdown.changed() => break,
            _ = counters_timer.tick(), if config.log.counters_interval_s > 0 => {
                let c = handle.counters.snapshot();
                tracing::info!(xruns = c.xruns, capture_dropped = c.capture_dropped,
                    underrun_frames = c.underrun_frames, "audio counters");
                continue;
            }
        };
        let Some(ev) = ev else {
            // The worker ended on its own: a device error it cannot recover from.
            anyhow::bail!("the audio worker stopped (see the errors above)");
        };
        let input = match ev {
            WorkerEvent::DevicesOpened {
                input,
                output,
                input_format,
                output_format,
                vad,
            } => {
                tracing::info!(%input, %output, %input_format, %output_format, vad, "audio devices open");
                ctx.emit(EventKind::DeviceOpened {
                    input,
                    output,
                    vad: vad.into(),
                });
                if live
                    && !opened_once
                    && handle
                        .control
                        .try_send(Control::Earcon(Earcon::Listening))
                        .is_ok()
                {
                    ticks_since_request = 0;
                }
                opened_once = true;
                None
            }
            WorkerEvent::DeviceError { message, retry_ms } => {
                tracing::warn!(error = %message, retry_ms, "audio device unavailable; retrying");
                ctx.emit(EventKind::DeviceError { message, retry_ms });
                if !live {
                    anyhow::bail!("audio input failed");
                }
                None
            }
            WorkerEvent::SpeechStart { at_ms } => {
                tracing::debug!(at_ms, "speech start");
                ctx.now = ctx.now.max(at_ms);
                ctx.emit_at(EventKind::SpeechStart, at_ms);
                speech_start = Some(at_ms);
                Some(Input::SpeechStart { at: at_ms })
            }
            WorkerEvent::SpeechEnd { at_ms } => {
                tracing::debug!(at_ms, "speech end");
                ctx.emit_at(EventKind::SpeechEnd, at_ms);
                if let Some(s) = speech_start.take() {
                    ctx.report.speech.push((s, at_ms));
                }
                Some(Input::SpeechEnd { at: at_ms })
            }
            WorkerEvent::Frame(f) => {
                tracing::trace!(
                    seq = f.seq,
                    at_ms = f.at_ms,
                    bytes = f.packet.len(),
                    "frame"
                );
                Some(Input::Frame(f))
            }
            WorkerEvent::StreamCapped { at_ms } => {
                tracing::warn!(at_ms, "uplink stream hit its safety cap");
                None
            }
            WorkerEvent::PlaybackStarted { at_ms } => {
                ctx.now = ctx.now.max(at_ms);
                playing = true;
                Some(Input::PlaybackStarted)
            }
            WorkerEvent::PlaybackIdle { at_ms } => {
                ctx.now = ctx.now.max(at_ms);
                playing = false;
                Some(Input::PlaybackIdle)
            }
            WorkerEvent::Flushed {
                output_ms, at_ms, ..
            } => {
                ctx.emit_at(EventKind::PlaybackFlushed { output_ms }, at_ms);
                if let Some(onset) = pending_barge_in.take() {
                    ctx.report
                        .barge_in_flush_ms
                        .push(output_ms.saturating_sub(onset));
                }
                None
            }
            WorkerEvent::InputEnded { at_ms } => {
                ctx.now = ctx.now.max(at_ms);
                ctx.emit(EventKind::InputEnded);
                input_ended = true;
                ended_at = Some(Instant::now());
                Some(Input::InputEnded)
            }
            WorkerEvent::Tick { at_ms } => {
                ctx.now = ctx.now.max(at_ms);
                ticks_since_request = ticks_since_request.saturating_add(1);
                Some(Input::Tick)
            }
        };
        if let Some(input) = input {
            for action in tm.handle(ctx.now, input) {
                match action {
                    Action::StateChanged { from, to } => {
                        tracing::debug!(?from, ?to, "state");
                        ctx.emit(EventKind::StateChange { from, to });
                    }
                    Action::TurnStarted { at } => {
                        turn_start = at;
                        tracing::info!(at_ms = at, "turn start");
                        ctx.emit_at(EventKind::TurnStart, at);
                    }
                    Action::SendFrame(_f) => {
                        // No agent in this build: the frame is counted, not sent.
                        ctx.report.frames_sent += 1;
                    }
                    Action::TurnEnded {
                        at,
                        duration_ms,
                        frames,
                        reason,
                    } => {
                        tracing::info!(
                            start_ms = turn_start,
                            end_ms = at,
                            duration_ms,
                            frames,
                            ?reason,
                            "turn end"
                        );
                        ctx.report.turns.push(TurnReport {
                            start_ms: turn_start,
                            end_ms: at,
                            duration_ms,
                            frames,
                            reason,
                        });
                        ctx.emit(EventKind::TurnEnd {
                            duration_ms,
                            frames,
                            reason,
                        });
                    }
                    Action::StopStream => {
                        let _ = handle.control.try_send(Control::StopStream);
                    }
                    Action::FlushPlayback => {
                        handle.flush.request();
                    }
                    Action::Interrupt => {
                        tracing::debug!("interrupt (no agent to tell)");
                    }
                    Action::BargeIn { onset, at } => {
                        tracing::info!(onset_ms = onset, decided_ms = at, "barge-in");
                        ctx.report.barge_ins += 1;
                        pending_barge_in = Some(onset);
                        ctx.emit(EventKind::BargeIn { onset_ms: onset });
                    }
                    Action::Discarded { onset, reason } => {
                        tracing::debug!(onset_ms = onset, ?reason, "speech discarded");
                        ctx.emit(EventKind::Discarded {
                            onset_ms: onset,
                            reason,
                        });
                    }
                    Action::PlayEarcon(e) => {
                        if handle.control.try_send(Control::Earcon(e)).is_ok() {
                            ticks_since_request = 0;
                        }
                        ctx.emit(EventKind::Earcon { earcon: e });
                    }
                    Action::ResponseTimeout => {
                        tracing::warn!("no answer from the agent in time");
                        ctx.emit(EventKind::ResponseTimeout);
                    }
                }
            }
        }
        if input_ended && tm.state() != State::UserSpeaking {
            // Let queued earcons play out into the output, then stop.
            let drained = ticks_since_request >= 2 && !playing;
            let stuck = ended_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10));
            if drained || stuck {
                break;
            }
        }
    }
    handle.shutdown();
    let audio_ms = ctx.now;
    let counters = handle.counters.snapshot();
    let peak_rss_kib = peak_rss_kib();
    ctx.report.audio_ms = audio_ms;
    ctx.report.counters = counters;
    ctx.report.peak_rss_kib = peak_rss_kib;
    let summary = EventKind::Summary {
        turns: ctx.report.turns.len() as u32,
        frames: ctx.report.frames_sent,
        barge_ins: ctx.report.barge_ins,
        xruns: counters.xruns,
        capture_dropped: counters.capture_dropped,
        peak_rss_kib,
    };
    ctx.emit(summary);
    Ok(report)
}

struct Ctx<'a> {
    sink: &'a mut EventSink,
    record: bool,
    report: &'a mut RunReport,
    now: u64,
}

impl Ctx<'_> {
    fn emit(&mut self, kind: EventKind) {
        let now = self.now;
        self.emit_at(kind, now);
    }

    fn emit_at(&mut self, kind: EventKind, at: u64) {
        let e = Event::new(kind, at);
        self.sink.emit(&e);
        if self.record {
            self.report.events.push(e);
        }
    }
}

/// Peak resident set size of this process (VmHWM), in KiB, where /proc has it.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A memory speaker for tests and the demo.
pub fn memory_output() -> (OutputKind, Arc<Mutex<Vec<f32>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    (OutputKind::Memory(buf.clone()), buf)
}
