//! The DSP worker with stand-in devices: a missing device is retried until it appears, a device that
//! fails mid-run is reopened, and a flush silences playback within a period and drops stale audio.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearken::audio::file::{MemoryPlayback, Pacing};
use hearken::audio::{
    Capture, CaptureWriter, DeviceError, DeviceFactory, DeviceStatus, Playback, RunningStream,
    StreamFormat,
};
use hearken::config::Config;
use hearken::dsp::downlink::DownlinkAudio;
use hearken::dsp::worker::{self, WorkerEvent, WorkerSettings};

const FMT: StreamFormat = StreamFormat {
    rate_hz: 16_000,
    channels: 1,
};

/// A microphone that delivers silence every 10 ms and can be "unplugged".
struct FakeMic {
    unplug: Arc<AtomicBool>,
}

struct MicThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}
impl RunningStream for MicThread {}
impl Drop for MicThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Capture for FakeMic {
    fn format(&self) -> StreamFormat {
        FMT
    }
    fn describe(&self) -> String {
        "fake mic".into()
    }
    fn start(
        self: Box<Self>,
        mut writer: CaptureWriter,
        status: Arc<DeviceStatus>,
    ) -> Result<Box<dyn RunningStream>, DeviceError> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let unplug = self.unplug.clone();
        let handle = std::thread::spawn(move || {
            let buf = [0.0f32; 160];
            while !s.load(Ordering::Acquire) {
                if unplug.swap(false, Ordering::AcqRel) {
                    status.failed.store(true, Ordering::Release);
                    return;
                }
                writer.push(&buf);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Ok(Box::new(MicThread {
            stop,
            handle: Some(handle),
        }))
    }
}

/// Fails to open the mic `missing` times, then works; counts the opens.
struct FlakyDevices {
    missing: usize,
    opens: Arc<AtomicUsize>,
    unplug: Arc<AtomicBool>,
    speaker: Arc<Mutex<Vec<f32>>>,
}

impl DeviceFactory for FlakyDevices {
    fn open_capture(&mut self) -> Result<Box<dyn Capture>, DeviceError> {
        let n = self.opens.fetch_add(1, Ordering::AcqRel);
        if n < self.missing {
            return Err(DeviceError::NotFound {
                kind: "input",
                wanted: "usb mic".into(),
            });
        }
        Ok(Box::new(FakeMic {
            unplug: self.unplug.clone(),
        }))
    }
    fn open_playback(&mut self) -> Result<Box<dyn Playback>, DeviceError> {
        Ok(Box::new(MemoryPlayback::create(
            self.speaker.clone(),
            FMT,
            Pacing::Realtime,
        )))
    }
}

fn settings() -> WorkerSettings {
    WorkerSettings {
        config: Config::from_toml_str("", "test", &["audio.device_retry_ms=100".into()])
            .expect("config"),
        earcons: None,
        fast: false,
    }
}

/// Next event matching `pred`, within `secs`.
fn wait_for(
    h: &mut worker::WorkerHandle,
    secs: u64,
    mut pred: impl FnMut(&WorkerEvent) -> bool,
) -> Option<WorkerEvent> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        match h.events.try_recv() {
            Ok(e) if pred(&e) => return Some(e),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    None
}

#[test]
fn a_missing_device_is_retried_and_an_unplugged_one_reopened() {
    let opens = Arc::new(AtomicUsize::new(0));
    let unplug = Arc::new(AtomicBool::new(false));
    let devices = FlakyDevices {
        missing: 2,
        opens: opens.clone(),
        unplug: unplug.clone(),
        speaker: Arc::new(Mutex::new(Vec::new())),
    };
    let mut h = worker::spawn(settings(), Box::new(devices)).expect("spawn");
    let mut errors = 0;
    let opened = wait_for(&mut h, 5, |e| {
        if let WorkerEvent::DeviceError { message, retry_ms } = e {
            assert!(message.contains("usb mic"), "{message}");
            assert_eq!(*retry_ms, 100);
            errors += 1;
        }
        matches!(e, WorkerEvent::DevicesOpened { .. })
    });
    assert!(opened.is_some(), "device never opened");
    assert_eq!(errors, 2);
    assert_eq!(opens.load(Ordering::Acquire), 3);
    // Time flows while it runs; then the mic is unplugged and comes back.
    let before = h.heartbeat.load(Ordering::Relaxed);
    assert!(
        wait_for(
            &mut h,
            2,
            |e| matches!(e, WorkerEvent::Tick { at_ms } if *at_ms >= 100)
        )
        .is_some()
    );
    assert!(h.heartbeat.load(Ordering::Relaxed) > before);
    unplug.store(true, Ordering::Release);
    let err = wait_for(&mut h, 2, |e| matches!(e, WorkerEvent::DeviceError { .. }));
    assert!(
        matches!(&err, Some(WorkerEvent::DeviceError { message, .. }) if message.contains("input device failed")),
        "{err:?}"
    );
    assert!(
        wait_for(&mut h, 2, |e| matches!(
            e,
            WorkerEvent::DevicesOpened { .. }
        ))
        .is_some()
    );
    assert_eq!(opens.load(Ordering::Acquire), 4);
    assert_eq!(h.stats.device_reopens.load(Ordering::Relaxed), 1);
    h.shutdown();
}

#[test]
fn flush_silences_playback_and_drops_stale_audio() {
    let speaker = Arc::new(Mutex::new(Vec::new()));
    let devices = FlakyDevices {
        missing: 0,
        opens: Arc::new(AtomicUsize::new(0)),
        unplug: Arc::new(AtomicBool::new(false)),
        speaker: speaker.clone(),
    };
    let mut h = worker::spawn(settings(), Box::new(devices)).expect("spawn");
    assert!(
        wait_for(&mut h, 2, |e| matches!(
            e,
            WorkerEvent::DevicesOpened { .. }
        ))
        .is_some()
    );
    // Two seconds of a loud tone for the speaker.
    let tone: Vec<f32> = (0..32_000).map(|i| 0.5 * (i as f32 * 0.1).sin()).collect();
    let item = h.playback_item(DownlinkAudio::Mono {
        rate_hz: 16_000,
        samples: tone.clone(),
    });
    h.audio.try_send(item).expect("send");
    assert!(
        wait_for(&mut h, 2, |e| matches!(
            e,
            WorkerEvent::PlaybackStarted { .. }
        ))
        .is_some()
    );
    std::thread::sleep(Duration::from_millis(300));
    // Audio queued before the flush but not yet taken by the worker is stale too.
    let stale = h.playback_item(DownlinkAudio::Mono {
        rate_hz: 16_000,
        samples: tone,
    });
    let request = h.flush.request();
    h.audio.try_send(stale).expect("send");
    // The flush is acknowledged and playback goes idle; the two may be reported in either order
    // (the callback empties the ring a moment before it stores its acknowledgement).
    let mut idle = false;
    let flushed = wait_for(&mut h, 2, |e| {
        idle |= matches!(e, WorkerEvent::PlaybackIdle { .. });
        matches!(e, WorkerEvent::Flushed { .. })
    });
    let Some(WorkerEvent::Flushed {
        request: acked,
        output_ms,
        ..
    }) = flushed
    else {
        panic!("no flush: {flushed:?}")
    };
    assert_eq!(acked, request);
    assert!(
        idle || wait_for(&mut h, 2, |e| matches!(e, WorkerEvent::PlaybackIdle { .. })).is_some()
    );
    std::thread::sleep(Duration::from_millis(200));
    h.shutdown();
    let out = speaker.lock().expect("lock").clone();
    let at = (output_ms * 16) as usize;
    // Loud up to the flush, a fade of at most 10 ms, then nothing.
    assert!(
        out[at.saturating_sub(160)..at]
            .iter()
            .any(|s| s.abs() > 0.3)
    );
    let tail = &out[at + 160..];
    assert!(tail.len() > 1600, "speaker ran on after the flush");
    assert!(tail.iter().all(|s| *s == 0.0), "audio after the flush");
    assert_eq!(h.stats.stale_audio_dropped.load(Ordering::Relaxed), 1);
}
