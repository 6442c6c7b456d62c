//! The server's own state as a caller may see it: whether the daemon answers and the store
//! takes writes, and the last hour's acquire latency and reset duration of the pools the caller
//! may use (aggregates only: no holder, lease or owner is in them).

use mpool_metrics::history::HistorySnapshot;

use super::error::AppError;
use super::{App, scope};
use crate::auth::Principal;

/// The health of what mpool depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Serving as `/healthz` and the gRPC health service say: the daemon answers and the store
    /// takes writes.
    pub serving: bool,
    /// multipassd answers.
    pub daemon_ok: bool,
    /// Daemon calls waiting for the scheduler.
    pub queued_daemon_calls: usize,
    /// The state store takes writes.
    pub store_ok: bool,
    /// Why it does not, when it does not.
    pub store_error: Option<String>,
    /// The engine has compared its state with the daemon's since it started.
    pub reconciled: bool,
    /// What the isolation probe last measured (a detail: it does not change `serving`).
    pub isolation: mpool_core::pool::isolation::Isolation,
    /// This host's name (`[api] host_name`).
    pub host: String,
    /// The host drains: it refuses new leases.
    pub draining: bool,
    /// Leases it holds (all pools).
    pub leases: usize,
}

impl App {
    /// The health of the daemon and the store.
    pub async fn health(&self, _p: Option<&Principal>) -> Result<Health, AppError> {
        let serving = *self.engine.healthy().borrow();
        let s = self.engine.status().await?;
        Ok(Health {
            serving,
            daemon_ok: s.daemon_ok,
            queued_daemon_calls: s.queued_daemon_calls,
            store_ok: s.store_ok,
            store_error: s.store_error,
            reconciled: s.reconciled,
            isolation: s.isolation,
            host: self.host.name().to_string(),
            draining: self.host.draining(),
            leases: s.leases.len(),
        })
    }

    /// The last hour, per minute, of the pools the caller may use.
    pub fn history(&self, p: Option<&Principal>) -> HistorySnapshot {
        let mut h = self.metrics.history();
        h.pools.retain(|pool| scope::may_use(p, &pool.pool));
        h
    }
}
