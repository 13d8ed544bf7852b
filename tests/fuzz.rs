//! Fuzzing of every reader of untrusted bytes: the pickle machine (through
//! its own entry point and inside a legacy `.pth` container, where the
//! storage walk runs over what it built), both `.pth` layouts, safetensors
//! with vggctl's metadata check, both CIFAR layouts (as CIFAR-10's and
//! CIFAR-100's files), MNIST's IDX files (plain and gzipped), EMNIST's
//! zip of gzipped IDX files, SVHN's
//! MAT-files (plain and compressed), USPS's bzip2 files and their text, Oxford-IIIT Pet's and Food-101's
//! lists, the image decoder and prepared datasets (index, checksums, the
//! images in them).
//!
//! Inputs are mutations of real files (the fixtures) and, for pickles,
//! programs drawn from a grammar of the opcodes hostile files use: deep
//! nesting, memo references that make a container hold itself or share
//! one value many times, lengths that claim gigabytes, unknown globals,
//! frames, garbage. An input whose outcome (success, or its error with
//! numbers removed) is new joins the target's corpus and is mutated
//! further. Every input must end in `Ok` or `Err` within `SLOW` seconds,
//! without a panic, and the process's peak memory must stay under 1 GiB
//! above where it started. An input that fails any of that is written to
//! `tests/fuzz-cases/<target>/` and the test fails; every case kept there
//! is run first, each time. A crash that kills the process (a stack
//! overflow) leaves the input in `target/fuzz/<target>.input`.
//!
//! `VGGCTL_FUZZ_SECS` (default 30, spread over the targets) and
//! `VGGCTL_FUZZ_SEED` set the run, `VGGCTL_FUZZ_TARGETS` (names, comma
//! separated) limits it to some targets; `scripts/fuzz` runs it longer
//! with a fresh seed and prints the figures.

mod common;

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use common::{Rng, mutate};
use vggctl::formats::pickle::{Allowlist, Unpickler};

/// The longest any one input may take.
const SLOW: Duration = Duration::from_secs(2);
/// The most a target's corpus keeps.
const CORPUS_MAX: usize = 512;

type Reader = fn(&Path, &[u8]) -> Result<()>;

struct Target {
    name: &'static str,
    read: Reader,
    seeds: fn() -> Vec<Vec<u8>>,
    /// Whether grammar pickles are drawn for it too.
    pickles: bool,
}

const TORCH_AND_NUMPY: Allowlist = Allowlist {
    globals: &[
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch", "FloatStorage"),
        ("collections", "OrderedDict"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    ],
    dict_like: &[("collections", "OrderedDict")],
};

fn read_pickle(_: &Path, bytes: &[u8]) -> Result<()> {
    Unpickler::new(bytes, &TORCH_AND_NUMPY).load().map(drop)
}

/// A legacy `torch.save` container around the input as its object pickle.
fn read_in_legacy_pth(_: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    file.extend_from_slice(b"\x80\x02M\xe9\x03.\x80\x02}.");
    file.extend_from_slice(bytes);
    file.extend_from_slice(b"\x80\x02].");
    vggctl::formats::pth::parse_pth(&file).map(drop)
}

fn read_pth(_: &Path, bytes: &[u8]) -> Result<()> {
    vggctl::formats::pth::parse_pth(bytes).map(drop)
}

fn read_safetensors(_: &Path, bytes: &[u8]) -> Result<()> {
    let sd = vggctl::formats::safetensors::parse_safetensors(bytes)?;
    vggctl::checkpoint::ModelMeta::from_metadata(&sd.metadata).map(drop)
}

/// As CIFAR-10's file and as CIFAR-100's (other record size and label bytes).
fn read_cifar_bin(path: &Path, _: &[u8]) -> Result<()> {
    use vggctl::data::cifar::{CIFAR10, CIFAR100};
    let ten = CIFAR10.read_bin_batch(path).map(drop);
    ten.and(CIFAR100.read_bin_batch(path).map(drop))
}

/// As CIFAR-10's pickle and as CIFAR-100's (`fine_labels`).
fn read_cifar_py(path: &Path, _: &[u8]) -> Result<()> {
    use vggctl::data::cifar::{CIFAR10, CIFAR100};
    let ten = CIFAR10.read_py_batch(path).map(drop);
    ten.and(CIFAR100.read_py_batch(path).map(drop))
}

/// As MNIST's images file and labels file, then the same as their `.gz`.
fn read_mnist(path: &Path, bytes: &[u8]) -> Result<()> {
    use vggctl::data::mnist::{MNIST, read_images};
    let plain = read_images(path).map(drop);
    let plain = plain.and(MNIST.read_labels(path).map(drop));
    let base = path.with_extension("idx");
    let gz = path.with_extension("idx.gz");
    std::fs::write(&gz, bytes)?;
    let packed = read_images(&base)
        .map(drop)
        .and(MNIST.read_labels(&base).map(drop));
    std::fs::remove_file(&gz)?;
    plain.and(packed)
}

/// As EMNIST's gzip.zip, from which its `digits` split is extracted
/// and read.
fn read_emnist_zip(path: &Path, bytes: &[u8]) -> Result<()> {
    let base = path.with_extension("emnist");
    let raw = base.join("EMNIST").join("raw");
    // Each input extracts afresh.
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw)?;
    std::fs::write(raw.join("gzip.zip"), bytes)?;
    let digits = vggctl::data::mnist::named("emnist-digits").expect("an EMNIST split");
    digits.load(&base, false, None, &mut |_, _| {}).map(drop)
}

/// As GTSRB's list of test images (`GT-final_test.csv`).
fn read_gtsrb_list(path: &Path, bytes: &[u8]) -> Result<()> {
    let base = path.with_extension("gtsrb");
    std::fs::create_dir_all(&base)?;
    std::fs::write(base.join("GT-final_test.csv"), bytes)?;
    vggctl::data::gtsrb::test_list(&base).map(drop)
}

/// As GTSRB's zip of training images, extracted (its class folders'
/// images only) into a fresh folder.
fn read_zip_archive(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.with_extension("zipped");
    // Each input extracts afresh.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let archive = &vggctl::data::gtsrb::PUBLISHED.archives[0];
    std::fs::write(dir.join(archive.file), bytes)?;
    vggctl::data::archive::unpack(&dir, archive)
}

/// As an SVHN split's MAT-file.
fn read_svhn(path: &Path, _: &[u8]) -> Result<()> {
    vggctl::data::svhn::read_split(path).map(drop)
}

/// As a USPS file (bzip2), and as its text (LIBSVM's lines).
fn read_usps(path: &Path, bytes: &[u8]) -> Result<()> {
    let text = vggctl::data::usps::parse(&String::from_utf8_lossy(bytes)).map(drop);
    vggctl::data::usps::read_file(path).map(drop).or(text)
}

/// As FER2013's CSV text.
fn read_fer2013(_: &Path, bytes: &[u8]) -> Result<()> {
    vggctl::data::fer2013::parse(bytes).map(drop)
}

/// As Oxford-IIIT Pet's lists: the bytes as trainval.txt and as test.txt.
fn read_pet_lists(path: &Path, bytes: &[u8]) -> Result<()> {
    let base = path.with_extension("pets");
    let annotations = base.join("annotations");
    std::fs::create_dir_all(&annotations)?;
    std::fs::write(annotations.join("trainval.txt"), bytes)?;
    std::fs::write(annotations.join("test.txt"), bytes)?;
    vggctl::data::pets::listing(&base).map(drop)
}

/// As Food-101's lists: the bytes as meta/train.json and meta/test.json.
fn read_food_lists(path: &Path, bytes: &[u8]) -> Result<()> {
    let root = path.with_extension("food");
    let meta = root.join("food-101").join("meta");
    std::fs::create_dir_all(&meta)?;
    std::fs::write(meta.join("train.json"), bytes)?;
    std::fs::write(meta.join("test.json"), bytes)?;
    vggctl::data::food101::listing(&root).map(drop)
}

/// As DTD's lists: the bytes as partition 1's train, val and test lists.
fn read_dtd_lists(path: &Path, bytes: &[u8]) -> Result<()> {
    let base = path.with_extension("dtd");
    let labels = base.join("dtd").join("labels");
    std::fs::create_dir_all(&labels)?;
    for split in ["train", "val", "test"] {
        std::fs::write(labels.join(format!("{split}1.txt")), bytes)?;
    }
    vggctl::data::dtd::listing(&base, None).map(drop)
}

fn read_image(path: &Path, _: &[u8]) -> Result<()> {
    // Whole, then as far as a crop of its top third needs (a sequential
    // JPEG's header is then rewritten to fewer rows).
    vggctl::data::image::decode_rgb(path)?;
    vggctl::data::image::decode_sized(path, |h, _| ((), h as usize / 3)).map(drop)
}

fn read_prepared(path: &Path, _: &[u8]) -> Result<()> {
    let store = vggctl::data::prepared::Prepared::open(path)?;
    let entries = store
        .index
        .train
        .iter()
        .chain(store.index.val.iter().flatten());
    for e in entries.take(4) {
        let bytes = store.bytes(e)?;
        store.image(e, bytes, path, |h, _| ((), h as usize))?;
    }
    Ok(())
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join(rel)).unwrap()
}

fn pth_seeds() -> Vec<Vec<u8>> {
    vec![
        fixture("pth/views.legacy.pth"),
        fixture("pth/views.zip.pth"),
    ]
}

fn pickle_seeds() -> Vec<Vec<u8>> {
    // The object pickle of the legacy fixture, and CIFAR's batch pickle.
    let mut s = vec![fixture("digits-py/cifar-10-batches-py/batches.meta")];
    s.push(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02K\x01aX\x01\x00\x00\x00bh\x02u.".to_vec());
    s
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let spec = vggctl::model::ModelSpec::new(
        vggctl::model::Arch::Vgg11,
        false,
        vggctl::model::Head::Gap,
        3,
    );
    let meta = vggctl::checkpoint::meta_for_weights(spec);
    let t = tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([3, 4]);
    vggctl::formats::safetensors::write_safetensors(
        &path,
        &[("w".to_string(), t)],
        &meta.to_metadata(),
    )
    .unwrap();
    vec![std::fs::read(&path).unwrap()]
}

fn cifar_bin_seeds() -> Vec<Vec<u8>> {
    // Four records of the test batch keep each read short.
    let b = fixture("digits-bin/cifar-10-batches-bin/test_batch.bin");
    let c = fixture("digits-bin/cifar-100-binary/test.bin");
    vec![b[..4 * 3073].to_vec(), c[..4 * 3074].to_vec()]
}

fn cifar_py_seeds() -> Vec<Vec<u8>> {
    vec![
        fixture("digits-py/cifar-10-batches-py/test_batch"),
        fixture("digits-py/cifar-100-python/test"),
    ]
}

/// Four images of the test file (its count rewritten), its labels, and
/// both gzipped.
fn mnist_seeds() -> Vec<Vec<u8>> {
    use std::io::Write;
    let mut images =
        fixture("digits-bin/MNIST/raw/t10k-images-idx3-ubyte")[..16 + 4 * 784].to_vec();
    images[4..8].copy_from_slice(&4u32.to_be_bytes());
    let labels = fixture("digits-bin/MNIST/raw/t10k-labels-idx1-ubyte");
    let gz = |b: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    vec![gz(&images), gz(&labels), images, labels]
}

/// EMNIST's zip of the `digits` split's four `.gz` files, made of
/// [`mnist_seeds`]' four images and their labels, deflated and stored.
fn emnist_zip_seeds() -> Vec<Vec<u8>> {
    use std::io::Write;
    let images = mnist_seeds().swap_remove(0);
    let mut labels = fixture("digits-bin/MNIST/raw/t10k-labels-idx1-ubyte")[..8 + 4].to_vec();
    labels[4..8].copy_from_slice(&4u32.to_be_bytes());
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&labels).unwrap();
    let labels = e.finish().unwrap();
    let mut members = Vec::new();
    for part in ["train", "test"] {
        for (kind, gz) in [("images-idx3", &images), ("labels-idx1", &labels)] {
            let name = format!("gzip/emnist-digits-{part}-{kind}-ubyte.gz");
            members.push((name, gz.as_slice()));
        }
    }
    zips(&members)
}

/// A zip of `members` (names and contents), deflated and stored.
fn zips<S: AsRef<str>>(members: &[(S, &[u8])]) -> Vec<Vec<u8>> {
    use std::io::Write;
    let methods = [
        zip::CompressionMethod::Deflated,
        zip::CompressionMethod::Stored,
    ];
    methods
        .map(|method| {
            let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            let options = zip::write::SimpleFileOptions::default().compression_method(method);
            for (name, data) in members {
                z.start_file(name.as_ref(), options).unwrap();
                z.write_all(data).unwrap();
            }
            z.finish().unwrap().into_inner()
        })
        .to_vec()
}

/// GT-final_test.csv as published (CRLF, its eight columns), and with
/// the columns reordered and spaces after the separators.
fn gtsrb_list_seeds() -> Vec<Vec<u8>> {
    let rows = (0..6).map(|i| format!("{i:05}.ppm;53;54;6;5;48;49;{}\r\n", i * 7 % 43));
    let published = format!(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n{}",
        rows.collect::<String>()
    );
    let reordered = "ClassId; Width; Filename\n16; 53; 00000.ppm\n1; 30;00001.ppm\n\n".to_string();
    vec![published.into_bytes(), reordered.into_bytes()]
}

/// GTSRB's training zip in small: two class folders' images (a PPM each),
/// their annotations, a readme and a member naming a path outside the
/// folder; deflated and stored.
fn zip_archive_seeds() -> Vec<Vec<u8>> {
    let ppm = b"P6\n2 2\n255\n\x00\x10\x20\x30\x40\x50\x60\x70\x80\x90\xa0\xb0";
    let members: [(&str, &[u8]); 5] = [
        ("GTSRB/Readme-Images.txt", b"readme"),
        ("GTSRB/Training/00000/00000_00000.ppm", ppm),
        ("GTSRB/Training/00000/GT-00000.csv", b"Filename;ClassId\n"),
        ("GTSRB/Training/00001/00000_00001.ppm", ppm),
        ("GTSRB/Training/00000/../../../evil.ppm", ppm),
    ];
    zips(&members)
}

/// A level 5 MAT-file's data element: its tag, then its bytes padded to 8.
fn mat_element(ty: u32, data: &[u8]) -> Vec<u8> {
    let mut e = [ty.to_le_bytes(), (data.len() as u32).to_le_bytes()].concat();
    e.extend_from_slice(data);
    e.resize(e.len().div_ceil(8) * 8, 0);
    e
}

/// A matrix of MATLAB class `class` (6: double, 9: uint8, 1: cell, 2:
/// struct, 4: char) named `name`: its flags, dimensions and name, then
/// `contents`.
fn mat_matrix(class: u8, dims: &[i32], name: &str, contents: &[u8]) -> Vec<u8> {
    let dims: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    let body = [
        mat_element(6, &[class, 0, 0, 0, 0, 0, 0, 0]),
        mat_element(5, &dims),
        mat_element(1, name.as_bytes()),
        contents.to_vec(),
    ];
    mat_element(14, &body.concat())
}

/// A MAT-file's 128-byte header (little-endian, version 0x0100), then
/// `variables`.
fn mat_file(variables: &[Vec<u8>]) -> Vec<u8> {
    let mut header = b"MATLAB 5.0 MAT-file, written by vggctl's fuzz seeds".to_vec();
    header.resize(124, b' ');
    header.extend([0, 1, b'I', b'M']);
    [header, variables.concat()].concat()
}

/// Text as MATLAB writes it: 16-bit characters, one row.
fn mat_text(s: &str) -> Vec<u8> {
    let units: Vec<u8> = s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let n = s.encode_utf16().count() as i32;
    mat_matrix(4, &[1, n], "", &mat_element(4, &units))
}

/// Two SVHN images and their labels (a double `y`), plain and with each
/// variable zlib-compressed.
/// Two images of USPS's lines, as text and compressed by bzip2.
fn usps_seeds() -> Vec<Vec<u8>> {
    use std::io::Write;
    let line = |label: usize| {
        let values: Vec<String> = (1..=256)
            .map(|i| format!("{i}:{}", (i * 37 % 200) as f64 / 100.0 - 1.0))
            .collect();
        format!("{label} {}\n", values.join(" "))
    };
    let text = format!("{}{}", line(10), line(1)).into_bytes();
    let mut packed = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    packed.write_all(&text).unwrap();
    vec![packed.finish().unwrap(), text]
}

/// FER2013's CSV (a training and a test face) and icml_face_data.csv's.
fn fer2013_seeds() -> Vec<Vec<u8>> {
    let face = |k: usize| {
        let v: Vec<String> = (0..2304).map(|i| ((i * k) % 256).to_string()).collect();
        v.join(" ")
    };
    let fer = format!(
        "emotion,pixels,Usage\n3,\"{}\",Training\n6,\"{}\",PrivateTest\n",
        face(7),
        face(11)
    );
    let icml = format!(
        "emotion, Usage, pixels\r\n3,Training,{}\r\n6,PublicTest,{}\r\n",
        face(7),
        face(11)
    );
    vec![fer.into_bytes(), icml.into_bytes()]
}

fn svhn_seeds() -> Vec<Vec<u8>> {
    use std::io::Write;
    let pixels: Vec<u8> = (0..2 * 3072).map(|i| (i * 7 % 256) as u8).collect();
    let labels: Vec<u8> = [10.0f64, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let x = mat_matrix(9, &[32, 32, 3, 2], "X", &mat_element(2, &pixels));
    let y = mat_matrix(6, &[2, 1], "y", &mat_element(9, &labels));
    let plain = mat_file(&[x.clone(), y.clone()]);
    let mut packed = mat_file(&[]);
    for var in [x, y] {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&var).unwrap();
        let z = z.finish().unwrap();
        packed.extend(15u32.to_le_bytes());
        packed.extend((z.len() as u32).to_le_bytes());
        packed.extend(z);
    }
    vec![plain, packed]
}

/// Stanford Cars' annotations as its devkit's MAT-files hold them (a 1xN
/// struct array; MATLAB's 16-bit text, a double class stored as uint8),
/// for `(class, fname)` each.
fn cars_annotations(rows: &[(u8, &str)]) -> Vec<u8> {
    let mut fields = mat_element(5, &8u32.to_le_bytes());
    fields.extend(mat_element(1, b"bbox_x1\0class\0\0\0fname\0\0\0"));
    for &(class, fname) in rows {
        fields.extend(mat_matrix(6, &[1, 1], "", &mat_element(2, &[39])));
        fields.extend(mat_matrix(6, &[1, 1], "", &mat_element(2, &[class])));
        fields.extend(mat_text(fname));
    }
    let n = rows.len() as i32;
    mat_file(&[mat_matrix(2, &[1, n], "annotations", &fields)])
}

/// Training annotations: two images, one named with a character beyond
/// ASCII.
fn cars_seeds() -> Vec<Vec<u8>> {
    vec![cars_annotations(&[(3, "00001.jpg"), (196, "Citroën.jpg")])]
}

/// As Stanford Cars' training annotations, beside a class list (its
/// 196 names, a cell array of text) and one test annotation.
fn read_cars_annotations(path: &Path, bytes: &[u8]) -> Result<Vec<(String, i64)>> {
    let base = path.with_extension("cars");
    if !base.exists() {
        std::fs::create_dir_all(base.join("devkit"))?;
        let names: Vec<u8> = (0..196)
            .flat_map(|c| mat_text(&format!("Model {c}")))
            .collect();
        let meta = mat_file(&[mat_matrix(1, &[1, 196], "class_names", &names)]);
        std::fs::write(base.join("devkit/cars_meta.mat"), meta)?;
        let test = cars_annotations(&[(1, "00001.jpg")]);
        std::fs::write(base.join("cars_test_annos_withlabels.mat"), test)?;
    }
    std::fs::write(base.join("devkit/cars_train_annos.mat"), bytes)?;
    // Errors without the folder's long name, which would hide their
    // differences from the outcome's signature.
    let at = format!("{}/", base.display());
    let listing = vggctl::data::cars::listing(&base);
    let (_, listed) = listing.map_err(|e| anyhow::anyhow!(format!("{e:#}").replace(&at, "")))?;
    let named =
        |(p, label): (PathBuf, i64)| (p.strip_prefix(&base).unwrap().display().to_string(), label);
    Ok(listed.train.into_iter().map(named).collect())
}

fn read_cars(path: &Path, bytes: &[u8]) -> Result<()> {
    read_cars_annotations(path, bytes).map(drop)
}

fn image_seeds() -> Vec<Vec<u8>> {
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
    let mut out = Vec::new();
    use image::ImageFormat::{Bmp, Jpeg, Png, Pnm, Tiff, WebP};
    for format in [Jpeg, Png, Bmp, Pnm, Tiff, WebP] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, format).unwrap();
        out.push(bytes.into_inner());
    }
    out
}

/// Oxford-IIIT Pet's list of two images of each of its 37 breeds (cats'
/// names capitalized, dogs' not, as the real lists have them).
fn pet_list_seeds() -> Vec<Vec<u8>> {
    let lines = (1..=37).flat_map(|b| {
        let breed = match b % 3 {
            0 => format!("Breed{b}"),
            _ => format!("dog_breed_{b}"),
        };
        [1, 2].map(|n| format!("{breed}_{n} {b} {} {b}\n", 1 + b % 2))
    });
    vec![lines.collect::<String>().into_bytes()]
}

/// Food-101's list of one image of each of its 101 classes, and of two.
fn food_list_seeds() -> Vec<Vec<u8>> {
    [1, 2]
        .map(|n| {
            let classes = (0..101).map(|c| {
                let ids = (0..n).map(|i| format!("\"dish_{c}/{i}\""));
                format!("\"dish_{c}\": [{}]", ids.collect::<Vec<_>>().join(", "))
            });
            format!("{{{}}}", classes.collect::<Vec<_>>().join(", ")).into_bytes()
        })
        .to_vec()
}

/// DTD's list of one image of each of its 47 classes, and of two.
fn dtd_list_seeds() -> Vec<Vec<u8>> {
    [1, 2]
        .map(|n| {
            let lines =
                (0..47).flat_map(|c| (0..n).map(move |i| format!("tex_{c}/tex_{c}_{i:04}.jpg\n")));
            lines.collect::<String>().into_bytes()
        })
        .to_vec()
}

/// Prepared datasets of two classes of the image seeds, resized (to 24)
/// and stored as files or raw.
fn prepared_seeds() -> Vec<Vec<u8>> {
    let dir = common::tempdir();
    let seeds = image_seeds();
    for class in ["a", "b"] {
        let d = dir.path().join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("x.jpg"), &seeds[0]).unwrap();
        std::fs::write(d.join("y.png"), &seeds[1]).unwrap();
    }
    [false, true]
        .into_iter()
        .map(|raw| {
            let file = dir.path().join("p.vggdata");
            let opts = vggctl::data::pack::PrepareOptions {
                max_side: 24,
                quality: 90,
                raw,
                strict: true,
            };
            vggctl::data::pack::prepare(dir.path(), None, &file, opts).unwrap();
            std::fs::read(file).unwrap()
        })
        .collect()
}

const TARGETS: &[Target] = &[
    Target {
        name: "pickle",
        read: read_pickle,
        seeds: pickle_seeds,
        pickles: true,
    },
    Target {
        name: "pickle-in-pth",
        read: read_in_legacy_pth,
        seeds: pickle_seeds,
        pickles: true,
    },
    Target {
        name: "pth",
        read: read_pth,
        seeds: pth_seeds,
        pickles: false,
    },
    Target {
        name: "safetensors",
        read: read_safetensors,
        seeds: safetensors_seeds,
        pickles: false,
    },
    Target {
        name: "cifar-bin",
        read: read_cifar_bin,
        seeds: cifar_bin_seeds,
        pickles: false,
    },
    Target {
        name: "cifar-py",
        read: read_cifar_py,
        seeds: cifar_py_seeds,
        pickles: true,
    },
    Target {
        name: "mnist",
        read: read_mnist,
        seeds: mnist_seeds,
        pickles: false,
    },
    Target {
        name: "emnist-zip",
        read: read_emnist_zip,
        seeds: emnist_zip_seeds,
        pickles: false,
    },
    Target {
        name: "gtsrb-list",
        read: read_gtsrb_list,
        seeds: gtsrb_list_seeds,
        pickles: false,
    },
    Target {
        name: "zip-archive",
        read: read_zip_archive,
        seeds: zip_archive_seeds,
        pickles: false,
    },
    Target {
        name: "cars-annotations",
        read: read_cars,
        seeds: cars_seeds,
        pickles: false,
    },
    Target {
        name: "svhn",
        read: read_svhn,
        seeds: svhn_seeds,
        pickles: false,
    },
    Target {
        name: "usps",
        read: read_usps,
        seeds: usps_seeds,
        pickles: false,
    },
    Target {
        name: "fer2013",
        read: read_fer2013,
        seeds: fer2013_seeds,
        pickles: false,
    },
    Target {
        name: "pet-lists",
        read: read_pet_lists,
        seeds: pet_list_seeds,
        pickles: false,
    },
    Target {
        name: "food-lists",
        read: read_food_lists,
        seeds: food_list_seeds,
        pickles: false,
    },
    Target {
        name: "dtd-lists",
        read: read_dtd_lists,
        seeds: dtd_list_seeds,
        pickles: false,
    },
    Target {
        name: "image",
        read: read_image,
        seeds: image_seeds,
        pickles: false,
    },
    Target {
        name: "prepared",
        read: read_prepared,
        seeds: prepared_seeds,
        pickles: false,
    },
];

/// One pickle opcode sequence from the grammar; `depth` bounds how far a
/// "deep" production nests.
fn grammar_pickle(rng: &mut Rng) -> Vec<u8> {
    let mut p = vec![0x80, 2 + rng.below(4) as u8];
    let ops = 1 + rng.below(24);
    for _ in 0..ops {
        match rng.below(16) {
            0 => {
                // Deep nesting: lists, tuples or dicts inside each other.
                let n = [10, 99, 100, 101, 5_000, 200_000][rng.below(6)];
                let open = [b']', b'(', b'}'][rng.below(3)];
                p.extend(std::iter::repeat_n(open, n));
                let close = [b'a', b't', b'e'][rng.below(3)];
                p.extend(std::iter::repeat_n(close, n / 2));
            }
            1 => p.extend_from_slice(&[b']', b'q', 0, b'h', 0, b'a']), // a list inside itself
            2 => {
                // One value shared 2^k ways.
                p.extend_from_slice(b"K\x01\x85q\x00");
                for i in 1..=(1 + rng.below(63)) as u8 {
                    p.extend_from_slice(&[b'h', i - 1, b'h', i - 1, 0x86, b'q', i]);
                }
            }
            3 => {
                // A length that claims far more than the file holds.
                let op = [b'X', b'B', 0x8e, 0x8d, 0x8b, 0x95][rng.below(6)];
                p.push(op);
                let len = [u64::MAX, 1 << 40, 0xFFFF_FFF0, 1 << 20][rng.below(4)];
                p.extend_from_slice(
                    &len.to_le_bytes()[..if op == 0x8e || op == 0x8d || op == 0x95 {
                        8
                    } else {
                        4
                    }],
                );
            }
            4 => p.extend_from_slice(b"cos\nsystem\n"),
            5 => p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n"),
            6 => p.extend_from_slice(b"ccollections\nOrderedDict\n)R"),
            7 => p.extend_from_slice(&[b'h', rng.below(256) as u8]), // memo get, maybe unset
            8 => p.extend_from_slice(&[b'j', 0xff, 0xff, 0xff, 0x7f]),
            9 => p.extend_from_slice(&[b'(', b'X', 1, 0, 0, 0, b'k', b'K', 7, b'u']),
            10 => p.extend_from_slice(&[b'(', b'X', 3, 0, 0, 0, b'1', b'2', b'3', b'Q']), // persistent id
            11 => p.extend_from_slice(&[b'R', b'b', b's', b'0', b'2', b'1'][rng.below(6)..][..1]),
            12 => {
                let n = rng.below(8);
                for _ in 0..n {
                    p.push(rng.next() as u8);
                }
            }
            13 => p.extend_from_slice(b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f"),
            14 => p.extend_from_slice(b"G\x7f\xf8\x00\x00\x00\x00\x00\x00"),
            _ => p.push(b'.'),
        }
    }
    p.push(b'.');
    p
}

/// What an outcome looks like, numbers and paths removed: new ones grow the corpus.
fn signature(r: &Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("{e:#}")
            .replace(|c: char| c.is_ascii_digit(), "")
            .chars()
            .take(80)
            .collect(),
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn cases_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-cases")
        .join(target)
}

struct Finding {
    what: String,
    kept: PathBuf,
}

/// Runs one input; writes it to `scratch` first (the path readers read it
/// there, and a crash leaves it behind). A panic or a slow input is kept
/// as a regression case.
fn exec(t: &Target, scratch: &Path, input: &[u8]) -> Result<Result<()>, Finding> {
    std::fs::write(scratch, input).unwrap();
    let t0 = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| (t.read)(scratch, input)));
    let took = t0.elapsed();
    let what = match &outcome {
        Err(_) => "panicked".to_string(),
        Ok(_) if took > SLOW => format!("took {took:?}"),
        Ok(_) => return Ok(outcome.unwrap()),
    };
    let dir = cases_dir(t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let hash: u64 = input.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let kept = dir.join(format!("{hash:016x}.bin"));
    std::fs::write(&kept, input).unwrap();
    Err(Finding { what, kept })
}

struct Figures {
    execs: u64,
    corpus: usize,
    outcomes: usize,
    regressions: usize,
}

fn fuzz_target(t: &Target, rng: &mut Rng, budget: Duration, scratch: &Path) -> Figures {
    let mut regressions = 0;
    if let Ok(dir) = std::fs::read_dir(cases_dir(t.name)) {
        for case in dir.flatten() {
            let input = std::fs::read(case.path()).unwrap();
            if let Err(f) = exec(t, scratch, &input) {
                panic!(
                    "{}: regression case {} {}",
                    t.name,
                    f.kept.display(),
                    f.what
                );
            }
            regressions += 1;
        }
    }
    let mut corpus = (t.seeds)();
    let mut seen: HashSet<String> = HashSet::new();
    let mut execs = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < budget {
        let input = if t.pickles && rng.below(3) == 0 {
            grammar_pickle(rng)
        } else {
            let parent = &corpus[rng.below(corpus.len())];
            mutate(rng, parent)
        };
        let outcome = exec(t, scratch, &input).unwrap_or_else(|f| {
            panic!(
                "{}: an input {} (kept as {})",
                t.name,
                f.what,
                f.kept.display()
            )
        });
        execs += 1;
        if seen.insert(signature(&outcome)) && corpus.len() < CORPUS_MAX && !input.is_empty() {
            corpus.push(input);
        }
    }
    Figures {
        execs,
        corpus: corpus.len(),
        outcomes: seen.len(),
        regressions,
    }
}

#[test]
fn readers_survive_fuzzing() {
    let secs: f64 = std::env::var("VGGCTL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0);
    let seed: u64 = std::env::var("VGGCTL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d);
    // VGGCTL_FUZZ_TARGETS=image,prepared: only those (a new decoder's run).
    let only = std::env::var("VGGCTL_FUZZ_TARGETS").unwrap_or_default();
    let targets: Vec<&Target> = TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.split(',').any(|n| n == t.name))
        .collect();
    assert!(!targets.is_empty(), "no fuzz target is named {only:?}");
    let budget = Duration::from_secs_f64(secs / targets.len() as f64);
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz");
    std::fs::create_dir_all(&work).unwrap();
    let start_rss = peak_rss_kib();
    let mut rng = Rng(seed | 1);
    let mut total = 0;
    for t in targets {
        let scratch = work.join(format!("{}.input", t.name));
        let f = fuzz_target(t, &mut rng, budget, &scratch);
        total += f.execs;
        println!(
            "fuzz {:<14} {:>8} executions, corpus {:>3}, {:>3} distinct outcomes, {} regression cases",
            t.name, f.execs, f.corpus, f.outcomes, f.regressions
        );
        let _ = std::fs::remove_file(&scratch);
    }
    let grown = peak_rss_kib().saturating_sub(start_rss);
    println!(
        "fuzz total: {total} executions in {secs} s (seed {seed}), peak memory +{} MiB",
        grown / 1024
    );
    assert!(grown < 1 << 20, "peak memory grew by {grown} KiB");
}

/// The seeds are what the readers take (so mutations start from files
/// that get past the first checks): each MNIST, EMNIST, SVHN, Stanford
/// Cars, pet, food and DTD list seed reads.
#[test]
fn the_dataset_seeds_read() {
    let dir = common::tempdir();
    for (i, seed) in pet_list_seeds().iter().enumerate() {
        let path = dir.path().join(format!("p{i}"));
        read_pet_lists(&path, seed).unwrap();
    }
    for (i, seed) in food_list_seeds().iter().enumerate() {
        let path = dir.path().join(format!("f{i}"));
        read_food_lists(&path, seed).unwrap();
    }
    for (i, seed) in dtd_list_seeds().iter().enumerate() {
        let path = dir.path().join(format!("d{i}"));
        read_dtd_lists(&path, seed).unwrap();
    }
    let cars = read_cars_annotations(&dir.path().join("c"), &cars_seeds()[0]).unwrap();
    let files = [("cars_train/00001.jpg", 2), ("cars_train/Citroën.jpg", 195)];
    assert_eq!(cars, files.map(|(f, c)| (f.to_string(), c)));
    for (i, seed) in svhn_seeds().iter().enumerate() {
        let path = dir.path().join(format!("s{i}.mat"));
        std::fs::write(&path, seed).unwrap();
        let split = vggctl::data::svhn::read_split(&path).unwrap();
        assert_eq!(Vec::<i64>::try_from(&split.labels).unwrap(), [0, 3]);
        // Row 0, column 1 of image 0's red plane: X[0, 1, 0, 0], the 33rd byte.
        assert_eq!(split.images.int64_value(&[0, 0, 0, 1]), 32 * 7);
    }
    let [packed, text] = &usps_seeds()[..] else {
        panic!("two USPS seeds")
    };
    let path = dir.path().join("usps.bz2");
    std::fs::write(&path, packed).unwrap();
    let (gray, labels) = vggctl::data::usps::read_file(&path).unwrap();
    assert_eq!((gray.len(), &labels[..]), (512, &[9, 0][..]));
    let text = vggctl::data::usps::parse(std::str::from_utf8(text).unwrap()).unwrap();
    assert_eq!(text, (gray, labels));
    for seed in fer2013_seeds() {
        let (train, test) = vggctl::data::fer2013::parse(&seed[..]).unwrap();
        assert_eq!((&train.labels[..], &test.labels[..]), (&[3][..], &[6][..]));
        assert_eq!((train.gray[1], test.gray[1]), (7, 11));
    }
    for (i, seed) in emnist_zip_seeds().iter().enumerate() {
        let path = dir.path().join(format!("e{i}"));
        read_emnist_zip(&path, seed).unwrap();
    }
    for (i, seed) in mnist_seeds().iter().enumerate() {
        let path = dir.path().join(format!("m{i}"));
        std::fs::write(&path, seed).unwrap();
        let gz = path.with_extension("gz");
        let name = if i < 2 { &gz } else { &path };
        std::fs::rename(&path, name).unwrap();
        let images = vggctl::data::mnist::read_images(&path).map(|t| t.size()[0]);
        let labels = vggctl::data::mnist::MNIST
            .read_labels(&path)
            .map(|l| l.len());
        assert!(images.is_ok() || labels.is_ok(), "seed {i}");
    }
}

/// Cells nested past the reader's depth, and a million cells claimed in a
/// few bytes, are errors before anything is allocated for them.
#[test]
fn mat_nesting_and_element_counts_are_bounded() {
    let read = |bytes: Vec<u8>| {
        let err = vggctl::formats::mat::read_mat_values(&mut bytes.as_slice(), &["c"], 1 << 30);
        format!("{:#}", err.unwrap_err())
    };
    let mut inner = mat_matrix(6, &[0, 0], "", &mat_element(9, &[]));
    for _ in 0..9 {
        inner = mat_matrix(1, &[1, 1], "", &inner);
    }
    let nested = read(mat_file(&[mat_matrix(1, &[1, 1], "c", &inner)]));
    assert!(
        nested.contains("cells or structs nested more than 8 deep"),
        "{nested}"
    );
    let many = read(mat_file(&[mat_matrix(1, &[1000, 1000], "c", &[])]));
    assert!(
        many.contains("'c' has dimensions [1000, 1000], more than its"),
        "{many}"
    );
}
