"""memattr: a user-space model of Linux KVM per-page memory attributes."""

from memattr import _native

__all__ = ["_native"]
