"""What the explorer knows about each scheduling point: the shared state the
step after it may touch (for partial-order reduction), and the kernel
function names of the driver's Python frames (for call traces).

A step is the code an actor runs from one scheduling point to its next. Its
footprint is a pair (reads, writes) of abstract pieces of the VM's state;
two steps of different actors commute when neither writes what the other
reads or writes. Footprints are over-approximations: a label the table does
not know (a user hook's handler, the first step of an actor, whatever an
actor does between two operations) reads and writes everything.
"""

from __future__ import annotations

from types import FrameType

from memattr import sched

IN_PROGRESS = "mmu_invalidate_in_progress"
SEQ = "mmu_invalidate_seq"
RANGE = "mmu_invalidate_range"
STORE = "mem_attr_array"
RESERVED = "reservations"
MMU = "tdp"
MIXED = "lpage_info"
SLOTS = "memslots"
GMEM = "guest_memfd"

EVERYTHING = frozenset({IN_PROGRESS, SEQ, RANGE, STORE, RESERVED, MMU, MIXED, SLOTS, GMEM})
NOTHING: frozenset[str] = frozenset()

Footprint = tuple[frozenset[str], frozenset[str]]
ALL: Footprint = (EVERYTHING, EVERYTHING)


def _fp(reads: set[str] | frozenset[str], writes: set[str] | frozenset[str]) -> Footprint:
    return frozenset(reads), frozenset(writes)


# The step after a STEP point, by label.
STEP_FOOTPRINTS: dict[str, Footprint] = {
    "kvm_mmu_invalidate_begin:read": _fp({IN_PROGRESS}, NOTHING),
    "kvm_mmu_invalidate_begin:write": _fp(NOTHING, {IN_PROGRESS, RANGE}),
    "kvm_mmu_invalidate_end:seq_read": _fp({SEQ}, NOTHING),
    "kvm_mmu_invalidate_end:seq_write": _fp(NOTHING, {SEQ}),
    "kvm_mmu_invalidate_end:read": _fp({IN_PROGRESS}, NOTHING),
    # The write half also checks that a range was added (WARN).
    "kvm_mmu_invalidate_end:write": _fp({RANGE}, {IN_PROGRESS}),
    # range_add WARNs when no invalidation is in progress: it reads the count.
    "kvm_mmu_invalidate_range_add": _fp({IN_PROGRESS, RANGE}, {RANGE}),
    "kvm_mmu_unmap_gfn_range": _fp({IN_PROGRESS, RANGE}, {RANGE, MMU}),
    "_pre_set_memory_attributes": _fp({IN_PROGRESS, RANGE, SLOTS, MIXED, STORE}, {RANGE, MMU}),
    "_post_set_memory_attributes": _fp({STORE, SLOTS, MIXED}, {MIXED}),
    "kvm_vm_set_mem_attributes:store": _fp({RESERVED}, {STORE, RESERVED}),
    "kvm_gmem_fallocate": _fp({GMEM, SLOTS}, NOTHING),
    "kvm_gmem_release": _fp({GMEM, SLOTS}, {GMEM, SLOTS, MMU}),
    "__kvm_set_memory_region": _fp({STORE, GMEM, SLOTS, MMU, MIXED}, {SLOTS, MMU, MIXED, GMEM}),
    "kvm_faultin_pfn": _fp({IN_PROGRESS, SEQ, RANGE, SLOTS, STORE, GMEM}, NOTHING),
    "kvm_tdp_map": _fp({IN_PROGRESS, SEQ, RANGE, SLOTS, MIXED, STORE}, {MMU}),
}

# What follows taking slots_lock in the set path: the early-exit check and
# the reservation, then clipping the range to the memslots.
_AFTER_SLOTS_LOCK = _fp({STORE, RESERVED, SLOTS}, {RESERVED})
# What follows dropping a lock: after an operation's last lock, whatever the
# actor does next, unknown.
_AFTER_RELEASE = ALL


def footprint(kind: str, what: object, holds_other_locks: bool = False) -> Footprint:
    """(reads, writes) of the step after a scheduling point.
    ``holds_other_locks``: the actor keeps another lock after this one is
    released, so the operation goes on to its next point (whose footprint
    is its own) rather than back to the actor's unknown code."""
    if kind == sched.STEP:
        return STEP_FOOTPRINTS.get(str(what), ALL)
    if kind == sched.RETRY:
        return NOTHING, NOTHING
    lock = "lock:" + str(getattr(what, "name", what))
    if kind == sched.ACQUIRE:
        reads, writes = _AFTER_SLOTS_LOCK if lock == "lock:slots_lock" else (NOTHING, NOTHING)
        return reads | {lock}, writes | {lock}
    reads, writes = (NOTHING, NOTHING) if holds_other_locks else _AFTER_RELEASE
    return reads | {lock}, writes | {lock}


def independent(a: Footprint, b: Footprint) -> bool:
    """Do two steps (of different actors) commute?"""
    (ra, wa), (rb, wb) = a, b
    return not (wa & wb or wa & rb or ra & wb)


# --- kernel names for call traces -----------------------------------------------

_IOCTL = ["__x64_sys_ioctl", "do_syscall_64", "entry_SYSCALL_64_after_hwframe"]

# Python function (code name) -> kernel frames, innermost first. Frames not
# listed are skipped, except the driver's kvm_* functions, named for the
# kernel's already.
KERNEL_FRAMES: dict[str, list[str]] = {
    "set_memory_attributes": ["kvm_vm_ioctl_set_mem_attributes", "kvm_vm_ioctl", *_IOCTL],
    "_kvm_vm_set_mem_attributes": ["kvm_vm_set_mem_attributes"],
    "kvm_handle_gfn_range": ["kvm_handle_gfn_range"],
    "_pre_set_memory_attributes": ["kvm_pre_set_memory_attributes"],
    "_post_set_memory_attributes": ["kvm_arch_post_set_memory_attributes"],
    "begin": ["kvm_mmu_invalidate_begin"],
    "end": ["kvm_mmu_invalidate_end"],
    "range_add": ["kvm_mmu_invalidate_range_add"],
    "kvm_vm_ioctl_set_memory_region": ["kvm_vm_ioctl_set_memory_region", "kvm_vm_ioctl", *_IOCTL],
    "kvm_set_memory_region": ["kvm_set_memory_region"],
    "kvm_gmem_fallocate": ["kvm_gmem_fallocate", "vfs_fallocate", "__x64_sys_fallocate",
                           "do_syscall_64", "entry_SYSCALL_64_after_hwframe"],
    "kvm_gmem_release": ["kvm_gmem_release", "__fput", "task_work_run", "syscall_exit_to_user_mode",
                         "do_syscall_64", "entry_SYSCALL_64_after_hwframe"],
    "_fault_retry_loop": ["kvm_tdp_mmu_page_fault"],
    "kvm_tdp_map": ["kvm_tdp_mmu_map"],
    "fault": ["kvm_tdp_page_fault", "kvm_mmu_do_page_fault", "kvm_mmu_page_fault",
              "vcpu_enter_guest", "vcpu_run", "kvm_arch_vcpu_ioctl_run", "kvm_vcpu_ioctl", *_IOCTL],
}

_DRIVER_FILES = ("vm.py", "gfn_range.py", "locks.py", "mmu.py", "driven.py")
_LOCK_FRAMES = {"slots_lock": "mutex_lock", "mmu_lock": "_raw_write_lock"}


def kernel_stack(frame: FrameType | None) -> list[str]:
    """The kernel frames of a driver call stack, innermost first."""
    out: list[str] = []
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith(_DRIVER_FILES) and "memattr" in code.co_filename:
            name = code.co_name
            mapped = KERNEL_FRAMES.get(name)
            if mapped is None and (name.startswith("kvm_") or name.startswith("__kvm_")):
                mapped = [name]
            if mapped and mapped[0] not in out:
                out.extend(f for f in mapped if f not in out)
        frame = frame.f_back
    return out


def point_frame(kind: str, what: object) -> str:
    """The innermost frame of an actor parked at a point: what it is about
    to do, in kernel words."""
    if kind == sched.STEP:
        label = str(what)
        name, _, half = label.partition(":")
        name = KERNEL_FRAMES.get(name, [name])[0]
        return f"{name} ({half.replace('_', ' ')})" if half else name
    if kind == sched.RETRY:
        return "RET_PF_RETRY: back to the guest, fault again"
    lock = str(getattr(what, "name", what))
    if kind == sched.ACQUIRE:
        return f"{_LOCK_FRAMES.get(lock, 'down_write')}({lock})"
    return f"{_LOCK_FRAMES.get(lock, 'up_write').replace('_lock', '_unlock').replace('down', 'up')}({lock})"


def merge_frames(top: str, frames: list[str]) -> list[str]:
    """A parked actor's trace: what it is about to do, over the frames it
    is in (the step's own function is not listed twice)."""
    if frames and top.split(" ")[0].split("(")[0] == frames[0]:
        return [top, *frames[1:]]
    return [top, *frames]


def step_text(kind: str, what: object) -> str:
    """A timeline line's description of a step."""
    if kind == sched.STEP:
        return point_frame(kind, what)
    if kind == sched.RETRY:
        return "retry: re-enter the guest"
    lock = str(getattr(what, "name", what))
    return f"{'lock' if kind == sched.ACQUIRE else 'unlock'} {lock}"


__all__ = [
    "ALL",
    "Footprint",
    "KERNEL_FRAMES",
    "footprint",
    "independent",
    "kernel_stack",
    "merge_frames",
    "point_frame",
    "step_text",
]
