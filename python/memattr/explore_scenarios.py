"""Named scenarios for ``memattr explore`` and the actors they are built of.

Each scenario is a function of its parameters returning a
:class:`memattr.explore.Scenario`; the parameters go into schedule files, so
``--replay`` rebuilds the same scenario. Every scenario runs on a VM of type
KVM_X86_SW_PROTECTED_VM with one 4 MiB guest_memfd memslot at gpa 0 (two 2M
hugepages), all memory shared at the start.

- ``seed``: the seed's race. v11 semantics, lock checker off (a production
  kernel): KVM_SET_MEMORY_ATTRIBUTES to private over 16 pages racing a
  guest_memfd hole punch over the same pages. v11 runs
  kvm_mmu_invalidate_end() after dropping mmu_lock, so its
  ``in_progress--`` can lose the hole punch's ``in_progress++``; the punch's
  kvm_mmu_unmap_gfn_range() then WARNs in kvm_mmu_invalidate_range_add().
- ``straddle``: the attributes-vs-hugepage race. A conversion of 16 pages
  inside the first 2M hugepage racing a shared fault on the same hugepage
  outside the range, with ``mmu.invalidate_straddling_hugepages`` off (the
  kernels before the 2025 fix): the fault can map a 2M leaf from mixed flags
  about to change, over memory that ends up mixed.
- ``fault-conversion``: a shared fault racing a conversion of its page to
  private: mmu_invalidate_seq and the invalidated range must keep the fault
  from installing a stale mapping.
- ``memslots``: a shared fault racing a move of its (ordinary) memslot and
  a dirty-logging toggle on another slot.
- ``gmem-close``: a private fault and a conversion racing the close of the
  guest_memfd (slots_lock, the file's invalidation lock and mmu_lock).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memattr.explore import Actor, Scenario
from memattr.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_SW_PROTECTED_VM,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from memattr.vm import Vm

P = KVM_MEMORY_ATTRIBUTE_PRIVATE
SLOT_PAGES = 1024  # two 2M hugepages
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def gmem_vm(semantics: str, lockdep: bool, store: str = "rangetree", fix: bool = True) -> tuple[Vm, dict[str, Any]]:
    """A SW_PROTECTED VM with a guest_memfd memslot 0 of SLOT_PAGES at gpa 0."""
    vm = Vm(KVM_X86_SW_PROTECTED_VM, store, semantics=semantics, lockdep=lockdep)  # type: ignore[arg-type]
    vm.mmu.invalidate_straddling_hugepages = fix
    fd = vm.create_guest_memfd(SLOT_PAGES * PAGE_SIZE)
    vm.set_user_memory_region(0, 0, SLOT_PAGES * PAGE_SIZE, flags=KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
    return vm, {"fd": fd}


# --- actors: one operation each, through the ordinary Vm API -----------------------------


def set_attributes(first_gfn: int, npages: int, attributes: int) -> Callable[[Vm], None]:
    def actor(vm: Vm) -> None:
        vm.set_memory_attributes(first_gfn << PAGE_SHIFT, npages << PAGE_SHIFT, attributes)

    return actor


def punch_hole(first_page: int, npages: int) -> Callable[[Vm, dict[str, Any]], None]:
    def actor(vm: Vm, env: dict[str, Any]) -> None:
        vm.guest_memfd_fallocate(env["fd"], PUNCH, first_page << PAGE_SHIFT, npages << PAGE_SHIFT)

    return actor


def close_gmem(vm: Vm, env: dict[str, Any]) -> None:
    vm.guest_memfd_close(env["fd"])


def fault(gfn: int, private: bool = False) -> Callable[[Vm], int]:
    def actor(vm: Vm) -> int:
        return vm.fault(gfn << PAGE_SHIFT, private=private)

    return actor


def move_slot(slot: int, new_gfn: int, npages: int) -> Callable[[Vm], None]:
    def actor(vm: Vm) -> None:
        vm.set_user_memory_region(slot, new_gfn << PAGE_SHIFT, npages << PAGE_SHIFT)

    return actor


def delete_slot(slot: int) -> Callable[[Vm], None]:
    def actor(vm: Vm) -> None:
        vm.set_user_memory_region(slot, 0, 0)

    return actor


def toggle_dirty_logging(slot: int, gfn: int, npages: int) -> Callable[[Vm], None]:
    def actor(vm: Vm) -> None:
        size = npages << PAGE_SHIFT
        vm.set_user_memory_region(slot, gfn << PAGE_SHIFT, size, flags=KVM_MEM_LOG_DIRTY_PAGES)
        vm.set_user_memory_region(slot, gfn << PAGE_SHIFT, size, flags=0)

    return actor


# --- the named scenarios ---------------------------------------------------------------------


def seed(semantics: str = "v11", lockdep: bool = False, store: str = "rangetree") -> Scenario:
    return Scenario(
        "seed",
        lambda: gmem_vm(semantics, lockdep, store),
        [
            Actor("set_attributes", set_attributes(0, 16, P), comm="qemu-vcpu0"),
            Actor("punch_hole", punch_hole(0, 16), comm="qemu-discard"),
        ],
        "KVM_SET_MEMORY_ATTRIBUTES racing a guest_memfd hole punch",
        {"semantics": semantics, "lockdep": lockdep, "store": store},
    )


def straddle(semantics: str = "6.8", fix: bool = False, lockdep: bool = True, store: str = "rangetree") -> Scenario:
    return Scenario(
        "straddle",
        lambda: gmem_vm(semantics, lockdep, store, fix),
        [
            Actor("set_attributes", set_attributes(0x10, 16, P), comm="qemu-vcpu0"),
            Actor("fault", fault(0x100), comm="qemu-vcpu1"),
        ],
        "a conversion inside a 2M hugepage racing a shared fault on the same hugepage",
        {"semantics": semantics, "fix": fix, "lockdep": lockdep, "store": store},
    )


def fault_conversion(semantics: str = "6.8", lockdep: bool = True, store: str = "rangetree") -> Scenario:
    return Scenario(
        "fault-conversion",
        lambda: gmem_vm(semantics, lockdep, store),
        [
            Actor("set_attributes", set_attributes(0x10, 16, P), comm="qemu-vcpu0"),
            Actor("fault", fault(0x18), comm="qemu-vcpu1"),
        ],
        "a shared fault racing the conversion of its page to private",
        {"semantics": semantics, "lockdep": lockdep, "store": store},
    )


def _memslots_setup(semantics: str, lockdep: bool, store: str) -> tuple[Vm, dict[str, Any]]:
    vm, env = gmem_vm(semantics, lockdep, store)
    # Two ordinary (shared-only) slots above the guest_memfd one.
    vm.set_user_memory_region(1, 0x400000, 0x200000)
    vm.set_user_memory_region(2, 0x800000, 0x200000)
    return vm, env


def memslots(semantics: str = "6.8", lockdep: bool = True, store: str = "rangetree") -> Scenario:
    return Scenario(
        "memslots",
        lambda: _memslots_setup(semantics, lockdep, store),
        [
            Actor("fault", fault(0x400 + 8), comm="qemu-vcpu0"),
            Actor("move_slot", move_slot(1, 0xC00, 512), comm="qemu-main"),
            Actor("dirty_log", toggle_dirty_logging(2, 0x800, 512), comm="qemu-migrate"),
        ],
        "a fault racing a memslot move and a dirty-logging toggle",
        {"semantics": semantics, "lockdep": lockdep, "store": store},
    )


def _private_vm(semantics: str, lockdep: bool, store: str) -> tuple[Vm, dict[str, Any]]:
    vm, env = gmem_vm(semantics, lockdep, store)
    vm.set_memory_attributes(0, 16 << PAGE_SHIFT, P)
    return vm, env


def gmem_close(semantics: str = "6.8", lockdep: bool = True, store: str = "rangetree") -> Scenario:
    return Scenario(
        "gmem-close",
        lambda: _private_vm(semantics, lockdep, store),
        [
            Actor("fault", fault(0x8, private=True), comm="qemu-vcpu0"),
            Actor("close_gmem", close_gmem, comm="qemu-exit"),
            Actor("set_attributes", set_attributes(0x100, 16, P), comm="qemu-vcpu1"),
        ],
        "a private fault and a conversion racing the close of the guest_memfd",
        {"semantics": semantics, "lockdep": lockdep, "store": store},
    )


SCENARIOS: dict[str, Callable[..., Scenario]] = {
    "seed": seed,
    "straddle": straddle,
    "fault-conversion": fault_conversion,
    "memslots": memslots,
    "gmem-close": gmem_close,
}


def build(name: str, **params: Any) -> Scenario:
    """A named scenario with ``params`` (ValueError for an unknown name)."""
    try:
        factory = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"no scenario {name!r} (known: {', '.join(SCENARIOS)})") from None
    return factory(**params)


__all__ = [
    "SCENARIOS",
    "build",
    "close_gmem",
    "delete_slot",
    "fault",
    "fault_conversion",
    "gmem_close",
    "gmem_vm",
    "memslots",
    "move_slot",
    "punch_hole",
    "seed",
    "set_attributes",
    "straddle",
    "toggle_dirty_logging",
]
