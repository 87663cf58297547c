"""The two drivers of the core: whole native operations step aside when the
calling thread holds one of the VM's locks (and the Python driver reports it
as lockdep would), the core's argument errors, and the one integer rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import memattr as m
import memattr.trace as tr
from memattr.batch import run_batch
from memattr.errors import KvmBugError, LockdepError
from memattr.gfn_range import clip_gfn_ranges

MiB = 1 << 20
GMEM = m.KVM_MEM_GUEST_MEMFD


def make_vm() -> tuple[m.Vm, int]:
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, guest_memfd_max_order=9)
    fd = vm.create_guest_memfd(8 * MiB)
    vm.set_user_memory_region(0, 0, 4 * MiB, 0, GMEM, fd, 0)
    return vm, fd


def calls(vm: m.Vm, fd: int) -> dict[str, object]:
    ops = tr.set_ops(0, 4096, m.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    cols = [np.ascontiguousarray(ops[f]) for f in ("kind", "gpa", "size", "attributes", "arg", "flags")]
    return {
        "set_memory_attributes": lambda: vm.set_memory_attributes(0, 4096, m.KVM_MEMORY_ATTRIBUTE_PRIVATE),
        "set_user_memory_region": lambda: vm.set_user_memory_region(1, 16 * MiB, 2 * MiB),
        "guest_memfd_fallocate": lambda: vm.guest_memfd_fallocate(fd, 3, 0, 4096),
        "guest_memfd_close": lambda: vm.guest_memfd_close(fd),
        "fault": lambda: vm.fault(0),
        "run_batch": lambda: run_batch(vm, *cols, np.zeros(len(ops), dtype=np.int64)),
    }


@pytest.mark.parametrize("lock", ["slots_lock", "mmu_lock"])
@pytest.mark.parametrize(
    "call",
    ["set_memory_attributes", "set_user_memory_region", "guest_memfd_fallocate", "guest_memfd_close", "fault", "run_batch"],
)
def test_native_operations_refuse_a_held_lock_and_change_nothing(lock: str, call: str) -> None:
    vm, fd = make_vm()
    before = (vm.stats.as_dict(), vm.guest_memfds(), [(s.slot, s.base_gfn) for s in vm.memslots])
    held = getattr(vm, lock)
    with held:
        with pytest.raises(LockdepError):
            calls(vm, fd)[call]()
        assert held.held_by_current_thread()
    assert not vm.slots_lock.locked() and not vm.mmu_lock.locked()
    after = (vm.stats.as_dict(), vm.guest_memfds(), [(s.slot, s.base_gfn) for s in vm.memslots])
    # The set's own failed call is counted; nothing else moved (the lock
    # acquisitions of the test itself aside).
    for st in (before[0], after[0]):
        st.pop("failed_calls")
        st.pop("set_calls")
        st.pop("mmu_lock_acquisitions")
    assert after == before
    # Every call works once the lock is free.
    calls(vm, fd)[call]()


def test_core_argument_errors_name_the_argument() -> None:
    vm, _ = make_vm()
    with pytest.raises(ValueError, match="guest_memfd_max_order must be <= 18"):
        m.Vm(m.KVM_X86_SW_PROTECTED_VM, guest_memfd_max_order=19)
    with pytest.raises(ValueError, match="semantics must be"):
        m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="6.9")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="as_id must be in 0..0, got 1"):
        vm.mmu.fault(0, as_id=1)
    with pytest.raises(ValueError, match="level must be 2"):
        vm.hugepage_mixed(0, 0, 1)
    with pytest.raises(ValueError, match="slot 0x5 does not exist"):
        vm.hugepage_mixed(5, 0, 2)
    with pytest.raises(ValueError, match="outside slot"):
        vm.hugepage_mixed(0, 1 << 20, 2)
    with pytest.raises(ValueError, match="level must be 1, 2 or 3"):
        vm.mmu.mappings(4)
    with pytest.raises(ValueError, match="not in any memslot"):
        vm.max_mapping_level(1 << 20)
    with pytest.raises(OSError) as info:
        m.Vm(6)  # KVM_CREATE_VM: an unknown type
    assert info.value.errno == 22


def test_one_integer_rule_on_both_paths() -> None:
    """numpy integers are ints; bool and numpy.bool_ are not, whether the
    call runs natively or through the Python driver (a hook forces it)."""
    for hooked in (False, True):
        vm, _ = make_vm()
        if hooked:
            vm.on_post_set(lambda rng: None)
        vm.set_memory_attributes(np.uint64(0), np.int64(4096), np.uint8(8))
        assert vm.get_memory_attributes(0) == 8
        for bad in (True, np.True_):
            with pytest.raises(TypeError, match="address must be an int, not bool"):
                vm.set_memory_attributes(bad, 4096, 8)
        with pytest.raises(ValueError, match="size must be a u64"):
            vm.set_memory_attributes(0, -4096, 8)
    with pytest.raises(TypeError, match="gfn must be an int, not bool"):
        vm.max_mapping_level(True)


def test_a_stale_gfn_range_is_a_kvm_bug() -> None:
    """A memslot-clipped range names its slot by identity: used after the
    slot changed, the core refuses it instead of touching another slot."""
    vm, _ = make_vm()
    (rng,) = clip_gfn_ranges(vm._kvm, vm.memslots, 0, 1, 0)
    vm.set_user_memory_region(0, 0, 0)
    vm.set_user_memory_region(0, 0, 4 * MiB)  # same id, a new slot
    with vm.slots_lock, vm.mmu_lock:
        vm.kvm_mmu_invalidate_begin()
        with pytest.raises(KvmBugError, match="names a memslot that changed"):
            vm.mmu.pre_set_memory_attributes(rng)
        vm.kvm_mmu_invalidate_end()
    assert vm.mmu_invalidate_in_progress == 0


_EVERY_BINDING = [
    ("Vm.get_memory_attributes", lambda a: m.Vm().get_memory_attributes(a), "gfn"),
    ("RangeTree.get", lambda a: m.RangeTree().get(a), "gfn"),
    ("XArray.get", lambda a: m.XArray().get(a), "gfn"),
    ("MapleTree.get", lambda a: m.MapleTree().get(a), "gfn"),
    ("LpageInfoTracker", lambda a: m.LpageInfoTracker(a, 512), "base_gfn"),
    ("RangeHugepageTracker", lambda a: m.RangeHugepageTracker(a, 512), "base_gfn"),
    ("TdpPageTable.mapped_level", lambda a: m.TdpPageTable().mapped_level(a), "gfn"),
]


@pytest.mark.parametrize(("name", "call", "arg"), _EVERY_BINDING, ids=[b[0] for b in _EVERY_BINDING])
def test_one_integer_rule_on_every_binding(name: str, call: Any, arg: str) -> None:
    """One validator for the whole binding layer (rust/py/args.rs): numpy
    integers are ints; bool and numpy.bool_ are TypeError; a value outside
    u64 is ValueError; every message names the argument. (The stores and
    the trackers each had their own once: RangeTree().get(True) answered.)"""
    call(np.uint64(0))
    for bad in (True, np.True_):
        with pytest.raises(TypeError, match=f"{arg} must be an int, not bool"):
            call(bad)
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match=f"{arg} must be a u64"):
            call(bad)
    with pytest.raises(TypeError, match=f"{arg} must be an int, not float"):
        call(1.0)
