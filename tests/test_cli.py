"""The ``memattr`` command end to end at small sizes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from memattr import cli, report, sweep
from memattr import trace as t
from memattr import workloads as w

GiB = w.GiB


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().out


def test_list(capsys):
    code, out = run(["list"], capsys)
    assert code == 0
    for name in w.WORKLOADS:
        assert name in out


def test_run_workload_prints_and_writes_json(tmp_path, capsys):
    js = tmp_path / "r.json"
    code, out = run(["run", "boot-and-churn", "--guest", "1G", "--json", str(js), "--no-progress"], capsys)
    assert code == 0
    for what in ("conversions", "no-op", "zapped ranges", "TLB flushes", "KVM_EXIT_MEMORY_FAULT", "final shared RAM", "hugepage coverage"):
        assert what in out
    res = json.loads(js.read_text())["result"]
    # kexec converts everything back: RAM ends private
    assert res["private_bytes"] == GiB and res["shared_bytes"] == 0
    assert res["replay"]["implicit_conversions"] == 64
    assert res["stats"]["memory_fault_exits"] == 64
    assert res["stats"]["set_calls"] == res["replay"]["sets"]
    assert res["operations"] == len(w.make("boot-and-churn", "1G"))
    assert set(res["hugepages"]["mapped_bytes"]) == {"4K", "2M", "1G"}


def test_run_engines_agree_and_are_reported(tmp_path, capsys):
    results = {}
    for engine in ("python", "native"):
        js = tmp_path / f"{engine}.json"
        code, out = run(
            ["run", "boot-and-churn", "--guest", "2G", "--engine", engine, "--json", str(js), "--no-progress"], capsys
        )
        assert code == 0 and engine in out
        results[engine] = json.loads(js.read_text())["result"]
        assert results[engine]["engine"] == engine
    for key in ("stats", "replay", "private_bytes", "shared_bytes", "hugepages", "memory_bytes"):
        assert results["python"][key] == results["native"][key], key
    # A recording must see every call: native cannot record.
    code = cli.main(["run", "churn", "--guest", "2G", "--engine", "native", "--record", str(tmp_path / "x.trace")])
    assert code == 2 and "cannot record" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(["run", "churn", "--engine", "rust"], capsys)
    with pytest.raises(ValueError, match="engine must be one of"):
        sweep.Config(engine="rust")


def test_run_record_then_replay_trace(tmp_path, capsys):
    rec = tmp_path / "rec.trace"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    code, _ = run(
        ["run", "churn", "--guest", "2G", "--store", "xarray", "--record", str(rec), "--json", str(a), "--seed", "3"],
        capsys,
    )
    assert code == 0 and rec.exists()
    tr = t.read(rec)
    assert (tr.ops["result"] != t.RESULT_NONE).all()
    code, _ = run(["run", str(rec), "--store", "rangetree", "--json", str(b)], capsys)
    assert code == 0
    ra, rb = json.loads(a.read_text())["result"], json.loads(b.read_text())["result"]
    assert ra["stats"] == rb["stats"]
    assert (ra["private_bytes"], ra["shared_bytes"]) == (rb["private_bytes"], rb["shared_bytes"])


def test_generate_show_and_text_form(tmp_path, capsys):
    out_txt = tmp_path / "cb.txt"
    code, out = run(["generate", "checkerboard", "-o", str(out_txt), "--guest", "5G"], capsys)
    assert code == 0 and "operations" in out
    assert out_txt.read_text().startswith(t.TEXT_HEADER)
    code, out = run(["show", str(out_txt)], capsys)
    assert code == 0 and '"checkerboard"' in out
    code, out = run(["run", str(out_txt), "--json", str(tmp_path / "cb.json")], capsys)
    assert code == 0
    res = json.loads((tmp_path / "cb.json").read_text())["result"]
    assert res["shared_bytes"] == 5 * GiB  # memory starts and ends shared


def test_import_qemu_and_run(tmp_path, capsys):
    log = tmp_path / "qemu.log"
    log.write_text(
        "4242@1700000000.1:kvm_convert_memory start 0x100000000 size 0x200000 private_to_shared\n"
        "4242@1700000000.2:kvm_memory_fault start 0x100400000 size 0x1000 flags 0x0\n"
        "4242@1700000000.3:kvm_convert_memory start 0x100400000 size 0x1000 private_to_shared\n"
    )
    out_trace = tmp_path / "q.trace"
    code, out = run(["import-qemu", str(log), "-o", str(out_trace), "--guest", "4G"], capsys)
    # Two conversions to shared: each followed by QEMU's guest_memfd discard.
    assert code == 0 and "imported 3 QEMU events as 5 KVM operations" in out
    code, _ = run(["run", str(out_trace), "--json", str(tmp_path / "q.json")], capsys)
    assert code == 0
    res = json.loads((tmp_path / "q.json").read_text())["result"]
    assert res["shared_bytes"] == 0x200000 + 0x1000
    assert res["stats"]["memory_fault_exits"] == 1
    assert res["stats"]["gmem_holes_punched"] == 2
    # the log can also be run directly
    code, _ = run(["run", str(log), "--qemu-log", "--guest", "4G", "--json", str(tmp_path / "q2.json")], capsys)
    assert code == 0
    assert json.loads((tmp_path / "q2.json").read_text())["result"]["stats"] == res["stats"]


def test_compare_writes_json_and_png(tmp_path, capsys):
    out_dir = tmp_path / "results"
    code, out = run(
        ["compare", "--sizes", "1G,2G,4G", "--xarray-max", "2G", "--jobs", "1", "--out", str(out_dir)], capsys
    )
    assert code == 0
    assert "xarray skipped at 4G: --xarray-max 2G" in out
    data = json.loads((out_dir / "compare.json").read_text())
    rows = {r["guest"]: r for r in data["rows"]}
    assert sorted(rows) == [GiB, 2 * GiB, 4 * GiB]
    for g in (GiB, 2 * GiB):
        assert {"rangetree", "xarray", "throughput_ratio", "cpu_ratio", "memory_ratio", "store_only_ratio"} <= set(rows[g])
        assert rows[g]["xarray"]["memory_bytes"] > rows[g]["rangetree"]["memory_bytes"]
    assert "xarray" not in rows[4 * GiB] and data["skipped"] == {"xarray": {"4G": "--xarray-max 2G"}}
    # Three rangetree runs, and xarray's Vm and store-only
    # replays as separate parts at 1G and 2G, joined per row.
    assert len(data["runs"]) == 7 and data["machine"]["cpus"] >= 1
    parts = sorted((r["guest"], r["part"]) for r in data["runs"] if r["store"] == "xarray")
    assert parts == [(GiB, "store-only"), (GiB, "vm"), (2 * GiB, "store-only"), (2 * GiB, "vm")]
    png = out_dir / "compare.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_time_budget_stops_xarray(tmp_path, capsys):
    code, out = run(
        ["compare", "--sizes", "1G,2G", "--time-budget", "0.000001", "--jobs", "1", "--out", str(tmp_path), "--no-plot"],
        capsys,
    )
    assert code == 0
    assert "xarray skipped at 2G: time: predicted" in out
    data = json.loads((tmp_path / "compare.json").read_text())
    # Only the smallest size's two parts ran.
    assert sorted(r["part"] for r in data["runs"] if r["store"] == "xarray") == ["store-only", "vm"]
    assert not (tmp_path / "compare.png").exists()


def test_bad_trace_rejected_with_location(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text(t.TEXT_HEADER + "\nfault gpa=0x0 access=shared\nexplode gpa=0x0\n")
    code, out = run(["run", str(bad)], capsys)
    assert code == 2 and "line 3" in out and "unknown operation 'explode'" in out
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    code, out = run(["run", str(junk)], capsys)
    assert code == 2 and "not a memattr trace" in out
    code, out = run(["show", str(junk)], capsys)
    assert code == 2 and "byte offset 0" in out


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--guest", "12Q"])
    assert e.value.code == 2
    assert "cannot parse size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--shared-fraction", "2"])
    with pytest.raises(SystemExit):
        cli.main(["run", "no-such-workload-or-file"])
    with pytest.raises(SystemExit):
        cli.main(["compare", "--jobs", "0"])
    code, out = run(["run", "checkerboard", "--guest", "1G"], capsys)
    assert code == 2 and "checkerboard" in out  # needs RAM above 4 GiB


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "memattr", "list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "boot-and-churn" in proc.stdout


# --------------------------------------------------------------------------
# sweeps through any Executor


def test_sweep_with_a_caller_executor_and_follow_up():
    import concurrent.futures as cf

    from memattr import sweep

    configs = [sweep.Config("vm-creation", g, s) for g in (GiB, 2 * GiB) for s in sweep.STORES]
    bad = sweep.Config("churn", 64 << 20, "rangetree", params=(("shared_fraction", 0.5),))
    extra = sweep.Config("vm-creation", 4 * GiB, "rangetree")
    seen: list[tuple[str, bool]] = []

    def follow_up(c, r):
        return [extra] if c.guest == 2 * GiB and c.store == "xarray" else []

    with cf.ThreadPoolExecutor(max_workers=2) as ex:
        res = sweep.sweep(
            configs + [bad],
            executor=ex,
            on_done=lambda c, r, e: seen.append((c.label(), e is None)),
            follow_up=follow_up,
        )
        # the caller's executor is still usable: sweep never shuts it down
        assert ex.submit(lambda: 7).result() == 7
    assert [(r["guest"], r["store"]) for r in res.results] == [
        (GiB, "rangetree"),
        (GiB, "xarray"),
        (2 * GiB, "rangetree"),
        (2 * GiB, "xarray"),
        (4 * GiB, "rangetree"),
    ]
    assert len(res.failures) == 1 and res.failures[0][0] == bad and "free 2 MiB blocks" in res.failures[0][1]
    assert len(seen) == 6 and ("churn 64M rangetree", False) in seen
    for r in res.results:
        assert r["private_bytes"] == r["guest"] and r["store_only"]["ranges"] == len(
            [x for x in w.GuestLayout.build(r["guest"]).regions]
        )


def test_run_config_parts_join_into_one_row():
    both = sweep.run_config(sweep.Config("vm-creation", GiB, "xarray"))
    vm = sweep.run_config(sweep.Config("vm-creation", GiB, "xarray", parts="vm"))
    so = sweep.run_config(sweep.Config("vm-creation", GiB, "xarray", parts="store-only"))
    assert "store_only" not in vm and "seconds" not in so
    assert (both["part"], vm["part"], so["part"]) == ("both", "vm", "store-only")
    rt = sweep.run_config(sweep.Config("vm-creation", GiB, "rangetree"))
    for results in ([rt, both], [rt, so, vm], [rt, vm, so]):
        (row,) = report.compare_rows(results)
        assert row["xarray"]["memory_bytes"] == both["memory_bytes"]
        assert set(row["store_only"]) == {"rangetree", "xarray"} and "store_only_ratio" in row
    # Only the store-only part: no Vm columns for that store, no Vm ratios.
    (row,) = report.compare_rows([rt, so])
    assert "xarray" not in row and "throughput_ratio" not in row and "store_only_ratio" in row


def test_config_rejects():
    from memattr import sweep

    with pytest.raises(ValueError, match="store"):
        sweep.Config(store="btree")
    with pytest.raises(ValueError, match="unknown workload"):
        sweep.Config(workload="nope")
    with pytest.raises(ValueError, match="guest"):
        sweep.Config(guest=0)
    with pytest.raises(ValueError, match="parts must be one of"):
        sweep.Config(parts="half")
    with pytest.raises(ValueError, match="store"):
        sweep.run_trace(w.vm_creation("1G"), "btree")


def test_compare_on_a_trace_file(tmp_path, capsys):
    path = tmp_path / "mine.trace"
    code, _ = run(["generate", "churn", "-o", str(path), "--guest", "2G", "--seed", "4"], capsys)
    assert code == 0
    out_dir = tmp_path / "out"
    code, out = run(["compare", "--trace", str(path), "--jobs", "1", "--out", str(out_dir), "--no-plot"], capsys)
    assert code == 0 and "churn" in out
    data = json.loads((out_dir / "compare.json").read_text())
    (row,) = data["rows"]
    assert row["guest"] == 2 * GiB and {"rangetree", "xarray", "throughput_ratio", "store_only_ratio"} <= set(row)
    assert data["trace"] == str(path) and data["workload"] == "churn"
    assert row["operations"] == len(t.read(path))
    # A trace without memslots has no guest size to compare at.
    bare = tmp_path / "bare.trace"
    t.write(t.Trace(t.set_ops(0, 4096, 8), {"vm_type": 1}), bare)
    code, out = run(["compare", "--trace", str(bare), "--out", str(tmp_path / "o1")], capsys)
    assert code == 2 and "creates no memslot" in out
    # A file that is not a trace fails before anything runs.
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"MEMATTRT" + b"\0" * 4)
    code, out = run(["compare", "--trace", str(bad), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "bad trace" in out


def _store_words(text: str) -> list[str]:
    """Other names for the two stores than their API names."""
    low = text.lower()
    return [w for w in ("range store", "per-page store", "range tree", "per page store") if w in low]


def test_one_vocabulary_for_the_stores_in_the_help() -> None:
    """Every subcommand's help names the stores as the API does."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert _store_words(sub.format_help()) == [], name


def test_one_vocabulary_for_the_stores_in_tables_json_and_plots(tmp_path, capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    code, out = run(
        ["compare", "--sizes", "1G,2G", "--xarray-max", "1G", "--jobs", "1", "--out", str(tmp_path), "--no-plot"],
        capsys,
    )
    assert code == 0
    # The stores are named as the API names them; the caption says once
    # what xarray is.
    assert "rangetree vs xarray" in out and "rangetree at every size, xarray up to 1G" in out
    assert out.count(report.STORES_CAPTION) == 1
    assert _store_words(out.replace(report.STORES_CAPTION, "")) == []
    data = json.loads((tmp_path / "compare.json").read_text())
    assert _store_words(json.dumps(data)) == []
    assert {r["store"] for r in data["runs"]} == {"rangetree", "xarray"}
    assert set(data["skipped"]) == {"xarray"}
    assert {k for row in data["rows"] for k in row if k in ("rangetree", "xarray")} == {"rangetree", "xarray"}
    # The compare table's store columns.
    table = report.compare_table(data["rows"], "t")
    headers = [str(c.header) for c in table.columns]
    assert [h for h in headers if h.startswith(("rangetree", "xarray"))] == [
        f"{s} {what}" for s in ("rangetree", "xarray") for what in ("time", "ops/s", "memory")
    ]
    assert table.caption == report.STORES_CAPTION
    # run: the table's title and the JSON.
    js = tmp_path / "run.json"
    code, out = run(["run", "churn", "--guest", "1G", "--store", "xarray", "--json", str(js), "--no-progress"], capsys)
    assert code == 0 and "store xarray" in out and _store_words(out) == []
    assert json.loads(js.read_text())["result"]["store"] == "xarray"
    # The plot: legends, titles and notes (the figure is caught on close).
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    report.plot(data["rows"], tmp_path / "p.png", "rangetree vs xarray")
    (fig,) = figs
    legend = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert legend and all(t.split(",")[0] in ("rangetree", "xarray") for t in legend)
    assert {t.split(",")[0] for t in legend} == {"rangetree", "xarray"}
    texts = legend + [ax.get_title() for ax in fig.axes] + [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "shaded: xarray skipped" in texts
    assert _store_words(" | ".join(texts)) == []
    monkeypatch.undo()
    plt.close(fig)
