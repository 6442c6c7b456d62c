//! Scenario 3, daemon call overhead: one call on mpool's persistent TLS channel to multipassd
//! vs the CLI way, a new process with a new TLS connection per operation
//! (`mpool multipass start vm1`, the shape of `multipass start vm1`).
//!
//! The simulator runs at time scale 0 and the calls do no simulated work (`start` of a running
//! instance, `list`, `ssh-info`, `version`), so both sides measure pure call overhead: for the
//! channel a request and its reply; for the process its start-up, the TLS handshake with a
//! client certificate, the trust and version checks every fresh client makes, the call, exit.
//!
//! One-shot processes, the multipass CLI's shape: `mpool multipass version` and `mpool
//! multipass exec vm1 -- true` beside their per-call costs on open channels (a `version` on the
//! persistent TLS channel, `true` on a pooled SSH connection), and, with
//! `MPOOL_BENCH_BASE_EXE=/path/to/an/older/mpool`, the same processes of that binary (the
//! figures before a change). Where a one-shot `version` spends its time before its first byte
//! on the socket comes from its `MPOOL_STARTUP_TRACE` marks (see `multipass::startup`).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, Summary, summarize};
use crate::cli::output;
use mpool_multipass::{LaunchOptions, Names};
use mpool_testkit::{Stack, StackOptions};

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
    let mut o = StackOptions::bench("");
    o.serve_at_start = false;
    let stack = Stack::start(o).await?;
    let d = stack.daemon_client().await?;
    d.launch(&LaunchOptions { name: "vm1".into(), ..Default::default() }).await.map_err(|e| e.to_string())?;
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
        measure::mp(&ctx.exe, &stack, &args, None).await?; // page cache, first-run costs
        for _ in 0..m {
            process.push(measure::mp(&ctx.exe, &stack, &args, None).await?.wall);
        }
        let (c, p) = (summarize(&channel), summarize(&process));
        let ratio = p.p50_ms / c.p50_ms.max(1e-9);
        output::line(&format!(
            "  {op:<9} channel p50 {:.3} ms ({n}x), process p50 {:.1} ms ({m}x): {ratio:.0}x",
            c.p50_ms, p.p50_ms
        ));
        ops.push(Op { op, channel: c, process: p, ratio_p50: ratio });
    }
    let one_shot = one_shots(ctx, &stack, &d, m).await?;
    stack.stop().await;

    for o in &ops {
        let mut r = Row::new(format!("`{}` on the persistent channel, p50", o.op), o.channel.p50_ms, "ms")
            .vs(format!("`mpool multipass {}` process", o.op), o.process.p50_ms);
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
    for o in &one_shot.ops {
        let figure = format!("one-shot `mpool multipass {}` process, p50", o.op);
        report.row(Row::new(figure.clone(), o.process.p50_ms, "ms").of(
            format!("{} on an open channel", o.channel_what),
            o.channel.p50_ms,
            "x of the open channel",
        ));
        if let Some(base) = &o.base {
            report.row(Row::new(figure, o.process.p50_ms, "ms").vs("the same process of the base binary", base.p50_ms));
        }
    }
    if !one_shot.phases.is_empty() {
        let before_socket =
            one_shot.phases.iter().find(|p| p.phase == "socket-connect").map(|p| p.p50_ms).unwrap_or_default();
        report.row(Row::new("one-shot `version`: spawn to its first syscall on the socket, p50", before_socket, "ms"));
        report.note(format!(
            "Before its first byte on the socket a one-shot `mpool multipass version` spends (median ms since spawn, \
             from MPOOL_STARTUP_TRACE marks): {}",
            one_shot.phases.iter().map(|p| format!("{} {:.2}", p.phase, p.p50_ms)).collect::<Vec<_>>().join(", ")
        ));
    }
    report.detail("one_shot", &one_shot);
    report.detail("ops", &ops);
    report.detail("channel_calls_per_op", n);
    report.detail("processes_per_op", m);
    Ok(report)
}

/// One one-shot process measured beside its open-channel equivalent (and the base binary's).
#[derive(serde::Serialize)]
struct OneShotOp {
    op: &'static str,
    channel_what: &'static str,
    channel: Summary,
    process: Summary,
    base: Option<Summary>,
}

/// Median time since spawn at which a one-shot process reached a startup phase.
#[derive(serde::Serialize)]
struct Phase {
    phase: String,
    p50_ms: f64,
}

#[derive(serde::Serialize)]
struct OneShots {
    ops: Vec<OneShotOp>,
    phases: Vec<Phase>,
    base_exe: Option<String>,
}

/// Runs `exe multipass ARGS` once; returns its wall time and, with the startup trace on, the
/// time since spawn of each mark it printed.
async fn one_shot(
    exe: &Path,
    args: &[&str],
    env: &[(String, String)],
    trace: bool,
) -> Result<(Duration, Vec<(String, f64)>), String> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("multipass")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if trace {
        cmd.env(mpool_multipass::startup::STARTUP_TRACE_ENV, "1");
    }
    let spawned_ns = mpool_multipass::startup::monotonic_ns();
    let t = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .map_err(|_| format!("{} {}: no exit in 120 s", exe.display(), args.join(" ")))?
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let wall = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{} multipass {}: {}: {}",
            exe.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut phases = Vec::new();
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        let mut f = line.split_whitespace();
        if let (Some("mpool-startup"), Some(phase), Some(ns)) = (f.next(), f.next(), f.next())
            && let Ok(ns) = ns.parse::<u128>()
        {
            phases.push((phase.to_string(), ns.saturating_sub(spawned_ns) as f64 / 1e6));
        }
    }
    Ok((wall, phases))
}

/// One-shot `version` and `exec -- true` processes (this binary, and the base binary if
/// `MPOOL_BENCH_BASE_EXE` names one) beside the same work on open channels.
async fn one_shots(ctx: &Ctx, stack: &Stack, d: &mpool_multipass::Client, m: usize) -> Result<OneShots, String> {
    let base = std::env::var_os("MPOOL_BENCH_BASE_EXE").map(std::path::PathBuf::from).filter(|p| p.is_file());
    let env = stack.cli_env();
    let n = m * 5;
    // Open channels: `version` on the persistent TLS channel, `true` on a pooled SSH connection.
    let mut version_channel = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        d.version_text().await.map_err(|e| format!("version: {e}"))?;
        version_channel.push(t.elapsed());
    }
    let info = d.ssh_info("vm1").await.map_err(|e| format!("ssh_info: {e}"))?;
    let conn = mpool_ssh::Connection::connect(&info.clone(), &mpool_ssh::SshOptions::default())
        .await
        .map_err(|e| format!("ssh: {e}"))?;
    let mut exec_channel = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = conn.run(mpool_ssh::ExecRequest::argv(["true"])).await.map_err(|e| format!("exec: {e}"))?;
        if !out.success() {
            return Err("`true` failed".into());
        }
        exec_channel.push(t.elapsed());
    }
    conn.close().await;

    let mut ops = Vec::new();
    let mut phases: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
    for (op, args, channel_what, channel) in [
        ("version", vec!["version"], "`version`", &version_channel),
        ("exec -- true", vec!["exec", "vm1", "--", "true"], "`true` over a pooled SSH connection", &exec_channel),
    ] {
        // Interleave the two binaries so drift on a noisy machine hits both alike.
        let (mut ours, mut theirs) = (Vec::with_capacity(m), Vec::with_capacity(m));
        one_shot(&ctx.exe, &args, &env, false).await?; // page cache, first-run costs
        if let Some(b) = &base {
            one_shot(b, &args, &env, false).await?;
        }
        for _ in 0..m {
            ours.push(one_shot(&ctx.exe, &args, &env, false).await?.0);
            if let Some(b) = &base {
                theirs.push(one_shot(b, &args, &env, false).await?.0);
            }
        }
        if op == "version" {
            for _ in 0..m {
                for (phase, ms) in one_shot(&ctx.exe, &args, &env, true).await?.1 {
                    phases.entry(phase).or_default().push(Duration::from_secs_f64(ms / 1e3));
                }
            }
        }
        let (p, c) = (summarize(&ours), summarize(channel));
        let b = base.as_ref().map(|_| summarize(&theirs));
        match &b {
            Some(b) => output::line(&format!(
                "  one-shot {op:<13} process p50 {:.1} ms (base {:.1} ms), open channel p50 {:.3} ms",
                p.p50_ms, b.p50_ms, c.p50_ms
            )),
            None => output::line(&format!(
                "  one-shot {op:<13} process p50 {:.1} ms, open channel p50 {:.3} ms",
                p.p50_ms, c.p50_ms
            )),
        }
        ops.push(OneShotOp { op, channel_what, channel: c, process: p, base: b });
    }
    let mut phases: Vec<Phase> =
        phases.into_iter().map(|(phase, v)| Phase { phase, p50_ms: summarize(&v).p50_ms }).collect();
    phases.sort_by(|a, b| a.p50_ms.total_cmp(&b.p50_ms));
    Ok(OneShots { ops, phases, base_exe: base.map(|b| b.display().to_string()) })
}
