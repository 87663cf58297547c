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
    S32_MIN,
    U32_MAX,
)

OP_SET_MEMORY_ATTRIBUTES = 0
OP_FAULT = 1
OP_CREATE_GUEST_MEMFD = 2
OP_SET_USER_MEMORY_REGION = 3
OP_GUEST_MEMFD_FALLOCATE = 4
OP_GUEST_MEMFD_CLOSE = 5
OP_NAMES: dict[int, str] = {
    OP_SET_MEMORY_ATTRIBUTES: "set_memory_attributes",
    OP_FAULT: "fault",
    OP_CREATE_GUEST_MEMFD: "create_guest_memfd",
    OP_SET_USER_MEMORY_REGION: "set_user_memory_region",
    OP_GUEST_MEMFD_FALLOCATE: "guest_memfd_fallocate",
    OP_GUEST_MEMFD_CLOSE: "guest_memfd_close",
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
    is_fd = (kind == OP_GUEST_MEMFD_FALLOCATE) | (kind == OP_GUEST_MEMFD_CLOSE)
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
    bad = ~is_region & (ops["aux"] != 0)
    if bad.any():
        fail(bad, "aux is only defined for set_user_memory_region operations")


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """``meta`` if it is a well-formed metadata dict, else TraceFormatError at ``where``."""
    if not isinstance(meta, dict):
        raise TraceFormatError(f"{where}: metadata must be a JSON object")
    vm_type = meta.get("vm_type", 0)
    if not isinstance(vm_type, int) or vm_type < 0:
        raise TraceFormatError(f"{where}: metadata vm_type must be a non-negative integer")
    if not isinstance(meta.get("vm_kwargs", {}), dict):
        raise TraceFormatError(f"{where}: metadata vm_kwargs must be an object")
    regions = meta.get("regions", [])
    if not isinstance(regions, list) or not all(
        isinstance(r, list) and len(r) == 3 and all(isinstance(x, int) for x in r) for r in regions
    ):
        raise TraceFormatError(
            f"{where}: metadata regions must be a list of [slot, userspace_addr, guest_memfd]"
        )
    phases = meta.get("phases", [])
    if not isinstance(phases, list) or not all(
        isinstance(p, list)
        and len(p) == 3
        and isinstance(p[0], str)
        and isinstance(p[1], int)
        and isinstance(p[2], int)
        for p in phases
    ):
        raise TraceFormatError(f"{where}: metadata phases must be a list of [name, start, end]")
    return meta


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
