//! VM types, KVM_CHECK_EXTENSION and KVM_ENABLE_CAP (x86, Linux 6.8 and 6.18).

use super::*;

/// The VM ioctls whose case in kvm_vm_ioctl() is compiled in or out with
/// the host's build (`#ifdef CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES`,
/// `CONFIG_KVM_GUEST_MEMFD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildDependentIoctl {
    /// KVM_SET_MEMORY_ATTRIBUTES (and v11's two ioctls).
    SetMemoryAttributes,
    /// KVM_CREATE_GUEST_MEMFD.
    CreateGuestMemfd,
}

impl Kvm {
    /// kvm_vm_ioctl()'s switch as this host's KVM was built: an ioctl whose
    /// case is compiled out falls to the default case and x86's
    /// kvm_arch_vm_ioctl(), which knows it neither: ENOTTY, before anything
    /// of its argument is read (so even a bad pointer gives ENOTTY).
    pub fn kvm_vm_ioctl_compiled_in(&self, ioctl: BuildDependentIoctl) -> Result<(), KvmError> {
        let host = &self.config.host;
        let (built, why) = match ioctl {
            BuildDependentIoctl::SetMemoryAttributes => (
                host.generic_memory_attributes,
                "KVM_SET_MEMORY_ATTRIBUTES: this host's KVM has no generic memory attributes",
            ),
            BuildDependentIoctl::CreateGuestMemfd => (
                host.guest_memfd,
                "KVM_CREATE_GUEST_MEMFD: this host's KVM has no guest_memfd",
            ),
        };
        if built {
            Ok(())
        } else {
            fail(ENOTTY, why)
        }
    }
}

/// vm_type -> (has_private_mem, has_protected_state), as x86 sets them at
/// KVM_CREATE_VM (kvm_arch_init_vm, svm_vm_init, tdx_vm_init). The SEV, SNP
/// and TDX types arrived after 6.8; the model only needs what they change
/// here: the supported attributes, guest_memfd binding, address spaces and
/// read-only memslots.
pub fn x86_vm_type(vm_type: u64) -> Option<(bool, bool)> {
    Some(match vm_type {
        KVM_X86_DEFAULT_VM => (false, false),
        KVM_X86_SW_PROTECTED_VM => (true, false),
        KVM_X86_SEV_VM => (false, false),
        KVM_X86_SEV_ES_VM => (false, true),
        KVM_X86_SNP_VM => (true, true),
        KVM_X86_TDX_VM => (true, true),
        _ => return None,
    })
}

/// KVM_CHECK_EXTENSION on the system fd (`vm` None) or a VM fd, on
/// `host`, as a kernel of `semantics` answers it
/// (kvm_vm_ioctl_check_extension_generic, then x86's). Capabilities whose
/// case is compiled out, and unknown ones, answer 0.
pub fn check_extension(
    host: &HostProfile,
    semantics: Semantics,
    vm: Option<&KvmConfig>,
    cap: i64,
) -> u64 {
    let Ok(cap) = u32::try_from(cap) else {
        return 0;
    };
    let is_618 = semantics.after_6_8();
    let private_mem = vm.is_none_or(|c| c.has_private_mem);
    match cap {
        KVM_CAP_USER_MEMORY | KVM_CAP_USER_MEMORY2 | KVM_CAP_MEMORY_FAULT_INFO => 1,
        KVM_CAP_NR_MEMSLOTS => KVM_USER_MEM_SLOTS as u64,
        // Only built when KVM_MAX_NR_ADDRESS_SPACES > 1 (SMM).
        KVM_CAP_MULTI_ADDRESS_SPACE if host.smm => {
            vm.map_or(host.max_nr_address_spaces(), KvmConfig::nr_memslot_as_ids) as u64
        }
        KVM_CAP_READONLY_MEM => vm.is_none_or(KvmConfig::has_readonly_mem) as u64,
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 => KVM_DIRTY_LOG_MANUAL_CAPS,
        // v11 advertised the ioctls with the cap and reported the mask
        // through KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES.
        KVM_CAP_MEMORY_ATTRIBUTES if host.generic_memory_attributes => {
            if semantics == Semantics::V11 {
                1
            } else {
                // kvm_supported_mem_attributes(): NULL kvm included (with
                // the in-place series, 0 for a VM: PRIVATE lives in
                // guest_memfd).
                vm.map_or(
                    KVM_MEMORY_ATTRIBUTE_PRIVATE,
                    KvmConfig::supported_attributes,
                )
            }
        }
        // 6.8 only let VMs with private memory use guest_memfd; 6.18 lets
        // every VM (mmap-able guest_memfd as the VM's memory).
        KVM_CAP_GUEST_MEMFD if host.guest_memfd => (is_618 || private_mem) as u64,
        KVM_CAP_GUEST_MEMFD_FLAGS if host.guest_memfd && is_618 => {
            kvm_gmem_get_supported_flags(semantics, vm)
        }
        KVM_CAP_VM_TYPES => host.supported_vm_types(semantics),
        KVM_CAP_PRE_FAULT_MEMORY if is_618 => host.tdp as u64,
        // APIC_BUS_CYCLE_NS_DEFAULT.
        KVM_CAP_X86_APIC_BUS_CYCLES_NS if is_618 => 1,
        KVM_CAP_X86_GUEST_MODE if is_618 => 1,
        _ => 0,
    }
}

/// kvm_gmem_get_supported_flags() (6.18): every guest_memfd can be
/// mmap-able; starting shared is for VMs without private memory
/// (x86's kvm_arch_supports_gmem_init_shared()), or any VM when asked on
/// the system fd, or with the in-place series ("Enable INIT_SHARED on
/// guest_memfd for x86 CoCo VMs"). 6.8 has no flags.
pub fn kvm_gmem_get_supported_flags(semantics: Semantics, vm: Option<&KvmConfig>) -> u64 {
    if !semantics.after_6_8() {
        return 0;
    }
    let mut flags = GUEST_MEMFD_FLAG_MMAP;
    if semantics.is_gmem_inplace() || vm.is_none_or(|c| !c.has_private_mem) {
        flags |= GUEST_MEMFD_FLAG_INIT_SHARED;
    }
    flags
}

impl Kvm {
    /// KVM_CHECK_EXTENSION on the VM fd; its argument is a long, and
    /// unknown capabilities (negative ones too) answer 0.
    pub fn check_extension(&self, cap: i64) -> u64 {
        let c = &self.config;
        // The in-place conversion series' own capabilities (gmem_attributes.rs).
        if let Some(v) = u32::try_from(cap)
            .ok()
            .and_then(|c| self.gmem_inplace_check_extension(c))
        {
            return v;
        }
        check_extension(&c.host, c.semantics, Some(c), cap)
    }

    /// KVM_ENABLE_CAP on the VM fd: kvm_vm_ioctl_enable_cap_generic(), then
    /// x86's, which refuses what the model does not know with EINVAL.
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's args[0] is
    /// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, optionally with
    /// KVM_DIRTY_LOG_INITIALLY_SET; flags must be 0.
    pub fn enable_cap(&mut self, cap: u32, flags: u32, args: [u64; 4]) -> Result<(), KvmError> {
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 {
            let allowed = if args[0] & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0 {
                KVM_DIRTY_LOG_MANUAL_CAPS
            } else {
                KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            };
            if flags != 0 || args[0] & !allowed != 0 {
                return fail(
                    EINVAL,
                    format!(
                        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: flags {flags:#x} must be 0 and \
                         args[0] {:#x} within {allowed:#x}",
                        args[0]
                    ),
                );
            }
            self.manual_dirty_log_protect = args[0];
            return Ok(());
        }
        fail(
            EINVAL,
            format!("capability {cap} cannot be enabled on this VM"),
        )
    }
}
