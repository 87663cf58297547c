"""Traces carrying the in-place API: OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2
(KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd) recorded by the Recorder,
written and read back (binary and text), validated, and replayed (per call;
the native batch stops at it). The replayed end state is checked against a
per-page numpy model painted from the calls that succeeded."""

from __future__ import annotations

import errno
import random

import numpy as np
import pytest

import memattr as m
from memattr import trace as t

P = m.KVM_MEMORY_ATTRIBUTE_PRIVATE
PG = m.PAGE_SIZE
NPAGES = 256
FLAGS = m.GUEST_MEMFD_FLAG_MMAP | m.GUEST_MEMFD_FLAG_INIT_SHARED


def _session(seed: int = 0) -> tuple[m.Trace, np.ndarray]:
    """A recorded conversion loop on the in-place API and the per-page
    attributes it leaves (painted here from the calls that succeeded)."""
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, "mapletree", semantics="gmem-inplace")
    rec = t.Recorder(vm, {"name": "inplace", "vm_kwargs": {"semantics": "gmem-inplace"}})
    fd = rec.create_guest_memfd(NPAGES * PG, FLAGS)
    rec.set_user_memory_region(0, 0x100000, NPAGES * PG, 0x7F0000000000, m.KVM_MEM_GUEST_MEMFD, fd, 0)
    want = np.zeros(NPAGES, dtype=np.uint64)  # INIT_SHARED: every page shared
    rng = random.Random(seed)
    for _ in range(200):
        a = rng.randrange(NPAGES)
        b = rng.randrange(a + 1, min(NPAGES, a + 32) + 1)
        attrs = rng.choice((0, P))
        rec.guest_memfd_set_memory_attributes(fd, a * PG, (b - a) * PG, attrs)
        want[a:b] = attrs
        if rng.random() < 0.2:
            rec.fault(0x100000 + a * PG, private=bool(attrs))
    with pytest.raises(OSError) as e:  # unaligned: EINVAL, recorded as such
        rec.guest_memfd_set_memory_attributes(fd, 1, PG, P)
    assert e.value.errno == errno.EINVAL
    return rec.trace(), want


def _pages(vm: m.Vm, fd: int) -> np.ndarray:
    got = np.zeros(NPAGES, dtype=np.uint64)
    for s, e, v in vm.guest_memfd_attributes(fd):
        got[s:e] = v
    return got


def test_in_place_records_round_trip_binary_and_text(tmp_path):
    tr, _ = _session()
    kinds = tr.ops["kind"]
    assert (kinds == t.OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2).sum() == 201
    assert tr.ops["result"][-1] == -errno.EINVAL
    for name, text in (("x.trace", False), ("x.txt", True)):
        t.write(tr, tmp_path / name, text=text)
        back = t.read(tmp_path / name)
        assert (back.ops == tr.ops).all()
    text = (tmp_path / "x.txt").read_text()
    assert "guest_memfd_set_memory_attributes2 fd=" in text
    assert tr.counts()["guest_memfd_set_memory_attributes2"] == 201


@pytest.mark.parametrize("engine", ["python", "auto"])
@pytest.mark.parametrize("store", ["mapletree", "rangetree", "xarray"])
def test_replay_of_in_place_records_ends_in_the_models_state(engine, store):
    tr, want = _session(seed=3)
    vm = m.Vm(tr.vm_type, store, semantics="gmem-inplace")
    res = m.replay(tr, vm, engine=engine, check=True)
    assert res.mismatches == 0 and not res.unexpected_errors
    assert res.expected_errors == {"EINVAL": 1}
    (fd,) = [f[0] for f in vm.guest_memfds()]
    assert (_pages(vm, fd) == want).all()


def test_validation_of_in_place_records():
    tr, _ = _session()
    ops = tr.ops.copy()
    i = int(np.flatnonzero(ops["kind"] == t.OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2)[0])
    ops["flags"][i] = 1
    with pytest.raises(t.TraceFormatError, match="flags are only defined for fault"):
        t.Trace(ops, dict(tr.meta)).validate()
    # aux (the fd) is allowed on this kind, still not on the others
    ops = tr.ops.copy()
    j = int(np.flatnonzero(ops["kind"] == t.OP_FAULT)[0])
    ops["aux"][j] = 1
    with pytest.raises(t.TraceFormatError, match="aux is only defined"):
        t.Trace(ops, dict(tr.meta)).validate()
    with pytest.raises(t.TraceFormatError):
        t.parse_text(["guest_memfd_set_memory_attributes2 fd=1 offset=0 size=0x1000 attributes=0x8 flags=0x10000"])
    ops = tr.ops.copy()
    ops["attributes"][i] = 1 << 32
    with pytest.raises(t.TraceFormatError, match="fd must fit in 32 bits"):
        t.Trace(ops, dict(tr.meta)).validate()


def test_recorder_refuses_flags_the_trace_cannot_hold():
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, "mapletree", semantics="gmem-inplace")
    rec = t.Recorder(vm)
    with pytest.raises(ValueError, match="0xffff"):
        rec.guest_memfd_set_memory_attributes(3, 0, PG, P, 1 << 16)
    assert len(rec.trace()) == 0
