"""Type stubs for the native module memattr._native."""

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

# --- stores ---
# Ranges are half open, [start, end), with start < end; every gfn, value and
# mask is a u64. Bad arguments raise ValueError/TypeError/OverflowError that
# name the argument, and change nothing.

class _Store:
    def __init__(self) -> None: ...
    def get(self, gfn: int) -> int:
        """The value at gfn (0 if never set)."""
    def set_range(self, start: int, end: int, value: int) -> None:
        """Sets every gfn in [start, end) to value (0 erases)."""
    def has_value(self, start: int, end: int, value: int, mask: int | None = None) -> bool:
        """True if every gfn in [start, end) has get(gfn) & mask == value & mask.
        mask defaults to every bit."""
    def count_pages(self, start: int, end: int, value: int, mask: int | None = None) -> int:
        """How many gfns in [start, end) have get(gfn) & mask == value & mask."""
    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Maximal (start, end, value) runs covering [start, end) exactly,
        in order, zero runs included."""
    def get_many(self, gfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """get() of every element of a 1-D uint64 array, as a new uint64 array."""
    def set_many(
        self,
        starts: npt.NDArray[np.uint64],
        ends: npt.NDArray[np.uint64],
        values: npt.NDArray[np.uint64],
    ) -> None:
        """set_range(starts[i], ends[i], values[i]) for every i, in order; all
        ranges are checked before any is applied."""
    def memory_bytes(self) -> int:
        """Bytes the structure occupies (XArray: nodes at 576 bytes each)."""
    def entry_count(self) -> int:
        """Stored runs (RangeTree) or value entries (XArray)."""
    def __len__(self) -> int: ...
    def reserve(self, start: int, end: int, limit: int | None = None) -> None:
        """Allocates ahead what set_range(start, end, _) needs (XArray: like
        xa_reserve on every index). Raises MemoryError, keeping nothing, if
        memory_bytes() would exceed limit."""
    def release_reservations(self) -> None:
        """Drops reserved storage that no set_range used."""

class RangeTree(_Store):
    """Maximal runs of equal non-zero value in a B-tree: set_range costs
    O(log n + runs touched) and memory follows runs, not pages."""

class XArray(_Store):
    """The kernel's per-page xarray: 64-slot nodes, one entry per page,
    nodes allocated on demand and freed when empty."""
