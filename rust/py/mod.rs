//! The PyO3 binding layer: adapts types and errors, nothing else. Every
//! submodule registers its classes and functions here.

use pyo3::prelude::*;

mod args;
mod gmem;
mod hugepage;
mod kvm;
mod stores;

/// Runs `f` with the GIL released and Ctrl-C honoured: `f` runs on a
/// scoped worker thread with a cancellation flag (`crate::interrupt`), while
/// this thread waits in slices and runs the signal handlers between them.
/// When a handler raises (KeyboardInterrupt), the flag tells the worker to
/// undo and stop, and the handler's exception is returned once it has.
/// The worker never takes the GIL, so a store lock it holds cannot deadlock
/// with a thread that holds the GIL and waits for that lock.
pub(crate) fn detach_interruptible<R: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> R + Send,
) -> PyResult<R> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    let flag = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<()>();
    let rx = std::sync::Mutex::new(rx);
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let r = crate::interrupt::with_token(&flag, f);
            let _ = tx.send(());
            r
        });
        let mut signal: Option<PyErr> = None;
        loop {
            let done = py.detach(|| {
                rx.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .recv_timeout(Duration::from_millis(50))
            });
            if !matches!(done, Err(mpsc::RecvTimeoutError::Timeout)) {
                break;
            }
            if signal.is_none() {
                if let Err(e) = py.check_signals() {
                    flag.store(true, Ordering::Relaxed);
                    signal = Some(e);
                }
            }
        }
        let r = match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match signal {
            // The call either undid its work or had finished: either way
            // the state is whole, and the signal's exception goes up.
            Some(e) => Err(e),
            None => Ok(r),
        }
    })
}

/// The instructions this build assumes (`.cargo/config.toml`) that the CPU
/// may lack: checked when the module loads, before any of them runs, so a
/// CPU without them gets an ImportError saying how to rebuild instead of a
/// SIGILL half way through a call.
fn check_cpu_features() -> PyResult<()> {
    #[cfg(all(target_arch = "x86_64", target_feature = "popcnt"))]
    if !std::arch::is_x86_feature_detected!("popcnt") {
        return Err(pyo3::exceptions::PyImportError::new_err(
            "memattr's core was built for CPUs with POPCNT (.cargo/config.toml), \
             and this CPU has none: rebuild it with RUSTFLAGS=\"\" pip install .",
        ));
    }
    Ok(())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    check_cpu_features()?;
    stores::register(m)?;
    hugepage::register(m)?;
    kvm::register(m)?;
    gmem::register(m)?;
    Ok(())
}
