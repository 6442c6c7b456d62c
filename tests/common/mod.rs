//! Shared test support: the simulator ([`sim`]), a whole sim + serve stack ([`stack`]), a real OpenSSH server ([`sshd`]) and the
//! endpoint-independent exec and transfer suite ([`suite`]).
#![allow(dead_code)]

pub mod sim;
pub mod sshd;
pub mod stack;
pub mod suite;

/// The suite's view of a local OpenSSH server.
pub fn openssh_remote(server: &sshd::Sshd) -> suite::Remote {
    suite::Remote {
        target: server.target(),
        connections: server.connection_counter(),
        scratch: server.scratch_dir().display().to_string(),
    }
}
