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
use crate::config::ResetStrategy;
use crate::metrics::Metrics;
use crate::pool::engine::{AcquireRequest, Engine, LeaseInfo};
use crate::pool::ports::ssh_target;
use crate::proto::v1;
use crate::proto::v1::pool_server::Pool;
use crate::ssh::{
    ConnectionCache, ExecCanceller, ExecEvent, ExecRequest, ScriptShell, SshTarget, TransferOptions,
};

/// Size limits enforced at the edge.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest Upload (and all Run inputs together), bytes: `[api] max_upload`.
    pub max_upload: u64,
    /// Largest Run output file returned inline, bytes.
    pub max_output_file: u64,
    /// Largest argv (all elements together), bytes.
    pub max_argv: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_upload: crate::config::DEFAULT_MAX_UPLOAD,
            max_output_file: 64 << 20,
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
            "path" | "inputs[].path" => {
                "give a path in the VM (absolute, or relative to the home directory)"
            }
            _ => "set it",
        };
        return Err(Status::invalid_argument(format!(
            "{field} is required: {hint}"
        )));
    }
    let max = if field.ends_with("path") {
        MAX_PATH
    } else {
        MAX_ID
    };
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
        let also = if field == "exec_id" {
            " (or omit it to get a generated one)"
        } else {
            ""
        };
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
        Status::invalid_argument(
            "command is required: give argv (e.g. [\"uname\", \"-a\"]) or a script",
        )
    })?;
    let mut req = match (cmd.argv.is_empty(), cmd.script.is_empty()) {
        (true, true) => {
            return Err(Status::invalid_argument(
                "empty command: give argv (e.g. [\"uname\", \"-a\"]) or a script",
            ));
        }
        (false, false) => {
            return Err(Status::invalid_argument(
                "give either argv or script, not both",
            ));
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
                return Err(Status::invalid_argument(
                    "a script is sent on stdin: it cannot have stdin of its own",
                ));
            }
            let shell = match v1::ScriptShell::try_from(cmd.shell)
                .unwrap_or(v1::ScriptShell::Unspecified)
            {
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
        if !crate::ssh::quote::is_valid_env_name(&k) {
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
            return Err(Status::invalid_argument(
                "command.timeout must be above zero (omit it for no limit)",
            ));
        }
        req = req.timeout(t);
    }
    Ok(req)
}

fn exit_status(ev: &ExecEvent) -> Option<v1::ExitStatus> {
    match ev {
        ExecEvent::Exit {
            code,
            signal,
            duration,
            timed_out,
            cancelled,
        } => Some(v1::ExitStatus {
            code: code.map(|c| c as i32).unwrap_or(-1),
            signal: signal.clone().unwrap_or_default(),
            duration: Some(convert::proto_duration(*duration)),
            timed_out: *timed_out,
            cancelled: *cancelled,
        }),
        _ => None,
    }
}

/// A private temporary file for staging transfers.
fn staging() -> Result<tempfile::NamedTempFile, Status> {
    tempfile::Builder::new()
        .prefix("mpool-transfer-")
        .tempfile()
        .map_err(|e| Status::internal(format!("cannot create a staging file: {e}")))
}

impl PoolService {
    /// The service.
    pub fn new(
        engine: Engine,
        ssh: Arc<ConnectionCache>,
        limits: Limits,
        metrics: Metrics,
    ) -> PoolService {
        PoolService {
            engine,
            ssh,
            execs: Arc::new(Mutex::new(HashMap::new())),
            limits,
            metrics,
        }
    }

    /// The SSH connection cache (shutdown closes it).
    pub fn ssh_cache(&self) -> Arc<ConnectionCache> {
        self.ssh.clone()
    }

    /// A lease in use (it will not expire until the returned guard drops) and its SSH target.
    async fn use_lease(
        &self,
        lease_id: &str,
        p: &Option<Principal>,
    ) -> Result<(LeaseInfo, SshTarget, InUse), Status> {
        required("lease_id", lease_id)?;
        let info = self
            .engine
            .begin_use(lease_id, owner(p))
            .await
            .map_err(engine_status)?;
        let guard = InUse {
            engine: self.engine.clone(),
            lease: lease_id.to_string(),
        };
        let Some(ssh) = info.ssh.as_ref() else {
            return Err(Status::unavailable(format!(
                "the SSH endpoint of {} is not known yet (mpool restarted moments ago); retry shortly",
                info.record.vm
            )));
        };
        let target = ssh_target(ssh);
        Ok((info, target, guard))
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
            let mut m = self
                .execs
                .lock()
                .map_err(|_| Status::internal("the exec registry is poisoned"))?;
            if m.contains_key(&key) {
                return Err(Status::already_exists(format!(
                    "exec id {:?} is already running on lease {}: choose another exec_id (or omit it to get a generated one)",
                    key.1, key.0
                )));
            }
            m.insert(key.clone(), None);
        }
        let reg = Registered {
            execs: self.execs.clone(),
            key: key.clone(),
        };
        let mut handle = self
            .ssh
            .exec(&info.record.vm, target, req)
            .await
            .map_err(ssh_status)?;
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

    async fn upload_file(
        &self,
        vm: &str,
        target: &SshTarget,
        path: &str,
        base: &str,
        mode: u32,
        data: &[u8],
    ) -> Result<u64, Status> {
        let file = staging()?;
        tokio::fs::write(file.path(), data)
            .await
            .map_err(|e| Status::internal(format!("staging: {e}")))?;
        self.put_staged(vm, target, file.path(), path, base, mode)
            .await
    }

    async fn put_staged(
        &self,
        vm: &str,
        target: &SshTarget,
        local: &std::path::Path,
        path: &str,
        base: &str,
        mode: u32,
    ) -> Result<u64, Status> {
        use std::os::unix::fs::PermissionsExt;
        let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
        tokio::fs::set_permissions(local, std::fs::Permissions::from_mode(mode))
            .await
            .map_err(|e| Status::internal(format!("staging: {e}")))?;
        let opts = TransferOptions {
            base: (!base.is_empty()).then(|| base.to_string()),
            create_parents: true,
            preserve_mode: true,
        };
        let report = self
            .ssh
            .upload(vm, target, local, path, &opts)
            .await
            .map_err(ssh_status)?;
        Ok(report.bytes)
    }

    async fn fetch(
        &self,
        vm: &str,
        target: &SshTarget,
        path: &str,
        base: &str,
    ) -> Result<tempfile::NamedTempFile, Status> {
        let file = staging()?;
        let opts = TransferOptions {
            base: (!base.is_empty()).then(|| base.to_string()),
            create_parents: false,
            preserve_mode: true,
        };
        // Download writes the destination itself: give it a fresh name in our staging dir.
        let _ = std::fs::remove_file(file.path());
        self.ssh
            .download(vm, target, path, file.path(), &opts)
            .await
            .map_err(ssh_status)?;
        Ok(file)
    }

    fn pool_info(&self, p: &crate::pool::engine::PoolStatus, daemon_ok: bool) -> v1::PoolInfo {
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
            vms: p
                .counts
                .iter()
                .map(|(k, v)| (k.clone(), *v as u32))
                .collect(),
            waiters: p.waiters as u32,
            leases: p.leases as u32,
            generation: p.generation,
            daemon_ok,
        }
    }
}

#[tonic::async_trait]
impl Pool for PoolService {
    async fn acquire(
        &self,
        request: Request<v1::AcquireRequest>,
    ) -> Result<Response<v1::Lease>, Status> {
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
        };
        let started = Instant::now();
        let result = self.engine.acquire(req).await;
        self.metrics.acquired(
            &r.pool,
            result.as_ref().ok().map(|i| i.served),
            started.elapsed(),
        );
        let info = result.map_err(engine_status)?;
        Ok(Response::new(convert::lease(&info)))
    }

    async fn renew(
        &self,
        request: Request<v1::RenewRequest>,
    ) -> Result<Response<v1::Lease>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("lease_id", &r.lease_id)?;
        let ttl = convert::duration("ttl", r.ttl.as_ref())?;
        let info = self
            .engine
            .renew(&r.lease_id, ttl, owner(&p))
            .await
            .map_err(engine_status)?;
        Ok(Response::new(convert::lease(&info)))
    }

    async fn release(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("lease_id", &r.lease_id)?;
        self.engine
            .release(&r.lease_id, owner(&p))
            .await
            .map_err(engine_status)?;
        Ok(Response::new(v1::ReleaseResponse {}))
    }

    type ExecStream = Stream<v1::ExecEvent>;

    async fn exec(
        &self,
        request: Request<v1::ExecRequest>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        let req = command(r.command, &self.limits)?;
        let exec_id = if r.exec_id.is_empty() {
            format!("exec-{:016x}", rand::random::<u64>())
        } else {
            r.exec_id
        };
        capped("exec_id", &exec_id, MAX_EXEC_ID)?;
        let (info, target, guard) = self.use_lease(&r.lease_id, &p).await?;
        let mut events = self
            .start_exec(&info, &target, req, exec_id.clone(), guard)
            .await?;
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
                                let e = if stdout {
                                    Event::Stdout(text)
                                } else {
                                    Event::Stderr(text)
                                };
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
        let info = self
            .engine
            .begin_use(&r.lease_id, owner(&p))
            .await
            .map_err(engine_status)?;
        self.engine.end_use(&info.record.id).await;
        let canceller = self.execs.lock().ok().and_then(|m| {
            m.get(&(r.lease_id.clone(), r.exec_id.clone()))
                .cloned()
                .flatten()
        });
        let cancelled = canceller.map(|c| c.cancel()).is_some();
        Ok(Response::new(v1::CancelExecResponse { cancelled }))
    }

    async fn upload(
        &self,
        request: Request<Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let p = principal(&request);
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty upload: the first message needs lease_id and path")
        })?;
        required("lease_id", &first.lease_id)?;
        required("path", &first.path)?;
        let remote = crate::ssh::resolve_remote_path(
            &first.path,
            (!first.base.is_empty()).then_some(first.base.as_str()),
        )
        .map_err(ssh_status)?;
        let (info, target, _guard) = self.use_lease(&first.lease_id, &p).await?;
        let file = staging()?;
        let mut out = tokio::fs::File::create(file.path())
            .await
            .map_err(|e| Status::internal(format!("staging: {e}")))?;
        let mut size: u64 = 0;
        let mut msg = Some(first.clone());
        use tokio::io::AsyncWriteExt;
        while let Some(m) = msg {
            for part in [m.data.as_slice(), m.text.as_bytes()] {
                size += part.len() as u64;
                if size > self.limits.max_upload {
                    return Err(Status::resource_exhausted(format!(
                        "upload to {} is larger than the server's {} byte limit; send a smaller file (compress or split it), \
                         or ask the operator to raise [api] max_upload",
                        first.path, self.limits.max_upload
                    )));
                }
                out.write_all(part)
                    .await
                    .map_err(|e| Status::internal(format!("staging: {e}")))?;
            }
            msg = stream.message().await?;
        }
        out.flush()
            .await
            .map_err(|e| Status::internal(format!("staging: {e}")))?;
        drop(out);
        let written = self
            .put_staged(
                &info.record.vm,
                &target,
                file.path(),
                &first.path,
                &first.base,
                first.mode,
            )
            .await?;
        Ok(Response::new(v1::UploadResponse {
            path: remote,
            size: written,
        }))
    }

    type DownloadStream = Stream<v1::DownloadChunk>;

    async fn download(
        &self,
        request: Request<v1::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        use std::os::unix::fs::PermissionsExt;
        let p = principal(&request);
        let r = request.into_inner();
        required("path", &r.path)?;
        crate::ssh::resolve_remote_path(&r.path, (!r.base.is_empty()).then_some(r.base.as_str()))
            .map_err(ssh_status)?;
        let (info, target, guard) = self.use_lease(&r.lease_id, &p).await?;
        let file = self
            .fetch(&info.record.vm, &target, &r.path, &r.base)
            .await?;
        drop(guard);
        let meta = std::fs::metadata(file.path())
            .map_err(|e| Status::internal(format!("staging: {e}")))?;
        if meta.is_dir() {
            return Err(Status::invalid_argument(format!(
                "{} is a directory; download files one by one",
                r.path
            )));
        }
        let (size, mode) = (meta.len(), meta.permissions().mode() & 0o7777);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut f = match tokio::fs::File::open(file.path()).await {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("staging: {e}"))))
                        .await;
                    return;
                }
            };
            let mut offset = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("staging: {e}"))))
                            .await;
                        return;
                    }
                };
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

    async fn run(
        &self,
        request: Request<v1::RunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("pool", &r.pool)?;
        capped("holder", &r.holder, MAX_HOLDER)?;
        capped("request_id", &r.request_id, MAX_ID)?;
        check_pool(&p, &r.pool)?;
        let exec_req = command(r.command, &self.limits)?;
        let input_size: u64 = r
            .inputs
            .iter()
            .map(|i| (i.data.len() + i.text.len()) as u64)
            .sum();
        if input_size > self.limits.max_upload {
            return Err(Status::resource_exhausted(format!(
                "inputs are {input_size} bytes together, above the server's {} byte limit; send fewer or smaller files, \
                 or ask the operator to raise [api] max_upload",
                self.limits.max_upload
            )));
        }
        for i in &r.inputs {
            required("inputs[].path", &i.path)?;
            crate::ssh::resolve_remote_path(&i.path, None).map_err(ssh_status)?;
        }
        for o in &r.outputs {
            crate::ssh::resolve_remote_path(o, None).map_err(ssh_status)?;
        }
        let acquire = AcquireRequest {
            pool: r.pool.clone(),
            holder: if r.holder.is_empty() {
                "run".into()
            } else {
                r.holder
            },
            request_id: (!r.request_id.is_empty()).then_some(r.request_id),
            ttl: convert::duration("ttl", r.ttl.as_ref())?,
            wait: convert::duration("wait", r.wait.as_ref())?,
            owner: p.as_ref().map(|p| p.name.clone()),
        };
        let started = Instant::now();
        let acquired = self.engine.acquire(acquire).await;
        self.metrics.acquired(
            &r.pool,
            acquired.as_ref().ok().map(|i| i.served),
            started.elapsed(),
        );
        let lease = acquired.map_err(engine_status)?;
        let acquire_time = started.elapsed();
        let (tx, rx) = mpsc::channel(16);
        let svc = self.clone();
        let (inputs, outputs) = (r.inputs, r.outputs);
        tokio::spawn(async move {
            use v1::run_event::Event;
            let send = |e: Event| Ok(v1::RunEvent { event: Some(e) });
            let lease_id = lease.record.id.clone();
            let owner = owner(&p);
            let _ = tx.send(send(Event::Lease(convert::lease(&lease)))).await;
            let result = async {
                let (info, target, guard) = svc.use_lease(&lease_id, &p).await?;
                let vm = info.record.vm.clone();
                let t = Instant::now();
                for i in &inputs {
                    let mut data = i.data.clone();
                    data.extend_from_slice(i.text.as_bytes());
                    svc.upload_file(&vm, &target, &i.path, "", i.mode, &data)
                        .await?;
                }
                let upload = t.elapsed();
                let t = Instant::now();
                let mut events = svc
                    .start_exec(&info, &target, exec_req, format!("run-{lease_id}"), guard)
                    .await?;
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
                        let _ = tx
                            .send(send(if stdout {
                                Event::Stdout(text)
                            } else {
                                Event::Stderr(text)
                            }))
                            .await;
                    }
                }
                let exec = t.elapsed();
                let t = Instant::now();
                let mut files = Vec::new();
                for path in &outputs {
                    files.push(svc.output_file(&vm, &target, path).await?);
                }
                let download = t.elapsed();
                Ok::<_, Status>(v1::RunResult {
                    exit,
                    outputs: files,
                    vm,
                    timings: Some(v1::Timings {
                        acquire: Some(convert::proto_duration(acquire_time)),
                        upload: Some(convert::proto_duration(upload)),
                        exec: Some(convert::proto_duration(exec)),
                        download: Some(convert::proto_duration(download)),
                        total: Some(convert::proto_duration(started.elapsed())),
                    }),
                    served: convert::served(lease.served) as i32,
                })
            }
            .await;
            if let Err(e) = svc.engine.release(&lease_id, owner).await {
                tracing::warn!(lease = %lease_id, "releasing after Run: {e}");
            }
            let _ = tx
                .send(match result {
                    Ok(res) => send(Event::Result(res)),
                    Err(s) => Err(s),
                })
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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

    async fn get_pool(
        &self,
        request: Request<v1::GetPoolRequest>,
    ) -> Result<Response<v1::PoolInfo>, Status> {
        let p = principal(&request);
        let r = request.into_inner();
        required("pool", &r.pool)?;
        check_pool(&p, &r.pool)?;
        let status = self.engine.status().await.map_err(engine_status)?;
        let pool = status
            .pools
            .iter()
            .find(|x| x.name == r.pool)
            .ok_or_else(|| {
                engine_status(crate::pool::engine::EngineError::UnknownPool(
                    r.pool.clone(),
                ))
            })?;
        Ok(Response::new(self.pool_info(pool, status.daemon_ok)))
    }

    async fn list_vms(
        &self,
        request: Request<v1::ListVmsRequest>,
    ) -> Result<Response<v1::ListVmsResponse>, Status> {
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
                lease_id: v
                    .lease
                    .filter(|id| visible.contains(id.as_str()))
                    .unwrap_or_default(),
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

impl PoolService {
    async fn output_file(
        &self,
        vm: &str,
        target: &SshTarget,
        path: &str,
    ) -> Result<v1::OutputFile, Status> {
        use std::os::unix::fs::PermissionsExt;
        match self.fetch(vm, target, path, "").await {
            Ok(file) => {
                let meta = std::fs::metadata(file.path())
                    .map_err(|e| Status::internal(format!("staging: {e}")))?;
                if meta.len() > self.limits.max_output_file {
                    return Err(Status::resource_exhausted(format!(
                        "output {path} is {} bytes, above the {} byte limit of Run; use Acquire + Download",
                        meta.len(),
                        self.limits.max_output_file
                    )));
                }
                let data = tokio::fs::read(file.path())
                    .await
                    .map_err(|e| Status::internal(format!("staging: {e}")))?;
                Ok(v1::OutputFile {
                    path: path.to_string(),
                    data,
                    mode: meta.permissions().mode() & 0o7777,
                    missing: false,
                })
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(v1::OutputFile {
                path: path.to_string(),
                data: vec![],
                mode: 0,
                missing: true,
            }),
            Err(s) => Err(s),
        }
    }
}
