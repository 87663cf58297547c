"""The kernel's KVM selftests that touch this API, re-created against the model.

- tools/testing/selftests/kvm/set_memory_region_test.c: the guest_memfd
  cases (test_add_private_memory_region,
  test_add_overlapping_private_memory_regions), the flag checks
  (test_invalid_memory_region_flags) and test_add_max_memory_regions.
- guest_memfd_test.c: test_create_guest_memfd_invalid / _multiple.
- x86_64/private_mem_conversions_test.c: explicit conversions of the
  stages' (offset, size) ranges, implicit conversions driven by
  KVM_EXIT_MEMORY_FAULT, several memslots and vCPUs.
- x86_64/private_mem_kvm_exits_test.c: private accesses to a deleted
  memslot and to a memslot without guest_memfd exit with
  KVM_EXIT_MEMORY_FAULT.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest

import memattr as m
from memattr import uapi

P = m.KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM = m.KVM_MEM_GUEST_MEMFD
MEM_REGION_GPA = 0xC0000000
MEM_REGION_SIZE = 0x200000
MEM_REGION_SLOT = 10
SZ_2M = 0x200000
PAGE_SIZE = m.PAGE_SIZE


def protected_vm(store: str = "rangetree") -> m.Vm:
    """vm_create_barebones_protected_vm()."""
    return m.Vm(m.KVM_X86_SW_PROTECTED_VM, store)  # type: ignore[arg-type]


def set_region2_errno(vm: m.Vm, *args: int) -> int:
    """__vm_set_user_memory_region2(): 0 or the errno."""
    try:
        vm.set_user_memory_region(*args)
    except OSError as e:
        return int(e.errno or 0)
    return 0


# --- set_memory_region_test ---------------------------------------------------


def test_add_private_memory_region() -> None:
    vm = protected_vm()

    def invalid_guest_memfd(fd: int, offset: int) -> None:
        r = set_region2_errno(
            vm, MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, 0, GMEM, fd, offset
        )
        assert r == errno.EINVAL, (fd, offset)

    # "KVM fd should fail", "VM's fd should fail": real fds, not guest_memfd.
    dev = os.open(os.devnull, os.O_RDONLY)
    regular = os.memfd_create("regular", 0)
    try:
        invalid_guest_memfd(dev, 0)
        invalid_guest_memfd(regular, 0)  # "Regular memfd() should fail"
    finally:
        os.close(dev)
        os.close(regular)

    vm2 = protected_vm()
    memfd = vm2.create_guest_memfd(MEM_REGION_SIZE)
    invalid_guest_memfd(memfd, 0)  # "Other VM's guest_memfd() should fail"
    vm2.set_user_memory_region(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, 0, GMEM, memfd, 0)

    memfd = vm.create_guest_memfd(MEM_REGION_SIZE)
    for offset in range(1, PAGE_SIZE):
        invalid_guest_memfd(memfd, offset)  # "Unaligned offset should fail"
    vm.set_user_memory_region(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, 0, GMEM, memfd, 0)
    assert vm.memslots.get(0, MEM_REGION_SLOT).guest_memfd == memfd


def test_add_overlapping_private_memory_regions() -> None:
    vm = protected_vm()
    memfd = vm.create_guest_memfd(MEM_REGION_SIZE * 4)
    vm.set_user_memory_region(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE * 2, 0, GMEM, memfd, 0)
    vm.set_user_memory_region(
        MEM_REGION_SLOT + 1, MEM_REGION_GPA * 2, MEM_REGION_SIZE * 2, 0, GMEM, memfd, MEM_REGION_SIZE * 2
    )
    # Delete the first memslot, then try to recreate it overlapping the other.
    vm.set_user_memory_region(MEM_REGION_SLOT, MEM_REGION_GPA, 0, 0, GMEM, -1, 0)
    r = set_region2_errno(
        vm, MEM_REGION_SLOT, MEM_REGION_GPA * 2 - MEM_REGION_SIZE, MEM_REGION_SIZE * 2, 0, GMEM, memfd, 0
    )
    assert r == errno.EEXIST  # "Overlapping guest_memfd() bindings should fail with EEXIST"
    r = set_region2_errno(
        vm, MEM_REGION_SLOT, MEM_REGION_GPA * 2 + MEM_REGION_SIZE, MEM_REGION_SIZE * 2, 0, GMEM, memfd, 0
    )
    assert r == errno.EEXIST
    assert len(vm.memslots) == 1


@pytest.mark.parametrize("vm_type", [m.KVM_X86_DEFAULT_VM, m.KVM_X86_SW_PROTECTED_VM])
def test_invalid_memory_region_flags(vm_type: int) -> None:
    vm = m.Vm(vm_type)
    supported = uapi.KVM_MEM_LOG_DIRTY_PAGES | uapi.KVM_MEM_READONLY
    v2_only = GMEM
    if vm.check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES) & P:
        supported |= GMEM
    for i in range(32):
        bit = 1 << i
        if supported & bit and not v2_only & bit:
            continue
        # KVM_SET_USER_MEMORY_REGION (v1) through the ioctl front end.
        v1 = m.kvm_userspace_memory_region(0, bit, MEM_REGION_GPA, MEM_REGION_SIZE, 0)
        with pytest.raises(OSError) as info:
            vm.ioctl(m.KVM_SET_USER_MEMORY_REGION, v1)
        assert info.value.errno == errno.EINVAL, hex(bit)
        if supported & bit:
            continue
        assert set_region2_errno(vm, 0, MEM_REGION_GPA, MEM_REGION_SIZE, 0, bit, 0, 0) == errno.EINVAL
    if supported & GMEM:
        r = set_region2_errno(
            vm, 0, MEM_REGION_GPA, MEM_REGION_SIZE, 0, uapi.KVM_MEM_LOG_DIRTY_PAGES | GMEM, 0, 0
        )
        assert r == errno.EINVAL  # dirty logging private memory is unsupported
    assert len(vm.memslots) == 0


def test_add_max_memory_regions() -> None:
    vm = m.Vm()
    max_mem_slots = vm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS)
    assert max_mem_slots == 32764
    for slot in range(max_mem_slots):
        vm.set_user_memory_region(slot, MEM_REGION_GPA + slot * MEM_REGION_SIZE, MEM_REGION_SIZE)
    # Check it cannot be added memory slots beyond the limit.
    r = set_region2_errno(vm, max_mem_slots, MEM_REGION_GPA + max_mem_slots * MEM_REGION_SIZE, MEM_REGION_SIZE)
    assert r == errno.EINVAL
    assert len(vm.memslots) == max_mem_slots
    # Lookups stay exact with every slot in place.
    for slot in (0, 1, 12345, max_mem_slots - 1):
        gfn = (MEM_REGION_GPA + slot * MEM_REGION_SIZE) >> 12
        assert vm.memslots.find(0, gfn + 7).id == slot
    assert vm.memslots.find(0, (MEM_REGION_GPA >> 12) - 1) is None


# --- guest_memfd_test ---------------------------------------------------------


def test_create_guest_memfd_invalid_and_multiple() -> None:
    vm = m.Vm()  # vm_create_barebones(): guest_memfd creation needs no private memory
    for size in range(1, PAGE_SIZE):
        with pytest.raises(OSError) as info:
            vm.create_guest_memfd(size)
        assert info.value.errno == errno.EINVAL
    # Every flag the VM does not report in KVM_CAP_GUEST_MEMFD_FLAGS (6.18's
    # guest_memfd_test; 6.8 reports none and takes none).
    valid = vm.check_extension(m.KVM_CAP_GUEST_MEMFD_FLAGS)
    assert valid == m.GUEST_MEMFD_FLAG_MMAP | m.GUEST_MEMFD_FLAG_INIT_SHARED
    assert m.Vm(semantics="6.8").check_extension(m.KVM_CAP_GUEST_MEMFD_FLAGS) == 0
    flag = 1
    while flag < 1 << 64:
        if flag & valid:
            vm.guest_memfd_close(vm.create_guest_memfd(PAGE_SIZE, flag))
            flag <<= 1
            continue
        with pytest.raises(OSError) as info:
            vm.create_guest_memfd(PAGE_SIZE, flag)
        assert info.value.errno == errno.EINVAL
        flag <<= 1
    fd1 = vm.create_guest_memfd(PAGE_SIZE)
    fd2 = vm.create_guest_memfd(PAGE_SIZE * 4)
    assert fd1 != fd2


# --- private_mem_conversions_test -------------------------------------------------

# The guest's stages: (offset, size) within each vCPU's test region.
STAGES = [(0, PAGE_SIZE), (0, SZ_2M), (PAGE_SIZE, PAGE_SIZE), (PAGE_SIZE, SZ_2M), (SZ_2M, PAGE_SIZE)]
PER_CPU_SIZE = 4 * SZ_2M  # room for the largest stage plus a hugepage around it
DATA_GPA = 1 << 32


def access(vm: m.Vm, gpa: int, private: bool) -> int:
    """A guest access: the fault path's answer (level) or MemoryFault."""
    return vm.fault(gpa, private=private, write=True)


def handle_memory_fault(vm: m.Vm, e: m.MemoryFault) -> None:
    """The VMM side of KVM_EXIT_MEMORY_FAULT in the selftest: convert what
    the guest asked for (an implicit conversion)."""
    want = P if e.flags & m.KVM_MEMORY_EXIT_FLAG_PRIVATE else 0
    vm.set_memory_attributes(e.gpa, e.size, want)


def run_guest_stage(vm: m.Vm, base: int, offset: int, size: int) -> None:
    gpa = base + offset
    pages = range(gpa, gpa + size, PAGE_SIZE)
    # Shared memory is accessible as shared, not as private.
    for a in (gpa, gpa + size - PAGE_SIZE):
        assert access(vm, a, private=False) >= 1
        with pytest.raises(m.MemoryFault) as info:
            access(vm, a, private=True)
        e = info.value
        assert (e.gpa, e.size, e.flags) == (a, PAGE_SIZE, m.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    # Explicit conversion to private (KVM_HC_MAP_GPA_RANGE -> the VMM).
    vm.set_memory_attributes(gpa, size, P)
    assert vm.range_has_attributes(gpa >> 12, (gpa + size) >> 12, P)
    for a in (gpa, gpa + size - PAGE_SIZE):
        assert access(vm, a, private=True) == 1  # guest_memfd order 0: 4K
        with pytest.raises(m.MemoryFault) as info:
            access(vm, a, private=False)
        assert info.value.flags == 0 and info.value.gpa == a
    # The pages around the range stay shared.
    if offset:
        assert vm.get_memory_attributes((gpa >> 12) - 1) == 0
    assert vm.get_memory_attributes((gpa + size) >> 12) == 0
    # Convert back to shared one page at a time, as the guest does,
    # implicitly: each shared access exits and the VMM converts that page.
    for a in list(pages)[:: max(1, len(pages) // 8)]:
        with pytest.raises(m.MemoryFault) as info:
            access(vm, a, private=False)
        handle_memory_fault(vm, info.value)
        assert access(vm, a, private=False) >= 1
    # And the rest explicitly, in one call.
    vm.set_memory_attributes(gpa, size, 0)
    assert vm.range_has_attributes(gpa >> 12, (gpa + size) >> 12, 0)
    assert access(vm, gpa, private=False) >= 1


@pytest.mark.parametrize("store", ["rangetree", "xarray"])
@pytest.mark.parametrize(("nr_vcpus", "nr_memslots"), [(1, 1), (2, 1), (2, 2), (4, 4)])
def test_mem_conversions(store: str, nr_vcpus: int, nr_memslots: int) -> None:
    vm = protected_vm(store)
    memfd_size = PER_CPU_SIZE * nr_vcpus
    slot_size = memfd_size // nr_memslots
    memfd = vm.create_guest_memfd(memfd_size)
    for i in range(nr_memslots):
        vm.set_user_memory_region(
            i, DATA_GPA + slot_size * i, slot_size, 0, GMEM, memfd, slot_size * i
        )
    zapped: list[tuple[int, int, int]] = []
    vm.on_unmap(lambda r: zapped.append((r.slot.id, r.start, r.end)) and False)
    errors: list[BaseException] = []

    def vcpu(i: int) -> None:
        try:
            base = DATA_GPA + PER_CPU_SIZE * i
            for offset, size in STAGES:
                run_guest_stage(vm, base, offset, size)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(nr_vcpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert vm.range_has_attributes(DATA_GPA >> 12, (DATA_GPA + memfd_size) >> 12, 0)
    assert vm.mmu_invalidate_in_progress == 0
    # Every zapped range lies inside its slot.
    for slot_id, s, e in zapped:
        slot = vm.memslots.get(0, slot_id)
        assert slot.base_gfn <= s < e <= slot.end_gfn


def test_huge_private_mappings_with_large_guest_memfd_folios() -> None:
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, guest_memfd_max_order=9)
    memfd = vm.create_guest_memfd(4 * SZ_2M)
    vm.set_user_memory_region(0, DATA_GPA, 4 * SZ_2M, 0, GMEM, memfd, 0)
    vm.set_memory_attributes(DATA_GPA, 2 * SZ_2M, P)
    assert access(vm, DATA_GPA + PAGE_SIZE, private=True) == 2  # a whole 2M inside
    vm.set_memory_attributes(DATA_GPA + SZ_2M, PAGE_SIZE, 0)  # mixes the second 2M
    assert vm.hugepage_mixed(0, (DATA_GPA + SZ_2M) >> 12, 2)
    assert access(vm, DATA_GPA + SZ_2M + 2 * PAGE_SIZE, private=True) == 1


# --- private_mem_kvm_exits_test ---------------------------------------------------


def test_private_access_memslot_deleted() -> None:
    vm = protected_vm()
    memfd = vm.create_guest_memfd(SZ_2M)
    vm.set_user_memory_region(MEM_REGION_SLOT, DATA_GPA, SZ_2M, 0, GMEM, memfd, 0)
    vm.set_memory_attributes(DATA_GPA, SZ_2M, P)
    assert access(vm, DATA_GPA, private=True) == 1
    vm.set_user_memory_region(MEM_REGION_SLOT, DATA_GPA, 0)
    with pytest.raises(m.MemoryFault) as info:
        access(vm, DATA_GPA, private=True)
    assert info.value.errno == errno.EFAULT
    assert (info.value.gpa, info.value.size) == (DATA_GPA, PAGE_SIZE)
    assert info.value.flags == m.KVM_MEMORY_EXIT_FLAG_PRIVATE
    assert vm.stats.memory_fault_exits == 1


def test_private_access_memslot_not_private() -> None:
    vm = protected_vm()
    # A memslot without KVM_MEM_GUEST_MEMFD.
    vm.set_user_memory_region(MEM_REGION_SLOT, DATA_GPA, SZ_2M, 0x7F0000000000)
    vm.set_memory_attributes(DATA_GPA, SZ_2M, P)
    with pytest.raises(m.MemoryFault) as info:
        access(vm, DATA_GPA + PAGE_SIZE, private=True)
    assert info.value.gpa == DATA_GPA + PAGE_SIZE
    assert info.value.flags == m.KVM_MEMORY_EXIT_FLAG_PRIVATE
