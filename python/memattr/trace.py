"""Operation traces: the in-memory form, two on-disk forms, record and replay.

A trace is a sequence of the calls a VMM makes on a VM fd, as fixed-size
records (a numpy structured array, :data:`OP_DTYPE`), plus a small metadata
dict (VM type, ``Vm(...)`` keyword arguments, the workload's name and
parameters, named phases). Workload generators (:mod:`memattr.workloads`)
produce traces; :class:`Recorder` records one from any :class:`memattr.Vm`;
:func:`replay` runs one on any Vm; :func:`apply_to_store` applies the
attribute changes to a bare store.

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

Binary form (``.trace``), all little endian::

    offset  size  field
    0       8     magic b"MEMATTRT"
    8       2     version (1)
    10      2     record size (40)
    12      4     metadata length M (bytes of UTF-8 JSON)
    16      8     record count N
    24      M     metadata JSON, then space padding to a multiple of 8
    24+M'   40*N  records: u64 gpa, u64 size, u64 attributes, u64 arg,
                  i32 result, u8 kind, u8 flags, u16 aux

Text form (``.txt``), one operation per line, ``#`` comments::

    # memattr trace v1
    # meta {"vm_type": 1, "regions": [[0, 123145302310912, 3]], ...}
    create_guest_memfd size=0x80000000 flags=0x0 -> 3
    set_user_memory_region slot=0 gpa=0x0 size=0x80000000 uaddr=0x7000... flags=0x4 guest_memfd=3 offset=0x0 -> 0
    set_memory_attributes gpa=0x0 size=0x80000000 attributes=0x8 flags=0x0 -> 0
    fault gpa=0x1000 access=private,write,convert -> 2
    fault gpa=0x2000 access=shared,read -> -EFAULT
    guest_memfd_fallocate fd=3 mode=0x3 offset=0x0 len=0x200000 -> 0
    guest_memfd_close fd=3 -> 0

(``-> ...`` is omitted when nothing was recorded; ``set_user_memory_region``
lines carry every argument, so text traces need no regions table.)

Readers reject a malformed file with :class:`TraceFormatError`, whose message
names the line (text) or the record and byte offset (binary).
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import io
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from memattr.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

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

RESULT_NONE = -(1 << 31)

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

MAGIC = b"MEMATTRT"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQ")
TEXT_HEADER = "# memattr trace v1"

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
# What QEMU's guest_memfd discard passes to fallocate(2).
PUNCH_HOLE_MODE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _s64(value: int) -> int:
    """A stored u64 read back as the loff_t it holds."""
    return value - (1 << 64) if value >> 63 else value


def _s64_text(value: int) -> str:
    v = _s64(value)
    return f"{v:#x}" if v >= 0 else f"-{-v:#x}"


class TraceFormatError(ValueError):
    """A trace file (or array) that is not a valid trace; says where."""


def empty_ops(n: int = 0) -> np.ndarray:
    """``n`` zeroed records with nothing recorded."""
    ops = np.zeros(n, dtype=OP_DTYPE)
    ops["result"] = RESULT_NONE
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
        _validate_records(self.ops, self.meta, lambda i: f"record {i}")

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


def _validate_records(ops: np.ndarray, meta: dict[str, Any], where: Callable[[int], str]) -> None:
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
    bad = is_fd & (ops["attributes"] > np.uint64(_U32))
    if bad.any():
        fail(bad, "a guest_memfd fd must fit in 32 bits")
    bad = (kind == OP_GUEST_MEMFD_FALLOCATE) & (ops["arg"] > np.uint64(_U32))
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


def _check_meta(meta: Any, where: str) -> dict[str, Any]:
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
# binary form


def write_binary(trace: Trace, path: str | os.PathLike[str] | BinaryIO) -> None:
    """Writes the binary form (header, metadata JSON, records)."""
    trace.validate()
    meta = json.dumps(trace.meta, separators=(",", ":"), sort_keys=True).encode()
    pad = (-len(meta)) % 8
    header = _HEADER.pack(MAGIC, VERSION, OP_DTYPE.itemsize, len(meta) + pad, trace.ops.size)
    with _open_write(path) as f:
        f.write(header)
        f.write(meta + b" " * pad)
        f.write(np.ascontiguousarray(trace.ops).tobytes())


def read_binary(path: str | os.PathLike[str] | BinaryIO) -> Trace:
    """Reads and validates the binary form."""
    with _open_read(path) as f:
        data = f.read()
    return parse_binary(data, _display_name(path))


def parse_binary(data: bytes, name: str = "<trace>") -> Trace:
    if len(data) < _HEADER.size:
        raise TraceFormatError(f"{name}: byte offset 0: file too short for a trace header")
    magic, version, rec_size, meta_len, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise TraceFormatError(f"{name}: byte offset 0: bad magic {magic!r} (want {MAGIC!r})")
    if version != VERSION:
        raise TraceFormatError(f"{name}: byte offset 8: unsupported version {version}")
    if rec_size != OP_DTYPE.itemsize:
        raise TraceFormatError(
            f"{name}: byte offset 10: record size {rec_size}, want {OP_DTYPE.itemsize}"
        )
    body = _HEADER.size + meta_len
    if meta_len % 8 or body > len(data):
        raise TraceFormatError(f"{name}: byte offset 12: bad metadata length {meta_len}")
    try:
        meta = json.loads(data[_HEADER.size : body].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceFormatError(f"{name}: byte offset {_HEADER.size}: bad metadata JSON: {e}") from None
    meta = _check_meta(meta, f"{name}: byte offset {_HEADER.size}")
    want = count * OP_DTYPE.itemsize
    have = len(data) - body
    if have != want:
        raise TraceFormatError(
            f"{name}: byte offset {body}: header says {count} records ({want} bytes), "
            f"file has {have} bytes of records"
        )
    ops = np.frombuffer(data, dtype=OP_DTYPE, count=count, offset=body).copy()
    _validate_records(
        ops,
        meta,
        lambda i: f"{name}: record {i} at byte offset {body + i * OP_DTYPE.itemsize}",
    )
    return Trace(ops, meta)


# --------------------------------------------------------------------------
# text form


def _result_text(result: int) -> str:
    if result == RESULT_NONE:
        return ""
    if result < 0:
        name = errno_mod.errorcode.get(-result)
        return f" -> -{name}" if name else f" -> {result}"
    return f" -> {result}"


def _access_text(flags: int) -> str:
    parts = ["private" if flags & FLAG_PRIVATE else "shared", "write" if flags & FLAG_WRITE else "read"]
    if flags & FLAG_CONVERT:
        parts.append("convert")
    if flags & FLAG_DISCARD:
        parts.append("discard")
    return ",".join(parts)


def iter_text_lines(trace: Trace) -> Iterator[str]:
    """The text form, line by line (newline not included)."""
    trace.validate()
    meta = {k: v for k, v in trace.meta.items() if k != "regions"}
    yield TEXT_HEADER
    yield "# meta " + json.dumps(meta, separators=(",", ":"), sort_keys=True)
    regions = trace.meta["regions"]
    cols = [trace.ops[f].tolist() for f in ("kind", "gpa", "size", "attributes", "arg", "result", "flags", "aux")]
    for kind, gpa, size, attributes, arg, result, flags, aux in zip(*cols):
        if kind == OP_SET_MEMORY_ATTRIBUTES:
            line = f"set_memory_attributes gpa={gpa:#x} size={size:#x} attributes={attributes:#x} flags={arg:#x}"
        elif kind == OP_FAULT:
            line = f"fault gpa={gpa:#x} access={_access_text(flags)}"
        elif kind == OP_CREATE_GUEST_MEMFD:
            line = f"create_guest_memfd size={size:#x} flags={arg:#x}"
        elif kind == OP_GUEST_MEMFD_FALLOCATE:
            line = (
                f"guest_memfd_fallocate fd={attributes} mode={arg:#x} "
                f"offset={_s64_text(gpa)} len={_s64_text(size)}"
            )
        elif kind == OP_GUEST_MEMFD_CLOSE:
            line = f"guest_memfd_close fd={attributes}"
        else:
            slot, uaddr, gmem = regions[aux]
            line = (
                f"set_user_memory_region slot={slot} gpa={gpa:#x} size={size:#x} uaddr={uaddr:#x} "
                f"flags={attributes:#x} guest_memfd={gmem} offset={arg:#x}"
            )
        yield line + _result_text(result)


def write_text(trace: Trace, path: str | os.PathLike[str] | io.TextIOBase) -> None:
    """Writes the text form."""
    if isinstance(path, (str, os.PathLike)):
        with open(path, "w", encoding="utf-8") as f:
            for line in iter_text_lines(trace):
                f.write(line + "\n")
    else:
        for line in iter_text_lines(trace):
            path.write(line + "\n")


_FIELDS: dict[str, tuple[str, ...]] = {
    "set_memory_attributes": ("gpa", "size", "attributes", "flags"),
    "fault": ("gpa", "access"),
    "create_guest_memfd": ("size", "flags"),
    "set_user_memory_region": ("slot", "gpa", "size", "uaddr", "flags", "guest_memfd", "offset"),
    "guest_memfd_fallocate": ("fd", "mode", "offset", "len"),
    "guest_memfd_close": ("fd",),
}
_OPTIONAL = {"flags"}


def _parse_int(text: str, lo: int, hi: int, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ValueError(f"{what}: {value} out of range [{lo}, {hi}]")
    return value


def _parse_result(text: str) -> int:
    text = text.strip()
    if text.startswith("-E") and text[1:].isidentifier():
        code = getattr(errno_mod, text[1:], None)
        if not isinstance(code, int):
            raise ValueError(f"unknown errno name {text[1:]!r}")
        return -code
    return _parse_int(text, -(1 << 31) + 1, (1 << 31) - 1, "result")


def parse_text(lines: Iterator[str] | list[str], name: str = "<trace>") -> Trace:
    """Parses the text form; errors name the line number (1-based)."""
    records: list[tuple[int, int, int, int, int, int, int, int]] = []
    regions: list[list[int]] = []
    meta: dict[str, Any] = {}
    seen_header = False
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f"{name} line {lineno}"
        if not seen_header:
            if line != TEXT_HEADER:
                raise TraceFormatError(f"{where}: expected {TEXT_HEADER!r}, got {line[:60]!r}")
            seen_header = True
            continue
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("# meta "):
                try:
                    meta = json.loads(line[len("# meta ") :])
                except json.JSONDecodeError as e:
                    raise TraceFormatError(f"{where}: bad metadata JSON: {e}") from None
                meta = _check_meta(meta, where)
            continue
        try:
            records.append(_parse_op_line(line, regions))
        except ValueError as e:
            raise TraceFormatError(f"{where}: {e}") from None
    if not seen_header:
        raise TraceFormatError(f"{name} line 1: empty file, expected {TEXT_HEADER!r}")
    ops = empty_ops(len(records))
    if records:
        cols = list(zip(*records))
        for fname, col in zip(("kind", "gpa", "size", "attributes", "arg", "result", "flags", "aux"), cols):
            ops[fname] = np.array(col, dtype=OP_DTYPE[fname])
    meta = dict(meta)
    meta["regions"] = regions
    trace = Trace(ops, meta)
    trace.validate()
    return trace


def _parse_op_line(line: str, regions: list[list[int]]) -> tuple[int, int, int, int, int, int, int, int]:
    body, arrow, result_text = line.partition("->")
    result = _parse_result(result_text) if arrow else RESULT_NONE
    words = body.split()
    op = words[0]
    if op not in _FIELDS:
        raise ValueError(f"unknown operation {op!r}")
    args: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq:
            raise ValueError(f"expected key=value, got {word!r}")
        if key not in _FIELDS[op]:
            raise ValueError(f"unknown field {key!r} for {op}")
        if key in args:
            raise ValueError(f"duplicate field {key!r}")
        args[key] = value
    missing = [k for k in _FIELDS[op] if k not in args and k not in _OPTIONAL]
    if missing:
        raise ValueError(f"{op}: missing field {missing[0]!r}")

    def u64(key: str) -> int:
        return _parse_int(args.get(key, "0"), 0, _U64, key)

    if op == "set_memory_attributes":
        return (OP_SET_MEMORY_ATTRIBUTES, u64("gpa"), u64("size"), u64("attributes"), u64("flags"), result, 0, 0)
    if op == "fault":
        flags = 0
        access = args["access"].split(",")
        for word in access:
            if word == "private":
                flags |= FLAG_PRIVATE
            elif word == "write":
                flags |= FLAG_WRITE
            elif word == "convert":
                flags |= FLAG_CONVERT
            elif word == "discard":
                flags |= FLAG_DISCARD
            elif word not in ("shared", "read"):
                raise ValueError(f"unknown access {word!r} (private|shared, read|write, convert, discard)")
        if ("private" in access and "shared" in access) or ("read" in access and "write" in access):
            raise ValueError(f"contradictory access {args['access']!r}")
        return (OP_FAULT, u64("gpa"), 0, 0, 0, result, flags, 0)
    if op == "create_guest_memfd":
        return (OP_CREATE_GUEST_MEMFD, 0, u64("size"), 0, u64("flags"), result, 0, 0)
    if op == "guest_memfd_fallocate":
        fd = _parse_int(args["fd"], 0, _U32, "fd")
        mode = _parse_int(args["mode"], 0, _U32, "mode")
        offset = _parse_int(args["offset"], -(1 << 63), (1 << 63) - 1, "offset") & _U64
        length = _parse_int(args["len"], -(1 << 63), (1 << 63) - 1, "len") & _U64
        return (OP_GUEST_MEMFD_FALLOCATE, offset, length, fd, mode, result, 0, 0)
    if op == "guest_memfd_close":
        return (OP_GUEST_MEMFD_CLOSE, 0, 0, _parse_int(args["fd"], 0, _U32, "fd"), 0, result, 0, 0)
    if len(regions) > 0xFFFF:
        raise ValueError("more than 65536 set_user_memory_region operations")
    slot = _parse_int(args["slot"], 0, (1 << 32) - 1, "slot")
    gmem = _parse_int(args["guest_memfd"], -(1 << 31), (1 << 31) - 1, "guest_memfd")
    regions.append([slot, u64("uaddr"), gmem])
    return (
        OP_SET_USER_MEMORY_REGION,
        u64("gpa"),
        u64("size"),
        _parse_int(args.get("flags", "0"), 0, (1 << 32) - 1, "flags"),
        u64("offset"),
        result,
        0,
        len(regions) - 1,
    )


def read_text(path: str | os.PathLike[str]) -> Trace:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            return parse_text(f, _display_name(path))
        except UnicodeDecodeError as e:
            raise TraceFormatError(f"{_display_name(path)}: not UTF-8 text: {e}") from None


# --------------------------------------------------------------------------
# files


def write(trace: Trace, path: str | os.PathLike[str], text: bool | None = None) -> None:
    """Writes ``trace``; text form if ``text`` or the name ends in .txt."""
    if text is None:
        text = str(path).endswith(".txt")
    (write_text if text else write_binary)(trace, path)


def read(path: str | os.PathLike[str]) -> Trace:
    """Reads either form, told apart by the first bytes."""
    with open(path, "rb") as f:
        head = f.read(len(TEXT_HEADER))
    if head.startswith(MAGIC):
        return read_binary(path)
    if head.startswith(b"#"):
        return read_text(path)
    raise TraceFormatError(
        f"{_display_name(path)}: byte offset 0: neither a binary trace ({MAGIC!r}) "
        f"nor a text trace ({TEXT_HEADER!r})"
    )


def is_trace_file(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(TEXT_HEADER))
    except OSError:
        return False
    return head.startswith(MAGIC) or head == TEXT_HEADER.encode()


def _display_name(path: object) -> str:
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return str(getattr(path, "name", "<trace>"))


class _open_write:
    def __init__(self, path: str | os.PathLike[str] | BinaryIO) -> None:
        self.path = path
        self.f: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        if isinstance(self.path, (str, os.PathLike)):
            self.f = open(self.path, "wb")
            return self.f
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()


class _open_read(_open_write):
    def __enter__(self) -> BinaryIO:
        if isinstance(self.path, (str, os.PathLike)):
            self.f = open(self.path, "rb")
            return self.f
        return self.path


# --------------------------------------------------------------------------
# recording


class Recorder:
    """Wraps a Vm; records every call made through it, with its result.

    Use it in place of the Vm (other attributes pass through)::

        rec = Recorder(memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM))
        fd = rec.create_guest_memfd(1 << 30)
        rec.set_user_memory_region(0, 0, 1 << 30, 0x7000_0000_0000,
                                   memattr.KVM_MEM_GUEST_MEMFD, fd, 0)
        rec.set_memory_attributes(0, 1 << 30, memattr.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        trace = rec.trace()

    Calls that raise are recorded with ``-errno`` and re-raised. A Vm's
    ``ioctl(KVM_SET_MEMORY_ATTRIBUTES, ...)`` made through the recorder is
    recorded as a set; other ioctls pass through unrecorded.
    """

    def __init__(self, vm: Any, meta: dict[str, Any] | None = None) -> None:
        self._vm = vm
        self._rows: list[tuple[int, int, int, int, int, int, int, int]] = []
        self._regions: list[list[int]] = []
        self._meta = dict(meta or {})
        self._meta.setdefault("vm_type", int(getattr(vm, "vm_type", 0)))
        self._meta.setdefault("vm_kwargs", {})
        self._meta.setdefault("name", "recorded")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)

    @property
    def vm(self) -> Any:
        return self._vm

    def _call(self, row: list[int], fn: Callable[[], Any], ok: Callable[[Any], int]) -> Any:
        try:
            value = fn()
        except OSError as e:
            row[5] = -(e.errno or 0)
            self._rows.append(tuple(row))  # type: ignore[arg-type]
            raise
        row[5] = ok(value)
        self._rows.append(tuple(row))  # type: ignore[arg-type]
        return value

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        row = [OP_SET_MEMORY_ATTRIBUTES, address & _U64, size & _U64, attributes & _U64, flags & _U64, 0, 0, 0]
        return self._call(row, lambda: self._vm.set_memory_attributes(address, size, attributes, flags), lambda _: 0)

    def fault(self, gpa: int, private: bool = False, write: bool = False) -> int:
        flags = (FLAG_PRIVATE if private else 0) | (FLAG_WRITE if write else 0)
        row = [OP_FAULT, gpa & _U64, 0, 0, 0, 0, flags, 0]
        return self._call(row, lambda: self._vm.fault(gpa, private=private, write=write), int)

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        row = [OP_CREATE_GUEST_MEMFD, 0, size & _U64, 0, flags & _U64, 0, 0, 0]
        return self._call(row, lambda: self._vm.create_guest_memfd(size, flags), int)

    def guest_memfd_fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        row = [OP_GUEST_MEMFD_FALLOCATE, int(offset) & _U64, int(length) & _U64, int(fd) & _U32, int(mode) & _U64, 0, 0, 0]
        return self._call(row, lambda: self._vm.guest_memfd_fallocate(fd, mode, offset, length), lambda _: 0)

    def guest_memfd_close(self, fd: int) -> None:
        row = [OP_GUEST_MEMFD_CLOSE, 0, 0, int(fd) & _U32, 0, 0, 0, 0]
        return self._call(row, lambda: self._vm.guest_memfd_close(fd), lambda _: 0)

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        flags: int = 0,
        guest_memfd: int = -1,
        guest_memfd_offset: int = 0,
    ) -> None:
        if len(self._regions) > 0xFFFF:
            raise OverflowError("a trace holds at most 65536 set_user_memory_region calls")
        self._regions.append([int(slot), int(userspace_addr) & _U64, int(guest_memfd)])
        row = [
            OP_SET_USER_MEMORY_REGION,
            guest_phys_addr & _U64,
            memory_size & _U64,
            flags & _U64,
            guest_memfd_offset & _U64,
            0,
            0,
            len(self._regions) - 1,
        ]
        return self._call(
            row,
            lambda: self._vm.set_user_memory_region(
                slot, guest_phys_addr, memory_size, userspace_addr, flags, guest_memfd, guest_memfd_offset
            ),
            lambda _: 0,
        )

    def ioctl(self, request: int, arg: Any = 0) -> Any:
        import memattr

        if request != getattr(memattr, "KVM_SET_MEMORY_ATTRIBUTES", None):
            return self._vm.ioctl(request, arg)
        attrs = memattr.kvm_memory_attributes.from_buffer_copy(bytes(arg))
        row = [
            OP_SET_MEMORY_ATTRIBUTES,
            int(attrs.address),
            int(attrs.size),
            int(attrs.attributes),
            int(attrs.flags),
            0,
            0,
            0,
        ]
        return self._call(row, lambda: self._vm.ioctl(request, arg), lambda _: 0)

    def trace(self) -> Trace:
        """What was recorded so far, as a Trace."""
        ops = empty_ops(len(self._rows))
        if self._rows:
            cols = list(zip(*self._rows))
            for fname, col in zip(("kind", "gpa", "size", "attributes", "arg", "result", "flags", "aux"), cols):
                ops[fname] = np.array(col, dtype=OP_DTYPE[fname])
        meta = dict(self._meta)
        meta["regions"] = [list(r) for r in self._regions]
        return Trace(ops, meta)


# --------------------------------------------------------------------------
# replay


@dataclass
class ReplayResult:
    """What a replay did. ``errors`` counts failed calls by errno name."""

    ops: int = 0
    sets: int = 0
    faults: int = 0
    fault_exits: int = 0  # KVM_EXIT_MEMORY_FAULT seen (each attempt)
    implicit_conversions: int = 0  # conversions the replayer made on an exit
    errors: dict[str, int] = field(default_factory=dict)
    mismatches: int = 0  # results differing from the recorded ones
    first_mismatch: str | None = None
    seconds: float = 0.0  # wall clock
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
    trace: Trace,
    vm: Any,
    *,
    check: bool = False,
    progress: Callable[[int], None] | None = None,
    chunk: int = 8192,
    engine: str = "auto",
    keep_results: bool = False,
) -> ReplayResult:
    """Runs every operation of ``trace`` on ``vm`` (a Vm or a Recorder).

    Failing calls are counted, not raised: a trace may hold calls that fail
    on purpose. With ``check``, results that differ from the recorded ones
    are counted in ``mismatches``. ``progress(n)`` is called after every
    ``chunk`` operations with the number just done.

    ``engine``: ``"python"`` makes one Vm call per operation; ``"native"``
    runs SET_MEMORY_ATTRIBUTES and fault operations in native batches
    (:mod:`memattr.batch`: same rules, same state, same counters, without
    the interpreter between operations) and the rest per call, and raises
    ValueError if ``vm`` cannot run batches (a Recorder, hooks, v11
    semantics); ``"auto"`` is native where possible, else python.
    ``ReplayResult.engine`` says which ran. ``keep_results`` keeps every
    operation's result in ``ReplayResult.results``.
    """
    from memattr.batch import batch_blocker

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if type(chunk) is not int or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    # Both engines assume well-formed records (known kinds, fields in range).
    trace.validate()
    blocker = batch_blocker(vm) if engine != "python" else "engine='python'"
    if engine == "native" and blocker is not None:
        raise ValueError(f"engine='native' cannot run on this Vm: {blocker}")
    res = ReplayResult(engine="python" if blocker else "native")
    if keep_results:
        res.results = np.full(len(trace), RESULT_NONE, dtype=np.int64)
    replayer = _Replayer(trace, vm, res)
    store = getattr(vm, "store", None)
    phases = trace.phases or [("all", 0, len(trace))]
    ops = trace.ops
    t_all = time.perf_counter()
    cpu_all = time.process_time()
    for phase, start, end in phases:
        t0 = time.perf_counter()
        for lo in range(start, end, chunk):
            hi = min(end, lo + chunk)
            part = ops[lo:hi]
            if blocker is None:
                got = replayer.run_native(part)
            else:
                got = replayer.run_python(part)
            if res.results is not None:
                res.results[lo:hi] = got
            if check:
                recorded = part["result"].astype(np.int64)
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
            res.ops += hi - lo
            if progress is not None:
                progress(hi - lo)
            if store is not None:
                res.peak_memory = max(res.peak_memory, int(store.memory_bytes()))
        res.phase_seconds[phase] = res.phase_seconds.get(phase, 0.0) + time.perf_counter() - t0
        if store is not None:
            res.phase_memory[phase] = int(store.memory_bytes())
    res.seconds = time.perf_counter() - t_all
    res.cpu_seconds = time.process_time() - cpu_all
    return res


_COLUMNS = ("kind", "gpa", "size", "attributes", "arg", "result", "flags", "aux")


class _Replayer:
    """One replay's state: the Vm, the tally, and recorded-to-live fds."""

    def __init__(self, trace: Trace, vm: Any, res: ReplayResult) -> None:
        self.vm = vm
        self.res = res
        self.regions = trace.meta["regions"]
        self.fd_map: dict[int, int] = {}

    def fail(self, e: OSError) -> int:
        name = _errname(e.errno)
        errors = self.res.errors
        errors[name] = errors.get(name, 0) + 1
        return -(e.errno or 0)

    def run_python(self, part: np.ndarray) -> np.ndarray:
        """One Vm call per operation; returns the results."""
        got = np.empty(len(part), dtype=np.int64)
        cols = [part[f].tolist() for f in _COLUMNS]
        for i, row in enumerate(zip(*cols)):
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
                row = [part[f][i].item() for f in _COLUMNS]
                got[i] = self.run_one(*row)
                i += 1
        return got

    def run_one(
        self, kind: int, gpa: int, size: int, attributes: int, arg: int, recorded: int, flags: int, aux: int
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
                return self.fail(e)
            if recorded != RESULT_NONE and recorded >= 0:
                self.fd_map[recorded] = fd
                return int(recorded)  # fds are compared through the map
            return fd
        if kind == OP_GUEST_MEMFD_FALLOCATE:
            try:
                vm.guest_memfd_fallocate(self.fd_map.get(attributes, attributes), arg, _s64(gpa), _s64(size))
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
            return self.fail(e)

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
        from memattr.errors import MemoryFault

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


def apply_to_store(trace: Trace, store: Any) -> int:
    """Applies the trace's attribute changes straight to a bare store.

    Only SET_MEMORY_ATTRIBUTES operations that succeeded (recorded result 0)
    or were never run (generated traces: :data:`RESULT_NONE`, flags 0) are
    applied, in order, as gfn ranges: the kernel stores attributes for the
    whole range whether or not memslots cover it. Faults, memslots and
    failed calls are skipped. Uses the store's batch ``set_many`` when it has
    one. Returns the number of ranges applied.
    """
    ops = trace.ops
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
        i = int(np.flatnonzero(sel)[np.flatnonzero(~ok)[0]])
        raise TraceFormatError(f"record {i}: a set that would fail validation is marked as applied")
    starts = gpa >> np.uint64(PAGE_SHIFT)
    ends = end >> np.uint64(PAGE_SHIFT)
    values = chosen["attributes"]
    if hasattr(store, "set_many"):
        store.set_many(np.ascontiguousarray(starts), np.ascontiguousarray(ends), np.ascontiguousarray(values))
    else:
        for s, e, v in zip(starts.tolist(), ends.tolist(), values.tolist()):
            store.set_range(s, e, v)
    return int(chosen.size)


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
