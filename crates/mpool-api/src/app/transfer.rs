//! Files on a leased VM: Upload writes one from a stream of messages (content in order, up to
//! `[api] max_upload`), Download streams one back in chunks (up to `[api] max_download`). Both
//! keep the lease in use while they run; paths are checked before anything is opened.

use futures::{Stream, StreamExt};
use mpool_ssh::{RemoteReader, RemoteWriter, TransferOptions};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::AppError;
use super::lease_use::InUse;
use super::validate::{self, MAX_PATH};
use super::{App, Events};
use crate::auth::Principal;
use crate::proto::v1;

/// Bytes per chunk of a Download or a Run output.
pub const CHUNK: usize = 256 * 1024;

impl App {
    /// Writes a file in the lease's VM from `input`: the first message names the lease and the
    /// path; every message's `data` and `text` are the content, in order.
    pub async fn upload<S>(&self, p: Option<&Principal>, mut input: S) -> Result<v1::UploadResponse, AppError>
    where
        S: Stream<Item = Result<v1::UploadRequest, AppError>> + Unpin,
    {
        let first = input
            .next()
            .await
            .transpose()?
            .ok_or_else(|| AppError::invalid_argument("empty upload: the first message needs lease_id and path"))?;
        validate::required("lease_id", &first.lease_id)?;
        validate::required("path", &first.path)?;
        validate::capped("base", &first.base, MAX_PATH)?;
        let remote = mpool_ssh::resolve_remote_path(&first.path, base(&first.base))?;
        let (info, target, _guard) = self.use_lease(&first.lease_id, p).await?;
        let opts = transfer_options(&first.base, true);
        let mut w = self.ssh.open_write(&info.record.vm, &target, &first.path, file_mode(first.mode), &opts).await?;
        let (limit, what) = (self.limits.max_upload, first.path.clone());
        if let Err(e) = copy_in(&mut w, first, &mut input, limit, &what).await {
            w.abort().await;
            return Err(e);
        }
        let size = w.finish().await?;
        Ok(v1::UploadResponse { path: remote, size })
    }

    /// Streams a file of the lease's VM back in chunks; the first chunk carries its size and
    /// mode. Dropping the stream stops the reads.
    pub async fn download(
        &self,
        p: Option<&Principal>,
        r: v1::DownloadRequest,
    ) -> Result<Events<v1::DownloadChunk>, AppError> {
        validate::required("path", &r.path)?;
        validate::capped("base", &r.base, MAX_PATH)?;
        mpool_ssh::resolve_remote_path(&r.path, base(&r.base))?;
        let (info, target, guard) = self.use_lease(&r.lease_id, p).await?;
        let opts = transfer_options(&r.base, false);
        let reader = self.ssh.open_read(&info.record.vm, &target, &r.path, &opts).await?;
        let limit = self.limits.max_download;
        if reader.size() > limit {
            return Err(AppError::resource_exhausted(format!(
                "{} is {} bytes, above the server's {limit} byte limit for downloads: compress or split it in the VM \
                 first, or ask the operator to raise [api] max_download",
                r.path,
                reader.size()
            )));
        }
        // A small channel: the SFTP reads run at the pace the caller takes the chunks.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(send_chunks(reader, limit, guard, tx));
        Ok(ReceiverStream::new(rx))
    }
}

/// Writes an Upload's content: the first message's, then each following message's.
async fn copy_in<S>(
    w: &mut RemoteWriter,
    first: v1::UploadRequest,
    input: &mut S,
    limit: u64,
    what: &str,
) -> Result<(), AppError>
where
    S: Stream<Item = Result<v1::UploadRequest, AppError>> + Unpin,
{
    let mut msg = Some(first);
    while let Some(m) = msg {
        for part in [m.data.as_slice(), m.text.as_bytes()] {
            if part.is_empty() {
                continue;
            }
            if w.written().saturating_add(part.len() as u64) > limit {
                return Err(upload_too_large(what, limit));
            }
            w.write(part).await?;
        }
        msg = input.next().await.transpose()?;
    }
    Ok(())
}

/// Reads a Download's file into `tx` chunk by chunk, at the caller's pace; stops when the
/// caller goes away. The lease stays in use (`_guard`) until it ends.
async fn send_chunks(
    reader: RemoteReader,
    limit: u64,
    _guard: InUse,
    tx: mpsc::Sender<Result<v1::DownloadChunk, AppError>>,
) {
    let (size, mode) = (reader.size(), reader.mode());
    let name = reader.path().to_string();
    let mut chunks = ChunkReader::new(reader, limit, name);
    loop {
        let next = tokio::select! {
            next = chunks.next() => next,
            _ = tx.closed() => return,
        };
        let chunk = match next {
            Ok(Some((offset, data))) => {
                let first = offset == 0;
                v1::DownloadChunk {
                    data,
                    offset,
                    size: if first { size } else { 0 },
                    mode: if first { mode } else { 0 },
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
    }
}

/// A file read in chunks of [`CHUNK`] bytes, refusing to read past `limit` (the file may grow
/// while it is read). An empty file is one empty chunk, so a reader always gets one.
pub struct ChunkReader {
    reader: RemoteReader,
    limit: u64,
    /// The file's name in messages.
    name: String,
    buf: Vec<u8>,
    offset: u64,
    done: bool,
}

impl ChunkReader {
    /// Reads `reader` up to `limit` bytes.
    pub fn new(reader: RemoteReader, limit: u64, name: String) -> ChunkReader {
        ChunkReader { reader, limit, name, buf: vec![0u8; CHUNK], offset: 0, done: false }
    }

    /// The next chunk and its offset; `None` at the end of the file.
    pub async fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>, AppError> {
        if self.done {
            return Ok(None);
        }
        let n = self.reader.read(&mut self.buf).await?;
        let Some(end) = self.offset.checked_add(n as u64).filter(|end| *end <= self.limit) else {
            return Err(grew_past(&self.name, self.limit));
        };
        if n == 0 {
            self.done = true;
            if self.offset > 0 {
                return Ok(None);
            }
        }
        let chunk = (self.offset, self.buf[..n].to_vec());
        self.offset = end;
        Ok(Some(chunk))
    }

    /// The bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the end of the file was read (the next call returns `None`).
    pub fn finished(&self) -> bool {
        self.done
    }
}

/// A `base` field: `None` when empty.
fn base(base: &str) -> Option<&str> {
    (!base.is_empty()).then_some(base)
}

/// A file mode from the API (0: the default 0644).
pub fn file_mode(mode: u32) -> u32 {
    if mode == 0 { 0o644 } else { mode & 0o7777 }
}

/// How files are opened: relative to `base` (if any), parent directories created for writes,
/// modes kept.
pub fn transfer_options(base: &str, create_parents: bool) -> TransferOptions {
    TransferOptions { base: (!base.is_empty()).then(|| base.to_string()), create_parents, preserve_mode: true }
}

fn upload_too_large(path: &str, limit: u64) -> AppError {
    AppError::resource_exhausted(format!(
        "upload to {path} is larger than the server's {limit} byte limit; send a smaller file (compress or split it), \
         or ask the operator to raise [api] max_upload"
    ))
}

/// A file that grew past `limit` while it was read.
pub fn grew_past(path: &str, limit: u64) -> AppError {
    AppError::resource_exhausted(format!(
        "{path} grew past the {limit} byte limit while it was read; read it once it is complete"
    ))
}
