"""The x86 MMU model: stage-2 faults, KVM_EXIT_MEMORY_FAULT, hugepage "mixed"
tracking and the zaps of the memory-attribute passes.

Follows arch/x86/kvm/mmu/mmu.c (Linux 6.8 and later):
kvm_arch_pre_set_memory_attributes, kvm_arch_post_set_memory_attributes,
hugepage_has_attrs, kvm_mmu_init_memslot_memory_attributes, the
kvm_alloc_memslot_metadata disallow rules (x86.c), kvm_faultin_pfn /
__kvm_faultin_pfn / kvm_faultin_pfn_private, kvm_mmu_hugepage_adjust,
__kvm_mmu_max_mapping_level and mmu_invalidate_retry_gfn().

The per-slot tracking (``slot.arch``) and the stage-2 leaves live in Rust
(memattr._native): a Vm with ``store="rangetree"`` gets the range-based
tracker, one with ``store="xarray"`` the kernel's per-hugepage lpage_info
arrays and loops, so the xarray Vm is the faithful per-page baseline end to
end. Both give identical results.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from memattr._native import LpageInfoTracker, RangeHugepageTracker, Stage2Map
from memattr.errors import LockdepError, MemoryFault
from memattr.locks import KvmWarning
from memattr.memslots import Memslot
from memattr.uapi import (
    INVALID_GPA,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
)

if TYPE_CHECKING:
    from memattr.gfn_range import GfnRange
    from memattr.vm import Vm

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
_U64_LIMIT = 1 << 64
# How long a vCPU "stays in the guest" before re-faulting after RET_PF_RETRY.
_RETRY_BACKOFF_S = 0.0002
# (level, pages per hugepage) for the straddling head/tail checks, 2M first.
_STRADDLE_LEVELS = ((PG_LEVEL_2M, 1 << 9), (PG_LEVEL_1G, 1 << 18))
# WARN_ON_ONCE texts of the memory-attribute passes on a VM that cannot
# have private memory (reachable only by writing the store behind its back).
PRE_SET_WITHOUT_PRIVATE_MEM = "kvm_arch_pre_set_memory_attributes() on a VM without private memory"
POST_SET_WITHOUT_PRIVATE_MEM = "kvm_arch_post_set_memory_attributes() on a VM without private memory"


class HugepageTrackerLike(Protocol):
    """What both native trackers (memattr._native) provide."""

    def init_memory_attributes(self, store: object) -> None: ...
    def post_set_memory_attributes(self, store: object, start: int, end: int, attrs: int) -> None: ...
    def test_mixed(self, gfn: int, level: int) -> bool: ...
    def straddling_hugepages(self, start: int, end: int) -> list[tuple[int, int]]: ...
    def straddling_hugepages_hull(self, start: int, end: int) -> tuple[int, int] | None: ...
    def disallow_lpage(self, gfn: int, level: int) -> bool: ...
    def max_mapping_level(self, gfn: int, max_level: int | None = None) -> int: ...
    def mixed_runs(self, level: int) -> list[tuple[int, int]]: ...
    def memory_bytes(self) -> int: ...


def kvm_max_level_for_order(order: int) -> int:
    """The largest mapping level a guest_memfd folio of ``order`` can back."""
    if order >= 18:  # KVM_HPAGE_GFN_SHIFT(PG_LEVEL_1G)
        return PG_LEVEL_1G
    if order >= 9:  # KVM_HPAGE_GFN_SHIFT(PG_LEVEL_2M)
        return PG_LEVEL_2M
    return PG_LEVEL_4K


def _check_u64(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"{name} must be in 0..2**64, got {value}")
    return value


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


def _check_level(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value not in (PG_LEVEL_2M, PG_LEVEL_1G):
        raise ValueError(f"{name} must be 2 (2M) or 3 (1G), got {value}")
    return value


class X86Mmu:
    """kvm->arch's MMU state for one Vm: per-slot hugepage tracking
    (``slot.arch``), one TDP root per address space, and the fault path."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        # One root per address space, like the TDP MMU's per-as_id roots.
        self._roots: dict[int, Stage2Map] = {}
        # host_pfn_mapping_level(): the model assumes the host maps shared
        # memory with pages at least as big as any guest mapping (hugetlbfs
        # 1G); lower it to model THP-only (2) or 4K-only (1) backing.
        self.host_mapping_level: int = PG_LEVEL_1G
        # KVM_X86_QUIRK_SLOT_ZAP_ALL (on by default): deleting or moving a
        # memslot zaps every root (kvm_mmu_zap_all_fast), not just the slot.
        self.slot_zap_all: bool = True
        # The fix for the attributes-vs-hugepage race (2025): the pre-set
        # pass also invalidates the straddling head/tail hugepages. False
        # models kernels from 6.8 up to that fix.
        self.invalidate_straddling_hugepages: bool = True
        # The eager_page_split module parameter (on by default): turning on
        # dirty logging splits the slot's huge leaves to 4K at once, instead
        # of on the first write to each.
        self.eager_page_split: bool = True
        # kvm->arch.cpu_dirty_log_size != 0: the CPU logs dirty pages itself
        # (Intel PML), so enabling dirty logging clears dirty bits and only
        # write-protects huge leaves; off (AMD) it write-protects everything.
        self.pml: bool = False
        self._warned: set[str] = set()

    # --- helpers ---------------------------------------------------------

    def _tracker_class(self) -> type[RangeHugepageTracker] | type[LpageInfoTracker]:
        return LpageInfoTracker if self._vm.store_kind == "xarray" else RangeHugepageTracker

    def _warn_once(self, what: str) -> None:
        # WARN_ON_ONCE: report the caller's bug once per Vm, survive it.
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(KvmWarning(what), stacklevel=3)

    @contextlib.contextmanager
    def _mmu_locked(self) -> Iterator[None]:
        # Paths the kernel runs with mmu_lock taken by themselves; if the
        # caller already holds it (a Vm that zaps under its own pass), reuse.
        lock = self._vm.mmu_lock
        if lock.held_by_current_thread():
            yield
            return
        with lock:
            yield

    def _account_removed(self, removed: tuple[int, int, int]) -> None:
        n4k, n2m, n1g = removed
        if not (n4k or n2m or n1g):
            return
        stats = self._vm.stats
        zapped, mapped = stats.zapped_pages, stats.mapped
        if n4k:
            zapped[PG_LEVEL_4K] += n4k
            mapped[PG_LEVEL_4K] -= n4k
        if n2m:
            zapped[PG_LEVEL_2M] += n2m
            mapped[PG_LEVEL_2M] -= n2m
        if n1g:
            zapped[PG_LEVEL_1G] += n1g
            mapped[PG_LEVEL_1G] -= n1g

    def _tracker(self, slot: Memslot) -> HugepageTrackerLike:
        tracker = slot.arch
        if tracker is None:
            raise LookupError(f"{slot!r} has no hugepage tracking (memslot_created was not called)")
        return tracker  # type: ignore[no-any-return]

    # --- memslots (kvm_arch_prepare/commit_memory_region) ------------------

    def memslot_created(self, slot: Memslot) -> None:
        """kvm_alloc_memslot_metadata(): the disallow rules, then the mixed
        flags from the current attributes (only for VMs with private memory,
        as kvm_mmu_init_memslot_memory_attributes)."""
        vm = self._vm
        vm.slots_lock.assert_held("memslot metadata is built under slots_lock")
        tracker = self._tracker_class()(slot.base_gfn, slot.npages, slot.userspace_addr)
        if vm.has_private_mem:
            tracker.init_memory_attributes(vm.store)
        slot.arch = tracker

    def memslot_deleted(self, slot: Memslot) -> bool:
        """kvm_arch_flush_shadow_memslot(): zap what the slot's removal makes
        stale (by default every root, per KVM_X86_QUIRK_SLOT_ZAP_ALL) and drop
        the slot's tracking. Returns True if anything was mapped."""
        vm = self._vm
        vm.slots_lock.assert_held("memslots are deleted or moved under slots_lock")
        total = [0, 0, 0]
        with self._mmu_locked():
            if self.slot_zap_all:
                roots = list(self._roots.values())
                for root in roots:
                    for i, n in enumerate(root.zap_all()):
                        total[i] += n
            else:
                own = self._roots.get(slot.as_id)
                if own is not None:
                    total = list(own.zap(slot.base_gfn, slot.base_gfn + slot.npages))
            self._account_removed((total[0], total[1], total[2]))
            slot.arch = None
        return any(total)

    def memslot_flags_changed(self, slot: Memslot, old_flags: int) -> None:
        """kvm_mmu_slot_apply_flags() for a flags-only change (x86.c), which
        can only toggle dirty logging (READONLY cannot change; guest_memfd
        slots cannot log). Turning it on splits the slot's huge leaves to 4K
        (``eager_page_split``), write-protects the slot (not modelled: the
        model tracks no writes) and flushes; turning it off recovers
        hugepages: each page table in the slot that could now be mapped huge
        is zapped so that it refaults huge (kvm_mmu_zap_collapsible_sptes,
        one TLB flush per zap). KVM_DIRTY_LOG_INITIALLY_SET (through
        ``vm.enable_cap``) skips everything on enabling; ``pml`` adds the
        dirty-bit clearing pass (one more mmu_lock round)."""
        vm = self._vm
        vm.slots_lock.assert_held("memslot flags change under slots_lock")
        if not (old_flags ^ slot.flags) & KVM_MEM_LOG_DIRTY_PAGES or slot.flags & KVM_MEM_READONLY:
            return
        root = self._roots.get(slot.as_id)
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            # kvm_dirty_log_manual_protect_and_init_set(): every page is
            # assumed dirty, so there is nothing to split or protect.
            if vm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
                return
            if self.eager_page_split:
                with self._mmu_locked():  # kvm_mmu_slot_try_split_huge_pages
                    if root is not None:
                        _, n2m, n1g = root.split_huge_pages(start, end)
                        stats = vm.stats
                        stats.mapped[PG_LEVEL_4K] += n2m * (1 << 9) + n1g * (1 << 18)
                        stats.mapped[PG_LEVEL_2M] -= n2m
                        stats.mapped[PG_LEVEL_1G] -= n1g
            if self.pml:
                with self._mmu_locked():  # kvm_mmu_slot_leaf_clear_dirty
                    pass
            with self._mmu_locked():  # kvm_mmu_slot_remove_write_access
                pass
            # Unconditional, once the slot is write-protected.
            vm.kvm_flush_remote_tlbs()
            return
        with self._mmu_locked():  # kvm_mmu_zap_collapsible_sptes
            if root is not None:
                self._recover_huge_pages(root, slot)

    def _recover_huge_pages(self, root: Stage2Map, slot: Memslot) -> None:
        """zap_collapsible_spte_range(): top down, zap each 1G then 2M page
        table (a region holding smaller leaves) whose first gfn is in the
        slot and whose level the gfn can now be mapped at."""
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        private_capable = slot.has_guest_memfd()
        for level, smaller in ((PG_LEVEL_1G, (PG_LEVEL_4K, PG_LEVEL_2M)), (PG_LEVEL_2M, (PG_LEVEL_4K,))):
            shift = 9 * (level - 1)
            tables: set[int] = set()
            for lvl in smaller:
                for s, e in root.runs(lvl):
                    s, e = max(s, start), min(e, end)
                    if s < e:
                        tables.update(range(s >> shift, ((e - 1) >> shift) + 1))
            for table in sorted(tables):
                gfn = table << shift
                if gfn < start:
                    continue  # the hugepage is not inside the slot
                private = private_capable and self._mem_is_private(gfn)
                if self._max_level(slot, gfn, private) < level:
                    continue
                self._account_removed(root.zap(gfn, gfn + (1 << shift)))
                # A successful atomic zap flushes the range.
                self._vm.kvm_flush_remote_tlbs()

    # --- the KVM_SET_MEMORY_ATTRIBUTES passes --------------------------------

    def pre_set_memory_attributes(self, rng: GfnRange) -> bool:
        """kvm_arch_pre_set_memory_attributes(): add the straddling head and
        tail hugepages that are not mixed to the ongoing invalidation (see
        ``invalidate_straddling_hugepages``), then zap the leaves intersecting
        the range (huge leaves straddling it go whole). True if anything was
        mapped, i.e. a TLB flush is needed."""
        vm = self._vm
        vm.mmu_lock.assert_held("kvm_arch_pre_set_memory_attributes runs under mmu_lock")
        # Zapping is needed even for slots that can't be private: making
        # memory PRIVATE must cut off shared access, and any change may alter
        # which hugepages are possible. A VM without private memory never
        # gets here (its supported attribute mask is empty).
        if not vm.has_private_mem:
            self._warn_once(PRE_SET_WITHOUT_PRIVATE_MEM)
            return False
        if self.invalidate_straddling_hugepages:
            self._invalidate_straddling_hugepages(rng)
        return self.unmap_gfn_range(rng.slot, rng.start, rng.end)

    def unmap_gfn_range(self, slot: Memslot, start: int, end: int) -> bool:
        """kvm_unmap_gfn_range(): zap the leaves of slot's address space
        intersecting [start, end) (huge leaves straddling it go whole). True
        if anything was mapped, i.e. a TLB flush is needed."""
        self._vm.mmu_lock.assert_held("kvm_unmap_gfn_range runs under mmu_lock")
        root = self._roots.get(slot.as_id)
        if root is None:
            return False
        removed = root.zap(start, end)
        if removed[0] or removed[1] or removed[2]:
            self._account_removed(removed)
            return True
        return False

    def _invalidate_straddling_hugepages(self, rng: GfnRange) -> None:
        """Add the head and tail hugepages that straddle the range, if they
        could be mapped huge now, to the ongoing invalidation: otherwise a
        fault on a gfn outside the range, racing with the conversion, could
        install a hugepage from mixed flags that are about to change."""
        slot = rng.slot
        tracker = slot.arch
        if tracker is None:
            tracker = self._tracker(slot)  # raises LookupError
        # One native call does the 2M/1G head/tail scan (test_mixed of each
        # candidate). kvm_mmu_invalidate_range_add() only widens the range
        # to the hull of what it is given, so adding the hull of the
        # straddling hugepages once leaves the same state as adding each.
        hull = tracker.straddling_hugepages_hull(rng.start, rng.end)
        if hull is not None:
            self._vm.kvm_mmu_invalidate_range_add(hull[0], hull[1])

    @staticmethod
    def _straddling_hugepages_reference(
        tracker: HugepageTrackerLike, slot: Memslot, start: int, end: int
    ) -> list[tuple[int, int]]:
        """The per-level head/tail scan straddling_hugepages() does natively,
        kept in Python for tests."""
        out = []
        slot_end = slot.base_gfn + slot.npages
        for level, n in _STRADDLE_LEVELS:
            head = start & ~(n - 1)
            tail = (end - 1) & ~(n - 1)
            if (
                (head != start or head + n > end)
                and head >= slot.base_gfn
                and head + n <= slot_end
                and not tracker.test_mixed(head, level)
            ):
                out.append((head, head + n))
            if tail == head:
                continue
            if tail + n > end and tail + n <= slot_end and not tracker.test_mixed(tail, level):
                out.append((tail, tail + n))
        return out

    def post_set_memory_attributes(self, rng: GfnRange) -> bool:
        """kvm_arch_post_set_memory_attributes(): recompute the mixed flags of
        the hugepages the range touches (2M, then 1G which consumes the 2M
        results). Never asks for a flush."""
        vm = self._vm
        vm.mmu_lock.assert_held("kvm_arch_post_set_memory_attributes runs under mmu_lock")
        vm.slots_lock.assert_held("kvm_arch_post_set_memory_attributes runs under slots_lock")
        if not vm.has_private_mem:
            self._warn_once(POST_SET_WITHOUT_PRIVATE_MEM)
            return False
        tracker = rng.slot.arch
        if tracker is None:
            tracker = self._tracker(rng.slot)  # raises LookupError
        tracker.post_set_memory_attributes(vm.store, rng.start, rng.end, rng.attributes)
        return False

    # --- faults --------------------------------------------------------------

    def _invalidation_covers(self, gfn: int) -> bool:
        vm = self._vm
        if not vm.mmu_invalidate_in_progress:
            return False
        start, end = vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end
        # A range not yet added while in progress: the kernel WARNs and
        # retries (mmu_lock was dropped between begin and range_add).
        if start == INVALID_GPA or end == INVALID_GPA:
            return True
        return bool(start <= gfn < end)

    def _retry_gfn_unsafe(self, mmu_seq: int, gfn: int) -> bool:
        """mmu_invalidate_retry_gfn_unsafe(): the lockless early check."""
        return self._invalidation_covers(gfn) or self._vm.mmu_invalidate_seq != mmu_seq

    def _retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """mmu_invalidate_retry_gfn(): the authoritative check, under mmu_lock."""
        self._vm.mmu_lock.assert_held("mmu_invalidate_retry_gfn needs mmu_lock")
        return self._invalidation_covers(gfn) or self._vm.mmu_invalidate_seq != mmu_seq

    def _memory_fault_exit(self, gfn: int, private: bool) -> MemoryFault:
        """kvm_mmu_prepare_memory_fault_exit(): gpa page aligned, one page,
        PRIVATE iff the access was private (RWX flags are not reported)."""
        self._vm.stats.memory_fault_exits += 1
        flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
        return MemoryFault(gfn << PAGE_SHIFT, PAGE_SIZE, flags)

    def _mem_is_private(self, gfn: int) -> bool:
        """kvm_mem_is_private()."""
        return bool(self._vm.store.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def _max_level(self, slot: Memslot, gfn: int, private: bool) -> int:
        """kvm_faultin_pfn_private()'s max_level cap plus
        kvm_mmu_hugepage_adjust() / __kvm_mmu_max_mapping_level()."""
        max_level = KVM_MAX_HUGEPAGE_LEVEL
        if private:
            max_level = min(max_level, kvm_max_level_for_order(self._vm.guest_memfd_max_order))
        if max_level == PG_LEVEL_4K:
            return PG_LEVEL_4K
        # Dirty logging needs 4K granularity.
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            return PG_LEVEL_4K
        level = self._tracker(slot).max_mapping_level(gfn, max_level)
        # Private memory's size comes from guest_memfd alone; shared memory
        # is also bounded by how the host maps it.
        if private:
            return int(level)
        return min(int(level), self.host_mapping_level)

    def fault(self, gpa: int, private: bool = False, write: bool = False, *, as_id: int = 0) -> int:
        """A TDP page fault at ``gpa``: maps it at the highest level allowed
        and returns that level (1 = 4K, 2 = 2M, 3 = 1G), or raises
        :class:`MemoryFault` (KVM_EXIT_MEMORY_FAULT) when the access's
        private-ness differs from the gfn's attribute or a private access
        hits a slot without guest_memfd or no slot at all. A shared access
        outside every memslot is MMIO: it returns 0, nothing is mapped, and
        ``stats.mmio_faults`` counts it (the kernel emulates it and exits
        with KVM_EXIT_MMIO for userspace devices; MMIO SPTE caching is not
        modelled). A fault that races with an invalidation of its gfn
        retries (``fault_retries``). ``write`` is validated but, as in the
        kernel's memory-fault exit, not reported; read-only slots are not
        modelled."""
        # Exact ints and bools take the fast path; anything else gets the
        # full checks (same errors, same order).
        if type(gpa) is not int or not 0 <= gpa < _U64_LIMIT:
            gpa = _check_u64(gpa, "gpa")
        if private is not True and private is not False:
            _check_bool(private, "private")
        if write is not True and write is not False:
            _check_bool(write, "write")
        vm = self._vm
        if type(as_id) is not int:
            if not isinstance(as_id, int) or isinstance(as_id, bool):
                raise TypeError(f"as_id must be an int, not {type(as_id).__name__}")
        memslots = vm.memslots
        if not 0 <= as_id < memslots.nr_as_ids:
            raise ValueError(f"as_id must be in 0..{memslots.nr_as_ids - 1}, got {as_id}")
        mmu_lock = vm.mmu_lock
        # A vCPU never faults while holding these: with mmu_lock it would
        # deadlock, and with slots_lock held by the thread performing an
        # invalidation the retry loop could never make progress.
        for lock in (mmu_lock, vm.slots_lock):
            if lock.held_by_current_thread():
                raise LockdepError(
                    lock.name,
                    f"a vCPU page fault cannot run while its thread holds {lock.name}",
                    f"X86Mmu.fault(gpa={gpa:#x})",
                )
        gfn = gpa >> PAGE_SHIFT
        vm.stats.faults += 1
        while True:
            mmu_seq = vm.mmu_invalidate_seq
            slot = memslots.find(as_id, gfn)
            # Don't fault in a pfn that is being invalidated: go back to the
            # guest and fault again (RET_PF_RETRY).
            # A slot being deleted or moved (its tracking already dropped, as
            # with KVM_MEMSLOT_INVALID) also means "retry".
            if slot is not None and (
                slot.arch is None or self._retry_gfn_unsafe(mmu_seq, gfn)
            ):
                self._check_can_make_progress(gpa)
                self._retry_later()
                continue

            # __kvm_faultin_pfn(): checked without mmu_lock, like the kernel.
            if slot is None:
                # A private access, or one whose private-ness differs from
                # the attribute, exits; a shared one is MMIO, emulated
                # without a mapping (kvm_handle_noslot_fault).
                if private or self._mem_is_private(gfn):
                    raise self._memory_fault_exit(gfn, private)
                vm.stats.mmio_faults += 1
                return 0
            if private != self._mem_is_private(gfn):
                raise self._memory_fault_exit(gfn, private)
            # kvm_faultin_pfn_private(): no guest_memfd, or its file was
            # closed (kvm_gmem_get_pfn fails): exit.
            if private and (not slot.has_guest_memfd() or slot.gmem is None):
                raise self._memory_fault_exit(gfn, private)

            with mmu_lock:
                # The tracking is gone if the slot was deleted meanwhile.
                stale = slot.arch is None or self._retry_gfn(mmu_seq, gfn)
                if not stale:
                    level = self._max_level(slot, gfn, private)
                    root = self._roots.get(as_id)
                    if root is None:
                        root = self._roots[as_id] = Stage2Map()
                    installed, removed = root.map(gfn, level)
                    if removed[0] or removed[1] or removed[2]:
                        self._account_removed(removed)
                    if installed:
                        vm.stats.mapped[level] += 1
            if stale:
                self._retry_later()
                continue
            return int(level)

    def _check_can_make_progress(self, gpa: int) -> None:
        # The kernel's vCPU retries until whoever began the invalidation
        # ends it. With no other thread alive nobody ever will: report the
        # livelock instead of spinning forever.
        if threading.active_count() == 1:
            raise LockdepError(
                "mmu_invalidate_in_progress",
                "a fault would retry forever: an invalidation covering its gfn "
                "is in progress (or its memslot is going away) and no other "
                "thread exists to finish it",
                f"X86Mmu.fault(gpa={gpa:#x})",
            )

    def _retry_later(self) -> None:
        self._vm.stats.fault_retries += 1
        # Let the invalidating thread run before "re-entering the guest".
        time.sleep(_RETRY_BACKOFF_S if threading.active_count() > 1 else 0)

    # --- inspection ----------------------------------------------------------

    def max_mapping_level(self, gfn: int, *, as_id: int = 0) -> int:
        """The level a fault at ``gfn`` whose private-ness matches the gfn's
        attribute would map now (kvm_mmu_max_mapping_level() plus the
        guest_memfd order and dirty-logging caps of the fault path)."""
        gfn = _check_u64(gfn, "gfn")
        slot = self._vm.memslots.find(as_id, gfn)
        if slot is None:
            raise ValueError(f"gfn {gfn:#x} is not in any memslot of address space {as_id}")
        private = slot.has_guest_memfd() and self._mem_is_private(gfn)
        return self._max_level(slot, gfn, private)

    def hugepage_mixed(self, slot: int | Memslot, gfn: int, level: int) -> bool:
        """hugepage_test_mixed() of the ``level`` hugepage holding ``gfn`` in
        uapi slot ``slot`` (as_id << 16 | id; a live Memslot also works)."""
        if isinstance(slot, Memslot):
            slot = slot.slot
        slot = _check_u64(slot, "slot")
        gfn = _check_u64(gfn, "gfn")
        level = _check_level(level, "level")
        memslot = None
        if slot >> 16 < self._vm.memslots.nr_as_ids:
            memslot = self._vm.memslots.get(slot >> 16, slot & 0xFFFF)
        if memslot is None:
            raise ValueError(f"slot {slot:#x} does not exist")
        if not memslot.base_gfn <= gfn < memslot.base_gfn + memslot.npages:
            raise ValueError(
                f"gfn {gfn:#x} is outside slot {slot:#x} "
                f"[{memslot.base_gfn:#x}, {memslot.base_gfn + memslot.npages:#x})"
            )
        return bool(self._tracker(memslot).test_mixed(gfn, level))

    def mapped_level(self, gpa: int, *, as_id: int = 0) -> int:
        """Level of the leaf mapping ``gpa`` (0 if unmapped)."""
        gpa = _check_u64(gpa, "gpa")
        root = self._roots.get(as_id)
        return 0 if root is None else int(root.mapped_level(gpa >> PAGE_SHIFT))

    def mappings(self, level: int, *, as_id: int = 0) -> list[tuple[int, int]]:
        """The leaves of ``level`` (1, 2 or 3) as (start_gfn, end_gfn) runs."""
        if isinstance(level, bool) or not isinstance(level, int) or level not in (1, 2, 3):
            raise ValueError(f"level must be 1, 2 or 3, got {level!r}")
        root = self._roots.get(as_id)
        return [] if root is None else [(int(s), int(e)) for s, e in root.runs(level)]


__all__ = [
    "KVM_MAX_HUGEPAGE_LEVEL",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "X86Mmu",
    "kvm_max_level_for_order",
]
