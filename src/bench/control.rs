//! Scenario 1, control-plane overhead: Acquire of a hot VM over gRPC with 1, 8 and 32
//! concurrent clients, time scale 0.
//!
//! A pool keeps H VMs hot. Each round, the clients (each on its own connection) acquire H/c
//! leases one after another, all clients at once, holding them; then everything is released
//! and the pool settles (all H hot again) before the next round, so every timed acquire is a
//! hot one. Per acquire mpool does what it does in production: the engine picks a hot VM,
//! checks it still answers (a keepalive round trip on its pooled SSH connection), writes the
//! lease durably (fsync, shared by the acquires of one batch) and replies.
//!
//! Baselines, same run, same concurrency: the shell recipe's equivalent step (pick a running
//! VM: `mpool multipass list | grep Running | head -1`, a process and a TLS connection per
//! call), and the floor of the transport (a `GetPool` call on the same connections).

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, Summary, summarize};
use crate::cli::output;
use mpool_api::proto::v1;
use mpool_testkit::{Stack, StackOptions, StoreAt, Transport, pool};

#[derive(serde::Serialize)]
struct Config {
    transport: Transport,
    store: &'static str,
    clients: usize,
    acquire: Summary,
    floor_get_pool: Summary,
    acquires_per_s: f64,
    served: std::collections::BTreeMap<String, usize>,
}

/// Measures `clients` concurrent clients over `t`: (acquire samples, floor samples, acquires/s).
async fn measure(
    stack: &Stack,
    t: Transport,
    clients: usize,
    hot: usize,
    rounds: usize,
    served: &mut std::collections::BTreeMap<String, usize>,
) -> Result<(Vec<Duration>, Vec<Duration>, f64), String> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(stack.connect(t).await?);
    }
    let per = (hot / clients).max(1);
    let mut acq = Vec::new();
    let mut floor = Vec::new();
    let mut busy = Duration::ZERO;
    for round in 0..rounds {
        // The transport's floor: a trivial call on the same connections, same concurrency.
        let tasks: Vec<_> = conns
            .iter()
            .cloned()
            .map(|mut c| {
                tokio::spawn(async move {
                    let mut v = Vec::new();
                    for _ in 0..per {
                        let t = Instant::now();
                        c.get_pool(v1::GetPoolRequest { pool: "hot".into() })
                            .await
                            .map_err(|e| e.message().to_string())?;
                        v.push(t.elapsed());
                    }
                    Ok::<_, String>(v)
                })
            })
            .collect();
        for task in tasks {
            floor.extend(task.await.map_err(|e| e.to_string())??);
        }
        // Hot acquires, held until the round ends.
        let start = Instant::now();
        let tasks: Vec<_> = conns
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, mut c)| {
                tokio::spawn(async move {
                    let mut v = Vec::new();
                    for k in 0..per {
                        let (l, d) = measure::acquire(&mut c, "hot", &format!("bench-{round}-{i}-{k}")).await?;
                        v.push((l, d));
                    }
                    Ok::<_, String>(v)
                })
            })
            .collect();
        let mut leases = Vec::new();
        for task in tasks {
            for (l, d) in task.await.map_err(|e| e.to_string())?? {
                *served.entry(measure::served(&l).to_string()).or_default() += 1;
                acq.push(d);
                leases.push(l.id);
            }
        }
        busy += start.elapsed();
        let mut c = conns[0].clone();
        for id in leases {
            measure::release(&mut c, &id).await?;
        }
        stack.settled("hot", hot, Duration::from_secs(300)).await?;
    }
    let rate = acq.len() as f64 / busy.as_secs_f64().max(1e-9);
    Ok((acq, floor, rate))
}

/// The CLI way to find a running VM, `clients` at once, `per` calls each.
async fn cli_select(ctx: &Ctx, stack: &Stack, clients: usize, per: usize) -> Result<Vec<Duration>, String> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (exe, env) = (ctx.exe.clone(), stack.cli_env());
            let mut env = env;
            env.push(("MPOOL".into(), exe.display().to_string()));
            tokio::spawn(async move {
                let mut v = Vec::new();
                for _ in 0..per {
                    let r = measure::run_process(
                        std::path::Path::new("/bin/sh"),
                        &["-c", "\"$MPOOL\" multipass list | grep Running | head -1"],
                        &env,
                        None,
                        Duration::from_secs(120),
                    )
                    .await?;
                    if !r.stdout.contains("Running") {
                        return Err(format!("the recipe found no running VM: {:?}", r.stdout));
                    }
                    v.push(r.wall);
                }
                Ok::<_, String>(v)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

/// Runs scenario 1.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let hot = ctx.pick(64, 32);
    let rounds = ctx.pick(8, 2);
    let counts = [1usize, 8, 32];
    let mut report = Report::new("control");
    let mut configs = Vec::new();
    let mut p = std::collections::BTreeMap::new();

    let stack = Stack::start(StackOptions::bench(pool("hot", hot as u32, hot as u32, hot as u32))).await?;
    let warm_up = stack.settled("hot", hot, Duration::from_secs(300)).await?;
    report.detail("warm_up_s", warm_up.as_secs_f64());
    for t in [Transport::Tcp, Transport::Unix] {
        for &c in &counts {
            let mut served = Default::default();
            let (acq, floor, rate) = measure(&stack, t, c, hot, rounds, &mut served).await?;
            let (a, f) = (summarize(&acq), summarize(&floor));
            output::line(&format!(
                "  {:<14} {c:>2} clients: acquire p50 {:.2} ms p99 {:.2} ms ({} samples, {served:?}); GetPool p50 {:.2} ms",
                t.label(),
                a.p50_ms,
                a.p99_ms,
                a.n,
                f.p50_ms
            ));
            p.insert((t, c), (a, f));
            configs.push(Config {
                transport: t,
                store: "disk",
                clients: c,
                acquire: a,
                floor_get_pool: f,
                acquires_per_s: rate,
                served,
            });
        }
    }
    // The shell recipe's equivalent step at the same concurrency.
    let mut cli = std::collections::BTreeMap::new();
    for &c in &counts {
        let per = (ctx.pick(48, 12) / c).max(1);
        let s = summarize(&cli_select(ctx, &stack, c, per).await?);
        output::line(&format!(
            "  CLI way       {c:>2} clients: `list | grep Running | head -1` p50 {:.1} ms p99 {:.1} ms ({} samples)",
            s.p50_ms, s.p99_ms, s.n
        ));
        cli.insert(c, s);
    }
    stack.stop().await;

    // The same at 32 clients with mpool's store on tmpfs: what the disk's fsync costs.
    let mut o = StackOptions::bench(pool("hot", hot as u32, hot as u32, hot as u32));
    o.store = StoreAt::Tmpfs;
    let tmpfs = Stack::start(o).await?;
    tmpfs.settled("hot", hot, Duration::from_secs(300)).await?;
    let mut served = Default::default();
    let (acq, floor, rate) = measure(&tmpfs, Transport::Tcp, 32, hot, rounds, &mut served).await?;
    tmpfs.stop().await;
    let tmp = summarize(&acq);
    output::line(&format!(
        "  TCP, store on tmpfs, 32 clients: acquire p50 {:.2} ms p99 {:.2} ms",
        tmp.p50_ms, tmp.p99_ms
    ));
    configs.push(Config {
        transport: Transport::Tcp,
        store: "tmpfs",
        clients: 32,
        acquire: tmp,
        floor_get_pool: summarize(&floor),
        acquires_per_s: rate,
        served,
    });

    for &c in &counts {
        let (a, _) = p[&(Transport::Tcp, c)];
        let b = cli[&c];
        let mut r = Row::new(format!("hot acquire p50, {c} client(s), TCP+TLS"), a.p50_ms, "ms")
            .vs("CLI list|grep p50", b.p50_ms);
        if c == 32 {
            r = r.target("p50 <= 1 ms", a.p50_ms <= 1.0);
        }
        report.row(r);
        let mut r = Row::new(format!("hot acquire p99, {c} client(s), TCP+TLS"), a.p99_ms, "ms")
            .vs("CLI list|grep p99", b.p99_ms);
        if c == 32 {
            r = r.target("p99 <= 5 ms", a.p99_ms <= 5.0);
        }
        report.row(r);
    }
    let (u, uf) = p[&(Transport::Unix, 32)];
    report.row(
        Row::new("hot acquire p50, 32 clients, Unix socket", u.p50_ms, "ms").vs("CLI list|grep p50", cli[&32].p50_ms),
    );
    let (t32, f32) = p[&(Transport::Tcp, 32)];
    report.row(Row::new("hot acquire p50, 32 clients, store on tmpfs", tmp.p50_ms, "ms").of(
        "same, store on disk",
        t32.p50_ms,
        "x of disk",
    ));
    report.row(Row::new("hot acquire p50, 32 clients, TCP+TLS", t32.p50_ms, "ms").of(
        "GetPool p50, same connections (floor)",
        f32.p50_ms,
        "x of floor",
    ));
    report.note(format!(
        "Each hot acquire = two turns of the engine's actor + a keepalive round trip on the VM's pooled SSH connection + \
         a durable store write (one fsync per batch of concurrent acquires) before the reply. Unix socket at 32 clients: \
         p50 {:.2} ms, GetPool floor {:.2} ms.",
        u.p50_ms, uf.p50_ms
    ));
    report.note(format!(
        "Everything (simulator, daemon, {} clients) shares the machine's CPUs; at 32 clients the p50 is mostly queueing.",
        counts[2]
    ));
    report.detail("configs", &configs);
    report.detail(
        "cli_select",
        cli.iter().map(|(c, s)| (c.to_string(), *s)).collect::<std::collections::BTreeMap<_, _>>(),
    );
    report.detail("pool_hot_vms", hot);
    report.detail("rounds", rounds);
    Ok(report)
}
