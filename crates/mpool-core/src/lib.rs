//! mpool's pure core: what the engine decides, from observations and time, with no I/O.
//!
//! - [`host`]: the Multipass host's capacity (CPUs, memory, disk) from the daemon, the data
//!   volume and the configuration.
//! - [`types`]: instance states, the SSH endpoint type, launch options.
//! - [`sizes`]: memory and disk sizes as multipass takes them.
//! - [`pool_config`]: one pool's settings (parsed and validated by `mpool-config`).
//! - [`ports`]: what the engine needs from the daemon, SSH, the clock and a source of names.
//! - [`store`]: the state store's records and the port the engine writes them through.
//! - [`pool`]: the decisions: a VM's state machine, maintenance, startup reconciliation, drift
//!   of idle VMs, plan outcomes, the lease book, plans as idempotent steps, and the engine's
//!   errors.
//!
//! Nothing here depends on tokio, tonic, redb or russh; adapters live in the crates that talk
//! to those (`mpool-multipass`, `mpool-ssh`, `mpool-store`), and the actor that performs the
//! decisions in `mpool-engine`.

pub mod host;
pub mod pool;
pub mod pool_config;
pub mod ports;
pub mod sizes;
pub mod store;
pub mod types;

pub use pool_config::{Autoscale, PoolConfig, ResetStrategy};
