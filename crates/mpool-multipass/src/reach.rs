//! One way to say why a server could not be reached, for both of mpool's client sides:
//! multipassd (the `multipass` module) and `mpool serve` (the client commands). It names the
//! server, the endpoint and the errno (no such file, connection refused, permission denied),
//! and tells a trust failure (a certificate that did not verify) from reachability.

use std::error::Error as StdError;
use std::io;

/// Which server a message is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// multipassd (or `mpool sim`).
    Multipassd,
    /// `mpool serve`'s API.
    MpoolServe,
}

impl Server {
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Server::Multipassd => "multipassd",
            Server::MpoolServe => "mpool serve",
        }
    }

    fn not_running_hint(self) -> &'static str {
        match self {
            Server::Multipassd => "Is multipassd running (`snap services multipass`), and is the address right?",
            Server::MpoolServe => "Is `mpool serve` running, and is the endpoint right (--endpoint, MPOOL_ENDPOINT)?",
        }
    }

    fn permission_hint(self) -> &'static str {
        match self {
            Server::Multipassd => "Run as a user in the socket's group (`sudo` on a snap install) or as root.",
            Server::MpoolServe => "Run as a user in the socket's group, or use mpool's TCP endpoint with a token.",
        }
    }
}

/// The first I/O error in an error's source chain (tonic and hyper wrap it).
pub fn io_cause<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            // The connector's own error may wrap a TLS error; the I/O error is still the cause.
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// The rustls error in an error's source chain, if the failure was TLS (also inside an I/O
/// error, as tokio-rustls reports handshake failures).
pub fn tls_cause<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && let Some(t) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// Whether a rustls error is the peer's certificate failing verification.
pub fn is_certificate_failure(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::InvalidCertificate(_))
}

/// The errno of a failed connect, in words, with the fix for `server`.
pub fn describe_io(server: Server, e: &io::Error) -> String {
    let errno = e.raw_os_error().map(|n| format!(" (errno {n})")).unwrap_or_default();
    match e.kind() {
        io::ErrorKind::NotFound => {
            format!("no such file{errno}: nothing listens there. {}", server.not_running_hint())
        }
        io::ErrorKind::ConnectionRefused => format!(
            "connection refused{errno}: nothing accepts connections there (not running, or a stale socket file). {}",
            server.not_running_hint()
        ),
        io::ErrorKind::PermissionDenied => {
            format!("permission denied{errno}: this user may not open it. {}", server.permission_hint())
        }
        io::ErrorKind::TimedOut => {
            format!("no answer in time{errno}. {}", server.not_running_hint())
        }
        _ => format!("{e}. {}", server.not_running_hint()),
    }
}

/// Why `server` at `endpoint` could not be reached, from a connect error: the errno in words
/// and its fix, or, for a certificate that did not verify, a trust problem.
pub fn describe_connect_failure(server: Server, endpoint: &str, e: &(dyn StdError + 'static)) -> String {
    if let Some(t) = tls_cause(e)
        && is_certificate_failure(t)
    {
        return format!("mpool does not trust {} at {endpoint}: its certificate did not verify ({t})", server.name());
    }
    match io_cause(e) {
        Some(io) => format!("{} at {endpoint} is unreachable: {}", server.name(), describe_io(server, io)),
        None => format!(
            "{} at {endpoint} is unreachable: {}. {}",
            server.name(),
            super::client::source_chain(e),
            server.not_running_hint()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_are_named() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert!(describe_io(Server::MpoolServe, &e).starts_with("no such file (errno 2)"));
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert!(describe_io(Server::Multipassd, &e).contains("connection refused"));
        let e = io::Error::from_raw_os_error(libc::EACCES);
        let said = describe_io(Server::MpoolServe, &e);
        assert!(said.starts_with("permission denied") && said.contains("TCP endpoint"), "{said}");
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(tls_cause(&wrapped).is_some_and(is_certificate_failure));
    }
}
