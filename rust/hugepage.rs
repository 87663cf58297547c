//! Per-memslot hugepage tracking for the x86 MMU model, and the simulated
//! TDP mappings.
//!
//! KVM keeps, per memslot and per hugepage level (2M, 1G), an array of
//! `struct kvm_lpage_info` whose `disallow_lpage` is non-zero when the
//! hugepage may not be mapped huge: the head/tail hugepage is not wholly
//! inside the slot, the slot's gpa and userspace address are not congruent
//! modulo the hugepage size, or (bit `KVM_LPAGE_MIXED_FLAG`) the attributes
//! of the gfns under the hugepage are not uniform.
//!
//! Two trackers implement the same rules behind [`HugepageTracker`]:
//!
//! * [`LpageInfoTracker`]: the kernel's layout and algorithm, literally: one
//!   counter per hugepage, post-set loops over every hugepage of the range.
//!   It is the reference and the faithful per-page baseline.
//! * [`RangeTracker`]: the same state kept sparse (only the set mixed flags,
//!   in a [`SparseBitmap`], and three flags per level for the rest), so a
//!   post-set pass over a 1 TiB range is a handful of range operations
//!   (`O(log n + runs)`) instead of a loop over 512k hugepages.
//!
//! Hugepages are named by their absolute hugepage number `gfn >> shift`.

use std::fmt;

use crate::frametable::FrameTable;
use crate::store::{AttrStore, StoreError};

/// x86 page-table levels as KVM numbers them (`PG_LEVEL_*`).
pub const PG_LEVEL_4K: u8 = 1;
pub const PG_LEVEL_2M: u8 = 2;
pub const PG_LEVEL_1G: u8 = 3;
/// `KVM_MAX_HUGEPAGE_LEVEL` on x86 (TDP with 1G pages).
pub const KVM_MAX_HUGEPAGE_LEVEL: u8 = PG_LEVEL_1G;
/// `KVM_LPAGE_MIXED_FLAG`: the top bit of `disallow_lpage`, so that the
/// mixed state and the alignment/write-tracking counts share one word.
pub const KVM_LPAGE_MIXED_FLAG: u32 = 1 << 31;

/// Why a tracker or mapping operation failed; state is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HugepageError {
    /// The slot has no pages or `base_gfn + npages` wraps.
    InvalidSlot { base_gfn: u64, npages: u64 },
    /// A level outside what the operation accepts.
    InvalidLevel { level: u8, min: u8, max: u8 },
    /// A gfn outside the tracker's memslot.
    GfnOutsideSlot { gfn: u64 },
    /// A gfn whose gpa (`gfn << 12`) does not fit in 64 bits.
    GfnBeyondGpaSpace { gfn: u64 },
    /// A range that is empty or not contained by the memslot.
    RangeOutsideSlot { start: u64, end: u64 },
    /// The attribute store refused a query.
    Store(StoreError),
}

impl fmt::Display for HugepageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HugepageError::InvalidSlot { base_gfn, npages } => write!(
                f,
                "invalid memslot: base_gfn {base_gfn:#x}, npages {npages:#x} (need npages > 0 and no wrap)"
            ),
            HugepageError::InvalidLevel { level, min, max } => {
                write!(f, "invalid level {level}: must be in {min}..={max}")
            }
            HugepageError::GfnOutsideSlot { gfn } => {
                write!(f, "gfn {gfn:#x} is outside the memslot")
            }
            HugepageError::GfnBeyondGpaSpace { gfn } => {
                write!(f, "gfn {gfn:#x} is beyond the 64-bit gpa space")
            }
            HugepageError::RangeOutsideSlot { start, end } => write!(
                f,
                "gfn range [{start:#x}, {end:#x}) is empty or not inside the memslot"
            ),
            HugepageError::Store(StoreError::OutOfMemory {
                needed,
                limit: None,
            }) => write!(f, "out of memory: cannot allocate {needed} bytes of tracking state"),
            HugepageError::Store(e) => write!(f, "attribute store: {e}"),
        }
    }
}

impl std::error::Error for HugepageError {}

impl From<StoreError> for HugepageError {
    fn from(e: StoreError) -> Self {
        HugepageError::Store(e)
    }
}

/// `KVM_HPAGE_GFN_SHIFT(level)`.
#[inline]
pub const fn hpage_gfn_shift(level: u8) -> u32 {
    (level as u32 - 1) * 9
}

/// `KVM_PAGES_PER_HPAGE(level)`.
#[inline]
pub const fn pages_per_hpage(level: u8) -> u64 {
    1u64 << hpage_gfn_shift(level)
}

/// `[gfn, gfn + n)` ends at or before `limit` (and does not wrap).
#[inline]
fn fits(gfn: u64, n: u64, limit: u64) -> bool {
    gfn.checked_add(n).is_some_and(|e| e <= limit)
}

fn check_level(level: u8, min: u8, max: u8) -> Result<(), HugepageError> {
    if (min..=max).contains(&level) {
        Ok(())
    } else {
        Err(HugepageError::InvalidLevel { level, min, max })
    }
}

// ---------------------------------------------------------------------------
// A set of u64 kept as disjoint, non-adjacent half-open runs.
// ---------------------------------------------------------------------------

/// A set of hugepage numbers, as 512-bit blocks kept only where a key is
/// set (a [`FrameTable`] of the block number, then a bit).
///
/// ```text
///   key:  [63 ........ 9][8 ... 0]
///          block           bit
/// ```
///
/// The mixed flags are few (at most two hugepages per attribute run and
/// level: the ones an attribute boundary falls inside) but asked about on
/// every fault and conversion, so a point query must be cheap: an index
/// and a bit test. A block of the 2M flags covers 1 GiB, so within 64 TiB
/// of the set's start (a memslot's first hugepage) the table costs a word
/// per GiB from there to the highest block used, and each block 64 bytes
/// where a flag is set. A range removal visits only the
/// blocks in use, so clearing the flags under a conversion of a whole slot
/// costs what is set, not the slot's size.
#[derive(Clone, Default)]
pub struct SparseBitmap {
    blocks: FrameTable<Box<[u64; 8]>>,
    len: u64,
    /// The last block a removal emptied, zeroed, for the next block an
    /// insertion needs: a hugepage flagged and cleared in turn (a page
    /// converted back and forth) then allocates nothing.
    spare: Option<Box<[u64; 8]>>,
}

const BLOCK_SHIFT: u32 = 9;
const BLOCK_KEYS: u64 = 1 << BLOCK_SHIFT;

/// The bits `[lo, hi)` of word `w` of a block (0 <= lo < hi <= 512).
#[inline]
fn word_mask(w: usize, lo: u64, hi: u64) -> u64 {
    let (ws, we) = (w as u64 * 64, w as u64 * 64 + 64);
    if hi <= ws || lo >= we {
        return 0;
    }
    let (a, b) = (lo.max(ws) - ws, hi.min(we) - ws);
    if b - a == 64 {
        u64::MAX
    } else {
        ((1u64 << (b - a)) - 1) << a
    }
}

impl fmt::Debug for SparseBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.runs()).finish()
    }
}

impl PartialEq for SparseBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.blocks == other.blocks
    }
}

impl Eq for SparseBitmap {}

impl SparseBitmap {
    pub fn new() -> Self {
        Self::default()
    }

    /// A set whose keys start at about `first` (the first hugepage of a
    /// memslot): its table's window starts there, so the set costs what
    /// its own keys span, wherever the memslot sits.
    pub fn starting_at(first: u64) -> Self {
        Self {
            blocks: FrameTable::starting_at(first >> BLOCK_SHIFT),
            ..Self::default()
        }
    }

    /// Number of keys in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn contains(&self, key: u64) -> bool {
        self.len != 0
            && self
                .blocks
                .get(key >> BLOCK_SHIFT)
                .is_some_and(|b| b[(key % BLOCK_KEYS / 64) as usize] >> (key % 64) & 1 != 0)
    }

    /// Adds `key`; returns whether it was absent. Inlined: it runs on
    /// every conversion's post-set pass (see `RangeTree::find_leaf`).
    #[inline(always)]
    pub fn insert(&mut self, key: u64) -> bool {
        let b = self.block_mut(key >> BLOCK_SHIFT);
        let (w, m) = ((key % BLOCK_KEYS / 64) as usize, 1u64 << (key % 64));
        let absent = b[w] & m == 0;
        b[w] |= m;
        self.len += absent as u64;
        absent
    }

    /// The block `block`, added empty if absent (the spare one if a
    /// removal left one).
    #[inline(always)]
    fn block_mut(&mut self, block: u64) -> &mut [u64; 8] {
        self.blocks.get_or_insert_with(block, || {
            self.spare.take().unwrap_or_else(|| Box::new([0; 8]))
        })
    }

    /// Removes `key`; returns whether it was present.
    pub fn remove(&mut self, key: u64) -> bool {
        let Some(b) = self.blocks.get_mut(key >> BLOCK_SHIFT) else {
            return false;
        };
        let (w, m) = ((key % BLOCK_KEYS / 64) as usize, 1u64 << (key % 64));
        let present = b[w] & m != 0;
        b[w] &= !m;
        if present {
            self.len -= 1;
            if b.iter().all(|&x| x == 0) {
                self.spare = self.blocks.remove(key >> BLOCK_SHIFT);
            }
        }
        present
    }

    /// Adds the keys `[start, end)` (a block at a time, so only for ranges
    /// of keys that are to be set anyway).
    pub fn insert_range(&mut self, start: u64, end: u64) {
        let mut block = start >> BLOCK_SHIFT;
        while start < end && block <= (end - 1) >> BLOCK_SHIFT {
            let base = block << BLOCK_SHIFT;
            let (lo, hi) = (start.max(base) - base, (end - base).min(BLOCK_KEYS));
            let mut added = 0;
            for (w, word) in self.block_mut(block).iter_mut().enumerate() {
                let m = word_mask(w, lo, hi);
                added += u64::from((m & !*word).count_ones());
                *word |= m;
            }
            self.len += added;
            block += 1;
        }
    }

    /// Removes the keys of `[start, end)`; returns how many were set.
    pub fn remove_range(&mut self, start: u64, end: u64) -> u64 {
        if start >= end || self.len == 0 {
            return 0;
        }
        let mut removed = 0u64;
        self.blocks.for_each_in(
            start >> BLOCK_SHIFT,
            (end - 1) >> BLOCK_SHIFT,
            |block, b| {
                let base = block << BLOCK_SHIFT;
                let (lo, hi) = (start.max(base) - base, (end - base).min(BLOCK_KEYS));
                for (w, word) in b.iter_mut().enumerate() {
                    let m = word_mask(w, lo, hi) & *word;
                    removed += u64::from(m.count_ones());
                    *word &= !m;
                }
                b.iter().any(|&x| x != 0)
            },
        );
        self.len -= removed;
        removed
    }

    /// True if any key of `[start, end)` is in the set.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        if start >= end || self.len == 0 {
            return false;
        }
        let (first, last) = (start >> BLOCK_SHIFT, (end - 1) >> BLOCK_SHIFT);
        if first == last && start % BLOCK_KEYS == 0 && end - start == BLOCK_KEYS {
            // One whole block (the 2M flags under one 1G hugepage): blocks
            // are freed when they empty, so it is set iff it exists.
            return self.blocks.contains_key(first);
        }
        let hit = |block: u64, b: &[u64; 8]| {
            let base = block << BLOCK_SHIFT;
            let (lo, hi) = (start.max(base) - base, (end - base).min(BLOCK_KEYS));
            b.iter()
                .enumerate()
                .any(|(w, &word)| word & word_mask(w, lo, hi) != 0)
        };
        self.blocks.any_in(first, last, |block, b| hit(block, b))
    }

    /// The keys as runs `[start, end)`, in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut blocks: Vec<(u64, &[u64; 8])> =
            self.blocks.iter().map(|(k, b)| (k, &**b)).collect();
        blocks.sort_unstable_by_key(|&(k, _)| k);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (block, words) in blocks {
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let at = bits.trailing_zeros();
                    let ones = (!(bits >> at)).trailing_zeros();
                    let k = (block << BLOCK_SHIFT) + w as u64 * 64 + u64::from(at);
                    match out.last_mut() {
                        Some((_, e)) if *e == k => *e = k + u64::from(ones),
                        _ => out.push((k, k + u64::from(ones))),
                    }
                    bits &= !word_mask(0, u64::from(at), u64::from(at + ones));
                }
            }
        }
        out
    }

    /// Asks the CPU for the block holding `key`, if there is one.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        if let Some(b) = self.blocks.get(key >> BLOCK_SHIFT) {
            crate::prefetch::prefetch(&**b);
        }
    }

    /// The table's footprint and the blocks'.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.blocks.memory_bytes()
            + (self.blocks.len() + self.spare.is_some() as usize) * std::mem::size_of::<[u64; 8]>()
    }
}

// ---------------------------------------------------------------------------
// Memslot geometry and the disallow rules fixed at slot creation.
// ---------------------------------------------------------------------------

/// What the hugepage rules need from a memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLayout {
    pub base_gfn: u64,
    pub npages: u64,
    pub userspace_addr: u64,
}

impl SlotLayout {
    pub fn new(base_gfn: u64, npages: u64, userspace_addr: u64) -> Result<Self, HugepageError> {
        if npages == 0 || base_gfn.checked_add(npages).is_none() {
            return Err(HugepageError::InvalidSlot { base_gfn, npages });
        }
        Ok(Self {
            base_gfn,
            npages,
            userspace_addr,
        })
    }

    /// One past the last gfn of the slot.
    #[inline]
    pub fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }

    #[inline]
    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn < self.end_gfn()
    }

    fn check_gfn(&self, gfn: u64) -> Result<(), HugepageError> {
        if self.contains(gfn) {
            Ok(())
        } else {
            Err(HugepageError::GfnOutsideSlot { gfn })
        }
    }

    fn check_range(&self, start: u64, end: u64) -> Result<(), HugepageError> {
        if start < end && start >= self.base_gfn && end <= self.end_gfn() {
            Ok(())
        } else {
            Err(HugepageError::RangeOutsideSlot { start, end })
        }
    }

    /// `__kvm_mmu_slot_lpages()`: hugepages (even partial) the slot touches.
    pub fn lpages(&self, level: u8) -> u64 {
        let shift = hpage_gfn_shift(level);
        ((self.end_gfn() - 1) >> shift) - (self.base_gfn >> shift) + 1
    }

    /// `gfn_to_index()`: a gfn's lpage_info index in this slot.
    #[inline]
    fn lpage_index(&self, gfn: u64, level: u8) -> usize {
        let shift = hpage_gfn_shift(level);
        ((gfn >> shift) - (self.base_gfn >> shift)) as usize
    }

    /// `[first, end)`: the gfns of the `level` hugepages wholly inside the
    /// slot, the only ones that can ever be mapped huge (a partial head or
    /// tail hugepage is disallowed for good), or None if there are none.
    pub fn whole_hugepages(&self, level: u8) -> Option<(u64, u64)> {
        let n = pages_per_hpage(level);
        let mut first = self.base_gfn & !(n - 1);
        if first < self.base_gfn {
            // A partial head; none follows it if it is the gfn space's last.
            first = first.checked_add(n)?;
        }
        let end = self.end_gfn() & !(n - 1);
        (first < end).then_some((first, end))
    }

    /// The slot's first hugepage is partial (the slot starts misaligned).
    pub fn head_misaligned(&self, level: u8) -> bool {
        self.base_gfn & (pages_per_hpage(level) - 1) != 0
    }

    /// The slot's last hugepage is partial (the slot ends misaligned).
    pub fn tail_misaligned(&self, level: u8) -> bool {
        self.end_gfn() & (pages_per_hpage(level) - 1) != 0
    }

    /// The gpa and the host virtual address differ modulo the hugepage
    /// size, so no host hugepage can back a guest hugepage anywhere in the
    /// slot: kvm_alloc_memslot_metadata() disallows the whole slot.
    pub fn incongruent(&self, level: u8) -> bool {
        let ugfn = self.userspace_addr >> 12;
        (self.base_gfn ^ ugfn) & (pages_per_hpage(level) - 1) != 0
    }
}

/// The interface both trackers implement. Every method validates its
/// arguments and leaves the tracker unchanged on error.
pub trait HugepageTracker {
    fn slot(&self) -> &SlotLayout;

    /// kvm_mmu_init_memslot_memory_attributes(): compute the mixed flag of
    /// every hugepage wholly inside the slot from the current attributes.
    fn init_memory_attributes(&mut self, store: &dyn AttrStore) -> Result<(), HugepageError>;

    /// kvm_arch_post_set_memory_attributes() for `[start, end)` (already
    /// clipped to the slot) just set to `attrs`.
    fn post_set_memory_attributes(
        &mut self,
        store: &dyn AttrStore,
        start: u64,
        end: u64,
        attrs: u64,
    ) -> Result<(), HugepageError>;

    /// hugepage_test_mixed() for the hugepage containing `gfn`.
    fn test_mixed(&self, gfn: u64, level: u8) -> Result<bool, HugepageError>;

    /// `lpage_info_slot(gfn, slot, level)->disallow_lpage != 0`.
    fn disallow_lpage(&self, gfn: u64, level: u8) -> Result<bool, HugepageError>;

    /// The mixed hugepages of `level`, as runs of hugepage numbers.
    fn mixed_runs(&self, level: u8) -> Result<Vec<(u64, u64)>, HugepageError>;

    /// A hint that the flags of the hugepages holding `gfn` will be read
    /// soon (a fault's level, a conversion's re-checks): the tracker may
    /// ask the CPU for them (see `crate::prefetch`). Changes nothing.
    fn prefetch(&self, _gfn: u64) {}

    /// Bytes of tracking state.
    fn memory_bytes(&self) -> usize;

    /// The head and tail hugepages (2M, then 1G; head before tail) that
    /// straddle `[start, end)` (already clipped to the slot), lie wholly
    /// inside the slot and are not mixed: the pre-set pass adds them to the
    /// ongoing invalidation. Returned as (first gfn, level).
    fn straddling_hugepages(&self, start: u64, end: u64) -> Result<Vec<(u64, u8)>, HugepageError> {
        let mut out = Vec::new();
        each_straddling_hugepage(self, start, end, |gfn, level| out.push((gfn, level)))?;
        Ok(out)
    }

    /// The smallest `(start_gfn, end_gfn)` covering every hugepage
    /// `straddling_hugepages` returns, or None if it returns none: what the
    /// pre-set pass adds to the invalidation (range_add widens to a hull, so
    /// adding the hull once equals adding each).
    fn straddling_hugepages_hull(
        &self,
        start: u64,
        end: u64,
    ) -> Result<Option<(u64, u64)>, HugepageError> {
        let mut hull: Option<(u64, u64)> = None;
        // Runs on every conversion (6.18's pre-set pass): the generic walk
        // lets the closure inline, where a `&mut dyn FnMut` could not (the
        // closure's call was 7 M of a 1 TiB replay's 2,791 M instructions;
        // the whole hull is now about 110 a conversion, callgrind).
        each_straddling_hugepage(self, start, end, |gfn, level| {
            let e = gfn + pages_per_hpage(level);
            hull = Some(match hull {
                None => (gfn, e),
                Some((hs, he)) => (hs.min(gfn), he.max(e)),
            });
        })?;
        Ok(hull)
    }

    /// The lpage_info walk of __kvm_mmu_max_mapping_level(): the highest
    /// level <= `max_level` whose hugepage at `gfn` is not disallowed.
    fn max_mapping_level(&self, gfn: u64, max_level: u8) -> Result<u8, HugepageError> {
        check_level(max_level, PG_LEVEL_4K, KVM_MAX_HUGEPAGE_LEVEL)?;
        self.slot().check_gfn(gfn)?;
        let mut level = max_level;
        while level > PG_LEVEL_4K {
            if !self.disallow_lpage(gfn, level)? {
                break;
            }
            level -= 1;
        }
        Ok(level)
    }
}

/// The walk of [`HugepageTracker::straddling_hugepages`] and its hull,
/// written once: generic over the tracker and the callback so each caller
/// gets it inlined with its own.
#[inline(always)]
fn each_straddling_hugepage<T: HugepageTracker + ?Sized>(
    t: &T,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, u8),
) -> Result<(), HugepageError> {
    if start >= end {
        return Err(HugepageError::RangeOutsideSlot { start, end });
    }
    let base = t.slot().base_gfn;
    let slot_end = t.slot().end_gfn();
    // `fits` rather than a plain sum, so a hugepage at the top of the gfn
    // space cannot wrap (u128 sums did this at twice the cost).
    for level in [PG_LEVEL_2M, PG_LEVEL_1G] {
        let n = pages_per_hpage(level);
        let head = start & !(n - 1);
        let tail = (end - 1) & !(n - 1);
        if (head != start || !fits(head, n, end))
            && head >= base
            && fits(head, n, slot_end)
            && !t.test_mixed(head, level)?
        {
            f(head, level);
        }
        if tail == head {
            continue;
        }
        if !fits(tail, n, end) && fits(tail, n, slot_end) && !t.test_mixed(tail, level)? {
            f(tail, level);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The kernel's per-hugepage algorithm, literally.
// ---------------------------------------------------------------------------

/// The mixed-flag storage a tracker keeps, and the kernel's per-hugepage
/// re-check on top of it (hugepage_has_attrs, then set or clear the flag).
trait MixedFlags {
    fn layout(&self) -> &SlotLayout;

    fn set_mixed(&mut self, gfn: u64, level: u8, mixed: bool);

    /// Clears the flag of every level-`level` hugepage in `[first, end)`
    /// (both hugepage aligned): they hold only the attributes just set.
    fn clear_mixed_covered(&mut self, first: u64, end: u64, level: u8);

    fn hugepage_has_attrs(
        &self,
        store: &dyn AttrStore,
        gfn: u64,
        level: u8,
        attrs: u64,
    ) -> Result<bool, HugepageError>;

    fn recheck(
        &mut self,
        store: &dyn AttrStore,
        gfn: u64,
        level: u8,
        attrs: u64,
    ) -> Result<(), HugepageError> {
        let has = self.hugepage_has_attrs(store, gfn, level, attrs)?;
        self.set_mixed(gfn, level, !has);
        Ok(())
    }

    /// kvm_arch_post_set_memory_attributes() for `[start, end)` of this
    /// slot: per level (2M first, as 1G consumes its results) re-check the
    /// straddling head, clear what the range covers, re-check the straddling
    /// tail; only hugepages wholly inside the slot are tracked (the others
    /// are never huge).
    fn post_set_pass(
        &mut self,
        store: &dyn AttrStore,
        start: u64,
        end: u64,
        attrs: u64,
    ) -> Result<(), HugepageError> {
        self.layout().check_range(start, end)?;
        let base = self.layout().base_gfn;
        let slot_end = self.layout().end_gfn();
        // Validated above: from here on only reads of valid hugepage ranges,
        // which a store cannot refuse, so the flags are updated in place
        // (a copy would cost O(slot) per call).
        for level in PG_LEVEL_2M..=KVM_MAX_HUGEPAGE_LEVEL {
            let n = pages_per_hpage(level);
            let mut gfn = start & !(n - 1);

            if gfn != start || !fits(gfn, n, end) {
                if gfn >= base && fits(gfn, n, slot_end) {
                    self.recheck(store, gfn, level, attrs)?;
                }
                // The head was the last hugepage of the gfn space.
                gfn = match gfn.checked_add(n) {
                    Some(g) => g,
                    None => continue,
                };
            }

            let covered_end = end & !(n - 1);
            if gfn < covered_end {
                self.clear_mixed_covered(gfn, covered_end, level);
                gfn = covered_end;
            }

            if gfn < end && fits(gfn, n, slot_end) {
                self.recheck(store, gfn, level, attrs)?;
            }
        }
        Ok(())
    }
}

/// `slot->arch.lpage_info[]`: one `disallow_lpage` word per hugepage.
#[derive(Debug, Clone)]
pub struct LpageInfoTracker {
    slot: SlotLayout,
    /// Index 0 is the 2M level, index 1 the 1G level.
    lpage_info: [Vec<u32>; 2],
}

impl LpageInfoTracker {
    /// kvm_alloc_memslot_metadata(): the head/tail and congruence rules.
    /// Panics if the arrays cannot be allocated; see [`Self::try_new`].
    pub fn new(slot: SlotLayout) -> Self {
        Self::try_new(slot).expect("lpage_info allocation")
    }

    /// [`Self::new`], with the arrays' allocation (a u32 per hugepage, so
    /// the size is the caller's) failing as `OutOfMemory` instead of
    /// aborting, like the kernel's `kvcalloc()` failing with -ENOMEM.
    pub fn try_new(slot: SlotLayout) -> Result<Self, HugepageError> {
        let mut lpage_info: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for level in PG_LEVEL_2M..=KVM_MAX_HUGEPAGE_LEVEL {
            let lpages = usize::try_from(slot.lpages(level)).unwrap_or(usize::MAX);
            let mut linfo: Vec<u32> = Vec::new();
            let oom = || {
                HugepageError::Store(StoreError::OutOfMemory {
                    needed: lpages.saturating_mul(4),
                    limit: None,
                })
            };
            if !crate::hostmem::could_back((lpages as u64).saturating_mul(4)) {
                return Err(oom());
            }
            linfo.try_reserve_exact(lpages).map_err(|_| oom())?;
            linfo.resize(lpages, 0);
            if slot.head_misaligned(level) {
                linfo[0] = 1;
            }
            if slot.tail_misaligned(level) {
                linfo[lpages - 1] = 1;
            }
            if slot.incongruent(level) {
                linfo.iter_mut().for_each(|d| *d = 1);
            }
            lpage_info[(level - PG_LEVEL_2M) as usize] = linfo;
        }
        Ok(Self { slot, lpage_info })
    }

    fn linfo(&self, gfn: u64, level: u8) -> u32 {
        self.lpage_info[(level - PG_LEVEL_2M) as usize][self.slot.lpage_index(gfn, level)]
    }

    fn linfo_mut(&mut self, gfn: u64, level: u8) -> &mut u32 {
        let idx = self.slot.lpage_index(gfn, level);
        &mut self.lpage_info[(level - PG_LEVEL_2M) as usize][idx]
    }
}

impl MixedFlags for LpageInfoTracker {
    fn layout(&self) -> &SlotLayout {
        &self.slot
    }

    /// The kernel's loop: one hugepage_clear_mixed() per hugepage.
    fn clear_mixed_covered(&mut self, first: u64, end: u64, level: u8) {
        let n = pages_per_hpage(level);
        let mut gfn = first;
        while gfn < end {
            self.set_mixed(gfn, level, false);
            gfn += n;
        }
    }

    fn set_mixed(&mut self, gfn: u64, level: u8, mixed: bool) {
        let d = self.linfo_mut(gfn, level);
        if mixed {
            *d |= KVM_LPAGE_MIXED_FLAG;
        } else {
            *d &= !KVM_LPAGE_MIXED_FLAG;
        }
    }

    /// hugepage_has_attrs(): 2M asks the store; 1G consumes the 2M flags and
    /// samples the first gfn of every 2M page below.
    fn hugepage_has_attrs(
        &self,
        store: &dyn AttrStore,
        gfn: u64,
        level: u8,
        attrs: u64,
    ) -> Result<bool, HugepageError> {
        let end = gfn + pages_per_hpage(level);
        if level == PG_LEVEL_2M {
            return Ok(store.has_value(gfn, end, attrs, u64::MAX)?);
        }
        let step = pages_per_hpage(level - 1);
        let mut sub = gfn;
        while sub < end {
            if self.linfo(sub, level - 1) & KVM_LPAGE_MIXED_FLAG != 0 || store.get(sub) != attrs {
                return Ok(false);
            }
            sub += step;
        }
        Ok(true)
    }
}

impl HugepageTracker for LpageInfoTracker {
    fn slot(&self) -> &SlotLayout {
        &self.slot
    }

    fn init_memory_attributes(&mut self, store: &dyn AttrStore) -> Result<(), HugepageError> {
        // Work on a copy so a store error leaves the flags as they were.
        let mut next = self.clone();
        for level in PG_LEVEL_2M..=KVM_MAX_HUGEPAGE_LEVEL {
            let n = pages_per_hpage(level);
            let Some((mut gfn, end)) = self.slot.whole_hugepages(level) else {
                continue;
            };
            while gfn < end {
                let attrs = store.get(gfn);
                next.recheck(store, gfn, level, attrs)?;
                gfn += n;
            }
        }
        *self = next;
        Ok(())
    }

    fn post_set_memory_attributes(
        &mut self,
        store: &dyn AttrStore,
        start: u64,
        end: u64,
        attrs: u64,
    ) -> Result<(), HugepageError> {
        self.post_set_pass(store, start, end, attrs)
    }

    fn test_mixed(&self, gfn: u64, level: u8) -> Result<bool, HugepageError> {
        check_level(level, PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL)?;
        self.slot.check_gfn(gfn)?;
        Ok(self.linfo(gfn, level) & KVM_LPAGE_MIXED_FLAG != 0)
    }

    fn disallow_lpage(&self, gfn: u64, level: u8) -> Result<bool, HugepageError> {
        check_level(level, PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL)?;
        self.slot.check_gfn(gfn)?;
        Ok(self.linfo(gfn, level) != 0)
    }

    fn mixed_runs(&self, level: u8) -> Result<Vec<(u64, u64)>, HugepageError> {
        check_level(level, PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL)?;
        let first = self.slot.base_gfn >> hpage_gfn_shift(level);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &d) in self.lpage_info[(level - PG_LEVEL_2M) as usize]
            .iter()
            .enumerate()
        {
            if d & KVM_LPAGE_MIXED_FLAG == 0 {
                continue;
            }
            let hp = first + i as u64;
            match out.last_mut() {
                Some((_, e)) if *e == hp => *e = hp + 1,
                _ => out.push((hp, hp + 1)),
            }
        }
        Ok(out)
    }

    fn memory_bytes(&self) -> usize {
        self.lpage_info
            .iter()
            .map(|v| v.len() * std::mem::size_of::<u32>())
            .sum()
    }
}

// ---------------------------------------------------------------------------
// The same rules over runs.
// ---------------------------------------------------------------------------

/// Per-level state of [`RangeTracker`].
#[derive(Debug, Clone, Default)]
struct LevelRuns {
    /// First hugepage partial: disallowed (`linfo[0] = 1`).
    head_disallowed: bool,
    /// Last hugepage partial: disallowed (`linfo[lpages - 1] = 1`).
    tail_disallowed: bool,
    /// gpa/hva incongruent: every hugepage of the slot disallowed.
    all_disallowed: bool,
    /// Hugepage numbers with KVM_LPAGE_MIXED_FLAG set.
    mixed: SparseBitmap,
}

/// Hugepage tracking kept as runs: costs scale with the number of
/// attribute runs, not with the size of the slot.
#[derive(Debug, Clone)]
pub struct RangeTracker {
    slot: SlotLayout,
    levels: [LevelRuns; 2],
}

impl RangeTracker {
    /// [`Self::new`]; never fails (the same signature as the per-page
    /// tracker's).
    pub fn try_new(slot: SlotLayout) -> Result<Self, HugepageError> {
        Ok(Self::new(slot))
    }

    /// kvm_alloc_memslot_metadata()'s rules, kept as three flags per level.
    pub fn new(slot: SlotLayout) -> Self {
        let mk = |level: u8| LevelRuns {
            head_disallowed: slot.head_misaligned(level),
            tail_disallowed: slot.tail_misaligned(level),
            all_disallowed: slot.incongruent(level),
            mixed: SparseBitmap::starting_at(slot.base_gfn >> hpage_gfn_shift(level)),
        };
        Self {
            slot,
            levels: [mk(PG_LEVEL_2M), mk(PG_LEVEL_1G)],
        }
    }

    fn lvl(&self, level: u8) -> &LevelRuns {
        &self.levels[(level - PG_LEVEL_2M) as usize]
    }

    fn lvl_mut(&mut self, level: u8) -> &mut LevelRuns {
        &mut self.levels[(level - PG_LEVEL_2M) as usize]
    }
}

impl MixedFlags for RangeTracker {
    fn layout(&self) -> &SlotLayout {
        &self.slot
    }

    /// One range removal, whatever the number of hugepages.
    fn clear_mixed_covered(&mut self, first: u64, end: u64, level: u8) {
        let shift = hpage_gfn_shift(level);
        self.lvl_mut(level)
            .mixed
            .remove_range(first >> shift, end >> shift);
    }

    fn set_mixed(&mut self, gfn: u64, level: u8, mixed: bool) {
        let hp = gfn >> hpage_gfn_shift(level);
        let set = &mut self.lvl_mut(level).mixed;
        if mixed {
            set.insert(hp);
        } else {
            set.remove(hp);
        }
    }

    /// hugepage_has_attrs() over runs. 2M: one store range query. 1G: no 2M
    /// hugepage below is flagged mixed, and no store run with a value other
    /// than `attrs` contains a 2M-aligned gfn (the gfns the kernel samples).
    /// Inlined into its callers, as `RangeTree::find_leaf` says why.
    #[inline(always)]
    fn hugepage_has_attrs(
        &self,
        store: &dyn AttrStore,
        gfn: u64,
        level: u8,
        attrs: u64,
    ) -> Result<bool, HugepageError> {
        let end = gfn + pages_per_hpage(level);
        if level == PG_LEVEL_2M {
            return Ok(store.has_value(gfn, end, attrs, u64::MAX)?);
        }
        let sub_shift = hpage_gfn_shift(level - 1);
        if self
            .lvl(level - 1)
            .mixed
            .intersects(gfn >> sub_shift, end >> sub_shift)
        {
            return Ok(false);
        }
        let step = pages_per_hpage(level - 1);
        let mut sampled_other = false;
        store.for_each_run(gfn, end, &mut |s, e, v| {
            if v != attrs {
                // First sampled (step-aligned) gfn at or after s.
                let first = (s + step - 1) & !(step - 1);
                if first < e {
                    sampled_other = true;
                }
            }
        })?;
        Ok(!sampled_other)
    }
}

impl HugepageTracker for RangeTracker {
    fn slot(&self) -> &SlotLayout {
        &self.slot
    }

    /// A hugepage wholly inside the slot is mixed exactly when the store
    /// changes value strictly inside it (for 1G this is the kernel's "a 2M
    /// below is mixed, or a 2M sample differs from the first gfn"), so one
    /// pass over the runs finds every mixed hugepage.
    fn init_memory_attributes(&mut self, store: &dyn AttrStore) -> Result<(), HugepageError> {
        let mut next = self.clone();
        for level in PG_LEVEL_2M..=KVM_MAX_HUGEPAGE_LEVEL {
            let n = pages_per_hpage(level);
            let shift = hpage_gfn_shift(level);
            let Some((first, end)) = self.slot.whole_hugepages(level) else {
                continue;
            };
            let mut mixed: Vec<u64> = Vec::new();
            let mut prev: Option<u64> = None;
            store.for_each_run(first, end, &mut |s, _e, v| {
                if let Some(p) = prev {
                    if p != v && s & (n - 1) != 0 {
                        let hp = s >> shift;
                        if mixed.last() != Some(&hp) {
                            mixed.push(hp);
                        }
                    }
                }
                prev = Some(v);
            })?;
            let set = &mut next.lvl_mut(level).mixed;
            set.remove_range(first >> shift, end >> shift);
            let mut i = 0;
            while i < mixed.len() {
                let mut j = i + 1;
                while j < mixed.len() && mixed[j] == mixed[j - 1] + 1 {
                    j += 1;
                }
                set.insert_range(mixed[i], mixed[j - 1] + 1);
                i = j;
            }
        }
        *self = next;
        Ok(())
    }

    fn post_set_memory_attributes(
        &mut self,
        store: &dyn AttrStore,
        start: u64,
        end: u64,
        attrs: u64,
    ) -> Result<(), HugepageError> {
        self.post_set_pass(store, start, end, attrs)
    }

    fn test_mixed(&self, gfn: u64, level: u8) -> Result<bool, HugepageError> {
        check_level(level, PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL)?;
        self.slot.check_gfn(gfn)?;
        Ok(self
            .lvl(level)
            .mixed
            .contains(gfn >> hpage_gfn_shift(level)))
    }

    /// Inlined into the fault's level walk, as `RangeTree::find_leaf` says why.
    #[inline(always)]
    fn disallow_lpage(&self, gfn: u64, level: u8) -> Result<bool, HugepageError> {
        check_level(level, PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL)?;
        self.slot.check_gfn(gfn)?;
        let shift = hpage_gfn_shift(level);
        let l = self.lvl(level);
        let hp = gfn >> shift;
        Ok(l.all_disallowed
            || (l.head_disallowed && hp == self.slot.base_gfn >> shift)
            || (l.tail_disallowed && hp == (self.slot.end_gfn() - 1) >> shift)
            || l.mixed.contains(hp))
    }

    fn mixed_runs(&self, level: u8) -> Result<Vec<(u64, u64)>, HugepageError> {
        check_level(level, PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL)?;
        Ok(self.lvl(level).mixed.runs())
    }

    /// The blocks of flags behind each level's hugepage: a block is 64
    /// bytes on the heap, one per GiB of 2M flags, and the re-check's read
    /// of it waited for memory on most conversions at 1 TiB (half of the
    /// re-check's time, perf's cpu-clock samples).
    fn prefetch(&self, gfn: u64) {
        for level in PG_LEVEL_2M..=KVM_MAX_HUGEPAGE_LEVEL {
            self.lvl(level)
                .mixed
                .prefetch(gfn >> hpage_gfn_shift(level));
        }
    }

    fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .levels
                .iter()
                .map(|l| l.mixed.memory_bytes())
                .sum::<usize>()
    }
}

// ---------------------------------------------------------------------------
// Simulated TDP mappings: rust/tdp.rs (re-exported here, where the
// MMU model has always found them).
// ---------------------------------------------------------------------------

pub use crate::tdp::{LevelCounts, TdpPageTable, GFN_LIMIT};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tiny per-gfn oracle store (sparse: BTreeMap of runs rebuilt
    /// naively), enough to drive the trackers without the real stores.
    #[derive(Default)]
    struct OracleStore {
        // (start, end, value), sorted, disjoint, non-zero values only.
        runs: Vec<(u64, u64, u64)>,
    }

    impl OracleStore {
        fn value_at(&self, gfn: u64) -> u64 {
            self.runs
                .iter()
                .find(|&&(s, e, _)| s <= gfn && gfn < e)
                .map_or(0, |r| r.2)
        }
    }

    impl AttrStore for OracleStore {
        fn get(&self, gfn: u64) -> u64 {
            self.value_at(gfn)
        }
        fn set_range(&mut self, start: u64, end: u64, value: u64) -> Result<(), StoreError> {
            crate::store::check_range(start, end)?;
            let mut out = Vec::new();
            for &(s, e, v) in &self.runs {
                if s < start {
                    out.push((s, e.min(start), v));
                }
                if e > end {
                    out.push((s.max(end), e, v));
                }
            }
            if value != 0 {
                out.push((start, end, value));
            }
            out.sort();
            // Coalesce equal neighbours.
            let mut merged: Vec<(u64, u64, u64)> = Vec::new();
            for r in out {
                match merged.last_mut() {
                    Some(m) if m.1 == r.0 && m.2 == r.2 => m.1 = r.1,
                    _ => merged.push(r),
                }
            }
            self.runs = merged;
            Ok(())
        }
        fn has_value(
            &self,
            start: u64,
            end: u64,
            value: u64,
            mask: u64,
        ) -> Result<bool, StoreError> {
            crate::store::check_range(start, end)?;
            let mut ok = true;
            self.for_each_run(start, end, &mut |_, _, v| ok &= v & mask == value & mask)?;
            Ok(ok)
        }
        fn for_each_run(
            &self,
            start: u64,
            end: u64,
            f: &mut dyn FnMut(u64, u64, u64),
        ) -> Result<(), StoreError> {
            crate::store::check_range(start, end)?;
            // Pieces (including zero gaps), then coalesce.
            let mut pieces: Vec<(u64, u64, u64)> = Vec::new();
            let mut at = start;
            for &(s, e, v) in &self.runs {
                if e <= start || s >= end {
                    continue;
                }
                let (s, e) = (s.max(start), e.min(end));
                if s > at {
                    pieces.push((at, s, 0));
                }
                pieces.push((s, e, v));
                at = e;
            }
            if at < end {
                pieces.push((at, end, 0));
            }
            let mut merged: Vec<(u64, u64, u64)> = Vec::new();
            for p in pieces {
                match merged.last_mut() {
                    Some(m) if m.1 == p.0 && m.2 == p.2 => m.1 = p.1,
                    _ => merged.push(p),
                }
            }
            for (s, e, v) in merged {
                f(s, e, v);
            }
            Ok(())
        }
        fn memory_bytes(&self) -> usize {
            self.runs.len() * 24
        }
        fn entry_count(&self) -> usize {
            self.runs.len()
        }
        fn reserve(&mut self, _s: u64, _e: u64, _l: Option<usize>) -> Result<(), StoreError> {
            Ok(())
        }
        fn release_reservations(&mut self) {}
    }

    const M2: u64 = 512;
    const G1: u64 = 512 * 512;
    const P: u64 = 8; // KVM_MEMORY_ATTRIBUTE_PRIVATE

    fn both(base: u64, npages: u64, uaddr: u64) -> (RangeTracker, LpageInfoTracker) {
        let slot = SlotLayout::new(base, npages, uaddr).unwrap();
        (RangeTracker::new(slot), LpageInfoTracker::new(slot))
    }

    /// [`both`], initialised over an empty store (every page shared).
    fn both_over_empty(
        base: u64,
        npages: u64,
        uaddr: u64,
    ) -> (RangeTracker, LpageInfoTracker, OracleStore) {
        let (mut r, mut k) = both(base, npages, uaddr);
        let store = OracleStore::default();
        r.init_memory_attributes(&store).unwrap();
        k.init_memory_attributes(&store).unwrap();
        (r, k, store)
    }

    fn assert_same(r: &RangeTracker, k: &LpageInfoTracker) {
        for level in [PG_LEVEL_2M, PG_LEVEL_1G] {
            assert_eq!(
                r.mixed_runs(level).unwrap(),
                k.mixed_runs(level).unwrap(),
                "level {level}"
            );
        }
        // Disallow state of every hugepage (head, tail and a few inner).
        let slot = *r.slot();
        for level in [PG_LEVEL_2M, PG_LEVEL_1G] {
            let n = pages_per_hpage(level);
            let mut gfn = slot.base_gfn;
            let mut count = 0;
            while gfn < slot.end_gfn() && count < 4096 {
                assert_eq!(
                    r.disallow_lpage(gfn, level).unwrap(),
                    k.disallow_lpage(gfn, level).unwrap(),
                    "gfn {gfn:#x} level {level}"
                );
                gfn = match (gfn & !(n - 1)).checked_add(n) {
                    Some(g) => g,
                    None => break,
                };
                count += 1;
            }
        }
    }

    fn set(
        store: &mut OracleStore,
        trackers: &mut [&mut dyn HugepageTracker],
        s: u64,
        e: u64,
        v: u64,
    ) {
        store.set_range(s, e, v).unwrap();
        for t in trackers.iter_mut() {
            let slot = *t.slot();
            let (cs, ce) = (s.max(slot.base_gfn), e.min(slot.end_gfn()));
            if cs < ce {
                t.post_set_memory_attributes(store, cs, ce, v).unwrap();
            }
        }
    }

    #[test]
    fn sparse_bitmap_basics() {
        let mut s = SparseBitmap::new();
        s.insert_range(10, 20);
        s.insert_range(20, 30);
        s.insert_range(5, 7);
        assert_eq!(s.runs(), vec![(5, 7), (10, 30)]);
        assert_eq!(s.len(), 22);
        assert!(s.contains(29) && !s.contains(30) && !s.contains(7));
        assert!(s.intersects(6, 11) && !s.intersects(7, 10));
        assert_eq!(s.remove_range(12, 15), 3);
        assert_eq!(s.runs(), vec![(5, 7), (10, 12), (15, 30)]);
        assert_eq!(s.remove_range(0, 100), 19);
        assert!(s.is_empty());
        assert!(s.blocks.is_empty(), "empty blocks are freed");
        // A block emptied key by key answers a whole-block query as empty
        // while another block is set.
        s.insert(5);
        s.insert(600);
        s.remove(5);
        assert!(!s.intersects(0, 512) && s.intersects(512, 1024));
        assert_eq!(s.remove_range(0, 1024), 1);
        // The last 2M hugepage numbers (gfn >> 9), across a block boundary.
        let top = u64::MAX >> 9;
        s.insert_range(top - 600, top);
        assert!(s.insert(top));
        assert!(!s.insert(top));
        assert_eq!(s.runs(), vec![(top - 600, top + 1)]);
        assert!(s.intersects(0, u64::MAX));
        assert!(s.remove(top));
        assert_eq!(s.remove_range(0, u64::MAX), 600);
    }

    #[test]
    fn flags_of_a_memslot_high_in_the_address_space_cost_what_they_span() {
        // A 2 GiB memslot 60 TiB up with one mixed 2M hugepage: its flag
        // tables must not pay for the 60 TiB below it (a word per GiB
        // would be 480 KB; a KVM VM may have 32,764 such memslots).
        let base = 60 << 28;
        let (mut r, mut k, mut store) = both_over_empty(base, 2 * G1, base << 12);
        set(&mut store, &mut [&mut r, &mut k], base + 7, base + 8, P);
        assert!(r.test_mixed(base, PG_LEVEL_2M).unwrap());
        assert_same(&r, &k);
        assert!(r.memory_bytes() < 4096, "{} bytes", r.memory_bytes());
    }

    #[test]
    fn a_1g_hugepage_whose_last_2m_flag_clears_is_uniform_again() {
        // Flags in two 1 GiB blocks, so the bitmap is never empty as a
        // whole: the 1G re-check must see that the first block emptied.
        let (mut r, mut k, mut store) = both_over_empty(0, 2 * G1, 0);
        set(
            &mut store,
            &mut [&mut r, &mut k],
            G1 + M2 + 1,
            G1 + M2 + 2,
            P,
        );
        set(&mut store, &mut [&mut r, &mut k], M2 + 3, M2 + 4, P);
        set(&mut store, &mut [&mut r, &mut k], M2 + 3, M2 + 4, 0);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert!(!t.test_mixed(0, PG_LEVEL_1G).unwrap());
            assert!(t.test_mixed(G1, PG_LEVEL_1G).unwrap());
            assert_eq!(t.max_mapping_level(M2 + 3, 3).unwrap(), PG_LEVEL_1G);
        }
        // And back: the block the first clear left spare is used again.
        set(&mut store, &mut [&mut r, &mut k], 5, 6, P);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert!(t.test_mixed(0, PG_LEVEL_2M).unwrap());
            assert!(t.test_mixed(0, PG_LEVEL_1G).unwrap());
        }
        assert_same(&r, &k);
    }

    #[test]
    fn mixed_after_4k_conversion_then_cleared() {
        let (mut r, mut k, mut store) = both_over_empty(0, 2 * G1, 0);
        set(&mut store, &mut [&mut r, &mut k], M2 + 3, M2 + 4, P);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert!(t.test_mixed(M2, PG_LEVEL_2M).unwrap());
            assert!(!t.test_mixed(0, PG_LEVEL_2M).unwrap());
            assert!(t.test_mixed(0, PG_LEVEL_1G).unwrap());
            assert!(!t.test_mixed(G1, PG_LEVEL_1G).unwrap());
            assert_eq!(t.max_mapping_level(M2 + 3, 3).unwrap(), PG_LEVEL_4K);
            assert_eq!(t.max_mapping_level(0, 3).unwrap(), PG_LEVEL_2M);
            assert_eq!(t.max_mapping_level(G1, 3).unwrap(), PG_LEVEL_1G);
        }
        // Uniform again.
        set(&mut store, &mut [&mut r, &mut k], M2 + 3, M2 + 4, 0);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert!(!t.test_mixed(M2, PG_LEVEL_2M).unwrap());
            assert!(!t.test_mixed(0, PG_LEVEL_1G).unwrap());
            assert_eq!(t.max_mapping_level(M2 + 3, 3).unwrap(), PG_LEVEL_1G);
        }
        // A whole 2M page private: 2M uniform, 1G mixed (a 2M sample differs).
        set(&mut store, &mut [&mut r, &mut k], M2, 2 * M2, P);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert!(!t.test_mixed(M2, PG_LEVEL_2M).unwrap());
            assert!(t.test_mixed(0, PG_LEVEL_1G).unwrap());
            assert_eq!(t.max_mapping_level(M2, 3).unwrap(), PG_LEVEL_2M);
        }
        // The whole 1G private: uniform.
        set(&mut store, &mut [&mut r, &mut k], 0, G1, P);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert!(!t.test_mixed(0, PG_LEVEL_1G).unwrap());
            assert_eq!(t.max_mapping_level(5, 3).unwrap(), PG_LEVEL_1G);
        }
        assert_same(&r, &k);
    }

    #[test]
    fn misaligned_head_and_tail_never_huge() {
        // Starts 1 page into a 2M page, ends 1 page into another.
        let (mut r, mut k, mut store) = both_over_empty(M2 + 1, 3 * M2, (M2 + 1) << 12);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert_eq!(t.max_mapping_level(M2 + 1, 3).unwrap(), PG_LEVEL_4K);
            assert_eq!(t.max_mapping_level(2 * M2, 3).unwrap(), PG_LEVEL_2M);
            assert_eq!(t.max_mapping_level(3 * M2 + 5, 3).unwrap(), PG_LEVEL_2M);
            assert_eq!(t.max_mapping_level(4 * M2, 3).unwrap(), PG_LEVEL_4K);
            assert!(t.disallow_lpage(M2 + 1, PG_LEVEL_1G).unwrap());
            assert!(!t.test_mixed(M2 + 1, PG_LEVEL_2M).unwrap());
        }
        // Converting a page in the partial head never marks it mixed.
        set(&mut store, &mut [&mut r, &mut k], M2 + 2, M2 + 3, P);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert!(!t.test_mixed(M2 + 1, PG_LEVEL_2M).unwrap());
            assert!(!t.test_mixed(M2 + 1, PG_LEVEL_1G).unwrap());
        }
        assert_same(&r, &k);
    }

    #[test]
    fn incongruent_userspace_address_disallows_slot() {
        let (r, k) = both(0, 4 * M2, 4096);
        for t in [&r as &dyn HugepageTracker, &k] {
            for gfn in [0, M2, 3 * M2 + 7] {
                assert_eq!(t.max_mapping_level(gfn, 3).unwrap(), PG_LEVEL_4K);
            }
        }
        // Congruent modulo 2M but not 1G: 2M allowed, 1G not.
        let (r, k) = both(0, 2 * G1, M2 << 12);
        for t in [&r as &dyn HugepageTracker, &k] {
            assert_eq!(t.max_mapping_level(G1, 3).unwrap(), PG_LEVEL_2M);
        }
    }

    #[test]
    fn init_reads_existing_attributes() {
        let mut store = OracleStore::default();
        store.set_range(G1 + 100, G1 + 101, P).unwrap();
        store.set_range(2 * G1 + M2, 2 * G1 + 2 * M2, P).unwrap();
        let (mut r, mut k) = both(G1 - 3, 3 * G1, (G1 - 3) << 12);
        r.init_memory_attributes(&store).unwrap();
        k.init_memory_attributes(&store).unwrap();
        assert!(r.test_mixed(G1 + 100, PG_LEVEL_2M).unwrap());
        assert!(r.test_mixed(G1, PG_LEVEL_1G).unwrap());
        assert!(!r.test_mixed(2 * G1 + M2, PG_LEVEL_2M).unwrap());
        assert!(r.test_mixed(2 * G1, PG_LEVEL_1G).unwrap());
        assert_same(&r, &k);
    }

    #[test]
    fn errors_leave_state_unchanged() {
        assert_eq!(
            SlotLayout::new(5, 0, 0),
            Err(HugepageError::InvalidSlot {
                base_gfn: 5,
                npages: 0
            })
        );
        assert!(SlotLayout::new(u64::MAX, 2, 0).is_err());
        let (mut r, mut k) = both(M2, M2, 0);
        let store = OracleStore::default();
        for t in [&mut r as &mut dyn HugepageTracker, &mut k] {
            assert!(matches!(
                t.post_set_memory_attributes(&store, 0, M2 + 1, P),
                Err(HugepageError::RangeOutsideSlot { .. })
            ));
            assert!(t
                .post_set_memory_attributes(&store, M2 + 1, M2 + 1, P)
                .is_err());
            assert!(matches!(
                t.test_mixed(0, 2),
                Err(HugepageError::GfnOutsideSlot { gfn: 0 })
            ));
            assert!(matches!(
                t.test_mixed(M2, 1),
                Err(HugepageError::InvalidLevel { .. })
            ));
            assert!(matches!(
                t.test_mixed(M2, 4),
                Err(HugepageError::InvalidLevel { .. })
            ));
            assert!(t.max_mapping_level(M2, 0).is_err());
            assert!(t.max_mapping_level(2 * M2, 3).is_err());
        }
    }

    #[test]
    fn slot_at_top_of_gfn_space() {
        // The last hugepages of the u64 gfn space: no overflow anywhere.
        let base = u64::MAX - 3 * G1;
        let (mut r, mut k, mut store) = both_over_empty(base, 3 * G1, base << 12);
        set(&mut store, &mut [&mut r, &mut k], base + 5, u64::MAX, P);
        set(&mut store, &mut [&mut r, &mut k], u64::MAX - 7, u64::MAX, 0);
        assert_same(&r, &k);
    }

    /// The hugepages `[cs, ce)` straddles, by enumeration: every hugepage
    /// of each level that the range meets but does not cover, wholly inside
    /// the slot, and not mixed by the kernel-literal tracker's flags; and
    /// their hull. What the pre-set pass's walk must find.
    fn straddling_oracle(
        k: &LpageInfoTracker,
        cs: u64,
        ce: u64,
    ) -> (Vec<(u64, u8)>, Option<(u64, u64)>) {
        let slot = *k.slot();
        let mut want = Vec::new();
        for level in [PG_LEVEL_2M, PG_LEVEL_1G] {
            let n = pages_per_hpage(level);
            let mut h = cs & !(n - 1);
            while h < ce {
                let in_slot = h >= slot.base_gfn && h + n <= slot.end_gfn();
                let covered = cs <= h && h + n <= ce;
                if in_slot && !covered && !k.test_mixed(h, level).unwrap() {
                    want.push((h, level));
                }
                h += n;
            }
        }
        want.sort();
        let hull = want
            .iter()
            .fold(None, |acc: Option<(u64, u64)>, &(h, level)| {
                let e = h + pages_per_hpage(level);
                Some(acc.map_or((h, e), |(a, b)| (a.min(h), b.max(e))))
            });
        (want, hull)
    }

    /// Both trackers' straddling walk and hull for `[cs, ce)` against
    /// [`straddling_oracle`].
    fn check_straddling(
        r: &RangeTracker,
        k: &LpageInfoTracker,
        cs: u64,
        ce: u64,
    ) -> Result<(), String> {
        let (want, hull) = straddling_oracle(k, cs, ce);
        for t in [r as &dyn HugepageTracker, k] {
            let mut got = t.straddling_hugepages(cs, ce).unwrap();
            got.sort();
            if got != want || t.straddling_hugepages_hull(cs, ce).unwrap() != hull {
                return Err(format!(
                    "[{cs:#x}, {ce:#x}) in {:?}: got {got:?}, want {want:?} (hull {hull:?})",
                    t.slot()
                ));
            }
        }
        Ok(())
    }

    /// The straddling walk at the edges random ranges rarely reach: ranges
    /// starting or ending one page either side of every hugepage boundary
    /// near a slot's ends, on slots whose ends are and are not hugepage
    /// aligned, with some hugepages mixed.
    #[test]
    fn straddling_hugepages_at_slot_edges_match_enumeration() {
        for (base, npages) in [
            (0, 4 * M2),
            (0, G1 + 2 * M2),
            (M2, 2 * G1 - M2),
            (1, 4 * M2 - 2),
            (G1 - M2, G1 + 2 * M2),
            (0, 2 * G1),
        ] {
            let (mut r, mut k, mut store) = both_over_empty(base, npages, base << 12);
            let end = base + npages;
            // A private page inside the second 2M hugepage: it and its 1G
            // are mixed, so the walk must leave them out.
            set(
                &mut store,
                &mut [&mut r, &mut k],
                (base | (M2 - 1)) + M2 + 3,
                (base | (M2 - 1)) + M2 + 4,
                P,
            );
            let mut points = Vec::new();
            for edge in [
                base,
                base + M2,
                base + G1,
                end - M2.min(npages),
                end.saturating_sub(G1),
                end,
            ] {
                for n in [M2, G1] {
                    let a = edge & !(n - 1);
                    for p in [a.wrapping_sub(1), a, a + 1, a + n - 1, a + n, a + n + 1] {
                        if base <= p && p <= end {
                            points.push(p);
                        }
                    }
                }
            }
            points.sort();
            points.dedup();
            for &cs in &points {
                for &ce in points.iter().filter(|&&e| e > cs) {
                    check_straddling(&r, &k, cs, ce).unwrap();
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    struct Op {
        start: u64,
        len: u64,
        value: u64,
    }

    fn op_strategy(span: u64) -> impl Strategy<Value = Op> {
        // Lengths favour hugepage-ish sizes and awkward off-by-ones.
        let len = prop_oneof![
            1u64..8,
            (1u64..4).prop_map(|k| k * M2),
            (0u64..3, 0u64..2).prop_map(|(k, d)| (k * M2 + M2 - 1 + d).max(1)),
            1u64..(span / 2).max(2),
        ];
        (
            0u64..span,
            len,
            prop_oneof![Just(0u64), Just(P), Just(P | 1)],
        )
            .prop_map(|(start, len, value)| Op { start, len, value })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn sparse_bitmap_equals_a_set_of_keys(
            ops in prop::collection::vec((0u8..4, 0u64..1400, 0u64..700), 1..60),
        ) {
            let mut s = SparseBitmap::new();
            let mut oracle = std::collections::BTreeSet::new();
            for (op, start, len) in ops {
                let end = start + len;
                match op {
                    0 => {
                        s.insert_range(start, end);
                        oracle.extend(start..end);
                    }
                    1 => {
                        let want = oracle.range(start..end).count() as u64;
                        prop_assert_eq!(s.remove_range(start, end), want);
                        for k in start..end {
                            oracle.remove(&k);
                        }
                    }
                    2 => {
                        prop_assert_eq!(s.insert(start), oracle.insert(start));
                        prop_assert_eq!(s.remove(end), oracle.remove(&end));
                    }
                    _ => {
                        let want = oracle.range(start..end).next().is_some();
                        prop_assert_eq!(s.intersects(start, end), want);
                        prop_assert_eq!(s.contains(start), oracle.contains(&start));
                    }
                }
                prop_assert_eq!(s.len(), oracle.len() as u64);
                // Runs are disjoint, non-adjacent and hold exactly the keys.
                let runs = s.runs();
                for w in runs.windows(2) {
                    prop_assert!(w[0].1 < w[1].0);
                }
                let keys: Vec<u64> = runs.iter().flat_map(|&(a, b)| a..b).collect();
                prop_assert_eq!(keys, oracle.iter().copied().collect::<Vec<_>>());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn range_tracker_equals_kernel_algorithm(
            // Several slots with awkward alignment, in a ~4G window.
            // Sizes of any length, and whole hugepages, so that a slot's
            // end is often hugepage aligned (a hugepage then ends exactly
            // at it).
            slots in prop::collection::vec((0u64..6, 0u64..3, prop_oneof![
                1u64..(3 * G1),
                (1u64..8).prop_map(|k| k * M2),
                (1u64..3).prop_map(|k| k * G1),
            ], 0u64..3), 1..4),
            pre in prop::collection::vec(op_strategy(5 * G1), 0..4),
            ops in prop::collection::vec(op_strategy(5 * G1), 1..25),
        ) {
            let mut store = OracleStore::default();
            for op in &pre {
                store.set_range(op.start, op.start + op.len, op.value).unwrap();
            }
            let mut pairs = Vec::new();
            let mut next_base = 0u64;
            for (gap, misalign, npages, ua) in slots {
                let base = next_base + gap * M2 + [0, 1, M2 - 1][misalign as usize];
                let uaddr = match ua { 0 => base << 12, 1 => (base + 1) << 12, _ => (base + M2) << 12 };
                let (mut r, mut k) = both(base, npages, uaddr);
                r.init_memory_attributes(&store).unwrap();
                k.init_memory_attributes(&store).unwrap();
                assert_same(&r, &k);
                next_base = base + npages;
                pairs.push((r, k));
            }
            for op in ops {
                // Before the set, as the 6.18 pre-set pass asks: the
                // hugepages the range straddles, against every hugepage of
                // each level enumerated (the kernel-literal tracker's flags
                // say which are mixed).
                for (r, k) in &pairs {
                    let slot = *r.slot();
                    let (cs, ce) = (op.start.max(slot.base_gfn), (op.start + op.len).min(slot.end_gfn()));
                    if cs >= ce {
                        continue;
                    }
                    if let Err(why) = check_straddling(r, k, cs, ce) {
                        return Err(TestCaseError::fail(why));
                    }
                }
                let mut ts: Vec<&mut dyn HugepageTracker> = Vec::new();
                for (r, k) in pairs.iter_mut() {
                    ts.push(r);
                    ts.push(k);
                }
                set(&mut store, &mut ts, op.start, op.start + op.len, op.value);
                for (r, k) in &pairs {
                    assert_same(r, k);
                }
            }
        }
    }
}
