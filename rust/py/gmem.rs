//! Bindings for the guest_memfd in-place conversion series
//! (`crate::kvm::gmem_attributes`): module functions taking the VM's
//! `Kvm` object, so the class itself stays as it is. Types and errors are
//! adapted here; no rule lives here.

use pyo3::exceptions::PyOSError;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::u64_arg;
use super::kvm::{emit_warnings, to_pyerr, PyKvm};
use crate::kvm::gmem_attributes::KvmMemoryAttributes2;
use crate::kvm::PAGE_SHIFT;

/// KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd `fd`, under the VM's locks.
/// Returns False if this thread holds one of them. Raises OSError with the
/// kernel's errno; one found after the checks carries `error_offset`.
#[pyfunction]
#[pyo3(signature = (kvm, fd, offset, size, attributes, flags, reserved))]
#[allow(clippy::too_many_arguments)]
fn gmem_set_memory_attributes2(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
    size: &Bound<'_, PyAny>,
    attributes: &Bound<'_, PyAny>,
    flags: &Bound<'_, PyAny>,
    reserved: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    let fd = u64_arg(fd, "fd")?;
    let mut a = KvmMemoryAttributes2 {
        offset: u64_arg(offset, "offset")?,
        size: u64_arg(size, "size")?,
        attributes: u64_arg(attributes, "attributes")?,
        flags: u64_arg(flags, "flags")?,
        reserved: [0; 11],
    };
    let words: Vec<Bound<'_, PyAny>> = reserved.try_iter()?.collect::<PyResult<_>>()?;
    if words.len() != a.reserved.len() {
        return Err(PyValueError::new_err(format!(
            "reserved must hold {} words, got {}",
            a.reserved.len(),
            words.len()
        )));
    }
    for (dst, w) in a.reserved.iter_mut().zip(&words) {
        *dst = u64_arg(w, "reserved")?;
    }
    let detach = a.size >= 1 << 30;
    let Some((r, warnings)) =
        kvm.locked_op(py, detach, move |k| k.kvm_gmem_set_attributes(fd, &a))?
    else {
        return Ok(false);
    };
    emit_warnings(py, &warnings)?;
    match r {
        Ok(()) => Ok(true),
        Err(e) => {
            let err = to_pyerr(py, e.error);
            if let Some(off) = e.error_offset {
                if err.is_instance_of::<PyOSError>(py) {
                    err.value(py).setattr("error_offset", off)?;
                }
            }
            Err(err)
        }
    }
}

/// Elevates the refcount of `npages` file pages from `offset` (GUP).
#[pyfunction]
fn gmem_pin(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
    npages: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (fd, offset) = (u64_arg(fd, "fd")?, u64_arg(offset, "offset")?);
    let npages = u64_arg(npages, "npages")?;
    kvm.step(py, |k| k.guest_memfd_pin(fd, offset, npages))
}

/// Drops one such reference per page.
#[pyfunction]
fn gmem_unpin(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
    npages: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (fd, offset) = (u64_arg(fd, "fd")?, u64_arg(offset, "offset")?);
    let npages = u64_arg(npages, "npages")?;
    kvm.step(py, |k| k.guest_memfd_unpin(fd, offset, npages))
}

/// The file's attributes as [(start_page, end_page, attributes)].
#[pyfunction]
fn gmem_attribute_runs(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
) -> PyResult<Vec<(u64, u64, u64)>> {
    let fd = u64_arg(fd, "fd")?;
    kvm.step(py, |k| k.gmem_attribute_runs(fd))
}

/// The attribute of the file page holding byte `offset`.
#[pyfunction]
fn gmem_get_attributes(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
) -> PyResult<u64> {
    let (fd, offset) = (u64_arg(fd, "fd")?, u64_arg(offset, "offset")?);
    kvm.step(py, |k| k.kvm_gmem_get_attributes(fd, offset >> PAGE_SHIFT))
}

/// The file's allocated pages as [(start_page, end_page)].
#[pyfunction]
fn gmem_allocated_runs(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
) -> PyResult<Vec<(u64, u64)>> {
    let fd = u64_arg(fd, "fd")?;
    kvm.step(py, |k| k.gmem_allocated_runs(fd))
}

/// (bytes, entries) of the file's attribute store.
#[pyfunction]
fn gmem_store_usage(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
) -> PyResult<(usize, usize)> {
    let fd = u64_arg(fd, "fd")?;
    kvm.step(py, |k| k.gmem_store_usage(fd))
}

/// Pinned pages [(page, references)].
#[pyfunction]
fn gmem_pinned_pages(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
) -> PyResult<Vec<(u64, u64)>> {
    let fd = u64_arg(fd, "fd")?;
    kvm.step(py, |k| k.gmem_pinned_pages(fd))
}

/// KVM_SEV_SNP_LAUNCH_FINISH / KVM_TDX_FINALIZE_VM (pre_fault_allowed).
#[pyfunction]
fn gmem_finalize_vm(py: Python<'_>, kvm: PyRef<'_, PyKvm>) {
    kvm.core(py).kvm_finalize_vm();
}

/// The series' counters.
#[pyfunction]
fn gmem_counters<'py>(py: Python<'py>, kvm: PyRef<'_, PyKvm>) -> PyResult<Bound<'py, PyDict>> {
    let c = kvm.core(py).inplace.counters;
    let d = PyDict::new(py);
    for (name, v) in [
        ("set_calls", c.set_calls),
        ("conversions", c.conversions),
        ("noop_conversions", c.noop_conversions),
        ("pages_converted", c.pages_converted),
        ("failed_calls", c.failed_calls),
        ("eagain", c.eagain),
        ("enomem", c.enomem),
        ("eopnotsupp", c.eopnotsupp),
        ("invalidations", c.invalidations),
        ("filter_shared", c.filter_shared),
        ("filter_private", c.filter_private),
        ("user_unmapped_pages", c.user_unmapped_pages),
        ("sigbus", c.sigbus),
        ("zeroed_pages", c.zeroed_pages),
        ("scrambled_pages", c.scrambled_pages),
    ] {
        d.set_item(name, v)?;
    }
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gmem_set_memory_attributes2, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_pin, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_unpin, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_attribute_runs, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_get_attributes, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_allocated_runs, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_store_usage, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_pinned_pages, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_finalize_vm, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_counters, m)?)?;
    Ok(())
}
