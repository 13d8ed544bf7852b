//! Files that are not files: a device (`/dev/zero`, endless), a FIFO with
//! no writer (blocks on open) and a directory, given wherever a user names
//! a file (a checkpoint for eval and predict, weights for export, a
//! CIFAR-10 batch behind a symbolic link). Each is one error line naming the path, exit 1, within
//! seconds: readers check that a path is a regular file before opening it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

fn fifo(dir: &Path) -> String {
    let p = dir.join("fifo");
    let ok = std::process::Command::new("mkfifo")
        .arg(&p)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo failed");
    p.display().to_string()
}

#[test]
fn devices_fifos_and_directories_are_refused_before_reading() {
    let tmp = common::tempdir();
    let dir = tmp.path();
    let fifo = fifo(dir);
    let folder = dir.display().to_string();
    let out = dir.join("out.safetensors");
    let out = out.to_str().unwrap();
    let t0 = Instant::now();
    for bad in ["/dev/zero", fifo.as_str(), folder.as_str()] {
        let cases: [Vec<&str>; 3] = [
            vec!["eval", "--checkpoint", bad, "--dataset", "digits"],
            common::export_vgg11_args(bad, out),
            vec!["predict", "--checkpoint", bad, "photo.png"],
        ];
        for args in cases {
            let r = common::run_within(dir, &args, Duration::from_secs(60));
            let needle = if bad == folder {
                "a directory"
            } else {
                "not a regular file"
            };
            common::assert_one_line_error(&r, 1, needle);
            assert!(r.stderr.contains(bad), "{args:?}: {}", r.stderr);
        }
    }
    // CIFAR-10's test batch as a symbolic link to /dev/zero.
    let bin = dir.join("cifar").join("cifar-10-batches-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let src = common::fixtures().join("digits-bin/cifar-10-batches-bin");
    for f in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(f.path(), bin.join(f.file_name())).unwrap();
    }
    std::fs::remove_file(bin.join("test_batch.bin")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", bin.join("test_batch.bin")).unwrap();
    let data = dir.join("cifar").display().to_string();
    let r = common::run_in(
        dir,
        &[
            "train",
            "--data-dir",
            &data,
            "--epochs",
            "1",
            "--no-download",
            "--quiet",
        ],
    );
    common::assert_one_line_error(&r, 1, "test_batch.bin: not a regular file");
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "took {:?}",
        t0.elapsed()
    );
}
