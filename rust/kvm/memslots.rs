//! Memslots and KVM_SET_USER_MEMORY_REGION(2): virt/kvm/kvm_main.c's
//! __kvm_set_memory_region() and check_memory_region_flags(), Linux 6.8 and
//! 6.18.
//!
//! ```text
//!   Memslots
//!   └── per address space: Vec<Memslot> sorted by base_gfn (never overlapping)
//!       ┌──────────┬──────────┬───────┬──────────┐
//!       │ slot 0   │ slot 3   │  ...  │ slot 1   │   gfn_to_memslot(): binary
//!       │ [0, 8)   │ [8, 20)  │       │ [1M, 2M) │   search on base_gfn
//!       └──────────┴──────────┴───────┴──────────┘
//!       + by_id: id -> base_gfn (id_to_memslot())
//! ```
//!
//! Every check runs before anything changes: a failing call leaves the
//! memslots, the guest_memfd bindings and the fd table as they were.

use std::collections::HashMap;

use super::*;
use crate::hugepage::{HugepageTracker, LpageInfoTracker, RangeTracker, SlotLayout};

/// struct kvm_memory_slot's fields the model keeps, without its tracking:
/// what readers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemslotInfo {
    /// The low 16 bits of the uapi slot number.
    pub id: u16,
    /// The high 16 bits.
    pub as_id: usize,
    pub base_gfn: u64,
    pub npages: u64,
    pub userspace_addr: u64,
    pub flags: u32,
    /// The guest_memfd bound at creation and its offset (bytes).
    pub guest_memfd: Option<u64>,
    pub guest_memfd_offset: u64,
    /// slot->gmem.file: the bound file while it is open.
    pub gmem_open: bool,
    /// KVM_MEMSLOT_GMEM_ONLY (6.18): bound to an mmap-able guest_memfd,
    /// so shared faults are served from guest_memfd too.
    pub gmem_only: bool,
    /// Identity: new for every created or moved slot, as a new struct
    /// kvm_memory_slot is in the kernel.
    pub serial: u64,
}

impl MemslotInfo {
    #[inline]
    pub fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }

    /// The uapi slot number: as_id << 16 | id.
    pub fn slot(&self) -> u32 {
        ((self.as_id as u32) << 16) | self.id as u32
    }

    /// kvm_slot_can_be_private().
    pub fn can_be_private(&self) -> bool {
        self.flags & KVM_MEM_GUEST_MEMFD != 0
    }

    /// First guest_memfd page backing base_gfn (slot->gmem.pgoff).
    pub fn gmem_pgoff(&self) -> u64 {
        self.guest_memfd_offset >> PAGE_SHIFT
    }
}

/// struct kvm_memory_slot: its fields, and `arch`'s hugepage tracking
/// (lpage_info: disallow counts and mixed flags).
pub struct Memslot {
    pub info: MemslotInfo,
    pub tracker: Box<dyn HugepageTracker + Send>,
}

impl std::ops::Deref for Memslot {
    type Target = MemslotInfo;

    fn deref(&self) -> &MemslotInfo {
        &self.info
    }
}

impl std::ops::DerefMut for Memslot {
    fn deref_mut(&mut self) -> &mut MemslotInfo {
        &mut self.info
    }
}

/// Every address space's memslots (kvm->memslots[as_id]).
pub struct Memslots {
    spaces: Vec<Vec<Memslot>>,
    by_id: Vec<HashMap<u16, u64>>,
    /// Changes on every update (kvm_memslots->generation).
    pub generation: u64,
    pub nr_memslot_pages: u64,
    next_serial: u64,
}

impl Memslots {
    pub fn new(nr_as_ids: usize) -> Self {
        Self {
            spaces: (0..nr_as_ids).map(|_| Vec::new()).collect(),
            by_id: (0..nr_as_ids).map(|_| HashMap::new()).collect(),
            generation: 0,
            nr_memslot_pages: 0,
            next_serial: 1,
        }
    }

    pub fn nr_as_ids(&self) -> usize {
        self.spaces.len()
    }

    pub fn len(&self) -> usize {
        self.spaces.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One address space's slots in gfn order.
    pub fn address_space(&self, as_id: usize) -> &[Memslot] {
        self.spaces.get(as_id).map_or(&[], |v| v.as_slice())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.spaces.iter().flatten()
    }

    pub fn at(&self, as_id: usize, index: usize) -> Option<&Memslot> {
        self.spaces.get(as_id)?.get(index)
    }

    pub(crate) fn at_mut(&mut self, as_id: usize, index: usize) -> Option<&mut Memslot> {
        self.spaces.get_mut(as_id)?.get_mut(index)
    }

    /// gfn_to_memslot(): the index of the slot of `as_id` holding `gfn`.
    #[inline]
    pub fn find(&self, as_id: usize, gfn: u64) -> Option<usize> {
        let slots = self.spaces.get(as_id)?;
        let i = slots.partition_point(|s| s.base_gfn <= gfn);
        // `then`, not `then_some`: its argument is evaluated even when the
        // condition is false, and `i - 1` underflows for a gfn below every
        // slot (a panic in a debug build).
        (i > 0 && gfn < slots[i - 1].end_gfn()).then(|| i - 1)
    }

    /// id_to_memslot().
    pub fn index_of_id(&self, as_id: usize, id: u16) -> Option<usize> {
        let base = *self.by_id.get(as_id)?.get(&id)?;
        let slots = &self.spaces[as_id];
        let i = slots.partition_point(|s| s.base_gfn < base);
        (i < slots.len() && slots[i].id == id).then_some(i)
    }

    /// Every memslot-clipped piece of [start, end), address space by
    /// address space, in gfn order (kvm_for_each_memslot_in_gfn_range).
    #[inline(always)]
    pub fn clip(&self, start: u64, end: u64, out: &mut Vec<GfnRange>) {
        if start >= end {
            return;
        }
        for (as_id, slots) in self.spaces.iter().enumerate() {
            // The first slot ending after start.
            let mut i = slots.partition_point(|s| s.end_gfn() <= start);
            while i < slots.len() && slots[i].base_gfn < end {
                let s = &slots[i];
                out.push(GfnRange {
                    as_id,
                    index: i,
                    serial: s.serial,
                    start: start.max(s.base_gfn),
                    end: end.min(s.end_gfn()),
                });
                i += 1;
            }
        }
    }

    /// kvm_check_memslot_overlap(): a slot other than `id` intersects
    /// [start, end) in `as_id`.
    fn overlaps(&self, as_id: usize, id: u16, start: u64, end: u64) -> bool {
        let slots = &self.spaces[as_id];
        let mut i = slots.partition_point(|s| s.end_gfn() <= start);
        while i < slots.len() && slots[i].base_gfn < end {
            if slots[i].id != id {
                return true;
            }
            i += 1;
        }
        false
    }

    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial - 1
    }

    fn install(&mut self, slot: Memslot) {
        let as_id = slot.as_id;
        let slots = &mut self.spaces[as_id];
        let i = slots.partition_point(|s| s.base_gfn < slot.base_gfn);
        self.by_id[as_id].insert(slot.id, slot.base_gfn);
        self.nr_memslot_pages += slot.npages;
        slots.insert(i, slot);
        self.generation += 1;
    }

    fn remove(&mut self, as_id: usize, index: usize) -> Memslot {
        let slot = self.spaces[as_id].remove(index);
        self.by_id[as_id].remove(&slot.id);
        self.nr_memslot_pages -= slot.npages;
        self.generation += 1;
        slot
    }
}

/// struct kvm_userspace_memory_region2, with the ioctl it came through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserspaceMemoryRegion {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub guest_memfd_offset: u64,
    pub guest_memfd: u32,
}

/// enum kvm_mr_change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemslotChange {
    Create,
    Delete,
    Move,
    FlagsOnly,
}

/// x86-64 __access_ok() for a size that is not a constant: the end must
/// not wrap and must be a valid user address. 6.8's valid_user_address()
/// takes the whole user half (the sign bit clear); from 6.12 it compares
/// with USER_PTR_MAX, which is TASK_SIZE_MAX.
fn access_ok(config: &KvmConfig, addr: u64, size: u64) -> bool {
    let Some(end) = addr.checked_add(size) else {
        return false;
    };
    match config.semantics {
        Semantics::Linux618 | Semantics::GmemInplace | Semantics::GmemInplaceV5 => {
            end <= config.host.task_size_max()
        }
        Semantics::Linux68 | Semantics::V11 => end < 1 << 63,
    }
}

impl Kvm {
    /// check_memory_region_flags().
    fn check_memory_region_flags(&self, flags: u32) -> Result<(), KvmError> {
        let c = &self.config;
        let mut valid = KVM_MEM_LOG_DIRTY_PAGES;
        // 6.8: guest_memfd is for VMs with private memory; 6.18: for every
        // VM of a host built with it (kvm_arch_supports_gmem()).
        if c.host.guest_memfd && (c.has_private_mem || c.is_618()) {
            valid |= KVM_MEM_GUEST_MEMFD;
        }
        // Dirty logging guest_memfd memory is not supported.
        if flags & KVM_MEM_GUEST_MEMFD != 0 {
            valid &= !KVM_MEM_LOG_DIRTY_PAGES;
        }
        // Nor read-only guest_memfd memory: writes to a read-only slot are
        // emulated MMIO, which private memory cannot be (a 6.8 fix).
        if c.has_readonly_mem() && flags & KVM_MEM_GUEST_MEMFD == 0 {
            valid |= KVM_MEM_READONLY;
        }
        if flags & !valid != 0 {
            return fail(
                EINVAL,
                format!("memslot flags {flags:#x} not valid (valid: {valid:#x})"),
            );
        }
        Ok(())
    }

    /// KVM_SET_USER_MEMORY_REGION (`v1`) or KVM_SET_USER_MEMORY_REGION2:
    /// kvm_vm_ioctl_set_memory_region() then, under slots_lock,
    /// __kvm_set_memory_region(): create, delete (size 0), move, or change
    /// the flags of a memslot.
    pub fn kvm_set_memory_region(
        &mut self,
        mem: &UserspaceMemoryRegion,
        v1: bool,
    ) -> Result<(), KvmError> {
        let mut mem = *mem;
        if v1 {
            if mem.flags & !KVM_SET_USER_MEMORY_REGION_V1_FLAGS != 0 {
                return fail(
                    EINVAL,
                    format!(
                        "flags {:#x} not valid for KVM_SET_USER_MEMORY_REGION \
                         (use KVM_SET_USER_MEMORY_REGION2)",
                        mem.flags
                    ),
                );
            }
            // Fields beyond the v1 struct read as zero.
            mem.guest_memfd = 0;
            mem.guest_memfd_offset = 0;
        }
        let id = mem.slot & 0xFFFF;
        if id >= KVM_USER_MEM_SLOTS {
            return fail(
                EINVAL,
                format!("slot id {id} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})"),
            );
        }
        let (change, old) = self.prepare_memory_region(&mem)?;
        let Some(change) = change else {
            return Ok(());
        };
        self.commit_memory_region(change, old, &mem)?;
        self.counters.memslot_updates += 1;
        Ok(())
    }

    /// Every check of __kvm_set_memory_region() and kvm_gmem_bind(), in
    /// the kernel's order, without changing anything. None: nothing to do.
    fn prepare_memory_region(
        &self,
        mem: &UserspaceMemoryRegion,
    ) -> Result<(Option<MemslotChange>, Option<usize>), KvmError> {
        self.check_memory_region_flags(mem.flags)?;
        let as_id = (mem.slot >> 16) as usize;
        let id = (mem.slot & 0xFFFF) as u16;
        let size = mem.memory_size;
        let page_mask = PAGE_SIZE - 1;

        // General sanity checks.
        if size & page_mask != 0 {
            return fail(EINVAL, format!("memory_size {size:#x} is not page aligned"));
        }
        if mem.guest_phys_addr & page_mask != 0 {
            return fail(
                EINVAL,
                format!(
                    "guest_phys_addr {:#x} is not page aligned",
                    mem.guest_phys_addr
                ),
            );
        }
        if mem.userspace_addr & page_mask != 0 || !access_ok(&self.config, mem.userspace_addr, size)
        {
            return fail(
                EINVAL,
                format!(
                    "userspace_addr {:#x} is not page aligned or [addr, addr + size) is not \
                     a user range",
                    mem.userspace_addr
                ),
            );
        }
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0
            && (mem.guest_memfd_offset & page_mask != 0
                || mem.guest_memfd_offset.checked_add(size).is_none())
        {
            return fail(
                EINVAL,
                format!(
                    "guest_memfd_offset {:#x} is not page aligned or wraps",
                    mem.guest_memfd_offset
                ),
            );
        }
        let nr_as = self.memslots.nr_as_ids();
        if as_id >= nr_as || id as u32 >= KVM_MEM_SLOTS_NUM {
            return fail(
                EINVAL,
                format!(
                    "slot {:#x}: address space {as_id} (this VM has {nr_as}) or id {id} out of range",
                    mem.slot
                ),
            );
        }
        if mem.guest_phys_addr.checked_add(size).is_none() {
            return fail(EINVAL, "guest_phys_addr + memory_size wraps");
        }
        if size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES {
            return fail(
                EINVAL,
                format!("memory_size {size:#x} exceeds KVM_MEM_MAX_NR_PAGES"),
            );
        }

        let old = self.memslots.index_of_id(as_id, id);
        if size == 0 {
            return match old {
                Some(i) => Ok((Some(MemslotChange::Delete), Some(i))),
                None => fail(
                    EINVAL,
                    format!("slot {:#x} does not exist, nothing to delete", mem.slot),
                ),
            };
        }
        let base_gfn = mem.guest_phys_addr >> PAGE_SHIFT;
        let npages = size >> PAGE_SHIFT;
        let change = match old {
            None => MemslotChange::Create,
            Some(i) => {
                let o = &self.memslots.address_space(as_id)[i];
                // Private memslots are immutable, they can only be deleted.
                // 6.8 only checks the new flags; dropping the old slot's
                // binding through a flags change would orphan it, so the
                // model refuses both.
                if mem.flags & KVM_MEM_GUEST_MEMFD != 0 || o.flags & KVM_MEM_GUEST_MEMFD != 0 {
                    return fail(
                        EINVAL,
                        format!("guest_memfd slot {:#x} can only be deleted", mem.slot),
                    );
                }
                if mem.userspace_addr != o.userspace_addr
                    || npages != o.npages
                    || (mem.flags ^ o.flags) & KVM_MEM_READONLY != 0
                {
                    return fail(
                        EINVAL,
                        format!(
                            "slot {:#x}: only the gpa or the dirty-logging flag of an existing \
                             slot can change",
                            mem.slot
                        ),
                    );
                }
                if base_gfn != o.base_gfn {
                    MemslotChange::Move
                } else if mem.flags != o.flags {
                    MemslotChange::FlagsOnly
                } else {
                    return Ok((None, old));
                }
            }
        };
        if matches!(change, MemslotChange::Create | MemslotChange::Move)
            && self
                .memslots
                .overlaps(as_id, id, base_gfn, base_gfn + npages)
        {
            return fail(
                EEXIST,
                format!(
                    "gfn range [{base_gfn:#x}, {:#x}) overlaps another memslot in address space {as_id}",
                    base_gfn + npages
                ),
            );
        }
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            self.kvm_gmem_check_bind(mem.guest_memfd as u64, mem.guest_memfd_offset, npages)?;
        }
        self.kvm_arch_prepare_memory_region(change, base_gfn, npages)?;
        Ok((Some(change), old))
    }

    /// kvm_arch_prepare_memory_region()'s checks (x86), after the binding
    /// (kvm_set_memslot() runs it; a failure unbinds): a created or moved
    /// slot must end at or below kvm_mmu_max_gfn(). A flags change keeps
    /// the slot where it is, and a deletion is not checked.
    fn kvm_arch_prepare_memory_region(
        &self,
        change: MemslotChange,
        base_gfn: u64,
        npages: u64,
    ) -> Result<(), KvmError> {
        let last = base_gfn + npages - 1;
        let max = self.config.host.kvm_mmu_max_gfn();
        if matches!(change, MemslotChange::Create | MemslotChange::Move) && last > max {
            return fail(
                EINVAL,
                format!(
                    "the slot's last gfn {last:#x} is above kvm_mmu_max_gfn() {max:#x} \
                     (this host's guest-physical addresses end at bit {})",
                    max.count_ones() + PAGE_SHIFT
                ),
            );
        }
        Ok(())
    }

    /// kvm_alloc_memslot_metadata() / kvm_arch_prepare_memory_region():
    /// the slot's lpage info with the disallow rules, then its mixed flags
    /// from the attributes as they are now (VMs with private memory only,
    /// as kvm_mmu_init_memslot_memory_attributes()).
    fn kvm_alloc_memslot_metadata(
        &self,
        base_gfn: u64,
        npages: u64,
        userspace_addr: u64,
    ) -> Result<Box<dyn HugepageTracker + Send>, KvmError> {
        let layout = SlotLayout::new(base_gfn, npages, userspace_addr)?;
        let mut tracker: Box<dyn HugepageTracker + Send> = if self.config.per_page_trackers {
            Box::new(LpageInfoTracker::try_new(layout)?)
        } else {
            Box::new(RangeTracker::new(layout))
        };
        if self.config.has_private_mem {
            tracker.init_memory_attributes(&*self.store_read())?;
        }
        Ok(tracker)
    }

    /// kvm_set_memslot(): the new slot's metadata is built first, so nothing
    /// can fail once the old slot starts going away.
    fn commit_memory_region(
        &mut self,
        change: MemslotChange,
        old: Option<usize>,
        mem: &UserspaceMemoryRegion,
    ) -> Result<(), KvmError> {
        let as_id = (mem.slot >> 16) as usize;
        let base_gfn = mem.guest_phys_addr >> PAGE_SHIFT;
        let npages = mem.memory_size >> PAGE_SHIFT;
        if change == MemslotChange::FlagsOnly {
            let i = old.expect("a flags change has an old slot");
            // The kernel copies the slot (arch state included) into a new
            // struct; only the flags differ, so the model updates in place.
            let slot = self.memslots.at_mut(as_id, i).expect("old slot exists");
            let old_flags = slot.flags;
            slot.flags = mem.flags;
            self.memslots.generation += 1;
            self.kvm_mmu_slot_apply_flags(as_id, i, old_flags);
            return Ok(());
        }
        let tracker = match change {
            MemslotChange::Create | MemslotChange::Move => {
                Some(self.kvm_alloc_memslot_metadata(base_gfn, npages, mem.userspace_addr)?)
            }
            _ => None,
        };
        if let Some(i) = old {
            // kvm_invalidate_memslot(): zap what was mapped through the old
            // slot before it goes away (kvm_arch_flush_shadow_memslot).
            self.kvm_arch_flush_shadow_memslot(as_id, i);
            let gone = self.memslots.remove(as_id, i);
            if let Some(fd) = gone.guest_memfd.filter(|_| gone.gmem_open) {
                self.kvm_gmem_unbind(fd, gone.gmem_pgoff());
            }
        }
        let Some(tracker) = tracker else {
            return Ok(());
        };
        let gmem = (mem.flags & KVM_MEM_GUEST_MEMFD != 0).then_some(mem.guest_memfd as u64);
        let serial = self.memslots.serial();
        let slot = Memslot {
            info: MemslotInfo {
                id: (mem.slot & 0xFFFF) as u16,
                as_id,
                base_gfn,
                npages,
                userspace_addr: mem.userspace_addr,
                flags: mem.flags,
                guest_memfd: gmem,
                guest_memfd_offset: if gmem.is_some() {
                    mem.guest_memfd_offset
                } else {
                    0
                },
                gmem_open: gmem.is_some(),
                gmem_only: false,
                serial,
            },
            tracker,
        };
        let mut slot = slot;
        if let Some(fd) = gmem {
            slot.gmem_only = self.kvm_gmem_bind(fd, slot.gmem_pgoff(), npages, as_id, slot.id);
        }
        self.memslots.install(slot);
        Ok(())
    }
}
