"""Vm: KVM_SET_MEMORY_ATTRIBUTES semantics, hooks, locks, stats (Linux 6.8)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest

import memattr as m
from memattr import uapi
from memattr.gfn_range import GfnRange, clip_gfn_ranges, kvm_handle_gfn_range

P = m.KVM_MEMORY_ATTRIBUTE_PRIVATE
MiB = 1 << 20
STORES = ["rangetree", "xarray"]


def make_vm(store: str = "rangetree", slots: list[tuple[int, int]] | None = None, **kw: object) -> m.Vm:
    """A KVM_X86_SW_PROTECTED_VM with guest_memfd slots [(gpa, size)]."""
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, store, **kw)  # type: ignore[arg-type]
    for i, (gpa, size) in enumerate(slots if slots is not None else [(0, 64 * MiB)]):
        fd = vm.create_guest_memfd(size)
        vm.set_user_memory_region(i, gpa, size, 0, m.KVM_MEM_GUEST_MEMFD, fd, 0)
    return vm


def state(vm: m.Vm, end_gfn: int = 1 << 20) -> object:
    """The observable state a failing call must leave unchanged."""
    st = vm.stats.as_dict()
    st.pop("failed_calls")
    st.pop("enomem")
    st.pop("set_calls")
    return (
        list(vm.store.runs(0, end_gfn)),
        st,
        vm.mmu_invalidate_seq,
        vm.mmu_invalidate_in_progress,
        vm.mmu_lock.locked(),
        vm.slots_lock.locked(),
    )


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- validation -------------------------------------------------------------


def test_validation_order_and_errnos(store: str) -> None:
    vm = make_vm(store)
    vm.set_memory_attributes(0, 4096, P)
    before = state(vm)
    cases: list[tuple[str, Callable[[], None]]] = [
        # flags first, even when everything else is wrong too
        ("flags", lambda: vm.set_memory_attributes(1, 0, 1 << 60, flags=1)),
        ("attributes", lambda: vm.set_memory_attributes(1, 0, 1)),
        ("attributes", lambda: vm.set_memory_attributes(1, 0, P | (1 << 63))),
        ("size", lambda: vm.set_memory_attributes(0, 0, P)),
        ("wraps", lambda: vm.set_memory_attributes((1 << 64) - 4096, 4096, P)),
        ("wraps", lambda: vm.set_memory_attributes(4096, (1 << 64) - 4096, P)),
        ("aligned", lambda: vm.set_memory_attributes(0x800, 4096, P)),
        ("aligned", lambda: vm.set_memory_attributes(0, 0x1800, P)),
    ]
    for n, (word, fn) in enumerate(cases, 1):
        with pytest.raises(OSError, match=word) as info:
            fn()
        assert info.value.errno == errno.EINVAL
        assert state(vm) == before
        assert vm.stats.failed_calls == n
    assert vm.stats.set_calls == 1


def test_default_vm_supports_no_attributes() -> None:
    vm = m.Vm()
    vm.set_user_memory_region(0, 0, 16 * MiB)
    assert vm.check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    with pytest.raises(OSError) as info:
        vm.set_memory_attributes(0, 4096, P)
    assert info.value.errno == errno.EINVAL
    vm.set_memory_attributes(0, 4096, 0)  # 0 is within the (empty) mask: a no-op
    assert vm.stats.noop_conversions == 1 and vm.stats.mmu_lock_acquisitions == 0


def test_argument_errors_name_the_argument() -> None:
    vm = make_vm()
    with pytest.raises(TypeError, match="address"):
        vm.set_memory_attributes("0", 4096, P)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        vm.set_memory_attributes(0, -4096, P)
    with pytest.raises(ValueError, match="attributes"):
        vm.set_memory_attributes(0, 4096, 1 << 64)
    with pytest.raises(TypeError, match="flags"):
        vm.set_memory_attributes(0, 4096, P, flags=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gfn"):
        vm.get_memory_attributes(-1)
    with pytest.raises(ValueError, match="start_gfn"):
        vm.range_has_attributes(5, 4, P)
    with pytest.raises(ValueError, match="mask"):
        vm.range_has_attributes(0, 4, P, mask=-1)
    with pytest.raises(TypeError, match="on_unmap"):
        vm.on_unmap(42)  # type: ignore[arg-type]
    assert vm.stats.set_calls == 0 and vm.stats.failed_calls == 0


def test_constructor_errors() -> None:
    with pytest.raises(OSError) as info:
        m.Vm(6)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="store"):
        m.Vm(store="btree")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="semantics"):
        m.Vm(semantics="6.7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guest_memfd_max_order"):
        m.Vm(guest_memfd_max_order=19)
    with pytest.raises(ValueError, match="attr_memory_limit"):
        m.Vm(attr_memory_limit=-1)


def test_check_extension_answers() -> None:
    # Linux 6.8: the default and SW_PROTECTED types; guest_memfd only with
    # private memory; KVM_CAP_VM_TYPES at most 0b11.
    for vm_type, private in [(0, False), (1, True)]:
        vm = m.Vm(vm_type, semantics="6.8")
        assert vm.check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES) == (P if private else 0)
        assert vm.check_extension(m.KVM_CAP_GUEST_MEMFD) == int(private)
        assert vm.check_extension(m.KVM_CAP_USER_MEMORY2) == 1
        assert vm.check_extension(m.KVM_CAP_MEMORY_FAULT_INFO) == 1
        assert vm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS) == 32764
        assert vm.check_extension(uapi.KVM_CAP_VM_TYPES) == 0b11
        assert vm.check_extension(9999) == 0 and vm.check_extension(-1) == 0
    # Linux 6.18 on the default (AMD) host and on an Intel TDX host: the
    # host's types only; guest_memfd on every type.
    tdx = m.HostProfile.named("intel-tdx")
    for vm_type, private, host in [(0, False, None), (1, True, None), (2, False, None), (3, False, None),
                                   (4, True, None), (5, True, tdx)]:
        vm = m.Vm(vm_type, host=host)
        assert vm.check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES) == (P if private else 0)
        assert vm.check_extension(m.KVM_CAP_GUEST_MEMFD) == 1
        assert vm.check_extension(uapi.KVM_CAP_VM_TYPES) == (0b100011 if host else 0b11111)
        assert vm.check_extension(9999) == 0 and vm.check_extension(-1) == 0
    assert m.Vm(1, semantics="v11").check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES) == 1


# --- the set path -------------------------------------------------------------


def test_set_get_and_range_has_attributes(store: str) -> None:
    vm = make_vm(store)
    vm.set_memory_attributes(0x10000, 0x4000, P)
    assert [vm.get_memory_attributes(g) for g in range(0xF, 0x15)] == [0, P, P, P, P, 0]
    assert vm.range_has_attributes(0x10, 0x14, P)
    assert not vm.range_has_attributes(0x10, 0x15, P)
    assert vm.range_has_attributes(0x10, 0x15, 0, mask=~P & (2**64 - 1))
    assert vm.range_has_attributes(7, 7, P)  # empty range
    assert vm.stats.conversions == 1 and vm.stats.pages_converted == 4
    vm.set_memory_attributes(0x10000, 0x4000, 0)
    assert vm.get_memory_attributes(0x10) == 0 and len(vm.store) == 0


def test_early_exit_takes_no_lock_and_calls_nothing(store: str) -> None:
    vm = make_vm(store)
    calls: list[GfnRange] = []
    vm.on_unmap(calls.append)
    vm.on_post_set(calls.append)
    vm.set_memory_attributes(0, 8 * MiB, 0)  # already shared
    vm.set_memory_attributes(0, 8 * MiB, P)
    seq, locks = vm.mmu_invalidate_seq, vm.stats.mmu_lock_acquisitions
    calls.clear()
    vm.set_memory_attributes(4 * MiB, 4 * MiB, P)  # already private
    assert calls == [] and vm.mmu_invalidate_seq == seq
    assert vm.stats.mmu_lock_acquisitions == locks
    assert vm.stats.noop_conversions == 2 and vm.stats.conversions == 1
    assert vm.stats.set_calls == 3


def test_range_outside_every_slot_is_stored_without_callbacks(store: str) -> None:
    vm = make_vm(store, slots=[(0, 16 * MiB)])
    calls: list[GfnRange] = []
    vm.on_unmap(calls.append)
    vm.on_post_set(calls.append)
    vm.set_memory_attributes(1 << 40, 2 * MiB, P)
    assert vm.get_memory_attributes((1 << 40) >> 12) == P
    assert calls == [] and vm.mmu_invalidate_seq == 0
    assert vm.stats.mmu_lock_acquisitions == 0 and vm.stats.pre_set_ranges == 0
    assert vm.stats.conversions == 1


def test_hooks_are_clipped_and_ordered_across_slots(store: str) -> None:
    # Slots at gfn [0, 0x200), [0x400, 0x600), [0x600, 0x800): a hole between.
    vm = make_vm(store, slots=[(0, 2 * MiB), (4 * MiB, 2 * MiB), (6 * MiB, 2 * MiB)])
    log: list[tuple[object, ...]] = []

    def snap(kind: str, r: GfnRange) -> tuple[object, ...]:
        return (
            kind,
            r.slot.id,
            r.start,
            r.end,
            r.attributes,
            r.may_block,
            vm.mmu_invalidate_in_progress,
            # The range is in the invalidation (the MMU may widen it to the
            # hugepages that straddle it).
            vm.mmu_invalidate_range_start <= r.start and r.end <= vm.mmu_invalidate_range_end,
            vm.get_memory_attributes(r.start),
            vm.mmu_lock.held_by_current_thread(),
            vm.slots_lock.held_by_current_thread(),
        )

    @vm.on_unmap
    def unmap_a(r: GfnRange) -> bool:
        log.append(snap("unmap_a", r))
        return False

    @vm.on_unmap
    def unmap_b(r: GfnRange) -> bool:
        log.append(snap("unmap_b", r))
        return False

    @vm.on_post_set
    def post(r: GfnRange) -> None:
        log.append(snap("post", r))

    assert unmap_a.__name__ == "unmap_a"  # decorators return the function
    vm.set_memory_attributes(0x100 << 12, (0x700 - 0x100) << 12, P)
    assert log == [
        ("unmap_a", 0, 0x100, 0x200, P, True, 1, True, 0, True, True),
        ("unmap_b", 0, 0x100, 0x200, P, True, 1, True, 0, True, True),
        ("unmap_a", 1, 0x400, 0x600, P, True, 1, True, 0, True, True),
        ("unmap_b", 1, 0x400, 0x600, P, True, 1, True, 0, True, True),
        ("unmap_a", 2, 0x600, 0x700, P, True, 1, True, 0, True, True),
        ("unmap_b", 2, 0x600, 0x700, P, True, 1, True, 0, True, True),
        # post-set: invalidation ended under the lock, before the handlers
        ("post", 0, 0x100, 0x200, P, True, 0, True, P, True, True),
        ("post", 1, 0x400, 0x600, P, True, 0, True, P, True, True),
        ("post", 2, 0x600, 0x700, P, True, 0, True, P, True, True),
    ]
    assert vm.mmu_invalidate_range_start <= 0x100 and vm.mmu_invalidate_range_end >= 0x700
    assert vm.mmu_invalidate_seq == 1 and vm.mmu_invalidate_in_progress == 0
    assert vm.stats.pre_set_ranges == 3 and vm.stats.post_set_ranges == 3
    assert vm.stats.mmu_lock_acquisitions == 2  # once per pass, not per slot
    assert vm.stats.tlb_flushes == 0  # nothing mapped, no hook asked
    assert vm.get_memory_attributes(0x300) == P  # the hole is stored too
    vm.remove_hook(unmap_b)
    log.clear()
    vm.set_memory_attributes(0, 4096, P)
    assert [e[0] for e in log] == ["unmap_a", "post"]
    with pytest.raises(ValueError):
        vm.remove_hook(unmap_b)


def test_tlb_flush_once_if_any_handler_asks(store: str) -> None:
    vm = make_vm(store, slots=[(0, 2 * MiB), (4 * MiB, 2 * MiB)])
    answers = iter([False, True, False, False])
    vm.on_unmap(lambda r: next(answers))
    vm.set_memory_attributes(0, 8 * MiB, P)
    assert vm.stats.tlb_flushes == 1
    vm.set_memory_attributes(0, 8 * MiB, 0)
    assert vm.stats.tlb_flushes == 1
    # A mapped page makes the MMU's zap ask for the flush by itself.
    vm.on_unmap(lambda r: False)
    assert vm.fault(0x1000) >= 1
    answers = iter([False] * 4)
    vm.set_memory_attributes(0, 4096, P)
    assert vm.stats.tlb_flushes == 2


def test_enomem_from_the_attribute_budget_changes_nothing(store: str) -> None:
    vm = make_vm(store, slots=[(0, 64 * MiB)])
    vm.set_memory_attributes(0, 4096, P)
    vm.attr_memory_limit = vm.store.memory_bytes()
    calls: list[GfnRange] = []
    vm.on_unmap(calls.append)
    before = state(vm)
    with pytest.raises(OSError) as info:
        vm.set_memory_attributes(48 * MiB, 4096, P)  # a new run / node far away
    assert info.value.errno == errno.ENOMEM
    assert state(vm) == before and calls == []
    assert vm.store.memory_bytes() <= vm.attr_memory_limit
    assert (vm.stats.enomem, vm.stats.failed_calls) == (1, 1)
    # Raising the budget makes the same call work.
    vm.attr_memory_limit = None
    vm.set_memory_attributes(48 * MiB, 4096, P)
    assert vm.get_memory_attributes((48 * MiB) >> 12) == P


def test_whole_ram_conversion_of_a_1tib_guest() -> None:
    tib = 1 << 40
    vm = make_vm("rangetree", slots=[(0, tib)])
    vm.set_memory_attributes(0, tib, P)
    assert vm.range_has_attributes(0, tib >> 12, P)
    assert vm.stats.pages_converted == tib >> 12
    assert not vm.hugepage_mixed(0, 12345, 3)
    vm.set_memory_attributes(tib // 2, 4096, 0)
    assert vm.hugepage_mixed(0, (tib // 2) >> 12, 3)
    assert vm.max_mapping_level((tib // 2) >> 12) == 1


# --- hooks that raise ---------------------------------------------------------


class Boom(Exception):
    pass


def test_unmap_hook_raising_aborts_the_conversion(store: str) -> None:
    vm = make_vm(store, slots=[(0, 2 * MiB), (4 * MiB, 2 * MiB)])
    seen: list[int] = []

    @vm.on_unmap
    def first(r: GfnRange) -> bool:
        seen.append(r.slot.id)
        if r.slot.id == 0:
            raise Boom("unmap")
        return False

    vm.on_unmap(lambda r: seen.append(100 + r.slot.id))
    with pytest.raises(Boom):
        vm.set_memory_attributes(0, 8 * MiB, P)
    assert seen == [0]  # later hooks and ranges skipped
    assert vm.get_memory_attributes(0) == 0 and len(vm.store) == 0  # nothing stored
    assert vm.mmu_invalidate_in_progress == 0 and vm.mmu_invalidate_seq == 1
    assert not vm.mmu_lock.locked() and not vm.slots_lock.locked()
    assert vm.stats.failed_calls == 1 and vm.stats.conversions == 0
    assert vm.stats.pre_set_ranges == 2  # the MMU zapped every range
    vm.remove_hook(first)
    vm.set_memory_attributes(0, 8 * MiB, P)  # the Vm is fully usable
    assert vm.range_has_attributes(0, 0x200, P)


def test_post_set_hook_raising_keeps_the_conversion(store: str) -> None:
    vm = make_vm(store, slots=[(0, 2 * MiB), (4 * MiB, 2 * MiB)])

    @vm.on_post_set
    def boom(r: GfnRange) -> None:
        raise Boom("post")

    with pytest.raises(Boom):
        vm.set_memory_attributes(0, 8 * MiB, P)
    assert vm.range_has_attributes(0, 0x800, P)  # stored
    assert vm.stats.post_set_ranges == 2  # MMU post-set ran for every range
    assert not vm.hugepage_mixed(1, 0x400, 2)  # and its mixed flags are right
    assert vm.mmu_invalidate_in_progress == 0 and vm.mmu_invalidate_seq == 1
    assert not vm.mmu_lock.locked() and not vm.slots_lock.locked()
    assert vm.stats.failed_calls == 1 and vm.stats.conversions == 1


def test_keyboard_interrupt_in_a_hook_still_balances() -> None:
    vm = make_vm()
    vm.on_unmap(lambda r: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        vm.set_memory_attributes(0, 4096, P)
    assert vm.mmu_invalidate_in_progress == 0 and not vm.slots_lock.locked()


# --- lock discipline ------------------------------------------------------------


def test_recursive_set_from_a_hook_is_a_lockdep_error() -> None:
    vm = make_vm()

    @vm.on_post_set
    def reenter(r: GfnRange) -> None:
        vm.set_memory_attributes(1 << 30, 4096, P)

    with pytest.raises(m.LockdepError, match="recursive locking") as info:
        vm.set_memory_attributes(0, 4096, P)
    assert info.value.lock == "slots_lock" and "test_vm.py" in info.value.call_site
    assert vm.get_memory_attributes(0) == P and vm.get_memory_attributes(1 << 18) == 0
    assert not vm.slots_lock.locked() and vm.mmu_invalidate_in_progress == 0


def test_fault_from_a_hook_is_a_lockdep_error() -> None:
    vm = make_vm()
    vm.on_unmap(lambda r: vm.fault(0))
    with pytest.raises(m.LockdepError):
        vm.set_memory_attributes(0, 4096, P)
    assert not vm.mmu_lock.locked() and vm.mmu_invalidate_in_progress == 0


def test_invalidation_counters_need_mmu_lock() -> None:
    vm = make_vm()
    for fn in (vm.kvm_mmu_invalidate_begin, vm.kvm_mmu_invalidate_end):
        with pytest.raises(m.LockdepError, match="mmu_lock") as info:
            fn()
        assert info.value.lock == "mmu_lock" and "test_vm.py" in info.value.call_site
    with pytest.raises(m.LockdepError):
        vm.kvm_mmu_invalidate_range_add(0, 1)
    assert (vm.mmu_invalidate_seq, vm.mmu_invalidate_in_progress) == (0, 0)
    assert vm.mmu_invalidate_range_start == uapi.INVALID_GPA
    with vm.mmu_lock:
        vm.kvm_mmu_invalidate_begin()
        vm.kvm_mmu_invalidate_range_add(5, 9)
        vm.kvm_mmu_invalidate_range_add(2, 3)
        assert (vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end) == (2, 9)
        vm.kvm_mmu_invalidate_end()
        with pytest.raises(m.KvmBugError):
            vm.kvm_mmu_invalidate_end()  # unbalanced
    assert (vm.mmu_invalidate_seq, vm.mmu_invalidate_in_progress) == (1, 0)


def test_lock_order_and_unlock_balance() -> None:
    vm = make_vm()
    with vm.mmu_lock:
        with pytest.raises(m.LockdepError, match="circular"):
            vm.slots_lock.acquire()
    assert not vm.slots_lock.locked()
    with pytest.raises(m.LockdepError, match="bad unlock balance"):
        vm.mmu_lock.release()
    with vm.slots_lock, vm.mmu_lock:
        vm.mmu_lock.assert_held()
        vm.slots_lock.assert_held()
    with pytest.raises(m.LockdepError, match="held by: nobody"):
        vm.slots_lock.assert_held()
    # lockdep=False skips "must be held" checks, but never allows a deadlock.
    quiet = make_vm(lockdep=False)
    quiet.mmu_lock.assert_held()
    with quiet.mmu_lock, pytest.raises(m.LockdepError):
        quiet.mmu_lock.acquire()


def test_v11_mode_invalidate_end_after_unlock_is_caught() -> None:
    vm = make_vm(semantics="v11")
    in_post: list[int] = []
    vm.on_post_set(lambda r: in_post.append(vm.mmu_invalidate_in_progress))
    with pytest.raises(m.LockdepError) as info:
        vm.set_memory_attributes(0, 4096, P)
    err = info.value
    assert err.lock == "mmu_lock" and "kvm_mmu_invalidate_end" in err.rule
    assert "held by: nobody" in str(err)
    # v11 runs the post-set handlers with the invalidation still in progress.
    assert in_post == [1]
    # The attributes were stored; the Vm then closed the invalidation itself.
    assert vm.get_memory_attributes(0) == P
    assert vm.mmu_invalidate_in_progress == 0 and vm.mmu_invalidate_seq == 1
    assert not vm.mmu_lock.locked() and not vm.slots_lock.locked()
    assert vm.stats.failed_calls == 1
    # The merged kernel's order passes the same checker.
    ok = make_vm(semantics="6.8")
    ok.set_memory_attributes(0, 4096, P)
    # Without lockdep the v11 race goes unnoticed, as in a production kernel.
    quiet = make_vm(semantics="v11", lockdep=False)
    quiet.set_memory_attributes(0, 4096, P)
    assert quiet.mmu_invalidate_in_progress == 0 and quiet.mmu_invalidate_seq == 1


def test_threads_are_serialised_and_state_stays_consistent(store: str) -> None:
    vm = make_vm(store, slots=[(0, 8 * MiB), (16 * MiB, 8 * MiB)])
    order: list[tuple[int, int, int]] = []
    problems: list[str] = []

    @vm.on_unmap
    def check(r: GfnRange) -> bool:
        if not (vm.slots_lock.held_by_current_thread() and vm.mmu_lock.held_by_current_thread()):
            problems.append("locks not held in hook")
        if vm.mmu_invalidate_in_progress != 1:
            problems.append(f"in_progress {vm.mmu_invalidate_in_progress}")
        return False

    @vm.on_post_set
    def record(r: GfnRange) -> None:
        if vm.mmu_invalidate_in_progress != 0:
            problems.append("post-set with invalidation in progress")
        if not order or order[-1] != (r.start, r.end, r.attributes):
            order.append((r.start, r.end, r.attributes))

    def worker(seed: int) -> None:
        import random

        rnd = random.Random(seed)
        for _ in range(150):
            start = rnd.randrange(0, 0x1800)
            n = rnd.randrange(1, 0x300)
            vm.set_memory_attributes(start << 12, n << 12, rnd.choice([0, P]))
            if rnd.random() < 0.2:
                try:
                    vm.fault(rnd.randrange(0, 0x800) << 12, private=bool(rnd.getrandbits(1)))
                except m.MemoryFault:
                    pass

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert vm.mmu_invalidate_in_progress == 0 and not vm.slots_lock.locked()
    assert vm.stats.set_calls == 600
    assert vm.stats.conversions + vm.stats.noop_conversions == 600
    assert vm.stats.pre_set_ranges == vm.stats.post_set_ranges
    # The serial order the post-set hook saw explains the final state, for
    # the gfns inside slots (the hook only sees slot-clipped ranges).
    replay = m.RangeTree()
    for s, e, a in order:
        replay.set_range(s, e, a)
    for lo, hi in [(0, 0x800), (0x1000, 0x1800)]:
        assert list(vm.store.runs(lo, hi)) == list(replay.runs(lo, hi))


def test_gfn_range_walk_covers_every_address_space() -> None:
    vm = m.Vm()  # default VM: two address spaces (SMM)
    vm.set_user_memory_region(0, 0, 2 * MiB)
    vm.set_user_memory_region(1, 4 * MiB, 2 * MiB)
    vm.set_user_memory_region(1 << 16, 0, 8 * MiB)
    with vm.slots_lock:
        ranges = clip_gfn_ranges(vm._kvm, vm.memslots, 0x100, 0x500, 7)
        assert [(r.slot.as_id, r.slot.id, r.start, r.end) for r in ranges] == [
            (0, 0, 0x100, 0x200),
            (0, 1, 0x400, 0x500),
            (1, 0, 0x100, 0x500),
        ]
        seen: list[bool] = []
        ret = kvm_handle_gfn_range(
            vm,
            ranges,
            lambda r: seen.append(vm.mmu_lock.held_by_current_thread()) or r.slot.as_id == 1,
            on_lock=lambda: seen.append(True),
            flush_on_ret=True,
        )
        assert ret and seen == [True] * 4 and vm.stats.tlb_flushes == 1
        assert vm.stats.mmu_lock_acquisitions == 1
        assert kvm_handle_gfn_range(vm, [], lambda r: True, flush_on_ret=True) is False
        assert vm.stats.mmu_lock_acquisitions == 1  # no slot, no lock
    with pytest.raises(AttributeError):
        ranges[0].start = 5  # type: ignore[misc]
    assert ranges[0] == GfnRange(ranges[0].slot, 0x100, 0x200, 7, True)
    assert ranges[0].npages == 0x100


# --- the set's one entry: whole in the core, or the Python driver ---------------


def test_set_entry_runs_whole_natively_or_through_the_driver() -> None:
    """The bound entry runs the ioctl whole in the core when it may, and the
    step-by-step driver otherwise (a hook, a lock this thread holds), with
    the same result and counters either way."""
    whole, driven = make_vm(), make_vm()
    seen: list[GfnRange] = []
    driven.on_unmap(lambda rng: seen.append(rng) or False)
    for vm in (whole, driven):
        vm.set_memory_attributes(0x200000, 0x3000, P)
        vm.set_memory_attributes(0x201000, 0x1000, 0)
    assert len(seen) == 2, "the hooked VM went through the driver"
    for gfn in range(0x1FF, 0x205):
        assert whole.get_memory_attributes(gfn) == driven.get_memory_attributes(gfn)
    assert whole.stats.mmu_lock_acquisitions == driven.stats.mmu_lock_acquisitions
    # A lock this thread holds: the core declines, the driver runs (and its
    # lock checker sees the recursion the kernel would deadlock on).
    with whole.slots_lock:
        with pytest.raises(RuntimeError):
            whole.set_memory_attributes(0x200000, 0x1000, 0)
    assert whole.get_memory_attributes(0x200) == P


def test_set_entry_keeps_a_subclass_override_and_frees_the_vm() -> None:
    import gc
    import weakref

    calls: list[tuple[int, int, int]] = []

    class Logged(m.Vm):
        def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
            calls.append((address, size, attributes))
            super().set_memory_attributes(address, size, attributes, flags)

    vm = Logged(uapi.KVM_X86_SW_PROTECTED_VM, "rangetree")
    vm.set_memory_attributes(0, 4096, P)
    assert calls == [(0, 4096, P)]
    assert vm.get_memory_attributes(0) == P
    # The core holds its driver weakly (a strong reference from Rust would be
    # a cycle the garbage collector cannot see): the Vm is still freed.
    plain = make_vm()
    ref = weakref.ref(plain)
    del plain
    gc.collect()
    assert ref() is None


def test_set_entry_arguments_follow_the_one_integer_rule() -> None:
    vm = make_vm()
    for bad, exc in ((None, TypeError), (True, TypeError), (-1, ValueError), (1 << 64, ValueError)):
        with pytest.raises(exc, match="flags"):
            vm.set_memory_attributes(0, 4096, P, bad)  # type: ignore[arg-type]
        with pytest.raises(exc, match="flags"):
            vm.set_memory_attributes(0, 4096, P, flags=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        vm.set_memory_attributes(0, 4096)  # type: ignore[call-arg]
    assert vm.get_memory_attributes(0) == 0 and vm.stats.mmu_lock_acquisitions == 0
    # Keywords work as the documented signature names them.
    vm.set_memory_attributes(address=0, size=4096, attributes=P, flags=0)
    assert vm.get_memory_attributes(0) == P


def test_fault_entry_arguments_driver_and_override() -> None:
    """Vm.fault is the core's entry too: the same argument rules, the MMU's
    retry loop when the fault cannot finish natively, and a subclass's
    override kept."""
    vm = make_vm()
    for kw, exc in (({"gpa": None}, TypeError), ({"gpa": -1}, ValueError), ({"gpa": True}, TypeError)):
        with pytest.raises(exc, match="gpa"):
            vm.fault(**kw)  # type: ignore[arg-type]
    for name in ("private", "write"):
        for bad in (None, 1, "yes"):
            with pytest.raises(TypeError, match=name):
                vm.fault(0, **{name: bad})  # type: ignore[arg-type]
    # Shared memory, uniform over the 2M hugepage [0, 2M) wholly inside the
    # 64 MiB slot (gpa and hva congruent), no 1G hugepage in the slot: 2M.
    assert vm.fault(0x1000, write=True) == m.PG_LEVEL_2M
    # A lock this thread holds: the core declines, the retry loop refuses.
    with vm.mmu_lock:
        with pytest.raises(m.LockdepError, match="mmu_lock"):
            vm.fault(0x1000)

    seen: list[int] = []

    class Traced(m.Vm):
        def fault(self, gpa: int, private: bool = False, write: bool = False) -> int:
            seen.append(gpa)
            return super().fault(gpa, private, write)

    t = Traced(uapi.KVM_X86_SW_PROTECTED_VM, "rangetree")
    fd = t.create_guest_memfd(1 << 21)
    t.set_user_memory_region(0, 0, 1 << 21, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
    # The slot is exactly one 2M hugepage, uniform shared: 2M.
    assert t.fault(0x2000) == m.PG_LEVEL_2M and seen == [0x2000]


def test_entries_without_a_live_driver_raise_instead_of_guessing() -> None:
    """The core never runs a step-by-step operation itself: with no driver,
    or a driver whose object is gone, the entry raises and changes nothing."""
    import gc
    import weakref

    vm = make_vm()
    kvm = vm._kvm

    class Gone:
        def drive(self, *args: object) -> None:
            raise AssertionError("unreachable")

    g = Gone()
    kvm.set_set_driver(weakref.WeakMethod(g.drive))
    kvm.set_fault_driver(weakref.WeakMethod(g.drive))
    del g
    gc.collect()
    kvm.set_native_set(False)  # as a hook would: the set must be driven
    with pytest.raises(RuntimeError, match="gone"):
        vm.set_memory_attributes(0, 4096, P)
    assert vm.get_memory_attributes(0) == 0 and vm.stats.mmu_lock_acquisitions == 0
    with vm.mmu_lock:  # the fault must be driven (the core declines)
        with pytest.raises(RuntimeError, match="gone"):
            vm.fault(0x1000)
