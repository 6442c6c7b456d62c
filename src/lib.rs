//! mpool: warm pools of Multipass VMs for workflow tasks. This package is the `mpool` command
//! ([`cli`]), its benchmark suite ([`bench`]) and the client side of several hosts ([`fleet`]:
//! choosing a host for a lease); the parts live in the workspace's crates:
//!
//! | crate | what |
//! |---|---|
//! | `mpool-core` | the pure core: the pool's state machine, decisions, leases, plans as steps, ports, store records |
//! | `mpool-engine` | the thin actor that performs the core's effects; plans; the daemon scheduler |
//! | `mpool-store` | the state store: redb file, in-memory double, fault injector |
//! | `mpool-multipass` | the multipassd client (and the engine's daemon port over it) |
//! | `mpool-ssh` | pooled SSH connections, exec, SFTP (and the engine's SSH port) |
//! | `mpool-config` | the `mpool serve` config file |
//! | `mpool-api` | the application layer (use cases) under `mpool.v1` over gRPC and HTTP/JSON; auth, the serve wiring, an API client |
//! | `mpool-sim` | `mpool sim`, a multipassd stand-in |
//! | `mpool-metrics`, `mpool-tls` | Prometheus metrics; rustls plumbing |
//! | `mpool-testkit` | what tests and benchmarks start |

pub mod bench;
pub mod cli;
pub mod fleet;
