//! The client commands of `mpool` (for shell scripts and Kestra shell tasks): talk to a running
//! `mpool serve` over `--endpoint` (`unix:PATH` or `http(s)://HOST:PORT`, env `MPOOL_ENDPOINT`)
//! with an optional `--token` (env `MPOOL_TOKEN`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use super::output;
pub use mpool_api::client::{Client, DEFAULT_ENDPOINT};
use mpool_api::proto::v1;

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

/// Connects to the API.
pub async fn connect(c: &Connect) -> Result<Client, String> {
    mpool_api::client::connect(&mpool_api::client::Connect {
        endpoint: c.endpoint.clone(),
        token: c.token.clone(),
        ca: c.ca.clone(),
    })
    .await
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
        .map(|s| {
            mpool_config::parse_duration(s)
                .map(mpool_api::convert::proto_duration)
                .map_err(|e| format!("{flag} {s:?}: {e}"))
        })
        .transpose()
}

fn env(pairs: &[String]) -> Result<std::collections::HashMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--env {p:?}: expected K=V"))
        })
        .collect()
}

/// The command of `run` and `exec`.
fn command(
    argv: Vec<String>,
    pairs: &[String],
    workdir: Option<String>,
    timeout: &Option<String>,
) -> Result<Option<v1::Command>, String> {
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
            output::err_line(&format!("mpool: {e}"));
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
                output::err_text(&format!(
                    "\r{} waiting for a VM from pool {pool}... {:.0}s ",
                    frames[i % 4],
                    t.elapsed().as_secs_f64()
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
            output::err_text("\r\x1b[K");
        }
    }
}

/// Passes remote output through. A closed pipe ends `mpool` quietly (see [`output`]); the
/// server then sees the call go away and stops the command.
fn write_out(stdout: bool, text: &str) {
    if stdout { output::text(text) } else { output::err_text(text) }
}

fn exit_code(x: &v1::ExitStatus) -> ExitCode {
    if x.code >= 0 {
        ExitCode::from(u8::try_from(x.code).unwrap_or(255))
    } else {
        ExitCode::from(super::signal::exit_code(&x.signal))
    }
}

async fn run_inner(c: Connect, cmd: ClientCommand) -> Result<ExitCode, String> {
    let mut client = connect(&c).await?;
    match cmd {
        ClientCommand::Run(a) => run_command(&mut client, a).await,
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
                output::line(&lease_json(&lease));
            } else {
                output::line(&lease.id);
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
            let l = client
                .renew(v1::RenewRequest { lease_id: lease, ttl: dur("--ttl", &ttl)? })
                .await
                .map_err(status_err)?;
            output::line(&lease_json(l.get_ref()));
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
                output::line(&serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            output::line(&format!(
                "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}",
                "POOL", "HOT", "WARM", "LEASED", "RESETTING", "PROVISIONING", "OTHER", "WAITERS", "MAX"
            ));
            for p in pools {
                let get = |k: &str| p.vms.get(k).copied().unwrap_or(0);
                let known = ["hot", "warm", "leased", "resetting", "provisioning"];
                let other: u32 = p.vms.iter().filter(|(k, _)| !known.contains(&k.as_str())).map(|(_, v)| v).sum();
                let max = p.config.as_ref().map(|c| c.max_size).unwrap_or(0);
                output::line(&format!(
                    "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}",
                    p.name,
                    get("hot"),
                    get("warm"),
                    get("leased"),
                    get("resetting"),
                    get("provisioning"),
                    other,
                    p.waiters,
                    max
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Vms { pool, json } => {
            let vms = client
                .list_vms(v1::ListVmsRequest { pool: pool.unwrap_or_default() })
                .await
                .map_err(status_err)?
                .into_inner()
                .vms;
            if json {
                let v: Vec<_> = vms
                    .iter()
                    .map(|m| serde_json::json!({"name": m.name, "pool": m.pool, "state": m.state, "generation": m.generation, "uses": m.uses, "lease": m.lease_id}))
                    .collect();
                output::line(&serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            output::line(&format!("{:<28} {:<12} {:<12} {:>4} {:>5} LEASE", "VM", "POOL", "STATE", "GEN", "USES"));
            for m in vms {
                output::line(&format!(
                    "{:<28} {:<12} {:<12} {:>4} {:>5} {}",
                    m.name, m.pool, m.state, m.generation, m.uses, m.lease_id
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Leases { pool } => {
            let leases = client
                .list_leases(v1::ListLeasesRequest { pool: pool.unwrap_or_default() })
                .await
                .map_err(status_err)?
                .into_inner()
                .leases;
            for l in leases {
                output::line(&lease_json(&l));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Bytes per input chunk `mpool run` sends (well below the server's 8 MiB message limit).
const PUT_CHUNK: usize = 1 << 20;

/// An output file being received: a temporary file beside its destination, renamed into place
/// when the result says the output arrived whole.
struct Getting {
    local: PathBuf,
    file: Option<tempfile::NamedTempFile>,
}

/// The request stream of `mpool run`: the description, then each `--put` file read in
/// [`PUT_CHUNK`] pieces as the server takes them (memory stays at one chunk for any file size).
/// A file that cannot be read is reported on `failed`, and the stream then never ends: the caller
/// drops the call, so the server cancels the Run instead of running the command with a partial
/// input.
fn run_requests(
    first: v1::RunRequest,
    puts: Vec<PathBuf>,
    failed: tokio::sync::watch::Sender<Option<String>>,
) -> impl futures::Stream<Item = v1::RunRequest> + Send + 'static {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    let state = (0usize, None::<tokio::fs::File>, std::sync::Arc::new(puts), failed);
    let rest = futures::stream::unfold(state, |(mut index, mut file, puts, failed)| async move {
        loop {
            if index >= puts.len() {
                return None;
            }
            let read = async {
                if file.is_none() {
                    file = Some(tokio::fs::File::open(&puts[index]).await?);
                }
                let mut buf = vec![0u8; PUT_CHUNK];
                let n = match file.as_mut() {
                    Some(f) => f.read(&mut buf).await?,
                    None => 0,
                };
                buf.truncate(n);
                Ok::<_, std::io::Error>(buf)
            };
            let buf = match read.await {
                Ok(buf) => buf,
                Err(e) => {
                    failed.send_replace(Some(format!("--put {}: {e}", puts[index].display())));
                    futures::future::pending::<()>().await;
                    return None;
                }
            };
            if buf.is_empty() {
                index += 1;
                file = None;
                continue;
            }
            let chunk =
                v1::RunRequest { chunk: Some(v1::InputChunk { input: index as u32, data: buf }), ..Default::default() };
            return Some((chunk, (index, file, puts, failed)));
        }
    });
    futures::stream::once(async move { first }).chain(rest)
}

/// Resolves with the error of a `--put` file that could not be read; never resolves otherwise
/// (also not once the request stream has ended and dropped its sender).
async fn put_failure(failed: &mut tokio::sync::watch::Receiver<Option<String>>) -> String {
    match failed.wait_for(Option::is_some).await {
        Ok(e) => e.clone().unwrap_or_default(),
        Err(_) => futures::future::pending().await,
    }
}

/// `mpool run`: streams `--put` files in and `--get` files out, passes the output through, and
/// exits with the remote exit code.
async fn run_command(client: &mut Client, a: RunArgs) -> Result<ExitCode, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut inputs = Vec::new();
    let mut puts = Vec::new();
    for p in &a.put {
        let (local, remote) = p.split_once(':').ok_or_else(|| format!("--put {p:?}: expected LOCAL:REMOTE"))?;
        let meta = std::fs::metadata(local).map_err(|e| format!("--put {local}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("--put {local}: not a regular file (pack a directory with tar first)"));
        }
        inputs.push(v1::InputFile {
            path: remote.into(),
            mode: meta.permissions().mode() & 0o7777,
            ..Default::default()
        });
        puts.push(PathBuf::from(local));
    }
    let mut gets = Vec::new();
    for g in &a.get {
        let (remote, local) = g.split_once(':').ok_or_else(|| format!("--get {g:?}: expected REMOTE:LOCAL"))?;
        gets.push((remote.to_string(), Getting { local: PathBuf::from(local), file: None }));
    }
    let first = v1::RunRequest {
        pool: a.pool.clone(),
        holder: "mpool run".into(),
        request_id: a.request_id.unwrap_or_default(),
        command: command(a.argv, &a.env, a.workdir, &a.timeout)?,
        inputs,
        outputs: gets.iter().map(|(r, _)| r.clone()).collect(),
        wait: dur("--wait", &a.wait)?,
        ..Default::default()
    };
    let waiting = Waiting::start(&a.pool);
    let (failed_tx, mut failed) = tokio::sync::watch::channel(None);
    let call = client.run(run_requests(first, puts, failed_tx));
    let mut stream = tokio::select! {
        r = call => r.map_err(status_err)?.into_inner(),
        e = put_failure(&mut failed) => return Err(e),
    };
    let mut waiting = Some(waiting);
    loop {
        let ev = tokio::select! {
            ev = stream.message() => ev.map_err(status_err)?,
            // Dropping the call cancels the Run on the server (no command with a partial input).
            e = put_failure(&mut failed) => return Err(e),
        };
        let Some(ev) = ev else { break };
        use v1::run_event::Event;
        match ev.event {
            Some(Event::Lease(_)) => drop(waiting.take()),
            Some(Event::Stdout(t)) => write_out(true, &t),
            Some(Event::Stderr(t)) => write_out(false, &t),
            Some(Event::Output(c)) => {
                let Some((_, g)) = gets.get_mut(c.output as usize) else {
                    continue;
                };
                if g.file.is_none() {
                    let dir = match g.local.parent() {
                        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                        _ => PathBuf::from("."),
                    };
                    let f = tempfile::Builder::new()
                        .prefix(".mpool-get-")
                        .tempfile_in(&dir)
                        .map_err(|e| format!("--get {}: {e}", g.local.display()))?;
                    g.file = Some(f);
                }
                if let Some(f) = g.file.as_mut() {
                    use std::io::Write;
                    f.write_all(&c.data).map_err(|e| format!("--get {}: {e}", g.local.display()))?;
                }
            }
            Some(Event::Result(r)) => {
                let code = r.exit.as_ref().map(exit_code).unwrap_or(ExitCode::from(255));
                let mut failed = false;
                for (f, (_, g)) in r.outputs.iter().zip(gets.iter_mut()) {
                    if f.missing {
                        output::err_line(&format!("mpool: --get {}: no such file in the VM", f.path));
                    } else if !f.error.is_empty() {
                        output::err_line(&format!("mpool: --get {}: {}", f.path, f.error));
                        failed = true;
                    } else {
                        let file = match g.file.take() {
                            Some(f) => f,
                            None => tempfile::NamedTempFile::new_in(
                                g.local
                                    .parent()
                                    .filter(|p| !p.as_os_str().is_empty())
                                    .unwrap_or(std::path::Path::new(".")),
                            )
                            .map_err(|e| format!("--get {}: {e}", g.local.display()))?,
                        };
                        let file =
                            file.persist(&g.local).map_err(|e| format!("--get {}: {}", g.local.display(), e.error))?;
                        if f.mode != 0 {
                            file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
                                .map_err(|e| format!("--get {}: {e}", g.local.display()))?;
                        }
                    }
                }
                // An output that could not be fetched fails a run that otherwise succeeded.
                let ok = r.exit.as_ref().is_some_and(|x| x.code == 0);
                return Ok(if failed && ok { ExitCode::from(2) } else { code });
            }
            None => {}
        }
    }
    Err("the run ended without a result".into())
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map(|t| t.to_string()).unwrap_or_default()
}

/// A lease as one line of JSON. `served` is there only when the server knows it (Acquire and
/// Renew answers); listings do not record how a lease was served.
fn lease_json(l: &v1::Lease) -> String {
    let mut v = serde_json::json!({
        "id": l.id,
        "pool": l.pool,
        "vm": l.vm,
        "holder": l.holder,
        "requestId": l.request_id,
        "grantedAt": ts(&l.granted_at),
        "expiresAt": ts(&l.expires_at),
    });
    if let Ok(served) = v1::Served::try_from(l.served)
        && served != v1::Served::Unspecified
        && let Some(m) = v.as_object_mut()
    {
        m.insert("served".into(), served.as_str_name().into());
    }
    v.to_string()
}
