//! The in-place conversion series against a per-page oracle (a Vec of
//! attributes per file page) and the series' documented errnos.

use super::super::memslots::UserspaceMemoryRegion;
use super::*;

const P: u64 = KVM_MEMORY_ATTRIBUTE_PRIVATE;

fn vm(vm_type: u64, sem: Semantics, kind: StoreKind) -> Kvm {
    let store: SharedStore = Arc::new(RwLock::new(RangeTree::new()));
    // TDX needs an Intel host (the default host is AMD).
    let host = if vm_type == KVM_X86_TDX_VM {
        HostProfile {
            vendor: CpuVendor::Intel,
            vm_types: (1 << KVM_X86_DEFAULT_VM)
                | (1 << KVM_X86_SW_PROTECTED_VM)
                | (1 << KVM_X86_TDX_VM),
            ..HostProfile::default()
        }
    } else {
        HostProfile::default()
    };
    let mut k = Kvm::with_host(host, vm_type, sem, store, false, None, 0).unwrap();
    k.inplace.store_kind = kind;
    k
}

/// A guest_memfd of `npages` (MMAP, and INIT_SHARED if `shared`) bound
/// to slot 0 at gfn `base`.
fn bound(k: &mut Kvm, base: u64, npages: u64, shared: bool) -> u64 {
    let flags = GUEST_MEMFD_FLAG_MMAP
        | if shared {
            GUEST_MEMFD_FLAG_INIT_SHARED
        } else {
            0
        };
    let fd = k.kvm_gmem_create(npages << PAGE_SHIFT, flags).unwrap();
    k.kvm_set_memory_region(
        &UserspaceMemoryRegion {
            slot: 0,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: base << PAGE_SHIFT,
            memory_size: npages << PAGE_SHIFT,
            userspace_addr: 0,
            guest_memfd: fd as u32,
            guest_memfd_offset: 0,
        },
        false,
    )
    .unwrap();
    fd
}

fn attrs2(offset: u64, size: u64, attributes: u64) -> KvmMemoryAttributes2 {
    KvmMemoryAttributes2 {
        offset,
        size,
        attributes,
        ..Default::default()
    }
}

fn set(k: &mut Kvm, fd: u64, page: u64, n: u64, a: u64) -> Result<(), SetAttributes2Error> {
    k.kvm_gmem_set_attributes(fd, &attrs2(page << PAGE_SHIFT, n << PAGE_SHIFT, a))
}

fn errno_of(r: Result<(), SetAttributes2Error>) -> (i32, Option<u64>) {
    let e = r.unwrap_err();
    (e.error.errno(), e.error_offset)
}

const KINDS: [StoreKind; 3] = [
    StoreKind::RangeTree,
    StoreKind::XArray,
    StoreKind::MapleTree,
];

#[test]
fn validation_order_each_einval_without_error_offset() {
    let mut k = vm(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::GmemInplace,
        StoreKind::RangeTree,
    );
    let fd = bound(&mut k, 0, 16, true);
    let mut a = attrs2(PAGE_SIZE, PAGE_SIZE, P);
    // flags first (v8 takes none), even with every later field bad too.
    a.flags = 1;
    a.reserved[3] = 1;
    a.attributes = 1 << 5;
    assert_eq!(errno_of(k.kvm_gmem_set_attributes(fd, &a)), (EINVAL, None));
    a.flags = 0;
    assert_eq!(errno_of(k.kvm_gmem_set_attributes(fd, &a)), (EINVAL, None));
    a.reserved[3] = 0;
    assert!(k
        .kvm_gmem_set_attributes_checks(fd, &a)
        .unwrap_err()
        .to_string()
        .contains("PRIVATE"));
    a.attributes = P;
    for (off, size) in [
        (0, 0),
        (u64::MAX - 4095, 8192),
        (1, 4096),
        (0, 17 * 4096),
        (16 * 4096, 4096),
    ] {
        a.offset = off;
        a.size = size;
        assert_eq!(
            errno_of(k.kvm_gmem_set_attributes(fd, &a)),
            (EINVAL, None),
            "{off:#x}+{size:#x}"
        );
    }
    assert_eq!(k.inplace.counters.set_calls, 0);
    // Not a guest_memfd of this VM.
    assert_eq!(errno_of(set(&mut k, fd + 1000, 0, 1, P)).0, EBADF);
    // A VM without private memory: EINVAL after the field checks.
    let mut d = vm(
        KVM_X86_DEFAULT_VM,
        Semantics::GmemInplace,
        StoreKind::RangeTree,
    );
    let dfd = d
        .kvm_gmem_create(16 << PAGE_SHIFT, GUEST_MEMFD_FLAG_INIT_SHARED)
        .unwrap();
    assert_eq!(errno_of(set(&mut d, dfd, 0, 1, P)), (EINVAL, None));
    // Other semantics: no such ioctl on the file.
    let mut old = vm(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::Linux68,
        StoreKind::RangeTree,
    );
    let ofd = old.kvm_gmem_create(16 << PAGE_SHIFT, 0).unwrap();
    assert_eq!(errno_of(set(&mut old, ofd, 0, 1, P)).0, ENOTTY);
}

#[test]
fn per_vm_attributes_are_off_and_faults_read_the_file() {
    for kind in KINDS {
        let mut k = vm(KVM_X86_SW_PROTECTED_VM, Semantics::GmemInplace, kind);
        assert_eq!(k.check_extension(KVM_CAP_MEMORY_ATTRIBUTES as i64), 0);
        assert_eq!(
            k.check_extension(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES as i64),
            P
        );
        assert_eq!(
            k.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS as i64),
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        );
        assert_eq!(
            k.set_memory_attributes(0, PAGE_SIZE, P, 0)
                .unwrap_err()
                .errno(),
            EINVAL
        );
        let fd = bound(&mut k, 0x100, 64, false);
        // Private from creation (no INIT_SHARED): a shared access exits.
        assert!(matches!(
            k.fault(0x100 << PAGE_SHIFT, false, 0),
            Err(KvmError::MemoryFault { .. })
        ));
        assert_eq!(k.fault(0x100 << PAGE_SHIFT, true, 0).unwrap(), 1);
        set(&mut k, fd, 0, 8, 0).unwrap();
        // The private mapping went with the conversion.
        assert_eq!(k.mapped(), [0, 0, 0]);
        assert_eq!(k.fault(0x100 << PAGE_SHIFT, false, 0).unwrap(), 1);
        assert!(matches!(
            k.fault(0x101 << PAGE_SHIFT, true, 0),
            Err(KvmError::MemoryFault { flags: P, .. })
        ));
        assert_eq!(k.fault(0x108 << PAGE_SHIFT, true, 0).unwrap(), 1);
        // The VM's own store saw nothing.
        assert_eq!(k.shared_store().read().unwrap().entry_count(), 0);
    }
}

#[test]
fn eagain_reports_the_first_pinned_page_and_changes_nothing() {
    for kind in KINDS {
        let mut k = vm(KVM_X86_SW_PROTECTED_VM, Semantics::GmemInplace, kind);
        let fd = bound(&mut k, 0, 64, true);
        k.guest_memfd_pin(fd, 9 << PAGE_SHIFT, 2).unwrap();
        k.guest_memfd_pin(fd, 30 << PAGE_SHIFT, 1).unwrap();
        let before = k.gmem_attribute_runs(fd).unwrap();
        assert_eq!(
            errno_of(set(&mut k, fd, 4, 40, P)),
            (EAGAIN, Some(9 << PAGE_SHIFT))
        );
        assert_eq!(k.gmem_attribute_runs(fd).unwrap(), before);
        // A range starting inside the pinned run reports its own start.
        assert_eq!(
            errno_of(set(&mut k, fd, 10, 4, P)),
            (EAGAIN, Some(10 << PAGE_SHIFT))
        );
        // To shared never checks.
        set(&mut k, fd, 0, 64, 0).unwrap();
        k.guest_memfd_unpin(fd, 9 << PAGE_SHIFT, 2).unwrap();
        assert_eq!(
            errno_of(set(&mut k, fd, 4, 40, P)),
            (EAGAIN, Some(30 << PAGE_SHIFT))
        );
        // A hole drops the folio: its pin no longer blocks.
        k.kvm_gmem_fallocate(
            fd,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            30 << 12,
            4096,
        )
        .unwrap();
        set(&mut k, fd, 4, 40, P).unwrap();
        k.guest_memfd_unpin(fd, 30 << PAGE_SHIFT, 1).unwrap();
        assert_eq!(k.inplace.counters.eagain, 3);
        // Pinning a private page fails in GUP.
        assert_eq!(
            k.guest_memfd_pin(fd, 5 << PAGE_SHIFT, 1)
                .unwrap_err()
                .errno(),
            EFAULT
        );
    }
}

#[test]
fn enomem_changes_nothing_and_reports_the_start() {
    for kind in KINDS {
        let mut k = vm(KVM_X86_SW_PROTECTED_VM, Semantics::GmemInplace, kind);
        let fd = bound(&mut k, 0, 4096, true);
        k.config.attr_memory_limit = Some(0);
        assert_eq!(
            errno_of(set(&mut k, fd, 7, 3, P)),
            (ENOMEM, Some(7 << PAGE_SHIFT))
        );
        assert_eq!(k.gmem_attribute_runs(fd).unwrap(), vec![(0, 4096, 0)]);
        // The early return needs no memory.
        k.config.attr_memory_limit = Some(0);
        set(&mut k, fd, 7, 3, 0).unwrap();
        assert_eq!(k.inplace.counters.noop_conversions, 1);
    }
}

#[test]
fn random_conversions_match_a_per_page_oracle() {
    for kind in KINDS {
        let mut k = vm(KVM_X86_SW_PROTECTED_VM, Semantics::GmemInplace, kind);
        let n = 300u64;
        let fd = bound(&mut k, 0x1000, n, false);
        let mut oracle = vec![P; n as usize];
        let mut seed = 0x1234_5678u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let s = next() % n;
            let len = 1 + next() % (n - s).min(40);
            let a = if next() % 2 == 0 { P } else { 0 };
            let noop = oracle[s as usize..(s + len) as usize]
                .iter()
                .all(|&v| v == a);
            let before = k.inplace.counters;
            set(&mut k, fd, s, len, a).unwrap();
            oracle[s as usize..(s + len) as usize].fill(a);
            let c = k.inplace.counters;
            assert_eq!(c.noop_conversions - before.noop_conversions, noop as u64);
            assert_eq!(c.invalidations - before.invalidations, !noop as u64);
            // A fault of the wrong kind exits, the right one maps.
            let g = next() % n;
            let private = oracle[g as usize] == P;
            assert_eq!(k.fault((0x1000 + g) << PAGE_SHIFT, private, 0).unwrap(), 1);
            assert!(k.fault((0x1000 + g) << PAGE_SHIFT, !private, 0).is_err());
        }
        for p in 0..n {
            assert_eq!(
                k.kvm_gmem_get_attributes(fd, p).unwrap(),
                oracle[p as usize]
            );
        }
    }
}

#[test]
fn conversions_zap_through_the_bindings_with_the_filter() {
    let mut k = vm(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::GmemInplace,
        StoreKind::MapleTree,
    );
    let fd = bound(&mut k, 0x200, 32, true);
    for g in 0..8 {
        k.fault((0x200 + g) << PAGE_SHIFT, false, 0).unwrap();
    }
    let before = k.counters;
    set(&mut k, fd, 2, 4, P).unwrap();
    // Only the converted gfns' mappings went; one flush.
    assert_eq!(k.counters.zapped_pages[0] - before.zapped_pages[0], 4);
    assert_eq!(k.counters.tlb_flushes - before.tlb_flushes, 1);
    assert_eq!(
        (
            k.inplace.counters.filter_shared,
            k.inplace.counters.filter_private
        ),
        (1, 0)
    );
    // A range holding both kinds zaps both.
    set(&mut k, fd, 0, 8, 0).unwrap();
    assert_eq!(
        (
            k.inplace.counters.filter_shared,
            k.inplace.counters.filter_private
        ),
        (2, 1)
    );
    // Truncation keeps shared/private.
    set(&mut k, fd, 4, 4, P).unwrap();
    k.kvm_gmem_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 32 << 12)
        .unwrap();
    assert_eq!(
        k.gmem_attribute_runs(fd).unwrap(),
        vec![(0, 4, 0), (4, 8, P), (8, 32, 0)]
    );
}

#[test]
fn host_access_to_private_pages_is_sigbus() {
    let mut k = vm(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::GmemInplace,
        StoreKind::RangeTree,
    );
    let fd = bound(&mut k, 0, 4, true);
    k.kvm_gmem_user_write(fd, 100, b"hello").unwrap();
    set(&mut k, fd, 0, 1, P).unwrap();
    assert_eq!(k.inplace.counters.user_unmapped_pages, 1);
    let sigbus = |offset, private| KvmError::Sigbus {
        fd,
        offset,
        private,
    };
    assert_eq!(k.kvm_gmem_user_read(fd, 0, 8), Err(sigbus(0, true)));
    assert_eq!(
        k.kvm_gmem_user_write(fd, 4000, &[1; 200]),
        Err(sigbus(4000, true))
    );
    assert_eq!(
        k.kvm_gmem_user_read(fd, 4 << PAGE_SHIFT, 1),
        Err(sigbus(4 << PAGE_SHIFT, false))
    );
    assert_eq!(k.inplace.counters.sigbus, 3);
    set(&mut k, fd, 0, 1, 0).unwrap();
    // v8 promises nothing about contents; the model keeps them.
    assert_eq!(k.kvm_gmem_user_read(fd, 100, 5).unwrap(), b"hello");
    // A write that reaches a private page stores the pages before it
    // (page by page, as a memcpy through the mapping) and nothing after.
    set(&mut k, fd, 2, 1, P).unwrap();
    let data = vec![9u8; 3 * PAGE_SIZE as usize];
    assert_eq!(
        k.kvm_gmem_user_write(fd, PAGE_SIZE + 8, &data),
        Err(sigbus(2 * PAGE_SIZE, true))
    );
    assert_eq!(k.kvm_gmem_user_read(fd, PAGE_SIZE + 7, 2).unwrap(), [0, 9]);
    assert_eq!(k.kvm_gmem_user_read(fd, 2 * PAGE_SIZE - 1, 1).unwrap(), [9]);
    assert_eq!(k.kvm_gmem_user_read(fd, 3 * PAGE_SIZE, 1).unwrap(), [0]);
    // Without GUEST_MEMFD_FLAG_MMAP there is no mapping at all.
    let nommap = k.kvm_gmem_create(4 << PAGE_SHIFT, 0).unwrap();
    assert_eq!(
        k.kvm_gmem_user_read(nommap, 0, 1).unwrap_err().errno(),
        ENODEV
    );
}

#[test]
fn v5_content_modes_follow_the_vm_type() {
    let z = KVM_SET_MEMORY_ATTRIBUTES2_ZERO;
    let pr = KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE;
    let with = |k: &mut Kvm, fd: u64, page: u64, a: u64, flags: u64| {
        let mut x = attrs2(page << PAGE_SHIFT, PAGE_SIZE, a);
        x.flags = flags;
        k.kvm_gmem_set_attributes(fd, &x)
    };
    // SW_PROTECTED: ZERO (not to private) and PRESERVE; UNSPECIFIED scrambles.
    let mut k = vm(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::GmemInplaceV5,
        StoreKind::RangeTree,
    );
    assert_eq!(
        k.check_extension(KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS as i64),
        z | pr
    );
    assert_eq!(
        k.check_extension(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5 as i64),
        P
    );
    let fd = bound(&mut k, 0, 4, true);
    assert_eq!(errno_of(with(&mut k, fd, 0, 0, z | pr)), (EINVAL, None));
    assert_eq!(errno_of(with(&mut k, fd, 0, 0, 4)), (EINVAL, None));
    assert_eq!(errno_of(with(&mut k, fd, 0, P, z)), (EOPNOTSUPP, Some(0)));
    k.kvm_gmem_user_write(fd, 0, b"beef").unwrap();
    with(&mut k, fd, 0, P, pr).unwrap();
    with(&mut k, fd, 0, 0, pr).unwrap();
    assert_eq!(k.kvm_gmem_user_read(fd, 0, 4).unwrap(), b"beef");
    with(&mut k, fd, 0, P, 0).unwrap();
    with(&mut k, fd, 0, 0, 0).unwrap();
    assert_ne!(k.kvm_gmem_user_read(fd, 0, 4).unwrap(), b"beef");
    with(&mut k, fd, 0, P, pr).unwrap();
    with(&mut k, fd, 0, 0, z).unwrap();
    assert_eq!(k.kvm_gmem_user_read(fd, 0, 4).unwrap(), [0; 4]);
    // The mode applies even when nothing converts.
    k.kvm_gmem_user_write(fd, 0, b"beef").unwrap();
    with(&mut k, fd, 0, 0, z).unwrap();
    assert_eq!(k.kvm_gmem_user_read(fd, 0, 4).unwrap(), [0; 4]);
    // SNP and TDX: PRESERVE only to private and only before finalize.
    for t in [KVM_X86_SNP_VM, KVM_X86_TDX_VM] {
        let mut k = vm(t, Semantics::GmemInplaceV5, StoreKind::XArray);
        assert_eq!(
            k.check_extension(KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS as i64),
            z | pr
        );
        let fd = bound(&mut k, 0, 4, true);
        with(&mut k, fd, 0, P, pr).unwrap();
        assert_eq!(errno_of(with(&mut k, fd, 0, 0, pr)), (EOPNOTSUPP, Some(0)));
        with(&mut k, fd, 0, 0, z).unwrap();
        k.kvm_finalize_vm();
        assert_eq!(
            errno_of(with(&mut k, fd, 1, P, pr)),
            (EOPNOTSUPP, Some(PAGE_SIZE))
        );
        with(&mut k, fd, 1, P, 0).unwrap();
    }
    // Other types: no modes at all.
    let d = vm(
        KVM_X86_DEFAULT_VM,
        Semantics::GmemInplaceV5,
        StoreKind::RangeTree,
    );
    assert_eq!(
        d.check_extension(KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS as i64),
        0
    );
    // v8 has no flags: the same call is EINVAL.
    let mut v8 = vm(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::GmemInplace,
        StoreKind::RangeTree,
    );
    let fd8 = bound(&mut v8, 0, 4, true);
    assert_eq!(errno_of(with(&mut v8, fd8, 0, 0, z)), (EINVAL, None));
    assert_eq!(
        v8.check_extension(KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS as i64),
        P
    );
}

/// A mapping keeps the file and its attributes after close(2); the ioctl
/// and pins go through the fd (EBADF), an unpin reaches the pages, the
/// mapping still faults by the per-file attribute, and the attributes go
/// with the file at the last munmap.
#[test]
fn a_mapping_keeps_the_files_attributes_after_close() {
    let mut k = vm(
        KVM_X86_SW_PROTECTED_VM,
        Semantics::GmemInplace,
        StoreKind::RangeTree,
    );
    let fd = bound(&mut k, 0, 8, true);
    set(&mut k, fd, 2, 1, P).unwrap();
    k.guest_memfd_pin(fd, 0, 1).unwrap();
    let vma = k.mmap_new_file_vma(fd, true).unwrap();
    k.kvm_gmem_release(fd).unwrap();
    assert_eq!(errno_of(set(&mut k, fd, 0, 1, P)), (EBADF, None));
    assert_eq!(k.guest_memfd_pin(fd, 0, 1).unwrap_err().errno(), EBADF);
    k.guest_memfd_unpin(fd, 0, 1).unwrap();
    assert_eq!(k.kvm_gmem_vma_read(vma, 4096, 2).unwrap(), [0, 0]);
    assert!(matches!(
        k.kvm_gmem_vma_read(vma, 2 << PAGE_SHIFT, 1),
        Err(KvmError::Sigbus { private: true, .. })
    ));
    assert_eq!(k.inplace.counters.invalidations, 1); // the conversion only
    k.kvm_gmem_munmap(vma).unwrap();
    assert_eq!(k.counters.gmem_closed, 1);
    assert_eq!(k.inplace.counters.invalidations, 2); // the release's
    assert!(k.inplace.files.is_empty());
}
