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
use crate::dsp::downlink::DownlinkAudio;
use crate::dsp::worker::PlaybackItem;
use crate::protocol::AudioCodec;
use crate::protocol::haip::{HaipClient, HaipSettings, HaipStats};
use crate::protocol::{Decoded, Downlink, Protocol, SessionInfo, Uplink, Wire};
use crate::transport::Backoff;
use crate::transport::ws::{self, WsConnection, WsSettings};

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
    fn plus(mut self, c: HaipStats) -> Self {
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

/// Start the link task for `config.agent`.
pub fn spawn(config: &Config, player: Player, shutdown: watch::Receiver<bool>) -> LinkHandle {
    let (tx, rx) = mpsc::channel(512);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let stats = Arc::new(Mutex::new(LinkStats::default()));
    let link = Link {
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
    Lost { reason: String, auth: bool },
}

impl Link {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn publish(&self, codec: &HaipClient) {
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
            let settings = WsSettings::from_config(&self.config.agent, token.clone());
            let started = Instant::now();
            let end = tokio::select! {
                r = ws::connect(&settings) => match r {
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
                End::Lost { reason, auth } => (reason, auth),
            };
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
                        Some(cmd) => self.keep(cmd),
                        None => return,
                    },
                }
            }
        }
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
        conn: &mut WsConnection,
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

    async fn handle_decoded(&mut self, conn: &mut WsConnection, d: Decoded) -> Result<(), End> {
        for e in d.events {
            match &e {
                Downlink::ResponseStarted { .. }
                | Downlink::Audio { .. }
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
                        auth: code == "AUTHENTICATION_FAILED",
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

    async fn serve(&mut self, conn: WsConnection, token: Option<crate::config::Secret>) -> End {
        let a = &self.config.agent;
        let mut codec = HaipClient::new(HaipSettings {
            ping_interval_ms: a.ping_interval_s as u64 * 1000,
            // buffer_ms of Opus at the configured bitrate, with room for the frames' envelopes.
            buffer_limit_bytes: (a.buffer_ms as usize * self.config.opus.bitrate_bps as usize
                / 8_000)
                * 3
                / 2
                + 64 * 1024,
            ..HaipSettings::default()
        });
        self.totals.connections += 1;
        self.publish(&codec);
        let end = self.serve_with(&mut codec, conn, token).await;
        self.totals = self.totals.plus(codec.stats());
        if let Ok(mut s) = self.shared.lock() {
            *s = self.totals;
        }
        end
    }

    async fn serve_with(
        &mut self,
        codec: &mut HaipClient,
        mut conn: WsConnection,
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
        if let Err(e) = self.send_all(&mut conn, hello, None, false).await {
            return e;
        }
        // Words the last connection could not deliver go first (the codec holds them until the
        // agent's handshake arrives).
        let mut pending: VecDeque<LinkCmd> = self.unanswered.drain(..).collect();
        while let Some(cmd) = pending.pop_front() {
            match codec.encode(self.now_ms(), cmd.up.clone()) {
                Ok(w) => {
                    if let Err(e) = self.send_all(&mut conn, w, None, false).await {
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
                    let turn_end = matches!(cmd.up, Uplink::TurnEnd { .. });
                    let interrupt = matches!(cmd.up, Uplink::Interrupt);
                    let meta = cmd.frame;
                    let wires = codec.encode(self.now_ms(), cmd.up.clone());
                    self.keep(cmd);
                    if interrupt {
                        // The service flushed already; audio of the cancelled run forwarded since then
                        // is flushed too. From here on the codec drops that run's frames.
                        self.player.flush.request();
                    }
                    match wires {
                        Ok(w) => self.send_all(&mut conn, w, meta, turn_end).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "uplink item not sent");
                            Ok(())
                        }
                    }
                }
                msg = conn.recv() => match msg {
                    None => Err(End::Lost { reason: "connection closed".into(), auth: false }),
                    Some(Err(e)) => Err(End::Lost { reason: e.to_string(), auth: e.is_auth() }),
                    Some(Ok(wire)) => match codec.decode(self.now_ms(), wire) {
                        Ok(d) => self.handle_decoded(&mut conn, d).await,
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
                    self.send_all(&mut conn, w, None, false).await
                }
            };
            self.publish(codec);
            if let Err(e) = r {
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
}
