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
        // Onset -> flushed: the VAD's own onset delay (barge_in_min_ms is 0 with AEC) plus one period.
        let l = r.latency_ms.expect("latency");
        assert!((10..=200).contains(&l), "{r:?}");
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
