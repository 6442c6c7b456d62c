//! mpool: warm pools of Multipass VMs for workflow tasks.
//!
//! The map of the crate, one concept per module:
//! - [`proto`]: code generated from `proto/` (multipassd's wire protocol, later `mpool.v1`).
//! - [`tls`]: rustls plumbing shared by the client and the simulator (one crypto provider,
//!   PEM parsing, certificate generation).
//! - [`multipass`]: the multipassd client: transport, trust, typed calls that hide the
//!   bidi-stream traps, version gating, one error type.
//! - [`sim`]: `mpool sim`, a multipassd stand-in speaking the same protocol, with its state
//!   rules, daemon-wide lock, timings, SSH endpoints and fault injection.
//! - [`ssh`]: SSH sessions to VMs: pooled connections, exec, SFTP.
//! - [`pool`]: the engine: warm VMs, leases, background resets, reconciliation.
//! - [`store`]: crash-safe state (VMs, leases, request ids, generations) in one redb file.
//! - [`config`]: the `mpool serve` config file (TOML): parsing, defaults, validation.
//! - [`api`]: the public gRPC API `mpool.v1` (auth, health, reflection, metrics).
//! - [`metrics`]: Prometheus counters and histograms.
//! - [`cli`]: the `mpool` command line.
//! - [`bench`]: `mpool bench`, the benchmark suite (figures, baselines, ratios).

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod multipass;
pub mod pool;
pub mod proto;
pub mod serve;
pub mod sim;
pub mod ssh;
pub mod store;
pub mod tls;
