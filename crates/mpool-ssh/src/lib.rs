//! SSH sessions to VMs: pooled connections, exec, SFTP.
//!
//! `multipass exec` opens a new SSH connection for every command. mpool instead keeps one
//! authenticated connection per VM for the whole lease ([`ConnectionCache`], keyed by the lease
//! id or VM name) and runs every command and transfer as a channel on it.
//!
//! - [`SshEndpoint`] is what multipassd's `ssh_info` returns: host, port, user and the private key
//!   text (OpenSSH or PEM; RSA signs with rsa-sha2-256/512, ed25519 works too). Host keys are
//!   accepted like Multipass does, then pinned per cache entry.
//! - [`ExecRequest`] describes a command: argv (every element quoted, nothing interpreted), a
//!   shell line, or a script fed to `bash -s`/`sh -s`; plus env, working directory, stdin and a
//!   timeout. [`ExecHandle`] streams [`ExecEvent`]s with back-pressure; cancel or timeout kills
//!   the remote process group (see [`exec`] for how).
//! - [`Connection::upload`] / [`Connection::download`] move files and trees over SFTP in
//!   fixed-size chunks, keeping modes, optionally confined to a base directory
//!   ([`TransferOptions`]).
//! - [`SshError`] says what failed and what to check.
//!
//! ```no_run
//! # async fn demo(target: mpool_ssh::SshEndpoint) -> Result<(), mpool_ssh::SshError> {
//! use mpool_ssh::{ConnectionCache, ExecRequest, SshOptions};
//! let cache = ConnectionCache::new(SshOptions::default());
//! let out = cache.run("lease-1", &target, ExecRequest::argv(["uname", "-a"])).await?;
//! out.check()?;
//! cache.close("lease-1").await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod cache;
mod connection;
mod error;
pub mod exec;
mod files;
pub mod port;
pub mod quote;
pub mod session;
mod signal;
mod stream;

pub use cache::ConnectionCache;
pub use connection::{Connection, SshEndpoint, SshOptions, parse_private_key};
pub use error::{Side, SshError};
pub use exec::{ExecCanceller, ExecEvent, ExecHandle, ExecOutput, ExecRequest, ScriptShell};
pub use files::{RemoteFs, RemoteReader, RemoteWriter, TransferOptions, TransferReport, resolve_remote_path};
pub use signal::{SIGNALS, sig_from_name, signal_name, signal_name_of, signal_number};
