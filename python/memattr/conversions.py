"""How a guest's conversion of a range reaches the VMM: TDX-style (MapGPA,
at most 2 MiB per exit) or SNP-style (page-state-change requests of at most
253 entries) requests."""

from __future__ import annotations

import numpy as np

from memattr.trace_format import set_ops
from memattr.uapi import PAGE_SIZE, SZ_2M

STYLES = ("tdx", "snp")
# The GHCB page-state-change request holds at most this many entries
# (VMGEXIT_PSC_MAX_ENTRY in arch/x86/include/asm/sev-common.h).
VMGEXIT_PSC_MAX_ENTRY = 253
# KVM's TDX MapGPA handling converts at most 2 MiB per exit so it can check
# for pending interrupts in between.
TDX_MAP_GPA_MAX_LEN = SZ_2M


def check_style(style: str) -> None:
    """``style`` must be one of :data:`STYLES`."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def split_requests(starts: np.ndarray, ends: np.ndarray, style: str) -> tuple[np.ndarray, np.ndarray]:
    """How a guest's conversion of each range reaches the VMM, in order.

    ``"tdx"``: KVM handles MapGPA at most 2 MiB per exit, so each range
    becomes consecutive 2 MiB requests (the last one shorter).

    ``"snp"``: the guest describes the range as page-state-change entries,
    a 2M entry wherever the address is 2 MiB aligned with at least 2 MiB
    left, else 4K, and sends at most 253 entries per request; KVM coalesces
    contiguous entries of one request into one conversion. So each range
    becomes runs of up to 253 entries.

    Returns (gpa, size) arrays of the requests; empty ranges make none.
    """
    check_style(style)
    starts = np.asarray(starts, dtype=np.uint64)
    ends = np.asarray(ends, dtype=np.uint64)
    if starts.shape != ends.shape or (ends < starts).any():
        raise ValueError("starts and ends must have one shape, with every end >= its start")
    # An empty range asks for nothing: no request (a zero size is EINVAL).
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        return starts, ends - starts
    if style == "tdx":
        lengths = ends - starts
        pieces = ((lengths + np.uint64(TDX_MAP_GPA_MAX_LEN - 1)) // np.uint64(TDX_MAP_GPA_MAX_LEN)).astype(np.int64)
        base = np.repeat(starts, pieces)
        grp_end = np.repeat(ends, pieces)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        k = (np.arange(base.size, dtype=np.int64) - first).astype(np.uint64)
        gpa = base + k * np.uint64(TDX_MAP_GPA_MAX_LEN)
        size = np.minimum(grp_end - gpa, np.uint64(TDX_MAP_GPA_MAX_LEN))
        return gpa, size
    # SNP: entries per range = 4K head up to the first 2M boundary, 2M
    # entries, 4K tail. Ranges of <= 253 entries are one request.
    mask2m = np.uint64(SZ_2M - 1)
    up = (starts + mask2m) & ~mask2m
    down = ends & ~mask2m
    has_huge = up < down
    head = np.where(has_huge, (up - starts) // np.uint64(PAGE_SIZE), (ends - starts) // np.uint64(PAGE_SIZE))
    huge = np.where(has_huge, (down - up) // np.uint64(SZ_2M), 0)
    tail = np.where(has_huge, (ends - down) // np.uint64(PAGE_SIZE), 0)
    entries = head + huge + tail
    out_gpa: list[np.ndarray] = []
    out_size: list[np.ndarray] = []
    small = entries <= VMGEXIT_PSC_MAX_ENTRY
    if small.all():
        return starts.copy(), ends - starts
    # Few ranges need more than one request: walk just those.
    pos = 0
    for i in np.flatnonzero(~small).tolist():
        out_gpa.append(starts[pos:i])
        out_size.append(ends[pos:i] - starts[pos:i])
        s, u, d, e = int(starts[i]), int(up[i]), int(down[i]), int(ends[i])
        if not has_huge[i]:
            u = d = e
        # entry boundaries: 4K steps to u, 2M steps to d, 4K steps to e
        bounds = np.concatenate(
            [
                np.arange(s, u, PAGE_SIZE, dtype=np.uint64),
                np.arange(u, d, SZ_2M, dtype=np.uint64),
                np.arange(d, e, PAGE_SIZE, dtype=np.uint64),
                np.array([e], dtype=np.uint64),
            ]
        )
        req_starts = bounds[:-1:VMGEXIT_PSC_MAX_ENTRY]
        req_ends = np.append(req_starts[1:], np.uint64(e))
        out_gpa.append(req_starts)
        out_size.append(req_ends - req_starts)
        pos = i + 1
    out_gpa.append(starts[pos:])
    out_size.append(ends[pos:] - starts[pos:])
    return np.concatenate(out_gpa), np.concatenate(out_size)


def convert(starts: np.ndarray, ends: np.ndarray, attributes: int, style: str) -> np.ndarray:
    gpa, size = split_requests(starts, ends, style)
    return set_ops(gpa, size, attributes)
