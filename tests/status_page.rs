//! The status page at `/` of `http_listen`, in a real headless browser (Debian's `chromium`)
//! against `mpool serve` + `mpool sim`: over TLS with the stack's bearer token passed as
//! `/#token=`, it shows the pool's bar with the leased VM, the lease's holder (free text
//! containing markup, which must come out as text), the charts' counts from `GET /v1/history`,
//! and the daemon's health; without a token, or with a wrong one, it asks for one. Also the
//! page's headers and the two JSON routes it reads, with their auth and scopes; and a
//! screenshot of the page as a test artefact (`target/status-page.png`).
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::MPOOL;
use mpool_testkit::api::{acquire, release};
use mpool_testkit::{Stack, StackOptions, eventually, pool};

/// What the test needs installed, and how to install it.
const INSTALL: &str = "apt-get install -y chromium";

/// A holder with markup in it: the page must show it as text.
const HOLDER: &str = r#"<img src=x onerror=alert(1)> & "kestra" flow-7"#;
/// The same text as a browser serializes a text node.
const HOLDER_IN_DOM: &str = r#"&lt;img src=x onerror=alert(1)&gt; &amp; "kestra" flow-7"#;

/// The chromium binary: `$CHROMIUM`, else `chromium` or `chromium-browser` on `PATH`. Fails
/// loudly with the install command when there is none.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM").map(PathBuf::from) {
        assert!(p.is_file(), "CHROMIUM={} is not a file: install chromium with `{INSTALL}` as root", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "this test drives a real headless browser, and chromium is not installed: run `{INSTALL}` as root (.ci/run does), or set CHROMIUM to its path"
    );
}

/// The base64 SHA-256 of the HTTP listener's public key (SubjectPublicKeyInfo): chromium
/// trusts exactly that key (`--ignore-certificate-errors-spki-list`), not any certificate.
fn spki_hash(key_pem: &Path) -> String {
    use rcgen::PublicKeyData;
    let pem = std::fs::read_to_string(key_pem).expect("the API's key");
    let spki = rcgen::KeyPair::from_pem(&pem).expect("a key pair").subject_public_key_info();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki);
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// The cargo target directory (integration tests get `<target>/tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/tmp has a parent").to_path_buf()
}

/// Headless chromium against the stack's HTTP listener.
struct Browser {
    exe: PathBuf,
    spki: String,
    port: u16,
    profiles: tempfile::TempDir,
}

impl Browser {
    fn new(stack: &Stack) -> Browser {
        Browser {
            exe: chromium(),
            spki: spki_hash(&stack.path().join("api-key.pem")),
            port: stack.http.port(),
            profiles: tempfile::tempdir().expect("a temp dir"),
        }
    }

    /// `https://localhost:PORT/` plus `fragment`.
    fn url(&self, fragment: &str) -> String {
        format!("https://localhost:{}/{fragment}", self.port)
    }

    /// Loads `url` in a fresh profile, lets the page's script run (virtual time: its fetches
    /// and first timers, no waiting on the wall clock) and returns stdout: with `--dump-dom`
    /// the page's DOM as serialized HTML.
    async fn run(&self, url: &str, what: &[&str]) -> String {
        let profile = tempfile::tempdir_in(self.profiles.path()).expect("a profile dir");
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP localhost 127.0.0.1",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--ignore-certificate-errors-spki-list={}", self.spki))
        .args(what)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("chromium did not finish with {url} in 90 s"))
            .unwrap_or_else(|e| panic!("{}: {e}; install it with `{INSTALL}`", self.exe.display()));
        assert!(
            out.status.success(),
            "chromium {what:?} {url}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Dumps the page's DOM until `ready` holds for it, or panics with the last one after
    /// `limit` (each dump is a whole page load; no sleeping in between).
    async fn dom_until(&self, url: &str, limit: Duration, ready: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let dom = self.run(url, &["--dump-dom"]).await;
            if ready(&dom) {
                return dom;
            }
            assert!(start.elapsed() < limit, "the page never got ready within {limit:?}; its last DOM:\n{dom}");
        }
    }
}

/// How many figures a series of `/v1/history` counted over the hour.
fn total(series: &serde_json::Value) -> u64 {
    series.as_array().expect("a series").iter().map(|p| p["count"].as_u64().expect("a count")).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_pools_leases_and_history_in_a_real_browser() {
    chromium(); // fails first, and loudly, without a browser
    let mut o = StackOptions::tests(MPOOL, pool("ci", 2, 1, 3) + &pool("gpu", 1, 0, 1));
    o.tokens.push(("scoped".into(), "scoped-token".into(), vec!["gpu".into()]));
    let stack = Stack::start(o).await.expect("stack starts");
    stack.wait_idle("ci", 2).await;
    let t = Some(stack.token.as_str());

    // A lease held by a holder with markup in its name, and one acquired and released (reset),
    // both with the stack's token (a token that is not an admin sees its own leases only).
    let mut c = stack.tcp_client(t).await;
    let held = acquire(&mut c, "ci", HOLDER).await.expect("acquire");
    let done = acquire(&mut c, "ci", "short-job").await.expect("acquire");
    release(&mut c, &done.id).await.expect("release");
    let history = eventually("the reset shows in /v1/history", Duration::from_secs(60), || async {
        let a = stack.http("GET", "/v1/history", t, None).await;
        assert_eq!(a.status, 200, "{a:?}");
        let ci = a.json["pools"].as_array()?.iter().find(|p| p["pool"] == "ci")?.clone();
        (total(&ci["reset"]) == 1).then_some(a.json)
    })
    .await;

    // The JSON routes: the last hour per minute, configured pools only, 401 without a token,
    // and only the pools a scoped token may use.
    let names: Vec<&str> = history["pools"].as_array().unwrap().iter().map(|p| p["pool"].as_str().unwrap()).collect();
    assert_eq!(names, ["ci", "gpu"], "{history}");
    let ci = &history["pools"][0];
    assert_eq!(ci["acquire"].as_array().unwrap().len(), 60, "{ci}");
    assert_eq!(total(&ci["acquire"]), 2, "{ci}");
    assert!(ci["acquire"][59]["minute"].as_str().is_some_and(|m| m.ends_with(":00Z")), "{ci}");
    assert!(!history.to_string().contains("short-job") && !history.to_string().contains("kestra"), "aggregates only");
    let a = stack.http("GET", "/v1/history", None, None).await;
    assert_eq!((a.status, a.json["code"].as_str()), (401, Some("UNAUTHENTICATED")), "{a:?}");
    let a = stack.http("GET", "/v1/history", Some("scoped-token"), None).await;
    let names: Vec<&str> = a.json["pools"].as_array().unwrap().iter().map(|p| p["pool"].as_str().unwrap()).collect();
    assert_eq!(names, ["gpu"], "{a:?}");
    let a = stack.http("GET", "/v1/health", t, None).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json["status"], "SERVING", "{a:?}");
    assert_eq!((&a.json["daemon"]["ok"], &a.json["store"]["ok"]), (&true.into(), &true.into()), "{a:?}");
    assert_eq!(stack.http("GET", "/v1/health", None, None).await.status, 401);

    // The page itself needs no token and carries its policy.
    let a = stack.http("GET", "/", None, None).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(a.header("content-security-policy"), Some(mpool_api::status_page::CONTENT_SECURITY_POLICY));
    let a = stack.http("GET", "/assets/status-page.js", None, None).await;
    assert_eq!((a.status, a.header("content-type")), (200, Some("text/javascript; charset=utf-8")), "{a:?}");

    // The browser, with the token in the fragment.
    let browser = Browser::new(&stack);
    let url = browser.url(&format!("#token={}", stack.token));
    let dom = browser
        .dom_until(&url, Duration::from_secs(120), |dom| dom.contains(HOLDER_IN_DOM) && dom.contains("1 reset"))
        .await;
    assert!(!dom.contains("<img src=x"), "the holder became markup:\n{dom}");
    assert!(dom.contains(&format!("<tr data-lease=\"{}\">", held.id)), "the lease's row:\n{dom}");
    assert!(dom.contains(&held.vm), "the lease's VM:\n{dom}");
    assert!(dom.contains(r#"<div class="bar" role="img" data-pool="ci""#), "ci's bar:\n{dom}");
    assert!(
        dom.contains(r#"<span class="seg state-leased" data-state="leased" data-count="1""#),
        "the bar shows one leased VM:\n{dom}"
    );
    assert!(dom.contains(r#"data-pool="gpu""#), "gpu's bar:\n{dom}");
    assert!(dom.contains("Acquire latency, last hour: 2 acquires, max "), "{dom}");
    assert!(dom.contains("Reset duration, last hour: 1 reset, max "), "{dom}");
    assert!(dom.contains("Reset duration, last hour: 0 resets<"), "gpu has none:\n{dom}");
    assert!(dom.contains(r#"<dd class="ok">answers</dd>"#), "the daemon's health:\n{dom}");
    assert!(dom.contains(r#"<dd class="ok">takes writes</dd>"#), "the store's health:\n{dom}");
    // The simulator's VMs share the host's network: the probe's honest verdict is shown.
    assert!(dom.contains(r#"<dt>isolation</dt><dd class="bad">not isolated: a VM reached"#), "isolation:\n{dom}");
    assert!(dom.contains("not known (mpool does not measure them yet)"), "no host figures:\n{dom}");
    assert!(dom.contains(r#"<section id="login" hidden="">"#), "no token form with a good token:\n{dom}");
    assert!(!dom.contains(&stack.token), "the token is not in the page:\n{dom}");

    // The screenshot: an artefact to look at, not committed.
    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    browser.run(&url, &[&format!("--screenshot={}", shot.display()), "--window-size=1280,900"]).await;
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{} is a PNG of the page", shot.display());
    eprintln!("screenshot: {}", shot.display());

    // Without a token the page asks for one; with a wrong one it says it was refused.
    let dom = browser
        .dom_until(&browser.url(""), Duration::from_secs(60), |dom| dom.contains("This mpool asks for an API token."))
        .await;
    assert!(dom.contains(r#"<section id="login">"#), "the token form shows:\n{dom}");
    assert!(!dom.contains(HOLDER_IN_DOM) && !dom.contains("data-pool"), "nothing without a token:\n{dom}");
    let dom = browser
        .dom_until(&browser.url("#token=not-a-token"), Duration::from_secs(60), |dom| {
            dom.contains("mpool refused this token (401).")
        })
        .await;
    assert!(!dom.contains(HOLDER_IN_DOM), "nothing with a wrong token:\n{dom}");
}
