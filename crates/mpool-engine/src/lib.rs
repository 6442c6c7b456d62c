//! mpool's engine: keeps each pool's VMs ready, hands them out under leases without races,
//! resets them after use, and never loses or leaks a VM, even across crashes.
//!
//! The decisions are the core's (`mpool_core::pool`: state machine, maintenance, reconciliation,
//! drift, plan outcomes, lease book, steps); here are the parts that act: the [`engine`] actor
//! that owns all pool state and performs the decisions, [`plans`] that run steps against the
//! daemon and SSH, the [`scheduler`] that orders daemon calls, and the [`isolation`] probe's
//! runner.

mod disk;
pub mod engine;
pub mod isolation;
pub mod plans;
pub mod scheduler;

pub use engine::{Engine, GcReport, Settings};
pub use isolation::ProbeSettings;
pub use mpool_core::pool::error::{EngineError, ErrorKind};
pub use mpool_core::pool::leases::{AcquireRequest, LeaseInfo, Served};
pub use mpool_core::pool::status::{PoolCapacity, PoolStatus, Status, VmStatus};

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod model_tests;
