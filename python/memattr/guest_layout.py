"""The guest's RAM layout and its memslots.

What QEMU's q35 machine does: RAM below 4 GiB up to the PCI hole
(``low_limit``, 2 GiB by default; 3 GiB is the i440fx value), the rest from
4 GiB up. One guest_memfd backs all RAM (QEMU makes one per RAM block); the
low slot binds offset 0, the high slot(s) the rest.

A memslot holds at most ``KVM_MEM_MAX_NR_PAGES`` pages (just under 8 TiB;
``kvm_set_memory_region()`` refuses a larger one with EINVAL), so high RAM
past that is cut into several slots. The rule followed is QEMU's
``kvm_set_phys_mem()`` (accel/kvm/kvm-all.c): a RAM section is registered
as consecutive slots of ``MIN(kvm_max_slot_size, remaining)`` bytes, each
binding the next offset of the same RAM block (and so of its guest_memfd).
QEMU sets ``kvm_max_slot_size`` only on s390x (``kvm_set_max_memslot_size``);
on x86 it is unlimited and a guest over 8 TiB fails to start. The model
uses :data:`MAX_SLOT_SIZE`, the largest 1 GiB multiple that fits in
``KVM_MEM_MAX_NR_PAGES`` pages, so every slot boundary stays 1 GiB aligned
and huge pages keep mapping across the whole of RAM.

Guest-physical addresses stop at x86's 52-bit MAXPHYADDR (4 PiB):
:data:`MAX_GPA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from memattr.argcheck import check_count
from memattr.uapi import KVM_MEM_MAX_NR_PAGES, PAGE_SIZE, SZ_1G, SZ_2M, SZ_4G
from memattr.units import GiB, MiB, parse_size

# Userspace addresses of the RAM mapping (page aligned, within a 47-bit VA).
USERSPACE_BASE = 0x7000_0000_0000

# The largest memslot the layouts make: KVM_MEM_MAX_NR_PAGES pages rounded
# down to 1 GiB (8 TiB - 1 GiB).
MAX_SLOT_SIZE = (KVM_MEM_MAX_NR_PAGES * PAGE_SIZE) // SZ_1G * SZ_1G

# x86-64's largest guest-physical address width (5-level EPT/NPT): 52 bits.
MAX_GPA = 1 << 52


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
        slot may hold huge pages). High RAM is cut as QEMU's
        kvm_set_phys_mem() cuts a section (see the module doc): slots of
        :data:`MAX_SLOT_SIZE`, then the rest. ``high_slots`` > 1 instead
        splits high RAM into that many equal-ish memslots (2 MiB multiples)
        to exercise slot crossing, more if one would exceed MAX_SLOT_SIZE.
        RAM must end at or below :data:`MAX_GPA`.
        """
        ram = parse_size(ram_size)
        low = parse_size(low_limit)
        check_count("high_slots", high_slots, 1)
        if ram == 0 or ram % SZ_2M:
            raise ValueError(f"ram_size must be a positive multiple of 2 MiB, got {ram}")
        if low == 0 or low % SZ_2M or low > 3 * GiB + 512 * MiB:
            raise ValueError(f"low_limit must be a multiple of 2 MiB in (0, 3.5 GiB], got {low}")
        low_size = min(ram, low)
        high = ram - low_size
        if high and SZ_4G + high > MAX_GPA:
            raise ValueError(
                f"ram_size {ram} does not fit below x86's 52-bit guest-physical limit: RAM above the "
                f"{low_size}-byte low part starts at 4 GiB and must end by {MAX_GPA:#x} "
                f"(at most {MAX_GPA - SZ_4G + low_size} bytes)"
            )
        regions = [Region(0, 0, low_size, 0)]
        if high:
            blocks = high // SZ_2M
            if high_slots == 1:
                # QEMU: MIN(kvm_max_slot_size, size) per slot, in order.
                full, rest = divmod(high, MAX_SLOT_SIZE)
                per = np.array([MAX_SLOT_SIZE // SZ_2M] * full + ([rest // SZ_2M] if rest else []), dtype=np.int64)
            else:
                n = min(max(high_slots, -(-high // MAX_SLOT_SIZE)), blocks)
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


def as_layout(layout: GuestLayout | int | str) -> GuestLayout:
    """``layout`` itself, or the default layout for that many bytes of RAM."""
    if isinstance(layout, GuestLayout):
        return layout
    return GuestLayout.build(layout)
