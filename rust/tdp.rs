//! The simulated TDP page table: one address space's leaf mappings, kept
//! the way the TDP MMU keeps them, as a radix tree of 512-entry tables.
//!
//! ```text
//!   gfn:  [51 ......... 18][17 ..... 9][8 ...... 0]
//!          1G frame (key)   2M index    4K index
//!
//!   puds: { 1G frame -> Pud }             (a FrameTable: only frames mapped)
//!            │
//!            ├── huge: Some(kind)         a 1G leaf (no pmds)
//!            ├── full: Some(kind)         all 4K leaves of one kind, a split
//!            │                            1G leaf (no pmds until touched)
//!            └── pmds: PmdTable           allocated on first need; 512 2M
//!                  │                      entries as bits, 4 a entry:
//!                  ├── None
//!                  ├── Leaf { private }   a 2M leaf
//!                  ├── Full { private }   512 4K leaves of one kind (a split)
//!                  └── Table ──> ptes[i]: Pte { present, private: 512 bits }
//!                                         4K leaves
//! ```
//!
//! Why a page table and not runs: the fault path installs one leaf and the
//! conversion path zaps a few, on every operation. In a radix tree each is
//! three array indexes (the 1G frame's in a FrameTable), where a run store
//! costs a B+ tree descent per level; and the cost of a zap is the mapped
//! tables it visits, as in the kernel, which fault-ins have already paid
//! for. Each PUD keeps its own leaf counts, so a zap covering a whole 1G
//! frame drops it without visiting its tables.
//!
//! A gfn is mapped by at most one leaf: installing a leaf removes every
//! leaf of another level under or over it.

use crate::frametable::FrameTable;
use crate::hugepage::{HugepageError, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K};
use crate::kvm::uapi::{KVM_FILTER_PRIVATE, KVM_FILTER_SHARED};

/// One past the largest gfn whose gpa fits in 64 bits.
pub const GFN_LIMIT: u64 = 1 << (64 - 12);

/// Per-level counts (index 0 = 4K, 1 = 2M, 2 = 1G).
pub type LevelCounts = [u64; 3];

/// Entries per table, and the gfn bits one table level resolves.
const PTRS: usize = 512;
const PTE_BITS: u32 = 9;
const PUD_SHIFT: u32 = 2 * PTE_BITS;
const WORDS: usize = PTRS / 64;

type PudMap = FrameTable<Pud>;

/// Which leaves a zap removes: both kinds, or the ones a filtered
/// invalidation names (kvm_gfn_range.attr_filter, 6.18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kinds {
    Both,
    Shared,
    Private,
}

impl Kinds {
    #[inline]
    fn matches(self, private: bool) -> bool {
        match self {
            Kinds::Both => true,
            Kinds::Shared => !private,
            Kinds::Private => private,
        }
    }
}

/// A last-level table: which of its 512 gfns have a 4K leaf, and which of
/// those a private fault installed.
///
/// The two bitmaps are interleaved a word at a time (`words[w]` is
/// `[present, private]` for entries 64w..64w+63), so an entry's two bits
/// share a cache line: a fault or zap on one gfn of a table outside the
/// cache misses once, not twice. How many leaves a table holds is not
/// kept: the present bits say it (`count`, eight popcounts), so a table is
/// exactly its 128 bytes of bits.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pte {
    words: [[u64; 2]; WORDS],
}

impl Pte {
    fn empty() -> Self {
        Self {
            words: [[0; 2]; WORDS],
        }
    }

    /// The table a split of a 2M leaf of this kind leaves behind.
    fn full(private: bool) -> Self {
        Self {
            words: [[u64::MAX, if private { u64::MAX } else { 0 }]; WORDS],
        }
    }

    /// How many 4K leaves the table holds.
    fn count(&self) -> u32 {
        self.words
            .iter()
            .map(|[present, _]| present.count_ones())
            .sum()
    }

    /// No 4K leaf is left.
    #[inline]
    fn is_empty(&self) -> bool {
        self.words.iter().all(|[present, _]| *present == 0)
    }

    #[inline]
    fn bit(&self, i: usize) -> (bool, bool) {
        let m = 1u64 << (i % 64);
        let [present, private] = self.words[i / 64];
        (present & m != 0, private & m != 0)
    }

    #[inline]
    fn set(&mut self, i: usize, private: bool) {
        let (w, m) = (i / 64, 1u64 << (i % 64));
        let [present, kind] = &mut self.words[w];
        *present |= m;
        if private {
            *kind |= m;
        } else {
            *kind &= !m;
        }
    }

    /// Removes the leaves of entries `[s, e)` (0 <= s < e <= 512) that
    /// `kinds` names; returns how many.
    fn clear(&mut self, s: usize, e: usize, kinds: Kinds) -> u32 {
        let mut n = 0;
        for w in s / 64..=(e - 1) / 64 {
            let lo = if w == s / 64 { s % 64 } else { 0 };
            let hi = if w == (e - 1) / 64 {
                (e - 1) % 64 + 1
            } else {
                64
            };
            let span = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let [present, private] = &mut self.words[w];
            let sel = span
                & match kinds {
                    Kinds::Both => *present,
                    Kinds::Shared => *present & !*private,
                    Kinds::Private => *private,
                };
            n += sel.count_ones();
            *present &= !sel;
            *private &= !sel;
        }
        n
    }
}

/// What a 2M entry holds, as [`PmdTable::get`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pmd {
    None,
    Leaf {
        private: bool,
    },
    /// A table whose 512 entries are all 4K leaves of one kind (what a
    /// split leaves behind), kept without its bitmaps until one changes.
    Full {
        private: bool,
    },
    /// A 4K table with its bitmaps ([`PmdTable::pte`]).
    Table,
}

/// 64 2M entries, one bit each per word.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PmdWord {
    /// A 2M leaf.
    leaf: u64,
    /// A 4K table (full, or with bitmaps in `ptes`).
    table: u64,
    /// The table is full: 512 4K leaves of one kind, no bitmaps kept.
    full: u64,
    /// The kind of a leaf or a full table.
    private: u64,
}

/// One PUD's 512 2M entries, as bits.
///
/// ```text
///   words[8]:  { leaf, table, full, private }   64 entries a word, 32 bytes
///   ptes:      [Pte]   the tables that are not full, in entry order: the
///              bitmaps of entry i are at its rank, the number of such
///              tables before it (a few popcounts over `words`)
///
///   entry i:   leaf   table  full   private
///   None        0      0      0      0
///   Leaf        1      0      0      kind
///   Full        0      1      1      kind
///   Table       0      1      0      0         bitmaps in ptes[i]
/// ```
///
/// Why bits and not an array of entries: the fault and conversion paths
/// read one 2M entry per operation at a random gfn. As a 16-byte enum per
/// entry, a 1 TiB guest's 2M level was 8 MB, four times a core's L2, and
/// that read missed the cache on most operations; as bits it is 256 bytes
/// a PUD, 256 KB at 1 TiB. An entry's four bits share a 32-byte word
/// group, so a lookup reads one cache line. The bitmaps are found by rank
/// rather than by a hash of the index: a hash probe reads its control
/// bytes and then its bucket, two dependent misses where the rank's words
/// are the ones the lookup just read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PmdTable {
    words: [PmdWord; WORDS],
    ptes: Vec<Pte>,
}

impl PmdTable {
    /// Every entry a full table of one kind (a split 1G leaf, spelt out).
    fn all_full(private: bool) -> Self {
        let word = PmdWord {
            leaf: 0,
            table: u64::MAX,
            full: u64::MAX,
            private: if private { u64::MAX } else { 0 },
        };
        Self {
            words: [word; WORDS],
            ptes: Vec::new(),
        }
    }

    /// No entry is a leaf or a table.
    fn is_empty(&self) -> bool {
        self.words.iter().all(|w| w.leaf | w.table == 0)
    }

    /// How many entries are 2M leaves.
    fn leaves_2m(&self) -> u32 {
        self.words.iter().map(|w| w.leaf.count_ones()).sum()
    }

    /// Where entry `i`'s bitmaps are (or would go) in `ptes`: how many
    /// entries before it are tables that are not full.
    #[inline]
    fn rank(&self, i: usize) -> usize {
        let bitmaps = |w: &PmdWord| w.table & !w.full;
        let whole: u32 = self.words[..i / 64]
            .iter()
            .map(|w| bitmaps(w).count_ones())
            .sum();
        let below = (1u64 << (i % 64)) - 1;
        (whole + (bitmaps(&self.words[i / 64]) & below).count_ones()) as usize
    }

    #[inline]
    fn get(&self, i: usize) -> Pmd {
        let w = &self.words[i / 64];
        let m = 1u64 << (i % 64);
        let private = w.private & m != 0;
        if w.leaf & m != 0 {
            Pmd::Leaf { private }
        } else if w.table & m == 0 {
            Pmd::None
        } else if w.full & m != 0 {
            Pmd::Full { private }
        } else {
            Pmd::Table
        }
    }

    /// Makes entry `i` None, a leaf or a full table (a table with bitmaps
    /// comes from [`Self::set_table`]); drops the bitmaps it had. Inlined
    /// into the zap and map paths, as `RangeTree::find_leaf` says why.
    #[inline(always)]
    fn set(&mut self, i: usize, to: Pmd) {
        let m = 1u64 << (i % 64);
        if self.get(i) == Pmd::Table {
            let at = self.rank(i);
            self.ptes.remove(at);
        }
        let w = &mut self.words[i / 64];
        w.leaf &= !m;
        w.table &= !m;
        w.full &= !m;
        w.private &= !m;
        match to {
            Pmd::None => {}
            Pmd::Leaf { private } => {
                w.leaf |= m;
                if private {
                    w.private |= m;
                }
            }
            Pmd::Full { private } => {
                w.table |= m;
                w.full |= m;
                if private {
                    w.private |= m;
                }
            }
            Pmd::Table => unreachable!("a table's bitmaps come from set_table"),
        }
    }

    /// Makes entry `i` a table with bitmaps `pte`.
    fn set_table(&mut self, i: usize, pte: Pte) {
        self.set(i, Pmd::None);
        self.words[i / 64].table |= 1u64 << (i % 64);
        let at = self.rank(i);
        self.ptes.insert(at, pte);
    }

    /// The bitmaps of table entry `i` (a full one is spelt out first).
    /// Inlined: it runs on every zap and map of a 4K table entry.
    #[inline(always)]
    fn table_mut(&mut self, i: usize) -> &mut Pte {
        let m = 1u64 << (i % 64);
        let at = self.rank(i);
        let w = &mut self.words[i / 64];
        debug_assert!(w.table & m != 0, "entry {i} is not a table");
        if w.full & m != 0 {
            let private = w.private & m != 0;
            w.full &= !m;
            w.private &= !m;
            self.ptes.insert(at, Pte::full(private));
        }
        &mut self.ptes[at]
    }

    /// The bitmaps of entry `i`, a [`Pmd::Table`].
    #[inline]
    fn pte(&self, i: usize) -> &Pte {
        &self.ptes[self.rank(i)]
    }
}

/// The 1G entry of one 1G frame: a 1G leaf, or a table of 512 2M entries.
///
/// Memory follows what is mapped below 1G, not what is mapped at all: a
/// 1G leaf has no table (`pmds` None), and the 4K leaves a split of one
/// leaves behind are one flag (`full`) until a map or zap touches them, so
/// a whole host mapped at 1G and then split costs a few words per 1G.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pud {
    /// Some(kind): a 1G leaf maps the frame (`pmds` is then None).
    huge: Option<bool>,
    /// Some(kind): every gfn of the frame has a 4K leaf of that kind
    /// (`pmds` is then None).
    full: Option<bool>,
    /// The 512 2M entries, or None while none is needed.
    pmds: Option<Box<PmdTable>>,
    /// 4K leaves below (the bits of `pmds` count the 2M leaves and tables).
    leaves_4k: u32,
}

impl Pud {
    fn new() -> Self {
        Self {
            huge: None,
            full: None,
            pmds: None,
            leaves_4k: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.huge.is_none()
            && self.full.is_none()
            && self.pmds.as_deref().is_none_or(PmdTable::is_empty)
    }

    /// The 2M entries, allocated (and a `full` frame spelt out as `Full`
    /// tables) for a change below 1G. Inlined, as `PmdTable::set`.
    #[inline(always)]
    fn pmds_mut(&mut self) -> &mut PmdTable {
        if let Some(private) = self.full.take() {
            self.pmds = Some(Box::new(PmdTable::all_full(private)));
        }
        self.pmds.get_or_insert_with(Default::default)
    }

    /// Drops every 2M and 4K leaf below; returns how many per level.
    fn clear_pmds(&mut self) -> LevelCounts {
        let leaves_2m = self.pmds.as_deref().map_or(0, PmdTable::leaves_2m);
        let removed = [u64::from(self.leaves_4k), u64::from(leaves_2m), 0];
        self.full = None;
        self.pmds = None;
        self.leaves_4k = 0;
        removed
    }

    /// Zaps the leaves of `kinds` over local gfns `[s, e)` of this frame
    /// (0 <= s < e <= 2^18); a huge leaf touching the range goes whole.
    fn zap(&mut self, s: u64, e: u64, kinds: Kinds, removed: &mut LevelCounts) {
        if let Some(private) = self.huge {
            if kinds.matches(private) {
                self.huge = None;
                removed[2] += 1;
            }
            return;
        }
        let whole = s == 0 && e == 1 << PUD_SHIFT;
        if let Some(private) = self.full {
            if !kinds.matches(private) {
                return;
            }
        }
        if whole && (kinds == Kinds::Both || self.full.is_some()) {
            let r = self.clear_pmds();
            removed[0] += r[0];
            removed[1] += r[1];
            return;
        }
        if self.full.is_none() && self.pmds.is_none() {
            return;
        }
        let (first, last) = ((s >> PTE_BITS) as usize, ((e - 1) >> PTE_BITS) as usize);
        self.pmds_mut();
        let pmds = self.pmds.as_deref_mut().expect("allocated above");
        for i in first..=last {
            let lo = if i == first { (s as usize) % PTRS } else { 0 };
            let hi = if i == last {
                ((e - 1) as usize) % PTRS + 1
            } else {
                PTRS
            };
            match pmds.get(i) {
                Pmd::None => {}
                Pmd::Leaf { private } => {
                    if kinds.matches(private) {
                        pmds.set(i, Pmd::None);
                        removed[1] += 1;
                    }
                }
                Pmd::Full { private } if !kinds.matches(private) => {}
                Pmd::Full { .. } if lo == 0 && hi == PTRS => {
                    pmds.set(i, Pmd::None);
                    self.leaves_4k -= PTRS as u32;
                    removed[0] += PTRS as u64;
                }
                Pmd::Full { .. } | Pmd::Table => {
                    let t = pmds.table_mut(i);
                    let n = t.clear(lo, hi, kinds);
                    let emptied = t.is_empty();
                    self.leaves_4k -= n;
                    removed[0] += u64::from(n);
                    if emptied {
                        pmds.set(i, Pmd::None);
                    }
                }
            }
        }
    }
}

/// Leaf mappings of one address space's TDP root (see the module's
/// picture). A gfn is mapped by at most one leaf.
#[derive(Debug, Clone, Default)]
pub struct TdpPageTable {
    puds: PudMap,
    /// Live leaves per level.
    counts: LevelCounts,
    /// Whether leaf kinds are left out: only a VM with a mirror root (TDX)
    /// can tell the kinds apart when zapping; any other VM's one direct
    /// root holds both, so every leaf counts as shared.
    untracked_kinds: bool,
}

impl PartialEq for TdpPageTable {
    fn eq(&self, other: &Self) -> bool {
        self.counts == other.counts
            && self.untracked_kinds == other.untracked_kinds
            && self.puds == other.puds
    }
}

impl Eq for TdpPageTable {}

fn check_level(level: u8) -> Result<(), HugepageError> {
    if (PG_LEVEL_4K..=PG_LEVEL_1G).contains(&level) {
        Ok(())
    } else {
        Err(HugepageError::InvalidLevel {
            level,
            min: PG_LEVEL_4K,
            max: PG_LEVEL_1G,
        })
    }
}

impl TdpPageTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A root that does not record which kind of fault installed each leaf
    /// (every leaf counts as shared; [`Self::zap_filtered`] then only
    /// makes sense with both kinds).
    pub fn without_kinds() -> Self {
        Self {
            untracked_kinds: true,
            ..Self::default()
        }
    }

    /// The level and kind (private?) of the leaf mapping `gfn`, if any.
    #[inline]
    fn leaf(&self, gfn: u64) -> Option<(u8, bool)> {
        let pud = self.puds.get(gfn >> PUD_SHIFT)?;
        if let Some(private) = pud.huge {
            return Some((PG_LEVEL_1G, private));
        }
        if let Some(private) = pud.full {
            return Some((PG_LEVEL_4K, private));
        }
        let pmds = pud.pmds.as_deref()?;
        let i = (gfn >> PTE_BITS) as usize % PTRS;
        match pmds.get(i) {
            Pmd::None => None,
            Pmd::Leaf { private } => Some((PG_LEVEL_2M, private)),
            Pmd::Full { private } => Some((PG_LEVEL_4K, private)),
            Pmd::Table => match pmds.pte(i).bit(gfn as usize % PTRS) {
                (true, private) => Some((PG_LEVEL_4K, private)),
                (false, _) => None,
            },
        }
    }

    /// Bytes the page table's 2M and 4K tables occupy (the directory of 1G
    /// frames aside): how much of it a walk may find outside the cache.
    pub fn table_bytes(&self) -> usize {
        self.table_bytes_per_pud().sum()
    }

    /// [`Self::table_bytes`], one PUD at a time (a caller that only needs
    /// to know whether they pass a threshold can stop early).
    pub fn table_bytes_per_pud(&self) -> impl Iterator<Item = usize> + '_ {
        self.puds
            .values()
            .filter_map(|p| p.pmds.as_deref())
            .map(|t| std::mem::size_of::<PmdTable>() + t.ptes.len() * std::mem::size_of::<Pte>())
    }

    /// A hint that `gfn` will be mapped or zapped soon: asks the CPU for
    /// its PUD's 2M entries and for the 4K table behind its 2M entry, if
    /// it has one (see `crate::prefetch`). Changes nothing.
    ///
    /// It reads the 2M entry to find the table. All of the 2M level's
    /// bits are asked for (256 bytes a PUD), not just the entry's: a
    /// table's rank reads every word before it, and a zap then asks
    /// whether the PUD is empty. And the whole table (128 bytes), as a zap
    /// asks whether it emptied. With only the entry's words asked for,
    /// the zap's own reads were a tenth of a 1 TiB replay's time (perf's
    /// cpu-clock samples); with all of them, a sixteenth.
    pub fn prefetch(&self, gfn: u64) {
        if let Some(pmds) = self
            .puds
            .get(gfn >> PUD_SHIFT)
            .and_then(|p| p.pmds.as_deref())
        {
            crate::prefetch::prefetch(&pmds.words);
            let i = (gfn >> PTE_BITS) as usize % PTRS;
            if pmds.get(i) == Pmd::Table {
                crate::prefetch::prefetch(pmds.pte(i));
            }
        }
    }

    /// The level of the leaf mapping `gfn`, if any.
    #[inline]
    pub fn mapped_level(&self, gfn: u64) -> Option<u8> {
        self.leaf(gfn).map(|(l, _)| l)
    }

    /// Whether the leaf mapping `gfn` was installed by a private fault
    /// (None: unmapped).
    pub fn mapped_private(&self, gfn: u64) -> Option<bool> {
        self.leaf(gfn).map(|(_, p)| p)
    }

    /// Installs a leaf at `level` covering `gfn`. Smaller leaves under it
    /// are replaced (the page table below is freed), and a bigger leaf
    /// covering `gfn` is zapped first (split to install the smaller one), as
    /// the TDP MMU does. Returns whether a new leaf was installed (false:
    /// the same leaf was already present, a spurious fault) and the leaves
    /// it removed per level.
    ///
    /// The same leaf with the other kind: the fault of the other kind
    /// installs its own (the kernel's other root), which the model keeps
    /// as the leaf's kind.
    pub fn map(
        &mut self,
        gfn: u64,
        level: u8,
        private: bool,
    ) -> Result<(bool, LevelCounts), HugepageError> {
        check_level(level)?;
        if gfn >= GFN_LIMIT {
            return Err(HugepageError::GfnBeyondGpaSpace { gfn });
        }
        let private = private && !self.untracked_kinds;
        let pud = self.puds.get_or_insert_with(gfn >> PUD_SHIFT, Pud::new);
        let mut removed = [0u64; 3];
        let i = (gfn >> PTE_BITS) as usize % PTRS;
        match level {
            PG_LEVEL_1G => {
                if let Some(kind) = pud.huge {
                    pud.huge = Some(private);
                    return Ok((kind != private, removed));
                }
                removed = pud.clear_pmds();
                pud.huge = Some(private);
            }
            PG_LEVEL_2M => {
                if pud.huge.take().is_some() {
                    removed[2] = 1;
                }
                pud.pmds_mut();
                let pmds = pud.pmds.as_deref_mut().expect("allocated above");
                match pmds.get(i) {
                    Pmd::Leaf { private: kind } => {
                        pmds.set(i, Pmd::Leaf { private });
                        return Ok((kind != private, removed));
                    }
                    Pmd::Table => {
                        let count = pmds.pte(i).count();
                        removed[0] = u64::from(count);
                        pud.leaves_4k -= count;
                    }
                    Pmd::Full { .. } => {
                        removed[0] = PTRS as u64;
                        pud.leaves_4k -= PTRS as u32;
                    }
                    Pmd::None => {}
                }
                pmds.set(i, Pmd::Leaf { private });
            }
            _ => {
                if pud.huge.take().is_some() {
                    removed[2] = 1;
                }
                if pud.full == Some(private) {
                    // Already mapped by a 4K leaf of this kind: spurious.
                    return Ok((false, removed));
                }
                pud.pmds_mut();
                let pmds = pud.pmds.as_deref_mut().expect("allocated above");
                match pmds.get(i) {
                    Pmd::Table => {}
                    Pmd::Full { private: kind } => {
                        if kind == private {
                            return Ok((false, removed));
                        }
                    }
                    Pmd::Leaf { .. } => {
                        removed[1] = 1;
                        pmds.set_table(i, Pte::empty());
                    }
                    Pmd::None => pmds.set_table(i, Pte::empty()),
                }
                let t = pmds.table_mut(i);
                let bit = gfn as usize % PTRS;
                if let (true, kind) = t.bit(bit) {
                    t.set(bit, private);
                    return Ok((kind != private, removed));
                }
                t.set(bit, private);
                pud.leaves_4k += 1;
            }
        }
        for (c, r) in self.counts.iter_mut().zip(removed) {
            *c -= r;
        }
        self.counts[(level - 1) as usize] += 1;
        Ok((true, removed))
    }

    /// Runs `f` on every PUD of the 1G frames `[f0, f1]` that exists, and
    /// frees the ones left empty.
    fn for_puds_in(&mut self, f0: u64, f1: u64, mut f: impl FnMut(u64, &mut Pud)) {
        self.puds.for_each_in(f0, f1, |frame, p| {
            f(frame, p);
            !p.is_empty()
        });
    }

    fn zap_kinds(&mut self, start: u64, end: u64, kinds: Kinds) -> LevelCounts {
        let mut removed = [0u64; 3];
        let end = end.min(GFN_LIMIT);
        if start >= end {
            return removed;
        }
        self.for_puds_in(start >> PUD_SHIFT, (end - 1) >> PUD_SHIFT, |frame, pud| {
            let base = frame << PUD_SHIFT;
            let s = start.max(base) - base;
            let e = end.min(base + (1 << PUD_SHIFT)) - base;
            pud.zap(s, e, kinds, &mut removed);
        });
        for (c, r) in self.counts.iter_mut().zip(removed) {
            *c -= r;
        }
        removed
    }

    /// kvm_unmap_gfn_range() on this root: removes every leaf intersecting
    /// `[start, end)`; a huge leaf straddling the range goes whole. Returns
    /// the leaves removed per level.
    pub fn zap(&mut self, start: u64, end: u64) -> Result<LevelCounts, HugepageError> {
        if start >= end {
            return Err(HugepageError::RangeOutsideSlot { start, end });
        }
        Ok(self.zap_kinds(start, end, Kinds::Both))
    }

    /// [`Self::zap`] limited to the leaves of the kinds in `attr_filter`
    /// (KVM_FILTER_SHARED / KVM_FILTER_PRIVATE): the TDP MMU walks only the
    /// roots the filter names (kvm_tdp_mmu_unmap_gfn_range with
    /// kvm_gfn_range.attr_filter). Both kinds is [`Self::zap`].
    pub fn zap_filtered(
        &mut self,
        start: u64,
        end: u64,
        attr_filter: u64,
    ) -> Result<LevelCounts, HugepageError> {
        if start >= end {
            return Err(HugepageError::RangeOutsideSlot { start, end });
        }
        let kinds = match (
            attr_filter & KVM_FILTER_SHARED != 0,
            attr_filter & KVM_FILTER_PRIVATE != 0,
        ) {
            (true, true) => Kinds::Both,
            (true, false) => Kinds::Shared,
            (false, true) => Kinds::Private,
            (false, false) => return Ok([0; 3]),
        };
        Ok(self.zap_kinds(start, end, kinds))
    }

    /// kvm_tdp_mmu_try_split_huge_pages() down to 4K: every 2M and 1G leaf
    /// intersecting `[start, end)` becomes the 4K leaves mapping the same
    /// gfns, of the same kind (the translation is unchanged, so no flush).
    /// Returns the huge leaves split per level (the 4K count is always 0).
    pub fn split_huge_pages(&mut self, start: u64, end: u64) -> Result<LevelCounts, HugepageError> {
        if start >= end {
            return Err(HugepageError::RangeOutsideSlot { start, end });
        }
        let mut split = [0u64; 3];
        let end = end.min(GFN_LIMIT);
        if start >= end {
            return Ok(split);
        }
        self.for_puds_in(start >> PUD_SHIFT, (end - 1) >> PUD_SHIFT, |frame, pud| {
            if let Some(private) = pud.huge.take() {
                split[2] += 1;
                pud.full = Some(private);
                pud.leaves_4k = (PTRS * PTRS) as u32;
                return;
            }
            let Some(pmds) = pud.pmds.as_deref_mut() else {
                return;
            };
            let base = frame << PUD_SHIFT;
            let s = start.max(base) - base;
            let e = end.min(base + (1 << PUD_SHIFT)) - base;
            for i in (s >> PTE_BITS) as usize..=((e - 1) >> PTE_BITS) as usize {
                if let Pmd::Leaf { private } = pmds.get(i) {
                    pmds.set(i, Pmd::Full { private });
                    pud.leaves_4k += PTRS as u32;
                    split[1] += 1;
                }
            }
        });
        self.counts[0] += (split[1] + split[2] * PTRS as u64) * PTRS as u64;
        self.counts[1] -= split[1];
        self.counts[2] -= split[2];
        Ok(split)
    }

    /// Removes every leaf (kvm_mmu_zap_all_fast on this root).
    pub fn zap_all(&mut self) -> LevelCounts {
        self.puds.clear();
        std::mem::take(&mut self.counts)
    }

    /// Live leaves per level.
    pub fn counts(&self) -> LevelCounts {
        self.counts
    }

    /// The leaves of `level` as runs of frame numbers (`gfn >> shift`), in
    /// order.
    pub fn frame_runs(&self, level: u8) -> Result<Vec<(u64, u64)>, HugepageError> {
        check_level(level)?;
        let mut frames: Vec<(u64, &Pud)> = self.puds.iter().collect();
        frames.sort_unstable_by_key(|&(frame, _)| frame);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |s: u64, e: u64| match out.last_mut() {
            Some((_, last)) if *last == s => *last = e,
            _ => out.push((s, e)),
        };
        for (frame, pud) in frames {
            match level {
                PG_LEVEL_1G => {
                    if pud.huge.is_some() {
                        push(frame, frame + 1);
                    }
                }
                PG_LEVEL_2M => {
                    let Some(pmds) = pud.pmds.as_deref() else {
                        continue;
                    };
                    for i in 0..PTRS {
                        if let Pmd::Leaf { .. } = pmds.get(i) {
                            let f = (frame << PTE_BITS) + i as u64;
                            push(f, f + 1);
                        }
                    }
                }
                _ => {
                    if pud.full.is_some() {
                        push(frame << PUD_SHIFT, (frame + 1) << PUD_SHIFT);
                    }
                    let Some(pmds) = pud.pmds.as_deref() else {
                        continue;
                    };
                    for i in 0..PTRS {
                        let table = (frame << PUD_SHIFT) + ((i as u64) << PTE_BITS);
                        let t = match pmds.get(i) {
                            Pmd::Table => pmds.pte(i),
                            Pmd::Full { .. } => {
                                push(table, table + PTRS as u64);
                                continue;
                            }
                            _ => continue,
                        };
                        for (w, &[bits, _]) in t.words.iter().enumerate() {
                            let mut bits = bits;
                            let mut at = 0u32;
                            while bits != 0 {
                                let zeros = bits.trailing_zeros();
                                bits = bits.checked_shr(zeros).unwrap_or(0);
                                at += zeros;
                                let ones = (!bits).trailing_zeros();
                                let g = table + (w as u64) * 64 + u64::from(at);
                                push(g, g + u64::from(ones));
                                bits = bits.checked_shr(ones).unwrap_or(0);
                                at += ones;
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The leaves of `level` as runs of gfns `[start, end)`.
    pub fn runs(&self, level: u8) -> Result<Vec<(u64, u64)>, HugepageError> {
        let s = crate::hugepage::hpage_gfn_shift(level.clamp(PG_LEVEL_4K, PG_LEVEL_1G));
        Ok(self
            .frame_runs(level)?
            .into_iter()
            .map(|(a, b)| (a << s, b << s))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const M2: u64 = 512;
    const G1: u64 = 512 * 512;

    #[test]
    fn split_huge_pages_keeps_every_gfn_mapped() {
        let mut m = TdpPageTable::new();
        m.map(0, PG_LEVEL_1G, false).unwrap();
        m.map(G1 + M2, PG_LEVEL_2M, false).unwrap();
        m.map(G1 + 5 * M2, PG_LEVEL_2M, false).unwrap();
        m.map(G1 + 7, PG_LEVEL_4K, false).unwrap();
        m.map(3 * G1, PG_LEVEL_1G, false).unwrap();
        // Touches the first 1G leaf and the first 2M leaf only.
        assert_eq!(m.split_huge_pages(G1 - 1, G1 + M2 + 1), Ok([0, 1, 1]));
        assert_eq!(m.counts(), [G1 + M2 + 1, 1, 1]);
        assert_eq!(
            m.runs(PG_LEVEL_4K).unwrap(),
            vec![(0, G1), (G1 + 7, G1 + 8), (G1 + M2, G1 + 2 * M2)]
        );
        assert_eq!(m.mapped_level(G1 + 5 * M2), Some(PG_LEVEL_2M));
        assert_eq!(m.split_huge_pages(0, u64::MAX >> 12), Ok([0, 1, 1]));
        assert_eq!(m.counts(), [2 * G1 + 2 * M2 + 1, 0, 0]);
        assert!(m.split_huge_pages(5, 5).is_err());
    }

    #[test]
    fn map_and_zap() {
        let mut m = TdpPageTable::new();
        assert_eq!(m.map(5, 1, false).unwrap(), (true, [0, 0, 0]));
        assert_eq!(m.map(5, 1, false).unwrap(), (false, [0, 0, 0]));
        assert!(m.map(600, 1, false).unwrap().0);
        assert_eq!(m.mapped_level(5), Some(1));
        // A 2M leaf over 4K leaves replaces them.
        assert_eq!(m.map(7, 2, false).unwrap(), (true, [1, 0, 0]));
        assert_eq!(m.counts(), [1, 1, 0]);
        assert_eq!(m.mapped_level(0), Some(2));
        // A zap of one page inside the 2M leaf removes it whole.
        assert_eq!(m.zap(100, 101).unwrap(), [0, 1, 0]);
        assert_eq!(m.counts(), [1, 0, 0]);
        assert_eq!(m.map(G1 + 3, 3, false).unwrap(), (true, [0, 0, 0]));
        // A 4K fault under a 1G leaf splits it (zaps the 1G leaf).
        assert_eq!(m.map(G1 + 3, 1, false).unwrap(), (true, [0, 0, 1]));
        assert_eq!(m.runs(1).unwrap(), vec![(600, 601), (G1 + 3, G1 + 4)]);
        assert_eq!(m.zap_all(), [2, 0, 0]);
        assert!(m.zap(3, 3).is_err());
        assert!(m.map(0, 4, false).is_err());
        // The last page of the gpa space; nothing beyond.
        assert!(m.map(GFN_LIMIT - 1, 1, false).unwrap().0);
        assert!(m.map(GFN_LIMIT - 1, 3, false).unwrap().0);
        assert_eq!(m.runs(3).unwrap(), vec![(GFN_LIMIT - G1, GFN_LIMIT)]);
        assert_eq!(m.zap(u64::MAX - 1, u64::MAX).unwrap(), [0, 0, 0]);
        assert_eq!(m.zap(GFN_LIMIT - 1, u64::MAX).unwrap(), [0, 0, 1]);
        assert_eq!(
            m.map(GFN_LIMIT, 1, false),
            Err(HugepageError::GfnBeyondGpaSpace { gfn: GFN_LIMIT })
        );
        assert!(m.map(u64::MAX, 1, false).is_err());
        assert_eq!(m.mapped_level(u64::MAX), None);
    }

    #[test]
    fn memory_follows_what_is_mapped_below_1g() {
        // A host's worth of 1G leaves, split for dirty logging: no 2M
        // tables until something below 1G changes.
        let mut m = TdpPageTable::new();
        for f in 0..4096u64 {
            m.map(f * G1, PG_LEVEL_1G, f % 2 == 0).unwrap();
        }
        assert!(m.puds.values().all(|p| p.pmds.is_none()));
        assert_eq!(m.split_huge_pages(0, 4096 * G1), Ok([0, 0, 4096]));
        assert_eq!(m.counts(), [4096 * G1, 0, 0]);
        assert!(m.puds.values().all(|p| p.pmds.is_none()));
        assert_eq!(m.mapped_private(5), Some(true));
        // One 4K change spells out one frame's 2M entries and one table.
        assert_eq!(m.map(G1 + 7, PG_LEVEL_4K, true).unwrap(), (true, [0, 0, 0]));
        assert_eq!(m.puds.values().filter(|p| p.pmds.is_some()).count(), 1);
        let pmds = m.puds.get(1).unwrap().pmds.as_deref().unwrap();
        assert_eq!((0..PTRS).filter(|&i| pmds.get(i) == Pmd::Table).count(), 1);
        // The other 511 stay full tables, without bitmaps.
        assert_eq!(pmds.ptes.len(), 1);
        assert_eq!(m.zap(G1 + 512, G1 + 1024).unwrap(), [512, 0, 0]);
        assert_eq!(m.counts(), [4096 * G1 - 512, 0, 0]);
        assert_eq!(
            m.runs(PG_LEVEL_4K).unwrap(),
            vec![(0, G1 + 512), (G1 + 1024, 4096 * G1)]
        );
    }

    #[test]
    fn table_bytes_follow_the_tables() {
        let mut m = TdpPageTable::new();
        assert_eq!(m.table_bytes(), 0);
        m.map(G1, PG_LEVEL_1G, false).unwrap(); // a 1G leaf: no table below
        assert_eq!(m.table_bytes(), 0);
        m.map(5, PG_LEVEL_4K, true).unwrap(); // a 2M table and a 4K table
        let one = std::mem::size_of::<PmdTable>() + std::mem::size_of::<Pte>();
        assert_eq!(m.table_bytes(), one);
        m.map(M2 + 1, PG_LEVEL_4K, true).unwrap(); // a second 4K table
        assert_eq!(m.table_bytes(), one + std::mem::size_of::<Pte>());
        // A 2M leaf over the first table, then a zap of the second's only
        // leaf: each frees its table's bitmaps while the PUD lives on.
        m.map(0, PG_LEVEL_2M, true).unwrap();
        assert_eq!(m.table_bytes(), one);
        m.zap(M2 + 1, M2 + 2).unwrap();
        assert_eq!(m.table_bytes(), std::mem::size_of::<PmdTable>());
        m.zap(0, 2 * M2).unwrap();
        assert_eq!(m.table_bytes(), 0);
    }

    #[test]
    fn empty_tables_are_freed() {
        let mut m = TdpPageTable::new();
        m.map(5, PG_LEVEL_4K, true).unwrap();
        m.map(G1 + 600, PG_LEVEL_2M, false).unwrap();
        assert_eq!(m.puds.len(), 2);
        assert_eq!(
            m.zap_filtered(0, 2 * G1, KVM_FILTER_SHARED).unwrap(),
            [0, 1, 0]
        );
        assert_eq!(m.puds.len(), 1);
        assert_eq!(m.zap(0, 1).unwrap(), [0, 0, 0]);
        assert_eq!(m.zap(5, 6).unwrap(), [1, 0, 0]);
        assert!(m.puds.is_empty());
        assert_eq!(m, TdpPageTable::new());
    }

    // --- against a per-gfn oracle --------------------------------------------

    /// The oracle: for each mapped gfn, the leaf that maps it as (level,
    /// frame, private). Every rule restated over single gfns, in a span
    /// small enough to enumerate.
    #[derive(Default)]
    struct Oracle {
        gfns: BTreeMap<u64, (u8, u64, bool)>,
    }

    impl Oracle {
        fn leaf_gfns(level: u8, frame: u64) -> std::ops::Range<u64> {
            let s = (level as u32 - 1) * 9;
            (frame << s)..((frame + 1) << s)
        }

        /// The distinct leaves (level, frame) that map any gfn of [s, e).
        fn leaves_in(&self, s: u64, e: u64) -> Vec<(u8, u64, bool)> {
            let mut v: Vec<_> = self.gfns.range(s..e).map(|(_, &l)| l).collect();
            v.sort_unstable();
            v.dedup();
            v
        }

        fn remove_leaf(&mut self, level: u8, frame: u64, removed: &mut LevelCounts) {
            for g in Self::leaf_gfns(level, frame) {
                self.gfns.remove(&g);
            }
            removed[(level - 1) as usize] += 1;
        }

        fn map(&mut self, gfn: u64, level: u8, private: bool) -> (bool, LevelCounts) {
            let frame = gfn >> ((level as u32 - 1) * 9);
            let mut removed = [0; 3];
            let r = Self::leaf_gfns(level, frame);
            match self.gfns.get(&gfn) {
                Some(&(l, f, p)) if l == level && f == frame => {
                    for g in r {
                        self.gfns.insert(g, (level, frame, private));
                    }
                    return (p != private, removed);
                }
                _ => {}
            }
            for (l, f, _) in self.leaves_in(r.start, r.end) {
                self.remove_leaf(l, f, &mut removed);
            }
            // A bigger leaf covering gfn that does not lie inside r.
            if let Some(&(l, f, _)) = self.gfns.get(&gfn) {
                self.remove_leaf(l, f, &mut removed);
            }
            for g in r {
                self.gfns.insert(g, (level, frame, private));
            }
            (true, removed)
        }

        fn zap(&mut self, s: u64, e: u64, kinds: Kinds) -> LevelCounts {
            let mut removed = [0; 3];
            for (l, f, p) in self.leaves_in(s, e) {
                if kinds.matches(p) {
                    self.remove_leaf(l, f, &mut removed);
                }
            }
            removed
        }

        fn split(&mut self, s: u64, e: u64) -> LevelCounts {
            let mut split = [0; 3];
            for (l, f, p) in self.leaves_in(s, e) {
                if l > PG_LEVEL_4K {
                    split[(l - 1) as usize] += 1;
                    for g in Self::leaf_gfns(l, f) {
                        self.gfns.insert(g, (PG_LEVEL_4K, g, p));
                    }
                }
            }
            split
        }

        fn counts(&self) -> LevelCounts {
            let mut c = [0; 3];
            let mut leaves: Vec<_> = self.gfns.values().map(|&(l, f, _)| (l, f)).collect();
            leaves.dedup();
            for (l, _) in leaves {
                c[(l - 1) as usize] += 1;
            }
            c
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Map(u64, u8, bool),
        Zap(u64, u64, u8),
        Split(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Two 1G frames, so 1G leaves, whole-frame zaps and both PUD walks
        // (by range and by entry) all happen.
        let span = 2 * G1;
        prop_oneof![
            4 => (0..span, prop_oneof![4 => Just(1u8), 2 => Just(2u8), 1 => Just(3u8)], any::<bool>())
                .prop_map(|(g, l, p)| Op::Map(g, l, p)),
            2 => (0..span, prop_oneof![1u64..4, 1u64..1100, Just(G1), 1u64..span], 0u8..4)
                .prop_map(|(s, n, f)| Op::Zap(s, s + n, f)),
            1 => (0..span, 1u64..G1).prop_map(|(s, n)| Op::Split(s, s + n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn equals_a_per_gfn_oracle(ops in proptest::collection::vec(op(), 1..40)) {
            let mut m = TdpPageTable::new();
            let mut o = Oracle::default();
            for op in ops {
                // A prefetch hint changes nothing the oracle would see,
                // on any table shape and any gfn (even past the limit).
                let (Op::Map(g, ..) | Op::Zap(g, ..) | Op::Split(g, ..)) = op;
                m.prefetch(g);
                m.prefetch(g.wrapping_mul(0x9E37_79B9));
                match op {
                    Op::Map(g, l, p) => prop_assert_eq!(m.map(g, l, p).unwrap(), o.map(g, l, p)),
                    Op::Zap(s, e, f) => {
                        let kinds = match f {
                            0 => Kinds::Both,
                            1 => Kinds::Shared,
                            2 => Kinds::Private,
                            _ => {
                                prop_assert_eq!(m.zap_filtered(s, e, 0).unwrap(), [0; 3]);
                                continue;
                            }
                        };
                        let filter = match kinds {
                            Kinds::Both => KVM_FILTER_SHARED | KVM_FILTER_PRIVATE,
                            Kinds::Shared => KVM_FILTER_SHARED,
                            Kinds::Private => KVM_FILTER_PRIVATE,
                        };
                        prop_assert_eq!(m.zap_filtered(s, e, filter).unwrap(), o.zap(s, e, kinds));
                    }
                    Op::Split(s, e) => prop_assert_eq!(m.split_huge_pages(s, e).unwrap(), o.split(s, e)),
                }
                prop_assert_eq!(m.counts(), o.counts());
            }
            // Every gfn answers like the oracle, and the runs agree.
            for g in (0..2 * G1).step_by(97).chain([0, M2 - 1, M2, G1 - 1, G1, 2 * G1 - 1]) {
                let want = o.gfns.get(&g).map(|&(l, _, p)| (l, p));
                prop_assert_eq!(m.leaf(g), want, "gfn {:#x}", g);
            }
            for level in 1..=3u8 {
                let mut want: Vec<(u64, u64)> = Vec::new();
                let mut leaves: Vec<u64> = o.gfns.values().filter(|v| v.0 == level).map(|v| v.1).collect();
                leaves.dedup();
                for f in leaves {
                    match want.last_mut() {
                        Some((_, e)) if *e == f => *e = f + 1,
                        _ => want.push((f, f + 1)),
                    }
                }
                prop_assert_eq!(m.frame_runs(level).unwrap(), want);
            }
        }
    }

    /// A 2M leaf mapped over a 4K table removes the table's leaves, and the
    /// count comes from the table's bits. The proptest's random gfns rarely
    /// put a 2M map over a table that holds leaves, so this is spelt out.
    #[test]
    fn a_2m_leaf_over_a_table_counts_the_4k_leaves_it_removes() {
        let (mut m, mut o) = (TdpPageTable::new(), Oracle::default());
        let steps = [
            (5, PG_LEVEL_4K, true),
            (7, PG_LEVEL_4K, false),
            (300, PG_LEVEL_4K, true),
            (0, PG_LEVEL_2M, true),
            (M2 + 3, PG_LEVEL_4K, false),
            (M2, PG_LEVEL_2M, false),
        ];
        for (g, l, p) in steps {
            assert_eq!(m.map(g, l, p).unwrap(), o.map(g, l, p), "map {g:#x} at {l}");
            assert_eq!(m.counts(), o.counts());
        }
        assert_eq!(m.counts(), [0, 2, 0]);
    }

    #[test]
    fn untracked_kinds_count_every_leaf_as_shared() {
        let mut m = TdpPageTable::without_kinds();
        m.map(3, PG_LEVEL_4K, true).unwrap();
        assert_eq!(m.mapped_private(3), Some(false));
        // The same leaf from a "private" fault is spurious here.
        assert_eq!(m.map(3, PG_LEVEL_4K, true).unwrap(), (false, [0; 3]));
        assert_eq!(m.zap_filtered(0, 8, KVM_FILTER_PRIVATE).unwrap(), [0; 3]);
        assert_eq!(m.zap_filtered(0, 8, KVM_FILTER_SHARED).unwrap(), [1, 0, 0]);
    }
}
