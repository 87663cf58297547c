"""Workload generators: seeded, parameterised models of real conversion patterns.

Every generator returns a :class:`memattr.trace.Trace` (numpy records, see
:mod:`memattr.trace`) for a guest described by a :class:`GuestLayout`, built
without per-page Python loops so a 1 TiB guest's stream (millions of
operations) takes seconds. The same seed gives the same stream.

Guest layout (what QEMU's q35 machine does): RAM below 4 GiB up to the PCI
hole (``low_limit``, 2 GiB by default; 3 GiB is the i440fx value), the rest
from 4 GiB up. One guest_memfd backs all RAM (QEMU makes one per RAM block);
the low slot binds offset 0, the high slot(s) the rest. The VM type is
``KVM_X86_SW_PROTECTED_VM``.

Generators (each documented at its definition):

* :func:`setup` - guest_memfd and memslots;
* :func:`vm_creation` - every memslot made private, one call each;
* :func:`firmware_sharing` - SWIOTLB bounce buffers (the kernel's CoCo
  sizing rule), per-vCPU 4K shared pages, device DMA buffers, converted in
  TDX style (at most 2 MiB per request) or SNP style (page-state changes of
  at most 253 4K/2M entries);
* :func:`lazy_acceptance` - private faults accepting memory in 4 MiB chunks;
* :func:`implicit_conversions` - faults that exit with
  ``KVM_EXIT_MEMORY_FAULT`` and are converted 4K at a time by the VMM;
* :func:`churn` - steady-state shared buffer churn at a target shared
  fraction of RAM (7.5% by default);
* :func:`kexec` - every shared range converted back to private;
* :func:`checkerboard` - the kernel selftest's conversion pattern
  (private_mem_conversions_test), as a multi-vCPU stress;
* :func:`boot_and_churn` - the composite the CLI runs by default.

Sizes accept ints (bytes) or strings like ``"64G"`` (:func:`parse_size`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from memattr.trace import (
    FLAG_CONVERT,
    FLAG_PRIVATE,
    FLAG_WRITE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    OP_CREATE_GUEST_MEMFD,
    OP_SET_USER_MEMORY_REGION,
    PAGE_SIZE,
    Trace,
    concat,
    empty_ops,
    fault_ops,
    set_ops,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
SZ_2M = 2 * MiB
SZ_1G = GiB
SZ_4G = 4 * GiB

KVM_X86_SW_PROTECTED_VM = 1
KVM_MEM_GUEST_MEMFD = 1 << 2

# arch/x86/mm/mem_encrypt.c (mem_encrypt_setup_arch): SWIOTLB for CoCo guests
# is 6% of RAM clamped to [IO_TLB_DEFAULT_SIZE, SZ_1G]; swiotlb_adjust_size()
# then rounds up to whole segments of IO_TLB_SEGSIZE slabs of 2 KiB.
IO_TLB_DEFAULT_SIZE = 64 * MiB
IO_TLB_SHIFT = 11
IO_TLB_SEGSIZE = 128
# The GHCB page-state-change request holds at most this many entries
# (VMGEXIT_PSC_MAX_ENTRY in arch/x86/include/asm/sev-common.h).
VMGEXIT_PSC_MAX_ENTRY = 253
# KVM's TDX MapGPA handling converts at most 2 MiB per exit so it can check
# for pending interrupts in between.
TDX_MAP_GPA_MAX_LEN = SZ_2M
# Unaccepted memory is accepted in MAX_PAGE_ORDER blocks (4 MiB on x86).
ACCEPT_CHUNK = 4 * MiB
# Userspace addresses of the RAM mapping (page aligned, within a 47-bit VA).
USERSPACE_BASE = 0x7000_0000_0000

STYLES = ("tdx", "snp")

PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
SHARED = 0

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1 << 50}


def parse_size(value: int | str) -> int:
    """``"64G"``, ``"1.5T"``, ``"512M"``, ``"4096"`` or an int -> bytes."""
    if isinstance(value, bool):
        raise TypeError("size must be an int or a string like '64G'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"size must be an int or a string like '64G', got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"cannot parse size {value!r} (examples: 4096, 512M, 64G, 1T)")
    number, unit = m.group(1), m.group(2).upper()
    scaled = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if scaled != int(scaled):
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(scaled)


def format_size(n: int) -> str:
    """Bytes -> the shortest exact ``"64G"``-style string (or bytes)."""
    for unit in ("P", "T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError("seed must be an int")
    return np.random.default_rng(seed)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _check_count(name: str, value: int, lo: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_fraction(name: str, value: float, hi: float = 1.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number")
    if not 0.0 <= value <= hi:
        raise ValueError(f"{name} must be in [0, {hi}], got {value}")


# --------------------------------------------------------------------------
# guest layout


@dataclass(frozen=True)
class Region:
    """One memslot of the guest's RAM."""

    slot: int
    gpa: int
    size: int
    guest_memfd_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class GuestLayout:
    """RAM size, the low/high split and the memslots covering it."""

    ram_size: int
    low_size: int
    regions: tuple[Region, ...]

    @classmethod
    def build(cls, ram_size: int | str, low_limit: int | str = 2 * GiB, high_slots: int = 1) -> GuestLayout:
        """RAM below ``low_limit`` from gpa 0, the rest from 4 GiB up.

        ``ram_size`` and ``low_limit`` must be multiples of 2 MiB (so every
        slot may hold huge pages); ``high_slots`` splits high RAM into that
        many equal-ish memslots (2 MiB multiples) to exercise slot crossing.
        """
        ram = parse_size(ram_size)
        low = parse_size(low_limit)
        _check_count("high_slots", high_slots, 1)
        if ram == 0 or ram % SZ_2M:
            raise ValueError(f"ram_size must be a positive multiple of 2 MiB, got {ram}")
        if low == 0 or low % SZ_2M or low > 3 * GiB + 512 * MiB:
            raise ValueError(f"low_limit must be a multiple of 2 MiB in (0, 3.5 GiB], got {low}")
        if ram > 64 * TiB:
            raise ValueError(f"ram_size must be <= 64 TiB, got {ram}")
        low_size = min(ram, low)
        regions = [Region(0, 0, low_size, 0)]
        high = ram - low_size
        if high:
            blocks = high // SZ_2M
            n = min(high_slots, blocks)
            per = np.full(n, blocks // n, dtype=np.int64)
            per[: blocks % n] += 1
            gpa, off = SZ_4G, low_size
            for i, b in enumerate(per.tolist()):
                size = b * SZ_2M
                regions.append(Region(i + 1, gpa, size, off))
                gpa += size
                off += size
        return cls(ram, low_size, tuple(regions))

    def ram_ranges(self) -> np.ndarray:
        """``(n, 2)`` uint64 array of [start, end) gpa ranges of RAM, sorted."""
        return np.array([[r.gpa, r.end] for r in self.regions], dtype=np.uint64)

    @property
    def low_end(self) -> int:
        return self.low_size

    def describe(self) -> dict[str, Any]:
        return {
            "ram_size": self.ram_size,
            "low_size": self.low_size,
            "regions": [[r.slot, r.gpa, r.size, r.guest_memfd_offset] for r in self.regions],
        }


def _layout(layout: GuestLayout | int | str) -> GuestLayout:
    if isinstance(layout, GuestLayout):
        return layout
    return GuestLayout.build(layout)


# guest_memfd folio order the workloads ask the Vm for: 2M folios (hugetlb-
# or THP-backed guest_memfd, as in the guest_memfd huge page work), so that
# private memory can be mapped huge and the hugepage "mixed" tracking
# matters. Upstream 6.8 guest_memfd hands out 4K folios only: run with
# Vm(guest_memfd_max_order=0) (CLI: --gmem-max-order 0) for that.
GMEM_MAX_ORDER = 9


def _meta(name: str, layout: GuestLayout, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "vm_type": KVM_X86_SW_PROTECTED_VM,
        "vm_kwargs": {"guest_memfd_max_order": GMEM_MAX_ORDER},
        "params": {k: v for k, v in params.items()},
        "layout": layout.describe(),
    }


# --------------------------------------------------------------------------
# range helpers (vectorised)


def _coalesce(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _overlaps(a_start: np.ndarray, a_end: np.ndarray, holes: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """For each [a_start, a_end): does it intersect any (sorted, disjoint) hole?"""
    h_start, h_end = holes
    if h_start.size == 0:
        return np.zeros(a_start.size, dtype=bool)
    i = np.searchsorted(h_end, a_start, side="right")
    hit = i < h_start.size
    ii = np.minimum(i, h_start.size - 1)
    return hit & (h_start[ii] < a_end)


def _aligned_blocks(layout: GuestLayout, size: int) -> np.ndarray:
    """Start gpas of every ``size``-aligned block lying wholly in RAM."""
    parts = []
    for r in layout.regions:
        first = -(-r.gpa // size) * size
        last = (r.end // size) * size
        if last > first:
            parts.append(np.arange(first, last, size, dtype=np.uint64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _sample_blocks(
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
        cand = cand[~_overlaps(cand, cand + np.uint64(size), holes)]
        merged = np.concatenate([picked, cand])
        _, first_seen = np.unique(merged, return_index=True)
        picked = merged[np.sort(first_seen)][:n]
        if picked.size == n:
            return picked
    raise ValueError(f"{what}={n}: cannot find that many free {size}-byte blocks (RAM too small or too full)")


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
    _check_style(style)
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


def _convert(starts: np.ndarray, ends: np.ndarray, attributes: int, style: str) -> np.ndarray:
    gpa, size = split_requests(starts, ends, style)
    return set_ops(gpa, size, attributes)


# --------------------------------------------------------------------------
# generators


# The fd setup() records for the guest's one guest_memfd (the first fd after
# stdio); replay maps it to the fd the target Vm hands out.
GUEST_MEMFD_FD = 3


def setup(layout: GuestLayout | int | str) -> Trace:
    """The VMM's setup: one guest_memfd for all RAM, one memslot per region.

    Operations: one ``create_guest_memfd(ram_size)`` (recorded fd 3, the
    first fd after stdio), then ``set_user_memory_region`` per region with
    ``KVM_MEM_GUEST_MEMFD``, userspace_addr = USERSPACE_BASE + memfd offset.
    """
    layout = _layout(layout)
    n = len(layout.regions)
    ops = empty_ops(1 + n)
    ops["kind"][0] = OP_CREATE_GUEST_MEMFD
    ops["size"][0] = layout.ram_size
    fd = GUEST_MEMFD_FD
    regions = []
    for i, r in enumerate(layout.regions, 1):
        ops["kind"][i] = OP_SET_USER_MEMORY_REGION
        ops["gpa"][i] = r.gpa
        ops["size"][i] = r.size
        ops["attributes"][i] = KVM_MEM_GUEST_MEMFD
        ops["arg"][i] = r.guest_memfd_offset
        ops["aux"][i] = i - 1
        regions.append([r.slot, USERSPACE_BASE + r.guest_memfd_offset, fd])
    # Replay maps the recorded fd to the real one through this result.
    ops["result"][0] = fd
    meta = _meta("setup", layout)
    meta["regions"] = regions
    return Trace(ops, meta)


def vm_creation(layout: GuestLayout | int | str) -> Trace:
    """Every memslot made private in one call each (what QEMU does when it
    registers a guest_memfd-backed slot): ``len(layout.regions)`` sets of
    ``PRIVATE`` covering exactly each slot, in slot order."""
    layout = _layout(layout)
    r = layout.ram_ranges()
    return Trace(set_ops(r[:, 0], r[:, 1] - r[:, 0], PRIVATE), _meta("vm_creation", layout))


def swiotlb_size(ram_size: int) -> int:
    """The CoCo guest kernel's SWIOTLB size for ``ram_size`` bytes of RAM:
    6% clamped to [64 MiB, 1 GiB], rounded up to whole 256 KiB segments."""
    size = ram_size * 6 // 100
    size = min(max(size, IO_TLB_DEFAULT_SIZE), SZ_1G)
    seg = IO_TLB_SEGSIZE << IO_TLB_SHIFT
    return -(-size // seg) * seg


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
        s, e = _coalesce(np.asarray(starts, dtype=np.uint64), np.asarray(ends, dtype=np.uint64))
        return cls(s, e)

    def union(self, other: SharedSet) -> SharedSet:
        return SharedSet.of(np.concatenate([self.starts, other.starts]), np.concatenate([self.ends, other.ends]))

    @property
    def bytes(self) -> int:
        return int((self.ends - self.starts).sum(dtype=np.uint64))

    def holes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.starts, self.ends


def _attach_shared(trace: Trace, shared: SharedSet) -> Trace:
    trace.shared = shared  # type: ignore[attr-defined]
    return trace


def firmware_sharing(
    layout: GuestLayout | int | str,
    style: str = "tdx",
    nr_vcpus: int = 8,
    dma_buffers: int = 32,
    touch: bool = True,
    seed: int | np.random.Generator | None = 0,
) -> Trace:
    """Firmware and guest-kernel sharing at boot, private -> shared.

    * SWIOTLB: :func:`swiotlb_size` bytes at the top of low RAM (memblock
      allocates it top-down below 4 GiB), 2 MiB aligned, converted as one
      range (split per ``style``, see :func:`split_requests`);
    * per-vCPU pages: ``nr_vcpus`` distinct random 4K pages in low RAM below
      the SWIOTLB (GHCB / hv-clock style), one 4K request each;
    * device DMA buffers: ``dma_buffers`` buffers of 4K..64K (powers of two,
      naturally aligned, distinct 64K blocks of all RAM outside the above),
      one request each.

    With ``touch``, each shared range is then touched by a shared write fault
    on its first page and on every 2 MiB boundary inside it.
    The trace's ``shared`` attribute is the resulting :class:`SharedSet`.
    """
    layout = _layout(layout)
    _check_style(style)
    _check_count("nr_vcpus", nr_vcpus)
    _check_count("dma_buffers", dma_buffers)
    rng = _rng(seed)
    tlb = swiotlb_size(layout.ram_size)
    tlb_start = ((layout.low_end - tlb) // SZ_2M) * SZ_2M
    if tlb_start < SZ_2M:
        raise ValueError(
            f"low RAM ({layout.low_size} bytes) too small for a {tlb}-byte SWIOTLB plus a 2 MiB floor"
        )
    parts: list[np.ndarray] = []
    parts.append(_convert(np.array([tlb_start], np.uint64), np.array([tlb_start + tlb], np.uint64), SHARED, style))

    # Per-vCPU pages: distinct 4K pages in [2 MiB, tlb_start) (below 2 MiB
    # are the real-mode and BIOS areas).
    low_pages = (tlb_start - SZ_2M) // PAGE_SIZE
    if nr_vcpus > low_pages:
        raise ValueError(f"nr_vcpus={nr_vcpus} exceeds the {low_pages} low pages available")
    vcpu_pages = SZ_2M + np.sort(rng.choice(low_pages, size=nr_vcpus, replace=False)).astype(np.uint64) * np.uint64(
        PAGE_SIZE
    )
    parts.append(set_ops(vcpu_pages, PAGE_SIZE, SHARED))
    shared_s = [np.array([tlb_start], np.uint64), vcpu_pages]
    shared_e = [np.array([tlb_start + tlb], np.uint64), vcpu_pages + np.uint64(PAGE_SIZE)]
    holes = SharedSet.of(np.concatenate(shared_s), np.concatenate(shared_e))

    # DMA buffers in distinct free 64K blocks.
    chosen = _sample_blocks(layout, 64 * KiB, dma_buffers, holes.holes(), rng, "dma_buffers")
    order = rng.integers(0, 5, size=dma_buffers)  # 4K << 0..4 = 4K..64K
    bsize = (np.uint64(PAGE_SIZE) << order.astype(np.uint64)).astype(np.uint64)
    slots = (np.uint64(64 * KiB) // bsize).astype(np.int64)
    offset = (rng.integers(0, slots) * bsize.astype(np.int64)).astype(np.uint64)
    # Drivers probe in no particular address order (the draw order).
    dma = chosen + offset
    parts.append(set_ops(dma, bsize, SHARED))
    shared = holes.union(SharedSet.of(dma, dma + bsize))
    if touch:
        parts.append(_touch(shared, private=False))
    ops = np.concatenate(parts)
    trace = Trace(
        ops,
        _meta(
            "firmware_sharing",
            layout,
            style=style,
            nr_vcpus=nr_vcpus,
            dma_buffers=dma_buffers,
            touch=touch,
            seed=_seed_meta(seed),
            swiotlb_bytes=tlb,
        ),
    )
    return _attach_shared(trace, shared)


def _seed_meta(seed: Any) -> Any:
    return seed if isinstance(seed, int) or seed is None else "generator"


def _touch(shared: SharedSet, private: bool) -> np.ndarray:
    """A write fault on each range's first page and on each 2 MiB boundary inside."""
    s, e = shared.starts, shared.ends
    mask2m = np.uint64(SZ_2M - 1)
    first_b = (s + mask2m) & ~mask2m
    count = np.where(e > first_b, (e - first_b + mask2m) // np.uint64(SZ_2M), 0).astype(np.int64)
    # boundary faults that coincide with the range start are not repeated
    dup = (first_b == s) & (count > 0)
    count = count - dup.astype(np.int64)
    base = np.repeat(np.where(dup, first_b + np.uint64(SZ_2M), first_b), count)
    first = np.repeat(np.cumsum(count) - count, count)
    k = (np.arange(base.size, dtype=np.int64) - first).astype(np.uint64)
    extra = base + k * np.uint64(SZ_2M)
    gpa = np.concatenate([s, extra])
    grp = np.concatenate([np.arange(s.size), np.repeat(np.arange(s.size), count)])
    order = np.lexsort((gpa, grp))
    flags = FLAG_WRITE | (FLAG_PRIVATE if private else 0)
    return fault_ops(gpa[order], flags)


def lazy_acceptance(
    layout: GuestLayout | int | str,
    fraction: float = 1.0,
    exclude: SharedSet | None = None,
    order: str = "random",
    seed: int | np.random.Generator | None = 0,
) -> Trace:
    """Lazy acceptance of unaccepted memory in 4 MiB chunks.

    The guest accepts ``fraction`` of the 4 MiB-aligned chunks lying wholly
    in RAM and not intersecting ``exclude`` (memory shared before, which was
    accepted at allocation). Accepting a chunk touches it as private memory
    at 2 MiB granularity (TDX ACCEPT and SNP PVALIDATE use 2M pages where
    they can): two private write faults per chunk, at its two 2 MiB halves.
    ``order`` is ``"random"`` (the buddy allocator hands out chunks all
    over) or ``"sequential"``. Chunk count = round(fraction * eligible).
    """
    layout = _layout(layout)
    _check_fraction("fraction", fraction)
    if order not in ("random", "sequential"):
        raise ValueError(f"order must be 'random' or 'sequential', got {order!r}")
    rng = _rng(seed)
    chunks = _aligned_blocks(layout, ACCEPT_CHUNK)
    if exclude is not None:
        chunks = chunks[~_overlaps(chunks, chunks + np.uint64(ACCEPT_CHUNK), exclude.holes())]
    n = int(round(fraction * chunks.size))
    if order == "random":
        picked = chunks[rng.permutation(chunks.size)[:n]]
    else:
        picked = chunks[:n]
    gpa = np.stack([picked, picked + np.uint64(SZ_2M)], axis=1).ravel()
    ops = fault_ops(gpa, FLAG_PRIVATE | FLAG_WRITE)
    meta = _meta("lazy_acceptance", layout, fraction=fraction, order=order, seed=_seed_meta(seed))
    meta["params"]["chunks"] = n
    return Trace(ops, meta)


def implicit_conversions(
    layout: GuestLayout | int | str,
    count: int = 64,
    exclude: SharedSet | None = None,
    seed: int | np.random.Generator | None = 0,
) -> Trace:
    """Implicit 4K conversions driven by memory-fault exits.

    ``count`` distinct random 4K pages of private RAM (outside ``exclude``,
    in distinct 64 KiB blocks) are accessed as shared: each is one fault op
    (shared, write, ``FLAG_CONVERT``). On replay the fault exits with
    ``KVM_EXIT_MEMORY_FAULT`` {gpa, 4 KiB, flags 0}, the VMM converts that
    4K to shared and the fault is retried and maps 4K. The trace's
    ``shared`` attribute lists the pages that end up shared.
    """
    layout = _layout(layout)
    _check_count("count", count)
    rng = _rng(seed)
    holes = (exclude or SharedSet.empty()).holes()
    picked = _sample_blocks(layout, 64 * KiB, count, holes, rng, "count")
    pages = picked + rng.integers(0, 16, size=count).astype(np.uint64) * np.uint64(PAGE_SIZE)
    ops = fault_ops(pages, FLAG_WRITE | FLAG_CONVERT)
    trace = Trace(ops, _meta("implicit_conversions", layout, count=count, seed=_seed_meta(seed)))
    return _attach_shared(trace, SharedSet.of(pages, pages + np.uint64(PAGE_SIZE)))


# Churn buffer sizes as page orders and their weights: mostly small
# coherent-DMA buffers (4K..64K), some 2M ones (large rings, GPU/NIC pools).
CHURN_ORDERS = (0, 1, 2, 3, 4, 9)
CHURN_WEIGHTS = (0.30, 0.20, 0.15, 0.10, 0.10, 0.15)


def churn_population(
    ram_size: int,
    static_shared: int,
    shared_fraction: float,
    orders: tuple[int, ...] = CHURN_ORDERS,
    weights: tuple[float, ...] = CHURN_WEIGHTS,
) -> np.ndarray:
    """Steady-state live buffer count per order for :func:`churn`."""
    w = np.asarray(weights, dtype=np.float64)
    sizes = np.array([PAGE_SIZE << o for o in orders], dtype=np.float64)
    target = max(0.0, shared_fraction * ram_size - static_shared)
    mean = float((w * sizes).sum())
    # Little's law per order: live bytes split by each order's byte share.
    return np.round(target * (w * sizes / mean) / sizes).astype(np.int64)


def churn(
    layout: GuestLayout | int | str,
    shared_fraction: float = 0.075,
    turnover: float = 1.0,
    exclude: SharedSet | None = None,
    orders: tuple[int, ...] = CHURN_ORDERS,
    weights: tuple[float, ...] = CHURN_WEIGHTS,
    touch: float = 0.5,
    style: str = "tdx",
    seed: int | np.random.Generator | None = 0,
) -> Trace:
    """Steady-state churn of shared buffers around a target shared fraction.

    The guest allocates shared buffers (private -> shared) and frees them
    (shared -> private). Sizes are ``PAGE_SIZE << order`` with ``orders``
    drawn by ``weights``, naturally aligned. The live population per order
    is :func:`churn_population`: enough that static shared memory
    (``exclude``) plus live buffers make ``shared_fraction`` of RAM. Each
    order runs as a birth-death process: ``P * (1 + turnover)`` buffers are
    born evenly over the run with exponential lifetimes of mean
    ``P / (1 + turnover)`` of the run, so the population ramps to ``P`` and
    is then replaced ``turnover`` times; buffers alive at the end stay
    shared (see :func:`kexec`). Buffers never overlap each other or
    ``exclude``: each order owns random 2 MiB blocks of free RAM (four
    times its population's bytes), cut into slots reused round-robin.

    Each birth is one request (buffers are at most 2 MiB: one TDX request or
    one SNP run), followed with probability ``touch`` by a shared write fault
    on the buffer; each death is one PRIVATE request.

    The trace's ``shared`` attribute is the set of buffers alive at the end.
    """
    layout = _layout(layout)
    _check_fraction("shared_fraction", shared_fraction, 0.5)
    _check_fraction("touch", touch)
    _check_style(style)
    if not isinstance(turnover, (int, float)) or isinstance(turnover, bool) or turnover < 0:
        raise ValueError(f"turnover must be a number >= 0, got {turnover!r}")
    if len(orders) == 0 or len(orders) != len(weights):
        raise ValueError("orders and weights must be non-empty and of equal length")
    if any((not isinstance(o, int)) or o < 0 or o > 9 for o in orders) or len(set(orders)) != len(orders):
        raise ValueError("orders must be distinct ints in [0, 9] (buffers of 4 KiB..2 MiB)")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be >= 0 and not all 0")
    w = w / w.sum()
    rng = _rng(seed)
    exclude = exclude or SharedSet.empty()
    population = churn_population(layout.ram_size, exclude.bytes, shared_fraction, tuple(orders), tuple(w))

    blocks = _aligned_blocks(layout, SZ_2M)
    blocks = blocks[blocks >= np.uint64(SZ_2M)]
    blocks = blocks[~_overlaps(blocks, blocks + np.uint64(SZ_2M), exclude.holes())]
    blocks = blocks[rng.permutation(blocks.size)]
    bytes_per_order = population * np.array([PAGE_SIZE << o for o in orders], dtype=np.int64)
    need = -(-4 * bytes_per_order // SZ_2M)
    if need.sum() > blocks.size:
        raise ValueError(
            f"shared_fraction={shared_fraction} needs {int(need.sum())} free 2 MiB blocks for churn, "
            f"RAM outside the static shared set has {blocks.size}"
        )

    times: list[np.ndarray] = []
    gpas: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    births: list[np.ndarray] = []
    live_s: list[np.ndarray] = []
    live_e: list[np.ndarray] = []
    used = 0
    for o, p, nb in zip(orders, population.tolist(), need.tolist()):
        if p == 0:
            continue
        bsize = PAGE_SIZE << o
        mine = blocks[used : used + nb]
        used += nb
        per_block = SZ_2M // bsize
        slots = (mine[:, None] + np.arange(per_block, dtype=np.uint64)[None, :] * np.uint64(bsize)).ravel()
        slots = slots[rng.permutation(slots.size)]
        n = int(round(p * (1 + turnover)))
        born = (np.arange(n, dtype=np.float64) + rng.random(n)) / n
        mean_life = p / n
        # A slot is reused after slots.size births (>= 4P, i.e. 4 mean
        # lifetimes): clamping lifetimes below that keeps buffers disjoint.
        life = np.minimum(rng.exponential(mean_life, n), 0.999 * slots.size / n)
        died = born + life
        where = slots[np.arange(n) % slots.size]
        alive = died >= 1.0
        times += [born, died[~alive]]
        gpas += [where, where[~alive]]
        sizes += [np.full(n, bsize, np.uint64), np.full(int((~alive).sum()), bsize, np.uint64)]
        births += [np.ones(n, bool), np.zeros(int((~alive).sum()), bool)]
        live_s.append(where[alive])
        live_e.append(where[alive] + np.uint64(bsize))
    if times:
        t = np.concatenate(times)
        order_ = np.argsort(t, kind="stable")
        gpa = np.concatenate(gpas)[order_]
        size = np.concatenate(sizes)[order_]
        birth = np.concatenate(births)[order_]
    else:
        gpa = size = np.zeros(0, np.uint64)
        birth = np.zeros(0, bool)
    conv = set_ops(gpa, size, np.where(birth, SHARED, PRIVATE).astype(np.uint64))
    touched = birth & (rng.random(birth.size) < touch)
    # Interleave: each touched birth is followed by its fault.
    per_op = 1 + touched.astype(np.int64)
    out = empty_ops(int(per_op.sum()))
    pos = np.cumsum(per_op) - per_op
    out[pos] = conv
    out[pos[touched] + 1] = fault_ops(gpa[touched], FLAG_WRITE)
    live = SharedSet.of(
        np.concatenate(live_s) if live_s else np.zeros(0, np.uint64),
        np.concatenate(live_e) if live_e else np.zeros(0, np.uint64),
    )
    meta = _meta(
        "churn",
        layout,
        shared_fraction=shared_fraction,
        turnover=turnover,
        orders=list(orders),
        weights=[float(x) for x in w],
        touch=touch,
        style=style,
        seed=_seed_meta(seed),
    )
    meta["params"]["population"] = int(population.sum())
    return _attach_shared(Trace(out, meta), live)


def kexec(layout: GuestLayout | int | str, shared: SharedSet, style: str = "tdx") -> Trace:
    """kexec: the outgoing kernel converts every shared range back to private.

    Walks ``shared`` in address order; each maximal shared range is one
    conversion to PRIVATE, split per ``style`` (:func:`split_requests`).
    """
    layout = _layout(layout)
    _check_style(style)
    if not isinstance(shared, SharedSet):
        raise TypeError(f"shared must be a SharedSet, got {type(shared).__name__}")
    ops = _convert(shared.starts, shared.ends, PRIVATE, style)
    return _attach_shared(Trace(ops, _meta("kexec", layout, style=style)), SharedSet.empty())


# tools/testing/selftests/kvm/x86_64/private_mem_conversions_test.c
BASE_DATA_GPA = SZ_4G
PER_CPU_DATA_SIZE = SZ_2M + PAGE_SIZE
SELFTEST_RANGES = ((0, PAGE_SIZE), (0, SZ_2M), (PAGE_SIZE, PAGE_SIZE), (PAGE_SIZE, SZ_2M), (SZ_2M, PAGE_SIZE))


def checkerboard(
    layout: GuestLayout | int | str = 4 * GiB + 64 * MiB,
    nr_vcpus: int = 4,
    iterations: int = 2,
    exact: bool = False,
    seed: int | np.random.Generator | None = 0,
) -> Trace:
    """The kernel selftest's conversion pattern as a multi-vCPU stress.

    Like private_mem_conversions_test: vCPU ``i`` owns the 4 MiB chunk at
    ``4 GiB + i * 4 MiB`` (PER_CPU_DATA_SIZE = 2 MiB + 4 KiB, aligned up to
    2 MiB), memory starts shared, and for each of the selftest's test ranges
    ((0,4K), (0,2M), (4K,4K), (4K,2M), (2M,4K)) the vCPU: writes it (shared
    fault), converts it to private, writes it (private fault), converts
    every odd page back to shared (the checkerboard) with a shared fault on
    each, converts the range to shared and writes it, then converts its
    whole data area to shared. With ``exact`` the checkerboard is skipped for
    ranges over 4K, as in the selftest; by default every range gets it (the
    stress). ``iterations`` repeats the guest code (the selftest runs it
    twice). vCPU streams are interleaved at random, op by op.

    The layout needs ``nr_vcpus * 4 MiB`` of RAM from 4 GiB up; the default
    layout has 64 MiB there. No VM creation pass: memory starts shared.
    """
    layout = _layout(layout)
    _check_count("nr_vcpus", nr_vcpus, 1)
    _check_count("iterations", iterations, 1)
    rng = _rng(seed)
    per_cpu = -(-PER_CPU_DATA_SIZE // SZ_2M) * SZ_2M
    need = BASE_DATA_GPA + nr_vcpus * per_cpu
    high = [r for r in layout.regions if r.gpa >= BASE_DATA_GPA]
    if not high or high[0].gpa != BASE_DATA_GPA or high[-1].end < need:
        raise ValueError(f"checkerboard with {nr_vcpus} vCPUs needs RAM from 4 GiB to {need:#x}")

    def one_vcpu(base: int) -> np.ndarray:
        parts: list[np.ndarray] = []
        w = FLAG_WRITE
        for _ in range(iterations):
            for off, size in SELFTEST_RANGES:
                gpa = base + off
                parts.append(fault_ops(gpa, w))
                parts.append(set_ops(gpa, size, PRIVATE))
                parts.append(fault_ops(gpa, w | FLAG_PRIVATE))
                if size <= PAGE_SIZE or not exact:
                    odd = np.arange(1, size // PAGE_SIZE, 2, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(gpa)
                    pair = np.empty(odd.size * 2, dtype=parts[0].dtype)
                    pair[0::2] = set_ops(odd, PAGE_SIZE, SHARED)
                    pair[1::2] = fault_ops(odd, w)
                    parts.append(pair)
                parts.append(set_ops(gpa, size, SHARED))
                parts.append(fault_ops(gpa, w))
                parts.append(set_ops(base, PER_CPU_DATA_SIZE, SHARED))
        return np.concatenate(parts)

    streams = [one_vcpu(BASE_DATA_GPA + i * per_cpu) for i in range(nr_vcpus)]
    owner = np.concatenate([np.full(s.size, i, np.int64) for i, s in enumerate(streams)])
    owner = owner[rng.permutation(owner.size)]
    out = empty_ops(owner.size)
    for i, s in enumerate(streams):
        out[owner == i] = s  # keeps each vCPU's own order
    meta = _meta("checkerboard", layout, nr_vcpus=nr_vcpus, iterations=iterations, exact=exact, seed=_seed_meta(seed))
    return Trace(out, meta)


def boot_and_churn(
    guest: GuestLayout | int | str = 64 * GiB,
    style: str = "tdx",
    nr_vcpus: int = 8,
    dma_buffers: int = 32,
    accept_fraction: float = 0.5,
    implicit: int = 64,
    shared_fraction: float = 0.075,
    turnover: float = 1.0,
    seed: int = 0,
    kexec_at_end: bool = True,
) -> Trace:
    """The default composite: a confidential guest's life on one VM.

    Phases, in order: ``setup`` (guest_memfd + memslots), ``creation``
    (:func:`vm_creation`), ``sharing`` (:func:`firmware_sharing`),
    ``acceptance`` (:func:`lazy_acceptance` of ``accept_fraction`` of the
    rest), ``implicit`` (:func:`implicit_conversions`), ``churn``
    (:func:`churn` to ``shared_fraction``), ``kexec`` (:func:`kexec` of
    everything still shared). Sub-generators get independent seeds derived
    from ``seed``.
    """
    layout = _layout(guest)
    seeds = np.random.SeedSequence(seed).spawn(5)
    rngs = [np.random.default_rng(s) for s in seeds]
    parts: list[tuple[str, Trace]] = [("setup", setup(layout)), ("creation", vm_creation(layout))]
    share = firmware_sharing(layout, style=style, nr_vcpus=nr_vcpus, dma_buffers=dma_buffers, seed=rngs[0])
    shared: SharedSet = share.shared  # type: ignore[attr-defined]
    parts.append(("sharing", share))
    parts.append(("acceptance", lazy_acceptance(layout, accept_fraction, exclude=shared, seed=rngs[1])))
    imp = implicit_conversions(layout, implicit, exclude=shared, seed=rngs[2])
    shared = shared.union(imp.shared)  # type: ignore[attr-defined]
    parts.append(("implicit", imp))
    ch = churn(layout, shared_fraction, turnover, exclude=shared, style=style, seed=rngs[3])
    shared = shared.union(ch.shared)  # type: ignore[attr-defined]
    parts.append(("churn", ch))
    if kexec_at_end:
        parts.append(("kexec", kexec(layout, shared, style)))
    meta = _meta(
        "boot-and-churn",
        layout,
        guest=layout.ram_size,
        style=style,
        nr_vcpus=nr_vcpus,
        dma_buffers=dma_buffers,
        accept_fraction=accept_fraction,
        implicit=implicit,
        shared_fraction=shared_fraction,
        turnover=turnover,
        seed=seed,
        kexec_at_end=kexec_at_end,
    )
    trace = concat(parts, meta)
    return _attach_shared(trace, SharedSet.empty() if kexec_at_end else shared)


def _with_setup(name: str, layout: GuestLayout, parts: list[tuple[str, Trace]], **params: Any) -> Trace:
    return concat([("setup", setup(layout))] + parts, _meta(name, layout, guest=layout.ram_size, **params))


def _wl_creation(guest: Any = 64 * GiB, **_: Any) -> Trace:
    layout = _layout(guest)
    return _with_setup("vm-creation", layout, [("creation", vm_creation(layout))])


def _wl_sharing(guest: Any = 64 * GiB, style: str = "tdx", seed: int = 0, **_: Any) -> Trace:
    layout = _layout(guest)
    return _with_setup(
        "firmware-sharing",
        layout,
        [("creation", vm_creation(layout)), ("sharing", firmware_sharing(layout, style=style, seed=seed))],
        style=style,
        seed=seed,
    )


def _wl_acceptance(guest: Any = 64 * GiB, seed: int = 0, accept_fraction: float = 1.0, **_: Any) -> Trace:
    layout = _layout(guest)
    return _with_setup(
        "acceptance",
        layout,
        [("creation", vm_creation(layout)), ("acceptance", lazy_acceptance(layout, accept_fraction, seed=seed))],
        seed=seed,
        accept_fraction=accept_fraction,
    )


def _wl_implicit(guest: Any = 64 * GiB, seed: int = 0, implicit: int = 1024, **_: Any) -> Trace:
    layout = _layout(guest)
    return _with_setup(
        "implicit",
        layout,
        [("creation", vm_creation(layout)), ("implicit", implicit_conversions(layout, implicit, seed=seed))],
        seed=seed,
        implicit=implicit,
    )


def _wl_churn(
    guest: Any = 64 * GiB,
    style: str = "tdx",
    seed: int = 0,
    shared_fraction: float = 0.075,
    turnover: float = 1.0,
    **_: Any,
) -> Trace:
    layout = _layout(guest)
    ch = churn(layout, shared_fraction, turnover, style=style, seed=seed)
    return _with_setup(
        "churn",
        layout,
        [("creation", vm_creation(layout)), ("churn", ch), ("kexec", kexec(layout, ch.shared, style))],  # type: ignore[attr-defined]
        style=style,
        seed=seed,
        shared_fraction=shared_fraction,
        turnover=turnover,
    )


def _wl_checkerboard(guest: Any = 4 * GiB + 64 * MiB, seed: int = 0, nr_vcpus: int = 4, **_: Any) -> Trace:
    layout = _layout(guest)
    return _with_setup(
        "checkerboard",
        layout,
        [("checkerboard", checkerboard(layout, nr_vcpus=nr_vcpus, seed=seed))],
        seed=seed,
        nr_vcpus=nr_vcpus,
    )


def _wl_boot_and_churn(guest: Any = 64 * GiB, **kw: Any) -> Trace:
    allowed = {
        "style",
        "nr_vcpus",
        "dma_buffers",
        "accept_fraction",
        "implicit",
        "shared_fraction",
        "turnover",
        "seed",
        "kexec_at_end",
    }
    return boot_and_churn(guest, **{k: v for k, v in kw.items() if k in allowed})


# Named workloads for the CLI and sweeps: name -> (factory, description).
WORKLOADS: dict[str, tuple[Callable[..., Trace], str]] = {
    "boot-and-churn": (
        _wl_boot_and_churn,
        "creation + firmware/kernel sharing + lazy acceptance + implicit conversions + churn + kexec",
    ),
    "vm-creation": (_wl_creation, "every memslot made private in one call each"),
    "firmware-sharing": (_wl_sharing, "creation, then SWIOTLB, per-vCPU pages and DMA buffers shared"),
    "acceptance": (_wl_acceptance, "creation, then lazy acceptance of all RAM in 4 MiB chunks"),
    "implicit": (_wl_implicit, "creation, then 4K conversions from memory-fault exits"),
    "churn": (_wl_churn, "creation, steady-state shared-buffer churn (7.5% shared), kexec"),
    "checkerboard": (_wl_checkerboard, "the private_mem_conversions_test pattern as a multi-vCPU stress"),
}


def make(name: str, guest: int | str | None = None, **params: Any) -> Trace:
    """Builds the named workload (see :data:`WORKLOADS`) for ``guest`` bytes.

    Unknown parameters for a workload are ignored, so one parameter set can
    drive a sweep across workloads. ``discard=True`` runs it as a QEMU VMM
    would: a guest_memfd hole punched after every conversion to shared
    (:func:`memattr.qemu.with_discards`).
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    discard = params.pop("discard", False)
    if not isinstance(discard, bool):
        raise TypeError(f"discard must be a bool, not {type(discard).__name__}")
    factory = WORKLOADS[name][0]
    trace = factory(**params) if guest is None else factory(parse_size(guest), **params)
    if discard:
        from memattr.qemu import with_discards  # qemu builds on this module

        trace = with_discards(trace)
    return trace
