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
    churn_population,
    firmware_sharing,
    implicit_conversions,
    kexec,
    lazy_acceptance,
    setup,
    swiotlb_size,
    vm_creation,
    workload_meta,
)
from memattr.gpa_ranges import SharedSet
from memattr.guest_layout import USERSPACE_BASE, GuestLayout, Region, as_layout
from memattr.qemu import with_discards
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
    from ``seed``.
    """
    layout = as_layout(guest)
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
    trace = concat(parts, meta)
    return attach_shared(trace, SharedSet.empty() if kexec_at_end else shared)


def _with_setup(name: str, layout: GuestLayout, parts: list[tuple[str, Trace]], **params: Any) -> Trace:
    return concat([("setup", setup(layout))] + parts, workload_meta(name, layout, guest=layout.ram_size, **params))


def _wl_creation(guest: Any = 64 * GiB, **_: Any) -> Trace:
    layout = as_layout(guest)
    return _with_setup("vm-creation", layout, [("creation", vm_creation(layout))])


def _wl_sharing(guest: Any = 64 * GiB, style: str = "tdx", seed: int = 0, **_: Any) -> Trace:
    layout = as_layout(guest)
    return _with_setup(
        "firmware-sharing",
        layout,
        [("creation", vm_creation(layout)), ("sharing", firmware_sharing(layout, style=style, seed=seed))],
        style=style,
        seed=seed,
    )


def _wl_acceptance(guest: Any = 64 * GiB, seed: int = 0, accept_fraction: float = 1.0, **_: Any) -> Trace:
    layout = as_layout(guest)
    return _with_setup(
        "acceptance",
        layout,
        [("creation", vm_creation(layout)), ("acceptance", lazy_acceptance(layout, accept_fraction, seed=seed))],
        seed=seed,
        accept_fraction=accept_fraction,
    )


def _wl_implicit(guest: Any = 64 * GiB, seed: int = 0, implicit: int = 1024, **_: Any) -> Trace:
    layout = as_layout(guest)
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
    layout = as_layout(guest)
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
    layout = as_layout(guest)
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
        trace = with_discards(trace)
    return trace
