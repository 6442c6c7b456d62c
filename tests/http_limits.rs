//! The HTTP/JSON facade's limits against a real `mpool serve`: a body over the limit is 413
//! naming it (declared up front or streamed in chunks), a client that does not finish its
//! headers or its TLS handshake is dropped after `http_header_timeout`, and connections beyond
//! `http_max_connections` are not served until others close.
mod common;

use std::time::Duration;

use common::MPOOL;
use mpool_api::json::MAX_BODY;
use mpool_testkit::http::{parse_http, read_answer};
use mpool_testkit::{Stack, StackOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 0\nmax_size = 1\n";

/// How long a test waits for the server to do what it must before failing (not a timing
/// assertion: only a bound on a test that would otherwise hang).
const DEADLINE: Duration = Duration::from_secs(60);

fn stack_options(api: &str) -> StackOptions {
    let mut o = StackOptions::tests(MPOOL, POOLS);
    o.api_toml = api.into();
    o
}

/// Reads until the server closes the connection (EOF, or an error such as a reset), failing
/// the test if it does not within [`DEADLINE`]; returns what arrived.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, what: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    match tokio::time::timeout(DEADLINE, stream.read_to_end(&mut buf)).await {
        Ok(_) => buf,
        Err(_) => panic!("{what}: the server kept the connection open for {DEADLINE:?}"),
    }
}

fn assert_names_the_limit(answer: &mpool_testkit::http::HttpAnswer) {
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/json"), "{answer:?}");
    let message = answer.json["message"].as_str().unwrap_or_default();
    assert!(message.contains(&MAX_BODY.to_string()), "{answer:?}");
    assert_eq!(answer.json["code"], "RESOURCE_EXHAUSTED", "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_naming_the_limit() {
    let stack = Stack::start(stack_options("")).await.expect("stack starts");
    let token = stack.token.clone();

    // Declared up front: answered before the body is sent (the client waits for 100-continue).
    let mut tls = stack.http_connect().await;
    let head = format!(
        "POST /v1/pools/ci/run HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        MAX_BODY + 1
    );
    tls.write_all(head.as_bytes()).await.expect("send the head");
    tls.flush().await.expect("send the head");
    let answer = tokio::time::timeout(DEADLINE, read_answer(&mut tls)).await.expect("an answer").expect("an answer");
    assert_names_the_limit(&answer.expect("an answer before the body"));

    // Streamed in chunks without a length: refused once the body passes the limit.
    let mut tls = stack.http_connect().await;
    let head = format!(
        "POST /v1/pools/ci/run HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.expect("send the head");
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0;
    while sent <= MAX_BODY {
        let n = chunk.len().min(MAX_BODY + 1 - sent);
        tls.write_all(format!("{n:x}\r\n").as_bytes()).await.expect("send a chunk");
        tls.write_all(&chunk[..n]).await.expect("send a chunk");
        tls.write_all(b"\r\n").await.expect("send a chunk");
        sent += n;
    }
    // The server may have closed by now: it answers once the body passes the limit.
    let _ = tls.write_all(b"0\r\n\r\n").await;
    let _ = tls.flush().await;
    let raw = closed_by_server(&mut tls, "after a chunked body over the limit").await;
    assert_names_the_limit(&parse_http(&raw).expect("an answer"));

    // Just under the limit is read and parsed (and refused for what it says, not its size).
    let holder = "a".repeat(MAX_BODY - 64);
    let a =
        stack.http("POST", "/v1/pools/ci/leases", Some(&token), Some(&serde_json::json!({ "holder": holder }))).await;
    assert!(a.status == 400 && a.json["message"].as_str().is_some_and(|m| m.contains("holder")), "{:?}", a.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_finish_its_headers_is_dropped() {
    let stack = Stack::start(stack_options("http_header_timeout = \"1s\"")).await.expect("stack starts");

    // Part of a request's headers, then nothing.
    let mut slow = stack.http_connect().await;
    slow.write_all(b"GET /v1/pools HTTP/1.1\r\nHost: localhost\r\nAuthor").await.expect("send part of the headers");
    slow.flush().await.expect("flush");
    let got = closed_by_server(&mut slow, "a client that stopped in its headers").await;
    assert!(!got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));

    // A TCP connection that never starts its TLS handshake.
    let mut silent = tokio::net::TcpStream::connect(stack.http).await.expect("connect");
    let got = closed_by_server(&mut silent, "a client that never started TLS").await;
    assert!(got.is_empty(), "{got:?}");

    // A client that sends its request at once is served as usual.
    let a = stack.http("GET", "/v1/nothing", None, None).await;
    assert_eq!((a.status, &a.json["code"]), (404, &serde_json::json!("NOT_FOUND")), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let stack = Stack::start(stack_options("http_max_connections = 2")).await.expect("stack starts");

    // Two keep-alive connections, each served once and left open.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = stack.http_connect().await;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("send");
        c.flush().await.expect("send");
        let a = read_answer(&mut c).await.expect("an answer").expect("an answer");
        assert!(a.json["status"].is_string(), "{a:?}");
        open.push(c);
    }

    // A third: the server does not take it while both are open.
    let (http, ca) = (stack.http, stack.ca.clone());
    let mut third = tokio::spawn(async move {
        mpool_testkit::http::request(http, &ca, "GET", "/healthz", None, None)
            .await
            .map(|a| a.json["status"].is_string())
    });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut third).await;
    assert!(early.is_err(), "a connection beyond the cap was served: {early:?}");
    // The open ones still are.
    open[0].write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("send");
    open[0].flush().await.expect("send");
    let a = read_answer(&mut open[0]).await.expect("an answer").expect("an answer");
    assert!(a.json["status"].is_string(), "{a:?}");
    assert!(!third.is_finished(), "a connection beyond the cap was served");

    // One closes: the third is served.
    drop(open.remove(1));
    let status = tokio::time::timeout(DEADLINE, third).await.expect("served once a place was free");
    assert!(status.expect("the task").expect("an answer"), "the health answer");
}
