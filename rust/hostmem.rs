//! The checked estimate behind every allocation whose size the input
//! decides: before asking the allocator, the size is compared with what the
//! host could ever back (RAM plus swap, the kernel's own heuristic
//! overcommit bound). With `vm.overcommit_memory = 1` the allocator would
//! say yes to any size and the process would die on first touch instead;
//! this check keeps the answer an error in every mode.

use std::sync::OnceLock;

/// RAM + swap in bytes, from /proc/meminfo; None where it cannot be read
/// (then only the fallible allocation guards).
pub fn backable_bytes() -> Option<u64> {
    static BYTES: OnceLock<Option<u64>> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let kb: u64 = line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            kb.checked_mul(1024)
        };
        Some(field("MemTotal:")?.saturating_add(field("SwapTotal:").unwrap_or(0)))
    })
}

/// False if `bytes` more could never be backed on this host.
pub fn could_back(bytes: u64) -> bool {
    backable_bytes().is_none_or(|limit| bytes <= limit)
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::backable_bytes().unwrap() > 1 << 20);
            assert!(!super::could_back(u64::MAX));
            assert!(super::could_back(4096));
        }
    }
}
