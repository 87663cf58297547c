//! A structural model of the kernel's maple tree (lib/maple_tree.c) as the
//! guest_memfd in-place conversion series uses it for per-file attributes.
//!
//! What is modelled, and why it is enough to count memory the kernel's way:
//!
//! - Nodes are 256 bytes (`struct maple_node`), and the tree is a plain
//!   one (`mt_init()`, no MT_FLAGS_ALLOC_RANGE), so every node is a
//!   `maple_range_64`: 16 slots, 15 pivots; leaves are `maple_leaf_64` of the
//!   same shape. (`maple_arange_64`, 10 slots, is for allocation trees and
//!   not used here.)
//! - A node covers an index interval [min, max]; its slots partition it
//!   into ranges, NULL ranges included, and no range crosses a node. A
//!   node has at least `mt_min_slots` = 16 / 2 - 2 = 6 children, except the
//!   root; a node that would exceed 16 splits (into halves, or into three
//!   after a spanning store), one that drops below 6 is rebalanced with a
//!   sibling (merged if both fit in one node). A root with one child goes.
//! - Equal neighbours: the maple tree itself merges adjacent NULL ranges
//!   but not adjacent equal entries; the series' kvm_gmem_mas_preallocate()
//!   widens every store to the equal neighbours on both sides ("ranges with
//!   the same attributes will always be merged"), so the model keeps every
//!   pair of adjacent ranges different. (Linux 6.1's plain
//!   mtree_store_range() does not merge; the series' code does.)
//! - A store whose range crosses node boundaries (a spanning store)
//!   rebuilds the nodes it spans into one and splits that as needed.
//! - Memory is counted as the kernel allocates it: live nodes, plus the
//!   nodes mas_preallocate() reserves ahead of a store (worst case for the
//!   write: 1 for a new root, none when the leaf has room, 2 per level
//!   that splits or rebalances plus 1, 3 per level plus 1 for a spanning
//!   store, as mas_prealloc_calc() does; the kernel's refinement by the
//!   lowest level with room is approximated by the levels that split),
//!   freed again when the store is done (mas_destroy()).
//!
//! Not modelled: the root-pointer special case (a single entry at index 0
//! stored without a node), RCU mode, dense nodes, and the exact split
//! points of mab_calc_split() (the model halves).
//!
//! Structure: the ranges in one BTreeMap (start -> (last, value)), and the
//! nodes as their minimum index per level (`levels[0]` leaves, the last
//! level the root). A parent's minimum is its first child's minimum, so
//! each level's keys are a subset of the level below's, and a node's
//! children are the keys below in [its min, the next key at its level).

use std::collections::{BTreeMap, BTreeSet};

use crate::store::{check_range, AttrStore, StoreError};

/// sizeof(struct maple_node).
pub const MAPLE_NODE_SIZE: usize = 256;
/// maple_range_64 / maple_leaf_64 slots and pivots.
pub const MAPLE_RANGE64_SLOTS: usize = 16;
pub const MAPLE_RANGE64_PIVOTS: usize = 15;
/// maple_arange_64 (allocation trees; not what the series uses).
pub const MAPLE_ARANGE64_SLOTS: usize = 10;
/// mt_min_slots[maple_range_64] and [maple_leaf_64].
pub const MAPLE_RANGE64_MIN_SLOTS: usize = MAPLE_RANGE64_SLOTS / 2 - 2;

/// The maple tree model; see the module documentation.
#[derive(Debug, Clone)]
pub struct MapleTree {
    /// Every index of [0, u64::MAX] in exactly one range; adjacent ranges
    /// have different values (0 is NULL).
    runs: BTreeMap<u64, (u64, u64)>,
    /// Node minimums per level, leaves first; empty when the tree is.
    levels: Vec<BTreeSet<u64>>,
    /// Nodes preallocated for the next store.
    reserved: usize,
}

impl Default for MapleTree {
    fn default() -> Self {
        Self::new()
    }
}

/// How mas_preallocate() sees a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    noop: bool,
    nodes: usize,
}

impl MapleTree {
    pub fn new() -> Self {
        let mut runs = BTreeMap::new();
        runs.insert(0, (u64::MAX, 0));
        Self {
            runs,
            levels: Vec::new(),
            reserved: 0,
        }
    }

    /// Number of levels (0 for an empty tree).
    pub fn height(&self) -> usize {
        self.levels.len()
    }

    /// Live nodes (reservations not included).
    pub fn node_count(&self) -> usize {
        self.levels.iter().map(|l| l.len()).sum()
    }

    /// Nodes per level, leaves first.
    pub fn nodes_per_level(&self) -> Vec<usize> {
        self.levels.iter().map(|l| l.len()).collect()
    }

    /// The range holding `index`: (start, last, value).
    fn run_at(&self, index: u64) -> (u64, u64, u64) {
        let (&s, &(l, v)) = self
            .runs
            .range(..=index)
            .next_back()
            .expect("the ranges cover every index");
        (s, l, v)
    }

    fn next_key(&self, level: usize, key: u64) -> Option<u64> {
        if key == u64::MAX {
            return None;
        }
        self.levels[level].range(key + 1..).next().copied()
    }

    fn floor_key(&self, level: usize, index: u64) -> u64 {
        *self.levels[level]
            .range(..=index)
            .next_back()
            .expect("every level holds 0")
    }

    /// The children of node `key` at `level`: range starts for a leaf, node
    /// minimums of the level below otherwise.
    fn children(&self, level: usize, key: u64) -> Vec<u64> {
        let next = self.next_key(level, key);
        let below: Box<dyn Iterator<Item = u64> + '_> = if level == 0 {
            Box::new(self.runs.range(key..).map(|(&k, _)| k))
        } else {
            Box::new(self.levels[level - 1].range(key..).copied())
        };
        below.take_while(|&k| next.is_none_or(|n| k < n)).collect()
    }

    fn child_count(&self, level: usize, key: u64) -> usize {
        self.children(level, key).len()
    }

    /// The normalized store: [s, l] widened to equal neighbours, and the
    /// first and last ranges it touches.
    fn normalize(
        &self,
        start: u64,
        last: u64,
        value: u64,
    ) -> (u64, u64, (u64, u64, u64), (u64, u64, u64)) {
        let (mut s, mut l) = (start, last);
        if s > 0 {
            let (ps, _, pv) = self.run_at(s - 1);
            if pv == value {
                s = ps;
            }
        }
        if l < u64::MAX {
            let (_, nl, nv) = self.run_at(l + 1);
            if nv == value {
                l = nl;
            }
        }
        (s, l, self.run_at(s), self.run_at(l))
    }

    /// What mas_preallocate() would reserve for storing `value` over
    /// [start, last], with mas_prealloc_calc()'s cases.
    fn plan(&self, start: u64, last: u64, value: u64) -> Plan {
        let (s, l, first, lastr) = self.normalize(start, last, value);
        if first.0 == s && first.1 == l && first.2 == value {
            return Plan {
                noop: true,
                nodes: 0,
            };
        }
        let h = self.height();
        if h == 0 {
            // wr_new_root
            return Plan {
                noop: false,
                nodes: 1,
            };
        }
        if first.0 < lastr.1 && self.levels[0].range(first.0 + 1..=lastr.1).next().is_some() {
            // wr_spanning_store
            return Plan {
                noop: false,
                nodes: h * 3 + 1,
            };
        }
        let leaf = self.floor_key(0, s);
        let old = self.runs.range(first.0..=lastr.1).count();
        let new = 1 + (first.0 < s) as usize + (lastr.1 > l) as usize;
        let count = self.child_count(0, leaf) + new - old;
        let nodes = if count > MAPLE_RANGE64_SLOTS {
            // wr_split_store: each level that splits, and a new root if
            // they all do.
            let mut delta = 1;
            let mut key = leaf;
            for level in 1..h {
                key = self.floor_key(level, key);
                if self.child_count(level, key) < MAPLE_RANGE64_SLOTS {
                    break;
                }
                delta += 1;
            }
            delta * 2 + 1
        } else if count < MAPLE_RANGE64_MIN_SLOTS && h > 1 {
            // wr_rebalance
            h * 2 + 1
        } else {
            // wr_slot_store / wr_node_store / wr_exact_fit / wr_append (no
            // RCU): in place.
            0
        };
        Plan { noop: false, nodes }
    }

    fn check_limit(&self, more: usize, limit: Option<usize>) -> Result<(), StoreError> {
        let needed = (self.node_count() + self.reserved + more) * MAPLE_NODE_SIZE;
        match limit {
            Some(limit) if needed > limit => Err(StoreError::OutOfMemory {
                needed,
                limit: Some(limit),
            }),
            _ => Ok(()),
        }
    }

    /// mas_store_prealloc(): the store, then the tree's shape.
    fn store(&mut self, start: u64, last: u64, value: u64) {
        let (s, l, first, lastr) = self.normalize(start, last, value);
        if first.0 == s && first.1 == l && first.2 == value {
            return;
        }
        let (fs, ll) = (first.0, lastr.1);
        // Node boundaries inside the span go: a spanning store rebuilds the
        // nodes it crosses into one.
        let gone: Vec<u64> = if self.levels.is_empty() || fs == ll {
            Vec::new()
        } else {
            self.levels[0].range(fs + 1..=ll).copied().collect()
        };
        let old: Vec<u64> = self.runs.range(fs..=ll).map(|(&k, _)| k).collect();
        for k in old {
            self.runs.remove(&k);
        }
        if fs < s {
            self.runs.insert(fs, (s - 1, first.2));
        }
        self.runs.insert(s, (l, value));
        if ll > l {
            self.runs.insert(l + 1, (ll, lastr.2));
        }

        if self.runs.len() == 1 && self.runs[&0].1 == 0 {
            // Everything NULL again: the tree frees its nodes.
            self.levels.clear();
            return;
        }
        if self.levels.is_empty() {
            self.levels.push(BTreeSet::from([0]));
            self.fix(0, 0);
            return;
        }
        // Remove the spanned boundaries level by level: a node whose first
        // child went takes its next child's minimum, a node with no child
        // left goes.
        let mut changed: Vec<(u64, Option<u64>)> = Vec::new();
        for &k in &gone {
            self.levels[0].remove(&k);
            changed.push((k, None));
        }
        let mut touched = vec![fs];
        for level in 1..self.levels.len() {
            let mut next_changed = Vec::new();
            for &(k, _) in &changed {
                touched.push(k);
                if !self.levels[level].contains(&k) {
                    continue;
                }
                let end = self.next_key(level, k);
                let first_child = self.levels[level - 1]
                    .range(k..)
                    .copied()
                    .find(|&c| end.is_none_or(|e| c < e));
                self.levels[level].remove(&k);
                if let Some(c) = first_child {
                    self.levels[level].insert(c);
                }
                next_changed.push((k, first_child));
            }
            changed = next_changed;
        }
        // Split what overflowed, rebalance what underflowed, bottom up.
        for level in 0..self.levels.len() {
            for &pos in &touched {
                if level < self.levels.len() {
                    let key = self.floor_key(level, pos);
                    self.fix(level, key);
                }
            }
        }
    }

    /// Brings node `key` at `level` back within [min, 16] children (the
    /// root: 2 at least when internal), splitting or rebalancing, and its
    /// parent after it.
    fn fix(&mut self, level: usize, key: u64) {
        if level >= self.levels.len() || !self.levels[level].contains(&key) {
            return;
        }
        let children = self.children(level, key);
        let count = children.len();
        let is_root = level + 1 == self.levels.len();
        if count > MAPLE_RANGE64_SLOTS {
            let parts = count.div_ceil(MAPLE_RANGE64_SLOTS);
            let mut at = 0;
            for i in 0..parts - 1 {
                at += (count - at) / (parts - i);
                self.levels[level].insert(children[at]);
            }
            if is_root {
                self.levels.push(BTreeSet::from([0]));
            }
            let parent = self.floor_key(level + 1, key);
            self.fix(level + 1, parent);
            return;
        }
        if is_root {
            if level > 0 && count == 1 {
                self.levels.pop();
                self.fix(level - 1, 0);
            }
            return;
        }
        if count >= MAPLE_RANGE64_MIN_SLOTS {
            return;
        }
        let parent = self.floor_key(level + 1, key);
        let siblings = self.children(level + 1, parent);
        if siblings.len() < 2 {
            return;
        }
        let i = siblings
            .iter()
            .position(|&k| k == key)
            .expect("a child of its parent");
        let (a, b) = if i + 1 < siblings.len() {
            (key, siblings[i + 1])
        } else {
            (siblings[i - 1], key)
        };
        let mut both = self.children(level, a);
        both.extend(self.children(level, b));
        self.levels[level].remove(&b);
        if both.len() > MAPLE_RANGE64_SLOTS {
            self.levels[level].insert(both[both.len() / 2]);
            return;
        }
        self.fix(level + 1, parent);
    }

    /// The model's invariants; a description of the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut expect = 0u64;
        let mut prev: Option<u64> = None;
        for (&s, &(l, v)) in &self.runs {
            if s != expect || l < s {
                return Err(format!(
                    "range [{s:#x}, {l:#x}] does not follow {expect:#x}"
                ));
            }
            if prev == Some(v) {
                return Err(format!("range at {s:#x} equals its left neighbour"));
            }
            prev = Some(v);
            expect = l.wrapping_add(1);
        }
        if expect != 0 {
            return Err("the ranges do not reach u64::MAX".into());
        }
        let empty = self.runs.len() == 1 && self.runs[&0].1 == 0;
        if empty != self.levels.is_empty() {
            return Err("nodes without entries, or entries without nodes".into());
        }
        for (level, keys) in self.levels.iter().enumerate() {
            if !keys.contains(&0) {
                return Err(format!("level {level} does not start at 0"));
            }
            let is_root = level + 1 == self.levels.len();
            if is_root && keys.len() != 1 {
                return Err(format!("{} roots", keys.len()));
            }
            for &k in keys {
                if level == 0 && !self.runs.contains_key(&k) {
                    return Err(format!("leaf {k:#x} splits a range"));
                }
                if level > 0 && !self.levels[level - 1].contains(&k) {
                    return Err(format!("node {k:#x} at level {level} has no first child"));
                }
                let n = self.child_count(level, k);
                let min = if is_root {
                    if level == 0 {
                        1
                    } else {
                        2
                    }
                } else {
                    MAPLE_RANGE64_MIN_SLOTS
                };
                if n < min || n > MAPLE_RANGE64_SLOTS {
                    return Err(format!(
                        "node {k:#x} at level {level} has {n} children (allowed {min}..=16)"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl AttrStore for MapleTree {
    fn get(&self, gfn: u64) -> u64 {
        self.run_at(gfn).2
    }

    fn set_range(&mut self, start: u64, end: u64, value: u64) -> Result<(), StoreError> {
        check_range(start, end)?;
        self.store(start, end - 1, value);
        // mas_destroy(): what the store did not use goes back.
        self.reserved = 0;
        Ok(())
    }

    fn has_value(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<bool, StoreError> {
        check_range(start, end)?;
        let want = value & mask;
        let (s, ..) = self.run_at(start);
        Ok(self.runs.range(s..end).all(|(_, &(_, v))| v & mask == want))
    }

    fn for_each_run(
        &self,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, u64),
    ) -> Result<(), StoreError> {
        check_range(start, end)?;
        let (s, ..) = self.run_at(start);
        for (&rs, &(rl, v)) in self.runs.range(s..end) {
            let e = if rl == u64::MAX {
                end
            } else {
                (rl + 1).min(end)
            };
            f(rs.max(start), e, v);
        }
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        (self.node_count() + self.reserved) * MAPLE_NODE_SIZE
    }

    /// Slots in use (ranges, NULL ones included); 0 for an empty tree.
    fn entry_count(&self) -> usize {
        if self.levels.is_empty() {
            0
        } else {
            self.runs.len()
        }
    }

    fn reserve(&mut self, start: u64, end: u64, limit: Option<usize>) -> Result<(), StoreError> {
        check_range(start, end)?;
        // Without the value: the worst write there is.
        let h = self.height();
        let more = if h == 0 { 1 } else { h * 3 + 1 };
        self.check_limit(more, limit)?;
        self.reserved += more;
        Ok(())
    }

    fn release_reservations(&mut self) {
        self.reserved = 0;
    }

    fn reserve_unless_has_value(
        &mut self,
        start: u64,
        end: u64,
        value: u64,
        limit: Option<usize>,
    ) -> Result<bool, StoreError> {
        check_range(start, end)?;
        if self.has_value(start, end, value, u64::MAX)? {
            return Ok(true);
        }
        let plan = self.plan(start, end - 1, value);
        self.check_limit(plan.nodes, limit)?;
        self.reserved += plan.nodes;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: reproducible pseudo-random operations.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn matches_a_per_page_oracle_and_keeps_its_shape() {
        for round in 0..20u64 {
            let mut seed = 0x9E37_79B9 + round;
            let span = 64 + (round * 97) % 4000;
            let mut oracle = vec![0u64; span as usize];
            let mut t = MapleTree::new();
            for _ in 0..400 {
                let a = rng(&mut seed) % span;
                let len = 1 + rng(&mut seed) % (1 + span / (1 + rng(&mut seed) % 16));
                let b = (a + len).min(span);
                let v = [0, 8, 8, 1][(rng(&mut seed) % 4) as usize];
                t.set_range(a, b, v).unwrap();
                oracle[a as usize..b as usize].fill(v);
                t.check_invariants().unwrap();
            }
            for (i, &v) in oracle.iter().enumerate() {
                assert_eq!(t.get(i as u64), v, "page {i}");
            }
            let mut runs = Vec::new();
            t.for_each_run(0, span, &mut |s, e, v| runs.push((s, e, v)))
                .unwrap();
            let mut expect: Vec<(u64, u64, u64)> = Vec::new();
            for (i, &v) in oracle.iter().enumerate() {
                match expect.last_mut() {
                    Some(r) if r.2 == v => r.1 += 1,
                    _ => expect.push((i as u64, i as u64 + 1, v)),
                }
            }
            assert_eq!(runs, expect);
        }
    }

    #[test]
    fn equal_neighbours_merge_and_an_empty_tree_has_no_node() {
        let mut t = MapleTree::new();
        assert_eq!(t.memory_bytes(), 0);
        for p in 0..1000u64 {
            t.set_range(p, p + 1, 8).unwrap();
        }
        // One entry and the NULL range after it: one leaf.
        assert_eq!(t.entry_count(), 2);
        assert_eq!(t.memory_bytes(), MAPLE_NODE_SIZE);
        t.set_range(0, 1000, 0).unwrap();
        assert_eq!(t.memory_bytes(), 0);
        t.check_invariants().unwrap();
    }

    #[test]
    fn alternating_pages_fill_leaves_of_sixteen_and_split() {
        let mut t = MapleTree::new();
        for p in (0..2000u64).step_by(2) {
            t.set_range(p, p + 1, 8).unwrap();
            t.check_invariants().unwrap();
        }
        // 1000 entries, 999 NULL gaps between them and the NULL tail.
        assert_eq!(t.entry_count(), 2000);
        let leaves = t.nodes_per_level()[0];
        assert!(
            (2000usize.div_ceil(16)..=2000 / 6).contains(&leaves),
            "{leaves}"
        );
        assert!(t.height() >= 3);
    }

    #[test]
    fn preallocation_is_accounted_and_enomem_changes_nothing() {
        let mut t = MapleTree::new();
        // A new root needs one node.
        assert!(matches!(
            t.reserve_unless_has_value(0, 4, 8, Some(0)),
            Err(StoreError::OutOfMemory {
                needed: 256,
                limit: Some(0)
            })
        ));
        assert_eq!(t.memory_bytes(), 0);
        assert!(!t.reserve_unless_has_value(0, 4, 8, Some(256)).unwrap());
        assert_eq!(t.memory_bytes(), 256);
        t.set_range(0, 4, 8).unwrap();
        assert_eq!(t.memory_bytes(), 256);
        // Already there: nothing reserved.
        assert!(t.reserve_unless_has_value(1, 3, 8, Some(0)).unwrap());
        // Fits in the leaf: nothing reserved either.
        assert!(!t.reserve_unless_has_value(10, 11, 8, Some(256)).unwrap());
        t.release_reservations();
        assert_eq!(t.memory_bytes(), 256);
    }
}
