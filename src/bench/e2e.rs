//! Scenario 5, end to end with the realistic timing profile: from a task's request to the
//! first output of `echo ok`, for hot, warm and cold VMs, vs the shell recipe mpool replaces,
//! run step by step against the same simulator, each step a separate `mpool multipass` process:
//!
//! ```sh
//! vm=$(multipass list | grep Suspended | head -1)   # pick a VM
//! multipass start $vm; multipass exec $vm -- echo ok # the task
//! multipass stop $vm; multipass restore $vm.clean --destructive; multipass suspend $vm
//! ```
//!
//! multipassd ignores `suspend` of a stopped instance, so the recipe leaves its VM stopped: its
//! first run finds a suspended VM (one resume), every later run boots one (its steady state).
//! Both are measured. Reported: time to first output; a task's wall time (request to done; the
//! recipe's task runs its own cleanup, mpool's release returns at once); cold: a request made as
//! the only VM's last task ends (mpool: release, then an acquire that waits for that VM's reset;
//! the recipe: its cleanup, then its next run); and the time until the VM is back in the pool
//! (mpool: release to warm again; the recipe: its cleanup).
//!
//! Full runs use time scale 1 (real Multipass timings: resume ~4 s, boot ~20 s, graceful stop
//! ~6 s, forced stop ~1 s, restore ~1 s, suspend ~3 s). `--quick` uses 0.05 and reports the
//! figures as measured (not scaled back: process and SSH costs do not scale).

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, summarize};
use crate::cli::output;
use mpool_testkit::{Stack, StackOptions, Transport, pool};

#[derive(Default, serde::Serialize)]
struct Side {
    hot_first_output: Vec<f64>,
    warm_first_output: Vec<f64>,
    cold_first_output: Vec<f64>,
    hot_task_wall: Vec<f64>,
    warm_task_wall: Vec<f64>,
    cold_task_wall: Vec<f64>,
    turnaround: Vec<f64>,
    back_in_pool: Vec<f64>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn med(v: &[f64]) -> f64 {
    let d: Vec<Duration> = v.iter().map(|s| Duration::from_secs_f64(*s)).collect();
    summarize(&d).p50_ms / 1e3
}

/// Runs scenario 5.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let scale: f64 = ctx.pick(1.0, 0.05);
    let k = 2usize; // hot and warm samples
    let turns = 2usize; // cold/turnaround samples
    let recipes = 2usize;
    let settle = Duration::from_secs_f64(300.0 * scale.max(0.1));
    let mut report = Report::new("e2e");
    let pools = format!(
        "{}{}{}",
        pool("hot", k as u32, k as u32, k as u32),
        pool("warm", k as u32, 0, k as u32),
        pool("cold", 1, 0, 1)
    );
    let stack = Stack::start(StackOptions::bench(pools)).await?;
    for (p, n) in [("hot", k), ("warm", k), ("cold", 1)] {
        stack.settled(p, n, Duration::from_secs(120)).await?;
    }
    let d = stack.daemon_client().await?;
    for i in 0..recipes {
        measure::recipe_vm(&d, &format!("recipe-{i:02}")).await?;
    }
    stack.sim().daemon().set_time_scale(scale);
    output::line(&format!("  time scale {scale}: provisioning done at scale 0, measuring"));

    let mut m = Side::default();
    let mut c = stack.connect(Transport::Unix).await?;
    // Hot and warm: request -> first output; leases held until all are taken.
    let mut held = Vec::new();
    for pool in ["hot", "warm"] {
        for _ in 0..k {
            let t0 = Instant::now();
            let (l, _) = measure::acquire(&mut c, pool, "e2e").await?;
            if measure::served(&l) != pool {
                return Err(format!("pool {pool} served a {} VM", measure::served(&l)));
            }
            let x = measure::exec(&mut c, &l.id, &["echo", "ok"]).await?;
            let done = t0.elapsed();
            let first = done - x.total + x.first_output.ok_or("`echo ok` printed nothing")?;
            if pool == "hot" { &mut m.hot_first_output } else { &mut m.warm_first_output }.push(secs(first));
            held.push((pool, l.id, done));
        }
    }
    for (pool, id, done) in held {
        let r = measure::release(&mut c, &id).await?;
        if pool == "hot" { &mut m.hot_task_wall } else { &mut m.warm_task_wall }.push(secs(done + r));
    }
    output::line(&format!("  mpool hot first output {:?} s, warm {:?} s", m.hot_first_output, m.warm_first_output));
    stack.settled("hot", k, settle).await?;
    stack.settled("warm", k, settle).await?;

    // Cold: release a max_size 1 pool's VM and ask for it again at once.
    for _ in 0..turns {
        let (l, _) = measure::acquire(&mut c, "cold", "e2e").await?;
        measure::exec(&mut c, &l.id, &["echo", "ok"]).await?;
        let t0 = Instant::now();
        measure::release(&mut c, &l.id).await?;
        let t1 = Instant::now();
        let (l2, _) = measure::acquire(&mut c, "cold", "e2e-next").await?;
        if measure::served(&l2) != "cold" {
            return Err(format!("expected a cold acquire, got {}", measure::served(&l2)));
        }
        let x = measure::exec(&mut c, &l2.id, &["echo", "ok"]).await?;
        let first_at = t0.elapsed() - x.total + x.first_output.ok_or("`echo ok` printed nothing")?;
        m.turnaround.push(secs(first_at));
        m.cold_first_output.push(secs(first_at - (t1 - t0)));
        let r0 = Instant::now();
        measure::release(&mut c, &l2.id).await?;
        stack.settled("cold", 1, settle).await?;
        m.back_in_pool.push(secs(r0.elapsed()));
    }
    output::line(&format!(
        "  mpool cold first output {:?} s, turnaround {:?} s, back in pool {:?} s",
        m.cold_first_output, m.turnaround, m.back_in_pool
    ));

    // The shell recipe, one process per step.
    let mut r = Side::default();
    let exe = ctx.exe.clone();
    for i in 0..recipes {
        let t0 = Instant::now();
        let pick =
            measure::sh(&exe, &stack, "\"$MPOOL\" multipass list | grep '^recipe-' | grep Suspended | head -1").await?;
        let vm = pick.stdout.split_whitespace().next().ok_or("the recipe found no suspended VM")?.to_string();
        if vm != format!("recipe-{i:02}") {
            return Err(format!("the recipe picked {vm}, expected recipe-{i:02}"));
        }
        measure::mp(&exe, &stack, &["start", &vm], None).await?;
        let base = t0.elapsed();
        let x = measure::mp(&exe, &stack, &["exec", &vm, "--", "echo", "ok"], Some("ok")).await?;
        r.warm_first_output.push(secs(base + x.marker_at.ok_or("no `ok` from exec")?));
        let work_done = Instant::now();
        let snap = format!("{vm}.clean");
        measure::mp(&exe, &stack, &["stop", &vm], None).await?;
        measure::mp(&exe, &stack, &["restore", &snap, "--destructive"], None).await?;
        measure::mp(&exe, &stack, &["suspend", &vm], None).await?;
        r.warm_task_wall.push(secs(t0.elapsed()));
        r.back_in_pool.push(secs(work_done.elapsed()));
        // The next task on this VM: it was left stopped (suspend of a stopped instance is ignored).
        let t2 = Instant::now();
        let again = measure::sh(&exe, &stack, &format!("\"$MPOOL\" multipass list | grep '^{vm} ' | head -1")).await?;
        if !again.stdout.contains("Stopped") {
            return Err(format!("expected {vm} stopped after the recipe, got {:?}", again.stdout.trim()));
        }
        measure::mp(&exe, &stack, &["start", &vm], None).await?;
        let base = t2.elapsed();
        let x = measure::mp(&exe, &stack, &["exec", &vm, "--", "echo", "ok"], Some("ok")).await?;
        let first = base + x.marker_at.ok_or("no `ok` from exec")?;
        r.cold_first_output.push(secs(first));
        r.turnaround.push(secs((t2 - work_done) + first));
        measure::mp(&exe, &stack, &["stop", &vm], None).await?;
        measure::mp(&exe, &stack, &["restore", &snap, "--destructive"], None).await?;
        measure::mp(&exe, &stack, &["suspend", &vm], None).await?;
        r.cold_task_wall.push(secs(t2.elapsed()));
        output::line(&format!(
            "  recipe {vm}: first run (suspended VM): first output {:.2} s, task {:.2} s, cleanup {:.2} s; \
             next run (VM left stopped): first output {:.2} s, task {:.2} s",
            r.warm_first_output[i], r.warm_task_wall[i], r.back_in_pool[i], r.cold_first_output[i], r.cold_task_wall[i]
        ));
    }
    stack.sim().daemon().set_time_scale(0.0);
    stack.stop().await;

    let unit = "s";
    // The recipe's steady state: its cleanup leaves the VM stopped (multipassd ignores suspend
    // of a stopped instance), so every run after its first boots the VM.
    let steady = med(&r.cold_first_output);
    let steady_task = med(&r.cold_task_wall);
    report.row(
        Row::new("first output, hot VM", med(&m.hot_first_output), unit).vs("recipe, steady state (boots)", steady),
    );
    report.row(
        Row::new("first output, warm VM", med(&m.warm_first_output), unit).vs("recipe, steady state (boots)", steady),
    );
    report.row(
        Row::new("first output, warm VM", med(&m.warm_first_output), unit)
            .vs("recipe, first run (a suspended VM)", med(&r.warm_first_output)),
    );
    report.row(
        Row::new("first output, cold: asked as the VM's last task ends", med(&m.turnaround), unit)
            .vs("recipe: its cleanup, then the next run", med(&r.turnaround)),
    );
    report
        .row(Row::new("task wall time, hot", med(&m.hot_task_wall), unit).vs("recipe task, steady state", steady_task));
    report.row(
        Row::new("task wall time, warm", med(&m.warm_task_wall), unit).vs("recipe task, steady state", steady_task),
    );
    report.row(
        Row::new("task wall time, warm", med(&m.warm_task_wall), unit)
            .vs("recipe task, first run", med(&r.warm_task_wall)),
    );
    report.row(
        Row::new("VM back in the pool after release (warm)", med(&m.back_in_pool), unit)
            .vs("recipe cleanup (VM left stopped)", med(&r.back_in_pool)),
    );
    if scale != 1.0 {
        report.note(format!(
            "time scale {scale}: simulated Multipass durations are {scale} of real ones; figures are as measured, not scaled back."
        ));
    } else {
        report.note("time scale 1: the simulator's realistic timing profile; figures are wall-clock seconds.");
    }
    report.note(
        "mpool's reset of a snapshot pool is forced stop + restore + boot (+ suspend unless a caller waits), so its VM \
         comes back warm (next first output: one resume) or is handed straight to a waiting caller; the recipe's \
         cleanup is graceful stop + restore + an ignored suspend, so every later run of it boots the VM.",
    );
    report.detail("time_scale", scale);
    report.detail("mpool", &m);
    report.detail("recipe", &r);
    Ok(report)
}
