"""Random programs on the running kernel and on the model, step by step.

``tests/test_live_kvm.py`` runs hand-written scenarios on /dev/kvm and on the
model configured as this host; this module runs programs that hypothesis
draws: memslot changes (both ioctls, every address space), guest_memfd
creation, binding, fallocate, fstat, close, and mappings of the files
(mmap, accesses, munmap), over two VMs. Every argument comes from a small
pool around the boundaries the kernel checks (alignment, wrap-around, file
size, slot ids, flags), so most programs mix accepted and refused calls and
the state each call sees depends on the calls before it.

Every step's result, a value or an errno, must be the same on both. The
kernel is the oracle: the model holds no copy of it, and a disagreement is
shrunk by hypothesis to a short program, printed with the first step that
differs. Skipped, like the scenarios, where /dev/kvm is missing or
unusable; ``HYPOTHESIS_PROFILE=thorough`` runs many more programs.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_live_kvm as live
from memattr import uapi
from memattr.host import HostProfile

PAGE = live.PAGE
SZ_2M = live.SZ_2M
G = uapi.KVM_MEM_GUEST_MEMFD
KEEP = uapi.FALLOC_FL_KEEP_SIZE
PUNCH = uapi.FALLOC_FL_PUNCH_HOLE
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED

pytestmark = live.pytestmark

# A number no file can have (above any RLIMIT_NOFILE, and never one of the
# model's): what a step names when its file is closed or was never created,
# since a real closed fd number may be reused by the next open.
NO_FD = 1 << 24

SLOTS = [0, 1, 2, 3, 32763, 32764, (1 << 16) | 0, (1 << 16) | 1, (2 << 16) | 0]
GPAS = [0, SZ_2M, 2 * SZ_2M, 1 << 30, (1 << 30) + PAGE, 8, (1 << 52) - 2 * SZ_2M, (1 << 64) - SZ_2M]
SIZES = [0, PAGE, 2 * PAGE, SZ_2M, 2 * SZ_2M, SZ_2M + PAGE, 8, 1 << 30, 1 << 43]
UADDRS = [0x7F0000000000, 0x7F0000000008, 0, (1 << 47) - SZ_2M, 1 << 47]
SLOT_FLAGS = [0, uapi.KVM_MEM_LOG_DIRTY_PAGES, uapi.KVM_MEM_READONLY, G, G | 1, G | 2, 1 << 3, 3]
OFFSETS = [0, PAGE, SZ_2M - PAGE, SZ_2M, 2 * SZ_2M, 0x800, (1 << 63) - PAGE, (1 << 64) - PAGE]
# File sizes stay small where they are valid: fallocate really allocates.
GMEM_SIZES = [0, PAGE, 2 * PAGE, SZ_2M, 2 * SZ_2M, PAGE + 1, 1 << 63, 1 << 40]
GMEM_FLAGS = [0, MMAP, INIT_SHARED, MMAP | INIT_SHARED, 1 << 2]
FALLOC_MODES = [0, KEEP, KEEP | PUNCH, PUNCH, KEEP | 0x10, 0x10]
FALLOC_SPANS = [(0, PAGE), (0, SZ_2M), (PAGE, PAGE), (SZ_2M - PAGE, 2 * PAGE), (0, 0), (1, PAGE),
                (-PAGE, PAGE), (SZ_2M, PAGE), (2 * SZ_2M - PAGE, PAGE), (0, 2 * SZ_2M)]
MAP_PAGES = [1, 2, 4, 600]
ACCESS_OFFSETS = [0, PAGE - 2, PAGE, SZ_2M - 1, SZ_2M, 3 * PAGE]

HANDLE = st.integers(0, 5)  # the i-th file or mapping the program made, if any

region = st.tuples(
    st.just("region"), st.integers(0, 1), st.booleans(), st.sampled_from(SLOTS), st.sampled_from(GPAS),
    st.sampled_from(SIZES), st.sampled_from(UADDRS), st.sampled_from(SLOT_FLAGS),
    st.one_of(st.none(), HANDLE), st.sampled_from(OFFSETS),
)
create = st.tuples(st.just("create"), st.integers(0, 1), st.sampled_from(GMEM_SIZES), st.sampled_from(GMEM_FLAGS))
fallocate = st.tuples(st.just("fallocate"), HANDLE, st.sampled_from(FALLOC_MODES), st.sampled_from(FALLOC_SPANS))
fstat = st.tuples(st.just("fstat"), HANDLE)
close = st.tuples(st.just("close"), HANDLE)
map_ = st.tuples(st.just("map"), HANDLE, st.sampled_from(MAP_PAGES))
access = st.tuples(st.just("access"), HANDLE, st.sampled_from(ACCESS_OFFSETS), st.booleans())
unmap = st.tuples(st.just("unmap"), HANDLE)
attributes = st.tuples(
    st.just("attributes"), st.integers(0, 1), st.sampled_from([0, PAGE, 8]), st.sampled_from([0, PAGE, SZ_2M]),
    st.sampled_from([0, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, 1]), st.sampled_from([0, 1]),
)
# Creating and binding files come first in weight: most of what the kernel
# checks needs a file, and a binding needs a slot change.
op = st.one_of(create, region, region, fallocate, fstat, close, map_, access, unmap, attributes)
program = st.lists(op, min_size=8, max_size=60)


class _Run:
    """One program on one backend: its VMs, files and mappings."""

    def __init__(self, kvm: Any) -> None:
        self.kvm = kvm
        self.vms = [kvm.create_vm(0), kvm.create_vm(0)]
        self.files: list[tuple[int, int | None]] = []  # (owning VM, fd or None once closed)
        self.maps: list[tuple[Any, int] | None] = []  # (mapping, length) or None once unmapped
        self.step = live.Steps()

    def owner(self, h: int) -> Any:
        """The VM whose call made file ``h`` (the model reaches a file's
        calls through its VM; the kernel's fds are the process's)."""
        return self.vms[self.files[h][0]] if h < len(self.files) else self.vms[0]

    def fd(self, h: int | None) -> int:
        if h is None:
            return -1
        if h < len(self.files) and self.files[h][1] is not None:
            return self.files[h][1]  # type: ignore[return-value]
        return NO_FD

    def run(self, i: int, o: tuple[Any, ...]) -> None:
        step, kind = self.step, o[0]
        label = f"{i}: {o}"
        if kind == "region":
            _, v, v1, slot, gpa, size, uaddr, flags, h, offset = o
            vm = self.vms[v]
            if v1:
                r = uapi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                     memory_size=size, userspace_addr=uaddr)
                step(label, lambda: vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, r))
            else:
                fd = self.fd(h)
                step(label, lambda: live._set(vm, slot=slot, gpa=gpa, size=size, uaddr=uaddr, flags=flags,
                                              gfd=fd, offset=offset))
        elif kind == "create":
            _, v, size, flags = o
            fd = step(label, lambda: self.vms[v].create_guest_memfd(size, flags), value=False)
            if fd is not None:
                self.files.append((v, fd))
        elif kind == "fallocate":
            _, h, mode, (off, length) = o
            vm, fd = self.owner(h), self.fd(h)
            step(label, lambda: vm.fallocate(fd, mode, off, length))
        elif kind == "fstat":
            vm, fd = self.owner(o[1]), self.fd(o[1])
            step(label, lambda: vm.file_op(fd, "fstat"))
        elif kind == "close":
            h = o[1]
            if h < len(self.files) and self.files[h][1] is not None:
                v, fd = self.files[h]
                step(label, lambda: self.vms[v].close_gmem(fd))
                self.files[h] = (v, None)
        elif kind == "map":
            _, h, pages = o
            vm, fd = self.owner(h), self.fd(h)
            mp = step(label, lambda: vm.map_gmem(fd, pages * PAGE), value=False)
            if mp is not None:
                self.maps.append((mp, pages * PAGE))
        elif kind == "access":
            _, h, off, write = o
            if h < len(self.maps) and self.maps[h] is not None:
                mp, length = self.maps[h]  # type: ignore[misc]
                if off < length:
                    n = min(2, length - off)
                    data = b"\xa5" * n if write else None
                    step(label, lambda: self.vms[0].map_access(mp, off, n, data))
        elif kind == "unmap":
            h = o[1]
            if h < len(self.maps) and self.maps[h] is not None:
                mp, length = self.maps[h]  # type: ignore[misc]
                step(label, lambda: self.vms[0].munmap_gmem(mp, length))
                self.maps[h] = None
        elif kind == "attributes":
            _, v, address, size, attrs, flags = o
            a = uapi.kvm_memory_attributes(address=address, size=size, attributes=attrs, flags=flags)
            step(label, lambda: self.vms[v].ioctl(uapi.KVM_SET_MEMORY_ATTRIBUTES, a))
        else:  # pragma: no cover - the strategies make no other kind
            raise AssertionError(kind)

    def finish(self) -> None:
        for m in self.maps:
            if m is not None:
                self.vms[0].munmap_gmem(*m)
        for v, fd in self.files:
            if fd is not None:
                self.vms[v].close_gmem(fd)
        for vm in self.vms:
            vm.close()
        self.kvm.close()


def _run(kvm: Any, prog: list[tuple[Any, ...]]) -> list[tuple[str, tuple[str, Any]]]:
    r = _Run(kvm)
    try:
        for i, o in enumerate(prog):
            r.run(i, o)
    finally:
        r.finish()
    return r.step.log


HOST = HostProfile.probe() if live._UNUSABLE is None else None
STEPS = [0, 0]  # programs run, steps compared (for the summary line)


# Four times the profile's examples: a program takes milliseconds.
@settings(max_examples=4 * settings().max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program)
def test_random_programs_agree(prog: list[tuple[Any, ...]]) -> None:
    kernel = _run(live.LiveKvm(), prog)
    model = _run(live.ModelKvm(HOST), prog)  # type: ignore[arg-type]
    STEPS[0] += 1
    STEPS[1] += len(kernel)
    assert [label for label, _ in kernel] == [label for label, _ in model], "the program ran differently"
    for (label, k), (_, mo) in zip(kernel, model, strict=True):
        assert k == mo, f"step {label}: kernel {k}, model {mo}"


def test_zz_random_tally(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints how many random programs and steps were compared above."""
    with capsys.disabled():
        print(f"\nlive /dev/kvm vs model, random programs: {STEPS[0]} programs, {STEPS[1]} steps, all agree")
