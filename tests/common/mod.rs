//! What only the integration tests share: the binary under test, the endpoint-independent exec
//! and transfer suite ([`suite`]) and external client tools ([`tools`]). Everything they start
//! (simulator, stack, sshd) comes from `mpool_testkit`.
#![allow(dead_code)]

pub mod suite;
pub mod tools;

/// The mpool binary under test.
pub const MPOOL: &str = env!("CARGO_BIN_EXE_mpool");

/// The suite's view of a local OpenSSH server.
pub fn openssh_remote(server: &mpool_testkit::Sshd) -> suite::Remote {
    suite::Remote {
        target: server.target(),
        connections: server.connection_counter(),
        scratch: server.scratch_dir().display().to_string(),
    }
}
