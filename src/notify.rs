//! systemd's notification protocol (`sd_notify`), without libsystemd: one datagram per state change to
//! the socket in `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). `READY=1` once the audio
//! devices are open and the agent link is launched, `WATCHDOG=1` while the DSP worker's tick advances,
//! `STOPPING=1` on shutdown. Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
//!
//! Context: the tokio service task. Each send is one non-blocking `sendto` on a datagram socket.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog is ours only when the
    /// pid is unset or is this process).
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let addr = address(&p.to_string_lossy())?;
            let sock = UnixDatagram::unbound().ok()?;
            let _ = sock.set_nonblocking(true);
            Some((sock, addr))
        });
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// How often to ping the watchdog: half of `WatchdogSec=`, as systemd recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }

    fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }
}

fn address(p: &str) -> Option<std::os::unix::net::SocketAddr> {
    if let Some(name) = p.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            return std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok();
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return None;
        }
    }
    std::os::unix::net::SocketAddr::from_pathname(p).ok()
}

/// The watchdog rule: ping only if the DSP worker ticked since the last ping.
#[derive(Debug, Default)]
pub struct WatchdogGate {
    last: Option<u64>,
}

impl WatchdogGate {
    /// `heartbeat`: the worker's tick counter now. True: ping.
    pub fn should_ping(&mut self, heartbeat: u64) -> bool {
        let advanced = self.last.is_none_or(|l| heartbeat > l);
        self.last = Some(heartbeat);
        advanced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_worker_gets_no_ping() {
        let mut g = WatchdogGate::default();
        assert!(g.should_ping(5));
        assert!(g.should_ping(9));
        assert!(!g.should_ping(9)); // the DSP thread hung: systemd will restart us
        assert!(g.should_ping(10));
    }

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("hearken-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            socket: Some((
                UnixDatagram::unbound().expect("socket"),
                address(&path.to_string_lossy()).expect("address"),
            )),
            watchdog: Some(Duration::from_secs(4)),
        };
        n.ready("listening");
        n.watchdog();
        let mut buf = [0u8; 256];
        let k = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..k], b"READY=1\nSTATUS=listening");
        let k = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..k], b"WATCHDOG=1");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
