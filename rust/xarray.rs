//! A per-page model of the kernel's xarray (lib/xarray.c), as KVM uses it for
//! `kvm->mem_attr_array`: one value entry per gfn in a radix tree of 64-slot
//! nodes.
//!
//! This is the baseline the range store is measured against, so it takes no
//! range shortcuts: setting N pages stores N entries, each with its own walk
//! from the root (KVM calls `xa_store()` once per gfn), and queries visit
//! every present entry. The tree's shape follows the kernel's rules:
//! a lone entry at index 0 lives in the head without a node, the tree grows
//! by adding roots on top (`xas_expand`), nodes are allocated on the way down
//! (`xas_create`), a node is freed as soon as it is empty
//! (`xas_delete_node`), and the root collapses while only its slot 0 is used
//! (`xas_shrink`). Reserved entries (`XA_ZERO_ENTRY`, from `xa_reserve`) pin
//! their nodes but read as 0.

use crate::store::{check_range, AttrStore, StoreError};

/// `XA_CHUNK_SHIFT` (CONFIG_BASE_SMALL=n): 64 slots per node.
pub const XA_CHUNK_SHIFT: u32 = 6;
/// `XA_CHUNK_SIZE`.
pub const XA_CHUNK_SIZE: usize = 1 << XA_CHUNK_SHIFT;
const XA_CHUNK_MASK: u64 = XA_CHUNK_SIZE as u64 - 1;
/// `sizeof(struct xa_node)` on 64-bit: 4 bytes of shift/offset/count/
/// nr_values padded to 8, parent and array pointers, a 16-byte list/rcu
/// union, 64 slot pointers and 3 mark bitmaps of 64 bits: 576 bytes, the
/// object size of the kernel's `radix_tree_node` slab cache.
pub const XA_NODE_BYTES: usize = 576;
/// `sizeof(struct xarray)`: spinlock, gfp flags and the head pointer.
pub const XARRAY_BYTES: usize = 16;

const NO_NODE: u32 = u32::MAX;

/// One `struct xa_node`. The kernel tags each slot pointer; here the kind of
/// each slot is kept in two bitmaps instead, so a full u64 fits in a value
/// entry. `present` has a bit per non-NULL slot (`count` is its popcount);
/// in a leaf, `values` marks value entries (`nr_values`) and a present slot
/// that is not a value is a reserved `XA_ZERO_ENTRY`. In an interior node
/// every present slot holds a child node index.
#[derive(Clone)]
struct Node {
    shift: u8,
    offset: u8,
    parent: u32,
    present: u64,
    values: u64,
    slots: [u64; XA_CHUNK_SIZE],
}

/// What `xa_head` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    Empty,
    /// A value entry for index 0, stored without a node.
    Value(u64),
    /// A reserved entry for index 0, stored without a node.
    Zero,
    Node(u32),
}

/// What to store at an index.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    Value(u64),
    Zero,
}

/// The per-page attribute store: see the module documentation.
#[derive(Clone)]
pub struct XArray {
    head: Head,
    nodes: Vec<Node>,
    free_ids: Vec<u32>,
    live_nodes: usize,
    nr_values: u64,
    nr_zero: u64,
}

impl Default for XArray {
    fn default() -> Self {
        Self::new()
    }
}

/// Largest index a tree whose root has `shift` can hold (`max_index()`).
#[inline]
fn node_max_index(shift: u8) -> u64 {
    let bits = shift as u32 + XA_CHUNK_SHIFT;
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// An upper bound on the nodes a store of non-NULL entries into
/// `[start, end)` allocates, whatever the tree holds: every block of every
/// level the range meets, and the roots an expansion adds.
pub fn worst_case_nodes(start: u64, end: u64) -> u64 {
    let leaves = (end - start) / XA_CHUNK_SIZE as u64 + 2;
    leaves + leaves / 63 + 12
}

/// Nodes the model can name (u32 ids): some 2.47 TB of 576-byte nodes, more
/// than any host has.
pub const MAX_NODES: u64 = NO_NODE as u64;

#[inline]
fn slot_of(index: u64, shift: u8) -> usize {
    ((index >> shift) & XA_CHUNK_MASK) as usize
}

impl XArray {
    pub fn new() -> Self {
        XArray {
            head: Head::Empty,
            nodes: Vec::new(),
            free_ids: Vec::new(),
            live_nodes: 0,
            nr_values: 0,
            nr_zero: 0,
        }
    }

    /// Nodes currently allocated (each counted at `XA_NODE_BYTES`).
    pub fn node_count(&self) -> usize {
        self.live_nodes
    }

    /// Entries reserved by `reserve` and not stored since.
    pub fn reserved_count(&self) -> u64 {
        self.nr_zero
    }

    /// Height of the tree: 0 for an empty array or an entry in the head.
    pub fn height(&self) -> u32 {
        match self.head {
            Head::Node(n) => self.nodes[n as usize].shift as u32 / XA_CHUNK_SHIFT + 1,
            _ => 0,
        }
    }

    fn max_index(&self) -> u64 {
        match self.head {
            Head::Node(n) => node_max_index(self.nodes[n as usize].shift),
            _ => 0,
        }
    }

    fn alloc_node(&mut self, shift: u8, parent: u32, offset: u8) -> u32 {
        let node = Node {
            shift,
            offset,
            parent,
            present: 0,
            values: 0,
            slots: [0; XA_CHUNK_SIZE],
        };
        self.live_nodes += 1;
        if let Some(id) = self.free_ids.pop() {
            self.nodes[id as usize] = node;
            id
        } else {
            // Fits: `check_node_ids` keeps the arena below u32::MAX nodes.
            let id = self.nodes.len() as u32;
            self.nodes.push(node);
            id
        }
    }

    fn free_node(&mut self, id: u32) {
        self.live_nodes -= 1;
        if self.live_nodes == 0 {
            // Nothing left: give the arena back instead of keeping a free list.
            self.nodes.clear();
            self.free_ids.clear();
        } else if self.free_ids.try_reserve(1).is_ok() {
            self.free_ids.push(id);
        }
        // else: the slot stays unused in the arena rather than aborting.
    }

    /// Makes sure a store of non-NULL entries into `[start, end)` can get
    /// every node it may allocate, before anything changes: the nodes it
    /// could need (counted exactly from the tree, plus the roots an
    /// expansion may add) must fit the u32 node ids, and the arena is grown
    /// with a fallible reservation, so running out of memory is an
    /// `OutOfMemory` error instead of an abort half way. `limit` is only
    /// quoted in the error, when the need is beyond it.
    fn prepare_nodes(
        &mut self,
        start: u64,
        end: u64,
        limit: Option<usize>,
    ) -> Result<(), StoreError> {
        let spare = (self.nodes.capacity() - self.nodes.len() + self.free_ids.len()) as u64;
        let bytes_now = self.memory_bytes();
        let oom = move |nodes: u64| {
            let needed = usize::try_from(nodes.saturating_mul(XA_NODE_BYTES as u64))
                .unwrap_or(usize::MAX)
                .saturating_add(bytes_now);
            StoreError::OutOfMemory {
                needed,
                limit: limit.filter(|&l| needed > l),
            }
        };
        // Cheap bound first: every block of every level the range meets.
        if worst_case_nodes(start, end) <= spare {
            return Ok(());
        }
        let missing = self.missing_nodes(start, end);
        if missing <= spare {
            return Ok(());
        }
        let room = (NO_NODE as u64).saturating_sub(self.nodes.len() as u64);
        if missing > room {
            return Err(oom(missing));
        }
        let extra = (missing - spare) as usize;
        let node_size = std::mem::size_of::<Node>() as u64;
        if !crate::hostmem::could_back((extra as u64).saturating_mul(node_size)) {
            return Err(oom(missing));
        }
        self.nodes.try_reserve(extra).map_err(|_| oom(missing))?;
        // `free_node` pushes ids back; keep room for them too, so freeing
        // never needs an allocation that could fail.
        let want_free = self.nodes.capacity();
        let _ = self
            .free_ids
            .try_reserve(want_free.saturating_sub(self.free_ids.len()));
        Ok(())
    }

    /// Nodes a store of non-NULL entries at every index of `[start, end)`
    /// would allocate: at each level, the blocks the range meets minus the
    /// nodes already there, plus the 11 an expansion of the head may add
    /// outside the range. Costs one visit per existing node in the range.
    fn missing_nodes(&self, start: u64, end: u64) -> u64 {
        let last = end - 1;
        let mut existing = [0u64; 12];
        if let Head::Node(root) = self.head {
            self.count_nodes(root, 0, start, last, &mut existing);
        }
        let mut missing = 11u64;
        let mut level = 0usize;
        loop {
            let shift = XA_CHUNK_SHIFT * (level as u32 + 1);
            let (a, b) = if shift >= 64 {
                (0, 0)
            } else {
                (start >> shift, last >> shift)
            };
            missing += (b - a + 1).saturating_sub(existing[level]);
            if b == 0 || level == 11 {
                // One node at this level covers the range: it is the root.
                break;
            }
            level += 1;
        }
        missing
    }

    fn count_nodes(&self, id: u32, base: u64, first: u64, last: u64, out: &mut [u64; 12]) {
        let node = &self.nodes[id as usize];
        let span_last = base.saturating_add(node_max_index(node.shift));
        if first > span_last || last < base {
            return;
        }
        out[(node.shift as u32 / XA_CHUNK_SHIFT) as usize] += 1;
        if node.shift == 0 {
            return;
        }
        let mut bits = node.present;
        while bits != 0 {
            let off = bits.trailing_zeros();
            bits &= bits - 1;
            let child_base = base + ((off as u64) << node.shift);
            self.count_nodes(
                node.slots[off as usize] as u32,
                child_base,
                first,
                last,
                out,
            );
        }
    }

    /// Puts `[start, stop)` back as `snapshot` (runs of the entries that
    /// were present, reserved ones as None) had it; every index there holds
    /// a value now, so this allocates no node.
    fn restore(&mut self, start: u64, stop: u64, snapshot: &[(u64, u64, Option<u64>)]) {
        let mut runs = snapshot.iter().peekable();
        for index in start..stop {
            while runs.peek().is_some_and(|r| r.1 <= index) {
                runs.next();
            }
            match runs.peek() {
                Some(&&(a, _, entry)) if a <= index => {
                    self.store_entry(index, entry.map_or(Entry::Zero, Entry::Value));
                }
                _ => {
                    self.erase_entry(index);
                }
            }
        }
    }

    /// Erases every present entry of `[start, end)`, visiting only present
    /// entries (empty subtrees are skipped, so erasing a huge empty range
    /// costs nothing). Collects a bounded batch at a time.
    fn erase_range(&mut self, start: u64, end: u64) {
        const BATCH: usize = 4096;
        let mut from = start;
        let mut batch: Vec<u64> = Vec::with_capacity(BATCH);
        loop {
            batch.clear();
            self.walk(from, end, &mut |index, _| {
                batch.push(index);
                batch.len() < BATCH
            });
            for &index in &batch {
                self.erase_entry(index);
            }
            match batch.last() {
                Some(&l) if batch.len() == BATCH && l + 1 < end => from = l + 1,
                _ => break,
            }
        }
    }

    /// `xa_load()`: reserved entries read as 0, like NULL.
    #[inline]
    pub fn load(&self, index: u64) -> u64 {
        let mut id = match self.head {
            Head::Node(n) => n,
            Head::Value(v) => return if index == 0 { v } else { 0 },
            Head::Empty | Head::Zero => return 0,
        };
        let root = &self.nodes[id as usize];
        if index > node_max_index(root.shift) {
            return 0;
        }
        loop {
            let node = &self.nodes[id as usize];
            let off = slot_of(index, node.shift);
            if node.present & (1u64 << off) == 0 {
                return 0;
            }
            if node.shift == 0 {
                return if node.values & (1u64 << off) != 0 {
                    node.slots[off]
                } else {
                    0
                };
            }
            id = node.slots[off] as u32;
        }
    }

    /// What is stored at `index` without the NULL conversion: None for
    /// NULL, Some(None) for a reserved entry, Some(Some(v)) for a value.
    fn raw_entry(&self, index: u64) -> Option<Option<u64>> {
        let mut id = match self.head {
            Head::Node(n) => n,
            Head::Value(v) => return (index == 0).then_some(Some(v)),
            Head::Zero => return (index == 0).then_some(None),
            Head::Empty => return None,
        };
        if index > self.max_index() {
            return None;
        }
        loop {
            let node = &self.nodes[id as usize];
            let off = slot_of(index, node.shift);
            if node.present & (1u64 << off) == 0 {
                return None;
            }
            if node.shift == 0 {
                return Some((node.values & (1u64 << off) != 0).then_some(node.slots[off]));
            }
            id = node.slots[off] as u32;
        }
    }

    /// `xas_expand()`: adds roots on top until `index` fits. Returns the
    /// shift one above the root (the shift `xas_create` starts from).
    fn expand(&mut self, index: u64) -> u32 {
        let mut shift: u32;
        match self.head {
            Head::Empty => {
                if index == 0 {
                    return 0;
                }
                shift = 0;
                while (index >> shift) >= XA_CHUNK_SIZE as u64 {
                    shift += XA_CHUNK_SHIFT;
                }
                return shift + XA_CHUNK_SHIFT;
            }
            Head::Node(n) => shift = self.nodes[n as usize].shift as u32 + XA_CHUNK_SHIFT,
            Head::Value(_) | Head::Zero => shift = 0,
        }
        while index > self.max_index() {
            let old = self.head;
            let id = self.alloc_node(shift as u8, NO_NODE, 0);
            let node = &mut self.nodes[id as usize];
            node.present = 1;
            match old {
                Head::Value(v) => {
                    node.values = 1;
                    node.slots[0] = v;
                }
                Head::Zero => {}
                Head::Node(child) => {
                    node.slots[0] = child as u64;
                    let c = &mut self.nodes[child as usize];
                    c.parent = id;
                    c.offset = 0;
                }
                Head::Empty => unreachable!("expand never wraps an empty head"),
            }
            self.head = Head::Node(id);
            shift += XA_CHUNK_SHIFT;
        }
        shift
    }

    /// `xas_store()` of a non-NULL entry: expand, create the path, store.
    /// Returns what the slot held (None: NULL).
    fn store_entry(&mut self, index: u64, entry: Entry) -> Option<Entry> {
        let mut shift = self.expand(index);
        if shift == 0 {
            // Index 0 with no node above it: the entry lives in the head.
            let old = old_head_entry(self.head);
            self.account(old, Some(entry));
            self.head = match entry {
                Entry::Value(v) => Head::Value(v),
                Entry::Zero => Head::Zero,
            };
            return old;
        }
        // Descend, allocating missing nodes (`xas_create`).
        let mut id = match self.head {
            Head::Node(n) => n,
            _ => {
                // Empty head and index > 0: the first node is the root.
                shift -= XA_CHUNK_SHIFT;
                let root = self.alloc_node(shift as u8, NO_NODE, 0);
                self.head = Head::Node(root);
                root
            }
        };
        loop {
            let node_shift = self.nodes[id as usize].shift;
            let off = slot_of(index, node_shift);
            if node_shift == 0 {
                let node = &mut self.nodes[id as usize];
                let bit = 1u64 << off;
                let old = if node.present & bit == 0 {
                    None
                } else if node.values & bit != 0 {
                    Some(Entry::Value(node.slots[off]))
                } else {
                    Some(Entry::Zero)
                };
                node.present |= bit;
                match entry {
                    Entry::Value(v) => {
                        node.values |= bit;
                        node.slots[off] = v;
                    }
                    Entry::Zero => {
                        node.values &= !bit;
                        node.slots[off] = 0;
                    }
                }
                self.account(old, Some(entry));
                return old;
            }
            let bit = 1u64 << off;
            if self.nodes[id as usize].present & bit != 0 {
                id = self.nodes[id as usize].slots[off] as u32;
            } else {
                let child = self.alloc_node(node_shift - XA_CHUNK_SHIFT as u8, id, off as u8);
                let node = &mut self.nodes[id as usize];
                node.present |= bit;
                node.slots[off] = child as u64;
                id = child;
            }
        }
    }

    fn account(&mut self, old: Option<Entry>, new: Option<Entry>) {
        match old {
            Some(Entry::Value(_)) => self.nr_values -= 1,
            Some(Entry::Zero) => self.nr_zero -= 1,
            None => {}
        }
        match new {
            Some(Entry::Value(_)) => self.nr_values += 1,
            Some(Entry::Zero) => self.nr_zero += 1,
            None => {}
        }
    }

    /// `xas_store(NULL)`: clears the slot, frees nodes that became empty
    /// on the way up (`xas_delete_node`) and, if that reached the root,
    /// collapses it (`xas_shrink`). Returns what was there.
    fn erase_entry(&mut self, index: u64) -> Option<Entry> {
        let mut id = match self.head {
            Head::Node(n) => n,
            Head::Empty => return None,
            Head::Value(v) => {
                if index != 0 {
                    return None;
                }
                self.head = Head::Empty;
                self.account(Some(Entry::Value(v)), None);
                return Some(Entry::Value(v));
            }
            Head::Zero => {
                if index != 0 {
                    return None;
                }
                self.head = Head::Empty;
                self.account(Some(Entry::Zero), None);
                return Some(Entry::Zero);
            }
        };
        if index > self.max_index() {
            return None;
        }
        loop {
            let node = &self.nodes[id as usize];
            let off = slot_of(index, node.shift);
            if node.present & (1u64 << off) == 0 {
                return None;
            }
            if node.shift == 0 {
                break;
            }
            id = node.slots[off] as u32;
        }
        let off = slot_of(index, 0);
        let bit = 1u64 << off;
        let node = &mut self.nodes[id as usize];
        let old = if node.values & bit != 0 {
            Entry::Value(node.slots[off])
        } else {
            Entry::Zero
        };
        node.present &= !bit;
        node.values &= !bit;
        node.slots[off] = 0;
        self.account(Some(old), None);
        self.delete_node(id);
        Some(old)
    }

    /// `xas_delete_node()`: frees `id` and its ancestors while empty.
    fn delete_node(&mut self, mut id: u32) {
        loop {
            let node = &self.nodes[id as usize];
            if node.present != 0 {
                break;
            }
            let parent = node.parent;
            let offset = node.offset;
            self.free_node(id);
            if parent == NO_NODE {
                self.head = Head::Empty;
                return;
            }
            let p = &mut self.nodes[parent as usize];
            p.present &= !(1u64 << offset);
            p.slots[offset as usize] = 0;
            id = parent;
        }
        if self.nodes[id as usize].parent == NO_NODE {
            self.shrink(id);
        }
    }

    /// `xas_shrink()`: while the root's only entry is in slot 0, replace the
    /// root by that entry (a node, or in a leaf, the index-0 entry).
    fn shrink(&mut self, mut id: u32) {
        loop {
            let node = &self.nodes[id as usize];
            if node.present != 1 {
                break;
            }
            if node.shift == 0 {
                self.head = if node.values & 1 != 0 {
                    Head::Value(node.slots[0])
                } else {
                    Head::Zero
                };
                self.free_node(id);
                break;
            }
            let child = node.slots[0] as u32;
            self.free_node(id);
            let c = &mut self.nodes[child as usize];
            c.parent = NO_NODE;
            c.offset = 0;
            self.head = Head::Node(child);
            id = child;
        }
    }

    /// `xa_store()` for one gfn: a value, or NULL (erase) for 0.
    #[inline]
    pub fn store(&mut self, index: u64, value: u64) {
        if value == 0 {
            self.erase_entry(index);
        } else {
            self.store_entry(index, Entry::Value(value));
        }
    }

    /// `xa_reserve()`: a reserved entry where the slot is NULL. Returns true
    /// if it reserved (the slot was NULL).
    fn reserve_one(&mut self, index: u64) -> bool {
        if self.raw_entry(index).is_some() {
            return false;
        }
        self.store_entry(index, Entry::Zero);
        true
    }

    /// `xa_release()`: drops a reserved entry, leaves anything else.
    fn release_one(&mut self, index: u64) {
        if self.raw_entry(index) == Some(None) {
            self.erase_entry(index);
        }
    }

    /// Visits present entries (reserved ones included, as None) with index in
    /// `[start, end)` in index order, like `xas_find()`/`xas_next_entry()`:
    /// empty slots are skipped, each entry is visited on its own. Stops when
    /// `f` returns false; returns false if it stopped early.
    fn walk(&self, start: u64, end: u64, f: &mut dyn FnMut(u64, Option<u64>) -> bool) -> bool {
        match self.head {
            Head::Empty => true,
            Head::Value(v) => start != 0 || f(0, Some(v)),
            Head::Zero => start != 0 || f(0, None),
            Head::Node(root) => {
                let last = end - 1;
                self.walk_node(root, 0, start, last, f)
            }
        }
    }

    fn walk_node(
        &self,
        id: u32,
        base: u64,
        first: u64,
        last: u64,
        f: &mut dyn FnMut(u64, Option<u64>) -> bool,
    ) -> bool {
        let node = &self.nodes[id as usize];
        let shift = node.shift as u32;
        // Slots whose span [base + (i << shift), ...) meets [first, last].
        let span_last = base.saturating_add(node_max_index(node.shift));
        if first > span_last || last < base {
            return true;
        }
        let lo = if first <= base {
            0
        } else {
            ((first - base) >> shift) as u32
        };
        let hi = if last >= span_last {
            XA_CHUNK_SIZE as u32 - 1
        } else {
            ((last - base) >> shift) as u32
        };
        let mut bits = node.present & (u64::MAX << lo);
        if hi < 63 {
            bits &= (1u64 << (hi + 1)) - 1;
        }
        while bits != 0 {
            let off = bits.trailing_zeros();
            bits &= bits - 1;
            let child_base = base + ((off as u64) << shift);
            if shift == 0 {
                let v = (node.values >> off) & 1 != 0;
                if !f(child_base, v.then_some(node.slots[off as usize])) {
                    return false;
                }
            } else if !self.walk_node(node.slots[off as usize] as u32, child_base, first, last, f) {
                return false;
            }
        }
        true
    }

    /// Consistency check of every kernel invariant, for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut nodes = 0usize;
        let mut values = 0u64;
        let mut zeros = 0u64;
        match self.head {
            Head::Empty => {}
            Head::Value(_) => values += 1,
            Head::Zero => zeros += 1,
            Head::Node(root) => {
                let r = &self.nodes[root as usize];
                if r.parent != NO_NODE {
                    return Err("root has a parent".into());
                }
                let mut stack = vec![root];
                while let Some(id) = stack.pop() {
                    nodes += 1;
                    let n = &self.nodes[id as usize];
                    if n.present == 0 {
                        return Err(format!("empty node {id} not freed"));
                    }
                    if n.shift == 0 {
                        if n.values & !n.present != 0 {
                            return Err("value bit without present bit".into());
                        }
                        values += n.values.count_ones() as u64;
                        zeros += (n.present & !n.values).count_ones() as u64;
                    } else {
                        if n.values != 0 {
                            return Err("value in an interior node".into());
                        }
                        let mut bits = n.present;
                        while bits != 0 {
                            let off = bits.trailing_zeros();
                            bits &= bits - 1;
                            let c = n.slots[off as usize] as u32;
                            let cn = &self.nodes[c as usize];
                            if cn.parent != id || cn.offset as u32 != off {
                                return Err("bad parent link".into());
                            }
                            if cn.shift as u32 + XA_CHUNK_SHIFT != n.shift as u32 {
                                return Err("bad child shift".into());
                            }
                            stack.push(c);
                        }
                    }
                }
            }
        }
        if nodes != self.live_nodes {
            return Err(format!(
                "{nodes} reachable nodes, {} counted",
                self.live_nodes
            ));
        }
        if values != self.nr_values || zeros != self.nr_zero {
            return Err("entry counts out of sync".into());
        }
        Ok(())
    }
}

fn old_head_entry(head: Head) -> Option<Entry> {
    match head {
        Head::Value(v) => Some(Entry::Value(v)),
        Head::Zero => Some(Entry::Zero),
        _ => None,
    }
}

impl AttrStore for XArray {
    fn get(&self, gfn: u64) -> u64 {
        self.load(gfn)
    }

    /// One `xa_store()` per gfn, as `kvm_vm_set_mem_attributes()` does.
    fn set_range(&mut self, start: u64, end: u64, value: u64) -> Result<(), StoreError> {
        check_range(start, end)?;
        if value == 0 {
            self.erase_range(start, end);
            return Ok(());
        }
        self.prepare_nodes(start, end, None)?;
        // A long store can be interrupted: it then puts back what it
        // overwrote, which it notes as it goes (runs of the old present
        // entries) only when it can be interrupted at all.
        let armed = end - start >= crate::interrupt::CHECK_EVERY && crate::interrupt::armed();
        let mut undo: Vec<(u64, u64, Option<u64>)> = Vec::new();
        for index in start..end {
            if armed {
                if crate::interrupt::poll_due(index - start) {
                    self.restore(start, index, &undo);
                    return Err(StoreError::Interrupted);
                }
                if undo.len() == undo.capacity() && undo.try_reserve(undo.len().max(64)).is_err() {
                    self.restore(start, index, &undo);
                    return Err(StoreError::OutOfMemory {
                        needed: undo.len().saturating_mul(2 * 24),
                        limit: None,
                    });
                }
            }
            let old = self.store_entry(index, Entry::Value(value));
            if armed {
                if let Some(old) = old {
                    let e = match old {
                        Entry::Value(v) => Some(v),
                        Entry::Zero => None,
                    };
                    match undo.last_mut() {
                        Some(r) if r.1 == index && r.2 == e => r.1 = index + 1,
                        _ => undo.push((index, index + 1, e)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Like `kvm_range_has_memory_attributes()`: every index in turn must
    /// hold a matching entry; if the wanted bits are 0, absent entries match
    /// too and only present entries need looking at (`xas_find`).
    fn has_value(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<bool, StoreError> {
        check_range(start, end)?;
        let want = value & mask;
        let mut next = start;
        let absent_matches = want == 0;
        let all = self.walk(start, end, &mut |index, entry| {
            if !absent_matches && index != next {
                return false;
            }
            next = index.wrapping_add(1);
            entry.unwrap_or(0) & mask == want
        });
        Ok(all && (absent_matches || next == end))
    }

    fn for_each_run(
        &self,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, u64),
    ) -> Result<(), StoreError> {
        check_range(start, end)?;
        // The run being built: [run_start, pos) with value run_value.
        let mut run_start = start;
        let mut run_value = 0u64;
        let mut pos = start;
        self.walk(start, end, &mut |index, entry| {
            let v = entry.unwrap_or(0);
            if index != pos && run_value != 0 {
                // A gap of absent entries (value 0) ends a non-zero run.
                f(run_start, pos, run_value);
                run_start = pos;
                run_value = 0;
            }
            if v != run_value {
                if index > run_start {
                    f(run_start, index, run_value);
                }
                run_start = index;
                run_value = v;
            }
            pos = index + 1;
            true
        });
        if run_value != 0 && pos != end {
            f(run_start, pos, run_value);
            run_start = pos;
            run_value = 0;
        }
        f(run_start, end, run_value);
        Ok(())
    }

    fn memory_bytes(&self) -> usize {
        XARRAY_BYTES + self.live_nodes * XA_NODE_BYTES
    }

    fn entry_count(&self) -> usize {
        self.nr_values as usize
    }

    /// `xa_reserve()` on every index, as KVM does before storing. On failure
    /// the reservations this call made are released again (`xa_release()`),
    /// which frees every node they allocated.
    fn reserve(&mut self, start: u64, end: u64, limit: Option<usize>) -> Result<(), StoreError> {
        check_range(start, end)?;
        // The rule both stores follow: no reservation leaves the store over
        // `limit`, even one that allocates nothing.
        if let Some(limit) = limit {
            let bytes = self.memory_bytes();
            if bytes > limit {
                return Err(StoreError::OutOfMemory {
                    needed: bytes,
                    limit: Some(limit),
                });
            }
        }
        self.prepare_nodes(start, end, limit)?;
        // Runs of indices this call reserved, to undo on failure.
        let mut made: Vec<(u64, u64)> = Vec::new();
        let mut failed = None;
        for index in start..end {
            if crate::interrupt::poll_due(index - start) {
                failed = Some(StoreError::Interrupted);
                break;
            }
            let before = self.live_nodes;
            if self.reserve_one(index) {
                match made.last_mut() {
                    Some(r) if r.1 == index => r.1 = index + 1,
                    _ => {
                        if made.try_reserve(1).is_err() {
                            self.release_one(index);
                            failed = Some(StoreError::OutOfMemory {
                                needed: self.memory_bytes(),
                                limit: None,
                            });
                            break;
                        }
                        made.push((index, index + 1))
                    }
                }
                if let Some(limit) = limit {
                    let bytes = self.memory_bytes();
                    if self.live_nodes > before && bytes > limit {
                        failed = Some(StoreError::OutOfMemory {
                            needed: bytes,
                            limit: Some(limit),
                        });
                        break;
                    }
                }
            }
        }
        match failed {
            None => Ok(()),
            Some(err) => {
                for (s, e) in made {
                    for index in s..e {
                        self.release_one(index);
                    }
                }
                Err(err)
            }
        }
    }

    fn release_reservations(&mut self) {
        if self.nr_zero == 0 {
            return;
        }
        // Bounded batches, so releasing never needs a big allocation.
        // Index u64::MAX is outside every half-open range; it is never set.
        const BATCH: usize = 4096;
        let mut zeros: Vec<u64> = Vec::with_capacity(BATCH);
        let mut from = 0u64;
        loop {
            zeros.clear();
            self.walk(from, u64::MAX, &mut |index, entry| {
                if entry.is_none() {
                    zeros.push(index);
                }
                zeros.len() < BATCH
            });
            for &index in &zeros {
                self.release_one(index);
            }
            match zeros.last() {
                Some(&l) if zeros.len() == BATCH => from = l + 1,
                _ => break,
            }
        }
    }

    fn count_pages(&self, start: u64, end: u64, value: u64, mask: u64) -> Result<u64, StoreError> {
        check_range(start, end)?;
        let want = value & mask;
        let mut present_matching = 0u64;
        let mut present_not = 0u64;
        self.walk(start, end, &mut |_, entry| {
            if entry.unwrap_or(0) & mask == want {
                present_matching += 1;
            } else {
                present_not += 1;
            }
            true
        });
        Ok(if want == 0 {
            // Absent (and reserved) entries read as 0 and so match.
            (end - start) - present_not
        } else {
            present_matching
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty() {
        let xa = XArray::new();
        assert_eq!(xa.get(0), 0);
        assert_eq!(xa.get(u64::MAX), 0);
        assert_eq!(xa.memory_bytes(), XARRAY_BYTES);
        assert_eq!(xa.height(), 0);
    }

    #[test]
    fn index_zero_lives_in_head() {
        let mut xa = XArray::new();
        xa.store(0, 8);
        assert_eq!(xa.node_count(), 0);
        assert_eq!(xa.get(0), 8);
        xa.store(1, 8);
        assert_eq!(xa.node_count(), 1);
        xa.store(1, 0);
        // Deleting index 1 reaches the root, which shrinks back to the head.
        assert_eq!(xa.node_count(), 0);
        assert_eq!(xa.get(0), 8);
        xa.check_invariants().unwrap();
    }

    #[test]
    fn grows_and_shrinks_like_the_kernel() {
        let mut xa = XArray::new();
        xa.store(5, 1);
        assert_eq!((xa.height(), xa.node_count()), (1, 1));
        xa.store(64, 1);
        // A new root above the old one, then a new leaf.
        assert_eq!((xa.height(), xa.node_count()), (2, 3));
        xa.store(u64::MAX - 1, 1);
        assert_eq!(xa.height(), 11);
        xa.check_invariants().unwrap();
        xa.store(u64::MAX - 1, 0);
        xa.store(64, 0);
        assert_eq!((xa.height(), xa.node_count()), (1, 1));
        xa.store(5, 0);
        assert_eq!((xa.height(), xa.node_count()), (0, 0));
        xa.check_invariants().unwrap();
    }

    #[test]
    fn whole_range_node_count() {
        let mut xa = XArray::new();
        xa.set_range(0, 1 << 12, 8).unwrap();
        // 64 leaves and one root.
        assert_eq!(xa.node_count(), 65);
        assert_eq!(xa.memory_bytes(), XARRAY_BYTES + 65 * 576);
        assert_eq!(xa.entry_count(), 4096);
        xa.set_range(0, 1 << 12, 0).unwrap();
        assert_eq!(xa.node_count(), 0);
    }

    #[test]
    fn reserve_limit_keeps_nothing() {
        let mut xa = XArray::new();
        xa.set_range(10, 20, 8).unwrap();
        let before = xa.memory_bytes();
        let err = xa.reserve(0, 1 << 16, Some(before + 10 * 576)).unwrap_err();
        assert!(matches!(err, StoreError::OutOfMemory { .. }));
        assert_eq!(xa.memory_bytes(), before);
        assert_eq!(xa.reserved_count(), 0);
        xa.check_invariants().unwrap();
        xa.reserve(0, 1 << 12, None).unwrap();
        assert_eq!(xa.get(100), 0);
        assert_eq!(xa.node_count(), 65);
        xa.set_range(0, 100, 8).unwrap();
        xa.release_reservations();
        assert_eq!(xa.reserved_count(), 0);
        assert_eq!(xa.node_count(), 3);
        xa.check_invariants().unwrap();
    }

    /// The node count `prepare_nodes` reserves for is an upper bound on
    /// what a store really allocates, and is exact up to the 11 expansion
    /// roots; a huge erase visits only present entries.
    #[test]
    fn missing_nodes_bounds_the_allocation() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
        let range = (0u64..1 << 14, 1u64..1 << 13);
        let pre = proptest::collection::vec((0u64..1 << 20, 1u64..200), 0..6);
        runner
            .run(&(range, pre, any::<bool>()), |((start, len), pre, high)| {
                let base = if high { 1u64 << 40 } else { 0 };
                let mut xa = XArray::new();
                for (s, l) in pre {
                    xa.set_range(base + s, base + s + l, 3).unwrap();
                }
                let (s, e) = (base + start, base + start + len);
                let missing = xa.missing_nodes(s, e);
                let before = xa.node_count() as u64;
                xa.set_range(s, e, 9).unwrap();
                let grew = xa.node_count() as u64 - before;
                prop_assert!(grew <= missing, "grew {} > estimate {}", grew, missing);
                prop_assert!(
                    missing <= grew + 11,
                    "estimate {} far above {}",
                    missing,
                    grew
                );
                xa.check_invariants().unwrap();
                Ok(())
            })
            .unwrap();
    }

    /// A store stopped by the cancellation flag puts back exactly what was
    /// there, reserved entries included (issue 14, item 13).
    #[test]
    fn interrupted_store_is_undone() {
        use proptest::prelude::*;
        use std::sync::atomic::AtomicBool;
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(100));
        let pre = proptest::collection::vec((0u64..1 << 17, 1u64..5000, 0u64..3), 0..6);
        runner
            .run(&(pre, 0u64..1 << 16), |(pre, start)| {
                let mut xa = XArray::new();
                for (s, l, v) in pre {
                    if v == 2 {
                        xa.reserve(s, s + l, None).unwrap();
                    } else {
                        xa.set_range(s, s + l, v + 1).unwrap();
                    }
                }
                let before: Vec<_> = (0..1u64 << 18).map(|i| xa.raw_entry(i)).collect();
                let nodes = xa.node_count();
                let flag = AtomicBool::new(true);
                let end = start + 3 * crate::interrupt::CHECK_EVERY;
                let r = crate::interrupt::with_token(&flag, || xa.set_range(start, end, 7));
                prop_assert_eq!(r, Err(StoreError::Interrupted));
                let after: Vec<_> = (0..1u64 << 18).map(|i| xa.raw_entry(i)).collect();
                prop_assert!(before == after);
                prop_assert!(xa.node_count() <= nodes);
                xa.check_invariants().unwrap();
                // Reservations stop and undo themselves too.
                let r = crate::interrupt::with_token(&flag, || xa.reserve(start, end, None));
                prop_assert_eq!(r, Err(StoreError::Interrupted));
                let after: Vec<_> = (0..1u64 << 18).map(|i| xa.raw_entry(i)).collect();
                prop_assert!(before == after);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn erase_of_a_huge_range_visits_only_entries() {
        let mut xa = XArray::new();
        xa.set_range(7, 9000, 4).unwrap();
        xa.set_range(1 << 50, (1 << 50) + 5, 4).unwrap();
        xa.reserve(1 << 61, (1 << 61) + 3, None).unwrap();
        // 2^63 indices: visiting each would never end.
        xa.set_range(0, 1 << 63, 0).unwrap();
        assert_eq!(
            (xa.entry_count(), xa.node_count(), xa.reserved_count()),
            (0, 0, 0)
        );
        xa.check_invariants().unwrap();
    }

    /// The per-page tracker's arrays are allocated fallibly: a slot of
    /// 2^44 pages is an error, not an abort (item 1).
    #[test]
    fn impossible_reserve_fails_up_front() {
        let mut xa = XArray::new();
        xa.set_range(1, 3, 1).unwrap();
        let err = xa.reserve(0, 1 << 50, Some(1 << 20)).unwrap_err();
        // The caller's limit is what the message quotes (item 11).
        assert_eq!(
            matches!(err, StoreError::OutOfMemory { limit: Some(l), .. } if l == 1 << 20),
            true
        );
        assert!(err.to_string().contains("limit is 1048576 bytes"));
        let err = xa.set_range(0, 1 << 50, 1).unwrap_err();
        assert!(matches!(err, StoreError::OutOfMemory { limit: None, .. }));
        assert_eq!(xa.entry_count(), 2);
    }
}
