"""Native batches (memattr.batch, rust/kvm.rs) against the per-call path.

The per-call Python Vm is the reference: a replay in native batches must
leave the same attributes, mappings, mixed flags, stats and invalidation
state, and return the same result for every operation, on every workload,
on both stores, and on random streams full of failing calls and memslot
changes.
"""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memattr import trace as t
from memattr import workloads as w
from memattr.batch import batch_blocker, run_batch
from memattr.locks import KvmWarning
from memattr.uapi import KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_X86_DEFAULT_VM, KVM_X86_SNP_VM
from memattr.vm import Vm

GiB, MiB = w.GiB, w.MiB
P = t.KVM_MEMORY_ATTRIBUTE_PRIVATE
SHARED_SLOT_GPA = 16 * GiB  # a slot without guest_memfd in the random streams


def fresh_vm(trace: t.Trace, store: str, **kw: object) -> Vm:
    kwargs = dict(trace.meta.get("vm_kwargs", {}))
    knobs = {k: kw.pop(k) for k in ("host_mapping_level", "invalidate_straddling_hugepages") if k in kw}
    kwargs.update(kw)
    vm = Vm(trace.vm_type, store=store, **kwargs)  # type: ignore[arg-type]
    for k, v in knobs.items():
        setattr(vm.mmu, k, v)
    return vm


def snapshot(vm: Vm) -> dict[str, object]:
    """Everything a replay can change, as plain data."""
    return {
        "stats": vm.stats.as_dict(),
        "inval": (
            vm.mmu_invalidate_seq,
            vm.mmu_invalidate_in_progress,
            vm.mmu_invalidate_range_start,
            vm.mmu_invalidate_range_end,
        ),
        "attributes": [r for r in vm.store.runs(0, 1 << 24) if r[2]],
        "mappings": [vm.mmu.mappings(level) for level in (1, 2, 3)],
        "mixed": [(s.slot, vm.mmu.mixed_runs(s, 2), vm.mmu.mixed_runs(s, 3)) for s in vm.memslots],
        "memslots": [(s.slot, s.base_gfn, s.npages, s.flags) for s in vm.memslots],
    }


def tally(res: t.ReplayResult) -> dict[str, object]:
    d = res.as_dict()
    for k in ("seconds", "cpu_seconds", "source_seconds", "phase_seconds", "engine"):
        del d[k]
    return d


def both_engines(trace: t.Trace, store: str, chunk: int = 8192, **kw: object):
    out = []
    for engine in ("python", "native"):
        vm = fresh_vm(trace, store, **kw)
        res = t.replay(trace, vm, engine=engine, chunk=chunk, keep_results=True, strict_setup=False)
        assert res.engine == engine
        out.append((vm, res))
    return out


# --------------------------------------------------------------------------
# every workload


WORKLOAD_GUESTS = {"checkerboard": None}


@pytest.mark.parametrize("store", ["rangetree", "xarray"])
@pytest.mark.parametrize("name", sorted(w.WORKLOADS))
def test_every_workload_same_as_per_call_path(name, store):
    guest = WORKLOAD_GUESTS.get(name, "6G")
    trace = w.make(name, guest, seed=3, implicit=64, nr_vcpus=2)
    (vm_p, res_p), (vm_n, res_n) = both_engines(trace, store)
    assert np.array_equal(res_p.results, res_n.results)
    assert tally(res_p) == tally(res_n)
    assert snapshot(vm_p) == snapshot(vm_n)
    assert vm_n.stats.conversions > 0


def test_recorded_results_check_clean_on_native():
    gen = w.boot_and_churn("6G", nr_vcpus=2, dma_buffers=8, accept_fraction=0.2, implicit=8, seed=4)
    rec = t.Recorder(fresh_vm(gen, "rangetree"))
    assert t.replay(gen, rec).engine == "python"  # a Recorder sees every call
    recorded = rec.trace()
    vm = fresh_vm(gen, "xarray")
    res = t.replay(recorded, vm, check=True, engine="native")
    assert res.mismatches == 0, res.first_mismatch
    assert snapshot(vm) == snapshot(rec.vm)


# --------------------------------------------------------------------------
# random streams: failing calls, memslot changes mid-stream, every knob


def _random_trace(data: st.DataObject) -> t.Trace:
    layout = w.GuestLayout.build(4 * GiB, low_limit=2 * GiB)
    base = w.setup(layout)
    regions = list(base.meta["regions"])
    # A slot without guest_memfd: region index len(regions).
    shared_region = len(regions)
    regions.append([9, w.USERSPACE_BASE + 64 * GiB, -1])
    span = (SHARED_SLOT_GPA + 2 * GiB) >> 12
    n = data.draw(st.integers(1, 60), label="n")
    ops = t.empty_ops(n + 1)
    # The shared slot exists from the start.
    ops[0]["kind"] = t.OP_SET_USER_MEMORY_REGION
    ops[0]["gpa"] = SHARED_SLOT_GPA
    ops[0]["size"] = GiB
    ops[0]["aux"] = shared_region
    for i in range(1, n + 1):
        op = ops[i]
        what = data.draw(st.sampled_from(["set", "set", "set", "fault", "fault", "fault", "slot", "gmem"]))
        if what == "set":
            gfn = data.draw(st.integers(0, span - 1))
            npages = data.draw(st.sampled_from([1, 2, 7, 512, 513, 1 << 18, 1 << 19]))
            op["kind"] = t.OP_SET_MEMORY_ATTRIBUTES
            op["gpa"] = (gfn << 12) + data.draw(st.sampled_from([0] * 12 + [1]))
            op["size"] = npages << 12
            op["attributes"] = data.draw(st.sampled_from([P, P, 0, 0, 1 << 4]))
            op["arg"] = data.draw(st.sampled_from([0] * 15 + [1]))
        elif what == "fault":
            op["kind"] = t.OP_FAULT
            op["gpa"] = (data.draw(st.integers(0, span - 1)) << 12) + data.draw(st.integers(0, 4095))
            op["flags"] = data.draw(st.integers(0, 15))
        elif what == "gmem":
            # Punch a hole in the guest_memfd (recorded fd 3, mapped by the
            # replayer), now and then with a bad mode, or close it.
            op["attributes"] = 3
            if data.draw(st.integers(0, 9)) == 0:
                op["kind"] = t.OP_GUEST_MEMFD_CLOSE
            else:
                op["kind"] = t.OP_GUEST_MEMFD_FALLOCATE
                op["arg"] = data.draw(st.sampled_from([3, 3, 3, 2]))
                op["gpa"] = data.draw(st.integers(0, (4 * GiB >> 12) - 1)) << 12
                op["size"] = data.draw(st.sampled_from([1, 512, 513, 1 << 18])) << 12
        else:
            # Toggle dirty logging on, delete, or re-create the shared slot,
            # or try to change a guest_memfd slot's flags (EINVAL).
            op["kind"] = t.OP_SET_USER_MEMORY_REGION
            choice = data.draw(st.sampled_from(["log", "nolog", "delete", "gmem"]))
            if choice == "gmem":
                r = layout.regions[0]
                op["gpa"], op["size"], op["aux"] = r.gpa, r.size, 0
                op["attributes"] = KVM_MEM_GUEST_MEMFD | KVM_MEM_LOG_DIRTY_PAGES
            else:
                op["gpa"] = SHARED_SLOT_GPA
                op["size"] = 0 if choice == "delete" else GiB
                op["attributes"] = KVM_MEM_LOG_DIRTY_PAGES if choice == "log" else 0
                op["aux"] = shared_region
    meta = dict(base.meta)
    meta["regions"] = regions
    # A VM type without private memory (two address spaces, nothing
    # convertible, guest_memfd slots refused) or with it.
    meta["vm_type"] = data.draw(st.sampled_from([base.vm_type, base.vm_type, KVM_X86_DEFAULT_VM, KVM_X86_SNP_VM]))
    return t.Trace(np.concatenate([base.ops, ops]), meta)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_random_streams_same_as_per_call_path(data):
    trace = _random_trace(data)
    store = data.draw(st.sampled_from(["rangetree", "xarray"]))
    kw = {
        "guest_memfd_max_order": data.draw(st.sampled_from([0, 9, 18])),
        "attr_memory_limit": data.draw(st.sampled_from([None, None, 50_000])),
        "host_mapping_level": data.draw(st.sampled_from([1, 2, 3])),
        "invalidate_straddling_hugepages": data.draw(st.booleans()),
    }
    chunk = data.draw(st.sampled_from([1, 7, 8192]))
    (vm_p, res_p), (vm_n, res_n) = both_engines(trace, store, chunk=chunk, **kw)
    assert res_p.results.tolist() == res_n.results.tolist()
    assert tally(res_p) == tally(res_n)
    assert snapshot(vm_p) == snapshot(vm_n)


# --------------------------------------------------------------------------
# when batches run, and what they refuse


def small() -> t.Trace:
    return w.boot_and_churn("6G", nr_vcpus=2, dma_buffers=4, accept_fraction=0.1, implicit=4, seed=1)


def test_auto_falls_back_and_native_says_why():
    trace = small()
    vm = fresh_vm(trace, "rangetree")
    assert batch_blocker(vm) is None
    vm.on_post_set(lambda rng: None)
    assert "hooks" in batch_blocker(vm)
    assert t.replay(trace, vm).engine == "python"
    with pytest.raises(ValueError, match="hooks are registered"):
        t.replay(trace, vm, engine="native")
    with pytest.raises(ValueError, match="engine must be one of"):
        t.replay(trace, vm, engine="rust")
    with pytest.raises(ValueError, match="chunk"):
        t.replay(trace, vm, chunk=0)
    v11 = fresh_vm(trace, "rangetree", semantics="v11")
    assert "v11" in batch_blocker(v11)
    assert "Recorder" in batch_blocker(t.Recorder(v11))

    class MyVm(Vm):
        pass

    assert "MyVm" in batch_blocker(MyVm())
    plain = fresh_vm(trace, "rangetree")
    with plain.slots_lock:
        assert "holds" in batch_blocker(plain)


def test_native_leaves_locks_free_and_counts_no_extra_acquisitions():
    trace = small()
    (vm_p, _), (vm_n, _) = both_engines(trace, "rangetree")
    assert not vm_n.slots_lock.locked() and not vm_n.mmu_lock.locked()
    assert vm_n.stats.mmu_lock_acquisitions == vm_p.stats.mmu_lock_acquisitions > 0


def test_bad_columns_are_refused_and_change_nothing():
    trace = small()
    vm = fresh_vm(trace, "rangetree")
    t.replay(t.Trace(trace.ops[:3], {**trace.meta, "phases": []}), vm)  # memslots only
    before = snapshot(vm)
    ops = trace.ops[3:10]
    cols = [np.ascontiguousarray(ops[f]) for f in ("kind", "gpa", "size", "attributes", "arg", "flags")]
    results = np.zeros(len(ops), dtype=np.int64)
    with pytest.raises(ValueError, match="gpa has 6 elements"):
        run_batch(vm, cols[0], cols[1][:6], *cols[2:], results)
    with pytest.raises(ValueError, match="contiguous"):
        run_batch(vm, *cols, np.zeros(2 * len(ops), dtype=np.int64)[::2])
    with pytest.raises(TypeError):
        run_batch(vm, cols[0].astype(np.uint64), *cols[1:], results)
    from memattr import _native

    with pytest.raises(TypeError, match="store must be a RangeTree or an XArray"):
        _native.Kvm(1, object(), "6.8", None, 0)
    assert snapshot(vm) == before
    assert not vm.slots_lock.locked() and not vm.mmu_lock.locked()


def test_warning_on_vm_without_private_memory_matches():
    # Only reachable by writing the store behind the VM's back.
    trace = t.Trace(t.set_ops(0, 4096, 0), {"vm_type": KVM_X86_DEFAULT_VM})
    for engine in ("python", "native"):
        vm = Vm(KVM_X86_DEFAULT_VM)
        vm.set_user_memory_region(0, 0, 2 * MiB)
        vm.store.set_range(0, 1, P)
        with pytest.warns(KvmWarning, match="without private memory"):
            res = t.replay(trace, vm, engine=engine, keep_results=True)
        assert res.results.tolist() == [0]
        assert vm.get_memory_attributes(0) == 0


def test_enomem_in_a_batch_changes_nothing():
    trace = w.vm_creation("6G")
    vm = fresh_vm(trace, "xarray", attr_memory_limit=10_000)
    res = t.replay(trace, vm, engine="native", keep_results=True)
    assert res.errors == {"ENOMEM": 2}
    assert (res.results[-2:] == -errno.ENOMEM).all()
    assert vm.stats.enomem == 2 and vm.mmu_invalidate_seq == 0
    assert vm.store.memory_bytes() <= 10_000


@pytest.mark.parametrize("store", ["xarray", "rangetree"])
def test_other_threads_wait_for_a_batch_and_see_its_result(store: str):
    trace = w.make("boot-and-churn", "64G", seed=2)
    vm = fresh_vm(trace, store)
    t.replay(t.Trace(trace.ops[:4], {**trace.meta, "phases": []}), vm)
    stop = threading.Event()
    seen: list[BaseException] = []
    reads = [0]

    def poke() -> None:
        try:
            while not stop.is_set():
                vm.hugepage_mixed(0, 0, 2)
                vm.get_memory_attributes(5)
                vm.mmu.mapped_level(0)
                # The store object itself: a batch holds the store's lock
                # for its whole run, so these wait for it (never deadlock)
                # and see a store between operations.
                assert vm.store.get(5) in (0, P)
                vm.store.memory_bytes()
                reads[0] += 1
        except BaseException as e:  # pragma: no cover - reported below
            seen.append(e)

    th = threading.Thread(target=poke)
    th.start()
    try:
        res = t.replay(t.Trace(trace.ops[4:], {**trace.meta, "phases": []}), vm, engine="native")
    finally:
        stop.set()
        th.join()
    assert not seen, seen
    assert reads[0] > 0
    assert res.engine == "native" and not vm.mmu_lock.locked()


def test_native_replay_leaves_the_trace_untouched():
    trace = w.make("boot-and-churn", "6G", seed=5, discard=True)
    before = trace.ops.copy()
    for chunk in (1, 8192):
        t.replay(trace, fresh_vm(trace, "rangetree"), engine="native", chunk=chunk)
    assert (trace.ops == before).all()


def test_the_replay_harness_dump_holds_the_trace_and_its_applied_sets(tmp_path):
    """benches/dump_trace.py (the input of the pure-Rust harness,
    benches/replay.rs): the batch records as they are, and the applied sets
    as run_store_only selects them, with one rule (replayer._chunk_sets)."""
    import importlib.util
    import pathlib

    from memattr import trace_io
    from memattr.trace_format import OP_DTYPE

    spec = importlib.util.spec_from_file_location(
        "dump_trace", pathlib.Path(__file__).parent.parent / "benches" / "dump_trace.py"
    )
    assert spec is not None and spec.loader is not None
    dump = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dump)
    trace = w.make("boot-and-churn", "1G", seed=3)
    trace_io.write(trace, tmp_path / "t.mtr")
    dump.main(str(tmp_path / "t.mtr"), str(tmp_path / "d"))
    setup = (tmp_path / "d.setup").read_text().splitlines()
    ops = np.fromfile(tmp_path / "d.ops", dtype=OP_DTYPE)
    assert len(setup) - 1 + len(ops) == len(trace)
    assert (ops == trace.ops[len(setup) - 1 :]).all()
    sets = np.fromfile(tmp_path / "d.sets", dtype="<u8").reshape(-1, 3)
    o = trace.ops
    # Applied: recorded as succeeding, or unrecorded (a generated trace)
    # with no flags, which the kernel would refuse.
    ok = (o["result"] == 0) | ((o["result"] == t.RESULT_NONE) & (o["arg"] == 0))
    applied = o[(o["kind"] == t.OP_SET_MEMORY_ATTRIBUTES) & ok & (o["size"] != 0)]
    assert len(sets) == len(applied) == trace.counts()["set_memory_attributes"]
    assert (sets[:, 0] == applied["gpa"] >> 12).all()
    assert (sets[:, 1] == (applied["gpa"] + applied["size"]) >> 12).all()
    assert (sets[:, 2] == applied["attributes"]).all()
