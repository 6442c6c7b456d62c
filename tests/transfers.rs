//! Files larger than one message, streamed end to end without staging on the mpool host
//! (issue 10, items 8 and 11), against `mpool serve` + `mpool sim` processes:
//! - `mpool run --put/--get` carries a 64 MiB file in and out of one Run (one request id),
//!   with serve's peak memory well below the file's size;
//! - Download streams from SFTP, checks `[api] max_download` against the file's size before
//!   reading (a 3 GB sparse file is refused at once), refuses a directory with INVALID_ARGUMENT
//!   and leaves no temporary files behind;
//! - a Run whose output is a directory, missing, or too large still reports the exit code, each
//!   output's error beside it;
//! - the HTTP facade answers 413 naming its body limit, and flags outputs too large for a JSON
//!   answer as omitted, with the exit code.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::MPOOL;
use common::tools;
use mpool_api::proto::v1;
use mpool_testkit::api::{acquire, exec};
use mpool_testkit::{Stack, StackOptions, wait};
use serde_json::json;
use tonic::Code;

const POOLS: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nhot = 1\nmax_size = 3\n";

/// A kB figure from `/proc/<pid>/status` (`VmHWM`, `VmRSS`).
fn proc_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().trim_end_matches(" kB").trim().parse().expect("kB")))
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// The staging files the old Download/Run left in the temp dir.
fn staging_entries() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("mpool-transfer-")).count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_file_goes_through_mpool_run_both_ways() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let pid = stack.serve_pid().expect("serve");
    let rss_before = proc_kb(pid, "VmRSS:");
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.bin");
    let size = 64usize << 20;
    let data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&big, &data).expect("write big");
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let back = dir.path().join("back.bin");
    let ep = format!("unix:{}", stack.socket.display());
    let put = format!("{}:in/big.bin", big.display());
    let get = format!("out/copy.bin:{}", back.display());
    let o = tools::run(
        Path::new(MPOOL),
        &[
            "--endpoint",
            &ep,
            "run",
            "--pool",
            "ci",
            "--request-id",
            "big-run-1",
            "--put",
            &put,
            "--get",
            &get,
            "--",
            "sh",
            "-c",
            "mkdir -p out && cp in/big.bin out/copy.bin && stat -c '%s %a' in/big.bin",
        ],
        None,
        &[],
    )
    .await;
    o.expect_code(0, "mpool run with a 64 MiB --put and --get");
    assert_eq!(o.stdout, format!("{size} 640\n"), "the VM got the whole file, mode kept");
    let got = std::fs::read(&back).expect("--get wrote the file");
    assert!(got.len() == size && got == data, "the 64 MiB file came back intact ({} bytes)", got.len());
    assert_eq!(std::fs::metadata(&back).unwrap().permissions().mode() & 0o777, 0o640);
    // Streaming, not staging: serve's peak memory grew by far less than the file (128 MiB moved).
    let peak = proc_kb(pid, "VmHWM:");
    eprintln!("serve RSS before {rss_before} kB, peak {peak} kB");
    assert!(
        peak < rss_before + 48 * 1024,
        "serve's peak RSS {peak} kB vs {rss_before} kB before: the file was buffered"
    );
    assert!(
        !dir.path()
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().file_name().to_string_lossy().starts_with(".mpool-get-") })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_that_cannot_be_read_cancels_the_run_before_its_command() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let ep = format!("unix:{}", stack.socket.display());
    // The simulator's VMs share the host's file system: the command would leave this marker.
    let marker = stack.path().join("ran");
    let script = format!("touch {}", marker.display());
    // /proc/self/mem is a regular file whose read fails (EIO) at offset 0.
    let o = tools::run(
        Path::new(MPOOL),
        &["--endpoint", &ep, "run", "--pool", "ci", "--put", "/proc/self/mem:mem", "--", "sh", "-c", &script],
        None,
        &[],
    )
    .await;
    o.expect_code(2, "a --put whose read fails");
    assert!(o.stderr.contains("--put /proc/self/mem"), "{}", o.stderr);
    // The Run was cancelled and its lease released; only then is its outcome final.
    let c = stack.client().await;
    wait("the cancelled Run's lease is released", std::time::Duration::from_secs(30))
        .until(|| {
            let mut c = c.clone();
            async move {
                let leases = c.list_leases(v1::ListLeasesRequest::default()).await?.into_inner().leases;
                Ok::<_, tonic::Status>(leases.is_empty().then_some(()))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", stack.log()));
    assert!(!marker.exists(), "the command ran with a partial input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_streams_checks_its_limit_first_and_refuses_directories() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.api_toml = "max_download = \"1M\"".into();
    let stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "download").await.expect("acquire");
    let staged = staging_entries();
    let (code, _, err) = exec(
        &mut c,
        &lease.id,
        &["sh", "-c", "truncate -s 3G sparse && head -c 600000 /dev/urandom > small && mkdir -p d/e && echo x > d/e/f"],
    )
    .await
    .expect("exec");
    assert_eq!(code, 0, "{err}");
    let download = |path: &str| {
        let mut c = c.clone();
        let req = v1::DownloadRequest { lease_id: lease.id.clone(), path: path.into(), base: String::new() };
        async move {
            let mut s = c.download(req).await?.into_inner();
            let (mut data, mut first) = (Vec::new(), None);
            while let Some(chunk) = s.message().await? {
                assert_eq!(chunk.offset, data.len() as u64, "chunks in order");
                first.get_or_insert((chunk.size, chunk.mode));
                data.extend_from_slice(&chunk.data);
            }
            Ok::<_, tonic::Status>((data, first))
        }
    };
    let (data, first) = download("small").await.expect("a file under the limit");
    assert_eq!((data.len(), first.map(|f| f.0)), (600000, Some(600000)));
    // 3 GB: refused from its size, before anything is read or staged.
    let e = download("sparse").await.expect_err("above max_download");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_download") && e.message().contains("3221225472"), "{}", e.message());
    for dir in [".", "d"] {
        let e = download(dir).await.expect_err("a directory");
        assert_eq!(e.code(), Code::InvalidArgument, "{dir}: {e:?}");
        assert!(e.message().contains("is a directory"), "{}", e.message());
    }
    assert_eq!(staging_entries(), staged, "no staging files or directories left in the temp dir");
    c.release(v1::ReleaseRequest { lease_id: lease.id }).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reports_its_exit_code_whatever_happens_to_its_outputs() {
    let mut opts = StackOptions::tests(MPOOL, POOLS);
    opts.api_toml = "max_download = \"1M\"".into();
    let stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let staged = staging_entries();
    let req = v1::RunRequest {
        pool: "ci".into(),
        command: Some(v1::Command {
            script: "mkdir -p adir && echo in > adir/f && head -c 2000000 /dev/zero > huge && echo ok > fine && exit 3"
                .into(),
            ..Default::default()
        }),
        outputs: vec!["adir".into(), "missing".into(), "huge".into(), "fine".into()],
        ..Default::default()
    };
    let mut s = c.run(futures::stream::iter([req])).await.expect("run").into_inner();
    let (mut result, mut chunks) = (None, Vec::new());
    while let Some(ev) = s.message().await.expect("events") {
        match ev.event {
            Some(v1::run_event::Event::Result(r)) => result = Some(r),
            Some(v1::run_event::Event::Output(c)) => chunks.push(c),
            _ => {}
        }
    }
    let r = result.expect("a result");
    assert_eq!(r.exit.as_ref().map(|x| x.code), Some(3), "the exit code is there: {r:?}");
    let o = &r.outputs;
    assert_eq!(o.len(), 4);
    assert!(o[0].error.contains("is a directory") && !o[0].missing, "{:?}", o[0]);
    assert!(o[1].missing && o[1].error.is_empty(), "{:?}", o[1]);
    assert!(o[2].omitted && o[2].size == 2_000_000 && o[2].error.contains("max_download"), "{:?}", o[2]);
    assert!(o[3].error.is_empty() && o[3].size == 3, "{:?}", o[3]);
    assert!(chunks.iter().all(|c| c.output == 3), "only the readable output was sent: {chunks:?}");
    assert_eq!(chunks.iter().flat_map(|c| c.data.clone()).collect::<Vec<u8>>(), b"ok\n");
    assert_eq!(staging_entries(), staged, "no staging files or directories left in the temp dir");

    // A request limit below the server's omits the output the same way.
    let req = v1::RunRequest {
        pool: "ci".into(),
        command: Some(v1::Command { script: "head -c 5000 /dev/zero > f".into(), ..Default::default() }),
        outputs: vec!["f".into()],
        max_output_size: 4096,
        ..Default::default()
    };
    let mut s = c.run(futures::stream::iter([req])).await.expect("run").into_inner();
    let mut result = None;
    while let Some(ev) = s.message().await.expect("events") {
        if let Some(v1::run_event::Event::Result(r)) = ev.event {
            result = Some(r);
        }
    }
    let r = result.expect("result");
    assert!(r.outputs[0].omitted && r.outputs[0].error.contains("max_output_size"), "{:?}", r.outputs[0]);
    assert_eq!(r.exit.map(|x| x.code), Some(0));

    // Out-of-order and stray chunks are refused before the command runs.
    let first = v1::RunRequest {
        pool: "ci".into(),
        command: Some(v1::Command { argv: vec!["true".into()], ..Default::default() }),
        inputs: vec![
            v1::InputFile { path: "a".into(), ..Default::default() },
            v1::InputFile { path: "b".into(), ..Default::default() },
        ],
        ..Default::default()
    };
    let chunk =
        |i: u32| v1::RunRequest { chunk: Some(v1::InputChunk { input: i, data: b"x".to_vec() }), ..Default::default() };
    for (case, msgs, hint) in [
        ("b before a", vec![first.clone(), chunk(1), chunk(0)], "after input 1"),
        ("no such input", vec![first.clone(), chunk(2)], "lists 2 inputs"),
        ("a second description", vec![first.clone(), first.clone()], "only the first message"),
    ] {
        let mut s = c.run(futures::stream::iter(msgs)).await.expect("run starts").into_inner();
        let e = loop {
            match s.message().await {
                Ok(Some(ev)) => assert!(!matches!(ev.event, Some(v1::run_event::Event::Result(_))), "{case}: {ev:?}"),
                Ok(None) => panic!("{case}: no error"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{case}: {e:?}");
        assert!(e.message().contains(hint), "{case}: {}", e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_facade_names_its_body_limit_and_omits_outputs_too_large_for_json() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOLS)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let t = Some(stack.token.as_str());
    let too_big = "a".repeat(mpool_api::json::MAX_BODY + 1);
    let a = stack
        .http("POST", "/v1/pools/ci/run", t, Some(&json!({"command": {"argv": ["true"]}, "holder": too_big})))
        .await;
    assert_eq!(a.status, 413, "{:?}", a.status);
    assert!(
        a.json["message"].as_str().is_some_and(|m| m.contains(&mpool_api::json::MAX_BODY.to_string())),
        "{}",
        a.json
    );

    let over = mpool_api::json::MAX_OUTPUTS + 1;
    let body = json!({
        "command": {"script": format!("head -c {over} /dev/zero > big; echo small > small; exit 4")},
        "outputs": ["big", "small"],
    });
    let a = stack.http("POST", "/v1/pools/ci/run", t, Some(&body)).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json["exitCode"], 4);
    let outs = a.json["outputs"].as_array().expect("outputs");
    assert_eq!(
        (outs[0]["omitted"].as_bool(), outs[0]["data"].as_str(), outs[0]["size"].as_str()),
        (Some(true), Some(""), Some(over.to_string().as_str()))
    );
    assert!(outs[0]["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", outs[0]);
    assert_eq!((outs[1]["omitted"].as_bool(), outs[1]["data"].as_str()), (Some(false), Some("c21hbGwK")));
}
