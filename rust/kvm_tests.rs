use super::*;
use crate::hugepage::{LpageInfoTracker, RangeTracker, SlotLayout};
use crate::rangetree::RangeTree;
use crate::xarray::XArray;
use proptest::prelude::*;

const M2: u64 = 512;
const G1: u64 = 512 * 512;
const P: u64 = KVM_MEMORY_ATTRIBUTE_PRIVATE;

fn config() -> KvmConfig {
    KvmConfig {
        supported_attributes: P,
        has_private_mem: true,
        attr_memory_limit: None,
        guest_memfd_max_order: 18,
        host_mapping_level: PG_LEVEL_1G,
        invalidate_straddling_hugepages: true,
    }
}

/// Owned state a `Kvm` borrows: a store, slots (base, npages, private,
/// flags) with trackers, one root.
struct Owned<S, T> {
    store: S,
    slots: Vec<(u64, u64, bool, u32)>,
    trackers: Vec<T>,
    root: Stage2Map,
    inval: MmuInvalidation,
    counters: Counters,
}

impl<S: AttrStore + Send, T: HugepageTracker + Send> Owned<S, T> {
    fn new(store: S, slots: &[(u64, u64, bool, u32)], make: fn(SlotLayout) -> T) -> Self {
        let trackers = slots
            .iter()
            .map(|&(b, n, _, _)| {
                let mut t = make(SlotLayout::new(b, n, b << 12).unwrap());
                t.init_memory_attributes(&store).unwrap();
                t
            })
            .collect();
        Self {
            store,
            slots: slots.to_vec(),
            trackers,
            root: Stage2Map::new(),
            inval: MmuInvalidation::default(),
            counters: Counters::default(),
        }
    }

    /// Runs `f` on a `Kvm` over this state, then keeps its counters and
    /// invalidation state, as the Python Vm does after a batch.
    fn with<R>(&mut self, cfg: KvmConfig, f: impl FnOnce(&mut Kvm<'_>) -> R) -> R {
        let slots = self
            .slots
            .iter()
            .zip(self.trackers.iter_mut())
            .map(|(&(base_gfn, npages, can_be_private, flags), t)| Memslot {
                as_id: 0,
                base_gfn,
                npages,
                flags,
                can_be_private,
                tracker: t as &mut (dyn HugepageTracker + Send),
            })
            .collect();
        let mut kvm = Kvm::new(
            cfg,
            &mut self.store,
            slots,
            vec![&mut self.root],
            self.inval,
        )
        .unwrap();
        let r = f(&mut kvm);
        let c = kvm.counters;
        self.inval = kvm.inval;
        add(&mut self.counters, &c);
        r
    }
}

fn add(into: &mut Counters, c: &Counters) {
    into.set_calls += c.set_calls;
    into.conversions += c.conversions;
    into.noop_conversions += c.noop_conversions;
    into.pages_converted += c.pages_converted;
    into.failed_calls += c.failed_calls;
    into.enomem += c.enomem;
    into.zapped_ranges += c.zapped_ranges;
    into.post_set_ranges += c.post_set_ranges;
    into.tlb_flushes += c.tlb_flushes;
    into.mmu_lock_acquisitions += c.mmu_lock_acquisitions;
    into.faults += c.faults;
    into.memory_fault_exits += c.memory_fault_exits;
    into.mmio_faults += c.mmio_faults;
    for i in 0..3 {
        into.zapped_pages[i] += c.zapped_pages[i];
        into.mapped[i] += c.mapped[i];
    }
}

fn gpa(gfn: u64) -> u64 {
    gfn << PAGE_SHIFT
}

/// RAM below 4G (2G, a PCI hole) and 2G above, both guest_memfd.
fn two_slots() -> Vec<(u64, u64, bool, u32)> {
    vec![(0, 2 * G1, true, 0), (4 * G1, 2 * G1, true, 0)]
}

#[test]
fn validation_order_and_counters() {
    let mut o = Owned::new(RangeTree::new(), &two_slots(), RangeTracker::new);
    o.with(config(), |kvm| {
        let e = |r: Result<bool, KvmError>| r.unwrap_err();
        // flags first, even with everything else wrong too.
        assert_eq!(
            e(kvm.set_memory_attributes(1, 0, 1, 1)),
            KvmError::Invalid("flags must be 0")
        );
        assert_eq!(
            e(kvm.set_memory_attributes(1, 0, 1, 0)),
            KvmError::Invalid("attributes not supported by this VM")
        );
        assert_eq!(
            e(kvm.set_memory_attributes(1, 0, P, 0)),
            KvmError::Invalid("size is 0 or address + size wraps")
        );
        assert_eq!(
            e(kvm.set_memory_attributes(u64::MAX - 4095, 8192, P, 0)),
            KvmError::Invalid("size is 0 or address + size wraps")
        );
        assert_eq!(
            e(kvm.set_memory_attributes(1, 4096, P, 0)),
            KvmError::Invalid("address or size not page aligned")
        );
        assert_eq!(e(kvm.set_memory_attributes(0, 4095, P, 0)).errno(), EINVAL);
        assert_eq!(kvm.counters.failed_calls, 6);
        assert_eq!(kvm.counters.set_calls, 0);
        assert_eq!(kvm.inval, MmuInvalidation::default());
    });
    assert_eq!(o.store.entry_count(), 0);
}

#[test]
fn set_path_counts_and_invalidation_like_the_kernel() {
    let mut o = Owned::new(RangeTree::new(), &two_slots(), RangeTracker::new);
    o.with(config(), |kvm| {
        // Spans both slots and the hole: two clipped ranges, one lock each pass.
        assert_eq!(
            kvm.set_memory_attributes(gpa(G1), gpa(4 * G1), P, 0),
            Ok(true)
        );
        let c = kvm.counters;
        assert_eq!(
            (c.set_calls, c.conversions, c.pages_converted),
            (1, 1, 4 * G1)
        );
        assert_eq!(
            (c.zapped_ranges, c.post_set_ranges, c.mmu_lock_acquisitions),
            (2, 2, 2)
        );
        assert_eq!(c.tlb_flushes, 0, "nothing was mapped");
        assert_eq!(kvm.inval.seq, 1);
        assert_eq!(kvm.inval.in_progress, 0);
        // Range hull: [G1, 5G1) widened by the straddling 1G tail hugepage.
        assert_eq!((kvm.inval.range_start, kvm.inval.range_end), (G1, 5 * G1));
        // Early exit: nothing locked, sequence unchanged.
        assert_eq!(kvm.set_memory_attributes(gpa(G1), gpa(G1), P, 0), Ok(false));
        assert_eq!(kvm.counters.noop_conversions, 1);
        assert_eq!(kvm.inval.seq, 1);
        // Outside every slot: stored, but no pass runs.
        assert_eq!(
            kvm.set_memory_attributes(gpa(7 * G1), gpa(M2), P, 0),
            Ok(true)
        );
        assert_eq!(kvm.counters.mmu_lock_acquisitions, 2);
        assert_eq!(kvm.inval.seq, 1);
        assert_eq!(kvm.counters.conversions, 2);
    });
    assert_eq!(o.store.get(G1), P);
    assert_eq!(o.store.get(2 * G1), P);
    assert_eq!(o.store.get(7 * G1), P);
    assert_eq!(o.store.get(G1 - 1), 0);
    assert_eq!(o.trackers[0].test_mixed(0, PG_LEVEL_1G), Ok(false));
    assert_eq!(o.trackers[0].test_mixed(G1 - 1, PG_LEVEL_1G), Ok(false));
}

#[test]
fn faults_map_exit_and_get_zapped() {
    let mut slots = two_slots();
    slots.push((8 * G1, G1, false, 0)); // shared-only slot
    let mut o = Owned::new(RangeTree::new(), &slots, RangeTracker::new);
    o.with(config(), |kvm| {
        // Shared fault on shared memory: 1G (host maps 1G).
        assert_eq!(kvm.fault(gpa(5), false, 0), Ok(PG_LEVEL_1G));
        // Private access to shared memory: exit, flags PRIVATE, page aligned.
        assert_eq!(
            kvm.fault(gpa(5) + 123, true, 0),
            Err(KvmError::MemoryFault {
                gpa: gpa(5),
                size: 4096,
                flags: P
            })
        );
        // No slot at all: a shared access is MMIO (level 0, nothing
        // mapped), a private one exits.
        assert_eq!(kvm.fault(gpa(3 * G1), false, 0), Ok(0));
        assert_eq!(kvm.counters.mmio_faults, 1);
        assert_eq!(kvm.fault(gpa(3 * G1), true, 0).unwrap_err().errno(), EFAULT);
        // Convert one 4K page: zaps the 1G leaf, flushes, mixes the hugepages.
        assert_eq!(kvm.set_memory_attributes(gpa(7), 4096, P, 0), Ok(true));
        assert_eq!(kvm.counters.zapped_pages, [0, 0, 1]);
        assert_eq!(kvm.counters.tlb_flushes, 1);
        assert_eq!(kvm.fault(gpa(7), true, 0), Ok(PG_LEVEL_4K));
        assert_eq!(kvm.fault(gpa(8), false, 0), Ok(PG_LEVEL_4K));
        assert_eq!(kvm.fault(gpa(M2), false, 0), Ok(PG_LEVEL_2M));
        // Private fault in a slot without guest_memfd exits.
        assert_eq!(
            kvm.set_memory_attributes(gpa(8 * G1), gpa(M2), P, 0),
            Ok(true)
        );
        assert!(matches!(
            kvm.fault(gpa(8 * G1), true, 0),
            Err(KvmError::MemoryFault { .. })
        ));
        assert_eq!(kvm.counters.memory_fault_exits, 3);
        assert_eq!(kvm.counters.faults, 8);
        assert_eq!(kvm.counters.mapped, [2, 1, 0]);
    });
    // guest_memfd order caps private mappings; dirty logging caps all.
    let mut o = Owned::new(
        RangeTree::new(),
        &[(0, G1, true, 0), (G1, G1, true, 1)],
        RangeTracker::new,
    );
    let cfg = KvmConfig {
        guest_memfd_max_order: 9,
        ..config()
    };
    o.with(cfg, |kvm| {
        kvm.set_memory_attributes(0, gpa(2 * G1), P, 0).unwrap();
        assert_eq!(kvm.fault(0, true, 0), Ok(PG_LEVEL_2M));
        assert_eq!(kvm.fault(gpa(G1), true, 0), Ok(PG_LEVEL_4K));
    });
    let cfg = KvmConfig {
        guest_memfd_max_order: 0,
        host_mapping_level: PG_LEVEL_2M,
        ..config()
    };
    o.with(cfg, |kvm| {
        assert_eq!(kvm.fault(gpa(M2), true, 0), Ok(PG_LEVEL_4K));
        kvm.set_memory_attributes(0, gpa(G1), 0, 0).unwrap();
        assert_eq!(kvm.fault(gpa(4 * M2), false, 0), Ok(PG_LEVEL_2M));
    });
}

#[test]
fn enomem_changes_nothing() {
    let mut o = Owned::new(XArray::new(), &two_slots(), LpageInfoTracker::new);
    let cfg = KvmConfig {
        attr_memory_limit: Some(10_000),
        ..config()
    };
    o.with(cfg, |kvm| {
        kvm.fault(0, false, 0).unwrap();
        let e = kvm.set_memory_attributes(0, gpa(G1), P, 0).unwrap_err();
        assert_eq!(e.errno(), ENOMEM);
        assert_eq!(
            (
                kvm.counters.enomem,
                kvm.counters.failed_calls,
                kvm.counters.set_calls
            ),
            (1, 1, 1)
        );
        assert_eq!(kvm.inval, MmuInvalidation::default());
        assert_eq!(kvm.counters.zapped_pages, [0, 0, 0]);
    });
    assert_eq!(o.store.memory_bytes(), XArray::new().memory_bytes());
    assert_eq!(o.root.counts(), [0, 0, 1]);
}

#[test]
fn new_rejects_inconsistent_state() {
    /// Whether `Kvm::new` takes a 10-page tracker described as `npages`
    /// pages, with or without a root, at `inval`.
    fn accepts(npages: u64, with_root: bool, inval: MmuInvalidation) -> bool {
        let mut store = RangeTree::new();
        let mut root = Stage2Map::new();
        let mut t = RangeTracker::new(SlotLayout::new(0, 10, 0).unwrap());
        let slot = Memslot {
            as_id: 0,
            base_gfn: 0,
            npages,
            flags: 0,
            can_be_private: true,
            tracker: &mut t,
        };
        let roots = if with_root { vec![&mut root] } else { vec![] };
        Kvm::new(config(), &mut store, vec![slot], roots, inval).is_ok()
    }
    let busy = MmuInvalidation {
        in_progress: 1,
        ..Default::default()
    };
    assert!(!accepts(10, true, busy), "an invalidation in progress");
    assert!(
        !accepts(11, true, Default::default()),
        "slot and tracker differ"
    );
    assert!(!accepts(10, false, Default::default()), "no address space");
    assert!(accepts(10, true, Default::default()));
}

#[test]
fn replay_converts_on_exit_and_stops_at_other_ops() {
    let mut o = Owned::new(RangeTree::new(), &two_slots(), RangeTracker::new);
    let ops = [
        Op {
            kind: OP_SET_MEMORY_ATTRIBUTES,
            gpa: 0,
            size: gpa(2 * G1),
            attributes: P,
            ..Op::default()
        },
        Op {
            kind: OP_FAULT,
            gpa: gpa(M2),
            flags: FLAG_PRIVATE,
            ..Op::default()
        },
        // Shared access to private memory, converted by the "VMM".
        Op {
            kind: OP_FAULT,
            gpa: gpa(3),
            flags: FLAG_CONVERT | FLAG_WRITE,
            ..Op::default()
        },
        // Same without convert: a failure with -EFAULT.
        Op {
            kind: OP_FAULT,
            gpa: gpa(9),
            ..Op::default()
        },
        Op {
            kind: OP_SET_MEMORY_ATTRIBUTES,
            gpa: 1,
            size: 4096,
            ..Op::default()
        },
        Op {
            kind: 3,
            ..Op::default()
        },
        Op {
            kind: OP_FAULT,
            ..Op::default()
        },
    ];
    let mut results = vec![0i64; ops.len()];
    let mut tally = ReplayTally::default();
    let done = o
        .with(config(), |kvm| replay(kvm, &ops, &mut results, &mut tally))
        .unwrap();
    assert_eq!(done, 5);
    assert_eq!(results[..5], [0, 3, 1, -14, -22]);
    assert_eq!(tally.ops, 5);
    assert_eq!(
        (
            tally.sets,
            tally.faults,
            tally.fault_exits,
            tally.implicit_conversions
        ),
        (3, 3, 2, 1)
    );
    assert_eq!(tally.errors, vec![(EFAULT, 1), (EINVAL, 1)]);
    assert_eq!(o.store.get(3), 0);
    assert_eq!(o.counters.set_calls, 2);
}

// --- both stacks agree, and agree with a per-page oracle -------------------

#[derive(Debug, Clone)]
enum Step {
    Set {
        start: u64,
        npages: u64,
        private: bool,
        flags: u64,
    },
    Fault {
        gfn: u64,
        private: bool,
        convert: bool,
    },
}

fn step_strategy(limit: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            0..limit,
            prop_oneof![1u64..4, 1u64..600, Just(M2), Just(G1)],
            any::<bool>(),
            prop_oneof![9 => Just(0u64), 1 => Just(1u64)]
        )
            .prop_map(|(s, n, private, flags)| Step::Set {
                start: s,
                npages: n,
                private,
                flags
            }),
        (0..limit, any::<bool>(), any::<bool>()).prop_map(|(gfn, private, convert)| Step::Fault {
            gfn,
            private,
            convert
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]
    #[test]
    fn range_stack_equals_per_page_stack_and_oracle(
        misalign in 0u64..3,
        order in prop_oneof![Just(0u32), Just(9), Just(18)],
        straddle in any::<bool>(),
        steps in prop::collection::vec(step_strategy(3 * G1), 1..40),
    ) {
        let base2 = 2 * G1 + [0, 1, M2 - 3][misalign as usize];
        let slots = [(0, G1 + 5 * M2, true, 0), (base2, G1 - 7, misalign != 1, 0)];
        let cfg = KvmConfig { guest_memfd_max_order: order, invalidate_straddling_hugepages: straddle, ..config() };
        let mut r = Owned::new(RangeTree::new(), &slots, RangeTracker::new);
        let mut x = Owned::new(XArray::new(), &slots, LpageInfoTracker::new);
        let mut oracle = vec![0u64; (4 * G1) as usize];
        let ops: Vec<Op> = steps.iter().map(|s| match *s {
            Step::Set { start, npages, private, flags } => Op {
                kind: OP_SET_MEMORY_ATTRIBUTES, gpa: gpa(start), size: gpa(npages),
                attributes: if private { P } else { 0 }, arg: flags, flags: 0,
            },
            Step::Fault { gfn, private, convert } => Op {
                kind: OP_FAULT, gpa: gpa(gfn) + 5,
                flags: (private as u8) * FLAG_PRIVATE | (convert as u8) * FLAG_CONVERT,
                ..Op::default()
            },
        }).collect();
        // One op per batch on one side, all at once on the other: splitting a
        // replay into batches must not change anything.
        let mut res_r = vec![0i64; ops.len()];
        let mut tally_r = ReplayTally::default();
        for i in 0..ops.len() {
            let n = r.with(cfg, |k| replay(k, &ops[i..i + 1], &mut res_r[i..i + 1], &mut tally_r)).unwrap();
            prop_assert_eq!(n, 1);
        }
        let mut res_x = vec![0i64; ops.len()];
        let mut tally_x = ReplayTally::default();
        x.with(cfg, |k| replay(k, &ops, &mut res_x, &mut tally_x)).unwrap();
        prop_assert_eq!(&res_r, &res_x);
        prop_assert_eq!(&tally_r, &tally_x);
        prop_assert_eq!(r.counters, x.counters);
        prop_assert_eq!(r.inval, x.inval);
        for l in 1..=3 {
            prop_assert_eq!(r.root.runs(l).unwrap(), x.root.runs(l).unwrap());
        }
        for (a, b) in r.trackers.iter().zip(&x.trackers) {
            for l in 2..=3 {
                prop_assert_eq!(a.mixed_runs(l).unwrap(), b.mixed_runs(l).unwrap());
            }
        }
        // The oracle: a set that succeeded wrote its whole range; a
        // converted fault wrote one page.
        for (op, &res) in ops.iter().zip(&res_r) {
            let gfn = op.gpa >> PAGE_SHIFT;
            if op.kind == OP_SET_MEMORY_ATTRIBUTES && res == 0 {
                let end = ((op.gpa + op.size) >> PAGE_SHIFT).min(oracle.len() as u64);
                for g in gfn..end { oracle[g as usize] = op.attributes; }
            } else if op.kind == OP_FAULT && op.flags & FLAG_CONVERT != 0 {
                // The first attempt exits (and the page is converted) when no
                // slot holds the gfn, private-ness differs, or a private
                // access hits a slot without guest_memfd.
                let private = op.flags & FLAG_PRIVATE != 0;
                let slot = slots.iter().find(|s| s.0 <= gfn && gfn < s.0 + s.1);
                let exits = match slot {
                    // No slot: a shared access to shared memory is MMIO.
                    None => private || oracle[gfn as usize] == P,
                    Some(s) => private != (oracle[gfn as usize] == P) || (private && !s.2),
                };
                if exits {
                    oracle[gfn as usize] = if private { P } else { 0 };
                }
            }
        }
        for g in (0..oracle.len() as u64).step_by(97).chain([G1 - 1, G1, base2, base2 + 1]) {
            prop_assert_eq!(r.store.get(g), oracle[g as usize], "gfn {}", g);
            prop_assert_eq!(x.store.get(g), oracle[g as usize], "gfn {}", g);
        }
        prop_assert_eq!(r.counters.mapped.iter().zip(r.root.counts()).all(|(&m, c)| m == c as i64), true);
    }
}

#[test]
fn guest_memfd_fallocate_checks_and_punches() {
    let mut o = Owned::new(RangeTree::new(), &two_slots(), RangeTracker::new);
    let file = GmemFile {
        fd: 7,
        size: gpa(4 * G1),
        // RAM below 4G at file page 0, RAM above at file page 2G.
        bindings: vec![(0, 2 * G1, 0), (2 * G1, 4 * G1, 1)],
    };
    let slots = o.slots.clone();
    let mut kvm_slots = Vec::new();
    for (&(base_gfn, npages, can_be_private, flags), t) in slots.iter().zip(o.trackers.iter_mut()) {
        kvm_slots.push(Memslot {
            as_id: 0,
            base_gfn,
            npages,
            flags,
            can_be_private,
            tracker: t,
        });
    }
    let mut kvm = Kvm::new(
        config(),
        &mut o.store,
        kvm_slots,
        vec![&mut o.root],
        o.inval,
    )
    .unwrap()
    .with_guest_memfds(vec![file])
    .unwrap();
    let punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
    let errno = |r: Result<(), KvmError>| r.unwrap_err().errno();
    assert_eq!(errno(kvm.guest_memfd_fallocate(8, punch, 0, 4096)), EBADF);
    assert_eq!(
        errno(kvm.guest_memfd_fallocate(7, punch, -4096, 4096)),
        EINVAL
    );
    assert_eq!(
        errno(kvm.guest_memfd_fallocate(7, punch | 0x80, 0, 4096)),
        EOPNOTSUPP
    );
    assert_eq!(
        errno(kvm.guest_memfd_fallocate(7, FALLOC_FL_PUNCH_HOLE, 0, 4096)),
        EOPNOTSUPP
    );
    assert_eq!(
        errno(kvm.guest_memfd_fallocate(7, 0x08 | 1, 0, 4096)),
        EINVAL
    );
    assert_eq!(
        errno(kvm.guest_memfd_fallocate(7, punch, i64::MAX - 4095, 8192)),
        EFBIG
    );
    assert_eq!(errno(kvm.guest_memfd_fallocate(7, punch, 1, 4096)), EINVAL);
    assert_eq!(
        errno(kvm.guest_memfd_fallocate(7, 1, gpa(4 * G1) as i64, 4096)),
        EINVAL
    );
    assert_eq!(kvm.guest_memfd_fallocate(7, 1, 0, 4096), Ok(()));
    assert_eq!(kvm.counters.mmu_lock_acquisitions, 0);
    // A hole across both bindings: one invalidation, both mappings zapped.
    kvm.set_memory_attributes(0, gpa(2 * G1), P, 0).unwrap();
    assert_eq!(kvm.fault(gpa(2 * G1 - 1), true, 0), Ok(PG_LEVEL_1G));
    assert_eq!(kvm.fault(gpa(4 * G1), false, 0), Ok(PG_LEVEL_1G));
    let before = kvm.counters;
    let seq = kvm.inval.seq;
    let hole = gpa(2 * G1 - M2) as i64;
    assert_eq!(
        kvm.guest_memfd_fallocate(7, punch, hole, 2 * gpa(M2) as i64),
        Ok(())
    );
    assert_eq!(kvm.counters.zapped_pages[2] - before.zapped_pages[2], 2);
    assert_eq!(kvm.counters.tlb_flushes - before.tlb_flushes, 1);
    assert_eq!(
        kvm.counters.mmu_lock_acquisitions - before.mmu_lock_acquisitions,
        2
    );
    assert_eq!(kvm.counters.gmem_holes_punched, 1);
    assert_eq!(kvm.inval.seq, seq + 1);
    assert_eq!(
        (kvm.inval.range_start, kvm.inval.range_end),
        (2 * G1 - M2, 4 * G1 + M2)
    );
    // A converted shared fault with FLAG_DISCARD punches the hole behind
    // its page: slot 1's page 3 is file page 2G + 3.
    assert_eq!(
        kvm.gmem_location(gpa(4 * G1 + 3)),
        Some((7, gpa(2 * G1 + 3)))
    );
    assert_eq!(kvm.gmem_location(gpa(3 * G1)), None);
    kvm.set_memory_attributes(gpa(4 * G1), gpa(M2), P, 0)
        .unwrap();
    let op = Op {
        kind: OP_FAULT,
        gpa: gpa(4 * G1 + 3),
        flags: FLAG_CONVERT | FLAG_DISCARD,
        ..Op::default()
    };
    let (mut results, mut tally) = ([0i64], ReplayTally::default());
    assert_eq!(replay(&mut kvm, &[op], &mut results, &mut tally), Ok(1));
    assert_eq!((results[0], tally.implicit_conversions), (1, 1));
    assert_eq!(kvm.counters.gmem_holes_punched, 2);
}

#[test]
fn guest_memfd_bindings_must_match_their_memslots() {
    fn accepts(bindings: Vec<(u64, u64, usize)>) -> bool {
        let mut store = RangeTree::new();
        let mut root = Stage2Map::new();
        let mut t = RangeTracker::new(SlotLayout::new(0, 10, 0).unwrap());
        let slot = Memslot {
            as_id: 0,
            base_gfn: 0,
            npages: 10,
            flags: 0,
            can_be_private: true,
            tracker: &mut t,
        };
        let file = GmemFile {
            fd: 3,
            size: 1 << 20,
            bindings,
        };
        Kvm::new(
            config(),
            &mut store,
            vec![slot],
            vec![&mut root],
            Default::default(),
        )
        .unwrap()
        .with_guest_memfds(vec![file])
        .is_ok()
    }
    assert!(accepts(vec![(5, 15, 0)]));
    assert!(!accepts(vec![(5, 15, 1)]), "no memslot 1");
    assert!(!accepts(vec![(5, 14, 0)]), "9 pages for a 10-page slot");
    assert!(!accepts(vec![(5, 5, 0)]), "empty binding");
}
