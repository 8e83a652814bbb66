//! Echo cancellation and the barge-in gate on the committed evaluation set (`audio/echo`, made by
//! `audio/echo/make.sh`): the real uplink (AEC3, gate, VAD) and the real turn machine, far end fed as
//! what the speaker played. The device must never interrupt itself on the echo-only mixes and never
//! miss the user on the others; without echo cancellation the same set fools it (so the set is hard
//! enough to mean something).

use std::path::{Path, PathBuf};

use hearken::config::Config;
use hearken::echo_eval::{Mix, evaluate, evaluate_set, load_set};

fn set_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("audio/echo")
}

fn config(overrides: &[&str]) -> Config {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::from_toml_str("", "test", &o).expect("config")
}

#[cfg(feature = "aec")]
#[test]
fn with_aec_no_false_and_no_missed_barge_ins() {
    let results = evaluate_set(&config(&[]), &set_dir()).expect("evaluation");
    assert_eq!(results.len(), 8);
    assert!(results.iter().all(|r| r.aec), "built with the aec feature");
    let echo_only: Vec<_> = results.iter().filter(|r| r.onset_ms.is_none()).collect();
    let with_user: Vec<_> = results.iter().filter(|r| r.onset_ms.is_some()).collect();
    assert_eq!((echo_only.len(), with_user.len()), (4, 4));
    for r in &results {
        assert_eq!(r.false_barge_ins, 0, "{r:?}");
        assert!(!r.missed, "{r:?}");
    }
    for r in &echo_only {
        // After the first second the canceller removes at least 20 dB of the echo.
        let erle = r.erle_db.expect("ERLE on an echo-only mix");
        assert!(erle >= 20.0, "{r:?}");
        // The gate held back the device's own voice from the VAD.
        assert!(r.gated_frames * 10 >= r.far_frames * 9, "{r:?}");
    }
    for r in &with_user {
        // Onset -> flushed: the VAD's own onset delay (barge_in_min_ms is 0 with AEC, the VAD's
        // barge-in debounce 30 ms) plus one period: the 150 ms, on every mix of the set.
        let l = r.latency_ms.expect("latency");
        assert!((10..=150).contains(&l), "{r:?}");
        // From where the VAD placed the onset: its decision and one period, nothing waits on top
        // (with the old default barge_in_min_ms = 100 this was 110 ms on every mix).
        let from_vad = r.vad_latency_ms.expect("latency from the VAD onset");
        assert!(from_vad <= 100, "{r:?}");
    }
    // "Stop, wait a moment": heard from its "s" (AEC3's linear output above 4 kHz passes the gate
    // while the suppressor removes it), not only from the vowel 150 ms later (260 ms before).
    let stop = with_user.iter().find(|r| r.name == "barge_20ms");
    assert!(
        stop.is_some_and(|r| r.latency_ms.is_some_and(|l| l <= 150)),
        "{stop:?}"
    );
}

#[cfg(feature = "aec")]
#[test]
fn the_shorter_barge_in_debounce_is_what_brings_the_latency_down() {
    let worst = |overrides: &[&str]| {
        evaluate_set(&config(overrides), &set_dir())
            .expect("evaluation")
            .iter()
            .filter_map(|r| r.latency_ms)
            .max()
            .expect("latencies")
    };
    let short = worst(&[]);
    // The full start debounce while the device plays: 30 ms more on the slowest mix.
    let long = worst(&["vad.barge_in_start_ms=60"]);
    assert!(short <= 150 && long > short, "{short} {long}");
}

/// The echo delay jumps mid-answer (`audio/echo/jump`, made by the same `make.sh`): AEC3's filter no
/// longer matches and lets the echo through at full level, which the gate's level tests take for
/// the user (the 70 -> 20 ms mix interrupted itself before the coherence test). What the filter
/// leaves still correlates with the far end, so the gate holds it back.
#[cfg(feature = "aec")]
#[test]
fn an_echo_delay_jump_does_not_make_the_device_interrupt_itself() {
    let dir = set_dir().join("jump");
    let results = evaluate_set(&config(&[]), &dir).expect("evaluation");
    assert_eq!(results.len(), 2);
    for r in &results {
        assert_eq!(r.false_barge_ins, 0, "{r:?}");
        assert!(r.gated_frames * 100 >= r.far_frames * 99, "{r:?}");
    }
}

#[cfg(feature = "aec")]
#[test]
fn noise_suppression_on_top_keeps_the_result() {
    let results =
        evaluate_set(&config(&["aec.noise_suppression=true"]), &set_dir()).expect("evaluation");
    assert!(
        results.iter().all(|r| r.false_barge_ins == 0 && !r.missed),
        "{results:?}"
    );
}

#[test]
fn without_aec_the_same_set_fools_the_device() {
    let results = evaluate_set(&config(&["aec.enabled=false"]), &set_dir()).expect("evaluation");
    assert!(results.iter().all(|r| !r.aec));
    let false_barge_ins: u32 = results
        .iter()
        .filter(|r| r.onset_ms.is_none())
        .map(|r| r.false_barge_ins)
        .sum();
    assert!(false_barge_ins >= 4, "{results:?}");
}

#[test]
fn a_bad_set_is_a_clear_error() {
    let e = load_set(Path::new("/nonexistent")).unwrap_err();
    assert!(
        format!("{e:#}").contains("/nonexistent/manifest.json"),
        "{e:#}"
    );
    let mix = Mix {
        name: "gone".into(),
        far: "gone_far.wav".into(),
        mic: "gone_mic.wav".into(),
        onset_ms: None,
    };
    let e = evaluate(&config(&[]), &set_dir(), &mix).unwrap_err();
    assert!(format!("{e:#}").contains("gone_far.wav"), "{e:#}");
}
