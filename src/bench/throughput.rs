//! Scenario 2, lease throughput: acquire -> release -> reset complete, 16 VMs, time scale 0.
//!
//! 16 clients (one connection each) loop acquire -> release against a pool of 16 hot VMs; each
//! release starts the VM's reset (forced stop, restore of the clean snapshot, start, SSH
//! readiness check), and a client whose acquire finds no idle VM waits for a reset to finish.
//! The clock runs from the first acquire until every reset of the run has completed (the pool is
//! back to 16 idle VMs), so the rate counts complete cycles.
//!
//! Baseline, same run, same simulator: 16 shell-recipe workers, each owning one VM (the recipe
//! cannot share VMs safely), cycling with one `mpool multipass` process per step:
//! `list | grep Suspended | head -1`, `start`, `stop`, `restore --destructive`, `suspend`.

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, summarize};
use crate::cli::output;
use mpool_testkit::{Stack, StackOptions, Transport, pool};

const VMS: usize = 16;

/// Runs scenario 2.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let per = ctx.pick(40, 8);
    let cli_per = ctx.pick(3, 1);
    let mut report = Report::new("throughput");
    let stack = Stack::start(StackOptions::bench(pool("tp", VMS as u32, VMS as u32, VMS as u32))).await?;
    stack.settled("tp", VMS, Duration::from_secs(300)).await?;

    let mut conns = Vec::new();
    for _ in 0..VMS {
        conns.push(stack.connect(Transport::Unix).await?);
    }
    // One untimed cycle per client first (connections, caches).
    for c in conns.iter_mut() {
        let (l, _) = measure::acquire(c, "tp", "warm-up").await?;
        measure::release(c, &l.id).await?;
    }
    stack.settled("tp", VMS, Duration::from_secs(300)).await?;

    let t0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let mut v = Vec::new();
                for k in 0..per {
                    let (l, d) = measure::acquire(&mut c, "tp", &format!("w{i}-{k}")).await?;
                    measure::release(&mut c, &l.id).await?;
                    v.push((d, measure::served(&l)));
                }
                Ok::<_, String>(v)
            })
        })
        .collect();
    let mut acq = Vec::new();
    let mut served = std::collections::BTreeMap::<&str, usize>::new();
    for t in tasks {
        for (d, s) in t.await.map_err(|e| e.to_string())?? {
            acq.push(d);
            *served.entry(s).or_default() += 1;
        }
    }
    let clients_done = t0.elapsed();
    stack.settled("tp", VMS, Duration::from_secs(300)).await?;
    let elapsed = t0.elapsed();
    let cycles = VMS * per;
    let rate = cycles as f64 / elapsed.as_secs_f64();
    let a = summarize(&acq);
    output::line(&format!(
        "  mpool: {cycles} cycles in {:.2} s = {rate:.0} cycles/s (clients done at {:.2} s); acquire p50 {:.1} ms; {served:?}",
        elapsed.as_secs_f64(),
        clients_done.as_secs_f64(),
        a.p50_ms
    ));

    // The shell recipe: 16 workers, one VM each, one process per step.
    let d = stack.daemon_client().await?;
    for i in 0..VMS {
        measure::recipe_vm(&d, &format!("recipe-{i:02}")).await?;
    }
    let t1 = Instant::now();
    let tasks: Vec<_> = (0..VMS)
        .map(|i| {
            let (exe, mut env) = (ctx.exe.clone(), stack.cli_env());
            env.push(("MPOOL".into(), exe.display().to_string()));
            tokio::spawn(async move {
                let vm = format!("recipe-{i:02}");
                let snap = format!("{vm}.clean");
                let limit = Duration::from_secs(120);
                let sh = std::path::Path::new("/bin/sh");
                for _ in 0..cli_per {
                    measure::run_process(
                        sh,
                        &["-c", "\"$MPOOL\" multipass list | grep Suspended | head -1"],
                        &env,
                        None,
                        limit,
                    )
                    .await?;
                    for step in [
                        vec!["multipass", "start", &vm],
                        vec!["multipass", "stop", &vm],
                        vec!["multipass", "restore", &snap, "--destructive"],
                        vec!["multipass", "suspend", &vm],
                    ] {
                        measure::run_process(&exe, &step, &env, None, limit).await?;
                    }
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let cli_elapsed = t1.elapsed();
    let cli_cycles = VMS * cli_per;
    let cli_rate = cli_cycles as f64 / cli_elapsed.as_secs_f64();
    output::line(&format!(
        "  CLI way: {cli_cycles} cycles in {:.2} s = {cli_rate:.1} cycles/s",
        cli_elapsed.as_secs_f64()
    ));
    stack.stop().await;

    report.row(
        Row::new("lease cycles/s (acquire, release, reset done), 16 VMs", rate, "cycles/s")
            .vs_rate("CLI recipe, 16 workers", cli_rate)
            .target(">= 1000 cycles/s", rate >= 1000.0),
    );
    report.row(Row::new("acquire p50 during the run (includes waiting for resets)", a.p50_ms, "ms"));
    report.note(
        "A cycle holds the daemon's lock twice (forced stop, restore), opens a new SSH connection (the VM rebooted) and \
         writes the store durably twice (grant, release); with 16 VMs and 16 clients most acquires wait for a reset.",
    );
    report.detail("cycles", cycles);
    report.detail("elapsed_s", elapsed.as_secs_f64());
    report.detail("cycles_per_s", rate);
    report.detail("acquire", a);
    report.detail("served", &served);
    report.detail("cli_cycles", cli_cycles);
    report.detail("cli_elapsed_s", cli_elapsed.as_secs_f64());
    report.detail("cli_cycles_per_s", cli_rate);
    Ok(report)
}
