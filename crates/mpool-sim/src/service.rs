//! Adapts the simulated daemon to tonic's generated `multipass.Rpc` service: reads the first
//! request before answering anything (multipassd sends no headers until it has one), checks
//! trust, then runs the handler in its own task and streams its replies.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use super::EventKind;
use super::daemon::{Call, Daemon, LogReply, Replier};
use mpool_multipass::proto::multipass as pb;
use mpool_multipass::proto::multipass::rpc_server::Rpc;

/// multipassd 1.13-1.16's message for an untrusted client.
pub const NOT_AUTHENTICATED: &str = "The client is not authenticated with the Multipass service.\nPlease use 'multipass authenticate' before proceeding.";

/// The tonic service.
pub struct Service {
    daemon: Arc<Daemon>,
}

/// The client's certificate (DER) and whether it came over the Unix socket.
fn peer<T>(req: &Request<T>) -> (Option<Vec<u8>>, bool) {
    let ext = req.extensions();
    if let Some(info) = ext.get::<TlsConnectInfo<UdsConnectInfo>>() {
        return (info.peer_certs().and_then(|c| c.first().map(|c| c.to_vec())), true);
    }
    if let Some(info) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
        return (info.peer_certs().and_then(|c| c.first().map(|c| c.to_vec())), false);
    }
    (None, false)
}

type Replies<T> = ReceiverStream<Result<T, Status>>;

impl Service {
    /// Wraps the daemon.
    pub fn new(daemon: Arc<Daemon>) -> Service {
        Service { daemon }
    }

    /// The trust decision of multipassd's `verify_client_and_dispatch_operation`.
    fn check_trust(&self, cert: Option<&[u8]>, unix: bool) -> Result<(), Status> {
        let Some(cert) = cert else {
            return Err(Status::internal("invalid certificate data"));
        };
        let trust = &self.daemon.trust;
        if trust.contains(cert) {
            return Ok(());
        }
        if unix && trust.is_empty() {
            trust.add(cert).map_err(|e| Status::internal(e.to_string()))?;
            super::server::open_socket_permissions(&self.daemon.cfg);
            return Ok(());
        }
        Err(Status::unauthenticated(NOT_AUTHENTICATED))
    }

    async fn serve<Req, Rep, F, Fut>(
        &self,
        op: &'static str,
        request: Request<Streaming<Req>>,
        trusted_only: bool,
        handler: F,
    ) -> Result<Response<Replies<Rep>>, Status>
    where
        Req: Default + Send + 'static,
        Rep: LogReply + Send + 'static,
        F: FnOnce(Arc<Daemon>, Call<Req, Rep>, Req, Option<Vec<u8>>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let (cert, unix) = peer(&request);
        let mut incoming = request.into_inner();
        // A client that half-closes without a request gets the default one, as with multipassd
        // (where empty name lists then mean ALL instances).
        let req = incoming.message().await?.unwrap_or_default();
        self.daemon.emit(op, "", EventKind::Received);
        if trusted_only {
            self.check_trust(cert.as_deref(), unix)?;
        }
        let (tx, rx) = mpsc::channel(16);
        let daemon = self.daemon.clone();
        let out = Replier::new(tx, op, &daemon);
        if daemon.aborts(op) {
            tokio::spawn(async move {
                // multipassd's logger writes into the call as its handler does, and the
                // process dies on the assertion: the client has the stream open, then the
                // connection is gone.
                out.log_anyway("writing the reply").await;
                daemon.abort(op).await;
                // Keep the stream open until the connection is cut (or the simulator ends).
                daemon.shut_down().await;
                drop(out);
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        tokio::spawn(async move {
            let _in_flight = daemon.call_started();
            let call = Call::new(out.clone(), incoming);
            match handler(daemon.clone(), call, req, cert).await {
                Ok(()) => {
                    // The daemon's logger may write into the call after the answer, too.
                    out.log("call finished").await;
                    daemon.emit(op, "", EventKind::Done);
                    drop(out);
                    daemon.wedge_if_pending();
                }
                Err(status) => {
                    out.log("call failed").await;
                    daemon.emit(op, "", EventKind::Failed(status.code()));
                    out.fail(status).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

macro_rules! rpc {
    ($method:ident, $stream:ident, $req:ty, $rep:ty, $op:literal, |$d:ident, $c:ident, $r:ident| $body:expr) => {
        type $stream = Replies<$rep>;
        // Spelled out as async_trait expands it: attribute macros do not see inside macro_rules.
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            request: Request<Streaming<$req>>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<Response<Self::$stream>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(
                async move { self.serve($op, request, true, |$d, $c, $r, _cert| async move { $body.await }).await },
            )
        }
    };
}

#[tonic::async_trait]
impl Rpc for Service {
    rpc!(create, createStream, pb::LaunchRequest, pb::LaunchReply, "create", |d, c, r| d.launch(c, r, false));
    rpc!(launch, launchStream, pb::LaunchRequest, pb::LaunchReply, "launch", |d, c, r| d.launch(c, r, true));
    rpc!(purge, purgeStream, pb::PurgeRequest, pb::PurgeReply, "purge", |d, c, r| d.purge(c, r));
    rpc!(find, findStream, pb::FindRequest, pb::FindReply, "find", |d, c, r| d.find(c, r));
    rpc!(info, infoStream, pb::InfoRequest, pb::InfoReply, "info", |d, c, r| d.info(c, r));
    rpc!(list, listStream, pb::ListRequest, pb::ListReply, "list", |d, c, r| d.list(c, r));
    rpc!(networks, networksStream, pb::NetworksRequest, pb::NetworksReply, "networks", |d, c, r| d.networks(c, r));
    rpc!(recover, recoverStream, pb::RecoverRequest, pb::RecoverReply, "recover", |d, c, r| d.recover(c, r));
    rpc!(ssh_info, ssh_infoStream, pb::SshInfoRequest, pb::SshInfoReply, "ssh_info", |d, c, r| d.ssh_info(c, r));
    rpc!(start, startStream, pb::StartRequest, pb::StartReply, "start", |d, c, r| d.start(c, r));
    rpc!(stop, stopStream, pb::StopRequest, pb::StopReply, "stop", |d, c, r| d.stop(c, r));
    rpc!(suspend, suspendStream, pb::SuspendRequest, pb::SuspendReply, "suspend", |d, c, r| d.suspend(c, r));
    rpc!(restart, restartStream, pb::RestartRequest, pb::RestartReply, "restart", |d, c, r| d.restart(c, r));
    rpc!(delet, deletStream, pb::DeleteRequest, pb::DeleteReply, "delete", |d, c, r| d.delete(c, r));
    rpc!(version, versionStream, pb::VersionRequest, pb::VersionReply, "version", |d, c, r| d.version(c, r));
    rpc!(get, getStream, pb::GetRequest, pb::GetReply, "get", |d, c, r| d.get(c, r));
    rpc!(set, setStream, pb::SetRequest, pb::SetReply, "set", |d, c, r| d.set(c, r));
    rpc!(keys, keysStream, pb::KeysRequest, pb::KeysReply, "keys", |d, c, r| d.keys(c, r));
    rpc!(snapshot, snapshotStream, pb::SnapshotRequest, pb::SnapshotReply, "snapshot", |d, c, r| d.snapshot(c, r));
    rpc!(restore, restoreStream, pb::RestoreRequest, pb::RestoreReply, "restore", |d, c, r| d.restore(c, r));
    rpc!(clone, cloneStream, pb::CloneRequest, pb::CloneReply, "clone", |d, c, r| d.clone_instance(c, r));
    rpc!(daemon_info, daemon_infoStream, pb::DaemonInfoRequest, pb::DaemonInfoReply, "daemon_info", |d, c, r| d
        .daemon_info(c, r));

    type authenticateStream = Replies<pb::AuthenticateReply>;
    async fn authenticate(
        &self,
        request: Request<Streaming<pb::AuthenticateRequest>>,
    ) -> Result<Response<Self::authenticateStream>, Status> {
        // authenticate does not check trust first; it decides it.
        self.serve("authenticate", request, false, |d, c, r, cert| async move { d.authenticate(c, r, cert).await })
            .await
    }

    type mountStream = Replies<pb::MountReply>;
    async fn mount(
        &self,
        request: Request<Streaming<pb::MountRequest>>,
    ) -> Result<Response<Self::mountStream>, Status> {
        self.serve("mount", request, true, |_, _, _, _| async {
            Err(Status::failed_precondition("mounts are not supported by mpool sim"))
        })
        .await
    }

    type umountStream = Replies<pb::UmountReply>;
    async fn umount(
        &self,
        request: Request<Streaming<pb::UmountRequest>>,
    ) -> Result<Response<Self::umountStream>, Status> {
        self.serve("umount", request, true, |_, _, _, _| async {
            Err(Status::failed_precondition("mounts are not supported by mpool sim"))
        })
        .await
    }

    async fn ping(&self, request: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        // ping never trusts on first use; an untrusted client gets UNAUTHENTICATED with no message.
        self.daemon.emit("ping", "", EventKind::Received);
        let (cert, _) = peer(&request);
        let Some(cert) = cert else {
            return Err(Status::internal("invalid certificate data"));
        };
        if self.daemon.trust.contains(&cert) {
            Ok(Response::new(pb::PingReply {}))
        } else {
            Err(Status::unauthenticated(""))
        }
    }
}
