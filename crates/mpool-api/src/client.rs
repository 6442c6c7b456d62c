//! A client of `mpool serve`'s gRPC API: over its Unix socket or over TCP (TLS with a CA of
//! your choice), with an optional bearer token. The CLI, the benchmarks and the tests use it.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::proto::v1::pool_client::PoolClient;

/// The default API socket of a systemd install.
pub const DEFAULT_ENDPOINT: &str = "unix:/run/mpool/mpool.sock";

/// How to reach `mpool serve`.
#[derive(Debug, Clone)]
pub struct Connect {
    /// `unix:PATH` or `http(s)://HOST:PORT`.
    pub endpoint: String,
    /// Bearer token for TCP endpoints.
    pub token: Option<String>,
    /// CA certificate to verify an https endpoint.
    pub ca: Option<PathBuf>,
}

/// A client with the token attached to every call.
pub type Client = PoolClient<tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>>;

/// Adds `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct TokenInterceptor(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Connects to the API.
pub async fn connect(c: &Connect) -> Result<Client, String> {
    let channel = if let Some(path) = c.endpoint.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
    } else {
        let mut ep =
            Endpoint::from_shared(c.endpoint.clone()).map_err(|e| format!("--endpoint {:?}: {e}", c.endpoint))?;
        if c.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &c.ca {
                let pem = std::fs::read(ca).map_err(|e| format!("--ca {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).map_err(|e| e.to_string())?;
        }
        ep.connect().await
    }
    .map_err(|e| {
        mpool_multipass::reach::describe_connect_failure(mpool_multipass::reach::Server::MpoolServe, &c.endpoint, &e)
    })?;
    let token = match &c.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| "--token contains characters not allowed in a header".to_string())?,
        ),
        None => None,
    };
    Ok(PoolClient::with_interceptor(channel, TokenInterceptor(token)).max_decoding_message_size(64 << 20))
}
