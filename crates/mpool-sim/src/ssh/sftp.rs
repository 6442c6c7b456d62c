//! The `sftp` subsystem of an endpoint: an SFTP server (russh-sftp) per channel, confined to
//! the instance's root directory through a [`Confined`] root, so that every path is resolved
//! by the kernel beneath it and no symlink, not even one swapped in while a call runs, leads
//! out of it. File work runs on blocking threads; I/O errors become SFTP statuses.
//!
//! It must not open, stat or change anything by a host path of its own: every file-system
//! access goes through the confined root (see [`crate::beneath`]). Nor does it run commands.

use std::collections::HashMap;
use std::fs::{File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::server::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use russh_sftp::protocol::{
    Attrs, Data, File as SftpFile, FileAttributes, Handle as SftpHandleReply, Name, OpenFlags, Status, StatusCode,
    Version,
};
use russh_sftp::server::StatusReply;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Ctx, Tracker, stopped};
use crate::beneath::{Confined, OpenMode};
use crate::fork_window;

/// Largest SFTP read served at once.
const SFTP_MAX_READ: u32 = 256 * 1024;
/// Buffer between an SFTP channel and its server, each way.
const SFTP_PIPE: usize = 512 * 1024;
/// Open SFTP handles allowed per SFTP session.
const SFTP_MAX_HANDLES: usize = 1024;
/// Directory entries per SSH_FXP_NAME reply.
const READDIR_BATCH: usize = 128;

/// Serves the `sftp` subsystem on a channel until the client is done, then reports exit
/// status 0 as sshd does for a normal sftp-server exit (`scp` insists on it).
pub(super) async fn run_sftp(
    mut rx: ChannelReadHalf,
    tx: ChannelWriteHalf<Msg>,
    ctx: &Ctx,
    shutdown: &mut watch::Receiver<bool>,
    tracker: Tracker,
) {
    debug!(root = %ctx.root.display(), "sftp session started");
    let root = ctx.root.clone();
    let confined = match tokio::task::spawn_blocking(move || Confined::open(&root)).await {
        Ok(Ok(c)) => Arc::new(c),
        other => {
            warn!(root = %ctx.root.display(), "cannot open the instance directory for SFTP: {other:?}");
            let _ = tx.exit_status(1).await;
            let _ = tx.close().await;
            return;
        }
    };
    let (ours, theirs) = tokio::io::duplex(SFTP_PIPE);
    russh_sftp::server::run(
        theirs,
        SftpSession { root: confined, handles: HashMap::new(), next_handle: 0, initialized: false, _tracker: tracker },
    )
    .await;
    let (mut from_sftp, mut to_sftp) = tokio::io::split(ours);
    // Replies go out in their own task, waiting for window space as needed, so that a
    // server blocked on replying never stops requests from being read.
    let mut out = tx.make_writer();
    let mut replies = tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut from_sftp, &mut out).await {
            debug!("sending sftp replies failed: {e}");
        }
    });
    let end = loop {
        tokio::select! {
            msg = rx.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if to_sftp.write_all(&data).await.is_err() {
                        break SftpEnd::Done;
                    }
                }
                Some(ChannelMsg::Eof) => break SftpEnd::Done,
                Some(ChannelMsg::Close) | None => break SftpEnd::ClientGone,
                Some(_) => {}
            },
            _ = stopped(shutdown) => break SftpEnd::Shutdown,
        }
    };
    // End of requests: the SFTP server finishes and drops its end, which ends the replies.
    let _ = to_sftp.shutdown().await;
    drop(to_sftp);
    let end = match end {
        SftpEnd::Done => loop {
            tokio::select! {
                _ = &mut replies => break SftpEnd::Done,
                msg = rx.wait() => {
                    if matches!(msg, Some(ChannelMsg::Close) | None) {
                        break SftpEnd::ClientGone;
                    }
                }
                _ = stopped(shutdown) => break SftpEnd::Shutdown,
            }
        },
        other => other,
    };
    match end {
        SftpEnd::Done => {
            let _ = tx.exit_status(0).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
        }
        SftpEnd::ClientGone => replies.abort(),
        SftpEnd::Shutdown => {
            replies.abort();
            let _ = tx.close().await;
        }
    }
    debug!("sftp session ended");
}

/// Why an SFTP channel ended.
enum SftpEnd {
    /// The client sent EOF (or the SFTP server stopped reading).
    Done,
    /// The client closed the channel or the session went away.
    ClientGone,
    /// The endpoint is shutting down.
    Shutdown,
}

/// An open SFTP handle.
enum SftpHandle {
    File {
        file: Arc<File>,
        /// Open for writing: its close waits out forks that may hold a copy (see
        /// [`crate::fork_window`]).
        writable: bool,
    },
    Dir {
        /// The open directory (for its attributes).
        dir: Arc<File>,
        /// `None` once exhausted (or while a batch is being read).
        entries: Option<std::fs::ReadDir>,
        /// Whether "." and ".." are still to be listed.
        dots_pending: bool,
    },
}

/// SFTP server of one channel, confined to the instance root: every path is resolved by the
/// kernel beneath it (see [`crate::beneath`]), so no symlink, not even one swapped in while a
/// call runs, leads out of it.
struct SftpSession {
    root: Arc<Confined>,
    handles: HashMap<String, SftpHandle>,
    next_handle: u64,
    initialized: bool,
    _tracker: Tracker,
}

fn status_ok(id: u32) -> Status {
    Status { id, status_code: StatusCode::Ok, error_message: "Ok".to_string(), language_tag: "en-US".to_string() }
}

/// Maps an I/O error to an SFTP status.
fn io_status(e: io::Error) -> StatusReply {
    match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile.with_message(e.to_string()),
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied.with_message(e.to_string()),
        _ => StatusCode::Failure.with_message(e.to_string()),
    }
}

fn outside_root() -> io::Error {
    crate::beneath::outside()
}

fn invalid_handle() -> StatusReply {
    StatusCode::Failure.with_message("invalid handle")
}

/// Runs blocking file-system work off the async threads, mapping errors to SFTP statuses.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> Result<T, StatusReply> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(io_status(e)),
        Err(e) => Err(StatusCode::Failure.with_message(format!("internal error: {e}"))),
    }
}

fn unix_time(t: io::Result<SystemTime>) -> Option<u32> {
    let secs = t.ok()?.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(u32::try_from(secs).unwrap_or(u32::MAX))
}

/// SFTP attributes of a file (the mode carries the file type bits).
fn attrs_of(meta: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(meta.len()),
        uid: Some(meta.uid()),
        user: None,
        gid: Some(meta.gid()),
        group: None,
        permissions: Some(meta.mode()),
        atime: unix_time(meta.accessed()),
        mtime: unix_time(meta.modified()),
    }
}

fn file_times(attrs: &FileAttributes) -> Option<FileTimes> {
    if attrs.atime.is_none() && attrs.mtime.is_none() {
        return None;
    }
    let mut times = FileTimes::new();
    if let Some(atime) = attrs.atime {
        times = times.set_accessed(UNIX_EPOCH + Duration::from_secs(atime.into()));
    }
    if let Some(mtime) = attrs.mtime {
        times = times.set_modified(UNIX_EPOCH + Duration::from_secs(mtime.into()));
    }
    Some(times)
}

/// Applies size, permissions and times (uid/gid are ignored) to an open file.
fn apply_attrs_file(file: &File, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        file.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(times) = file_times(attrs) {
        file.set_times(times)?;
    }
    Ok(())
}

/// Applies size, permissions and times (uid/gid are ignored) to a path.
fn apply_attrs_path(path: &Path, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        OpenOptions::new().write(true).open(path)?.set_len(size)?;
    }
    if let Some(mode) = attrs.permissions {
        std::fs::set_permissions(path, Permissions::from_mode(mode & 0o7777))?;
    }
    if let Some(times) = file_times(attrs) {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => OpenOptions::new().write(true).open(path)?,
            Err(e) => return Err(e),
        };
        file.set_times(times)?;
    }
    Ok(())
}

/// Reads up to `len` bytes at `offset` (short only at end of file).
fn read_at_most(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while let Some(dst) = buf.get_mut(filled..).filter(|d| !d.is_empty()) {
        let at = offset
            .checked_add(filled as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        match file.read_at(dst, at) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Lists up to [`READDIR_BATCH`] entries (with lstat attributes) of an open directory.
fn read_dir_batch(
    dir: &File,
    mut entries: std::fs::ReadDir,
    dots_pending: bool,
) -> io::Result<(Vec<SftpFile>, Option<std::fs::ReadDir>)> {
    let mut files = Vec::new();
    if dots_pending {
        let attrs = attrs_of(&dir.metadata()?);
        files.push(SftpFile::new(".", attrs.clone()));
        files.push(SftpFile::new("..", attrs));
    }
    while files.len() < READDIR_BATCH {
        match entries.next() {
            None => return Ok((files, None)),
            Some(Ok(entry)) => {
                // DirEntry::metadata does not follow symlinks; entries deleted meanwhile
                // are skipped.
                if let Ok(meta) = entry.metadata() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    files.push(SftpFile::new(name, attrs_of(&meta)));
                }
            }
            Some(Err(e)) => return Err(e),
        }
    }
    Ok((files, Some(entries)))
}

impl SftpSession {
    fn file(&self, handle: &str) -> Result<Arc<File>, StatusReply> {
        match self.handles.get(handle) {
            Some(SftpHandle::File { file, .. }) => Ok(file.clone()),
            _ => Err(invalid_handle()),
        }
    }

    fn insert_handle(&mut self, handle: SftpHandle) -> Result<String, StatusReply> {
        if self.handles.len() >= SFTP_MAX_HANDLES {
            return Err(StatusCode::Failure.with_message("too many open handles"));
        }
        self.next_handle += 1;
        let name = self.next_handle.to_string();
        self.handles.insert(name.clone(), handle);
        Ok(name)
    }

    /// Resolves `path` inside the root on a blocking thread and runs `f` on the result.
    /// Maps `path` into the root on a blocking thread and runs `f` with the root and the
    /// relative path (which `f` must use through the root, confined).
    async fn at_path<T: Send + 'static>(
        &self,
        path: String,
        f: impl FnOnce(&Confined, PathBuf) -> io::Result<T> + Send + 'static,
    ) -> Result<T, StatusReply> {
        let root = self.root.clone();
        blocking(move || {
            let rel = root.relative(&path)?;
            f(&root, rel)
        })
        .await
    }
}

impl russh_sftp::server::Handler for SftpSession {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(&mut self, version: u32, _extensions: HashMap<String, String>) -> Result<Version, Self::Error> {
        if self.initialized {
            return Err(StatusCode::Failure.with_message("duplicate SSH_FXP_INIT"));
        }
        self.initialized = true;
        debug!(version, "sftp init");
        Ok(Version::new())
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<SftpHandleReply, Self::Error> {
        let how = OpenMode {
            read: pflags.contains(OpenFlags::READ),
            write: pflags.contains(OpenFlags::WRITE),
            append: pflags.contains(OpenFlags::APPEND),
            create: pflags.contains(OpenFlags::CREATE),
            create_new: pflags.contains(OpenFlags::CREATE) && pflags.contains(OpenFlags::EXCLUDE),
            truncate: pflags.contains(OpenFlags::TRUNCATE),
            mode: attrs.permissions.map_or(0o666, |m| m & 0o7777),
        };
        let file = self.at_path(filename, move |root, rel| root.open_file(&rel, how)).await?;
        let writable = how.write || how.append;
        let handle = self.insert_handle(SftpHandle::File { file: Arc::new(file), writable })?;
        Ok(SftpHandleReply { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(SftpHandle::File { file, writable: true }) => {
                // The client may run the file next: report it closed only once no forked child
                // still holds it open for writing (which would make that fail with ETXTBSY).
                blocking(move || {
                    drop(file);
                    fork_window::wait_for_forks();
                    Ok(())
                })
                .await?;
                Ok(status_ok(id))
            }
            Some(_) => Ok(status_ok(id)),
            None => Err(invalid_handle()),
        }
    }

    async fn read(&mut self, id: u32, handle: String, offset: u64, len: u32) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        let len = len.min(SFTP_MAX_READ) as usize;
        let data = blocking(move || read_at_most(&file, offset, len)).await?;
        if data.is_empty() && len > 0 {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Data { id, data })
    }

    async fn write(&mut self, id: u32, handle: String, offset: u64, data: Vec<u8>) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        blocking(move || file.write_all_at(&data, offset)).await?;
        Ok(status_ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = self.at_path(path, |root, rel| root.metadata(&rel, false)).await?;
        Ok(Attrs { id, attrs: attrs_of(&meta) })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let meta = self.at_path(path, |root, rel| root.metadata(&rel, true)).await?;
        Ok(Attrs { id, attrs: attrs_of(&meta) })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let meta = match self.handles.get(&handle) {
            Some(SftpHandle::File { file, .. }) => {
                let file = file.clone();
                blocking(move || file.metadata()).await?
            }
            Some(SftpHandle::Dir { dir, .. }) => {
                let dir = dir.clone();
                blocking(move || dir.metadata()).await?
            }
            None => return Err(invalid_handle()),
        };
        Ok(Attrs { id, attrs: attrs_of(&meta) })
    }

    async fn setstat(&mut self, id: u32, path: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        self.at_path(path, move |root, rel| {
            root.with_resolved(&rel, |p| apply_attrs_path(p, &attrs))?;
            // Setting a size opened the file for writing: as for a close (see `close`).
            fork_window::wait_for_forks();
            Ok(())
        })
        .await?;
        Ok(status_ok(id))
    }

    async fn fsetstat(&mut self, id: u32, handle: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        match self.handles.get(&handle) {
            Some(SftpHandle::File { file, .. }) => {
                let file = file.clone();
                blocking(move || apply_attrs_file(&file, &attrs)).await?;
            }
            Some(SftpHandle::Dir { dir, .. }) => {
                let dir = dir.clone();
                blocking(move || apply_attrs_file(&dir, &attrs)).await?;
            }
            None => return Err(invalid_handle()),
        }
        Ok(status_ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<SftpHandleReply, Self::Error> {
        let (dir, entries) = self.at_path(path, |root, rel| root.read_dir(&rel)).await?;
        let handle =
            self.insert_handle(SftpHandle::Dir { dir: Arc::new(dir), entries: Some(entries), dots_pending: true })?;
        Ok(SftpHandleReply { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(SftpHandle::Dir { dir, entries, dots_pending }) = self.handles.get_mut(&handle) else {
            return Err(invalid_handle());
        };
        let Some(iter) = entries.take() else {
            return Err(StatusReply::new(StatusCode::Eof));
        };
        let dots = std::mem::replace(dots_pending, false);
        let dir = dir.clone();
        let (files, rest) = blocking(move || read_dir_batch(&dir, iter, dots)).await?;
        if let Some(SftpHandle::Dir { entries, .. }) = self.handles.get_mut(&handle) {
            *entries = rest;
        }
        if files.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        self.at_path(filename, |root, rel| root.remove_file(&rel)).await?;
        Ok(status_ok(id))
    }

    async fn mkdir(&mut self, id: u32, path: String, attrs: FileAttributes) -> Result<Status, Self::Error> {
        let mode = attrs.permissions.map_or(0o777, |m| m & 0o7777);
        self.at_path(path, move |root, rel| root.create_dir(&rel, mode)).await?;
        Ok(status_ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        self.at_path(path, |root, rel| {
            if rel.as_os_str().is_empty() {
                return Err(outside_root());
            }
            root.remove_dir(&rel)
        })
        .await?;
        Ok(status_ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let real = self.at_path(path, |root, rel| root.real_path(&rel)).await?;
        Ok(Name { id, files: vec![SftpFile::dummy(real.to_string_lossy())] })
    }

    async fn rename(&mut self, id: u32, oldpath: String, newpath: String) -> Result<Status, Self::Error> {
        let root = self.root.clone();
        blocking(move || {
            let (old, new) = (root.relative(&oldpath)?, root.relative(&newpath)?);
            if old.as_os_str().is_empty() || new.as_os_str().is_empty() {
                return Err(outside_root());
            }
            root.rename(&old, &new)
        })
        .await?;
        Ok(status_ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = self.at_path(path, |root, rel| root.read_link(&rel)).await?;
        Ok(Name { id, files: vec![SftpFile::dummy(target.to_string_lossy())] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_at_most_stops_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello world").unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_at_most(&file, 6, 100).unwrap(), b"world");
        assert_eq!(read_at_most(&file, 0, 5).unwrap(), b"hello");
        assert!(read_at_most(&file, 11, 5).unwrap().is_empty());
        // Reading past any possible offset is an error or end of file, never a panic.
        assert!(read_at_most(&file, u64::MAX, 5).map_or(true, |data| data.is_empty()));
    }
}
