"""uapi: constants, ioctl encoding and structure layouts against the kernel."""

from __future__ import annotations

import ctypes

import pytest

import memattr
from memattr import uapi


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    # Values as the kernel's _IOC macros produce them on x86-64.
    assert memattr.KVM_CHECK_EXTENSION == 0xAE03
    assert memattr.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert memattr.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert memattr.KVM_SET_MEMORY_ATTRIBUTES == 0x4020AED2
    assert memattr.KVM_CREATE_GUEST_MEMFD == 0xC040AED4
    # RFC v11 (the seed): _IOR(KVMIO, 0xd2, __u64) and _IOW(KVMIO, 0xd3, ...).
    assert memattr.KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES == 0x8008AED2
    assert uapi.KVM_SET_MEMORY_ATTRIBUTES_V11 == 0x4020AED3


def test_ioc_encoding_fields() -> None:
    req = uapi._IOWR(uapi.KVMIO, 0xD4, 64)
    assert uapi._IOC_DIR(req) == uapi._IOC_READ | uapi._IOC_WRITE
    assert uapi._IOC_SIZE(req) == 64
    assert req & 0xFF == 0xD4 and (req >> 8) & 0xFF == 0xAE
    with pytest.raises(ValueError, match="size"):
        uapi._IOW(uapi.KVMIO, 1, 1 << 14)
    with pytest.raises(ValueError, match="type/nr"):
        uapi._IO(uapi.KVMIO, 256)


def test_capabilities_and_flags() -> None:
    assert memattr.KVM_CAP_USER_MEMORY2 == 231
    assert memattr.KVM_CAP_MEMORY_FAULT_INFO == 232
    assert memattr.KVM_CAP_MEMORY_ATTRIBUTES == 233
    assert memattr.KVM_CAP_GUEST_MEMFD == 234
    assert memattr.KVM_CAP_VM_TYPES == 235
    assert memattr.KVM_MEMORY_ATTRIBUTE_PRIVATE == 1 << 3
    assert memattr.KVM_MEM_GUEST_MEMFD == 1 << 2
    assert memattr.KVM_EXIT_MEMORY_FAULT == 39
    assert memattr.KVM_MEMORY_EXIT_FLAG_PRIVATE == 1 << 3
    assert (memattr.KVM_X86_DEFAULT_VM, memattr.KVM_X86_SW_PROTECTED_VM) == (0, 1)
    assert (uapi.KVM_X86_SEV_VM, uapi.KVM_X86_SEV_ES_VM) == (2, 3)
    assert (uapi.KVM_X86_SNP_VM, uapi.KVM_X86_TDX_VM) == (4, 5)
    assert memattr.PAGE_SIZE == 4096 and memattr.PAGE_SHIFT == 12
    assert uapi.KVM_USER_MEM_SLOTS == 32764
    assert uapi.KVM_MEM_MAX_NR_PAGES == (1 << 31) - 1


@pytest.mark.parametrize(
    ("struct", "size", "offsets"),
    [
        (
            "kvm_memory_attributes",
            32,
            {"address": 0, "size": 8, "attributes": 16, "flags": 24},
        ),
        (
            "kvm_userspace_memory_region",
            32,
            {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24},
        ),
        (
            "kvm_userspace_memory_region2",
            160,
            {
                "slot": 0,
                "flags": 4,
                "guest_phys_addr": 8,
                "memory_size": 16,
                "userspace_addr": 24,
                "guest_memfd_offset": 32,
                "guest_memfd": 40,
                "pad1": 44,
                "pad2": 48,
            },
        ),
        ("kvm_create_guest_memfd", 64, {"size": 0, "flags": 8, "reserved": 16}),
    ],
)
def test_struct_layouts(struct: str, size: int, offsets: dict[str, int]) -> None:
    cls = getattr(memattr, struct)
    assert ctypes.sizeof(cls) == size
    for name, off in offsets.items():
        assert getattr(cls, name).offset == off, name


def test_everything_in_the_contract_is_exported() -> None:
    for name in [
        "PAGE_SIZE",
        "PAGE_SHIFT",
        "KVM_MEMORY_ATTRIBUTE_PRIVATE",
        "KVM_CAP_MEMORY_ATTRIBUTES",
        "KVM_CAP_GUEST_MEMFD",
        "KVM_CAP_USER_MEMORY2",
        "KVM_CAP_MEMORY_FAULT_INFO",
        "KVM_SET_MEMORY_ATTRIBUTES",
        "KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES",
        "KVM_CHECK_EXTENSION",
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_SET_USER_MEMORY_REGION2",
        "KVM_CREATE_GUEST_MEMFD",
        "KVM_MEM_GUEST_MEMFD",
        "KVM_EXIT_MEMORY_FAULT",
        "KVM_MEMORY_EXIT_FLAG_PRIVATE",
        "KVM_X86_DEFAULT_VM",
        "KVM_X86_SW_PROTECTED_VM",
        "kvm_memory_attributes",
        "kvm_userspace_memory_region",
        "kvm_userspace_memory_region2",
        "kvm_create_guest_memfd",
        "Vm",
        "GfnRange",
        "MemoryFault",
        "LockdepError",
        "Stats",
    ]:
        assert name in memattr.__all__, name
        assert hasattr(memattr, name), name


def test_memory_fault_is_an_efault_oserror() -> None:
    import errno
    import pickle

    e = memattr.MemoryFault(0x1000, 4096, memattr.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert isinstance(e, OSError) and e.errno == errno.EFAULT
    assert (e.gpa, e.size, e.flags) == (0x1000, 4096, 8)
    assert "private" in str(e)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.gpa, e2.size, e2.flags, e2.errno) == (0x1000, 4096, 8, errno.EFAULT)
    lk = memattr.LockdepError("mmu_lock", "rule", "here")
    lk2 = pickle.loads(pickle.dumps(lk))
    assert (lk2.lock, lk2.rule, lk2.call_site) == ("mmu_lock", "rule", "here")


# The KVM core modules (vm, mmu, memslots, ...) keep a few private copies for
# now (e.g. _U32_MAX, _S64_MAX); every other module takes kernel constants
# from memattr.uapi.
_KVM_CORE = {"vm", "mmu", "memslots", "gfn_range", "locks", "stats", "batch", "ioctl", "errors"}
_KERNEL_PREFIXES = ("KVM_", "FALLOC_FL_", "PAGE_", "SZ_", "U64_", "U32_", "S64_", "S32_", "INVALID_GPA")


def _kernel_constant_definitions(source: str) -> list[str]:
    """Module-level names a source assigns that are uapi's (or look like a
    kernel constant), and int literals equal to PAGE_SIZE in its code."""
    import ast

    tree = ast.parse(source)
    found = []
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for name in targets:
            bare = name.lstrip("_")
            if bare in uapi.__all__ or bare.startswith(_KERNEL_PREFIXES):
                found.append(f"{name} = ... (line {node.lineno})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value == uapi.PAGE_SIZE:
            found.append(f"{node.value} (line {node.lineno})")
    return found


def test_kernel_constant_finder() -> None:
    src = "PAGE_SHIFT = 12\n_U64 = 1\n_U64_MAX = 2\nKVM_FOO: int = 3\nX = 4096\nY = 'the 4096 in a string'\n"
    assert _kernel_constant_definitions(src) == [
        "PAGE_SHIFT = ... (line 1)",
        "_U64_MAX = ... (line 3)",
        "KVM_FOO = ... (line 4)",
        "4096 (line 5)",
    ]


def test_kernel_constants_are_defined_once_in_uapi() -> None:
    from pathlib import Path

    pkg = Path(uapi.__file__).parent
    checked = [p for p in sorted(pkg.glob("*.py")) if p.stem not in _KVM_CORE | {"uapi"}]
    assert {"trace_format", "workloads", "generators", "qemu", "sweep", "cli", "report"} <= {p.stem for p in checked}
    found = {p.stem: _kernel_constant_definitions(p.read_text(encoding="utf-8")) for p in checked}
    assert {k: v for k, v in found.items() if v} == {}
