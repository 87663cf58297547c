"""Hugepage tracking (memattr._native trackers) against the kernel's rules.

Scenarios come from arch/x86/kvm/mmu/mmu.c and x86.c (kvm_alloc_memslot_metadata);
the property test checks the range-based tracker against the literal
per-hugepage algorithm (LpageInfoTracker) on random conversions.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memattr._native import LpageInfoTracker, RangeHugepageTracker, RangeTree, TdpPageTable, XArray

M2 = 512
G1 = 512 * 512
P = 8  # KVM_MEMORY_ATTRIBUTE_PRIVATE

Tracker = RangeHugepageTracker | LpageInfoTracker
TRACKERS = [RangeHugepageTracker, LpageInfoTracker]


def _store_cls_for(tracker_cls: type) -> Callable[[], RangeTree | XArray]:
    return RangeTree if tracker_cls is RangeHugepageTracker else XArray


def convert(store: RangeTree | XArray, trackers: list[Tracker], start: int, end: int, value: int) -> None:
    """What the Vm does: store, then the post-set pass per slot, clipped."""
    store.set_range(start, end, value)
    for t in trackers:
        s, e = max(start, t.base_gfn), min(end, t.base_gfn + t.npages)
        if s < e:
            t.post_set_memory_attributes(store, s, e, value)


@pytest.fixture(params=TRACKERS, ids=["range", "lpage_info"])
def tracker_cls(request: pytest.FixtureRequest) -> type:
    return request.param  # type: ignore[no-any-return]


def test_mixed_after_4k_conversion_and_cleared_when_uniform(tracker_cls: type) -> None:
    store = _store_cls_for(tracker_cls)()
    t = tracker_cls(0, 2 * G1, 0)
    t.init_memory_attributes(store)
    assert t.mixed_runs(2) == [] and t.mixed_runs(3) == []
    assert t.max_mapping_level(M2 + 7) == 3

    convert(store, [t], M2 + 7, M2 + 8, P)
    assert t.test_mixed(M2, 2) and t.test_mixed(M2 + 511, 2)
    assert not t.test_mixed(0, 2) and not t.test_mixed(2 * M2, 2)
    assert t.test_mixed(0, 3) and not t.test_mixed(G1, 3)
    assert t.max_mapping_level(M2 + 7) == 1
    assert t.max_mapping_level(0) == 2
    assert t.max_mapping_level(G1) == 3
    assert t.mixed_runs(2) == [(M2, 2 * M2)]
    assert t.mixed_runs(3) == [(0, G1)]

    convert(store, [t], M2 + 7, M2 + 8, 0)
    assert t.mixed_runs(2) == [] and t.mixed_runs(3) == []
    assert t.max_mapping_level(M2 + 7) == 3


def test_1g_mixed_while_any_2m_below_mixed_or_differs(tracker_cls: type) -> None:
    store = _store_cls_for(tracker_cls)()
    t = tracker_cls(0, G1, 0)
    t.init_memory_attributes(store)
    # A whole 2M page private: 2M uniform, but the 1G samples differ.
    convert(store, [t], 3 * M2, 4 * M2, P)
    assert not t.test_mixed(3 * M2, 2)
    assert t.test_mixed(0, 3)
    assert t.max_mapping_level(3 * M2) == 2
    # Every 2M private but one page: still mixed (that 2M is mixed).
    convert(store, [t], 0, G1, P)
    convert(store, [t], 100, 101, 0)
    assert t.test_mixed(0, 2) and t.test_mixed(0, 3)
    # Uniform private: huge again.
    convert(store, [t], 100, 101, P)
    assert not t.test_mixed(0, 3)
    assert t.max_mapping_level(12345) == 3


def test_misaligned_slot_head_and_tail_never_huge(tracker_cls: type) -> None:
    store = _store_cls_for(tracker_cls)()
    base = G1 + M2 + 3  # misaligned for 2M and 1G
    t = tracker_cls(base, 2 * G1, base << 12)
    t.init_memory_attributes(store)
    end = base + 2 * G1
    assert t.disallow_lpage(base, 2) and t.disallow_lpage(base, 3)
    assert t.disallow_lpage(end - 1, 2) and t.disallow_lpage(end - 1, 3)
    assert t.max_mapping_level(base) == 1
    assert t.max_mapping_level(end - 1) == 1
    assert t.max_mapping_level(2 * M2 + G1) == 2  # first whole 2M, 1G partial
    assert t.max_mapping_level(2 * G1) == 3  # the one whole 1G page
    # Conversions inside the partial head/tail never set their mixed flag.
    convert(store, [t], base + 1, base + 2, P)
    convert(store, [t], end - 2, end - 1, P)
    assert not t.test_mixed(base, 2) and not t.test_mixed(end - 1, 2)
    assert not t.test_mixed(base, 3) and not t.test_mixed(end - 1, 3)


def test_incongruent_userspace_address(tracker_cls: type) -> None:
    # gpa and hva differ modulo 2M: no hugepage anywhere in the slot.
    t = tracker_cls(0, G1, 4096)
    assert all(t.max_mapping_level(g) == 1 for g in (0, M2, G1 - 1))
    # Congruent modulo 2M only: 2M ok, 1G never.
    t = tracker_cls(0, 2 * G1, M2 << 12)
    assert t.max_mapping_level(G1 + 5) == 2
    assert t.disallow_lpage(G1, 3) and not t.disallow_lpage(G1, 2)


def test_init_reads_current_attributes(tracker_cls: type) -> None:
    store = _store_cls_for(tracker_cls)()
    store.set_range(G1 + 5, G1 + 6, P)
    t = tracker_cls(G1, G1, G1 << 12)
    t.init_memory_attributes(store)
    assert t.mixed_runs(2) == [(G1, G1 + M2)]
    assert t.mixed_runs(3) == [(G1, 2 * G1)]


def test_argument_errors_name_the_argument(tracker_cls: type) -> None:
    with pytest.raises(ValueError, match="npages"):
        tracker_cls(0, 0)
    with pytest.raises(ValueError, match="wrap"):
        tracker_cls(2**64 - 1, 2)
    with pytest.raises(ValueError, match="base_gfn must be a u64"):
        tracker_cls(-1, 1)
    with pytest.raises(TypeError, match="npages must be an int, not bool"):
        tracker_cls(0, True)
    with pytest.raises(TypeError, match="npages"):
        tracker_cls(0, "1")
    t = tracker_cls(M2, M2, M2 << 12)
    store = _store_cls_for(tracker_cls)()
    with pytest.raises(ValueError, match="level"):
        t.test_mixed(M2, 1)
    with pytest.raises(ValueError, match="level"):
        t.test_mixed(M2, 300)
    with pytest.raises(ValueError, match="outside"):
        t.test_mixed(0, 2)
    with pytest.raises(ValueError, match="not inside"):
        t.post_set_memory_attributes(store, 0, M2 + 1, P)
    with pytest.raises(ValueError, match="not inside"):
        t.post_set_memory_attributes(store, M2 + 3, M2 + 3, P)
    with pytest.raises(ValueError, match="attrs must be a u64"):
        t.post_set_memory_attributes(store, M2, M2 + 1, 2**64)
    with pytest.raises(TypeError, match="RangeTree or an XArray"):
        t.init_memory_attributes(object())
    with pytest.raises(ValueError, match="max_level"):
        t.max_mapping_level(M2, 0)
    # Nothing changed by the failures.
    assert t.mixed_runs(2) == [] and t.max_mapping_level(M2) == 2


def test_the_first_name_of_the_tdp_page_table_still_works() -> None:
    import memattr

    assert memattr.Stage2Map is memattr.TdpPageTable is TdpPageTable
    m = memattr.Stage2Map()
    assert m.map(5, 1, False)[0] and m.mapped_level(5) == 1


def test_tdp_page_table_zap_runs() -> None:
    m = TdpPageTable()
    assert m.map(5, 1) == (True, (0, 0, 0))
    assert m.map(5, 1) == (False, (0, 0, 0))  # spurious: already mapped
    assert m.map(6, 2) == (True, (1, 0, 0))  # a 2M leaf replaces the 4K below
    assert m.mapped_level(511) == 2 and m.mapped_level(512) == 0
    assert m.counts() == (0, 1, 0)
    assert m.zap(511, 512) == (0, 1, 0)  # straddling leaf goes whole
    assert m.map(2**52 - 1, 3) == (True, (0, 0, 0))  # the last page of the gpa space
    assert m.runs(3) == [(2**52 - G1, 2**52)]
    with pytest.raises(ValueError, match="gpa space"):
        m.map(2**52, 1)
    assert m.zap_all() == (0, 0, 1)
    with pytest.raises(ValueError, match="start"):
        m.zap(5, 5)
    with pytest.raises(ValueError, match="level"):
        m.map(0, 4)


def test_tdp_page_table_split_huge_pages_keeps_the_translation() -> None:
    m = TdpPageTable()
    m.map(0, 3)
    m.map(G1 + 5, 2)
    m.map(G1 + M2, 1)
    assert m.split_huge_pages(0, G1 + M2) == (0, 1, 1)
    assert m.counts() == (G1 + M2 + 1, 0, 0)
    assert m.runs(1) == [(0, G1 + M2 + 1)]  # coalesced: every gfn still mapped
    assert m.split_huge_pages(0, 2**52) == (0, 0, 0)
    with pytest.raises(ValueError, match="start"):
        m.split_huge_pages(7, 7)
    with pytest.raises(TypeError):
        m.split_huge_pages(0, "1")  # type: ignore[arg-type]


# --- property: range-based tracking == the kernel's per-hugepage loops --------

_slot = st.tuples(
    st.integers(0, 4),  # gap before the slot, in 2M pages
    st.sampled_from([0, 1, M2 - 1, 3]),  # misalignment of base_gfn
    st.integers(1, 3 * G1),  # npages
    st.sampled_from(["congruent", "off_by_page", "off_by_2m"]),
)
_conv = st.tuples(
    st.integers(0, 5 * G1),
    st.one_of(st.integers(1, 8), st.sampled_from([M2 - 1, M2, M2 + 1, G1 - 1, G1, G1 + 1]), st.integers(1, 2 * G1)),
    st.sampled_from([0, P, P | 1]),
)


@given(slots=st.lists(_slot, min_size=1, max_size=3), pre=st.lists(_conv, max_size=3), ops=st.lists(_conv, min_size=1, max_size=12))
def test_range_tracking_equals_per_hugepage_reference(
    slots: list[tuple[int, int, int, str]],
    pre: list[tuple[int, int, int]],
    ops: list[tuple[int, int, int]],
) -> None:
    rt, xa = RangeTree(), XArray()
    for start, length, value in pre:
        rt.set_range(start, start + length, value)
        xa.set_range(start, start + length, value)
    ranged: list[Tracker] = []
    reference: list[Tracker] = []
    base = 0
    for gap, misalign, npages, congruence in slots:
        base += gap * M2 + misalign
        ua = {"congruent": base, "off_by_page": base + 1, "off_by_2m": base + M2}[congruence] << 12
        r, k = RangeHugepageTracker(base, npages, ua), LpageInfoTracker(base, npages, ua)
        r.init_memory_attributes(rt)
        k.init_memory_attributes(xa)
        ranged.append(r)
        reference.append(k)
        base += npages

    def check() -> None:
        for r, k in zip(ranged, reference):
            for level in (2, 3):
                assert r.mixed_runs(level) == k.mixed_runs(level)
            for gfn in {r.base_gfn, r.base_gfn + r.npages - 1, r.base_gfn + r.npages // 2}:
                assert r.max_mapping_level(gfn) == k.max_mapping_level(gfn)

    check()
    for start, length, value in ops:
        convert(rt, ranged, start, start + length, value)
        convert(xa, reference, start, start + length, value)
        check()
