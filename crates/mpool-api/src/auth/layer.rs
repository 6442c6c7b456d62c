//! Authentication as one tower layer, shared by the transports: around the gRPC `Pool` service
//! (health and reflection stay open) and around the HTTP/JSON facade's API routes. It checks
//! the request's headers with [`Auth::authenticate`], puts the caller's
//! [`Principal`](super::Principal) into the request's extensions for the handlers, or answers
//! the refusal in the transport's own form (a gRPC status, a JSON error).

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tower::{Layer, Service};

use super::{Auth, Refused};

/// Wraps a service in [`Authenticated`]; `refuse` turns a refusal into the transport's answer.
#[derive(Clone)]
pub struct AuthLayer<R> {
    auth: Auth,
    refuse: R,
}

impl<R> AuthLayer<R> {
    /// Authenticates with `auth`, answering refused calls with `refuse(why)`.
    pub fn new(auth: Auth, refuse: R) -> AuthLayer<R> {
        AuthLayer { auth, refuse }
    }
}

impl<S, R: Clone> Layer<S> for AuthLayer<R> {
    type Service = Authenticated<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated { inner, auth: self.auth.clone(), refuse: self.refuse.clone() }
    }
}

/// A service that only sees authenticated requests, each carrying its caller's
/// [`Principal`](super::Principal) (none on an open listener).
#[derive(Clone)]
pub struct Authenticated<S, R> {
    inner: S,
    auth: Auth,
    refuse: R,
}

impl<S, R, B, A> Service<http::Request<B>> for Authenticated<S, R>
where
    S: Service<http::Request<B>, Response = A>,
    R: Fn(Refused) -> A,
{
    type Response = A;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<A, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.auth.authenticate(request.headers()) {
            Ok(principal) => {
                if let Some(p) = principal {
                    request.extensions_mut().insert(p);
                }
                Either::Left(self.inner.call(request))
            }
            Err(why) => Either::Right(ready(Ok((self.refuse)(why)))),
        }
    }
}

impl<S: tonic::server::NamedService, R> tonic::server::NamedService for Authenticated<S, R> {
    const NAME: &'static str = S::NAME;
}

/// A refusal as gRPC answers it: status UNAUTHENTICATED with the reason.
pub fn grpc_refusal(why: Refused) -> http::Response<tonic::body::Body> {
    tonic::Status::unauthenticated(why.0).into_http()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Principal, Tokens, hash, hex, new_token};
    use tower::ServiceExt;

    /// What the inner service saw: the caller's name, or "-" for none.
    async fn who(request: http::Request<()>) -> Result<String, std::convert::Infallible> {
        Ok(request.extensions().get::<Principal>().map_or("-".to_string(), |p| p.name.clone()))
    }

    #[tokio::test]
    async fn the_layer_passes_the_principal_or_refuses() {
        let token = new_token();
        let text = format!("[[tokens]]\nname = \"ci\"\nsha256 = \"{}\"\npools = [\"ci\"]\n", hex(&hash(&token)));
        let auth =
            Auth::Tokens(std::sync::Arc::new(crate::credentials::LiveTokens::new(Tokens::parse(&text).unwrap())));
        let refuse = |why: Refused| format!("refused: {}", why.0);
        let svc = AuthLayer::new(auth, refuse).layer(tower::service_fn(who));

        let ok = http::Request::builder().header("authorization", format!("Bearer {token}")).body(()).unwrap();
        assert_eq!(svc.clone().oneshot(ok).await.unwrap(), "ci");
        let none = http::Request::new(());
        assert!(svc.clone().oneshot(none).await.unwrap().starts_with("refused: missing token"));
        let open = AuthLayer::new(Auth::Open, refuse).layer(tower::service_fn(who));
        assert_eq!(open.oneshot(http::Request::new(())).await.unwrap(), "-");
    }
}
