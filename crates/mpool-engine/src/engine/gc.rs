//! Cleanup (`mpool gc`) in the actor: list the daemon's instances and snapshots at the lowest
//! priority, let the state decide (`mpool_core::pool::cleanup`) and claim the VMs it prunes,
//! then purge and delete one by one through the scheduler, and free the claimed VMs. Runs every
//! `gc_interval` and on demand ([`super::Engine::gc`]); a dry run only reports.

use std::time::Duration;

use mpool_core::pool::cleanup::{Cleanup, Deferred};
use mpool_core::ports::{Observed, StepError};

use super::{Actor, EngineError, Msg, Reply};
use crate::plans::{CLEAN_SNAPSHOT, Ctx};
use crate::scheduler::{Op, Priority};

/// What one cleanup run found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Only reported; nothing was touched.
    pub dry_run: bool,
    /// What it found: purged and deleted (unless a dry run), deferred, and not ours.
    pub found: Cleanup,
    /// Purges and deletions that failed, and why (the next run tries again).
    pub failed: Vec<Deferred>,
}

/// The daemon's instances and snapshots.
type Listing = (Vec<Observed>, Vec<(String, String)>);

/// The steps of a cleanup run, as messages to the actor.
pub(super) enum GcMsg {
    /// Start a run (`reply`: a caller waits for the report; `None`: the periodic run).
    Start { dry_run: bool, reply: Option<Reply<GcReport>> },
    /// The daemon's listing arrived.
    Listed { listing: Result<Listing, StepError>, dry_run: bool, reply: Option<Reply<GcReport>> },
    /// The run is over: free the VMs it claimed.
    Done { claimed: Vec<String> },
}

fn answer(reply: Option<Reply<GcReport>>, report: Result<GcReport, EngineError>) {
    match (reply, report) {
        (Some(r), report) => drop(r.send(report)),
        (None, Err(e)) => tracing::warn!("cleanup did not run: {e}"),
        (None, Ok(_)) => {}
    }
}

impl Actor {
    /// Handles one step of a cleanup run.
    pub(super) fn gc(&mut self, msg: GcMsg) {
        match msg {
            GcMsg::Start { dry_run, reply } => {
                let (ctx, tx) = (self.ctx.clone(), self.tx.clone());
                self.tasks.spawn(async move {
                    let listing = list(&ctx).await;
                    let _ = tx.send(Msg::Gc(GcMsg::Listed { listing, dry_run, reply })).await;
                });
            }
            GcMsg::Listed { listing, dry_run, reply } => {
                let (instances, snapshots) = match listing {
                    Ok(l) => l,
                    Err(e) => {
                        let why = format!("cleanup could not list multipassd's instances: {}", e.message);
                        return answer(reply, Err(EngineError::Unavailable(why)));
                    }
                };
                let found = match self
                    .with_env(|state, env| state.cleanup(env, CLEAN_SNAPSHOT, &instances, &snapshots, dry_run))
                {
                    Ok(found) => found,
                    Err(e) => return answer(reply, Err(e)),
                };
                if dry_run || found.is_empty() {
                    return answer(reply, Ok(GcReport { dry_run, found, failed: Vec::new() }));
                }
                let (ctx, tx) = (self.ctx.clone(), self.tx.clone());
                self.tasks.spawn(async move {
                    let failed = clean(&ctx, &found).await;
                    let mut claimed: Vec<String> = found.delete_snapshots.iter().map(|s| s.instance.clone()).collect();
                    claimed.dedup();
                    let _ = tx.send(Msg::Gc(GcMsg::Done { claimed })).await;
                    answer(reply, Ok(GcReport { dry_run, found, failed }));
                });
            }
            GcMsg::Done { claimed } => {
                for vm in claimed {
                    self.with_env(|state, env| state.cleanup_done(env, &vm));
                }
            }
        }
    }

    /// Starts a cleanup run every `interval` (none when it is zero).
    pub(super) fn spawn_gc_timer(&self, interval: Duration) {
        if interval.is_zero() {
            return;
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tx.send(Msg::Gc(GcMsg::Start { dry_run: false, reply: None })).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The daemon's instances and snapshots, asked for at cleanup's priority.
async fn list(ctx: &Ctx) -> Result<Listing, StepError> {
    let daemon = &ctx.ports.daemon;
    let instances = ctx.sched.run(Priority::Cleanup, "", Op::Quick, daemon.list()).await?;
    let snapshots = ctx.sched.run(Priority::Cleanup, "", Op::Quick, daemon.snapshots()).await?;
    Ok((instances, snapshots))
}

/// Purges and deletes what cleanup decided, one call at a time at the lowest priority; returns
/// what failed.
async fn clean(ctx: &Ctx, found: &Cleanup) -> Vec<Deferred> {
    let (sched, daemon) = (&ctx.sched, &ctx.ports.daemon);
    let mut failed = Vec::new();
    for name in &found.purge {
        // `delete {names: [name], purge: true}`: this instance only, never the Purge RPC.
        match sched.run(Priority::Cleanup, name, Op::Blocking, daemon.delete(name.clone())).await {
            Ok(()) => tracing::info!(instance = %name, "gc: purged our deleted instance"),
            Err(e) => failed.push(Deferred { what: name.clone(), why: e.message }),
        }
    }
    for s in &found.delete_snapshots {
        let call = daemon.delete_snapshot(s.instance.clone(), s.snapshot.clone());
        match sched.run(Priority::Cleanup, &s.instance, Op::Blocking, call).await {
            Ok(()) => tracing::info!(snapshot = %s, "gc: deleted a snapshot that is not ours"),
            Err(e) => failed.push(Deferred { what: s.to_string(), why: e.message }),
        }
    }
    for f in &failed {
        tracing::warn!(what = %f.what, "gc: {}", f.why);
    }
    failed
}
