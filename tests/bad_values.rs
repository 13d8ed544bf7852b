//! Files and flags whose bytes parse but whose values cannot be used: NaN
//! or integer weights, checkpoint metadata with a zero std or an 8-pixel
//! input, a truncated JPEG, a resume state with batch size 0 or a step past
//! its data, resume flags that would change the run (ignored, named), impossible class
//! counts and limits, an --out that is a file, a file that is not what its
//! option takes (named by what it is), a folder of one class. Each is one error line naming the file or the flag,
//! through the real binary.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{assert_one_line_error, run_in};
use tch::Tensor;
use vggctl::checkpoint::meta_for_weights;
use vggctl::formats::safetensors::{read_safetensors, write_safetensors};
use vggctl::model::{Arch, Head, ModelSpec};

fn vgg11_tensors() -> Vec<(String, Tensor)> {
    read_safetensors(&common::fixtures().join("models/vgg11-cifar.safetensors"))
        .unwrap()
        .tensors
        .into_iter()
        .collect()
}

fn vgg11_meta() -> HashMap<String, String> {
    meta_for_weights(ModelSpec::new(Arch::Vgg11, false, Head::Cifar, 10)).to_metadata()
}

fn replaced(name: &str, t: Tensor) -> Vec<(String, Tensor)> {
    vgg11_tensors()
        .into_iter()
        .map(|(n, v)| {
            if n == name {
                (n, t.shallow_clone())
            } else {
                (n, v)
            }
        })
        .collect()
}

/// NaN weights are refused by name (and loaded with --allow-nonfinite);
/// integer weights are refused by kind.
#[test]
fn nonfinite_and_integer_weights_are_named() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let nan = Tensor::full([64], f64::NAN, (tch::Kind::Float, tch::Device::Cpu));
    write_safetensors(
        &dir.join("nan.safetensors"),
        &replaced("features.0.bias", nan),
        &vgg11_meta(),
    )
    .unwrap();
    let ints = Tensor::zeros([64], (tch::Kind::Int64, tch::Device::Cpu));
    write_safetensors(
        &dir.join("int.safetensors"),
        &replaced("features.0.bias", ints),
        &vgg11_meta(),
    )
    .unwrap();
    for cmd in [
        vec![
            "eval",
            "--checkpoint",
            "nan.safetensors",
            "--dataset",
            "digits",
        ],
        vec![
            "export",
            "--checkpoint",
            "nan.safetensors",
            "--format",
            "onnx",
            "--out",
            "m.onnx",
        ],
        vec!["predict", "--checkpoint", "nan.safetensors", "photo.png"],
    ] {
        let r = run_in(dir, &cmd);
        assert_one_line_error(
            &r,
            1,
            "nan.safetensors: features.0.bias holds 64 NaN or infinite values (of 64); pass --allow-nonfinite",
        );
    }
    let r = run_in(
        dir,
        &[
            "export",
            "--checkpoint",
            "nan.safetensors",
            "--format",
            "safetensors",
            "--out",
            "m.safetensors",
            "--allow-nonfinite",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_in(
        dir,
        &[
            "export",
            "--checkpoint",
            "int.safetensors",
            "--format",
            "onnx",
            "--out",
            "m.onnx",
        ],
    );
    assert_one_line_error(
        &r,
        1,
        "wrong kinds: features.0.bias Int64 (expected floating point)",
    );
    assert!(!dir.join("m.onnx").exists());
}

/// Metadata that cannot describe a usable model names the file and the key.
#[test]
fn impossible_metadata_is_named() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let cases: [(&str, &str, &str, &str); 4] = [
        (
            "std0.safetensors",
            "std",
            "[0.0,0.2,0.2]",
            "metadata 'std' [0.0, 0.2, 0.2] must be positive and finite",
        ),
        (
            "input8.safetensors",
            "input_size",
            "8",
            "metadata 'input_size' is 8, not 32 to 4096",
        ),
        (
            "classes.safetensors",
            "classes",
            "100000000000",
            "metadata 'classes' is 100000000000, not 1 to 1000000",
        ),
        (
            "names.safetensors",
            "class_names",
            "[\"a\"]",
            "metadata names 1 classes but 'classes' is 10",
        ),
    ];
    for (file, key, value, needle) in cases {
        let mut meta = vgg11_meta();
        meta.insert(key.into(), value.into());
        write_safetensors(&dir.join(file), &vgg11_tensors(), &meta).unwrap();
        let commands = [
            vec!["eval", "--checkpoint", file, "--dataset", "digits"],
            vec!["predict", "--checkpoint", file, "photo.png"],
            vec![
                "export",
                "--checkpoint",
                file,
                "--format",
                "onnx",
                "--out",
                "m.onnx",
            ],
        ];
        common::on_two_cores(&commands, |cmd| {
            let r = run_in(dir, cmd);
            assert_one_line_error(&r, 1, needle);
            assert!(
                r.stderr.contains(&format!("{file}: bad vggctl metadata")),
                "{}",
                r.stderr
            );
        });
    }
}

/// A vggctl checkpoint says what model it is: eval, predict and export
/// refuse a model flag that contradicts its metadata (one line naming
/// both, nothing written), as they refuse one that contradicts a plain
/// state dict's weights, and take flags that agree; an --input beyond
/// what a checkpoint records is a usage line, not libtorch's overflow
/// (export's pt2 example batch overflowed its size and was written).
#[test]
fn a_checkpoints_model_flags_must_agree() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    write_safetensors(&dir.join("c.safetensors"), &vgg11_tensors(), &vgg11_meta()).unwrap();
    let is = "c.safetensors: the weights are a vgg11 with the cifar head and 10 classes, but";
    let cases: [(&[&str], &str); 5] = [
        (&["--arch", "vgg13"], "--arch says vgg13"),
        (&["--bn"], "--arch/--bn ask for vgg11_bn"),
        (&["--arch", "vgg11_bn"], "--arch/--bn ask for vgg11_bn"),
        (&["--head", "gap"], "--head says gap"),
        (&["--classes", "5"], "--classes says 5"),
    ];
    let commands: [&[&str]; 3] = [
        &[
            "eval",
            "--checkpoint",
            "c.safetensors",
            "--dataset",
            "digits",
        ],
        &["predict", "--checkpoint", "c.safetensors", "photo.png"],
        &["export", "--checkpoint", "c.safetensors", "--out", "m.onnx"],
    ];
    let runs: Vec<_> = cases
        .iter()
        .flat_map(|case| commands.iter().map(move |command| (case, command)))
        .collect();
    common::on_two_cores(&runs, |((flags, said), command)| {
        let r = run_in(dir, &[command, *flags].concat());
        assert_one_line_error(&r, 1, &format!("{is} {said}"));
    });
    assert!(!dir.join("m.onnx").exists());
    let agree = ["--arch", "vgg11", "--head", "cifar", "--classes", "10"];
    let r = run_in(dir, &[commands[2], &agree].concat());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(dir.join("m.onnx").exists());
    for command in commands {
        let r = run_in(dir, &[command, &["--input", "4097"][..]].concat());
        assert_one_line_error(
            &r,
            2,
            "--input 4097 is too large: sides go up to 4096, what a checkpoint records",
        );
    }
}

/// A JPEG cut to a third of its bytes is refused by `predict`, as PIL
/// refuses it; the whole file is classified.
#[test]
fn a_truncated_jpeg_is_refused() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    write_safetensors(&dir.join("m.safetensors"), &vgg11_tensors(), &vgg11_meta()).unwrap();
    let photo =
        std::fs::read(common::fixtures().join("photos/astronaut/astronaut_00.jpg")).unwrap();
    std::fs::write(dir.join("whole.jpg"), &photo).unwrap();
    std::fs::write(dir.join("cut.jpg"), &photo[..photo.len() / 3]).unwrap();
    let r = run_in(
        dir,
        &["predict", "--checkpoint", "m.safetensors", "whole.jpg"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run_in(
        dir,
        &["predict", "--checkpoint", "m.safetensors", "cut.jpg"],
    );
    assert_one_line_error(&r, 1, "cut.jpg: not a readable image: truncated JPEG");
}

/// Files that are not what their option takes, named by what they are;
/// a folder of one class; an output in a directory that does not exist.
#[test]
fn files_are_named_by_what_they_are() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let photo = common::fixtures().join("photos/cat/cat_01.png");
    std::fs::copy(&photo, dir.join("cat.png")).unwrap();
    std::fs::create_dir_all(dir.join("one/cat")).unwrap();
    for i in 0..4 {
        std::fs::copy(&photo, dir.join(format!("one/cat/{i}.png"))).unwrap();
    }
    let cases: [(&[&str], &str); 4] = [
        (
            &["predict", "--checkpoint", "cat.png", "cat.png"],
            "reading cat.png: not a safetensors file: it is a PNG image",
        ),
        (
            &["eval", "--checkpoint", "cat.png", "--dataset", "digits"],
            "cat.png: not a state dict (safetensors or torch.save): it is a PNG image",
        ),
        (
            &["train", "--dataset", "folder", "--data-dir", "one"],
            "one: only 1 class folder; a classifier needs at least two",
        ),
        (
            &[
                "prepare",
                "--dataset",
                "folder",
                "--data-dir",
                "one",
                "--out",
                "no/x.vggdata",
            ],
            "no/x.vggdata: directory no does not exist",
        ),
    ];
    for (args, needle) in cases {
        assert_one_line_error(&run_in(dir, args), 1, needle);
    }
    assert!(!dir.join("run").exists() && !dir.join("no").exists());
}

/// Flags with values no run can have: one line each.
#[test]
fn impossible_flags_are_refused() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let cases: [(&[&str], &str); 27] = [
        (
            &["params", "--classes", "100000000000"],
            "--classes 100000000000: a classifier needs between 1 and 1000000 classes",
        ),
        (
            &[
                "eval",
                "--checkpoint",
                "c.safetensors",
                "--max-restarts",
                "1",
            ],
            "--max-restarts restarts the ranks --nproc-per-node starts",
        ),
        (
            &["train", "--dataset", "digits", "--resume", "auto"],
            "--resume auto needs --out DIR: the run to continue, or to start",
        ),
        (
            &["train", "--dataset", "digits", "--dist-timeout", "0"],
            "--dist-timeout must be at least 1 second",
        ),
        (
            &[
                "train",
                "--dataset",
                "digits",
                "--initial-checkpoint",
                "w.pth",
                "--resume",
                "run",
            ],
            "--initial-checkpoint starts a new run; --resume continues one",
        ),
        (
            &["train", "--dataset", "digits", "--classes", "0"],
            "--classes 0",
        ),
        (
            &["eval", "--checkpoint", "x.safetensors", "--limit-test", "0"],
            "--limit-test 0 must be at least 1",
        ),
        (
            &["train", "--dataset", "digits", "--model-ema-steps", "0"],
            "--model-ema-steps must be at least 1",
        ),
        (
            &["train", "--dataset", "digits", "--model-ema-decay", "1"],
            "--model-ema-decay 1 must be between 0 and 1",
        ),
        (
            &["train", "--dataset", "digits", "--accum-steps", "0"],
            "--accum-steps must be at least 1",
        ),
        (
            &["train", "--dataset", "digits", "--mixup-alpha=-1"],
            "--mixup-alpha -1 must be a finite number, 0 or more",
        ),
        (
            &["finetune", "--dataset", "digits", "--cutmix-alpha", "inf"],
            "--cutmix-alpha inf must be a finite number, 0 or more",
        ),
        (
            &[
                "train",
                "--dataset",
                "folder",
                "--data-dir",
                "photos",
                "--val-split",
                "1.5",
            ],
            "--val-split 1.5 must be between 0 and 1 (or give --val-dir)",
        ),
        (
            // Held out of the training split: one image, or all but one,
            // would be no split at all.
            &[
                "train",
                "--dataset",
                "digits",
                "--val-on",
                "val",
                "--val-split",
                "0",
            ],
            "--val-split 0 must be between 0 and 1",
        ),
        (
            &["train", "--dataset", "digits", "--betas", "1e300,0.5"],
            "--betas 1e300,0.5 must each be in [0, 1)",
        ),
        (
            &["train", "--dataset", "digits", "--momentum", "1e300"],
            "--momentum 1e300 is beyond float32's largest value 3.403e38, in which the update computes",
        ),
        (
            &["train", "--dataset", "digits", "--lr", "1e39"],
            "--lr: the learning rate reaches 1.000e39 at epoch 1 of its schedule, beyond float32's largest value 3.403e38",
        ),
        (
            &[
                "train",
                "--dataset",
                "digits",
                "--gamma",
                "1e30",
                "--milestones",
                "1,2",
                "--epochs",
                "3",
            ],
            "--lr: the learning rate reaches 1.000e58 at epoch 3 of its schedule",
        ),
        (
            &[
                "train",
                "--dataset",
                "folder",
                "--workers",
                "9223372036854775807",
            ],
            "invalid value '9223372036854775807' for '--workers <N>': expected at most 1024",
        ),
        (
            &[
                "train",
                "--dataset",
                "digits",
                "--nproc-per-node",
                "4294967296",
            ],
            "invalid value '4294967296' for '--nproc-per-node <N>': expected at most 1024",
        ),
        (
            &["train", "--dataset", "digits", "--random-erase", "1.5"],
            "--random-erase 1.5 must be a probability in [0, 1]",
        ),
        (
            &["train", "--dataset", "digits", "--hflip", "1.5"],
            "--hflip 1.5 must be a probability in [0, 1]",
        ),
        (
            &["train", "--dataset", "digits", "--hflip=-0.1"],
            "--hflip -0.1 must be a probability in [0, 1]",
        ),
        (
            &[
                "train",
                "--dataset",
                "digits",
                "--ra-sampler",
                "--ra-reps",
                "0",
            ],
            "--ra-reps 0 must be 1 to 1000",
        ),
        (
            &[
                "train",
                "--dataset",
                "digits",
                "--ra-sampler",
                "--ra-reps",
                "5000",
            ],
            "--ra-reps 5000 must be 1 to 1000",
        ),
        (
            &["train", "--dataset", "digits", "--auto-augment", "mnist"],
            "invalid value 'mnist' for '--auto-augment <POLICY>'",
        ),
        (
            &["train", "--dataset", "digits", "--log-interval", "0"],
            "0: expected a number of steps (50) or of seconds (30s)",
        ),
    ];
    common::on_two_cores(&cases, |(args, needle)| {
        assert_one_line_error(&run_in(dir, args), 2, needle)
    });
    // A path that is not UTF-8 cannot be recorded in config.json.
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"data-\xff");
    let out = std::process::Command::new(common::bin())
        .args(["train", "--dataset", "digits", "--out"])
        .arg(bad)
        .current_dir(dir)
        .output()
        .unwrap();
    let r = common::Run::from(out);
    assert_one_line_error(&r, 2, "not valid UTF-8");
    assert!(
        std::fs::read_dir(dir).unwrap().next().is_none(),
        "nothing created"
    );
    // An --out that is a file is named as one, and left as it was.
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let r = run_in(dir, &["train", "--dataset", "digits", "--out", "notes.txt"]);
    assert_one_line_error(&r, 1, "notes.txt: a file, not a directory");
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "mine"
    );
}

fn rewrite_state(resume: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let sd = read_safetensors(resume).unwrap();
    let mut meta = sd.metadata.clone();
    let mut state: serde_json::Value = serde_json::from_str(&meta["vggctl_train_state"]).unwrap();
    edit(&mut state);
    meta.insert("vggctl_train_state".into(), state.to_string());
    let tensors: Vec<(String, Tensor)> = sd.tensors.into_iter().collect();
    write_safetensors(resume, &tensors, &meta).unwrap();
}

/// `--resume` ignores flags that would change the run, each named in a
/// warning, and continues as recorded; another file of the run (its
/// config.json, its weights) points to the run directory; `eval` of its
/// checkpoint on a folder whose classes have other names is refused; a
/// resume state
/// with batch size 0 or a step past its data names the file.
#[test]
fn resume_refuses_changes_and_bad_states() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let r = common::tiny_run(dir, &["--dataset", "digits"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let config = std::fs::read_to_string(dir.join("run/config.json")).unwrap();
    let r = run_in(
        dir,
        &[
            "train",
            "--resume",
            "run",
            "--lr",
            "0.5",
            "--batch-size",
            "64",
            "--arch",
            "vgg13",
            "--epochs",
            "2",
            "--quiet",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let warned: Vec<&str> = r.stderr.lines().collect();
    for (line, flag) in warned.iter().zip(["--arch", "--batch-size", "--lr"]) {
        assert!(
            line.starts_with(&format!(
                "warning: {flag} is ignored: --resume run continues the run with the settings it recorded"
            )),
            "{}",
            r.stderr
        );
    }
    assert_eq!(warned.len(), 3, "{}", r.stderr);
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/config.json")).unwrap())
            .unwrap();
    let before: serde_json::Value = serde_json::from_str(&config).unwrap();
    for key in ["lr", "batch_size", "model"] {
        assert_eq!(after[key], before[key], "{key}");
    }
    assert_eq!(after["epochs"], 2);

    // A finished run has nothing left to do without more epochs.
    let r = run_in(dir, &["train", "--resume", "run", "--quiet"]);
    assert_one_line_error(
        &r,
        1,
        "run: the run is finished (epoch 2 of 2); give a larger --epochs to train further",
    );

    // Another file of the run points to the run.
    for (file, needle) in [
        (
            "run/config.json",
            "run/config.json: not a resume checkpoint (it is JSON text); pass the run directory run or its run/resume.safetensors",
        ),
        (
            "run/last.safetensors",
            "run/last.safetensors: not a resume checkpoint (last/best.safetensors hold weights only); pass the run directory run",
        ),
    ] {
        let r = run_in(dir, &["train", "--resume", file, "--epochs", "3"]);
        assert_one_line_error(&r, 1, needle);
    }

    // Data with a class the model lacks, by name: refused, naming it.
    let photo = common::fixtures().join("photos/cat/cat_01.png");
    for class in ["0", "1", "2", "3", "4", "5", "6", "7", "8", "nine"] {
        std::fs::create_dir_all(dir.join("ten").join(class)).unwrap();
        std::fs::copy(&photo, dir.join("ten").join(class).join("a.png")).unwrap();
    }
    let r = run_in(
        dir,
        &[
            "eval",
            "--checkpoint",
            "run/last.safetensors",
            "--dataset",
            "folder",
            "--data-dir",
            "ten",
            "--val-dir",
            "ten",
        ],
    );
    assert_one_line_error(
        &r,
        1,
        "run/last.safetensors: class \"nine\" of ten is not one of the model's classes (0, 1, 2, 3, … 10 in all)",
    );

    // A run's config.json beside its checkpoint gives eval the folder and
    // the fraction it held out; a fraction no run can hold out names the file.
    let config_path = dir.join("run/config.json");
    let recorded = std::fs::read_to_string(&config_path).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    edited["dataset"] = "folder".into();
    edited["data_dir"] = dir.join("ten").to_str().unwrap().into();
    edited["val_dir"] = serde_json::Value::Null;
    edited["val_split"] = 1.5.into();
    std::fs::write(&config_path, edited.to_string()).unwrap();
    let r = run_in(
        dir,
        &[
            "eval",
            "--checkpoint",
            "run/last.safetensors",
            "--dataset",
            "folder",
        ],
    );
    assert_one_line_error(
        &r,
        1,
        "run/config.json: val_split 1.5 must be between 0 and 1",
    );
    std::fs::write(&config_path, recorded).unwrap();

    // States no run can continue: one error line each, naming the file.
    let resume = dir.join("run/resume.safetensors");
    let original = std::fs::read(&resume).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let bad_states: [(Edit, &str); 37] = [
        (
            |s| s["config"]["batch_size"] = 0.into(),
            "bad training state: epochs 2, batch_size 0",
        ),
        (
            |s| s["config"]["ra_magnitude"] = 31.into(),
            "bad training state: ra_magnitude 31 is not one of RandAugment's bins 0 to 30",
        ),
        (
            |s| s["config"]["dropout"] = 2.into(),
            "bad training state: dropout 2 is not a probability in [0, 1]",
        ),
        (
            |s| {
                s["config"]["crop_range"] =
                    serde_json::json!({"scale": [0.0, 1.0], "ratio": [0.75, 1.33]})
            },
            "bad training state: crop_range scale 0,1 must be LOW,HIGH area fractions",
        ),
        (
            |s| s["config"]["bn_momentum"] = 1.5.into(),
            "bad training state: bn_momentum 1.5 is not in [0, 1]",
        ),
        (
            |s| s["config"]["ra_reps"] = 0.into(),
            "bad training state: ra_reps 0 is not 1 to 1000",
        ),
        (
            |s| s["config"]["augmix_severity"] = 0.into(),
            "bad training state: augmix_severity 0 is not 1 to 10",
        ),
        (
            |s| s["config"]["lr"] = 1e39.into(),
            "bad training state: the learning rate reaches 1.000e39 at epoch 1 of its schedule, beyond float32's largest value 3.403e38",
        ),
        (
            |s| {
                s["config"]["gamma"] = 1e30.into();
                s["config"]["milestones"] = serde_json::json!([0, 1]);
            },
            "bad training state: the learning rate reaches 1.000e58 at epoch 2 of its schedule",
        ),
        (
            |s| s["config"]["optimizer"]["momentum"] = (-0.5).into(),
            "bad training state: momentum -0.5 must be a finite number, 0 or more",
        ),
        (
            |s| s["config"]["optimizer"]["weight_decay"] = 1e300.into(),
            "bad training state: weight_decay 1e300 is beyond float32's largest value 3.403e38",
        ),
        (
            |s| s["config"]["optimizer"]["betas"] = serde_json::json!([0.9, 1.0]),
            "bad training state: betas 0.9,1 must each be in [0, 1)",
        ),
        (
            |s| s["config"]["optimizer"]["alpha"] = 1.5.into(),
            "bad training state: alpha 1.5 must be in [0, 1]",
        ),
        (
            |s| s["config"]["optimizer"]["rho"] = (-0.5).into(),
            "bad training state: rho -0.5 must be in [0, 1]",
        ),
        (
            |s| s["config"]["augment"]["crop_flip"]["padding"] = (-1).into(),
            "bad training state: augment padding -1 is not 0 to the input size 32",
        ),
        (
            |s| s["config"]["clip_grad_norm"] = 0.into(),
            "bad training state: clip_grad_norm 0 must be a positive number",
        ),
        (
            |s| s["config"]["clip_grad_value"] = (-1).into(),
            "bad training state: clip_grad_value -1 must be a positive number",
        ),
        (
            |s| {
                s["config"]["clip_grad_value"] = 1.into();
                s["config"]["clip_grad_norm"] = 1.into();
            },
            "bad training state: clip_grad_norm and clip_grad_value exclude each other",
        ),
        (
            |s| s["config"]["optimizer"]["eps"] = (-1e-8).into(),
            "bad training state: eps -1e-8 must be a finite number, 0 or more",
        ),
        (
            |s| s["config"]["gamma"] = 0.into(),
            "bad training state: lr 0.01 and gamma 0 must be positive and finite",
        ),
        (
            |s| s["config"]["world_size"] = 0.into(),
            "bad training state: world_size 0 must be at least 1",
        ),
        (
            |s| {
                s["config"]["scheduler"] = "plateau".into();
                s["config"]["gamma"] = 1.into();
            },
            "bad training state: the plateau scheduler takes a gamma below 1 (1) and no warmup_epochs (0)",
        ),
        (
            |s| {
                s["config"]["scheduler"] = "plateau".into();
                s["config"]["warmup_epochs"] = 1.into();
            },
            "bad training state: the plateau scheduler takes a gamma below 1 (0.1) and no warmup_epochs (1)",
        ),
        (
            |s| s["config"]["scheduler"] = "onecycle".into(),
            "bad training state: the onecycle scheduler takes its onecycle values and no warmup_epochs, and no other scheduler takes them",
        ),
        (
            |s| {
                s["config"]["scheduler"] = "onecycle".into();
                s["config"]["onecycle"] = serde_json::json!({"pct_start": 2.0, "div_factor": 25.0,
                    "final_div_factor": 1e4, "anneal": "cos", "three_phase": false, "momentum": [0.85, 0.95]});
            },
            "bad training state: pct_start 2 must be in [0, 1]",
        ),
        (
            // The tiny run's 64 images at batch 32 are 2 updates an epoch.
            |s| {
                s["config"]["scheduler"] = "onecycle".into();
                s["config"]["onecycle"] = serde_json::json!({"pct_start": 0.3, "div_factor": 25.0,
                    "final_div_factor": 1e4, "anneal": "cos", "three_phase": false, "momentum": null,
                    "steps_per_epoch": 3});
            },
            "the run's onecycle schedule counts 3 updates per epoch, and its data now gives 2: continue it with the data and ranks it started with",
        ),
        (
            |s| s["config"]["scheduler"] = "cyclic".into(),
            "bad training state: the cyclic scheduler takes its cyclic values and no warmup_epochs, and no other scheduler takes them",
        ),
        (
            |s| {
                s["config"]["scheduler"] = "cyclic".into();
                s["config"]["cyclic"] = serde_json::json!({"step_size_up": 0, "step_size_down": 2,
                    "mode": "triangular", "gamma": 1.0, "momentum": null});
            },
            "bad training state: cycle_steps 0,2 must rise over 1 update or more",
        ),
        (
            |s| {
                s["config"]["scheduler"] = "cyclic".into();
                s["config"]["cyclic"] = serde_json::json!({"step_size_up": 2, "step_size_down": 2,
                    "mode": "triangular", "gamma": 1.0, "momentum": null, "steps_per_epoch": 5});
            },
            "the run's cyclic schedule counts 5 updates per epoch, and its data now gives 2: continue it with the data and ranks it started with",
        ),
        (
            |s| s["config"]["scheduler"] = "cosine-restarts".into(),
            "bad training state: the cosine-restarts scheduler takes its restarts values, and no other scheduler takes them",
        ),
        (
            |s| {
                s["config"]["scheduler"] = "cosine-restarts".into();
                s["config"]["restarts"] = serde_json::json!({"epochs": 2, "mult": 0});
            },
            "bad training state: restart epochs 2 and restart mult 0 must each be at least 1",
        ),
        (
            |s| {
                s["config"]["scheduler"] = "poly".into();
                s["config"]["power"] = (-1.0).into();
            },
            "bad training state: power -1 must be finite and 0 or more",
        ),
        (
            |s| {
                s["config"]["swa"] = serde_json::json!({"start": 0, "lr": 0.01, "anneal_epochs": 2, "anneal": "cos"});
            },
            "bad training state: swa_start must be at least 1",
        ),
        (
            |s| {
                s["config"]["swa"] = serde_json::json!({"start": 1, "lr": -1.0, "anneal_epochs": 2, "anneal": "cos"});
            },
            "bad training state: swa_lr -1 must be 0 or more and within float32's range",
        ),
        // Values that fit the run's epochs but not the more asked for now
        // (named by the run): a schedule float32 cannot hold, a weight
        // average starting past the end.
        (
            |s| {
                s["config"]["gamma"] = 1e30.into();
                s["config"]["milestones"] = serde_json::json!([1, 2]);
            },
            "run: the learning rate reaches 1.000e58 at epoch 3 of its schedule",
        ),
        (
            |s| {
                s["config"]["swa"] = serde_json::json!({"start": 5, "lr": 0.01, "anneal_epochs": 2, "anneal": "cos"});
            },
            "run: --swa-start 5 is past the run's last epoch, 3: nothing would be averaged",
        ),
        (
            |s| s["step"] = 1_000_000_000.into(),
            "step 1000000000 of epoch 3 is past the end of an epoch of 64 images at batch 32",
        ),
    ];
    // Each state in a copy of the run of its own, two at a time.
    let cases: Vec<_> = bad_states.iter().enumerate().collect();
    common::on_two_cores(&cases, |(i, (edit, needle))| {
        let case = dir.join(format!("state{i}"));
        copy_run(&dir.join("run"), &case.join("run"));
        std::fs::write(case.join("run/resume.safetensors"), &original).unwrap();
        rewrite_state(&case.join("run/resume.safetensors"), edit);
        let r = run_in(
            &case,
            &["train", "--resume", "run", "--epochs", "3", "--quiet"],
        );
        assert_one_line_error(&r, 1, needle);
        let named = needle.starts_with("run:") || r.stderr.contains("run/resume.safetensors");
        assert!(named, "{}", r.stderr);
    });
}

/// The files of the run directory `from` linked into a new directory `to`,
/// but for its lock and its resume state (which the caller writes).
fn copy_run(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let name = entry.unwrap().file_name();
        if name != ".lock" && name != "resume.safetensors" {
            std::fs::hard_link(from.join(&name), to.join(&name)).unwrap();
        }
    }
}

/// Usage errors keep what clap knows, on one line (an option a subcommand
/// has no use for, as export's --device or params' --allow-nonfinite, is
/// not offered; an empty --weights is none; a --data-url mirror is http
/// or https): the missing arguments'
/// names, "did you mean" (`--device gpu:1`: cuda:1), and the subcommand's
/// own help to read.
#[test]
fn usage_errors_name_what_is_missing_and_suggest() {
    let tmp = common::tempdir();
    let cases: [(&[&str], &str); 9] = [
        (
            &[
                "train",
                "--dataset",
                "mnist",
                "--data-url",
                "http://a/,ftp://b/",
            ],
            r#"invalid value 'http://a/,ftp://b/' for '--data-url <DATA_URL>': "ftp://b/" is not an http:// or https:// URL"#,
        ),
        (
            &["features", "--weights", "", "a.png", "--out", "f.npy"],
            "a value is required for '--weights <WEIGHTS>' but none was supplied; see 'vggctl features --help'",
        ),
        (
            &["params", "--allow-nonfinite"],
            "unexpected argument '--allow-nonfinite' found; see 'vggctl params --help'",
        ),
        (
            &[
                "export",
                "--checkpoint",
                "c",
                "--out",
                "m.onnx",
                "--device",
                "cuda",
            ],
            "unexpected argument '--device' found; see 'vggctl export --help'",
        ),
        (
            &["eval"],
            "the following required arguments were not provided: <--checkpoint <CHECKPOINT>|--weights <WEIGHTS>>; see 'vggctl eval --help'",
        ),
        (
            &["parms"],
            "(a similar subcommand exists: 'params'); see 'vggctl --help'",
        ),
        (
            &["train", "--batchsize", "3"],
            "unexpected argument '--batchsize' found (a similar argument exists: '--batch-size'); see 'vggctl train --help'",
        ),
        (
            &["eval", "--checkpoint", "a", "--precision", "x"],
            "invalid value 'x' for '--precision <PRECISION>' (possible values: auto, fp32, tf32, fp16, bf16); see 'vggctl eval --help'",
        ),
        (
            &["eval", "--checkpoint", "a", "--device", "gpu:1"],
            "unknown device 'gpu:1': did you mean cuda:1? (expected auto, cpu, cuda or cuda:N)",
        ),
    ];
    common::on_two_cores(&cases, |(args, needle)| {
        assert_one_line_error(&run_in(tmp.path(), args), 2, needle)
    });
}

/// torchvision's vgg11 weights given to `predict` with --arch vgg16: the
/// error names the model they are and the flag that says otherwise.
#[test]
fn another_vggs_weights_are_named() {
    let tmp = common::tempdir();
    let weights = common::fixtures().join("pth/vgg11.legacy.pth");
    let w = weights.to_str().unwrap();
    let r = run_in(
        tmp.path(),
        &["predict", "--weights", w, "--arch", "vgg16", "photo.png"],
    );
    assert_one_line_error(
        &r,
        1,
        "the weights are a vgg11 with the imagenet head and 1000 classes, but --arch says vgg16",
    );
}

/// A batch larger than the data (up to i64::MAX, which torch's
/// DataLoader takes too) is the whole set in one step an epoch, not an
/// overflow in the count of steps; a clipping norm or value beyond
/// float32 (which clips nothing) is not a libtorch conversion error.
#[test]
fn a_batch_larger_than_the_data_is_one_step() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let most = i64::MAX.to_string();
    let r = run_in(
        dir,
        &[
            "train",
            "--dataset",
            "digits",
            "--arch",
            "vgg11",
            "--epochs",
            "2",
            "--limit-train",
            "48",
            "--limit-test",
            "32",
            "--batch-size",
            &most,
            "--test-batch-size",
            &most,
            "--clip-grad-norm",
            "1e308",
            "--out",
            "run",
            "--quiet",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sd = read_safetensors(&dir.join("run/resume.safetensors")).unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&sd.metadata["vggctl_train_state"]).unwrap();
    assert_eq!(state["optimizer_steps"], 2, "one step an epoch");
    let r = run_in(
        dir,
        &[
            "train",
            "--dataset",
            "digits",
            "--arch",
            "vgg11",
            "--epochs",
            "1",
            "--limit-train",
            "16",
            "--limit-test",
            "16",
            "--clip-grad-value",
            "1e308",
            "--out",
            "value",
            "--quiet",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}
