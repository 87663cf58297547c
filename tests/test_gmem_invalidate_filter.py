"""6.18's guest_memfd invalidation filter, checked page by page against an
independent numpy oracle: kvm_gmem_get_invalidate_filter() gives
KVM_FILTER_SHARED for a GUEST_MEMFD_FLAG_INIT_SHARED file, else
KVM_FILTER_PRIVATE; kvm_gfn_range_filter_to_root_types() makes that matter
only for a VM with a mirror root (TDX), whose hole punch and release then
zap only the private mappings; KVM_SET_MEMORY_ATTRIBUTES zaps the old
attribute's kind there ("Unmap the old attribute page", since 6.14). Other
VM types and 6.8 zap both kinds. Run through the Vm's one-call
path and through the step-by-step driver (python/memattr/driven.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

import memattr as m
from memattr import driven
from memattr.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

PG = m.PAGE_SIZE
N = 256
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
UNMAPPED, SHARED, PRIVATE = -1, 0, 1


class Oracle:
    """Per gfn: the kind of the leaf mapping it (or UNMAPPED) and that
    leaf's first gfn and size, so a zap takes a straddling leaf whole."""

    def __init__(self) -> None:
        self.kind = np.full(N, UNMAPPED, np.int8)
        self.leaf = np.zeros(N, np.int64)
        self.size = np.ones(N, np.int64)
        self.private = np.zeros(N, bool)

    def fault(self, gfn: int, private: bool, level: int) -> None:
        n = 512 ** (level - 1)
        first = gfn - gfn % n
        # A new leaf replaces every leaf it covers (none straddle it here:
        # the slot is smaller than any hugepage the host could give).
        self.kind[first:first + n] = PRIVATE if private else SHARED
        self.leaf[first:first + n] = first
        self.size[first:first + n] = n

    def zap(self, start: int, end: int, kinds: set[int]) -> None:
        for g in range(start, end):
            if self.kind[g] in kinds:
                f, n = int(self.leaf[g]), int(self.size[g])
                self.kind[f:f + n] = UNMAPPED


def scenario(vm_type: int, semantics: str, init_shared: bool, step_by_step: bool,
             seed: int) -> None:
    host = m.HostProfile.named("intel-tdx") if vm_type == m.KVM_X86_TDX_VM else None
    vm = m.Vm(vm_type, semantics=semantics, host=host)  # type: ignore[arg-type]
    flags = m.GUEST_MEMFD_FLAG_INIT_SHARED if init_shared else 0
    fd = vm.create_guest_memfd(N * PG, flags)
    vm.set_user_memory_region(0, 0, N * PG, 0x7F0000000000, m.KVM_MEM_GUEST_MEMFD, fd, 0)
    o = Oracle()
    # The kernel's answer, written from the source: which kinds a guest_memfd
    # invalidation zaps.
    if vm_type == m.KVM_X86_TDX_VM and semantics == "6.18":
        gmem_kinds = {SHARED} if init_shared else {PRIVATE}
    else:
        gmem_kinds = {SHARED, PRIVATE}
    rnd = random.Random(seed)
    for _ in range(200):
        op = rnd.random()
        a = rnd.randrange(N)
        b = rnd.randrange(a + 1, min(N, a + 48) + 1)
        if op < 0.2 and vm.has_private_mem:
            attrs = m.KVM_MEMORY_ATTRIBUTE_PRIVATE if rnd.random() < 0.5 else 0
            vm.set_memory_attributes(a * PG, (b - a) * PG, attrs)
            # Nothing to change: the ioctl returns early, zapping nothing;
            # otherwise the conversion zaps the range: on TDX (6.18) the
            # old attribute's kind only, elsewhere both.
            if (o.private[a:b] != bool(attrs)).any():
                o.private[a:b] = bool(attrs)
                if vm_type == m.KVM_X86_TDX_VM and semantics == "6.18":
                    o.zap(a, b, {SHARED} if attrs else {PRIVATE})
                else:
                    o.zap(a, b, {SHARED, PRIVATE})
        elif op < 0.8:
            private = bool(o.private[a])
            level = vm.fault(a * PG, private=private)
            o.fault(a, private, level)
        elif op < 0.97:
            if step_by_step:
                driven.kvm_gmem_fallocate(vm, fd, PUNCH, a * PG, (b - a) * PG)
            else:
                vm.guest_memfd_fallocate(fd, PUNCH, a * PG, (b - a) * PG)
            o.zap(a, b, gmem_kinds)
        else:
            continue
        check(vm, o, vm_type, seed)
    if step_by_step:
        driven.kvm_gmem_release(vm, fd)
    else:
        vm.guest_memfd_close(fd)
    o.zap(0, N, gmem_kinds)
    check(vm, o, vm_type, seed)


def check(vm: m.Vm, o: Oracle, vm_type: int, seed: int) -> None:
    got = np.array([{None: UNMAPPED, False: SHARED, True: PRIVATE}[vm._kvm.mapped_private(0, g)]
                    for g in range(N)], np.int8)
    want = o.kind.copy()
    if vm_type != m.KVM_X86_TDX_VM:
        # One direct root: the leaf does not record its kind.
        want[want == PRIVATE] = SHARED
    assert (got == want).all(), (seed, np.nonzero(got != want)[0][:8])


@pytest.mark.parametrize("step_by_step", [False, True])
@pytest.mark.parametrize(
    ("vm_type", "semantics"),
    [
        (m.KVM_X86_TDX_VM, "6.18"),
        (m.KVM_X86_SW_PROTECTED_VM, "6.18"),
        (m.KVM_X86_SW_PROTECTED_VM, "6.8"),
    ],
)
@pytest.mark.parametrize("seed", [1, 2])
def test_gmem_invalidation_zaps_the_filtered_kind(vm_type, semantics, step_by_step, seed):
    scenario(vm_type, semantics, False, step_by_step, seed)


@pytest.mark.parametrize("step_by_step", [False, True])
def test_init_shared_file_zaps_both_on_a_vm_without_mirror_root(step_by_step):
    # INIT_SHARED needs a VM without private memory in 6.18: all shared.
    scenario(m.KVM_X86_DEFAULT_VM, "6.18", True, step_by_step, 3)


def test_tdx_private_file_keeps_shared_mappings():
    """The rule, in one picture: a TDX VM's hole over a shared and a
    private page drops only the private one."""
    vm = m.Vm(m.KVM_X86_TDX_VM, host=m.HostProfile.named("intel-tdx"))
    fd = vm.create_guest_memfd(4 * PG)
    vm.set_user_memory_region(0, 0, 4 * PG, 0x7F0000000000, m.KVM_MEM_GUEST_MEMFD, fd, 0)
    vm.set_memory_attributes(0, PG, m.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.fault(0, private=True)
    vm.fault(PG)
    assert vm._kvm.gmem_invalidate_filter(fd, 0, 4) == m.KVM_FILTER_PRIVATE
    vm.guest_memfd_fallocate(fd, PUNCH, 0, 2 * PG)
    assert vm._kvm.mapped_private(0, 0) is None
    assert vm._kvm.mapped_private(0, 1) is False


@pytest.mark.parametrize(("semantics", "fixed"), [("6.18", True), ("6.8", False), ("v11", False)])
def test_straddling_hugepage_fix_follows_the_semantics(semantics, fixed):
    # "Prevent installing hugepages when mem attributes are changing"
    # (April 2025, Cc stable) came after 6.8.y's end of life.
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics=semantics)  # type: ignore[arg-type]
    assert vm.mmu.invalidate_straddling_hugepages is fixed
