//! Pools and VMs as a caller may see them: the pools its token lists (all for admins), their
//! configuration and counts, and their VMs (with the lease ids of its own leases only).

use std::collections::HashSet;

use mpool_config::ResetStrategy;
use mpool_engine::{EngineError, PoolCapacity, PoolStatus, Status};

use super::error::AppError;
use super::validate::{self, MAX_ID};
use super::{App, scope};
use crate::auth::Principal;
use crate::convert;
use crate::proto::v1;

impl App {
    /// The pools the caller may use.
    pub async fn list_pools(
        &self,
        p: Option<&Principal>,
        _r: v1::ListPoolsRequest,
    ) -> Result<v1::ListPoolsResponse, AppError> {
        let status = self.engine.status().await?;
        let capacity = self.engine.capacity().await?;
        let pools = status
            .pools
            .iter()
            .filter(|pool| scope::may_use(p, &pool.name))
            .map(|pool| self.pool_info(pool, &status, &capacity))
            .collect();
        Ok(v1::ListPoolsResponse { pools })
    }

    /// One pool.
    pub async fn get_pool(&self, p: Option<&Principal>, r: v1::GetPoolRequest) -> Result<v1::PoolInfo, AppError> {
        validate::required("pool", &r.pool)?;
        scope::check_pool(p, &r.pool)?;
        let status = self.engine.status().await?;
        let capacity = self.engine.capacity().await?;
        let pool = status.pools.iter().find(|x| x.name == r.pool).ok_or(EngineError::UnknownPool(r.pool))?;
        Ok(self.pool_info(pool, &status, &capacity))
    }

    /// Raises a pool's ready floor for a while (any caller who may use the pool may).
    pub async fn preheat(&self, p: Option<&Principal>, r: v1::PreheatRequest) -> Result<v1::PreheatResponse, AppError> {
        validate::required("pool", &r.pool)?;
        scope::check_pool(p, &r.pool)?;
        let duration = validate::duration("duration", r.duration.as_ref())?.ok_or_else(|| {
            AppError::invalid_argument("duration is required: how long the pool stays preheated, e.g. 300s")
        })?;
        let c = self.engine.preheat(&r.pool, r.count, duration).await?;
        Ok(v1::PreheatResponse {
            ready_target: c.ready_target,
            preheat: c.preheat,
            preheat_until: c.preheat_left.map(until),
        })
    }

    /// The VMs of the pools the caller may use (of one pool, or all).
    pub async fn list_vms(
        &self,
        p: Option<&Principal>,
        r: v1::ListVmsRequest,
    ) -> Result<v1::ListVmsResponse, AppError> {
        validate::capped("pool", &r.pool, MAX_ID)?;
        let status = self.engine.status().await?;
        // A scoped token sees the lease ids of its own leases only.
        let mine = scope::owner(p);
        let visible: HashSet<&str> = status
            .leases
            .iter()
            .filter(|l| mine.as_ref().is_none_or(|o| &l.owner == o))
            .map(|l| l.id.as_str())
            .collect();
        let vms = status
            .vms
            .into_iter()
            .filter(|v| r.pool.is_empty() || v.pool == r.pool)
            .filter(|v| scope::may_use(p, &v.pool))
            .map(|v| v1::Vm {
                name: v.name,
                pool: v.pool,
                state: v.state,
                generation: v.generation,
                uses: v.uses,
                lease_id: v.lease.filter(|id| visible.contains(id.as_str())).unwrap_or_default(),
                disk_used_bytes: v.disk_used,
                image_bytes: v.image_bytes,
            })
            .collect();
        Ok(v1::ListVmsResponse { vms })
    }
}

/// VM states that are idle and ready to lease: the `ready` of [`v1::PoolInfo`].
const READY: [&str; 2] = ["hot", "warm"];
/// VM states on their way to ready: the `coming` of [`v1::PoolInfo`].
const COMING: [&str; 2] = ["provisioning", "resetting"];

impl App {
    /// A pool's status as the API's message, with this host's name and drain state.
    fn pool_info(&self, p: &PoolStatus, status: &Status, capacity: &[PoolCapacity]) -> v1::PoolInfo {
        let in_states = |states: &[&str]| count(states.iter().filter_map(|s| p.counts.get(*s)).sum());
        v1::PoolInfo {
            ready: in_states(&READY),
            coming: in_states(&COMING),
            host: self.host.name().to_string(),
            draining: self.host.draining(),
            ..pool_info(p, status, capacity)
        }
    }
}

/// A pool's status as the API's message (its counts, configuration and sizing).
fn pool_info(p: &PoolStatus, status: &Status, capacity: &[PoolCapacity]) -> v1::PoolInfo {
    let sizing = capacity.iter().find(|c| c.name == p.name);
    let config = p.config.as_ref().map(|c| v1::PoolConfig {
        image: c.image.clone(),
        cpus: c.cpus,
        memory: c.memory.clone(),
        disk: c.disk.clone(),
        min_ready: c.min_ready,
        hot: c.hot,
        max_size: c.max_size,
        reset: match c.reset {
            ResetStrategy::Snapshot => v1::ResetStrategy::Snapshot,
            ResetStrategy::Clone => v1::ResetStrategy::Clone,
            ResetStrategy::Recreate => v1::ResetStrategy::Recreate,
        } as i32,
        max_uses: c.max_uses,
        default_ttl: Some(convert::proto_duration(c.default_ttl)),
        max_ttl: Some(convert::proto_duration(c.max_ttl)),
        max_wait: Some(convert::proto_duration(c.max_wait)),
        require_isolation: c.require_isolation,
    });
    let isolation = &status.isolation;
    v1::PoolInfo {
        name: p.name.clone(),
        config,
        vms: p.counts.iter().map(|(k, v)| (k.clone(), count(*v))).collect(),
        waiters: count(p.waiters),
        leases: count(p.leases),
        generation: p.generation,
        daemon_ok: status.daemon_ok,
        isolation: isolation.state.as_str().to_string(),
        isolation_detail: isolation.detail.clone(),
        isolation_checked_at: (isolation.checked_ms > 0).then(|| convert::timestamp(isolation.checked_ms)),
        ready_target: sizing.map_or(0, |c| c.ready_target),
        preheat: sizing.map_or(0, |c| c.preheat),
        scheduled: sizing.map_or(0, |c| c.scheduled),
        preheat_until: sizing.and_then(|c| c.preheat_left).map(until),
        held_back: p.held_back.clone().unwrap_or_default(),
        disk_used_bytes: p.disk_used,
        image_bytes: p.image_bytes,
        host_capacity: status.host.as_ref().map(|h| v1::HostCapacity {
            cpus: h.cpus,
            memory_bytes: h.memory,
            disk_total_bytes: h.disk_total,
            disk_free_bytes: h.disk_free,
            disk_free_source: h.disk_free_source.clone(),
        }),
        ..v1::PoolInfo::default()
    }
}

/// The wall-clock time `left` from now.
fn until(left: std::time::Duration) -> crate::proto::Timestamp {
    crate::proto::Timestamp::from(std::time::SystemTime::now() + left)
}

/// A count as the API's 32-bit field (saturating; pools are far smaller).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
