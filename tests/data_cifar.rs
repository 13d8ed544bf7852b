//! CIFAR-10 and CIFAR-100 loading: both layouts give the same real images
//! (CIFAR-100: its fine labels, none of its coarse ones); malformed files
//! give one error line naming the file; the download is fetched from a local
//! HTTP server, verified, extracted, and rejected without leftovers when bad;
//! the augmentation equals torchvision's transforms: RandomCrop + flip
//! exactly; RandomResizedCrop's boxes drawn from the same distribution as
//! torchvision's get_params (two-sample Kolmogorov-Smirnov test), and the
//! crop + resize + flip of given boxes equal to `F.resized_crop` (antialiased) within 1e-3.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use vggctl::data::augment::{Normalizer, crop_flip, random_crop_flip, resized_crop_flip};
use vggctl::data::cifar;
use vggctl::data::resize::Filter;
use vggctl::data::resized_crop::{CropBoxes, CropRange, random_resized_boxes};
use vggctl::formats::safetensors::read_safetensors;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn both_layouts_hold_the_same_images() {
    let f = common::fixtures();
    let bin = cifar::CIFAR10
        .load(&f.join("digits-bin"), false, None, &mut |_, _| {})
        .unwrap();
    let py = cifar::CIFAR10
        .load(&f.join("digits-py"), false, None, &mut |_, _| {})
        .unwrap();
    assert_eq!(bin.train.len(), 1500);
    assert_eq!(bin.test.len(), 297);
    let (bin_train, bin_test, py_train, py_test) = (
        bin.train.as_resident().unwrap(),
        bin.test.as_resident().unwrap(),
        py.train.as_resident().unwrap(),
        py.test.as_resident().unwrap(),
    );
    assert!(bin_train.images.equal(&py_train.images));
    assert!(bin_train.labels.equal(&py_train.labels));
    assert!(bin_test.images.equal(&py_test.images));
    assert!(bin_test.labels.equal(&py_test.labels));
    assert_eq!(bin.classes, py.classes);
    assert_eq!(bin.classes[3], "three");
    // Evaluation's read: the same test split, no training images.
    for layout in ["digits-bin", "digits-py"] {
        let eval = cifar::CIFAR10
            .load(&f.join(layout), true, None, &mut |_, _| {})
            .unwrap();
        assert_eq!(
            (eval.train.len(), eval.classes.clone()),
            (0, py.classes.clone())
        );
        assert!(
            eval.test
                .as_resident()
                .unwrap()
                .images
                .equal(&py_test.images)
        );
    }
    // Real digits: all ten classes, and images that are not blank.
    let per_class = bin_train.labels.bincount::<Tensor>(None, 10);
    assert!(per_class.min().int64_value(&[]) > 100, "{per_class:?}");
    assert!(
        bin_train
            .images
            .to_kind(Kind::Float)
            .std(true)
            .double_value(&[])
            > 30.0
    );
}

/// The fixtures' CIFAR-100 (the same digits, fine label 10*d + 3, coarse
/// d / 2) in both layouts: the same images as the CIFAR-10 fixtures, the
/// fine labels, 100 class names; a fine label of 100 is named, a coarse
/// byte is never read as the label.
#[test]
fn cifar100_reads_its_fine_labels_in_both_layouts() {
    let f = common::fixtures();
    let ten = cifar::CIFAR10
        .load(&f.join("digits-bin"), false, None, &mut |_, _| {})
        .unwrap();
    let (bin, py) = (
        cifar::CIFAR100
            .load(&f.join("digits-bin"), false, None, &mut |_, _| {})
            .unwrap(),
        cifar::CIFAR100
            .load(&f.join("digits-py"), false, None, &mut |_, _| {})
            .unwrap(),
    );
    assert_eq!((bin.name.as_str(), bin.classes.len()), ("cifar100", 100));
    assert_eq!(bin.classes, py.classes);
    assert_eq!(bin.classes[13], "fine_13");
    assert_eq!(bin.mean, cifar::CIFAR100.mean);
    for (a, b) in [
        (&bin.train, &ten.train),
        (&bin.test, &ten.test),
        (&py.train, &ten.train),
    ] {
        let (a, b) = (a.as_resident().unwrap(), b.as_resident().unwrap());
        assert!(a.images.equal(&b.images));
        assert!(a.labels.equal(&(&b.labels * 10 + 3)));
    }
    let py_test = py.test.as_resident().unwrap();
    assert!(
        py_test
            .labels
            .equal(&bin.test.as_resident().unwrap().labels)
    );

    let tmp = common::tempdir();
    let root = tmp.path();
    copy_dir(&f.join("digits-bin"), root);
    let p = root.join("cifar-100-binary/test.bin");
    let mut bytes = fs::read(&p).unwrap();
    bytes[3074 * 7] = 250; // a coarse label: not read
    fs::write(&p, &bytes).unwrap();
    let loaded = cifar::CIFAR100
        .load(root, false, None, &mut |_, _| {})
        .unwrap();
    let labels = &loaded.test.as_resident().unwrap().labels;
    assert!(labels.equal(&bin.test.as_resident().unwrap().labels));
    bytes[3074 * 7 + 1] = 100; // a fine label out of range
    fs::write(&p, &bytes).unwrap();
    common::assert_one_line_error(
        &load_error(&["--dataset", "cifar100"], root),
        1,
        "test.bin: record 7 has label 100, outside 0..99",
    );
    fs::remove_file(&p).unwrap();
    common::assert_one_line_error(
        &load_error(&["--dataset", "cifar100"], root),
        1,
        "test.bin: missing (CIFAR-100's folder holds train.bin, test.bin",
    );
}

fn load_error(args: &[&str], data_dir: &Path) -> common::Run {
    let dir = common::tempdir();
    let mut all = vec![
        "train",
        "--epochs",
        "1",
        "--no-download",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    common::run_in(dir.path(), &all)
}

#[test]
fn malformed_binary_files_are_named() {
    let f = common::fixtures();
    let tmp = common::tempdir();
    let root = tmp.path();
    let bin = root.join("cifar-10-batches-bin");

    // A truncated record: the file size is not a whole number of records.
    copy_dir(&f.join("digits-bin"), root);
    let p = bin.join("data_batch_2.bin");
    let len = fs::metadata(&p).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    common::assert_one_line_error(
        &load_error(&[], root),
        1,
        "data_batch_2.bin: 921800 bytes is not a whole number of 3073-byte records",
    );

    // A label outside 0..9.
    copy_dir(&f.join("digits-bin"), root);
    let p = bin.join("test_batch.bin");
    let mut bytes = fs::read(&p).unwrap();
    bytes[3073 * 5] = 12;
    fs::write(&p, bytes).unwrap();
    common::assert_one_line_error(
        &load_error(&[], root),
        1,
        "test_batch.bin: record 5 has label 12, outside 0..9",
    );

    // A missing batch.
    copy_dir(&f.join("digits-bin"), root);
    fs::remove_file(bin.join("data_batch_3.bin")).unwrap();
    common::assert_one_line_error(&load_error(&[], root), 1, "data_batch_3.bin: missing");

    // An empty file.
    copy_dir(&f.join("digits-bin"), root);
    fs::write(bin.join("data_batch_1.bin"), b"").unwrap();
    common::assert_one_line_error(&load_error(&[], root), 1, "data_batch_1.bin: 0 bytes");
}

#[test]
fn malformed_pickles_are_named() {
    let f = common::fixtures();
    let tmp = common::tempdir();
    let root = tmp.path();
    copy_dir(&f.join("digits-py"), root);
    let py = root.join("cifar-10-batches-py");

    // A pickle of a dict without 'data': {'foo': 1} (protocol 2).
    fs::write(
        py.join("data_batch_4"),
        b"\x80\x02}q\x00X\x03\x00\x00\x00fooq\x01K\x01s.",
    )
    .unwrap();
    common::assert_one_line_error(
        &load_error(&[], root),
        1,
        "data_batch_4: unexpected content: no 'data' entry",
    );

    // A pickle that would run os.system('true'): refused, never executed.
    fs::write(
        py.join("data_batch_4"),
        b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.",
    )
    .unwrap();
    common::assert_one_line_error(
        &load_error(&[], root),
        1,
        "refusing to load the Python global os.system",
    );

    // Truncated in the middle of the pixel data.
    let good = fs::read(f.join("digits-py/cifar-10-batches-py/data_batch_4")).unwrap();
    fs::write(py.join("data_batch_4"), &good[..good.len() / 2]).unwrap();
    common::assert_one_line_error(
        &load_error(&[], root),
        1,
        "data_batch_4: not a CIFAR-10 pickle: pickle truncated",
    );
}

#[test]
fn missing_data_without_download_says_where_to_put_it() {
    let tmp = common::tempdir();
    let r = load_error(&[], tmp.path());
    common::assert_one_line_error(&r, 1, "cifar-10-batches-bin/");
    assert!(
        r.stderr.contains("downloading is off") && r.stderr.contains("by hand"),
        "{}",
        r.stderr
    );
}

/// Serves `body` to every request on 127.0.0.1 for as long as the test runs.
fn serve(body: Vec<u8>) -> String {
    format!("http://{}/cifar-10-binary.tar.gz", common::serve(body))
}

fn archive_of(dir: &Path, extra_evil: bool) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(dir.file_name().unwrap(), dir).unwrap();
    if extra_evil {
        // A member outside the expected folder must never be written.
        let data = b"pwned";
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "evil.txt", &data[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A short training run on the data in `data_dir`, or on what it downloads.
fn download_train(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> common::Run {
    let out = common::tempdir();
    let r = std::process::Command::new(common::bin())
        .args([
            "train",
            "--arch",
            "vgg11",
            "--epochs",
            "1",
            "--limit-train",
            "16",
        ])
        .args(["--limit-test", "8", "--batch-size", "8", "--quiet"])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--out")
        .arg(out.path().join("run"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    common::Run::from(r)
}

fn train_with_download(url: &str, md5: &str, data_dir: &Path) -> common::Run {
    let env = [("VGGCTL_CIFAR10_URL", url), ("VGGCTL_CIFAR10_MD5", md5)];
    download_train(data_dir, &[], &env)
}

#[test]
fn download_verifies_extracts_and_cleans_up() {
    let src = common::fixtures().join("digits-bin/cifar-10-batches-bin");
    let good = archive_of(&src, true);
    let url = serve(good.clone());

    // A good archive: fetched, verified, extracted (only expected members).
    let data = common::tempdir();
    let r = train_with_download(&url, &md5_hex(&good), data.path());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let bin = data.path().join("cifar-10-batches-bin");
    for name in [
        "data_batch_1.bin",
        "data_batch_5.bin",
        "test_batch.bin",
        "batches.meta.txt",
    ] {
        assert_eq!(
            fs::read(bin.join(name)).unwrap(),
            fs::read(src.join(name)).unwrap(),
            "{name}"
        );
    }
    assert!(!data.path().join("evil.txt").exists() && !bin.join("evil.txt").exists());

    // A corrupted archive: rejected on its checksum, nothing left behind.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let url = serve(bad);
    let data = common::tempdir();
    let r = train_with_download(&url, &md5_hex(&good), data.path());
    common::assert_one_line_error(&r, 1, "checksum mismatch");
    assert!(r.stderr.contains(&url), "{}", r.stderr);
    let left: Vec<_> = fs::read_dir(data.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // Offline: one line naming the URL and where to put the files.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/x.tar.gz", listener.local_addr().unwrap());
    drop(listener);
    let data = common::tempdir();
    let r = train_with_download(&dead, "0", data.path());
    common::assert_one_line_error(&r, 1, &dead);
    assert!(r.stderr.contains("by hand"));
}

/// `--dataset cifar100` downloads CIFAR-100's own archive: from
/// `VGGCTL_CIFAR100_URL` (CIFAR-10's variable is not read for it), or from
/// `--data-url`, which wins over the variable; all four members extracted.
#[test]
fn cifar100_downloads_its_own_archive() {
    let src = common::fixtures().join("digits-bin/cifar-100-binary");
    let good = archive_of(&src, false);
    let url = format!(
        "http://{}/cifar-100-binary.tar.gz",
        common::serve(good.clone())
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/x.tar.gz", listener.local_addr().unwrap());
    drop(listener);
    let md5 = md5_hex(&good);
    for (env_url, flag) in [(url.as_str(), None), (dead.as_str(), Some(url.as_str()))] {
        let data = common::tempdir();
        let mut extra = vec!["--dataset", "cifar100"];
        extra.extend(flag.iter().flat_map(|u| ["--data-url", u]));
        let env = [
            ("VGGCTL_CIFAR100_URL", env_url),
            ("VGGCTL_CIFAR100_MD5", md5.as_str()),
            ("VGGCTL_CIFAR10_URL", dead.as_str()),
        ];
        let r = download_train(data.path(), &extra, &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let got = data.path().join("cifar-100-binary");
        for name in [
            "train.bin",
            "test.bin",
            "fine_label_names.txt",
            "coarse_label_names.txt",
        ] {
            assert_eq!(
                fs::read(got.join(name)).unwrap(),
                fs::read(src.join(name)).unwrap()
            );
        }
    }
}

#[test]
fn augmentation_matches_torchvision() {
    let refs = read_safetensors(&common::fixtures().join("augment.safetensors"))
        .unwrap()
        .tensors;
    let flip = refs["flip"].to_kind(Kind::Bool);
    let cropped = crop_flip(&refs["images"], &refs["oy"], &refs["ox"], &flip, 4);
    let norm = Normalizer::new(cifar::MEAN, cifar::STD, Device::Cpu);
    let got = norm.apply(&cropped);
    let err = (&got - &refs["expected"]).abs().max().double_value(&[]);
    // torchvision divides by 255 and then normalizes; one fused multiply-add differs in rounding only.
    assert!(err < 1e-5, "max abs error {err}");
}

fn resized_crop_refs() -> BTreeMap<String, Tensor> {
    read_safetensors(&common::fixtures().join("resized_crop.safetensors"))
        .unwrap()
        .tensors
}

/// The largest distance between the empirical distribution functions of two
/// samples of whole numbers.
fn ks_distance(a: &[i64], b: &[i64]) -> f64 {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let v = a[i].min(b[j]);
        while i < a.len() && a[i] == v {
            i += 1;
        }
        while j < b.len() && b[j] == v {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// With torchvision's ranges, and with scale (0.25, 0.75) and ratio
/// (0.5, 2) (`--scale`, `--ratio`), where the clamped fallback is frequent.
#[test]
fn resized_crop_boxes_follow_torchvisions_distribution() {
    let refs = resized_crop_refs();
    let other = CropRange {
        scale: (0.25, 0.75),
        ratio: (0.5, 2.0),
    };
    for (prefix, range) in [("", CropRange::default()), ("wide_", other)] {
        boxes_follow_torchvision(&refs, prefix, range);
    }
}

fn boxes_follow_torchvision(refs: &BTreeMap<String, Tensor>, prefix: &str, range: CropRange) {
    tch::manual_seed(5);
    // One batch of all three shapes, interleaved: each image's own size counts.
    let shapes = [(73, 73), (40, 100), (100, 40)];
    let n = refs[&format!("boxes_{prefix}73x73")].size()[0];
    let dims = |k: usize| {
        let one = |s: [i64; 3]| Tensor::from_slice(&s.map(|v| v as f32)).repeat([n]);
        one(shapes.map(|s| if k == 0 { s.0 } else { s.1 }))
    };
    let b = random_resized_boxes(&dims(0), &dims(1), range);
    let all = Tensor::stack(&[&b.top, &b.left, &b.height, &b.width], 1);
    for (k, (h, w)) in shapes.into_iter().enumerate() {
        let theirs = &refs[&format!("boxes_{prefix}{h}x{w}")];
        assert_eq!(theirs.size()[0], n);
        let ours = all.slice(0, k as i64, None, 3);
        assert!(ours.equal(&ours.round()), "{h}x{w}: boxes are whole pixels");
        let ours = ours.to_kind(Kind::Int64);
        let (top, left, bh, bw) = (
            ours.select(1, 0),
            ours.select(1, 1),
            ours.select(1, 2),
            ours.select(1, 3),
        );
        assert!(bh.min().int64_value(&[]) >= 1 && bw.min().int64_value(&[]) >= 1);
        assert!((&top + &bh).max().int64_value(&[]) <= h && top.min().int64_value(&[]) >= 0);
        assert!((&left + &bw).max().int64_value(&[]) <= w && left.min().int64_value(&[]) >= 0);
        // Critical distance at a 0.001 level for two samples of n: 1.95 * sqrt(2 / n).
        let critical = 1.95 * (2.0 / n as f64).sqrt();
        for (k, what) in ["top", "left", "height", "width"].iter().enumerate() {
            let a: Vec<i64> = Vec::try_from(ours.select(1, k as i64)).unwrap();
            let t: Vec<i64> = Vec::try_from(theirs.select(1, k as i64)).unwrap();
            let d = ks_distance(&a, &t);
            assert!(
                d < critical,
                "{prefix}{h}x{w} {what}: KS distance {d:.4} >= {critical:.4}"
            );
        }
        // Area fraction: the joint of height and width.
        let area =
            |t: &Tensor| -> Vec<i64> { Vec::try_from(t.select(1, 2) * t.select(1, 3)).unwrap() };
        let d = ks_distance(&area(&ours), &area(theirs));
        assert!(
            d < critical,
            "{prefix}{h}x{w} area: KS distance {d:.4} >= {critical:.4}"
        );
    }
}

#[test]
fn resized_crops_match_torchvision() {
    let refs = resized_crop_refs();
    let boxes = refs["boxes"].to_kind(Kind::Float);
    let boxes = CropBoxes {
        top: boxes.select(1, 0),
        left: boxes.select(1, 1),
        height: boxes.select(1, 2),
        width: boxes.select(1, 3),
    };
    let flip = refs["flip"].to_kind(Kind::Bool);
    for (filter, expected) in [
        (Filter::Bilinear, "expected"),
        (Filter::Bicubic, "expected_bicubic"),
    ] {
        let got = resized_crop_flip(&refs["images"], &boxes, &flip, (32, filter));
        assert_eq!(got.size(), refs[expected].size());
        // Pixel values 0-255; float rounding of the source positions only.
        let err = (&got - &refs[expected]).abs().max().double_value(&[]);
        assert!(err < 1e-3, "{filter:?}: max abs error {err}");
    }
}

#[test]
fn random_crops_stay_in_bounds_and_flips_flip() {
    tch::manual_seed(3);
    // Distinct values per pixel so each window can be identified.
    let x = Tensor::arange(3 * 32 * 32, (Kind::Int64, Device::Cpu))
        .view([1, 3, 32, 32])
        .repeat([64, 1, 1, 1])
        + 1;
    let out = random_crop_flip(&x, 4, 0.5);
    let padded = x.constant_pad_nd([4, 4, 4, 4]);
    let mut flips = 0;
    for i in 0..64 {
        let o = out.get(i);
        let mut found = None;
        'search: for oy in 0..=8 {
            for ox in 0..=8 {
                let window = padded.get(i).narrow(1, oy, 32).narrow(2, ox, 32);
                for fl in [false, true] {
                    let w = if fl {
                        window.flip([2])
                    } else {
                        window.shallow_clone()
                    };
                    if w.equal(&o) {
                        found = Some(fl);
                        break 'search;
                    }
                }
            }
        }
        flips +=
            found.unwrap_or_else(|| panic!("image {i} is not a window of the padded image")) as i32;
    }
    // p = 0.5 over 64 images: far outside [12, 52] only with probability < 1e-6.
    assert!((12..=52).contains(&flips), "{flips} flips");
}

/// A server on 127.0.0.1 that accepts connections and never answers: the
/// download gives up after `VGGCTL_HTTP_TIMEOUT` seconds per try (3 tries),
/// names the URL, and leaves nothing behind, instead of hanging forever.
#[test]
fn a_server_that_never_answers_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/cifar-10-binary.tar.gz",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        // Hold every connection open without a byte of answer.
        let held: Vec<_> = listener.incoming().take(8).flatten().collect();
        std::thread::sleep(std::time::Duration::from_secs(60));
        drop(held);
    });
    let tmp = common::tempdir();
    let data = tmp.path().join("data");
    let t0 = std::time::Instant::now();
    let out = std::process::Command::new(common::bin())
        .args([
            "train",
            "--data-dir",
            data.to_str().unwrap(),
            "--data-url",
            &url,
        ])
        .args(["--epochs", "1", "--quiet"])
        .current_dir(tmp.path())
        .env("VGGCTL_HTTP_TIMEOUT", "1")
        .output()
        .unwrap();
    let elapsed = t0.elapsed();
    let r = common::Run::from(out);
    common::assert_one_line_error(&r, 1, "did not answer within 1 s (3 tries)");
    assert!(r.stderr.contains(&url), "{}", r.stderr);
    assert!(
        elapsed < std::time::Duration::from_secs(20),
        "took {elapsed:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&data)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}
