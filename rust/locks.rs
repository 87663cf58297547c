//! The VM's modelled locks (`kvm->slots_lock`, `kvm->mmu_lock`) as real
//! locks that both drivers take: the Python driver (which adds lockdep's
//! checks: recursion, order, "must be held") and the native operations that
//! run a whole ioctl or a replay batch in Rust.
//!
//! ```text
//!   Python driver  ── acquire(ident) ──►  ┌─────────────┐
//!                                         │ ModelLock   │  owner: thread + ident
//!   native op      ── acquire(ident) ──►  └─────────────┘  waiters: Condvar
//! ```
//!
//! A `ModelLock` is never held by Rust across a call into Python: a native
//! operation takes it, runs, and drops it before returning, and the Python
//! driver holds it only between its own calls into the core. Who owns the
//! lock is recorded so that a native operation can refuse, instead of
//! deadlocking, when the calling thread already holds it (the Python side
//! then reports the lockdep splat).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::{self, ThreadId};

thread_local! {
    // thread::current() clones an Arc each time; the id alone is enough.
    static ME: ThreadId = thread::current().id();
}

fn me() -> ThreadId {
    ME.with(|id| *id)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    owner: Option<Owner>,
    /// Threads blocked in acquire(): a release only wakes someone (a
    /// syscall) if there is someone to wake.
    waiters: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    thread: ThreadId,
    /// The caller's own name for the thread (Python's `threading.get_ident()`),
    /// for messages.
    ident: u64,
}

/// A non-recursive lock that knows which thread holds it.
#[derive(Debug)]
pub struct ModelLock {
    name: &'static str,
    state: Mutex<State>,
    released: Condvar,
}

/// Why a lock operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockError {
    /// This thread already holds the lock (a real kernel deadlocks here).
    Recursive(&'static str),
    /// Releasing a lock this thread does not hold; the holder's ident.
    NotOwner(&'static str, Option<u64>),
}

impl ModelLock {
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            state: Mutex::new(State {
                owner: None,
                waiters: 0,
            }),
            released: Condvar::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Only plain data lives under the mutex: a panic elsewhere cannot
        // leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the lock if it is free; false if another thread holds it.
    pub fn try_acquire(&self, ident: u64) -> Result<bool, LockError> {
        let me = me();
        let mut st = self.state();
        match st.owner {
            Some(o) if o.thread == me => Err(LockError::Recursive(self.name)),
            Some(_) => Ok(false),
            None => {
                st.owner = Some(Owner { thread: me, ident });
                Ok(true)
            }
        }
    }

    /// Takes the lock, waiting for its holder to release it. The caller
    /// must not hold anything the holder may need (with Python: the GIL).
    pub fn acquire(&self, ident: u64) -> Result<(), LockError> {
        let me = me();
        let mut st = self.state();
        loop {
            match st.owner {
                Some(o) if o.thread == me => return Err(LockError::Recursive(self.name)),
                Some(_) => {
                    st.waiters += 1;
                    st = self.released.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.waiters -= 1;
                }
                None => {
                    st.owner = Some(Owner { thread: me, ident });
                    return Ok(());
                }
            }
        }
    }

    pub fn release(&self) -> Result<(), LockError> {
        let me = me();
        let mut st = self.state();
        match st.owner {
            Some(o) if o.thread == me => {
                st.owner = None;
                let wake = st.waiters > 0;
                drop(st);
                if wake {
                    self.released.notify_one();
                }
                Ok(())
            }
            other => Err(LockError::NotOwner(self.name, other.map(|o| o.ident))),
        }
    }

    pub fn held_by_current_thread(&self) -> bool {
        matches!(self.state().owner, Some(o) if o.thread == me())
    }

    pub fn locked(&self) -> bool {
        self.state().owner.is_some()
    }

    /// The holder's ident, if any.
    pub fn owner_ident(&self) -> Option<u64> {
        self.state().owner.map(|o| o.ident)
    }
}

/// Holds a [`ModelLock`] until dropped.
pub struct ModelLockGuard<'a>(&'a ModelLock);

impl<'a> ModelLockGuard<'a> {
    /// Wraps a lock the caller has just acquired.
    pub fn adopt(lock: &'a ModelLock) -> Self {
        Self(lock)
    }
}

impl Drop for ModelLockGuard<'_> {
    fn drop(&mut self) {
        // Acquired by this thread in `adopt`'s caller: cannot fail.
        let _ = self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn recursion_is_refused_and_others_wait() {
        let l = Arc::new(ModelLock::new("mmu_lock"));
        l.acquire(1).unwrap();
        assert_eq!(l.acquire(1), Err(LockError::Recursive("mmu_lock")));
        assert!(l.held_by_current_thread());
        let l2 = Arc::clone(&l);
        let t = thread::spawn(move || {
            assert!(!l2.held_by_current_thread());
            assert_eq!(l2.try_acquire(2), Ok(false));
            assert!(matches!(l2.release(), Err(LockError::NotOwner(_, Some(1)))));
            l2.acquire(2).unwrap();
            l2.release().unwrap();
        });
        thread::sleep(std::time::Duration::from_millis(20));
        l.release().unwrap();
        t.join().unwrap();
        assert!(!l.locked());
        assert_eq!(l.owner_ident(), None);
    }
}
