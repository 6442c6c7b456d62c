//! The application's error: a kind that says what the caller can do about it, and a message a
//! person can act on. Every use case fails with one; each transport maps the kind to its own
//! status in one place (gRPC: `crate::errors`, HTTP: `crate::json`).
//!
//! The kinds are the canonical error codes (the ones gRPC and Google's APIs share), so a failure
//! a transport reports into a use case (a broken request stream) comes back out unchanged. Their
//! names (`Debug`) are the ones recorded with a Run's outcome, so a retried Run reads the same
//! text whichever transport ran it.

use std::fmt;

use mpool_engine::EngineError;
use mpool_ssh::SshError;

/// What kind of failure it is: what the caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller went away (or cancelled) before the call finished.
    Cancelled,
    /// A failure nothing else describes (a transport's own).
    Unknown,
    /// Bad arguments: fix the request.
    InvalidArgument,
    /// A deadline passed.
    DeadlineExceeded,
    /// No such pool, lease or file.
    NotFound,
    /// The same thing is already running (an exec id, a request id).
    AlreadyExists,
    /// The caller's token may not do this.
    PermissionDenied,
    /// A limit or the pool's capacity was reached: retry later, or send less.
    ResourceExhausted,
    /// The lease or the request ended, or the VM is not in a state to do this.
    FailedPrecondition,
    /// The call was aborted.
    Aborted,
    /// A value out of range (a transport's own: a message above its size limit).
    OutOfRange,
    /// Not implemented.
    Unimplemented,
    /// A bug or an unexpected failure in mpool.
    Internal,
    /// Retry shortly: the daemon, the store or the VM's SSH is away for now.
    Unavailable,
    /// Data was lost.
    DataLoss,
    /// The caller did not authenticate.
    Unauthenticated,
}

impl ErrorKind {
    /// The kind's canonical name, as the proto enum `google.rpc.Code` spells it
    /// (`"RESOURCE_EXHAUSTED"`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Cancelled => "CANCELLED",
            ErrorKind::Unknown => "UNKNOWN",
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::AlreadyExists => "ALREADY_EXISTS",
            ErrorKind::PermissionDenied => "PERMISSION_DENIED",
            ErrorKind::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ErrorKind::FailedPrecondition => "FAILED_PRECONDITION",
            ErrorKind::Aborted => "ABORTED",
            ErrorKind::OutOfRange => "OUT_OF_RANGE",
            ErrorKind::Unimplemented => "UNIMPLEMENTED",
            ErrorKind::Internal => "INTERNAL",
            ErrorKind::Unavailable => "UNAVAILABLE",
            ErrorKind::DataLoss => "DATA_LOSS",
            ErrorKind::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The retry hint: the same call may work later as it is (the pool had no free VM in time,
    /// the daemon or the store is away), so a caller should pause and retry rather than change
    /// the request.
    pub fn retry_later(self) -> bool {
        matches!(self, ErrorKind::ResourceExhausted | ErrorKind::Unavailable)
    }
}

/// A use case's failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppError {
    kind: ErrorKind,
    message: String,
}

impl AppError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AppError {
        AppError { kind, message: message.into() }
    }

    /// Bad arguments.
    pub fn invalid_argument(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::InvalidArgument, message)
    }

    /// Not found.
    pub fn not_found(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::NotFound, message)
    }

    /// Not allowed for the caller's token.
    pub fn permission_denied(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::PermissionDenied, message)
    }

    /// A limit was reached.
    pub fn resource_exhausted(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::ResourceExhausted, message)
    }

    /// Already running.
    pub fn already_exists(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::AlreadyExists, message)
    }

    /// Not in a state to do this.
    pub fn failed_precondition(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::FailedPrecondition, message)
    }

    /// Away for now: retry shortly.
    pub fn unavailable(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::Unavailable, message)
    }

    /// The caller went away.
    pub fn cancelled(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::Cancelled, message)
    }

    /// An unexpected failure in mpool.
    pub fn internal(message: impl Into<String>) -> AppError {
        AppError::new(ErrorKind::Internal, message)
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, saying what to do.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AppError {}

/// The kind of an engine error's kind.
fn engine_kind(kind: mpool_engine::ErrorKind) -> ErrorKind {
    use mpool_engine::ErrorKind as K;
    match kind {
        K::NotFound => ErrorKind::NotFound,
        K::FailedPrecondition => ErrorKind::FailedPrecondition,
        K::PermissionDenied => ErrorKind::PermissionDenied,
        K::ResourceExhausted => ErrorKind::ResourceExhausted,
        K::AlreadyExists => ErrorKind::AlreadyExists,
        K::Unavailable => ErrorKind::Unavailable,
        K::InvalidArgument => ErrorKind::InvalidArgument,
    }
}

/// An engine error, with a message that says what to do.
impl From<EngineError> for AppError {
    fn from(e: EngineError) -> AppError {
        let message = match &e {
            EngineError::UnknownLease(_) => {
                format!("{e}: acquire a new lease (ListLeases shows the leases you hold)")
            }
            EngineError::NotOwner(id) => format!(
                "lease {id} belongs to another client: only the token that acquired it (or an admin token) may use \
                 it; acquire your own lease"
            ),
            _ => e.to_string(),
        };
        AppError::new(engine_kind(e.kind()), message)
    }
}

/// An SSH error during a call on a lease.
impl From<SshError> for AppError {
    fn from(e: SshError) -> AppError {
        let kind = match &e {
            SshError::Unreachable { .. }
            | SshError::Timeout { .. }
            | SshError::ConnectionLost { .. }
            | SshError::Closed { .. }
            | SshError::ChannelRefused { .. }
            | SshError::Handshake { .. } => ErrorKind::Unavailable,
            SshError::InvalidRequest(_) | SshError::PathEscapesBase { .. } => ErrorKind::InvalidArgument,
            SshError::NoSuchFile { .. } => ErrorKind::NotFound,
            SshError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            SshError::DiskFull { .. } => ErrorKind::ResourceExhausted,
            SshError::AuthRefused { .. } | SshError::InvalidKey { .. } | SshError::HostKeyMismatch { .. } => {
                ErrorKind::FailedPrecondition
            }
            _ => ErrorKind::Internal,
        };
        AppError::new(kind, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_kind_and_say_what_to_do() {
        let e = AppError::from(EngineError::UnknownLease("l-1".into()));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().ends_with("acquire a new lease (ListLeases shows the leases you hold)"), "{e}");
        let e = AppError::from(EngineError::NotOwner("l-2".into()));
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.message().contains("acquire your own lease"), "{e}");
        assert_eq!(AppError::from(EngineError::ShuttingDown).kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn only_capacity_and_availability_are_worth_a_plain_retry() {
        assert!(ErrorKind::ResourceExhausted.retry_later() && ErrorKind::Unavailable.retry_later());
        assert!(!ErrorKind::InvalidArgument.retry_later() && !ErrorKind::NotFound.retry_later());
        assert_eq!(ErrorKind::FailedPrecondition.name(), "FAILED_PRECONDITION");
    }
}
