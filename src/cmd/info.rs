//! `vggctl info` and `vggctl --version`.

use anyhow::Result;
use serde::Serialize;
use tch::Cuda;
use vggctl::device::{LIBTORCH_VERSION, gpu_names};
use vggctl::shim;

use super::output::{print_json, print_out};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Info {
    vggctl: &'static str,
    libtorch: &'static str,
    cuda_available: bool,
    cuda_devices: i64,
    cudnn_available: bool,
    gpus: Vec<String>,
    /// Per CUDA device: native bf16 (compute capability >= 8.0).
    bf16: Vec<bool>,
    /// Whether the shim was built with its CUDA half (CUDA graphs, memory statistics).
    cuda_graphs: bool,
    threads: i32,
    /// Whether the CPU computes bf16 natively (`--precision bf16` on the CPU).
    cpu_bf16: bool,
}

fn gather() -> Info {
    Info {
        vggctl: env!("CARGO_PKG_VERSION"),
        libtorch: LIBTORCH_VERSION,
        cuda_available: Cuda::is_available(),
        cuda_devices: Cuda::device_count(),
        cudnn_available: Cuda::cudnn_is_available(),
        gpus: gpu_names(),
        bf16: (0..Cuda::device_count().max(0) as usize)
            .map(|i| shim::bf16_supported(tch::Device::Cuda(i)).unwrap_or(false))
            .collect(),
        cuda_graphs: shim::has_cuda(),
        threads: tch::get_num_threads(),
        cpu_bf16: vggctl::numerics::cpu_has_native_bf16(),
    }
}

pub fn print_version(json: bool) -> Result<()> {
    let i = gather();
    if json {
        return print_json(&i);
    }
    let mut s = format!("vggctl {}\nlibtorch {}\n", i.vggctl, i.libtorch);
    if i.cuda_available {
        s += &format!("CUDA: available, {} device(s)\n", i.cuda_devices);
        for (n, name) in i.gpus.iter().enumerate() {
            let bf16 = if i.bf16.get(n) == Some(&true) {
                "bf16"
            } else {
                "no bf16"
            };
            s += &format!("  cuda:{n}  {name} ({bf16})\n");
        }
        s += &format!(
            "CUDA graphs: {}\n",
            if i.cuda_graphs {
                "available"
            } else {
                "not in this build (no CUDA runtime headers at build time)"
            }
        );
        s += &format!(
            "cuDNN: {}\n",
            if i.cudnn_available {
                "available"
            } else {
                "not available"
            }
        );
    } else {
        s += "CUDA: not available (running on CPU)\n";
    }
    s += &format!(
        "CPU threads: {} ({})\n",
        i.threads,
        if i.cpu_bf16 {
            "native bf16"
        } else {
            "no native bf16"
        }
    );
    print_out(&s)
}

pub fn run(args: Args) -> Result<()> {
    print_version(args.json)
}
