//! What the integration tests share: the binary under test; everything else (stack, simulator,
//! sshd, the SSH suite, external tools) is `mpool_testkit`'s, re-exported here.

#[allow(unused_imports)]
pub use mpool_testkit::{suite, tools};

/// The mpool binary under test.
#[allow(dead_code)]
pub const MPOOL: &str = env!("CARGO_BIN_EXE_mpool");
