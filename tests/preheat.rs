//! Preheat end to end against `mpool serve` + `mpool sim`: `mpool preheat` raises a pool's ready
//! floor and the pool provisions up to it (GetPool reports the target and the preheat), the
//! HTTP route refuses a count above `max_size` with 400 and a token scoped to another pool with
//! 403, and gRPC refuses a missing duration; a `[[pools.schedule]]` whose period matches keeps
//! its min_ready.
mod common;

use common::MPOOL;
use mpool_api::proto::v1;
use mpool_testkit::{Stack, StackOptions};
use serde_json::json;

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 3\n\n\
    [[pools]]\nname = \"other\"\nmin_ready = 0\nmax_size = 2\n\
    [[pools.schedule]]\nperiods = [\"* * * * * *\"]\nmin_ready = 1\ntimezone = \"local\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preheat_fills_the_pool_up_to_its_count_and_bad_ones_are_refused() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.tokens.push(("other-only".into(), "other-only-token".into(), vec!["other".into()]));
    let stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;

    let endpoint = format!("unix:{}", stack.socket.display());
    let out = std::process::Command::new(MPOOL)
        .args(["--endpoint", &endpoint, "preheat", "ci", "3", "--for", "10m"])
        .env_remove("MPOOL_TOKEN")
        .output()
        .expect("mpool preheat runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(
        (line["pool"].as_str(), line["ready_target"].as_u64(), line["preheat"].as_u64()),
        (Some("ci"), Some(3), Some(3)),
        "{line}"
    );
    assert!(line["preheat_until"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");

    stack.wait_idle("ci", 3).await;
    let mut c = stack.client().await;
    let p = c.get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.unwrap().into_inner();
    assert_eq!((p.ready_target, p.preheat), (3, 3), "{p:?}");
    assert!(p.preheat_until.is_some(), "{p:?}");

    let too_many = stack
        .http("POST", "/v1/pools/ci/preheat", Some(&stack.token), Some(&json!({"count": 9, "duration": "60s"})))
        .await;
    assert_eq!(
        (too_many.status, too_many.json["code"].as_str()),
        (400, Some("INVALID_ARGUMENT")),
        "{:?}",
        too_many.json
    );
    assert!(too_many.json["message"].as_str().is_some_and(|m| m.contains("max_size 3")), "{:?}", too_many.json);
    let scoped = stack
        .http("POST", "/v1/pools/ci/preheat", Some("other-only-token"), Some(&json!({"count": 1, "duration": "60s"})))
        .await;
    assert_eq!((scoped.status, scoped.json["code"].as_str()), (403, Some("PERMISSION_DENIED")), "{:?}", scoped.json);
    let ok = stack
        .http(
            "POST",
            "/v1/pools/other/preheat",
            Some("other-only-token"),
            Some(&json!({"count": 1, "duration": "60s"})),
        )
        .await;
    assert_eq!((ok.status, ok.json["readyTarget"].as_u64()), (200, Some(1)), "{:?}", ok.json);

    // A schedule whose period always matches keeps its min_ready in a pool whose own is 0.
    stack.wait_idle("other", 1).await;
    let p = c.get_pool(v1::GetPoolRequest { pool: "other".into() }).await.unwrap().into_inner();
    assert_eq!((p.scheduled, p.ready_target), (1, 1), "{p:?}");

    let err =
        c.preheat(v1::PreheatRequest { pool: "ci".into(), count: 2, duration: None }).await.expect_err("no duration");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("duration is required"), "{err:?}");
}
