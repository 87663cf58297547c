"""Operation traces: the in-memory form, two on-disk forms, record and replay.

A trace is a sequence of the calls a VMM makes on a VM fd, as fixed-size
records (a numpy structured array, :data:`OP_DTYPE`), plus a small metadata
dict (VM type, ``Vm(...)`` keyword arguments, the workload's name and
parameters, named phases). Workload generators (:mod:`memattr.workloads`)
produce traces; :class:`Recorder` records one from any :class:`memattr.Vm`;
:func:`replay` runs one on any Vm; :func:`apply_to_store` applies the
attribute changes to a bare store.

This module gathers the trace API in one namespace; each part lives in its
own module:

* :mod:`memattr.trace_format` - the records (operations, flags, the
  :class:`Trace` class), validation and :func:`describe`;
* :mod:`memattr.trace_binary` - the binary form (``.trace``);
* :mod:`memattr.trace_text` - the text form (``.txt``);
* :mod:`memattr.trace_io` - :func:`read` / :func:`write` of either form;
* :mod:`memattr.recorder` - :class:`Recorder`;
* :mod:`memattr.replayer` - :func:`replay` and :func:`apply_to_store`.
"""

from __future__ import annotations

from memattr.recorder import Recorder, UnrecordableCall
from memattr.replayer import ENGINES, ReplayResult, apply_to_store, replay
from memattr.trace_binary import MAGIC, VERSION, parse_binary, read_binary, write_binary
from memattr.trace_format import (
    COLUMNS,
    FAULT_FLAGS,
    FLAG_CONVERT,
    FLAG_DISCARD,
    FLAG_PRIVATE,
    FLAG_WRITE,
    OP_CREATE_GUEST_MEMFD,
    OP_DTYPE,
    OP_FAULT,
    OP_GUEST_MEMFD_CLOSE,
    OP_GUEST_MEMFD_FALLOCATE,
    OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2,
    OP_NAMES,
    OP_SET_MEMORY_ATTRIBUTES,
    OP_SET_USER_MEMORY_REGION,
    PUNCH_HOLE_MODE,
    RESULT_NONE,
    Trace,
    TraceFormatError,
    concat,
    describe,
    empty_ops,
    fault_ops,
    ops_from_rows,
    set_ops,
)
from memattr.trace_io import is_trace_file, read, write
from memattr.trace_text import TEXT_HEADER, TEXT_HEADER_V1, iter_text_lines, parse_text, read_text, write_text

# The kernel constants traces are made of (defined in memattr.uapi).
from memattr.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
)

__all__ = [
    "COLUMNS",
    "ENGINES",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FAULT_FLAGS",
    "FLAG_CONVERT",
    "FLAG_DISCARD",
    "FLAG_PRIVATE",
    "FLAG_WRITE",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "MAGIC",
    "OP_CREATE_GUEST_MEMFD",
    "OP_DTYPE",
    "OP_FAULT",
    "OP_GUEST_MEMFD_CLOSE",
    "OP_GUEST_MEMFD_FALLOCATE",
    "OP_GUEST_MEMFD_SET_MEMORY_ATTRIBUTES2",
    "OP_NAMES",
    "OP_SET_MEMORY_ATTRIBUTES",
    "OP_SET_USER_MEMORY_REGION",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PUNCH_HOLE_MODE",
    "RESULT_NONE",
    "Recorder",
    "ReplayResult",
    "TEXT_HEADER",
    "TEXT_HEADER_V1",
    "UnrecordableCall",
    "Trace",
    "TraceFormatError",
    "VERSION",
    "apply_to_store",
    "concat",
    "describe",
    "empty_ops",
    "fault_ops",
    "is_trace_file",
    "iter_text_lines",
    "ops_from_rows",
    "parse_binary",
    "parse_text",
    "read",
    "read_binary",
    "read_text",
    "replay",
    "set_ops",
    "write",
    "write_binary",
    "write_text",
]
