//! Wiring: starts the DSP worker on the chosen devices and, when an agent is configured, the agent link;
//! runs the TurnMachine on tokio over their events and carries out its actions (stop the stream, flush
//! playback, earcons, frames and turn ends to the agent, interrupts); writes the event stream; shuts
//! down on SIGTERM/SIGINT or when a file input has been fully processed.
//!
//! Without an agent (a mic check on a fresh Pi), each turn is logged with its start, end, duration and
//! the number of Opus frames encoded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
use crate::dsp::worker::{self, Control, WorkerEvent, WorkerHandle, WorkerSettings};
use crate::events::{Event, EventKind, EventSink};
use crate::link::{self, FrameMeta, LinkCmd, LinkEvent, LinkHandle, Player};
use crate::protocol::{AudioCodec, Downlink, FinishStatus, ToolState, Uplink};
use crate::turn::{Action, EndReason, Input, State, TurnMachine, TurnSettings};

/// A tool call running longer than this gets the spoken notice.
const TOOL_NOTICE_AFTER_MS: u64 = 2_000;

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
    /// A WAV in real time as the mic and a file-like speaker, in a simulated room: the speaker's
    /// output reaches the mic again (the demo).
    Room {
        input: PathBuf,
        output: OutputKind,
        room: crate::audio::file::RoomEcho,
    },
}

pub struct RunOptions {
    pub io: Io,
    pub events: EventSink,
    /// Keep every event in the report (tests, demo).
    pub record_events: bool,
    /// Speech services for a text-only protocol; `None`: from the config's `[stt]` and `[tts]`.
    pub speech: Option<crate::voice::Speech>,
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
    /// Live frames: last sample captured -> frame written to the socket, in µs.
    pub frame_to_socket_us: Vec<u64>,
    /// End of the user's speech -> end of turn written to the socket, in ms.
    pub speech_end_to_turn_sent_ms: Vec<u64>,
    /// Complete text messages from the agent.
    pub agent_texts: Vec<String>,
    /// Text-only protocols: what went to the agent for each turn (transcript or matched answer).
    pub user_texts: Vec<String>,
    /// Text-only protocols: turns that gave no text.
    pub not_understood: u32,
    /// Text-only protocols: components as spoken.
    pub components_spoken: Vec<String>,
    /// Text-only protocols: an answer's first text -> its first synthesized audio at the speaker, µs.
    pub first_speech_us: Vec<u64>,
    pub agent_runs: u32,
    pub agent_connects: u32,
    pub agent_disconnects: u32,
    /// The echo canceller's latest figures (when it runs).
    pub echo: Option<crate::dsp::worker::EchoReport>,
    /// Protocol counters of the agent link (duplicates, cancelled-run frames, replays, ...).
    pub link: crate::link::LinkStats,
    pub skipped_frames: u32,
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
    let report = runtime()?.block_on(async move {
        run(
            config,
            RunOptions {
                io,
                events,
                record_events: false,
                speech: None,
            },
            signal_shutdown(),
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

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A shutdown flag that turns true on SIGTERM or SIGINT. Call inside the runtime.
pub fn signal_shutdown() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
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

fn devices(config: &Config, io: &Io) -> (Box<dyn DeviceFactory>, bool, bool) {
    match io {
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
                    output_format(config),
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
                    output_format(config),
                    pacing,
                    0,
                )),
                !*realtime,
                false,
            )
        }
        Io::Room {
            input,
            output,
            room,
        } => (
            Box::new(
                FileDevices::new(
                    Some(input.clone()),
                    output.clone(),
                    output_format(config),
                    Pacing::Realtime,
                    0,
                )
                .with_room(*room),
            ),
            false,
            false,
        ),
    }
}

/// Run the device until `shutdown` turns true, the worker stops, or a file input is done.
pub async fn run(
    config: Config,
    opts: RunOptions,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<RunReport> {
    let earcons = if config.earcons.enabled {
        Some(
            Earcons::load(&config.earcons.dir, config.earcons.volume)
                .map_err(crate::Error::from)?,
        )
    } else {
        None
    };
    let (devices, fast, live) = devices(&config, &opts.io);
    let agent = config.agent_configured();
    let speech = match opts.speech {
        Some(s) => Some(s),
        None if agent && config.agent.protocol.text_only() => {
            // What the Wyoming services offer, in the log; one that is down is retried per call.
            let c = config.clone();
            tokio::spawn(async move {
                for (section, service, info) in crate::speech::wyoming_info(&c).await {
                    match info {
                        Ok(i) => {
                            tracing::info!(section, %service, offers = %i.summary(), "speech service")
                        }
                        Err(e) => {
                            tracing::warn!(section, %service, error = %e, "speech service not reachable yet")
                        }
                    }
                }
            });
            Some(
                crate::voice::Speech::from_config(&config)
                    .context("a text-only protocol needs speech services ([stt] and [tts])")?,
            )
        }
        None => None,
    };
    let handle = worker::spawn(
        WorkerSettings {
            config: config.clone(),
            earcons,
            fast,
        },
        devices,
    )
    .context("cannot start the DSP thread")?;
    let link = agent.then(|| {
        link::spawn(
            &config,
            Player {
                audio: handle.audio.clone(),
                flush: handle.flush.clone(),
            },
            speech.clone(),
            shutdown.clone(),
        )
    });
    let metrics = Arc::new(crate::health::Metrics::default());
    metrics.update(|h| {
        h.state = "starting".into();
        h.agent_configured = agent;
    });
    if let Some(addr) = config.health_addr() {
        // The config has checked that the address is loopback.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("health.listen: cannot listen on {addr}"))?;
        tracing::info!(%addr, "health endpoint: /healthz and /metrics");
        tokio::spawn(crate::health::serve(
            listener,
            metrics.clone(),
            handle.counters.clone(),
            shutdown.clone(),
        ));
    }
    let mut svc = Service {
        tm: TurnMachine::new(TurnSettings::from_config(
            &config.turn,
            config.aec_active(),
            agent,
        )),
        config,
        handle,
        link,
        sink: opts.events,
        record: opts.record_events,
        report: RunReport::default(),
        now: 0,
        live,
        epoch: None,
        opened_once: false,
        input_ended: None,
        playing: false,
        ticks_since_request: u32::MAX,
        turn_start: 0,
        turn_frames_sent: 0,
        speech_start: None,
        last_speech_end: 0,
        pending_barge_in: None,
        texts: HashMap::new(),
        tools: HashMap::new(),
        notify: crate::notify::Notifier::from_env(),
        metrics,
    };
    let result = svc.main_loop(shutdown).await;
    svc.finish().await;
    result.map(|()| svc.report)
}

struct Service {
    config: Config,
    tm: TurnMachine,
    handle: WorkerHandle,
    link: Option<LinkHandle>,
    sink: EventSink,
    record: bool,
    report: RunReport,
    /// The audio clock (ms of input processed).
    now: u64,
    live: bool,
    /// Wall time of audio clock 0.
    epoch: Option<Instant>,
    opened_once: bool,
    input_ended: Option<Instant>,
    playing: bool,
    ticks_since_request: u32,
    turn_start: u64,
    turn_frames_sent: u64,
    speech_start: Option<u64>,
    last_speech_end: u64,
    pending_barge_in: Option<u64>,
    /// Agent text being streamed, by message id.
    texts: HashMap<String, String>,
    /// Running tool calls: (name, started at, notice played).
    tools: HashMap<String, (String, u64, bool)>,
    /// systemd: READY, WATCHDOG, STOPPING (a no-op outside systemd).
    notify: crate::notify::Notifier,
    /// What the health endpoint serves.
    metrics: Arc<crate::health::Metrics>,
}

impl Service {
    async fn main_loop(&mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let counters_s = self.config.log.counters_interval_s;
        let mut counters_timer =
            tokio::time::interval(Duration::from_secs(counters_s.max(1) as u64));
        counters_timer.tick().await;
        // After a file input ends, time goes on as silence so deadlines (end of turn, response
        // timeout) still fire.
        let mut after_end = tokio::time::interval(Duration::from_millis(10));
        // Disabled until the input ends: the ticks missed until then must not come in a burst (that
        // would run the clock ahead by the whole input's length).
        after_end.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The watchdog is pinged only while the DSP worker's tick advances: a hung audio thread gets
        // the service restarted.
        let wd_every = self.notify.watchdog_interval();
        let mut watchdog = tokio::time::interval(wd_every.unwrap_or(Duration::from_secs(3600)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wd_gate = crate::notify::WatchdogGate::default();
        loop {
            let has_link = self.link.is_some();
            tokio::select! {
                ev = self.handle.events.recv() => {
                    let Some(ev) = ev else {
                        anyhow::bail!("the audio worker stopped (see the errors above)");
                    };
                    self.on_worker(ev).await?;
                }
                ev = async { match self.link.as_mut() { Some(l) => l.events.recv().await, None => None } }, if has_link => {
                    if let Some(ev) = ev {
                        self.on_link(ev).await;
                    }
                }
                _ = shutdown.changed() => return Ok(()),
                _ = watchdog.tick(), if wd_every.is_some() => {
                    let beat = self.handle.heartbeat.load(std::sync::atomic::Ordering::Relaxed);
                    if wd_gate.should_ping(beat) {
                        self.notify.watchdog();
                    } else {
                        tracing::error!("the DSP thread has not ticked since the last watchdog ping");
                    }
                }
                _ = counters_timer.tick(), if counters_s > 0 => {
                    let c = self.handle.counters.snapshot();
                    tracing::info!(xruns = c.xruns, capture_dropped = c.capture_dropped,
                        underrun_frames = c.underrun_frames, "audio counters");
                }
                _ = after_end.tick(), if self.input_ended.is_some() => {
                    self.now += 10;
                    self.feed(Input::Tick).await;
                    self.tick_tools().await;
                }
            }
            if let Some(ended) = self.input_ended {
                let settled = matches!(self.tm.state(), State::Idle | State::Disconnected);
                let drained = self.ticks_since_request >= 2 && !self.playing;
                let limit = Duration::from_secs(if self.link.is_some() { 30 } else { 10 });
                if (settled && drained) || ended.elapsed() > limit {
                    return Ok(());
                }
            }
        }
    }

    async fn finish(&mut self) {
        self.notify.stopping();
        if let Some(link) = self.link.take() {
            self.report.link = link.stats();
            link.stop().await;
        }
        self.handle.shutdown();
        let counters = self.handle.counters.snapshot();
        self.report.audio_ms = self.now;
        self.report.counters = counters;
        self.report.peak_rss_kib = peak_rss_kib();
        let summary = EventKind::Summary {
            turns: self.report.turns.len() as u32,
            frames: self.report.frames_sent,
            barge_ins: self.report.barge_ins,
            xruns: counters.xruns,
            capture_dropped: counters.capture_dropped,
            peak_rss_kib: self.report.peak_rss_kib,
        };
        self.emit(summary);
    }

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

    fn earcon(&mut self, e: Earcon) {
        if self.handle.control.try_send(Control::Earcon(e)).is_ok() {
            self.ticks_since_request = 0;
        }
    }

    async fn send_link(&mut self, up: Uplink, frame: Option<FrameMeta>) {
        if let Some(link) = &self.link {
            // Bounded; the link takes items promptly (it buffers them itself while offline).
            if link.tx.send(LinkCmd { up, frame }).await.is_err() {
                tracing::error!("the agent link stopped");
            }
        }
    }

    async fn on_worker(&mut self, ev: WorkerEvent) -> anyhow::Result<()> {
        let input = match ev {
            WorkerEvent::DevicesOpened {
                input,
                output,
                input_format,
                output_format,
                vad,
                started_at,
                clock_ms,
            } => {
                tracing::info!(%input, %output, %input_format, %output_format, vad, "audio devices open");
                self.emit(EventKind::DeviceOpened {
                    input,
                    output,
                    vad: vad.into(),
                });
                // Audio clock 0 in wall time, again after every reopen: the outage is not latency.
                self.epoch = started_at.checked_sub(Duration::from_millis(clock_ms));
                if self.live && !self.opened_once {
                    self.earcon(Earcon::Listening);
                }
                if !self.opened_once {
                    // Devices open and the agent link (if any) launched at start-up: ready.
                    self.notify.ready(if self.link.is_some() {
                        "listening; connecting to the agent"
                    } else {
                        "listening (no agent configured)"
                    });
                } else {
                    self.notify.status("listening (audio devices reopened)");
                }
                self.opened_once = true;
                None
            }
            WorkerEvent::DeviceError { message, retry_ms } => {
                tracing::warn!(error = %message, retry_ms, "audio device unavailable; retrying");
                self.notify
                    .status(&format!("audio device unavailable: {message}"));
                self.emit(EventKind::DeviceError { message, retry_ms });
                if !self.live {
                    anyhow::bail!("audio input failed");
                }
                None
            }
            WorkerEvent::SpeechStart { at_ms } => {
                tracing::debug!(at_ms, "speech start");
                self.now = self.now.max(at_ms);
                self.emit_at(EventKind::SpeechStart, at_ms);
                self.speech_start = Some(at_ms);
                Some(Input::SpeechStart { at: at_ms })
            }
            WorkerEvent::SpeechEnd { at_ms } => {
                tracing::debug!(at_ms, "speech end");
                self.emit_at(EventKind::SpeechEnd, at_ms);
                if let Some(s) = self.speech_start.take() {
                    self.report.speech.push((s, at_ms));
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
                self.now = self.now.max(at_ms);
                self.playing = true;
                Some(Input::PlaybackStarted)
            }
            WorkerEvent::PlaybackIdle { at_ms } => {
                self.now = self.now.max(at_ms);
                self.playing = false;
                Some(Input::PlaybackIdle)
            }
            WorkerEvent::Flushed {
                output_ms, at_ms, ..
            } => {
                self.emit_at(EventKind::PlaybackFlushed { output_ms }, at_ms);
                if let Some(onset) = self.pending_barge_in.take() {
                    let latency = output_ms.saturating_sub(onset);
                    tracing::info!(latency_ms = latency, "playback flushed after barge-in");
                    self.report.barge_in_flush_ms.push(latency);
                    self.metrics.barge_in_flush.observe_us(latency * 1000);
                }
                None
            }
            WorkerEvent::InputEnded { at_ms } => {
                self.now = self.now.max(at_ms);
                self.emit(EventKind::InputEnded);
                self.input_ended = Some(Instant::now());
                Some(Input::InputEnded)
            }
            WorkerEvent::Echo(r) => {
                tracing::debug!(erle_db = ?r.erle_db, aec3_erle_db = ?r.aec3_erle_db,
                    delay_ms = ?r.delay_ms, far_frames = r.far_frames, gated_frames = r.gated_frames,
                    "echo cancellation");
                self.report.echo = Some(r);
                None
            }
            WorkerEvent::Tick { at_ms } => {
                self.now = self.now.max(at_ms);
                self.ticks_since_request = self.ticks_since_request.saturating_add(1);
                self.tick_tools().await;
                Some(Input::Tick)
            }
        };
        if let Some(input) = input {
            self.feed(input).await;
        }
        Ok(())
    }

    async fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected { session } => {
                self.report.agent_connects += 1;
                self.metrics.update(|h| h.connected = true);
                self.notify.status("listening; connected to the agent");
                self.emit(EventKind::AgentConnected { session });
                self.feed(Input::Connected).await;
            }
            LinkEvent::Disconnected {
                reason,
                retry_ms,
                auth,
            } => {
                self.report.agent_disconnects += 1;
                self.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                self.metrics.update(|h| h.connected = false);
                self.notify.status(if auth {
                    "the agent refused the token; retrying"
                } else {
                    "agent link down; reconnecting"
                });
                self.texts.clear();
                self.tools.clear();
                self.emit(EventKind::AgentDisconnected { reason, retry_ms });
                self.feed(Input::Disconnected).await;
            }
            LinkEvent::Skipped { reason: _ } => self.report.skipped_frames += 1,
            LinkEvent::Dropped { frames } => {
                self.metrics
                    .dropped_frames
                    .fetch_add(frames, Ordering::Relaxed);
                tracing::warn!(
                    frames,
                    "mic audio dropped while the agent was unreachable (buffer full)"
                );
            }
            LinkEvent::FrameSent { meta, at } => {
                if meta.live
                    && let Some(epoch) = self.epoch
                {
                    let captured = epoch + Duration::from_millis(meta.end_ms);
                    let us = at.saturating_duration_since(captured).as_micros() as u64;
                    self.report.frame_to_socket_us.push(us);
                    self.metrics.frame_to_socket.observe_us(us);
                }
            }
            LinkEvent::TurnEndSent { at } => {
                if let Some(epoch) = self.epoch {
                    let spoken = epoch + Duration::from_millis(self.last_speech_end);
                    let ms = at.saturating_duration_since(spoken).as_millis() as u64;
                    self.report.speech_end_to_turn_sent_ms.push(ms);
                    self.metrics.end_of_turn.observe_us(ms * 1000);
                }
            }
            LinkEvent::AgentAudio { bytes } => {
                self.metrics
                    .downlink_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                self.feed(Input::AgentStarted).await
            }
            LinkEvent::Down(d) => self.on_downlink(d).await,
            LinkEvent::Transcript { said, text } => {
                tracing::info!(%said, %text, "user turn as text");
                self.report.user_texts.push(text.clone());
                self.emit(EventKind::UserText { said, text });
            }
            LinkEvent::NotUnderstood { reason } => {
                tracing::warn!(%reason, "the user's turn gave no text");
                self.report.not_understood += 1;
                self.emit(EventKind::NotUnderstood { reason });
                // The turn is over without an answer: the error earcon, back to listening.
                self.feed(Input::AgentError).await;
            }
            LinkEvent::ComponentSpoken { kind, text } => {
                self.report.components_spoken.push(text.clone());
                self.emit(EventKind::AgentComponent { kind, text });
            }
            LinkEvent::FirstSpeech { after_first_text } => {
                let us = after_first_text.as_micros() as u64;
                tracing::debug!(us, "first agent text -> first synthesized audio");
                self.report.first_speech_us.push(us);
            }
        }
    }

    async fn on_downlink(&mut self, d: Downlink) {
        match d {
            Downlink::Ready { .. } => {}
            Downlink::ResponseStarted { id } => {
                self.report.agent_runs += 1;
                self.emit(EventKind::AgentResponse { id });
                self.feed(Input::AgentResponse).await;
            }
            Downlink::TextDelta { message_id, text } => {
                self.texts.entry(message_id).or_default().push_str(&text);
                self.feed(Input::AgentStarted).await;
            }
            Downlink::TextDone { message_id } => {
                let text = self.texts.remove(&message_id).unwrap_or_default();
                tracing::info!(%text, "agent text");
                self.report.agent_texts.push(text.clone());
                self.emit(EventKind::AgentText { text });
            }
            Downlink::Audio { .. } => {} // the link sends audio straight to the worker
            Downlink::Render { component, tool } => {
                // Spoken by the link's renderer; here it is only shown.
                let kind = component
                    .get("type")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                tracing::info!(%kind, tool = ?tool, "agent component");
                self.feed(Input::AgentStarted).await;
            }
            Downlink::Patch { ops } => tracing::debug!(ops = ops.len(), "agent patch"),
            Downlink::Tool {
                call_id,
                name,
                state,
            } => {
                let label = match state {
                    ToolState::Started => "started",
                    ToolState::Progress => "running",
                    ToolState::Done => "done",
                };
                self.emit(EventKind::AgentTool {
                    name: name.clone(),
                    state: label.into(),
                });
                match state {
                    ToolState::Started => {
                        self.earcon(Earcon::Working);
                        self.emit(EventKind::Earcon {
                            earcon: Earcon::Working,
                        });
                        self.tools.insert(call_id, (name, self.now, false));
                    }
                    ToolState::Progress => {}
                    ToolState::Done => {
                        self.tools.remove(&call_id);
                    }
                }
            }
            Downlink::ResponseFinished { id, status } => {
                let label = match status {
                    FinishStatus::Ok => "ok",
                    FinishStatus::Cancelled => "cancelled",
                    FinishStatus::Error => "error",
                };
                self.emit(EventKind::AgentFinished {
                    id,
                    status: label.into(),
                });
                let input = if status == FinishStatus::Error {
                    Input::AgentError
                } else {
                    Input::AgentFinished
                };
                self.feed(input).await;
            }
            Downlink::Error {
                code,
                message,
                fatal,
            } => {
                if fatal {
                    tracing::error!(%code, %message, "fatal agent error; reconnecting");
                } else {
                    tracing::warn!(%code, %message, "agent error");
                }
                self.emit(EventKind::AgentError { code, message });
            }
            Downlink::Unknown { kind, reason } => {
                tracing::debug!(%kind, %reason, "agent frame not acted on");
            }
        }
    }

    /// A tool call still running after a while gets a short spoken notice, once.
    async fn tick_tools(&mut self) {
        let now = self.now;
        let mut notice = false;
        for (name, started, noticed) in self.tools.values_mut() {
            if !*noticed && now >= *started + TOOL_NOTICE_AFTER_MS {
                *noticed = true;
                notice = true;
                tracing::info!(tool = %name, "tool call running long; telling the user");
            }
        }
        if notice {
            self.earcon(Earcon::ToolNotice);
            self.emit(EventKind::Earcon {
                earcon: Earcon::ToolNotice,
            });
        }
    }

    async fn feed(&mut self, input: Input) {
        let actions = self.tm.handle(self.now, input);
        for action in actions {
            self.act(action).await;
        }
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::StateChanged { from, to } => {
                tracing::debug!(?from, ?to, "state");
                let name = serde_json::to_value(to)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                self.metrics.update(|h| h.state = name);
                self.emit(EventKind::StateChange { from, to });
            }
            Action::TurnStarted { at } => {
                self.turn_start = at;
                self.turn_frames_sent = 0;
                tracing::info!(at_ms = at, "turn start");
                self.emit_at(EventKind::TurnStart, at);
                self.send_link(Uplink::TurnStart, None).await;
            }
            Action::SendFrame(f) => {
                self.report.frames_sent += 1;
                self.metrics
                    .uplink_bytes
                    .fetch_add(f.packet.len() as u64, Ordering::Relaxed);
                self.turn_frames_sent += 1;
                let meta = FrameMeta {
                    end_ms: f.at_ms + f.duration_ms as u64,
                    live: f.live,
                };
                let up = Uplink::Audio {
                    codec: AudioCodec::Opus,
                    rate_hz: crate::dsp::codec::UPLINK_RATE_HZ,
                    channels: 1,
                    duration_ms: f.duration_ms,
                    data: f.packet,
                };
                self.send_link(up, Some(meta)).await;
            }
            Action::TurnEnded {
                at,
                duration_ms,
                frames,
                reason,
            } => {
                tracing::info!(
                    start_ms = self.turn_start,
                    end_ms = at,
                    duration_ms,
                    frames,
                    ?reason,
                    "turn end"
                );
                self.last_speech_end = at;
                self.metrics.turns.fetch_add(1, Ordering::Relaxed);
                self.metrics.update(|h| {
                    h.last_turn = Some(crate::health::LastTurn {
                        ended: crate::events::wall_now(),
                        duration_ms,
                        frames,
                    })
                });
                self.report.turns.push(TurnReport {
                    start_ms: self.turn_start,
                    end_ms: at,
                    duration_ms,
                    frames,
                    reason,
                });
                self.emit(EventKind::TurnEnd {
                    duration_ms,
                    frames,
                    reason,
                });
                if self.link.is_some() {
                    let frames = self.turn_frames_sent;
                    let to_speech_to_text = self.config.agent.protocol.text_only();
                    self.emit(EventKind::FramesSent {
                        frames,
                        to_speech_to_text,
                    });
                }
                self.send_link(Uplink::TurnEnd { duration_ms }, None).await;
            }
            Action::StopStream => {
                let _ = self.handle.control.try_send(Control::StopStream);
            }
            Action::FlushPlayback => {
                self.handle.flush.request();
            }
            Action::Interrupt => {
                self.texts.clear();
                self.tools.clear();
                self.send_link(Uplink::Interrupt, None).await;
            }
            Action::BargeIn { onset, at } => {
                tracing::info!(onset_ms = onset, decided_ms = at, "barge-in");
                self.report.barge_ins += 1;
                self.pending_barge_in = Some(onset);
                self.emit(EventKind::BargeIn { onset_ms: onset });
            }
            Action::Discarded { onset, reason } => {
                tracing::debug!(onset_ms = onset, ?reason, "speech discarded");
                self.emit(EventKind::Discarded {
                    onset_ms: onset,
                    reason,
                });
            }
            Action::PlayEarcon(e) => {
                self.earcon(e);
                self.emit(EventKind::Earcon { earcon: e });
            }
            Action::ResponseTimeout => {
                tracing::warn!("no answer from the agent in time");
                self.emit(EventKind::ResponseTimeout);
            }
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
