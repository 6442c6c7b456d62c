//! Scenario 10, two hosts as one: hot acquires through the client-side choice of host
//! ([`crate::fleet::Fleet`]: GetPool of every host, cached 1.5 s, the most ready host first, the
//! next on RESOURCE_EXHAUSTED) over two `mpool serve` + simulator stacks on this machine, against
//! the same clients calling Acquire directly on one host.
//!
//! Each round, `clients` clients (each a connection, or a Fleet of its own, as Kestra workers
//! are) take every hot VM there is (H on one host, 2H on two) one after another, all at once,
//! holding them; then everything is released and the pools settle before the next round. The
//! figures: acquire p50/p99 and acquires per second, two hosts through the choice vs one host
//! direct, and one host through the choice (what the choice itself costs: a GetPool when its
//! cached view is cold or stale, then the same Acquire). Both stacks share this machine's CPUs,
//! so two hosts do not double the throughput.

use std::time::{Duration, Instant};

use super::{Ctx, Report, Row, Summary, summarize};
use crate::cli::output;
use crate::fleet::Fleet;
use mpool_api::client::Client;
use mpool_api::proto::v1;
use mpool_testkit::{Stack, StackOptions, Transport, pool};

#[derive(serde::Serialize)]
struct Figures {
    hosts: usize,
    routed: bool,
    acquire: Summary,
    acquires_per_s: f64,
    per_host: Vec<usize>,
    /// Acquires that asked every host (GetPool) first: the view was older than the cache time,
    /// or an attempt had failed.
    asked_first: usize,
}

/// One client: a connection to the first host, or a Fleet of its own over every host; made
/// (and connected) before the rounds, kept across them, as a Kestra worker keeps its state.
enum Caller {
    Direct(Client),
    Routed(Box<Fleet>),
}

impl Caller {
    /// One hot acquire: the host it came from and the lease id.
    async fn acquire(&mut self, holder: String) -> Result<(usize, String), String> {
        let req = v1::AcquireRequest { pool: "hot".into(), holder, ..Default::default() };
        match self {
            Caller::Direct(c) => {
                let l = c.acquire(req).await.map_err(|e| format!("acquire: {}", e.message()))?;
                Ok((0, l.into_inner().id))
            }
            Caller::Routed(fleet) => {
                let (host, l) = fleet
                    .choose("hot", Some(Duration::from_secs(60)), |mut c, wait| {
                        let req =
                            v1::AcquireRequest { wait: wait.map(mpool_api::convert::proto_duration), ..req.clone() };
                        async move { c.acquire(req).await.map(tonic::Response::into_inner) }
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((host, l.id))
            }
        }
    }
}

/// One client's share of a round: `per` acquires one after another; the leases it got as
/// (host index, lease id) and each acquire's time.
async fn share(
    mut caller: Caller,
    per: usize,
    tag: String,
) -> Result<(Caller, Vec<(usize, String)>, Vec<Duration>), String> {
    let (mut got, mut times) = (Vec::new(), Vec::new());
    for k in 0..per {
        let t = Instant::now();
        got.push(caller.acquire(format!("{tag}-{k}")).await?);
        times.push(t.elapsed());
    }
    Ok((caller, got, times))
}

/// Rounds of `clients` clients taking all `hot` VMs of every stack: routed over all of them
/// (`routed`), or directly on the first.
async fn measure(
    stacks: &[&Stack],
    routed: bool,
    clients: usize,
    hot: usize,
    rounds: usize,
) -> Result<Figures, String> {
    let endpoints: Vec<String> = stacks.iter().map(|s| format!("unix:{}", s.socket.display())).collect();
    let mut callers = Vec::new();
    for _ in 0..clients {
        callers.push(if routed {
            let mut fleet = Fleet::new(endpoints.clone(), None, None);
            fleet.seen("hot").await;
            Caller::Routed(Box::new(fleet))
        } else {
            Caller::Direct(stacks[0].connect(Transport::Unix).await?)
        });
    }
    let per = (hot * stacks.len() / clients).max(1);
    let (mut samples, mut busy, mut per_host) = (Vec::new(), Duration::ZERO, vec![0; stacks.len()]);
    for round in 0..rounds {
        let start = Instant::now();
        let tasks: Vec<_> = callers
            .drain(..)
            .enumerate()
            .map(|(i, c)| tokio::spawn(share(c, per, format!("fleet-{round}-{i}"))))
            .collect();
        let mut leases = Vec::new();
        for task in tasks {
            let (caller, got, times) = task.await.map_err(|e| e.to_string())??;
            callers.push(caller);
            samples.extend(times);
            leases.extend(got);
        }
        busy += start.elapsed();
        let mut conns = Vec::new();
        for s in stacks {
            conns.push(s.connect(Transport::Unix).await?);
        }
        for (host, id) in leases {
            per_host[host] += 1;
            super::measure::release(&mut conns[host], &id).await?;
        }
        for s in stacks {
            s.settled("hot", hot, Duration::from_secs(300)).await?;
        }
    }
    let acquire = summarize(&samples);
    let acquires_per_s = samples.len() as f64 / busy.as_secs_f64().max(1e-9);
    // Each Fleet asked once before the rounds (connecting): not counted.
    let asked_first = callers.iter().map(|c| if let Caller::Routed(f) = c { f.asked() - 1 } else { 0 }).sum();
    Ok(Figures { hosts: stacks.len(), routed, acquire, acquires_per_s, per_host, asked_first })
}

/// Runs scenario 10.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let hot = ctx.pick(16, 8);
    let rounds = ctx.pick(8, 2);
    let clients = 8;
    let mut report = Report::new("fleet");
    let options = || StackOptions::bench(pool("hot", hot as u32, hot as u32, hot as u32));
    let (a, b) = (Stack::start(options()).await?, Stack::start(options()).await?);
    for s in [&a, &b] {
        s.settled("hot", hot, Duration::from_secs(300)).await?;
    }
    let one = measure(&[&a], false, clients, hot, rounds).await?;
    let one_routed = measure(&[&a], true, clients, hot, rounds).await?;
    let two = measure(&[&a, &b], true, clients, hot, rounds).await?;
    a.stop().await;
    b.stop().await;
    for f in [&one, &one_routed, &two] {
        output::line(&format!(
            "  {} host(s){}: acquire p50 {:.2} ms p99 {:.2} ms, {:.0} acquires/s ({} samples, per host {:?}, {} asked the hosts first)",
            f.hosts,
            if f.routed { ", routed" } else { ", direct" },
            f.acquire.p50_ms,
            f.acquire.p99_ms,
            f.acquires_per_s,
            f.acquire.n,
            f.per_host,
            f.asked_first
        ));
    }
    // The choice's own cost: the same host and load, through a Fleet or directly.
    let added = one_routed.acquire.p50_ms - one.acquire.p50_ms;
    report.row(
        Row::new("hot acquire p50, 1 host routed", one_routed.acquire.p50_ms, "ms")
            .vs("1 host direct p50", one.acquire.p50_ms)
            .target("routing adds < 1 ms at p50", added < 1.0),
    );
    report.row(
        Row::new("hot acquire p50, 2 hosts routed", two.acquire.p50_ms, "ms")
            .vs("1 host direct p50", one.acquire.p50_ms),
    );
    report.row(
        Row::new("hot acquire p99, 2 hosts routed", two.acquire.p99_ms, "ms")
            .vs("1 host direct p99", one.acquire.p99_ms),
    );
    report.row(
        Row::new("acquires per second, 2 hosts routed", two.acquires_per_s, "/s")
            .vs_rate("1 host direct", one.acquires_per_s),
    );
    report.note(format!(
        "{clients} clients, {hot} hot VMs per host, {rounds} rounds; each routed client keeps a Fleet of its own across the \
         rounds (GetPool of every host when its view is older than {} ms or an attempt failed, then Acquire without \
         waiting on the host with the most ready VMs, the next host on RESOURCE_EXHAUSTED). Both hosts share \
         this machine's CPUs.",
        crate::fleet::VIEW_TTL.as_millis()
    ));
    report.detail("one_host", &one);
    report.detail("one_host_routed", &one_routed);
    report.detail("two_hosts", &two);
    Ok(report)
}
