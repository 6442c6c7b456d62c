//! `mpool status [--json]`: the pools and how many of their VMs are in each state, as a table
//! (or JSON).

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::print::status_err;
use super::{Client, output};

/// `mpool status` flags.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The states with a column of their own; the others add up in OTHER.
const KNOWN: [&str; 5] = ["hot", "warm", "leased", "resetting", "provisioning"];

/// Runs `mpool status`.
pub async fn run(client: &mut Client, a: StatusArgs) -> Result<ExitCode, String> {
    let pools = client.list_pools(v1::ListPoolsRequest {}).await.map_err(status_err)?.into_inner().pools;
    if a.json {
        let v: Vec<_> = pools
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "vms": p.vms, "waiters": p.waiters, "leases": p.leases, "daemon_ok": p.daemon_ok}))
            .collect();
        output::line(&serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    output::line(&format!(
        "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}",
        "POOL", "HOT", "WARM", "LEASED", "RESETTING", "PROVISIONING", "OTHER", "WAITERS", "MAX"
    ));
    for p in &pools {
        output::line(&row(p));
    }
    Ok(ExitCode::SUCCESS)
}

/// A pool's line of the table.
fn row(p: &v1::PoolInfo) -> String {
    let get = |k: &str| p.vms.get(k).copied().unwrap_or(0);
    let other: u32 = p.vms.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())).map(|(_, v)| v).sum();
    let max = p.config.as_ref().map(|c| c.max_size).unwrap_or(0);
    format!(
        "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}",
        p.name,
        get("hot"),
        get("warm"),
        get("leased"),
        get("resetting"),
        get("provisioning"),
        other,
        p.waiters,
        max
    )
}
