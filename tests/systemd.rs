//! The binary under a pretend systemd: `NOTIFY_SOCKET` points at a datagram socket this test owns.
//! READY comes once the devices are open, WATCHDOG pings while the DSP ticks, and SIGTERM mid-turn
//! gives STOPPING and a clean exit well within 3 s. A bad config exits 78 (no restart loop).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The binary, through `$HEARKEN_TEST_RUNNER` (qemu-user) when the tests run emulated.
fn hearken() -> Command {
    common::hearken_command()
}

#[test]
fn ready_watchdog_and_stopping_on_sigterm_mid_turn() {
    let dir = std::env::temp_dir().join(format!("hearken-systemd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("audio/fixtures/question.wav");
    let started = Instant::now();
    let mut child = hearken()
        .args(["run", "--realtime", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.join("out.wav"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hearken");

    let mut got: Vec<(Duration, String)> = Vec::new();
    let mut buf = [0u8; 512];
    let mut term_sent: Option<Instant> = None;
    let exit = loop {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push((
                started.elapsed(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
        // Mid-turn: the question's speech runs from about 0.5 s to 3.3 s.
        if term_sent.is_none() && started.elapsed() > Duration::from_millis(1_800) {
            // The shell's builtin kill: /bin/kill (procps) is missing from minimal images.
            let ok = Command::new("sh")
                .args(["-c", &format!("kill -TERM {}", child.id())])
                .status()
                .expect("kill");
            assert!(ok.success());
            term_sent = Some(Instant::now());
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "hearken did not exit: {got:?}"
        );
    };
    let stopped_in = term_sent.expect("SIGTERM sent").elapsed();
    // Drain what was sent just before the exit.
    while let Ok(n) = sock.recv(&mut buf) {
        got.push((
            started.elapsed(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);

    assert!(exit.success(), "{exit:?}");
    assert!(stopped_in < Duration::from_secs(3), "{stopped_in:?}");
    let ready = got
        .iter()
        .position(|(_, m)| m.starts_with("READY=1"))
        .expect("READY");
    assert!(got[ready].0 < Duration::from_secs(3), "{got:?}");
    let pings = got.iter().filter(|(_, m)| m == "WATCHDOG=1").count();
    // 100 ms apart (half of WatchdogSec) for about 1.8 s.
    assert!(pings >= 8, "{pings} pings: {got:?}");
    let stopping = got
        .iter()
        .position(|(_, m)| m.starts_with("STOPPING=1"))
        .expect("STOPPING");
    assert!(stopping > ready);
}

#[test]
fn a_bad_config_exits_78() {
    let out = hearken()
        .args(["--set", "turn.end_silence_ms=5", "check-config"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("turn.end_silence_ms"), "{err}");
}
