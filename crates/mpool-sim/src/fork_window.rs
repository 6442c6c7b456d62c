//! Forks without exec and the files the simulator writes for its clients.
//!
//! A child forked without exec (a VM's process supervisor, see [`crate::vm_processes`]) starts
//! with a copy of every descriptor the simulator has open, close-on-exec or not, and keeps it
//! until it closes it. A file the SFTP server wrote stays open for writing while any process
//! holds such a copy, and Linux refuses to run a file open for writing (`ETXTBSY`): a client
//! that uploads a program, closes it and runs it would fail at random when a supervisor
//! forked while the file was open and had not yet closed its copy.
//!
//! So a fork holds the fork window ([`ForkWindow`], the write side of one process-wide lock)
//! from before the fork until the child has closed every descriptor it inherited, and the
//! SFTP server, having closed a file it wrote, waits for the window in progress
//! ([`wait_for_forks`], the read side) before it reports the file closed. A fork that began
//! after the close cannot have inherited the file; one that began before holds the window
//! until its copy is gone. The lock is held only around forks and for a moment after a
//! close, never while a file is open: a long upload does not delay VM starts.

use std::sync::{PoisonError, RwLock, RwLockWriteGuard};

/// Write side: a fork in progress; read side: a close waiting for it.
static FORKS: RwLock<()> = RwLock::new(());

/// A fork in progress whose child may still hold descriptors it inherited. While one is held,
/// [`wait_for_forks`] waits.
#[must_use = "the window closes when dropped"]
pub(crate) struct ForkWindow {
    _forking: RwLockWriteGuard<'static, ()>,
}

impl ForkWindow {
    /// Opens the window (waiting for another fork's to close). Take it before the fork and
    /// drop it once the child has closed what it inherited (or is gone).
    pub(crate) fn open() -> ForkWindow {
        // The lock guards no data: a panic while it was held leaves nothing inconsistent.
        ForkWindow { _forking: FORKS.write().unwrap_or_else(PoisonError::into_inner) }
    }
}

/// Returns once no child forked before the call still holds a descriptor it inherited. Call
/// it after closing a file written for a client and before telling the client so (blocks for
/// as long as a fork's window stays open, normally well under a millisecond).
pub(crate) fn wait_for_forks() {
    drop(FORKS.read().unwrap_or_else(PoisonError::into_inner));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};

    /// The state letter of one of our threads (`S`: sleeping, e.g. waiting for a lock).
    fn thread_state(tid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
    }

    #[test]
    fn a_close_waits_for_the_fork_in_progress() {
        let window = ForkWindow::open();
        let closed = Arc::new(AtomicBool::new(false));
        let (tid_tx, tid_rx) = mpsc::channel();
        let waiter = {
            let closed = closed.clone();
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                wait_for_forks();
                closed.load(Ordering::SeqCst)
            })
        };
        let tid = tid_rx.recv().expect("the waiter's thread id");
        // Until the waiter blocks on the lock (or has returned, which the assertion catches).
        while !waiter.is_finished() && thread_state(tid) != Some('S') {
            std::thread::yield_now();
        }
        closed.store(true, Ordering::SeqCst);
        drop(window);
        assert!(waiter.join().expect("the waiter"), "wait_for_forks returned while a fork window was open");
    }

    #[test]
    fn without_a_fork_nothing_waits() {
        wait_for_forks();
        drop(ForkWindow::open());
        wait_for_forks();
    }
}
