"""The RangeTree against the kernel's own maple tree, on one store stream.

The kernel side is Linux 6.1's lib/maple_tree.c itself, compiled in user
space in the kernel's radix-tree/maple test harness by
``benches/kernel_maple/build.sh`` (driver: ``benches/kernel_maple/memattr_maple.c``).
Not built by CI (it needs Debian's linux-source-6.1 and liburcu-dev): without
the binary this skips, saying so. ``MEMATTR_BUILD_KERNEL_MAPLE=1`` runs
build.sh first.

The stream is boot-and-churn's applied KVM_SET_MEMORY_ATTRIBUTES ranges, in
order (4 GiB guest by default, 1 TiB under ``MEMATTR_BENCH_FULL=1``), written
as little-endian u64 triples (start gfn, end gfn exclusive, value). The
RangeTree stores them with one ``set_many``; the driver with one
``mtree_store_range(start, end - 1, value ? xa_mk_value(value) : NULL)`` each
on a plain tree. Only the store loops are timed, each in a fresh store.

Rounds are interleaved (rangetree, kernel tree with the harness's slab,
kernel tree with a free-list node cache, then again), ``MEMATTR_KERNEL_MAPLE_ROUNDS``
of them (default 5 full, 2 otherwise), and medians are reported.

Same work, checked against the other side as the oracle: the kernel tree's
final contents, walked and merged into maximal runs by the driver, must equal
the RangeTree's non-zero ``runs()`` after every round, and again after the
first half of the stream, where the contents are fragmented (after the whole
boot-and-churn the guest is private again, a couple of runs).
No assertion is about time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import memattr
from memattr import workloads
from memattr.replayer import _chunk_sets

FULL = os.environ.get("MEMATTR_BENCH_FULL") == "1"
SIZE = "1T" if FULL else "4G"
ROUNDS = int(os.environ.get("MEMATTR_KERNEL_MAPLE_ROUNDS", "5" if FULL else "2"))
ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "benches" / "kernel_maple" / "build.sh"
BUILD_DIR = Path(os.environ.get("MEMATTR_KERNEL_MAPLE_DIR", ROOT / "target" / "kernel-maple"))
DRIVER = BUILD_DIR / "memattr_maple"
SLABS = ("harness", "freelist")

pytestmark = pytest.mark.timeout(3600 if FULL else 300)


def _driver() -> Path:
    """The built driver, or a skip naming why there is none."""
    if not DRIVER.is_file() and os.environ.get("MEMATTR_BUILD_KERNEL_MAPLE") == "1":
        done = subprocess.run(["bash", str(BUILD_SH)], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            pytest.skip(f"kernel maple tree driver did not build: {lines[-1]}")
    if not DRIVER.is_file():
        pytest.skip(
            f"kernel maple tree driver not built ({DRIVER}): run "
            "benches/kernel_maple/build.sh (needs Debian's linux-source-6.1 and liburcu-dev), "
            "or set MEMATTR_BUILD_KERNEL_MAPLE=1"
        )
    return DRIVER


def _write_stream(path: Path, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> None:
    np.stack([starts, ends, values], axis=1).astype("<u8").tofile(path)


def _read_runs(path: Path) -> list[tuple[int, int, int]]:
    a = np.fromfile(path, dtype="<u8").reshape(-1, 3)
    return [(int(s), int(e), int(v)) for s, e, v in a]


def _rangetree_runs(rt: memattr.RangeTree, end: int) -> list[tuple[int, int, int]]:
    """Non-zero maximal runs, the driver's output format."""
    return [r for r in rt.runs(0, end) if r[2] != 0]


def _run_driver(driver: Path, stream: Path, out: Path, *flags: str) -> dict[str, Any]:
    """One round in a fresh process: its round=0 line and its runs= line."""
    done = subprocess.run(
        [str(driver), str(stream), str(out), "1", *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    info: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        for field in line.split():
            key, _, value = field.partition("=")
            info[key] = value if key == "slab" else float(value)
    return info


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _kernel_version() -> str:
    info = BUILD_DIR / "memattr_maple.info"
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("kernel="):
                return line.partition("=")[2]
    return "6.1"


def bench_kernel_maple_side_by_side(capsys, tmp_path):
    """RangeTree.set_many against mtree_store_range, same stream, same
    final contents; prints both rates and their ratio."""
    driver = _driver()
    tr = workloads.boot_and_churn(SIZE)
    starts, ends, values = _chunk_sets(tr.ops, 0)
    n = len(starts)
    assert n > 0 and int(values.max()) <= (1 << 63) - 1  # what xa_mk_value holds
    top = int(ends.max())
    stream = tmp_path / "stream.bin"
    _write_stream(stream, starts, ends, values)

    # Mid-stream contents first (untimed): after the first half, where the
    # final state's couple of runs would hide a store the tree got wrong.
    half = n // 2
    half_stream = tmp_path / "half.bin"
    _write_stream(half_stream, starts[:half], ends[:half], values[:half])
    rt = memattr.RangeTree()
    rt.set_many(starts[:half], ends[:half], values[:half])
    want_half = _rangetree_runs(rt, top)
    assert len(want_half) > 1
    for slab in SLABS:
        _run_driver(driver, half_stream, tmp_path / "half_runs.bin", f"--slab={slab}")
        assert _read_runs(tmp_path / "half_runs.bin") == want_half, f"first half, slab={slab}"

    rt_seconds: list[float] = []
    kernel: dict[str, list[dict[str, Any]]] = {slab: [] for slab in SLABS}
    want: list[tuple[int, int, int]] | None = None
    for _ in range(ROUNDS):
        rt = memattr.RangeTree()
        t0 = time.perf_counter()
        rt.set_many(starts, ends, values)
        rt_seconds.append(time.perf_counter() - t0)
        runs = _rangetree_runs(rt, top)
        assert want is None or runs == want
        want = runs
        for slab in SLABS:
            out = tmp_path / f"runs_{slab}.bin"
            r = _run_driver(driver, stream, out, f"--slab={slab}")
            assert r["stores"] == n
            assert _read_runs(out) == want, f"final contents, slab={slab}"
            kernel[slab].append(r)

    rt_med = statistics.median(rt_seconds)
    med = {slab: statistics.median(r["seconds"] for r in kernel[slab]) for slab in SLABS}
    best = {slab: min(r["seconds"] for r in kernel[slab]) for slab in SLABS}
    last = kernel["harness"][-1]
    assert all(r["nodes"] == last["nodes"] for rs in kernel.values() for r in rs)
    maple_bytes = int(last["nodes"] * last["node_bytes"])
    with capsys.disabled():
        print(
            f"\n[bench_kernel_maple] boot-and-churn {SIZE}, {n:,} sets, store only, median of {ROUNDS} "
            f"interleaved rounds: rangetree {n / rt_med:,.0f} sets/s ({_ms(rt_med)}, best {_ms(min(rt_seconds))}), "
            f"kernel maple tree (Linux {_kernel_version()}, user space) {n / med['harness']:,.0f} sets/s "
            f"({_ms(med['harness'])}, best {_ms(best['harness'])}), ratio {med['harness'] / rt_med:.1f}x; "
            f"with a free-list node cache instead of the harness's malloc slab {n / med['freelist']:,.0f} sets/s "
            f"({_ms(med['freelist'])}, best {_ms(best['freelist'])}), ratio {med['freelist'] / rt_med:.1f}x; "
            f"final contents equal ({len(want or []):,} runs; {len(want_half):,} after the first half); "
            f"memory rangetree {rt.memory_bytes():,} B ({rt.entry_count():,} runs), "
            f"maple tree {int(last['nodes']):,} nodes x {int(last['node_bytes'])} B = {maple_bytes:,} B "
            f"({int(last['entries']):,} entries: a plain store does not merge equal neighbours)"
        )
