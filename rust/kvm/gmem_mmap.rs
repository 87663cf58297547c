//! Host access to a guest_memfd's contents through its mmap, for every
//! semantics: the file's page cache (the one store of its contents), the
//! one fault rule (kvm_gmem_fault_user_mapping) and the one read path and
//! one write path every API goes through (`vm.guest_memfd_mmap()`'s
//! mapping and `vm.guest_memfd_read/write` alike).
//!
//! ```text
//!   host memcpy through the mapping, page by page:
//!     page p faulted first: kvm_gmem_fault_user_mapping(fd, p)
//!       past EOF                         SIGBUS
//!       6.18: file not INIT_SHARED       SIGBUS
//!       in-place series: p is private    SIGBUS (private)
//!       else: folio allocated, p in the host's page tables
//!     then the bytes of p copied          GmemPageCache (GmemFile.cache)
//! ```
//!
//! A SIGBUS on page N stops the copy there: pages before N were faulted in
//! and, for a write, already hold the new bytes; nothing of page N or after
//! is touched. That is what a user memcpy into a MAP_SHARED mapping does
//! (each store faults its page in as it reaches it; the kernel cannot undo
//! the stores before the one that faulted), and the in-place series
//! changes only which pages fault (kvm_gmem_fault_user_mapping checks the
//! per-file attribute), not how a copy meets the fault. Reads fault pages
//! in the same way, so a read that gets SIGBUS still leaves the pages before
//! N allocated and mapped.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::*;
use crate::rangetree::RangeTree;

/// A host read through the mapping returns at most this much (the model's
/// own limit: the bytes are materialised).
pub const MAX_USER_READ: u64 = 1 << 30;

/// Sets [start, end) of `tree` to `value` (nothing for an empty range).
pub(super) fn mark(tree: &mut RangeTree, start: u64, end: u64, value: u64) {
    if start < end {
        // RangeTree::set_range fails only for an empty range.
        let _ = tree.set_range(start, end, value);
    }
}

/// One guest_memfd file's page cache (inode->i_mapping), as far as a user
/// can see it: which pages have a folio, what they hold, and which the host
/// has in its page tables. The one content store of a file, whatever the
/// semantics.
#[derive(Clone, Default)]
pub struct GmemPageCache {
    /// Pages with a folio (value 1): allocated by fallocate, a host fault,
    /// a pin, or (in-place series) a guest fault; gone with a hole.
    allocated: RangeTree,
    /// Bytes the host wrote, by page; an allocated page not here reads as
    /// its scramble, or as zeros (kvm_gmem_fault_user_mapping clears a
    /// folio that is not uptodate).
    contents: BTreeMap<u64, Box<[u8]>>,
    /// Pages whose contents a v5 content mode scrambled: page -> seed (0:
    /// none, the page reads as zeros).
    scrambled: RangeTree,
    /// Pages the host has in its page tables through mmap (value 1).
    user_mapped: RangeTree,
}

impl std::fmt::Debug for GmemPageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmemPageCache")
            .field("written_pages", &self.contents.len())
            .finish()
    }
}

impl GmemPageCache {
    /// Folios for [start, end).
    pub(super) fn allocate(&mut self, start: u64, end: u64) {
        mark(&mut self.allocated, start, end, 1);
    }

    /// Every allocated run of [start, end), in order.
    pub(super) fn allocated_pages(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start < end {
            let _ = self.allocated.for_each_run(start, end, &mut |s, e, v| {
                if v != 0 {
                    out.push((s, e));
                }
            });
        }
        out
    }

    /// The host maps `page` (a successful user fault).
    fn map_user(&mut self, page: u64) {
        mark(&mut self.user_mapped, page, page + 1, 1);
    }

    /// unmap_mapping_pages() over [start, end): the host loses its page
    /// table entries there. How many it had.
    pub(super) fn unmap_user(&mut self, start: u64, end: u64) -> u64 {
        let mut n = 0;
        if start < end {
            let _ = self.user_mapped.for_each_run(start, end, &mut |s, e, v| {
                if v != 0 {
                    n += e - s;
                }
            });
        }
        mark(&mut self.user_mapped, start, end, 0);
        n
    }

    /// truncate_inode_pages_range() over [start, end): the folios go, with
    /// their contents and the host's mappings of them.
    pub(super) fn truncate(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        mark(&mut self.allocated, start, end, 0);
        mark(&mut self.scrambled, start, end, 0);
        mark(&mut self.user_mapped, start, end, 0);
        let gone: Vec<u64> = self.contents.range(start..end).map(|(&k, _)| k).collect();
        for k in gone {
            self.contents.remove(&k);
        }
    }

    /// Replaces the contents of the allocated pages of [start, end): zeros
    /// (`seed` 0) or the scramble of `seed`, marked per run so the cost
    /// follows runs and written pages, not the range's size. The number of
    /// pages.
    pub(super) fn refill(&mut self, start: u64, end: u64, seed: u64) -> u64 {
        let mut n = 0;
        for (s, e) in self.allocated_pages(start, end) {
            let written: Vec<u64> = self.contents.range(s..e).map(|(&k, _)| k).collect();
            for k in written {
                self.contents.remove(&k);
            }
            mark(&mut self.scrambled, s, e, seed);
            n += e - s;
        }
        n
    }

    /// The bytes of `page` (written, scrambled, or zeros).
    fn page_data(&self, page: u64) -> Cow<'_, [u8]> {
        if let Some(d) = self.contents.get(&page) {
            return Cow::Borrowed(d);
        }
        match self.scrambled.get(page) {
            0 => Cow::Owned(vec![0; PAGE_SIZE as usize]),
            seed => Cow::Owned(scramble(seed, page)),
        }
    }

    /// Stores `src` at byte `lo` of `page` (the page's current bytes kept
    /// around it).
    fn write(&mut self, page: u64, lo: usize, src: &[u8]) {
        if !self.contents.contains_key(&page) {
            let d = self.page_data(page).into_owned().into_boxed_slice();
            self.contents.insert(page, d);
            mark(&mut self.scrambled, page, page + 1, 0);
        }
        let d = self.contents.get_mut(&page).expect("inserted");
        d[lo..lo + src.len()].copy_from_slice(src);
    }
}

/// A page's scrambled bytes for `seed`: splitmix64 of (seed, page, word),
/// different for every seed.
fn scramble(seed: u64, page: u64) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|w| {
            let mut z = seed
                .wrapping_add(page.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_add(w);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)).to_le_bytes()
        })
        .collect()
}

/// A host read returns at most [`MAX_USER_READ`] bytes.
fn check_read_len(len: u64) -> Result<(), KvmError> {
    if len > MAX_USER_READ {
        return Err(KvmError::Argument(format!(
            "length must be <= {MAX_USER_READ:#x}, got {len:#x}"
        )));
    }
    Ok(())
}

impl Kvm {
    /// kvm_gmem_fault_user_mapping(): the host faults in file byte
    /// `offset` through a mapping. SIGBUS past the end of the file; then
    /// under the in-place series SIGBUS on a page whose per-file attribute
    /// is private, and on 6.18 (no per-page conversion of guest_memfd)
    /// SIGBUS unless the file was created GUEST_MEMFD_FLAG_INIT_SHARED.
    /// Otherwise the page gets a folio (kvm_gmem_get_folio) and goes into
    /// the host's page tables. The one copy of the rule: host reads and
    /// writes, and pins (GUP faults through it), all come here.
    /// `fd` names the file (the fd it was created with): a mapping faults
    /// on its file whether or not that fd is still open.
    pub fn kvm_gmem_fault_user_mapping(&mut self, fd: u64, offset: u64) -> Result<(), KvmError> {
        let Some(f) = self.gmem.get(&fd) else {
            return fail(EBADF, format!("fd {fd} is not a guest_memfd of this VM"));
        };
        let page = offset >> PAGE_SHIFT;
        let sigbus = |private| {
            Err(KvmError::Sigbus {
                fd,
                offset,
                private,
            })
        };
        if offset >= f.size {
            return sigbus(false);
        }
        if self.config.semantics.is_gmem_inplace() {
            if self.kvm_gmem_is_private_page(fd, page) {
                return sigbus(true);
            }
        } else if f.flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
            return sigbus(false);
        }
        let cache = &mut self.gmem.get_mut(&fd).expect("checked").cache;
        cache.allocate(page, page + 1);
        cache.map_user(page);
        Ok(())
    }

    /// A host copy of `len` bytes at file byte `offset` through a MAP_SHARED
    /// mapping of file `fd` that exists (mmap accepted it; the mapping, not
    /// the fd, keeps the file): page by page, each page faulted in first and
    /// `each(cache, page, byte range in the page, bytes done)` after. A
    /// SIGBUS stops the copy at its page (see the module comment) and is
    /// counted.
    fn gmem_copy_through_mapping(
        &mut self,
        fd: u64,
        offset: u64,
        len: u64,
        mut each: impl FnMut(&mut GmemPageCache, u64, std::ops::Range<usize>, usize),
    ) -> Result<(), KvmError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| KvmError::Argument("offset + length wraps".into()))?;
        let mut at = offset;
        while at < end {
            if let Err(e) = self.kvm_gmem_fault_user_mapping(fd, at) {
                if matches!(e, KvmError::Sigbus { .. }) {
                    self.inplace.counters.sigbus += 1;
                }
                return Err(e);
            }
            let page = at >> PAGE_SHIFT;
            let upto = end.min((page + 1) << PAGE_SHIFT);
            let lo = (at - (page << PAGE_SHIFT)) as usize;
            let hi = (upto - (page << PAGE_SHIFT)) as usize;
            let cache = &mut self.gmem.get_mut(&fd).expect("faulted").cache;
            each(cache, page, lo..hi, (at - offset) as usize);
            at = upto;
        }
        Ok(())
    }

    /// A host read of `len` bytes at file byte `offset` through the file's
    /// mapping ([`Self::gmem_copy_through_mapping`], after the checks kvm_gmem_mmap() makes); Argument error above
    /// [`MAX_USER_READ`].
    pub fn kvm_gmem_user_read(
        &mut self,
        fd: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, KvmError> {
        check_read_len(len)?;
        self.kvm_gmem_mmap(fd, true)?;
        self.gmem_read_through_mapping(fd, offset, len)
    }

    /// A host write of `data` at file byte `offset` through the file's
    /// mapping ([`Self::gmem_copy_through_mapping`], after the checks kvm_gmem_mmap() makes): the pages before a SIGBUS
    /// keep what was written.
    pub fn kvm_gmem_user_write(
        &mut self,
        fd: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), KvmError> {
        self.kvm_gmem_mmap(fd, true)?;
        self.gmem_write_through_mapping(fd, offset, data)
    }

    /// The read of a copy through a mapping of `fd` that exists.
    fn gmem_read_through_mapping(
        &mut self,
        fd: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, KvmError> {
        let mut out = Vec::with_capacity(len as usize);
        self.gmem_copy_through_mapping(fd, offset, len, |cache, page, r, _| {
            out.extend_from_slice(&cache.page_data(page)[r]);
        })?;
        Ok(out)
    }

    /// The write of a copy through a mapping of `fd` that exists.
    fn gmem_write_through_mapping(
        &mut self,
        fd: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), KvmError> {
        self.gmem_copy_through_mapping(fd, offset, data.len() as u64, |cache, page, r, done| {
            let n = r.len();
            cache.write(page, r.start, &data[done..done + n]);
        })
    }
}

impl Kvm {
    /// A host read through live mapping `vma` ([`Self::mmap_new_file_vma`]):
    /// the same copy as [`Self::kvm_gmem_user_read`], on the mapping's file
    /// whether or not its fd is still open (the mapping holds the file).
    /// Argument error if the mapping is gone.
    pub fn kvm_gmem_vma_read(
        &mut self,
        vma: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, KvmError> {
        let fd = self.gmem_file_of_vma(vma)?;
        check_read_len(len)?;
        self.gmem_read_through_mapping(fd, offset, len)
    }

    /// A host write through live mapping `vma` (as
    /// [`Self::kvm_gmem_user_write`]).
    pub fn kvm_gmem_vma_write(
        &mut self,
        vma: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), KvmError> {
        let fd = self.gmem_file_of_vma(vma)?;
        self.gmem_write_through_mapping(fd, offset, data)
    }
}
