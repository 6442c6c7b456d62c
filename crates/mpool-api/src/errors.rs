//! gRPC statuses: the one mapping between the application's errors and tonic statuses
//! ([`status`], and [`app_error`] for failures tonic reports into a use case, such as a broken
//! request stream), and a tower layer that counts API calls ending with an error status, by
//! method and code, for `mpool_grpc_errors_total` (errors a handler returns are trailers-only
//! responses, so the status is in the response headers).
//!
//! The layer also corrects one status tonic gets wrong: a request message above the size limit
//! is refused by tonic's decoder with OUT_OF_RANGE, where gRPC specifies RESOURCE_EXHAUSTED; the
//! layer rewrites it to RESOURCE_EXHAUSTED with a message that says what to do instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Code, Status};

use crate::app::{AppError, ErrorKind};
use mpool_metrics::{Metrics, UNKNOWN};

/// The gRPC code of an application error's kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unknown => Code::Unknown,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::Unimplemented => Code::Unimplemented,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
    }
}

/// The status a handler answers an application error with.
pub fn status(e: AppError) -> Status {
    Status::new(code(e.kind()), e.message())
}

/// A status tonic reports into a use case (a request stream that broke, a message it could not
/// decode) as the application's error, keeping its code and message.
pub fn app_error(s: Status) -> AppError {
    let kind = match s.code() {
        Code::Cancelled => ErrorKind::Cancelled,
        Code::InvalidArgument => ErrorKind::InvalidArgument,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::Aborted => ErrorKind::Aborted,
        Code::OutOfRange => ErrorKind::OutOfRange,
        Code::Unimplemented => ErrorKind::Unimplemented,
        Code::Internal => ErrorKind::Internal,
        Code::Unavailable => ErrorKind::Unavailable,
        Code::DataLoss => ErrorKind::DataLoss,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::Ok | Code::Unknown => ErrorKind::Unknown,
    };
    AppError::new(kind, s.message())
}

/// The layer.
#[derive(Clone)]
pub struct ErrorCounter {
    metrics: Metrics,
}

impl ErrorCounter {
    /// A layer recording into `metrics`.
    pub fn layer(metrics: Metrics) -> ErrorCounter {
        ErrorCounter { metrics }
    }
}

impl<S> tower::Layer<S> for ErrorCounter {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, metrics: self.metrics.clone() }
    }
}

/// The wrapped service.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            oversize_to_resource_exhausted(resp.headers_mut());
            if let Some(code) =
                resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<i32>().ok())
                && code != 0
            {
                metrics.grpc_error(method, code);
            }
            Ok(resp)
        })
    }
}

/// The methods the API listeners serve, as `/package.Service/Method` paths. Only these become
/// `method` label values; anything else a caller invents is counted as [`UNKNOWN`].
const METHODS: &[&str] = &[
    "/mpool.v1.Pool/Acquire",
    "/mpool.v1.Pool/Renew",
    "/mpool.v1.Pool/Release",
    "/mpool.v1.Pool/Exec",
    "/mpool.v1.Pool/CancelExec",
    "/mpool.v1.Pool/Attach",
    "/mpool.v1.Pool/ListSessions",
    "/mpool.v1.Pool/Upload",
    "/mpool.v1.Pool/Download",
    "/mpool.v1.Pool/Run",
    "/mpool.v1.Pool/ListPools",
    "/mpool.v1.Pool/GetPool",
    "/mpool.v1.Pool/ListVms",
    "/mpool.v1.Pool/ListLeases",
    "/mpool.v1.Pool/Preheat",
    "/mpool.v1.Pool/Reload",
    "/mpool.v1.Pool/Drain",
    "/mpool.v1.Pool/Gc",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The `method` label of a request path: the method's name when it is one the server serves
/// (`Acquire`, `Check`, ...), else [`UNKNOWN`], so the label set stays bounded whatever callers send.
fn method_label(path: &str) -> &'static str {
    match METHODS.iter().find(|m| **m == path) {
        Some(m) => m.rsplit('/').next().unwrap_or(UNKNOWN),
        None => UNKNOWN,
    }
}

/// tonic's decoder refuses a message above `max_decoding_message_size` with OUT_OF_RANGE and
/// "Error, decoded message length too large: found N bytes, the limit is: M bytes". gRPC says
/// RESOURCE_EXHAUSTED (what other servers and clients report); rewrite it, saying what to do.
fn oversize_to_resource_exhausted(headers: &mut http::HeaderMap) {
    let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some(out_of_range.as_str()) {
        return;
    }
    let message = headers.get("grpc-message").map(|v| percent_decode(v.as_bytes())).unwrap_or_default();
    if !message.contains("message length too large") {
        return;
    }
    let found = message
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .map(|n| format!(" ({n} bytes)"))
        .unwrap_or_default();
    let text = format!(
        "request message too large{found}: the limit is {} bytes per message; send file contents with Upload \
         in chunks below the limit, and pass large inputs as files rather than in argv, env or holder",
        super::server::MAX_MESSAGE
    );
    let code = (tonic::Code::ResourceExhausted as i32).to_string();
    if let (Ok(status), Ok(msg)) =
        (http::HeaderValue::from_str(&code), http::HeaderValue::from_str(&percent_encode(&text)))
    {
        headers.insert("grpc-status", status);
        headers.insert("grpc-message", msg);
    }
}

/// Decodes a `grpc-message` header (percent-encoded UTF-8).
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a `grpc-message` header: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_codes_map_both_ways_under_the_same_names() {
        use ErrorKind as K;
        let all = [
            K::Cancelled,
            K::Unknown,
            K::InvalidArgument,
            K::DeadlineExceeded,
            K::NotFound,
            K::AlreadyExists,
            K::PermissionDenied,
            K::ResourceExhausted,
            K::FailedPrecondition,
            K::Aborted,
            K::OutOfRange,
            K::Unimplemented,
            K::Internal,
            K::Unavailable,
            K::DataLoss,
            K::Unauthenticated,
        ];
        for kind in all {
            let s = status(AppError::new(kind, "what to do"));
            assert_eq!(s.message(), "what to do");
            // A Run's recorded outcome names the kind as tonic names the code.
            assert_eq!(format!("{kind:?}"), format!("{:?}", s.code()));
            assert_eq!(app_error(s), AppError::new(kind, "what to do"));
        }
    }

    #[test]
    fn method_labels_are_the_served_methods_only() {
        use prost::Message;
        // Every method of mpool.v1.Pool in the proto has its label; nothing else does.
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let pool = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (f.package(), s)))
            .find(|(pkg, s)| *pkg == "mpool.v1" && s.name() == "Pool")
            .expect("mpool.v1.Pool");
        for m in &pool.1.method {
            let path = format!("/mpool.v1.Pool/{}", m.name());
            assert_eq!(method_label(&path), m.name(), "{path} is missing from METHODS");
        }
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(method_label("/mpool.v1.Pool/NoSuchMethod"), UNKNOWN);
        assert_eq!(method_label("/evil/Acquire"), UNKNOWN);
        assert_eq!(method_label(""), UNKNOWN);
    }

    #[test]
    fn oversize_messages_become_resource_exhausted() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static("Error,%20decoded%20message%20length%20too%20large:%20found%2010000009%20bytes,%20the%20limit%20is:%208388608%20bytes"),
        );
        oversize_to_resource_exhausted(&mut h);
        assert_eq!(h.get("grpc-status").unwrap(), "8");
        let msg = percent_decode(h.get("grpc-message").unwrap().as_bytes());
        assert!(msg.contains("10000009 bytes") && msg.contains("Upload"), "{msg}");
        // Other OUT_OF_RANGE statuses are left alone.
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("11"));
        h.insert("grpc-message", http::HeaderValue::from_static("offset%20past%20the%20end"));
        oversize_to_resource_exhausted(&mut h);
        assert_eq!(h.get("grpc-status").unwrap(), "11");
        assert_eq!(percent_decode(b"a%25b%C3%A9"), "a%b\u{e9}");
        assert_eq!(percent_encode("a%b\u{e9}"), "a%25b%C3%A9");
    }
}
