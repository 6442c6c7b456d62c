//! The input side of `mpool run`: `--put LOCAL:REMOTE` files described in the first request,
//! then streamed in chunks as the server takes them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use mpool_api::proto::v1;

/// Bytes per input chunk `mpool run` sends (well below the server's 8 MiB message limit).
const PUT_CHUNK: usize = 1 << 20;

/// The `--put` files: their descriptions for the request, and where to read them.
pub struct Inputs {
    /// Path in the VM and mode of each file, in `--put` order.
    pub files: Vec<v1::InputFile>,
    /// The local files, in the same order.
    pub paths: Vec<PathBuf>,
}

impl Inputs {
    /// Checks the `--put LOCAL:REMOTE` flags: each local file must be a regular file.
    pub fn parse(puts: &[String]) -> Result<Inputs, String> {
        let mut inputs = Inputs { files: Vec::new(), paths: Vec::new() };
        for p in puts {
            let (local, remote) = p.split_once(':').ok_or_else(|| format!("--put {p:?}: expected LOCAL:REMOTE"))?;
            let meta = std::fs::metadata(local).map_err(|e| format!("--put {local}: {e}"))?;
            if !meta.is_file() {
                return Err(format!("--put {local}: not a regular file (pack a directory with tar first)"));
            }
            inputs.files.push(v1::InputFile {
                path: remote.into(),
                mode: meta.permissions().mode() & 0o7777,
                ..Default::default()
            });
            inputs.paths.push(PathBuf::from(local));
        }
        Ok(inputs)
    }
}

/// The request stream of `mpool run`: the description, then each `--put` file read in
/// [`PUT_CHUNK`] pieces as the server takes them (memory stays at one chunk for any file size).
/// A file that cannot be read is reported on `failed`, and the stream then never ends: the caller
/// drops the call, so the server cancels the Run instead of running the command with a partial
/// input.
pub fn requests(
    first: v1::RunRequest,
    puts: Vec<PathBuf>,
    failed: watch::Sender<Option<String>>,
) -> impl futures::Stream<Item = v1::RunRequest> + Send + 'static {
    let state = (0usize, None::<tokio::fs::File>, Arc::new(puts), failed);
    let rest = futures::stream::unfold(state, |(mut index, mut file, puts, failed)| async move {
        while index < puts.len() {
            match read_chunk(&mut file, &puts[index]).await {
                Ok(buf) if buf.is_empty() => {
                    index += 1;
                    file = None;
                }
                Ok(data) => {
                    let chunk = v1::InputChunk { input: index as u32, data };
                    let req = v1::RunRequest { chunk: Some(chunk), ..Default::default() };
                    return Some((req, (index, file, puts, failed)));
                }
                Err(e) => {
                    failed.send_replace(Some(format!("--put {}: {e}", puts[index].display())));
                    futures::future::pending::<()>().await;
                    return None;
                }
            }
        }
        None
    });
    futures::stream::once(async move { first }).chain(rest)
}

/// The next chunk of `path` (opened into `file` on the first read); empty at its end.
async fn read_chunk(file: &mut Option<tokio::fs::File>, path: &Path) -> std::io::Result<Vec<u8>> {
    let f = match file {
        Some(f) => f,
        None => file.insert(tokio::fs::File::open(path).await?),
    };
    let mut buf = vec![0u8; PUT_CHUNK];
    let n = f.read(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

/// Resolves with the error of a `--put` file that could not be read; never resolves otherwise
/// (also not once the request stream has ended and dropped its sender).
pub async fn failure(failed: &mut watch::Receiver<Option<String>>) -> String {
    match failed.wait_for(Option::is_some).await {
        Ok(e) => e.clone().unwrap_or_default(),
        Err(_) => futures::future::pending().await,
    }
}
