"""Converting a guest's whole RAM to private, MMU passes included.

Compares the range store + range-based hugepage tracking (``store="rangetree"``)
with the kernel's structures: the per-page xarray + lpage_info arrays walked
per hugepage (``store="xarray"``). Each round starts from a fresh Vm whose
memory is shared and mapped with 1G leaves (one fault per 1G page, not timed);
the timed call is one KVM_SET_MEMORY_ATTRIBUTES over all of RAM: validation,
reservation, the pre-set pass (zap of every leaf, TLB flush), the store, and
the post-set pass (mixed tracking for 2M and 1G).

Under pytest the sizes are modest (1 GiB, benchmarks disabled by default run
each once). ``MEMATTR_BENCH_FULL=1`` adds the 1 TiB guest of the issue (the
xarray needs ~2.4 GiB and ~15 s per round there). As a script it measures both
stores side by side and prints the times and the ratio::

    .venv/bin/python benches/bench_mmu.py            # 1 GiB, 64 GiB
    .venv/bin/python benches/bench_mmu.py 1024       # 1 TiB
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import pytest

from memattr import KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM, Vm
from memattr._native import LpageInfoTracker, RangeHugepageTracker, RangeTree, XArray

GIB = 1 << 30
FULL = os.environ.get("MEMATTR_BENCH_FULL") == "1"
SIZES_GIB = [1, 1024] if FULL else [1]
KINDS = ["rangetree", "xarray"]


def booted_vm(kind: str, size: int) -> Vm:
    """A confidential guest with ``size`` bytes of RAM in one guest_memfd
    slot, all shared, touched once per 1G page (mapped 1G)."""
    vm = Vm(KVM_X86_SW_PROTECTED_VM, kind)
    fd = vm.create_guest_memfd(size)
    vm.set_user_memory_region(0, 0, size, flags=KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
    for gpa in range(0, size, GIB):
        vm.fault(gpa)
    return vm


def convert_all(vm: Vm, size: int) -> None:
    vm.set_memory_attributes(0, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)


def check_converted(vm: Vm, size: int) -> None:
    # Everything private, nothing mapped, nothing mixed.
    assert vm.range_has_attributes(0, size >> 12, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    assert vm.stats.mapped == {1: 0, 2: 0, 3: 0}
    assert vm.stats.zapped_pages[3] == size // GIB
    assert vm.max_mapping_level((size >> 12) - 1) == 1  # guest_memfd max order 0
    assert not vm.hugepage_mixed(0, 0, 3)


@pytest.mark.parametrize("size_gib", SIZES_GIB, ids=[f"{g}GiB" for g in SIZES_GIB])
@pytest.mark.parametrize("kind", KINDS)
def bench_convert_whole_ram(benchmark: pytest.FixtureRequest, kind: str, size_gib: int) -> None:
    size = size_gib * GIB
    vms: list[Vm] = []

    def setup() -> tuple[tuple[Vm, int], dict[str, object]]:
        vms.append(booted_vm(kind, size))
        return (vms[-1], size), {}

    benchmark.pedantic(convert_all, setup=setup, rounds=1 if size_gib > 64 else 3)  # type: ignore[attr-defined]
    check_converted(vms[-1], size)


def _post_set_pass(tracker_cls: type, store_cls: type, npages: int) -> Callable[[], None]:
    """The post-set pass alone, over a slot-sized range starting one page
    into the slot (head and tail straddle, everything else covered)."""
    store = store_cls()
    tracker = tracker_cls(0, npages)
    tracker.init_memory_attributes(store)
    store.set_range(1, npages - 1, KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def run() -> None:
        tracker.post_set_memory_attributes(store, 1, npages - 1, KVM_MEMORY_ATTRIBUTE_PRIVATE)

    return run


@pytest.mark.parametrize("size_gib", SIZES_GIB, ids=[f"{g}GiB" for g in SIZES_GIB])
@pytest.mark.parametrize(
    ("tracker_cls", "store_cls"),
    [(RangeHugepageTracker, RangeTree), (LpageInfoTracker, XArray)],
    ids=["range", "lpage_info"],
)
def bench_post_set_pass(benchmark: pytest.FixtureRequest, tracker_cls: type, store_cls: type, size_gib: int) -> None:
    run = _post_set_pass(tracker_cls, store_cls, size_gib * GIB >> 12)
    benchmark(run)  # type: ignore[operator]


# --- side-by-side runner --------------------------------------------------------------


def _time(fn: Callable[[], None], setup: Callable[[], None] | None = None, rounds: int = 3) -> float:
    samples = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [1, 64]
    print(f"{'size':>8} {'what':<22} {'rangetree':>12} {'xarray':>12} {'ratio':>10}")
    for gib in sizes:
        size = gib * GIB
        rounds = 1 if gib > 64 else 3
        times = {}
        for kind in KINDS:
            holder: list[Vm] = []
            times[kind] = _time(
                lambda: convert_all(holder[-1], size),
                setup=lambda kind=kind: (holder.clear(), holder.append(booted_vm(kind, size)))[-1],  # type: ignore[misc]
                rounds=rounds,
            )
            check_converted(holder[-1], size)
            holder.clear()
        ratio = times["xarray"] / times["rangetree"]
        print(
            f"{gib:>5}GiB {'whole-RAM conversion':<22} {times['rangetree'] * 1e3:>10.3f}ms "
            f"{times['xarray'] * 1e3:>10.3f}ms {ratio:>9.0f}x"
        )
        post = {
            name: _time(_post_set_pass(t, s, size >> 12), rounds=5)
            for name, t, s in (("range", RangeHugepageTracker, RangeTree), ("lpage_info", LpageInfoTracker, XArray))
        }
        print(
            f"{gib:>5}GiB {'post-set pass alone':<22} {post['range'] * 1e3:>10.3f}ms "
            f"{post['lpage_info'] * 1e3:>10.3f}ms {post['lpage_info'] / post['range']:>9.0f}x"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
