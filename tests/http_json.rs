//! The HTTP/JSON facade (`[api] http_listen`) end to end against `mpool serve` + `mpool sim`:
//! one-shot runs, the lease endpoints, tokens, error statuses, output caps, idempotency, and a
//! caller that hangs up cancelling its command.
mod common;

use std::time::Duration;

use common::MPOOL;
use mpool_testkit::api::exec;
use mpool_testkit::{Stack, StackOptions, eventually};
use serde_json::json;

const POOLS: &str =
    "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 2\n\n[[pools]]\nname = \"one\"\nmin_ready = 1\nmax_size = 1\n";

fn s(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_exit_output_files_and_timings() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let t = Some(stack.token.as_str());
    let body = json!({
        "requestId": "flow-1-task-2-0",
        "holder": "kestra",
        "command": {
            "script": "cat in/a.txt; printf 'err\\n' >&2; cat b.txt > out.txt; echo \"$GREETING\"; exit 3",
            "env": {"GREETING": "héllo"},
            "timeout": "30s"
        },
        "inputs": [{"path": "in/a.txt", "data": "aW5wdXQgYQo="}, {"path": "b.txt", "text": "from text"}],
        "outputs": ["out.txt", "missing.txt"],
        "wait": "30s"
    });
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&body)).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-type"), Some("application/json"));
    let j = &a.json;
    assert_eq!(j["exitCode"], 3, "{j}");
    assert_eq!(j["stdout"], "input a\nhéllo\n");
    assert_eq!(j["stderr"], "err\n");
    assert_eq!(j["stdoutTruncated"], false);
    assert_eq!(j["stderrTruncated"], false);
    assert_eq!(j["timedOut"], false);
    assert!(!s(&j["vm"]).is_empty());
    assert!(!s(&j["leaseId"]).is_empty());
    assert!(s(&j["served"]).starts_with("SERVED_"));
    for k in ["acquire", "upload", "exec", "download", "total"] {
        assert!(s(&j["timings"][k]).ends_with('s'), "timings.{k}: {}", j["timings"][k]);
    }
    let outs = j["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[0]["path"], "out.txt");
    assert_eq!(mpool_api::json::base64_decode(s(&outs[0]["data"])).unwrap(), b"from text");
    assert_eq!(outs[0]["missing"], false);
    assert_eq!(outs[1]["missing"], true);

    // argv commands and a zero exit.
    let a =
        stack.http("POST", "/v1/pools/ci/run", t, Some(&json!({"command": {"argv": ["echo", "a b", "$HOME"]}}))).await;
    assert_eq!((a.status, &a.json["exitCode"], &a.json["stdout"]), (200, &json!(0), &json!("a b $HOME\n")), "{a:?}");

    // The command's own timeout.
    let a = stack
        .http("POST", "/v1/pools/ci/run", t, Some(&json!({"command": {"argv": ["sleep", "60"], "timeout": "0.5s"}})))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json["timedOut"], true, "{}", a.json);
    assert_ne!(a.json["exitCode"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_errors_map_to_http_statuses() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("one", 1).await;
    let t = Some(stack.token.as_str());
    let run = json!({"command": {"argv": ["true"]}});

    let a = stack.http("POST", "/v1/pools/ci/run", None, Some(&run)).await;
    assert_eq!((a.status, s(&a.json["code"])), (401, "UNAUTHENTICATED"), "{a:?}");
    assert!(a.header("www-authenticate").is_some());
    let a = stack.http("GET", "/v1/pools", Some("not-a-token"), None).await;
    assert_eq!(a.status, 401, "{a:?}");
    // Health needs no token.
    let a = stack.http("GET", "/healthz", None, None).await;
    assert_eq!((a.status, s(&a.json["status"])), (200, "SERVING"));

    let a = stack.http("POST", "/v1/pools/nope/run", t, Some(&run)).await;
    assert_eq!((a.status, s(&a.json["code"])), (404, "NOT_FOUND"), "{a:?}");
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&json!({"command": ["true"]}))).await;
    assert_eq!((a.status, s(&a.json["code"])), (400, "INVALID_ARGUMENT"), "{a:?}");
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&json!({"comand": {"argv": ["true"]}}))).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(s(&a.json["message"]).contains("comand"), "{a:?}");
    let a =
        stack.http("POST", "/v1/pools/ci/run", t, Some(&json!({"command": {"argv": ["true"], "timeout": "5m"}}))).await;
    assert_eq!(a.status, 400, "{a:?}");
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&json!({}))).await;
    assert_eq!(a.status, 400, "{a:?}");
    let a = stack.http("GET", "/v1/nothing", t, None).await;
    assert_eq!(a.status, 404, "{a:?}");

    // Pool exhausted: 503 with Retry-After.
    let lease = stack.http("POST", "/v1/pools/one/leases", t, Some(&json!({"holder": "h", "wait": "30s"}))).await;
    assert_eq!(lease.status, 200, "{lease:?}");
    let a =
        stack.http("POST", "/v1/pools/one/run", t, Some(&json!({"command": {"argv": ["true"]}, "wait": "0s"}))).await;
    assert_eq!((a.status, s(&a.json["code"])), (503, "RESOURCE_EXHAUSTED"), "{a:?}");
    assert!(a.header("retry-after").is_some_and(|v| v.parse::<u32>().is_ok()), "{a:?}");

    // Another token may not touch this token's lease.
    let id = s(&lease.json["id"]).to_string();
    let a = stack.http("POST", &format!("/v1/leases/{id}/exec"), Some("other-token"), Some(&run)).await;
    assert_eq!((a.status, s(&a.json["code"])), (403, "PERMISSION_DENIED"), "{a:?}");
    // An ended lease.
    let a = stack.http("DELETE", &format!("/v1/leases/{id}"), t, None).await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = stack.http("POST", &format!("/v1/leases/{id}/exec"), t, Some(&run)).await;
    assert_eq!((a.status, s(&a.json["code"])), (409, "FAILED_PRECONDITION"), "{a:?}");
    let a = stack.http("POST", "/v1/leases/no-such-lease/renew", t, None).await;
    assert_eq!(a.status, 404, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_endpoints_acquire_exec_renew_release() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let t = Some(stack.token.as_str());
    let body = json!({"holder": "kestra", "requestId": "exec-7-attempt-1", "ttl": "300s", "wait": "30s"});
    let a = stack.http("POST", "/v1/pools/ci/leases", t, Some(&body)).await;
    assert_eq!(a.status, 200, "{a:?}");
    let lease = a.json.clone();
    let id = s(&lease["id"]).to_string();
    assert_eq!(lease["pool"], "ci");
    assert_eq!(lease["requestId"], "exec-7-attempt-1");
    assert!(s(&lease["expiresAt"]).ends_with('Z'), "{lease}");
    // The same request id is the same lease (a retried Kestra attempt).
    let again = stack.http("POST", "/v1/pools/ci/leases", t, Some(&body)).await;
    assert_eq!((s(&again.json["id"]), s(&again.json["served"])), (id.as_str(), "SERVED_REPEAT"), "{again:?}");

    let a = stack
        .http(
            "POST",
            &format!("/v1/leases/{id}/exec"),
            t,
            Some(&json!({"command": {"script": "echo one > state; echo first"}})),
        )
        .await;
    assert_eq!((a.status, &a.json["exitCode"], &a.json["stdout"]), (200, &json!(0), &json!("first\n")), "{a:?}");
    assert!(!s(&a.json["execId"]).is_empty());
    let a = stack
        .http(
            "POST",
            &format!("/v1/leases/{id}/exec"),
            t,
            Some(&json!({"command": {"argv": ["sh", "-c", "cat state; exit 7"]}, "execId": "second"})),
        )
        .await;
    assert_eq!(
        (a.status, &a.json["exitCode"], &a.json["stdout"], &a.json["execId"]),
        (200, &json!(7), &json!("one\n"), &json!("second"))
    );

    let a = stack.http("POST", &format!("/v1/leases/{id}/renew"), t, Some(&json!({"ttl": "600s"}))).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(s(&a.json["expiresAt"]) >= s(&lease["expiresAt"]));

    let pools = stack.http("GET", "/v1/pools", t, None).await;
    let ci = pools.json["pools"].as_array().unwrap().iter().find(|p| p["name"] == "ci").unwrap().clone();
    assert_eq!(ci["leases"], 1, "{ci}");
    assert!(ci["generation"].is_string());
    assert_eq!(ci["config"]["maxSize"], 2);
    let leases = stack.http("GET", "/v1/leases", t, None).await;
    assert_eq!(leases.json["leases"].as_array().unwrap().len(), 1);

    let a = stack.http("DELETE", &format!("/v1/leases/{id}"), t, None).await;
    assert_eq!((a.status, &a.json), (200, &json!({})));
    // Releasing twice is fine.
    let a = stack.http("DELETE", &format!("/v1/leases/{id}"), t, None).await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_output_is_capped_and_flagged() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let t = Some(stack.token.as_str());
    let script = "head -c 1500000 /dev/zero | tr '\\0' a; echo small >&2";
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&json!({"command": {"script": script}}))).await;
    assert_eq!(a.status, 200, "{:?}", a.status);
    assert_eq!(a.json["stdoutTruncated"], true);
    assert_eq!(s(&a.json["stdout"]).len(), mpool_api::json::MAX_STREAM);
    assert_eq!((&a.json["stderr"], &a.json["stderrTruncated"]), (&json!("small\n"), &json!(false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_hangs_up_cancels_its_command() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let t = Some(stack.token.as_str());
    let a = stack.http("POST", "/v1/pools/ci/leases", t, Some(&json!({"holder": "h"}))).await;
    let id = s(&a.json["id"]).to_string();
    let conn = stack
        .http_send(
            "POST",
            &format!("/v1/leases/{id}/exec"),
            t,
            Some(&json!({"command": {"script": "echo $$ > pid; exec sleep 600"}})),
            false,
        )
        .await;
    let c = stack.client().await;
    // The exit code of `argv` on the lease.
    let code = |argv: &'static [&'static str]| {
        let (mut c, id) = (c.clone(), id.clone());
        async move { exec(&mut c, &id, argv).await.map(|(code, _, _)| code) }
    };
    eventually("the command starts", Duration::from_secs(30), || async {
        code(&["test", "-s", "pid"]).await.map(|code| (code == 0).then_some(()))
    })
    .await;
    assert_eq!(code(&["sh", "-c", "kill -0 $(cat pid)"]).await.unwrap(), 0, "running");
    drop(conn);
    eventually("the command ends after its caller hung up", Duration::from_secs(30), || async {
        code(&["sh", "-c", "kill -0 $(cat pid)"]).await.map(|code| (code != 0).then_some(()))
    })
    .await;
    let a = stack.http("DELETE", &format!("/v1/leases/{id}"), t, None).await;
    assert_eq!(a.status, 200);
}
