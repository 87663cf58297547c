"""Recording: :class:`Recorder` wraps a Vm and keeps every call made through
it, with its result, as a :class:`memattr.trace_format.Trace`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memattr.trace_format import (
    FLAG_PRIVATE,
    FLAG_WRITE,
    OP_CREATE_GUEST_MEMFD,
    OP_FAULT,
    OP_GUEST_MEMFD_CLOSE,
    OP_GUEST_MEMFD_FALLOCATE,
    OP_SET_MEMORY_ATTRIBUTES,
    OP_SET_USER_MEMORY_REGION,
    Trace,
    ops_from_rows,
)
from memattr.uapi import KVM_SET_MEMORY_ATTRIBUTES, U32_MAX, U64_MAX, kvm_memory_attributes


class Recorder:
    """Wraps a Vm; records every call made through it, with its result.

    Use it in place of the Vm (other attributes pass through)::

        rec = Recorder(memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM))
        fd = rec.create_guest_memfd(1 << 30)
        rec.set_user_memory_region(0, 0, 1 << 30, 0x7000_0000_0000,
                                   memattr.KVM_MEM_GUEST_MEMFD, fd, 0)
        rec.set_memory_attributes(0, 1 << 30, memattr.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        trace = rec.trace()

    Calls that raise are recorded with ``-errno`` and re-raised. A Vm's
    ``ioctl(KVM_SET_MEMORY_ATTRIBUTES, ...)`` made through the recorder is
    recorded as a set; other ioctls pass through unrecorded.
    """

    def __init__(self, vm: Any, meta: dict[str, Any] | None = None) -> None:
        self._vm = vm
        self._rows: list[tuple[int, int, int, int, int, int, int, int]] = []
        self._regions: list[list[int]] = []
        self._meta = dict(meta or {})
        self._meta.setdefault("vm_type", int(getattr(vm, "vm_type", 0)))
        self._meta.setdefault("vm_kwargs", {})
        self._meta.setdefault("name", "recorded")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)

    @property
    def vm(self) -> Any:
        return self._vm

    def _call(self, row: list[int], fn: Callable[[], Any], ok: Callable[[Any], int]) -> Any:
        try:
            value = fn()
        except OSError as e:
            row[5] = -(e.errno or 0)
            self._rows.append(tuple(row))  # type: ignore[arg-type]
            raise
        row[5] = ok(value)
        self._rows.append(tuple(row))  # type: ignore[arg-type]
        return value

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        row = [OP_SET_MEMORY_ATTRIBUTES, address & U64_MAX, size & U64_MAX, attributes & U64_MAX, flags & U64_MAX, 0, 0, 0]
        return self._call(row, lambda: self._vm.set_memory_attributes(address, size, attributes, flags), lambda _: 0)

    def fault(self, gpa: int, private: bool = False, write: bool = False) -> int:
        flags = (FLAG_PRIVATE if private else 0) | (FLAG_WRITE if write else 0)
        row = [OP_FAULT, gpa & U64_MAX, 0, 0, 0, 0, flags, 0]
        return self._call(row, lambda: self._vm.fault(gpa, private=private, write=write), int)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        row = [OP_CREATE_GUEST_MEMFD, 0, size & U64_MAX, 0, flags & U64_MAX, 0, 0, 0]
        return self._call(row, lambda: self._vm.create_guest_memfd(size, flags), int)

    def guest_memfd_fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        row = [OP_GUEST_MEMFD_FALLOCATE, int(offset) & U64_MAX, int(length) & U64_MAX, int(fd) & U32_MAX, int(mode) & U64_MAX, 0, 0, 0]
        return self._call(row, lambda: self._vm.guest_memfd_fallocate(fd, mode, offset, length), lambda _: 0)

    def guest_memfd_close(self, fd: int) -> None:
        row = [OP_GUEST_MEMFD_CLOSE, 0, 0, int(fd) & U32_MAX, 0, 0, 0, 0]
        return self._call(row, lambda: self._vm.guest_memfd_close(fd), lambda _: 0)

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        flags: int = 0,
        guest_memfd: int = -1,
        guest_memfd_offset: int = 0,
    ) -> None:
        if len(self._regions) > 0xFFFF:
            raise OverflowError("a trace holds at most 65536 set_user_memory_region calls")
        self._regions.append([int(slot), int(userspace_addr) & U64_MAX, int(guest_memfd)])
        row = [
            OP_SET_USER_MEMORY_REGION,
            guest_phys_addr & U64_MAX,
            memory_size & U64_MAX,
            flags & U64_MAX,
            guest_memfd_offset & U64_MAX,
            0,
            0,
            len(self._regions) - 1,
        ]
        return self._call(
            row,
            lambda: self._vm.set_user_memory_region(
                slot, guest_phys_addr, memory_size, userspace_addr, flags, guest_memfd, guest_memfd_offset
            ),
            lambda _: 0,
        )

    def ioctl(self, request: int, arg: Any = 0) -> Any:
        if request != KVM_SET_MEMORY_ATTRIBUTES:
            return self._vm.ioctl(request, arg)
        attrs = kvm_memory_attributes.from_buffer_copy(bytes(arg))
        row = [
            OP_SET_MEMORY_ATTRIBUTES,
            int(attrs.address),
            int(attrs.size),
            int(attrs.attributes),
            int(attrs.flags),
            0,
            0,
            0,
        ]
        return self._call(row, lambda: self._vm.ioctl(request, arg), lambda _: 0)

    def trace(self) -> Trace:
        """What was recorded so far, as a Trace."""
        ops = ops_from_rows(self._rows)
        meta = dict(self._meta)
        meta["regions"] = [list(r) for r in self._regions]
        return Trace(ops, meta)
