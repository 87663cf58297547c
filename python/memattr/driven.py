"""guest_memfd and memslot operations driven step by step, for the
interleaving explorer.

Normally ``Vm.guest_memfd_fallocate``, ``Vm.guest_memfd_close`` and
``Vm.set_user_memory_region`` are whole native operations (the core takes
the VM's locks and runs every step). While :mod:`memattr.explore` runs
actors (``sched.hook`` is set) the Vm routes them here instead: the same
core steps (``rust/kvm/guest_memfd.rs``, ``memslots.rs``), called one by one
under the modelled locks, with a scheduling point at each kernel step
boundary, in the order virt/kvm/guest_memfd.c (Linux 6.8) runs them:

- kvm_gmem_fallocate(): the checks, then kvm_gmem_punch_hole() under the
  file's invalidation lock (filemap_invalidate_lock): kvm_gmem_invalidate_begin()
  (mmu_lock; kvm_mmu_invalidate_begin(); kvm_mmu_unmap_gfn_range() per bound
  range; one flush), the truncation (nothing to model), then
  kvm_gmem_invalidate_end() (mmu_lock; kvm_mmu_invalidate_end()).
- kvm_gmem_release(): slots_lock, then the invalidation lock; the file
  leaves its slots; the same begin/end over the whole file.
- __kvm_set_memory_region(): under slots_lock, one atomic step (the model's
  commit stands for the memslot swap and the zap under mmu_lock).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from memattr import _native, sched

if TYPE_CHECKING:
    from memattr.vm import Vm

GfnRanges = list[tuple[int, int, int]]


class InvalidateLock:
    """A guest_memfd inode's mapping->invalidate_lock (taken for write by a
    hole punch and by release). The model has no other use for it, so it
    is a plain lock with the explorer's scheduling points."""

    __slots__ = ("name", "_lock")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> InvalidateLock:
        if sched.hook is not None:
            sched.hook(sched.ACQUIRE, self)
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        if sched.hook is not None:
            sched.hook(sched.RELEASE, self)
        self._lock.release()


_invalidate_locks: weakref.WeakKeyDictionary[Vm, dict[int, InvalidateLock]] = (
    weakref.WeakKeyDictionary()
)


def filemap_invalidate_lock(vm: Vm, fd: int) -> InvalidateLock:
    """The invalidation lock of guest_memfd ``fd``'s inode."""
    locks = _invalidate_locks.setdefault(vm, {})
    lock = locks.get(fd)
    if lock is None:
        # Named by the file's rank among the VM's (fd numbers differ from
        # one VM to the next; a schedule's report should not).
        fds = [f[0] for f in vm.guest_memfds()]
        rank = fds.index(fd) if fd in fds else fd
        lock = locks[fd] = InvalidateLock(f"guest_memfd#{rank}->invalidate_lock")
    return lock


def kvm_gmem_invalidate_begin(vm: Vm, ranges: GfnRanges, attr_filter: int = 3) -> None:
    """mmu_lock, begin(), kvm_mmu_invalidate_range_add() and the zap per
    bound range of the mappings `attr_filter` names (the core's
    kvm_gmem_get_invalidate_filter()), one flush; nothing (no lock) if no
    slot is bound."""
    if not ranges:
        return
    kvm = vm._kvm
    with vm.mmu_lock:
        vm._inval.begin()
        flush = False
        try:
            for as_id, start, end in ranges:
                if sched.hook is not None:
                    sched.hook(sched.STEP, "kvm_mmu_unmap_gfn_range")
                if kvm.mmu_unmap_gfn_range(as_id, start, end, attr_filter):
                    flush = True
        except BaseException:
            # As the core's whole operation: never leave faults blocked
            # behind a half-done invalidation.
            vm._inval.end()
            raise
        if flush:
            vm.kvm_flush_remote_tlbs()


def kvm_gmem_invalidate_end(vm: Vm, ranges: GfnRanges) -> None:
    """mmu_lock, kvm_mmu_invalidate_end(); nothing if no slot is bound."""
    if not ranges:
        return
    with vm.mmu_lock:
        vm._inval.end()


def kvm_gmem_punch_hole(vm: Vm, fd: int, offset: int, length: int, ranges: GfnRanges) -> None:
    with filemap_invalidate_lock(vm, fd):
        attr_filter = vm._kvm.gmem_invalidate_filter(
            fd, offset >> 12, (offset + length) >> 12
        )
        kvm_gmem_invalidate_begin(vm, ranges, attr_filter)
        vm._kvm.truncate_inode_pages_range(fd, offset, length)
        kvm_gmem_invalidate_end(vm, ranges)
    vm._kvm.note_gmem_hole_punched()


def kvm_gmem_fallocate(vm: Vm, fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on a guest_memfd, step by step (see the module)."""
    if sched.hook is not None:
        sched.hook(sched.STEP, "kvm_gmem_fallocate")
    ranges = vm._kvm.gmem_fallocate_checks(fd, mode, offset, length)
    if ranges is None:
        return
    kvm_gmem_punch_hole(vm, fd, offset, length, ranges)


def kvm_gmem_release(vm: Vm, fd: int) -> None:
    """close(2) of a guest_memfd, step by step: the fd goes in one core
    step; the release follows if that was the file's last reference (a
    live mapping keeps the file: then nothing else happens)."""
    _drop_file_reference(vm, fd, lambda: vm._kvm.gmem_release_detach(fd))


def kvm_gmem_munmap(vm: Vm, vma: int) -> None:
    """munmap(2) of a guest_memfd mapping, step by step: the mapping's
    reference goes in one core step; if it was the file's last, the same
    release as close(2)'s follows (the kernel's __fput runs
    kvm_gmem_release)."""
    fd = _native.gmem_file_of_vma(vm._kvm, vma)  # ValueError if unmapped
    _drop_file_reference(vm, fd, lambda: _native.gmem_munmap_detach(vm._kvm, vma))


def _drop_file_reference(vm: Vm, fd: int, detach: Callable[[], list[tuple[int, int, int]] | None]) -> None:
    """fput() of guest_memfd ``fd``'s reference that ``detach`` drops in one
    core step (slots_lock and the file's invalidation lock held): if it was
    the last, kvm_gmem_release()'s invalidation over the whole file."""
    with vm.slots_lock, filemap_invalidate_lock(vm, fd):
        if sched.hook is not None:
            sched.hook(sched.STEP, "kvm_gmem_release")
        # Read while the file still exists (detach may take it).
        attr_filter = vm._kvm.gmem_invalidate_filter(fd, 0, 2**64 - 1)
        ranges = detach()
        if ranges is None:
            return
        kvm_gmem_invalidate_begin(vm, ranges, attr_filter)
        kvm_gmem_invalidate_end(vm, ranges)
    vm._kvm.note_gmem_closed()


def kvm_set_memory_region(
    vm: Vm,
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd: int,
    guest_memfd_offset: int,
    *,
    v1: bool = False,
) -> None:
    """KVM_SET_USER_MEMORY_REGION(2) with the uapi struct's fields, under
    slots_lock."""
    with vm.slots_lock:
        if sched.hook is not None:
            sched.hook(sched.STEP, "__kvm_set_memory_region")
        vm._kvm.set_memory_region_step(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd,
            guest_memfd_offset, v1,
        )


__all__ = [
    "InvalidateLock",
    "filemap_invalidate_lock",
    "kvm_gmem_fallocate",
    "kvm_gmem_invalidate_begin",
    "kvm_gmem_invalidate_end",
    "kvm_gmem_munmap",
    "kvm_gmem_punch_hole",
    "kvm_gmem_release",
    "kvm_set_memory_region",
]
