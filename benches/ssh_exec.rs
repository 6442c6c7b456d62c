//! Exec latency: one pooled SSH connection vs a fresh connection and login per command (what
//! `multipass exec` does), against a local OpenSSH sshd.
//!
//! `cargo bench --bench ssh_exec`; `MPOOL_BENCH_N` sets the number of commands (default 200).

use std::time::{Duration, Instant};

use mpool_ssh::{Connection, ExecRequest, SshOptions};
use mpool_testkit::Sshd;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let median = percentile(&samples, 0.5);
    let p99 = percentile(&samples, 0.99);
    println!("{name:<34} median {:>9.3} ms   p99 {:>9.3} ms", median.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
    median
}

async fn run_true(conn: &Connection) {
    let out = conn.run(ExecRequest::argv(["true"])).await.expect("exec");
    assert!(out.success(), "{out:?}");
}

fn main() {
    let n: usize = std::env::var("MPOOL_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let server = Sshd::start().expect("sshd starts");
        let target = server.target();
        let options = SshOptions::default();

        let conn = Connection::connect(&target, &options).await.expect("connect");
        for _ in 0..5 {
            run_true(&conn).await; // warm-up
        }
        let mut pooled = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            run_true(&conn).await;
            pooled.push(t.elapsed());
        }
        conn.close().await;

        let mut fresh = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let conn = Connection::connect(&target, &options).await.expect("connect");
            run_true(&conn).await;
            conn.close().await;
            fresh.push(t.elapsed());
        }

        println!("`true` x {n} against OpenSSH on 127.0.0.1 (RSA-2048 key)");
        let pooled = summary("pooled connection", pooled);
        let fresh = summary("fresh connection + login each", fresh);
        println!("ratio fresh/pooled (median)        {:.1}x", fresh.as_secs_f64() / pooled.as_secs_f64());
    });
}
