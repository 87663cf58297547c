//! Bindings for the guest_memfd in-place conversion series
//! (`crate::kvm::gmem_attributes`): module functions taking the VM's
//! `Kvm` object, so the class itself stays as it is. Types and errors are
//! adapted here; no rule lives here.

use pyo3::exceptions::PyOSError;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

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

/// `fd`, `offset`, `npages` of a pin or unpin, through the one integer rule.
fn pages_args(
    fd: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
    npages: &Bound<'_, PyAny>,
) -> PyResult<(u64, u64, u64)> {
    Ok((
        u64_arg(fd, "fd")?,
        u64_arg(offset, "offset")?,
        u64_arg(npages, "npages")?,
    ))
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
    let (fd, offset, npages) = pages_args(fd, offset, npages)?;
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
    let (fd, offset, npages) = pages_args(fd, offset, npages)?;
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

/// mmap(2) of guest_memfd `fd` (MAP_SHARED if `shared`): the checks of
/// kvm_gmem_mmap, then the mapping takes a reference on the file. The
/// mapping's id.
#[pyfunction]
fn gmem_mmap(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    fd: &Bound<'_, PyAny>,
    shared: bool,
) -> PyResult<u64> {
    let fd = u64_arg(fd, "fd")?;
    kvm.step(py, |k| k.mmap_new_file_vma(fd, shared))
}

/// A host read through mapping `vma` (GuestMemfdSigbus where the kernel
/// sends SIGBUS; ValueError once it is unmapped).
#[pyfunction]
fn gmem_vma_read<'py>(
    py: Python<'py>,
    kvm: PyRef<'_, PyKvm>,
    vma: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
    length: &Bound<'_, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let vma = u64_arg(vma, "vma")?;
    let offset = u64_arg(offset, "offset")?;
    let length = u64_arg(length, "length")?;
    let data = kvm.step(py, |k| k.kvm_gmem_vma_read(vma, offset, length))?;
    Ok(PyBytes::new(py, &data))
}

/// A host write through mapping `vma`.
#[pyfunction]
fn gmem_vma_write(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    vma: &Bound<'_, PyAny>,
    offset: &Bound<'_, PyAny>,
    data: &[u8],
) -> PyResult<()> {
    let vma = u64_arg(vma, "vma")?;
    let offset = u64_arg(offset, "offset")?;
    let data = data.to_vec();
    kvm.step(py, move |k| k.kvm_gmem_vma_write(vma, offset, &data))
}

/// munmap(2) of mapping `vma` as a whole operation (the file's release if
/// that was its last reference); False if this thread holds a lock.
#[pyfunction]
fn gmem_munmap(py: Python<'_>, kvm: PyRef<'_, PyKvm>, vma: &Bound<'_, PyAny>) -> PyResult<bool> {
    let vma = u64_arg(vma, "vma")?;
    kvm.whole(py, false, move |k| k.kvm_gmem_munmap(vma))
}

/// munmap(2) up to the release's invalidation, for the Python driver
/// (slots_lock held): the whole file's gfn ranges if the file was released,
/// else None.
#[pyfunction]
fn gmem_munmap_detach(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    vma: &Bound<'_, PyAny>,
) -> PyResult<Option<Vec<(usize, u64, u64)>>> {
    let vma = u64_arg(vma, "vma")?;
    kvm.step(py, |k| k.remove_vma_detach(vma))
}

/// The file (its creation fd) live mapping `vma` maps; ValueError if none.
#[pyfunction]
fn gmem_file_of_vma(
    py: Python<'_>,
    kvm: PyRef<'_, PyKvm>,
    vma: &Bound<'_, PyAny>,
) -> PyResult<u64> {
    let vma = u64_arg(vma, "vma")?;
    kvm.step(py, |k| k.gmem_file_of_vma(vma))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gmem_mmap, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_vma_read, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_vma_write, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_munmap, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_munmap_detach, m)?)?;
    m.add_function(wrap_pyfunction!(gmem_file_of_vma, m)?)?;
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
