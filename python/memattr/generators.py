"""Workload generators: seeded, parameterised models of real conversion patterns.

Every generator returns a :class:`memattr.trace.Trace` (numpy records, see
:mod:`memattr.trace`) for a guest described by a :class:`GuestLayout`, built
without per-page Python loops so a 1 TiB guest's stream (millions of
operations) takes seconds. The same seed gives the same stream.

The guest layout is :mod:`memattr.guest_layout`'s. The VM type is
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
The composite the CLI runs by default (:func:`memattr.workloads.boot_and_churn`)
and the named workloads are in :mod:`memattr.workloads`.

Sizes accept ints (bytes) or strings like ``"64G"``
(:func:`memattr.units.parse_size`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from memattr.argcheck import as_rng, check_count, check_fraction
from memattr.conversions import check_style, convert
from memattr.gpa_ranges import (
    SharedSet,
    aligned_blocks,
    blocks_hit,
    count_blocks,
    overlaps,
    sample_blocks,
    sliced_picks,
)
from memattr.guest_layout import USERSPACE_BASE, GuestLayout, as_layout
from memattr.trace_format import (
    FLAG_CONVERT,
    FLAG_PRIVATE,
    FLAG_WRITE,
    OP_CREATE_GUEST_MEMFD,
    OP_SET_USER_MEMORY_REGION,
    Trace,
    empty_ops,
    fault_ops,
    set_ops,
)
from memattr.uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_SW_PROTECTED_VM,
    PAGE_SIZE,
    SZ_1G,
    SZ_2M,
    SZ_4G,
)
from memattr.units import GiB, KiB, MiB

# arch/x86/mm/mem_encrypt.c (mem_encrypt_setup_arch): SWIOTLB for CoCo guests
# is 6% of RAM clamped to [IO_TLB_DEFAULT_SIZE, SZ_1G]; swiotlb_adjust_size()
# then rounds up to whole segments of IO_TLB_SEGSIZE slabs of 2 KiB.
IO_TLB_DEFAULT_SIZE = 64 * MiB
IO_TLB_SHIFT = 11
IO_TLB_SEGSIZE = 128

# Unaccepted memory is accepted in MAX_PAGE_ORDER blocks (4 MiB on x86).
ACCEPT_CHUNK = 4 * MiB

PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
SHARED = 0

# guest_memfd folio order the workloads ask the Vm for: 2M folios (hugetlb-
# or THP-backed guest_memfd, as in the guest_memfd huge page work), so that
# private memory can be mapped huge and the hugepage "mixed" tracking
# matters. Upstream 6.8 guest_memfd hands out 4K folios only: run with
# Vm(guest_memfd_max_order=0) (CLI: --gmem-max-order 0) for that.
GMEM_MAX_ORDER = 9


def workload_meta(name: str, layout: GuestLayout, **params: Any) -> dict[str, Any]:
    """A generated trace's metadata: name, VM type and kwargs, parameters, layout."""
    return {
        "name": name,
        "vm_type": KVM_X86_SW_PROTECTED_VM,
        "vm_kwargs": {"guest_memfd_max_order": GMEM_MAX_ORDER},
        "params": {k: v for k, v in params.items()},
        "layout": layout.describe(),
    }


def seed_meta(seed: Any) -> Any:
    """A seed as metadata can hold it."""
    return seed if isinstance(seed, int) or seed is None else "generator"


def attach_shared(trace: Trace, shared: SharedSet) -> Trace:
    """``trace`` with a ``shared`` attribute: what is shared once it has run."""
    trace.shared = shared  # type: ignore[attr-defined]
    return trace


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
    layout = as_layout(layout)
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
    meta = workload_meta("setup", layout)
    meta["regions"] = regions
    return Trace(ops, meta)


def vm_creation(layout: GuestLayout | int | str) -> Trace:
    """Every memslot made private in one call each (what QEMU does when it
    registers a guest_memfd-backed slot): ``len(layout.regions)`` sets of
    ``PRIVATE`` covering exactly each slot, in slot order."""
    layout = as_layout(layout)
    r = layout.ram_ranges()
    return Trace(set_ops(r[:, 0], r[:, 1] - r[:, 0], PRIVATE), workload_meta("vm_creation", layout))


def swiotlb_size(ram_size: int) -> int:
    """The CoCo guest kernel's SWIOTLB size for ``ram_size`` bytes of RAM:
    6% clamped to [64 MiB, 1 GiB], rounded up to whole 256 KiB segments."""
    size = ram_size * 6 // 100
    size = min(max(size, IO_TLB_DEFAULT_SIZE), SZ_1G)
    seg = IO_TLB_SEGSIZE << IO_TLB_SHIFT
    return -(-size // seg) * seg


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
    layout = as_layout(layout)
    check_style(style)
    check_count("nr_vcpus", nr_vcpus)
    check_count("dma_buffers", dma_buffers)
    rng = as_rng(seed)
    tlb = swiotlb_size(layout.ram_size)
    tlb_start = ((layout.low_end - tlb) // SZ_2M) * SZ_2M
    if tlb_start < SZ_2M:
        raise ValueError(
            f"low RAM ({layout.low_size} bytes) too small for a {tlb}-byte SWIOTLB plus a 2 MiB floor"
        )
    parts: list[np.ndarray] = []
    parts.append(convert(np.array([tlb_start], np.uint64), np.array([tlb_start + tlb], np.uint64), SHARED, style))

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
    chosen = sample_blocks(layout, 64 * KiB, dma_buffers, holes.holes(), rng, "dma_buffers")
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
        workload_meta(
            "firmware_sharing",
            layout,
            style=style,
            nr_vcpus=nr_vcpus,
            dma_buffers=dma_buffers,
            touch=touch,
            seed=seed_meta(seed),
            swiotlb_bytes=tlb,
        ),
    )
    return attach_shared(trace, shared)


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
    (:func:`lazy_acceptance_chunks` makes the same records in bounded parts.)
    """
    layout = as_layout(layout)
    info: dict[str, Any] = {}
    parts = list(lazy_acceptance_chunks(layout, fraction, exclude, order, seed, info=info))
    ops = np.concatenate(parts) if parts else empty_ops()
    meta = workload_meta("lazy_acceptance", layout, fraction=fraction, order=order, seed=seed_meta(seed))
    meta["params"]["chunks"] = info["chunks"]
    return Trace(ops, meta)


def lazy_acceptance_chunks(
    layout: GuestLayout | int | str,
    fraction: float = 1.0,
    exclude: SharedSet | None = None,
    order: str = "random",
    seed: int | np.random.Generator | None = 0,
    chunk: int = 1 << 20,
    info: dict[str, Any] | None = None,
) -> Iterator[np.ndarray]:
    """:func:`lazy_acceptance`'s records, at most ``chunk`` at a time; the
    chunks are chosen a slice of RAM at a time
    (:func:`memattr.gpa_ranges.sliced_picks`), so memory stays one slice
    whatever the guest's size."""
    layout = as_layout(layout)
    check_fraction("fraction", fraction)
    if order not in ("random", "sequential"):
        raise ValueError(f"order must be 'random' or 'sequential', got {order!r}")
    rng = as_rng(seed)
    holes = (exclude or SharedSet.empty()).holes()
    eligible = count_blocks(layout, ACCEPT_CHUNK) - blocks_hit(layout, ACCEPT_CHUNK, holes)
    n = int(round(fraction * eligible))
    if info is not None:
        info["chunks"] = n
    step = max(1, chunk // 2)
    # Chosen a slice of RAM at a time (memory: one slice, not all RAM); in
    # random order the slices come shuffled, and the chunks in each.
    for picked in sliced_picks(layout, ACCEPT_CHUNK, n, holes, rng, shuffle=order == "random"):
        for lo in range(0, picked.size, step):
            part = picked[lo : lo + step]
            gpa = np.stack([part, part + np.uint64(SZ_2M)], axis=1).ravel()
            yield fault_ops(gpa, FLAG_PRIVATE | FLAG_WRITE)


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
    layout = as_layout(layout)
    check_count("count", count)
    rng = as_rng(seed)
    holes = (exclude or SharedSet.empty()).holes()
    picked = sample_blocks(layout, 64 * KiB, count, holes, rng, "count")
    pages = picked + rng.integers(0, 16, size=count).astype(np.uint64) * np.uint64(PAGE_SIZE)
    ops = fault_ops(pages, FLAG_WRITE | FLAG_CONVERT)
    trace = Trace(ops, workload_meta("implicit_conversions", layout, count=count, seed=seed_meta(seed)))
    return attach_shared(trace, SharedSet.of(pages, pages + np.uint64(PAGE_SIZE)))


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
    times its population's bytes), cut into slots reused round-robin in a
    seeded scrambled order.

    Each birth is one request (buffers are at most 2 MiB: one TDX request or
    one SNP run), followed with probability ``touch`` by a shared write fault
    on the buffer; each death is one PRIVATE request.

    The trace's ``shared`` attribute is the set of buffers alive at the end.
    :func:`churn_chunks` makes the same records in bounded time windows.
    """
    layout = as_layout(layout)
    info: dict[str, Any] = {}
    parts = list(churn_chunks(layout, shared_fraction, turnover, exclude, orders, weights, touch, style, seed, info=info))
    meta = workload_meta(
        "churn",
        layout,
        shared_fraction=shared_fraction,
        turnover=turnover,
        orders=list(orders),
        weights=info["weights"],
        touch=touch,
        style=style,
        seed=seed_meta(seed),
    )
    meta["params"]["population"] = info["population"]
    return attach_shared(Trace(np.concatenate(parts) if parts else empty_ops(), meta), info["shared"])


# Births per random block (each block of births draws from its own seeded
# generator, so a window regenerates exactly the births it needs).
_CHURN_RNG_BLOCK = 1 << 16
# Births per time window: a window's records are its births, their touches
# and the deaths falling in it (about three times this).
CHURN_WINDOW_BIRTHS = 1 << 17


def churn_chunks(
    layout: GuestLayout | int | str,
    shared_fraction: float = 0.075,
    turnover: float = 1.0,
    exclude: SharedSet | None = None,
    orders: tuple[int, ...] = CHURN_ORDERS,
    weights: tuple[float, ...] = CHURN_WEIGHTS,
    touch: float = 0.5,
    style: str = "tdx",
    seed: int | np.random.Generator | None = 0,
    info: dict[str, Any] | None = None,
) -> Iterator[np.ndarray]:
    """:func:`churn`'s records, one time window at a time.

    The run [0, 1) is cut into windows of about ``CHURN_WINDOW_BIRTHS``
    births. A window's records are the births whose birth time falls in it
    and the deaths whose death time does, sorted by time, so every buffer
    dies before its slot is born again. Memory: the buffers still alive
    (their pending deaths, 17 bytes each) plus one window, never the run's
    records. ``info`` (if given) receives ``population``, ``weights`` and,
    once the last window is out, ``shared`` (buffers alive at the end).
    """
    layout = as_layout(layout)
    check_fraction("shared_fraction", shared_fraction, 0.5)
    check_fraction("touch", touch)
    check_style(style)
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
    rng = as_rng(seed)
    exclude = exclude or SharedSet.empty()
    population = churn_population(layout.ram_size, exclude.bytes, shared_fraction, tuple(orders), tuple(w))
    if info is not None:
        info["population"] = int(population.sum())
        info["weights"] = [float(x) for x in w]

    bytes_per_order = population * np.array([PAGE_SIZE << o for o in orders], dtype=np.int64)
    need = -(-4 * bytes_per_order // SZ_2M)
    free = count_blocks(layout, SZ_2M, floor=SZ_2M) - blocks_hit(layout, SZ_2M, exclude.holes(), floor=SZ_2M)
    if need.sum() > free:
        raise ValueError(
            f"shared_fraction={shared_fraction} needs {int(need.sum())} free 2 MiB blocks for churn, "
            f"RAM outside the static shared set has {free}"
        )
    # Chosen a slice of RAM at a time, then shuffled: O(churned memory).
    blocks = np.concatenate(
        [np.zeros(0, np.uint64)] + list(sliced_picks(layout, SZ_2M, int(need.sum()), exclude.holes(), rng, floor=SZ_2M))
    )
    blocks = blocks[rng.permutation(blocks.size)]
    base_seed = int(rng.integers(0, 2**63))

    # One birth-death process per order.
    procs: list[dict[str, Any]] = []
    used = 0
    for k, (o, p, nb) in enumerate(zip(orders, population.tolist(), need.tolist())):
        mine = blocks[used : used + nb]
        used += nb
        n = int(round(p * (1 + turnover)))
        if p == 0 or n == 0:
            continue
        bsize = PAGE_SIZE << o
        per_block = SZ_2M // bsize
        r = np.random.default_rng([base_seed, k])
        # Slot j = q * nb + r: block (r * a + c) mod nb, offset
        # (q * b + r * e + d) mod per_block: a bijection of the slots, so
        # round-robin reuse never overlaps, in a scrambled order.
        a = int(r.integers(1, max(2, nb)))
        while np.gcd(a, nb) != 1:
            a += 1
        procs.append(
            {
                "k": k,
                "n": n,
                "bsize": bsize,
                "mine": mine,
                "nb": nb,
                "per_block": per_block,
                "slots": nb * per_block,
                "a": a % nb if nb > 1 else 0,
                "c": int(r.integers(0, nb)),
                "b": int(r.integers(0, per_block)) * 2 + 1,
                "d": int(r.integers(0, per_block)),
                "e": int(r.integers(0, per_block)),
                "mean_life": p / n,
                "cap": 0.999 * nb * per_block / n,
                "cache": {},
            }
        )

    def births(pr: dict[str, Any], lo: int, hi: int) -> tuple[np.ndarray, ...]:
        """Index, birth time, death time and touch of births lo..hi-1."""
        out = []
        for blk in range(lo // _CHURN_RNG_BLOCK, (hi - 1) // _CHURN_RNG_BLOCK + 1):
            cache = pr["cache"]
            if blk not in cache:
                b0 = blk * _CHURN_RNG_BLOCK
                b1 = min(pr["n"], b0 + _CHURN_RNG_BLOCK)
                g = np.random.default_rng([base_seed, pr["k"], blk + 1])
                m = b1 - b0
                idx = np.arange(b0, b1, dtype=np.int64)
                born = (idx + g.random(m)) / pr["n"]
                life = np.minimum(g.exponential(pr["mean_life"], m), pr["cap"])
                touched = g.random(m) < touch
                if len(cache) >= 2:
                    cache.pop(min(cache))
                cache[blk] = (idx, born, born + life, touched)
            idx, born, died, touched = cache[blk]
            sel = (idx >= lo) & (idx < hi)
            out.append((idx[sel], born[sel], died[sel], touched[sel]))
        return tuple(np.concatenate([o[i] for o in out]) for i in range(4))

    def slot_gpa(pr: dict[str, Any], idx: np.ndarray) -> np.ndarray:
        j = (idx % pr["slots"]).astype(np.uint64)
        nb = np.uint64(pr["nb"])
        q, r = j // nb, j % nb
        blk = (r * np.uint64(pr["a"]) + np.uint64(pr["c"])) % nb
        pb = np.uint64(pr["per_block"])
        off = (q * np.uint64(pr["b"]) + r * np.uint64(pr["e"]) + np.uint64(pr["d"])) % pb
        return pr["mine"][blk.astype(np.int64)] + off * np.uint64(pr["bsize"])

    total = sum(pr["n"] for pr in procs)
    nwin = max(1, -(-total // CHURN_WINDOW_BIRTHS))
    # Pending deaths per window: lists of (time, gpa, size) arrays.
    pending: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(nwin)]
    live_s: list[np.ndarray] = []
    live_e: list[np.ndarray] = []
    for win in range(nwin):
        t0, t1 = win / nwin, (win + 1) / nwin
        times: list[np.ndarray] = []
        gpas: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        kinds: list[np.ndarray] = []  # 1 birth untouched, 2 birth touched, 0 death
        for pr in procs:
            n = pr["n"]
            lo = max(0, int(np.floor(t0 * n)) - 1)
            hi = min(n, int(np.ceil(t1 * n)) + 1)
            if lo >= hi:
                continue
            idx, born, died, touched = births(pr, lo, hi)
            sel = (born >= t0) & ((born < t1) | (win == nwin - 1))
            idx, born, died, touched = idx[sel], born[sel], died[sel], touched[sel]
            where = slot_gpa(pr, idx)
            size = np.full(idx.size, pr["bsize"], np.uint64)
            times.append(born)
            gpas.append(where)
            sizes.append(size)
            kinds.append(1 + touched.astype(np.int8))
            alive = died >= 1.0
            live_s.append(where[alive])
            live_e.append(where[alive] + size[alive])
            dying = ~alive
            dwin = np.minimum((died[dying] * nwin).astype(np.int64), nwin - 1)
            dt, dg, ds = died[dying], where[dying], size[dying]
            for dw in np.unique(dwin).tolist():
                m = dwin == dw
                pending[dw].append((dt[m], dg[m], ds[m]))
        for dt, dg, ds in pending[win]:
            times.append(dt)
            gpas.append(dg)
            sizes.append(ds)
            kinds.append(np.zeros(dt.size, np.int8))
        pending[win] = []
        if not times:
            continue
        t = np.concatenate(times)
        order_ = np.argsort(t, kind="stable")
        gpa = np.concatenate(gpas)[order_]
        size = np.concatenate(sizes)[order_]
        kind = np.concatenate(kinds)[order_]
        del t, order_
        birth = kind > 0
        conv = set_ops(gpa, size, np.where(birth, SHARED, PRIVATE).astype(np.uint64))
        touched_ = kind == 2
        # Interleave: each touched birth is followed by its fault.
        per_op = 1 + touched_.astype(np.int64)
        out = empty_ops(int(per_op.sum()))
        pos = np.cumsum(per_op) - per_op
        out[pos] = conv
        out[pos[touched_] + 1] = fault_ops(gpa[touched_], FLAG_WRITE)
        yield out
    if info is not None:
        info["shared"] = SharedSet.of(
            np.concatenate(live_s) if live_s else np.zeros(0, np.uint64),
            np.concatenate(live_e) if live_e else np.zeros(0, np.uint64),
        )


def kexec(layout: GuestLayout | int | str, shared: SharedSet, style: str = "tdx") -> Trace:
    """kexec: the outgoing kernel converts every shared range back to private.

    Walks ``shared`` in address order; each maximal shared range is one
    conversion to PRIVATE, split per ``style`` (:func:`split_requests`).
    """
    layout = as_layout(layout)
    parts = list(kexec_chunks(shared, style))
    ops = np.concatenate(parts) if parts else empty_ops()
    return attach_shared(Trace(ops, workload_meta("kexec", layout, style=style)), SharedSet.empty())


def kexec_chunks(shared: SharedSet, style: str = "tdx", ranges: int = 1 << 16) -> Iterator[np.ndarray]:
    """:func:`kexec`'s records, ``ranges`` shared ranges at a time."""
    check_style(style)
    if not isinstance(shared, SharedSet):
        raise TypeError(f"shared must be a SharedSet, got {type(shared).__name__}")
    for lo in range(0, shared.starts.size, ranges):
        yield convert(shared.starts[lo : lo + ranges], shared.ends[lo : lo + ranges], PRIVATE, style)


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
    layout = as_layout(layout)
    check_count("nr_vcpus", nr_vcpus, 1)
    check_count("iterations", iterations, 1)
    rng = as_rng(seed)
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
    meta = workload_meta("checkerboard", layout, nr_vcpus=nr_vcpus, iterations=iterations, exact=exact, seed=seed_meta(seed))
    return Trace(out, meta)
