//! Bindings for `crate::kvm` and `crate::locks`: the VM core as the Python
//! class `memattr._native.Kvm`, and its modelled locks as `ModelLock`.
//! Arguments are converted with `args`, errors mapped to the kernel's errno
//! (OSError), MemoryFault or KvmBugError; no rule lives here.
//!
//! Two kinds of methods:
//! - steps (`set_checks`, `pre_set`, `faultin`, ...) take only the core's
//!   data mutex, for the Python driver, which holds the modelled locks
//!   around them and runs hooks between them;
//! - whole operations (`set_memory_attributes`, `fault`, `set_memory_region`,
//!   `replay`, ...) take the modelled locks themselves, in the kernel's order
//!   (slots_lock, then mmu_lock), then the data mutex. They return "not done"
//!   instead of waiting when the calling thread already holds a modelled
//!   lock, so the Python driver can report it as lockdep would.
//!
//! Lock order, everywhere: slots_lock -> mmu_lock -> data mutex. The data
//! mutex is never held while waiting for a modelled lock or while Python
//! code runs, so a hook (which runs between steps) can never deadlock
//! against it. Waiting for any of them releases the GIL (`py.detach`), since
//! the holder may be a Python thread that needs it to finish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::args::{bool_arg, i64_arg, u32_arg, u64_arg};
use super::stores::shared_store;
use crate::kvm::guest_memfd::GmemFileOp;
use crate::kvm::memslots::UserspaceMemoryRegion;
use crate::kvm::mmu::FaultIn;
use crate::kvm::replay::{replay, OpColumns, Ops, ReplayTally};
use crate::kvm::{CpuVendor, GfnRange, HostProfile, Kvm, KvmError, MemslotInfo, Semantics};
use crate::locks::{LockError, ModelLock, ModelLockGuard};

/// A host profile as plain data: (vendor, vm_types, sw_protected_vm, smm,
/// generic_memory_attributes, guest_memfd, tdp, max_page_level,
/// user_address_bits, maxphyaddr), the fields of `memattr.HostProfile`.
type HostTuple = (String, u64, bool, bool, bool, bool, bool, u8, u8, u8);

fn host_to_tuple(h: &HostProfile) -> HostTuple {
    (
        h.vendor.name().to_string(),
        h.vm_types,
        h.sw_protected_vm,
        h.smm,
        h.generic_memory_attributes,
        h.guest_memfd,
        h.tdp,
        h.max_page_level,
        h.user_address_bits,
        h.maxphyaddr,
    )
}

/// The profile, validated (ValueError naming what no real host can have).
fn host_from_tuple(t: HostTuple) -> PyResult<HostProfile> {
    let vendor = CpuVendor::from_name(&t.0).ok_or_else(|| {
        PyValueError::new_err(format!(
            "host profile: vendor must be 'intel', 'amd' or 'other', got {:?}",
            t.0
        ))
    })?;
    let h = HostProfile {
        vendor,
        vm_types: t.1,
        sw_protected_vm: t.2,
        smm: t.3,
        generic_memory_attributes: t.4,
        guest_memfd: t.5,
        tdp: t.6,
        max_page_level: t.7,
        user_address_bits: t.8,
        maxphyaddr: t.9,
    };
    h.validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(h)
}

fn semantics_arg(semantics: &str) -> PyResult<Semantics> {
    Ok(match semantics {
        "6.18" => Semantics::Linux618,
        "6.8" => Semantics::Linux68,
        "v11" => Semantics::V11,
        "gmem-inplace" => Semantics::GmemInplace,
        "gmem-inplace-v5" => Semantics::GmemInplaceV5,
        other => {
            return Err(PyValueError::new_err(format!(
                "semantics must be '6.18', '6.8', 'v11', 'gmem-inplace' or 'gmem-inplace-v5', \
                 got {other:?}"
            )))
        }
    })
}

/// The default host profile (`crate::kvm::HostProfile::default`).
#[pyfunction]
fn host_profile_default() -> HostTuple {
    host_to_tuple(&HostProfile::default())
}

/// ValueError unless the profile could be a real host's.
#[pyfunction]
fn host_profile_check(host: HostTuple) -> PyResult<()> {
    host_from_tuple(host).map(|_| ())
}

/// KVM_CHECK_EXTENSION on the system fd (/dev/kvm) of `host`.
#[pyfunction]
fn check_extension_system(
    host: HostTuple,
    semantics: &str,
    cap: &Bound<'_, PyAny>,
) -> PyResult<u64> {
    let host = host_from_tuple(host)?;
    let cap = i64_arg(cap, "cap")?;
    Ok(crate::kvm::caps::check_extension(
        &host,
        semantics_arg(semantics)?,
        None,
        cap,
    ))
}

/// Ranges at least this long (bytes) are set with the GIL released.
const DETACH_BYTES: u64 = 1 << 24;
/// Sets at least this big run interruptibly (Ctrl-C stops their
/// reservation, which undoes itself), on a worker thread.
const INTERRUPTIBLE_BYTES: u64 = 1 << 32;

/// How a native operation treats the GIL.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detach {
    No,
    Yes,
    Interruptible,
}
/// The ident a lock records when a native operation holds it.
const NATIVE_IDENT: u64 = 0;

fn strerror(errno: i32) -> &'static str {
    match errno {
        4 => "Interrupted system call",
        5 => "Input/output error",
        9 => "Bad file descriptor",
        11 => "Resource temporarily unavailable",
        12 => "Cannot allocate memory",
        14 => "Bad address",
        17 => "File exists",
        19 => "No such device",
        22 => "Invalid argument",
        25 => "Inappropriate ioctl for device",
        27 => "File too large",
        95 => "Operation not supported",
        _ => "Unknown error",
    }
}

/// A core error as the Python exception the kernel's errno stands for.
pub(crate) fn to_pyerr(py: Python<'_>, e: KvmError) -> PyErr {
    match e {
        KvmError::Errno { errno, why } => {
            PyOSError::new_err((errno, format!("{}: {why}", strerror(errno))))
        }
        KvmError::Argument(why) => PyValueError::new_err(why),
        KvmError::MemoryFault { gpa, size, flags } => {
            match py
                .import("memattr.errors")
                .and_then(|m| m.getattr("MemoryFault"))
                .and_then(|c| c.call1((gpa, size, flags)))
            {
                Ok(exc) => PyErr::from_value(exc),
                Err(err) => err,
            }
        }
        KvmError::Sigbus {
            fd,
            offset,
            private,
        } => match py
            .import("memattr.errors")
            .and_then(|m| m.getattr("GuestMemfdSigbus"))
            .and_then(|c| c.call1((fd, offset, private)))
        {
            Ok(exc) => PyErr::from_value(exc),
            Err(err) => err,
        },
        KvmError::Bug(why) => match py
            .import("memattr.errors")
            .and_then(|m| m.getattr("KvmBugError"))
            .and_then(|c| c.call1((format!("KVM_BUG_ON: {why}"),)))
        {
            Ok(exc) => PyErr::from_value(exc),
            Err(err) => err,
        },
    }
}

/// A modelled lock (`kvm->slots_lock`, `kvm->mmu_lock`), shared by the
/// Python driver and the native operations. The Python side (`memattr.locks`)
/// adds lockdep's checks and messages.
#[pyclass(module = "memattr._native", name = "ModelLock", frozen)]
pub struct PyModelLock {
    inner: Arc<ModelLock>,
}

fn lock_error(e: LockError) -> PyErr {
    match e {
        LockError::Recursive(name) => {
            PyRuntimeError::new_err(format!("{name}: this thread already holds it"))
        }
        LockError::NotOwner(name, _) => PyRuntimeError::new_err(format!(
            "{name}: released by a thread that does not hold it"
        )),
    }
}

/// Takes `lock`, waiting with the GIL released if another thread holds it.
fn acquire(py: Python<'_>, lock: &ModelLock, ident: u64) -> PyResult<()> {
    if lock.try_acquire(ident).map_err(lock_error)? {
        return Ok(());
    }
    py.detach(|| lock.acquire(ident)).map_err(lock_error)
}

#[pymethods]
impl PyModelLock {
    #[getter]
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    /// Takes the lock for the thread `ident` (Python's thread ident), waiting
    /// with the GIL released. RuntimeError if this thread holds it already.
    fn acquire(&self, py: Python<'_>, ident: u64) -> PyResult<()> {
        acquire(py, &self.inner, ident)
    }

    /// RuntimeError if this thread does not hold it.
    fn release(&self) -> PyResult<()> {
        self.inner.release().map_err(lock_error)
    }

    fn held_by_current_thread(&self) -> bool {
        self.inner.held_by_current_thread()
    }

    fn locked(&self) -> bool {
        self.inner.locked()
    }

    /// The holder's ident (0 for a native operation), or None.
    #[getter]
    fn owner(&self) -> Option<u64> {
        self.inner.owner_ident()
    }
}

/// One VM's core (`crate::kvm::Kvm`) with its modelled locks.
#[pyclass(module = "memattr._native", name = "Kvm", frozen)]
pub struct PyKvm {
    core: Mutex<Kvm>,
    slots_lock: Arc<ModelLock>,
    mmu_lock: Arc<ModelLock>,
    /// The Python store object sharing the core's store.
    store: Py<PyAny>,
    /// Whether KVM_SET_MEMORY_ATTRIBUTES may run whole in the core: the Vm
    /// clears it while hooks or v11's ordering need the Python driver.
    native_set: AtomicBool,
    /// The Vm's driver for the set (`weakref.WeakMethod` of it, so the core
    /// does not keep its Vm alive): what [`PyKvm::set_memory_attributes_or_drive`]
    /// calls when the whole call cannot run here.
    set_driver: Mutex<Option<Py<PyAny>>>,
    /// The MMU's fault retry loop (a `weakref.WeakMethod`), for
    /// [`PyKvm::fault_or_drive`] when a fault cannot finish here.
    fault_driver: Mutex<Option<Py<PyAny>>>,
}

/// The set entry's `flags` (default 0), through the one integer rule.
struct SetFlags(u64);

impl<'a, 'py> FromPyObject<'a, 'py> for SetFlags {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        u64_arg(&obj, "flags").map(SetFlags)
    }
}

/// The fault entry's bool arguments, through the one bool rule (errors
/// name the argument).
macro_rules! bool_param {
    ($name:ident, $arg:literal) => {
        struct $name(bool);

        impl<'a, 'py> FromPyObject<'a, 'py> for $name {
            type Error = PyErr;

            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                bool_arg(&obj, $arg).map($name)
            }
        }
    };
}

bool_param!(PrivateParam, "private");
bool_param!(WriteParam, "write");

/// The fault entry's `as_id`, through the one integer rule (the core checks
/// that the address space exists).
struct AsIdParam(usize);

impl<'a, 'py> FromPyObject<'a, 'py> for AsIdParam {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(AsIdParam(
            usize::try_from(u64_arg(&obj, "as_id")?).unwrap_or(usize::MAX),
        ))
    }
}

/// Calls the driver a `weakref.WeakMethod` in `slot` refers to.
fn call_driver<'py>(
    py: Python<'py>,
    slot: &Mutex<Option<Py<PyAny>>>,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyResult<Py<PyAny>> {
    let weak = slot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|d| d.clone_ref(py))
        .ok_or_else(|| PyRuntimeError::new_err("this Kvm has no Vm to drive it"))?;
    let driver = weak.call0(py)?;
    if driver.is_none(py) {
        return Err(PyRuntimeError::new_err("the Vm of this Kvm is gone"));
    }
    Ok(driver.call1(py, args)?)
}

/// Set while an explorer drives threads step by step (`memattr.sched.hook`):
/// every step must then reach Python, so no set runs whole in the core.
static SCHED_HOOKED: AtomicBool = AtomicBool::new(false);

/// `memattr.sched.set_hook()` tells the core whether a scheduler hook is set.
#[pyfunction]
fn set_sched_hooked(on: bool) {
    SCHED_HOOKED.store(on, Ordering::SeqCst);
}

type Memslot5 = (usize, usize, u64, u64, u64);

fn memslot_tuple(m: &MemslotInfo) -> (u16, usize, u64, u64, u64, u32, Option<u64>, u64, bool, u64) {
    (
        m.id,
        m.as_id,
        m.base_gfn,
        m.npages,
        m.userspace_addr,
        m.flags,
        m.guest_memfd,
        m.guest_memfd_offset,
        m.gmem_open,
        m.serial,
    )
}

fn gfn_range(r: Memslot5) -> GfnRange {
    GfnRange {
        as_id: r.0,
        index: r.1,
        serial: r.2,
        start: r.3,
        end: r.4,
    }
}

impl PyKvm {
    /// KVM_SET_MEMORY_ATTRIBUTES whole in the core, the GIL released when
    /// the range is long; false if this thread holds a modelled lock (the
    /// Python driver must run it).
    fn set_whole(
        &self,
        py: Python<'_>,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> PyResult<bool> {
        let mode = if size >= INTERRUPTIBLE_BYTES {
            Detach::Interruptible
        } else if size >= DETACH_BYTES {
            Detach::Yes
        } else {
            Detach::No
        };
        self.whole_mode(py, mode, move |k| {
            k.set_memory_attributes(address, size, attributes, flags)
                .map(|_| ())
        })
    }

    /// A whole fault, natively, if it can finish without waiting for an
    /// invalidation: the level (0 for MMIO), or -1 if the Python driver's
    /// retry loop must take over (a retry is due, or this thread holds a
    /// modelled lock). Raises MemoryFault for an exit.
    fn fault_whole(&self, py: Python<'_>, gpa: u64, private: bool, as_id: usize) -> PyResult<i64> {
        if self.slots_lock.held_by_current_thread() || self.mmu_lock.held_by_current_thread() {
            return Ok(-1);
        }
        let (mmu_seq, serial) =
            match self.step(py, |k| k.kvm_faultin_pfn(gpa, private, as_id, true))? {
                FaultIn::Retry => return Ok(-1),
                FaultIn::Mmio => return Ok(0),
                FaultIn::Map { mmu_seq, serial } => (mmu_seq, serial),
            };
        acquire(py, &self.mmu_lock, NATIVE_IDENT)?;
        let _mmu = ModelLockGuard::adopt(&self.mmu_lock);
        let level = self.step(py, |k| {
            k.note_mmu_lock();
            k.kvm_tdp_map(gpa, private, as_id, mmu_seq, serial)
        })?;
        Ok(level.map_or(-1, i64::from))
    }

    /// The core's data, waiting with the GIL released if a long native
    /// operation holds it.
    pub(super) fn core(&self, py: Python<'_>) -> MutexGuard<'_, Kvm> {
        // Every core operation validates before it mutates, so a poisoned
        // mutex still guards a consistent VM.
        loop {
            match self.core.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                // A guard cannot leave the GIL-free section, so wait there
                // for the holder and try again with the GIL.
                Err(std::sync::TryLockError::WouldBlock) => py.detach(|| {
                    drop(self.core.lock());
                }),
            }
        }
    }

    /// Runs `f` on the core, then reports the WARN_ON_ONCEs it raised as
    /// `memattr.locks.KvmWarning`s (after the data mutex is dropped: a
    /// warning filter may run Python code).
    pub(super) fn step<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Kvm) -> Result<R, KvmError> + Send,
    ) -> PyResult<R> {
        self.step_detached(py, false, f)
    }

    /// [`PyKvm::step`], with the GIL released if `detach` (work that grows
    /// with the range, on the per-page store).
    /// [`PyKvm::step`] for work long enough to deserve Ctrl-C: it runs
    /// under `detach_interruptible`, and the core's interruptible loops (the
    /// reservation) undo themselves when the user interrupts.
    fn step_interruptible<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Kvm) -> Result<R, KvmError> + Send,
    ) -> PyResult<R> {
        let (r, warnings) = super::detach_interruptible(py, || {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let r = f(&mut core);
            (r, core.take_warnings())
        })?;
        emit_warnings(py, &warnings)?;
        r.map_err(|e| to_pyerr(py, e))
    }

    fn step_detached<R: Send>(
        &self,
        py: Python<'_>,
        detach: bool,
        f: impl FnOnce(&mut Kvm) -> Result<R, KvmError> + Send,
    ) -> PyResult<R> {
        let run = |core: &mut Kvm| {
            let r = f(core);
            (r, core.take_warnings())
        };
        let (r, warnings) = if detach {
            py.detach(|| run(&mut self.core.lock().unwrap_or_else(|e| e.into_inner())))
        } else {
            run(&mut self.core(py))
        };
        emit_warnings(py, &warnings)?;
        r.map_err(|e| to_pyerr(py, e))
    }

    /// Runs a whole operation under slots_lock and mmu_lock (taken in that
    /// order, as native acquisitions); None if this thread holds either.
    pub(super) fn locked_op<R: Send>(
        &self,
        py: Python<'_>,
        detach: bool,
        f: impl FnOnce(&mut Kvm) -> R + Send,
    ) -> PyResult<Option<(R, Vec<crate::kvm::KvmWarning>)>> {
        let mode = if detach { Detach::Yes } else { Detach::No };
        self.locked_op_mode(py, mode, f)
    }

    fn locked_op_mode<R: Send>(
        &self,
        py: Python<'_>,
        mode: Detach,
        f: impl FnOnce(&mut Kvm) -> R + Send,
    ) -> PyResult<Option<(R, Vec<crate::kvm::KvmWarning>)>> {
        if self.slots_lock.held_by_current_thread() || self.mmu_lock.held_by_current_thread() {
            return Ok(None);
        }
        acquire(py, &self.slots_lock, NATIVE_IDENT)?;
        let _slots = ModelLockGuard::adopt(&self.slots_lock);
        acquire(py, &self.mmu_lock, NATIVE_IDENT)?;
        let _mmu = ModelLockGuard::adopt(&self.mmu_lock);
        let run = || {
            let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
            let r = f(&mut core);
            (r, core.take_warnings())
        };
        // Long work runs with the GIL released; nothing in it touches Python.
        Ok(Some(match mode {
            Detach::No => run(),
            Detach::Yes => py.detach(run),
            Detach::Interruptible => super::detach_interruptible(py, run)?,
        }))
    }
}

/// struct kvm_userspace_memory_region2 from the binding's arguments (the
/// one integer rule per field, errors naming it).
#[allow(clippy::too_many_arguments)]
fn region_arg(
    slot: &Bound<'_, PyAny>,
    flags: &Bound<'_, PyAny>,
    guest_phys_addr: &Bound<'_, PyAny>,
    memory_size: &Bound<'_, PyAny>,
    userspace_addr: &Bound<'_, PyAny>,
    guest_memfd: &Bound<'_, PyAny>,
    guest_memfd_offset: &Bound<'_, PyAny>,
) -> PyResult<UserspaceMemoryRegion> {
    Ok(UserspaceMemoryRegion {
        slot: u32_arg(slot, "slot")?,
        flags: u32_arg(flags, "flags")?,
        guest_phys_addr: u64_arg(guest_phys_addr, "guest_phys_addr")?,
        memory_size: u64_arg(memory_size, "memory_size")?,
        userspace_addr: u64_arg(userspace_addr, "userspace_addr")?,
        guest_memfd: u32_arg(guest_memfd, "guest_memfd")?,
        guest_memfd_offset: u64_arg(guest_memfd_offset, "guest_memfd_offset")?,
    })
}

pub(super) fn emit_warnings(py: Python<'_>, warnings: &[crate::kvm::KvmWarning]) -> PyResult<()> {
    if warnings.is_empty() {
        return Ok(());
    }
    let category = py.import("memattr.locks")?.getattr("KvmWarning")?;
    for w in warnings {
        let msg = std::ffi::CString::new(w.text()).expect("no NUL in warning texts");
        PyErr::warn(py, &category, &msg, 2)?;
    }
    Ok(())
}

#[pymethods]
impl PyKvm {
    /// KVM_CREATE_VM for `vm_type`, over `store` (a RangeTree or an XArray,
    /// which also picks the hugepage tracking: runs, or the kernel's
    /// per-hugepage arrays with the per-page store).
    #[new]
    #[pyo3(signature = (vm_type, store, semantics, attr_memory_limit, guest_memfd_max_order, host=None))]
    fn new(
        py: Python<'_>,
        vm_type: &Bound<'_, PyAny>,
        store: &Bound<'_, PyAny>,
        semantics: &str,
        attr_memory_limit: Option<&Bound<'_, PyAny>>,
        guest_memfd_max_order: &Bound<'_, PyAny>,
        host: Option<HostTuple>,
    ) -> PyResult<Self> {
        let vm_type = u64_arg(vm_type, "vm_type")?;
        let (shared, per_page) = shared_store(store)?;
        // One VM per store: the VM's hugepage tracking and TDP page tables
        // mirror its store, so a store shared by two VMs (or passed to one
        // twice) would change under the other's feet. (The Python object
        // holds one reference, this call's `shared` another.)
        if std::sync::Arc::strong_count(&shared) > 2 {
            return Err(PyValueError::new_err(
                "store already belongs to another Kvm: each VM needs its own store",
            ));
        }
        let semantics = semantics_arg(semantics)?;
        let host = match host {
            Some(t) => host_from_tuple(t)?,
            None => HostProfile::default(),
        };
        let limit = match attr_memory_limit {
            Some(l) if !l.is_none() => {
                Some(usize::try_from(u64_arg(l, "attr_memory_limit")?).unwrap_or(usize::MAX))
            }
            _ => None,
        };
        let order = u64_arg(guest_memfd_max_order, "guest_memfd_max_order")?;
        let order = u32::try_from(order).unwrap_or(u32::MAX);
        let mut core = Kvm::with_host(host, vm_type, semantics, shared, per_page, limit, order)
            .map_err(|e| to_pyerr(py, e))?;
        // gmem in-place: each guest_memfd's attributes in the VM's kind of store.
        core.inplace.store_kind = super::stores::store_kind(store);
        Ok(Self {
            core: Mutex::new(core),
            slots_lock: Arc::new(ModelLock::new("slots_lock")),
            mmu_lock: Arc::new(ModelLock::new("mmu_lock")),
            store: store.clone().unbind(),
            native_set: AtomicBool::new(true),
            set_driver: Mutex::new(None),
            fault_driver: Mutex::new(None),
        })
    }

    /// The host profile the VM runs on, as plain data.
    #[getter]
    fn host(&self, py: Python<'_>) -> HostTuple {
        host_to_tuple(&self.core(py).config.host)
    }

    #[getter]
    fn store(&self, py: Python<'_>) -> Py<PyAny> {
        self.store.clone_ref(py)
    }

    #[getter]
    fn slots_lock(&self) -> PyModelLock {
        PyModelLock {
            inner: Arc::clone(&self.slots_lock),
        }
    }

    #[getter]
    fn mmu_lock(&self) -> PyModelLock {
        PyModelLock {
            inner: Arc::clone(&self.mmu_lock),
        }
    }

    /// (vm_type, has_private_mem, has_protected_state, supported attributes,
    /// address spaces, has_readonly_mem).
    #[getter]
    fn config(&self, py: Python<'_>) -> (u64, bool, bool, u64, usize, bool) {
        let c = self.core(py).config;
        (
            c.vm_type,
            c.has_private_mem,
            c.has_protected_state,
            c.supported_attributes(),
            c.nr_memslot_as_ids(),
            c.has_readonly_mem(),
        )
    }

    /// The MMU knobs: (host_mapping_level, slot_zap_all,
    /// invalidate_straddling_hugepages, eager_page_split, pml).
    #[getter]
    fn mmu_params(&self, py: Python<'_>) -> (u8, bool, bool, bool, bool) {
        let m = self.core(py).mmu;
        (
            m.host_mapping_level,
            m.slot_zap_all,
            m.invalidate_straddling_hugepages,
            m.eager_page_split,
            m.pml,
        )
    }

    /// Sets one MMU knob by name.
    fn set_mmu_param(&self, py: Python<'_>, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut core = self.core(py);
        let m = &mut core.mmu;
        match name {
            "host_mapping_level" => {
                let v = u64_arg(value, name)?;
                if !(1..=3).contains(&v) {
                    return Err(PyValueError::new_err(format!(
                        "host_mapping_level must be 1, 2 or 3, got {v}"
                    )));
                }
                m.host_mapping_level = v as u8;
            }
            "slot_zap_all" => m.slot_zap_all = bool_arg(value, name)?,
            "invalidate_straddling_hugepages" => {
                m.invalidate_straddling_hugepages = bool_arg(value, name)?
            }
            "eager_page_split" => m.eager_page_split = bool_arg(value, name)?,
            "pml" => m.pml = bool_arg(value, name)?,
            _ => return Err(PyValueError::new_err(format!("no MMU parameter {name:?}"))),
        }
        Ok(())
    }

    /// Bytes the attribute store may use (None: unlimited).
    fn set_attr_memory_limit(
        &self,
        py: Python<'_>,
        limit: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let limit = match limit {
            Some(l) if !l.is_none() => {
                Some(usize::try_from(u64_arg(l, "attr_memory_limit")?).unwrap_or(usize::MAX))
            }
            _ => None,
        };
        self.core(py).config.attr_memory_limit = limit;
        Ok(())
    }

    #[getter]
    fn manual_dirty_log_protect(&self, py: Python<'_>) -> u64 {
        self.core(py).manual_dirty_log_protect
    }

    /// Every counter, as `memattr.stats.Stats` names them.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (c, mapped) = {
            let core = self.core(py);
            (core.counters, core.mapped())
        };
        let d = PyDict::new(py);
        d.set_item("set_calls", c.set_calls)?;
        d.set_item("conversions", c.conversions)?;
        d.set_item("noop_conversions", c.noop_conversions)?;
        d.set_item("pages_converted", c.pages_converted)?;
        d.set_item("failed_calls", c.failed_calls)?;
        d.set_item("enomem", c.enomem)?;
        d.set_item("pre_set_ranges", c.pre_set_ranges)?;
        d.set_item("zapped_ranges", c.zapped_ranges)?;
        d.set_item("post_set_ranges", c.post_set_ranges)?;
        d.set_item("tlb_flushes", c.tlb_flushes)?;
        d.set_item("mmu_lock_acquisitions", c.mmu_lock_acquisitions)?;
        d.set_item("memslot_updates", c.memslot_updates)?;
        d.set_item("gmem_holes_punched", c.gmem_holes_punched)?;
        d.set_item("gmem_closed", c.gmem_closed)?;
        d.set_item("faults", c.faults)?;
        d.set_item("fault_retries", c.fault_retries)?;
        d.set_item("memory_fault_exits", c.memory_fault_exits)?;
        d.set_item("mmio_faults", c.mmio_faults)?;
        let per_level = |v: [u64; 3]| -> PyResult<Bound<'py, PyDict>> {
            let d = PyDict::new(py);
            for (i, n) in v.iter().enumerate() {
                d.set_item(i + 1, n)?;
            }
            Ok(d)
        };
        d.set_item("zapped_pages", per_level(c.zapped_pages)?)?;
        d.set_item("mapped", per_level(mapped)?)?;
        Ok(d)
    }

    /// (mmu_invalidate_seq, in_progress, range_start, range_end).
    #[getter]
    fn inval(&self, py: Python<'_>) -> (u64, u64, u64, u64) {
        let i = self.core(py).inval;
        (i.seq, i.in_progress, i.range_start, i.range_end)
    }

    // --- capabilities ------------------------------------------------------------

    /// kvm_vm_ioctl()'s switch as this host's KVM was built: OSError ENOTTY
    /// if the case of `ioctl` (``"set_memory_attributes"`` or
    /// ``"create_guest_memfd"``) is compiled out. The ioctl front end asks
    /// before it copies the argument in, as the kernel does.
    fn vm_ioctl_compiled_in(&self, py: Python<'_>, ioctl: &str) -> PyResult<()> {
        use crate::kvm::caps::BuildDependentIoctl;
        let which = match ioctl {
            "set_memory_attributes" => BuildDependentIoctl::SetMemoryAttributes,
            "create_guest_memfd" => BuildDependentIoctl::CreateGuestMemfd,
            other => {
                return Err(PyValueError::new_err(format!(
                    "ioctl must be 'set_memory_attributes' or 'create_guest_memfd', got {other:?}"
                )))
            }
        };
        let r = self.core(py).kvm_vm_ioctl_compiled_in(which);
        r.map_err(|e| to_pyerr(py, e))
    }

    fn check_extension(&self, py: Python<'_>, cap: &Bound<'_, PyAny>) -> PyResult<u64> {
        let cap = i64_arg(cap, "cap")?;
        Ok(self.core(py).check_extension(cap))
    }

    fn enable_cap(
        &self,
        py: Python<'_>,
        cap: &Bound<'_, PyAny>,
        flags: &Bound<'_, PyAny>,
        args: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let cap = u32_arg(cap, "cap")?;
        let flags = u32_arg(flags, "flags")?;
        if args.len() != 4 {
            return Err(PyValueError::new_err(format!(
                "args must hold 4 values (struct kvm_enable_cap), got {}",
                args.len()
            )));
        }
        let mut a = [0u64; 4];
        for (i, v) in args.iter().enumerate() {
            a[i] = u64_arg(v, &format!("args[{i}]"))?;
        }
        self.step(py, |k| k.enable_cap(cap, flags, a))
    }

    // --- memslots and guest_memfd (whole operations) ---------------------------

    /// KVM_SET_USER_MEMORY_REGION(2) under slots_lock and mmu_lock; False if
    /// this thread holds one of them (the caller reports it).
    #[pyo3(signature = (slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd, guest_memfd_offset, v1=false))]
    #[allow(clippy::too_many_arguments)]
    fn set_memory_region(
        &self,
        py: Python<'_>,
        slot: &Bound<'_, PyAny>,
        flags: &Bound<'_, PyAny>,
        guest_phys_addr: &Bound<'_, PyAny>,
        memory_size: &Bound<'_, PyAny>,
        userspace_addr: &Bound<'_, PyAny>,
        guest_memfd: &Bound<'_, PyAny>,
        guest_memfd_offset: &Bound<'_, PyAny>,
        v1: bool,
    ) -> PyResult<bool> {
        let mem = region_arg(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd,
            guest_memfd_offset,
        )?;
        self.whole(py, false, move |k| k.kvm_set_memory_region(&mem, v1))
    }

    /// KVM_CREATE_GUEST_MEMFD: the new fd.
    fn create_guest_memfd(
        &self,
        py: Python<'_>,
        size: &Bound<'_, PyAny>,
        flags: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        let size = u64_arg(size, "size")?;
        let flags = u64_arg(flags, "flags")?;
        self.step(py, |k| k.kvm_gmem_create(size, flags))
    }

    /// fallocate(2) on a guest_memfd; False if this thread holds a lock.
    fn guest_memfd_fallocate(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        mode: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let fd = u64_arg(fd, "fd")?;
        let mode = u32_arg(mode, "mode")? as u64;
        let offset = i64_arg(offset, "offset")?;
        let length = i64_arg(length, "length")?;
        self.whole(py, false, move |k| {
            k.kvm_gmem_fallocate(fd, mode, offset, length)
        })
    }

    /// fallocate(2)'s checks, for the Python driver: None when there is
    /// nothing to invalidate (an allocation), else the hole's bound gfn
    /// ranges as [(as_id, start, end)].
    fn gmem_fallocate_checks(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        mode: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Vec<(usize, u64, u64)>>> {
        let fd = u64_arg(fd, "fd")?;
        let mode = u32_arg(mode, "mode")? as u64;
        let offset = i64_arg(offset, "offset")?;
        let length = i64_arg(length, "length")?;
        self.step(py, |k| {
            k.kvm_gmem_fallocate_checks(fd, mode, offset, length)
        })
    }

    /// truncate_inode_pages_range() for a hole whose checks passed.
    fn truncate_inode_pages_range(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let fd = u64_arg(fd, "fd")?;
        let offset = u64_arg(offset, "offset")?;
        let length = u64_arg(length, "length")?;
        self.core(py).truncate_inode_pages_range(fd, offset, length);
        Ok(())
    }

    fn note_gmem_hole_punched(&self, py: Python<'_>) {
        self.core(py).note_gmem_hole_punched();
    }

    /// kvm_gmem_release() up to its invalidation, for the Python driver
    /// (slots_lock held): the whole file's gfn ranges, or None if a
    /// mapping keeps the file (only the fd went).
    fn gmem_release_detach(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Vec<(usize, u64, u64)>>> {
        let fd = u64_arg(fd, "fd")?;
        self.step(py, |k| k.kvm_gmem_release_detach(fd))
    }

    fn note_gmem_closed(&self, py: Python<'_>) {
        self.core(py).note_gmem_closed();
    }

    /// __kvm_set_memory_region() as one step, for the Python driver, which
    /// holds slots_lock (the model's commit is atomic: it stands for the
    /// kernel's zap under mmu_lock and the memslot swap).
    #[pyo3(signature = (slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd, guest_memfd_offset, v1=false))]
    #[allow(clippy::too_many_arguments)]
    fn set_memory_region_step(
        &self,
        py: Python<'_>,
        slot: &Bound<'_, PyAny>,
        flags: &Bound<'_, PyAny>,
        guest_phys_addr: &Bound<'_, PyAny>,
        memory_size: &Bound<'_, PyAny>,
        userspace_addr: &Bound<'_, PyAny>,
        guest_memfd: &Bound<'_, PyAny>,
        guest_memfd_offset: &Bound<'_, PyAny>,
        v1: bool,
    ) -> PyResult<()> {
        let mem = region_arg(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd,
            guest_memfd_offset,
        )?;
        self.step(py, move |k| k.kvm_set_memory_region(&mem, v1))
    }

    /// A file operation on a guest_memfd that always fails (its errno).
    fn guest_memfd_file_op(&self, py: Python<'_>, fd: &Bound<'_, PyAny>, op: &str) -> PyResult<()> {
        let fd = u64_arg(fd, "fd")?;
        let op = GmemFileOp::from_name(op).ok_or_else(|| {
            PyValueError::new_err(format!(
                "op must be read, write, pread, pwrite, lseek, ftruncate, fsync or ioctl, got {op:?}"
            ))
        })?;
        self.step(py, |k| k.kvm_gmem_file_op(fd, op))
    }

    /// fstat(2) of a guest_memfd: (mode, size, blksize, blocks, nlink).
    fn guest_memfd_fstat(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
    ) -> PyResult<(u32, u64, u64, u64, u64)> {
        let fd = u64_arg(fd, "fd")?;
        let st = self.step(py, |k| k.kvm_gmem_fstat(fd))?;
        Ok((st.mode, st.size, st.blksize, st.blocks, st.nlink))
    }

    /// mmap(2) of a guest_memfd (the checks of kvm_gmem_mmap).
    fn guest_memfd_mmap(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        shared: bool,
    ) -> PyResult<()> {
        let fd = u64_arg(fd, "fd")?;
        self.step(py, |k| k.kvm_gmem_mmap(fd, shared))
    }

    /// A host read through a guest_memfd mapping (GuestMemfdSigbus where
    /// the kernel sends SIGBUS).
    fn guest_memfd_user_read<'py>(
        &self,
        py: Python<'py>,
        fd: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        length: &Bound<'_, PyAny>,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let fd = u64_arg(fd, "fd")?;
        let offset = u64_arg(offset, "offset")?;
        let length = u64_arg(length, "length")?;
        let data = self.step(py, |k| k.kvm_gmem_user_read(fd, offset, length))?;
        Ok(pyo3::types::PyBytes::new(py, &data))
    }

    /// A host write through a guest_memfd mapping.
    fn guest_memfd_user_write(
        &self,
        py: Python<'_>,
        fd: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        data: &[u8],
    ) -> PyResult<()> {
        let fd = u64_arg(fd, "fd")?;
        let offset = u64_arg(offset, "offset")?;
        let data = data.to_vec();
        self.step(py, move |k| k.kvm_gmem_user_write(fd, offset, &data))
    }

    /// close(2) of a guest_memfd; False if this thread holds a lock.
    fn guest_memfd_close(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        let fd = u64_arg(fd, "fd")?;
        self.whole(py, false, move |k| k.kvm_gmem_release(fd))
    }

    /// This VM's open guest_memfd files: [(fd, size, flags, [(first_page,
    /// end_page, as_id, slot id)])].
    fn guest_memfds(&self, py: Python<'_>) -> Vec<(u64, u64, u64, Vec<(u64, u64, usize, u16)>)> {
        self.core(py)
            .guest_memfds()
            .map(|f| {
                (
                    f.fd,
                    f.size,
                    f.flags,
                    f.bindings
                        .iter()
                        .map(|(&s, &(e, a, i))| (s, e, a, i))
                        .collect(),
                )
            })
            .collect()
    }

    // --- memslots (readers) --------------------------------------------------------

    /// Every memslot as (id, as_id, base_gfn, npages, userspace_addr, flags,
    /// guest_memfd, guest_memfd_offset, gmem_open, serial), address space by
    /// address space in gfn order, and the memslot generation.
    fn memslots<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, u64)> {
        let (infos, gen): (Vec<MemslotInfo>, u64) = {
            let core = self.core(py);
            (
                core.memslots().iter().map(|s| s.info).collect(),
                core.memslots().generation,
            )
        };
        let list = PyList::empty(py);
        for m in &infos {
            list.append(memslot_tuple(m))?;
        }
        Ok((list, gen))
    }

    #[getter]
    fn memslot_generation(&self, py: Python<'_>) -> u64 {
        self.core(py).memslots().generation
    }

    #[getter]
    fn nr_memslot_pages(&self, py: Python<'_>) -> u64 {
        self.core(py).memslots().nr_memslot_pages
    }

    /// gfn_to_memslot(): the slot tuple holding `gfn` in `as_id`, or None.
    fn find_memslot(
        &self,
        py: Python<'_>,
        as_id: usize,
        gfn: &Bound<'_, PyAny>,
    ) -> PyResult<Option<(u16, usize, u64, u64, u64, u32, Option<u64>, u64, bool, u64)>> {
        let gfn = u64_arg(gfn, "gfn")?;
        let core = self.core(py);
        let ms = core.memslots();
        Ok(ms
            .find(as_id, gfn)
            .map(|i| memslot_tuple(&ms.address_space(as_id)[i].info)))
    }

    /// id_to_memslot(): the slot tuple, or None.
    fn get_memslot(
        &self,
        py: Python<'_>,
        as_id: usize,
        id: u16,
    ) -> Option<(u16, usize, u64, u64, u64, u32, Option<u64>, u64, bool, u64)> {
        let core = self.core(py);
        let ms = core.memslots();
        ms.index_of_id(as_id, id)
            .map(|i| memslot_tuple(&ms.address_space(as_id)[i].info))
    }

    // --- KVM_SET_MEMORY_ATTRIBUTES: the whole operation ------------------------

    /// Whether the set may run whole in the core (no hooks, not v11).
    fn set_native_set(&self, on: bool) {
        self.native_set.store(on, Ordering::SeqCst);
    }

    /// The Vm's set driver, as a `weakref.WeakMethod`.
    fn set_set_driver(&self, driver: Py<PyAny>) {
        *self.set_driver.lock().unwrap_or_else(|e| e.into_inner()) = Some(driver);
    }

    /// `Vm.set_memory_attributes` itself (the Vm binds it as the method, so a
    /// call costs no Python frame): the whole ioctl here when it may run
    /// whole, else the Vm's driver, which runs it step by step.
    #[pyo3(signature = (address, size, attributes, flags = SetFlags(0)))]
    fn set_memory_attributes_or_drive(
        &self,
        py: Python<'_>,
        address: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        attributes: &Bound<'_, PyAny>,
        flags: SetFlags,
    ) -> PyResult<()> {
        let flags = flags.0;
        if self.native_set.load(Ordering::Relaxed) && !SCHED_HOOKED.load(Ordering::Relaxed) {
            let address = u64_arg(address, "address")?;
            let size = u64_arg(size, "size")?;
            let attributes = u64_arg(attributes, "attributes")?;
            if self.set_whole(py, address, size, attributes, flags)? {
                return Ok(());
            }
        }
        call_driver(py, &self.set_driver, (address, size, attributes, flags))?;
        Ok(())
    }

    /// The MMU's retry loop, as a `weakref.WeakMethod`.
    fn set_fault_driver(&self, driver: Py<PyAny>) {
        *self.fault_driver.lock().unwrap_or_else(|e| e.into_inner()) = Some(driver);
    }

    /// The one fault entry: `Vm.fault` itself (bound as the method, so a
    /// fault costs no Python frame) and what `X86Mmu.fault` calls. The whole
    /// fault here when nothing races with it, else the MMU's retry loop (a
    /// retry is due, this thread holds a modelled lock, or an explorer
    /// interleaves the steps). `write` is validated but, as in the kernel's
    /// memory-fault exit, not reported.
    #[pyo3(signature = (gpa, private = PrivateParam(false), write = WriteParam(false), *, as_id = AsIdParam(0)))]
    fn fault_or_drive(
        &self,
        py: Python<'_>,
        gpa: &Bound<'_, PyAny>,
        private: PrivateParam,
        write: WriteParam,
        as_id: AsIdParam,
    ) -> PyResult<Py<PyAny>> {
        let _ = write.0;
        let gpa = u64_arg(gpa, "gpa")?;
        let (private, as_id) = (private.0, as_id.0);
        let first = SCHED_HOOKED.load(Ordering::Relaxed);
        if !first {
            let level = self.fault_whole(py, gpa, private, as_id)?;
            if level >= 0 {
                return Ok(level.into_pyobject(py)?.into_any().unbind());
            }
        }
        call_driver(py, &self.fault_driver, (gpa, private, as_id, first))
    }

    // --- KVM_SET_MEMORY_ATTRIBUTES: steps for the Python driver -----------------

    /// The ioctl's checks; the gfn range.
    fn set_checks(
        &self,
        py: Python<'_>,
        address: &Bound<'_, PyAny>,
        size: &Bound<'_, PyAny>,
        attributes: &Bound<'_, PyAny>,
        flags: &Bound<'_, PyAny>,
    ) -> PyResult<(u64, u64)> {
        let address = u64_arg(address, "address")?;
        let size = u64_arg(size, "size")?;
        let attributes = u64_arg(attributes, "attributes")?;
        let flags = u64_arg(flags, "flags")?;
        self.step(py, |k| {
            k.kvm_vm_ioctl_set_mem_attributes_checks(address, size, attributes, flags)
        })
    }

    /// Early exit (True) or reserve.
    fn set_reserve(&self, py: Python<'_>, start: u64, end: u64, attributes: u64) -> PyResult<bool> {
        if end - start >= INTERRUPTIBLE_BYTES >> 12 {
            return self.step_interruptible(py, |k| {
                k.kvm_vm_set_mem_attributes_reserve(start, end, attributes)
            });
        }
        let detach = end - start >= DETACH_BYTES >> 12;
        self.step_detached(py, detach, |k| {
            k.kvm_vm_set_mem_attributes_reserve(start, end, attributes)
        })
    }

    fn release_reservations(&self, py: Python<'_>) -> PyResult<()> {
        self.step(py, |k| {
            k.release_reservations();
            Ok(())
        })
    }

    /// The memslot-clipped ranges: [(as_id, index, serial, start, end)].
    fn clip_gfn_ranges(&self, py: Python<'_>, start: u64, end: u64) -> Vec<Memslot5> {
        let mut out = Vec::new();
        self.core(py).clip_gfn_ranges(start, end, &mut out);
        out.into_iter()
            .map(|r| (r.as_id, r.index, r.serial, r.start, r.end))
            .collect()
    }

    fn invalidate_begin(&self, py: Python<'_>) -> PyResult<()> {
        self.step(py, |k| {
            k.kvm_mmu_invalidate_begin();
            Ok(())
        })
    }

    fn invalidate_range_add(&self, py: Python<'_>, start: u64, end: u64) -> PyResult<()> {
        self.step(py, |k| {
            k.kvm_mmu_invalidate_range_add(start, end);
            Ok(())
        })
    }

    fn invalidate_end(&self, py: Python<'_>) -> PyResult<()> {
        self.step(py, |k| k.kvm_mmu_invalidate_end())
    }

    /// The write half of kvm_mmu_invalidate_begin()'s `in_progress++`, given
    /// what the read half saw (the read is `inval[1]`): the explorer's split
    /// read-modify-write.
    fn invalidate_begin_write(&self, py: Python<'_>, in_progress_read: u64) -> PyResult<()> {
        self.step(py, |k| {
            k.kvm_mmu_invalidate_begin_write(in_progress_read);
            Ok(())
        })
    }

    /// The write half of kvm_mmu_invalidate_end()'s `seq++` (read: `inval[0]`).
    fn invalidate_end_seq_write(&self, py: Python<'_>, seq_read: u64) -> PyResult<()> {
        self.step(py, |k| {
            k.kvm_mmu_invalidate_end_seq_write(seq_read);
            Ok(())
        })
    }

    /// The write half of kvm_mmu_invalidate_end()'s `in_progress--` and its
    /// checks (read: `inval[1]`).
    fn invalidate_end_write(&self, py: Python<'_>, in_progress_read: u64) -> PyResult<()> {
        self.step(py, |k| k.kvm_mmu_invalidate_end_write(in_progress_read))
    }

    /// kvm_mmu_unmap_gfn_range() (mmu_lock held by the caller): True if a
    /// flush is due.
    /// `attr_filter`: kvm_gfn_range.attr_filter (KVM_FILTER_SHARED |
    /// KVM_FILTER_PRIVATE by default; guest_memfd's invalidation passes
    /// gmem_invalidate_filter()).
    #[pyo3(signature = (as_id, start, end, attr_filter=3))]
    fn mmu_unmap_gfn_range(
        &self,
        py: Python<'_>,
        as_id: usize,
        start: u64,
        end: u64,
        attr_filter: u64,
    ) -> PyResult<bool> {
        self.step(py, |k| {
            k.kvm_mmu_unmap_gfn_range(as_id, start, end, attr_filter)
        })
    }

    /// kvm_gmem_get_invalidate_filter() for file pages [start, end) of
    /// `fd` (a query: nothing counted).
    fn gmem_invalidate_filter(&self, py: Python<'_>, fd: u64, start: u64, end: u64) -> u64 {
        self.core(py).kvm_gmem_get_invalidate_filter(fd, start, end)
    }

    /// Whether the leaf mapping `gfn` in `as_id` was installed by a
    /// private fault (None: unmapped).
    fn mapped_private(&self, py: Python<'_>, as_id: usize, gfn: u64) -> Option<bool> {
        self.core(py).mapped_private(as_id, gfn)
    }

    /// kvm_pre_set_memory_attributes() for one range: True if a flush is due.
    fn pre_set(&self, py: Python<'_>, rng: Memslot5, attributes: u64) -> PyResult<bool> {
        self.step(py, |k| {
            k.kvm_pre_set_memory_attributes(&gfn_range(rng), attributes)
        })
    }

    fn set_store(&self, py: Python<'_>, start: u64, end: u64, attributes: u64) -> PyResult<()> {
        let detach = end - start >= DETACH_BYTES >> 12;
        self.step_detached(py, detach, |k| {
            k.kvm_set_mem_attributes_store(start, end, attributes)
        })
    }

    fn post_set(&self, py: Python<'_>, rng: Memslot5, attributes: u64) -> PyResult<()> {
        self.step(py, |k| {
            k.kvm_post_set_memory_attributes(&gfn_range(rng), attributes)
        })
    }

    fn flush_remote_tlbs(&self, py: Python<'_>) {
        self.core(py).kvm_flush_remote_tlbs();
    }

    fn note_mmu_lock(&self, py: Python<'_>) {
        self.core(py).note_mmu_lock();
    }

    fn note_failed_set(&self, py: Python<'_>) {
        self.core(py).note_failed_set();
    }

    // --- faults ------------------------------------------------------------------

    /// kvm_faultin_pfn(): (0 retry | 1 MMIO | 2 map, mmu_seq, serial).
    fn faultin(
        &self,
        py: Python<'_>,
        gpa: u64,
        private: bool,
        as_id: usize,
        first: bool,
    ) -> PyResult<(u8, u64, u64)> {
        Ok(
            match self.step(py, |k| k.kvm_faultin_pfn(gpa, private, as_id, first))? {
                FaultIn::Retry => (0, 0, 0),
                FaultIn::Mmio => (1, 0, 0),
                FaultIn::Map { mmu_seq, serial } => (2, mmu_seq, serial),
            },
        )
    }

    /// The mapping half under mmu_lock (held by the caller): the level, or
    /// None if the fault is stale.
    fn tdp_map(
        &self,
        py: Python<'_>,
        gpa: u64,
        private: bool,
        as_id: usize,
        mmu_seq: u64,
        serial: u64,
    ) -> PyResult<Option<u8>> {
        self.step(py, |k| k.kvm_tdp_map(gpa, private, as_id, mmu_seq, serial))
    }

    // --- inspection ----------------------------------------------------------------

    fn max_mapping_level(
        &self,
        py: Python<'_>,
        as_id: usize,
        gfn: &Bound<'_, PyAny>,
    ) -> PyResult<u8> {
        let gfn = u64_arg(gfn, "gfn")?;
        self.step(py, |k| k.max_mapping_level(as_id, gfn))
    }

    fn hugepage_mixed(
        &self,
        py: Python<'_>,
        slot: &Bound<'_, PyAny>,
        gfn: &Bound<'_, PyAny>,
        level: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let (slot, gfn) = (u64_arg(slot, "slot")?, u64_arg(gfn, "gfn")?);
        let level = u64_arg(level, "level")?;
        self.step(py, |k| k.hugepage_mixed(slot, gfn, level))
    }

    /// The mixed hugepages of a memslot at `level`, as gfn runs.
    fn mixed_runs(
        &self,
        py: Python<'_>,
        slot: &Bound<'_, PyAny>,
        level: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<(u128, u128)>> {
        let (slot, level) = (u64_arg(slot, "slot")?, u64_arg(level, "level")?);
        let runs = self.step(py, |k| k.mixed_runs(slot, level))?;
        // Valid here: the core accepted the level.
        let shift = crate::hugepage::hpage_gfn_shift(level as u8);
        Ok(runs
            .into_iter()
            .map(|(s, e)| ((s as u128) << shift, (e as u128) << shift))
            .collect())
    }

    fn mapped_level(&self, py: Python<'_>, as_id: usize, gfn: u64) -> u8 {
        self.core(py).mapped_level(as_id, gfn)
    }

    fn mappings(
        &self,
        py: Python<'_>,
        as_id: usize,
        level: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<(u64, u64)>> {
        let level = u64_arg(level, "level")?;
        self.step(py, |k| k.mappings(as_id, level))
    }

    // --- replay --------------------------------------------------------------------

    /// Runs trace operations (one array per record field) natively under the
    /// VM's locks until one a batch does not run (see
    /// `crate::kvm::replay::replay`); fallocate operations carry live fds.
    /// Returns None if this thread holds a modelled lock, else a dict: `done`
    /// (operations run), the tally, `errors` ({errno: count}) and `bug`
    /// (None, or the model inconsistency that stopped the batch).
    #[allow(clippy::too_many_arguments)]
    fn replay<'py>(
        &self,
        py: Python<'py>,
        kind: PyReadonlyArray1<'py, u8>,
        gpa: PyReadonlyArray1<'py, u64>,
        size: PyReadonlyArray1<'py, u64>,
        attributes: PyReadonlyArray1<'py, u64>,
        arg: PyReadonlyArray1<'py, u64>,
        flags: PyReadonlyArray1<'py, u8>,
        mut results: PyReadwriteArray1<'py, i64>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let results = results
            .as_slice_mut()
            .map_err(|_| PyValueError::new_err("results must be a contiguous int64 array"))?;
        let n = results.len();
        let contiguous =
            |name: &str| PyValueError::new_err(format!("{name} must be a contiguous array"));
        let ops = OpColumns::new(
            kind.as_slice().map_err(|_| contiguous("kind"))?,
            gpa.as_slice().map_err(|_| contiguous("gpa"))?,
            size.as_slice().map_err(|_| contiguous("size"))?,
            attributes
                .as_slice()
                .map_err(|_| contiguous("attributes"))?,
            arg.as_slice().map_err(|_| contiguous("arg"))?,
            flags.as_slice().map_err(|_| contiguous("flags"))?,
        )
        .and_then(|ops| match ops.len() {
            len if len == n => Ok(ops),
            len => Err(("kind", len)),
        })
        .map_err(|(name, len)| {
            PyValueError::new_err(format!("{name} has {len} elements, results has {n}"))
        })?;
        // The whole batch runs with the GIL released: no hook, no Python.
        let outcome = self.locked_op(py, true, |k| {
            let mut tally = ReplayTally::default();
            let ran = replay(k, &ops, results, &mut tally);
            (ran, tally)
        })?;
        let Some(((ran, tally), warnings)) = outcome else {
            return Ok(None);
        };
        emit_warnings(py, &warnings)?;
        let (done, bug) = match ran {
            Ok(done) => (done, None),
            // The operation that hit the bug did not finish: the ones before
            // it did.
            Err(e) => (tally.ops as usize, Some(e.to_string())),
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
        d.set_item("bug", bug)?;
        Ok(Some(d))
    }
}

impl PyKvm {
    /// A whole operation under the VM's locks: True when it ran (its error,
    /// if any, raised), False if this thread holds a modelled lock.
    pub(super) fn whole(
        &self,
        py: Python<'_>,
        detach: bool,
        f: impl FnOnce(&mut Kvm) -> Result<(), KvmError> + Send,
    ) -> PyResult<bool> {
        let mode = if detach { Detach::Yes } else { Detach::No };
        self.whole_mode(py, mode, f)
    }

    fn whole_mode(
        &self,
        py: Python<'_>,
        mode: Detach,
        f: impl FnOnce(&mut Kvm) -> Result<(), KvmError> + Send,
    ) -> PyResult<bool> {
        match self.locked_op_mode(py, mode, f)? {
            None => Ok(false),
            Some((r, warnings)) => {
                emit_warnings(py, &warnings)?;
                r.map_err(|e| to_pyerr(py, e))?;
                Ok(true)
            }
        }
    }
}

/// The core's uapi constants, for `memattr.uapi`'s test of its own copy.
fn uapi_dict(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for &(name, value) in crate::kvm::uapi::ALL {
        d.set_item(name, value)?;
    }
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyKvm>()?;
    m.add_class::<PyModelLock>()?;
    m.add_function(wrap_pyfunction!(host_profile_default, m)?)?;
    m.add_function(wrap_pyfunction!(set_sched_hooked, m)?)?;
    m.add_function(wrap_pyfunction!(host_profile_check, m)?)?;
    m.add_function(wrap_pyfunction!(check_extension_system, m)?)?;
    m.add("UAPI", uapi_dict(m.py())?)?;
    Ok(())
}
