"""The VM driver: KVM_SET_MEMORY_ATTRIBUTES and the hooks around it, over
the core (``memattr._native.Kvm``, ``rust/kvm``), which holds the VM's state
and every kernel rule. This module decides who runs an operation:

- nothing in Python needs to see the steps (no hooks, Linux 6.8 ordering,
  a thread holding none of the VM's locks): the core runs the whole call;
- otherwise the driver here runs the core's steps one by one under the
  modelled locks, calling the hooks and the lock checker between them.

Both run the same steps, so both give the same results and counters. What
the steps do, as the kernel does it (virt/kvm/kvm_main.c, Linux 6.8):

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

import weakref
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Literal, NoReturn, TypeVar

from memattr import _args, _native, driven, sched
from memattr.gfn_range import GfnRange, clip_gfn_ranges, kvm_handle_gfn_range
from memattr.gmem_file import GuestMemfdFile, GuestMemfdMapping
from memattr.host import HostProfile, _host_tuple
from memattr.gmem_inplace import GuestMemfdInplaceMixin
from memattr.ioctl import vm_ioctl
from memattr.locks import KvmLock, MmuInvalidation, MmuLock
from memattr.memslots import Memslot, Memslots
from memattr.mmu import X86Mmu
from memattr.stats import Stats
from memattr.uapi import KVM_X86_DEFAULT_VM, U64_MAX

_U32_MAX = (1 << 32) - 1

StoreKind = Literal["rangetree", "xarray", "mapletree"]
Semantics = Literal["6.18", "6.8", "v11", "gmem-inplace", "gmem-inplace-v5"]
Hook = Callable[[GfnRange], Any]
H = TypeVar("H", bound=Hook)


class Vm(GuestMemfdInplaceMixin):
    """A KVM virtual machine, as far as memory attributes are concerned.

    ``vm_type``: one of the KVM_X86_*_VM types (an unknown one fails like
    KVM_CREATE_VM, with EINVAL). ``store``: ``"rangetree"`` or ``"xarray"``
    (the kernel's per-page structure); both give identical results.
    ``semantics``: ``"6.18"`` (the default: guest_memfd on every VM type,
    mmap-able guest_memfd, the capabilities since 6.8, access_ok() against
    TASK_SIZE_MAX, vfs_fallocate()'s exclusive modes), ``"6.8"`` (the first
    kernel with this API), ``"v11"`` (the seed's RFC, 6.8's rules
    otherwise), or the guest_memfd in-place conversion series on top of
    6.18: ``"gmem-inplace"`` (v8, June 2026) or ``"gmem-inplace-v5"`` (with
    content modes); see memattr.gmem_inplace. ``store`` may also be
    ``"mapletree"`` (the kernel's maple tree, as the series uses it).
    ``host``: the :class:`memattr.HostProfile` the VM runs on (default:
    ``HostProfile.default()``): which VM types exist, the capabilities,
    which ioctls are compiled out (ENOTTY), the address spaces.
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
        semantics: Semantics = "6.18",
        host: HostProfile | None = None,
        attr_memory_limit: int | None = None,
        guest_memfd_max_order: int = 0,
        lockdep: bool = True,
    ) -> None:
        if store == "rangetree":
            store_obj: Any = _native.RangeTree()
        elif store == "xarray":
            store_obj = _native.XArray()
        elif store == "mapletree":
            store_obj = _native.MapleTree()
        else:
            raise ValueError(
                f"store must be 'rangetree', 'xarray' or 'mapletree', got {store!r}"
            )
        # KVM_CREATE_VM: the core checks every argument (an unknown type is
        # EINVAL, as the kernel's).
        self._kvm = _native.Kvm(
            vm_type, store_obj, semantics, attr_memory_limit, guest_memfd_max_order, _host_tuple(host)
        )
        self.host: HostProfile = host if host is not None else HostProfile.default()
        (
            self.vm_type,
            self.has_private_mem,
            self.has_protected_state,
            self.supported_memory_attributes,
            self.nr_memslot_as_ids,
            self.has_readonly_mem,
        ) = self._kvm.config
        self.store: Any = store_obj
        self.store_kind: StoreKind = store
        self.semantics: Semantics = semantics
        self._attr_memory_limit = None if attr_memory_limit is None else int(attr_memory_limit)
        self.guest_memfd_max_order = int(guest_memfd_max_order)

        self.mmu_lock: KvmLock = MmuLock(self._kvm, lockdep=lockdep)
        self.slots_lock = KvmLock(self._kvm.slots_lock, inner=(self.mmu_lock,), lockdep=lockdep)
        self._inval = MmuInvalidation(self.mmu_lock, self._kvm)
        self._inval_open = False  # this set call's invalidation is begun, not ended
        self.memslots = Memslots(self._kvm)

        self._unmap_hooks: tuple[Hook, ...] = ()
        self._post_set_hooks: tuple[Hook, ...] = ()
        self._hook_error: BaseException | None = None
        # Bound once: the set path hands these to every gfn-range walk.
        self._pre_set_handler = self._pre_set_memory_attributes
        self._post_set_handler = self._post_set_memory_attributes
        self._begin_handler = self._begin_set_invalidation
        self._end_handler = self._end_set_invalidation
        self._v11 = semantics == "v11"
        self._kvm.set_native_set(not self._v11)
        # KVM_SET_MEMORY_ATTRIBUTES is the core's own entry, bound here as
        # the method, so a call that runs whole natively costs no Python
        # frame; the core calls the driver below when it cannot. (A subclass
        # that overrides the method keeps its override.)
        self._kvm.set_set_driver(weakref.WeakMethod(self._drive_set_memory_attributes))
        if type(self).set_memory_attributes is Vm.set_memory_attributes:
            self.set_memory_attributes = self._kvm.set_memory_attributes_or_drive  # type: ignore[method-assign]

        self.mmu = X86Mmu(self)
        # The same for a fault: the core's entry, and the MMU's retry loop
        # when the fault cannot finish in one native call.
        self._kvm.set_fault_driver(weakref.WeakMethod(self.mmu._fault_retry_loop))
        if type(self).fault is Vm.fault:
            self.fault = self._kvm.fault_or_drive  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return (
            f"<Vm type={self.vm_type} store={self.store_kind} semantics={self.semantics} "
            f"memslots={len(self.memslots)}>"
        )

    @property
    def stats(self) -> Stats:
        """Every counter, as the core keeps it (a snapshot)."""
        return Stats.from_counters(self._kvm.counters())

    @property
    def attr_memory_limit(self) -> int | None:
        """Bytes the attribute store may use (None: unlimited); settable."""
        return self._attr_memory_limit

    @attr_memory_limit.setter
    def attr_memory_limit(self, limit: int | None) -> None:
        self._kvm.set_attr_memory_limit(limit)
        self._attr_memory_limit = None if limit is None else int(limit)

    @property
    def manual_dirty_log_protect(self) -> int:
        """kvm->manual_dirty_log_protect (KVM_ENABLE_CAP)."""
        return int(self._kvm.manual_dirty_log_protect)

    def _lock_conflict(self) -> NoReturn:
        """A native operation refused to run because this thread holds one
        of the VM's locks: report it as lockdep would."""
        with self.slots_lock:  # raises LockdepError: recursion or inversion
            pass
        raise RuntimeError("a native operation saw a lock this thread does not hold")

    # --- capabilities --------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (x86, as ``semantics`` and the
        host answer it; the system fd's answers are
        ``vm.host.check_extension``); unknown caps 0
        (the ioctl's argument is a long: negative ones are unknown too)."""
        return int(self._kvm.check_extension(cap))

    def enable_cap(self, cap: int, flags: int = 0, args: Sequence[int] = (0, 0, 0, 0)) -> None:
        """KVM_ENABLE_CAP on the VM fd (kvm_vm_ioctl_enable_cap_generic,
        then x86's, which refuses everything the model does not know with
        EINVAL). Modelled: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, whose args[0]
        is KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, optionally with
        KVM_DIRTY_LOG_INITIALLY_SET (then turning dirty logging on leaves
        the mappings alone: every page counts as dirty); flags must be 0."""
        # A sequence of 4 values; a mapping or set would iterate its keys.
        if args is None or isinstance(args, (str, bytes, Mapping, AbstractSet)) or not hasattr(args, "__len__"):
            raise TypeError(f"args must be a sequence of 4 ints (struct kvm_enable_cap), not {type(args).__name__}")
        self._kvm.enable_cap(cap, flags, list(args))

    # --- guest_memfd and memslots --------------------------------------------

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: a simulated fd for a new guest_memfd file.

        Any VM can create one (6.8: binding it needs a VM with private
        memory; 6.18: every VM can bind one). 6.8 takes no flags; 6.18
        GUEST_MEMFD_FLAG_MMAP, and GUEST_MEMFD_FLAG_INIT_SHARED on VMs
        without private memory (KVM_CAP_GUEST_MEMFD_FLAGS); size must be
        > 0 and page aligned. ENOTTY on a host without guest_memfd.
        """
        return int(self._kvm.create_guest_memfd(size, flags))

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
        guest_memfd = _args.sint("guest_memfd", guest_memfd, 64)
        if not -(1 << 31) <= guest_memfd <= _U32_MAX:
            raise ValueError(f"guest_memfd must be an fd (a u32 or -1), got {guest_memfd}")
        # The uapi field is a __u32: -1 (no file) is 0xffffffff.
        self.kvm_vm_ioctl_set_memory_region(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd & _U32_MAX,
            guest_memfd_offset,
        )

    def kvm_vm_ioctl_compiled_in(self, ioctl: str) -> None:
        """kvm_vm_ioctl()'s switch as this VM's host was built: OSError
        ENOTTY if the case of ``ioctl`` (``"set_memory_attributes"`` or
        ``"create_guest_memfd"``) is compiled out. The ioctl front end asks
        before it reads the argument, as the kernel does."""
        self._kvm.vm_ioctl_compiled_in(ioctl)

    def kvm_vm_ioctl_set_memory_region(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int,
        guest_memfd_offset: int,
        *,
        v1: bool = False,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION (``v1``) or ..._REGION2 with the uapi
        struct's fields: the core runs it under slots_lock."""
        if sched.hook is not None:  # the explorer runs it step by step
            return driven.kvm_set_memory_region(
                self, slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd,
                guest_memfd_offset, v1=v1,
            )
        done = self._kvm.set_memory_region(
            slot, flags, guest_phys_addr, memory_size, userspace_addr, guest_memfd,
            guest_memfd_offset, v1,
        )
        if not done:
            self._lock_conflict()

    def guest_memfd_fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a guest_memfd (vfs_fallocate, then
        kvm_gmem_fallocate, Linux 6.8). ``FALLOC_FL_KEEP_SIZE`` allocates
        (nothing to model beyond the checks); with ``FALLOC_FL_PUNCH_HOLE``
        the pages go, and every mapping of them is zapped first, inside one
        invalidation, one TLB flush if anything was mapped
        (kvm_gmem_punch_hole). Errors: EBADF (not a guest_memfd of this VM),
        EINVAL (offset < 0, length <= 0, not page aligned, or an allocation
        past the file's size), EOPNOTSUPP (no KEEP_SIZE, or any other mode),
        EFBIG (offset + length past MAX_LFS_FILESIZE)."""
        if sched.hook is not None:  # the explorer runs it step by step
            return driven.kvm_gmem_fallocate(self, fd, mode, offset, length)
        if not self._kvm.guest_memfd_fallocate(fd, mode, offset, length):
            self._lock_conflict()

    def guest_memfd_close(self, fd: int) -> None:
        """close(2) of a guest_memfd: the fd number is free. If the fd held
        the file's last reference, the file is released (kvm_gmem_release):
        every bound memslot loses the file (private faults there now exit),
        every mapping through it is zapped as for a hole over the whole
        file, and the bindings go; the memslots stay. A live mapping
        (``guest_memfd_mmap``) holds a reference too: then the release waits
        for its munmap, and the mapping keeps working meanwhile. EBADF if
        ``fd`` is not an open guest_memfd of this VM."""
        if sched.hook is not None:  # the explorer runs it step by step
            return driven.kvm_gmem_release(self, fd)
        if not self._kvm.guest_memfd_close(fd):
            self._lock_conflict()

    def guest_memfd_file(self, fd: int) -> GuestMemfdFile:
        """guest_memfd ``fd`` as a file: its file operations' errnos,
        fstat, mmap (see memattr.gmem_file)."""
        self._kvm.guest_memfd_fstat(fd)  # EBADF unless a guest_memfd of this VM
        return GuestMemfdFile(self._kvm, fd, self._guest_memfd_munmap)

    def _guest_memfd_munmap(self, vma: int) -> None:
        """munmap(2) of a guest_memfd mapping (its ``close()``): the
        mapping's reference on the file goes, and the file is released
        (as by ``guest_memfd_close``) if that was its last reference."""
        if sched.hook is not None:  # the explorer runs it step by step
            return driven.kvm_gmem_munmap(self, vma)
        if not _native.gmem_munmap(self._kvm, vma):
            self._lock_conflict()

    def guest_memfd_mmap(self, fd: int, length: int, shared: bool = True) -> GuestMemfdMapping:
        """mmap(2) of the first ``length`` bytes of guest_memfd ``fd``
        (ENODEV without GUEST_MEMFD_FLAG_MMAP, EINVAL unless shared); host
        accesses through it raise GuestMemfdSigbus where the kernel sends
        SIGBUS."""
        return self.guest_memfd_file(fd).mmap(length, shared)

    def guest_memfds(self) -> list[tuple[int, int, int, list[tuple[int, int, int, int]]]]:
        """This VM's guest_memfd files: (fd, size, flags, bindings as
        (first_page, end_page, as_id, slot id)). A file whose fd was closed
        while a mapping holds it is listed (under the fd it was created
        with) until its last munmap."""
        return list(self._kvm.guest_memfds())

    # --- memory attributes ---------------------------------------------------

    def get_memory_attributes(self, gfn: int) -> int:
        """kvm_get_memory_attributes()."""
        if type(gfn) is not int or not 0 <= gfn <= U64_MAX:
            gfn = _args.uint("gfn", gfn)
        return self.store.get(gfn)  # type: ignore[no-any-return]

    def range_has_attributes(
        self, start_gfn: int, end_gfn: int, attributes: int, mask: int = U64_MAX
    ) -> bool:
        """kvm_range_has_memory_attributes(): every gfn in [start_gfn, end_gfn)
        has ``attributes`` in the bits of ``mask``. An empty range is True."""
        start_gfn = _args.uint("start_gfn", start_gfn)
        end_gfn = _args.uint("end_gfn", end_gfn)
        attributes = _args.uint("attributes", attributes)
        mask = _args.uint("mask", mask)
        if start_gfn > end_gfn:
            raise ValueError(f"start_gfn ({start_gfn}) must be <= end_gfn ({end_gfn})")
        if start_gfn == end_gfn:
            return True
        return bool(self.store.has_value(start_gfn, end_gfn, attributes, mask))

    def set_memory_attributes(
        self, address: int, size: int, attributes: int, flags: int = 0
    ) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES for [address, address + size)."""
        # (Instances call the core's entry directly; see __init__.)
        self._kvm.set_memory_attributes_or_drive(address, size, attributes, flags)

    def _drive_set_memory_attributes(self, address: int, size: int, attributes: int, flags: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES step by step, for the core's entry when
        the whole call cannot run natively: a hook, v11's ordering, a
        scheduler hook, or a modelled lock this thread holds."""
        kvm = self._kvm
        # kvm_vm_ioctl_set_mem_attributes()'s checks (counted by the core).
        start, end = kvm.set_checks(address, size, attributes, flags)
        try:
            with self.slots_lock:
                self._kvm_vm_set_mem_attributes(start, end, attributes)
        except BaseException:
            kvm.note_failed_set()
            raise

    def _kvm_vm_set_mem_attributes(self, start: int, end: int, attributes: int) -> None:
        """kvm_vm_set_mem_attributes(), under slots_lock, step by step."""
        kvm = self._kvm
        # Early exit, or reserve ahead of time so that a failure cannot
        # leave the range half set (ENOMEM changes nothing).
        if kvm.set_reserve(start, end, attributes):
            return
        ok = False
        try:
            ranges = clip_gfn_ranges(kvm, self.memslots, start, end, attributes, True)
            kvm_handle_gfn_range(
                self, ranges, self._pre_set_handler, on_lock=self._begin_handler, flush_on_ret=True
            )
            if self._hook_error is not None:
                # An on_unmap hook failed: abort before anything is stored.
                raise self._hook_error
            if sched.hook is not None:
                sched.hook(sched.STEP, "kvm_vm_set_mem_attributes:store")
            kvm.set_store(start, end, attributes)
            # Every reserved entry is now used: nothing left to release.
            ok = True
            if self._v11:
                # The seed's order: mmu_invalidate_end after mmu_lock is dropped.
                kvm_handle_gfn_range(self, ranges, self._post_set_handler, on_unlock=self._end_handler)
            else:
                kvm_handle_gfn_range(self, ranges, self._post_set_handler, on_lock=self._end_handler)
            if self._hook_error is not None:
                raise self._hook_error
        except BaseException as e:
            # A hook failed first and something else (the v11 end's lockdep
            # report) is going up instead: keep the hook's exception as its
            # context, so neither is lost.
            first = self._hook_error
            if first is not None and first is not e and e.__context__ is None:
                e.__context__ = first
                add_note = getattr(e, "add_note", None)  # Python 3.11+
                if add_note is not None:
                    add_note(f"an earlier hook raised {type(first).__name__}: {first}")
            raise
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
                kvm.release_reservations()

    def _begin_set_invalidation(self) -> None:
        self._inval.begin()
        self._inval_open = True

    def _end_set_invalidation(self) -> None:
        self._inval.end()
        self._inval_open = False

    def _pre_set_memory_attributes(self, rng: GfnRange) -> bool:
        """kvm_pre_set_memory_attributes() plus the user's on_unmap hooks."""
        flush = self.mmu.pre_set_memory_attributes(rng)
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
        self._kvm.flush_remote_tlbs()

    # --- hooks -----------------------------------------------------------------

    def _hooks_changed(self) -> None:
        # Hooks are called per range from the driver: no whole native call.
        self._kvm.set_native_set(not (self._v11 or self._unmap_hooks or self._post_set_hooks))

    def on_unmap(self, fn: H) -> H:
        """Register ``fn(GfnRange) -> bool`` for the pre-set pass (mmu_lock
        held, after the MMU's zap); a true result requests a TLB flush.
        Usable as a decorator; returns ``fn``."""
        if not callable(fn):
            raise TypeError(f"on_unmap hook must be callable, not {type(fn).__name__}")
        self._unmap_hooks = (*self._unmap_hooks, fn)
        self._hooks_changed()
        return fn

    def on_post_set(self, fn: H) -> H:
        """Register ``fn(GfnRange)`` for the post-set pass (mmu_lock held,
        after the MMU's post-set work; the new attributes are stored).
        Usable as a decorator; returns ``fn``."""
        if not callable(fn):
            raise TypeError(f"on_post_set hook must be callable, not {type(fn).__name__}")
        self._post_set_hooks = (*self._post_set_hooks, fn)
        self._hooks_changed()
        return fn

    def remove_hook(self, fn: Hook) -> None:
        """Unregister ``fn`` from both hook lists (ValueError if absent)."""
        unmap = tuple(h for h in self._unmap_hooks if h is not fn)
        post = tuple(h for h in self._post_set_hooks if h is not fn)
        if len(unmap) == len(self._unmap_hooks) and len(post) == len(self._post_set_hooks):
            raise ValueError(f"{fn!r} is not a registered hook")
        self._unmap_hooks, self._post_set_hooks = unmap, post
        self._hooks_changed()

    @property
    def has_hooks(self) -> bool:
        return bool(self._unmap_hooks or self._post_set_hooks)

    # --- MMU invalidation state ------------------------------------------------

    @property
    def mmu_invalidate_seq(self) -> int:
        return int(self._kvm.inval[0])

    @property
    def mmu_invalidate_in_progress(self) -> int:
        return int(self._kvm.inval[1])

    @property
    def mmu_invalidate_range_start(self) -> int:
        return int(self._kvm.inval[2])

    @property
    def mmu_invalidate_range_end(self) -> int:
        return int(self._kvm.inval[3])

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
        or MemoryFault (KVM_EXIT_MEMORY_FAULT). (Instances call the core's
        entry directly; see __init__.)"""
        return int(self._kvm.fault_or_drive(gpa, private, write))

    def max_mapping_level(self, gfn: int) -> int:
        return self.mmu.max_mapping_level(gfn)

    def hugepage_mixed(self, slot: int | Memslot, gfn: int, level: int) -> bool:
        """Is the ``level`` hugepage holding ``gfn`` in uapi slot ``slot``
        (as_id << 16 | id) mixed (hugepage_test_mixed)?"""
        return self.mmu.hugepage_mixed(slot, gfn, level)

    # --- ioctl front end ---------------------------------------------------------

    def ioctl(self, request: int, arg: Any = 0, mutate_flag: Any = True) -> int | bytes:
        """fcntl.ioctl() on the VM fd; see memattr.ioctl. Called as
        ``vm.ioctl(fd, request, buffer)`` (a buffer third), the same on one
        of the VM's guest_memfd fds (see ``guest_memfd_ioctl``)."""
        if not isinstance(mutate_flag, (bool, int)):
            return self.guest_memfd_ioctl(request, arg, mutate_flag)
        return vm_ioctl(self, request, arg, bool(mutate_flag))


__all__ = ["Vm"]
