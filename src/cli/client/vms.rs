//! `mpool vms [--pool P] [--json]`: the VMs, their states, generations, uses and leases, as a
//! table (or JSON).

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::print::status_err;
use super::{Client, output};

/// `mpool vms` flags.
#[derive(Args, Debug)]
pub struct VmsArgs {
    /// Only this pool.
    #[arg(long)]
    pool: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `mpool vms`.
pub async fn run(client: &mut Client, a: VmsArgs) -> Result<ExitCode, String> {
    let vms = client
        .list_vms(v1::ListVmsRequest { pool: a.pool.unwrap_or_default() })
        .await
        .map_err(status_err)?
        .into_inner()
        .vms;
    if a.json {
        let v: Vec<_> = vms
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "pool": m.pool, "state": m.state, "generation": m.generation, "uses": m.uses, "lease": m.lease_id}))
            .collect();
        output::line(&serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    output::line(&format!("{:<28} {:<12} {:<12} {:>4} {:>5} LEASE", "VM", "POOL", "STATE", "GEN", "USES"));
    for m in vms {
        output::line(&format!(
            "{:<28} {:<12} {:<12} {:>4} {:>5} {}",
            m.name, m.pool, m.state, m.generation, m.uses, m.lease_id
        ));
    }
    Ok(ExitCode::SUCCESS)
}
