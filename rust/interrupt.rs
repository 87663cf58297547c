//! Cooperative cancellation of long native loops (Ctrl-C).
//!
//! The core never touches Python, so it cannot run signal handlers itself.
//! Instead a caller that wants a long loop to be interruptible lends it a
//! flag for the duration of the call ([`with_token`]); the loops poll
//! [`pending`] at chunk boundaries and, when it is set, undo what they did
//! and return their `Interrupted` error. The Python binding runs such calls
//! on a worker thread and sets the flag when `PyErr_CheckSignals` reports a
//! signal on the waiting thread, so the worker never needs the GIL (it may
//! hold a store lock that a GIL holder is waiting for).
//!
//! Steps that must not stop part way (a store after its reservation, a
//! rollback) run [`masked`].

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    static TOKEN: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
}

/// Loops poll [`pending`] once every this many steps.
pub const CHECK_EVERY: u64 = 1 << 14;

/// Restores the previous token when dropped (also on unwinding).
struct Restore(*const AtomicBool);

impl Drop for Restore {
    fn drop(&mut self) {
        TOKEN.with(|t| t.set(self.0));
    }
}

/// Runs `f` with `flag` as this thread's cancellation flag.
pub fn with_token<R>(flag: &AtomicBool, f: impl FnOnce() -> R) -> R {
    let _restore = Restore(TOKEN.with(|t| t.replace(flag as *const AtomicBool)));
    f()
}

/// Runs `f` with no cancellation flag: [`pending`] is false inside.
pub fn masked<R>(f: impl FnOnce() -> R) -> R {
    let _restore = Restore(TOKEN.with(|t| t.replace(std::ptr::null())));
    f()
}

/// True if the current call runs with a cancellation flag (so a loop that
/// must prepare an undo only pays for it when it can be stopped).
pub fn armed() -> bool {
    TOKEN.with(|t| !t.get().is_null())
}

/// True if the caller asked the current call to stop.
#[inline]
pub fn pending() -> bool {
    TOKEN.with(|t| {
        let p = t.get();
        // The pointer is only set by `with_token`, whose borrow outlives
        // the call, and reset when it returns.
        !p.is_null() && unsafe { &*p }.load(Ordering::Relaxed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_scoped_and_masked() {
        let flag = AtomicBool::new(true);
        assert!(!pending());
        with_token(&flag, || {
            assert!(pending());
            masked(|| assert!(!pending()));
            assert!(pending());
        });
        assert!(!pending());
    }
}
