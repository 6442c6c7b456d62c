//! `mpool demo`: the simulator and the pool daemon in one process on temporary directories,
//! then a task through the public gRPC API (over the daemon's Unix socket, as any client would):
//! wait for the pools, acquire hot, warm and cold VMs, run a command, write a file, release,
//! acquire the same VM again and show the file is gone, and a one-shot Run. Prints what each
//! step cost.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cli::client::{Client, Connect, connect};
use crate::cli::output;
use mpool_api::proto::v1;
use mpool_api::serve::{Options, Running};
use mpool_config::Config;
use mpool_sim::{SimConfig, Simulator};

/// `mpool demo` flags.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// The simulator's time scale: 1 is real Multipass timing, 0.02 is 50x faster.
    #[arg(long, default_value_t = 0.02)]
    time_scale: f64,
    /// Keep the temporary directory (and print it).
    #[arg(long)]
    keep: bool,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::err_line(&format!("mpool demo failed: {e}"));
            ExitCode::from(1)
        }
    }
}

struct Table(Vec<(String, String, Duration)>);

impl Table {
    fn add(&mut self, step: &str, result: impl Into<String>, took: Duration) {
        let result = result.into();
        output::line(&format!("  {step:<44} {result:<28} {:>10}", fmt(took)));
        self.0.push((step.into(), result, took));
    }
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(10) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else if d < Duration::from_secs(1) {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn served(l: &v1::Lease) -> &'static str {
    match v1::Served::try_from(l.served) {
        Ok(v1::Served::Hot) => "hot",
        Ok(v1::Served::Warm) => "warm",
        Ok(v1::Served::Cold) => "cold",
        Ok(v1::Served::Repeat) => "repeat",
        _ => "?",
    }
}

fn argv(a: &[&str]) -> Option<v1::Command> {
    Some(v1::Command { argv: a.iter().map(|s| s.to_string()).collect(), ..Default::default() })
}

/// Runs a command on a lease; returns (exit code, stdout).
async fn exec(c: &mut Client, lease: &str, cmd: &[&str]) -> Result<(i32, String), String> {
    let mut s = c
        .exec(v1::ExecRequest {
            lease_id: lease.into(),
            command: argv(cmd),
            exec_id: String::new(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    let mut out = String::new();
    while let Some(ev) = s.message().await.map_err(|e| e.message().to_string())? {
        match ev.event {
            Some(v1::exec_event::Event::Stdout(t)) => out.push_str(&t),
            Some(v1::exec_event::Event::Exit(x)) => return Ok((x.code, out)),
            _ => {}
        }
    }
    Err("no exit status".into())
}

async fn acquire(c: &mut Client, pool: &str) -> Result<(v1::Lease, Duration), String> {
    let t = Instant::now();
    let l = c
        .acquire(v1::AcquireRequest { pool: pool.into(), holder: "demo".into(), ..Default::default() })
        .await
        .map_err(|e| format!("acquire from {pool}: {}", e.message()))?
        .into_inner();
    Ok((l, t.elapsed()))
}

async fn release(c: &mut Client, lease: &str) -> Result<Duration, String> {
    let t = Instant::now();
    c.release(v1::ReleaseRequest { lease_id: lease.into() }).await.map_err(|e| e.message().to_string())?;
    Ok(t.elapsed())
}

async fn demo(args: DemoArgs) -> Result<(), String> {
    let total = Instant::now();
    let dir = tempfile::Builder::new().prefix("mpool-demo-").tempdir().map_err(|e| e.to_string())?;
    let root = dir.path().to_path_buf();
    output::line(&format!(
        "mpool demo: simulator (time scale {}) + pool daemon in this process, under {}",
        args.time_scale,
        root.display()
    ));
    let (sim, running) = start(&root, args.time_scale).await?;
    let mut c = connect(&Connect::single(format!("unix:{}/mpool.sock", root.display()))).await?;
    let mut t = Table(Vec::new());
    output::line(&format!("\n  {:<44} {:<28} {:>10}", "step", "result", "time"));

    wait_for_pools(&mut c, &mut t).await?;
    let (hot, warm, cold) = acquire_hot_warm_cold(&mut c, &mut t).await?;
    let s = Instant::now();
    let (code, out) = exec(&mut c, &hot.id, &["uname", "-s"]).await?;
    t.add("exec `uname -s` on the hot lease", format!("exit {code}: {}", out.trim()), s.elapsed());
    let again = release_resets_the_vm(&mut c, &mut t).await?;
    for l in [&hot, &warm, &cold, &again] {
        release(&mut c, &l.id).await?;
    }
    one_shot_run(&mut c, &mut t).await?;
    // The simulator's VMs share the host's network: the probe honestly says so.
    let s = Instant::now();
    let p = c.get_pool(v1::GetPoolRequest { pool: "hot".into() }).await.map_err(|e| e.message().to_string())?;
    t.add("isolation probe (sim VMs share the network)", p.into_inner().isolation, s.elapsed());

    running.stop().await;
    sim.shutdown().await;
    output::line(&format!(
        "\nDone in {}. Simulated Multipass durations are scaled by {} (launch ~40 s, resume ~4 s at scale 1).",
        fmt(total.elapsed()),
        args.time_scale
    ));
    if args.keep {
        let kept = dir.keep();
        output::line(&format!("Kept {}", kept.display()));
    }
    Ok(())
}

/// The simulator and the pool daemon, with four small pools, under `root`.
async fn start(root: &Path, time_scale: f64) -> Result<(Simulator, Running), String> {
    let mut sim_cfg = SimConfig::new(root.join("multipass.sock"), root.join("sim"));
    sim_cfg.time_scale = time_scale;
    let sim = Simulator::start(sim_cfg).await?;
    let config = format!(
        r#"
[daemon]
address = "unix:{root}/multipass.sock"
data_dir = "{root}/data"
[api]
listen = ["unix:{root}/mpool.sock"]
[store]
path = "{root}/mpool.redb"
[host]
data_dir = "{root}/sim"
[engine]
reconcile_interval = "200ms"
[[pools]]
name = "hot"
min_ready = 1
hot = 1
max_size = 2
[[pools]]
name = "warm"
min_ready = 1
max_size = 2
[[pools]]
name = "cold"
min_ready = 0
max_size = 1
[[pools]]
name = "reset"
min_ready = 1
max_size = 1
"#,
        root = root.display()
    );
    let cfg = Config::parse(&config, root).map_err(|e| e.to_string())?;
    let running = Running::start(
        cfg,
        Options {
            data_dir: root.join("data"),
            priorities: true,
            daemon_wait: Some(Duration::from_secs(10)),
            store_faults: 0.0,
            config_path: None,
        },
    )
    .await?;
    Ok((sim, running))
}

/// Step 1: waits for the pools to warm up (each has its idle VMs, one of them hot).
async fn wait_for_pools(c: &mut Client, t: &mut Table) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let pools =
            c.list_pools(v1::ListPoolsRequest {}).await.map_err(|e| e.message().to_string())?.into_inner().pools;
        let ready = |p: &v1::PoolInfo| {
            let idle = p.vms.get("hot").copied().unwrap_or(0) + p.vms.get("warm").copied().unwrap_or(0);
            idle >= p.config.as_ref().map(|c| c.min_ready).unwrap_or(0)
        };
        if pools.iter().all(ready) && pools.iter().any(|p| p.vms.get("hot").copied().unwrap_or(0) > 0) {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err("pools did not become ready within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.add("wait for pools (launch, clean snapshot, park)", "4 pools ready", start.elapsed());
    Ok(())
}

/// Step 2: hot, warm and cold acquires.
async fn acquire_hot_warm_cold(c: &mut Client, t: &mut Table) -> Result<(v1::Lease, v1::Lease, v1::Lease), String> {
    let (hot, d) = acquire(c, "hot").await?;
    t.add("acquire from pool hot", format!("{} ({})", hot.vm, served(&hot)), d);
    let (warm, d) = acquire(c, "warm").await?;
    t.add("acquire from pool warm", format!("{} ({})", warm.vm, served(&warm)), d);
    let (cold, d) = acquire(c, "cold").await?;
    t.add("acquire from pool cold (min_ready 0)", format!("{} ({})", cold.vm, served(&cold)), d);
    Ok((hot, warm, cold))
}

/// Steps 3 and 4: a file written into a leased VM is gone when the same VM is acquired again
/// after its release; returns the second lease.
async fn release_resets_the_vm(c: &mut Client, t: &mut Table) -> Result<v1::Lease, String> {
    let (r, d) = acquire(c, "reset").await?;
    t.add("acquire from pool reset", format!("{} ({})", r.vm, served(&r)), d);
    let s = Instant::now();
    c.upload(tokio_stream::iter(vec![v1::UploadRequest {
        lease_id: r.id.clone(),
        path: "note.txt".into(),
        text: "written during the lease\n".into(),
        ..Default::default()
    }]))
    .await
    .map_err(|e| format!("upload: {}", e.message()))?;
    t.add("upload note.txt", "ok", s.elapsed());
    let (code, out) = exec(c, &r.id, &["cat", "note.txt"]).await?;
    if code != 0 || !out.contains("written during the lease") {
        return Err(format!("note.txt was not written (exit {code}: {out})"));
    }
    let d = release(c, &r.id).await?;
    t.add("release (reset runs in the background)", "ok", d);

    let (again, d) = acquire(c, "reset").await?;
    t.add("acquire pool reset again (waits for reset)", format!("{} ({})", again.vm, served(&again)), d);
    if again.vm != r.vm {
        return Err(format!("expected the same VM {} again, got {}", r.vm, again.vm));
    }
    let s = Instant::now();
    let (code, _) = exec(c, &again.id, &["test", "-e", "note.txt"]).await?;
    if code == 0 {
        return Err("note.txt survived the reset".into());
    }
    t.add("exec `test -e note.txt`", "gone: the VM was reset", s.elapsed());
    Ok(again)
}

/// Step 5: a one-shot Run that writes a file and fetches it.
async fn one_shot_run(c: &mut Client, t: &mut Table) -> Result<(), String> {
    let s = Instant::now();
    let mut stream = c
        .run(futures::stream::iter([v1::RunRequest {
            pool: "hot".into(),
            holder: "demo".into(),
            command: argv(&["sh", "-c", "echo one-shot > out.txt; cat out.txt"]),
            outputs: vec!["out.txt".into()],
            ..Default::default()
        }]))
        .await
        .map_err(|e| format!("run: {}", e.message()))?
        .into_inner();
    let (mut result, mut data) = (None, Vec::new());
    while let Some(ev) = stream.message().await.map_err(|e| format!("run: {}", e.message()))? {
        match ev.event {
            Some(v1::run_event::Event::Result(r)) => result = Some(r),
            Some(v1::run_event::Event::Output(c)) => data.extend_from_slice(&c.data),
            _ => {}
        }
    }
    let r = result.ok_or("run ended without a result")?;
    let out = String::from_utf8_lossy(&data).trim().to_string();
    let code = r.exit.map(|x| x.code).unwrap_or(-1);
    t.add("run (acquire+exec+download+release)", format!("exit {code}, out.txt: {out}"), s.elapsed());
    Ok(())
}
