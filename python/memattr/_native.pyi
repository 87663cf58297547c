"""Type stubs for the native module memattr._native."""

from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt

# --- stores ---
# Ranges are half open, [start, end), with start < end; every gfn, value and
# mask is a u64. Bad arguments raise TypeError (not an int, or a bool) or
# ValueError (out of range, an empty range) naming the argument, and change
# nothing.

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
    def reserve_unless_has_value(
        self, start: int, end: int, value: int, limit: int | None = None
    ) -> bool:
        """has_value(start, end, value), and if False, reserve(start, end,
        limit): the set path's early exit and reservation in one call. True
        means every gfn already has value and nothing was reserved."""
    def release_reservations(self) -> None:
        """Drops reserved storage that no set_range used."""

class RangeTree(_Store):
    """Maximal runs of equal non-zero value in a B-tree: set_range costs
    O(log n + runs touched) and memory follows runs, not pages."""

class XArray(_Store):
    """The kernel's per-page xarray: 64-slot nodes, one entry per page,
    nodes allocated on demand and freed when empty."""

class MapleTree(_Store):
    """The kernel's maple tree as the guest_memfd in-place series uses it:
    256-byte range64 nodes of 16 slots, equal neighbours merged, nodes
    preallocated (and counted) before each store."""

# --- hugepage ---
# Per-memslot 2M (level 2) / 1G (level 3) hugepage tracking: the disallow
# rules of kvm_alloc_memslot_metadata() and the KVM_LPAGE_MIXED_FLAG state
# of kvm_arch_post_set_memory_attributes(). Both trackers give identical
# results; stores are RangeTree or XArray objects (TypeError otherwise).
# Bad arguments raise TypeError (not an int, or a bool) or ValueError naming
# the argument, and change nothing.

class _HugepageTracker:
    def __init__(self, base_gfn: int, npages: int, userspace_addr: int | None = None) -> None:
        """Head/tail hugepages not wholly inside the slot, and every hugepage
        of a slot whose gfn and userspace address are incongruent modulo the
        hugepage size, are disallowed; mixed flags start clear. ValueError if
        npages is 0 or base_gfn + npages wraps."""
    @property
    def base_gfn(self) -> int: ...
    @property
    def npages(self) -> int: ...
    @property
    def userspace_addr(self) -> int: ...
    def init_memory_attributes(self, store: RangeTree | XArray | MapleTree) -> None:
        """kvm_mmu_init_memslot_memory_attributes(): the mixed flag of every
        hugepage wholly inside the slot, from the store's current values."""
    def post_set_memory_attributes(self, store: RangeTree | XArray | MapleTree, start: int, end: int, attrs: int) -> None:
        """kvm_arch_post_set_memory_attributes() for [start, end) (inside the
        slot) just set to attrs: covered hugepages cleared, straddling head
        and tail re-checked; 2M first, 1G consumes the 2M results."""
    def test_mixed(self, gfn: int, level: int) -> bool:
        """hugepage_test_mixed() of the level-2/3 hugepage holding gfn."""
    def straddling_hugepages(self, start: int, end: int) -> list[tuple[int, int]]:
        """The head and tail hugepages (2M, then 1G) straddling [start, end)
        (inside the slot, start < end) that lie wholly inside the slot and
        are not mixed, as (start_gfn, end_gfn): what the pre-set pass adds to
        the ongoing invalidation."""
    def straddling_hugepages_hull(self, start: int, end: int) -> tuple[int, int] | None:
        """The smallest (start_gfn, end_gfn) covering every range
        straddling_hugepages() returns, None if there are none."""
    def disallow_lpage(self, gfn: int, level: int) -> bool:
        """lpage_info_slot(gfn, slot, level)->disallow_lpage != 0."""
    def max_mapping_level(self, gfn: int, max_level: int | None = None) -> int:
        """Highest level <= max_level (default 3) whose hugepage at gfn is
        not disallowed (1 if none)."""
    def mixed_runs(self, level: int) -> list[tuple[int, int]]:
        """Mixed hugepages of level 2/3 as (start_gfn, end_gfn) runs."""
    def memory_bytes(self) -> int:
        """Bytes of tracking state."""

class RangeHugepageTracker(_HugepageTracker):
    """Tracking that keeps only the mixed flags that are set (a sparse
    bitmap of hugepage numbers): a post-set pass costs O(log n + runs),
    whatever the size of the range."""

class LpageInfoTracker(_HugepageTracker):
    """The kernel's lpage_info arrays (one word per hugepage) and its
    per-hugepage loops: the reference and the faithful baseline."""

class TdpPageTable:
    """Leaf mappings of one TDP MMU root, kept as the TDP MMU's radix
    page table (levels 1 = 4K, 2 = 2M, 3 = 1G); a gfn is mapped by at most
    one leaf."""
    def __init__(self) -> None: ...
    def map(self, gfn: int, level: int, private: bool = False) -> tuple[bool, tuple[int, int, int]]:
        """Installs a leaf at level covering gfn, replacing smaller leaves
        under it and zapping a bigger leaf over it. Returns (installed, leaves
        removed per level); installed is False if that leaf already existed.
        ValueError if gfn << 12 does not fit in 64 bits."""
    def zap(self, start: int, end: int) -> tuple[int, int, int]:
        """Removes every leaf intersecting [start, end) (huge leaves whole);
        returns the leaves removed per level."""
    def split_huge_pages(self, start: int, end: int) -> tuple[int, int, int]:
        """Splits every 2M and 1G leaf intersecting [start, end) into the 4K
        leaves mapping the same gfns; returns the huge leaves split per
        level (4K always 0). ValueError unless start < end."""
    def zap_all(self) -> tuple[int, int, int]:
        """Removes every leaf; returns the leaves removed per level."""
    def mapped_level(self, gfn: int) -> int:
        """Level of the leaf mapping gfn, 0 if unmapped."""
    def counts(self) -> tuple[int, int, int]:
        """Live leaves per level (4K, 2M, 1G)."""
    def runs(self, level: int) -> list[tuple[int, int]]:
        """The leaves of level as (start_gfn, end_gfn) runs."""

UAPI: dict[str, int]
"""The core's uapi constants by name (memattr.uapi holds them equal)."""

_HostTuple = tuple[str, int, bool, bool, bool, bool, bool, int, int, int]
"""A host profile as plain data: (vendor, vm_types, sw_protected_vm, smm,
generic_memory_attributes, guest_memfd, tdp, max_page_level,
user_address_bits, maxphyaddr); memattr.HostProfile is its typed face."""

def host_profile_default() -> _HostTuple:
    """The default host profile (rust/kvm/host.rs)."""

def host_profile_check(host: _HostTuple) -> None:
    """ValueError unless the profile could be a real host's."""

def check_extension_system(host: _HostTuple, semantics: str, cap: int) -> int:
    """KVM_CHECK_EXTENSION on the system fd (/dev/kvm) of ``host``."""

_Ref = tuple[int, int, int, int, int]
_SlotInfo = tuple[int, int, int, int, int, int, int | None, int, bool, int]

class ModelLock:
    """A modelled lock (slots_lock, mmu_lock) shared by the Python driver
    and the core's whole operations; memattr.locks adds lockdep's checks."""
    @property
    def name(self) -> str: ...
    @property
    def owner(self) -> int | None: ...
    def acquire(self, ident: int) -> None: ...
    def release(self) -> None: ...
    def held_by_current_thread(self) -> bool: ...
    def locked(self) -> bool: ...

class Kvm:
    """One VM's core (rust/kvm): its state and every kernel rule. Steps
    (set_checks, pre_set, faultin, ...) are for the Python driver, which holds
    the modelled locks around them; whole operations (set_memory_attributes,
    fault, set_memory_region, replay, ...) take the locks themselves and
    return False/-1/None when this thread already holds one."""
    def __init__(
        self,
        vm_type: int,
        store: RangeTree | XArray | MapleTree,
        semantics: str,
        attr_memory_limit: int | None,
        guest_memfd_max_order: int,
        host: _HostTuple | None = None,
    ) -> None: ...
    @property
    def host(self) -> _HostTuple: ...
    @property
    def store(self) -> RangeTree | XArray | MapleTree: ...
    @property
    def slots_lock(self) -> ModelLock: ...
    @property
    def mmu_lock(self) -> ModelLock: ...
    @property
    def config(self) -> tuple[int, bool, bool, int, int, bool]: ...
    @property
    def mmu_params(self) -> tuple[int, bool, bool, bool, bool]: ...
    def set_mmu_param(self, name: str, value: object) -> None: ...
    def set_attr_memory_limit(self, limit: int | None) -> None: ...
    @property
    def manual_dirty_log_protect(self) -> int: ...
    def counters(self) -> dict[str, object]: ...
    @property
    def inval(self) -> tuple[int, int, int, int]: ...
    def vm_ioctl_compiled_in(self, ioctl: str) -> None:
        """OSError ENOTTY if the host's KVM was built without the ioctl
        (``"set_memory_attributes"`` or ``"create_guest_memfd"``)."""
    def check_extension(self, cap: int) -> int: ...
    def guest_memfd_file_op(self, fd: int, op: str) -> None: ...
    def guest_memfd_fstat(self, fd: int) -> tuple[int, int, int, int, int]: ...
    def guest_memfd_mmap(self, fd: int, shared: bool) -> None: ...
    def guest_memfd_user_read(self, fd: int, offset: int, length: int) -> bytes: ...
    def guest_memfd_user_write(self, fd: int, offset: int, data: bytes) -> None: ...
    def enable_cap(self, cap: int, flags: int, args: list[int]) -> None: ...
    def set_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int,
        guest_memfd_offset: int,
        v1: bool = False,
    ) -> bool: ...
    def create_guest_memfd(self, size: int, flags: int) -> int: ...
    def guest_memfd_fallocate(self, fd: int, mode: int, offset: int, length: int) -> bool: ...
    def guest_memfd_close(self, fd: int) -> bool: ...
    # guest_memfd and memslot steps, for memattr.driven (the explorer)
    def gmem_fallocate_checks(
        self, fd: int, mode: int, offset: int, length: int
    ) -> list[tuple[int, int, int]] | None: ...
    def truncate_inode_pages_range(self, fd: int, offset: int, length: int) -> None: ...
    def note_gmem_hole_punched(self) -> None: ...
    def gmem_release_detach(self, fd: int) -> list[tuple[int, int, int]] | None: ...
    def note_gmem_closed(self) -> None: ...
    def set_memory_region_step(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int,
        guest_memfd_offset: int,
        v1: bool = False,
    ) -> None: ...
    def guest_memfds(self) -> list[tuple[int, int, int, list[tuple[int, int, int, int]]]]: ...
    def memslots(self) -> tuple[list[_SlotInfo], int]: ...
    @property
    def memslot_generation(self) -> int: ...
    @property
    def nr_memslot_pages(self) -> int: ...
    def find_memslot(self, as_id: int, gfn: int) -> _SlotInfo | None: ...
    def get_memslot(self, as_id: int, id: int) -> _SlotInfo | None: ...
    def set_native_set(self, on: bool) -> None: ...
    def set_set_driver(self, driver: object) -> None: ...
    def set_memory_attributes_or_drive(self, address: int, size: int, attributes: int, flags: int = 0) -> None: ...
    def set_fault_driver(self, driver: object) -> None: ...
    def fault_or_drive(self, gpa: int, private: bool = False, write: bool = False, *, as_id: int = 0) -> int: ...
    def set_checks(self, address: int, size: int, attributes: int, flags: int) -> tuple[int, int]: ...
    def set_reserve(self, start: int, end: int, attributes: int) -> bool: ...
    def release_reservations(self) -> None: ...
    def clip_gfn_ranges(self, start: int, end: int) -> list[_Ref]: ...
    def invalidate_begin(self) -> None: ...
    def invalidate_range_add(self, start: int, end: int) -> None: ...
    def invalidate_end(self) -> None: ...
    # the halves of the invalidation counters' read-modify-writes (the
    # reads are inval[0] / inval[1])
    def invalidate_begin_write(self, in_progress_read: int) -> None: ...
    def invalidate_end_seq_write(self, seq_read: int) -> None: ...
    def invalidate_end_write(self, in_progress_read: int) -> None: ...
    def mmu_unmap_gfn_range(
        self, as_id: int, start: int, end: int, attr_filter: int = 3
    ) -> bool: ...
    def gmem_invalidate_filter(self, fd: int, start: int, end: int) -> int: ...
    def mapped_private(self, as_id: int, gfn: int) -> bool | None: ...
    def pre_set(self, rng: _Ref, attributes: int) -> bool: ...
    def set_store(self, start: int, end: int, attributes: int) -> None: ...
    def post_set(self, rng: _Ref, attributes: int) -> None: ...
    def flush_remote_tlbs(self) -> None: ...
    def note_mmu_lock(self) -> None: ...
    def note_failed_set(self) -> None: ...
    def faultin(self, gpa: int, private: bool, as_id: int, first: bool) -> tuple[int, int, int]: ...
    def tdp_map(self, gpa: int, private: bool, as_id: int, mmu_seq: int, serial: int) -> int | None: ...
    def max_mapping_level(self, as_id: int, gfn: int) -> int: ...
    def hugepage_mixed(self, slot: int, gfn: int, level: int) -> bool: ...
    def mixed_runs(self, slot: int, level: int) -> list[tuple[int, int]]: ...
    def mapped_level(self, as_id: int, gfn: int) -> int: ...
    def mappings(self, as_id: int, level: int) -> list[tuple[int, int]]: ...
    def replay(
        self,
        kind: npt.NDArray[np.uint8],
        gpa: npt.NDArray[np.uint64],
        size: npt.NDArray[np.uint64],
        attributes: npt.NDArray[np.uint64],
        arg: npt.NDArray[np.uint64],
        flags: npt.NDArray[np.uint8],
        results: npt.NDArray[np.int64],
    ) -> dict[str, object] | None: ...

# --- guest_memfd in-place conversion series (rust/py/gmem.rs) ---

def gmem_set_memory_attributes2(
    kvm: Kvm, fd: int, offset: int, size: int, attributes: int, flags: int, reserved: Iterable[int]
) -> bool: ...
def gmem_pin(kvm: Kvm, fd: int, offset: int, npages: int) -> None: ...
def gmem_unpin(kvm: Kvm, fd: int, offset: int, npages: int) -> None: ...
def gmem_attribute_runs(kvm: Kvm, fd: int) -> list[tuple[int, int, int]]: ...
def gmem_get_attributes(kvm: Kvm, fd: int, offset: int) -> int: ...
def gmem_allocated_runs(kvm: Kvm, fd: int) -> list[tuple[int, int]]: ...
def gmem_store_usage(kvm: Kvm, fd: int) -> tuple[int, int]: ...
def gmem_pinned_pages(kvm: Kvm, fd: int) -> list[tuple[int, int]]: ...
def gmem_finalize_vm(kvm: Kvm) -> None: ...
def gmem_counters(kvm: Kvm) -> dict[str, int]: ...
def gmem_mmap(kvm: Kvm, fd: int, shared: bool) -> int: ...
def gmem_vma_read(kvm: Kvm, vma: int, offset: int, length: int) -> bytes: ...
def gmem_vma_write(kvm: Kvm, vma: int, offset: int, data: bytes) -> None: ...
def gmem_munmap(kvm: Kvm, vma: int) -> bool: ...
def gmem_munmap_detach(kvm: Kvm, vma: int) -> list[tuple[int, int, int]] | None: ...
def gmem_file_of_vma(kvm: Kvm, vma: int) -> int: ...

def set_sched_hooked(on: bool) -> None: ...
