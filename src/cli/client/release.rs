//! `mpool release LEASE`: ends a lease (the server resets its VM in the background).

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::Client;
use super::print::status_err;

/// `mpool release` flags.
#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// Lease id, or the handle `mpool acquire` printed.
    pub lease: String,
}

/// Runs `mpool release`.
pub async fn run(client: &mut Client, lease_id: String) -> Result<ExitCode, String> {
    client.release(v1::ReleaseRequest { lease_id }).await.map_err(status_err)?;
    Ok(ExitCode::SUCCESS)
}
