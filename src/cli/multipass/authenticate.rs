//! `authenticate [PASSPHRASE]`: asks the daemon to trust this client. The work happens while
//! connecting (see `connect.rs`: an untrusted client authenticates with the passphrase, this
//! argument first); the verb only reports it.

use std::process::ExitCode;

use clap::Args;

use mpool_multipass::Error;

use super::Reply;

/// `authenticate` flags.
#[derive(Args, Debug)]
pub struct AuthenticateArgs {
    /// The daemon's passphrase (prefer --passphrase-file: arguments show in `ps`).
    pub passphrase: Option<String>,
}

/// Runs `authenticate` (connecting already did the work).
pub fn run(reply: Reply) -> Result<ExitCode, Error> {
    reply.done("This client is trusted by multipassd.")
}
