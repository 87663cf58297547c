"""Both stores behave identically through the Vm: results, errnos, stats and
hook sequences, on random streams of memslot, attribute and fault operations
(hypothesis stateful test), checked against a per-page numpy reference."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import memattr as m

P = m.KVM_MEMORY_ATTRIBUTE_PRIVATE
NPAGES = 0x1000  # a 16 MiB guest-physical window where everything happens
PAGE = m.PAGE_SIZE

gfns = st.integers(0, NPAGES)
page_counts = st.integers(1, 0x600)


def outcome(fn: Any, *args: Any, **kw: Any) -> tuple[str, object]:
    try:
        return ("ok", fn(*args, **kw))
    except m.MemoryFault as e:
        return ("memfault", (e.gpa, e.size, e.flags))
    except OSError as e:
        return ("errno", e.errno)
    except (ValueError, TypeError) as e:
        return (type(e).__name__, None)


class TwoStores(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vms = [m.Vm(m.KVM_X86_SW_PROTECTED_VM, s) for s in ("rangetree", "xarray")]  # type: ignore[arg-type]
        self.logs: list[list[tuple[object, ...]]] = [[], []]
        self.fds: list[list[int]] = [[], []]
        self.ref = np.zeros(NPAGES, dtype=np.uint64)
        for vm, log in zip(self.vms, self.logs):
            self._hook(vm, log)

    @staticmethod
    def _hook(vm: m.Vm, log: list[tuple[object, ...]]) -> None:
        def entry(kind: str, r: m.GfnRange) -> tuple[object, ...]:
            return (
                kind,
                r.slot.as_id,
                r.slot.id,
                r.start,
                r.end,
                r.attributes,
                vm.mmu_invalidate_in_progress,
                vm.mmu_invalidate_seq,
            )

        vm.on_unmap(lambda r: log.append(entry("unmap", r)) or r.npages % 3 == 0)
        vm.on_post_set(lambda r: log.append(entry("post", r)))

    def both(self, name: str, *args: Any, **kw: Any) -> tuple[str, object]:
        results = [outcome(getattr(vm, name), *args, **kw) for vm in self.vms]
        assert results[0] == results[1], (name, args, results)
        assert self.logs[0] == self.logs[1], (name, args)
        return results[0]

    @rule(start=gfns, n=page_counts, attrs=st.sampled_from([0, P, 0, P, 1, P | 1 << 40]),
          flags=st.sampled_from([0, 0, 0, 0, 0, 1]), misalign=st.sampled_from([0] * 9 + [0x800]))
    def set_attributes(self, start: int, n: int, attrs: int, flags: int, misalign: int) -> None:
        res = self.both("set_memory_attributes", start * PAGE + misalign, n * PAGE, attrs, flags)
        valid = flags == 0 and attrs & ~P == 0 and misalign == 0
        assert (res[0] == "ok") == valid, res
        if valid:
            self.ref[start : min(start + n, NPAGES)] = attrs

    # Edges of the u64 space (the xarray store is per page: sizes stay small).
    @rule(edge=st.sampled_from([
        ((1 << 64) - PAGE, PAGE),  # ends exactly at 2**64: wraps, EINVAL
        ((1 << 64) - 2 * PAGE, PAGE),  # the last settable page
        (1 << 63, 4 * PAGE),
        (0, 0),  # size 0
        (PAGE, (1 << 64) - PAGE),  # wraps
    ]))
    def set_attributes_edges(self, edge: tuple[int, int]) -> None:
        address, size = edge
        res = self.both("set_memory_attributes", address, size, P)
        if res[0] == "ok" and address < NPAGES * PAGE:
            end = min((address + size) // PAGE, NPAGES)
            self.ref[address // PAGE : end] = P

    @rule(size_pages=st.integers(1, 0x800), flags=st.sampled_from([0, 0, 0, 1]))
    def create_guest_memfd(self, size_pages: int, flags: int) -> None:
        results = [outcome(vm.create_guest_memfd, size_pages * PAGE, flags) for vm in self.vms]
        assert [r[0] for r in results] == [results[0][0]] * 2
        if results[0][0] == "ok":
            for fds, r in zip(self.fds, results):
                fds.append(r[1])  # type: ignore[arg-type]

    @rule(slot=st.integers(0, 5), start=gfns, n=st.integers(0, 0x800),
          gmem=st.booleans(), fd_index=st.integers(0, 7), offset=st.integers(0, 0x400),
          flags=st.sampled_from([0, 0, m.uapi.KVM_MEM_LOG_DIRTY_PAGES, m.uapi.KVM_MEM_READONLY]))
    def set_region(self, slot: int, start: int, n: int, gmem: bool, fd_index: int,
                   offset: int, flags: int) -> None:
        results = []
        for vm, fds in zip(self.vms, self.fds):
            fd = fds[fd_index] if fd_index < len(fds) else -1
            fl = flags | (m.KVM_MEM_GUEST_MEMFD if gmem else 0)
            results.append(outcome(vm.set_user_memory_region, slot, start * PAGE, n * PAGE,
                                   0, fl, fd, offset * PAGE))
        assert results[0] == results[1], results
        assert self.logs[0] == self.logs[1]

    @rule(gfn=gfns, private=st.booleans())
    def fault(self, gfn: int, private: bool) -> None:
        self.both("fault", gfn * PAGE, private=private)

    @rule(start=gfns, n=st.integers(0, 0x800), attrs=st.sampled_from([0, P]),
          mask=st.sampled_from([2**64 - 1, P, 0, 1]))
    def query(self, start: int, n: int, attrs: int, mask: int) -> None:
        end = min(start + n, NPAGES)
        res = self.both("range_has_attributes", start, end, attrs, mask)
        want = bool(np.all((self.ref[start:end] & np.uint64(mask)) == np.uint64(attrs & mask)))
        assert res == ("ok", want)

    @precondition(lambda self: len(self.vms[0].memslots) > 0)
    @rule(data=st.data())
    def hugepage_flags(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(list(self.vms[0].memslots)))
        gfn = data.draw(st.integers(slot.base_gfn, slot.end_gfn - 1))
        level = data.draw(st.sampled_from([2, 3]))
        self.both("hugepage_mixed", slot.slot, gfn, level)
        self.both("max_mapping_level", gfn)

    @invariant()
    def same_state(self) -> None:
        a, b = self.vms
        want = [(s, e, v) for s, e, v in _runs(self.ref)]
        assert list(a.store.runs(0, NPAGES)) == want
        assert list(b.store.runs(0, NPAGES)) == want
        assert a.stats.as_dict() == b.stats.as_dict()
        assert (a.mmu_invalidate_seq, a.mmu_invalidate_in_progress) == (
            b.mmu_invalidate_seq,
            b.mmu_invalidate_in_progress,
        )
        assert a.mmu_invalidate_in_progress == 0
        assert not a.mmu_lock.locked() and not a.slots_lock.locked()
        assert [(s.slot, s.base_gfn, s.npages, s.flags) for s in a.memslots] == [
            (s.slot, s.base_gfn, s.npages, s.flags) for s in b.memslots
        ]


def _runs(arr: np.ndarray) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(arr) + 1):
        if i == len(arr) or arr[i] != arr[start]:
            out.append((start, i, int(arr[start])))
            start = i
    return out


TwoStores.TestCase.settings = settings(
    max_examples=int(os.environ.get("MEMATTR_STATEFUL_EXAMPLES", "40")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_both_stores_identical = TwoStores.TestCase
