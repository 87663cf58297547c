"""Argument checks shared by the workload generators."""

from __future__ import annotations

import numpy as np

def as_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """``seed`` itself if a Generator, else a fresh one seeded with it."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError("seed must be an int")
    return np.random.default_rng(seed)


def check_count(name: str, value: int, lo: int = 0) -> None:
    """``value`` must be an int (not a bool) >= ``lo``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def check_fraction(name: str, value: float, hi: float = 1.0) -> None:
    """``value`` must be a number in [0, ``hi``]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number")
    if not 0.0 <= value <= hi:
        raise ValueError(f"{name} must be in [0, {hi}], got {value}")
