//! The kernel's constants the core uses, under the kernel's names
//! (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h,
//! include/uapi/linux/falloc.h, kvm_host.h, errno.h). `memattr.uapi` is the
//! Python side's copy of the uapi; a test holds the two equal through
//! `memattr._native.UAPI`.

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// kvm_host.h: a gpa nobody can map; also "no range yet" for invalidations.
pub const INVALID_GPA: u64 = u64::MAX;

pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;

pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
pub const KVM_MEM_READONLY: u32 = 1 << 1;
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// The flags KVM_SET_USER_MEMORY_REGION (v1) accepts at all.
pub const KVM_SET_USER_MEMORY_REGION_V1_FLAGS: u32 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY;

/// SHRT_MAX: memslot ids are below it.
pub const KVM_MEM_SLOTS_NUM: u32 = 0x7FFF;
/// x86: TSS, identity map, APIC access page.
pub const KVM_INTERNAL_MEM_SLOTS: u32 = 3;
pub const KVM_USER_MEM_SLOTS: u32 = KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS;
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;
/// x86: normal and SMM.
pub const KVM_MAX_NR_ADDRESS_SPACES: usize = 2;

pub const KVM_CAP_USER_MEMORY: u32 = 3;
pub const KVM_CAP_NR_MEMSLOTS: u32 = 10;
pub const KVM_CAP_READONLY_MEM: u32 = 81;
pub const KVM_CAP_MULTI_ADDRESS_SPACE: u32 = 118;
pub const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
pub const KVM_CAP_USER_MEMORY2: u32 = 231;
pub const KVM_CAP_MEMORY_FAULT_INFO: u32 = 232;
pub const KVM_CAP_MEMORY_ATTRIBUTES: u32 = 233;
pub const KVM_CAP_GUEST_MEMFD: u32 = 234;
pub const KVM_CAP_VM_TYPES: u32 = 235;
pub const KVM_CAP_PRE_FAULT_MEMORY: u32 = 236;
pub const KVM_CAP_X86_APIC_BUS_CYCLES_NS: u32 = 237;
pub const KVM_CAP_X86_GUEST_MODE: u32 = 238;
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// KVM_CREATE_GUEST_MEMFD flags (6.18).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

pub const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
pub const KVM_DIRTY_LOG_INITIALLY_SET: u64 = 1 << 1;
pub const KVM_DIRTY_LOG_MANUAL_CAPS: u64 =
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;

pub const KVM_X86_DEFAULT_VM: u64 = 0;
pub const KVM_X86_SW_PROTECTED_VM: u64 = 1;
pub const KVM_X86_SEV_VM: u64 = 2;
pub const KVM_X86_SEV_ES_VM: u64 = 3;
pub const KVM_X86_SNP_VM: u64 = 4;
pub const KVM_X86_TDX_VM: u64 = 5;

pub const FALLOC_FL_KEEP_SIZE: u64 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u64 = 0x02;
pub const FALLOC_FL_COLLAPSE_RANGE: u64 = 0x08;
pub const FALLOC_FL_ZERO_RANGE: u64 = 0x10;
pub const FALLOC_FL_INSERT_RANGE: u64 = 0x20;
pub const FALLOC_FL_UNSHARE_RANGE: u64 = 0x40;
/// Linux 6.17.
pub const FALLOC_FL_WRITE_ZEROES: u64 = 0x80;
/// Every mode vfs_fallocate() of 6.8 knows.
pub const FALLOC_FL_SUPPORTED_MASK: u64 = 0x7F;
/// 6.18's FALLOC_FL_MODE_MASK: the exclusive modes (allocate is none).
pub const FALLOC_FL_MODE_MASK: u64 = FALLOC_FL_PUNCH_HOLE
    | FALLOC_FL_COLLAPSE_RANGE
    | FALLOC_FL_ZERO_RANGE
    | FALLOC_FL_INSERT_RANGE
    | FALLOC_FL_UNSHARE_RANGE
    | FALLOC_FL_WRITE_ZEROES;
/// MAX_LFS_FILESIZE on 64-bit.
pub const MAX_LFS_FILESIZE: u64 = i64::MAX as u64;

pub const EINTR: i32 = 4;
pub const EIO: i32 = 5;
pub const EBADF: i32 = 9;
pub const ENOMEM: i32 = 12;
pub const EFAULT: i32 = 14;
pub const EEXIST: i32 = 17;
pub const ENODEV: i32 = 19;
pub const EINVAL: i32 = 22;
pub const ENOTTY: i32 = 25;
pub const EFBIG: i32 = 27;
pub const ESPIPE: i32 = 29;
pub const EOPNOTSUPP: i32 = 95;

// --- guest_memfd in-place conversion series (googleprodkernel/linux-cc,
// guest_memfd-inplace-conversion-v8, June 2026; v5's content modes) ---

/// _IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2), on the guest_memfd fd.
pub const KVM_SET_MEMORY_ATTRIBUTES2: u64 = 0xC080_AED2;
/// sizeof(struct kvm_memory_attributes2): offset, size, attributes, flags,
/// error_offset, reserved[11].
pub const KVM_MEMORY_ATTRIBUTES2_SIZE: u64 = 128;
/// v8 (and v7): the attributes KVM_SET_MEMORY_ATTRIBUTES2 takes on a
/// guest_memfd; 0 when per-file attributes are off.
pub const KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES: u32 = 250;
/// v5's number for the same capability (249), and v5's capability for the
/// supported content-mode flags (250, reused by v8 for the one above).
pub const KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5: u32 = 249;
pub const KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS: u32 = 250;
/// v5 content modes (flags of KVM_SET_MEMORY_ATTRIBUTES2); v7 and v8 take
/// no flags.
pub const KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED: u64 = 0;
pub const KVM_SET_MEMORY_ATTRIBUTES2_ZERO: u64 = 1 << 0;
pub const KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE: u64 = 1 << 1;
/// enum kvm_gfn_range_filter: which mappings an invalidation zaps.
pub const KVM_FILTER_SHARED: u64 = 1 << 0;
pub const KVM_FILTER_PRIVATE: u64 = 1 << 1;

pub const EAGAIN: i32 = 11;

/// Every public constant above by name, for the binding layer.
pub const ALL: &[(&str, u64)] = &[
    ("PAGE_SHIFT", PAGE_SHIFT as u64),
    ("PAGE_SIZE", PAGE_SIZE),
    ("INVALID_GPA", INVALID_GPA),
    ("KVM_MEMORY_ATTRIBUTE_PRIVATE", KVM_MEMORY_ATTRIBUTE_PRIVATE),
    ("KVM_MEMORY_EXIT_FLAG_PRIVATE", KVM_MEMORY_EXIT_FLAG_PRIVATE),
    ("KVM_MEM_LOG_DIRTY_PAGES", KVM_MEM_LOG_DIRTY_PAGES as u64),
    ("KVM_MEM_READONLY", KVM_MEM_READONLY as u64),
    ("KVM_MEM_GUEST_MEMFD", KVM_MEM_GUEST_MEMFD as u64),
    (
        "KVM_SET_USER_MEMORY_REGION_V1_FLAGS",
        KVM_SET_USER_MEMORY_REGION_V1_FLAGS as u64,
    ),
    ("KVM_MEM_SLOTS_NUM", KVM_MEM_SLOTS_NUM as u64),
    ("KVM_INTERNAL_MEM_SLOTS", KVM_INTERNAL_MEM_SLOTS as u64),
    ("KVM_USER_MEM_SLOTS", KVM_USER_MEM_SLOTS as u64),
    ("KVM_MEM_MAX_NR_PAGES", KVM_MEM_MAX_NR_PAGES),
    (
        "KVM_MAX_NR_ADDRESS_SPACES",
        KVM_MAX_NR_ADDRESS_SPACES as u64,
    ),
    ("KVM_CAP_USER_MEMORY", KVM_CAP_USER_MEMORY as u64),
    ("KVM_CAP_NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS as u64),
    ("KVM_CAP_READONLY_MEM", KVM_CAP_READONLY_MEM as u64),
    (
        "KVM_CAP_MULTI_ADDRESS_SPACE",
        KVM_CAP_MULTI_ADDRESS_SPACE as u64,
    ),
    (
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as u64,
    ),
    ("KVM_CAP_USER_MEMORY2", KVM_CAP_USER_MEMORY2 as u64),
    (
        "KVM_CAP_MEMORY_FAULT_INFO",
        KVM_CAP_MEMORY_FAULT_INFO as u64,
    ),
    (
        "KVM_CAP_MEMORY_ATTRIBUTES",
        KVM_CAP_MEMORY_ATTRIBUTES as u64,
    ),
    ("KVM_CAP_GUEST_MEMFD", KVM_CAP_GUEST_MEMFD as u64),
    ("KVM_CAP_VM_TYPES", KVM_CAP_VM_TYPES as u64),
    ("KVM_CAP_PRE_FAULT_MEMORY", KVM_CAP_PRE_FAULT_MEMORY as u64),
    (
        "KVM_CAP_X86_APIC_BUS_CYCLES_NS",
        KVM_CAP_X86_APIC_BUS_CYCLES_NS as u64,
    ),
    ("KVM_CAP_X86_GUEST_MODE", KVM_CAP_X86_GUEST_MODE as u64),
    (
        "KVM_CAP_GUEST_MEMFD_FLAGS",
        KVM_CAP_GUEST_MEMFD_FLAGS as u64,
    ),
    ("GUEST_MEMFD_FLAG_MMAP", GUEST_MEMFD_FLAG_MMAP),
    ("GUEST_MEMFD_FLAG_INIT_SHARED", GUEST_MEMFD_FLAG_INIT_SHARED),
    (
        "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE",
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    ),
    ("KVM_DIRTY_LOG_INITIALLY_SET", KVM_DIRTY_LOG_INITIALLY_SET),
    ("KVM_DIRTY_LOG_MANUAL_CAPS", KVM_DIRTY_LOG_MANUAL_CAPS),
    ("KVM_X86_DEFAULT_VM", KVM_X86_DEFAULT_VM),
    ("KVM_X86_SW_PROTECTED_VM", KVM_X86_SW_PROTECTED_VM),
    ("KVM_X86_SEV_VM", KVM_X86_SEV_VM),
    ("KVM_X86_SEV_ES_VM", KVM_X86_SEV_ES_VM),
    ("KVM_X86_SNP_VM", KVM_X86_SNP_VM),
    ("KVM_X86_TDX_VM", KVM_X86_TDX_VM),
    ("FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE),
    ("FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE),
    // guest_memfd in-place conversion
    ("KVM_SET_MEMORY_ATTRIBUTES2", KVM_SET_MEMORY_ATTRIBUTES2),
    ("KVM_MEMORY_ATTRIBUTES2_SIZE", KVM_MEMORY_ATTRIBUTES2_SIZE),
    (
        "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES",
        KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES as u64,
    ),
    (
        "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5",
        KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5 as u64,
    ),
    (
        "KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS",
        KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS as u64,
    ),
    (
        "KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED",
        KVM_SET_MEMORY_ATTRIBUTES2_MODE_UNSPECIFIED,
    ),
    (
        "KVM_SET_MEMORY_ATTRIBUTES2_ZERO",
        KVM_SET_MEMORY_ATTRIBUTES2_ZERO,
    ),
    (
        "KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE",
        KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE,
    ),
    ("KVM_FILTER_SHARED", KVM_FILTER_SHARED),
    ("KVM_FILTER_PRIVATE", KVM_FILTER_PRIVATE),
];
