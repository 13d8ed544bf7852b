//! `vggctl finetune` and weight resolution: with frozen features the features
//! come out bit-identical to the loaded torchvision weights (BatchNorm
//! statistics included) while the classifier trains and `classifier.6` takes
//! the new class count; `--train-features` / `--freeze-until` unfreeze;
//! unreadable images are skipped or, with --strict, an error; torchvision's
//! files are found in ./weights and $TORCH_HOME and downloaded with their
//! hash checked; predict's preprocessing is torchvision's eval transform
//! pixel for pixel.

mod common;

use std::path::{Path, PathBuf};

use vggctl::formats::pth::read_pth;
use vggctl::formats::safetensors::read_safetensors;
use vggctl::hub;

fn fixture(p: &str) -> String {
    common::fixtures().join(p).display().to_string()
}

fn finetune(out: &Path, weights: &str, arch: &str, extra: &[&str]) -> common::Run {
    let photos = fixture("photos");
    let mut args = vec![
        "finetune",
        "--weights",
        weights,
        "--arch",
        arch,
        "--dataset",
        "folder",
        "--data-dir",
        &photos,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--limit-train",
        "16",
        "--quiet",
        "--device",
        "cpu",
    ];
    let o = out.display().to_string();
    args.extend_from_slice(&["--out", &o]);
    args.extend_from_slice(extra);
    let dir = common::tempdir();
    common::run_in(dir.path(), &args)
}

fn changed(a: &tch::Tensor, b: &tch::Tensor) -> bool {
    !a.equal(b)
}

#[test]
fn frozen_features_stay_bit_identical_and_the_head_trains() {
    let tmp = common::tempdir();
    let weights = fixture("pth/vgg16_bn.zip.pth");
    let out = tmp.path().join("ft");
    let r = finetune(&out, &weights, "vgg16_bn", &["--input", "32"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("skipped 1 unreadable image"),
        "{}",
        r.stderr
    );
    let before = read_pth(Path::new(&weights)).unwrap();
    let after = read_safetensors(&out.join("last.safetensors")).unwrap();
    for (k, t) in &after.tensors {
        if k.starts_with("features.") {
            // Running statistics too: BatchNorm in frozen features stays in eval mode.
            assert!(
                t.equal(&before[k]),
                "{k} changed although features are frozen"
            );
        }
    }
    assert_eq!(after.tensors["classifier.6.weight"].size(), vec![3, 4096]);
    assert_eq!(after.tensors["classifier.6.bias"].size(), vec![3]);
    assert!(changed(
        &after.tensors["classifier.0.weight"],
        &before["classifier.0.weight"]
    ));
    assert!(changed(
        &after.tensors["classifier.3.bias"],
        &before["classifier.3.bias"]
    ));
    let meta = &after.metadata;
    assert_eq!(meta["class_names"], r#"["astronaut","cat","coffee"]"#);
    assert_eq!(meta["mean"], "[0.485,0.456,0.406]");
    // No optimizer state for frozen parameters.
    let resume = read_safetensors(&out.join("resume.safetensors"))
        .unwrap()
        .tensors;
    assert!(
        !resume
            .keys()
            .any(|k| k.starts_with("optimizer.") && k.contains(".features."))
    );
    assert!(resume.contains_key("optimizer.momentum_buffer.classifier.6.weight"));
}

#[test]
fn unfreezing_trains_the_features() {
    let tmp = common::tempdir();
    let weights = fixture("pth/vgg11.legacy.pth");
    let before = read_pth(Path::new(&weights)).unwrap();

    let out = tmp.path().join("all");
    let r = finetune(
        &out,
        &weights,
        "vgg11",
        &["--input", "32", "--train-features"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let after = read_safetensors(&out.join("last.safetensors"))
        .unwrap()
        .tensors;
    assert!(changed(
        &after["features.0.weight"],
        &before["features.0.weight"]
    ));

    // vgg11: features.0 conv, .1 relu, .2 pool, .3 conv; freeze the first three modules.
    let out = tmp.path().join("partial");
    let r = finetune(
        &out,
        &weights,
        "vgg11",
        &["--input", "32", "--freeze-until", "3"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let after = read_safetensors(&out.join("last.safetensors"))
        .unwrap()
        .tensors;
    assert!(after["features.0.weight"].equal(&before["features.0.weight"]));
    assert!(changed(
        &after["features.3.weight"],
        &before["features.3.weight"]
    ));
}

#[test]
fn bad_fine_tuning_input() {
    let tmp = common::tempdir();
    let weights = fixture("pth/vgg11.legacy.pth");
    let r = finetune(
        &tmp.path().join("a"),
        &weights,
        "vgg11",
        &["--input", "32", "--strict"],
    );
    common::assert_one_line_error(&r, 1, "broken.jpg");
    let r = finetune(
        &tmp.path().join("b"),
        &weights,
        "vgg11",
        &["--input", "32", "--classes", "5"],
    );
    common::assert_one_line_error(&r, 1, "(folder), which has 3 classes");
    let r = finetune(
        &tmp.path().join("c"),
        &weights,
        "vgg11_bn",
        &["--input", "32"],
    );
    common::assert_one_line_error(
        &r,
        1,
        "the weights are a vgg11 with the imagenet head and 1000 classes, but --arch/--bn ask for vgg11_bn",
    );
    let r = finetune(
        &tmp.path().join("d"),
        "/no/such/weights.pth",
        "vgg11",
        &["--input", "32"],
    );
    common::assert_one_line_error(&r, 1, "/no/such/weights.pth");
}

fn predict_with(cwd: &Path, torch_home: &Path, url: &str, arch: &str) -> common::Run {
    let img = fixture("photos/cat/cat_01.png");
    let out = std::process::Command::new(common::bin())
        .args([
            "predict",
            "--weights",
            "imagenet",
            "--arch",
            arch,
            "--device",
            "cpu",
            "--input",
            "32",
            "--json",
            &img,
        ])
        .current_dir(cwd)
        .env("TORCH_HOME", torch_home)
        .env("VGGCTL_WEIGHTS_URL", url)
        .output()
        .unwrap();
    common::Run::from(out)
}

fn link(target: &str, at: PathBuf) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, at).unwrap();
}

#[test]
fn torchvision_files_are_found_in_weights_and_torch_home() {
    let weights = fixture("pth/vgg11.legacy.pth");
    let dead = "http://127.0.0.1:9/models";
    // ./weights/ in the working directory.
    let cwd = common::tempdir();
    let empty_home = common::tempdir();
    link(&weights, cwd.path().join("weights/vgg11-8a719046.pth"));
    let r = predict_with(cwd.path(), empty_home.path(), dead, "vgg11");
    assert_eq!(r.code, 0, "{}", r.stderr);
    // $TORCH_HOME/hub/checkpoints/.
    let home = common::tempdir();
    link(
        &weights,
        home.path().join("hub/checkpoints/vgg11-8a719046.pth"),
    );
    let r = predict_with(common::tempdir().path(), home.path(), dead, "vgg11");
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Nowhere, and offline: one line saying which file to put where.
    let r = predict_with(common::tempdir().path(), empty_home.path(), dead, "vgg13");
    common::assert_one_line_error(&r, 1, "put vgg13-19584684.pth into ./weights/ or");
    assert!(
        r.stderr.contains(
            &empty_home
                .path()
                .join("hub/checkpoints")
                .display()
                .to_string()
        ),
        "{}",
        r.stderr
    );
}

fn serve(body: Vec<u8>) -> String {
    format!("http://{}/models", common::serve(body))
}

#[test]
fn downloads_are_kept_only_when_the_hash_prefix_matches() {
    use sha2::Digest;
    let body = std::fs::read(fixture("pth/views.legacy.pth")).unwrap();
    let hash: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("vgg11-{}.pth", &hash[..8]);
    let base = serve(body.clone());
    let dir = common::tempdir();
    let got = hub::fetch(&base, &name, dir.path(), &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), body);
    assert_eq!(
        hub::find_local(&name, &[dir.path().to_path_buf()]),
        Some(got)
    );

    // Same name, other content: rejected and removed, .part included.
    let mut other = body.clone();
    other[100] ^= 1;
    let base = serve(other);
    let dir = common::tempdir();
    let e = format!(
        "{:#}",
        hub::fetch(&base, &name, dir.path(), &mut |_, _| {}).unwrap_err()
    );
    assert!(
        e.contains("checksum mismatch") && e.contains(&hash[..8]),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(hub::hash_prefix("vgg16-397923af.pth"), Some("397923af"));
}

/// `predict` with vgg11 weights from `weights`, `extra` options and one image.
fn predict_args<'a>(weights: &'a str, extra: &[&'a str], image: &'a str) -> Vec<&'a str> {
    let mut v = vec!["predict", "--weights", weights, "--arch", "vgg11"];
    v.extend_from_slice(extra);
    v.push(image);
    v
}

#[test]
fn bad_predict_and_eval_requests() {
    let dir = common::tempdir();
    let photo = fixture("photos/cat/cat_01.png");
    let broken = fixture("photos/cat/broken.jpg");
    let weights = fixture("pth/vgg11.legacy.pth");
    let plain = fixture("models/vgg11-cifar.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["predict", &photo],
            "give --checkpoint PATH or --weights imagenet|PATH",
        ),
        (
            predict_args(&weights, &["--topk", "0"], &photo),
            "--topk must be at least 1",
        ),
        (
            predict_args(&weights, &["--batch-size", "0"], &photo),
            "--batch-size must be at least 1",
        ),
        (
            predict_args(&weights, &["--input", "32"], &broken),
            "broken.jpg: not a readable image",
        ),
        (
            predict_args(&weights, &[], dir.path().to_str().unwrap()),
            "no images in this directory or its subfolders (images are .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)",
        ),
        (
            vec!["predict", "--checkpoint", &plain, &photo],
            "no vggctl metadata",
        ),
        (
            vec![
                "eval",
                "--checkpoint",
                &plain,
                "--arch",
                "vgg11",
                "--head",
                "cifar",
                "--classes",
                "10",
                "--data-dir",
                "/no/data",
                "--no-download",
            ],
            "/no/data",
        ),
    ];
    for (args, needle) in cases {
        // The flags' own mistakes are usage errors (2); the rest failed running (1).
        let code = if needle.starts_with("give ") || needle.starts_with("--") {
            2
        } else {
            1
        };
        common::assert_one_line_error(&common::run_in(dir.path(), &args), code, needle);
    }
}

/// A photo at each shape a folder can hold (width x height): the fixtures'
/// 6:5 landscape, 4:3 and 3:4, 2:1 and 1:2 (wider than the 3:2 canvas),
/// square.
fn photos_of_every_shape(dir: &Path) -> Vec<PathBuf> {
    let photo = image::open(fixture("photos/cat/cat_01.png")).unwrap();
    [
        (96, 80),
        (120, 90),
        (90, 120),
        (200, 100),
        (100, 200),
        (80, 80),
    ]
    .iter()
    .map(|&(w, h)| {
        let path = dir.join(format!("{w}x{h}.png"));
        photo
            .resize_exact(w, h, image::imageops::FilterType::Triangle)
            .save(&path)
            .unwrap();
        path
    })
    .collect()
}

/// At 256/224 and at sides whose difference is odd (73/64, 109/96), where
/// torchvision's centre crop of a 4:3 photo starts half a pixel off and
/// rounds it to even, once.
#[test]
fn cached_folder_images_are_exactly_what_predict_sees() {
    use tch::Tensor;
    use vggctl::data::augment::{LAYOUT, canvas_centre_crop, canvas_width};
    use vggctl::data::folder::decode_canvas;
    use vggctl::data::image::{eval_transform, read_image};
    use vggctl::data::resize::Filter;
    let tmp = common::tempdir();
    let mut paths = photos_of_every_shape(tmp.path());
    paths.push(PathBuf::from(fixture("photos/coffee/coffee_03.jpg")));
    let sides = [
        (256, 224, Filter::Bilinear),
        (73, 64, Filter::Bilinear),
        (109, 96, Filter::Bilinear),
        (256, 224, Filter::Bicubic),
        (73, 64, Filter::Bicubic),
    ];
    for (side, crop, filter) in sides {
        for path in &paths {
            // What fine-tuning and eval feed the model: the centre crop of
            // the cached canvas.
            let (pixels, layout) = decode_canvas(path, side, filter).unwrap();
            let canvas = Tensor::from_slice(&pixels).view([1, 3, side, canvas_width(side)]);
            let layout = Tensor::from_slice(&layout).view([1, LAYOUT]);
            let eval = canvas_centre_crop(&canvas, &layout, crop);
            // What predict feeds it: torchvision's Resize + CenterCrop.
            let image = read_image(path).unwrap();
            let predict = eval_transform(&image, Some(side), crop, filter).unsqueeze(0);
            assert!(
                eval.equal(&predict),
                "{side}/{crop} {filter:?}: {}",
                path.display()
            );
        }
    }
}

/// A cached canvas holds the whole resized image (up to 3:2; beyond, the
/// window around the centre square), and a random resized crop of a batch
/// of canvases equals `resized_crop_flip` (itself equal to torchvision's
/// `F.resized_crop`) of each resized image with the same box and flip,
/// within 1e-3 of 255 (float rounding of the source positions).
#[test]
fn canvas_crops_are_crops_of_the_whole_resized_image() {
    use tch::{Kind, Tensor};
    use vggctl::data::augment::{canvas_crop_flip, resized_crop_flip};
    use vggctl::data::folder::decode_canvas;
    use vggctl::data::image::{centre_offset, read_image, resize_shorter};
    use vggctl::data::resize::Filter;
    use vggctl::data::resized_crop::{CropBoxes, CropRange, random_resized_boxes};
    let tmp = common::tempdir();
    let paths = photos_of_every_shape(tmp.path());
    let side = 64;
    let (mut canvases, mut layouts, mut images) = (Vec::new(), Vec::new(), Vec::new());
    for path in &paths {
        let (pixels, layout) = decode_canvas(path, side, Filter::Bilinear).unwrap();
        let canvas = Tensor::from_slice(&pixels).view([3, side, 96]);
        let [first, visible, transposed, _] = layout;
        let unpacked = canvas.narrow(2, first, visible);
        let unpacked = if transposed == 1 {
            unpacked.transpose(1, 2)
        } else {
            unpacked
        };
        let resized = resize_shorter(&read_image(path).unwrap(), side);
        let (_, h, w) = resized.size3().unwrap();
        let (axis, long) = if h > w { (1, h) } else { (2, w) };
        assert_eq!(transposed == 1, h > w, "{}", path.display());
        if long <= 96 {
            assert_eq!(visible, long, "{}", path.display());
            assert!(unpacked.equal(&resized), "{}", path.display());
        } else {
            // The window the canvas keeps holds the centre square.
            let centre = centre_offset(long, side);
            let start = (0..=long - 96)
                .find(|&s| resized.narrow(axis, s, 96).equal(&unpacked))
                .unwrap_or_else(|| panic!("{}: not a window", path.display()));
            assert!(start <= centre && centre + side <= start + 96);
        }
        canvases.push(canvas);
        layouts.push(Tensor::from_slice(&layout));
        images.push(unpacked);
    }
    let (canvases, layout) = (Tensor::stack(&canvases, 0), Tensor::stack(&layouts, 0));
    let b = images.len() as i64;
    tch::manual_seed(11);
    for round in 0..4 {
        let dims = |axis: usize| {
            let v: Vec<f32> = images.iter().map(|i| i.size()[axis] as f32).collect();
            Tensor::from_slice(&v)
        };
        let boxes = random_resized_boxes(&dims(1), &dims(2), CropRange::default());
        let flip = Tensor::rand([b], (Kind::Float, tch::Device::Cpu)).lt(0.5);
        let filter = [Filter::Bilinear, Filter::Bicubic][round % 2];
        let got = canvas_crop_flip(&canvases, &layout, &boxes, &flip, (32, filter));
        for (i, img) in images.iter().enumerate() {
            let i = i as i64;
            let one = |t: &Tensor| t.narrow(0, i, 1);
            let own = CropBoxes {
                top: one(&boxes.top),
                left: one(&boxes.left),
                height: one(&boxes.height),
                width: one(&boxes.width),
            };
            let want = resized_crop_flip(&img.unsqueeze(0), &own, &one(&flip), (32, filter));
            let err = (got.narrow(0, i, 1) - want).abs().max().double_value(&[]);
            assert!(
                err < 1e-3,
                "round {round}, {}: max error {err}",
                paths[i as usize].display()
            );
        }
    }
}

/// torchvision's eval transform on uint8 tensors (Resize(256, antialias) +
/// CenterCrop(224)) and ours agree pixel for pixel, at sizes whose centre
/// offset is a half: a 4:3 photo resizes to 341 x 256, and CenterCrop
/// rounds 58.5 to 58 as Python does (rounding it up shifted every 4:3
/// landscape photo by one column).
#[test]
fn predicts_preprocessing_is_torchvisions_eval_transform() {
    use vggctl::data::image::eval_transform;
    use vggctl::data::resize::Filter;
    let refs = read_safetensors(&common::fixtures().join("eval_transform.safetensors"))
        .unwrap()
        .tensors;
    for k in 0..5 {
        let source = &refs[&format!("source_{k}")];
        let theirs = &refs[&format!("expected_{k}")];
        let ours = eval_transform(source, Some(256), 224, Filter::Bilinear);
        assert_eq!(ours.size(), theirs.size(), "image {k}");
        let diff = (ours.to_kind(tch::Kind::Float) - theirs.to_kind(tch::Kind::Float)).abs();
        assert!(
            ours.equal(theirs),
            "image {k} {:?}: max difference {}, mean {}",
            source.size(),
            diff.max().double_value(&[]),
            diff.mean(tch::Kind::Float).double_value(&[])
        );
    }
    // Bicubic: the same, pixel for pixel.
    for k in 0..5 {
        let source = &refs[&format!("source_{k}")];
        let theirs = &refs[&format!("bicubic_{k}")];
        let ours = eval_transform(source, Some(256), 224, Filter::Bicubic);
        assert!(ours.equal(theirs), "image {k} bicubic");
    }
}

/// The on-disk folder cache: a second load reads it (a cache edited on
/// disk comes back as edited, unless its labels or layout cannot be this
/// folder's), a changed image file changes the key and is decoded again,
/// and a damaged cache is rebuilt without an error.
#[test]
fn the_folder_cache_is_reused_and_rebuilt_when_files_change() {
    use std::collections::HashMap;
    use vggctl::data::folder::{FolderOptions, load};
    use vggctl::formats::safetensors::write_safetensors;
    let tmp = common::tempdir();
    let root = tmp.path().join("data");
    for class in ["cat", "coffee"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in ["01", "02", "04"] {
            let name = format!("{class}_{i}.png");
            std::fs::copy(
                fixture(&format!("photos/{class}/{name}")),
                root.join(class).join(&name),
            )
            .unwrap();
        }
    }
    let opts = FolderOptions {
        dir: root.clone(),
        val_dir: None,
        val_split: 0.5,
        seed: 0,
        cache_size: 36,
        filter: Default::default(),
        strict: true,
        cache_dir: Some(tmp.path().join("cache")),
        cache_mem: u64::MAX,
        workers: 1,
        imagenet: false,
        test_only: false,
        own_val: false,
    };
    let caches = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let all = |d: &vggctl::data::Dataset| {
        let (train, test) = (
            d.train.as_resident().unwrap(),
            d.test.as_resident().unwrap(),
        );
        tch::Tensor::cat(&[&train.images, &test.images], 0)
            .sum(tch::Kind::Int64)
            .int64_value(&[])
    };
    let first = load(&opts, &mut |w| panic!("{w}")).unwrap();
    assert_eq!(
        first
            .train
            .as_resident()
            .unwrap()
            .layout
            .as_ref()
            .unwrap()
            .size(),
        [3, 4]
    );
    let cache = caches();
    assert_eq!(cache.len(), 1);
    assert_eq!(
        all(&load(&opts, &mut |w| panic!("{w}")).unwrap()),
        all(&first)
    );

    // Edited on disk: read as it is (the cache is trusted while its key holds).
    let sd = read_safetensors(&cache[0]).unwrap();
    let mut tensors: Vec<(String, tch::Tensor)> = sd.tensors.into_iter().collect();
    for (name, t) in tensors.iter_mut() {
        if name == "images" {
            *t = t.zeros_like();
        }
    }
    write_safetensors(&cache[0], &tensors, &HashMap::new()).unwrap();
    assert_eq!(all(&load(&opts, &mut |w| panic!("{w}")).unwrap()), 0);
    // Written before caches said which files they hold: read while it
    // holds every file, rebuilt where its files repeat.
    let without_kept: Vec<(String, tch::Tensor)> = tensors
        .iter()
        .filter(|(name, _)| name != "kept")
        .map(|(name, t)| (name.clone(), t.shallow_clone()))
        .collect();
    assert_eq!(without_kept.len() + 1, tensors.len());
    write_safetensors(&cache[0], &without_kept, &HashMap::new()).unwrap();
    assert_eq!(all(&load(&opts, &mut |w| panic!("{w}")).unwrap()), 0);
    let mut repeated = without_kept;
    repeated.push((
        "kept".into(),
        tch::Tensor::from_slice(&[0i64, 0, 1, 2, 3, 4]),
    ));
    write_safetensors(&cache[0], &repeated, &HashMap::new()).unwrap();
    assert_eq!(
        all(&load(&opts, &mut |w| panic!("{w}")).unwrap()),
        all(&first)
    );
    write_safetensors(&cache[0], &tensors, &HashMap::new()).unwrap();

    // Labels no file has (or layout rows outside the canvas): rebuilt from the files.
    for (name, t) in tensors.iter_mut() {
        if name == "labels" {
            *t = t.full_like(99);
        }
    }
    write_safetensors(&cache[0], &tensors, &HashMap::new()).unwrap();
    let rebuilt = load(&opts, &mut |w| panic!("{w}")).unwrap();
    assert_eq!(all(&rebuilt), all(&first));
    assert!(
        rebuilt
            .train
            .as_resident()
            .unwrap()
            .labels
            .max()
            .int64_value(&[])
            < 2
    );

    // A changed image: a new key, decoded again.
    let changed = root.join("cat").join("cat_01.png");
    image::open(&changed)
        .unwrap()
        .fliph()
        .save(&changed)
        .unwrap();
    let again = load(&opts, &mut |w| panic!("{w}")).unwrap();
    assert_eq!(caches().len(), 2);
    assert!(all(&again) > 0);

    // A damaged cache is rebuilt.
    for c in caches() {
        std::fs::write(&c, b"damaged").unwrap();
    }
    assert_eq!(
        all(&load(&opts, &mut |w| panic!("{w}")).unwrap()),
        all(&again)
    );
}

/// The folder cache goes to `--cache-dir`, else under `$XDG_CACHE_HOME`,
/// never into the data folder, which a run leaves as it was.
#[test]
fn the_folder_cache_lives_outside_the_data() {
    let tmp = common::tempdir();
    let root = tmp.path().join("data");
    for class in ["cat", "coffee"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in ["01", "02"] {
            let name = format!("{class}_{i}.png");
            let src = fixture(&format!("photos/{class}/{name}"));
            std::fs::copy(src, root.join(class).join(&name)).unwrap();
        }
    }
    let listing = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = walk(d)
            .iter()
            .map(|p| p.strip_prefix(d).unwrap().display().to_string())
            .collect();
        v.sort();
        v
    };
    let before = listing(&root);
    for (i, by_flag) in [false, true].into_iter().enumerate() {
        let xdg = tmp.path().join(format!("xdg{i}"));
        let flag_dir = tmp.path().join(format!("flag{i}"));
        let out = tmp.path().join(format!("run{i}"));
        let mut cmd = std::process::Command::new(common::bin());
        cmd.args([
            "train",
            "--dataset",
            "folder",
            "--arch",
            "vgg11",
            "--head",
            "gap",
        ])
        .args(["--epochs", "1", "--batch-size", "2", "--quiet"])
        .arg("--data-dir")
        .arg(&root)
        .arg("--out")
        .arg(&out)
        .env("XDG_CACHE_HOME", &xdg)
        .env_remove("VGGCTL_CACHE_DIR");
        if by_flag {
            cmd.arg("--cache-dir").arg(&flag_dir);
        }
        let r = common::Run::from(cmd.output().unwrap());
        assert_eq!(r.code, 0, "{}", r.stderr);
        let cache = if by_flag {
            flag_dir
        } else {
            xdg.join("vggctl/folders")
        };
        let cached = listing(&cache);
        assert!(
            cached.len() == 1 && cached[0].ends_with(".safetensors"),
            "{cached:?}"
        );
        assert_eq!(listing(&root), before, "the data folder changed");
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}
