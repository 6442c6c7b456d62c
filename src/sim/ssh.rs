//! TEMPORARY stub of the simulator's SSH endpoints; replaced by the real implementation.
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Key material.
pub struct SshKeys { text: String }
impl SshKeys {
    /// Stub.
    pub fn load_or_create(_dir: &Path) -> std::io::Result<SshKeys> { Ok(SshKeys { text: String::new() }) }
    /// Stub.
    pub fn client_key_text(&self) -> &str { &self.text }
    /// Stub.
    pub fn client_public_openssh(&self) -> String { String::new() }
}
/// Endpoint.
pub struct SshEndpoint { port: u16 }
impl SshEndpoint {
    /// Stub.
    pub async fn start(_root: PathBuf, _keys: Arc<SshKeys>, port: u16) -> std::io::Result<SshEndpoint> { Ok(SshEndpoint { port }) }
    /// Stub.
    pub fn port(&self) -> u16 { self.port }
    /// Stub.
    pub fn connections_accepted(&self) -> u64 { 0 }
    /// Stub.
    pub async fn shutdown(&self) {}
}
