//! The real-time callback bodies must not allocate or free: they run on the audio threads, where a
//! trip into the allocator can block on a lock and cause an xrun.
//!
//! A counting global allocator records, per thread, every allocation and deallocation made while
//! that thread has armed it, so the other test threads of this binary cannot interfere. The test
//! then drives every `// RT-SAFE:` function through its paths (normal, underrun, flush fade, stale
//! discard, integer formats) many times and requires zero allocator calls.

// A `GlobalAlloc` impl is `unsafe` by definition and there is no safe way to hook the allocator.
// This test-only file is the one place that needs it; nothing here is reachable from the library.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;

use hearken::audio::cpal::{input_callback, output_callback};
use hearken::audio::rt::{FlushHandle, RtCounters, capture_ring, playback_ring};

thread_local! {
    // Const-initialised, no destructor: touching these never allocates, so they are usable from
    // inside the allocator itself.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static FREES: Cell<u64> = const { Cell::new(0) };
}

struct CountingAlloc;

fn note(counter: &'static std::thread::LocalKey<Cell<u64>>) {
    // `try_with`: the thread-locals may already be gone while a thread is being torn down.
    let armed = ARMED.try_with(Cell::get).unwrap_or(false);
    if armed {
        let _ = counter.try_with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: every method forwards to `System` unchanged; the bookkeeping only touches
// const-initialised thread-locals, which neither allocate nor re-enter the allocator.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(&ALLOCS);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(&ALLOCS);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(&FREES);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(&ALLOCS);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AllocCount {
    allocs: u64,
    frees: u64,
}

/// Run `f` with this thread's allocation counting armed; return what it counted.
fn count_allocs(f: impl FnOnce()) -> AllocCount {
    ALLOCS.with(|c| c.set(0));
    FREES.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    AllocCount {
        allocs: ALLOCS.with(Cell::get),
        frees: FREES.with(Cell::get),
    }
}

const NOTHING: AllocCount = AllocCount {
    allocs: 0,
    frees: 0,
};

const ROUNDS: usize = 1_000;

#[test]
fn the_guard_sees_allocations() {
    let counted = count_allocs(|| {
        let v: Vec<u8> = Vec::with_capacity(10);
        black_box(&v);
    });
    assert_eq!(
        counted,
        AllocCount {
            allocs: 1,
            frees: 1
        }
    );
    // Disarmed again: nothing is counted any more.
    let v: Vec<u8> = Vec::with_capacity(10);
    black_box(&v);
    assert_eq!(ALLOCS.with(Cell::get), 1);
}

#[test]
fn capture_path_does_not_allocate() {
    let counters = Arc::new(RtCounters::default());
    let channels = 2;
    let (mut writer, mut consumer) = capture_ring(4096, channels, counters.clone());
    let f32_in: Vec<f32> = (0..960).map(|i| (i as f32 / 960.0) - 0.5).collect();
    let i16_in: Vec<i16> = (0..960).map(|i| (i * 31) as i16).collect();
    let u8_in: Vec<u8> = (0..960).map(|i| i as u8).collect();
    let mut drain = vec![0.0f32; 4096];

    let counted = count_allocs(|| {
        for round in 0..ROUNDS {
            writer.push(&f32_in);
            writer.push_converted(&i16_in, |s| f32::from(s) / 32768.0);
            input_callback(&mut writer, &i16_in);
            input_callback(&mut writer, &f32_in);
            input_callback(&mut writer, &u8_in);
            // Leave the ring full every other round so the overflow (drop and count) path runs too.
            if round % 2 == 0 {
                let _ = consumer.pop_partial_slice(&mut drain);
            }
            writer.xrun();
        }
    });
    assert_eq!(counted, NOTHING);
    let s = counters.snapshot();
    assert!(s.captured_frames > 0 && s.capture_dropped > 0, "{s:?}");
    assert_eq!(s.xruns, ROUNDS as u64);
}

#[test]
fn playback_path_does_not_allocate() {
    let counters = Arc::new(RtCounters::default());
    let flush = FlushHandle::default();
    let channels = 2;
    let (mut writer, reader) = playback_ring(8192, channels, 480, counters.clone(), &flush);
    // With the far-end tap for the echo canceller: every played sample is copied out too.
    let (mut reader, mut tap) = reader.with_far_tap(4096);
    let mut far = vec![0.0f32; 4096];
    let mut far_seen = 0usize;
    let audio = vec![0.25f32; 960];
    let mut out = vec![0.0f32; 960];
    let mut out_i16 = vec![0i16; 960];
    // Smaller than the device buffer on purpose: the chunked conversion path runs as well.
    let mut scratch = vec![0.0f32; 256 * channels];

    let counted = count_allocs(|| {
        for round in 0..ROUNDS {
            // The worker drains the tap every other round: the tap both fits and overflows.
            if round % 2 == 0 {
                let (got, _) = tap.consumer.pop_partial_slice(&mut far);
                far_seen += got.len();
            }
            // Normal: a full period queued and played.
            writer.write(&audio);
            reader.render(&mut out);
            // Underrun: half a period queued.
            writer.write(&audio[..480]);
            reader.render(&mut out);
            // Idle silence.
            reader.render(&mut out);
            // Flush while audio is queued: fade and drop.
            writer.write(&audio);
            writer.write(&audio);
            flush.request();
            reader.render(&mut out);
            // Stale discard: the worker writes before it has seen the flush (all of it dropped)...
            writer.write(&audio);
            reader.render(&mut out);
            // ...then more stale audio, its acknowledgement (cut position) and fresh audio: the
            // callback drops up to the cut and plays the rest.
            writer.write(&audio);
            let _ = writer.poll_flush();
            writer.write(&audio);
            reader.render(&mut out);
            // The device-format callbacks.
            writer.write(&audio);
            output_callback(&mut reader, &mut scratch, &mut out);
            writer.write(&audio);
            output_callback(&mut reader, &mut scratch, &mut out_i16);
            writer.write(&audio[..100]);
            output_callback(&mut reader, &mut scratch, &mut out_i16);
            black_box((&out, &out_i16));
        }
    });
    assert_eq!(counted, NOTHING);
    let s = counters.snapshot();
    assert!(s.rendered_frames > 0, "{s:?}");
    assert!(s.underrun_frames > 0, "{s:?}");
    assert!(s.flushed_samples > 0, "{s:?}");
    assert!(far_seen > 0 && s.far_dropped > 0, "{far_seen} {s:?}");
}

/// Not a callback, but the DSP worker's 10 ms step (resampler, VAD, pre-roll, encoder) must not
/// allocate either: it runs every 10 ms for as long as the device is on. With echo cancellation,
/// `sonora`'s AEC3 block processor allocates inside (about 11 times per 4 ms block, all freed
/// within the step): the step then must not leak, and everything around AEC3 is the same code as
/// without it, except the barge-in gate, whose buffers are sized in `Uplink::new`.
#[test]
fn uplink_step_does_not_allocate() {
    use hearken::audio::earcon::decode_wav;
    use hearken::config::Config;
    use hearken::dsp::uplink::{Uplink, UplinkEvent, UplinkSettings};
    use hearken::dsp::vad;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("audio/echo");
    let read = |f: &str| {
        let bytes = std::fs::read(dir.join(f)).expect("mix");
        decode_wav(std::io::Cursor::new(bytes), f).expect("wav")
    };
    // The user talks over the device (at 2.2 s) in this committed mix.
    let (far, mic) = (read("barge_20ms_far.wav"), read("barge_20ms_mic.wav"));
    assert_eq!((far.rate_hz, mic.rate_hz), (16_000, 16_000));
    let config = Config::from_toml_str("", "test", &[]).expect("config");
    let uplink = |aec: bool| {
        Uplink::new(
            &UplinkSettings {
                input: hearken::audio::StreamFormat {
                    rate_hz: 16_000,
                    channels: 1,
                },
                channel: config.audio.input_channel,
                vad: config.vad.clone(),
                opus: config.opus.clone(),
                preroll_ms: config.turn.preroll_ms,
                max_stream_ms: 60_000,
                aec: aec.then(|| config.aec.clone()),
            },
            vad::engine(&config.vad),
        )
        .expect("uplink")
    };
    let run = |up: &mut Uplink, counted: bool| {
        let (mut starts, mut frames) = (0u32, 0u32);
        let mut on_event = |e: UplinkEvent<'_>| match e {
            UplinkEvent::SpeechStart { .. } => starts += 1,
            UplinkEvent::Frame { .. } => frames += 1,
            _ => {}
        };
        let n = far.samples.len().min(mic.samples.len()) / 160;
        let mut allocs = NOTHING;
        for b in 0..n {
            let (f, m) = (
                &far.samples[b * 160..(b + 1) * 160],
                &mic.samples[b * 160..(b + 1) * 160],
            );
            // The first second is the start-up; from then on every step is counted.
            let c = count_allocs(|| {
                up.render(f);
                up.process(m, &mut on_event);
            });
            if counted && b >= 100 {
                allocs.allocs += c.allocs;
                allocs.frees += c.frees;
            }
        }
        (starts, frames, allocs)
    };
    let modes: &[bool] = if cfg!(feature = "aec") {
        &[false, true]
    } else {
        &[false]
    };
    for &aec in modes {
        // Once through, so that lazily built state (logging call sites among it) exists.
        run(&mut uplink(aec), false);
        let mut up = uplink(aec);
        assert_eq!(up.aec_active(), aec);
        let (starts, frames, allocs) = run(&mut up, true);
        // Speech was heard (with AEC: the gate opened and checked the correlation), frames encoded.
        assert!(starts >= 1 && frames > 10, "aec {aec}: {starts} {frames}");
        if aec {
            assert!(allocs.allocs.abs_diff(allocs.frees) <= 1, "{allocs:?}");
        } else {
            assert_eq!(allocs, NOTHING);
        }
    }
}
