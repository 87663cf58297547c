//! Cache prefetch hints: the one place the model asks the CPU for memory
//! ahead of reading it.
//!
//! At a 1 TiB guest the range tree's leaves and the page table's entries
//! are far larger than L2, so an operation's first touch of each costs a
//! miss, and the misses of a descent come one after another because each
//! address depends on the load before it. A hint lets them overlap: with
//! each other (every line of a node's keys at once) or with the work of the
//! operation before (the native replay asks for the next operation's
//! memory while it runs the current one). A hint never faults and never
//! changes a result; on other architectures it does nothing.

/// Whether hinting ahead pays for structures of `bytes` bytes in all: only
/// once they outgrow a typical core's L2 (2 MiB). Below that their lines
/// are mostly cached already and the hint's own work is pure cost:
/// measured side by side, hinting the next operation made a 16 GiB
/// boot-and-churn replay slower and a 1 TiB one faster.
#[inline]
pub fn pays(bytes: usize) -> bool {
    bytes >= 2 << 20
}

/// How many operations a batch runs between two checks of [`pays`].
pub const RECHECK: usize = 4096;

/// Asks for every cache line of `bytes` bytes from `p`.
#[inline(always)]
pub fn prefetch_bytes<T>(p: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = p as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is a hint that never faults, whatever the
            // address; wrapping_add keeps the pointer arithmetic defined.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off)) };
            off += 64;
        }
        if bytes > 0 {
            // The last line, when `p` is not line aligned.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(bytes - 1)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// Asks for the cache lines of `*r`.
#[inline(always)]
pub fn prefetch<T>(r: &T) {
    prefetch_bytes(r as *const T, std::mem::size_of::<T>());
}
