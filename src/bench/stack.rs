//! The benchmark's world: `mpool sim` in-process (so a scenario can change its time scale and
//! read its events), `mpool serve` in-process (the same `serve::Running` the binary runs) or as
//! a child process, gRPC clients over the Unix socket or loopback TCP with TLS and a token, and
//! `mpool multipass ...` child processes for the CLI-way baselines.
//!
//! The simulator's state lives on tmpfs (`/dev/shm`) when there is one: at time scale 0 it
//! stands in for an instant daemon, and its per-change fsync of `state.json` is not what any
//! scenario measures. mpool's own store lives on the normal temp dir (disk), as in production.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cli::client::{Client, Connect, connect};
use mpool_api::proto::v1;
use mpool_api::serve::{Options, Running};
use mpool_config::Config;
use mpool_core::types::SshEndpoint;
use mpool_engine::{Engine, Status};
use mpool_multipass::{self as multipass, ClientIdentity, ClientOptions, DaemonAddress, ServerVerification};
use mpool_sim::{SimConfig, Simulator};

/// How to reach the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Transport {
    /// The Unix socket (local clients; no token).
    Unix,
    /// Loopback TCP with TLS and a bearer token (remote clients such as Kestra workers).
    Tcp,
}

impl Transport {
    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Unix => "Unix socket",
            Transport::Tcp => "TCP+TLS+token",
        }
    }
}

/// What a stack is started with.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// `[[pools]]` tables.
    pub pools: String,
    /// Extra lines for `[engine]`.
    pub engine: String,
    /// Scheduler priorities.
    pub priorities: bool,
    /// Put mpool's store on tmpfs too (to show what fsync costs).
    pub store_on_tmpfs: bool,
    /// Make the simulator's `ssh_info` point here (a real sshd).
    pub ssh_target: Option<SshEndpoint>,
    /// Start `mpool serve` in-process (false: the simulator only).
    pub serve: bool,
}

impl StackOptions {
    /// In-process serve with these pools, priorities on, store on disk.
    pub fn new(pools: impl Into<String>) -> StackOptions {
        StackOptions {
            pools: pools.into(),
            engine: String::new(),
            priorities: true,
            store_on_tmpfs: false,
            ssh_target: None,
            serve: true,
        }
    }
}

/// A pool table for the config.
pub fn pool(name: &str, min_ready: u32, hot: u32, max_size: u32) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\nmin_ready = {min_ready}\nhot = {hot}\nmax_size = {max_size}\nmax_wait = \"10m\"\n\n"
    )
}

/// A directory on tmpfs when there is one, else under the normal temp dir.
pub fn fast_tempdir(prefix: &str) -> Result<tempfile::TempDir, String> {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix(prefix).tempdir_in(shm);
    match b {
        Ok(d) if shm.is_dir() => Ok(d),
        _ => tempfile::Builder::new().prefix(prefix).tempdir().map_err(|e| e.to_string()),
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())
}

/// Simulator + daemon.
pub struct Stack {
    /// Sockets, config, mpool's store (disk).
    pub dir: tempfile::TempDir,
    /// The simulator's state (tmpfs).
    pub fast: tempfile::TempDir,
    /// The simulator.
    pub sim: Option<Simulator>,
    /// The daemon, when in-process.
    pub running: Option<Running>,
    /// The config file (for `mpool serve` processes).
    pub config_path: PathBuf,
    /// The API TCP address.
    pub tcp: SocketAddr,
    /// A bearer token for `tcp`.
    pub token: String,
    /// The CA of the TCP listener's certificate.
    pub ca: PathBuf,
}

impl Stack {
    /// Starts the simulator (time scale 0) and, if asked, `mpool serve` in-process.
    pub async fn start(o: StackOptions) -> Result<Stack, String> {
        let dir = tempfile::Builder::new().prefix("mpool-bench-").tempdir().map_err(|e| e.to_string())?;
        let fast = fast_tempdir("mpool-bench-sim-")?;
        let root = dir.path().to_path_buf();
        let mut sc = SimConfig::new(root.join("multipass.sock"), fast.path().join("sim"));
        sc.time_scale = 0.0;
        sc.ssh_target = o.ssh_target.clone();
        let sim = Simulator::start(sc).await?;

        let (ca, leaf) = mpool_tls::generate_ca_and_server("localhost").map_err(|e| e.to_string())?;
        let w = |name: &str, text: &str| std::fs::write(root.join(name), text).map_err(|e| e.to_string());
        w("api-ca.pem", &ca.cert_pem)?;
        w("api-cert.pem", &leaf.cert_pem)?;
        w("api-key.pem", &leaf.key_pem)?;
        let token = mpool_api::auth::new_token();
        let hash = mpool_api::auth::hex(&mpool_api::auth::hash(&token));
        w("tokens.toml", &format!("[[tokens]]\nname = \"bench\"\nsha256 = \"{hash}\"\npools = [\"*\"]\n"))?;
        let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse().map_err(|e| format!("{e}"))?;
        let store_dir = if o.store_on_tmpfs { fast.path().to_path_buf() } else { root.clone() };
        let config = format!(
            r#"[daemon]
address = "unix:{root}/multipass.sock"
data_dir = "{root}/data"

[api]
listen = ["unix:{root}/mpool.sock", "{tcp}"]
tls_cert = "{root}/api-cert.pem"
tls_key = "{root}/api-key.pem"
tokens_file = "{root}/tokens.toml"

[store]
path = "{store}/mpool.redb"

[engine]
shutdown_grace = "1s"
{engine}

{pools}
"#,
            root = root.display(),
            store = store_dir.display(),
            engine = o.engine,
            pools = o.pools,
        );
        let config_path = root.join("mpool.toml");
        std::fs::write(&config_path, &config).map_err(|e| e.to_string())?;
        let mut stack =
            Stack { ca: root.join("api-ca.pem"), dir, fast, sim: Some(sim), running: None, config_path, tcp, token };
        if o.serve {
            stack.start_serve(o.priorities).await?;
        }
        Ok(stack)
    }

    /// Starts `mpool serve` in-process (once).
    pub async fn start_serve(&mut self, priorities: bool) -> Result<(), String> {
        let text = std::fs::read_to_string(&self.config_path).map_err(|e| e.to_string())?;
        let root = self.root().to_path_buf();
        let cfg = Config::parse(&text, &root).map_err(|e| e.to_string())?;
        let opts = Options {
            data_dir: root.join("data"),
            priorities,
            daemon_wait: Some(Duration::from_secs(10)),
            store_faults: 0.0,
        };
        self.running = Some(Running::start(cfg, opts).await?);
        Ok(())
    }

    /// The simulator's state dir.
    pub fn sim_state(&self) -> PathBuf {
        self.fast.path().join("sim")
    }

    /// The temp dir (disk).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The simulator.
    pub fn sim(&self) -> &Simulator {
        self.sim.as_ref().expect("the simulator runs until stop")
    }

    /// The in-process engine.
    pub fn engine(&self) -> Result<&Engine, String> {
        self.running.as_ref().map(|r| r.engine()).ok_or_else(|| "mpool serve is not running in-process".to_string())
    }

    /// The simulator's socket.
    pub fn daemon_socket(&self) -> PathBuf {
        self.root().join("multipass.sock")
    }

    /// The API's Unix socket.
    pub fn api_socket(&self) -> PathBuf {
        self.root().join("mpool.sock")
    }

    /// A new API client (its own connection).
    pub async fn client(&self, t: Transport) -> Result<Client, String> {
        let c = match t {
            Transport::Unix => {
                Connect { endpoint: format!("unix:{}", self.api_socket().display()), token: None, ca: None }
            }
            Transport::Tcp => Connect {
                endpoint: format!("https://localhost:{}", self.tcp.port()),
                token: Some(self.token.clone()),
                ca: Some(self.ca.clone()),
            },
        };
        connect(&c).await
    }

    /// A multipassd client with mpool's own identity (trusted: the same certificate).
    pub async fn daemon_client(&self) -> Result<multipass::Client, String> {
        let mut o = ClientOptions::new(self.root().join("data"));
        o.address = Some(DaemonAddress::Unix(self.daemon_socket()));
        o.identity = ClientIdentity::Auto;
        o.verification = ServerVerification::RootCert(self.sim().root_cert());
        o.call_timeout = Duration::from_secs(600);
        multipass::Client::connect(o).await.map_err(|e| e.to_string())
    }

    /// Environment for `mpool multipass ...` processes talking to the simulator as mpool does.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("MPOOL_DAEMON".into(), format!("unix:{}", self.daemon_socket().display())),
            ("MPOOL_DATA_DIR".into(), self.root().join("data").display().to_string()),
            ("MPOOL_LOG".into(), "error".into()),
        ]
    }

    /// The engine's status.
    pub async fn status(&self) -> Result<Status, String> {
        self.engine()?.status().await.map_err(|e| e.to_string())
    }

    /// Waits (bounded) until `pool` has `idle` idle VMs, nothing busy and nobody waiting.
    pub async fn settled(&self, pool: &str, idle: usize, limit: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            let s = self.status().await?;
            if settled(&s, pool, idle) {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                let p = s.pools.iter().find(|p| p.name == pool);
                return Err(format!(
                    "pool {pool} did not settle with {idle} idle VMs within {limit:?}: {:?}",
                    p.map(|p| &p.counts)
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        if let Some(s) = self.sim.take() {
            s.shutdown().await;
        }
    }
}

/// Whether `pool` has `idle` idle VMs (hot or warm), none busy, nobody waiting.
pub fn settled(s: &Status, pool: &str, idle: usize) -> bool {
    let Some(p) = s.pools.iter().find(|p| p.name == pool) else { return false };
    let n = p.counts.get("hot").copied().unwrap_or(0) + p.counts.get("warm").copied().unwrap_or(0);
    let busy = s.vms.iter().any(|v| v.pool == pool && v.busy);
    n >= idle && !busy && p.waiters == 0 && p.leases == 0
}

/// How many of `pool`'s VMs are in `state`.
pub fn count(s: &Status, pool: &str, state: &str) -> usize {
    s.pools.iter().find(|p| p.name == pool).and_then(|p| p.counts.get(state).copied()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------- API calls

/// Acquires a lease; returns it and the call's wall time.
pub async fn acquire(c: &mut Client, pool: &str, holder: &str) -> Result<(v1::Lease, Duration), String> {
    let t = Instant::now();
    let l = c
        .acquire(v1::AcquireRequest { pool: pool.into(), holder: holder.into(), ..Default::default() })
        .await
        .map_err(|e| format!("acquire from {pool}: {}", e.message()))?
        .into_inner();
    Ok((l, t.elapsed()))
}

/// Releases a lease; returns the call's wall time.
pub async fn release(c: &mut Client, lease: &str) -> Result<Duration, String> {
    let t = Instant::now();
    c.release(v1::ReleaseRequest { lease_id: lease.into() }).await.map_err(|e| format!("release: {}", e.message()))?;
    Ok(t.elapsed())
}

/// How a lease was served, as a word.
pub fn served(l: &v1::Lease) -> &'static str {
    match v1::Served::try_from(l.served) {
        Ok(v1::Served::Hot) => "hot",
        Ok(v1::Served::Warm) => "warm",
        Ok(v1::Served::Cold) => "cold",
        Ok(v1::Served::Repeat) => "repeat",
        _ => "unknown",
    }
}

/// An exec through the API: time to the first stdout bytes, time to the exit, exit code.
pub struct ExecTimes {
    /// From the call to the first stdout event (None: no output).
    pub first_output: Option<Duration>,
    /// From the call to the exit event.
    pub total: Duration,
    /// Exit code.
    pub code: i32,
}

/// Runs `argv` on a lease through the API.
pub async fn exec(c: &mut Client, lease: &str, argv: &[&str]) -> Result<ExecTimes, String> {
    let t = Instant::now();
    let mut s = c
        .exec(v1::ExecRequest {
            lease_id: lease.into(),
            command: Some(v1::Command { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }),
            exec_id: String::new(),
        })
        .await
        .map_err(|e| format!("exec: {}", e.message()))?
        .into_inner();
    let mut first = None;
    while let Some(ev) = s.message().await.map_err(|e| format!("exec: {}", e.message()))? {
        match ev.event {
            Some(v1::exec_event::Event::Stdout(_)) if first.is_none() => first = Some(t.elapsed()),
            Some(v1::exec_event::Event::Exit(x)) => {
                return Ok(ExecTimes { first_output: first, total: t.elapsed(), code: x.code });
            }
            _ => {}
        }
    }
    Err("exec: the stream ended without an exit status".into())
}

// ---------------------------------------------------------------------------------- processes

/// What a child process did.
#[derive(Debug)]
pub struct ProcRun {
    /// Spawn to exit.
    pub wall: Duration,
    /// Spawn to the first line of stdout containing the marker (if asked and seen).
    pub marker_at: Option<Duration>,
    /// Its stdout.
    pub stdout: String,
}

/// Runs `program args` with `env`, waiting for it (bounded by `limit`); fails on a non-zero exit.
pub async fn run_process(
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    marker: Option<&str>,
    limit: Duration,
) -> Result<ProcRun, String> {
    use tokio::io::AsyncBufReadExt;
    let t = Instant::now();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::BufReader::new(stderr), &mut s).await;
        s
    });
    let body = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut out = String::new();
        let mut marker_at = None;
        while let Ok(Some(line)) = lines.next_line().await {
            if marker_at.is_none() && marker.is_some_and(|m| line.contains(m)) {
                marker_at = Some(t.elapsed());
            }
            out.push_str(&line);
            out.push('\n');
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, out, marker_at))
    };
    let (status, stdout, marker_at) =
        tokio::time::timeout(limit, body).await.map_err(|_| format!("{what}: no exit within {limit:?}"))??;
    let wall = t.elapsed();
    if !status.success() {
        let err = err_task.await.unwrap_or_default();
        return Err(format!("{what}: {status}: {}", err.trim()));
    }
    Ok(ProcRun { wall, marker_at, stdout })
}

/// `mpool multipass ARGS` against the stack's simulator.
pub async fn mp(exe: &Path, stack: &Stack, args: &[&str], marker: Option<&str>) -> Result<ProcRun, String> {
    let mut full = vec!["multipass"];
    full.extend_from_slice(args);
    run_process(exe, &full, &stack.cli_env(), marker, Duration::from_secs(600)).await
}

/// `sh -c LINE` with `$MPOOL` set to this binary and the simulator's environment.
pub async fn sh(exe: &Path, stack: &Stack, line: &str) -> Result<ProcRun, String> {
    let mut env = stack.cli_env();
    env.push(("MPOOL".into(), exe.display().to_string()));
    run_process(Path::new("/bin/sh"), &["-c", line], &env, None, Duration::from_secs(600)).await
}

/// Creates `name` directly on the daemon the way a shell recipe would keep it: launched,
/// stopped, with a `clean` snapshot, started and suspended.
pub async fn recipe_vm(d: &multipass::Client, name: &str) -> Result<(), String> {
    use multipass::{LaunchOptions, Names};
    let e = |e: multipass::Error| format!("{name}: {e}");
    d.launch(&LaunchOptions { name: name.into(), ..Default::default() }).await.map_err(e)?;
    d.stop(&Names::one(name), false).await.map_err(e)?;
    d.snapshot(name, Some("clean"), "").await.map_err(e)?;
    d.start(&Names::one(name), 0).await.map_err(e)?;
    d.suspend(&Names::one(name)).await.map_err(e)?;
    Ok(())
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}
