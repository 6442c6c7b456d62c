//! The public API, `mpool.v1.Pool` over gRPC: the service ([`service`]), its error mapping and
//! conversions ([`convert`]), bearer-token auth ([`auth`]), the listeners with health and
//! reflection ([`server`]), plain HTTP endpoints ([`http`]), and the HTTP/JSON facade ([`json`]).

pub mod app;
pub mod auth;
pub mod client;
pub mod convert;
mod errors;
pub mod http;
pub mod json;
pub mod proto;
pub mod serve;
pub mod server;
pub mod service;
