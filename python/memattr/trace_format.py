"""Operation traces, the in-memory form: records, metadata, validation.

A trace is a sequence of the calls a VMM makes on a VM fd, as fixed-size
records (a numpy structured array, :data:`OP_DTYPE`), plus a small metadata
dict (VM type, ``Vm(...)`` keyword arguments, the workload's name and
parameters, named phases). Workload generators (:mod:`memattr.workloads`)
produce traces; :class:`memattr.trace.Recorder` records one from any
:class:`memattr.Vm`; :func:`memattr.trace.replay` runs one on any Vm. The
on-disk forms are :mod:`memattr.trace_binary` and :mod:`memattr.trace_text`
(:mod:`memattr.trace_io` reads and writes either).

Operations (``kind``):

``OP_SET_MEMORY_ATTRIBUTES`` (0)
    ``vm.set_memory_attributes(gpa, size, attributes, flags=arg)``;
    result 0 or ``-errno``.
``OP_FAULT`` (1)
    ``vm.fault(gpa, private=flags & FLAG_PRIVATE, write=flags & FLAG_WRITE)``;
    result the mapped level (1 = 4K, 2 = 2M, 3 = 1G), 0 for emulated MMIO
    (a shared access outside every memslot), or ``-errno``
    (``-EFAULT`` for a ``KVM_EXIT_MEMORY_FAULT``). With ``FLAG_CONVERT``, the
    replayer behaves like a VMM on ``KVM_EXIT_MEMORY_FAULT``: it converts the
    reported range to the access's private-ness and runs the fault again
    (once); the result is that of the last attempt. With ``FLAG_DISCARD``
    too, a conversion to shared is followed, as QEMU does, by punching the
    guest_memfd hole behind the page (if a guest_memfd backs it).
``OP_CREATE_GUEST_MEMFD`` (2)
    ``vm.create_guest_memfd(size, flags=arg)``; result the fd or ``-errno``.
    Replay maps recorded fds to the ones the target Vm hands out.
``OP_SET_USER_MEMORY_REGION`` (3)
    ``vm.set_user_memory_region(slot, gpa, size, userspace_addr,
    flags=attributes, guest_memfd, guest_memfd_offset=arg)``; ``aux`` indexes
    the metadata's ``"regions"`` table, which holds ``[slot, userspace_addr,
    guest_memfd]`` (fields that do not fit the record); result 0 or ``-errno``.
``OP_GUEST_MEMFD_FALLOCATE`` (4)
    ``vm.guest_memfd_fallocate(fd=attributes, mode=arg, offset=gpa,
    length=size)`` (offset and length are loff_t: stored as their 64-bit
    two's complement); result 0 or ``-errno``. The fd goes through the same
    map as ``set_user_memory_region``'s.
``OP_GUEST_MEMFD_CLOSE`` (5)
    ``vm.guest_memfd_close(fd=attributes)``; gpa, size and arg 0; result 0
    or ``-errno``.
``OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2`` (6)
    KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd (the in-place conversion
    series): ``vm.guest_memfd_set_memory_attributes(fd=attributes,
    offset=gpa, size, attributes=arg, flags=aux)``: the fd where
    ``OP_GUEST_MEMFD_FALLOCATE`` keeps it (32 bits, through the same fd
    map), the attributes in ``arg``, the series' flags (content modes) in
    the 16-bit ``aux``; result 0 or ``-errno``. The native batch stops at
    it: it runs per call.

``result`` is :data:`RESULT_NONE` where nothing was recorded (generated
workloads).

A malformed trace is rejected with :class:`TraceFormatError`, which says where.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memattr.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    S32_MAX,
    S32_MIN,
    U32_MAX,
    U64_MAX,
)

OP_SET_MEMORY_ATTRIBUTES = 0
OP_FAULT = 1
OP_CREATE_GUEST_MEMFD = 2
OP_SET_USER_MEMORY_REGION = 3
OP_GUEST_MEMFD_FALLOCATE = 4
OP_GUEST_MEMFD_CLOSE = 5
OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2 = 6
OP_NAMES: dict[int, str] = {
    OP_SET_MEMORY_ATTRIBUTES: "set_memory_attributes",
    OP_FAULT: "fault",
    OP_CREATE_GUEST_MEMFD: "create_guest_memfd",
    OP_SET_USER_MEMORY_REGION: "set_user_memory_region",
    OP_GUEST_MEMFD_FALLOCATE: "guest_memfd_fallocate",
    OP_GUEST_MEMFD_CLOSE: "guest_memfd_close",
    OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2: "guest_memfd_set_memory_attributes2",
}

FLAG_PRIVATE = 1 << 0
FLAG_WRITE = 1 << 1
FLAG_CONVERT = 1 << 2
FLAG_DISCARD = 1 << 3
FAULT_FLAGS = FLAG_PRIVATE | FLAG_WRITE | FLAG_CONVERT | FLAG_DISCARD

RESULT_NONE = S32_MIN  # the i32 result field's own minimum

OP_DTYPE = np.dtype(
    [
        ("gpa", "<u8"),
        ("size", "<u8"),
        ("attributes", "<u8"),
        ("arg", "<u8"),
        ("result", "<i4"),
        ("kind", "u1"),
        ("flags", "u1"),
        ("aux", "<u2"),
    ]
)
assert OP_DTYPE.itemsize == 40

# The record fields in the order rows of them are built (Recorder, text
# parser, replayer): ops_from_rows().
COLUMNS = ("kind", "gpa", "size", "attributes", "arg", "result", "flags", "aux")

# What QEMU's guest_memfd discard passes to fallocate(2) (FLAG_DISCARD).
PUNCH_HOLE_MODE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def s64(value: int) -> int:
    """A stored u64 read back as the loff_t it holds."""
    return value - (1 << 64) if value >> 63 else value


class TraceFormatError(ValueError):
    """A trace file (or array) that is not a valid trace; says where."""


def display_name(path: object) -> str:
    """How error messages name a file (or a file object)."""
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return str(getattr(path, "name", "<trace>"))


def empty_ops(n: int = 0) -> np.ndarray:
    """``n`` zeroed records with nothing recorded."""
    ops = np.zeros(n, dtype=OP_DTYPE)
    ops["result"] = RESULT_NONE
    return ops


def ops_from_rows(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Records from rows of :data:`COLUMNS` values, in that order."""
    ops = empty_ops(len(rows))
    if rows:
        for fname, col in zip(COLUMNS, zip(*rows)):
            ops[fname] = np.array(col, dtype=OP_DTYPE[fname])
    return ops


def set_ops(gpa: Any, size: Any, attributes: Any) -> np.ndarray:
    """SET_MEMORY_ATTRIBUTES records from columns (broadcast like numpy)."""
    gpa_a, size_a, attr_a = np.broadcast_arrays(
        np.asarray(gpa, dtype=np.uint64),
        np.asarray(size, dtype=np.uint64),
        np.asarray(attributes, dtype=np.uint64),
    )
    ops = empty_ops(gpa_a.size)
    ops["kind"] = OP_SET_MEMORY_ATTRIBUTES
    ops["gpa"] = gpa_a.ravel()
    ops["size"] = size_a.ravel()
    ops["attributes"] = attr_a.ravel()
    return ops


def fault_ops(gpa: Any, flags: Any) -> np.ndarray:
    """FAULT records; ``flags`` a combination of FLAG_PRIVATE/WRITE/CONVERT."""
    gpa_a, flags_a = np.broadcast_arrays(
        np.asarray(gpa, dtype=np.uint64), np.asarray(flags, dtype=np.uint8)
    )
    ops = empty_ops(gpa_a.size)
    ops["kind"] = OP_FAULT
    ops["gpa"] = gpa_a.ravel()
    ops["flags"] = flags_a.ravel()
    return ops


@dataclass
class Trace:
    """Records plus metadata. ``meta`` holds JSON-able values only."""

    ops: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.ops, np.ndarray) or self.ops.dtype != OP_DTYPE:
            raise TypeError("ops must be a numpy array of dtype memattr.trace.OP_DTYPE")
        if isinstance(self.ops, np.ma.MaskedArray):
            raise TypeError("ops must be a plain numpy array, not a masked array")
        self.meta.setdefault("vm_type", 0)
        self.meta.setdefault("vm_kwargs", {})
        self.meta.setdefault("regions", [])
        self.meta.setdefault("phases", [])

    def __len__(self) -> int:
        return int(self.ops.size)

    @property
    def vm_type(self) -> int:
        return int(self.meta["vm_type"])

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "trace"))

    @property
    def phases(self) -> list[tuple[str, int, int]]:
        """``(name, first_op, end_op)`` for each named phase, in order."""
        return [(str(n), int(a), int(b)) for n, a, b in self.meta["phases"]]

    def validate(self) -> None:
        """Raises TraceFormatError naming the first bad record."""
        validate_records(self.ops, self.meta, lambda i: f"record {i}")

    def counts(self) -> dict[str, int]:
        """Operations by kind."""
        kinds = np.bincount(self.ops["kind"], minlength=len(OP_NAMES))
        return {OP_NAMES[k]: int(kinds[k]) for k in OP_NAMES}


def concat(parts: list[tuple[str, Trace]], meta: dict[str, Any]) -> Trace:
    """Joins traces (sharing one regions table) into one, one phase each."""
    arrays: list[np.ndarray] = []
    regions: list[list[int]] = []
    phases: list[list[Any]] = []
    pos = 0
    for name, part in parts:
        ops = part.ops.copy()
        region_mask = ops["kind"] == OP_SET_USER_MEMORY_REGION
        ops["aux"][region_mask] += len(regions)
        regions.extend(part.meta["regions"])
        arrays.append(ops)
        phases.append([name, pos, pos + ops.size])
        pos += ops.size
    merged = dict(meta)
    merged["regions"] = regions
    merged["phases"] = phases
    return Trace(np.concatenate(arrays) if arrays else empty_ops(), merged)


# --------------------------------------------------------------------------
# validation


def validate_records(ops: np.ndarray, meta: dict[str, Any], where: Callable[[int], str]) -> None:
    """Raises TraceFormatError for the first bad record, ``where(i)`` naming it."""
    def fail(mask: np.ndarray, why: str) -> None:
        i = int(np.flatnonzero(mask)[0])
        raise TraceFormatError(f"{where(i)}: {why}")

    kind = ops["kind"]
    bad = kind >= len(OP_NAMES)
    if bad.any():
        fail(bad, f"unknown operation kind {int(kind[np.flatnonzero(bad)[0]])}")
    is_fault = kind == OP_FAULT
    bad = is_fault & ((ops["flags"] & ~np.uint8(FAULT_FLAGS)) != 0)
    if bad.any():
        fail(bad, f"unknown fault flags {int(ops['flags'][np.flatnonzero(bad)[0]]):#x}")
    bad = ~is_fault & (ops["flags"] != 0)
    if bad.any():
        fail(bad, "flags are only defined for fault operations")
    bad = is_fault & ((ops["size"] != 0) | (ops["attributes"] != 0) | (ops["arg"] != 0))
    if bad.any():
        fail(bad, "fault operations must have size, attributes and arg 0")
    bad = (kind == OP_GUEST_MEMFD_CLOSE) & ((ops["gpa"] != 0) | (ops["size"] != 0) | (ops["arg"] != 0))
    if bad.any():
        fail(bad, "guest_memfd_close operations must have gpa, size and arg 0")
    is_fd = (kind == OP_GUEST_MEMFD_FALLOCATE) | (kind == OP_GUEST_MEMFD_CLOSE) | (kind == OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2)
    bad = is_fd & (ops["attributes"] > np.uint64(U32_MAX))
    if bad.any():
        fail(bad, "a guest_memfd fd must fit in 32 bits")
    bad = (kind == OP_GUEST_MEMFD_FALLOCATE) & (ops["arg"] > np.uint64(U32_MAX))
    if bad.any():
        fail(bad, "a fallocate mode must fit in 32 bits")
    is_region = kind == OP_SET_USER_MEMORY_REGION
    nregions = len(meta.get("regions", []))
    bad = is_region & (ops["aux"] >= nregions)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        fail(bad, f"regions index {int(ops['aux'][i])} out of range ({nregions} regions)")
    bad = ~is_region & (kind != OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2) & (ops["aux"] != 0)
    if bad.any():
        fail(bad, "aux is only defined for set_user_memory_region and guest_memfd_set_memory_attributes2 operations")
    # The memslot flags field is a __u32 in kvm_userspace_memory_region2.
    bad = is_region & (ops["attributes"] > np.uint64(U32_MAX))
    if bad.any():
        fail(bad, "memslot flags must fit in 32 bits")
    # Metadata errors carry the file part of the records' location.
    check_phases(meta.get("phases", []), int(ops.size), where(0).split("record 0")[0].rstrip(": "))


def check_phases(phases: Any, n: int, where: str) -> None:
    """The phases must tile the ``n`` records in order: the first starts at
    0, each starts where the one before ended, none ends before it starts,
    and the last ends at ``n`` (a replay runs each record exactly once, and
    the per-phase figures add up to the trace's). TraceFormatError otherwise."""
    where = f"{where}: metadata" if where else "metadata"
    pos = 0
    for i, p in enumerate(phases):
        name, start, end = p
        if start != pos:
            raise TraceFormatError(
                f"{where} phases[{i}] ({name!r}) starts at record {start}, "
                f"expected {pos} (phases must cover the records in order, without gaps or overlaps)"
            )
        if end < start:
            raise TraceFormatError(f"{where} phases[{i}] ({name!r}) ends at {end}, before its start {start}")
        pos = end
    # Also catches a phase past the records: ends never go back.
    if phases and pos != n:
        raise TraceFormatError(f"{where} phases end at record {pos}, but the trace has {n} records")


# Vm(semantics=...): memattr.vm.Semantics (a trace of the in-place API
# names the series' revision it was recorded on).
_SEMANTICS = ("6.18", "6.8", "v11", "gmem-inplace", "gmem-inplace-v5")


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """``meta`` if it is a well-formed metadata dict, else TraceFormatError at ``where``."""
    if not isinstance(meta, dict):
        raise TraceFormatError(f"{where}: metadata must be a JSON object")
    vm_type = meta.get("vm_type", 0)
    if not _is_int(vm_type) or not 0 <= vm_type <= U64_MAX:
        raise TraceFormatError(f"{where}: metadata vm_type must be an integer in [0, 2**64)")
    vm_kwargs = meta.get("vm_kwargs", {})
    if not isinstance(vm_kwargs, dict):
        raise TraceFormatError(f"{where}: metadata vm_kwargs must be an object")
    for key, value in vm_kwargs.items():
        check = _VM_KWARGS.get(key)
        if check is None:
            raise TraceFormatError(
                f"{where}: metadata vm_kwargs: unknown key {key!r} (known: {', '.join(sorted(_VM_KWARGS))})"
            )
        if not check[0](value):
            raise TraceFormatError(f"{where}: metadata vm_kwargs {key} must be {check[1]}, got {value!r}")
    if not isinstance(meta.get("params", {}), dict):
        raise TraceFormatError(f"{where}: metadata params must be an object")
    layout = meta.get("layout")
    if layout is not None and not (
        isinstance(layout, dict)
        and isinstance(layout.get("regions"), list)
        and all(
            isinstance(r, list)
            and len(r) == 4
            and all(_is_int(x) and 0 <= x <= U64_MAX for x in r)
            and r[1] + r[2] <= U64_MAX + 1
            for r in layout["regions"]
        )
    ):
        raise TraceFormatError(
            f"{where}: metadata layout must be an object whose regions are "
            "[slot, gpa, size, offset] lists of integers in [0, 2**64), gpa + size <= 2**64"
        )
    regions = meta.get("regions", [])
    if not isinstance(regions, list) or not all(
        isinstance(r, list)
        and len(r) == 3
        and all(_is_int(x) for x in r)
        and 0 <= r[0] <= U32_MAX
        and 0 <= r[1] <= U64_MAX
        and S32_MIN <= r[2] <= S32_MAX
        for r in regions
    ):
        raise TraceFormatError(
            f"{where}: metadata regions must be a list of [slot, userspace_addr, guest_memfd] "
            "(a u32, a u64 and an s32)"
        )
    phases = meta.get("phases", [])
    if not isinstance(phases, list) or not all(
        isinstance(p, list)
        and len(p) == 3
        and isinstance(p[0], str)
        and _is_int(p[1])
        and _is_int(p[2])
        for p in phases
    ):
        raise TraceFormatError(f"{where}: metadata phases must be a list of [name, start, end]")
    return meta


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# The Vm keyword arguments a trace may carry, each with its check; the Vm's
# own checks stay the rule, these only keep a bad file from reaching it as
# a TypeError in the middle of a run.
_VM_KWARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "semantics": (
        lambda v: v in _SEMANTICS,
        " or ".join(repr(x) for x in ("6.18", "6.8", "v11", "gmem-inplace", "gmem-inplace-v5")),
    ),
    "attr_memory_limit": (lambda v: v is None or (_is_int(v) and 0 <= v <= U64_MAX), "null or an integer in [0, 2**64)"),
    "guest_memfd_max_order": (lambda v: _is_int(v) and 0 <= v <= 63, "an integer in [0, 63]"),
    "lockdep": (lambda v: isinstance(v, bool), "true or false"),
}


# --------------------------------------------------------------------------
# summary


def describe(trace: Trace) -> dict[str, Any]:
    """A small summary for people: counts by kind, bytes set, phases."""
    ops = trace.ops
    sets = ops[ops["kind"] == OP_SET_MEMORY_ATTRIBUTES]
    private = (sets["attributes"] & np.uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE)) != 0
    return {
        "name": trace.name,
        "vm_type": trace.vm_type,
        "operations": len(trace),
        "by_kind": trace.counts(),
        "bytes_to_private": int(sets["size"][private].sum(dtype=np.uint64)),
        "bytes_to_shared": int(sets["size"][~private].sum(dtype=np.uint64)),
        "phases": {n: b - a for n, a, b in trace.phases},
    }
