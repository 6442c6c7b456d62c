//! A hand-rolled HTTP/1.1 client for the HTTP/JSON facade over TLS: one request per call, so a
//! test controls exactly what goes on the wire (see [`crate::Stack::http`]); [`connect`] gives
//! the bare TLS stream for tests of the connection itself.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

use crate::{Error, Result};

/// An answer of the HTTP/JSON facade.
#[derive(Debug)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Headers (names in lower case).
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub json: serde_json::Value,
}

impl HttpAnswer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One request to `addr` (server name `localhost`, certificate signed by `ca`), sent with
/// `Connection: close`; the answer is read to EOF.
///
/// A server may answer before it has read the whole body (413 for a declared `Content-Length`
/// over its limit) and close the connection while the body is still being sent: the answer it
/// gave is returned then, as curl does; the write error only when there is no answer.
pub async fn request(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<HttpAnswer> {
    let mut tls = connect(addr, ca).await?;
    let sent = write_request(&mut tls, method, path, token, body, true).await;
    let mut buf = Vec::new();
    let read = tls.read_to_end(&mut buf).await;
    match (parse_http(&buf), sent) {
        (Ok(answer), _) => Ok(answer),
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(match read {
            Err(r) => Error::new(format!("{e} (reading: {r})")),
            Ok(_) => e,
        }),
    }
}

/// Sends a request (`Connection: close` or keep-alive) and returns the open TLS stream
/// without reading the answer.
pub async fn send(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    close: bool,
) -> Result<TlsStream<tokio::net::TcpStream>> {
    let mut tls = connect(addr, ca).await?;
    write_request(&mut tls, method, path, token, body, close).await?;
    Ok(tls)
}

/// A TLS connection to `addr` (server name `localhost`, certificate signed by `ca`), nothing
/// sent yet.
pub async fn connect(addr: SocketAddr, ca: &Path) -> Result<TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).map_err(|e| Error::new(format!("{}: {e}", ca.display())))?;
    for c in mpool_tls::certs_from_pem("ca", &pem).map_err(|e| Error::new(e.to_string()))? {
        roots.add(c).map_err(|e| Error::new(format!("the CA certificate: {e}")))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(mpool_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| Error::new(format!("connect to http_listen {addr}: {e}")))?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a valid server name");
    connector.connect(name, tcp).await.map_err(|e| Error::new(format!("TLS to http_listen: {e}")))
}

/// Writes one request: the head (`Content-Length`, `Content-Type: application/json` with a
/// body, `Authorization: Bearer` with a token) and the body.
async fn write_request(
    tls: &mut TlsStream<tokio::net::TcpStream>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
    close: bool,
) -> Result<()> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let connection = if close { "close" } else { "keep-alive" };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    let sent = async {
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body.as_bytes()).await?;
        tls.flush().await
    };
    sent.await.map_err(|e| Error::new(format!("sending the request: {e}")))
}

/// Reads one answer from a keep-alive connection: the head, then `Content-Length` bytes of
/// body. `Ok(None)` when the server closed the connection before an answer began.
pub async fn read_answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<Option<HttpAnswer>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(Error::new(format!("the answer ended in its head: {:?}", String::from_utf8_lossy(&buf))));
            }
            Ok(_) => buf.push(byte[0]),
            Err(e) if buf.is_empty() => return Err(Error::new(format!("reading an answer: {e}"))),
            Err(e) => return Err(Error::new(format!("reading the answer's head: {e}"))),
        }
    }
    let head = parse_http(&buf)?;
    let len: usize = head.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(|e| Error::new(format!("reading the answer's body: {e}")))?;
    buf.extend_from_slice(&body);
    parse_http(&buf).map(Some)
}

/// Parses a whole HTTP/1.1 answer (the body is everything after the head; `Connection: close`).
pub fn parse_http(buf: &[u8]) -> Result<HttpAnswer> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::new(format!("not an HTTP answer: {:?}", String::from_utf8_lossy(buf))))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(format!("no status line in {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let json = serde_json::from_slice(&buf[split + 4..]).unwrap_or(serde_json::Value::Null);
    Ok(HttpAnswer { status, headers, json })
}
