//! Helpers shared by the integration tests (each test crate includes this module and uses part of it).
#![allow(dead_code)]

use std::process::Command;
use std::sync::Arc;

use tokio_rustls::rustls;

/// A CA and a server certificate for `names` (DNS names or IP addresses) signed by it.
pub struct TestPki {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
}

pub fn test_pki(names: &[&str]) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "hearken test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");

    let key = KeyPair::generate().expect("server key");
    // rcgen makes an IP address SAN of a name that parses as one.
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut leaf = CertificateParams::new(sans).expect("server params");
    leaf.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = leaf
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server TLS config");
    TestPki {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    }
}

/// The environment variable naming a program that runs the binary under test, for a cross build
/// tested on another architecture: `HEARKEN_TEST_RUNNER=qemu-aarch64-static` (.ci/run sets it for
/// `cargo test --target aarch64-unknown-linux-gnu`; cargo's target runner only wraps the test
/// binaries themselves, not the programs they spawn, and CI containers have no binfmt_misc).
pub const RUNNER_ENV: &str = "HEARKEN_TEST_RUNNER";

/// A command for the `hearken` binary built with the tests, through `$HEARKEN_TEST_RUNNER` when set
/// (the runner's own arguments may follow it, split on whitespace). Under qemu-user the child is the
/// emulator, which passes signals such as SIGTERM on to the emulated program.
pub fn hearken_command() -> Command {
    let bin = env!("CARGO_BIN_EXE_hearken");
    match std::env::var(RUNNER_ENV) {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            let mut cmd = Command::new(words.next().expect("a runner"));
            cmd.args(words).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

/// Whether the tests run under an emulator (`$HEARKEN_TEST_RUNNER` set): real-time margins may be
/// widened then, never for a native run.
pub fn emulated() -> bool {
    std::env::var(RUNNER_ENV).is_ok_and(|r| !r.trim().is_empty())
}

/// The argv that runs the `hearken` binary built with the tests, through `$HEARKEN_TEST_RUNNER`
/// when set: for config keys that name a program (`agent.command`), which the device starts itself.
/// Under qemu-user the emulated device cannot exec an ARM binary directly (no binfmt_misc in a CI
/// container), so the runner goes first.
pub fn hearken_argv() -> Vec<String> {
    let mut argv: Vec<String> = std::env::var(RUNNER_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    argv.push(env!("CARGO_BIN_EXE_hearken").to_string());
    argv
}

/// Under emulation (a cross build run by qemu-user, `$HEARKEN_TEST_RUNNER` set) the device runs
/// several times slower, and real-time sessions side by side on a small CI machine miss deadlines no
/// board would (echo left uncancelled, a barge-in missed): there they take turns, one session at a
/// time. Natively this is a no-op and the tests run in parallel. Hold the result for the whole test.
pub async fn one_at_a_time_when_emulated() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    if emulated() {
        Some(TURN.lock().await)
    } else {
        None
    }
}
