//! Crash-safe state: VMs, leases, request ids, ended leases and pool generations.
//!
//! The engine writes a VM's phase *before* the daemon calls that phase describes (intent first),
//! so after a crash reconciliation knows what each instance was doing. Writes that must survive a
//! crash (a lease granted or ended, a VM created or deleted) commit durably; a VM settling into an
//! idle state may commit lazily, since losing it only costs one extra reset after a crash.
//!
//! The engine sees the store through [`StateStore`]; `mpool-store` implements it (a redb file
//! with schema versions, migrations and recovery from I/O errors; an in-memory double with
//! injectable failures and crashes; a fault injector). Records are JSON, so a version that adds
//! fields reads older records (missing fields take defaults).

use serde::{Deserialize, Serialize};

/// Store failures.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened, read or written.
    #[error("state store {path}: {detail}")]
    Db {
        /// The file.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The file is damaged: redb found an inconsistent page.
    #[error(
        "state store {path} is corrupt ({detail}); keep a copy, then restore it from a backup, or move it aside \
         to start empty (mpool then deletes the instances with its name prefix that it no longer knows, unless \
         [engine] delete_strays = false)"
    )]
    Corrupt {
        /// The file.
        path: String,
        /// What was found.
        detail: String,
    },
    /// Written by a newer mpool whose records this one cannot read.
    #[error(
        "state store {path} has schema version {found}, newer than the {supported} this mpool reads; \
         run the newer mpool again (or restore a backup made by this version)"
    )]
    TooNew {
        /// The file.
        path: String,
        /// Its schema version.
        found: u64,
        /// The newest this build reads.
        supported: u64,
    },
    /// A record could not be encoded or decoded.
    #[error("state store record {key}: {detail}")]
    Record {
        /// The record's key.
        key: String,
        /// What failed.
        detail: String,
    },
}

/// Where a VM is in its life, as persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseRecord {
    /// Being created (launch, setup, clean snapshot).
    Provisioning,
    /// Idle and running: acquire costs no daemon call.
    Hot,
    /// Idle and suspended.
    Warm,
    /// Being started for a waiting acquirer.
    Starting,
    /// Leased to a holder.
    Leased,
    /// Being reset to its clean state after a lease.
    Resetting,
    /// Failed; to be deleted and replaced.
    Broken,
    /// Being deleted.
    Deleting,
    /// The stopped source VM of a clone pool (never leased).
    Golden,
}

/// One VM as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Instance name (carries the engine's prefix).
    pub name: String,
    /// Pool it belongs to.
    pub pool: String,
    /// The pool's config generation it was built from.
    pub generation: u64,
    /// Its phase.
    pub phase: PhaseRecord,
    /// Leases it has served since its last full rebuild.
    #[serde(default)]
    pub uses: u32,
    /// The lease holding it, if any.
    #[serde(default)]
    pub lease: Option<String>,
    /// Creation time, unix milliseconds.
    #[serde(default)]
    pub created_ms: u64,
}

/// One lease as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Lease id.
    pub id: String,
    /// Pool.
    pub pool: String,
    /// VM name.
    pub vm: String,
    /// Who holds it (free text from the caller, e.g. a Kestra task run id).
    pub holder: String,
    /// The caller's idempotency key, if any.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Granted at, unix milliseconds.
    pub granted_ms: u64,
    /// Expires at, unix milliseconds.
    pub expires_ms: u64,
    /// The principal (token name) that acquired it; empty when auth is off.
    #[serde(default)]
    pub owner: String,
}

/// What a request id was used for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// An Acquire: a lease the caller then uses.
    #[default]
    Acquire,
    /// A one-shot Run: lease, command, release.
    Run,
}

/// How a Run's command ended, kept so a retry with the same request id gets it again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutcome {
    /// Exit code; absent when killed by a signal or when the command never ended.
    #[serde(default)]
    pub code: Option<i32>,
    /// Signal name without "SIG", when killed by one.
    #[serde(default)]
    pub signal: Option<String>,
    /// Wall time of the command, milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// Killed because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
    /// Killed because it was cancelled (or its caller went away).
    #[serde(default)]
    pub cancelled: bool,
    /// Why the run failed before or after its command (upload, connection, ...), if it did.
    #[serde(default)]
    pub error: Option<String>,
    /// The VM it ran on.
    #[serde(default)]
    pub vm: String,
}

/// A request id and what it was answered with. Request ids are scoped by owner and pool: the
/// same text from two owners (or in two pools) is two requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The principal that sent it (empty when auth is off).
    pub owner: String,
    /// Pool.
    pub pool: String,
    /// The caller's idempotency key.
    pub request_id: String,
    /// The lease it was answered with.
    pub lease: String,
    /// Acquire or Run.
    #[serde(default)]
    pub kind: RequestKind,
    /// When the lease ended (unix milliseconds); absent while it lives.
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// A Run's outcome, once known.
    #[serde(default)]
    pub outcome: Option<RunOutcome>,
}

impl RequestRecord {
    /// The key that identifies it.
    pub fn key(&self) -> RequestKey {
        RequestKey { owner: self.owner.clone(), pool: self.pool.clone(), request_id: self.request_id.clone() }
    }
}

/// Identifies a request: owner, pool and the caller's request id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// The principal (empty when auth is off).
    pub owner: String,
    /// Pool.
    pub pool: String,
    /// The caller's idempotency key.
    pub request_id: String,
}

/// A lease that ended, remembered so a late call says "ended" rather than "unknown".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedRecord {
    /// Lease id.
    pub id: String,
    /// Why it ended ("released", "expired", ...).
    pub reason: String,
    /// The principal that held it (empty when auth is off).
    #[serde(default)]
    pub owner: String,
    /// When, unix milliseconds.
    pub at_ms: u64,
}

/// A pool's persisted config generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// Pool name.
    pub name: String,
    /// Generation number, bumped when the VM-shaping config changes.
    pub generation: u64,
    /// The config fingerprint of that generation.
    pub key: String,
    /// When that generation began (unix ms; 0 in records written before it was kept).
    #[serde(default)]
    pub since_ms: u64,
}

/// One change inside a write batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace a VM.
    PutVm(VmRecord),
    /// Remove a VM.
    DeleteVm(String),
    /// Insert or replace a lease.
    PutLease(LeaseRecord),
    /// Remove a lease by id.
    DeleteLease(String),
    /// Insert or replace a request id's record.
    PutRequest(RequestRecord),
    /// Forget a request id.
    DeleteRequest(RequestKey),
    /// Remember an ended lease.
    PutEnded(EndedRecord),
    /// Forget an ended lease.
    DeleteEnded(String),
    /// Insert or replace a pool generation.
    PutPool(PoolRecord),
}

impl Write {
    /// The VM this write is about, if any.
    pub fn vm(&self) -> Option<&str> {
        match self {
            Write::PutVm(v) => Some(&v.name),
            Write::DeleteVm(n) => Some(n),
            Write::PutLease(l) => Some(&l.vm),
            _ => None,
        }
    }
}

/// Everything in the store, read in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// VMs.
    pub vms: Vec<VmRecord>,
    /// Leases.
    pub leases: Vec<LeaseRecord>,
    /// Request ids.
    pub requests: Vec<RequestRecord>,
    /// Ended leases.
    pub ended: Vec<EndedRecord>,
    /// Pools.
    pub pools: Vec<PoolRecord>,
}

/// What the engine needs from its store. Calls block (they fsync); the engine runs them off its
/// async workers.
pub trait StateStore: Send + Sync + 'static {
    /// Reads everything in one consistent view.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies a batch atomically: all of it or nothing. `durable` commits with an fsync;
    /// otherwise the commit may be lost in a crash (but never half-applied). After a failure the
    /// store recovers by itself on a later call if it can (e.g. reopening its file).
    fn write(&self, batch: &[Write], durable: bool) -> Result<(), StoreError>;
    /// Where it lives, for messages.
    fn describe(&self) -> String;
    /// Whether calls block on I/O (then the engine runs them on a blocking thread; an in-memory
    /// store runs inline, which keeps tests on virtual time deterministic).
    fn blocks(&self) -> bool {
        true
    }
}

impl RequestKey {
    /// Its key in a store: owner, pool and request id, NUL-separated (none of them may contain
    /// NUL; the engine refuses such request ids).
    pub fn store_key(&self) -> String {
        format!("{}\u{0}{}\u{0}{}", self.owner, self.pool, self.request_id)
    }
}
