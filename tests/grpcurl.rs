//! The API from the real `grpcurl` binary (installed by `.ci/run`, pinned), against `mpool serve`
//! and `mpool sim`: reflection (`list`, `describe` with the proto comments), the JSON mapping of
//! Acquire / Exec / Upload / Download / Release / Run / Health over the Unix socket, TLS + bearer
//! tokens over TCP (and refusals without a token or with a wrong one), and every command of
//! `deploy/grpcurl.md`, run as written.
//!
//! grpcurl missing is a failure that says how to install it; `MPOOL_SKIP_GRPCURL=1` skips.
mod common;

use std::path::{Path, PathBuf};

use common::MPOOL;
use common::tools::{self, Output};
use mpool_testkit::{Stack, StackOptions};
use serde_json::Value;

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 3\n";

/// grpcurl against one stack.
struct Grpcurl {
    bin: PathBuf,
    unix: String,
    tcp_name: String,
    ca: String,
    token: String,
}

impl Grpcurl {
    fn new(bin: PathBuf, stack: &Stack) -> Grpcurl {
        Grpcurl {
            bin,
            unix: format!("unix://{}", stack.socket.display()),
            tcp_name: format!("localhost:{}", stack.tcp.port()),
            ca: stack.ca.display().to_string(),
            token: stack.token.clone(),
        }
    }

    async fn raw(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        tools::run(&self.bin, args, stdin, &[]).await
    }

    /// Over the Unix socket: `grpcurl -plaintext -unix [flags] unix://SOCK rest...`.
    async fn unix(&self, flags: &[&str], rest: &[&str]) -> Output {
        let mut args = vec!["-plaintext", "-unix"];
        args.extend_from_slice(flags);
        args.push(&self.unix);
        args.extend_from_slice(rest);
        self.raw(&args, None).await
    }

    /// A call with `-d JSON` over the Unix socket.
    async fn call(&self, method: &str, json: &str) -> Output {
        self.unix(&["-d", json], &[method]).await
    }

    /// Over TCP with TLS: `grpcurl -cacert CA [flags] localhost:PORT rest...`.
    async fn tls(&self, flags: &[&str], rest: &[&str]) -> Output {
        let mut args = vec!["-cacert", &self.ca];
        args.extend_from_slice(flags);
        args.push(&self.tcp_name);
        args.extend_from_slice(rest);
        self.raw(&args, None).await
    }

    fn bearer(&self) -> String {
        format!("authorization: Bearer {}", self.token)
    }
}

/// One JSON object (the only message of a unary answer).
fn one(o: &Output) -> Value {
    let mut v = o.json();
    assert_eq!(v.len(), 1, "expected one JSON message:\n{}", o.stdout);
    v.remove(0)
}

/// Every key of an object (recursively) is lowerCamelCase: no snake_case leaks into JSON.
fn assert_camel(v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                assert!(!k.contains('_'), "JSON key {k:?} is not lowerCamelCase in {m:?}");
                assert!(k.chars().next().is_some_and(|c| c.is_ascii_lowercase()), "JSON key {k:?}");
                assert_camel(v);
            }
        }
        Value::Array(a) => a.iter().for_each(assert_camel),
        _ => {}
    }
}

/// Standard base64, as proto3 JSON writes `bytes`.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// stdout, stderr and the exit event of an Exec stream.
fn exec_events(o: &Output) -> (String, String, Value) {
    let events = o.json();
    assert!(
        events.first().is_some_and(|e| e["started"].as_str().is_some_and(|s| !s.is_empty())),
        "first event is `started`:\n{}",
        o.stdout
    );
    let (mut out, mut err, mut exit) = (String::new(), String::new(), None);
    for e in &events {
        assert_camel(e);
        if let Some(s) = e["stdout"].as_str() {
            out.push_str(s);
        }
        if let Some(s) = e["stderr"].as_str() {
            err.push_str(s);
        }
        if e.get("exit").is_some() {
            exit = Some(e["exit"].clone());
        }
    }
    assert!(events.last().is_some_and(|e| e.get("exit").is_some()), "the last event is `exit`:\n{}", o.stdout);
    (out, err, exit.unwrap_or_default())
}

async fn setup() -> Option<(Stack, Grpcurl)> {
    let bin = tools::grpcurl()?;
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let g = Grpcurl::new(bin, &stack);
    Some((stack, g))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_api_with_its_comments() {
    let Some((_stack, g)) = setup().await else { return };
    let list = g.unix(&[], &["list"]).await;
    list.expect_code(0, "list");
    let services: Vec<&str> = list.stdout.lines().collect();
    for s in ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "mpool.v1.Pool"] {
        assert!(services.contains(&s), "`list` shows {s}: {services:?}");
    }
    // multipassd's protocol is compiled in too, but not served here: not advertised.
    assert!(!list.stdout.contains("multipass.Rpc"), "`list` advertises a service mpool does not serve: {services:?}");

    let methods = g.unix(&[], &["list", "mpool.v1.Pool"]).await;
    methods.expect_code(0, "list mpool.v1.Pool");
    for m in [
        "Acquire",
        "Renew",
        "Release",
        "Exec",
        "CancelExec",
        "Upload",
        "Download",
        "Run",
        "ListPools",
        "GetPool",
        "ListVms",
        "ListLeases",
    ] {
        assert!(methods.stdout.lines().any(|l| l == format!("mpool.v1.Pool.{m}")), "{m} listed:\n{}", methods.stdout);
    }

    let d = g.unix(&[], &["describe", "mpool.v1.Pool"]).await;
    d.expect_code(0, "describe mpool.v1.Pool");
    assert!(d.stdout.contains("mpool.v1.Pool is a service:"), "{}", d.stdout);
    assert!(d.stdout.contains("// The pool service."), "service comment:\n{}", d.stdout);
    assert!(d.stdout.contains("// Leases a clean VM from a pool, waiting"), "RPC comments:\n{}", d.stdout);
    assert!(d.stdout.contains("// Ends a lease; its VM is reset in the background."), "RPC comments:\n{}", d.stdout);
    assert!(
        d.stdout.contains("rpc Exec ( .mpool.v1.ExecRequest ) returns ( stream .mpool.v1.ExecEvent );"),
        "{}",
        d.stdout
    );
    assert!(
        d.stdout.contains("rpc Upload ( stream .mpool.v1.UploadRequest ) returns ( .mpool.v1.UploadResponse );"),
        "{}",
        d.stdout
    );

    let d = g.unix(&[], &["describe", "mpool.v1.AcquireRequest"]).await;
    d.expect_code(0, "describe mpool.v1.AcquireRequest");
    assert!(
        d.stdout.contains("// Idempotency key: the same key (per pool) returns the same lease"),
        "field comments:\n{}",
        d.stdout
    );
    assert!(d.stdout.contains(".google.protobuf.Duration ttl = 4;"), "{}", d.stdout);

    let d = g.unix(&[], &["describe", "mpool.v1.Command"]).await;
    d.expect_code(0, "describe mpool.v1.Command");
    assert!(
        d.stdout.contains("map<string, string> env = 4;") && d.stdout.contains("// Environment variables"),
        "{}",
        d.stdout
    );

    // The health service is described too (grpcurl needs its schema to call it).
    g.unix(&[], &["describe", "grpc.health.v1.Health"]).await.expect_code(0, "describe health");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_cycle_run_and_health_as_json_over_the_unix_socket() {
    let Some((_stack, g)) = setup().await else { return };

    for body in ["{}", r#"{"service": "mpool.v1.Pool"}"#] {
        let h = g.call("grpc.health.v1.Health/Check", body).await;
        h.expect_code(0, "health");
        assert_eq!(one(&h)["status"], "SERVING", "{body}");
    }

    // Acquire: snake_case accepted in the request, lowerCamelCase in the answer.
    let a = g
        .call("mpool.v1.Pool/Acquire", r#"{"pool": "ci", "holder": "grpcurl", "ttl": "600s", "request_id": "rid-1"}"#)
        .await;
    a.expect_code(0, "Acquire");
    let lease = one(&a);
    assert_camel(&lease);
    let id = lease["id"].as_str().expect("lease id").to_string();
    assert!(id.starts_with("lease-"), "{lease}");
    assert_eq!(
        (lease["pool"].as_str(), lease["holder"].as_str(), lease["requestId"].as_str()),
        (Some("ci"), Some("grpcurl"), Some("rid-1"))
    );
    for k in ["vm", "grantedAt", "expiresAt", "waited"] {
        assert!(lease[k].as_str().is_some_and(|s| !s.is_empty()), "{k} in {lease}");
    }
    assert!(lease["expiresAt"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "RFC 3339: {lease}");
    assert!(lease["waited"].as_str().is_some_and(|d| d.ends_with('s')), "a Duration is \"1.5s\": {lease}");
    assert!(["SERVED_HOT", "SERVED_WARM", "SERVED_COLD"].contains(&lease["served"].as_str().unwrap_or("")), "{lease}");

    // The same request id: the same lease.
    let again = g.call("mpool.v1.Pool/Acquire", r#"{"pool": "ci", "requestId": "rid-1"}"#).await;
    let again = one(again.expect_code(0, "repeat"));
    assert_eq!((again["id"].as_str(), again["served"].as_str()), (Some(id.as_str()), Some("SERVED_REPEAT")));

    // Exec: started, stdout, stderr, exit code.
    let e = g
        .call(
            "mpool.v1.Pool/Exec",
            &format!(
                r#"{{"leaseId": "{id}", "command": {{"argv": ["sh", "-c", "echo hello; echo oops >&2; exit 3"]}}}}"#
            ),
        )
        .await;
    e.expect_code(0, "Exec");
    let (out, err, exit) = exec_events(&e);
    assert_eq!((out.as_str(), err.as_str()), ("hello\n", "oops\n"));
    assert_eq!(exit["code"], 3, "{exit}");
    assert!(exit["duration"].as_str().is_some_and(|d| d.ends_with('s')), "{exit}");
    // Exit code 0 is a default value: shown with -emit-defaults.
    let e = g
        .unix(
            &["-emit-defaults", "-d", &format!(r#"{{"leaseId": "{id}", "command": {{"argv": ["uname", "-s"]}}}}"#)],
            &["mpool.v1.Pool/Exec"],
        )
        .await;
    let (out, _, exit) = exec_events(e.expect_code(0, "Exec uname"));
    assert_eq!(out, "Linux\n");
    assert_eq!(
        (exit["code"].as_i64(), exit["timedOut"].as_bool(), exit["cancelled"].as_bool()),
        (Some(0), Some(false), Some(false)),
        "{exit}"
    );
    // A script with env (no quoting at all).
    let e = g
        .call(
            "mpool.v1.Pool/Exec",
            &format!(r#"{{"leaseId": "{id}", "command": {{"script": "echo \"$GREETING, it's $((6 * 7))\"", "env": {{"GREETING": "hi"}}}}}}"#),
        )
        .await;
    let (out, _, _) = exec_events(e.expect_code(0, "Exec script"));
    assert_eq!(out, "hi, it's 42\n");

    // Upload text, Download it back (bytes are base64; uint64 is a string).
    let u = g
        .call(
            "mpool.v1.Pool/Upload",
            &format!(r#"{{"leaseId": "{id}", "path": "note.txt", "text": "written by grpcurl\n", "mode": 416}}"#),
        )
        .await;
    let up = one(u.expect_code(0, "Upload"));
    assert_eq!(up["size"], "19", "{up}");
    assert_eq!(up["path"], "note.txt", "{up}");
    let pwd = g.call("mpool.v1.Pool/Exec", &format!(r#"{{"leaseId": "{id}", "command": {{"argv": ["pwd"]}}}}"#)).await;
    let home = exec_events(pwd.expect_code(0, "pwd")).0.trim().to_string();
    let u = g
        .call(
            "mpool.v1.Pool/Upload",
            &format!(r#"{{"leaseId": "{id}", "path": "{home}/sub/../abs.txt", "text": "x"}}"#),
        )
        .await;
    assert_eq!(one(u.expect_code(0, "Upload absolute"))["path"].as_str(), Some(format!("{home}/abs.txt").as_str()));
    let d = g.call("mpool.v1.Pool/Download", &format!(r#"{{"leaseId": "{id}", "path": "note.txt"}}"#)).await;
    let chunk = one(d.expect_code(0, "Download"));
    assert_eq!(chunk["data"].as_str(), Some(base64(b"written by grpcurl\n").as_str()), "{chunk}");
    assert_eq!((chunk["size"].as_str(), chunk["mode"].as_i64()), (Some("19"), Some(0o640)), "{chunk}");

    // The lease is listed; Release, and again (idempotent); then the lease is refused.
    let l = one(g.unix(&[], &["mpool.v1.Pool/ListLeases"]).await.expect_code(0, "ListLeases"));
    assert!(l["leases"].as_array().is_some_and(|a| a.iter().any(|x| x["id"] == id.as_str())), "{l}");
    for _ in 0..2 {
        let r = g.call("mpool.v1.Pool/Release", &format!(r#"{{"leaseId": "{id}"}}"#)).await;
        assert_eq!(one(r.expect_code(0, "Release")), serde_json::json!({}));
    }
    let e = g.call("mpool.v1.Pool/Exec", &format!(r#"{{"leaseId": "{id}", "command": {{"argv": ["true"]}}}}"#)).await;
    e.expect_code(64 + 9, "Exec on a released lease");
    assert!(e.stderr.contains("Code: FailedPrecondition") && e.stderr.contains("acquire a new one"), "{}", e.stderr);

    // Run: lease, output, output files as chunk events (base64), the result listing them with
    // the missing one marked. The request is a stream: the description, then input chunks.
    let r = g
        .call(
            "mpool.v1.Pool/Run",
            r#"{"pool": "ci", "holder": "grpcurl-run", "command": {"script": "cat in.txt; echo result > out.txt; echo warn >&2; exit 5"},
                "inputs": [{"path": "in.txt", "text": "input "}], "outputs": ["out.txt", "absent.txt"]}
               {"chunk": {"input": 0, "data": "dGV4dAo="}}"#,
        )
        .await;
    r.expect_code(0, "Run");
    let events = r.json();
    events.iter().for_each(assert_camel);
    assert_eq!(events[0]["lease"]["holder"], "grpcurl-run", "first event is the lease: {events:?}");
    let text = |k: &str| events.iter().filter_map(|e| e[k].as_str()).collect::<String>();
    assert_eq!((text("stdout").as_str(), text("stderr").as_str()), ("input text\n", "warn\n"));
    let result = &events.last().expect("events")["result"];
    assert_eq!(result["exit"]["code"], 5, "{result}");
    assert_eq!(result["outputs"][0]["path"], "out.txt");
    let chunks: Vec<&Value> = events.iter().filter_map(|e| e.get("output")).collect();
    assert_eq!(chunks.len(), 1, "one chunk for the small output: {events:?}");
    assert_eq!(chunks[0]["data"].as_str(), Some(base64(b"result\n").as_str()), "{events:?}");
    assert_eq!(result["outputs"][0]["size"], "7", "{result}");
    assert_eq!(
        (result["outputs"][1]["path"].as_str(), result["outputs"][1]["missing"].as_bool()),
        (Some("absent.txt"), Some(true))
    );
    for k in ["acquire", "upload", "exec", "download", "total"] {
        assert!(result["timings"][k].as_str().is_some_and(|d| d.ends_with('s')), "timings.{k}: {result}");
    }
    assert!(result["served"].as_str().is_some_and(|s| s.starts_with("SERVED_")), "{result}");

    // A 10 MB JSON string (on stdin: too long for an argument) is above the 8 MiB message
    // limit: RESOURCE_EXHAUSTED with what to do, and the server carries on.
    let big = format!(r#"{{"pool": "ci", "holder": "{}"}}"#, "h".repeat(10_000_000));
    let mut args = vec!["-plaintext", "-unix", "-d", "@"];
    args.extend_from_slice(&[&g.unix, "mpool.v1.Pool/Acquire"]);
    let o = g.raw(&args, Some(big.as_bytes())).await;
    o.expect_code(64 + 8, "a 10 MB JSON string");
    assert!(
        o.stderr.contains("Code: ResourceExhausted") && o.stderr.contains("request message too large"),
        "{}",
        o.stderr
    );
    let h = g.call("grpc.health.v1.Health/Check", "{}").await;
    assert_eq!(one(h.expect_code(0, "health after the big message"))["status"], "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_bearer_tokens_over_tcp() {
    let Some((stack, g)) = setup().await else { return };
    let bearer = g.bearer();

    let p = one(g.tls(&["-H", &bearer], &["mpool.v1.Pool/ListPools"]).await.expect_code(0, "ListPools over TLS"));
    assert_eq!(p["pools"][0]["name"], "ci", "{p}");
    assert_eq!(p["pools"][0]["config"]["maxSize"], 3, "{p}");

    // A lease cycle over TLS; by IP address, -authority names the certificate.
    let ip = format!("127.0.0.1:{}", stack.tcp.port());
    let a = g
        .raw(
            &[
                "-cacert",
                &g.ca,
                "-authority",
                "localhost",
                "-H",
                &bearer,
                "-d",
                r#"{"pool": "ci", "holder": "tls"}"#,
                &ip,
                "mpool.v1.Pool/Acquire",
            ],
            None,
        )
        .await;
    let lease = one(a.expect_code(0, "Acquire over TLS by IP with -authority"));
    let id = lease["id"].as_str().expect("id").to_string();
    let exec = |token: String| {
        let body = format!(r#"{{"leaseId": "{id}", "command": {{"argv": ["sh", "-c", "echo over tls; exit 2"]}}}}"#);
        let g = &g;
        async move { g.tls(&["-H", &token, "-d", &body], &["mpool.v1.Pool/Exec"]).await }
    };
    let e = exec(bearer.clone()).await;
    let (out, _, exit) = exec_events(e.expect_code(0, "Exec over TLS"));
    assert_eq!((out.as_str(), exit["code"].as_i64()), ("over tls\n", Some(2)));

    // Another token may not touch this lease.
    let e = exec("authorization: Bearer other-token".into()).await;
    e.expect_code(64 + 7, "Exec with another token");
    assert!(
        e.stderr.contains("Code: PermissionDenied") && e.stderr.contains("belongs to another client"),
        "{}",
        e.stderr
    );

    let r = g.tls(&["-H", &bearer, "-d", &format!(r#"{{"leaseId": "{id}"}}"#)], &["mpool.v1.Pool/Release"]).await;
    r.expect_code(0, "Release over TLS");

    // Without a token, or with a wrong one: UNAUTHENTICATED, saying how to send one.
    let no = g.tls(&[], &["mpool.v1.Pool/ListPools"]).await;
    no.expect_code(64 + 16, "no token");
    assert!(
        no.stderr.contains("Code: Unauthenticated") && no.stderr.contains("authorization: Bearer"),
        "{}",
        no.stderr
    );
    let acq = g.tls(&["-d", r#"{"pool": "ci"}"#], &["mpool.v1.Pool/Acquire"]).await;
    acq.expect_code(64 + 16, "Acquire without a token");
    let wrong = g.tls(&["-H", "authorization: Bearer not-a-token"], &["mpool.v1.Pool/ListPools"]).await;
    wrong.expect_code(64 + 16, "wrong token");
    assert!(
        wrong.stderr.contains("Code: Unauthenticated") && wrong.stderr.contains("invalid token"),
        "{}",
        wrong.stderr
    );

    // Health and reflection stay open for probes and `list`.
    let h = g.tls(&[], &["grpc.health.v1.Health/Check"]).await;
    assert_eq!(one(h.expect_code(0, "health over TLS"))["status"], "SERVING");
    let l = g.tls(&[], &["list"]).await;
    assert!(l.expect_code(0, "list over TLS").stdout.contains("mpool.v1.Pool"), "{}", l.stdout);

    // TLS is required on that port: plaintext does not get an answer.
    let plain = g.raw(&["-plaintext", "-H", &bearer, &g.tcp_name, "mpool.v1.Pool/ListPools"], None).await;
    assert_ne!(plain.code, 0, "plaintext to the TLS port must fail:\n{}", plain.stdout);
}

/// One command of the cheat sheet: its text (continuations joined) and expected exit code.
struct SheetCommand {
    text: String,
    exit: i32,
}

/// The commands of the ```sh blocks of a markdown file.
fn sheet_commands(md: &str) -> Vec<SheetCommand> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in md.lines() {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let t = line.trim();
        if pending.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            pending.push_str(cont);
            continue;
        }
        pending.push_str(t);
        let text = std::mem::take(&mut pending);
        let exit = text
            .split("# exit ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        out.push(SheetCommand { text, exit });
    }
    assert!(pending.is_empty() && !in_sh, "unterminated block or continuation in the cheat sheet");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cheat_sheet_runs_as_written() {
    let Some((stack, g)) = setup().await else { return };
    let md_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grpcurl.md");
    let md = std::fs::read_to_string(&md_path).expect("deploy/grpcurl.md");
    let commands = sheet_commands(&md);
    assert!(commands.len() > 20, "the cheat sheet has its commands: {}", commands.len());

    // One bash script: every command, framed by markers carrying its exit code.
    let mut script = String::new();
    for (i, c) in commands.iter().enumerate() {
        script.push_str(&format!("echo '@@@ begin {i}'\n{}\necho \"@@@ end {i} $?\"\n", c.text));
    }
    let dir = g.bin.parent().expect("grpcurl dir").display().to_string();
    let path = format!("{dir}:{}", std::env::var("PATH").unwrap_or_default());
    let env = [
        ("PATH", path.as_str()),
        ("SOCK", &stack.socket.display().to_string()),
        ("ADDR", &g.tcp_name),
        ("IP_ADDR", &format!("127.0.0.1:{}", stack.tcp.port())),
        ("TLS_NAME", "localhost"),
        ("CA", &g.ca),
        ("TOKEN", &stack.token),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, *v)).collect();
    let o = tools::run(Path::new("bash"), &["-c", &format!("exec 2>&1\n{script}")], None, &env).await;
    assert_eq!(o.code, 0, "the sheet's script ran to its end:\n{}", o.stdout);

    for (i, c) in commands.iter().enumerate() {
        let begin = format!("@@@ begin {i}\n");
        let start =
            o.stdout.find(&begin).unwrap_or_else(|| panic!("command {i} did not run: {}\n{}", c.text, o.stdout))
                + begin.len();
        let rest = &o.stdout[start..];
        let end_marker = format!("@@@ end {i} ");
        let end =
            rest.find(&end_marker).unwrap_or_else(|| panic!("command {i} did not finish: {}\n{}", c.text, o.stdout));
        let output = &rest[..end];
        let code: i32 =
            rest[end + end_marker.len()..].lines().next().and_then(|n| n.trim().parse().ok()).expect("exit code");
        assert_eq!(
            code, c.exit,
            "cheat sheet command exited {code}, expected {}:\n  {}\noutput:\n{output}",
            c.exit, c.text
        );
        let t = &c.text;
        let must =
            |needle: &str| assert!(output.contains(needle), "`{t}` should print {needle:?}; it printed:\n{output}");
        if c.exit != 0 {
            assert!(output.contains("Code: ") || output.contains("\"code\":"), "`{t}` prints the status:\n{output}");
            continue;
        }
        if t.starts_with("echo \"lease: ") {
            must("lease: lease-");
        } else if t.contains(" list") && !t.contains("ListLeases") {
            must("mpool.v1.Pool");
        } else if t.contains(" describe ") {
            must("//");
        } else if t.contains("Health/Check") {
            must("\"status\": \"SERVING\"");
        } else if t.contains("Pool/Exec") {
            must("\"exit\"");
        } else if t.contains("Pool/Run") {
            must("\"result\"");
        } else if t.contains("Pool/Download") {
            must(&base64(b"written by grpcurl\n"));
        } else if t.contains("Pool/Upload") {
            must("\"size\": \"19\"");
        } else if t.contains("Pool/ListPools") || t.contains("Pool/GetPool") {
            must("\"ci\"");
        } else if t.contains("Pool/Renew") || t.contains("Pool/ListLeases") {
            must("\"id\": \"lease-");
        }
    }
    // Spot checks of what the sheet promises.
    assert!(o.stdout.contains("\"stdout\": \"hello\\n\"") && o.stdout.contains("\"code\": 3"), "{}", o.stdout);
    assert!(o.stdout.contains("hi from /"), "the script Exec with env: {}", o.stdout);
    assert!(o.stdout.contains("\"stdout\": \"hello from grpcurl\\n\""), "Run's input: {}", o.stdout);
    assert!(o.stdout.contains("\"stdout\": \"first chunk, second chunk\\n\""), "Run's chunked input: {}", o.stdout);
    assert!(o.stdout.contains("\"stdout\": \"over tls\\n\""), "Run over TLS: {}", o.stdout);
}
