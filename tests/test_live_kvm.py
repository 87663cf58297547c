"""The same scenarios on the running kernel's /dev/kvm and on the model
configured as this host (``Vm(host=HostProfile.probe(), semantics="6.18")``),
step by step: every step's result (its return value, or its errno) must be
the same. The kernel is the oracle; the model holds no copy of it.

Skipped, with the reason, where /dev/kvm is missing or unusable. Run on any
host with ``python -m pytest tests/test_live_kvm.py -v -s``: the summary
line prints how many steps ran and how many agreed. Scenarios that need
what a host lacks (a VM type, generic memory attributes) still run: the
kernel's refusal is the answer the model must give too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import faulthandler
import fcntl
import mmap
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import memattr as m
from memattr import uapi
from memattr.host import HostProfile

PAGE = uapi.PAGE_SIZE
SZ_2M = 2 << 20
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP_SIZE = uapi.FALLOC_FL_KEEP_SIZE
PUNCH_HOLE = uapi.FALLOC_FL_PUNCH_HOLE
SIGBUS = "SIGBUS"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _kvm_unusable() -> str | None:
    """Why the live kernel cannot be used here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm cannot be opened: {e}"
    try:
        os.close(fcntl.ioctl(fd, uapi.KVM_CREATE_VM, 0))
    except OSError as e:
        return f"KVM_CREATE_VM fails on /dev/kvm: {e}"
    finally:
        os.close(fd)
    return None


_UNUSABLE = _kvm_unusable()
pytestmark = pytest.mark.skipif(_UNUSABLE is not None, reason=_UNUSABLE or "")


# --- the two backends: the same calls on the kernel and on the model ---------


class LiveVm:
    """A VM fd of the running kernel."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def ioctl(self, request: int, arg: Any) -> int:
        return fcntl.ioctl(self.fd, request, arg)

    def create_guest_memfd(self, size: int, flags: int) -> int:
        return self.ioctl(uapi.KVM_CREATE_GUEST_MEMFD, uapi.kvm_create_guest_memfd(size=size, flags=flags))

    def fallocate(self, gfd: int, mode: int, offset: int, length: int) -> int:
        if _libc.fallocate(gfd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return 0

    def close_gmem(self, gfd: int) -> None:
        os.close(gfd)

    def file_op(self, gfd: int, op: str) -> Any:
        return _live_file_op(gfd, op)

    def close(self) -> None:
        os.close(self.fd)

    def mmap_gmem(self, gfd: int, length: int, shared: bool, touch: list[int], write: bool) -> list[str]:
        """mmap the guest_memfd and access each offset of ``touch`` in a
        forked child: per access "ok" or SIGBUS (after the first SIGBUS the
        rest are not tried). OSError if mmap itself fails."""
        # libc's mmap, not Python's: mmap.mmap refuses a mapping longer
        # than the file, which is one of the cases to run.
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, gfd, 0)
        if addr == ctypes.c_void_p(-1).value:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        results: list[str] = []
        try:
            for off in touch:
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: one access, then exit
                    try:
                        # The signal is the expected answer: die of it
                        # quietly (pytest's faulthandler would print a
                        # "Fatal Python error" for it).
                        faulthandler.disable()
                        os.close(r)
                        if write:
                            ctypes.memset(addr + off, 0x5A, 1)
                        os.write(w, ctypes.string_at(addr + off, 1))
                    finally:
                        os._exit(0)
                os.close(w)
                data = os.read(r, 1)
                os.close(r)
                _, status = os.waitpid(pid, 0)
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS:
                    results.append(SIGBUS)
                    break
                results.append(f"ok:{data[0] if data else '-'}")
        finally:
            _libc.munmap(addr, length)
        return results

    # A mapping that outlives the fd: the handle is the address.
    def map_gmem(self, gfd: int, length: int) -> int:
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, gfd, 0)
        if addr == ctypes.c_void_p(-1).value:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return int(addr)

    def map_access(self, addr: int, off: int, n: int, data: bytes | None = None) -> str:
        """A write of ``data`` (if given), then a read of ``n`` bytes at
        ``off`` through the mapping, in a forked child (a fault kills only
        the child): "ok:<hex>", SIGBUS, or "unmapped" (SIGSEGV: no mapping
        there any more)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                faulthandler.disable()
                os.close(r)
                if data is not None:
                    ctypes.memmove(addr + off, data, len(data))
                os.write(w, ctypes.string_at(addr + off, n))
            finally:
                os._exit(0)
        os.close(w)
        got = b""
        while chunk := os.read(r, 1 << 16):
            got += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return {signal.SIGBUS: SIGBUS, signal.SIGSEGV: "unmapped"}.get(sig, f"signal {sig}")
        return f"ok:{got.hex()}"

    def munmap_gmem(self, addr: int, length: int) -> int:
        if _libc.munmap(addr, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return 0


def _live_file_op(gfd: int, op: str) -> Any:
    ops: dict[str, Callable[[], Any]] = {
        "read": lambda: os.read(gfd, 8),
        "write": lambda: os.write(gfd, b"x"),
        "pread": lambda: os.pread(gfd, 8, 0),
        "pwrite": lambda: os.pwrite(gfd, b"x", 0),
        "lseek": lambda: os.lseek(gfd, 0, os.SEEK_SET),
        "ftruncate": lambda: os.ftruncate(gfd, 0),
        "fsync": lambda: os.fsync(gfd),
        "ioctl": lambda: fcntl.ioctl(gfd, uapi.KVM_CHECK_EXTENSION, 0),
        "fstat": lambda: (lambda st: (st.st_mode, st.st_size, st.st_blksize, st.st_blocks, st.st_nlink))(os.fstat(gfd)),
    }
    return ops[op]()


def _model_file_op(vm: m.Vm, gfd: int, op: str) -> Any:
    f = vm.guest_memfd_file(gfd)
    ops: dict[str, Callable[[], Any]] = {
        "read": lambda: f.read(8),
        "write": lambda: f.write(b"x"),
        "pread": lambda: f.pread(8, 0),
        "pwrite": lambda: f.pwrite(b"x", 0),
        "lseek": lambda: f.lseek(0, os.SEEK_SET),
        "ftruncate": lambda: f.ftruncate(0),
        "fsync": lambda: f.fsync(),
        "ioctl": lambda: f.ioctl(uapi.KVM_CHECK_EXTENSION, 0),
        "fstat": lambda: tuple(f.fstat()),
    }
    return ops[op]()


class LiveKvm:
    """/dev/kvm."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def create_vm(self, vm_type: int) -> LiveVm:
        return LiveVm(fcntl.ioctl(self.fd, uapi.KVM_CREATE_VM, vm_type))

    def close(self) -> None:
        os.close(self.fd)


class ModelVm:
    """A model VM driven through its ioctl front end."""

    def __init__(self, vm: m.Vm) -> None:
        self.vm = vm

    def check_extension(self, cap: int) -> int:
        return int(self.vm.ioctl(uapi.KVM_CHECK_EXTENSION, cap))

    def ioctl(self, request: int, arg: Any) -> int:
        return int(self.vm.ioctl(request, arg))

    def create_guest_memfd(self, size: int, flags: int) -> int:
        return self.ioctl(uapi.KVM_CREATE_GUEST_MEMFD, uapi.kvm_create_guest_memfd(size=size, flags=flags))

    def fallocate(self, gfd: int, mode: int, offset: int, length: int) -> int:
        self.vm.guest_memfd_fallocate(gfd, mode, offset, length)
        return 0

    def close_gmem(self, gfd: int) -> None:
        self.vm.guest_memfd_close(gfd)

    def file_op(self, gfd: int, op: str) -> Any:
        return _model_file_op(self.vm, gfd, op)

    def close(self) -> None:
        # The model's VM lives on through its guest_memfd files (each holds
        # a reference to its VM, as gmem->kvm does).
        pass

    def mmap_gmem(self, gfd: int, length: int, shared: bool, touch: list[int], write: bool) -> list[str]:
        mapping = self.vm.guest_memfd_mmap(gfd, length, shared=shared)
        results: list[str] = []
        for off in touch:
            try:
                if write:
                    mapping.write(off, b"\x5a")
                results.append(f"ok:{mapping.read(off, 1)[0]}")
            except m.GuestMemfdSigbus:
                results.append(SIGBUS)
                break
        return results

    def map_gmem(self, gfd: int, length: int) -> m.GuestMemfdMapping:
        return self.vm.guest_memfd_mmap(gfd, length)

    def map_access(self, mp: m.GuestMemfdMapping, off: int, n: int, data: bytes | None = None) -> str:
        try:
            if data is not None:
                mp.write(off, data)
            return f"ok:{mp.read(off, n).hex()}"
        except m.GuestMemfdSigbus:
            return SIGBUS
        except ValueError:  # the mapping is gone (mmap.mmap's closed error)
            return "unmapped"

    def munmap_gmem(self, mp: m.GuestMemfdMapping, length: int) -> int:
        mp.close()
        return 0


class ModelKvm:
    """The model as this host."""

    def __init__(self, host: HostProfile) -> None:
        self.host = host

    def check_extension(self, cap: int) -> int:
        return self.host.check_extension(cap, semantics="6.18")

    def create_vm(self, vm_type: int) -> ModelVm:
        return ModelVm(m.Vm(vm_type, host=self.host, semantics="6.18"))

    def close(self) -> None:
        pass


# --- recording steps ---------------------------------------------------------


class Steps:
    """Runs steps on one backend and records each outcome: ("ok", value)
    or ("errno", name)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, tuple[str, Any]]] = []

    def __call__(self, label: str, fn: Callable[[], Any], value: bool = True) -> Any:
        try:
            out = fn()
        except OSError as e:
            self.log.append((label, ("errno", errno.errorcode.get(e.errno or 0, e.errno))))
            return None
        self.log.append((label, ("ok", out if value else None)))
        return out


Scenario = Callable[[Any, Steps], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


CAPS = [*range(231, 246), uapi.KVM_CAP_USER_MEMORY, uapi.KVM_CAP_NR_MEMSLOTS, uapi.KVM_CAP_READONLY_MEM,
        uapi.KVM_CAP_MULTI_ADDRESS_SPACE, uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2]


@scenario
def check_extension(kvm: Any, step: Steps) -> None:
    for cap in CAPS:
        step(f"system fd cap {cap}", lambda cap=cap: kvm.check_extension(cap))
    vm = kvm.create_vm(0)
    for cap in CAPS:
        step(f"VM fd cap {cap}", lambda cap=cap: vm.check_extension(cap))
    vm.close()


@scenario
def create_vm_types(kvm: Any, step: Steps) -> None:
    for t in [*range(0, 10), 31, 63]:
        vm = step(f"KVM_CREATE_VM type {t}", lambda t=t: kvm.create_vm(t), value=False)
        if vm is not None:
            vm.close()


GMEM_SIZES = [0, 1, PAGE - 1, PAGE, PAGE + 1, SZ_2M, 1 << 40, (1 << 63) - PAGE, 1 << 63, (1 << 64) - PAGE]


@scenario
def create_guest_memfd(kvm: Any, step: Steps) -> None:
    vm = kvm.create_vm(0)
    for size in GMEM_SIZES:
        fd = step(f"size {size:#x}", lambda size=size: vm.create_guest_memfd(size, 0), value=False)
        if fd is not None:
            vm.close_gmem(fd)
    for flags in [*(1 << b for b in range(64)), MMAP | INIT_SHARED, (1 << 64) - 1]:
        fd = step(f"flags {flags:#x}", lambda flags=flags: vm.create_guest_memfd(PAGE, flags), value=False)
        if fd is not None:
            vm.close_gmem(fd)
    vm.close()


def _region(slot: int, gpa: int, size: int, uaddr: int = 0x7F0000000000, flags: int = 0, gfd: int = 0,
            offset: int = 0) -> uapi.kvm_userspace_memory_region2:
    return uapi.kvm_userspace_memory_region2(
        slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=uaddr,
        guest_memfd_offset=offset, guest_memfd=gfd & 0xFFFFFFFF,
    )


def _set(vm: Any, **kw: Any) -> int:
    return vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION2, _region(**kw))


G = uapi.KVM_MEM_GUEST_MEMFD


@scenario
def memslot_bindings(kvm: Any, step: Steps) -> None:
    vm = kvm.create_vm(0)
    other = kvm.create_vm(0)
    # Setup steps are steps too: a host without guest_memfd answers them
    # with its errno, and the rest of the scenario is moot.
    gfd = step("create guest_memfd", lambda: vm.create_guest_memfd(4 * SZ_2M, 0), value=False)
    ofd = step("create another VM's guest_memfd", lambda: other.create_guest_memfd(SZ_2M, 0), value=False)
    if gfd is None or ofd is None:
        return
    step("bind valid", lambda: _set(vm, slot=0, gpa=0, size=SZ_2M, flags=G, gfd=gfd))
    step("misaligned offset", lambda: _set(vm, slot=1, gpa=1 << 30, size=SZ_2M, flags=G, gfd=gfd, offset=0x800))
    step("beyond the file", lambda: _set(vm, slot=1, gpa=1 << 30, size=SZ_2M, flags=G, gfd=gfd, offset=3 * SZ_2M + PAGE))
    step("offset wraps", lambda: _set(vm, slot=1, gpa=1 << 30, size=SZ_2M, flags=G, gfd=gfd, offset=(1 << 64) - PAGE))
    # kvm_gmem_bind() sums offset + size as a loff_t, which wraps: the last
    # page below 2^63 binds, past the end of the file; one page lower does not.
    step("loff_t end just below 2^63", lambda: _set(vm, slot=1, gpa=1 << 30, size=PAGE, flags=G, gfd=gfd,
                                                    offset=(1 << 63) - 2 * PAGE))
    step("loff_t end wraps", lambda: _set(vm, slot=1, gpa=1 << 30, size=PAGE, flags=G, gfd=gfd,
                                          offset=(1 << 63) - PAGE))
    step("the same file pages again", lambda: _set(vm, slot=14, gpa=1 << 31, size=PAGE, flags=G, gfd=gfd,
                                                   offset=(1 << 63) - PAGE))
    step("delete it", lambda: _set(vm, slot=1, gpa=0, size=0))
    step("overlapping file range", lambda: _set(vm, slot=1, gpa=1 << 30, size=SZ_2M, flags=G, gfd=gfd, offset=SZ_2M - PAGE))
    step("adjacent file range", lambda: _set(vm, slot=1, gpa=1 << 30, size=SZ_2M, flags=G, gfd=gfd, offset=SZ_2M))
    step("overlapping gpa", lambda: _set(vm, slot=2, gpa=SZ_2M - PAGE, size=SZ_2M))
    with open("/dev/null", "rb") as f:
        step("not a guest_memfd", lambda: _set(vm, slot=3, gpa=2 << 30, size=SZ_2M, flags=G, gfd=f.fileno()))
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    step("closed fd", lambda: _set(vm, slot=3, gpa=2 << 30, size=SZ_2M, flags=G, gfd=r))
    step("another VM's guest_memfd", lambda: _set(vm, slot=3, gpa=2 << 30, size=SZ_2M, flags=G, gfd=ofd))
    step("fd -1", lambda: _set(vm, slot=3, gpa=2 << 30, size=SZ_2M, flags=G, gfd=-1))
    # Changes to a guest_memfd slot.
    step("gmem slot: move", lambda: _set(vm, slot=0, gpa=4 << 30, size=SZ_2M, flags=G, gfd=gfd))
    step("gmem slot: add dirty logging", lambda: _set(vm, slot=0, gpa=0, size=SZ_2M, flags=G | 1, gfd=gfd))
    step("gmem slot: same again", lambda: _set(vm, slot=0, gpa=0, size=SZ_2M, flags=G, gfd=gfd))
    step("gmem slot: delete", lambda: _set(vm, slot=0, gpa=0, size=0))
    step("gmem slot: delete again", lambda: _set(vm, slot=0, gpa=0, size=0))
    step("gmem slot: re-create", lambda: _set(vm, slot=0, gpa=0, size=SZ_2M, flags=G, gfd=gfd))
    step("gmem slot: re-create twice", lambda: _set(vm, slot=5, gpa=8 << 30, size=SZ_2M, flags=G, gfd=gfd))
    step("dirty logging + guest_memfd", lambda: _set(vm, slot=6, gpa=9 << 30, size=PAGE, flags=G | 1, gfd=gfd, offset=3 * SZ_2M))
    step("read-only + guest_memfd", lambda: _set(vm, slot=6, gpa=9 << 30, size=PAGE, flags=G | 2, gfd=gfd, offset=3 * SZ_2M))
    step("unknown flag bit 3", lambda: _set(vm, slot=6, gpa=9 << 30, size=PAGE, flags=1 << 3))
    # Plain slots: flag changes, dirty logging, read-only.
    step("plain slot", lambda: _set(vm, slot=7, gpa=16 << 30, size=SZ_2M))
    step("plain: dirty logging on", lambda: _set(vm, slot=7, gpa=16 << 30, size=SZ_2M, flags=1))
    step("plain: read-only change", lambda: _set(vm, slot=7, gpa=16 << 30, size=SZ_2M, flags=2))
    step("plain: becomes guest_memfd", lambda: _set(vm, slot=7, gpa=16 << 30, size=SZ_2M, flags=G, gfd=gfd, offset=3 * SZ_2M))
    step("plain: move", lambda: _set(vm, slot=7, gpa=32 << 30, size=SZ_2M, flags=1))
    step("plain: resize", lambda: _set(vm, slot=7, gpa=32 << 30, size=2 * SZ_2M, flags=1))
    step("plain: other uaddr", lambda: _set(vm, slot=7, gpa=32 << 30, size=SZ_2M, flags=1, uaddr=0x7E0000000000))
    step("read-only slot", lambda: _set(vm, slot=8, gpa=64 << 30, size=SZ_2M, flags=2))
    # Slot ids and address spaces.
    step("slot id 32763", lambda: _set(vm, slot=32763, gpa=65 << 30, size=PAGE))
    step("slot id 32764", lambda: _set(vm, slot=32764, gpa=66 << 30, size=PAGE))
    step("address space 1", lambda: _set(vm, slot=(1 << 16) | 9, gpa=67 << 30, size=PAGE))
    step("address space 2", lambda: _set(vm, slot=(2 << 16) | 9, gpa=67 << 30, size=PAGE))
    # Sanity checks of the fields.
    step("gpa unaligned", lambda: _set(vm, slot=10, gpa=(68 << 30) + 8, size=PAGE))
    step("size unaligned", lambda: _set(vm, slot=10, gpa=68 << 30, size=PAGE + 8))
    step("uaddr unaligned", lambda: _set(vm, slot=10, gpa=68 << 30, size=PAGE, uaddr=0x7F0000000008))
    step("gpa wraps", lambda: _set(vm, slot=10, gpa=(1 << 64) - PAGE, size=2 * PAGE))
    step("too many pages", lambda: _set(vm, slot=10, gpa=1 << 45, size=1 << 43))
    for end in (1 << 47, (1 << 47) - PAGE, (1 << 47) + PAGE, 1 << 56, 1 << 63):
        step(f"uaddr range ending at {end:#x}", lambda end=end: _set(vm, slot=11, gpa=70 << 30, size=SZ_2M, uaddr=end - SZ_2M))
        step("delete it", lambda: _set(vm, slot=11, gpa=0, size=0))
    step("v1 with guest_memfd flag", lambda: vm.ioctl(
        uapi.KVM_SET_USER_MEMORY_REGION,
        uapi.kvm_userspace_memory_region(slot=12, flags=G, guest_phys_addr=71 << 30, memory_size=PAGE,
                                         userspace_addr=0x7F0000000000)))
    step("v1 plain", lambda: vm.ioctl(
        uapi.KVM_SET_USER_MEMORY_REGION,
        uapi.kvm_userspace_memory_region(slot=12, flags=0, guest_phys_addr=71 << 30, memory_size=PAGE,
                                         userspace_addr=0x7F0000000000)))
    # Closing the file leaves the slot; a new binding to the same range of
    # a new file works.
    vm.close_gmem(gfd)
    gfd2 = vm.create_guest_memfd(SZ_2M, 0)
    step("bind after the first file closed", lambda: _set(vm, slot=13, gpa=72 << 30, size=SZ_2M, flags=G, gfd=gfd2))
    step("delete the orphaned slot", lambda: _set(vm, slot=0, gpa=0, size=0))
    vm.close_gmem(gfd2)
    other.close_gmem(ofd)
    other.close()
    vm.close()


# The VM ioctls the model knows, with their argument structs (None: the
# argument is an int), and numbers no x86 VM fd knows.
_VM_IOCTLS: list[tuple[str, int, type | None]] = [
    ("KVM_CHECK_EXTENSION", uapi.KVM_CHECK_EXTENSION, None),
    ("KVM_SET_USER_MEMORY_REGION", uapi.KVM_SET_USER_MEMORY_REGION, uapi.kvm_userspace_memory_region),
    ("KVM_SET_USER_MEMORY_REGION2", uapi.KVM_SET_USER_MEMORY_REGION2, uapi.kvm_userspace_memory_region2),
    ("KVM_CREATE_GUEST_MEMFD", uapi.KVM_CREATE_GUEST_MEMFD, uapi.kvm_create_guest_memfd),
    ("KVM_SET_MEMORY_ATTRIBUTES", uapi.KVM_SET_MEMORY_ATTRIBUTES, uapi.kvm_memory_attributes),
    ("KVM_ENABLE_CAP", uapi.KVM_ENABLE_CAP, uapi.kvm_enable_cap),
    ("v11 KVM_SET_MEMORY_ATTRIBUTES", uapi.KVM_SET_MEMORY_ATTRIBUTES_V11, uapi.kvm_memory_attributes),
    ("v11 KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES", uapi.KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES, ctypes.c_uint64),
    ("no such ioctl", 0xDEADBEEF, None),
    ("an unknown KVM number", 0x4008AEFF, None),
]


@scenario
def ioctl_arguments(kvm: Any, step: Steps) -> None:
    """Each VM ioctl with a NULL and a bad pointer (EFAULT where the kernel
    copies the argument in; ENOTTY first where the host's KVM was built
    without the ioctl, which reads nothing) and with a zeroed struct of its
    own size. Shorter buffers are left out: fcntl copies them into a
    1024-byte stack buffer whose tail the kernel reads as garbage."""
    vm = kvm.create_vm(0)
    for name, request, struct in _VM_IOCTLS:
        # KVM_CHECK_EXTENSION's int is a capability: 0 and 1 are the irqchip
        # and HLT, which the model does not answer (check_extension covers
        # the ones it does).
        for arg in (4096, 1 << 20) if struct is None and name == "KVM_CHECK_EXTENSION" else (0, 1, 4096):
            step(f"{name} with int {arg}", lambda request=request, arg=arg: vm.ioctl(request, arg))
        if struct is not None:
            step(f"{name} with a zeroed struct",
                 lambda request=request, struct=struct: vm.ioctl(request, bytearray(ctypes.sizeof(struct))))
    vm.close()


@scenario
def gpa_limit(kvm: Any, step: Steps) -> None:
    """kvm_mmu_max_gfn(): how far up guest-physical memory may reach, at
    each width a host can have (the host's MAXPHYADDR with TDP, else 52
    bits), for created, moved and changed slots."""
    vm = kvm.create_vm(0)
    uaddr = 1 << 30
    for bits in (36, 39, 46, 48, 52, 57, 63):
        top = 1 << bits
        step(f"last page below 2^{bits}", lambda top=top: _set(vm, slot=0, gpa=top - PAGE, size=PAGE, uaddr=uaddr))
        step(f"dirty logging on it (2^{bits})", lambda top=top: _set(vm, slot=0, gpa=top - PAGE, size=PAGE, uaddr=uaddr,
                                                                   flags=1))
        step(f"delete it (2^{bits})", lambda: _set(vm, slot=0, gpa=0, size=0))
        step(f"first page at 2^{bits}", lambda top=top: _set(vm, slot=0, gpa=top, size=PAGE, uaddr=uaddr))
        step(f"delete that (2^{bits})", lambda: _set(vm, slot=0, gpa=0, size=0))
        step(f"2M across 2^{bits}", lambda top=top: _set(vm, slot=0, gpa=top - SZ_2M // 2, size=SZ_2M, uaddr=uaddr))
        step(f"delete that too (2^{bits})", lambda: _set(vm, slot=0, gpa=0, size=0))
    step("a slot low down", lambda: _set(vm, slot=1, gpa=1 << 32, size=SZ_2M, uaddr=uaddr))
    for bits in (46, 48, 52):
        step(f"moved to end at 2^{bits}", lambda bits=bits: _set(vm, slot=1, gpa=(1 << bits) - SZ_2M, size=SZ_2M,
                                                                 uaddr=uaddr))
        step(f"moved to start at 2^{bits}", lambda bits=bits: _set(vm, slot=1, gpa=1 << bits, size=SZ_2M, uaddr=uaddr))
    gfd = step("create guest_memfd", lambda: vm.create_guest_memfd(SZ_2M, 0), value=False)
    if gfd is not None:
        step("bind it past 2^52", lambda: _set(vm, slot=2, gpa=1 << 52, size=SZ_2M, flags=G, gfd=gfd, uaddr=uaddr))
        step("bind it below 2^52", lambda: _set(vm, slot=2, gpa=(1 << 52) - 2 * SZ_2M, size=SZ_2M, flags=G, gfd=gfd,
                                                uaddr=uaddr))
        step("delete the bound slot", lambda: _set(vm, slot=2, gpa=0, size=0))
        vm.close_gmem(gfd)
    vm.close()


@scenario
def fallocate_modes(kvm: Any, step: Steps) -> None:
    vm = kvm.create_vm(0)
    gfd = step("create guest_memfd", lambda: vm.create_guest_memfd(SZ_2M, 0), value=False)
    if gfd is None:
        return
    for mode in range(0x100):
        step(f"mode {mode:#x}", lambda mode=mode: vm.fallocate(gfd, mode, 0, PAGE))
    for mode in (KEEP_SIZE, KEEP_SIZE | PUNCH_HOLE):
        for off, length in [(0, 0), (-PAGE, PAGE), (0, -PAGE), (1, PAGE), (0, 1), (SZ_2M - PAGE, PAGE),
                            (SZ_2M - PAGE, 2 * PAGE), (SZ_2M, PAGE), (1 << 40, PAGE), ((1 << 63) - PAGE, PAGE),
                            ((1 << 62), (1 << 62)), (0, SZ_2M)]:
            step(f"mode {mode:#x} [{off:#x} +{length:#x})",
                 lambda mode=mode, off=off, length=length: vm.fallocate(gfd, mode, off, length))
    # Punching a bound range, then closing the VM fd: the file still works.
    step("bind", lambda: _set(vm, slot=0, gpa=0, size=SZ_2M, flags=G, gfd=gfd))
    step("punch bound", lambda: vm.fallocate(gfd, KEEP_SIZE | PUNCH_HOLE, 0, SZ_2M))
    vm.close()
    step("allocate after VM fd close", lambda: vm.fallocate(gfd, KEEP_SIZE, 0, SZ_2M))
    step("punch after VM fd close", lambda: vm.fallocate(gfd, KEEP_SIZE | PUNCH_HOLE, 0, SZ_2M))
    vm.close_gmem(gfd)


@scenario
def memory_attributes(kvm: Any, step: Steps) -> None:
    vm = kvm.create_vm(0)
    step("plain slot", lambda: _set(vm, slot=0, gpa=0, size=SZ_2M))
    for attrs, flags, addr, size in [(0, 0, 0, PAGE), (uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, 0, 0, PAGE),
                                     (0, 1, 0, PAGE), (0, 0, 1, PAGE), (0, 0, 0, 0)]:
        a = uapi.kvm_memory_attributes(address=addr, size=size, attributes=attrs, flags=flags)
        step(f"KVM_SET_MEMORY_ATTRIBUTES {attrs:#x}/{flags:#x} [{addr:#x} +{size:#x})",
             lambda a=a: vm.ioctl(uapi.KVM_SET_MEMORY_ATTRIBUTES, a))
    # v11's ioctls were never merged.
    step("v11 KVM_SET_MEMORY_ATTRIBUTES", lambda: vm.ioctl(
        uapi.KVM_SET_MEMORY_ATTRIBUTES_V11, uapi.kvm_memory_attributes(address=0, size=PAGE)))
    step("v11 KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES", lambda: vm.ioctl(
        uapi.KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES, bytearray(8)))
    vm.close()


@scenario
def guest_memfd_mmap(kvm: Any, step: Steps) -> None:
    vm = kvm.create_vm(0)
    for flags in (0, MMAP, MMAP | INIT_SHARED, INIT_SHARED):
        gfd = step(f"create flags {flags:#x}", lambda flags=flags: vm.create_guest_memfd(4 * PAGE, flags), value=False)
        if gfd is None:
            continue
        for shared in (True, False):
            step(f"flags {flags:#x} mmap {'shared' if shared else 'private'}",
                 lambda gfd=gfd, shared=shared: vm.mmap_gmem(gfd, 4 * PAGE, shared, [0], False))
        # Pages 0-3 are the file; a mapping past its end faults with SIGBUS.
        step(f"flags {flags:#x} read pages", lambda gfd=gfd: vm.mmap_gmem(gfd, 6 * PAGE, True, [0, 3 * PAGE, 5 * PAGE], False))
        step(f"flags {flags:#x} write pages", lambda gfd=gfd: vm.mmap_gmem(gfd, 4 * PAGE, True, [PAGE, 2 * PAGE], True))
        # A page the child wrote is in the file (shared mapping); a punched
        # page reads back zero.
        step(f"flags {flags:#x} read back", lambda gfd=gfd: vm.mmap_gmem(gfd, 4 * PAGE, True, [PAGE], False))
        step(f"flags {flags:#x} punch", lambda gfd=gfd: vm.fallocate(gfd, KEEP_SIZE | PUNCH_HOLE, PAGE, PAGE))
        step(f"flags {flags:#x} read punched", lambda gfd=gfd: vm.mmap_gmem(gfd, 4 * PAGE, True, [PAGE, 2 * PAGE], False))
        vm.close_gmem(gfd)
    vm.close()


@scenario
def guest_memfd_file_ops(kvm: Any, step: Steps) -> None:
    vm = kvm.create_vm(0)
    for flags, size in ((0, PAGE), (MMAP | INIT_SHARED, 8 * PAGE), (MMAP, SZ_2M)):
        gfd = step(f"create flags {flags:#x}", lambda flags=flags, size=size: vm.create_guest_memfd(size, flags),
                   value=False)
        if gfd is None:
            continue
        for op in ("read", "write", "pread", "pwrite", "lseek", "ftruncate", "fsync", "ioctl", "fstat"):
            step(f"flags {flags:#x} {op}", lambda gfd=gfd, op=op: vm.file_op(gfd, op))
        step(f"flags {flags:#x} allocate", lambda gfd=gfd, size=size: vm.fallocate(gfd, KEEP_SIZE, 0, size))
        step(f"flags {flags:#x} fstat after allocate", lambda gfd=gfd: vm.file_op(gfd, "fstat"))
        vm.close_gmem(gfd)
    vm.close()


@scenario
def guest_memfd_close_with_mapping(kvm: Any, step: Steps) -> None:
    """A mapping holds the file (vma->vm_file): close(2) of the fd with a
    live mapping frees only the fd; reads and writes through the mapping
    keep working on the same page cache, and the release (unbinding the
    memslots) runs at the last munmap. The memslot binding itself holds no
    reference."""
    vm = kvm.create_vm(0)
    n = 4 * PAGE
    gfd = step("create MMAP|INIT_SHARED", lambda: vm.create_guest_memfd(n, MMAP | INIT_SHARED), value=False)
    if gfd is None:
        return
    step("bind slot 0", lambda: _set(vm, slot=0, gpa=0, size=n, flags=G, gfd=gfd))
    a = step("mmap a (6 pages: two past the end)", lambda: vm.map_gmem(gfd, 6 * PAGE), value=False)
    b = step("mmap b", lambda: vm.map_gmem(gfd, 2 * PAGE), value=False)
    if a is None or b is None:
        return
    data = b"guest_memfd outlives its fd"
    step("write through a", lambda: vm.map_access(a, PAGE - 5, len(data), data))
    step("close the fd", lambda: vm.close_gmem(gfd))
    # Right after the close (before anything else may reuse the number):
    # the fd is gone for every call that takes it.
    step("fallocate the closed fd", lambda: vm.fallocate(gfd, KEEP_SIZE | PUNCH_HOLE, 0, PAGE))
    step("fstat the closed fd", lambda: vm.file_op(gfd, "fstat"))
    step("bind the closed fd", lambda: _set(vm, slot=1, gpa=1 << 30, size=n, flags=G, gfd=gfd))
    # The mapping still works, on the same page cache.
    step("read back through a", lambda: vm.map_access(a, PAGE - 5, len(data)))
    step("read it through b", lambda: vm.map_access(b, PAGE - 5, len(data)))
    step("write through b", lambda: vm.map_access(b, 0, 3, b"abc"))
    step("read that through a", lambda: vm.map_access(a, 0, 4))
    step("a past the end of the file", lambda: vm.map_access(a, 5 * PAGE, 1))
    # The memslot is as it was: same range again, and a new file there.
    step("slot 0 again, same fields", lambda: _set(vm, slot=0, gpa=0, size=n, flags=G, gfd=gfd))
    step("new slot over slot 0's gpa", lambda: _set(vm, slot=1, gpa=0, size=n))
    gfd2 = step("create another file", lambda: vm.create_guest_memfd(n, MMAP | INIT_SHARED), value=False)
    step("bind it elsewhere", lambda: _set(vm, slot=2, gpa=1 << 30, size=n, flags=G, gfd=gfd2))
    step("bind it over slot 0's gpa", lambda: _set(vm, slot=3, gpa=0, size=n, flags=G, gfd=gfd2))
    step("munmap a", lambda: vm.munmap_gmem(a, 6 * PAGE))
    step("a after munmap", lambda: vm.map_access(a, 0, 1))
    step("b after a's munmap", lambda: vm.map_access(b, 0, 3))
    # The last reference: the file is released now.
    step("munmap b", lambda: vm.munmap_gmem(b, 2 * PAGE))
    step("b after munmap", lambda: vm.map_access(b, 0, 1))
    step("slot 0 after the release, same fields", lambda: _set(vm, slot=0, gpa=0, size=n, flags=G, gfd=gfd2))
    step("delete slot 0", lambda: _set(vm, slot=0, gpa=0, size=0))
    step("delete slot 2", lambda: _set(vm, slot=2, gpa=0, size=0))
    step("bind the other file at gpa 0", lambda: _set(vm, slot=0, gpa=0, size=n, flags=G, gfd=gfd2))
    # Deleting the slot while only a mapping holds the file (unbind on a
    # live, fd-less file), then the last munmap.
    gfd3 = step("create a third file", lambda: vm.create_guest_memfd(n, MMAP | INIT_SHARED), value=False)
    step("bind it", lambda: _set(vm, slot=4, gpa=2 << 30, size=n, flags=G, gfd=gfd3))
    c = step("mmap c", lambda: vm.map_gmem(gfd3, n), value=False)
    step("write through c", lambda: vm.map_access(c, 2 * PAGE, 4, b"wxyz"))
    step("close the third fd", lambda: vm.close_gmem(gfd3))
    step("delete its slot", lambda: _set(vm, slot=4, gpa=0, size=0))
    step("c after the slot went", lambda: vm.map_access(c, 2 * PAGE, 4))
    step("munmap c", lambda: vm.munmap_gmem(c, n))
    step("c after munmap", lambda: vm.map_access(c, 0, 1))
    # munmap first, close last: the close releases.
    gfd4 = step("create a fourth file", lambda: vm.create_guest_memfd(n, MMAP | INIT_SHARED), value=False)
    d = step("mmap d", lambda: vm.map_gmem(gfd4, n), value=False)
    step("write through d", lambda: vm.map_access(d, 0, 2, b"hi"))
    step("munmap d", lambda: vm.munmap_gmem(d, n))
    step("fstat the fourth fd", lambda: vm.file_op(gfd4, "fstat"))
    step("close the fourth fd", lambda: vm.close_gmem(gfd4))
    vm.close_gmem(gfd2)
    vm.close()


# --- running and comparing ----------------------------------------------------


def _run(name: str, backend: Any) -> list[tuple[str, tuple[str, Any]]]:
    step = Steps()
    try:
        SCENARIOS[name](backend, step)
    finally:
        backend.close()
    return step.log


def _compare(name: str) -> tuple[int, list[str]]:
    host = HostProfile.probe()
    live = _run(name, LiveKvm())
    model = _run(name, ModelKvm(host))
    assert [label for label, _ in live] == [label for label, _ in model], "the scenario ran differently"
    diffs = [f"{label}: kernel {k}, model {mo}" for (label, k), (_, mo) in zip(live, model, strict=True) if k != mo]
    return len(live), diffs


TALLY: dict[str, tuple[int, int]] = {}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_live_agrees(name: str) -> None:
    n, diffs = _compare(name)
    TALLY[name] = (n, n - len(diffs))
    assert not diffs, "\n".join(diffs)


def test_zz_tally(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the agreement count of the scenarios run above."""
    n = sum(t for t, _ in TALLY.values())
    agree = sum(a for _, a in TALLY.values())
    with capsys.disabled():
        print(f"\nlive /dev/kvm vs model ({HostProfile.probe().name}): {len(TALLY)} scenarios, "
              f"{n} steps, {agree} agree")


def iter_scenarios() -> Iterator[str]:
    yield from SCENARIOS
