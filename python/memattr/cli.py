"""The ``memattr`` command.

``memattr compare``
    The main job: the same workload on the ``rangetree`` store and on the
    ``xarray`` store (the kernel's per-page model) over guest sizes from
    1 GiB up, in parallel across cores; prints a table (time, operations per
    second, store memory, speedups), writes ``compare.json`` and
    ``compare.png`` to ``--out`` (default ./results). ``xarray`` stops at the
    first size whose predicted memory or time does not fit this machine, and
    says why. With no arguments it is a one-minute demonstration.
``memattr run WORKLOAD|TRACE``
    One workload (or a trace file, or a QEMU log with ``--qemu-log``) on one
    store: what happened, as the kernel counts it.
``memattr generate WORKLOAD -o FILE``
    Writes a workload as a trace (binary, or text for ``.txt``).
``memattr import-qemu LOG -o FILE --guest SIZE``
    Converts a QEMU ``-trace kvm_convert_memory`` log into a trace.
``memattr show TRACE``
    Validates a trace and summarises it.
``memattr list``
    The named workloads.
``memattr explore SCENARIO`` / ``memattr explore --replay FILE``
    Explores the interleavings of concurrent KVM operations on one VM and
    reports races as kernel splats (see memattr.explore_cli).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from memattr import explore_cli, qemu, report, sweep, workloads
from memattr import progress as progress_mod
from memattr import stream as stream_mod
from memattr.distributed import add_cluster_args
from memattr import trace as trace_mod
from memattr.units import format_size, parse_size

DEFAULT_SIZES = "1G,4G,16G,64G,256G,1T"
# An xarray run is skipped when predicted to take longer than
# this (seconds) or to need more than MEMORY_SHARE of available memory.
DEFAULT_TIME_BUDGET = 40.0
MEMORY_SHARE = sweep.MEMORY_SHARE
# Exit status of a run or compare that finished with unexpected errors.
EXIT_UNEXPECTED_ERRORS = 3


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes(text: str) -> list[int]:
    sizes = sorted({_size(part) for part in text.split(",") if part.strip()})
    if not sizes:
        raise argparse.ArgumentTypeError("at least one size is needed")
    return sizes


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return v


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


# Churn turnover: buffer generations. Each generation replaces the whole
# population, so the trace (and the run's memory) grows with it.
MAX_TURNOVER = 1000.0


def _turnover(text: str) -> float:
    v = _nonneg(text)
    if v > MAX_TURNOVER:
        raise argparse.ArgumentTypeError(
            f"{text} is above {MAX_TURNOVER:g} (each generation adds a whole population of buffers)"
        )
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**64)")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return v


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload parameters (ignored by workloads that do not use them)")
    g.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    g.add_argument("--style", choices=workloads.STYLES, default="tdx", help="conversion request style (default tdx)")
    g.add_argument("--vcpus", type=_positive_int, default=None, help="vCPUs (default: the workload's)")
    g.add_argument("--shared-fraction", type=_fraction, default=None, help="churn target shared fraction (0.075)")
    g.add_argument("--accept-fraction", type=_fraction, default=None, help="fraction of RAM accepted lazily")
    g.add_argument(
        "--turnover", type=_turnover, default=None, help=f"churn turnover: buffer generations (1.0, at most {MAX_TURNOVER:g})"
    )
    g.add_argument(
        "--discard",
        action="store_true",
        help="punch the guest_memfd hole after each conversion to shared, as QEMU does",
    )
    g.add_argument(
        "--gmem-max-order",
        type=int,
        default=None,
        help="guest_memfd folio order for the Vm (default 9 = 2M folios; 0 = upstream 6.8 4K-only)",
    )


def _memory_limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory-limit",
        type=_size,
        default=None,
        help=f"memory the runs may use in all (default: {MEMORY_SHARE:g} of the available memory); "
        "an xarray run predicted to exceed it is refused up front",
    )


def _engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=trace_mod.ENGINES,
        default="auto",
        help="native: set/fault operations in Rust batches (same rules and counters); "
        "python: one Vm call per operation, the reference; auto (default): native where possible",
    )


def _params(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"style": args.style}
    if args.vcpus is not None:
        out["nr_vcpus"] = args.vcpus
    if args.shared_fraction is not None:
        out["shared_fraction"] = args.shared_fraction
    if args.accept_fraction is not None:
        out["accept_fraction"] = args.accept_fraction
    if args.turnover is not None:
        out["turnover"] = args.turnover
    if args.discard:
        out["discard"] = True
    return out


def _vm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.gmem_max_order is None:
        return {}
    return {"guest_memfd_max_order": args.gmem_max_order}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memattr",
        description="Model KVM memory attributes: run conversion workloads, compare the rangetree and xarray stores.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="the same workload on both stores over guest sizes (the main job)")
    c.add_argument("--workload", default="boot-and-churn", choices=list(workloads.WORKLOADS))
    c.add_argument(
        "--trace",
        metavar="FILE",
        help="compare on a trace file (one size: the trace's guest) instead of a workload",
    )
    c.add_argument("--sizes", type=_sizes, default=_sizes(DEFAULT_SIZES), help=f"guest sizes (default {DEFAULT_SIZES})")
    c.add_argument(
        "--api",
        choices=("vm", "both"),
        default="vm",
        help="vm: the per-VM API on rangetree and xarray (default); both: also the same conversions in place "
        "(KVM_SET_MEMORY_ATTRIBUTES2 on each guest_memfd, per-file maple tree; the per-VM runs punch the "
        "guest_memfd hole after each conversion to shared, as QEMU does, the in-place run does not)",
    )
    c.add_argument("--xarray-max", type=_size, default=None, help="largest guest for xarray (default: auto)")
    c.add_argument(
        "--time-budget",
        type=_nonneg,
        default=DEFAULT_TIME_BUDGET,
        help=f"skip xarray runs predicted to take longer, seconds (default {DEFAULT_TIME_BUDGET:g})",
    )
    c.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1, help="parallel runs (default: cores)")
    c.add_argument("--out", default="results", help="output directory (default ./results)")
    c.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    _memory_limit_arg(c)
    add_cluster_args(c)
    _workload_args(c)
    _engine_arg(c)

    r = sub.add_parser("run", help="one workload or trace on one store")
    r.add_argument("source", nargs="?", default="boot-and-churn", help="workload name or trace/QEMU log file")
    r.add_argument("--store", choices=sweep.RUN_STORES, default="rangetree")
    r.add_argument("--guest", type=_size, default=_size("64G"), help="guest RAM (default 64G)")
    r.add_argument("--low-limit", type=_size, default=_size("2G"), help="RAM below 4 GiB, for QEMU logs (2G)")
    r.add_argument("--qemu-log", action="store_true", help="SOURCE is a QEMU -trace kvm_convert_memory log")
    r.add_argument("--record", metavar="FILE", help="record the calls made (with results) as a trace")
    r.add_argument("--json", metavar="FILE", help="write the result as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _memory_limit_arg(r)
    _workload_args(r)
    _engine_arg(r)

    g = sub.add_parser("generate", help="write a workload as a trace file")
    g.add_argument("workload", choices=list(workloads.WORKLOADS))
    g.add_argument("-o", "--output", required=True, help="trace file (.txt for the text form)")
    g.add_argument("--guest", type=_size, default=_size("64G"))
    g.add_argument("--text", action="store_true", help="text form whatever the name")
    _workload_args(g)

    q = sub.add_parser("import-qemu", help="convert a QEMU kvm_convert_memory log into a trace")
    q.add_argument("log")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--guest", type=_size, required=True, help="the guest's RAM (QEMU -m)")
    q.add_argument("--low-limit", type=_size, default=_size("2G"))
    q.add_argument("--shared-at-start", action="store_true", help="QEMU did not make the slots private")
    q.add_argument(
        "--no-discard",
        action="store_true",
        help="no guest_memfd hole after each conversion to shared (QEMU punches one)",
    )
    q.add_argument("--text", action="store_true")
    q.add_argument(
        "--strict", action="store_true", help="a line naming an event that does not parse is an error (default: skipped, counted)"
    )

    f = sub.add_parser("fleet", help="many VMs on one host as one simulation: totals per store")
    f.add_argument("--vms", type=_positive_int, default=200, help="guests on the host (default 200)")
    f.add_argument("--min-guest", type=_size, default=_size("1G"), help="smallest guest (default 1G)")
    f.add_argument("--max-guest", type=_size, default=_size("4T"), help="largest guest (default 4T)")
    f.add_argument(
        "--mix",
        default=None,
        help="workloads and weights, e.g. boot-and-churn=3,churn=1 (default: a mix of all)",
    )
    f.add_argument("--seed", type=int, default=0, help="fleet seed (sizes, workloads, per-VM seeds)")
    f.add_argument("--vm", action="store_true", help="also run the whole model (Vm replay) on the rangetree")
    f.add_argument(
        "--xarray-max",
        type=_size,
        default=_size("64G"),
        help="largest guest the xarray runs for; larger ones get its per-page estimate (default 64G)",
    )
    f.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1, help="parallel VMs (default: cores)")
    f.add_argument("--out", default="results", help="output directory (default ./results)")
    f.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    _memory_limit_arg(f)
    add_cluster_args(f)

    s = sub.add_parser("show", help="validate and summarise a trace")
    s.add_argument("trace")

    sub.add_parser("list", help="list the named workloads")

    explore_cli.add_parser(sub)
    return p


def _show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stdout.isatty()


def _load_source(args: argparse.Namespace) -> stream_mod.TraceStream:
    """The run's operations as a stream: a workload generated in bounded
    chunks, a binary trace read in bounded chunks (text traces and QEMU
    logs are parsed whole)."""
    src = args.source
    if args.qemu_log:
        return stream_mod.as_stream(qemu.import_log(src, args.guest, args.low_limit))
    if src in workloads.WORKLOADS:
        return workloads.stream(src, args.guest, seed=args.seed, **_params(args))
    if os.path.exists(src):
        if trace_mod.is_trace_file(src):
            return stream_mod.open_trace(src)
        raise trace_mod.TraceFormatError(
            f"{src}: not a memattr trace (use --qemu-log for a QEMU log)"
        )
    raise SystemExit(f"memattr run: {src!r} is neither a workload ({', '.join(workloads.WORKLOADS)}) nor a file")


def report_errors(console: Console, label: str, replay: dict[str, Any], expected_too: bool = True) -> bool:
    """Says loudly what went wrong in a run (unexpected errors) and quietly
    what the trace asked for (expected errors, memory-fault exits answered
    by conversions). True if anything unexpected happened."""
    unexpected = replay.get("unexpected_errors") or {}
    expected = replay.get("expected_errors") or {}
    if expected_too and (expected or replay.get("implicit_conversions")):
        parts = [f"{k} x{v:,}" for k, v in sorted(expected.items())]
        if replay.get("fault_exits"):
            parts.append(
                f"{replay['fault_exits']:,} memory-fault exits, {replay.get('implicit_conversions', 0):,} "
                "answered by implicit conversions"
            )
        console.print(f"{label}: expected (the trace provokes them): " + ", ".join(parts))
    if unexpected:
        total = sum(unexpected.values())
        console.print(
            f"[bold red]{label}: {total:,} UNEXPECTED error(s): "
            + ", ".join(f"{k} x{v:,}" for k, v in sorted(unexpected.items()))
            + " - these calls were meant to succeed, so the numbers do not describe the workload[/]"
        )
    return bool(unexpected)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    st = _load_source(args)
    guest = sweep.trace_guest_size(st)
    why = sweep.store_refusal(args.store, guest, sweep.memory_cap(args.memory_limit))
    if why:
        console.print(f"[red]memattr run: refused:[/] {why}")
        return 2
    run = dict(vm_kwargs=_vm_kwargs(args), recorder=bool(args.record), engine=args.engine)
    if _show_progress(args):
        with progress_mod.bar(console) as prog:
            task = prog.add_task(f"{st.name} {sweep.format_size(guest)} on {args.store}", total=st.length_hint)
            result = sweep.run_trace(st, args.store, progress=lambda n: prog.advance(task, n), **run)  # type: ignore[arg-type]
    else:
        result = sweep.run_trace(st, args.store, **run)  # type: ignore[arg-type]
    recorded = result.pop("trace", None)
    console.print(report.run_table(result))
    bad = report_errors(console, f"{result['workload']} on {args.store}", result["replay"])
    if recorded is not None:
        trace_mod.write(recorded, args.record)
        console.print(f"recorded {len(recorded):,} operations to {args.record}")
    if args.json:
        report.write_json(args.json, {"command": "run", "machine": sweep.machine(), "result": result})
        console.print(f"wrote {args.json}")
    return EXIT_UNEXPECTED_ERRORS if bad else 0


def _xarray_plan(args: argparse.Namespace, console: Console) -> tuple[int, str]:
    """Largest size xarray may run at, and why it stops there."""
    mem_cap = sweep.memory_cap(args.memory_limit, args.jobs)
    if args.xarray_max is not None:
        return args.xarray_max, f"--xarray-max {format_size(args.xarray_max)}"
    fits = [s for s in args.sizes if sweep.xarray_fits(s, mem_cap)]
    limit = max(fits) if fits else 0
    why = (
        f"memory: needs ~{sweep.XARRAY_BYTES_PER_PAGE:g} B per 4K page (counted twice for headroom); "
        f"{report.human_bytes(mem_cap)} available per job"
    )
    return limit, why


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a directory")
    os.makedirs(args.out, exist_ok=True)
    params = tuple(sorted(_params(args).items()))
    vmk = tuple(sorted(_vm_kwargs(args).items()))
    name = args.workload
    if args.trace:
        # Validated here, once, so a bad file fails before any worker starts.
        tr = stream_mod.open_trace(args.trace)
        for _ in tr.chunks():  # every record validated, one chunk at a time
            pass
        name = tr.name
        args.sizes = [sweep.trace_guest_size(tr)]
        if args.sizes[0] <= 0:
            raise ValueError(f"{args.trace}: the trace creates no memslot, so it has no guest size")
    sizes = args.sizes
    xa_limit, xa_why = _xarray_plan(args, console)
    trace_path = os.path.abspath(args.trace) if args.trace else ""

    inplace = args.api == "both"
    if inplace and not args.trace:
        # Per VM, QEMU discards the shared copy's guest_memfd page after a
        # conversion to shared (the private and shared pages are distinct);
        # in place the same page serves both, so no hole is punched.
        params = tuple(sorted({**dict(params), "discard": True}.items()))
    ip_params = tuple((k, v) for k, v in params if k != "discard")

    def cfg(size: int, store: str, parts: str = "both") -> sweep.Config:
        return sweep.Config(args.workload, size, store, args.seed, params, vmk, args.engine, parts, trace_path)

    def ip_cfg(size: int) -> sweep.Config:
        return sweep.Config(
            args.workload, size, "mapletree", args.seed, ip_params if not args.trace else params, vmk,
            "python", "vm", trace_path, api="inplace",
        )

    def per_page(size: int) -> list[sweep.Config]:
        # xarray's Vm replay and store-only replay are the long
        # runs: as two tasks they use two cores instead of one.
        return [cfg(size, "xarray", "vm"), cfg(size, "xarray", "store-only")]

    rt_configs = [cfg(s, "rangetree") for s in sorted(sizes, reverse=True)]  # longest first
    if inplace:
        rt_configs = [c for s in sorted(sizes, reverse=True) for c in (ip_cfg(s), cfg(s, "rangetree"))]
    xa_sizes = [s for s in sizes if s <= xa_limit]
    skipped: dict[int, str] = {s: xa_why for s in sizes if s > xa_limit}
    first = per_page(xa_sizes[0]) if xa_sizes else []

    state: dict[str, Any] = {"total": len(rt_configs) + 2 * len(xa_sizes), "progress": None}

    def follow_up(c: sweep.Config, result: dict[str, Any]) -> list[sweep.Config]:
        # xarray runs one size at a time, smallest first; the
        # next size goes only if its predicted time (this run's time scaled
        # by size, the store's cost being per page) fits the budget.
        if c.store != "xarray" or c.parts == "store-only" or c.api != "vm":
            return []
        later = [s for s in xa_sizes if s > c.guest]
        if not later:
            return []
        nxt = later[0]
        predicted = result["seconds"] * nxt / c.guest
        if args.time_budget and predicted > args.time_budget:
            for s in later:
                skipped[s] = (
                    f"time: predicted {predicted:.0f} s at {format_size(nxt)} "
                    f"> --time-budget {args.time_budget:g} s"
                )
            state["total"] -= 2 * len(later)
            if state["progress"] is not None:
                prog, task = state["progress"]
                prog.update(task, total=state["total"])
            return []
        return per_page(nxt)

    console.print(
        f"[bold]memattr compare[/]: {name} on guests of "
        f"{', '.join(format_size(s) for s in sizes)}; rangetree{' and in place (mapletree)' if inplace else ''} at every size, "
        f"xarray up to {format_size(xa_limit) if xa_limit else 'none'}; "
        f"{args.jobs} parallel job(s)"
    )
    t0 = time.perf_counter()
    failures: list[str] = []

    def finished(c: sweep.Config, r: dict[str, Any] | None, e: BaseException | None) -> None:
        if e is not None:
            failures.append(f"{c.label()}: {type(e).__name__}: {' '.join(str(e).split())}")
        if state["progress"] is not None:
            prog, task = state["progress"]
            prog.update(task, advance=1, description=f"done: {c.label()}")

    from memattr.distributed import describe, executor_from_args

    with executor_from_args(args) as executor:
        run = dict(executor=executor, max_workers=args.jobs, on_done=finished, follow_up=follow_up)
        if _show_progress(args):
            with progress_mod.bar(console, unit="runs") as prog:
                state["progress"] = (prog, prog.add_task("runs", total=state["total"]))
                res = sweep.sweep(rt_configs + first, **run)  # type: ignore[arg-type]
        else:
            res = sweep.sweep(rt_configs + first, **run)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0

    rows = report.compare_rows(res.results)
    engines = sorted({r["engine"] for r in res.results if "engine" in r})
    title = (
        f"{name}: {'per-VM xarray vs in place (per-file maple) vs rangetree' if inplace else 'rangetree vs xarray'} (seed {args.seed}, "
        f"{'/'.join(engines) or args.engine} engine, {args.jobs} jobs, {wall:.0f} s wall)"
    )
    console.print(report.compare_table(rows, title))
    for s in sorted(skipped):
        console.print(f"xarray skipped at {format_size(s)}: {skipped[s]}")
    if inplace:
        for line in report.vmm_changes(rows):
            console.print(line, highlight=False, soft_wrap=True)
    for f in failures:
        console.print(f"[red]failed[/]: {escape(f)}", highlight=False, soft_wrap=True)
    unexpected = []
    for r in res.results:
        label = f"{r['workload']} {format_size(r['guest'])} {r['store']}{' in place' if r.get('api') == 'inplace' else ''}"
        if "replay" in r and report_errors(console, label, r["replay"], expected_too=False):
            unexpected.append(label)
    payload = {
        "command": "compare",
        "api": args.api,
        "executor": describe(args),
        "workload": name,
        "trace": trace_path or None,
        "params": dict(params),
        "vm_kwargs": dict(vmk),
        "seed": args.seed,
        "sizes": sizes,
        "jobs": args.jobs,
        "wall_seconds": wall,
        "machine": sweep.machine(),
        "rows": rows,
        "skipped": {"xarray": {format_size(s): why for s, why in sorted(skipped.items())}},
        "failures": failures,
        "unexpected_errors": unexpected,
        "runs": res.results,
    }
    json_path = os.path.join(args.out, "compare.json")
    report.write_json(json_path, payload)
    console.print(f"wrote {json_path}")
    if not args.no_plot and rows:
        png = os.path.join(args.out, "compare.png")
        report.plot(rows, png, title)
        console.print(f"wrote {png}")
    if failures:
        return 1
    return EXIT_UNEXPECTED_ERRORS if unexpected else 0


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    st = workloads.stream(args.workload, args.guest, seed=args.seed, **_params(args))
    if args.gmem_max_order is not None:
        st.meta["vm_kwargs"] = {**st.meta.get("vm_kwargs", {}), **_vm_kwargs(args)}
    if args.text or str(args.output).endswith(".txt"):
        tr = st.materialize()
        trace_mod.write(tr, args.output, text=True)
        n = len(tr)
    else:
        n = stream_mod.write(st, args.output)  # chunk by chunk
    console.print(f"wrote {n:,} operations to {args.output}")
    return 0


def cmd_import_qemu(args: argparse.Namespace, console: Console) -> int:
    tr = qemu.import_log(
        args.log,
        args.guest,
        args.low_limit,
        initial_private=not args.shared_at_start,
        discard=not args.no_discard,
        strict=args.strict,
    )
    trace_mod.write(tr, args.output, text=True if args.text else None)
    n = tr.phases[-1][2] - tr.phases[-1][1]
    console.print(
        f"imported {tr.meta['qemu_events']:,} QEMU events as {n:,} KVM operations "
        f"({len(tr):,} with setup) to {args.output}"
    )
    sk = tr.meta.get("qemu_skipped", {})
    console.print(
        f"skipped {sk.get('no_event', 0):,} lines without a kvm_convert_memory or kvm_memory_fault event "
        f"and {sk.get('malformed', 0):,} malformed event lines"
        + (f" (first: {escape(sk['first_malformed'])}; --strict makes them errors)" if sk.get("malformed") else ""),
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not NAME or NAME=WEIGHT") from None
    return out


def cmd_fleet(args: argparse.Namespace, console: Console) -> int:
    from memattr import fleet
    from memattr.distributed import describe, executor_from_args

    os.makedirs(args.out, exist_ok=True)
    cap = sweep.memory_cap(args.memory_limit, args.jobs)
    vms = [
        dataclasses.replace(v, xarray_cap=cap, xarray_max=args.xarray_max, vm=args.vm)
        for v in fleet.plan(args.vms, args.min_guest, args.max_guest, _mix(args.mix), args.seed)
    ]
    total = sum(v.guest for v in vms)
    console.print(
        f"[bold]memattr fleet[/]: {len(vms)} VMs, {report.human_bytes(total)} of guest RAM "
        f"({format_size(args.min_guest)}..{format_size(args.max_guest)}), on {describe(args)}"
    )
    failures: list[str] = []
    t0 = time.perf_counter()
    with executor_from_args(args) as executor:
        if _show_progress(args):
            with progress_mod.bar(console, unit="VMs") as prog:
                task = prog.add_task("VMs", total=len(vms))

                def done(c: Any, r: Any, e: BaseException | None) -> None:
                    if e is not None:
                        failures.append(f"{c.label()}: {type(e).__name__}: {e}")
                    prog.update(task, advance=1, description=f"done: {c.label()}")

                res = fleet.run(vms, executor, args.jobs, done)
        else:

            def done_quiet(c: Any, r: Any, e: BaseException | None) -> None:
                if e is not None:
                    failures.append(f"{c.label()}: {type(e).__name__}: {e}")

            res = fleet.run(vms, executor, args.jobs, done_quiet)
    wall = time.perf_counter() - t0
    summary = fleet.summarise(res.results)
    title = f"fleet of {len(vms)} VMs (seed {args.seed}, {wall:.0f} s wall, {describe(args)})"
    console.print(fleet.table(summary, title))
    for f_ in failures:
        console.print(f"[red]failed[/]: {f_}")
    bad = summary.get("vm_replay", {}).get("unexpected_errors", 0)
    if bad:
        console.print(f"[bold red]fleet: {bad:,} UNEXPECTED error(s) in the Vm replays (see fleet.json)[/]")
    payload = {
        "command": "fleet",
        "executor": describe(args),
        "seed": args.seed,
        "wall_seconds": wall,
        "machine": sweep.machine(),
        "summary": summary,
        "failures": failures,
        "vms": res.results,
    }
    json_path = os.path.join(args.out, "fleet.json")
    report.write_json(json_path, payload)
    console.print(f"wrote {json_path}")
    if not args.no_plot and res.results:
        png = os.path.join(args.out, "fleet.png")
        fleet.plot(res.results, summary, png, title)
        console.print(f"wrote {png}")
    if failures:
        return 1
    return EXIT_UNEXPECTED_ERRORS if bad else 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    tr = trace_mod.read(args.trace)
    console.print_json(json.dumps(trace_mod.describe(tr)))
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    for name, (_, doc) in workloads.WORKLOADS.items():
        console.print(f"[bold]{name}[/]: {doc}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "compare": cmd_compare,
    "generate": cmd_generate,
    "import-qemu": cmd_import_qemu,
    "fleet": cmd_fleet,
    "show": cmd_show,
    "list": cmd_list,
    "explore": explore_cli.cmd_explore,
}


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--guest -1G`` as ``--guest=-1G``: argparse would take ``-1G`` for an
    option and say only "expected one argument"; glued, the value reaches
    its parser, whose message says what is wrong with it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a.startswith("--") and "=" not in a and len(nxt) > 1 and nxt[0] == "-" and (nxt[1].isdigit() or nxt[1] == "."):
            out.append(f"{a}={nxt}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _input_file(args: argparse.Namespace) -> str | None:
    """The file the command reads, to name in its one-line error."""
    for attr in ("trace", "source", "log"):
        v = getattr(args, attr, None)
        if isinstance(v, str) and os.path.exists(v):
            return v
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = _glue_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    # Tables are wide: give pipes and files room instead of rich's 80.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    # Every failure is one line naming the file (when there is one) and the
    # problem, and a non-zero exit; MEMATTR_TRACEBACK=1 re-raises instead.
    debug = os.environ.get("MEMATTR_TRACEBACK") == "1"
    src = _input_file(args)

    def one_line(e: BaseException) -> str:
        text = str(e) or type(e).__name__
        if src and src not in text:
            text = f"{src}: {text}"
        # One line, and brackets in it are text, not rich markup.
        return escape(" ".join(text.split()))

    try:
        return COMMANDS[args.command](args, console)
    except trace_mod.TraceFormatError as e:
        if debug:
            raise
        console.print(f"[red]memattr: bad trace:[/] {one_line(e)}", highlight=False, soft_wrap=True)
        return 2
    except (ValueError, OSError) as e:
        if debug:
            raise
        console.print(f"[red]memattr {args.command}:[/] {one_line(e)}", highlight=False, soft_wrap=True)
        return 2
    except (RuntimeError, TypeError, OverflowError, LookupError, MemoryError, RecursionError, ArithmeticError) as e:
        # LockdepError and KvmBugError are RuntimeErrors: a trace asking for
        # the v11 ordering, or a model inconsistency, ends the run here.
        if debug:
            raise
        console.print(f"[red]memattr {args.command}:[/] {type(e).__name__}: {one_line(e)}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
