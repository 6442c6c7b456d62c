//! `/metrics` of `mpool serve`, fetched with a hand-rolled HTTP/1.1 GET and read with a small
//! strict Prometheus text-format parser written here: every sample line parses (`name{labels}
//! value`, float value), every sample belongs to a `# TYPE`d family of a valid type, histogram
//! buckets are cumulative and end at `_count`; the counters move when API calls are made
//! (`mpool_acquires_total`, `mpool_grpc_errors_total` after a NOT_FOUND,
//! `mpool_daemon_call_seconds_count` as the released VM is reset). A whole scrape is also read
//! by the Prometheus project's own parser (Python's `prometheus_client`), with label values
//! bounded whatever callers send; and every metric the Grafana dashboard
//! (`deploy/grafana/mpool.json`) queries is one a real scrape has.
mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{MPOOL, tools};
use mpool_api::proto::v1;
use mpool_testkit::api::acquire;
use mpool_testkit::{Stack, StackOptions, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A GET over a fresh connection: (status, headers lower-cased, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, HashMap<String, String>, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics listener");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers.get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(body)
    } else {
        if let Some(len) = headers.get("content-length") {
            assert_eq!(len.parse::<usize>().ok(), Some(body.len()), "content-length matches the body");
        }
        body.to_string()
    };
    (status, headers, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).expect("hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// One sample: metric name, labels, value.
#[derive(Clone, Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: families' types and the samples.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}")),
    }
}

/// `{a="x",b="y\"z"}` → labels, and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels start with {")?;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let (name, r) = rest.split_once("=\"").ok_or_else(|| format!("label without =\"...\": {rest:?}"))?;
        if !valid_name(name) || name.contains(':') {
            return Err(format!("label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated value of label {name}")),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &r[end + 1..];
    }
}

/// The family a sample belongs to (histogram series carry suffixes).
fn family<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram" || t == "summary")
        {
            return base;
        }
    }
    name
}

/// Parses the Prometheus text format strictly; every problem names its line.
fn parse(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name) {
                        return Err(at(format!("metric name {name:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("type {kind:?}")));
                    }
                    if e.samples.iter().any(|s| family(&s.name, &e.types) == name) {
                        return Err(at("TYPE after samples of its family".into()));
                    }
                    if e.types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at("second TYPE line".into()));
                    }
                }
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                (Some("HELP"), _, _) => return Err(at("HELP without a metric name".into())),
                _ => {} // other comments are allowed
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at(format!("metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| at(format!("timestamp {ts:?}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let fam = family(name, &e.types);
        let kind = e.types.get(fam).ok_or_else(|| at(format!("sample of {fam} before (or without) its # TYPE")))?;
        if kind == "counter" && value < 0.0 {
            return Err(at("negative counter".into()));
        }
        if kind == "histogram" && name.ends_with("_bucket") && !labels.contains_key("le") {
            return Err(at("bucket without le".into()));
        }
        e.samples.push(Sample { name: name.to_string(), labels, value });
    }
    check_histograms(&e)?;
    Ok(e)
}

/// One histogram series' buckets: (le, cumulative count).
type Buckets = Vec<(f64, f64)>;

/// Buckets of every histogram series: `le` ascending, counts never decreasing, `+Inf` present
/// and equal to `_count`.
fn check_histograms(e: &Exposition) -> Result<(), String> {
    for (fam, _) in e.types.iter().filter(|(_, k)| *k == "histogram") {
        let mut series: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
        for s in e.samples.iter().filter(|s| s.name == format!("{fam}_bucket")) {
            let le = parse_value(&s.labels["le"])?;
            let key = s.labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in &series {
            if !buckets.windows(2).all(|w| w[0].0 < w[1].0) {
                return Err(format!("{fam}{key:?}: le not ascending: {buckets:?}"));
            }
            if !buckets.windows(2).all(|w| w[0].1 <= w[1].1) {
                return Err(format!("{fam}{key:?}: bucket counts decrease: {buckets:?}"));
            }
            let Some(&(le, inf)) = buckets.last() else { continue };
            if le != f64::INFINITY {
                return Err(format!("{fam}{key:?}: no +Inf bucket"));
            }
            let labels: BTreeMap<String, String> = key.iter().cloned().collect();
            let count =
                e.samples.iter().find(|s| s.name == format!("{fam}_count") && s.labels == labels).map(|s| s.value);
            if count != Some(inf) {
                return Err(format!("{fam}{key:?}: +Inf bucket {inf} but _count {count:?}"));
            }
            if !e.samples.iter().any(|s| s.name == format!("{fam}_sum") && s.labels == labels) {
                return Err(format!("{fam}{key:?}: no _sum"));
            }
        }
    }
    Ok(())
}

impl Exposition {
    /// Sum of the samples named `name` whose labels include every `want` pair.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v)))
            .map(|s| s.value)
            .sum()
    }
}

async fn scrape(stack: &Stack) -> Exposition {
    let (status, headers, body) = get(stack.metrics, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("content-type").is_some_and(|t| t.starts_with("text/plain")), "{headers:?}");
    parse(&body).unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e}\n{body}"))
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\n\"} 3\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let e = parse(ok).expect("valid");
    assert_eq!(e.samples[0].labels["y"], "q\"\n");
    for bad in [
        "a 1\n",                                                                                   // no TYPE
        "# TYPE a counter\na one\n",                                                               // not a float
        "# TYPE a counter\na{x=1} 1\n",                                                            // unquoted label
        "# TYPE a counter\na -1\n",                                                                // negative counter
        "# TYPE a countr\na 1\n",                                                                  // bad type
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", // decreasing
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n", // +Inf != count
        "# TYPE 9a gauge\n9a 1\n",                                                                 // bad name
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_counters_move_with_calls() {
    let stack =
        Stack::start(StackOptions::tests(MPOOL, "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 2\n"))
            .await
            .expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let (status, _, body) = get(stack.metrics, "/nothing").await;
    assert_eq!((status, body.as_str()), (404, "try /metrics\n"));

    let before = scrape(&stack).await;
    // Every series names its host (`[api] host_name`, by default the machine's hostname), so one
    // Prometheus scraping several hosts tells them apart.
    let host = mpool_config::machine_host_name();
    for s in &before.samples {
        assert_eq!(s.labels.get("host"), Some(&host), "{} {:?} has the host label", s.name, s.labels);
    }
    // Families with a series from the start (a configured pool's counters and histograms start
    // at zero); a family whose series all come later (API errors) has no lines until then.
    for (name, kind) in [
        ("mpool_acquires_total", "counter"),
        ("mpool_reset_seconds", "histogram"),
        ("mpool_store_write_failures_total", "counter"),
        ("mpool_daemon_call_seconds", "histogram"),
        ("mpool_acquire_seconds", "histogram"),
        ("mpool_vms", "gauge"),
        ("mpool_leases", "gauge"),
        ("mpool_daemon_up", "gauge"),
        ("mpool_store_up", "gauge"),
        ("mpool_network_isolated", "gauge"),
    ] {
        assert_eq!(before.types.get(name).map(String::as_str), Some(kind), "# TYPE {name} {kind}");
    }
    assert_eq!(before.sum("mpool_daemon_up", &[]), 1.0);
    assert_eq!(before.sum("mpool_store_up", &[]), 1.0);
    assert!(before.sum("mpool_daemon_call_seconds_count", &[]) > 0.0, "warming the pool called multipassd");
    assert_eq!(before.sum("mpool_leases", &[("pool", "ci")]), 0.0);
    assert_eq!(before.sum("mpool_acquires_total", &[("pool", "ci"), ("outcome", "hot")]), 0.0);
    assert!(
        before
            .samples
            .iter()
            .any(|s| s.name == "mpool_acquires_total" && s.labels.get("outcome").is_some_and(|o| o == "hot")),
        "the counter of hot acquires of ci is there at zero before the first acquire"
    );

    // An acquire, a NOT_FOUND, and a release (whose reset calls multipassd).
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "metrics").await.expect("acquire");
    let err =
        c.acquire(v1::AcquireRequest { pool: "nope".into(), ..Default::default() }).await.expect_err("unknown pool");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let during = scrape(&stack).await;
    assert_eq!(
        during.sum("mpool_acquires_total", &[("pool", "ci")]),
        before.sum("mpool_acquires_total", &[("pool", "ci")]) + 1.0
    );
    let idle_served = ["hot", "warm"]
        .iter()
        .map(|o| during.sum("mpool_acquires_total", &[("pool", "ci"), ("outcome", o)]))
        .sum::<f64>();
    assert_eq!(idle_served, 1.0, "an idle VM served it");
    // An unknown pool is not a label value of its own (callers could add series at will).
    assert_eq!(during.sum("mpool_acquires_total", &[("pool", "unknown"), ("outcome", "error")]), 1.0);
    assert_eq!(during.sum("mpool_acquires_total", &[("pool", "nope")]), 0.0);
    assert_eq!(during.types.get("mpool_grpc_errors_total").map(String::as_str), Some("counter"));
    let not_found = [("method", "Acquire"), ("code", "NotFound")];
    assert_eq!(
        during.sum("mpool_grpc_errors_total", &not_found),
        before.sum("mpool_grpc_errors_total", &not_found) + 1.0
    );
    assert_eq!(during.sum("mpool_acquire_seconds_count", &[("pool", "ci")]), 1.0);
    assert_eq!(during.sum("mpool_leases", &[("pool", "ci")]), 1.0);
    assert_eq!(during.sum("mpool_vms", &[("pool", "ci"), ("state", "leased")]), 1.0);

    let calls = during.sum("mpool_daemon_call_seconds_count", &[]);
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.expect("release");
    // The reset runs in the background: poll the scrape until its daemon calls show.
    wait("a daemon call is counted after the release", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| async {
            let now = scrape(&stack).await;
            now.sum("mpool_daemon_call_seconds_count", &[]) > calls && now.sum("mpool_leases", &[("pool", "ci")]) == 0.0
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));

    // A call refused on TCP is counted with its code too.
    let mut anonymous = stack.tcp_client(None).await;
    let e = anonymous.list_pools(v1::ListPoolsRequest {}).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let after = scrape(&stack).await;
    assert_eq!(after.sum("mpool_grpc_errors_total", &[("method", "ListPools"), ("code", "Unauthenticated")]), 1.0);
}

/// Reads `text` with the Prometheus project's own parser (Python's `prometheus_client`, run
/// by `python`), into the same shape as [`parse`]'s: families' types (by the parser's family
/// names: a counter's without `_total`) and every sample. Panics if the parser refuses it.
async fn reference_parse(python: &str, text: &str) -> Exposition {
    const SCRIPT: &str = "\
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({'name': f.name, 'type': f.type, 'samples': [
        {'name': s.name, 'labels': s.labels, 'value': repr(float(s.value))} for s in f.samples]})
print(json.dumps(out))
";
    let o = tools::run(Path::new(python), &["-c", SCRIPT], Some(text.as_bytes()), &[]).await;
    o.expect_code(0, "prometheus_client's parser reads /metrics");
    let families: Vec<serde_json::Value> = serde_json::from_str(&o.stdout).expect("the script prints JSON");
    let mut e = Exposition::default();
    for f in families {
        let (name, kind) = (f["name"].as_str().expect("name"), f["type"].as_str().expect("type"));
        e.types.insert(name.to_string(), kind.to_string());
        for s in f["samples"].as_array().expect("samples") {
            e.samples.push(Sample {
                name: s["name"].as_str().expect("sample name").to_string(),
                labels: serde_json::from_value(s["labels"].clone()).expect("labels"),
                value: s["value"].as_str().and_then(|v| v.parse().ok()).expect("value"),
            });
        }
    }
    e
}

/// Each sample as `name{labels} value`, sorted: what two parsers must agree on.
fn sample_lines(e: &Exposition) -> Vec<String> {
    let mut v: Vec<String> = e.samples.iter().map(|s| format!("{}{:?} {}", s.name, s.labels, s.value)).collect();
    v.sort();
    v
}

/// The methods the API serves, as `method` label values: mpool.v1.Pool's from the proto, then
/// health and reflection.
fn served_methods() -> Vec<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(mpool_api::proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let mut v: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .filter(|s| s.name() == "Pool")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
        .collect();
    assert!(v.iter().any(|m| m == "Acquire"), "{v:?}");
    v.extend(["Check", "Watch", "ServerReflectionInfo"].map(String::from));
    v
}

/// The whole `/metrics` of a real `mpool serve` after leases taken and released through the CLI,
/// API errors, a thousand made-up method names and unknown pools, read by the Prometheus
/// project's own parser: it reads every line (the same samples as the strict parser above),
/// the histograms hold, and every label value is from its bounded set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_parser_reads_a_real_scrape_and_labels_stay_bounded() {
    let Some(python) = tools::python_prometheus() else { return };
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let endpoint = format!("unix:{}", stack.socket.display());
    let cli = |args: &[&str]| {
        let mut v = vec!["--endpoint", endpoint.as_str()];
        v.extend_from_slice(args);
        let v: Vec<String> = v.into_iter().map(String::from).collect();
        async move {
            let args: Vec<&str> = v.iter().map(String::as_str).collect();
            tools::run(Path::new(MPOOL), &args, None, &[]).await
        }
    };
    for round in 0..2 {
        let a = cli(&["acquire", "--pool", "ci", "--holder", "metrics-cli"]).await;
        let lease = a.expect_code(0, "acquire").stdout.trim().to_string();
        cli(&["exec", &lease, "--", "true"]).await.expect_code(0, "exec");
        cli(&["release", &lease]).await.expect_code(0, "release");
        wait(format!("reset {round} is counted"), Duration::from_secs(60))
            .every(Duration::from_millis(50))
            .until(|| async {
                let now = scrape(&stack).await;
                (now.sum("mpool_reset_seconds_count", &[("pool", "ci")]) > f64::from(round)).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    }
    cli(&["acquire", "--pool", "nope"]).await.expect_code(2, "an unknown pool");

    let mut grpc = stack.raw_channel().await;
    const MADE_UP: usize = 1000;
    let alphabet: Vec<char> = ('a'..='z').chain('A'..='Z').chain('0'..='9').chain(['-', '_', '.', '~']).collect();
    for i in 0..MADE_UP {
        let name: String =
            (0..1 + rand::random_range(0..24)).map(|_| alphabet[rand::random_range(0..alphabet.len())]).collect();
        let service = if i % 2 == 0 { "mpool.v1.Pool".to_string() } else { format!("x{i}.Svc") };
        let path: tonic::codegen::http::uri::PathAndQuery = format!("/{service}/{name}").parse().expect("path");
        grpc.ready().await.expect("ready");
        let codec = tonic_prost::ProstCodec::<v1::ListPoolsRequest, v1::ListPoolsResponse>::default();
        let e =
            grpc.unary(tonic::Request::new(v1::ListPoolsRequest {}), path, codec).await.expect_err("made-up method");
        assert_eq!(e.code(), tonic::Code::Unimplemented, "{service}/{name}");
    }
    let mut c = stack.client().await;
    for i in 0..50 {
        let e = acquire(&mut c, &format!("no-such-pool-{i}-{:x}", rand::random::<u32>()), "x").await.expect_err("pool");
        assert_eq!(e.code(), tonic::Code::NotFound);
    }

    let (status, _, text) = get(stack.metrics, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let strict = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let reference = reference_parse(&python, &text).await;
    assert_eq!(sample_lines(&reference), sample_lines(&strict), "both parsers read the same samples");
    assert_eq!(
        reference.samples.len(),
        text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count(),
        "every sample line was read"
    );
    check_histograms(&reference).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mut families: Vec<(&str, &str)> = reference.types.iter().map(|(n, k)| (n.as_str(), k.as_str())).collect();
    families.sort();
    assert_eq!(
        families,
        [
            ("mpool_acquire_seconds", "histogram"),
            ("mpool_acquires", "counter"),
            ("mpool_daemon_call_seconds", "histogram"),
            ("mpool_daemon_queue", "gauge"),
            ("mpool_daemon_up", "gauge"),
            ("mpool_grpc_errors", "counter"),
            ("mpool_host_cpus", "gauge"),
            ("mpool_host_disk_free_bytes", "gauge"),
            ("mpool_host_disk_total_bytes", "gauge"),
            ("mpool_host_memory_bytes", "gauge"),
            ("mpool_leases", "gauge"),
            ("mpool_network_isolated", "gauge"),
            ("mpool_pool_disk_used_bytes", "gauge"),
            ("mpool_pool_held_back", "gauge"),
            ("mpool_pool_image_bytes", "gauge"),
            ("mpool_reset_seconds", "histogram"),
            ("mpool_store_up", "gauge"),
            ("mpool_store_write_failures", "counter"),
            ("mpool_vms", "gauge"),
            ("mpool_waiters", "gauge"),
        ],
        "the families (a counter's name without _total, as the parser reports it)"
    );

    // Bounded label sets: every value from its known set, whatever callers sent.
    let methods = served_methods();
    // Every gRPC code as tonic names it (an independent list from the one metrics keeps).
    let codes: Vec<String> = (0..17).map(|n| format!("{:?}", tonic::Code::from_i32(n))).collect();
    for s in &reference.samples {
        for (label, value) in &s.labels {
            let known = match label.as_str() {
                "host" => *value == mpool_config::machine_host_name(),
                "pool" => ["ci", "unknown"].contains(&value.as_str()),
                "method" => value == "unknown" || methods.contains(value),
                "code" => codes.contains(value),
                "outcome" => ["hot", "warm", "cold", "repeat", "error"].contains(&value.as_str()),
                "state" => value.chars().all(|c| c.is_ascii_lowercase()) && value.len() <= 16,
                "op" => value.chars().all(|c| c.is_ascii_lowercase() || c == '_') && value.len() <= 16,
                "le" => true,
                _ => false,
            };
            assert!(known, "{}: label {label}={value:?} is not from its bounded set", s.name);
        }
    }
    let unknown = [("method", "unknown"), ("code", "Unimplemented")];
    assert_eq!(reference.sum("mpool_grpc_errors_total", &unknown), MADE_UP as f64);
    assert_eq!(reference.sum("mpool_acquires_total", &[("pool", "unknown"), ("outcome", "error")]), 51.0);
    assert_eq!(reference.sum("mpool_acquires_total", &[("pool", "ci")]), 2.0);
    let error_series = reference.samples.iter().filter(|s| s.name == "mpool_grpc_errors_total").count();
    assert_eq!(error_series, 2, "one series for the made-up methods, one for Acquire/NotFound:\n{text}");
}

const POOL: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 2\n";

/// The metric names a PromQL expression uses: its identifiers less functions (followed by
/// `(`), aggregation operators and keywords, grouping label lists (`by (...)`, `on (...)`),
/// label matchers (`{...}`), ranges (`[...]`), strings, numbers and Grafana variables (`$x`).
fn metric_names(expr: &str) -> Vec<String> {
    const NOT_METRICS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
        "limit_ratio",
        "inf",
        "nan",
    ];
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let c: Vec<char> = expr.chars().collect();
    // The index just past the `close` that matches the opener at `i`, skipping strings.
    let past = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < c.len() {
            match c[i] {
                q @ ('"' | '\'' | '`') => {
                    i += 1;
                    while i < c.len() && c[i] != q {
                        i += if c[i] == '\\' && q != '`' { 2 } else { 1 };
                    }
                }
                x if x == open => depth += 1,
                x if x == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    let ident = |x: char| x.is_ascii_alphanumeric() || x == '_' || x == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => i = past(i, '\0', c[i]).max(i + 1),
            '{' => i = past(i, '{', '}'),
            '[' => i = past(i, '[', ']'),
            '$' if c.get(i + 1) == Some(&'{') => i = past(i + 1, '{', '}'),
            '$' => {
                i += 1;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
            }
            x if x.is_ascii_digit() || x == '.' => {
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                    i += 1;
                }
            }
            x if x.is_ascii_alphabetic() || x == '_' || x == ':' => {
                let start = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut next = i;
                while next < c.len() && c[next].is_whitespace() {
                    next += 1;
                }
                let call = c.get(next) == Some(&'(');
                if GROUPING.contains(&word.as_str()) && call {
                    i = past(next, '(', ')');
                } else if !call && !NOT_METRICS.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    for (expr, want) in [
        (
            "histogram_quantile(0.9, sum by (le, pool) (rate(mpool_acquire_seconds_bucket{pool=~\"$pool\"}[$__rate_interval])))",
            vec!["mpool_acquire_seconds_bucket"],
        ),
        (
            "sum by (pool) (rate(a_sum{x=\"}{\\\"by(\"}[5m])) / sum by (pool) (rate(a_count[${__rate_interval}]))",
            vec!["a_sum", "a_count"],
        ),
        ("sum(x) without (op) + on (pool) group_left (state) y offset 5m > bool 1e3", vec!["x", "y"]),
        ("max(up) or vector(0)", vec!["up"]),
        ("label_values(mpool_leases, pool)", vec!["mpool_leases", "pool"]),
    ] {
        assert_eq!(metric_names(expr), want, "{expr}");
    }
}

/// Every query of every panel and variable: (where, PromQL).
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            if p["type"] == "row" {
                panels(&p["panels"], out);
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title} uses the datasource variable");
            let targets = p["targets"].as_array().filter(|t| !t.is_empty());
            for t in targets.unwrap_or_else(|| panic!("panel {title} has no query")) {
                let expr = t["expr"].as_str().filter(|e| !e.trim().is_empty());
                out.push((format!("panel {title}"), expr.unwrap_or_else(|| panic!("{title}: {t}")).to_string()));
            }
        }
    }
    let mut out = Vec::new();
    panels(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().expect("templating.list") {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str()).expect("a variable's query");
            // label_values(SELECTOR, LABEL): only the selector names a metric.
            let selector = q.strip_prefix("label_values(").and_then(|r| r.rsplit_once(',')).map(|(s, _)| s);
            out.push((format!("variable {}", v["name"]), selector.unwrap_or(q).to_string()));
        }
    }
    out
}

/// `deploy/grafana/mpool.json` is a dashboard Grafana imports (schema ~39, a Prometheus
/// `datasource` variable, a `host` variable every query keeps to, and a `pool` variable), and every metric its queries name (the
/// family, once `_bucket`/`_sum`/`_count` are taken off a histogram's series) is one a real
/// `mpool serve` exports, with samples, after leases and a failing daemon call; and each
/// exported family is on the dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/mpool.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let d: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| (36..=41).contains(&v)),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    let var = |name: &str| {
        d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        (var("datasource")["type"].as_str(), var("datasource")["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    assert_eq!(var("pool")["type"], "query");
    assert_eq!(var("pool")["datasource"]["uid"], "${datasource}");
    // A host selector (every series has a `host` label): every query keeps to the chosen hosts.
    assert_eq!((var("host")["type"].as_str(), var("host")["includeAll"].as_bool()), (Some("query"), Some(true)));
    let queries = dashboard_queries(&d);
    for (at, expr) in &queries {
        if at != "variable \"host\"" {
            for name in metric_names(expr) {
                assert!(expr.contains(&format!("{name}{{host=~\"$host\"")), "{at}: {name} keeps to $host in {expr}");
            }
        }
    }

    // A real scrape in which every family has samples: a lease taken and released (acquire and
    // reset histograms), an API error, and a pool whose image multipassd does not have (failed
    // launches).
    let pools = format!(
        "{POOL}[[pools]]\nname = \"broken\"\nimage = \"file:///nonexistent/mpool-broken.img\"\nmin_ready = 1\nmax_size = 1\n"
    );
    let stack = Stack::start(StackOptions::tests(MPOOL, pools)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "dashboard").await.expect("acquire");
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.expect("release");
    acquire(&mut c, "nope", "dashboard").await.expect_err("an unknown pool");
    let e = wait("a reset and a failed launch are counted", Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .until(|| async {
            let now = scrape(&stack).await;
            (now.sum("mpool_reset_seconds_count", &[("pool", "ci")]) >= 1.0
                && now.sum("mpool_daemon_call_errors_total", &[("op", "launch")]) >= 1.0)
                .then_some(now)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));

    let mut used = std::collections::BTreeSet::new();
    for (at, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{at}: {expr} names no metric");
        for n in names {
            let fam = family(&n, &e.types);
            let kind = e.types.get(fam).unwrap_or_else(|| {
                panic!("{at}: {n} in {expr} is no metric /metrics exports; it exports {:?}", e.types)
            });
            assert!(e.samples.iter().any(|s| s.name == n), "{at}: {n} ({kind}) has no samples in a real scrape");
            if expr.contains("histogram_quantile") {
                assert!(kind == "histogram" && n.ends_with("_bucket"), "{at}: histogram_quantile over {n}: {expr}");
            }
            used.insert(fam.to_string());
        }
    }
    let missing: Vec<&String> = e.types.keys().filter(|f| !used.contains(*f)).collect();
    assert!(missing.is_empty(), "exported but on no panel of the dashboard: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_facts_reach_get_pool_status_and_metrics() {
    let pools = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 0\nmax_size = 2\n";
    let stack = Stack::start(StackOptions::tests(MPOOL, pools)).await.expect("stack starts");
    // The stack points `[host] data_dir` at the simulator's state, its "multipassd data dir".
    let data_dir = stack.sim_state();
    let c = stack.client().await;
    let host = wait("the host is sampled", Duration::from_secs(30))
        .until(|| async {
            c.clone().get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.ok()?.into_inner().host_capacity
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    // The simulator reports this machine's CPUs and memory, and (as multipassd) the total size
    // of the volume holding its data; the free space comes from statvfs of `[host] data_dir`.
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap();
    assert_eq!(host.cpus, Some(cpus), "{host:?}");
    assert!(host.memory_bytes.is_some_and(|m| m > 0), "{host:?}");
    let (total, free) = (host.disk_total_bytes.expect("total"), host.disk_free_bytes.expect("free"));
    assert!(free > 0 && free <= total, "{host:?}");
    assert_eq!(host.disk_free_source, format!("statvfs {}", data_dir.display()));

    let e = scrape(&stack).await;
    assert_eq!(e.sum("mpool_host_cpus", &[]), f64::from(cpus));
    assert_eq!(e.sum("mpool_host_disk_total_bytes", &[]), total as f64);
    assert!(e.sum("mpool_host_disk_free_bytes", &[]) > 0.0, "mpool_host_disk_free_bytes is exported");

    let ep = format!("unix:{}", stack.socket.display());
    let o = tools::run(Path::new(MPOOL), &["status", "--endpoint", &ep], None, &[]).await;
    o.expect_code(0, "mpool status");
    assert!(o.stdout.contains(&format!("HOST {cpus} CPUs")), "{}", o.stdout);

    // A released VM's disk usage is measured (df in the guest) and reported per VM and pool.
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "disk").await.expect("acquire");
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.expect("release");
    let used = wait("the VM's disk usage is measured", Duration::from_secs(30))
        .until(|| async {
            let vms = c.clone().list_vms(v1::ListVmsRequest::default()).await.ok()?.into_inner().vms;
            vms.into_iter().find(|v| v.name == lease.vm).and_then(|v| v.disk_used_bytes)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    assert!(used > 0);
    let p = c.get_pool(v1::GetPoolRequest { pool: "ci".into() }).await.unwrap().into_inner();
    assert_eq!(p.disk_used_bytes, used);
    assert_eq!(scrape(&stack).await.sum("mpool_pool_disk_used_bytes", &[("pool", "ci")]), used as f64);
    stack.stop().await;
}
