//! The application layer: the API's use cases, once, under every transport. gRPC
//! ([`crate::service`]) and HTTP/JSON ([`crate::json`]) only decode a request, authenticate the
//! caller, call a use case here and encode what it returns; so validation, auth scopes,
//! idempotent request ids, caps, metrics and error messages are the same whichever way a caller
//! comes in.
//!
//! Use cases take the caller's [`Principal`](crate::auth::Principal) explicitly ([`scope`]) and
//! fail with an [`AppError`] (a kind, and a message a person can act on), never with a
//! transport's status.

pub mod error;
pub mod scope;
pub mod validate;

pub use error::{AppError, ErrorKind};
pub use validate::{MAX_DURATION, MAX_ENV, MAX_EXEC_ID, MAX_FILES, MAX_HOLDER, MAX_ID, MAX_PATH};
