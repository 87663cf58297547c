//! Bindings for the hugepage tracking (filled in by the hugepage work).

use pyo3::prelude::*;

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
