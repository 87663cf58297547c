"""The training run of the profile-guided build (scripts/install.sh).

Runs what users run, on an instrumented build, so the compiler learns the
branches and calls that matter: the main job (`memattr compare`, both
stores and the in-place API, per call and native), the native replay at
1 TiB (the range tree and page table at the sizes that stress them), and
the per-call Vm (sets, faults, a hook).
Code it never runs is laid out as cold, so it covers every store and
engine that the benchmarks compare: training one side of a comparison
only would tilt the comparison.

    .venv/bin/python scripts/pgo_train.py      (under 10 s instrumented)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from memattr import sweep, workloads
from memattr.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM
from memattr.vm import Vm


def main_job(out: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "memattr",
            "compare",
            "--sizes",
            "1G,64G",
            "--api",
            "both",
            "--no-plot",
            "--no-progress",
            "--out",
            out,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def large_replays() -> None:
    tr = workloads.boot_and_churn("1T")
    sweep.run_trace(tr, "rangetree")
    sweep.run_store_only(tr, "rangetree")
    tr = workloads.boot_and_churn("64G")
    sweep.run_trace(tr, "xarray")
    sweep.run_store_only(tr, "xarray")
    sweep.run_trace(workloads.boot_and_churn("4G"), "rangetree", engine="python")


def per_call() -> None:
    for store in ("rangetree", "xarray"):
        vm = Vm(KVM_X86_SW_PROTECTED_VM, store=store)
        fd = vm.create_guest_memfd(1 << 30)
        vm.set_user_memory_region(
            0, 0, 1 << 30, userspace_addr=1 << 40, flags=KVM_MEM_GUEST_MEMFD, guest_memfd=fd
        )
        for i in range(20_000):
            gpa = (i * 7919 % (1 << 18)) << 12
            vm.set_memory_attributes(gpa, 4096, KVM_MEMORY_ATTRIBUTE_PRIVATE if i % 2 else 0)
            vm.fault(gpa, private=bool(i % 2))
        seen: list[object] = []
        vm.on_unmap(seen.append)
        for i in range(2_000):
            vm.set_memory_attributes((i % 512) << 21, 1 << 21, KVM_MEMORY_ATTRIBUTE_PRIVATE if i % 2 else 0)


def main() -> None:
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        main_job(out)
    large_replays()
    per_call()
    print(f"pgo_train: trained in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
