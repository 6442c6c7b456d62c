//! The facade's answers: `mpool.v1` messages in the proto3 JSON mapping, and the two streams
//! (Exec, Run) collected into one answer each. Those are built from the generated messages too,
//! reshaped the same way for every field, so new fields of `ExitStatus`, `RunResult` or
//! `OutputFile` appear without code:
//!
//! - the `ExitStatus` fields at the top level, its `code` as [`EXIT_CODE`];
//! - the streams' text as [`STREAMS`] (each cut at [`MAX_STREAM`] bytes, flagged);
//! - Exec: the exec id as `execId`;
//! - Run: the `RunResult` fields besides `exit`, the lease id as `leaseId`, and each output
//!   file with its content as base64 `data` (up to [`MAX_OUTPUTS`] bytes for all of them; one
//!   that does not fit is listed `omitted` with an `error`).
//!
//! [`super::openapi`] describes the same shapes from the same names.

use std::collections::HashMap;

use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_stream::StreamExt;

use super::error::ApiError;
use super::{MAX_OUTPUTS, MAX_STREAM};
use crate::app::{AppError, Events};
use crate::proto::v1;

/// The name of `ExitStatus.code` in the answers.
pub(super) const EXIT_CODE: &str = "exitCode";
/// The fields holding stdout and stderr, and their `...Truncated` flags.
pub(super) const STREAMS: [(&str, &str); 2] = [("stdout", "stdoutTruncated"), ("stderr", "stderrTruncated")];

/// `value` as a JSON answer with `status`.
pub(super) fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(mut text) => {
            text.push(b'\n');
            let mut r = (status, Bytes::from(text)).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => ApiError::from(AppError::internal(format!("encoding the answer: {e}"))).into_response(),
    }
}

/// A stream of messages as a 200 answer of JSON lines (`application/x-ndjson`), each line sent
/// as its message arrives; an error that ends the stream is a last line
/// `{"error": {"code": "...", "message": "..."}}`.
pub(super) fn lines<T: Serialize + Send + 'static>(events: Events<T>) -> Response {
    let body = events.map(|ev| {
        let value = match ev {
            Ok(m) => serde_json::to_value(&m).unwrap_or_else(|e| error_line(&AppError::internal(e.to_string()))),
            Err(e) => error_line(&e),
        };
        let mut text = value.to_string().into_bytes();
        text.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(text))
    });
    let mut r = (StatusCode::OK, axum::body::Body::from_stream(body)).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r
}

/// The last line of a stream that failed.
fn error_line(e: &AppError) -> Value {
    serde_json::json!({ "error": { "code": e.kind().name(), "message": e.message() } })
}

/// A use case's message as the 200 answer, or its error.
pub(super) fn message<T: Serialize>(result: Result<T, AppError>) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &result?))
}

/// A message as a JSON object.
fn object<T: Serialize>(m: &T) -> Result<Map<String, Value>, AppError> {
    match serde_json::to_value(m) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(AppError::internal(format!("a message encoded as {other}, not an object"))),
        Err(e) => Err(AppError::internal(format!("encoding the answer: {e}"))),
    }
}

/// Collects stdout or stderr up to [`MAX_STREAM`] bytes, cutting on a character boundary.
#[derive(Default)]
struct Capped {
    text: String,
    truncated: bool,
}

impl Capped {
    fn push(&mut self, s: &str) {
        if self.truncated {
            return;
        }
        let room = MAX_STREAM - self.text.len();
        if s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&s[..cut]);
        self.truncated = true;
    }
}

/// The command's stdout and stderr.
#[derive(Default)]
struct Streams([Capped; 2]);

impl Streams {
    /// A session's dropped bytes mark their stream as truncated.
    fn dropped(&mut self, d: &v1::Dropped) {
        let i = usize::from(d.stream == "stderr");
        self.0[i].truncated = true;
    }

    fn write_into(self, out: &mut Map<String, Value>) {
        for ((text, flag), c) in STREAMS.into_iter().zip(self.0) {
            out.insert(text.into(), Value::String(c.text));
            out.insert(flag.into(), Value::Bool(c.truncated));
        }
    }
}

/// The exit status's fields into `out`, `code` as [`EXIT_CODE`]; `None` (the command never
/// reported one) is exit code -1.
fn exit_into(out: &mut Map<String, Value>, exit: Option<v1::ExitStatus>) -> Result<(), AppError> {
    let exit = exit.unwrap_or(v1::ExitStatus { code: -1, ..Default::default() });
    for (k, v) in object(&exit)? {
        out.insert(if k == "code" { EXIT_CODE.into() } else { k }, v);
    }
    Ok(())
}

/// An Exec's events as one answer.
pub(super) async fn exec(mut events: Events<v1::ExecEvent>, detach: bool) -> Result<Map<String, Value>, AppError> {
    let mut streams = Streams::default();
    let (mut exec_id, mut exit) = (String::new(), None);
    while let Some(ev) = events.next().await {
        match ev?.event {
            Some(v1::exec_event::Event::Started(id)) => exec_id = id,
            Some(v1::exec_event::Event::Stdout(t)) => streams.0[0].push(&t),
            Some(v1::exec_event::Event::Stderr(t)) => streams.0[1].push(&t),
            Some(v1::exec_event::Event::Exit(x)) => exit = Some(x),
            Some(v1::exec_event::Event::Dropped(d)) => streams.dropped(&d),
            None => {}
        }
    }
    let mut out = Map::new();
    let Some(exit) = exit else {
        // A detached session: its id, nothing more (follow it with .../attach).
        if detach && !exec_id.is_empty() {
            out.insert("execId".into(), Value::String(exec_id.clone()));
            out.insert("session".into(), Value::String(exec_id));
            out.insert("detached".into(), Value::Bool(true));
            return Ok(out);
        }
        return Err(AppError::unavailable("the command's stream ended without an exit status"));
    };
    out.insert("execId".into(), Value::String(exec_id));
    exit_into(&mut out, Some(exit))?;
    streams.write_into(&mut out);
    Ok(out)
}

/// A Run's events as one answer.
pub(super) async fn run(mut events: Events<v1::RunEvent>) -> Result<Map<String, Value>, AppError> {
    let mut streams = Streams::default();
    let (mut lease, mut result) = (None, None);
    let mut outputs = Outputs::default();
    while let Some(ev) = events.next().await {
        match ev?.event {
            Some(v1::run_event::Event::Lease(l)) => lease = Some(l),
            Some(v1::run_event::Event::Stdout(t)) => streams.0[0].push(&t),
            Some(v1::run_event::Event::Stderr(t)) => streams.0[1].push(&t),
            Some(v1::run_event::Event::Output(c)) => outputs.keep(c),
            Some(v1::run_event::Event::Result(r)) => result = Some(r),
            Some(v1::run_event::Event::Dropped(d)) => streams.dropped(&d),
            None => {}
        }
    }
    let mut result = result.ok_or_else(|| AppError::internal("the run ended without a result"))?;
    let exit = result.exit.take();
    let data = outputs.settle(&mut result.outputs);
    let mut out = object(&result)?;
    out.remove("exit");
    exit_into(&mut out, exit)?;
    streams.write_into(&mut out);
    out.insert("leaseId".into(), Value::String(lease.map(|l| l.id).unwrap_or_default()));
    if let Some(Value::Array(files)) = out.get_mut("outputs") {
        for (file, data) in files.iter_mut().zip(data) {
            if let Value::Object(file) = file {
                file.insert("data".into(), Value::String(base64::engine::general_purpose::STANDARD.encode(data)));
            }
        }
    }
    Ok(out)
}

/// Output content by index while all outputs fit in [`MAX_OUTPUTS`]; an output that does not
/// fit is dropped whole (its slot becomes `None`).
#[derive(Default)]
struct Outputs {
    data: HashMap<u32, Option<Vec<u8>>>,
    total: usize,
}

impl Outputs {
    fn keep(&mut self, c: v1::OutputChunk) {
        let slot = self.data.entry(c.output).or_insert_with(|| Some(Vec::new()));
        if self.total.saturating_add(c.data.len()) > MAX_OUTPUTS {
            if let Some(d) = slot.take() {
                self.total = self.total.saturating_sub(d.len());
            }
        } else if let Some(d) = slot {
            self.total = self.total.saturating_add(c.data.len());
            d.extend_from_slice(&c.data);
        }
    }

    /// Each output file's content for the answer (empty when it is missing, failed or did not
    /// fit), marking the ones that did not fit as omitted with the reason.
    fn settle(mut self, files: &mut [v1::OutputFile]) -> Vec<Vec<u8>> {
        let mut contents = Vec::with_capacity(files.len());
        for (i, f) in (0u32..).zip(files.iter_mut()) {
            let sent = self.data.remove(&i);
            if !f.error.is_empty() || f.missing {
                contents.push(Vec::new());
                continue;
            }
            match sent {
                Some(None) => {
                    f.omitted = true;
                    f.error = format!(
                        "{} ({} bytes) does not fit in the answer: outputs are limited to {MAX_OUTPUTS} bytes \
                         together here; use gRPC Run or Download for large files",
                        f.path, f.size
                    );
                    contents.push(Vec::new());
                }
                Some(Some(d)) => contents.push(d),
                None => contents.push(Vec::new()),
            }
        }
        contents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_capped_on_a_character_boundary() {
        let mut c = Capped::default();
        c.push(&"a".repeat(MAX_STREAM - 1));
        c.push("éé");
        assert!(c.truncated);
        assert_eq!(c.text.len(), MAX_STREAM - 1);
        let mut c = Capped::default();
        c.push("hello");
        assert!(!c.truncated);
    }

    #[test]
    fn outputs_that_do_not_fit_are_omitted_whole() {
        let mut o = Outputs::default();
        o.keep(v1::OutputChunk { output: 0, data: vec![1; MAX_OUTPUTS - 1], offset: 0 });
        o.keep(v1::OutputChunk { output: 1, data: vec![2; 2], offset: 0 });
        o.keep(v1::OutputChunk { output: 2, data: vec![3], offset: 0 });
        let mut files = vec![
            v1::OutputFile { path: "a".into(), size: (MAX_OUTPUTS - 1) as u64, ..Default::default() },
            v1::OutputFile { path: "b".into(), size: 2, ..Default::default() },
            v1::OutputFile { path: "c".into(), size: 1, ..Default::default() },
            v1::OutputFile { path: "d".into(), missing: true, ..Default::default() },
        ];
        let data = o.settle(&mut files);
        assert_eq!((data[0].len(), data[1].len(), &data[2][..], data[3].len()), (MAX_OUTPUTS - 1, 0, &[3][..], 0));
        assert!(files[1].omitted && files[1].error.contains("does not fit"));
        assert!(!files[0].omitted && !files[2].omitted && !files[3].omitted);
    }

    #[tokio::test]
    async fn a_run_answer_flattens_the_exit_status() {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let exit = v1::ExitStatus { code: 3, signal: String::new(), timed_out: true, ..Default::default() };
        let result = v1::RunResult {
            exit: Some(exit),
            outputs: vec![v1::OutputFile { path: "o".into(), size: 2, ..Default::default() }],
            vm: "vm1".into(),
            ..Default::default()
        };
        for e in [
            v1::run_event::Event::Lease(v1::Lease { id: "l1".into(), ..Default::default() }),
            v1::run_event::Event::Stdout("out".into()),
            v1::run_event::Event::Output(v1::OutputChunk { output: 0, data: b"hi".to_vec(), offset: 0 }),
            v1::run_event::Event::Result(result),
        ] {
            tx.send(Ok(v1::RunEvent { event: Some(e), replayed: false })).await.unwrap();
        }
        drop(tx);
        let a = Value::Object(run(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap());
        assert_eq!(
            (&a["exitCode"], &a["timedOut"], &a["stdout"], &a["stderr"]),
            (&3.into(), &true.into(), &"out".into(), &"".into())
        );
        assert_eq!((&a["leaseId"], &a["vm"], &a["outputs"][0]["data"]), (&"l1".into(), &"vm1".into(), &"aGk=".into()));
        assert_eq!(a["outputs"][0]["size"], "2");
        assert!(a.get("exit").is_none() && a.get("code").is_none(), "{a}");
    }
}
