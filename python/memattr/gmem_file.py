"""guest_memfd as a file, as a user can observe it: the fd's file
operations, fstat, and host mappings whose accesses fault like the
kernel's (``GuestMemfdSigbus`` where it sends SIGBUS). Every answer comes
from the core (``rust/kvm/guest_memfd.rs``); this module only gives it a
file-like face."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from memattr._native import Kvm


class GuestMemfdStat(NamedTuple):
    """fstat(2) of a guest_memfd, the fields that say what it is."""

    st_mode: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_nlink: int


class GuestMemfdMapping:
    """A MAP_SHARED mapping of the first ``length`` bytes of a guest_memfd.
    Reads and writes go page by page through the kernel's fault handler
    (the core's one path, as ``vm.guest_memfd_read/write``): past the end of
    the file, or on a page that is not shared, they raise
    ``memattr.GuestMemfdSigbus``, and a write keeps the pages it stored
    before that page. Indexes outside the mapping raise IndexError, as
    ``mmap.mmap`` does."""

    def __init__(self, kvm: Kvm, fd: int, length: int) -> None:
        self._kvm = kvm
        self.fd = fd
        self.length = length

    def __len__(self) -> int:
        return self.length

    def _span(self, offset: int, n: int) -> None:
        if not (0 <= offset and n >= 0 and offset + n <= self.length):
            raise IndexError(f"[{offset}, {offset + n}) is outside the mapping of {self.length} bytes")

    def read(self, offset: int, n: int) -> bytes:
        self._span(offset, n)
        return self._kvm.guest_memfd_user_read(self.fd, offset, n)

    def write(self, offset: int, data: bytes) -> None:
        self._span(offset, len(data))
        self._kvm.guest_memfd_user_write(self.fd, offset, bytes(data))

    def __getitem__(self, offset: int) -> int:
        return self.read(offset, 1)[0]

    def __setitem__(self, offset: int, value: int) -> None:
        self.write(offset, bytes([value]))


class GuestMemfdFile:
    """A guest_memfd fd of a Vm, as a file."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self._kvm = kvm
        self.fd = fd

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
        GUEST_MEMFD_FLAG_MMAP, OSError(EINVAL) unless ``shared``."""
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        self._kvm.guest_memfd_mmap(self.fd, shared)
        return GuestMemfdMapping(self._kvm, self.fd, length)


__all__ = ["GuestMemfdFile", "GuestMemfdMapping", "GuestMemfdStat"]
