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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from memattr import qemu, report, sweep, workloads
from memattr import trace as trace_mod
from memattr.units import format_size, parse_size

DEFAULT_SIZES = "1G,4G,16G,64G,256G,1T"
# An xarray run is skipped when predicted to take longer than
# this (seconds) or to need more than MEMORY_SHARE of available memory.
DEFAULT_TIME_BUDGET = 40.0
MEMORY_SHARE = 0.5


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
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
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
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--style", choices=workloads.STYLES, default="tdx", help="conversion request style (default tdx)")
    g.add_argument("--vcpus", type=_positive_int, default=None, help="vCPUs (default: the workload's)")
    g.add_argument("--shared-fraction", type=_fraction, default=None, help="churn target shared fraction (0.075)")
    g.add_argument("--accept-fraction", type=_fraction, default=None, help="fraction of RAM accepted lazily")
    g.add_argument("--turnover", type=_nonneg, default=None, help="churn turnover: buffer generations (1.0)")
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

    s = sub.add_parser("show", help="validate and summarise a trace")
    s.add_argument("trace")

    sub.add_parser("list", help="list the named workloads")
    return p


def _show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stdout.isatty()


def _load_source(args: argparse.Namespace) -> trace_mod.Trace:
    src = args.source
    if args.qemu_log:
        return qemu.import_log(src, args.guest, args.low_limit)
    if src in workloads.WORKLOADS:
        return workloads.make(src, args.guest, seed=args.seed, **_params(args))
    if os.path.exists(src):
        if trace_mod.is_trace_file(src):
            return trace_mod.read(src)
        raise trace_mod.TraceFormatError(
            f"{src}: not a memattr trace (use --qemu-log for a QEMU log)"
        )
    raise SystemExit(f"memattr run: {src!r} is neither a workload ({', '.join(workloads.WORKLOADS)}) nor a file")


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    tr = _load_source(args)
    tr.validate()
    if _show_progress(args):
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as prog:
            task = prog.add_task(f"{tr.name} on {args.store}", total=len(tr))
            result = sweep.run_trace(
                tr,
                args.store,
                vm_kwargs=_vm_kwargs(args),
                progress=lambda n: prog.advance(task, n),
                recorder=bool(args.record),
                engine=args.engine,
            )
    else:
        result = sweep.run_trace(
            tr, args.store, vm_kwargs=_vm_kwargs(args), recorder=bool(args.record), engine=args.engine
        )
    recorded = result.pop("trace", None)
    console.print(report.run_table(result))
    if recorded is not None:
        trace_mod.write(recorded, args.record)
        console.print(f"recorded {len(recorded):,} operations to {args.record}")
    if args.json:
        report.write_json(args.json, {"machine": sweep.machine(), "result": result})
        console.print(f"wrote {args.json}")
    return 0


def _xarray_plan(args: argparse.Namespace, console: Console) -> tuple[int, str]:
    """Largest size xarray may run at, and why it stops there."""
    avail = sweep.available_memory()
    jobs = max(1, args.jobs)
    mem_cap = int(avail * MEMORY_SHARE / jobs) if avail else 0
    if args.xarray_max is not None:
        return args.xarray_max, f"--xarray-max {format_size(args.xarray_max)}"
    fits = [s for s in args.sizes if not mem_cap or sweep.xarray_memory_estimate(s) * 2 <= mem_cap]
    limit = max(fits) if fits else 0
    why = (
        f"memory: needs ~{sweep.XARRAY_BYTES_PER_PAGE:g} B per 4K page (counted twice for headroom); "
        f"{report.human_bytes(mem_cap)} available per job"
    )
    return limit, why


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    os.makedirs(args.out, exist_ok=True)
    params = tuple(sorted(_params(args).items()))
    vmk = tuple(sorted(_vm_kwargs(args).items()))
    name = args.workload
    if args.trace:
        # Validated here, once, so a bad file fails before any worker starts.
        tr = trace_mod.read(args.trace)
        name = tr.name
        args.sizes = [sweep.trace_guest_size(tr)]
        if args.sizes[0] <= 0:
            raise ValueError(f"{args.trace}: the trace creates no memslot, so it has no guest size")
    sizes = args.sizes
    xa_limit, xa_why = _xarray_plan(args, console)
    trace_path = os.path.abspath(args.trace) if args.trace else ""

    def cfg(size: int, store: str, parts: str = "both") -> sweep.Config:
        return sweep.Config(args.workload, size, store, args.seed, params, vmk, args.engine, parts, trace_path)

    def per_page(size: int) -> list[sweep.Config]:
        # xarray's Vm replay and store-only replay are the long
        # runs: as two tasks they use two cores instead of one.
        return [cfg(size, "xarray", "vm"), cfg(size, "xarray", "store-only")]

    rt_configs = [cfg(s, "rangetree") for s in sorted(sizes, reverse=True)]  # longest first
    xa_sizes = [s for s in sizes if s <= xa_limit]
    skipped: dict[int, str] = {s: xa_why for s in sizes if s > xa_limit}
    first = per_page(xa_sizes[0]) if xa_sizes else []

    state: dict[str, Any] = {"total": len(rt_configs) + 2 * len(xa_sizes), "progress": None}

    def follow_up(c: sweep.Config, result: dict[str, Any]) -> list[sweep.Config]:
        # xarray runs one size at a time, smallest first; the
        # next size goes only if its predicted time (this run's time scaled
        # by size, the store's cost being per page) fits the budget.
        if c.store != "xarray" or c.parts == "store-only":
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
        f"{', '.join(format_size(s) for s in sizes)}; rangetree at every size, "
        f"xarray up to {format_size(xa_limit) if xa_limit else 'none'}; "
        f"{args.jobs} parallel job(s)"
    )
    t0 = time.perf_counter()
    failures: list[str] = []

    def finished(c: sweep.Config, r: dict[str, Any] | None, e: BaseException | None) -> None:
        if e is not None:
            failures.append(f"{c.label()}: {type(e).__name__}: {e}")
        if state["progress"] is not None:
            prog, task = state["progress"]
            prog.update(task, advance=1, description=f"done: {c.label()}")

    if _show_progress(args):
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as prog:
            state["progress"] = (prog, prog.add_task("runs", total=state["total"]))
            res = sweep.sweep(rt_configs + first, max_workers=args.jobs, on_done=finished, follow_up=follow_up)
    else:
        res = sweep.sweep(rt_configs + first, max_workers=args.jobs, on_done=finished, follow_up=follow_up)
    wall = time.perf_counter() - t0

    rows = report.compare_rows(res.results)
    engines = sorted({r["engine"] for r in res.results if "engine" in r})
    title = (
        f"{name}: rangetree vs xarray (seed {args.seed}, "
        f"{'/'.join(engines) or args.engine} engine, {args.jobs} jobs, {wall:.0f} s wall)"
    )
    console.print(report.compare_table(rows, title))
    for s in sorted(skipped):
        console.print(f"xarray skipped at {format_size(s)}: {skipped[s]}")
    for f in failures:
        console.print(f"[red]failed[/]: {f}")
    payload = {
        "command": "compare",
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
        "runs": res.results,
    }
    json_path = os.path.join(args.out, "compare.json")
    report.write_json(json_path, payload)
    console.print(f"wrote {json_path}")
    if not args.no_plot and rows:
        png = os.path.join(args.out, "compare.png")
        report.plot(rows, png, title)
        console.print(f"wrote {png}")
    return 1 if failures else 0


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    tr = workloads.make(args.workload, args.guest, seed=args.seed, **_params(args))
    if args.gmem_max_order is not None:
        tr.meta["vm_kwargs"] = {**tr.meta.get("vm_kwargs", {}), **_vm_kwargs(args)}
    trace_mod.write(tr, args.output, text=True if args.text else None)
    console.print(f"wrote {len(tr):,} operations to {args.output}")
    return 0


def cmd_import_qemu(args: argparse.Namespace, console: Console) -> int:
    tr = qemu.import_log(
        args.log, args.guest, args.low_limit, initial_private=not args.shared_at_start, discard=not args.no_discard
    )
    trace_mod.write(tr, args.output, text=True if args.text else None)
    n = tr.phases[-1][2] - tr.phases[-1][1]
    console.print(
        f"imported {tr.meta['qemu_events']:,} QEMU events as {n:,} KVM operations "
        f"({len(tr):,} with setup) to {args.output}"
    )
    return 0


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
    "show": cmd_show,
    "list": cmd_list,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Tables are wide: give pipes and files room instead of rich's 80.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        return COMMANDS[args.command](args, console)
    except trace_mod.TraceFormatError as e:
        console.print(f"[red]memattr: bad trace:[/] {e}")
        return 2
    except (ValueError, OSError) as e:
        console.print(f"[red]memattr {args.command}:[/] {e}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
