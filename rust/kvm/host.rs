//! The host a VM runs on: what KVM was built with and what the CPU offers.
//! Every answer that depends on the host (capabilities, the VM types
//! KVM_CREATE_VM accepts, ioctls compiled out, address spaces) is computed
//! from a [`HostProfile`] here or in the rules that read it; the Python
//! side only carries the data (`memattr.HostProfile`) and probes it.

use super::*;

/// The CPU vendor: which of the confidential VM types can exist at all
/// (SEV types need AMD's SVM, TDX needs Intel's VMX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    Intel,
    Amd,
    /// Anything else (other vendors, or a host where it is unknown).
    Other,
}

impl CpuVendor {
    pub fn name(self) -> &'static str {
        match self {
            CpuVendor::Intel => "intel",
            CpuVendor::Amd => "amd",
            CpuVendor::Other => "other",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "intel" => CpuVendor::Intel,
            "amd" => CpuVendor::Amd,
            "other" => CpuVendor::Other,
            _ => return None,
        })
    }
}

/// What a host's KVM was built with and runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostProfile {
    pub vendor: CpuVendor,
    /// kvm_caps.supported_vm_types: a bit per type KVM_CREATE_VM accepts.
    pub vm_types: u64,
    /// CONFIG_KVM_SW_PROTECTED_VM.
    pub sw_protected_vm: bool,
    /// CONFIG_KVM_SMM: two address spaces (normal and SMM) for VMs
    /// without private memory; without it every VM has one.
    pub smm: bool,
    /// CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES: KVM_SET_MEMORY_ATTRIBUTES and
    /// KVM_CAP_MEMORY_ATTRIBUTES exist.
    pub generic_memory_attributes: bool,
    /// CONFIG_KVM_GUEST_MEMFD (6.8: CONFIG_KVM_PRIVATE_MEM):
    /// KVM_CREATE_GUEST_MEMFD and KVM_CAP_GUEST_MEMFD exist.
    pub guest_memfd: bool,
    /// tdp_enabled: two-dimensional paging (EPT/NPT) in use. Shadow-paging
    /// hosts (npt=0/ept=0, PVM) cannot offer SW_PROTECTED_VM or pre-faults.
    pub tdp: bool,
    /// The largest page the host maps guest memory with: 1 = 4K, 2 = 2M,
    /// 3 = 1G (PG_LEVEL_1G needs the CPU's 1G pages, pdpe1gb).
    pub max_page_level: u8,
    /// Bits of user virtual address: 47 with 4-level paging, 56 with LA57.
    /// access_ok() accepts ranges ending at or below TASK_SIZE_MAX.
    pub user_address_bits: u8,
    /// kvm_host.maxphyaddr: the CPU's physical address width as CPUID
    /// 0x80000008 reports it (not /proc/cpuinfo's, which SME and MKTME
    /// reduce). With TDP it bounds the gfns a memslot may hold
    /// ([`HostProfile::kvm_mmu_max_gfn`]).
    pub maxphyaddr: u8,
}

impl Default for HostProfile {
    /// The default host, a real configuration: openSUSE Tumbleweed's
    /// kernel-default (CONFIG_KVM_AMD_SEV=y, CONFIG_KVM_SW_PROTECTED_VM=y,
    /// CONFIG_KVM_SMM=y, hence generic memory attributes and guest_memfd)
    /// at Linux 6.18 on an AMD EPYC 9004 (Genoa) with SEV-SNP enabled, NPT
    /// on, 1G pages and 5-level paging (Zen 4 has LA57 and the distribution
    /// kernel has X86_5LEVEL=y, so TASK_SIZE_MAX is 2^56 - 4096: a VMM can
    /// map guests beyond 4-level paging's 128 TiB of user space), with 52
    /// bits of physical address: VM types
    /// default, SW_PROTECTED, SEV, SEV-ES and SNP.
    fn default() -> Self {
        Self {
            vendor: CpuVendor::Amd,
            vm_types: (1 << KVM_X86_DEFAULT_VM)
                | (1 << KVM_X86_SW_PROTECTED_VM)
                | (1 << KVM_X86_SEV_VM)
                | (1 << KVM_X86_SEV_ES_VM)
                | (1 << KVM_X86_SNP_VM),
            sw_protected_vm: true,
            smm: true,
            generic_memory_attributes: true,
            guest_memfd: true,
            tdp: true,
            max_page_level: crate::hugepage::PG_LEVEL_1G,
            user_address_bits: 56,
            // Zen 4's CPUID 0x80000008 reports 52 physical address bits.
            maxphyaddr: 52,
        }
    }
}

/// The types that carry private memory need generic memory attributes
/// (their Kconfig options select KVM_GENERIC_MEMORY_ATTRIBUTES).
const PRIVATE_MEM_TYPES: u64 =
    (1 << KVM_X86_SW_PROTECTED_VM) | (1 << KVM_X86_SNP_VM) | (1 << KVM_X86_TDX_VM);
/// x86's narrowest and widest physical address (MAXPHYADDR): 36 bits since
/// PAE, 52 architecturally.
const MIN_MAXPHYADDR: u8 = 36;
const MAX_MAXPHYADDR: u8 = 52;
const AMD_TYPES: u64 = (1 << KVM_X86_SEV_VM) | (1 << KVM_X86_SEV_ES_VM) | (1 << KVM_X86_SNP_VM);

impl HostProfile {
    /// Refuses a profile no real host can have, naming why.
    pub fn validate(&self) -> Result<(), KvmError> {
        let bad = |why: String| Err(KvmError::Argument(format!("host profile: {why}")));
        let t = self.vm_types;
        if t & (1 << KVM_X86_DEFAULT_VM) == 0 {
            return bad("vm_types must include KVM_X86_DEFAULT_VM (every x86 host has it)".into());
        }
        if let Some(unknown) =
            (0..64).find(|&b| t & (1 << b) != 0 && caps::x86_vm_type(b).is_none())
        {
            return bad(format!("vm_types has bit {unknown}, no x86 VM type"));
        }
        if t & (1 << KVM_X86_SW_PROTECTED_VM) != 0 && !(self.sw_protected_vm && self.tdp) {
            return bad(
                "KVM_X86_SW_PROTECTED_VM needs sw_protected_vm (CONFIG_KVM_SW_PROTECTED_VM) and tdp"
                    .into(),
            );
        }
        if t & AMD_TYPES != 0 && self.vendor != CpuVendor::Amd {
            return bad("the SEV VM types need an AMD CPU".into());
        }
        if t & (1 << KVM_X86_TDX_VM) != 0 && self.vendor != CpuVendor::Intel {
            return bad("KVM_X86_TDX_VM needs an Intel CPU".into());
        }
        if t & PRIVATE_MEM_TYPES != 0 && !(self.generic_memory_attributes && self.guest_memfd) {
            return bad(
                "VM types with private memory need generic_memory_attributes and guest_memfd"
                    .into(),
            );
        }
        if !(1..=3).contains(&self.max_page_level) {
            return bad(format!(
                "max_page_level must be 1, 2 or 3, got {}",
                self.max_page_level
            ));
        }
        if self.user_address_bits != 47 && self.user_address_bits != 56 {
            return bad(format!(
                "user_address_bits must be 47 or 56, got {}",
                self.user_address_bits
            ));
        }
        if !(MIN_MAXPHYADDR..=MAX_MAXPHYADDR).contains(&self.maxphyaddr) {
            return bad(format!(
                "maxphyaddr must be {MIN_MAXPHYADDR} to {MAX_MAXPHYADDR} (x86's physical address widths), got {}",
                self.maxphyaddr
            ));
        }
        Ok(())
    }

    /// kvm_mmu_max_gfn() (arch/x86/kvm/mmu.h): the last gfn a memslot may
    /// hold. With TDP it is the host's MAXPHYADDR, since EPT/NPT cannot map
    /// a gpa beyond it; shadow paging walks the guest's own tables and
    /// takes any gfn below x86's architectural 52 bits.
    pub fn kvm_mmu_max_gfn(&self) -> u64 {
        let max_gpa_bits = if self.tdp {
            self.maxphyaddr
        } else {
            MAX_MAXPHYADDR
        };
        (1u64 << (u32::from(max_gpa_bits) - PAGE_SHIFT)) - 1
    }

    /// kvm_caps.supported_vm_types as a kernel of `semantics` reports it:
    /// 6.8 knew only the default and SW_PROTECTED types.
    pub fn supported_vm_types(&self, semantics: Semantics) -> u64 {
        match semantics {
            Semantics::Linux618 | Semantics::GmemInplace | Semantics::GmemInplaceV5 => {
                self.vm_types
            }
            Semantics::Linux68 | Semantics::V11 => {
                self.vm_types & ((1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SW_PROTECTED_VM))
            }
        }
    }

    /// KVM_MAX_NR_ADDRESS_SPACES as built: 2 with SMM, else 1.
    pub fn max_nr_address_spaces(&self) -> usize {
        if self.smm {
            KVM_MAX_NR_ADDRESS_SPACES
        } else {
            1
        }
    }

    /// TASK_SIZE_MAX: the highest end of a user range access_ok() takes.
    pub fn task_size_max(&self) -> u64 {
        (1u64 << self.user_address_bits) - PAGE_SIZE
    }
}
