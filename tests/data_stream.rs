//! Streamed image folders (`--cache-mem` too small for the canvases):
//! the same seed gives the in-memory path's random crops, to the rounding
//! of a uint8 batch, and leaves libtorch's generator where that path
//! leaves it; evaluation crops are `predict`'s bit for bit; unreadable,
//! truncated and decompression-bomb files are skipped with their message,
//! or with --strict the first one ends the batch naming its file; and a
//! folder trained streamed ends with the in-memory run's weights bit for
//! bit, also when interrupted mid-epoch and resumed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use vggctl::data::Images;
use vggctl::data::augment::{Transform, canvas_centre_crop, random_canvas_crop_flip};
use vggctl::data::folder::{FolderOptions, load};
use vggctl::data::image::{eval_transform, read_image};
use vggctl::data::resize::Filter;
use vggctl::data::resized_crop::{CropRange, draw_resized_crops};
use vggctl::data::stream::{InOrder, Job, Loader, Streamed};

/// The canvases' side: the folder's photos have it as their shorter side,
/// so the in-memory canvases hold them unresized.
const SIDE: i64 = 64;

/// Real photographs of every shape a canvas holds whole (wide and tall up
/// to 3:2, square), as PNG and JPEG, in two class folders of `root`.
fn photo_folder(root: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for (class, photo) in [
        ("cat", "cat/cat_01.png"),
        ("coffee", "coffee/coffee_03.jpg"),
    ] {
        let img = image::open(common::fixtures().join("photos").join(photo)).unwrap();
        std::fs::create_dir_all(root.join(class)).unwrap();
        for (i, (w, h)) in [(96, 64), (64, 96), (64, 64), (80, 64), (64, 85)]
            .iter()
            .enumerate()
        {
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            let path = root.join(class).join(format!("{w}x{h}.{ext}"));
            img.resize_exact(*w, *h, image::imageops::FilterType::Triangle)
                .to_rgb8()
                .save(&path)
                .unwrap();
            paths.push(path);
        }
    }
    paths
}

/// The binary's data-loading hooks (batches written in place into reused
/// memory), set for every test here: they stream as `vggctl` does.
fn binary_hooks() {
    vggctl::data::stream::set_loader_hooks(vggctl::data::stream::LoaderHooks {
        worker_setup: vggctl::shim::data_worker_setup,
        new_batch: vggctl::shim::filled_u8,
    });
}

fn options(root: &Path, cache_mem: u64, strict: bool) -> FolderOptions {
    filtered(root, cache_mem, strict, Filter::Bilinear)
}

fn filtered(root: &Path, cache_mem: u64, strict: bool, filter: Filter) -> FolderOptions {
    binary_hooks();
    FolderOptions {
        dir: root.to_path_buf(),
        // Every file in the training split, in the folder's order.
        val_dir: Some(root.to_path_buf()),
        val_split: 0.1,
        seed: 0,
        cache_size: SIDE,
        filter,
        cache_dir: None,
        strict,
        cache_mem,
        workers: 2,
        imagenet: false,
        test_only: false,
        own_val: false,
    }
}

fn streamed(images: &Images) -> &Streamed {
    match images {
        Images::Streamed(s) => s,
        Images::Resident(_) => panic!("not streamed"),
    }
}

/// The same seed: each streamed crop (decoded, cropped, resized and
/// flipped by a worker, rounded to uint8) is within half a level of the
/// in-memory batch's float crop of the same image, and the generator goes
/// on from the same state; bilinear and bicubic.
#[test]
fn streamed_crops_are_the_in_memory_crops_of_the_same_seed() {
    let tmp = common::tempdir();
    photo_folder(tmp.path());
    for filter in [Filter::Bilinear, Filter::Bicubic] {
        same_crops_streamed_and_in_memory(tmp.path(), filter);
    }
}

fn same_crops_streamed_and_in_memory(root: &Path, filter: Filter) {
    let warn = &mut |w: String| panic!("{w}");
    let memory = load(&filtered(root, u64::MAX, true, filter), warn).unwrap();
    let stream = load(&filtered(root, 0, true, filter), warn).unwrap();
    let split = memory.train.as_resident().unwrap();
    let files = streamed(&stream.train);
    let n = split.len();
    assert_eq!(n, 10);
    let mut loader = Loader::new(files, Transform::Random { size: 56 }).unwrap();
    let mut previous: Option<Tensor> = None;
    // torchvision's ranges, and timm-style others (odd seeds).
    let other = CropRange {
        scale: (0.3, 0.6),
        ratio: (0.5, 2.0),
    };
    for seed in 0..6 {
        let range = [CropRange::default(), other][seed as usize % 2];
        tch::manual_seed(seed);
        let layout = split.layout.as_ref().unwrap();
        let expected = random_canvas_crop_flip(&split.images, layout, (56, filter), range, 0.5);
        let next_in_memory = Tensor::rand([4], (Kind::Float, tch::Device::Cpu));
        tch::manual_seed(seed);
        let draws = draw_resized_crops(n, range, 0.5);
        let next_streamed = Tensor::rand([4], (Kind::Float, tch::Device::Cpu));
        assert!(next_in_memory.equal(&next_streamed));
        loader.submit(Job {
            indices: (0..n).collect(),
            draws,
        });
        let got = loader.take().unwrap();
        assert!(got.skipped.is_empty());
        assert!(got.batch.labels.equal(&split.labels));
        let images = got.batch.images;
        assert_eq!(images.kind(), Kind::Uint8);
        assert_eq!(images.size(), [n, 3, 56, 56]);
        let diff = (images.to_kind(Kind::Float) - &expected)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff <= 0.501,
            "{filter:?}, seed {seed}: {diff} levels apart"
        );
        // Different seeds, different crops.
        if let Some(p) = &previous {
            assert!(!p.equal(&images));
        }
        previous = Some(images);
    }
}

/// Streamed evaluation batches are `predict`'s transform of each file and
/// the in-memory canvases' centre crops, bit for bit, in order; bilinear
/// and bicubic.
#[test]
fn streamed_evaluation_crops_are_predicts() {
    let tmp = common::tempdir();
    let paths = photo_folder(tmp.path());
    for filter in [Filter::Bilinear, Filter::Bicubic] {
        same_evaluation_crops(tmp.path(), &paths, filter);
    }
}

fn same_evaluation_crops(root: &Path, paths: &[PathBuf], filter: Filter) {
    let warn = &mut |w: String| panic!("{w}");
    let memory = load(&filtered(root, u64::MAX, true, filter), warn).unwrap();
    let stream = load(&filtered(root, 0, true, filter), warn).unwrap();
    let split = memory.test.as_resident().unwrap();
    let canvas = canvas_centre_crop(&split.images, split.layout.as_ref().unwrap(), 56);
    let mut batches = InOrder::new(
        streamed(&stream.test),
        0,
        10,
        4,
        Transform::Eval { size: 56 },
    )
    .unwrap();
    let mut got = Vec::new();
    while let Some(b) = batches.next_batch().unwrap() {
        got.push(b.images);
    }
    assert_eq!(
        got.iter().map(|t| t.size()[0]).collect::<Vec<_>>(),
        [4, 4, 2]
    );
    let got = Tensor::cat(&got, 0);
    assert!(got.equal(&canvas));
    let mut sorted = paths.to_vec();
    sorted.sort();
    for (i, p) in sorted.iter().enumerate() {
        let predict = eval_transform(&read_image(p).unwrap(), Some(SIDE), 56, filter);
        assert!(
            got.get(i as i64).equal(&predict),
            "{filter:?}: {}",
            p.display()
        );
    }
}

/// A PNG whose header claims 20000 x 20000 pixels (and holds one byte).
fn bomb_png() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&20000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // A row's worth of a zlib stream (one stored block: filter byte 0).
    let mut idat = b"IDAT".to_vec();
    idat.extend_from_slice(&[0x78, 0x01, 0x01, 0x01, 0x00, 0xFE, 0xFF, 0x00]);
    png.extend_from_slice(&(idat.len() as u32 - 4).to_be_bytes());
    png.extend_from_slice(&idat);
    png.extend_from_slice(&crc32(&idat).to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0]);
    png.extend_from_slice(b"IEND");
    png.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Bad files in a streamed folder: left out of their batch with one
/// message each naming the file; with --strict, the first ends the batch.
#[test]
fn unreadable_streamed_images_are_skipped_or_named() {
    let tmp = common::tempdir();
    photo_folder(tmp.path());
    let eval_batch = |files: &Streamed, n: i64| {
        let mut batches = InOrder::new(files, 0, n, n, Transform::Eval { size: 56 }).unwrap();
        (batches.next_batch().unwrap().unwrap(), batches.skipped)
    };
    let warn = &mut |w: String| panic!("{w}");
    let clean = load(&options(tmp.path(), 0, false), warn).unwrap();
    let readable = eval_batch(streamed(&clean.test), 10).0;
    let cat = tmp.path().join("cat");
    let jpeg = std::fs::read(cat.join("64x96.jpg")).unwrap();
    std::fs::write(cat.join("a_truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(cat.join("b_bomb.png"), bomb_png()).unwrap();
    std::fs::write(cat.join("c_text.png"), b"not an image").unwrap();
    let stream = load(&options(tmp.path(), 0, false), warn).unwrap();
    let files = streamed(&stream.test);
    assert_eq!(files.len(), 13);
    // Twice: the second batch is written over the first's memory.
    for _ in 0..2 {
        let (batch, skipped) = eval_batch(files, 13);
        // The readable ones, moved up over the gaps, and nothing else.
        assert!(batch.images.equal(&readable.images));
        assert!(batch.labels.equal(&readable.labels));
        assert_eq!(skipped.len(), 3);
        for (msg, name) in skipped.iter().zip(["a_truncated", "b_bomb", "c_text"]) {
            assert!(msg.contains(name), "{msg}");
        }
        assert!(skipped[0].contains("truncated"));
        assert!(skipped[1].contains("20000x20000"), "{}", skipped[1]);
    }

    let strict = load(&options(tmp.path(), 0, true), warn).unwrap();
    let mut batches = InOrder::new(
        streamed(&strict.test),
        0,
        13,
        13,
        Transform::Eval { size: 56 },
    )
    .unwrap();
    let err = format!("{:#}", batches.next_batch().err().unwrap());
    assert!(
        err.contains("a_truncated.jpg") && err.contains("--strict"),
        "{err}"
    );
}

fn train(dir: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(common::bin());
    cmd.args(["train", "--dataset", "folder", "--data-dir"])
        .arg(dir)
        .args(["--arch", "vgg11", "--batch-size", "2", "--val-split", "0.2"])
        .args([
            "--epochs", "2", "--keep", "last", "--device", "cpu", "--out",
        ])
        .arg(out)
        .args(extra);
    cmd
}

fn same_weights(a: &Path, b: &Path) {
    let (a, b) = (
        vggctl::formats::safetensors::read_safetensors(&a.join("last.safetensors")).unwrap(),
        vggctl::formats::safetensors::read_safetensors(&b.join("last.safetensors")).unwrap(),
    );
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        assert!(t.equal(&b.tensors[k]), "{k} differs");
    }
}

/// CIFAR-style training on a folder (centre squares, then the batch's
/// crops and flips): streamed, the run ends with the in-memory run's
/// weights bit for bit, and so does a streamed run stopped by Ctrl-C in
/// the middle of an epoch and resumed.
#[test]
fn a_streamed_folder_trains_as_the_in_memory_one_and_resumes_exactly() {
    let tmp = common::tempdir();
    let data = tmp.path().join("data");
    photo_folder(&data);
    let cache = tmp.path().join("cache").display().to_string();
    let run = |out: &str, extra: &[&str]| {
        let r = common::Run::from(
            train(&data, &tmp.path().join(out), extra)
                .args(["--cache-dir", &cache, "--quiet"])
                .output()
                .unwrap(),
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    run("memory", &[]);
    run("streamed", &["--cache-mem", "0"]);
    same_weights(&tmp.path().join("memory"), &tmp.path().join("streamed"));
    let config = std::fs::read_to_string(tmp.path().join("streamed/config.json")).unwrap();
    assert!(config.contains("\"streamed\": true"), "{config}");

    // Ctrl-C after the third step of the first epoch (of 4 per epoch).
    let stopped = tmp.path().join("stopped");
    let mut child = train(
        &data,
        &stopped,
        &["--cache-mem", "0", "--log-interval", "1"],
    )
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let t0 = Instant::now();
    let mut line = String::new();
    while !line.contains("step 3/") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0);
        assert!(t0.elapsed() < Duration::from_secs(120));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{rest}");
    let r = common::run_in(
        tmp.path(),
        &["train", "--resume", stopped.to_str().unwrap(), "--quiet"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    same_weights(&tmp.path().join("memory"), &stopped);
}

fn opts_of(max_side: i64, raw: bool) -> vggctl::data::pack::PrepareOptions {
    vggctl::data::pack::PrepareOptions {
        max_side,
        quality: 90,
        raw,
        strict: true,
    }
}

fn batch_of(data: &Images, t: Transform, seed: i64) -> Tensor {
    let s = streamed(data);
    let mut loader = Loader::new(s, t).unwrap();
    tch::manual_seed(seed);
    let n = s.len();
    let draws = match t {
        Transform::Random { .. } => draw_resized_crops(n, CropRange::default(), 0.5),
        _ => Vec::new(),
    };
    loader.submit(Job {
        indices: (0..n).collect(),
        draws,
    });
    let got = loader.take().unwrap();
    assert!(got.skipped.is_empty(), "{:?}", got.skipped);
    got.batch.images
}

/// `vggctl prepare` of a folder whose images are small enough to keep
/// their bytes: training and evaluation batches from the file are the
/// folder's bit for bit for the same seed (and its held-out split the
/// same), stored as files or as raw pixels. Damage is one clear error: a flipped byte in an image (even
/// without --strict), a cut file, an index that fails its checksum.
#[test]
fn a_prepared_file_gives_the_folders_batches_and_refuses_damage() {
    use vggctl::data::pack;
    use vggctl::data::prepared::{self, Prepared};
    let tmp = common::tempdir();
    let data = tmp.path().join("data");
    photo_folder(&data);
    let file = tmp.path().join("photos.vggdata");
    let raw_file = tmp.path().join("raw.vggdata");
    for (path, raw) in [(&raw_file, true), (&file, false)] {
        let done = pack::prepare(&data, None, path, opts_of(SIDE, raw)).unwrap();
        assert_eq!((done.images, done.resized, done.skipped.len()), (10, 0, 0));
    }
    assert!(prepared::is_prepared(&file) && !prepared::is_prepared(&data));
    let mut opts = options(&data, 0, true);
    opts.val_dir = None;
    opts.val_split = 0.3;
    let folder = load(&opts, &mut |w| panic!("{w}")).unwrap();
    for path in [&raw_file, &file] {
        opts.dir = path.to_path_buf();
        let packed = pack::load(&opts, "folder").unwrap();
        assert_eq!(packed.classes, folder.classes);
        for (a, b) in [(&folder.train, &packed.train), (&folder.test, &packed.test)] {
            assert_eq!(a.len(), b.len());
            for seed in 0..3 {
                let t = Transform::Random { size: 48 };
                assert!(batch_of(a, t, seed).equal(&batch_of(b, t, seed)));
            }
            let t = Transform::Eval { size: 48 };
            assert!(batch_of(a, t, 0).equal(&batch_of(b, t, 0)));
        }
    }
    let raw_bytes = std::fs::metadata(&raw_file).unwrap().len();
    assert!(raw_bytes > std::fs::metadata(&file).unwrap().len());

    // Smaller --max-side: every image resized (its shorter side 40).
    let small = tmp.path().join("small.vggdata");
    let done = pack::prepare(&data, None, &small, opts_of(40, false)).unwrap();
    assert_eq!(done.resized, 10);
    let store = Prepared::open(&small).unwrap();
    for e in &store.index.train {
        let name = std::path::Path::new(&e.name);
        let (img, _) =
            vggctl::data::image::decode_bytes(&store.bytes(e).unwrap(), name, |_, _| ()).unwrap();
        assert_eq!(img.width().min(img.height()), 40, "{}", e.name);
    }

    // A flipped byte in the first image's data: the batch that reads it fails.
    let mut bytes = std::fs::read(&file).unwrap();
    let first = Prepared::open(&file).unwrap().index.train[0].clone();
    bytes[first.offset as usize + 100] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    opts.strict = false;
    let damaged = pack::load(&opts, "folder").unwrap();
    let s = streamed(&damaged.train);
    let mut loader = Loader::new(s, Transform::Eval { size: 48 }).unwrap();
    loader.submit(Job {
        indices: (0..s.len()).collect(),
        draws: Vec::new(),
    });
    let err = format!("{:#}", loader.take().err().unwrap());
    assert!(
        err.contains("damaged prepared dataset") && err.contains(&first.name),
        "{err}"
    );
    // Cut short, or an index edited: refused when opened.
    bytes[first.offset as usize + 100] ^= 0x40;
    let index_at = bytes.len() - 28;
    for (name, damage) in [
        ("cut.vggdata", bytes[..bytes.len() - 10].to_vec()),
        ("index.vggdata", {
            let mut b = bytes.clone();
            b[index_at - 5] ^= 1;
            b
        }),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, damage).unwrap();
        let err = format!("{:#}", Prepared::open(&path).err().unwrap());
        assert!(
            err.contains(name) && err.contains("damaged prepared dataset"),
            "{err}"
        );
        let r = common::run_in(
            tmp.path(),
            &[
                "train",
                "--dataset",
                "folder",
                "--data-dir",
                name,
                "--out",
                "x",
            ],
        );
        common::assert_one_line_error(&r, 1, "damaged prepared dataset");
    }
}

/// A folder of `n` JPEGs of 500 x 375 (ImageNet's typical size): a few
/// real photographs' bytes, repeated.
fn jpeg_folder(root: &Path, n: usize) {
    let photos = [
        "cat/cat_01.png",
        "coffee/coffee_03.jpg",
        "astronaut/astronaut_01.png",
    ];
    let encoded: Vec<Vec<u8>> = photos
        .iter()
        .map(|p| {
            let img = image::open(common::fixtures().join("photos").join(p)).unwrap();
            let img = img.resize_exact(500, 375, image::imageops::FilterType::Triangle);
            let mut out = Vec::new();
            img.to_rgb8()
                .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
                    &mut out, 90,
                ))
                .unwrap();
            out
        })
        .collect();
    for i in 0..n {
        let dir = root.join(format!("class{}", i % 2));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{i:05}.jpg")), &encoded[i % 3]).unwrap();
    }
}

/// The child of `streaming_memory_stays_flat`: one epoch of training
/// batches (64 random 224 crops each, with the binary's worker set-up)
/// from MEMORY_DATA, streamed
/// (MEMORY_MODE=stream) or decoded into 256-pixel canvases first
/// (resident); prints its peak RSS in KiB.
#[test]
#[ignore = "run as a child process by streaming_memory_stays_flat"]
fn memory_child() {
    let Ok(dir) = std::env::var("MEMORY_DATA") else {
        return;
    };
    binary_hooks();
    let stream = std::env::var("MEMORY_MODE").as_deref() == Ok("stream");
    let mut opts = options(Path::new(&dir), if stream { 0 } else { u64::MAX }, true);
    opts.cache_size = 256;
    let d = load(&opts, &mut |w| panic!("{w}")).unwrap();
    if let Images::Streamed(s) = &d.train {
        let mut loader = Loader::new(s, Transform::Random { size: 224 }).unwrap();
        let mut seen = 0;
        for (step, start) in (0..s.len()).step_by(64).enumerate() {
            let len = 64.min(s.len() - start);
            tch::manual_seed(step as i64);
            loader.submit(Job {
                indices: (start..start + len).collect(),
                draws: draw_resized_crops(len, CropRange::default(), 0.5),
            });
            if loader.pending > 2 {
                seen += loader.take().unwrap().batch.len();
            }
        }
        while loader.pending > 0 {
            seen += loader.take().unwrap().batch.len();
        }
        assert_eq!(seen, s.len());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    println!("peak {}", hwm.split_whitespace().nth(1).unwrap());
}

/// Streaming an epoch of a folder four times larger (600 against 150
/// photographs of 500 x 375) costs less than 20 MB more at its peak,
/// and stays under 1 GB; decoding the same folders into memory (the
/// in-memory path, which this bound would catch) grows by over 100 MB.
#[test]
fn streaming_memory_stays_flat() {
    let tmp = common::tempdir();
    let peak = |n: usize, mode: &str| -> f64 {
        let dir = tmp.path().join(format!("{n}"));
        if !dir.exists() {
            jpeg_folder(&dir, n);
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "memory_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MEMORY_DATA", &dir)
            .env("MEMORY_MODE", mode)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let kib: f64 = text
            .lines()
            .find_map(|l| l.split_once("peak ").map(|(_, kib)| kib.trim()))
            .unwrap_or_else(|| panic!("{text}{}", String::from_utf8_lossy(&out.stderr)))
            .parse()
            .unwrap();
        kib / 1024.0
    };
    let (small, large) = (peak(150, "stream"), peak(600, "stream"));
    eprintln!("streaming: {small:.0} MB, then {large:.0} MB");
    assert!(
        large - small < 20.0 && large < 1024.0,
        "streaming: {small:.0} MB, then {large:.0} MB"
    );
    let (small, large) = (peak(150, "resident"), peak(600, "resident"));
    eprintln!("in memory: {small:.0} MB, then {large:.0} MB");
    assert!(
        large - small > 100.0,
        "in memory: {small:.0} MB, then {large:.0} MB"
    );
}
