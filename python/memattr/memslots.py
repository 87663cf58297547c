"""Memslots, guest_memfd files and the KVM_SET_USER_MEMORY_REGION(2) rules.

Follows virt/kvm/kvm_main.c (__kvm_set_memory_region, check_memory_region_flags)
and virt/kvm/guest_memfd.c (kvm_gmem_create, kvm_gmem_bind) as of Linux 6.8.
Every check runs before anything changes: a failing call leaves the memslots,
the guest_memfd bindings and the fd table exactly as they were.

Lookups must stay fast with thousands of slots: each address space keeps its
slots sorted by base_gfn (they never overlap within an address space, so the
ends are sorted too) next to a plain list of the bases for ``bisect``. Updates
build new lists and swap them in with one assignment, like the kernel's
active/inactive memslot sets, so a reader never sees half an update.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import Any

from memattr.uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    PAGE_SHIFT,
    PAGE_SIZE,
    U64_MAX,
)

_PAGE_MASK = PAGE_SIZE - 1
_U32_MAX = (1 << 32) - 1
_S64_MAX = (1 << 63) - 1


def _err(code: int, why: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {why}")


class Memslot:
    """struct kvm_memory_slot, the fields the model needs.

    ``id`` is the low 16 bits of the uapi slot number and ``as_id`` the high
    16; ``arch`` belongs to the MMU model (lpage info, mixed flags), ``None``
    until it stores something there. Identity matters: a moved slot is a new
    object, as in the kernel.
    """

    __slots__ = (
        "id",
        "as_id",
        "base_gfn",
        "npages",
        "userspace_addr",
        "flags",
        "guest_memfd",
        "guest_memfd_offset",
        "arch",
        "gmem",
    )

    def __init__(
        self,
        id: int,
        as_id: int,
        base_gfn: int,
        npages: int,
        userspace_addr: int = 0,
        flags: int = 0,
        guest_memfd: int | None = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        self.id = id
        self.as_id = as_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.userspace_addr = userspace_addr
        self.flags = flags
        self.guest_memfd = guest_memfd
        self.guest_memfd_offset = guest_memfd_offset
        self.arch: Any = None
        self.gmem: GuestMemfd | None = None

    @property
    def end_gfn(self) -> int:
        """One past the last gfn (base_gfn + npages)."""
        return self.base_gfn + self.npages

    @property
    def slot(self) -> int:
        """The uapi slot number: as_id << 16 | id."""
        return (self.as_id << 16) | self.id

    @property
    def gmem_pgoff(self) -> int:
        """First guest_memfd page backing base_gfn (slot->gmem.pgoff)."""
        return self.guest_memfd_offset >> PAGE_SHIFT

    def has_guest_memfd(self) -> bool:
        """kvm_slot_can_be_private()."""
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def __repr__(self) -> str:
        gm = f" guest_memfd={self.guest_memfd}+{self.guest_memfd_offset:#x}" if self.gmem else ""
        return (
            f"<Memslot as_id={self.as_id} id={self.id} gfn=[{self.base_gfn:#x}, "
            f"{self.end_gfn:#x}) flags={self.flags:#x}{gm}>"
        )


# --- guest_memfd ------------------------------------------------------------

# Simulated fds live far above anything the process can open (the default
# RLIMIT_NOFILE ceiling, fs.nr_open, is 1 << 20), so they never alias a real fd
# and a real fd passed as guest_memfd is "a file, but not a guest_memfd".
_GMEM_FD_BASE = 1 << 20


class GuestMemfd:
    """A guest_memfd file: its size, owner VM and memslot bindings."""

    __slots__ = ("fd", "size", "flags", "owner", "_bindings")

    def __init__(self, fd: int, size: int, flags: int, owner: object) -> None:
        self.fd = fd
        self.size = size
        self.flags = flags
        self.owner = owner  # a per-Vm token: gmem->kvm
        # (start_pgoff, end_pgoff, slot), sorted and disjoint: gmem->bindings.
        self._bindings: list[tuple[int, int, Memslot]] = []

    def bindings(self) -> list[tuple[int, int, Memslot]]:
        """[(first_pgoff, end_pgoff, slot)] in file order."""
        return list(self._bindings)

    def slot_for_pgoff(self, pgoff: int) -> Memslot | None:
        i = bisect_right(self._bindings, pgoff, key=lambda b: b[0]) - 1
        if i >= 0 and pgoff < self._bindings[i][1]:
            return self._bindings[i][2]
        return None

    def _overlaps(self, start: int, end: int) -> bool:
        i = bisect_left(self._bindings, end, key=lambda b: b[0])
        return i > 0 and self._bindings[i - 1][1] > start

    def _bind(self, slot: Memslot) -> None:
        start = slot.gmem_pgoff
        i = bisect_left(self._bindings, start, key=lambda b: b[0])
        self._bindings.insert(i, (start, start + slot.npages, slot))
        slot.gmem = self

    def _unbind(self, slot: Memslot) -> None:
        self._bindings = [b for b in self._bindings if b[2] is not slot]
        slot.gmem = None


class _GmemTable:
    """The process's simulated fd table for guest_memfd files."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[int, GuestMemfd] = {}
        self._next = _GMEM_FD_BASE

    def create(self, size: int, flags: int, owner: object) -> GuestMemfd:
        with self._lock:
            fd = self._next
            self._next += 1
            gmem = GuestMemfd(fd, size, flags, owner)
            self._files[fd] = gmem
            return gmem

    def get(self, fd: int) -> GuestMemfd | None:
        return self._files.get(fd)

    def owned_by(self, owner: object) -> list[GuestMemfd]:
        """The open files of one VM (gmem->kvm), in fd order."""
        with self._lock:
            return sorted((g for g in self._files.values() if g.owner is owner), key=lambda g: g.fd)

    def remove(self, fd: int) -> None:
        with self._lock:
            self._files.pop(fd, None)


gmem_files = _GmemTable()


def _fd_is_open(fd: int) -> bool:
    # fget() takes an unsigned int; fds above INT_MAX can never be open.
    if fd > 0x7FFFFFFF:
        return False
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def kvm_gmem_create(size: int, flags: int, owner: object) -> GuestMemfd:
    """KVM_CREATE_GUEST_MEMFD validation (6.8: no flags are valid yet)."""
    valid_flags = 0
    if flags & ~valid_flags:
        raise _err(errno.EINVAL, f"guest_memfd flags {flags:#x} are not supported")
    # size is a loff_t in the kernel: above S64_MAX it is negative.
    if size <= 0 or size > _S64_MAX or size & _PAGE_MASK:
        raise _err(errno.EINVAL, f"guest_memfd size {size:#x} must be > 0 and page aligned")
    return gmem_files.create(size, flags, owner)


def kvm_gmem_check_bind(owner: object, fd: int, offset: int, npages: int) -> GuestMemfd:
    """The checks of kvm_gmem_bind(), in its order, without binding."""
    fd &= _U32_MAX  # the uapi field is a __u32
    gmem = gmem_files.get(fd)
    if gmem is None:
        if _fd_is_open(fd):
            raise _err(errno.EINVAL, f"fd {fd} is not a guest_memfd")
        raise _err(errno.EBADF, f"fd {fd} is not open")
    if gmem.owner is not owner:
        raise _err(errno.EINVAL, f"guest_memfd {fd} belongs to another VM")
    size = npages << PAGE_SHIFT
    if offset > _S64_MAX or offset & _PAGE_MASK or offset + size > gmem.size:
        raise _err(
            errno.EINVAL,
            f"guest_memfd range [{offset:#x}, {offset + size:#x}) is not page aligned "
            f"or beyond the file's size {gmem.size:#x}",
        )
    start = offset >> PAGE_SHIFT
    if gmem._overlaps(start, start + npages):
        # 6.8 returns -EINVAL here, not -EEXIST (kvm_gmem_bind's common error path).
        raise _err(errno.EINVAL, f"guest_memfd {fd} range is already bound to another memslot")
    return gmem


# --- the memslot sets -------------------------------------------------------


class Memslots:
    """Every address space's memslots (kvm->memslots[as_id]).

    Per address space a list of base gfns and a list of slots in the same
    order, updated in place (an O(n) memmove, not a copy: 32k slots must not
    take O(n^2) refcount traffic). Lookups run without slots_lock, like the
    kernel's SRCU readers, so updates are published through a sequence count
    (a seqlock): a reader that saw an update in flight retries.
    """

    def __init__(self, nr_as_ids: int) -> None:
        self.nr_as_ids = nr_as_ids
        self._bases: list[list[int]] = [[] for _ in range(nr_as_ids)]
        self._slots: list[list[Memslot]] = [[] for _ in range(nr_as_ids)]
        self._by_id: list[dict[int, Memslot]] = [{} for _ in range(nr_as_ids)]
        self.nr_memslot_pages = 0
        # Even when stable, odd while an update is in flight; it also serves
        # as the memslot generation (it changes on every update).
        self._seq = 0

    @property
    def generation(self) -> int:
        return self._seq

    def _read_begin(self) -> int:
        seq = self._seq
        while seq & 1:
            time.sleep(0)  # let the writer (which holds slots_lock) finish
            seq = self._seq
        return seq

    def find(self, as_id: int, gfn: int) -> Memslot | None:
        """The slot of ``as_id`` that contains ``gfn`` (gfn_to_memslot)."""
        if not 0 <= as_id < self.nr_as_ids:
            return None
        bases = self._bases[as_id]
        slots = self._slots[as_id]
        while True:
            seq = self._seq
            if seq & 1:
                seq = self._read_begin()
            found = None
            i = bisect_right(bases, gfn) - 1
            if i >= 0:
                try:
                    slot = slots[i]
                except IndexError:  # raced with a removal; the retry sorts it out
                    slot = None
                # bisect put base_gfn <= gfn (a racing update is retried below).
                if slot is not None and gfn < slot.base_gfn + slot.npages:
                    found = slot
            if self._seq == seq:
                return found

    def in_range(self, as_id: int, start: int, end: int) -> list[Memslot]:
        """Slots of ``as_id`` intersecting [start, end), in gfn order
        (kvm_for_each_memslot_in_gfn_range)."""
        if not 0 <= as_id < self.nr_as_ids or start >= end:
            return []
        bases = self._bases[as_id]
        slots = self._slots[as_id]
        while True:
            seq = self._seq
            if seq & 1:
                seq = self._read_begin()
            i = bisect_right(bases, start) - 1
            if i < 0:
                i = 0
            elif i < len(slots) and slots[i].base_gfn + slots[i].npages <= start:
                i += 1
            found = slots[i : bisect_left(bases, end, i)]
            if self._seq == seq:
                return found

    def get(self, as_id: int, id: int) -> Memslot | None:
        """id_to_memslot()."""
        if not 0 <= as_id < self.nr_as_ids:
            return None
        return self._by_id[as_id].get(id)

    def address_space(self, as_id: int) -> list[Memslot]:
        """A snapshot of one address space's slots in gfn order."""
        while True:
            seq = self._read_begin()
            snap = list(self._slots[as_id])
            if self._seq == seq:
                return snap

    def __iter__(self) -> Iterator[Memslot]:
        for as_id in range(self.nr_as_ids):
            yield from self.address_space(as_id)

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_id)

    def check_overlap(self, as_id: int, id: int, start: int, end: int) -> bool:
        """kvm_check_memslot_overlap(): another slot intersects [start, end)."""
        return any(s.id != id for s in self.in_range(as_id, start, end))

    # Updates: callers hold slots_lock, so there is one writer at a time.

    def _install(self, slot: Memslot) -> None:
        bases = self._bases[slot.as_id]
        i = bisect_left(bases, slot.base_gfn)
        self._seq += 1
        try:
            bases.insert(i, slot.base_gfn)
            self._slots[slot.as_id].insert(i, slot)
            self._by_id[slot.as_id][slot.id] = slot
            self.nr_memslot_pages += slot.npages
        finally:
            self._seq += 1

    def _remove(self, slot: Memslot) -> None:
        bases = self._bases[slot.as_id]
        slots = self._slots[slot.as_id]
        i = bisect_left(bases, slot.base_gfn)
        if i >= len(slots) or slots[i] is not slot:  # pragma: no cover - internal misuse
            raise KeyError(slot)
        self._seq += 1
        try:
            del bases[i]
            del slots[i]
            del self._by_id[slot.as_id][slot.id]
            self.nr_memslot_pages -= slot.npages
        finally:
            self._seq += 1

    def _changed(self) -> None:
        """A slot changed in place (flags): readers must see a new generation."""
        self._seq += 2


class MemslotChange(enum.Enum):
    """enum kvm_mr_change, plus NONE for "nothing to change"."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"
    NONE = "none"


def check_memory_region_flags(
    flags: int, *, has_private_mem: bool, has_readonly_mem: bool
) -> None:
    valid_flags = KVM_MEM_LOG_DIRTY_PAGES
    if has_private_mem:
        valid_flags |= KVM_MEM_GUEST_MEMFD
    # Dirty logging private memory is not supported.
    if flags & KVM_MEM_GUEST_MEMFD:
        valid_flags &= ~KVM_MEM_LOG_DIRTY_PAGES
    if has_readonly_mem:
        valid_flags |= KVM_MEM_READONLY
    if flags & ~valid_flags:
        raise _err(errno.EINVAL, f"memslot flags {flags:#x} not valid (valid: {valid_flags:#x})")


def _access_ok(addr: int, size: int) -> bool:
    # x86-64 6.8 __access_ok(): the end must not wrap and must stay in the
    # user half (as a signed long it is non-negative).
    end = addr + size
    return end <= U64_MAX and end < (1 << 63)


def prepare_memory_region(
    memslots: Memslots,
    *,
    owner: object,
    has_private_mem: bool,
    has_readonly_mem: bool,
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd: int,
    guest_memfd_offset: int,
) -> tuple[MemslotChange, Memslot | None, Memslot | None, GuestMemfd | None]:
    """Every check of __kvm_set_memory_region() and kvm_gmem_bind(), in the
    kernel's order, without changing anything.

    Returns ``(change, old, new, gmem)``; the caller commits it.
    """
    check_memory_region_flags(
        flags, has_private_mem=has_private_mem, has_readonly_mem=has_readonly_mem
    )
    as_id = slot >> 16
    id = slot & 0xFFFF

    # General sanity checks.
    if memory_size & _PAGE_MASK:
        raise _err(errno.EINVAL, f"memory_size {memory_size:#x} is not page aligned")
    if guest_phys_addr & _PAGE_MASK:
        raise _err(errno.EINVAL, f"guest_phys_addr {guest_phys_addr:#x} is not page aligned")
    if userspace_addr & _PAGE_MASK or not _access_ok(userspace_addr, memory_size):
        raise _err(
            errno.EINVAL,
            f"userspace_addr {userspace_addr:#x} is not page aligned or "
            f"[addr, addr + size) is not a user range",
        )
    if flags & KVM_MEM_GUEST_MEMFD and (
        guest_memfd_offset & _PAGE_MASK or guest_memfd_offset + memory_size > U64_MAX
    ):
        raise _err(
            errno.EINVAL,
            f"guest_memfd_offset {guest_memfd_offset:#x} is not page aligned or wraps",
        )
    if as_id >= memslots.nr_as_ids or id >= KVM_MEM_SLOTS_NUM:
        raise _err(
            errno.EINVAL,
            f"slot {slot:#x}: address space {as_id} (this VM has {memslots.nr_as_ids}) "
            f"or id {id} out of range",
        )
    if guest_phys_addr + memory_size > U64_MAX:
        raise _err(errno.EINVAL, "guest_phys_addr + memory_size wraps")
    if memory_size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
        raise _err(errno.EINVAL, f"memory_size {memory_size:#x} exceeds KVM_MEM_MAX_NR_PAGES")

    old = memslots.get(as_id, id)

    if memory_size == 0:
        if old is None or old.npages == 0:
            raise _err(errno.EINVAL, f"slot {slot:#x} does not exist, nothing to delete")
        return MemslotChange.DELETE, old, None, None

    base_gfn = guest_phys_addr >> PAGE_SHIFT
    npages = memory_size >> PAGE_SHIFT

    if old is None:
        change = MemslotChange.CREATE
    else:
        # Private memslots are immutable, they can only be deleted. 6.8 only
        # checks the new flags; the old slot's binding cannot be dropped
        # through a flags change either (it would orphan the binding), so the
        # model refuses both.
        if flags & KVM_MEM_GUEST_MEMFD or old.flags & KVM_MEM_GUEST_MEMFD:
            raise _err(errno.EINVAL, f"guest_memfd slot {slot:#x} can only be deleted")
        if (
            userspace_addr != old.userspace_addr
            or npages != old.npages
            or (flags ^ old.flags) & KVM_MEM_READONLY
        ):
            raise _err(
                errno.EINVAL,
                f"slot {slot:#x}: only the gpa or the dirty-logging flag of an "
                f"existing slot can change",
            )
        if base_gfn != old.base_gfn:
            change = MemslotChange.MOVE
        elif flags != old.flags:
            change = MemslotChange.FLAGS_ONLY
        else:
            return MemslotChange.NONE, old, old, None

    if change in (MemslotChange.CREATE, MemslotChange.MOVE) and memslots.check_overlap(
        as_id, id, base_gfn, base_gfn + npages
    ):
        raise _err(
            errno.EEXIST,
            f"gfn range [{base_gfn:#x}, {base_gfn + npages:#x}) overlaps another "
            f"memslot in address space {as_id}",
        )

    gmem = None
    if flags & KVM_MEM_GUEST_MEMFD:
        gmem = kvm_gmem_check_bind(owner, guest_memfd, guest_memfd_offset, npages)

    new = Memslot(
        id,
        as_id,
        base_gfn,
        npages,
        userspace_addr,
        flags,
        gmem.fd if gmem is not None else None,
        guest_memfd_offset if gmem is not None else 0,
    )
    return change, old, new, gmem


__all__ = [
    "GuestMemfd",
    "Memslot",
    "MemslotChange",
    "Memslots",
    "check_memory_region_flags",
    "gmem_files",
    "kvm_gmem_check_bind",
    "kvm_gmem_create",
    "prepare_memory_region",
]
