"""The guest_memfd in-place conversion series, as the Vm drives it
(``Vm(..., semantics="gmem-inplace")``; ``"gmem-inplace-v5"`` for v5's
content modes). Every rule lives in the core (``rust/kvm/gmem_attributes.rs``);
this module only adapts arguments and calls it:

- ``vm.guest_memfd_set_memory_attributes(fd, offset, size, attributes,
  flags=0)``: KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd. Raises OSError
  with the kernel's errno; EAGAIN (a page in use), ENOMEM and v5's
  EOPNOTSUPP carry ``error_offset`` as the kernel writes it back.
- ``vm.guest_memfd_ioctl(fd, request, arg=0, mutate_flag=True)``: fcntl.ioctl()
  on the guest_memfd fd (struct kvm_memory_attributes2; EFAULT for a short
  buffer; error_offset written into the caller's buffer on failure).
- ``vm.guest_memfd_pin(fd, offset, npages=1)`` / ``guest_memfd_unpin``:
  an elevated refcount, as GUP or in-flight I/O would hold one, so the
  EAGAIN + error_offset path and a VMM's retry loop can be driven.
- ``vm.guest_memfd_read(fd, offset, length)`` / ``guest_memfd_write(fd,
  offset, data)``: host access through the file's mmap
  (GUEST_MEMFD_FLAG_MMAP); a private page raises ``GuestMemfdSigbus``. The
  same core path as ``vm.guest_memfd_mmap()``'s mapping, under every
  semantics (rust/kvm/gmem_mmap.rs).
- ``vm.finalize_vm()``: the SNP/TDX launch finish that ends v5's PRESERVE.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING, Any

from memattr import _args, _native
from memattr.ioctl import _copy_in, _oserror, fcntl_ioctl
from memattr.uapi import KVM_SET_MEMORY_ATTRIBUTES2, PAGE_SHIFT, kvm_memory_attributes2

if TYPE_CHECKING:
    from memattr.vm import Vm


class GuestMemfdInplaceMixin:
    """The Vm's methods for the in-place conversion series."""

    _kvm: Any

    def _lock_conflict(self) -> Any:  # pragma: no cover - provided by Vm
        raise NotImplementedError

    def guest_memfd_set_memory_attributes(
        self, fd: int, offset: int, size: int, attributes: int, flags: int = 0,
        reserved: tuple[int, ...] = (0,) * 11,
    ) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd ``fd`` (see the module)."""
        done = _native.gmem_set_memory_attributes2(
            self._kvm, fd, offset, size, attributes, flags, reserved
        )
        if not done:
            self._lock_conflict()

    def guest_memfd_ioctl(
        self, fd: int, request: int, arg: Any = 0, mutate_flag: bool = True
    ) -> int | bytes:
        """fcntl.ioctl(guest_memfd_fd, request, arg, mutate_flag) against the
        model: KVM_SET_MEMORY_ATTRIBUTES2; any other request is ENOTTY."""
        fd = _args.uint("fd", fd)

        def dispatch(req: int, int_arg: int | None, buf: Any) -> int:
            if req != KVM_SET_MEMORY_ATTRIBUTES2:
                raise _oserror(errno.ENOTTY, f"unknown guest_memfd ioctl {req:#x}")
            if buf is None:
                raise _oserror(
                    errno.EFAULT,
                    "KVM_SET_MEMORY_ATTRIBUTES2 takes a pointer to struct "
                    "kvm_memory_attributes2 (pass a buffer)",
                )
            a = _copy_in(buf, kvm_memory_attributes2, "KVM_SET_MEMORY_ATTRIBUTES2")
            try:
                self.guest_memfd_set_memory_attributes(
                    fd, a.offset, a.size, a.attributes, a.flags, tuple(a.reserved)
                )
            except OSError as e:
                off = getattr(e, "error_offset", None)
                if off is not None:
                    # copy_to_user() of the whole struct, error_offset set.
                    a.error_offset = off
                    buf[: ctypes.sizeof(a)] = bytes(a)
                raise
            return 0

        return fcntl_ioctl(request, arg, mutate_flag, dispatch)

    def guest_memfd_pin(self, fd: int, offset: int, npages: int = 1) -> None:
        """Elevate the refcount of ``npages`` pages from ``offset`` (page
        aligned), as pin_user_pages() on the file's mmap would. EFAULT if a
        page is private or past the end (GUP's fault gets SIGBUS), ENODEV
        without GUEST_MEMFD_FLAG_MMAP; nothing pinned on failure."""
        _native.gmem_pin(self._kvm, fd, offset, npages)

    def guest_memfd_unpin(self, fd: int, offset: int, npages: int = 1) -> None:
        """unpin_user_pages(): drop one pin per page (ValueError if a page
        holds none)."""
        _native.gmem_unpin(self._kvm, fd, offset, npages)

    def guest_memfd_read(self, fd: int, offset: int, length: int) -> bytes:
        """A host read through the file's mmap, as ``vm.guest_memfd_mmap()``'s
        mapping reads (the same core path, rust/kvm/gmem_mmap.rs):
        GuestMemfdSigbus where the kernel sends SIGBUS (past the end; a page
        that is not shared: private under the series, any page of a 6.18 file
        without INIT_SHARED); ENODEV without GUEST_MEMFD_FLAG_MMAP."""
        return bytes(self._kvm.guest_memfd_user_read(fd, offset, length))

    def guest_memfd_write(self, fd: int, offset: int, data: bytes) -> None:
        """A host write through the file's mmap (as guest_memfd_read): page
        by page, so the pages before a SIGBUS keep what was written."""
        self._kvm.guest_memfd_user_write(fd, offset, bytes(data))

    def guest_memfd_attributes(self, fd: int) -> list[tuple[int, int, int]]:
        """The file's attributes as runs of pages (start, end, attributes)."""
        return list(_native.gmem_attribute_runs(self._kvm, fd))

    def guest_memfd_get_attributes(self, fd: int, offset: int) -> int:
        """The attributes of the file page holding byte ``offset``."""
        return int(_native.gmem_get_attributes(self._kvm, fd, offset))

    def guest_memfd_allocated(self, fd: int) -> list[tuple[int, int]]:
        """Runs of pages that have a folio (allocated by fallocate, faults,
        host access or pins; gone with a hole)."""
        return list(_native.gmem_allocated_runs(self._kvm, fd))

    def guest_memfd_pinned(self, fd: int) -> list[tuple[int, int]]:
        """(page, extra references) of the file's pinned pages."""
        return list(_native.gmem_pinned_pages(self._kvm, fd))

    def guest_memfd_store_usage(self, fd: int) -> tuple[int, int]:
        """(bytes, entries) of the file's attribute store."""
        b, n = _native.gmem_store_usage(self._kvm, fd)
        return int(b), int(n)

    def finalize_vm(self) -> None:
        """KVM_SEV_SNP_LAUNCH_FINISH / KVM_TDX_FINALIZE_VM: from now on v5
        refuses PRESERVE on SNP and TDX (kvm->arch.pre_fault_allowed)."""
        _native.gmem_finalize_vm(self._kvm)

    @property
    def inplace_stats(self) -> dict[str, int]:
        """The series' counters (set calls, conversions, early returns,
        EAGAIN/ENOMEM/EOPNOTSUPP, invalidations and their filters, host
        unmaps, SIGBUS, pages zeroed or scrambled)."""
        return dict(_native.gmem_counters(self._kvm))


def retry_set_memory_attributes(
    vm: Vm, fd: int, offset: int, size: int, attributes: int, flags: int = 0,
    *, on_busy: Any = None, max_tries: int = 16,
) -> int:
    """A VMM's conversion loop: KVM_SET_MEMORY_ATTRIBUTES2, and on EAGAIN
    call ``on_busy(error_offset)`` (which should drop the reference on that
    page, e.g. unpin it) and retry the whole range: the kernel converts all
    or nothing, so nothing before error_offset was converted either.
    Returns the number of tries."""
    for tries in range(1, max_tries + 1):
        try:
            vm.guest_memfd_set_memory_attributes(fd, offset, size, attributes, flags)
            return tries
        except OSError as e:
            if e.errno != errno.EAGAIN or on_busy is None:
                raise
            on_busy(e.error_offset)  # type: ignore[attr-defined]
    raise TimeoutError(f"still busy after {max_tries} tries")




class InPlaceVmm:
    """A VMM on the in-place API, for replaying traces recorded against the
    per-VM API: ``set_memory_attributes(gpa, size, ...)`` becomes
    KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd behind each memslot piece
    of the range (the conversion a VMM issues in place); every other call
    goes to the Vm. Pieces of the range no guest_memfd backs are skipped and
    counted (``unbacked_pages``): in place there is no per-VM attribute to
    set there. Use with ``memattr.replay(trace, InPlaceVmm(vm))``."""

    def __init__(self, vm: Vm) -> None:
        if not vm.semantics.startswith("gmem-inplace"):
            raise ValueError(f"the Vm must use a gmem-inplace semantics, not {vm.semantics!r}")
        self.vm = vm
        self.unbacked_pages = 0
        self.gmem_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.vm, name)

    @property
    def store(self) -> GuestMemfdAttributes:
        """The attributes in place, read through the memslots (what the
        replayer samples for memory, and what attribute_bytes() counts)."""
        return GuestMemfdAttributes(self.vm)

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        covered = 0
        for slot in self.vm.memslots.in_range(0, start, end):
            if slot.gmem is None:
                continue
            s, e = max(start, slot.base_gfn), min(end, slot.end_gfn)
            offset = slot.guest_memfd_offset + ((s - slot.base_gfn) << PAGE_SHIFT)
            self.gmem_calls += 1
            self.vm.guest_memfd_set_memory_attributes(
                slot.gmem, offset, (e - s) << PAGE_SHIFT, attributes, flags
            )
            covered += e - s
        self.unbacked_pages += max(0, end - start - covered)


class GuestMemfdAttributes:
    """A read-only view of a Vm's per-file attributes in guest physical
    terms: ``memory_bytes()`` / ``entry_count()`` add up every guest_memfd
    file's store, ``get(gfn)`` and ``count_pages(start, end, mask, value)``
    read the file page each gfn's memslot binds (0, shared, where no
    guest_memfd backs the gfn). It reads the core's state, decides nothing."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def memory_bytes(self) -> int:
        return sum(self.vm.guest_memfd_store_usage(f[0])[0] for f in self.vm.guest_memfds())

    def entry_count(self) -> int:
        return sum(self.vm.guest_memfd_store_usage(f[0])[1] for f in self.vm.guest_memfds())

    def get(self, gfn: int) -> int:
        slot = self.vm.memslots.find(0, gfn)
        if slot is None or slot.gmem is None:
            return 0
        off = slot.guest_memfd_offset + ((gfn - slot.base_gfn) << PAGE_SHIFT)
        return self.vm.guest_memfd_get_attributes(slot.gmem, off)

    def count_pages(self, start: int, end: int, mask: int, value: int) -> int:
        """gfns in [start, end) whose attributes & mask == value."""
        runs_of: dict[int, list[tuple[int, int, int]]] = {}
        n = 0
        backed = 0
        for slot in self.vm.memslots.in_range(0, start, end):
            if slot.gmem is None:
                continue
            s, e = max(start, slot.base_gfn), min(end, slot.end_gfn)
            first = (slot.guest_memfd_offset >> PAGE_SHIFT) + (s - slot.base_gfn)
            last = first + (e - s)
            if slot.gmem not in runs_of:
                runs_of[slot.gmem] = self.vm.guest_memfd_attributes(slot.gmem)
            covered = 0
            for rs, re_, attrs in runs_of[slot.gmem]:
                lo, hi = max(rs, first), min(re_, last)
                if lo < hi:
                    covered += hi - lo
                    if attrs & mask == value:
                        n += hi - lo
            if value == 0:  # pages of the file no run lists hold 0
                n += (last - first) - covered
            backed += e - s
        if value == 0:
            n += (end - start) - backed
        return n


__all__ = ["GuestMemfdAttributes", "GuestMemfdInplaceMixin", "InPlaceVmm", "retry_set_memory_attributes"]
