//! What handlers take from a request, each failing as the facade's JSON error: the caller
//! ([`Caller`]), path parameters ([`Params`]) and the body as a message of `mpool.v1` in the
//! proto3 JSON mapping ([`Message`]).

use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use bytes::Bytes;
use http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::app::AppError;
use crate::auth::Principal;

/// The caller, as the auth layer found it (`None` on an open listener).
pub(super) struct Caller(pub Option<Principal>);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        Ok(Caller(parts.extensions.get::<Principal>().cloned()))
    }
}

/// The path's parameters, in order.
pub(super) struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Params<T>, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(Params(t)),
            Err(e) => {
                Err(AppError::invalid_argument(format!("the path {}: {}", parts.uri.path(), e.body_text())).into())
            }
        }
    }
}

/// The body as a message: proto3 JSON through the generated serde impls (unknown fields
/// refused, naming them and where they are); an empty body is the default message.
pub(super) struct Message<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for Message<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Message<T>, ApiError> {
        let body = Bytes::from_request(request, state).await.map_err(|e| match e {
            BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => ApiError::body_too_large(),
            e => AppError::invalid_argument(format!("reading the request body: {}", e.body_text())).into(),
        })?;
        parse(&body).map(Message).map_err(ApiError::from)
    }
}

/// Parses a body: `T` in proto3 JSON, or its default when the body is empty.
pub(super) fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    let message = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner().to_string();
        let hint = if inner.contains("'s' suffix") {
            " (durations are seconds with an \"s\", e.g. \"30s\" or \"1.5s\")"
        } else {
            ""
        };
        if at == "." || at.is_empty() {
            AppError::invalid_argument(format!("request body: {inner}{hint}"))
        } else {
            AppError::invalid_argument(format!("request body: {at}: {inner}{hint}"))
        }
    })?;
    json.end().map_err(|e| AppError::invalid_argument(format!("request body: {e}")))?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;

    #[test]
    fn bodies_follow_proto3_json() {
        let r: v1::RunRequest = parse(
            br#"{"requestId":"r1","command":{"script":"echo hi","shell":"SCRIPT_SHELL_SH","timeout":"1.5s","env":{"A":"1"}},
                 "inputs":[{"path":"a.txt","data":"aGk="},{"path":"b.txt","text":"yo"}],"outputs":["o.txt"],"wait":"10s"}"#,
        )
        .unwrap();
        assert_eq!(r.request_id, "r1");
        let c = r.command.unwrap();
        assert_eq!(c.shell, v1::ScriptShell::Sh as i32);
        assert_eq!(c.timeout, Some(crate::proto::Duration { seconds: 1, nanos: 500_000_000 }));
        assert_eq!(r.inputs[0].data, b"hi");
        assert_eq!(r.inputs[1].text, "yo");
        // The proto field names are accepted too.
        let a: v1::AcquireRequest = parse(br#"{"request_id":"x"}"#).unwrap();
        assert_eq!(a.request_id, "x");
        assert_eq!(parse::<v1::RunRequest>(b" \n").unwrap(), v1::RunRequest::default());
    }

    #[test]
    fn bad_bodies_say_what_and_where() {
        let e = parse::<v1::RunRequest>(br#"{"comand":{}}"#).unwrap_err();
        assert!(e.message().contains("unknown field `comand`"), "{}", e.message());
        let e = parse::<v1::RunRequest>(br#"{"command":{"argv":["true"],"timeout":"5m"}}"#).unwrap_err();
        assert!(e.message().contains("command.timeout") && e.message().contains("\"30s\""), "{}", e.message());
        let e = parse::<v1::RunRequest>(br#"{"inputs":[{"path":"a","data":"!!"}]}"#).unwrap_err();
        assert!(e.message().contains("inputs[0].data"), "{}", e.message());
        let e = parse::<v1::AcquireRequest>(br#"{"holder":"a"} {}"#).unwrap_err();
        assert!(e.message().contains("trailing"), "{}", e.message());
        assert!(parse::<v1::AcquireRequest>(br#"["holder"]"#).is_err());
    }
}
