"""Exceptions shared by the Vm, the lock checker and the MMU model."""

from __future__ import annotations

import errno
import os

from memattr.uapi import KVM_MEMORY_EXIT_FLAG_PRIVATE


class LockdepError(RuntimeError):
    """A lock-discipline violation, reported like a lockdep splat.

    Raised instead of deadlocking (recursive acquisition), instead of silently
    racing (a counter changed without its lock), or on lock-order inversion.
    ``lock`` names the lock, ``rule`` the rule that was broken and
    ``call_site`` the ``file:line in function`` that broke it.
    """

    def __init__(self, lock: str, rule: str, call_site: str, detail: str = "") -> None:
        self.lock = lock
        self.rule = rule
        self.call_site = call_site
        self.detail = detail
        lines = [
            "WARNING: lockdep: lock discipline violated",
            f"  lock:      {lock}",
            f"  rule:      {rule}",
            f"  call site: {call_site}",
        ]
        if detail:
            lines.append(f"  {detail}")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.lock, self.rule, self.call_site, self.detail))


class KvmBugError(RuntimeError):
    """An internal invariant of the model broke (the kernel's KVM_BUG_ON)."""


class MemoryFault(OSError):
    """KVM_EXIT_MEMORY_FAULT: KVM_RUN fails with EFAULT and kvm_run.memory_fault
    holds {gpa, size, flags}; ``flags`` has KVM_MEMORY_EXIT_FLAG_PRIVATE when
    the faulting access was private."""

    def __init__(self, gpa: int, size: int, flags: int = 0) -> None:
        kind = "private" if flags & KVM_MEMORY_EXIT_FLAG_PRIVATE else "shared"
        super().__init__(
            errno.EFAULT,
            f"{os.strerror(errno.EFAULT)}: KVM_EXIT_MEMORY_FAULT "
            f"gpa={gpa:#x} size={size:#x} flags={flags:#x} ({kind} access)",
        )
        self.gpa = gpa
        self.size = size
        self.flags = flags

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.gpa, self.size, self.flags))


class GuestMemfdSigbus(Exception):
    """What the kernel delivers as SIGBUS: a host access through a
    guest_memfd mapping to a page the host may not fault in: past the end
    of the file, not shared (a 6.18 guest_memfd created without
    GUEST_MEMFD_FLAG_INIT_SHARED), or private (the in-place conversion
    series keeps private pages out of host page tables). ``fd`` and
    ``offset`` (bytes into the file) say where; ``private`` is True for a
    private page under the series. Catchable, unlike the signal."""

    def __init__(self, fd: int, offset: int, private: bool = False) -> None:
        why = "is a private page" if private else "cannot be faulted in by the host"
        super().__init__(f"SIGBUS: guest_memfd {fd} offset {offset:#x} {why}")
        self.fd = fd
        self.offset = offset
        self.private = private

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.fd, self.offset, self.private))


class SetupError(OSError):
    """A trace's own setup failed: a memslot refused or a guest_memfd not
    created (and the trace did not record that failure). Whatever ran after
    it would simulate a different VM from the one the trace describes, so
    replay stops instead of counting it. ``errno`` is the call's."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.strerror))


__all__ = ["GuestMemfdSigbus", "KvmBugError", "LockdepError", "MemoryFault", "SetupError"]
