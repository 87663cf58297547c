"""The same boot-and-churn workload through either API, side by side: the
per-VM attributes of Linux 6.8 (KVM_SET_MEMORY_ATTRIBUTES into the kernel's
per-page xarray, and into the range store) and the in-place conversion
series (KVM_SET_MEMORY_ATTRIBUTES2 on each guest_memfd, per-file maple
tree). Time, attribute memory, zapped pages, TLB flushes and holes punched.

    .venv/bin/python benches/bench_inplace.py 1G,4G,16G

Under pytest it runs once at 1 GiB, untimed, as a smoke test.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import memattr as m
from memattr import workloads
from memattr.gmem_inplace import InPlaceVmm
from memattr.units import format_size, parse_size

CONTENDERS = [
    ("6.8 per-VM xarray", "xarray", "6.8"),
    ("6.8 per-VM rangetree", "rangetree", "6.8"),
    ("in-place per-file maple", "mapletree", "gmem-inplace"),
    ("in-place per-file rangetree", "rangetree", "gmem-inplace"),
]


def run(trace: Any, store: str, semantics: str) -> dict[str, Any]:
    vm = m.Vm(trace.vm_type, store, semantics=semantics, **dict(trace.meta.get("vm_kwargs", {})))
    target: Any = InPlaceVmm(vm) if semantics != "6.8" else vm
    t0 = time.perf_counter()
    res = m.replay(trace, target, engine="python")
    secs = time.perf_counter() - t0
    if semantics == "6.8":
        mem = vm.store.memory_bytes()
    else:
        mem = sum(vm.guest_memfd_store_usage(f[0])[0] for f in vm.guest_memfds())
    return {
        "seconds": secs,
        "memory": mem,
        "zapped_pages": sum(vm.stats.zapped_pages.values()),
        "tlb_flushes": vm.stats.tlb_flushes,
        "holes": vm.stats.gmem_holes_punched,
        "errors": dict(res.errors),
        "unbacked_pages": getattr(target, "unbacked_pages", 0),
    }


def table(sizes: list[int]) -> None:
    print(f"{'guest':>6} {'API / store':<28} {'seconds':>8} {'attr bytes':>11} {'zapped':>8} "
          f"{'flushes':>8} {'holes':>6} {'unbacked':>8}")
    for size in sizes:
        trace = workloads.boot_and_churn(size)
        for label, store, sem in CONTENDERS:
            r = run(trace, store, sem)
            print(f"{format_size(size):>6} {label:<28} {r['seconds']:8.3f} {r['memory']:>11} "
                  f"{r['zapped_pages']:>8} {r['tlb_flushes']:>8} {r['holes']:>6} "
                  f"{r['unbacked_pages']:>8}" + (f"  errors {r['errors']}" if r["errors"] else ""))
        sys.stdout.flush()


def bench_inplace_smoke() -> None:
    trace = workloads.boot_and_churn("1G")
    out = {label: run(trace, store, sem) for label, store, sem in CONTENDERS}
    assert all(not r["errors"] for r in out.values())
    # Same end state: everything private again after the kexec.
    assert out["in-place per-file maple"]["memory"] == 256


if __name__ == "__main__":
    table([parse_size(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1G,4G").split(",")])
