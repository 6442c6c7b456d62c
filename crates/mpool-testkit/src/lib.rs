//! What mpool's integration tests and benchmarks start, in one place:
//!
//! - [`Stack`]: `mpool sim` in-process plus `mpool serve` in-process, as a child process, or
//!   not at all, with the API on a Unix socket and on TCP (TLS + token), `/metrics`, the
//!   HTTP/JSON facade, and clients ([`StackOptions::tests`], [`StackOptions::bench`]);
//! - [`TestSim`]: the simulator alone on a temporary directory, [`wait_event`] for its events;
//!   [`SimProcess`]: `mpool sim` as a process, with `mpool multipass` clients;
//! - [`Sshd`]: a real OpenSSH server on loopback;
//! - [`api`]: acquire, exec and release through the API; [`http`]: the facade over TLS;
//! - [`free_port`] and deadline polling ([`eventually`], [`wait`]);
//! - with feature `tests` (test code, it panics): `suite`, the SSH exec and transfer suite any
//!   endpoint must pass, and `tools`, the external clients (`grpcurl`, Python) tests drive.
//!
//! Only tests, benchmarks and the `mpool bench` command depend on this crate.

pub mod api;
mod error;
pub mod http;
mod poll;
mod sim;
pub mod sshd;
mod stack;
#[cfg(feature = "tests")]
pub mod suite;
#[cfg(feature = "tests")]
pub mod tools;

pub use error::{Error, Result};
pub use poll::{Check, DEFAULT_EVERY, Wait, eventually, wait};
pub use sim::{SimProcess, TestSim, is, multipass_command, wait_event};
pub use sshd::{Sshd, SshdOptions};
pub use stack::{Serve, Stack, StackOptions, StoreAt, Transport, count, pool, settled};

/// A free loopback TCP port (bound, then released: another process can take it before the
/// caller binds it, so callers that can retry do).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
