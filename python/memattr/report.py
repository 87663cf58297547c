"""Presenting runs: rich tables for the terminal, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rich.table import Table

from memattr.units import GiB, format_size

# The two stores go by their API names (Vm(store=...), --store) everywhere
# they are shown; this caption says once what they are.
STORES = ("rangetree", "xarray")
STORES_CAPTION = "rangetree = runs of equal attributes in a B+ tree; xarray = the kernel's per-page store (its model)"
STORE_COLOR = {"rangetree": "#1f77b4", "xarray": "#d62728", "inplace": "#2ca02c"}
# `compare --api both`: the third column, the in-place series' per-file
# maple tree driven through KVM_SET_MEMORY_ATTRIBUTES2.
INPLACE = "inplace"
INPLACE_CAPTION = (
    "; inplace = the guest_memfd in-place series (KVM_SET_MEMORY_ATTRIBUTES2 per file, "
    "maple tree store, upstream's choice), memory summed over the files"
)


def human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_rate(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k/s"
    return f"{x:.0f} /s"


def run_table(result: dict[str, Any]) -> Table:
    """What one run did, as the kernel would count it."""
    st = result["stats"]
    rp = result["replay"]
    hp = result["hugepages"]
    t = Table(
        title=f"{result['workload']} on a {format_size(result['guest'])} guest, store {result['store']}",
        show_header=False,
        title_justify="left",
    )
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("operations replayed", f"{result['operations']:,}"),
        ("engine", str(result.get("engine", "python"))),
        ("time (wall / CPU)", f"{result['seconds']:.3f} s / {result['cpu_seconds']:.3f} s"),
        ("throughput", human_rate(result["ops_per_second"])),
        ("KVM_SET_MEMORY_ATTRIBUTES calls", f"{st['set_calls']:,}"),
        ("  conversions", f"{st['conversions']:,}"),
        ("  no-op (already had the value)", f"{st['noop_conversions']:,}"),
        ("  pages converted", f"{st['pages_converted']:,}"),
        ("  failed calls", f"{st['failed_calls']:,}"),
        ("zapped ranges (pre-set pass)", f"{st['zapped_ranges']:,}"),
        ("post-set ranges", f"{st['post_set_ranges']:,}"),
        ("TLB flushes", f"{st['tlb_flushes']:,}"),
        ("mmu_lock acquisitions", f"{st['mmu_lock_acquisitions']:,}"),
        ("faults", f"{st['faults']:,}"),
        ("KVM_EXIT_MEMORY_FAULT exits", f"{st['memory_fault_exits']:,}"),
        ("emulated MMIO (shared, no memslot)", f"{st.get('mmio_faults', 0):,}"),
        (
            "guest_memfd holes punched / files closed",
            f"{st.get('gmem_holes_punched', 0):,} / {st.get('gmem_closed', 0):,}",
        ),
        ("  converted by the VMM (implicit)", f"{rp['implicit_conversions']:,}"),
        ("zapped pages 4K / 2M / 1G", " / ".join(f"{st['zapped_pages'].get(k, st['zapped_pages'].get(str(k), 0)):,}" for k in (1, 2, 3))),
        ("final private RAM", human_bytes(result["private_bytes"])),
        ("final shared RAM", human_bytes(result["shared_bytes"])),
        (
            "mapped now 4K / 2M / 1G",
            " / ".join(human_bytes(hp["mapped_bytes"][k]) for k in ("4K", "2M", "1G")),
        ),
        ("hugepage coverage of mapped memory", f"{100 * hp['huge_fraction']:.1f}%"),
        ("store memory at end / peak", f"{human_bytes(result['memory_bytes'])} / {human_bytes(result['peak_memory_bytes'])}"),
        ("store entries at end", f"{result['entry_count']:,}"),
    ]
    if "max_rss_bytes" in result:
        rows.append(("process peak RSS (getrusage)", human_bytes(result["max_rss_bytes"])))
    errors = rp.get("errors") or {}
    if errors:
        rows.append(("errors by errno", ", ".join(f"{k} x{v}" for k, v in sorted(errors.items()))))
    for k, v in rows:
        t.add_row(k, v)
    phases = Table(title="phases", title_justify="left")
    phases.add_column("phase")
    phases.add_column("seconds", justify="right")
    phases.add_column("store memory at end", justify="right")
    for name, secs in result["phase_seconds"].items():
        phases.add_row(name, f"{secs:.3f}", human_bytes(result["phase_memory_bytes"].get(name, 0)))
    outer = Table.grid(padding=(1, 0))
    outer.add_row(t)
    outer.add_row(phases)
    return outer


def _by_size(results: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """Results by guest size and store, a run's parts (``"part"``: the Vm
    replay and the store-only replay, run separately) joined into one."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for r in results:
        key = INPLACE if r.get("api") == "inplace" else r["store"]
        entry = out.setdefault(int(r["guest"]), {}).setdefault(key, {})
        if r.get("part") == "store-only":
            entry["store_only"] = r["store_only"]
        else:
            entry.update(r)
    return dict(sorted(out.items()))


def compare_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per guest size with both stores side by side (JSON-able)."""
    rows = []
    for guest, runs in _by_size(results).items():
        # A store with only its store-only part (its Vm replay failed) has no
        # Vm columns.
        rt, xa = ((r if r and "seconds" in r else None) for r in (runs.get("rangetree"), runs.get("xarray")))
        row: dict[str, Any] = {"guest": guest, "operations": (rt or xa or {}).get("operations", 0)}
        ip = runs.get(INPLACE) if runs.get(INPLACE, {}).get("seconds") is not None else None
        for name, r in (("rangetree", rt), ("xarray", xa), (INPLACE, ip)):
            if r:
                st = r.get("stats", {})
                row[name] = {
                    "seconds": r["seconds"],
                    "cpu_seconds": r["cpu_seconds"],
                    "ops_per_second": r["ops_per_second"],
                    "memory_bytes": r["memory_bytes"],
                    "peak_memory_bytes": r["peak_memory_bytes"],
                    "memory_per_gib": r["memory_bytes"] / (guest / GiB),
                    # what the kernel does for it: pages zapped from the
                    # MMU, TLB flushes, guest_memfd holes the VMM punched
                    "zapped_pages": int(sum(st.get("zapped_pages", {}).values())),
                    "tlb_flushes": int(st.get("tlb_flushes", 0)),
                    "holes_punched": int(st.get("gmem_holes_punched", 0)),
                    "engine": r.get("engine", "python"),
                }
                if name == INPLACE:
                    row[name]["store"] = r["store"]
                    row[name]["gmem_calls"] = int(r.get("gmem_calls", 0))
        if rt and xa and rt["seconds"] > 0:
            row["throughput_ratio"] = xa["seconds"] / rt["seconds"]
            if rt["cpu_seconds"] > 0:
                row["cpu_ratio"] = xa["cpu_seconds"] / rt["cpu_seconds"]
            row["memory_ratio"] = xa["memory_bytes"] / max(1, rt["memory_bytes"])
        so = {name: r["store_only"] for name, r in runs.items() if "store_only" in r}
        if so:
            row["store_only"] = so
        if "rangetree" in so and "xarray" in so and so["rangetree"]["seconds"] > 0:
            row["store_only_ratio"] = so["xarray"]["seconds"] / so["rangetree"]["seconds"]
        rows.append(row)
    return rows


def compare_table(rows: list[dict[str, Any]], title: str) -> Table:
    if any(INPLACE in r for r in rows):
        return _three_way_table(rows, title)
    t = Table(title=title, title_justify="left", caption=STORES_CAPTION, caption_justify="left")
    t.add_column("guest", justify="right", style="bold")
    t.add_column("ops", justify="right")
    for store in STORES:
        t.add_column(f"{store} time", justify="right")
        t.add_column(f"{store} ops/s", justify="right")
        t.add_column(f"{store} memory", justify="right")
    t.add_column("speedup (Vm)", justify="right", style="green")
    t.add_column("speedup (Vm, CPU time)", justify="right", style="green")
    t.add_column("speedup (store only)", justify="right", style="green")
    t.add_column("memory ratio", justify="right", style="green")
    for row in rows:
        cells = [format_size(row["guest"]), f"{row['operations']:,}"]
        for store in STORES:
            r = row.get(store)
            if r:
                cells += [f"{r['seconds']:.2f} s", human_rate(r["ops_per_second"]), human_bytes(r["memory_bytes"])]
            else:
                cells += ["-", "-", "skipped" if store == "xarray" else "-"]
        cells.append(f"{row['throughput_ratio']:.1f}x" if "throughput_ratio" in row else "-")
        cells.append(f"{row['cpu_ratio']:.1f}x" if "cpu_ratio" in row else "-")
        cells.append(f"{row['store_only_ratio']:.0f}x" if "store_only_ratio" in row else "-")
        cells.append(f"{row['memory_ratio']:,.0f}x" if "memory_ratio" in row else "-")
        t.add_row(*cells)
    return t


def _three_way_table(rows: list[dict[str, Any]], title: str) -> Table:
    """`compare --api both`: one line per guest size and contender."""
    t = Table(title=title, title_justify="left", caption=STORES_CAPTION + INPLACE_CAPTION, caption_justify="left")
    for name, right in (
        ("guest", True), ("API / store", False), ("time", True), ("ops/s", True), ("attr memory", True),
        ("peak", True), ("zapped pages", True), ("TLB flushes", True), ("holes punched", True),
    ):
        t.add_column(name, justify="right" if right else "left")
    labels = {
        "xarray": "per-VM xarray",
        "rangetree": "per-VM rangetree",
        INPLACE: "in place, per-file maple",
    }
    for row in rows:
        first = True
        for key in ("xarray", INPLACE, "rangetree"):
            r = row.get(key)
            label = labels[key]
            if key == INPLACE and r and r.get("store") != "mapletree":
                label = f"in place, per-file {r.get('store')}"
            size = format_size(row["guest"]) if first else ""
            first = False
            if not r:
                t.add_row(size, label, "skipped" if key == "xarray" else "-", *["-"] * 6)
                continue
            t.add_row(
                size, f"{label} ({r['engine']})", f"{r['seconds']:.2f} s", human_rate(r["ops_per_second"]),
                human_bytes(r["memory_bytes"]), human_bytes(r["peak_memory_bytes"]),
                f"{r['zapped_pages']:,}", f"{r['tlb_flushes']:,}", f"{r['holes_punched']:,}",
            )
        t.add_section()
    return t


def vmm_changes(rows: list[dict[str, Any]]) -> list[str]:
    """What moving to the in-place API changes for a VMM, from the
    measured rows of `compare --api both`."""
    out = [
        "[bold]What changes for a VMM in place[/]: it converts with KVM_SET_MEMORY_ATTRIBUTES2 on the "
        "guest_memfd fd (file offsets, one call per memslot piece) instead of KVM_SET_MEMORY_ATTRIBUTES "
        "on the VM fd; the same pages serve shared and private (mmap the guest_memfd, host access to a "
        "private page is SIGBUS), so there is no separate shared memory and no discard: no hole "
        "punched after a conversion to shared; a page in use (pinned) makes the call fail with EAGAIN "
        "and error_offset, to retry after dropping the reference."
    ]
    for row in rows:
        ip, per_vm = row.get(INPLACE), row.get("xarray") or row.get("rangetree")
        if not ip or not per_vm:
            continue
        ref = "xarray" if "xarray" in row else "rangetree"
        out.append(
            f"  {format_size(row['guest'])}: holes punched {per_vm['holes_punched']:,} per VM -> "
            f"{ip['holes_punched']:,} in place; attribute memory {human_bytes(per_vm['memory_bytes'])} ({ref}) -> "
            f"{human_bytes(ip['memory_bytes'])}; zapped pages {per_vm['zapped_pages']:,} -> {ip['zapped_pages']:,}; "
            f"TLB flushes {per_vm['tlb_flushes']:,} -> {ip['tlb_flushes']:,}; "
            f"{ip.get('gmem_calls', 0):,} guest_memfd calls"
        )
    return out


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def _bytes_tick(x: float, _pos: object = None) -> str:
    for i, unit in enumerate(("B", "KiB", "MiB", "GiB", "TiB")):
        if x < 1024 ** (i + 1) or unit == "TiB":
            v = x / 1024**i
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.05 else f"{v:.1f} {unit}"
    return str(x)


def plot(rows: list[dict[str, Any]], path: str | os.PathLike[str], title: str) -> None:
    """Three log-log panels over guest size, both stores on each: full Vm
    replay throughput, store-only replay throughput, store memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    fig, (ax_t, ax_s, ax_m) = plt.subplots(1, 3, figsize=(16, 5.2), constrained_layout=True)
    sizes = [r["guest"] for r in rows]
    for store in (*STORES, INPLACE):
        color = STORE_COLOR[store]
        label = "in place (per-file maple)" if store == INPLACE else store
        pts = [(r["guest"], r[store]) for r in rows if store in r]
        if not pts:
            continue
        xs = [g for g, _ in pts]
        ax_t.plot(xs, [p["ops_per_second"] for _, p in pts], "o-", color=color, label=label)
        so = [(r["guest"], r["store_only"][store]) for r in rows if store in r.get("store_only", {})]
        if so:
            ax_s.plot([g for g, _ in so], [p["ranges_per_second"] for _, p in so], "o-", color=color, label=label)
        ax_m.plot(xs, [max(1, p["memory_bytes"]) for _, p in pts], "o-", color=color, label=label + ", at end")
        ax_m.plot(
            xs, [max(1, p["peak_memory_bytes"]) for _, p in pts], "s--", color=color, alpha=0.5, label=label + ", peak"
        )

    def annotate(ax: Any, key: str, y: Any) -> None:
        for row in rows:
            if key in row:
                ax.annotate(
                    f"{row[key]:.1f}x" if row[key] < 10 else f"{row[key]:,.0f}x",
                    (row["guest"], y(row)),
                    textcoords="offset points",
                    xytext=(0, 8),
                    ha="center",
                    fontsize=9,
                    color=STORE_COLOR["rangetree"],
                )

    annotate(ax_t, "throughput_ratio", lambda r: r["rangetree"]["ops_per_second"])
    annotate(ax_s, "store_only_ratio", lambda r: r["store_only"]["rangetree"]["ranges_per_second"])
    skipped = [r["guest"] for r in rows if "xarray" not in r]
    for ax in (ax_t, ax_s, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_size(int(round(x)))))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("guest RAM")
        ax.grid(True, which="major", alpha=0.3)
        if skipped:
            ax.axvspan(min(skipped) / 1.3, max(skipped) * 1.3, color="0.92", zorder=0)
            ax.text(0.98, 0.02, "shaded: xarray skipped", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=8, color="0.4")
    rate_fmt = FuncFormatter(lambda x, _: human_rate(x).replace(" /s", "/s"))
    for ax in (ax_t, ax_s):
        ax.margins(y=0.2)
        ax.yaxis.set_major_formatter(rate_fmt)
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(rate_fmt)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax_t.set_ylabel("operations per second (higher is better)")
    ax_t.set_title("full replay on a Vm (ioctl model, memslots, MMU)")
    ax_s.set_ylabel("ranges per second (higher is better)")
    ax_s.set_title("the data structure alone (batch replay, no Vm)")
    ax_m.set_ylabel("store memory (lower is better)")
    lo = min([1.0] + [max(1, r[s]["memory_bytes"]) for r in rows for s in (*STORES, INPLACE) if s in r])
    hi = max([1024.0] + [r[s]["peak_memory_bytes"] for r in rows for s in (*STORES, INPLACE) if s in r])
    ticks = [32.0**k for k in range(0, 9) if lo / 32 <= 32.0**k <= hi * 32]
    ax_m.yaxis.set_major_locator(FixedLocator(ticks))
    ax_m.yaxis.set_major_formatter(FuncFormatter(_bytes_tick))
    ax_m.yaxis.set_minor_formatter(NullFormatter())
    ax_m.set_title("attribute store memory")
    for ax in (ax_t, ax_s, ax_m):
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
