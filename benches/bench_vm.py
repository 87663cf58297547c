"""The cost of KVM_SET_MEMORY_ATTRIBUTES through the Vm.

1. A 4 KiB conversion on a VM with one memslot and no user hooks, against a
   trivial pure-Python per-page dict update of the same range (the floor of
   any Python model). The whole kernel path runs: validation, slots_lock,
   the early-exit check, reservation, the pre-set pass (mmu_lock,
   invalidate begin, range add, MMU zap), the store, the post-set pass
   (invalidate end, MMU hugepage tracking). Each round converts to private
   and back, so no call takes the early exit; also against a bare dict item
   update (issue 9's target: <= 10x), and through the Python driver (a hook).
2. Whole-RAM private on a 1 TiB guest with the range tree: one call over
   2**28 pages; nothing in the Vm loops per page or per hugepage in Python.

Under pytest (benchmarks disabled by default) each runs once and prints the
side-by-side ratio measured in the same process. As a script::

    .venv/bin/python benches/bench_vm.py
"""

from __future__ import annotations

import os
import sys
import time
import timeit

import pytest

from memattr import KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM, Vm

P = KVM_MEMORY_ATTRIBUTE_PRIVATE
TIB = 1 << 40
FULL = os.environ.get("MEMATTR_BENCH_FULL") == "1"


def one_slot_vm(size: int, store: str = "rangetree") -> Vm:
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store)  # type: ignore[arg-type]
    fd = vm.create_guest_memfd(size)
    vm.set_user_memory_region(0, 0, size, flags=KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
    return vm


def dict_set(attrs: dict[int, int], address: int, size: int, value: int) -> None:
    """The baseline: a pure-Python per-page attribute dict."""
    for gfn in range(address >> 12, (address + size) >> 12):
        attrs[gfn] = value


def measure_4k_ratio(number: int = 2000, repeat: int = 7) -> tuple[float, float]:
    """Best-of-``repeat`` seconds per 4 KiB conversion: (Vm, dict), interleaved."""
    vm = one_slot_vm(1 << 30)
    attrs: dict[int, int] = {}

    def vm_round() -> None:
        vm.set_memory_attributes(0x100000, 4096, P)
        vm.set_memory_attributes(0x100000, 4096, 0)

    def dict_round() -> None:
        dict_set(attrs, 0x100000, 4096, P)
        dict_set(attrs, 0x100000, 4096, 0)

    vm_best = dict_best = float("inf")
    for _ in range(repeat):
        vm_best = min(vm_best, timeit.timeit(vm_round, number=number) / (2 * number))
        dict_best = min(dict_best, timeit.timeit(dict_round, number=number) / (2 * number))
    assert vm.stats.conversions == 2 * number * repeat and vm.stats.noop_conversions == 0
    return vm_best, dict_best


def measure_bare_dict_ratio(number: int = 2000, repeat: int = 7) -> tuple[float, float]:
    """Best-of-``repeat`` seconds per call: (a converting 4 KiB
    Vm.set_memory_attributes, a bare dict item update), interleaved in one
    process, so the ratio is what the machine's load does not change."""
    vm = one_slot_vm(1 << 30)
    attrs: dict[int, int] = {}
    set_attrs = vm.set_memory_attributes

    def vm_round() -> None:
        set_attrs(0x100000, 4096, P)
        set_attrs(0x100000, 4096, 0)

    def dict_round() -> None:
        attrs[0x100] = P
        attrs[0x100] = 0

    vm_best = dict_best = float("inf")
    for _ in range(repeat):
        vm_best = min(vm_best, timeit.timeit(vm_round, number=number) / (2 * number))
        dict_best = min(dict_best, timeit.timeit(dict_round, number=number) / (2 * number))
    assert vm.stats.noop_conversions == 0
    return vm_best, dict_best


def measure_fault_mapped(number: int = 20000, repeat: int = 7) -> float:
    """Best-of-``repeat`` seconds per vm.fault on a gfn already mapped."""
    vm = one_slot_vm(1 << 30)
    vm.fault(0x200000)
    fault = vm.fault
    best = float("inf")
    for _ in range(repeat):
        best = min(best, timeit.timeit(lambda: fault(0x200000), number=number) / number)
    assert vm.stats.memory_fault_exits == 0 and vm.stats.fault_retries == 0
    return best


def measure_driven(number: int = 2000, repeat: int = 7) -> float:
    """Seconds per converting 4 KiB set when a (no-op) hook makes the
    Python driver run the core's steps one by one."""
    vm = one_slot_vm(1 << 30)
    vm.on_post_set(lambda rng: None)

    def vm_round() -> None:
        vm.set_memory_attributes(0x100000, 4096, P)
        vm.set_memory_attributes(0x100000, 4096, 0)

    return min(timeit.timeit(vm_round, number=number) / (2 * number) for _ in range(repeat))


def whole_ram_private(size: int) -> float:
    vm = one_slot_vm(size)
    t0 = time.perf_counter()
    vm.set_memory_attributes(0, size, P)
    elapsed = time.perf_counter() - t0
    assert vm.range_has_attributes(0, size >> 12, P)
    assert vm.stats.pages_converted == size >> 12
    return elapsed


def bench_set_4k_vs_dict(benchmark: pytest.FixtureRequest) -> None:
    vm = one_slot_vm(1 << 30)
    state = [0]

    def convert() -> None:
        state[0] ^= P
        vm.set_memory_attributes(0x100000, 4096, state[0])

    benchmark(convert)  # type: ignore[operator]
    assert vm.stats.noop_conversions == 0 and vm.stats.conversions >= 1
    t_vm, t_dict = measure_4k_ratio(number=500 if not FULL else 5000, repeat=5)
    t_driven = measure_driven(number=500 if not FULL else 5000, repeat=5)
    t_set, t_bare = measure_bare_dict_ratio(number=500 if not FULL else 20000, repeat=5)
    t_fault = measure_fault_mapped(number=500 if not FULL else 20000, repeat=5)
    print(
        f"\n[bench_vm] converting 4 KiB set {t_set * 1e9:.0f} ns vs a bare dict update "
        f"{t_bare * 1e9:.0f} ns: {t_set / t_bare:.1f}x; vm.fault on a mapped gfn {t_fault * 1e9:.0f} ns"
    )
    print(
        f"[bench_vm] 4 KiB set_memory_attributes: Vm {t_vm * 1e6:.2f} us (with a hook, "
        f"driven step by step from Python: {t_driven * 1e6:.2f} us), per-page dict "
        f"{t_dict * 1e6:.3f} us, ratio {t_vm / t_dict:.1f}x"
    )


def bench_whole_ram_private_1tib(benchmark: pytest.FixtureRequest) -> None:
    vm = one_slot_vm(TIB)
    benchmark.pedantic(  # type: ignore[attr-defined]
        vm.set_memory_attributes, args=(0, TIB, P), rounds=1, iterations=1
    )
    assert vm.range_has_attributes(0, TIB >> 12, P)
    print(f"\n[bench_vm] whole-RAM private, 1 TiB, rangetree: {whole_ram_private(TIB) * 1e6:.0f} us")


def main() -> int:
    t_set, t_bare = measure_bare_dict_ratio(number=20000)
    print(f"converting 4 KiB set {t_set * 1e9:.0f} ns vs a bare dict update {t_bare * 1e9:.0f} ns: "
          f"{t_set / t_bare:.1f}x; vm.fault on a mapped gfn {measure_fault_mapped() * 1e9:.0f} ns")
    t_vm, t_dict = measure_4k_ratio()
    print(f"4 KiB set_memory_attributes: Vm {t_vm * 1e6:.2f} us (with a hook, driven step by step "
          f"from Python: {measure_driven() * 1e6:.2f} us), per-page dict {t_dict * 1e6:.3f} us, "
          f"ratio {t_vm / t_dict:.1f}x")
    times = [whole_ram_private(TIB) for _ in range(5)]
    print(f"whole-RAM private, 1 TiB guest, rangetree: best {min(times) * 1e6:.0f} us, "
          f"worst {max(times) * 1e6:.0f} us over {len(times)} fresh VMs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
