//! Tables keyed by frame numbers (1G frames, blocks of hugepage numbers):
//! a window of 2^16 keys from the table's base (64 TiB of guest physical
//! space from the page table's gfn 0, or from a memslot's first gfn) in a
//! vector indexed by key, the rest hashed.
//!
//! ```text
//!   base <= key < base + DENSE_KEYS:  dense[key - base]  Option<V>, grown to
//!                                                        the highest such key
//!                                                        used
//!   any other key:                    sparse{key -> V}   hashed, one multiply
//! ```
//!
//! The window starts at the base, not at 0, so a table's vector costs what
//! its own keys span: a memslot's flags high in the physical space do not
//! pay a word for every GiB below it.
//!
//! Why not a hash map throughout: the fault and conversion paths look up
//! a 1G frame in the page table and a block of mixed flags or two on
//! every operation, and a hash probe costs its control bytes, a bucket
//! and the arithmetic between them, where an index costs a bounds check
//! (a 1 TiB native replay: 2.690 G instructions hashed, 2.567 G with the
//! vector; `benches/bench_instructions.py`). Every guest this models has
//! its memory below 64 TiB, where the vector costs a word or two per GiB
//! of the highest frame used; keys above it (a memslot at the top of the
//! 52-bit physical space) still work, hashed.
//!
//! The hash needs no defence against collisions: the keys are integers the
//! model chose, not input an attacker picks, so one multiply replaces
//! SipHash's rounds.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Keys in the window live in the vector: 2^16 1G frames, 64 TiB.
pub const DENSE_KEYS: u64 = 1 << 16;

/// Hashes a u64 key with one multiply, the high bits folded down so both
/// hashbrown's bucket index (low bits) and control byte (top bits) vary.
#[derive(Default, Clone, Copy)]
pub struct FrameHasher(u64);

impl Hasher for FrameHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b) ^ self.0.rotate_left(8));
        }
    }
    #[inline]
    fn write_u64(&mut self, x: u64) {
        let h = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A hash map from frame numbers to `V`.
pub type FrameMap<V> = HashMap<u64, V, BuildHasherDefault<FrameHasher>>;

/// A map from frame numbers to `V` (see the module's picture).
#[derive(Debug, Clone)]
pub struct FrameTable<V> {
    /// The window's first key.
    base: u64,
    /// `dense[i]` is key `base + i`.
    dense: Vec<Option<V>>,
    /// How many of `dense` are Some.
    dense_len: usize,
    sparse: FrameMap<V>,
}

impl<V> Default for FrameTable<V> {
    fn default() -> Self {
        Self {
            base: 0,
            dense: Vec::new(),
            dense_len: 0,
            sparse: FrameMap::default(),
        }
    }
}

impl<V: PartialEq> PartialEq for FrameTable<V> {
    /// Equal contents, however long either vector has grown.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl<V: Eq> Eq for FrameTable<V> {}

impl<V> FrameTable<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A table whose window starts at `base`.
    pub fn starting_at(base: u64) -> Self {
        Self {
            base,
            ..Self::default()
        }
    }

    /// `key`'s index in the vector, if the window holds it.
    #[inline]
    fn slot_of(&self, key: u64) -> Option<usize> {
        // Not wrapping: a window at the top of the key space ends there.
        let i = key.checked_sub(self.base)?;
        (i < DENSE_KEYS).then_some(i as usize)
    }

    #[inline]
    pub fn get(&self, key: u64) -> Option<&V> {
        if let Some(i) = self.slot_of(key) {
            self.dense.get(i)?.as_ref()
        } else {
            self.sparse.get(&key)
        }
    }

    #[inline]
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        if let Some(i) = self.slot_of(key) {
            self.dense.get_mut(i)?.as_mut()
        } else {
            self.sparse.get_mut(&key)
        }
    }

    pub fn contains_key(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// The value at `key`, inserting `f()` first if there is none.
    #[inline]
    pub fn get_or_insert_with(&mut self, key: u64, f: impl FnOnce() -> V) -> &mut V {
        if let Some(i) = self.slot_of(key) {
            if i >= self.dense.len() {
                self.dense.resize_with(i + 1, || None);
            }
            let slot = &mut self.dense[i];
            if slot.is_none() {
                self.dense_len += 1;
            }
            slot.get_or_insert_with(f)
        } else {
            self.sparse.entry(key).or_insert_with(f)
        }
    }

    pub fn remove(&mut self, key: u64) -> Option<V> {
        if let Some(i) = self.slot_of(key) {
            let v = self.dense.get_mut(i)?.take();
            self.dense_len -= v.is_some() as usize;
            v
        } else {
            self.sparse.remove(&key)
        }
    }

    pub fn len(&self) -> usize {
        self.dense_len + self.sparse.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every entry, and the memory that held them.
    pub fn clear(&mut self) {
        self.dense = Vec::new();
        self.dense_len = 0;
        self.sparse = FrameMap::default();
    }

    /// The entries: the vector's in key order, then the hashed ones in no
    /// order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        let dense = self
            .dense
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (self.base + i as u64, v)));
        dense.chain(self.sparse.iter().map(|(&k, v)| (k, v)))
    }

    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }

    /// Bytes the table occupies besides what its values own: the vector's
    /// slots, and hashbrown's entries plus a control byte each.
    pub fn memory_bytes(&self) -> usize {
        self.dense.capacity() * std::mem::size_of::<Option<V>>()
            + self.sparse.capacity() * (std::mem::size_of::<(u64, V)>() + 1)
    }

    /// The vector's indexes of the keys of `[first, last]` in the window
    /// and below the vector's length, as a half-open range.
    #[inline]
    fn dense_part(&self, first: u64, last: u64) -> std::ops::Range<u64> {
        let top = self.base.saturating_add(DENSE_KEYS - 1);
        let (lo, hi) = (first.max(self.base), last.min(top));
        if lo > hi {
            return 0..0;
        }
        let end = (hi - self.base + 1).min(self.dense.len() as u64);
        (lo - self.base).min(end)..end
    }

    /// Runs `f` on the entries whose keys lie in `[first, last]` and drops
    /// those `f` leaves empty (`f` returns false). In the window it visits
    /// the range's slots up to the highest one used; outside it, whichever
    /// is fewer, the range's keys or the hashed entries. However wide the
    /// range, the cost is bounded by what the table holds.
    pub fn for_each_in(&mut self, first: u64, last: u64, mut f: impl FnMut(u64, &mut V) -> bool) {
        if first > last {
            return;
        }
        for i in self.dense_part(first, last) {
            let slot = &mut self.dense[i as usize];
            if let Some(v) = slot.as_mut() {
                if !f(self.base + i, v) {
                    *slot = None;
                    self.dense_len -= 1;
                }
            }
        }
        // The hashed keys are the ones outside the window, so the range's
        // whole span can be looked up there.
        if self.sparse.is_empty() {
            return;
        }
        let map = &mut self.sparse;
        if last - first < map.len() as u64 {
            for key in first..=last {
                if let Some(v) = map.get_mut(&key) {
                    if !f(key, v) {
                        map.remove(&key);
                    }
                }
            }
        } else {
            map.retain(|&key, v| !(first..=last).contains(&key) || f(key, v));
        }
    }

    /// True if `f` holds for an entry whose key lies in `[first, last]`;
    /// visits what [`Self::for_each_in`] visits.
    pub fn any_in(&self, first: u64, last: u64, mut f: impl FnMut(u64, &V) -> bool) -> bool {
        if first > last {
            return false;
        }
        let hit = self.dense_part(first, last).any(|i| {
            self.dense[i as usize]
                .as_ref()
                .is_some_and(|v| f(self.base + i, v))
        });
        if hit {
            return true;
        }
        if self.sparse.is_empty() {
            return false;
        }
        let map = &self.sparse;
        if last - first < map.len() as u64 {
            (first..=last).any(|key| map.get(&key).is_some_and(|v| f(key, v)))
        } else {
            map.iter()
                .any(|(&key, v)| (first..=last).contains(&key) && f(key, v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Random inserts, removals and range visits on both sides of each end
    /// of the window, for windows at 0, in the middle and at the top of the
    /// key space, against a BTreeMap.
    #[test]
    fn equals_an_ordered_map() {
        for base in [0, 1 << 40, u64::MAX - DENSE_KEYS / 2] {
            equals_an_ordered_map_from(base);
        }
    }

    fn equals_an_ordered_map_from(base: u64) {
        let mut t: FrameTable<u64> = FrameTable::starting_at(base);
        let mut oracle: BTreeMap<u64, u64> = BTreeMap::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // The class from the low bits, the key from the others (so every
        // key of a class can come up).
        let top = base.wrapping_add(DENSE_KEYS);
        let key = |r: u64| match (r % 6, r >> 3) {
            (0, x) => x % 64,
            (1, x) => top.wrapping_sub(8).wrapping_add(x % 16),
            (2, x) => u64::MAX - x % 64,
            (3, x) => base.wrapping_sub(8).wrapping_add(x % 16),
            (4, x) => base.wrapping_add(x % (DENSE_KEYS * 2)),
            (_, x) => x % (DENSE_KEYS * 4),
        };
        for step in 0..20_000 {
            let (r, s) = (next(), next());
            let k = key(r);
            match s % 5 {
                0 | 1 => {
                    *t.get_or_insert_with(k, || 0) += 1;
                    *oracle.entry(k).or_insert(0) += 1;
                }
                2 => assert_eq!(t.remove(k), oracle.remove(&k)),
                3 => {
                    // Decrement every value in a range; drop the zeros.
                    let (a, b) = (k.min(key(s)), k.max(key(s)));
                    t.for_each_in(a, b, |_, v| {
                        *v -= 1;
                        *v != 0
                    });
                    let keys: Vec<u64> = oracle.range(a..=b).map(|(&k, _)| k).collect();
                    for k in keys {
                        let v = oracle.get_mut(&k).unwrap();
                        *v -= 1;
                        if *v == 0 {
                            oracle.remove(&k);
                        }
                    }
                }
                _ => {
                    let (a, b) = (k.min(key(s)), k.max(key(s)));
                    let want = oracle.range(a..=b).any(|(_, &v)| v % 2 == 0);
                    assert_eq!(t.any_in(a, b, |_, &v| v % 2 == 0), want);
                }
            }
            // The key just used, and the keys either side of each end.
            for k in [
                k,
                base.wrapping_sub(1),
                base,
                top.wrapping_sub(1),
                top,
                top.wrapping_add(1),
            ] {
                assert_eq!(t.get(k), oracle.get(&k), "key {k:#x}, step {step}");
            }
            if step % 1000 == 0 {
                let mut got: Vec<(u64, u64)> = t.iter().map(|(k, &v)| (k, v)).collect();
                got.sort_unstable();
                let want: Vec<(u64, u64)> = oracle.iter().map(|(&k, &v)| (k, v)).collect();
                assert_eq!(got, want);
                assert_eq!(t.len(), oracle.len());
                assert!(t.dense.len() as u64 <= DENSE_KEYS);
            }
        }
    }

    /// `[first, last]` with first > last holds no key, on either side of
    /// the window (the hashed part's size test subtracts them).
    #[test]
    fn an_inverted_range_visits_nothing() {
        let mut t: FrameTable<u8> = FrameTable::new();
        for k in [3, DENSE_KEYS + 3, DENSE_KEYS + 9] {
            t.get_or_insert_with(k, || 1);
        }
        for (a, b) in [
            (5, 2),
            (DENSE_KEYS + 9, DENSE_KEYS + 3),
            (DENSE_KEYS + 3, 3),
        ] {
            t.for_each_in(a, b, |_, _| panic!("visited"));
            assert!(!t.any_in(a, b, |_, _| true));
        }
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn equality_ignores_how_far_the_vector_grew() {
        let mut a: FrameTable<u8> = FrameTable::new();
        let mut b: FrameTable<u8> = FrameTable::new();
        a.get_or_insert_with(3, || 1);
        b.get_or_insert_with(3, || 1);
        b.get_or_insert_with(900, || 2);
        assert_ne!(a, b);
        b.remove(900);
        assert_eq!(a, b);
        a.get_or_insert_with(DENSE_KEYS + 5, || 7);
        assert_ne!(a, b);
        b.get_or_insert_with(DENSE_KEYS + 5, || 7);
        assert_eq!(a, b);
        a.clear();
        assert!(a.is_empty() && a.memory_bytes() == 0);
    }
}
