"""Counters a Vm keeps, named for what the kernel does (not what it costs us).

The core (``rust/kvm``) keeps them; ``vm.stats`` is a snapshot taken when
read, safe to keep while the Vm goes on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _per_level() -> dict[int, int]:
    # Levels as the kernel numbers them: 1 = 4K, 2 = 2M, 3 = 1G.
    return {1: 0, 2: 0, 3: 0}


@dataclass
class Stats:
    """Every counter a Vm keeps. Plain ints, so a hook may read them live."""

    # KVM_SET_MEMORY_ATTRIBUTES
    set_calls: int = 0  # calls that passed validation
    conversions: int = 0  # calls that changed at least one page
    noop_conversions: int = 0  # early exit: range already had the value
    pages_converted: int = 0  # pages in ranges of calls that changed something
    failed_calls: int = 0  # calls that raised (any errno)
    enomem: int = 0  # reservation failures

    # gfn-range iteration (kvm_handle_gfn_range)
    pre_set_ranges: int = 0  # memslot-clipped ranges handed to the pre-set pass
    zapped_ranges: int = 0  # of those, ranges whose zap removed a mapping
    post_set_ranges: int = 0  # memslot-clipped ranges handed to the post-set pass
    tlb_flushes: int = 0  # kvm_flush_remote_tlbs calls
    mmu_lock_acquisitions: int = 0

    # memslots and guest_memfd
    memslot_updates: int = 0
    gmem_holes_punched: int = 0  # fallocate(PUNCH_HOLE) calls that succeeded
    gmem_closed: int = 0  # guest_memfd files released

    # MMU model
    faults: int = 0
    fault_retries: int = 0  # mmu_invalidate_retry said "raced, try again"
    memory_fault_exits: int = 0  # KVM_EXIT_MEMORY_FAULT
    mmio_faults: int = 0  # shared accesses outside every memslot: emulated MMIO
    zapped_pages: dict[int, int] = field(default_factory=_per_level)  # by level
    mapped: dict[int, int] = field(default_factory=_per_level)  # live mappings by level

    def as_dict(self) -> dict[str, object]:
        """A deep copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_counters(cls, counters: dict[str, object]) -> Stats:
        """The snapshot of a core's counters (``_native.Kvm.counters()``)."""
        return cls(**counters)  # type: ignore[arg-type]
