//! TEMPORARY: the config types only; replaced by the real module (parsing, validation).
#![allow(missing_docs)]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config { pub daemon: DaemonConfig, pub api: ApiConfig, pub store: StoreConfig, pub engine: EngineConfig, pub pools: Vec<PoolConfig> }
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub address: Option<String>, pub passphrase_file: Option<PathBuf>, pub root_cert: Option<PathBuf>, pub pin_cert: Option<PathBuf>,
    pub insecure_skip_verify: bool, pub client_cert: Option<PathBuf>, pub client_key: Option<PathBuf>, pub allow_untested_daemon: bool,
    pub data_dir: Option<PathBuf>, pub call_timeout: Duration, pub blocking_call_timeout: Duration,
}
#[derive(Clone, Debug)]
pub struct ApiConfig { pub listen: Vec<Listen>, pub tls_cert: Option<PathBuf>, pub tls_key: Option<PathBuf>, pub client_ca: Option<PathBuf>, pub tokens_file: Option<PathBuf>, pub metrics_listen: Option<SocketAddr>, pub http_listen: Option<Listen> }
#[derive(Clone, Debug)]
pub enum Listen { Unix(PathBuf), Tcp(SocketAddr) }
#[derive(Clone, Debug)]
pub struct StoreConfig { pub path: PathBuf }
#[derive(Clone, Debug)]
pub struct EngineConfig { pub name_prefix: String, pub delete_strays: bool, pub reconcile_interval: Duration, pub health_interval: Duration, pub shutdown_grace: Duration }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetStrategy { Snapshot, Clone, Recreate }
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub name: String, pub image: String, pub cpus: u32, pub memory: String, pub disk: String, pub cloud_init: Option<String>, pub setup: Vec<String>,
    pub min_ready: u32, pub hot: u32, pub max_size: u32, pub reset: ResetStrategy, pub max_uses: u32, pub default_ttl: Duration, pub max_ttl: Duration,
    pub max_wait: Duration, pub readiness_timeout: Duration, pub idle_timeout: Duration,
}
impl PoolConfig { pub fn generation_key(&self) -> String { format!("{}|{}|{}|{}|{:?}|{:?}|{:?}", self.image, self.cpus, self.memory, self.disk, self.cloud_init, self.setup, self.reset) } }
