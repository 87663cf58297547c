"""Byte sizes for people: ``"64G"`` <-> bytes, and the binary units."""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PiB = 1 << 50

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": PiB}


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
