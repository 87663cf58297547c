"""The x86 MMU model as the Vm drives it: the fault path's retry loop, the
memory-attribute passes' handlers, the MMU's knobs, and inspection.

Every rule (faultin's exits, max mapping levels, zaps, mixed flags, what
memslot changes do to mappings) lives in the core (``rust/kvm/mmu.rs``,
``rust/hugepage.rs``); this module calls its steps under the modelled locks
and adds what only a driver can: lockdep's assertions, and a vCPU that goes
back to the guest and faults again when an invalidation races with it.

A Vm with ``store="rangetree"`` gets the range-based hugepage tracking, one
with ``store="xarray"`` the kernel's per-hugepage lpage_info arrays and
loops, so the xarray Vm is the faithful per-page baseline end to end.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from memattr import _args, sched
from memattr.errors import LockdepError
from memattr.uapi import PAGE_SHIFT

if TYPE_CHECKING:
    from memattr.gfn_range import GfnRange
    from memattr.memslots import Memslot
    from memattr.vm import Vm

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
# How long a vCPU "stays in the guest" before re-faulting after RET_PF_RETRY.
_RETRY_BACKOFF_S = 0.0002


def _knob(name: str, index: int, doc: str) -> property:
    def get(self: X86Mmu) -> object:
        return self._kvm.mmu_params[index]

    def set_(self: X86Mmu, value: object) -> None:
        self._kvm.set_mmu_param(name, value)

    return property(get, set_, doc=doc)


class X86Mmu:
    """kvm->arch's MMU for one Vm: the knobs, the fault path, inspection."""

    host_mapping_level = _knob(
        "host_mapping_level",
        0,
        "host_pfn_mapping_level() for shared memory: 3 (hugetlbfs 1G, the "
        "default), 2 (THP) or 1 (4K-only backing).",
    )
    slot_zap_all = _knob(
        "slot_zap_all",
        1,
        "KVM_X86_QUIRK_SLOT_ZAP_ALL (on by default): deleting or moving a "
        "memslot zaps every root, not just the slot.",
    )
    invalidate_straddling_hugepages = _knob(
        "invalidate_straddling_hugepages",
        2,
        "The fix for the attributes-vs-hugepage race (2025): the pre-set pass "
        "also invalidates the straddling head/tail hugepages. False models "
        "kernels from 6.8 up to that fix.",
    )
    eager_page_split = _knob(
        "eager_page_split",
        3,
        "The eager_page_split module parameter (on by default): turning on "
        "dirty logging splits the slot's huge leaves to 4K at once.",
    )
    pml = _knob(
        "pml",
        4,
        "kvm->arch.cpu_dirty_log_size != 0 (Intel PML): enabling dirty logging "
        "also clears dirty bits (one more mmu_lock round).",
    )

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._kvm = vm._kvm

    # --- the KVM_SET_MEMORY_ATTRIBUTES passes' handlers ----------------------

    def pre_set_memory_attributes(self, rng: GfnRange) -> bool:
        """kvm_pre_set_memory_attributes(): add the range to the invalidation,
        then the arch's zap (straddling hugepages included). True if a TLB
        flush is needed."""
        self._vm.mmu_lock.assert_held("kvm_arch_pre_set_memory_attributes runs under mmu_lock")
        return bool(self._kvm.pre_set(rng.ref, rng.attributes))

    def post_set_memory_attributes(self, rng: GfnRange) -> bool:
        """kvm_arch_post_set_memory_attributes(): recompute the mixed flags of
        the hugepages the range touches. Never asks for a flush."""
        vm = self._vm
        vm.mmu_lock.assert_held("kvm_arch_post_set_memory_attributes runs under mmu_lock")
        vm.slots_lock.assert_held("kvm_arch_post_set_memory_attributes runs under slots_lock")
        self._kvm.post_set(rng.ref, rng.attributes)
        return False

    # --- faults --------------------------------------------------------------

    def fault(self, gpa: int, private: bool = False, write: bool = False, *, as_id: int = 0) -> int:
        """A TDP page fault at ``gpa``: maps it at the highest level allowed
        and returns that level (1 = 4K, 2 = 2M, 3 = 1G), or raises
        :class:`MemoryFault` (KVM_EXIT_MEMORY_FAULT) when the access's
        private-ness differs from the gfn's attribute or a private access
        hits a slot without guest_memfd or no slot at all. A shared access
        outside every memslot is MMIO: it returns 0 and nothing is mapped.
        A fault that races with an invalidation of its gfn retries
        (``stats.fault_retries``). ``write`` is validated but, as in the
        kernel's memory-fault exit, not reported."""
        # The core's one fault entry: it validates, runs the whole fault
        # natively when nothing races with it, and calls _fault_retry_loop
        # below otherwise.
        return int(self._kvm.fault_or_drive(gpa, private, write, as_id=as_id))

    def _fault_retry_loop(self, gpa: int, private: bool, as_id: int, first: bool = False) -> int:
        """The vCPU's loop: fault, and on RET_PF_RETRY go back to the guest
        and fault again, until the invalidation in the way has ended."""
        vm = self._vm
        kvm = self._kvm
        # A vCPU never faults while holding these: with mmu_lock it would
        # deadlock, and with slots_lock held by the thread performing an
        # invalidation the retry loop could never make progress.
        for lock in (vm.mmu_lock, vm.slots_lock):
            if lock.held_by_current_thread():
                raise LockdepError(
                    lock.name,
                    f"a vCPU page fault cannot run while its thread holds {lock.name}",
                    f"X86Mmu.fault(gpa={gpa:#x})",
                )
        while True:
            if not first:
                self._retry_later(gpa)
            if sched.hook is not None:
                sched.hook(sched.STEP, "kvm_faultin_pfn")
            kind, mmu_seq, serial = kvm.faultin(gpa, private, as_id, first)
            first = False
            if kind == 0:
                continue
            if kind == 1:
                return 0
            with vm.mmu_lock:
                if sched.hook is not None:
                    sched.hook(sched.STEP, "kvm_tdp_map")
                level = kvm.tdp_map(gpa, private, as_id, mmu_seq, serial)
                if level is not None and sched.hook is not None:
                    sched.hook(sched.MAPPED, (as_id, gpa, private, int(level)))
            if level is not None:
                return int(level)

    def _retry_later(self, gpa: int) -> None:
        # The kernel's vCPU retries until whoever began the invalidation
        # ends it. With no other thread alive nobody ever will: report the
        # livelock instead of spinning forever.
        if sched.hook is not None:
            # The explorer decides when the vCPU re-enters the guest.
            sched.hook(sched.RETRY, gpa)
            return
        if threading.active_count() == 1:
            if self._vm.mmu_invalidate_in_progress:
                raise LockdepError(
                    "mmu_invalidate_in_progress",
                    "a fault would retry forever: an invalidation covering its gfn "
                    "is in progress and no other thread exists to finish it",
                    f"X86Mmu.fault(gpa={gpa:#x})",
                )
            return
        # Let the invalidating thread run before "re-entering the guest".
        time.sleep(_RETRY_BACKOFF_S)

    # --- inspection ----------------------------------------------------------

    def max_mapping_level(self, gfn: int, *, as_id: int = 0) -> int:
        """The level a fault at ``gfn`` whose private-ness matches the gfn's
        attribute would map now (kvm_mmu_max_mapping_level() plus the
        guest_memfd order and dirty-logging caps of the fault path)."""
        return int(self._kvm.max_mapping_level(_args.uint("as_id", as_id), gfn))

    def hugepage_mixed(self, slot: int | Memslot, gfn: int, level: int) -> bool:
        """hugepage_test_mixed() of the ``level`` hugepage holding ``gfn`` in
        uapi slot ``slot`` (as_id << 16 | id; a Memslot also works)."""
        from memattr.memslots import Memslot

        if isinstance(slot, Memslot):
            slot = slot.slot
        return bool(self._kvm.hugepage_mixed(slot, gfn, level))

    def mixed_runs(self, slot: int | Memslot, level: int) -> list[tuple[int, int]]:
        """The mixed hugepages of a memslot at ``level`` (2 or 3) as gfn runs."""
        from memattr.memslots import Memslot

        if isinstance(slot, Memslot):
            slot = slot.slot
        return [(int(s), int(e)) for s, e in self._kvm.mixed_runs(slot, level)]

    def mapped_level(self, gpa: int, *, as_id: int = 0) -> int:
        """Level of the leaf mapping ``gpa`` (0 if unmapped)."""
        gpa = _args.uint("gpa", gpa)
        return int(self._kvm.mapped_level(_args.uint("as_id", as_id), gpa >> PAGE_SHIFT))

    def mappings(self, level: int, *, as_id: int = 0) -> list[tuple[int, int]]:
        """The leaves of ``level`` (1, 2 or 3) as (start_gfn, end_gfn) runs."""
        return [(int(s), int(e)) for s, e in self._kvm.mappings(_args.uint("as_id", as_id), level)]


__all__ = [
    "KVM_MAX_HUGEPAGE_LEVEL",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "X86Mmu",
]
