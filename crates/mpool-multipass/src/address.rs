//! Daemon addresses (`unix:PATH` or `HOST:PORT`, multipass's own syntax) and their discovery.

use std::fmt;
use std::path::PathBuf;

use super::Error;

/// The snap's socket: where multipassd listens on a snap install.
pub const SNAP_SOCKET: &str = "/var/snap/multipass/common/multipass_socket";
/// The socket of a non-snap Linux build.
pub const RUN_SOCKET: &str = "/run/multipass_socket";

/// Where multipassd listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonAddress {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp {
        /// Host name or IP (also the TLS server name).
        host: String,
        /// Port.
        port: u16,
    },
}

impl DaemonAddress {
    /// Parses `unix:PATH` or `HOST:PORT` (as `MULTIPASS_SERVER_ADDRESS` does).
    pub fn parse(s: &str) -> Result<DaemonAddress, Error> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::InvalidArgument(format!("daemon address {s:?}: `unix:` needs a socket path")));
            }
            return Ok(DaemonAddress::Unix(PathBuf::from(path)));
        }
        let bad = || Error::InvalidArgument(format!("daemon address {s:?}: expected `unix:PATH` or `HOST:PORT`"));
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let port = port.parse().map_err(|_| bad())?;
        Ok(DaemonAddress::Tcp { host: host.to_string(), port })
    }

    /// Finds the daemon: `MULTIPASS_SERVER_ADDRESS`, then the snap socket, then `/run/multipass_socket`.
    /// When neither socket exists, the snap socket is returned so the error names it.
    pub fn discover() -> Result<DaemonAddress, Error> {
        Ok(Discovered::find()?.address)
    }

    /// The TLS server name:    /// The TLS server name: `localhost` on a Unix socket, the host on TCP.
    pub fn server_name(&self) -> &str {
        match self {
            DaemonAddress::Unix(_) => "localhost",
            DaemonAddress::Tcp { host, .. } => host,
        }
    }
}

/// Where discovery looked, so an unreachable daemon's error names every path tried (during a
/// daemon restart `/run/multipass_socket` can be missing, and the fallback is the wrong socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// The address chosen.
    pub address: DaemonAddress,
    /// Whether it came from `MULTIPASS_SERVER_ADDRESS`.
    pub from_env: bool,
    /// The socket paths looked at, in order.
    pub tried: Vec<PathBuf>,
}

impl Discovered {
    /// `MULTIPASS_SERVER_ADDRESS`, else the first of the snap socket and `/run/multipass_socket`
    /// that exists, else the snap socket.
    pub fn find() -> Result<Discovered, Error> {
        if let Ok(addr) = std::env::var("MULTIPASS_SERVER_ADDRESS")
            && !addr.trim().is_empty()
        {
            return Ok(Discovered { address: DaemonAddress::parse(&addr)?, from_env: true, tried: vec![] });
        }
        let tried: Vec<PathBuf> = [SNAP_SOCKET, RUN_SOCKET].iter().map(PathBuf::from).collect();
        let path = tried.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| PathBuf::from(SNAP_SOCKET));
        Ok(Discovered { address: DaemonAddress::Unix(path), from_env: false, tried })
    }

    /// Each path tried and what is there now, for an error message.
    pub fn explain(&self) -> String {
        if self.from_env {
            return "from $MULTIPASS_SERVER_ADDRESS".into();
        }
        let each: Vec<String> = self
            .tried
            .iter()
            .map(|p| match std::fs::symlink_metadata(p) {
                Ok(_) => format!("{} (exists)", p.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    format!("{} (no such file)", p.display())
                }
                Err(e) => format!("{} ({e})", p.display()),
            })
            .collect();
        format!("discovered; tried {}; $MULTIPASS_SERVER_ADDRESS is not set", each.join(", "))
    }
}

impl fmt::Display for DaemonAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            DaemonAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            DaemonAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(DaemonAddress::parse("unix:/tmp/s").unwrap(), DaemonAddress::Unix("/tmp/s".into()));
        assert_eq!(
            DaemonAddress::parse("localhost:50051").unwrap(),
            DaemonAddress::Tcp { host: "localhost".into(), port: 50051 }
        );
        assert_eq!(DaemonAddress::parse("[::1]:7").unwrap(), DaemonAddress::Tcp { host: "::1".into(), port: 7 });
        assert_eq!(DaemonAddress::parse("[::1]:7").unwrap().to_string(), "[::1]:7");
        for bad in ["unix:", "nohost", ":80", "h:port", "h:99999"] {
            assert!(DaemonAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
