//! Scenario 8, chaos: tenants use a pool while things go wrong, and mpool's promises are
//! counted. The simulator fails a share of daemon calls, `mpool serve` (a child process) fails a
//! share of its store writes on purpose and is killed with SIGKILL every few seconds, then
//! started again. Each tenant acquires with a request id (retried with the same id until it gets
//! an answer), looks for any other tenant's marker file in its VM, writes its own, and releases.
//!
//! Counted: leases acknowledged; acknowledged leases lost (a later call says the lease is
//! unknown or ended though its holder never released it); dirty VMs handed out (a marker from
//! an earlier tenant found); double leases (a VM handed to a second tenant while the first still
//! holds it); leaked instances (instances with mpool's prefix the daemon has and mpool does not
//! know, once the faults stop and the pool settles). Every count but the first must be zero.
//! `cargo test --test chaos` asserts the zeros on a short run; `mpool bench chaos` prints the
//! figures of a longer one.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Ctx, Report, Row};
use crate::cli::client::Client;
use mpool_api::proto::v1;
use mpool_testkit::{Serve, Stack, StackOptions, Transport, wait};

const POOL: &str = "chaos";

/// What a chaos run does.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Params {
    /// Tenants working at once.
    pub tenants: usize,
    /// How long the faults last.
    pub duration: Duration,
    /// How often `mpool serve` is killed.
    pub kill_every: Duration,
    /// Share of daemon calls the simulator fails.
    pub daemon_fault_rate: f64,
    /// Share of store writes `mpool serve` fails.
    pub store_fault_rate: f64,
}

/// What a chaos run counted.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    /// Leases acknowledged to a tenant.
    pub acknowledged: u64,
    /// Acknowledged leases that were lost.
    pub lost: u64,
    /// VMs handed out with an earlier tenant's marker in them.
    pub dirty: u64,
    /// VMs handed to a second tenant while the first held them.
    pub double: u64,
    /// Instances with mpool's prefix that mpool did not know once settled.
    pub leaked: u64,
    /// Times `mpool serve` was killed.
    pub kills: u64,
    /// Requests refused (UNAVAILABLE while serve was down or the store failed, RESOURCE_EXHAUSTED, ...).
    pub refused: u64,
    /// Leases released by their tenant.
    pub released: u64,
    /// What went wrong, one line each (empty when all counts are zero).
    pub problems: Vec<String>,
}

#[derive(Default)]
struct Counts {
    acknowledged: AtomicU64,
    lost: AtomicU64,
    dirty: AtomicU64,
    double: AtomicU64,
    refused: AtomicU64,
    released: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Counts {
    fn problem(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.problems.lock()
            && p.len() < 20
        {
            p.push(what);
        }
    }
}

fn unavailable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal)
}

/// One tenant's world: a client that reconnects.
struct Tenant {
    socket: PathBuf,
    client: Option<Client>,
}

impl Tenant {
    async fn client(&mut self) -> Option<&mut Client> {
        if self.client.is_none() {
            let c = crate::cli::client::Connect::single(format!("unix:{}", self.socket.display()));
            self.client = crate::cli::client::connect(&c).await.ok();
        }
        self.client.as_mut()
    }

    /// Runs a shell line on the lease, retrying while serve is down; `Err` when the lease is
    /// gone (unknown or ended).
    async fn sh(&mut self, lease: &str, line: &str, until: Instant) -> Result<Option<String>, tonic::Status> {
        while Instant::now() < until {
            let Some(c) = self.client().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let req = v1::ExecRequest {
                lease_id: lease.into(),
                command: Some(v1::Command { argv: vec!["sh".into(), "-c".into(), line.into()], ..Default::default() }),
                exec_id: String::new(),
                ..Default::default()
            };
            let result = async {
                let mut s = c.exec(req).await?.into_inner();
                let mut out = String::new();
                while let Some(ev) = s.message().await? {
                    match ev.event {
                        Some(v1::exec_event::Event::Stdout(t)) => out.push_str(&t),
                        Some(v1::exec_event::Event::Exit(x)) if x.code == 0 => return Ok(Some(out)),
                        Some(v1::exec_event::Event::Exit(_)) => return Ok(None),
                        _ => {}
                    }
                }
                Err(tonic::Status::unavailable("the exec stream ended without an exit"))
            }
            .await;
            match result {
                Ok(out) => return Ok(out),
                Err(s) if unavailable(&s) => {
                    self.client = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => return Err(s),
            }
        }
        Ok(None)
    }
}

async fn tenant(
    id: usize,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    holders: Arc<Mutex<HashMap<String, String>>>,
) {
    let mut t = Tenant { socket, client: None };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let rid = format!("tenant-{id}-{n}");
        // Acquire, retrying with the same request id until there is an answer.
        // Once an attempt may have reached serve, the lease may exist although its answer was
        // lost (serve killed before replying): ask again with the same request id, even after
        // the stop, so the lease is learned and released rather than left to its TTL.
        let mut sent = false;
        let lease = loop {
            if stop.load(Ordering::Relaxed) && !sent {
                return;
            }
            let Some(c) = t.client().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let req = v1::AcquireRequest {
                pool: POOL.into(),
                holder: format!("tenant-{id}"),
                request_id: rid.clone(),
                ttl: Some(mpool_api::proto::Duration { seconds: 600, nanos: 0 }),
                wait: Some(mpool_api::proto::Duration { seconds: 10, nanos: 0 }),
            };
            sent = true;
            match c.acquire(req).await {
                Ok(l) => break Some(l.into_inner()),
                Err(s) if unavailable(&s) => {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                    t.client = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => {
                    // RESOURCE_EXHAUSTED, or FAILED_PRECONDITION for a request id whose lease
                    // ended before its answer arrived: a new request.
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                    if s.code() != tonic::Code::ResourceExhausted && s.code() != tonic::Code::FailedPrecondition {
                        counts.problem(
                            &counts.lost,
                            format!("acquire {rid}: unexpected {:?}: {}", s.code(), s.message()),
                        );
                    }
                    break None;
                }
            }
        };
        let Some(lease) = lease else { continue };
        counts.acknowledged.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = holders.lock() {
            if let Some(other) = h.get(&lease.vm).filter(|other| **other != lease.id) {
                counts
                    .problem(&counts.double, format!("{} handed out as {} while {other} holds it", lease.vm, lease.id));
            }
            h.insert(lease.vm.clone(), lease.id.clone());
        }
        let until = Instant::now() + Duration::from_secs(60);
        let look = t.sh(&lease.id, "ls -A | grep -c '^marker-' || true", until).await;
        match look {
            Ok(Some(found)) if found.trim() != "0" => counts.problem(
                &counts.dirty,
                format!("{} handed out as {} with {} earlier marker(s)", lease.vm, lease.id, found.trim()),
            ),
            Ok(_) => {}
            Err(s) => counts.problem(&counts.lost, format!("lease {} lost: {:?} {}", lease.id, s.code(), s.message())),
        }
        if let Err(s) = t.sh(&lease.id, &format!("echo {} > marker-{}", lease.id, lease.id), until).await {
            counts.problem(&counts.lost, format!("lease {} lost: {:?} {}", lease.id, s.code(), s.message()));
        }
        if let Ok(mut h) = holders.lock()
            && h.get(&lease.vm) == Some(&lease.id)
        {
            h.remove(&lease.vm);
        }
        // Release, retrying while serve is down (a release is idempotent).
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Some(c) = t.client().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match c.release(v1::ReleaseRequest { lease_id: lease.id.clone() }).await {
                Ok(_) => {
                    counts.released.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(s) if unavailable(&s) => {
                    t.client = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => {
                    counts.problem(&counts.lost, format!("release of {}: {:?} {}", lease.id, s.code(), s.message()));
                    break;
                }
            }
        }
    }
}

/// Runs the chaos: `exe` is the mpool binary (for the `mpool serve` processes).
pub async fn chaos(exe: &Path, p: &Params) -> Result<Outcome, String> {
    let pools = format!(
        "[[pools]]\nname = \"{POOL}\"\nmin_ready = 3\nhot = 1\nmax_size = {}\nmax_wait = \"30s\"\nmax_ttl = \"1h\"\n",
        p.tenants + 2
    );
    let mut o = StackOptions::bench(pools);
    o.serve = Serve::Process(exe.to_path_buf());
    o.serve_at_start = false;
    o.engine_toml.push_str("\nreconcile_interval = \"100ms\"\nhealth_interval = \"1s\"");
    o.serve_log = std::env::var("MPOOL_CHAOS_LOG").unwrap_or_else(|_| "info".into());
    let mut stack = Stack::start(o).await?;
    stack.spawn_serve()?;
    wait_ready(&stack, 3, Duration::from_secs(120)).await?;

    // The faults begin.
    stack.sim().daemon().set_fail_rate(p.daemon_fault_rate);
    stack.set_store_faults(p.store_fault_rate);
    stack.kill_serve();
    stack.spawn_serve()?;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let holders = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for id in 0..p.tenants {
        tasks.push(tokio::spawn(tenant(id, stack.socket.clone(), stop.clone(), counts.clone(), holders.clone())));
    }
    let started = Instant::now();
    let mut kills = 0u64;
    let mut next_kill = Instant::now() + p.kill_every;
    while started.elapsed() < p.duration {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Restart it if it exited by itself (e.g. its start-up store write failed).
        if !stack.serve_running() {
            stack.spawn_serve()?;
        }
        if Instant::now() >= next_kill {
            stack.kill_serve();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..300))).await;
            stack.spawn_serve()?;
            next_kill = Instant::now() + p.kill_every;
        }
    }

    // The faults end; the tenants finish what they hold.
    stack.sim().daemon().set_fail_rate(0.0);
    stack.set_store_faults(0.0);
    stack.kill_serve();
    kills += 1;
    stack.spawn_serve()?;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(120), t).await;
    }
    let leaked = settle_and_count_leaks(&stack, Duration::from_secs(120)).await.map_err(|e| {
        let log = stack.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!("{e}\nserve log (last lines, newest first):\n{}", tail.join("\n"))
    })?;
    let mut out = Outcome {
        acknowledged: counts.acknowledged.load(Ordering::Relaxed),
        lost: counts.lost.load(Ordering::Relaxed),
        dirty: counts.dirty.load(Ordering::Relaxed),
        double: counts.double.load(Ordering::Relaxed),
        leaked: leaked.len() as u64,
        kills,
        refused: counts.refused.load(Ordering::Relaxed),
        released: counts.released.load(Ordering::Relaxed),
        problems: {
            let mut p = counts.problems.lock().map(|p| p.clone()).unwrap_or_default();
            p.extend(leaked.iter().map(|n| format!("leaked instance {n}")));
            p
        },
    };
    if !out.problems.is_empty() || std::env::var_os("MPOOL_CHAOS_KEEP").is_some() {
        out.problems.push(keep_log(&stack.log_path()));
    }
    stack.kill_serve();
    stack.stop().await;
    Ok(out)
}

/// Keeps serve's log (all its lives) when the run found a problem (or always, with
/// `MPOOL_CHAOS_KEEP` set): the stack's directory is removed when it stops.
fn keep_log(log: &Path) -> String {
    let kept = Path::new("target/bench/chaos-serve.log");
    let copied = kept.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::copy(log, kept));
    match copied {
        Ok(_) => format!("serve's log is kept in {}", kept.display()),
        Err(e) => format!("serve's log could not be kept ({e})"),
    }
}

async fn wait_ready(stack: &Stack, idle: u32, limit: Duration) -> Result<(), String> {
    wait(format!("the chaos pool has {idle} idle VMs"), limit)
        .every(Duration::from_millis(50))
        .until(|| async {
            let mut c = stack.connect(Transport::Unix).await.ok()?;
            let p = c.get_pool(v1::GetPoolRequest { pool: POOL.into() }).await.ok()?.into_inner();
            let n = p.vms.get("hot").copied().unwrap_or(0) + p.vms.get("warm").copied().unwrap_or(0);
            (n >= idle).then_some(())
        })
        .await?;
    Ok(())
}

/// Waits until the pool settles (no lease, every VM idle) and returns the instances with
/// mpool's prefix that the daemon has and mpool does not know.
async fn settle_and_count_leaks(stack: &Stack, limit: Duration) -> Result<BTreeSet<String>, String> {
    let t = Instant::now();
    let d = stack.daemon_client().await?;
    loop {
        let mut last = String::new();
        if let Ok(mut c) = stack.connect(Transport::Unix).await
            && let Ok(vms) = c.list_vms(v1::ListVmsRequest { pool: String::new() }).await
        {
            let vms = vms.into_inner().vms;
            let known: BTreeSet<String> = vms.iter().map(|v| v.name.clone()).collect();
            let idle = vms.iter().all(|v| v.state == "hot" || v.state == "warm");
            let on_daemon: BTreeSet<String> = d
                .list()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|i| i.name)
                .filter(|n| n.starts_with("mpool-") && !n.contains("-golden-"))
                .collect();
            let leaked: BTreeSet<String> = on_daemon.difference(&known).cloned().collect();
            if idle && leaked.is_empty() && on_daemon == known {
                return Ok(leaked);
            }
            last = format!(
                "mpool {:?}, daemon {on_daemon:?}",
                vms.iter().map(|v| (&v.name, &v.state)).collect::<Vec<_>>()
            );
            if t.elapsed() > limit {
                return if idle { Ok(leaked) } else { Err(format!("the pool did not settle after the chaos: {last}")) };
            }
        }
        if t.elapsed() > limit {
            return Err(format!("mpool did not answer after the chaos {last}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `mpool bench chaos`.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let p = Params {
        tenants: ctx.pick(12, 4),
        duration: ctx.pick(Duration::from_secs(120), Duration::from_secs(20)),
        kill_every: ctx.pick(Duration::from_secs(5), Duration::from_secs(3)),
        daemon_fault_rate: 0.05,
        store_fault_rate: 0.02,
    };
    let o = chaos(&ctx.exe, &p).await?;
    let mut r = Report::new("chaos");
    r.row(Row::new("leases acknowledged", o.acknowledged as f64, "leases"));
    r.row(Row::new("acknowledged leases lost", o.lost as f64, "leases").target("0", o.lost == 0));
    r.row(Row::new("dirty VMs handed out", o.dirty as f64, "VMs").target("0", o.dirty == 0));
    r.row(Row::new("double leases", o.double as f64, "VMs").target("0", o.double == 0));
    r.row(Row::new("leaked instances", o.leaked as f64, "instances").target("0", o.leaked == 0));
    r.row(Row::new("kill -9 of mpool serve", o.kills as f64, "kills"));
    r.row(Row::new("requests refused meanwhile (retried)", o.refused as f64, "requests"));
    r.note(format!(
        "{} tenants for {:?}: {:.0}% daemon faults, {:.0}% store write failures, mpool serve killed every {:?}",
        p.tenants,
        p.duration,
        p.daemon_fault_rate * 100.0,
        p.store_fault_rate * 100.0,
        p.kill_every
    ));
    for problem in &o.problems {
        r.note(problem.clone());
    }
    r.detail("params", &p);
    r.detail("outcome", &o);
    Ok(r)
}
