//! Where a one-shot process (`mpool multipass ...`) spends its time before its first byte on
//! the daemon's socket: with `MPOOL_STARTUP_TRACE=1`, each phase prints one line to stderr,
//! `mpool-startup PHASE NANOS`, NANOS being `CLOCK_MONOTONIC` (comparable across processes,
//! so `mpool bench daemon-calls` can subtract its own clock at spawn). Off, a mark costs one
//! relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0 unknown, 1 off, 2 on.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// The environment variable that turns the marks on.
pub const STARTUP_TRACE_ENV: &str = "MPOOL_STARTUP_TRACE";

fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var_os(STARTUP_TRACE_ENV).is_some_and(|v| v == "1");
            ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u128) * 1_000_000_000 + ts.tv_nsec as u128
}

/// Records that the process reached `phase` (when tracing is on).
pub fn mark(phase: &'static str) {
    if enabled() {
        eprintln!("mpool-startup {phase} {}", monotonic_ns());
    }
}
