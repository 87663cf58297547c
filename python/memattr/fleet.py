"""A host of many VMs as one simulation (``memattr fleet``).

Sizing a host means adding up its guests: :func:`plan` draws a fleet
(``vms`` guests, sizes log-uniform between ``min_guest`` and ``max_guest``
rounded to whole GiB, workloads mixed by weight, every one seeded), and
:func:`run` runs every VM as an independent task through
:func:`memattr.sweep.sweep` (a process pool, or a Dask cluster: see
:mod:`memattr.distributed`), then :func:`summarise` adds them up per
store: the attribute memory the host holds for all its guests at once, the
conversions they make and what those cost, and the per-VM distribution.

Per VM and store, the attribute changes are applied to a bare store
(:func:`memattr.sweep.run_store_only`: the store's own conversion cost and
memory, streamed). The per-page ``xarray`` runs only where its predicted
memory fits one job's share (:func:`memattr.sweep.xarray_fits`) and the
guest is at most ``xarray_max`` (its time is per page: the CLI's default
stops at 64 GiB); elsewhere
its memory is the per-page estimate (``"estimated": true``) and its time is
not counted. With ``vm=True`` every VM also runs the whole model on the
rangetree (memslots, faults, the MMU), whose time and counters are
reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from memattr import sweep, workloads
from memattr.units import GiB, TiB, format_size

# The default mix: workload -> weight.
DEFAULT_MIX: dict[str, float] = {
    "boot-and-churn": 0.55,
    "churn": 0.15,
    "acceptance": 0.1,
    "implicit": 0.1,
    "firmware-sharing": 0.05,
    "vm-creation": 0.05,
}


@dataclass(frozen=True)
class FleetVm:
    """One guest of the fleet: the task :func:`run_vm` runs."""

    index: int
    workload: str
    guest: int
    seed: int
    xarray_cap: int = 0  # bytes the xarray may use in this task (0: no limit)
    xarray_max: int = 0  # largest guest the xarray runs for (0: no limit)
    vm: bool = False  # also run the whole model (Vm replay) on the rangetree
    engine: str = "auto"

    def label(self) -> str:
        return f"vm{self.index} {self.workload} {format_size(self.guest)}"


def plan(
    vms: int = 200,
    min_guest: int = 1 * GiB,
    max_guest: int = 4 * TiB,
    mix: dict[str, float] | None = None,
    seed: int = 0,
) -> list[FleetVm]:
    """``vms`` guests, sizes log-uniform in [min_guest, max_guest] rounded
    down to whole GiB (at least 1 GiB), workloads drawn by ``mix``."""
    if not isinstance(vms, int) or vms < 1:
        raise ValueError(f"vms must be an int >= 1, got {vms!r}")
    if min_guest < GiB or max_guest < min_guest:
        raise ValueError(f"need 1 GiB <= min_guest <= max_guest, got {min_guest} and {max_guest}")
    mix = dict(mix or DEFAULT_MIX)
    for name, w in mix.items():
        if name not in workloads.WORKLOADS:
            raise ValueError(f"unknown workload {name!r} in the mix; choose from {', '.join(workloads.WORKLOADS)}")
        if not w >= 0:
            raise ValueError(f"weight of {name!r} must be >= 0, got {w!r}")
    names = list(mix)
    p = np.array([mix[n] for n in names], dtype=np.float64)
    if p.sum() <= 0:
        raise ValueError("the mix's weights must not all be 0")
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(math.log(min_guest), math.log(max_guest), vms))
    gib = np.maximum(1, np.floor(sizes / GiB)).astype(np.int64)
    which = rng.choice(len(names), size=vms, p=p / p.sum())
    seeds = rng.integers(0, 2**31, size=vms)
    return [
        FleetVm(i, names[int(w)], int(g) * GiB, int(s)) for i, (w, g, s) in enumerate(zip(which, gib, seeds))
    ]


def run_vm(vm: FleetVm) -> dict[str, Any]:
    """One guest: its workload's attribute changes on each store (bare
    stores, streamed), and with ``vm.vm`` the whole model on the rangetree."""
    out: dict[str, Any] = {"index": vm.index, "workload": vm.workload, "guest": vm.guest, "seed": vm.seed}
    st = workloads.stream(vm.workload, vm.guest, seed=vm.seed)
    per_page = sweep.xarray_fits(vm.guest, vm.xarray_cap) and (not vm.xarray_max or vm.guest <= vm.xarray_max)
    stores: dict[str, Any] = sweep.run_stores_only(st, ("rangetree", "xarray") if per_page else ("rangetree",))
    if not per_page:
        stores["xarray"] = {
            "ranges": stores["rangetree"]["ranges"],
            "seconds": None,
            "memory_bytes": sweep.xarray_memory_estimate(vm.guest),
            "peak_memory_bytes": sweep.xarray_memory_estimate(vm.guest),
            "estimated": True,
        }
    out["stores"] = stores
    if vm.vm:
        r = sweep.run_trace(st, "rangetree", engine=vm.engine)
        out["vm"] = {
            k: r[k]
            for k in ("operations", "seconds", "memory_bytes", "peak_memory_bytes", "private_bytes", "shared_bytes")
        }
        out["vm"]["conversions"] = r["stats"]["conversions"]
        out["vm"]["replay"] = r["replay"]
    return out


def run(vms: list[FleetVm], executor: Any = None, max_workers: int | None = None, on_done: Any = None) -> sweep.SweepResult:
    """Every VM through :func:`memattr.sweep.sweep` (largest first, so the
    long tasks start early)."""
    order = sorted(vms, key=lambda v: -v.guest)
    res = sweep.sweep(order, executor=executor, max_workers=max_workers, on_done=on_done, task=run_vm)  # type: ignore[arg-type]
    res.results.sort(key=lambda r: r["index"])
    return res


def _dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": float(a.min()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Host totals per store and the per-VM distributions."""
    out: dict[str, Any] = {
        "vms": len(results),
        "guest_bytes": int(sum(r["guest"] for r in results)),
        "by_workload": {},
        "stores": {},
    }
    for name in sorted({r["workload"] for r in results}):
        mine = [r for r in results if r["workload"] == name]
        out["by_workload"][name] = {"vms": len(mine), "guest_bytes": int(sum(r["guest"] for r in mine))}
    for store in ("rangetree", "xarray"):
        rows = [r["stores"][store] for r in results]
        measured = [x for x in rows if not x.get("estimated")]
        secs = [x["seconds"] for x in measured]
        ranges = [x["ranges"] for x in measured]
        out["stores"][store] = {
            "memory_bytes": int(sum(x["memory_bytes"] for x in rows)),
            # every VM at its own peak at once: what the host must provision
            "peak_memory_bytes": int(sum(x["peak_memory_bytes"] for x in rows)),
            "estimated_vms": len(rows) - len(measured),
            "conversions": int(sum(x["ranges"] for x in rows)),
            "measured_conversions": int(sum(ranges)),
            "seconds": float(sum(secs)),
            "ns_per_conversion": 1e9 * sum(secs) / sum(ranges) if sum(ranges) else None,
            "per_vm_memory_bytes": _dist([x["memory_bytes"] for x in rows]),
            "per_vm_peak_memory_bytes": _dist([x["peak_memory_bytes"] for x in rows]),
            "per_vm_bytes_per_guest_gib": _dist(
                [x["peak_memory_bytes"] / (r["guest"] / GiB) for x, r in zip(rows, results)]
            ),
            "per_vm_seconds": _dist(secs),
        }
    if results and "vm" in results[0]:
        out["vm_replay"] = {
            "operations": int(sum(r["vm"]["operations"] for r in results)),
            "seconds": float(sum(r["vm"]["seconds"] for r in results)),
            "memory_bytes": int(sum(r["vm"]["memory_bytes"] for r in results)),
            "unexpected_errors": int(sum(sum(r["vm"]["replay"]["unexpected_errors"].values()) for r in results)),
        }
    return out


def table(summary: dict[str, Any], title: str) -> Any:
    from rich.table import Table

    from memattr.report import human_bytes

    t = Table(title=title, title_justify="left")
    for col in ("store", "host attribute memory: peak / end", "conversions", "conversion time", "ns/conversion",
                "per-VM peak p50 / p90 / max", "peak bytes per guest GiB p50"):
        t.add_column(col, justify="left" if col == "store" else "right")
    for store, s in summary["stores"].items():
        d = s["per_vm_peak_memory_bytes"]
        est = f" ({s['estimated_vms']} VMs estimated)" if s["estimated_vms"] else ""
        t.add_row(
            store,
            f"{human_bytes(s['peak_memory_bytes'])} / {human_bytes(s['memory_bytes'])}" + est,
            f"{s['conversions']:,}",
            f"{s['seconds']:.2f} s" + (" (measured VMs)" if s["estimated_vms"] else ""),
            f"{s['ns_per_conversion']:.0f}" if s["ns_per_conversion"] else "-",
            f"{human_bytes(d['p50'])} / {human_bytes(d['p90'])} / {human_bytes(d['max'])}",
            human_bytes(s["per_vm_bytes_per_guest_gib"]["p50"]),
        )
    return t


def plot(results: list[dict[str, Any]], summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    guest = np.array([r["guest"] for r in results], dtype=np.float64) / GiB
    for store, marker in (("rangetree", "o"), ("xarray", "x")):
        mem = np.array([r["stores"][store]["peak_memory_bytes"] for r in results], dtype=np.float64)
        est = np.array([bool(r["stores"][store].get("estimated")) for r in results])
        ax1.scatter(guest[~est], mem[~est], marker=marker, s=14, label=f"{store}")
        if est.any():
            ax1.scatter(guest[est], mem[est], marker=marker, s=14, alpha=0.35, label=f"{store} (estimated)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("guest RAM (GiB)")
    ax1.set_ylabel("attribute store peak memory (bytes)")
    ax1.set_title("per VM")
    ax1.legend()
    stores = list(summary["stores"])
    totals = [summary["stores"][s]["peak_memory_bytes"] / GiB for s in stores]
    ax2.bar(stores, totals)
    ax2.set_yscale("log")
    ax2.set_ylabel("host total of per-VM peaks (GiB)")
    ax2.set_title(f"{summary['vms']} VMs, {summary['guest_bytes'] / TiB:.1f} TiB of guest RAM")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DEFAULT_MIX", "FleetVm", "plan", "plot", "run", "run_vm", "summarise", "table"]
