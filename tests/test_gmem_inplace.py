"""The guest_memfd in-place conversion series (semantics "gmem-inplace", v8,
and "gmem-inplace-v5") against an independent per-page numpy oracle and the
series' documented rules; and the series' selftests re-created
(guest_memfd_conversions_test, private_mem_conversions_test with an mmapped
guest_memfd, private_mem_kvm_exits_test with per-file attributes)."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import memattr as m
from memattr.gmem_inplace import retry_set_memory_attributes

P = m.KVM_MEMORY_ATTRIBUTE_PRIVATE
PG = m.PAGE_SIZE
MMAP = m.GUEST_MEMFD_FLAG_MMAP
SHARED = m.GUEST_MEMFD_FLAG_INIT_SHARED
ZERO = m.KVM_SET_MEMORY_ATTRIBUTES2_ZERO
PRESERVE = m.KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
STORES = ["rangetree", "xarray", "mapletree"]
BASE_GFN = 0x100


def make(vm_type: int = m.KVM_X86_SW_PROTECTED_VM, store: str = "rangetree",
         semantics: str = "gmem-inplace", npages: int = 64, flags: int = MMAP | SHARED,
         **kw: object) -> tuple[m.Vm, int]:
    if vm_type == m.KVM_X86_TDX_VM and "host" not in kw:
        kw["host"] = m.HostProfile.named("intel-tdx")  # the default host is AMD
    vm = m.Vm(vm_type, store, semantics=semantics, **kw)  # type: ignore[arg-type]
    fd = vm.create_guest_memfd(npages * PG, flags)
    if vm.has_private_mem:
        vm.set_user_memory_region(0, BASE_GFN * PG, npages * PG, flags=m.KVM_MEM_GUEST_MEMFD,
                                  guest_memfd=fd)
    return vm, fd


def set2(vm: m.Vm, fd: int, page: int, n: int, attrs: int, flags: int = 0) -> None:
    vm.guest_memfd_set_memory_attributes(fd, page * PG, n * PG, attrs, flags)


def err(fn: object, *args: object) -> tuple[int, int | None]:
    with pytest.raises(OSError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.errno, getattr(e.value, "error_offset", None)


# --- an independent per-page oracle, driven at random ---------------------------


class InplaceVsOracle(RuleBasedStateMachine):
    """Random conversions, pins, holes, faults and host accesses on one
    guest_memfd, checked page by page against numpy arrays."""

    N = 96

    def __init__(self) -> None:
        super().__init__()
        self.vms = [make(store=s, npages=self.N, flags=MMAP) for s in STORES]
        self.attrs = np.full(self.N, P, dtype=np.uint64)  # private at creation
        self.pins = np.zeros(self.N, dtype=np.int64)
        self.orphans = np.zeros(self.N, dtype=np.int64)

    @rule(a=st.integers(0, N - 1), n=st.integers(1, 24), private=st.booleans())
    def convert(self, a: int, n: int, private: bool) -> None:
        b = min(a + n, self.N)
        want = P if private else 0
        pinned = np.flatnonzero(self.pins[a:b])
        if private and len(pinned):
            expect: tuple[int, int | None] | None = (errno.EAGAIN, int(a + pinned[0]) * PG)
        else:
            expect = None
        noop = bool((self.attrs[a:b] == want).all())
        for vm, fd in self.vms:
            before = vm.inplace_stats
            mapped = self.mapped(vm)
            if expect:
                assert err(set2, vm, fd, a, b - a, want) == expect
                assert self.mapped(vm) == mapped
            else:
                set2(vm, fd, a, b - a, want)
                after = vm.inplace_stats
                assert after["noop_conversions"] - before["noop_conversions"] == noop
                assert after["invalidations"] - before["invalidations"] == (not noop)
                # Exactly the converted range's mappings go (none on an
                # early return).
                gone = set() if noop else set(range(a, b))
                assert self.mapped(vm) == mapped - gone
        if not expect:
            self.attrs[a:b] = want

    @staticmethod
    def mapped(vm: m.Vm) -> set[int]:
        """File pages mapped in the guest (4K leaves)."""
        return {g - BASE_GFN for s, e in vm.mmu.mappings(1) for g in range(s, e)}

    @rule(a=st.integers(0, N - 1), n=st.integers(1, 4))
    def pin(self, a: int, n: int) -> None:
        b = min(a + n, self.N)
        for vm, fd in self.vms:
            if (self.attrs[a:b] == P).any():
                assert err(vm.guest_memfd_pin, fd, a * PG, b - a)[0] == errno.EFAULT
            else:
                vm.guest_memfd_pin(fd, a * PG, b - a)
        if not (self.attrs[a:b] == P).any():
            self.pins[a:b] += 1

    @rule(a=st.integers(0, N - 1))
    def unpin(self, a: int) -> None:
        for vm, fd in self.vms:
            if self.pins[a] or self.orphans[a]:
                vm.guest_memfd_unpin(fd, a * PG)
            else:
                with pytest.raises(ValueError):
                    vm.guest_memfd_unpin(fd, a * PG)
        if self.pins[a]:
            self.pins[a] -= 1
        elif self.orphans[a]:
            self.orphans[a] -= 1

    @rule(a=st.integers(0, N - 1), n=st.integers(1, 16))
    def punch_hole(self, a: int, n: int) -> None:
        b = min(a + n, self.N)
        for vm, fd in self.vms:
            vm.guest_memfd_fallocate(fd, m.FALLOC_FL_PUNCH_HOLE | m.FALLOC_FL_KEEP_SIZE,
                                     a * PG, (b - a) * PG)
        # The pins stay on the truncated folios, out of the page cache.
        self.orphans[a:b] += self.pins[a:b]
        self.pins[a:b] = 0

    @rule(g=st.integers(0, N - 1), private=st.booleans())
    def fault(self, g: int, private: bool) -> None:
        is_private = self.attrs[g] == P
        for vm, _ in self.vms:
            gpa = (BASE_GFN + g) * PG
            if private == is_private:
                assert vm.fault(gpa, private=private) == 1
            else:
                with pytest.raises(m.MemoryFault) as e:
                    vm.fault(gpa, private=private)
                assert (e.value.gpa, e.value.size) == (gpa, PG)
                assert e.value.flags == (m.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)

    @rule(g=st.integers(0, N - 1))
    def host_read(self, g: int) -> None:
        for vm, fd in self.vms:
            if self.attrs[g] == P:
                with pytest.raises(m.GuestMemfdSigbus) as e:
                    vm.guest_memfd_read(fd, g * PG + 7, 1)
                assert (e.value.offset, e.value.private) == (g * PG + 7, True)
            else:
                assert vm.guest_memfd_read(fd, g * PG, 2) == b"\0\0"

    @invariant()
    def attributes_match(self) -> None:
        for vm, fd in self.vms:
            got = np.zeros(self.N, dtype=np.uint64)
            for s, e, v in vm.guest_memfd_attributes(fd):
                got[s:e] = v
            assert (got == self.attrs).all()
            assert vm.guest_memfd_pinned(fd) == [(int(p), int(self.pins[p]))
                                                 for p in np.flatnonzero(self.pins)]
            # Per-VM attributes stay off: the VM's own store never changes.
            assert vm.store.entry_count() == 0


TestInplaceVsOracle = InplaceVsOracle.TestCase
TestInplaceVsOracle.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# --- KVM_SET_MEMORY_ATTRIBUTES2: checks, errnos, error_offset ---------------------


@pytest.mark.parametrize("store", STORES)
def test_validation_order_is_the_series(store: str) -> None:
    vm, fd = make(store=store, npages=16)
    # Every later field bad too: the first check decides (all EINVAL, and
    # none writes error_offset).
    cases = [
        dict(flags=1, reserved=(1,) + (0,) * 10, attributes=1 << 5),
        dict(reserved=(0,) * 10 + (1,), attributes=1 << 5, size=0),
        dict(attributes=1 << 5, size=0),
        dict(size=0),
        dict(offset=(1 << 64) - PG, size=2 * PG),
        dict(offset=1),
        dict(size=PG + 1),
        dict(offset=16 * PG),
        dict(size=17 * PG),
    ]
    for c in cases:
        args = dict(offset=0, size=PG, attributes=P, flags=0, reserved=(0,) * 11)
        args.update(c)  # type: ignore[arg-type]
        with pytest.raises(OSError) as e:
            vm.guest_memfd_set_memory_attributes(fd, **args)  # type: ignore[arg-type]
        assert e.value.errno == errno.EINVAL, c
        assert not hasattr(e.value, "error_offset"), c
    assert vm.inplace_stats["set_calls"] == 0
    assert vm.guest_memfd_attributes(fd) == [(0, 16, 0)]


def test_no_private_memory_no_attributes() -> None:
    vm = m.Vm(m.KVM_X86_DEFAULT_VM, semantics="gmem-inplace")
    fd = vm.create_guest_memfd(4 * PG, MMAP | SHARED)
    assert err(set2, vm, fd, 0, 1, P) == (errno.EINVAL, None)
    assert vm.check_extension(m.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == 0
    # And under 6.8 the file has no such ioctl at all.
    old = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="6.8")
    ofd = old.create_guest_memfd(4 * PG)
    assert err(set2, old, ofd, 0, 1, P)[0] == errno.ENOTTY
    with pytest.raises(OSError) as e:
        old.create_guest_memfd(4 * PG, MMAP)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("store", STORES)
def test_eagain_reports_the_first_busy_page_and_a_vmm_retry_loop_succeeds(store: str) -> None:
    vm, fd = make(store=store, npages=32)
    vm.guest_memfd_pin(fd, 12 * PG, 2)
    vm.guest_memfd_pin(fd, 20 * PG)
    assert err(set2, vm, fd, 4, 20, P) == (errno.EAGAIN, 12 * PG)
    assert err(set2, vm, fd, 13, 10, P) == (errno.EAGAIN, 13 * PG)
    assert vm.guest_memfd_attributes(fd) == [(0, 32, 0)]
    busy: list[int] = []

    def drop(off: int) -> None:
        busy.append(off)
        vm.guest_memfd_unpin(fd, off)

    assert retry_set_memory_attributes(vm, fd, 4 * PG, 20 * PG, P, on_busy=drop) == 4
    assert busy == [12 * PG, 13 * PG, 20 * PG]
    assert vm.guest_memfd_attributes(fd) == [(0, 4, 0), (4, 24, P), (24, 32, 0)]
    # To shared never checks references.
    vm.guest_memfd_pin(fd, 30 * PG)
    set2(vm, fd, 0, 32, 0)


@pytest.mark.parametrize("store", STORES)
def test_enomem_changes_nothing_and_writes_the_start(store: str) -> None:
    vm, fd = make(store=store, npages=4096, attr_memory_limit=0)
    assert err(set2, vm, fd, 100, 3, P) == (errno.ENOMEM, 100 * PG)
    assert vm.guest_memfd_attributes(fd) == [(0, 4096, 0)]
    set2(vm, fd, 100, 3, 0)  # the early return needs no memory
    assert vm.inplace_stats["noop_conversions"] == 1


def test_ioctl_front_end() -> None:
    vm, fd = make(npages=16)
    req = m.KVM_SET_MEMORY_ATTRIBUTES2
    assert ctypes.sizeof(m.kvm_memory_attributes2) == 128 == m.KVM_MEMORY_ATTRIBUTES2_SIZE
    assert req == 0xC080AED2
    # Short buffer: copy_from_user fails.
    for n in (0, 32, 127):
        with pytest.raises(OSError) as e:
            vm.guest_memfd_ioctl(fd, req, bytearray(n))
        assert e.value.errno == errno.EFAULT
    with pytest.raises(OSError) as e:
        vm.guest_memfd_ioctl(fd, req, 0x1000)
    assert e.value.errno == errno.EFAULT
    with pytest.raises(OSError) as e:
        vm.guest_memfd_ioctl(fd, m.KVM_SET_MEMORY_ATTRIBUTES, bytearray(128))
    assert e.value.errno == errno.ENOTTY
    # error_offset written back into the caller's struct on EAGAIN.
    vm.guest_memfd_pin(fd, 5 * PG)
    a = m.kvm_memory_attributes2(offset=2 * PG, size=8 * PG, attributes=P)
    with pytest.raises(OSError) as e:
        vm.guest_memfd_ioctl(fd, req, a)
    assert (e.value.errno, a.error_offset) == (errno.EAGAIN, 5 * PG)
    buf = bytearray(bytes(m.kvm_memory_attributes2(offset=2 * PG, size=8 * PG, attributes=P)))
    buf += b"\xff" * 8  # a longer buffer: only the struct is used
    with pytest.raises(OSError):
        vm.guest_memfd_ioctl(fd, req, buf)
    assert m.kvm_memory_attributes2.from_buffer_copy(buf).error_offset == 5 * PG
    vm.guest_memfd_unpin(fd, 5 * PG)
    # A read-only buffer: fcntl's copy comes back, untouched on success.
    out = vm.guest_memfd_ioctl(fd, req, bytes(a))
    assert isinstance(out, bytes) and len(out) == 128
    assert vm.guest_memfd_attributes(fd) == [(0, 2, 0), (2, 10, P), (10, 16, 0)]
    # The same through vm.ioctl(fd, request, buffer).
    b = m.kvm_memory_attributes2(offset=10 * PG, size=PG, attributes=P)
    assert vm.ioctl(fd, req, b) == 0
    assert vm.guest_memfd_get_attributes(fd, 10 * PG) == P
    # Reserved words must be zero.
    r = m.kvm_memory_attributes2(offset=0, size=PG)
    r.reserved[10] = 1
    with pytest.raises(OSError) as e:
        vm.guest_memfd_ioctl(fd, req, r)
    assert e.value.errno == errno.EINVAL


# --- capabilities, per-VM attributes off, INIT_SHARED -----------------------------


@pytest.mark.parametrize("vm_type", [m.KVM_X86_DEFAULT_VM, m.KVM_X86_SW_PROTECTED_VM,
                                     m.KVM_X86_SNP_VM, m.KVM_X86_TDX_VM])
def test_capabilities(vm_type: int) -> None:
    private = vm_type != m.KVM_X86_DEFAULT_VM
    host = m.HostProfile.named("intel-tdx") if vm_type == m.KVM_X86_TDX_VM else None
    v8 = m.Vm(vm_type, semantics="gmem-inplace", host=host)
    assert v8.check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert v8.check_extension(m.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES) == (P if private else 0)
    assert v8.check_extension(m.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | SHARED
    v5 = m.Vm(vm_type, semantics="gmem-inplace-v5", host=host)
    assert v5.check_extension(m.KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES_V5) == (P if private else 0)
    want = {m.KVM_X86_SW_PROTECTED_VM: ZERO | PRESERVE, m.KVM_X86_SNP_VM: ZERO | PRESERVE,
            m.KVM_X86_TDX_VM: ZERO | PRESERVE}.get(vm_type, 0)
    assert v5.check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES2_FLAGS) == want
    # 6.8 knows none of them (and only VM types 0 and 1); 6.18 reports
    # per-VM attributes where the series turns them off.
    if vm_type in (m.KVM_X86_DEFAULT_VM, m.KVM_X86_SW_PROTECTED_VM):
        assert m.Vm(vm_type, semantics="6.8").check_extension(m.KVM_CAP_GUEST_MEMFD_FLAGS) == 0
    old = m.Vm(vm_type, semantics="6.18", host=host)
    if private:
        assert old.check_extension(m.KVM_CAP_MEMORY_ATTRIBUTES) == P
        # Per-VM PRIVATE is refused under the series.
        with pytest.raises(OSError) as e:
            v8.set_memory_attributes(0, PG, P)
        assert e.value.errno == errno.EINVAL


def test_init_shared_and_truncation_keeps_status() -> None:
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="gmem-inplace")
    priv = vm.create_guest_memfd(8 * PG, MMAP)
    shared = vm.create_guest_memfd(8 * PG, MMAP | SHARED)
    assert vm.guest_memfd_attributes(priv) == [(0, 8, P)]
    assert vm.guest_memfd_attributes(shared) == [(0, 8, 0)]
    set2(vm, shared, 2, 2, P)
    vm.guest_memfd_write(shared, 0, b"x" * 2 * PG)
    assert vm.guest_memfd_allocated(shared) == [(0, 2)]
    vm.guest_memfd_fallocate(shared, m.FALLOC_FL_PUNCH_HOLE | m.FALLOC_FL_KEEP_SIZE, 0, 8 * PG)
    assert vm.guest_memfd_attributes(shared) == [(0, 2, 0), (2, 4, P), (4, 8, 0)]
    assert vm.guest_memfd_allocated(shared) == []
    assert vm.guest_memfd_read(shared, 0, 2) == b"\0\0"


# --- v5 content modes, per VM type --------------------------------------------------

# (vm_type, finalized, to_private) -> the modes the series accepts (besides
# UNSPECIFIED, always accepted). From v5's x86 patches and api.rst: ZERO
# never to private; SW_PROTECTED takes ZERO and PRESERVE; SNP and TDX take
# ZERO, and PRESERVE only to private before the VM is finalized.
MODES = {
    (m.KVM_X86_SW_PROTECTED_VM, False, True): {PRESERVE},
    (m.KVM_X86_SW_PROTECTED_VM, False, False): {ZERO, PRESERVE},
    (m.KVM_X86_SW_PROTECTED_VM, True, True): {PRESERVE},
    (m.KVM_X86_SW_PROTECTED_VM, True, False): {ZERO, PRESERVE},
    (m.KVM_X86_SNP_VM, False, True): {PRESERVE},
    (m.KVM_X86_SNP_VM, False, False): {ZERO},
    (m.KVM_X86_SNP_VM, True, True): set(),
    (m.KVM_X86_SNP_VM, True, False): {ZERO},
    (m.KVM_X86_TDX_VM, False, True): {PRESERVE},
    (m.KVM_X86_TDX_VM, False, False): {ZERO},
    (m.KVM_X86_TDX_VM, True, True): set(),
    (m.KVM_X86_TDX_VM, True, False): {ZERO},
}


@pytest.mark.parametrize("key", sorted(MODES))
def test_v5_content_mode_rules(key: tuple[int, bool, bool]) -> None:
    vm_type, finalized, to_private = key
    vm, fd = make(vm_type, semantics="gmem-inplace-v5", npages=4)
    # Start from the other state so the call converts.
    set2(vm, fd, 0, 4, 0 if to_private else P)
    if finalized:
        vm.finalize_vm()
    for mode in (0, ZERO, PRESERVE):
        attrs = P if to_private else 0
        if mode == 0 or mode in MODES[key]:
            set2(vm, fd, 1, 1, attrs, mode)
            set2(vm, fd, 1, 1, 0 if to_private else P)
        else:
            # Before the early return: even an already-set range refuses it.
            assert err(set2, vm, fd, 1, 1, attrs, mode) == (errno.EOPNOTSUPP, PG)
            assert vm.guest_memfd_get_attributes(fd, PG) == (0 if to_private else P)
            # Checked before the early return: a page already there refuses
            # the mode too.
            set2(vm, fd, 2, 1, attrs)
            assert err(set2, vm, fd, 2, 1, attrs, mode) == (errno.EOPNOTSUPP, 2 * PG)
            set2(vm, fd, 2, 1, 0 if to_private else P)
    assert err(set2, vm, fd, 0, 1, 0, ZERO | PRESERVE) == (errno.EINVAL, None)
    assert err(set2, vm, fd, 0, 1, 0, 4) == (errno.EINVAL, None)


def test_v5_contents_zero_preserve_and_scramble() -> None:
    vm, fd = make(semantics="gmem-inplace-v5", npages=4)
    vm.guest_memfd_write(fd, 0, b"beef")
    set2(vm, fd, 0, 1, P, PRESERVE)
    set2(vm, fd, 0, 1, 0, PRESERVE)
    assert vm.guest_memfd_read(fd, 0, 4) == b"beef"
    set2(vm, fd, 0, 1, P)
    set2(vm, fd, 0, 1, 0)  # UNSPECIFIED on SW_PROTECTED scrambles
    assert vm.guest_memfd_read(fd, 0, 4) != b"beef"
    set2(vm, fd, 0, 1, P, PRESERVE)
    set2(vm, fd, 0, 1, 0, ZERO)
    assert vm.guest_memfd_read(fd, 0, 4) == b"\0" * 4
    # Applied over the whole range, even where nothing converts, and only
    # where memory is allocated.
    vm.guest_memfd_write(fd, PG, b"cafe")
    set2(vm, fd, 0, 4, 0, ZERO)
    assert vm.guest_memfd_read(fd, PG, 4) == b"\0" * 4
    assert vm.inplace_stats["zeroed_pages"] >= 2
    # v8 takes no flags.
    v8, fd8 = make(npages=4)
    assert err(set2, v8, fd8, 0, 1, 0, ZERO) == (errno.EINVAL, None)


# --- the series' selftests, re-created --------------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_guest_memfd_conversions(store: str) -> None:
    """guest_memfd_conversions_test: init_private, init_shared, precision,
    before allocation, allocated folios in different layouts, truncation,
    elevated refcount."""
    # init_private: host access to a private page is SIGBUS; after
    # conversion to shared the host reads and writes it.
    vm, fd = make(store=store, npages=4, flags=MMAP)
    with pytest.raises(m.GuestMemfdSigbus):
        vm.guest_memfd_read(fd, 0, 1)
    set2(vm, fd, 0, 1, 0)
    vm.guest_memfd_write(fd, 0, b"B")
    assert vm.guest_memfd_read(fd, 0, 1) == b"B"
    set2(vm, fd, 0, 1, P)
    with pytest.raises(m.GuestMemfdSigbus):
        vm.guest_memfd_write(fd, 0, b"C")
    # precision: converting one page of many leaves the others alone.
    n = 16
    vm, fd = make(store=store, npages=n)
    for i in range(n):
        set2(vm, fd, i, 1, P)
        for j in range(n):
            if j == i:
                with pytest.raises(m.GuestMemfdSigbus):
                    vm.guest_memfd_read(fd, j * PG, 1)
            else:
                vm.guest_memfd_read(fd, j * PG, 1)
        set2(vm, fd, i, 1, 0)
    # before allocation: conversions need no memory allocated.
    vm, fd = make(store=store, npages=8)
    set2(vm, fd, 0, 8, P)
    assert vm.guest_memfd_allocated(fd) == []
    set2(vm, fd, 0, 8, 0)
    # folios in different layouts: allocated every other page.
    for i in range(0, 8, 2):
        vm.guest_memfd_write(fd, i * PG, b"x")
    set2(vm, fd, 0, 8, P)
    set2(vm, fd, 0, 8, 0)
    assert vm.guest_memfd_read(fd, 0, 1) == b"x"  # v8: nothing promised; kept here
    # elevated refcount, one page at a time over 4 pages.
    vm, fd = make(store=store, npages=4)
    for i in range(4):
        vm.guest_memfd_pin(fd, i * PG)
        assert err(set2, vm, fd, 0, 4, P) == (errno.EAGAIN, i * PG)
        vm.guest_memfd_unpin(fd, i * PG)
    set2(vm, fd, 0, 4, P)


def test_private_mem_conversions_with_mmapped_guest_memfd() -> None:
    """private_mem_conversions_test with an mmapped guest_memfd: the guest
    converts chunks back and forth (KVM_HC_MAP_GPA_RANGE, handled by the VMM
    as KVM_SET_MEMORY_ATTRIBUTES2 on the file), the host checks and writes
    shared memory in place, and no hole punching is needed."""
    npages = 512
    vm, fd = make(npages=npages, flags=MMAP)
    for size in (1, 2, 16, 64):
        for start in range(0, npages, 128):
            set2(vm, fd, start, size, 0)  # guest: map shared
            for g in range(start, start + size):
                assert vm.fault((BASE_GFN + g) * PG) == 1
                vm.guest_memfd_write(fd, g * PG, bytes([size]))
                assert vm.guest_memfd_read(fd, g * PG, 1) == bytes([size])
            set2(vm, fd, start, size, P)  # guest: map private
            for g in range(start, start + size):
                assert vm.fault((BASE_GFN + g) * PG, private=True) == 1
                with pytest.raises(m.GuestMemfdSigbus):
                    vm.guest_memfd_read(fd, g * PG, 1)
    assert vm.guest_memfd_attributes(fd) == [(0, npages, P)]
    assert vm.stats.gmem_holes_punched == 0


def test_private_mem_kvm_exits_with_per_file_attributes() -> None:
    """private_mem_kvm_exits_test: a private access to a shared gfn exits
    with KVM_EXIT_MEMORY_FAULT (PRIVATE), a shared access to a private one
    exits without; a private access outside every memslot exits; closing
    the guest_memfd makes private accesses exit."""
    vm, fd = make(npages=4, flags=MMAP | SHARED)
    gpa = BASE_GFN * PG
    with pytest.raises(m.MemoryFault) as e:
        vm.fault(gpa, private=True)
    assert (e.value.gpa, e.value.size, e.value.flags) == (gpa, PG, m.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    set2(vm, fd, 0, 1, P)
    with pytest.raises(m.MemoryFault) as e:
        vm.fault(gpa)
    assert e.value.flags == 0
    with pytest.raises(m.MemoryFault):
        vm.fault(0x10000000 * PG, private=True)
    assert vm.fault(gpa, private=True) == 1
    vm.guest_memfd_close(fd)
    with pytest.raises(m.MemoryFault):
        vm.fault(gpa, private=True)


def test_conversion_zaps_only_the_range_with_the_filter() -> None:
    vm, fd = make(npages=32, store="mapletree")
    for g in range(8):
        vm.fault((BASE_GFN + g) * PG)
    before = vm.stats.zapped_pages[1]
    set2(vm, fd, 2, 4, P)
    assert vm.stats.zapped_pages[1] - before == 4
    s = vm.inplace_stats
    assert (s["filter_shared"], s["filter_private"]) == (1, 0)
    assert vm.mmu.mappings(1) == [(BASE_GFN, BASE_GFN + 2), (BASE_GFN + 6, BASE_GFN + 8)]
    set2(vm, fd, 0, 8, 0)
    s = vm.inplace_stats
    assert (s["filter_shared"], s["filter_private"]) == (2, 1)


def test_mapletree_wherever_a_store_is_chosen() -> None:
    """store="mapletree" as the VM's store (6.8 semantics) and in the sweep:
    the same results as the other stores, its own memory."""
    from memattr import sweep, workloads

    trace = workloads.boot_and_churn("1G")
    out = {s: sweep.run_trace(trace, s) for s in ("rangetree", "mapletree")}
    for key in ("conversions", "noop_conversions", "zapped_ranges", "tlb_flushes"):
        assert out["rangetree"]["stats"][key] == out["mapletree"]["stats"][key], key
    so = sweep.run_store_only(trace, "mapletree")
    assert so["memory_bytes"] == 256  # one leaf after the kexec


def test_v5_modes_on_a_large_allocated_file_cost_runs_not_pages() -> None:
    """Content modes over 64 GiB of allocated memory are bookkept per run
    (the model must not hold 16M pages of bytes)."""
    vm, fd = make(semantics="gmem-inplace-v5", npages=1 << 24)
    vm.guest_memfd_fallocate(fd, m.FALLOC_FL_KEEP_SIZE, 0, (1 << 24) * PG)
    vm.guest_memfd_write(fd, 5 * PG, b"kept?")
    set2(vm, fd, 0, 1 << 24, P)  # UNSPECIFIED: scrambled
    set2(vm, fd, 0, 1 << 24, 0, PRESERVE)
    assert vm.guest_memfd_read(fd, 5 * PG, 5) != b"kept?"
    assert vm.guest_memfd_read(fd, (1 << 24) * PG - 8, 8) != b"\0" * 8
    set2(vm, fd, 0, 1 << 24, 0, ZERO)
    assert vm.guest_memfd_read(fd, 5 * PG, 5) == b"\0" * 5
    assert vm.inplace_stats["scrambled_pages"] == 1 << 24


def test_a_per_vm_trace_replayed_in_place_ends_in_the_same_state() -> None:
    """boot-and-churn through KVM_SET_MEMORY_ATTRIBUTES (6.8) and through
    KVM_SET_MEMORY_ATTRIBUTES2 per guest_memfd (InPlaceVmm): page for page
    the same shared/private state at every phase end, no errors either way."""
    from memattr import workloads
    from memattr.gmem_inplace import InPlaceVmm

    trace = workloads.boot_and_churn("1G", kexec_at_end=False)
    kw = dict(trace.meta.get("vm_kwargs", {}))
    old = m.Vm(trace.vm_type, "xarray", **kw)
    new = m.Vm(trace.vm_type, "mapletree", semantics="gmem-inplace", **kw)
    vmm = InPlaceVmm(new)
    assert not m.replay(trace, old, engine="python").errors
    assert not m.replay(trace, vmm, engine="python").errors
    assert vmm.unbacked_pages == 0
    for slot in new.memslots.address_space(0):
        want = np.zeros(slot.npages, dtype=np.uint64)
        for s, e, v in old.store.runs(slot.base_gfn, slot.end_gfn):
            want[s - slot.base_gfn:e - slot.base_gfn] = v
        got = np.zeros(slot.npages, dtype=np.uint64)
        base = slot.gmem_pgoff
        for s, e, v in new.guest_memfd_attributes(slot.gmem):
            lo, hi = max(s, base), min(e, base + slot.npages)
            if lo < hi:
                got[lo - base:hi - base] = v
        assert (got == want).all()


def test_pin_arguments_are_bounded() -> None:
    vm, fd = make(npages=1 << 22)
    for npages in (0, (1 << 20) + 1, 1 << 40):
        with pytest.raises(ValueError):
            vm.guest_memfd_pin(fd, 0, npages)
    with pytest.raises(ValueError):
        vm.guest_memfd_pin(fd, 1, 1)
    with pytest.raises(ValueError):
        vm.guest_memfd_unpin(fd, 0, 1)
    assert vm.guest_memfd_pinned(fd) == []

