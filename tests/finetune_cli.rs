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

use vggctl::hub;
use vggctl::pth::read_pth;
use vggctl::weights::read_safetensors;

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
    common::assert_one_line_error(&r, 2, "broken.jpg");
    let r = finetune(
        &tmp.path().join("b"),
        &weights,
        "vgg11",
        &["--input", "32", "--classes", "5"],
    );
    common::assert_one_line_error(
        &r,
        2,
        "--classes 5 does not match the dataset, which has 3 classes",
    );
    let r = finetune(
        &tmp.path().join("c"),
        &weights,
        "vgg11_bn",
        &["--input", "32"],
    );
    common::assert_one_line_error(&r, 2, "without BatchNorm");
    let r = finetune(
        &tmp.path().join("d"),
        "/no/such/weights.pth",
        "vgg11",
        &["--input", "32"],
    );
    common::assert_one_line_error(&r, 2, "/no/such/weights.pth");
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
    common::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
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
    common::assert_one_line_error(&r, 2, "put vgg13-19584684.pth into ./weights/ or");
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
            "broken.jpg: not a readable JPEG or PNG image",
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
                "7",
                "--data-dir",
                "/no/data",
                "--no-download",
            ],
            "/no/data",
        ),
    ];
    for (args, needle) in cases {
        common::assert_one_line_error(&common::run_in(dir.path(), &args), 2, needle);
    }
}

#[test]
fn cached_folder_images_are_exactly_what_predict_sees() {
    use tch::Tensor;
    use vggctl::data::augment::center_crop;
    use vggctl::data::folder::decode_square;
    use vggctl::data::image::{eval_transform, read_image};
    // The fixture photos are landscape; add a portrait one.
    let tmp = common::tempdir();
    let portrait = tmp.path().join("portrait.png");
    image::open(fixture("photos/cat/cat_01.png"))
        .unwrap()
        .rotate90()
        .save(&portrait)
        .unwrap();
    let mut paths: Vec<PathBuf> = [
        "photos/cat/cat_00.jpg",
        "photos/cat/cat_01.png",
        "photos/coffee/coffee_03.jpg",
    ]
    .iter()
    .map(|p| PathBuf::from(fixture(p)))
    .collect();
    paths.push(portrait);
    for path in &paths {
        // What fine-tuning and eval feed the model: the cached square's centre.
        let cached = Tensor::from_slice(&decode_square(path, 256).unwrap()).view([1, 3, 256, 256]);
        let eval = center_crop(&cached, 224);
        // What predict feeds it: torchvision's Resize(256) + CenterCrop(224).
        let predict = eval_transform(&read_image(path).unwrap(), Some(256), 224).unsqueeze(0);
        assert!(eval.equal(&predict), "{}", path.display());
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
    let refs = read_safetensors(&common::fixtures().join("eval_transform.safetensors"))
        .unwrap()
        .tensors;
    for k in 0..5 {
        let source = &refs[&format!("source_{k}")];
        let theirs = &refs[&format!("expected_{k}")];
        let ours = eval_transform(source, Some(256), 224);
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
}
