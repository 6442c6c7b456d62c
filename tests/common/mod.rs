//! Shared test support: the simulator ([`sim`]), a whole sim + serve stack ([`stack`]), a real OpenSSH server ([`sshd`]), the
//! endpoint-independent exec and transfer suite ([`suite`]) and external client tools ([`tools`]).
#![allow(dead_code)]

pub mod sim;
pub mod sshd;
pub mod stack;
pub mod suite;
pub mod tools;

/// The suite's view of a local OpenSSH server.
pub fn openssh_remote(server: &sshd::Sshd) -> suite::Remote {
    suite::Remote {
        target: server.target(),
        connections: server.connection_counter(),
        scratch: server.scratch_dir().display().to_string(),
    }
}
