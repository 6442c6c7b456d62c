//! The public API, `mpool.v1.Pool`, in layers:
//!
//! - [`app`]: the application layer: the use cases (leases, exec, transfers, Run, listings)
//!   with validation, auth scopes, idempotent request ids, caps and metrics, failing with an
//!   [`app::AppError`]; it knows no transport.
//! - the transports, which only decode, authenticate, call the application and encode: gRPC
//!   ([`service`], its status mapping in `errors`) and the HTTP/JSON facade ([`json`], an axum
//!   router with its OpenAPI document).
//! - around them: message conversions ([`convert`]), the generated messages with their JSON
//!   mapping ([`proto`]), bearer-token auth as one tower layer for both ([`auth`]), the
//!   listeners with health and reflection ([`server`]), plain HTTP endpoints ([`http`]), the
//!   `mpool serve` wiring ([`serve`]) and a client of the API ([`client`]).
//! - on the HTTP/JSON listener, the status page ([`status_page`]) and the JSON about the
//!   server it reads ([`status_json`]).

pub mod app;
pub mod auth;
pub mod client;
pub mod convert;
pub mod credentials;
mod errors;
pub mod host;
pub mod http;
pub mod json;
pub mod proto;
pub mod reload;
pub mod serve;
pub mod server;
pub mod service;
pub mod status_json;
pub mod status_page;
