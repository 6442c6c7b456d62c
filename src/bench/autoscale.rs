//! Scenario 9, pools that size themselves: the same bursty trace against a pool that keeps a
//! static `min_ready` and against the same pool with `autoscale = "demand"`.
//!
//! The trace, on a fixed schedule (the same for every pool; arrivals do not wait for earlier
//! bursts to be served): idle, then a burst of 3x `min_ready` acquires within one second, each
//! lease held briefly and released, repeated. The pools have the same `min_ready`, `max_size`
//! and `idle_timeout` (shorter than the idle gap, so a static pool is back at `min_ready` when
//! the next burst comes); the demand pool's target decays with `autoscale_decay`, longer than
//! the gap. Then, when the demand pool spent more, the static pool again with `min_ready` raised
//! (from one below the demand pool's average number of VMs alive) until it spends as much: the
//! baseline at the same VM-seconds. Reported: mean and p95 acquire wait (also without the first
//! burst, which the demand pool learns from), cold acquires (callers that found no ready VM and
//! waited for one to be made or reset), and VM-seconds (VMs alive, integrated over the run):
//! what readiness costs. The simulator runs at time scale 0.05 while measuring (boot 1 s,
//! resume 150 ms, a reset about 1.3 s, a new VM about 3.5 s).

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, Summary, summarize};
use crate::cli::output;
use mpool_testkit::{Stack, StackOptions, Transport, pool};

const MIN_READY: u32 = 2;
const MAX_SIZE: u32 = 8;
const SCALE: f64 = 0.05;
/// Time from one burst's start to the next one's, beyond the idle gap: a burst served cold
/// (a new VM about 3.5 s, held 2 s) is over by then.
const SETTLE: Duration = Duration::from_secs(8);

#[derive(serde::Serialize)]
struct Run {
    autoscale: &'static str,
    min_ready: u32,
    wait: Summary,
    /// Waits of the bursts after the first (the demand pool learns from the first).
    wait_after_first: Summary,
    cold: usize,
    acquires: usize,
    vm_seconds: f64,
    /// VMs alive on average (VM-seconds over the run's length).
    vms_alive: f64,
    elapsed_s: f64,
}

async fn trace_run(ctx: &Ctx, autoscale: &'static str, min_ready: u32) -> Result<Run, String> {
    let bursts = ctx.pick(6, 3);
    let idle = Duration::from_secs(ctx.pick(15, 8));
    let hold = Duration::from_secs(2);
    let per_burst = 3 * MIN_READY as usize;
    let cfg = format!(
        "{}idle_timeout = \"5s\"\nautoscale = \"{autoscale}\"\nautoscale_decay = \"60s\"\n",
        pool("ci", min_ready, 0, MAX_SIZE)
    );
    let stack = Stack::start(StackOptions::bench(cfg)).await?;
    stack.settled("ci", min_ready as usize, Duration::from_secs(300)).await?;
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
    // A fixed schedule, the same for both pools (arrivals do not wait for earlier bursts to be
    // served): burst b starts at `idle + b * every`; the run ends `every` after the last one.
    let every = idle + SETTLE;
    let started = Instant::now();
    let at = |d: Duration| tokio::time::sleep_until(tokio::time::Instant::from_std(started + d));
    let mut bursts_tasks = Vec::new();
    for b in 0..bursts {
        at(idle + every * b as u32).await;
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
        bursts_tasks.push(tasks);
    }
    let (mut waits, mut cold, mut after_first) = (Vec::new(), 0, Vec::new());
    for (b, tasks) in bursts_tasks.into_iter().enumerate() {
        for t in tasks {
            let (served, d) = t.await.map_err(|e| e.to_string())??;
            cold += usize::from(served == "cold");
            waits.push(d);
            if b > 0 {
                after_first.push(d);
            }
        }
    }
    at(every * bursts as u32).await;
    let elapsed = started.elapsed();
    let _ = stop.0.send(true);
    let vm_seconds = sampler.await.map_err(|e| e.to_string())?;
    stack.sim().daemon().set_time_scale(0.0);
    stack.stop().await;
    let r = Run {
        autoscale,
        min_ready,
        wait: summarize(&waits),
        wait_after_first: summarize(&after_first),
        cold,
        acquires: waits.len(),
        vm_seconds,
        vms_alive: vm_seconds / elapsed.as_secs_f64().max(1e-9),
        elapsed_s: elapsed.as_secs_f64(),
    };
    output::line(&format!(
        "  autoscale {autoscale:6} min_ready {min_ready}: acquire wait mean {:.0} p95 {:.0} ms (after the first burst: mean {:.0} p95 {:.0} ms), {} of {} cold, {:.0} VM-seconds over {:.0} s ({:.1} VMs alive on average)",
        r.wait.mean_ms,
        r.wait.p95_ms,
        r.wait_after_first.mean_ms,
        r.wait_after_first.p95_ms,
        r.cold,
        r.acquires,
        r.vm_seconds,
        r.elapsed_s,
        r.vms_alive
    ));
    Ok(r)
}

/// Runs scenario 9.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let mut report = Report::new("autoscale");
    let demand = trace_run(ctx, "demand", MIN_READY).await?;
    let fixed = trace_run(ctx, "off", MIN_READY).await?;
    // The static pool that spends what the demand pool spent: min_ready raised from one below the
    // demand pool's average VMs alive (a static pool keeps at least min_ready) until its
    // VM-seconds reach the demand pool's.
    let mut matched = None;
    if fixed.vm_seconds < demand.vm_seconds {
        let mut m = (demand.vms_alive.floor() as u32).saturating_sub(1).clamp(MIN_READY + 1, MAX_SIZE);
        loop {
            let r = trace_run(ctx, "off", m).await?;
            let done = r.vm_seconds >= demand.vm_seconds || m >= MAX_SIZE;
            matched = Some(r);
            if done {
                break;
            }
            m += 1;
        }
    }
    let rows = |report: &mut Report, base: &Run, name: &str| {
        report.row(
            Row::new("acquire wait mean, autoscale demand", demand.wait.mean_ms, "ms").vs(name, base.wait.mean_ms),
        );
        report.row(Row::new("acquire wait p95, autoscale demand", demand.wait.p95_ms, "ms").vs(name, base.wait.p95_ms));
        report.row(
            Row::new("acquire wait p95 after the first burst, autoscale demand", demand.wait_after_first.p95_ms, "ms")
                .vs(name, base.wait_after_first.p95_ms),
        );
        report.row(Row::new("cold acquires, autoscale demand", demand.cold as f64, "acquires").of(
            name,
            base.cold as f64,
            "x of static",
        ));
        report.row(Row::new("VM-seconds, autoscale demand", demand.vm_seconds, "VM-s").of(
            name,
            base.vm_seconds,
            "x of static",
        ));
    };
    rows(&mut report, &fixed, &format!("static min_ready {MIN_READY}"));
    if let Some(m) = &matched {
        rows(&mut report, m, &format!("static min_ready {} (VM-seconds matched)", m.min_ready));
    }
    report.note(format!(
        "Trace: idle, then a burst of {} acquires within 1 s held 2 s each, repeated every idle + {} s on a fixed \
         schedule; min_ready {MIN_READY}, max_size {MAX_SIZE}, idle_timeout 5 s, autoscale_decay 60 s. The demand pool \
         learns from the first burst, so its first burst is as cold as the static pool's (with few bursts, the p95 over all of them falls in \
         that burst); \"VM-seconds matched\": the static pool with min_ready raised until it spends what demand spent.",
        3 * MIN_READY,
        SETTLE.as_secs()
    ));
    report.detail("time_scale", SCALE);
    report.detail("runs", [Some(&demand), Some(&fixed), matched.as_ref()]);
    Ok(report)
}
