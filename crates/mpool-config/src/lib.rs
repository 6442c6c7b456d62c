//! The configuration of `mpool serve --config FILE`: a TOML file with `[daemon]` (how to reach
//! and trust multipassd), `[api]` (where mpool listens), `[store]` (its database), `[engine]`
//! (instance naming and the reconcile loop), an optional `[isolation]` (read by
//! `mpool isolation rules`) and one `[[pools]]` table per pool of VMs.
//!
//! Loading happens in two steps: the text is deserialised into raw tables (every key optional,
//! unknown keys rejected by serde with toml's line and column), then [`Config::parse`] checks
//! every value, fills in defaults and resolves relative paths against the config file's
//! directory. Every problem found is reported at once; each names the file, the line, the key
//! path (e.g. `pools[1] ("ci").max_size`), what is wrong and what to do about it.
//!
//! `deploy/mpool.toml` is the annotated example with every key and its default.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use mpool_multipass::sizes::{MIN_DISK, MIN_MEMORY};
use mpool_multipass::{ClientIdentity, DaemonAddress, ServerVerification};

pub use mpool_core::pool::schedule::Schedule;
/// Parses a memory/disk size as multipass does (`512M`, `1G`, `1.5G`, `2GiB`; plain digits are
/// bytes) and returns bytes; `None` when the text is not a size.
pub use mpool_core::sizes::parse_size;
pub use mpool_core::{Autoscale, PoolConfig, ResetStrategy};

/// The API listener used when `[api] listen` is absent.
pub const DEFAULT_LISTEN: &str = "unix:/run/mpool/mpool.sock";
/// The largest upload when `[api] max_upload` is absent: 1 GiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 1 << 30;
/// Default output a session keeps per stream: 8 MiB.
pub const DEFAULT_SESSION_OUTPUT_CAP: u64 = 8 << 20;
/// How long the HTTP/JSON facade waits for a request's headers when `[api] http_header_timeout`
/// is absent.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections the HTTP/JSON facade keeps open when `[api] http_max_connections` is
/// absent.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 256;
/// The store path used when `[store] path` is absent.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/mpool/mpool.redb";
/// The instance-name prefix used when `[engine] name_prefix` is absent.
pub const DEFAULT_NAME_PREFIX: &str = "mpool-";
/// The longest pool name. VM names are prefix + pool + suffix and must stay hostnames of at
/// most 63 characters.
pub const MAX_POOL_NAME_LEN: usize = 20;
/// The longest `[engine] name_prefix` (same reason as [`MAX_POOL_NAME_LEN`]).
pub const MAX_PREFIX_LEN: usize = 20;

/// The whole configuration, validated, with defaults filled in and paths resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `[daemon]`: how to reach and trust multipassd.
    pub daemon: DaemonConfig,
    /// `[api]`: where mpool's own API listens.
    pub api: ApiConfig,
    /// `[store]`: mpool's database.
    pub store: StoreConfig,
    /// `[engine]`: instance naming and the reconcile loop.
    pub engine: EngineConfig,
    /// `[isolation]`: the host's isolation rules (`mpool isolation rules`).
    pub isolation: IsolationConfig,
    /// `[host]`: the Multipass host's capacity, where the daemon does not report it.
    pub host: HostConfig,
    /// `[[pools]]`: at least one pool, names unique.
    pub pools: Vec<PoolConfig>,
}

/// `[daemon]`: how to reach multipassd and how to trust it. Every key is optional.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonConfig {
    /// `address`: `unix:PATH` or `HOST:PORT`; `None` discovers the daemon
    /// (`$MULTIPASS_SERVER_ADDRESS`, the snap socket, `/run/multipass_socket`).
    pub address: Option<String>,
    /// `passphrase_file`: a file whose first line is multipassd's `local.passphrase`, used to
    /// authenticate when the daemon does not trust mpool's client certificate yet.
    pub passphrase_file: Option<PathBuf>,
    /// `root_cert`: verify the daemon against this root CA (exclusive with `pin_cert` and
    /// `insecure_skip_verify`).
    pub root_cert: Option<PathBuf>,
    /// `pin_cert`: accept exactly this daemon certificate (exclusive with `root_cert` and
    /// `insecure_skip_verify`).
    pub pin_cert: Option<PathBuf>,
    /// `insecure_skip_verify`: do not verify the daemon's certificate (default false).
    pub insecure_skip_verify: bool,
    /// `client_cert`: the client certificate to present (together with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// `client_key`: the PKCS#8 key of `client_cert` (together with `client_cert`).
    pub client_key: Option<PathBuf>,
    /// `allow_untested_daemon`: talk to multipassd versions outside the tested range (default false).
    pub allow_untested_daemon: bool,
    /// `data_dir`: mpool's own files (its generated client certificate); `None` uses the CLI's
    /// default data dir.
    pub data_dir: Option<PathBuf>,
    /// `call_timeout` (default 30s): deadline of quick daemon calls (list, info, version, ssh_info).
    pub call_timeout: Duration,
    /// `blocking_call_timeout` (default 120s): deadline of calls that take the daemon's lock or
    /// boot a VM (stop, suspend, snapshot, restore, clone, delete, start, launch).
    pub blocking_call_timeout: Duration,
    /// `max_in_flight` (default 8, 1-256): daemon calls mpool has open at once; more wait for a
    /// slot (within their deadline). Few calls in flight narrow multipassd's abort when a log
    /// line races a handler (reference §0.3).
    pub max_in_flight: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            address: None,
            passphrase_file: None,
            root_cert: None,
            pin_cert: None,
            insecure_skip_verify: false,
            client_cert: None,
            client_key: None,
            allow_untested_daemon: false,
            data_dir: None,
            call_timeout: Duration::from_secs(30),
            blocking_call_timeout: Duration::from_secs(120),
            max_in_flight: mpool_multipass::DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl DaemonConfig {
    /// How the client should verify the daemon, from `root_cert`, `pin_cert` and
    /// `insecure_skip_verify` (validation makes them exclusive).
    pub fn server_verification(&self) -> ServerVerification {
        match (&self.root_cert, &self.pin_cert, self.insecure_skip_verify) {
            (Some(p), _, _) => ServerVerification::RootCert(p.clone()),
            (_, Some(p), _) => ServerVerification::Pin(p.clone()),
            (_, _, true) => ServerVerification::InsecureSkipVerify,
            _ => ServerVerification::Auto,
        }
    }

    /// Which client certificate to present: `client_cert`/`client_key` when given, else automatic.
    pub fn client_identity(&self) -> ClientIdentity {
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => ClientIdentity::Files { cert: cert.clone(), key: key.clone() },
            _ => ClientIdentity::Auto,
        }
    }
}

/// `[api]`: where mpool's gRPC API (and its optional companions) listen.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiConfig {
    /// `listen` (default `["unix:/run/mpool/mpool.sock"]`): at least one of `unix:PATH` or
    /// `IP:PORT` (IPv6 as `[::1]:PORT`); no duplicates.
    pub listen: Vec<Listen>,
    /// `tls_cert`: serve TLS on TCP listeners with this certificate chain (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`: the key of `tls_cert` (with `tls_cert`).
    pub tls_key: Option<PathBuf>,
    /// `client_ca`: require client certificates signed by this CA (mutual TLS; needs `tls_cert`).
    pub client_ca: Option<PathBuf>,
    /// `tokens_file`: bearer tokens accepted by the API.
    pub tokens_file: Option<PathBuf>,
    /// `metrics_listen`: where Prometheus metrics are served (`IP:PORT`); `None` disables them.
    pub metrics_listen: Option<SocketAddr>,
    /// `http_listen`: the HTTP/JSON facade (`unix:PATH` or `IP:PORT`); `None` disables it.
    pub http_listen: Option<Listen>,
    /// `http_header_timeout` (default 30s, more than 0): the HTTP/JSON facade drops a connection
    /// whose TLS handshake or request headers do not arrive within it, and one left idle as long.
    pub http_header_timeout: Duration,
    /// `http_max_connections` (default 256, 1-65536): connections the HTTP/JSON facade keeps
    /// open at once; more wait, unaccepted, until one closes.
    pub http_max_connections: usize,
    /// `max_upload` (default `1G`): the largest file an Upload (or all inputs of a Run together)
    /// may write, in bytes; at least 1.
    pub max_upload: u64,
    /// `max_download` (default `1G`): the largest file a Download (or one output of a Run) may
    /// read, in bytes, checked against the file's size before reading; at least 1.
    pub max_download: u64,
    /// `session_output_cap` (default `8M`, at least `32K`): the output a session keeps in its VM
    /// per stream, the first half and the last half of it; bytes in between are dropped (Attach
    /// reports where).
    pub session_output_cap: u64,
    /// `host_name` (default: the machine's hostname): the name this host goes by in a fleet of
    /// mpool hosts, reported by GetPool, ListPools, `mpool status` and as the `host` label of
    /// every metric. 1 to 63 letters, digits, `.`, `_` or `-` ([`check_host_name`]).
    pub host_name: String,
}

impl ApiConfig {
    /// Every TCP listener (gRPC, HTTP, metrics), each with its config key.
    pub fn tcp_listeners(&self) -> Vec<(String, SocketAddr)> {
        let mut out: Vec<(String, SocketAddr)> = Vec::new();
        for (i, l) in self.listen.iter().enumerate() {
            if let Listen::Tcp(a) = l {
                out.push((format!("api.listen[{i}]"), *a));
            }
        }
        if let Some(Listen::Tcp(a)) = &self.http_listen {
            out.push(("api.http_listen".into(), *a));
        }
        if let Some(a) = self.metrics_listen {
            out.push(("api.metrics_listen".into(), a));
        }
        out
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: vec![Listen::Unix(PathBuf::from(DEFAULT_LISTEN.trim_start_matches("unix:")))],
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            tokens_file: None,
            metrics_listen: None,
            http_listen: None,
            http_header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            http_max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
            max_upload: DEFAULT_MAX_UPLOAD,
            max_download: DEFAULT_MAX_UPLOAD,
            session_output_cap: DEFAULT_SESSION_OUTPUT_CAP,
            host_name: machine_host_name(),
        }
    }
}

/// The longest `[api] host_name`.
pub const MAX_HOST_NAME_LEN: usize = 63;

/// Checks a host name (`[api] host_name`): 1 to [`MAX_HOST_NAME_LEN`] ASCII letters, digits,
/// `.`, `_` or `-`, so it is safe as a metric label, in a lease handle and in a URL path.
pub fn check_host_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_HOST_NAME_LEN {
        return Err(format!("must be 1 to {MAX_HOST_NAME_LEN} characters long"));
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(format!("{c:?} is not allowed: use letters, digits, '.', '_' or '-'")),
        None => Ok(()),
    }
}

/// The machine's hostname (the kernel's), or `localhost` when it cannot be read or is not a
/// valid [`check_host_name`] name.
pub fn machine_host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| check_host_name(s).is_ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A listening address: `unix:PATH` or an IP socket address (`127.0.0.1:7070`, `[::1]:7070`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Listen {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP socket address.
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = String;

    /// Parses `unix:PATH` or `IP:PORT`; host names are not resolved.
    fn from_str(s: &str) -> Result<Listen, String> {
        let t = s.trim();
        if let Some(path) = t.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: `unix:` needs a socket path, e.g. \"unix:/run/mpool/mpool.sock\""));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        t.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!(
                "{s:?} is not a listen address: write \"unix:PATH\" or an IP address and port such as \
                 \"127.0.0.1:7070\" or \"[::1]:7070\" (host names are not resolved)"
            )
        })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// `[store]`: mpool's database.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreConfig {
    /// `path` (default `/var/lib/mpool/mpool.redb`): the redb file of VMs, leases and pools.
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { path: PathBuf::from(DEFAULT_STORE_PATH) }
    }
}

/// `[engine]`: how mpool names its instances and how often it reconciles.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// `name_prefix` (default `mpool-`): every instance mpool creates starts with it. A letter
    /// first, then `[a-zA-Z0-9-]`, at most [`MAX_PREFIX_LEN`] characters.
    pub name_prefix: String,
    /// `delete_strays` (default true): delete instances with our prefix that the store has no
    /// record of.
    pub delete_strays: bool,
    /// `reconcile_interval` (default 5s): how often pools are brought back to their targets.
    pub reconcile_interval: Duration,
    /// `health_interval` (default 30s): how often ready VMs are checked.
    pub health_interval: Duration,
    /// `shutdown_grace` (default 30s): how long shutdown waits for in-flight work.
    pub shutdown_grace: Duration,
    /// `gc_interval` (default 10m, 0: off): how often cleanup (`mpool gc`) runs on its own.
    pub gc_interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            name_prefix: DEFAULT_NAME_PREFIX.to_string(),
            delete_strays: true,
            reconcile_interval: Duration::from_secs(5),
            health_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            gc_interval: Duration::from_secs(600),
        }
    }
}

/// `[host]`: what mpool watches of the Multipass host's capacity, and the facts older daemons
/// do not report. Every key is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostConfig {
    /// `data_dir`: multipassd's data directory, whose filesystem's free space is the host's
    /// free disk; `None` discovers it (`$MULTIPASS_STORAGE/data`, the snap's
    /// `/var/snap/multipass/common/data/multipassd`, `/root/.local/share/multipassd`).
    pub data_dir: Option<PathBuf>,
    /// `disk`: the data volume's total size, for daemons older than 1.15 (which do not report it).
    pub disk: Option<u64>,
    /// `cpus`: the host's CPUs, for daemons older than 1.15.1.
    pub cpus: Option<u32>,
    /// `memory`: the host's memory in bytes, for daemons older than 1.15.1.
    pub memory: Option<u64>,
    /// `min_free_disk`: no new VM while the data volume has less free space (default: off).
    pub min_free_disk: Option<u64>,
    /// `cpu_overcommit`: the pools' VMs may have this many times the host's CPUs (default: off).
    pub cpu_overcommit: Option<f64>,
    /// `memory_overcommit`: the pools' VMs may have this many times the host's memory (default: off).
    pub memory_overcommit: Option<f64>,
}

/// `[isolation]`: what `mpool isolation rules` generates the host's nftables rules for, and
/// how often mpool measures that they hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsolationConfig {
    /// `bridge` (default: Multipass's `mpqemubr0`): the bridge the instances are on; a Linux
    /// interface name of `[A-Za-z0-9_.-]`, at most 15 characters.
    pub bridge: Option<String>,
    /// `allow_host_ports` (default none): TCP ports on the host the instances may reach besides
    /// DHCP and DNS (e.g. a package cache), each 1-65535; sorted, without duplicates.
    pub allow_host_ports: Vec<u16>,
    /// `probe_interval` (default 5m; "0" turns the probe off): how often an idle VM checks
    /// that it can reach neither another VM nor the host (see `require_isolation`).
    pub probe_interval: Duration,
}

impl IsolationConfig {
    /// The configured bridge (or Multipass's default), read from this host's interfaces;
    /// `None` when the host has no such bridge (the simulator's VMs use none).
    pub fn detect_bridge(&self) -> Option<mpool_isolation::Bridge> {
        mpool_isolation::Bridge::detect(self.bridge.as_deref().unwrap_or(mpool_isolation::DEFAULT_BRIDGE)).ok()
    }
}

impl Default for IsolationConfig {
    fn default() -> IsolationConfig {
        IsolationConfig { bridge: None, allow_host_ports: Vec::new(), probe_interval: Duration::from_secs(300) }
    }
}

/// One problem found while validating a config: where and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    /// The key path, e.g. `api.listen[1]` or `pools[1] ("ci").max_size`.
    pub key: String,
    /// The 1-based line of the offending value (or of the table missing a key), when known.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}; check the path given to --config and that mpool may read it", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid TOML, a key is unknown, or a value has the wrong type.
    #[error("{file}: {message}\nFix the key or value shown above; every key is documented in deploy/mpool.toml.")]
    Syntax {
        /// The config file (or `config` for text without a file).
        file: String,
        /// toml's message, with line, column and the offending key.
        message: String,
    },
    /// Values are well-formed TOML but break the rules; every problem is listed.
    #[error("{file}: {}", IssuesDisplay(issues))]
    Invalid {
        /// The config file (or `config` for text without a file).
        file: String,
        /// The problems, by line (those without a line last).
        issues: Vec<Issue>,
    },
}

impl ConfigError {
    /// The validation problems (empty for read and syntax errors).
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid { issues, .. } => issues,
            _ => &[],
        }
    }
}

struct IssuesDisplay<'a>(&'a [Issue]);

impl fmt::Display for IssuesDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems:", many.len())?;
                for issue in many {
                    write!(f, "\n  {issue}")?;
                }
                Ok(())
            }
        }
    }
}

impl Config {
    /// Reads, parses and validates the config file at `path`; relative paths in it resolve
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = match absolute.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        parse_named(&text, &base, &path.display().to_string())
    }

    /// Parses and validates config text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        parse_named(text, base_dir, "config")
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// Parses a duration: one or more `<digits><unit>` parts with units `ms`, `s`, `m`, `h`, `d`
/// (`250ms`, `30s`, `5m`, `1h30m`, `2d`), or a plain `0`. Negative, fractional, unit-less,
/// empty and overflowing values are refused with a message saying what to write instead.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let example = "write a number with a unit (ms, s, m, h, d) such as \"30s\", \"5m\" or \"1h30m\"";
    if t.is_empty() {
        return Err(format!("empty duration; {example}"));
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.starts_with('-') {
        return Err(format!("{s:?} is negative; durations must be 0 or more"));
    }
    if t.contains('.') || t.contains(',') {
        return Err(format!("{s:?}: fractions are not supported; combine units instead, e.g. \"1h30m\" or \"1500ms\""));
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{s:?} is not a duration; {example}"));
        }
        let (num, after) = rest.split_at(digits);
        let unit_len = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let millis_per: u64 = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{s:?} has no unit; {example}")),
            other => return Err(format!("{s:?}: unknown unit {other:?}; {example}")),
        };
        let overflow = || format!("{s:?} is too large");
        let n: u64 = num.parse().map_err(|_| overflow())?;
        let part = n.checked_mul(millis_per).ok_or_else(overflow)?;
        total = total.checked_add(part).ok_or_else(overflow)?;
        rest = next;
    }
    Ok(Duration::from_millis(total))
}

/// Formats a duration the way [`parse_duration`] reads it (`1h30m`, `250ms`, `0s`); below a
/// millisecond is dropped.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Raw tables: what serde reads. Every key optional, unknown keys rejected, spans kept so
// validation can name the line.

type Field<T> = Option<Spanned<T>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    isolation: RawIsolation,
    #[serde(default)]
    host: RawHost,
    #[serde(default)]
    pools: Vec<Spanned<RawPool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    address: Field<String>,
    passphrase_file: Field<String>,
    root_cert: Field<String>,
    pin_cert: Field<String>,
    insecure_skip_verify: Field<bool>,
    client_cert: Field<String>,
    client_key: Field<String>,
    allow_untested_daemon: Option<bool>,
    data_dir: Field<String>,
    call_timeout: Field<RawDuration>,
    blocking_call_timeout: Field<RawDuration>,
    max_in_flight: Field<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Field<Vec<Spanned<String>>>,
    tls_cert: Field<String>,
    tls_key: Field<String>,
    client_ca: Field<String>,
    tokens_file: Field<String>,
    metrics_listen: Field<String>,
    http_listen: Field<String>,
    http_header_timeout: Field<RawDuration>,
    http_max_connections: Field<u32>,
    max_upload: Field<String>,
    max_download: Field<String>,
    session_output_cap: Field<String>,
    host_name: Field<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Field<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    name_prefix: Field<String>,
    delete_strays: Option<bool>,
    reconcile_interval: Field<RawDuration>,
    health_interval: Field<RawDuration>,
    shutdown_grace: Field<RawDuration>,
    gc_interval: Field<RawDuration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHost {
    data_dir: Field<String>,
    disk: Field<String>,
    cpus: Field<i64>,
    memory: Field<String>,
    min_free_disk: Field<String>,
    cpu_overcommit: Field<f64>,
    memory_overcommit: Field<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIsolation {
    bridge: Field<String>,
    allow_host_ports: Option<Vec<Spanned<i64>>>,
    probe_interval: Field<RawDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Field<String>,
    image: Field<String>,
    cpus: Field<u32>,
    memory: Field<String>,
    disk: Field<String>,
    cloud_init: Field<String>,
    cloud_init_file: Field<String>,
    setup: Option<Vec<String>>,
    min_ready: Field<u32>,
    hot: Field<u32>,
    max_size: Field<u32>,
    reset: Option<ResetStrategy>,
    max_uses: Option<u32>,
    max_disk_usage: Field<String>,
    default_ttl: Field<RawDuration>,
    max_ttl: Field<RawDuration>,
    max_wait: Field<RawDuration>,
    readiness_timeout: Field<RawDuration>,
    idle_timeout: Field<RawDuration>,
    max_leases_per_owner: Option<u32>,
    autoscale: Option<Autoscale>,
    autoscale_decay: Field<RawDuration>,
    require_isolation: Option<bool>,
    schedule: Option<Vec<Spanned<RawSchedule>>>,
    rebuild_every: Field<RawDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    periods: Option<Vec<Spanned<String>>>,
    min_ready: Field<u32>,
    timezone: Field<String>,
}

/// A duration as written: a string, checked by [`parse_duration`] during validation. A bare
/// number is refused here so toml's error shows where, with a hint.
struct RawDuration(String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string with a unit, such as \"30s\", \"5m\" or \"1h30m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

fn parse_named(text: &str, base_dir: &Path, file: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text)
        .map_err(|e| ConfigError::Syntax { file: file.to_string(), message: e.to_string().trim_end().to_string() })?;
    let mut check = Checker { text, base: base_dir, issues: Vec::new() };
    let config = check.config(raw);
    check.issues.sort_by_key(|issue| issue.line.unwrap_or(usize::MAX));
    if check.issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid { file: file.to_string(), issues: check.issues })
    }
}

struct Checker<'a> {
    text: &'a str,
    base: &'a Path,
    issues: Vec<Issue>,
}

impl Checker<'_> {
    fn line(&self, span: Range<usize>) -> Option<usize> {
        let end = span.start.min(self.text.len());
        let prefix = self.text.get(..end)?;
        Some(prefix.bytes().filter(|b| *b == b'\n').count() + 1)
    }

    fn fail(&mut self, key: &str, span: Option<Range<usize>>, message: impl Into<String>) {
        let line = span.and_then(|s| self.line(s));
        self.issues.push(Issue { key: key.to_string(), line, message: message.into() });
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    fn path(&mut self, key: &str, v: &Field<String>) -> Option<PathBuf> {
        let v = v.as_ref()?;
        if v.get_ref().trim().is_empty() {
            self.fail(key, Some(v.span()), "empty path; give a file path or remove the key");
            return None;
        }
        Some(self.resolve(v.get_ref()))
    }

    fn duration(&mut self, key: &str, v: &Field<RawDuration>, default: Duration, positive: bool) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(&v.get_ref().0) {
            Ok(d) if positive && d.is_zero() => {
                self.fail(
                    key,
                    Some(v.span()),
                    format!("must be more than 0; the default is {}", format_duration(default)),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.fail(key, Some(v.span()), e);
                default
            }
        }
    }

    fn listen(&mut self, key: &str, v: &Spanned<String>) -> Option<Listen> {
        match v.get_ref().parse::<Listen>() {
            Ok(Listen::Unix(p)) => Some(Listen::Unix(self.resolve(&p.to_string_lossy()))),
            Ok(tcp) => Some(tcp),
            Err(e) => {
                self.fail(key, Some(v.span()), e);
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let daemon = self.daemon(raw.daemon);
        let api = self.api(raw.api);
        let store = StoreConfig {
            path: self.path("store.path", &raw.store.path).unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)),
        };
        let engine = self.engine(raw.engine);
        let isolation = self.isolation(raw.isolation);
        let host = self.host(raw.host);
        if raw.pools.is_empty() {
            self.fail(
                "pools",
                None,
                "no pools are configured; add at least one [[pools]] table, e.g.\n    [[pools]]\n    name = \"ci\"",
            );
        }
        let mut pools: Vec<PoolConfig> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, raw_pool) in raw.pools.into_iter().enumerate() {
            let span = raw_pool.span();
            let name_span = raw_pool.get_ref().name.as_ref().map_or(span.clone(), |n| n.span());
            let span_of_pool = span.clone();
            let pool = self.pool(i, span, raw_pool.into_inner());
            if !pool.name.is_empty() {
                if let Some(first) = seen.get(&pool.name) {
                    self.fail(
                        &format!("pools[{i}] ({:?}).name", pool.name),
                        Some(name_span),
                        format!(
                            "duplicate pool name; pools[{first}] is already called {:?}; pool names must be unique",
                            pool.name
                        ),
                    );
                } else {
                    seen.insert(pool.name.clone(), i);
                }
            }
            if pool.require_isolation && isolation.probe_interval.is_zero() {
                self.fail(
                    &format!("pools[{i}] ({:?}).require_isolation", pool.name),
                    Some(span_of_pool.clone()),
                    "needs the isolation probe, which [isolation] probe_interval = \"0\" turns off; set a probe_interval (default 5m) or drop require_isolation",
                );
            }
            pools.push(pool);
        }
        Config { daemon, api, store, engine, isolation, host, pools }
    }

    fn host(&mut self, raw: RawHost) -> HostConfig {
        let cpus = raw.cpus.and_then(|c| match u32::try_from(*c.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.fail(
                    "host.cpus",
                    Some(c.span()),
                    format!("{} is not a CPU count; give a number of at least 1", c.get_ref()),
                );
                None
            }
        });
        HostConfig {
            data_dir: self.path("host.data_dir", &raw.data_dir),
            disk: raw.disk.as_ref().map(|_| self.size_limit("host.disk", &raw.disk, 0)).filter(|b| *b > 0),
            cpus,
            memory: raw.memory.as_ref().map(|_| self.size_limit("host.memory", &raw.memory, 0)).filter(|b| *b > 0),
            min_free_disk: raw
                .min_free_disk
                .as_ref()
                .map(|_| self.size_limit("host.min_free_disk", &raw.min_free_disk, 0))
                .filter(|b| *b > 0),
            cpu_overcommit: self.ratio("host.cpu_overcommit", &raw.cpu_overcommit),
            memory_overcommit: self.ratio("host.memory_overcommit", &raw.memory_overcommit),
        }
    }

    /// An overcommit ratio: a number above 0 (e.g. 1 = no overcommit, 4 = four times).
    fn ratio(&mut self, key: &str, raw: &Field<f64>) -> Option<f64> {
        let v = raw.as_ref()?;
        let r = *v.get_ref();
        if r.is_finite() && r > 0.0 {
            Some(r)
        } else {
            self.fail(
                key,
                Some(v.span()),
                format!("{r} is not a ratio; give a number above 0, e.g. 1 (no overcommit) or 4"),
            );
            None
        }
    }

    fn isolation(&mut self, raw: RawIsolation) -> IsolationConfig {
        let bridge = raw.bridge.and_then(|b| match mpool_isolation::bridge::check_name(b.get_ref()) {
            Ok(()) => Some(b.into_inner()),
            Err(e) => {
                let reason = match e {
                    mpool_isolation::BridgeError::InvalidName { reason, .. } => reason,
                    _ => "is not an interface name",
                };
                self.fail(
                    "isolation.bridge",
                    Some(b.span()),
                    format!("{reason}; give the Multipass bridge's interface name (default \"mpqemubr0\", see `ip -br link`)"),
                );
                None
            }
        });
        let mut allow_host_ports = Vec::new();
        for (i, port) in raw.allow_host_ports.unwrap_or_default().iter().enumerate() {
            match u16::try_from(*port.get_ref()) {
                Ok(p) if p != 0 => allow_host_ports.push(p),
                _ => self.fail(
                    &format!("isolation.allow_host_ports[{i}]"),
                    Some(port.span()),
                    format!("{} is not a TCP port; give a number from 1 to 65535", port.get_ref()),
                ),
            }
        }
        allow_host_ports.sort_unstable();
        allow_host_ports.dedup();
        let default = IsolationConfig::default().probe_interval;
        let probe_interval = self.duration("isolation.probe_interval", &raw.probe_interval, default, false);
        IsolationConfig { bridge, allow_host_ports, probe_interval }
    }

    fn daemon(&mut self, raw: RawDaemon) -> DaemonConfig {
        let d = DaemonConfig::default();
        let address = raw.address.as_ref().and_then(|a| match DaemonAddress::parse(a.get_ref()) {
            Ok(DaemonAddress::Unix(p)) => Some(format!("unix:{}", self.resolve(&p.to_string_lossy()).display())),
            Ok(_) => Some(a.get_ref().trim().to_string()),
            Err(e) => {
                self.fail(
                    "daemon.address",
                    Some(a.span()),
                    format!("{e} (e.g. \"unix:/var/snap/multipass/common/multipass_socket\" or \"localhost:50051\")"),
                );
                None
            }
        });
        let root_cert = self.path("daemon.root_cert", &raw.root_cert);
        let pin_cert = self.path("daemon.pin_cert", &raw.pin_cert);
        let insecure = raw.insecure_skip_verify.as_ref().map(|s| (*s.get_ref(), s.span()));
        let insecure_skip_verify = insecure.as_ref().is_some_and(|(b, _)| *b);
        if let (Some(_), Some(pin)) = (&raw.root_cert, &raw.pin_cert) {
            self.fail(
                "daemon.pin_cert",
                Some(pin.span()),
                "daemon.root_cert and daemon.pin_cert are exclusive; keep root_cert (multipassd 1.16+) or pin_cert, not both",
            );
        }
        if let Some((true, span)) = insecure
            && (raw.root_cert.is_some() || raw.pin_cert.is_some())
        {
            self.fail(
                "daemon.insecure_skip_verify",
                Some(span),
                "contradicts daemon.root_cert/daemon.pin_cert, which ask for verification; remove one of them",
            );
        }
        let client_cert = self.path("daemon.client_cert", &raw.client_cert);
        let client_key = self.path("daemon.client_key", &raw.client_key);
        match (&raw.client_cert, &raw.client_key) {
            (Some(c), None) => self.fail(
                "daemon.client_key",
                Some(c.span()),
                "missing: daemon.client_cert is set, so give daemon.client_key too (or remove client_cert to use the automatic certificate)",
            ),
            (None, Some(k)) => self.fail(
                "daemon.client_cert",
                Some(k.span()),
                "missing: daemon.client_key is set, so give daemon.client_cert too (or remove client_key to use the automatic certificate)",
            ),
            _ => {}
        }
        DaemonConfig {
            address,
            passphrase_file: self.path("daemon.passphrase_file", &raw.passphrase_file),
            root_cert,
            pin_cert,
            insecure_skip_verify,
            client_cert,
            client_key,
            allow_untested_daemon: raw.allow_untested_daemon.unwrap_or(false),
            data_dir: self.path("daemon.data_dir", &raw.data_dir),
            call_timeout: self.duration("daemon.call_timeout", &raw.call_timeout, d.call_timeout, true),
            blocking_call_timeout: self.duration(
                "daemon.blocking_call_timeout",
                &raw.blocking_call_timeout,
                d.blocking_call_timeout,
                true,
            ),
            max_in_flight: match &raw.max_in_flight {
                None => d.max_in_flight,
                Some(v) if (1..=256).contains(v.get_ref()) => *v.get_ref() as usize,
                Some(v) => {
                    self.fail("daemon.max_in_flight", Some(v.span()), "must be between 1 and 256");
                    d.max_in_flight
                }
            },
        }
    }

    fn api(&mut self, raw: RawApi) -> ApiConfig {
        let d = ApiConfig::default();
        let mut listen = Vec::new();
        let mut tcp_used: HashMap<SocketAddr, String> = HashMap::new();
        match &raw.listen {
            None => listen = d.listen.clone(),
            Some(list) if list.get_ref().is_empty() => self.fail(
                "api.listen",
                Some(list.span()),
                format!(
                    "empty; give at least one address, e.g. [\"{DEFAULT_LISTEN}\"] (or remove the key for that default)"
                ),
            ),
            Some(list) => {
                for (i, entry) in list.get_ref().iter().enumerate() {
                    let key = format!("api.listen[{i}]");
                    let Some(l) = self.listen(&key, entry) else { continue };
                    if let Some(j) = listen.iter().position(|x| *x == l) {
                        self.fail(
                            &key,
                            Some(entry.span()),
                            format!("{l} is already listed as api.listen[{j}]; remove the duplicate"),
                        );
                        continue;
                    }
                    if let Listen::Tcp(a) = l
                        && a.port() != 0
                    {
                        tcp_used.insert(a, key.clone());
                    }
                    listen.push(l);
                }
            }
        }
        let tls_cert = self.path("api.tls_cert", &raw.tls_cert);
        let tls_key = self.path("api.tls_key", &raw.tls_key);
        match (&raw.tls_cert, &raw.tls_key) {
            (Some(c), None) => self.fail(
                "api.tls_key",
                Some(c.span()),
                "missing: api.tls_cert is set, so give api.tls_key (its private key) too",
            ),
            (None, Some(k)) => self.fail(
                "api.tls_cert",
                Some(k.span()),
                "missing: api.tls_key is set, so give api.tls_cert (its certificate chain) too, or remove tls_key",
            ),
            _ => {}
        }
        let client_ca = self.path("api.client_ca", &raw.client_ca);
        if let Some(ca) = &raw.client_ca
            && raw.tls_cert.is_none()
        {
            self.fail(
                "api.client_ca",
                Some(ca.span()),
                "client certificates need TLS: set api.tls_cert and api.tls_key, or remove client_ca",
            );
        }
        let metrics_listen = raw.metrics_listen.as_ref().and_then(|m| match m.get_ref().trim().parse::<SocketAddr>() {
            Ok(a) => Some((a, m.span())),
            Err(_) => {
                self.fail(
                    "api.metrics_listen",
                    Some(m.span()),
                    format!(
                        "{:?} is not an IP address and port; write e.g. \"127.0.0.1:9090\" or \"[::1]:9090\"",
                        m.get_ref()
                    ),
                );
                None
            }
        });
        let http_listen =
            raw.http_listen.as_ref().and_then(|h| self.listen("api.http_listen", h).map(|l| (l, h.span())));
        if let Some((Listen::Tcp(a), span)) = &http_listen
            && a.port() != 0
        {
            if let Some(other) = tcp_used.get(a) {
                self.fail(
                    "api.http_listen",
                    Some(span.clone()),
                    format!("{a} is already used by {other}; pick another port"),
                );
            } else {
                tcp_used.insert(*a, "api.http_listen".to_string());
            }
        }
        if let Some((Listen::Unix(p), span)) = &http_listen
            && listen.contains(&Listen::Unix(p.clone()))
        {
            self.fail(
                "api.http_listen",
                Some(span.clone()),
                format!("unix:{} is already used by api.listen; pick another socket path", p.display()),
            );
        }
        if let Some((a, span)) = &metrics_listen
            && let Some(other) = tcp_used.get(a)
        {
            self.fail(
                "api.metrics_listen",
                Some(span.clone()),
                format!("{a} is already used by {other}; pick another port"),
            );
        }
        let http_header_timeout =
            self.duration("api.http_header_timeout", &raw.http_header_timeout, d.http_header_timeout, true);
        let http_max_connections = match &raw.http_max_connections {
            None => d.http_max_connections,
            Some(v) if (1..=65536).contains(v.get_ref()) => *v.get_ref() as usize,
            Some(v) => {
                self.fail(
                    "api.http_max_connections",
                    Some(v.span()),
                    format!("must be between 1 and 65536; the default is {DEFAULT_HTTP_MAX_CONNECTIONS}"),
                );
                d.http_max_connections
            }
        };
        let max_upload = self.size_limit("api.max_upload", &raw.max_upload, d.max_upload);
        let max_download = self.size_limit("api.max_download", &raw.max_download, d.max_download);
        let mut session_output_cap =
            self.size_limit("api.session_output_cap", &raw.session_output_cap, d.session_output_cap);
        if session_output_cap < 32 * 1024 {
            let span = raw.session_output_cap.as_ref().map(|f| f.span());
            self.fail("api.session_output_cap", span, format!("{session_output_cap} bytes: use at least 32K"));
            session_output_cap = d.session_output_cap;
        }
        let host_name = match &raw.host_name {
            None => d.host_name,
            Some(h) => match check_host_name(h.get_ref()) {
                Ok(()) => h.get_ref().clone(),
                Err(e) => {
                    self.fail("api.host_name", Some(h.span()), format!("{:?}: {e}", h.get_ref()));
                    d.host_name
                }
            },
        };
        ApiConfig {
            listen,
            tls_cert,
            tls_key,
            client_ca,
            tokens_file: self.path("api.tokens_file", &raw.tokens_file),
            metrics_listen: metrics_listen.map(|(a, _)| a),
            http_listen: http_listen.map(|(l, _)| l),
            http_header_timeout,
            http_max_connections,
            max_upload,
            max_download,
            session_output_cap,
            host_name,
        }
    }

    /// A byte limit such as `max_upload`: a size of at least 1 byte, else `default`.
    fn size_limit(&mut self, key: &str, raw: &Field<String>, default: u64) -> u64 {
        match raw {
            None => default,
            Some(v) => match parse_size(v.get_ref()) {
                Some(b) if b > 0 => b,
                Some(_) => {
                    self.fail(key, Some(v.span()), "must be at least 1 byte");
                    default
                }
                None => {
                    self.fail(
                        key,
                        Some(v.span()),
                        format!(
                            "{:?} is not a size; write a number with K, M, G or T (e.g. \"64M\", \"1G\"), or plain digits for bytes",
                            v.get_ref()
                        ),
                    );
                    default
                }
            },
        }
    }

    fn engine(&mut self, raw: RawEngine) -> EngineConfig {
        let d = EngineConfig::default();
        let name_prefix = match &raw.name_prefix {
            None => d.name_prefix.clone(),
            Some(p) => {
                let s = p.get_ref();
                let problem = if s.is_empty() {
                    Some("empty".to_string())
                } else if !s.starts_with(|c: char| c.is_ascii_alphabetic()) {
                    Some(format!("{s:?} does not start with a letter"))
                } else if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
                    Some(format!("{s:?} contains {c:?}"))
                } else if s.len() > MAX_PREFIX_LEN {
                    Some(format!("{s:?} is {} characters long, more than {MAX_PREFIX_LEN}", s.len()))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    self.fail(
                        "engine.name_prefix",
                        Some(p.span()),
                        format!(
                            "{problem}; instance names must be valid hostnames, so the prefix must start with a letter, \
                             use only letters, digits and '-', and be at most {MAX_PREFIX_LEN} characters (default \"{DEFAULT_NAME_PREFIX}\")"
                        ),
                    );
                }
                s.clone()
            }
        };
        EngineConfig {
            name_prefix,
            delete_strays: raw.delete_strays.unwrap_or(d.delete_strays),
            reconcile_interval: self.duration(
                "engine.reconcile_interval",
                &raw.reconcile_interval,
                d.reconcile_interval,
                true,
            ),
            health_interval: self.duration("engine.health_interval", &raw.health_interval, d.health_interval, true),
            shutdown_grace: self.duration("engine.shutdown_grace", &raw.shutdown_grace, d.shutdown_grace, false),
            gc_interval: self.duration("engine.gc_interval", &raw.gc_interval, d.gc_interval, false),
        }
    }

    fn pool(&mut self, i: usize, table: Range<usize>, raw: RawPool) -> PoolConfig {
        let mut p = PoolConfig::with_defaults("");
        let name = raw.name.as_ref().map(|n| n.get_ref().clone());
        let at = match &name {
            Some(n) => format!("pools[{i}] ({n:?})"),
            None => format!("pools[{i}]"),
        };
        let key = |k: &str| format!("{at}.{k}");

        match &raw.name {
            None => self.fail(&key("name"), Some(table.clone()), "missing; every pool needs a name such as \"ci\""),
            Some(n) => {
                let s = n.get_ref();
                let problem = if s.is_empty() {
                    Some("empty".to_string())
                } else if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
                    Some(format!("{s:?} does not start with a lowercase letter"))
                } else if let Some(c) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
                {
                    Some(format!("{s:?} contains {c:?}"))
                } else if s.len() > MAX_POOL_NAME_LEN {
                    Some(format!("{s:?} is {} characters long, more than {MAX_POOL_NAME_LEN}", s.len()))
                } else {
                    None
                };
                if let Some(problem) = problem {
                    self.fail(
                        &key("name"),
                        Some(n.span()),
                        format!(
                            "{problem}; pool names are part of VM hostnames: start with a lowercase letter, then use \
                             a-z, 0-9 and '-', at most {MAX_POOL_NAME_LEN} characters (e.g. \"ci\", \"build-arm\")"
                        ),
                    );
                }
                p.name = s.clone();
            }
        }

        if let Some(img) = &raw.image {
            if img.get_ref().trim().is_empty() {
                self.fail(
                    &key("image"),
                    Some(img.span()),
                    "empty; name a Multipass image such as \"24.04\" or remove the key",
                );
            } else if let Err(e) = mpool_multipass::ImageRef::parse(img.get_ref().trim()) {
                self.fail(&key("image"), Some(img.span()), e.to_string());
            } else {
                p.image = img.get_ref().trim().to_string();
            }
        }
        if let Some(c) = &raw.cpus {
            if *c.get_ref() == 0 {
                self.fail(&key("cpus"), Some(c.span()), "must be at least 1");
            } else {
                p.cpus = *c.get_ref();
            }
        }
        for (k, v, min, min_text) in
            [("memory", &raw.memory, MIN_MEMORY, "128M"), ("disk", &raw.disk, MIN_DISK, "512M")]
        {
            let Some(v) = v else { continue };
            let s = v.get_ref();
            match parse_size(s) {
                None => self.fail(
                    &key(k),
                    Some(v.span()),
                    format!("{s:?} is not a size; write a number with K, M, G or T (e.g. \"512M\", \"1G\", \"1.5G\", \"2GiB\"), or plain digits for bytes"),
                ),
                Some(b) if b < min => self.fail(
                    &key(k),
                    Some(v.span()),
                    format!("{s:?} is below multipass's minimum of {min_text}; give at least {min_text}"),
                ),
                Some(_) => {
                    let s = s.trim().to_string();
                    if k == "memory" {
                        p.memory = s;
                    } else {
                        p.disk = s;
                    }
                }
            }
        }

        match (&raw.cloud_init, &raw.cloud_init_file) {
            (Some(_), Some(f)) => self.fail(
                &key("cloud_init_file"),
                Some(f.span()),
                "cloud_init and cloud_init_file are exclusive; keep the inline text or the file, not both",
            ),
            (Some(text), None) => p.cloud_init = Some(text.get_ref().clone()),
            (None, Some(f)) => {
                if f.get_ref().trim().is_empty() {
                    self.fail(
                        &key("cloud_init_file"),
                        Some(f.span()),
                        "empty path; give the cloud-init YAML file or remove the key",
                    );
                } else {
                    let path = self.resolve(f.get_ref());
                    match std::fs::read_to_string(&path) {
                        Ok(text) => p.cloud_init = Some(text),
                        Err(e) => self.fail(
                            &key("cloud_init_file"),
                            Some(f.span()),
                            format!(
                                "cannot read {}: {e}; create the file or fix the path (relative paths resolve against the config file's directory, {})",
                                path.display(),
                                self.base.display()
                            ),
                        ),
                    }
                }
            }
            (None, None) => {}
        }
        p.setup = raw.setup.unwrap_or_default();

        p.min_ready = raw.min_ready.as_ref().map_or(p.min_ready, |v| *v.get_ref());
        p.hot = raw.hot.as_ref().map_or(p.hot, |v| *v.get_ref());
        p.max_size = match &raw.max_size {
            None => p.min_ready.max(1),
            Some(v) if *v.get_ref() == 0 => {
                self.fail(
                    &key("max_size"),
                    Some(v.span()),
                    "must be at least 1 (a pool of size 0 can never lease a VM)",
                );
                p.min_ready.max(1)
            }
            Some(v) => *v.get_ref(),
        };
        if let Some(v) = &raw.max_size
            && *v.get_ref() != 0
            && p.min_ready > p.max_size
        {
            self.fail(
                &key("max_size"),
                Some(v.span()),
                format!(
                    "{} is less than min_ready ({}); raise max_size to at least {} or lower min_ready",
                    p.max_size, p.min_ready, p.min_ready
                ),
            );
        }
        if p.hot > p.min_ready {
            let span = raw.hot.as_ref().map(|h| h.span());
            self.fail(
                &key("hot"),
                span,
                format!(
                    "{} is more than min_ready ({}); hot VMs are the running part of the ready ones, so lower hot or raise min_ready to at least {}",
                    p.hot, p.min_ready, p.hot
                ),
            );
        }
        p.reset = raw.reset.unwrap_or_default();
        p.max_uses = raw.max_uses.unwrap_or(0);
        p.max_disk_usage = raw
            .max_disk_usage
            .as_ref()
            .map(|_| self.size_limit(&key("max_disk_usage"), &raw.max_disk_usage, 0))
            .filter(|b| *b > 0);

        p.default_ttl = self.duration(&key("default_ttl"), &raw.default_ttl, p.default_ttl, true);
        p.max_ttl = self.duration(&key("max_ttl"), &raw.max_ttl, p.max_ttl, true);
        if p.default_ttl > p.max_ttl {
            let span = raw.default_ttl.as_ref().or(raw.max_ttl.as_ref()).map(|d| d.span());
            self.fail(
                &key("default_ttl"),
                span,
                format!(
                    "{} is longer than max_ttl ({}); lower default_ttl or raise max_ttl",
                    format_duration(p.default_ttl),
                    format_duration(p.max_ttl)
                ),
            );
        }
        p.max_wait = self.duration(&key("max_wait"), &raw.max_wait, p.max_wait, false);
        p.readiness_timeout =
            self.duration(&key("readiness_timeout"), &raw.readiness_timeout, p.readiness_timeout, true);
        p.idle_timeout = self.duration(&key("idle_timeout"), &raw.idle_timeout, p.idle_timeout, false);
        p.max_leases_per_owner = raw.max_leases_per_owner.unwrap_or(0);
        p.autoscale = raw.autoscale.unwrap_or_default();
        p.autoscale_decay = self.duration(&key("autoscale_decay"), &raw.autoscale_decay, p.autoscale_decay, true);
        p.require_isolation = raw.require_isolation.unwrap_or(false);
        for (j, s) in raw.schedule.unwrap_or_default().into_iter().enumerate() {
            let (span, s) = (s.span(), s.into_inner());
            if let Some(schedule) = self.schedule(&key(&format!("schedule[{j}]")), span, s, p.max_size) {
                p.schedules.push(schedule);
            }
        }
        p.rebuild_every = raw
            .rebuild_every
            .as_ref()
            .map(|_| self.duration(&key("rebuild_every"), &raw.rebuild_every, Duration::ZERO, true))
            .filter(|d| !d.is_zero());
        p
    }

    /// One `[[pools.schedule]]`: periods that parse, a min_ready within max_size, UTC or local.
    fn schedule(&mut self, at: &str, table: Range<usize>, raw: RawSchedule, max_size: u32) -> Option<Schedule> {
        let mut ok = true;
        let periods = raw.periods.unwrap_or_default();
        if periods.is_empty() {
            self.fail(
                &format!("{at}.periods"),
                Some(table.clone()),
                "missing; give cron expressions with seconds, e.g. periods = [\"* * 8-17 * * mon-fri\"]",
            );
            ok = false;
        }
        let mut parsed = Vec::new();
        for (k, period) in periods.iter().enumerate() {
            match mpool_core::pool::schedule::parse_period(period.get_ref()) {
                Ok(p) => parsed.push(p),
                Err(e) => {
                    self.fail(&format!("{at}.periods[{k}]"), Some(period.span()), e);
                    ok = false;
                }
            }
        }
        let min_ready = match &raw.min_ready {
            None => {
                self.fail(
                    &format!("{at}.min_ready"),
                    Some(table),
                    "missing; how many ready VMs the pool keeps while a period matches",
                );
                return None;
            }
            Some(v) if *v.get_ref() > max_size => {
                self.fail(
                    &format!("{at}.min_ready"),
                    Some(v.span()),
                    format!(
                        "{} is more than the pool's max_size ({max_size}); lower it or raise max_size",
                        v.get_ref()
                    ),
                );
                return None;
            }
            Some(v) => *v.get_ref(),
        };
        let local = match raw.timezone.as_ref().map(|t| t.get_ref().as_str()) {
            None | Some("UTC") => false,
            Some("local") => true,
            Some(other) => {
                let span = raw.timezone.as_ref().map(|t| t.span());
                self.fail(
                    &format!("{at}.timezone"),
                    span,
                    format!(
                        "{other:?} is not supported; use \"UTC\" (the default) or \"local\" (the host's time zone)"
                    ),
                );
                return None;
            }
        };
        ok.then_some(Schedule { periods: parsed, min_ready, local })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/mpool"))
    }

    /// Parses `text`, expects a failure, returns its message.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("expected an error for:\n{text}\ngot {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_error(text: &str, needles: &[&str]) {
        let msg = error(text);
        for n in needles {
            assert!(msg.contains(n), "error for:\n{text}\nshould contain {n:?}, got:\n{msg}");
        }
    }

    const MIN: &str = "[[pools]]\nname = \"ci\"\n";

    #[test]
    fn host_reads_the_data_dir_the_facts_older_daemons_lack_and_the_limits() {
        let c = parse(&format!(
            "[host]\ndata_dir = \"/srv/mp\"\ndisk = \"100G\"\ncpus = 8\nmemory = \"16G\"\nmin_free_disk = \"20G\"\ncpu_overcommit = 4\nmemory_overcommit = 1.5\n{MIN}"
        ))
        .unwrap();
        assert_eq!(c.host.data_dir, Some(PathBuf::from("/srv/mp")));
        assert_eq!((c.host.disk, c.host.cpus, c.host.memory), (Some(100 << 30), Some(8), Some(16 << 30)));
        assert_eq!(
            (c.host.min_free_disk, c.host.cpu_overcommit, c.host.memory_overcommit),
            (Some(20 << 30), Some(4.0), Some(1.5))
        );
        assert_eq!(parse(MIN).unwrap().host, HostConfig::default());
        assert_error(
            &format!("[host]\ncpus = 0\nmemory = \"lots\"\ncpu_overcommit = 0\n{MIN}"),
            &[
                "line 2: host.cpus: 0 is not a CPU count",
                "host.memory",
                "is not a size",
                "host.cpu_overcommit: 0 is not a ratio",
            ],
        );
    }

    #[test]
    fn isolation_reads_the_bridge_and_the_allowed_ports_sorted_once() {
        let c = parse(&format!(
            "[isolation]\nbridge = \"br-lan\"\nallow_host_ports = [8080, 3142, 8080]\nprobe_interval = \"90s\"\n{MIN}"
        ))
        .unwrap();
        assert_eq!(c.isolation.bridge.as_deref(), Some("br-lan"));
        assert_eq!(c.isolation.allow_host_ports, [3142, 8080]);
        assert_eq!(c.isolation.probe_interval, Duration::from_secs(90));
    }

    #[test]
    fn isolation_refuses_bad_names_ports_and_unknown_keys_with_their_line() {
        assert_error(
            &format!("[isolation]\nbridge = \"tap-*\"\n{MIN}"),
            &["line 2: isolation.bridge", "letters, digits", "ip -br link"],
        );
        assert_error(
            &format!("[isolation]\nallow_host_ports = [22, 0, 70000]\n{MIN}"),
            &[
                "line 2: isolation.allow_host_ports[1]: 0 is not a TCP port",
                "isolation.allow_host_ports[2]: 70000",
                "1 to 65535",
            ],
        );
        assert_error(&format!("[isolation]\nsubnet = \"10.0.0.1/24\"\n{MIN}"), &["unknown field `subnet`"]);
        let pool = "[[pools]]\nname = \"ci\"\nmax_size = 3\n[[pools.schedule]]\n";
        assert_error(
            &format!("{pool}periods = [\"* 8-17 * * mon-fri\"]\nmin_ready = 2\n"),
            &["line 5: pools[0] (\"ci\").schedule[0].periods[0]", "with seconds"],
        );
        assert_error(
            &format!("{pool}periods = [\"* * 8-17 * * 1-5\"]\nmin_ready = 2\n"),
            &["schedule[0].periods[0]", "names (mon-fri"],
        );
        assert_error(
            &format!("{pool}periods = [\"* * 8-17 * * mon-fri\"]\nmin_ready = 4\n"),
            &["line 6: pools[0] (\"ci\").schedule[0].min_ready", "max_size (3)"],
        );
        assert_error(
            &format!("{pool}periods = [\"* * 8-17 * * mon-fri\"]\nmin_ready = 1\ntimezone = \"Europe/Berlin\"\n"),
            &["schedule[0].timezone", "\"local\""],
        );
        assert_error(&format!("{pool}min_ready = 1\n"), &["schedule[0].periods", "missing"]);
        assert_error(
            "[isolation]\nprobe_interval = \"0\"\n[[pools]]\nname = \"ci\"\nrequire_isolation = true\n",
            &["pools[0] (\"ci\").require_isolation", "probe_interval = \"0\" turns off"],
        );
    }

    #[test]
    fn max_in_flight_is_bounded() {
        assert_error(&format!("[daemon]\nmax_in_flight = 0\n{MIN}"), &["daemon.max_in_flight", "between 1 and 256"]);
        assert_error(&format!("[daemon]\nmax_in_flight = 1000\n{MIN}"), &["daemon.max_in_flight", "between 1 and 256"]);
    }

    #[test]
    fn minimal_config_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.daemon, DaemonConfig::default());
        assert_eq!(c.daemon.call_timeout, Duration::from_secs(30));
        assert_eq!(c.daemon.blocking_call_timeout, Duration::from_secs(120));
        assert_eq!(c.daemon.max_in_flight, mpool_multipass::DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(c.daemon.address, None);
        assert!(!c.daemon.insecure_skip_verify && !c.daemon.allow_untested_daemon);
        assert_eq!(c.api.listen, vec![Listen::Unix("/run/mpool/mpool.sock".into())]);
        assert_eq!(c.api, ApiConfig::default());
        assert_eq!(c.store.path, PathBuf::from("/var/lib/mpool/mpool.redb"));
        assert_eq!(c.engine, EngineConfig::default());
        assert_eq!(c.isolation, IsolationConfig::default());
        assert_eq!(c.engine.name_prefix, "mpool-");
        assert!(c.engine.delete_strays);
        assert_eq!(c.engine.reconcile_interval, Duration::from_secs(5));
        assert_eq!(c.engine.health_interval, Duration::from_secs(30));
        assert_eq!(c.engine.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.pools.len(), 1);
        let p = &c.pools[0];
        assert_eq!(*p, PoolConfig::with_defaults("ci"));
        assert_eq!(p.image, "24.04");
        assert_eq!((p.cpus, p.memory.as_str(), p.disk.as_str()), (1, "1G", "5G"));
        assert_eq!((p.min_ready, p.hot, p.max_size, p.max_uses), (1, 0, 1, 0));
        assert_eq!(p.reset, ResetStrategy::Snapshot);
        assert_eq!(p.cloud_init, None);
        assert!(p.setup.is_empty());
        assert_eq!(p.default_ttl, Duration::from_secs(1800));
        assert_eq!(p.max_ttl, Duration::from_secs(4 * 3600));
        assert_eq!(p.max_wait, Duration::from_secs(300));
        assert_eq!(p.readiness_timeout, Duration::from_secs(300));
        assert_eq!(p.idle_timeout, Duration::from_secs(900));
        assert!(c.pool("ci").is_some());
        assert!(c.pool("nope").is_none());
        assert!(matches!(c.daemon.server_verification(), ServerVerification::Auto));
        assert!(matches!(c.daemon.client_identity(), ClientIdentity::Auto));
    }

    #[test]
    fn max_size_defaults_to_min_ready() {
        let c = parse("[[pools]]\nname = \"ci\"\nmin_ready = 4\n").unwrap();
        assert_eq!(c.pools[0].max_size, 4);
        let c = parse("[[pools]]\nname = \"ci\"\nmin_ready = 0\n").unwrap();
        assert_eq!(c.pools[0].max_size, 1);
    }

    #[test]
    fn full_config_values_and_relative_paths() {
        let text = r##"
[daemon]
address = "unix:sock/multipass_socket"
passphrase_file = "passphrase"
pin_cert = "/etc/pin.pem"
client_cert = "c.pem"
client_key = "k.pem"
allow_untested_daemon = true
data_dir = "data"
call_timeout = "10s"
blocking_call_timeout = "5m"
max_in_flight = 3

[api]
listen = ["unix:mpool.sock", "127.0.0.1:7070", "[::1]:7071"]
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"
client_ca = "tls/ca.pem"
tokens_file = "/etc/mpool/tokens"
metrics_listen = "127.0.0.1:9090"
http_listen = "127.0.0.1:8080"
http_header_timeout = "5s"
http_max_connections = 12
max_upload = "64M"

[store]
path = "db/mpool.redb"

[engine]
name_prefix = "pool-"
delete_strays = false
reconcile_interval = "250ms"
health_interval = "1m"
shutdown_grace = "0"
gc_interval = "1h"

[[pools]]
name = "ci"
image = "22.04"
cpus = 4
memory = "4G"
disk = "20G"
cloud_init = "#cloud-config\npackages: [git]\n"
setup = ["apt-get update", "apt-get install -y make"]
min_ready = 3
hot = 2
max_size = 6
reset = "clone"
max_uses = 10
default_ttl = "1h"
max_ttl = "1d"
max_wait = "0"
readiness_timeout = "10m"
idle_timeout = "1h30m"
max_leases_per_owner = 2
autoscale = "demand"
autoscale_decay = "20m"
require_isolation = true
rebuild_every = "7d"
max_disk_usage = "8G"

[[pools.schedule]]
periods = ["* * 8-17 * * mon-fri", "0 0 2 * * *"]
min_ready = 5
timezone = "local"

[[pools]]
name = "build-arm"
reset = "recreate"
"##;
        let c = Config::parse(text, Path::new("/cfg")).unwrap();
        let d = &c.daemon;
        assert_eq!(d.address.as_deref(), Some("unix:/cfg/sock/multipass_socket"));
        assert_eq!(d.passphrase_file, Some("/cfg/passphrase".into()));
        assert_eq!(d.pin_cert, Some("/etc/pin.pem".into()));
        assert_eq!(d.client_cert, Some("/cfg/c.pem".into()));
        assert_eq!(d.client_key, Some("/cfg/k.pem".into()));
        assert_eq!(d.data_dir, Some("/cfg/data".into()));
        assert!(d.allow_untested_daemon);
        assert_eq!(d.max_in_flight, 3);
        assert_eq!(d.call_timeout, Duration::from_secs(10));
        assert_eq!(d.blocking_call_timeout, Duration::from_secs(300));
        assert!(matches!(d.server_verification(), ServerVerification::Pin(p) if p == Path::new("/etc/pin.pem")));
        assert!(matches!(d.client_identity(), ClientIdentity::Files { .. }));
        let a = &c.api;
        assert_eq!(
            a.listen,
            vec![
                Listen::Unix("/cfg/mpool.sock".into()),
                Listen::Tcp("127.0.0.1:7070".parse().unwrap()),
                Listen::Tcp("[::1]:7071".parse().unwrap()),
            ]
        );
        let shown: Vec<String> = a.listen.iter().map(|l| l.to_string()).collect();
        assert_eq!(shown, ["unix:/cfg/mpool.sock", "127.0.0.1:7070", "[::1]:7071"]);
        assert_eq!(a.tls_cert, Some("/cfg/tls/cert.pem".into()));
        assert_eq!(a.tls_key, Some("/cfg/tls/key.pem".into()));
        assert_eq!(a.client_ca, Some("/cfg/tls/ca.pem".into()));
        assert_eq!(a.tokens_file, Some("/etc/mpool/tokens".into()));
        assert_eq!(a.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(a.http_listen, Some(Listen::Tcp("127.0.0.1:8080".parse().unwrap())));
        assert_eq!((a.http_header_timeout, a.http_max_connections), (Duration::from_secs(5), 12));
        assert_eq!(a.max_upload, 64 << 20);
        assert_eq!(c.store.path, PathBuf::from("/cfg/db/mpool.redb"));
        let e = &c.engine;
        assert_eq!(e.name_prefix, "pool-");
        assert!(!e.delete_strays);
        assert_eq!(e.gc_interval, Duration::from_secs(3600));
        assert_eq!(e.reconcile_interval, Duration::from_millis(250));
        assert_eq!(e.health_interval, Duration::from_secs(60));
        assert_eq!(e.shutdown_grace, Duration::ZERO);
        let p = c.pool("ci").unwrap();
        assert_eq!(p.image, "22.04");
        assert_eq!((p.cpus, p.memory.as_str(), p.disk.as_str()), (4, "4G", "20G"));
        assert_eq!(p.cloud_init.as_deref(), Some("#cloud-config\npackages: [git]\n"));
        assert_eq!(p.setup, ["apt-get update", "apt-get install -y make"]);
        assert_eq!((p.min_ready, p.hot, p.max_size, p.max_uses), (3, 2, 6, 10));
        assert_eq!(p.reset, ResetStrategy::Clone);
        assert_eq!(p.default_ttl, Duration::from_secs(3600));
        assert_eq!(p.max_ttl, Duration::from_secs(86400));
        assert_eq!(p.max_wait, Duration::ZERO);
        assert_eq!(p.readiness_timeout, Duration::from_secs(600));
        assert_eq!(p.idle_timeout, Duration::from_secs(5400));
        assert_eq!(p.max_leases_per_owner, 2);
        assert_eq!(c.pool("build-arm").unwrap().max_leases_per_owner, 0, "unlimited by default");
        assert!(p.require_isolation);
        assert_eq!(
            p.schedules,
            [Schedule {
                periods: ["* * 8-17 * * mon-fri", "0 0 2 * * *"]
                    .map(|p| mpool_core::pool::schedule::parse_period(p).unwrap())
                    .to_vec(),
                min_ready: 5,
                local: true
            }]
        );
        assert!(!c.pool("build-arm").unwrap().require_isolation, "off by default");
        assert_eq!((p.autoscale, p.autoscale_decay), (Autoscale::Demand, Duration::from_secs(1200)));
        assert_eq!(p.rebuild_every, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(p.max_disk_usage, Some(8 << 30));
        assert_eq!(c.pool("build-arm").unwrap().rebuild_every, None, "off by default");
        let arm = c.pool("build-arm").unwrap();
        assert_eq!((arm.autoscale, arm.autoscale_decay), (Autoscale::Off, Duration::from_secs(600)));
        assert_eq!(c.pool("build-arm").unwrap().reset, ResetStrategy::Recreate);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name_and_line() {
        let msg = error("bogus = 1\n[[pools]]\nname = \"ci\"\n");
        assert!(msg.contains("bogus") && msg.contains("line 1"), "{msg}");
        let msg = error("[daemon]\naddres = \"unix:/x\"\n[[pools]]\nname = \"ci\"\n");
        assert!(msg.contains("addres") && msg.contains("line 2"), "{msg}");
        let msg = error("[[pools]]\nname = \"ci\"\nmin_redy = 2\n");
        assert!(msg.contains("min_redy") && msg.contains("line 3"), "{msg}");
        assert_error("[[pool]]\nname = \"ci\"\n", &["pool", "pools"]);
        for table in ["api", "store", "engine"] {
            assert_error(&format!("[{table}]\nnope = 1\n{MIN}"), &["nope"]);
        }
    }

    #[test]
    fn syntax_and_type_errors_keep_toml_location() {
        assert_error("[[pools]\nname = \"ci\"", &["line 1"]);
        assert_error("[[pools]]\nname = \"ci\"\ncpus = \"two\"\n", &["line 3", "cpus"]);
        assert_error("[[pools]]\nname = \"ci\"\nmin_ready = -1\n", &["line 3", "min_ready"]);
        assert_error("[[pools]]\nname = \"ci\"\nmax_leases_per_owner = -1\n", &["line 3", "max_leases_per_owner"]);
        assert_error("[[pools]]\nname = \"ci\"\nautoscale = \"auto\"\n", &["line 3", "auto", "off", "demand"]);
        assert_error("[[pools]]\nname = \"ci\"\nautoscale_decay = \"0s\"\n", &["pools[0] (\"ci\").autoscale_decay"]);
        assert_error("[[pools]]\nname = \"ci\"\nmax_leases_per_owner = \"2\"\n", &["line 3", "max_leases_per_owner"]);
        assert_error("[[pools]]\nname = \"ci\"\nreset = \"reboot\"\n", &["line 3", "reboot", "snapshot"]);
        assert_error("[[pools]]\nname = \"ci\"\ndefault_ttl = 30\n", &["line 3", "default_ttl", "30s"]);
    }

    #[test]
    fn empty_config_needs_a_pool() {
        assert_error("", &["pools", "add at least one [[pools]] table"]);
        assert_error("[daemon]\n", &["add at least one [[pools]] table"]);
    }

    #[test]
    fn pool_errors_name_the_key() {
        let p = |extra: &str| format!("[[pools]]\nname = \"ci\"\n{extra}\n");
        assert_error(&p("max_size = 0"), &["pools[0] (\"ci\").max_size", "at least 1", "line 3"]);
        assert_error(&p("min_ready = 3\nmax_size = 2"), &["pools[0] (\"ci\").max_size", "min_ready (3)"]);
        assert_error(&p("hot = 2"), &["pools[0] (\"ci\").hot", "min_ready (1)"]);
        assert_error(&p("cpus = 0"), &["pools[0] (\"ci\").cpus", "at least 1"]);
        assert_error(&p("memory = \"lots\""), &["pools[0] (\"ci\").memory", "not a size"]);
        assert_error(&p("memory = \"64M\""), &["pools[0] (\"ci\").memory", "128M"]);
        assert_error(&p("disk = \"256M\""), &["pools[0] (\"ci\").disk", "512M"]);
        assert_error(&p("disk = \"1.5\""), &["pools[0] (\"ci\").disk", "not a size"]);
        assert_error(&p("default_ttl = \"5h\""), &["pools[0] (\"ci\").default_ttl", "max_ttl (4h)"]);
        assert_error(&p("max_ttl = \"10m\""), &["pools[0] (\"ci\").default_ttl", "max_ttl (10m)"]);
        assert_error(&p("default_ttl = \"0s\""), &["default_ttl", "more than 0"]);
        assert_error(&p("max_wait = \"soon\""), &["pools[0] (\"ci\").max_wait", "soon"]);
        assert_error(&p("readiness_timeout = \"-5s\""), &["readiness_timeout", "negative"]);
        assert_error(&p("idle_timeout = \"15\""), &["idle_timeout", "no unit"]);
        assert_error(&p("image = \" \""), &["pools[0] (\"ci\").image", "empty"]);
        assert_error(&p("image = \"a:b:c\""), &["pools[0] (\"ci\").image", "[remote:]image"]);
        assert_error(
            &p("cloud_init = \"#cloud-config\"\ncloud_init_file = \"ci.yaml\""),
            &["pools[0] (\"ci\").cloud_init_file", "exclusive"],
        );
        assert_error(
            &p("cloud_init_file = \"does-not-exist.yaml\""),
            &["cloud_init_file", "/etc/mpool/does-not-exist.yaml"],
        );
    }

    #[test]
    fn pool_names_are_checked() {
        assert_error("[[pools]]\nimage = \"24.04\"\n", &["pools[0].name", "missing", "line 1"]);
        for bad in ["", "CI", "1ci", "-ci", "ci_x", "ci.x", "abcdefghijklmnopqrstu"] {
            let msg = error(&format!("[[pools]]\nname = {bad:?}\n"));
            assert!(msg.contains(&format!("pools[0] ({bad:?}).name")), "{bad}: {msg}");
        }
        for good in ["ci", "c", "build-arm64", "abcdefghijklmnopqrst"] {
            parse(&format!("[[pools]]\nname = {good:?}\n")).unwrap();
        }
        assert_error(
            "[[pools]]\nname = \"ci\"\n[[pools]]\nname = \"ci\"\n",
            &["pools[1] (\"ci\").name", "duplicate", "pools[0]", "line 4"],
        );
    }

    #[test]
    fn several_problems_are_reported_together() {
        let e = parse("[[pools]]\nname = \"ci\"\ncpus = 0\nmax_size = 0\n[engine]\nname_prefix = \"9\"\n").unwrap_err();
        assert_eq!(e.issues().len(), 3, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("3 problems") && msg.contains("cpus") && msg.contains("max_size"), "{msg}");
        assert!(msg.contains("engine.name_prefix"), "{msg}");
        assert!(msg.starts_with("config: "), "{msg}");
    }

    #[test]
    fn engine_errors_name_the_key() {
        for bad in ["", "9pool", "-x", "mpool_", "a.b", "abcdefghijklmnopqrstu"] {
            assert_error(&format!("[engine]\nname_prefix = {bad:?}\n{MIN}"), &["engine.name_prefix"]);
        }
        for good in ["m", "mpool-", "Pool9-", "abcdefghijklmnopqrst"] {
            parse(&format!("[engine]\nname_prefix = {good:?}\n{MIN}")).unwrap();
        }
        assert_error(
            &format!("[engine]\nreconcile_interval = \"0\"\n{MIN}"),
            &["engine.reconcile_interval", "more than 0"],
        );
        assert_error(
            &format!("[engine]\nhealth_interval = \"1x\"\n{MIN}"),
            &["engine.health_interval", "unknown unit"],
        );
    }

    #[test]
    fn daemon_errors_name_the_key() {
        let d = |body: &str| format!("[daemon]\n{body}\n{MIN}");
        assert_error(&d("address = \"nowhere\""), &["daemon.address", "unix:PATH"]);
        assert_error(&d("address = \"unix:\""), &["daemon.address"]);
        assert_error(&d("address = \"host:port\""), &["daemon.address"]);
        parse(&d("address = \"localhost:50051\"")).unwrap();
        assert_error(&d("root_cert = \"a.pem\"\npin_cert = \"b.pem\""), &["daemon.pin_cert", "exclusive"]);
        assert_error(&d("root_cert = \"a.pem\"\ninsecure_skip_verify = true"), &["daemon.insecure_skip_verify"]);
        let c = parse(&d("insecure_skip_verify = true")).unwrap();
        assert!(matches!(c.daemon.server_verification(), ServerVerification::InsecureSkipVerify));
        let c = parse(&d("root_cert = \"a.pem\"")).unwrap();
        assert!(
            matches!(c.daemon.server_verification(), ServerVerification::RootCert(p) if p == Path::new("/etc/mpool/a.pem"))
        );
        assert_error(&d("client_cert = \"c.pem\""), &["daemon.client_key", "missing"]);
        assert_error(&d("client_key = \"k.pem\""), &["daemon.client_cert", "missing"]);
        assert_error(&d("passphrase_file = \"\""), &["daemon.passphrase_file", "empty"]);
        assert_error(&d("call_timeout = \"1.5s\""), &["daemon.call_timeout", "fractions"]);
        assert_error(&d("blocking_call_timeout = \"0\""), &["daemon.blocking_call_timeout", "more than 0"]);
    }

    #[test]
    fn api_errors_name_the_key() {
        let a = |body: &str| format!("[api]\n{body}\n{MIN}");
        assert_error(&a("listen = []"), &["api.listen", "at least one"]);
        assert_error(
            &a("listen = [\"unix:/a\", \"localhost:7070\"]"),
            &["api.listen[1]", "localhost:7070", "127.0.0.1"],
        );
        assert_error(&a("listen = [\"unix:\"]"), &["api.listen[0]", "socket path"]);
        assert_error(&a("listen = [\"127.0.0.1:99999\"]"), &["api.listen[0]"]);
        assert_error(
            &a("listen = [\"127.0.0.1:7070\", \"127.0.0.1:7070\"]"),
            &["api.listen[1]", "api.listen[0]", "duplicate"],
        );
        assert_error(&a("tls_key = \"k.pem\""), &["api.tls_cert", "missing"]);
        assert_error(&a("tls_cert = \"c.pem\""), &["api.tls_key", "missing"]);
        assert_error(&a("client_ca = \"ca.pem\""), &["api.client_ca", "tls_cert"]);
        assert_error(&a("metrics_listen = \"localhost:9090\""), &["api.metrics_listen", "127.0.0.1:9090"]);
        assert_error(&a("http_listen = \"http://x\""), &["api.http_listen"]);
        assert_error(&a("max_upload = \"lots\""), &["api.max_upload", "lots", "not a size"]);
        assert_error(&a("max_upload = \"0\""), &["api.max_upload", "at least 1 byte"]);
        assert_eq!(parse(&a("max_upload = \"1024\"")).unwrap().api.max_upload, 1024);
        assert_error(&a("max_download = \"0\""), &["api.max_download", "at least 1 byte"]);
        assert_eq!(parse(&a("max_download = \"2K\"")).unwrap().api.max_download, 2048);
        assert_error(&a("session_output_cap = \"1K\""), &["api.session_output_cap", "at least 32K"]);
        assert_eq!(parse(&a("session_output_cap = \"64K\"")).unwrap().api.session_output_cap, 65536);
        assert_eq!(parse(&a("")).unwrap().api.session_output_cap, DEFAULT_SESSION_OUTPUT_CAP);
        assert_eq!(parse(&a("host_name = \"mp-2.lab\"")).unwrap().api.host_name, "mp-2.lab");
        assert_error(&a("host_name = \"\""), &["api.host_name", "1 to 63 characters"]);
        assert_error(&a("host_name = \"a/b\""), &["api.host_name", "'/' is not allowed"]);
        assert!(check_host_name(&machine_host_name()).is_ok(), "the default is a valid host name");
        assert_error(&a("http_header_timeout = \"0\""), &["api.http_header_timeout", "more than 0"]);
        assert_error(&a("http_max_connections = 0"), &["api.http_max_connections", "between 1 and 65536"]);
        assert_error(&a("http_max_connections = 70000"), &["api.http_max_connections", "between 1 and 65536"]);
        assert_error(
            &a("listen = [\"127.0.0.1:7070\"]\nhttp_listen = \"127.0.0.1:7070\""),
            &["api.http_listen", "already used by api.listen[0]"],
        );
        assert_error(
            &a("listen = [\"127.0.0.1:7070\"]\nmetrics_listen = \"127.0.0.1:7070\""),
            &["api.metrics_listen", "already used"],
        );
        assert_error(
            &a("listen = [\"unix:/a.sock\"]\nhttp_listen = \"unix:/a.sock\""),
            &["api.http_listen", "already used"],
        );
        let c = parse(&a("http_listen = \"unix:/run/mpool/http.sock\"")).unwrap();
        assert_eq!(c.api.http_listen.map(|l| l.to_string()).as_deref(), Some("unix:/run/mpool/http.sock"));
    }

    #[test]
    fn store_errors_name_the_key() {
        assert_error(&format!("[store]\npath = \"\"\n{MIN}"), &["store.path", "empty"]);
    }

    #[test]
    fn listen_parses_and_displays() {
        for s in ["unix:/run/x.sock", "127.0.0.1:7070", "[::1]:7070", "0.0.0.0:0"] {
            assert_eq!(s.parse::<Listen>().unwrap().to_string(), s);
        }
        for s in ["", "unix:", "7070", "localhost:1", "1.2.3.4", "[::1]", "1.2.3.4:-1"] {
            assert!(s.parse::<Listen>().is_err(), "{s}");
        }
    }

    #[test]
    fn durations_parse_and_reject() {
        let ok = [
            ("0", 0),
            ("0s", 0),
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("2d", 172_800_000),
            ("1m30s500ms", 90_500),
            (" 10s ", 10_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in [
            "",
            " ",
            "-5s",
            "5",
            "00",
            "1.5h",
            "5x",
            "s",
            "h1",
            "5S",
            "1w",
            "99999999999999999999s",
            "213503982334601d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_duration("99999999999999999999s").unwrap_err().contains("too large"));
        for ms in [0u64, 1, 250, 30_000, 5_400_000, 90_061_001] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn sizes_parse_and_reject() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        for bad in ["", "G", "1X", "1.5", "-1G", "one"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        parse("[[pools]]\nname = \"ci\"\nmemory = \"128M\"\ndisk = \"512M\"\n").unwrap();
        parse("[[pools]]\nname = \"ci\"\nmemory = \"134217728\"\ndisk = \"2GiB\"\n").unwrap();
    }

    #[test]
    fn cloud_init_file_resolves_against_the_config_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ci")).unwrap();
        std::fs::write(dir.path().join("ci/user-data.yaml"), "#cloud-config\npackages: [jq]\n").unwrap();
        let cfg = dir.path().join("mpool.toml");
        std::fs::write(
            &cfg,
            "[[pools]]\nname = \"ci\"\ncloud_init_file = \"ci/user-data.yaml\"\n[store]\npath = \"db.redb\"\n",
        )
        .unwrap();
        let c = Config::load(&cfg).unwrap();
        assert_eq!(c.pools[0].cloud_init.as_deref(), Some("#cloud-config\npackages: [jq]\n"));
        assert_eq!(c.store.path, dir.path().join("db.redb"));

        // Loading through a relative path still resolves against the file's directory.
        let cwd_relative = Path::new(".").join(pathdiff(&cfg));
        if let Ok(c) = Config::load(&cwd_relative) {
            assert_eq!(c.pools[0].cloud_init.as_deref(), Some("#cloud-config\npackages: [jq]\n"));
        }

        std::fs::write(&cfg, "[[pools]]\nname = \"ci\"\ncloud_init_file = \"missing.yaml\"\n").unwrap();
        let msg = Config::load(&cfg).unwrap_err().to_string();
        assert!(msg.contains(&cfg.display().to_string()), "{msg}");
        assert!(msg.contains("pools[0] (\"ci\").cloud_init_file"), "{msg}");
        assert!(msg.contains(&dir.path().join("missing.yaml").display().to_string()), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    /// `target` relative to the current directory when it lies below it, else unchanged.
    fn pathdiff(target: &Path) -> PathBuf {
        let cwd = std::env::current_dir().unwrap_or_default();
        target.strip_prefix(&cwd).map(Path::to_path_buf).unwrap_or_else(|_| target.to_path_buf())
    }

    #[test]
    fn load_reports_missing_file() {
        let e = Config::load(Path::new("/nonexistent/mpool.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/mpool.toml"), "{e}");
    }

    #[test]
    fn deploy_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/mpool.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.daemon.address.as_deref(), Some("unix:/var/snap/multipass/common/multipass_socket"));
        assert_eq!(c.api.listen[0], Listen::Unix("/run/mpool/mpool.sock".into()));
        assert_eq!(c.store.path, PathBuf::from("/var/lib/mpool/mpool.redb"));
        assert_eq!(c.api.max_upload, DEFAULT_MAX_UPLOAD);
        assert_eq!(c.api.http_header_timeout, DEFAULT_HTTP_HEADER_TIMEOUT);
        assert_eq!(c.api.http_max_connections, DEFAULT_HTTP_MAX_CONNECTIONS);
        assert_eq!(c.isolation.bridge.as_deref(), Some("mpqemubr0"));
        assert!(c.isolation.allow_host_ports.is_empty());
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].reset, ResetStrategy::Snapshot);
        assert!(c.pools[0].hot > 0);
        assert_eq!(c.pools[1].reset, ResetStrategy::Clone);
    }

    #[test]
    fn never_panics_on_odd_input() {
        let inputs = [
            "\u{0}",
            "[[pools]]\nname = \"ci\"\nmemory = \"99999999999999999999999999T\"\n",
            "[[pools]]\nname = \"ci\"\nmax_ttl = \"18446744073709551615ms\"\n",
            "[[pools]]\nname = \"ci\"\nmin_ready = 4294967295\nmax_size = 4294967295\nhot = 4294967295\n",
            "[[pools]]\nname = \"ci\"\ncpus = 4294967296\n",
            "pools = 5",
            "pools = []",
            "[api]\nlisten = \"unix:/x\"\n[[pools]]\nname = \"ci\"",
            "[[pools]]\nname = \"é\"\n",
            "[[pools]]\nname = \"ci\"\ndefault_ttl = \"1\u{301}s\"\n",
        ];
        for text in inputs {
            let _ = parse(text);
        }
    }
}
