//! The engine's state as a report: pools, VMs, leases (for status, listings and metrics).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pool::isolation::Isolation;
use crate::pool_config::PoolConfig;
use crate::store::LeaseRecord;

/// One VM in a status report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// State (`VmState` debug name).
    pub state: String,
    /// Config generation.
    pub generation: u64,
    /// Leases served since the last rebuild.
    pub uses: u32,
    /// Lease holding it.
    pub lease: Option<String>,
    /// The owner of that lease (empty when auth is off).
    pub lease_owner: Option<String>,
    /// A plan is running.
    pub busy: bool,
    /// Bytes used on its root filesystem when last measured (`df` at release).
    pub disk_used: Option<u64>,
    /// Bytes its files take on the host's data volume, as last sampled.
    pub image_bytes: Option<u64>,
}

/// One pool in a status report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PoolStatus {
    /// Name.
    pub name: String,
    /// Generation.
    pub generation: u64,
    /// VMs per state.
    pub counts: BTreeMap<String, usize>,
    /// Callers waiting.
    pub waiters: usize,
    /// Leases.
    pub leases: usize,
    /// Golden VM ready (clone pools).
    pub golden_ready: Option<bool>,
    /// It left the config at a reload and drains (no new leases; gone once empty).
    pub removed: bool,
    /// Why the host admits no more of its VMs (`[host]` limits), while it does not.
    pub held_back: Option<String>,
    /// The sum of its VMs' measured disk usage, bytes (VMs not measured yet count nothing).
    pub disk_used: u64,
    /// The sum of its VMs' files on the host's data volume, bytes, as last sampled.
    pub image_bytes: u64,
    /// Config.
    #[serde(skip)]
    pub config: Option<PoolConfig>,
}

/// A snapshot of the engine's state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    /// The daemon answers.
    pub daemon_ok: bool,
    /// Startup reconciliation has run.
    pub reconciled: bool,
    /// The state store takes writes.
    pub store_ok: bool,
    /// Why it does not, while it does not.
    pub store_error: Option<String>,
    /// Pools.
    pub pools: Vec<PoolStatus>,
    /// VMs.
    pub vms: Vec<VmStatus>,
    /// Leases.
    pub leases: Vec<LeaseRecord>,
    /// Daemon calls waiting for the scheduler.
    pub queued_daemon_calls: usize,
    /// What the isolation probe last measured.
    pub isolation: Isolation,
    /// The host's capacity, once sampled.
    pub host: Option<crate::host::HostFacts>,
}

/// One pool's capacity: how many ready VMs it keeps now and what that came from (for
/// `autoscale = "demand"`; a pool with autoscale off keeps `min_ready`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PoolCapacity {
    /// Pool.
    pub name: String,
    /// Idle VMs it keeps ready now.
    pub ready_target: u32,
    /// The `min_ready` of the schedule active now (0: none).
    pub scheduled: u32,
    /// The highest active preheat (0: none).
    pub preheat: u32,
    /// How long that preheat still lasts.
    pub preheat_left: Option<Duration>,
    /// Measured arrival rate of acquires, per second (decaying).
    pub arrival_rate: f64,
    /// Measured refill time (release or launch until ready; a moving average).
    pub refill_time: Duration,
}
