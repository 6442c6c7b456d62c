//! Live reload of a running `mpool serve` (a child process): `mpool reload` (the admin RPC, here
//! over the Unix socket) and SIGHUP re-read the config; the tokens file rotates (a new token
//! works, a removed one is refused) and the TLS certificate rotates (new handshakes present the
//! new certificate, a connection opened before keeps working), without a restart; a config
//! that fails validation is refused with its file/line/key error and the running config stays;
//! a non-admin token may not reload.
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_testkit::{Stack, StackOptions, wait};

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 2\n";

fn token_entry(name: &str, token: &str, admin: bool) -> String {
    let sha = mpool_api::auth::hex(&mpool_api::auth::hash(token));
    format!("[[tokens]]\nname = {name:?}\nsha256 = \"{sha}\"\npools = [\"*\"]\nadmin = {admin}\n\n")
}

/// `mpool ARGS` against the stack's Unix socket: (success, stdout + stderr).
fn mpool(stack: &Stack, args: &[&str]) -> (bool, String) {
    let endpoint = format!("unix:{}", stack.socket.display());
    let out = Command::new(MPOOL)
        .args(["--endpoint", &endpoint])
        .args(args)
        .env_remove("MPOOL_TOKEN")
        .output()
        .expect("mpool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A gRPC client over TCP + TLS verifying the server with `ca`.
async fn tls_client(stack: &Stack, ca: &Path, token: &str) -> Result<mpool_api::client::Client, String> {
    mpool_api::client::connect(&mpool_api::client::Connect {
        endpoint: format!("https://localhost:{}", stack.tcp.port()),
        token: Some(token.to_string()),
        ca: Some(ca.to_path_buf()),
    })
    .await
}

/// Whether a ListPools call with `token` over TLS (verified with `ca`) succeeds.
async fn works(stack: &Stack, ca: &Path, token: &str) -> bool {
    match tls_client(stack, ca, token).await {
        Ok(mut c) => c.list_pools(v1::ListPoolsRequest {}).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_the_certificate_rotate_without_a_restart() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let root = stack.path().to_path_buf();
    let (old_ca, tokens_file) = (root.join("api-ca.pem"), root.join("tokens.toml"));
    assert!(works(&stack, &old_ca, &stack.token).await, "the stack's token works before");
    assert!(works(&stack, &old_ca, "other-token").await, "so does `other`");

    // A new tokens file: the stack's token, a new one, and no `other`.
    let fresh = mpool_api::auth::new_token();
    let text = token_entry("ci-bot", &stack.token, false) + &token_entry("fresh", &fresh, false);
    std::fs::write(&tokens_file, text).unwrap();
    assert!(!works(&stack, &old_ca, &fresh).await, "not before the reload");

    // A new certificate from a new CA; an HTTP connection opened before the reload.
    let (ca2, leaf2) = mpool_tls::generate_ca_and_server("localhost").unwrap();
    let new_ca = root.join("api-ca-2.pem");
    std::fs::write(&new_ca, &ca2.cert_pem).unwrap();
    std::fs::write(root.join("api-cert.pem"), &leaf2.cert_pem).unwrap();
    std::fs::write(root.join("api-key.pem"), &leaf2.key_pem).unwrap();
    let mut before = stack.http_connect().await;

    let (ok, out) = mpool(&stack, &["reload"]);
    assert!(ok, "{out}");
    assert!(out.contains("reloaded: tokens: 2 from") && out.contains("reloaded: TLS certificate:"), "{out}");

    assert!(works(&stack, &new_ca, &fresh).await, "the new token, with the new certificate");
    assert!(works(&stack, &new_ca, &stack.token).await, "a kept token still works");
    assert!(!works(&stack, &new_ca, "other-token").await, "a removed token is refused");
    assert!(!works(&stack, &old_ca, &stack.token).await, "new handshakes present the new certificate");
    // The connection made before the reload keeps working.
    let req = format!(
        "GET /v1/pools HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        fresh
    );
    tokio::io::AsyncWriteExt::write_all(&mut before, req.as_bytes()).await.unwrap();
    let answer = mpool_testkit::http::read_answer(&mut before).await.unwrap().expect("an answer");
    assert_eq!(answer.status, 200, "{:?}", answer.json);

    // SIGHUP does the same: another token appears.
    let third = mpool_api::auth::new_token();
    let text = token_entry("ci-bot", &stack.token, false) + &token_entry("third", &third, false);
    std::fs::write(&tokens_file, text).unwrap();
    let pid = stack.serve_pid().expect("serve runs as a process");
    // SAFETY: kill(2) on our own child's pid; no memory is touched.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
    wait("SIGHUP applied the new tokens", Duration::from_secs(30))
        .until(|| async { works(&stack, &new_ca, &third).await.then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    assert!(!works(&stack, &new_ca, &fresh).await, "the token SIGHUP removed is refused");

    // A config that fails validation is refused with its error; the running config stays.
    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(&stack.config, config.replace("max_size = 2", "max_size = 0")).unwrap();
    std::fs::write(&tokens_file, token_entry("ci-bot", &stack.token, false)).unwrap();
    let (ok, out) = mpool(&stack, &["reload"]);
    assert!(!ok, "{out}");
    assert!(out.contains("the running config stays") && out.contains("max_size"), "{out}");
    assert!(works(&stack, &new_ca, &third).await, "nothing of the bad reload was applied");

    // Only admins reload over TCP.
    std::fs::write(&stack.config, config).unwrap();
    let mut c = tls_client(&stack, &new_ca, &stack.token).await.unwrap();
    let err = c.reload(v1::ReloadRequest {}).await.expect_err("not an admin");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

/// A gRPC channel over TLS to the stack's TCP listener, with a client certificate or without.
async fn mtls_channel(stack: &Stack, client: Option<&mpool_tls::PemPair>) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let ca = std::fs::read(&stack.ca).unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", stack.tcp.port())).unwrap();
    endpoint.tls_config(tls).map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_ca_a_call_needs_a_client_certificate_the_ca_signed() {
    let certs = tempfile::tempdir().unwrap();
    let (client_ca, client) = mpool_tls::generate_ca_and_server("client").unwrap();
    let (_, stranger) = mpool_tls::generate_ca_and_server("client").unwrap();
    let ca_path = certs.path().join("client-ca.pem");
    std::fs::write(&ca_path, &client_ca.cert_pem).unwrap();
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.api_toml = format!("client_ca = \"{}\"\n", ca_path.display());
    let stack = Stack::start(opts).await.expect("stack starts");

    let bearer = format!("Bearer {}", stack.token);
    let list = |channel: tonic::transport::Channel| {
        let bearer = bearer.clone();
        async move {
            let mut c = v1::pool_client::PoolClient::new(channel);
            let mut req = tonic::Request::new(v1::ListPoolsRequest {});
            req.metadata_mut().insert("authorization", bearer.parse().unwrap());
            c.list_pools(req).await.map(|r| r.into_inner().pools.len())
        }
    };
    let channel = mtls_channel(&stack, Some(&client)).await.expect("a certificate the CA signed connects");
    assert_eq!(list(channel.clone()).await.expect("and calls"), 1);
    for (who, cert) in [("no certificate", None), ("another CA's certificate", Some(&stranger))] {
        let refused = match mtls_channel(&stack, cert).await {
            Err(_) => true,
            Ok(ch) => list(ch).await.is_err(),
        };
        assert!(refused, "{who} is refused");
    }
    // The channel opened before a reload keeps working after it.
    let (ok, out) = mpool(&stack, &["reload"]);
    assert!(ok, "{out}");
    assert_eq!(list(channel).await.expect("the open channel still calls"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_changes_and_removes_pools_while_a_lease_runs() {
    let pools = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 2\n\n[[pools]]\nname = \"old\"\nmin_ready = 1\nmax_size = 1\n";
    let stack = Stack::start(StackOptions::tests(MPOOL, pools)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    stack.wait_idle("old", 1).await;
    let mut c = stack.client().await;
    let held = mpool_testkit::api::acquire(&mut c, "old", "t").await.unwrap();

    // "old" leaves, "ci" keeps two ready, "web" arrives.
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let start = config.find("[[pools]]").unwrap();
    let new_pools = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nmax_size = 3\n\n[[pools]]\nname = \"web\"\nmin_ready = 1\nmax_size = 1\n";
    std::fs::write(&stack.config, format!("{}{new_pools}", &config[..start])).unwrap();
    let (ok, out) = mpool(&stack, &["reload"]);
    assert!(ok, "{out}");
    for line in ["pool ci: changed", "pool web: added", "pool old: removed; it drains"] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    stack.wait_idle("ci", 2).await;
    stack.wait_idle("web", 1).await;
    let err = mpool_testkit::api::acquire(&mut c, "old", "u").await.expect_err("a removed pool takes no lease");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    // The lease in the removed pool runs on: its VM answers, renew works.
    let (code, stdout, _) = mpool_testkit::api::exec(&mut c, &held.id, &["echo", "still here"]).await.unwrap();
    assert_eq!((code, stdout.as_str()), (0, "still here\n"));
    c.renew(v1::RenewRequest { lease_id: held.id.clone(), ttl: None }).await.expect("renew");
    c.release(v1::ReleaseRequest { lease_id: held.id.clone() }).await.unwrap();
    wait("the removed pool drained", Duration::from_secs(60))
        .until(|| {
            let mut c = c.clone();
            async move {
                let pools = c.list_pools(v1::ListPoolsRequest {}).await.ok()?.into_inner().pools;
                let vms = c.list_vms(v1::ListVmsRequest { pool: String::new() }).await.ok()?.into_inner().vms;
                (!pools.iter().any(|p| p.name == "old") && !vms.iter().any(|v| v.pool == "old")).then_some(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
}

/// The pool's VMs as ListVms shows them: (name, state, generation).
async fn vms(c: &mut mpool_api::client::Client) -> Vec<(String, String, u64)> {
    let vms = c.list_vms(v1::ListVmsRequest { pool: "ci".into() }).await.unwrap().into_inner().vms;
    vms.into_iter().map(|v| (v.name, v.state, v.generation)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_sizes_only_resizes_vms_in_place_and_the_size_survives_a_reset() {
    let pools = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nmax_size = 3\ncpus = 1\ndisk = \"5G\"\n";
    let stack = Stack::start(StackOptions::tests(MPOOL, pools)).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let mut c = stack.client().await;
    let held = mpool_testkit::api::acquire(&mut c, "ci", "t").await.unwrap();
    stack.wait_idle("ci", 2).await;
    let daemon = stack.daemon_client().await.expect("the simulator answers");
    let idle: Vec<String> = vms(&mut c).await.into_iter().filter(|v| v.0 != held.vm).map(|v| v.0).collect();
    assert_eq!(idle.len(), 2, "{idle:?}");

    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(&stack.config, config.replace("cpus = 1\ndisk = \"5G\"", "cpus = 2\ndisk = \"8G\"")).unwrap();
    let (ok, out) = mpool(&stack, &["reload"]);
    assert!(ok, "{out}");
    assert!(out.contains("pool ci: changed; its VMs are resized in place"), "{out}");
    let watcher = c.clone();
    let settled = |want: Vec<String>| {
        let mut c = watcher.clone();
        async move {
            let now = vms(&mut c).await;
            let done =
                want.iter().all(|n| now.iter().any(|v| &v.0 == n && v.2 == 2 && (v.1 == "hot" || v.1 == "warm")));
            done.then_some(now)
        }
    };
    let now = wait("idle VMs resized in place", Duration::from_secs(60))
        .until(|| settled(idle.clone()))
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    assert_eq!(now.len(), 3, "the same VMs, none added: {now:?}");
    for vm in &idle {
        assert_eq!(daemon.get(&format!("local.{vm}.cpus")).await.unwrap(), "2", "{vm}");
        assert_eq!(daemon.get(&format!("local.{vm}.disk")).await.unwrap(), "8.00GiB", "{vm}");
    }
    // The leased VM was not touched: still leased, of the old generation and size, and working.
    assert!(now.iter().any(|v| v.0 == held.vm && v.1 == "leased" && v.2 == 1), "{now:?}");
    assert_eq!(daemon.get(&format!("local.{}.cpus", held.vm)).await.unwrap(), "1");
    let (code, stdout, _) = mpool_testkit::api::exec(&mut c, &held.id, &["echo", "still here"]).await.unwrap();
    assert_eq!((code, stdout.as_str()), (0, "still here\n"));

    // A resized VM's new size survives its reset (its clean snapshot was retaken).
    let lease = mpool_testkit::api::acquire(&mut c, "ci", "u").await.unwrap();
    assert!(idle.contains(&lease.vm), "{} is one of {idle:?}", lease.vm);
    c.release(v1::ReleaseRequest { lease_id: lease.id.clone() }).await.unwrap();
    wait("the resized VM reset", Duration::from_secs(60))
        .until(|| settled(vec![lease.vm.clone()]))
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    assert_eq!(daemon.get(&format!("local.{}.cpus", lease.vm)).await.unwrap(), "2", "after a restore");

    // The leased VM is resized at its release, and kept.
    c.release(v1::ReleaseRequest { lease_id: held.id.clone() }).await.unwrap();
    wait("the released VM resized", Duration::from_secs(60))
        .until(|| settled(vec![held.vm.clone()]))
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    assert_eq!(daemon.get(&format!("local.{}.disk", held.vm)).await.unwrap(), "8.00GiB");
}
