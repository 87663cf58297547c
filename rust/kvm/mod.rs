//! The KVM core: one VM's state and every kernel rule memattr models, each
//! written once, as a function named for the kernel's.
//!
//! ```text
//!   struct Kvm
//!   ├── config          VM type: private memory, protected state, attributes
//!   ├── store ─────────► kvm->mem_attr_array (RangeTree or XArray, shared
//!   │                    with the Python object `vm.store`)
//!   ├── memslots         kvm->memslots[as_id]: sorted by gfn, each with its
//!   │                    slot->arch hugepage tracker (memslots.rs)
//!   ├── gmem             the VM's guest_memfd files and their bindings
//!   │                    (guest_memfd.rs)
//!   ├── roots            one TDP root per address space (mmu.rs)
//!   ├── inval            mmu_invalidate_{seq,in_progress,range_*} (invalidate.rs)
//!   └── counters         what the VM did, as vm.stats reports it
//! ```
//!
//! Two drivers run these rules. The Python driver (`memattr.vm`) calls the
//! steps one at a time under the modelled locks (`crate::locks`), with the
//! hooks, v11's ordering and the lock checker between them. The native
//! driver runs whole operations built from the same steps
//! ([`Kvm::set_memory_attributes`], [`Kvm::fault`], [`replay::replay`]) when
//! nothing in Python needs to see them. Neither holds a copy of a rule.
//!
//! Every operation validates before it mutates: a failing call leaves the
//! state as it was (ENOMEM included: storage is reserved first).

pub mod attributes;
pub mod caps;
pub mod gmem_attributes;
pub mod gmem_mmap;
pub mod guest_memfd;
pub mod host;
pub mod invalidate;
pub mod memslots;
pub mod mmu;
pub mod replay;
pub mod uapi;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::hugepage::{HugepageError, TdpPageTable};
use crate::store::{AttrStore, StoreError};

pub use guest_memfd::GmemFile;
pub use host::{CpuVendor, HostProfile};
pub use invalidate::MmuInvalidation;
pub use memslots::{Memslot, MemslotInfo, Memslots};
pub use uapi::*;

/// The attribute store, shared with the Python object that exposes it
/// (`vm.store`). The core takes the write lock for each operation, or once
/// for a whole batch.
pub type SharedStore = Arc<RwLock<dyn AttrStore + Send + Sync>>;

/// Why an operation failed. Each maps to the errno the kernel returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmError {
    /// The ioctl (or file operation) fails with `errno`, for `why`.
    Errno { errno: i32, why: String },
    /// KVM_EXIT_MEMORY_FAULT (the ioctl returns EFAULT with kvm_run filled).
    MemoryFault { gpa: u64, size: u64, flags: u64 },
    /// A host access through a guest_memfd mapping that the kernel answers
    /// with SIGBUS (kvm_gmem_fault_user_mapping: past the file's end, or a
    /// page that is not shared): byte `offset` of guest_memfd `fd`;
    /// `private` for a page the in-place series holds private.
    Sigbus { fd: u64, offset: u64, private: bool },
    /// An argument of the model's own API (not a uapi field) is out of
    /// range: an address space, a level, a slot to inspect.
    Argument(String),
    /// The model found itself inconsistent (KVM_BUG_ON); never expected.
    Bug(String),
}

impl KvmError {
    pub fn errno(&self) -> i32 {
        match self {
            KvmError::Errno { errno, .. } => *errno,
            KvmError::MemoryFault { .. } | KvmError::Sigbus { .. } => EFAULT,
            KvmError::Argument(_) => EINVAL,
            KvmError::Bug(_) => EIO,
        }
    }
}

impl fmt::Display for KvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmError::Errno { why, .. } | KvmError::Argument(why) => f.write_str(why),
            KvmError::MemoryFault { gpa, size, flags } => write!(
                f,
                "KVM_EXIT_MEMORY_FAULT: gpa {gpa:#x} size {size:#x} flags {flags:#x}"
            ),
            KvmError::Sigbus {
                fd,
                offset,
                private,
            } => write!(
                f,
                "SIGBUS: guest_memfd {fd} offset {offset:#x} {}",
                if *private {
                    "is a private page"
                } else {
                    "cannot be faulted in by the host"
                }
            ),
            KvmError::Bug(why) => write!(f, "KVM_BUG_ON: {why}"),
        }
    }
}

/// `Err(KvmError::Errno { .. })` with a formatted reason.
///
/// Cold, as are [`bug`] and the error conversions below: a call to a cold
/// function marks the branch that makes it unlikely, so the optimizer moves
/// every error path out of the hot code of the set and fault paths.
#[cold]
#[inline(never)]
pub(crate) fn fail<T>(errno: i32, why: impl Into<String>) -> Result<T, KvmError> {
    Err(KvmError::Errno {
        errno,
        why: why.into(),
    })
}

/// `KvmError::Bug` from what a step found inconsistent. Cold: see [`fail`].
#[cold]
#[inline(never)]
pub(crate) fn bug(why: impl fmt::Display) -> KvmError {
    KvmError::Bug(why.to_string())
}

impl From<HugepageError> for KvmError {
    #[cold]
    #[inline(never)]
    fn from(e: HugepageError) -> Self {
        match e {
            HugepageError::Store(StoreError::OutOfMemory { .. }) => KvmError::Errno {
                errno: ENOMEM,
                why: e.to_string(),
            },
            _ => KvmError::Bug(e.to_string()),
        }
    }
}

/// Which semantics the VM follows where kernels differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantics {
    /// Linux 6.18 (the default): guest_memfd on every VM type, mmap-able
    /// guest_memfd (GUEST_MEMFD_FLAG_MMAP, _INIT_SHARED), the capabilities
    /// added since 6.8, access_ok() against TASK_SIZE_MAX, vfs_fallocate()'s
    /// exclusive modes.
    Linux618,
    /// Linux 6.8, the first kernel with this API.
    Linux68,
    /// The seed's RFC v11: mmu_invalidate_end after mmu_lock is dropped,
    /// KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES. Only the Python driver runs it
    /// (the ordering lives between steps).
    V11,
    /// The guest_memfd in-place conversion series, v8 (June 2026): per-file
    /// attributes and KVM_SET_MEMORY_ATTRIBUTES2 (gmem_attributes.rs).
    GmemInplace,
    /// The same series at v5 (April 2026): with content modes.
    GmemInplaceV5,
}

impl Semantics {
    /// A kernel after 6.8: 6.18, and the in-place series, which is built on
    /// it.
    pub fn after_6_8(self) -> bool {
        matches!(
            self,
            Semantics::Linux618 | Semantics::GmemInplace | Semantics::GmemInplaceV5
        )
    }
}

/// What the VM was created with (KVM_CREATE_VM and the Vm's options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmConfig {
    pub vm_type: u64,
    pub semantics: Semantics,
    /// The host the VM runs on.
    pub host: HostProfile,
    /// kvm_arch_has_private_mem().
    pub has_private_mem: bool,
    /// kvm->arch.has_protected_state.
    pub has_protected_state: bool,
    /// Bytes the attribute store may use (ENOMEM beyond).
    pub attr_memory_limit: Option<usize>,
    /// Largest guest_memfd folio order (caps private mappings).
    pub guest_memfd_max_order: u32,
    /// Which hugepage tracking memslots get: the kernel's per-hugepage
    /// lpage_info arrays (true, with the per-page store) or runs.
    pub per_page_trackers: bool,
}

impl KvmConfig {
    /// kvm_supported_mem_attributes().
    pub fn supported_attributes(&self) -> u64 {
        // gmem in-place: kvm_supported_vm_mem_attributes() is 0, PRIVATE
        // lives in guest_memfd (gmem_attributes.rs).
        if self.has_private_mem && !self.semantics.is_gmem_inplace() {
            KVM_MEMORY_ATTRIBUTE_PRIVATE
        } else {
            0
        }
    }

    /// kvm_arch_nr_memslot_as_ids(): SMM is unsupported for guests with
    /// private memory, so they get one address space; a host built without
    /// SMM has one for every VM.
    pub fn nr_memslot_as_ids(&self) -> usize {
        if self.has_private_mem {
            1
        } else {
            self.host.max_nr_address_spaces()
        }
    }

    /// Is this a kernel after 6.8 (the 6.18 rules)?
    pub fn is_618(&self) -> bool {
        self.semantics.after_6_8()
    }

    /// kvm_arch_has_readonly_mem(): not with protected state.
    pub fn has_readonly_mem(&self) -> bool {
        !self.has_protected_state
    }
}

/// The MMU model's knobs: module parameters and quirks of the x86 MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmuParams {
    /// host_pfn_mapping_level() for shared memory: 3 for hugetlbfs 1G, 2 for
    /// THP, 1 for 4K-only backing.
    pub host_mapping_level: u8,
    /// KVM_X86_QUIRK_SLOT_ZAP_ALL: deleting or moving a memslot zaps every
    /// root, not only the slot's gfns.
    pub slot_zap_all: bool,
    /// The fix for the attributes-vs-hugepage race (2025): the pre-set pass
    /// also invalidates the straddling head/tail hugepages. Off models the
    /// kernels from 6.8 up to that fix.
    pub invalidate_straddling_hugepages: bool,
    /// The eager_page_split module parameter.
    pub eager_page_split: bool,
    /// kvm->arch.cpu_dirty_log_size != 0 (Intel PML).
    pub pml: bool,
}

impl Default for MmuParams {
    fn default() -> Self {
        Self {
            host_mapping_level: crate::hugepage::PG_LEVEL_1G,
            slot_zap_all: true,
            invalidate_straddling_hugepages: true,
            eager_page_split: true,
            pml: false,
        }
    }
}

/// What the VM did, as `vm.stats` reports it. `mapped` counts live leaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// KVM_SET_MEMORY_ATTRIBUTES calls that passed validation.
    pub set_calls: u64,
    /// Calls that changed at least one page.
    pub conversions: u64,
    /// Early exits: the range already had the attributes.
    pub noop_conversions: u64,
    /// Pages in the ranges of calls that changed something.
    pub pages_converted: u64,
    /// Calls that failed (any errno), set calls only.
    pub failed_calls: u64,
    /// Reservation failures.
    pub enomem: u64,
    /// Memslot-clipped ranges handed to the pre-set pass.
    pub pre_set_ranges: u64,
    /// Of those, the ranges whose zap removed at least one mapping.
    pub zapped_ranges: u64,
    /// Memslot-clipped ranges handed to the post-set pass.
    pub post_set_ranges: u64,
    /// kvm_flush_remote_tlbs() calls.
    pub tlb_flushes: u64,
    pub mmu_lock_acquisitions: u64,
    /// Memslot creations, deletions, moves and flag changes.
    pub memslot_updates: u64,
    /// fallocate(PUNCH_HOLE) calls on a guest_memfd that succeeded.
    pub gmem_holes_punched: u64,
    /// guest_memfd files released.
    pub gmem_closed: u64,
    pub faults: u64,
    /// Faults told to retry (an invalidation raced with them).
    pub fault_retries: u64,
    /// KVM_EXIT_MEMORY_FAULT exits.
    pub memory_fault_exits: u64,
    /// Shared accesses outside every memslot (emulated MMIO).
    pub mmio_faults: u64,
    /// Leaves zapped, by level: index 0 = 4K, 1 = 2M, 2 = 1G.
    pub zapped_pages: [u64; 3],
    /// Live leaves, by level.
    pub mapped: [u64; 3],
}

/// A memslot-clipped piece of a range (struct kvm_gfn_range): the slot by
/// address space and index (valid while slots_lock is held) and its
/// identity, so a step can tell a stale range from a live one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GfnRange {
    pub as_id: usize,
    pub index: usize,
    pub serial: u64,
    pub start: u64,
    pub end: u64,
}

/// Warnings the kernel prints once (WARN_ON_ONCE) and survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmWarning {
    /// kvm_arch_pre_set_memory_attributes() on a VM without private memory.
    PreSetWithoutPrivateMem,
    /// kvm_arch_post_set_memory_attributes() on a VM without private memory.
    PostSetWithoutPrivateMem,
    /// kvm_mmu_invalidate_range_add() outside begin()/end().
    RangeAddOutsideInvalidation,
    /// mmu_invalidate_end() with no range added since begin().
    EndWithoutRange,
}

impl KvmWarning {
    pub const ALL: [KvmWarning; 4] = [
        KvmWarning::PreSetWithoutPrivateMem,
        KvmWarning::PostSetWithoutPrivateMem,
        KvmWarning::RangeAddOutsideInvalidation,
        KvmWarning::EndWithoutRange,
    ];

    pub fn text(self) -> &'static str {
        match self {
            KvmWarning::PreSetWithoutPrivateMem => {
                "kvm_arch_pre_set_memory_attributes() on a VM without private memory"
            }
            KvmWarning::PostSetWithoutPrivateMem => {
                "kvm_arch_post_set_memory_attributes() on a VM without private memory"
            }
            KvmWarning::RangeAddOutsideInvalidation => {
                "kvm_mmu_invalidate_range_add() outside begin()/end()"
            }
            KvmWarning::EndWithoutRange => {
                "mmu_invalidate_end() without any range added since begin()"
            }
        }
    }
}

/// One VM.
pub struct Kvm {
    pub config: KvmConfig,
    pub mmu: MmuParams,
    store: SharedStore,
    memslots: Memslots,
    /// One TDP root per address space.
    roots: Vec<TdpPageTable>,
    /// This VM's open guest_memfd files, by fd.
    gmem: BTreeMap<u64, GmemFile>,
    pub inval: MmuInvalidation,
    pub counters: Counters,
    /// kvm->manual_dirty_log_protect (KVM_ENABLE_CAP).
    pub manual_dirty_log_protect: u64,
    /// Identifies this VM to the process's guest_memfd table (gmem->kvm).
    id: u64,
    /// Warnings raised and not yet taken by the driver, in order.
    warnings: Vec<KvmWarning>,
    /// The WARN_ON_ONCE warnings already raised.
    warned: Vec<KvmWarning>,
    /// Reused by whole operations for their memslot-clipped ranges.
    scratch: Vec<GfnRange>,
    /// Per-guest_memfd attributes (the in-place conversion series).
    pub inplace: gmem_attributes::InplaceState,
    /// The store, while a batch holds its write lock
    /// ([`Kvm::with_store_held`]).
    held: Option<HeldStore>,
}

/// The store a batch has write-locked once for all its operations, so each
/// step reaches it without an atomic lock and unlock. Uncontended, those
/// cost about as much as a cache miss, and a replayed operation took five
/// to eight pairs of them.
struct HeldStore(NonNull<dyn AttrStore + Send + Sync>);

// SAFETY: `held` is only Some inside `Kvm::with_store_held`, whose closure
// has the only borrow of the Kvm (`&mut`) and may not swap it out, and the
// write guard the pointer came from lives on that call's stack until `held`
// is None again. No other thread can reach the Kvm, or the store through
// its lock, meanwhile.
unsafe impl Send for HeldStore {}
unsafe impl Sync for HeldStore {}

/// The store for writing: through the held lock, or locked for this step.
pub(crate) enum StoreWrite<'a> {
    Held(&'a mut (dyn AttrStore + Send + Sync + 'static)),
    Locked(RwLockWriteGuard<'a, dyn AttrStore + Send + Sync + 'static>),
}

/// The store for reading: through the held lock, or read-locked for this
/// step.
pub(crate) enum StoreRead<'a> {
    Held(&'a (dyn AttrStore + Send + Sync + 'static)),
    Locked(RwLockReadGuard<'a, dyn AttrStore + Send + Sync + 'static>),
}

impl Deref for StoreWrite<'_> {
    type Target = dyn AttrStore + Send + Sync + 'static;
    #[inline]
    fn deref(&self) -> &Self::Target {
        match self {
            StoreWrite::Held(s) => &**s,
            StoreWrite::Locked(g) => &**g,
        }
    }
}

impl DerefMut for StoreWrite<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            StoreWrite::Held(s) => &mut **s,
            StoreWrite::Locked(g) => &mut **g,
        }
    }
}

impl Deref for StoreRead<'_> {
    type Target = dyn AttrStore + Send + Sync + 'static;
    #[inline]
    fn deref(&self) -> &Self::Target {
        match self {
            StoreRead::Held(s) => *s,
            StoreRead::Locked(g) => &**g,
        }
    }
}

/// The store read-locked, or through the held lock: a function of the two
/// fields, so a step can read the store while it writes another field.
#[inline]
fn read_store<'a>(store: &'a SharedStore, held: &'a Option<HeldStore>) -> StoreRead<'a> {
    match held {
        // SAFETY: see HeldStore; shared access from `&Kvm` cannot overlap
        // the `&mut` access `Kvm::store` gives, which needs `&mut Kvm`.
        Some(h) => StoreRead::Held(unsafe { h.0.as_ref() }),
        None => StoreRead::Locked(store.read().unwrap_or_else(|e| e.into_inner())),
    }
}

impl fmt::Debug for Kvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kvm")
            .field("config", &self.config)
            .field("memslots", &self.memslots.len())
            .field("inval", &self.inval)
            .finish()
    }
}

impl Kvm {
    /// KVM_CREATE_VM on the default host ([`HostProfile::default`]).
    pub fn new(
        vm_type: u64,
        semantics: Semantics,
        store: SharedStore,
        per_page_trackers: bool,
        attr_memory_limit: Option<usize>,
        guest_memfd_max_order: u32,
    ) -> Result<Self, KvmError> {
        Self::with_host(
            HostProfile::default(),
            vm_type,
            semantics,
            store,
            per_page_trackers,
            attr_memory_limit,
            guest_memfd_max_order,
        )
    }

    /// KVM_CREATE_VM on `host` (kvm_arch_init_vm): EINVAL for a VM type
    /// the host does not support (kvm_caps.supported_vm_types).
    pub fn with_host(
        host: HostProfile,
        vm_type: u64,
        semantics: Semantics,
        store: SharedStore,
        per_page_trackers: bool,
        attr_memory_limit: Option<usize>,
        guest_memfd_max_order: u32,
    ) -> Result<Self, KvmError> {
        host.validate()?;
        let supported = host.supported_vm_types(semantics);
        let known = caps::x86_vm_type(vm_type);
        let Some((has_private_mem, has_protected_state)) =
            known.filter(|_| vm_type < 64 && supported & (1 << vm_type) != 0)
        else {
            return fail(
                EINVAL,
                format!("VM type {vm_type} is not supported by this host (types {supported:#x})"),
            );
        };
        if guest_memfd_max_order > 18 {
            return Err(KvmError::Argument(format!(
                "guest_memfd_max_order must be <= 18 (1G), got {guest_memfd_max_order}"
            )));
        }
        let config = KvmConfig {
            vm_type,
            semantics,
            host,
            has_private_mem,
            has_protected_state,
            attr_memory_limit,
            guest_memfd_max_order,
            per_page_trackers,
        };
        let nr_as = config.nr_memslot_as_ids();
        Ok(Self {
            config,
            mmu: MmuParams {
                host_mapping_level: host.max_page_level,
                // The straddling-hugepage fix (April 2025, Cc stable) came
                // after 6.8.y's end of life: no 6.8 (or v11) kernel has it.
                invalidate_straddling_hugepages: semantics.after_6_8(),
                ..MmuParams::default()
            },
            store,
            memslots: Memslots::new(nr_as),
            // Only TDX's mirror root keeps private leaves apart
            // (kvm_has_mirrored_tdp).
            roots: (0..nr_as)
                .map(|_| {
                    if vm_type == KVM_X86_TDX_VM {
                        TdpPageTable::new()
                    } else {
                        TdpPageTable::without_kinds()
                    }
                })
                .collect(),
            gmem: BTreeMap::new(),
            inval: MmuInvalidation::default(),
            counters: Counters::default(),
            manual_dirty_log_protect: 0,
            id: guest_memfd::new_vm_id(),
            warnings: Vec::new(),
            warned: Vec::new(),
            scratch: Vec::new(),
            inplace: Default::default(),
            held: None,
        })
    }

    /// The store, write-locked (or through the lock a batch holds). A
    /// poisoned lock still holds a consistent store: every store operation
    /// validates before it mutates.
    #[inline]
    fn store(&mut self) -> StoreWrite<'_> {
        match &mut self.held {
            // SAFETY: see HeldStore; `&mut self` makes this the only access.
            Some(h) => StoreWrite::Held(unsafe { h.0.as_mut() }),
            None => StoreWrite::Locked(self.store.write().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// Whether a [`Kvm::with_store_held`] call is running.
    pub fn holds_store(&self) -> bool {
        self.held.is_some()
    }

    /// Runs `f` with the store's write lock taken once for all of it (a
    /// whole operation, or a batch of them: the native replay). Every step
    /// inside reaches the store through the held lock instead of taking it.
    /// Nested calls reuse the held lock.
    ///
    /// `f` must not run Python: a hook that waits for the store (reading
    /// `vm.store` from another thread) would wait for this call, which
    /// would wait for the hook. Whole operations and the native replay run
    /// no Python.
    ///
    /// # Safety
    ///
    /// `f` must not move, swap or replace `*self` (a Kvm swapped out would
    /// keep a pointer to a store whose lock this call then releases). The
    /// callers are this module's whole operations and replay loop, which
    /// only call the Kvm's own methods; none is public.
    unsafe fn with_store_held<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        if self.held.is_some() {
            return f(self);
        }
        // SAFETY: the lock lives in `self.store`'s allocation, which this
        // Kvm keeps alive and never replaces (the field is private and set
        // once, in `with_host`; `f` may not swap the Kvm), so it outlives
        // the guard. The raw pointer only lets the guard coexist with the
        // `&mut self` that `f` needs, without cloning the Arc (two more
        // atomic operations a call).
        let lock: &RwLock<dyn AttrStore + Send + Sync> = unsafe { &*Arc::as_ptr(&self.store) };
        let mut guard = lock.write().unwrap_or_else(|e| e.into_inner());
        self.held = Some(HeldStore(NonNull::from(&mut *guard)));
        // `held` must be gone before the guard is, even if `f` panics.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        self.held = None;
        drop(guard);
        match r {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A hint that an operation on `gpa` comes next: the store, the
    /// address space 0 root and the hugepage tracker of the memslot holding
    /// it ask the CPU for the memory they will read for it (see
    /// `crate::prefetch`), and the store may keep its descent for it. No
    /// value or counter changes, so a driver may call it for any address.
    pub fn prefetch(&mut self, gpa: u64) {
        let gfn = gpa >> PAGE_SHIFT;
        self.store().prefetch(gfn);
        if let Some(i) = self.memslots.find(0, gfn) {
            self.memslots.address_space(0)[i].tracker.prefetch(gfn);
        }
        if let Some(root) = self.roots.first() {
            root.prefetch(gfn);
        }
    }

    /// Whether [`Kvm::prefetch`] pays: only when the store and the page
    /// tables together outgrow a core's L2 (`crate::prefetch::pays`).
    pub fn prefetch_pays(&self) -> bool {
        // Summed only up to the threshold: a whole host's page table has
        // hundreds of thousands of PUDs, too many to visit on every check.
        let mut bytes = self.store_read().memory_bytes();
        let mut tables = self
            .roots
            .iter()
            .flat_map(TdpPageTable::table_bytes_per_pud);
        while !crate::prefetch::pays(bytes) {
            match tables.next() {
                Some(b) => bytes += b,
                None => return false,
            }
        }
        true
    }

    /// Bytes every root's 2M and 4K tables occupy.
    pub fn table_bytes(&self) -> usize {
        self.roots.iter().map(TdpPageTable::table_bytes).sum()
    }

    /// The store, read-locked (see [`Kvm::store`]).
    fn store_read(&self) -> StoreRead<'_> {
        read_store(&self.store, &self.held)
    }

    pub fn shared_store(&self) -> &SharedStore {
        &self.store
    }

    pub fn memslots(&self) -> &Memslots {
        &self.memslots
    }

    /// Records a WARN_ON_ONCE for the driver to report (once per VM).
    fn warn(&mut self, w: KvmWarning) {
        self.warnings.push(w);
    }

    /// The warnings raised since the last call.
    pub fn take_warnings(&mut self) -> Vec<KvmWarning> {
        std::mem::take(&mut self.warnings)
    }

    /// kvm_flush_remote_tlbs(): counted, since that is what it costs.
    pub fn kvm_flush_remote_tlbs(&mut self) {
        self.counters.tlb_flushes += 1;
    }

    /// One acquisition of mmu_lock, counted where the kernel would take it.
    pub fn note_mmu_lock(&mut self) {
        self.counters.mmu_lock_acquisitions += 1;
    }

    /// A KVM_SET_MEMORY_ATTRIBUTES call that failed after validation
    /// (the Python driver's hooks can fail a call the core cannot see).
    pub fn note_failed_set(&mut self) {
        self.counters.failed_calls += 1;
    }

    /// Every memslot-clipped piece of [start, end), address space by
    /// address space, in gfn order (kvm_for_each_memslot_in_gfn_range).
    #[inline(always)]
    pub fn clip_gfn_ranges(&self, start: u64, end: u64, out: &mut Vec<GfnRange>) {
        self.memslots.clip(start, end, out);
    }
}

#[cfg(test)]
mod tests;
