//! The range-based attribute store.
//!
//! `RangeTree` is a B+ tree of runs laid out for the cache: fixed-size nodes
//! in two arenas, sorted u64 keys searched by counting (no branches to
//! mispredict), leaves linked both ways for run iteration.
//! (`SimpleRangeTree`, the same store on `std::collections::BTreeMap` that it
//! is tested and benchmarked against, is dev-only: `simple_rangetree.rs`.)
//!
//! The tree keeps maximal runs `[start, end) -> value` of equal non-zero
//! value: adjacent runs with the same value are always merged and zero runs
//! are not stored, so the stored runs are exactly the non-zero runs that
//! `for_each_run` reports, and memory grows with runs, never with pages.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use crate::store::{check_range, AttrStore, StoreError};

/// Runs per leaf, and children per interior node.
const CAP: usize = 32;
const _: () = assert!(CAP.is_power_of_two());
/// A node below this (other than the root) borrows from or merges with a
/// sibling, so every node is at least a quarter full: memory stays within a
/// small factor of the runs themselves however they were built.
const MIN: usize = CAP / 4;
const NONE: u32 = u32::MAX;
/// Deeper than any tree can get: with at least MIN children per interior
/// node, 2^64 runs fit in 22 levels.
const MAX_DEPTH: usize = 24;
/// Unused key slots hold this so a search can count over the whole fixed
/// array without looking at the length: a sentinel never compares <= a key
/// searched for (searches never use u64::MAX, which no run can start at).
const SENTINEL: u64 = u64::MAX;

/// Up to CAP runs, sorted by start, in struct-of-arrays form so the search
/// touches only the starts.
#[derive(Clone)]
struct Leaf {
    len: u32,
    prev: u32,
    next: u32,
    starts: [u64; CAP],
    ends: [u64; CAP],
    vals: [u64; CAP],
}

/// `keys[i]` separates `children[i]` (all starts < key) from
/// `children[i + 1]` (all starts >= key).
#[derive(Clone)]
struct Inner {
    len: u32,
    keys: [u64; CAP],
    children: [u32; CAP],
}

impl Leaf {
    fn empty() -> Self {
        Leaf {
            len: 0,
            prev: NONE,
            next: NONE,
            starts: [SENTINEL; CAP],
            ends: [0; CAP],
            vals: [0; CAP],
        }
    }

    #[inline]
    fn run(&self, i: usize) -> (u64, u64, u64) {
        (self.starts[i], self.ends[i], self.vals[i])
    }

    #[inline]
    fn put(&mut self, i: usize, r: (u64, u64, u64)) {
        self.starts[i] = r.0;
        self.ends[i] = r.1;
        self.vals[i] = r.2;
    }

    /// Moves runs `[from, len)` to start at `to` (either direction).
    fn shift(&mut self, from: usize, to: usize) {
        let n = self.len as usize - from;
        self.starts.copy_within(from..from + n, to);
        self.ends.copy_within(from..from + n, to);
        self.vals.copy_within(from..from + n, to);
    }

    fn seal(&mut self) {
        self.starts[self.len as usize..].fill(SENTINEL);
    }
}

impl Inner {
    fn empty() -> Self {
        Inner {
            len: 0,
            keys: [SENTINEL; CAP],
            children: [NONE; CAP],
        }
    }

    fn seal(&mut self) {
        let k = (self.len as usize).saturating_sub(1);
        self.keys[k..].fill(SENTINEL);
    }

    /// Removes child `ci` (>= 1) and the key to its left.
    fn remove_child(&mut self, ci: usize) {
        let len = self.len as usize;
        self.keys
            .copy_within(ci..len.saturating_sub(1).max(ci), ci - 1);
        self.children.copy_within(ci + 1..len, ci);
        self.len -= 1;
        self.seal();
    }
}

/// Number of keys `<= k` in a sorted, sentinel-padded node: a binary search
/// of fixed length whose steps compile to conditional moves, so no branch
/// depends on the data (a linear scan of 32 u64 costs more without AVX2).
#[inline(always)]
fn count_le(keys: &[u64; CAP], k: u64) -> usize {
    let mut base = 0usize;
    let mut n = CAP;
    while n > 1 {
        let half = n / 2;
        base = if keys[base + half - 1] <= k {
            base + half
        } else {
            base
        };
        n -= half;
    }
    base + (keys[base] <= k) as usize
}

/// Asks for every cache line of a node's sorted keys at once, before the
/// search reads them. The binary search's probes depend on each other, so
/// on a node that is not in the cache (a descent to a gfn far from the last
/// one, in a tree larger than L2) they would miss one after another, three
/// lines a node; prefetched, the misses overlap and cost about one.
#[inline(always)]
fn prefetch_keys(keys: &[u64; CAP]) {
    crate::prefetch::prefetch(keys);
}

/// The interior nodes and child indices from the root down to a leaf.
#[derive(Clone, Copy)]
struct Path {
    ids: [u32; MAX_DEPTH],
    idx: [u8; MAX_DEPTH],
    depth: usize,
}

/// The leaf the last lookup ended in: the set and fault paths ask about the
/// same few gfns several times per operation (the early-exit check, the
/// store, the hugepage re-checks, the fault's attribute), so a lookup first
/// tries that leaf and descends only when it does not hold the key.
///
/// Only a hint: a lookup trusts it after checking the leaf's own runs
/// against the key, so readers sharing the tree (behind a read lock) may
/// race on it harmlessly (Relaxed: a plain load or store on x86). A leaf
/// that is freed clears it, since a dead leaf's runs are stale.
struct Finger(AtomicU32);

impl Finger {
    fn none() -> Self {
        Finger(AtomicU32::new(NONE))
    }
    fn get(&self) -> u32 {
        self.0.load(Relaxed)
    }
    fn set(&self, id: u32) {
        self.0.store(id, Relaxed)
    }
}

/// Where the descent [`AttrStore::prefetch`] made for the next operation's
/// gfn ended, kept so that operation's first lookup reuses it instead of
/// descending again: the leaf and the separators bounding it (every key in
/// `[lo, hi)` descends to it). No path: the set path needs one only to
/// split or merge, which descends again (rarely), and copying a kept path
/// in and out was a fifth of a store-only set's instructions. Valid until
/// the tree's shape changes: every function that allocates, frees, splits,
/// merges or moves nodes or separators drops it (`reshaped`); changing runs
/// inside a leaf does not move a key to another leaf, so it keeps it.
#[derive(Clone, Copy)]
struct KeptDescent {
    leaf: u32,
    lo: u64,
    hi: Option<u64>,
}

impl KeptDescent {
    #[inline]
    fn holds(&self, k: u64) -> bool {
        self.lo <= k && self.hi.is_none_or(|hi| k < hi)
    }
}

impl Clone for Finger {
    fn clone(&self) -> Self {
        Finger(AtomicU32::new(self.get()))
    }
}

/// The range store: see the module documentation. Every node other than
/// the root is at least a quarter full, all leaves are at the same depth,
/// and the separators bound their subtrees exactly as documented on `Inner`.
#[derive(Clone)]
pub struct RangeTree {
    leaves: Vec<Leaf>,
    inners: Vec<Inner>,
    free_leaves: Vec<u32>,
    free_inners: Vec<u32>,
    root: u32,
    /// Interior levels above the leaves: 0 when the root is a leaf.
    height: usize,
    runs: usize,
    live_leaves: usize,
    live_inners: usize,
    /// Nodes set aside by `reserve` for the next `set_range`.
    spare_leaves: usize,
    spare_inners: usize,
    finger: Finger,
    /// The last two prefetches' descents: a batch hints the next operation
    /// before it runs the current one, so the current one's hint is the
    /// older of the two.
    hints: [Option<KeptDescent>; 2],
    newest_hint: usize,
}

impl Default for RangeTree {
    fn default() -> Self {
        Self::new()
    }
}

impl RangeTree {
    pub fn new() -> Self {
        RangeTree {
            leaves: vec![Leaf::empty()],
            inners: Vec::new(),
            free_leaves: Vec::new(),
            free_inners: Vec::new(),
            root: 0,
            height: 0,
            runs: 0,
            live_leaves: 1,
            live_inners: 0,
            spare_leaves: 0,
            spare_inners: 0,
            finger: Finger::none(),
            hints: [None, None],
            newest_hint: 0,
        }
    }

    /// The tree's shape changes: the kept descent may lead elsewhere now.
    #[inline]
    fn reshaped(&mut self) {
        self.hints = [None, None];
    }

    /// Which of the kept descents leads to `k`'s leaf, if any.
    #[inline]
    fn hint_slot(&self, k: u64) -> Option<usize> {
        (0..self.hints.len()).find(|&j| self.hints[j].is_some_and(|h| h.holds(k)))
    }

    /// The kept descent that leads to `k`'s leaf, if any.
    #[inline]
    fn hint_for(&self, k: u64) -> Option<&KeptDescent> {
        self.hint_slot(k).and_then(|j| self.hints[j].as_ref())
    }

    /// Height of the tree counting the leaf level.
    pub fn depth(&self) -> usize {
        self.height + 1
    }

    fn alloc_leaf(&mut self) -> u32 {
        self.reshaped();
        self.spare_leaves = self.spare_leaves.saturating_sub(1);
        self.live_leaves += 1;
        match self.free_leaves.pop() {
            Some(id) => {
                self.leaves[id as usize] = Leaf::empty();
                id
            }
            None => {
                self.leaves.push(Leaf::empty());
                (self.leaves.len() - 1) as u32
            }
        }
    }

    fn alloc_inner(&mut self) -> u32 {
        self.reshaped();
        self.spare_inners = self.spare_inners.saturating_sub(1);
        self.live_inners += 1;
        match self.free_inners.pop() {
            Some(id) => {
                self.inners[id as usize] = Inner::empty();
                id
            }
            None => {
                self.inners.push(Inner::empty());
                (self.inners.len() - 1) as u32
            }
        }
    }

    fn free_leaf(&mut self, id: u32) {
        self.reshaped();
        self.finger.set(NONE);
        self.live_leaves -= 1;
        self.free_leaves.push(id);
    }

    fn free_inner(&mut self, id: u32) {
        self.reshaped();
        self.live_inners -= 1;
        self.free_inners.push(id);
    }

    /// The leaf `k` descends to, how many of its starts are `<= k`, and the
    /// separators bounding it (`lo`, 0 if none; `hi`): from the kept descent
    /// when it holds `k`, else by descending. No path (see [`KeptDescent`]):
    /// [`Self::find`] gives one to the callers that change the tree's shape.
    ///
    /// `find_leaf`, `find`, `descend` and `locate` are inlined into every
    /// caller: each runs from a few sites on every operation, and as calls
    /// they cost a prologue, spilled registers and a returned tuple copied
    /// out. When that was measured (the kept descent still held a path),
    /// inlining took the 1 TiB boot-and-churn store-only stream from 784 to
    /// 677 instructions a set, and the replay from 2,034 to 1,932 an
    /// operation (`benches/bench_instructions.py`, with
    /// `SparseBitmap::insert` and `PmdTable::table_mut` inlined too); 1,854
    /// with `has_value`, `reserve`, the range tracker's `hugepage_has_attrs`
    /// and `disallow_lpage`, `PmdTable::set` and `Pud::pmds_mut` as well.
    /// Without the path: 593 a set and 1,764 an operation (callgrind).
    #[inline(always)]
    fn find_leaf(&self, k: u64) -> (u32, usize, u64, Option<u64>) {
        let (id, lo, hi) = match self.hint_for(k) {
            Some(h) => (h.leaf, h.lo, h.hi),
            None => {
                let (_, id, lo, hi) = self.descend(k);
                (id, lo, hi)
            }
        };
        let l = &self.leaves[id as usize];
        prefetch_keys(&l.starts);
        (id, count_le(&l.starts, k).min(l.len as usize), lo, hi)
    }

    /// [`Self::find_leaf`] with the path from the root, for the callers
    /// that may split or merge nodes along it: always a descent.
    #[inline(always)]
    fn find(&self, k: u64) -> (Path, u32, usize) {
        let (path, id, _, _) = self.descend(k);
        let l = &self.leaves[id as usize];
        prefetch_keys(&l.starts);
        (path, id, count_le(&l.starts, k).min(l.len as usize))
    }

    /// The interior nodes and child indices from the root towards `k`, the
    /// leaf they lead to, and the separators bounding that leaf (every key
    /// in `[lo, hi)` descends to it; the nearest ancestor's are the
    /// tightest). Inlined: see [`Self::find_leaf`].
    #[inline(always)]
    fn descend(&self, k: u64) -> (Path, u32, u64, Option<u64>) {
        let mut path = Path {
            ids: [0; MAX_DEPTH],
            idx: [0; MAX_DEPTH],
            depth: 0,
        };
        let (mut lo, mut hi) = (0, None);
        let mut id = self.root;
        for d in 0..self.height {
            let n = &self.inners[id as usize];
            prefetch_keys(&n.keys);
            let c = count_le(&n.keys, k).min(n.len as usize - 1);
            if c > 0 {
                lo = n.keys[c - 1];
            }
            if c + 1 < n.len as usize {
                hi = Some(n.keys[c]);
            }
            path.ids[d] = id;
            path.idx[d] = c as u8;
            id = n.children[c];
        }
        path.depth = self.height;
        (path, id, lo, hi)
    }

    /// The leaf and index of the last run starting `<= k`, if any.
    /// Inlined: see [`Self::find_leaf`].
    #[inline(always)]
    fn locate(&self, k: u64) -> Option<(u32, usize)> {
        let f = self.finger.get();
        let fl = self.leaves.get(f as usize).filter(|l| l.len > 0);
        // The answer is in the finger's leaf iff its first run starts at or
        // before k and the next leaf's first run after it (the leaves
        // partition the runs in order, whatever the separators say). A key
        // below this leaf's last end is before every run of the next leaf,
        // so that settles it without reading another leaf.
        if let Some(l) = fl {
            if l.starts[0] <= k && (k < l.ends[l.len as usize - 1] || l.next == NONE) {
                return Some((f, count_le(&l.starts, k).min(l.len as usize) - 1));
            }
        }
        let hinted = self.hint_for(k).map(|h| h.leaf);
        // Otherwise a kept descent (the prefetched leaf) settles it first,
        // before any neighbour of the finger's leaf is read: for a key far
        // from the finger, the checks below read a leaf nothing prefetched
        // (that read was a third of the early-exit check's perf samples at
        // 1 TiB when it came first).
        if let (None, Some(l)) = (hinted, fl) {
            // A key past the leaf's last end, but before the next leaf's
            // first run: still this leaf. (With `starts[0] <= k`, the check
            // above failed only if the next leaf exists.)
            if l.starts[0] <= k && k < self.leaves[l.next as usize].starts[0] {
                return Some((f, count_le(&l.starts, k).min(l.len as usize) - 1));
            }
            // A key just below the leaf (the 2M re-check's first gfn, ahead
            // of the converted one): the leaf before holds the answer if
            // its first run starts at or before the key, since this
            // leaf's first start is after it. One leaf read, no descent.
            if k < l.starts[0] && l.prev != NONE {
                let p = &self.leaves[l.prev as usize];
                if p.len > 0 && p.starts[0] <= k {
                    return Some((l.prev, count_le(&p.starts, k).min(p.len as usize) - 1));
                }
            }
        }
        let id = match hinted {
            Some(id) => id,
            None => {
                // Not `descend`: this lookup needs no path or separators,
                // and building them costs 4% of a replay's instructions
                // (callgrind, 256 GiB boot-and-churn).
                let mut id = self.root;
                for _ in 0..self.height {
                    let n = &self.inners[id as usize];
                    prefetch_keys(&n.keys);
                    let c = count_le(&n.keys, k).min(n.len as usize - 1);
                    id = n.children[c];
                }
                id
            }
        };
        let l = &self.leaves[id as usize];
        prefetch_keys(&l.starts);
        let pos = count_le(&l.starts, k).min(l.len as usize);
        if pos > 0 {
            self.finger.set(id);
            return Some((id, pos - 1));
        }
        // Everything here starts after k; the previous leaf ends before.
        let prev = l.prev;
        (prev != NONE).then(|| (prev, self.leaves[prev as usize].len as usize - 1))
    }

    #[inline(always)]
    fn lookup(&self, gfn: u64) -> u64 {
        if gfn == SENTINEL {
            return 0;
        }
        match self.locate(gfn) {
            Some((id, i)) => {
                let l = &self.leaves[id as usize];
                if gfn < l.ends[i] {
                    l.vals[i]
                } else {
                    0
                }
            }
            None => 0,
        }
    }

    /// The last run starting before `k`.
    fn pred_lt(&self, k: u64) -> Option<(u64, u64, u64)> {
        if k == 0 {
            return None;
        }
        self.locate(k - 1)
            .map(|(id, i)| self.leaves[id as usize].run(i))
    }

    /// The first run starting at or after `k`.
    fn first_ge(&self, k: u64) -> Option<(u64, u64, u64)> {
        let (id, pos) = if k == 0 {
            (self.find_leaf(0).0, 0)
        } else {
            let (id, pos, _, _) = self.find_leaf(k - 1);
            (id, pos)
        };
        let l = &self.leaves[id as usize];
        if pos < l.len as usize {
            Some(l.run(pos))
        } else if l.next != NONE {
            Some(self.leaves[l.next as usize].run(0))
        } else {
            None
        }
    }

    fn set_end(&mut self, start: u64, end: u64) {
        let (id, pos, _, _) = self.find_leaf(start);
        debug_assert!(pos > 0 && self.leaves[id as usize].starts[pos - 1] == start);
        self.leaves[id as usize].ends[pos - 1] = end;
    }

    /// Inserts a run whose start is not stored yet.
    fn insert(&mut self, r: (u64, u64, u64)) {
        let (mut id, mut pos, _, _) = self.find_leaf(r.0);
        if self.leaves[id as usize].len as usize == CAP {
            let (path, _, _) = self.find(r.0);
            // Appending past the last leaf (a guest converted front to
            // back) splits unevenly, so such trees end up 3/4 full, not 1/2.
            let keep = if pos == CAP && self.leaves[id as usize].next == NONE {
                CAP - MIN
            } else {
                CAP / 2
            };
            let right = self.split_leaf(&path, id, keep);
            if pos > keep {
                id = right;
                pos -= keep;
            }
        }
        let l = &mut self.leaves[id as usize];
        l.shift(pos, pos + 1);
        l.put(pos, r);
        l.len += 1;
        self.runs += 1;
    }

    /// Splits a leaf (full, or about to overflow), keeping `half` runs in
    /// it; returns the new right leaf.
    fn split_leaf(&mut self, path: &Path, id: u32, half: usize) -> u32 {
        self.reshaped();
        let right = self.alloc_leaf();
        let (left_next, sep) = {
            let (l, r) = two_mut(&mut self.leaves, id, right);
            let len = l.len as usize;
            r.starts[..len - half].copy_from_slice(&l.starts[half..len]);
            r.ends[..len - half].copy_from_slice(&l.ends[half..len]);
            r.vals[..len - half].copy_from_slice(&l.vals[half..len]);
            r.len = (len - half) as u32;
            l.len = half as u32;
            l.seal();
            r.prev = id;
            r.next = l.next;
            l.next = right;
            (r.next, r.starts[0])
        };
        if left_next != NONE {
            self.leaves[left_next as usize].prev = right;
        }
        self.insert_child(path, path.depth, sep, right);
        right
    }

    /// Adds `child` with separator `key` right of the node reached at
    /// `depth` along `path`, splitting interior nodes up to a new root.
    fn insert_child(&mut self, path: &Path, depth: usize, key: u64, child: u32) {
        self.reshaped();
        if depth == 0 {
            let old = self.root;
            let root = self.alloc_inner();
            let n = &mut self.inners[root as usize];
            n.len = 2;
            n.children[0] = old;
            n.children[1] = child;
            n.keys[0] = key;
            self.root = root;
            self.height += 1;
            return;
        }
        let d = depth - 1;
        let mut id = path.ids[d];
        let mut ci = path.idx[d] as usize;
        if self.inners[id as usize].len as usize == CAP {
            // Split first: the left part keeps `half` children, the key
            // between the parts moves up. Appends split unevenly, as leaves.
            let half = if ci == CAP - 1 { CAP - MIN } else { CAP / 2 };
            let right = self.alloc_inner();
            let up = {
                let (l, r) = two_mut(&mut self.inners, id, right);
                r.children[..CAP - half].copy_from_slice(&l.children[half..]);
                r.keys[..CAP - half - 1].copy_from_slice(&l.keys[half..CAP - 1]);
                r.len = (CAP - half) as u32;
                let up = l.keys[half - 1];
                l.len = half as u32;
                l.seal();
                r.seal();
                up
            };
            self.insert_child(path, d, up, right);
            if ci >= half {
                id = right;
                ci -= half;
            }
        }
        let n = &mut self.inners[id as usize];
        let len = n.len as usize;
        n.children.copy_within(ci + 1..len, ci + 2);
        n.keys.copy_within(ci..len - 1, ci + 1);
        n.children[ci + 1] = child;
        n.keys[ci] = key;
        n.len += 1;
    }

    /// Removes the run starting at `start`.
    fn remove(&mut self, start: u64) {
        let (id, pos, _, _) = self.find_leaf(start);
        debug_assert!(pos > 0 && self.leaves[id as usize].starts[pos - 1] == start);
        let l = &mut self.leaves[id as usize];
        l.shift(pos, pos - 1);
        l.len -= 1;
        l.seal();
        self.runs -= 1;
        if (l.len as usize) < MIN && self.height > 0 {
            // The run's start is gone, but `start` still descends to its
            // leaf: the separators did not move.
            let (path, _, _) = self.find(start);
            self.rebalance_leaf(&path, id);
        }
    }

    fn rebalance_leaf(&mut self, path: &Path, id: u32) {
        self.reshaped();
        let d = path.depth - 1;
        let p = path.ids[d];
        let ci = path.idx[d] as usize;
        let (left, right) = if ci > 0 {
            (self.inners[p as usize].children[ci - 1], id)
        } else {
            (id, self.inners[p as usize].children[1])
        };
        let (ll, rl) = (
            self.leaves[left as usize].len as usize,
            self.leaves[right as usize].len as usize,
        );
        if ll + rl <= CAP {
            // Merge right into left and drop right from the parent.
            let after = {
                let (l, r) = two_mut(&mut self.leaves, left, right);
                l.starts[ll..ll + rl].copy_from_slice(&r.starts[..rl]);
                l.ends[ll..ll + rl].copy_from_slice(&r.ends[..rl]);
                l.vals[ll..ll + rl].copy_from_slice(&r.vals[..rl]);
                l.len = (ll + rl) as u32;
                l.next = r.next;
                r.next
            };
            if after != NONE {
                self.leaves[after as usize].prev = left;
            }
            self.free_leaf(right);
            let rci = if ci > 0 { ci } else { 1 };
            self.inners[p as usize].remove_child(rci);
            self.after_child_removed(path, d);
        } else if ci > 0 {
            // Borrow the left sibling's last run.
            let (l, x) = two_mut(&mut self.leaves, left, right);
            let r = l.run(ll - 1);
            l.len -= 1;
            l.seal();
            x.shift(0, 1);
            x.put(0, r);
            x.len += 1;
            self.inners[p as usize].keys[ci - 1] = r.0;
        } else {
            // Borrow the right sibling's first run.
            let (x, r) = two_mut(&mut self.leaves, left, right);
            x.put(ll, r.run(0));
            x.len += 1;
            r.shift(1, 0);
            r.len -= 1;
            r.seal();
            self.inners[p as usize].keys[0] = r.starts[0];
        }
    }

    /// After the node at `path.ids[d]` lost a child: collapse a root with one
    /// child, or rebalance an interior node that fell below MIN.
    fn after_child_removed(&mut self, path: &Path, d: usize) {
        self.reshaped();
        let id = path.ids[d];
        let len = self.inners[id as usize].len as usize;
        if d == 0 {
            if len == 1 {
                self.root = self.inners[id as usize].children[0];
                self.height -= 1;
                self.free_inner(id);
            }
            return;
        }
        if len >= MIN {
            return;
        }
        let p = path.ids[d - 1];
        let ci = path.idx[d - 1] as usize;
        let (left, right) = if ci > 0 {
            (self.inners[p as usize].children[ci - 1], id)
        } else {
            (id, self.inners[p as usize].children[1])
        };
        let sep_i = if ci > 0 { ci - 1 } else { 0 };
        let sep = self.inners[p as usize].keys[sep_i];
        let (ll, rl) = (
            self.inners[left as usize].len as usize,
            self.inners[right as usize].len as usize,
        );
        if ll + rl <= CAP {
            let (l, r) = two_mut(&mut self.inners, left, right);
            l.keys[ll - 1] = sep;
            l.keys[ll..ll + rl - 1].copy_from_slice(&r.keys[..rl - 1]);
            l.children[ll..ll + rl].copy_from_slice(&r.children[..rl]);
            l.len = (ll + rl) as u32;
            l.seal();
            self.free_inner(right);
            self.inners[p as usize].remove_child(sep_i + 1);
            self.after_child_removed(path, d - 1);
        } else if ci > 0 {
            // Rotate the left sibling's last child through the parent.
            let (l, x) = two_mut(&mut self.inners, left, right);
            let moved = l.children[ll - 1];
            let up = l.keys[ll - 2];
            l.len -= 1;
            l.seal();
            x.children.copy_within(0..rl, 1);
            x.keys.copy_within(0..rl - 1, 1);
            x.children[0] = moved;
            x.keys[0] = sep;
            x.len += 1;
            self.inners[p as usize].keys[sep_i] = up;
        } else {
            // Rotate the right sibling's first child through the parent.
            let (x, r) = two_mut(&mut self.inners, left, right);
            x.children[ll] = r.children[0];
            x.keys[ll - 1] = sep;
            x.len += 1;
            let up = r.keys[0];
            r.children.copy_within(1..rl, 0);
            r.keys.copy_within(1..rl - 1, 0);
            r.len -= 1;
            r.seal();
            self.inners[p as usize].keys[0] = up;
        }
    }

    fn leftmost_leaf(&self) -> u32 {
        let mut id = self.root;
        for _ in 0..self.height {
            id = self.inners[id as usize].children[0];
        }
        id
    }

    fn rightmost_leaf(&self) -> u32 {
        let mut id = self.root;
        for _ in 0..self.height {
            let n = &self.inners[id as usize];
            id = n.children[n.len as usize - 1];
        }
        id
    }

    fn clear(&mut self) {
        let (spare_leaves, spare_inners) = (self.spare_leaves, self.spare_inners);
        *self = RangeTree::new();
        self.spare_leaves = spare_leaves;
        self.spare_inners = spare_inners;
    }

    /// The common case in one descent: everything `set_range` changes lies
    /// in one leaf, which stays within its size bounds and separators (a
    /// full leaf is split first, once). Returns false, having changed no
    /// run, when that does not hold.
    fn set_in_leaf(&mut self, s: u64, e: u64, v: u64, split_if_full: bool) -> bool {
        let (id, pos_le, lower, upper) = self.find_leaf(s.saturating_sub(1));
        let pos = if s == 0 { 0 } else { pos_le };
        let l = &self.leaves[id as usize];
        let len = l.len as usize;
        if pos == 0 && l.prev != NONE {
            // The run before `s` is the previous leaf's last: fine as long as
            // it neither overlaps nor merges.
            let p = &self.leaves[l.prev as usize];
            let (_, pe, pv) = p.run(p.len as usize - 1);
            if pe > s || (pe == s && pv == v) {
                return false;
            }
        }
        let mut out = [(0u64, 0u64, 0u64); 3];
        let mut m = 0;
        let (mut lo, mut hi) = (s, e);
        let mut a = pos;
        let mut right = None;
        let mut done = false;
        if pos > 0 {
            let (ps, pe, pv) = l.run(pos - 1);
            if pe >= s {
                if pv == v {
                    a = pos - 1;
                    lo = ps;
                    hi = hi.max(pe);
                    done = pe >= e;
                } else if pe > s {
                    a = pos - 1;
                    out[m] = (ps, s, pv);
                    m += 1;
                    if pe > e {
                        right = Some((e, pe, pv));
                        done = true;
                    }
                }
            }
        }
        let mut b = pos;
        if !done {
            while b < len {
                let (rs, re, rv) = l.run(b);
                if rs > e {
                    done = true;
                    break;
                }
                if rs == e {
                    if rv == v {
                        hi = hi.max(re);
                        b += 1;
                    }
                    done = true;
                    break;
                }
                b += 1;
                if re > e {
                    if rv == v {
                        hi = hi.max(re);
                    } else {
                        right = Some((e, re, rv));
                    }
                    done = true;
                    break;
                }
            }
        }
        if !done && l.next != NONE {
            // Likewise the run after the last one here.
            let (ns, _, nv) = self.leaves[l.next as usize].run(0);
            if ns < e || (ns == e && nv == v) {
                return false;
            }
        }
        if v != 0 {
            out[m] = (lo, hi, v);
            m += 1;
        }
        if let Some(r) = right {
            out[m] = r;
            m += 1;
        }
        let new_len = len - (b - a) + m;
        if new_len > CAP && split_if_full {
            // Make room and try once more: splitting is cheaper than the
            // general path's separate tree operations.
            let (path, at, _) = self.find(s.saturating_sub(1));
            debug_assert_eq!(at, id, "the kept descent and a fresh one agree");
            self.split_leaf(&path, id, CAP / 2);
            return self.set_in_leaf(s, e, v, false);
        }
        if new_len > CAP || (new_len < MIN && self.height > 0) {
            return false;
        }
        // New starts must stay below this leaf's upper separator. They are
        // never below its lower one: the first is `s`, or the start of a
        // run of this leaf, and `s - 1` descended here, so `s > lower` (or
        // `s` is 0 and this is the leftmost leaf, whose `lower` is 0).
        debug_assert!(m == 0 || out[0].0 >= lower);
        if m > 0 && upper.is_some_and(|k| out[m - 1].0 >= k) {
            return false;
        }
        let l = &mut self.leaves[id as usize];
        // Extending or trimming a run in place (the common conversion next
        // to a run of the same value) moves nothing and frees no slot.
        if b != a + m {
            l.shift(b, a + m);
        }
        for (i, r) in out[..m].iter().enumerate() {
            l.put(a + i, *r);
        }
        let shrunk = new_len < len;
        l.len = new_len as u32;
        if shrunk {
            l.seal();
        }
        self.runs = self.runs + m - (b - a);
        true
    }

    /// True if more than an eighth of the runs start in `[s, e]`: then one
    /// pass over every run (`rebuild_with`) is cheaper than one tree
    /// operation per run touched, and still linear in the runs touched.
    fn touches_many(&self, s: u64, e: u64) -> bool {
        let limit = self.runs / 8;
        if limit < CAP {
            return false;
        }
        let mut n = 0usize;
        !self.walk_runs(s, e, &mut |_, _, v| {
            if v != 0 {
                n += 1;
            }
            n <= limit
        })
    }

    /// Applies `set_range(s, e, v)` while copying every run out in order,
    /// then bulk-loads a fresh tree from them.
    fn rebuild_with(&mut self, s: u64, e: u64, v: u64) {
        self.reshaped();
        let mut out: Vec<(u64, u64, u64)> = Vec::with_capacity(self.runs + 2);
        let push = |out: &mut Vec<(u64, u64, u64)>, r: (u64, u64, u64)| {
            if r.0 >= r.1 || r.2 == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.1 == r.0 && last.2 == r.2 => last.1 = r.1,
                _ => out.push(r),
            }
        };
        let mut placed = false;
        let mut id = self.leftmost_leaf();
        while id != NONE {
            let l = &self.leaves[id as usize];
            for i in 0..l.len as usize {
                let (rs, re, rv) = l.run(i);
                push(&mut out, (rs, re.min(s), rv));
                if !placed && re > s {
                    push(&mut out, (s, e, v));
                    placed = true;
                }
                if placed {
                    push(&mut out, (rs.max(e), re, rv));
                }
            }
            id = l.next;
        }
        if !placed {
            push(&mut out, (s, e, v));
        }
        self.bulk_load(&out);
    }

    /// Replaces the tree by one holding `runs` (sorted, disjoint, non-zero,
    /// coalesced) in as few nodes as fit them. Packing full keeps a rebuild
    /// from ever needing more nodes than the tree had (a rebuild drops more
    /// runs than it adds), so a `reserve` made before stays sufficient.
    fn bulk_load(&mut self, runs: &[(u64, u64, u64)]) {
        self.reshaped();
        self.clear();
        if runs.is_empty() {
            return;
        }
        let fill = CAP;
        // Evenly sized groups of at most `fill`, so none falls below MIN.
        let groups = |n: usize| -> Vec<std::ops::Range<usize>> {
            let k = n.div_ceil(fill);
            (0..k).map(|i| i * n / k..(i + 1) * n / k).collect()
        };
        // (node id, smallest start in its subtree) per node of the level.
        let mut level: Vec<(u32, u64)> = Vec::new();
        let mut prev = NONE;
        for (gi, g) in groups(runs.len()).into_iter().enumerate() {
            let id = if gi == 0 {
                self.root
            } else {
                self.alloc_leaf()
            };
            let l = &mut self.leaves[id as usize];
            for (i, r) in runs[g].iter().enumerate() {
                l.put(i, *r);
                l.len += 1;
            }
            l.prev = prev;
            let first = l.starts[0];
            if prev != NONE {
                self.leaves[prev as usize].next = id;
            }
            prev = id;
            level.push((id, first));
        }
        self.runs = runs.len();
        while level.len() > 1 {
            let mut up = Vec::with_capacity(level.len() / fill + 1);
            for g in groups(level.len()) {
                let id = self.alloc_inner();
                let n = &mut self.inners[id as usize];
                for (i, &(child, min)) in level[g.clone()].iter().enumerate() {
                    n.children[i] = child;
                    if i > 0 {
                        n.keys[i - 1] = min;
                    }
                }
                n.len = g.len() as u32;
                up.push((id, level[g.start].1));
            }
            level = up;
            self.height += 1;
        }
        self.root = level[0].0;
    }

    /// The general case, one tree operation per run touched.
    fn set_general(&mut self, s: u64, e: u64, v: u64) {
        if self.runs > 0 {
            let first = self.leaves[self.leftmost_leaf() as usize].starts[0];
            let last = {
                let l = &self.leaves[self.rightmost_leaf() as usize];
                l.ends[l.len as usize - 1]
            };
            if s <= first && e >= last {
                // Every run is covered: nothing survives, nothing to merge.
                self.clear();
                if v != 0 {
                    self.insert((s, e, v));
                }
                return;
            }
        }
        if self.touches_many(s, e) {
            self.rebuild_with(s, e, v);
            return;
        }
        let (mut lo, mut hi) = (s, e);
        if let Some((ps, pe, pv)) = self.pred_lt(s) {
            if pe >= s {
                if pv == v {
                    lo = ps;
                    hi = hi.max(pe);
                    self.remove(ps);
                } else if pe > s {
                    self.set_end(ps, s);
                    if pe > e {
                        self.insert((e, pe, pv));
                    }
                }
            }
        }
        while let Some((rs, re, rv)) = self.first_ge(s) {
            if rs > e {
                break;
            }
            if rs == e {
                if rv == v {
                    hi = hi.max(re);
                    self.remove(rs);
                }
                break;
            }
            self.remove(rs);
            if re > e {
                if rv == v {
                    hi = hi.max(re);
                } else {
                    self.insert((e, re, rv));
                }
                break;
            }
        }
        if v != 0 {
            self.insert((lo, hi, v));
        }
    }

    /// Calls `f` on the runs covering `[start, end)` (zero gaps included)
    /// until it returns false; returns whether it went to the end.
    fn walk_runs(&self, start: u64, end: u64, f: &mut dyn FnMut(u64, u64, u64) -> bool) -> bool {
        self.walk(start, end, f)
    }

    /// `walk_runs` for a closure known at compile time: the range queries
    /// of the set and fault paths (has_value, count_pages) run it inlined,
    /// with no indirect call per run.
    #[inline(always)]
    fn walk(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64, u64) -> bool) -> bool {
        let (mut id, mut i) = match self.locate(start) {
            Some(p) => p,
            None => (self.leftmost_leaf(), 0),
        };
        let mut pos = start;
        while id != NONE {
            let l = &self.leaves[id as usize];
            while i < l.len as usize {
                let (s, e, v) = l.run(i);
                if s >= end {
                    return f(pos, end, 0);
                }
                if e > pos {
                    let s = s.max(pos);
                    if s > pos && !f(pos, s, 0) {
                        return false;
                    }
                    let e = e.min(end);
                    if !f(s, e, v) {
                        return false;
                    }
                    pos = e;
                    if pos == end {
                        return true;
                    }
                }
                i += 1;
            }
            id = l.next;
            i = 0;
        }
        f(pos, end, 0)
    }

    /// Checks every structural invariant, for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut leaves = Vec::new();
        let mut inners = 0usize;
        self.check_node(
            self.root,
            self.height,
            None,
            None,
            true,
            &mut leaves,
            &mut inners,
        )?;
        if leaves.len() != self.live_leaves || inners != self.live_inners {
            return Err("node counts out of sync".into());
        }
        let mut runs = 0usize;
        let mut prev: Option<(u64, u64)> = None;
        for (i, &id) in leaves.iter().enumerate() {
            let l = &self.leaves[id as usize];
            let want_prev = if i == 0 { NONE } else { leaves[i - 1] };
            let want_next = leaves.get(i + 1).copied().unwrap_or(NONE);
            if l.prev != want_prev || l.next != want_next {
                return Err(format!("leaf {id} badly linked"));
            }
            for j in 0..l.len as usize {
                let (s, e, v) = l.run(j);
                if s >= e || v == 0 {
                    return Err(format!("bad run [{s}, {e}) = {v}"));
                }
                if let Some((pe, pv)) = prev {
                    if pe > s || (pe == s && pv == v) {
                        return Err(format!("run at {s} overlaps or should merge"));
                    }
                }
                prev = Some((e, v));
                runs += 1;
            }
            if l.starts[l.len as usize..].iter().any(|&k| k != SENTINEL) {
                return Err("leaf sentinel".into());
            }
        }
        if runs != self.runs {
            return Err(format!("{runs} runs found, {} counted", self.runs));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn check_node(
        &self,
        id: u32,
        level: usize,
        lower: Option<u64>,
        upper: Option<u64>,
        is_root: bool,
        leaves: &mut Vec<u32>,
        inners: &mut usize,
    ) -> Result<(), String> {
        let in_bounds = |k: u64| lower.is_none_or(|lo| k >= lo) && upper.is_none_or(|up| k < up);
        if level == 0 {
            let l = &self.leaves[id as usize];
            if !is_root && (l.len as usize) < MIN {
                return Err(format!("leaf {id} underfull"));
            }
            if (0..l.len as usize).any(|j| !in_bounds(l.starts[j])) {
                return Err(format!("leaf {id} outside its separators"));
            }
            leaves.push(id);
            return Ok(());
        }
        *inners += 1;
        let n = &self.inners[id as usize];
        let len = n.len as usize;
        if len < 2 || (!is_root && len < MIN) {
            return Err(format!("inner {id} underfull ({len})"));
        }
        if n.keys[len - 1..].iter().any(|&k| k != SENTINEL) {
            return Err("inner sentinel".into());
        }
        for i in 0..len {
            let lo = if i == 0 { lower } else { Some(n.keys[i - 1]) };
            let up = if i + 1 == len { upper } else { Some(n.keys[i]) };
            if i > 0 && !in_bounds(n.keys[i - 1]) {
                return Err("separator outside parent's bounds".into());
            }
            self.check_node(n.children[i], level - 1, lo, up, false, leaves, inners)?;
        }
        Ok(())
    }
}

/// Two distinct elements of one arena, mutably.
fn two_mut<T>(v: &mut [T], a: u32, b: u32) -> (&mut T, &mut T) {
    let (a, b) = (a as usize, b as usize);
    debug_assert_ne!(a, b);
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

const LEAF_BYTES: usize = std::mem::size_of::<Leaf>();
const INNER_BYTES: usize = std::mem::size_of::<Inner>();

impl AttrStore for RangeTree {
    #[inline]
    fn get(&self, gfn: u64) -> u64 {
        self.lookup(gfn)
    }

    fn set_range(&mut self, start: u64, end: u64, value: u64) -> Result<(), StoreError> {
        check_range(start, end)?;
        if !self.set_in_leaf(start, end, value, true) {
            self.set_general(start, end, value);
        }
        // The reservation was for this call.
        self.spare_leaves = 0;
        self.spare_inners = 0;
        Ok(())
    }

    /// Descends the interior nodes (few enough to stay in the cache), asks
    /// for the whole leaf (reading nothing from it: the lookup that follows
    /// reads its keys, then the ends and values of the runs it finds), and
    /// keeps the descent for that lookup (`KeptDescent`).
    fn prefetch(&mut self, gfn: u64) {
        if let Some(j) = self.hint_slot(gfn) {
            // A kept descent already leads there (a fault on the gfn a set
            // just converted), and that leaf is being read now: descending
            // again would only cost. It becomes the newest, so the hint
            // after this one replaces the other.
            self.newest_hint = j;
            return;
        }
        let (_, leaf, lo, hi) = self.descend(gfn);
        if let Some(l) = self.leaves.get(leaf as usize) {
            crate::prefetch::prefetch(l);
        }
        self.newest_hint ^= 1;
        self.hints[self.newest_hint] = Some(KeptDescent { leaf, lo, hi });
    }

    /// Inlined into its callers, as [`RangeTree::find_leaf`] says why.
    ///
    /// A range that starts before the finger's leaf is checked from that
    /// leaf's first run on first, and before it only if all of that
    /// matches: the answer is the same in either order, and the part in
    /// the leaf the operation already holds usually settles it. The post-set
    /// pass's 2M re-check starts at the hugepage's first gfn, often in the
    /// leaf before, which nothing prefetched: reading it first was 13% of
    /// a 1 TiB replay's time (perf's cpu-clock samples).
    #[inline(always)]
    fn has_value(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<bool, StoreError> {
        check_range(start, end)?;
        let want = value & mask;
        let matches = |_, _, v: u64| v & mask == want;
        let split = match self.leaves.get(self.finger.get() as usize) {
            Some(l) if l.len > 0 && start < l.starts[0] && l.starts[0] < end => l.starts[0],
            _ => start,
        };
        Ok(self.walk(split, end, matches) && (split == start || self.walk(start, split, matches)))
    }

    fn count_pages(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<u64, StoreError> {
        check_range(start, end)?;
        let want = value & mask;
        let mut n = 0u64;
        self.walk(start, end, |s, e, v| {
            if v & mask == want {
                n += e - s;
            }
            true
        });
        Ok(n)
    }

    fn for_each_run(
        &self,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, u64),
    ) -> Result<(), StoreError> {
        check_range(start, end)?;
        self.walk_runs(start, end, &mut |s, e, v| {
            f(s, e, v);
            true
        });
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        (self.live_leaves + self.spare_leaves) * LEAF_BYTES
            + (self.live_inners + self.spare_inners) * INNER_BYTES
    }

    fn entry_count(&self) -> usize {
        self.runs
    }

    /// A set adds at most two runs (a split remnant and the new run) and
    /// may split one leaf before trying in place; each split can split every
    /// interior node above it and add a root. That many nodes are set aside
    /// now, so the set that follows never needs more. Inlined into the
    /// set path, as [`RangeTree::find_leaf`] says why.
    #[inline(always)]
    fn reserve(&mut self, start: u64, end: u64, limit: Option<usize>) -> Result<(), StoreError> {
        check_range(start, end)?;
        let want_leaves = 3usize.max(self.spare_leaves);
        let want_inners = (3 * (self.height + 1)).max(self.spare_inners);
        let needed = self.memory_bytes()
            + (want_leaves - self.spare_leaves) * LEAF_BYTES
            + (want_inners - self.spare_inners) * INNER_BYTES;
        // The rule both stores follow: the reservation fails if the store
        // would occupy more than `limit` after it, even when it allocates
        // nothing (a store already over its limit takes no more sets).
        if let Some(limit) = limit {
            if needed > limit {
                return Err(StoreError::OutOfMemory {
                    needed,
                    limit: Some(limit),
                });
            }
        }
        let oom = |_| StoreError::OutOfMemory {
            needed,
            limit: None,
        };
        self.leaves.try_reserve(want_leaves).map_err(oom)?;
        self.inners.try_reserve(want_inners).map_err(oom)?;
        self.spare_leaves = want_leaves;
        self.spare_inners = want_inners;
        Ok(())
    }

    fn release_reservations(&mut self) {
        self.spare_leaves = 0;
        self.spare_inners = 0;
    }

    /// Lookups go down the tree in groups, a level at a time for the whole
    /// group, so the cache misses of independent lookups overlap instead of
    /// being paid one after another.
    fn get_many(&self, gfns: &[u64], out: &mut [u64]) {
        const GROUP: usize = 16;
        for (gs, os) in gfns.chunks(GROUP).zip(out.chunks_mut(GROUP)) {
            let mut ids = [self.root; GROUP];
            for _ in 0..self.height {
                for (id, &g) in ids.iter_mut().zip(gs) {
                    let n = &self.inners[*id as usize];
                    let c = count_le(&n.keys, g).min(n.len as usize - 1);
                    *id = n.children[c];
                }
            }
            for ((o, &g), &id) in os.iter_mut().zip(gs).zip(&ids) {
                let l = &self.leaves[id as usize];
                let pos = count_le(&l.starts, g).min(l.len as usize);
                *o = if g == SENTINEL {
                    0
                } else if pos > 0 {
                    if g < l.ends[pos - 1] {
                        l.vals[pos - 1]
                    } else {
                        0
                    }
                } else if l.prev != NONE {
                    let p = &self.leaves[l.prev as usize];
                    let i = p.len as usize - 1;
                    if g < p.ends[i] {
                        p.vals[i]
                    } else {
                        0
                    }
                } else {
                    0
                };
            }
        }
    }
}
