//! The agent link: one tokio task that keeps a connection to the agent (transport + protocol codec),
//! reconnecting with exponential backoff and jitter, and never loses the user's words: every uplink item
//! of a turn the agent has not started answering is kept (bounded by `agent.buffer_ms` of audio, oldest
//! audio dropped and counted beyond it) and sent again on the next connection.
//!
//! Context: tokio. Commands come from the service over a bounded channel; events go back over another.
//! A close with 1008 (or HTTP 401/403) means the token was refused: the token is read again (file or
//! systemd credential) before the next attempt, and the backoff still applies, so a bad token never
//! spins.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::audio::earcon::decode_wav;
use crate::audio::rt::FlushHandle;
use crate::config::Config;
use crate::config::ProtocolKind;
use crate::dsp::downlink::DownlinkAudio;
use crate::dsp::worker::PlaybackItem;
use crate::protocol::arp::{ArpClient, ArpSettings};
use crate::protocol::h2a::{H2aClient, H2aSettings, ResumeState};
use crate::protocol::haip::{HaipClient, HaipSettings};
use crate::protocol::hap::{HapClient, HapSettings};
use crate::protocol::{AudioCodec, CodecStats};
use crate::protocol::{Decoded, Downlink, Protocol, SessionInfo, Uplink, Wire};
use crate::transport::ws::{self, WsSettings};
use crate::transport::{AgentConnection, Backoff};
use crate::voice::{Speech, TurnText, VoiceBridge, VoiceEvent};

/// A command for the link.
#[derive(Debug)]
pub struct LinkCmd {
    pub up: Uplink,
    /// For audio: where the frame's audio ends on the audio clock, and whether it is live (not pre-roll).
    pub frame: Option<FrameMeta>,
}

#[derive(Debug, Clone, Copy)]
pub struct FrameMeta {
    pub end_ms: u64,
    pub live: bool,
}

/// What the link reports.
#[derive(Debug)]
pub enum LinkEvent {
    Connected {
        session: String,
    },
    Disconnected {
        reason: String,
        retry_ms: u64,
        auth: bool,
    },
    Down(Downlink),
    /// A frame could not be decoded and was skipped.
    Skipped {
        reason: String,
    },
    /// An audio frame reached the socket.
    FrameSent {
        meta: FrameMeta,
        at: Instant,
    },
    /// The end of a turn reached the socket.
    TurnEndSent {
        at: Instant,
    },
    /// Audio dropped from the unsent buffer because it was full.
    Dropped {
        frames: u64,
    },
    /// Agent audio went to the speaker queue (its data is not repeated here).
    AgentAudio {
        bytes: usize,
    },
    /// Text-only protocols: what speech-to-text heard (`said`) and what went to the agent (`text`:
    /// the transcript, or the answer to the agent's question it matched).
    Transcript {
        said: String,
        text: String,
    },
    /// Text-only protocols: the user's turn gave no text (nothing recognisable, or the speech service
    /// failed after its retries).
    NotUnderstood {
        reason: String,
    },
    /// Text-only protocols: a component was turned into speech.
    ComponentSpoken {
        kind: String,
        text: String,
    },
    /// Text-only protocols: the answer's first text to its first synthesized audio at the speaker.
    FirstSpeech {
        after_first_text: Duration,
    },
}

/// Where agent audio goes: straight to the DSP worker, so a fast agent is slowed down by back-pressure
/// on the socket instead of by the service's main loop.
#[derive(Clone)]
pub struct Player {
    pub audio: mpsc::Sender<PlaybackItem>,
    pub flush: FlushHandle,
}

/// Protocol counters over every connection of the link (each connection has a codec of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Connections that reached the agent (WebSocket open).
    pub connections: u64,
    /// Our audio chunks dropped because the codec's send queue was full (paused or no credit).
    pub dropped_audio_frames: u64,
    /// Agent frames dropped as repeats (same `id`, or a `seq` already seen).
    pub duplicates_dropped: u64,
    /// Agent frames dropped because their run had been cancelled (barge-in).
    pub cancelled_run_frames_dropped: u64,
    /// `REPLAY_REQUEST`s sent for gaps in the agent's `seq`.
    pub replay_requests_sent: u64,
    /// Agent frames that could not be read and were skipped.
    pub malformed: u64,
}

impl LinkStats {
    fn plus(mut self, c: CodecStats) -> Self {
        self.dropped_audio_frames += c.dropped_audio_frames;
        self.duplicates_dropped += c.duplicates_dropped;
        self.cancelled_run_frames_dropped += c.cancelled_run_frames_dropped;
        self.replay_requests_sent += c.replay_requests_sent;
        self.malformed += c.malformed;
        self
    }
}

pub struct LinkHandle {
    pub tx: mpsc::Sender<LinkCmd>,
    pub events: mpsc::Receiver<LinkEvent>,
    stats: Arc<Mutex<LinkStats>>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkHandle {
    /// Counters so far (updated after every frame in either direction).
    pub fn stats(&self) -> LinkStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Start the link task for `config.agent`. A text-only protocol needs `speech` (speech-to-text for the
/// user's turns, text-to-speech for the agent's answers).
pub fn spawn(
    config: &Config,
    player: Player,
    speech: Option<Speech>,
    shutdown: watch::Receiver<bool>,
) -> LinkHandle {
    let (tx, rx) = mpsc::channel(512);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let stats = Arc::new(Mutex::new(LinkStats::default()));
    let (voice, voice_rx) = match speech {
        Some(speech) => {
            let (v, rx) = VoiceBridge::new(speech, config.render_settings(), player.clone());
            (Some(v), Some(rx))
        }
        None => (None, None),
    };
    let link = Link {
        voice,
        voice_rx,
        session_id: uuid::Uuid::new_v4().to_string(),
        h2a_resume: ResumeState::default(),
        quiet_reconnect: false,
        config: config.clone(),
        cmds: rx,
        events: ev_tx,
        shutdown,
        player,
        unanswered: VecDeque::new(),
        dropped: 0,
        epoch: Instant::now(),
        totals: LinkStats::default(),
        shared: stats.clone(),
    };
    let task = tokio::spawn(link.run());
    LinkHandle {
        tx,
        events: ev_rx,
        stats,
        task,
    }
}

struct Link {
    /// Text-only protocols: speech-to-text and the renderer with text-to-speech.
    voice: Option<VoiceBridge>,
    voice_rx: Option<mpsc::Receiver<VoiceEvent>>,
    /// Client-held session id (ARP), the same across reconnects.
    session_id: String,
    /// H2A: where a dropped session can be resumed, shared by every connection's codec.
    h2a_resume: ResumeState,
    /// The connection was closed on purpose (a barge-in on a protocol without cancel): reconnect at
    /// once and do not report it as a new connection.
    quiet_reconnect: bool,
    config: Config,
    cmds: mpsc::Receiver<LinkCmd>,
    events: mpsc::Sender<LinkEvent>,
    shutdown: watch::Receiver<bool>,
    player: Player,
    /// Items of turns the agent has not started answering, in order.
    unanswered: VecDeque<LinkCmd>,
    dropped: u64,
    epoch: Instant,
    /// Counters of the connections that have ended.
    totals: LinkStats,
    shared: Arc<Mutex<LinkStats>>,
}

enum End {
    Shutdown,
    Lost {
        reason: String,
        auth: bool,
    },
    /// Closed to cancel the agent's answer (the protocol has no cancel message).
    Cancelled,
}

/// Open the transport the protocol runs on.
async fn connect(
    config: &Config,
    token: Option<crate::config::Secret>,
) -> Result<Box<dyn AgentConnection>, crate::transport::TransportError> {
    match config.agent.protocol {
        ProtocolKind::Haip | ProtocolKind::Arp => {
            let settings = WsSettings::from_config(&config.agent, token);
            Ok(Box::new(ws::connect(&settings).await?))
        }
        ProtocolKind::H2a => Ok(Box::new(
            crate::transport::sse::connect(&config.agent, token).await?,
        )),
        ProtocolKind::Hap if !config.agent.command.is_empty() => Ok(Box::new(
            crate::transport::stdio::connect(&config.agent.command).await?,
        )),
        ProtocolKind::Hap => Ok(Box::new(
            crate::transport::http::connect(&crate::transport::http::HttpSettings::from_config(
                &config.agent,
                token,
            ))
            .await?,
        )),
    }
}

async fn next_voice(rx: &mut Option<mpsc::Receiver<VoiceEvent>>) -> Option<VoiceEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Link {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn publish(&self, codec: &dyn Protocol) {
        if let Ok(mut s) = self.shared.lock() {
            *s = self.totals.plus(codec.stats());
        }
    }

    async fn emit(&self, e: LinkEvent) {
        let _ = self.events.send(e).await;
    }

    async fn run(mut self) {
        let a = &self.config.agent;
        let mut backoff = Backoff::new(a.reconnect_min_ms as u64, a.reconnect_max_ms as u64);
        loop {
            let token = match ws::read_token(&self.config.agent) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the agent token");
                    None
                }
            };
            let started = Instant::now();
            let end = tokio::select! {
                r = connect(&self.config, token.clone()) => match r {
                    Ok(conn) => {
                        tracing::info!(url = %self.config.agent.url, "connected to the agent");
                        self.serve(conn, token).await
                    }
                    Err(e) => End::Lost { reason: e.to_string(), auth: e.is_auth() },
                },
                _ = self.shutdown.changed() => End::Shutdown,
            };
            let (reason, auth) = match end {
                End::Shutdown => return,
                End::Cancelled => {
                    tracing::debug!(
                        "reconnecting after closing the connection to cancel the answer"
                    );
                    self.quiet_reconnect = true;
                    continue;
                }
                End::Lost { reason, auth } => (reason, auth),
            };
            self.quiet_reconnect = false;
            // An answer cut by a lost connection will not finish, except where the protocol resumes
            // it (H2A replays from the last sequence seen): there the rest continues the sentence.
            if let Some(v) = &mut self.voice
                && self.config.agent.protocol != ProtocolKind::H2a
            {
                v.connection_lost();
            }
            backoff.succeeded(started.elapsed());
            let delay = backoff.next_delay();
            if auth {
                tracing::error!(error = %reason, retry_ms = delay.as_millis() as u64,
                    "the agent refused the token; it will be read again before the next attempt");
            } else {
                tracing::warn!(error = %reason, retry_ms = delay.as_millis() as u64, "agent link down; reconnecting");
            }
            self.emit(LinkEvent::Disconnected {
                reason,
                retry_ms: delay.as_millis() as u64,
                auth,
            })
            .await;
            // Wait out the backoff, still taking the user's words.
            let until = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = self.shutdown.changed() => return,
                    cmd = self.cmds.recv() => match cmd {
                        Some(cmd) => {
                            if let Some(cmd) = self.intake(cmd) {
                                self.keep(cmd);
                            }
                        }
                        None => return,
                    },
                    ev = next_voice(&mut self.voice_rx) => {
                        if let Some(ev) = ev {
                            for cmd in self.on_voice(ev).await {
                                self.keep(cmd);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Text-only protocols: the turn's audio goes to speech-to-text, not to the agent.
    fn intake(&mut self, cmd: LinkCmd) -> Option<LinkCmd> {
        match &mut self.voice {
            Some(v) => v.uplink(cmd.up).map(|up| LinkCmd {
                up,
                frame: cmd.frame,
            }),
            None => Some(cmd),
        }
    }

    /// A report of the voice bridge; returns the uplink items it produced (the turn as text).
    async fn on_voice(&mut self, ev: VoiceEvent) -> Vec<LinkCmd> {
        match ev {
            VoiceEvent::Transcript { said, turn, .. } => {
                let result = match &mut self.voice {
                    Some(v) => v.turn_result(turn, Some(said)),
                    None => TurnText::Send(said),
                };
                match result {
                    TurnText::Send(said) => self.user_turn(said).await,
                    TurnText::Held => Vec::new(),
                    TurnText::NotUnderstood => {
                        self.emit(LinkEvent::NotUnderstood {
                            reason: "nothing recognisable was said".into(),
                        })
                        .await;
                        Vec::new()
                    }
                }
            }
            VoiceEvent::NotUnderstood { reason, turn } => {
                let result = match &mut self.voice {
                    Some(v) => v.turn_result(turn, None),
                    None => TurnText::NotUnderstood,
                };
                match result {
                    // Words of earlier turns that waited for this one.
                    TurnText::Send(said) => self.user_turn(said).await,
                    TurnText::Held => Vec::new(),
                    TurnText::NotUnderstood => {
                        self.emit(LinkEvent::NotUnderstood { reason }).await;
                        Vec::new()
                    }
                }
            }
            VoiceEvent::ComponentSpoken { kind, text } => {
                self.emit(LinkEvent::ComponentSpoken { kind, text }).await;
                Vec::new()
            }
            VoiceEvent::Finished { id, status } => {
                self.emit(LinkEvent::Down(Downlink::ResponseFinished { id, status }))
                    .await;
                Vec::new()
            }
            VoiceEvent::FirstAudio { after_first_text } => {
                self.emit(LinkEvent::FirstSpeech { after_first_text }).await;
                Vec::new()
            }
        }
    }

    /// The user's turn as text: reported, and the uplink items that carry it.
    async fn user_turn(&mut self, said: String) -> Vec<LinkCmd> {
        let text = match &mut self.voice {
            Some(v) => v.answer(&said),
            None => said.clone(),
        };
        self.emit(LinkEvent::Transcript {
            said,
            text: text.clone(),
        })
        .await;
        vec![
            LinkCmd {
                up: Uplink::Text(text),
                frame: None,
            },
            // Marks the end of the turn for `answered`.
            LinkCmd {
                up: Uplink::TurnEnd { duration_ms: 0 },
                frame: None,
            },
        ]
    }

    /// Keep an item for (re)sending; Interrupts are not worth replaying to a new session.
    fn keep(&mut self, cmd: LinkCmd) {
        if matches!(cmd.up, Uplink::Interrupt) {
            return;
        }
        self.unanswered.push_back(cmd);
        let frame_ms = self.config.opus.frame_ms.max(10);
        let limit = (self.config.agent.buffer_ms / frame_ms).max(1) as usize;
        let mut audio = self
            .unanswered
            .iter()
            .filter(|c| matches!(c.up, Uplink::Audio { .. }))
            .count();
        while audio > limit {
            if let Some(i) = self
                .unanswered
                .iter()
                .position(|c| matches!(c.up, Uplink::Audio { .. }))
            {
                self.unanswered.remove(i);
                self.dropped += 1;
                audio -= 1;
            } else {
                break;
            }
        }
    }

    /// The agent started answering: items up to the last finished turn are done with.
    fn answered(&mut self) {
        if let Some(last_end) = self
            .unanswered
            .iter()
            .rposition(|c| matches!(c.up, Uplink::TurnEnd { .. }))
        {
            self.unanswered.drain(..=last_end);
        }
    }

    async fn send_all(
        &self,
        conn: &mut dyn AgentConnection,
        wires: Vec<Wire>,
        meta: Option<FrameMeta>,
        turn_end: bool,
    ) -> Result<(), End> {
        let had = !wires.is_empty();
        for w in wires {
            conn.send(w).await.map_err(|e| End::Lost {
                reason: e.to_string(),
                auth: e.is_auth(),
            })?;
        }
        if had {
            let at = Instant::now();
            if let Some(meta) = meta {
                self.emit(LinkEvent::FrameSent { meta, at }).await;
            }
            if turn_end {
                self.emit(LinkEvent::TurnEndSent { at }).await;
            }
        }
        Ok(())
    }

    async fn handle_decoded(
        &mut self,
        conn: &mut dyn AgentConnection,
        d: Decoded,
    ) -> Result<(), End> {
        for e in d.events {
            // Text-only protocols: text and components are spoken; the end of an answer waits for
            // its speech; late events of a cancelled answer go no further.
            let e = match &mut self.voice {
                Some(v) => match v.downlink(e) {
                    Some(e) => e,
                    None => continue,
                },
                None => e,
            };
            match &e {
                Downlink::ResponseStarted { .. }
                | Downlink::Audio { .. }
                | Downlink::Render { .. }
                | Downlink::TextDelta { .. } => self.answered(),
                Downlink::Error {
                    fatal: true,
                    code,
                    message,
                } => {
                    let reason = format!("fatal agent error {code}: {message}");
                    self.emit(LinkEvent::Down(e.clone())).await;
                    return Err(End::Lost {
                        reason,
                        // HAIP's and H2A's names for a refused credential.
                        auth: code == "AUTHENTICATION_FAILED" || code == "AUTHENTICATION_REQUIRED",
                    });
                }
                _ => {}
            }
            if let Downlink::Ready { session } = &e {
                self.emit(LinkEvent::Connected {
                    session: session.clone(),
                })
                .await;
            }
            if let Downlink::Audio {
                codec,
                rate_hz,
                channels,
                data,
            } = e
            {
                let bytes = data.len();
                let audio = match codec {
                    AudioCodec::Opus => Some(DownlinkAudio::Opus(data)),
                    AudioCodec::Pcm16 => Some(DownlinkAudio::Pcm16 {
                        rate_hz,
                        channels,
                        data,
                    }),
                    AudioCodec::Wav => match decode_wav(std::io::Cursor::new(data), "agent WAV") {
                        Ok(s) => Some(DownlinkAudio::Mono {
                            rate_hz: s.rate_hz,
                            samples: s.samples,
                        }),
                        Err(err) => {
                            tracing::warn!(error = %err, "skipped undecodable WAV from the agent");
                            None
                        }
                    },
                };
                if let Some(audio) = audio {
                    let item = PlaybackItem {
                        generation: self.player.flush.current(),
                        audio,
                    };
                    // Back-pressure: waits while the speaker queue is full.
                    let _ = self.player.audio.send(item).await;
                    self.emit(LinkEvent::AgentAudio { bytes }).await;
                }
                continue;
            }
            self.emit(LinkEvent::Down(e)).await;
        }
        self.send_all(conn, d.replies, None, false).await
    }

    fn new_codec(&self) -> Box<dyn Protocol> {
        let a = &self.config.agent;
        match a.protocol {
            ProtocolKind::Haip => Box::new(HaipClient::new(HaipSettings {
                ping_interval_ms: a.ping_interval_s as u64 * 1000,
                // buffer_ms of Opus at the configured bitrate, with room for the frames' envelopes.
                buffer_limit_bytes: (a.buffer_ms as usize * self.config.opus.bitrate_bps as usize
                    / 8_000)
                    * 3
                    / 2
                    + 64 * 1024,
                ..HaipSettings::default()
            })),
            ProtocolKind::Arp => Box::new(ArpClient::new(ArpSettings {
                session_id: self.session_id.clone(),
                send_hello: a.renderer_hello,
            })),
            ProtocolKind::H2a => Box::new(H2aClient::new(H2aSettings {
                resume_state: self.h2a_resume.clone(),
                ..H2aSettings::default()
            })),
            ProtocolKind::Hap => {
                let target = (!a.hap_target.is_empty()).then(|| a.hap_target.clone());
                Box::new(HapClient::new(HapSettings {
                    agent: target.clone(),
                    tool: target,
                    request_timeout_ms: self.config.turn.response_timeout_ms as u64,
                    ..HapSettings::default()
                }))
            }
        }
    }

    async fn serve(
        &mut self,
        conn: Box<dyn AgentConnection>,
        token: Option<crate::config::Secret>,
    ) -> End {
        let mut codec = self.new_codec();
        if !self.quiet_reconnect {
            self.totals.connections += 1;
        }
        self.publish(codec.as_ref());
        let end = self.serve_with(codec.as_mut(), conn, token).await;
        self.totals = self.totals.plus(codec.stats());
        if let Ok(mut s) = self.shared.lock() {
            *s = self.totals;
        }
        end
    }

    async fn serve_with(
        &mut self,
        codec: &mut dyn Protocol,
        mut conn: Box<dyn AgentConnection>,
        token: Option<crate::config::Secret>,
    ) -> End {
        let a = self.config.agent.clone();
        let info = SessionInfo {
            token,
            wall_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let hello = codec.open(self.now_ms(), &info);
        if let Err(e) = self.send_all(conn.as_mut(), hello, None, false).await {
            return e;
        }
        if let Some(session) = codec.ready_on_open() {
            // No server handshake to wait for.
            if !std::mem::take(&mut self.quiet_reconnect) {
                self.emit(LinkEvent::Connected { session }).await;
            }
        }
        // Words the last connection could not deliver go first (the codec holds them until the
        // agent's handshake arrives).
        let mut pending: VecDeque<LinkCmd> = self.unanswered.drain(..).collect();
        while let Some(cmd) = pending.pop_front() {
            match codec.encode(self.now_ms(), cmd.up.clone()) {
                Ok(w) => {
                    if let Err(e) = self.send_all(conn.as_mut(), w, None, false).await {
                        // Keep this item and every one after it for the next connection.
                        self.unanswered.push_back(cmd);
                        self.unanswered.extend(pending);
                        return e;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not re-send a kept item"),
            }
            self.unanswered.push_back(cmd);
        }
        if self.dropped > 0 {
            self.emit(LinkEvent::Dropped {
                frames: self.dropped,
            })
            .await;
            self.dropped = 0;
        }
        let ping_every = Duration::from_secs(a.ping_interval_s as u64);
        let liveness = Duration::from_secs(a.liveness_timeout_s as u64);
        let mut ws_ping = tokio::time::interval(ping_every);
        ws_ping.tick().await;
        loop {
            let deadline = codec
                .next_deadline()
                .map(|d| d.saturating_sub(self.now_ms()))
                .unwrap_or(1_000)
                .min(1_000);
            let r = tokio::select! {
                _ = self.shutdown.changed() => {
                    conn.close().await;
                    return End::Shutdown;
                }
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else {
                        conn.close().await;
                        return End::Shutdown;
                    };
                    match self.intake(cmd) {
                        Some(cmd) => self.send_cmd(codec, conn.as_mut(), cmd).await,
                        None => Ok(()),
                    }
                }
                ev = next_voice(&mut self.voice_rx) => {
                    let mut r = Ok(());
                    if let Some(ev) = ev {
                        for cmd in self.on_voice(ev).await {
                            if r.is_ok() {
                                r = self.send_cmd(codec, conn.as_mut(), cmd).await;
                            } else {
                                self.keep(cmd);
                            }
                        }
                    }
                    r
                }
                msg = conn.recv() => match msg {
                    None => Err(End::Lost { reason: "connection closed".into(), auth: false }),
                    Some(Err(e)) => Err(End::Lost { reason: e.to_string(), auth: e.is_auth() }),
                    Some(Ok(wire)) => match codec.decode(self.now_ms(), wire) {
                        Ok(d) => self.handle_decoded(conn.as_mut(), d).await,
                        Err(e) => {
                            tracing::warn!(error = %e, "skipped a frame from the agent");
                            self.emit(LinkEvent::Skipped { reason: e.to_string() }).await;
                            Ok(())
                        }
                    },
                },
                _ = ws_ping.tick() => {
                    conn.ping().await;
                    Ok(())
                }
                _ = tokio::time::sleep(Duration::from_millis(deadline)) => {
                    let w = codec.poll(self.now_ms());
                    let events = codec.take_events();
                    match self.send_all(conn.as_mut(), w, None, false).await {
                        Ok(()) => {
                            let d = Decoded { events, replies: Vec::new() };
                            self.handle_decoded(conn.as_mut(), d).await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            self.publish(codec);
            if let Err(e) = r {
                if matches!(e, End::Cancelled) {
                    conn.close().await;
                }
                return e;
            }
            if conn.last_rx().elapsed() > liveness {
                return End::Lost {
                    reason: format!("nothing from the agent for {} s", liveness.as_secs()),
                    auth: false,
                };
            }
        }
    }

    /// One uplink item to the agent: encoded, sent and kept until answered. A barge-in on a protocol
    /// without a cancel message ends the connection ([`End::Cancelled`]).
    async fn send_cmd(
        &mut self,
        codec: &mut dyn Protocol,
        conn: &mut dyn AgentConnection,
        cmd: LinkCmd,
    ) -> Result<(), End> {
        let turn_end = matches!(cmd.up, Uplink::TurnEnd { .. });
        let interrupt = matches!(cmd.up, Uplink::Interrupt);
        let meta = cmd.frame;
        let reconnect = interrupt && codec.cancel_by_reconnect();
        let wires = codec.encode(self.now_ms(), cmd.up.clone());
        self.keep(cmd);
        if interrupt {
            // The service flushed already; audio of the cancelled run forwarded since then is
            // flushed too. From here on the codec drops that run's frames.
            self.player.flush.request();
            // The interrupted turns are done with: a reconnect must not send them again.
            self.answered();
            if reconnect {
                tracing::info!("barge-in: closing the connection (the protocol has no cancel)");
                return Err(End::Cancelled);
            }
        }
        match wires {
            Ok(w) => self.send_all(conn, w, meta, turn_end).await,
            Err(e) => {
                tracing::debug!(error = %e, "uplink item not sent");
                Ok(())
            }
        }
    }
}
