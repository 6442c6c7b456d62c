//! [`SshError`]: every way an SSH connection, command or transfer can fail, each with a message
//! that says what to check.

use std::fmt;
use std::io;
use std::time::Duration;

/// Which end of a transfer a file error happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This host (the machine running mpool).
    Local,
    /// The VM, reached over SFTP.
    Remote,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

/// Errors of SSH connections, remote commands and file transfers.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The TCP connection could not be made (refused, no route, unknown host).
    #[error(
        "cannot reach {addr}: {source}; check that the VM is running and that the host and port \
         from ssh_info are right (`multipass info`)"
    )]
    Unreachable {
        /// `host:port`.
        addr: String,
        /// The socket error.
        source: io::Error,
    },
    /// Something took longer than allowed (connecting, an SFTP request).
    #[error(
        "{what} timed out after {after:?}; check that the VM is running and not overloaded, or \
         raise the timeout"
    )]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The limit that was hit.
        after: Duration,
    },
    /// The server rejected the public key.
    #[error(
        "authentication refused for {user}@{addr}; check that the private key from ssh_info \
         belongs to the VM (its public half must be in ~{user}/.ssh/authorized_keys) and that \
         the user name is right"
    )]
    AuthRefused {
        /// The user name tried.
        user: String,
        /// `host:port`.
        addr: String,
    },
    /// The private key text could not be parsed.
    #[error(
        "invalid private key: {detail}; expected unencrypted OpenSSH, PKCS#1 (BEGIN RSA PRIVATE \
         KEY) or PKCS#8 text, as returned by ssh_info"
    )]
    InvalidKey {
        /// Why parsing failed.
        detail: String,
    },
    /// The server presented a different host key than the one pinned for this cache entry.
    #[error(
        "host key mismatch for {addr}: pinned {expected}, server presented {actual}; the endpoint \
         now belongs to a different machine (VM recreated, IP reused?); close the cache entry \
         (end the lease) to accept the new key"
    )]
    HostKeyMismatch {
        /// `host:port`.
        addr: String,
        /// The pinned SHA-256 fingerprint.
        expected: String,
        /// The fingerprint the server presented.
        actual: String,
    },
    /// The SSH handshake failed (protocol or algorithm mismatch, the server hung up early).
    #[error(
        "SSH handshake with {addr} failed: {detail}; check that an SSH server (sshd) answers on \
         that port"
    )]
    Handshake {
        /// `host:port`.
        addr: String,
        /// What went wrong.
        detail: String,
    },
    /// The connection broke (the VM stopped, restarted or the network dropped).
    #[error(
        "connection to {addr} lost: {detail}; the VM may have stopped or restarted (the cache \
         reopens the connection once)"
    )]
    ConnectionLost {
        /// `host:port`.
        addr: String,
        /// What went wrong.
        detail: String,
    },
    /// The server refused a new channel or request on a live connection.
    #[error(
        "the server refused {what}: {detail}; check sshd's MaxSessions and that the subsystem \
         (sftp) is enabled"
    )]
    ChannelRefused {
        /// What was asked for (a session channel, exec, the sftp subsystem).
        what: String,
        /// The server's reason.
        detail: String,
    },
    /// The cache entry was closed while the operation was starting.
    #[error("SSH connection {key:?} was closed (lease ended or VM stopped)")]
    Closed {
        /// The cache key.
        key: String,
    },
    /// The request itself is unusable (bad env name, NUL byte, empty argv, too long).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The remote shell could not find the command (exit status 127).
    #[error(
        "remote command not found: {command} (exit 127); check the spelling, that the package \
         is installed in the VM and that it is on the PATH of a non-interactive shell"
    )]
    CommandNotFound {
        /// The command as requested.
        command: String,
    },
    /// The remote command ended unsuccessfully.
    #[error("remote command failed: {command} ({status}); see its stderr")]
    CommandFailed {
        /// The command as requested.
        command: String,
        /// `exit code N` or `killed by signal S`.
        status: String,
    },
    /// The remote command hit its timeout and was killed.
    #[error("remote command timed out after {after:?} and was killed: {command}")]
    CommandTimedOut {
        /// The command as requested.
        command: String,
        /// Its timeout.
        after: Duration,
    },
    /// The remote command was cancelled and killed.
    #[error("remote command was cancelled and killed: {command}")]
    CommandCancelled {
        /// The command as requested.
        command: String,
    },
    /// A write failed because the file system is full.
    #[error(
        "disk full writing {side} {path}; free space on the {side} file system (`df -h`) or use \
         a bigger disk"
    )]
    DiskFull {
        /// Where the file lives.
        side: Side,
        /// The file.
        path: String,
    },
    /// Access was refused by file permissions.
    #[error(
        "permission denied on {side} {path}; check the owner and mode of the file and its parent \
         directories (remote operations run as the SSH user)"
    )]
    PermissionDenied {
        /// Where the file lives.
        side: Side,
        /// The file.
        path: String,
    },
    /// A file or directory does not exist.
    #[error("no such file or directory: {side} {path}; check the path")]
    NoSuchFile {
        /// Where the file lives.
        side: Side,
        /// The path.
        path: String,
    },
    /// A remote path resolves outside the declared base directory.
    #[error(
        "path {path:?} escapes the base directory {base:?}; use a path inside the base (no `..` \
         above it)"
    )]
    PathEscapesBase {
        /// The path as given.
        path: String,
        /// The base directory.
        base: String,
    },
    /// Another SFTP failure. OpenSSH reports most errors (including a full disk or an exceeded
    /// quota) with the generic message "Failure".
    #[error(
        "SFTP {op} {path} failed: {message}; check free space and quotas (`df -h`) and that the \
         path is a regular file or directory"
    )]
    Sftp {
        /// The operation (open, write, mkdir, ...).
        op: &'static str,
        /// The remote path.
        path: String,
        /// The server's message.
        message: String,
    },
    /// Another local I/O failure.
    #[error("local I/O error on {path}: {source}")]
    LocalIo {
        /// The local path.
        path: String,
        /// The error.
        source: io::Error,
    },
}

impl SshError {
    /// True for errors that mean the connection itself is unusable; the cache reopens the
    /// connection once and retries when an operation fails with such an error before it started.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, SshError::ConnectionLost { .. })
    }

    /// The VM could not be reached at this endpoint at all (refused, timed out, handshake or
    /// connection lost before a channel opened): its endpoint may have moved, e.g. after a
    /// daemon restart, so asking the daemon again is worth it.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SshError::Unreachable { .. }
                | SshError::Timeout { .. }
                | SshError::Handshake { .. }
                | SshError::ConnectionLost { .. }
        )
    }

    /// Turns the outcome of a command into an error, or `None` when it succeeded (exit 0).
    ///
    /// Exit 127 becomes [`SshError::CommandNotFound`]; a timeout or cancellation wins over the
    /// status it caused. `code` and `signal` both `None` means the connection was lost before the
    /// command's status arrived.
    pub fn from_exit(
        command: &str,
        code: Option<u32>,
        signal: Option<&str>,
        timed_out: Option<Duration>,
        cancelled: bool,
    ) -> Option<SshError> {
        let command = command.to_string();
        if let Some(after) = timed_out {
            return Some(SshError::CommandTimedOut { command, after });
        }
        if cancelled {
            return Some(SshError::CommandCancelled { command });
        }
        match (code, signal) {
            (Some(0), None) => None,
            (Some(127), None) => Some(SshError::CommandNotFound { command }),
            (Some(code), None) => Some(SshError::CommandFailed { command, status: format!("exit code {code}") }),
            (_, Some(signal)) => {
                Some(SshError::CommandFailed { command, status: format!("killed by signal {signal}") })
            }
            (None, None) => {
                Some(SshError::CommandFailed { command, status: "no exit status: the connection was lost".into() })
            }
        }
    }

    /// Maps a local file error to the matching variant.
    pub(crate) fn local(path: &std::path::Path, source: io::Error) -> SshError {
        let path = path.display().to_string();
        match source.kind() {
            io::ErrorKind::NotFound => SshError::NoSuchFile { side: Side::Local, path },
            io::ErrorKind::PermissionDenied => SshError::PermissionDenied { side: Side::Local, path },
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => SshError::DiskFull { side: Side::Local, path },
            _ => SshError::LocalIo { path, source },
        }
    }

    /// Maps a russh error on a live connection (opening a channel, sending a request).
    pub(crate) fn from_russh(addr: &str, what: &str, e: russh::Error) -> SshError {
        match e {
            russh::Error::ChannelOpenFailure(reason) => {
                SshError::ChannelRefused { what: what.into(), detail: format!("{reason:?}") }
            }
            russh::Error::RequestDenied => {
                SshError::ChannelRefused { what: what.into(), detail: "request denied".into() }
            }
            other => SshError::ConnectionLost { addr: addr.into(), detail: other.to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_outcomes_map_to_errors() {
        assert!(SshError::from_exit("true", Some(0), None, None, false).is_none());
        assert!(matches!(
            SshError::from_exit("nope", Some(127), None, None, false),
            Some(SshError::CommandNotFound { .. })
        ));
        let e = SshError::from_exit("x", None, Some("TERM"), None, false).map(|e| e.to_string());
        assert!(e.is_some_and(|m| m.contains("signal TERM")));
        assert!(matches!(
            SshError::from_exit("x", None, Some("TERM"), Some(Duration::from_secs(1)), false),
            Some(SshError::CommandTimedOut { .. })
        ));
        assert!(matches!(
            SshError::from_exit("x", None, Some("KILL"), None, true),
            Some(SshError::CommandCancelled { .. })
        ));
    }

    #[test]
    fn local_errors_are_classified() {
        let p = std::path::Path::new("/x");
        assert!(matches!(
            SshError::local(p, io::Error::from(io::ErrorKind::NotFound)),
            SshError::NoSuchFile { side: Side::Local, .. }
        ));
        assert!(matches!(
            SshError::local(p, io::Error::from_raw_os_error(28)),
            SshError::DiskFull { side: Side::Local, .. }
        ));
    }
}
