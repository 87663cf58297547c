"""Every class of bad trace file the hardening issue (14) found, built from a
good trace: for the CLI test, the fuzz targets and the campaign script."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from memattr import trace as t
from memattr import workloads as w
from memattr.trace_binary import pack_header


def good_trace() -> t.Trace:
    return w.make("boot-and-churn", "1G")


def _binary_with_meta(tr: t.Trace, meta_bytes: bytes, version: int = 2) -> bytes:
    """A binary trace with these metadata bytes, its checksums right (v2),
    so the reader's other checks are what must refuse it."""
    pad = (-len(meta_bytes)) % 8
    meta_bytes += b" " * pad
    records = tr.ops.tobytes()
    if version == 1:
        head = struct.pack("<8sHHIQ", b"MEMATTRT", 1, t.OP_DTYPE.itemsize, len(meta_bytes), tr.ops.size)
    else:
        head = pack_header(meta_bytes, tr.ops.size, zlib.crc32(records))
    return head + meta_bytes + records


def flip(data: bytes, pos: int, bit: int = 1) -> bytes:
    b = bytearray(data)
    b[pos] ^= bit
    return bytes(b)


def record_byte(tr: t.Trace, i: int = 5) -> int:
    """Offset, in the records, of a byte of record ``i``'s gpa whose flip
    (bit 0 of byte 3: 16 MiB) leaves a valid, different record."""
    return i * t.OP_DTYPE.itemsize + 3


def meta_byte(data: bytes) -> int:
    """Offset of a byte of the metadata whose change keeps it valid JSON
    (a letter of the trace's name)."""
    return data.index(b'"name":"') + len(b'"name":"')


def _with_meta(tr: t.Trace, **changes: object) -> bytes:
    meta = dict(tr.meta)
    meta.update(changes)
    return _binary_with_meta(tr, json.dumps(meta).encode())


def bad_files(tmp: Path) -> dict[str, Path]:
    """name -> path of a file that every command must refuse in one line
    (or, for files with valid form but a bad run, fail in one line)."""
    tr = good_trace()
    n = len(tr)
    good_bin = tmp / "good.trace"
    t.write(tr, good_bin)
    good_txt = tmp / "good.txt"
    t.write(tr, good_txt)
    data = good_bin.read_bytes()
    text = good_txt.read_text()
    lines = text.splitlines()
    files: dict[str, bytes] = {
        "empty": b"",
        "random-bytes": bytes(range(256)) * 4,
        "bad-magic": b"MEMATTRX" + data[8:],
        "bad-version": data[:8] + struct.pack("<H", 9) + data[10:],
        "short-header": data[:10],
        "truncated-records": data[:-7],
        "extra-bytes": data + b"\0" * 48,
        # v2's checksums: damage the other checks cannot see.
        "record-byte-flipped": flip(data, len(data) - n * t.OP_DTYPE.itemsize + record_byte(tr)),
        "meta-byte-flipped": flip(data, meta_byte(data)),
        "records-crc-damaged": flip(data, 24),
        "truncated-one-record": data[: -t.OP_DTYPE.itemsize],
        "meta-not-json": _binary_with_meta(tr, b"{not json"),
        "meta-not-object": _binary_with_meta(tr, b"[1, 2]"),
        "meta-deeply-nested": _binary_with_meta(tr, b"[" * 100_000 + b"]" * 100_000),
        "phases-to-2**62": _with_meta(tr, phases=[["all", 0, 1 << 62]]),
        "phases-overlap": _with_meta(tr, phases=[["a", 0, n], ["b", 0, n]]),
        "phases-negative": _with_meta(tr, phases=[["a", -5, n]]),
        "phases-overlong": _with_meta(tr, phases=[["a", 0, n + 1000]]),
        "phases-gap": _with_meta(tr, phases=[["a", 0, 1], ["b", 2, n]]),
        "phases-bool": _with_meta(tr, phases=[["a", False, n]]),
        "vm-kwargs-unknown": _with_meta(tr, vm_kwargs={"colour": "red"}),
        "vm-kwargs-bad-semantics": _with_meta(tr, vm_kwargs={"semantics": 11}),
        "vm-kwargs-not-object": _with_meta(tr, vm_kwargs=[1]),
        "params-not-object": _with_meta(tr, params=[1, 2]),
        "layout-strings": _with_meta(tr, layout={"regions": [["a", "b", "c", "d"]]}),
        "layout-huge": _with_meta(tr, layout={"regions": [[0, 1 << 70, 1, 0]]}),
        "layout-not-object": _with_meta(tr, layout=7),
        "regions-huge-slot": _with_meta(tr, regions=[[1 << 40, 0, -1]] * len(tr.meta["regions"])),
        "vm-type-negative": _with_meta(tr, vm_type=-1),
        "text-arrow-only": (t.TEXT_HEADER_V1 + "\n-> 0\n").encode(),
        "text-truncated": "\n".join(lines[:-3]).encode(),
        "text-no-end-line": "\n".join(lines[:-1]).encode(),
        "text-bad-checksum": "\n".join(lines[:2] + [lines[3], lines[2]] + lines[4:]).encode(),
        "text-not-utf8": (t.TEXT_HEADER + "\n\xff\n").encode("latin-1"),
        "text-unknown-op": (t.TEXT_HEADER_V1 + "\nexplode gpa=0x0\n").encode(),
        "text-header-only-v2": (t.TEXT_HEADER + "\n").encode(),
    }
    # A memslot record whose flags do not fit the uapi's __u32.
    ops = tr.ops.copy()
    region = np.flatnonzero(ops["kind"] == t.OP_SET_USER_MEMORY_REGION)[0]
    ops["attributes"][region] = 1 << 40
    files["memslot-flags-64bit"] = _binary_with_meta(t.Trace(ops, dict(tr.meta)), json.dumps(tr.meta).encode())
    # A bad record kind.
    ops = tr.ops.copy()
    ops["kind"][3] = 200
    files["record-bad-kind"] = _binary_with_meta(t.Trace(ops, dict(tr.meta)), json.dumps(tr.meta).encode())
    out: dict[str, Path] = {}
    for name, blob in files.items():
        p = tmp / f"{name}.{'txt' if name.startswith('text') else 'trace'}"
        p.write_bytes(blob)
        out[name] = p
    return out


# Files whose form is valid but whose run must fail in one line.
RUN_FAILS: dict[str, Callable[[t.Trace], t.Trace]] = {}
