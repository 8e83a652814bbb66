//! `hearken bench`: the uplink (48 kHz stereo -> mono -> 16 kHz -> VAD -> Opus) and the downlink
//! (Opus -> 48 kHz -> 44.1 kHz stereo device) per second of audio, each stage alone and the whole
//! pipeline, measured in the same run so the ratios hold on any machine; then a whole `hearken run`
//! over a WAV file in a child process, for its peak RSS.
//!
//! The stage functions are public so `benches/pipeline.rs` (criterion) measures the same code.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::audio::StreamFormat;
use crate::audio::earcon::decode_wav;
use crate::cli::BenchArgs;
use crate::config::{ChannelSelect, Config};
use crate::dsp::codec::{MAX_DECODED_SAMPLES, MAX_PACKET_BYTES, OpusDecoder, OpusEncoder};
use crate::dsp::downlink::{Downlink, DownlinkAudio};
use crate::dsp::resample::StreamResampler;
use crate::dsp::uplink::{Uplink, UplinkEvent, UplinkSettings};
use crate::dsp::vad::{self, VadStage};
use crate::dsp::{downmix, to_i16};

pub const DEFAULT_FIXTURE: &str = "audio/fixtures/one_utterance_48k_stereo.wav";
/// Device input block: 10 ms at 48 kHz.
const BLOCK_FRAMES: usize = 480;

/// Prepared inputs for every stage, so each is timed on exactly what it sees in the pipeline.
pub struct BenchInput {
    pub seconds: f64,
    /// 48 kHz stereo interleaved.
    pub stereo48: Vec<f32>,
    pub mono48: Vec<f32>,
    pub mono16: Vec<i16>,
    /// The uplink's Opus packets (for the downlink).
    pub packets: Vec<Vec<u8>>,
    pub config: Config,
}

impl BenchInput {
    /// `seconds` of audio made by looping a 48 kHz stereo speech file.
    pub fn from_wav(path: &Path, seconds: u32, config: &Config) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let sound = decode_wav(std::io::Cursor::new(bytes), &path.display().to_string())?;
        anyhow::ensure!(sound.rate_hz == 48_000, "{} is not 48 kHz", path.display());
        let want = seconds as usize * 48_000;
        let mono48: Vec<f32> = sound.samples.iter().copied().cycle().take(want).collect();
        // Stereo: the same speech on the left, a quieter copy on the right, so the mix does real work.
        let stereo48: Vec<f32> = mono48.iter().flat_map(|s| [*s, 0.5 * s]).collect();
        let mut mono = vec![0.0; mono48.len()];
        downmix(&stereo48, 2, ChannelSelect::Mix, &mut mono);
        let mut r = StreamResampler::new(48_000, 16_000)?;
        let mut mono16 = Vec::with_capacity(want / 3);
        r.process(&mono, |o| mono16.extend(o.iter().map(|x| to_i16(*x))));
        let mut enc = OpusEncoder::new(&config.opus)?;
        let mut buf = vec![0u8; MAX_PACKET_BYTES];
        let mut packets = Vec::new();
        for f in mono16.chunks_exact(enc.frame_samples()) {
            let n = enc.encode(f, &mut buf)?;
            packets.push(buf[..n].to_vec());
        }
        Ok(BenchInput {
            seconds: seconds as f64,
            stereo48,
            mono48: mono,
            mono16,
            packets,
            config: config.clone(),
        })
    }

    fn uplink_settings(&self) -> UplinkSettings {
        UplinkSettings {
            input: StreamFormat {
                rate_hz: 48_000,
                channels: 2,
            },
            channel: ChannelSelect::Mix,
            vad: self.config.vad.clone(),
            opus: self.config.opus.clone(),
            preroll_ms: self.config.turn.preroll_ms,
            // Never stop: once speech starts, every frame is encoded, as in the Opus stage.
            max_stream_ms: u32::MAX / 2,
            // The uplink table measures the pipeline without a far end; AEC is measured on its own.
            aec: None,
        }
    }
}

pub fn stage_downmix(b: &BenchInput, out: &mut [f32]) -> usize {
    let mut n = 0;
    for block in b.stereo48.chunks(BLOCK_FRAMES * 2) {
        n += downmix(block, 2, ChannelSelect::Mix, &mut out[..BLOCK_FRAMES]);
        // The pipeline reads every mixed sample; make sure the mix is really computed here too.
        black_box(&mut out[..BLOCK_FRAMES]);
    }
    black_box(n)
}

pub fn stage_resample(b: &BenchInput) -> usize {
    let Ok(mut r) = StreamResampler::new(48_000, 16_000) else {
        return 0;
    };
    // The pipeline converts to i16 right as the resampler emits; so does this stage.
    let mut pcm = vec![0i16; BLOCK_FRAMES];
    let mut n = 0;
    for block in b.mono48.chunks(BLOCK_FRAMES) {
        r.process(block, |o| {
            for (d, s) in pcm.iter_mut().zip(o) {
                *d = to_i16(*s);
            }
            n += o.len();
        });
    }
    black_box(&pcm);
    black_box(n)
}

pub fn stage_vad(b: &BenchInput) -> usize {
    let mut v = VadStage::new(
        vad::engine(&b.config.vad),
        b.config.vad.start_ms,
        b.config.vad.hangover_ms,
    );
    let mut n = 0;
    for block in b.mono16.chunks(160) {
        v.push(block, |_| n += 1);
    }
    black_box(n)
}

/// Encode `frames` 20 ms frames (the number the pipeline encoded), from the start of the signal.
pub fn stage_opus(b: &BenchInput, frames: usize) -> usize {
    let Ok(mut enc) = OpusEncoder::new(&b.config.opus) else {
        return 0;
    };
    let mut buf = vec![0u8; MAX_PACKET_BYTES];
    let fs = enc.frame_samples();
    let mut bytes = 0;
    for f in b.mono16.chunks_exact(fs).cycle().take(frames) {
        bytes += enc.encode(f, &mut buf).unwrap_or(0);
    }
    black_box(bytes)
}

/// The whole uplink as the worker runs it; returns the number of frames encoded.
pub fn whole_uplink(b: &BenchInput) -> usize {
    let Ok(mut up) = Uplink::new(&b.uplink_settings(), vad::engine(&b.config.vad)) else {
        return 0;
    };
    let mut frames = 0;
    for block in b.stereo48.chunks(BLOCK_FRAMES * 2) {
        up.process(block, &mut |e| {
            if let UplinkEvent::Frame { .. } = e {
                frames += 1
            }
        });
    }
    black_box(frames)
}

/// The echo canceller alone on the 16 kHz signal: far end = the fixture, mic = its echo (the same
/// signal, attenuated and 30 ms late), rendered then captured in 10 ms frames as the worker does.
#[cfg(feature = "aec")]
pub fn stage_aec(b: &BenchInput) -> usize {
    let mut aec = crate::dsp::aec::EchoCanceller::new(&b.config.aec);
    let delay = 30 * 16;
    let mut frame = [0i16; crate::dsp::aec::FRAME];
    let mut far = [0.0f32; crate::dsp::aec::FRAME];
    let mut n = 0;
    for (i, chunk) in b.mono16.chunks_exact(crate::dsp::aec::FRAME).enumerate() {
        for (d, s) in far.iter_mut().zip(chunk) {
            *d = f32::from(*s) / 32768.0;
        }
        aec.render(&far);
        let start = (i * crate::dsp::aec::FRAME).saturating_sub(delay);
        for (k, d) in frame.iter_mut().enumerate() {
            *d = b.mono16.get(start + k).map_or(0, |s| s / 2);
        }
        n += aec.capture(&mut frame).out as usize;
    }
    black_box(n)
}

pub fn stage_opus_decode(b: &BenchInput, out: &mut [f32]) -> usize {
    let Ok(mut d) = OpusDecoder::new() else {
        return 0;
    };
    let mut n = 0;
    for p in &b.packets {
        n += d.decode(p, out).unwrap_or(0);
    }
    black_box(n)
}

/// 48 kHz mono -> 44.1 kHz stereo, as the downlink does for a 44.1 kHz device.
pub fn stage_resample_out(b: &BenchInput) -> usize {
    let Ok(mut r) = StreamResampler::new(48_000, 44_100) else {
        return 0;
    };
    let mut inter = Vec::with_capacity(2 * MAX_DECODED_SAMPLES);
    let mut n = 0;
    for block in b.mono48.chunks(960) {
        r.process(block, |o| {
            inter.clear();
            inter.extend(o.iter().flat_map(|s| [*s, *s]));
            n += inter.len();
        });
    }
    black_box(n)
}

pub fn whole_downlink(b: &BenchInput) -> usize {
    let out = StreamFormat {
        rate_hz: 44_100,
        channels: 2,
    };
    let Ok(mut d) = Downlink::new(out, 1.0) else {
        return 0;
    };
    let mut n = 0;
    for p in &b.packets {
        let _ = d.push(&DownlinkAudio::Opus(p.clone()), &mut |s| n += s.len());
    }
    black_box(n)
}

/// Best of `reps` runs of `f`, in seconds.
pub fn best_of(reps: u32, mut f: impl FnMut()) -> f64 {
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn find_fixture(arg: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.clone());
    }
    crate::audio::data_file(DEFAULT_FIXTURE.trim_start_matches("audio/"))
        .context("bench needs a 48 kHz stereo WAV: run it from the source tree or pass --input")
}

pub fn run(config: &Config, args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        Some(crate::cli::BenchCommand::BargeIn { set }) => return barge_in(config, set.as_deref()),
        Some(crate::cli::BenchCommand::Speech) => return speech(config, args.reps),
        None => {}
    }
    let fixture = find_fixture(args.input.as_ref())?;
    let b = BenchInput::from_wav(&fixture, args.seconds, config)?;
    let reps = args.reps;
    let secs = b.seconds;
    println!(
        "hearken bench: {} s of audio from {}, best of {reps}, VAD {:?} mode {}",
        args.seconds,
        fixture.display(),
        config.vad.engine,
        config.vad.mode
    );
    let mut frames = 0;
    let t_whole = best_of(reps, || frames = whole_uplink(&b));
    let mut mono = vec![0.0f32; BLOCK_FRAMES];
    let stages = [
        (
            "downmix 2ch -> mono",
            best_of(reps, || {
                stage_downmix(&b, &mut mono);
            }),
        ),
        (
            "resample 48k -> 16k",
            best_of(reps, || {
                stage_resample(&b);
            }),
        ),
        (
            "VAD + hysteresis",
            best_of(reps, || {
                stage_vad(&b);
            }),
        ),
        (
            "Opus encode",
            best_of(reps, || {
                stage_opus(&b, frames);
            }),
        ),
    ];
    print_table("uplink", secs, &stages, t_whole);
    println!("  ({frames} Opus frames encoded in the whole-pipeline run)");
    #[cfg(feature = "aec")]
    {
        let t_aec = best_of(reps, || {
            stage_aec(&b);
        });
        println!(
            "\necho cancellation (AEC3, 16 kHz, far end + mic){:>12.3} ms / audio s {:>8.0}x real time",
            t_aec / secs * 1e3,
            secs / t_aec
        );
        println!(
            "  AEC / rest of the uplink pipeline = {:.2} (the cost of cancelling, per audio second)",
            t_aec / t_whole
        );
    }

    let mut dec = vec![0.0f32; MAX_DECODED_SAMPLES];
    let t_down = best_of(reps, || {
        whole_downlink(&b);
    });
    let dstages = [
        (
            "Opus decode -> 48k",
            best_of(reps, || {
                stage_opus_decode(&b, &mut dec);
            }),
        ),
        (
            "resample 48k -> 44.1k stereo",
            best_of(reps, || {
                stage_resample_out(&b);
            }),
        ),
    ];
    print_table("downlink", secs, &dstages, t_down);

    match file_run_rss(&fixture) {
        Ok((rss, wall)) => println!(
            "\nwhole run `hearken run --input {} --output <tmp>.wav`: {:.0} ms wall, peak RSS {:.1} MiB (target < 12 MiB: {})",
            fixture.display(),
            wall * 1e3,
            rss as f64 / 1024.0,
            if rss < 12 * 1024 { "met" } else { "NOT met" }
        ),
        Err(e) => println!("\nwhole run: could not measure ({e:#})"),
    }
    Ok(())
}

fn print_table(name: &str, secs: f64, stages: &[(&str, f64)], whole: f64) {
    println!("\n{name:<30} {:>14} {:>14}", "ms / audio s", "x real time");
    let sum: f64 = stages.iter().map(|s| s.1).sum();
    for (label, t) in stages {
        println!("  {label:<28} {:>14.3} {:>14.0}", t / secs * 1e3, secs / t);
    }
    println!(
        "  {:<28} {:>14.3} {:>14.0}",
        "sum of stages",
        sum / secs * 1e3,
        secs / sum
    );
    println!(
        "  {:<28} {:>14.3} {:>14.0}",
        "whole pipeline",
        whole / secs * 1e3,
        secs / whole
    );
    let ratio = whole / sum;
    let rt = secs / whole;
    println!(
        "  whole / sum of stages = {ratio:.3} (target <= 1.2: {}); real-time factor {rt:.0}x (target >= 100x: {})",
        if ratio <= 1.2 { "met" } else { "NOT met" },
        if rt >= 100.0 { "met" } else { "NOT met" }
    );
}

/// Run `hearken run` on `fixture` in a child process; its peak RSS (KiB) and wall time (s).
fn file_run_rss(fixture: &Path) -> anyhow::Result<(u64, f64)> {
    let exe = std::env::current_exe()?;
    let out = std::env::temp_dir().join(format!("hearken-bench-{}.wav", std::process::id()));
    let t = Instant::now();
    let child = std::process::Command::new(exe)
        .args(["run", "--events", "jsonl", "--input"])
        .arg(fixture)
        .arg("--output")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()?;
    let wall = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&out);
    anyhow::ensure!(
        child.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&child.stderr)
    );
    let stdout = String::from_utf8_lossy(&child.stdout);
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .context("no summary event")?;
    let rss = summary["peak_rss_kib"]
        .as_u64()
        .context("no peak_rss_kib")?;
    Ok((rss, wall))
}

/// The committed echo evaluation set, from the source tree or an installed package.
pub fn echo_set_dir() -> anyhow::Result<PathBuf> {
    crate::audio::data_file("echo/manifest.json")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .context("no echo evaluation set found: pass --set DIR (see audio/echo/make.sh)")
}

/// `hearken bench barge-in`: the evaluation set through the real DSP and turn machine.
fn barge_in(config: &Config, set: Option<&Path>) -> anyhow::Result<()> {
    let dir = match set {
        Some(d) => d.to_path_buf(),
        None => echo_set_dir()?,
    };
    let results = crate::echo_eval::evaluate_set(config, &dir)?;
    let aec = results.first().is_some_and(|r| r.aec);
    println!(
        "hearken bench barge-in: {} mixes from {}; echo cancellation {}; turn.barge_in_min_ms {}, \
         vad.barge_in_start_ms {}, aec.gate_margin_db {}",
        results.len(),
        dir.display(),
        if aec { "on (AEC3)" } else { "off" },
        config.turn.barge_in_min_ms(aec),
        if aec {
            config.vad.barge_in_start_ms
        } else {
            config.vad.start_ms
        },
        config.aec.gate_margin_db,
    );
    println!(
        "\n{:<16} {:>9} {:>13} {:>7} {:>12} {:>10} {:>10} {:>12}",
        "mix",
        "onset ms",
        "false b-ins",
        "missed",
        "latency ms",
        "from VAD",
        "ERLE dB",
        "gated/far"
    );
    for r in &results {
        println!(
            "{:<16} {:>9} {:>13} {:>7} {:>12} {:>10} {:>10} {:>12}",
            r.name,
            r.onset_ms.map_or("-".into(), |v| v.to_string()),
            r.false_barge_ins,
            if r.onset_ms.is_none() {
                "-"
            } else if r.missed {
                "MISSED"
            } else {
                "no"
            },
            r.latency_ms.map_or("-".into(), |v| v.to_string()),
            r.vad_latency_ms.map_or("-".into(), |v| v.to_string()),
            r.erle_db.map_or("-".into(), |v| format!("{v:.1}")),
            format!("{}/{}", r.gated_frames, r.far_frames),
        );
    }
    let false_total: u32 = results.iter().map(|r| r.false_barge_ins).sum();
    let echo_only = results.iter().filter(|r| r.onset_ms.is_none()).count();
    let with_user = results.len() - echo_only;
    let missed = results.iter().filter(|r| r.missed).count();
    let lat: Vec<u64> = results.iter().filter_map(|r| r.latency_ms).collect();
    let vad_lat: Vec<u64> = results.iter().filter_map(|r| r.vad_latency_ms).collect();
    let erles: Vec<f64> = results.iter().filter_map(|r| r.erle_db).collect();
    let min_erle = erles.iter().copied().fold(f64::INFINITY, f64::min);
    let p95 = crate::demo::percentile(&lat, 95.0);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("\ntotal");
    println!(
        "  false barge-ins on {echo_only} echo-only mixes: {false_total} (target 0: {})",
        verdict(false_total == 0)
    );
    println!(
        "  missed barge-ins on {with_user} mixes with a user: {missed} (target 0: {})",
        verdict(missed == 0)
    );
    println!(
        "  onset -> playback flushed: p50 {}, p95 {} (target p95 <= 150 ms: {})",
        crate::demo::percentile(&lat, 50.0).map_or("-".into(), |v| format!("{v} ms")),
        p95.map_or("-".into(), |v| format!("{v} ms")),
        verdict(p95.is_some_and(|v| v <= 150)),
    );
    println!(
        "  the same from the VAD's onset (what the gate, turn machine and flush add): p50 {}, p95 {}",
        crate::demo::percentile(&vad_lat, 50.0).map_or("-".into(), |v| format!("{v} ms")),
        crate::demo::percentile(&vad_lat, 95.0).map_or("-".into(), |v| format!("{v} ms")),
    );
    if erles.is_empty() {
        println!("  ERLE: - (no echo-only mix, or echo cancellation off)");
    } else {
        println!(
            "  ERLE after the first second: min {min_erle:.1} dB, mean {:.1} dB (target >= 20 dB: {})",
            erles.iter().sum::<f64>() / erles.len() as f64,
            verdict(min_erle >= 20.0)
        );
    }
    Ok(())
}

/// The first sentence the speech benchmark speaks.
const SPEECH_SENTENCE: &str = "The weather today is sunny with a light breeze from the west.";

/// Speech-to-text is not part of the speech benchmark.
struct NoStt;

impl crate::speech::SpeechToText for NoStt {
    fn describe(&self) -> String {
        "none".into()
    }
    fn transcribe<'a>(
        &'a self,
        _rate_hz: u32,
        _audio: tokio::sync::mpsc::Receiver<Vec<i16>>,
        _cancel: crate::speech::CancellationToken,
    ) -> crate::speech::SpeechFuture<'a, crate::speech::Transcript> {
        Box::pin(async {
            Err(crate::speech::SpeechError::Failed {
                service: "none".into(),
                reason: "the speech benchmark does not transcribe".into(),
            })
        })
    }
}

/// `hearken bench speech`: the first agent delta to the first synthesized audio at the speaker, through
/// the renderer and the voice bridge, against the first sentence's own synthesis time (same backend,
/// same text, same run).
fn speech(config: &Config, reps: u32) -> anyhow::Result<()> {
    use crate::protocol::Downlink as Down;
    use std::time::Duration;
    let tts = crate::speech::tts_from_config(config)
        .context("tts.backend = \"none\": nothing to measure")?;
    let reps = reps.max(3);
    println!(
        "hearken bench speech: text-to-speech {}, {reps} runs each, first sentence: \"{SPEECH_SENTENCE}\"",
        tts.describe()
    );
    let rt = crate::service::runtime()?;
    rt.block_on(async {
        let mut first_chunk = Vec::new();
        let mut whole = Vec::new();
        for _ in 0..reps {
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let t = Instant::now();
            let synth = tts.synthesize(SPEECH_SENTENCE, tx, crate::speech::CancellationToken::new());
            let drain = async {
                let mut first = None;
                while rx.recv().await.is_some() {
                    first.get_or_insert_with(|| t.elapsed());
                }
                first
            };
            let (r, first) = tokio::join!(synth, drain);
            r.context("synthesis of the benchmark sentence")?;
            first_chunk.push(first.context("no audio")?);
            whole.push(t.elapsed());
        }
        let mut bridged = Vec::new();
        for rep in 0..reps {
            let (audio_tx, mut audio_rx) = tokio::sync::mpsc::channel(256);
            let player = crate::link::Player {
                audio: audio_tx,
                flush: crate::audio::rt::FlushHandle::default(),
            };
            let speech = crate::voice::Speech {
                stt: std::sync::Arc::new(NoStt),
                tts: tts.clone(),
            };
            let (mut bridge, _events) =
                crate::voice::VoiceBridge::new(speech, config.render_settings(), player);
            let id = format!("bench-{rep}");
            let t = Instant::now();
            let _ = bridge.downlink(Down::ResponseStarted { id: id.clone() });
            let _ = bridge.downlink(Down::TextDelta {
                message_id: id.clone(),
                text: format!("{SPEECH_SENTENCE} Later"),
            });
            let first = tokio::time::timeout(Duration::from_secs(30), audio_rx.recv())
                .await
                .ok()
                .flatten()
                .context("no audio reached the speaker queue")?;
            bridged.push(t.elapsed());
            drop(first);
            let _ = bridge.downlink(Down::TextDelta {
                message_id: id.clone(),
                text: " it will rain.".into(),
            });
            let _ = bridge.downlink(Down::ResponseFinished {
                id,
                status: crate::protocol::FinishStatus::Ok,
            });
            // Let the rest play out so the next run starts quiet.
            while tokio::time::timeout(Duration::from_millis(500), audio_rx.recv())
                .await
                .ok()
                .flatten()
                .is_some()
            {}
        }
        let med = |v: &mut Vec<Duration>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let (fc, wh, br) = (med(&mut first_chunk), med(&mut whole), med(&mut bridged));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "the sentence synthesized on its own: first audio after {:.1} ms, all of it after {:.1} ms (medians)",
            ms(fc),
            ms(wh)
        );
        let overhead = ms(br) - ms(fc);
        println!(
            "first agent delta -> first synthesized audio at the speaker queue: {:.1} ms (median); \
             beyond the sentence's own first audio: {overhead:+.1} ms, ratio {:.3} \
             (target: its synthesis time plus under 20 ms: {})",
            ms(br),
            ms(br) / ms(fc).max(0.001),
            if overhead < 20.0 { "met" } else { "NOT met" }
        );
        println!(
            "(the DSP worker plays what reaches its queue at its next 10 ms tick; `hearken demo \
             --protocol arp` reports the same figure per answer)"
        );
        anyhow::Ok(())
    })
}
