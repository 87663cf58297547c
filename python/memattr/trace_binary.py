"""The binary trace form (``.trace``): write, read and validate.

All little endian. Version 2 (written)::

    offset  size  field
    0       8     magic b"MEMATTRT"
    8       2     version (2)
    10      2     record size (40)
    12      4     metadata length M (bytes of UTF-8 JSON, padded)
    16      8     record count N
    24      4     records CRC-32 (zlib.crc32 of the 40*N record bytes)
    28      4     header CRC-32 (zlib.crc32 of bytes 0..28, then the M
                  metadata bytes)
    32      M     metadata JSON, then space padding to a multiple of 8
    32+M    40*N  records: u64 gpa, u64 size, u64 attributes, u64 arg,
                  i32 result, u8 kind, u8 flags, u16 aux

Version 1 (still read) is the same without the two CRC fields (the
metadata starts at offset 24) and so carries no checksum: a flipped byte
in a record is a different valid trace. Version 2's checksums make every
damage to the header, the metadata or the records an error. Both CRCs are
sums of the bytes in order, so a file is written and read chunk by chunk
(:mod:`memattr.stream`) without ever holding the whole trace.

A malformed file is rejected with :class:`memattr.trace_format.TraceFormatError`
naming the byte offset (and the record, for a bad record).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from memattr.trace_format import OP_DTYPE, Trace, TraceFormatError, check_meta, display_name, validate_records

MAGIC = b"MEMATTRT"
VERSION = 2
VERSIONS = (1, 2)
_HEADER = struct.Struct("<8sHHIQ")  # v1, and the first 24 bytes of v2
_HEADER_V2 = struct.Struct("<8sHHIQII")
_CRCS = struct.Struct("<II")


@dataclass
class Header:
    """What a binary trace's header says, checked against the file."""

    version: int
    meta: dict[str, Any]
    count: int
    body: int  # byte offset of the first record
    records_crc: int | None  # None for v1: nothing to verify

    def check_records_crc(self, crc: int, name: str) -> None:
        """TraceFormatError unless ``crc`` (of all the record bytes, read
        in order) is what the header says."""
        if self.records_crc is not None and crc != self.records_crc:
            raise TraceFormatError(
                f"{name}: byte offset {self.body}: records checksum mismatch "
                f"(CRC-32 {crc:#010x}, header says {self.records_crc:#010x}): "
                "the records are damaged"
            )


def pack_header(meta: bytes, count: int, records_crc: int) -> bytes:
    """The v2 header for padded ``meta`` bytes and ``count`` records whose
    bytes have CRC-32 ``records_crc``; the metadata follows it."""
    if len(meta) % 8:
        raise ValueError("the metadata must be padded to a multiple of 8 bytes")
    first = _HEADER.pack(MAGIC, VERSION, OP_DTYPE.itemsize, len(meta), count) + struct.pack("<I", records_crc)
    return first + struct.pack("<I", zlib.crc32(meta, zlib.crc32(first)))


def padded_meta(meta: dict[str, Any], room: int = 0) -> bytes:
    """The metadata JSON padded with spaces to a multiple of 8 bytes (and
    to at least ``room`` bytes)."""
    text = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    size = max(len(text), room)
    size += (-size) % 8
    return text + b" " * (size - len(text))


def read_header(f: BinaryIO, name: str, size: int) -> Header:
    """Reads and checks the header and metadata of a binary trace of
    ``size`` bytes from ``f`` (positioned at 0); leaves ``f`` at the first
    record. The header CRC (v2) is checked before the metadata is parsed."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise TraceFormatError(f"{name}: byte offset 0: file too short for a trace header")
    magic, version, rec_size, meta_len, count = _HEADER.unpack(head)
    if magic != MAGIC:
        raise TraceFormatError(f"{name}: byte offset 0: bad magic {magic!r} (want {MAGIC!r})")
    if version not in VERSIONS:
        raise TraceFormatError(f"{name}: byte offset 8: unsupported version {version}")
    if rec_size != OP_DTYPE.itemsize:
        raise TraceFormatError(f"{name}: byte offset 10: record size {rec_size}, want {OP_DTYPE.itemsize}")
    records_crc: int | None = None
    start = _HEADER.size
    head_crc = 0
    if version >= 2:
        crcs = f.read(_CRCS.size)
        if len(crcs) < _CRCS.size:
            raise TraceFormatError(f"{name}: byte offset {_HEADER.size}: file too short for a v2 trace header")
        records_crc, head_crc = _CRCS.unpack(crcs)
        start = _HEADER_V2.size
    if meta_len % 8 or start + meta_len > size:
        raise TraceFormatError(f"{name}: byte offset 12: bad metadata length {meta_len}")
    raw = f.read(meta_len)
    if len(raw) != meta_len:
        raise TraceFormatError(f"{name}: byte offset 12: bad metadata length {meta_len}")
    if version >= 2:
        crc = zlib.crc32(raw, zlib.crc32(head + crcs[:4]))
        if crc != head_crc:
            raise TraceFormatError(
                f"{name}: byte offset 28: header checksum mismatch (CRC-32 {crc:#010x}, "
                f"header says {head_crc:#010x}): the header or the metadata is damaged"
            )
    try:
        meta = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TraceFormatError(f"{name}: byte offset {start}: bad metadata JSON: {e}") from None
    meta = check_meta(meta, f"{name}: byte offset {start}")
    body = start + meta_len
    want = count * OP_DTYPE.itemsize
    if size - body != want:
        raise TraceFormatError(
            f"{name}: byte offset {body}: header says {count} records ({want} bytes), "
            f"file has {size - body} bytes of records"
        )
    return Header(version, meta, count, body, records_crc)


def write_binary(trace: Trace, path: str | os.PathLike[str] | BinaryIO) -> None:
    """Writes the binary form, version 2 (header, metadata JSON, records)."""
    trace.validate()
    meta = padded_meta(trace.meta)
    records = np.ascontiguousarray(trace.ops).tobytes()
    with _open_write(path) as f:
        f.write(pack_header(meta, trace.ops.size, zlib.crc32(records)))
        f.write(meta)
        f.write(records)


def read_binary(path: str | os.PathLike[str] | BinaryIO) -> Trace:
    """Reads and validates the binary form (either version)."""
    with _open_read(path) as f:
        data = f.read()
    return parse_binary(data, display_name(path))


def parse_binary(data: bytes, name: str = "<trace>") -> Trace:
    h = read_header(io.BytesIO(data), name, len(data))
    view = memoryview(data)[h.body :]
    h.check_records_crc(zlib.crc32(view), name)
    ops = np.frombuffer(data, dtype=OP_DTYPE, count=h.count, offset=h.body).copy()
    validate_records(
        ops,
        h.meta,
        lambda i: f"{name}: record {i} at byte offset {h.body + i * OP_DTYPE.itemsize}",
    )
    return Trace(ops, h.meta)


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
