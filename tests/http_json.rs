//! The HTTP/JSON facade (`[api] http_listen`) end to end against `mpool serve` + `mpool sim`:
//! every RPC it exposes round-tripping through the generated messages and fitting its OpenAPI
//! document, one-shot runs, the lease endpoints, tokens, error statuses, output caps,
//! idempotency, and a caller that hangs up cancelling its command.
mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::MPOOL;
use mpool_api::proto::{self, v1};
use mpool_testkit::api::exec;
use mpool_testkit::{Stack, StackOptions, eventually};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

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
    assert_eq!(STANDARD.decode(s(&outs[0]["data"])).unwrap(), b"from text");
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

/// A message as a body: its proto3 JSON (the generated serde impls) without the fields the
/// path gives.
fn body<T: Serialize>(m: &T, from_path: &[&str]) -> Value {
    let mut v = serde_json::to_value(m).expect("a message encodes");
    for f in from_path {
        v.as_object_mut().expect("an object").remove(*f);
    }
    v
}

/// An answer parsed into a generated message (which refuses unknown fields).
fn parsed<T: DeserializeOwned>(what: &str, v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what}: {e}: {v}"))
}

/// The facade's OpenAPI document, as served.
struct Document(Value);

impl Document {
    /// Asserts that `answer` fits the 200 schema of `method route`.
    fn check(&self, method: &str, route: &str, answer: &Value) {
        let op = &self.0["paths"][route][method];
        assert!(op.is_object(), "{method} {route} is not in the document");
        let mut root = self.0.clone();
        let at = route.replace('/', "~1").replace('{', "%7B").replace('}', "%7D");
        root["$ref"] = format!("#/paths/{at}/{method}/responses/200/content/application~1json/schema").into();
        let v = jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{method} {route}: {e}"));
        let errors: Vec<String> = v.iter_errors(answer).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{method} {route}: {errors:?}\n{answer}");
    }

    /// The JSON names of `ExitStatus`'s fields.
    fn exit_fields(&self) -> Vec<String> {
        let p = self.0["components"]["schemas"]["ExitStatus"]["properties"].as_object().expect("ExitStatus");
        p.keys().cloned().collect()
    }

    /// An Exec or Run answer split into its `ExitStatus` (`exitCode` back as `code`) and the rest.
    fn split_exit(&self, answer: &Value) -> (v1::ExitStatus, Map<String, Value>) {
        let mut rest = answer.as_object().expect("an object").clone();
        let mut exit = Map::new();
        for k in self.exit_fields() {
            let from = if k == "code" { "exitCode" } else { k.as_str() };
            if let Some(v) = rest.remove(from) {
                exit.insert(k, v);
            }
        }
        (parsed("the exit status", &Value::Object(exit)), rest)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_round_trips_through_the_facade() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let t = Some(stack.token.as_str());
    let mut grpc = stack.client().await;
    // The document needs no token.
    let doc = stack.http("GET", "/v1/openapi.json", None, None).await;
    assert_eq!((doc.status, &doc.json["openapi"]), (200, &json!("3.1.0")), "{doc:?}");
    let doc = Document(doc.json);
    let secs = |seconds| Some(proto::Duration { seconds, nanos: 0 });

    // Acquire.
    let req = v1::AcquireRequest {
        holder: "round-trip".into(),
        request_id: "rt-1".into(),
        ttl: secs(300),
        wait: secs(30),
        ..Default::default()
    };
    let a = stack.http("POST", "/v1/pools/ci/leases", t, Some(&body(&req, &["pool"]))).await;
    assert_eq!(a.status, 200, "{a:?}");
    doc.check("post", "/v1/pools/{pool}/leases", &a.json);
    let lease: v1::Lease = parsed("Acquire", &a.json);
    assert_eq!((lease.pool.as_str(), lease.holder.as_str(), lease.request_id.as_str()), ("ci", "round-trip", "rt-1"));
    assert_ne!(lease.served, v1::Served::Unspecified as i32);
    let (granted, expires) = (lease.granted_at.expect("grantedAt"), lease.expires_at.expect("expiresAt"));
    assert!(expires.seconds >= granted.seconds + 299, "{granted} {expires}");
    let path = |tail: &str| format!("/v1/leases/{}{tail}", lease.id);

    // Renew.
    let req = v1::RenewRequest { ttl: secs(600), ..Default::default() };
    let a = stack.http("POST", &path("/renew"), t, Some(&body(&req, &["leaseId"]))).await;
    doc.check("post", "/v1/leases/{id}/renew", &a.json);
    let renewed: v1::Lease = parsed("Renew", &a.json);
    assert_eq!(renewed.id, lease.id);
    assert!(renewed.expires_at.expect("expiresAt").seconds >= granted.seconds + 599, "{}", a.json);

    // Exec: argv, env, stdin as base64, an exec id, a non-zero exit.
    let command = v1::Command {
        argv: vec!["sh".into(), "-c".into(), "cat; echo \"$GREETING\"; echo err >&2; exit 5".into()],
        env: [("GREETING".to_string(), "héllo".to_string())].into(),
        stdin: b"from stdin\n".to_vec(),
        timeout: secs(60),
        ..Default::default()
    };
    let req = v1::ExecRequest { command: Some(command), exec_id: "rt-exec".into(), ..Default::default() };
    let a = stack.http("POST", &path("/exec"), t, Some(&body(&req, &["leaseId"]))).await;
    assert_eq!(a.status, 200, "{a:?}");
    doc.check("post", "/v1/leases/{id}/exec", &a.json);
    let (exit, rest) = doc.split_exit(&a.json);
    assert_eq!((exit.code, exit.timed_out, exit.cancelled), (5, false, false), "{}", a.json);
    assert!(exit.duration.is_some(), "{}", a.json);
    assert_eq!(
        (&rest["execId"], &rest["stdout"], &rest["stderr"]),
        (&json!("rt-exec"), &json!("from stdin\nhéllo\n"), &json!("err\n"))
    );

    // CancelExec of a command that already ended.
    let a = stack.http("POST", &path("/execs/rt-exec/cancel"), t, None).await;
    doc.check("post", "/v1/leases/{id}/execs/{execId}/cancel", &a.json);
    let cancelled: v1::CancelExecResponse = parsed("CancelExec", &a.json);
    assert!(!cancelled.cancelled);

    // The listings, equal to what gRPC answers.
    let a = stack.http("GET", "/v1/leases", t, None).await;
    doc.check("get", "/v1/leases", &a.json);
    let over_http: v1::ListLeasesResponse = parsed("ListLeases", &a.json);
    let over_grpc = grpc.list_leases(v1::ListLeasesRequest::default()).await.expect("ListLeases").into_inner();
    assert_eq!(over_http, over_grpc);
    assert_eq!(over_http.leases.len(), 1);
    let a = stack.http("GET", "/v1/pools", t, None).await;
    doc.check("get", "/v1/pools", &a.json);
    let pools: v1::ListPoolsResponse = parsed("ListPools", &a.json);
    let mut names: Vec<&str> = pools.pools.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ci", "one"]);
    let a = stack.http("GET", "/v1/pools/ci", t, None).await;
    doc.check("get", "/v1/pools/{pool}", &a.json);
    let pool: v1::PoolInfo = parsed("GetPool", &a.json);
    let over_grpc = grpc.get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.expect("GetPool").into_inner();
    assert_eq!((pool.config, pool.generation), (over_grpc.config, over_grpc.generation));
    let a = stack.http("GET", "/v1/vms", t, None).await;
    doc.check("get", "/v1/vms", &a.json);
    let vms: v1::ListVmsResponse = parsed("ListVms", &a.json);
    assert!(vms.vms.iter().any(|v| v.name == lease.vm && v.lease_id == lease.id), "{}", a.json);

    // Release (both spellings), twice is fine.
    let a = stack.http("DELETE", &path(""), t, None).await;
    doc.check("delete", "/v1/leases/{id}", &a.json);
    assert_eq!(parsed::<v1::ReleaseResponse>("Release", &a.json), v1::ReleaseResponse {});
    let a = stack.http("POST", &path("/release"), t, None).await;
    doc.check("post", "/v1/leases/{id}/release", &a.json);
    assert_eq!(a.status, 200, "{a:?}");

    // Run: inputs inline (bytes as base64, and text), outputs read back.
    let req = v1::RunRequest {
        holder: "round-trip".into(),
        request_id: "rt-run".into(),
        command: Some(v1::Command {
            script: "cat in.bin > out.txt; cat t.txt >> out.txt; exit 3".into(),
            ..Default::default()
        }),
        inputs: vec![
            v1::InputFile { path: "in.bin".into(), data: b"bytes,".to_vec(), ..Default::default() },
            v1::InputFile { path: "t.txt".into(), text: "text".into(), mode: 0o600, ..Default::default() },
        ],
        outputs: vec!["out.txt".into(), "missing.txt".into()],
        wait: secs(30),
        ..Default::default()
    };
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&body(&req, &["pool", "chunk"]))).await;
    assert_eq!(a.status, 200, "{a:?}");
    doc.check("post", "/v1/pools/{pool}/run", &a.json);
    let (exit, mut rest) = doc.split_exit(&a.json);
    assert_eq!(exit.code, 3, "{}", a.json);
    assert!(!rest.remove("leaseId").and_then(|l| l.as_str().map(String::from)).unwrap_or_default().is_empty());
    for k in ["stdout", "stderr", "stdoutTruncated", "stderrTruncated"] {
        assert!(rest.remove(k).is_some(), "{k}: {}", a.json);
    }
    let mut data = Vec::new();
    for f in rest.get_mut("outputs").and_then(Value::as_array_mut).expect("outputs") {
        data.push(f.as_object_mut().and_then(|f| f.remove("data")).expect("data"));
    }
    rest.insert("exit".into(), serde_json::to_value(&exit).unwrap());
    let result: v1::RunResult = parsed("Run", &Value::Object(rest));
    assert_eq!(result.exit, Some(exit));
    assert!(!result.vm.is_empty() && result.timings.is_some(), "{}", a.json);
    assert_ne!(result.served, v1::Served::Unspecified as i32);
    assert_eq!(
        (result.outputs[0].path.as_str(), result.outputs[0].size, result.outputs[0].missing),
        ("out.txt", 10, false)
    );
    assert!(result.outputs[1].missing);
    assert_eq!(STANDARD.decode(data[0].as_str().unwrap()).unwrap(), b"bytes,text");
    assert_eq!(data[1], "");

    // Every documented operation is served: without a token, 401 where one is needed.
    for (route, ops) in doc.0["paths"].as_object().unwrap() {
        let concrete = route.replace("{pool}", "ci").replace("{id}", "no-such-lease").replace("{execId}", "e");
        for (method, op) in ops.as_object().unwrap() {
            let a = stack.http(&method.to_ascii_uppercase(), &concrete, None, None).await;
            if op["security"].as_array().unwrap().is_empty() {
                assert!(a.status == 200 || route == "/healthz" && a.status == 503, "{method} {route}: {a:?}");
            } else {
                assert_eq!(a.status, 401, "{method} {route}: {a:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_names_the_pool_and_lease_and_http_takes_one_message() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    let t = Some(stack.token.as_str());
    let run = json!({"pool": "one", "command": {"argv": ["true"]}});
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&run)).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(s(&a.json["message"]).starts_with("pool: the path gives it"), "{a:?}");
    let a = stack
        .http("POST", "/v1/leases/l1/exec", t, Some(&json!({"leaseId": "l2", "command": {"argv": ["true"]}})))
        .await;
    assert!(a.status == 400 && s(&a.json["message"]).starts_with("leaseId:"), "{a:?}");
    let chunk = json!({"command": {"argv": ["true"]}, "chunk": {"input": 0, "data": "aGk="}});
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&chunk)).await;
    assert!(a.status == 400 && s(&a.json["message"]).starts_with("chunk:"), "{a:?}");
    // A bad value names where it is.
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&json!({"inputs": [{"path": "a", "data": "!!"}]}))).await;
    assert!(a.status == 400 && s(&a.json["message"]).contains("inputs[0].data"), "{a:?}");
    let a = stack.http("POST", "/v1/pools/ci/leases", t, Some(&json!({"ttl": "5m"}))).await;
    assert!(
        a.status == 400 && s(&a.json["message"]).contains("ttl") && s(&a.json["message"]).contains("\"30s\""),
        "{a:?}"
    );
    // A known path with another method: the same JSON 404 as an unknown path.
    let a = stack.http("GET", "/v1/pools/ci/run", t, None).await;
    assert_eq!((a.status, s(&a.json["code"])), (404, "NOT_FOUND"), "{a:?}");
    assert!(s(&a.json["message"]).contains("openapi.json"), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_on_a_unix_socket_needs_no_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("http.sock");
    let mut o = StackOptions::tests(MPOOL, POOLS);
    o.metrics_and_http = false;
    o.api_toml = format!("http_listen = \"unix:{}\"", socket.display());
    let stack = Stack::start(o).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = tokio::net::UnixStream::connect(&socket).await.expect("connect to the facade's socket");
    c.write_all(b"GET /v1/pools/ci HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.expect("send");
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).await.expect("read the answer");
    let a = mpool_testkit::http::parse_http(&raw).expect("an answer");
    assert_eq!(a.status, 200, "{a:?}");
    let pool: v1::PoolInfo = parsed("GetPool", &a.json);
    assert_eq!(pool.name, "ci");
}
