//! `mpool reload`: the running server re-reads its config file (as SIGHUP does) and applies
//! the tokens file and the TLS certificate in place; prints what it applied and what needs a
//! restart. Needs an admin token (or the Unix socket).

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::print::status_err;
use super::{Client, output};

/// `mpool reload` flags.
#[derive(Args, Debug)]
pub struct ReloadArgs {}

/// Runs `mpool reload`.
pub async fn run(client: &mut Client, _a: ReloadArgs) -> Result<ExitCode, String> {
    let r = client.reload(v1::ReloadRequest {}).await.map_err(status_err)?.into_inner();
    for a in &r.applied {
        output::line(&format!("reloaded: {a}"));
    }
    for n in &r.needs_restart {
        output::line(&format!("changed, needs a restart: {n}"));
    }
    if r.applied.is_empty() && r.needs_restart.is_empty() {
        output::line("reloaded: nothing to apply");
    }
    Ok(ExitCode::SUCCESS)
}
