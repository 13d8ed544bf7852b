//! `vggctl params` through the real binary: JSON parsed into the report
//! struct, exact counts, torchvision's multiply-adds, and one-line errors.

mod common;

use vggctl::report::ParamsReport;

fn params(args: &[&str]) -> ParamsReport {
    let dir = common::tempdir();
    let mut all = vec!["params", "--json"];
    all.extend_from_slice(args);
    let r = common::run_in(dir.path(), &all);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).expect("params --json is one JSON document")
}

#[test]
fn vgg16_matches_torchvision_meta() {
    let r = params(&["--arch", "vgg16"]);
    assert_eq!(r.total_params, 138_357_544);
    assert_eq!(r.trainable_params, 138_357_544);
    assert_eq!(r.input, 224);
    // torchvision's meta "GFLOPS" (multiply-accumulates) for vgg16: 15.47.
    assert!(
        (r.total_gmacs / 15.47 - 1.0).abs() < 0.005,
        "{}",
        r.total_gmacs
    );
    let last = r.layers.last().unwrap();
    assert_eq!(last.name, "classifier.6");
    assert_eq!(last.output_shape, vec![1000]);
    let conv5_3 = r.layers.iter().find(|l| l.name == "features.28").unwrap();
    assert_eq!(conv5_3.output_shape, vec![512, 14, 14]);
    // Receptive field of VGG16's last conv layer is 196 (pool5 212).
    assert_eq!(conv5_3.receptive_field, Some(196));
    assert_eq!(
        r.layers
            .iter()
            .find(|l| l.name == "features.30")
            .unwrap()
            .receptive_field,
        Some(212)
    );
    // The 3x3 argument, block 1: two 3x3 at C=64 vs one 5x5.
    let b1 = &r.stacking[0];
    assert_eq!((b1.k, b1.channels, b1.receptive_field), (2, 64, 5));
    assert_eq!((b1.stacked_weights, b1.single_weights), (73_728, 102_400));
    assert_eq!(format!("{:.1}", b1.saving_percent), "28.0");
    assert_eq!(r.stacking.len(), 5);
    assert_eq!(r.stacking[4].k, 3);
}

#[test]
fn gmacs_of_the_family() {
    for (arch, g) in [("vgg11", 7.609), ("vgg13", 11.308), ("vgg19", 19.632)] {
        let r = params(&["--arch", arch]);
        assert!(
            (r.total_gmacs / g - 1.0).abs() < 0.005,
            "{arch}: {}",
            r.total_gmacs
        );
    }
}

#[test]
fn bn_suffix_and_small_heads() {
    let r = params(&["--arch", "vgg19_bn"]);
    assert_eq!(r.total_params, 143_678_248);
    assert!(r.bn);
    let r = params(&["--arch", "vgg16", "--head", "cifar"]);
    assert_eq!(r.classes, 10);
    assert_eq!(r.input, 32);
    // 14,714,688 conv parameters + 512*512+512 + 512*10+10.
    assert_eq!(r.total_params, 14_714_688 + 262_656 + 5_130);
    let r = params(&["--arch", "vgg16", "--head", "gap", "--classes", "100"]);
    assert_eq!(r.total_params, 14_714_688 + 51_300);
    assert_eq!(r.layers.last().unwrap().name, "classifier");
}

#[test]
fn table_output_is_readable() {
    let dir = common::tempdir();
    let r = common::run_in(dir.path(), &["params", "--arch", "vgg11"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("total parameters      132,863,336"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("features.0"));
    assert!(r.stdout.contains("28.0% fewer"));
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    let dir = common::tempdir();
    let cases: [(&[&str], &str); 5] = [
        (
            &["params", "--input", "20000000"],
            "--input 20000000 is too large: its counts do not fit in 64-bit integers",
        ),
        (
            &["params", "--arch", "vgg15"],
            "unknown architecture 'vgg15'",
        ),
        (&["params", "--classes", "0"], "--classes 0"),
        (&["params", "--input", "16"], "too small"),
        (
            &["params", "--head", "big"],
            "invalid value 'big' for '--head",
        ),
    ];
    for (args, needle) in cases {
        let r = common::run_in(dir.path(), args);
        common::assert_one_line_error(&r, 2, needle);
    }
}

/// A large input that still fits gives positive counts that scale with the
/// area (no silent overflow): 1,000,000 pixels a side.
#[test]
fn large_inputs_count_without_overflow() {
    let dir = common::tempdir();
    let at = |input: &str| -> ParamsReport {
        let r = common::run_in(
            dir.path(),
            &["params", "--arch", "vgg16", "--input", input, "--json"],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap()
    };
    let (small, big) = (at("224"), at("1000000"));
    let conv = |r: &ParamsReport| {
        r.layers
            .iter()
            .filter(|l| l.name.starts_with("features"))
            .map(|l| l.macs)
            .sum::<i64>()
    };
    let ratio = conv(&big) as f64 / conv(&small) as f64;
    let area = (1_000_000.0f64 / 224.0).powi(2);
    assert!((ratio / area - 1.0).abs() < 0.01, "{ratio} vs {area}");
    assert!(big.total_macs > small.total_macs && big.activation_elements > 0);
}
