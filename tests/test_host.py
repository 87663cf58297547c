"""Host profiles and the Linux 6.18 rules, checked against the kernel's
source (the live kernel of the machine the suite runs on is checked by
tests/test_live_kvm.py; these cover what it cannot run: private memory,
other VM types, SMM, other hosts)."""

from __future__ import annotations

import dataclasses
import errno

import pytest

import memattr as m
from memattr import uapi

PAGE = uapi.PAGE_SIZE
SZ_2M = 2 << 20
GMEM = uapi.KVM_MEM_GUEST_MEMFD
MMAP = uapi.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = uapi.GUEST_MEMFD_FLAG_INIT_SHARED
ALL_TYPES = range(6)

# This machine's kind of host: PVM-flavoured KVM without SW_PROTECTED_VM,
# generic memory attributes or SMM, shadow paging.
PVM_HOST = m.HostProfile(
    vendor="intel", vm_types=1, sw_protected_vm=False, smm=False, generic_memory_attributes=False,
    guest_memfd=True, tdp=False, max_page_level=3, user_address_bits=47,
)


def errno_of(fn: object) -> int:
    with pytest.raises(OSError) as info:
        fn()  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


def test_default_profile_is_one_real_host() -> None:
    host = m.HostProfile.default()
    assert host == m.Vm().host and host.name == m.HostProfile.DEFAULT_NAME
    assert host.vendor == "amd" and host.smm and host.sw_protected_vm and host.generic_memory_attributes
    # Default, SW_PROTECTED, SEV, SEV-ES, SNP: not TDX (an Intel type).
    assert host.vm_types == 0b11111
    assert m.Vm().check_extension(uapi.KVM_CAP_VM_TYPES) == 0b11111
    assert host.check_extension(uapi.KVM_CAP_VM_TYPES) == 0b11111


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"vm_types": 0b10}, "KVM_X86_DEFAULT_VM"),
        ({"vm_types": 1 << 6 | 1}, "bit 6"),
        ({"vendor": "intel"}, "AMD"),
        ({"vendor": "amd", "vm_types": 1 << 5 | 1}, "Intel"),
        ({"sw_protected_vm": False}, "SW_PROTECTED"),
        ({"tdp": False}, "SW_PROTECTED"),
        ({"generic_memory_attributes": False}, "private memory"),
        ({"max_page_level": 4}, "max_page_level"),
        ({"user_address_bits": 48}, "user_address_bits"),
        ({"maxphyaddr": 35}, "maxphyaddr"),
        ({"maxphyaddr": 53}, "maxphyaddr"),
        ({"vendor": "via"}, "vendor"),
    ],
)
def test_profiles_no_host_can_have_are_refused(change: dict[str, object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        dataclasses.replace(m.HostProfile.default(), **change)  # type: ignore[arg-type]


def test_vm_types_follow_the_host_bug_63() -> None:
    """KVM_CAP_VM_TYPES once answered 63 and KVM_CREATE_VM took types 2-5
    on any host: both now follow the host (kvm_caps.supported_vm_types)."""
    for host in (m.HostProfile.default(), m.HostProfile.named("intel-tdx"), PVM_HOST):
        for t in ALL_TYPES:
            if host.vm_types >> t & 1:
                m.Vm(t, host=host)
            else:
                assert errno_of(lambda t=t, host=host: m.Vm(t, host=host)) == errno.EINVAL
        assert m.Vm(host=host).check_extension(uapi.KVM_CAP_VM_TYPES) == host.vm_types
    for t in (6, 63, 64, 1 << 40):
        assert errno_of(lambda t=t: m.Vm(t)) == errno.EINVAL
    # 6.8 knew only the default and SW_PROTECTED types.
    assert m.Vm(semantics="6.8").check_extension(uapi.KVM_CAP_VM_TYPES) == 0b11
    assert errno_of(lambda: m.Vm(uapi.KVM_X86_SNP_VM, semantics="6.8")) == errno.EINVAL


@pytest.mark.parametrize("semantics", ["6.8", "6.18"])
def test_guest_memfd_slots_are_never_read_only(semantics: str) -> None:
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics=semantics)  # type: ignore[arg-type]
    fd = vm.create_guest_memfd(SZ_2M)
    for flags in (GMEM | uapi.KVM_MEM_READONLY, GMEM | uapi.KVM_MEM_LOG_DIRTY_PAGES):
        assert errno_of(lambda flags=flags: vm.set_user_memory_region(0, 0, SZ_2M, 0, flags, fd)) == errno.EINVAL
    assert vm.memslots.find(0, 0) is None and vm.guest_memfds()[0][3] == []
    vm.set_user_memory_region(0, 0, SZ_2M, 0, uapi.KVM_MEM_READONLY)  # without guest_memfd: fine


def test_caps_6_18_against_6_8() -> None:
    d18, p18 = m.Vm(), m.Vm(m.KVM_X86_SW_PROTECTED_VM)
    d8, p8 = m.Vm(semantics="6.8"), m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="6.8")
    host = m.HostProfile.default()
    # guest_memfd on every VM type in 6.18.
    assert [v.check_extension(uapi.KVM_CAP_GUEST_MEMFD) for v in (d18, p18, d8, p8)] == [1, 1, 0, 1]
    # kvm_gmem_get_supported_flags(): INIT_SHARED only without private memory.
    assert d18.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED
    assert p18.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP
    assert host.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == MMAP | INIT_SHARED
    assert d8.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 0
    # Caps since 6.8: pre-fault (tdp_enabled), APIC bus cycles, guest mode.
    for cap in (uapi.KVM_CAP_PRE_FAULT_MEMORY, uapi.KVM_CAP_X86_APIC_BUS_CYCLES_NS, uapi.KVM_CAP_X86_GUEST_MODE):
        assert (d18.check_extension(cap), d8.check_extension(cap)) == (1, 0)
    assert m.Vm(host=PVM_HOST).check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY) == 0
    # The system fd: a NULL kvm counts as "has private memory".
    assert host.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert host.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 2
    assert host.check_extension(uapi.KVM_CAP_GUEST_MEMFD, semantics="6.8") == 1


def test_a_host_without_config_options() -> None:
    vm = m.Vm(host=PVM_HOST)
    # No SMM: one address space, and the capability is compiled out.
    assert vm.nr_memslot_as_ids == 1
    assert vm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 0
    assert errno_of(lambda: vm.set_user_memory_region(1 << 16, 0, SZ_2M)) == errno.EINVAL
    # No generic memory attributes: the ioctl is not there (ENOTTY), its
    # cap is 0, and nothing is counted.
    assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert errno_of(lambda: vm.set_memory_attributes(0, PAGE, 0)) == errno.ENOTTY
    assert errno_of(lambda: vm.ioctl(uapi.KVM_SET_MEMORY_ATTRIBUTES, uapi.kvm_memory_attributes(size=PAGE))) == errno.ENOTTY
    assert vm.stats.set_calls == 0 and vm.stats.failed_calls == 0
    # No guest_memfd at all.
    no_gmem = dataclasses.replace(PVM_HOST, guest_memfd=False)
    vm = m.Vm(host=no_gmem)
    assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 0
    assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 0
    assert errno_of(lambda: vm.create_guest_memfd(PAGE)) == errno.ENOTTY
    assert errno_of(lambda: vm.set_user_memory_region(0, 0, SZ_2M, 0, GMEM, 3)) == errno.EINVAL
    # 4K-only host: shared memory maps at 4K.
    vm = m.Vm(host=dataclasses.replace(PVM_HOST, max_page_level=1))
    vm.set_user_memory_region(0, 0, 1 << 30)
    assert vm.fault(0) == 1


def test_guest_memfd_flags_6_18() -> None:
    dvm, pvm = m.Vm(), m.Vm(m.KVM_X86_SW_PROTECTED_VM)
    for flags in (0, MMAP, INIT_SHARED, MMAP | INIT_SHARED):
        dvm.create_guest_memfd(PAGE, flags)
    for flags in (0, MMAP):
        pvm.create_guest_memfd(PAGE, flags)
    assert errno_of(lambda: pvm.create_guest_memfd(PAGE, MMAP | INIT_SHARED)) == errno.EINVAL
    for bit in range(2, 64):
        assert errno_of(lambda bit=bit: dvm.create_guest_memfd(PAGE, 1 << bit)) == errno.EINVAL
    assert errno_of(lambda: m.Vm(semantics="6.8").create_guest_memfd(PAGE, MMAP)) == errno.EINVAL


def test_guest_memfd_only_slots_serve_shared_faults() -> None:
    """6.18: a slot bound to an mmap-able guest_memfd (KVM_MEMSLOT_GMEM_ONLY)
    takes shared faults from guest_memfd: its folio size (order 0: 4K),
    and an exit once the file is closed. A slot on a file without MMAP
    keeps using the host mapping for shared faults."""
    vm = m.Vm()
    only = vm.create_guest_memfd(1 << 30, MMAP | INIT_SHARED)
    plain = vm.create_guest_memfd(1 << 30)
    vm.set_user_memory_region(0, 0, 1 << 30, 0, GMEM, only)
    vm.set_user_memory_region(1, 1 << 30, 1 << 30, 1 << 30, GMEM, plain)
    assert vm.fault(0) == 1  # 4K: guest_memfd hands out order-0 folios
    assert vm.fault(1 << 30) == 3  # the host maps it with 1G pages
    vm.guest_memfd_close(only)
    vm.guest_memfd_close(plain)
    with pytest.raises(m.MemoryFault) as info:
        vm.fault(PAGE)
    assert (info.value.gpa, info.value.flags) == (PAGE, 0)
    assert vm.fault((1 << 30) + PAGE) == 3


@pytest.mark.parametrize(
    ("host", "top"),
    [
        (m.HostProfile.default(), 1 << 52),  # NPT on a 52-bit Genoa
        (m.HostProfile.named("intel-tdx"), 1 << 46),  # EPT on a 46-bit Sapphire Rapids
        (dataclasses.replace(PVM_HOST, maxphyaddr=40), 1 << 52),  # shadow paging: 52 whatever the CPU
    ],
)
def test_memslots_end_below_the_hosts_gpa_limit(host: m.HostProfile, top: int) -> None:
    """kvm_arch_prepare_memory_region(): a created or moved slot must end at
    or below kvm_mmu_max_gfn() (arch/x86/kvm/mmu.h: the host's MAXPHYADDR
    with TDP, 52 bits without), worked by hand from the kernel source."""
    vm = m.Vm(host=host)
    vm.set_user_memory_region(0, top - PAGE, PAGE, 1 << 30)
    assert errno_of(lambda: vm.set_user_memory_region(1, top, PAGE, 1 << 30)) == errno.EINVAL
    vm.set_user_memory_region(1, 1 << 32, SZ_2M, 1 << 30)
    assert errno_of(lambda: vm.set_user_memory_region(1, top - PAGE, SZ_2M, 1 << 30)) == errno.EEXIST
    vm.set_user_memory_region(0, 0, 0)
    assert errno_of(lambda: vm.set_user_memory_region(1, top - PAGE, SZ_2M, 1 << 30)) == errno.EINVAL
    assert [(s.slot, s.base_gfn) for s in vm.memslots] == [(1, 1 << 20)]


def test_the_probes_cpuinfo_width_parses_what_the_kernel_prints() -> None:
    """/proc/cpuinfo's "address sizes" line, as x86's show_cpuinfo() prints
    it; 52 when the line is missing or not in that form."""
    from memattr.host import _cpuinfo_phys_bits

    assert _cpuinfo_phys_bits({"address sizes": "46 bits physical, 57 bits virtual"}) == 46
    assert _cpuinfo_phys_bits({"address sizes": "52 bits physical, 57 bits virtual"}) == 52
    assert _cpuinfo_phys_bits({}) == 52
    assert _cpuinfo_phys_bits({"address sizes": "physical"}) == 52


def test_the_build_gate_names_the_ioctls_it_knows() -> None:
    vm = m.Vm()
    vm.kvm_vm_ioctl_compiled_in("set_memory_attributes")
    vm.kvm_vm_ioctl_compiled_in("create_guest_memfd")
    with pytest.raises(ValueError, match="ioctl must be"):
        vm.kvm_vm_ioctl_compiled_in("KVM_CREATE_VCPU")
