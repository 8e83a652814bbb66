//! The voice bridge for the text-only protocols (ARP, H2A, HAP): it sits inside the agent link
//! and turns the user's turn into text and the agent's text into speech.
//!
//! - Uplink: the turn's Opus frames are decoded to 16 kHz PCM and streamed to [`SpeechToText`] as
//!   they come; at the end of the turn the transcript (or, when the renderer asked a question, the
//!   matching answer) goes to the agent as text. The turn's audio is kept until its transcript is in,
//!   so a speech service that was briefly away is asked again ([`STT_RETRIES`]) instead of losing the
//!   user's words. When the user goes on speaking before a turn's transcript is in and that cancels
//!   the answer it awaited (the new turn replaces it), the pending words join the new turn's as one
//!   message ([`VoiceBridge::turn_result`]) instead of being answered alone.
//! - Downlink: text deltas, components and patches go through the [`Renderer`]; each sentence it
//!   completes is queued for [`TextToSpeech`] at once (the first sentence plays while the rest of the
//!   reply streams in). One speaker task synthesizes the queue in order and hands the audio to the DSP
//!   worker. The end of the answer is reported to the service only once its last sentence is queued for
//!   playback, so the turn machine does not go idle between sentences.
//! - Barge-in: [`VoiceBridge::interrupt`] cancels the synthesis in flight (the backend stops at once),
//!   drops queued sentences and the held end of the answer, and forgets the reply; late text of the
//!   cancelled answer is discarded.
//!
//! Context: tokio (the link task); the STT calls and the speaker run in tasks of their own. Every
//! channel is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dsp::codec::OpusDecoderPcm;
use crate::dsp::downlink::DownlinkAudio;
use crate::dsp::worker::PlaybackItem;
use crate::link::Player;
use crate::protocol::{Downlink, FinishStatus, Uplink};
use crate::render::{RenderSettings, Renderer};
use crate::speech::{Pcm, SpeechError, SpeechToText, TextToSpeech};

/// Sample rate the turn's audio is transcribed at (the uplink's rate).
pub const STT_RATE_HZ: u32 = 16_000;
/// Times a transcription is tried again after the service was unavailable or timed out.
pub const STT_RETRIES: u32 = 2;
/// Pause before such a retry.
const STT_RETRY_PAUSE: Duration = Duration::from_millis(1_000);
/// Longest a retry waits for the turn it transcribes to end (longer than any `max_utterance_ms`).
const MAX_TURN_WAIT_S: u64 = 130;
/// Sentences waiting for synthesis at most (about a minute of speech); beyond it they are dropped and
/// logged.
const SPEAK_QUEUE: usize = 64;
/// Decoded audio chunks buffered towards the STT call.
const STT_CHUNKS: usize = 1_024;

/// The speech services of a text-only protocol.
#[derive(Clone)]
pub struct Speech {
    pub stt: Arc<dyn SpeechToText>,
    pub tts: Arc<dyn TextToSpeech>,
}

impl Speech {
    /// The services the config's `[stt]` and `[tts]` sections name.
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Speech> {
        let stt = crate::speech::stt_from_config(config).ok_or_else(|| {
            anyhow::anyhow!("stt.backend = \"none\": set a speech-to-text service")
        })?;
        let tts = crate::speech::tts_from_config(config).ok_or_else(|| {
            anyhow::anyhow!("tts.backend = \"none\": set a text-to-speech service")
        })?;
        tracing::info!(stt = %stt.describe(), tts = %tts.describe(), "speech services");
        Ok(Speech { stt, tts })
    }
}

/// What the bridge reports back to the link.
#[derive(Debug)]
pub enum VoiceEvent {
    /// The user's turn as text: `said` is the transcript, `text` what goes to the agent (the
    /// transcript, or the answer it matched).
    /// `turn` numbers the user's turns from 1, in the order they began.
    Transcript {
        said: String,
        text: String,
        turn: u64,
    },
    /// Nothing usable was heard (empty transcript) or the service failed for good.
    NotUnderstood { reason: String, turn: u64 },
    /// A component was turned into speech.
    ComponentSpoken { kind: String, text: String },
    /// The answer's last sentence is queued for playback: the held end of the answer goes on.
    Finished { id: String, status: FinishStatus },
    /// First audio of an answer reached the speaker queue.
    FirstAudio {
        /// From the answer's first text to its first synthesized audio handed to playback.
        after_first_text: Duration,
    },
}

enum SpeakItem {
    Sentence {
        text: String,
        generation: u64,
        /// Which answer, and when its first text arrived.
        answer: u64,
        since: Instant,
    },
    /// Report `Finished` once everything before it is handed to playback.
    Finish {
        id: String,
        status: FinishStatus,
        generation: u64,
    },
}

/// What the link does with a turn's transcript ([`VoiceBridge::turn_result`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnText {
    /// Send this to the agent as the user's turn.
    Send(String),
    /// Kept, to go with a later turn's words.
    Held,
    /// The turn gave nothing to send: tell the user.
    NotUnderstood,
}

/// A turn's audio, kept until its transcript is in (for a retry), and whether the turn has ended.
type KeptAudio = Arc<std::sync::Mutex<(Vec<i16>, bool)>>;

/// Counters of the bridge.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VoiceStats {
    pub transcripts: u64,
    pub stt_failures: u64,
    pub sentences_spoken: u64,
    pub sentences_dropped: u64,
    pub late_events_dropped: u64,
}

pub struct VoiceBridge {
    speech: Speech,
    renderer: Renderer,
    events: mpsc::Sender<VoiceEvent>,
    /// The turn being transcribed: chunk sender, the turn's audio so far.
    turn: Option<(mpsc::Sender<Vec<i16>>, KeptAudio)>,
    /// In a mutex only to make the bridge `Sync` (the link task holds it across awaits).
    decoder: Option<std::sync::Mutex<OpusDecoderPcm>>,
    pcm: Vec<i16>,
    speak: mpsc::Sender<SpeakItem>,
    /// Bumped by every barge-in; the speaker skips items of older generations.
    generation: Arc<AtomicU64>,
    /// Cancels the synthesis of the current generation.
    cancel: Arc<std::sync::Mutex<CancellationToken>>,
    /// Answers cancelled by a barge-in: their late events are dropped.
    cancelled: Vec<String>,
    /// Turns begun so far (the last one's number).
    turns: u64,
    /// Turns whose transcript the link has not taken yet.
    pending: Vec<u64>,
    /// The user went on while earlier turns' words were still being transcribed, and that cancelled
    /// the answer they were waiting for: those words go with this turn's, as one turn.
    merge_into: Option<u64>,
    /// Transcripts kept for `merge_into` (`None`: the turn gave no text), by turn.
    held: Vec<(u64, Option<String>)>,
    current: Option<String>,
    /// Answers seen, and when the current one's first text or component came.
    answers: u64,
    first_text: Option<Instant>,
    pub stats: VoiceStats,
}

impl VoiceBridge {
    /// Starts the speaker task. Events come back on the returned receiver.
    pub fn new(
        speech: Speech,
        render: RenderSettings,
        player: Player,
    ) -> (VoiceBridge, mpsc::Receiver<VoiceEvent>) {
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let (speak_tx, speak_rx) = mpsc::channel(SPEAK_QUEUE);
        let generation = Arc::new(AtomicU64::new(0));
        let cancel = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        tokio::spawn(speaker(
            speech.tts.clone(),
            speak_rx,
            player,
            generation.clone(),
            cancel.clone(),
            ev_tx.clone(),
        ));
        let decoder = match OpusDecoderPcm::new(STT_RATE_HZ) {
            Ok(d) => Some(std::sync::Mutex::new(d)),
            Err(e) => {
                tracing::error!(error = %e, "no Opus decoder for speech-to-text");
                None
            }
        };
        (
            VoiceBridge {
                speech,
                renderer: Renderer::new(render),
                events: ev_tx,
                turn: None,
                decoder,
                pcm: vec![0; crate::dsp::codec::MAX_DECODED_SAMPLES],
                speak: speak_tx,
                generation,
                cancel,
                cancelled: Vec::new(),
                turns: 0,
                pending: Vec::new(),
                merge_into: None,
                held: Vec::new(),
                current: None,
                answers: 0,
                first_text: None,
                stats: VoiceStats::default(),
            },
            ev_rx,
        )
    }

    /// An uplink item from the service. Returns it back when the link should handle it (text,
    /// interrupts); the turn's audio is consumed here.
    pub fn uplink(&mut self, up: Uplink) -> Option<Uplink> {
        match up {
            Uplink::TurnStart => {
                self.start_turn();
                None
            }
            Uplink::Audio { data, .. } => {
                self.audio(&data);
                None
            }
            Uplink::TurnEnd { .. } => {
                // Dropping the sender ends the STT call's audio.
                if let Some((_, kept)) = self.turn.take()
                    && let Ok(mut k) = kept.lock()
                {
                    k.1 = true;
                }
                None
            }
            Uplink::Interrupt => {
                // The turn the user is saying now (or begins right after this: the turn machine
                // interrupts an awaited answer as the next turn starts). Earlier turns still being
                // transcribed were not sent: their words join it instead of being answered alone
                // after the answer they were waiting for was cancelled.
                let next = if self.turn.is_some() {
                    self.turns
                } else {
                    self.turns + 1
                };
                if self.merge_into.is_none() && self.pending.iter().any(|&t| t < next) {
                    tracing::info!(
                        turn = next,
                        "the user went on before the last words were transcribed; they join this turn"
                    );
                    self.merge_into = Some(next);
                }
                self.interrupt();
                Some(Uplink::Interrupt)
            }
            other => Some(other),
        }
    }

    fn start_turn(&mut self) {
        if let Some(Ok(mut d)) = self.decoder.as_ref().map(|d| d.lock()) {
            d.reset();
        }
        if let Some((_, old)) = self.turn.take()
            && let Ok(mut k) = old.lock()
        {
            k.1 = true; // a turn that never got its end: what it has is all it gets
        }
        let (tx, rx) = mpsc::channel(STT_CHUNKS);
        let kept = Arc::new(std::sync::Mutex::new((Vec::new(), false)));
        self.turn = Some((tx, kept.clone()));
        let stt = self.speech.stt.clone();
        let events = self.events.clone();
        self.turns += 1;
        self.pending.push(self.turns);
        tokio::spawn(transcribe(stt, rx, kept, events, self.turns));
    }

    /// A turn's transcript is in (`None`: it gave no text): what to do with it. Transcripts that
    /// join a later turn are held until that turn's, and every turn before it, is in.
    pub fn turn_result(&mut self, turn: u64, said: Option<String>) -> TurnText {
        self.pending.retain(|&t| t != turn);
        let Some(m) = self.merge_into.filter(|&m| turn <= m) else {
            return match said {
                Some(s) => TurnText::Send(s),
                None => TurnText::NotUnderstood,
            };
        };
        self.held.push((turn, said));
        let all_in =
            self.held.iter().any(|(t, _)| *t == m) && !self.pending.iter().any(|&t| t <= m);
        if !all_in {
            return TurnText::Held;
        }
        self.merge_into = None;
        let mut held = std::mem::take(&mut self.held);
        held.sort_by_key(|(t, _)| *t);
        let words: Vec<String> = held.into_iter().filter_map(|(_, s)| s).collect();
        if words.is_empty() {
            TurnText::NotUnderstood
        } else {
            TurnText::Send(words.join(" "))
        }
    }

    fn audio(&mut self, packet: &[u8]) {
        let (Some((tx, kept)), Some(dec)) = (&self.turn, &self.decoder) else {
            return;
        };
        let Ok(mut dec) = dec.lock() else {
            return;
        };
        match dec.decode(packet, &mut self.pcm) {
            Ok(n) => {
                let chunk = self.pcm[..n].to_vec();
                if let Ok(mut k) = kept.lock() {
                    k.0.extend_from_slice(&chunk);
                }
                // The STT call may lag; the kept copy still has every sample for a retry.
                let _ = tx.try_send(chunk);
            }
            Err(e) => tracing::debug!(error = %e, "undecodable uplink packet skipped"),
        }
    }

    /// The user's words for the agent: the answer to a pending question, else the transcript.
    pub fn answer(&mut self, said: &str) -> String {
        let a = self.renderer.answer(said);
        if a.component.is_some() {
            tracing::info!(%said, answer = %a.text, "the user answered the agent's question");
        }
        a.text
    }

    /// An agent event. Returns it when the link should pass it on now; the end of an answer is held
    /// until its speech is queued ([`VoiceEvent::Finished`]), and late events of a cancelled answer are
    /// dropped.
    pub fn downlink(&mut self, d: Downlink) -> Option<Downlink> {
        let id = match &d {
            Downlink::ResponseStarted { id } | Downlink::ResponseFinished { id, .. } => {
                Some(id.clone())
            }
            Downlink::TextDelta { message_id, .. } | Downlink::TextDone { message_id } => {
                Some(message_id.clone())
            }
            _ => None,
        };
        if let Some(id) = &id
            && self.cancelled.contains(id)
        {
            self.stats.late_events_dropped += 1;
            return None;
        }
        if let Downlink::ResponseStarted { id } = &d {
            if self.current.as_ref() == Some(id) {
                // The same answer again (a resumed session replays its start): it goes on.
                return Some(d);
            }
            self.renderer.reset();
            self.current = Some(id.clone());
            self.answers += 1;
            self.first_text = None;
        }
        if matches!(
            d,
            Downlink::TextDelta { .. } | Downlink::Render { .. } | Downlink::Patch { .. }
        ) && self.first_text.is_none()
        {
            self.first_text = Some(Instant::now());
        }
        let sentences = match &d {
            Downlink::Render { component, .. } => {
                // Text before the component is complete: spoken first, and not part of it.
                let mut said = self.renderer.finish();
                let shown = self.renderer.component(component);
                let kind = component
                    .get("type")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                let _ = self.events.try_send(VoiceEvent::ComponentSpoken {
                    kind,
                    text: shown.join(" "),
                });
                said.extend(shown);
                said
            }
            _ => self.renderer.on_downlink(&d),
        };
        let generation = self.generation.load(Ordering::Relaxed);
        let since = self.first_text.unwrap_or_else(Instant::now);
        for text in sentences {
            self.queue(SpeakItem::Sentence {
                text,
                generation,
                answer: self.answers,
                since,
            });
        }
        match d {
            Downlink::ResponseFinished { id, status } => {
                self.current = None;
                self.queue(SpeakItem::Finish {
                    id,
                    status,
                    generation,
                });
                None
            }
            other => Some(other),
        }
    }

    fn queue(&mut self, item: SpeakItem) {
        if let SpeakItem::Sentence { text, .. } = &item {
            tracing::debug!(%text, "to speech");
            self.stats.sentences_spoken += 1;
        }
        match self.speak.try_send(item) {
            Ok(()) => {}
            // The end of an answer is never lost (the turn machine waits for it): with the queue
            // full it is reported at once.
            Err(mpsc::error::TrySendError::Full(SpeakItem::Finish { id, status, .. }))
            | Err(mpsc::error::TrySendError::Closed(SpeakItem::Finish { id, status, .. })) => {
                let _ = self.events.try_send(VoiceEvent::Finished { id, status });
            }
            Err(_) => {
                self.stats.sentences_dropped += 1;
                tracing::warn!("speech queue full; a sentence was dropped");
            }
        }
    }

    /// Barge-in: stop speaking now, forget this answer.
    pub fn interrupt(&mut self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.cancel.lock() {
            c.cancel();
            *c = CancellationToken::new();
        }
        if let Some(id) = self.current.take() {
            self.cancelled.push(id);
            if self.cancelled.len() > 16 {
                self.cancelled.remove(0);
            }
        }
        self.renderer.reset();
    }

    /// The connection was lost: an answer in progress will not finish.
    pub fn connection_lost(&mut self) {
        if self.current.is_some() {
            self.interrupt();
        }
    }
}

async fn transcribe(
    stt: Arc<dyn SpeechToText>,
    audio: mpsc::Receiver<Vec<i16>>,
    kept: KeptAudio,
    events: mpsc::Sender<VoiceEvent>,
    turn: u64,
) {
    let started = Instant::now();
    let mut result = stt
        .transcribe(STT_RATE_HZ, audio, CancellationToken::new())
        .await;
    let mut tries = 0;
    while let Err(SpeechError::Unavailable { .. } | SpeechError::Timeout { .. }) = &result {
        if tries == STT_RETRIES {
            break;
        }
        tries += 1;
        tracing::warn!(error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
            attempt = tries + 1, "speech-to-text failed; trying again with the kept audio");
        tokio::time::sleep(STT_RETRY_PAUSE).await;
        // A call that failed early (the service refused at the turn's start) is retried with the
        // whole turn: wait for its end first (bounded, as the turn itself is).
        let waited = std::time::Instant::now();
        while !kept.lock().map(|k| k.1).unwrap_or(true)
            && waited.elapsed() < Duration::from_secs(MAX_TURN_WAIT_S)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let samples = kept.lock().map(|k| k.0.clone()).unwrap_or_default();
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(samples);
        drop(tx);
        result = stt
            .transcribe(STT_RATE_HZ, rx, CancellationToken::new())
            .await;
    }
    let ms = started.elapsed().as_millis() as u64;
    let ev = match result {
        Ok(t) if !t.text.trim().is_empty() => {
            tracing::info!(text = %t.text, ms, "speech-to-text");
            VoiceEvent::Transcript {
                said: t.text.trim().to_string(),
                text: String::new(),
                turn,
            }
        }
        Ok(_) => VoiceEvent::NotUnderstood {
            reason: "nothing recognisable was said".into(),
            turn,
        },
        Err(e) => {
            tracing::error!(error = %e, "speech-to-text failed; the turn is lost");
            VoiceEvent::NotUnderstood {
                reason: e.to_string(),
                turn,
            }
        }
    };
    let _ = events.send(ev).await;
}

/// Synthesizes queued sentences in order and hands their audio to the DSP worker.
async fn speaker(
    tts: Arc<dyn TextToSpeech>,
    mut queue: mpsc::Receiver<SpeakItem>,
    player: Player,
    generation: Arc<AtomicU64>,
    cancel: Arc<std::sync::Mutex<CancellationToken>>,
    events: mpsc::Sender<VoiceEvent>,
) {
    // The last answer whose first audio was reported.
    let mut reported: Option<u64> = None;
    while let Some(item) = queue.recv().await {
        let current = generation.load(Ordering::Relaxed);
        match item {
            SpeakItem::Finish {
                id,
                status,
                generation: g,
            } => {
                if g == current {
                    let _ = events.send(VoiceEvent::Finished { id, status }).await;
                }
            }
            SpeakItem::Sentence {
                text,
                generation: g,
                answer,
                since,
            } => {
                if g != current {
                    continue; // queued before a barge-in
                }
                let token = cancel.lock().map(|c| c.clone()).unwrap_or_default();
                let (tx, mut rx) = mpsc::channel::<Pcm>(16);
                let synth = tts.synthesize(&text, tx, token.clone());
                tokio::pin!(synth);
                let mut done = false;
                loop {
                    tokio::select! {
                        r = &mut synth, if !done => {
                            done = true;
                            match r {
                                Ok(_) | Err(SpeechError::Cancelled) => {}
                                Err(e) => tracing::error!(error = %e, %text, "text-to-speech failed; sentence skipped"),
                            }
                        }
                        chunk = rx.recv() => {
                            let Some(pcm) = chunk else { break };
                            if token.is_cancelled() || generation.load(Ordering::Relaxed) != g {
                                continue;
                            }
                            let item = PlaybackItem {
                                generation: player.flush.current(),
                                audio: DownlinkAudio::Mono {
                                    rate_hz: pcm.rate_hz,
                                    samples: pcm.samples.iter().map(|&s| s as f32 / 32768.0).collect(),
                                },
                            };
                            if player.audio.send(item).await.is_err() {
                                return;
                            }
                            if reported != Some(answer) {
                                reported = Some(answer);
                                let _ = events.try_send(VoiceEvent::FirstAudio {
                                    after_first_text: since.elapsed(),
                                });
                            }
                        }
                    }
                }
            }
        }
    }
}
