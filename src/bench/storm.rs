//! Scenario 6, release storm: the latency of warm acquires while 20 resets are pending vs when
//! the daemon is idle, and vs the same run with the scheduler's priorities turned off.
//!
//! multipassd runs stop, restore and suspend on its main thread: while one runs, every other
//! call waits. A reset is a forced stop, a restore, a boot and a suspend, so 20 released VMs put
//! some 60 daemon-blocking operations in line. mpool's scheduler lets at most one of them be in
//! flight and sends a waiting caller's resume ahead of the queue; with priorities off it is one
//! FIFO queue. Each round: W warm acquires one after another on an idle daemon (held); 20 more
//! leases taken and released at once (the storm); once the first restore runs, W warm acquires
//! one after another; then everything is released and the pool settles. The simulator runs at
//! time scale 0.01 while measuring (resume 30 ms + its 10 ms clock sync, forced stop 10 ms,
//! restore 10 ms, suspend 30 ms, boot 200 ms), as in `tests/pool_sim.rs`.

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, Summary, summarize};
use crate::cli::output;
use mpool_sim::EventKind;
use mpool_testkit::{Stack, StackOptions, Transport, pool};

const STORM: usize = 20;
const SCALE: f64 = 0.01;

#[derive(serde::Serialize)]
struct Run {
    priorities: bool,
    idle: Summary,
    storm: Summary,
    queued_at_storm_acquires: Vec<usize>,
}

async fn storm_run(ctx: &Ctx, priorities: bool) -> Result<Run, String> {
    let w = ctx.pick(4, 3);
    let rounds = ctx.pick(8, 2);
    let size = STORM + 2 * w;
    let mut o = StackOptions::bench(pool("ci", size as u32, 0, size as u32));
    o.priorities = priorities;
    let stack = Stack::start(o).await?;
    stack.settled("ci", size, Duration::from_secs(300)).await?;
    let mut c = stack.connect(Transport::Unix).await?;
    stack.sim().daemon().set_time_scale(SCALE);
    let (mut idle, mut storm, mut queued) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut held = Vec::new();
        for i in 0..w {
            let (l, d) = measure::acquire(&mut c, "ci", &format!("idle-{round}-{i}")).await?;
            if measure::served(&l) != "warm" {
                return Err(format!("idle acquire served {}", measure::served(&l)));
            }
            idle.push(d);
            held.push(l.id);
        }
        let tasks: Vec<_> = (0..STORM)
            .map(|i| {
                let mut c = c.clone();
                tokio::spawn(async move { measure::acquire(&mut c, "ci", &format!("storm-{round}-{i}")).await })
            })
            .collect();
        let mut storm_leases = Vec::new();
        for t in tasks {
            storm_leases.push(t.await.map_err(|e| e.to_string())??.0.id);
        }
        let mut ev = stack.sim().events();
        for id in &storm_leases {
            measure::release(&mut c, id).await?;
        }
        // Wait until the storm is really in flight (a restore is running).
        let t = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), ev.recv()).await {
                Ok(Ok(e)) if e.op == "restore" && e.kind == EventKind::Working => break,
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                _ => return Err("no restore started after the storm's releases".into()),
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("no restore started after the storm's releases".into());
            }
        }
        for i in 0..w {
            queued.push(stack.status().await?.queued_daemon_calls);
            let (l, d) = measure::acquire(&mut c, "ci", &format!("urgent-{round}-{i}")).await?;
            if measure::served(&l) != "warm" {
                return Err(format!("storm acquire served {}", measure::served(&l)));
            }
            storm.push(d);
            held.push(l.id);
        }
        for id in held {
            measure::release(&mut c, &id).await?;
        }
        stack.settled("ci", size, Duration::from_secs(300)).await?;
    }
    stack.sim().daemon().set_time_scale(0.0);
    stack.stop().await;
    let r = Run { priorities, idle: summarize(&idle), storm: summarize(&storm), queued_at_storm_acquires: queued };
    output::line(&format!(
        "  priorities {}: warm acquire idle p50 {:.1} p95 {:.1} ms | during storm p50 {:.1} p95 {:.1} ms ({} samples; daemon calls queued at those acquires: {:?})",
        if priorities { "on " } else { "off" },
        r.idle.p50_ms,
        r.idle.p95_ms,
        r.storm.p50_ms,
        r.storm.p95_ms,
        r.storm.n,
        r.queued_at_storm_acquires
    ));
    Ok(r)
}

/// Runs scenario 6.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let mut report = Report::new("storm");
    let on = storm_run(ctx, true).await?;
    let off = storm_run(ctx, false).await?;
    let ratio_on = on.storm.p95_ms / on.idle.p95_ms.max(1e-9);
    report.row(
        Row::new("warm acquire p95, 20 resets pending, priorities on", on.storm.p95_ms, "ms")
            .of("idle daemon p95", on.idle.p95_ms, "x of idle")
            .target("<= 1.5x idle", ratio_on <= 1.5),
    );
    report.row(Row::new("warm acquire p95, 20 resets pending, priorities off", off.storm.p95_ms, "ms").of(
        "idle daemon p95",
        off.idle.p95_ms,
        "x of idle",
    ));
    report.row(
        Row::new("warm acquire p95 during the storm, priorities on", on.storm.p95_ms, "ms")
            .vs("priorities off", off.storm.p95_ms),
    );
    report.note(
        "With priorities on, a warm acquire's resume waits for at most the one daemon-blocking operation already in flight \
         (up to a 30 ms suspend) plus the daemon lock for its clock sync; with them off it waits behind the whole queue.",
    );
    report.detail("time_scale", SCALE);
    report.detail("runs", [&on, &off]);
    Ok(report)
}
