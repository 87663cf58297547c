"""Random programs on the running kernel and on the model, step by step.

``tests/test_live_kvm.py`` runs hand-written scenarios on /dev/kvm and on the
model configured as this host; this module runs programs that hypothesis
draws: memslot changes (both ioctls, every address space), guest_memfd
creation, binding, fallocate, fstat and the fd's other file operations,
close, and mappings of the files
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

import collections
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_live_kvm as live
from memattr import uapi
from memattr.host import HostProfile

from test_live_kvm import INIT_SHARED, MMAP, PAGE, SZ_2M, G
from test_live_kvm import KEEP_SIZE as KEEP
from test_live_kvm import PUNCH_HOLE as PUNCH

pytestmark = live.pytestmark

# A number no file can have (above any RLIMIT_NOFILE, and never one of the
# model's): what a step names when its file is closed or was never created,
# since a real closed fd number may be reused by the next open.
NO_FD = 1 << 24

def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Three draws in four from ``valid``: a program whose calls mostly
    fail checks the first check, and little of the state behind it."""
    # One list, each valid value repeated: hypothesis picks the branches of
    # a one_of far more evenly than their count would say.
    k = max(1, -(-3 * len(invalid) // len(valid)))
    return st.sampled_from(valid * k + invalid)


SLOTS = mostly([0, 1, 2, 3], [32763, 32764, (1 << 16) | 0, (1 << 16) | 1, (2 << 16) | 0])
GPAS = mostly([0, SZ_2M, 2 * SZ_2M, 1 << 30, (1 << 30) + PAGE, (1 << 52) - 2 * SZ_2M],
              [8, (1 << 52) - PAGE, 1 << 52, (1 << 64) - SZ_2M])
SIZES = mostly([PAGE, 2 * PAGE, SZ_2M, 2 * SZ_2M, SZ_2M + PAGE], [0, 8, 1 << 30, 1 << 43])
UADDRS = mostly([0x7F0000000000, 0x7E0000000000], [0x7F0000000008, 0, (1 << 47) - SZ_2M, 1 << 47])
SLOT_FLAGS = mostly([0, uapi.KVM_MEM_LOG_DIRTY_PAGES, G], [uapi.KVM_MEM_READONLY, G | 1, G | 2, 1 << 3, 3])
OFFSETS = mostly([0, PAGE, SZ_2M], [SZ_2M - PAGE, 2 * SZ_2M, 0x800, (1 << 63) - PAGE, (1 << 64) - PAGE])
# File sizes stay small where they are valid: fallocate really allocates.
GMEM_SIZES = mostly([PAGE, 2 * PAGE, SZ_2M, 2 * SZ_2M], [0, PAGE + 1, 1 << 63, 1 << 40])
GMEM_FLAGS = mostly([0, MMAP, MMAP | INIT_SHARED], [INIT_SHARED, 1 << 2])
FALLOC_MODES = mostly([KEEP, KEEP | PUNCH], [0, PUNCH, KEEP | 0x10, 0x10])
FALLOC_SPANS = mostly([(0, PAGE), (0, SZ_2M), (PAGE, PAGE), (SZ_2M - PAGE, 2 * PAGE), (0, 2 * SZ_2M)],
                      [(0, 0), (1, PAGE), (-PAGE, PAGE), (SZ_2M, PAGE), (2 * SZ_2M - PAGE, PAGE)])
MAP_PAGES = st.sampled_from([1, 2, 4, 600])
ACCESS_OFFSETS = st.sampled_from([0, PAGE - 2, PAGE, SZ_2M - 1, SZ_2M, 3 * PAGE])

# Which of the files still open (or of the mappings) the program has made,
# counted modulo how many there are, so most steps name one; -1 names none
# (a closed fd, as far as the call can tell).
HANDLE = mostly([0, 1, 2, 3], [-1])

region = st.tuples(
    st.just("region"), st.integers(0, 1), st.booleans(), SLOTS, GPAS, SIZES, UADDRS, SLOT_FLAGS,
    st.one_of(st.none(), HANDLE), OFFSETS,
)
# A slot the program made, again at another gpa and with dirty logging
# flipped or not: a move, or a flags change, of a live slot (the region op
# alone rarely repeats a slot's size and user address).
move = st.tuples(st.just("move"), st.integers(0, 1), SLOTS, GPAS, st.booleans())
create = st.tuples(st.just("create"), st.integers(0, 1), GMEM_SIZES, GMEM_FLAGS)
fallocate = st.tuples(st.just("fallocate"), HANDLE, FALLOC_MODES, FALLOC_SPANS)
fstat = st.tuples(st.just("fstat"), HANDLE)
# The fd's other file operations (guest_memfd refuses them all, each with
# its errno): on open, closed and never-made files.
file_op = st.tuples(st.just("file_op"), HANDLE,
                    st.sampled_from(["read", "write", "pread", "pwrite", "lseek", "ftruncate", "fsync", "ioctl"]))
close = st.tuples(st.just("close"), HANDLE)
map_ = st.tuples(st.just("map"), HANDLE, MAP_PAGES)
access = st.tuples(st.just("access"), HANDLE, ACCESS_OFFSETS, st.booleans())
unmap = st.tuples(st.just("unmap"), HANDLE)
attributes = st.tuples(
    st.just("attributes"), st.integers(0, 1), st.sampled_from([0, PAGE, 8]), st.sampled_from([0, PAGE, SZ_2M]),
    st.sampled_from([0, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE, 1]), st.sampled_from([0, 1]),
)
# Creating and binding files come first in weight: most of what the kernel
# checks needs a file, and a binding needs a slot change.
op = st.one_of(create, create, region, region, region, move, move, fallocate, fstat, file_op, close, map_, access,
               unmap, attributes)
# A few files first, so that the calls after have some to name.
program = st.builds(lambda files, ops: files + ops, st.lists(create, min_size=1, max_size=3),
                    st.lists(op, min_size=8, max_size=60))


class _Run:
    """One program on one backend: its VMs, files and mappings."""

    def __init__(self, kvm: Any) -> None:
        self.kvm = kvm
        self.vms = [kvm.create_vm(0), kvm.create_vm(0)]
        self.files: list[tuple[int, int | None]] = []  # (owning VM, fd or None once closed)
        self.maps: list[tuple[Any, int] | None] = []  # (mapping, length) or None once unmapped
        # (vm, slot) -> the fields of the last call that made or changed it
        self.slots: dict[tuple[int, int], dict[str, int]] = {}
        self.step = live.Steps()

    def file(self, h: int) -> int | None:
        """The index of the open file handle ``h`` names (counted among
        the open ones), if any."""
        live_files = [i for i, (_, fd) in enumerate(self.files) if fd is not None]
        return live_files[h % len(live_files)] if h >= 0 and live_files else None

    def owner(self, h: int) -> Any:
        """The VM whose call made file ``h`` (the model reaches a file's
        calls through its VM; the kernel's fds are the process's)."""
        i = self.file(h)
        return self.vms[0] if i is None else self.vms[self.files[i][0]]

    def fd(self, h: int | None) -> int:
        """File ``h``'s fd: -1 for None, NO_FD if it names none or a closed one."""
        if h is None:
            return -1
        i = self.file(h)
        return NO_FD if i is None else self.files[i][1]  # type: ignore[return-value]

    def mapping(self, h: int) -> int | None:
        """The index of the live mapping handle ``h`` names (counted among
        the live ones, as files are), if any."""
        live_maps = [i for i, mp in enumerate(self.maps) if mp is not None]
        return live_maps[h % len(live_maps)] if h >= 0 and live_maps else None

    def set_region(self, label: str, v: int, fields: dict[str, int], v1: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (or the first ioctl, with the fields
        it has), remembering the slot's fields if it took them (forgetting
        the slot if the size was 0)."""
        vm = self.vms[v]
        if v1:
            r = uapi.kvm_userspace_memory_region(slot=fields["slot"], flags=fields["flags"],
                                                 guest_phys_addr=fields["gpa"], memory_size=fields["size"],
                                                 userspace_addr=fields["uaddr"])
            ok = self.step(label, lambda: vm.ioctl(uapi.KVM_SET_USER_MEMORY_REGION, r)) is not None
        else:
            ok = self.step(label, lambda: live._set(vm, **fields)) is not None
        if ok:
            key = (v, fields["slot"])
            if fields["size"]:
                self.slots[key] = fields
            else:
                self.slots.pop(key, None)

    def run(self, i: int, o: tuple[Any, ...]) -> None:
        step, kind = self.step, o[0]
        label = f"{i}: {o}"
        if kind == "region":
            _, v, v1, slot, gpa, size, uaddr, flags, h, offset = o
            fields = dict(slot=slot, gpa=gpa, size=size, uaddr=uaddr, flags=flags, gfd=self.fd(h), offset=offset)
            self.set_region(label, v, fields, v1)
        elif kind == "move":
            _, v, slot, gpa, flip = o
            if (v, slot) in self.slots:
                fields = dict(self.slots[v, slot], gpa=gpa)
                fields["flags"] ^= uapi.KVM_MEM_LOG_DIRTY_PAGES if flip else 0
                self.set_region(label, v, fields)
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
        elif kind == "file_op":
            _, h, name = o
            vm, fd = self.owner(h), self.fd(h)
            step(label, lambda: vm.file_op(fd, name))
        elif kind == "close":
            i = self.file(o[1])
            if i is not None:
                v, fd = self.files[i]
                step(label, lambda: self.vms[v].close_gmem(fd))
                self.files[i] = (v, None)
        elif kind == "map":
            _, h, pages = o
            vm, fd = self.owner(h), self.fd(h)
            mp = step(label, lambda: vm.map_gmem(fd, pages * PAGE), value=False)
            if mp is not None:
                self.maps.append((mp, pages * PAGE))
        elif kind == "access":
            _, h, off, write = o
            i = self.mapping(h)
            if i is not None:
                mp, length = self.maps[i]  # type: ignore[misc]
                if off < length:
                    n = min(2, length - off)
                    data = b"\xa5" * n if write else None
                    step(label, lambda: self.vms[0].map_access(mp, off, n, data))
        elif kind == "unmap":
            i = self.mapping(o[1])
            if i is not None:
                mp, length = self.maps[i]  # type: ignore[misc]
                step(label, lambda: self.vms[0].munmap_gmem(mp, length))
                self.maps[i] = None
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
STEPS = [0, 0]  # programs that agreed, their steps (for the summary line)
DISAGREED = [0]  # programs that did not (hypothesis reruns a failure while it shrinks)
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()  # (call, "ok" or errno) -> steps


# Four times the profile's examples: a program takes milliseconds.
@settings(max_examples=4 * settings().max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program)
def test_random_programs_agree(prog: list[tuple[Any, ...]]) -> None:
    kernel = _run(live.LiveKvm(), prog)
    model = _run(live.ModelKvm(HOST), prog)  # type: ignore[arg-type]
    for label, (kind, value) in kernel:
        OUTCOMES[label.split("'")[1], "ok" if kind == "ok" else str(value)] += 1
    DISAGREED[0] += 1
    assert [label for label, _ in kernel] == [label for label, _ in model], "the program ran differently"
    for (label, k), (_, mo) in zip(kernel, model, strict=True):
        assert k == mo, f"step {label}: kernel {k}, model {mo}"
    DISAGREED[0] -= 1
    STEPS[0] += 1
    STEPS[1] += len(kernel)


def test_zz_random_tally(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints how many random programs and steps were compared above."""
    with capsys.disabled():
        verdict = "all agree" if DISAGREED[0] == 0 else f"and {DISAGREED[0]} runs of programs that DISAGREE (see the failure)"
        print(f"\nlive /dev/kvm vs model, random programs: {STEPS[0]} programs, {STEPS[1]} steps agree, {verdict}")
        calls = sorted({call for call, _ in OUTCOMES})
        for call in calls:
            got = ", ".join(f"{o} {n}" for (c, o), n in sorted(OUTCOMES.items()) if c == call)
            print(f"  {call}: {got}")
