//! `vggctl export` through the binary: the TorchScript it writes runs in
//! libtorch's C++ loader (tch's CModule) with vggctl's own logits at any batch
//! size, and bad requests are one-line errors that leave existing files alone
//! (a --format the extension contradicts is written with a warning).
//! (Python-side checks with torchvision, torch.jit and onnxruntime are in
//! tests/test_export.py.)

mod common;

use tch::{CModule, Device, Kind, Tensor};
use vggctl::formats::safetensors::read_safetensors;
use vggctl::model::{Arch, Head, ModelSpec, Vgg};

#[test]
fn torchscript_runs_in_libtorch_with_vggctl_logits() {
    let src = common::fixtures().join("models/vgg16_bn-cifar.safetensors");
    let tmp = common::tempdir();
    let out = tmp.path().join("m.pt");
    let r = common::run_in(
        tmp.path(),
        &[
            "export",
            "--weights",
            src.to_str().unwrap(),
            "--arch",
            "vgg16_bn",
            "--head",
            "cifar",
            "--format",
            "torchscript",
            "-o", // as train's, features' and prepare's
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("wrote") && r.stdout.contains("N x 3 x 32 x 32"),
        "{}",
        r.stdout
    );

    let mut model = Vgg::new(
        ModelSpec::new(Arch::Vgg16, true, Head::Cifar, 10),
        Device::Cpu,
    );
    model
        .load_state_dict(
            "fixture",
            &read_safetensors(&src).unwrap().tensors,
            vggctl::model::Values::FiniteOnly,
        )
        .unwrap();
    let module = CModule::load(&out).unwrap();
    tch::manual_seed(0);
    for batch in [3, 7] {
        let x = Tensor::randn([batch, 3, 32, 32], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| model.forward_t(&x, false));
        let got = tch::no_grad(|| module.forward_ts(&[&x])).unwrap();
        let err = (&got - &want).abs().max().double_value(&[]);
        assert!(err <= 1e-4, "batch {batch}: max abs error {err}");
    }
}

#[test]
fn bad_export_requests() {
    let src = common::fixtures().join("models/vgg11-cifar.safetensors");
    let src = src.to_str().unwrap();
    let tmp = common::tempdir();
    let existing = tmp.path().join("there.onnx");
    std::fs::write(&existing, b"keep me").unwrap();
    let e = existing.to_str().unwrap();
    let w = ["--weights", src, "--arch", "vgg11", "--head", "cifar"];
    let with =
        |extra: &[&str]| -> Vec<String> { w.iter().chain(extra).map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            with(&["--format", "tflite", "--out", "x"]),
            "invalid value 'tflite' for '--format",
        ),
        (
            vec![
                "--checkpoint".into(),
                "/no/such/ckpt.safetensors".into(),
                "--format".into(),
                "onnx".into(),
                "--out".into(),
                "x.onnx".into(),
            ],
            "/no/such/ckpt.safetensors",
        ),
        (
            with(&["--format", "onnx", "--out", e]),
            "already exists (use --force to overwrite)",
        ),
        (
            with(&["--format", "onnx", "--out", "/no/such/dir/m.onnx"]),
            "directory /no/such/dir does not exist",
        ),
        (
            with(&["--format", "onnx", "--half", "--out", "h.onnx"]),
            "--half applies to --format safetensors only",
        ),
        (
            with(&[
                "--format",
                "safetensors",
                "--fold-bn",
                "--out",
                "f.safetensors",
            ]),
            "--fold-bn applies to torchscript, onnx and pt2",
        ),
        (
            with(&["--format", "onnx", "--input", "16", "--out", "s.onnx"]),
            "--input 16 is too small",
        ),
        (
            with(&["--out", "m.bin"]),
            "--out m.bin: give --format, or an extension that names one (.safetensors, .pt, .onnx, .pt2)",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["export"];
        all.extend(args.iter().map(String::as_str));
        let r = common::run_in(tmp.path(), &all);
        // The flags' own mistakes are usage errors (2); the files' are 1.
        let usage = needle.starts_with("--") || needle.starts_with("invalid value");
        let code = if usage { 2 } else { 1 };
        common::assert_one_line_error(&r, code, needle);
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    // With --force it is replaced, atomically, by a real model.
    let force = |more: &[&str]| {
        let mut args = vec![
            "export",
            "--weights",
            src,
            "--arch",
            "vgg11",
            "--head",
            "cifar",
            "--out",
            e,
            "--force",
        ];
        args.extend(more);
        common::run_in(tmp.path(), &args)
    };
    let r = force(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The format came from the extension, and is named as people write it.
    assert!(r.stdout.contains("MiB, ONNX, vgg11"), "{}", r.stdout);
    assert!(std::fs::metadata(&existing).unwrap().len() > 1_000_000);
    assert_eq!(r.stderr, "");
    // A --format its extension contradicts is written, with a warning.
    let r = force(&["--format", "pt2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr,
        format!("warning: {e}: wrote pt2 (torch.export) into a file whose extension names ONNX\n")
    );
    assert!(
        r.stdout.contains("MiB, pt2 (torch.export), vgg11"),
        "{}",
        r.stdout
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}
