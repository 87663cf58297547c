//! Python classes `RangeTree` and `XArray`: thin adapters over the Rust
//! stores. Argument checking and error mapping live here, the store logic
//! does not.
//!
//! Each class is frozen and keeps its store behind a `RwLock`, so sharing an
//! object between Python threads never raises a borrow error: readers run
//! together, a writer waits. Work that scales with its input runs with the
//! GIL released; the lock is only ever taken inside such a section or while
//! holding the GIL with no Python work under it, so the two cannot deadlock.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyIterator, PyList};

use super::args::u64_arg;
use crate::mapletree;
use crate::rangetree;
use crate::store::{AttrStore, StoreError};
use crate::xarray;

/// Ranges at least this long are set or scanned with the GIL released on the
/// per-page store; below it the GIL round trip costs more than it frees.
const DETACH_PAGES: u64 = 4096;

/// Ranges at least this long run interruptibly (Ctrl-C stops and undoes
/// them), on a worker thread; the thread costs less than 1% of such a call.
const INTERRUPTIBLE_PAGES: u64 = 1 << 20;

fn opt_u64_arg(obj: Option<&Bound<'_, PyAny>>, name: &str, default: u64) -> PyResult<u64> {
    match obj {
        Some(o) if !o.is_none() => u64_arg(o, name),
        _ => Ok(default),
    }
}

/// `start` and `end` as a half-open range with `start < end`.
/// The optional `limit` (bytes) of `reserve`; None means unlimited.
fn limit_arg(limit: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    match limit {
        Some(l) if !l.is_none() => {
            let l = u64_arg(l, "limit")?;
            Ok(Some(usize::try_from(l).unwrap_or(usize::MAX)))
        }
        _ => Ok(None),
    }
}

fn range_args(start: &Bound<'_, PyAny>, end: &Bound<'_, PyAny>) -> PyResult<(u64, u64)> {
    let s = u64_arg(start, "start")?;
    let e = u64_arg(end, "end")?;
    if s >= e {
        return Err(PyValueError::new_err(format!(
            "start ({s}) must be < end ({e})"
        )));
    }
    Ok((s, e))
}

fn store_err(e: StoreError) -> PyErr {
    match e {
        StoreError::InvalidRange { start, end } => {
            PyValueError::new_err(format!("start ({start}) must be < end ({end})"))
        }
        StoreError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
        // Only under `detach_interruptible`, which returns the signal's own
        // exception instead; kept for completeness.
        StoreError::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted"),
    }
}

/// A 1-D numpy uint64 array argument, copied out (so no other thread can
/// change it under us while the GIL is released).
fn u64_array_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<u64>> {
    let py = obj.py();
    // A masked array is an ndarray whose mask says which values are not
    // there; reading its data would use them anyway.
    if let Ok(ma) = py.import("numpy.ma").and_then(|m| m.getattr("MaskedArray")) {
        if obj.is_instance(&ma)? {
            return Err(PyTypeError::new_err(format!(
                "{name} must be a plain numpy.ndarray, not a masked array (fill or compress it first)"
            )));
        }
    }
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray of dtype uint64, not {ty}"
        ))
    })?;
    if !arr.dtype().is_equiv_to(&numpy::dtype::<u64>(py)) {
        return Err(PyTypeError::new_err(format!(
            "{name} must have dtype uint64, not {}",
            arr.dtype().str()?
        )));
    }
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{name} must be 1-D, got {} dimensions",
            arr.ndim()
        )));
    }
    let typed = arr
        .cast::<PyArray1<u64>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must have dtype uint64")))?;
    let ro = typed
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name} cannot be read: {e}")))?;
    Ok(match ro.as_slice() {
        Ok(s) => s.to_vec(),
        Err(_) => ro.as_array().iter().copied().collect(),
    })
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // No code under the lock panics; if one ever did, the store is still
    // consistent (every method validates before it mutates).
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// The methods both classes share, over their `inner: RwLock<store>`.
/// `$per_page` says whether work scales with pages (XArray) or runs.
macro_rules! store_class {
    ($class:ident, $store:ty, $name:literal, $per_page:expr, $doc:literal) => {
        #[doc = $doc]
        #[pyclass(module = "memattr._native", name = $name, frozen)]
        pub struct $class {
            pub(crate) inner: Arc<RwLock<$store>>,
        }

        impl $class {
            /// Runs `f`, with the GIL released when its work scales with a
            /// big range of pages (XArray), so other threads go on meanwhile.
            fn sized<R: Send>(
                &self,
                py: Python<'_>,
                start: u64,
                end: u64,
                f: impl FnOnce() -> R + Send,
            ) -> PyResult<R> {
                if $per_page && end - start >= INTERRUPTIBLE_PAGES {
                    super::detach_interruptible(py, f)
                } else if $per_page && end - start >= DETACH_PAGES {
                    Ok(py.detach(f))
                } else {
                    Ok(f())
                }
            }
        }

        #[pymethods]
        impl $class {
            #[new]
            fn new() -> Self {
                $class {
                    inner: Arc::new(RwLock::new(<$store>::new())),
                }
            }

            /// The value at `gfn` (0 if never set).
            fn get(&self, gfn: &Bound<'_, PyAny>) -> PyResult<u64> {
                let gfn = u64_arg(gfn, "gfn")?;
                Ok(read(&self.inner).get(gfn))
            }

            /// Sets every gfn in `[start, end)` to `value`.
            fn set_range(
                &self,
                py: Python<'_>,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
                value: &Bound<'_, PyAny>,
            ) -> PyResult<()> {
                let (s, e) = range_args(start, end)?;
                let v = u64_arg(value, "value")?;
                self.sized(py, s, e, || write(&self.inner).set_range(s, e, v))?
                    .map_err(store_err)
            }

            /// True if every gfn in `[start, end)` has `get(gfn) & mask == value & mask`.
            #[pyo3(signature = (start, end, value, mask=None))]
            fn has_value(
                &self,
                py: Python<'_>,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
                value: &Bound<'_, PyAny>,
                mask: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<bool> {
                let (s, e) = range_args(start, end)?;
                let v = u64_arg(value, "value")?;
                let m = opt_u64_arg(mask, "mask", u64::MAX)?;
                self.sized(py, s, e, || read(&self.inner).has_value(s, e, v, m))?
                    .map_err(store_err)
            }

            /// Number of gfns in `[start, end)` whose value matches under `mask`.
            #[pyo3(signature = (start, end, value, mask=None))]
            fn count_pages(
                &self,
                py: Python<'_>,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
                value: &Bound<'_, PyAny>,
                mask: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<u64> {
                let (s, e) = range_args(start, end)?;
                let v = u64_arg(value, "value")?;
                let m = opt_u64_arg(mask, "mask", u64::MAX)?;
                py.detach(|| read(&self.inner).count_pages(s, e, v, m))
                    .map_err(store_err)
            }

            /// Maximal runs `(start, end, value)` covering `[start, end)`
            /// exactly, zero runs included.
            fn runs<'py>(
                &self,
                py: Python<'py>,
                start: &Bound<'py, PyAny>,
                end: &Bound<'py, PyAny>,
            ) -> PyResult<Bound<'py, PyIterator>> {
                let (s, e) = range_args(start, end)?;
                let runs = py
                    .detach(|| {
                        let mut out: Vec<(u64, u64, u64)> = Vec::new();
                        read(&self.inner)
                            .for_each_run(s, e, &mut |a, b, v| out.push((a, b, v)))
                            .map(|()| out)
                    })
                    .map_err(store_err)?;
                PyList::new(py, runs)?.try_iter()
            }

            /// Values at every gfn of a 1-D uint64 array, as a new uint64 array.
            fn get_many<'py>(
                &self,
                py: Python<'py>,
                gfns: &Bound<'py, PyAny>,
            ) -> PyResult<Bound<'py, PyArray1<u64>>> {
                let gfns = u64_array_arg(gfns, "gfns")?;
                let out = py.detach(|| {
                    let mut out = vec![0u64; gfns.len()];
                    read(&self.inner).get_many(&gfns, &mut out);
                    out
                });
                Ok(PyArray1::from_vec(py, out))
            }

            /// `set_range(starts[i], ends[i], values[i])` for every i in order.
            /// All ranges are checked first, so a bad one changes nothing.
            fn set_many(
                &self,
                py: Python<'_>,
                starts: &Bound<'_, PyAny>,
                ends: &Bound<'_, PyAny>,
                values: &Bound<'_, PyAny>,
            ) -> PyResult<()> {
                let starts = u64_array_arg(starts, "starts")?;
                let ends = u64_array_arg(ends, "ends")?;
                let values = u64_array_arg(values, "values")?;
                if starts.len() != ends.len() || starts.len() != values.len() {
                    return Err(PyValueError::new_err(format!(
                        "starts, ends and values must have the same length, got {}, {} and {}",
                        starts.len(),
                        ends.len(),
                        values.len()
                    )));
                }
                if let Some(i) = starts.iter().zip(&ends).position(|(s, e)| s >= e) {
                    return Err(PyValueError::new_err(format!(
                        "starts[{i}] ({}) must be < ends[{i}] ({})",
                        starts[i], ends[i]
                    )));
                }
                py.detach(|| write(&self.inner).set_many(&starts, &ends, &values))
                    .map_err(store_err)
            }

            /// Bytes the store's structure occupies.
            fn memory_bytes(&self) -> usize {
                read(&self.inner).memory_bytes()
            }

            /// Stored runs (RangeTree) or value entries (XArray).
            fn entry_count(&self) -> usize {
                read(&self.inner).entry_count()
            }

            fn __len__(&self) -> usize {
                read(&self.inner).entry_count()
            }

            /// Allocates ahead what `set_range(start, end, _)` needs; raises
            /// MemoryError, keeping nothing, if `memory_bytes()` would exceed
            /// `limit`.
            #[pyo3(signature = (start, end, limit=None))]
            fn reserve(
                &self,
                py: Python<'_>,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
                limit: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<()> {
                let (s, e) = range_args(start, end)?;
                let limit = limit_arg(limit)?;
                self.sized(py, s, e, || write(&self.inner).reserve(s, e, limit))?
                    .map_err(store_err)
            }

            /// `has_value(start, end, value)`, and if false, `reserve(start,
            /// end, limit)`: the set path's early-exit check and reservation
            /// in one call. True means nothing to do (nothing reserved).
            #[pyo3(signature = (start, end, value, limit=None))]
            fn reserve_unless_has_value(
                &self,
                py: Python<'_>,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
                value: &Bound<'_, PyAny>,
                limit: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<bool> {
                let (s, e) = range_args(start, end)?;
                let v = u64_arg(value, "value")?;
                let limit = limit_arg(limit)?;
                self.sized(py, s, e, || {
                    write(&self.inner).reserve_unless_has_value(s, e, v, limit)
                })?
                .map_err(store_err)
            }

            /// Drops reserved storage that no set used.
            fn release_reservations(&self, py: Python<'_>) {
                py.detach(|| write(&self.inner).release_reservations())
            }

            fn __repr__(&self) -> String {
                let s = read(&self.inner);
                format!(
                    "{}(entries={}, memory_bytes={})",
                    $name,
                    s.entry_count(),
                    s.memory_bytes()
                )
            }
        }
    };
}

store_class!(
    RangeTree,
    rangetree::RangeTree,
    "RangeTree",
    false,
    "Runs of equal value in a B-tree: cost and memory follow runs, not pages."
);
store_class!(
    XArray,
    xarray::XArray,
    "XArray",
    true,
    "The kernel's per-page xarray: one entry per page in 64-slot nodes."
);

store_class!(
    MapleTree,
    mapletree::MapleTree,
    "MapleTree",
    false,
    "The kernel's maple tree as the guest_memfd in-place series uses it: 256-byte nodes of 16 \
     slots, equal neighbours merged."
);

/// The kind of store `obj` is (RangeTree unless it is one of the others).
pub(crate) fn store_kind(obj: &Bound<'_, PyAny>) -> crate::kvm::gmem_attributes::StoreKind {
    use crate::kvm::gmem_attributes::StoreKind;
    if obj.cast::<XArray>().is_ok() {
        StoreKind::XArray
    } else if obj.cast::<MapleTree>().is_ok() {
        StoreKind::MapleTree
    } else {
        StoreKind::RangeTree
    }
}

/// Read access to the store inside a `RangeTree` or `XArray` object, for
/// other bindings (the MMU's hugepage tracking).
pub(crate) fn with_store<R>(
    obj: &Bound<'_, PyAny>,
    f: impl FnOnce(&dyn AttrStore) -> R,
) -> PyResult<R> {
    if let Ok(t) = obj.cast::<RangeTree>() {
        let guard = read(&t.get().inner);
        return Ok(f(&*guard));
    }
    if let Ok(x) = obj.cast::<XArray>() {
        let guard = read(&x.get().inner);
        return Ok(f(&*guard));
    }
    if let Ok(x) = obj.cast::<MapleTree>() {
        let guard = read(&x.get().inner);
        return Ok(f(&*guard));
    }
    Err(PyTypeError::new_err(format!(
        "expected a RangeTree or an XArray, not {}",
        obj.get_type().name()?
    )))
}

/// The store inside a `RangeTree` or `XArray` object, shared, for a VM's
/// core to own alongside the Python object.
pub(crate) fn shared_store(obj: &Bound<'_, PyAny>) -> PyResult<(crate::kvm::SharedStore, bool)> {
    if let Ok(t) = obj.cast::<RangeTree>() {
        return Ok((t.get().inner.clone(), false));
    }
    if let Ok(x) = obj.cast::<XArray>() {
        return Ok((x.get().inner.clone(), true));
    }
    if let Ok(x) = obj.cast::<MapleTree>() {
        return Ok((x.get().inner.clone(), false));
    }
    Err(PyTypeError::new_err(format!(
        "store must be a RangeTree or an XArray, not {}",
        obj.get_type().name()?
    )))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RangeTree>()?;
    m.add_class::<XArray>()?;
    m.add_class::<MapleTree>()?;
    Ok(())
}
