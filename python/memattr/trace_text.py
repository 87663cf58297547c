"""The text trace form (``.txt``): write, parse and validate.

One operation per line, ``#`` comments::

    # memattr trace v2
    # meta {"vm_type": 1, "regions": [[0, 123145302310912, 3]], ...}
    create_guest_memfd size=0x80000000 flags=0x0 -> 3
    set_user_memory_region slot=0 gpa=0x0 size=0x80000000 uaddr=0x7000... flags=0x4 guest_memfd=3 offset=0x0 -> 0
    set_memory_attributes gpa=0x0 size=0x80000000 attributes=0x8 flags=0x0 -> 0
    fault gpa=0x1000 access=private,write,convert -> 2
    fault gpa=0x2000 access=shared,read -> -EFAULT
    guest_memfd_fallocate fd=3 mode=0x3 offset=0x0 len=0x200000 -> 0
    guest_memfd_close fd=3 -> 0

    # end records=7 crc32=0x...  (CRC-32 of the lines above, header excluded)

(``-> ...`` is omitted when nothing was recorded; ``set_user_memory_region``
lines carry every argument, so text traces need no regions table.)

Version 2 ends with ``# end records=N crc32=C``: the number of operation
lines and the CRC-32 of every non-empty line between the header and the end
line (each stripped, with a newline), so a truncated or damaged file is an
error instead of a different trace. Version 1 files (no end line) are still
read.

The parser rejects a malformed file with
:class:`memattr.trace_format.TraceFormatError`, whose message names the line.
"""

from __future__ import annotations

import errno as errno_mod
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from typing import Any

from memattr.trace_format import (
    COLUMNS,
    FLAG_CONVERT,
    FLAG_DISCARD,
    FLAG_PRIVATE,
    FLAG_WRITE,
    OP_CREATE_GUEST_MEMFD,
    OP_FAULT,
    OP_GUEST_MEMFD_CLOSE,
    OP_GUEST_MEMFD_FALLOCATE,
    OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2,
    OP_SET_MEMORY_ATTRIBUTES,
    OP_SET_USER_MEMORY_REGION,
    RESULT_NONE,
    Trace,
    TraceFormatError,
    check_meta,
    display_name,
    ops_from_rows,
    s64,
)
from memattr.uapi import S32_MAX, S32_MIN, S64_MAX, S64_MIN, U32_MAX, U64_MAX

TEXT_HEADER = "# memattr trace v2"
TEXT_HEADER_V1 = "# memattr trace v1"
TEXT_HEADERS = (TEXT_HEADER, TEXT_HEADER_V1)
_END = re.compile(r"# end records=(\d+) crc32=0x([0-9a-f]{8})")


def _s64_text(value: int) -> str:
    v = s64(value)
    return f"{v:#x}" if v >= 0 else f"-{-v:#x}"


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
    crc = 0
    count = 0
    meta_line = "# meta " + json.dumps(meta, separators=(",", ":"), sort_keys=True)
    crc = zlib.crc32((meta_line + "\n").encode(), crc)
    yield meta_line
    for line in _op_lines(trace):
        crc = zlib.crc32((line + "\n").encode(), crc)
        count += 1
        yield line
    yield f"# end records={count} crc32={crc:#010x}"


def _op_lines(trace: Trace) -> Iterator[str]:
    regions = trace.meta["regions"]
    cols = [trace.ops[f].tolist() for f in COLUMNS]
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
        elif kind == OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2:
            line = (
                f"guest_memfd_set_memory_attributes2 fd={attributes} offset={gpa:#x} size={size:#x} "
                f"attributes={arg:#x} flags={aux:#x}"
            )
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
    "guest_memfd_set_memory_attributes2": ("fd", "offset", "size", "attributes", "flags"),
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
    return _parse_int(text, RESULT_NONE + 1, S32_MAX, "result")


def parse_text(lines: Iterator[str] | list[str], name: str = "<trace>") -> Trace:
    """Parses the text form; errors name the line number (1-based)."""
    records: list[tuple[int, int, int, int, int, int, int, int]] = []
    regions: list[list[int]] = []
    meta: dict[str, Any] = {}
    seen_header = False
    version = 0
    crc = 0
    ended = False
    lineno = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f"{name} line {lineno}"
        if not seen_header:
            if line not in TEXT_HEADERS:
                raise TraceFormatError(f"{where}: expected {TEXT_HEADER!r} (or v1), got {line[:60]!r}")
            seen_header = True
            version = 2 if line == TEXT_HEADER else 1
            continue
        if not line:
            continue
        if ended:
            raise TraceFormatError(f"{where}: text after the end line")
        if version == 2:
            end = _END.fullmatch(line)
            if end is not None:
                want_n, want_crc = int(end.group(1)), int(end.group(2), 16)
                if want_n != len(records):
                    raise TraceFormatError(
                        f"{where}: the end line says {want_n} records, the file has {len(records)}"
                    )
                if want_crc != crc:
                    raise TraceFormatError(
                        f"{where}: checksum mismatch (end line crc32={want_crc:#010x}, "
                        f"lines give {crc:#010x}): the file was changed or damaged"
                    )
                ended = True
                continue
            if line.startswith("# end"):
                raise TraceFormatError(f"{where}: malformed end line {line[:60]!r}")
            crc = zlib.crc32((line + "\n").encode(), crc)
        if line.startswith("#"):
            if line.startswith("# meta "):
                try:
                    meta = json.loads(line[len("# meta ") :])
                except (json.JSONDecodeError, RecursionError) as e:
                    raise TraceFormatError(f"{where}: bad metadata JSON: {e or 'nested too deeply'}") from None
                meta = check_meta(meta, where)
            continue
        try:
            records.append(_parse_op_line(line, regions))
        except ValueError as e:
            raise TraceFormatError(f"{where}: {e}") from None
    if not seen_header:
        raise TraceFormatError(f"{name} line 1: empty file, expected {TEXT_HEADER!r}")
    if version == 2 and not ended:
        raise TraceFormatError(
            f"{name} line {lineno}: no end line ('# end records=N crc32=...'): the file is truncated"
        )
    ops = ops_from_rows(records)
    meta = dict(meta)
    meta["regions"] = regions
    trace = Trace(ops, meta)
    trace.validate()
    return trace


def _parse_op_line(line: str, regions: list[list[int]]) -> tuple[int, int, int, int, int, int, int, int]:
    body, arrow, result_text = line.partition("->")
    result = _parse_result(result_text) if arrow else RESULT_NONE
    words = body.split()
    if not words:
        raise ValueError("missing operation name before '->'")
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
        return _parse_int(args.get(key, "0"), 0, U64_MAX, key)

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
        fd = _parse_int(args["fd"], 0, U32_MAX, "fd")
        mode = _parse_int(args["mode"], 0, U32_MAX, "mode")
        offset = _parse_int(args["offset"], S64_MIN, S64_MAX, "offset") & U64_MAX
        length = _parse_int(args["len"], S64_MIN, S64_MAX, "len") & U64_MAX
        return (OP_GUEST_MEMFD_FALLOCATE, offset, length, fd, mode, result, 0, 0)
    if op == "guest_memfd_set_memory_attributes2":
        fd = _parse_int(args["fd"], 0, U32_MAX, "fd")
        flags = _parse_int(args.get("flags", "0"), 0, 0xFFFF, "flags")
        return (OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2, u64("offset"), u64("size"), fd, u64("attributes"), result, 0, flags)
    if op == "guest_memfd_close":
        return (OP_GUEST_MEMFD_CLOSE, 0, 0, _parse_int(args["fd"], 0, U32_MAX, "fd"), 0, result, 0, 0)
    if len(regions) > 0xFFFF:
        raise ValueError("more than 65536 set_user_memory_region operations")
    slot = _parse_int(args["slot"], 0, U32_MAX, "slot")
    gmem = _parse_int(args["guest_memfd"], S32_MIN, S32_MAX, "guest_memfd")
    regions.append([slot, u64("uaddr"), gmem])
    return (
        OP_SET_USER_MEMORY_REGION,
        u64("gpa"),
        u64("size"),
        _parse_int(args.get("flags", "0"), 0, U32_MAX, "flags"),
        u64("offset"),
        result,
        0,
        len(regions) - 1,
    )


def read_text(path: str | os.PathLike[str]) -> Trace:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            return parse_text(f, display_name(path))
        except UnicodeDecodeError as e:
            raise TraceFormatError(f"{display_name(path)}: not UTF-8 text: {e}") from None
