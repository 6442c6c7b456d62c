//! Failures as HTTP answers: the status for each of the application's error kinds, and a JSON
//! body `{"code": "NOT_FOUND", "message": "..."}`, with `Retry-After` on 503 and
//! `WWW-Authenticate` on 401.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::{MAX_BODY, RETRY_AFTER_SECS};
use crate::app::{AppError, ErrorKind};

/// The HTTP status for an application error's kind.
pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::FailedPrecondition | ErrorKind::AlreadyExists | ErrorKind::Aborted => StatusCode::CONFLICT,
        ErrorKind::ResourceExhausted | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Cancelled | ErrorKind::Unknown | ErrorKind::Internal | ErrorKind::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// A failed request: its status and the application error that says why.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    error: AppError,
}

impl From<AppError> for ApiError {
    fn from(error: AppError) -> ApiError {
        ApiError { status: http_status(error.kind()), error }
    }
}

impl ApiError {
    /// 413: the body is over [`MAX_BODY`]; the message names the limit and the way around it.
    pub(super) fn body_too_large() -> ApiError {
        let message = format!(
            "the request body is larger than the HTTP facade's limit of {MAX_BODY} bytes: send large input files \
             with the gRPC API (Run streams inputs in chunks up to the server's max_upload) or `mpool run --put`"
        );
        ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, error: AppError::resource_exhausted(message) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.error.kind();
        let body = serde_json::json!({ "code": kind.name(), "message": self.error.message() });
        let mut r = super::answer::json(self.status, &body);
        if self.status == StatusCode::SERVICE_UNAVAILABLE && kind.retry_later() {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"mpool\""));
        }
        r
    }
}

/// tower-http's body limit answers a declared `Content-Length` over [`MAX_BODY`] with a plain
/// text 413 before anything runs: answer it as the facade's JSON error instead.
pub(super) async fn body_limit_as_json<B>(response: http::Response<B>) -> Response
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let json = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == b"application/json");
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
        return ApiError::body_too_large().into_response();
    }
    response.map(Body::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_http() {
        assert_eq!(http_status(ErrorKind::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(ErrorKind::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(ErrorKind::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(ErrorKind::FailedPrecondition), StatusCode::CONFLICT);
        assert_eq!(http_status(ErrorKind::ResourceExhausted), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(ErrorKind::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(ErrorKind::Internal), StatusCode::INTERNAL_SERVER_ERROR);
        let r = ApiError::from(AppError::resource_exhausted("pool empty")).into_response();
        assert_eq!(r.headers().get("retry-after").unwrap(), "5");
        let r = ApiError::body_too_large().into_response();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(r.headers().get("retry-after").is_none());
        let r = ApiError::from(AppError::new(ErrorKind::Unauthenticated, "no")).into_response();
        assert!(r.headers().get("www-authenticate").is_some());
    }
}
