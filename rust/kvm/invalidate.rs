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
    /// kvm_mmu_invalidate_begin() (mmu_lock held): `in_progress++`, as its
    /// read and its write (see [`Kvm::kvm_mmu_invalidate_begin_write`]).
    pub fn kvm_mmu_invalidate_begin(&mut self) {
        let in_progress = self.inval.in_progress;
        self.kvm_mmu_invalidate_begin_write(in_progress);
    }

    /// The write half of kvm_mmu_invalidate_begin()'s `in_progress++`,
    /// given the value its read half saw. The kernel's increment is a plain
    /// read-modify-write, atomic only because mmu_lock is held; the
    /// interleaving explorer runs the two halves as separate steps to show
    /// what happens when a caller does not hold it (the seed's v11).
    pub fn kvm_mmu_invalidate_begin_write(&mut self, in_progress_read: u64) {
        let inv = &mut self.inval;
        inv.in_progress = in_progress_read.wrapping_add(1);
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

    /// kvm_mmu_invalidate_end() (mmu_lock held): `seq++`, then
    /// `in_progress--`, each a read and a write (the explorer splits them,
    /// see [`Kvm::kvm_mmu_invalidate_begin_write`]). KVM_BUG_ON without a
    /// matching begin(); checked before anything moves, so the whole call
    /// changes nothing then.
    pub fn kvm_mmu_invalidate_end(&mut self) -> Result<(), KvmError> {
        let in_progress = self.inval.in_progress;
        Self::check_invalidate_end(in_progress)?;
        let seq = self.inval.seq;
        self.kvm_mmu_invalidate_end_seq_write(seq);
        self.kvm_mmu_invalidate_end_write(in_progress)
    }

    /// KVM_BUG_ON(mmu_invalidate_in_progress < 0): the decrement of a count
    /// read as `in_progress_read` would go negative.
    fn check_invalidate_end(in_progress_read: u64) -> Result<(), KvmError> {
        if in_progress_read == 0 {
            return Err(KvmError::Bug(
                "mmu_invalidate_end() without a matching begin()".into(),
            ));
        }
        Ok(())
    }

    /// The write half of kvm_mmu_invalidate_end()'s `seq++`.
    pub fn kvm_mmu_invalidate_end_seq_write(&mut self, seq_read: u64) {
        self.inval.seq = seq_read.wrapping_add(1);
    }

    /// The write half of kvm_mmu_invalidate_end()'s `in_progress--`, then
    /// its checks: KVM_BUG_ON if the count would go negative (nothing
    /// written), WARN_ON_ONCE if no range was added since begin().
    pub fn kvm_mmu_invalidate_end_write(&mut self, in_progress_read: u64) -> Result<(), KvmError> {
        Self::check_invalidate_end(in_progress_read)?;
        self.inval.in_progress = in_progress_read - 1;
        if self.inval.range_start == INVALID_GPA {
            self.warn(KvmWarning::EndWithoutRange);
        }
        Ok(())
    }
}
