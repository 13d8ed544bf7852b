//! Links the binary (and test binaries) against libtorch so that it runs
//! without LD_LIBRARY_PATH and sees CUDA on a GPU machine, and records
//! libtorch's version for `vggctl --version`.
use std::env;
use std::fs;
use std::path::Path;

fn main() {
    // torch-sys (links = "tch") exports the libtorch lib dir it linked against.
    let lib = env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    println!(
        "cargo:rustc-env=VGGCTL_LIBTORCH_VERSION={}",
        libtorch_version(&lib)
    );
    if lib.is_empty() {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // Nothing in the binary references libtorch_cuda.so directly, so the
    // linker would drop it and CUDA would never be registered (tch-rs #904).
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,--as-needed");
    }
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
