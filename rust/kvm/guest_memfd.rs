//! guest_memfd files: virt/kvm/guest_memfd.c's kvm_gmem_create(),
//! kvm_gmem_bind(), kvm_gmem_fallocate() / kvm_gmem_punch_hole() and
//! kvm_gmem_release(), Linux 6.8 and 6.18.
//!
//! ```text
//!   process fd table (REGISTRY)        Kvm::gmem (this VM's files)
//!   fd 1048576 -> vm 1   ───────────►  GmemFile { size, bindings }
//!   fd 1048577 -> vm 2                   bindings: first_pgoff ->
//!                                          (end_pgoff, as_id, slot id)
//!                                        ┌────────┬────────┐
//!                                        │ slot 0 │ slot 1 │  file pages
//!                                        └────────┴────────┘
//! ```
//!
//! Simulated fds live far above anything the process can open (the default
//! RLIMIT_NOFILE ceiling, fs.nr_open, is 1 << 20), so they never alias a
//! real fd, and a real fd passed as a guest_memfd is "a file, but not a
//! guest_memfd" (EINVAL), an unused number "not open" (EBADF).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::gmem_mmap::GmemPageCache;
use super::*;

/// The first simulated fd.
pub const GMEM_FD_BASE: u64 = 1 << 20;

struct Registry {
    next: u64,
    /// fd -> the VM the file belongs to (gmem->kvm).
    owners: BTreeMap<u64, u64>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: GMEM_FD_BASE,
    owners: BTreeMap::new(),
});
static NEXT_VM_ID: AtomicU64 = AtomicU64::new(1);
/// Mapping ids (one per mmap(2) of a guest_memfd), unique in the process.
static NEXT_VMA_ID: AtomicU64 = AtomicU64::new(1);

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn new_vm_id() -> u64 {
    NEXT_VM_ID.fetch_add(1, Ordering::Relaxed)
}

// A file keeps its VM alive (gmem->kvm holds a reference), so a VM's files
// stay in the table after the VM object is gone: binding one elsewhere is
// "another VM's guest_memfd" (EINVAL), as with the kernel.

/// The VM a simulated fd belongs to, if it is an open guest_memfd.
pub fn owner_of(fd: u64) -> Option<u64> {
    registry().owners.get(&fd).copied()
}

/// fget(): is `fd` an open file of this process? (fds above INT_MAX never
/// are). Reads /proc/self/fd without following the link, so sockets and
/// pipes count too.
fn fd_is_open(fd: u64) -> bool {
    fd <= i32::MAX as u64 && std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_ok()
}

/// One guest_memfd file of this VM. Its references are the kernel's
/// struct file references: the fd table's (dropped by close(2)) and one per
/// live mapping (vma->vm_file, taken by mmap(2), dropped by munmap(2)). A
/// memslot binding holds none (kvm_gmem_bind() fputs at its end: "the file
/// pins KVM, not the other way 'round"). The file is released
/// (kvm_gmem_release) when the last reference goes.
#[derive(Debug, Clone)]
pub struct GmemFile {
    /// The fd the file was created with; also the file's name in the model
    /// (simulated fds are never reused), whether or not it is still open.
    pub fd: u64,
    /// The fd table still holds the file (close(2) not yet called).
    pub fd_open: bool,
    /// The live mappings of the file (their ids): each holds a reference.
    pub vmas: BTreeSet<u64>,
    pub size: u64,
    pub flags: u64,
    /// gmem->bindings: first file page -> (end page, as_id, slot id).
    pub bindings: BTreeMap<u64, (u64, usize, u16)>,
    /// The file's page cache: folios, their contents, the host's
    /// mappings (gmem_mmap.rs; the one content store, every semantics).
    pub cache: GmemPageCache,
}

impl GmemFile {
    /// No reference is left: the file is released.
    fn unreferenced(&self) -> bool {
        !self.fd_open && self.vmas.is_empty()
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.bindings
            .range(..end)
            .next_back()
            .is_some_and(|(_, &(e, _, _))| e > start)
    }
}

/// vfs_fallocate()'s mode checks, Linux 6.8: unknown bits EOPNOTSUPP,
/// PUNCH_HOLE with ZERO_RANGE or without KEEP_SIZE EOPNOTSUPP, COLLAPSE and
/// INSERT only alone, UNSHARE only with KEEP_SIZE (those three EINVAL).
fn vfs_fallocate_mode_68(mode: u64) -> Result<(), KvmError> {
    if mode & !FALLOC_FL_SUPPORTED_MASK != 0 {
        return fail(EOPNOTSUPP, format!("mode {mode:#x} has unknown bits"));
    }
    if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_ZERO_RANGE != 0 {
        return fail(
            EOPNOTSUPP,
            "FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE exclude each other",
        );
    }
    if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0 {
        return fail(EOPNOTSUPP, "FALLOC_FL_PUNCH_HOLE needs FALLOC_FL_KEEP_SIZE");
    }
    for (alone, name) in [
        (FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE_RANGE"),
        (FALLOC_FL_INSERT_RANGE, "INSERT_RANGE"),
    ] {
        if mode & alone != 0 && mode & !alone != 0 {
            return fail(EINVAL, format!("FALLOC_FL_{name} must be used alone"));
        }
    }
    if mode & FALLOC_FL_UNSHARE_RANGE != 0
        && mode & !(FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_KEEP_SIZE) != 0
    {
        return fail(
            EINVAL,
            "FALLOC_FL_UNSHARE_RANGE takes only FALLOC_FL_KEEP_SIZE",
        );
    }
    Ok(())
}

/// vfs_fallocate()'s mode checks, Linux 6.18: the modes are exclusive
/// (allocate is no bit; any two together are EOPNOTSUPP), KEEP_SIZE is the
/// only flag; PUNCH_HOLE needs it, COLLAPSE, INSERT and WRITE_ZEROES refuse
/// it. Every refusal is EOPNOTSUPP.
fn vfs_fallocate_mode_618(mode: u64) -> Result<(), KvmError> {
    if mode & !(FALLOC_FL_MODE_MASK | FALLOC_FL_KEEP_SIZE) != 0 {
        return fail(EOPNOTSUPP, format!("mode {mode:#x} has unknown bits"));
    }
    let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
    let ok = match mode & FALLOC_FL_MODE_MASK {
        0 | FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_ZERO_RANGE => true,
        FALLOC_FL_PUNCH_HOLE => keep_size,
        FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE | FALLOC_FL_WRITE_ZEROES => !keep_size,
        _ => false,
    };
    if !ok {
        return fail(
            EOPNOTSUPP,
            format!("mode {mode:#x}: not one fallocate mode with the flags it takes"),
        );
    }
    Ok(())
}

/// kvm_gmem_bind()'s range check, in the kernel's arithmetic: `offset` is a
/// loff_t, and so is the sum `offset + size`, which wraps. An offset within
/// the slot's size of 2^63 (the u64 check before it lets those through)
/// sums to a negative number, no larger than any file's size, so the
/// kernel binds a range past the end of the file; the model does too
/// (Linux 6.8 to 6.18, seen on a live 6.18 kernel).
fn kvm_gmem_bind_range_invalid(offset: u64, npages: u64, file_size: u64) -> bool {
    let offset = offset as i64;
    let size = (npages << PAGE_SHIFT) as i64;
    offset < 0
        || offset & (PAGE_SIZE as i64 - 1) != 0
        || offset.wrapping_add(size) > file_size as i64
}

impl Kvm {
    /// This VM's open guest_memfd `fd`, or EBADF.
    pub(super) fn own_gmem(&self, fd: u64) -> Result<&GmemFile, KvmError> {
        match self.gmem.get(&fd) {
            Some(f) if f.fd_open => Ok(f),
            _ => fail(EBADF, format!("fd {fd} is not a guest_memfd of this VM")),
        }
    }

    /// This VM's guest_memfd files, in fd order: those whose fd is open and
    /// those a mapping keeps alive after close(2) (`fd_open` false).
    pub fn guest_memfds(&self) -> impl Iterator<Item = &GmemFile> {
        self.gmem.values()
    }

    /// KVM_CREATE_GUEST_MEMFD (kvm_gmem_create): any VM can create one (in
    /// 6.8 binding it needs private memory); 6.8 takes no flags, 6.18 those
    /// of kvm_gmem_get_supported_flags(); the size is a loff_t that must be
    /// > 0 and page aligned. ENOTTY on a host built without guest_memfd.
    /// Returns the new fd.
    pub fn kvm_gmem_create(&mut self, size: u64, flags: u64) -> Result<u64, KvmError> {
        self.kvm_vm_ioctl_compiled_in(caps::BuildDependentIoctl::CreateGuestMemfd)?;
        let valid_flags = self.kvm_gmem_get_supported_flags();
        if flags & !valid_flags != 0 {
            return fail(
                EINVAL,
                format!("guest_memfd flags {flags:#x} are not supported"),
            );
        }
        if size == 0 || size > MAX_LFS_FILESIZE || size & (PAGE_SIZE - 1) != 0 {
            return fail(
                EINVAL,
                format!("guest_memfd size {size:#x} must be > 0 and page aligned"),
            );
        }
        let fd = {
            let mut reg = registry();
            let fd = reg.next;
            reg.next += 1;
            reg.owners.insert(fd, self.id);
            fd
        };
        self.gmem.insert(
            fd,
            GmemFile {
                fd,
                fd_open: true,
                vmas: BTreeSet::new(),
                size,
                flags,
                bindings: BTreeMap::new(),
                cache: GmemPageCache::default(),
            },
        );
        self.gmem_attr_file_create(fd, size, flags);
        Ok(fd)
    }

    /// The checks of kvm_gmem_bind(), in its order, without binding.
    pub(super) fn kvm_gmem_check_bind(
        &self,
        fd: u64,
        offset: u64,
        npages: u64,
    ) -> Result<(), KvmError> {
        match owner_of(fd) {
            None if fd_is_open(fd) => return fail(EINVAL, format!("fd {fd} is not a guest_memfd")),
            None => return fail(EBADF, format!("fd {fd} is not open")),
            Some(owner) if owner != self.id => {
                return fail(EINVAL, format!("guest_memfd {fd} belongs to another VM"))
            }
            Some(_) => {}
        }
        let file = self.own_gmem(fd)?;
        if kvm_gmem_bind_range_invalid(offset, npages, file.size) {
            return fail(
                EINVAL,
                format!(
                    "guest_memfd offset {offset:#x} is negative or not page aligned, or \
                     [offset, offset + {:#x}) is beyond the file's size {:#x}",
                    npages << PAGE_SHIFT,
                    file.size
                ),
            );
        }
        let start = offset >> PAGE_SHIFT;
        if file.overlaps(start, start + npages) {
            // 6.8 returns -EINVAL here, not -EEXIST (kvm_gmem_bind's common
            // error path).
            return fail(
                EINVAL,
                format!("guest_memfd {fd} range is already bound to another memslot"),
            );
        }
        Ok(())
    }

    /// kvm_gmem_bind() after its checks passed. True if the slot becomes
    /// guest_memfd-only (KVM_MEMSLOT_GMEM_ONLY: the file is mmap-able).
    pub(super) fn kvm_gmem_bind(
        &mut self,
        fd: u64,
        pgoff: u64,
        npages: u64,
        as_id: usize,
        id: u16,
    ) -> bool {
        match self.gmem.get_mut(&fd) {
            Some(f) => {
                f.bindings.insert(pgoff, (pgoff + npages, as_id, id));
                f.flags & GUEST_MEMFD_FLAG_MMAP != 0
            }
            None => false,
        }
    }

    /// kvm_gmem_unbind().
    pub(super) fn kvm_gmem_unbind(&mut self, fd: u64, pgoff: u64) {
        if let Some(f) = self.gmem.get_mut(&fd) {
            f.bindings.remove(&pgoff);
        }
    }

    /// fallocate(2) on a guest_memfd: vfs_fallocate()'s checks, then
    /// kvm_gmem_fallocate()'s, in their order (`offset` and `length` are
    /// loff_t). KEEP_SIZE alone allocates (nothing to model beyond the
    /// checks); with PUNCH_HOLE every mapping of the bound gfns is zapped
    /// inside one invalidation (kvm_gmem_punch_hole).
    pub fn kvm_gmem_fallocate(
        &mut self,
        fd: u64,
        mode: u64,
        offset: i64,
        length: i64,
    ) -> Result<(), KvmError> {
        let Some(ranges) = self.kvm_gmem_fallocate_checks(fd, mode, offset, length)? else {
            return Ok(());
        };
        // The checks passed: the hole is page aligned inside loff_t.
        let (first, end) = (
            offset as u64 >> PAGE_SHIFT,
            (offset as u64 + length as u64) >> PAGE_SHIFT,
        );
        let filter = self.kvm_gmem_get_invalidate_filter(fd, first, end);
        self.kvm_gmem_invalidate(&ranges, filter)?;
        self.truncate_inode_pages_range(fd, offset as u64, length as u64);
        self.note_gmem_hole_punched();
        Ok(())
    }

    /// truncate_inode_pages_range() for a hole the checks accepted (page
    /// aligned, inside loff_t): the file's pages in it go, and read back
    /// zero through a mapping. The kernel does this inside the hole's
    /// invalidation; nothing the model shows can tell it from just after.
    pub fn truncate_inode_pages_range(&mut self, fd: u64, offset: u64, length: u64) {
        let (first, end) = (
            offset >> PAGE_SHIFT,
            offset.saturating_add(length) >> PAGE_SHIFT,
        );
        if let Some(f) = self.gmem.get_mut(&fd) {
            f.cache.truncate(first, end);
        }
        self.gmem_attr_truncate(fd, first, end);
    }

    /// kvm_gmem_fallocate() up to kvm_gmem_punch_hole()'s invalidation:
    /// every check, in order; None for an allocation (done: nothing to
    /// model beyond the checks), else the bound gfn ranges of the hole as
    /// (as_id, start, end), which the caller invalidates (the whole
    /// operation here, or the Python driver step by step).
    pub fn kvm_gmem_fallocate_checks(
        &mut self,
        fd: u64,
        mode: u64,
        offset: i64,
        length: i64,
    ) -> Result<Option<Vec<(usize, u64, u64)>>, KvmError> {
        let file_size = self.own_gmem(fd)?.size;
        // vfs_fallocate().
        if offset < 0 || length <= 0 {
            return fail(
                EINVAL,
                format!("offset {offset} must be >= 0 and length {length} > 0"),
            );
        }
        if self.config.is_618() {
            vfs_fallocate_mode_618(mode)?;
        } else {
            vfs_fallocate_mode_68(mode)?;
        }
        let Some(last) = offset.checked_add(length) else {
            return fail(EFBIG, "offset + length past the largest file size");
        };
        // kvm_gmem_fallocate().
        if mode & FALLOC_FL_KEEP_SIZE == 0 {
            return fail(
                EOPNOTSUPP,
                "guest_memfd cannot change size: FALLOC_FL_KEEP_SIZE is required",
            );
        }
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0 {
            return fail(
                EOPNOTSUPP,
                format!("mode {mode:#x} is not supported by guest_memfd"),
            );
        }
        if (offset | length) as u64 & (PAGE_SIZE - 1) != 0 {
            return fail(
                EINVAL,
                format!("offset {offset:#x} and length {length:#x} must be page aligned"),
            );
        }
        if mode & FALLOC_FL_PUNCH_HOLE == 0 {
            // kvm_gmem_allocate(): the size is immutable.
            if last as u64 > file_size {
                return fail(
                    EINVAL,
                    format!("allocation past the file's size {file_size:#x}"),
                );
            }
            // kvm_gmem_allocate(): folios for the range.
            if let Some(f) = self.gmem.get_mut(&fd) {
                f.cache
                    .allocate(offset as u64 >> PAGE_SHIFT, last as u64 >> PAGE_SHIFT);
            }
            return Ok(None);
        }
        let (first, end) = (offset as u64 >> PAGE_SHIFT, last as u64 >> PAGE_SHIFT);
        // The in-place series' shared/private filter, from the attributes
        // the hole holds before it is punched.
        self.note_gmem_invalidate_filter(fd, first, end);
        Ok(Some(self.gmem_gfn_ranges(
            &self.gmem[&fd].bindings,
            first,
            end,
        )))
    }

    /// A hole punched (counted once its invalidation is over).
    pub fn note_gmem_hole_punched(&mut self) {
        self.counters.gmem_holes_punched += 1;
    }

    /// close(2) of guest_memfd `fd`: the fd goes; if it held the file's
    /// last reference (no mapping), the file is released
    /// (kvm_gmem_release): every bound memslot loses the file (private
    /// faults there now exit), every mapping of the guest through it is
    /// zapped as for a hole over the whole file, and the bindings go. The
    /// memslots stay; the fd is free. With a live mapping only the fd goes:
    /// the file, its page cache and its bindings stay until the last
    /// munmap ([`Self::remove_vma`]).
    pub fn kvm_gmem_release(&mut self, fd: u64) -> Result<(), KvmError> {
        let last = self.kvm_gmem_take(fd)?;
        self.kvm_gmem_release_if_last(last)
    }

    /// close(2)'s first step, the one that decides who closes: the fd
    /// leaves the fd registry and the file in one step, so of two closes of
    /// the same fd exactly one succeeds and the other is EBADF, however the
    /// rest of the release is interleaved (a driver running the release
    /// step by step takes the file with this first, under the same lock as
    /// every other use of the table). Returns the file if that was its last
    /// reference (see [`Self::kvm_gmem_put`]), None if a mapping keeps it.
    pub fn kvm_gmem_take(&mut self, fd: u64) -> Result<Option<(GmemFile, u64)>, KvmError> {
        self.own_gmem(fd)?;
        registry().owners.remove(&fd);
        self.gmem.get_mut(&fd).expect("checked above").fd_open = false;
        Ok(self.kvm_gmem_put(fd))
    }

    /// fput(): a reference of file `fd` was dropped. If none is left, the
    /// file leaves the VM's table and is returned with the release's
    /// invalidation filter, read while the file (and the series'
    /// attributes) still exist; the file's own attributes go with it (only
    /// the bindings are needed to zap).
    fn kvm_gmem_put(&mut self, fd: u64) -> Option<(GmemFile, u64)> {
        if !self.gmem.get(&fd)?.unreferenced() {
            return None;
        }
        let filter = self.note_gmem_invalidate_filter(fd, 0, u64::MAX);
        let file = self.gmem.remove(&fd).expect("checked above");
        self.gmem_attr_file_release(fd);
        Some((file, filter))
    }

    /// The rest of kvm_gmem_release() for a file [`Self::kvm_gmem_take`]
    /// or [`Self::remove_vma`] took: unbind, zap, count.
    pub fn kvm_gmem_release_file(&mut self, file: GmemFile, filter: u64) -> Result<(), KvmError> {
        let ranges = self.kvm_gmem_unbind_file(&file);
        self.kvm_gmem_invalidate(&ranges, filter)?;
        self.note_gmem_closed();
        Ok(())
    }

    /// close(2) up to kvm_gmem_release()'s invalidation (slots_lock and the
    /// file's invalidation lock held): the fd goes; if that released the
    /// file, every bound slot loses it and the gfn ranges of the whole file
    /// are returned, to invalidate as for a hole; None if a mapping keeps
    /// the file.
    pub fn kvm_gmem_release_detach(
        &mut self,
        fd: u64,
    ) -> Result<Option<Vec<(usize, u64, u64)>>, KvmError> {
        Ok(self
            .kvm_gmem_take(fd)?
            .map(|(file, _)| self.kvm_gmem_unbind_file(&file)))
    }

    /// mmap(2) of guest_memfd `fd` that kvm_gmem_mmap() accepts
    /// (__mmap_new_file_vma): the mapping takes a reference on the file
    /// (vma->vm_file = get_file(file)). Returns the mapping's id.
    pub fn mmap_new_file_vma(&mut self, fd: u64, shared: bool) -> Result<u64, KvmError> {
        self.kvm_gmem_mmap(fd, shared)?;
        let id = NEXT_VMA_ID.fetch_add(1, Ordering::Relaxed);
        self.gmem.get_mut(&fd).expect("checked").vmas.insert(id);
        Ok(id)
    }

    /// The file mapping `vma` maps, or an Argument error if that mapping
    /// is not live (munmapped, or never this VM's).
    pub fn gmem_file_of_vma(&self, vma: u64) -> Result<u64, KvmError> {
        self.gmem
            .values()
            .find(|f| f.vmas.contains(&vma))
            .map(|f| f.fd)
            .ok_or_else(|| KvmError::Argument(format!("mapping {vma} is not mapped")))
    }

    /// munmap(2) of mapping `vma` (remove_vma: fput(vma->vm_file)): the
    /// mapping's reference goes; if it was the file's last, the file is
    /// returned for [`Self::kvm_gmem_release_file`], as from
    /// [`Self::kvm_gmem_take`]. Argument error if `vma` is not live.
    pub fn remove_vma(&mut self, vma: u64) -> Result<Option<(GmemFile, u64)>, KvmError> {
        let fd = self.gmem_file_of_vma(vma)?;
        self.gmem.get_mut(&fd).expect("found").vmas.remove(&vma);
        Ok(self.kvm_gmem_put(fd))
    }

    /// munmap(2) as a whole operation: [`Self::remove_vma`], then the
    /// release if that was the file's last reference.
    pub fn kvm_gmem_munmap(&mut self, vma: u64) -> Result<(), KvmError> {
        let last = self.remove_vma(vma)?;
        self.kvm_gmem_release_if_last(last)
    }

    /// The rest of an fput() ([`Self::kvm_gmem_take`],
    /// [`Self::remove_vma`]): the release if that reference was the file's
    /// last.
    fn kvm_gmem_release_if_last(&mut self, last: Option<(GmemFile, u64)>) -> Result<(), KvmError> {
        match last {
            Some((file, filter)) => self.kvm_gmem_release_file(file, filter),
            None => Ok(()),
        }
    }

    /// [`Self::remove_vma`] up to the release's invalidation, for the
    /// step-by-step driver (as [`Self::kvm_gmem_release_detach`]): None if
    /// the file lives on.
    pub fn remove_vma_detach(
        &mut self,
        vma: u64,
    ) -> Result<Option<Vec<(usize, u64, u64)>>, KvmError> {
        Ok(self
            .remove_vma(vma)?
            .map(|(file, _)| self.kvm_gmem_unbind_file(&file)))
    }

    /// Every memslot bound to a released file loses it; the gfn ranges of
    /// the whole file, per bound slot.
    fn kvm_gmem_unbind_file(&mut self, file: &GmemFile) -> Vec<(usize, u64, u64)> {
        for &(_, as_id, id) in file.bindings.values() {
            if let Some(i) = self.memslots.index_of_id(as_id, id) {
                // slot->gmem.file = NULL
                self.memslots.at_mut(as_id, i).expect("found").gmem_open = false;
            }
        }
        self.gmem_gfn_ranges(&file.bindings, 0, u64::MAX)
    }

    /// A guest_memfd file released (counted once its invalidation is over).
    pub fn note_gmem_closed(&mut self) {
        self.counters.gmem_closed += 1;
    }

    /// The gfns of file pages [start, end) in each bound slot, as
    /// (as_id, start, end).
    pub(super) fn gmem_gfn_ranges(
        &self,
        bindings: &BTreeMap<u64, (u64, usize, u16)>,
        start: u64,
        end: u64,
    ) -> Vec<(usize, u64, u64)> {
        bindings
            .iter()
            .filter(|(&first, &(last, _, _))| first < end && last > start)
            .filter_map(|(&first, &(last, as_id, id))| {
                let i = self.memslots.index_of_id(as_id, id)?;
                let base = self.memslots.address_space(as_id)[i].base_gfn;
                Some((
                    as_id,
                    base + start.max(first) - first,
                    base + end.min(last) - first,
                ))
            })
            .collect()
    }

    /// kvm_gmem_invalidate_begin() and _end() around a truncation, over the
    /// bound gfn ranges: for each, kvm_mmu_unmap_gfn_range() (add, then zap
    /// the mappings of the kinds in `attr_filter`, from
    /// [`Self::kvm_gmem_get_invalidate_filter`]).
    fn kvm_gmem_invalidate(
        &mut self,
        ranges: &[(usize, u64, u64)],
        attr_filter: u64,
    ) -> Result<(), KvmError> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.note_mmu_lock();
        self.kvm_mmu_invalidate_begin();
        let mut flush = false;
        for &(as_id, s, e) in ranges {
            match self.kvm_mmu_unmap_gfn_range(as_id, s, e, attr_filter) {
                Ok(f) => flush |= f,
                Err(err) => {
                    // Never leave faults blocked behind a half-done
                    // invalidation.
                    self.kvm_mmu_invalidate_end()?;
                    return Err(err);
                }
            }
        }
        if flush {
            self.kvm_flush_remote_tlbs();
        }
        self.note_mmu_lock();
        self.kvm_mmu_invalidate_end()
    }

    /// kvm_gmem_get_invalidate_filter(): which kinds of mappings a hole
    /// punch or release of file pages [start, end) zaps. 6.18: shared ones
    /// for a file created GUEST_MEMFD_FLAG_INIT_SHARED, else private ones
    /// (kvm_gmem_invalidate_begin passes it as kvm_gfn_range.attr_filter);
    /// the in-place series: the kinds the range's attributes hold now. 6.8
    /// (and v11) had no filter: both kinds.
    pub fn kvm_gmem_get_invalidate_filter(&self, fd: u64, start: u64, end: u64) -> u64 {
        if self.config.semantics.is_gmem_inplace() {
            return self.gmem_inplace_invalidate_filter(fd, start, end);
        }
        if !self.config.semantics.after_6_8() {
            return KVM_FILTER_SHARED | KVM_FILTER_PRIVATE;
        }
        match self.gmem.get(&fd) {
            Some(f) if f.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 => KVM_FILTER_SHARED,
            _ => KVM_FILTER_PRIVATE,
        }
    }

    /// The open guest_memfd file and byte offset backing `gpa` in address
    /// space 0, if a bound memslot holds it (where a VMM punches its hole
    /// after a conversion to shared).
    pub fn gmem_location(&self, gpa: u64) -> Option<(u64, u64)> {
        let gfn = gpa >> PAGE_SHIFT;
        let slot = &self.memslots.address_space(0)[self.memslots.find(0, gfn)?];
        let fd = slot.guest_memfd.filter(|_| slot.gmem_open)?;
        // A file only a mapping keeps alive has no fd to punch through.
        self.own_gmem(fd).ok()?;
        Some((
            fd,
            ((slot.gmem_pgoff() + gfn - slot.base_gfn) << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1)),
        ))
    }
}

/// A file operation on a guest_memfd fd that the kernel refuses whatever
/// the file's state (kvm_gmem_fops has only mmap, open, release and
/// fallocate; the inode's setattr refuses every change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GmemFileOp {
    Read,
    Write,
    Pread,
    Pwrite,
    Lseek,
    Ftruncate,
    Fsync,
    Ioctl,
}

impl GmemFileOp {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "read" => Self::Read,
            "write" => Self::Write,
            "pread" => Self::Pread,
            "pwrite" => Self::Pwrite,
            "lseek" => Self::Lseek,
            "ftruncate" => Self::Ftruncate,
            "fsync" => Self::Fsync,
            "ioctl" => Self::Ioctl,
            _ => return None,
        })
    }
}

/// fstat(2) of a guest_memfd: the fields a user sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GmemStat {
    /// S_IFREG | 0600 (an anonymous inode made a regular file).
    pub mode: u32,
    pub size: u64,
    pub blksize: u64,
    /// Always 0: the folios are not accounted to the inode's blocks.
    pub blocks: u64,
    pub nlink: u64,
}

impl Kvm {
    /// The errno of `op` on guest_memfd `fd`: no read or write methods
    /// (vfs_read/vfs_write: EINVAL), no positional I/O or seeking (the file
    /// is opened without FMODE_PREAD/PWRITE/LSEEK: ESPIPE), truncation
    /// refused by kvm_gmem_setattr (EINVAL), no fsync (EINVAL), no ioctl
    /// (ENOTTY). EBADF if `fd` is not a guest_memfd of this VM.
    pub fn kvm_gmem_file_op(&self, fd: u64, op: GmemFileOp) -> Result<(), KvmError> {
        self.own_gmem(fd)?;
        let (errno, why) = match op {
            GmemFileOp::Read | GmemFileOp::Write => (EINVAL, "guest_memfd has no read/write"),
            GmemFileOp::Pread | GmemFileOp::Pwrite | GmemFileOp::Lseek => {
                (ESPIPE, "guest_memfd cannot seek or do positional I/O")
            }
            GmemFileOp::Ftruncate => (EINVAL, "guest_memfd's size is immutable"),
            GmemFileOp::Fsync => (EINVAL, "guest_memfd has no fsync"),
            GmemFileOp::Ioctl => (ENOTTY, "guest_memfd has no ioctls"),
        };
        fail(errno, why)
    }

    /// fstat(2) of guest_memfd `fd`.
    pub fn kvm_gmem_fstat(&self, fd: u64) -> Result<GmemStat, KvmError> {
        let f = self.own_gmem(fd)?;
        Ok(GmemStat {
            mode: 0o100600,
            size: f.size,
            blksize: PAGE_SIZE,
            blocks: 0,
            nlink: 1,
        })
    }

    /// mmap(2) of guest_memfd `fd` (kvm_gmem_mmap): ENODEV unless the file
    /// was created with GUEST_MEMFD_FLAG_MMAP (6.8 has no mmap at all),
    /// EINVAL for a private (copy-on-write) mapping.
    pub fn kvm_gmem_mmap(&self, fd: u64, shared: bool) -> Result<(), KvmError> {
        let f = self.own_gmem(fd)?;
        if f.flags & GUEST_MEMFD_FLAG_MMAP == 0 {
            return fail(
                ENODEV,
                format!("guest_memfd {fd} was created without GUEST_MEMFD_FLAG_MMAP"),
            );
        }
        if !shared {
            return fail(EINVAL, "guest_memfd can only be mapped MAP_SHARED");
        }
        Ok(())
    }
}
