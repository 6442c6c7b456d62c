//! The HTTP/JSON facade (`[api] http_listen`): the same `mpool.v1.Pool` service for callers that
//! speak plain HTTP and JSON, such as Kestra's core `io.kestra.plugin.core.http.Request` task.
//!
//! Every route decodes its body, calls the application's use case ([`crate::app`], as the gRPC
//! service does, so validation, auth scopes, idempotency and metrics are identical) and encodes
//! the answer; streams are collected into one JSON response. Bodies and responses
//! use the proto3 JSON mapping (lowerCamelCase names, durations as `"1.5s"`, timestamps as RFC
//! 3339, 64-bit integers as strings, bytes as base64, enums by name), with default values always
//! written out so a flow can read `exitCode` even when it is 0. Unknown body fields are refused.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /v1/pools/{pool}/run` | `RunRequest` minus `pool` | exit, stdout/stderr (capped), outputs, timings |
//! | `POST /v1/pools/{pool}/leases` | `AcquireRequest` minus `pool` | `Lease` |
//! | `POST /v1/leases/{id}/exec` | `ExecRequest` minus `leaseId` | exit, stdout/stderr (capped) |
//! | `POST /v1/leases/{id}/execs/{execId}/cancel` | none | `CancelExecResponse` |
//! | `POST /v1/leases/{id}/renew` | `RenewRequest` minus `leaseId` | `Lease` |
//! | `DELETE /v1/leases/{id}` | none | `{}` |
//! | `GET /v1/pools`, `GET /v1/pools/{pool}`, `GET /v1/leases`, `GET /v1/vms` | none | listings |
//! | `GET /v1/health`, `GET /v1/history` | none | daemon and store health; the last hour per minute ([`crate::status_json`]) |
//! | `GET /healthz` | none (no token) | `{"status": "SERVING"}` or 503 |
//! | `GET /` and `/assets/...` | none (no token) | the status page ([`crate::status_page`]) |
//!
//! Auth is the gRPC listener's: `Authorization: Bearer <token>` on TCP (401 without), mTLS when
//! `client_ca` is set, nothing on a Unix socket. Failures are HTTP errors with a JSON body
//! `{"code": "NOT_FOUND", "message": "..."}` ([`http_status`], the one mapping of the
//! application's error kinds): INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403,
//! NOT_FOUND 404, FAILED_PRECONDITION 409, RESOURCE_EXHAUSTED 503 and UNAVAILABLE 503 (both with
//! `Retry-After`: worth retrying as they are), anything else 500. A command that exits non-zero
//! is a 200.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::{Auth, Principal};
use crate::app::{App, AppError, ErrorKind};
use crate::proto::v1;

/// Largest request body (base64 inputs of a Run included); larger bodies get 413.
pub const MAX_BODY: usize = 2 * super::server::MAX_MESSAGE;
/// Most output file bytes one Run answer carries (before base64): a larger output is listed with
/// `omitted: true` and no data, never failing the answer (the exit code is always there).
pub const MAX_OUTPUTS: usize = 8 << 20;
/// Stdout and stderr are each cut after this many bytes (the `...Truncated` flags say so).
pub const MAX_STREAM: usize = 1 << 20;
/// `Retry-After` (seconds) on 503 answers.
pub const RETRY_AFTER_SECS: u32 = 5;

/// What the facade needs; cheap to clone.
#[derive(Clone)]
pub struct JsonApi {
    app: App,
    auth: Auth,
}

type Resp = Response<Full<Bytes>>;

fn bad(msg: impl Into<String>) -> AppError {
    AppError::invalid_argument(msg)
}

/// The HTTP status for an application error's kind.
pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::FailedPrecondition | ErrorKind::AlreadyExists | ErrorKind::Aborted => StatusCode::CONFLICT,
        ErrorKind::ResourceExhausted | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Cancelled | ErrorKind::Unknown | ErrorKind::Internal | ErrorKind::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn respond(status: StatusCode, body: &Value) -> Resp {
    let mut text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

/// An application error as the HTTP answer: its status, a `{"code", "message"}` body, and the
/// retry hint as `Retry-After`.
fn error_response(e: &AppError) -> Resp {
    let status = http_status(e.kind());
    let mut r = respond(status, &json!({ "code": e.kind().name(), "message": e.message() }));
    if e.kind().retry_later() {
        r.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from(RETRY_AFTER_SECS));
    }
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer realm=\"mpool\""));
    }
    r
}

// ---- base64 (standard alphabet, padded; decoding also takes the URL-safe alphabet) ----

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes base64 (standard or URL-safe alphabet, padding optional, whitespace ignored).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut padding = false;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                padding = true;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        if padding {
            return None;
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return None;
    }
    Some(out)
}

// ---- proto3 JSON values ----

fn duration_json(d: Option<&prost_types::Duration>) -> Value {
    match d {
        Some(d) => Value::String(d.to_string()),
        None => Value::String("0s".into()),
    }
}

fn timestamp_json(t: Option<&prost_types::Timestamp>) -> Value {
    t.map(|t| Value::String(t.to_string())).unwrap_or(Value::Null)
}

fn served_name(v: i32) -> &'static str {
    v1::Served::try_from(v).unwrap_or(v1::Served::Unspecified).as_str_name()
}

fn lease_json(l: &v1::Lease) -> Value {
    json!({
        "id": l.id,
        "pool": l.pool,
        "vm": l.vm,
        "holder": l.holder,
        "requestId": l.request_id,
        "grantedAt": timestamp_json(l.granted_at.as_ref()),
        "expiresAt": timestamp_json(l.expires_at.as_ref()),
        "served": served_name(l.served),
        "waited": duration_json(l.waited.as_ref()),
    })
}

fn pool_json(p: &v1::PoolInfo) -> Value {
    let config = p.config.as_ref().map(|c| {
        json!({
            "image": c.image,
            "cpus": c.cpus,
            "memory": c.memory,
            "disk": c.disk,
            "minReady": c.min_ready,
            "hot": c.hot,
            "maxSize": c.max_size,
            "reset": v1::ResetStrategy::try_from(c.reset).unwrap_or(v1::ResetStrategy::Unspecified).as_str_name(),
            "maxUses": c.max_uses,
            "defaultTtl": duration_json(c.default_ttl.as_ref()),
            "maxTtl": duration_json(c.max_ttl.as_ref()),
            "maxWait": duration_json(c.max_wait.as_ref()),
        })
    });
    json!({
        "name": p.name,
        "config": config,
        "vms": p.vms,
        "waiters": p.waiters,
        "leases": p.leases,
        "generation": p.generation.to_string(),
        "daemonOk": p.daemon_ok,
    })
}

fn vm_json(v: &v1::Vm) -> Value {
    json!({"name": v.name, "pool": v.pool, "state": v.state, "generation": v.generation.to_string(),
           "uses": v.uses, "leaseId": v.lease_id})
}

/// Collects stdout or stderr up to [`MAX_STREAM`] bytes, cutting on a character boundary.
#[derive(Default)]
struct Capped {
    text: String,
    truncated: bool,
}

impl Capped {
    fn push(&mut self, s: &str) {
        if self.truncated {
            return;
        }
        let room = MAX_STREAM - self.text.len();
        if s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&s[..cut]);
        self.truncated = true;
    }
}

fn exit_json(out: &mut serde_json::Map<String, Value>, exit: Option<&v1::ExitStatus>) {
    let default = v1::ExitStatus { code: -1, ..Default::default() };
    let x = exit.unwrap_or(&default);
    out.insert("exitCode".into(), json!(x.code));
    out.insert("signal".into(), json!(x.signal));
    out.insert("timedOut".into(), json!(x.timed_out));
    out.insert("cancelled".into(), json!(x.cancelled));
    out.insert("duration".into(), duration_json(x.duration.as_ref()));
}

fn streams_json(out: &mut serde_json::Map<String, Value>, stdout: Capped, stderr: Capped) {
    out.insert("stdout".into(), Value::String(stdout.text));
    out.insert("stderr".into(), Value::String(stderr.text));
    out.insert("stdoutTruncated".into(), json!(stdout.truncated));
    out.insert("stderrTruncated".into(), json!(stderr.truncated));
}

// ---- request bodies (proto3 JSON: lowerCamelCase, the proto field names accepted too) ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CommandJson {
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default)]
    script: String,
    #[serde(default)]
    shell: Option<Value>,
    #[serde(default)]
    env: HashMap<String, String>,
    #[serde(default)]
    workdir: String,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputJson {
    path: String,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    text: String,
    #[serde(default)]
    mode: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RunJson {
    #[serde(default)]
    holder: String,
    #[serde(default, alias = "request_id")]
    request_id: String,
    command: Option<CommandJson>,
    #[serde(default)]
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default)]
    wait: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AcquireJson {
    #[serde(default)]
    holder: String,
    #[serde(default, alias = "request_id")]
    request_id: String,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    wait: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExecJson {
    command: Option<CommandJson>,
    #[serde(default, alias = "exec_id")]
    exec_id: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RenewJson {
    #[serde(default)]
    ttl: Option<String>,
}

fn parse_duration(field: &str, text: Option<&str>) -> Result<Option<prost_types::Duration>, AppError> {
    let Some(text) = text else { return Ok(None) };
    text.trim().parse::<prost_types::Duration>().map(Some).map_err(|_| {
        bad(format!("{field}: {text:?} is not a duration: write seconds with an \"s\", e.g. \"30s\" or \"1.5s\""))
    })
}

fn shell(v: Option<&Value>) -> Result<i32, AppError> {
    let names = "SCRIPT_SHELL_BASH or SCRIPT_SHELL_SH";
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| v1::ScriptShell::try_from(*n).is_ok())
            .ok_or_else(|| bad(format!("command.shell: {n} is not a shell; use {names}"))),
        Some(Value::String(s)) => v1::ScriptShell::from_str_name(s)
            .or_else(|| v1::ScriptShell::from_str_name(&format!("SCRIPT_SHELL_{}", s.to_ascii_uppercase())))
            .map(|s| s as i32)
            .ok_or_else(|| bad(format!("command.shell: {s:?} is not a shell; use {names}"))),
        Some(other) => Err(bad(format!("command.shell: {other} is not a shell; use {names}"))),
    }
}

fn command(c: Option<CommandJson>) -> Result<Option<v1::Command>, AppError> {
    let Some(c) = c else { return Ok(None) };
    let stdin = match &c.stdin {
        Some(s) => base64_decode(s).ok_or_else(|| bad("command.stdin: not base64"))?,
        None => Vec::new(),
    };
    Ok(Some(v1::Command {
        argv: c.argv,
        script: c.script,
        shell: shell(c.shell.as_ref())?,
        env: c.env,
        workdir: c.workdir,
        stdin,
        timeout: parse_duration("command.timeout", c.timeout.as_deref())?,
    }))
}

fn body_json<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("request body: {e}")))
}

impl JsonApi {
    /// The facade over the application, authenticating callers with `auth`.
    pub fn new(app: App, auth: Auth) -> JsonApi {
        JsonApi { app, auth }
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Resp {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if parts.method == Method::GET && segments == ["healthz"] {
            return self.health();
        }
        if parts.method == Method::GET
            && let Some(page) = crate::status_page::asset(&path)
        {
            return page.response();
        }
        let principal = match self.authenticate(&parts.headers) {
            Ok(p) => p,
            Err(e) => return error_response(&e),
        };
        let body = match read_body(body).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        match self.route(&parts.method, &segments, principal.as_ref(), &body).await {
            Ok(v) => respond(StatusCode::OK, &v),
            Err(e) => error_response(&e),
        }
    }

    /// `GET /healthz`: whether the daemon answers and the store takes writes (no token needed).
    fn health(&self) -> Resp {
        let ok = *self.app.engine().healthy().borrow();
        let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        respond(status, &json!({ "status": if ok { "SERVING" } else { "NOT_SERVING" } }))
    }

    /// The caller, as the gRPC listeners' interceptor would see it from the same headers.
    fn authenticate(&self, headers: &hyper::HeaderMap) -> Result<Option<Principal>, AppError> {
        let mut check = tonic::Request::new(());
        *check.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers.clone());
        let checked = self.auth.check(check).map_err(crate::errors::app_error)?;
        Ok(checked.extensions().get::<Principal>().cloned())
    }

    async fn route(
        &self,
        method: &Method,
        seg: &[&str],
        p: Option<&Principal>,
        body: &[u8],
    ) -> Result<Value, AppError> {
        let app = &self.app;
        match (method, seg) {
            (&Method::GET, ["v1", "pools"]) => {
                let r = app.list_pools(p, v1::ListPoolsRequest {}).await?;
                Ok(json!({ "pools": r.pools.iter().map(pool_json).collect::<Vec<_>>() }))
            }
            (&Method::GET, ["v1", "pools", pool]) => {
                Ok(pool_json(&app.get_pool(p, v1::GetPoolRequest { pool: pool.to_string() }).await?))
            }
            (&Method::GET, ["v1", "leases"]) => {
                let r = app.list_leases(p, v1::ListLeasesRequest { pool: String::new() }).await?;
                Ok(json!({ "leases": r.leases.iter().map(lease_json).collect::<Vec<_>>() }))
            }
            (&Method::GET, ["v1", "health"]) => crate::status_json::health(app, p).await,
            (&Method::GET, ["v1", "history"]) => Ok(crate::status_json::history(app, p)),
            (&Method::GET, ["v1", "vms"]) => {
                let r = app.list_vms(p, v1::ListVmsRequest { pool: String::new() }).await?;
                Ok(json!({ "vms": r.vms.iter().map(vm_json).collect::<Vec<_>>() }))
            }
            (&Method::POST, ["v1", "pools", pool, "leases"]) => {
                let req = acquire_request(pool, body_json(body)?)?;
                Ok(lease_json(&app.acquire(p, req).await?))
            }
            (&Method::POST, ["v1", "pools", pool, "run"]) => self.run(pool, p, body_json(body)?).await,
            (&Method::POST, ["v1", "leases", id, "exec"]) => self.exec(id, p, body_json(body)?).await,
            (&Method::POST, ["v1", "leases", id, "execs", exec_id, "cancel"]) => {
                let req = v1::CancelExecRequest { lease_id: id.to_string(), exec_id: exec_id.to_string() };
                Ok(json!({ "cancelled": app.cancel_exec(p, req).await?.cancelled }))
            }
            (&Method::POST, ["v1", "leases", id, "renew"]) => {
                let b: RenewJson = body_json(body)?;
                let req = v1::RenewRequest { lease_id: id.to_string(), ttl: parse_duration("ttl", b.ttl.as_deref())? };
                Ok(lease_json(&app.renew(p, req).await?))
            }
            (&Method::DELETE, ["v1", "leases", id]) | (&Method::POST, ["v1", "leases", id, "release"]) => {
                app.release(p, v1::ReleaseRequest { lease_id: id.to_string() }).await?;
                Ok(json!({}))
            }
            _ => Err(AppError::not_found(format!(
                "no route {method} /{}: see POST /v1/pools/{{pool}}/run, POST /v1/pools/{{pool}}/leases, \
                 POST /v1/leases/{{id}}/exec, POST /v1/leases/{{id}}/renew, DELETE /v1/leases/{{id}}, GET /v1/pools",
                seg.join("/")
            ))),
        }
    }

    async fn run(&self, pool: &str, p: Option<&Principal>, b: RunJson) -> Result<Value, AppError> {
        let req = run_request(pool, b)?;
        let stream = self.app.run(p, futures::stream::iter([Ok(req)])).await?;
        let collected = RunCollected::collect(stream).await?;
        Ok(collected.into_json())
    }

    async fn exec(&self, lease: &str, p: Option<&Principal>, b: ExecJson) -> Result<Value, AppError> {
        let req = v1::ExecRequest { lease_id: lease.to_string(), command: command(b.command)?, exec_id: b.exec_id };
        let mut stream = self.app.exec(p, req).await?;
        let (mut stdout, mut stderr) = (Capped::default(), Capped::default());
        let (mut exec_id, mut exit) = (String::new(), None);
        use tokio_stream::StreamExt;
        while let Some(ev) = stream.next().await {
            match ev?.event {
                Some(v1::exec_event::Event::Started(id)) => exec_id = id,
                Some(v1::exec_event::Event::Stdout(t)) => stdout.push(&t),
                Some(v1::exec_event::Event::Stderr(t)) => stderr.push(&t),
                Some(v1::exec_event::Event::Exit(x)) => exit = Some(x),
                None => {}
            }
        }
        let x = exit.ok_or_else(|| AppError::unavailable("the command's stream ended without an exit status"))?;
        let mut out = serde_json::Map::new();
        out.insert("execId".into(), json!(exec_id));
        exit_json(&mut out, Some(&x));
        streams_json(&mut out, stdout, stderr);
        Ok(Value::Object(out))
    }
}

/// The request body, up to [`MAX_BODY`] bytes; a larger one is answered with 413.
async fn read_body(body: Incoming) -> Result<Bytes, Resp> {
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            let message = format!(
                "the request body is larger than the HTTP facade's limit of {MAX_BODY} bytes: send large input files \
                 with the gRPC API (Run streams inputs in chunks up to the server's max_upload) or `mpool run --put`"
            );
            Err(respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({ "code": ErrorKind::ResourceExhausted.name(), "message": message }),
            ))
        }
        Err(e) => Err(error_response(&bad(format!("reading the request body: {e}")))),
    }
}

fn acquire_request(pool: &str, b: AcquireJson) -> Result<v1::AcquireRequest, AppError> {
    Ok(v1::AcquireRequest {
        pool: pool.to_string(),
        holder: b.holder,
        request_id: b.request_id,
        ttl: parse_duration("ttl", b.ttl.as_deref())?,
        wait: parse_duration("wait", b.wait.as_deref())?,
    })
}

fn run_request(pool: &str, b: RunJson) -> Result<v1::RunRequest, AppError> {
    let mut inputs = Vec::with_capacity(b.inputs.len());
    for (i, f) in b.inputs.into_iter().enumerate() {
        let data = match &f.data {
            Some(d) => base64_decode(d).ok_or_else(|| bad(format!("inputs[{i}].data: not base64")))?,
            None => Vec::new(),
        };
        inputs.push(v1::InputFile { path: f.path, data, text: f.text, mode: f.mode });
    }
    Ok(v1::RunRequest {
        pool: pool.to_string(),
        holder: b.holder,
        request_id: b.request_id,
        command: command(b.command)?,
        inputs,
        outputs: b.outputs,
        wait: parse_duration("wait", b.wait.as_deref())?,
        ttl: parse_duration("ttl", b.ttl.as_deref())?,
        chunk: None,
        max_output_size: MAX_OUTPUTS as u64,
    })
}

/// A Run's events gathered into one answer.
struct RunCollected {
    stdout: Capped,
    stderr: Capped,
    lease: Option<v1::Lease>,
    result: v1::RunResult,
    /// Output content by index; `None` once it no longer fits in the answer.
    data: HashMap<u32, Option<Vec<u8>>>,
}

impl RunCollected {
    async fn collect(mut stream: crate::app::Events<v1::RunEvent>) -> Result<RunCollected, AppError> {
        use tokio_stream::StreamExt;
        let (mut stdout, mut stderr) = (Capped::default(), Capped::default());
        let (mut lease, mut result) = (None, None);
        let mut data: HashMap<u32, Option<Vec<u8>>> = HashMap::new();
        let mut total = 0usize;
        while let Some(ev) = stream.next().await {
            match ev?.event {
                Some(v1::run_event::Event::Lease(l)) => lease = Some(l),
                Some(v1::run_event::Event::Stdout(t)) => stdout.push(&t),
                Some(v1::run_event::Event::Stderr(t)) => stderr.push(&t),
                Some(v1::run_event::Event::Output(c)) => keep_output(&mut data, &mut total, c),
                Some(v1::run_event::Event::Result(r)) => result = Some(r),
                None => {}
            }
        }
        let result = result.ok_or_else(|| AppError::internal("the run ended without a result"))?;
        Ok(RunCollected { stdout, stderr, lease, result, data })
    }

    fn into_json(self) -> Value {
        let RunCollected { stdout, stderr, lease, result: r, mut data } = self;
        let mut out = serde_json::Map::new();
        exit_json(&mut out, r.exit.as_ref());
        streams_json(&mut out, stdout, stderr);
        out.insert("vm".into(), json!(r.vm));
        out.insert("leaseId".into(), json!(lease.map(|l| l.id).unwrap_or_default()));
        out.insert("served".into(), json!(served_name(r.served)));
        let t = r.timings.unwrap_or_default();
        out.insert(
            "timings".into(),
            json!({
                "acquire": duration_json(t.acquire.as_ref()),
                "upload": duration_json(t.upload.as_ref()),
                "exec": duration_json(t.exec.as_ref()),
                "download": duration_json(t.download.as_ref()),
                "total": duration_json(t.total.as_ref()),
            }),
        );
        let files = (0u32..).zip(r.outputs.iter()).map(|(i, f)| output_json(f, data.remove(&i))).collect();
        out.insert("outputs".into(), Value::Array(files));
        Value::Object(out)
    }
}

/// Keeps an output chunk while all outputs fit in [`MAX_OUTPUTS`]; an output that does not fit
/// is dropped whole (its slot becomes `None`).
fn keep_output(data: &mut HashMap<u32, Option<Vec<u8>>>, total: &mut usize, c: v1::OutputChunk) {
    let slot = data.entry(c.output).or_insert_with(|| Some(Vec::new()));
    if total.saturating_add(c.data.len()) > MAX_OUTPUTS {
        if let Some(d) = slot.take() {
            *total = total.saturating_sub(d.len());
        }
    } else if let Some(d) = slot {
        *total = total.saturating_add(c.data.len());
        d.extend_from_slice(&c.data);
    }
}

/// One output of a Run answer; `sent` is its content as collected (`Some(None)`: it did not fit).
fn output_json(f: &v1::OutputFile, sent: Option<Option<Vec<u8>>>) -> Value {
    let (bytes, omitted, error) = match sent {
        Some(None) if f.error.is_empty() => (
            None,
            true,
            format!(
                "{} ({} bytes) does not fit in the answer: outputs are limited to {MAX_OUTPUTS} bytes together \
                 here; use gRPC Run or Download for large files",
                f.path, f.size
            ),
        ),
        Some(d) if f.error.is_empty() => (d, false, String::new()),
        _ => (None, f.omitted, f.error.clone()),
    };
    let ok = !f.missing && error.is_empty();
    json!({
        "path": f.path,
        "data": if ok { base64_encode(bytes.as_deref().unwrap_or_default()) } else { String::new() },
        "mode": f.mode,
        "missing": f.missing,
        "size": f.size.to_string(),
        "omitted": omitted,
        "error": error,
    })
}

/// Serves HTTP/1.1 connections from `accept` until it fails for good; each connection on its
/// own task. A caller that disconnects drops its request, which cancels a running command.
pub async fn serve<S, F, Fut>(api: JsonApi, mut accept: F, tls: Option<tokio_rustls::TlsAcceptor>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let api = Arc::new(api);
    loop {
        let stream = match accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("http_listen accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (api, tls) = (api.clone(), tls.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => {
                        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                    }
                    Err(e) => tracing::debug!("http_listen TLS handshake: {e}"),
                },
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar", &[0, 255, 128, 7]] {
            let text = base64_encode(data);
            assert_eq!(base64_decode(&text).unwrap(), data, "{text}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        assert!(base64_decode("Zm8=x").is_none());
        assert!(base64_decode("!!").is_none());
    }

    #[test]
    fn codes_map_to_http() {
        assert_eq!(http_status(ErrorKind::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(ErrorKind::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(ErrorKind::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(ErrorKind::FailedPrecondition), StatusCode::CONFLICT);
        assert_eq!(http_status(ErrorKind::ResourceExhausted), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(ErrorKind::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(ErrorKind::Internal), StatusCode::INTERNAL_SERVER_ERROR);
        let r = error_response(&AppError::resource_exhausted("pool empty"));
        assert_eq!(r.headers().get("retry-after").unwrap(), "5");
    }

    #[test]
    fn output_is_capped_on_a_character_boundary() {
        let mut c = Capped::default();
        c.push(&"a".repeat(MAX_STREAM - 1));
        c.push("éé");
        assert!(c.truncated);
        assert_eq!(c.text.len(), MAX_STREAM - 1);
        let mut c = Capped::default();
        c.push("hello");
        assert!(!c.truncated);
    }

    #[test]
    fn bodies_follow_proto3_json() {
        let b: RunJson = body_json(
            br#"{"requestId":"r1","command":{"script":"echo hi","shell":"SCRIPT_SHELL_SH","timeout":"1.5s","env":{"A":"1"}},
                 "inputs":[{"path":"a.txt","data":"aGk="},{"path":"b.txt","text":"yo"}],"outputs":["o.txt"],"wait":"10s"}"#,
        )
        .unwrap();
        assert_eq!(b.request_id, "r1");
        let c = command(b.command).unwrap().unwrap();
        assert_eq!(c.shell, v1::ScriptShell::Sh as i32);
        assert_eq!(c.timeout, Some(prost_types::Duration { seconds: 1, nanos: 500_000_000 }));
        let b: AcquireJson = body_json(br#"{"request_id":"x"}"#).unwrap();
        assert_eq!(b.request_id, "x");
        assert!(body_json::<RunJson>(br#"{"comand":{}}"#).is_err());
        assert!(body_json::<RunJson>(b"").is_ok());
        assert!(parse_duration("ttl", Some("5m")).is_err());
    }
}
