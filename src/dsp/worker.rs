//! The DSP worker: one `std::thread` that owns the audio devices, the rings, the VAD (`!Send`), the
//! resamplers and the Opus state. Every 10 ms it drains the capture ring through the uplink pipeline,
//! turns agent audio and earcons into device samples for the playback ring, watches the flush
//! handshake and the devices' health, and reports to tokio through a bounded channel.
//!
//! Channels (all bounded):
//! - events to tokio: live devices use `try_send` and count what is dropped (the worker never blocks on
//!   tokio); file devices in fast mode wait instead, because nothing real-time is at stake there;
//! - control from tokio (stop stream, earcon, shutdown): drained every tick;
//! - playback audio from tokio: read only while the local queue has room, so a fast agent is slowed
//!   down by back-pressure instead of filling memory.
//!
//! A device that fails (unplugged USB mic) is closed and reopened every `device_retry_ms` until it works.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::audio::earcon::{Earcon, Earcons};
use crate::audio::rt::{FarEndTap, FlushHandle, capture_ring, playback_ring};
use crate::audio::{DeviceFactory, DeviceStatus, RtCounters, RunningStream, StreamFormat};
use crate::config::Config;

use super::downlink::{Downlink, DownlinkAudio};
use super::resample::MonoResampler;
use super::uplink::{Uplink, UplinkEvent, UplinkSettings};
use super::vad::{self, samples_to_ms};

/// Worker tick.
pub const TICK_MS: u64 = 10;
/// Worker tick while a turn's audio is being streamed.
pub const STREAMING_TICK_MS: u64 = 2;

/// What the echo canceller and the barge-in gate have done so far (since the devices opened).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct EchoReport {
    /// Mic energy / cancelled energy over the frames with the device's voice playing, dB.
    pub erle_db: Option<f64>,
    /// AEC3's own ERLE estimate and its speaker-to-mic delay estimate.
    pub aec3_erle_db: Option<f64>,
    pub delay_ms: Option<i32>,
    /// 10 ms frames with the device's voice playing, and of those, the ones the gate kept from the VAD.
    pub far_frames: u64,
    pub gated_frames: u64,
}

/// Commands from the service.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// The turn is over: stop sending Opus frames until speech starts again.
    StopStream,
    /// Play an earcon after whatever is queued.
    Earcon(Earcon),
    /// Close the devices and end the thread.
    Shutdown,
}

/// Audio for the speaker, tagged with the flush generation it was sent in: audio sent before a flush
/// is stale and dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaybackItem {
    pub generation: u64,
    pub audio: DownlinkAudio,
}

/// One encoded uplink frame.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFrame {
    /// Counts frames since the worker started (1-based).
    pub seq: u64,
    /// Audio clock (ms since capture started) where the frame's audio starts.
    pub at_ms: u64,
    pub duration_ms: u32,
    pub packet: Vec<u8>,
    /// Wall time the worker encoded it (for latency figures).
    pub encoded_at: Instant,
    /// Encoded as its last sample arrived; false for pre-roll frames sent in a burst at speech start.
    pub live: bool,
}

/// What the worker tells the service. `at_ms` is the audio clock: milliseconds of input processed.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    DevicesOpened {
        input: String,
        output: String,
        input_format: StreamFormat,
        output_format: StreamFormat,
        vad: &'static str,
        /// When capture started, and the audio clock (ms) it started at: positions go on across
        /// reopenings, so `started_at - clock_ms` is audio clock 0 (for latency figures).
        started_at: Instant,
        clock_ms: u64,
    },
    DeviceError {
        message: String,
        retry_ms: u32,
    },
    SpeechStart {
        at_ms: u64,
    },
    SpeechEnd {
        at_ms: u64,
    },
    Frame(AudioFrame),
    /// The stream hit its safety cap without being stopped.
    StreamCapped {
        at_ms: u64,
    },
    PlaybackStarted {
        at_ms: u64,
    },
    /// Everything queued has been played.
    PlaybackIdle {
        at_ms: u64,
    },
    /// The output callback completed a flush; `output_ms` is where in the output stream it faded.
    Flushed {
        request: u64,
        output_ms: u64,
        at_ms: u64,
    },
    /// A file input ended (live devices never end).
    InputEnded {
        at_ms: u64,
    },
    /// Time advanced (sent every tick so the turn machine's deadlines fire).
    Tick {
        at_ms: u64,
    },
    /// Echo cancellation figures, once a second while it runs.
    Echo(EchoReport),
}

/// Counters of the worker itself.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub frames_encoded: AtomicU64,
    pub events_dropped: AtomicU64,
    pub decode_errors: AtomicU64,
    pub stale_audio_dropped: AtomicU64,
    pub device_reopens: AtomicU64,
}

pub struct WorkerSettings {
    pub config: Config,
    pub earcons: Option<Earcons>,
    /// File devices in fast mode: never sleep while there is input, wait on a full event channel.
    pub fast: bool,
}

/// The service's side of the worker.
pub struct WorkerHandle {
    pub events: mpsc::Receiver<WorkerEvent>,
    pub control: mpsc::Sender<Control>,
    pub audio: mpsc::Sender<PlaybackItem>,
    pub flush: FlushHandle,
    pub counters: Arc<RtCounters>,
    pub stats: Arc<WorkerStats>,
    /// Bumped every tick; the systemd watchdog is pinged only while it advances.
    pub heartbeat: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Tell the worker to stop and wait for it (devices closed, output files finished).
    pub fn shutdown(&mut self) {
        let _ = self.control.try_send(Control::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Audio tagged with the current flush generation.
    pub fn playback_item(&self, audio: DownlinkAudio) -> PlaybackItem {
        PlaybackItem {
            generation: self.flush.current(),
            audio,
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Start the worker thread.
pub fn spawn(
    settings: WorkerSettings,
    devices: Box<dyn DeviceFactory>,
) -> std::io::Result<WorkerHandle> {
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let (ctl_tx, ctl_rx) = mpsc::channel(64);
    let (audio_tx, audio_rx) = mpsc::channel(256);
    let flush = FlushHandle::default();
    let counters = Arc::new(RtCounters::default());
    let stats = Arc::new(WorkerStats::default());
    let heartbeat = Arc::new(AtomicU64::new(0));
    let mut worker = Worker {
        settings,
        devices,
        events: ev_tx,
        control: ctl_rx,
        audio: audio_rx,
        flush: flush.clone(),
        counters: counters.clone(),
        stats: stats.clone(),
        heartbeat: heartbeat.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("hearken-dsp".into())
        .spawn(move || worker.run())?;
    Ok(WorkerHandle {
        events: ev_rx,
        control: ctl_tx,
        audio: audio_tx,
        flush,
        counters,
        stats,
        heartbeat,
        thread: Some(thread),
    })
}

struct Worker {
    settings: WorkerSettings,
    devices: Box<dyn DeviceFactory>,
    events: mpsc::Sender<WorkerEvent>,
    control: mpsc::Receiver<Control>,
    audio: mpsc::Receiver<PlaybackItem>,
    flush: FlushHandle,
    counters: Arc<RtCounters>,
    stats: Arc<WorkerStats>,
    heartbeat: Arc<AtomicU64>,
}

/// Everything that lives as long as one pair of open devices.
struct Session {
    _input: Box<dyn RunningStream>,
    _output: Box<dyn RunningStream>,
    in_status: Arc<DeviceStatus>,
    out_status: Arc<DeviceStatus>,
    capture: rtrb::Consumer<f32>,
    uplink_events: Vec<OwnedUplinkEvent>,
    in_format: StreamFormat,
    writer: crate::audio::PlaybackWriter,
    uplink: Uplink,
    downlink: Downlink,
    scratch: Vec<f32>,
    pending: VecDeque<f32>,
    pending_cap: usize,
    playing: bool,
    last_flush_seen: u64,
    input_ended: bool,
    /// What the speaker played, for the echo canceller (when it runs).
    far: Option<FarEnd>,
    #[cfg(feature = "aec")]
    next_echo_report_ms: u64,
}

/// The far-end tap, mixed to mono and resampled to 16 kHz for the uplink's echo canceller.
struct FarEnd {
    tap: FarEndTap,
    raw: Vec<f32>,
    to16: MonoResampler,
}

impl FarEnd {
    fn new(tap: FarEndTap, rate_hz: u32) -> Result<Self, super::DspError> {
        Ok(FarEnd {
            raw: vec![0.0; 4096 * tap.channels.max(1)],
            to16: MonoResampler::new(rate_hz, super::codec::UPLINK_RATE_HZ, 4096)?,
            tap,
        })
    }

    /// Everything played since the last call, at 16 kHz, into `uplink`.
    fn drain_into(&mut self, uplink: &mut Uplink) {
        let ch = self.tap.channels.max(1);
        loop {
            let avail = self.tap.consumer.slots().min(self.raw.len());
            let n = avail - avail % ch;
            if n == 0 {
                return;
            }
            let (got, _) = self.tap.consumer.pop_partial_slice(&mut self.raw[..n]);
            let got = got.len();
            uplink.render(self.to16.process(&self.raw[..got], ch));
        }
    }
}

enum Exit {
    Shutdown,
    DeviceFailed(String),
}

impl Worker {
    fn run(&mut self) {
        let retry = self.settings.config.audio.device_retry_ms;
        // Audio clock offset: positions continue across device reopenings.
        let mut clock_ms = 0u64;
        loop {
            if self.shutdown_requested() {
                return;
            }
            match self.open(clock_ms) {
                Ok(mut session) => match self.serve(&mut session, clock_ms) {
                    Exit::Shutdown => return,
                    Exit::DeviceFailed(message) => {
                        clock_ms += samples_to_ms(session.uplink.position());
                        self.stats.device_reopens.fetch_add(1, Ordering::Relaxed);
                        self.send(WorkerEvent::DeviceError {
                            message,
                            retry_ms: retry,
                        });
                    }
                },
                Err(message) => {
                    let transient = message.1;
                    self.send(WorkerEvent::DeviceError {
                        message: message.0,
                        retry_ms: retry,
                    });
                    if !transient {
                        // A file that cannot be read will not get better: report it and stop.
                        return;
                    }
                }
            }
            // Wait before retrying, still answering shutdown.
            let until = Instant::now() + Duration::from_millis(retry as u64);
            while Instant::now() < until {
                if self.shutdown_requested() {
                    return;
                }
                self.heartbeat.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(TICK_MS));
            }
        }
    }

    fn shutdown_requested(&mut self) -> bool {
        loop {
            match self.control.try_recv() {
                Ok(Control::Shutdown) => return true,
                Ok(_) => continue, // nothing to stop or play without devices
                Err(mpsc::error::TryRecvError::Empty) => return false,
                Err(mpsc::error::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn open(&mut self, clock_ms: u64) -> Result<Session, (String, bool)> {
        let cfg = self.settings.config.clone();
        let err = |e: crate::audio::DeviceError| (e.to_string(), e.is_transient());
        let capture = self.devices.open_capture().map_err(err)?;
        let playback = self.devices.open_playback().map_err(err)?;
        let in_fmt = capture.format();
        let out_fmt = playback.format();
        let (in_name, out_name) = (capture.describe(), playback.describe());
        let in_ch = in_fmt.channels as usize;
        let out_ch = out_fmt.channels as usize;
        let cap_samples =
            in_fmt.rate_hz as usize * cfg.audio.capture_ring_ms as usize / 1000 * in_ch;
        let play_samples =
            out_fmt.rate_hz as usize * cfg.audio.playback_ring_ms as usize / 1000 * out_ch;
        let fade = (out_fmt.rate_hz as usize * 5 / 1000).max(1) * out_ch; // 5 ms
        let (cap_writer, capture_rx) = capture_ring(cap_samples, in_ch, self.counters.clone());
        let (writer, reader) = playback_ring(
            play_samples,
            out_ch,
            fade,
            self.counters.clone(),
            &self.flush,
        );
        let (reader, far) = if cfg.aec_active() {
            let (reader, tap) = reader.with_far_tap(play_samples);
            let far = FarEnd::new(tap, out_fmt.rate_hz).map_err(|e| (e.to_string(), false))?;
            (reader, Some(far))
        } else {
            (reader, None)
        };
        let uplink = Uplink::new(
            &UplinkSettings {
                input: in_fmt,
                channel: cfg.audio.input_channel,
                vad: cfg.vad.clone(),
                opus: cfg.opus.clone(),
                preroll_ms: cfg.turn.preroll_ms,
                max_stream_ms: cfg.turn.max_utterance_ms + 2_000,
                aec: cfg.aec_active().then(|| cfg.aec.clone()),
            },
            vad::engine(&cfg.vad),
        )
        .map_err(|e| (e.to_string(), false))?;
        let downlink =
            Downlink::new(out_fmt, cfg.audio.volume).map_err(|e| (e.to_string(), false))?;
        let in_status = Arc::new(DeviceStatus::default());
        let out_status = Arc::new(DeviceStatus::default());
        let output = playback.start(reader, out_status.clone()).map_err(err)?;
        let started_at = Instant::now();
        let input = capture.start(cap_writer, in_status.clone()).map_err(err)?;
        let vad_name = uplink.vad_name();
        self.send(WorkerEvent::DevicesOpened {
            input: in_name,
            output: out_name,
            input_format: in_fmt,
            output_format: out_fmt,
            vad: vad_name,
            started_at,
            clock_ms,
        });
        // Two seconds of output queued at most in the worker, on top of the ring.
        let pending_cap = out_fmt.rate_hz as usize * 2 * out_ch;
        Ok(Session {
            _input: input,
            _output: output,
            in_status,
            out_status,
            capture: capture_rx,
            uplink_events: Vec::with_capacity(64),
            in_format: in_fmt,
            writer,
            uplink,
            downlink,
            scratch: vec![0.0; 4096 * in_ch],
            pending: VecDeque::with_capacity(pending_cap),
            pending_cap,
            playing: false,
            last_flush_seen: self.flush.current(),
            input_ended: false,
            far,
            #[cfg(feature = "aec")]
            next_echo_report_ms: 1_000,
        })
    }

    fn serve(&mut self, s: &mut Session, clock_ms: u64) -> Exit {
        let fast = self.settings.fast;
        let mut next_tick = Instant::now();
        loop {
            self.heartbeat.fetch_add(1, Ordering::Relaxed);
            // 1. Commands.
            loop {
                match self.control.try_recv() {
                    Ok(Control::Shutdown) | Err(mpsc::error::TryRecvError::Disconnected) => {
                        return Exit::Shutdown;
                    }
                    Ok(Control::StopStream) => s.uplink.stop_stream(),
                    Ok(Control::Earcon(e)) => {
                        if let Some(earcons) = &self.settings.earcons {
                            let sound = earcons.get(e);
                            let Session {
                                downlink, pending, ..
                            } = s;
                            let _ = downlink.push_mono(sound.rate_hz, &sound.samples, &mut |x| {
                                pending.extend(x)
                            });
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
            // 2. Flush: drop what the worker still holds; the callback drops what the ring holds.
            if s.writer.poll_flush() {
                s.pending.clear();
                s.downlink.reset();
            }
            let (acked, at_frame) = s.writer.shared().last_flush();
            if acked != s.last_flush_seen {
                s.last_flush_seen = acked;
                let out_rate = s.downlink.format().rate_hz as u64;
                let at_ms = clock_ms + samples_to_ms(s.uplink.position());
                self.send(WorkerEvent::Flushed {
                    request: acked,
                    // On the audio clock, like the onset it is compared with (the output stream
                    // restarts at 0 with each pair of devices, as the input does).
                    output_ms: clock_ms + at_frame * 1000 / out_rate.max(1),
                    at_ms,
                });
            }
            // 3. Capture -> uplink. Live: drain everything (catch up after a stall). Fast: 10 ms
            // per tick, so the audio clock advances in ticks as on a live device.
            let mut consumed = 0;
            let in_ch = s.in_format.channels as usize;
            let limit = if fast {
                (s.in_format.rate_hz as usize / 100) * in_ch
            } else {
                s.scratch.len()
            };
            let mut events = std::mem::take(&mut s.uplink_events);
            // What played first, so the canceller has the far end before the mic audio it echoes in.
            if let Some(far) = &mut s.far {
                far.drain_into(&mut s.uplink);
            }
            loop {
                let avail = s.capture.slots().min(limit);
                let n = avail - avail % in_ch;
                if n == 0 {
                    break;
                }
                let (got, _) = s.capture.pop_partial_slice(&mut s.scratch[..n]);
                let got = got.len();
                consumed += got;
                s.uplink
                    .process(&s.scratch[..got], &mut |e| events.push(own(e)));
                for e in events.drain(..) {
                    self.forward(e, clock_ms);
                }
                if fast {
                    break;
                }
            }
            if !s.input_ended && s.in_status.is_finished() && s.capture.slots() == 0 {
                s.input_ended = true;
                s.uplink.finish(&mut |e| events.push(own(e)));
                for e in events.drain(..) {
                    self.forward(e, clock_ms);
                }
                let at_ms = clock_ms + samples_to_ms(s.uplink.position());
                self.send(WorkerEvent::InputEnded { at_ms });
            }
            s.uplink_events = events;
            // 4. Agent audio -> pending -> playback ring.
            let gen_now = self.flush.current();
            while s.pending.len() < s.pending_cap / 2 {
                match self.audio.try_recv() {
                    Ok(item) if item.generation < gen_now => {
                        self.stats
                            .stale_audio_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(item) => {
                        let Session {
                            downlink, pending, ..
                        } = s;
                        if downlink
                            .push(&item.audio, &mut |x| pending.extend(x))
                            .is_err()
                        {
                            self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("undecodable agent audio skipped");
                        }
                    }
                    Err(_) => break,
                }
            }
            while !s.pending.is_empty() && s.writer.space() > 0 {
                let (a, _) = s.pending.as_slices();
                let n = s.writer.write(a);
                s.pending.drain(..n);
                if n == 0 {
                    break;
                }
            }
            let at_ms = clock_ms + samples_to_ms(s.uplink.position());
            let queued = s.pending.len() as u64 + s.writer.shared().queued_samples();
            if queued > 0 && !s.playing {
                s.playing = true;
                self.send(WorkerEvent::PlaybackStarted { at_ms });
            } else if queued == 0 && s.playing {
                s.playing = false;
                self.send(WorkerEvent::PlaybackIdle { at_ms });
            }
            // 5. Device health.
            if s.in_status.is_failed() {
                return Exit::DeviceFailed("input device failed".into());
            }
            if s.out_status.is_failed() {
                return Exit::DeviceFailed("output device failed".into());
            }
            self.send(WorkerEvent::Tick { at_ms });
            #[cfg(feature = "aec")]
            if at_ms >= s.next_echo_report_ms
                && let Some(a) = s.uplink.aec_stats()
            {
                s.next_echo_report_ms = at_ms + 1_000;
                let g = s.uplink.gate_stats();
                self.send(WorkerEvent::Echo(EchoReport {
                    erle_db: g.erle_db(),
                    aec3_erle_db: a.erle_db,
                    delay_ms: a.delay_ms,
                    far_frames: g.far_frames,
                    gated_frames: g.gated_frames,
                }));
            }
            // 6. Sleep to the next tick (fast mode: only when there was nothing to do).
            if fast {
                if consumed == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            } else {
                // While a turn is streaming, poll every 2 ms so a finished Opus frame leaves within a
                // couple of ms of its last sample; otherwise the 10 ms tick (idle CPU on a Pi).
                let tick = if s.uplink.is_streaming() {
                    STREAMING_TICK_MS
                } else {
                    TICK_MS
                };
                next_tick += Duration::from_millis(tick);
                let now = Instant::now();
                if next_tick > now {
                    std::thread::sleep(next_tick - now);
                } else {
                    next_tick = now; // overloaded: do not try to catch up in a burst
                }
            }
        }
    }

    fn forward(&mut self, e: OwnedUplinkEvent, clock_ms: u64) {
        let ms = |at: u64| clock_ms + samples_to_ms(at);
        let ev = match e {
            OwnedUplinkEvent::SpeechStart(at) => WorkerEvent::SpeechStart { at_ms: ms(at) },
            OwnedUplinkEvent::SpeechEnd(at) => WorkerEvent::SpeechEnd { at_ms: ms(at) },
            OwnedUplinkEvent::Capped(at) => WorkerEvent::StreamCapped { at_ms: ms(at) },
            OwnedUplinkEvent::Frame {
                seq,
                at,
                samples,
                packet,
                live,
            } => {
                self.stats.frames_encoded.fetch_add(1, Ordering::Relaxed);
                WorkerEvent::Frame(AudioFrame {
                    seq,
                    at_ms: ms(at),
                    duration_ms: samples_to_ms(samples as u64) as u32,
                    packet,
                    encoded_at: Instant::now(),
                    live,
                })
            }
        };
        self.send(ev);
    }

    fn send(&self, ev: WorkerEvent) {
        if self.settings.fast {
            // Not real-time: wait for the service rather than lose anything.
            let _ = self.events.blocking_send(ev);
        } else if self.events.try_send(ev).is_err() {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An uplink event detached from the encoder's buffer so it can be sent.
enum OwnedUplinkEvent {
    SpeechStart(u64),
    SpeechEnd(u64),
    Capped(u64),
    Frame {
        seq: u64,
        at: u64,
        samples: usize,
        packet: Vec<u8>,
        live: bool,
    },
}

fn own(e: UplinkEvent<'_>) -> OwnedUplinkEvent {
    match e {
        UplinkEvent::SpeechStart { at } => OwnedUplinkEvent::SpeechStart(at),
        UplinkEvent::SpeechEnd { at } => OwnedUplinkEvent::SpeechEnd(at),
        UplinkEvent::StreamCapped { at } => OwnedUplinkEvent::Capped(at),
        UplinkEvent::Frame {
            seq,
            at,
            samples,
            packet,
            live,
        } => OwnedUplinkEvent::Frame {
            seq,
            at,
            samples,
            packet: packet.to_vec(),
            live,
        },
    }
}
