"""Issue 14: bad input never crashes, hangs or lies.

Each test names the defect it pins down (numbers as in the issue). The
heavy ones run in a subprocess, so an abort or a hang fails the test instead
of taking pytest down with it.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import memattr
from memattr import Vm
from memattr import trace as t
from memattr.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE as P
from memattr.uapi import KVM_X86_SW_PROTECTED_VM

GiB = 1 << 30
TiB = 1 << 40


def run_py(code: str, *, timeout: float = 120, rlimit_as: int | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter, optionally under RLIMIT_AS."""
    pre = ""
    if rlimit_as is not None:
        pre = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({rlimit_as}, {rlimit_as}))\n"
    return subprocess.run(
        [sys.executable, "-c", pre + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------
# 1: every allocation whose size the input decides fails as MemoryError /
# ENOMEM with nothing changed, never an abort


WORST_INPUTS = r"""
import errno, memattr
from memattr import Vm
from memattr.uapi import KVM_X86_SW_PROTECTED_VM as SW
P = 8
def expect(what, f, exc, check=None):
    try:
        f()
    except exc as e:
        if check is not None:
            assert check(e), (what, e)
        print("raised", what, type(e).__name__)
        return
    raise SystemExit(f"{what}: no error")

x = memattr.XArray()
x.set_range(5, 9, 3)
before = (x.memory_bytes(), list(x.runs(0, 16)))
expect("xarray set", lambda: x.set_range(0, 1 << 33, 8), MemoryError)
expect("xarray reserve", lambda: x.reserve(0, 1 << 33), MemoryError)
assert (x.memory_bytes(), list(x.runs(0, 16))) == before
expect("lpage_info", lambda: memattr.LpageInfoTracker(0, 1 << 44), MemoryError)
vm = Vm(SW, store="xarray")
expect("vm set 32T", lambda: vm.set_memory_attributes(0, 32 << 40, P), OSError, lambda e: e.errno == errno.ENOMEM)
assert vm.store.memory_bytes() == 16
print("OK")
"""


def test_worst_allocations_raise_under_an_address_space_limit():
    """Under RLIMIT_AS = 3 GiB the inputs that used to abort raise (1)."""
    r = run_py(WORST_INPUTS, rlimit_as=3 * GiB)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("OK")


def test_worst_allocations_raise_without_a_limit():
    """Same without any limit: the estimate is checked up front (1)."""
    r = run_py(WORST_INPUTS)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_huge_xarray_guest_does_not_abort(tmp_path):
    """``memattr run vm-creation --guest 16T --store xarray`` under a
    limit: one line, a non-zero exit or a result, never SIGABRT (1)."""
    code = f"""
    import sys
    from memattr import cli
    sys.exit(cli.main(["run", "vm-creation", "--guest", "16T", "--store", "xarray", "--no-progress"]))
    """
    r = run_py(code, rlimit_as=3 * GiB, timeout=300)
    assert r.returncode in (0, 1, 2), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout


def test_trace_with_one_huge_set_replays_to_enomem(tmp_path):
    """A trace with one 32 TiB set on an xarray Vm: ENOMEM recorded as the
    result, the process lives (1)."""
    tr = t.Trace(t.set_ops([0], [32 << 40], P), {"vm_type": KVM_X86_SW_PROTECTED_VM})
    path = tmp_path / "huge.trace"
    t.write(tr, path)
    code = f"""
    from memattr import trace as t, Vm
    tr = t.read({str(path)!r})
    vm = Vm(tr.vm_type, store="xarray")
    res = t.replay(tr, vm, keep_results=True)
    print(int(res.results[0]))
    """
    r = run_py(code, rlimit_as=3 * GiB)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == -errno.ENOMEM


def test_xarray_huge_set_leaves_state_unchanged():
    x = memattr.XArray()
    x.set_range(1, 3, 7)
    mem = x.memory_bytes()
    with pytest.raises(MemoryError):
        x.set_range(0, 1 << 62, 1)
    assert x.memory_bytes() == mem and list(x.runs(0, 4)) == [(0, 1, 0), (1, 3, 7), (3, 4, 0)]


# --------------------------------------------------------------------------
# 9, 11: one rule for both stores, messages quoting the caller's limit


@pytest.mark.parametrize("kind", ["rangetree", "xarray"])
def test_reserve_over_the_limit_fails_on_both_stores(kind):
    """reserve(limit) fails when memory_bytes() would exceed limit after it,
    even when the reservation allocates nothing (9)."""
    s = memattr.RangeTree() if kind == "rangetree" else memattr.XArray()
    s.set_range(0, 4096, 8)
    s.reserve(0, 4096)
    mem = s.memory_bytes()
    with pytest.raises(MemoryError):
        s.reserve(0, 4096, mem - 1)
    assert s.memory_bytes() == mem


@pytest.mark.parametrize("size", [1 << 63, 1 << 51])
def test_impossible_set_is_enomem_on_both_stores(size):
    """A set whose kernel xarray would need more nodes than any host has is
    ENOMEM whichever store models it; a no-op stays a no-op (9)."""
    out = {}
    for store in ("rangetree", "xarray"):
        vm = Vm(KVM_X86_SW_PROTECTED_VM, store=store)
        with pytest.raises(OSError) as e:
            vm.set_memory_attributes(0, size, P)
        out[store] = e.value.errno
        assert vm.store.memory_bytes() == Vm(KVM_X86_SW_PROTECTED_VM, store=store).store.memory_bytes()
        vm.set_memory_attributes(0, size, 0)  # already shared: the early exit
    assert out == {"rangetree": errno.ENOMEM, "xarray": errno.ENOMEM}


def test_enomem_text_quotes_attr_memory_limit():
    """The message names the caller's attr_memory_limit, not an internal
    node-id cap (11)."""
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store="xarray", attr_memory_limit=100_000)
    with pytest.raises(OSError) as e:
        vm.set_memory_attributes(0, 1 << 50, P)
    assert e.value.errno == errno.ENOMEM
    assert "2470" not in str(e.value)
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store="xarray", attr_memory_limit=100_000)
    with pytest.raises(OSError) as e:
        vm.set_memory_attributes(0, 1 << 36, P)
    assert "attr_memory_limit is 100000 bytes" in str(e.value)


# --------------------------------------------------------------------------
# 13: no visit of every index of an empty range; Ctrl-C comes out cleanly


def test_erasing_a_huge_range_skips_empty_subtrees():
    """Erasing [0, 2**62) with a handful of entries returns at once (it used
    to walk every index: a hang)."""
    r = run_py(
        """
        import memattr
        x = memattr.XArray()
        x.set_range(5, 100, 3); x.set_range(1 << 40, (1 << 40) + 70, 2)
        x.reserve(1 << 50, (1 << 50) + 3)
        x.set_range(0, 1 << 62, 0)
        assert x.entry_count() == 0 and x.memory_bytes() == 16, x
        print("OK")
        """,
        timeout=60,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


INTERRUPT = r"""
import os, signal, threading, memattr
from memattr import Vm
from memattr.uapi import KVM_X86_SW_PROTECTED_VM as SW
x = memattr.XArray()
x.set_range(10, 20, 5)
before = (x.memory_bytes(), x.entry_count(), list(x.runs(0, 32)))
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    x.set_range(0, 1 << 26, 8)
    print("completed")
except KeyboardInterrupt:
    print("interrupted")
after = (x.memory_bytes(), x.entry_count(), list(x.runs(0, 32)))
assert after == before, (before, after)
vm = Vm(SW, store="xarray")
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    vm.set_memory_attributes(0, 1 << 38, 8)
    print("completed")
except KeyboardInterrupt:
    print("interrupted")
assert vm.store.memory_bytes() == 16 and not vm.mmu_invalidate_in_progress
vm.set_memory_attributes(0, 1 << 21, 8)
print("OK")
"""


def test_ctrl_c_stops_long_native_loops_and_undoes_them():
    """SIGINT during a long XArray.set_range or Vm set: KeyboardInterrupt
    from inside the call, state as before, the objects still usable (13)."""
    r = run_py(INTERRUPT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["interrupted", "interrupted", "OK"]


# --------------------------------------------------------------------------
# 6: exactly one of two racing closes of a guest_memfd succeeds


def test_double_close_race_has_one_winner():
    for _ in range(30):
        vm = Vm(KVM_X86_SW_PROTECTED_VM, store="xarray")
        fd = vm.create_guest_memfd(1 << 30)
        results: list[object] = []
        barrier = threading.Barrier(3)

        def closer() -> None:
            barrier.wait()
            try:
                vm.guest_memfd_close(fd)
                results.append("ok")
            except OSError as e:
                results.append(e.errno)

        def convert() -> None:
            barrier.wait()
            vm.set_memory_attributes(0, 1 << 34, P)

        threads = [threading.Thread(target=f) for f in (closer, closer, convert)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(results, key=str) == sorted(["ok", errno.EBADF], key=str)
        assert vm.stats.gmem_closed == 1


# --------------------------------------------------------------------------
# 14: a store cannot back two VMs (the batch's deadlock's successor)


def test_one_store_per_vm():
    store = memattr.XArray()
    k = memattr._native.Kvm(KVM_X86_SW_PROTECTED_VM, store, "6.8", None, 0)
    with pytest.raises(ValueError, match="already belongs"):
        memattr._native.Kvm(KVM_X86_SW_PROTECTED_VM, store, "6.8", None, 0)
    del k


# --------------------------------------------------------------------------
# 15: masked arrays are refused, not read through their mask


@pytest.mark.parametrize("kind", ["rangetree", "xarray"])
def test_masked_arrays_are_refused(kind):
    s = memattr.RangeTree() if kind == "rangetree" else memattr.XArray()
    a = np.ma.array(np.array([1, 2, 3], dtype=np.uint64), mask=[0, 1, 0])
    with pytest.raises(TypeError, match="masked"):
        s.get_many(a)
    ends = np.array([2, 3, 4], dtype=np.uint64)
    vals = np.array([1, 1, 1], dtype=np.uint64)
    with pytest.raises(TypeError, match="masked"):
        s.set_many(a, ends, vals)
    assert s.entry_count() == 0
    with pytest.raises(TypeError, match="masked"):
        t.Trace(np.ma.array(t.empty_ops(1)))
