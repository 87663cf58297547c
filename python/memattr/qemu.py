"""Import QEMU's ``-trace kvm_convert_memory`` logs as memattr traces.

QEMU (accel/kvm/trace-events) declares::

    kvm_convert_memory(uint64_t start, uint64_t size, const char *msg) "start 0x%" PRIx64 " size 0x%" PRIx64 " %s"
    kvm_memory_fault(uint64_t start, uint64_t size, uint64_t flags) "start 0x%" PRIx64 " size 0x%" PRIx64 " flags 0x%" PRIx64

and kvm_convert_memory() passes ``msg`` = ``"shared_to_private"`` or
``"private_to_shared"``. With the ``log`` trace backend
(``-trace kvm_convert_memory -trace kvm_memory_fault -D qemu.log``) each
event is one line, optionally prefixed with a timestamp, in any of the
forms QEMU versions have printed::

    kvm_convert_memory start 0x80000000 size 0x200000 private_to_shared
    12345@1700000000.123456:kvm_convert_memory start 0x80000000 size 0x200000 private_to_shared
    2024-01-31T16:17:21.123456Z (12345) kvm_convert_memory start ...
    2024-01-31T16:17:21.123456Z kvm_convert_memory start ...

Every ``kvm_convert_memory`` line becomes a SET_MEMORY_ATTRIBUTES operation
(PRIVATE for ``shared_to_private``, 0 otherwise); every
``kvm_memory_fault`` line becomes a FAULT operation at ``start`` whose
private-ness is the exit's ``KVM_MEMORY_EXIT_FLAG_PRIVATE`` bit (the
conversion QEMU then made follows as its own line). Events are found
wherever they stand in a line (a warning and an event often share one line
of stderr), several per line included. Other lines (other events, QEMU
messages) are skipped, and so is a line that names one of the two events
but does not parse; both are counted in the trace's ``qemu_skipped``
metadata (with the first malformed line), which ``memattr import-qemu``
prints. ``strict=True`` makes a malformed event line an error naming it.

QEMU makes RAM private when it registers a guest_memfd slot, which is not a
traced conversion, so the importer prepends the guest's setup and creation
(:mod:`memattr.guest_layout`: RAM below ``low_limit`` and from 4 GiB).

:func:`import_log` then replays what QEMU's kvm_convert_memory() does with
each logged conversion: one that does not start in RAM never reaches KVM
(QEMU ignores a conversion of MMIO or unassigned space to shared and fails
one to private), and after a conversion to shared QEMU discards the private
copy, ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` on the guest_memfd at the
range's offset in the RAM block (ram_block_discard_guest_memfd_range), which
the trace holds as a ``guest_memfd_fallocate`` operation. (QEMU skips that
discard if the conversion failed; the trace cannot know, so a replay that
fails the conversion still punches the hole.)
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from memattr.generators import GUEST_MEMFD_FD, setup, vm_creation
from memattr.guest_layout import GuestLayout, Region
from memattr.stream import TraceStream
from memattr.trace_format import (
    FLAG_CONVERT,
    FLAG_DISCARD,
    FLAG_PRIVATE,
    OP_FAULT,
    OP_GUEST_MEMFD_FALLOCATE,
    OP_SET_MEMORY_ATTRIBUTES,
    OP_SET_USER_MEMORY_REGION,
    PUNCH_HOLE_MODE,
    RESULT_NONE,
    Trace,
    TraceFormatError,
    concat,
    empty_ops,
)
from memattr.uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_X86_SW_PROTECTED_VM,
    U64_MAX,
)
from memattr.units import GiB

_PREFIX = (
    r"(?:\d+@\d+\.\d+:"  # pid@sec.usec:
    r"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z\s+(?:\(\d+\)\s+)?"  # ISO time [(tid)]
    r")?"
)
_CONVERT = re.compile(
    r"^\s*" + _PREFIX + r"kvm_convert_memory\s+start\s+0x(?P<start>[0-9a-fA-F]+)\s+"
    r"size\s+0x(?P<size>[0-9a-fA-F]+)\s+(?P<msg>shared_to_private|private_to_shared)\s*$"
)
_FAULT = re.compile(
    r"^\s*" + _PREFIX + r"kvm_memory_fault\s+start\s+0x(?P<start>[0-9a-fA-F]+)\s+"
    r"size\s+0x(?P<size>[0-9a-fA-F]+)\s+flags\s+0x(?P<flags>[0-9a-fA-F]+)\s*$"
)
_EVENT = re.compile(r"(?:^|[\s:])(kvm_convert_memory|kvm_memory_fault)\s")
# Either event anywhere in a line (not inside a longer word).
_ANYWHERE = re.compile(
    r"(?<![\w])(?:kvm_convert_memory\s+start\s+0x(?P<cstart>[0-9a-fA-F]+)\s+size\s+0x(?P<csize>[0-9a-fA-F]+)"
    r"\s+(?P<msg>shared_to_private|private_to_shared)(?![\w])"
    r"|kvm_memory_fault\s+start\s+0x(?P<fstart>[0-9a-fA-F]+)\s+size\s+0x(?P<fsize>[0-9a-fA-F]+)"
    r"\s+flags\s+0x(?P<flags>[0-9a-fA-F]+)(?![\w]))"
)


def parse_log(lines: Iterable[str], name: str = "<qemu log>", strict: bool = False) -> Trace:
    """The conversions and memory faults of a QEMU log, in order (no setup).
    ``meta["qemu_skipped"]`` counts the lines skipped, by reason."""
    rows: list[tuple[int, int, int, int, int]] = []
    no_event = 0
    malformed = 0
    first_malformed = ""
    for lineno, line in enumerate(lines, 1):
        if "kvm_convert_memory" not in line and "kvm_memory_fault" not in line:
            no_event += 1
            continue
        if not _EVENT.search(line):
            no_event += 1
            continue
        m = _CONVERT.match(line)
        if m:
            start, size = int(m["start"], 16), int(m["size"], 16)
            if start > U64_MAX or size > U64_MAX:
                raise TraceFormatError(f"{name} line {lineno}: value does not fit in 64 bits")
            attrs = KVM_MEMORY_ATTRIBUTE_PRIVATE if m["msg"] == "shared_to_private" else 0
            rows.append((OP_SET_MEMORY_ATTRIBUTES, start, size, attrs, 0))
            continue
        m = _FAULT.match(line)
        if m:
            start, flags = int(m["start"], 16), int(m["flags"], 16)
            if start > U64_MAX or int(m["size"], 16) > U64_MAX or flags > U64_MAX:
                raise TraceFormatError(f"{name} line {lineno}: value does not fit in 64 bits")
            # The exit does not say whether the access was a write; reads
            # fault the same way for the attribute model.
            fflags = FLAG_PRIVATE if flags & KVM_MEMORY_EXIT_FLAG_PRIVATE else 0
            rows.append((OP_FAULT, start, 0, 0, fflags))
            continue
        # Not the whole line: the events may stand anywhere in it.
        found = False
        for e in _ANYWHERE.finditer(line):
            found = True
            if e["cstart"] is not None:
                start, size = int(e["cstart"], 16), int(e["csize"], 16)
                if start > U64_MAX or size > U64_MAX:
                    raise TraceFormatError(f"{name} line {lineno}: value does not fit in 64 bits")
                attrs = KVM_MEMORY_ATTRIBUTE_PRIVATE if e["msg"] == "shared_to_private" else 0
                rows.append((OP_SET_MEMORY_ATTRIBUTES, start, size, attrs, 0))
            else:
                start, flags = int(e["fstart"], 16), int(e["flags"], 16)
                if start > U64_MAX or int(e["fsize"], 16) > U64_MAX or flags > U64_MAX:
                    raise TraceFormatError(f"{name} line {lineno}: value does not fit in 64 bits")
                rows.append((OP_FAULT, start, 0, 0, FLAG_PRIVATE if flags & KVM_MEMORY_EXIT_FLAG_PRIVATE else 0))
        if found:
            continue
        if strict:
            raise TraceFormatError(f"{name} line {lineno}: malformed QEMU trace line: {line.strip()[:120]!r}")
        malformed += 1
        if not first_malformed:
            first_malformed = f"line {lineno}: {line.strip()[:120]!r}"
    ops = empty_ops(len(rows))
    if rows:
        cols = list(zip(*rows))
        for name, col, dtype in zip(
            ("kind", "gpa", "size", "attributes", "flags"), cols, (np.uint8, np.uint64, np.uint64, np.uint64, np.uint8)
        ):
            ops[name] = np.array(col, dtype)
        # The log saw each of these faults exit (KVM_EXIT_MEMORY_FAULT):
        # recorded as such, a replay counts that exit as expected.
        ops["result"][ops["kind"] == OP_FAULT] = -errno.EFAULT
    skipped = {"no_event": no_event, "malformed": malformed, "first_malformed": first_malformed}
    return Trace(ops, {"name": "qemu", "vm_type": KVM_X86_SW_PROTECTED_VM, "qemu_skipped": skipped})


def _ram_region_index(gpa: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
    """Per gpa, the index of the RAM region holding it, or -1."""
    regions = list(regions)
    starts = np.array([r.gpa for r in regions], dtype=np.uint64)
    ends = np.array([r.end for r in regions], dtype=np.uint64)
    i = np.searchsorted(starts, gpa, side="right").astype(np.int64) - 1
    inside = (i >= 0) & (gpa < ends[np.maximum(i, 0)]) if regions else np.zeros(gpa.shape, bool)
    return np.where(inside, i, -1)


def _with_holes(
    ops: np.ndarray, regions: Sequence[Region], fds: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``ops`` with a guest_memfd hole after each conversion to shared that
    starts in RAM, and where each old index (and the end) lands. ``fds[i]``
    is the guest_memfd bound to ``regions[i]`` (disjoint memslots)."""
    if len(fds) != len(regions):
        raise ValueError("one guest_memfd fd per region")
    order = sorted(range(len(regions)), key=lambda i: regions[i].gpa)
    regions = [regions[i] for i in order]
    region_fd = np.array([fds[i] for i in order], dtype=np.uint64)
    idx = _ram_region_index(ops["gpa"], regions)
    shared = (
        (ops["kind"] == OP_SET_MEMORY_ATTRIBUTES)
        & ((ops["attributes"] & np.uint64(KVM_MEMORY_ATTRIBUTE_PRIVATE)) == 0)
        & (idx >= 0)
    )
    before = np.concatenate([[0], np.cumsum(shared)])  # holes among ops[:k]
    new_index = np.arange(len(ops) + 1) + before
    out = empty_ops(len(ops) + int(before[-1]))
    out[new_index[:-1]] = ops
    where = np.flatnonzero(shared)
    holes = out[new_index[where] + 1]
    region_gpa = np.array([r.gpa for r in regions], dtype=np.uint64)
    region_off = np.array([r.guest_memfd_offset for r in regions], dtype=np.uint64)
    src = ops[where]
    holes["kind"] = OP_GUEST_MEMFD_FALLOCATE
    if where.size:
        r = idx[where]
        # ram_block_discard_guest_memfd_range(): the range's offset in the
        # RAM block, which is the guest_memfd offset in this layout.
        holes["gpa"] = region_off[r] + (src["gpa"] - region_gpa[r])
        holes["size"] = src["size"]
        holes["attributes"] = region_fd[r]
    holes["arg"] = PUNCH_HOLE_MODE
    out[new_index[where] + 1] = holes
    return out, new_index


def kvm_calls(events: Trace, regions: Sequence[Region], discard: bool = True) -> Trace:
    """What QEMU's kvm_convert_memory() asks of KVM for each logged event
    (see the module doc): conversions that start outside RAM dropped, and
    with ``discard`` a guest_memfd hole punched after each conversion to
    shared. Faults pass through."""
    ops = events.ops
    sets = ops["kind"] == OP_SET_MEMORY_ATTRIBUTES
    ops = ops[~sets | (_ram_region_index(ops["gpa"], sorted(regions, key=lambda r: r.gpa)) >= 0)]
    if discard:
        # The importer's setup binds every region to its one guest_memfd.
        ops, _ = _with_holes(ops, regions, [GUEST_MEMFD_FD] * len(regions))
    return Trace(ops.copy(), dict(events.meta))


def guest_memfd_regions(trace: Trace) -> tuple[list[Region], list[int]]:
    """The guest_memfd-backed memslots a trace creates, and the guest_memfd
    fd bound to each as the trace has it (what its ``create_guest_memfd``
    returned; replay maps it to the live fd), from its
    ``set_user_memory_region`` operations and regions table. A call recorded
    as failed changes nothing; the last definition of a slot wins; a deleted
    slot (size 0) or one without ``KVM_MEM_GUEST_MEMFD`` has none."""
    slots: dict[int, tuple[Region, int] | None] = {}
    _update_slots(slots, trace.ops, trace.meta["regions"])
    found = [v for v in slots.values() if v is not None]
    return [r for r, _ in found], [fd for _, fd in found]


def _update_slots(slots: dict[int, tuple[Region, int] | None], ops: np.ndarray, table: Sequence[Sequence[int]]) -> None:
    ops = ops[ops["kind"] == OP_SET_USER_MEMORY_REGION]
    cols = [ops[f].tolist() for f in ("gpa", "size", "attributes", "arg", "aux", "result")]
    for gpa, size, flags, off, aux, result in zip(*cols):
        if result < 0 and result != RESULT_NONE:
            continue
        slot, _uaddr, fd = table[aux]
        backed = size and flags & KVM_MEM_GUEST_MEMFD and fd >= 0
        slots[slot] = (Region(slot, gpa, size, off), fd) if backed else None


def discard_stream(stream: TraceStream) -> TraceStream:
    """:func:`with_discards` on a :class:`memattr.stream.TraceStream`,
    chunk by chunk (the memslots as the records so far define them)."""
    meta = dict(stream.meta)
    meta["params"] = {**meta.get("params", {}), "discard": True}

    def source() -> Iterator[tuple[str, np.ndarray]]:
        slots: dict[int, tuple[Region, int] | None] = {}
        for phase, ops in stream.source():
            _update_slots(slots, ops, meta["regions"])
            found = [v for v in slots.values() if v is not None]
            out, _ = _with_holes(ops, [r for r, _ in found], [fd for _, fd in found])
            convert = (out["kind"] == OP_FAULT) & ((out["flags"] & np.uint8(FLAG_CONVERT)) != 0)
            out["flags"][convert] |= np.uint8(FLAG_DISCARD)
            yield phase, out

    return TraceStream(meta, source, stream.length_hint, stream.state)


def with_discards(trace: Trace) -> Trace:
    """``trace`` as a QEMU VMM would run it: a guest_memfd hole punched
    after every conversion to shared of guest_memfd-backed RAM, in the
    guest_memfd bound to that memslot at the range's offset in it (the
    trace's own memslots and fds: :func:`guest_memfd_regions`), phases
    kept; faults with ``FLAG_CONVERT`` get ``FLAG_DISCARD``, so the
    replayer's own conversions to shared punch their holes too."""
    regions, fds = guest_memfd_regions(trace)
    ops, new_index = _with_holes(trace.ops, regions, fds)
    # The replayer's own conversions on memory-fault exits discard too.
    convert = (ops["kind"] == OP_FAULT) & ((ops["flags"] & np.uint8(FLAG_CONVERT)) != 0)
    ops["flags"][convert] |= np.uint8(FLAG_DISCARD)
    meta = dict(trace.meta)
    if trace.phases:
        meta["phases"] = [[name, int(new_index[a]), int(new_index[b])] for name, a, b in trace.phases]
    meta.setdefault("params", {})
    meta["params"] = {**meta["params"], "discard": True}
    return Trace(ops, meta)


def import_log(
    source: str | os.PathLike[str] | Iterable[str],
    guest: int | str,
    low_limit: int | str = 2 * GiB,
    initial_private: bool = True,
    discard: bool = True,
    strict: bool = False,
) -> Trace:
    """A replayable trace from a QEMU log: setup, creation (when QEMU made
    the slots private, the default) and what QEMU asked of KVM for the
    logged events (:func:`kvm_calls`; ``discard=False`` leaves out the
    guest_memfd holes, as for a QEMU that does not discard).

    ``guest`` is the guest's RAM size (QEMU's ``-m``), ``low_limit`` where
    the PCI hole starts (2 GiB for q35 guests of 2.75 GiB or more; pass the
    machine's value otherwise).
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8", errors="replace") as f:
            events = parse_log(f, os.fspath(source), strict)
    else:
        events = parse_log(source, strict=strict)
    layout = GuestLayout.build(guest, low_limit)
    parts = [("setup", setup(layout))]
    if initial_private:
        parts.append(("creation", vm_creation(layout)))
    parts.append(("qemu", kvm_calls(events, layout.regions, discard)))
    meta = {
        "name": "qemu",
        "vm_type": KVM_X86_SW_PROTECTED_VM,
        "vm_kwargs": {},
        "params": {
            "guest": layout.ram_size,
            "low_limit": layout.low_size,
            "initial_private": initial_private,
            "discard": discard,
        },
        "layout": layout.describe(),
        "qemu_events": len(events),
        "qemu_skipped": events.meta["qemu_skipped"],
    }
    return concat(parts, meta)
