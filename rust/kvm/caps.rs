//! VM types, KVM_CHECK_EXTENSION and KVM_ENABLE_CAP (x86, Linux 6.8).

use super::*;

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

/// KVM_CAP_VM_TYPES: a bit per type x86_vm_type() knows.
fn supported_vm_types() -> u64 {
    (0..64)
        .filter(|&t| x86_vm_type(t).is_some())
        .map(|t| 1 << t)
        .sum()
}

impl Kvm {
    /// KVM_CHECK_EXTENSION on the VM fd; its argument is a long, and
    /// unknown capabilities (negative ones too) answer 0.
    pub fn check_extension(&self, cap: i64) -> u64 {
        let Ok(cap) = u32::try_from(cap) else {
            return 0;
        };
        let c = &self.config;
        match cap {
            // The in-place conversion series' capabilities (gmem_attributes.rs).
            cap if self.gmem_inplace_check_extension(cap).is_some() => {
                self.gmem_inplace_check_extension(cap).unwrap_or(0)
            }
            // v11 advertised the ioctls with the cap and reported the mask
            // through KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES.
            KVM_CAP_MEMORY_ATTRIBUTES if c.semantics == Semantics::V11 => 1,
            KVM_CAP_MEMORY_ATTRIBUTES => c.supported_attributes(),
            KVM_CAP_GUEST_MEMFD => c.has_private_mem as u64,
            KVM_CAP_USER_MEMORY | KVM_CAP_USER_MEMORY2 | KVM_CAP_MEMORY_FAULT_INFO => 1,
            KVM_CAP_NR_MEMSLOTS => KVM_USER_MEM_SLOTS as u64,
            KVM_CAP_MULTI_ADDRESS_SPACE => c.nr_memslot_as_ids() as u64,
            KVM_CAP_READONLY_MEM => c.has_readonly_mem() as u64,
            KVM_CAP_VM_TYPES => supported_vm_types(),
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 => KVM_DIRTY_LOG_MANUAL_CAPS,
            _ => 0,
        }
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
