//! Black-box tests of the audio side on the committed fixtures (`audio/fixtures/manifest.json` holds
//! their exact ground truth): VAD edges, turns through the whole service, Opus round trip.

use std::path::{Path, PathBuf};

use hearken::audio::StreamFormat;
use hearken::config::{Config, VadEngineKind};
use hearken::dsp::downlink::{Downlink, DownlinkAudio};
use hearken::dsp::uplink::{Uplink, UplinkEvent, UplinkSettings};
use hearken::dsp::vad;
use hearken::events::EventKind;
use hearken::service::{self, Io, RunOptions};
use hearken::turn::EndReason;

const TOLERANCE_MS: f64 = 60.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("audio/fixtures")
}

#[derive(serde::Deserialize)]
struct Manifest {
    fixtures: Vec<Fixture>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    file: String,
    speech: Vec<Segment>,
    expected_turns: usize,
}

#[derive(serde::Deserialize, Clone, Copy, Debug)]
struct Segment {
    start_ms: f64,
    end_ms: f64,
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest json")
}

/// Interleaved f32 samples and format of a WAV.
fn read_wav(path: &Path) -> (Vec<f32>, StreamFormat) {
    let mut r = hound::WavReader::open(path).expect("wav");
    let spec = r.spec();
    let s = r
        .samples::<i16>()
        .map(|x| x.expect("sample") as f32 / 32768.0)
        .collect();
    (
        s,
        StreamFormat {
            rate_hz: spec.sample_rate,
            channels: spec.channels,
        },
    )
}

fn config_with(engine: VadEngineKind) -> Config {
    let name = match engine {
        VadEngineKind::Webrtc => "webrtc",
        VadEngineKind::Earshot => "earshot",
    };
    Config::from_toml_str("", "test", &[format!("vad.engine=\"{name}\"")]).expect("config")
}

/// Speech segments (ms) the uplink finds in a file, fed in 10 ms device blocks.
fn detect(path: &Path, config: &Config) -> Vec<(f64, f64)> {
    let (samples, format) = read_wav(path);
    let mut up = Uplink::new(
        &UplinkSettings {
            input: format,
            channel: config.audio.input_channel,
            vad: config.vad.clone(),
            opus: config.opus.clone(),
            preroll_ms: config.turn.preroll_ms,
            max_stream_ms: 60_000,
            aec: None,
        },
        vad::engine(&config.vad),
    )
    .expect("uplink");
    let mut segs = Vec::new();
    let mut open = None;
    let block = (format.rate_hz / 100) as usize * format.channels as usize;
    let mut on_event = |e: UplinkEvent<'_>| match e {
        UplinkEvent::SpeechStart { at } => open = Some(at as f64 / 16.0),
        UplinkEvent::SpeechEnd { at } => {
            let start = open.take().expect("end without start");
            segs.push((start, at as f64 / 16.0));
        }
        _ => {}
    };
    for b in samples.chunks(block) {
        up.process(b, &mut on_event);
    }
    up.finish(&mut on_event);
    segs
}

#[test]
fn vad_finds_fixture_speech_within_60_ms_with_both_engines() {
    for engine in [VadEngineKind::Webrtc, VadEngineKind::Earshot] {
        let config = config_with(engine);
        for f in manifest().fixtures {
            let found = detect(&fixtures().join(&f.file), &config);
            let ctx = format!(
                "{engine:?} {}: found {found:?}, truth {:?}",
                f.file, f.speech
            );
            if f.speech.is_empty() {
                assert!(found.is_empty(), "{ctx}");
                continue;
            }
            // Every detected segment lies inside a true one (within the tolerance) ...
            for (s, e) in &found {
                assert!(
                    f.speech
                        .iter()
                        .any(|t| *s >= t.start_ms - TOLERANCE_MS && *e <= t.end_ms + TOLERANCE_MS),
                    "{ctx}: stray segment"
                );
            }
            // ... and each true segment is covered from its start to its end.
            for t in &f.speech {
                let inside: Vec<_> = found
                    .iter()
                    .filter(|(s, e)| *e > t.start_ms && *s < t.end_ms)
                    .collect();
                assert!(!inside.is_empty(), "{ctx}: segment {t:?} missed");
                let first = inside.first().expect("non-empty").0;
                let last = inside.last().expect("non-empty").1;
                assert!((first - t.start_ms).abs() <= TOLERANCE_MS, "{ctx}: start");
                assert!((last - t.end_ms).abs() <= TOLERANCE_MS, "{ctx}: end");
            }
        }
    }
}

fn run_file(path: &Path, overrides: &[String]) -> service::RunReport {
    let config = Config::from_toml_str("", "test", overrides).expect("config");
    let (output, _buf) = service::memory_output();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_tx, rx) = tokio::sync::watch::channel(false);
    rt.block_on(service::run(
        config,
        RunOptions {
            io: Io::File {
                input: path.to_path_buf(),
                output,
                realtime: false,
            },
            events: hearken::events::EventSink::None,
            record_events: true,
            speech: None,
        },
        rx,
    ))
    .expect("run")
}

#[test]
fn each_fixture_gives_its_expected_turns() {
    for f in manifest().fixtures {
        let report = run_file(&fixtures().join(&f.file), &[]);
        assert_eq!(
            report.turns.len(),
            f.expected_turns,
            "{}: {:?}",
            f.file,
            report.turns
        );
        if let (Some(turn), Some(first), Some(last)) =
            (report.turns.first(), f.speech.first(), f.speech.last())
        {
            // One turn over the whole utterance, internal pause included, ended by silence.
            assert_eq!(turn.reason, EndReason::Silence, "{}", f.file);
            assert!(
                (turn.start_ms as f64 - first.start_ms).abs() <= TOLERANCE_MS,
                "{}",
                f.file
            );
            assert!(
                (turn.end_ms as f64 - last.end_ms).abs() <= TOLERANCE_MS,
                "{}",
                f.file
            );
            // Frames cover the turn plus the pre-roll, 20 ms each.
            let expect = (turn.duration_ms + 300) / 20;
            assert!(
                (turn.frames as i64 - expect as i64).abs() <= 60,
                "{}: {} frames for {} ms",
                f.file,
                turn.frames,
                turn.duration_ms
            );
        }
    }
}

#[test]
fn a_run_writes_the_event_stream_and_plays_the_done_earcon() {
    let path = fixtures().join("one_utterance.wav");
    let config = Config::default();
    let (output, buf) = service::memory_output();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = rt
        .block_on(service::run(
            config,
            RunOptions {
                io: Io::File {
                    input: path,
                    output,
                    realtime: false,
                },
                events: hearken::events::EventSink::None,
                record_events: true,
                speech: None,
            },
            rx,
        ))
        .expect("run");
    let kinds: Vec<&str> = report
        .events
        .iter()
        .map(|e| match &e.kind {
            EventKind::SpeechStart => "speech_start",
            EventKind::SpeechEnd => "speech_end",
            EventKind::TurnStart => "turn_start",
            EventKind::TurnEnd { .. } => "turn_end",
            EventKind::Earcon { .. } => "earcon",
            EventKind::StateChange { .. } => "state",
            EventKind::Summary { .. } => "summary",
            _ => "other",
        })
        .filter(|k| *k != "other")
        .collect();
    assert_eq!(
        kinds,
        [
            "speech_start",
            "state",
            "turn_start",
            "speech_end",
            "turn_end",
            "earcon",
            "state",
            "summary"
        ]
    );
    // The speaker got the "done" earcon after the turn ended (48 kHz mono output, volume 0.5).
    let out = buf.lock().expect("lock").clone();
    let turn_end_ms = report.turns[0].end_ms + 700;
    let loud: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, s)| s.abs() > 0.01)
        .map(|(i, _)| i)
        .collect();
    assert!(!loud.is_empty(), "nothing was played");
    let first_ms = loud[0] as u64 * 1000 / 48_000;
    assert!(
        first_ms >= turn_end_ms,
        "earcon at {first_ms} ms, turn ended {turn_end_ms}"
    );
    let span_ms = (loud[loud.len() - 1] - loud[0]) as u64 * 1000 / 48_000;
    assert!((100..=200).contains(&span_ms), "earcon lasted {span_ms} ms");
}

#[test]
fn opus_round_trip_keeps_the_speech() {
    // Encode a fixture through the real uplink, decode through the real downlink at 16 kHz, and
    // compare the waveforms at the best alignment.
    let config = Config::default();
    let path = fixtures().join("one_utterance.wav");
    let (samples, format) = read_wav(&path);
    let mut up = Uplink::new(
        &UplinkSettings {
            input: format,
            channel: config.audio.input_channel,
            vad: config.vad.clone(),
            opus: config.opus.clone(),
            preroll_ms: config.turn.preroll_ms,
            max_stream_ms: 60_000,
            aec: None,
        },
        vad::engine(&config.vad),
    )
    .expect("uplink");
    let mut packets = Vec::new();
    let mut first_at = None;
    for b in samples.chunks(160) {
        up.process(b, &mut |e| {
            if let UplinkEvent::Frame { at, packet, .. } = e {
                first_at.get_or_insert(at);
                packets.push(packet.to_vec());
            }
        });
    }
    let start = first_at.expect("frames") as usize;
    let out = StreamFormat {
        rate_hz: 16_000,
        channels: 1,
    };
    let mut down = Downlink::new(out, 1.0).expect("downlink");
    let mut decoded = Vec::new();
    for p in &packets {
        down.push(&DownlinkAudio::Opus(p.clone()), &mut |s| {
            decoded.extend_from_slice(s)
        })
        .expect("decode");
    }
    let reference = &samples[start..];
    let n = decoded.len().min(reference.len()) - 1000;
    let best = (0..800)
        .map(|lag| {
            let (mut xy, mut xx, mut yy) = (0.0f64, 0.0f64, 0.0f64);
            for i in 0..n {
                let (x, y) = (reference[i] as f64, decoded[i + lag] as f64);
                xy += x * y;
                xx += x * x;
                yy += y * y;
            }
            (xy / (xx.sqrt() * yy.sqrt()), lag, (yy / xx))
        })
        .fold((0.0, 0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
    let (corr, lag, energy_ratio) = best;
    assert!(corr > 0.8, "correlation {corr:.3} at lag {lag}");
    let db = 10.0 * energy_ratio.log10();
    assert!(db.abs() < 3.0, "level changed by {db:.1} dB");
}

/// Everything the uplink emits for `samples` (16 kHz mono) fed in blocks of `block` samples.
fn uplink_output(samples: &[f32], block: usize, aec: bool) -> Vec<String> {
    let config = Config::default();
    let mut up = Uplink::new(
        &UplinkSettings {
            input: StreamFormat {
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
    .expect("uplink");
    let mut out = Vec::new();
    let mut on_event = |e: UplinkEvent<'_>| {
        out.push(match e {
            UplinkEvent::SpeechStart { at } => format!("start {at}"),
            UplinkEvent::SpeechEnd { at } => format!("end {at}"),
            UplinkEvent::Frame { at, packet, .. } => format!("frame {at} {packet:?}"),
            UplinkEvent::StreamCapped { at } => format!("capped {at}"),
        })
    };
    for b in samples.chunks(block) {
        up.process(b, &mut on_event);
    }
    up.finish(&mut on_event);
    out
}

#[test]
fn block_size_does_not_change_what_the_uplink_produces() {
    // At 16 kHz the resampler passes blocks straight through, so odd device periods reach the 10 ms
    // staging buffer as they are: events and every Opus packet must be the same for any block size.
    let (samples, format) = read_wav(&fixtures().join("two_words_pause.wav"));
    assert_eq!(format.rate_hz, 16_000);
    for aec in [false, true] {
        let want = uplink_output(&samples, 160, aec);
        assert!(want.iter().filter(|l| l.starts_with("frame")).count() > 100);
        for block in [100, 256, 333, 1024, 5000] {
            assert_eq!(
                uplink_output(&samples, block, aec),
                want,
                "block {block}, aec {aec}"
            );
        }
    }
}
