"""The stores (RangeTree, XArray, MapleTree) against a per-page dict oracle,
with hypothesis."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memattr import MapleTree, RangeTree, XArray

U64_MAX = (1 << 64) - 1
WINDOW = 200
# Windows at 0, in the middle and touching 2**64, so edge arithmetic is hit.
BASES = [0, 1 << 40, U64_MAX - WINDOW]
VALUES = st.sampled_from([0, 1, 8, 9, U64_MAX])
MASKS = st.sampled_from([U64_MAX, 8, 1, 0])


def oracle_runs(pages: dict[int, int], start: int, end: int) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for g in range(start, end):
        v = pages.get(g, 0)
        if out and out[-1][2] == v:
            out[-1][1] = g + 1
        else:
            out.append([g, g + 1, v])
    return [(a, b, c) for a, b, c in out]


@st.composite
def window_range(draw: st.DrawFn) -> tuple[int, int]:
    a = draw(st.integers(0, WINDOW - 1))
    b = draw(st.integers(a + 1, WINDOW))
    return a, b


@given(
    base=st.sampled_from(BASES),
    ops=st.lists(st.tuples(window_range(), VALUES), max_size=30),
    probe=window_range(),
    value=VALUES,
    mask=MASKS,
)
def test_stores_match_dict_oracle(
    base: int, ops: list[tuple[tuple[int, int], int]], probe: tuple[int, int], value: int, mask: int
) -> None:
    pages: dict[int, int] = {}
    stores = [RangeTree(), XArray(), MapleTree()]
    for (a, b), v in ops:
        for s in stores:
            s.set_range(base + a, base + b, v)
        for g in range(base + a, base + b):
            pages[g] = v
    s0, s1 = base + probe[0], base + probe[1]
    want = value & mask
    window = [pages.get(g, 0) for g in range(s0, s1)]
    gfns = np.arange(base, base + WINDOW, dtype=np.uint64)
    expect = [pages.get(base + i, 0) for i in range(WINDOW)]
    for s in stores:
        assert list(s.runs(s0, s1)) == oracle_runs(pages, s0, s1)
        assert s.has_value(s0, s1, value, mask) == all(p & mask == want for p in window)
        assert s.count_pages(s0, s1, value, mask) == sum(p & mask == want for p in window)
        assert s.get_many(gfns).tolist() == expect
    nonzero_runs = [r for r in oracle_runs(pages, base, base + WINDOW) if r[2] != 0]
    assert len(stores[0]) == len(nonzero_runs)
    assert len(stores[1]) == sum(1 for v in pages.values() if v != 0)
    # The maple tree's slots: every range of the index space, NULL ones
    # included (none at all when everything is NULL).
    window_runs = oracle_runs(pages, base, base + WINDOW)
    slots = len(window_runs) + (base > 0 and window_runs[0][2] != 0) + (window_runs[-1][2] != 0)
    assert len(stores[2]) == (slots if nonzero_runs else 0)


class StoresVsOracle(RuleBasedStateMachine):
    """Random set/reserve/release/query sequences on both stores at once."""

    def __init__(self) -> None:
        super().__init__()
        self.base = BASES[0]
        self.pages: dict[int, int] = {}
        self.stores = [RangeTree(), XArray(), MapleTree()]
        self.based = False

    @precondition(lambda self: not self.based)
    @rule(base=st.sampled_from(BASES))
    def pick_base(self, base: int) -> None:
        self.base = base
        self.based = True

    @rule(r=window_range(), value=VALUES)
    def set_range(self, r: tuple[int, int], value: int) -> None:
        self.based = True
        a, b = self.base + r[0], self.base + r[1]
        for s in self.stores:
            s.set_range(a, b, value)
        for g in range(a, b):
            self.pages[g] = value

    @rule(r=window_range(), extra=st.integers(0, 4000))
    def reserve_with_limit(self, r: tuple[int, int], extra: int) -> None:
        a, b = self.base + r[0], self.base + r[1]
        for s in self.stores:
            before = (s.memory_bytes(), list(s.runs(self.base, self.base + WINDOW)))
            try:
                s.reserve(a, b, limit=before[0] + extra)
            except MemoryError:
                assert (s.memory_bytes(), list(s.runs(self.base, self.base + WINDOW))) == before
            else:
                assert s.memory_bytes() <= before[0] + extra

    @rule()
    def release(self) -> None:
        for s in self.stores:
            s.release_reservations()

    @rule(gfn=st.integers(0, WINDOW - 1))
    def get(self, gfn: int) -> None:
        g = self.base + gfn
        for s in self.stores:
            assert s.get(g) == self.pages.get(g, 0)

    @rule(r=window_range(), value=VALUES, mask=MASKS)
    def has_value(self, r: tuple[int, int], value: int, mask: int) -> None:
        a, b = self.base + r[0], self.base + r[1]
        want = all(self.pages.get(g, 0) & mask == value & mask for g in range(a, b))
        for s in self.stores:
            assert s.has_value(a, b, value, mask) == want

    @invariant()
    def runs_match(self) -> None:
        expect = oracle_runs(self.pages, self.base, self.base + WINDOW)
        for s in self.stores:
            assert list(s.runs(self.base, self.base + WINDOW)) == expect


TestStoresVsOracle = StoresVsOracle.TestCase
