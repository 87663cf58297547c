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

use std::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Condvar, Mutex, MutexGuard};

thread_local! {
    // A nonzero token per thread (0 means "free"), cheaper to compare than
    // thread::current(), which clones an Arc each time.
    static ME: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, SeqCst)
    };
}

fn me() -> u64 {
    ME.with(|id| *id)
}

/// A non-recursive lock that knows which thread holds it.
///
/// The uncontended path is one compare-and-swap to take it and one store to
/// drop it (a whole native ioctl takes two of these locks per call, so they
/// are on the hot path); the mutex and condition variable are only for
/// threads that must wait.
#[derive(Debug)]
pub struct ModelLock {
    name: &'static str,
    /// The holder's thread token, 0 when free.
    owner: AtomicU64,
    /// The caller's own name for the holder (Python's
    /// `threading.get_ident()`), for messages; written just after `owner`,
    /// so a racing reader may see the previous holder's.
    ident: AtomicU64,
    /// Threads blocked in acquire(): a release only wakes someone (a
    /// syscall) if there is someone to wake.
    waiters: AtomicUsize,
    sleep: Mutex<()>,
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
            owner: AtomicU64::new(0),
            ident: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            released: Condvar::new(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn sleep_lock(&self) -> MutexGuard<'_, ()> {
        // Guards no data: a panic elsewhere cannot leave it inconsistent.
        self.sleep.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the lock if it is free; false if another thread holds it.
    pub fn try_acquire(&self, ident: u64) -> Result<bool, LockError> {
        let me = me();
        match self.owner.compare_exchange(0, me, SeqCst, SeqCst) {
            Ok(_) => {
                // Only for messages (see the field): a plain store, where a
                // SeqCst one would be a second locked instruction on the
                // hot path of every native ioctl.
                self.ident.store(ident, Relaxed);
                Ok(true)
            }
            Err(o) if o == me => Err(LockError::Recursive(self.name)),
            Err(_) => Ok(false),
        }
    }

    /// Takes the lock, waiting for its holder to release it. The caller
    /// must not hold anything the holder may need (with Python: the GIL).
    pub fn acquire(&self, ident: u64) -> Result<(), LockError> {
        loop {
            if self.try_acquire(ident)? {
                return Ok(());
            }
            // Announce the wait before looking at the owner again, both
            // under the sleep mutex: a release that stores 0 after our look
            // then sees the waiter and notifies, and its notify cannot come
            // before our wait (it needs the mutex we hold until wait()).
            let mut g = self.sleep_lock();
            self.waiters.fetch_add(1, SeqCst);
            while self.owner.load(SeqCst) != 0 {
                g = self.released.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            self.waiters.fetch_sub(1, SeqCst);
        }
    }

    pub fn release(&self) -> Result<(), LockError> {
        let me = me();
        if self.owner.load(SeqCst) != me {
            return Err(LockError::NotOwner(self.name, self.owner_ident()));
        }
        self.owner.store(0, SeqCst);
        if self.waiters.load(SeqCst) > 0 {
            drop(self.sleep_lock());
            self.released.notify_all();
        }
        Ok(())
    }

    pub fn held_by_current_thread(&self) -> bool {
        self.owner.load(SeqCst) == me()
    }

    pub fn locked(&self) -> bool {
        self.owner.load(SeqCst) != 0
    }

    /// The holder's ident, if any.
    pub fn owner_ident(&self) -> Option<u64> {
        (self.owner.load(SeqCst) != 0).then(|| self.ident.load(Relaxed))
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
    use std::thread;

    /// Mutual exclusion under contention, with waiters sleeping and being
    /// woken: a read-modify-write split by a yield loses no update.
    #[test]
    fn contended_lock_excludes_and_wakes() {
        let l = Arc::new(ModelLock::new("slots_lock"));
        let count = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (l, count) = (Arc::clone(&l), Arc::clone(&count));
                thread::spawn(move || {
                    for _ in 0..2000 {
                        l.acquire(t).unwrap();
                        let v = count.load(SeqCst);
                        thread::yield_now();
                        count.store(v + 1, SeqCst);
                        l.release().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(count.load(SeqCst), 8000);
        assert!(!l.locked());
    }

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
