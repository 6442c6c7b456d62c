//! Leases: acquire a VM under a lease (the same request id answers with the same lease), renew
//! it, release it, and list the leases a caller may see.

use std::time::Instant;

use mpool_core::store::RequestKind;
use mpool_engine::{AcquireRequest, LeaseInfo};

use super::error::AppError;
use super::validate::{self, MAX_HOLDER, MAX_ID};
use super::{App, scope};
use crate::auth::Principal;
use crate::convert;
use crate::proto::v1;

impl App {
    /// Acquires a VM of `r.pool`, waiting FIFO up to `r.wait`; a retry with the same request id
    /// gets the same lease.
    pub async fn acquire(&self, p: Option<&Principal>, r: v1::AcquireRequest) -> Result<v1::Lease, AppError> {
        validate::required("pool", &r.pool)?;
        validate::capped("holder", &r.holder, MAX_HOLDER)?;
        validate::capped("request_id", &r.request_id, MAX_ID)?;
        scope::check_pool(p, &r.pool)?;
        self.check_open(p, &r.pool, Some(r.request_id.as_str()).filter(|id| !id.is_empty())).await?;
        let req = AcquireRequest {
            pool: r.pool,
            holder: r.holder,
            request_id: (!r.request_id.is_empty()).then_some(r.request_id),
            ttl: validate::duration("ttl", r.ttl.as_ref())?,
            wait: validate::duration("wait", r.wait.as_ref())?,
            owner: scope::acquirer(p),
            kind: RequestKind::Acquire,
        };
        let info = self.acquire_counted(req).await?;
        Ok(convert::lease(&info))
    }

    /// Asks the engine for a lease, counting the outcome and its time in the metrics.
    async fn acquire_counted(&self, req: AcquireRequest) -> Result<LeaseInfo, AppError> {
        let pool = req.pool.clone();
        let started = Instant::now();
        let result = self.engine.acquire(req).await;
        self.metrics.acquired(&pool, result.as_ref().ok().map(|i| i.served), started.elapsed());
        Ok(result?)
    }

    /// Extends a lease by `r.ttl` (default: the pool's default TTL) from now.
    pub async fn renew(&self, p: Option<&Principal>, r: v1::RenewRequest) -> Result<v1::Lease, AppError> {
        validate::required("lease_id", &r.lease_id)?;
        let ttl = validate::duration("ttl", r.ttl.as_ref())?;
        let info = self.engine.renew(&r.lease_id, ttl, scope::owner(p)).await?;
        Ok(convert::lease(&info))
    }

    /// Ends a lease (its VM is reset in the background); releasing an ended lease is fine.
    pub async fn release(&self, p: Option<&Principal>, r: v1::ReleaseRequest) -> Result<v1::ReleaseResponse, AppError> {
        validate::required("lease_id", &r.lease_id)?;
        self.engine.release(&r.lease_id, scope::owner(p)).await?;
        Ok(v1::ReleaseResponse {})
    }

    /// The leases the caller may see (its own; all of them for admins), of one pool or all.
    pub async fn list_leases(
        &self,
        p: Option<&Principal>,
        r: v1::ListLeasesRequest,
    ) -> Result<v1::ListLeasesResponse, AppError> {
        validate::capped("pool", &r.pool, MAX_ID)?;
        let status = self.engine.status().await?;
        let mine = scope::owner(p);
        let leases = status
            .leases
            .iter()
            .filter(|l| r.pool.is_empty() || l.pool == r.pool)
            .filter(|l| mine.as_ref().is_none_or(|o| &l.owner == o))
            .map(convert::lease_record)
            .collect();
        Ok(v1::ListLeasesResponse { leases })
    }
}
