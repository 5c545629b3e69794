//! Containment: a bug that panics while one connection's bytes are parsed must cost that
//! connection, never the agent (every app on the node would lose every metric until
//! something restarted it).
//!
//! [`contain`] runs a step under `catch_unwind`; the release profile keeps unwinding
//! (`panic = "unwind"` in the workspace's Cargo.toml) for this to work. [`install_hook`]
//! replaces the panic message of a contained panic, which can quote the bytes being
//! parsed (a `str` slicing panic prints the string), by nothing: the caller logs the
//! fault's location and what it was parsing, never the payload. Panics outside a
//! contained step keep the default report.

use std::{
    cell::{Cell, RefCell},
    panic::{self, AssertUnwindSafe},
    sync::{Mutex, MutexGuard, Once, PoisonError},
};

// Without unwinding a panic aborts the process and containment is void.
#[cfg(panic = "abort")]
compile_error!("observer must be built with panic = \"unwind\": fault containment catches parser panics");

thread_local! {
    /// Inside a contained step on this thread.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
    /// Where the last contained panic on this thread happened (file:line, no message).
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A contained panic: where it happened, never what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `file:line` of the panic, when the hook saw it.
    pub location: Option<String>,
}

/// Runs `f`; a panic inside it is caught and returned as a [`Fault`]. State `f` touched
/// may be half-updated: the caller must drop it (that is what makes this sound in
/// practice, whatever `AssertUnwindSafe` lets through).
pub fn contain<R>(f: impl FnOnce() -> R) -> Result<R, Fault> {
    let outer = CONTAINED.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(outer));
    result.map_err(|_| Fault { location: LOCATION.with(|l| l.borrow_mut().take()) })
}

/// Installs (once per process) a panic hook that keeps contained panics quiet, noting
/// only their location, and reports every other panic as before.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CONTAINED.with(Cell::get) {
                let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
                LOCATION.with(|l| *l.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// Locks a mutex whatever a contained panic left behind: the values shared here
/// (registries, counters) stay usable, and a poisoned lock must not turn into a silent
/// stop of /metrics.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_contained_with_its_location_and_the_thread_goes_on() {
        install_hook();
        let secret = String::from("aaaé");
        let r = contain(|| secret[..4].len());
        let fault = r.expect_err("slicing inside 'é' panics");
        let at = fault.location.expect("the hook saw the location");
        assert!(at.starts_with(file!()), "{at}");
        assert_eq!(contain(|| 7), Ok(7));
        // Nested: the inner fault is the inner caller's; the outer step goes on.
        let outer = contain(|| contain(|| panic!("inner")).is_err());
        assert_eq!(outer, Ok(true));
    }

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = Mutex::new(1);
        let _ = contain(|| {
            let _g = m.lock();
            panic!("while holding it");
        });
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
