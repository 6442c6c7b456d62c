//! The multipassd client: transport (Unix socket or TCP, always TLS with a client certificate),
//! server verification, trust (`authenticate`), typed calls that hide the bidi-stream traps,
//! version gating and one error type.
//!
//! It must not spawn the `multipass` CLI, and it must never send an empty instance list.

mod address;
mod client;
mod error;
mod image;
pub mod port;
pub mod proto;
pub mod reach;
pub mod sizes;
pub mod startup;
pub mod trust;
mod version;

pub use address::{DaemonAddress, Discovered, RUN_SOCKET, SNAP_SOCKET};
pub use client::{
    Client, ClientOptions, DEFAULT_MAX_IN_FLIGHT, DaemonInfo, FindResult, ImageAlias, ImageEntry, InstanceInfo,
    InstanceState, InstanceSummary, LaunchOptions, Names, PassphraseOrigin, RetryPolicy, SAFE_TO_RETRY,
    SnapshotSummary, SshEndpoint,
};
pub use error::Error;
pub use image::{ImageCheck, ImageKind, ImageRef, check_pool_images, serve_check_images};
pub use trust::{ClientIdentity, ServerVerification};
pub use version::Version;
