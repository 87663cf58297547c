"""Store benchmarks: RangeTree vs XArray (vs MapleTree), numpy.searchsorted and portion.

Under pytest (collected in every run with --benchmark-disable, so each
benchmark runs once as a smoke test) the sizes are small; with
MEMATTR_BENCH_FULL=1 they are the issue's. Time them with:

    .venv/bin/python -m pytest benches/bench_stores.py --benchmark-enable

As a script, it measures the issue's ratios side by side in one run:

    .venv/bin/python benches/bench_stores.py            # everything
    .venv/bin/python benches/bench_stores.py --no-rust  # skip the criterion part
    .venv/bin/python benches/bench_stores.py --three 1G,16G,256G,1T
        # only the three stores (RangeTree, XArray, the series' maple tree)
        # side by side on boot-and-churn, store only, per guest size

The mixed set/get comparison with the `rangemap` crate runs in Rust (there is
no Python binding of rangemap): the script calls
`cargo bench --bench stores -- ratios` and prints its output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memattr import MapleTree, RangeTree, XArray
from memattr.replayer import apply_to_store
from memattr.units import format_size, parse_size
from memattr.workloads import boot_and_churn

PRIVATE = 1 << 3
FULL = os.environ.get("MEMATTR_BENCH_FULL") == "1"

# The sizes, and the small ones a normal test run uses.
WHOLE_PAGES = 1 << 24 if FULL else 1 << 16
GET_RUNS = 100_000 if FULL else 2_000
GET_QUERIES = 2_000_000 if FULL else 20_000
MIXED_RUNS = 2_000 if FULL else 200
MIXED_OPS = 20_000 if FULL else 500

Store = RangeTree | XArray


def populate(store: Store, runs: int) -> None:
    """`runs` stored runs of values 1/2 separated by one-page holes."""
    i = np.arange(runs, dtype=np.uint64)
    store.set_many(i * 4, i * 4 + 3, (i & 1) + 1)


def boundaries(store: Store, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and values of every run (zero runs included) in [0, end)."""
    runs = list(store.runs(0, end))
    return (
        np.fromiter((r[0] for r in runs), dtype=np.uint64, count=len(runs)),
        np.fromiter((r[2] for r in runs), dtype=np.uint64, count=len(runs)),
    )


def mixed_ops(runs: int, n: int, seed: int = 7) -> list[tuple[int, int, int]]:
    """Random short sets (values 0..2) and gets, 1:1; a get has end 0."""
    rng = np.random.default_rng(seed)
    span = runs * 4
    starts = rng.integers(0, span, n).tolist()
    lens = rng.integers(1, 5, n).tolist()
    vals = rng.integers(0, 3, n).tolist()
    return [(s, s + ln, v) if i % 2 == 0 else (s, 0, 0) for i, (s, ln, v) in enumerate(zip(starts, lens, vals))]


def run_rangetree(t: RangeTree, ops: list[tuple[int, int, int]]) -> int:
    acc = 0
    for s, e, v in ops:
        if e:
            t.set_range(s, e, v)
        else:
            acc += t.get(s)
    return acc


def run_portion(d: Any, ops: list[tuple[int, int, int]]) -> int:
    import portion as P

    acc = 0
    for s, e, v in ops:
        if e:
            iv = P.closedopen(s, e)
            if v:
                d[iv] = v
            else:
                d.pop(iv, None)
        else:
            acc += d.get(s, 0)
    return acc


def portion_populated(runs: int) -> Any:
    import portion as P

    d = P.IntervalDict()
    for i in range(runs):
        d[P.closedopen(i * 4, i * 4 + 3)] = (i & 1) + 1
    return d


# --- pytest-benchmark suites -------------------------------------------------


@pytest.mark.parametrize("cls", [RangeTree, XArray], ids=["RangeTree", "XArray"])
def bench_whole_range_set(benchmark: Any, cls: type[Store]) -> None:
    def go() -> Store:
        s = cls()
        s.set_range(0, WHOLE_PAGES, PRIVATE)
        return s

    s = benchmark(go)
    assert s.count_pages(0, WHOLE_PAGES, PRIVATE) == WHOLE_PAGES


def bench_get_many_rangetree(benchmark: Any) -> None:
    t = RangeTree()
    populate(t, GET_RUNS)
    gfns = np.random.default_rng(1).integers(0, GET_RUNS * 4, GET_QUERIES).astype(np.uint64)
    out = benchmark(t.get_many, gfns)
    bounds, vals = boundaries(t, GET_RUNS * 4)
    assert np.array_equal(out, vals[np.searchsorted(bounds, gfns, side="right") - 1])


def bench_get_many_searchsorted_floor(benchmark: Any) -> None:
    t = RangeTree()
    populate(t, GET_RUNS)
    gfns = np.random.default_rng(1).integers(0, GET_RUNS * 4, GET_QUERIES).astype(np.uint64)
    bounds, _ = boundaries(t, GET_RUNS * 4)
    idx = benchmark(np.searchsorted, bounds, gfns, side="right")
    assert len(idx) == len(gfns)


def bench_mixed_rangetree(benchmark: Any) -> None:
    ops = mixed_ops(MIXED_RUNS, MIXED_OPS)

    def setup() -> tuple[tuple[RangeTree, list[tuple[int, int, int]]], dict[str, Any]]:
        t = RangeTree()
        populate(t, MIXED_RUNS)
        return (t, ops), {}

    benchmark.pedantic(run_rangetree, setup=setup, rounds=3)


def bench_mixed_portion(benchmark: Any) -> None:
    ops = mixed_ops(MIXED_RUNS, MIXED_OPS // 10)

    def setup() -> tuple[tuple[Any, list[tuple[int, int, int]]], dict[str, Any]]:
        return (portion_populated(MIXED_RUNS), ops), {}

    benchmark.pedantic(run_portion, setup=setup, rounds=1)


def bench_portion_agrees_with_rangetree() -> None:
    # The comparison is only meaningful if both do the same thing.
    ops = mixed_ops(100, 400, seed=3)
    t = RangeTree()
    populate(t, 100)
    assert run_rangetree(t, ops) == run_portion(portion_populated(100), ops)


# --- script mode: the ratios, side by side -----------------------------


def time_ops(make: Callable[[], Any], run: Callable[[Any, Any], Any], ops: Any, rounds: int) -> float:
    """Best time of `run(store, ops)` on a fresh `make()` store, setup untimed."""
    out = float("inf")
    for _ in range(rounds):
        store = make()
        t0 = time.perf_counter()
        run(store, ops)
        out = min(out, time.perf_counter() - t0)
    return out


def interleaved(fns: list[Callable[[], Any]], rounds: int) -> list[float]:
    """Best time of each, measured in alternation so load hits all alike."""
    out = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            out[i] = min(out[i], time.perf_counter() - t0)
    return out


def ratios(rust: bool) -> None:
    pages = 1 << 24
    print("== whole-range set of 2^24 pages (64 GiB guest made private), from Python ==")
    stores: dict[str, Store] = {}

    def whole(cls: type[Store]) -> Callable[[], None]:
        def go() -> None:
            s = cls()
            s.set_range(0, pages, PRIVATE)
            stores[cls.__name__] = s

        return go

    # The RangeTree call is ~1 us, so time a batch of them per round.
    batch = 1000

    def whole_batch() -> None:
        for _ in range(batch):
            whole(RangeTree)()

    t_rt, t_xa = interleaved([whole_batch, whole(XArray)], 3)
    t_rt /= batch
    m_rt, m_xa = stores["RangeTree"].memory_bytes(), stores["XArray"].memory_bytes()
    print(f"  RangeTree {t_rt * 1e6:10.2f} us  {m_rt:>11} bytes")
    print(f"  XArray    {t_xa * 1e6:10.0f} us  {m_xa:>11} bytes")
    print(f"  RangeTree vs XArray: {t_xa / t_rt:,.0f}x faster, {m_xa / m_rt:,.0f}x less memory")
    stores.clear()

    print("== get_many: 2M random gfns over a tree of 100k runs ==")
    runs = 100_000
    t = RangeTree()
    populate(t, runs)
    gfns = np.random.default_rng(1).integers(0, runs * 4, 2_000_000).astype(np.uint64)
    bounds, vals = boundaries(t, runs * 4)
    assert np.array_equal(t.get_many(gfns), vals[np.searchsorted(bounds, gfns, side="right") - 1])
    t_get, t_ss, t_ss_gather = interleaved(
        [
            lambda: t.get_many(gfns),
            lambda: np.searchsorted(bounds, gfns, side="right"),
            lambda: vals[np.searchsorted(bounds, gfns, side="right") - 1],
        ],
        5,
    )
    print(f"  RangeTree.get_many                 {t_get * 1e3:8.1f} ms")
    print(f"  numpy.searchsorted (boundaries)    {t_ss * 1e3:8.1f} ms")
    print(f"  numpy.searchsorted + value gather  {t_ss_gather * 1e3:8.1f} ms")
    print(f"  get_many / searchsorted: {t_get / t_ss:.2f}x  (target <= 1.5x); vs searchsorted+gather: {t_get / t_ss_gather:.2f}x")

    print("== random set/get from Python: RangeTree vs portion.IntervalDict ==")
    runs, n = 2_000, 20_000
    ops = mixed_ops(runs, n)
    # portion is slow: time it on a prefix of the same stream, per op.
    n_portion = 2_000
    t_tree = time_ops(lambda: _populated_tree(runs), run_rangetree, ops, 3) / n
    t_portion = time_ops(lambda: portion_populated(runs), run_portion, ops[:n_portion], 1) / n_portion
    print(f"  RangeTree       {t_tree * 1e9:10.0f} ns/op   ({n} ops at {runs} runs)")
    print(f"  portion         {t_portion * 1e9:10.0f} ns/op   ({n_portion} ops, same stream)")
    print(f"  RangeTree vs portion.IntervalDict: {t_portion / t_tree:,.0f}x faster  (target >= 50x)")

    if rust:
        root = Path(__file__).resolve().parent.parent
        cargo = shutil.which("cargo")
        if cargo is None:
            print("== cargo not found: run `cargo bench --bench stores -- ratios` for the rangemap ratio ==")
            return
        print("== Rust side (cargo bench --bench stores -- ratios): includes RangeTree vs rangemap ==", flush=True)
        r = subprocess.run([cargo, "bench", "--bench", "stores", "--", "ratios"], cwd=root, capture_output=True, text=True)
        sys.stdout.write("".join(ln + "\n" for ln in r.stdout.splitlines() if not ln.startswith("Gnuplot")))
        if r.returncode != 0:
            sys.stdout.write(r.stderr[-2000:])


def _populated_tree(runs: int) -> RangeTree:
    t = RangeTree()
    populate(t, runs)
    return t


# --- three stores on boot-and-churn (the in-place series' maple tree) ---------------

THREE = {"rangetree": RangeTree, "xarray": XArray, "mapletree": MapleTree}
# The per-page store holds a 1 TiB guest's 2^28 pages one by one: skipped
# above this size unless asked for.
XARRAY_MAX = 64 << 30


def three_stores(guest: int, kinds: list[str]) -> dict[str, dict[str, float]]:
    """Each store alone (no Vm) replaying boot-and-churn for a `guest`-byte
    guest: seconds, bytes and entries before the final kexec and after it."""
    before = boot_and_churn(guest, kexec_at_end=False)
    whole = boot_and_churn(guest)
    out: dict[str, dict[str, float]] = {}
    for kind in kinds:
        s = THREE[kind]()
        apply_to_store(before, s)
        mid = (s.memory_bytes(), s.entry_count())
        s = THREE[kind]()
        t0 = time.perf_counter()
        apply_to_store(whole, s)
        secs = time.perf_counter() - t0
        out[kind] = {"seconds": secs, "mem_before_kexec": mid[0], "entries_before_kexec": mid[1],
                     "mem_after": s.memory_bytes(), "entries_after": s.entry_count()}
    return out


@pytest.mark.parametrize("kind", list(THREE))
def bench_three_stores_boot_and_churn(benchmark: Any, kind: str) -> None:
    trace = boot_and_churn(1 << 30, kexec_at_end=True)

    def go() -> Any:
        s = THREE[kind]()
        apply_to_store(trace, s)
        return s

    s = benchmark(go)
    # All three agree page for page with the first.
    ref = THREE["rangetree"]()
    apply_to_store(trace, ref)
    assert list(s.runs(0, 1 << 40)) == list(ref.runs(0, 1 << 40))


def three_ratios(sizes: list[int], xarray_max: int) -> None:
    print("== boot-and-churn, store only: RangeTree vs XArray vs MapleTree (the series') ==")
    print(f"{'guest':>6} {'store':>9} {'seconds':>9} {'bytes@churn':>12} {'entries':>9} "
          f"{'bytes@end':>10} {'entries':>8} {'time/RT':>8} {'mem@churn/RT':>12}")
    for size in sizes:
        kinds = [k for k in THREE if k != "xarray" or size <= xarray_max]
        r = three_stores(size, kinds)
        rt = r["rangetree"]
        for k in kinds:
            x = r[k]
            print(f"{format_size(size):>6} {k:>9} {x['seconds']:9.3f} {int(x['mem_before_kexec']):>12} "
                  f"{int(x['entries_before_kexec']):>9} {int(x['mem_after']):>10} "
                  f"{int(x['entries_after']):>8} {x['seconds'] / rt['seconds']:8.2f} "
                  f"{x['mem_before_kexec'] / rt['mem_before_kexec']:12.2f}")
        if "xarray" not in kinds:
            print(f"{format_size(size):>6}    xarray  skipped (> {format_size(xarray_max)}; --xarray-max)")
        sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-rust", action="store_true", help="skip the criterion/rangemap part")
    p.add_argument("--three", metavar="SIZES", help="only the three-store boot-and-churn table, "
                   "for these comma-separated guest sizes (e.g. 1G,16G,256G,1T)")
    p.add_argument("--xarray-max", default=format_size(XARRAY_MAX),
                   help="largest guest the per-page XArray is run for")
    args = p.parse_args()
    if args.three:
        three_ratios([parse_size(s) for s in args.three.split(",")], parse_size(args.xarray_max))
        return
    ratios(rust=not args.no_rust)
    three_ratios([1 << 30, 16 << 30], XARRAY_MAX)


if __name__ == "__main__":
    main()
