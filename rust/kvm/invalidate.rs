//! kvm->mmu_invalidate_{seq,in_progress,range_start,range_end}: how
//! invalidations keep faults away from gfns in flux.
//!
//! ```text
//!   invalidator (mmu_lock held)           fault
//!   ─────────────────────────────         ─────────────────────────────
//!   begin():     in_progress++            mmu_seq = seq       (lockless)
//!   range_add(): range ∪= [s, e)          ...faultin the pfn...
//!   ...zap...                             lock mmu_lock
//!   end():       seq++, in_progress--     retry if in_progress covers gfn
//!                                              or seq != mmu_seq
//! ```
//!
//! The sequence moves before the count drops, so a fault that sees
//! in_progress == 0 also sees the new sequence and retries.

use super::{Kvm, KvmError, KvmWarning, INVALID_GPA};

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
    /// Whether an invalidation in progress covers `gfn`. A range not yet
    /// added while in progress covers everything: the kernel WARNs and
    /// retries (mmu_lock was dropped between begin and range_add).
    pub fn covers(&self, gfn: u64) -> bool {
        if self.in_progress == 0 {
            return false;
        }
        if self.range_start == INVALID_GPA || self.range_end == INVALID_GPA {
            return true;
        }
        self.range_start <= gfn && gfn < self.range_end
    }

    /// mmu_invalidate_retry_gfn(): the fault that read `mmu_seq` must retry.
    pub fn retry_gfn(&self, mmu_seq: u64, gfn: u64) -> bool {
        self.covers(gfn) || self.seq != mmu_seq
    }
}

impl Kvm {
    /// kvm_mmu_invalidate_begin() (mmu_lock held).
    pub fn kvm_mmu_invalidate_begin(&mut self) {
        let inv = &mut self.inval;
        inv.in_progress += 1;
        if inv.in_progress == 1 {
            inv.range_start = INVALID_GPA;
            inv.range_end = INVALID_GPA;
        }
    }

    /// kvm_mmu_invalidate_range_add(): widen the range faults must avoid
    /// to the hull (mmu_lock held). WARNs outside begin()/end().
    pub fn kvm_mmu_invalidate_range_add(&mut self, start: u64, end: u64) {
        if self.inval.in_progress == 0 {
            self.warn(KvmWarning::RangeAddOutsideInvalidation);
        }
        let inv = &mut self.inval;
        if inv.range_start == INVALID_GPA {
            inv.range_start = start;
            inv.range_end = end;
        } else {
            inv.range_start = inv.range_start.min(start);
            inv.range_end = inv.range_end.max(end);
        }
    }

    /// kvm_mmu_invalidate_end() (mmu_lock held): KVM_BUG_ON without a
    /// matching begin().
    pub fn kvm_mmu_invalidate_end(&mut self) -> Result<(), KvmError> {
        if self.inval.in_progress == 0 {
            return Err(KvmError::Bug(
                "mmu_invalidate_end() without a matching begin()".into(),
            ));
        }
        self.inval.seq += 1;
        self.inval.in_progress -= 1;
        if self.inval.range_start == INVALID_GPA {
            self.warn(KvmWarning::EndWithoutRange);
        }
        Ok(())
    }
}
