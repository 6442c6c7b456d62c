//! The state store's disk fills up under a real `mpool serve` (finding 1 of the reliability
//! issue): requests that need a durable write fail with UNAVAILABLE naming the cause, health
//! turns NOT_SERVING, nothing acknowledged is lost, and once the disk has room again the same
//! process serves again. The store lives on a small tmpfs the test mounts (root, as CI runs);
//! without root the test fails and says so.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::MPOOL;
use hyper_util::rt::TokioIo;
use mpool_api::proto::v1;
use mpool_testkit::api::{acquire, exec};
use mpool_testkit::{Stack, StackOptions, StoreAt, wait};
use tonic::transport::{Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;

const POOL: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 2\nhot = 2\nmax_size = 3\n";

/// A tmpfs of a given size, mounted for the test's lifetime.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new().prefix("mpool-tmpfs-").tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill the store's disk and needs root (CI runs as root): mount said {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes zeros into `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 16 << 10];
    loop {
        match f.write_all(&chunk).and_then(|_| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
}

/// The gRPC health of the whole server ("").
async fn health(socket: &Path) -> ServingStatus {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path: PathBuf = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("channel");
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health answers");
    ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown)
}

async fn wait_health(socket: &Path, want: ServingStatus, stack: &Stack) {
    wait(format!("health turns {want:?}"), Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| async { health(socket).await == want })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_store_fails_requests_and_mpool_serves_again_once_it_has_room() {
    let fs = Tmpfs::mount("2m");
    let mut opts = StackOptions::tests(MPOOL, POOL);
    opts.store = StoreAt::Path(fs.path().join("mpool.redb"));
    let stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let pid = stack.serve_pid().expect("serve runs");
    let mut c = stack.client().await;
    let kept = acquire(&mut c, "ci", "acknowledged before the disk filled").await.unwrap();
    exec(&mut c, &kept.id, &["sh", "-c", "echo mine > work.txt"]).await.unwrap();

    fill(&fs.path().join("filler"));
    // Each lease leaves a remembered request id behind: sooner or later a durable write needs
    // space the disk does not have.
    let mut refused = None;
    for i in 0..3000 {
        let req = v1::AcquireRequest {
            pool: "ci".into(),
            holder: "filler".into(),
            request_id: format!("{i:0>250}"),
            ..Default::default()
        };
        match c.acquire(req).await {
            Ok(l) => {
                if let Err(s) = c.release(v1::ReleaseRequest { lease_id: l.into_inner().id }).await {
                    refused = Some(s);
                    break;
                }
            }
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let s = refused.unwrap_or_else(|| panic!("no request failed on a full disk; log:\n{}", stack.log()));
    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    assert!(s.message().contains("state store") && s.message().contains("No space left"), "names the cause: {s:?}");
    wait_health(&stack.socket, ServingStatus::NotServing, &stack).await;
    let err = acquire(&mut c, "ci", "while full").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "nothing is promised while the store fails: {err:?}");

    std::fs::remove_file(fs.path().join("filler")).unwrap();
    wait_health(&stack.socket, ServingStatus::Serving, &stack).await;
    let last = RefCell::new(None);
    let fresh = wait("mpool serves again", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| {
            let (mut c, last) = (c.clone(), &last);
            async move { acquire(&mut c, "ci", "after").await.map_err(|e| last.replace(Some(e))).ok() }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\nlog:\n{}", last.borrow(), stack.log()));
    assert_ne!(fresh.vm, kept.vm);
    let (code, out, _) =
        exec(&mut c, &kept.id, &["cat", "work.txt"]).await.expect("the acknowledged lease still works");
    assert_eq!((code, out.as_str()), (0, "mine\n"), "and its VM was not reset under it");
    assert_eq!(stack.serve_pid(), Some(pid), "the same process: no restart");
    assert!(stack.log().contains("state store takes writes again"), "{}", stack.log());
}
