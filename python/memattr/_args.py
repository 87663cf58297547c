"""The one integer-argument rule of the Python side (the binding layer has
the same rule in ``rust/py/args.rs``): exact ints take a fast path; anything
else with ``__index__`` (numpy integers included) is accepted; ``bool`` and
``numpy.bool_`` are refused, since a flag passed where a number belongs is a
caller's bug. Errors name the argument: TypeError for a non-integer,
ValueError outside the type's range."""

from __future__ import annotations

import operator


def _index(name: str, value: object) -> int:
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def uint(name: str, value: object, bits: int = 64) -> int:
    """``value`` as an unsigned ``bits``-bit int."""
    if type(value) is not int:
        value = _index(name, value)
    if value < 0 or value >> bits:  # type: ignore[operator]
        raise ValueError(f"{name} must be a u{bits} (0 <= {name} < 2**{bits}), got {value}")
    return value  # type: ignore[return-value]


def sint(name: str, value: object, bits: int = 64) -> int:
    """``value`` as a signed ``bits``-bit int (a loff_t)."""
    if type(value) is not int:
        value = _index(name, value)
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):  # type: ignore[operator]
        raise ValueError(f"{name} must be an s{bits}, got {value}")
    return value  # type: ignore[return-value]


def boolean(name: str, value: object) -> bool:
    """Exactly True or False (numpy.bool_ too)."""
    if value is True or value is False:
        return value  # type: ignore[return-value]
    if type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


__all__ = ["boolean", "sint", "uint"]
