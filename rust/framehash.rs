//! A hash map keyed by frame numbers (1G frames, blocks of hugepage
//! numbers): the keys are integers the model chose, not input an attacker
//! picks to collide, so one multiply replaces SipHash's rounds.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

/// A map from frame numbers to `V`.
pub type FrameMap<V> = HashMap<u64, V, BuildHasherDefault<FrameHasher>>;

/// Runs `f` on the entries of `map` whose keys lie in `[first, last]` and
/// drops those `f` leaves empty (`f` returns false). Visits whichever is
/// fewer, the keys of the range or the entries of the map, so the cost is
/// bounded by what the map holds however wide the range.
pub fn for_each_in<V>(
    map: &mut FrameMap<V>,
    first: u64,
    last: u64,
    mut f: impl FnMut(u64, &mut V) -> bool,
) {
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

/// True if `f` holds for an entry of `map` whose key lies in
/// `[first, last]`; visits whichever is fewer, as [`for_each_in`].
pub fn any_in<V>(
    map: &FrameMap<V>,
    first: u64,
    last: u64,
    mut f: impl FnMut(u64, &V) -> bool,
) -> bool {
    if last - first < map.len() as u64 {
        (first..=last).any(|key| map.get(&key).is_some_and(|v| f(key, v)))
    } else {
        map.iter()
            .any(|(&key, v)| (first..=last).contains(&key) && f(key, v))
    }
}
