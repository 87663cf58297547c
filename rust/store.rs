//! The interface both attribute stores implement.
//!
//! A store maps a gfn (u64) to a u64 attribute value; a gfn never set reads
//! as 0. Ranges are half open, `[start, end)`, with `start < end`.

use std::fmt;

/// Why a store operation failed. Every failing call leaves the store exactly
/// as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// `start >= end` or another malformed range.
    InvalidRange { start: u64, end: u64 },
    /// Reserving storage would exceed the caller's memory limit (the model of
    /// an accounted allocation failing with -ENOMEM), or, with `limit` None,
    /// the host (or the store's node ids) could not provide `needed` bytes.
    OutOfMemory { needed: usize, limit: Option<usize> },
    /// The caller asked the call to stop (see `crate::interrupt`); nothing
    /// was changed.
    Interrupted,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::InvalidRange { start, end } => {
                write!(f, "invalid range: start ({start}) must be < end ({end})")
            }
            StoreError::OutOfMemory {
                needed,
                limit: Some(limit),
            } => write!(
                f,
                "out of memory: {needed} bytes needed, limit is {limit} bytes"
            ),
            StoreError::OutOfMemory {
                needed,
                limit: None,
            } => write!(
                f,
                "out of memory: cannot allocate the {needed} bytes the store would need"
            ),
            StoreError::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Checks the `[start, end)` convention shared by every range method.
#[inline]
pub fn check_range(start: u64, end: u64) -> Result<(), StoreError> {
    if start < end {
        Ok(())
    } else {
        Err(invalid_range(start, end))
    }
}

/// The error half of [`check_range`], kept out of line: cold, so the
/// optimizer lays every range method out for the valid case.
#[cold]
#[inline(never)]
fn invalid_range(start: u64, end: u64) -> StoreError {
    StoreError::InvalidRange { start, end }
}

/// A per-gfn attribute store.
pub trait AttrStore {
    /// The value at `gfn` (0 if never set).
    fn get(&self, gfn: u64) -> u64;

    /// Sets every gfn in `[start, end)` to `value`. Storing 0 erases.
    fn set_range(&mut self, start: u64, end: u64, value: u64) -> Result<(), StoreError>;

    /// A hint that `gfn` will be looked up soon: the store may ask the CPU
    /// for the memory holding it (see `crate::prefetch`) and keep what it
    /// found for that lookup. Changes no value the store holds.
    fn prefetch(&mut self, _gfn: u64) {}

    /// True if every gfn in `[start, end)` has `get(gfn) & mask == value & mask`.
    fn has_value(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<bool, StoreError>;

    /// Calls `f(run_start, run_end, value)` for maximal runs of equal value
    /// covering `[start, end)` exactly, in order; zero runs included.
    fn for_each_run(
        &self,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, u64),
    ) -> Result<(), StoreError>;

    /// Bytes the store's structure occupies (for XArray: nodes at the
    /// kernel's node size).
    fn memory_bytes(&self) -> usize;

    /// Number of stored runs (RangeTree) or present entries (XArray).
    fn entry_count(&self) -> usize;

    /// Allocates ahead whatever a following `set_range(start, end, _)` may
    /// need, like `xa_reserve` on every index, so that the set cannot fail
    /// part way. Fails with `OutOfMemory` if `memory_bytes()` would exceed
    /// `limit`; a failed reserve keeps nothing it allocated.
    fn reserve(&mut self, start: u64, end: u64, limit: Option<usize>) -> Result<(), StoreError>;

    /// Drops reserved-but-unused storage (reserved entries never stored).
    fn release_reservations(&mut self);

    /// The set path's first two steps in one call: true (nothing reserved)
    /// if every gfn in `[start, end)` already has `value`, else
    /// `reserve(start, end, limit)` and false.
    fn reserve_unless_has_value(
        &mut self,
        start: u64,
        end: u64,
        value: u64,
        limit: Option<usize>,
    ) -> Result<bool, StoreError> {
        if self.has_value(start, end, value, u64::MAX)? {
            return Ok(true);
        }
        self.reserve(start, end, limit)?;
        Ok(false)
    }

    /// Number of gfns in `[start, end)` whose value matches `value` under
    /// `mask`. The answer fits a u64 because `end` is a u64.
    fn count_pages(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<u64, StoreError> {
        check_range(start, end)?;
        let want = value & mask;
        let mut n = 0u64;
        self.for_each_run(start, end, &mut |s, e, v| {
            if v & mask == want {
                n += e - s;
            }
        })?;
        Ok(n)
    }

    /// `set_range(starts[i], ends[i], values[i])` for each i in order (the
    /// slices must have the same length): the batch entry. While the store
    /// outgrows a core's L2 it asks for the next range's memory while it
    /// stores the current one (see `crate::prefetch`).
    fn set_many(&mut self, starts: &[u64], ends: &[u64], values: &[u64]) -> Result<(), StoreError> {
        let mut prefetch = false;
        for (i, ((&s, &e), &v)) in starts.iter().zip(ends).zip(values).enumerate() {
            if i % crate::prefetch::RECHECK == 0 {
                prefetch = crate::prefetch::pays(self.memory_bytes());
            }
            if let (true, Some(&next)) = (prefetch, starts.get(i + 1)) {
                self.prefetch(next);
            }
            self.set_range(s, e, v)?;
        }
        Ok(())
    }

    /// `out[i] = get(gfns[i])`; the slices must have the same length.
    fn get_many(&self, gfns: &[u64], out: &mut [u64]) {
        for (o, &g) in out.iter_mut().zip(gfns) {
            *o = self.get(g);
        }
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
