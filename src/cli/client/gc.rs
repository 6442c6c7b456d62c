//! `mpool gc [--dry-run] [--json]`: cleanup now (admins only): purges mpool's instances left
//! deleted but not purged, deletes snapshots on its idle VMs that are not its clean one, and
//! lists what it left alone and what is not mpool's (never touched).

use std::process::ExitCode;

use clap::Args;

use mpool_api::proto::v1;

use super::print::status_err;
use super::{Client, output};

/// `mpool gc` flags.
#[derive(Args, Debug)]
pub struct GcArgs {
    /// Only show what would be done.
    #[arg(long)]
    dry_run: bool,
    /// JSON (the `GcResponse` message) instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `mpool gc`.
pub async fn run(client: &mut Client, a: GcArgs) -> Result<ExitCode, String> {
    let r = client.gc(v1::GcRequest { dry_run: a.dry_run }).await.map_err(status_err)?.into_inner();
    if a.json {
        output::line(&serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?);
        return Ok(ExitCode::SUCCESS);
    }
    let (purge, delete) =
        if r.dry_run { ("would purge", "would delete snapshot") } else { ("purged", "deleted snapshot") };
    for n in &r.purged {
        output::line(&format!("{purge} {n}"));
    }
    for s in &r.snapshots_deleted {
        output::line(&format!("{delete} {s}"));
    }
    for d in &r.deferred {
        output::line(&format!("left for later {}: {}", d.what, d.why));
    }
    for f in &r.failed {
        output::line(&format!("failed {}: {}", f.what, f.why));
    }
    for n in &r.foreign_instances {
        output::line(&format!("not ours, untouched: instance {n}"));
    }
    for s in &r.foreign_snapshots {
        output::line(&format!("not ours, untouched: snapshot {s}"));
    }
    if r.purged.is_empty() && r.snapshots_deleted.is_empty() && r.failed.is_empty() {
        output::line("nothing to clean");
    }
    Ok(if r.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
