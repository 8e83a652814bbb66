//! The optional local health endpoint (`[health] listen`, off by default, loopback only): `GET /healthz`
//! is a small JSON document (state, connected, last turn), `GET /metrics` the Prometheus text format
//! (turns, barge-ins, reconnects, xruns, dropped frames, uplink/downlink bytes, latency histograms).
//!
//! Context: the service updates [`Metrics`] (atomics and one short-held mutex) from its tokio task; the
//! server is one more tokio task. A request is at most 8 KiB and must arrive within 2 s.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audio::RtCounters;

/// Upper bounds (ms) of the latency histograms' buckets.
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 500, 1000];

/// A Prometheus histogram over `BUCKETS_MS`.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    /// Sum in microseconds (exported in seconds).
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        for (b, &le) in self.buckets.iter().zip(BUCKETS_MS.iter()) {
            if us <= le * 1000 {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(BUCKETS_MS.iter()) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                *le as f64 / 1000.0,
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// What `/healthz` reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthState {
    /// The turn machine's state (`idle`, `user_speaking`, ...), or `starting`.
    pub state: String,
    /// Connected to the agent (always false without one).
    pub connected: bool,
    pub agent_configured: bool,
    /// The last completed turn: when it ended (RFC 3339) and how long it was.
    pub last_turn: Option<LastTurn>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LastTurn {
    pub ended: String,
    pub duration_ms: u64,
    pub frames: u32,
}

/// Counters the service moves and the endpoint reads.
#[derive(Debug, Default)]
pub struct Metrics {
    pub turns: AtomicU64,
    pub barge_ins: AtomicU64,
    pub reconnects: AtomicU64,
    /// Opus frames dropped before reaching the agent (the link's buffer was full).
    pub dropped_frames: AtomicU64,
    pub uplink_bytes: AtomicU64,
    pub downlink_bytes: AtomicU64,
    /// Mic frame captured -> on the socket.
    pub frame_to_socket: Histogram,
    /// End of speech -> end of turn on the socket.
    pub end_of_turn: Histogram,
    /// Barge-in onset -> playback flushed.
    pub barge_in_flush: Histogram,
    pub state: Mutex<HealthState>,
}

impl Metrics {
    pub fn update(&self, f: impl FnOnce(&mut HealthState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, rt: &RtCounters) -> String {
        let rt = rt.snapshot();
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "hearken_turns_total",
            "User turns completed.",
            self.turns.load(Ordering::Relaxed),
        );
        counter(
            "hearken_barge_ins_total",
            "Times the user interrupted the agent.",
            self.barge_ins.load(Ordering::Relaxed),
        );
        counter(
            "hearken_agent_reconnects_total",
            "Agent link losses (each followed by a reconnect).",
            self.reconnects.load(Ordering::Relaxed),
        );
        counter("hearken_xruns_total", "Audio stream errors.", rt.xruns);
        counter(
            "hearken_capture_dropped_samples_total",
            "Mic samples lost because the DSP thread fell behind.",
            rt.capture_dropped,
        );
        counter(
            "hearken_underrun_frames_total",
            "Output frames played as silence while audio was due.",
            rt.underrun_frames,
        );
        counter(
            "hearken_dropped_frames_total",
            "Opus frames of the user dropped before the agent got them (buffer full).",
            self.dropped_frames.load(Ordering::Relaxed),
        );
        counter(
            "hearken_uplink_bytes_total",
            "Opus bytes sent to the agent.",
            self.uplink_bytes.load(Ordering::Relaxed),
        );
        counter(
            "hearken_downlink_bytes_total",
            "Audio bytes received from the agent.",
            self.downlink_bytes.load(Ordering::Relaxed),
        );
        let connected = self.state.lock().map(|s| s.connected).unwrap_or(false);
        let _ = writeln!(
            out,
            "# HELP hearken_agent_connected 1 while connected to the agent.\n# TYPE hearken_agent_connected gauge\nhearken_agent_connected {}",
            u8::from(connected)
        );
        self.frame_to_socket.write(
            &mut out,
            "hearken_frame_to_socket_seconds",
            "Mic frame captured to frame on the socket.",
        );
        self.end_of_turn.write(
            &mut out,
            "hearken_end_of_turn_seconds",
            "End of speech to end of turn on the socket (includes turn.end_silence_ms).",
        );
        self.barge_in_flush.write(
            &mut out,
            "hearken_barge_in_flush_seconds",
            "Barge-in onset to playback flushed.",
        );
        out
    }

    fn healthz(&self) -> String {
        let s = self.state.lock().map(|s| s.clone()).unwrap_or_default();
        serde_json::to_string(&s).unwrap_or_else(|_| "{}".into())
    }
}

/// Serve `/healthz` and `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    rt: Arc<RtCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let (m, rt) = (metrics.clone(), rt.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    let read = tokio::time::timeout(Duration::from_secs(2), async {
                        while n < buf.len() {
                            match stream.read(&mut buf[n..]).await {
                                Ok(0) | Err(_) => break,
                                Ok(k) => n += k,
                            }
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    })
                    .await;
                    if read.is_err() {
                        return;
                    }
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let line = head.lines().next().unwrap_or("");
                    let mut parts = line.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let (status, ctype, body) = match (method, path) {
                        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", m.render(&rt)),
                        ("GET", "/healthz") => ("200 OK", "application/json", m.healthz()),
                        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
                        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_us(1_500);
        h.observe_us(120_000);
        let mut s = String::new();
        h.write(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.001\"} 0"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.002\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.15\"} 2"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 2"), "{s}");
        assert!(s.contains("x_count 2"), "{s}");
        assert!(s.contains("x_sum 0.1215"), "{s}");
    }
}
