"""Replay: :func:`replay` runs a trace's operations on a Vm (per call, or in
native batches), :func:`apply_to_store` applies its attribute changes to a
bare store."""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memattr.errors import MemoryFault, SetupError
from memattr.trace_format import (
    COLUMNS,
    FLAG_CONVERT,
    FLAG_DISCARD,
    FLAG_PRIVATE,
    FLAG_WRITE,
    OP_CREATE_GUEST_MEMFD,
    OP_FAULT,
    OP_GUEST_MEMFD_CLOSE,
    OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2,
    OP_GUEST_MEMFD_FALLOCATE,
    OP_NAMES,
    OP_SET_MEMORY_ATTRIBUTES,
    PUNCH_HOLE_MODE,
    RESULT_NONE,
    Trace,
    TraceFormatError,
    s64,
)
from memattr.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_SHIFT, PAGE_SIZE

@dataclass
class ReplayResult:
    """What a replay did. ``errors`` counts failed calls by errno name."""

    ops: int = 0
    sets: int = 0
    faults: int = 0
    fault_exits: int = 0  # KVM_EXIT_MEMORY_FAULT seen (each attempt)
    implicit_conversions: int = 0  # conversions the replayer made on an exit
    errors: dict[str, int] = field(default_factory=dict)
    # errors split: failures the trace recorded (its result is that -errno),
    # and every other one (a generated trace's calls are all meant to succeed)
    expected_errors: dict[str, int] = field(default_factory=dict)
    unexpected_errors: dict[str, int] = field(default_factory=dict)
    mismatches: int = 0  # results differing from the recorded ones
    first_mismatch: str | None = None
    seconds: float = 0.0  # wall clock, the source's time (generating, reading) excluded
    source_seconds: float = 0.0  # generating or reading the records
    cpu_seconds: float = 0.0  # this process's CPU time: steadier on a busy machine
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_memory: dict[str, int] = field(default_factory=dict)  # store.memory_bytes() at phase end
    peak_memory: int = 0
    engine: str = "python"  # "native" if operations ran in native batches
    # With replay(keep_results=True): each operation's result (0, the mapped
    # level, an fd, or -errno), int64, in trace order.
    results: np.ndarray | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field but ``results``, as plain data (JSON-ready)."""
        d = dataclasses.asdict(dataclasses.replace(self, results=None))
        del d["results"]
        return d


def _errname(code: int | None) -> str:
    return errno_mod.errorcode.get(code or 0, str(code))


ENGINES = ("auto", "native", "python")


def replay(
    trace: Any,
    vm: Any,
    *,
    check: bool = False,
    progress: Callable[[int], None] | None = None,
    chunk: int = 8192,
    engine: str = "auto",
    keep_results: bool = False,
    strict_setup: bool = True,
) -> ReplayResult:
    """Runs every operation of ``trace`` (a :class:`Trace` or a
    :class:`memattr.stream.TraceStream`) on ``vm`` (a Vm or a Recorder),
    ``chunk`` operations at a time: a stream is never held whole.

    Failing calls are counted, not raised: a trace may hold calls that fail
    on purpose. A failure the trace recorded (its ``result`` is that
    ``-errno``) is *expected*; any other is *unexpected*
    (``ReplayResult.expected_errors`` / ``unexpected_errors``). The
    memory-fault exits a ``FLAG_CONVERT`` fault provokes on purpose are no
    errors at all (``fault_exits``, ``implicit_conversions``). With
    ``strict_setup`` (the default), an unexpected failure of the trace's
    own setup (``create_guest_memfd``, ``set_user_memory_region``) raises
    :class:`memattr.errors.SetupError` instead: what would follow is a
    different VM. With ``check``, results that differ from the recorded
    ones are counted in ``mismatches``. ``progress(n)`` is called after
    every ``chunk`` operations with the number just done; KeyboardInterrupt
    is noticed between chunks.

    ``engine``: ``"python"`` makes one Vm call per operation; ``"native"``
    runs SET_MEMORY_ATTRIBUTES and fault operations in native batches
    (:mod:`memattr.batch`: same rules, same state, same counters, without
    the interpreter between operations) and the rest per call, and raises
    ValueError if ``vm`` cannot run batches (a Recorder, hooks, v11
    semantics); ``"auto"`` is native where possible, else python.
    ``ReplayResult.engine`` says which ran. ``keep_results`` keeps every
    operation's result in ``ReplayResult.results`` (O(trace) memory).
    """
    from memattr.batch import batch_blocker
    from memattr.stream import TraceStream

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if type(chunk) is not int or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if isinstance(trace, Trace):
        # Both engines assume well-formed records (known kinds, fields in range).
        trace.validate()
        phases = trace.phases or [("all", 0, len(trace))]
        tops = trace.ops
        parts: Any = ((name, tops[lo : min(end, lo + chunk)]) for name, a, end in phases for lo in range(a, end, chunk))
    elif isinstance(trace, TraceStream):
        parts = trace.chunks(chunk)  # validated chunk by chunk
    else:
        raise TypeError(f"trace must be a memattr.trace.Trace or a TraceStream, not {type(trace).__name__}")
    blocker = batch_blocker(vm) if engine != "python" else "engine='python'"
    if engine == "native" and blocker is not None:
        raise ValueError(f"engine='native' cannot run on this Vm: {blocker}")
    res = ReplayResult(engine="python" if blocker else "native")
    kept: list[np.ndarray] = []
    replayer = _Replayer(trace.meta, vm, res, strict_setup)
    store = getattr(vm, "store", None)
    t_all = time.perf_counter()
    cpu_all = time.process_time()
    current: str | None = None
    t0 = t_all

    def end_phase() -> None:
        if current is None:
            return
        res.phase_seconds[current] = res.phase_seconds.get(current, 0.0) + time.perf_counter() - t0
        if store is not None:
            res.phase_memory[current] = int(store.memory_bytes())

    gen = 0.0
    gen_cpu = 0.0
    parts = iter(parts)
    while True:
        # The source's own time (generating or reading records) is kept
        # out of the replay's: seconds measure the Vm alone.
        g0, gc0 = time.perf_counter(), time.process_time()
        item = next(parts, None)
        gen += time.perf_counter() - g0
        gen_cpu += time.process_time() - gc0
        if item is None:
            break
        phase, part = item
        if phase != current:
            end_phase()
            current, t0 = phase, time.perf_counter()
        lo = res.ops
        replayer.base = lo
        got = replayer.run_native(part) if blocker is None else replayer.run_python(part)
        if keep_results:
            kept.append(got)
        recorded = part["result"].astype(np.int64)
        failed = got < 0
        if failed.any():
            expected = failed & (recorded == got)
            _tally_errnos(res.expected_errors, got[expected])
            _tally_errnos(res.unexpected_errors, got[failed & ~expected])
        if check:
            bad = np.flatnonzero((recorded != RESULT_NONE) & (got != recorded))
            if bad.size:
                res.mismatches += int(bad.size)
                if res.first_mismatch is None:
                    i = int(bad[0])
                    op = part[i]
                    res.first_mismatch = (
                        f"op {lo + i} ({OP_NAMES[int(op['kind'])]} gpa={int(op['gpa']):#x}): "
                        f"recorded {int(recorded[i])}, got {int(got[i])}"
                    )
        res.ops += len(part)
        if progress is not None:
            progress(len(part))
        if store is not None:
            res.peak_memory = max(res.peak_memory, int(store.memory_bytes()))
    end_phase()
    if keep_results:
        res.results = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    res.source_seconds = gen
    res.seconds = time.perf_counter() - t_all - gen
    res.cpu_seconds = time.process_time() - cpu_all - gen_cpu
    return res


def _tally_errnos(into: dict[str, int], results: np.ndarray) -> None:
    if results.size:
        codes, counts = np.unique(-results, return_counts=True)
        for code, count in zip(codes.tolist(), counts.tolist()):
            name = _errname(code)
            into[name] = into.get(name, 0) + count


class _Replayer:
    """One replay's state: the Vm, the tally, and recorded-to-live fds."""

    def __init__(self, meta: dict[str, Any], vm: Any, res: ReplayResult, strict_setup: bool = True) -> None:
        self.vm = vm
        self.res = res
        self.regions = meta["regions"]
        self.fd_map: dict[int, int] = {}
        self.strict_setup = strict_setup
        self.base = 0  # index of the current chunk's first operation
        self.index: int | None = None  # the operation run_one runs, if known

    def setup_failed(self, e: OSError, recorded: int, call: str, index: int | None = None) -> int:
        """A setup call failed: counted if the trace recorded that failure
        (or strict_setup is off), else SetupError."""
        got = self.fail(e)
        if self.strict_setup and recorded != got:
            where = "" if index is None else f" (operation {index})"
            raise SetupError(
                e.errno or 0,
                f"the trace's own setup failed{where}: {call} -> {_errname(e.errno)}: {e.strerror or e}; "
                "everything after it would run on a different VM, so the replay stops",
            )
        return got

    def fail(self, e: OSError) -> int:
        name = _errname(e.errno)
        errors = self.res.errors
        errors[name] = errors.get(name, 0) + 1
        return -(e.errno or 0)

    def run_python(self, part: np.ndarray) -> np.ndarray:
        """One Vm call per operation; returns the results."""
        got = np.empty(len(part), dtype=np.int64)
        cols = [part[f].tolist() for f in COLUMNS]
        for i, row in enumerate(zip(*cols)):
            self.index = self.base + i
            got[i] = self.run_one(*row)
        return got

    def run_native(self, part: np.ndarray) -> np.ndarray:
        """Native batches, with the operations they stop at run per call."""
        from memattr.batch import run_batch

        n = len(part)
        got = np.empty(n, dtype=np.int64)
        kind = np.ascontiguousarray(part["kind"])
        # Copies (np.array copies): the fd column is rewritten below, and a
        # one-record field view would otherwise be the trace itself.
        cols = [np.array(part[f]) for f in ("gpa", "size", "attributes", "arg")]
        flags = np.ascontiguousarray(part["flags"])
        fallocate = np.flatnonzero(kind == OP_GUEST_MEMFD_FALLOCATE)
        recorded_fds = cols[2][fallocate].copy()
        res = self.res
        i = 0
        while i < n:
            if fallocate.size:
                # Recorded fds to live ones, with the map as it is now (a
                # create_guest_memfd run per call may just have changed it).
                cols[2][fallocate] = [self.fd_map.get(fd, fd) for fd in recorded_fds.tolist()]
            out = run_batch(
                self.vm, kind[i:], cols[0][i:], cols[1][i:], cols[2][i:], cols[3][i:], flags[i:], got[i:]
            )
            res.sets += out["sets"]
            res.faults += out["faults"]
            res.fault_exits += out["fault_exits"]
            res.implicit_conversions += out["implicit_conversions"]
            for code, count in out["errors"].items():
                name = _errname(code)
                res.errors[name] = res.errors.get(name, 0) + count
            i += out["done"]
            if i < n:
                # A memslot or guest_memfd operation: per call.
                row = [part[f][i].item() for f in COLUMNS]
                self.index = self.base + i
                got[i] = self.run_one(*row)
                i += 1
        return got

    def run_one(
        self,
        kind: int,
        gpa: int,
        size: int,
        attributes: int,
        arg: int,
        recorded: int,
        flags: int,
        aux: int,
    ) -> int:
        """One operation through the Vm's Python API; returns the result."""
        vm = self.vm
        if kind == OP_SET_MEMORY_ATTRIBUTES:
            self.res.sets += 1
            try:
                vm.set_memory_attributes(gpa, size, attributes, arg)
                return 0
            except OSError as e:
                return self.fail(e)
        if kind == OP_FAULT:
            return self.fault(gpa, flags)
        if kind == OP_CREATE_GUEST_MEMFD:
            try:
                fd = int(vm.create_guest_memfd(size, arg))
            except OSError as e:
                return self.setup_failed(e, recorded, f"create_guest_memfd(size={size:#x}, flags={arg:#x})", self.index)
            if recorded != RESULT_NONE and recorded >= 0:
                self.fd_map[recorded] = fd
                return int(recorded)  # fds are compared through the map
            return fd
        if kind == OP_GUEST_MEMFD_FALLOCATE:
            try:
                vm.guest_memfd_fallocate(self.fd_map.get(attributes, attributes), arg, s64(gpa), s64(size))
                return 0
            except OSError as e:
                return self.fail(e)
        if kind == OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2:
            self.res.sets += 1
            try:
                vm.guest_memfd_set_memory_attributes(self.fd_map.get(attributes, attributes), gpa, size, arg, aux)
                return 0
            except OSError as e:
                return self.fail(e)
        if kind == OP_GUEST_MEMFD_CLOSE:
            try:
                vm.guest_memfd_close(self.fd_map.get(attributes, attributes))
                return 0
            except OSError as e:
                return self.fail(e)
        slot, uaddr, gmem = self.regions[aux]
        try:
            vm.set_user_memory_region(slot, gpa, size, uaddr, attributes, self.fd_map.get(gmem, gmem), arg)
            return 0
        except OSError as e:
            return self.setup_failed(
                e, recorded, f"set_user_memory_region(slot={slot}, gpa={gpa:#x}, size={size:#x}, flags={attributes:#x})", self.index
            )

    def discard(self, gpa: int, size: int) -> int | None:
        """QEMU's ram_block_discard_guest_memfd_range() after a conversion
        to shared: punch the hole behind [gpa, gpa + size) in the guest_memfd
        backing it, if any. The error result if the fallocate fails."""
        slot = self.vm.memslots.find(0, gpa >> PAGE_SHIFT)
        if slot is None or slot.gmem is None:
            return None
        offset = slot.guest_memfd_offset + gpa - (slot.base_gfn << PAGE_SHIFT)
        try:
            self.vm.guest_memfd_fallocate(slot.gmem, PUNCH_HOLE_MODE, offset, size)
        except OSError as e:
            return self.fail(e)
        return None

    def fault(self, gpa: int, flags: int) -> int:
        res = self.res
        vm = self.vm
        res.faults += 1
        private = bool(flags & FLAG_PRIVATE)
        write = bool(flags & FLAG_WRITE)
        try:
            return int(vm.fault(gpa, private=private, write=write))
        except OSError as e:
            if not isinstance(e, MemoryFault):
                return self.fail(e)
            res.fault_exits += 1
            if not flags & FLAG_CONVERT:
                return self.fail(e)
            # What a VMM does on KVM_EXIT_MEMORY_FAULT: convert the reported
            # range to what the guest asked for, then re-enter the guest.
            to_private = bool(e.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)
            try:
                vm.set_memory_attributes(e.gpa, e.size, KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0)
            except OSError as e2:
                return self.fail(e2)
            res.implicit_conversions += 1
            res.sets += 1
            if flags & FLAG_DISCARD and not to_private:
                failed = self.discard(e.gpa, e.size)
                if failed is not None:
                    return failed
        try:
            return int(vm.fault(gpa, private=private, write=write))
        except OSError as e:
            if isinstance(e, MemoryFault):
                res.fault_exits += 1
            return self.fail(e)


def apply_to_store(trace: Any, store: Any, chunk: int = 1 << 20) -> int:
    """Applies the trace's attribute changes straight to a bare store.

    ``trace`` is a :class:`Trace` or a :class:`memattr.stream.TraceStream`,
    read ``chunk`` records at a time. Only SET_MEMORY_ATTRIBUTES operations
    that succeeded (recorded result 0) or were never run (generated traces:
    :data:`RESULT_NONE`, flags 0) are applied, in order, as gfn ranges: the
    kernel stores attributes for the whole range whether or not memslots
    cover it. Faults, memslots and failed calls are skipped. Uses the
    store's batch ``set_many`` when it has one. Returns the number of
    ranges applied.
    """
    from memattr.stream import as_stream

    total = 0
    pos = 0
    for _phase, ops in as_stream(trace).chunks(chunk):
        total += _apply_chunk(ops, store, pos)
        pos += ops.size
    return total


def _chunk_sets(ops: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gfn ranges and values a chunk's applied sets store (see
    :func:`apply_to_store`), as contiguous arrays; ``base`` is the chunk's
    first record's index, for the error."""
    sel = (
        (ops["kind"] == OP_SET_MEMORY_ATTRIBUTES)
        & ((ops["result"] == 0) | ((ops["result"] == RESULT_NONE) & (ops["arg"] == 0)))
        & (ops["size"] != 0)
    )
    chosen = ops[sel]
    gpa = chosen["gpa"]
    end = gpa + chosen["size"]
    ok = (end > gpa) & (gpa % PAGE_SIZE == 0) & (chosen["size"] % PAGE_SIZE == 0)
    if not ok.all():
        i = base + int(np.flatnonzero(sel)[np.flatnonzero(~ok)[0]])
        raise TraceFormatError(f"record {i}: a set that would fail validation is marked as applied")
    starts = np.ascontiguousarray(gpa >> np.uint64(PAGE_SHIFT))
    ends = np.ascontiguousarray(end >> np.uint64(PAGE_SHIFT))
    return starts, ends, np.ascontiguousarray(chosen["attributes"])


def _store_sets(store: Any, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> int:
    """Stores the ranges, through the store's batch ``set_many`` when it has
    one; returns how many."""
    if hasattr(store, "set_many"):
        store.set_many(starts, ends, values)
    else:
        for s, e, v in zip(starts.tolist(), ends.tolist(), values.tolist()):
            store.set_range(s, e, v)
    return int(starts.size)


def _apply_chunk(ops: np.ndarray, store: Any, base: int) -> int:
    return _store_sets(store, *_chunk_sets(ops, base))
