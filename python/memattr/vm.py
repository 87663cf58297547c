"""The VM: memslots, KVM_SET_MEMORY_ATTRIBUTES and the hooks around it.

Models struct kvm and the VM-ioctl side of virt/kvm/kvm_main.c (Linux 6.8):

- ``set_memory_attributes`` validates like kvm_vm_ioctl_set_mem_attributes()
  (flags, unsupported attributes, size 0 or wrap, alignment; each EINVAL with
  nothing changed), then under slots_lock does what kvm_vm_set_mem_attributes()
  does: early exit if the range already has the value, reserve storage first
  (ENOMEM changes nothing), the pre-set pass over memslots (mmu_invalidate_begin
  as on_lock; range add, MMU zap and the ``on_unmap`` hooks per range; one TLB
  flush if any of them asked), the store, and the post-set pass
  (mmu_invalidate_end as on_lock, inside mmu_lock; MMU post-set and the
  ``on_post_set`` hooks per range).
- ``semantics="v11"`` reproduces the seed's RFC v11 instead: the post-set
  pass runs mmu_invalidate_end as on_unlock, after mmu_lock is dropped. With
  lockdep on (the default) the lock checker catches it: the call raises
  LockdepError; the attributes are stored and the Vm then closes the
  invalidation properly, so it stays usable. v11 mode also has
  KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES and writes address/size back from the
  set ioctl (see memattr.ioctl).

Hooks that raise. A hook's exception never leaves a lock held or the
invalidation counters unbalanced:

- in the pre-set pass (``on_unmap``): the remaining hooks of the pass are
  skipped (the MMU still zaps every range), the invalidation is closed with
  mmu_invalidate_end under mmu_lock, and the exception propagates. The
  attributes are NOT stored: the call changed nothing but the mappings it
  zapped (harmless: they refault) and mmu_invalidate_seq.
- in the post-set pass (``on_post_set``): the attributes ARE stored and the
  MMU post-set work runs for every range (the remaining hooks are skipped);
  the invalidation is closed as usual, then the exception propagates.
Either way ``stats.failed_calls`` counts the call.
"""

from __future__ import annotations

import errno
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from memattr import _native
from memattr.gfn_range import GfnRange, clip_gfn_ranges, kvm_handle_gfn_range
from memattr.ioctl import vm_ioctl
from memattr.locks import KvmLock, MmuInvalidation, MmuLock
from memattr.memslots import (
    GuestMemfd,
    Memslot,
    MemslotChange,
    Memslots,
    gmem_files,
    kvm_gmem_create,
    prepare_memory_region,
)
from memattr.mmu import X86Mmu
from memattr.stats import Stats
from memattr.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_USER_MEMORY,
    KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
    KVM_MAX_NR_ADDRESS_SPACES,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_USER_MEM_SLOTS,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
    KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
    PAGE_SHIFT,
    PAGE_SIZE,
    INVALID_GPA,
    U64_MAX,
)

# Distinct (start, end, attributes) keys whose memslot-clipped ranges a Vm
# keeps for reuse (see Vm._gfn_ranges).
_RANGES_CACHE_SIZE = 64
_PAGE_MASK = PAGE_SIZE - 1
_U32_MAX = (1 << 32) - 1
_S64_MAX = (1 << 63) - 1  # MAX_LFS_FILESIZE
# include/uapi/linux/falloc.h modes guest_memfd refuses, for vfs_fallocate's
# checks (FALLOC_FL_SUPPORTED_MASK is every mode up to UNSHARE_RANGE).
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_FALLOC_FL_ZERO_RANGE = 0x10
_FALLOC_FL_INSERT_RANGE = 0x20
_FALLOC_FL_UNSHARE_RANGE = 0x40
_FALLOC_FL_SUPPORTED_MASK = 0x7F

# vm_type -> (has_private_mem, has_protected_state), as x86 sets them at
# KVM_CREATE_VM (kvm_arch_init_vm, svm_vm_init, tdx_vm_init). The SEV, SNP and
# TDX types arrived after 6.8; the model only needs what they change here:
# the supported attributes, guest_memfd binding, address spaces and
# read-only memslots.
_X86_VM_TYPES: dict[int, tuple[bool, bool]] = {
    KVM_X86_DEFAULT_VM: (False, False),
    KVM_X86_SW_PROTECTED_VM: (True, False),
    KVM_X86_SEV_VM: (False, False),
    KVM_X86_SEV_ES_VM: (False, True),
    KVM_X86_SNP_VM: (True, True),
    KVM_X86_TDX_VM: (True, True),
}
_SUPPORTED_VM_TYPES = sum(1 << t for t in _X86_VM_TYPES)

StoreKind = Literal["rangetree", "xarray"]
Semantics = Literal["6.8", "v11"]
Hook = Callable[[GfnRange], Any]
H = TypeVar("H", bound=Hook)


def _uint(name: str, value: object, bits: int) -> int:
    """``value`` as an unsigned ``bits``-bit int, or a TypeError/ValueError
    naming the argument."""
    if type(value) is not int:
        try:
            value = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if value < 0 or value >> bits:  # type: ignore[operator]
        raise ValueError(f"{name} must be a u{bits} (0 <= {name} < 2**{bits}), got {value}")
    return value  # type: ignore[return-value]


def _sint(name: str, value: object, bits: int) -> int:
    """``value`` as a signed ``bits``-bit int (a loff_t), or a
    TypeError/ValueError naming the argument."""
    if type(value) is not int:
        try:
            value = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):  # type: ignore[operator]
        raise ValueError(f"{name} must be an s{bits}, got {value}")
    return value  # type: ignore[return-value]


def _einval(why: str) -> OSError:
    return OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: {why}")


def _eopnotsupp(why: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{os.strerror(errno.EOPNOTSUPP)}: {why}")


class Vm:
    """A KVM virtual machine, as far as memory attributes are concerned.

    ``vm_type``: one of the KVM_X86_*_VM types (an unknown one fails like
    KVM_CREATE_VM, with EINVAL). ``store``: ``"rangetree"`` or ``"xarray"``
    (the kernel's per-page structure); both give identical results.
    ``semantics``: ``"6.8"`` (merged kernel) or ``"v11"`` (the seed's RFC).
    ``attr_memory_limit``: bytes the attribute store may use (the model of
    accounted allocations; exceeding it fails the set with ENOMEM).
    ``guest_memfd_max_order``: largest folio order guest_memfd hands out
    (0 = 4K only, as in 6.8; 9 = 2M; 18 = 1G), read by the MMU model.
    ``lockdep``: check "lock must be held" rules (a debug kernel) or not.
    """

    def __init__(
        self,
        vm_type: int = KVM_X86_DEFAULT_VM,
        store: StoreKind = "rangetree",
        *,
        semantics: Semantics = "6.8",
        attr_memory_limit: int | None = None,
        guest_memfd_max_order: int = 0,
        lockdep: bool = True,
    ) -> None:
        vm_type = _uint("vm_type", vm_type, 64)
        if vm_type not in _X86_VM_TYPES:
            # kvm_arch_init_vm(): !kvm_is_vm_type_supported(type)
            raise _einval(f"VM type {vm_type} is not supported")
        if store == "rangetree":
            self.store: Any = _native.RangeTree()
        elif store == "xarray":
            self.store = _native.XArray()
        else:
            raise ValueError(f"store must be 'rangetree' or 'xarray', got {store!r}")
        if semantics not in ("6.8", "v11"):
            raise ValueError(f"semantics must be '6.8' or 'v11', got {semantics!r}")
        if attr_memory_limit is not None:
            attr_memory_limit = _uint("attr_memory_limit", attr_memory_limit, 64)
        order = _uint("guest_memfd_max_order", guest_memfd_max_order, 64)
        if order > 18:
            raise ValueError(f"guest_memfd_max_order must be <= 18 (1G), got {order}")

        self.vm_type = vm_type
        self.has_private_mem, self.has_protected_state = _X86_VM_TYPES[vm_type]
        # kvm_supported_mem_attributes()
        self.supported_memory_attributes = (
            KVM_MEMORY_ATTRIBUTE_PRIVATE if self.has_private_mem else 0
        )
        # kvm_arch_has_readonly_mem(): no read-only slots with protected state.
        self.has_readonly_mem = not self.has_protected_state
        self.store_kind: StoreKind = store
        self.semantics: Semantics = semantics
        self.attr_memory_limit = attr_memory_limit
        self.guest_memfd_max_order = order
        # kvm->manual_dirty_log_protect (KVM_ENABLE_CAP).
        self.manual_dirty_log_protect = 0
        self.stats = Stats()

        self.mmu_lock: KvmLock = MmuLock(self.stats, lockdep=lockdep)
        self.slots_lock = KvmLock("slots_lock", inner=(self.mmu_lock,), lockdep=lockdep)
        self._inval = MmuInvalidation(self.mmu_lock)
        self._inval_open = False  # this set call's invalidation is begun, not ended

        # SMM is unsupported for guests with private memory: one address space.
        self.nr_memslot_as_ids = 1 if self.has_private_mem else KVM_MAX_NR_ADDRESS_SPACES
        self.memslots = Memslots(self.nr_memslot_as_ids)
        # Identifies this VM's guest_memfd files (gmem->kvm) without keeping
        # the Vm alive from the process-wide fd table.
        self._gmem_owner = object()

        self._unmap_hooks: tuple[Hook, ...] = ()
        self._post_set_hooks: tuple[Hook, ...] = ()
        self._hook_error: BaseException | None = None
        # Bound once: the set path hands these to every gfn-range walk.
        self._pre_set_handler = self._pre_set_memory_attributes
        self._post_set_handler = self._post_set_memory_attributes
        self._begin_handler = self._begin_set_invalidation
        self._end_handler = self._end_set_invalidation
        self._v11 = semantics == "v11"
        # Never mutated once cached: the passes only iterate them.
        self._ranges_cache: dict[tuple[int, int, int], list[GfnRange]] = {}
        self._ranges_cache_gen = -1

        self.mmu = X86Mmu(self)

    def __repr__(self) -> str:
        return (
            f"<Vm type={self.vm_type} store={self.store_kind} semantics={self.semantics} "
            f"memslots={len(self.memslots)}>"
        )

    # --- capabilities --------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (x86, Linux 6.8); unknown caps 0."""
        try:
            cap = operator.index(cap)
        except TypeError:
            raise TypeError(f"cap must be an int, not {type(cap).__name__}") from None
        if cap == KVM_CAP_MEMORY_ATTRIBUTES:
            if self.semantics == "v11":
                # v11 advertised the ioctls with the cap and reported the
                # mask through KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES.
                return 1
            return self.supported_memory_attributes
        if cap == KVM_CAP_GUEST_MEMFD:
            return int(self.has_private_mem)
        if cap in (KVM_CAP_USER_MEMORY, KVM_CAP_USER_MEMORY2, KVM_CAP_MEMORY_FAULT_INFO):
            return 1
        if cap == KVM_CAP_NR_MEMSLOTS:
            return KVM_USER_MEM_SLOTS
        if cap == KVM_CAP_MULTI_ADDRESS_SPACE:
            return self.nr_memslot_as_ids
        if cap == KVM_CAP_READONLY_MEM:
            return int(self.has_readonly_mem)
        if cap == KVM_CAP_VM_TYPES:
            return _SUPPORTED_VM_TYPES
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return KVM_DIRTY_LOG_MANUAL_CAPS
        return 0

    def enable_cap(self, cap: int, flags: int = 0, args: Sequence[int] = (0, 0, 0, 0)) -> None:
        """KVM_ENABLE_CAP on the VM fd (kvm_vm_ioctl_enable_cap_generic,
        then x86's, which refuses everything the model does not know with
        EINVAL). Modelled: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, whose args[0]
        is KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, optionally with
        KVM_DIRTY_LOG_INITIALLY_SET (then turning dirty logging on leaves
        the mappings alone: every page counts as dirty); flags must be 0."""
        cap = _uint("cap", cap, 32)
        flags = _uint("flags", flags, 32)
        if len(args) != 4:
            raise ValueError(f"args must hold 4 values (struct kvm_enable_cap), got {len(args)}")
        values = [_uint(f"args[{i}]", a, 64) for i, a in enumerate(args)]
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if values[0] & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                allowed = KVM_DIRTY_LOG_MANUAL_CAPS
            if flags or values[0] & ~allowed:
                raise _einval(
                    f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: flags {flags:#x} must be 0 and "
                    f"args[0] {values[0]:#x} within {allowed:#x}"
                )
            self.manual_dirty_log_protect = values[0]
            return
        raise _einval(f"capability {cap} cannot be enabled on this VM")

    # --- guest_memfd and memslots --------------------------------------------

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: a simulated fd for a new guest_memfd file.

        6.8 lets any VM create one (binding it needs a VM with private
        memory); no flags are valid; size must be > 0 and page aligned.
        """
        size = _uint("size", size, 64)
        flags = _uint("flags", flags, 64)
        return kvm_gmem_create(size, flags, self._gmem_owner).fd

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        flags: int = 0,
        guest_memfd: int = -1,
        guest_memfd_offset: int = 0,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION2: create, delete (size 0), move or
        change the flags of a memslot. ``slot`` is ``as_id << 16 | id``."""
        slot = _uint("slot", slot, 32)
        guest_phys_addr = _uint("guest_phys_addr", guest_phys_addr, 64)
        memory_size = _uint("memory_size", memory_size, 64)
        userspace_addr = _uint("userspace_addr", userspace_addr, 64)
        flags = _uint("flags", flags, 32)
        if type(guest_memfd) is not int:
            guest_memfd = operator.index(guest_memfd)
        if not -(1 << 31) <= guest_memfd <= _U32_MAX:
            raise ValueError(f"guest_memfd must be an fd (a u32 or -1), got {guest_memfd}")
        guest_memfd_offset = _uint("guest_memfd_offset", guest_memfd_offset, 64)
        self._set_memory_region(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd & _U32_MAX,
            guest_memfd_offset,
        )

    def _set_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int,
        guest_memfd_offset: int,
    ) -> None:
        """kvm_vm_ioctl_set_memory_region() with validated uapi fields."""
        if slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
            raise _einval(f"slot id {slot & 0xFFFF} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
        with self.slots_lock:
            change, old, new, gmem = prepare_memory_region(
                self.memslots,
                owner=self._gmem_owner,
                has_private_mem=self.has_private_mem,
                has_readonly_mem=self.has_readonly_mem,
                slot=slot,
                flags=flags,
                guest_phys_addr=guest_phys_addr,
                memory_size=memory_size,
                userspace_addr=userspace_addr,
                guest_memfd=guest_memfd,
                guest_memfd_offset=guest_memfd_offset,
            )
            if change is MemslotChange.NONE:
                return
            self._commit_memory_region(change, old, new, gmem)
            self.stats.memslot_updates += 1

    def _commit_memory_region(
        self, change: MemslotChange, old: Memslot | None, new: Memslot | None, gmem: Any
    ) -> None:
        memslots = self.memslots
        # The cached clipped ranges name the old slots; drop them now rather
        # than at the next set call.
        self._ranges_cache.clear()
        if change is MemslotChange.FLAGS_ONLY:
            assert old is not None and new is not None
            # The kernel copies the slot (arch state included) into a new
            # struct; only the flags differ, so the model updates them in place.
            old_flags = old.flags
            old.flags = new.flags
            memslots._changed()
            # kvm_arch_commit_memory_region(): split or recover hugepages.
            self.mmu.memslot_flags_changed(old, old_flags)
            return
        if old is not None:
            # kvm_invalidate_memslot(): zap everything mapped through the old
            # slot before it goes away (kvm_arch_flush_shadow_memslot).
            self.mmu.memslot_deleted(old)
            memslots._remove(old)
            if old.gmem is not None:
                old.gmem._unbind(old)
        if new is None:
            return
        if gmem is not None:
            gmem._bind(new)
        memslots._install(new)
        try:
            # kvm_arch_prepare_memory_region(): lpage info and mixed flags from
            # the attributes as they are now.
            self.mmu.memslot_created(new)
        except BaseException:
            # Like kvm_set_memslot() on failure: the new slot never existed,
            # a moved slot goes back where it was.
            memslots._remove(new)
            if new.gmem is not None:
                new.gmem._unbind(new)
            if old is not None:
                memslots._install(old)
                self.mmu.memslot_created(old)
            raise

    def _own_guest_memfd(self, fd: object) -> GuestMemfd:
        """The open guest_memfd file ``fd`` of this VM, or EBADF."""
        if type(fd) is not int:
            try:
                fd = operator.index(fd)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError(f"fd must be an int, not {type(fd).__name__}") from None
        gmem = gmem_files.get(fd) if 0 <= fd <= _U32_MAX else None  # type: ignore[operator]
        if gmem is None or gmem.owner is not self._gmem_owner:
            raise OSError(errno.EBADF, f"{os.strerror(errno.EBADF)}: fd {fd} is not a guest_memfd of this VM")
        return gmem

    def guest_memfd_fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a guest_memfd (vfs_fallocate, then
        kvm_gmem_fallocate, Linux 6.8). ``FALLOC_FL_KEEP_SIZE`` allocates
        (nothing to model beyond the checks); with ``FALLOC_FL_PUNCH_HOLE``
        the pages go, and every mapping of them is zapped first: for each
        memslot bound to the range, under mmu_lock, an invalidation begins,
        the gfns are added and unmapped (private and shared mappings alike),
        one TLB flush if anything was mapped; the invalidation ends after
        the truncation (kvm_gmem_punch_hole). Errors: EBADF (not a
        guest_memfd of this VM), EINVAL (offset < 0, length <= 0, not page
        aligned, or an allocation past the file's size), EOPNOTSUPP (no
        KEEP_SIZE, or any other mode), EFBIG (offset + length past
        MAX_LFS_FILESIZE). slots_lock stands in for the file's invalidate
        lock, which memslot binding also takes."""
        gmem = self._own_guest_memfd(fd)
        mode = _uint("mode", mode, 32)
        offset = _sint("offset", offset, 64)
        length = _sint("length", length, 64)
        # vfs_fallocate(), in its order.
        if offset < 0 or length <= 0:
            raise _einval(f"offset {offset} must be >= 0 and length {length} > 0")
        if mode & ~_FALLOC_FL_SUPPORTED_MASK:
            raise _eopnotsupp(f"mode {mode:#x} has unknown bits")
        if mode & FALLOC_FL_PUNCH_HOLE and mode & _FALLOC_FL_ZERO_RANGE:
            raise _eopnotsupp("FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE exclude each other")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise _eopnotsupp("FALLOC_FL_PUNCH_HOLE needs FALLOC_FL_KEEP_SIZE")
        for alone, name in ((_FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE_RANGE"), (_FALLOC_FL_INSERT_RANGE, "INSERT_RANGE")):
            if mode & alone and mode & ~alone:
                raise _einval(f"FALLOC_FL_{name} must be used alone")
        if mode & _FALLOC_FL_UNSHARE_RANGE and mode & ~(_FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_KEEP_SIZE):
            raise _einval("FALLOC_FL_UNSHARE_RANGE takes only FALLOC_FL_KEEP_SIZE")
        if offset + length > _S64_MAX:
            raise OSError(errno.EFBIG, f"{os.strerror(errno.EFBIG)}: offset + length past the largest file size")
        # kvm_gmem_fallocate().
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise _eopnotsupp("guest_memfd cannot change size: FALLOC_FL_KEEP_SIZE is required")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise _eopnotsupp(f"mode {mode:#x} is not supported by guest_memfd")
        if offset & _PAGE_MASK or length & _PAGE_MASK:
            raise _einval(f"offset {offset:#x} and length {length:#x} must be page aligned")
        if not mode & FALLOC_FL_PUNCH_HOLE:
            if offset + length > gmem.size:  # kvm_gmem_allocate(): immutable size
                raise _einval(f"allocation past the file's size {gmem.size:#x}")
            return
        with self.slots_lock:
            self._kvm_gmem_invalidate(gmem, offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT)
        self.stats.gmem_holes_punched += 1

    def guest_memfd_close(self, fd: int) -> None:
        """close(2) of the last reference to a guest_memfd
        (kvm_gmem_release): under slots_lock, every bound memslot loses the
        file (private faults there now exit), every mapping through it is
        zapped as for a hole over the whole file, and the bindings go. The
        memslots stay; the fd number is free. EBADF if ``fd`` is not an open
        guest_memfd of this VM."""
        gmem = self._own_guest_memfd(fd)
        with self.slots_lock:
            gmem_files.remove(gmem.fd)
            for _, _, slot in gmem.bindings():
                slot.gmem = None  # slot->gmem.file = NULL
            self._kvm_gmem_invalidate(gmem, 0, U64_MAX)
            gmem._bindings = []
        self.stats.gmem_closed += 1

    def _kvm_gmem_invalidate(self, gmem: GuestMemfd, start: int, end: int) -> None:
        """kvm_gmem_invalidate_begin() and _end() for file pages
        [start, end), around a truncation that needs no modelling."""
        self.slots_lock.assert_held("guest_memfd bindings are stable under slots_lock")
        ranges = []
        for first, last, slot in gmem.bindings():
            if last <= start or first >= end:
                continue
            ranges.append(
                (slot, slot.base_gfn + max(first, start) - first, slot.base_gfn + min(last, end) - first)
            )
        if not ranges:
            return
        with self.mmu_lock:
            self._inval.begin()
            try:
                flush = False
                for slot, s, e in ranges:
                    # kvm_mmu_unmap_gfn_range(): add, then zap.
                    self._inval.range_add(s, e)
                    if self.mmu.unmap_gfn_range(slot, s, e):
                        flush = True
                if flush:
                    self.kvm_flush_remote_tlbs()
            except BaseException:
                # Never leave faults blocked behind a half-done invalidation.
                self._inval.end()
                raise
        with self.mmu_lock:
            self._inval.end()

    # --- memory attributes ---------------------------------------------------

    def get_memory_attributes(self, gfn: int) -> int:
        """kvm_get_memory_attributes()."""
        if type(gfn) is not int or not 0 <= gfn <= U64_MAX:
            gfn = _uint("gfn", gfn, 64)
        return self.store.get(gfn)  # type: ignore[no-any-return]

    def range_has_attributes(
        self, start_gfn: int, end_gfn: int, attributes: int, mask: int = U64_MAX
    ) -> bool:
        """kvm_range_has_memory_attributes(): every gfn in [start_gfn, end_gfn)
        has ``attributes`` in the bits of ``mask``. An empty range is True."""
        start_gfn = _uint("start_gfn", start_gfn, 64)
        end_gfn = _uint("end_gfn", end_gfn, 64)
        attributes = _uint("attributes", attributes, 64)
        mask = _uint("mask", mask, 64)
        if start_gfn > end_gfn:
            raise ValueError(f"start_gfn ({start_gfn}) must be <= end_gfn ({end_gfn})")
        if start_gfn == end_gfn:
            return True
        return bool(self.store.has_value(start_gfn, end_gfn, attributes, mask))

    def set_memory_attributes(
        self, address: int, size: int, attributes: int, flags: int = 0
    ) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES for [address, address + size)."""
        if type(address) is not int or not 0 <= address <= U64_MAX:
            address = _uint("address", address, 64)
        if type(size) is not int or not 0 <= size <= U64_MAX:
            size = _uint("size", size, 64)
        if type(attributes) is not int or not 0 <= attributes <= U64_MAX:
            attributes = _uint("attributes", attributes, 64)
        if type(flags) is not int or not 0 <= flags <= U64_MAX:
            flags = _uint("flags", flags, 64)
        try:
            # kvm_vm_ioctl_set_mem_attributes(): each check EINVAL, in this order.
            if flags:
                raise _einval(f"flags {flags:#x} must be 0 (reserved)")
            if attributes & ~self.supported_memory_attributes:
                raise _einval(
                    f"attributes {attributes:#x} not supported by this VM "
                    f"(supported: {self.supported_memory_attributes:#x})"
                )
            if size == 0 or address + size > U64_MAX:
                raise _einval(f"size {size:#x} is 0 or address + size wraps")
            if address & _PAGE_MASK or size & _PAGE_MASK:
                raise _einval(f"address {address:#x} or size {size:#x} not page aligned")
            self.stats.set_calls += 1
            with self.slots_lock:
                self._kvm_vm_set_mem_attributes(
                    address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT, attributes
                )
        except BaseException:
            self.stats.failed_calls += 1
            raise

    def _gfn_ranges(self, start: int, end: int, attributes: int) -> Sequence[GfnRange]:
        """clip_gfn_ranges() for a set call. Without user hooks nothing but
        the MMU model sees the (immutable) ranges, so they are reused across
        calls while the memslots stay the same generation (slots_lock is
        held, so they cannot change under the caller)."""
        memslots = self.memslots
        if self._unmap_hooks or self._post_set_hooks:
            return clip_gfn_ranges(memslots, start, end, attributes, True)
        cache = self._ranges_cache
        if self._ranges_cache_gen != memslots._seq:
            cache.clear()
            self._ranges_cache_gen = memslots._seq
        key = (start, end, attributes)
        ranges = cache.get(key)
        if ranges is None:
            ranges = clip_gfn_ranges(memslots, start, end, attributes, True)
            if len(cache) >= _RANGES_CACHE_SIZE:
                cache.clear()
            cache[key] = ranges
        return ranges

    def _kvm_vm_set_mem_attributes(self, start: int, end: int, attributes: int) -> None:
        """kvm_vm_set_mem_attributes(), under slots_lock."""
        store = self.store
        # Nothing to do if the entire range already has the desired
        # attributes; otherwise reserve ahead of time, so a failure cannot
        # leave the range half set (both in one store call).
        try:
            if store.reserve_unless_has_value(start, end, attributes, self.attr_memory_limit):
                self.stats.noop_conversions += 1
                return
        except MemoryError as e:
            self.stats.enomem += 1
            raise OSError(errno.ENOMEM, f"{os.strerror(errno.ENOMEM)}: {e}") from None
        ok = False
        try:
            ranges = self._gfn_ranges(start, end, attributes)
            kvm_handle_gfn_range(
                self, ranges, self._pre_set_handler, on_lock=self._begin_handler, flush_on_ret=True
            )
            if self._hook_error is not None:
                # An on_unmap hook failed: abort before anything is stored.
                raise self._hook_error
            store.set_range(start, end, attributes)
            # Every reserved entry is now used: nothing left to release.
            ok = True
            stats = self.stats
            stats.conversions += 1
            stats.pages_converted += end - start
            if self._v11:
                # The seed's order: mmu_invalidate_end after mmu_lock is dropped.
                kvm_handle_gfn_range(self, ranges, self._post_set_handler, on_unlock=self._end_handler)
            else:
                kvm_handle_gfn_range(self, ranges, self._post_set_handler, on_lock=self._end_handler)
            if self._hook_error is not None:
                raise self._hook_error
        finally:
            if self._hook_error is not None:
                self._hook_error = None
            if self._inval_open:
                # Something raised between begin and end (a hook, the MMU, or
                # the v11 end outside the lock): close the invalidation
                # properly so faults are not blocked forever.
                with self.mmu_lock:
                    self._inval.end()
                self._inval_open = False
            if not ok:
                store.release_reservations()

    def _begin_set_invalidation(self) -> None:
        self._inval.begin()
        self._inval_open = True

    def _end_set_invalidation(self) -> None:
        self._inval.end()
        self._inval_open = False

    def _pre_set_memory_attributes(self, rng: GfnRange) -> bool:
        """kvm_pre_set_memory_attributes() plus the user's on_unmap hooks."""
        # Add the range even if nothing needs zapping, so faults stay away
        # from gfns whose attributes are in flux.
        self._inval.range_add(rng.start, rng.end)
        flush = bool(self.mmu.pre_set_memory_attributes(rng))
        self.stats.zapped_ranges += 1
        if self._unmap_hooks and self._hook_error is None:
            for hook in self._unmap_hooks:
                try:
                    if hook(rng):
                        flush = True
                except BaseException as e:
                    self._hook_error = e
                    break
        return flush

    def _post_set_memory_attributes(self, rng: GfnRange) -> bool:
        """kvm_arch_post_set_memory_attributes() plus the on_post_set hooks."""
        self.mmu.post_set_memory_attributes(rng)
        self.stats.post_set_ranges += 1
        if self._post_set_hooks and self._hook_error is None:
            for hook in self._post_set_hooks:
                try:
                    hook(rng)
                except BaseException as e:
                    self._hook_error = e
                    break
        return False

    def kvm_flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs(): counted, since that is what it costs."""
        self.stats.tlb_flushes += 1

    # --- hooks -----------------------------------------------------------------

    def on_unmap(self, fn: H) -> H:
        """Register ``fn(GfnRange) -> bool`` for the pre-set pass (mmu_lock
        held, after the MMU's zap); a true result requests a TLB flush.
        Usable as a decorator; returns ``fn``."""
        if not callable(fn):
            raise TypeError(f"on_unmap hook must be callable, not {type(fn).__name__}")
        self._unmap_hooks = (*self._unmap_hooks, fn)
        return fn

    def on_post_set(self, fn: H) -> H:
        """Register ``fn(GfnRange)`` for the post-set pass (mmu_lock held,
        after the MMU's post-set work; the new attributes are stored).
        Usable as a decorator; returns ``fn``."""
        if not callable(fn):
            raise TypeError(f"on_post_set hook must be callable, not {type(fn).__name__}")
        self._post_set_hooks = (*self._post_set_hooks, fn)
        return fn

    def remove_hook(self, fn: Hook) -> None:
        """Unregister ``fn`` from both hook lists (ValueError if absent)."""
        unmap = tuple(h for h in self._unmap_hooks if h is not fn)
        post = tuple(h for h in self._post_set_hooks if h is not fn)
        if len(unmap) == len(self._unmap_hooks) and len(post) == len(self._post_set_hooks):
            raise ValueError(f"{fn!r} is not a registered hook")
        self._unmap_hooks, self._post_set_hooks = unmap, post

    # --- MMU invalidation state ------------------------------------------------

    @property
    def mmu_invalidate_seq(self) -> int:
        return self._inval.seq

    @property
    def mmu_invalidate_in_progress(self) -> int:
        return self._inval.in_progress

    @property
    def mmu_invalidate_range_start(self) -> int:
        return self._inval.range_start

    @property
    def mmu_invalidate_range_end(self) -> int:
        return self._inval.range_end

    def kvm_mmu_invalidate_begin(self) -> None:
        """For other invalidation sources (mmu_lock must be held)."""
        self._inval.begin()

    def kvm_mmu_invalidate_range_add(self, start: int, end: int) -> None:
        self._inval.range_add(start, end)

    def kvm_mmu_invalidate_end(self) -> None:
        self._inval.end()

    # --- MMU model ---------------------------------------------------------------

    def fault(self, gpa: int, private: bool = False, write: bool = False) -> int:
        """A guest access at ``gpa``: the level it is mapped at (1 = 4K,
        2 = 2M, 3 = 1G), 0 for MMIO (a shared access outside every memslot),
        or MemoryFault (KVM_EXIT_MEMORY_FAULT)."""
        return self.mmu.fault(gpa, private=private, write=write)  # type: ignore[no-any-return]

    def max_mapping_level(self, gfn: int) -> int:
        return self.mmu.max_mapping_level(gfn)  # type: ignore[no-any-return]

    def hugepage_mixed(self, slot: int | Memslot, gfn: int, level: int) -> bool:
        """Is the ``level`` hugepage holding ``gfn`` in uapi slot ``slot``
        (as_id << 16 | id) mixed (hugepage_test_mixed)?"""
        return self.mmu.hugepage_mixed(slot, gfn, level)  # type: ignore[no-any-return]

    # --- ioctl front end ---------------------------------------------------------

    def ioctl(self, request: int, arg: Any = 0, mutate_flag: bool = True) -> int | bytes:
        """fcntl.ioctl() on the VM fd; see memattr.ioctl."""
        return vm_ioctl(self, request, arg, mutate_flag)


__all__ = ["Vm"]
