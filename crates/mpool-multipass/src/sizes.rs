//! Memory and disk sizes as multipass takes them, and its limits.

pub use mpool_core::sizes::parse_size;

/// Smallest memory multipass accepts.
pub const MIN_MEMORY: u64 = 128 << 20;
/// Smallest disk multipass accepts.
pub const MIN_DISK: u64 = 512 << 20;
/// Memory of an instance launched without a size.
pub const DEFAULT_MEMORY: u64 = 1 << 30;
/// Disk of an instance launched without a size.
pub const DEFAULT_DISK: u64 = 5 << 30;
