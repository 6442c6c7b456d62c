//! This host in a fleet of mpool hosts: its name (`[api] host_name`) and whether it drains.
//! A draining host refuses new leases with UNAVAILABLE, naming the drain, so clients with
//! several endpoints move on to another host; the leases it holds run to their end, and a
//! retry of one of them (its request id) still gets it. Draining is an admin's act (Drain);
//! it lives in memory only, so a restart of `mpool serve` takes the host back into service.
//!
//! What this module must not do: touch the engine's state machine. Refusing happens here,
//! before a request reaches the engine.

use std::sync::atomic::{AtomicBool, Ordering};

use super::error::AppError;
use super::{App, scope};
use crate::auth::Principal;
use crate::proto::v1;

/// The host's name and drain state, shared by every clone of the [`App`].
#[derive(Debug)]
pub struct Host {
    name: String,
    draining: AtomicBool,
}

impl Host {
    /// A host named `name`, in service.
    pub fn new(name: String) -> Host {
        Host { name, draining: AtomicBool::new(false) }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it refuses new leases.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

impl App {
    /// This host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Drains this host (`r.drain`) or takes it back into service; admins only.
    pub async fn drain(&self, p: Option<&Principal>, r: v1::DrainRequest) -> Result<v1::DrainResponse, AppError> {
        scope::check_admin(p, "Drain")?;
        let was = self.host.draining.swap(r.drain, Ordering::SeqCst);
        if was != r.drain {
            tracing::info!(host = %self.host.name, draining = r.drain, "drain state changed by {}", caller(p));
        }
        self.drain_state().await
    }

    /// The drain state and the leases this host still holds.
    pub async fn drain_state(&self) -> Result<v1::DrainResponse, AppError> {
        let leases = self.engine.status().await?.leases.len();
        let draining = self.host.draining();
        Ok(v1::DrainResponse {
            host: self.host.name.clone(),
            draining,
            leases: u32::try_from(leases).unwrap_or(u32::MAX),
            empty: draining && leases == 0,
        })
    }

    /// Refuses a new lease of `pool` while the host drains: UNAVAILABLE, so the caller tries
    /// another host. A request id of the caller's that this host already knows gets through:
    /// the engine answers it as before (the same lease, a Run's recorded result, "still
    /// running"), so a retry never runs on another host what ran here. Request ids are the
    /// caller's own: another owner's with the same id does not count.
    pub(super) async fn check_open(
        &self,
        p: Option<&Principal>,
        pool: &str,
        request_id: Option<&str>,
    ) -> Result<(), AppError> {
        if !self.host.draining() {
            return Ok(());
        }
        if let Some(id) = request_id {
            let key = mpool_core::store::RequestKey {
                owner: scope::acquirer(p).unwrap_or_default(),
                pool: pool.to_string(),
                request_id: id.to_string(),
            };
            if self.engine.knows_request(key).await? {
                return Ok(());
            }
        }
        Err(AppError::unavailable(format!(
            "host {} is draining (mpool drain): it takes no new leases; try another host",
            self.host.name
        )))
    }
}

/// Who changed the drain state, for the log line (a token's name, never the token).
fn caller(p: Option<&Principal>) -> String {
    scope::acquirer(p).map_or_else(|| "the Unix socket".to_string(), |n| format!("token {n:?}"))
}
