"""Native batches: trace operations run by the core's own loop.

:func:`memattr.trace.replay` hands runs of SET_MEMORY_ATTRIBUTES, fault and
guest_memfd fallocate operations to the core (``_native.Kvm.replay``,
``rust/kvm/replay.rs``), which runs the same steps the per-call Vm runs, in
a Rust loop, under the VM's slots_lock and mmu_lock, with the GIL released:
other threads' calls wait as they would for one long call. Memslot changes
and creating or closing a guest_memfd stop a batch and go through the Vm.

A batch runs only where nothing in Python needs to see its steps (see
:func:`batch_blocker`): a plain Vm (a subclass such as the Recorder must see
every call), Linux 6.8 ordering, no hooks, no invalidation in progress, and
not from inside one of the Vm's own locks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from memattr.errors import KvmBugError
from memattr.vm import Vm


def batch_blocker(vm: Any) -> str | None:
    """Why ``vm`` cannot run native batches, or None if it can."""
    if type(vm) is not Vm:
        return f"{type(vm).__name__} is not a plain memattr.Vm (a wrapper or subclass must see every call)"
    if vm.semantics == "v11":
        return "semantics 'v11' ends the invalidation outside mmu_lock, which only the per-call path models"
    if vm.has_hooks:
        return "hooks are registered (they are called per range from the per-call path)"
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
    guest_memfd fallocates (whose ``attributes`` must hold the live fd) run.
    Writes each result (0, the mapped level, or -errno) to the int64
    ``results`` and returns the tally: ``done`` (operations run), ``sets``,
    ``faults``, ``fault_exits``, ``implicit_conversions`` and ``errors``
    ({errno: count}).

    The caller checks :func:`batch_blocker` first. Raises KvmBugError if the
    model finds itself inconsistent (the operations before it still count).
    """
    if vm.mmu_invalidate_in_progress:
        raise ValueError("an invalidation is in progress: a batch cannot start")
    out = vm._kvm.replay(kind, gpa, size, attributes, arg, flags, results)
    if out is None:
        vm._lock_conflict()
    if out["bug"] is not None:
        raise KvmBugError(f"native batch stopped after {out['done']} operations: {out['bug']}")
    return out


__all__ = ["batch_blocker", "run_batch"]
