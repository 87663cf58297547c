"""Run workloads on Vms, one configuration or many in parallel.

:func:`run_trace` replays one trace on a fresh :class:`memattr.Vm` and
measures it; :func:`run_config` builds a named workload from a
:class:`Config` and runs it; :func:`sweep` runs many configurations through
a standard :class:`concurrent.futures.Executor`.

By default :func:`sweep` uses a ``ProcessPoolExecutor`` with
``max_workers=os.cpu_count()`` (:func:`default_executor`): every configuration is independent (its
own Vm, its own workload built from its seed in the worker), so processes
scale across cores with nothing shared. Any other ``Executor`` works
unchanged, because :func:`sweep` only calls ``executor.submit(run_config,
config)`` and waits on the futures; :func:`run_config` and :class:`Config`
are plain, picklable, module-level objects. To spread a sweep over a
cluster::

    # Dask (pip install 'memattr[dask]'; tested with a LocalCluster of two
    # worker processes, results identical to the process pool; the CLI's
    # --scheduler / --dask-local do this, see memattr.distributed):
    from dask.distributed import Client
    client = Client("scheduler:8786")
    results = sweep(configs, executor=client.get_executor(pure=False))

    # MPI: mpi4py.futures.MPIPoolExecutor is one too
    from mpi4py.futures import MPIPoolExecutor
    with MPIPoolExecutor() as ex:
        results = sweep(configs, executor=ex)

    # Ray: wrap ray.remote in an Executor (Ray ships no stock one); sweep()
    # only needs submit(fn, *args) -> concurrent.futures.Future, which an
    # ObjectRef gives through .future():
    import ray
    class RayExecutor(concurrent.futures.Executor):
        def submit(self, fn, /, *args, **kwargs):
            return ray.remote(fn).remote(*args, **kwargs).future()
    results = sweep(configs, executor=RayExecutor())

The workers need ``memattr`` installed (``pip install memattr`` on each
node); nothing else crosses the wire but the Config and the result dict.
``sweep`` never shuts down an executor it was given.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memattr import trace as trace_mod
from memattr import workloads
from memattr.stream import TraceStream, as_stream, open_trace
from memattr.mmu import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from memattr.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SIZE, SZ_1G, SZ_2M
from memattr.units import GiB, format_size

STORES = ("rangetree", "xarray")
# Every store a single run may use: also the in-place series' maple tree
# (memattr.MapleTree); the sweeps and `compare` keep to STORES.
RUN_STORES = (*STORES, "mapletree")


PARTS = ("both", "vm", "store-only")
# Which API a run drives: "vm" (KVM_SET_MEMORY_ATTRIBUTES on the VM, the
# per-VM store of 6.8/6.18) or "inplace" (the same conversions issued as
# KVM_SET_MEMORY_ATTRIBUTES2 on each guest_memfd by
# memattr.gmem_inplace.InPlaceVmm, attributes kept per file).
APIS = ("vm", "inplace")
# The in-place series' semantics `compare --api both` runs (upstream's newest
# revision followed; see README).
INPLACE_SEMANTICS = "gmem-inplace"


@dataclass(frozen=True)
class Config:
    """One run: a named workload at a guest size on one store, or (with
    ``trace_path``) a trace file, whose guest size ``guest`` then states."""

    workload: str = "boot-and-churn"
    guest: int = 64 * GiB
    store: str = "rangetree"
    seed: int = 0
    params: tuple[tuple[str, Any], ...] = ()  # extra workload parameters
    vm_kwargs: tuple[tuple[str, Any], ...] = ()  # extra Vm(...) arguments
    engine: str = "auto"  # memattr.trace.replay's engine
    # What run_config measures: "both" (Vm replay, then store-only replay),
    # "vm" or "store-only" (so the two can run in parallel).
    parts: str = "both"
    trace_path: str = ""  # a trace file to run instead of the workload
    api: str = "vm"  # one of APIS

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.api == "inplace" and self.parts != "vm":
            raise ValueError("an in-place run has only its Vm part (parts='vm'): the store-only replay is the per-VM one")
        if self.parts not in PARTS:
            raise ValueError(f"parts must be one of {PARTS}, got {self.parts!r}")
        if self.engine not in trace_mod.ENGINES:
            raise ValueError(f"engine must be one of {trace_mod.ENGINES}, got {self.engine!r}")
        if self.store not in RUN_STORES:
            raise ValueError(f"store must be one of {RUN_STORES}, got {self.store!r}")
        if not self.trace_path and self.workload not in workloads.WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {', '.join(workloads.WORKLOADS)}")
        if not isinstance(self.guest, int) or self.guest <= 0:
            raise ValueError(f"guest must be a positive int of bytes, got {self.guest!r}")

    def label(self) -> str:
        part = "" if self.parts == "both" else f" ({self.parts})"
        api = " in place" if self.api == "inplace" else ""
        return f"{self.workload} {format_size(self.guest)} {self.store}{api}{part}"


def make_trace(config: Config) -> TraceStream:
    """The configuration's operations as a stream (generated, or read from
    ``trace_path``, in bounded chunks)."""
    if config.trace_path:
        return open_trace(config.trace_path)
    return workloads.stream(config.workload, config.guest, seed=config.seed, **dict(config.params))


def trace_guest_size(trace: trace_mod.Trace | TraceStream) -> int:
    """The guest RAM a trace was made for: its ``params.guest``, else the
    bytes its memslots cover."""
    guest = trace.meta.get("params", {}).get("guest")
    if isinstance(guest, int) and guest > 0:
        return guest
    return sum(e - s for s, e in _ram_ranges(trace))


def _ram_ranges(trace: trace_mod.Trace | TraceStream) -> list[tuple[int, int]]:
    layout = trace.meta.get("layout")
    if layout:
        return [(gpa, gpa + size) for _slot, gpa, size, _off in layout["regions"]]
    out: list[tuple[int, int]] = []
    for _phase, part in as_stream(trace).chunks():
        ops = part[part["kind"] == trace_mod.OP_SET_USER_MEMORY_REGION]
        out += [(int(g), int(g) + int(s)) for g, s in zip(ops["gpa"], ops["size"]) if s]
    return out


def attribute_bytes(store: Any, ranges: list[tuple[int, int]]) -> dict[str, int]:
    """Private and shared bytes of RAM (the given gpa ranges) in ``store``."""
    priv = 0
    total = 0
    for start, end in ranges:
        s, e = start // PAGE_SIZE, end // PAGE_SIZE
        total += e - s
        priv += int(store.count_pages(s, e, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_ATTRIBUTE_PRIVATE))
    return {"private_bytes": priv * PAGE_SIZE, "shared_bytes": (total - priv) * PAGE_SIZE}


def hugepage_coverage(mapped: dict[Any, int]) -> dict[str, Any]:
    """Bytes mapped at each level from ``stats.mapped`` (live mappings)."""
    sizes = {PG_LEVEL_4K: PAGE_SIZE, PG_LEVEL_2M: SZ_2M, PG_LEVEL_1G: SZ_1G}
    by_level = {int(k): int(v) * sizes[int(k)] for k, v in mapped.items() if int(k) in sizes}
    total = sum(by_level.values())
    huge = by_level.get(PG_LEVEL_2M, 0) + by_level.get(PG_LEVEL_1G, 0)
    return {
        "mapped_bytes": {
            "4K": by_level.get(PG_LEVEL_4K, 0),
            "2M": by_level.get(PG_LEVEL_2M, 0),
            "1G": by_level.get(PG_LEVEL_1G, 0),
        },
        "huge_fraction": (huge / total) if total else 0.0,
    }


def run_trace(
    trace: trace_mod.Trace | TraceStream,
    store: str = "rangetree",
    *,
    vm_kwargs: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    recorder: bool = False,
    engine: str = "auto",
) -> dict[str, Any]:
    """Replays ``trace`` (in memory, or a stream read in bounded chunks) on
    a fresh ``Vm(trace.vm_type, store=store)``
    (``engine`` as in :func:`memattr.trace.replay`; a recorder always runs
    per call).

    Returns a JSON-able dict: timings (total, per phase), operations per
    second, the store's memory (at the end, per phase end, peak), the Vm's
    counters, the replay's own counts (fault exits, implicit conversions,
    errors), the final private/shared bytes of RAM and the hugepage
    coverage. With ``recorder``, the dict also holds the recorded trace
    under ``"trace"`` (not JSON-able; pop it before dumping).
    """
    from memattr.vm import Vm

    if store not in RUN_STORES:
        raise ValueError(f"store must be one of {RUN_STORES}, got {store!r}")
    kwargs = dict(trace.meta.get("vm_kwargs", {}))
    kwargs.update(vm_kwargs or {})
    vm = Vm(trace.vm_type, store=store, **kwargs)  # type: ignore[arg-type]  # checked above
    target: Any = trace_mod.Recorder(vm, {"name": trace.name, "vm_kwargs": kwargs}) if recorder else vm
    if recorder and engine == "native":
        raise ValueError("engine='native' cannot record: a Recorder must see every call")
    res = trace_mod.replay(trace, target, progress=progress, engine=engine)
    out = _replay_result(trace, store, res, vm, vm.store, res.peak_memory)
    if recorder:
        out["trace"] = target.trace()
    return out


def run_inplace(
    trace: trace_mod.Trace | TraceStream,
    store: str = "mapletree",
    *,
    vm_kwargs: dict[str, Any] | None = None,
    semantics: str = INPLACE_SEMANTICS,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """:func:`run_trace` through the in-place API: a fresh ``Vm(...,
    semantics=semantics)`` driven by :class:`memattr.gmem_inplace.InPlaceVmm`
    (each per-VM conversion of the trace issued as KVM_SET_MEMORY_ATTRIBUTES2
    on the guest_memfd behind it; per call, the Python engine). The memory
    reported is the attributes' memory: every guest_memfd file's store,
    sampled as run_trace samples the per-VM one. Same keys as run_trace,
    plus ``"api": "inplace"``, ``"semantics"``, ``"gmem_calls"`` and
    ``"unbacked_pages"`` (conversions no guest_memfd backs: nothing to set
    in place)."""
    from memattr.gmem_inplace import InPlaceVmm
    from memattr.vm import Vm

    if store not in RUN_STORES:
        raise ValueError(f"store must be one of {RUN_STORES}, got {store!r}")
    kwargs = dict(trace.meta.get("vm_kwargs", {}))
    kwargs.update(vm_kwargs or {})
    kwargs["semantics"] = semantics
    vm = Vm(trace.vm_type, store=store, **kwargs)  # type: ignore[arg-type]  # checked above
    target = InPlaceVmm(vm)
    res = trace_mod.replay(trace, target, progress=progress, engine="python")
    files = target.store
    out = _replay_result(trace, store, res, vm, files, max(res.peak_memory, int(files.memory_bytes())))
    out.update(
        api="inplace",
        semantics=semantics,
        inplace_stats=vm.inplace_stats,
        gmem_calls=target.gmem_calls,
        unbacked_pages=target.unbacked_pages,
    )
    return out


def _replay_result(
    trace: trace_mod.Trace | TraceStream, store: str, res: Any, vm: Any, attrs: Any, peak: int
) -> dict[str, Any]:
    """The JSON-able result of one replay (see :func:`run_trace`): ``attrs``
    is the attribute store measured (the Vm's, or the in-place files')."""
    return {
        "workload": trace.name,
        "store": store,
        "engine": res.engine,
        "guest": trace_guest_size(trace),
        "operations": res.ops,
        "seconds": res.seconds,
        "cpu_seconds": res.cpu_seconds,
        "generate_seconds": res.source_seconds,
        "ops_per_second": res.ops / res.seconds if res.seconds > 0 else float("inf"),
        "memory_bytes": int(attrs.memory_bytes()),
        "peak_memory_bytes": peak,
        "entry_count": int(attrs.entry_count()),
        "phase_seconds": res.phase_seconds,
        "phase_memory_bytes": res.phase_memory,
        "replay": {
            "sets": res.sets,
            "faults": res.faults,
            "fault_exits": res.fault_exits,
            "implicit_conversions": res.implicit_conversions,
            "errors": res.errors,
            "expected_errors": res.expected_errors,
            "unexpected_errors": res.unexpected_errors,
        },
        "stats": vm.stats.as_dict(),
        **attribute_bytes(attrs, _ram_ranges(trace)),
        "hugepages": hugepage_coverage(vm.stats.mapped),
        # this process's peak resident memory so far (getrusage), all of it:
        # the store, the Vm, the records in flight, the interpreter
        "max_rss_bytes": max_rss_bytes(),
    }


def run_store_only(trace: trace_mod.Trace | TraceStream, store: str) -> dict[str, Any]:
    """The data structure alone: the trace's attribute changes applied to a
    fresh bare store through its batch entry point (no Vm, no MMU, no
    per-operation Python), chunk by chunk, timed (the store's calls only,
    not the generation of the records)."""
    return run_stores_only(trace, (store,))[store]


def run_stores_only(trace: trace_mod.Trace | TraceStream, stores: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """:func:`run_store_only` on several stores from one pass over the
    records (each chunk applied to each store in turn)."""
    from memattr._native import MapleTree, RangeTree, XArray
    from memattr.replayer import _chunk_sets, _store_sets

    kinds: dict[str, Any] = {"rangetree": RangeTree, "xarray": XArray, "mapletree": MapleTree}
    objs = {s: kinds[s]() for s in stores}
    tally = {s: {"ranges": 0, "seconds": 0.0, "cpu_seconds": 0.0, "peak": 0} for s in stores}
    pos = 0
    for _phase, ops in as_stream(trace).chunks():
        # Selecting the sets from the records is the trace's work, not the
        # store's: it stays outside the timed calls.
        sets = _chunk_sets(ops, pos)
        for s, obj in objs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tally[s]["ranges"] += _store_sets(obj, *sets)
            tally[s]["seconds"] += time.perf_counter() - t0
            tally[s]["cpu_seconds"] += time.process_time() - c0
            tally[s]["peak"] = max(tally[s]["peak"], int(obj.memory_bytes()))
        pos += ops.size
    out: dict[str, dict[str, Any]] = {}
    for s, obj in objs.items():
        n, secs = int(tally[s]["ranges"]), float(tally[s]["seconds"])
        out[s] = {
            "ranges": n,
            "seconds": secs,
            "cpu_seconds": float(tally[s]["cpu_seconds"]),
            "ranges_per_second": n / secs if secs > 0 else float("inf"),
            "memory_bytes": int(obj.memory_bytes()),
            # sampled after each chunk of records
            "peak_memory_bytes": max(int(tally[s]["peak"]), int(obj.memory_bytes())),
        }
    return out


def run_config(config: Config) -> dict[str, Any]:
    """Builds the workload in this process and runs it (the sweep task):
    the full Vm replay, then the store-only replay of the same trace, or one
    of them (``config.parts``; the result's ``"part"`` says which).
    :func:`memattr.report.compare_rows` joins the parts of one size."""
    trace = make_trace(config)
    if config.api == "inplace":
        ip = run_inplace(trace, config.store, vm_kwargs=dict(config.vm_kwargs))
        ip.update(part=config.parts, guest=config.guest, seed=config.seed, config=dataclasses.asdict(config))
        return ip
    if config.parts == "store-only":
        out: dict[str, Any] = {"workload": trace.name, "store": config.store}
    else:
        out = run_trace(trace, config.store, vm_kwargs=dict(config.vm_kwargs), engine=config.engine)
    if config.parts != "vm":
        out["store_only"] = run_store_only(trace, config.store)
    out["part"] = config.parts
    out["guest"] = config.guest
    out["seed"] = config.seed
    out.setdefault("generate_seconds", 0.0)
    out["config"] = dataclasses.asdict(config)
    return out


@dataclass
class SweepResult:
    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[Config, str]] = field(default_factory=list)


def default_executor(max_workers: int | None = None) -> cf.Executor:
    """A ``ProcessPoolExecutor`` over every core. Workers start from a fork
    server, not by forking this (possibly threaded: progress bars) process."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else None)
    return cf.ProcessPoolExecutor(max_workers=max_workers or os.cpu_count() or 1, mp_context=ctx)


def sweep(
    configs: Iterable[Config],
    executor: cf.Executor | None = None,
    max_workers: int | None = None,
    on_done: Callable[[Config, dict[str, Any] | None, BaseException | None], None] | None = None,
    follow_up: Callable[[Config, dict[str, Any]], Iterable[Config]] | None = None,
    task: Callable[[Config], dict[str, Any]] = run_config,
) -> SweepResult:
    """Runs every configuration through ``executor`` (see the module doc).

    Results come back in submission order. A configuration that raises is
    reported in ``failures`` (the others still run). ``on_done(config,
    result, error)`` is called as each one finishes; ``follow_up(config,
    result)`` may return more configurations to submit (an adaptive sweep:
    e.g. the next size only if this one fit the time budget). ``task`` is
    the module-level function run per configuration.
    """
    pending_configs = list(configs)
    own = executor is None
    if own:
        executor = default_executor(max_workers)
    assert executor is not None
    out = SweepResult()
    submitted: list[Config] = []
    done: dict[int, dict[str, Any]] = {}
    futures: dict[cf.Future[dict[str, Any]], int] = {}

    def submit(c: Config) -> None:
        futures[executor.submit(task, c)] = len(submitted)
        submitted.append(c)

    try:
        for c in pending_configs:
            submit(c)
        while futures:
            finished, _ = cf.wait(list(futures), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                i = futures.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # a failed run must not sink the sweep
                    out.failures.append((submitted[i], f"{type(e).__name__}: {e}"))
                    if on_done:
                        on_done(submitted[i], None, e)
                    continue
                done[i] = result
                if on_done:
                    on_done(submitted[i], result, None)
                if follow_up:
                    for c in follow_up(submitted[i], result):
                        submit(c)
        out.results = [done[i] for i in sorted(done)]
    finally:
        if own:
            executor.shutdown(wait=True)
    return out


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def max_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss, KiB on Linux)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_memory() -> int:
    """Bytes of memory currently available (MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 0


# The per-page store's footprint: an xarray of 64-slot nodes, ~9.2 bytes a
# page once every page holds a value (measured through memory_bytes()).
XARRAY_BYTES_PER_PAGE = 9.2


def xarray_memory_estimate(guest: int) -> int:
    return int(guest // PAGE_SIZE * XARRAY_BYTES_PER_PAGE)


# Share of the available memory runs may use when no --memory-limit is set.
MEMORY_SHARE = 0.5


def memory_cap(limit: int | None = None, jobs: int = 1) -> int:
    """Bytes one of ``jobs`` parallel runs may use: ``limit`` (the user's
    --memory-limit, for all jobs) or MEMORY_SHARE of the memory available
    now; 0 if neither is known."""
    total = limit if limit else int(available_memory() * MEMORY_SHARE)
    return total // max(1, jobs)


def xarray_fits(guest: int, cap: int) -> bool:
    """Whether the per-page store for ``guest`` bytes fits in ``cap`` bytes
    (the estimate counted twice for headroom; an unknown cap of 0 fits)."""
    return not cap or xarray_memory_estimate(guest) * 2 <= cap


def store_refusal(store: str, guest: int, cap: int) -> str | None:
    """Why a run of ``store`` on a ``guest``-byte VM must not start (its
    per-page memory would not fit ``cap``), or None."""
    if store != "xarray" or xarray_fits(guest, cap):
        return None
    from memattr.report import human_bytes

    need = xarray_memory_estimate(guest)
    return (
        f"the per-page xarray store for a {format_size(guest)} guest needs ~{human_bytes(need)} "
        f"({XARRAY_BYTES_PER_PAGE:g} B per 4K page, counted twice for headroom) and only "
        f"{human_bytes(cap)} may be used (--memory-limit, or {MEMORY_SHARE:g} of the available memory); "
        "use --store rangetree or a smaller guest"
    )
