//! The client's one error type: a gRPC code, the daemon's message, and the decoded
//! `LaunchError`/`StartError` details when the daemon sent them.

use std::time::Duration;

use prost::Message;
use tonic::Code;

use crate::proto::multipass::{LaunchError, StartError, launch_error, start_error};

/// Everything that can go wrong talking to multipassd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon could not be reached (no socket, refused, permission denied, restarting):
    /// `detail` names the errno and the fix (and, when the address was discovered, every
    /// path tried).
    #[error("multipassd at {address} is unreachable: {detail}")]
    Unavailable {
        /// The address we tried.
        address: String,
        /// What failed, and what to do.
        detail: String,
    },
    /// The daemon's certificate did not verify: a trust problem, not reachability. `detail`
    /// says which certificate was checked against what, why it failed, and the fix.
    #[error("mpool does not trust multipassd at {address}: {detail}")]
    ServerNotTrusted {
        /// The daemon's address.
        address: String,
        /// Which certificate was checked against what, and the fix.
        detail: String,
    },
    /// A call was cut mid-way by its connection (an HTTP/2 error, a reset, the daemon gone):
    /// multipassd aborted or restarted under it. Whether the operation happened is unknown.
    #[error("multipassd {op} was cut off: {detail} (the daemon at {address} aborted or restarted during the call)")]
    ConnectionLost {
        /// The RPC.
        op: &'static str,
        /// The daemon's address.
        address: String,
        /// What the transport said.
        detail: String,
    },
    /// Our TLS setup is unusable (our certificate or key, or no certificate to verify the
    /// daemon with).
    #[error("TLS with multipassd: {0}")]
    Tls(String),
    /// The daemon does not trust our client certificate.
    #[error("multipassd does not trust this client: {message}")]
    Untrusted {
        /// What the daemon said and how to fix it.
        message: String,
    },
    /// The daemon answered a call with an error status.
    #[error("multipassd {op}: {message} ({code:?}){details}", details = DetailsDisplay(launch_error, start_error))]
    Daemon {
        /// The RPC.
        op: &'static str,
        /// The gRPC status code.
        code: Code,
        /// The daemon's message.
        message: String,
        /// Decoded `LaunchError` details (launch/create).
        launch_error: Option<LaunchError>,
        /// Decoded `StartError` details (start).
        start_error: Option<StartError>,
    },
    /// A call did not finish within its deadline; the daemon may be blocked or frozen.
    #[error("multipassd {op} did not answer within {after:?}; the daemon may be busy with a stop/suspend or frozen")]
    Timeout {
        /// The RPC.
        op: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The daemon's version is outside what mpool was tested with, or lacks a feature.
    #[error("{0}")]
    Unsupported(String),
    /// The daemon broke the protocol (e.g. no final reply where one is due).
    #[error("multipassd {op}: protocol error: {detail}")]
    Protocol {
        /// The RPC.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The caller's input was refused before anything was sent.
    #[error("{0}")]
    InvalidArgument(String),
}

struct DetailsDisplay<'a>(&'a Option<LaunchError>, &'a Option<StartError>);

impl std::fmt::Display for DetailsDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(le) = self.0 {
            let codes: Vec<_> = le.error_codes().map(|c| format!("{c:?}")).collect();
            write!(f, " [launch errors: {}]", codes.join(", "))?;
        }
        if let Some(se) = self.1 {
            let mut errs: Vec<_> = se
                .instance_errors
                .iter()
                .map(|(name, code)| {
                    let code = start_error::ErrorCode::try_from(*code)
                        .map(|c| format!("{c:?}"))
                        .unwrap_or_else(|_| code.to_string());
                    format!("{name}: {code}")
                })
                .collect();
            errs.sort();
            write!(f, " [start errors: {}]", errs.join(", "))?;
        }
        Ok(())
    }
}

impl Error {
    /// The gRPC code that best describes this error (for mapping to mpool's own API).
    pub fn code(&self) -> Code {
        match self {
            // A daemon mpool cannot trust is, to the engine and the API, a daemon it cannot
            // use now (its certificate may be regenerated, e.g. by an upgrade): UNAVAILABLE,
            // retried like an outage. The CLI tells them apart (see `is_trust_problem`).
            Error::Unavailable { .. }
            | Error::Timeout { .. }
            | Error::ConnectionLost { .. }
            | Error::Tls(_)
            | Error::ServerNotTrusted { .. } => Code::Unavailable,
            Error::Untrusted { .. } => Code::Unauthenticated,
            Error::Daemon { code, .. } => *code,
            Error::Unsupported(_) => Code::FailedPrecondition,
            Error::Protocol { .. } => Code::Internal,
            Error::InvalidArgument(_) => Code::InvalidArgument,
        }
    }

    /// True when the trouble is trust, not reachability: the daemon's certificate did not
    /// verify, or mpool's TLS setup (its certificate, the root to check with) is unusable. The
    /// command line exits 2 for these, not 3 ("unreachable").
    pub fn is_trust_problem(&self) -> bool {
        matches!(self, Error::ServerNotTrusted { .. } | Error::Tls(_))
    }

    /// True when the call may be sent again (if it is a read, see
    /// [`super::SAFE_TO_RETRY`]): its connection was cut, or none could be made.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::ConnectionLost { .. } | Error::Unavailable { .. })
    }

    /// True when the call was cut mid-way by its connection: multipassd aborted or restarted
    /// during it, so whether a mutating call happened is unknown; re-observe the state.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Error::ConnectionLost { .. })
    }

    /// True when the daemon could not be reached or did not answer in time: retry later.
    pub fn is_unavailable(&self) -> bool {
        self.code() == Code::Unavailable
    }

    /// Converts a status from a call, decoding the raw error details multipassd attaches.
    pub(crate) fn from_status(op: &'static str, address: &str, status: tonic::Status) -> Error {
        let code = status.code();
        let message = status.message().to_string();
        if code == Code::Unauthenticated {
            return Error::Untrusted { message: untrusted_hint(&message) };
        }
        // A status made by the transport (it carries a source error) rather than sent by the
        // daemon: either no connection could be made (nothing was sent), or the call was cut.
        if let Some(source) = std::error::Error::source(&status) {
            use super::reach::{self, Server};
            if code == Code::Unavailable {
                let detail = match reach::io_cause(source) {
                    Some(io) => reach::describe_io(Server::Multipassd, io),
                    None => super::client::source_chain(source),
                };
                return Error::Unavailable { address: address.to_string(), detail };
            }
            // rustls' note on a missing close_notify carries a documentation URL: not news.
            let chain = super::client::source_chain(source);
            let detail = chain.split(": https://").next().unwrap_or(&chain).to_string();
            return Error::ConnectionLost { op, address: address.to_string(), detail };
        }
        if code == Code::Unavailable {
            return Error::Unavailable { address: address.to_string(), detail: message };
        }
        let details = status.details();
        let (launch_error, start_error) = match op {
            "launch" | "create" if !details.is_empty() => (LaunchError::decode(details).ok(), None),
            "start" if !details.is_empty() => (None, StartError::decode(details).ok()),
            _ => (None, None),
        };
        Error::Daemon { op, code, message, launch_error, start_error }
    }

    /// The launch error codes carried in the details, if any.
    pub fn launch_error_codes(&self) -> Vec<launch_error::ErrorCodes> {
        match self {
            Error::Daemon { launch_error: Some(le), .. } => le.error_codes().collect(),
            _ => Vec::new(),
        }
    }
}

/// Adds the fix to the daemon's UNAUTHENTICATED message.
fn untrusted_hint(message: &str) -> String {
    let said =
        if message.trim().is_empty() { "UNAUTHENTICATED".to_string() } else { message.trim().replace('\n', " ") };
    format!(
        "{said} Fix: give mpool the passphrase (`local.passphrase`, set with `multipass set local.passphrase` from a trusted client) via `--passphrase-file` or `[daemon] passphrase_file`, or run `mpool multipass authenticate PASSPHRASE` once."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_error_details_are_decoded() {
        let mut se = StartError::default();
        se.instance_errors.insert("ghost".into(), start_error::ErrorCode::DoesNotExist as i32);
        let status = tonic::Status::with_details(Code::Aborted, "instance(s) missing", se.encode_to_vec().into());
        let err = Error::from_status("start", "unix:/x", status);
        match &err {
            Error::Daemon { code, start_error: Some(se), .. } => {
                assert_eq!(*code, Code::Aborted);
                assert_eq!(se.instance_errors["ghost"], start_error::ErrorCode::DoesNotExist as i32);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("ghost: DoesNotExist"), "{err}");
    }

    #[test]
    fn launch_error_details_are_decoded() {
        let le = LaunchError { error_codes: vec![launch_error::ErrorCodes::InvalidHostname as i32] };
        let status =
            tonic::Status::with_details(Code::InvalidArgument, "Invalid arguments supplied", le.encode_to_vec().into());
        let err = Error::from_status("launch", "unix:/x", status);
        assert_eq!(err.launch_error_codes(), vec![launch_error::ErrorCodes::InvalidHostname]);
    }

    #[test]
    fn unauthenticated_names_the_fix() {
        let err = Error::from_status("version", "unix:/x", tonic::Status::unauthenticated(""));
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.to_string().contains("passphrase"), "{err}");
    }
}
