"""Native batches: trace operations run on a Vm's state in Rust.

:func:`memattr.trace.replay` hands runs of SET_MEMORY_ATTRIBUTES and fault
operations to ``memattr._native.replay_batch`` (``rust/kvm.rs``), which runs
the same rules as :class:`memattr.Vm` and :class:`memattr.mmu.X86Mmu` on the
same state (the attribute store, each memslot's hugepage tracker, the
stage-2 roots) without the interpreter between operations, with the GIL
released. Afterwards the Vm's stats and mmu_invalidate_* state are exactly
what the per-call path would have left (the test suite checks this on every
workload, both stores, and random streams with failing calls).

Sets, faults and guest_memfd fallocate (hole punching) run in batches;
memslot changes and creating or closing a guest_memfd stop a batch and go
through the Vm. A batch runs only where it cannot differ from the per-call path (see
:func:`batch_blocker`): a plain Vm with Linux 6.8 ordering, no hooks (they
would have to be called per range), no invalidation in progress, and not
from inside one of the Vm's own locks. slots_lock and mmu_lock are held for
the whole batch, so other threads' calls wait as they would for one call,
and their faults see the new invalidation sequence and retry, as in the
kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memattr import _native
from memattr.errors import KvmBugError
from memattr.locks import KvmLock
from memattr.memslots import gmem_files
from memattr.mmu import POST_SET_WITHOUT_PRIVATE_MEM, PRE_SET_WITHOUT_PRIVATE_MEM, X86Mmu
from memattr.vm import Vm

# Counters a batch returns, and the Stats fields they add to.
_COUNTERS = (
    "set_calls",
    "conversions",
    "noop_conversions",
    "pages_converted",
    "failed_calls",
    "enomem",
    "zapped_ranges",
    "post_set_ranges",
    "tlb_flushes",
    "mmu_lock_acquisitions",
    "faults",
    "memory_fault_exits",
    "mmio_faults",
    "gmem_holes_punched",
)



def batch_blocker(vm: Any) -> str | None:
    """Why ``vm`` cannot run native batches, or None if it can."""
    if type(vm) is not Vm:
        return f"{type(vm).__name__} is not a plain memattr.Vm (a wrapper or subclass must see every call)"
    if vm.semantics != "6.8":
        return "semantics 'v11' ends the invalidation outside mmu_lock, which only the per-call path models"
    if vm._unmap_hooks or vm._post_set_hooks:
        return "hooks are registered (they are called per range from the per-call path)"
    if type(vm.mmu) is not X86Mmu:
        return f"the MMU model is a {type(vm.mmu).__name__}, not memattr.mmu.X86Mmu"
    if vm.slots_lock.held_by_current_thread() or vm.mmu_lock.held_by_current_thread():
        return "this thread holds one of the Vm's locks"
    if vm.mmu_invalidate_in_progress:
        return "an invalidation is in progress"
    return None


def run_batch(
    vm: Vm,
    kind: np.ndarray,
    gpa: np.ndarray,
    size: np.ndarray,
    attributes: np.ndarray,
    arg: np.ndarray,
    flags: np.ndarray,
    results: np.ndarray,
) -> dict[str, Any]:
    """Runs operations (one contiguous array per record field: kind and
    flags uint8, the rest uint64) on ``vm`` until one a batch does not run
    (a memslot change, creating or closing a guest_memfd). Sets, faults and
    guest_memfd fallocates (whose ``attributes`` must hold the live fd) run. Writes each result (0, the mapped
    level, or -errno) to the int64 ``results`` and returns the tally: ``done``
    (operations run), ``sets``, ``faults``, ``fault_exits``,
    ``implicit_conversions`` and ``errors`` ({errno: count}).

    The caller checks :func:`batch_blocker` first. Raises KvmBugError if the
    model finds itself inconsistent (the operations before it still count).
    """
    mmu = vm.mmu
    with vm.slots_lock:
        # Held for the batch like one call would hold it; not counted as an
        # acquisition (the batch counts the ones each operation makes).
        KvmLock.acquire(vm.mmu_lock)
        try:
            slots: list[tuple[int, int, int, int, bool, Any]] = []
            index: dict[int, int] = {}  # id(memslot) -> position in slots
            for slot in vm.memslots:
                index[id(slot)] = len(slots)
                if slot.arch is None:  # never outside slots_lock
                    raise KvmBugError(f"{slot!r} has no hugepage tracking")
                # Private faults get a pfn only from a bound, open guest_memfd.
                private_backing = slot.has_guest_memfd() and slot.gmem is not None
                slots.append((slot.as_id, slot.base_gfn, slot.npages, slot.flags, private_backing, slot.arch))
            # The VM's open guest_memfd files and what is bound to them, for
            # fallocate operations (which carry live fds).
            files = [
                (g.fd, g.size, [(first, end, index[id(s)]) for first, end, s in g.bindings()])
                for g in gmem_files.owned_by(vm._gmem_owner)
            ]
            roots = mmu._roots
            for as_id in range(vm.nr_memslot_as_ids):
                if as_id not in roots:
                    roots[as_id] = _native.Stage2Map()
            inval = vm._inval
            out: dict[str, Any] = _native.replay_batch(
                vm.store,
                slots,
                [roots[a] for a in range(vm.nr_memslot_as_ids)],
                files,
                (
                    vm.supported_memory_attributes,
                    vm.has_private_mem,
                    vm.attr_memory_limit,
                    vm.guest_memfd_max_order,
                    mmu.host_mapping_level,
                    mmu.invalidate_straddling_hugepages,
                ),
                (inval.seq, inval.in_progress, inval.range_start, inval.range_end),
                kind,
                gpa,
                size,
                attributes,
                arg,
                flags,
                results,
            )
            inval.seq, inval.in_progress, inval.range_start, inval.range_end = out["inval"]
            stats = vm.stats
            counters = out["counters"]
            for name in _COUNTERS:
                if counters[name]:
                    setattr(stats, name, getattr(stats, name) + counters[name])
            for level in (1, 2, 3):
                stats.zapped_pages[level] += counters["zapped_pages"][level - 1]
                stats.mapped[level] += counters["mapped"][level - 1]
        finally:
            KvmLock.release(vm.mmu_lock)
    if out["warned_no_private_mem"]:
        # Both passes ran on such a VM, as the per-call path would warn.
        mmu._warn_once(PRE_SET_WITHOUT_PRIVATE_MEM)
        mmu._warn_once(POST_SET_WITHOUT_PRIVATE_MEM)
    if out["bug"] is not None:
        raise KvmBugError(f"native batch stopped after {out['done']} operations: {out['bug']}")
    return out


__all__ = ["batch_blocker", "run_batch"]
