//! TensorBoard event files (`events.out.tfevents.*`), scalars only: what
//! `torch.utils.tensorboard.SummaryWriter.add_scalar` writes and
//! `tensorboard --logdir` reads. A file is a sequence of TFRecords (a
//! little-endian u64 length, its masked CRC-32C, the bytes, their masked
//! CRC-32C), each an `Event` protobuf (`tensorboard/compat/proto/event.proto`,
//! Apache-2.0; field numbers are TensorBoard's); the first says the version.

#![allow(clippy::derive_partial_eq_without_eq)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit over
/// a 256-entry table.
fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC (so that a CRC of CRCs does not look valid).
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An event file of this process in a directory, appended to scalar by
/// scalar (each write complete on disk before it returns; TensorBoard
/// reads a growing file).
pub struct EventWriter {
    path: PathBuf,
}

impl EventWriter {
    /// Starts `events.out.tfevents.<seconds>.<host>.<pid>.vggctl` in `dir`
    /// with its version record. A resumed run starts a file of its own;
    /// TensorBoard reads every file of the directory as one run.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let wall_time = now();
        let name = format!(
            "events.out.tfevents.{}.{host}.{}.vggctl",
            wall_time as u64,
            std::process::id()
        );
        let writer = EventWriter {
            path: dir.join(name),
        };
        let first = Event {
            wall_time,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        };
        File::create(&writer.path)
            .and_then(|mut f| f.write_all(&record(&first.encode_to_vec())))
            .with_context(|| format!("writing {}", writer.path.display()))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event at `step` holding every `(tag, value)`.
    pub fn scalars(&self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let event = Event {
            wall_time: now(),
            step,
            file_version: None,
            summary: Some(Summary {
                value: values
                    .iter()
                    .map(|(tag, v)| SummaryValue {
                        tag: tag.to_string(),
                        simple_value: Some(*v as f32),
                    })
                    .collect(),
            }),
        };
        OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(&record(&event.encode_to_vec())))
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value (RFC 3720's "123456789" → 0xE3069283) and
    /// the all-zero 32-byte vector of RFC 3720 B.4 (0x8A9136AA).
    #[test]
    fn crc32c_matches_the_published_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }
}
