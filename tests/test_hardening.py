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


# --------------------------------------------------------------------------
# 2, 3: phases are checked against the records


def _good() -> t.Trace:
    from memattr import workloads as w

    return w.make("boot-and-churn", "1G")


@pytest.mark.parametrize(
    "phases",
    [
        lambda n: [["all", 0, 1 << 62]],  # used to loop for ever
        lambda n: [["a", 0, n], ["b", 0, n]],  # overlap: ops replayed twice
        lambda n: [["a", -3, n]],  # negative
        lambda n: [["a", 0, n + 1000]],  # overlong: phantom operations
        lambda n: [["a", 0, 1], ["b", 2, n]],  # gap: an op skipped
        lambda n: [["a", 0, n - 1]],  # the last op never replayed
        lambda n: [["a", 5, 2]],  # backwards
    ],
)
def test_bad_phases_are_refused_before_any_replay(phases):
    tr = _good()
    bad = t.Trace(tr.ops, {**tr.meta, "phases": phases(len(tr))})
    vm = Vm(tr.vm_type)
    with pytest.raises(t.TraceFormatError, match="phases"):
        t.replay(bad, vm)
    assert vm.stats.set_calls == 0
    with pytest.raises(t.TraceFormatError, match="phases"):
        bad.validate()


def test_good_phases_count_every_operation_once():
    tr = _good()
    res = t.replay(tr, Vm(tr.vm_type))
    assert res.ops == len(tr) and sum(b - a for _, a, b in tr.phases) == len(tr)


# --------------------------------------------------------------------------
# 4: text traces: '->' lines, length and checksum (v2), v1 still read


def test_text_arrow_line_is_a_format_error():
    with pytest.raises(t.TraceFormatError, match="line 2: missing operation name"):
        t.parse_text([t.TEXT_HEADER_V1, "-> 0"])
    with pytest.raises(t.TraceFormatError, match="line 2: missing operation name"):
        t.parse_text([t.TEXT_HEADER_V1, "   -> -EINVAL"])


def test_text_v2_detects_truncation_and_damage():
    tr = _good()
    lines = list(t.iter_text_lines(tr))
    assert lines[0] == "# memattr trace v2" and lines[-1].startswith("# end records=")
    back = t.parse_text(lines)
    assert np.array_equal(back.ops, tr.ops)
    # Cut anywhere between the header and the end: an error, never a
    # shorter trace.
    for cut in (2, len(lines) // 2, len(lines) - 1):
        with pytest.raises(t.TraceFormatError, match="no end line|truncated"):
            t.parse_text(lines[:cut])
    # One changed digit in one record: the checksum says so.
    i = len(lines) // 2
    damaged = lines[:i] + [lines[i].replace("0x", "0x1", 1)] + lines[i + 1 :]
    with pytest.raises(t.TraceFormatError, match="checksum mismatch"):
        t.parse_text(damaged)
    # A dropped record: the count says so.
    with pytest.raises(t.TraceFormatError, match="end line says"):
        t.parse_text(lines[:i] + lines[i + 1 :])
    # A v1 file (no end line) is still read.
    v1 = [t.TEXT_HEADER_V1] + lines[1:-1]
    assert np.array_equal(t.parse_text(v1).ops, tr.ops)


# --------------------------------------------------------------------------
# 7: a hook's exception is not lost behind the v11 lockdep report


def test_v11_hook_error_is_kept_as_context():
    vm = Vm(KVM_X86_SW_PROTECTED_VM, semantics="v11")
    fd = vm.create_guest_memfd(1 << 26)
    vm.set_user_memory_region(0, 0, 1 << 26, 0, memattr.KVM_MEM_GUEST_MEMFD, fd, 0)

    class HookFailed(Exception):
        pass

    def hook(rng):
        raise HookFailed("from the hook")

    vm.on_post_set(hook)
    with pytest.raises(memattr.LockdepError) as info:
        vm.set_memory_attributes(0, 4096, P)
    assert isinstance(info.value.__context__, HookFailed)
    if hasattr(BaseException, "add_note"):  # Python 3.11+
        assert any("HookFailed" in n for n in info.value.__notes__)


# --------------------------------------------------------------------------
# 8, 17: the Recorder is the Vm, recorded


def _rec():
    return t.Recorder(Vm(KVM_X86_SW_PROTECTED_VM))


def test_recorder_ioctl_behaves_like_vm_ioctl():
    from memattr.uapi import KVM_SET_MEMORY_ATTRIBUTES, kvm_memory_attributes

    for target in (Vm(KVM_X86_SW_PROTECTED_VM), _rec()):
        # An int argument is EFAULT (no memory to read), not a recorded set.
        with pytest.raises(OSError) as e:
            target.ioctl(KVM_SET_MEMORY_ATTRIBUTES, 0)
        assert e.value.errno == errno.EFAULT
        # A short buffer: EFAULT too.
        with pytest.raises(OSError) as e:
            target.ioctl(KVM_SET_MEMORY_ATTRIBUTES, b"\0" * 8)
        assert e.value.errno == errno.EFAULT
        # A huge int: OverflowError naming the C int.
        with pytest.raises(OverflowError, match="C int"):
            target.ioctl(KVM_SET_MEMORY_ATTRIBUTES, 1 << 80)
    rec = _rec()
    rec.ioctl(KVM_SET_MEMORY_ATTRIBUTES, bytes(kvm_memory_attributes(0, 4096, P, 0)))
    tr = rec.trace()
    assert len(tr) == 1 and int(tr.ops["size"][0]) == 4096 and int(tr.ops["attributes"][0]) == P


def test_recorder_records_ioctl_memslots_and_guest_memfds():
    from memattr.uapi import (
        KVM_CREATE_GUEST_MEMFD,
        KVM_SET_USER_MEMORY_REGION2,
        kvm_create_guest_memfd,
        kvm_userspace_memory_region2,
    )

    rec = _rec()
    fd = rec.ioctl(KVM_CREATE_GUEST_MEMFD, bytearray(kvm_create_guest_memfd(1 << 26, 0)))
    region = kvm_userspace_memory_region2(
        slot=0, flags=memattr.KVM_MEM_GUEST_MEMFD, guest_phys_addr=0, memory_size=1 << 26,
        userspace_addr=0x7000_0000_0000, guest_memfd_offset=0, guest_memfd=fd,
    )
    rec.ioctl(KVM_SET_USER_MEMORY_REGION2, bytes(region))
    rec.set_memory_attributes(0, 1 << 21, P)
    tr = rec.trace()
    assert tr.counts()["create_guest_memfd"] == 1 and tr.counts()["set_user_memory_region"] == 1
    # The trace replays to the same state.
    vm2 = Vm(KVM_X86_SW_PROTECTED_VM)
    t.replay(tr, vm2)
    assert list(vm2.store.runs(0, 1 << 14)) == list(rec.vm.store.runs(0, 1 << 14))
    assert len(vm2.memslots) == len(rec.vm.memslots) == 1


def test_recorder_refuses_what_it_cannot_record():
    from memattr.uapi import KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_ENABLE_CAP, kvm_enable_cap

    rec = _rec()
    with pytest.raises(t.UnrecordableCall, match="enable_cap"):
        rec.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, [1, 0, 0, 0])
    with pytest.raises(t.UnrecordableCall, match="enable_cap"):
        rec.ioctl(KVM_ENABLE_CAP, bytes(kvm_enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0, (1, 0, 0, 0))))
    assert rec.vm.manual_dirty_log_protect == 0
    with pytest.raises(t.UnrecordableCall):
        rec.attr_memory_limit = 10
    assert rec.vm.attr_memory_limit is None
    with pytest.raises(AttributeError, match="no attribute"):
        rec.some_future_method()
    # Reading passes through.
    assert rec.semantics == "6.18" and rec.stats.set_calls == 0


# --------------------------------------------------------------------------
# 10: messages name the argument


def test_enable_cap_args_must_be_a_sequence():
    vm = Vm(KVM_X86_SW_PROTECTED_VM)
    for bad in (None, {0: 1, 1: 0, 2: 0, 3: 0}, "abcd", {1, 2, 3, 4}):
        with pytest.raises(TypeError, match="args must be a sequence of 4 ints"):
            vm.enable_cap(1, 0, bad)


def test_argument_messages_name_the_argument():
    vm = Vm(KVM_X86_SW_PROTECTED_VM)
    with pytest.raises(TypeError, match="guest_memfd must be an int, not float"):
        vm.set_user_memory_region(0, 0, 1 << 21, 0, 0, guest_memfd=1.0)  # type: ignore[arg-type]
    fd = vm.create_guest_memfd(1 << 21)
    vm.set_user_memory_region(0, 0, 1 << 21, 0, memattr.KVM_MEM_GUEST_MEMFD, fd, 0)
    vm.set_memory_attributes(0, 1 << 21, P)
    assert vm.fault(0, private=np.True_) >= 1  # numpy bools are bools


# --------------------------------------------------------------------------
# 16: QEMU events wherever they stand; skipped lines counted


def test_qemu_event_after_a_warning_on_the_same_line():
    from memattr import qemu

    lines = [
        "qemu-system-x86_64: warning: memory fault: GPA 0x4000000 size 0x1000 flags 0x8 "
        "kvm_convert_memory start 0x4000000 size 0x1000 shared_to_private",
        "something else entirely",
        "kvm_convert_memory start 0xZZ size 0x1000 private_to_shared",
    ]
    tr = qemu.parse_log(lines)
    assert len(tr) == 1 and int(tr.ops["gpa"][0]) == 0x4000000 and int(tr.ops["attributes"][0]) == P
    assert tr.meta["qemu_skipped"]["no_event"] == 1 and tr.meta["qemu_skipped"]["malformed"] == 1
    with pytest.raises(t.TraceFormatError, match="line 3: malformed"):
        qemu.parse_log(lines, strict=True)


def test_import_qemu_reports_skipped_lines(tmp_path, capsys):
    from memattr import cli

    log = tmp_path / "qemu.log"
    log.write_text(
        "noise\nkvm_convert_memory start 0x80000000 size 0x200000 private_to_shared\n"
        "kvm_convert_memory start nope\n"
    )
    code = cli.main(["import-qemu", str(log), "-o", str(tmp_path / "q.trace"), "--guest", "4G"])
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped 1 lines without" in out and "1 malformed event lines" in out and "line 3" in out
    code = cli.main(["import-qemu", str(log), "-o", str(tmp_path / "q.trace"), "--guest", "4G", "--strict"])
    assert code == 2 and "line 3: malformed" in capsys.readouterr().out


def test_recorder_passes_reads_of_later_apis_and_refuses_their_changes():
    """The host profile and the in-place series' inspection pass through a
    Recorder; the series' state changes (no trace operation holds them) are
    refused, not silently unrecorded."""
    rec = _rec()
    assert rec.host == rec.vm.host
    assert rec.inplace_stats == rec.vm.inplace_stats
    for name in ("guest_memfd_pin", "guest_memfd_write", "finalize_vm"):
        with pytest.raises(t.UnrecordableCall, match=name):
            getattr(rec, name)
    # KVM_SET_MEMORY_ATTRIBUTES2 has its trace operation: recorded
    # (tests/test_trace_inplace.py).
    assert callable(rec.guest_memfd_set_memory_attributes)
