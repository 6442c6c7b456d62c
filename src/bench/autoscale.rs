//! Scenario 9, pools that size themselves: the same bursty trace against a pool that keeps a
//! static `min_ready` and against the same pool with `autoscale = "demand"`.
//!
//! The trace, repeated: idle, then a burst of 3x `min_ready` acquires within one second, each
//! lease held briefly and released. Both pools have the same `min_ready`, `max_size` and
//! `idle_timeout` (shorter than the idle gap, so a static pool is back at `min_ready` when the
//! next burst comes); the demand pool's target decays with `autoscale_decay`, longer than the
//! gap. Reported: mean and p95 acquire wait, cold acquires (callers that found no ready VM and
//! waited for one to be made or reset), and VM-seconds (VMs alive, integrated over the run):
//! what readiness costs. Ratios only; there is no target. The simulator runs at time scale
//! 0.05 while measuring (boot 1 s, resume 150 ms, a reset about 1.3 s, a new VM about 3.5 s).

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, Summary, summarize};
use crate::cli::output;
use mpool_testkit::{Stack, StackOptions, Transport, pool};

const MIN_READY: u32 = 2;
const MAX_SIZE: u32 = 8;
const SCALE: f64 = 0.05;

#[derive(serde::Serialize)]
struct Run {
    autoscale: &'static str,
    wait: Summary,
    cold: usize,
    acquires: usize,
    vm_seconds: f64,
    elapsed_s: f64,
}

async fn trace_run(ctx: &Ctx, autoscale: &'static str) -> Result<Run, String> {
    let bursts = ctx.pick(6, 3);
    let idle = Duration::from_secs(ctx.pick(15, 8));
    let hold = Duration::from_secs(2);
    let per_burst = 3 * MIN_READY as usize;
    let cfg = format!(
        "{}idle_timeout = \"5s\"\nautoscale = \"{autoscale}\"\nautoscale_decay = \"60s\"\n",
        pool("ci", MIN_READY, 0, MAX_SIZE)
    );
    let stack = Stack::start(StackOptions::bench(cfg)).await?;
    stack.settled("ci", MIN_READY as usize, Duration::from_secs(300)).await?;
    stack.sim().daemon().set_time_scale(SCALE);
    let c = stack.connect(Transport::Unix).await?;

    // VMs alive, sampled every 100 ms, integrated.
    let stop = tokio::sync::watch::channel(false);
    let sampler = {
        let engine = stack.engine()?.clone();
        let mut stop_rx = stop.1.clone();
        tokio::spawn(async move {
            let mut vm_seconds = 0.0;
            let mut last = Instant::now();
            loop {
                let n = engine.status().await.map(|s| s.vms.len()).unwrap_or(0);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop_rx.changed() => break,
                }
                vm_seconds += n as f64 * last.elapsed().as_secs_f64();
                last = Instant::now();
            }
            vm_seconds
        })
    };
    let started = Instant::now();
    let (mut waits, mut cold) = (Vec::new(), 0);
    for b in 0..bursts {
        tokio::time::sleep(idle).await;
        let tasks: Vec<_> = (0..per_burst)
            .map(|i| {
                let mut c = c.clone();
                // Spread within one second.
                let after = Duration::from_millis((1000 * i / per_burst) as u64);
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let (l, d) = measure::acquire(&mut c, "ci", &format!("burst-{b}-{i}")).await?;
                    tokio::time::sleep(hold).await;
                    measure::release(&mut c, &l.id).await?;
                    Ok::<_, String>((measure::served(&l).to_string(), d))
                })
            })
            .collect();
        for t in tasks {
            let (served, d) = t.await.map_err(|e| e.to_string())??;
            cold += usize::from(served == "cold");
            waits.push(d);
        }
    }
    let elapsed = started.elapsed();
    let _ = stop.0.send(true);
    let vm_seconds = sampler.await.map_err(|e| e.to_string())?;
    stack.sim().daemon().set_time_scale(0.0);
    stack.stop().await;
    let r = Run {
        autoscale,
        wait: summarize(&waits),
        cold,
        acquires: waits.len(),
        vm_seconds,
        elapsed_s: elapsed.as_secs_f64(),
    };
    output::line(&format!(
        "  autoscale {autoscale:6}: acquire wait mean {:.0} p95 {:.0} ms, {} of {} cold, {:.0} VM-seconds over {:.0} s",
        r.wait.mean_ms, r.wait.p95_ms, r.cold, r.acquires, r.vm_seconds, r.elapsed_s
    ));
    Ok(r)
}

/// Runs scenario 9.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let mut report = Report::new("autoscale");
    let fixed = trace_run(ctx, "off").await?;
    let demand = trace_run(ctx, "demand").await?;
    report.row(
        Row::new("acquire wait mean, autoscale demand", demand.wait.mean_ms, "ms")
            .vs("static min_ready", fixed.wait.mean_ms),
    );
    report.row(
        Row::new("acquire wait p95, autoscale demand", demand.wait.p95_ms, "ms")
            .vs("static min_ready", fixed.wait.p95_ms),
    );
    report.row(Row::new("cold acquires, autoscale demand", demand.cold as f64, "acquires").of(
        "static min_ready",
        fixed.cold as f64,
        "x of static",
    ));
    report.row(Row::new("VM-seconds, autoscale demand", demand.vm_seconds, "VM-s").of(
        "static min_ready",
        fixed.vm_seconds,
        "x of static",
    ));
    report.note(format!(
        "Trace: idle, then a burst of {} acquires within 1 s held 2 s each, repeated; min_ready {MIN_READY}, max_size \
         {MAX_SIZE}, idle_timeout 5 s, autoscale_decay 60 s. The demand pool learns from the first burst, so its first \
         burst is as cold as the static pool's.",
        3 * MIN_READY
    ));
    report.detail("time_scale", SCALE);
    report.detail("runs", [&fixed, &demand]);
    Ok(report)
}
