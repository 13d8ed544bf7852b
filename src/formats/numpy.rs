//! numpy arrays inside pickles (CIFAR-10's Python batches): the globals
//! such a pickle names and the array rebuilt from its inert call, without
//! numpy.

use std::rc::Rc;

use anyhow::{Result, anyhow, bail};

use super::pickle::Value;

/// A numpy array rebuilt from its pickle (`numpy.core.multiarray._reconstruct`
/// + `__setstate__`), without numpy.
pub struct NdArray {
    /// numpy's type string, e.g. `|u1`, `<i8`, `<f4`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Rc<[u8]>,
}

/// The globals a numpy array pickle uses.
pub const NUMPY_GLOBALS: &[(&str, &str)] = &[
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
];

pub fn ndarray(v: &Value) -> Result<NdArray> {
    let call = v
        .call()
        .ok_or_else(|| anyhow!("expected a numpy array, found {}", v.type_name()))?;
    if call.name != "_reconstruct" {
        bail!(
            "expected a numpy array, found {}.{}",
            call.module,
            call.name
        );
    }
    let state = call
        .state
        .as_ref()
        .and_then(|s| s.items())
        .ok_or_else(|| anyhow!("numpy array without state"))?;
    // (version, shape, dtype, is_fortran, data)
    let [_, shape, dtype, fortran, data] = state.as_slice() else {
        bail!("numpy array state has {} fields, expected 5", state.len());
    };
    if fortran.as_int() == Some(1) {
        bail!("Fortran-ordered numpy arrays are not supported");
    }
    let shape: Vec<usize> = shape
        .items()
        .ok_or_else(|| anyhow!("numpy array shape is not a tuple"))?
        .iter()
        .map(|d| d.as_int().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow!("numpy array shape is not a tuple of sizes"))?;
    let dcall = dtype
        .call()
        .ok_or_else(|| anyhow!("numpy array without a dtype"))?;
    let code = dcall
        .args
        .first()
        .and_then(|a| a.as_text())
        .unwrap_or_default();
    let order = dcall
        .state
        .as_ref()
        .and_then(|s| s.items())
        .and_then(|s| s.get(1).and_then(|o| o.as_text()))
        .unwrap_or_else(|| "|".into());
    let data = data
        .as_bytes()
        .ok_or_else(|| anyhow!("numpy array data is not bytes"))?;
    Ok(NdArray {
        dtype: format!("{order}{code}"),
        shape,
        data,
    })
}
