//! The API end to end against `mpool serve` + `mpool sim`: a lease cycle over the Unix socket.
mod common;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_testkit::api::{acquire, exec};
use mpool_testkit::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_cycle_over_the_unix_socket() {
    let stack = Stack::start(StackOptions::tests(MPOOL, "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 2\n"))
        .await
        .expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "t").await.unwrap();
    let (code, out, _) = exec(&mut c, &lease.id, &["sh", "-c", "echo hi; exit 4"]).await.unwrap();
    assert_eq!((code, out.as_str()), (4, "hi\n"));
    c.release(v1::ReleaseRequest { lease_id: lease.id.clone() }).await.unwrap();
}
