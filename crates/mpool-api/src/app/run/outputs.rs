//! A Run's outputs: each file read after the command and streamed as `output` events. A file
//! that is missing, unreadable or above the output limit is listed with the reason, never
//! failing the Run (the exit status is what the caller came for).

use mpool_ssh::{RemoteReader, SshEndpoint, SshError};

use super::super::App;
use super::super::error::AppError;
use super::super::transfer::{ChunkReader, transfer_options};
use super::{Sender, event};
use crate::proto::v1;
use v1::run_event::Event;

/// The files a Run reads after its command.
pub struct Outputs {
    /// Their paths, in order.
    pub paths: Vec<String>,
    /// Outputs larger than this are omitted.
    pub limit: u64,
    /// Which limit `limit` is, for messages.
    pub limit_name: &'static str,
}

impl App {
    /// Reads the outputs in order. `None` when the caller went away.
    pub(super) async fn send_outputs(
        &self,
        vm: &str,
        target: &SshEndpoint,
        outputs: &Outputs,
        tx: &Sender,
    ) -> Option<Vec<v1::OutputFile>> {
        let mut files = Vec::with_capacity(outputs.paths.len());
        for (index, path) in (0u32..).zip(outputs.paths.iter()) {
            let limit = (outputs.limit, outputs.limit_name);
            files.push(self.send_output(vm, target, index, path, limit, tx).await?);
        }
        Some(files)
    }

    /// Reads one output and streams it as `output` events. `None` when the caller went away.
    async fn send_output(
        &self,
        vm: &str,
        target: &SshEndpoint,
        index: u32,
        path: &str,
        (limit, limit_name): (u64, &str),
        tx: &Sender,
    ) -> Option<v1::OutputFile> {
        let mut file = v1::OutputFile { path: path.to_string(), ..Default::default() };
        let opts = transfer_options("", false);
        let reader = match self.ssh.open_read(vm, target, path, &opts).await {
            Ok(r) => r,
            Err(SshError::NoSuchFile { .. }) => {
                file.missing = true;
                return Some(file);
            }
            Err(e) => {
                file.error = AppError::from(e).message().to_string();
                return Some(file);
            }
        };
        (file.size, file.mode) = (reader.size(), reader.mode());
        if file.size > limit {
            file.omitted = true;
            file.error = format!(
                "{path} is {} bytes, above the {limit} byte limit ({limit_name}): not sent; compress or split it in the \
                 command, or fetch it with Acquire + Download",
                file.size
            );
            return Some(file);
        }
        stream_output(reader, index, limit, file, tx).await
    }
}

/// Streams an open output as `output` events; the file's listing comes back with its size as
/// read (or the error that cut it short). `None` when the caller went away.
async fn stream_output(
    reader: RemoteReader,
    index: u32,
    limit: u64,
    mut file: v1::OutputFile,
    tx: &Sender,
) -> Option<v1::OutputFile> {
    let mut chunks = ChunkReader::new(reader, limit, file.path.clone());
    loop {
        let next = tokio::select! {
            next = chunks.next() => next,
            _ = tx.closed() => return None,
        };
        match next {
            Ok(Some((offset, data))) => {
                let chunk = v1::OutputChunk { output: index, data, offset };
                tx.send(Ok(event(Event::Output(chunk)))).await.ok()?;
                // An empty file's one chunk ends it: listed whether or not the caller stays.
                if chunks.finished() {
                    file.size = chunks.offset();
                    return Some(file);
                }
            }
            Ok(None) => {
                file.size = chunks.offset();
                return Some(file);
            }
            Err(e) => {
                file.error = e.message().to_string();
                return Some(file);
            }
        }
    }
}
