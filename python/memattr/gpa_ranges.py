"""Sets of guest-physical ranges, vectorised: union, intersection tests,
aligned blocks of RAM, random free blocks, and :class:`SharedSet`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from memattr.guest_layout import GuestLayout
from memattr.uapi import SZ_2M

def coalesce(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted union of [start, end) ranges, adjacent ones merged."""
    if starts.size == 0:
        return starts.astype(np.uint64), ends.astype(np.uint64)
    order = np.argsort(starts, kind="stable")
    s = starts[order].astype(np.uint64)
    e = ends[order].astype(np.uint64)
    run_end = np.maximum.accumulate(e)
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] > run_end[:-1]
    idx = np.flatnonzero(new)
    last = np.append(idx[1:], s.size) - 1
    return s[idx], run_end[last]


def overlaps(a_start: np.ndarray, a_end: np.ndarray, holes: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """For each [a_start, a_end): does it intersect any (sorted, disjoint) hole?"""
    h_start, h_end = holes
    if h_start.size == 0:
        return np.zeros(a_start.size, dtype=bool)
    i = np.searchsorted(h_end, a_start, side="right")
    hit = i < h_start.size
    ii = np.minimum(i, h_start.size - 1)
    return hit & (h_start[ii] < a_end)


def aligned_blocks(layout: GuestLayout, size: int) -> np.ndarray:
    """Start gpas of every ``size``-aligned block lying wholly in RAM."""
    parts = []
    for r in layout.regions:
        first = -(-r.gpa // size) * size
        last = (r.end // size) * size
        if last > first:
            parts.append(np.arange(first, last, size, dtype=np.uint64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _region_blocks(layout: GuestLayout, size: int, floor: int) -> list[tuple[int, int]]:
    """Per region, (first block start, block count) of ``size``-aligned
    blocks wholly inside it, at or above ``floor``."""
    out = []
    for r in layout.regions:
        first = max(-(-r.gpa // size) * size, -(-floor // size) * size)
        last = (r.end // size) * size
        if last > first:
            out.append((first, (last - first) // size))
    return out


def count_blocks(layout: GuestLayout, size: int, floor: int = 0) -> int:
    """How many blocks :func:`aligned_blocks` (at or above ``floor``) lists,
    without listing them."""
    return sum(n for _, n in _region_blocks(layout, size, floor))


def _hit_blocks(layout: GuestLayout, size: int, holes: tuple[np.ndarray, np.ndarray], floor: int) -> np.ndarray:
    """Sorted start gpas of the blocks (as :func:`aligned_blocks` at or above
    ``floor`` lists them) that intersect a (sorted, disjoint) hole: the
    blocks each hole touches, deduplicated (holes are few)."""
    h_start, h_end = holes
    if h_start.size == 0:
        return np.zeros(0, np.uint64)
    sz = np.uint64(size)
    lo = h_start // sz
    hi = (h_end + sz - np.uint64(1)) // sz  # exclusive block numbers
    counts = (hi - lo).astype(np.int64)
    blk = np.repeat(lo, counts) + (
        np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    ).astype(np.uint64)
    starts = np.unique(blk) * sz
    inside = np.zeros(starts.size, bool)
    for first, n in _region_blocks(layout, size, floor):
        inside |= (starts >= np.uint64(first)) & (starts < np.uint64(first + n * size))
    return starts[inside]


def blocks_hit(layout: GuestLayout, size: int, holes: tuple[np.ndarray, np.ndarray], floor: int = 0) -> int:
    """How many of those blocks intersect a (sorted, disjoint) hole."""
    return int(_hit_blocks(layout, size, holes, floor).size)


# Blocks listed at a time by sliced_picks (2 MiB of gpas).
PICK_SLICE = 1 << 18


def sliced_picks(
    layout: GuestLayout,
    size: int,
    n: int,
    holes: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    floor: int = 0,
    shuffle: bool = True,
) -> Iterator[np.ndarray]:
    """``n`` distinct ``size``-aligned blocks wholly in RAM, at or above
    ``floor``, not intersecting ``holes``, chosen uniformly, yielded a
    slice of RAM (``PICK_SLICE`` blocks) at a time. No slice is listed:
    a slice's free blocks are its block numbers minus the few that holes
    touch, so memory and time are O(picked + holes + slices), whatever the
    guest's size. The count per slice is drawn from the multivariate
    hypergeometric law (exactly ``n`` in all); with ``shuffle`` slices
    come in random order and each slice's blocks in random order, else the
    ``n`` first free blocks in address order."""
    slices = []
    for first, count in _region_blocks(layout, size, floor):
        for lo in range(0, count, PICK_SLICE):
            slices.append((first + lo * size, min(PICK_SLICE, count - lo)))
    hit = _hit_blocks(layout, size, holes, floor)
    firsts = np.array([f for f, _ in slices], dtype=np.uint64)
    ends = np.array([f + c * size for f, c in slices], dtype=np.uint64)
    h_lo = np.searchsorted(hit, firsts)
    h_hi = np.searchsorted(hit, ends)
    free = np.array([c for _, c in slices], dtype=np.int64) - (h_hi - h_lo)
    if n > free.sum():
        raise ValueError(f"{n} blocks of {size} bytes wanted, RAM has {int(free.sum())} free")

    def blocks(i: int, virtual: np.ndarray) -> np.ndarray:
        # The v-th free block of slice i: v plus the holes' blocks at or
        # before it (hits h_j at index j: free block v sits past every j
        # with h_j - j <= v).
        first = slices[i][0]
        h = ((hit[h_lo[i] : h_hi[i]] - np.uint64(first)) // np.uint64(size)).astype(np.int64)
        idx = virtual + np.searchsorted(h - np.arange(h.size), virtual, side="right")
        return np.uint64(first) + idx.astype(np.uint64) * np.uint64(size)

    if n == 0:
        return
    if not shuffle:
        left = n
        for i in range(len(slices)):
            k = min(left, int(free[i]))
            if k:
                yield blocks(i, np.arange(k, dtype=np.int64))
            left -= k
            if not left:
                return
        return
    per = _spread(free, n, rng)
    for i in rng.permutation(len(slices)).tolist():
        if per[i]:
            yield blocks(i, rng.choice(int(free[i]), size=int(per[i]), replace=False).astype(np.int64))


def _spread(free: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` picks spread over slices of ``free`` blocks each, as drawing
    without replacement would: the multivariate hypergeometric law, which
    numpy draws only for fewer than 10**9 blocks in all; beyond that (RAM
    over 2 PiB in 2 MiB blocks), the multinomial law (drawing with
    replacement, indistinguishable when picks are few), any slice drawn
    past its free blocks giving its excess back to be drawn again."""
    if free.size == 1:
        return np.array([n])
    if int(free.sum()) < 10**9:
        return rng.multivariate_hypergeometric(free, n, method="marginals")
    per = np.zeros(free.size, dtype=np.int64)
    left = n
    while left:
        room = free - per
        per += rng.multinomial(left, room / room.sum())
        over = np.maximum(per - free, 0)
        per -= over
        left = int(over.sum())
    return per


def sample_blocks(
    layout: GuestLayout,
    size: int,
    n: int,
    holes: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    what: str,
    floor: int = SZ_2M,
) -> np.ndarray:
    """``n`` distinct random ``size``-aligned blocks wholly in RAM, at or
    above ``floor``, not intersecting ``holes``; in the order drawn.

    Samples block numbers instead of listing every block, so picking a few
    thousand blocks of a multi-TiB guest stays cheap.
    """
    firsts, counts = [], []
    for r in layout.regions:
        first = max(-(-r.gpa // size) * size, -(-floor // size) * size)
        last = (r.end // size) * size
        if last > first:
            firsts.append(first)
            counts.append((last - first) // size)
    total = sum(counts)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if total == 0:
        raise ValueError(f"{what}={n}: no {size}-byte blocks of RAM available")
    first_a = np.array(firsts, dtype=np.uint64)
    cum = np.cumsum(np.array(counts, dtype=np.int64))
    picked = np.zeros(0, dtype=np.uint64)
    for _ in range(64):
        want = n - picked.size
        k = min(total, 2 * want + 64)
        idx = rng.integers(0, total, size=k)
        region = np.searchsorted(cum, idx, side="right")
        local = idx - np.concatenate([[0], cum[:-1]])[region]
        cand = first_a[region] + local.astype(np.uint64) * np.uint64(size)
        cand = cand[~overlaps(cand, cand + np.uint64(size), holes)]
        merged = np.concatenate([picked, cand])
        _, first_seen = np.unique(merged, return_index=True)
        picked = merged[np.sort(first_seen)][:n]
        if picked.size == n:
            return picked
    raise ValueError(f"{what}={n}: cannot find that many free {size}-byte blocks (RAM too small or too full)")


@dataclass(frozen=True)
class SharedSet:
    """Sorted, disjoint [start, end) gpa ranges currently shared."""

    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def empty(cls) -> SharedSet:
        z = np.zeros(0, dtype=np.uint64)
        return cls(z, z)

    @classmethod
    def of(cls, starts: np.ndarray, ends: np.ndarray) -> SharedSet:
        s, e = coalesce(np.asarray(starts, dtype=np.uint64), np.asarray(ends, dtype=np.uint64))
        return cls(s, e)

    def union(self, other: SharedSet) -> SharedSet:
        return SharedSet.of(np.concatenate([self.starts, other.starts]), np.concatenate([self.ends, other.ends]))

    @property
    def bytes(self) -> int:
        return int((self.ends - self.starts).sum(dtype=np.uint64))

    def holes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.starts, self.ends
