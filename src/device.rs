//! Choosing a device, and what libtorch reports about CUDA.

use anyhow::{Result, bail};
use tch::{Cuda, Device};

/// The libtorch version the binary was built against (from the torch
/// package's `version.py`, read by build.rs).
pub const LIBTORCH_VERSION: &str = env!("VGGCTL_LIBTORCH_VERSION");

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks CUDA when present.
pub fn parse_device(s: &str) -> Result<Device> {
    let count = Cuda::device_count();
    let cuda = |i: usize| -> Result<Device> {
        if (i as i64) < count {
            Ok(Device::Cuda(i))
        } else if count == 0 {
            bail!("--device {s}: CUDA is not available (libtorch {LIBTORCH_VERSION} sees no GPU)")
        } else {
            bail!("--device {s}: there are only {count} CUDA devices")
        }
    };
    match s {
        "auto" => Ok(if count > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => bail!("{}", unknown_device(s)),
        },
    }
}

/// The error of an unknown `--device`: with the spelling meant where case
/// or another name for the GPU (`CUDA:1`, `gpu`) is the slip, and what
/// runs where it names a backend this libtorch lacks (`mps`, `xpu`).
fn unknown_device(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let (kind, index) = lower.split_once(':').unwrap_or((&lower, ""));
    let numbered = index.is_empty() || index.parse::<usize>().is_ok();
    let hint = match kind {
        "cuda" | "gpu" | "nvidia" if numbered => {
            let meant = match index {
                "" => "cuda".to_string(),
                i => format!("cuda:{i}"),
            };
            format!(": did you mean {meant}?")
        }
        "cpu" | "auto" if index.is_empty() => format!(": did you mean {kind}?"),
        "mps" | "xpu" | "hip" | "rocm" | "xla" | "hpu" | "mtia" | "vulkan" | "meta" => {
            format!(
                ": vggctl's libtorch ({LIBTORCH_VERSION}) runs on CPUs and NVIDIA GPUs (CUDA) only"
            )
        }
        _ => String::new(),
    };
    format!("unknown device '{s}'{hint} (expected auto, cpu, cuda or cuda:N)")
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// GPU model names as the NVIDIA driver lists them (tch binds no
/// cudaGetDeviceProperties). Empty when there is no driver.
pub fn gpu_names() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut entries: Vec<_> = dir.flatten().map(|e| e.path()).collect();
    entries.sort();
    entries
        .iter()
        .filter_map(|p| std::fs::read_to_string(p.join("information")).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
        })
        .collect()
}

/// Waits for the device's queued work (a no-op on the CPU): timing device
/// work needs it, since launches return before the work is done.
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_device_names_the_one_meant() {
        let hint = |s: &str| {
            let e = unknown_device(s);
            let rest = e
                .strip_prefix(&format!("unknown device '{s}'"))
                .expect("named");
            rest.split(" (expected").next().expect("hint").to_string()
        };
        assert_eq!(hint("gpu"), ": did you mean cuda?");
        assert_eq!(hint("GPU:1"), ": did you mean cuda:1?");
        assert_eq!(hint("CUDA:0"), ": did you mean cuda:0?");
        assert_eq!(hint("CPU"), ": did you mean cpu?");
        assert!(hint("mps").contains("runs on CPUs and NVIDIA GPUs (CUDA) only"));
        for nothing in ["cuda:x", "gpu:-1", "tpu", "cpu:0", ""] {
            assert_eq!(hint(nothing), "", "{nothing}");
        }
    }
}
