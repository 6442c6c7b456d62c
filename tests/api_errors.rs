//! Bad input, as a table: every case gets its precise status code AND a message that tells the
//! caller what to do, and the server is still up (health SERVING, process alive, a normal lease
//! cycle works) afterwards. Runs against `mpool serve` + `mpool sim` with a small
//! `[api] max_upload`, the stack's two tokens and one limited to pool "ci".
mod common;

use std::time::Duration;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_testkit::api::{acquire, exec};
use mpool_testkit::{Stack, StackOptions, wait};
use tonic::Code;

const POOLS: &str = r#"
[[pools]]
name = "ci"
min_ready = 1
hot = 1
max_size = 2
default_ttl = "10m"
max_ttl = "1h"
max_wait = "30s"

[[pools]]
name = "other"
min_ready = 0
max_size = 1
"#;

/// The `[api] max_upload` of this stack.
const MAX_UPLOAD: usize = 64 * 1024;

/// The checked cases: (case, outcome) and every mismatch.
#[derive(Default)]
struct Table {
    checked: Vec<String>,
    wrong: Vec<String>,
}

impl Table {
    /// One row: `result` must fail with `code`, and its message must contain every hint.
    fn row<T: std::fmt::Debug>(&mut self, case: &str, result: Result<T, tonic::Status>, code: Code, hints: &[&str]) {
        match result {
            Ok(v) => self.wrong.push(format!("{case}: expected {code:?}, got success: {v:?}")),
            Err(s) if s.code() != code => {
                self.wrong.push(format!("{case}: expected {code:?}, got {:?}: {}", s.code(), s.message()))
            }
            Err(s) => {
                let missing: Vec<&&str> = hints.iter().filter(|h| !s.message().contains(**h)).collect();
                if missing.is_empty() {
                    self.checked.push(format!("{case}: {code:?}: {}", s.message()));
                } else {
                    self.wrong.push(format!("{case}: {code:?} but the message lacks {missing:?}: {}", s.message()));
                }
            }
        }
    }

    /// One row that must succeed.
    fn ok<T>(&mut self, case: &str, result: Result<T, tonic::Status>) {
        match result {
            Ok(_) => self.checked.push(format!("{case}: OK")),
            Err(s) => self.wrong.push(format!("{case}: expected OK, got {:?}: {}", s.code(), s.message())),
        }
    }

    fn assert(self) {
        eprintln!("{} cases as expected:\n  {}", self.checked.len(), self.checked.join("\n  "));
        assert!(self.wrong.is_empty(), "{} cases wrong:\n  {}", self.wrong.len(), self.wrong.join("\n  "));
    }
}

fn argv(a: &[&str]) -> Option<v1::Command> {
    Some(v1::Command { argv: a.iter().map(|s| s.to_string()).collect(), ..Default::default() })
}

fn dur(seconds: i64) -> Option<mpool_api::proto::Duration> {
    Some(mpool_api::proto::Duration { seconds, nanos: 0 })
}

fn exec_req(lease: &str, command: Option<v1::Command>) -> v1::ExecRequest {
    v1::ExecRequest { lease_id: lease.into(), command, exec_id: String::new(), ..Default::default() }
}

/// An upload stream: lease/path/base in the first message, `data` split in two.
fn upload(
    lease: &str,
    path: &str,
    base: &str,
    data: Vec<u8>,
) -> impl tokio_stream::Stream<Item = v1::UploadRequest> + Send + 'static {
    let half = data.len() / 2;
    let (a, b) = (data[..half].to_vec(), data[half..].to_vec());
    tokio_stream::iter(vec![
        v1::UploadRequest {
            lease_id: lease.into(),
            path: path.into(),
            base: base.into(),
            data: a,
            ..Default::default()
        },
        v1::UploadRequest { data: b, ..Default::default() },
    ])
}

/// Drains a Download stream (errors may come with the first message).
async fn download(
    c: &mut mpool::cli::client::Client,
    lease: &str,
    path: &str,
    base: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = c
        .download(v1::DownloadRequest { lease_id: lease.into(), path: path.into(), base: base.into() })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_status_and_advice() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.api_toml = format!("max_upload = \"{}\"", MAX_UPLOAD);
    opts.tokens.push(("ci-only".into(), "ci-only-token".into(), vec!["ci".into()]));
    let mut stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let mut t = Table::default();

    // Pools and leases that do not exist.
    let r = c.acquire(v1::AcquireRequest { pool: "nope".into(), ..Default::default() }).await;
    t.row("Acquire on an unknown pool", r, Code::NotFound, &["no pool named \"nope\"", "`mpool status` lists"]);
    let r = c.get_pool(v1::GetPoolRequest { pool: "nope".into() }).await;
    t.row("GetPool of an unknown pool", r, Code::NotFound, &["mpool status"]);
    let r = c
        .run(futures::stream::iter([v1::RunRequest {
            pool: "nope".into(),
            command: argv(&["true"]),
            ..Default::default()
        }]))
        .await;
    t.row("Run on an unknown pool", r, Code::NotFound, &["mpool status"]);
    let r = c.acquire(v1::AcquireRequest::default()).await;
    t.row("Acquire without a pool", r, Code::InvalidArgument, &["pool is required", "ListPools"]);
    let r = exec(&mut c, "lease-doesnotexist", &["true"]).await;
    t.row("Exec on an unknown lease", r, Code::NotFound, &["lease-doesnotexist", "acquire a new lease"]);
    let r = c.renew(v1::RenewRequest { lease_id: "lease-doesnotexist".into(), ttl: None }).await;
    t.row("Renew of an unknown lease", r, Code::NotFound, &["acquire a new lease"]);
    let r = c.release(v1::ReleaseRequest { lease_id: "lease-doesnotexist".into() }).await;
    t.row("Release of an unknown lease", r, Code::NotFound, &["acquire a new lease"]);
    let r = c.release(v1::ReleaseRequest { lease_id: String::new() }).await;
    t.row("Release without a lease id", r, Code::InvalidArgument, &["lease_id is required", "Acquire returned"]);

    // A released lease: Exec and Renew are refused, Release again is fine.
    let gone = acquire(&mut c, "ci", "released").await.expect("acquire");
    c.release(v1::ReleaseRequest { lease_id: gone.id.clone() }).await.expect("release");
    let r = exec(&mut c, &gone.id, &["true"]).await;
    t.row("Exec on a released lease", r, Code::FailedPrecondition, &["has ended (released)", "acquire a new one"]);
    let r = c.renew(v1::RenewRequest { lease_id: gone.id.clone(), ttl: None }).await;
    t.row("Renew of a released lease", r, Code::FailedPrecondition, &["has ended (released)", "acquire a new one"]);
    let r = c.upload(upload(&gone.id, "f.txt", "", b"x".to_vec())).await;
    t.row("Upload to a released lease", r, Code::FailedPrecondition, &["acquire a new one"]);
    t.ok("Release of a released lease (idempotent)", c.release(v1::ReleaseRequest { lease_id: gone.id.clone() }).await);

    // An expired lease: ttl 1s, then poll the listing until the server has ended it.
    let short = c
        .acquire(v1::AcquireRequest { pool: "ci".into(), holder: "short".into(), ttl: dur(1), ..Default::default() })
        .await
        .expect("acquire ttl 1s")
        .into_inner();
    wait("the server ends a 1s lease", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| {
            let (mut c, id) = (c.clone(), short.id.clone());
            async move {
                let leases = c.list_leases(v1::ListLeasesRequest { pool: "ci".into() }).await?.into_inner().leases;
                Ok::<_, tonic::Status>((!leases.iter().any(|l| l.id == id)).then_some(()))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.log()));
    let r = exec(&mut c, &short.id, &["true"]).await;
    t.row("Exec on an expired lease", r, Code::FailedPrecondition, &["has ended (expired)", "acquire a new one"]);
    let r = c.renew(v1::RenewRequest { lease_id: short.id.clone(), ttl: dur(60) }).await;
    t.row("Renew of an expired lease", r, Code::FailedPrecondition, &["expired", "acquire a new one"]);
    t.ok("Release of an expired lease", c.release(v1::ReleaseRequest { lease_id: short.id.clone() }).await);

    // Commands.
    let lease = acquire(&mut c, "ci", "errors").await.expect("acquire");
    let id = lease.id.clone();
    let r = c.exec(exec_req(&id, argv(&[]))).await;
    t.row("Exec with an empty argv", r, Code::InvalidArgument, &["empty command", "give argv", "or a script"]);
    let r = c.exec(exec_req(&id, None)).await;
    t.row("Exec without a command", r, Code::InvalidArgument, &["command is required", "give argv"]);
    let both = v1::Command { argv: vec!["true".into()], script: "true".into(), ..Default::default() };
    let r = c.exec(exec_req(&id, Some(both))).await;
    t.row("Exec with argv AND script", r, Code::InvalidArgument, &["either argv or script, not both"]);
    let script_stdin = v1::Command { script: "cat".into(), stdin: b"x".to_vec(), ..Default::default() };
    let r = c.exec(exec_req(&id, Some(script_stdin))).await;
    t.row("Exec of a script with stdin", r, Code::InvalidArgument, &["script is sent on stdin"]);
    for name in ["1ABC", "A-B", "A B", ""] {
        let cmd = v1::Command {
            argv: vec!["true".into()],
            env: [(name.to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let r = c.exec(exec_req(&id, Some(cmd))).await;
        t.row(
            &format!("Exec with env name {name:?}"),
            r,
            Code::InvalidArgument,
            &["env name", "letters, digits and underscores"],
        );
    }
    let nul = v1::Command { argv: vec!["echo".into(), "a\0b".into()], ..Default::default() };
    let r = c.exec(exec_req(&id, Some(nul))).await;
    t.row("Exec with a NUL in argv", r, Code::InvalidArgument, &["NUL", "stdin or with Upload"]);
    let zero = v1::Command { argv: vec!["true".into()], timeout: dur(0), ..Default::default() };
    let r = c.exec(exec_req(&id, Some(zero))).await;
    t.row("Exec with a zero timeout", r, Code::InvalidArgument, &["above zero", "omit it"]);
    let r = c
        .exec(v1::ExecRequest {
            lease_id: id.clone(),
            command: argv(&["true"]),
            exec_id: "x".repeat(200),
            ..Default::default()
        })
        .await;
    t.row(
        "Exec with a 200-byte exec id",
        r,
        Code::InvalidArgument,
        &["exec_id is 200 bytes", "limit is 128 bytes", "omit it"],
    );
    let r = c
        .run(futures::stream::iter([v1::RunRequest { pool: "ci".into(), command: argv(&[]), ..Default::default() }]))
        .await;
    t.row("Run with an empty argv", r, Code::InvalidArgument, &["give argv"]);

    // Files: the size limit and paths that leave their base.
    let r = c.upload(upload(&id, "big.bin", "", vec![7u8; MAX_UPLOAD + 1])).await;
    t.row(
        "Upload above [api] max_upload",
        r,
        Code::ResourceExhausted,
        &[&format!("{MAX_UPLOAD} byte limit"), "max_upload"],
    );
    t.ok("Upload at exactly [api] max_upload", c.upload(upload(&id, "fits.bin", "", vec![7u8; MAX_UPLOAD])).await);
    let big = v1::InputFile { path: "in.bin".into(), data: vec![1u8; MAX_UPLOAD + 1], ..Default::default() };
    let r = c
        .run(futures::stream::iter([v1::RunRequest {
            pool: "ci".into(),
            command: argv(&["true"]),
            inputs: vec![big],
            ..Default::default()
        }]))
        .await;
    t.row("Run with inputs above [api] max_upload", r, Code::ResourceExhausted, &["max_upload"]);
    let (_, home, _) = exec(&mut c, &id, &["pwd"]).await.expect("pwd");
    let home = home.trim().to_string();
    let r = c.upload(upload(&id, "../../etc/evil", &home, b"x".to_vec())).await;
    t.row(
        "Upload to a path with `..` outside its base",
        r,
        Code::InvalidArgument,
        &["escapes the base directory", "use a path inside the base"],
    );
    let r = c.upload(upload(&id, "/etc/evil", &home, b"x".to_vec())).await;
    t.row("Upload to an absolute path outside its base", r, Code::InvalidArgument, &["escapes the base directory"]);
    let r = c.upload(upload(&id, "x", "relative/base", b"x".to_vec())).await;
    t.row("Upload with a relative base", r, Code::InvalidArgument, &["is not absolute"]);
    let r = download(&mut c, &id, "a/../../../etc/passwd", &home).await;
    t.row("Download of a path with `..` outside its base", r, Code::InvalidArgument, &["escapes the base directory"]);
    let r = c.upload(upload(&id, "", "", b"x".to_vec())).await;
    t.row("Upload without a path", r, Code::InvalidArgument, &["path is required", "give a path in the VM"]);
    let r = download(&mut c, &id, "no-such-file.txt", "").await;
    t.row("Download of a missing file", r, Code::NotFound, &["no-such-file.txt"]);

    // Durations outside the pool's limits (ci: max_ttl 1h, max_wait 30s).
    let neg = Some(mpool_api::proto::Duration { seconds: -5, nanos: 0 });
    let r = c.acquire(v1::AcquireRequest { pool: "ci".into(), ttl: neg, ..Default::default() }).await;
    t.row("Acquire with a negative ttl", r, Code::InvalidArgument, &["ttl must be a non-negative duration", "\"30s\""]);
    let r = c.acquire(v1::AcquireRequest { pool: "ci".into(), wait: neg, ..Default::default() }).await;
    t.row("Acquire with a negative wait", r, Code::InvalidArgument, &["wait must be a non-negative duration"]);
    let r = c.acquire(v1::AcquireRequest { pool: "ci".into(), ttl: dur(7200), ..Default::default() }).await;
    t.row("Acquire with ttl above max_ttl", r, Code::InvalidArgument, &["ttl", "max_ttl", "3600s"]);
    let r = c.acquire(v1::AcquireRequest { pool: "ci".into(), ttl: dur(0), ..Default::default() }).await;
    t.row("Acquire with a zero ttl", r, Code::InvalidArgument, &["above zero"]);
    let r = c.acquire(v1::AcquireRequest { pool: "ci".into(), wait: dur(120), ..Default::default() }).await;
    t.row("Acquire with wait above max_wait", r, Code::InvalidArgument, &["wait", "max_wait", "30s"]);
    let r = c.renew(v1::RenewRequest { lease_id: id.clone(), ttl: dur(7200) }).await;
    t.row("Renew with ttl above max_ttl", r, Code::InvalidArgument, &["max_ttl"]);
    let r = c
        .run(futures::stream::iter([v1::RunRequest {
            pool: "ci".into(),
            command: argv(&["true"]),
            ttl: neg,
            ..Default::default()
        }]))
        .await;
    t.row("Run with a negative ttl", r, Code::InvalidArgument, &["non-negative"]);

    // No VM within the wait.
    let only = acquire(&mut c, "other", "hog").await.expect("the only VM of pool other");
    let r = c.acquire(v1::AcquireRequest { pool: "other".into(), wait: dur(0), ..Default::default() }).await;
    t.row(
        "Acquire with wait 0 on a full pool",
        r,
        Code::ResourceExhausted,
        &["no free VM", "retry later", "raise max_size"],
    );
    c.release(v1::ReleaseRequest { lease_id: only.id.clone() }).await.expect("release");

    // A message above the server's 8 MiB limit: RESOURCE_EXHAUSTED, not tonic's OUT_OF_RANGE.
    let huge = "h".repeat(10_000_000);
    let r = c.acquire(v1::AcquireRequest { pool: "ci".into(), holder: huge.clone(), ..Default::default() }).await;
    t.row("Acquire with a 10 MB holder", r, Code::ResourceExhausted, &["request message too large", "10000", "Upload"]);
    let r = c
        .exec(v1::ExecRequest {
            lease_id: id.clone(),
            command: argv(&["echo", &huge]),
            exec_id: String::new(),
            ..Default::default()
        })
        .await;
    t.row("Exec with a 10 MB argv", r, Code::ResourceExhausted, &["too large"]);
    let one_arg = "a".repeat(2 << 20);
    let r = c
        .exec(v1::ExecRequest {
            lease_id: id.clone(),
            command: argv(&["echo", &one_arg]),
            exec_id: String::new(),
            ..Default::default()
        })
        .await;
    t.row("Exec with a 2 MiB argv", r, Code::InvalidArgument, &["argv is", "send large inputs with Upload"]);
    let single = v1::UploadRequest {
        lease_id: id.clone(),
        path: "huge.bin".into(),
        data: huge.clone().into_bytes(),
        ..Default::default()
    };
    let r = c.upload(tokio_stream::iter(vec![single])).await;
    t.row("Upload in one 10 MB message", r, Code::ResourceExhausted, &["request message too large", "in chunks"]);
    let r = c.upload(upload(&id, "huge.bin", "", huge.clone().into_bytes())).await;
    t.row(
        "Upload in two 5 MB messages (each within 8 MiB) above max_upload",
        r,
        Code::ResourceExhausted,
        &["max_upload"],
    );

    // Tokens: another token's lease, a pool the token may not use, no token, a wrong one.
    let mut bot = stack.tcp_client(Some(&stack.token)).await;
    let mut other = stack.tcp_client(Some("other-token")).await;
    let mut ci_only = stack.tcp_client(Some("ci-only-token")).await;
    let mine = acquire(&mut bot, "ci", "bot").await.expect("acquire over TCP");
    let r = exec(&mut other, &mine.id, &["true"]).await;
    t.row(
        "Exec on another token's lease",
        r,
        Code::PermissionDenied,
        &["belongs to another client", "acquire your own lease"],
    );
    let r = other.renew(v1::RenewRequest { lease_id: mine.id.clone(), ttl: None }).await;
    t.row("Renew of another token's lease", r, Code::PermissionDenied, &["belongs to another client"]);
    let r = other.release(v1::ReleaseRequest { lease_id: mine.id.clone() }).await;
    t.row("Release of another token's lease", r, Code::PermissionDenied, &["belongs to another client"]);
    let r =
        other.download(v1::DownloadRequest { lease_id: mine.id.clone(), path: "x".into(), base: String::new() }).await;
    t.row("Download from another token's lease", r, Code::PermissionDenied, &["belongs to another client"]);
    let theirs = other.list_leases(v1::ListLeasesRequest::default()).await.expect("ListLeases").into_inner().leases;
    assert!(theirs.iter().all(|l| l.id != mine.id), "another token does not see the lease: {theirs:?}");
    let r = ci_only.acquire(v1::AcquireRequest { pool: "other".into(), ..Default::default() }).await;
    t.row(
        "Acquire on a pool the token may not use",
        r,
        Code::PermissionDenied,
        &["may not use pool \"other\"", "tokens file"],
    );
    let r = ci_only
        .run(futures::stream::iter([v1::RunRequest {
            pool: "other".into(),
            command: argv(&["true"]),
            ..Default::default()
        }]))
        .await;
    t.row("Run on a pool the token may not use", r, Code::PermissionDenied, &["may not use pool"]);
    let r = ci_only.get_pool(v1::GetPoolRequest { pool: "other".into() }).await;
    t.row("GetPool of a pool the token may not use", r, Code::PermissionDenied, &["may not use pool"]);
    let visible = ci_only.list_pools(v1::ListPoolsRequest {}).await.expect("ListPools").into_inner().pools;
    assert_eq!(visible.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["ci"], "a token sees only its pools");
    let mut anonymous = stack.tcp_client(None).await;
    let r = anonymous.list_pools(v1::ListPoolsRequest {}).await;
    t.row("A TCP call without a token", r, Code::Unauthenticated, &["missing token", "authorization: Bearer"]);
    let mut wrong = stack.tcp_client(Some("not-a-token")).await;
    let r = wrong.acquire(v1::AcquireRequest { pool: "ci".into(), ..Default::default() }).await;
    t.row("A TCP call with a wrong token", r, Code::Unauthenticated, &["invalid token", "tokens file"]);
    t.ok("Release of one's own lease over TCP", bot.release(v1::ReleaseRequest { lease_id: mine.id.clone() }).await);

    t.assert();

    // The server is still up and still works.
    assert!(
        stack.serve_child().is_some_and(|c| matches!(c.try_wait(), Ok(None))),
        "mpool serve is running; log:\n{}",
        stack.log()
    );
    let (code, out, _) = exec(&mut c, &id, &["echo", "still here"]).await.expect("exec after the bad input");
    assert_eq!((code, out.as_str()), (0, "still here\n"));
    c.release(v1::ReleaseRequest { lease_id: id }).await.expect("release");
    let fresh = acquire(&mut c, "ci", "after").await.expect("a new lease after the bad input");
    c.release(v1::ReleaseRequest { lease_id: fresh.id }).await.expect("release");
    let status = c.list_pools(v1::ListPoolsRequest {}).await.expect("ListPools").into_inner();
    assert!(status.pools.iter().all(|p| p.daemon_ok), "{status:?}");
}
