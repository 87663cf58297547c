//! Native replay of a dumped trace, with no Python: the loop `memattr`'s
//! native engine runs, timed alone, for profiling the core (`perf record`
//! on this binary sees Rust frames only).
//!
//!   python benches/dump_trace.py TRACE.mtr /tmp/bac      # writes .setup and .ops
//!   cargo bench --bench replay -- /tmp/bac [rounds]
//!   cargo bench --bench replay -- /tmp/bac [rounds] --store-only
//!
//! Prints operations per second per round and the replay's tally, so two
//! builds can be compared side by side on the same dump.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use memattr::kvm::memslots::UserspaceMemoryRegion;
use memattr::kvm::replay::{replay, OpColumns, Ops, ReplayTally};
use memattr::kvm::{Kvm, Semantics, SharedStore};
use memattr::rangetree::RangeTree;
use memattr::store::AttrStore;

/// A dump's operations as the extension passes them to the replay: one
/// array per record field (memattr.trace's OP_DTYPE, 40-byte little-endian
/// records), read through [`OpColumns`] as `memattr._native.Kvm.replay`
/// reads numpy's columns.
#[derive(Default)]
struct Columns {
    kind: Vec<u8>,
    gpa: Vec<u64>,
    size: Vec<u64>,
    attributes: Vec<u64>,
    arg: Vec<u64>,
    flags: Vec<u8>,
}

impl Columns {
    fn parse(bytes: &[u8]) -> Self {
        assert_eq!(bytes.len() % 40, 0, "not a whole number of 40-byte records");
        let u64_at = |r: &[u8], o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
        let mut c = Columns::default();
        for r in bytes.chunks_exact(40) {
            c.gpa.push(u64_at(r, 0));
            c.size.push(u64_at(r, 8));
            c.attributes.push(u64_at(r, 16));
            c.arg.push(u64_at(r, 24));
            c.kind.push(r[36]);
            c.flags.push(r[37]);
        }
        c
    }

    fn ops(&self) -> OpColumns<'_> {
        OpColumns::new(
            &self.kind,
            &self.gpa,
            &self.size,
            &self.attributes,
            &self.arg,
            &self.flags,
        )
        .expect("columns of one length")
    }
}

fn setup(path: &str) -> (Kvm, Vec<(u64, u64)>) {
    let text = std::fs::read_to_string(format!("{path}.setup")).expect("read .setup");
    let mut kvm = None;
    let mut fds = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| w[i].parse::<u64>().expect("a number");
        match w[0] {
            "vm" => {
                // The semantics memattr.Vm defaults to, so the harness runs
                // what `memattr compare` runs.
                let store: SharedStore = Arc::new(RwLock::new(RangeTree::new()));
                kvm = Some(
                    Kvm::new(n(1), Semantics::Linux618, store, false, None, n(2) as u32)
                        .expect("create the VM"),
                );
            }
            "gmem" => {
                let k = kvm.as_mut().expect("vm line first");
                fds.push(k.kvm_gmem_create(n(1), n(2)).expect("create guest_memfd"));
            }
            "slot" => {
                let k = kvm.as_mut().expect("vm line first");
                let mem = UserspaceMemoryRegion {
                    slot: n(1) as u32,
                    flags: n(2) as u32,
                    guest_phys_addr: n(3),
                    memory_size: n(4),
                    userspace_addr: n(5),
                    guest_memfd_offset: n(6),
                    guest_memfd: fds[0] as u32,
                };
                k.kvm_set_memory_region(&mem, false).expect("memslot");
            }
            other => panic!("unknown setup line {other:?}"),
        }
    }
    (kvm.expect("a vm line"), Vec::new())
}

/// The dump's applied sets alone (`.sets`, which dump_trace.py selects
/// with `memattr.sweep.run_store_only`'s own rule), through a bare
/// RangeTree's batch entry.
fn store_only(path: &str, rounds: usize) {
    let bytes = std::fs::read(format!("{path}.sets"))
        .expect("read .sets (dump the trace again with benches/dump_trace.py)");
    assert_eq!(bytes.len() % 24, 0, "not a whole number of 24-byte sets");
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    let column = |c: usize| -> Vec<u64> { words.iter().skip(c).step_by(3).copied().collect() };
    let (starts, ends, values) = (column(0), column(1), column(2));
    for round in 0..rounds {
        let mut tree = RangeTree::new();
        let t = Instant::now();
        tree.set_many(&starts, &ends, &values)
            .expect("valid ranges");
        let secs = t.elapsed().as_secs_f64();
        println!(
            "round {round}: store only, {} sets in {secs:.3} s = {:.0} sets/s ({:.0} ns/op); {} runs at the end",
            starts.len(),
            starts.len() as f64 / secs,
            secs * 1e9 / starts.len() as f64,
            tree.entry_count()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(path) = args.first() else {
        eprintln!("usage: cargo bench --bench replay -- DUMP [ROUNDS] (see the file's header)");
        return;
    };
    let rounds: usize = args.get(1).map_or(3, |r| r.parse().expect("rounds"));
    if std::env::args().any(|a| a == "--store-only") {
        store_only(path, rounds);
        return;
    }
    let columns = Columns::parse(&std::fs::read(format!("{path}.ops")).expect("read .ops"));
    let ops = columns.ops();
    for round in 0..rounds {
        let (mut kvm, _) = setup(path);
        let mut results = vec![0i64; ops.len()];
        let mut tally = ReplayTally::default();
        let t = Instant::now();
        let ran = replay(&mut kvm, &ops, &mut results, &mut tally).expect("no model bug");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(ran, ops.len(), "the dump holds only batch operations");
        println!(
            "round {round}: {} ops in {secs:.3} s = {:.0} ops/s ({:.0} ns/op); sets {} faults {} exits {} errors {:?}",
            ops.len(),
            ops.len() as f64 / secs,
            secs * 1e9 / ops.len() as f64,
            tally.sets,
            tally.faults,
            tally.fault_exits,
            tally.errors
        );
        if round + 1 == rounds {
            // Where a walk may miss the cache: the footprint at the end.
            let store = kvm.shared_store().read().unwrap().memory_bytes();
            let trackers: usize = kvm
                .memslots()
                .iter()
                .map(|s| s.tracker.memory_bytes())
                .sum();
            let tables = kvm.table_bytes();
            println!(
                "footprint at the end: store {:.1} MB, page tables {:.1} MB, hugepage trackers {:.1} MB",
                store as f64 / 1e6,
                tables as f64 / 1e6,
                trackers as f64 / 1e6
            );
        }
    }
}
