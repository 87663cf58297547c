"""Every KVM memory-attribute rule against an independent per-page oracle
(tests/oracle_model.py), through the public API only, on both stores.

Never compares one store or engine with the other: each result is checked
against what the kernel's rules say for a numpy array of per-page
attributes and a per-page memslot map.
"""

from __future__ import annotations

import errno

import os

import numpy as np
import pytest
from hypothesis import Phase, given
from hypothesis import settings as _settings
from hypothesis import strategies as st

import memattr
from memattr import trace as tr
from oracle_model import (
    EXIT_FLAG_PRIVATE,
    GEOMETRIES,
    HIGH_BASE,
    HIGH_N,
    HPAGE,
    N_GFNS,
    PAGE_SHIFT,
    PAGE_SIZE,
    PRIVATE,
    U64_MAX,
    Oracle,
    build_vm,
    check_mapping_invariant,
    create_slot,
    leaf_end,
    leaves,
)

STORES = ["rangetree", "xarray"]


def settings(max_examples: int) -> _settings:
    """Modest example counts; MEMATTR_ORACLE_NO_SHRINK=1 (mutation runs)
    reports the first failing example without shrinking or the database."""
    if os.environ.get("MEMATTR_ORACLE_NO_SHRINK"):
        return _settings(max_examples=max_examples, phases=[Phase.explicit, Phase.generate], database=None)
    return _settings(max_examples=max_examples)
GEOMS = sorted(GEOMETRIES)


# --- strategies ------------------------------------------------------------------


def _edges(geom: str) -> list[int]:
    out = []
    for s in GEOMETRIES[geom]:
        out += [s.base, s.end]
        out += [(s.base + HPAGE[2] - 1) & ~(HPAGE[2] - 1), (s.base + HPAGE[3] - 1) & ~(HPAGE[3] - 1)]
    return sorted(set(g for g in out if g < N_GFNS))


@st.composite
def set_ops(draw: st.DrawFn, geom: str, invalid: bool = True) -> tuple[int, int, int, int]:
    """(address, size, attributes, flags) for KVM_SET_MEMORY_ATTRIBUTES."""
    attributes = draw(st.sampled_from([0, PRIVATE]))
    kinds = ["edge", "aligned2m", "random", "small", "high"]
    if invalid:
        kinds += ["invalid"]
    kind = draw(st.sampled_from(kinds))
    if kind == "edge":
        # A range starting or ending around a slot or hugepage boundary.
        anchor = draw(st.sampled_from(_edges(geom)))
        start = max(0, anchor + draw(st.integers(-600, 600)))
        npages = draw(st.one_of(st.integers(1, 1100), st.integers(1, 300_000)))
    elif kind == "aligned2m":
        start = draw(st.integers(0, N_GFNS // 512 - 1)) * 512
        npages = draw(st.integers(1, 1100)) * 512
    elif kind == "small":
        start = draw(st.integers(0, N_GFNS - 1))
        npages = draw(st.integers(1, 16))
    elif kind == "high":
        start = HIGH_BASE + draw(st.integers(0, HIGH_N - 2))
        npages = draw(st.integers(1, HIGH_N))
    elif kind == "random":
        start = draw(st.integers(0, N_GFNS - 1))
        npages = draw(st.integers(1, N_GFNS))
    else:
        # Every EINVAL of kvm_vm_ioctl_set_mem_attributes(), alone or mixed.
        address = draw(st.integers(0, N_GFNS - 1)) << PAGE_SHIFT
        size = draw(st.integers(1, 4096)) << PAGE_SHIFT
        flags = 0
        what = draw(st.sampled_from(["flags", "attrs", "size0", "wrap", "addr", "size", "lastpage"]))
        if what == "flags":
            flags = draw(st.integers(1, U64_MAX))
        elif what == "attrs":
            attributes = draw(st.sampled_from([1, 2, 4, 16, 1 << 63, PRIVATE | 1]))
        elif what == "size0":
            size = 0
        elif what == "wrap":
            address = U64_MAX + 1 - draw(st.integers(1, 8)) * PAGE_SIZE
            size = draw(st.integers(8, 100)) * PAGE_SIZE
        elif what == "addr":
            address += draw(st.integers(1, PAGE_SIZE - 1))
        elif what == "size":
            size += draw(st.integers(1, PAGE_SIZE - 1))
        else:
            # The very last page: address + size == 2**64 wraps to 0.
            address, size = U64_MAX + 1 - PAGE_SIZE, PAGE_SIZE
        return address, size, attributes, flags
    end = min(start + npages, N_GFNS if start < N_GFNS else HIGH_BASE + HIGH_N - 1)
    end = max(end, start + 1)
    return start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, attributes, 0


@st.composite
def fault_ops(draw: st.DrawFn, geom: str) -> tuple[int, bool | None]:
    """(gpa, private) — private None means "match the gfn's attribute"."""
    kind = draw(st.sampled_from(["edge", "random", "random", "high"]))
    if kind == "edge":
        gfn = max(0, draw(st.sampled_from(_edges(geom))) + draw(st.integers(-3, 3)))
        gfn = min(gfn, N_GFNS - 1)
    elif kind == "high":
        gfn = HIGH_BASE + draw(st.integers(0, HIGH_N - 1))
    else:
        gfn = draw(st.integers(0, N_GFNS - 1))
    private = draw(st.sampled_from([None, None, True, False]))
    return (gfn << PAGE_SHIFT) | draw(st.integers(0, PAGE_SIZE - 1)), private


def _resolve(oracle: Oracle, gpa: int, private: bool | None) -> bool:
    if private is not None:
        return private
    gfn = gpa >> PAGE_SHIFT
    if gfn < N_GFNS:
        return bool(oracle.attrs[gfn] & PRIVATE)
    if gfn >= HIGH_BASE:
        return bool(oracle.high[gfn - HIGH_BASE] & PRIVATE)
    return False


# --- helpers -------------------------------------------------------------------------


def do_set(vm: memattr.Vm, address: int, size: int, attributes: int, flags: int) -> int:
    try:
        vm.set_memory_attributes(address, size, attributes, flags)
    except OSError as e:
        return e.errno or -1
    return 0


def do_fault(vm: memattr.Vm, gpa: int, private: bool) -> tuple[str, int]:
    try:
        level = vm.fault(gpa, private=private)
    except memattr.MemoryFault as e:
        assert e.errno == errno.EFAULT
        assert e.gpa == gpa & ~(PAGE_SIZE - 1), f"exit gpa {e.gpa:#x} for access at {gpa:#x}"
        assert e.size == PAGE_SIZE
        return "exit", e.flags
    return ("mmio", 0) if level == 0 else ("map", level)


def check_attributes(vm: memattr.Vm, oracle: Oracle) -> None:
    """Every gfn of [0, N_GFNS) and of the high window, run by run."""
    for arr, base in ((oracle.attrs, 0), (oracle.high, HIGH_BASE)):
        cuts = np.flatnonzero(arr[1:] != arr[:-1]) + 1
        bounds = [0, *cuts.tolist(), arr.size]
        for s, e in zip(bounds, bounds[1:]):
            value = int(arr[s])
            assert vm.range_has_attributes(base + s, base + e, value), (
                f"gfns [{base + s:#x}, {base + e:#x}) should all be {value:#x}"
            )
            assert vm.get_memory_attributes(base + s) == value
            assert vm.get_memory_attributes(base + e - 1) == value
    # Beyond the windows nothing was ever set.
    assert vm.range_has_attributes(N_GFNS, HIGH_BASE, 0)


def hugepages_touching(oracle: Oracle, si: int, level: int) -> list[int]:
    """A gfn inside slot si for every level hugepage the slot touches."""
    s = oracle.slots[si]
    n = HPAGE[level]
    return [max(hp, s.base) for hp in range(s.base & ~(n - 1), s.end, n)]


def check_mixed_and_levels(vm: memattr.Vm, oracle: Oracle, rng: np.random.Generator) -> None:
    for si, s in enumerate(oracle.slots):
        for level in (2, 3):
            for g in hugepages_touching(oracle, si, level):
                want = oracle.mixed(si, g, level)
                assert vm.hugepage_mixed(s.slot, g, level) == want, (
                    f"slot {s.slot} level {level} hugepage of gfn {g:#x}: mixed should be {want}"
                )
        # max_mapping_level at each 2M hugepage's first and last gfn in the
        # slot and at a random gfn of it (head/tail straddlers included).
        for g in hugepages_touching(oracle, si, 2):
            last = min((g | (HPAGE[2] - 1)), s.end - 1)
            for gfn in (g, last, int(rng.integers(g, last + 1))):
                want = oracle.max_mapping_level(gfn)
                assert vm.max_mapping_level(gfn) == want, f"max_mapping_level({gfn:#x}) should be {want}"


# --- 1. attributes, errnos, early exit -------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("geom", GEOMS)
@settings(max_examples=25)
@given(data=st.data())
def test_set_attributes_match_oracle(store: str, geom: str, data: st.DataObject) -> None:
    """Random valid and invalid sets: same errno as the kernel's validation,
    no-op counted iff the range already had the value, conversions and
    failed calls counted, and every page's attributes equal the oracle's."""
    vm = build_vm(geom, store)
    oracle = Oracle(geom)
    ops = data.draw(st.lists(set_ops(geom), min_size=1, max_size=25))
    for address, size, attributes, flags in ops:
        before = vm.stats.as_dict()
        want_err, want_noop = oracle.apply_set(address, size, attributes, flags)
        got = do_set(vm, address, size, attributes, flags)
        assert got == want_err, f"set({address:#x}, {size:#x}, {attributes:#x}, {flags:#x})"
        st_ = vm.stats
        ok = want_err == 0
        assert st_.failed_calls - before["failed_calls"] == (0 if ok else 1)
        assert st_.set_calls - before["set_calls"] == (1 if ok else 0)
        assert st_.noop_conversions - before["noop_conversions"] == (1 if ok and want_noop else 0)
        assert st_.conversions - before["conversions"] == (1 if ok and not want_noop else 0)
        if ok and not want_noop:
            assert st_.pages_converted - before["pages_converted"] == size >> PAGE_SHIFT
            clipped = oracle.clipped_ranges(address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT)
            assert st_.pre_set_ranges - before["pre_set_ranges"] == len(clipped)
            assert st_.post_set_ranges - before["post_set_ranges"] == len(clipped)
        else:
            assert st_.pre_set_ranges == before["pre_set_ranges"]
            assert st_.tlb_flushes == before["tlb_flushes"]
    check_attributes(vm, oracle)


@pytest.mark.parametrize("store", STORES)
def test_set_attributes_edge_errnos(store: str) -> None:
    """The documented EINVAL cases one by one, and the top of the gpa space."""
    vm = build_vm("awkward", store)
    oracle = Oracle("awkward")
    cases = [
        (0, PAGE_SIZE, PRIVATE, 1),
        (0, PAGE_SIZE, PRIVATE, 1 << 63),
        (0, PAGE_SIZE, 1, 0),
        (0, PAGE_SIZE, PRIVATE | (1 << 4), 0),
        (0, 0, PRIVATE, 0),
        (PAGE_SIZE, U64_MAX - PAGE_SIZE + 2, PRIVATE, 0),
        (U64_MAX + 1 - PAGE_SIZE, PAGE_SIZE, PRIVATE, 0),  # wraps to exactly 0
        (1, PAGE_SIZE, PRIVATE, 0),
        (0, PAGE_SIZE + 1, PRIVATE, 0),
        (U64_MAX + 1 - 2 * PAGE_SIZE, PAGE_SIZE, PRIVATE, 0),  # the last settable page
        (U64_MAX + 1 - 2 * PAGE_SIZE, PAGE_SIZE, PRIVATE, 0),  # again: no-op
        (0, N_GFNS << PAGE_SHIFT, 0, 0),  # already 0 everywhere: no-op
    ]
    for address, size, attributes, flags in cases:
        noops = vm.stats.noop_conversions
        want_err, want_noop = oracle.apply_set(address, size, attributes, flags)
        assert do_set(vm, address, size, attributes, flags) == want_err, (address, size, attributes, flags)
        assert vm.stats.noop_conversions - noops == int(want_err == 0 and want_noop)
    assert vm.get_memory_attributes((1 << 52) - 2) == PRIVATE
    assert vm.get_memory_attributes((1 << 52) - 1) == 0
    check_attributes(vm, oracle)


# --- 2. mixed flags and max_mapping_level ---------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("slots_first", [True, False], ids=["slots-first", "attrs-first"])
@settings(max_examples=15)
@given(data=st.data())
def test_mixed_flags_match_oracle(store: str, geom: str, slots_first: bool, data: st.DataObject) -> None:
    """A 2M/1G hugepage wholly inside a slot is mixed iff its pages'
    attributes differ (post-set pass, or kvm_mmu_init_memslot_memory_attributes
    when the slots are created after the sets); hugepages not wholly inside
    a slot are never flagged, and max_mapping_level follows the disallow
    rules (head/tail, congruence, mixed, dirty logging)."""
    oracle = Oracle(geom, order=18)
    ops = data.draw(st.lists(set_ops(geom, invalid=False), min_size=1, max_size=15))
    if slots_first:
        vm = build_vm(geom, store, order=18)
    else:
        vm = memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM, store, guest_memfd_max_order=18)
    for op in ops:
        oracle.apply_set(*op)
        assert do_set(vm, *op) == 0
    if not slots_first:
        for s in GEOMETRIES[geom]:
            create_slot(vm, s)
    check_mixed_and_levels(vm, oracle, np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))))


@pytest.mark.parametrize("store", STORES)
def test_mixed_flags_targeted(store: str) -> None:
    """Single pages flipped at the first/last gfn of 2M and 1G hugepages,
    at slot edges and across adjacent slots."""
    for geom in GEOMS:
        vm = build_vm(geom, store, order=18)
        oracle = Oracle(geom, order=18)
        rng = np.random.default_rng(1)
        gfns = []
        for g in _edges(geom):
            gfns += [g - 1, g, g + 511, g + 512, (g | 0x3FFFF), (g | 0x1FF)]
        for i, gfn in enumerate(sorted(set(x for x in gfns if 0 <= x < N_GFNS))):
            op = (gfn << PAGE_SHIFT, PAGE_SIZE, PRIVATE if i % 3 else 0, 0)
            oracle.apply_set(*op)
            assert do_set(vm, *op) == 0
            if i % 7 == 0:
                check_mixed_and_levels(vm, oracle, rng)
        check_mixed_and_levels(vm, oracle, rng)
        # Make everything uniform again: no hugepage may stay mixed.
        for value in (PRIVATE, 0):
            op = (0, N_GFNS << PAGE_SHIFT, value, 0)
            oracle.apply_set(*op)
            assert do_set(vm, *op) == 0
            check_mixed_and_levels(vm, oracle, rng)


# --- 3/4. fault levels and exits ---------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("geom", GEOMS)
@settings(max_examples=30)
@given(
    order=st.sampled_from([0, 9, 18]),
    host_level=st.sampled_from([1, 2, 3]),
    data=st.data(),
)
def test_fault_levels_and_exits_match_oracle(
    store: str, geom: str, order: int, host_level: int, data: st.DataObject
) -> None:
    """After random sets, faults map at the oracle level (largest L whose
    hugepage is wholly in the slot, congruent, uniform, no dirty logging,
    capped by the guest_memfd order or the host level), or exit with
    {page-aligned gpa, 4096, PRIVATE iff private} on a mismatch, a private
    access without guest_memfd or outside any slot; shared outside is MMIO."""
    vm = build_vm(geom, store, order=order, host_level=host_level)
    oracle = Oracle(geom, order=order, host_level=host_level)
    for op in data.draw(st.lists(set_ops(geom, invalid=False), max_size=10)):
        oracle.apply_set(*op)
        assert do_set(vm, *op) == 0
    for gpa, private in data.draw(st.lists(fault_ops(geom), min_size=1, max_size=40)):
        private = _resolve(oracle, gpa, private)
        exits, mmio = vm.stats.memory_fault_exits, vm.stats.mmio_faults
        want = oracle.fault(gpa, private)
        got = do_fault(vm, gpa, private)
        assert got == want, f"fault({gpa:#x}, private={private})"
        assert vm.stats.memory_fault_exits - exits == (want[0] == "exit")
        assert vm.stats.mmio_faults - mmio == (want[0] == "mmio")
        gfn = gpa >> PAGE_SHIFT
        if oracle.slot_index(gfn) >= 0:
            assert vm.max_mapping_level(gfn) == oracle.max_mapping_level(gfn)
        if want[0] == "map":
            assert vm.mmu.mapped_level(gpa) == want[1]


@pytest.mark.parametrize("store", STORES)
def test_exit_cases(store: str) -> None:
    """Each KVM_EXIT_MEMORY_FAULT cause once, and MMIO."""
    vm = build_vm("awkward", store, order=9)
    oracle = Oracle("awkward", order=9)
    slots = {s.slot: s for s in GEOMETRIES["awkward"]}
    in_gmem = (slots[0].base + 1000) << PAGE_SHIFT
    in_plain = (slots[3].base + 5) << PAGE_SHIFT
    outside = (slots[0].end + 3) << PAGE_SHIFT  # the gap between slots 0 and 1
    for op in [(in_gmem, PAGE_SIZE, PRIVATE, 0), (in_plain, PAGE_SIZE, PRIVATE, 0)]:
        oracle.apply_set(*op)
        assert do_set(vm, *op) == 0
    cases = [
        (in_gmem + 0x123, False, ("exit", 0)),  # shared access, private gfn
        (in_gmem + PAGE_SIZE + 7, True, ("exit", EXIT_FLAG_PRIVATE)),  # private access, shared gfn
        (in_plain + 0xFFF, True, ("exit", EXIT_FLAG_PRIVATE)),  # private, no guest_memfd
        (in_plain, False, ("exit", 0)),  # shared access to a private gfn there
        (outside + 1, True, ("exit", EXIT_FLAG_PRIVATE)),  # private, no slot
        (outside + 2, False, ("mmio", 0)),  # shared, no slot
        ((HIGH_BASE + 1) << PAGE_SHIFT, False, ("mmio", 0)),
        (in_gmem, True, ("map", 1)),  # the 2M around it is mixed
        (in_gmem + 600 * PAGE_SIZE, False, None),
    ]
    for gpa, private, want in cases:
        want = want or oracle.fault(gpa, private)
        assert oracle.fault(gpa, private) == want
        assert do_fault(vm, gpa, private) == want, (hex(gpa), private)
    # A private gfn outside every slot: a shared access exits too.
    op = (outside, PAGE_SIZE, PRIVATE, 0)
    oracle.apply_set(*op)
    assert do_set(vm, *op) == 0
    assert do_fault(vm, outside, False) == oracle.fault(outside, False) == ("exit", 0)


# --- 5. invalidation: zaps, straddling leaves, TLB flushes, the invariant -------------------


def _intersects(leaf: tuple[int, int], start: int, end: int) -> bool:
    return leaf[0] < end and leaf_end(leaf) > start


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("geom", GEOMS)
@settings(max_examples=25)
@given(order=st.sampled_from([0, 9, 18]), data=st.data())
def test_invalidation_and_tlb_flush_match_oracle(store: str, geom: str, order: int, data: st.DataObject) -> None:
    """A random sequence of sets and faults. After every operation: no leaf
    covers non-uniform attributes or two slots, none exceeds the oracle
    level. A successful, changing set removes exactly the leaves
    intersecting its range (huge leaves straddling it go whole, the others
    stay), counts one TLB flush iff it removed any, and leaves
    mmu_invalidate_range_start/end covering every memslot-clipped range; a
    no-op or failed set changes no mapping and flushes nothing."""
    vm = build_vm(geom, store, order=order)
    oracle = Oracle(geom, order=order)
    ops = data.draw(
        st.lists(
            st.one_of(
                set_ops(geom).map(lambda o: ("set", o)),
                fault_ops(geom).map(lambda o: ("fault", o)),
                fault_ops(geom).map(lambda o: ("fault", o)),
            ),
            min_size=1,
            max_size=40,
        )
    )
    before = leaves(vm)
    for kind, op in ops:
        if kind == "set":
            address, size, attributes, flags = op
            start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
            flushes = vm.stats.tlb_flushes
            want_err, noop = oracle.apply_set(*op)
            assert do_set(vm, *op) == want_err
            after = check_mapping_invariant(vm, oracle)
            if want_err or noop:
                assert after == before
                assert vm.stats.tlb_flushes == flushes
            else:
                hit = {lf for lf in before if _intersects(lf, start, end)}
                assert after == before - hit, f"set [{start:#x}, {end:#x}) zapped the wrong leaves"
                assert vm.stats.tlb_flushes - flushes == (1 if hit else 0)
                clipped = oracle.clipped_ranges(start, end)
                assert vm.mmu_invalidate_in_progress == 0
                if clipped:
                    assert vm.mmu_invalidate_range_start <= clipped[0][1]
                    assert vm.mmu_invalidate_range_end >= clipped[-1][2]
        else:
            gpa, private = op
            private = _resolve(oracle, gpa, private)
            want = oracle.fault(gpa, private)
            assert do_fault(vm, gpa, private) == want, f"fault({gpa:#x}, private={private})"
            after = check_mapping_invariant(vm, oracle)
            if want[0] == "map":
                level = want[1]
                n = 1 if level == 1 else HPAGE[level]
                leaf = ((gpa >> PAGE_SHIFT) & ~(n - 1), level)
                assert leaf in after
                assert vm.mmu.mapped_level(gpa) == level
                # Only leaves under the new one may have been replaced.
                for lf in before - after:
                    assert _intersects(lf, leaf[0], leaf_end(leaf))
                assert after - before <= {leaf}
            else:
                assert after == before
        before = after


@pytest.mark.parametrize("store", STORES)
def test_tlb_flush_and_straddling_zap_targeted(store: str) -> None:
    """A 1G leaf and a 2M leaf, a one-page set inside each: the huge leaf
    goes whole, one flush; the same set again is a no-op: no flush; a set
    over nothing mapped: no flush."""
    vm = build_vm("awkward", store, order=18)
    oracle = Oracle("awkward", order=18)
    one_g = 1 << 18
    assert do_fault(vm, (one_g + 5) << PAGE_SHIFT, False) == oracle.fault((one_g + 5) << PAGE_SHIFT, False) == ("map", 3)
    assert do_fault(vm, 2048 << PAGE_SHIFT, False) == ("map", 2)
    for op, flush in [
        (((one_g + 777) << PAGE_SHIFT, PAGE_SIZE, PRIVATE, 0), 1),
        (((one_g + 777) << PAGE_SHIFT, PAGE_SIZE, PRIVATE, 0), 0),  # no-op
        ((2049 << PAGE_SHIFT, 2 * PAGE_SIZE, PRIVATE, 0), 1),
        ((5000 << PAGE_SHIFT, 3 * PAGE_SIZE, PRIVATE, 0), 0),  # nothing mapped
    ]:
        n = vm.stats.tlb_flushes
        oracle.apply_set(*op)
        assert do_set(vm, *op) == 0
        assert vm.stats.tlb_flushes - n == flush, op
        check_mapping_invariant(vm, oracle)
    assert vm.mmu.mappings(3) == [] and vm.mmu.mappings(2) == []
    assert vm.mmu.mapped_level((one_g + 5) << PAGE_SHIFT) == 0
    # Refault: the 1G is mixed now, the 2M holding gfn one_g + 5 is not.
    assert do_fault(vm, (one_g + 5) << PAGE_SHIFT, False) == oracle.fault((one_g + 5) << PAGE_SHIFT, False) == ("map", 2)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("geom", GEOMS)
def test_unmap_hook_sees_every_range_in_the_invalidation(store: str, geom: str) -> None:
    """From inside on_unmap (mmu_lock held, invalidation in progress),
    mmu_invalidate_range_start/end already cover every memslot-clipped range
    handed out so far in this call (kvm_mmu_invalidate_range_add runs for
    each range before it is zapped), for sets across several slots."""
    vm = build_vm(geom, store)
    seen: list[tuple[int, int]] = []

    @vm.on_unmap
    def hook(rng: memattr.GfnRange) -> bool:
        seen.append((rng.start, rng.end))
        assert vm.mmu_invalidate_in_progress == 1
        lo, hi = vm.mmu_invalidate_range_start, vm.mmu_invalidate_range_end
        for s, e in seen:
            assert lo <= s and hi >= e, f"range [{s:#x}, {e:#x}) not in the invalidation [{lo:#x}, {hi:#x})"
        return False

    oracle = Oracle(geom)
    slots = GEOMETRIES[geom]
    ranges = [(0, N_GFNS), (slots[0].end - 7, slots[-1].base + 9), (slots[1].base - 3, slots[-1].end + 3)]
    ranges += [(s.base + 1, s.end - 1) for s in slots]
    for attributes in (PRIVATE, 0):
        for start, end in ranges:
            seen.clear()
            op = (start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, attributes, 0)
            _, noop = oracle.apply_set(*op)
            assert do_set(vm, *op) == 0
            want = [(lo, hi) for _, lo, hi in oracle.clipped_ranges(start, end)]
            assert seen == ([] if noop else want)


# --- 6. replay with both engines against the oracle ----------------------------------------


def _build_trace(geom: str, order: int, ops: list[tuple[str, tuple]]) -> tr.Trace:
    rec = tr.Recorder(memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM, "rangetree", guest_memfd_max_order=order))
    for s in GEOMETRIES[geom]:
        create_slot(rec, s)
    setup = rec.trace()
    parts = [setup.ops]
    for kind, op in ops:
        if kind == "set":
            address, size, attributes, flags = op
            rec_op = tr.set_ops(address, size, attributes)
            rec_op["arg"] = flags
        else:
            gpa, private, convert = op
            rec_op = tr.fault_ops(gpa, (tr.FLAG_PRIVATE if private else 0) | (tr.FLAG_CONVERT if convert else 0))
        parts.append(rec_op)
    meta = dict(setup.meta)
    meta["vm_kwargs"] = {"guest_memfd_max_order": order}
    return tr.Trace(np.concatenate(parts), meta)


def _oracle_results(oracle: Oracle, ops: list[tuple[str, tuple]]) -> list[int]:
    out = []
    for kind, op in ops:
        if kind == "set":
            err, _ = oracle.apply_set(*op)
            out.append(-err)
            continue
        gpa, private, convert = op
        want = oracle.fault(gpa, private)
        if want[0] == "exit" and convert:
            # The replayer converts the reported page and faults again.
            err, _ = oracle.apply_set(gpa & ~(PAGE_SIZE - 1), PAGE_SIZE, PRIVATE if private else 0)
            if err:
                # The last page of the gpa space cannot be converted
                # (address + size wraps): the replayer reports the set's errno.
                out.append(-err)
                continue
            want = oracle.fault(gpa, private)
        out.append(-errno.EFAULT if want[0] == "exit" else want[1])
    return out


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("geom", GEOMS)
@settings(max_examples=15)
@given(order=st.sampled_from([0, 9, 18]), data=st.data())
def test_replay_engines_match_oracle(store: str, geom: str, order: int, data: st.DataObject) -> None:
    """A random trace (sets, some invalid; faults, some converting on exit)
    replayed with engine="native" and engine="python" on fresh Vms: each
    operation's result, the final attributes, the mixed flags and levels,
    and the mapping invariant all match the oracle."""
    raw = data.draw(
        st.lists(
            st.one_of(
                set_ops(geom).map(lambda o: ("set", o)),
                st.tuples(fault_ops(geom), st.booleans()).map(lambda t: ("fault", (t[0][0], t[0][1], t[1]))),
            ),
            min_size=1,
            max_size=60,
        )
    )
    # Resolve "matching" faults against the oracle as it evolves.
    probe = Oracle(geom, order=order)
    ops: list[tuple[str, tuple]] = []
    for kind, op in raw:
        if kind == "set":
            probe.apply_set(*op)
            ops.append((kind, op))
        else:
            gpa, private, convert = op
            op = (gpa, _resolve(probe, gpa, private), convert)
            _oracle_results(probe, [(kind, op)])
            ops.append((kind, op))
    trace = _build_trace(geom, order, ops)
    n_setup = len(trace) - len(ops)
    seed = data.draw(st.integers(0, 2**32 - 1))
    for engine in ("native", "python"):
        oracle = Oracle(geom, order=order)
        want = _oracle_results(oracle, ops)
        vm = memattr.Vm(trace.vm_type, store, **trace.meta["vm_kwargs"])
        res = tr.replay(trace, vm, engine=engine, keep_results=True)
        assert res.engine == engine
        assert res.results is not None
        assert (res.results[:n_setup] >= 0).all()
        got = res.results[n_setup:].tolist()
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"{engine}: op {i} {ops[i]}: got {g}, oracle {w}"
        check_attributes(vm, oracle)
        check_mapping_invariant(vm, oracle)
        check_mixed_and_levels(vm, oracle, np.random.default_rng(seed))
        assert vm.mmu_invalidate_in_progress == 0


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("engine", ["native", "python"])
def test_replay_multislot_set_invalidation_range(store: str, geom: str, engine: str) -> None:
    """After a set that spans every slot, mmu_invalidate_range_start/end
    cover the whole hull of the memslot-clipped ranges (every range was
    range_add'ed), in both engines."""
    oracle = Oracle(geom)
    slots = sorted(GEOMETRIES[geom], key=lambda s: s.base)
    ops: list[tuple[str, tuple]] = [
        ("set", (0, N_GFNS << PAGE_SHIFT, PRIVATE, 0)),
        ("set", ((slots[0].base + 3) << PAGE_SHIFT, (slots[-1].end - slots[0].base - 5) << PAGE_SHIFT, 0, 0)),
    ]
    trace = _build_trace(geom, 0, ops)
    want = _oracle_results(oracle, ops)
    for cut in (len(trace) - 1, len(trace)):
        vm = memattr.Vm(trace.vm_type, store)
        part = tr.Trace(trace.ops[:cut].copy(), {**trace.meta, "phases": []})
        res = tr.replay(part, vm, engine=engine, keep_results=True)
        assert res.results is not None
        assert res.results[-1] == want[cut - len(trace) - 1]
        address, size = ops[cut - len(trace) - 1][1][:2]
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        clipped = oracle.clipped_ranges(start, end)
        assert vm.mmu_invalidate_in_progress == 0
        assert vm.mmu_invalidate_range_start <= clipped[0][1], engine
        assert vm.mmu_invalidate_range_end >= clipped[-1][2], engine


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("engine", ["native", "python"])
def test_replay_tlb_flush_rule(store: str, engine: str) -> None:
    """The TLB flush rule on both engines: a set that zaps a leaf flushes
    once (however many leaves and slots it zaps), a set over nothing
    mapped, a no-op set and a failed set do not."""
    geom = "awkward"
    one_g = 1 << 18
    slots = GEOMETRIES[geom]
    ops: list[tuple[str, tuple]] = [
        ("fault", ((one_g + 5) << PAGE_SHIFT, False, False)),  # 1G leaf
        ("fault", (2048 << PAGE_SHIFT, False, False)),  # 2M leaf
        ("fault", ((slots[1].base + 1) << PAGE_SHIFT, False, False)),  # 4K leaf in slot 1
        ("set", (((one_g + 9) << PAGE_SHIFT), PAGE_SIZE, PRIVATE, 0)),  # zaps the 1G: +1
        ("set", (((one_g + 9) << PAGE_SHIFT), PAGE_SIZE, PRIVATE, 0)),  # no-op: +0
        ("set", ((5000 << PAGE_SHIFT), PAGE_SIZE, PRIVATE, 0)),  # nothing mapped: +0
        ("set", ((2048 << PAGE_SHIFT), PAGE_SIZE, PRIVATE, 1)),  # EINVAL: +0
        ("set", (0, N_GFNS << PAGE_SHIFT, PRIVATE, 0)),  # zaps 2M and 4K leaves in two slots: +1
        ("set", (0, N_GFNS << PAGE_SHIFT, 0, 0)),  # nothing mapped any more: +0
    ]
    trace = _build_trace(geom, 0, ops)
    oracle = Oracle(geom)
    want = _oracle_results(oracle, ops)
    assert want[:3] == [3, 2, 1]
    vm = memattr.Vm(trace.vm_type, store)
    res = tr.replay(trace, vm, engine=engine, keep_results=True)
    assert res.engine == engine and res.results is not None
    assert res.results[len(trace) - len(ops):].tolist() == want
    assert vm.stats.tlb_flushes == 2
    assert leaves(vm) == set()
    check_attributes(vm, oracle)


@pytest.mark.parametrize("engine", ["native", "python"])
def test_converting_fault_on_the_last_page_reports_the_sets_errno(engine: str) -> None:
    """A converting fault on the last page of the gpa space exits, and the
    VMM's conversion of that page is EINVAL (address + size wraps), which
    the replayer reports as the operation's result, on both engines."""
    ops = [("fault", (((1 << 64) - PAGE_SIZE), True, True))]
    trace = _build_trace("awkward", 0, ops)
    want = _oracle_results(Oracle("awkward"), ops)
    assert want == [-errno.EINVAL]
    vm = memattr.Vm(trace.vm_type)
    res = tr.replay(trace, vm, engine=engine, keep_results=True)
    assert res.results is not None and res.results[-1:].tolist() == want
