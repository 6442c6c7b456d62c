//! `mpool renew LEASE [--ttl 30m]`: extends a lease; prints it as one line of JSON.

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::flags::dur;
use super::print::{lease_json, status_err};
use super::{Client, output};

/// `mpool renew` flags.
#[derive(Args, Debug)]
pub struct RenewArgs {
    /// Lease id, or the handle `mpool acquire` printed.
    pub lease: String,
    /// New time to live, e.g. 30m.
    #[arg(long)]
    ttl: Option<String>,
}

/// Runs `mpool renew`.
pub async fn run(client: &mut Client, lease_id: String, a: RenewArgs) -> Result<ExitCode, String> {
    let l = client.renew(v1::RenewRequest { lease_id, ttl: dur("--ttl", &a.ttl)? }).await.map_err(status_err)?;
    output::line(&lease_json(l.get_ref()));
    Ok(ExitCode::SUCCESS)
}
