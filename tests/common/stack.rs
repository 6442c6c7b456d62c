//! A whole stack for integration tests: `mpool sim` in-process (so tests can hang and release
//! daemon operations and read its events) and `mpool serve` as a real child process (so tests
//! can kill -9 it), with the API on a Unix socket, on TCP with TLS and a bearer token, the
//! HTTP/JSON facade on TCP with the same TLS and tokens, and `/metrics`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mpool_api::client::{Client, Connect, connect};
use mpool_api::proto::v1;
use mpool_sim::{SimConfig, Simulator};

/// The mpool binary under test.
pub const MPOOL: &str = env!("CARGO_BIN_EXE_mpool");

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Extra settings for [`Stack::start_with`].
#[derive(Clone, Debug, Default)]
pub struct StackOptions {
    /// More `[api]` keys (TOML lines), e.g. `max_upload = "64K"`.
    pub api_toml: String,
    /// More tokens: (name, plaintext token, pools).
    pub tokens: Vec<(String, String, Vec<String>)>,
    /// Where the state store lives (default: in the stack's directory).
    pub store_path: Option<PathBuf>,
}

/// The running stack.
pub struct Stack {
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    /// The simulator (in-process).
    pub sim: Option<Simulator>,
    /// The simulator's events from before `mpool serve` started (take it to miss none).
    pub events_from_start: Option<tokio::sync::broadcast::Receiver<mpool_sim::SimEvent>>,
    /// The `mpool serve` process.
    pub serve: Option<Child>,
    /// API Unix socket.
    pub socket: PathBuf,
    /// API TCP address (TLS + token).
    pub tcp: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// HTTP/JSON facade address (TLS + token, like `tcp`).
    pub http: SocketAddr,
    /// A valid bearer token for `tcp`.
    pub token: String,
    /// The CA certificate that signed the TCP listener's certificate (server name `localhost`).
    pub ca: PathBuf,
    /// The config file.
    pub config: PathBuf,
}

impl Stack {
    /// Starts the simulator (time scale 0, after `tweak`) and `mpool serve` with `pools_toml`
    /// (one or more `[[pools]]` tables).
    pub async fn start(pools_toml: &str, tweak: impl FnOnce(&mut SimConfig)) -> Stack {
        Stack::start_with(pools_toml, StackOptions::default(), tweak).await
    }

    /// [`Stack::start`] with more `[api]` keys and tokens.
    pub async fn start_with(pools_toml: &str, opts: StackOptions, tweak: impl FnOnce(&mut SimConfig)) -> Stack {
        let dir = tempfile::Builder::new().prefix("mpool-stack-").tempdir().expect("tempdir");
        let root = dir.path();
        let mut sc = SimConfig::new(root.join("multipass.sock"), root.join("sim"));
        sc.time_scale = 0.0;
        sc.log_lines = true;
        tweak(&mut sc);
        let sim = Simulator::start(sc).await.expect("simulator");
        let events_from_start = Some(sim.events());

        let (ca, leaf) = mpool_tls::generate_ca_and_server("localhost").expect("certs");
        std::fs::write(root.join("api-ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(root.join("api-cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(root.join("api-key.pem"), &leaf.key_pem).unwrap();
        let token = mpool_api::auth::new_token();
        let hash = mpool_api::auth::hex(&mpool_api::auth::hash(&token));
        let mut tokens = format!(
            "[[tokens]]\nname = \"ci-bot\"\nsha256 = \"{hash}\"\npools = [\"*\"]\n\n[[tokens]]\nname = \"other\"\nsha256 = \"{}\"\npools = [\"*\"]\n",
            mpool_api::auth::hex(&mpool_api::auth::hash("other-token"))
        );
        for (name, token, pools) in &opts.tokens {
            tokens.push_str(&format!(
                "\n[[tokens]]\nname = {name:?}\nsha256 = \"{}\"\npools = {pools:?}\n",
                mpool_api::auth::hex(&mpool_api::auth::hash(token))
            ));
        }
        std::fs::write(root.join("tokens.toml"), tokens).unwrap();
        let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = root.join("mpool.toml");
        std::fs::write(
            &config,
            format!(
                r#"[daemon]
address = "unix:{root}/multipass.sock"
data_dir = "{root}/data"
call_timeout = "10s"
blocking_call_timeout = "20s"

[api]
listen = ["unix:{root}/mpool.sock", "{tcp}"]
tls_cert = "{root}/api-cert.pem"
tls_key = "{root}/api-key.pem"
tokens_file = "{root}/tokens.toml"
metrics_listen = "{metrics}"
http_listen = "{http}"
{api_extra}

[store]
path = "{store}"

[engine]
reconcile_interval = "100ms"
health_interval = "1s"
shutdown_grace = "2s"

{pools_toml}
"#,
                root = root.display(),
                api_extra = opts.api_toml,
                store = opts.store_path.clone().unwrap_or_else(|| root.join("mpool.redb")).display(),
            ),
        )
        .unwrap();
        let mut s = Stack {
            socket: root.join("mpool.sock"),
            ca: root.join("api-ca.pem"),
            dir,
            sim: Some(sim),
            events_from_start,
            serve: None,
            tcp,
            metrics,
            http,
            token,
            config,
        };
        s.start_serve();
        s
    }

    /// The simulator.
    pub fn sim(&self) -> &Simulator {
        self.sim.as_ref().expect("simulator running")
    }

    /// Starts `mpool serve` (again) and waits for its socket and its TCP listener.
    pub fn start_serve(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("serve.log"))
            .expect("log file");
        let child = Command::new(MPOOL)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("MPOOL_LOG", "info,mpool=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("mpool serve starts");
        self.serve = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.socket.exists() {
            assert!(Instant::now() < deadline, "mpool serve did not open its socket; log:\n{}", self.log());
            if let Some(c) = self.serve.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("mpool serve exited with {status}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // serve binds its TCP listeners before the Unix socket, which appears only once it listens.
        while std::net::TcpStream::connect(self.tcp).is_err() {
            assert!(Instant::now() < deadline, "mpool serve did not listen on {}; log:\n{}", self.tcp, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 the serve process.
    pub fn kill_serve(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to the serve process (a clean shutdown); waits for it to exit and returns its status.
    pub fn term_serve(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.serve.take()?;
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        c.wait().ok()
    }

    /// The serve log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// A client over the Unix socket (no token needed there).
    pub async fn client(&self) -> Client {
        connect(&Connect { endpoint: format!("unix:{}", self.socket.display()), token: None, ca: None })
            .await
            .expect("client connects")
    }

    /// A client over TCP with TLS and the given token.
    pub async fn tcp_client(&self, token: Option<&str>) -> Client {
        connect(&Connect {
            endpoint: format!("https://localhost:{}", self.tcp.port()),
            token: token.map(String::from),
            ca: Some(self.ca.clone()),
        })
        .await
        .expect("tcp client connects")
    }

    /// Waits until `pool` has at least `n` idle VMs.
    pub async fn wait_idle(&self, pool: &str, n: u32) {
        let mut c = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(p) = c.get_pool(v1::GetPoolRequest { pool: pool.into() }).await {
                let p = p.into_inner();
                let idle = p.vms.get("hot").copied().unwrap_or(0) + p.vms.get("warm").copied().unwrap_or(0);
                if idle >= n {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "pool {pool} never had {n} idle VMs; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The directory of the stack.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.kill_serve();
    }
}

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

impl Stack {
    /// One HTTP/1.1 request to the facade over TLS (a hand-rolled client: `Connection: close`,
    /// the answer read to EOF).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> HttpAnswer {
        let mut tls = self.http_send(method, path, token, body, true).await;
        let mut buf = Vec::new();
        use tokio::io::AsyncReadExt;
        let _ = tls.read_to_end(&mut buf).await;
        parse_http(&buf)
    }

    /// Sends a request (`Connection: close` or keep-alive) and returns the open TLS stream
    /// without reading the answer.
    pub async fn http_send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
        close: bool,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        use tokio::io::AsyncWriteExt;
        let mut roots = rustls::RootCertStore::empty();
        for c in mpool_tls::certs_from_pem("ca", &std::fs::read(&self.ca).unwrap()).unwrap() {
            roots.add(c).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(mpool_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(self.http).await.expect("connect to http_listen");
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("TLS to http_listen");
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
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(body.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        tls
    }
}

/// Parses a whole HTTP/1.1 answer (the body is everything after the head; `Connection: close`).
pub fn parse_http(buf: &[u8]) -> HttpAnswer {
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP head");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let json = serde_json::from_slice(&buf[split + 4..]).unwrap_or(serde_json::Value::Null);
    HttpAnswer { status, headers, json }
}

/// Runs a command on a lease through the API; returns (exit code, stdout, stderr).
pub async fn exec(c: &mut Client, lease: &str, argv: &[&str]) -> Result<(i32, String, String), tonic::Status> {
    let mut s = c
        .exec(v1::ExecRequest {
            lease_id: lease.into(),
            command: Some(v1::Command { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }),
            exec_id: String::new(),
        })
        .await?
        .into_inner();
    let (mut out, mut err) = (String::new(), String::new());
    while let Some(ev) = s.message().await? {
        match ev.event {
            Some(v1::exec_event::Event::Stdout(t)) => out.push_str(&t),
            Some(v1::exec_event::Event::Stderr(t)) => err.push_str(&t),
            Some(v1::exec_event::Event::Exit(x)) => return Ok((x.code, out, err)),
            _ => {}
        }
    }
    Err(tonic::Status::internal("no exit event"))
}

/// Acquires a lease.
pub async fn acquire(c: &mut Client, pool: &str, holder: &str) -> Result<v1::Lease, tonic::Status> {
    Ok(c.acquire(v1::AcquireRequest { pool: pool.into(), holder: holder.into(), ..Default::default() })
        .await?
        .into_inner())
}
