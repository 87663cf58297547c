"""guest_memfd as a file on the model (the same answers are compared with
the running kernel by tests/test_live_kvm.py where /dev/kvm exists)."""

from __future__ import annotations

import errno
import pickle
import stat

import pytest

import memattr as m
from memattr import uapi

PAGE = uapi.PAGE_SIZE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE


def errno_of(fn: object) -> int:
    with pytest.raises(OSError) as info:
        fn()  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


def test_mmap_needs_the_flag_and_a_shared_mapping() -> None:
    vm = m.Vm()
    plain = vm.create_guest_memfd(4 * PAGE)
    shared = vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    assert errno_of(lambda: vm.guest_memfd_mmap(plain, PAGE)) == errno.ENODEV
    assert errno_of(lambda: vm.guest_memfd_mmap(shared, PAGE, shared=False)) == errno.EINVAL
    # 6.8's guest_memfd has no mmap at all.
    old = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="6.8")
    assert errno_of(lambda: old.guest_memfd_mmap(old.create_guest_memfd(PAGE), PAGE)) == errno.ENODEV
    assert errno_of(lambda: vm.guest_memfd_mmap(12345, PAGE)) == errno.EBADF
    with pytest.raises(ValueError, match="length"):
        vm.guest_memfd_mmap(shared, 0)


def test_host_accesses_fault_like_the_kernel() -> None:
    vm = m.Vm()
    private = vm.create_guest_memfd(4 * PAGE, MMAP)
    shared = vm.create_guest_memfd(4 * PAGE, MMAP | INIT_SHARED)
    mp = vm.guest_memfd_mmap(private, 4 * PAGE)
    with pytest.raises(m.GuestMemfdSigbus) as info:
        mp[0]
    assert (info.value.fd, info.value.offset) == (private, 0)
    assert pickle.loads(pickle.dumps(info.value)).offset == 0
    # INIT_SHARED pages start shared and zero; past the file's end: SIGBUS;
    # past the mapping: IndexError, as mmap.mmap.
    ms = vm.guest_memfd_mmap(shared, 6 * PAGE)
    assert ms.read(0, 8) == bytes(8) and len(ms) == 6 * PAGE
    ms.write(PAGE - 1, b"ab")
    assert ms.read(PAGE - 2, 4) == b"\0ab\0"
    with pytest.raises(m.GuestMemfdSigbus) as info:
        ms.read(4 * PAGE - 1, 2)
    assert info.value.offset == 4 * PAGE
    with pytest.raises(IndexError):
        ms[6 * PAGE]
    # A write that runs past the end keeps what it wrote before the fault.
    with pytest.raises(m.GuestMemfdSigbus):
        ms.write(4 * PAGE - 1, b"xy")
    assert ms[4 * PAGE - 1] == ord("x")
    # Another mapping sees the same file; a punched page reads back zero.
    assert vm.guest_memfd_mmap(shared, PAGE * 2)[PAGE] == ord("b")
    vm.guest_memfd_fallocate(shared, PUNCH, PAGE, PAGE)
    assert ms.read(PAGE - 1, 2) == b"a\0"


def test_file_operations_and_fstat() -> None:
    vm = m.Vm()
    fd = vm.create_guest_memfd(8 * PAGE, MMAP | INIT_SHARED)
    f = vm.guest_memfd_file(fd)
    for call, code in [
        (lambda: f.read(8), errno.EINVAL),
        (lambda: f.write(b"x"), errno.EINVAL),
        (lambda: f.pread(8, 0), errno.ESPIPE),
        (lambda: f.pwrite(b"x", 0), errno.ESPIPE),
        (lambda: f.lseek(0, 0), errno.ESPIPE),
        (lambda: f.ftruncate(0), errno.EINVAL),
        (lambda: f.ftruncate(16 * PAGE), errno.EINVAL),
        (lambda: f.fsync(), errno.EINVAL),
        (lambda: f.ioctl(uapi.KVM_CHECK_EXTENSION), errno.ENOTTY),
    ]:
        assert errno_of(call) == code
    st = f.fstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_size, st.st_blksize, st.st_blocks, st.st_nlink) == (8 * PAGE, PAGE, 0, 1)
    vm.guest_memfd_fallocate(fd, uapi.FALLOC_FL_KEEP_SIZE, 0, 8 * PAGE)
    assert f.fstat() == st  # allocation is not accounted in st_blocks
    vm.guest_memfd_close(fd)
    assert errno_of(f.fstat) == errno.EBADF
    assert errno_of(lambda: vm.guest_memfd_file(fd)) == errno.EBADF


def test_host_argument_must_be_a_profile() -> None:
    with pytest.raises(TypeError, match="HostProfile"):
        m.Vm(host="amd")  # type: ignore[arg-type]
