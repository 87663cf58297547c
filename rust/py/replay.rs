//! Binding for `crate::kvm`: runs a batch of trace operations on a Vm's
//! state (its store, each memslot's hugepage tracker, the stage-2 roots)
//! with the GIL released. `memattr.trace.replay` decides when a batch may
//! run and writes the counters and invalidation state back to the Vm.

use std::sync::{Mutex, MutexGuard};

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::hugepage::{lock, PyLpageInfoTracker, PyRangeHugepageTracker, PyStage2Map};
use super::stores::store_cell;
use crate::hugepage::{HugepageTracker, LpageInfoTracker, RangeTracker, Stage2Map};
use crate::kvm::{
    replay, Counters, GmemFile, Kvm, KvmConfig, KvmError, Memslot, MmuInvalidation, Op, ReplayTally,
};

enum TrackerCell<'a> {
    Range(&'a Mutex<RangeTracker>),
    Lpage(&'a Mutex<LpageInfoTracker>),
}

enum TrackerGuard<'a> {
    Range(MutexGuard<'a, RangeTracker>),
    Lpage(MutexGuard<'a, LpageInfoTracker>),
}

impl TrackerCell<'_> {
    fn lock(&self) -> TrackerGuard<'_> {
        match self {
            TrackerCell::Range(m) => TrackerGuard::Range(lock(m)),
            TrackerCell::Lpage(m) => TrackerGuard::Lpage(lock(m)),
        }
    }
}

impl TrackerGuard<'_> {
    fn as_dyn(&mut self) -> &mut (dyn HugepageTracker + Send) {
        match self {
            TrackerGuard::Range(g) => &mut **g,
            TrackerGuard::Lpage(g) => &mut **g,
        }
    }
}

fn tracker_cell<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<TrackerCell<'a>> {
    if let Ok(t) = obj.cast::<PyRangeHugepageTracker>() {
        return Ok(TrackerCell::Range(&t.get().inner));
    }
    if let Ok(t) = obj.cast::<PyLpageInfoTracker>() {
        return Ok(TrackerCell::Lpage(&t.get().inner));
    }
    Err(PyTypeError::new_err(format!(
        "a memslot's tracker must be a RangeHugepageTracker or an LpageInfoTracker, not {}",
        obj.get_type().name()?
    )))
}

fn column<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    name: &str,
    n: usize,
) -> PyResult<&'a [T]> {
    let s = a
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous array")))?;
    if s.len() != n {
        return Err(PyValueError::new_err(format!(
            "{name} has {} elements, results has {n}",
            s.len()
        )));
    }
    Ok(s)
}

fn counters_dict<'py>(py: Python<'py>, c: &Counters) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("set_calls", c.set_calls)?;
    d.set_item("conversions", c.conversions)?;
    d.set_item("noop_conversions", c.noop_conversions)?;
    d.set_item("pages_converted", c.pages_converted)?;
    d.set_item("failed_calls", c.failed_calls)?;
    d.set_item("enomem", c.enomem)?;
    d.set_item("zapped_ranges", c.zapped_ranges)?;
    d.set_item("post_set_ranges", c.post_set_ranges)?;
    d.set_item("tlb_flushes", c.tlb_flushes)?;
    d.set_item("mmu_lock_acquisitions", c.mmu_lock_acquisitions)?;
    d.set_item("faults", c.faults)?;
    d.set_item("memory_fault_exits", c.memory_fault_exits)?;
    d.set_item("mmio_faults", c.mmio_faults)?;
    d.set_item("gmem_holes_punched", c.gmem_holes_punched)?;
    d.set_item("zapped_pages", c.zapped_pages)?;
    d.set_item("mapped", c.mapped)?;
    Ok(d)
}

/// One memslot as the Vm describes it:
/// `(as_id, base_gfn, npages, flags, private_backing, tracker)`, where
/// `private_backing` says a private fault can get a page (a bound guest_memfd
/// whose file is open).
type SlotArg<'py> = (usize, u64, u64, u32, bool, Bound<'py, PyAny>);

/// `(supported_attributes, has_private_mem, attr_memory_limit,
/// guest_memfd_max_order, host_mapping_level, invalidate_straddling)`.
type ConfigArg = (u64, bool, Option<u64>, u32, u8, bool);

/// Runs trace operations (one array per record field) on the given state
/// until one a batch does not run; see `crate::kvm::replay`. `gmem` lists
/// the VM's open guest_memfd files as `(fd, size, [(first_page, end_page,
/// slot_index)])`, and fallocate operations carry live fds. Returns a dict:
/// `done` (operations run), the replay tally, `errors` ({errno: count}),
/// `counters` (deltas for the Vm's stats), `inval` (seq, in_progress,
/// range_start, range_end), `warned_no_private_mem`, and `bug` (None, or the
/// model inconsistency that stopped the batch).
#[pyfunction]
#[pyo3(signature = (store, slots, roots, gmem, config, inval, kind, gpa, size, attributes, arg, flags, results))]
#[allow(clippy::too_many_arguments)]
fn replay_batch<'py>(
    py: Python<'py>,
    store: &Bound<'py, PyAny>,
    slots: Vec<SlotArg<'py>>,
    roots: Vec<Bound<'py, PyStage2Map>>,
    gmem: Vec<(u64, u64, Vec<(u64, u64, usize)>)>,
    config: ConfigArg,
    inval: (u64, u64, u64, u64),
    kind: PyReadonlyArray1<'py, u8>,
    gpa: PyReadonlyArray1<'py, u64>,
    size: PyReadonlyArray1<'py, u64>,
    attributes: PyReadonlyArray1<'py, u64>,
    arg: PyReadonlyArray1<'py, u64>,
    flags: PyReadonlyArray1<'py, u8>,
    mut results: PyReadwriteArray1<'py, i64>,
) -> PyResult<Bound<'py, PyDict>> {
    let results = results
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("results must be a contiguous int64 array"))?;
    let n = results.len();
    let (kind, gpa, size) = (
        column(&kind, "kind", n)?,
        column(&gpa, "gpa", n)?,
        column(&size, "size", n)?,
    );
    let (attributes, arg, flags) = (
        column(&attributes, "attributes", n)?,
        column(&arg, "arg", n)?,
        column(&flags, "flags", n)?,
    );
    let ops: Vec<Op> = (0..n)
        .map(|i| Op {
            kind: kind[i],
            gpa: gpa[i],
            size: size[i],
            attributes: attributes[i],
            arg: arg[i],
            flags: flags[i],
        })
        .collect();
    let (supported_attributes, has_private_mem, limit, order, host_level, straddle) = config;
    let config = KvmConfig {
        supported_attributes,
        has_private_mem,
        attr_memory_limit: limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
        guest_memfd_max_order: order,
        host_mapping_level: host_level,
        invalidate_straddling_hugepages: straddle,
    };
    let inval = MmuInvalidation {
        seq: inval.0,
        in_progress: inval.1,
        range_start: inval.2,
        range_end: inval.3,
    };
    let store = store_cell(store)?;
    let cells = slots
        .iter()
        .map(|s| tracker_cell(&s.5))
        .collect::<PyResult<Vec<_>>>()?;
    let root_cells: Vec<&Mutex<Stage2Map>> = roots.iter().map(|r| &r.get().inner).collect();
    let layout: Vec<(usize, u64, u64, u32, bool)> =
        slots.iter().map(|s| (s.0, s.1, s.2, s.3, s.4)).collect();
    let gmem: Vec<GmemFile> = gmem
        .into_iter()
        .map(|(fd, size, bindings)| GmemFile { fd, size, bindings })
        .collect();

    // Lock order as everywhere else: roots, trackers, then the store.
    let outcome = py.detach(|| {
        let mut root_guards: Vec<MutexGuard<'_, Stage2Map>> =
            root_cells.iter().map(|m| lock(m)).collect();
        let mut tracker_guards: Vec<TrackerGuard<'_>> = cells.iter().map(|c| c.lock()).collect();
        store.with_write(|store| {
            let memslots = layout
                .iter()
                .zip(tracker_guards.iter_mut())
                .map(
                    |(&(as_id, base_gfn, npages, flags, can_be_private), g)| Memslot {
                        as_id,
                        base_gfn,
                        npages,
                        flags,
                        can_be_private,
                        tracker: g.as_dyn(),
                    },
                )
                .collect();
            let roots = root_guards.iter_mut().map(|g| &mut **g).collect();
            let mut kvm =
                Kvm::new(config, store, memslots, roots, inval)?.with_guest_memfds(gmem)?;
            let mut tally = ReplayTally::default();
            let ran = replay(&mut kvm, &ops, results, &mut tally);
            Ok::<_, String>((
                ran,
                tally,
                kvm.counters,
                kvm.inval,
                kvm.warned_no_private_mem,
            ))
        })
    });
    let (ran, tally, counters, inval, warned) = outcome.map_err(PyValueError::new_err)?;
    let (done, bug) = match ran {
        Ok(done) => (done, None),
        // The operation that hit the bug did not finish: the ones before it did.
        Err(KvmError::Bug(msg)) => (tally.ops as usize, Some(msg)),
        Err(e) => (tally.ops as usize, Some(format!("{e:?}"))),
    };
    let d = PyDict::new(py);
    d.set_item("done", done)?;
    d.set_item("ops", tally.ops)?;
    d.set_item("sets", tally.sets)?;
    d.set_item("faults", tally.faults)?;
    d.set_item("fault_exits", tally.fault_exits)?;
    d.set_item("implicit_conversions", tally.implicit_conversions)?;
    let errors = PyDict::new(py);
    for (errno, count) in &tally.errors {
        errors.set_item(errno, count)?;
    }
    d.set_item("errors", errors)?;
    d.set_item("counters", counters_dict(py, &counters)?)?;
    d.set_item(
        "inval",
        (
            inval.seq,
            inval.in_progress,
            inval.range_start,
            inval.range_end,
        ),
    )?;
    d.set_item("warned_no_private_mem", warned)?;
    d.set_item("bug", bug)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(replay_batch, m)?)?;
    Ok(())
}
