//! The client commands of `mpool` (for shell scripts and Kestra shell tasks): talk to a running
//! `mpool serve` over `--endpoint` (`unix:PATH` or `http(s)://HOST:PORT`, env `MPOOL_ENDPOINT`)
//! with an optional `--token` (env `MPOOL_TOKEN`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::proto::v1;
use crate::proto::v1::pool_client::PoolClient;

/// The default API socket of a systemd install.
pub const DEFAULT_ENDPOINT: &str = "unix:/run/mpool/mpool.sock";

/// How to reach `mpool serve`.
#[derive(Args, Debug, Clone)]
pub struct Connect {
    /// `unix:PATH` or `http(s)://HOST:PORT`.
    #[arg(long, env = "MPOOL_ENDPOINT", default_value = DEFAULT_ENDPOINT, global = true)]
    pub endpoint: String,
    /// Bearer token for TCP endpoints.
    #[arg(long, env = "MPOOL_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to verify an https endpoint.
    #[arg(long, env = "MPOOL_CA", global = true)]
    pub ca: Option<PathBuf>,
}

/// A client with the token attached to every call.
pub type Client = PoolClient<tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>>;

/// Adds `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct TokenInterceptor(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Connects to the API.
pub async fn connect(c: &Connect) -> Result<Client, String> {
    let channel = if let Some(path) = c.endpoint.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
    } else {
        let mut ep = Endpoint::from_shared(c.endpoint.clone()).map_err(|e| format!("--endpoint {:?}: {e}", c.endpoint))?;
        if c.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &c.ca {
                let pem = std::fs::read(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
        }
        ep.connect().await
    }
    .map_err(|e| crate::multipass::reach::describe_connect_failure(crate::multipass::reach::Server::MpoolServe, &c.endpoint, &e))?;
    let token = match &c.token {
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| "--token contains characters not allowed in a header".to_string())?),
        None => None,
    };
    Ok(PoolClient::with_interceptor(channel, TokenInterceptor(token)).max_decoding_message_size(64 << 20))
}

/// Client subcommands.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Run a command in a clean VM: acquire, copy files in, run, copy files out, release.
    Run(RunArgs),
    /// Acquire a lease; prints its id (or the lease as JSON with --json).
    Acquire(AcquireArgs),
    /// Run a command on a lease; exits with the remote exit code.
    Exec(ExecArgs),
    /// Extend a lease.
    Renew {
        /// Lease id.
        lease: String,
        /// New time to live, e.g. 30m.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// End a lease (its VM is reset in the background).
    Release {
        /// Lease id.
        lease: String,
    },
    /// Pools and their VM states.
    Status {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// VMs.
    Vms {
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Leases.
    Leases {
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
    },
}

/// `mpool run` flags.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Pool.
    #[arg(long)]
    pool: String,
    /// Environment variable (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the VM.
    #[arg(long)]
    workdir: Option<String>,
    /// Copy a local file into the VM first (repeatable).
    #[arg(long = "put", value_name = "LOCAL:REMOTE")]
    put: Vec<String>,
    /// Copy a file out of the VM afterwards (repeatable).
    #[arg(long = "get", value_name = "REMOTE:LOCAL")]
    get: Vec<String>,
    /// Kill the command after this long, e.g. 10m.
    #[arg(long)]
    timeout: Option<String>,
    /// Wait at most this long for a VM.
    #[arg(long)]
    wait: Option<String>,
    /// Idempotency key.
    #[arg(long)]
    request_id: Option<String>,
    /// The command.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// `mpool acquire` flags.
#[derive(Args, Debug)]
pub struct AcquireArgs {
    /// Pool.
    #[arg(long)]
    pool: String,
    /// Lease time to live, e.g. 30m.
    #[arg(long)]
    ttl: Option<String>,
    /// Wait at most this long for a VM.
    #[arg(long)]
    wait: Option<String>,
    /// Holder shown in listings.
    #[arg(long, default_value = "cli")]
    holder: String,
    /// Idempotency key.
    #[arg(long)]
    request_id: Option<String>,
    /// Print the lease as JSON.
    #[arg(long)]
    json: bool,
}

/// `mpool exec` flags.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Lease id.
    lease: String,
    /// Environment variable (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the VM.
    #[arg(long)]
    workdir: Option<String>,
    /// Kill the command after this long.
    #[arg(long)]
    timeout: Option<String>,
    /// The command.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

fn dur(flag: &str, s: &Option<String>) -> Result<Option<prost_types::Duration>, String> {
    s.as_deref()
        .map(|s| crate::config::parse_duration(s).map(crate::api::convert::proto_duration).map_err(|e| format!("{flag} {s:?}: {e}")))
        .transpose()
}

fn env(pairs: &[String]) -> Result<std::collections::HashMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| p.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("--env {p:?}: expected K=V")))
        .collect()
}

/// The command of `run` and `exec`.
fn command(argv: Vec<String>, pairs: &[String], workdir: Option<String>, timeout: &Option<String>) -> Result<Option<v1::Command>, String> {
    Ok(Some(v1::Command {
        argv,
        env: env(pairs)?,
        workdir: workdir.unwrap_or_default(),
        timeout: dur("--timeout", timeout)?,
        ..Default::default()
    }))
}

fn status_err(s: tonic::Status) -> String {
    format!("{}: {}", code_name(s.code()), s.message())
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}

/// Runs a client command.
pub async fn run(c: Connect, cmd: ClientCommand) -> ExitCode {
    match run_inner(c, cmd).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mpool: {e}");
            ExitCode::from(2)
        }
    }
}

/// Shows "waiting for a VM" on a terminal until dropped.
struct Waiting(Option<tokio::task::JoinHandle<()>>);

impl Waiting {
    fn start(pool: &str) -> Waiting {
        if !std::io::stderr().is_terminal() {
            return Waiting(None);
        }
        let pool = pool.to_string();
        Waiting(Some(tokio::spawn(async move {
            let t = Instant::now();
            let frames = ['|', '/', '-', '\\'];
            for i in 0.. {
                eprint!("\r{} waiting for a VM from pool {pool}... {:.0}s ", frames[i % 4], t.elapsed().as_secs_f64());
                let _ = std::io::stderr().flush();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
            eprint!("\r\x1b[K");
        }
    }
}

fn write_out(stdout: bool, text: &str) {
    if stdout {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(text.as_bytes());
        let _ = o.flush();
    } else {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(text.as_bytes());
        let _ = e.flush();
    }
}

fn exit_code(x: &v1::ExitStatus) -> ExitCode {
    if x.code >= 0 {
        ExitCode::from(u8::try_from(x.code).unwrap_or(255))
    } else {
        ExitCode::from(128u8.saturating_add(super::multipass::signal_number(&x.signal)))
    }
}

async fn run_inner(c: Connect, cmd: ClientCommand) -> Result<ExitCode, String> {
    let mut client = connect(&c).await?;
    match cmd {
        ClientCommand::Run(a) => {
            let mut inputs = Vec::new();
            for p in &a.put {
                let (local, remote) = p.split_once(':').ok_or_else(|| format!("--put {p:?}: expected LOCAL:REMOTE"))?;
                let data = std::fs::read(local).map_err(|e| format!("--put {local}: {e}"))?;
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(local).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
                inputs.push(v1::InputFile { path: remote.into(), data, text: String::new(), mode });
            }
            let mut gets = Vec::new();
            for g in &a.get {
                let (remote, local) = g.split_once(':').ok_or_else(|| format!("--get {g:?}: expected REMOTE:LOCAL"))?;
                gets.push((remote.to_string(), PathBuf::from(local)));
            }
            let req = v1::RunRequest {
                pool: a.pool.clone(),
                holder: "mpool run".into(),
                request_id: a.request_id.unwrap_or_default(),
                command: command(a.argv, &a.env, a.workdir, &a.timeout)?,
                inputs,
                outputs: gets.iter().map(|(r, _)| r.clone()).collect(),
                wait: dur("--wait", &a.wait)?,
                ttl: None,
            };
            let waiting = Waiting::start(&a.pool);
            let mut stream = client.run(req).await.map_err(status_err)?.into_inner();
            let mut waiting = Some(waiting);
            while let Some(ev) = stream.message().await.map_err(status_err)? {
                use v1::run_event::Event;
                match ev.event {
                    Some(Event::Lease(_)) => drop(waiting.take()),
                    Some(Event::Stdout(t)) => write_out(true, &t),
                    Some(Event::Stderr(t)) => write_out(false, &t),
                    Some(Event::Result(r)) => {
                        for f in &r.outputs {
                            let Some((_, local)) = gets.iter().find(|(rp, _)| *rp == f.path) else { continue };
                            if f.missing {
                                eprintln!("mpool: --get {}: no such file in the VM", f.path);
                                continue;
                            }
                            std::fs::write(local, &f.data).map_err(|e| format!("--get {}: {e}", local.display()))?;
                            if f.mode != 0 {
                                use std::os::unix::fs::PermissionsExt;
                                std::fs::set_permissions(local, std::fs::Permissions::from_mode(f.mode & 0o7777))
                                    .map_err(|e| format!("--get {}: {e}", local.display()))?;
                            }
                        }
                        return Ok(r.exit.as_ref().map(exit_code).unwrap_or(ExitCode::from(255)));
                    }
                    None => {}
                }
            }
            Err("the run ended without a result".into())
        }
        ClientCommand::Acquire(a) => {
            let waiting = Waiting::start(&a.pool);
            let lease = client
                .acquire(v1::AcquireRequest {
                    pool: a.pool.clone(),
                    holder: a.holder,
                    request_id: a.request_id.unwrap_or_default(),
                    ttl: dur("--ttl", &a.ttl)?,
                    wait: dur("--wait", &a.wait)?,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            drop(waiting);
            if a.json {
                println!("{}", lease_json(&lease));
            } else {
                println!("{}", lease.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Exec(a) => {
            let req = v1::ExecRequest {
                lease_id: a.lease,
                command: command(a.argv, &a.env, a.workdir, &a.timeout)?,
                exec_id: String::new(),
            };
            let mut stream = client.exec(req).await.map_err(status_err)?.into_inner();
            while let Some(ev) = stream.message().await.map_err(status_err)? {
                use v1::exec_event::Event;
                match ev.event {
                    Some(Event::Stdout(t)) => write_out(true, &t),
                    Some(Event::Stderr(t)) => write_out(false, &t),
                    Some(Event::Exit(x)) => return Ok(exit_code(&x)),
                    _ => {}
                }
            }
            Err("the command ended without an exit status".into())
        }
        ClientCommand::Renew { lease, ttl } => {
            let l = client.renew(v1::RenewRequest { lease_id: lease, ttl: dur("--ttl", &ttl)? }).await.map_err(status_err)?;
            println!("{}", lease_json(l.get_ref()));
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Release { lease } => {
            client.release(v1::ReleaseRequest { lease_id: lease }).await.map_err(status_err)?;
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Status { json } => {
            let pools = client.list_pools(v1::ListPoolsRequest {}).await.map_err(status_err)?.into_inner().pools;
            if json {
                let v: Vec<_> = pools
                    .iter()
                    .map(|p| serde_json::json!({"name": p.name, "vms": p.vms, "waiters": p.waiters, "leases": p.leases, "daemon_ok": p.daemon_ok}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}",
                "POOL", "HOT", "WARM", "LEASED", "RESETTING", "PROVISIONING", "OTHER", "WAITERS", "MAX"
            );
            for p in pools {
                let get = |k: &str| p.vms.get(k).copied().unwrap_or(0);
                let known = ["hot", "warm", "leased", "resetting", "provisioning"];
                let other: u32 = p.vms.iter().filter(|(k, _)| !known.contains(&k.as_str())).map(|(_, v)| v).sum();
                let max = p.config.as_ref().map(|c| c.max_size).unwrap_or(0);
                println!(
                    "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}",
                    p.name, get("hot"), get("warm"), get("leased"), get("resetting"), get("provisioning"), other, p.waiters, max
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Vms { pool, json } => {
            let vms = client.list_vms(v1::ListVmsRequest { pool: pool.unwrap_or_default() }).await.map_err(status_err)?.into_inner().vms;
            if json {
                let v: Vec<_> = vms
                    .iter()
                    .map(|m| serde_json::json!({"name": m.name, "pool": m.pool, "state": m.state, "generation": m.generation, "uses": m.uses, "lease": m.lease_id}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<28} {:<12} {:<12} {:>4} {:>5} LEASE", "VM", "POOL", "STATE", "GEN", "USES");
            for m in vms {
                println!("{:<28} {:<12} {:<12} {:>4} {:>5} {}", m.name, m.pool, m.state, m.generation, m.uses, m.lease_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Leases { pool } => {
            let leases =
                client.list_leases(v1::ListLeasesRequest { pool: pool.unwrap_or_default() }).await.map_err(status_err)?.into_inner().leases;
            for l in leases {
                println!("{}", lease_json(&l));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map(|t| t.to_string()).unwrap_or_default()
}

fn lease_json(l: &v1::Lease) -> String {
    serde_json::json!({
        "id": l.id,
        "pool": l.pool,
        "vm": l.vm,
        "holder": l.holder,
        "requestId": l.request_id,
        "grantedAt": ts(&l.granted_at),
        "expiresAt": ts(&l.expires_at),
        "served": v1::Served::try_from(l.served).map(|s| s.as_str_name()).unwrap_or("SERVED_UNSPECIFIED"),
    })
    .to_string()
}
