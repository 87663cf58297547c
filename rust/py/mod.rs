//! The PyO3 binding layer: adapts types and errors, nothing else. Every
//! submodule registers its classes and functions here.

use pyo3::prelude::*;

mod args;
mod gmem;
mod hugepage;
mod kvm;
mod stores;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    stores::register(m)?;
    hugepage::register(m)?;
    kvm::register(m)?;
    gmem::register(m)?;
    Ok(())
}
