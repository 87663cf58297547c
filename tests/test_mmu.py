"""The x86 MMU model through the Vm: faults and KVM_EXIT_MEMORY_FAULT, levels,
zaps and flushes, mmu_invalidate_retry, memslot changes, stats.

Rules from arch/x86/kvm/mmu/mmu.c (Linux 6.8+): __kvm_faultin_pfn's
private/shared check, kvm_faultin_pfn_private, kvm_mmu_hugepage_adjust,
kvm_arch_pre/post_set_memory_attributes, mmu_invalidate_retry_gfn.
"""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from memattr.errors import LockdepError, MemoryFault
from memattr.gfn_range import GfnRange
from memattr.locks import KvmWarning
from memattr.gfn_range import clip_gfn_ranges
from memattr.mmu import X86Mmu


def kvm_max_level_for_order(order: int) -> int:
    """Oracle: the largest level a guest_memfd folio of ``order`` backs."""
    return 3 if order >= 18 else 2 if order >= 9 else 1
from memattr.uapi import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_ENABLE_CAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SW_PROTECTED_VM,
    kvm_enable_cap,
)
from memattr.vm import Vm

P = KVM_MEMORY_ATTRIBUTE_PRIVATE
PAGE = 4096
M2 = 2 << 20
G1 = 1 << 30


def make_vm(
    store: str = "rangetree",
    *,
    gmem: bool = True,
    size: int = 2 * G1,
    gpa: int = 0,
    order: int = 0,
    uaddr: int | None = None,
    flags: int = 0,
) -> Vm:
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store, guest_memfd_max_order=order)
    if gmem:
        fd = vm.create_guest_memfd(size)
        vm.set_user_memory_region(
            0,
            gpa,
            size,
            userspace_addr=gpa if uaddr is None else uaddr,
            flags=KVM_MEM_GUEST_MEMFD | flags,
            guest_memfd=fd,
        )
    else:
        vm.set_user_memory_region(0, gpa, size, userspace_addr=gpa if uaddr is None else uaddr, flags=flags)
    return vm


@pytest.fixture(params=["rangetree", "xarray"])
def store(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


# --- the private/shared check, every combination ------------------------------


@pytest.mark.parametrize("gmem", [True, False], ids=["gmem", "no_gmem"])
@pytest.mark.parametrize("attr_private", [False, True], ids=["attr_shared", "attr_private"])
@pytest.mark.parametrize("access_private", [False, True], ids=["access_shared", "access_private"])
def test_fault_every_access_attribute_slot_combination(
    store: str, gmem: bool, attr_private: bool, access_private: bool
) -> None:
    vm = make_vm(store, gmem=gmem)
    gpa = G1 + 5 * M2 + 3 * PAGE + 0x123  # not page aligned on purpose
    if attr_private:
        vm.set_memory_attributes(G1, G1, P)
    mismatch = access_private != attr_private
    no_gmem_private = access_private and not gmem
    before = vm.stats.as_dict()
    if mismatch or no_gmem_private:
        with pytest.raises(MemoryFault) as ei:
            vm.fault(gpa, private=access_private)
        e = ei.value
        assert isinstance(e, OSError) and e.errno == errno.EFAULT
        assert e.gpa == gpa & ~(PAGE - 1)
        assert e.size == PAGE
        assert e.flags == (KVM_MEMORY_EXIT_FLAG_PRIVATE if access_private else 0)
        assert vm.stats.memory_fault_exits == before["memory_fault_exits"] + 1
        assert vm.stats.mapped == before["mapped"]
        assert vm.mmu.mapped_level(gpa) == 0
    else:
        level = vm.fault(gpa, private=access_private)
        # Private memory from guest_memfd is 4K by default (max order 0);
        # shared memory in an aligned, uniform 1G region maps 1G.
        assert level == (1 if access_private else 3)
        assert vm.mmu.mapped_level(gpa) == level
        assert vm.stats.mapped[level] == 1
        assert vm.stats.memory_fault_exits == 0
    assert vm.stats.faults == before["faults"] + 1


def test_fault_outside_every_slot_private_exits_shared_is_mmio(store: str) -> None:
    vm = make_vm(store, size=G1)
    with pytest.raises(MemoryFault) as ei:
        vm.fault(G1 + 0x1234, private=True)
    assert ei.value.gpa == G1 + 0x1000 and ei.value.size == PAGE
    assert ei.value.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE
    # A shared access with no memslot is MMIO: emulated, nothing mapped.
    assert vm.fault(G1 + 0x1234, private=False, write=True) == 0
    assert vm.mmu.mapped_level(G1) == 0 and vm.stats.mapped == {1: 0, 2: 0, 3: 0}
    assert vm.stats.mmio_faults == 1 and vm.stats.memory_fault_exits == 1
    assert vm.stats.mmu_lock_acquisitions == 0
    # Attributes can be set outside every slot: a shared access to a gfn
    # marked private there is a mismatch, and exits.
    vm.set_memory_attributes(2 * G1, PAGE, P)
    with pytest.raises(MemoryFault) as ei:
        vm.fault(2 * G1)
    assert ei.value.flags == 0
    # A VM without any slot: the same rules.
    empty = Vm(KVM_X86_SW_PROTECTED_VM, store)
    assert empty.fault(0) == 0
    with pytest.raises(MemoryFault):
        empty.fault(0, private=True)
    assert (empty.stats.faults, empty.stats.mmio_faults, empty.stats.memory_fault_exits) == (2, 1, 1)


def test_default_vm_private_access_exits_shared_maps(store: str) -> None:
    vm = Vm(KVM_X86_DEFAULT_VM, store)
    vm.set_user_memory_region(0, 0, G1)
    assert vm.fault(0x5000) == 3
    with pytest.raises(MemoryFault) as ei:
        vm.fault(0x5000, private=True)
    assert ei.value.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE


# --- levels ---------------------------------------------------------------------


@pytest.mark.parametrize(("order", "level"), [(0, 1), (8, 1), (9, 2), (17, 2), (18, 3)])
def test_private_level_follows_guest_memfd_order(store: str, order: int, level: int) -> None:
    assert kvm_max_level_for_order(order) == level
    vm = make_vm(store, order=order)
    vm.set_memory_attributes(0, 2 * G1, P)
    assert vm.fault(G1 + 0x3000, private=True) == level
    assert vm.max_mapping_level((G1 + 0x3000) >> 12) == level


def test_levels_follow_mixed_flags_and_slot_alignment(store: str) -> None:
    # Slot starts 4K past a 2M boundary and is 2G + 4K long.
    base = G1 - 2 * M2 + PAGE
    vm = make_vm(store, gpa=base, size=2 * G1 + PAGE, order=18)
    assert vm.fault(base) == 1  # partial head 2M page
    assert vm.fault(G1 - PAGE) == 2  # whole 2M, partial 1G
    assert vm.fault(G1 + 123 * PAGE) == 3  # the whole 1G page
    assert vm.fault(base + 2 * G1) == 1  # partial tail
    # One private page in the 1G page: that 2M is mixed, the 1G is mixed.
    vm.set_memory_attributes(G1 + 3 * M2 + PAGE, PAGE, P)
    assert vm.hugepage_mixed(0, (G1 + 3 * M2) >> 12, 2)
    assert vm.hugepage_mixed(0, G1 >> 12, 3)
    assert not vm.hugepage_mixed(0, (G1 + 4 * M2) >> 12, 2)
    assert vm.fault(G1 + 3 * M2) == 1
    assert vm.fault(G1 + 3 * M2 + PAGE, private=True) == 1
    assert vm.fault(G1 + 4 * M2) == 2
    assert vm.max_mapping_level((G1 + 4 * M2) >> 12) == 2
    # Uniform again: the 1G page is huge again.
    vm.set_memory_attributes(G1 + 3 * M2 + PAGE, PAGE, 0)
    assert not vm.hugepage_mixed(0, G1 >> 12, 3)
    assert vm.fault(G1 + 4 * M2) == 3


def test_incongruent_userspace_address_maps_4k(store: str) -> None:
    vm = make_vm(store, uaddr=PAGE)
    assert vm.fault(G1) == 1
    vm2 = make_vm(store, uaddr=M2)
    assert vm2.fault(G1) == 2  # congruent modulo 2M, not 1G


def test_dirty_logging_and_host_level_cap(store: str) -> None:
    vm = make_vm(store, gmem=False, flags=KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.fault(0) == 1
    vm = make_vm(store, gmem=False)
    vm.mmu.host_mapping_level = 2  # THP-backed host memory
    assert vm.fault(0) == 2


# --- zaps, flushes, stats -------------------------------------------------------------


def test_zap_only_flushes_when_something_was_mapped(store: str) -> None:
    vm = make_vm(store)
    vm.set_memory_attributes(0, M2, P)
    assert vm.stats.tlb_flushes == 0
    assert vm.stats.zapped_pages == {1: 0, 2: 0, 3: 0}
    vm.set_memory_attributes(0, M2, 0)  # back to shared, nothing mapped
    assert vm.fault(G1 + 0x1000) == 3
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 1}
    # Converting one page inside the 1G leaf zaps the leaf whole.
    vm.set_memory_attributes(G1 + 7 * PAGE, PAGE, P)
    assert vm.stats.tlb_flushes == 1
    assert vm.stats.zapped_pages == {1: 0, 2: 0, 3: 1}
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 0}
    assert vm.mmu.mapped_level(G1) == 0


def test_zap_counts_by_level(store: str) -> None:
    vm = make_vm(store, order=9)
    vm.set_memory_attributes(3 * PAGE, PAGE, P)  # 2M page 0 and 1G page 0 mixed
    assert vm.fault(0) == 1
    assert vm.fault(PAGE) == 1
    assert vm.fault(3 * PAGE, private=True) == 1
    assert vm.fault(M2) == 2
    assert vm.fault(G1) == 3
    assert vm.stats.mapped == {1: 3, 2: 1, 3: 1}
    assert vm.mmu.mappings(1) == [(0, 2), (3, 4)]
    # One call covering [4K, 2M + 4K): two 4K leaves and one 2M leaf.
    vm.set_memory_attributes(PAGE, M2, P)
    assert vm.stats.zapped_pages == {1: 2, 2: 1, 3: 0}
    assert vm.stats.mapped == {1: 1, 2: 0, 3: 1}
    assert vm.stats.tlb_flushes == 1
    assert vm.stats.faults == 5


def test_refault_and_replacement_keep_footprint_exact(store: str) -> None:
    vm = make_vm(store)
    vm.set_memory_attributes(M2 + PAGE, PAGE, P)
    assert vm.fault(M2) == 1
    assert vm.fault(M2) == 1  # spurious: already mapped
    assert vm.stats.mapped == {1: 1, 2: 0, 3: 0}
    # Shared again; the conversion's range does not touch the 4K leaf at M2.
    vm.set_memory_attributes(M2 + PAGE, PAGE, 0)
    assert vm.stats.mapped == {1: 1, 2: 0, 3: 0}
    assert vm.stats.zapped_pages == {1: 0, 2: 0, 3: 0}
    # A fault there now installs a 1G leaf, which replaces the page table
    # holding the 4K leaf (the TDP MMU frees the child table).
    assert vm.fault(M2) == 3
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 1}
    assert vm.stats.zapped_pages == {1: 1, 2: 0, 3: 0}
    # A private page inside: the 1G leaf goes whole, then a 4K fault under
    # a (re-faulted) 1G leaf splits it.
    vm.set_memory_attributes(M2 + PAGE, PAGE, P)
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 0}
    assert vm.stats.zapped_pages == {1: 1, 2: 0, 3: 1}


def test_memslot_delete_and_move_zap(store: str) -> None:
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store)
    vm.set_user_memory_region(0, 0, G1)
    vm.set_user_memory_region(1, G1, G1, userspace_addr=G1)
    assert vm.fault(0) == 3 and vm.fault(G1) == 3
    # KVM_X86_QUIRK_SLOT_ZAP_ALL: deleting slot 1 zaps every root.
    vm.set_user_memory_region(1, G1, 0)
    assert vm.stats.zapped_pages[3] == 2
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 0}
    assert vm.fault(G1) == 0  # no slot there any more: MMIO
    assert vm.mmu.mapped_level(G1) == 0
    # With the quirk off only the slot's range goes.
    vm.set_user_memory_region(1, G1, G1, userspace_addr=G1)
    vm.mmu.slot_zap_all = False
    assert vm.fault(0) == 3 and vm.fault(G1) == 3
    vm.set_user_memory_region(1, 2 * G1, G1, userspace_addr=G1)  # move
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 1}
    assert vm.fault(2 * G1) == 3


def test_memslot_created_reads_existing_attributes(store: str) -> None:
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store)
    vm.set_memory_attributes(G1 + 5 * PAGE, PAGE, P)  # no slot yet
    fd = vm.create_guest_memfd(2 * G1)
    vm.set_user_memory_region(0, 0, 2 * G1, flags=KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
    assert vm.hugepage_mixed(0, G1 >> 12, 2)
    assert vm.hugepage_mixed(0, G1 >> 12, 3)
    assert not vm.hugepage_mixed(0, 0, 3)
    assert vm.fault(G1 + 5 * PAGE, private=True) == 1


# --- mmu_invalidate_retry -------------------------------------------------------------


def test_fault_racing_an_invalidation_retries(store: str) -> None:
    vm = make_vm(store)
    target = G1 + 0x5000
    result: dict[str, object] = {}

    def vcpu() -> None:
        try:
            result["level"] = vm.fault(target, private=True)
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e

    threads: list[threading.Thread] = []

    @vm.on_unmap
    def start_vcpu_mid_invalidation(rng: GfnRange) -> bool:
        # mmu_invalidate_in_progress is set and the range added: a fault on
        # a gfn inside must not map anything until the invalidation ends.
        t = threading.Thread(target=vcpu, name="vcpu0")
        threads.append(t)
        t.start()
        deadline = time.monotonic() + 10
        while vm.stats.fault_retries == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert "level" not in result
        return False

    vm.set_memory_attributes(G1, M2, P)
    threads[0].join(10)
    assert not threads[0].is_alive()
    assert "error" not in result
    # The retried fault saw the new attribute: a private 4K mapping.
    assert result["level"] == 1
    assert vm.stats.fault_retries >= 1
    assert vm.stats.faults == 1
    assert vm.mmu.mapped_level(target) == 1


def test_fault_outside_invalidated_range_does_not_retry(store: str) -> None:
    vm = make_vm(store)
    result: dict[str, int] = {}
    threads: list[threading.Thread] = []

    @vm.on_unmap
    def fault_elsewhere(rng: GfnRange) -> bool:
        t = threading.Thread(target=lambda: result.setdefault("level", vm.fault(1 << 30)))
        threads.append(t)
        t.start()
        # It blocks on mmu_lock (held here); give it time to get there.
        time.sleep(0.05)
        return False

    vm.set_memory_attributes(0, PAGE, P)
    threads[0].join(10)
    # The sequence changed while it waited for mmu_lock: one retry at most,
    # and never a mapping of a stale gfn.
    assert result["level"] == 3
    assert vm.stats.fault_retries <= 1


def test_fault_under_mmu_lock_is_a_lockdep_error(store: str) -> None:
    vm = make_vm(store)

    @vm.on_post_set
    def fault_inside(rng: GfnRange) -> bool:
        vm.fault(0)
        return False

    with pytest.raises(LockdepError, match="mmu_lock"):
        vm.set_memory_attributes(0, PAGE, P)
    with vm.slots_lock, pytest.raises(LockdepError, match="slots_lock"):
        vm.fault(0)


# --- direct calls: lockdep and WARN semantics ----------------------------------------


def test_passes_require_locks_and_private_memory() -> None:
    vm = make_vm()
    slot = vm.memslots.get(0, 0)
    assert slot is not None
    (rng,) = clip_gfn_ranges(vm._kvm, vm.memslots, 0, 1, P)
    with pytest.raises(LockdepError):
        vm.mmu.pre_set_memory_attributes(rng)
    with vm.mmu_lock, pytest.raises(LockdepError, match="slots_lock"):
        vm.mmu.post_set_memory_attributes(rng)

    plain = Vm(KVM_X86_DEFAULT_VM)
    plain.set_user_memory_region(0, 0, G1)
    pslot = plain.memslots.get(0, 0)
    assert pslot is not None
    (prng,) = clip_gfn_ranges(plain._kvm, plain.memslots, 0, 1, 0)
    with plain.slots_lock, plain.mmu_lock:
        plain.kvm_mmu_invalidate_begin()
        with pytest.warns(KvmWarning, match="without private memory"):
            assert plain.mmu.pre_set_memory_attributes(prng) is False
        plain.kvm_mmu_invalidate_end()
        with pytest.warns(KvmWarning, match="without private memory"):
            assert plain.mmu.post_set_memory_attributes(prng) is False


# --- argument errors --------------------------------------------------------------------


def test_argument_errors(store: str) -> None:
    vm = make_vm(store, size=G1)
    with pytest.raises(TypeError, match="gpa"):
        vm.fault("0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gpa"):
        vm.fault(True)
    with pytest.raises(ValueError, match="gpa"):
        vm.fault(-1)
    with pytest.raises(ValueError, match="gpa"):
        vm.fault(1 << 64)
    with pytest.raises(TypeError, match="private"):
        vm.fault(0, private=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="write"):
        vm.fault(0, write=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="as_id"):
        vm.mmu.fault(0, as_id=1)  # a private-memory VM has one address space
    with pytest.raises(ValueError, match="not in any memslot"):
        vm.max_mapping_level(G1 >> 12)
    with pytest.raises(TypeError, match="gfn"):
        vm.max_mapping_level(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        vm.hugepage_mixed(0, 0, 1)
    with pytest.raises(ValueError, match="level"):
        vm.hugepage_mixed(0, 0, 4)
    with pytest.raises(TypeError, match="level"):
        vm.hugepage_mixed(0, 0, "2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not exist"):
        vm.hugepage_mixed(5, 0, 2)
    with pytest.raises(ValueError, match="does not exist"):
        vm.hugepage_mixed(1 << 16, 0, 2)
    with pytest.raises(ValueError, match="outside slot"):
        vm.hugepage_mixed(0, G1 >> 12, 2)
    with pytest.raises(ValueError, match="slot"):
        vm.hugepage_mixed(-1, 0, 2)
    with pytest.raises(ValueError, match="level"):
        vm.mmu.mappings(0)
    # Nothing was counted or mapped by the rejected calls.
    assert vm.stats.faults == 0 and vm.stats.mapped == {1: 0, 2: 0, 3: 0}
    assert isinstance(vm.mmu, X86Mmu)


# --- both stores agree end to end -------------------------------------------------------

_gfns = st.integers(0, (3 * G1 >> 12) - 1)


@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, (3 * G1 >> 12) - 1),
            st.one_of(st.integers(1, 4), st.sampled_from([511, 512, 513, 1 << 18]), st.integers(1, 1 << 19)),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
    probes=st.lists(st.tuples(_gfns, st.booleans()), min_size=1, max_size=8),
)
def test_rangetree_and_xarray_vms_agree(ops: list[tuple[int, int, bool]], probes: list[tuple[int, bool]]) -> None:
    vms = [make_vm(kind, gpa=M2 + PAGE, size=2 * G1 + 3 * M2, order=9) for kind in ("rangetree", "xarray")]

    def outcome(vm: Vm, gfn: int, private: bool) -> Iterator[object]:
        try:
            yield vm.fault(gfn << 12, private=private)
        except MemoryFault as e:
            yield ("exit", e.gpa, e.flags)
        slot = vm.memslots.find(0, gfn)
        if slot is not None:
            yield vm.max_mapping_level(gfn)
            for level in (2, 3):
                yield vm.hugepage_mixed(0, gfn, level)

    for start, npages, private in ops:
        for vm in vms:
            vm.set_memory_attributes(start << 12, npages << 12, P if private else 0)
        for gfn, acc in probes:
            assert list(outcome(vms[0], gfn, acc)) == list(outcome(vms[1], gfn, acc))
    assert vms[0].stats.as_dict() == vms[1].stats.as_dict()


def test_fault_that_could_never_make_progress_is_reported(store: str) -> None:
    vm = make_vm(store)
    with vm.mmu_lock:
        vm.kvm_mmu_invalidate_begin()
        vm.kvm_mmu_invalidate_range_add(0, 16)
    # Single-threaded: nobody will ever call invalidate_end.
    with pytest.raises(LockdepError, match="retry forever"):
        vm.fault(0x3000)
    # Outside the range the fault goes through: like mmu_invalidate_retry_gfn
    # only the faulting gfn is checked, so the leaf may be huge.
    assert vm.fault(16 << 12) == 3
    with vm.mmu_lock:
        vm.kvm_mmu_invalidate_end()
    assert vm.fault(0x3000) == 3  # spurious: the 1G leaf is there
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 1}


@pytest.mark.parametrize("fix", [True, False], ids=["with_fix", "6.8"])
def test_pre_set_invalidates_straddling_hugepages(store: str, fix: bool) -> None:
    vm = make_vm(store)
    vm.mmu.invalidate_straddling_hugepages = fix
    seen: list[tuple[int, int]] = []

    @vm.on_unmap
    def record(rng: GfnRange) -> bool:
        seen.append((vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end))
        return False

    gfn = (G1 + 3 * M2 + PAGE) >> 12
    vm.set_memory_attributes(gfn << 12, PAGE, P)
    # Head and tail are the same 2M and 1G pages here: the 1G page wins.
    assert seen[-1] == ((G1 >> 12, 2 * G1 >> 12) if fix else (gfn, gfn + 1))
    # Both now mixed: a second conversion inside them adds nothing.
    vm.set_memory_attributes((gfn + 5) << 12, PAGE, P)
    assert seen[-1] == (gfn + 5, gfn + 6)
    # A range whose head and tail straddle different 2M pages of a mixed 1G.
    vm.set_memory_attributes((G1 + 10 * M2 - PAGE), 2 * PAGE, P)
    first = (G1 + 9 * M2) >> 12
    assert seen[-1] == ((first, first + 1024) if fix else (first + 511, first + 513))


def test_fault_beside_a_conversion_in_the_same_hugepage_retries(store: str) -> None:
    vm = make_vm(store)
    result: dict[str, object] = {}
    threads: list[threading.Thread] = []

    @vm.on_unmap
    def start_vcpu(rng: GfnRange) -> bool:
        # The gfn faulted is not being converted, but its 2M page is.
        t = threading.Thread(target=lambda: result.setdefault("level", vm.fault(G1 + 0x2000)), name="vcpu1")
        threads.append(t)
        t.start()
        deadline = time.monotonic() + 10
        while vm.stats.fault_retries == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        return False

    vm.set_memory_attributes(G1 + 0x5000, PAGE, P)
    threads[0].join(10)
    # Without the straddling-hugepage invalidation this would have mapped a
    # shared 1G leaf over the private page.
    assert result["level"] == 1
    assert vm.stats.fault_retries >= 1
    assert vm.hugepage_mixed(0, G1 >> 12, 2)


# --- an independent oracle: the level is the largest uniform, aligned, whole hugepage --


@given(
    head=st.sampled_from([0, 1, 511, 512]),
    tail=st.sampled_from([0, 1, 512]),
    incongruent=st.sampled_from([0, 1, 512]),
    order=st.sampled_from([0, 9, 18]),
    ops=st.lists(
        st.tuples(st.integers(0, (3 << 18) - 1), st.integers(1, 1 << 19), st.booleans()), min_size=1, max_size=6
    ),
    probes=st.lists(st.integers(0, (3 << 18) - 1), min_size=1, max_size=10),
)
def test_fault_level_matches_brute_force_oracle(
    head: int, tail: int, incongruent: int, order: int, ops: list[tuple[int, int, bool]], probes: list[int]
) -> None:
    import numpy as np

    span = 3 << 18  # 3 GiB of gfns
    base, end = head, span - tail
    vm = Vm(KVM_X86_SW_PROTECTED_VM, "rangetree", guest_memfd_max_order=order)
    fd = vm.create_guest_memfd((end - base) << 12)
    uaddr = (base + incongruent) << 12
    vm.set_user_memory_region(
        0, base << 12, (end - base) << 12, userspace_addr=uaddr, flags=KVM_MEM_GUEST_MEMFD, guest_memfd=fd
    )
    attrs = np.zeros(span, dtype=np.uint64)
    for start, npages, private in ops:
        stop = min(start + npages, span)
        vm.set_memory_attributes(start << 12, (stop - start) << 12, P if private else 0)
        attrs[start:stop] = P if private else 0

    def oracle(gfn: int) -> int:
        private = bool(attrs[gfn] & P)
        cap = kvm_max_level_for_order(order) if private else 3
        for level in (3, 2):
            n = 1 << (9 * (level - 1))
            hp = gfn & ~(n - 1)
            if (
                level <= cap
                and hp >= base
                and hp + n <= end
                and ((base ^ (uaddr >> 12)) & (n - 1)) == 0
                and bool((attrs[hp : hp + n] == attrs[hp]).all())
            ):
                return level
        return 1

    for gfn in probes:
        if not base <= gfn < end:
            continue
        private = bool(attrs[gfn] & P)
        assert vm.max_mapping_level(gfn) == oracle(gfn)
        assert vm.fault(gfn << 12, private=private) == oracle(gfn)
        assert vm.mmu.mapped_level(gfn << 12) == oracle(gfn)


# --- dirty logging toggled on a live slot (kvm_mmu_slot_apply_flags) ---------


def _toggle_logging(vm: Vm, on: bool, *, size: int = 2 * G1, gpa: int = 0) -> None:
    vm.set_user_memory_region(0, gpa, size, userspace_addr=gpa, flags=KVM_MEM_LOG_DIRTY_PAGES if on else 0)


def test_enabling_dirty_logging_splits_huge_leaves_to_4k(store):
    vm = make_vm(store, gmem=False)
    assert vm.fault(0) == 3 and vm.fault(G1 + 5 * M2) == 3
    vm.set_memory_attributes(G1 + 3 * PAGE, PAGE, P)  # the second 1G is mixed
    assert vm.fault(G1 + 7 * M2) == 2 and vm.fault(G1 + 9 * PAGE) == 1
    before = vm.stats.as_dict()
    _toggle_logging(vm, True)
    st = vm.stats
    assert vm.mmu.mappings(3) == [] and vm.mmu.mappings(2) == []
    assert vm.mmu.mappings(1) == [(0, 1 << 18), ((G1 + 9 * PAGE) >> 12, (G1 + 10 * PAGE) >> 12),
                                  ((G1 + 7 * M2) >> 12, (G1 + 8 * M2) >> 12)]
    # Split, not zapped: the same gfns stay mapped.
    assert st.mapped == {1: (1 << 18) + 512 + 1, 2: 0, 3: 0}
    assert st.zapped_pages == before["zapped_pages"]
    assert st.tlb_flushes == before["tlb_flushes"] + 1
    assert st.mmu_lock_acquisitions == before["mmu_lock_acquisitions"] + 2
    # From now on faults map 4K.
    assert vm.fault(G1 + 100 * M2) == 1


def test_without_eager_split_huge_leaves_stay_until_a_fault_splits_them(store):
    vm = make_vm(store, gmem=False)
    vm.mmu.eager_page_split = False
    assert vm.fault(0) == 3
    _toggle_logging(vm, True)
    assert vm.mmu.mappings(3) == [(0, 1 << 18)]
    assert vm.stats.mmu_lock_acquisitions == 1 + 1  # the fault, write-protect
    assert vm.fault(5 * PAGE) == 1  # replaces the 1G leaf
    assert vm.mmu.mappings(3) == [] and vm.stats.zapped_pages[3] == 1


def test_disabling_dirty_logging_zaps_what_can_be_huge_again(store):
    vm = make_vm(store, gmem=False, size=3 * G1)
    _toggle_logging(vm, True, size=3 * G1)
    vm.set_memory_attributes(G1 + 3 * PAGE, PAGE, P)  # 1G #1 mixed, its 2M #0 too
    for gpa in (0, 5 * PAGE, M2, G1, G1 + 4 * PAGE, G1 + M2 + PAGE, 2 * G1 + 8 * PAGE):
        assert vm.fault(gpa) == 1
    flushes = vm.stats.tlb_flushes
    _toggle_logging(vm, False, size=3 * G1)
    # 1G #0 and #2 can be huge: their page tables go. In 1G #1 only the 2M
    # tables that are not mixed go: the one holding G1 + M2.
    assert vm.mmu.mappings(1) == [(G1 >> 12, (G1 >> 12) + 1), ((G1 >> 12) + 4, (G1 >> 12) + 5)]
    assert vm.stats.zapped_pages[1] == 5
    assert vm.stats.tlb_flushes == flushes + 3  # one per zapped table
    assert vm.fault(7 * M2) == 3 and vm.fault(G1 + 9 * M2) == 2


def test_disabling_dirty_logging_honours_host_level_and_slot_edges(store):
    # A slot starting 2M into a 1G page: no 1G hugepage is inside it.
    vm = make_vm(store, gmem=False, size=G1, gpa=M2)
    vm.mmu.host_mapping_level = 2
    _toggle_logging(vm, True, size=G1, gpa=M2)
    assert vm.fault(M2) == 1 and vm.fault(3 * M2) == 1
    _toggle_logging(vm, False, size=G1, gpa=M2)
    assert vm.mmu.mappings(1) == []
    assert vm.stats.zapped_pages[1] == 2
    assert vm.fault(M2) == 2


def test_toggling_dirty_logging_with_nothing_mapped_only_flushes_on_enable(store):
    vm = make_vm(store, gmem=False)
    _toggle_logging(vm, True)
    _toggle_logging(vm, False)
    st = vm.stats
    assert (st.tlb_flushes, st.mmu_lock_acquisitions, st.zapped_pages[1]) == (1, 3, 0)
    # guest_memfd slots cannot log dirty pages at all: EINVAL, nothing changes.
    gvm = make_vm(store)
    with pytest.raises(OSError) as e:
        _toggle_logging(gvm, True)
    assert e.value.errno == errno.EINVAL and gvm.stats.tlb_flushes == 0


def test_pml_and_initially_set_change_what_enabling_dirty_logging_does(store):
    vm = make_vm(store, gmem=False)
    vm.mmu.pml = True
    assert vm.fault(0) == 3
    _toggle_logging(vm, True)
    # fault + split + clear dirty + write-protect
    assert vm.stats.mmu_lock_acquisitions == 4 and vm.stats.tlb_flushes == 1
    vm = make_vm(store, gmem=False)
    vm.ioctl(
        KVM_ENABLE_CAP,
        kvm_enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, (ctypes.c_uint64 * 4)(3, 0, 0, 0)),
    )
    assert vm.manual_dirty_log_protect == 3
    assert vm.fault(0) == 3
    _toggle_logging(vm, True)
    # Nothing split, protected or flushed; new faults still map 4K.
    assert vm.mmu.mappings(3) == [(0, 1 << 18)]
    assert vm.stats.mmu_lock_acquisitions == 1 and vm.stats.tlb_flushes == 0
    assert vm.fault(G1 + PAGE) == 1


# --- an independent oracle: what the pre-set pass adds to the invalidation ------------


def _straddling_hull_oracle(attrs: object, base: int, end_slot: int, s: int, e: int) -> tuple[int, int]:
    """kvm_arch_pre_set_memory_attributes() with the straddling fix, from the
    pages themselves: [s, e) widened to every head and tail hugepage (2M,
    1G) that the range only partly covers, that lies wholly inside the slot
    and whose pages all have one attribute (not mixed)."""
    import numpy as np

    a = np.asarray(attrs)
    lo, hi = s, e
    for n in (512, 512 * 512):
        for first in {s // n * n, (e - 1) // n * n}:
            whole = s <= first and first + n <= e
            inside = base <= first and first + n <= end_slot
            if not whole and inside and np.all(a[first - base : first + n - base] == a[first - base]):
                lo, hi = min(lo, first), max(hi, first + n)
    return lo, hi


_EDGES = [-1025, -513, -1, 0, 1, 511, 513]


# The tail hugepage ending exactly at the slot's end: a 1G one, and a 2M
# one inside a 1G page made mixed first (else the 1G head hides it).
@example(gpa_pages=0, size_pages=2 * 512 * 512, ops=[(-1, 1, 2)])
@example(gpa_pages=0, size_pages=2 * 512 * 512, ops=[(0, 1, 1), (-513, 2, 2)])
@settings(max_examples=300)
@given(
    gpa_pages=st.sampled_from([0, 256, 512 * 512 - 1024]),
    size_pages=st.sampled_from([2 * 512 * 512, 2 * 512 * 512 - 256, 512 * 512 + 1024]),
    ops=st.lists(
        st.tuples(st.sampled_from(_EDGES), st.integers(0, 3), st.sampled_from([1, 2, 513, 1024])),
        min_size=1,
        max_size=6,
    ),
)
def test_pre_set_invalidation_range_matches_oracle(
    gpa_pages: int, size_pages: int, ops: list[tuple[int, int, int]]
) -> None:
    """The range a conversion's pre-set pass invalidates (seen from the
    on_unmap hook) against the per-page oracle above, on slots whose ends
    are and are not hugepage aligned, with ranges at the hugepage edges."""
    import numpy as np

    vm = make_vm("rangetree", gpa=gpa_pages * PAGE, size=size_pages * PAGE)
    assert vm.mmu.invalidate_straddling_hugepages  # 6.18, the default
    base, end_slot = gpa_pages, gpa_pages + size_pages
    attrs = np.zeros(size_pages, dtype=np.uint64)
    seen: list[tuple[int, int]] = []

    @vm.on_unmap
    def record(rng: GfnRange) -> bool:
        seen.append((vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end))
        return False

    for edge, gig, npages in ops:
        s = min(max(base, gig * 512 * 512 + edge), end_slot - 1)
        e = min(s + npages, end_slot)
        value = 0 if attrs[s - base] else P  # differs at s: never the early exit
        want = _straddling_hull_oracle(attrs, base, end_slot, s, e)
        seen.clear()
        vm.set_memory_attributes(s * PAGE, (e - s) * PAGE, value)
        attrs[s - base : e - base] = value
        assert seen == [want], (s, e)
