"""The KVM user API this package models: constants, ioctl numbers, structures.

Names and values are the kernel's (include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h, Linux 6.8 and later). Ioctl numbers are
computed with the generic ``_IOC`` encoding that x86 uses, never typed in, so
a wrong direction or structure size shows up as a wrong number.

The seed's RFC v11 uapi differs from what was merged: it had
``KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES`` (dropped before merge, replaced by
``KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES)`` returning the mask) and its
``KVM_SET_MEMORY_ATTRIBUTES`` used ioctl nr 0xd3; both are provided here for
the Vm's ``semantics="v11"`` mode.
"""

from __future__ import annotations

import ctypes
from typing import Final

# --- asm-generic/ioctl.h: the encoding x86 uses -----------------------------

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_DIRBITS: Final = 2

_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    # The kernel rejects oversized structures at build time; do the same here.
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl size {size} does not fit in {_IOC_SIZEBITS} bits")
    if not 0 <= nr < (1 << _IOC_NRBITS) or not 0 <= type_ < (1 << _IOC_TYPEBITS):
        raise ValueError("ioctl type/nr out of range")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


def _IOC_DIR(request: int) -> int:
    return (request >> _IOC_DIRSHIFT) & ((1 << _IOC_DIRBITS) - 1)


def _IOC_SIZE(request: int) -> int:
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# --- pages ------------------------------------------------------------------

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
# include/linux/limits.h
U64_MAX: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1
S64_MAX: Final = (1 << 63) - 1  # loff_t's range (MAX_LFS_FILESIZE on 64-bit)
S64_MIN: Final = -(1 << 63)
S32_MAX: Final = (1 << 31) - 1
S32_MIN: Final = -(1 << 31)
# include/linux/sizes.h
SZ_2M: Final = 0x00200000
SZ_1G: Final = 0x40000000
SZ_4G: Final = 0x100000000
# kvm_host.h: a gpa nobody can map, used to mark an empty invalidation range.
INVALID_GPA: Final = U64_MAX

# --- structures (exact kernel layout on x86-64) -----------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    """struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION), 32 bytes."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),  # bytes
        ("userspace_addr", ctypes.c_uint64),  # start of the userspace allocated memory
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    """struct kvm_userspace_memory_region2 (KVM_SET_USER_MEMORY_REGION2), 160 bytes."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    ]


class kvm_memory_attributes(ctypes.Structure):
    """struct kvm_memory_attributes (KVM_SET_MEMORY_ATTRIBUTES), 32 bytes."""

    _fields_ = [
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class kvm_create_guest_memfd(ctypes.Structure):
    """struct kvm_create_guest_memfd (KVM_CREATE_GUEST_MEMFD), 64 bytes."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    ]


class kvm_enable_cap(ctypes.Structure):
    """struct kvm_enable_cap (KVM_ENABLE_CAP), 104 bytes."""

    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


# --- ioctls -----------------------------------------------------------------

KVMIO: Final = 0xAE

# /dev/kvm
KVM_CREATE_VM: Final = _IO(KVMIO, 0x01)
# /dev/kvm and VM fds
KVM_CHECK_EXTENSION: Final = _IO(KVMIO, 0x03)
# VM fds
KVM_SET_USER_MEMORY_REGION: Final = _IOW(KVMIO, 0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_USER_MEMORY_REGION2: Final = _IOW(
    KVMIO, 0x49, ctypes.sizeof(kvm_userspace_memory_region2)
)
KVM_SET_MEMORY_ATTRIBUTES: Final = _IOW(KVMIO, 0xD2, ctypes.sizeof(kvm_memory_attributes))
KVM_CREATE_GUEST_MEMFD: Final = _IOWR(KVMIO, 0xD4, ctypes.sizeof(kvm_create_guest_memfd))
KVM_ENABLE_CAP: Final = _IOW(KVMIO, 0xA3, ctypes.sizeof(kvm_enable_cap))

# RFC v11 only (the seed): never merged.
KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES: Final = _IOR(KVMIO, 0xD2, ctypes.sizeof(ctypes.c_uint64))
KVM_SET_MEMORY_ATTRIBUTES_V11: Final = _IOW(KVMIO, 0xD3, ctypes.sizeof(kvm_memory_attributes))

# --- capabilities (KVM_CHECK_EXTENSION) -------------------------------------

KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_FAULT_INFO: Final = 232
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_PRE_FAULT_MEMORY: Final = 236
KVM_CAP_X86_APIC_BUS_CYCLES_NS: Final = 237
KVM_CAP_X86_GUEST_MODE: Final = 238
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244

# KVM_CREATE_GUEST_MEMFD flags (6.18).
GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1

# --- memslot flags (kvm_userspace_memory_region*.flags) ---------------------

KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2
# kvm_main.c: the flags KVM_SET_USER_MEMORY_REGION (v1) accepts at all.
KVM_SET_USER_MEMORY_REGION_V1_FLAGS: Final = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 options (KVM_ENABLE_CAP args[0]).
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET: Final = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS: Final = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET

# --- memslot limits (kvm_host.h, x86) ---------------------------------------

KVM_MEM_SLOTS_NUM: Final = 0x7FFF  # SHRT_MAX
KVM_INTERNAL_MEM_SLOTS: Final = 3  # x86: TSS, identity map, APIC access page
KVM_USER_MEM_SLOTS: Final = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS
KVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1
KVM_MAX_NR_ADDRESS_SPACES: Final = 2  # x86: normal and SMM

# --- memory attributes ------------------------------------------------------

KVM_MEMORY_ATTRIBUTE_PRIVATE: Final = 1 << 3

# --- exits ------------------------------------------------------------------

KVM_EXIT_MEMORY_FAULT: Final = 39
KVM_MEMORY_EXIT_FLAG_PRIVATE: Final = 1 << 3

# include/uapi/linux/falloc.h: the fallocate(2) modes guest_memfd accepts.
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

# --- x86 VM types (KVM_CREATE_VM type argument) -----------------------------

KVM_X86_DEFAULT_VM: Final = 0
KVM_X86_SW_PROTECTED_VM: Final = 1
KVM_X86_SEV_VM: Final = 2
KVM_X86_SEV_ES_VM: Final = 3
KVM_X86_SNP_VM: Final = 4
KVM_X86_TDX_VM: Final = 5

__all__ = [
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "KVM_CAP_GUEST_MEMFD_FLAGS",
    "KVM_CAP_PRE_FAULT_MEMORY",
    "KVM_CAP_X86_APIC_BUS_CYCLES_NS",
    "KVM_CAP_X86_GUEST_MODE",
    "KVM_CREATE_VM",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "INVALID_GPA",
    "KVMIO",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "KVM_CAP_MEMORY_ATTRIBUTES",
    "KVM_CAP_MEMORY_FAULT_INFO",
    "KVM_CAP_MULTI_ADDRESS_SPACE",
    "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_READONLY_MEM",
    "KVM_CAP_USER_MEMORY",
    "KVM_CAP_USER_MEMORY2",
    "KVM_CAP_VM_TYPES",
    "KVM_CHECK_EXTENSION",
    "KVM_CREATE_GUEST_MEMFD",
    "KVM_DIRTY_LOG_INITIALLY_SET",
    "KVM_DIRTY_LOG_MANUAL_CAPS",
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
    "KVM_ENABLE_CAP",
    "KVM_EXIT_MEMORY_FAULT",
    "KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES",
    "KVM_INTERNAL_MEM_SLOTS",
    "KVM_MAX_NR_ADDRESS_SPACES",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_MAX_NR_PAGES",
    "KVM_MEM_READONLY",
    "KVM_MEM_SLOTS_NUM",
    "KVM_SET_MEMORY_ATTRIBUTES",
    "KVM_SET_MEMORY_ATTRIBUTES_V11",
    "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_USER_MEMORY_REGION2",
    "KVM_SET_USER_MEMORY_REGION_V1_FLAGS",
    "KVM_USER_MEM_SLOTS",
    "KVM_X86_DEFAULT_VM",
    "KVM_X86_SEV_ES_VM",
    "KVM_X86_SEV_VM",
    "KVM_X86_SNP_VM",
    "KVM_X86_SW_PROTECTED_VM",
    "KVM_X86_TDX_VM",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "S32_MAX",
    "S32_MIN",
    "S64_MAX",
    "S64_MIN",
    "SZ_1G",
    "SZ_2M",
    "SZ_4G",
    "U32_MAX",
    "U64_MAX",
    "kvm_create_guest_memfd",
    "kvm_enable_cap",
    "kvm_memory_attributes",
    "kvm_userspace_memory_region",
    "kvm_userspace_memory_region2",
]

# --- guest_memfd in-place conversion series ---------------------------------
# googleprodkernel/linux-cc guest_memfd-inplace-conversion-v8 (June 2026), the
# newest revision read; v5 (April 2026) for the content modes v7 dropped.


class kvm_memory_attributes2(ctypes.Structure):
    """struct kvm_memory_attributes2 (KVM_SET_MEMORY_ATTRIBUTES2 on a
    guest_memfd fd), 128 bytes; ``offset`` is the union's guest_memfd name
    for ``address``; ``error_offset`` is written back on EAGAIN (and the
    other errors found after validation)."""

    _fields_ = [
        ("offset", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("error_offset", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 11),
    ]


KVM_SET_MEMORY_ATTRIBUTES2: Final = _IOWR(KVMIO, 0xD2, ctypes.sizeof(kvm_memory_attributes2))
KVM_MEMORY_ATTRIBUTES2_SIZE: Final = ctypes.sizeof(kvm_memory_attributes2)
# v8's number; v5 numbered it 249 and used 250 for the content-mode flags.
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: Final = 250
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5: Final = 249
KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS: Final = 250
# v5 content modes (KVM_SET_MEMORY_ATTRIBUTES2 flags); v7/v8 take none.
KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED: Final = 0
KVM_SET_MEMORY_ATTRIBUTES2_ZERO: Final = 1 << 0
KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE: Final = 1 << 1
# enum kvm_gfn_range_filter
KVM_FILTER_SHARED: Final = 1 << 0
KVM_FILTER_PRIVATE: Final = 1 << 1

__all__ += [
    "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES",
    "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5",
    "KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS",
    "KVM_FILTER_PRIVATE",
    "KVM_FILTER_SHARED",
    "KVM_MEMORY_ATTRIBUTES2_SIZE",
    "KVM_SET_MEMORY_ATTRIBUTES2",
    "KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED",
    "KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE",
    "KVM_SET_MEMORY_ATTRIBUTES2_ZERO",
    "kvm_memory_attributes2",
]
