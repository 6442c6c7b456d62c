//! The `mpool.v1.Pool` service: validates input at the edge, asks the engine for leases, runs
//! commands and transfers over the lease's pooled SSH connection, and maps every failure to one
//! precise status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Principal;
use super::convert::{self, Utf8Chunks, engine_status, ssh_status};
use mpool_config::ResetStrategy;
use mpool_engine::{AcquireRequest, Engine, LeaseInfo};
use mpool_metrics::Metrics;

use crate::proto::v1;
use crate::proto::v1::pool_server::Pool;
use mpool_ssh::{ConnectionCache, ExecCanceller, ExecEvent, ExecRequest, ScriptShell, SshTarget, TransferOptions};

/// Size limits enforced at the edge.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest Upload (and all Run inputs together), bytes: `[api] max_upload`.
    pub max_upload: u64,
    /// Largest Download (and Run output), bytes: `[api] max_download`.
    pub max_download: u64,
    /// Largest argv (all elements together), bytes.
    pub max_argv: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_upload: mpool_config::DEFAULT_MAX_UPLOAD,
            max_download: mpool_config::DEFAULT_MAX_UPLOAD,
            max_argv: 1 << 20,
        }
    }
}

/// The service state; cheap to clone.
#[derive(Clone)]
pub struct PoolService {
    engine: Engine,
    ssh: Arc<ConnectionCache>,
    execs: Execs,
    limits: Limits,
    metrics: Metrics,
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// Running execs by (lease id, exec id): the canceller once the command started (`None` while
/// it is starting: the id is reserved).
type Execs = Arc<Mutex<HashMap<(String, String), Option<ExecCanceller>>>>;

fn principal<T>(req: &Request<T>) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}

fn owner(p: &Option<Principal>) -> Option<String> {
    p.as_ref().and_then(Principal::owner)
}

fn check_pool(p: &Option<Principal>, pool: &str) -> Result<(), Status> {
    match p {
        Some(p) if !p.may_use(pool) => Err(Status::permission_denied(format!(
            "token {:?} may not use pool {pool:?}; use a token whose `pools` in the server's tokens file include it",
            p.name
        ))),
        _ => Ok(()),
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        let hint = match field {
            "pool" => "name a pool (ListPools or `mpool status` lists them)",
            "lease_id" => "pass the lease id that Acquire returned",
            "exec_id" => "pass the exec id from the Exec stream's `started` event",
            "path" | "inputs[].path" => "give a path in the VM (absolute, or relative to the home directory)",
            _ => "set it",
        };
        return Err(Status::invalid_argument(format!("{field} is required: {hint}")));
    }
    let max = if field.ends_with("path") { MAX_PATH } else { MAX_ID };
    capped(field, value, max)
}

/// Longest identifier a caller may send: pool, lease id, exec id, request id.
pub const MAX_ID: usize = 256;
/// Longest exec id (it names a running command in CancelExec).
pub const MAX_EXEC_ID: usize = 128;
/// Longest `holder` (free text shown in listings).
pub const MAX_HOLDER: usize = 256;
/// Longest path in the VM (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most bytes of environment (names and values together) per command.
pub const MAX_ENV: usize = 256 * 1024;
/// Most input or output files per Run.
pub const MAX_FILES: usize = 1000;

/// Refuses a free-text field longer than `max` bytes, naming the field and the limit.
fn capped(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        let also = if field == "exec_id" { " (or omit it to get a generated one)" } else { "" };
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {max} bytes: send a shorter {field}{also}",
            value.len()
        )));
    }
    Ok(())
}

/// Ends a lease use when dropped (the stream ended, or its client went away).
struct InUse {
    engine: Engine,
    lease: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let (engine, lease) = (self.engine.clone(), std::mem::take(&mut self.lease));
        tokio::spawn(async move { engine.end_use(&lease).await });
    }
}

/// Removes a running exec from the cancel registry when dropped.
struct Registered {
    execs: Execs,
    key: (String, String),
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut m) = self.execs.lock() {
            m.remove(&self.key);
        }
    }
}

/// Turns the API's command into an SSH exec request, validating everything.
fn command(cmd: Option<v1::Command>, limits: &Limits) -> Result<ExecRequest, Status> {
    let cmd = cmd.ok_or_else(|| {
        Status::invalid_argument("command is required: give argv (e.g. [\"uname\", \"-a\"]) or a script")
    })?;
    let mut req = match (cmd.argv.is_empty(), cmd.script.is_empty()) {
        (true, true) => {
            return Err(Status::invalid_argument("empty command: give argv (e.g. [\"uname\", \"-a\"]) or a script"));
        }
        (false, false) => {
            return Err(Status::invalid_argument("give either argv or script, not both"));
        }
        (false, true) => {
            let size: usize = cmd.argv.iter().map(String::len).sum();
            if size > limits.max_argv {
                return Err(Status::invalid_argument(format!(
                    "argv is {size} bytes; the limit is {} (send large inputs with Upload)",
                    limits.max_argv
                )));
            }
            if cmd.argv.iter().any(|a| a.contains('\0')) {
                return Err(Status::invalid_argument(
                    "argv elements cannot contain NUL bytes; pass binary data as stdin or with Upload",
                ));
            }
            let mut r = ExecRequest::argv(cmd.argv);
            if !cmd.stdin.is_empty() {
                r = r.stdin(cmd.stdin);
            }
            r
        }
        (true, false) => {
            if !cmd.stdin.is_empty() {
                return Err(Status::invalid_argument("a script is sent on stdin: it cannot have stdin of its own"));
            }
            let shell = match v1::ScriptShell::try_from(cmd.shell).unwrap_or(v1::ScriptShell::Unspecified) {
                v1::ScriptShell::Sh => ScriptShell::Sh,
                _ => ScriptShell::Bash,
            };
            ExecRequest::script(shell, cmd.script)
        }
    };
    let env_size: usize = cmd.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if env_size > MAX_ENV {
        return Err(Status::invalid_argument(format!(
            "command.env is {env_size} bytes (names and values); the limit is {MAX_ENV} bytes: pass large values as files"
        )));
    }
    capped("command.workdir", &cmd.workdir, MAX_PATH)?;
    let mut env: Vec<(String, String)> = cmd.env.into_iter().collect();
    env.sort();
    for (k, v) in env {
        if !mpool_ssh::quote::is_valid_env_name(&k) {
            return Err(Status::invalid_argument(format!(
                "env name {k:?} is invalid: use letters, digits and underscores, not starting with a digit"
            )));
        }
        req = req.env(k, v);
    }
    if !cmd.workdir.is_empty() {
        req = req.cwd(cmd.workdir);
    }
    if let Some(t) = convert::duration("command.timeout", cmd.timeout.as_ref())? {
        if t.is_zero() {
            return Err(Status::invalid_argument("command.timeout must be above zero (omit it for no limit)"));
        }
        req = req.timeout(t);
    }
    Ok(req)
}

fn exit_status(ev: &ExecEvent) -> Option<v1::ExitStatus> {
    match ev {
        ExecEvent::Exit { code, signal, duration, timed_out, cancelled } => Some(v1::ExitStatus {
            code: code.map(|c| c as i32).unwrap_or(-1),
            signal: signal.clone().unwrap_or_default(),
            duration: Some(convert::proto_duration(*duration)),
            timed_out: *timed_out,
            cancelled: *cancelled,
        }),
        _ => None,
    }
}

impl PoolService {
    /// The service.
    pub fn new(engine: Engine, ssh: Arc<ConnectionCache>, limits: Limits, metrics: Metrics) -> PoolService {
        PoolService { engine, ssh, execs: Arc::new(Mutex::new(HashMap::new())), limits, metrics }
    }

    /// The SSH connection cache (shutdown closes it).
    pub fn ssh_cache(&self) -> Arc<ConnectionCache> {
        self.ssh.clone()
    }

    /// A lease in use (it will not expire until the returned guard drops) and its SSH target.
    async fn use_lease(&self, lease_id: &str, p: &Option<Principal>) -> Result<(LeaseInfo, SshTarget, InUse), Status> {
        required("lease_id", lease_id)?;
        let info = self.engine.begin_use(lease_id, owner(p)).await.map_err(engine_status)?;
        let guard = InUse { engine: self.engine.clone(), lease: lease_id.to_string() };
        let Some(ssh) = info.ssh.as_ref() else {
            return Err(Status::unavailable(format!(
                "the SSH endpoint of {} is not known yet (mpool restarted moments ago); retry shortly",
                info.record.vm
            )));
        };
        let target = ssh.clone();
        Ok((info, target, guard))
    }

    /// The lease's SSH endpoint read from the daemon again, when it differs from `old` (the
    /// pooled connection to the old one is dropped); `None` when it did not move or cannot be
    /// read.
    async fn refreshed_target(&self, info: &LeaseInfo, old: &SshTarget) -> Option<SshTarget> {
        let owner = (!info.record.owner.is_empty()).then(|| info.record.owner.clone());
        let fresh = self.engine.refresh(&info.record.id, owner).await.ok()?;
        let target = fresh.ssh?;
        if target.host == old.host && target.port == old.port {
            return None;
        }
        tracing::info!(vm = %info.record.vm, "the VM's SSH endpoint moved to {}:{}", target.host, target.port);
        self.ssh.close(&info.record.vm).await;
        Some(target)
    }

    /// Starts an exec and returns a channel of its events plus its id; the exec is cancelled
    /// when the receiver goes away.
    async fn start_exec(
        &self,
        info: &LeaseInfo,
        target: &SshTarget,
        req: ExecRequest,
        exec_id: String,
        guard: InUse,
    ) -> Result<mpsc::Receiver<ExecEvent>, Status> {
        // Reserve the exec id before the command starts: a second exec with the same id on the
        // same lease is refused, never allowed to overwrite the first one's canceller.
        let key = (info.record.id.clone(), exec_id);
        {
            let mut m = self.execs.lock().map_err(|_| Status::internal("the exec registry is poisoned"))?;
            if m.contains_key(&key) {
                return Err(Status::already_exists(format!(
                    "exec id {:?} is already running on lease {}: choose another exec_id (or omit it to get a generated one)",
                    key.1, key.0
                )));
            }
            m.insert(key.clone(), None);
        }
        let reg = Registered { execs: self.execs.clone(), key: key.clone() };
        let mut handle = match self.ssh.exec(&info.record.vm, target, req.clone()).await {
            Ok(h) => h,
            // The VM's endpoint may have moved (a daemon restart): ask the daemon again, once.
            Err(e) if e.is_unreachable() => {
                let fresh = self.refreshed_target(info, target).await.ok_or_else(|| ssh_status(e))?;
                self.ssh.exec(&info.record.vm, &fresh, req).await.map_err(ssh_status)?
            }
            Err(e) => return Err(ssh_status(e)),
        };
        if let Ok(mut m) = self.execs.lock() {
            m.insert(key, Some(handle.canceller()));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _guards = (guard, reg);
            loop {
                tokio::select! {
                    ev = handle.next_event() => match ev {
                        Some(ev) => {
                            if tx.send(ev).await.is_err() {
                                break;
                            }
                        }
                        None => return,
                    },
                    // The caller went away, noticed even while the command is silent.
                    _ = tx.closed() => break,
                }
            }
            // Stop the remote command, then drain it to its end.
            handle.cancel();
            while handle.next_event().await.is_some() {}
        });
        Ok(rx)
    }

    fn pool_info(&self, p: &mpool_engine::PoolStatus, daemon_ok: bool) -> v1::PoolInfo {
        let config = p.config.as_ref().map(|c| v1::PoolConfig {
            image: c.image.clone(),
            cpus: c.cpus,
            memory: c.memory.clone(),
            disk: c.disk.clone(),
            min_ready: c.min_ready,
            hot: c.hot,
            max_size: c.max_size,
            reset: match c.reset {
                ResetStrategy::Snapshot => v1::ResetStrategy::Snapshot,
                ResetStrategy::Clone => v1::ResetStrategy::Clone,
                ResetStrategy::Recreate => v1::ResetStrategy::Recreate,
            } as i32,
            max_uses: c.max_uses,
            default_ttl: Some(convert::proto_duration(c.default_ttl)),
            max_ttl: Some(convert::proto_duration(c.max_ttl)),
            max_wait: Some(convert::proto_duration(c.max_wait)),
        });
        v1::PoolInfo {
            name: p.name.clone(),
            config,
            vms: p.counts.iter().map(|(k, v)| (k.clone(), *v as u32)).collect(),
            waiters: p.waiters as u32,
            leases: p.leases as u32,
            generation: p.generation,
            daemon_ok,
        }
    }
}

#[tonic::async_trait]
impl Pool for PoolService {
    async fn acquire(&self, request: Request<v1::AcquireRequest>) -> Result<Response<v1::Lease>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("pool", &r.pool)?;
        capped("holder", &r.holder, MAX_HOLDER)?;
        capped("request_id", &r.request_id, MAX_ID)?;
        check_pool(&p, &r.pool)?;
        let req = AcquireRequest {
            pool: r.pool.clone(),
            holder: r.holder,
            request_id: (!r.request_id.is_empty()).then_some(r.request_id),
            ttl: convert::duration("ttl", r.ttl.as_ref())?,
            wait: convert::duration("wait", r.wait.as_ref())?,
            owner: p.as_ref().map(|p| p.name.clone()),
            kind: mpool_core::store::RequestKind::Acquire,
        };
        let started = Instant::now();
        let result = self.engine.acquire(req).await;
        self.metrics.acquired(&r.pool, result.as_ref().ok().map(|i| i.served), started.elapsed());
        let info = result.map_err(engine_status)?;
        Ok(Response::new(convert::lease(&info)))
    }

    async fn renew(&self, request: Request<v1::RenewRequest>) -> Result<Response<v1::Lease>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("lease_id", &r.lease_id)?;
        let ttl = convert::duration("ttl", r.ttl.as_ref())?;
        let info = self.engine.renew(&r.lease_id, ttl, owner(&p)).await.map_err(engine_status)?;
        Ok(Response::new(convert::lease(&info)))
    }

    async fn release(&self, request: Request<v1::ReleaseRequest>) -> Result<Response<v1::ReleaseResponse>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("lease_id", &r.lease_id)?;
        self.engine.release(&r.lease_id, owner(&p)).await.map_err(engine_status)?;
        Ok(Response::new(v1::ReleaseResponse {}))
    }

    type ExecStream = Stream<v1::ExecEvent>;

    async fn exec(&self, request: Request<v1::ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        let req = command(r.command, &self.limits)?;
        let exec_id = if r.exec_id.is_empty() { format!("exec-{:016x}", rand::random::<u64>()) } else { r.exec_id };
        capped("exec_id", &exec_id, MAX_EXEC_ID)?;
        let (info, target, guard) = self.use_lease(&r.lease_id, &p).await?;
        let mut events = self.start_exec(&info, &target, req, exec_id.clone(), guard).await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            use v1::exec_event::Event;
            let send = |e: Event| v1::ExecEvent { event: Some(e) };
            if tx.send(Ok(send(Event::Started(exec_id)))).await.is_err() {
                return;
            }
            let (mut out, mut err) = (Utf8Chunks::default(), Utf8Chunks::default());
            loop {
                // Dropping `events` when the caller goes away cancels the command.
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = tx.closed() => return,
                };
                let Some(ev) = ev else { break };
                let msg = match &ev {
                    ExecEvent::Stdout(b) => Event::Stdout(out.push(b)),
                    ExecEvent::Stderr(b) => Event::Stderr(err.push(b)),
                    ExecEvent::Exit { .. } => {
                        for (text, stdout) in [(out.finish(), true), (err.finish(), false)] {
                            if !text.is_empty() {
                                let e = if stdout { Event::Stdout(text) } else { Event::Stderr(text) };
                                let _ = tx.send(Ok(send(e))).await;
                            }
                        }
                        match exit_status(&ev) {
                            Some(x) => Event::Exit(x),
                            None => continue,
                        }
                    }
                };
                if tx.send(Ok(send(msg))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_exec(
        &self,
        request: Request<v1::CancelExecRequest>,
    ) -> Result<Response<v1::CancelExecResponse>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("lease_id", &r.lease_id)?;
        required("exec_id", &r.exec_id)?;
        // Checks the lease exists and belongs to the caller.
        let info = self.engine.begin_use(&r.lease_id, owner(&p)).await.map_err(engine_status)?;
        self.engine.end_use(&info.record.id).await;
        let canceller =
            self.execs.lock().ok().and_then(|m| m.get(&(r.lease_id.clone(), r.exec_id.clone())).cloned().flatten());
        let cancelled = canceller.map(|c| c.cancel()).is_some();
        Ok(Response::new(v1::CancelExecResponse { cancelled }))
    }

    async fn upload(
        &self,
        request: Request<Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let p = principal(&request);
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload: the first message needs lease_id and path"))?;
        required("lease_id", &first.lease_id)?;
        required("path", &first.path)?;
        capped("base", &first.base, MAX_PATH)?;
        let remote =
            mpool_ssh::resolve_remote_path(&first.path, (!first.base.is_empty()).then_some(first.base.as_str()))
                .map_err(ssh_status)?;
        let (info, target, _guard) = self.use_lease(&first.lease_id, &p).await?;
        let opts = transfer_options(&first.base, true);
        let mut w = self
            .ssh
            .open_write(&info.record.vm, &target, &first.path, file_mode(first.mode), &opts)
            .await
            .map_err(ssh_status)?;
        let (limit, what) = (self.limits.max_upload, first.path.clone());
        let copied = async {
            let mut msg = Some(first);
            while let Some(m) = msg {
                for part in [m.data.as_slice(), m.text.as_bytes()] {
                    if part.is_empty() {
                        continue;
                    }
                    if w.written().saturating_add(part.len() as u64) > limit {
                        return Err(upload_too_large(&what, limit));
                    }
                    w.write(part).await.map_err(ssh_status)?;
                }
                msg = stream.message().await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = copied {
            w.abort().await;
            return Err(e);
        }
        let size = w.finish().await.map_err(ssh_status)?;
        Ok(Response::new(v1::UploadResponse { path: remote, size }))
    }

    type DownloadStream = Stream<v1::DownloadChunk>;

    async fn download(&self, request: Request<v1::DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("path", &r.path)?;
        capped("base", &r.base, MAX_PATH)?;
        mpool_ssh::resolve_remote_path(&r.path, (!r.base.is_empty()).then_some(r.base.as_str())).map_err(ssh_status)?;
        let (info, target, guard) = self.use_lease(&r.lease_id, &p).await?;
        let opts = transfer_options(&r.base, false);
        let mut reader = self.ssh.open_read(&info.record.vm, &target, &r.path, &opts).await.map_err(ssh_status)?;
        let limit = self.limits.max_download;
        if reader.size() > limit {
            return Err(Status::resource_exhausted(format!(
                "{} is {} bytes, above the server's {limit} byte limit for downloads: compress or split it in the VM \
                 first, or ask the operator to raise [api] max_download",
                r.path,
                reader.size()
            )));
        }
        let (size, mode) = (reader.size(), reader.mode());
        // A small channel: the SFTP reads run at the pace the caller takes the chunks.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _guard = guard;
            let mut buf = vec![0u8; CHUNK];
            let mut offset = 0u64;
            loop {
                let n = tokio::select! {
                    n = reader.read(&mut buf) => n,
                    _ = tx.closed() => return,
                };
                let n = match n {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(ssh_status(e))).await;
                        return;
                    }
                };
                if offset.saturating_add(n as u64) > limit {
                    let _ = tx.send(Err(grew_past(reader.path(), limit))).await;
                    return;
                }
                if n == 0 && offset > 0 {
                    return;
                }
                let first = offset == 0;
                let chunk = v1::DownloadChunk {
                    data: buf[..n].to_vec(),
                    offset,
                    size: if first { size } else { 0 },
                    mode: if first { mode } else { 0 },
                };
                offset += n as u64;
                if tx.send(Ok(chunk)).await.is_err() || n == 0 {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type RunStream = Stream<v1::RunEvent>;

    async fn run(&self, request: Request<Streaming<v1::RunRequest>>) -> Result<Response<Self::RunStream>, Status> {
        let p = principal(&request);
        self.run_stream(p, request.into_inner()).await.map(Response::new)
    }

    async fn list_pools(
        &self,
        request: Request<v1::ListPoolsRequest>,
    ) -> Result<Response<v1::ListPoolsResponse>, Status> {
        let p = principal(&request);
        let status = self.engine.status().await.map_err(engine_status)?;
        let pools = status
            .pools
            .iter()
            .filter(|pool| p.as_ref().is_none_or(|p| p.may_use(&pool.name)))
            .map(|pool| self.pool_info(pool, status.daemon_ok))
            .collect();
        Ok(Response::new(v1::ListPoolsResponse { pools }))
    }

    async fn get_pool(&self, request: Request<v1::GetPoolRequest>) -> Result<Response<v1::PoolInfo>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("pool", &r.pool)?;
        check_pool(&p, &r.pool)?;
        let status = self.engine.status().await.map_err(engine_status)?;
        let pool = status
            .pools
            .iter()
            .find(|x| x.name == r.pool)
            .ok_or_else(|| engine_status(mpool_engine::EngineError::UnknownPool(r.pool.clone())))?;
        Ok(Response::new(self.pool_info(pool, status.daemon_ok)))
    }

    async fn list_vms(&self, request: Request<v1::ListVmsRequest>) -> Result<Response<v1::ListVmsResponse>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        capped("pool", &r.pool, MAX_ID)?;
        let status = self.engine.status().await.map_err(engine_status)?;
        // A scoped token sees the lease ids of its own leases only.
        let mine = owner(&p);
        let visible: std::collections::HashSet<&str> = status
            .leases
            .iter()
            .filter(|l| mine.as_ref().is_none_or(|o| &l.owner == o))
            .map(|l| l.id.as_str())
            .collect();
        let vms = status
            .vms
            .into_iter()
            .filter(|v| r.pool.is_empty() || v.pool == r.pool)
            .filter(|v| p.as_ref().is_none_or(|p| p.may_use(&v.pool)))
            .map(|v| v1::Vm {
                name: v.name,
                pool: v.pool,
                state: v.state,
                generation: v.generation,
                uses: v.uses,
                lease_id: v.lease.filter(|id| visible.contains(id.as_str())).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(v1::ListVmsResponse { vms }))
    }

    async fn list_leases(
        &self,
        request: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesResponse>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        capped("pool", &r.pool, MAX_ID)?;
        let status = self.engine.status().await.map_err(engine_status)?;
        let mine = owner(&p);
        let leases = status
            .leases
            .iter()
            .filter(|l| r.pool.is_empty() || l.pool == r.pool)
            .filter(|l| mine.as_ref().is_none_or(|o| &l.owner == o))
            .map(convert::lease_record)
            .collect();
        Ok(Response::new(v1::ListLeasesResponse { leases }))
    }
}

/// Bytes per chunk of a Download or a Run output.
const CHUNK: usize = 256 * 1024;

/// A file mode from the API (0: the default 0644).
fn file_mode(mode: u32) -> u32 {
    if mode == 0 { 0o644 } else { mode & 0o7777 }
}

fn transfer_options(base: &str, create_parents: bool) -> TransferOptions {
    TransferOptions { base: (!base.is_empty()).then(|| base.to_string()), create_parents, preserve_mode: true }
}

fn upload_too_large(path: &str, limit: u64) -> Status {
    Status::resource_exhausted(format!(
        "upload to {path} is larger than the server's {limit} byte limit; send a smaller file (compress or split it), \
         or ask the operator to raise [api] max_upload"
    ))
}

fn grew_past(path: &str, limit: u64) -> Status {
    Status::resource_exhausted(format!(
        "{path} grew past the {limit} byte limit while it was read; read it once it is complete"
    ))
}

/// Whether a Run request message carries any of the run's description (first-message fields).
fn describes_run(m: &v1::RunRequest) -> bool {
    !m.pool.is_empty()
        || !m.holder.is_empty()
        || !m.request_id.is_empty()
        || m.command.is_some()
        || !m.inputs.is_empty()
        || !m.outputs.is_empty()
        || m.wait.is_some()
        || m.ttl.is_some()
        || m.max_output_size != 0
}

/// The input chunks of a Run's request stream, after its first message, with one chunk of
/// look-ahead (a chunk of the next input ends the current one).
struct Chunks<S> {
    stream: S,
    pending: Option<v1::InputChunk>,
}

impl<S: futures::Stream<Item = Result<v1::RunRequest, Status>> + Unpin> Chunks<S> {
    /// The next chunk, or `None` once the caller ended its stream.
    async fn next(&mut self) -> Result<Option<v1::InputChunk>, Status> {
        use futures::StreamExt;
        if let Some(c) = self.pending.take() {
            return Ok(Some(c));
        }
        loop {
            let Some(m) = self.stream.next().await else {
                return Ok(None);
            };
            let m = m?;
            if describes_run(&m) {
                return Err(Status::invalid_argument(
                    "only the first message of a Run describes it (pool, command, inputs, ...); the messages after it \
                     carry input content in `chunk` only",
                ));
            }
            if let Some(c) = m.chunk {
                return Ok(Some(c));
            }
        }
    }
}

/// A Run's acquire, running on its own task. Dropped before [`PendingAcquire::wait`] returned
/// (the caller went away), it releases the lease when one arrives.
struct PendingAcquire {
    handle: Option<tokio::task::JoinHandle<Result<LeaseInfo, mpool_engine::EngineError>>>,
    engine: Engine,
    owner: Option<String>,
}

impl PendingAcquire {
    async fn wait(&mut self) -> Result<LeaseInfo, mpool_engine::EngineError> {
        let Some(handle) = self.handle.as_mut() else {
            return Err(mpool_engine::EngineError::Unavailable("the acquire was already taken".into()));
        };
        let result = handle.await;
        self.handle = None;
        result.unwrap_or_else(|e| Err(mpool_engine::EngineError::Unavailable(format!("the acquire failed: {e}"))))
    }
}

impl Drop for PendingAcquire {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let (engine, owner) = (self.engine.clone(), self.owner.take());
        tokio::spawn(async move {
            if let Ok(Ok(lease)) = handle.await
                && let Err(e) = engine.release(&lease.record.id, owner).await
            {
                tracing::warn!(lease = %lease.record.id, "releasing the lease of a Run whose caller went away: {e}");
            }
        });
    }
}

/// How a Run ended, as the engine records it for retries with the same request id.
fn outcome_of(
    result: &Result<(v1::RunResult, [std::time::Duration; 3]), Status>,
    vm: &str,
) -> mpool_core::store::RunOutcome {
    match result {
        Ok((r, _)) => {
            let exit = r.exit.clone().unwrap_or_default();
            let duration = exit.duration.map(|d| {
                u64::try_from(d.seconds)
                    .unwrap_or(0)
                    .saturating_mul(1000)
                    .saturating_add(u64::try_from(d.nanos / 1_000_000).unwrap_or(0))
            });
            mpool_core::store::RunOutcome {
                code: (exit.code >= 0).then_some(exit.code),
                signal: (!exit.signal.is_empty()).then_some(exit.signal),
                duration_ms: duration.unwrap_or(0),
                timed_out: exit.timed_out,
                cancelled: exit.cancelled,
                error: None,
                vm: r.vm.clone(),
            }
        }
        Err(s) => mpool_core::store::RunOutcome {
            error: Some(format!("{:?}: {}", s.code(), s.message())),
            vm: vm.to_string(),
            ..Default::default()
        },
    }
}

/// The result a retried Run gets: the first run's exit status (its outputs are not kept), or
/// the error that ended it before its command finished.
fn replayed(o: &mpool_core::store::RunOutcome, lease: &str, request_id: &str) -> Result<v1::RunResult, Status> {
    if o.code.is_none() && o.signal.is_none() {
        return Err(Status::failed_precondition(format!(
            "the Run with request id {request_id:?} (lease {lease}) already ended without an exit status ({}); \
             use a new request id to run it again",
            o.error.as_deref().unwrap_or("no result recorded")
        )));
    }
    Ok(v1::RunResult {
        exit: Some(v1::ExitStatus {
            code: o.code.unwrap_or(-1),
            signal: o.signal.clone().unwrap_or_default(),
            duration: Some(convert::proto_duration(std::time::Duration::from_millis(o.duration_ms))),
            timed_out: o.timed_out,
            cancelled: o.cancelled,
        }),
        outputs: vec![],
        vm: o.vm.clone(),
        timings: None,
        served: v1::Served::Repeat as i32,
    })
}

/// A validated Run: what its task needs after the first message.
struct RunPlan {
    exec: ExecRequest,
    inputs: Vec<v1::InputFile>,
    outputs: Vec<String>,
    /// Outputs larger than this are omitted.
    output_limit: u64,
    /// Which limit `output_limit` is, for messages.
    output_limit_name: &'static str,
}

impl PoolService {
    /// Run over any stream of request messages (the gRPC method's, or one the HTTP/JSON facade
    /// builds): validates the first message, acquires, then streams the events of the run.
    pub async fn run_stream<S>(&self, p: Option<Principal>, mut input: S) -> Result<Stream<v1::RunEvent>, Status>
    where
        S: futures::Stream<Item = Result<v1::RunRequest, Status>> + Send + Unpin + 'static,
    {
        use futures::StreamExt;
        let r = input.next().await.ok_or_else(|| {
            Status::invalid_argument("empty Run: the first message needs pool and command (then input chunks, if any)")
        })??;
        required("pool", &r.pool)?;
        capped("holder", &r.holder, MAX_HOLDER)?;
        capped("request_id", &r.request_id, MAX_ID)?;
        check_pool(&p, &r.pool)?;
        if r.chunk.is_some() {
            return Err(Status::invalid_argument(
                "the first message of a Run describes it; send input content as `chunk` messages after it \
                 (or inline in inputs[].data)",
            ));
        }
        let exec = command(r.command, &self.limits)?;
        for (what, n) in [("inputs", r.inputs.len()), ("outputs", r.outputs.len())] {
            if n > MAX_FILES {
                return Err(Status::invalid_argument(format!(
                    "{what} lists {n} files; the limit is {MAX_FILES}: pack them (e.g. with tar) into fewer files"
                )));
            }
        }
        let mut inline: u64 = 0;
        for i in &r.inputs {
            required("inputs[].path", &i.path)?;
            mpool_ssh::resolve_remote_path(&i.path, None).map_err(ssh_status)?;
            inline = inline.saturating_add((i.data.len() + i.text.len()) as u64);
        }
        if inline > self.limits.max_upload {
            return Err(Status::resource_exhausted(format!(
                "inputs are {inline} bytes together, above the server's {} byte limit; send fewer or smaller files, \
                 or ask the operator to raise [api] max_upload",
                self.limits.max_upload
            )));
        }
        for o in &r.outputs {
            required("outputs[]", o)?;
            capped("outputs[]", o, MAX_PATH)?;
            mpool_ssh::resolve_remote_path(o, None).map_err(ssh_status)?;
        }
        let (output_limit, output_limit_name) = match r.max_output_size {
            0 => (self.limits.max_download, "the server's [api] max_download"),
            n if n >= self.limits.max_download => (self.limits.max_download, "the server's [api] max_download"),
            n => (n, "the request's max_output_size"),
        };
        let acquire = AcquireRequest {
            pool: r.pool.clone(),
            holder: if r.holder.is_empty() { "run".into() } else { r.holder },
            request_id: (!r.request_id.is_empty()).then_some(r.request_id),
            ttl: convert::duration("ttl", r.ttl.as_ref())?,
            wait: convert::duration("wait", r.wait.as_ref())?,
            owner: p.as_ref().map(|p| p.name.clone()),
            kind: mpool_core::store::RequestKind::Run,
        };
        let plan = RunPlan { exec, inputs: r.inputs, outputs: r.outputs, output_limit, output_limit_name };
        let started = Instant::now();
        // The Run owns its lease: if its caller goes away while the VM is being acquired, the
        // lease that arrives is released at once instead of idling until its TTL.
        let mut pending = PendingAcquire {
            handle: Some(tokio::spawn({
                let engine = self.engine.clone();
                async move { engine.acquire(acquire).await }
            })),
            engine: self.engine.clone(),
            owner: owner(&p),
        };
        let acquired = pending.wait().await;
        self.metrics.acquired(&r.pool, acquired.as_ref().ok().map(|i| i.served), started.elapsed());
        let lease = match acquired {
            Ok(lease) => lease,
            // A retry of a Run that already ran: its recorded result, never a second run.
            Err(mpool_engine::EngineError::RequestEnded { outcome: Some(o), lease, request_id }) => {
                let result = replayed(&o, &lease, &request_id)?;
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.try_send(Ok(v1::RunEvent { event: Some(v1::run_event::Event::Result(result)) }));
                return Ok(ReceiverStream::new(rx));
            }
            Err(e) => return Err(engine_status(e)),
        };
        let acquire_time = started.elapsed();
        let (tx, rx) = mpsc::channel(16);
        let svc = self.clone();
        tokio::spawn(async move {
            use v1::run_event::Event;
            let lease_id = lease.record.id.clone();
            let owner = owner(&p);
            let _ = tx.send(Ok(v1::RunEvent { event: Some(Event::Lease(convert::lease(&lease))) })).await;
            let chunks = Chunks { stream: input, pending: None };
            let result = svc.run_on_lease(&lease_id, &p, plan, chunks, &tx).await;
            // Recorded with the release, so a retry with the same request id gets it.
            let outcome = outcome_of(&result, &lease.record.vm);
            if let Err(e) = svc.engine.release_with_outcome(&lease_id, owner, outcome).await {
                tracing::warn!(lease = %lease_id, "releasing after Run: {e}");
            }
            let _ = tx
                .send(result.map(|(mut res, t)| {
                    res.served = convert::served(lease.served) as i32;
                    res.timings = Some(v1::Timings {
                        acquire: Some(convert::proto_duration(acquire_time)),
                        upload: Some(convert::proto_duration(t[0])),
                        exec: Some(convert::proto_duration(t[1])),
                        download: Some(convert::proto_duration(t[2])),
                        total: Some(convert::proto_duration(started.elapsed())),
                    });
                    v1::RunEvent { event: Some(Event::Result(res)) }
                }))
                .await;
        });
        Ok(ReceiverStream::new(rx))
    }

    /// The Run on its lease: inputs, command, outputs. Returns the result (without timings and
    /// served) and the upload, exec and download times. An error before the command ran fails
    /// the Run; once it ran, the result always carries its exit status.
    async fn run_on_lease<S>(
        &self,
        lease_id: &str,
        p: &Option<Principal>,
        plan: RunPlan,
        mut chunks: Chunks<S>,
        tx: &mpsc::Sender<Result<v1::RunEvent, Status>>,
    ) -> Result<(v1::RunResult, [std::time::Duration; 3]), Status>
    where
        S: futures::Stream<Item = Result<v1::RunRequest, Status>> + Unpin,
    {
        use v1::run_event::Event;
        let send = |e: Event| Ok(v1::RunEvent { event: Some(e) });
        // This use of the lease covers inputs and outputs; the exec takes its own.
        let (info, target, _guard) = self.use_lease(lease_id, p).await?;
        let vm = info.record.vm.clone();
        let t = Instant::now();
        self.write_inputs(&vm, &target, &plan.inputs, &mut chunks).await?;
        let upload = t.elapsed();

        let t = Instant::now();
        let (info, target, guard) = self.use_lease(lease_id, p).await?;
        let mut events = self.start_exec(&info, &target, plan.exec, format!("run-{lease_id}"), guard).await?;
        let (mut out, mut err) = (Utf8Chunks::default(), Utf8Chunks::default());
        let mut exit = None;
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return Err(Status::cancelled("the caller went away")),
            };
            let Some(ev) = ev else { break };
            let e = match &ev {
                ExecEvent::Stdout(b) => Event::Stdout(out.push(b)),
                ExecEvent::Stderr(b) => Event::Stderr(err.push(b)),
                ExecEvent::Exit { .. } => {
                    exit = exit_status(&ev);
                    continue;
                }
            };
            if tx.send(send(e)).await.is_err() {
                return Err(Status::cancelled("the caller went away"));
            }
        }
        for (text, stdout) in [(out.finish(), true), (err.finish(), false)] {
            if !text.is_empty() {
                let _ = tx.send(send(if stdout { Event::Stdout(text) } else { Event::Stderr(text) })).await;
            }
        }
        let exit = exit.ok_or_else(|| {
            Status::unavailable(format!(
                "the command's stream on {vm} ended without an exit status (the VM's SSH connection was lost)"
            ))
        })?;
        let exec = t.elapsed();

        let t = Instant::now();
        let mut files = Vec::with_capacity(plan.outputs.len());
        for (index, path) in plan.outputs.iter().enumerate() {
            let file = self
                .send_output(&vm, &target, index as u32, path, (plan.output_limit, plan.output_limit_name), tx)
                .await;
            match file {
                Some(f) => files.push(f),
                None => return Err(Status::cancelled("the caller went away")),
            }
        }
        let download = t.elapsed();
        Ok((v1::RunResult { exit: Some(exit), outputs: files, vm, timings: None, served: 0 }, [upload, exec, download]))
    }

    /// Writes a Run's inputs in order: each one's inline content, then its chunks as they arrive
    /// (a chunk of a later input ends it; the end of the caller's stream ends the last one).
    async fn write_inputs<S>(
        &self,
        vm: &str,
        target: &SshTarget,
        inputs: &[v1::InputFile],
        chunks: &mut Chunks<S>,
    ) -> Result<(), Status>
    where
        S: futures::Stream<Item = Result<v1::RunRequest, Status>> + Unpin,
    {
        let limit = self.limits.max_upload;
        let mut total: u64 = 0;
        let opts = transfer_options("", true);
        for (index, input) in inputs.iter().enumerate() {
            let mut w =
                self.ssh.open_write(vm, target, &input.path, file_mode(input.mode), &opts).await.map_err(ssh_status)?;
            let written = async {
                for part in [input.data.as_slice(), input.text.as_bytes()] {
                    if !part.is_empty() {
                        total = total.saturating_add(part.len() as u64);
                        w.write(part).await.map_err(ssh_status)?;
                    }
                }
                while let Some(c) = chunks.next().await? {
                    let i = c.input as usize;
                    if i > index && i < inputs.len() {
                        chunks.pending = Some(c);
                        break;
                    }
                    if i != index {
                        return Err(chunk_out_of_order(i, index, inputs.len()));
                    }
                    total = total.saturating_add(c.data.len() as u64);
                    if total > limit {
                        return Err(Status::resource_exhausted(format!(
                            "inputs are more than the server's {limit} byte limit together (at {}); send fewer or smaller \
                             files, or ask the operator to raise [api] max_upload",
                            input.path
                        )));
                    }
                    w.write(&c.data).await.map_err(ssh_status)?;
                }
                Ok(())
            }
            .await;
            if let Err(e) = written {
                w.abort().await;
                return Err(e);
            }
            w.finish().await.map_err(ssh_status)?;
        }
        match chunks.next().await? {
            None => Ok(()),
            Some(c) => Err(chunk_out_of_order(c.input as usize, inputs.len(), inputs.len())),
        }
    }

    /// Reads one output and streams it as `output` events. `None` when the caller went away.
    async fn send_output(
        &self,
        vm: &str,
        target: &SshTarget,
        index: u32,
        path: &str,
        (limit, limit_name): (u64, &str),
        tx: &mpsc::Sender<Result<v1::RunEvent, Status>>,
    ) -> Option<v1::OutputFile> {
        use v1::run_event::Event;
        let mut file = v1::OutputFile { path: path.to_string(), ..Default::default() };
        let opts = transfer_options("", false);
        let mut reader = match self.ssh.open_read(vm, target, path, &opts).await {
            Ok(r) => r,
            Err(mpool_ssh::SshError::NoSuchFile { .. }) => {
                file.missing = true;
                return Some(file);
            }
            Err(e) => {
                file.error = ssh_status(e).message().to_string();
                return Some(file);
            }
        };
        (file.size, file.mode) = (reader.size(), reader.mode());
        if file.size > limit {
            file.omitted = true;
            file.error = format!(
                "{path} is {} bytes, above the {limit} byte limit ({limit_name}): not sent; compress or split it in the \
                 command, or fetch it with Acquire + Download",
                file.size
            );
            return Some(file);
        }
        let mut buf = vec![0u8; CHUNK];
        let mut offset = 0u64;
        loop {
            let n = tokio::select! {
                n = reader.read(&mut buf) => n,
                _ = tx.closed() => return None,
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    file.error = ssh_status(e).message().to_string();
                    return Some(file);
                }
            };
            if offset.saturating_add(n as u64) > limit {
                file.error = grew_past(path, limit).message().to_string();
                return Some(file);
            }
            if n == 0 && offset > 0 {
                file.size = offset;
                return Some(file);
            }
            let chunk = v1::OutputChunk { output: index, data: buf[..n].to_vec(), offset };
            offset += n as u64;
            if tx.send(Ok(v1::RunEvent { event: Some(Event::Output(chunk)) })).await.is_err() {
                return None;
            }
            if n == 0 {
                file.size = 0;
                return Some(file);
            }
        }
    }
}

fn chunk_out_of_order(got: usize, at: usize, count: usize) -> Status {
    Status::invalid_argument(if got >= count {
        format!(
            "a chunk names input {got}, but the Run lists {count} inputs (indexes 0 to {})",
            count.saturating_sub(1)
        )
    } else {
        format!(
            "a chunk of input {got} arrived after input {at}'s: send all chunks of one input before those of the next, \
             in the order of `inputs`"
        )
    })
}
