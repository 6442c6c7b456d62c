//! `mpool leases [--pool P]`: the leases, one line of JSON each.

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::print::{lease_json, status_err};
use super::{Client, output};

/// `mpool leases` flags.
#[derive(Args, Debug)]
pub struct LeasesArgs {
    /// Only this pool.
    #[arg(long)]
    pool: Option<String>,
}

/// Runs `mpool leases`.
pub async fn run(client: &mut Client, a: LeasesArgs) -> Result<ExitCode, String> {
    let leases = client
        .list_leases(v1::ListLeasesRequest { pool: a.pool.unwrap_or_default() })
        .await
        .map_err(status_err)?
        .into_inner()
        .leases;
    for l in leases {
        output::line(&lease_json(&l));
    }
    Ok(ExitCode::SUCCESS)
}
