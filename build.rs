//! Links the binary (and test binaries) against libtorch so that it runs
//! without LD_LIBRARY_PATH and sees CUDA on a GPU machine, records
//! libtorch's version for `vggctl --version`, and compiles the C++ shim
//! (src/shim.cpp) for what tch does not bind.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    // torch-sys (links = "tch") exports the libtorch lib dir it linked against.
    let lib = env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    println!(
        "cargo:rustc-env=VGGCTL_LIBTORCH_VERSION={}",
        libtorch_version(&lib)
    );
    if lib.is_empty() {
        panic!("torch-sys did not say where libtorch is (DEP_TCH_LIBTORCH_LIB)");
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Nothing in the binary references libtorch_cuda.so directly, so the
    // linker would drop it and CUDA would never be registered (tch-rs #904).
    let cuda = Path::new(&lib).join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,--as-needed");
    }
    build_shim(Path::new(&lib), cuda);
}

/// The shim's CUDA half needs the CUDA runtime headers, which a libtorch
/// install does not carry: the torch wheel's `nvidia-cuda-runtime` package
/// has them next to torch, a CUDA toolkit under $CUDA_HOME.
fn cuda_headers(torch_root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|d| PathBuf::from(d).join("include"))
        .collect();
    let site = torch_root.join("..");
    for pkg in ["nvidia/cu13/include", "nvidia/cuda_runtime/include"] {
        candidates.push(site.join(pkg));
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime_api.h").exists())
}

/// NCCL's header (the torch wheel's `nvidia-nccl` package, the version
/// libtorch was built with: ProcessGroupNCCL's options embed its config
/// struct) when the CUDA headers can compile ProcessGroupNCCL.hpp: that
/// also needs CCCL's `<nv/target>` (the `nvidia-cuda-cccl` wheel, which
/// scripts/setup installs).
fn nccl_headers(torch_root: &Path, cuda_headers: &Path) -> Option<PathBuf> {
    let dir = torch_root.join("../nvidia/nccl/include");
    (dir.join("nccl.h").exists() && cuda_headers.join("nv/target").exists()).then_some(dir)
}

/// cuDNN's headers (the torch wheel's `nvidia-cudnn` package, the cuDNN
/// libtorch loads), for the fused step's BatchNorm+ReLU.
fn cudnn_headers(torch_root: &Path) -> Option<PathBuf> {
    let dir = torch_root.join("../nvidia/cudnn/include");
    dir.join("cudnn.h").exists().then_some(dir)
}

fn build_shim(lib: &Path, cuda: bool) {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-changed=src/shim_dist.cpp");
    println!("cargo:rerun-if-changed=src/shim_step.cpp");
    println!("cargo:rerun-if-changed=src/shim_kernels.cpp");
    println!("cargo:rerun-if-changed=src/shim_signals.cpp");
    println!("cargo:rerun-if-changed=src/shim_kernels.h");
    println!("cargo:rerun-if-changed=src/kernels.cu");
    println!("cargo:rerun-if-changed=src/shim.h");
    println!("cargo:rerun-if-changed=src/gloo-stubs");
    for v in [
        "CUDA_HOME",
        "CUDA_PATH",
        "LIBTORCH_INCLUDE",
        "LIBTORCH_CXX11_ABI",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let root = lib.join("..");
    let include = env::var_os("LIBTORCH_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.clone());
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("src/shim.cpp")
        .file("src/shim_dist.cpp")
        .file("src/shim_step.cpp")
        .file("src/shim_kernels.cpp")
        .file("src/shim_signals.cpp")
        .include(kernels_source())
        .include(include.join("include"))
        // c10d's Gloo backend is declared only under USE_C10D_GLOO; its
        // header's gloo includes are met by stand-ins (see src/gloo-stubs).
        .define("USE_C10D_GLOO", None)
        .include("src/gloo-stubs")
        // ProcessGroupGloo.hpp reaches torch/types.h through c10d's logger.
        .include(include.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false);
    let headers = if cuda { cuda_headers(&root) } else { None };
    println!("cargo::rustc-check-cfg=cfg(vggctl_nccl)");
    match &headers {
        Some(dir) => {
            build.include(dir).define("VGGCTL_CUDA", None);
            match cudnn_headers(&root) {
                Some(cudnn) => _ = build.include(cudnn).define("VGGCTL_CUDNN", None),
                None => println!(
                    "cargo:warning=cuDNN headers not found: building without the fused step's BatchNorm+ReLU"
                ),
            }
            if let Some(nccl) = nccl_headers(&root, dir) {
                // c10d's NCCL backend is declared only under USE_C10D_NCCL.
                build
                    .include(nccl)
                    .define("USE_C10D_NCCL", None)
                    .define("VGGCTL_NCCL", None);
                println!("cargo:rustc-cfg=vggctl_nccl");
            } else {
                println!(
                    "cargo:warning=NCCL or CCCL headers not found (scripts/setup installs nvidia-cuda-cccl): \
                     building data-parallel training with Gloo only"
                );
            }
        }
        None if cuda => println!(
            "cargo:warning=CUDA runtime headers not found (set CUDA_HOME): \
             building without bf16 autocast checks, GPU memory statistics and CUDA graphs"
        ),
        None => {}
    }
    build.compile("vggctl_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    if headers.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// A directory holding `kernels_source.inc`: src/kernels.cu as one C++ raw
/// string literal, the source the shim hands NVRTC at run time.
fn kernels_source() -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = fs::read_to_string("src/kernels.cu").expect("src/kernels.cu");
    let literal = format!("R\"vggctl_kernels({source})vggctl_kernels\"\n");
    fs::write(out.join("kernels_source.inc"), literal).expect("writing kernels_source.inc");
    out
}

/// `version.py` of a torch Python package, or `build-version` of a libtorch archive.
fn libtorch_version(lib: &str) -> String {
    let root = Path::new(lib).join("..");
    if let Ok(text) = fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("__version__ = ") {
                return v.trim().trim_matches(['\'', '"']).to_string();
            }
        }
    }
    fs::read_to_string(root.join("build-version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
