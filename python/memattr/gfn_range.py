"""kvm_gfn_range and the kvm_handle_gfn_range() walk over memslots.

The walk visits every address space the VM has, every memslot intersecting
[start, end) in gfn order, and hands the handler the range clipped to the
slot. mmu_lock is taken once, lazily, when the first slot is found, and
``on_lock`` runs under it; with no slot in range nothing is locked and no
callback runs. Handler results are OR-ed; with ``flush_on_ret`` a true result
flushes remote TLBs once, before the unlock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from memattr import sched

if TYPE_CHECKING:
    from memattr._native import Kvm
    from memattr.locks import KvmLock
    from memattr.memslots import Memslot, Memslots


@dataclass(frozen=True, slots=True)
class GfnRange:
    """struct kvm_gfn_range: a memslot-clipped range handed to a handler."""

    slot: Memslot
    start: int
    end: int
    attributes: int
    may_block: bool
    # The core's name for the range: (as_id, index, serial, start, end).
    ref: tuple[int, int, int, int, int] = field(default=(0, 0, 0, 0, 0), compare=False, repr=False)

    @property
    def npages(self) -> int:
        return self.end - self.start


class _GfnRangeVm(Protocol):
    mmu_lock: KvmLock

    def kvm_flush_remote_tlbs(self) -> None: ...


def clip_gfn_ranges(
    kvm: Kvm, memslots: Memslots, start: int, end: int, attributes: int = 0, may_block: bool = True
) -> list[GfnRange]:
    """Every memslot-clipped piece of [start, end), address space by address
    space, in gfn order: the ranges kvm_handle_gfn_range() hands out (the
    core clips; this names each piece's slot for the hooks)."""
    return [
        GfnRange(memslots.by_serial(ref[2]), ref[3], ref[4], attributes, may_block, ref)
        for ref in kvm.clip_gfn_ranges(start, end)
    ]


def kvm_handle_gfn_range(
    vm: _GfnRangeVm,
    ranges: Sequence[GfnRange],
    handler: Callable[[GfnRange], bool],
    *,
    on_lock: Callable[[], None] | None = None,
    on_unlock: Callable[[], None] | None = None,
    flush_on_ret: bool = False,
) -> bool:
    """Run ``handler`` on each range under mmu_lock; returns the OR of results.

    ``ranges`` comes from :func:`clip_gfn_ranges` (the caller holds
    slots_lock, so the memslots cannot change in between). ``on_unlock`` runs
    after mmu_lock is released; only the seed's v11 used it.

    If a handler raises, the ranges after it are skipped, but a flush owed to
    earlier handlers still happens and mmu_lock is still released before the
    exception propagates.
    """
    if not ranges:
        return False
    ret = False
    mmu_lock = vm.mmu_lock
    mmu_lock.acquire()
    try:
        if on_lock is not None:
            on_lock()
        for rng in ranges:
            if sched.hook is not None:
                sched.hook(sched.STEP, handler.__name__)
            if handler(rng):
                ret = True
    finally:
        try:
            if flush_on_ret and ret:
                vm.kvm_flush_remote_tlbs()
        finally:
            mmu_lock.release()
    if on_unlock is not None:
        on_unlock()
    return ret


__all__ = ["GfnRange", "clip_gfn_ranges", "kvm_handle_gfn_range"]
