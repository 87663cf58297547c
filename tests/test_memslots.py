"""Memslots and guest_memfd: KVM_SET_USER_MEMORY_REGION2 rules (Linux 6.8)."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable

import pytest

import memattr as m
from memattr import uapi

GPA = 0xC0000000  # set_memory_region_test's MEM_REGION_GPA
SIZE = 0x200000  # and MEM_REGION_SIZE
GMEM = m.KVM_MEM_GUEST_MEMFD


def snapshot(vm: m.Vm) -> object:
    """Everything a memslot call may change."""
    slots = [
        (
            s.as_id,
            s.id,
            s.base_gfn,
            s.npages,
            s.flags,
            s.userspace_addr,
            s.guest_memfd,
            s.guest_memfd_offset,
            s.serial,
        )
        for s in vm.memslots
    ]
    bindings = vm.guest_memfds()
    return slots, bindings, vm.stats.memslot_updates, vm.memslots.nr_memslot_pages


def expect_errno(vm: m.Vm, code: int, fn: Callable[[], object]) -> None:
    before = snapshot(vm)
    with pytest.raises(OSError) as info:
        fn()
    assert info.value.errno == code, info.value
    assert snapshot(vm) == before


@pytest.fixture
def pvm() -> m.Vm:
    return m.Vm(m.KVM_X86_SW_PROTECTED_VM)


@pytest.fixture
def dvm() -> m.Vm:
    return m.Vm(m.KVM_X86_DEFAULT_VM)


def test_create_find_delete(dvm: m.Vm) -> None:
    dvm.set_user_memory_region(0, GPA, SIZE, 0x7F0000000000)
    slot = dvm.memslots.find(0, GPA >> 12)
    assert slot is not None
    assert (slot.id, slot.as_id, slot.base_gfn, slot.npages) == (0, 0, GPA >> 12, SIZE >> 12)
    assert slot.userspace_addr == 0x7F0000000000 and slot.guest_memfd is None
    assert dvm.mmu.mixed_runs(slot, 2) == []  # the MMU built its per-slot state
    assert dvm.memslots.find(0, (GPA + SIZE) >> 12) is None
    assert dvm.memslots.find(0, (GPA >> 12) - 1) is None
    assert dvm.stats.memslot_updates == 1
    dvm.set_user_memory_region(0, GPA, 0)
    assert dvm.memslots.find(0, GPA >> 12) is None and len(dvm.memslots) == 0
    assert dvm.stats.memslot_updates == 2


def test_address_spaces(dvm: m.Vm, pvm: m.Vm) -> None:
    # x86 has an SMM address space, except for VMs with private memory.
    assert dvm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 2
    assert pvm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 1
    dvm.set_user_memory_region(0, GPA, SIZE)
    dvm.set_user_memory_region(1 << 16, GPA, SIZE)  # same gpa, other as_id: fine
    assert dvm.memslots.find(1, GPA >> 12).as_id == 1
    assert dvm.memslots.find(1, GPA >> 12).slot == 1 << 16
    expect_errno(dvm, errno.EINVAL, lambda: dvm.set_user_memory_region(2 << 16, GPA, SIZE))
    expect_errno(pvm, errno.EINVAL, lambda: pvm.set_user_memory_region(1 << 16, GPA, SIZE))


@pytest.mark.parametrize("semantics", ["6.8", "6.18"])
def test_invalid_arguments_change_nothing(semantics: str) -> None:
    dvm = m.Vm(m.KVM_X86_DEFAULT_VM, semantics=semantics)  # type: ignore[arg-type]
    dvm.set_user_memory_region(0, GPA, SIZE)
    # access_ok(): 6.8 takes the whole user half, 6.18 stops at TASK_SIZE_MAX
    # ((1 << 47) - 4096 with 4-level paging, (1 << 56) - 4096 with 5-level,
    # as on the default host).
    past_task_size = (1 << dvm.host.user_address_bits) - SIZE  # ends one page past TASK_SIZE_MAX
    if semantics == "6.8":
        dvm.set_user_memory_region(2, 1 << 30, SIZE, past_task_size)
        dvm.set_user_memory_region(2, 1 << 30, 0)
    else:
        dvm.set_user_memory_region(2, 1 << 30, SIZE, past_task_size - 0x1000)
        dvm.set_user_memory_region(2, 1 << 30, 0)
        # 6.18 lets every VM bind a guest_memfd: the fd is what is wrong.
        expect_errno(dvm, errno.EBADF, lambda: dvm.set_user_memory_region(1, 0, SIZE, flags=GMEM))
    bad: list[tuple[str, Callable[[], object]]] = [
        ("unknown flag", lambda: dvm.set_user_memory_region(1, 0, SIZE, flags=1 << 3)),
        ("size unaligned", lambda: dvm.set_user_memory_region(1, 0, SIZE - 1)),
        ("gpa unaligned", lambda: dvm.set_user_memory_region(1, 0x800, SIZE)),
        ("uaddr unaligned", lambda: dvm.set_user_memory_region(1, 0, SIZE, 0x123)),
        ("uaddr kernel half", lambda: dvm.set_user_memory_region(1, 0, SIZE, 1 << 63)),
        ("uaddr+size kernel half", lambda: dvm.set_user_memory_region(1, 0, SIZE, (1 << 63) - 0x1000)),
        ("gpa wraps", lambda: dvm.set_user_memory_region(1, (1 << 64) - 0x1000, SIZE)),
        (
            "too many pages",
            lambda: dvm.set_user_memory_region(1, 0, (uapi.KVM_MEM_MAX_NR_PAGES + 1) << 12),
        ),
        ("id too big", lambda: dvm.set_user_memory_region(uapi.KVM_USER_MEM_SLOTS, 0, SIZE)),
        ("delete missing", lambda: dvm.set_user_memory_region(7, 0, 0)),
        ("resize", lambda: dvm.set_user_memory_region(0, GPA, SIZE * 2)),
        ("new uaddr", lambda: dvm.set_user_memory_region(0, GPA, SIZE, 0x1000)),
        ("toggle readonly", lambda: dvm.set_user_memory_region(0, GPA, SIZE, flags=uapi.KVM_MEM_READONLY)),
    ]
    if semantics == "6.8":
        bad.append(("guest_memfd flag, no private mem", lambda: dvm.set_user_memory_region(1, 0, SIZE, flags=GMEM)))
    else:
        bad.append(("uaddr past TASK_SIZE_MAX", lambda: dvm.set_user_memory_region(1, 0, SIZE, past_task_size)))
    for why, fn in bad:
        try:
            expect_errno(dvm, errno.EINVAL, fn)
        except AssertionError as e:  # pragma: no cover - names the failing case
            raise AssertionError(why) from e
    # The largest legal slot is fine.
    dvm.set_user_memory_region(1, 1 << 40, uapi.KVM_MEM_MAX_NR_PAGES << 12)


def test_overlap_is_eexist(dvm: m.Vm) -> None:
    dvm.set_user_memory_region(0, GPA, SIZE)
    dvm.set_user_memory_region(1, GPA + SIZE, SIZE)
    for gpa in (GPA - 0x1000, GPA, GPA + SIZE - 0x1000, GPA - SIZE + 0x1000):
        expect_errno(dvm, errno.EEXIST, lambda gpa=gpa: dvm.set_user_memory_region(2, gpa, SIZE))
    # Moving onto a neighbour is an overlap too; onto itself is not.
    expect_errno(dvm, errno.EEXIST, lambda: dvm.set_user_memory_region(0, GPA + 0x1000, SIZE))
    dvm.set_user_memory_region(2, GPA - SIZE, SIZE)  # adjacent: fine


def test_move_and_flags_only(dvm: m.Vm) -> None:
    dvm.set_user_memory_region(3, GPA, SIZE, 0x10000)
    old = dvm.memslots.get(0, 3)
    dvm.set_user_memory_region(3, GPA + 0x1000, SIZE, 0x10000)  # overlaps only itself
    new = dvm.memslots.get(0, 3)
    assert new.serial != old.serial and new.base_gfn == (GPA >> 12) + 1
    assert dvm.memslots.find(0, GPA >> 12) is None
    assert dvm.stats.memslot_updates == 2
    dvm.set_user_memory_region(3, GPA + 0x1000, SIZE, 0x10000, uapi.KVM_MEM_LOG_DIRTY_PAGES)
    flagged = dvm.memslots.get(0, 3)
    assert flagged.serial == new.serial and flagged.flags == uapi.KVM_MEM_LOG_DIRTY_PAGES
    # Same again: nothing to change, not counted.
    dvm.set_user_memory_region(3, GPA + 0x1000, SIZE, 0x10000, uapi.KVM_MEM_LOG_DIRTY_PAGES)
    assert dvm.stats.memslot_updates == 3


def test_readonly_flag_per_vm_type() -> None:
    tdx_host = m.HostProfile.named("intel-tdx")
    for vm_type, ok in [
        (m.KVM_X86_DEFAULT_VM, True),
        (m.KVM_X86_SW_PROTECTED_VM, True),
        (uapi.KVM_X86_SEV_VM, True),
        (uapi.KVM_X86_SEV_ES_VM, False),
        (uapi.KVM_X86_SNP_VM, False),
        (uapi.KVM_X86_TDX_VM, False),
    ]:
        # No one host has both SEV and TDX types.
        vm = m.Vm(vm_type, host=tdx_host if vm_type == uapi.KVM_X86_TDX_VM else None)
        assert vm.check_extension(uapi.KVM_CAP_READONLY_MEM) == int(ok)
        if ok:
            vm.set_user_memory_region(0, 0, SIZE, flags=uapi.KVM_MEM_READONLY)
        else:
            expect_errno(
                vm, errno.EINVAL, lambda vm=vm: vm.set_user_memory_region(0, 0, SIZE, flags=uapi.KVM_MEM_READONLY)
            )


def test_guest_memfd_create_rules() -> None:
    dvm = m.Vm(m.KVM_X86_DEFAULT_VM, semantics="6.8")
    pvm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="6.8")
    # guest_memfd_test: creation works on any VM in 6.8 ...
    fd = dvm.create_guest_memfd(4 * 4096)
    assert fd >= 0 and [f[0] for f in dvm.guest_memfds()] == [fd]
    # ... but only VMs with private memory can bind it.
    assert dvm.check_extension(m.KVM_CAP_GUEST_MEMFD) == 0
    assert pvm.check_extension(m.KVM_CAP_GUEST_MEMFD) == 1
    table = pvm.guest_memfds()
    for size in (0, 1, 4095, 4097, 1 << 63, (1 << 64) - 4096):
        with pytest.raises(OSError) as info:
            pvm.create_guest_memfd(size)
        assert info.value.errno == errno.EINVAL, size
    for bit in range(64):
        with pytest.raises(OSError) as info:
            pvm.create_guest_memfd(4096, 1 << bit)
        assert info.value.errno == errno.EINVAL
    assert pvm.guest_memfds() == table
    fds = {pvm.create_guest_memfd(4096) for _ in range(4)}
    assert min(fds) == fd + 1  # no fd consumed by the failures
    assert len(fds) == 4  # test_create_guest_memfd_multiple


def test_guest_memfd_binding_rules(pvm: m.Vm) -> None:
    fd = pvm.create_guest_memfd(SIZE * 4)
    pvm.set_user_memory_region(0, GPA, SIZE * 2, 0, GMEM, fd, 0)
    slot = pvm.memslots.get(0, 0)
    assert slot.guest_memfd == fd and slot.has_guest_memfd() and slot.gmem_pgoff == 0
    other = m.Vm(m.KVM_X86_SW_PROTECTED_VM).create_guest_memfd(SIZE * 4)
    real = os.open(os.devnull, os.O_RDONLY)
    try:
        cases: list[tuple[int, Callable[[], object]]] = [
            # Dirty logging of private memory is not supported.
            (errno.EINVAL, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM | uapi.KVM_MEM_LOG_DIRTY_PAGES, fd, SIZE * 2)),
            (errno.EINVAL, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, fd, 0x800)),  # unaligned
            (errno.EINVAL, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, fd, (1 << 64) - 4096)),  # wraps
            (errno.EINVAL, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, fd, SIZE * 4 - 0x1000)),  # past EOF
            (errno.EINVAL, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, fd, SIZE)),  # overlapping binding
            (errno.EINVAL, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, other, 0)),  # another VM's
            (errno.EINVAL, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, real, 0)),  # not a guest_memfd
            (errno.EBADF, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, -1, 0)),
            (errno.EBADF, lambda: pvm.set_user_memory_region(1, 0, SIZE, 0, GMEM, (1 << 20) - 1, 0)),
            # Private memslots are immutable: only deletion is allowed.
            (errno.EINVAL, lambda: pvm.set_user_memory_region(0, GPA, SIZE * 2, 0, GMEM, fd, 0)),
            (errno.EINVAL, lambda: pvm.set_user_memory_region(0, GPA + SIZE, SIZE * 2, 0, GMEM, fd, 0)),
            (errno.EINVAL, lambda: pvm.set_user_memory_region(0, GPA, SIZE * 2, 0, 0, fd, 0)),
            # The gpa overlap check comes before the binding checks.
            (errno.EEXIST, lambda: pvm.set_user_memory_region(1, GPA, SIZE, 0, GMEM, -1, 0)),
        ]
        for code, fn in cases:
            expect_errno(pvm, code, fn)
    finally:
        os.close(real)
    # The free half of the file binds fine; deleting unbinds.
    pvm.set_user_memory_region(1, 0, SIZE * 2, 0, GMEM, fd, SIZE * 2)
    assert [b[:2] for b in bound(pvm, fd)] == [(0, 1024), (1024, 2048)]
    pvm.set_user_memory_region(0, GPA, 0)
    assert [b[:2] for b in bound(pvm, fd)] == [(1024, 2048)]
    pvm.set_user_memory_region(0, GPA, SIZE, 0, GMEM, fd, SIZE)  # now free
    assert [b[:2] for b in bound(pvm, fd)] == [(512, 1024), (1024, 2048)]


def bound(vm: m.Vm, fd: int) -> list[tuple[int, int, int, int]]:
    return next(b for f, _, _, b in vm.guest_memfds() if f == fd)


def test_argument_types_are_named(dvm: m.Vm) -> None:
    with pytest.raises(TypeError, match="slot"):
        dvm.set_user_memory_region("0", 0, SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guest_phys_addr"):
        dvm.set_user_memory_region(0, -4096, SIZE)
    with pytest.raises(ValueError, match="memory_size"):
        dvm.set_user_memory_region(0, 0, 1 << 64)
    with pytest.raises(ValueError, match="slot"):
        dvm.set_user_memory_region(1 << 32, 0, SIZE)
    with pytest.raises(ValueError, match="guest_memfd"):
        dvm.set_user_memory_region(0, 0, SIZE, guest_memfd=1 << 32)
    with pytest.raises(TypeError, match="size"):
        dvm.create_guest_memfd(4096.0)  # type: ignore[arg-type]
    assert len(dvm.memslots) == 0


def test_lookup_with_thousands_of_slots_matches_brute_force() -> None:
    rnd = random.Random(7)
    vm = m.Vm(m.KVM_X86_DEFAULT_VM)  # two address spaces
    slots = []
    gfn = 0
    for i in range(3000):
        gfn += rnd.randrange(0, 4)  # holes of 0..3 pages
        npages = rnd.randrange(1, 6)
        vm.set_user_memory_region(((i % 2) << 16) | i, gfn << 12, npages << 12)
        slots.append((i % 2, i, gfn, npages))
        gfn += npages
    ms = vm.memslots
    for _ in range(2000):
        as_id = rnd.randrange(2)
        g = rnd.randrange(gfn + 5)
        want = [s for s in slots if s[0] == as_id and s[2] <= g < s[2] + s[3]]
        got = ms.find(as_id, g)
        assert (None if got is None else (got.as_id, got.id, got.base_gfn, got.npages)) == (want[0] if want else None)
        a = rnd.randrange(gfn + 5)
        b = a + rnd.randrange(1, 40)
        want_range = [s for s in slots if s[0] == as_id and s[2] < b and a < s[2] + s[3]]
        assert [(s.as_id, s.id, s.base_gfn, s.npages) for s in ms.in_range(as_id, a, b)] == want_range
    assert ms.in_range(0, 5, 5) == [] and ms.find(2, 0) is None and ms.in_range(7, 0, 9) == []
    for s in slots[::2]:
        vm.set_user_memory_region((s[0] << 16) | s[1], s[2] << 12, 0)
    assert len(ms) == 1500
    assert all(ms.find(s[0], s[2]).id == s[1] for s in slots[1::2])  # type: ignore[union-attr]
