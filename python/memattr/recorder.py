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
    OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2,
    OP_GUEST_MEMFD_FALLOCATE,
    OP_SET_MEMORY_ATTRIBUTES,
    OP_SET_USER_MEMORY_REGION,
    Trace,
    ops_from_rows,
)
from memattr.ioctl import vm_ioctl
from memattr.uapi import KVM_MEM_GUEST_MEMFD, U32_MAX, U64_MAX


class UnrecordableCall(TypeError):
    """A call through a :class:`Recorder` that changes the VM but that no
    trace operation can hold."""


# Vm attributes that read state (or register observers), passed through.
_PASS_THROUGH = frozenset(
    {
        "attr_memory_limit",
        "check_extension",
        "get_memory_attributes",
        "guest_memfd_allocated",
        "guest_memfd_attributes",
        "guest_memfd_file",
        "guest_memfd_get_attributes",
        "guest_memfd_pinned",
        "guest_memfd_store_usage",
        "guest_memfds",
        "has_hooks",
        "host",
        "has_private_mem",
        "has_protected_state",
        "has_readonly_mem",
        "hugepage_mixed",
        "inplace_stats",
        "kvm_vm_ioctl_compiled_in",
        "manual_dirty_log_protect",
        "max_mapping_level",
        "memslots",
        "mmu",
        "mmu_invalidate_in_progress",
        "mmu_invalidate_range_end",
        "mmu_invalidate_range_start",
        "mmu_invalidate_seq",
        "mmu_lock",
        "nr_memslot_as_ids",
        "on_post_set",
        "on_unmap",
        "range_has_attributes",
        "remove_hook",
        "semantics",
        "slots_lock",
        "stats",
        "store",
        "store_kind",
        "supported_memory_attributes",
        "vm_type",
    }
)
# Vm calls that change it and that no trace operation can hold.
_UNRECORDABLE = frozenset(
    {
        "enable_cap",
        "finalize_vm",
        "guest_memfd_ioctl",
        "guest_memfd_mmap",
        "guest_memfd_pin",
        "guest_memfd_read",
        "guest_memfd_unpin",
        "guest_memfd_write",
        "kvm_flush_remote_tlbs",
        "kvm_mmu_invalidate_begin",
        "kvm_mmu_invalidate_end",
        "kvm_mmu_invalidate_range_add",
    }
)


class Recorder:
    """Wraps a Vm; records every call made through it, with its result.

    Use it in place of the Vm (other attributes pass through)::

        rec = Recorder(memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM))
        fd = rec.create_guest_memfd(1 << 30)
        rec.set_user_memory_region(0, 0, 1 << 30, 0x7000_0000_0000,
                                   memattr.KVM_MEM_GUEST_MEMFD, fd, 0)
        rec.set_memory_attributes(0, 1 << 30, memattr.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        trace = rec.trace()

    Calls that raise are recorded with ``-errno`` and re-raised.
    ``ioctl()`` runs the Vm's own ioctl front end (:mod:`memattr.ioctl`:
    the same argument rules, EFAULT for short buffers, ENOTTY...) with the
    recorder as the VM, so the calls it makes are recorded like direct ones.

    A trace must replay as it was recorded, so every state-changing call
    goes through a recording method or is refused: ``enable_cap`` (no trace
    operation holds it) raises :class:`UnrecordableCall`, and attributes the
    recorder does not know raise AttributeError. Reading the Vm's state and
    registering hooks pass through; ``rec.vm`` is the unrecorded Vm.
    """

    def __init__(self, vm: Any, meta: dict[str, Any] | None = None) -> None:
        self._vm = vm
        self._rows: list[tuple[int, int, int, int, int, int, int, int]] = []
        self._regions: list[list[int]] = []
        self._meta = dict(meta or {})
        self._meta.setdefault("vm_type", int(getattr(vm, "vm_type", 0)))
        self._meta.setdefault("vm_kwargs", {})
        self._meta.setdefault("name", "recorded")

    def __setattr__(self, name: str, value: Any) -> None:
        # Setting a Vm attribute (attr_memory_limit...) changes the VM, and
        # setting it on the recorder would silently do nothing: refuse both.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        raise UnrecordableCall(
            f"Recorder: setting {name} would change the VM unrecorded (or nothing); set rec.vm.{name} knowingly"
        )

    def __getattr__(self, name: str) -> Any:
        if name in _PASS_THROUGH or name.startswith("_"):
            return getattr(self._vm, name)
        if name in _UNRECORDABLE:
            raise UnrecordableCall(
                f"Recorder: {name} changes the VM but no trace operation can hold it, so the trace "
                f"would replay differently; call rec.vm.{name}() knowingly, outside the recording"
            )
        raise AttributeError(
            f"Recorder has no attribute {name!r} (only recorded calls and read-only Vm attributes "
            "pass through; use rec.vm for the Vm itself)"
        )

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

    def guest_memfd_set_memory_attributes(
        self, fd: int, offset: int, size: int, attributes: int, flags: int = 0
    ) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd, recorded as
        OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2 (the flags in the record's
        16-bit aux: larger flags, which no revision of the series defines,
        are refused before the call, nothing changed)."""
        if not isinstance(flags, int) or not 0 <= flags <= 0xFFFF:
            raise ValueError(f"flags {flags!r}: recorded KVM_SET_MEMORY_ATTRIBUTES2 flags must be in [0, 0xffff] (the trace's aux field)")
        row = [
            OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2, int(offset) & U64_MAX, int(size) & U64_MAX,
            int(fd) & U32_MAX, int(attributes) & U64_MAX, 0, 0, flags,
        ]
        return self._call(
            row, lambda: self._vm.guest_memfd_set_memory_attributes(fd, offset, size, attributes, flags), lambda _: 0
        )

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

    def kvm_vm_ioctl_set_memory_region(
        self,
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
        """The ioctl front end's memslot call. KVM_SET_USER_MEMORY_REGION
        (``v1``) is the REGION2 call with no guest_memfd fields, except that
        v1 refuses the GUEST_MEMFD flag: such a call fails (EINVAL, nothing
        changed) without being recorded, as the trace could not tell it from
        a REGION2 call."""
        if v1 and flags & KVM_MEM_GUEST_MEMFD:
            self._vm.kvm_vm_ioctl_set_memory_region(
                slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd, guest_memfd_offset, v1=True
            )
            raise AssertionError("v1 memslot call with KVM_MEM_GUEST_MEMFD succeeded")
        if v1:
            guest_memfd, guest_memfd_offset = -1, 0
        self.set_user_memory_region(
            slot, guest_phys_addr, memory_size, userspace_addr, flags, guest_memfd, guest_memfd_offset
        )

    def ioctl(self, request: int, arg: Any = 0, mutate_flag: bool = True) -> int | bytes:
        """``Vm.ioctl`` with every call it makes recorded (see the class)."""
        return vm_ioctl(self, request, arg, mutate_flag)  # type: ignore[arg-type]

    def trace(self) -> Trace:
        """What was recorded so far, as a Trace."""
        ops = ops_from_rows(self._rows)
        meta = dict(self._meta)
        meta["regions"] = [list(r) for r in self._regions]
        return Trace(ops, meta)
