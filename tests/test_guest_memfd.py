"""guest_memfd files after creation: fallocate (allocate, punch hole) and
close, as Linux 6.8's kvm_gmem_fallocate / kvm_gmem_punch_hole /
kvm_gmem_release do them, through the Vm."""

from __future__ import annotations

import errno

import pytest

from memattr import trace as t
from memattr.errors import MemoryFault
from memattr.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_X86_SW_PROTECTED_VM,
)
from memattr.vm import Vm

P = KVM_MEMORY_ATTRIBUTE_PRIVATE
PAGE = 4096
M2 = 2 << 20
G1 = 1 << 30
PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


@pytest.fixture(params=["rangetree", "xarray"])
def store(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def two_slot_vm(store: str, semantics: str = "6.18") -> tuple[Vm, int]:
    """One 4G guest_memfd backing RAM below 4G (2G) and above (2G), all private."""
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store, guest_memfd_max_order=9, semantics=semantics)  # type: ignore[arg-type]
    fd = vm.create_guest_memfd(4 * G1)
    vm.set_user_memory_region(0, 0, 2 * G1, 0x7F0000000000, KVM_MEM_GUEST_MEMFD, fd, 0)
    vm.set_user_memory_region(1, 4 * G1, 2 * G1, 0x7F0080000000, KVM_MEM_GUEST_MEMFD, fd, 2 * G1)
    vm.set_memory_attributes(0, 2 * G1, P)
    vm.set_memory_attributes(4 * G1, 2 * G1, P)
    return vm, fd


def state(vm: Vm) -> dict[str, object]:
    return {
        "stats": vm.stats.as_dict(),
        "seq": vm.mmu_invalidate_seq,
        "mappings": [vm.mmu.mappings(level) for level in (1, 2, 3)],
    }


def test_punch_hole_zaps_every_mapping_of_the_range_across_slots(store):
    vm, fd = two_slot_vm(store)
    assert vm.fault(0, private=True) == 2
    assert vm.fault(2 * G1 - PAGE, private=True) == 2
    assert vm.fault(4 * G1 + 8 * M2, private=True) == 2
    before = vm.stats.as_dict()
    seq = vm.mmu_invalidate_seq
    # File pages [2G - 2M, 2G + 2M): the tail of slot 0 and the head of slot 1.
    vm.guest_memfd_fallocate(fd, PUNCH, 2 * G1 - M2, 2 * M2)
    st = vm.stats
    assert vm.mmu.mappings(2) == [(0, 512), ((4 * G1 + 8 * M2) >> 12, ((4 * G1 + 9 * M2) >> 12))]
    assert st.zapped_pages[2] == before["zapped_pages"][2] + 1
    assert st.tlb_flushes == before["tlb_flushes"] + 1
    assert st.mmu_lock_acquisitions == before["mmu_lock_acquisitions"] + 2  # begin, end
    assert st.gmem_holes_punched == 1
    # One invalidation covering both slots' pieces, closed again.
    assert vm.mmu_invalidate_seq == seq + 1 and vm.mmu_invalidate_in_progress == 0
    assert (vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end) == (
        (2 * G1 - M2) >> 12,
        (4 * G1 + M2) >> 12,
    )
    # Attributes are not the file's business: still private, and a private
    # fault simply gets a fresh page.
    assert vm.get_memory_attributes((2 * G1 - PAGE) >> 12) == P
    assert vm.fault(2 * G1 - PAGE, private=True) == 2


def test_punch_hole_zaps_shared_mappings_too(store):
    # 6.8's kvm_mmu_unmap_gfn_range has no private/shared filter.
    vm, fd = two_slot_vm(store)
    vm.set_memory_attributes(0, G1, 0)
    assert vm.fault(PAGE) == 3
    vm.guest_memfd_fallocate(fd, PUNCH, 0, PAGE)
    assert vm.mmu.mappings(3) == [] and vm.stats.zapped_pages[3] == 1


def test_hole_outside_every_binding_touches_nothing(store):
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store)
    fd = vm.create_guest_memfd(4 * G1)
    vm.set_user_memory_region(0, 0, G1, 0, KVM_MEM_GUEST_MEMFD, fd, 0)
    before = state(vm)
    vm.guest_memfd_fallocate(fd, PUNCH, 2 * G1, G1)  # unbound file pages
    vm.guest_memfd_fallocate(fd, PUNCH, 8 * G1, G1)  # past the end: fine for a hole
    vm.guest_memfd_fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4 * G1)  # allocate
    after = state(vm)
    assert after["stats"]["gmem_holes_punched"] == 2  # type: ignore[index]
    after["stats"]["gmem_holes_punched"] = 0  # type: ignore[index]
    assert after == before


@pytest.mark.parametrize(
    ("mode", "offset", "length", "err"),
    [
        (PUNCH, -PAGE, PAGE, errno.EINVAL),
        (PUNCH, 0, 0, errno.EINVAL),
        (PUNCH, 0, -PAGE, errno.EINVAL),
        (FALLOC_FL_PUNCH_HOLE, 0, PAGE, errno.EOPNOTSUPP),  # no KEEP_SIZE
        (PUNCH, (1 << 63) - PAGE, 2 * PAGE, errno.EFBIG),
        (0, 0, PAGE, errno.EOPNOTSUPP),  # growing the file
        (FALLOC_FL_KEEP_SIZE | 0x10, 0, PAGE, errno.EOPNOTSUPP),  # ZERO_RANGE
        (PUNCH | 0x10, 0, PAGE, errno.EOPNOTSUPP),  # PUNCH_HOLE with ZERO_RANGE
        (0x80 | PUNCH, (1 << 63) - PAGE, 2 * PAGE, errno.EOPNOTSUPP),  # unknown bit before EFBIG
        (FALLOC_FL_KEEP_SIZE | 0x08, 0, PAGE, errno.EINVAL),  # COLLAPSE_RANGE not alone
        (FALLOC_FL_KEEP_SIZE | 0x20, 0, PAGE, errno.EINVAL),  # INSERT_RANGE not alone
        (PUNCH | 0x40, 0, PAGE, errno.EINVAL),  # UNSHARE_RANGE with PUNCH_HOLE
        (0x08, (1 << 63) - PAGE, 2 * PAGE, errno.EFBIG),  # vfs passes COLLAPSE alone; size first
        (0x08, 0, PAGE, errno.EOPNOTSUPP),  # then guest_memfd refuses it
        (PUNCH, 1, PAGE, errno.EINVAL),
        (PUNCH, 0, PAGE + 1, errno.EINVAL),
        (FALLOC_FL_KEEP_SIZE, 4 * G1 - PAGE, 2 * PAGE, errno.EINVAL),  # allocate past the size
    ],
)
def test_fallocate_errors_change_nothing(store, mode, offset, length, err):
    """Linux 6.8's vfs_fallocate() and kvm_gmem_fallocate()."""
    vm, fd = two_slot_vm(store, semantics="6.8")
    vm.fault(0, private=True)
    before = state(vm)
    with pytest.raises(OSError) as e:
        vm.guest_memfd_fallocate(fd, mode, offset, length)
    assert e.value.errno == err
    assert state(vm) == before


# Where 6.18's vfs_fallocate() differs from 6.8's: the modes are exclusive
# and every refusal of a mode is EOPNOTSUPP (checked against the live 6.18
# kernel by tests/test_live_kvm.py, every mode byte).
_FALLOC_618 = {
    (FALLOC_FL_KEEP_SIZE | 0x08, 0, PAGE): errno.EOPNOTSUPP,  # COLLAPSE_RANGE refuses KEEP_SIZE
    (FALLOC_FL_KEEP_SIZE | 0x20, 0, PAGE): errno.EOPNOTSUPP,  # INSERT_RANGE refuses KEEP_SIZE
    (PUNCH | 0x40, 0, PAGE): errno.EOPNOTSUPP,  # two modes
    (0x80, (1 << 63) - PAGE, 2 * PAGE): errno.EFBIG,  # WRITE_ZEROES (6.17) is a mode: size first
    (0x80, 0, PAGE): errno.EOPNOTSUPP,  # then guest_memfd refuses it
    (0x80 | FALLOC_FL_KEEP_SIZE, 0, PAGE): errno.EOPNOTSUPP,  # WRITE_ZEROES refuses KEEP_SIZE
    (0x100 | PUNCH, 0, PAGE): errno.EOPNOTSUPP,  # unknown bit
}


@pytest.mark.parametrize(("mode", "offset", "length"), list(_FALLOC_618))
def test_fallocate_errors_618(store, mode, offset, length):
    vm, fd = two_slot_vm(store)
    vm.fault(0, private=True)
    before = state(vm)
    with pytest.raises(OSError) as e:
        vm.guest_memfd_fallocate(fd, mode, offset, length)
    assert e.value.errno == _FALLOC_618[mode, offset, length]
    assert state(vm) == before


def test_fallocate_and_close_need_a_guest_memfd_of_this_vm(store):
    vm, fd = two_slot_vm(store)
    other = Vm(KVM_X86_SW_PROTECTED_VM, store)
    for call in (lambda: other.guest_memfd_fallocate(fd, PUNCH, 0, PAGE), lambda: other.guest_memfd_close(fd)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        vm.guest_memfd_close(12345)
    assert e.value.errno == errno.EBADF
    with pytest.raises(TypeError, match="fd"):
        vm.guest_memfd_close("3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset must be an s64"):
        vm.guest_memfd_fallocate(fd, PUNCH, 1 << 63, PAGE)
    with pytest.raises(ValueError, match="mode must be a u32"):
        vm.guest_memfd_fallocate(fd, -1, 0, PAGE)
    assert vm.stats.gmem_holes_punched == 0


def test_close_zaps_unbinds_and_private_faults_then_exit(store):
    vm, fd = two_slot_vm(store)
    vm.set_memory_attributes(G1, G1, 0)  # some shared memory in slot 0
    assert vm.fault(0, private=True) == 2 and vm.fault(G1) == 3
    seq = vm.mmu_invalidate_seq
    vm.guest_memfd_close(fd)
    assert vm.mmu.mappings(1) == vm.mmu.mappings(2) == vm.mmu.mappings(3) == []
    assert vm.mmu_invalidate_seq == seq + 1 and vm.stats.gmem_closed == 1
    assert (vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end) == (0, (6 * G1) >> 12)
    # The memslots stay; private accesses can no longer get a page.
    assert len(vm.memslots) == 2
    with pytest.raises(MemoryFault) as e:
        vm.fault(0, private=True)
    assert e.value.flags == KVM_MEMORY_EXIT_FLAG_PRIVATE and e.value.gpa == 0
    assert vm.fault(G1) == 3  # shared memory is not the file's
    # Conversions still work (attributes are the VM's), and the slots can
    # be deleted; the fd is gone.
    vm.set_memory_attributes(0, M2, 0)
    vm.set_user_memory_region(0, 0, 0)
    assert len(vm.memslots) == 1
    with pytest.raises(OSError) as err:
        vm.guest_memfd_fallocate(fd, PUNCH, 0, PAGE)
    assert err.value.errno == errno.EBADF
    with pytest.raises(OSError) as err:
        vm.set_user_memory_region(2, 8 * G1, G1, 0, KVM_MEM_GUEST_MEMFD, fd, 0)
    assert err.value.errno == errno.EBADF


def test_native_batches_see_a_closed_file(store):
    vm, fd = two_slot_vm(store)
    vm.guest_memfd_close(fd)
    ops = t.empty_ops(2)
    ops["kind"] = t.OP_FAULT
    ops["gpa"] = [0, 4 * G1]
    ops["flags"] = t.FLAG_PRIVATE
    for engine in ("python", "native"):
        res = t.replay(t.Trace(ops.copy(), {"vm_type": KVM_X86_SW_PROTECTED_VM}), vm, engine=engine, keep_results=True)
        assert res.results.tolist() == [-errno.EFAULT, -errno.EFAULT]


