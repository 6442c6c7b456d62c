//! Cleanup on demand (`Gc`): for admins only, since it deletes instances and snapshots
//! whichever pools they belong to; the engine decides and acts, this reports.

use mpool_engine::GcReport;

use super::error::AppError;
use super::{App, scope};
use crate::auth::Principal;
use crate::proto::v1;

impl App {
    /// Runs cleanup now (or, `dry_run`, only reports what it would do).
    pub async fn gc(&self, p: Option<&Principal>, r: v1::GcRequest) -> Result<v1::GcResponse, AppError> {
        scope::check_admin(p, "Gc (cleanup)")?;
        let report = self.engine.gc(r.dry_run).await?;
        Ok(response(report))
    }
}

/// The report as the API's message: what failed is not listed as done.
fn response(r: GcReport) -> v1::GcResponse {
    let failed = |what: &str| r.failed.iter().any(|f| f.what == what);
    let item = |d: &mpool_core::pool::cleanup::Deferred| v1::GcItem { what: d.what.clone(), why: d.why.clone() };
    v1::GcResponse {
        dry_run: r.dry_run,
        purged: r.found.purge.iter().filter(|n| !failed(n)).cloned().collect(),
        snapshots_deleted: r.found.delete_snapshots.iter().map(|s| s.to_string()).filter(|s| !failed(s)).collect(),
        deferred: r.found.deferred.iter().map(item).collect(),
        failed: r.failed.iter().map(item).collect(),
        foreign_instances: r.found.foreign_instances.clone(),
        foreign_snapshots: r.found.foreign_snapshots.iter().map(|s| s.to_string()).collect(),
    }
}
