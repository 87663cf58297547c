"""The binary trace form (``.trace``): write, read and validate.

All little endian::

    offset  size  field
    0       8     magic b"MEMATTRT"
    8       2     version (1)
    10      2     record size (40)
    12      4     metadata length M (bytes of UTF-8 JSON)
    16      8     record count N
    24      M     metadata JSON, then space padding to a multiple of 8
    24+M'   40*N  records: u64 gpa, u64 size, u64 attributes, u64 arg,
                  i32 result, u8 kind, u8 flags, u16 aux

A malformed file is rejected with :class:`memattr.trace_format.TraceFormatError`
naming the byte offset (and the record, for a bad record).
"""

from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO

import numpy as np

from memattr.trace_format import OP_DTYPE, Trace, TraceFormatError, check_meta, display_name, validate_records

MAGIC = b"MEMATTRT"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQ")


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
    return parse_binary(data, display_name(path))


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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TraceFormatError(f"{name}: byte offset {_HEADER.size}: bad metadata JSON: {e}") from None
    meta = check_meta(meta, f"{name}: byte offset {_HEADER.size}")
    want = count * OP_DTYPE.itemsize
    have = len(data) - body
    if have != want:
        raise TraceFormatError(
            f"{name}: byte offset {body}: header says {count} records ({want} bytes), "
            f"file has {have} bytes of records"
        )
    ops = np.frombuffer(data, dtype=OP_DTYPE, count=count, offset=body).copy()
    validate_records(
        ops,
        meta,
        lambda i: f"{name}: record {i} at byte offset {body + i * OP_DTYPE.itemsize}",
    )
    return Trace(ops, meta)


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
