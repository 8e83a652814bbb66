//! Real-time hand-off between the audio callbacks and the DSP worker.
//!
//! Context: the functions marked `// RT-SAFE:` run inside the cpal input/output callbacks (or the file
//! devices' clock thread, which calls the very same functions). They only move samples through
//! preallocated lock-free SPSC rings (`rtrb`) and touch atomics: no allocation, no lock, no logging, no
//! syscalls. `tests/rt_alloc.rs` runs them under an allocation-counting global allocator.
//!
//! Flush handshake (barge-in): the controller bumps `flush_req`. The output callback sees it on its next
//! period, fades what it is playing to zero over `fade_frames`, drops everything readable and stores
//! `cb_ack`. The DSP worker, which owns the producer side, sees the request too, drops its own pending
//! audio, publishes how many samples it had written by then (`cut_pos`) and stores `worker_ack`; the
//! callback discards up to `cut_pos`, so samples written in the race window never play.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the callbacks and the rest of the service. All relaxed: they are statistics.
#[derive(Debug, Default)]
pub struct RtCounters {
    /// Input samples (per channel frame) delivered by the capture callback.
    pub captured_frames: AtomicU64,
    /// Input samples that did not fit in the capture ring (DSP worker too slow).
    pub capture_dropped: AtomicU64,
    /// Output frames rendered by the playback callback (audio or silence).
    pub rendered_frames: AtomicU64,
    /// Output frames that had to be filled with silence while audio was pending (ring ran dry).
    pub underrun_frames: AtomicU64,
    /// Stream errors reported by the backend (ALSA xruns and the like).
    pub xruns: AtomicU64,
    /// Samples discarded by a flush (barge-in).
    pub flushed_samples: AtomicU64,
    /// Played samples that did not fit in the far-end tap (the echo canceller's reference fell behind).
    pub far_dropped: AtomicU64,
}

impl RtCounters {
    pub fn snapshot(&self) -> RtSnapshot {
        RtSnapshot {
            captured_frames: self.captured_frames.load(Ordering::Relaxed),
            capture_dropped: self.capture_dropped.load(Ordering::Relaxed),
            rendered_frames: self.rendered_frames.load(Ordering::Relaxed),
            underrun_frames: self.underrun_frames.load(Ordering::Relaxed),
            xruns: self.xruns.load(Ordering::Relaxed),
            flushed_samples: self.flushed_samples.load(Ordering::Relaxed),
            far_dropped: self.far_dropped.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`RtCounters`] for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RtSnapshot {
    pub captured_frames: u64,
    pub capture_dropped: u64,
    pub rendered_frames: u64,
    pub underrun_frames: u64,
    pub xruns: u64,
    pub flushed_samples: u64,
    pub far_dropped: u64,
}

/// State shared by the playback producer (DSP worker), the output callback and the controller.
#[derive(Debug, Default)]
pub struct PlaybackShared {
    /// Shared by every ring the worker builds, so a flush can be requested without knowing which ring
    /// (device) is current.
    flush_req: Arc<AtomicU64>,
    cb_ack: AtomicU64,
    worker_ack: AtomicU64,
    /// Samples the worker had written when it acknowledged the latest flush.
    cut_pos: AtomicU64,
    /// Samples the callback has taken out of the ring (played, faded or discarded).
    read_pos: AtomicU64,
    /// Samples the worker has put into the ring.
    write_pos: AtomicU64,
    /// Output frame count (since the stream started) at which the latest flush was rendered.
    flushed_at_frame: AtomicU64,
}

impl PlaybackShared {
    /// True once the output callback has completed flush request `n` (the fade has been rendered).
    pub fn flushed(&self, n: u64) -> bool {
        self.cb_ack.load(Ordering::Acquire) >= n
    }

    /// Samples queued in the ring and not yet taken by the callback.
    pub fn queued_samples(&self) -> u64 {
        self.write_pos
            .load(Ordering::Acquire)
            .saturating_sub(self.read_pos.load(Ordering::Acquire))
    }

    /// Latest flush request (for the producer side).
    pub fn flush_requested(&self) -> u64 {
        self.flush_req.load(Ordering::Acquire)
    }

    /// Latest flush completed by the callback, and the output frame at which it faded.
    pub fn last_flush(&self) -> (u64, u64) {
        (
            self.cb_ack.load(Ordering::Acquire),
            self.flushed_at_frame.load(Ordering::Acquire),
        )
    }
}

/// Requests flushes of whichever playback ring is current. Cheap to clone; safe from any thread.
#[derive(Debug, Clone, Default)]
pub struct FlushHandle(Arc<AtomicU64>);

impl FlushHandle {
    /// Ask the output callback to fade out and drop everything queued. Never blocks.
    pub fn request(&self) -> u64 {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Producer side of the playback ring, owned by the DSP worker.
pub struct PlaybackWriter {
    producer: rtrb::Producer<f32>,
    shared: Arc<PlaybackShared>,
    written: u64,
    seen_flush: u64,
}

impl PlaybackWriter {
    /// Free space in samples.
    pub fn space(&self) -> usize {
        self.producer.slots()
    }

    /// Write as much of `samples` as fits; returns how many were written.
    pub fn write(&mut self, samples: &[f32]) -> usize {
        let (done, _rest) = self.producer.push_partial_slice(samples);
        let n = done.len();
        self.written += n as u64;
        self.shared.write_pos.store(self.written, Ordering::Release);
        n
    }

    /// Check for a new flush request. Returns true if one arrived since the last call: the caller must
    /// drop its own pending audio. Everything written so far is marked stale for the callback.
    pub fn poll_flush(&mut self) -> bool {
        let req = self.shared.flush_req.load(Ordering::Acquire);
        if req == self.seen_flush {
            return false;
        }
        self.seen_flush = req;
        self.shared.cut_pos.store(self.written, Ordering::Release);
        self.shared.worker_ack.store(req, Ordering::Release);
        true
    }

    pub fn shared(&self) -> &Arc<PlaybackShared> {
        &self.shared
    }
}

/// Consumer side of the playback ring, moved into the output callback.
pub struct PlaybackReader {
    consumer: rtrb::Consumer<f32>,
    shared: Arc<PlaybackShared>,
    counters: Arc<RtCounters>,
    read: u64,
    rendered_frames: u64,
    /// Length of the flush fade, in samples (interleaved).
    fade_samples: usize,
    channels: usize,
    /// Far-end tap: a copy of every sample played (silence and fades included), for the echo canceller.
    far: Option<rtrb::Producer<f32>>,
}

/// The DSP worker's end of the far-end tap: exactly what the output callback played, in order.
pub struct FarEndTap {
    pub consumer: rtrb::Consumer<f32>,
    pub channels: usize,
}

/// Build the playback ring. `capacity` and `fade_samples` are in interleaved samples. Flushes already
/// requested through `flush` before this ring existed do not apply to it.
pub fn playback_ring(
    capacity: usize,
    channels: usize,
    fade_samples: usize,
    counters: Arc<RtCounters>,
    flush: &FlushHandle,
) -> (PlaybackWriter, PlaybackReader) {
    let (producer, consumer) = rtrb::RingBuffer::new(capacity.max(1));
    let now = flush.current();
    let shared = Arc::new(PlaybackShared {
        flush_req: flush.0.clone(),
        cb_ack: AtomicU64::new(now),
        worker_ack: AtomicU64::new(now),
        ..Default::default()
    });
    (
        PlaybackWriter {
            producer,
            shared: shared.clone(),
            written: 0,
            seen_flush: now,
        },
        PlaybackReader {
            consumer,
            shared,
            counters,
            read: 0,
            rendered_frames: 0,
            fade_samples,
            channels: channels.max(1),
            far: None,
        },
    )
}

impl PlaybackReader {
    pub fn shared(&self) -> &Arc<PlaybackShared> {
        &self.shared
    }

    /// Add the far-end tap (`capacity` interleaved samples); call before the reader moves into the
    /// callback.
    pub fn with_far_tap(mut self, capacity: usize) -> (Self, FarEndTap) {
        let (producer, consumer) = rtrb::RingBuffer::new(capacity.max(1));
        self.far = Some(producer);
        let channels = self.channels;
        (self, FarEndTap { consumer, channels })
    }

    /// Copy what was just played into the far-end tap; what does not fit is dropped and counted.
    // RT-SAFE: one lock-free slice copy and a relaxed atomic add.
    fn tap(&mut self, out: &[f32]) {
        if let Some(p) = &mut self.far {
            // Whole frames only, so the worker's side never loses its channel alignment.
            let room = p.slots().min(out.len());
            let n = room - room % self.channels;
            let (_, rest) = p.push_partial_slice(&out[..n]);
            let dropped = out.len() - n + rest.len();
            if dropped > 0 {
                self.counters
                    .far_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
        }
    }

    /// The shared counters, for the backend's error callback (which cannot reach the moved reader).
    pub fn counters(&self) -> Arc<RtCounters> {
        self.counters.clone()
    }

    /// Fill `out` (interleaved f32) from the ring. Called once per output period.
    // RT-SAFE: atomics and slice copies on preallocated buffers only.
    pub fn render(&mut self, out: &mut [f32]) {
        let frames = (out.len() / self.channels) as u64;
        self.counters
            .rendered_frames
            .fetch_add(frames, Ordering::Relaxed);
        self.rendered_frames += frames;
        let req = self.shared.flush_req.load(Ordering::Acquire);
        if req != self.shared.cb_ack.load(Ordering::Relaxed) {
            // Fade what would have played next to zero, then drop everything readable.
            let fade = self.fade_samples.min(out.len());
            let (head, _) = self.consumer.pop_partial_slice(&mut out[..fade]);
            let n = head.len();
            let denom = n.max(1) as f32;
            for (i, s) in out[..n].iter_mut().enumerate() {
                let frame = (i / self.channels) as f32 * self.channels as f32;
                *s *= 1.0 - frame / denom;
            }
            out[n..].fill(0.0);
            let rest = self.consumer.slots();
            if let Ok(chunk) = self.consumer.read_chunk(rest) {
                chunk.commit_all();
            }
            self.read += (n + rest) as u64;
            self.counters
                .flushed_samples
                .fetch_add((n + rest) as u64, Ordering::Relaxed);
            self.shared.read_pos.store(self.read, Ordering::Release);
            self.shared
                .flushed_at_frame
                .store(self.rendered_frames - frames, Ordering::Release);
            self.shared.cb_ack.store(req, Ordering::Release);
            self.tap(out);
            return;
        }
        // Discard samples written before the worker noticed the flush.
        let stale = if self.shared.worker_ack.load(Ordering::Acquire) == req {
            self.shared
                .cut_pos
                .load(Ordering::Acquire)
                .saturating_sub(self.read)
        } else {
            self.consumer.slots() as u64
        };
        if stale > 0 {
            let n = (stale as usize).min(self.consumer.slots());
            if let Ok(chunk) = self.consumer.read_chunk(n) {
                chunk.commit_all();
            }
            self.read += n as u64;
            self.counters
                .flushed_samples
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        let available = self.consumer.slots();
        let (head, _) = self.consumer.pop_partial_slice(out);
        let n = head.len();
        if n < out.len() {
            out[n..].fill(0.0);
            if available > 0 {
                self.counters
                    .underrun_frames
                    .fetch_add(((out.len() - n) / self.channels) as u64, Ordering::Relaxed);
            }
        }
        self.read += n as u64;
        self.shared.read_pos.store(self.read, Ordering::Release);
        self.tap(out);
    }
}

/// Producer side of the capture ring, moved into the input callback.
pub struct CaptureWriter {
    producer: rtrb::Producer<f32>,
    counters: Arc<RtCounters>,
    channels: usize,
}

/// Build the capture ring (`capacity` in interleaved samples).
pub fn capture_ring(
    capacity: usize,
    channels: usize,
    counters: Arc<RtCounters>,
) -> (CaptureWriter, rtrb::Consumer<f32>) {
    let (producer, consumer) = rtrb::RingBuffer::new(capacity.max(1));
    (
        CaptureWriter {
            producer,
            counters,
            channels: channels.max(1),
        },
        consumer,
    )
}

impl CaptureWriter {
    /// The shared counters, for the backend's error callback (which cannot reach the moved writer).
    pub fn counters(&self) -> Arc<RtCounters> {
        self.counters.clone()
    }

    /// Push one callback's worth of interleaved f32 input; what does not fit is dropped and counted.
    // RT-SAFE: one lock-free slice copy and two relaxed atomic adds.
    pub fn push(&mut self, input: &[f32]) {
        let (done, rest) = self.producer.push_partial_slice(input);
        let _ = done;
        self.count(input.len(), rest.len());
    }

    /// Push input of any sample type, converting to f32 on the way in.
    // RT-SAFE: converts sample by sample into the ring's own storage; no temporary buffer.
    pub fn push_converted<T: Copy>(&mut self, input: &[T], convert: impl Fn(T) -> f32) {
        let n = input.len().min(self.producer.slots());
        if let Ok(mut chunk) = self.producer.write_chunk(n) {
            let (a, b) = chunk.as_mut_slices();
            let (ia, ib) = input[..n].split_at(a.len());
            for (d, s) in a.iter_mut().zip(ia) {
                *d = convert(*s);
            }
            for (d, s) in b.iter_mut().zip(ib) {
                *d = convert(*s);
            }
            chunk.commit_all();
        }
        self.count(input.len(), input.len() - n);
    }

    /// Free space in samples (file devices use it for back-pressure in fast mode).
    pub fn space(&self) -> usize {
        self.producer.slots()
    }

    fn count(&self, total: usize, dropped: usize) {
        self.counters
            .captured_frames
            .fetch_add((total / self.channels) as u64, Ordering::Relaxed);
        if dropped > 0 {
            self.counters
                .capture_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    /// The input stream reported an error (overrun): count it.
    // RT-SAFE: one relaxed atomic add.
    pub fn xrun(&self) {
        self.counters.xruns.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_drops_and_counts_overflow() {
        let c = Arc::new(RtCounters::default());
        let (mut w, mut r) = capture_ring(8, 2, c.clone());
        w.push(&[0.5; 6]);
        w.push_converted(&[i16::MAX; 6], |s| s as f32 / 32768.0);
        let s = c.snapshot();
        assert_eq!(s.captured_frames, 6);
        assert_eq!(s.capture_dropped, 4);
        let mut buf = [0.0; 8];
        let (got, _) = r.pop_partial_slice(&mut buf);
        assert_eq!(got.len(), 8);
        assert_eq!(buf[5], 0.5);
        assert!((buf[6] - 0.99997).abs() < 1e-4);
    }

    #[test]
    fn far_tap_gets_exactly_what_played_fade_and_silence_included() {
        let c = Arc::new(RtCounters::default());
        let flush = FlushHandle::default();
        let (mut w, r) = playback_ring(64, 1, 4, c.clone(), &flush);
        let (mut r, mut tap) = r.with_far_tap(64);
        let mut played = Vec::new();
        let mut out = [0.0; 8];
        w.write(&[0.5; 8]);
        r.render(&mut out);
        played.extend_from_slice(&out);
        w.write(&[0.5; 8]);
        flush.request();
        r.render(&mut out); // the fade
        played.extend_from_slice(&out);
        r.render(&mut out); // silence
        played.extend_from_slice(&out);
        let mut got = vec![0.0; 64];
        let (n, _) = tap.consumer.pop_partial_slice(&mut got);
        let n = n.len();
        assert_eq!(&got[..n], &played[..]);
        assert!(played[8] > 0.0 && played[11] < played[8]); // it did fade
        assert_eq!(c.snapshot().far_dropped, 0);
    }

    #[test]
    fn playback_plays_then_underruns() {
        let c = Arc::new(RtCounters::default());
        let (mut w, mut r) = playback_ring(16, 1, 4, c.clone(), &FlushHandle::default());
        assert_eq!(w.write(&[1.0; 6]), 6);
        let mut out = [9.0; 8];
        r.render(&mut out);
        assert_eq!(&out[..6], &[1.0; 6]);
        assert_eq!(&out[6..], &[0.0; 2]);
        assert_eq!(c.snapshot().underrun_frames, 2);
        // Idle silence is not an underrun.
        r.render(&mut out);
        assert_eq!(out, [0.0; 8]);
        assert_eq!(c.snapshot().underrun_frames, 2);
        assert_eq!(w.shared().queued_samples(), 0);
    }

    #[test]
    fn flush_fades_and_discards_stale_samples() {
        let c = Arc::new(RtCounters::default());
        let flush = FlushHandle::default();
        let (mut w, mut r) = playback_ring(64, 1, 4, c.clone(), &flush);
        w.write(&[1.0; 40]);
        let shared = w.shared().clone();
        let n = flush.request();
        assert!(!shared.flushed(n));
        // The worker writes once more before it notices the flush: that audio is stale too.
        let mut out = [0.0; 8];
        r.render(&mut out);
        assert!(shared.flushed(n));
        assert_eq!(out[0], 1.0);
        assert!(out[1] < 1.0 && out[3] > 0.0, "{out:?}");
        assert_eq!(&out[4..], &[0.0; 4]);
        w.write(&[2.0; 10]);
        assert!(w.poll_flush());
        assert!(!w.poll_flush());
        w.write(&[3.0; 4]); // fresh audio after the flush
        r.render(&mut out);
        assert_eq!(&out[..4], &[3.0; 4], "stale 2.0s must not play: {out:?}");
        assert_eq!(c.snapshot().flushed_samples, 50);
    }

    #[test]
    fn stale_samples_are_dropped_until_worker_acks() {
        let c = Arc::new(RtCounters::default());
        let flush = FlushHandle::default();
        flush.request(); // a flush from before this ring existed does not apply to it
        let (mut w, mut r) = playback_ring(64, 1, 2, c, &flush);
        w.write(&[7.0; 2]);
        let mut out = [0.0; 4];
        r.render(&mut out);
        assert_eq!(out, [7.0, 7.0, 0.0, 0.0]);
        flush.request();
        r.render(&mut out); // flush done by the callback
        w.write(&[5.0; 4]); // worker has not seen the flush yet
        r.render(&mut out);
        assert_eq!(out, [0.0; 4]);
    }
}
