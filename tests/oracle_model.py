"""An independent per-page oracle of KVM's memory-attribute rules.

Written from the kernel sources, not from memattr's code: one numpy uint64
per gfn for the attributes, one int16 per gfn for the memslot holding it,
and the rules as plain loops/array reductions:

- virt/kvm/kvm_main.c kvm_vm_ioctl_set_mem_attributes(): EINVAL for
  flags != 0, unsupported attributes, size == 0 or address + size wrapping,
  address or size not page aligned; kvm_vm_set_mem_attributes(): early exit
  iff kvm_range_has_memory_attributes() over the whole range.
- arch/x86/kvm/x86.c kvm_alloc_memslot_metadata(): the head and tail
  hugepage of a slot that does not wholly contain them are disallowed; if
  (base_gfn ^ (userspace_addr >> PAGE_SHIFT)) & (KVM_PAGES_PER_HPAGE - 1)
  every hugepage of the slot is disallowed.
- arch/x86/kvm/mmu/mmu.c hugepage_has_attrs() / the post-set pass: a
  hugepage wholly inside the slot is mixed iff its gfns' attributes are not
  all equal (1G consumes the 2M results and samples each 2M head, which is
  the same thing); hugepages not wholly inside a slot are never flagged.
- __kvm_mmu_max_mapping_level(): walk down from max_level while disallowed;
  private faults capped by the guest_memfd order, shared ones by the host
  mapping level; dirty logging forces 4K.
- kvm_faultin_pfn(): private-ness mismatch (even without a slot) or a
  private fault without guest_memfd exits with KVM_EXIT_MEMORY_FAULT
  {gpa & PAGE_MASK, PAGE_SIZE, PRIVATE iff the access was private}; a shared
  access outside every slot is MMIO (level 0).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np

import memattr

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
U64_MAX = (1 << 64) - 1
PRIVATE = 1 << 3  # KVM_MEMORY_ATTRIBUTE_PRIVATE, include/uapi/linux/kvm.h
EXIT_FLAG_PRIVATE = 1 << 3  # KVM_MEMORY_EXIT_FLAG_PRIVATE
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_GUEST_MEMFD = 1 << 2
HPAGE = {2: 1 << 9, 3: 1 << 18}  # KVM_PAGES_PER_HPAGE
UADDR_BASE_GFN = 0x7F0000000  # 1G aligned host virtual address, in pages


@dataclass(frozen=True)
class SlotSpec:
    slot: int
    base: int  # gfn
    npages: int
    uaddr_delta: int  # userspace_addr = (UADDR_BASE_GFN + base + delta) << 12
    gmem: bool = True
    dirty: bool = False

    @property
    def end(self) -> int:
        return self.base + self.npages

    @property
    def uaddr(self) -> int:
        return (UADDR_BASE_GFN + self.base + self.uaddr_delta) << PAGE_SHIFT


# Awkward layouts: slots not 2M/1G aligned, userspace_addr congruent or
# not, adjacent slots (a hugepage spanning two slots), gaps (MMIO), a slot
# without guest_memfd and a dirty-logging one.
GEOMETRIES: dict[str, list[SlotSpec]] = {
    "awkward": [
        # Holds the whole 1G hugepage [0x40000, 0x80000); congruent mod 1G.
        SlotSpec(0, 499, 600_000, 5 << 18),
        # Congruent mod 2M only.
        SlotSpec(1, 601_000, 5_000, 7 * 512),
        # 2M aligned but incongruent mod 2M: never huge.
        SlotSpec(2, 606_208, 3_000, 1),
        SlotSpec(3, 610_000, 4_096, 0, gmem=False),
        SlotSpec(4, 615_000, 2_048, 0, gmem=False, dirty=True),
    ],
    "adjacent": [
        # The first 1G is wholly inside but incongruent mod 1G (2M ok).
        SlotSpec(0, 0, 263_144, 512),
        # Adjacent to slot 0: the 2M page holding gfn 263_144 spans both.
        SlotSpec(1, 263_144, 7_000, 0),
        # Adjacent again, 2M aligned end, no guest_memfd.
        SlotSpec(2, 270_144, 3_520, 0, gmem=False),
        # After a gap, a 1G aligned slot of exactly one 1G page, congruent.
        SlotSpec(3, 1 << 19, 1 << 18, 0),
    ],
}

# The oracle tracks gfns [0, N_GFNS) plus a window at the very top of the
# gpa space (the last gfn can never be set: address + size wraps).
N_GFNS = 1 << 20
HIGH_BASE = (1 << 52) - 4096
HIGH_N = 4096


def build_vm(geom: str, store: str, order: int = 0, host_level: int = 3) -> memattr.Vm:
    vm = memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM, store, guest_memfd_max_order=order)
    vm.mmu.host_mapping_level = host_level
    for s in GEOMETRIES[geom]:
        create_slot(vm, s)
    return vm


def create_slot(vm: object, s: SlotSpec) -> None:
    if s.gmem:
        fd = vm.create_guest_memfd(s.npages << PAGE_SHIFT)  # type: ignore[attr-defined]
        vm.set_user_memory_region(  # type: ignore[attr-defined]
            s.slot, s.base << PAGE_SHIFT, s.npages << PAGE_SHIFT, s.uaddr, KVM_MEM_GUEST_MEMFD, fd, 0
        )
    else:
        flags = KVM_MEM_LOG_DIRTY_PAGES if s.dirty else 0
        vm.set_user_memory_region(s.slot, s.base << PAGE_SHIFT, s.npages << PAGE_SHIFT, s.uaddr, flags)  # type: ignore[attr-defined]


@dataclass
class Oracle:
    geom: str
    order: int = 0  # guest_memfd_max_order
    host_level: int = 3
    attrs: np.ndarray = field(default_factory=lambda: np.zeros(N_GFNS, dtype=np.uint64))
    high: np.ndarray = field(default_factory=lambda: np.zeros(HIGH_N, dtype=np.uint64))

    def __post_init__(self) -> None:
        self.slots = GEOMETRIES[self.geom]
        self.slot_of = np.full(N_GFNS, -1, dtype=np.int16)
        for i, s in enumerate(self.slots):
            assert s.end <= N_GFNS
            self.slot_of[s.base : s.end] = i
        self._uniform: dict[int, np.ndarray] = {}

    # --- attributes ----------------------------------------------------------

    def view(self, start: int, end: int) -> list[tuple[np.ndarray, int, int]]:
        """The oracle arrays' parts covering gfns [start, end)."""
        out = []
        for arr, base, n in ((self.attrs, 0, N_GFNS), (self.high, HIGH_BASE, HIGH_N)):
            s, e = max(start, base), min(end, base + n)
            if s < e:
                out.append((arr, s - base, e - base))
        return out

    def set_result(self, address: int, size: int, attributes: int, flags: int = 0) -> tuple[int, bool]:
        """(errno or 0, no-op) for KVM_SET_MEMORY_ATTRIBUTES, without applying."""
        if flags != 0 or attributes & ~PRIVATE or size == 0 or address + size > U64_MAX:
            return errno.EINVAL, False
        if address % PAGE_SIZE or size % PAGE_SIZE:
            return errno.EINVAL, False
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        assert (end - start) == sum(e - s for _, s, e in self.view(start, end)), "oracle window too small"
        noop = all(bool((arr[s:e] == attributes).all()) for arr, s, e in self.view(start, end))
        return 0, noop

    def apply_set(self, address: int, size: int, attributes: int, flags: int = 0) -> tuple[int, bool]:
        err, noop = self.set_result(address, size, attributes, flags)
        if not err:
            start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
            for arr, s, e in self.view(start, end):
                arr[s:e] = attributes
            self._uniform = {}
        return err, noop

    def clipped_ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(slot index, start, end) of the memslot-clipped ranges."""
        out = []
        for i, s in sorted(enumerate(self.slots), key=lambda t: t[1].base):
            lo, hi = max(start, s.base), min(end, s.end)
            if lo < hi:
                out.append((i, lo, hi))
        return out

    # --- hugepages -------------------------------------------------------------

    def slot_index(self, gfn: int) -> int:
        return int(self.slot_of[gfn]) if gfn < N_GFNS else -1

    def uniform(self, start: int, end: int) -> bool:
        a = self.attrs[start:end]
        return bool((a == a[0]).all())

    def hugepage_uniform(self, hp: int, level: int) -> bool:
        """uniform() of the level hugepage starting at hp, cached per level
        (one numpy reduction over every hugepage after each change)."""
        n = HPAGE[level]
        table = self._uniform.get(level)
        if table is None:
            a = self.attrs.reshape(-1, n)
            table = self._uniform[level] = (a == a[:, :1]).all(axis=1)
        return bool(table[hp // n])

    def wholly_inside(self, si: int, hp: int, level: int) -> bool:
        s = self.slots[si]
        return hp >= s.base and hp + HPAGE[level] <= s.end

    def mixed(self, si: int, gfn: int, level: int) -> bool:
        """hugepage_test_mixed(): only hugepages wholly inside the slot are
        ever flagged (kvm_mmu_init_memslot_memory_attributes and the post-set
        pass skip the others)."""
        n = HPAGE[level]
        hp = gfn & ~(n - 1)
        if not self.wholly_inside(si, hp, level):
            return False
        return not self.hugepage_uniform(hp, level)

    def disallowed(self, si: int, gfn: int, level: int) -> bool:
        """lpage_info_slot(gfn, slot, level)->disallow_lpage != 0."""
        s = self.slots[si]
        n = HPAGE[level]
        hp = gfn & ~(n - 1)
        if not self.wholly_inside(si, hp, level):
            return True  # head/tail hugepage of the slot
        if (s.base ^ (UADDR_BASE_GFN + s.base + s.uaddr_delta)) & (n - 1):
            return True  # gpa/hva incongruent
        return self.mixed(si, gfn, level)

    def level(self, gfn: int, private: bool) -> int:
        """The level a successful fault at gfn maps (kvm_mmu_hugepage_adjust)."""
        si = self.slot_index(gfn)
        assert si >= 0
        max_level = 3
        if private:
            max_level = 3 if self.order >= 18 else 2 if self.order >= 9 else 1
        if max_level == 1 or self.slots[si].dirty:
            return 1
        level = max_level
        while level > 1 and self.disallowed(si, gfn, level):
            level -= 1
        return level if private else min(level, self.host_level)

    def max_mapping_level(self, gfn: int) -> int:
        si = self.slot_index(gfn)
        private = self.slots[si].gmem and bool(self.attrs[gfn] & PRIVATE)
        return self.level(gfn, private)

    # --- faults ------------------------------------------------------------------

    def fault(self, gpa: int, private: bool) -> tuple[str, int]:
        """("map", level) / ("mmio", 0) / ("exit", flags)."""
        gfn = gpa >> PAGE_SHIFT
        arr_private = bool(self.attrs[gfn] & PRIVATE) if gfn < N_GFNS else bool(
            self.high[gfn - HIGH_BASE] & PRIVATE
        ) if gfn >= HIGH_BASE else False
        si = self.slot_index(gfn)
        flags = EXIT_FLAG_PRIVATE if private else 0
        if private != arr_private:
            return "exit", flags
        if si < 0:
            return ("exit", flags) if private else ("mmio", 0)
        if private and not self.slots[si].gmem:
            return "exit", flags
        return "map", self.level(gfn, private)


# --- reading the model's TDP state through the public API ------------------


def leaves(vm: memattr.Vm) -> set[tuple[int, int]]:
    """Every leaf as (first gfn, level); mappings() merges adjacent leaves
    into runs, which must split exactly into aligned leaves."""
    out = set()
    for level in (1, 2, 3):
        n = 1 if level == 1 else HPAGE[level]
        for s, e in vm.mmu.mappings(level):
            assert s % n == 0 and e % n == 0 and s < e, f"level {level} run [{s:#x}, {e:#x}) not aligned"
            out.update((g, level) for g in range(s, e, n))
    return out


def leaf_end(leaf: tuple[int, int]) -> int:
    g, level = leaf
    return g + (1 if level == 1 else HPAGE[level])


def check_mapping_invariant(vm: memattr.Vm, oracle: Oracle) -> set[tuple[int, int]]:
    """No leaf covers pages of non-uniform attributes or more than one slot,
    and none is bigger than a fault could map now (a change under a leaf
    zaps it). Returns the leaves."""
    got = leaves(vm)
    for level in (1, 2, 3):
        n = 1 if level == 1 else HPAGE[level]
        starts = np.array(sorted(g for g, lv in got if lv == level), dtype=np.int64)
        if not starts.size:
            continue
        assert starts[-1] + n <= N_GFNS
        idx = starts[:, None] + np.arange(n)[None, :]
        a = oracle.attrs[idx]
        so = oracle.slot_of[idx]
        bad = ~((a == a[:, :1]).all(axis=1))
        assert not bad.any(), f"level {level} leaf at {int(starts[bad][0]):#x} covers mixed attributes"
        bad = ~((so == so[:, :1]).all(axis=1) & (so[:, 0] >= 0))
        assert not bad.any(), f"level {level} leaf at {int(starts[bad][0]):#x} is not inside one memslot"
        if level > 1:
            for g in starts.tolist():
                private = bool(oracle.attrs[g] & PRIVATE)
                assert oracle.level(g, private) >= level, f"level {level} leaf at {g:#x} exceeds the oracle level"
    return got
