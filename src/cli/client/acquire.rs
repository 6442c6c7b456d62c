//! `mpool acquire --pool P`: waits for a VM and leases it; prints the lease id (or the lease as
//! JSON with `--json`). With several endpoints it leases from the host [`Fleet::choose`] picks
//! and prints a lease handle that names the host (JSON: `handle` and `endpoint` besides).

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::flags::dur;
use super::print::{lease_json, lease_value, status_err};
use super::run::wait_flag;
use super::waiting::Waiting;
use super::{Client, output};
use crate::fleet::{Fleet, handle};

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

/// Runs `mpool acquire` over several hosts.
pub async fn run_fleet(fleet: &mut Fleet, a: AcquireArgs) -> Result<ExitCode, String> {
    let wait = wait_flag(&a.wait)?;
    let req = v1::AcquireRequest {
        pool: a.pool.clone(),
        holder: a.holder,
        request_id: a.request_id.unwrap_or_default(),
        ttl: dur("--ttl", &a.ttl)?,
        wait: None,
    };
    let waiting = Waiting::start(&a.pool);
    let chosen = fleet
        .choose(&a.pool, wait, |mut client, wait| {
            let req = v1::AcquireRequest { wait: wait.map(mpool_api::convert::proto_duration), ..req.clone() };
            async move { client.acquire(req).await.map(tonic::Response::into_inner) }
        })
        .await;
    drop(waiting);
    let (host, lease) = chosen.map_err(|e| e.to_string())?;
    let endpoint = fleet.endpoints().get(host).cloned().unwrap_or_default();
    let handle = handle::encode(&lease.id, &endpoint);
    if a.json {
        let mut v = lease_value(&lease);
        if let Some(m) = v.as_object_mut() {
            m.insert("handle".into(), handle.into());
            m.insert("endpoint".into(), endpoint.into());
        }
        output::line(&v.to_string());
    } else {
        output::line(&handle);
    }
    Ok(ExitCode::SUCCESS)
}
