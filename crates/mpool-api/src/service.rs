//! The `mpool.v1.Pool` gRPC service: per method, take the request and the caller's principal
//! (the auth layer put it in the request's extensions), call the use case of the
//! application layer ([`crate::app`]), and answer with its message or stream; an application
//! error becomes a status in one place (`crate::errors::status`).

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::app::{App, AppError, Events};
use crate::auth::Principal;
use crate::errors::{app_error, status};
use crate::proto::v1;
use crate::proto::v1::pool_server::Pool;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct PoolService {
    app: App,
}

impl PoolService {
    /// The service over the application.
    pub fn new(app: App) -> PoolService {
        PoolService { app }
    }
}

/// A response stream.
type Answers<T> = BoxStream<'static, Result<T, Status>>;

/// The caller and the message of a unary request.
fn decode<T>(request: Request<T>) -> (Option<Principal>, T) {
    let p = request.extensions().get::<Principal>().cloned();
    (p, request.into_inner())
}

/// The caller and the messages of a streaming request, their transport errors as the
/// application's.
fn decode_stream<T>(
    request: Request<Streaming<T>>,
) -> (Option<Principal>, impl Stream<Item = Result<T, AppError>> + Send + Unpin + 'static)
where
    T: Send + 'static,
{
    let (p, stream) = decode(request);
    (p, stream.map(|m| m.map_err(app_error)))
}

/// A use case's answer as the method's.
fn reply<T>(result: Result<T, AppError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(status)
}

/// A use case's stream as the method's: dropping it (the caller went away) drops the use
/// case's, which stops its work.
fn reply_stream<T: Send + 'static>(result: Result<Events<T>, AppError>) -> Result<Response<Answers<T>>, Status> {
    reply(result.map(|events| events.map(|e| e.map_err(status)).boxed()))
}

#[tonic::async_trait]
impl Pool for PoolService {
    async fn acquire(&self, request: Request<v1::AcquireRequest>) -> Result<Response<v1::Lease>, Status> {
        let (p, r) = decode(request);
        reply(self.app.acquire(p.as_ref(), r).await)
    }

    async fn renew(&self, request: Request<v1::RenewRequest>) -> Result<Response<v1::Lease>, Status> {
        let (p, r) = decode(request);
        reply(self.app.renew(p.as_ref(), r).await)
    }

    async fn release(&self, request: Request<v1::ReleaseRequest>) -> Result<Response<v1::ReleaseResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.release(p.as_ref(), r).await)
    }

    type ExecStream = Answers<v1::ExecEvent>;

    async fn exec(&self, request: Request<v1::ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let (p, r) = decode(request);
        reply_stream(self.app.exec(p.as_ref(), r).await)
    }

    async fn cancel_exec(
        &self,
        request: Request<v1::CancelExecRequest>,
    ) -> Result<Response<v1::CancelExecResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.cancel_exec(p.as_ref(), r).await)
    }

    type AttachStream = Answers<v1::ExecEvent>;

    async fn attach(&self, request: Request<v1::AttachRequest>) -> Result<Response<Self::AttachStream>, Status> {
        let (p, r) = decode(request);
        reply_stream(self.app.attach(p.as_ref(), r).await)
    }

    async fn list_sessions(
        &self,
        request: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.list_sessions(p.as_ref(), r).await)
    }

    async fn upload(
        &self,
        request: Request<Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        let (p, input) = decode_stream(request);
        reply(self.app.upload(p.as_ref(), input).await)
    }

    type DownloadStream = Answers<v1::DownloadChunk>;

    async fn download(&self, request: Request<v1::DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        let (p, r) = decode(request);
        reply_stream(self.app.download(p.as_ref(), r).await)
    }

    type RunStream = Answers<v1::RunEvent>;

    async fn run(&self, request: Request<Streaming<v1::RunRequest>>) -> Result<Response<Self::RunStream>, Status> {
        let (p, input) = decode_stream(request);
        reply_stream(self.app.run(p.as_ref(), input).await)
    }

    async fn list_pools(
        &self,
        request: Request<v1::ListPoolsRequest>,
    ) -> Result<Response<v1::ListPoolsResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.list_pools(p.as_ref(), r).await)
    }

    async fn get_pool(&self, request: Request<v1::GetPoolRequest>) -> Result<Response<v1::PoolInfo>, Status> {
        let (p, r) = decode(request);
        reply(self.app.get_pool(p.as_ref(), r).await)
    }

    async fn reload(&self, request: Request<v1::ReloadRequest>) -> Result<Response<v1::ReloadResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.reload(p.as_ref(), r).await)
    }

    async fn preheat(&self, request: Request<v1::PreheatRequest>) -> Result<Response<v1::PreheatResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.preheat(p.as_ref(), r).await)
    }

    async fn list_vms(&self, request: Request<v1::ListVmsRequest>) -> Result<Response<v1::ListVmsResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.list_vms(p.as_ref(), r).await)
    }

    async fn list_leases(
        &self,
        request: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.list_leases(p.as_ref(), r).await)
    }

    async fn drain(&self, request: Request<v1::DrainRequest>) -> Result<Response<v1::DrainResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.drain(p.as_ref(), r).await)
    }

    async fn gc(&self, request: Request<v1::GcRequest>) -> Result<Response<v1::GcResponse>, Status> {
        let (p, r) = decode(request);
        reply(self.app.gc(p.as_ref(), r).await)
    }
}
