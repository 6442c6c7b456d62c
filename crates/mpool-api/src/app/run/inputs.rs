//! A Run's inputs: each file's inline content, then its chunks from the messages after the
//! first, in the order of `inputs` (a chunk of a later input ends the current one; the end of
//! the caller's stream ends the last one), all within `[api] max_upload` together.

use futures::{Stream, StreamExt};
use mpool_ssh::{RemoteWriter, SshEndpoint};

use super::super::App;
use super::super::error::AppError;
use super::super::transfer::{file_mode, transfer_options};
use crate::proto::v1;

/// The input chunks of a Run's request stream, after its first message, with one chunk of
/// look-ahead (a chunk of the next input ends the current one).
pub struct Chunks<S> {
    stream: S,
    pending: Option<v1::InputChunk>,
}

impl<S: Stream<Item = Result<v1::RunRequest, AppError>> + Unpin> Chunks<S> {
    /// The chunks of the messages `stream` still holds.
    pub fn new(stream: S) -> Chunks<S> {
        Chunks { stream, pending: None }
    }

    /// The next chunk, or `None` once the caller ended its stream.
    pub async fn next(&mut self) -> Result<Option<v1::InputChunk>, AppError> {
        if let Some(c) = self.pending.take() {
            return Ok(Some(c));
        }
        loop {
            let Some(m) = self.stream.next().await else {
                return Ok(None);
            };
            let m = m?;
            if describes_run(&m) {
                return Err(AppError::invalid_argument(
                    "only the first message of a Run describes it (pool, command, inputs, ...); the messages after it \
                     carry input content in `chunk` only",
                ));
            }
            if let Some(c) = m.chunk {
                return Ok(Some(c));
            }
        }
    }

    /// Gives a chunk back: the next call returns it again.
    fn put_back(&mut self, c: v1::InputChunk) {
        self.pending = Some(c);
    }
}

/// Whether a Run request message carries any of the run's description (first-message fields).
fn describes_run(m: &v1::RunRequest) -> bool {
    !m.pool.is_empty()
        || !m.holder.is_empty()
        || !m.request_id.is_empty()
        || m.command.is_some()
        || !m.inputs.is_empty()
        || !m.outputs.is_empty()
        || m.wait.is_some()
        || m.ttl.is_some()
        || m.max_output_size != 0
}

/// Bytes written so far against the limit on all inputs together.
struct Budget {
    total: u64,
    limit: u64,
}

impl App {
    /// Writes a Run's inputs in order; then the caller's stream must have ended.
    pub(super) async fn write_inputs<S>(
        &self,
        vm: &str,
        target: &SshEndpoint,
        inputs: &[v1::InputFile],
        chunks: &mut Chunks<S>,
    ) -> Result<(), AppError>
    where
        S: Stream<Item = Result<v1::RunRequest, AppError>> + Unpin,
    {
        let mut budget = Budget { total: 0, limit: self.limits.max_upload };
        let opts = transfer_options("", true);
        for (index, input) in inputs.iter().enumerate() {
            let mut w = self.ssh.open_write(vm, target, &input.path, file_mode(input.mode), &opts).await?;
            if let Err(e) = write_input(&mut w, (index, inputs.len()), input, chunks, &mut budget).await {
                w.abort().await;
                return Err(e);
            }
            w.finish().await?;
        }
        match chunks.next().await? {
            None => Ok(()),
            Some(c) => Err(chunk_out_of_order(c.input as usize, inputs.len(), inputs.len())),
        }
    }
}

/// Writes input `index` (of `count`): its inline content, then its chunks.
async fn write_input<S>(
    w: &mut RemoteWriter,
    (index, count): (usize, usize),
    input: &v1::InputFile,
    chunks: &mut Chunks<S>,
    budget: &mut Budget,
) -> Result<(), AppError>
where
    S: Stream<Item = Result<v1::RunRequest, AppError>> + Unpin,
{
    for part in [input.data.as_slice(), input.text.as_bytes()] {
        if !part.is_empty() {
            budget.total = budget.total.saturating_add(part.len() as u64);
            w.write(part).await?;
        }
    }
    while let Some(c) = chunks.next().await? {
        let i = c.input as usize;
        if i > index && i < count {
            chunks.put_back(c);
            break;
        }
        if i != index {
            return Err(chunk_out_of_order(i, index, count));
        }
        budget.total = budget.total.saturating_add(c.data.len() as u64);
        if budget.total > budget.limit {
            return Err(AppError::resource_exhausted(format!(
                "inputs are more than the server's {} byte limit together (at {}); send fewer or smaller files, or \
                 ask the operator to raise [api] max_upload",
                budget.limit, input.path
            )));
        }
        w.write(&c.data).await?;
    }
    Ok(())
}

fn chunk_out_of_order(got: usize, at: usize, count: usize) -> AppError {
    AppError::invalid_argument(if got >= count {
        format!(
            "a chunk names input {got}, but the Run lists {count} inputs (indexes 0 to {})",
            count.saturating_sub(1)
        )
    } else {
        format!(
            "a chunk of input {got} arrived after input {at}'s: send all chunks of one input before those of the next, \
             in the order of `inputs`"
        )
    })
}
