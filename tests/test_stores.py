"""The store classes through Python: the API of the contract and every error path."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import memattr
from memattr import RangeTree, XArray

U64_MAX = (1 << 64) - 1
Store = RangeTree | XArray

STORES = [RangeTree, XArray]


@pytest.fixture(params=STORES, ids=lambda c: c.__name__)
def store(request: pytest.FixtureRequest) -> Store:
    return request.param()


def snapshot(s: Store) -> tuple[list[tuple[int, int, int]], int, int]:
    return list(s.runs(0, U64_MAX)), s.memory_bytes(), s.entry_count()


def test_exported_from_package() -> None:
    assert memattr.RangeTree is memattr._native.RangeTree
    assert memattr.XArray is memattr._native.XArray
    assert {"RangeTree", "XArray"} <= set(memattr.__all__)


def test_empty(store: Store) -> None:
    assert store.get(0) == 0
    assert store.get(U64_MAX) == 0
    assert len(store) == 0
    assert store.entry_count() == 0
    assert list(store.runs(0, U64_MAX)) == [(0, U64_MAX, 0)]
    assert store.has_value(0, U64_MAX, 0)
    assert not store.has_value(0, 1, 8)
    assert store.count_pages(0, U64_MAX, 0) == U64_MAX
    # An empty store costs its fixed part only: the RangeTree its root, one
    # leaf of 32 runs (three u64 arrays and a 16-byte header); the XArray
    # the kernel's struct xarray (a lock, flags and the head pointer, 16
    # bytes, no node). Storing allocates; clearing again gives it back.
    empty = 16 + 3 * 32 * 8 if isinstance(store, RangeTree) else 16
    assert store.memory_bytes() == empty
    store.set_range(5, 100, 8)
    # One run fits the RangeTree's root leaf; the XArray needs nodes for
    # its 95 entries.
    assert (store.memory_bytes() == empty) == isinstance(store, RangeTree)
    store.set_range(5, 100, 0)
    assert store.memory_bytes() == empty
    assert type(store).__name__ in repr(store)


def test_set_get_runs(store: Store) -> None:
    store.set_range(10, 20, 8)
    store.set_range(20, 30, 8)
    store.set_range(15, 16, 0)
    assert [store.get(g) for g in (9, 10, 14, 15, 16, 29, 30)] == [0, 8, 8, 0, 8, 8, 0]
    assert list(store.runs(0, 40)) == [(0, 10, 0), (10, 15, 8), (15, 16, 0), (16, 30, 8), (30, 40, 0)]
    assert list(store.runs(12, 13)) == [(12, 13, 8)]
    it = store.runs(0, 40)
    assert iter(it) is it
    if isinstance(store, RangeTree):
        assert len(store) == 2
    else:
        assert len(store) == 19


def test_values_are_full_u64(store: Store) -> None:
    store.set_range(U64_MAX - 1, U64_MAX, U64_MAX)
    assert store.get(U64_MAX - 1) == U64_MAX
    assert store.get(U64_MAX) == 0
    assert store.has_value(U64_MAX - 1, U64_MAX, U64_MAX)
    assert list(store.runs(U64_MAX - 2, U64_MAX)) == [(U64_MAX - 2, U64_MAX - 1, 0), (U64_MAX - 1, U64_MAX, U64_MAX)]


def test_has_value_and_count_with_mask(store: Store) -> None:
    store.set_range(0, 8, 0b1000)
    store.set_range(8, 16, 0b1001)
    assert not store.has_value(0, 16, 0b1000)
    assert store.has_value(0, 16, 0b1000, mask=0b1000)
    assert store.has_value(0, 16, 0b1000, 0b1000)
    assert store.has_value(16, 32, 0b0001, mask=0b1000)
    assert store.has_value(0, 32, 0, mask=0)
    assert store.count_pages(0, 32, 0b1000, mask=0b1000) == 16
    assert store.count_pages(0, 32, 0b1001) == 8
    assert store.count_pages(0, 32, 0) == 16
    assert store.count_pages(0, 32, 0, mask=None) == 16


def test_get_many(store: Store) -> None:
    store.set_range(100, 200, 8)
    gfns = np.array([0, 99, 100, 150, 199, 200, U64_MAX], dtype=np.uint64)
    out = store.get_many(gfns)
    assert out.dtype == np.uint64
    assert out.tolist() == [0, 0, 8, 8, 8, 0, 0]
    assert store.get_many(np.array([], dtype=np.uint64)).tolist() == []
    # Non-contiguous views are read element by element.
    strided = np.arange(0, 400, dtype=np.uint64)[::50]
    assert store.get_many(strided).tolist() == [0, 0, 8, 8, 0, 0, 0, 0]
    assert gfns.tolist()[0] == 0  # input untouched


def test_set_many(store: Store) -> None:
    starts = np.array([0, 10, 5], dtype=np.uint64)
    ends = np.array([20, 15, 12], dtype=np.uint64)
    values = np.array([1, 2, 0], dtype=np.uint64)
    store.set_many(starts, ends, values)
    assert list(store.runs(0, 20)) == [(0, 5, 1), (5, 12, 0), (12, 15, 2), (15, 20, 1)]


def test_reserve_and_release(store: Store) -> None:
    store.set_range(0, 100, 8)
    store.reserve(0, 1 << 12)
    store.reserve(0, 1 << 12, limit=None)
    assert store.get(500) == 0
    store.set_range(0, 1 << 12, 8)
    store.release_reservations()
    assert list(store.runs(0, 1 << 12)) == [(0, 1 << 12, 8)]


def test_reserve_over_limit_raises_memory_error_and_keeps_nothing(store: Store) -> None:
    store.set_range(3, 70, 8)
    before = snapshot(store)
    with pytest.raises(MemoryError, match="limit"):
        store.reserve(0, 1 << 16, limit=0)
    assert snapshot(store) == before
    store.reserve(0, 10, limit=1 << 30)
    store.release_reservations()
    assert snapshot(store)[0] == before[0]


def test_reserve_unless_has_value(store: Store) -> None:
    store.set_range(3, 70, 8)
    before = snapshot(store)
    # Already has the value: True, nothing reserved (not even over a limit).
    assert store.reserve_unless_has_value(3, 70, 8, limit=0) is True
    assert snapshot(store) == before
    # Not yet: the reservation's MemoryError, keeping nothing...
    with pytest.raises(MemoryError, match="limit"):
        store.reserve_unless_has_value(0, 1 << 16, 8, limit=0)
    assert snapshot(store) == before
    # ...or False with the reservation made.
    assert store.reserve_unless_has_value(0, 1 << 12, 8) is False
    store.set_range(0, 1 << 12, 8)
    store.release_reservations()
    assert list(store.runs(0, 1 << 12)) == [(0, 1 << 12, 8)]
    with pytest.raises(ValueError, match="start"):
        store.reserve_unless_has_value(5, 5, 1)
    with pytest.raises(TypeError, match="value"):
        store.reserve_unless_has_value(0, 5, "x")


def test_xarray_memory_counts_kernel_nodes() -> None:
    x = XArray()
    base = x.memory_bytes()
    x.set_range(0, 1 << 12, 8)
    # 64 leaves under one root, struct xa_node is 576 bytes.
    assert x.memory_bytes() - base == 65 * 576
    x.set_range(0, 1 << 12, 0)
    assert x.memory_bytes() == base


def test_xarray_refuses_sizes_no_host_could_hold() -> None:
    x = XArray()
    x.set_range(5, 9, 1)
    before = snapshot(x)
    with pytest.raises(MemoryError):
        x.set_range(0, U64_MAX, 1)
    with pytest.raises(MemoryError):
        x.reserve(0, 1 << 62)
    assert snapshot(x) == before


def test_rangetree_memory_follows_runs() -> None:
    t = RangeTree()
    t.set_range(0, 1 << 40, 8)
    one = t.memory_bytes()
    assert 0 < one < 4096
    t.set_range(0, 1 << 50, 8)
    assert t.memory_bytes() == one
    assert len(t) == 1


BadCall = Callable[[Store], Any]

BAD_CALLS: list[tuple[str, BadCall, type[Exception], str]] = [
    ("get-negative", lambda s: s.get(-1), ValueError, "gfn"),
    ("get-too-big", lambda s: s.get(1 << 64), ValueError, "gfn"),
    ("get-float", lambda s: s.get(1.0), TypeError, "gfn"),
    ("get-bool", lambda s: s.get(True), TypeError, "gfn must be an int, not bool"),
    ("get-numpy-bool", lambda s: s.get(np.True_), TypeError, "gfn must be an int, not bool"),
    ("set-bool-value", lambda s: s.set_range(0, 5, True), TypeError, "value must be an int, not bool"),
    ("get-str", lambda s: s.get("1"), TypeError, "gfn"),
    ("set-empty", lambda s: s.set_range(5, 5, 1), ValueError, "start"),
    ("set-reversed", lambda s: s.set_range(6, 5, 1), ValueError, "end"),
    ("set-neg-start", lambda s: s.set_range(-1, 5, 1), ValueError, "start"),
    ("set-big-end", lambda s: s.set_range(0, 1 << 64, 1), ValueError, "end"),
    ("set-neg-value", lambda s: s.set_range(0, 5, -1), ValueError, "value"),
    ("set-big-value", lambda s: s.set_range(0, 5, 1 << 64), ValueError, "value"),
    ("set-none-value", lambda s: s.set_range(0, 5, None), TypeError, "value"),
    ("has-empty", lambda s: s.has_value(5, 5, 1), ValueError, "start"),
    ("has-neg-mask", lambda s: s.has_value(0, 5, 1, -1), ValueError, "mask"),
    ("has-str-value", lambda s: s.has_value(0, 5, "x"), TypeError, "value"),
    ("count-empty", lambda s: s.count_pages(9, 3, 1), ValueError, "start"),
    ("count-big-mask", lambda s: s.count_pages(0, 3, 1, mask=1 << 64), ValueError, "mask"),
    ("runs-empty", lambda s: s.runs(3, 3), ValueError, "start"),
    ("runs-neg", lambda s: s.runs(-3, 3), ValueError, "start"),
    ("reserve-empty", lambda s: s.reserve(3, 3), ValueError, "start"),
    ("reserve-neg-limit", lambda s: s.reserve(0, 3, limit=-1), ValueError, "limit"),
    ("reserve-float-limit", lambda s: s.reserve(0, 3, limit=1.5), TypeError, "limit"),
    ("get_many-list", lambda s: s.get_many([1, 2]), TypeError, "gfns"),
    ("get_many-int64", lambda s: s.get_many(np.arange(3)), TypeError, "gfns"),
    ("get_many-float", lambda s: s.get_many(np.zeros(3)), TypeError, "gfns"),
    ("get_many-2d", lambda s: s.get_many(np.zeros((2, 2), dtype=np.uint64)), ValueError, "gfns"),
    (
        "set_many-length",
        lambda s: s.set_many(np.zeros(2, np.uint64), np.ones(3, np.uint64), np.ones(2, np.uint64)),
        ValueError,
        "same length",
    ),
    (
        "set_many-bad-range",
        lambda s: s.set_many(
            np.array([0, 7], np.uint64), np.array([5, 7], np.uint64), np.array([1, 1], np.uint64)
        ),
        ValueError,
        r"starts\[1\]",
    ),
    (
        "set_many-dtype",
        lambda s: s.set_many(np.zeros(2, np.uint64), np.ones(2, np.uint64), np.ones(2, np.int32)),
        TypeError,
        "values",
    ),
]


@pytest.mark.parametrize(("call", "exc", "match"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_and_change_nothing(store: Store, call: BadCall, exc: type[Exception], match: str) -> None:
    store.set_range(1, 4, 8)
    store.set_range(10, 12, 1)
    before = snapshot(store)
    with pytest.raises(exc, match=match):
        call(store)
    assert snapshot(store) == before


def test_shared_between_threads(store: Store) -> None:
    # Readers and a writer on one object: no borrow errors, no torn results.
    errors: list[BaseException] = []
    gfns = np.arange(0, 1 << 14, 7, dtype=np.uint64)

    def writer() -> None:
        try:
            for i in range(200):
                store.set_range(0, 1 << 14, 8 if i % 2 else 1)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(200):
                out = store.get_many(gfns)
                assert len(set(out.tolist()) - {0, 1, 8}) == 0
                assert store.count_pages(0, 1 << 14, 8) in (0, 1 << 14)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_both_stores_agree_on_a_random_workload() -> None:
    rng = np.random.default_rng(7)
    t, x = RangeTree(), XArray()
    for _ in range(300):
        s = int(rng.integers(0, 5000))
        e = s + int(rng.integers(1, 300))
        v = int(rng.choice([0, 1, 8, 9]))
        t.set_range(s, e, v)
        x.set_range(s, e, v)
    assert list(t.runs(0, 6000)) == list(x.runs(0, 6000))
    gfns = rng.integers(0, 6000, 2000).astype(np.uint64)
    assert np.array_equal(t.get_many(gfns), x.get_many(gfns))
    for v in (0, 1, 8, 9):
        assert t.count_pages(0, 6000, v) == x.count_pages(0, 6000, v)
