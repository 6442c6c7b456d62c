//! The few things about Multipass instances that every part of mpool speaks of: their states,
//! how to reach one over SSH, and what a launch asks for.

/// An instance's state, as multipassd reports it (`off` and `stopped` are both [`Stopped`]).
///
/// [`Stopped`]: InstanceState::Stopped
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceState {
    /// Not known.
    #[default]
    Unknown,
    /// Running and reachable.
    Running,
    /// Booting or resuming.
    Starting,
    /// Rebooting.
    Restarting,
    /// Powered off.
    Stopped,
    /// Deleted but not purged.
    Deleted,
    /// Running with a shutdown scheduled.
    DelayedShutdown,
    /// Saving its memory state.
    Suspending,
    /// Memory state saved; start resumes it.
    Suspended,
}

impl InstanceState {
    /// The name multipass's protocol gives it (`RUNNING`, `SUSPENDED`, ...).
    pub fn as_str_name(self) -> &'static str {
        match self {
            InstanceState::Unknown => "UNKNOWN",
            InstanceState::Running => "RUNNING",
            InstanceState::Starting => "STARTING",
            InstanceState::Restarting => "RESTARTING",
            InstanceState::Stopped => "STOPPED",
            InstanceState::Deleted => "DELETED",
            InstanceState::DelayedShutdown => "DELAYED_SHUTDOWN",
            InstanceState::Suspending => "SUSPENDING",
            InstanceState::Suspended => "SUSPENDED",
        }
    }
}

/// How to reach a VM over SSH: what `ssh_info` answers, what SSH connects to, and what the
/// simulator hands out. The one SSH endpoint type of mpool.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SshEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port (22 for most Multipass backends).
    pub port: u16,
    /// User name (`ubuntu` for Multipass).
    pub username: String,
    /// The private key text: OpenSSH, PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8, unencrypted.
    /// Never serialized or printed.
    #[serde(skip)]
    pub private_key: String,
}

impl SshEndpoint {
    /// `host:port`, as used in messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Debug for SshEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// Options of `launch`/`create`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Instance name (required: mpool never lets the daemon pick one).
    pub name: String,
    /// Image as multipass takes it: `[remote:]image` (`24.04`, `daily:noble`, an alias or a
    /// blueprint), `file:///path` or an `http(s)://` URL (empty: the daemon's default). The
    /// client splits it into the request's image and remote name as the multipass CLI does.
    pub image: String,
    /// CPUs (0: default).
    pub cpus: i32,
    /// Memory, e.g. "2G" (empty: default).
    pub memory: String,
    /// Disk, e.g. "10G" (empty: default).
    pub disk: String,
    /// cloud-init user data.
    pub cloud_init: String,
    /// Seconds the daemon waits for readiness (0: 300).
    pub timeout_secs: i32,
}
