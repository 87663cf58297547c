"""`memattr compare --api both`: the per-VM xarray, the in-place per-file
maple tree and the range store side by side on one workload. The in-place
run's end state is checked page by page against the per-VM run's (the same
conversions through the other API must leave every RAM page with the same
attributes), painted into numpy arrays here from each side's raw runs."""

from __future__ import annotations

import json
import pathlib

import jsonschema
import numpy as np
import pytest

import memattr
from memattr import cli, sweep, workloads
from memattr.gmem_inplace import InPlaceVmm
from memattr.uapi import PAGE_SHIFT

SCHEMA = pathlib.Path(memattr.__file__).parent / "schemas" / "results.schema.json"


def _per_vm_pages(vm: memattr.Vm, ranges: list[tuple[int, int]]) -> np.ndarray:
    """The per-VM store's attributes of every RAM page, from its runs."""
    parts = []
    for start, end in ranges:
        s, e = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        a = np.zeros(e - s, dtype=np.uint64)
        for rs, re_, v in vm.store.runs(s, e):
            a[max(rs, s) - s : min(re_, e) - s] = v
        parts.append(a)
    return np.concatenate(parts)


def _in_place_pages(vm: memattr.Vm, ranges: list[tuple[int, int]]) -> np.ndarray:
    """The per-file attributes of every RAM page, each gfn read through the
    memslot that binds it (file page = gfn - base_gfn + offset pages)."""
    files = {fd: np.zeros(size >> PAGE_SHIFT, dtype=np.uint64) for fd, size, _f, _b in vm.guest_memfds()}
    for fd, a in files.items():
        for rs, re_, v in vm.guest_memfd_attributes(fd):
            a[rs:re_] = v
    parts = []
    for start, end in ranges:
        s, e = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        a = np.zeros(e - s, dtype=np.uint64)
        for slot in vm.memslots.in_range(0, s, e):
            assert slot.gmem is not None, "every RAM slot of boot-and-churn has a guest_memfd"
            lo, hi = max(s, slot.base_gfn), min(e, slot.end_gfn)
            first = (slot.guest_memfd_offset >> PAGE_SHIFT) + lo - slot.base_gfn
            a[lo - s : hi - s] = files[slot.gmem][first : first + hi - lo]
        parts.append(a)
    return np.concatenate(parts)


def _before_kexec(trace: memattr.Trace) -> memattr.Trace:
    """The trace up to the end of its churn: the final kexec makes every
    page private again, which would hide a wrong conversion."""
    phases = [p for p in trace.meta["phases"] if p[0] != "kexec"]
    end = phases[-1][2]
    return memattr.Trace(trace.ops[:end].copy(), {**trace.meta, "phases": phases})


@pytest.mark.parametrize("store", ["mapletree", "rangetree"])
@pytest.mark.parametrize("kexec", [False, True])
def test_in_place_ends_with_the_per_vm_runs_pages(store, kexec):
    # 4 GiB: the high slot binds the guest_memfd from offset 2 GiB, so a
    # conversion sent to the wrong file offset shows.
    trace = workloads.make("boot-and-churn", "4G")
    if not kexec:
        trace = _before_kexec(trace)
    ranges = sweep._ram_ranges(trace)
    per_vm = memattr.Vm(trace.vm_type, store="xarray", **dict(trace.meta.get("vm_kwargs", {})))
    res = memattr.replay(trace, per_vm, engine="python")
    assert not res.unexpected_errors
    inplace = memattr.Vm(trace.vm_type, store=store, semantics="gmem-inplace", **dict(trace.meta.get("vm_kwargs", {})))
    target = InPlaceVmm(inplace)
    res2 = memattr.replay(trace, target, engine="python")
    assert not res2.unexpected_errors
    want = _per_vm_pages(per_vm, ranges)
    got = _in_place_pages(inplace, ranges)
    assert want.size == got.size == trace_pages(ranges)
    mismatch = np.flatnonzero(want != got)
    assert mismatch.size == 0, f"{mismatch.size} pages differ, first at RAM page {int(mismatch[0])}"
    # Something happened: the churn leaves some pages shared, most private
    # (the kexec makes them all private).
    shared = int((got == 0).sum())
    assert (shared == 0) if kexec else (0 < shared < got.size // 2)
    # The view the compare counts with agrees with the painted pages.
    counts = sweep.attribute_bytes(target.store, ranges)
    assert counts["private_bytes"] >> PAGE_SHIFT == int((got != 0).sum())
    assert counts["shared_bytes"] >> PAGE_SHIFT == int((got == 0).sum())


def trace_pages(ranges: list[tuple[int, int]]) -> int:
    return sum((e - s) >> PAGE_SHIFT for s, e in ranges)


def test_run_inplace_counts_the_files_memory_and_no_holes():
    trace = workloads.make("boot-and-churn", "1G")
    r = sweep.run_inplace(trace)
    assert r["api"] == "inplace" and r["store"] == "mapletree" and r["engine"] == "python"
    assert r["gmem_calls"] > 0 and r["replay"]["unexpected_errors"] == {}
    assert r["stats"]["gmem_holes_punched"] == 0
    assert 0 < r["memory_bytes"] <= r["peak_memory_bytes"]
    assert r["private_bytes"] + r["shared_bytes"] == 1 << 30
    with pytest.raises(ValueError, match="parts"):
        sweep.Config(store="mapletree", api="inplace")
    with pytest.raises(ValueError, match="api"):
        sweep.Config(api="sideways")


def test_compare_api_both_puts_three_contenders_side_by_side(tmp_path, capsys):
    argv = ["compare", "--api", "both", "--sizes", "1G", "--jobs", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "What changes for a VMM in place" in out and "holes punched" in out
    payload = json.loads((tmp_path / "compare.json").read_text())
    jsonschema.validate(payload, json.loads(SCHEMA.read_text()))
    assert (tmp_path / "compare.png").exists()
    assert payload["api"] == "both"
    (row,) = payload["rows"]
    assert {"xarray", "rangetree", "inplace"} <= set(row)
    # Per VM, QEMU punches a hole after every conversion to shared; in place
    # it does not.
    assert row["xarray"]["holes_punched"] == row["rangetree"]["holes_punched"] > 0
    assert row["inplace"]["holes_punched"] == 0
    assert row["inplace"]["store"] == "mapletree" and row["inplace"]["gmem_calls"] > 0
    runs = [r for r in payload["runs"] if r.get("api") == "inplace"]
    assert len(runs) == 1 and runs[0]["replay"]["unexpected_errors"] == {}
    # Same end state through either API: as many private bytes of RAM.
    per_vm = [r for r in payload["runs"] if r["store"] == "xarray" and r["part"] == "vm"]
    assert per_vm[0]["private_bytes"] == runs[0]["private_bytes"]


def test_compare_api_both_keeps_the_xarray_memory_guard(tmp_path, capsys):
    argv = ["compare", "--api", "both", "--sizes", "1G", "--jobs", "1", "--memory-limit", "1M",
            "--out", str(tmp_path), "--no-plot", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "xarray skipped at 1G" in out
    (row,) = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert "xarray" not in row and {"inplace", "rangetree"} <= set(row)
