"""guest_memfd as a file, as a user can observe it: the fd's file
operations, fstat, and host mappings whose accesses fault like the
kernel's (``GuestMemfdSigbus`` where it sends SIGBUS). Every answer comes
from the core (``rust/kvm/guest_memfd.rs``); this module only gives it a
file-like face."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from memattr import _native, sched

if TYPE_CHECKING:
    from memattr._native import Kvm


class GuestMemfdStat(NamedTuple):
    """fstat(2) of a guest_memfd, the fields that say what it is."""

    st_mode: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_nlink: int


def _munmap_at_gc(munmap: Callable[[int], None], vma: int) -> None:
    """A mapping object dropped without close(): munmap it, quietly (a
    finalizer must not raise). Not under the interleaving explorer: its
    actors hold the model's locks across scheduling points, and a
    finalizer may run anywhere; there the mapping stays, as a process's
    mapping that is never unmapped."""
    if sched.hook is not None:
        return
    try:
        munmap(vma)
    except Exception:  # noqa: BLE001 - a finalizer reports nothing
        pass


class GuestMemfdMapping:
    """A MAP_SHARED mapping of the first ``length`` bytes of a guest_memfd.
    Reads and writes go page by page through the kernel's fault handler
    (the core's one path, as ``vm.guest_memfd_read/write``): past the end of
    the file, or on a page that is not shared, they raise
    ``memattr.GuestMemfdSigbus``, and a write keeps the pages it stored
    before that page. Indexes outside the mapping raise IndexError, as
    ``mmap.mmap`` does.

    The mapping holds a reference on the file (vma->vm_file): closing the
    fd leaves the mapping working on the same page cache, and the file is
    released (its memslots unbound) only when its last mapping goes.
    ``close()`` (or ``munmap()``, or leaving a ``with`` block, or dropping
    the last reference to the object) unmaps it; after that every access
    raises ValueError, as ``mmap.mmap`` does once closed."""

    def __init__(self, kvm: Kvm, fd: int, length: int, vma: int, munmap: Callable[[int], None]) -> None:
        self._kvm = kvm
        self.fd = fd
        self.length = length
        self._vma: int | None = vma
        self._munmap = munmap
        # Holds neither the mapping nor itself: only what munmap needs.
        self._finalizer = weakref.finalize(self, _munmap_at_gc, munmap, vma)
        self._finalizer.atexit = False

    @property
    def closed(self) -> bool:
        return self._vma is None

    def _live(self) -> int:
        if self._vma is None:
            raise ValueError("mmap closed or invalid")
        return self._vma

    def close(self) -> None:
        """munmap(2): the mapping's reference on the file goes (the file's
        release if it was the last one). A second close does nothing."""
        if self._vma is None:
            return
        vma, self._vma = self._vma, None
        self._finalizer.detach()
        self._munmap(vma)

    munmap = close

    def __enter__(self) -> GuestMemfdMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.length

    def _span(self, offset: int, n: int) -> None:
        if not (0 <= offset and n >= 0 and offset + n <= self.length):
            raise IndexError(f"[{offset}, {offset + n}) is outside the mapping of {self.length} bytes")

    def read(self, offset: int, n: int) -> bytes:
        vma = self._live()
        self._span(offset, n)
        return _native.gmem_vma_read(self._kvm, vma, offset, n)

    def write(self, offset: int, data: bytes) -> None:
        vma = self._live()
        self._span(offset, len(data))
        _native.gmem_vma_write(self._kvm, vma, offset, bytes(data))

    def __getitem__(self, offset: int) -> int:
        return self.read(offset, 1)[0]

    def __setitem__(self, offset: int, value: int) -> None:
        self.write(offset, bytes([value]))


class GuestMemfdFile:
    """A guest_memfd fd of a Vm, as a file."""

    def __init__(self, kvm: Kvm, fd: int, munmap: Callable[[int], None]) -> None:
        self._kvm = kvm
        self.fd = fd
        self._munmap = munmap

    def _op(self, op: str) -> None:
        self._kvm.guest_memfd_file_op(self.fd, op)

    def read(self, n: int) -> bytes:
        self._op("read")
        raise AssertionError("unreachable: guest_memfd has no read")  # pragma: no cover

    def write(self, data: bytes) -> int:
        self._op("write")
        raise AssertionError("unreachable")  # pragma: no cover

    def pread(self, n: int, offset: int) -> bytes:
        self._op("pread")
        raise AssertionError("unreachable")  # pragma: no cover

    def pwrite(self, data: bytes, offset: int) -> int:
        self._op("pwrite")
        raise AssertionError("unreachable")  # pragma: no cover

    def lseek(self, offset: int, whence: int) -> int:
        self._op("lseek")
        raise AssertionError("unreachable")  # pragma: no cover

    def ftruncate(self, length: int) -> None:
        self._op("ftruncate")

    def fsync(self) -> None:
        self._op("fsync")

    def ioctl(self, request: int, arg: object = 0) -> int:
        self._op("ioctl")
        raise AssertionError("unreachable")  # pragma: no cover

    def fstat(self) -> GuestMemfdStat:
        return GuestMemfdStat(*self._kvm.guest_memfd_fstat(self.fd))

    def mmap(self, length: int, shared: bool = True) -> GuestMemfdMapping:
        """mmap(2) at offset 0: OSError(ENODEV) without
        GUEST_MEMFD_FLAG_MMAP, OSError(EINVAL) unless ``shared``. The
        mapping holds a reference on the file until it is closed."""
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        vma = _native.gmem_mmap(self._kvm, self.fd, shared)
        return GuestMemfdMapping(self._kvm, self.fd, length, vma, self._munmap)


__all__ = ["GuestMemfdFile", "GuestMemfdMapping", "GuestMemfdStat"]
