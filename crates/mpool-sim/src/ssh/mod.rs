//! The simulator's SSH endpoints (one per running instance).
//!
//! Every simulated running instance of `mpool sim` is a real SSH server on `127.0.0.1`, so
//! that tests and the product can run commands in it and move files over SFTP exactly as
//! they do against a Multipass VM. The parts, one concept each:
//!
//! - `keys`: the key material, persisted under the simulator's data directory: the RSA
//!   client key whose verbatim text `ssh_info` hands out (the same key serves every
//!   instance, as with multipassd) and the Ed25519 host keys.
//! - `server`: one instance's server ([`SshServer`]): listening, public-key
//!   authentication for user `ubuntu` with the client key only, sessions, and which channel
//!   requests it grants; it hands each channel to `exec` or `sftp`.
//! - `exec`: runs an `exec` request as `sh -c CMD` in the instance's root directory through
//!   the instance's process supervisor (each command in its own process group, output
//!   streamed with channel flow control, signals and stdin forwarded, exit status or signal
//!   reported).
//! - `sftp`: serves the `sftp` subsystem confined to the instance's root directory.
//!
//! This file holds only what those parts share: the user name, the endpoint's context, the
//! tracker its tasks hold and its stop signal.
//!
//! Stopping an endpoint ([`SshServer::shutdown`]) closes its port, ends its sessions and
//! kills the process groups of the commands still running, and what finished commands left
//! running in the background, as a stopped VM would.
//!
//! Known difference from sshd: russh grants a client window as channel data arrives rather
//! than as the command consumes it, so a command's unread stdin is buffered in memory (up to
//! tens of MiB, see `exec::StdinFlow`) before the connection is throttled.

mod exec;
mod keys;
mod server;
mod sftp;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::vm_processes::VmSupervisor;

pub use keys::SshKeys;
pub(crate) use keys::instance_host_key;
pub use server::SshServer;

/// The only user name the endpoints accept.
const USER: &str = "ubuntu";

/// Held by every task of an endpoint; `shutdown` waits until all clones are dropped.
#[derive(Clone)]
struct Tracker {
    /// Dropped with the last clone, which ends `shutdown`'s wait.
    _alive: mpsc::Sender<()>,
}

/// What the sessions of one endpoint share.
struct Ctx {
    /// Canonical absolute path of the instance's root directory.
    root: PathBuf,
    keys: Arc<SshKeys>,
    /// Starts the commands; everything they start dies with the endpoint.
    processes: Arc<VmSupervisor>,
}

/// Resolves once shutdown is requested (or the endpoint is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
