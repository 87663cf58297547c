"""Workloads: the generators' public namespace, the default composite
(:func:`boot_and_churn`) and the named workloads the CLI and sweeps run
(:data:`WORKLOADS`, :func:`make`).

Every generator returns a :class:`memattr.trace.Trace` (numpy records, see
:mod:`memattr.trace`) for a guest described by a :class:`GuestLayout`, built
without per-page Python loops so a 1 TiB guest's stream (millions of
operations) takes seconds. The same seed gives the same stream.

The parts, each in its own module and all importable from here:

* :mod:`memattr.units` - sizes: :func:`parse_size`, :func:`format_size`,
  KiB..TiB;
* :mod:`memattr.guest_layout` - :class:`GuestLayout` and :class:`Region`
  (RAM below the PCI hole and from 4 GiB up, one guest_memfd for all RAM);
* :mod:`memattr.gpa_ranges` - vectorised range sets, :class:`SharedSet`;
* :mod:`memattr.conversions` - TDX/SNP request splitting
  (:func:`split_requests`);
* :mod:`memattr.generators` - the generators (:func:`setup`,
  :func:`vm_creation`, :func:`firmware_sharing`, :func:`lazy_acceptance`,
  :func:`implicit_conversions`, :func:`churn`, :func:`kexec`,
  :func:`checkerboard`), each documented at its definition.

``make(..., discard=True)`` runs a workload as a QEMU VMM would, punching
the guest_memfd hole after every conversion to shared
(:func:`memattr.qemu.with_discards`).

Sizes accept ints (bytes) or strings like ``"64G"`` (:func:`parse_size`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from memattr.conversions import STYLES, TDX_MAP_GPA_MAX_LEN, VMGEXIT_PSC_MAX_ENTRY, split_requests
from memattr.generators import (
    ACCEPT_CHUNK,
    BASE_DATA_GPA,
    CHURN_ORDERS,
    CHURN_WEIGHTS,
    GMEM_MAX_ORDER,
    GUEST_MEMFD_FD,
    IO_TLB_DEFAULT_SIZE,
    IO_TLB_SEGSIZE,
    IO_TLB_SHIFT,
    PER_CPU_DATA_SIZE,
    PRIVATE,
    SELFTEST_RANGES,
    SHARED,
    attach_shared,
    checkerboard,
    churn,
    churn_chunks,
    churn_population,
    firmware_sharing,
    implicit_conversions,
    kexec,
    kexec_chunks,
    lazy_acceptance,
    lazy_acceptance_chunks,
    setup,
    swiotlb_size,
    vm_creation,
    workload_meta,
)
from memattr.gpa_ranges import SharedSet
from memattr.guest_layout import USERSPACE_BASE, GuestLayout, Region, as_layout
from memattr.qemu import discard_stream, with_discards
from memattr.stream import TraceStream
from memattr.trace_format import (
    FLAG_CONVERT,
    FLAG_PRIVATE,
    FLAG_WRITE,
    OP_CREATE_GUEST_MEMFD,
    OP_SET_USER_MEMORY_REGION,
    Trace,
    concat,
    empty_ops,
    fault_ops,
    set_ops,
)

# The kernel constants workloads are made of (defined in memattr.uapi).
from memattr.uapi import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_SW_PROTECTED_VM,
    PAGE_SIZE,
    SZ_1G,
    SZ_2M,
    SZ_4G,
)
from memattr.units import GiB, KiB, MiB, TiB, format_size, parse_size

__all__ = [
    "ACCEPT_CHUNK",
    "BASE_DATA_GPA",
    "CHURN_ORDERS",
    "CHURN_WEIGHTS",
    "FLAG_CONVERT",
    "FLAG_PRIVATE",
    "FLAG_WRITE",
    "GMEM_MAX_ORDER",
    "GUEST_MEMFD_FD",
    "GiB",
    "GuestLayout",
    "IO_TLB_DEFAULT_SIZE",
    "IO_TLB_SEGSIZE",
    "IO_TLB_SHIFT",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_X86_SW_PROTECTED_VM",
    "KiB",
    "MiB",
    "OP_CREATE_GUEST_MEMFD",
    "OP_SET_USER_MEMORY_REGION",
    "PAGE_SIZE",
    "PER_CPU_DATA_SIZE",
    "PRIVATE",
    "Region",
    "SELFTEST_RANGES",
    "SHARED",
    "STYLES",
    "SZ_1G",
    "SZ_2M",
    "SZ_4G",
    "SharedSet",
    "TDX_MAP_GPA_MAX_LEN",
    "TiB",
    "Trace",
    "USERSPACE_BASE",
    "VMGEXIT_PSC_MAX_ENTRY",
    "WORKLOADS",
    "boot_and_churn",
    "boot_and_churn_stream",
    "churn_chunks",
    "kexec_chunks",
    "lazy_acceptance_chunks",
    "stream",
    "checkerboard",
    "churn",
    "churn_population",
    "concat",
    "empty_ops",
    "fault_ops",
    "firmware_sharing",
    "format_size",
    "implicit_conversions",
    "kexec",
    "lazy_acceptance",
    "make",
    "parse_size",
    "set_ops",
    "setup",
    "split_requests",
    "swiotlb_size",
    "vm_creation",
]


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
    from ``seed``. :func:`boot_and_churn_stream` makes the same records in
    bounded chunks.
    """
    st = boot_and_churn_stream(
        guest, style, nr_vcpus, dma_buffers, accept_fraction, implicit, shared_fraction, turnover, seed, kexec_at_end
    )
    trace = st.materialize()
    return attach_shared(trace, st.state["shared"])


def boot_and_churn_stream(
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
) -> TraceStream:
    """:func:`boot_and_churn` as a :class:`memattr.stream.TraceStream`."""
    layout = as_layout(guest)
    meta = workload_meta(
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
    first = setup(layout)
    meta["regions"] = first.meta["regions"]
    state: dict[str, Any] = {}

    def source() -> Iterator[tuple[str, np.ndarray]]:
        seeds = np.random.SeedSequence(seed).spawn(5)
        rngs = [np.random.default_rng(s) for s in seeds]
        yield "setup", first.ops
        yield "creation", vm_creation(layout).ops
        share = firmware_sharing(layout, style=style, nr_vcpus=nr_vcpus, dma_buffers=dma_buffers, seed=rngs[0])
        shared: SharedSet = share.shared  # type: ignore[attr-defined]
        yield "sharing", share.ops
        for ops in lazy_acceptance_chunks(layout, accept_fraction, exclude=shared, seed=rngs[1]):
            yield "acceptance", ops
        imp = implicit_conversions(layout, implicit, exclude=shared, seed=rngs[2])
        shared = shared.union(imp.shared)  # type: ignore[attr-defined]
        yield "implicit", imp.ops
        info: dict[str, Any] = {}
        for ops in churn_chunks(layout, shared_fraction, turnover, exclude=shared, style=style, seed=rngs[3], info=info):
            yield "churn", ops
        shared = shared.union(info["shared"])
        if kexec_at_end:
            for ops in kexec_chunks(shared, style):
                yield "kexec", ops
        state["shared"] = SharedSet.empty() if kexec_at_end else shared

    # An estimate for progress bars (the exact count is known once generated).
    population = int(churn_population(layout.ram_size, 0, shared_fraction).sum())
    births = population * (1 + turnover)
    accepted = accept_fraction * layout.ram_size / ACCEPT_CHUNK
    hint = int(2 * accepted + 2 * births + implicit + len(layout.regions) * 2 + 1)
    return TraceStream(meta, source, length_hint=hint, state=state)


def _stream_with_setup(
    name: str, layout: GuestLayout, parts: Callable[[], Iterator[tuple[str, np.ndarray]]], **params: Any
) -> TraceStream:
    """A named workload: setup, then ``parts()``'s phases, as a stream."""
    first = setup(layout)
    meta = workload_meta(name, layout, guest=layout.ram_size, **params)
    meta["regions"] = first.meta["regions"]

    def source() -> Iterator[tuple[str, np.ndarray]]:
        yield "setup", first.ops
        yield from parts()

    return TraceStream(meta, source)


def _wl_creation(guest: Any = 64 * GiB, **_: Any) -> TraceStream:
    layout = as_layout(guest)
    return _stream_with_setup("vm-creation", layout, lambda: iter([("creation", vm_creation(layout).ops)]))


def _wl_sharing(guest: Any = 64 * GiB, style: str = "tdx", seed: int = 0, **_: Any) -> TraceStream:
    layout = as_layout(guest)

    def parts() -> Iterator[tuple[str, np.ndarray]]:
        yield "creation", vm_creation(layout).ops
        yield "sharing", firmware_sharing(layout, style=style, seed=seed).ops

    return _stream_with_setup("firmware-sharing", layout, parts, style=style, seed=seed)


def _wl_acceptance(guest: Any = 64 * GiB, seed: int = 0, accept_fraction: float = 1.0, **_: Any) -> TraceStream:
    layout = as_layout(guest)

    def parts() -> Iterator[tuple[str, np.ndarray]]:
        yield "creation", vm_creation(layout).ops
        for ops in lazy_acceptance_chunks(layout, accept_fraction, seed=seed):
            yield "acceptance", ops

    return _stream_with_setup("acceptance", layout, parts, seed=seed, accept_fraction=accept_fraction)


def _wl_implicit(guest: Any = 64 * GiB, seed: int = 0, implicit: int = 1024, **_: Any) -> TraceStream:
    layout = as_layout(guest)

    def parts() -> Iterator[tuple[str, np.ndarray]]:
        yield "creation", vm_creation(layout).ops
        yield "implicit", implicit_conversions(layout, implicit, seed=seed).ops

    return _stream_with_setup("implicit", layout, parts, seed=seed, implicit=implicit)


def _wl_churn(
    guest: Any = 64 * GiB,
    style: str = "tdx",
    seed: int = 0,
    shared_fraction: float = 0.075,
    turnover: float = 1.0,
    **_: Any,
) -> TraceStream:
    layout = as_layout(guest)

    def parts() -> Iterator[tuple[str, np.ndarray]]:
        yield "creation", vm_creation(layout).ops
        info: dict[str, Any] = {}
        for ops in churn_chunks(layout, shared_fraction, turnover, style=style, seed=seed, info=info):
            yield "churn", ops
        for ops in kexec_chunks(info["shared"], style):
            yield "kexec", ops

    return _stream_with_setup(
        "churn", layout, parts, style=style, seed=seed, shared_fraction=shared_fraction, turnover=turnover
    )


def _wl_checkerboard(guest: Any = 4 * GiB + 64 * MiB, seed: int = 0, nr_vcpus: int = 4, **_: Any) -> TraceStream:
    layout = as_layout(guest)
    return _stream_with_setup(
        "checkerboard",
        layout,
        lambda: iter([("checkerboard", checkerboard(layout, nr_vcpus=nr_vcpus, seed=seed).ops)]),
        seed=seed,
        nr_vcpus=nr_vcpus,
    )


def _wl_boot_and_churn(guest: Any = 64 * GiB, **kw: Any) -> TraceStream:
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
    return boot_and_churn_stream(guest, **{k: v for k, v in kw.items() if k in allowed})


# Named workloads for the CLI and sweeps: name -> (factory, description).
WORKLOADS: dict[str, tuple[Callable[..., TraceStream], str]] = {
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


def stream(name: str, guest: int | str | None = None, **params: Any) -> TraceStream:
    """The named workload (see :data:`WORKLOADS`) for ``guest`` bytes, as a
    :class:`memattr.stream.TraceStream`: generated in bounded chunks each
    time it is read, so a replay of a 64 TiB guest never holds its
    operations. Parameters as for :func:`make`."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    discard = params.pop("discard", False)
    if not isinstance(discard, bool):
        raise TypeError(f"discard must be a bool, not {type(discard).__name__}")
    factory = WORKLOADS[name][0]
    st = factory(**params) if guest is None else factory(parse_size(guest), **params)
    if discard:
        st = discard_stream(st)
    return st


def make(name: str, guest: int | str | None = None, **params: Any) -> Trace:
    """Builds the named workload (see :data:`WORKLOADS`) for ``guest`` bytes.

    Unknown parameters for a workload are ignored, so one parameter set can
    drive a sweep across workloads. ``discard=True`` runs it as a QEMU VMM
    would: a guest_memfd hole punched after every conversion to shared
    (:func:`memattr.qemu.with_discards`). The whole trace is held in
    memory: :func:`stream` is the same records in bounded chunks.
    """
    return stream(name, guest, **params).materialize()
