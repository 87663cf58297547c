//! Replaying operation records: the native driver's loop over the core's
//! whole operations, one thread, with nothing in Python between them.
//!
//! ```text
//!   ops: [set][fault][fault][fallocate][memslot change] ...
//!          └────── replay() runs these ──────┘ └ stops: the caller runs it
//! ```

use super::*;

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

/// Where a replay reads its operations from: a slice of [`Op`]s, or a
/// trace's columns as they are (no copy of the arrays).
pub trait Ops {
    fn len(&self) -> usize;
    fn op(&self, i: usize) -> Op;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ops for [Op] {
    fn len(&self) -> usize {
        <[Op]>::len(self)
    }
    #[inline(always)]
    fn op(&self, i: usize) -> Op {
        self[i]
    }
}

/// A trace's record fields, one slice per column, all of one length.
#[derive(Debug, Clone, Copy)]
pub struct OpColumns<'a> {
    pub kind: &'a [u8],
    pub gpa: &'a [u64],
    pub size: &'a [u64],
    pub attributes: &'a [u64],
    pub arg: &'a [u64],
    pub flags: &'a [u8],
}

impl<'a> OpColumns<'a> {
    /// The columns, or the name and length of the first one whose length
    /// differs from `kind`'s.
    pub fn new(
        kind: &'a [u8],
        gpa: &'a [u64],
        size: &'a [u64],
        attributes: &'a [u64],
        arg: &'a [u64],
        flags: &'a [u8],
    ) -> Result<Self, (&'static str, usize)> {
        let n = kind.len();
        for (name, len) in [
            ("gpa", gpa.len()),
            ("size", size.len()),
            ("attributes", attributes.len()),
            ("arg", arg.len()),
            ("flags", flags.len()),
        ] {
            if len != n {
                return Err((name, len));
            }
        }
        Ok(Self {
            kind,
            gpa,
            size,
            attributes,
            arg,
            flags,
        })
    }
}

impl Ops for OpColumns<'_> {
    fn len(&self) -> usize {
        self.kind.len()
    }
    #[inline(always)]
    fn op(&self, i: usize) -> Op {
        Op {
            kind: self.kind[i],
            gpa: self.gpa[i],
            size: self.size[i],
            attributes: self.attributes[i],
            arg: self.arg[i],
            flags: self.flags[i],
        }
    }
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
    kvm: &mut Kvm,
    ops: &(impl Ops + ?Sized),
    results: &mut [i64],
    tally: &mut ReplayTally,
) -> Result<usize, KvmError> {
    assert_eq!(ops.len(), results.len(), "one result per operation");
    // Nothing in the loop runs Python, so the store's lock is taken once
    // for the batch rather than several times per operation.
    // SAFETY: the loop only runs the Kvm's own whole operations.
    unsafe { kvm.with_store_held(|kvm| replay_held(kvm, ops, results, tally)) }
}

fn replay_held(
    kvm: &mut Kvm,
    ops: &(impl Ops + ?Sized),
    results: &mut [i64],
    tally: &mut ReplayTally,
) -> Result<usize, KvmError> {
    let mut prefetch = false;
    for i in 0..ops.len() {
        let op = &ops.op(i);
        if i % crate::prefetch::RECHECK == 0 {
            prefetch = kvm.prefetch_pays();
        }
        if prefetch && i + 1 < ops.len() {
            // The next operation's memory is asked for now, so its misses
            // overlap this operation's work (a hint: it changes nothing).
            kvm.prefetch(ops.op(i + 1).gpa);
        }
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
                match kvm.kvm_gmem_fallocate(op.attributes, op.arg, op.gpa as i64, op.size as i64) {
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

fn replay_fault(kvm: &mut Kvm, op: &Op, tally: &mut ReplayTally) -> Result<i64, KvmError> {
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
            match kvm.kvm_gmem_fallocate(
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
