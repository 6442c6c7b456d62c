//! `mpool acquire --pool P`: waits for a VM and leases it; prints the lease id (or the lease as
//! JSON with `--json`).

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::flags::dur;
use super::print::{lease_json, status_err};
use super::waiting::Waiting;
use super::{Client, output};

/// `mpool acquire` flags.
#[derive(Args, Debug)]
pub struct AcquireArgs {
    /// Pool.
    #[arg(long)]
    pool: String,
    /// Lease time to live, e.g. 30m.
    #[arg(long)]
    ttl: Option<String>,
    /// Wait at most this long for a VM.
    #[arg(long)]
    wait: Option<String>,
    /// Holder shown in listings.
    #[arg(long, default_value = "cli")]
    holder: String,
    /// Idempotency key.
    #[arg(long)]
    request_id: Option<String>,
    /// Print the lease as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `mpool acquire`.
pub async fn run(client: &mut Client, a: AcquireArgs) -> Result<ExitCode, String> {
    let waiting = Waiting::start(&a.pool);
    let lease = client
        .acquire(v1::AcquireRequest {
            pool: a.pool,
            holder: a.holder,
            request_id: a.request_id.unwrap_or_default(),
            ttl: dur("--ttl", &a.ttl)?,
            wait: dur("--wait", &a.wait)?,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    drop(waiting);
    if a.json {
        output::line(&lease_json(&lease));
    } else {
        output::line(&lease.id);
    }
    Ok(ExitCode::SUCCESS)
}
