//! Criterion benchmarks of the uplink and downlink: each stage alone and the whole pipeline, on the
//! same 10 s of 48 kHz stereo speech (the stage functions are those `hearken bench` prints).

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use hearken::bench::{self, BenchInput};
use hearken::config::Config;

fn input() -> BenchInput {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(bench::DEFAULT_FIXTURE);
    BenchInput::from_wav(&path, 10, &Config::default()).expect("fixture")
}

fn uplink(c: &mut Criterion) {
    let b = input();
    let frames = bench::whole_uplink(&b);
    let mut mono = vec![0.0f32; 480];
    let mut g = c.benchmark_group("uplink_10s");
    g.sample_size(10);
    g.bench_function("downmix", |x| {
        x.iter(|| bench::stage_downmix(&b, &mut mono))
    });
    g.bench_function("resample_48k_16k", |x| x.iter(|| bench::stage_resample(&b)));
    g.bench_function("vad", |x| x.iter(|| bench::stage_vad(&b)));
    g.bench_function("opus_encode", |x| x.iter(|| bench::stage_opus(&b, frames)));
    g.bench_function("whole", |x| x.iter(|| bench::whole_uplink(&b)));
    g.finish();
}

fn downlink(c: &mut Criterion) {
    let b = input();
    let mut dec = vec![0.0f32; hearken::dsp::codec::MAX_DECODED_SAMPLES];
    let mut g = c.benchmark_group("downlink_10s");
    g.sample_size(10);
    g.bench_function("opus_decode", |x| {
        x.iter(|| bench::stage_opus_decode(&b, &mut dec))
    });
    g.bench_function("resample_48k_44k1", |x| {
        x.iter(|| bench::stage_resample_out(&b))
    });
    g.bench_function("whole", |x| x.iter(|| bench::whole_downlink(&b)));
    g.finish();
}

criterion_group!(benches, uplink, downlink);
criterion_main!(benches);
