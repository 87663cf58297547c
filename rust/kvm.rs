//! KVM_SET_MEMORY_ATTRIBUTES and x86 TDP faults, one operation at a time,
//! over state borrowed from a VM: for replaying batches of operations
//! without an interpreter between them.
//!
//! The Python `memattr.Vm` is the reference model (locks, hooks, both
//! semantics, memslot changes); this module runs the same rules on the same
//! state (the attribute store, each memslot's hugepage tracker, the stage-2
//! roots) for what a batch can meet: one thread, no hooks, Linux 6.8
//! ordering, no invalidation in flight when it starts, and memslots that stay
//! put for its duration. The caller adds [`Counters`] to the VM's stats and
//! writes [`MmuInvalidation`] back when the batch is done. The Python test
//! suite checks that a batch and the reference leave identical state,
//! results and counters.

use crate::hugepage::{
    HugepageError, HugepageTracker, LevelCounts, Stage2Map, KVM_MAX_HUGEPAGE_LEVEL, PG_LEVEL_1G,
    PG_LEVEL_2M, PG_LEVEL_4K,
};
use crate::store::{AttrStore, StoreError};

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;
/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `INVALID_GPA`, which the invalidation range also uses for "none yet".
pub const INVALID_GPA: u64 = u64::MAX;

pub const EINVAL: i32 = 22;
pub const ENOMEM: i32 = 12;
pub const EFAULT: i32 = 14;
pub const EIO: i32 = 5;
pub const EBADF: i32 = 9;
pub const EFBIG: i32 = 27;
pub const EOPNOTSUPP: i32 = 95;

/// include/uapi/linux/falloc.h
pub const FALLOC_FL_KEEP_SIZE: u64 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u64 = 0x02;
const FALLOC_FL_COLLAPSE_RANGE: u64 = 0x08;
const FALLOC_FL_ZERO_RANGE: u64 = 0x10;
const FALLOC_FL_INSERT_RANGE: u64 = 0x20;
const FALLOC_FL_UNSHARE_RANGE: u64 = 0x40;
/// FALLOC_FL_SUPPORTED_MASK: every mode vfs_fallocate knows.
const FALLOC_FL_SUPPORTED_MASK: u64 = 0x7F;

/// Why an operation failed. Each maps to the errno the kernel returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmError {
    /// A validation rule of kvm_vm_ioctl_set_mem_attributes() (EINVAL).
    Invalid(&'static str),
    /// Reserving the store's storage failed (ENOMEM); nothing changed.
    NoMemory(StoreError),
    /// KVM_EXIT_MEMORY_FAULT (the ioctl returns EFAULT).
    MemoryFault { gpa: u64, size: u64, flags: u64 },
    /// A file operation's error (fallocate on a guest_memfd), with why.
    File { errno: i32, why: &'static str },
    /// The model found itself inconsistent (KVM_BUG_ON); never expected.
    Bug(String),
}

impl KvmError {
    pub fn errno(&self) -> i32 {
        match self {
            KvmError::Invalid(_) => EINVAL,
            KvmError::NoMemory(_) => ENOMEM,
            KvmError::MemoryFault { .. } => EFAULT,
            KvmError::File { errno, .. } => *errno,
            KvmError::Bug(_) => EIO,
        }
    }
}

impl From<HugepageError> for KvmError {
    fn from(e: HugepageError) -> Self {
        KvmError::Bug(e.to_string())
    }
}

/// What the VM was created with and how its MMU model is set up.
#[derive(Debug, Clone, Copy)]
pub struct KvmConfig {
    /// kvm_supported_mem_attributes().
    pub supported_attributes: u64,
    /// kvm_arch_has_private_mem().
    pub has_private_mem: bool,
    /// Bytes the attribute store may use (ENOMEM beyond).
    pub attr_memory_limit: Option<usize>,
    /// Largest guest_memfd folio order (caps private mappings).
    pub guest_memfd_max_order: u32,
    /// host_pfn_mapping_level() for shared memory.
    pub host_mapping_level: u8,
    /// The pre-set pass also invalidates non-mixed straddling hugepages.
    pub invalidate_straddling_hugepages: bool,
}

/// A memslot, with its hugepage tracking (`slot->arch`) borrowed.
pub struct Memslot<'a> {
    pub as_id: usize,
    pub base_gfn: u64,
    pub npages: u64,
    pub flags: u32,
    /// Private faults can get a pfn: kvm_slot_can_be_private() (bound to a
    /// guest_memfd) and that file is still open.
    pub can_be_private: bool,
    pub tracker: &'a mut (dyn HugepageTracker + Send),
}

impl Memslot<'_> {
    #[inline]
    fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }
}

/// One of the VM's guest_memfd files: its fd, size, and the memslots bound
/// to it as `[first, end)` file pages (page offsets) -> index into the
/// slots given to [`Kvm::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmemFile {
    pub fd: u64,
    pub size: u64,
    pub bindings: Vec<(u64, u64, usize)>,
}

/// kvm->mmu_invalidate_{seq,in_progress,range_start,range_end}.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmuInvalidation {
    pub seq: u64,
    pub in_progress: u64,
    pub range_start: u64,
    pub range_end: u64,
}

impl Default for MmuInvalidation {
    fn default() -> Self {
        Self {
            seq: 0,
            in_progress: 0,
            range_start: INVALID_GPA,
            range_end: INVALID_GPA,
        }
    }
}

impl MmuInvalidation {
    /// kvm_mmu_invalidate_begin().
    fn begin(&mut self) {
        self.in_progress += 1;
        if self.in_progress == 1 {
            self.range_start = INVALID_GPA;
            self.range_end = INVALID_GPA;
        }
    }

    /// kvm_mmu_invalidate_range_add(): widen to the hull.
    fn range_add(&mut self, start: u64, end: u64) {
        if self.range_start == INVALID_GPA {
            self.range_start = start;
            self.range_end = end;
        } else {
            self.range_start = self.range_start.min(start);
            self.range_end = self.range_end.max(end);
        }
    }

    /// kvm_mmu_invalidate_end(): the sequence moves before the count drops.
    fn end(&mut self) -> Result<(), KvmError> {
        if self.in_progress == 0 {
            return Err(KvmError::Bug(
                "mmu_invalidate_end() without a matching begin()".into(),
            ));
        }
        self.seq += 1;
        self.in_progress -= 1;
        Ok(())
    }
}

/// What the operations did, as the VM's stats count it (the same fields as
/// `memattr.stats.Stats`). `mapped` is a change, so it may go negative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub set_calls: u64,
    pub conversions: u64,
    pub noop_conversions: u64,
    pub pages_converted: u64,
    pub failed_calls: u64,
    pub enomem: u64,
    pub zapped_ranges: u64,
    pub post_set_ranges: u64,
    pub tlb_flushes: u64,
    pub mmu_lock_acquisitions: u64,
    pub faults: u64,
    pub memory_fault_exits: u64,
    /// Shared accesses outside every memslot (emulated MMIO).
    pub mmio_faults: u64,
    /// fallocate(PUNCH_HOLE) calls on a guest_memfd that succeeded.
    pub gmem_holes_punched: u64,
    /// By level: index 0 = 4K, 1 = 2M, 2 = 1G.
    pub zapped_pages: [u64; 3],
    pub mapped: [i64; 3],
}

/// A memslot-clipped piece of a set call's range (struct kvm_gfn_range).
#[derive(Debug, Clone, Copy)]
struct GfnRange {
    slot: usize,
    start: u64,
    end: u64,
}

/// The VM state one batch works on.
pub struct Kvm<'a> {
    config: KvmConfig,
    store: &'a mut (dyn AttrStore + Send),
    /// Every memslot, address space by address space, in gfn order.
    slots: Vec<Memslot<'a>>,
    /// `slots[as_first[as_id]..as_first[as_id + 1]]` is address space as_id.
    as_first: Vec<usize>,
    /// One TDP root per address space.
    roots: Vec<&'a mut Stage2Map>,
    /// The VM's open guest_memfd files.
    gmem: Vec<GmemFile>,
    pub inval: MmuInvalidation,
    pub counters: Counters,
    /// The MMU passes ran on a VM without private memory (the reference
    /// WARNs once); only reachable if the store was written behind the VM's
    /// back.
    pub warned_no_private_mem: bool,
}

impl<'a> Kvm<'a> {
    /// Borrows a VM's state. `roots` has one root per address space; slots
    /// come address space by address space in gfn order, lie in one of
    /// them, are non-empty and do not overlap; no invalidation may be in
    /// progress.
    pub fn new(
        config: KvmConfig,
        store: &'a mut (dyn AttrStore + Send),
        slots: Vec<Memslot<'a>>,
        roots: Vec<&'a mut Stage2Map>,
        inval: MmuInvalidation,
    ) -> Result<Self, String> {
        if roots.is_empty() {
            return Err("a VM has at least one address space".into());
        }
        if inval.in_progress != 0 {
            return Err("an invalidation is in progress: a batch cannot start".into());
        }
        if !(PG_LEVEL_4K..=KVM_MAX_HUGEPAGE_LEVEL).contains(&config.host_mapping_level) {
            return Err(format!(
                "host_mapping_level must be 1..=3, got {}",
                config.host_mapping_level
            ));
        }
        let mut as_first = vec![0usize; roots.len() + 1];
        for (i, s) in slots.iter().enumerate() {
            if s.as_id >= roots.len() {
                return Err(format!(
                    "memslot at gfn {:#x}: address space {} has no root",
                    s.base_gfn, s.as_id
                ));
            }
            let layout = s.tracker.slot();
            if s.npages == 0
                || s.base_gfn.checked_add(s.npages).is_none()
                || layout.base_gfn != s.base_gfn
                || layout.npages != s.npages
            {
                return Err(format!(
                    "memslot at gfn {:#x} ({} pages) does not match its tracker",
                    s.base_gfn, s.npages
                ));
            }
            if i > 0 && (slots[i - 1].as_id, slots[i - 1].base_gfn) >= (s.as_id, s.base_gfn) {
                return Err(format!(
                    "memslots must come in (address space, gfn) order: gfn {:#x}",
                    s.base_gfn
                ));
            }
            if i > 0 && slots[i - 1].as_id == s.as_id && slots[i - 1].end_gfn() > s.base_gfn {
                return Err(format!("memslots overlap at gfn {:#x}", s.base_gfn));
            }
            as_first[s.as_id + 1] = i + 1;
        }
        for a in 1..as_first.len() {
            as_first[a] = as_first[a].max(as_first[a - 1]);
        }
        Ok(Self {
            config,
            store,
            slots,
            as_first,
            roots,
            gmem: Vec::new(),
            inval,
            counters: Counters::default(),
            warned_no_private_mem: false,
        })
    }

    /// Adds the VM's guest_memfd files, for fallocate operations.
    pub fn with_guest_memfds(mut self, files: Vec<GmemFile>) -> Result<Self, String> {
        for f in &files {
            for &(first, end, slot) in &f.bindings {
                let Some(s) = self.slots.get(slot) else {
                    return Err(format!(
                        "guest_memfd {}: binding to slot index {slot}, which does not exist",
                        f.fd
                    ));
                };
                if first >= end || end - first != s.npages {
                    return Err(format!(
                        "guest_memfd {}: binding [{first}, {end}) does not match its memslot",
                        f.fd
                    ));
                }
            }
        }
        self.gmem = files;
        Ok(self)
    }

    fn address_space(&self, as_id: usize) -> std::ops::Range<usize> {
        self.as_first[as_id]..self.as_first[as_id + 1]
    }

    /// gfn_to_memslot().
    fn find(&self, as_id: usize, gfn: u64) -> Option<usize> {
        let r = self.address_space(as_id);
        let slots = &self.slots[r.clone()];
        let i = slots.partition_point(|s| s.base_gfn <= gfn);
        (i > 0 && gfn < slots[i - 1].end_gfn()).then(|| r.start + i - 1)
    }

    /// Every memslot-clipped piece of [start, end), address space by
    /// address space, in gfn order (kvm_for_each_memslot_in_gfn_range).
    fn clip_gfn_ranges(&self, start: u64, end: u64, out: &mut Vec<GfnRange>) {
        for as_id in 0..self.roots.len() {
            let r = self.address_space(as_id);
            let slots = &self.slots[r.clone()];
            // First slot ending after start.
            let mut i = slots.partition_point(|s| s.end_gfn() <= start);
            while i < slots.len() && slots[i].base_gfn < end {
                let s = &slots[i];
                out.push(GfnRange {
                    slot: r.start + i,
                    start: start.max(s.base_gfn),
                    end: end.min(s.end_gfn()),
                });
                i += 1;
            }
        }
    }

    // --- KVM_SET_MEMORY_ATTRIBUTES ------------------------------------------

    /// kvm_vm_ioctl_set_mem_attributes(): true if the call changed
    /// attributes, false for the early exit (the range already had them).
    pub fn set_memory_attributes(
        &mut self,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<bool, KvmError> {
        let r = self
            .validate_set(address, size, attributes, flags)
            .and_then(|()| {
                self.counters.set_calls += 1;
                self.kvm_vm_set_mem_attributes(
                    address >> PAGE_SHIFT,
                    (address + size) >> PAGE_SHIFT,
                    attributes,
                )
            });
        if r.is_err() {
            self.counters.failed_calls += 1;
        }
        r
    }

    /// The ioctl's checks, in the kernel's order, each EINVAL.
    fn validate_set(
        &self,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<(), KvmError> {
        if flags != 0 {
            return Err(KvmError::Invalid("flags must be 0"));
        }
        if attributes & !self.config.supported_attributes != 0 {
            return Err(KvmError::Invalid("attributes not supported by this VM"));
        }
        if size == 0 || address.checked_add(size).is_none() {
            return Err(KvmError::Invalid("size is 0 or address + size wraps"));
        }
        if (address | size) & (PAGE_SIZE - 1) != 0 {
            return Err(KvmError::Invalid("address or size not page aligned"));
        }
        Ok(())
    }

    /// kvm_vm_set_mem_attributes(), under slots_lock.
    fn kvm_vm_set_mem_attributes(
        &mut self,
        start: u64,
        end: u64,
        attributes: u64,
    ) -> Result<bool, KvmError> {
        // Nothing to do if the range already has the attributes; otherwise
        // reserve first so the store cannot fail half way.
        match self.store.reserve_unless_has_value(
            start,
            end,
            attributes,
            self.config.attr_memory_limit,
        ) {
            Ok(true) => {
                self.counters.noop_conversions += 1;
                return Ok(false);
            }
            Ok(false) => {}
            Err(e @ StoreError::OutOfMemory { .. }) => {
                self.counters.enomem += 1;
                return Err(KvmError::NoMemory(e));
            }
            Err(e) => return Err(KvmError::Bug(e.to_string())),
        }
        let mut ranges = Vec::new();
        self.clip_gfn_ranges(start, end, &mut ranges);

        // Pre-set pass: mmu_invalidate_begin as on_lock, zap, one flush.
        if !ranges.is_empty() {
            self.counters.mmu_lock_acquisitions += 1;
            self.inval.begin();
            let mut flush = false;
            for rng in &ranges {
                // Added even when nothing is mapped, so faults keep away
                // from gfns whose attributes are in flux.
                self.inval.range_add(rng.start, rng.end);
                match self.pre_set_memory_attributes(rng) {
                    Ok(f) => flush |= f,
                    Err(e) => {
                        // Like the reference's cleanup: close the
                        // invalidation so faults are not blocked forever.
                        self.inval.end()?;
                        self.store.release_reservations();
                        return Err(e);
                    }
                }
                self.counters.zapped_ranges += 1;
            }
            if flush {
                self.counters.tlb_flushes += 1;
            }
        }

        if let Err(e) = self.store.set_range(start, end, attributes) {
            if !ranges.is_empty() {
                self.inval.end()?;
            }
            self.store.release_reservations();
            return Err(KvmError::Bug(e.to_string()));
        }
        self.counters.conversions += 1;
        self.counters.pages_converted += end - start;

        // Post-set pass: mmu_invalidate_end as on_lock, inside mmu_lock.
        if !ranges.is_empty() {
            self.counters.mmu_lock_acquisitions += 1;
            self.inval.end()?;
            for rng in &ranges {
                self.post_set_memory_attributes(rng, attributes)?;
                self.counters.post_set_ranges += 1;
            }
        }
        Ok(true)
    }

    /// kvm_arch_pre_set_memory_attributes(): true if a TLB flush is needed.
    fn pre_set_memory_attributes(&mut self, rng: &GfnRange) -> Result<bool, KvmError> {
        if !self.config.has_private_mem {
            self.warned_no_private_mem = true;
            return Ok(false);
        }
        let slot = &self.slots[rng.slot];
        if self.config.invalidate_straddling_hugepages {
            // A fault just outside the range could otherwise map a hugepage
            // from mixed flags that are about to change.
            let hull = slot.tracker.straddling_hugepages_hull(rng.start, rng.end)?;
            if let Some((s, e)) = hull {
                self.inval.range_add(s, e);
            }
        }
        let removed = self.roots[slot.as_id].zap(rng.start, rng.end)?;
        Ok(self.account_removed(removed))
    }

    /// kvm_arch_post_set_memory_attributes(): recompute mixed flags.
    fn post_set_memory_attributes(
        &mut self,
        rng: &GfnRange,
        attributes: u64,
    ) -> Result<(), KvmError> {
        if !self.config.has_private_mem {
            self.warned_no_private_mem = true;
            return Ok(());
        }
        let slot = &mut self.slots[rng.slot];
        slot.tracker
            .post_set_memory_attributes(&*self.store, rng.start, rng.end, attributes)?;
        Ok(())
    }

    /// Counts leaves removed from a root; true if there were any.
    fn account_removed(&mut self, removed: LevelCounts) -> bool {
        let c = &mut self.counters;
        for (i, &n) in removed.iter().enumerate() {
            c.zapped_pages[i] += n;
            c.mapped[i] -= n as i64;
        }
        removed.iter().any(|&n| n != 0)
    }

    // --- guest_memfd ---------------------------------------------------------------

    /// fallocate(2) on a guest_memfd of this VM: vfs_fallocate's checks,
    /// then kvm_gmem_fallocate's, in their order (`offset` and `length` are
    /// loff_t); a hole zaps every mapping of the bound gfns inside one
    /// invalidation (kvm_gmem_punch_hole), an allocation only checks.
    pub fn guest_memfd_fallocate(
        &mut self,
        fd: u64,
        mode: u64,
        offset: i64,
        length: i64,
    ) -> Result<(), KvmError> {
        let err = |errno, why| Err(KvmError::File { errno, why });
        let Some(file) = self.gmem.iter().position(|f| f.fd == fd) else {
            return err(EBADF, "not a guest_memfd of this VM");
        };
        if offset < 0 || length <= 0 {
            return err(EINVAL, "offset < 0 or length <= 0");
        }
        if mode & !FALLOC_FL_SUPPORTED_MASK != 0 {
            return err(EOPNOTSUPP, "unknown mode bits");
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_ZERO_RANGE != 0 {
            return err(EOPNOTSUPP, "PUNCH_HOLE with ZERO_RANGE");
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return err(EOPNOTSUPP, "PUNCH_HOLE without KEEP_SIZE");
        }
        for alone in [FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE] {
            if mode & alone != 0 && mode & !alone != 0 {
                return err(EINVAL, "COLLAPSE_RANGE and INSERT_RANGE must be used alone");
            }
        }
        if mode & FALLOC_FL_UNSHARE_RANGE != 0
            && mode & !(FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_KEEP_SIZE) != 0
        {
            return err(EINVAL, "UNSHARE_RANGE takes only KEEP_SIZE");
        }
        let Some(last) = offset.checked_add(length) else {
            return err(EFBIG, "offset + length past the largest file size");
        };
        if mode & FALLOC_FL_KEEP_SIZE == 0 {
            return err(EOPNOTSUPP, "guest_memfd needs KEEP_SIZE");
        }
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0 {
            return err(EOPNOTSUPP, "mode not supported by guest_memfd");
        }
        if (offset | length) as u64 & (PAGE_SIZE - 1) != 0 {
            return err(EINVAL, "offset or length not page aligned");
        }
        if mode & FALLOC_FL_PUNCH_HOLE == 0 {
            if last as u64 > self.gmem[file].size {
                return err(EINVAL, "allocation past the file's size");
            }
            return Ok(());
        }
        self.kvm_gmem_invalidate(file, offset as u64 >> PAGE_SHIFT, last as u64 >> PAGE_SHIFT)?;
        self.counters.gmem_holes_punched += 1;
        Ok(())
    }

    /// The open guest_memfd file and byte offset backing `gpa` in address
    /// space 0, if a bound memslot holds it.
    pub fn gmem_location(&self, gpa: u64) -> Option<(u64, u64)> {
        let gfn = gpa >> PAGE_SHIFT;
        let slot = self.find(0, gfn)?;
        let base = self.slots[slot].base_gfn;
        self.gmem.iter().find_map(|f| {
            f.bindings
                .iter()
                .find(|b| b.2 == slot)
                .map(|&(first, _, _)| {
                    (
                        f.fd,
                        ((first + gfn - base) << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1)),
                    )
                })
        })
    }

    /// kvm_gmem_invalidate_begin() / _end() around a truncation of file
    /// pages `[start, end)`.
    fn kvm_gmem_invalidate(&mut self, file: usize, start: u64, end: u64) -> Result<(), KvmError> {
        let ranges: Vec<(usize, u64, u64)> = self.gmem[file]
            .bindings
            .iter()
            .filter(|&&(first, last, _)| first < end && last > start)
            .map(|&(first, last, slot)| {
                let base = self.slots[slot].base_gfn;
                (
                    slot,
                    base + start.max(first) - first,
                    base + end.min(last) - first,
                )
            })
            .collect();
        if ranges.is_empty() {
            return Ok(());
        }
        self.counters.mmu_lock_acquisitions += 1;
        self.inval.begin();
        let mut flush = false;
        for &(slot, s, e) in &ranges {
            // kvm_mmu_unmap_gfn_range(): add, then zap (private and shared
            // mappings alike in 6.8).
            self.inval.range_add(s, e);
            let as_id = self.slots[slot].as_id;
            match self.roots[as_id].zap(s, e) {
                Ok(removed) => flush |= self.account_removed(removed),
                Err(e) => {
                    self.inval.end()?;
                    return Err(e.into());
                }
            }
        }
        if flush {
            self.counters.tlb_flushes += 1;
        }
        self.counters.mmu_lock_acquisitions += 1;
        self.inval.end()
    }

    // --- faults ------------------------------------------------------------------

    /// A TDP page fault at `gpa` in address space `as_id`: the level mapped,
    /// 0 for emulated MMIO, or `MemoryFault` (KVM_EXIT_MEMORY_FAULT). A batch runs alone with no
    /// invalidation in flight, so the fault never has to retry.
    pub fn fault(&mut self, gpa: u64, private: bool, as_id: usize) -> Result<u8, KvmError> {
        if as_id >= self.roots.len() {
            return Err(KvmError::Bug(format!(
                "address space {as_id} does not exist"
            )));
        }
        self.counters.faults += 1;
        let gfn = gpa >> PAGE_SHIFT;
        // __kvm_faultin_pfn(): private-ness differs from the attribute, or
        // a private access without guest_memfd (or without a slot): exit to
        // userspace. A shared access outside every slot is MMIO, emulated
        // without a mapping (kvm_handle_noslot_fault): level 0.
        let is_private = self.store.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        let Some(i) = self.find(as_id, gfn) else {
            if private || is_private {
                return Err(self.memory_fault_exit(gfn, private));
            }
            self.counters.mmio_faults += 1;
            return Ok(0);
        };
        if private != is_private || (private && !self.slots[i].can_be_private) {
            return Err(self.memory_fault_exit(gfn, private));
        }
        self.counters.mmu_lock_acquisitions += 1;
        let level = self.max_level(i, gfn, private)?;
        let (installed, removed) = self.roots[as_id].map(gfn, level)?;
        self.account_removed(removed);
        if installed {
            self.counters.mapped[(level - 1) as usize] += 1;
        }
        Ok(level)
    }

    /// kvm_mmu_prepare_memory_fault_exit(): page aligned, one page, PRIVATE
    /// iff the access was private.
    fn memory_fault_exit(&mut self, gfn: u64, private: bool) -> KvmError {
        self.counters.memory_fault_exits += 1;
        KvmError::MemoryFault {
            gpa: gfn << PAGE_SHIFT,
            size: PAGE_SIZE,
            flags: if private {
                KVM_MEMORY_EXIT_FLAG_PRIVATE
            } else {
                0
            },
        }
    }

    /// kvm_faultin_pfn_private()'s cap from the guest_memfd folio order,
    /// then kvm_mmu_hugepage_adjust(): dirty logging, lpage_info, host.
    fn max_level(&self, slot: usize, gfn: u64, private: bool) -> Result<u8, KvmError> {
        let mut max_level = KVM_MAX_HUGEPAGE_LEVEL;
        if private {
            max_level = max_level.min(max_level_for_order(self.config.guest_memfd_max_order));
        }
        let slot = &self.slots[slot];
        if max_level == PG_LEVEL_4K || slot.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
            return Ok(PG_LEVEL_4K);
        }
        let level = slot.tracker.max_mapping_level(gfn, max_level)?;
        Ok(if private {
            level
        } else {
            level.min(self.config.host_mapping_level)
        })
    }
}

/// The largest level a guest_memfd folio of `order` can back.
pub fn max_level_for_order(order: u32) -> u8 {
    if order >= 18 {
        PG_LEVEL_1G
    } else if order >= 9 {
        PG_LEVEL_2M
    } else {
        PG_LEVEL_4K
    }
}

// ---------------------------------------------------------------------------
// Replaying operation records.
// ---------------------------------------------------------------------------

/// Operation kinds, as `memattr.trace` numbers them.
pub const OP_SET_MEMORY_ATTRIBUTES: u8 = 0;
pub const OP_FAULT: u8 = 1;
/// fd in `attributes` (already the live fd), mode in `arg`, offset in
/// `gpa`, length in `size` (loff_t, two's complement).
pub const OP_GUEST_MEMFD_FALLOCATE: u8 = 4;
/// Fault flags, as `memattr.trace` numbers them.
pub const FLAG_PRIVATE: u8 = 1 << 0;
pub const FLAG_WRITE: u8 = 1 << 1;
pub const FLAG_CONVERT: u8 = 1 << 2;
/// With FLAG_CONVERT: after converting to shared, punch the guest_memfd
/// hole behind the page, as QEMU does.
pub const FLAG_DISCARD: u8 = 1 << 3;

/// One operation of a trace (the fields a batch reads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Op {
    pub kind: u8,
    pub gpa: u64,
    pub size: u64,
    pub attributes: u64,
    pub arg: u64,
    pub flags: u8,
}

/// What a replay counts, beyond the VM's own counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayTally {
    /// Operations run.
    pub ops: u64,
    /// Set calls made, implicit conversions included.
    pub sets: u64,
    pub faults: u64,
    /// KVM_EXIT_MEMORY_FAULTs seen (a converted fault may see two).
    pub fault_exits: u64,
    /// Conversions made for a FLAG_CONVERT fault's exit.
    pub implicit_conversions: u64,
    /// Failed operations by errno, in order of first appearance.
    pub errors: Vec<(i32, u64)>,
}

impl ReplayTally {
    fn fail(&mut self, e: &KvmError) -> i64 {
        let errno = e.errno();
        match self.errors.iter_mut().find(|(n, _)| *n == errno) {
            Some((_, c)) => *c += 1,
            None => self.errors.push((errno, 1)),
        }
        -(errno as i64)
    }
}

/// Runs `ops` in order on `kvm`, writing each result (0 or the mapped level,
/// or -errno) to `results`, until an operation a batch does not run (a
/// memslot change, creating or closing a guest_memfd) or a model bug.
/// Sets, faults and guest_memfd fallocates run here. Returns how many ran; the
/// caller runs the one that stopped it, then carries on.
///
/// A fault with FLAG_CONVERT does what a VMM does on
/// KVM_EXIT_MEMORY_FAULT: converts the reported range to the access's
/// private-ness and runs the fault again, once.
pub fn replay(
    kvm: &mut Kvm<'_>,
    ops: &[Op],
    results: &mut [i64],
    tally: &mut ReplayTally,
) -> Result<usize, KvmError> {
    assert_eq!(ops.len(), results.len(), "one result per operation");
    for (i, op) in ops.iter().enumerate() {
        let got = match op.kind {
            OP_SET_MEMORY_ATTRIBUTES => {
                tally.sets += 1;
                match kvm.set_memory_attributes(op.gpa, op.size, op.attributes, op.arg) {
                    Ok(_) => 0,
                    Err(e @ KvmError::Bug(_)) => return Err(e),
                    Err(e) => tally.fail(&e),
                }
            }
            OP_FAULT => replay_fault(kvm, op, tally)?,
            OP_GUEST_MEMFD_FALLOCATE => {
                match kvm.guest_memfd_fallocate(
                    op.attributes,
                    op.arg,
                    op.gpa as i64,
                    op.size as i64,
                ) {
                    Ok(()) => 0,
                    Err(e @ KvmError::Bug(_)) => return Err(e),
                    Err(e) => tally.fail(&e),
                }
            }
            _ => return Ok(i),
        };
        results[i] = got;
        tally.ops += 1;
    }
    Ok(ops.len())
}

fn replay_fault(kvm: &mut Kvm<'_>, op: &Op, tally: &mut ReplayTally) -> Result<i64, KvmError> {
    tally.faults += 1;
    let private = op.flags & FLAG_PRIVATE != 0;
    let exit = match kvm.fault(op.gpa, private, 0) {
        Ok(level) => return Ok(level as i64),
        Err(e @ KvmError::MemoryFault { .. }) => e,
        Err(e @ KvmError::Bug(_)) => return Err(e),
        Err(e) => return Ok(tally.fail(&e)),
    };
    tally.fault_exits += 1;
    let KvmError::MemoryFault { gpa, size, flags } = exit else {
        unreachable!()
    };
    if op.flags & FLAG_CONVERT == 0 {
        return Ok(tally.fail(&exit));
    }
    let attributes = if flags & KVM_MEMORY_EXIT_FLAG_PRIVATE != 0 {
        KVM_MEMORY_ATTRIBUTE_PRIVATE
    } else {
        0
    };
    match kvm.set_memory_attributes(gpa, size, attributes, 0) {
        Ok(_) => {}
        Err(e @ KvmError::Bug(_)) => return Err(e),
        Err(e) => return Ok(tally.fail(&e)),
    }
    tally.implicit_conversions += 1;
    tally.sets += 1;
    if op.flags & FLAG_DISCARD != 0 && attributes == 0 {
        if let Some((fd, offset)) = kvm.gmem_location(gpa) {
            match kvm.guest_memfd_fallocate(
                fd,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                offset as i64,
                size as i64,
            ) {
                Ok(()) => {}
                Err(e @ KvmError::Bug(_)) => return Err(e),
                Err(e) => return Ok(tally.fail(&e)),
            }
        }
    }
    match kvm.fault(op.gpa, private, 0) {
        Ok(level) => Ok(level as i64),
        Err(e @ KvmError::Bug(_)) => Err(e),
        Err(e) => {
            if matches!(e, KvmError::MemoryFault { .. }) {
                tally.fault_exits += 1;
            }
            Ok(tally.fail(&e))
        }
    }
}

#[cfg(test)]
#[path = "kvm_tests.rs"]
mod tests;
