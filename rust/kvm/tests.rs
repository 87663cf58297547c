//! The core against per-page oracles (no other copy of a rule).

use super::memslots::UserspaceMemoryRegion;
use super::mmu::FaultIn;
use super::replay::*;
use super::*;
use crate::hugepage::{PG_LEVEL_2M, PG_LEVEL_4K};
use crate::rangetree::RangeTree;
use crate::xarray::XArray;
use proptest::prelude::*;

const P: u64 = KVM_MEMORY_ATTRIBUTE_PRIVATE;
const M2: u64 = 512;

fn vm(per_page: bool) -> Kvm {
    let store: SharedStore = if per_page {
        Arc::new(RwLock::new(XArray::new()))
    } else {
        Arc::new(RwLock::new(RangeTree::new()))
    };
    Kvm::new(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::Linux68,
        store,
        per_page,
        None,
        18,
    )
    .unwrap()
}

/// A guest_memfd slot `id` of `npages` at `base_gfn`, backed at an address
/// congruent with the gpa.
fn add_slot(k: &mut Kvm, id: u32, base_gfn: u64, npages: u64) -> u64 {
    let fd = k.kvm_gmem_create(npages << PAGE_SHIFT, 0).unwrap();
    k.kvm_set_memory_region(
        &UserspaceMemoryRegion {
            slot: id,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: base_gfn << PAGE_SHIFT,
            memory_size: npages << PAGE_SHIFT,
            userspace_addr: base_gfn << PAGE_SHIFT,
            guest_memfd: fd as u32,
            guest_memfd_offset: 0,
        },
        false,
    )
    .unwrap();
    fd
}

fn errno<T: std::fmt::Debug>(r: Result<T, KvmError>) -> i32 {
    r.unwrap_err().errno()
}

#[test]
fn validation_order_and_counters() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, 1024);
    // flags, then attributes, then size/wrap, then alignment: each EINVAL.
    assert_eq!(errno(k.set_memory_attributes(1, 0, 1 << 5, 1)), EINVAL);
    assert_eq!(errno(k.set_memory_attributes(0, 4096, 1 << 5, 0)), EINVAL);
    assert_eq!(
        errno(k.set_memory_attributes(u64::MAX - 4095, 8192, P, 0)),
        EINVAL
    );
    assert_eq!(errno(k.set_memory_attributes(1, 4096, P, 0)), EINVAL);
    assert_eq!(k.counters.failed_calls, 4);
    assert_eq!(k.counters.set_calls, 0);
    assert!(k.set_memory_attributes(0, 8192, P, 0).unwrap());
    assert!(!k.set_memory_attributes(0, 4096, P, 0).unwrap());
    let c = k.counters;
    assert_eq!(
        (
            c.set_calls,
            c.conversions,
            c.noop_conversions,
            c.pages_converted
        ),
        (2, 1, 1, 2)
    );
    // One pass each way, nothing mapped: no flush, no zapped range.
    assert_eq!(
        (
            c.mmu_lock_acquisitions,
            c.pre_set_ranges,
            c.zapped_ranges,
            c.tlb_flushes
        ),
        (2, 1, 0, 0)
    );
    assert_eq!((k.inval.seq, k.inval.in_progress), (1, 0));
}

#[test]
fn faults_map_exit_and_get_zapped() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, 4 * M2);
    assert_eq!(k.fault(0, false, 0), Ok(3 - 1)); // 2M: the slot is 8 MiB
    assert_eq!(k.mapped(), [0, 1, 0]);
    assert_eq!(
        k.fault(4096, true, 0),
        Err(KvmError::MemoryFault {
            gpa: 4096,
            size: 4096,
            flags: KVM_MEMORY_EXIT_FLAG_PRIVATE
        })
    );
    // Converting one page zaps the 2M leaf (one flush) and mixes the hugepage.
    k.set_memory_attributes(4096, 4096, P, 0).unwrap();
    assert_eq!(k.mapped(), [0, 0, 0]);
    assert_eq!((k.counters.tlb_flushes, k.counters.zapped_ranges), (1, 1));
    assert!(k.hugepage_mixed(0, 0, 2).unwrap());
    assert_eq!(k.fault(0, false, 0), Ok(1));
    assert_eq!(k.fault(4096, true, 0), Ok(1));
    assert_eq!(k.fault(M2 << PAGE_SHIFT, false, 0), Ok(2));
    // Outside every slot: shared is MMIO, private exits.
    assert_eq!(k.fault(1 << 40, false, 0), Ok(0));
    assert!(matches!(
        k.fault(1 << 40, true, 0),
        Err(KvmError::MemoryFault { .. })
    ));
    assert_eq!(k.counters.mmio_faults, 1);
}

#[test]
fn a_fault_racing_an_invalidation_retries() {
    let mut k = vm(true);
    add_slot(&mut k, 0, 0, 1024);
    let FaultIn::Map { mmu_seq, serial } = k.kvm_faultin_pfn(0, false, 0, true).unwrap() else {
        panic!("expected a mappable fault")
    };
    k.set_memory_attributes(8 << PAGE_SHIFT, 4096, P, 0)
        .unwrap();
    // The sequence moved: stale.
    assert_eq!(k.kvm_tdp_map(0, false, 0, mmu_seq, serial), Ok(None));
    k.kvm_mmu_invalidate_begin();
    k.kvm_mmu_invalidate_range_add(0, 1);
    assert_eq!(k.kvm_faultin_pfn(0, false, 0, false), Ok(FaultIn::Retry));
    k.kvm_mmu_invalidate_end().unwrap();
    assert_eq!(k.counters.fault_retries, 2);
    assert!(k.kvm_mmu_invalidate_end().is_err());
}

#[test]
fn enomem_changes_nothing() {
    let store: SharedStore = Arc::new(RwLock::new(XArray::new()));
    let mut k = Kvm::new(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::Linux68,
        store,
        true,
        Some(2000),
        0,
    )
    .unwrap();
    add_slot(&mut k, 0, 0, 1 << 20);
    assert_eq!(errno(k.set_memory_attributes(0, 1 << 32, P, 0)), ENOMEM);
    assert_eq!(
        (k.counters.enomem, k.counters.failed_calls, k.inval.seq),
        (1, 1, 0)
    );
    assert_eq!(k.store().count_pages(0, 1 << 20, P, P).unwrap(), 0);
}

#[test]
fn memslot_rules_in_the_kernels_order() {
    let mut k = vm(false);
    let fd = add_slot(&mut k, 0, 0, 1024);
    let region = |slot, gpa: u64, size: u64, flags| UserspaceMemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: gpa,
        guest_memfd: fd as u32,
        guest_memfd_offset: 0,
    };
    // Overlap, then a taken guest_memfd range, then an unknown fd.
    assert_eq!(
        errno(k.kvm_set_memory_region(&region(1, 4096, 4096, 0), false)),
        EEXIST
    );
    assert_eq!(
        errno(k.kvm_set_memory_region(&region(1, 1 << 30, 4096, KVM_MEM_GUEST_MEMFD), false)),
        EINVAL
    );
    let mut bad = region(1, 1 << 30, 4096, KVM_MEM_GUEST_MEMFD);
    bad.guest_memfd = 0x7fff_fff0;
    assert_eq!(errno(k.kvm_set_memory_region(&bad, false)), EBADF);
    // Two address spaces only without private memory.
    assert_eq!(
        errno(k.kvm_set_memory_region(&region(1 << 16, 1 << 30, 4096, 0), false)),
        EINVAL
    );
    assert_eq!(
        errno(k.kvm_set_memory_region(&region(KVM_USER_MEM_SLOTS, 1 << 30, 4096, 0), false)),
        EINVAL
    );
    // guest_memfd slots can only be deleted.
    assert_eq!(
        errno(k.kvm_set_memory_region(&region(0, 8192, 1024 << 12, KVM_MEM_GUEST_MEMFD), false)),
        EINVAL
    );
    assert_eq!(k.memslots().len(), 1);
    k.fault(0, false, 0).unwrap();
    k.kvm_set_memory_region(&region(0, 0, 0, 0), false).unwrap();
    assert_eq!((k.memslots().len(), k.mapped()), (0, [0, 0, 0]));
    // The file's range is free again.
    add_slot(&mut k, 2, 0, 1024);
    assert_eq!(k.counters.memslot_updates, 3);
}

#[test]
fn guest_memfd_punch_and_close() {
    let mut k = vm(false);
    let fd = add_slot(&mut k, 0, 0, 1024);
    k.set_memory_attributes(0, 1024 << 12, P, 0).unwrap();
    assert_eq!(k.fault(0, true, 0), Ok(2)); // guest_memfd order 18, slot 4 MiB: 2M at gfn 0
    assert_eq!(
        errno(k.kvm_gmem_fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)),
        EOPNOTSUPP
    );
    assert_eq!(errno(k.kvm_gmem_fallocate(fd + 99, 3, 0, 4096)), EBADF);
    assert_eq!(
        errno(k.kvm_gmem_fallocate(fd, 3, i64::MAX - 4095, 8192)),
        EFBIG
    );
    assert_eq!(errno(k.kvm_gmem_fallocate(fd, 1, 0, 8 << 20)), EINVAL);
    k.kvm_gmem_fallocate(fd, 3, 0, 4096).unwrap();
    assert_eq!((k.mapped(), k.counters.gmem_holes_punched), ([0, 0, 0], 1));
    k.kvm_gmem_release(fd).unwrap();
    assert!(matches!(
        k.fault(0, true, 0),
        Err(KvmError::MemoryFault { .. })
    ));
    assert_eq!(errno(k.kvm_gmem_release(fd)), EBADF);
}

#[test]
fn replay_converts_on_exit_and_stops_at_other_ops() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, 1024);
    let ops = [
        Op {
            kind: OP_FAULT,
            gpa: 0,
            flags: FLAG_PRIVATE | FLAG_CONVERT,
            ..Op::default()
        },
        Op {
            kind: OP_FAULT,
            gpa: 4096,
            flags: FLAG_PRIVATE,
            ..Op::default()
        },
        Op {
            kind: 2,
            ..Op::default()
        },
    ];
    let mut results = [0i64; 3];
    let mut tally = ReplayTally::default();
    assert_eq!(replay(&mut k, &ops[..], &mut results, &mut tally), Ok(2));
    assert_eq!(&results[..2], &[1, -(EFAULT as i64)]);
    assert_eq!(
        (tally.implicit_conversions, tally.fault_exits, tally.sets),
        (1, 2, 1)
    );
}

#[derive(Debug, Clone)]
enum Step {
    Set(u64, u64, bool),
    Fault(u64, bool),
}

fn step_strategy(limit: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..limit, 1..2 * M2, any::<bool>()).prop_map(|(s, n, p)| Step::Set(s, n, p)),
        (0..limit, any::<bool>()).prop_map(|(g, p)| Step::Fault(g, p)),
    ]
}

/// The oracle's mixed rule: a hugepage wholly inside a slot is mixed iff
/// its pages' attributes are not all equal.
fn oracle_mixed(oracle: &[u64], first: u64, n: u64) -> bool {
    let s = &oracle[first as usize..(first + n) as usize];
    s.iter().any(|&v| v != s[0])
}

/// Runs `steps` on both stacks (run tracker and per-page tracker) against a
/// per-page oracle of attributes, fault exits, leaf levels and mixed flags.
/// With `hint`, the next step's gfn is hinted before each step runs, as the
/// native replay does (hints must change nothing).
/// `hint`: the next operation is hinted before each runs, as the native
/// replay does. `held`: every step runs inside one `with_store_held`, as a
/// replay batch does.
fn check_against_per_page_oracle(
    steps: &[Step],
    hint: bool,
    held: bool,
) -> Result<(), TestCaseError> {
    for per_page in [false, true] {
        let mut k = vm(per_page);
        if held {
            // SAFETY: the steps only call the Kvm's methods.
            unsafe { k.with_store_held(|k| check_steps(k, steps, hint)) }?;
            prop_assert!(!k.holds_store());
        } else {
            check_steps(&mut k, steps, hint)?;
        }
    }
    Ok(())
}

fn check_steps(k: &mut Kvm, steps: &[Step], hint: bool) -> Result<(), TestCaseError> {
    // Two slots with awkward edges: [100, 1500) and [1536, 3072).
    let slots = [(0u32, 100u64, 1400u64), (1, 3 * M2, 3 * M2)];
    {
        for &(id, base, n) in &slots {
            add_slot(k, id, base, n);
        }
        let mut oracle = vec![0u64; (6 * M2) as usize];
        let gfn_of = |s: &Step| match *s {
            Step::Set(g, ..) | Step::Fault(g, _) => g,
        };
        for (i, step) in steps.iter().enumerate() {
            // As the native replay does: the next operation is hinted
            // before this one runs (the hints must change nothing).
            if let Some(next) = steps.get(i + 1).filter(|_| hint) {
                k.prefetch(gfn_of(next) << 12);
            }
            match *step {
                Step::Set(s, n, p) => {
                    let e = (s + n).min(6 * M2);
                    let v = if p { P } else { 0 };
                    k.set_memory_attributes(s << 12, (e - s) << 12, v, 0)
                        .unwrap();
                    oracle[s as usize..e as usize].fill(v);
                }
                Step::Fault(g, p) => {
                    let in_slot = slots.iter().any(|&(_, b, n)| b <= g && g < b + n);
                    let want_exit = p != (oracle[g as usize] == P) || (!in_slot && p);
                    let got = k.fault(g << 12, p, 0);
                    prop_assert_eq!(got.is_err(), want_exit, "fault {} private {}", g, p);
                    if let Ok(level) = got {
                        prop_assert_eq!(level == 0, !in_slot);
                    }
                }
            }
            // No leaf ever covers pages with different attributes.
            // mappings() merges adjacent leaves of a level into runs, so
            // each run is checked leaf by leaf.
            for level in 1..=3u64 {
                let leaf = 1u64 << (9 * (level - 1));
                for (s, e) in k.mappings(0, level).unwrap() {
                    let e = e.min(6 * M2);
                    let mut l = s;
                    while l < e {
                        let le = (l + leaf).min(e);
                        prop_assert!(
                            !oracle_mixed(&oracle, l, le - l),
                            "leaf [{}, {}) over mixed memory",
                            l,
                            le
                        );
                        l = le;
                    }
                }
            }
        }
        for g in 0..6 * M2 {
            prop_assert_eq!(k.store().get(g), oracle[g as usize]);
        }
        for &(id, base, n) in &slots {
            let first = base.div_ceil(M2) * M2;
            let mut hp = first;
            while hp + M2 <= base + n {
                prop_assert_eq!(
                    k.hugepage_mixed(u64::from(id), hp, 2).unwrap(),
                    oracle_mixed(&oracle, hp, M2),
                    "2M at {}",
                    hp
                );
                hp += M2;
            }
        }
    }
    Ok(())
}

fn small_step_strategy(limit: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..limit, 1..16u64, any::<bool>()).prop_map(|(s, n, p)| Step::Set(s, n, p)),
        1 => (0..limit, any::<bool>()).prop_map(|(g, p)| Step::Fault(g, p)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn both_stacks_match_a_per_page_oracle(steps in proptest::collection::vec(step_strategy(6 * M2), 1..60)) {
        check_against_per_page_oracle(&steps, false, false)?;
    }

    /// Many small conversions (hundreds of runs: the range tree splits and
    /// merges nodes) with the native replay's hints: the same answers.
    #[test]
    fn prefetch_hints_change_nothing_under_the_vm(steps in proptest::collection::vec(small_step_strategy(6 * M2), 200..400)) {
        check_against_per_page_oracle(&steps, true, false)?;
    }

    /// The same steps with the store's lock held once for all of them, as
    /// a replay batch holds it: the same answers.
    #[test]
    fn a_held_store_changes_nothing(steps in proptest::collection::vec(step_strategy(6 * M2), 1..60)) {
        check_against_per_page_oracle(&steps, true, true)?;
    }
}

/// A batch holds the store's write lock for all its operations, and for
/// nothing after: not after it returns, and not after a panic inside.
#[test]
fn with_store_held_holds_the_lock_for_the_batch_only() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, 4 * M2);
    let store = Arc::clone(k.shared_store());
    let locked = |store: &SharedStore| {
        let s = Arc::clone(store);
        std::thread::spawn(move || s.try_read().is_err())
            .join()
            .unwrap()
    };
    assert!(!locked(&store));
    // SAFETY (here and below): the closures only call the Kvm's methods.
    let seen = unsafe {
        k.with_store_held(|k| {
            assert!(k.holds_store());
            // A whole set holds the store itself: nested, the held lock is
            // reused, not taken again (which would deadlock).
            k.set_memory_attributes(0, M2 << 12, P, 0).unwrap();
            k.with_store_held(|k| k.fault(0, true, 0).unwrap());
            locked(&store)
        })
    };
    assert!(seen, "another thread could read the store during the batch");
    assert!(!k.holds_store());
    assert!(!locked(&store));
    assert_eq!(store.read().unwrap().get(5), P);
    // A panic inside: the lock is released and the pointer dropped, so
    // the VM goes on taking the lock per step.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        k.with_store_held(|_| panic!("inside the batch"))
    }));
    assert!(r.is_err());
    assert!(!k.holds_store());
    assert!(!locked(&store));
    // A whole set holds the store for itself only.
    k.set_memory_attributes(0, M2 << 12, 0, 0).unwrap();
    assert!(!k.holds_store());
    assert!(!locked(&store));
    assert_eq!(store.read().unwrap_or_else(|e| e.into_inner()).get(5), 0);
}

#[test]
fn a_set_adds_every_slots_range_to_the_invalidation() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, M2);
    add_slot(&mut k, 1, 4 * M2, M2);
    k.set_memory_attributes(0, 8 * M2 << PAGE_SHIFT, P, 0)
        .unwrap();
    // The hull of both slots' clipped ranges, though nothing was mapped.
    assert_eq!((k.inval.range_start, k.inval.range_end), (0, 5 * M2));
    assert_eq!(k.counters.pre_set_ranges, 2);
    assert!(k.take_warnings().is_empty());
}

/// The split halves of the invalidation counters' read-modify-writes: two
/// callers that read before either writes lose an update, which is what an
/// invalidate_end() outside mmu_lock (the seed's v11) can do to a
/// concurrent begin(); the following range_add() then WARNs.
#[test]
fn split_invalidation_halves_lose_an_update_when_interleaved() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, 1024);
    // The set's begin, whole.
    k.kvm_mmu_invalidate_begin();
    k.kvm_mmu_invalidate_range_add(0, 8);
    assert_eq!(k.inval.in_progress, 1);
    // The set's end reads in_progress (1) ...
    let set_read = k.inval.in_progress;
    let seq = k.inval.seq;
    k.kvm_mmu_invalidate_end_seq_write(seq);
    // ... a hole punch's begin reads 1 and writes 2 ...
    let punch_read = k.inval.in_progress;
    k.kvm_mmu_invalidate_begin_write(punch_read);
    assert_eq!(k.inval.in_progress, 2);
    // ... the set's write lands: 1 - 1, the punch's increment is lost.
    k.kvm_mmu_invalidate_end_write(set_read).unwrap();
    assert_eq!((k.inval.in_progress, k.inval.seq), (0, 1));
    assert!(k.take_warnings().is_empty());
    k.kvm_mmu_unmap_gfn_range(0, 0, 8, KVM_FILTER_SHARED | KVM_FILTER_PRIVATE)
        .unwrap();
    assert_eq!(
        k.take_warnings(),
        vec![KvmWarning::RangeAddOutsideInvalidation]
    );
    // The punch's end then finds nothing to end: KVM_BUG_ON, nothing written.
    let r = k.inval.in_progress;
    assert!(matches!(
        k.kvm_mmu_invalidate_end_write(r),
        Err(KvmError::Bug(_))
    ));
    assert_eq!(k.inval.in_progress, 0);
}

/// The whole operations are their halves back to back: begin() then end()
/// leave the same state as the split steps run in order.
#[test]
fn whole_invalidation_equals_its_halves_in_order() {
    let (mut a, mut b) = (vm(false), vm(false));
    a.kvm_mmu_invalidate_begin();
    a.kvm_mmu_invalidate_range_add(3, 4);
    a.kvm_mmu_invalidate_end().unwrap();
    let r = b.inval.in_progress;
    b.kvm_mmu_invalidate_begin_write(r);
    b.kvm_mmu_invalidate_range_add(3, 4);
    let (s, r) = (b.inval.seq, b.inval.in_progress);
    b.kvm_mmu_invalidate_end_seq_write(s);
    b.kvm_mmu_invalidate_end_write(r).unwrap();
    assert_eq!(a.inval, b.inval);
    // A whole end() without begin() changes nothing.
    assert!(a.kvm_mmu_invalidate_end().is_err());
    assert_eq!(a.inval, b.inval);
    // The first begin() of a new invalidation forgets the old range (a
    // range not yet added covers every gfn); a nested one keeps it.
    let r = b.inval.in_progress;
    b.kvm_mmu_invalidate_begin_write(r);
    assert_eq!(
        (b.inval.range_start, b.inval.range_end),
        (INVALID_GPA, INVALID_GPA)
    );
    b.kvm_mmu_invalidate_range_add(7, 9);
    b.kvm_mmu_invalidate_begin();
    assert_eq!((b.inval.range_start, b.inval.range_end), (7, 9));
    assert!(b.inval.covers(8) && !b.inval.covers(3));
}

// --- host profiles and Linux 6.18 ---------------------------------------------

fn vm_on(host: HostProfile, vm_type: u64, semantics: Semantics) -> Result<Kvm, KvmError> {
    Kvm::with_host(
        host,
        vm_type,
        semantics,
        Arc::new(RwLock::new(RangeTree::new())),
        false,
        None,
        0,
    )
}

/// A PVM-flavoured host: no SW_PROTECTED_VM, no generic memory attributes,
/// no SMM, shadow paging.
fn pvm_host() -> HostProfile {
    HostProfile {
        vendor: CpuVendor::Intel,
        vm_types: 1,
        sw_protected_vm: false,
        smm: false,
        generic_memory_attributes: false,
        guest_memfd: true,
        tdp: false,
        max_page_level: 3,
        user_address_bits: 47,
        maxphyaddr: 48,
    }
}

#[test]
fn vm_types_and_caps_follow_the_host() {
    let amd = HostProfile::default();
    let l = Semantics::Linux618;
    for t in 0..8 {
        let ok = t < 5;
        assert_eq!(vm_on(amd, t, l).is_ok(), ok, "type {t}");
    }
    let k = vm_on(amd, 0, l).unwrap();
    assert_eq!(k.check_extension(KVM_CAP_VM_TYPES as i64), 0b11111);
    assert_eq!(k.check_extension(KVM_CAP_GUEST_MEMFD as i64), 1);
    assert_eq!(k.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS as i64), 3);
    assert_eq!(k.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE as i64), 2);
    let p = vm_on(amd, KVM_X86_SW_PROTECTED_VM, l).unwrap();
    assert_eq!(p.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS as i64), 1);
    assert_eq!(p.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE as i64), 1);
    // 6.8 knew two types, and only private-memory VMs had guest_memfd.
    let k68 = vm_on(amd, 0, Semantics::Linux68).unwrap();
    assert_eq!(k68.check_extension(KVM_CAP_VM_TYPES as i64), 0b11);
    assert_eq!(k68.check_extension(KVM_CAP_GUEST_MEMFD as i64), 0);
    assert_eq!(
        errno(vm_on(amd, KVM_X86_SNP_VM, Semantics::Linux68)),
        EINVAL
    );
    // The PVM host: one type, one address space, ENOTTY for attributes.
    let mut k = vm_on(pvm_host(), 0, l).unwrap();
    assert_eq!(errno(vm_on(pvm_host(), 1, l)), EINVAL);
    assert_eq!(k.check_extension(KVM_CAP_VM_TYPES as i64), 1);
    assert_eq!(k.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE as i64), 0);
    assert_eq!(k.check_extension(KVM_CAP_MEMORY_ATTRIBUTES as i64), 0);
    assert_eq!(k.check_extension(KVM_CAP_PRE_FAULT_MEMORY as i64), 0);
    assert_eq!(errno(k.set_memory_attributes(0, PAGE_SIZE, 0, 0)), ENOTTY);
    assert_eq!(k.counters.failed_calls + k.counters.set_calls, 0);
    // Profiles no host can have.
    for bad in [
        HostProfile {
            vendor: CpuVendor::Intel,
            ..HostProfile::default()
        },
        HostProfile {
            vm_types: 1 << KVM_X86_TDX_VM | 1,
            ..HostProfile::default()
        },
        HostProfile {
            tdp: false,
            ..HostProfile::default()
        },
        HostProfile {
            maxphyaddr: 35,
            ..HostProfile::default()
        },
        HostProfile {
            maxphyaddr: 53,
            ..HostProfile::default()
        },
    ] {
        assert!(matches!(vm_on(bad, 0, l), Err(KvmError::Argument(_))));
    }
}

fn region(
    slot: u32,
    flags: u32,
    gpa: u64,
    size: u64,
    uaddr: u64,
    gfd: u64,
) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
        guest_memfd: gfd as u32,
        guest_memfd_offset: 0,
    }
}

#[test]
fn memslot_rules_6_18() {
    for sem in [Semantics::Linux68, Semantics::Linux618] {
        let mut k = vm_on(HostProfile::default(), KVM_X86_SW_PROTECTED_VM, sem).unwrap();
        let fd = k.kvm_gmem_create(1 << 21, 0).unwrap();
        // guest_memfd slots are never read-only (the 6.8 fix).
        let r = region(0, KVM_MEM_GUEST_MEMFD | KVM_MEM_READONLY, 0, 1 << 21, 0, fd);
        assert_eq!(errno(k.kvm_set_memory_region(&r, false)), EINVAL);
        assert!(k.memslots().is_empty());
    }
    let mut k = vm_on(HostProfile::default(), 0, Semantics::Linux618).unwrap();
    // Every VM binds guest_memfd in 6.18; an mmap-able one makes the slot
    // guest_memfd-only.
    let fd = k
        .kvm_gmem_create(
            1 << 21,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .unwrap();
    k.kvm_set_memory_region(&region(0, KVM_MEM_GUEST_MEMFD, 0, 1 << 21, 0, fd), false)
        .unwrap();
    assert!(k.memslots().at(0, 0).unwrap().gmem_only);
    // access_ok(): the range must end at or below TASK_SIZE_MAX (5-level
    // paging on the default host).
    assert_eq!(HostProfile::default().user_address_bits, 56);
    let task_size_max = (1u64 << 56) - PAGE_SIZE;
    let last_ok = region(1, 0, 1 << 30, 1 << 21, task_size_max - (1 << 21), 0);
    k.kvm_set_memory_region(&last_ok, false).unwrap();
    let past = region(
        2,
        0,
        2 << 30,
        1 << 21,
        task_size_max - (1 << 21) + PAGE_SIZE,
        0,
    );
    assert_eq!(errno(k.kvm_set_memory_region(&past, false)), EINVAL);
    let mut k68 = vm_on(HostProfile::default(), 0, Semantics::Linux68).unwrap();
    k68.kvm_set_memory_region(&past, false).unwrap();
}

/// kvm_arch_prepare_memory_region(): a created or moved slot must end at
/// or below kvm_mmu_max_gfn(), which is the host's MAXPHYADDR with TDP and
/// 52 bits with shadow paging. The expectations are the kernel source's,
/// worked by hand; tests/test_live_kvm.py checks the same on a real host.
#[test]
fn memslots_end_at_kvm_mmu_max_gfn() {
    const M2: u64 = 1 << 21;
    let uaddr = 1 << 30;
    for (tdp, maxphyaddr, bits) in [(true, 46, 46), (true, 52, 52), (false, 40, 52)] {
        let host = HostProfile {
            tdp,
            maxphyaddr,
            vm_types: 1,
            sw_protected_vm: false,
            ..HostProfile::default()
        };
        assert_eq!(host.kvm_mmu_max_gfn(), (1 << (bits - 12)) - 1);
        let top = 1u64 << bits;
        let mut k = vm_on(host, 0, Semantics::Linux618).unwrap();
        // The last page below the limit, then the first page over it.
        k.kvm_set_memory_region(&region(0, 0, top - PAGE_SIZE, PAGE_SIZE, uaddr, 0), false)
            .unwrap();
        assert_eq!(
            errno(k.kvm_set_memory_region(&region(1, 0, top, PAGE_SIZE, uaddr, 0), false)),
            EINVAL
        );
        // Moving a slot past it fails and leaves the slot where it was; a
        // flags change of the slot at the top and its deletion are not
        // checked against it.
        k.kvm_set_memory_region(&region(2, 0, 1 << 32, M2, uaddr, 0), false)
            .unwrap();
        assert_eq!(
            errno(k.kvm_set_memory_region(&region(2, 0, top, M2, uaddr, 0), false)),
            EINVAL
        );
        assert_eq!(k.memslots().find(0, (1 << 32) >> PAGE_SHIFT), Some(0));
        let dirty = KVM_MEM_LOG_DIRTY_PAGES;
        k.kvm_set_memory_region(
            &region(0, dirty, top - PAGE_SIZE, PAGE_SIZE, uaddr, 0),
            false,
        )
        .unwrap();
        k.kvm_set_memory_region(&region(0, dirty, 0, 0, 0, 0), false)
            .unwrap();
        // Over it by its end (now that nothing overlaps there).
        assert_eq!(
            errno(k.kvm_set_memory_region(&region(1, 0, top - M2, 2 * M2, uaddr, 0), false)),
            EINVAL
        );
        // The checks before it come first: an overlap is EEXIST, and a
        // binding's own errors (here a file too small) win.
        assert_eq!(
            errno(k.kvm_set_memory_region(&region(3, 0, 1 << 32, 2 * M2, uaddr, 0), false)),
            EEXIST
        );
        let fd = k.kvm_gmem_create(M2, 0).unwrap();
        let too_big = region(3, KVM_MEM_GUEST_MEMFD, top - M2, 2 * M2, uaddr, fd);
        assert_eq!(errno(k.kvm_set_memory_region(&too_big, false)), EINVAL);
        let fits_file = region(3, KVM_MEM_GUEST_MEMFD, top, M2, uaddr, fd);
        assert_eq!(errno(k.kvm_set_memory_region(&fits_file, false)), EINVAL);
        // The refused binding left the file unbound: it binds below.
        k.kvm_set_memory_region(
            &region(3, KVM_MEM_GUEST_MEMFD, top - M2, M2, uaddr, fd),
            false,
        )
        .unwrap();
    }
}

#[test]
fn fallocate_modes_6_18() {
    let mut k = vm_on(HostProfile::default(), 0, Semantics::Linux618).unwrap();
    let fd = k.kvm_gmem_create(1 << 21, 0).unwrap();
    let mut k68 = vm_on(HostProfile::default(), 0, Semantics::Linux68).unwrap();
    let fd68 = k68.kvm_gmem_create(1 << 21, 0).unwrap();
    // (mode, 6.18 errno, 6.8 errno); 0 = success.
    for (mode, e618, e68) in [
        (FALLOC_FL_KEEP_SIZE, 0, 0),
        (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 0),
        (
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_COLLAPSE_RANGE,
            EOPNOTSUPP,
            EINVAL,
        ),
        (
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_INSERT_RANGE,
            EOPNOTSUPP,
            EINVAL,
        ),
        (
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_UNSHARE_RANGE,
            EOPNOTSUPP,
            EINVAL,
        ),
        (FALLOC_FL_WRITE_ZEROES, EOPNOTSUPP, EOPNOTSUPP),
        (FALLOC_FL_PUNCH_HOLE, EOPNOTSUPP, EOPNOTSUPP),
    ] {
        let got = |r: Result<(), KvmError>| r.map_or_else(|e| e.errno(), |_| 0);
        assert_eq!(
            got(k.kvm_gmem_fallocate(fd, mode, 0, 4096)),
            e618,
            "{mode:#x}"
        );
        assert_eq!(
            got(k68.kvm_gmem_fallocate(fd68, mode, 0, 4096)),
            e68,
            "{mode:#x}"
        );
    }
}

#[test]
fn guest_memfd_as_a_file() {
    let mut k = vm_on(HostProfile::default(), 0, Semantics::Linux618).unwrap();
    let plain = k.kvm_gmem_create(4 * PAGE_SIZE, 0).unwrap();
    let private = k
        .kvm_gmem_create(4 * PAGE_SIZE, GUEST_MEMFD_FLAG_MMAP)
        .unwrap();
    let shared = k
        .kvm_gmem_create(
            4 * PAGE_SIZE,
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        )
        .unwrap();
    assert_eq!(errno(k.kvm_gmem_mmap(plain, true)), ENODEV);
    assert_eq!(errno(k.kvm_gmem_mmap(shared, false)), EINVAL);
    k.kvm_gmem_mmap(private, true).unwrap();
    assert!(matches!(
        k.kvm_gmem_user_read(private, 0, 1),
        Err(KvmError::Sigbus { offset: 0, .. })
    ));
    // Written pages keep their data; past the end is SIGBUS; a punched
    // page reads zero.
    k.kvm_gmem_user_write(shared, PAGE_SIZE - 1, &[7, 8])
        .unwrap();
    assert_eq!(
        k.kvm_gmem_user_read(shared, PAGE_SIZE - 2, 4).unwrap(),
        [0, 7, 8, 0]
    );
    assert!(matches!(
        k.kvm_gmem_user_read(shared, 4 * PAGE_SIZE - 1, 2),
        Err(KvmError::Sigbus { offset, .. }) if offset == 4 * PAGE_SIZE
    ));
    k.kvm_gmem_fallocate(
        shared,
        FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
        PAGE_SIZE as i64,
        PAGE_SIZE as i64,
    )
    .unwrap();
    assert_eq!(
        k.kvm_gmem_user_read(shared, PAGE_SIZE - 1, 2).unwrap(),
        [7, 0]
    );
    use super::guest_memfd::GmemFileOp::*;
    for (op, e) in [
        (Read, EINVAL),
        (Write, EINVAL),
        (Pread, ESPIPE),
        (Lseek, ESPIPE),
        (Ftruncate, EINVAL),
        (Ioctl, ENOTTY),
    ] {
        assert_eq!(errno(k.kvm_gmem_file_op(plain, op)), e);
    }
    assert_eq!(k.kvm_gmem_fstat(plain).unwrap().size, 4 * PAGE_SIZE);
}

/// A set no kernel xarray could hold is ENOMEM on both stores (after the
/// early exit, which stays an early exit), and a close takes the fd once
/// (issue 14, items 9 and 6).
#[test]
fn impossible_sets_and_double_close_agree_on_both_stores() {
    for per_page in [false, true] {
        let mut k = vm(per_page);
        assert_eq!(errno(k.set_memory_attributes(0, 1 << 63, P, 0)), ENOMEM);
        assert_eq!(errno(k.set_memory_attributes(0, 1 << 51, P, 0)), ENOMEM);
        assert_eq!(k.counters.enomem, 2);
        // Already shared everywhere: the early exit, not ENOMEM.
        assert!(!k.set_memory_attributes(0, 1 << 63, 0, 0).unwrap());
        assert_eq!(k.store().entry_count(), 0);
        let fd = k.kvm_gmem_create(1 << 21, 0).unwrap();
        let (file, filter) = k.kvm_gmem_take(fd).unwrap().unwrap();
        assert_eq!(errno(k.kvm_gmem_take(fd)), EBADF);
        assert_eq!(errno(k.kvm_gmem_release(fd)), EBADF);
        k.kvm_gmem_release_file(file, filter).unwrap();
        assert_eq!(k.counters.gmem_closed, 1);
    }
}

/// kvm_gmem_get_invalidate_filter() applied (6.18): a hole punch and a
/// release zap only the kind of mappings the filter names, in the root
/// that holds them; checked against a per-page oracle of (mapped, kind).
mod gmem_invalidate_filter {
    use super::*;
    use crate::hugepage::{PG_LEVEL_2M, PG_LEVEL_4K};

    const NPAGES: u64 = 64;

    fn tdx_host() -> HostProfile {
        HostProfile {
            vendor: CpuVendor::Intel,
            vm_types: (1 << KVM_X86_DEFAULT_VM)
                | (1 << KVM_X86_SW_PROTECTED_VM)
                | (1 << KVM_X86_TDX_VM),
            ..HostProfile::default()
        }
    }

    /// A VM of `vm_type` with one private guest_memfd of NPAGES bound at
    /// gfn 0 (4K folios: every leaf is 4K), userspace memory for shared
    /// faults; the odd pages shared, the even ones private, each faulted
    /// with its kind.
    fn faulted(vm_type: u64, sem: Semantics) -> (Kvm, u64, Vec<Option<bool>>) {
        let mut k = Kvm::with_host(
            tdx_host(),
            vm_type,
            sem,
            Arc::new(RwLock::new(RangeTree::new())),
            false,
            None,
            0,
        )
        .unwrap();
        let fd = k.kvm_gmem_create(NPAGES << PAGE_SHIFT, 0).unwrap();
        k.kvm_set_memory_region(
            &region(
                0,
                KVM_MEM_GUEST_MEMFD,
                0,
                NPAGES << PAGE_SHIFT,
                0x7f00_0000_0000,
                fd,
            ),
            false,
        )
        .unwrap();
        k.set_memory_attributes(0, NPAGES << PAGE_SHIFT, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
            .unwrap();
        let mut oracle = vec![None; NPAGES as usize];
        for g in 0..NPAGES {
            if g % 2 == 1 {
                k.set_memory_attributes(g << PAGE_SHIFT, PAGE_SIZE, 0, 0)
                    .unwrap();
            }
        }
        for g in 0..NPAGES {
            let private = g % 2 == 0;
            assert_eq!(k.fault(g << PAGE_SHIFT, private, 0).unwrap(), 1);
            oracle[g as usize] = Some(private);
        }
        (k, fd, oracle)
    }

    fn check(k: &Kvm, oracle: &[Option<bool>]) {
        for (g, want) in oracle.iter().enumerate() {
            // Only the mirror root (TDX) records the kind.
            let want = want.map(|p| p && k.kvm_has_mirrored_tdp());
            assert_eq!(k.mapped_private(0, g as u64), want, "gfn {g}");
        }
    }

    /// KVM_SET_MEMORY_ATTRIBUTES zaps the old attribute's mappings only
    /// (6.14+, "Unmap the old attribute page"): on TDX converting the mixed
    /// range [8, 24) to shared leaves its shared leaves and zaps the private
    /// ones; to private, the reverse. Every other VM zaps both (one root).
    #[test]
    fn a_conversion_zaps_the_old_attributes_mappings_only() {
        for vm_type in [KVM_X86_TDX_VM, KVM_X86_SW_PROTECTED_VM] {
            for to_private in [false, true] {
                let (mut k, _fd, mut oracle) = faulted(vm_type, Semantics::Linux618);
                let only_old = vm_type == KVM_X86_TDX_VM;
                let (s, e) = (8u64, 24u64);
                let attrs = if to_private {
                    KVM_MEMORY_ATTRIBUTE_PRIVATE
                } else {
                    0
                };
                k.set_memory_attributes(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, attrs, 0)
                    .unwrap();
                for g in s..e {
                    // The old attribute is the opposite of the new one.
                    if !only_old || oracle[g as usize] == Some(!to_private) {
                        oracle[g as usize] = None;
                    }
                }
                check(&k, &oracle);
            }
        }
    }

    #[test]
    fn punch_and_release_zap_only_the_filtered_kind() {
        for vm_type in [KVM_X86_TDX_VM, KVM_X86_SW_PROTECTED_VM] {
            for sem in [Semantics::Linux618, Semantics::Linux68] {
                if vm_type == KVM_X86_TDX_VM && sem == Semantics::Linux68 {
                    continue; // no TDX VMs in 6.8
                }
                let (mut k, fd, mut oracle) = faulted(vm_type, sem);
                // Only TDX keeps private leaves in a root of their own;
                // there a private file's invalidation leaves the shared ones.
                let only_private = vm_type == KVM_X86_TDX_VM;
                let (s, e) = (8u64, 24u64);
                k.kvm_gmem_fallocate(
                    fd,
                    FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                    (s << PAGE_SHIFT) as i64,
                    ((e - s) << PAGE_SHIFT) as i64,
                )
                .unwrap();
                for g in s..e {
                    if !only_private || oracle[g as usize] == Some(true) {
                        oracle[g as usize] = None;
                    }
                }
                check(&k, &oracle);
                k.kvm_gmem_release(fd).unwrap();
                for o in oracle.iter_mut() {
                    if !only_private || *o == Some(true) {
                        *o = None;
                    }
                }
                check(&k, &oracle);
                // A conversion to shared zaps the old (private) kind only:
                // on TDX the shared leaves the release left stay mapped.
                k.set_memory_attributes(0, NPAGES << PAGE_SHIFT, 0, 0)
                    .unwrap();
                for o in oracle.iter_mut() {
                    if !only_private || *o == Some(true) {
                        *o = None;
                    }
                }
                check(&k, &oracle);
            }
        }
    }

    #[test]
    fn split_keeps_each_leaf_kind_and_filtered_zap_of_huge_leaves() {
        let mut m = TdpPageTable::new();
        m.map(0, PG_LEVEL_2M, true).unwrap();
        m.map(512, PG_LEVEL_2M, false).unwrap();
        m.map(1024, PG_LEVEL_4K, true).unwrap();
        m.split_huge_pages(0, 1024).unwrap();
        assert_eq!(m.mapped_private(5), Some(true));
        assert_eq!(m.mapped_private(600), Some(false));
        m.map(1025, PG_LEVEL_4K, false).unwrap();
        // Shared only: the shared 4K leaves of [0, 2048) go, private stay.
        let removed = m.zap_filtered(0, 2048, KVM_FILTER_SHARED).unwrap();
        assert_eq!(removed, [513, 0, 0]);
        assert_eq!(m.mapped_private(600), None);
        assert_eq!(m.mapped_private(1024), Some(true));
        let removed = m.zap_filtered(0, 2048, KVM_FILTER_PRIVATE).unwrap();
        assert_eq!(removed, [513, 0, 0]);
        assert_eq!(m.counts(), [0, 0, 0]);
    }
}

/// A mapping holds a reference on its guest_memfd file (vma->vm_file):
/// close(2) with a live mapping drops only the fd; the file, its page
/// cache, its bindings and the guest's mappings through it stay until the
/// last munmap, which runs kvm_gmem_release() (unbind, zap, count).
#[test]
fn a_mapping_keeps_the_file_after_close() {
    let mut k = vm_on(HostProfile::default(), 0, Semantics::Linux618).unwrap();
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let fd = k.kvm_gmem_create(1 << 21, flags).unwrap();
    k.kvm_set_memory_region(&region(0, KVM_MEM_GUEST_MEMFD, 0, 1 << 21, 0, fd), false)
        .unwrap();
    // A guest_memfd-only slot: the shared fault is served from the file.
    k.fault(0, false, 0).unwrap();
    let mapped = k.mapped();
    assert_ne!(mapped, [0, 0, 0]);
    let (a, b) = (
        k.mmap_new_file_vma(fd, true).unwrap(),
        k.mmap_new_file_vma(fd, true).unwrap(),
    );
    assert_eq!(errno(k.mmap_new_file_vma(fd, false)), EINVAL);
    k.kvm_gmem_vma_write(a, 4095, &[1, 2, 3]).unwrap();
    k.kvm_gmem_release(fd).unwrap();
    // Only the fd went: everything on the fd is EBADF, nothing released.
    assert_eq!(errno(k.kvm_gmem_release(fd)), EBADF);
    assert_eq!(errno(k.kvm_gmem_fstat(fd)), EBADF);
    assert_eq!(errno(k.kvm_gmem_fallocate(fd, 3, 0, 4096)), EBADF);
    assert_eq!(errno(k.mmap_new_file_vma(fd, true)), EBADF);
    assert_eq!(errno(k.kvm_gmem_user_read(fd, 0, 1)), EBADF);
    let again = region(1, KVM_MEM_GUEST_MEMFD, 1 << 30, 1 << 21, 0, fd);
    assert_eq!(errno(k.kvm_set_memory_region(&again, false)), EBADF);
    assert_eq!(k.gmem_location(0), None); // no fd to punch through
    assert!(k.memslots().at(0, 0).unwrap().gmem_open);
    assert_eq!((k.mapped(), k.counters.gmem_closed), (mapped, 0));
    // Both mappings still see the same page cache.
    assert_eq!(k.kvm_gmem_vma_read(b, 4094, 5).unwrap(), [0, 1, 2, 3, 0]);
    k.kvm_gmem_vma_write(b, 0, &[9]).unwrap();
    k.kvm_gmem_munmap(a).unwrap();
    assert!(matches!(
        k.kvm_gmem_vma_read(a, 0, 1),
        Err(KvmError::Argument(_))
    ));
    assert_eq!(k.kvm_gmem_vma_read(b, 0, 1).unwrap(), [9]);
    assert_eq!(k.counters.gmem_closed, 0);
    // The last reference: the release, as close(2) would have run it.
    k.kvm_gmem_munmap(b).unwrap();
    assert!(!k.memslots().at(0, 0).unwrap().gmem_open);
    assert_eq!((k.mapped(), k.counters.gmem_closed), ([0, 0, 0], 1));
    assert!(k.guest_memfds().next().is_none());
    assert!(matches!(k.kvm_gmem_munmap(b), Err(KvmError::Argument(_))));
    // Without a mapping, close releases at once (and munmap first, close
    // last, releases at the close).
    let fd2 = k.kvm_gmem_create(1 << 21, flags).unwrap();
    let c = k.mmap_new_file_vma(fd2, true).unwrap();
    k.kvm_gmem_munmap(c).unwrap();
    assert_eq!(k.counters.gmem_closed, 1);
    k.kvm_gmem_release(fd2).unwrap();
    assert_eq!(k.counters.gmem_closed, 2);
}

/// The replay's hints turn on once the store and the page tables pass a
/// core's L2 (2 MiB), not before.
#[test]
fn prefetch_pays_once_the_structures_outgrow_l2() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, 1 << 20);
    assert!(!k.prefetch_pays());
    k.fault(0, false, 0).unwrap();
    assert!(!k.prefetch_pays());
    // Every other page private: one run per two pages, about 150k runs,
    // several MB of range tree leaves.
    for g in (0..1u64 << 19).step_by(2) {
        k.set_memory_attributes(g << PAGE_SHIFT, 1 << PAGE_SHIFT, P, 0)
            .unwrap();
    }
    assert!(k.store().memory_bytes() > 2 << 20);
    assert!(k.prefetch_pays());
}

/// kvm_gmem_bind() checks `offset + size > i_size` in loff_t, which wraps:
/// an offset within the slot's size of 2^63 passes, and the kernel binds a
/// range past the end of the file (seen on a live 6.18 kernel by
/// tests/test_live_kvm_random.py). The model binds it too, and everything
/// after works on it without a panic: attributes, faults, punching the
/// file, deleting the slot, releasing the file.
#[test]
fn a_binding_whose_loff_t_end_wraps_is_taken_as_the_kernel_takes_it() {
    const TOP: u64 = (1 << 63) - PAGE_SIZE; // the last page-aligned loff_t
    for sem in [
        Semantics::Linux68,
        Semantics::Linux618,
        Semantics::GmemInplace,
    ] {
        let mut k = vm_on(HostProfile::default(), KVM_X86_SW_PROTECTED_VM, sem).unwrap();
        let fd = k.kvm_gmem_create(2 * PAGE_SIZE, 0).unwrap();
        let at = |offset: u64, slot: u32, gpa: u64| UserspaceMemoryRegion {
            guest_memfd_offset: offset,
            ..region(slot, KVM_MEM_GUEST_MEMFD, gpa, PAGE_SIZE, 1 << 30, fd)
        };
        // One page below 2^63 - 4096 still sums below 2^63: beyond the file.
        assert_eq!(
            errno(k.kvm_set_memory_region(&at(TOP - PAGE_SIZE, 0, 0), false)),
            EINVAL
        );
        k.kvm_set_memory_region(&at(TOP, 0, 0), false).unwrap();
        // The same file pages cannot be bound twice.
        assert_eq!(
            errno(k.kvm_set_memory_region(&at(TOP, 1, 1 << 21), false)),
            EINVAL
        );
        if !sem.is_gmem_inplace() {
            k.set_memory_attributes(0, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0)
                .unwrap();
        }
        let _ = k.fault(0, !sem.is_gmem_inplace(), 0);
        k.kvm_gmem_fallocate(
            fd,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            0,
            2 * PAGE_SIZE as i64,
        )
        .unwrap();
        k.kvm_set_memory_region(&region(0, 0, 0, 0, 0, 0), false)
            .unwrap();
        k.kvm_gmem_release(fd).unwrap();
    }
}

/// An XArray that raises the caller's cancellation flag as soon as its
/// reservation is made: a Ctrl-C landing between the set's reserve and
/// store steps.
struct SignalAfterReserve {
    inner: XArray,
    flag: &'static std::sync::atomic::AtomicBool,
}

impl AttrStore for SignalAfterReserve {
    fn get(&self, gfn: u64) -> u64 {
        self.inner.get(gfn)
    }
    fn set_range(&mut self, start: u64, end: u64, value: u64) -> Result<(), StoreError> {
        self.inner.set_range(start, end, value)
    }
    fn has_value(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<bool, StoreError> {
        self.inner.has_value(start, end, value, mask)
    }
    fn for_each_run(
        &self,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, u64),
    ) -> Result<(), StoreError> {
        self.inner.for_each_run(start, end, f)
    }
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }
    fn entry_count(&self) -> usize {
        self.inner.entry_count()
    }
    fn reserve(&mut self, start: u64, end: u64, limit: Option<usize>) -> Result<(), StoreError> {
        let r = self.inner.reserve(start, end, limit);
        self.flag.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    }
    fn release_reservations(&mut self) {
        self.inner.release_reservations()
    }
}

#[test]
fn a_signal_after_the_reservation_does_not_stop_the_store_part_way() {
    use crate::interrupt::{with_token, CHECK_EVERY};
    static FLAG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // Long enough for the xarray's store loop to poll twice, and a short
    // one that never polls.
    for pages in [3 * CHECK_EVERY, 8] {
        FLAG.store(false, std::sync::atomic::Ordering::Relaxed);
        let store: SharedStore = Arc::new(RwLock::new(SignalAfterReserve {
            inner: XArray::new(),
            flag: &FLAG,
        }));
        let mut k = Kvm::new(
            KVM_X86_SW_PROTECTED_VM,
            Semantics::Linux68,
            store.clone(),
            true,
            None,
            18,
        )
        .unwrap();
        let r = with_token(&FLAG, || {
            k.set_memory_attributes(1 << 30, pages << PAGE_SHIFT, P, 0)
        });
        assert!(
            FLAG.load(std::sync::atomic::Ordering::Relaxed),
            "the reserve ran"
        );
        assert_eq!(r.unwrap(), true, "{pages} pages");
        let s = store.read().unwrap();
        let start = (1 << 30) >> PAGE_SHIFT;
        // The per-page oracle: every page stored, none outside.
        assert_eq!(
            s.count_pages(start, start + pages, P, u64::MAX).unwrap(),
            pages
        );
        assert_eq!(s.entry_count() as u64, pages);
    }
}

/// A memslot-clipped range names its slot by identity (index and serial):
/// used after the slot was deleted and another created with the same id,
/// every per-range handler refuses it as a KVM bug (EIO) instead of
/// touching the new slot, and the invalidation can still be closed.
#[test]
fn a_stale_gfn_range_is_a_kvm_bug() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, M2);
    let mut ranges = Vec::new();
    k.clip_gfn_ranges(0, 1, &mut ranges);
    let [rng] = ranges[..] else {
        panic!("one range: {ranges:?}")
    };
    // Delete slot 0, then create a new slot 0 over the same gfns.
    let region = |size: u64, fd: u64| UserspaceMemoryRegion {
        slot: 0,
        flags: if size == 0 { 0 } else { KVM_MEM_GUEST_MEMFD },
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0,
        guest_memfd: fd as u32,
        guest_memfd_offset: 0,
    };
    k.kvm_set_memory_region(&region(0, 0), false).unwrap();
    let fd = k.kvm_gmem_create(2 * M2 << PAGE_SHIFT, 0).unwrap();
    k.kvm_set_memory_region(&region(2 * M2 << PAGE_SHIFT, fd), false)
        .unwrap();
    let before = k.counters.clone();
    k.kvm_mmu_invalidate_begin();
    for r in [
        k.kvm_pre_set_memory_attributes(&rng, P).map(|_| ()),
        k.kvm_post_set_memory_attributes(&rng, P),
    ] {
        match r {
            Err(KvmError::Bug(why)) => {
                assert!(why.contains("names a memslot that changed"), "{why}")
            }
            other => panic!("expected a KVM bug, got {other:?}"),
        }
    }
    k.kvm_mmu_invalidate_end().unwrap();
    assert_eq!(k.inval.in_progress, 0);
    assert_eq!(k.counters.pre_set_ranges, before.pre_set_ranges);
    assert_eq!(k.counters.post_set_ranges, before.post_set_ranges);
}

/// mmu_invalidate_retry_gfn(): an invalidation covers the half-open gfn
/// range [range_start, range_end) that range_add() widened it to, and
/// nothing else. A fault one page either side of it maps; one on either
/// end page retries.
#[test]
fn an_invalidation_covers_its_half_open_range_only() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, 4 * M2);
    k.kvm_mmu_invalidate_begin();
    k.kvm_mmu_invalidate_range_add(100, 200);
    for (gfn, retry) in [(99, false), (100, true), (199, true), (200, false)] {
        let got = k
            .kvm_faultin_pfn(gfn << PAGE_SHIFT, false, 0, true)
            .unwrap();
        assert_eq!(got == FaultIn::Retry, retry, "gfn {gfn}: {got:?}");
        assert_eq!(k.inval.retry_gfn(k.inval.seq, gfn), retry, "gfn {gfn}");
    }
    k.kvm_mmu_invalidate_end().unwrap();
    assert!(!k.inval.retry_gfn(k.inval.seq, 150));
}

/// kvm_mmu_hugepage_adjust(): a slot logging dirty pages is mapped 4K only,
/// where the same slot without logging takes 2M; turning logging off
/// (a flags-only change) lets the next fault map 2M again.
#[test]
fn a_dirty_logging_slot_is_mapped_4k_only() {
    let mut k = vm(false);
    let region = |flags| UserspaceMemoryRegion {
        slot: 0,
        flags,
        guest_phys_addr: 0,
        memory_size: 4 * M2 << PAGE_SHIFT,
        userspace_addr: 1 << 30,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    k.kvm_set_memory_region(&region(KVM_MEM_LOG_DIRTY_PAGES), false)
        .unwrap();
    assert_eq!(k.fault(0, false, 0), Ok(PG_LEVEL_4K));
    assert_eq!(k.fault(M2 << PAGE_SHIFT, false, 0), Ok(PG_LEVEL_4K));
    k.kvm_set_memory_region(&region(0), false).unwrap();
    assert_eq!(k.fault(2 * M2 << PAGE_SHIFT, false, 0), Ok(PG_LEVEL_2M));
}

/// vfs_fallocate()'s and kvm_gmem_fallocate()'s offset and length checks,
/// in the kernel's order, on a 2 MiB guest_memfd (the same in 6.8 and
/// 6.18): a negative offset or a length <= 0 is EINVAL; offset + length
/// past loff_t is EFBIG, before alignment; unaligned is EINVAL; allocating
/// past the file's size is EINVAL, punching past it is not.
#[test]
fn fallocate_offsets_and_lengths_in_the_kernels_order() {
    const SIZE: i64 = 1 << 21;
    const PAGE: i64 = 4096;
    let alloc = FALLOC_FL_KEEP_SIZE;
    let punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
    for semantics in [Semantics::Linux68, Semantics::Linux618] {
        let mut k = vm_on(HostProfile::default(), 0, semantics).unwrap();
        let fd = k.kvm_gmem_create(SIZE as u64, 0).unwrap();
        for (mode, offset, length, want) in [
            (alloc, 0, 0, EINVAL),
            (alloc, -PAGE, PAGE, EINVAL),
            (alloc, 0, -PAGE, EINVAL),
            (alloc, PAGE, i64::MAX, EFBIG),
            (alloc, 1, i64::MAX, EFBIG),
            (alloc, 1, PAGE, EINVAL),
            (alloc, 0, PAGE - 1, EINVAL),
            (alloc, 0, SIZE, 0),
            (alloc, PAGE, SIZE, EINVAL),
            (alloc, SIZE, PAGE, EINVAL),
            (punch, 0, 0, EINVAL),
            (punch, 1, PAGE, EINVAL),
            (punch, 0, PAGE - 1, EINVAL),
            (punch, PAGE, SIZE, 0),
            (punch, SIZE, PAGE, 0),
        ] {
            let got = k
                .kvm_gmem_fallocate(fd, mode, offset, length)
                .map_or_else(|e| e.errno(), |_| 0);
            assert_eq!(
                got, want,
                "{semantics:?} mode {mode:#x} offset {offset:#x} length {length:#x}"
            );
        }
    }
}

/// kvm_gmem_bind(): the slot's range of the file must lie within the
/// file's size, ending at it at most (EINVAL past it, nothing bound), and
/// two slots may not bind one page of the file twice.
#[test]
fn a_binding_must_fit_the_file() {
    const PAGE: u64 = 4096;
    let mut k = vm(false);
    let fd = k.kvm_gmem_create(4 * PAGE, 0).unwrap();
    let region = |slot: u32, gfn: u64, offset: u64| UserspaceMemoryRegion {
        slot,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: gfn * PAGE,
        memory_size: 2 * PAGE,
        userspace_addr: gfn * PAGE,
        guest_memfd: fd as u32,
        guest_memfd_offset: offset,
    };
    // [3, 5) pages of a 4-page file: one page past its end.
    assert_eq!(
        errno(k.kvm_set_memory_region(&region(0, 0, 3 * PAGE), false)),
        EINVAL
    );
    assert!(k.memslots().is_empty());
    // [2, 4): ends at the file's end.
    k.kvm_set_memory_region(&region(0, 0, 2 * PAGE), false)
        .unwrap();
    // [1, 3) overlaps it: EINVAL in 6.8's kvm_gmem_bind, nothing bound.
    assert_eq!(
        errno(k.kvm_set_memory_region(&region(1, 16, PAGE), false)),
        EINVAL
    );
    // [0, 2) does not.
    k.kvm_set_memory_region(&region(1, 16, 0), false).unwrap();
    assert_eq!(k.memslots().len(), 2);
}

/// kvm_gmem_punch_hole(): the hole's pages, in every binding they fall in,
/// are unmapped, and the TLB is flushed only if a mapping went. Punching
/// the binding's last page zaps the private mapping there; punching the
/// page before it zaps nothing and does not flush.
#[test]
fn a_punch_of_a_bindings_last_page_zaps_it_and_flushes() {
    let mut k = vm(false);
    let fd = add_slot(&mut k, 0, 0, 4 * M2);
    let last = 4 * M2 - 1;
    k.set_memory_attributes(last << PAGE_SHIFT, 4096, P, 0)
        .unwrap();
    // 4K: the 2M hugepage around it is mixed.
    assert_eq!(k.fault(last << PAGE_SHIFT, true, 0), Ok(PG_LEVEL_4K));
    assert_eq!(k.mapped(), [1, 0, 0]);
    let punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
    let flushes = k.counters.tlb_flushes;
    k.kvm_gmem_fallocate(fd, punch, ((last - 1) << PAGE_SHIFT) as i64, 4096)
        .unwrap();
    assert_eq!(k.mapped(), [1, 0, 0]);
    assert_eq!(k.counters.tlb_flushes, flushes);
    k.kvm_gmem_fallocate(fd, punch, (last << PAGE_SHIFT) as i64, 4096)
        .unwrap();
    assert_eq!(k.mapped(), [0, 0, 0]);
    assert_eq!(k.counters.tlb_flushes, flushes + 1);
    assert_eq!(k.inval.in_progress, 0);
}

/// A set whose range needs more xarray nodes than any host has: if every
/// page already has the attributes, it is the early exit (counted as a
/// no-op, no ENOMEM), as in the kernel, where the check comes first;
/// otherwise ENOMEM, with nothing changed.
#[test]
fn a_set_too_big_for_any_host_exits_early_when_it_changes_nothing() {
    let mut k = vm(false);
    add_slot(&mut k, 0, 0, M2);
    assert_eq!(k.set_memory_attributes(0, 1 << 60, 0, 0), Ok(false));
    assert_eq!((k.counters.noop_conversions, k.counters.enomem), (1, 0));
    assert_eq!(errno(k.set_memory_attributes(0, 1 << 60, P, 0)), ENOMEM);
    assert_eq!((k.counters.noop_conversions, k.counters.enomem), (1, 1));
    assert_eq!((k.inval.seq, k.counters.conversions), (0, 0));
    assert_eq!(k.store().count_pages(0, 1 << 48, P, P).unwrap(), 0);
}
