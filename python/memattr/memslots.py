"""Memslots as Python sees them: read-only views of the core's.

The rules of KVM_SET_USER_MEMORY_REGION(2) and guest_memfd binding live in
the core (``rust/kvm/memslots.rs``, ``rust/kvm/guest_memfd.rs``); this module
only presents the result. A :class:`Memslot` is a snapshot of one struct
kvm_memory_slot; identity follows the kernel's: a created or moved slot is
a new slot (a new ``serial``), while a flags change keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from memattr.uapi import KVM_MEM_GUEST_MEMFD, PAGE_SHIFT

if TYPE_CHECKING:
    from memattr._native import Kvm


class Memslot:
    """struct kvm_memory_slot, the fields the model keeps.

    ``id`` is the low 16 bits of the uapi slot number and ``as_id`` the high
    16; ``guest_memfd`` is the fd bound at creation (None without one) and
    ``gmem`` the same fd while the file is open (slot->gmem.file), None once
    it is closed.
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
        "gmem",
        "serial",
    )

    def __init__(self, info: tuple[Any, ...]) -> None:
        (
            self.id,
            self.as_id,
            self.base_gfn,
            self.npages,
            self.userspace_addr,
            self.flags,
            self.guest_memfd,
            self.guest_memfd_offset,
            gmem_open,
            self.serial,
        ) = info
        self.gmem: int | None = self.guest_memfd if gmem_open else None

    @property
    def end_gfn(self) -> int:
        """One past the last gfn (base_gfn + npages)."""
        return int(self.base_gfn + self.npages)

    @property
    def slot(self) -> int:
        """The uapi slot number: as_id << 16 | id."""
        return int((self.as_id << 16) | self.id)

    @property
    def gmem_pgoff(self) -> int:
        """First guest_memfd page backing base_gfn (slot->gmem.pgoff)."""
        return int(self.guest_memfd_offset >> PAGE_SHIFT)

    def has_guest_memfd(self) -> bool:
        """kvm_slot_can_be_private()."""
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Memslot):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    def __hash__(self) -> int:
        return hash((self.serial, self.flags, self.gmem))

    def __repr__(self) -> str:
        gm = f" guest_memfd={self.gmem}+{self.guest_memfd_offset:#x}" if self.gmem is not None else ""
        return (
            f"<Memslot as_id={self.as_id} id={self.id} gfn=[{self.base_gfn:#x}, "
            f"{self.end_gfn:#x}) flags={self.flags:#x}{gm}>"
        )


class Memslots:
    """Every address space's memslots (kvm->memslots[as_id]), read from the
    core. Views of one generation are cached, so reading them in a loop
    costs one native call per memslot update."""

    def __init__(self, kvm: Kvm) -> None:
        self._kvm = kvm
        self.nr_as_ids: int = kvm.config[4]
        self._gen = -1
        self._all: list[Memslot] = []
        self._by_serial: dict[int, Memslot] = {}

    def _slots(self) -> list[Memslot]:
        gen = self._kvm.memslot_generation
        if gen != self._gen:
            infos, gen = self._kvm.memslots()
            self._all = [Memslot(t) for t in infos]
            self._by_serial = {s.serial: s for s in self._all}
            self._gen = gen
        return self._all

    @property
    def generation(self) -> int:
        return int(self._kvm.memslot_generation)

    @property
    def nr_memslot_pages(self) -> int:
        return int(self._kvm.nr_memslot_pages)

    def find(self, as_id: int, gfn: int) -> Memslot | None:
        """The slot of ``as_id`` that contains ``gfn`` (gfn_to_memslot)."""
        if not 0 <= as_id < self.nr_as_ids:
            return None
        info = self._kvm.find_memslot(as_id, gfn)
        return None if info is None else self._view(info)

    def get(self, as_id: int, id: int) -> Memslot | None:
        """id_to_memslot()."""
        if not 0 <= as_id < self.nr_as_ids or not 0 <= id <= 0xFFFF:
            return None
        info = self._kvm.get_memslot(as_id, id)
        return None if info is None else self._view(info)

    def _view(self, info: tuple[Any, ...]) -> Memslot:
        # The cached view, unless the slot changed since it was cached.
        self._slots()
        s = self._by_serial.get(info[-1])
        if s is not None and s.flags == info[5] and (s.gmem is not None) == info[8]:
            return s
        return Memslot(info)

    def address_space(self, as_id: int) -> list[Memslot]:
        """One address space's slots in gfn order."""
        return [s for s in self._slots() if s.as_id == as_id]

    def in_range(self, as_id: int, start: int, end: int) -> list[Memslot]:
        """Slots of ``as_id`` intersecting [start, end), in gfn order."""
        return [s for s in self.address_space(as_id) if s.base_gfn < end and start < s.end_gfn]

    def by_serial(self, serial: int) -> Memslot:
        self._slots()
        try:
            return self._by_serial[serial]
        except KeyError:
            raise LookupError(f"no memslot with serial {serial}") from None

    def __iter__(self) -> Iterator[Memslot]:
        return iter(list(self._slots()))

    def __len__(self) -> int:
        return len(self._slots())


__all__ = ["Memslot", "Memslots"]
