"""The Vm's locks and the MMU invalidation state they protect.

Two real locks per Vm, as in struct kvm. The lock itself is native
(``memattr._native.ModelLock``), shared with the core's whole operations and
native replay, which take it in Rust; this module adds what lockdep adds in
a debug kernel:

- ``slots_lock``: a mutex serialising memslot updates and attribute updates
  (KVM_SET_USER_MEMORY_REGION*, KVM_SET_MEMORY_ATTRIBUTES).
- ``mmu_lock``: taken for the gfn-range passes and by the MMU model.
  slots_lock nests outside mmu_lock, never the other way round.

Both know their owner thread, so the model can do what lockdep does in a
debug kernel: a recursive acquisition raises :class:`LockdepError` instead of
deadlocking, taking slots_lock under mmu_lock is an order inversion, and the
invalidation counters refuse to change unless mmu_lock is held by the caller.
``lockdep=False`` models a kernel built without CONFIG_LOCKDEP: the
"must be held" assertions are skipped (recursion and order are still refused,
because the alternative is a real deadlock).
"""

from __future__ import annotations

import os
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from memattr import sched
from memattr.errors import LockdepError

if TYPE_CHECKING:
    from memattr._native import Kvm, ModelLock

_get_ident = threading.get_ident
_THIS_FILE = __file__
_PACKAGE_DIR = os.path.dirname(__file__) + os.sep


class KvmWarning(RuntimeWarning):
    """The kernel's WARN_ON_ONCE: a bug in the caller, survivable."""


def _call_site(skip_files: tuple[str, ...] = (_THIS_FILE,)) -> str:
    """Where a lock rule was broken: the first frame outside ``skip_files``
    and, if that is inside memattr, the user code that led there."""

    def where(f: FrameType) -> str:
        code = f.f_code
        return f"{code.co_filename}:{f.f_lineno} in {code.co_name}()"

    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in skip_files:
        frame = frame.f_back
    if frame is None:  # pragma: no cover - there is always a caller
        return "<unknown>"
    site = where(frame)
    outer: FrameType | None = frame
    while outer is not None and outer.f_code.co_filename.startswith(_PACKAGE_DIR):
        outer = outer.f_back
    if outer is not None and outer is not frame:
        site += f" <- {where(outer)}"
    return site


def _thread_name(ident: int | None) -> str:
    if ident is None:
        return "nobody"
    if ident == 0:
        return "a native operation"
    for t in threading.enumerate():
        if t.ident == ident:
            return f"thread {t.name!r} ({ident})"
    return f"thread {ident}"


class KvmLock:
    """A non-recursive lock that knows which thread holds it."""

    __slots__ = ("name", "_native", "_inner", "lockdep")

    def __init__(
        self, native: ModelLock, *, inner: tuple[KvmLock, ...] = (), lockdep: bool = True
    ) -> None:
        self.name: str = native.name
        self._native = native
        # Locks that nest inside this one: holding any of them while taking
        # this one is an order inversion (an ABBA deadlock waiting to happen).
        self._inner = inner
        self.lockdep = lockdep

    def acquire(self) -> None:
        native = self._native
        if native.held_by_current_thread():
            raise LockdepError(
                self.name,
                "possible recursive locking detected: the lock is not recursive "
                "and this thread already holds it (a real kernel deadlocks here)",
                _call_site(),
            )
        for inner in self._inner:
            if inner._native.held_by_current_thread():
                raise LockdepError(
                    self.name,
                    f"possible circular locking dependency: {self.name} nests "
                    f"outside {inner.name}, but this thread holds {inner.name}",
                    _call_site(),
                )
        if sched.hook is not None:
            sched.hook(sched.ACQUIRE, self)
        # Waits with the GIL released if another thread (or a native
        # operation) holds it.
        native.acquire(_get_ident())

    def release(self) -> None:
        if not self._native.held_by_current_thread():
            raise LockdepError(
                self.name,
                "bad unlock balance detected: releasing a lock this thread does not hold",
                _call_site(),
                f"held by: {_thread_name(self._native.owner)}",
            )
        if sched.hook is not None:
            sched.hook(sched.RELEASE, self)
        self._native.release()

    def __enter__(self) -> KvmLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def locked(self) -> bool:
        """True if any thread holds the lock."""
        return self._native.locked()

    def held_by_current_thread(self) -> bool:
        return self._native.held_by_current_thread()

    def assert_held(self, rule: str = "") -> None:
        """lockdep_assert_held(): raise LockdepError unless this thread holds it."""
        if self.lockdep and not self._native.held_by_current_thread():
            raise LockdepError(
                self.name,
                rule or f"{self.name} must be held here (lockdep_assert_held)",
                _call_site(),
                f"held by: {_thread_name(self._native.owner)}",
            )

    def __repr__(self) -> str:
        return f"<KvmLock {self.name} held by {_thread_name(self._native.owner)}>"


class MmuLock(KvmLock):
    """kvm->mmu_lock; each acquisition is counted by the core."""

    __slots__ = ("_kvm",)

    def __init__(self, kvm: Kvm, *, lockdep: bool = True) -> None:
        super().__init__(kvm.mmu_lock, lockdep=lockdep)
        self._kvm = kvm

    def acquire(self) -> None:
        super().acquire()
        self._kvm.note_mmu_lock()


class MmuInvalidation:
    """kvm->mmu_invalidate_{in_progress,seq,range_start,range_end}, kept by
    the core; this adds lockdep's rule that they only change with mmu_lock
    held, so a fault that re-checks under mmu_lock sees a consistent picture.
    """

    __slots__ = ("_mmu_lock", "_kvm")

    def __init__(self, mmu_lock: KvmLock, kvm: Kvm) -> None:
        self._mmu_lock = mmu_lock
        self._kvm = kvm

    def _assert_locked(self, what: str) -> None:
        lock = self._mmu_lock
        if lock.lockdep and not lock.held_by_current_thread():
            lock.assert_held(f"{what} may only change with mmu_lock held")

    def begin(self) -> None:
        """kvm_mmu_invalidate_begin()."""
        self._assert_locked("mmu_invalidate_in_progress (kvm_mmu_invalidate_begin)")
        if sched.hook is None:
            self._kvm.invalidate_begin()
            return
        # in_progress++ is a plain read-modify-write, atomic only under
        # mmu_lock: under the explorer its halves are separate steps.
        sched.hook(sched.STEP, "kvm_mmu_invalidate_begin:read")
        in_progress = self._kvm.inval[1]
        sched.hook(sched.STEP, "kvm_mmu_invalidate_begin:write")
        self._kvm.invalidate_begin_write(in_progress)

    def range_add(self, start: int, end: int) -> None:
        """kvm_mmu_invalidate_range_add(): widen the range faults must avoid."""
        self._assert_locked("mmu_invalidate_range_start/end (kvm_mmu_invalidate_range_add)")
        if sched.hook is not None:
            sched.hook(sched.STEP, "kvm_mmu_invalidate_range_add")
        self._kvm.invalidate_range_add(start, end)

    def end(self) -> None:
        """kvm_mmu_invalidate_end()."""
        self._assert_locked(
            "mmu_invalidate_seq and mmu_invalidate_in_progress (kvm_mmu_invalidate_end)"
        )
        if sched.hook is None:
            self._kvm.invalidate_end()
            return
        # seq++ then in_progress--, each a read and a write (see begin()).
        kvm = self._kvm
        sched.hook(sched.STEP, "kvm_mmu_invalidate_end:seq_read")
        seq = kvm.inval[0]
        sched.hook(sched.STEP, "kvm_mmu_invalidate_end:seq_write")
        kvm.invalidate_end_seq_write(seq)
        sched.hook(sched.STEP, "kvm_mmu_invalidate_end:read")
        in_progress = kvm.inval[1]
        sched.hook(sched.STEP, "kvm_mmu_invalidate_end:write")
        kvm.invalidate_end_write(in_progress)


__all__ = ["KvmLock", "KvmWarning", "MmuInvalidation", "MmuLock"]
