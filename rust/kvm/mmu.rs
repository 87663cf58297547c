//! The x86 TDP MMU model: zaps, faults and KVM_EXIT_MEMORY_FAULT, the
//! memory-attribute passes, and what memslot changes do to mappings.
//! Follows arch/x86/kvm/mmu/mmu.c (Linux 6.8 and later):
//! kvm_arch_pre/post_set_memory_attributes, kvm_faultin_pfn /
//! __kvm_faultin_pfn / kvm_faultin_pfn_private, kvm_mmu_hugepage_adjust,
//! mmu_invalidate_retry_gfn, kvm_mmu_slot_apply_flags (x86.c) and
//! zap_collapsible_spte_range (tdp_mmu.c).
//!
//! ```text
//!   fault(gpa)                                      roots[as_id]
//!   ├─ kvm_faultin_pfn()   no lock: exit? MMIO?     ┌──────────────────┐
//!   │                      retry? -> mmu_seq        │ 4K │ 2M │ 1G     │
//!   └─ kvm_tdp_map()       mmu_lock: stale? ──────► │ radix page table │
//!                          max level, install       └──────────────────┘
//! ```

use super::*;
use crate::hugepage::{
    hpage_gfn_shift, LevelCounts, KVM_MAX_HUGEPAGE_LEVEL, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K,
};

/// The largest mapping level a guest_memfd folio of `order` can back.
pub fn max_level_for_order(order: u32) -> u8 {
    if order >= 18 {
        PG_LEVEL_1G
    } else if order >= 9 {
        PG_LEVEL_2M
    } else {
        PG_LEVEL_4K
    }
}

/// What kvm_faultin_pfn() decided, before mmu_lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultIn {
    /// Go back to the guest and fault again (RET_PF_RETRY): an
    /// invalidation covers the gfn.
    Retry,
    /// A shared access outside every memslot: emulated MMIO, nothing mapped.
    Mmio,
    /// Map it, if nothing was invalidated since `mmu_seq` was read.
    Map { mmu_seq: u64, serial: u64 },
}

impl Kvm {
    /// kvm_mem_is_private().
    #[inline]
    fn mem_is_private(&self, gfn: u64) -> bool {
        // gmem in-place: the attribute of the guest_memfd page bound to gfn.
        if self.config.semantics.is_gmem_inplace() {
            return self.kvm_gmem_is_private_gfn(gfn);
        }
        self.store_read().get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
    }

    /// Counts leaves removed from a root; true if there were any.
    fn account_removed(&mut self, removed: LevelCounts) -> bool {
        for (z, n) in self.counters.zapped_pages.iter_mut().zip(removed) {
            *z += n;
        }
        removed.iter().any(|&n| n != 0)
    }

    /// Live leaves per level over every root.
    pub fn mapped(&self) -> [u64; 3] {
        let mut total = [0; 3];
        for root in &self.roots {
            for (t, n) in total.iter_mut().zip(root.counts()) {
                *t += n;
            }
        }
        total
    }

    /// kvm_unmap_gfn_range(): zap the leaves of `as_id`'s root that
    /// intersect [start, end) (huge leaves straddling it go whole). True if
    /// anything was mapped, i.e. a TLB flush is needed.
    pub fn kvm_unmap_gfn_range(
        &mut self,
        as_id: usize,
        start: u64,
        end: u64,
    ) -> Result<bool, KvmError> {
        self.kvm_unmap_gfn_range_filtered(as_id, start, end, KVM_FILTER_SHARED | KVM_FILTER_PRIVATE)
    }

    /// kvm_unmap_gfn_range() for a kvm_gfn_range whose attr_filter names
    /// the kinds of leaves to zap: only guest_memfd's invalidation narrows
    /// it (6.18). kvm_tdp_mmu_unmap_gfn_range() turns the filter into root
    /// types (kvm_gfn_range_filter_to_root_types): a VM without a mirror
    /// root (every type but TDX) has its private and shared leaves in the
    /// one direct root, which is walked whatever the filter; a TDX VM walks
    /// the mirror root (private leaves) for KVM_FILTER_PRIVATE and the
    /// direct root (shared leaves) for KVM_FILTER_SHARED.
    pub fn kvm_unmap_gfn_range_filtered(
        &mut self,
        as_id: usize,
        start: u64,
        end: u64,
        attr_filter: u64,
    ) -> Result<bool, KvmError> {
        let attr_filter = if self.kvm_has_mirrored_tdp() {
            attr_filter
        } else {
            KVM_FILTER_SHARED | KVM_FILTER_PRIVATE
        };
        let removed = self.roots[as_id].zap_filtered(start, end, attr_filter)?;
        Ok(self.account_removed(removed))
    }

    /// kvm_has_mirrored_tdp(): private leaves live in a root of their own.
    pub fn kvm_has_mirrored_tdp(&self) -> bool {
        self.config.vm_type == KVM_X86_TDX_VM
    }

    /// kvm_mmu_unmap_gfn_range(), an invalidation's handler (mmu_lock held,
    /// inside begin()/end()): add the range to the invalidation, then zap
    /// it. True if a TLB flush is needed.
    pub fn kvm_mmu_unmap_gfn_range(
        &mut self,
        as_id: usize,
        start: u64,
        end: u64,
        attr_filter: u64,
    ) -> Result<bool, KvmError> {
        self.kvm_mmu_invalidate_range_add(start, end);
        self.kvm_unmap_gfn_range_filtered(as_id, start, end, attr_filter)
    }

    fn warn_once(&mut self, w: KvmWarning) {
        // WARN_ON_ONCE: report the caller's bug once per VM, survive it.
        if !self.warned.contains(&w) {
            self.warned.push(w);
            self.warn(w);
        }
    }

    /// The slot a set-path range names, checked against its identity: the
    /// ranges are only valid while slots_lock is held.
    fn range_slot(&self, rng: &GfnRange) -> Result<&Memslot, KvmError> {
        match self.memslots.at(rng.as_id, rng.index) {
            Some(s)
                if s.serial == rng.serial && s.base_gfn <= rng.start && rng.end <= s.end_gfn() =>
            {
                Ok(s)
            }
            _ => Err(bug(format_args!(
                "gfn range [{:#x}, {:#x}) names a memslot that changed (slots_lock not held?)",
                rng.start, rng.end
            ))),
        }
    }

    /// kvm_arch_pre_set_memory_attributes(): add the straddling head and
    /// tail hugepages that are not mixed to the ongoing invalidation (see
    /// [`MmuParams::invalidate_straddling_hugepages`]), then zap the leaves
    /// intersecting the range: since the TDX MMU (Linux 6.14), only the
    /// old attribute's mappings ("Unmap the old attribute page": shared ones
    /// when converting to private, private ones otherwise), which on a VM
    /// without a mirror root is every mapping anyway. True if a TLB flush is
    /// needed.
    #[inline(always)]
    pub fn kvm_arch_pre_set_memory_attributes(
        &mut self,
        rng: &GfnRange,
        attributes: u64,
    ) -> Result<bool, KvmError> {
        let slot = self.range_slot(rng)?;
        // A VM without private memory never gets here (its supported
        // attribute mask is empty) unless the store was written behind its
        // back.
        if !self.config.has_private_mem {
            self.warn_once(KvmWarning::PreSetWithoutPrivateMem);
            return Ok(false);
        }
        if self.mmu.invalidate_straddling_hugepages {
            // Otherwise a fault on a gfn outside the range, racing with the
            // conversion, could install a hugepage from mixed flags that are
            // about to change. range_add() only widens to the hull, so the
            // hull of the straddlers leaves the same state as each of them.
            if let Some((s, e)) = slot.tracker.straddling_hugepages_hull(rng.start, rng.end)? {
                self.kvm_mmu_invalidate_range_add(s, e);
            }
        }
        let attr_filter = if !self.config.is_618() {
            KVM_FILTER_SHARED | KVM_FILTER_PRIVATE
        } else if attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            KVM_FILTER_SHARED
        } else {
            KVM_FILTER_PRIVATE
        };
        self.kvm_unmap_gfn_range_filtered(rng.as_id, rng.start, rng.end, attr_filter)
    }

    /// kvm_arch_post_set_memory_attributes(): recompute the mixed flags of
    /// the hugepages the range touches (2M, then 1G, which consumes the 2M
    /// results). Never asks for a flush.
    #[inline(always)]
    pub fn kvm_arch_post_set_memory_attributes(
        &mut self,
        rng: &GfnRange,
        attributes: u64,
    ) -> Result<(), KvmError> {
        self.range_slot(rng)?;
        if !self.config.has_private_mem {
            self.warn_once(KvmWarning::PostSetWithoutPrivateMem);
            return Ok(());
        }
        // Disjoint fields: the store is read while the slot's tracker is
        // written.
        let store = read_store(&self.store, &self.held);
        let slot = self.memslots.at_mut(rng.as_id, rng.index).expect("checked");
        slot.tracker
            .post_set_memory_attributes(&*store, rng.start, rng.end, attributes)?;
        Ok(())
    }

    /// kvm_arch_flush_shadow_memslot(): zap what the slot's removal makes
    /// stale (every root, per KVM_X86_QUIRK_SLOT_ZAP_ALL, or the slot's
    /// gfns) under mmu_lock.
    pub(super) fn kvm_arch_flush_shadow_memslot(&mut self, as_id: usize, index: usize) {
        self.note_mmu_lock();
        let mut removed = [0u64; 3];
        if self.mmu.slot_zap_all {
            for root in &mut self.roots {
                for (t, n) in removed.iter_mut().zip(root.zap_all()) {
                    *t += n;
                }
            }
        } else {
            let s = &self.memslots.address_space(as_id)[index];
            let (start, end) = (s.base_gfn, s.end_gfn());
            // A slot is never empty, so the range is valid.
            removed = self.roots[as_id].zap(start, end).unwrap_or_default();
        }
        self.account_removed(removed);
    }

    /// kvm_mmu_slot_apply_flags() for a flags-only change (x86.c), which
    /// can only toggle dirty logging (READONLY cannot change; guest_memfd
    /// slots cannot log). On: split the slot's huge leaves to 4K
    /// (eager_page_split), clear dirty bits (PML), write-protect (not
    /// modelled: the model tracks no writes), one flush; with
    /// KVM_DIRTY_LOG_INITIALLY_SET every page counts as dirty and nothing
    /// happens. Off: recover hugepages (zap_collapsible_spte_range).
    pub(super) fn kvm_mmu_slot_apply_flags(&mut self, as_id: usize, index: usize, old_flags: u32) {
        let slot = &self.memslots.address_space(as_id)[index];
        let flags = slot.flags;
        if (old_flags ^ flags) & KVM_MEM_LOG_DIRTY_PAGES == 0 || flags & KVM_MEM_READONLY != 0 {
            return;
        }
        let (start, end) = (slot.base_gfn, slot.end_gfn());
        if flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
            // kvm_dirty_log_manual_protect_and_init_set()
            if self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET != 0 {
                return;
            }
            if self.mmu.eager_page_split {
                self.note_mmu_lock(); // kvm_mmu_slot_try_split_huge_pages
                let _ = self.roots[as_id].split_huge_pages(start, end);
            }
            if self.mmu.pml {
                self.note_mmu_lock(); // kvm_mmu_slot_leaf_clear_dirty
            }
            self.note_mmu_lock(); // kvm_mmu_slot_remove_write_access
                                  // Unconditional, once the slot is write-protected.
            self.kvm_flush_remote_tlbs();
            return;
        }
        self.note_mmu_lock(); // kvm_mmu_zap_collapsible_sptes
        self.zap_collapsible_spte_range(as_id, index);
    }

    /// zap_collapsible_spte_range(): top down, zap each 1G then 2M page
    /// table (a region holding smaller leaves) whose first gfn is in the
    /// slot and whose level the gfn can now be mapped at; a successful
    /// atomic zap flushes the range.
    fn zap_collapsible_spte_range(&mut self, as_id: usize, index: usize) {
        let slot = &self.memslots.address_space(as_id)[index];
        let (start, end, can_be_private) = (slot.base_gfn, slot.end_gfn(), slot.can_be_private());
        for (level, smaller) in [
            (PG_LEVEL_1G, &[PG_LEVEL_4K, PG_LEVEL_2M][..]),
            (PG_LEVEL_2M, &[PG_LEVEL_4K][..]),
        ] {
            let shift = hpage_gfn_shift(level);
            let mut tables = std::collections::BTreeSet::new();
            for &l in smaller {
                for (s, e) in self.roots[as_id].runs(l).unwrap_or_default() {
                    let (s, e) = (s.max(start), e.min(end));
                    if s < e {
                        tables.extend((s >> shift)..=((e - 1) >> shift));
                    }
                }
            }
            for table in tables {
                let gfn = table << shift;
                if gfn < start {
                    continue; // the hugepage is not inside the slot
                }
                let private = can_be_private && self.mem_is_private(gfn);
                match self.max_level(as_id, index, gfn, private) {
                    Ok(l) if l >= level => {}
                    _ => continue,
                }
                let removed = self.roots[as_id]
                    .zap(gfn, gfn + (1 << shift))
                    .unwrap_or_default();
                self.account_removed(removed);
                self.kvm_flush_remote_tlbs();
            }
        }
    }

    // --- faults ------------------------------------------------------------------

    /// kvm_mmu_prepare_memory_fault_exit(): gpa page aligned, one page,
    /// PRIVATE iff the access was private (RWX flags are not reported).
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

    /// kvm_faultin_pfn() for a TDP fault at `gpa` in `as_id`, without
    /// mmu_lock: read mmu_seq, retry if an invalidation covers the gfn,
    /// then __kvm_faultin_pfn()'s exits. `first` counts the fault (a retry
    /// is the same fault). Errors: MemoryFault, or EINVAL for an address
    /// space the VM does not have.
    #[inline(always)]
    pub fn kvm_faultin_pfn(
        &mut self,
        gpa: u64,
        private: bool,
        as_id: usize,
        first: bool,
    ) -> Result<FaultIn, KvmError> {
        self.check_as_id(as_id)?;
        if first {
            self.counters.faults += 1;
        }
        let gfn = gpa >> PAGE_SHIFT;
        let mmu_seq = self.inval.seq;
        let slot = self.memslots.find(as_id, gfn);
        // Don't fault in a pfn that is being invalidated
        // (mmu_invalidate_retry_gfn_unsafe).
        if slot.is_some() && self.inval.covers(gfn) {
            self.counters.fault_retries += 1;
            return Ok(FaultIn::Retry);
        }
        let is_private = self.mem_is_private(gfn);
        let Some(i) = slot else {
            // A private access, or one whose private-ness differs from the
            // attribute, exits; a shared one is MMIO, emulated without a
            // mapping (kvm_handle_noslot_fault).
            if private || is_private {
                return Err(self.memory_fault_exit(gfn, private));
            }
            self.counters.mmio_faults += 1;
            return Ok(FaultIn::Mmio);
        };
        if private != is_private {
            return Err(self.memory_fault_exit(gfn, private));
        }
        let s = &self.memslots.address_space(as_id)[i];
        // kvm_faultin_pfn_private(): no guest_memfd, or its file was closed
        // (kvm_gmem_get_pfn fails): exit. A guest_memfd-only slot (6.18)
        // serves shared faults from guest_memfd too, with the same exit.
        if (private || s.gmem_only) && !(s.can_be_private() && s.gmem_open) {
            return Err(self.memory_fault_exit(gfn, private));
        }
        Ok(FaultIn::Map {
            mmu_seq,
            serial: s.serial,
        })
    }

    /// The mapping half of a TDP fault, under mmu_lock: None if the fault is
    /// stale (is_page_fault_stale: an invalidation covers the gfn, the
    /// sequence moved since `mmu_seq`, or the slot went away) and must
    /// retry; otherwise the level it mapped.
    #[inline(always)]
    pub fn kvm_tdp_map(
        &mut self,
        gpa: u64,
        private: bool,
        as_id: usize,
        mmu_seq: u64,
        serial: u64,
    ) -> Result<Option<u8>, KvmError> {
        let gfn = gpa >> PAGE_SHIFT;
        let slot = self.memslots.find(as_id, gfn);
        let live = slot.filter(|&i| self.memslots.address_space(as_id)[i].serial == serial);
        let Some(i) = live.filter(|_| !self.inval.retry_gfn(mmu_seq, gfn)) else {
            self.counters.fault_retries += 1;
            return Ok(None);
        };
        let level = self.max_level(as_id, i, gfn, private)?;
        let (_, removed) = self.roots[as_id].map(gfn, level, private)?;
        self.account_removed(removed);
        self.gmem_note_faulted(as_id, gfn);
        Ok(Some(level))
    }

    /// A whole fault that cannot race (one thread, or mmu_lock and
    /// slots_lock held by the caller): the level mapped, 0 for MMIO, or
    /// MemoryFault. A fault that finds an invalidation covering its gfn
    /// is a caller bug here (nobody could end it).
    pub fn fault(&mut self, gpa: u64, private: bool, as_id: usize) -> Result<u8, KvmError> {
        match self.kvm_faultin_pfn(gpa, private, as_id, true)? {
            FaultIn::Mmio => Ok(0),
            FaultIn::Retry => Err(bug(format_args!(
                "fault at {gpa:#x} would retry forever: an invalidation is in progress"
            ))),
            FaultIn::Map { mmu_seq, serial } => {
                self.note_mmu_lock();
                match self.kvm_tdp_map(gpa, private, as_id, mmu_seq, serial)? {
                    Some(level) => Ok(level),
                    None => Err(bug(format_args!("fault at {gpa:#x} went stale alone"))),
                }
            }
        }
    }

    /// kvm_faultin_pfn_private()'s cap from the guest_memfd folio order,
    /// then kvm_mmu_hugepage_adjust() / __kvm_mmu_max_mapping_level():
    /// dirty logging, lpage_info, and for shared memory the host's level.
    #[inline(always)]
    fn max_level(
        &self,
        as_id: usize,
        index: usize,
        gfn: u64,
        private: bool,
    ) -> Result<u8, KvmError> {
        let slot = &self.memslots.address_space(as_id)[index];
        // Memory served by guest_memfd (private, or any fault on a
        // guest_memfd-only slot) is as large as its folio.
        let from_gmem = private || slot.gmem_only;
        let mut max_level = KVM_MAX_HUGEPAGE_LEVEL;
        if from_gmem {
            max_level = max_level.min(max_level_for_order(self.config.guest_memfd_max_order));
        }
        // gmem in-place: guest_memfd hands out PAGE_SIZE folios only in
        // this series (huge pages come later), shared or private.
        if self.config.semantics.is_gmem_inplace() && slot.guest_memfd.is_some() {
            return Ok(PG_LEVEL_4K);
        }
        // Dirty logging needs 4K granularity.
        if max_level == PG_LEVEL_4K || slot.flags & KVM_MEM_LOG_DIRTY_PAGES != 0 {
            return Ok(PG_LEVEL_4K);
        }
        let level = slot.tracker.max_mapping_level(gfn, max_level)?;
        // Private memory's size comes from guest_memfd alone; shared memory
        // is also bounded by how the host maps it.
        Ok(if from_gmem {
            level
        } else {
            level.min(self.mmu.host_mapping_level)
        })
    }

    // --- inspection --------------------------------------------------------------

    /// An address space this VM has, or an Argument error.
    fn check_as_id(&self, as_id: usize) -> Result<(), KvmError> {
        if as_id >= self.roots.len() {
            return Err(KvmError::Argument(format!(
                "as_id must be in 0..{}, got {as_id}",
                self.roots.len() - 1
            )));
        }
        Ok(())
    }

    /// A memslot by uapi number (as_id << 16 | id) whose hugepages of
    /// `level` (2 or 3) are to be inspected.
    fn inspected_slot(&self, slot: u64, level: u64) -> Result<(&Memslot, u8), KvmError> {
        let level = match level {
            2 => PG_LEVEL_2M,
            3 => PG_LEVEL_1G,
            _ => {
                return Err(KvmError::Argument(format!(
                    "level must be 2 (2M) or 3 (1G), got {level}"
                )))
            }
        };
        let found = u32::try_from(slot).ok().and_then(|s| {
            let as_id = (s >> 16) as usize;
            let i = self.memslots.index_of_id(as_id, (s & 0xFFFF) as u16)?;
            Some(&self.memslots.address_space(as_id)[i])
        });
        let s =
            found.ok_or_else(|| KvmError::Argument(format!("slot {slot:#x} does not exist")))?;
        Ok((s, level))
    }

    /// The level a fault at `gfn` whose private-ness matches the gfn's
    /// attribute would map now; an Argument error outside every memslot.
    pub fn max_mapping_level(&self, as_id: usize, gfn: u64) -> Result<u8, KvmError> {
        self.check_as_id(as_id)?;
        let Some(i) = self.memslots.find(as_id, gfn) else {
            return Err(KvmError::Argument(format!(
                "gfn {gfn:#x} is not in any memslot of address space {as_id}"
            )));
        };
        let private =
            self.memslots.address_space(as_id)[i].can_be_private() && self.mem_is_private(gfn);
        self.max_level(as_id, i, gfn, private)
    }

    /// hugepage_test_mixed() of the `level` hugepage holding `gfn` in uapi
    /// slot `slot`; an Argument error if the slot does not exist or `gfn` is
    /// outside it.
    pub fn hugepage_mixed(&self, slot: u64, gfn: u64, level: u64) -> Result<bool, KvmError> {
        let (s, level) = self.inspected_slot(slot, level)?;
        if !(s.base_gfn..s.end_gfn()).contains(&gfn) {
            return Err(KvmError::Argument(format!(
                "gfn {gfn:#x} is outside slot {slot:#x} [{:#x}, {:#x})",
                s.base_gfn,
                s.end_gfn()
            )));
        }
        Ok(s.tracker.test_mixed(gfn, level)?)
    }

    /// The runs of hugepage numbers (`gfn >> shift`) whose mixed flag is
    /// set in a memslot, for `level` 2 or 3.
    pub fn mixed_runs(&self, slot: u64, level: u64) -> Result<Vec<(u64, u64)>, KvmError> {
        let (s, level) = self.inspected_slot(slot, level)?;
        Ok(s.tracker.mixed_runs(level)?)
    }

    /// Level of the leaf mapping `gfn` in `as_id` (0 if unmapped).
    pub fn mapped_level(&self, as_id: usize, gfn: u64) -> u8 {
        self.roots
            .get(as_id)
            .and_then(|r| r.mapped_level(gfn))
            .unwrap_or(0)
    }

    /// Whether the leaf mapping `gfn` in `as_id` was installed by a private
    /// fault (None: unmapped). Only a VM with a mirror root (TDX) records
    /// it; any other VM's leaves all answer false.
    pub fn mapped_private(&self, as_id: usize, gfn: u64) -> Option<bool> {
        self.roots.get(as_id)?.mapped_private(gfn)
    }

    /// The leaves of `level` (1, 2 or 3) in `as_id` as gfn runs.
    pub fn mappings(&self, as_id: usize, level: u64) -> Result<Vec<(u64, u64)>, KvmError> {
        self.check_as_id(as_id)?;
        if !(1..=3).contains(&level) {
            return Err(KvmError::Argument(format!(
                "level must be 1, 2 or 3, got {level}"
            )));
        }
        Ok(self.roots[as_id].runs(level as u8)?)
    }
}
