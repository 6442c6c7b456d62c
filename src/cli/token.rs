//! `mpool token new --name N --pool P`: a new random API token, and the lines to add to the
//! tokens file (which stores only its SHA-256 hash).

use std::process::ExitCode;

use clap::Subcommand;

use super::output;

/// Token subcommands.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new random token and the line to add to the tokens file (only its hash is stored).
    New {
        /// The token's name (owner of the leases it acquires).
        #[arg(long)]
        name: String,
        /// A pool it may use (repeatable; `*` for all).
        #[arg(long = "pool", required_unless_present = "admin")]
        pools: Vec<String>,
        /// Admin: all pools, every lease.
        #[arg(long)]
        admin: bool,
    },
}

/// Runs a token subcommand.
pub fn run(cmd: TokenCommand) -> ExitCode {
    match cmd {
        TokenCommand::New { name, pools, admin } => new(&name, &pools, admin),
    }
}

fn new(name: &str, pools: &[String], admin: bool) -> ExitCode {
    let token = mpool_api::auth::new_token();
    let hash = mpool_api::auth::hex(&mpool_api::auth::hash(&token));
    output::line(&format!("token (give it to the client; it is not stored):\n  {token}\n"));
    output::line(&format!(
        "add to the tokens file:\n[[tokens]]\nname = {name:?}\nsha256 = \"{hash}\"\npools = {pools:?}\nadmin = {admin}"
    ));
    ExitCode::SUCCESS
}
