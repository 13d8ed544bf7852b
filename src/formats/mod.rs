//! Every file format vggctl reads or writes for weights and data, side by
//! side: the safe pickle machine and its numpy part (CIFAR-10's Python
//! batches, `torch.save`'s object graph), the `.pth` reader for both
//! `torch.save` layouts, safetensors (vggctl's checkpoints), MATLAB's MAT-files (SVHN), IDX files (MNIST's family), and TensorBoard's event files.
//! Nothing here knows about models or training: readers return named
//! tensors, writers take them.

pub mod idx;
pub mod mat;
pub mod numpy;
pub mod pickle;
pub mod pth;
pub mod rows;
pub mod safetensors;
pub mod tfevents;

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// What a file's first bytes say it is: for choosing a reader by content
/// rather than by name, and for saying what a file is when it is not what
/// an option takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Safetensors,
    TorchZip,
    TorchLegacy,
    Pickle,
    Png,
    Jpeg,
    Json,
    Empty,
    Unknown,
}

impl Sniffed {
    pub fn of(bytes: &[u8]) -> Sniffed {
        Sniffed::of_start(bytes, bytes.len() as u64)
    }

    /// The file at `path`, from its first bytes and its length; `Unknown`
    /// when it cannot be read (its reader then says why).
    pub fn of_file(path: &Path) -> Sniffed {
        // Only regular files are opened: opening a named pipe would wait
        // for a writer.
        if !path.is_file() {
            return Sniffed::Unknown;
        }
        let mut start = Vec::with_capacity(16);
        let read = File::open(path).and_then(|f| {
            let len = f.metadata()?.len();
            f.take(16).read_to_end(&mut start)?;
            Ok(len)
        });
        match read {
            Ok(len) => Sniffed::of_start(&start, len),
            Err(_) => Sniffed::Unknown,
        }
    }

    /// A file of `len` bytes that begins with `start`.
    pub fn of_start(start: &[u8], len: u64) -> Sniffed {
        let bytes = start;
        let header_len = bytes
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if header_len.is_some_and(|n| n <= len - 8) && bytes.get(8) == Some(&b'{') {
            Sniffed::Safetensors
        } else if bytes.starts_with(b"PK\x03\x04") {
            Sniffed::TorchZip
        } else if bytes.starts_with(pth::LEGACY_MAGIC) {
            Sniffed::TorchLegacy
        } else if bytes.starts_with(b"\x80") {
            Sniffed::Pickle
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Sniffed::Png
        } else if bytes.starts_with(b"\xff\xd8\xff") {
            Sniffed::Jpeg
        } else if bytes.trim_ascii_start().starts_with(b"{") {
            Sniffed::Json
        } else if bytes.is_empty() {
            Sniffed::Empty
        } else {
            Sniffed::Unknown
        }
    }

    /// The file as a message names it ("it is a PNG image").
    pub fn describe(self) -> &'static str {
        match self {
            Sniffed::Safetensors => "a safetensors file",
            Sniffed::TorchZip => "a zip archive, as torch.save writes (.pth)",
            Sniffed::TorchLegacy => "a torch.save file in the legacy format (.pth)",
            Sniffed::Pickle => "a pickle",
            Sniffed::Png => "a PNG image",
            Sniffed::Jpeg => "a JPEG image",
            Sniffed::Json => "JSON text",
            Sniffed::Empty => "empty",
            Sniffed::Unknown => "of unknown format",
        }
    }

    /// Whether the file is one of torch.save's two layouts.
    pub fn is_torch_save(self) -> bool {
        matches!(self, Sniffed::TorchZip | Sniffed::TorchLegacy)
    }
}

#[cfg(test)]
mod tests {
    use super::Sniffed;

    #[test]
    fn files_are_told_apart_by_their_first_bytes() {
        let st = b"\x02\x00\x00\x00\x00\x00\x00\x00{}";
        assert_eq!(Sniffed::of(st), Sniffed::Safetensors);
        // A header longer than the file is not safetensors.
        assert_eq!(
            Sniffed::of(b"\xff\x00\x00\x00\x00\x00\x00\x00{}"),
            Sniffed::Unknown
        );
        assert_eq!(Sniffed::of(b"PK\x03\x04rest"), Sniffed::TorchZip);
        assert_eq!(Sniffed::of(super::pth::LEGACY_MAGIC), Sniffed::TorchLegacy);
        assert_eq!(Sniffed::of(b"\x80\x04K\x01."), Sniffed::Pickle);
        assert_eq!(Sniffed::of(b"\x89PNG\r\n\x1a\n...."), Sniffed::Png);
        assert_eq!(Sniffed::of(b"\xff\xd8\xff\xe0"), Sniffed::Jpeg);
        assert_eq!(Sniffed::of(b"  {\"arch\": 1}"), Sniffed::Json);
        assert_eq!(Sniffed::of(b""), Sniffed::Empty);
        assert_eq!(Sniffed::of(b"\x01\x02"), Sniffed::Unknown);
    }
}
