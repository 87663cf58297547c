//! Bindings for the hugepage tracking and the TDP page table model: argument
//! conversion with errors that name the argument, error mapping, nothing
//! else. The rules live in `crate::hugepage`.

use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

use super::args::u64_arg;
use super::stores::with_store;
use crate::hugepage::{
    HugepageError, HugepageTracker, LevelCounts, LpageInfoTracker, RangeTracker, SlotLayout,
    TdpPageTable, KVM_MAX_HUGEPAGE_LEVEL,
};
use crate::store::StoreError;

/// Each class keeps its state behind a `Mutex` (like the stores' `RwLock`),
/// so a replay batch can hold it with the GIL released and another thread
/// simply waits instead of meeting a borrow error.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every method validates before it mutates, so a poisoned state is
    // still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn to_pyerr(e: HugepageError) -> PyErr {
    match e {
        HugepageError::Store(StoreError::OutOfMemory { .. }) => {
            PyMemoryError::new_err(e.to_string())
        }
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// A page-table level argument in `min..=max`, named in the error.
fn level_arg(obj: &Bound<'_, PyAny>, name: &str, min: u8, max: u8) -> PyResult<u8> {
    let v = u64_arg(obj, name)?;
    match u8::try_from(v) {
        Ok(l) if (min..=max).contains(&l) => Ok(l),
        _ => Err(PyValueError::new_err(format!(
            "{name} must be in {min}..={max} (1 = 4K, 2 = 2M, 3 = 1G), got {v}"
        ))),
    }
}

fn counts_tuple(c: LevelCounts) -> (u64, u64, u64) {
    (c[0], c[1], c[2])
}

/// Runs of hugepage numbers at `shift`, as gfn ranges (Python ints, so the
/// last hugepage of the gfn space ends at 2**64 without wrapping).
fn gfn_runs(runs: Vec<(u64, u64)>, shift: u32) -> Vec<(u128, u128)> {
    runs.into_iter()
        .map(|(s, e)| ((s as u128) << shift, (e as u128) << shift))
        .collect()
}

macro_rules! tracker_pyclass {
    ($pyname:ident, $name:literal, $inner:ty, $doc:literal) => {
        #[doc = $doc]
        #[pyclass(name = $name, module = "memattr._native", frozen)]
        pub struct $pyname {
            pub(crate) inner: Mutex<$inner>,
        }

        #[pymethods]
        impl $pyname {
            /// Applies kvm_alloc_memslot_metadata()'s disallow rules for a
            /// memslot of `npages` pages at `base_gfn` backed at
            /// `userspace_addr`; mixed flags start clear.
            #[new]
            #[pyo3(signature = (base_gfn, npages, userspace_addr=None))]
            fn new(
                base_gfn: &Bound<'_, PyAny>,
                npages: &Bound<'_, PyAny>,
                userspace_addr: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<Self> {
                let base = u64_arg(base_gfn, "base_gfn")?;
                let n = u64_arg(npages, "npages")?;
                let ua = match userspace_addr {
                    Some(o) => u64_arg(o, "userspace_addr")?,
                    None => 0,
                };
                let slot = SlotLayout::new(base, n, ua).map_err(to_pyerr)?;
                Ok(Self {
                    inner: Mutex::new(<$inner>::try_new(slot).map_err(to_pyerr)?),
                })
            }

            #[getter]
            fn base_gfn(&self) -> u64 {
                lock(&self.inner).slot().base_gfn
            }

            #[getter]
            fn npages(&self) -> u64 {
                lock(&self.inner).slot().npages
            }

            #[getter]
            fn userspace_addr(&self) -> u64 {
                lock(&self.inner).slot().userspace_addr
            }

            /// kvm_mmu_init_memslot_memory_attributes() from `store`.
            fn init_memory_attributes(&self, store: &Bound<'_, PyAny>) -> PyResult<()> {
                let mut inner = lock(&self.inner);
                with_store(store, |s| inner.init_memory_attributes(s))?.map_err(to_pyerr)
            }

            /// kvm_arch_post_set_memory_attributes() for `[start, end)`
            /// (inside the slot), just set to `attrs` in `store`.
            fn post_set_memory_attributes(
                &self,
                store: &Bound<'_, PyAny>,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
                attrs: &Bound<'_, PyAny>,
            ) -> PyResult<()> {
                let start = u64_arg(start, "start")?;
                let end = u64_arg(end, "end")?;
                let attrs = u64_arg(attrs, "attrs")?;
                let mut inner = lock(&self.inner);
                with_store(store, |s| {
                    inner.post_set_memory_attributes(s, start, end, attrs)
                })?
                .map_err(to_pyerr)
            }

            /// KVM_LPAGE_MIXED_FLAG of the hugepage at `level` containing `gfn`.
            fn test_mixed(
                &self,
                gfn: &Bound<'_, PyAny>,
                level: &Bound<'_, PyAny>,
            ) -> PyResult<bool> {
                let gfn = u64_arg(gfn, "gfn")?;
                let level = level_arg(level, "level", 2, 3)?;
                lock(&self.inner).test_mixed(gfn, level).map_err(to_pyerr)
            }

            /// The non-mixed head/tail hugepages straddling `[start, end)` as
            /// `(start_gfn, end_gfn)` ranges, 2M first.
            fn straddling_hugepages(
                &self,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
            ) -> PyResult<Vec<(u64, u64)>> {
                let start = u64_arg(start, "start")?;
                let end = u64_arg(end, "end")?;
                // Wholly inside the slot, so the end fits in a u64.
                let pages = lock(&self.inner)
                    .straddling_hugepages(start, end)
                    .map_err(to_pyerr)?;
                Ok(pages
                    .into_iter()
                    .map(|(gfn, level)| (gfn, gfn + crate::hugepage::pages_per_hpage(level)))
                    .collect())
            }

            /// The smallest `(start_gfn, end_gfn)` covering every range
            /// `straddling_hugepages()` returns, or None if it returns none.
            fn straddling_hugepages_hull(
                &self,
                start: &Bound<'_, PyAny>,
                end: &Bound<'_, PyAny>,
            ) -> PyResult<Option<(u64, u64)>> {
                let start = u64_arg(start, "start")?;
                let end = u64_arg(end, "end")?;
                lock(&self.inner)
                    .straddling_hugepages_hull(start, end)
                    .map_err(to_pyerr)
            }

            /// `disallow_lpage != 0` for the hugepage at `level` containing `gfn`.
            fn disallow_lpage(
                &self,
                gfn: &Bound<'_, PyAny>,
                level: &Bound<'_, PyAny>,
            ) -> PyResult<bool> {
                let gfn = u64_arg(gfn, "gfn")?;
                let level = level_arg(level, "level", 2, 3)?;
                lock(&self.inner)
                    .disallow_lpage(gfn, level)
                    .map_err(to_pyerr)
            }

            /// The highest level <= `max_level` not disallowed at `gfn`.
            #[pyo3(signature = (gfn, max_level=None))]
            fn max_mapping_level(
                &self,
                gfn: &Bound<'_, PyAny>,
                max_level: Option<&Bound<'_, PyAny>>,
            ) -> PyResult<u8> {
                let gfn = u64_arg(gfn, "gfn")?;
                let max_level = match max_level {
                    Some(o) => level_arg(o, "max_level", 1, 3)?,
                    None => KVM_MAX_HUGEPAGE_LEVEL,
                };
                lock(&self.inner)
                    .max_mapping_level(gfn, max_level)
                    .map_err(to_pyerr)
            }

            /// Mixed hugepages of `level` as `(start_gfn, end_gfn)` runs.
            fn mixed_runs(&self, level: &Bound<'_, PyAny>) -> PyResult<Vec<(u128, u128)>> {
                let level = level_arg(level, "level", 2, 3)?;
                let runs = lock(&self.inner).mixed_runs(level).map_err(to_pyerr)?;
                Ok(gfn_runs(runs, crate::hugepage::hpage_gfn_shift(level)))
            }

            /// Bytes of tracking state.
            fn memory_bytes(&self) -> usize {
                lock(&self.inner).memory_bytes()
            }

            fn __repr__(&self) -> String {
                let s = *lock(&self.inner).slot();
                format!(
                    "{}(base_gfn={:#x}, npages={:#x}, userspace_addr={:#x})",
                    $name, s.base_gfn, s.npages, s.userspace_addr
                )
            }
        }
    };
}

tracker_pyclass!(
    PyRangeHugepageTracker,
    "RangeHugepageTracker",
    RangeTracker,
    "Per-memslot 2M/1G hugepage tracking keeping only the set mixed flags (O(log n + runs) per post-set)."
);

tracker_pyclass!(
    PyLpageInfoTracker,
    "LpageInfoTracker",
    LpageInfoTracker,
    "The kernel's lpage_info arrays and per-hugepage post-set loop (the reference)."
);

/// Leaf mappings of one address space's TDP root (rust/tdp.rs).
#[pyclass(name = "TdpPageTable", module = "memattr._native", frozen)]
pub struct PyTdpPageTable {
    pub(crate) inner: Mutex<TdpPageTable>,
}

impl PyTdpPageTable {
    /// `op` on `[start, end)` (u64 arguments, `start < end`), its per-level
    /// counts as a tuple.
    fn on_range(
        &self,
        start: &Bound<'_, PyAny>,
        end: &Bound<'_, PyAny>,
        op: fn(&mut TdpPageTable, u64, u64) -> Result<LevelCounts, HugepageError>,
    ) -> PyResult<(u64, u64, u64)> {
        let start = u64_arg(start, "start")?;
        let end = u64_arg(end, "end")?;
        if start >= end {
            return Err(PyValueError::new_err(format!(
                "start ({start}) must be < end ({end})"
            )));
        }
        op(&mut lock(&self.inner), start, end)
            .map(counts_tuple)
            .map_err(to_pyerr)
    }
}

#[pymethods]
impl PyTdpPageTable {
    #[new]
    fn new() -> Self {
        Self {
            inner: Mutex::new(TdpPageTable::new()),
        }
    }

    /// Installs a leaf at `level` covering `gfn`; returns (installed,
    /// leaves removed per level as (4K, 2M, 1G)).
    #[pyo3(signature = (gfn, level, private=false))]
    fn map(
        &self,
        gfn: &Bound<'_, PyAny>,
        level: &Bound<'_, PyAny>,
        private: bool,
    ) -> PyResult<(bool, (u64, u64, u64))> {
        let gfn = u64_arg(gfn, "gfn")?;
        let level = level_arg(level, "level", 1, 3)?;
        let (installed, removed) = lock(&self.inner)
            .map(gfn, level, private)
            .map_err(to_pyerr)?;
        Ok((installed, counts_tuple(removed)))
    }

    /// Removes every leaf intersecting `[start, end)` (huge leaves whole);
    /// returns the leaves removed per level.
    fn zap(&self, start: &Bound<'_, PyAny>, end: &Bound<'_, PyAny>) -> PyResult<(u64, u64, u64)> {
        self.on_range(start, end, TdpPageTable::zap)
    }

    /// Splits every 2M and 1G leaf intersecting `[start, end)` into 4K
    /// leaves; returns the huge leaves split per level (4K always 0).
    fn split_huge_pages(
        &self,
        start: &Bound<'_, PyAny>,
        end: &Bound<'_, PyAny>,
    ) -> PyResult<(u64, u64, u64)> {
        self.on_range(start, end, TdpPageTable::split_huge_pages)
    }

    /// Removes every leaf; returns the leaves removed per level.
    fn zap_all(&self) -> (u64, u64, u64) {
        counts_tuple(lock(&self.inner).zap_all())
    }

    /// Level of the leaf mapping `gfn`, 0 if unmapped.
    fn mapped_level(&self, gfn: &Bound<'_, PyAny>) -> PyResult<u8> {
        let gfn = u64_arg(gfn, "gfn")?;
        Ok(lock(&self.inner).mapped_level(gfn).unwrap_or(0))
    }

    /// Live leaves per level (4K, 2M, 1G).
    fn counts(&self) -> (u64, u64, u64) {
        counts_tuple(lock(&self.inner).counts())
    }

    /// The leaves of `level` as `(start_gfn, end_gfn)` runs.
    fn runs(&self, level: &Bound<'_, PyAny>) -> PyResult<Vec<(u128, u128)>> {
        let level = level_arg(level, "level", 1, 3)?;
        let runs = lock(&self.inner).frame_runs(level).map_err(to_pyerr)?;
        Ok(gfn_runs(runs, crate::hugepage::hpage_gfn_shift(level)))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRangeHugepageTracker>()?;
    m.add_class::<PyLpageInfoTracker>()?;
    m.add_class::<PyTdpPageTable>()?;
    Ok(())
}
