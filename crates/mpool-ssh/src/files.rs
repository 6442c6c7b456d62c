//! File transfers over SFTP on the pooled connection: single files and directory trees, modes
//! kept, parents created, streamed in fixed-size chunks (memory stays flat for any file size).
//!
//! Besides whole files and trees copied to or from the local disk ([`upload`], [`download`]),
//! single files can be streamed without touching the local disk at all: [`RemoteWriter`] takes
//! content as it arrives (an API Upload, Run inputs) and [`RemoteReader`] hands it out chunk by
//! chunk (an API Download, Run outputs), each read or write waiting for the SFTP server, so the
//! caller's pace is the transfer's pace and memory holds one chunk.
//!
//! Remote paths are validated first ([`resolve_remote_path`]): with a declared base directory,
//! a path that resolves outside it is refused before anything is transferred. Names the server
//! returns while listing a directory are checked too (no `/`, `.` or `..`), so a hostile server
//! cannot make a download write outside the local destination. Symlinks, devices, FIFOs and
//! sockets inside trees are skipped and listed in [`TransferReport::skipped`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::Msg;
use russh_sftp::client::SftpSession;
use russh_sftp::client::error::Error as SftpClientError;
use russh_sftp::protocol::{FileAttributes, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

use super::error::{Side, SshError};

/// Bytes moved per read/write call. russh-sftp additionally keeps up to 16 requests in flight.
const CHUNK: usize = 256 * 1024;
/// A file system with less free space than this counts as full when a write fails.
const NEARLY_FULL: u64 = 1024 * 1024;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

/// How to transfer.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Absolute remote directory that every remote path must stay inside; relative remote paths
    /// are taken relative to it. `None`: no restriction, relative paths start at the SSH user's
    /// home.
    pub base: Option<String>,
    /// Create missing parent directories of the destination (default true).
    pub create_parents: bool,
    /// Give copies the permission bits of the originals (default true); otherwise the
    /// destination's umask decides.
    pub preserve_mode: bool,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions { base: None, create_parents: true, preserve_mode: true }
    }
}

impl TransferOptions {
    /// Default options restricted to `base`.
    pub fn within(base: impl Into<String>) -> TransferOptions {
        TransferOptions { base: Some(base.into()), ..Default::default() }
    }
}

/// What a transfer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// Regular files copied.
    pub files: u64,
    /// Directories created or reused (including the root of a tree).
    pub directories: u64,
    /// File content bytes copied.
    pub bytes: u64,
    /// Entries not copied (symlinks, devices, FIFOs, sockets, non-UTF-8 names), as paths on the
    /// source side.
    pub skipped: Vec<String>,
}

/// Checks and normalizes a remote path: rejects empty paths and NUL bytes, resolves `.` and
/// `..` lexically, and with a `base` (which must be absolute) resolves relative paths against it
/// and refuses results outside it with [`SshError::PathEscapesBase`].
///
/// The check is lexical: a symlink inside the base that points elsewhere is not detected.
pub fn resolve_remote_path(path: &str, base: Option<&str>) -> Result<String, SshError> {
    if path.is_empty() {
        return Err(SshError::InvalidRequest("empty remote path".into()));
    }
    if path.contains('\0') || base.is_some_and(|b| b.contains('\0')) {
        return Err(SshError::InvalidRequest("remote path contains a NUL byte".into()));
    }
    let Some(base) = base else {
        return Ok(normalize(path));
    };
    if !base.starts_with('/') {
        return Err(SshError::InvalidRequest(format!("base directory {base:?} is not absolute")));
    }
    let base_n = normalize(base);
    let joined = if path.starts_with('/') { path.to_string() } else { format!("{base_n}/{path}") };
    let resolved = normalize(&joined);
    let inside =
        base_n == "/" || resolved == base_n || resolved.strip_prefix(&base_n).is_some_and(|rest| rest.starts_with('/'));
    if inside {
        Ok(resolved)
    } else {
        Err(SshError::PathEscapesBase { path: path.to_string(), base: base.to_string() })
    }
}

/// Lexical POSIX normalization: drops `.` and empty components, applies `..` (which stops at
/// `/` for absolute paths and is kept at the start of relative ones).
fn normalize(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let body = parts.join("/");
    match (absolute, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

fn join_remote(dir: &str, name: &str) -> String {
    if dir.ends_with('/') { format!("{dir}{name}") } else { format!("{dir}/{name}") }
}

/// The parent of a normalized remote path, if it has one worth creating.
fn remote_parent(path: &str) -> Option<&str> {
    let idx = path.rfind('/')?;
    if idx == 0 { None } else { Some(&path[..idx]) }
}

/// A name from a remote directory listing that is safe to use as a local file name.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// An SFTP session on its own channel, holding a channel slot of the connection.
pub(crate) struct Sftp {
    session: SftpSession,
    request_timeout: Duration,
    _permit: OwnedSemaphorePermit,
}

impl Sftp {
    /// Waits for the server to accept the `sftp` subsystem request, then initializes SFTP.
    pub(crate) async fn new(
        mut channel: russh::Channel<Msg>,
        permit: OwnedSemaphorePermit,
        request_timeout: Duration,
        addr: &str,
    ) -> Result<Sftp, SshError> {
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) => {
                    return Err(SshError::ChannelRefused {
                        what: "the sftp subsystem".into(),
                        detail: "the server answered failure".into(),
                    });
                }
                Some(_) => {}
                None => {
                    return Err(SshError::ConnectionLost {
                        addr: addr.to_string(),
                        detail: "the channel closed while starting sftp".into(),
                    });
                }
            }
        }
        let config =
            russh_sftp::client::Config { request_timeout_secs: request_timeout.as_secs().max(1), ..Default::default() };
        let session = SftpSession::new_with_config(channel.into_stream(), config).await.map_err(|e| {
            SshError::ChannelRefused {
                what: "the sftp subsystem".into(),
                detail: format!("SFTP initialization failed: {e}"),
            }
        })?;
        Ok(Sftp { session, request_timeout, _permit: permit })
    }

    /// Turns a failed write into [`SshError::DiskFull`] when the remote file system is (nearly)
    /// full: OpenSSH reports ENOSPC only as the generic "Failure".
    async fn write_error(&self, path: &str, message: String) -> SshError {
        let lower = message.to_ascii_lowercase();
        if lower.contains("no space") || lower.contains("quota") {
            return SshError::DiskFull { side: Side::Remote, path: path.into() };
        }
        if lower.contains("permission denied") {
            return SshError::PermissionDenied { side: Side::Remote, path: path.into() };
        }
        let dir = remote_parent(path).unwrap_or(if path.starts_with('/') { "/" } else { "." });
        if let Ok(Some(fs)) = self.session.fs_info(dir).await {
            let free = fs.blocks_avail.saturating_mul(fs.fragment_size.max(1));
            if free < NEARLY_FULL || (fs.inodes > 0 && fs.inodes_avail == 0) {
                return SshError::DiskFull { side: Side::Remote, path: path.into() };
            }
        }
        SshError::Sftp { op: "write", path: path.into(), message }
    }

    /// Maps an SFTP request error.
    fn err(&self, op: &'static str, path: &str, e: SftpClientError) -> SshError {
        let path = path.to_string();
        match e {
            SftpClientError::Status(s) => match s.status_code {
                StatusCode::NoSuchFile => SshError::NoSuchFile { side: Side::Remote, path },
                StatusCode::PermissionDenied => SshError::PermissionDenied { side: Side::Remote, path },
                code => {
                    let message = if s.error_message.is_empty() { code.to_string() } else { s.error_message };
                    SshError::Sftp { op, path, message }
                }
            },
            SftpClientError::Timeout => {
                SshError::Timeout { what: format!("SFTP {op} {path}"), after: self.request_timeout }
            }
            other => SshError::Sftp { op, path, message: other.to_string() },
        }
    }

    /// Maps an error from reading an SFTP file (russh-sftp keeps only the server's message).
    fn read_err(&self, path: &str, e: std::io::Error) -> SshError {
        let message = e.to_string();
        if e.kind() == std::io::ErrorKind::TimedOut {
            SshError::Timeout { what: format!("SFTP read {path}"), after: self.request_timeout }
        } else if message.contains("No such file") {
            SshError::NoSuchFile { side: Side::Remote, path: path.into() }
        } else if message.contains("Permission denied") {
            SshError::PermissionDenied { side: Side::Remote, path: path.into() }
        } else {
            SshError::Sftp { op: "read", path: path.into(), message }
        }
    }
}

fn mode_attrs(mode: u32) -> FileAttributes {
    FileAttributes { permissions: Some(mode & 0o7777), ..FileAttributes::empty() }
}

/// Creates a remote directory; an existing directory is fine.
async fn make_remote_dir(sftp: &Sftp, path: &str) -> Result<(), SshError> {
    match sftp.session.create_dir(path).await {
        Ok(()) => Ok(()),
        Err(e) => match sftp.session.metadata(path).await {
            Ok(attrs) if attrs.permissions.unwrap_or(0) & S_IFMT == S_IFDIR => Ok(()),
            Ok(_) => {
                Err(SshError::Sftp { op: "mkdir", path: path.into(), message: "exists and is not a directory".into() })
            }
            Err(_) => Err(sftp.err("mkdir", path, e)),
        },
    }
}

/// `mkdir -p` of the parents of `path`.
async fn make_remote_parents(sftp: &Sftp, path: &str) -> Result<(), SshError> {
    let mut missing = Vec::new();
    let mut current = remote_parent(path);
    while let Some(dir) = current {
        if dir == "." || dir == ".." || dir.ends_with("/..") {
            break;
        }
        match sftp.session.metadata(dir).await {
            Ok(_) => break,
            Err(SftpClientError::Status(s)) if s.status_code == StatusCode::NoSuchFile => {
                missing.push(dir.to_string());
                current = remote_parent(dir);
            }
            Err(e) => return Err(sftp.err("stat", dir, e)),
        }
    }
    for dir in missing.iter().rev() {
        make_remote_dir(sftp, dir).await?;
    }
    Ok(())
}

/// Copies a local file or tree to `remote`.
pub(crate) async fn upload(
    sftp: &Sftp,
    local: &Path,
    remote: &str,
    options: &TransferOptions,
) -> Result<TransferReport, SshError> {
    let remote = resolve_remote_path(remote, options.base.as_deref())?;
    let meta = tokio::fs::metadata(local).await.map_err(|e| SshError::local(local, e))?;
    if !meta.is_dir() && !meta.is_file() {
        return Err(SshError::InvalidRequest(format!("{} is not a regular file or directory", local.display())));
    }
    if options.create_parents {
        make_remote_parents(sftp, &remote).await?;
    }
    let mut report = TransferReport::default();
    let mut buf = vec![0u8; CHUNK];
    if meta.is_file() {
        upload_file(sftp, local, &remote, meta.permissions().mode(), options, &mut buf, &mut report).await?;
        return Ok(report);
    }
    // Directory modes are applied last, deepest first, so read-only directories can be filled.
    let mut dir_modes = Vec::new();
    let mut stack = vec![(local.to_path_buf(), remote, meta.permissions().mode())];
    while let Some((local_dir, remote_dir, mode)) = stack.pop() {
        make_remote_dir(sftp, &remote_dir).await?;
        report.directories += 1;
        let mut entries = tokio::fs::read_dir(&local_dir).await.map_err(|e| SshError::local(&local_dir, e))?;
        while let Some(entry) = entries.next_entry().await.map_err(|e| SshError::local(&local_dir, e))? {
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                report.skipped.push(path.display().to_string());
                continue;
            };
            let meta = tokio::fs::symlink_metadata(&path).await.map_err(|e| SshError::local(&path, e))?;
            let target = join_remote(&remote_dir, &name);
            if meta.is_dir() {
                stack.push((path, target, meta.permissions().mode()));
            } else if meta.is_file() {
                let mode = meta.permissions().mode();
                upload_file(sftp, &path, &target, mode, options, &mut buf, &mut report).await?;
            } else {
                report.skipped.push(path.display().to_string());
            }
        }
        dir_modes.push((remote_dir, mode));
    }
    if options.preserve_mode {
        for (dir, mode) in dir_modes.iter().rev() {
            sftp.session.set_metadata(dir.as_str(), mode_attrs(*mode)).await.map_err(|e| sftp.err("chmod", dir, e))?;
        }
    }
    Ok(report)
}

async fn upload_file(
    sftp: &Sftp,
    local: &Path,
    remote: &str,
    mode: u32,
    options: &TransferOptions,
    buf: &mut [u8],
    report: &mut TransferReport,
) -> Result<(), SshError> {
    let mut src = tokio::fs::File::open(local).await.map_err(|e| SshError::local(local, e))?;
    let mut dst = sftp.session.create(remote).await.map_err(|e| sftp.err("open", remote, e))?;
    let mut copied = 0u64;
    let result = async {
        loop {
            let n = src.read(buf).await.map_err(|e| SshError::local(local, e))?;
            if n == 0 {
                break;
            }
            if let Err(e) = dst.write_all(&buf[..n]).await {
                return Err(sftp.write_error(remote, e.to_string()).await);
            }
            copied += n as u64;
        }
        // Waits for every outstanding write to be acknowledged.
        if let Err(e) = dst.shutdown().await {
            return Err(sftp.write_error(remote, e.to_string()).await);
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        drop(dst);
        // Do not leave a truncated copy behind (but never remove a device or other non-file).
        if let Ok(attrs) = sftp.session.symlink_metadata(remote).await
            && attrs.permissions.unwrap_or(0) & S_IFMT == S_IFREG
        {
            let _ = sftp.session.remove_file(remote).await;
        }
        return Err(e);
    }
    if options.preserve_mode {
        sftp.session.set_metadata(remote, mode_attrs(mode)).await.map_err(|e| sftp.err("chmod", remote, e))?;
    }
    report.files += 1;
    report.bytes += copied;
    Ok(())
}

/// Copies a remote file or tree to `local`.
pub(crate) async fn download(
    sftp: &Sftp,
    remote: &str,
    local: &Path,
    options: &TransferOptions,
) -> Result<TransferReport, SshError> {
    let remote = resolve_remote_path(remote, options.base.as_deref())?;
    let attrs = sftp.session.metadata(remote.as_str()).await.map_err(|e| sftp.err("stat", &remote, e))?;
    let mode = attrs.permissions.unwrap_or(0);
    if options.create_parents
        && let Some(parent) = local.parent().filter(|p| !p.as_os_str().is_empty())
    {
        tokio::fs::create_dir_all(parent).await.map_err(|e| SshError::local(parent, e))?;
    }
    let mut report = TransferReport::default();
    let mut buf = vec![0u8; CHUNK];
    match mode & S_IFMT {
        S_IFREG => {
            download_file(sftp, &remote, local, mode, options, &mut buf, &mut report).await?;
            return Ok(report);
        }
        S_IFDIR => {}
        _ => {
            return Err(SshError::InvalidRequest(format!("remote {remote} is not a regular file or directory")));
        }
    }
    let mut dir_modes = Vec::new();
    let mut stack = vec![(remote, local.to_path_buf(), mode)];
    while let Some((remote_dir, local_dir, mode)) = stack.pop() {
        make_local_dir(&local_dir).await?;
        report.directories += 1;
        let entries =
            sftp.session.read_dir(remote_dir.as_str()).await.map_err(|e| sftp.err("readdir", &remote_dir, e))?;
        for entry in entries {
            let name = entry.file_name();
            let source = join_remote(&remote_dir, &name);
            if !is_plain_name(&name) {
                return Err(SshError::Sftp {
                    op: "readdir",
                    path: remote_dir.clone(),
                    message: format!("the server returned an unsafe file name {name:?}"),
                });
            }
            let entry_mode = entry.metadata().permissions.unwrap_or(0);
            let target = local_dir.join(&name);
            match entry_mode & S_IFMT {
                S_IFDIR => stack.push((source, target, entry_mode)),
                S_IFREG => download_file(sftp, &source, &target, entry_mode, options, &mut buf, &mut report).await?,
                _ => report.skipped.push(source),
            }
        }
        dir_modes.push((local_dir, mode));
    }
    if options.preserve_mode {
        for (dir, mode) in dir_modes.iter().rev() {
            set_local_mode(dir, *mode).await?;
        }
    }
    Ok(report)
}

async fn make_local_dir(path: &Path) -> Result<(), SshError> {
    match tokio::fs::create_dir(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(SshError::local(path, e)),
    }
}

async fn set_local_mode(path: &Path, mode: u32) -> Result<(), SshError> {
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
        .await
        .map_err(|e| SshError::local(path, e))
}

async fn download_file(
    sftp: &Sftp,
    remote: &str,
    local: &Path,
    mode: u32,
    options: &TransferOptions,
    buf: &mut [u8],
    report: &mut TransferReport,
) -> Result<(), SshError> {
    let mut src = sftp.session.open(remote).await.map_err(|e| sftp.err("open", remote, e))?;
    let mut dst = tokio::fs::File::create(local).await.map_err(|e| SshError::local(local, e))?;
    let mut copied = 0u64;
    let result = async {
        loop {
            let n = src.read(buf).await.map_err(|e| sftp.read_err(remote, e))?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).await.map_err(|e| SshError::local(local, e))?;
            copied += n as u64;
        }
        dst.flush().await.map_err(|e| SshError::local(local, e))?;
        Ok::<(), SshError>(())
    }
    .await;
    drop(dst);
    let _ = src.close().await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(local).await; // do not leave a truncated copy
        return Err(e);
    }
    if options.preserve_mode {
        set_local_mode(local, mode).await?;
    }
    report.files += 1;
    report.bytes += copied;
    Ok(())
}

/// A remote regular file open for writing, created (parents too, when asked) and truncated.
/// [`RemoteWriter::finish`] waits for every write to be acknowledged and applies the mode;
/// [`RemoteWriter::abort`] removes the partial file.
pub struct RemoteWriter {
    file: russh_sftp::client::fs::File,
    sftp: Sftp,
    path: String,
    mode: u32,
    preserve_mode: bool,
    written: u64,
}

impl RemoteWriter {
    /// The normalized remote path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data` (waits while the server's window is full).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), SshError> {
        if let Err(e) = self.file.write_all(data).await {
            return Err(self.sftp.write_error(&self.path, e.to_string()).await);
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Completes the file: waits for the outstanding writes, closes it and sets its mode.
    /// Returns the bytes written. On failure the partial file is removed.
    pub async fn finish(mut self) -> Result<u64, SshError> {
        if let Err(e) = self.file.shutdown().await {
            let e = self.sftp.write_error(&self.path, e.to_string()).await;
            self.abort().await;
            return Err(e);
        }
        if self.preserve_mode
            && let Err(e) = self.sftp.session.set_metadata(self.path.as_str(), mode_attrs(self.mode)).await
        {
            let e = self.sftp.err("chmod", &self.path, e);
            self.abort().await;
            return Err(e);
        }
        Ok(self.written)
    }

    /// Drops the file and removes what was written (never a non-regular file).
    pub async fn abort(self) {
        let RemoteWriter { file, sftp, path, .. } = self;
        drop(file);
        if let Ok(attrs) = sftp.session.symlink_metadata(path.as_str()).await
            && attrs.permissions.unwrap_or(0) & S_IFMT == S_IFREG
        {
            let _ = sftp.session.remove_file(path.as_str()).await;
        }
    }
}

/// Small reads of remote files over one SFTP session, for callers that look again and again
/// (a session's output and status files): a missing file is `None`, not an error.
pub struct RemoteFs {
    sftp: Sftp,
}

impl RemoteFs {
    pub(crate) fn new(sftp: Sftp) -> RemoteFs {
        RemoteFs { sftp }
    }

    /// Up to `max` bytes of `path` from `offset` (fewer at its end, none past it); `None` when
    /// the file does not exist.
    pub async fn read_at(&self, path: &str, offset: u64, max: usize) -> Result<Option<Vec<u8>>, SshError> {
        use tokio::io::AsyncSeekExt;
        let mut file = match self.sftp.session.open(path).await {
            Ok(f) => f,
            Err(SftpClientError::Status(s)) if s.status_code == StatusCode::NoSuchFile => return Ok(None),
            Err(e) => return Err(self.sftp.err("open", path, e)),
        };
        if offset > 0 {
            file.seek(std::io::SeekFrom::Start(offset)).await.map_err(|e| self.sftp.read_err(path, e))?;
        }
        let mut out = vec![0u8; max];
        let mut filled = 0;
        while filled < max {
            let n = file.read(&mut out[filled..]).await.map_err(|e| self.sftp.read_err(path, e))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        out.truncate(filled);
        Ok(Some(out))
    }

    /// The names and sizes of the regular files in `dir`; `None` when it does not exist.
    pub async fn list(&self, dir: &str) -> Result<Option<Vec<(String, u64)>>, SshError> {
        let entries = match self.sftp.session.read_dir(dir).await {
            Ok(e) => e,
            Err(SftpClientError::Status(s)) if s.status_code == StatusCode::NoSuchFile => return Ok(None),
            Err(e) => return Err(self.sftp.err("readdir", dir, e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let meta = entry.metadata();
            let name = entry.file_name();
            if is_plain_name(&name) && meta.permissions.unwrap_or(0) & S_IFMT != S_IFDIR {
                files.push((name, meta.size.unwrap_or(0)));
            }
        }
        Ok(Some(files))
    }

    /// The names of the directories in `dir`; `None` when it does not exist.
    pub async fn dirs(&self, dir: &str) -> Result<Option<Vec<String>>, SshError> {
        let entries = match self.sftp.session.read_dir(dir).await {
            Ok(e) => e,
            Err(SftpClientError::Status(s)) if s.status_code == StatusCode::NoSuchFile => return Ok(None),
            Err(e) => return Err(self.sftp.err("readdir", dir, e)),
        };
        Ok(Some(
            entries
                .filter(|e| e.metadata().permissions.unwrap_or(0) & S_IFMT == S_IFDIR)
                .map(|e| e.file_name())
                .filter(|n| is_plain_name(n))
                .collect(),
        ))
    }
}

/// A remote regular file open for reading, with its size and mode as of opening.
pub struct RemoteReader {
    file: russh_sftp::client::fs::File,
    sftp: Sftp,
    path: String,
    size: u64,
    mode: u32,
}

impl RemoteReader {
    /// The normalized remote path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The file's size when it was opened (`fstat`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's permission bits.
    pub fn mode(&self) -> u32 {
        self.mode & 0o7777
    }

    /// Reads the next bytes into `buf`; 0 at the end of the file.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, SshError> {
        self.file.read(buf).await.map_err(|e| self.sftp.read_err(&self.path, e))
    }
}

/// Opens `remote` for writing (see [`RemoteWriter`]), creating missing parents when
/// `options.create_parents` is set.
pub(crate) async fn open_write(
    sftp: Sftp,
    remote: &str,
    mode: u32,
    options: &TransferOptions,
) -> Result<RemoteWriter, SshError> {
    let path = resolve_remote_path(remote, options.base.as_deref())?;
    if let Ok(attrs) = sftp.session.metadata(path.as_str()).await
        && attrs.permissions.unwrap_or(0) & S_IFMT == S_IFDIR
    {
        return Err(SshError::InvalidRequest(format!("remote {path} is a directory: name a file inside it")));
    }
    if options.create_parents {
        make_remote_parents(&sftp, &path).await?;
    }
    let file = sftp.session.create(path.as_str()).await.map_err(|e| sftp.err("open", &path, e))?;
    Ok(RemoteWriter { file, sftp, path, mode, preserve_mode: options.preserve_mode, written: 0 })
}

/// Opens `remote` for reading (see [`RemoteReader`]). A directory or any other non-regular
/// file is [`SshError::InvalidRequest`] saying so; a missing one [`SshError::NoSuchFile`].
pub(crate) async fn open_read(sftp: Sftp, remote: &str, options: &TransferOptions) -> Result<RemoteReader, SshError> {
    let path = resolve_remote_path(remote, options.base.as_deref())?;
    let attrs = sftp.session.metadata(path.as_str()).await.map_err(|e| sftp.err("stat", &path, e))?;
    match attrs.permissions.unwrap_or(0) & S_IFMT {
        S_IFREG => {}
        S_IFDIR => {
            return Err(SshError::InvalidRequest(format!(
                "remote {path} is a directory: download the files in it one by one (or pack them, e.g. with tar, and download the archive)"
            )));
        }
        _ => return Err(SshError::InvalidRequest(format!("remote {path} is not a regular file"))),
    }
    let file = sftp.session.open(path.as_str()).await.map_err(|e| sftp.err("open", &path, e))?;
    // The size and mode of what was opened (the path may have changed since the stat).
    let meta = file.metadata().await.map_err(|e| sftp.err("stat", &path, e))?;
    let mode = meta.permissions.unwrap_or(0);
    if mode & S_IFMT != S_IFREG && mode & S_IFMT != 0 {
        return Err(SshError::InvalidRequest(format!("remote {path} is not a regular file")));
    }
    Ok(RemoteReader { size: meta.size.unwrap_or(0), mode, file, sftp, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_base_resolve() {
        let base = Some("/home/ubuntu/work");
        assert_eq!(resolve_remote_path("a/b.txt", base).unwrap(), "/home/ubuntu/work/a/b.txt");
        assert_eq!(resolve_remote_path("./a/../c", base).unwrap(), "/home/ubuntu/work/c");
        assert_eq!(resolve_remote_path("/home/ubuntu/work", base).unwrap(), "/home/ubuntu/work");
        assert_eq!(resolve_remote_path("x", Some("/")).unwrap(), "/x");
        assert_eq!(resolve_remote_path("sub//x/", Some("/b/")).unwrap(), "/b/sub/x");
    }

    #[test]
    fn escapes_are_refused() {
        let base = Some("/home/ubuntu/work");
        for p in ["..", "../x", "a/../../x", "/etc/passwd", "/home/ubuntu/workx", "/home/ubuntu"] {
            assert!(matches!(resolve_remote_path(p, base), Err(SshError::PathEscapesBase { .. })), "{p}");
        }
        assert!(matches!(resolve_remote_path("x", Some("rel")), Err(SshError::InvalidRequest(_))));
        assert!(matches!(resolve_remote_path("", None), Err(SshError::InvalidRequest(_))));
        assert!(matches!(resolve_remote_path("a\0b", None), Err(SshError::InvalidRequest(_))));
    }

    #[test]
    fn normalization_without_base() {
        assert_eq!(resolve_remote_path("a/../../b", None).unwrap(), "../b");
        assert_eq!(resolve_remote_path("/../x", None).unwrap(), "/x");
        assert_eq!(resolve_remote_path("./", None).unwrap(), ".");
    }

    #[test]
    fn listing_names_are_checked() {
        assert!(is_plain_name("file.txt"));
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }

    #[test]
    fn parents() {
        assert_eq!(remote_parent("/a/b/c"), Some("/a/b"));
        assert_eq!(remote_parent("/a"), None);
        assert_eq!(remote_parent("a/b"), Some("a"));
        assert_eq!(remote_parent("a"), None);
    }
}
