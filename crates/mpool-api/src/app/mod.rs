//! The application layer: the API's use cases, once, under every transport. gRPC
//! ([`crate::service`]) and HTTP/JSON ([`crate::json`]) only decode a request, authenticate the
//! caller, call a use case here and encode what it returns; so validation, auth scopes,
//! idempotent request ids, caps, metrics and error messages are the same whichever way a caller
//! comes in.
//!
//! - leases: [`App::acquire`], [`App::renew`], [`App::release`], [`App::list_leases`] (`leases`;
//!   a lease in use by an exec or a transfer: `lease_use`)
//! - pools and VMs: [`App::list_pools`], [`App::get_pool`], [`App::list_vms`] (`pools`)
//! - the server itself: [`App::health`], [`App::history`] ([`status`]); this host's name and
//!   drain: [`App::host`], [`App::drain`] ([`host`])
//! - the server itself: [`App::health`], [`App::history`] ([`status`]); cleanup, for admins:
//!   [`App::gc`] (`gc`)
//! - commands: [`App::exec`], [`App::cancel_exec`] (`exec`, checked by `command`, running ones
//!   found by `execs`); sessions, commands that outlive their caller: [`App::attach`],
//!   [`App::list_sessions`], [`App::recover_sessions`] (`sessions`)
//! - files: [`App::upload`], [`App::download`] (`transfer`)
//! - Run: acquire, write the inputs, run the command, read the outputs, release, with retries
//!   of the same request id answered from the first run's record ([`App::run`], `run`)
//!
//! Use cases take the caller's [`Principal`](crate::auth::Principal) explicitly ([`scope`]) and
//! the `mpool.v1` messages (the API's schema, shared by the transports) as typed requests; they
//! fail with an [`AppError`] (a kind, and a message a person can act on), never with a
//! transport's status. Streams go in and out as plain streams of messages: a stream a use case
//! returns ends its work when the caller drops it.
//!
//! What this layer must not do: know a transport (no tonic requests, statuses or streams, no
//! HTTP), or decide pool matters (that is the engine's).

mod command;
pub mod error;
mod exec;
mod execs;
mod gc;
pub mod host;
mod lease_use;
mod leases;
mod pools;
mod run;
pub mod scope;
mod sessions;
pub mod status;
mod transfer;
mod utf8;
pub mod validate;

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;

use mpool_engine::Engine;
use mpool_metrics::Metrics;
use mpool_ssh::ConnectionCache;

pub use error::{AppError, ErrorKind};
pub use validate::{MAX_DURATION, MAX_ENV, MAX_EXEC_ID, MAX_FILES, MAX_HOLDER, MAX_ID, MAX_PATH};

/// A use case's stream of answers: messages, or the error that ended it. Dropping it tells the
/// use case its caller went away (a running command is cancelled).
pub type Events<T> = ReceiverStream<Result<T, AppError>>;

/// Size limits enforced at the edge.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest Upload (and all Run inputs together), bytes: `[api] max_upload`.
    pub max_upload: u64,
    /// Largest Download (and Run output), bytes: `[api] max_download`.
    pub max_download: u64,
    /// Largest argv (all elements together), bytes.
    pub max_argv: usize,
    /// Output a session keeps per stream (the first and the last half), bytes:
    /// `[api] session_output_cap`.
    pub session_output_cap: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_upload: mpool_config::DEFAULT_MAX_UPLOAD,
            max_download: mpool_config::DEFAULT_MAX_UPLOAD,
            max_argv: 1 << 20,
            session_output_cap: mpool_config::DEFAULT_SESSION_OUTPUT_CAP,
        }
    }
}

/// The application: what every use case needs; cheap to clone.
#[derive(Clone)]
pub struct App {
    engine: Engine,
    ssh: Arc<ConnectionCache>,
    execs: execs::Execs,
    watched: sessions::Watched,
    limits: Limits,
    metrics: Metrics,
    reloader: Option<Arc<crate::reload::Reloader>>,
    host: Arc<host::Host>,
}

impl App {
    /// The application over `engine`, reaching leased VMs through the `ssh` connection cache;
    /// its host is named after the machine until [`App::with_host_name`].
    pub fn new(engine: Engine, ssh: Arc<ConnectionCache>, limits: Limits, metrics: Metrics) -> App {
        let host = Arc::new(host::Host::new(mpool_config::machine_host_name()));
        App {
            engine,
            ssh,
            execs: execs::Execs::default(),
            watched: Default::default(),
            limits,
            metrics,
            reloader: None,
            host,
        }
    }

    /// The same application, reloading its config with `reloader` (the admin RPC `Reload`).
    pub fn with_reloader(mut self, reloader: Arc<crate::reload::Reloader>) -> App {
        self.reloader = Some(reloader);
        self
    }

    /// Re-reads the server's config file and applies what can change in place (admins only).
    pub async fn reload(
        &self,
        p: Option<&crate::auth::Principal>,
        _r: crate::proto::v1::ReloadRequest,
    ) -> Result<crate::proto::v1::ReloadResponse, AppError> {
        scope::check_admin(p, "Reload")?;
        let Some(reloader) = self.reloader.clone() else {
            return Err(AppError::failed_precondition("this server was not started from a config file"));
        };
        let report = reloader.reload().await.map_err(AppError::failed_precondition)?;
        Ok(crate::proto::v1::ReloadResponse { applied: report.applied, needs_restart: report.needs_restart })
    }

    /// The same application, its host named `name` (`[api] host_name`).
    pub fn with_host_name(mut self, name: String) -> App {
        self.host = Arc::new(host::Host::new(name));
        self
    }

    /// The engine (health, gauges).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The SSH connection cache (shutdown closes it).
    pub fn ssh_cache(&self) -> Arc<ConnectionCache> {
        self.ssh.clone()
    }

    /// The size limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
}

#[cfg(test)]
mod tests;
