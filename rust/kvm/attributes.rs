//! KVM_SET_MEMORY_ATTRIBUTES: virt/kvm/kvm_main.c's
//! kvm_vm_ioctl_set_mem_attributes() and kvm_vm_set_mem_attributes()
//! (Linux 6.8), as steps and as the whole operation built from them.
//!
//! ```text
//!   checks ──► reserve ──► pre-set pass ──► store ──► post-set pass
//!   (EINVAL)   (early exit,  mmu_lock:        set_range  mmu_lock:
//!              ENOMEM with   begin, per range:           end, per range:
//!              nothing       range_add + zap,            mixed flags
//!              changed)      one flush
//! ```
//!
//! The Python driver runs the steps itself when hooks, the seed's v11
//! ordering or the lock checker must see between them; otherwise
//! [`Kvm::set_memory_attributes`] runs them here.

use super::*;

impl Kvm {
    /// kvm_vm_ioctl_set_mem_attributes()'s checks, in the kernel's order,
    /// each EINVAL with nothing changed (ENOTTY first, and uncounted, on a
    /// host built without generic memory attributes). On success the call counts as a
    /// set call and the gfn range [start, end) is returned; on failure as a
    /// failed one.
    #[inline(always)]
    pub fn kvm_vm_ioctl_set_mem_attributes_checks(
        &mut self,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<(u64, u64), KvmError> {
        self.kvm_vm_ioctl_compiled_in(caps::BuildDependentIoctl::SetMemoryAttributes)?;
        let supported = self.config.supported_attributes();
        let r = if flags != 0 {
            fail(EINVAL, format!("flags {flags:#x} must be 0 (reserved)"))
        } else if attributes & !supported != 0 {
            fail(
                EINVAL,
                format!(
                    "attributes {attributes:#x} not supported by this VM (supported: {supported:#x})"
                ),
            )
        } else if size == 0 || address.checked_add(size).is_none() {
            fail(
                EINVAL,
                format!("size {size:#x} is 0 or address + size wraps"),
            )
        } else if (address | size) & (PAGE_SIZE - 1) != 0 {
            fail(
                EINVAL,
                format!("address {address:#x} or size {size:#x} not page aligned"),
            )
        } else {
            Ok((address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT))
        };
        match r {
            Ok(_) => self.counters.set_calls += 1,
            Err(_) => self.counters.failed_calls += 1,
        }
        r
    }

    /// kvm_vm_set_mem_attributes()'s first step, under slots_lock: true if
    /// the whole range already has the attributes (the early exit);
    /// otherwise the storage is reserved so that storing cannot fail half
    /// way (ENOMEM leaves everything unchanged).
    #[inline(always)]
    pub fn kvm_vm_set_mem_attributes_reserve(
        &mut self,
        start: u64,
        end: u64,
        attributes: u64,
    ) -> Result<bool, KvmError> {
        let limit = self.config.attr_memory_limit;
        // The kernel reserves an xarray entry per gfn, so a range whose
        // entries need more nodes than any host has is ENOMEM (after the
        // early exit, as in the kernel), whichever store the model uses:
        // both stores give the same answer for it.
        if crate::xarray::worst_case_nodes(start, end) > crate::xarray::MAX_NODES {
            let noop = self
                .store_read()
                .has_value(start, end, attributes, u64::MAX)
                .map_err(bug)?;
            if noop {
                self.counters.noop_conversions += 1;
                return Ok(true);
            }
            self.counters.enomem += 1;
            return fail(
                ENOMEM,
                format!(
                    "out of memory: the kernel's xarray would need up to {} nodes of {} bytes for {} pages, more than any host has",
                    crate::xarray::worst_case_nodes(start, end),
                    crate::xarray::XA_NODE_BYTES,
                    end - start
                ),
            );
        }
        let r = self
            .store()
            .reserve_unless_has_value(start, end, attributes, limit);
        match r {
            Ok(noop) => {
                if noop {
                    self.counters.noop_conversions += 1;
                }
                Ok(noop)
            }
            Err(StoreError::OutOfMemory {
                needed,
                limit: Some(limit),
            }) => {
                self.counters.enomem += 1;
                fail(
                    ENOMEM,
                    format!(
                        "out of memory: {needed} bytes needed, attr_memory_limit is {limit} bytes"
                    ),
                )
            }
            Err(e @ StoreError::OutOfMemory { .. }) => {
                self.counters.enomem += 1;
                fail(ENOMEM, e.to_string())
            }
            Err(StoreError::Interrupted) => fail(EINTR, "interrupted".to_string()),
            Err(e) => Err(bug(e)),
        }
    }

    /// Drops what the reserve step reserved (a call that stops before
    /// storing).
    pub fn release_reservations(&mut self) {
        self.store().release_reservations();
    }

    /// kvm_pre_set_memory_attributes(), the pre-set pass's handler (mmu_lock
    /// held, inside mmu_invalidate_begin()): the range is added to the
    /// invalidation even when nothing needs zapping, so faults stay away
    /// from gfns whose attributes are in flux; then the arch zaps. True if a
    /// TLB flush is needed.
    #[inline(always)]
    pub fn kvm_pre_set_memory_attributes(
        &mut self,
        rng: &GfnRange,
        attributes: u64,
    ) -> Result<bool, KvmError> {
        self.kvm_mmu_invalidate_range_add(rng.start, rng.end);
        let flush = self.kvm_arch_pre_set_memory_attributes(rng, attributes)?;
        self.counters.pre_set_ranges += 1;
        if flush {
            self.counters.zapped_ranges += 1;
        }
        Ok(flush)
    }

    /// The store step: every page of [start, end) gets the attributes (the
    /// reservation makes this infallible for the store's memory).
    #[inline(always)]
    pub fn kvm_set_mem_attributes_store(
        &mut self,
        start: u64,
        end: u64,
        attributes: u64,
    ) -> Result<(), KvmError> {
        // Reserved, so it cannot fail; and it must not stop half way.
        crate::interrupt::masked_steps(end - start, || {
            self.store().set_range(start, end, attributes)
        })
        .map_err(bug)?;
        self.counters.conversions += 1;
        self.counters.pages_converted += end - start;
        Ok(())
    }

    /// kvm_post_set_memory_attributes()'s per-range work, the post-set
    /// pass's handler (mmu_lock held).
    #[inline(always)]
    pub fn kvm_post_set_memory_attributes(
        &mut self,
        rng: &GfnRange,
        attributes: u64,
    ) -> Result<(), KvmError> {
        self.kvm_arch_post_set_memory_attributes(rng, attributes)?;
        self.counters.post_set_ranges += 1;
        Ok(())
    }

    /// KVM_SET_MEMORY_ATTRIBUTES as one operation (Linux 6.8 ordering): true
    /// if the call changed attributes, false for the early exit.
    pub fn set_memory_attributes(
        &mut self,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> Result<bool, KvmError> {
        let (start, end) =
            self.kvm_vm_ioctl_set_mem_attributes_checks(address, size, attributes, flags)?;
        // The clipped ranges live in a buffer the VM keeps, so a replay
        // loop allocates nothing per call.
        let mut ranges = std::mem::take(&mut self.scratch);
        // No Python runs inside a whole set, so the store's lock is taken
        // once for it rather than once per step.
        // SAFETY: the closure only runs this Kvm's own steps.
        let r = unsafe {
            self.with_store_held(|k| {
                k.kvm_vm_set_mem_attributes(start, end, attributes, &mut ranges)
            })
        };
        self.scratch = ranges;
        if r.is_err() {
            self.counters.failed_calls += 1;
        }
        r
    }

    /// kvm_vm_set_mem_attributes(), under slots_lock. `ranges` is scratch
    /// space, reused by callers that loop.
    pub(super) fn kvm_vm_set_mem_attributes(
        &mut self,
        start: u64,
        end: u64,
        attributes: u64,
        ranges: &mut Vec<GfnRange>,
    ) -> Result<bool, KvmError> {
        if self.kvm_vm_set_mem_attributes_reserve(start, end, attributes)? {
            return Ok(false);
        }
        ranges.clear();
        self.clip_gfn_ranges(start, end, ranges);
        // kvm_handle_gfn_range(): mmu_lock once, lazily, for a pass with at
        // least one range; on_lock first; one flush if any handler asked.
        if !ranges.is_empty() {
            self.note_mmu_lock();
            self.kvm_mmu_invalidate_begin();
            let mut flush = false;
            for rng in ranges.iter() {
                match self.kvm_pre_set_memory_attributes(rng, attributes) {
                    Ok(f) => flush |= f,
                    Err(e) => {
                        // Like the Python driver's cleanup: close the
                        // invalidation so faults are not blocked forever.
                        self.kvm_mmu_invalidate_end()?;
                        self.release_reservations();
                        return Err(e);
                    }
                }
            }
            if flush {
                self.kvm_flush_remote_tlbs();
            }
        }
        if let Err(e) = self.kvm_set_mem_attributes_store(start, end, attributes) {
            if !ranges.is_empty() {
                self.kvm_mmu_invalidate_end()?;
            }
            self.release_reservations();
            return Err(e);
        }
        // Post-set pass: mmu_invalidate_end as on_lock, inside mmu_lock.
        if !ranges.is_empty() {
            self.note_mmu_lock();
            self.kvm_mmu_invalidate_end()?;
            for rng in ranges.iter() {
                self.kvm_post_set_memory_attributes(rng, attributes)?;
            }
        }
        Ok(true)
    }
}
