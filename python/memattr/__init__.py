"""memattr: a user-space model of Linux KVM per-page memory attributes."""

from memattr import _native
from memattr._native import RangeTree, XArray  # stores

__all__ = ["_native"]
__all__ += ["RangeTree", "XArray"]
