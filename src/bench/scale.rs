//! Scenario 7, memory and scale: the resident memory of an `mpool serve` process managing 500
//! VMs across 10 pools, the bytes each additional VM costs, and the time from a restart after
//! `kill -9` until it has reconciled with the daemon and every pool is ready again.
//!
//! `mpool serve` runs as a child process (its RSS is read from `/proc/<pid>/status`); the
//! simulator runs in this process at time scale 0 with warm (suspended) VMs, so no SSH endpoint
//! stays open. The same is done with 50 VMs (10 pools of 5) as the baseline, and the
//! difference gives the bytes per VM. Before the kill, one acquire and release make the store
//! durable up to then (idle-state changes are written lazily by design; the release's durable
//! write commits them), so the restart finds what a daemon that has served traffic finds.

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row};
use crate::cli::output;
use mpool_api::proto::v1;
use mpool_testkit::{Serve, Stack, StackOptions, Transport, pool, wait};

const POOLS: usize = 10;

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Measured {
    vms: usize,
    warm_up_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
    restart_socket_s: f64,
    restart_reconciled_s: f64,
    restart_ready_s: f64,
    rss_after_restart_kib: u64,
    simulator_rss_kib: u64,
    simulator_fds: usize,
    simulator_fds_peak: usize,
}

/// Polls until every pool has `per` idle VMs; returns the time it took.
async fn wait_ready(stack: &Stack, per: usize, limit: Duration, peak_fds: &mut usize) -> Result<Duration, String> {
    let t = Instant::now();
    let c = wait("mpool serve answers", limit)
        .every(Duration::from_millis(5))
        .until(|| async { stack.connect(Transport::Unix).await.ok() })
        .await?;
    wait(format!("every pool has {per} idle VMs"), limit.saturating_sub(t.elapsed()))
        .every(Duration::from_millis(10))
        .until(|| {
            *peak_fds = (*peak_fds).max(measure::fd_count(std::process::id()));
            let mut c = c.clone();
            async move {
                let pools = c.list_pools(v1::ListPoolsRequest {}).await.ok()?.into_inner().pools;
                let ready = pools.len() == POOLS
                    && pools.iter().all(|p| {
                        p.vms.get("warm").copied().unwrap_or(0) + p.vms.get("hot").copied().unwrap_or(0) >= per as u32
                    });
                ready.then_some(())
            }
        })
        .await?;
    Ok(t.elapsed())
}

async fn measure(ctx: &Ctx, per: usize) -> Result<Measured, String> {
    let pools: String = (0..POOLS).map(|i| pool(&format!("p{i}"), per as u32, 0, per as u32)).collect();
    let mut o = StackOptions::bench(pools);
    o.serve = Serve::Process(ctx.exe.clone());
    o.serve_at_start = false;
    let mut stack = Stack::start(o).await?;
    let log = stack.log_path();
    let limit = Duration::from_secs(900);
    let mut m = Measured { vms: POOLS * per, ..Default::default() };

    stack.spawn_serve()?;
    let t0 = Instant::now();
    stack.wait_serving(Duration::from_secs(60)).await?;
    wait_ready(&stack, per, limit, &mut m.simulator_fds_peak).await?;
    m.warm_up_s = t0.elapsed().as_secs_f64();
    // Commit the lazily written idle states (a durable write covers everything before it).
    let mut c = stack.connect(Transport::Unix).await?;
    let (l, _) = measure::acquire(&mut c, "p0", "scale").await?;
    measure::release(&mut c, &l.id).await?;
    wait_ready(&stack, per, limit, &mut m.simulator_fds_peak).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, hwm) = stack.serve_pid().and_then(measure::rss_kib).ok_or("cannot read mpool serve's /proc status")?;
    (m.rss_kib, m.hwm_kib) = (rss, hwm);
    let me = std::process::id();
    m.simulator_rss_kib = measure::rss_kib(me).map(|r| r.0).unwrap_or(0);
    m.simulator_fds = measure::fd_count(me);
    output::line(&format!(
        "  {} VMs: warm-up {:.1} s; mpool serve VmRSS {:.1} MB (VmHWM {:.1} MB); simulator process RSS {:.0} MB, {} fds (peak {})",
        m.vms,
        m.warm_up_s,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        m.simulator_rss_kib as f64 / 1024.0,
        m.simulator_fds,
        m.simulator_fds_peak
    ));

    stack.kill_serve();
    drop(c);
    let t1 = Instant::now();
    stack.spawn_serve()?;
    stack.wait_serving(Duration::from_secs(60)).await?;
    m.restart_socket_s = t1.elapsed().as_secs_f64();
    let ready = {
        let mut peak = 0;
        let waiter = wait_ready(&stack, per, limit, &mut peak);
        tokio::pin!(waiter);
        let mut reconciled = None;
        loop {
            tokio::select! {
                r = &mut waiter => { r?; break; }
                _ = tokio::time::sleep(Duration::from_millis(2)), if reconciled.is_none() => {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.matches("reconciled with multipassd").count() >= 2 {
                        reconciled = Some(t1.elapsed());
                    }
                }
            }
        }
        if reconciled.is_none()
            && std::fs::read_to_string(&log).unwrap_or_default().matches("reconciled with multipassd").count() >= 2
        {
            reconciled = Some(t1.elapsed());
        }
        m.restart_reconciled_s = reconciled.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
        t1.elapsed()
    };
    m.restart_ready_s = ready.as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    m.rss_after_restart_kib = stack.serve_pid().and_then(measure::rss_kib).map(|r| r.0).unwrap_or(0);
    output::line(&format!(
        "  {} VMs: restart after kill -9: socket {:.3} s, reconciled {:.3} s, all pools ready {:.3} s; VmRSS after {:.1} MB",
        m.vms,
        m.restart_socket_s,
        m.restart_reconciled_s,
        m.restart_ready_s,
        m.rss_after_restart_kib as f64 / 1024.0
    ));
    stack.kill_serve();
    stack.stop().await;
    Ok(m)
}

/// Runs scenario 7.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let mut report = Report::new("scale");
    let small = measure(ctx, 5).await?;
    let large = measure(ctx, ctx.pick(50, 50)).await?;
    let mb = |kib: u64| kib as f64 / 1024.0;
    report.row(
        Row::new(format!("mpool serve VmRSS, {} VMs in {POOLS} pools", large.vms), mb(large.rss_kib), "MB")
            .of(format!("{} VMs", small.vms), mb(small.rss_kib), "x of baseline")
            .target("<= 40 MB", mb(large.rss_kib) <= 40.0),
    );
    let per_vm = (large.rss_kib as f64 - small.rss_kib as f64) * 1024.0 / (large.vms - small.vms) as f64;
    report.row(Row::new("bytes per additional VM (RSS difference)", per_vm / 1024.0, "KB"));
    report.row(
        Row::new(
            format!("restart after kill -9 to all pools ready, {} VMs", large.vms),
            large.restart_ready_s * 1e3,
            "ms",
        )
        .of(format!("{} VMs", small.vms), small.restart_ready_s * 1e3, "x of baseline"),
    );
    report.row(Row::new(
        format!("restart after kill -9 to reconciled, {} VMs", large.vms),
        large.restart_reconciled_s * 1e3,
        "ms",
    ));
    report.note(format!(
        "VmHWM (peak) during warm-up with {} VMs: {:.1} MB; VmRSS after the restart: {:.1} MB. Simulator (this process): \
         {:.0} MB RSS, {} fds at rest, {} at peak.",
        large.vms,
        mb(large.hwm_kib),
        mb(large.rss_after_restart_kib),
        mb(large.simulator_rss_kib),
        large.simulator_fds,
        large.simulator_fds_peak
    ));
    report.detail("small", small);
    report.detail("large", large);
    Ok(report)
}
