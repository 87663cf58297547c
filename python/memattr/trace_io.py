"""Trace files in either form: :func:`write` picks the form from the name,
:func:`read` from the first bytes."""

from __future__ import annotations

import os

from memattr.trace_binary import MAGIC, read_binary, write_binary
from memattr.trace_format import Trace, TraceFormatError, display_name
from memattr.trace_text import TEXT_HEADER, TEXT_HEADERS, read_text, write_text

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
        f"{display_name(path)}: byte offset 0: neither a binary trace ({MAGIC!r}) "
        f"nor a text trace ({TEXT_HEADER!r})"
    )


def is_trace_file(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(TEXT_HEADER))
    except OSError:
        return False
    return head.startswith(MAGIC) or head in (h.encode() for h in TEXT_HEADERS)
