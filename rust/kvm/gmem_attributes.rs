//! The guest_memfd in-place conversion series: shared/private kept per
//! guest_memfd file, set with KVM_SET_MEMORY_ATTRIBUTES2 on the file's fd.
//!
//! Followed: googleprodkernel/linux-cc `guest_memfd-inplace-conversion-v8`
//! (posted 18 June 2026, "[PATCH v8 00/46] guest_memfd: In-place conversion
//! support"), the newest revision found; `Semantics::GmemInplaceV5` follows
//! v5 (28 April 2026), the last revision with content modes (ZERO,
//! PRESERVE) and KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS, which v7 dropped.
//!
//! ```text
//!   ioctl(gmem_fd, KVM_SET_MEMORY_ATTRIBUTES2, &attrs2)
//!     kvm_gmem_set_attributes()   checks, each EINVAL (EFAULT: front end)
//!     __kvm_gmem_set_attributes() under filemap_invalidate_lock:
//!       [v5: content mode supported? EOPNOTSUPP]
//!       range already has the attributes: return 0 [v5: apply the mode]
//!       kvm_gmem_mas_preallocate   ENOMEM, nothing changed
//!       to private: unmap host mappings, refcount check: EAGAIN at the
//!                   first page with an elevated refcount
//!       kvm_gmem_invalidate_start  every binding of the file, filter from
//!                                  the range's current attributes
//!       [v5: apply the content mode] store  kvm_gmem_invalidate_end
//!   error_offset = err_index << PAGE_SHIFT, written back on any error of
//!   __kvm_gmem_set_attributes (EOPNOTSUPP, ENOMEM, EAGAIN)
//! ```
//!
//! Per-VM attributes are off under these semantics (the series'
//! gmem_in_place_conversion: kvm_supported_vm_mem_attributes() is 0), and
//! a fault reads the attribute of the file page bound to its gfn. The model
//! of the file's pages: which have a folio (allocated), their contents
//! where written, their elevated refcounts (pins, as GUP or in-flight I/O
//! would take), and which the host has in its page tables (mmap faults).

use std::collections::BTreeMap;

use super::*;
use crate::mapletree::MapleTree;
use crate::rangetree::RangeTree;
use crate::xarray::XArray;

impl Semantics {
    /// Per-guest_memfd attributes (any revision of the series).
    pub fn is_gmem_inplace(self) -> bool {
        matches!(self, Semantics::GmemInplace | Semantics::GmemInplaceV5)
    }

    /// v5: KVM_SET_MEMORY_ATTRIBUTES2 flags are content modes.
    pub fn has_content_modes(self) -> bool {
        self == Semantics::GmemInplaceV5
    }
}

/// Which structure holds each file's attributes (the VM's own choice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreKind {
    #[default]
    RangeTree,
    XArray,
    MapleTree,
}

pub type FileStore = Box<dyn AttrStore + Send + Sync>;

/// Pages one pin or unpin call may cover (pins are kept per page; 4 GiB is
/// more than any GUP user holds at once).
pub const MAX_PIN_PAGES: u64 = 1 << 20;

/// An empty store of `kind`.
pub fn new_store(kind: StoreKind) -> FileStore {
    match kind {
        StoreKind::RangeTree => Box::new(RangeTree::new()),
        StoreKind::XArray => Box::new(XArray::new()),
        StoreKind::MapleTree => Box::new(MapleTree::new()),
    }
}

/// struct kvm_memory_attributes2's input fields (error_offset is output).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmMemoryAttributes2 {
    pub offset: u64,
    pub size: u64,
    pub attributes: u64,
    pub flags: u64,
    pub reserved: [u64; 11],
}

/// A failed KVM_SET_MEMORY_ATTRIBUTES2: the errno, and the error_offset
/// the kernel writes back (None for the checks before the set, which
/// return without copying anything back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAttributes2Error {
    pub error: KvmError,
    pub error_offset: Option<u64>,
}

impl From<KvmError> for SetAttributes2Error {
    fn from(error: KvmError) -> Self {
        Self {
            error,
            error_offset: None,
        }
    }
}

/// The state of one guest_memfd inode under these semantics.
pub struct GmemAttrFile {
    /// gi->attributes: page -> attributes (0 shared, PRIVATE private).
    pub attributes: FileStore,
    pub npages: u64,
    pub flags: u64,
    /// Pages whose folio has an elevated refcount: page -> extra refs.
    pins: BTreeMap<u64, u64>,
    /// Extra refs on folios truncated away since (they no longer block a
    /// conversion: the refcount check looks at the page cache).
    orphan_pins: BTreeMap<u64, u64>,
}

impl std::fmt::Debug for GmemAttrFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmemAttrFile")
            .field("npages", &self.npages)
            .field("flags", &self.flags)
            .finish()
    }
}

impl GmemAttrFile {
    fn is_private(&self, page: u64) -> bool {
        self.attributes.get(page) & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0
    }
}

/// What KVM_SET_MEMORY_ATTRIBUTES2 and the file operations did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InplaceCounters {
    /// Calls that passed the ioctl's checks.
    pub set_calls: u64,
    /// Calls that changed at least one page.
    pub conversions: u64,
    /// Early returns: the range already had the attributes.
    pub noop_conversions: u64,
    pub pages_converted: u64,
    /// Calls that failed (any errno).
    pub failed_calls: u64,
    pub eagain: u64,
    pub enomem: u64,
    pub eopnotsupp: u64,
    /// Invalidations through a file's bindings (conversions, holes,
    /// release), and how many of them zapped shared / private mappings.
    pub invalidations: u64,
    pub filter_shared: u64,
    pub filter_private: u64,
    /// Host page-table entries removed by conversions to private.
    pub user_unmapped_pages: u64,
    /// Host accesses answered with SIGBUS.
    pub sigbus: u64,
    /// Pages a content mode zeroed / scrambled (v5).
    pub zeroed_pages: u64,
    pub scrambled_pages: u64,
}

/// The series' per-VM state: the files' attributes and what the VM type's
/// content-mode rules read.
#[derive(Debug, Default)]
pub struct InplaceState {
    pub store_kind: StoreKind,
    pub files: BTreeMap<u64, GmemAttrFile>,
    /// kvm->arch.pre_fault_allowed: the VM is finalized (SNP launch finish,
    /// TDX finalize); from the start for VMs without protected state.
    pub finalized: bool,
    pub counters: InplaceCounters,
    scramble: u64,
}

impl Kvm {
    fn inplace(&self) -> bool {
        self.config.semantics.is_gmem_inplace()
    }

    /// kvm_gmem_get_supported_flags() for this VM (the rule, per kernel, is
    /// caps::kvm_gmem_get_supported_flags).
    pub fn kvm_gmem_get_supported_flags(&self) -> u64 {
        caps::kvm_gmem_get_supported_flags(self.config.semantics, Some(&self.config))
    }

    /// KVM_CHECK_EXTENSION answers the series adds (None: not one of them).
    pub(super) fn gmem_inplace_check_extension(&self, cap: u32) -> Option<u64> {
        let private = self.config.has_private_mem;
        let sem = self.config.semantics;
        match cap {
            KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5 if sem == Semantics::GmemInplaceV5 => {
                Some(if private {
                    KVM_MEMORY_ATTRIBUTE_PRIVATE
                } else {
                    0
                })
            }
            KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS if sem == Semantics::GmemInplaceV5 => {
                Some(self.kvm_arch_gmem_supported_content_modes(false, true))
            }
            KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES if sem == Semantics::GmemInplace => {
                Some(if private {
                    KVM_MEMORY_ATTRIBUTE_PRIVATE
                } else {
                    0
                })
            }
            _ => None,
        }
    }

    /// v5 x86 kvm_arch_gmem_supported_content_modes(): ZERO and PRESERVE
    /// for SW_PROTECTED; ZERO for SNP and TDX, PRESERVE too before the VM
    /// is finalized and only to private (what the capability reports with
    /// `for_cap`); nothing for other types.
    pub fn kvm_arch_gmem_supported_content_modes(&self, to_private: bool, for_cap: bool) -> u64 {
        match self.config.vm_type {
            KVM_X86_SW_PROTECTED_VM => {
                KVM_SET_MEMORY_ATTRIBUTES2_ZERO | KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
            }
            KVM_X86_SNP_VM | KVM_X86_TDX_VM => {
                let mut m = KVM_SET_MEMORY_ATTRIBUTES2_ZERO;
                if for_cap || (to_private && !self.inplace.finalized) {
                    m |= KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE;
                }
                m
            }
            _ => 0,
        }
    }

    /// v5 kvm_gmem_content_mode_is_supported(): ZERO never to private (KVM
    /// is untrusted: it cannot promise what the guest reads).
    fn kvm_gmem_content_mode_is_supported(&self, mode: u64, to_private: bool) -> bool {
        if mode == KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED {
            return true;
        }
        if mode == KVM_SET_MEMORY_ATTRIBUTES2_ZERO && to_private {
            return false;
        }
        self.kvm_arch_gmem_supported_content_modes(to_private, false) & mode != 0
    }

    /// v5 kvm_gmem_apply_content_mode() on the allocated pages of [start,
    /// end) (no guarantee for pages without memory): ZERO zeroes, PRESERVE
    /// keeps, UNSPECIFIED scrambles on SW_PROTECTED (the testing vehicle,
    /// so tests cannot rely on contents) and keeps elsewhere.
    fn kvm_gmem_apply_content_mode(&mut self, fd: u64, mode: u64, start: u64, end: u64) {
        let vm_type = self.config.vm_type;
        // A new nonzero seed per scramble: contents differ every time.
        let seed = self.inplace.scramble.wrapping_add(0x9E37_79B9_7F4A_7C15) | 1;
        let Some(f) = self.gmem.get_mut(&fd).map(|f| &mut f.cache) else {
            return;
        };
        match mode {
            KVM_SET_MEMORY_ATTRIBUTES2_ZERO => {
                let n = f.refill(start, end, 0);
                self.inplace.counters.zeroed_pages += n;
            }
            KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED if vm_type == KVM_X86_SW_PROTECTED_VM => {
                let n = f.refill(start, end, seed);
                self.inplace.scramble = seed;
                self.inplace.counters.scrambled_pages += n;
            }
            _ => {}
        }
    }

    // --- hooks from guest_memfd.rs and mmu.rs --------------------------------

    /// kvm_gmem_create() with the series: the file's attributes start
    /// private, or shared with GUEST_MEMFD_FLAG_INIT_SHARED.
    pub(super) fn gmem_attr_file_create(&mut self, fd: u64, size: u64, flags: u64) {
        if !self.inplace() {
            return;
        }
        let npages = size >> PAGE_SHIFT;
        let mut attributes = new_store(self.inplace.store_kind);
        if flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
            // Not accounted against attr_memory_limit: the kernel's create
            // allocates its first node unconditionally (-ENOMEM aside).
            let _ = attributes.set_range(0, npages, KVM_MEMORY_ATTRIBUTE_PRIVATE);
        }
        self.inplace.files.insert(
            fd,
            GmemAttrFile {
                attributes,
                npages,
                flags,
                pins: BTreeMap::new(),
                orphan_pins: BTreeMap::new(),
            },
        );
    }

    /// The inode goes with its last reference.
    pub(super) fn gmem_attr_file_release(&mut self, fd: u64) {
        self.inplace.files.remove(&fd);
    }

    /// Truncation (PUNCH_HOLE), after the page cache lost the folios
    /// (GmemPageCache::truncate): their pins leave the page cache with
    /// them; shared/private stays (the series' "truncation does not change
    /// shared/private status").
    pub(super) fn gmem_attr_truncate(&mut self, fd: u64, start: u64, end: u64) {
        let Some(f) = self.inplace.files.get_mut(&fd) else {
            return;
        };
        let end = end.min(f.npages);
        if start >= end {
            return;
        }
        let pinned: Vec<(u64, u64)> = f.pins.range(start..end).map(|(&k, &v)| (k, v)).collect();
        for (k, v) in pinned {
            f.pins.remove(&k);
            *f.orphan_pins.entry(k).or_insert(0) += v;
        }
    }

    /// kvm_gmem_get_invalidate_filter() (v8): shared and/or private, from
    /// the attributes the file pages [start, end) have now; 0 if `fd` is
    /// not a file of the series.
    pub(super) fn gmem_inplace_invalidate_filter(&self, fd: u64, start: u64, end: u64) -> u64 {
        let Some(f) = self.inplace.files.get(&fd) else {
            return 0;
        };
        let end = end.min(f.npages);
        let mut filter = 0;
        if start < end {
            let _ = f.attributes.for_each_run(start, end, &mut |_, _, v| {
                filter |= if v & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
                    KVM_FILTER_PRIVATE
                } else {
                    KVM_FILTER_SHARED
                };
            });
        }
        filter
    }

    /// The invalidation filter of file pages [start, end)
    /// ([`Self::kvm_gmem_get_invalidate_filter`]), counted by the series.
    pub(super) fn note_gmem_invalidate_filter(&mut self, fd: u64, start: u64, end: u64) -> u64 {
        let filter = self.kvm_gmem_get_invalidate_filter(fd, start, end);
        if self.inplace.files.contains_key(&fd) {
            let c = &mut self.inplace.counters;
            c.invalidations += 1;
            c.filter_shared += (filter & KVM_FILTER_SHARED != 0) as u64;
            c.filter_private += (filter & KVM_FILTER_PRIVATE != 0) as u64;
        }
        filter
    }

    /// The file page bound to `gfn` in address space 0 (VMs with private
    /// memory have only that one), if its slot's file is open.
    fn gmem_page_of_gfn(&self, gfn: u64) -> Option<(u64, u64)> {
        let slot = &self.memslots.address_space(0)[self.memslots.find(0, gfn)?];
        let fd = slot.guest_memfd.filter(|_| slot.gmem_open)?;
        Some((fd, slot.gmem_pgoff() + gfn - slot.base_gfn))
    }

    /// The per-file attribute of page `page` of `fd`: private? (false for a
    /// file the series does not track).
    pub(super) fn kvm_gmem_is_private_page(&self, fd: u64, page: u64) -> bool {
        self.inplace
            .files
            .get(&fd)
            .is_some_and(|f| f.is_private(page))
    }

    /// kvm_mem_is_private() with per-file attributes (the series'
    /// kvm_gmem_is_private): the attribute of the bound file page; a gfn
    /// without a guest_memfd is shared.
    pub(super) fn kvm_gmem_is_private_gfn(&self, gfn: u64) -> bool {
        self.gmem_page_of_gfn(gfn)
            .is_some_and(|(fd, page)| self.kvm_gmem_is_private_page(fd, page))
    }

    /// A fault that mapped `gfn` from guest_memfd (kvm_gmem_get_pfn)
    /// allocated its folio.
    pub(super) fn gmem_note_faulted(&mut self, as_id: usize, gfn: u64) {
        if !self.inplace() || as_id != 0 {
            return;
        }
        if let Some((fd, page)) = self.gmem_page_of_gfn(gfn) {
            if let Some(f) = self.gmem.get_mut(&fd) {
                f.cache.allocate(page, page + 1);
            }
        }
    }

    // --- KVM_SET_MEMORY_ATTRIBUTES2 ------------------------------------------------

    /// This VM's guest_memfd `fd` under these semantics: EBADF if it is not
    /// one; ENOTTY (no such ioctl on the file) under other semantics.
    fn gmem_attr_file(&self, fd: u64) -> Result<&GmemAttrFile, KvmError> {
        let f = self.gmem_attr_file_of(fd)?;
        // Calls through the fd: EBADF once it is closed, even while a
        // mapping keeps the file (and these attributes) alive.
        self.own_gmem(fd)?;
        Ok(f)
    }

    /// The series' state of file `fd` while the file lives, whether or not
    /// its fd is still open (what its mappings and pages reach).
    fn gmem_attr_file_of(&self, fd: u64) -> Result<&GmemAttrFile, KvmError> {
        if !self.inplace() {
            return fail(
                ENOTTY,
                "guest_memfd ioctls need the in-place conversion series (semantics='gmem-inplace')",
            );
        }
        match self.inplace.files.get(&fd) {
            Some(f) => Ok(f),
            None => fail(EBADF, format!("fd {fd} is not a guest_memfd of this VM")),
        }
    }

    /// kvm_gmem_set_attributes()'s checks, in the series' order, each
    /// EINVAL: flags (v8: none; v5: ZERO or PRESERVE, not both), reserved
    /// words, a VM without private memory, attributes other than PRIVATE,
    /// size 0 or offset + size wrapping, alignment, the range inside the
    /// file. Returns the page range.
    pub fn kvm_gmem_set_attributes_checks(
        &self,
        fd: u64,
        a: &KvmMemoryAttributes2,
    ) -> Result<(u64, u64), KvmError> {
        let file = self.gmem_attr_file(fd)?;
        let modes = KVM_SET_MEMORY_ATTRIBUTES2_ZERO | KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE;
        if self.config.semantics.has_content_modes() {
            if a.flags & !modes != 0 {
                return fail(EINVAL, format!("flags {:#x} has unknown bits", a.flags));
            }
            if a.flags & modes == modes {
                return fail(EINVAL, "ZERO and PRESERVE exclude each other");
            }
        } else if a.flags != 0 {
            return fail(EINVAL, format!("flags {:#x} must be 0", a.flags));
        }
        if let Some(i) = a.reserved.iter().position(|&r| r != 0) {
            return fail(EINVAL, format!("reserved[{i}] must be 0"));
        }
        if !self.config.has_private_mem {
            return fail(EINVAL, "this VM type has no private memory");
        }
        if a.attributes & !KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            return fail(
                EINVAL,
                format!("attributes {:#x} other than PRIVATE", a.attributes),
            );
        }
        if a.size == 0 || a.offset.checked_add(a.size).is_none() {
            return fail(
                EINVAL,
                format!("size {:#x} is 0 or offset + size wraps", a.size),
            );
        }
        if (a.offset | a.size) & (PAGE_SIZE - 1) != 0 {
            return fail(
                EINVAL,
                format!(
                    "offset {:#x} or size {:#x} not page aligned",
                    a.offset, a.size
                ),
            );
        }
        let isize = file.npages << PAGE_SHIFT;
        if a.offset >= isize || a.offset + a.size > isize {
            return fail(
                EINVAL,
                format!(
                    "[{:#x}, {:#x}) is not inside the file (size {isize:#x})",
                    a.offset,
                    a.offset + a.size
                ),
            );
        }
        Ok((a.offset >> PAGE_SHIFT, (a.offset + a.size) >> PAGE_SHIFT))
    }

    /// KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd `fd` (after the front
    /// end's copy_from_user). Every failure leaves the attributes, the
    /// mappings and the contents as they were.
    pub fn kvm_gmem_set_attributes(
        &mut self,
        fd: u64,
        a: &KvmMemoryAttributes2,
    ) -> Result<(), SetAttributes2Error> {
        let r = self
            .kvm_gmem_set_attributes_checks(fd, a)
            .map_err(SetAttributes2Error::from)
            .and_then(|(start, end)| {
                self.inplace.counters.set_calls += 1;
                self.__kvm_gmem_set_attributes(fd, start, end, a.attributes, a.flags)
                    .map_err(|(error, err_index)| SetAttributes2Error {
                        error,
                        error_offset: Some(err_index << PAGE_SHIFT),
                    })
            });
        if r.is_err() {
            self.inplace.counters.failed_calls += 1;
        }
        r
    }

    /// __kvm_gmem_set_attributes(): the set itself, under the file's
    /// invalidate lock; an error carries err_index.
    #[allow(non_snake_case)]
    fn __kvm_gmem_set_attributes(
        &mut self,
        fd: u64,
        start: u64,
        end: u64,
        attrs: u64,
        mode: u64,
    ) -> Result<(), (KvmError, u64)> {
        let to_private = attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        let v5 = self.config.semantics.has_content_modes();
        if v5 && !self.kvm_gmem_content_mode_is_supported(mode, to_private) {
            self.inplace.counters.eopnotsupp += 1;
            return Err((
                KvmError::Errno {
                    errno: EOPNOTSUPP,
                    why: format!(
                        "content mode {mode:#x} is not supported for this conversion on VM type {}",
                        self.config.vm_type
                    ),
                },
                start,
            ));
        }
        let limit = self.config.attr_memory_limit;
        let file = self.inplace.files.get_mut(&fd).expect("checked");
        // kvm_gmem_range_has_attributes(), then kvm_gmem_mas_preallocate().
        match file
            .attributes
            .reserve_unless_has_value(start, end, attrs, limit)
        {
            Ok(true) => {
                self.inplace.counters.noop_conversions += 1;
                if v5 {
                    // v5: "Even if no update is required to attributes,
                    // the requested content mode is applied."
                    self.kvm_gmem_apply_content_mode(fd, mode, start, end);
                }
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => {
                self.inplace.counters.enomem += 1;
                return Err((
                    KvmError::Errno {
                        errno: ENOMEM,
                        why: e.to_string(),
                    },
                    start,
                ));
            }
        }
        if to_private {
            // unmap_mapping_pages(): the host loses its mappings first, so
            // only transient references can remain...
            let cache = &mut self.gmem.get_mut(&fd).expect("checked").cache;
            self.inplace.counters.user_unmapped_pages += cache.unmap_user(start, end);
            // ...then kvm_gmem_is_safe_for_conversion(): a folio in the page
            // cache with more references than guest_memfd's is in use.
            if let Some((&page, _)) = file.pins.range(start..end).find(|(_, &n)| n > 0) {
                file.attributes.release_reservations();
                self.inplace.counters.eagain += 1;
                return Err((
                    KvmError::Errno {
                        errno: EAGAIN,
                        why: format!("page {page:#x} of guest_memfd {fd} has an elevated refcount"),
                    },
                    page.max(start),
                ));
            }
        }
        // Point of no return: invalidate through every binding, filtered by
        // what the range holds now, store, end the invalidation.
        let filter = self.note_gmem_invalidate_filter(fd, start, end);
        let ranges = self.gmem_gfn_ranges(&self.gmem[&fd].bindings, start, end);
        if !ranges.is_empty() {
            self.note_mmu_lock();
            self.kvm_mmu_invalidate_begin();
            let mut flush = false;
            for &(as_id, s, e) in &ranges {
                self.kvm_mmu_invalidate_range_add(s, e);
                // The filter names the kinds of mappings zapped (direct or
                // mirror roots).
                match self.kvm_unmap_gfn_range_filtered(as_id, s, e, filter) {
                    Ok(f) => flush |= f,
                    Err(err) => {
                        let _ = self.kvm_mmu_invalidate_end();
                        if let Some(f) = self.inplace.files.get_mut(&fd) {
                            f.attributes.release_reservations();
                        }
                        return Err((err, start));
                    }
                }
            }
            if flush {
                self.kvm_flush_remote_tlbs();
            }
        }
        if v5 {
            self.kvm_gmem_apply_content_mode(fd, mode, start, end);
        }
        let file = self.inplace.files.get_mut(&fd).expect("checked");
        let stored = file.attributes.set_range(start, end, attrs);
        file.attributes.release_reservations();
        if !ranges.is_empty() {
            self.note_mmu_lock();
            self.kvm_mmu_invalidate_end().map_err(|e| (e, start))?;
        }
        stored.map_err(|e| (bug(e), start))?;
        self.inplace.counters.conversions += 1;
        self.inplace.counters.pages_converted += end - start;
        Ok(())
    }

    // --- page references ---------------------------------------------------------------

    /// pin_user_pages() on `npages` pages of the file's mmap from `offset`
    /// (GUP, an IOMMU mapping, in-flight I/O): each page's folio gets an
    /// elevated refcount until unpinned. GUP faults the pages in, in order,
    /// through the one fault rule (gmem_mmap.rs); a private page (or one
    /// past the end) gets SIGBUS there, which GUP returns as EFAULT: no
    /// page is pinned (the pages before it stay faulted in, as after GUP).
    pub fn guest_memfd_pin(&mut self, fd: u64, offset: u64, npages: u64) -> Result<(), KvmError> {
        self.gmem_attr_file(fd)?;
        self.kvm_gmem_mmap(fd, true)?;
        if offset & (PAGE_SIZE - 1) != 0 || npages == 0 || npages > MAX_PIN_PAGES {
            return Err(KvmError::Argument(format!(
                "offset {offset:#x} must be page aligned and npages in 1..={MAX_PIN_PAGES}, \
                 got {npages}"
            )));
        }
        let first = offset >> PAGE_SHIFT;
        let end = first + npages;
        for p in first..end {
            match self.kvm_gmem_fault_user_mapping(fd, p << PAGE_SHIFT) {
                Ok(()) => {}
                Err(KvmError::Sigbus { private, .. }) => {
                    let why = if private {
                        "is private"
                    } else {
                        "is past the end of the file"
                    };
                    return fail(
                        EFAULT,
                        format!("page {p:#x} {why}: GUP's fault gets SIGBUS"),
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let f = self.inplace.files.get_mut(&fd).expect("checked");
        for p in first..end {
            *f.pins.entry(p).or_insert(0) += 1;
        }
        Ok(())
    }

    /// unpin_user_pages(): drops one reference per page, from the page's
    /// current folio, else from a folio truncated since. Argument error
    /// (nothing dropped) if a page holds no pin.
    pub fn guest_memfd_unpin(&mut self, fd: u64, offset: u64, npages: u64) -> Result<(), KvmError> {
        // unpin_user_pages() takes pages, not an fd: pins taken before a
        // close can be dropped while a mapping keeps the file.
        self.gmem_attr_file_of(fd)?;
        let first = offset >> PAGE_SHIFT;
        let end = first.saturating_add(npages);
        let f = self.inplace.files.get_mut(&fd).expect("checked");
        if offset & (PAGE_SIZE - 1) != 0
            || npages == 0
            || npages > MAX_PIN_PAGES
            || (first..end).any(|p| !f.pins.contains_key(&p) && !f.orphan_pins.contains_key(&p))
        {
            return Err(KvmError::Argument(format!(
                "no pin on every page of [{offset:#x}, +{npages} pages)"
            )));
        }
        for p in first..end {
            let map = if f.pins.contains_key(&p) {
                &mut f.pins
            } else {
                &mut f.orphan_pins
            };
            let n = map.get_mut(&p).expect("checked");
            *n -= 1;
            if *n == 0 {
                map.remove(&p);
            }
        }
        Ok(())
    }

    /// KVM_SEV_SNP_LAUNCH_FINISH / KVM_TDX_FINALIZE_VM: sets
    /// kvm->arch.pre_fault_allowed (ends v5's PRESERVE for SNP and TDX).
    pub fn kvm_finalize_vm(&mut self) {
        self.inplace.finalized = true;
    }

    // --- inspection ------------------------------------------------------------------

    /// The attribute of file page `page`.
    pub fn kvm_gmem_get_attributes(&self, fd: u64, page: u64) -> Result<u64, KvmError> {
        let f = self.gmem_attr_file(fd)?;
        if page >= f.npages {
            return Err(KvmError::Argument(format!(
                "page {page:#x} is past the file's {} pages",
                f.npages
            )));
        }
        Ok(f.attributes.get(page))
    }

    /// The file's attributes as runs (start page, end page, attributes).
    pub fn gmem_attribute_runs(&self, fd: u64) -> Result<Vec<(u64, u64, u64)>, KvmError> {
        let f = self.gmem_attr_file(fd)?;
        let mut out = Vec::new();
        let _ = f
            .attributes
            .for_each_run(0, f.npages, &mut |s, e, v| out.push((s, e, v)));
        Ok(out)
    }

    /// The file's allocated pages as runs.
    pub fn gmem_allocated_runs(&self, fd: u64) -> Result<Vec<(u64, u64)>, KvmError> {
        let f = self.gmem_attr_file(fd)?;
        Ok(self.gmem[&fd].cache.allocated_pages(0, f.npages))
    }

    /// Bytes and entries of the file's attribute store.
    pub fn gmem_store_usage(&self, fd: u64) -> Result<(usize, usize), KvmError> {
        let f = self.gmem_attr_file(fd)?;
        Ok((f.attributes.memory_bytes(), f.attributes.entry_count()))
    }

    /// Pages pinned in the file (current folios).
    pub fn gmem_pinned_pages(&self, fd: u64) -> Result<Vec<(u64, u64)>, KvmError> {
        let f = self.gmem_attr_file(fd)?;
        Ok(f.pins.iter().map(|(&k, &v)| (k, v)).collect())
    }
}

#[cfg(test)]
#[path = "gmem_attributes_tests.rs"]
mod tests;
