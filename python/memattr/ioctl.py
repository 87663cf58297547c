"""The VM-fd ioctl front end, with fcntl.ioctl() calling conventions.

``vm_ioctl(vm, request, arg=0, mutate_flag=True)`` behaves like
``fcntl.ioctl(vm_fd, request, arg, mutate_flag)`` would against the kernel:

- ``arg`` an int: passed as the ioctl's argument; returns the ioctl's
  return value. For requests that take a structure the int is a user
  pointer; the model cannot read raw process memory safely, so it treats
  every int there as an address copy_from_user() cannot read: EFAULT.
- ``arg`` a writable buffer (bytearray, ctypes structure, writable
  memoryview, array) with ``mutate_flag`` true: the kernel reads and writes
  it in place; returns the ioctl's return value (an int).
- ``arg`` a read-only buffer (bytes, read-only memoryview, str as UTF-8), or
  any buffer with ``mutate_flag`` false: fcntl copies it (at most 1024 bytes,
  else ValueError "ioctl string arg too long"), the kernel works on the copy,
  and the copy is returned as bytes, with whatever the kernel wrote into it
  (the ioctl's int return value is not returned, exactly as with fcntl).

The kernel copies ``sizeof(struct)`` bytes from the pointer whatever the
caller's object size is. A longer buffer is fine (only the prefix is used,
and written back). A shorter one fails with EFAULT: copy_from_user() would
run off the caller's object (with fcntl's stack copy the kernel would read
garbage instead, which no model can reproduce, so the model reports the
fault copy_from_user gives at the end of a mapping). Errors raise OSError with
the kernel's errno; an unknown request is ENOTTY, like the kernel's
kvm_vm_ioctl() default case.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memattr.uapi import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_GUEST_MEMFD,
    KVM_ENABLE_CAP,
    KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES,
    KVM_SET_MEMORY_ATTRIBUTES,
    KVM_SET_MEMORY_ATTRIBUTES_V11,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
    kvm_create_guest_memfd,
    kvm_enable_cap,
    kvm_memory_attributes,
    kvm_userspace_memory_region,
    kvm_userspace_memory_region2,
)

if TYPE_CHECKING:
    from memattr.vm import Vm

IOCTL_BUFSZ = 1024  # CPython's fcntl copy buffer for immutable arguments
_INT_MIN = -(1 << 31)
_INT_MAX = (1 << 31) - 1


def _oserror(code: int, why: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {why}")


# A handler gets the VM and the kernel's view of the user memory (a writable
# bytearray or memoryview, already at least the request's struct size) and
# returns the ioctl's return value; it writes output into ``buf``.
_Handler = Callable[["Vm", Any], int]


def _copy_in(buf: Any, struct: type[ctypes.Structure], what: str) -> Any:
    """copy_from_user(): the struct, or EFAULT if the buffer is too short."""
    size = ctypes.sizeof(struct)
    if len(buf) < size:
        raise _oserror(
            errno.EFAULT,
            f"{what} needs {size} bytes (struct {struct.__name__}), the buffer has {len(buf)}",
        )
    # from_buffer_copy() copies the first sizeof(struct) bytes of a longer
    # buffer, so no intermediate slice is needed.
    return struct.from_buffer_copy(buf)


def _kvm_set_user_memory_region(vm: Vm, buf: Any) -> int:
    mem = _copy_in(buf, kvm_userspace_memory_region, "KVM_SET_USER_MEMORY_REGION")
    vm.kvm_vm_ioctl_set_memory_region(
        mem.slot, mem.flags, mem.guest_phys_addr, mem.memory_size, mem.userspace_addr, 0, 0,
        v1=True,
    )
    return 0


def _kvm_set_user_memory_region2(vm: Vm, buf: Any) -> int:
    mem = _copy_in(buf, kvm_userspace_memory_region2, "KVM_SET_USER_MEMORY_REGION2")
    vm.kvm_vm_ioctl_set_memory_region(
        mem.slot,
        mem.flags,
        mem.guest_phys_addr,
        mem.memory_size,
        mem.userspace_addr,
        mem.guest_memfd,
        mem.guest_memfd_offset,
    )
    return 0


def _kvm_enable_cap(vm: Vm, buf: Any) -> int:
    cap = _copy_in(buf, kvm_enable_cap, "KVM_ENABLE_CAP")
    vm.enable_cap(cap.cap, cap.flags, list(cap.args))
    return 0


def _kvm_create_guest_memfd(vm: Vm, buf: Any) -> int:
    args = _copy_in(buf, kvm_create_guest_memfd, "KVM_CREATE_GUEST_MEMFD")
    return vm.create_guest_memfd(args.size, args.flags)


def _kvm_set_memory_attributes(vm: Vm, buf: Any) -> int:
    attrs = _copy_in(buf, kvm_memory_attributes, "KVM_SET_MEMORY_ATTRIBUTES")
    vm.set_memory_attributes(attrs.address, attrs.size, attrs.attributes, attrs.flags)
    if vm.semantics == "v11":
        # v11 api.rst: address/size are in/out; on success address is one
        # past the last page set and size is what remains (all of it set).
        attrs.address += attrs.size
        attrs.size = 0
        buf[: ctypes.sizeof(attrs)] = bytes(attrs)
    return 0


def _kvm_get_supported_memory_attributes(vm: Vm, buf: Any) -> int:
    size = ctypes.sizeof(ctypes.c_uint64)
    if len(buf) < size:
        raise _oserror(
            errno.EFAULT,
            f"KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES writes {size} bytes, the buffer has {len(buf)}",
        )
    buf[:size] = vm.supported_memory_attributes.to_bytes(size, "little")
    return 0


_STRUCT_REQUESTS_68: dict[int, _Handler] = {
    KVM_SET_USER_MEMORY_REGION: _kvm_set_user_memory_region,
    KVM_SET_USER_MEMORY_REGION2: _kvm_set_user_memory_region2,
    KVM_CREATE_GUEST_MEMFD: _kvm_create_guest_memfd,
    KVM_SET_MEMORY_ATTRIBUTES: _kvm_set_memory_attributes,
    KVM_ENABLE_CAP: _kvm_enable_cap,
}
# v11 keeps the merged request numbers working too, so one VMM binary can be
# pointed at either mode; it adds the two ioctls that were never merged.
_STRUCT_REQUESTS_V11: dict[int, _Handler] = {
    **_STRUCT_REQUESTS_68,
    KVM_SET_MEMORY_ATTRIBUTES_V11: _kvm_set_memory_attributes,
    KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES: _kvm_get_supported_memory_attributes,
}


# Requests whose case in kvm_vm_ioctl() depends on how the host's KVM was
# built: the core says whether it is there (ENOTTY if not, before the
# argument is read, as in the kernel), by the name it knows it under.
_BUILD_DEPENDENT: dict[int, str] = {
    KVM_SET_MEMORY_ATTRIBUTES: "set_memory_attributes",
    KVM_SET_MEMORY_ATTRIBUTES_V11: "set_memory_attributes",
    KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES: "set_memory_attributes",
    KVM_CREATE_GUEST_MEMFD: "create_guest_memfd",
}


def _handler_for(vm: Vm, request: int) -> _Handler | None:
    table = _STRUCT_REQUESTS_V11 if vm.semantics == "v11" else _STRUCT_REQUESTS_68
    return table.get(request)


def _dispatch(vm: Vm, request: int, int_arg: int | None, buf: Any) -> int:
    """The kernel side: kvm_vm_ioctl() for one request."""
    if request == KVM_CHECK_EXTENSION:
        # _IO: the argument is the capability number itself. A buffer's
        # address is no capability anyone defines.
        return vm.check_extension(int_arg) if int_arg is not None else 0
    handler = _handler_for(vm, request)
    if handler is None:
        raise _oserror(errno.ENOTTY, f"unknown VM ioctl {request:#x}")
    if request in _BUILD_DEPENDENT:
        vm.kvm_vm_ioctl_compiled_in(_BUILD_DEPENDENT[request])
    if buf is None:
        raise _oserror(
            errno.EFAULT,
            f"ioctl {request:#x} takes a pointer to a struct; the int {int_arg:#x} "
            f"is not readable memory the model can access (pass a buffer)",
        )
    return handler(vm, buf)


def vm_ioctl(vm: Vm, request: int, arg: Any = 0, mutate_flag: bool = True) -> int | bytes:
    """fcntl.ioctl(vm_fd, request, arg, mutate_flag) against the model."""
    return fcntl_ioctl(request, arg, mutate_flag, lambda r, i, b: _dispatch(vm, r, i, b))


# The kernel side of one ioctl: (request, int argument or None, the user
# memory as a writable buffer or None) -> the ioctl's return value.
_Dispatch = Callable[[int, "int | None", Any], int]


def fcntl_ioctl(request: int, arg: Any, mutate_flag: bool, dispatch: _Dispatch) -> int | bytes:
    """fcntl.ioctl()'s argument conventions around ``dispatch``, for any fd."""
    try:
        request = operator.index(request)
    except TypeError:
        raise TypeError(f"request must be an int, not {type(request).__name__}") from None
    request &= 0xFFFFFFFF  # the ioctl command is an unsigned int

    if isinstance(arg, str):
        arg = arg.encode()
    view: memoryview | None
    try:
        view = memoryview(arg)
    except TypeError:
        view = None

    if view is None:
        try:
            int_arg = operator.index(arg)
        except TypeError:
            raise TypeError(
                "ioctl requires an integer or a buffer argument, "
                f"not {type(arg).__name__}"
            ) from None
        if not _INT_MIN <= int_arg <= _INT_MAX:
            raise OverflowError(f"ioctl int argument {int_arg} does not fit in a C int")
        return dispatch(request, int_arg, None)

    with view:
        if not view.c_contiguous:
            raise TypeError("ioctl buffer argument must be C-contiguous")
        flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        with flat:
            if mutate_flag and not flat.readonly:
                # The kernel reads and writes the caller's memory directly.
                return dispatch(request, None, flat)
            if len(flat) > IOCTL_BUFSZ:
                raise ValueError("ioctl string arg too long")
            copy = bytearray(flat)
    # fcntl copies its buffer back before it checks the ioctl's result, so
    # what the kernel wrote (error_offset) is in the copy even on failure;
    # the copy only reaches the caller on success, as with fcntl.
    dispatch(request, None, copy)
    return bytes(copy)


__all__ = ["IOCTL_BUFSZ", "fcntl_ioctl", "vm_ioctl"]
