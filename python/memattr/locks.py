"""The Vm's locks and the MMU invalidation state they protect.

Two real locks per Vm, as in struct kvm:

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
import warnings
from types import FrameType
from typing import TYPE_CHECKING

from memattr.errors import KvmBugError, LockdepError
from memattr.uapi import INVALID_GPA

if TYPE_CHECKING:
    from memattr.stats import Stats

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
    for t in threading.enumerate():
        if t.ident == ident:
            return f"thread {t.name!r} ({ident})"
    return f"thread {ident}"


class KvmLock:
    """A non-recursive lock that knows which thread holds it."""

    __slots__ = ("name", "_lock", "_owner", "_inner", "lockdep")

    def __init__(
        self, name: str, *, inner: tuple[KvmLock, ...] = (), lockdep: bool = True
    ) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._owner: int | None = None
        # Locks that nest inside this one: holding any of them while taking
        # this one is an order inversion (an ABBA deadlock waiting to happen).
        self._inner = inner
        self.lockdep = lockdep

    def acquire(self) -> None:
        me = _get_ident()
        if self._owner == me:
            raise LockdepError(
                self.name,
                "possible recursive locking detected: the lock is not recursive "
                "and this thread already holds it (a real kernel deadlocks here)",
                _call_site(),
            )
        for inner in self._inner:
            if inner._owner == me:
                raise LockdepError(
                    self.name,
                    f"possible circular locking dependency: {self.name} nests "
                    f"outside {inner.name}, but this thread holds {inner.name}",
                    _call_site(),
                )
        self._lock.acquire()
        self._owner = me

    def release(self) -> None:
        if self._owner != _get_ident():
            raise LockdepError(
                self.name,
                "bad unlock balance detected: releasing a lock this thread does not hold",
                _call_site(),
                f"held by: {_thread_name(self._owner)}",
            )
        self._owner = None
        self._lock.release()

    def __enter__(self) -> KvmLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def locked(self) -> bool:
        """True if any thread holds the lock."""
        return self._owner is not None

    def held_by_current_thread(self) -> bool:
        return self._owner == _get_ident()

    def assert_held(self, rule: str = "") -> None:
        """lockdep_assert_held(): raise LockdepError unless this thread holds it."""
        if self.lockdep and self._owner != _get_ident():
            raise LockdepError(
                self.name,
                rule or f"{self.name} must be held here (lockdep_assert_held)",
                _call_site(),
                f"held by: {_thread_name(self._owner)}",
            )

    def __repr__(self) -> str:
        return f"<KvmLock {self.name} held by {_thread_name(self._owner)}>"


class MmuLock(KvmLock):
    """kvm->mmu_lock; counts acquisitions into the Vm's Stats."""

    __slots__ = ("_stats",)

    def __init__(self, stats: Stats, *, lockdep: bool = True) -> None:
        super().__init__("mmu_lock", lockdep=lockdep)
        self._stats = stats

    def acquire(self) -> None:
        super().acquire()
        self._stats.mmu_lock_acquisitions += 1


class MmuInvalidation:
    """kvm->mmu_invalidate_{in_progress,seq,range_start,range_end}.

    Faults read these without the lock and retry if an invalidation raced
    with them; every change must happen with mmu_lock held so a fault that
    re-checks under mmu_lock sees a consistent picture.
    """

    __slots__ = ("_mmu_lock", "seq", "in_progress", "range_start", "range_end")

    def __init__(self, mmu_lock: KvmLock) -> None:
        self._mmu_lock = mmu_lock
        self.seq = 0
        self.in_progress = 0
        self.range_start = INVALID_GPA
        self.range_end = INVALID_GPA

    def begin(self) -> None:
        """kvm_mmu_invalidate_begin()."""
        lock = self._mmu_lock
        if lock._owner != _get_ident() and lock.lockdep:
            lock.assert_held(
                "mmu_invalidate_in_progress may only change with mmu_lock held "
                "(kvm_mmu_invalidate_begin)"
            )
        # Visible to faults only at unlock time; nothing can be mapped until then.
        self.in_progress += 1
        if self.in_progress == 1:
            self.range_start = INVALID_GPA
            self.range_end = INVALID_GPA

    def range_add(self, start: int, end: int) -> None:
        """kvm_mmu_invalidate_range_add(): widen the range faults must avoid."""
        lock = self._mmu_lock
        if lock._owner != _get_ident() and lock.lockdep:
            lock.assert_held(
                "mmu_invalidate_range_start/end may only change with mmu_lock held "
                "(kvm_mmu_invalidate_range_add)"
            )
        if self.in_progress == 0:
            warnings.warn(
                KvmWarning("kvm_mmu_invalidate_range_add() outside begin()/end()"),
                stacklevel=2,
            )
        if self.range_start == INVALID_GPA:
            self.range_start = start
            self.range_end = end
        else:
            if start < self.range_start:
                self.range_start = start
            if end > self.range_end:
                self.range_end = end

    def end(self) -> None:
        """kvm_mmu_invalidate_end()."""
        lock = self._mmu_lock
        if lock._owner != _get_ident() and lock.lockdep:
            lock.assert_held(
                "mmu_invalidate_seq and mmu_invalidate_in_progress may only change "
                "with mmu_lock held (kvm_mmu_invalidate_end)"
            )
        if self.in_progress <= 0:
            raise KvmBugError("KVM_BUG_ON: mmu_invalidate_end() without a matching begin()")
        # The sequence bump must be visible before the count drops, so a fault
        # that saw in_progress == 0 also sees the new sequence and retries.
        self.seq += 1
        self.in_progress -= 1
        if self.range_start == INVALID_GPA:
            warnings.warn(
                KvmWarning("mmu_invalidate_end() without any range added since begin()"),
                stacklevel=2,
            )


__all__ = ["KvmLock", "KvmWarning", "MmuInvalidation", "MmuLock"]
