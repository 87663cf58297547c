"""Host-scale simulations: layouts past one memslot, expected and unexpected
errors, streams in bounded chunks, memory guards, Dask, fleets, the
results schema."""

from __future__ import annotations

import errno
import json
import pathlib

import numpy as np
import pytest

import memattr
from memattr import cli, fleet, stream, sweep
from memattr import trace as t
from memattr import workloads as w
from memattr.errors import SetupError
from memattr.guest_layout import MAX_GPA, MAX_SLOT_SIZE, GuestLayout, Region
from memattr.uapi import KVM_MEM_MAX_NR_PAGES, PAGE_SIZE, SZ_1G, SZ_4G
from memattr.units import GiB, PiB, TiB

SCHEMA = pathlib.Path(memattr.__file__).parent / "schemas" / "results.schema.json"


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().out


# --------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("size, at_least", [("16T", 2), ("64T", 8), ("1P", 128), (4 * PiB - 2 * GiB, 512)])
def test_layouts_cut_ram_into_slots_the_kernel_accepts(size, at_least):
    lay = GuestLayout.build(size)
    high = lay.regions[1:]
    assert len(high) >= at_least
    # The kernel's limit, from the uapi constant (not the layout's own).
    assert all(r.size // PAGE_SIZE <= KVM_MEM_MAX_NR_PAGES for r in lay.regions)
    # QEMU's cut: full slots, then the rest; contiguous in gpa and in the
    # guest_memfd; 1 GiB aligned boundaries.
    assert all(r.size == MAX_SLOT_SIZE for r in high[:-1])
    assert high[0].gpa == SZ_4G and high[0].guest_memfd_offset == lay.low_size
    for a, b in zip(high, high[1:]):
        assert b.gpa == a.end and b.guest_memfd_offset == a.guest_memfd_offset + a.size
        assert b.gpa % SZ_1G == 0
    assert sum(r.size for r in lay.regions) == lay.ram_size
    assert lay.regions[-1].end <= MAX_GPA


def test_layout_beyond_52_bits_is_refused():
    with pytest.raises(ValueError, match="52-bit"):
        GuestLayout.build(4 * PiB)


def test_64t_vm_creation_replays_with_every_slot_accepted():
    st = w.stream("vm-creation", "64T")
    vm = memattr.Vm(st.vm_type, store="rangetree", **st.meta["vm_kwargs"])
    res = t.replay(st, vm)
    assert res.unexpected_errors == {} and res.errors == {}
    assert len(list(vm.memslots)) == len(GuestLayout.build("64T").regions) >= 9
    # every page of RAM is private (one set per slot)
    assert vm.range_has_attributes(SZ_4G >> 12, (SZ_4G + 64 * TiB - 2 * GiB) >> 12, memattr.KVM_MEMORY_ATTRIBUTE_PRIVATE)


# --------------------------------------------------------------------------
# expected and unexpected errors, setup failures


def _oversized_slot_trace() -> t.Trace:
    """A setup whose one high memslot is over KVM_MEM_MAX_NR_PAGES."""
    size = (KVM_MEM_MAX_NR_PAGES + 1) * PAGE_SIZE
    size += (-size) % (2 << 20)
    lay = GuestLayout(2 * GiB + size, 2 * GiB, (Region(0, 0, 2 * GiB, 0), Region(1, SZ_4G, size, 2 * GiB)))
    return t.concat([("setup", w.setup(lay)), ("creation", w.vm_creation(lay))], w.workload_meta("bad", lay))


@pytest.mark.parametrize("engine", ["python", "native"])
def test_a_refused_memslot_stops_the_replay(engine):
    tr = _oversized_slot_trace()
    vm = memattr.Vm(tr.vm_type)
    with pytest.raises(SetupError, match="set_user_memory_region.*EINVAL") as e:
        t.replay(tr, vm, engine=engine)
    assert e.value.errno == errno.EINVAL
    # ... unless the trace recorded that failure: then it is expected.
    tr.ops["result"][2] = -errno.EINVAL
    res = t.replay(tr, memattr.Vm(tr.vm_type), engine=engine)
    assert res.expected_errors == {"EINVAL": 1}


def test_cli_run_of_a_broken_setup_fails_with_the_reason(tmp_path, capsys):
    path = tmp_path / "bad.trace"
    t.write(_oversized_slot_trace(), path)
    code, out = run(["run", str(path), "--no-progress"], capsys)
    assert code != 0
    assert "setup failed" in out and "EINVAL" in out


def _fault_trace(recorded: int) -> t.Trace:
    """Setup of a 4 GiB guest, creation, one shared fault on private memory
    (no FLAG_CONVERT: it exits)."""
    tr = w.make("vm-creation", "4G")
    ops = np.concatenate([tr.ops, t.fault_ops([0x10000], t.FLAG_WRITE)])
    ops["result"][-1] = recorded
    meta = dict(tr.meta)
    meta["phases"] = []
    return t.Trace(ops, meta)


@pytest.mark.parametrize("engine", ["python", "native"])
def test_errors_the_trace_recorded_are_expected_others_are_not(engine):
    res = t.replay(_fault_trace(-errno.EFAULT), memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM, guest_memfd_max_order=9), engine=engine)
    assert res.expected_errors == {"EFAULT": 1} and res.unexpected_errors == {}
    res = t.replay(_fault_trace(t.RESULT_NONE), memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM, guest_memfd_max_order=9), engine=engine)
    assert res.unexpected_errors == {"EFAULT": 1} and res.expected_errors == {}
    assert res.errors == {"EFAULT": 1}


def test_cli_run_says_unexpected_errors_loudly_and_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "f.trace"
    t.write(_fault_trace(t.RESULT_NONE), path)
    code, out = run(["run", str(path), "--no-progress"], capsys)
    assert code == cli.EXIT_UNEXPECTED_ERRORS
    assert "UNEXPECTED" in out and "EFAULT x1" in out
    t.write(_fault_trace(-errno.EFAULT), path)
    code, out = run(["run", str(path), "--no-progress"], capsys)
    assert code == 0 and "UNEXPECTED" not in out


def test_workloads_provoke_exits_but_no_unexpected_error():
    for name in w.WORKLOADS:
        st = w.stream(name, "4G" if name != "checkerboard" else None)
        vm = memattr.Vm(st.vm_type, **st.meta["vm_kwargs"])
        res = t.replay(st, vm)
        assert res.unexpected_errors == {}, name
        assert res.fault_exits == res.implicit_conversions, name


# --------------------------------------------------------------------------
# streams


@pytest.mark.parametrize("name", list(w.WORKLOADS))
def test_a_stream_is_its_trace_in_bounded_chunks(name, monkeypatch):
    guest = None if name == "checkerboard" else "16G"
    # Small windows and chunks, so the 16 GiB stream comes in many parts.
    monkeypatch.setattr("memattr.generators.CHURN_WINDOW_BIRTHS", 1 << 10)
    st = w.stream(name, guest, discard=name == "churn")
    sizes = [ops.size for _p, ops in st.source()]
    parts = [ops for _p, ops in st.chunks(5000)]
    assert all(p.size <= 5000 for p in parts)
    whole = st.materialize()
    assert np.array_equal(np.concatenate(parts), whole.ops)
    # a second read makes the same records (the source regenerates)
    assert np.array_equal(st.materialize().ops, whole.ops)
    if name in ("boot-and-churn", "churn"):
        assert len(sizes) > 3 and max(sizes) <= 4 * (1 << 10) + 64
    tr_a = memattr.Vm(whole.vm_type, **whole.meta["vm_kwargs"])
    tr_b = memattr.Vm(whole.vm_type, **whole.meta["vm_kwargs"])
    ra = t.replay(whole, tr_a, keep_results=True)
    rb = t.replay(st, tr_b, keep_results=True, chunk=777)
    assert np.array_equal(ra.results, rb.results)
    assert tr_a.stats.as_dict() == tr_b.stats.as_dict()
    assert ra.phase_memory == rb.phase_memory


def test_churn_buffers_stay_disjoint_and_die_after_birth(monkeypatch):
    """Against a per-page model: each birth converts private -> shared
    memory that is private, each death shared -> private memory that is
    shared (a window that misordered a death and a reuse would break it)."""
    monkeypatch.setattr("memattr.generators.CHURN_WINDOW_BIRTHS", 1 << 8)
    lay = GuestLayout.build("8G")
    ch = w.churn(lay, shared_fraction=0.2, turnover=4.0, seed=3)
    page = {}
    sets = ch.ops[ch.ops["kind"] == t.OP_SET_MEMORY_ATTRIBUTES]
    for gpa, size, attrs in zip(sets["gpa"].tolist(), sets["size"].tolist(), sets["attributes"].tolist()):
        for p in range(gpa >> 12, (gpa + size) >> 12):
            before = page.get(p, w.PRIVATE)
            assert before != attrs, f"page {p:#x} converted to what it already is"
            page[p] = attrs
    live = {p for p, v in page.items() if v == w.SHARED}
    want = {p for s, e in zip(ch.shared.starts.tolist(), ch.shared.ends.tolist()) for p in range(s >> 12, e >> 12)}
    assert live == want


def test_binary_files_stream_both_ways(tmp_path):
    st = w.stream("boot-and-churn", "8G")
    path = tmp_path / "b.trace"
    n = stream.write(st, path)
    whole = st.materialize()
    assert n == len(whole)
    back = t.read(path)  # the one-shot reader accepts the streamed file
    assert np.array_equal(back.ops, whole.ops) and back.phases == whole.phases
    again = stream.open_trace(path)
    assert np.array_equal(again.materialize().ops, whole.ops)
    assert again.length_hint == len(whole)


def test_a_bad_record_in_a_stream_is_reported(tmp_path):
    tr = w.make("vm-creation", "4G")
    good = tmp_path / "ok.trace"
    stream.write(tr, good)
    tr.ops["kind"][-1] = 99
    st = stream.TraceStream(dict(tr.meta), lambda: iter([("all", tr.ops)]))
    with pytest.raises(t.TraceFormatError, match="record 4: unknown operation kind 99"):
        stream.write(st, tmp_path / "x.trace")
    # a file damaged after writing: found when its chunk is read
    raw = bytearray(good.read_bytes())
    raw[-4] = 99  # the last record's kind
    good.write_bytes(bytes(raw))
    with pytest.raises(t.TraceFormatError, match="unknown operation kind 99"):
        stream.open_trace(good).materialize() if False else list(stream.open_trace(good).chunks())


# --------------------------------------------------------------------------
# guards


def test_run_refuses_a_per_page_store_over_the_limit(capsys):
    code, out = run(["run", "vm-creation", "--guest", "1T", "--store", "xarray", "--memory-limit", "1G"], capsys)
    assert code == 2
    assert "refused" in out and "xarray" in out and "--store rangetree" in out
    assert sweep.store_refusal("rangetree", 1 * PiB, 1) is None


def test_compare_skips_xarray_over_the_memory_limit(tmp_path, capsys):
    code, out = run(
        ["compare", "--sizes", "1G,4G", "--jobs", "1", "--memory-limit", "10M", "--out", str(tmp_path), "--no-plot",
         "--workload", "vm-creation"],
        capsys,
    )
    assert code == 0
    assert "xarray skipped at 4G" in out


# --------------------------------------------------------------------------
# Dask, fleets, the schema


def _deterministic(r: dict) -> dict:
    drop = {"seconds", "cpu_seconds", "ops_per_second", "generate_seconds", "phase_seconds", "ranges_per_second", "max_rss_bytes"}
    if isinstance(r, dict):
        return {k: _deterministic(v) for k, v in r.items() if k not in drop}
    return r


def test_compare_on_a_dask_local_cluster_equals_the_local_run(tmp_path, capsys):
    pytest.importorskip("distributed")
    argv = ["compare", "--sizes", "1G,2G", "--jobs", "2", "--no-plot", "--time-budget", "0"]
    code, _ = run(argv + ["--out", str(tmp_path / "local")], capsys)
    assert code == 0
    code, out = run(argv + ["--out", str(tmp_path / "dask"), "--dask-local", "2"], capsys)
    assert code == 0
    a = json.loads((tmp_path / "local" / "compare.json").read_text())
    b = json.loads((tmp_path / "dask" / "compare.json").read_text())
    assert "LocalCluster of 2" in b["executor"]
    key = lambda r: (r["guest"], r["store"], r["part"])  # noqa: E731
    ra = sorted((_deterministic(r) for r in a["runs"]), key=key)
    rb = sorted((_deterministic(r) for r in b["runs"]), key=key)
    assert len(ra) == 6 and ra == rb


def test_fleet_adds_up_its_vms(tmp_path, capsys):
    code, out = run(
        ["fleet", "--vms", "5", "--max-guest", "8G", "--jobs", "1", "--out", str(tmp_path), "--no-progress", "--vm"],
        capsys,
    )
    assert code == 0
    data = json.loads((tmp_path / "fleet.json").read_text())
    vms = data["vms"]
    assert len(vms) == 5 and (tmp_path / "fleet.png").exists()
    s = data["summary"]
    for store in ("rangetree", "xarray"):
        assert s["stores"][store]["memory_bytes"] == sum(v["stores"][store]["memory_bytes"] for v in vms)
        assert s["stores"][store]["conversions"] == sum(v["stores"][store]["ranges"] for v in vms)
    assert s["guest_bytes"] == sum(v["guest"] for v in vms)
    assert s["vm_replay"]["unexpected_errors"] == 0
    # one VM on its own gives what the fleet says for it
    v = fleet.plan(5, GiB, 8 * GiB)[0]
    alone = fleet.run_vm(v)
    assert alone["stores"]["rangetree"]["memory_bytes"] == vms[0]["stores"]["rangetree"]["memory_bytes"]


def test_fleet_plan_is_seeded_and_in_range():
    a = fleet.plan(200, GiB, 4 * TiB, seed=1)
    assert a == fleet.plan(200, GiB, 4 * TiB, seed=1)
    assert all(GiB <= v.guest <= 4 * TiB and v.guest % GiB == 0 for v in a)
    assert len({v.workload for v in a}) > 3
    with pytest.raises(ValueError, match="unknown workload"):
        fleet.plan(3, mix={"nope": 1.0})


def test_results_json_follows_the_schema(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    js = tmp_path / "r.json"
    assert run(["run", "boot-and-churn", "--guest", "1G", "--json", str(js), "--no-progress"], capsys)[0] == 0
    jsonschema.validate(json.loads(js.read_text()), schema)
    assert run(["compare", "--sizes", "1G", "--jobs", "1", "--out", str(tmp_path), "--no-plot"], capsys)[0] == 0
    jsonschema.validate(json.loads((tmp_path / "compare.json").read_text()), schema)
    assert run(["fleet", "--vms", "2", "--max-guest", "2G", "--jobs", "1", "--out", str(tmp_path), "--no-plot"], capsys)[0] == 0
    doc = json.loads((tmp_path / "fleet.json").read_text())
    jsonschema.validate(doc, schema)
    # and the schema can fail: a result without its replay tally is refused
    del doc["summary"]["stores"]["xarray"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_block_counts_match_listing_the_blocks():
    """count_blocks / blocks_hit against listing every block (the oracle)."""
    from memattr.gpa_ranges import SharedSet, aligned_blocks, blocks_hit, count_blocks, overlaps

    rng = np.random.default_rng(5)
    lay = GuestLayout.build("9G", high_slots=3)
    for size, floor in ((4 << 20, 0), (2 << 20, 2 << 20), (64 << 10, 2 << 20)):
        blocks = aligned_blocks(lay, size)
        blocks = blocks[blocks >= np.uint64(floor)]
        assert count_blocks(lay, size, floor) == blocks.size
        for _ in range(20):
            s = rng.integers(0, 12 << 30, 6).astype(np.uint64) & ~np.uint64(4095)
            e = s + rng.integers(1, 8 << 20, 6).astype(np.uint64) * np.uint64(4096) // np.uint64(4096)
            holes = SharedSet.of(s, e).holes()
            want = int(overlaps(blocks, blocks + np.uint64(size), holes).sum())
            assert blocks_hit(lay, size, holes, floor) == want


def test_qemu_import_of_a_16t_guest_uses_several_slots():
    from memattr import qemu

    log = [
        "kvm_convert_memory start 0x100000000 size 0x200000 private_to_shared",
        f"kvm_convert_memory start {SZ_4G + MAX_SLOT_SIZE:#x} size 0x1000 private_to_shared",  # the 2nd high slot
        f"kvm_memory_fault start {SZ_4G + MAX_SLOT_SIZE + 0x1000:#x} size 0x1000 flags 0x0",
    ]
    tr = qemu.import_log(log, "16T")
    assert len(tr.meta["layout"]["regions"]) == 3
    vm = memattr.Vm(tr.vm_type)
    res = t.replay(tr, vm)
    assert res.unexpected_errors == {} and res.expected_errors == {"EFAULT": 1}
    assert vm.stats.gmem_holes_punched == 2  # both discards found their slot's guest_memfd
    assert vm.get_memory_attributes((SZ_4G + MAX_SLOT_SIZE) >> 12) == 0


def test_progress_bars_run(monkeypatch, tmp_path, capsys):
    """The rate/ETA bars of run, compare and fleet (drawn only on a
    terminal) run to the end, with a known, an estimated and no total."""
    monkeypatch.setattr(cli, "_show_progress", lambda args: True)
    assert run(["run", "boot-and-churn", "--guest", "1G"], capsys)[0] == 0
    assert run(["run", "vm-creation", "--guest", "1G"], capsys)[0] == 0
    assert run(["fleet", "--vms", "2", "--max-guest", "2G", "--jobs", "1", "--out", str(tmp_path), "--no-plot"], capsys)[0] == 0
    from memattr.progress import RateColumn, _si

    assert _si(1_234_567) == "1.2M" and RateColumn("ops").unit == "ops"


@pytest.mark.parametrize("shuffle", [True, False])
def test_sliced_picks_are_distinct_free_blocks(shuffle, monkeypatch):
    """Against listing the blocks: every pick is a free block, none twice,
    exactly n; in address order without shuffle, the n first free ones."""
    from memattr import gpa_ranges as g

    monkeypatch.setattr(g, "PICK_SLICE", 37)  # many slices, some cut by holes
    lay = GuestLayout.build("6G", high_slots=2)
    rng = np.random.default_rng(2)
    s = np.array([5 << 20, 3 << 30, 4 << 30], np.uint64)
    holes = g.SharedSet.of(s, s + np.array([9 << 20, 1 << 20, 64 << 20], np.uint64)).holes()
    size = 2 << 20
    blocks = g.aligned_blocks(lay, size)
    blocks = blocks[blocks >= np.uint64(size)]
    free = blocks[~g.overlaps(blocks, blocks + np.uint64(size), holes)]
    for n in (0, 1, 100, free.size):
        got = np.concatenate([np.zeros(0, np.uint64)] + list(g.sliced_picks(lay, size, n, holes, rng, size, shuffle)))
        assert got.size == n and np.unique(got).size == n
        assert np.isin(got, free).all()
        if not shuffle:
            assert np.array_equal(got, free[:n])
    with pytest.raises(ValueError, match="free"):
        list(g.sliced_picks(lay, size, free.size + 1, holes, rng, size, shuffle))


def test_picks_spread_over_more_than_a_billion_blocks():
    from memattr.gpa_ranges import _spread

    rng = np.random.default_rng(0)
    free = np.full(5000, 1 << 18, dtype=np.int64)  # 1.3e9 blocks: numpy's hypergeometric refuses
    free[7] = 3
    per = _spread(free, 100_000, rng)
    assert per.sum() == 100_000 and (per >= 0).all() and (per <= free).all()
    small = np.array([3, 0, 5])
    assert _spread(small, 8, rng).tolist() == [3, 0, 5]
