"""Traces in bounded chunks: made, replayed, read and written without ever
holding the whole operation stream.

A :class:`TraceStream` is a trace's metadata (complete up front: VM type,
``Vm(...)`` arguments, the regions table, the workload's parameters) plus a
*source*: a function that, each time it is called, yields ``(phase, ops)``
pairs in order, ``ops`` a numpy array of :data:`memattr.trace.OP_DTYPE`
records of bounded size. Consecutive pairs with one phase name form that
phase. Calling the source again makes the same records again (workloads
regenerate from their seeds; files are read again), so a stream can be
replayed on several stores.

:func:`memattr.trace.replay` takes a :class:`memattr.trace.Trace` or a
stream; either way it runs the records ``chunk`` at a time, so a replay's
memory is that of one chunk plus the Vm's. :func:`memattr.workloads.stream`
makes a named workload as a stream; :func:`open_trace` reads a binary trace
file chunk by chunk (text traces are parsed whole); :func:`write` writes a
stream to a binary file chunk by chunk.

Bound: every array a workload's source yields is at most
:data:`GENERATE_CHUNK` records (the churn generator's time windows may
exceed it by a window's deaths, which are bounded by its births); a replay
slices each further into ``chunk``-sized parts.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memattr.trace_binary import MAGIC, pack_header, padded_meta, read_header
from memattr.trace_format import (
    OP_DTYPE,
    Trace,
    TraceFormatError,
    check_meta,
    check_phases,
    display_name,
    empty_ops,
    validate_records,
)

# Records a workload's source yields at a time (40 MiB of records).
GENERATE_CHUNK = 1 << 20

Source = Callable[[], Iterable[tuple[str, np.ndarray]]]


@dataclass
class TraceStream:
    """A trace as metadata plus a re-callable source of record chunks.

    ``length_hint`` is the number of records if known (progress bars use
    it as their total; None if unknown). ``state`` is where a workload's
    source leaves what it learns by running (e.g. ``"shared"``: the
    :class:`memattr.gpa_ranges.SharedSet` shared at the end), filled once
    the source has run to the end.
    """

    meta: dict[str, Any]
    source: Source
    length_hint: int | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.meta.setdefault("vm_type", 0)
        self.meta.setdefault("vm_kwargs", {})
        self.meta.setdefault("regions", [])
        self.meta.setdefault("phases", [])

    @property
    def vm_type(self) -> int:
        return int(self.meta["vm_type"])

    @property
    def name(self) -> str:
        return str(self.meta.get("name", "trace"))

    def chunks(self, chunk: int = GENERATE_CHUNK) -> Iterator[tuple[str, np.ndarray]]:
        """``(phase, records)`` with at most ``chunk`` records each, every
        one validated against the metadata as it comes."""
        if type(chunk) is not int or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        pos = 0
        for phase, ops in self.source():
            if not isinstance(ops, np.ndarray) or ops.dtype != OP_DTYPE:
                raise TypeError("a stream's source must yield arrays of dtype memattr.trace.OP_DTYPE")
            base = pos
            validate_records(ops, self.meta, lambda i: f"record {base + i}")
            for lo in range(0, ops.size, chunk):
                yield phase, ops[lo : lo + chunk]
            pos += ops.size

    def materialize(self) -> Trace:
        """The whole trace in memory (O(trace): for small guests and tests)."""
        arrays: list[np.ndarray] = []
        phases: list[list[Any]] = []
        pos = 0
        for phase, ops in self.source():
            if phases and phases[-1][0] == phase:
                phases[-1][2] += ops.size
            else:
                phases.append([phase, pos, pos + ops.size])
            arrays.append(ops)
            pos += ops.size
        meta = dict(self.meta)
        meta["phases"] = phases
        return Trace(np.concatenate(arrays) if arrays else empty_ops(), meta)

    @classmethod
    def from_trace(cls, trace: Trace) -> TraceStream:
        """A stream over an in-memory trace (its phases, or all of it)."""
        meta = {k: v for k, v in trace.meta.items() if k != "phases"}

        def source() -> Iterator[tuple[str, np.ndarray]]:
            for name, a, b in trace.phases or [("all", 0, len(trace))]:
                for lo in range(a, b, GENERATE_CHUNK):
                    yield name, trace.ops[lo : min(b, lo + GENERATE_CHUNK)]

        covered = sum(b - a for _, a, b in trace.phases) if trace.phases else len(trace)
        return cls(meta, source, covered)


def as_stream(trace: Trace | TraceStream) -> TraceStream:
    return trace if isinstance(trace, TraceStream) else TraceStream.from_trace(trace)


# --------------------------------------------------------------------------
# binary files, chunk by chunk


def open_trace(path: str | os.PathLike[str]) -> TraceStream:
    """A trace file as a stream: a binary trace is read ``GENERATE_CHUNK``
    records at a time (its header and metadata are checked now, each chunk
    as it is read, and the records' CRC-32 (v2) at the end of every pass:
    a damaged file raises TraceFormatError before the pass ends, so nothing
    that consumes the stream to its end reports numbers from it); any other
    file is read whole (:func:`memattr.trace.read`)."""
    from memattr.trace_io import read

    name = display_name(path)
    with open(path, "rb") as f:
        if not f.read(len(MAGIC)).startswith(MAGIC):
            return TraceStream.from_trace(read(path))
        f.seek(0)
        h = read_header(f, name, os.fstat(f.fileno()).st_size)
    meta, count, body = h.meta, h.count, h.body
    # The same rule as a trace read whole: the phases tile the records, so
    # reading the phases in order reads every record once, in order, which
    # is what the running CRC needs.
    check_phases(meta.get("phases", []), count, name)
    phases = [(str(n), int(a), int(b)) for n, a, b in meta.get("phases", [])] or [("all", 0, count)]
    meta = {k: v for k, v in meta.items() if k != "phases"}

    def source() -> Iterator[tuple[str, np.ndarray]]:
        crc = 0
        with open(path, "rb") as f:
            f.seek(body)
            for phase, a, b in phases:
                for lo in range(a, b, GENERATE_CHUNK):
                    n = min(b, lo + GENERATE_CHUNK) - lo
                    data = f.read(n * OP_DTYPE.itemsize)
                    if len(data) != n * OP_DTYPE.itemsize:
                        raise TraceFormatError(
                            f"{name}: record {lo + len(data) // OP_DTYPE.itemsize} at byte offset "
                            f"{body + lo * OP_DTYPE.itemsize + len(data)}: the file ends early "
                            "(changed since it was opened?)"
                        )
                    crc = zlib.crc32(data, crc)
                    yield phase, np.frombuffer(data, dtype=OP_DTYPE, count=n).copy()
            if f.read(1):
                raise TraceFormatError(f"{name}: byte offset {f.tell() - 1}: bytes after the last record")
        h.check_records_crc(crc, name)

    return TraceStream(meta, source, sum(b - a for _, a, b in phases))


# Room kept in a streamed file's header for the phases table, which is only
# known once the stream has been written.
_META_RESERVE = 1 << 16


def write(stream: TraceStream | Trace, path: str | os.PathLike[str]) -> int:
    """Writes a binary trace (v2) chunk by chunk; returns the record count.
    The header (count, phases, the records' CRC-32 summed chunk by chunk,
    the header's CRC-32) is rewritten once the stream has ended."""
    stream = as_stream(stream)
    meta = dict(stream.meta)
    room = len(padded_meta(meta)) + _META_RESERVE
    room += (-room) % 8
    phases: list[list[Any]] = []
    count = 0
    crc = 0
    with open(path, "wb") as f:
        f.write(b"\0" * (len(pack_header(b"", 0, 0)) + room))
        for phase, ops in stream.chunks():
            if phases and phases[-1][0] == phase:
                phases[-1][2] += ops.size
            else:
                phases.append([phase, count, count + ops.size])
            data = np.ascontiguousarray(ops).tobytes()
            crc = zlib.crc32(data, crc)
            f.write(data)
            count += ops.size
        meta["phases"] = phases
        text = padded_meta(meta, room)
        if len(text) > room:
            raise ValueError(f"{display_name(path)}: {len(phases)} phases do not fit the header's reserve")
        f.seek(0)
        f.write(pack_header(text, count, crc))
        f.write(text)
    return count


__all__ = ["GENERATE_CHUNK", "TraceStream", "as_stream", "open_trace", "write"]
