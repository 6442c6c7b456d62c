//! The engine's errors: what a caller of [`super::engine::Engine`] can be told.

use std::time::Duration;

use crate::store::RunOutcome;

/// Engine errors, each of a [`ErrorKind`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No such pool.
    #[error("no pool named {0:?}; `mpool status` lists the configured pools")]
    UnknownPool(String),
    /// No such lease.
    #[error("no lease {0:?}; it never existed or ended long ago")]
    UnknownLease(String),
    /// The lease ended.
    #[error("lease {id} has ended ({reason}); acquire a new one")]
    LeaseEnded {
        /// Lease id.
        id: String,
        /// Why it ended.
        reason: String,
    },
    /// Another principal's lease.
    #[error("lease {0} belongs to another client")]
    NotOwner(String),
    /// No VM within the wait.
    #[error(
        "pool {pool} has no free VM after waiting {waited:?} ({leased} leased, max_size {max_size}); retry later, wait longer, or raise max_size"
    )]
    Exhausted {
        /// Pool.
        pool: String,
        /// How long the caller waited.
        waited: Duration,
        /// VMs leased.
        leased: usize,
        /// The pool's max_size.
        max_size: u32,
    },
    /// The caller's owner holds as many leases as the pool allows one owner, for the whole wait.
    #[error(
        "pool {pool}: {} already holds {held} leases, the pool's max_leases_per_owner ({limit}), after waiting {waited:?}; release a lease first, retry later, or raise max_leases_per_owner",
        owner_text(owner)
    )]
    OwnerLimit {
        /// Pool.
        pool: String,
        /// The owner (empty: callers without a token).
        owner: String,
        /// Leases it holds (or is being handed) in the pool.
        held: usize,
        /// The pool's max_leases_per_owner.
        limit: u32,
        /// How long the caller waited.
        waited: Duration,
    },
    /// A Run with this request id is still running (or waiting for its VM).
    #[error(
        "request id {request_id:?} is already running as lease {lease}; wait for it to end (a retry with the same request id then gets its result), or use a new request id"
    )]
    InProgress {
        /// The request id.
        request_id: String,
        /// The lease it runs under (empty while it waits for a VM).
        lease: String,
    },
    /// The request id was answered before and its lease has ended.
    #[error("request id {request_id:?} was answered with lease {lease}, which has ended; use a new request id")]
    RequestEnded {
        /// The request id.
        request_id: String,
        /// The lease it was answered with.
        lease: String,
        /// A Run's recorded outcome, when the request was a Run that finished.
        outcome: Option<Box<RunOutcome>>,
    },
    /// The pool requires isolation and the probe has not measured it.
    #[error("pool {pool} requires isolation and the VMs are {state}: {detail}; {fix}", fix = super::isolation::FIX)]
    NotIsolated {
        /// Pool.
        pool: String,
        /// The probe's verdict ("not isolated", "unknown").
        state: String,
        /// What it measured.
        detail: String,
    },
    /// The host has no room for the VM a caller waits for (`[host]` limits).
    #[error("pool {pool} cannot grow: {reason}")]
    Refused {
        /// Pool.
        pool: String,
        /// Why the host admits no new VM.
        reason: String,
    },
    /// The daemon is down or frozen.
    #[error("multipassd is unavailable ({0}); retry shortly")]
    Unavailable(String),
    /// The state store cannot be written: nothing can be promised durably.
    #[error("mpool cannot write its state store ({0}); it retries by itself, retry shortly")]
    StoreUnavailable(String),
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// The engine is shutting down or gone.
    #[error("mpool is shutting down")]
    ShuttingDown,
}

/// How an owner is named in a message.
fn owner_text(owner: &str) -> String {
    if owner.is_empty() { "owner \"\" (callers without a token)".to_string() } else { format!("owner {owner:?}") }
}

/// The kind of an [`EngineError`]: what a caller can do about it. The API maps kinds to its
/// status codes (gRPC, HTTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such pool or lease.
    NotFound,
    /// The lease or the request ended.
    FailedPrecondition,
    /// Another principal's lease.
    PermissionDenied,
    /// No VM within the wait.
    ResourceExhausted,
    /// The request is still running.
    AlreadyExists,
    /// Retry shortly (the daemon or the store is away, or mpool is stopping).
    Unavailable,
    /// Bad input.
    InvalidArgument,
}

impl EngineError {
    /// What kind of error it is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::UnknownPool(_) | EngineError::UnknownLease(_) => ErrorKind::NotFound,
            EngineError::LeaseEnded { .. } | EngineError::RequestEnded { .. } | EngineError::NotIsolated { .. } => {
                ErrorKind::FailedPrecondition
            }
            EngineError::NotOwner(_) => ErrorKind::PermissionDenied,
            EngineError::Exhausted { .. } | EngineError::OwnerLimit { .. } | EngineError::Refused { .. } => {
                ErrorKind::ResourceExhausted
            }
            EngineError::InProgress { .. } => ErrorKind::AlreadyExists,
            EngineError::Unavailable(_) | EngineError::StoreUnavailable(_) | EngineError::ShuttingDown => {
                ErrorKind::Unavailable
            }
            EngineError::InvalidArgument(_) => ErrorKind::InvalidArgument,
        }
    }
}
