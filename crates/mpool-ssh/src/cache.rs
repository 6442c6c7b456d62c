//! [`ConnectionCache`]: one SSH connection per caller-chosen key (a lease id, a VM name).
//!
//! A connection is opened on first use, reused by every exec and transfer under the key, and
//! closed by [`ConnectionCache::close`]. The first host key seen under a key is pinned until that
//! close: a reconnect that meets another host key fails with [`SshError::HostKeyMismatch`].
//! A connection found closed is reopened; an operation whose channel could not be opened because
//! the connection died is retried once on a fresh connection. Retries happen only before anything
//! was sent on the channel, so a command is never run twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::connection::{Connection, SshEndpoint, SshOptions};
use super::error::SshError;
use super::exec::{self, ExecHandle, ExecOutput, ExecRequest};
use super::files::{self, TransferOptions, TransferReport};

struct EntryState {
    target: SshEndpoint,
    connection: Option<Connection>,
    pinned_host_key: Option<String>,
    closed: bool,
}

struct Entry {
    // A tokio mutex: held across connect, so concurrent first uses open one connection.
    state: tokio::sync::Mutex<EntryState>,
}

/// Connections by key. Share it (e.g. in an `Arc`); all methods take `&self`.
pub struct ConnectionCache {
    options: SshOptions,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

impl std::fmt::Debug for ConnectionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCache").field("keys", &self.keys()).finish()
    }
}

impl ConnectionCache {
    /// An empty cache; `options` apply to every connection it opens.
    pub fn new(options: SshOptions) -> ConnectionCache {
        ConnectionCache { options, entries: Mutex::new(HashMap::new()) }
    }

    /// The options connections are opened with.
    pub fn options(&self) -> &SshOptions {
        &self.options
    }

    /// Keys with an entry (open or to be reopened).
    pub fn keys(&self) -> Vec<String> {
        match self.entries.lock() {
            Ok(map) => map.keys().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().keys().cloned().collect(),
        }
    }

    /// The host key fingerprint pinned under `key`, once a connection was made.
    pub async fn pinned_host_key(&self, key: &str) -> Option<String> {
        let entry = self.lookup(key)?;
        entry.state.lock().await.pinned_host_key.clone()
    }

    fn lookup(&self, key: &str) -> Option<Arc<Entry>> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    fn entry(&self, key: &str, target: &SshEndpoint) -> Arc<Entry> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Entry {
                    state: tokio::sync::Mutex::new(EntryState {
                        target: target.clone(),
                        connection: None,
                        pinned_host_key: None,
                        closed: false,
                    }),
                })
            })
            .clone()
    }

    /// The live connection under `key`, opening (or reopening) it to `target` if needed. If
    /// `target` differs from the one the entry was made with (new IP after a restart, say), the
    /// old connection is closed and a new one opened; the pinned host key stays.
    pub async fn connection(&self, key: &str, target: &SshEndpoint) -> Result<Connection, SshError> {
        self.get(key, target, None).await
    }

    /// Like [`ConnectionCache::connection`], but replaces `failed` if it is still the cached one.
    async fn get(&self, key: &str, target: &SshEndpoint, failed: Option<&Connection>) -> Result<Connection, SshError> {
        let entry = self.entry(key, target);
        let mut state = entry.state.lock().await;
        if state.closed {
            return Err(SshError::Closed { key: key.to_string() });
        }
        if state.target != *target {
            if let Some(old) = state.connection.take() {
                old.close().await;
            }
            state.target = target.clone();
        }
        if let Some(conn) = &state.connection {
            let is_failed = failed.is_some_and(|f| f.same_as(conn));
            if !conn.is_closed() && !is_failed {
                return Ok(conn.clone());
            }
            tracing::info!(key, addr = conn.addr(), "SSH connection lost; reconnecting");
        }
        state.connection = None;
        let conn = Connection::connect_pinned(&state.target, &self.options, state.pinned_host_key.as_deref()).await?;
        if state.pinned_host_key.is_none() {
            state.pinned_host_key = Some(conn.host_key_fingerprint().to_string());
        }
        state.connection = Some(conn.clone());
        Ok(conn)
    }

    /// Pings the open connection under `key` (see [`Connection::ping`]); `None` when there is
    /// no open connection to ping (nothing is opened).
    pub async fn ping(&self, key: &str, limit: std::time::Duration) -> Option<Result<(), SshError>> {
        let entry = self.lookup(key)?;
        let conn = {
            let state = entry.state.lock().await;
            if state.closed {
                return None;
            }
            state.connection.clone()?
        };
        if conn.is_closed() {
            return None;
        }
        Some(conn.ping(limit).await)
    }

    /// Starts a command on the connection under `key` (see [`Connection::exec`]).
    pub async fn exec(&self, key: &str, target: &SshEndpoint, request: ExecRequest) -> Result<ExecHandle, SshError> {
        let prepared = exec::Prepared::new(request)?;
        let conn = self.get(key, target, None).await?;
        let opened = match exec::open(&conn).await {
            Err(e) if e.is_connection_lost() => exec::open(&self.get(key, target, Some(&conn)).await?).await?,
            other => other?,
        };
        exec::start(opened, prepared).await
    }

    /// Runs a command to completion, collecting its output (see [`Connection::run`]).
    pub async fn run(&self, key: &str, target: &SshEndpoint, request: ExecRequest) -> Result<ExecOutput, SshError> {
        Ok(self.exec(key, target, request).await?.collect().await)
    }

    /// Uploads a file or tree over the connection under `key` (see [`Connection::upload`]).
    pub async fn upload(
        &self,
        key: &str,
        target: &SshEndpoint,
        local: impl AsRef<Path>,
        remote: &str,
        options: &TransferOptions,
    ) -> Result<TransferReport, SshError> {
        let sftp = self.sftp(key, target).await?;
        files::upload(&sftp, local.as_ref(), remote, options).await
    }

    /// Downloads a file or tree over the connection under `key` (see [`Connection::download`]).
    pub async fn download(
        &self,
        key: &str,
        target: &SshEndpoint,
        remote: &str,
        local: impl AsRef<Path>,
        options: &TransferOptions,
    ) -> Result<TransferReport, SshError> {
        let sftp = self.sftp(key, target).await?;
        files::download(&sftp, remote, local.as_ref(), options).await
    }

    /// Opens a remote file for writing over the connection under `key`: content streams in
    /// through the returned [`files::RemoteWriter`] without touching the local disk.
    pub async fn open_write(
        &self,
        key: &str,
        target: &SshEndpoint,
        remote: &str,
        mode: u32,
        options: &TransferOptions,
    ) -> Result<files::RemoteWriter, SshError> {
        let sftp = self.sftp(key, target).await?;
        files::open_write(sftp, remote, mode, options).await
    }

    /// Opens a remote regular file for reading over the connection under `key`: its size and
    /// mode are known before the first byte is read.
    pub async fn open_read(
        &self,
        key: &str,
        target: &SshEndpoint,
        remote: &str,
        options: &TransferOptions,
    ) -> Result<files::RemoteReader, SshError> {
        let sftp = self.sftp(key, target).await?;
        files::open_read(sftp, remote, options).await
    }

    /// One SFTP session over the connection under `key`, for repeated small reads (it holds a
    /// channel slot until dropped).
    pub async fn remote_fs(&self, key: &str, target: &SshEndpoint) -> Result<files::RemoteFs, SshError> {
        Ok(files::RemoteFs::new(self.sftp(key, target).await?))
    }

    async fn sftp(&self, key: &str, target: &SshEndpoint) -> Result<files::Sftp, SshError> {
        let conn = self.get(key, target, None).await?;
        match conn.sftp().await {
            Err(e) if e.is_connection_lost() => self.get(key, target, Some(&conn)).await?.sftp().await,
            other => other,
        }
    }

    /// Closes the connection under `key` and forgets the entry and its pinned host key (lease
    /// end, VM stop). Returns whether there was an entry. Operations racing with the close fail
    /// with [`SshError::Closed`].
    pub async fn close(&self, key: &str) -> bool {
        let entry = {
            let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(key)
        };
        let Some(entry) = entry else {
            return false;
        };
        let mut state = entry.state.lock().await;
        state.closed = true;
        if let Some(conn) = state.connection.take() {
            conn.close().await;
        }
        true
    }

    /// Closes every connection (shutdown).
    pub async fn close_all(&self) {
        for key in self.keys() {
            self.close(&key).await;
        }
    }
}
