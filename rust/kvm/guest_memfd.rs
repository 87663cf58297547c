//! guest_memfd files: virt/kvm/guest_memfd.c's kvm_gmem_create(),
//! kvm_gmem_bind(), kvm_gmem_fallocate() / kvm_gmem_punch_hole() and
//! kvm_gmem_release(), Linux 6.8.
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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

/// One guest_memfd file of this VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmemFile {
    pub fd: u64,
    pub size: u64,
    pub flags: u64,
    /// gmem->bindings: first file page -> (end page, as_id, slot id).
    pub bindings: BTreeMap<u64, (u64, usize, u16)>,
}

impl GmemFile {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.bindings
            .range(..end)
            .next_back()
            .is_some_and(|(_, &(e, _, _))| e > start)
    }
}

impl Kvm {
    /// This VM's open guest_memfd `fd`, or EBADF.
    fn own_gmem(&self, fd: u64) -> Result<&GmemFile, KvmError> {
        match self.gmem.get(&fd) {
            Some(f) => Ok(f),
            None => fail(EBADF, format!("fd {fd} is not a guest_memfd of this VM")),
        }
    }

    /// This VM's open guest_memfd files, in fd order.
    pub fn guest_memfds(&self) -> impl Iterator<Item = &GmemFile> {
        self.gmem.values()
    }

    /// KVM_CREATE_GUEST_MEMFD (kvm_gmem_create): 6.8 lets any VM create one
    /// (binding it needs private memory); no flags are valid; the size is a
    /// loff_t that must be > 0 and page aligned. Returns the new fd.
    pub fn kvm_gmem_create(&mut self, size: u64, flags: u64) -> Result<u64, KvmError> {
        // 0 in 6.8; MMAP | INIT_SHARED with the in-place series.
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
                size,
                flags,
                bindings: BTreeMap::new(),
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
        let size = npages << PAGE_SHIFT;
        if offset > MAX_LFS_FILESIZE || offset & (PAGE_SIZE - 1) != 0 || offset + size > file.size {
            return fail(
                EINVAL,
                format!(
                    "guest_memfd range [{offset:#x}, {:#x}) is not page aligned or beyond the \
                     file's size {:#x}",
                    offset + size,
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

    /// kvm_gmem_bind() after its checks passed.
    pub(super) fn kvm_gmem_bind(
        &mut self,
        fd: u64,
        pgoff: u64,
        npages: u64,
        as_id: usize,
        id: u16,
    ) {
        if let Some(f) = self.gmem.get_mut(&fd) {
            f.bindings.insert(pgoff, (pgoff + npages, as_id, id));
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
        let file_size = self.own_gmem(fd)?.size;
        // vfs_fallocate().
        if offset < 0 || length <= 0 {
            return fail(
                EINVAL,
                format!("offset {offset} must be >= 0 and length {length} > 0"),
            );
        }
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
            self.gmem_attr_allocate(fd, offset as u64 >> PAGE_SHIFT, last as u64 >> PAGE_SHIFT);
            return Ok(());
        }
        let ranges = self.gmem_gfn_ranges(
            &self.gmem[&fd].bindings,
            offset as u64 >> PAGE_SHIFT,
            last as u64 >> PAGE_SHIFT,
        );
        let (first, end) = (offset as u64 >> PAGE_SHIFT, last as u64 >> PAGE_SHIFT);
        self.note_gmem_invalidate_filter(fd, first, end);
        self.kvm_gmem_invalidate(&ranges)?;
        self.gmem_attr_truncate(fd, first, end);
        self.counters.gmem_holes_punched += 1;
        Ok(())
    }

    /// close(2) of the last reference to a guest_memfd (kvm_gmem_release):
    /// every bound memslot loses the file (private faults there now exit),
    /// every mapping through it is zapped as for a hole over the whole
    /// file, and the bindings go. The memslots stay; the fd is free.
    pub fn kvm_gmem_release(&mut self, fd: u64) -> Result<(), KvmError> {
        self.own_gmem(fd)?;
        self.note_gmem_invalidate_filter(fd, 0, u64::MAX);
        let file = self.gmem.remove(&fd).expect("checked above");
        registry().owners.remove(&fd);
        for &(_, as_id, id) in file.bindings.values() {
            if let Some(i) = self.memslots.index_of_id(as_id, id) {
                // slot->gmem.file = NULL
                self.memslots.at_mut(as_id, i).expect("found").gmem_open = false;
            }
        }
        let ranges = self.gmem_gfn_ranges(&file.bindings, 0, u64::MAX);
        self.kvm_gmem_invalidate(&ranges)?;
        self.gmem_attr_file_release(fd);
        self.counters.gmem_closed += 1;
        Ok(())
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
    /// bound gfn ranges: for each, kvm_mmu_unmap_gfn_range() (add, then zap;
    /// private and shared mappings alike in 6.8).
    fn kvm_gmem_invalidate(&mut self, ranges: &[(usize, u64, u64)]) -> Result<(), KvmError> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.note_mmu_lock();
        self.kvm_mmu_invalidate_begin();
        let mut flush = false;
        for &(as_id, s, e) in ranges {
            self.kvm_mmu_invalidate_range_add(s, e);
            match self.kvm_unmap_gfn_range(as_id, s, e) {
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

    /// The open guest_memfd file and byte offset backing `gpa` in address
    /// space 0, if a bound memslot holds it (where a VMM punches its hole
    /// after a conversion to shared).
    pub fn gmem_location(&self, gpa: u64) -> Option<(u64, u64)> {
        let gfn = gpa >> PAGE_SHIFT;
        let slot = &self.memslots.address_space(0)[self.memslots.find(0, gfn)?];
        let fd = slot.guest_memfd.filter(|_| slot.gmem_open)?;
        Some((
            fd,
            ((slot.gmem_pgoff() + gfn - slot.base_gfn) << PAGE_SHIFT) | (gpa & (PAGE_SIZE - 1)),
        ))
    }
}
