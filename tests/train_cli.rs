//! `vggctl train` / `vggctl eval` through the real binary on real images
//! (scikit-learn's handwritten digits as CIFAR-10): accuracy, the files a run
//! writes, eval agreeing exactly with training, exact resume (after a clean
//! stop and after Ctrl-C), checkpoints surviving SIGKILL, and NaN detection.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use vggctl::formats::safetensors::{read_safetensors, write_safetensors};
use vggctl::train::read_resume;
use vggctl::train::state::{EpochMetrics, TrainSummary};

fn digits(layout: &str) -> String {
    common::fixtures()
        .join(format!("digits-{layout}"))
        .display()
        .to_string()
}

fn vggctl(args: &[&str]) -> common::Run {
    let dir = common::tempdir();
    common::run_in(dir.path(), args)
}

fn metrics(dir: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_same_weights(a: &Path, b: &Path) {
    let a = read_safetensors(a).unwrap().tensors;
    let b = read_safetensors(b).unwrap().tensors;
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs");
    }
}

/// `vggctl train` on the digits (binary layout) with `fixed`, `--out`, then `extra`.
/// Trains on the embedded digits (`--dataset digits`).
fn train_on_digits(fixed: &[&str], out: &Path, extra: &[&str]) -> common::Run {
    let mut args = vec!["train", "--dataset", "digits"];
    args.extend_from_slice(fixed);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    vggctl(&args)
}

/// VGG11-BN on the digits for 3 epochs (`extra` appended).
fn train_digits(out: &Path, extra: &[&str]) -> common::Run {
    let fixed = [
        "--arch",
        "vgg11",
        "--bn",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--scheduler",
        "cosine",
        "--no-download",
        "--json",
    ];
    train_on_digits(&fixed, out, extra)
}

#[test]
fn digits_reach_90_percent_and_eval_agrees() {
    let tmp = common::tempdir();
    let out = tmp.path().join("run");
    let r = train_digits(&out, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let summary: TrainSummary = serde_json::from_str(&r.stdout).unwrap();
    let last = summary.final_metrics.unwrap();
    assert!(
        last.test_top1 >= 90.0,
        "test top-1 {:.2}% after 3 epochs",
        last.test_top1
    );
    // One progress line per epoch on a non-terminal stderr, nothing else on stdout.
    assert_eq!(
        r.stderr.lines().filter(|l| l.starts_with("epoch")).count(),
        3,
        "{}",
        r.stderr
    );

    for f in [
        "config.json",
        "metrics.jsonl",
        "last.safetensors",
        "best.safetensors",
        "resume.safetensors",
        "curves.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let m = metrics(&out);
    assert_eq!(m.len(), 3);
    assert_eq!(m[2], last);
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "curves.svg has no lines"
    );
    // Titled with the run, three panels, the best epoch (by the metrics) marked.
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .map(|t| t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()].trim())
        .collect();
    assert_eq!(texts[0], format!("{}: vgg11_bn on digits", out.display()));
    for caption in ["loss", "top-1 accuracy (%)", "learning rate"] {
        assert!(texts.contains(&caption), "{caption}: {texts:?}");
    }
    let best = m
        .iter()
        .fold(&m[0], |b, e| if e.test_top1 > b.test_top1 { e } else { b });
    let mark = format!("best: epoch {}", best.epoch);
    assert_eq!(texts.iter().filter(|t| **t == mark).count(), 2, "{texts:?}");
    let meta = read_safetensors(&out.join("last.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(meta["arch"], "vgg11");
    assert_eq!(
        meta["class_names"],
        r#"["0","1","2","3","4","5","6","7","8","9"]"#
    );
    assert_eq!(meta["dataset"], "digits");

    // eval on the checkpoint, reading the same digits as CIFAR-10 in
    // torchvision's layout (made from scikit-learn by make_datasets.py):
    // exactly the training's figure, so the embedded images are those.
    let ckpt = out.join("last.safetensors");
    let r = vggctl(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--dataset",
        "cifar10",
        "--data-dir",
        &digits("py"),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["top1"].as_f64().unwrap(), last.test_top1);
    assert_eq!(e["top5"].as_f64().unwrap(), last.test_top5);
    assert_eq!(e["images"].as_i64().unwrap(), 297);
    let confusion: Vec<Vec<i64>> = serde_json::from_value(e["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<i64>(), 297);

    assert!(e["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        e.get("peak_gpu_bytes").is_none(),
        "no GPU memory figure on the CPU"
    );

    // predict names digits from the checkpoint alone: PNGs of the first test
    // example of each class, as the model sees them (32x32 RGB). At least 8
    // of 10 (the model scores over 90 % on the whole test split).
    let pngs = tmp.path().join("pngs");
    std::fs::create_dir(&pngs).unwrap();
    let d = vggctl::data::digits::load().unwrap();
    let test = d.test.as_resident().unwrap();
    let labels: Vec<i64> = Vec::try_from(&test.labels).unwrap();
    for class in 0..10 {
        let i = labels.iter().position(|&l| l == class).unwrap() as i64;
        let hwc = test.images.get(i).permute([1, 2, 0]).contiguous();
        let px: Vec<u8> = Vec::try_from(hwc.view([-1])).unwrap();
        image::RgbImage::from_raw(32, 32, px)
            .unwrap()
            .save(pngs.join(format!("{class}.png")))
            .unwrap();
    }
    let r = vggctl(&[
        "predict",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--topk",
        "1",
        "--json",
        pngs.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let preds: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(preds.len(), 10);
    let named = preds
        .iter()
        .filter(|p| {
            let stem = Path::new(p["image"].as_str().unwrap()).file_stem().unwrap();
            p["top"][0]["label"].as_str() == stem.to_str()
        })
        .count();
    assert!(named >= 8, "{named} of 10 digits named: {}", r.stdout);

    // GPU-only options fall back to fp32 with a warning: the same figures.
    let eval_as = |precision: &str| {
        vggctl(&[
            "eval",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--precision",
            precision,
            "--cuda-graphs",
            "--device",
            "cpu",
            "--json",
        ])
    };
    let r = eval_as("fp16");
    common::assert_warned(
        &r,
        &[
            "warning: --precision fp16 needs a CUDA device; evaluating in fp32",
            "warning: --cuda-graphs needs a CUDA device; evaluating eagerly",
        ],
    );
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["top1"].as_f64().unwrap(), last.test_top1);
    // bf16 runs on a CPU with native bf16 (else falls back like fp16):
    // the fp32-trained model scores within 1 point.
    let r = eval_as("bf16");
    let mut warnings = vec!["warning: --cuda-graphs needs a CUDA device; evaluating eagerly"];
    if !vggctl::numerics::cpu_has_native_bf16() {
        warnings.push("warning: --precision bf16 on the CPU needs native bf16 instructions");
    }
    common::assert_warned(&r, &warnings);
    if vggctl::numerics::cpu_has_native_bf16() {
        assert!(!r.stderr.contains("--precision"), "{}", r.stderr);
    }
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let top1 = e["top1"].as_f64().unwrap();
    assert!(
        (top1 - last.test_top1).abs() <= 1.0,
        "bf16 eval {top1}% vs fp32 {}%",
        last.test_top1
    );
    // --input resizes the images for the model; below 32 is one clear line.
    let eval_at = |input: &str, extra: &[&str]| {
        // The checkpoint names its dataset (the embedded digits).
        let mut args = vec!["eval", "--checkpoint", ckpt.to_str().unwrap()];
        args.extend_from_slice(&["--input", input]);
        args.extend_from_slice(extra);
        vggctl(&args)
    };
    let r = eval_at("48", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["images"].as_i64().unwrap(), 297);
    let r = eval_at("16", &[]);
    common::assert_one_line_error(&r, 2, "--input must be at least 32");
    let r = eval_at("4097", &[]);
    common::assert_one_line_error(&r, 2, "--input 4097 is too large: sides go up to 4096");
    // Memory running out inside libtorch (tch panics on it) is one line
    // with libtorch's reason, not a panic with a C++ backtrace: here the
    // largest side, whose first convolution's output at batch 4 (17 GB)
    // is more than an address space of 8 GB (ulimit -v) holds.
    let script =
        "ulimit -v 8000000; exec \"$0\" eval --checkpoint \"$1\" --input 4096 --batch-size 4";
    let o = Command::new("bash")
        .args(["-c", script, &common::bin(), ckpt.to_str().unwrap()])
        .output()
        .unwrap();
    let r = common::Run::from(o);
    common::assert_one_line_error(
        &r,
        1,
        "libtorch: DefaultCPUAllocator: can't allocate memory",
    );
    assert!(r.stderr.contains("a smaller --batch-size"), "{}", r.stderr);

    // On a CPU with native bf16, `--precision bf16` trains in bf16 autocast
    // (NHWC by default) to the fp32 run's accuracy. Within 2 points (6 of
    // 297 images): fp32 itself moves by 1.4 points between seeds here
    // (seeds 0-2: 97.0, 98.3, 98.0 %; bf16: 97.6, 98.7, 97.3 %).
    if vggctl::numerics::cpu_has_native_bf16() {
        let out = tmp.path().join("bf16");
        let r = train_digits(&out, &["--precision", "bf16"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(!r.stderr.contains("warning"), "{}", r.stderr);
        let bf16 = metrics(&out).pop().unwrap();
        assert_eq!(bf16.ran_as, "bf16, channels_last, fused update");
        assert!(
            (bf16.test_top1 - last.test_top1).abs() <= 2.0,
            "bf16 {}% vs fp32 {}%",
            bf16.test_top1,
            last.test_top1
        );
    }

    // The table form names the dataset, has images, recall, precision and F1
    // per class, and a confusion matrix whose lines all line up with its
    // header (10 rows of 10 counts).
    let r = vggctl(&["eval", "--checkpoint", ckpt.to_str().unwrap()]);
    assert!(
        r.stdout.contains("vgg11_bn on digits test (297 images)")
            && r.stdout
                .contains("class   images     recall  precision         F1"),
        "{}",
        r.stdout
    );
    let matrix: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("confusion matrix"))
        .skip(1)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(matrix.len(), 11, "{}", r.stdout);
    assert!(
        matrix.iter().all(|l| l.len() == matrix[0].len()),
        "{}",
        r.stdout
    );

    // A plain torchvision-named state dict (no metadata) with the model given on the command line.
    let plain = tmp.path().join("plain.safetensors");
    let sd = read_safetensors(&ckpt).unwrap();
    let tensors: Vec<_> = sd.tensors.into_iter().collect();
    write_safetensors(&plain, &tensors, &HashMap::new()).unwrap();
    let r = vggctl(&[
        "eval",
        "--checkpoint",
        plain.to_str().unwrap(),
        "--arch",
        "vgg11_bn",
        "--head",
        "cifar",
        "--dataset",
        "digits",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["top1"].as_f64().unwrap(), last.test_top1);
    // ... the same with the model inferred from it (said on stderr) ...
    let r = vggctl(&[
        "eval",
        "--checkpoint",
        plain.to_str().unwrap(),
        "--dataset",
        "digits",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("inferred vgg11_bn with the cifar head and 10 classes")
    );
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["top1"].as_f64().unwrap(), last.test_top1);
    // ... and a wrong architecture for it is one clear line.
    let r = vggctl(&[
        "eval",
        "--checkpoint",
        plain.to_str().unwrap(),
        "--arch",
        "vgg11",
        "--dataset",
        "digits",
    ]);
    common::assert_one_line_error(&r, 1, "but --arch says vgg11 (no BatchNorm)");
}

const SMALL: [&str; 12] = [
    "--arch",
    "vgg11",
    "--bn",
    "--batch-size",
    "32",
    "--limit-train",
    "320",
    "--limit-test",
    "32",
    "--seed",
    "7",
    "--quiet",
];

/// The recipe's options that carry state or draw randomness (the weights'
/// average, summed gradients, erasing and mixing): a resumed run must
/// continue them exactly too.
const RECIPE: [&str; 11] = [
    "--model-ema",
    "--model-ema-steps",
    "3",
    "--accum-steps",
    "2",
    "--mixup-alpha",
    "0.4",
    "--cutmix-alpha",
    "1.0",
    "--random-erase",
    "0.5",
];

fn train_small(out: &Path, extra: &[&str]) -> common::Run {
    let mut args = extra.to_vec();
    args.extend_from_slice(&RECIPE);
    train_on_digits(&SMALL, out, &args)
}

/// Adam's state (both moments and AMSGrad's largest second moments, by
/// parameter name) and its step count, which its bias correction reads,
/// survive a resume, and so do centered RMSprop's squared average,
/// gradient average and momentum buffer, and NAdam's moments and product
/// of momenta: 1 epoch then `--resume` to 2 ends with the weights of 2 in
/// one go, bit for bit.
#[test]
fn adam_rmsprop_and_nadam_runs_resume_exactly() {
    let tmp = common::tempdir();
    // NAdam's product of momenta is state of its own.
    for (kind, variant) in [
        ("adam", "--amsgrad"),
        ("rmsprop", "--centered"),
        ("nadam", "--momentum-decay=0.01"),
    ] {
        let args = [
            "--arch",
            "vgg11",
            "--batch-size",
            "16",
            "--limit-train",
            "64",
            "--limit-test",
            "16",
            "--optimizer",
            kind,
            variant,
            "--lr",
            "0.001",
            "--quiet",
        ];
        let straight = tmp.path().join(format!("{kind}-straight"));
        let split = tmp.path().join(format!("{kind}-split"));
        assert_eq!(
            train_on_digits(&args, &straight, &["--epochs", "2"]).code,
            0
        );
        assert_eq!(train_on_digits(&args, &split, &["--epochs", "1"]).code, 0);
        let dir = split.to_str().unwrap();
        if kind == "nadam" {
            refuses_missing_or_misshaped_state(&split);
        }
        let r = vggctl(&["train", "--resume", dir, "--epochs", "2", "--quiet"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_same_weights(
            &straight.join("last.safetensors"),
            &split.join("last.safetensors"),
        );
    }
}

/// A NAdam resume state without one of its tensors (a moment, the product
/// of momenta), or with the product mis-shaped, is one line naming the
/// file and the key; the state is left as it was.
fn refuses_missing_or_misshaped_state(run: &Path) {
    let sd = read_safetensors(&run.join("resume.safetensors")).unwrap();
    let key = "optimizer.mu_product.features.0.weight";
    let edits: [(&str, Option<Tensor>, String); 3] = [
        (
            "optimizer.exp_avg.classifier.3.bias",
            None,
            "optimizer state lacks optimizer.exp_avg.classifier.3.bias".into(),
        ),
        (key, None, format!("optimizer state lacks {key}")),
        (
            key,
            Some(Tensor::zeros([2], (Kind::Float, Device::Cpu))),
            format!("{key} has shape [2], expected []"),
        ),
    ];
    for (name, replacement, needle) in edits {
        let mut tensors: Vec<(String, Tensor)> = sd
            .tensors
            .iter()
            .filter(|(k, _)| k.as_str() != name)
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        assert_eq!(tensors.len() + 1, sd.tensors.len(), "{name} saved");
        tensors.extend(replacement.map(|t| (name.to_string(), t)));
        let tmp = common::tempdir();
        let copy = tmp.path().join("run");
        std::fs::create_dir(&copy).unwrap();
        for file in ["config.json", "metrics.jsonl", "last.safetensors"] {
            std::fs::copy(run.join(file), copy.join(file)).unwrap();
        }
        write_safetensors(&copy.join("resume.safetensors"), &tensors, &sd.metadata).unwrap();
        let r = common::run_in(
            tmp.path(),
            &["train", "--resume", "run", "--epochs", "2", "--quiet"],
        );
        let needle = format!("run/resume.safetensors: {needle}");
        common::assert_one_line_error(&r, 1, &needle);
    }
}

#[test]
fn resume_is_exact_after_a_stop_and_after_ctrl_c() {
    let tmp = common::tempdir();
    let straight = tmp.path().join("straight");
    let r = train_small(&straight, &["--epochs", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // 1 epoch, stop, --resume for 1 more: same weights and metrics as 2 in one go.
    let split = tmp.path().join("split");
    assert_eq!(train_small(&split, &["--epochs", "1"]).code, 0);
    let resume = split.join("resume.safetensors");
    let r = vggctl(&[
        "train",
        "--resume",
        resume.to_str().unwrap(),
        "--epochs",
        "2",
        "--quiet",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // (Only the weights: the average's decay is fixed by the epochs a run
    // starts with, 1 here, as torchvision's formula has it.)
    assert_same_weights(
        &straight.join("last.safetensors"),
        &split.join("last.safetensors"),
    );
    assert_eq!(
        metrics(&straight)
            .iter()
            .map(|m| m.test_top1)
            .collect::<Vec<_>>(),
        metrics(&split)
            .iter()
            .map(|m| m.test_top1)
            .collect::<Vec<_>>()
    );

    // Ctrl-C in the middle of training: exit 130 with a resumable checkpoint;
    // resuming ends with the uninterrupted run's weights.
    let stopped = tmp.path().join("stopped");
    let mut cmd = Command::new(common::bin());
    cmd.args(["train", "--dataset", "digits"])
        .args(SMALL)
        .args(RECIPE)
        .args(["--epochs", "2", "--out"])
        .arg(&stopped);
    let child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !stopped.join("config.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let (state, _) = read_resume(&stopped.join("resume.safetensors")).unwrap();
    assert!(
        state.epoch < 2,
        "the run had already finished when interrupted"
    );
    let r = vggctl(&["train", "--resume", stopped.to_str().unwrap(), "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for file in ["last.safetensors", "ema.safetensors"] {
        assert_same_weights(&straight.join(file), &stopped.join(file));
    }
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable() {
    let tmp = common::tempdir();
    let out = tmp.path().join("run");
    let mut child = Command::new(common::bin())
        .args([
            "train",
            "--arch",
            "vgg11",
            "--dataset",
            "digits",
            "--epochs",
            "200",
            "--batch-size",
            "16",
        ])
        .args([
            "--limit-train",
            "16",
            "--limit-test",
            "8",
            "--quiet",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a checkpoint to exist, then for a later write to be in flight.
    let t0 = Instant::now();
    let mut caught = false;
    while t0.elapsed() < Duration::from_secs(120) {
        if out.join("resume.safetensors").exists() && !temp_files(&out).is_empty() {
            child.kill().unwrap();
            caught = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    child.wait().unwrap();
    assert!(caught, "never saw a checkpoint being written");
    // Every checkpoint present reads back whole.
    read_resume(&out.join("resume.safetensors")).unwrap();
    let last = out.join("last.safetensors");
    let r = vggctl(&[
        "eval",
        "--checkpoint",
        last.to_str().unwrap(),
        "--limit-test",
        "8",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A resumed run cleans up what the killed one left and carries on.
    let (state, _) = read_resume(&out).unwrap();
    let more = (state.epoch + 1).to_string();
    let r = vggctl(&[
        "train",
        "--resume",
        out.to_str().unwrap(),
        "--quiet",
        "--epochs",
        &more,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(temp_files(&out).is_empty(), "{:?}", temp_files(&out));
    assert_eq!(read_resume(&out).unwrap().0.epoch, state.epoch + 1);
}

/// `--profile`'s ops.csv of a VGG11-BN on the CPU: per step exactly 8
/// convolutions forward and backward and 8 batch norms (its 8 conv
/// layers), CPU shares summing to 1, and self times (each operator's own,
/// without its callees) that add up to the step's measured time (its
/// parts, accumulation's backward-only steps included), not to a multiple
/// of it (summing whole durations would count every nested operator
/// again: conv2d, convolution, _convolution, mkldnn_convolution).
fn assert_ops_table(path: &Path, steps: u64, step_seconds: f64) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("device,calls_per_step,ms_per_step,share,name")
    );
    let rows: Vec<(f64, f64, f64, String)> = lines
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, ',').collect();
            assert_eq!(f[0], "cpu", "{l}");
            let num = |i: usize| f[i].parse::<f64>().unwrap();
            (num(1), num(2), num(3), f[4].trim_matches('"').to_string())
        })
        .collect();
    let calls = |name: &str| rows.iter().find(|r| r.3 == name).map(|r| r.0);
    for op in [
        "aten::conv2d",
        "aten::convolution_backward",
        "aten::native_batch_norm",
    ] {
        assert_eq!(calls(op), Some(8.0), "{op}: {text}");
    }
    // Each share is written to 4 decimals: the sum is 1 within half a unit
    // of the last place per row.
    let share: f64 = rows.iter().map(|r| r.2).sum();
    let rounding = 5e-5 * rows.len() as f64 + 1e-9;
    assert!(
        (share - 1.0).abs() <= rounding,
        "{share} over {} rows",
        rows.len()
    );
    let ms: f64 = rows.iter().map(|r| r.1).sum();
    let measured = 1e3 * step_seconds / steps as f64;
    assert!(
        ms > 0.5 * measured && ms < 1.2 * measured,
        "{ms:.1} ms of operators a step against {measured:.1} ms measured"
    );
}

#[test]
fn gpu_options_degrade_on_the_cpu_with_a_warning() {
    let tmp = common::tempdir();
    let out = tmp.path().join("run");
    let r = train_small(
        &out,
        &[
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--precision",
            "fp16",
            "--cuda-graphs",
            "--profile",
        ],
    );
    common::assert_warned(
        &r,
        &[
            "warning: --precision fp16 needs a CUDA device; training in fp32",
            "warning: --cuda-graphs needs a CUDA device; running eagerly",
        ],
    );
    let m = &metrics(&out)[0];
    assert_eq!(m.ran_as, "fp32, fused update");
    assert_eq!(m.peak_gpu_bytes, None);
    let p = m.profile.as_ref().unwrap();
    assert_eq!((p.steps, p.graphed_steps), (10, 0));
    // Every part of an eager step is timed on its own.
    for (part, secs) in [
        ("data", p.data),
        ("forward", p.forward),
        ("backward", p.backward),
        ("update", p.update),
    ] {
        assert!(secs > 0.0, "{part}: {secs}");
    }
    assert!(
        p.backward > p.update,
        "a VGG backward outweighs an SGD update"
    );
    assert_ops_table(
        &out.join("ops.csv"),
        p.steps,
        p.data + p.forward + p.backward + p.update,
    );
    // auto is fp32 on the CPU, without a warning; the fused step is
    // CUDA's, and the parts of it left out are recorded all the same.
    let out = tmp.path().join("auto");
    let left_out = "--no-fused-step=bn-relu,cast-once";
    let r = train_small(&out, &["--epochs", "1", "--device", "cpu", left_out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert_eq!(metrics(&out)[0].ran_as, "fp32, fused update");
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        config["fused_step_without"],
        serde_json::json!(["bn-relu", "cast-once"])
    );
}

#[test]
fn nan_loss_stops_with_epoch_and_step() {
    let tmp = common::tempdir();
    let out = tmp.path().join("run");
    let r = train_small(&out, &["--epochs", "1", "--lr", "1e12"]);
    common::assert_one_line_error(&r, 1, "at epoch 1, step");
    assert!(r.stderr.contains("loss became"), "{}", r.stderr);
    // It diverged before the first epoch ended: no checkpoint to point to.
    assert!(
        r.stderr.contains("no checkpoint had been written yet"),
        "{}",
        r.stderr
    );
    assert!(!out.join("last.safetensors").exists());
}

#[test]
fn bad_training_arguments() {
    let d = digits("bin");
    // Exit 2 for a command line that cannot work, 1 for what failed running.
    let file = format!("{d}/cifar-10-batches-bin/test_batch.bin");
    let not_dir = format!(
        "{file}: not a directory (--data-dir names the folder stl10 is read from or downloaded into)"
    );
    let cases: [(&[&str], i32, &str); 8] = [
        (
            &["train", "--dataset", "stl10", "--data-dir", &file],
            1,
            &not_dir,
        ),
        (
            &["train", "--dataset", "mnist", "--data-dir", &file],
            1,
            &not_dir.replace("stl10", "mnist"),
        ),
        (
            &["train", "--classes", "7", "--data-dir", &d],
            1,
            "(cifar10), which has 10 classes",
        ),
        (
            &["train", "--dataset", "digits", "--classes", "7"],
            1,
            "--classes 7 does not match the built-in digits, which has 10 classes",
        ),
        (
            &["train", "--no-fused-step=bn-relu,pool", "--data-dir", &d],
            2,
            "invalid value 'pool' for '--no-fused-step",
        ),
        (
            &["train", "--dataset", "cifar-10", "--data-dir", &d],
            2,
            "unknown dataset 'cifar-10': did you mean cifar10? (expected cifar10, cifar100, mnist, fashion-mnist, kmnist, qmnist, emnist-byclass, emnist-bymerge, emnist-balanced, emnist-letters, emnist-digits, emnist-mnist, svhn, usps, stl10, fer2013, digits, folder, imagenet, imagenette, imagenette-320px, imagenette-160px, oxford-pets, flowers102, food101, dtd, fgvc-aircraft, fgvc-aircraft-family, fgvc-aircraft-manufacturer, stanford-cars, gtsrb, eurosat, caltech101, caltech256, sun397, country211, places365 or places365-256)",
        ),
        (
            &["train", "--batch-size", "0", "--data-dir", &d],
            2,
            "--batch-size",
        ),
        (
            &[
                "train",
                "--resume",
                "/nonexistent/resume.safetensors",
                "--data-dir",
                &d,
            ],
            1,
            "/nonexistent/resume.safetensors",
        ),
    ];
    for (args, code, needle) in cases {
        common::assert_one_line_error(&vggctl(args), code, needle);
    }
}

/// `eval` of a checkpoint in its run directory, started from another
/// directory without --data-dir, reads the data the run trained on (its
/// config.json records the directory, absolute) instead of looking in
/// ./data or downloading; its accuracy is the run's last test accuracy.
#[test]
fn eval_finds_the_runs_data_from_anywhere() {
    let tmp = common::tempdir();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
    let data = digits("bin");
    let r = common::tiny_run(&work, &["--data-dir", &data, "--no-download"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let trained = metrics(&work.join("run"))[0].test_top1;
    let r = common::run_in(
        &tmp.path().join("elsewhere"),
        &[
            "eval",
            "--checkpoint",
            "../work/run/best.safetensors",
            "--limit-test",
            "32",
            "--no-download",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let top1 = report["top1"].as_f64().unwrap();
    assert!(
        (top1 - trained).abs() < 1e-9,
        "eval {top1} vs trained {trained}"
    );
    // The run directory itself: its best.safetensors, else (a run kept
    // with --keep last) its last.safetensors, said in a note; a directory
    // with neither is one error line.
    let elsewhere = tmp.path().join("elsewhere");
    let eval_dir = |dir: &str| {
        let args = ["eval", "--checkpoint", dir, "--limit-test", "32", "--json"];
        common::run_in(&elsewhere, &args)
    };
    let figures = |r: &common::Run| {
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        (v["top1"].clone(), v["confusion"].clone())
    };
    for kept in ["best", "last"] {
        let r = eval_dir("../work/run");
        let file = format!("../work/run/{kept}.safetensors");
        let note = format!("note: ../work/run is a run directory: using {file}");
        assert!(r.stderr.contains(&note), "{}", r.stderr);
        assert_eq!(figures(&r), figures(&eval_dir(&file)));
        std::fs::remove_file(work.join("run/best.safetensors")).ok();
    }
    std::fs::remove_file(work.join("run/last.safetensors")).unwrap();
    let r = eval_dir("../work/run");
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        "vggctl: error: ../work/run: a directory without best.safetensors or last.safetensors (a run directory's checkpoints); name the checkpoint file\n"
    );
}

/// A run directory given where a weights file is expected (train's
/// --initial-checkpoint, predict's and export's --weights) stands for its
/// best.safetensors, as eval's --checkpoint DIR does: the new run starts
/// from exactly those weights (its last weights equal, bit for bit, those
/// of a run given the file) and records the file it took.
#[test]
fn a_run_directory_stands_for_its_best_checkpoint() {
    let tmp = common::tempdir();
    let r = common::tiny_run(tmp.path(), &["--dataset", "digits"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let again = |from: &str, out: &str| {
        let args = [
            "train",
            "--dataset",
            "digits",
            "--arch",
            "vgg11",
            "--epochs",
            "1",
            "-b",
            "32",
            "--limit-train",
            "64",
            "--limit-test",
            "32",
            "--quiet",
            "--initial-checkpoint",
            from,
            "--out",
            out,
        ];
        let r = common::run_in(tmp.path(), &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r
    };
    let r = again("run", "from-dir");
    assert!(
        r.stderr
            .contains("note: run is a run directory: using run/best.safetensors"),
        "{}",
        r.stderr
    );
    again("run/best.safetensors", "from-file");
    let read = |p: &str| std::fs::read(tmp.path().join(p)).unwrap();
    let t = tmp.path();
    assert_same_weights(
        &t.join("from-dir/last.safetensors"),
        &t.join("from-file/last.safetensors"),
    );
    let config: serde_json::Value = serde_json::from_slice(&read("from-dir/config.json")).unwrap();
    assert_eq!(config["weights"], "run/best.safetensors");
    // export --weights DIR writes what the file gives.
    for (from, to) in [
        ("run", "dir.safetensors"),
        ("run/best.safetensors", "file.safetensors"),
    ] {
        let args = [
            "export",
            "--weights",
            from,
            "--arch",
            "vgg11",
            "--head",
            "cifar",
            "--out",
            to,
        ];
        let r = common::run_in(tmp.path(), &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    assert_same_weights(&t.join("dir.safetensors"), &t.join("file.safetensors"));
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    let r = common::run_in(
        tmp.path(),
        &[
            "train",
            "--dataset",
            "digits",
            "--initial-checkpoint",
            "empty",
            "--out",
            "x",
        ],
    );
    common::assert_one_line_error(
        &r,
        1,
        "empty: a directory without best.safetensors or last.safetensors",
    );
    assert!(!tmp.path().join("x").exists());
}

/// On a stderr that is not a terminal, a running epoch says where it is
/// every `--log-interval` steps (or seconds, 30 s by default), indented
/// under the per-epoch lines, with an ETA; once an epoch has finished and
/// while another is to come, with the whole run's ETA too.
#[test]
fn a_log_hears_from_a_running_epoch() {
    let tmp = common::tempdir();
    let out = std::process::Command::new(common::bin())
        .args([
            "train",
            "--dataset",
            "digits",
            "--arch",
            "vgg11",
            "-e",
            "3",
            "-b",
            "16",
        ])
        .args(["--limit-train", "96", "--limit-test", "16", "-o", "run"])
        .args(["--log-interval", "2"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let r = common::Run::from(out);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for epoch in 1..=3 {
        let beats: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with(&format!("  epoch {epoch}/3 step ")))
            .collect();
        // Every 2nd of the 6 steps of 16, but the last (the epoch's line).
        let at: Vec<&str> = beats
            .iter()
            .filter_map(|l| l.split_whitespace().nth(3))
            .collect();
        assert_eq!(at, ["2/6", "4/6"], "{}", r.stderr);
        assert!(beats.iter().all(|l| l.contains(" ETA ")), "{}", r.stderr);
        let run_eta = beats.iter().filter(|l| l.contains(" (run ")).count();
        assert_eq!(
            run_eta,
            if epoch == 2 { beats.len() } else { 0 },
            "{}",
            r.stderr
        );
    }
    assert_eq!(
        r.stderr.lines().filter(|l| l.starts_with("epoch")).count(),
        3
    );
    // The header says that the default milestones never apply to 3 epochs.
    assert!(
        r.stderr.contains(
            "3 epochs (milestones 50,80 are not before the last epoch: the LR never decays there)"
        ),
        "{}",
        r.stderr
    );
}
