//! Scenario 3, daemon call overhead: one call on mpool's persistent TLS channel to multipassd
//! vs the CLI way, a new process with a new TLS connection per operation
//! (`mpool multipass start vm1`, the shape of `multipass start vm1`).
//!
//! The simulator runs at time scale 0 and the calls do no simulated work (`start` of a running
//! instance, `list`, `ssh-info`, `version`), so both sides measure pure call overhead: for the
//! channel a request and its reply; for the process its start-up, the TLS handshake with a
//! client certificate, the trust and version checks every fresh client makes, the call, exit.

use std::time::Instant;

use super::stack::{self, Stack, StackOptions};
use super::{Ctx, Report, Row, Summary, summarize};
use crate::multipass::{LaunchOptions, Names};

#[derive(serde::Serialize)]
struct Op {
    op: &'static str,
    channel: Summary,
    process: Summary,
    ratio_p50: f64,
}

/// Runs scenario 3.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let n = ctx.pick(2000, 200);
    let m = ctx.pick(40, 8);
    let mut report = Report::new("daemon-calls");
    let mut o = StackOptions::new("");
    o.serve = false;
    let stack = Stack::start(o).await?;
    let d = stack.daemon_client().await?;
    d.launch(&LaunchOptions {
        name: "vm1".into(),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let vm1 = Names::one("vm1");

    let mut ops = Vec::new();
    for op in ["start", "list", "ssh-info", "version"] {
        // The persistent channel (warmed up by the connect and the launch above).
        let mut channel = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r = match op {
                "start" => d.start(&vm1, 0).await.map(|_| ()),
                "list" => d.list().await.map(|_| ()),
                "ssh-info" => d.ssh_info("vm1").await.map(|_| ()),
                _ => d.version_text().await.map(|_| ()),
            };
            r.map_err(|e| format!("{op}: {e}"))?;
            channel.push(t.elapsed());
        }
        // A process per call.
        let args: Vec<&str> = match op {
            "start" => vec!["start", "vm1"],
            "list" => vec!["list"],
            "ssh-info" => vec!["ssh-info", "vm1"],
            _ => vec!["version"],
        };
        let mut process = Vec::with_capacity(m);
        stack::mp(&ctx.exe, &stack, &args, None).await?; // page cache, first-run costs
        for _ in 0..m {
            process.push(stack::mp(&ctx.exe, &stack, &args, None).await?.wall);
        }
        let (c, p) = (summarize(&channel), summarize(&process));
        let ratio = p.p50_ms / c.p50_ms.max(1e-9);
        println!(
            "  {op:<9} channel p50 {:.3} ms ({n}x), process p50 {:.1} ms ({m}x): {ratio:.0}x",
            c.p50_ms, p.p50_ms
        );
        ops.push(Op {
            op,
            channel: c,
            process: p,
            ratio_p50: ratio,
        });
    }
    stack.stop().await;

    for o in &ops {
        let mut r = Row::new(
            format!("`{}` on the persistent channel, p50", o.op),
            o.channel.p50_ms,
            "ms",
        )
        .vs(
            format!("`mpool multipass {}` process", o.op),
            o.process.p50_ms,
        );
        if o.op == "start" {
            r = r.target(">= 20x", o.ratio_p50 >= 20.0);
        }
        report.row(r);
    }
    report.note(
        "A fresh process pays exec and dynamic loading, runtime start-up, reading its certificate, a TLS 1.3 handshake with \
         a client certificate, a trust probe and a version check before its one call; the channel pays one HTTP/2 \
         request over an established TLS session.",
    );
    report.detail("ops", &ops);
    report.detail("channel_calls_per_op", n);
    report.detail("processes_per_op", m);
    Ok(report)
}
