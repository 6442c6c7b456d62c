//! `mpool vms [--pool P] [--json]`: the VMs, their states, generations, uses, disk (used in the
//! guest when last measured, and its files on the host's data volume) and leases, as a table
//! (or JSON).

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
            .map(|m| serde_json::json!({"name": m.name, "pool": m.pool, "state": m.state, "generation": m.generation, "uses": m.uses, "lease": m.lease_id, "disk_used_bytes": m.disk_used_bytes, "image_bytes": m.image_bytes}))
            .collect();
        output::line(&serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    output::line(&format!(
        "{:<28} {:<12} {:<12} {:>4} {:>5} {:>7} {:>7} LEASE",
        "VM", "POOL", "STATE", "GEN", "USES", "DISK", "IMAGE"
    ));
    for m in vms {
        output::line(&format!(
            "{:<28} {:<12} {:<12} {:>4} {:>5} {:>7} {:>7} {}",
            m.name,
            m.pool,
            m.state,
            m.generation,
            m.uses,
            size(m.disk_used_bytes),
            size(m.image_bytes),
            m.lease_id
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// Bytes as `1.2G` / `340M` / `12K`, or `-` when unknown.
fn size(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1}G", b as f64 / f64::from(1u32 << 30)),
        Some(b) if b >= 1 << 20 => format!("{}M", b >> 20),
        Some(b) => format!("{}K", b.div_ceil(1024)),
    }
}
