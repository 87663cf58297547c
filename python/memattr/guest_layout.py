"""The guest's RAM layout and its memslots.

What QEMU's q35 machine does: RAM below 4 GiB up to the PCI hole
(``low_limit``, 2 GiB by default; 3 GiB is the i440fx value), the rest from
4 GiB up. One guest_memfd backs all RAM (QEMU makes one per RAM block); the
low slot binds offset 0, the high slot(s) the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from memattr.argcheck import check_count
from memattr.uapi import SZ_2M, SZ_4G
from memattr.units import GiB, MiB, TiB, parse_size

# Userspace addresses of the RAM mapping (page aligned, within a 47-bit VA).
USERSPACE_BASE = 0x7000_0000_0000


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
        check_count("high_slots", high_slots, 1)
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


def as_layout(layout: GuestLayout | int | str) -> GuestLayout:
    """``layout`` itself, or the default layout for that many bytes of RAM."""
    if isinstance(layout, GuestLayout):
        return layout
    return GuestLayout.build(layout)
