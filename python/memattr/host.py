"""Host profiles: what a host's KVM was built with and what its CPU offers.

``HostProfile`` is plain data. The answers it implies (capabilities, the VM
types KVM_CREATE_VM accepts, ENOTTY for compiled-out ioctls, address
spaces, the access_ok() limit) are computed by the core
(``rust/kvm/host.rs``, ``rust/kvm/caps.rs``), which also refuses a profile
no real host can have. ``HostProfile.probe()`` reads the running kernel:
``/dev/kvm`` (KVM_CHECK_EXTENSION, KVM_CREATE_VM per type),
``/proc/config.gz`` where readable, ``/proc/cpuinfo`` and the KVM module
parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import gzip
import os
import platform
from typing import Any, ClassVar

from memattr import _native
from memattr.uapi import (
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_PRE_FAULT_MEMORY,
    KVM_CAP_VM_TYPES,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VM,
    KVM_SET_USER_MEMORY_REGION,
    PAGE_SIZE,
    kvm_userspace_memory_region,
)

_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}

HostTuple = tuple[str, int, bool, bool, bool, bool, bool, int, int, int]
"""A profile's fields as the core takes them (name aside)."""


@dataclasses.dataclass(frozen=True)
class HostProfile:
    """A host as KVM sees it. Fields:

    - ``vendor``: ``"intel"``, ``"amd"`` or ``"other"``;
    - ``vm_types``: a bit per KVM_X86_*_VM type KVM_CREATE_VM accepts;
    - ``sw_protected_vm``: CONFIG_KVM_SW_PROTECTED_VM;
    - ``smm``: CONFIG_KVM_SMM (two address spaces for VMs without private
      memory; without it every VM has one);
    - ``generic_memory_attributes``: CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
      (KVM_SET_MEMORY_ATTRIBUTES exists);
    - ``guest_memfd``: CONFIG_KVM_GUEST_MEMFD (KVM_CREATE_GUEST_MEMFD exists);
    - ``tdp``: two-dimensional paging in use (EPT/NPT; not with shadow
      paging or PVM);
    - ``max_page_level``: the largest page guest memory is mapped with
      (1 = 4K, 2 = 2M, 3 = 1G);
    - ``user_address_bits``: 47 (4-level paging) or 56 (LA57): where
      access_ok() stops;
    - ``maxphyaddr``: kvm_host.maxphyaddr, the CPU's physical address
      width (CPUID 0x80000008, 36 to 52 bits): with TDP, no memslot may
      reach past it (kvm_mmu_max_gfn()); 52, x86's widest, if not given;
    - ``name``: what this profile is (not used by any rule).
    """

    vendor: str
    vm_types: int
    sw_protected_vm: bool
    smm: bool
    generic_memory_attributes: bool
    guest_memfd: bool
    tdp: bool
    max_page_level: int
    user_address_bits: int
    maxphyaddr: int = 52
    name: str = dataclasses.field(default="custom", compare=False)

    DEFAULT_NAME: ClassVar[str] = "opensuse-tumbleweed-6.18-amd-snp"

    def __post_init__(self) -> None:
        # The core says whether a real host can look like this.
        _native.host_profile_check(self.as_tuple())

    def as_tuple(self) -> HostTuple:
        """The plain data the core takes."""
        return (
            self.vendor,
            self.vm_types,
            self.sw_protected_vm,
            self.smm,
            self.generic_memory_attributes,
            self.guest_memfd,
            self.tdp,
            self.max_page_level,
            self.user_address_bits,
            self.maxphyaddr,
        )

    @classmethod
    def from_tuple(cls, t: HostTuple, name: str = "custom") -> HostProfile:
        return cls(*t, name=name)

    @classmethod
    def default(cls) -> HostProfile:
        """The default host, a real configuration: openSUSE Tumbleweed's
        kernel-default config (CONFIG_KVM_AMD_SEV=y,
        CONFIG_KVM_SW_PROTECTED_VM=y, CONFIG_KVM_SMM=y) at Linux 6.18 on an
        AMD EPYC 9004 (Genoa) with SEV-SNP enabled, NPT on, 1G pages,
        5-level paging (56-bit user addresses). VM types: default,
        SW_PROTECTED, SEV, SEV-ES, SNP; 52 bits of physical address."""
        return _default_profile()

    @classmethod
    def named(cls, name: str) -> HostProfile:
        """A named profile: ``"default"`` (see :meth:`default`) or
        ``"intel-tdx"``: Linux 6.18 with CONFIG_KVM_INTEL_TDX=y,
        CONFIG_KVM_SW_PROTECTED_VM=y, CONFIG_KVM_SMM=y on a Sapphire Rapids
        with TDX enabled (kvm_intel.tdx=1), EPT on, 1G pages, 46 bits of
        physical address: VM types default, SW_PROTECTED and TDX."""
        if name in ("default", cls.DEFAULT_NAME):
            return cls.default()
        if name == "intel-tdx":
            return dataclasses.replace(
                cls.default(),
                vendor="intel",
                vm_types=(1 << 0) | (1 << 1) | (1 << 5),
                maxphyaddr=46,
                name="intel-tdx-6.18",
            )
        raise ValueError(f"no host profile named {name!r} (known: 'default', 'intel-tdx')")

    def check_extension(self, cap: int, semantics: str = "6.18") -> int:
        """KVM_CHECK_EXTENSION on this host's system fd (/dev/kvm)."""
        return int(_native.check_extension_system(self.as_tuple(), semantics, cap))

    @classmethod
    def probe(cls, dev: str = "/dev/kvm") -> HostProfile:
        """The running host's profile. OSError if ``dev`` cannot be opened.
        Config options come from /proc/config.gz where readable, otherwise
        from what /dev/kvm answers."""
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            caps = {
                cap: fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)
                for cap in (
                    KVM_CAP_GUEST_MEMFD,
                    KVM_CAP_MEMORY_ATTRIBUTES,
                    KVM_CAP_MULTI_ADDRESS_SPACE,
                    KVM_CAP_PRE_FAULT_MEMORY,
                    KVM_CAP_VM_TYPES,
                )
            }
            vm_types = 0
            # Creating a VM is the answer that counts; the cap says which
            # types to try beyond the ones x86 has.
            for t in range(max(8, caps[KVM_CAP_VM_TYPES].bit_length())):
                try:
                    vm = fcntl.ioctl(fd, KVM_CREATE_VM, t)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    continue
                os.close(vm)
                vm_types |= 1 << t
            max_gpa_bits = _probe_max_gpa_bits(fd)
        finally:
            os.close(fd)
        config = read_kernel_config()
        cpu = _cpuinfo()

        def option(name: str, fallback: bool) -> bool:
            if config is None:
                return fallback
            return config.get(name) in ("y", "m")

        tdp = caps[KVM_CAP_PRE_FAULT_MEMORY] == 1 or _module_param_on("kvm_amd", "npt") or _module_param_on(
            "kvm_intel", "ept"
        )
        # With TDP the kernel's own limit is the CPU's MAXPHYADDR, which
        # /proc/cpuinfo may understate (SME and MKTME take bits from it);
        # without, the limit is 52 whatever the CPU, so cpuinfo's width is
        # kept (no rule reads it then).
        maxphyaddr = max_gpa_bits if tdp and max_gpa_bits is not None else _cpuinfo_phys_bits(cpu)
        return cls(
            vendor=_VENDORS.get(cpu.get("vendor_id", ""), "other"),
            vm_types=vm_types,
            sw_protected_vm=option("CONFIG_KVM_SW_PROTECTED_VM", bool(vm_types & 2)),
            smm=option("CONFIG_KVM_SMM", caps[KVM_CAP_MULTI_ADDRESS_SPACE] > 1),
            generic_memory_attributes=option(
                "CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES", caps[KVM_CAP_MEMORY_ATTRIBUTES] != 0
            ),
            guest_memfd=caps[KVM_CAP_GUEST_MEMFD] != 0,
            tdp=tdp,
            max_page_level=3 if "pdpe1gb" in cpu.get("flags", "").split() else 2,
            user_address_bits=56 if "la57" in cpu.get("flags", "").split() else 47,
            maxphyaddr=maxphyaddr,
            name=f"probed: Linux {platform.release()}",
        )


@functools.cache
def _default_profile() -> HostProfile:
    return HostProfile.from_tuple(_native.host_profile_default(), name=HostProfile.DEFAULT_NAME)


def read_kernel_config(path: str = "/proc/config.gz") -> dict[str, str] | None:
    """CONFIG_* options of the running kernel, or None if unreadable."""
    try:
        with gzip.open(path, "rt") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, _, v = line.partition("=")
            out[k] = v
    return out


def _cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def _cpuinfo_phys_bits(cpu: dict[str, str]) -> int:
    """The physical address width /proc/cpuinfo reports ("address sizes:
    46 bits physical, ..."); 52, x86's widest, if it says none."""
    words = cpu.get("address sizes", "").split()
    if len(words) >= 2 and words[1] == "bits" and words[0].isdigit():
        return int(words[0])
    return 52


def _probe_max_gpa_bits(kvm_fd: int) -> int | None:
    """How many bits of guest-physical address this kernel's memslots may
    span (kvm_mmu_max_gfn()), found by asking it: the widest b for which a
    one-page memslot ending at 2^b is accepted, on a scratch VM. None if
    the kernel takes none (or no VM can be made)."""
    try:
        vm = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    except OSError:
        return None
    try:
        for bits in range(52, 35, -1):
            # One slot id per try: each refused one leaves nothing behind,
            # and the VM (with the slot it took) goes at the close.
            region = kvm_userspace_memory_region(
                slot=0, guest_phys_addr=(1 << bits) - PAGE_SIZE, memory_size=PAGE_SIZE, userspace_addr=1 << 30
            )
            try:
                fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    return None
                continue
            return bits
        return None
    finally:
        os.close(vm)


def _module_param_on(module: str, param: str) -> bool:
    try:
        with open(f"/sys/module/{module}/parameters/{param}") as f:
            return f.read().strip() in ("Y", "y", "1")
    except OSError:
        return False


def _host_tuple(host: Any) -> HostTuple | None:
    if host is None:
        return None
    if not isinstance(host, HostProfile):
        raise TypeError(f"host must be a memattr.HostProfile, not {type(host).__name__}")
    return host.as_tuple()


__all__ = ["HostProfile", "read_kernel_config"]
