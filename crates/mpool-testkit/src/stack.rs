//! A whole stack: `mpool sim` in-process (so callers can hang and release daemon operations,
//! change its time scale and read its events) and `mpool serve` in-process, as a child process
//! of the `mpool` binary (so tests can `kill -9` it), or not at all; the API on a Unix socket
//! and on TCP with TLS and a bearer token, optionally `/metrics` and the HTTP/JSON facade (same
//! TLS and tokens); clients for all of them.
//!
//! [`StackOptions::tests`] is what the integration tests start, [`StackOptions::bench`] what
//! the benchmarks start; both are plain structs to adjust before [`Stack::start`].
//!
//! Starting and stopping return [`Result`]; the conveniences only tests use ([`Stack::client`],
//! [`Stack::tcp_client`], [`Stack::wait_idle`], [`Stack::http`], [`Stack::http_send`]) panic
//! with the serve log instead, as assertions do.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mpool_api::client::{Client, Connect, connect};
use mpool_api::proto::v1;
use mpool_api::serve::{Options, Running};
use mpool_config::Config;
use mpool_core::types::SshEndpoint;
use mpool_engine::{Engine, Status};
use mpool_multipass::{self as multipass, ClientIdentity, ClientOptions, DaemonAddress, ServerVerification};
use mpool_sim::{SimConfig, SimEvent, Simulator, Stop};
use tokio::sync::broadcast;

use crate::http::{self, HttpAnswer};
use crate::{Error, Result, wait};

/// How `mpool serve` runs in a [`Stack`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serve {
    /// In this process (`mpool_api::serve::Running`, what the binary runs): the engine is at
    /// hand ([`Stack::engine`]).
    InProcess,
    /// A child process `MPOOL serve --config ...` of this `mpool` binary (e.g.
    /// `env!("CARGO_BIN_EXE_mpool")`), so it can be killed with SIGKILL.
    Process(PathBuf),
}

/// Where mpool's state store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreAt {
    /// `mpool.redb` in the stack's directory, on disk (as in production).
    Disk,
    /// On tmpfs when there is one (`/dev/shm`), to show what fsync costs.
    Tmpfs,
    /// This file (e.g. on a tmpfs a test fills up).
    Path(PathBuf),
}

/// How to reach the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Transport {
    /// The Unix socket (local clients; no token).
    Unix,
    /// Loopback TCP with TLS and the stack's bearer token (remote clients such as Kestra workers).
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

type SimTweak = Box<dyn FnOnce(&mut SimConfig) + Send>;

/// What a [`Stack`] is started with. Start from [`StackOptions::tests`] or
/// [`StackOptions::bench`] and change fields.
pub struct StackOptions {
    /// `[[pools]]` tables (see [`pool`]).
    pub pools: String,
    /// How `mpool serve` runs.
    pub serve: Serve,
    /// Whether [`Stack::start`] starts `mpool serve` (false: the simulator only, until
    /// [`Stack::start_serve`] or [`Stack::spawn_serve`]).
    pub serve_at_start: bool,
    /// `[daemon]` lines besides `address` and `data_dir`.
    pub daemon_toml: String,
    /// `[api]` lines besides the listeners, TLS and tokens, e.g. `max_upload = "64K"`.
    pub api_toml: String,
    /// The `[engine]` lines.
    pub engine_toml: String,
    /// `[host]` lines besides `data_dir` (the simulator's state directory, standing in for
    /// multipassd's data directory), e.g. `cpu_overcommit = 2`.
    pub host_toml: String,
    /// The name of the stack's own token ([`Stack::token`], allowed every pool).
    pub token_name: String,
    /// More tokens: (name, plaintext token, pools).
    pub tokens: Vec<(String, String, Vec<String>)>,
    /// Serve `/metrics` on [`Stack::metrics`] and the HTTP/JSON facade on [`Stack::http`]
    /// (when false, those addresses are reserved but nothing listens there).
    pub metrics_and_http: bool,
    /// Where mpool's store lives.
    pub store: StoreAt,
    /// Keep the simulator's state on tmpfs when there is one: at time scale 0 it stands in for
    /// an instant daemon, and its per-change fsync of `state.json` is not what a benchmark
    /// measures.
    pub sim_on_tmpfs: bool,
    /// The daemon scheduler's priorities (`--no-priorities` when false).
    pub priorities: bool,
    /// Share of store writes `mpool serve` fails on purpose (chaos runs; 0 otherwise).
    pub store_faults: f64,
    /// `MPOOL_LOG` of a serve process.
    pub serve_log: String,
    sim_tweaks: Vec<SimTweak>,
}

impl StackOptions {
    /// What the integration tests start: `mpool serve` as a child process of `mpool` (the
    /// binary under test), logging `info,mpool=debug`; metrics and the HTTP facade on; a
    /// 10 s daemon call timeout (20 s blocking); reconcile every 100 ms, health checks every
    /// 1 s, 2 s shutdown grace; tokens `ci-bot` (the stack's) and `other` (`other-token`);
    /// the simulator at time scale 0 with log-only replies interleaved as multipassd does.
    pub fn tests(mpool: impl Into<PathBuf>, pools: impl Into<String>) -> StackOptions {
        StackOptions {
            pools: pools.into(),
            serve: Serve::Process(mpool.into()),
            serve_at_start: true,
            daemon_toml: "call_timeout = \"10s\"\nblocking_call_timeout = \"20s\"".into(),
            api_toml: String::new(),
            engine_toml: "reconcile_interval = \"100ms\"\nhealth_interval = \"1s\"\nshutdown_grace = \"2s\"".into(),
            host_toml: String::new(),
            token_name: "ci-bot".into(),
            tokens: vec![("other".into(), "other-token".into(), vec!["*".into()])],
            metrics_and_http: true,
            store: StoreAt::Disk,
            sim_on_tmpfs: false,
            priorities: true,
            store_faults: 0.0,
            serve_log: "info,mpool=debug".into(),
            sim_tweaks: vec![Box::new(|c| c.log_lines = true)],
        }
    }

    /// What the benchmarks start: `mpool serve` in-process with priorities, the store on
    /// disk, the simulator's state on tmpfs at time scale 0, default timeouts and intervals
    /// with a 1 s shutdown grace, one token `bench`, no metrics or HTTP listener.
    pub fn bench(pools: impl Into<String>) -> StackOptions {
        StackOptions {
            pools: pools.into(),
            serve: Serve::InProcess,
            serve_at_start: true,
            daemon_toml: String::new(),
            api_toml: String::new(),
            engine_toml: "shutdown_grace = \"1s\"".into(),
            host_toml: String::new(),
            token_name: "bench".into(),
            tokens: vec![],
            metrics_and_http: false,
            store: StoreAt::Disk,
            sim_on_tmpfs: true,
            priorities: true,
            store_faults: 0.0,
            serve_log: "info".into(),
            sim_tweaks: vec![],
        }
    }

    /// Adjusts the simulator's config (after time scale 0 and the earlier tweaks), e.g.
    /// `|c| c.hang_ops = vec!["snapshot".into()]`.
    pub fn sim(mut self, tweak: impl FnOnce(&mut SimConfig) + Send + 'static) -> StackOptions {
        self.sim_tweaks.push(Box::new(tweak));
        self
    }

    /// Makes the simulator's `ssh_info` point at `endpoint` (e.g. [`crate::Sshd::target`]):
    /// its "VMs" are then that server, as `mpool sim --ssh-target` does.
    pub fn ssh_via(self, endpoint: &SshEndpoint) -> StackOptions {
        let target = endpoint.clone();
        self.sim(move |c| c.ssh_target = Some(target))
    }
}

impl fmt::Debug for StackOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackOptions")
            .field("pools", &self.pools)
            .field("serve", &self.serve)
            .field("serve_at_start", &self.serve_at_start)
            .field("daemon_toml", &self.daemon_toml)
            .field("api_toml", &self.api_toml)
            .field("engine_toml", &self.engine_toml)
            .field("host_toml", &self.host_toml)
            .field("token_name", &self.token_name)
            .field("tokens", &self.tokens.iter().map(|t| &t.0).collect::<Vec<_>>())
            .field("metrics_and_http", &self.metrics_and_http)
            .field("store", &self.store)
            .field("sim_on_tmpfs", &self.sim_on_tmpfs)
            .field("priorities", &self.priorities)
            .field("store_faults", &self.store_faults)
            .field("serve_log", &self.serve_log)
            .field("sim_tweaks", &self.sim_tweaks.len())
            .finish()
    }
}

/// A `[[pools]]` table: `name` with `min_ready` ready VMs, `hot` of them running, at most
/// `max_size`, acquires waiting up to 10 minutes.
pub fn pool(name: &str, min_ready: u32, hot: u32, max_size: u32) -> String {
    format!(
        "[[pools]]\nname = \"{name}\"\nmin_ready = {min_ready}\nhot = {hot}\nmax_size = {max_size}\nmax_wait = \"10m\"\n\n"
    )
}

/// A directory on tmpfs when there is one, else under the normal temp dir.
fn fast_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    match tempfile::Builder::new().prefix(prefix).tempdir_in(shm) {
        Ok(d) if shm.is_dir() => Ok(d),
        _ => Ok(tempfile::Builder::new().prefix(prefix).tempdir()?),
    }
}

fn sha256_hex(token: &str) -> String {
    mpool_api::auth::hex(&mpool_api::auth::hash(token))
}

/// The running stack. [`Stack::stop`] stops everything cleanly; dropping it kills a serve
/// process and, on a multi-thread runtime, stops the rest too (see `Drop`).
pub struct Stack {
    /// Sockets, certificates, config, logs, mpool's data dir and (unless elsewhere) its store.
    pub dir: tempfile::TempDir,
    /// A tmpfs directory for what [`StackOptions`] puts there.
    _fast: Option<tempfile::TempDir>,
    sim: Option<Simulator>,
    /// The simulator's events from before `mpool serve` started (take it to miss none).
    pub events_from_start: Option<broadcast::Receiver<SimEvent>>,
    serve: Serve,
    running: Option<Running>,
    child: Option<Child>,
    priorities: bool,
    store_faults: f64,
    serve_log: String,
    sim_state: PathBuf,
    /// API Unix socket.
    pub socket: PathBuf,
    /// API TCP address (TLS + token).
    pub tcp: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// HTTP/JSON facade address (TLS + token, like `tcp`).
    pub http: SocketAddr,
    /// A valid bearer token for `tcp` and `http`, allowed every pool.
    pub token: String,
    /// The CA certificate that signed the TCP listeners' certificate (server name `localhost`).
    pub ca: PathBuf,
    /// The config file.
    pub config: PathBuf,
}

impl Stack {
    /// Starts the simulator and, if [`StackOptions::serve_at_start`], `mpool serve` (waiting
    /// until it listens).
    pub async fn start(o: StackOptions) -> Result<Stack> {
        let dir = tempfile::Builder::new().prefix("mpool-stack-").tempdir()?;
        let root = dir.path().to_path_buf();
        let fast =
            if o.sim_on_tmpfs || o.store == StoreAt::Tmpfs { Some(fast_tempdir("mpool-stack-fast-")?) } else { None };
        let fast_root = fast.as_ref().map(|d| d.path().to_path_buf());

        let sim_state = if o.sim_on_tmpfs { fast_root.clone().unwrap_or_else(|| root.clone()) } else { root.clone() };
        let sim_state = sim_state.join("sim");
        let mut sc = SimConfig::new(root.join("multipass.sock"), &sim_state);
        sc.time_scale = 0.0;
        for tweak in o.sim_tweaks {
            tweak(&mut sc);
        }
        let sim = Simulator::start(sc).await.map_err(|e| Error::new(format!("the simulator: {e}")))?;
        let events_from_start = Some(sim.events());

        let (ca, leaf) = mpool_tls::generate_ca_and_server("localhost").map_err(|e| Error::new(e.to_string()))?;
        let write = |name: &str, text: &str| {
            std::fs::write(root.join(name), text).map_err(|e| Error::new(format!("writing {name}: {e}")))
        };
        write("api-ca.pem", &ca.cert_pem)?;
        write("api-cert.pem", &leaf.cert_pem)?;
        write("api-key.pem", &leaf.key_pem)?;
        let token = mpool_api::auth::new_token();
        let mut tokens =
            format!("[[tokens]]\nname = {:?}\nsha256 = \"{}\"\npools = [\"*\"]\n", o.token_name, sha256_hex(&token));
        for (name, plain, pools) in &o.tokens {
            tokens.push_str(&format!(
                "\n[[tokens]]\nname = {name:?}\nsha256 = \"{}\"\npools = {pools:?}\n",
                sha256_hex(plain)
            ));
        }
        write("tokens.toml", &tokens)?;

        // Three ports held at once, so they differ (ports picked one by one could repeat).
        let held = (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
        let ports = held.iter().map(|l| l.local_addr()).collect::<std::io::Result<Vec<_>>>()?;
        drop(held);
        let (tcp, metrics, http) = (ports[0], ports[1], ports[2]);
        let listeners = if o.metrics_and_http {
            format!("metrics_listen = \"{metrics}\"\nhttp_listen = \"{http}\"\n")
        } else {
            String::new()
        };
        let store = match &o.store {
            StoreAt::Disk => root.join("mpool.redb"),
            StoreAt::Tmpfs => fast_root.clone().unwrap_or_else(|| root.clone()).join("mpool.redb"),
            StoreAt::Path(p) => p.clone(),
        };
        let config = root.join("mpool.toml");
        write(
            "mpool.toml",
            &format!(
                r#"[daemon]
address = "unix:{root}/multipass.sock"
data_dir = "{root}/data"
{daemon}

[api]
listen = ["unix:{root}/mpool.sock", "{tcp}"]
tls_cert = "{root}/api-cert.pem"
tls_key = "{root}/api-key.pem"
tokens_file = "{root}/tokens.toml"
{listeners}{api}

[store]
path = "{store}"

[engine]
{engine}

[host]
data_dir = "{sim_state}"
{host}

{pools}
"#,
                root = root.display(),
                daemon = o.daemon_toml,
                api = o.api_toml,
                store = store.display(),
                engine = o.engine_toml,
                sim_state = sim_state.display(),
                host = o.host_toml,
                pools = o.pools,
            ),
        )?;
        let mut stack = Stack {
            socket: root.join("mpool.sock"),
            ca: root.join("api-ca.pem"),
            dir,
            _fast: fast,
            sim: Some(sim),
            events_from_start,
            serve: o.serve,
            running: None,
            child: None,
            priorities: o.priorities,
            store_faults: o.store_faults,
            serve_log: o.serve_log,
            sim_state,
            tcp,
            metrics,
            http,
            token,
            config,
        };
        if o.serve_at_start {
            stack.start_serve().await?;
        }
        Ok(stack)
    }

    /// The stack's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The simulator.
    pub fn sim(&self) -> &Simulator {
        self.sim.as_ref().expect("the simulator runs until the stack stops")
    }

    /// The simulator's state dir.
    pub fn sim_state(&self) -> PathBuf {
        self.sim_state.clone()
    }

    /// The simulator's socket (what mpool's `[daemon] address` names).
    pub fn daemon_socket(&self) -> PathBuf {
        self.path().join("multipass.sock")
    }

    /// Restarts the simulator on the same state dir and socket (see
    /// `mpool_sim::Simulator::restart_with`); `mpool serve` keeps running.
    pub async fn restart_sim(&mut self, how: Stop, tweak: impl FnOnce(&mut SimConfig)) -> Result<()> {
        let sim = self.sim.take().ok_or("the simulator is not running")?;
        let sim = sim.restart_with(how, tweak).await.map_err(|e| Error::new(format!("the simulator restarts: {e}")))?;
        self.sim = Some(sim);
        Ok(())
    }

    // ------------------------------------------------------------------------ mpool serve

    /// Starts `mpool serve` (again) and waits (60 s at most) until it listens on its Unix
    /// socket and TCP. A serve process that exits meanwhile fails this with its log.
    pub async fn start_serve(&mut self) -> Result<()> {
        match self.serve {
            Serve::InProcess => {
                if self.running.is_some() {
                    return Err("mpool serve already runs in this process".into());
                }
                let text = std::fs::read_to_string(&self.config)?;
                let root = self.path().to_path_buf();
                let cfg = Config::parse(&text, &root).map_err(|e| Error::new(e.to_string()))?;
                let opts = Options {
                    data_dir: root.join("data"),
                    priorities: self.priorities,
                    daemon_wait: Some(Duration::from_secs(10)),
                    store_faults: self.store_faults,
                    config_path: Some(self.config.clone()),
                };
                self.running = Some(Running::start(cfg, opts).await?);
                Ok(())
            }
            Serve::Process(_) => {
                self.spawn_serve()?;
                self.wait_serving(Duration::from_secs(60)).await
            }
        }
    }

    /// Starts a serve process without waiting for it (its Unix socket appears once it
    /// listens; [`Stack::wait_serving`] waits for that), killing the previous one if it still
    /// runs. Its stderr is appended to [`Stack::log_path`]. Only for [`Serve::Process`].
    pub fn spawn_serve(&mut self) -> Result<()> {
        let Serve::Process(exe) = self.serve.clone() else {
            return Err("an in-process mpool serve starts with start_serve".into());
        };
        self.kill_serve();
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| Error::new(format!("the serve log: {e}")))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve").arg("--config").arg(&self.config);
        if !self.priorities {
            cmd.arg("--no-priorities");
        }
        if self.store_faults > 0.0 {
            cmd.arg("--inject-store-faults").arg(self.store_faults.to_string());
        }
        let child = cmd
            .env("MPOOL_LOG", &self.serve_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| Error::new(format!("{} serve: {e}", exe.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `mpool serve` listens: its Unix socket exists (it appears only once serve
    /// listens), then its TCP listener accepts. Fails if the serve process exits.
    pub async fn wait_serving(&mut self, limit: Duration) -> Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let start = Instant::now();
        let what = format!("mpool serve opens {}", self.socket.display());
        let (socket, child) = (&self.socket, &mut self.child);
        let opened = wait(what, limit)
            .every(Duration::from_millis(2))
            .until(|| {
                std::future::ready(match child.as_mut().map(|c| c.try_wait()) {
                    None => Err("mpool serve is not running".to_string()),
                    Some(Ok(Some(status))) => Err(format!("mpool serve exited with {status}")),
                    _ => Ok(socket.exists().then_some(())),
                })
            })
            .await;
        opened.map_err(|e| e.context(format!("log:\n{}\n", self.log())))?;
        // serve binds its TCP listeners before the Unix socket: this holds at once.
        let tcp = self.tcp;
        wait(format!("mpool serve listens on {tcp}"), limit.saturating_sub(start.elapsed()))
            .until(|| async move { tokio::net::TcpStream::connect(tcp).await.is_ok() })
            .await
            .map_err(|e| e.context(format!("log:\n{}\n", self.log())))
    }

    /// `kill -9` of the serve process (an in-process serve is left alone: see
    /// [`Stack::stop_serve`]).
    pub fn kill_serve(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to the serve process (a clean shutdown); waits for it to exit and returns its
    /// status (`None`: no serve process).
    pub fn term_serve(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        c.wait().ok()
    }

    /// Stops `mpool serve` cleanly: an in-process one through its shutdown, a process by
    /// SIGTERM.
    pub async fn stop_serve(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        self.term_serve();
    }

    /// The serve process, if one was started and not killed.
    pub fn serve_child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// The serve process's pid.
    pub fn serve_pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether `mpool serve` runs: in-process, or a process that has not exited.
    pub fn serve_running(&mut self) -> bool {
        self.running.is_some() || self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The share of store writes the next `mpool serve` started fails on purpose.
    pub fn set_store_faults(&mut self, rate: f64) {
        self.store_faults = rate;
    }

    /// The serve log so far (a serve process's stderr, appended across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where the serve log is.
    pub fn log_path(&self) -> PathBuf {
        self.path().join("serve.log")
    }

    /// The in-process engine.
    pub fn engine(&self) -> Result<&Engine> {
        self.running.as_ref().map(|r| r.engine()).ok_or_else(|| "mpool serve is not running in-process".into())
    }

    /// The in-process engine's status.
    pub async fn status(&self) -> Result<Status> {
        self.engine()?.status().await.map_err(|e| Error::new(e.to_string()))
    }

    /// Waits (bounded, in-process) until `pool` has `idle` idle VMs, nothing busy and nobody
    /// waiting; returns how long that took.
    pub async fn settled(&self, pool: &str, idle: usize, limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        let last = std::sync::Mutex::new(None);
        let done = wait(format!("pool {pool} settles with {idle} idle VMs"), limit)
            .every(Duration::from_millis(5))
            .until(|| async {
                let s = self.status().await?;
                let ok = settled(&s, pool, idle);
                *last.lock().unwrap_or_else(|e| e.into_inner()) =
                    s.pools.into_iter().find(|p| p.name == pool).map(|p| p.counts);
                Ok::<_, Error>(ok.then_some(()))
            })
            .await;
        done.map_err(|e| Error::new(format!("{e}: {:?}", last.lock().unwrap_or_else(|e| e.into_inner()))))?;
        Ok(t.elapsed())
    }

    /// Stops everything: serve cleanly, then the simulator.
    pub async fn stop(mut self) {
        self.stop_serve().await;
        if let Some(s) = self.sim.take() {
            stop_sim(s).await;
        }
    }

    // ------------------------------------------------------------------------ clients

    /// A new API client (its own connection).
    pub async fn connect(&self, t: Transport) -> Result<Client> {
        match t {
            Transport::Unix => {
                connect(&Connect { endpoint: format!("unix:{}", self.socket.display()), token: None, ca: None })
                    .await
                    .map_err(Error::new)
            }
            Transport::Tcp => self.connect_tcp(Some(&self.token)).await,
        }
    }

    /// A raw gRPC channel over the Unix socket, to call methods the generated client lacks.
    #[cfg(feature = "tests")]
    pub async fn raw_channel(&self) -> tonic::client::Grpc<tonic::transport::Channel> {
        let path = self.socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            }))
            .await
            .expect("a channel over the Unix socket");
        tonic::client::Grpc::new(channel)
    }

    /// A new API client over TCP with TLS and this token.
    pub async fn connect_tcp(&self, token: Option<&str>) -> Result<Client> {
        connect(&Connect {
            endpoint: format!("https://localhost:{}", self.tcp.port()),
            token: token.map(String::from),
            ca: Some(self.ca.clone()),
        })
        .await
        .map_err(Error::new)
    }

    /// A client over the Unix socket (no token needed there). Panics if it cannot connect.
    pub async fn client(&self) -> Client {
        self.connect(Transport::Unix).await.unwrap_or_else(|e| panic!("client connects: {e}"))
    }

    /// A client over TCP with TLS and the given token. Panics if it cannot connect.
    pub async fn tcp_client(&self, token: Option<&str>) -> Client {
        self.connect_tcp(token).await.unwrap_or_else(|e| panic!("tcp client connects: {e}"))
    }

    /// A multipassd client with serve's identity (`ClientIdentity::Auto`, the config's default:
    /// the certificate the simulator trusts since serve connected first).
    pub async fn daemon_client(&self) -> Result<multipass::Client> {
        let mut o = ClientOptions::new(self.path().join("data"));
        o.address = Some(DaemonAddress::Unix(self.daemon_socket()));
        o.identity = ClientIdentity::Auto;
        o.verification = ServerVerification::RootCert(self.sim().root_cert());
        o.call_timeout = Duration::from_secs(600);
        multipass::Client::connect(o).await.map_err(|e| Error::new(e.to_string()))
    }

    /// Environment for `mpool multipass ...` processes talking to the simulator as mpool does.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        vec![
            ("MPOOL_DAEMON".into(), format!("unix:{}", self.daemon_socket().display())),
            ("MPOOL_DATA_DIR".into(), self.path().join("data").display().to_string()),
            ("MPOOL_LOG".into(), "error".into()),
        ]
    }

    /// Waits (60 s at most, through the API) until `pool` has at least `n` idle VMs; panics
    /// with the serve log if it does not.
    pub async fn wait_idle(&self, pool: &str, n: u32) {
        let c = self.client().await;
        wait(format!("pool {pool} has {n} idle VMs"), Duration::from_secs(60))
            .until(|| async {
                let p = c.clone().get_pool(v1::GetPoolRequest { pool: pool.into() }).await.ok()?.into_inner();
                let idle = p.vms.get("hot").copied().unwrap_or(0) + p.vms.get("warm").copied().unwrap_or(0);
                (idle >= n).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", self.log()));
    }

    /// One HTTP/1.1 request to the facade over TLS (`Connection: close`, the answer read to
    /// EOF; see [`crate::http`]). Panics if it cannot be sent.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> HttpAnswer {
        http::request(self.http, &self.ca, method, path, token, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Sends a request to the facade (`Connection: close` or keep-alive) and returns the open
    /// TLS stream without reading the answer. Panics if it cannot be sent.
    pub async fn http_send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
        close: bool,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        http::send(self.http, &self.ca, method, path, token, body, close)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A TLS connection to the facade with nothing sent yet. Panics if it cannot connect.
    pub async fn http_connect(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        http::connect(self.http, &self.ca).await.unwrap_or_else(|e| panic!("connect to the facade: {e}"))
    }
}

/// Shuts the simulator down and waits (10 s at most: a call held on purpose may never end)
/// until its calls in flight end: a call's handler outlives its connection and the server,
/// and saves the state when it ends.
async fn stop_sim(sim: Simulator) {
    let daemon = sim.daemon().clone();
    sim.shutdown().await;
    let _ = wait("the simulator's calls end", Duration::from_secs(10))
        .every(Duration::from_millis(5))
        .until(|| async { daemon.calls_in_flight() == 0 })
        .await;
}

impl Drop for Stack {
    /// Kills a serve process, then stops an in-process serve and the simulator (see
    /// `stop_sim`) before the directory goes: they write into it (the simulator its
    /// `state.json`, re-creating the directory if need be) until they end. That takes a
    /// multi-thread runtime to block on; elsewhere call [`Stack::stop`] instead.
    fn drop(&mut self) {
        self.kill_serve();
        let (running, sim) = (self.running.take(), self.sim.take());
        if running.is_none() && sim.is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return;
        }
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                if let Some(r) = running {
                    r.stop().await;
                }
                if let Some(s) = sim {
                    stop_sim(s).await;
                }
            })
        });
    }
}

/// Whether `pool` has `idle` idle VMs (hot or warm), none busy, nobody waiting, no lease.
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
