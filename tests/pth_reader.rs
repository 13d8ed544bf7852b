//! The native `.pth` reader: torchvision state dicts in both torch.save
//! formats and in fp16 give torchvision's logits (max abs error <= 1e-4);
//! views, offsets, strides, shared storages and every dtype come back exact;
//! hostile pickles are refused without running anything; damaged files are
//! clean errors; mutated files never panic or allocate beyond their size.

mod common;

use std::io::{Cursor, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};

use tch::{Device, Kind};
use vggctl::formats::pth::{parse_pth, read_pth};
use vggctl::formats::safetensors::{read_safetensors, tensor_bytes};
use vggctl::model::{Arch, Head, ModelSpec, Vgg};

fn pth_dir() -> std::path::PathBuf {
    common::fixtures().join("pth")
}

fn logits_error(
    model: &Vgg,
    io: &std::collections::BTreeMap<String, tch::Tensor>,
    key: &str,
) -> f64 {
    let logits = tch::no_grad(|| model.forward_t(&io["input"], false));
    (&logits - &io[key]).abs().max().double_value(&[])
}

#[test]
fn torchvision_state_dicts_give_torchvision_logits() {
    // Full ImageNet-head models: the legacy format torchvision publishes, and zip.
    for (file, io, arch, bn) in [
        ("vgg11.legacy.pth", "vgg11", Arch::Vgg11, false),
        ("vgg16_bn.zip.pth", "vgg16_bn", Arch::Vgg16, true),
    ] {
        let io = read_safetensors(&pth_dir().join(format!("{io}.io.safetensors")))
            .unwrap()
            .tensors;
        let path = pth_dir().join(file);
        let mut model = Vgg::new(ModelSpec::new(arch, bn, Head::Imagenet, 1000), Device::Cpu);
        model
            .load_state_dict(
                &path.display().to_string(),
                &read_pth(&path).unwrap(),
                vggctl::model::Values::FiniteOnly,
            )
            .unwrap();
        let err = logits_error(&model, &io, "logits");
        assert!(err <= 1e-4, "{file}: max abs error {err}");
    }
}

#[test]
fn every_format_and_dtype_gives_the_same_logits() {
    for (name, bn) in [("vgg11-cifar", false), ("vgg11_bn-cifar", true)] {
        let io = read_safetensors(&pth_dir().join(format!("{name}.io.safetensors")))
            .unwrap()
            .tensors;
        let mut model = Vgg::new(
            ModelSpec::new(Arch::Vgg11, bn, Head::Cifar, 10),
            Device::Cpu,
        );
        for (variant, reference) in [
            ("zip", "logits"),
            ("legacy", "logits"),
            ("legacy-fp16", "logits_fp16"),
            ("zip-fp16", "logits_fp16"),
        ] {
            let path = pth_dir().join(format!("{name}.{variant}.pth"));
            let sd = read_pth(&path).unwrap();
            let want = if variant.ends_with("fp16") {
                Kind::Half
            } else {
                Kind::Float
            };
            assert_eq!(sd["features.0.weight"].kind(), want, "{name}.{variant}");
            if bn {
                assert_eq!(sd["features.1.num_batches_tracked"].kind(), Kind::Int64);
            }
            model
                .load_state_dict(
                    &path.display().to_string(),
                    &sd,
                    vggctl::model::Values::FiniteOnly,
                )
                .unwrap();
            let err = logits_error(&model, &io, reference);
            assert!(err <= 1e-4, "{name}.{variant}: max abs error {err}");
        }
    }
}

#[test]
fn training_checkpoints_yield_their_model_entry() {
    let sd = read_pth(&pth_dir().join("checkpoint.legacy.pth")).unwrap();
    let plain = read_pth(&pth_dir().join("vgg11-cifar.legacy.pth")).unwrap();
    assert_eq!(sd.len(), plain.len());
    for (k, t) in &plain {
        assert!(sd[k].equal(t), "{k}");
    }
}

#[test]
fn views_offsets_strides_and_dtypes_are_exact() {
    let expected = read_safetensors(&pth_dir().join("views.expected.safetensors"))
        .unwrap()
        .tensors;
    for format in ["zip", "legacy"] {
        let got = read_pth(&pth_dir().join(format!("views.{format}.pth"))).unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{format}"
        );
        for (k, want) in &expected {
            let t = &got[k];
            assert_eq!(t.kind(), want.kind(), "{format} {k} dtype");
            assert_eq!(t.size(), want.size(), "{format} {k} shape");
            assert!(t.equal(want), "{format} {k} values");
        }
    }
}

const PROTO_1001: &[u8] = b"\x80\x02M\xe9\x03.";
const SYS_INFO: &[u8] = b"\x80\x02}X\x0d\x00\x00\x00little_endian\x88s.";
const MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

fn legacy_with(object_pickle: &[u8]) -> Vec<u8> {
    [MAGIC, PROTO_1001, SYS_INFO, object_pickle].concat()
}

fn zip_with(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in members {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn err_of(bytes: &[u8]) -> String {
    format!("{:#}", parse_pth(bytes).expect_err("should be refused"))
}

#[test]
fn hostile_globals_are_refused_and_nothing_runs() {
    let marker = common::tempdir().path().join("ran");
    let cmd = format!("touch {}", marker.display());
    let system = [
        b"\x80\x02cos\nsystem\nX".as_slice(),
        &(cmd.len() as u32).to_le_bytes(),
        cmd.as_bytes(),
        b"\x85R.",
    ]
    .concat();
    let eval = b"\x80\x02cbuiltins\neval\nX\x0a\x00\x00\x00__import__\x85R.".to_vec();
    let popen = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\nsubprocess\x8c\x05Popen\x93\x8c\x04true\x85\x85R.".to_vec();
    // Hidden inside a legitimate-looking state dict entry.
    let nested = [
        b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00a".as_slice(),
        &system[2..system.len() - 1],
        b"u.",
    ]
    .concat();
    for (payload, global) in [
        (&system, "os.system"),
        (&eval, "builtins.eval"),
        (&popen, "subprocess.Popen"),
        (&nested, "os.system"),
    ] {
        let e = err_of(&legacy_with(payload));
        assert!(
            e.contains(&format!("refusing to load the Python global {global}")),
            "{e}"
        );
        let e = err_of(&zip_with(&[("archive/data.pkl", payload)]));
        assert!(
            e.contains(&format!("refusing to load the Python global {global}")),
            "{e}"
        );
    }
    assert!(!marker.exists(), "a payload ran");
}

#[test]
fn damaged_files_are_clean_errors() {
    let good = std::fs::read(pth_dir().join("views.legacy.pth")).unwrap();
    // Wrong magic number.
    let mut bad = good.clone();
    bad[5] ^= 0xff;
    assert!(err_of(&bad).contains("magic number"), "{}", err_of(&bad));
    assert!(err_of(b"hello").contains("not a torch.save file"));
    // Truncated anywhere.
    for cut in [10, 40, good.len() / 2, good.len() - 3] {
        parse_pth(&good[..cut]).expect_err("truncated file accepted");
    }
    // A storage that claims more elements than the file holds.
    let count48 = b"\x30\0\0\0\0\0\0\0\0\0\0\0\0\0\x80\x3f";
    let at = good
        .windows(count48.len())
        .position(|w| w == count48)
        .expect("storage of 48 floats");
    let mut huge = good.clone();
    huge[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = err_of(&huge);
    assert!(
        e.contains("more than the") && e.contains("bytes left"),
        "{e}"
    );

    // Zip: a storage file shorter than its header says.
    let zipped = std::fs::read(pth_dir().join("views.zip.pth")).unwrap();
    let mut archive = zip::ZipArchive::new(Cursor::new(&zipped)).unwrap();
    let mut members: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        let name = f.name().unwrap().to_string();
        if name.ends_with("/data/0") {
            data.truncate(data.len() / 2);
        }
        members.push((name, data));
    }
    let refs: Vec<(&str, &[u8])> = members
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let e = err_of(&zip_with(&refs));
    assert!(e.contains("storage 0 holds"), "{e}");
}

#[test]
fn mutated_files_never_panic_or_over_allocate() {
    let mut rng = common::Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut refused) = (0, 0);
    for name in ["views.legacy.pth", "views.zip.pth"] {
        let src = std::fs::read(pth_dir().join(name)).unwrap();
        for _ in 0..2000 {
            let m = common::mutate(&mut rng, &src);
            let result = catch_unwind(AssertUnwindSafe(|| parse_pth(&m)));
            match result.unwrap_or_else(|_| panic!("reader panicked on a mutation of {name}")) {
                Ok(sd) => {
                    ok += 1;
                    for t in sd.values() {
                        let bytes = t.numel() * t.kind().elt_size_in_bytes();
                        assert!(
                            bytes <= m.len(),
                            "{bytes}-byte tensor from a {}-byte file",
                            m.len()
                        );
                    }
                }
                Err(_) => refused += 1,
            }
        }
    }
    // Both outcomes occur, so the mutations reach past the header checks.
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
}

/// Pickles built to exhaust the reader: 2,000,000 nested lists (4 MB), a
/// list that contains itself, one tuple shared 64 levels deep (2^64 paths,
/// 586 bytes), and a dict of 200,000 keys. Each ends in one error (or, for
/// the dict, is read whole with later keys replacing earlier ones), within
/// seconds, without overflowing the stack: the walk is iterative, by
/// identity, and dict keys are indexed.
fn nested_lists(n: usize) -> Vec<u8> {
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(b']', n));
    p.extend(std::iter::repeat_n(b'a', n - 1));
    p.push(b'.');
    p
}

fn shared_tuples(levels: u8) -> Vec<u8> {
    // t0 = (1,); t_i = (t_{i-1}, t_{i-1}), each memoized at i.
    let mut p = b"\x80\x02K\x01\x85q\x00".to_vec();
    for i in 1..=levels {
        p.extend_from_slice(&[b'h', i - 1, b'h', i - 1, 0x86, b'q', i]);
    }
    p.push(b'.');
    p
}

fn dict_of(keys: usize, repeat_first: bool) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    let key = |p: &mut Vec<u8>, k: &str, v: u8| {
        p.push(b'X');
        p.extend_from_slice(&(k.len() as u32).to_le_bytes());
        p.extend_from_slice(k.as_bytes());
        p.extend_from_slice(&[b'K', v]);
    };
    for i in 0..keys {
        key(&mut p, &format!("k{i}"), 1);
    }
    if repeat_first {
        key(&mut p, "k0", 2);
    }
    p.extend_from_slice(b"u.");
    p
}

#[test]
fn deep_cyclic_shared_and_wide_pickles_end_cleanly_and_quickly() {
    use vggctl::formats::pickle::{Allowlist, Unpickler};
    let t0 = std::time::Instant::now();
    let in_zip = |pkl: &[u8]| err_of(&zip_with(&[("archive/data.pkl", pkl)]));
    let e = in_zip(&nested_lists(2_000_000));
    assert!(e.contains("nests containers more than 100 deep"), "{e}");
    let e = in_zip(b"\x80\x02]q\x00h\x00a.");
    assert!(e.contains("holds a container inside itself"), "{e}");
    let e = in_zip(&shared_tuples(64));
    assert!(e.contains("holds a tuple, not a state dict"), "{e}");
    // The legacy format walks the same way.
    let e = err_of(&legacy_with(&nested_lists(100_000)));
    assert!(e.contains("more than 100 deep"), "{e}");
    let allow = Allowlist {
        globals: &[],
        dict_like: &[],
    };
    let wide = dict_of(200_000, true);
    let d = Unpickler::new(&wide, &allow).load().unwrap();
    let entries = d.entries().unwrap();
    assert_eq!(entries.len(), 200_000);
    assert_eq!(d.get("k0").unwrap().as_int(), Some(2), "the later k0 wins");
    assert_eq!(d.get("k199999").unwrap().as_int(), Some(1));
    // 100 levels is the limit, not a round number near it.
    let at_limit = Unpickler::new(&nested_lists(100), &allow).load();
    assert!(at_limit.is_ok());
    let over = Unpickler::new(&nested_lists(101), &allow).load();
    assert!(over.is_err());
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
}

/// Through the binary, as a user meets them: one line naming the file,
/// exit 1, no crash.
#[test]
fn hostile_pth_files_are_one_line_errors_in_the_cli() {
    let tmp = common::tempdir();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("deep.pth", nested_lists(2_000_000), "more than 100 deep"),
        (
            "self.pth",
            b"\x80\x02]q\x00h\x00a.".to_vec(),
            "inside itself",
        ),
        ("shared.pth", shared_tuples(64), "not a state dict"),
    ];
    for (name, pkl, needle) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, zip_with(&[("archive/data.pkl", &pkl)])).unwrap();
        let out = tmp.path().join("out.safetensors");
        let args = common::export_vgg11_args(path.to_str().unwrap(), out.to_str().unwrap());
        let r = common::run_in(tmp.path(), &args);
        common::assert_one_line_error(&r, 1, needle);
        assert!(r.stderr.contains(name), "{}", r.stderr);
        assert!(!out.exists());
    }
}

/// A flipped byte inside a storage (the CRC-32 no longer matches, which
/// Python's `testzip` reports) is an error; and members whose inflated
/// sizes together exceed 64 times the archive (each under that cap alone)
/// are refused before they are inflated.
#[test]
fn zip_checksums_and_the_total_inflated_size_are_enforced() {
    let good = std::fs::read(pth_dir().join("views.zip.pth")).unwrap();
    parse_pth(&good).unwrap();
    let mut archive = zip::ZipArchive::new(Cursor::new(&good)).unwrap();
    let (start, len) = {
        let names: Vec<String> = archive
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .collect();
        let name = names.iter().find(|n| n.contains("/data/")).unwrap().clone();
        let f = archive.by_name(&name).unwrap();
        (f.data_start().unwrap() as usize, f.size() as usize)
    };
    let mut bad = good.clone();
    bad[start + len / 2] ^= 0x40;
    let e = err_of(&bad);
    assert!(e.contains("checksum does not match"), "{e}");

    // 40 deflated members of 1 MiB of zeros each (about 1 KB apiece): each
    // is under 64 times the archive, all together are over.
    let zeros = vec![0u8; 1 << 20];
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let deflate = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut pkl = b"\x80\x02}(".to_vec();
    for i in 0..40 {
        let key = format!("t{i}");
        pkl.push(b'X');
        pkl.extend_from_slice(&(key.len() as u32).to_le_bytes());
        pkl.extend_from_slice(key.as_bytes());
        pkl.extend_from_slice(
            b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n",
        );
        pkl.push(b'X');
        pkl.extend_from_slice(&(key.len() as u32).to_le_bytes());
        pkl.extend_from_slice(key.as_bytes());
        pkl.extend_from_slice(b"X\x03\x00\x00\x00cpuJ\x00\x00\x04\x00tQK\x00J\x00\x00\x04\x00\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR");
    }
    pkl.extend_from_slice(b"u.");
    w.start_file("archive/data.pkl", deflate).unwrap();
    w.write_all(&pkl).unwrap();
    for i in 0..40 {
        w.start_file(format!("archive/data/t{i}"), deflate).unwrap();
        w.write_all(&zeros).unwrap();
    }
    let bomb = w.finish().unwrap().into_inner();
    assert!(
        bomb.len() * 64 > zeros.len(),
        "each member is under the cap alone"
    );
    assert!(
        bomb.len() * 64 < 40 * zeros.len(),
        "all together are over it"
    );
    let e = err_of(&bomb);
    assert!(e.contains("with its other members"), "{e}");
}

/// `read_pth` reads a file a storage at a time (a zip member by member, a
/// legacy file's storages after its pickles; pickles past the first MiB
/// make it read the file whole): whatever the file, it gives what
/// `parse_pth` gives for the same bytes — the same tensors, or the same
/// error. Good files of both formats, a legacy file whose pickles end past
/// 1 MiB, truncations, a storage claiming more than the file holds, and
/// 300 mutations of each small file.
#[test]
fn a_file_read_a_storage_at_a_time_is_its_bytes_parsed() {
    let tmp = common::tempdir();
    let legacy = std::fs::read(pth_dir().join("views.legacy.pth")).unwrap();
    let zipped = std::fs::read(pth_dir().join("views.zip.pth")).unwrap();
    // The system-information pickle padded with a 2 MiB string.
    let head = MAGIC.len() + PROTO_1001.len();
    assert_eq!(&legacy[..head], [MAGIC, PROTO_1001].concat());
    let sys_end = head + legacy[head..].iter().position(|&b| b == b'.').unwrap() + 1;
    let pad = vec![b'p'; 2 << 20];
    let mut sys = b"\x80\x02}(X\x0d\x00\x00\x00little_endian\x88X\x03\x00\x00\x00padX".to_vec();
    sys.extend_from_slice(&(pad.len() as u32).to_le_bytes());
    sys.extend_from_slice(&pad);
    sys.extend_from_slice(b"u.");
    let padded = [&legacy[..head], &sys, &legacy[sys_end..]].concat();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("legacy".into(), legacy.clone()),
        ("zip".into(), zipped.clone()),
        ("padded".into(), padded.clone()),
        (
            "cifar".into(),
            std::fs::read(pth_dir().join("vgg11-cifar.legacy.pth")).unwrap(),
        ),
        (
            "checkpoint".into(),
            std::fs::read(pth_dir().join("checkpoint.legacy.pth")).unwrap(),
        ),
    ];
    for (name, src) in [("legacy", &legacy), ("zip", &zipped), ("padded", &padded)] {
        for cut in [10, 40, src.len() / 2, src.len() - 3] {
            cases.push((format!("{name} cut at {cut}"), src[..cut].to_vec()));
        }
    }
    let count48 = b"\x30\0\0\0\0\0\0\0\0\0\0\0\0\0\x80\x3f";
    for (name, src) in [("legacy", &legacy), ("padded", &padded)] {
        let at = src
            .windows(count48.len())
            .position(|w| w == count48)
            .unwrap();
        let mut huge = src.clone();
        huge[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        cases.push((format!("{name} with a huge storage"), huge));
    }
    let mut rng = common::Rng(0x2545_F491_4F6C_DD1D);
    for (name, src) in [("legacy", &legacy), ("zip", &zipped)] {
        for i in 0..300 {
            cases.push((
                format!("{name} mutation {i}"),
                common::mutate(&mut rng, src),
            ));
        }
    }
    let path = tmp.path().join("m.pth");
    let (mut same_ok, mut same_err) = (0, 0);
    for (name, bytes) in &cases {
        std::fs::write(&path, bytes).unwrap();
        match (parse_pth(bytes), read_pth(&path)) {
            (Ok(want), Ok(got)) => {
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>(),
                    "{name}"
                );
                for (k, t) in &want {
                    assert_eq!(got[k].kind(), t.kind(), "{name} {k}");
                    // Bit for bit (a mutation may make NaNs).
                    assert!(tensor_bytes(&got[k]) == tensor_bytes(t), "{name} {k}");
                }
                same_ok += 1;
            }
            (Err(want), Err(got)) => {
                let (want, got) = (format!("{want:#}"), format!("{got:#}"));
                let prefix = format!("reading {}: ", path.display());
                assert_eq!(
                    got.strip_prefix(&prefix),
                    Some(want.as_str()),
                    "{name}: {got}"
                );
                same_err += 1;
            }
            (want, got) => panic!(
                "{name}: parse_pth {:?}, read_pth {:?}",
                want.is_ok(),
                got.is_ok()
            ),
        }
    }
    // The padded file is read (its pickles past the first MiB), and both
    // outcomes occur among the mutations.
    assert!(
        read_pth(&{
            std::fs::write(&path, &padded).unwrap();
            path.clone()
        })
        .is_ok()
    );
    assert!(
        same_ok > 5 && same_err > 12,
        "ok {same_ok}, refused {same_err}"
    );
}
