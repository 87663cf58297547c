//! `SimpleRangeTree`: the range store on `std::collections::BTreeMap`.
//!
//! Dev-only, not part of the shipped library: the straightforward version
//! that `RangeTree` (rangetree.rs) is checked against in the store tests and
//! measured against in `benches/stores.rs`. It is compiled into the library
//! only under `cfg(test)` (lib.rs) and into the bench by `#[path]`; both
//! provide `crate::store` (the bench re-exports `memattr::store` under that
//! name).
//!
//! Like `RangeTree` it keeps maximal runs `[start, end) -> value` of equal
//! non-zero value: adjacent runs with the same value are always merged and
//! zero runs are not stored.

use std::collections::BTreeMap;

use crate::store::{check_range, AttrStore, StoreError};

/// Bytes a `BTreeMap<u64, (u64, u64)>` spends per run, roughly: a leaf holds
/// at most 11 entries of 24 bytes plus a header, and is 2/3 full on average.
const SIMPLE_BYTES_PER_RUN: usize = 40;

/// The straightforward version on `std::collections::BTreeMap`, keyed by
/// run start. Kept as the reference the node-based tree is measured against.
#[derive(Clone, Default, Debug)]
pub struct SimpleRangeTree {
    map: BTreeMap<u64, (u64, u64)>,
    /// Runs' worth of memory set aside by `reserve`.
    reserved_runs: usize,
}

impl SimpleRangeTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that runs are sorted, disjoint, non-zero and maximal.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut prev: Option<(u64, u64)> = None;
        for (&s, &(e, v)) in &self.map {
            if s >= e || v == 0 {
                return Err(format!("bad run [{s}, {e}) = {v}"));
            }
            if let Some((pe, pv)) = prev {
                if pe > s || (pe == s && pv == v) {
                    return Err(format!("run at {s} overlaps or should merge"));
                }
            }
            prev = Some((e, v));
        }
        Ok(())
    }

    /// The run containing `gfn`, as (start, end, value).
    fn run_at(&self, gfn: u64) -> Option<(u64, u64, u64)> {
        let (&s, &(e, v)) = self.map.range(..=gfn).next_back()?;
        (gfn < e).then_some((s, e, v))
    }
}

impl AttrStore for SimpleRangeTree {
    fn get(&self, gfn: u64) -> u64 {
        self.run_at(gfn).map_or(0, |r| r.2)
    }

    fn set_range(&mut self, start: u64, end: u64, value: u64) -> Result<(), StoreError> {
        check_range(start, end)?;
        // The new run, widened when it merges with a neighbour.
        let (mut lo, mut hi) = (start, end);
        // A run that starts before `start` and reaches it: merge, or cut.
        if let Some((&ps, &(pe, pv))) = self.map.range(..start).next_back() {
            if pe >= start {
                if pv == value {
                    lo = ps;
                    hi = hi.max(pe);
                    self.map.remove(&ps);
                } else if pe > start {
                    self.map.insert(ps, (start, pv));
                    if pe > end {
                        self.map.insert(end, (pe, pv));
                    }
                }
            }
        }
        // Runs starting inside [start, end] are covered, except for a tail
        // past `end`; one starting exactly at `end` only matters for merging.
        while let Some((&rs, &(re, rv))) = self.map.range(start..=end).next() {
            if rs == end {
                if rv == value {
                    hi = hi.max(re);
                    self.map.remove(&rs);
                }
                break;
            }
            self.map.remove(&rs);
            if re > end {
                if rv == value {
                    hi = hi.max(re);
                } else {
                    self.map.insert(end, (re, rv));
                }
                break;
            }
        }
        if value != 0 {
            self.map.insert(lo, (hi, value));
        }
        self.reserved_runs = 0;
        Ok(())
    }

    fn has_value(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<bool, StoreError> {
        let mut ok = true;
        let want = value & mask;
        self.for_each_run(start, end, &mut |_, _, v| ok &= v & mask == want)?;
        Ok(ok)
    }

    fn for_each_run(
        &self,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, u64),
    ) -> Result<(), StoreError> {
        check_range(start, end)?;
        let mut pos = start;
        let first = self.run_at(start).map_or(start, |r| r.0);
        for (&s, &(e, v)) in self.map.range(first..end) {
            let s = s.max(start);
            if s > pos {
                f(pos, s, 0);
            }
            let e = e.min(end);
            f(s, e, v);
            pos = e;
        }
        if pos < end {
            f(pos, end, 0);
        }
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        (self.map.len() + self.reserved_runs) * SIMPLE_BYTES_PER_RUN
    }

    fn entry_count(&self) -> usize {
        self.map.len()
    }

    fn reserve(&mut self, start: u64, end: u64, limit: Option<usize>) -> Result<(), StoreError> {
        check_range(start, end)?;
        // A set can split one run in two and add the new one: 2 more runs.
        let needed = (self.map.len() + 2) * SIMPLE_BYTES_PER_RUN;
        if let Some(limit) = limit {
            if needed > limit {
                return Err(StoreError::OutOfMemory {
                    needed,
                    limit: Some(limit),
                });
            }
        }
        self.reserved_runs = 2;
        Ok(())
    }

    fn release_reservations(&mut self) {
        self.reserved_runs = 0;
    }
}
