//! What a run directory holds on disk: no weights stored twice (the resume
//! point beside `last.safetensors` and `--model-ema`'s `ema.safetensors`
//! holds only the optimizer state; `best` is a hard link to `last` while
//! they are the same epoch), the resume point found whole after a kill
//! between its renames (both weight files still pending), one clear error
//! when `last` is not the resume point's, `--keep` keeping exactly the
//! files it names (computed from the run's own metrics), and `--early-stop`
//! ending a run, and a resume, where the patience says.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vggctl::formats::safetensors::read_safetensors;
use vggctl::train::state::EpochMetrics;

const SMALL: [&str; 14] = [
    "--dataset",
    "digits",
    "--arch",
    "vgg11",
    "--head",
    "gap",
    "--batch-size",
    "32",
    "--limit-train",
    "96",
    "--limit-test",
    "64",
    "--quiet",
    "--seed=3",
];

/// The weights' moving average, whose file is an epoch-end point's too.
const EMA: [&str; 3] = ["--model-ema", "--model-ema-steps", "2"];

fn train(out: &Path, extra: &[&str]) -> common::Run {
    let mut args = vec!["train"];
    args.extend_from_slice(&SMALL);
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    common::run_in(out.parent().unwrap(), &args)
}

/// `train --resume DIR` with `extra`.
fn resume_run(dir: &Path, extra: &[&str]) -> common::Run {
    let mut args = vec!["train", "--resume", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::run_in(dir.parent().unwrap(), &args)
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect()
}

fn top1s(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<EpochMetrics>(l).unwrap().test_top1)
        .collect()
}

fn same_tensors(a: &Path, b: &Path) -> bool {
    let a = read_safetensors(a).unwrap().tensors;
    let b = read_safetensors(b).unwrap().tensors;
    a.len() == b.len() && a.iter().all(|(k, t)| b.get(k).is_some_and(|u| t.equal(u)))
}

#[test]
fn no_weights_are_stored_twice_and_a_kill_between_renames_resumes_exactly() {
    let tmp = common::tempdir();
    let straight = tmp.path().join("straight");
    let r = train(&straight, &["--epochs", "2", EMA[0], EMA[1], EMA[2]]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let last = read_safetensors(&straight.join("last.safetensors")).unwrap();
    let resume = read_safetensors(&straight.join("resume.safetensors")).unwrap();
    // The resume point: the optimizer's momentum for every parameter and
    // nothing of the model's own.
    let params: BTreeSet<&String> = last
        .tensors
        .keys()
        .filter(|k| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .collect();
    let momenta: BTreeSet<String> = resume.tensors.keys().cloned().collect();
    let expected: BTreeSet<String> = params
        .iter()
        .map(|k| format!("optimizer.momentum_buffer.{k}"))
        .collect();
    assert_eq!(momenta, expected);
    // best is last's inode while it is the same epoch, else its own file.
    let top1 = top1s(&straight);
    let ino = |n: &str| std::fs::metadata(straight.join(n)).unwrap().ino();
    assert_eq!(
        ino("best.safetensors") == ino("last.safetensors"),
        top1[1] > top1[0]
    );

    // Killed after the resume point was written but before the weights it
    // names were renamed into place: last.safetensors (and the average's
    // ema.safetensors) are still epoch 1's.
    let split = tmp.path().join("split");
    assert_eq!(
        train(&split, &["--epochs", "2", EMA[0], EMA[1], EMA[2]]).code,
        0
    );
    let one = tmp.path().join("one");
    assert_eq!(
        train(&one, &["--epochs", "1", EMA[0], EMA[1], EMA[2]]).code,
        0
    );
    let mut pendings = Vec::new();
    for name in ["last", "ema"] {
        let pending = split.join(format!("{name}.pending.safetensors"));
        let file = format!("{name}.safetensors");
        std::fs::rename(split.join(&file), &pending).unwrap();
        std::fs::copy(one.join(&file), split.join(&file)).unwrap();
        pendings.push(pending);
    }
    let r = resume_run(&split, &["--epochs", "3", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(pendings.iter().all(|p| !p.exists()));
    let r = resume_run(&straight, &["--epochs", "3", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for file in ["last.safetensors", "ema.safetensors"] {
        assert!(
            same_tensors(&straight.join(file), &split.join(file)),
            "{file}"
        );
    }

    // A last.safetensors that is not the resume point's: one error naming it.
    std::fs::copy(
        one.join("last.safetensors"),
        straight.join("last.safetensors"),
    )
    .unwrap();
    let r = resume_run(&straight, &["--epochs", "4", "--quiet"]);
    let last = straight.join("last.safetensors");
    common::assert_one_line_error(&r, 1, "which is missing or holds other weights");
    assert!(
        r.stderr.contains(&last.display().to_string()),
        "{}",
        r.stderr
    );
}

#[test]
fn keep_keeps_what_it_names() {
    let tmp = common::tempdir();
    for (keep, epochs) in [("last", 2), ("all", 3), ("top-2", 4)] {
        let out = tmp.path().join(keep);
        let r = train(&out, &["--epochs", &epochs.to_string(), "--keep", keep]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let top1 = top1s(&out);
        let mut ranked: Vec<usize> = (1..=epochs).collect();
        ranked.sort_by(|&a, &b| top1[b - 1].total_cmp(&top1[a - 1]));
        let kept: Vec<usize> = match keep {
            "last" => vec![],
            "all" => (1..=epochs).collect(),
            _ => ranked[..2].to_vec(),
        };
        let mut expected: BTreeSet<String> = ["last.safetensors", "resume.safetensors"]
            .map(String::from)
            .into();
        if keep != "last" {
            expected.insert("best.safetensors".into());
        }
        expected.extend(kept.iter().map(|e| format!("epoch-{e:03}.safetensors")));
        assert_eq!(files(&out), expected, "--keep {keep}: top-1s {top1:?}");
        if keep != "last" {
            let best = format!("epoch-{:03}.safetensors", ranked[0]);
            assert!(same_tensors(&out.join("best.safetensors"), &out.join(best)));
        }
    }
    // The policy may change on resume: top-1 drops the others.
    let out = tmp.path().join("all");
    let r = resume_run(&out, &["--epochs", "4", "--keep", "top-1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A resumed run says where it continues from (96 images at 32: 3 steps).
    let first = r.stderr.lines().next().unwrap_or_default();
    let expected = format!(
        "resuming {} at epoch 4/4, step 0/3 (last val top-1 ",
        out.display()
    );
    assert!(first.starts_with(&expected), "{}", r.stderr);
    let top1 = top1s(&out);
    let best = (1..=4).fold(1, |b, e| if top1[e - 1] > top1[b - 1] { e } else { b });
    assert!(files(&out).contains(&format!("epoch-{best:03}.safetensors")));
    assert_eq!(
        files(&out)
            .iter()
            .filter(|f| f.starts_with("epoch-"))
            .count(),
        1
    );
    let r = train(&tmp.path().join("bad"), &["--keep", "top-0"]);
    common::assert_one_line_error(
        &r,
        2,
        "--keep top-0: expected last, best, all or top-K with K at least 1",
    );
}

/// At a learning rate too small to change any prediction the val top-1
/// stays put: `--early-stop 1` ends the run after epoch 2; resuming it is
/// refused until a larger patience is given, which then ends after epoch 4.
#[test]
fn early_stop_ends_the_run_where_the_patience_says() {
    let tmp = common::tempdir();
    let out = tmp.path().join("run");
    let r = train(
        &out,
        &["--epochs", "6", "--lr", "1e-9", "--early-stop", "1"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let top1 = top1s(&out);
    assert_eq!(top1.len(), 2, "{top1:?}");
    assert_eq!(top1[0], top1[1]);
    assert!(
        r.stdout
            .contains("stopped early: no better val top-1 than epoch 1's in the epoch since"),
        "{}",
        r.stdout
    );
    let r = resume_run(&out, &["--quiet"]);
    common::assert_one_line_error(
        &r,
        1,
        "the run stopped early after epoch 2 (no better val top-1 than epoch 1's in --early-stop 1); give a larger --early-stop to train further",
    );
    let r = resume_run(&out, &["--early-stop", "3", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(top1s(&out).len(), 4);
    let r = train(&tmp.path().join("bad"), &["--early-stop", "0"]);
    common::assert_one_line_error(&r, 2, "--early-stop must be at least 1 epoch");
}

/// An epoch's files are written on a thread of their own while the next
/// epoch trains, from copies taken at the epoch's end: after three epochs
/// with `--keep all`, `epoch-001` and `epoch-002` hold, bit for bit, the
/// weights of runs stopped after one and two epochs (the moving average
/// written beside them), and the last resume point continues exactly.
/// (On the CPU the copies are what keeps the next epoch's updates out of
/// the files; these small files are written before its first update, so
/// this checks the files and their order, not that race.)
#[test]
fn an_epochs_files_hold_its_weights_though_written_while_the_next_trains() {
    let tmp = common::tempdir();
    let run = |name: &str, epochs: &str, keep: &str| {
        let out = tmp.path().join(name);
        let r = train(
            &out,
            &["--epochs", epochs, "--keep", keep, EMA[0], EMA[1], EMA[2]],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        out
    };
    let all = run("all", "3", "all");
    for epochs in ["1", "2"] {
        let alone = run(&format!("alone-{epochs}"), epochs, "last");
        let kept = all.join(format!("epoch-00{epochs}.safetensors"));
        assert!(
            same_tensors(&kept, &alone.join("last.safetensors")),
            "epoch {epochs}"
        );
        if epochs == "2" {
            // Continued to three epochs, it ends with the three-epoch run's
            // weights (not its average: the average's decay depends on the
            // run's length, as in torchvision's reference).
            let r = resume_run(&alone, &["--epochs", "3"]);
            assert_eq!(r.code, 0, "{}", r.stderr);
            let last = "last.safetensors";
            assert!(same_tensors(&all.join(last), &alone.join(last)));
        }
    }
}
