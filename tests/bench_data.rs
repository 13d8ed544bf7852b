//! The data pipeline alone, for `scripts/bench-data` (ignored by `cargo
//! test`: a measurement, not a test). Streams a folder or a prepared file
//! through the training transform (RandomResizedCrop 224 and flips, seeded
//! per batch as training draws them) or the evaluation transform (Resize
//! 256, then CenterCrop 224) into ready uint8 batches on all cores, and
//! prints one JSON line: images, seconds, images/s, peak RSS.
//!
//! Environment: BENCH_DATA (a folder or a prepared file), BENCH_MODE
//! (train, eval, or decode: the decoder alone), BENCH_LIMIT (images), BENCH_BATCH (256),
//! BENCH_WORKERS (the cores), BENCH_EPOCHS (passes over the data, 1: a
//! small folder read several times, as on a GPU machine's kit).
//!
//! `augment`: `--auto-augment` alone on a batch of uint8 images in memory
//! (BENCH_POLICY, BENCH_DEVICE cpu or cuda, BENCH_BATCH 128, BENCH_SIDE
//! 32, BENCH_STEPS 20; one CPU thread), one JSON line likewise.

use std::path::PathBuf;
use std::time::Instant;

use vggctl::data::augment::Transform;
use vggctl::data::folder::FolderOptions;
use vggctl::data::resized_crop::{CropRange, draw_resized_crops};
use vggctl::data::stream::{AHEAD, InOrder, Job, Loader, Streamed};
use vggctl::data::{Images, folder, pack, prepared};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn split(data: PathBuf, workers: usize) -> Streamed {
    let opts = FolderOptions {
        dir: data.clone(),
        val_dir: Some(data.clone()),
        val_split: 0.1,
        seed: 0,
        cache_size: 256,
        filter: Default::default(),
        cache_dir: None,
        strict: false,
        cache_mem: 0,
        workers,
        imagenet: false,
        test_only: false,
        own_val: false,
    };
    let d = match prepared::is_prepared(&data) {
        true => pack::load(
            &FolderOptions {
                val_dir: None,
                val_split: 1e-9,
                ..opts
            },
            "folder",
        ),
        false => folder::load(&opts, &mut |w| eprintln!("{w}")),
    }
    .expect("the benchmark's data");
    match d.train {
        Images::Streamed(s) => s,
        Images::Resident(_) => unreachable!("--cache-mem 0 streams"),
    }
}

#[test]
#[ignore = "a measurement for scripts/bench-data"]
fn bench() {
    vggctl::data::stream::set_loader_hooks(vggctl::data::stream::LoaderHooks {
        worker_setup: vggctl::shim::data_worker_setup,
        new_batch: vggctl::shim::filled_u8,
    });
    let data = PathBuf::from(env("BENCH_DATA").expect("BENCH_DATA"));
    let mode = env("BENCH_MODE").unwrap_or_else(|| "train".into());
    let batch: i64 = env("BENCH_BATCH").map_or(256, |v| v.parse().unwrap());
    let workers = env("BENCH_WORKERS").map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |v| v.parse().unwrap(),
    );
    let s = split(data, workers);
    let limit = env("BENCH_LIMIT").map_or(s.len(), |v| v.parse::<i64>().unwrap().min(s.len()));
    let s = s.limit(Some(limit));
    let t0 = Instant::now();
    let mut images = 0;
    if mode == "decode" {
        // The decoder alone, on all cores: the ceiling of the others.
        use rayon::prelude::*;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .build()
            .unwrap();
        images = pool.install(|| {
            s.items[..limit as usize]
                .par_iter()
                .filter(|it| {
                    vggctl::data::image::decode_sized(&it.path, |h, _| ((), h as usize)).is_ok()
                })
                .count() as i64
        });
    } else {
        let epochs: i64 = env("BENCH_EPOCHS").map_or(1, |v| v.parse().unwrap());
        for _ in 0..epochs {
            images += pass(&s, &mode, limit, batch);
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    println!(
        "{{\"images\": {images}, \"seconds\": {seconds:.3}, \"images_per_s\": {:.1}, \"peak_rss_mb\": {:.1}, \"workers\": {workers}}}",
        images as f64 / seconds,
        peak_rss_mb()
    );
}

#[test]
#[ignore = "a measurement for scripts/bench-data"]
fn augment() {
    use tch::{Device, Kind, Tensor};
    use vggctl::data::auto_augment::{AUGMIX_SEVERITY, AutoAugment, Policy, RA_MAGNITUDE};
    tch::set_num_threads(1);
    let policy: Policy = vggctl::choice::parse(
        "BENCH_POLICY",
        &env("BENCH_POLICY").unwrap_or_else(|| "ta_wide".into()),
    )
    .unwrap();
    let device = vggctl::device::parse_device(&env("BENCH_DEVICE").unwrap_or_else(|| "cpu".into()))
        .expect("BENCH_DEVICE");
    let arg = |name: &str, default: i64| env(name).map_or(default, |v| v.parse().unwrap());
    let (batch, side, steps) = (
        arg("BENCH_BATCH", 128),
        arg("BENCH_SIDE", 32),
        arg("BENCH_STEPS", 20),
    );
    tch::manual_seed(0);
    let x = Tensor::randint(256, [batch, 3, side, side], (Kind::Uint8, device));
    let a = AutoAugment {
        policy,
        ra_magnitude: RA_MAGNITUDE,
        augmix_severity: AUGMIX_SEVERITY,
        interpolation: None,
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let _ = a.apply(&x);
    sync();
    let t0 = Instant::now();
    for _ in 0..steps {
        let _ = a.apply(&x);
    }
    sync();
    let seconds = t0.elapsed().as_secs_f64();
    let images = batch * steps;
    println!(
        "{{\"images\": {images}, \"seconds\": {seconds:.3}, \"images_per_s\": {:.1}}}",
        images as f64 / seconds
    );
}

/// One pass of `mode` (train or eval) over the first `limit` images; the
/// images it made.
fn pass(s: &Streamed, mode: &str, limit: i64, batch: i64) -> i64 {
    let mut images = 0;
    if mode == "train" {
        let mut loader = Loader::new(s, Transform::Random { size: 224 }).unwrap();
        let mut next = 0;
        let mut step = 0;
        while next < limit || loader.pending > 0 {
            while next < limit && loader.pending <= AHEAD {
                let len = batch.min(limit - next);
                tch::manual_seed(step);
                loader.submit(Job {
                    indices: (next..next + len).collect(),
                    draws: draw_resized_crops(len, CropRange::default(), 0.5),
                });
                (next, step) = (next + len, step + 1);
            }
            images += loader.take().unwrap().batch.len();
        }
    } else {
        let mut batches = InOrder::new(s, 0, limit, batch, Transform::Eval { size: 224 }).unwrap();
        while let Some(b) = batches.next_batch().unwrap() {
            images += b.len();
        }
    }
    images
}
