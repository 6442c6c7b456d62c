//! The HTTP/JSON facade (`[api] http_listen`): the same `mpool.v1.Pool` service for callers that
//! speak plain HTTP and JSON, such as Kestra's core `io.kestra.plugin.core.http.Request` task.
//!
//! An axum router ([`router`], built from the route table [`ROUTES`]) whose handlers decode the
//! body, call the application's use case ([`crate::app`], as the gRPC service does, so
//! validation, auth scopes, idempotency and metrics are identical) and encode the answer.
//! Bodies and answers are the `mpool.v1` messages in the proto3 JSON mapping, through the serde
//! impls generated from the .proto (pbjson; lowerCamelCase names, the proto names accepted too,
//! durations as `"1.5s"`, timestamps as RFC 3339, 64-bit integers as strings, bytes as base64,
//! enums by name), with default values always written out so a flow can read `exitCode` even
//! when it is 0. Unknown body fields are refused (400, naming the field). A new field in
//! `proto/mpool/v1` reaches HTTP and the OpenAPI document ([`openapi`]) without code.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /v1/pools/{pool}/run` | `RunRequest` minus `pool` and `chunk` | exit, stdout/stderr (capped), outputs, timings (`answer.rs`) |
//! | `POST /v1/pools/{pool}/leases` | `AcquireRequest` minus `pool` | `Lease` |
//! | `POST /v1/pools/{pool}/preheat` | `PreheatRequest` minus `pool` | `PreheatResponse` |
//! | `POST /v1/leases/{id}/exec` | `ExecRequest` minus `leaseId` | exit, stdout/stderr (capped) |
//! | `POST /v1/leases/{id}/execs/{execId}/cancel` | none | `CancelExecResponse` (an exec id or a session id) |
//! | `GET /v1/leases/{id}/sessions` | none | `ListSessionsResponse` |
//! | `POST /v1/leases/{id}/sessions/{session}/attach` | `AttachRequest` minus `leaseId`, `session` | `ExecEvent`s, one JSON object per line, as they happen |
//! | `POST /v1/leases/{id}/renew` | `RenewRequest` minus `leaseId` | `Lease` |
//! | `DELETE /v1/leases/{id}` (or `POST .../release`) | none | `ReleaseResponse` (`{}`) |
//! | `GET /v1/pools`, `GET /v1/pools/{pool}`, `GET /v1/leases`, `GET /v1/vms` | none | the listings |
//! | `POST /v1/reload` | none | `ReloadResponse` (admins only) |
//! | `POST /v1/drain` | `DrainRequest` (`{"drain": true}`; admins) | `DrainResponse` |
//! | `POST /v1/gc` | `GcRequest` (`{"dryRun": true}`), admins only | `GcResponse` |
//! | `GET /healthz` | none (no token) | `{"status": "SERVING"}` or 503 |
//! | `GET /v1/openapi.json` | none (no token) | the OpenAPI 3.1 document of all of this |
//!
//! Auth is the gRPC listeners' layer ([`crate::auth::AuthLayer`]): `Authorization: Bearer
//! <token>` on TCP (401 without), mTLS when `client_ca` is set, nothing on a Unix socket.
//! Failures are HTTP errors with a JSON body `{"code": "NOT_FOUND", "message": "..."}`
//! ([`http_status`], the one mapping of the application's error kinds): INVALID_ARGUMENT 400,
//! UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, FAILED_PRECONDITION 409,
//! RESOURCE_EXHAUSTED 503 and UNAVAILABLE 503 (both with `Retry-After`: worth retrying as they
//! are), anything else 500; a body over [`MAX_BODY`] is 413 naming the limit. A command that
//! exits non-zero is a 200. Connections ([`listener`]) are HTTP/1.1, capped in number, and
//! dropped when their headers do not arrive in time.

mod answer;
mod error;
mod extract;
pub mod listener;
pub mod openapi;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use http::{Method, StatusCode};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::app::{App, AppError};
use crate::auth::{Auth, AuthLayer, Refused};
use crate::proto::v1;
use error::ApiError;
pub use error::http_status;
use extract::{Caller, Message, Params};

/// Largest request body (base64 inputs of a Run included); larger bodies get 413.
pub const MAX_BODY: usize = 2 * super::server::MAX_MESSAGE;
/// Most output file bytes one Run answer carries (before base64): a larger output is listed with
/// `omitted: true` and no data, never failing the answer (the exit code is always there).
pub const MAX_OUTPUTS: usize = 8 << 20;
/// Stdout and stderr are each cut after this many bytes (the `...Truncated` flags say so).
pub const MAX_STREAM: usize = 1 << 20;
/// `Retry-After` (seconds) on 503 answers.
pub const RETRY_AFTER_SECS: u32 = 5;

/// What the handlers share.
#[derive(Clone)]
struct Facade {
    app: App,
}

/// A handler's answer.
type Answer = Result<Response, ApiError>;

/// What a route's body is, for the OpenAPI document.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    /// None is read.
    None,
    /// A message of `mpool.v1`, without the fields that the path gives or HTTP does not take.
    Message {
        /// Its name in `mpool.v1`.
        name: &'static str,
        /// Its fields (JSON names) that a body must leave out.
        without: &'static [&'static str],
    },
}

/// What a route answers with status 200, for the OpenAPI document.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    /// A message of `mpool.v1`, by name.
    Message(&'static str),
    /// A Run collected into one answer (`answer.rs`).
    Run,
    /// An Exec collected into one answer (`answer.rs`).
    Exec,
    /// A stream of messages of `mpool.v1`, by name: one JSON object per line
    /// (`application/x-ndjson`), each sent as it happens.
    Lines(&'static str),
    /// `{"status": "SERVING" | "NOT_SERVING"}`.
    Health,
    /// The server's health in parts ([`crate::status_json::health`]).
    ServerHealth,
    /// The last hour per minute ([`crate::status_json::history`]).
    History,
    /// The OpenAPI document itself.
    OpenApi,
}

/// One route of the facade: the router serves it and the OpenAPI document describes it, both
/// from this table.
pub struct Route {
    /// HTTP method.
    pub method: Method,
    /// Path, with `{name}` parameters (the same syntax in axum and OpenAPI).
    pub path: &'static str,
    /// The RPC it stands for (its comment in the .proto describes the route), if any.
    pub rpc: Option<&'static str>,
    /// One line for people.
    pub summary: &'static str,
    /// Whether callers authenticate (as on the gRPC listener).
    pub auth: bool,
    /// The request body.
    pub body: Body,
    /// The answer.
    pub reply: Reply,
    handler: fn(MethodFilter) -> MethodRouter<Facade>,
}

/// Every route of the facade.
pub const ROUTES: &[Route] = &[
    Route {
        method: Method::GET,
        path: "/healthz",
        rpc: None,
        summary: "Whether multipassd answers and the store takes writes (200, or 503)",
        auth: false,
        body: Body::None,
        reply: Reply::Health,
        handler: |m| on(m, healthz),
    },
    Route {
        method: Method::GET,
        path: "/v1/openapi.json",
        rpc: None,
        summary: "This document",
        auth: false,
        body: Body::None,
        reply: Reply::OpenApi,
        handler: |m| on(m, openapi),
    },
    Route {
        method: Method::GET,
        path: "/v1/pools",
        rpc: Some("ListPools"),
        summary: "The pools and their state",
        auth: true,
        body: Body::None,
        reply: Reply::Message("ListPoolsResponse"),
        handler: |m| on(m, list_pools),
    },
    Route {
        method: Method::GET,
        path: "/v1/pools/{pool}",
        rpc: Some("GetPool"),
        summary: "One pool",
        auth: true,
        body: Body::None,
        reply: Reply::Message("PoolInfo"),
        handler: |m| on(m, get_pool),
    },
    Route {
        method: Method::POST,
        path: "/v1/pools/{pool}/leases",
        rpc: Some("Acquire"),
        summary: "Lease a clean VM",
        auth: true,
        body: Body::Message { name: "AcquireRequest", without: &["pool"] },
        reply: Reply::Message("Lease"),
        handler: |m| on(m, acquire),
    },
    Route {
        method: Method::POST,
        path: "/v1/pools/{pool}/preheat",
        rpc: Some("Preheat"),
        summary: "Raise a pool's ready floor for a while",
        auth: true,
        body: Body::Message { name: "PreheatRequest", without: &["pool"] },
        reply: Reply::Message("PreheatResponse"),
        handler: |m| on(m, preheat),
    },
    Route {
        method: Method::POST,
        path: "/v1/pools/{pool}/run",
        rpc: Some("Run"),
        summary: "Acquire, write inputs, run a command, read outputs and release, in one call",
        auth: true,
        body: Body::Message { name: "RunRequest", without: &["pool", "chunk"] },
        reply: Reply::Run,
        handler: |m| on(m, run),
    },
    Route {
        method: Method::GET,
        path: "/v1/leases",
        rpc: Some("ListLeases"),
        summary: "Leases (the caller's own unless it is an admin)",
        auth: true,
        body: Body::None,
        reply: Reply::Message("ListLeasesResponse"),
        handler: |m| on(m, list_leases),
    },
    Route {
        method: Method::POST,
        path: "/v1/leases/{id}/exec",
        rpc: Some("Exec"),
        summary: "Run a command on a lease, collected into one answer",
        auth: true,
        body: Body::Message { name: "ExecRequest", without: &["leaseId"] },
        reply: Reply::Exec,
        handler: |m| on(m, exec),
    },
    Route {
        method: Method::POST,
        path: "/v1/leases/{id}/execs/{execId}/cancel",
        rpc: Some("CancelExec"),
        summary: "Stop a running command",
        auth: true,
        body: Body::None,
        reply: Reply::Message("CancelExecResponse"),
        handler: |m| on(m, cancel_exec),
    },
    Route {
        method: Method::GET,
        path: "/v1/leases/{id}/sessions",
        rpc: Some("ListSessions"),
        summary: "The sessions of a lease",
        auth: true,
        body: Body::None,
        reply: Reply::Message("ListSessionsResponse"),
        handler: |m| on(m, list_sessions),
    },
    Route {
        method: Method::POST,
        path: "/v1/leases/{id}/sessions/{session}/attach",
        rpc: Some("Attach"),
        summary: "Follow a session: its output from the offsets, live, then its exit, one JSON event per line",
        auth: true,
        body: Body::Message { name: "AttachRequest", without: &["leaseId", "session"] },
        reply: Reply::Lines("ExecEvent"),
        handler: |m| on(m, attach),
    },
    Route {
        method: Method::POST,
        path: "/v1/leases/{id}/renew",
        rpc: Some("Renew"),
        summary: "Extend a lease",
        auth: true,
        body: Body::Message { name: "RenewRequest", without: &["leaseId"] },
        reply: Reply::Message("Lease"),
        handler: |m| on(m, renew),
    },
    Route {
        method: Method::DELETE,
        path: "/v1/leases/{id}",
        rpc: Some("Release"),
        summary: "End a lease",
        auth: true,
        body: Body::None,
        reply: Reply::Message("ReleaseResponse"),
        handler: |m| on(m, release),
    },
    Route {
        method: Method::POST,
        path: "/v1/leases/{id}/release",
        rpc: Some("Release"),
        summary: "End a lease (for clients that cannot send DELETE)",
        auth: true,
        body: Body::None,
        reply: Reply::Message("ReleaseResponse"),
        handler: |m| on(m, release),
    },
    Route {
        method: Method::POST,
        path: "/v1/reload",
        rpc: Some("Reload"),
        summary: "Re-read the server's config: tokens and TLS certificate rotate in place (admins only)",
        auth: true,
        body: Body::None,
        reply: Reply::Message("ReloadResponse"),
        handler: |m| on(m, reload),
    },
    Route {
        method: Method::GET,
        path: "/v1/health",
        rpc: None,
        summary: "The daemon's and the store's health, and whether mpool has reconciled",
        auth: true,
        body: Body::None,
        reply: Reply::ServerHealth,
        handler: |m| on(m, server_health),
    },
    Route {
        method: Method::GET,
        path: "/v1/history",
        rpc: None,
        summary: "Acquire latency and reset duration per pool, one point per minute for the last hour",
        auth: true,
        body: Body::None,
        reply: Reply::History,
        handler: |m| on(m, history),
    },
    Route {
        method: Method::GET,
        path: "/v1/vms",
        rpc: Some("ListVms"),
        summary: "VMs of every pool",
        auth: true,
        body: Body::None,
        reply: Reply::Message("ListVmsResponse"),
        handler: |m| on(m, list_vms),
    },
    Route {
        method: Method::POST,
        path: "/v1/drain",
        rpc: Some("Drain"),
        summary: "Drain this host (refuse new leases, let the current ones finish), or undo it",
        auth: true,
        body: Body::Message { name: "DrainRequest", without: &[] },
        reply: Reply::Message("DrainResponse"),
        handler: |m| on(m, drain),
    },
    Route {
        method: Method::POST,
        path: "/v1/gc",
        rpc: Some("Gc"),
        summary: "Cleanup, for admins: purge mpool's deleted instances, delete snapshots that are not mpool's",
        auth: true,
        body: Body::Message { name: "GcRequest", without: &[] },
        reply: Reply::Message("GcResponse"),
        handler: |m| on(m, gc),
    },
];

/// The facade's router: the [`ROUTES`] (those with `auth` behind `auth`), a JSON 404 for
/// anything else, the body limit ([`MAX_BODY`], 413) and request tracing.
pub fn router(app: App, auth: Auth) -> Router {
    let (mut open, mut guarded) = (Router::new(), Router::new());
    for r in ROUTES {
        let filter = MethodFilter::try_from(r.method.clone()).unwrap_or(MethodFilter::GET);
        if r.auth {
            guarded = guarded.route(r.path, (r.handler)(filter));
        } else {
            open = open.route(r.path, (r.handler)(filter));
        }
    }
    Router::new()
        .merge(open)
        .merge(guarded.route_layer(AuthLayer::new(auth, refusal as fn(Refused) -> Response)))
        // Pages for people, outside the JSON API and its document: the status page and its
        // assets (static, no token: its script asks for one).
        .route("/", axum::routing::get(page_asset))
        .route("/assets/{file}", axum::routing::get(page_asset))
        .fallback(no_route)
        .method_not_allowed_fallback(no_route)
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(axum::middleware::map_response(error::body_limit_as_json))
        // Spans and answers at debug; failures too: each is answered with its reason, and a pool
        // without a free VM (503) is no server fault worth an error line.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)))
        .with_state(Facade { app })
}

/// A refused caller: 401 with the reason.
fn refusal(why: Refused) -> Response {
    ApiError::from(AppError::new(crate::app::ErrorKind::Unauthenticated, why.0)).into_response()
}

async fn no_route(method: Method, uri: http::Uri) -> ApiError {
    let routes: Vec<String> = ROUTES.iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    ApiError::from(AppError::not_found(format!(
        "no route {method} {}: the routes are {} (GET /v1/openapi.json describes them)",
        uri.path(),
        routes.join(", ")
    )))
}

/// `GET /healthz`: whether the daemon answers and the store takes writes (no token needed).
async fn healthz(State(f): State<Facade>) -> Response {
    let ok = *f.app.engine().healthy().borrow();
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    answer::json(status, &serde_json::json!({ "status": if ok { "SERVING" } else { "NOT_SERVING" } }))
}

/// The status page's files ([`crate::status_page`]); anything else under `/assets` is the JSON 404.
async fn page_asset(method: Method, uri: http::Uri) -> Response {
    match crate::status_page::asset(uri.path()) {
        Some(asset) => asset.response().into_response(),
        None => no_route(method, uri).await.into_response(),
    }
}

async fn server_health(State(f): State<Facade>, Caller(p): Caller) -> Response {
    match crate::status_json::health(&f.app, p.as_ref()).await {
        Ok(v) => answer::json(StatusCode::OK, &v),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn history(State(f): State<Facade>, Caller(p): Caller) -> Response {
    answer::json(StatusCode::OK, &crate::status_json::history(&f.app, p.as_ref()))
}

async fn openapi() -> Response {
    answer::json(StatusCode::OK, openapi::document())
}

async fn list_pools(State(f): State<Facade>, Caller(p): Caller) -> Answer {
    answer::message(f.app.list_pools(p.as_ref(), v1::ListPoolsRequest {}).await)
}

async fn get_pool(State(f): State<Facade>, Caller(p): Caller, Params(pool): Params<String>) -> Answer {
    answer::message(f.app.get_pool(p.as_ref(), v1::GetPoolRequest { pool }).await)
}

async fn list_leases(State(f): State<Facade>, Caller(p): Caller) -> Answer {
    answer::message(f.app.list_leases(p.as_ref(), v1::ListLeasesRequest { pool: String::new() }).await)
}

async fn list_vms(State(f): State<Facade>, Caller(p): Caller) -> Answer {
    answer::message(f.app.list_vms(p.as_ref(), v1::ListVmsRequest { pool: String::new() }).await)
}

async fn acquire(
    State(f): State<Facade>,
    Caller(p): Caller,
    Params(pool): Params<String>,
    Message(mut req): Message<v1::AcquireRequest>,
) -> Answer {
    req.pool = in_path("pool", req.pool, pool)?;
    answer::message(f.app.acquire(p.as_ref(), req).await)
}

async fn reload(State(f): State<Facade>, Caller(p): Caller) -> Answer {
    answer::message(f.app.reload(p.as_ref(), v1::ReloadRequest {}).await)
}

async fn preheat(
    State(f): State<Facade>,
    Caller(p): Caller,
    Params(pool): Params<String>,
    Message(mut req): Message<v1::PreheatRequest>,
) -> Answer {
    req.pool = in_path("pool", req.pool, pool)?;
    answer::message(f.app.preheat(p.as_ref(), req).await)
}

async fn run(
    State(f): State<Facade>,
    Caller(p): Caller,
    Params(pool): Params<String>,
    Message(mut req): Message<v1::RunRequest>,
) -> Answer {
    req.pool = in_path("pool", req.pool, pool)?;
    if req.chunk.is_some() {
        return Err(AppError::invalid_argument(
            "chunk: over HTTP a Run is one message: give input content inline (inputs[].data as base64, or \
             inputs[].text); stream larger inputs with gRPC Run or `mpool run --put`",
        )
        .into());
    }
    // The answer carries outputs inline, so they are capped here too.
    let cap = MAX_OUTPUTS as u64;
    req.max_output_size = if req.max_output_size == 0 { cap } else { req.max_output_size.min(cap) };
    let events = f.app.run(p.as_ref(), futures::stream::iter([Ok(req)])).await?;
    Ok(answer::json(StatusCode::OK, &answer::run(events).await?))
}

async fn exec(
    State(f): State<Facade>,
    Caller(p): Caller,
    Params(id): Params<String>,
    Message(mut req): Message<v1::ExecRequest>,
) -> Answer {
    req.lease_id = in_path("leaseId", req.lease_id, id)?;
    let detach = req.detach;
    let events = f.app.exec(p.as_ref(), req).await?;
    Ok(answer::json(StatusCode::OK, &answer::exec(events, detach).await?))
}

async fn list_sessions(State(f): State<Facade>, Caller(p): Caller, Params(lease_id): Params<String>) -> Answer {
    answer::message(f.app.list_sessions(p.as_ref(), v1::ListSessionsRequest { lease_id }).await)
}

async fn attach(
    State(f): State<Facade>,
    Caller(p): Caller,
    Params((lease_id, session)): Params<(String, String)>,
    Message(mut req): Message<v1::AttachRequest>,
) -> Answer {
    req.lease_id = in_path("leaseId", req.lease_id, lease_id)?;
    req.session = in_path("session", req.session, session)?;
    let events = f.app.attach(p.as_ref(), req).await?;
    Ok(answer::lines(events))
}

async fn cancel_exec(
    State(f): State<Facade>,
    Caller(p): Caller,
    Params((lease_id, exec_id)): Params<(String, String)>,
) -> Answer {
    answer::message(f.app.cancel_exec(p.as_ref(), v1::CancelExecRequest { lease_id, exec_id }).await)
}

async fn renew(
    State(f): State<Facade>,
    Caller(p): Caller,
    Params(id): Params<String>,
    Message(mut req): Message<v1::RenewRequest>,
) -> Answer {
    req.lease_id = in_path("leaseId", req.lease_id, id)?;
    answer::message(f.app.renew(p.as_ref(), req).await)
}

async fn drain(State(f): State<Facade>, Caller(p): Caller, Message(req): Message<v1::DrainRequest>) -> Answer {
    answer::message(f.app.drain(p.as_ref(), req).await)
}

async fn gc(State(f): State<Facade>, Caller(p): Caller, Message(req): Message<v1::GcRequest>) -> Answer {
    answer::message(f.app.gc(p.as_ref(), req).await)
}

async fn release(State(f): State<Facade>, Caller(p): Caller, Params(lease_id): Params<String>) -> Answer {
    answer::message(f.app.release(p.as_ref(), v1::ReleaseRequest { lease_id }).await)
}

/// A field the path gives: the body must leave it out.
fn in_path(field: &str, in_body: String, from_path: String) -> Result<String, ApiError> {
    if in_body.is_empty() {
        Ok(from_path)
    } else {
        Err(AppError::invalid_argument(format!(
            "{field}: the path gives it ({from_path:?}); leave it out of the body (it said {in_body:?})"
        ))
        .into())
    }
}
