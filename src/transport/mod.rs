//! Transports move frames ([`crate::protocol::Wire`]) between the device and the agent. They know
//! bytes, not protocols: the protocol codec above them decides what a frame means.
//!
//! - [`ws`]: WebSocket over TCP, or over TLS (rustls, `ring` provider) for `wss://`. `ws://` to a host
//!   other than loopback is refused unless the config allows it.
//! - [`sse`]: HTTP(S) `POST` with a Server-Sent Events answer, plus one-shot posts (H2A): hyper over
//!   TCP or the same rustls setup; `http://` to a non-loopback host is refused the same way.
//! - [`stdio`]: a child process (the agent on the device, or `ssh host cmd`), one JSON message per
//!   line on its stdin and stdout (HAP).
//! - [`http`]: one JSON-RPC request per HTTP POST, the response body its answer (a HAP gateway).
//! - [`Backoff`]: the reconnect schedule (exponential with jitter, reset after a stable minute). The
//!   session owns the loop; this module only computes the waits, so the rule is unit-tested without time.
//!
//! Context: tokio (the session task). Nothing here spawns threads; the stdio transport spawns one
//! task per child to drain its stderr.

pub mod http;
pub mod sse;
pub mod stdio;
pub mod ws;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::protocol::Wire;
pub use ws::TransportError;

/// A boxed future, so [`AgentConnection`] stays object-safe.
pub type TransportFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One open connection to the agent as the link sees it: frames out, frames in. Each transport
/// (WebSocket; HTTP POST + SSE; a child's stdio) maps its own framing onto [`Wire`] frames, so the link
/// and the codecs above it never see sockets. Thread contract: used from the link task only; `recv`
/// must be cancel-safe (the link polls it in a `select!` and may drop the future between frames).
pub trait AgentConnection: Send {
    /// Send one frame; an error means the connection is lost.
    fn send(&mut self, frame: Wire) -> TransportFuture<'_, Result<(), TransportError>>;
    /// The next frame; `None` when the agent closed the connection.
    fn recv(&mut self) -> TransportFuture<'_, Option<Result<Wire, TransportError>>>;
    /// A transport-level keepalive (WebSocket ping), where the transport has one.
    fn ping(&mut self) -> TransportFuture<'_, ()>;
    /// Close politely (bounded in time).
    fn close(&mut self) -> TransportFuture<'_, ()>;
    /// When anything last came from the agent (liveness).
    fn last_rx(&self) -> Instant;
}

/// A connection that lasted at least this long counts as stable: the next failure starts the backoff
/// from the beginning again. Shorter ones keep growing it, so a server that accepts and then drops
/// every connection is not hammered.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Reconnect waits: exponential growth from `min_ms` to `max_ms`, with equal jitter.
///
/// Attempt `n` (from 0) waits a uniformly random time in `[lo, hi]` where
/// `hi = min(max_ms, min_ms * 2^(n+1))` and `lo = max(min_ms, hi / 2)`: half of each window is fixed,
/// half random. Every wait is within `[min_ms, max_ms]`; at the cap the wait is in `[max_ms/2, max_ms]`,
/// so a fleet of devices that lost the same server does not come back in lockstep.
///
/// Pure apart from the seed: [`Backoff::new`] seeds its PRNG from the clock and the process id;
/// [`Backoff::with_seed`] makes a schedule reproducible for tests.
#[derive(Debug, Clone)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    attempts: u32,
    rng: XorShift64,
}

impl Backoff {
    /// `min_ms` is clamped to at least 1 ms and `max_ms` to at least `min_ms`.
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        Self::with_seed(min_ms, max_ms, clock_seed())
    }

    /// Like [`Backoff::new`] with a fixed jitter seed.
    pub fn with_seed(min_ms: u64, max_ms: u64, seed: u64) -> Self {
        let min_ms = min_ms.max(1);
        Backoff {
            min_ms,
            max_ms: max_ms.max(min_ms),
            attempts: 0,
            rng: XorShift64::new(seed),
        }
    }

    /// The wait before the next connection attempt; counts the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let (lo, hi) = self.window(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        let span = hi - lo;
        let jitter = if span == 0 {
            0
        } else {
            self.rng.next_u64() % (span + 1)
        };
        Duration::from_millis(lo + jitter)
    }

    /// A connection ended after being up for `connected_for`. Only a stable one (>= [`STABLE_AFTER`])
    /// resets the schedule to `min_ms`.
    pub fn succeeded(&mut self, connected_for: Duration) {
        if connected_for >= STABLE_AFTER {
            self.reset();
        }
    }

    /// Start again from `min_ms` (e.g. after a configuration change).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// Waits handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// `[lo, hi]` in ms for attempt `n`.
    fn window(&self, n: u32) -> (u64, u64) {
        // 2^62 * min saturates long before the shift could overflow.
        let factor = 1u64 << n.saturating_add(1).min(62);
        let hi = self.min_ms.saturating_mul(factor).min(self.max_ms);
        let lo = (hi / 2).max(self.min_ms);
        (lo, hi)
    }
}

/// xorshift64* (Vigna): plenty for spreading reconnects, and no `rand` dependency.
#[derive(Debug, Clone)]
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        // splitmix64 scrambles close seeds (consecutive pids, nearby clocks) apart; the state must not
        // be zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        XorShift64(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u64 {
        d.as_millis() as u64
    }

    #[test]
    fn every_wait_is_within_min_and_max() {
        for seed in 0..50 {
            let mut b = Backoff::with_seed(1_000, 30_000, seed);
            for _ in 0..40 {
                let d = ms(b.next_delay());
                assert!((1_000..=30_000).contains(&d), "{d}");
            }
        }
    }

    #[test]
    fn waits_grow_exponentially_then_cap() {
        let mut b = Backoff::with_seed(1_000, 30_000, 7);
        let expect = [
            (1_000, 2_000),
            (2_000, 4_000),
            (4_000, 8_000),
            (8_000, 16_000),
            (15_000, 30_000),
            (15_000, 30_000),
        ];
        for (n, (lo, hi)) in expect.into_iter().enumerate() {
            let d = ms(b.next_delay());
            assert!(
                (lo..=hi).contains(&d),
                "attempt {n}: {d} not in [{lo}, {hi}]"
            );
        }
        assert_eq!(b.attempts(), 6);
        // Far past the cap: no overflow, still capped.
        for _ in 0..200 {
            assert!(ms(b.next_delay()) <= 30_000);
        }
        assert_eq!(b.window(u32::MAX), (15_000, 30_000));
    }

    #[test]
    fn only_a_stable_minute_resets() {
        let mut b = Backoff::with_seed(500, 10_000, 1);
        for _ in 0..5 {
            b.next_delay();
        }
        b.succeeded(Duration::from_secs(59));
        assert_eq!(
            b.attempts(),
            5,
            "a short connection keeps the backoff growing"
        );
        assert!(ms(b.next_delay()) >= 5_000);
        b.succeeded(STABLE_AFTER);
        assert_eq!(b.attempts(), 0);
        let d = ms(b.next_delay());
        assert!((500..=1_000).contains(&d), "{d}");
    }

    #[test]
    fn jitter_spreads() {
        let mut b = Backoff::with_seed(1_000, 30_000, 42);
        for _ in 0..10 {
            b.next_delay();
        }
        let samples: Vec<u64> = (0..1_000).map(|_| ms(b.next_delay())).collect();
        let lo = *samples.iter().min().unwrap();
        let hi = *samples.iter().max().unwrap();
        assert!(lo < 16_000 && hi > 29_000, "[{lo}, {hi}]");
        let mut distinct = samples.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 500, "{}", distinct.len());
        // Mean near the middle of [15 s, 30 s].
        let mean = samples.iter().sum::<u64>() / samples.len() as u64;
        assert!((21_000..=24_000).contains(&mean), "{mean}");
        // Two devices seeded differently do not wait in lockstep.
        let mut a = Backoff::with_seed(1_000, 30_000, 1);
        let mut c = Backoff::with_seed(1_000, 30_000, 2);
        let same = (0..20).filter(|_| a.next_delay() == c.next_delay()).count();
        assert!(same < 5, "{same}");
    }

    #[test]
    fn degenerate_settings_are_clamped() {
        let mut b = Backoff::with_seed(0, 0, 3);
        assert_eq!(b.next_delay(), Duration::from_millis(1));
        let mut b = Backoff::with_seed(5_000, 1_000, 3);
        assert_eq!(b.next_delay(), Duration::from_millis(5_000));
        // Clock seeding works and gives a usable schedule.
        let mut b = Backoff::new(100, 200);
        assert!((100..=200).contains(&ms(b.next_delay())));
    }
}
