//! Scenario 4, exec: `true` on a lease over mpool's pooled SSH connection vs a fresh
//! connection per command (the `multipass exec` way), against a real OpenSSH sshd and against
//! the simulator's own SSH endpoints.
//!
//! mpool's figure is the whole API path: an `Exec` call on the lease (gRPC over the Unix
//! socket), a channel on the connection the readiness check opened, the command, its exit
//! status streamed back. The baseline is a fresh SSH connection per command (TCP, key
//! exchange, public-key login, the command, close), measured in-process so it pays no process
//! start-up; the literal `mpool multipass exec VM -- true` process (which also makes a TLS
//! connection to the daemon and asks `ssh_info`) is reported beside it. For OpenSSH the
//! simulator's `ssh_info` points at the sshd (`--ssh-target`), so mpool leases "VMs" whose SSH
//! server is the real one.

use std::time::{Duration, Instant};

use super::measure;
use super::{Ctx, Report, Row, Summary, summarize};
use crate::cli::output;
use mpool_ssh::{Connection, ExecRequest, SshOptions};
use mpool_testkit::{Sshd, SshdOptions, Stack, StackOptions, Transport, pool};

#[derive(serde::Serialize)]
struct Target {
    server: &'static str,
    api_exec_on_lease: Summary,
    session_exec_on_lease: Summary,
    attach_first_byte: Summary,
    pooled_connection_raw: Summary,
    keepalive_round_trip: Summary,
    fresh_connection: Summary,
    multipass_exec_process: Summary,
}

async fn measure(ctx: &Ctx, server: &'static str, sshd: Option<&Sshd>) -> Result<Target, String> {
    let (n, m, p) = (ctx.pick(300, 40), ctx.pick(100, 15), ctx.pick(20, 4));
    let mut o = StackOptions::bench(pool("x", 1, 1, 1));
    o.serve_at_start = false;
    if let Some(s) = sshd {
        o = o.ssh_via(&s.target());
    }
    let mut stack = Stack::start(o).await?;
    if let Some(s) = sshd {
        // The key the simulator's ssh_info hands out is authorized on the real sshd.
        s.authorize_sim_key(&stack.sim_state())?;
    }
    stack.start_serve().await?;
    stack.settled("x", 1, Duration::from_secs(120)).await?;
    let mut c = stack.connect(Transport::Unix).await?;
    let (lease, _) = measure::acquire(&mut c, "x", "bench").await?;
    let run_api = |c: &mut crate::cli::client::Client| {
        let mut c = c.clone();
        let id = lease.id.clone();
        async move {
            let r = measure::exec(&mut c, &id, &["true"]).await?;
            if r.code != 0 {
                return Err(format!("`true` exited {}", r.code));
            }
            Ok::<_, String>(r.total)
        }
    };
    for _ in 0..5 {
        run_api(&mut c).await?;
    }
    let mut api = Vec::with_capacity(n);
    for _ in 0..n {
        api.push(run_api(&mut c).await?);
    }

    let (sessions, first_byte) = measure_sessions(&mut c, &lease.id, ctx.pick(100, 15)).await?;

    let info = stack.daemon_client().await?.ssh_info(&lease.vm).await.map_err(|e| e.to_string())?;
    let target = info.clone();
    let opts = SshOptions::default();
    let conn = Connection::connect(&target, &opts).await.map_err(|e| e.to_string())?;
    let mut raw = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let t = Instant::now();
        conn.run(ExecRequest::argv(["true"])).await.map_err(|e| e.to_string())?.check().map_err(|e| e.to_string())?;
        if i >= 5 {
            raw.push(t.elapsed());
        }
    }
    let mut ping = Vec::with_capacity(n);
    for i in 0..n + 5 {
        let t = Instant::now();
        conn.ping(Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
        if i >= 5 {
            ping.push(t.elapsed());
        }
    }
    conn.close().await;

    let mut fresh = Vec::with_capacity(m);
    for i in 0..m + 2 {
        let t = Instant::now();
        let conn = Connection::connect(&target, &opts).await.map_err(|e| e.to_string())?;
        conn.run(ExecRequest::argv(["true"])).await.map_err(|e| e.to_string())?.check().map_err(|e| e.to_string())?;
        conn.close().await;
        if i >= 2 {
            fresh.push(t.elapsed());
        }
    }

    let mut process = Vec::with_capacity(p);
    for i in 0..p + 1 {
        let r = measure::mp(&ctx.exe, &stack, &["exec", &lease.vm, "--", "true"], None).await?;
        if i >= 1 {
            process.push(r.wall);
        }
    }
    measure::release(&mut c, &lease.id).await?;
    stack.stop().await;
    let t = Target {
        server,
        api_exec_on_lease: summarize(&api),
        session_exec_on_lease: summarize(&sessions),
        attach_first_byte: summarize(&first_byte),
        pooled_connection_raw: summarize(&raw),
        keepalive_round_trip: summarize(&ping),
        fresh_connection: summarize(&fresh),
        multipass_exec_process: summarize(&process),
    };
    output::line(&format!(
        "  {server:<10} as a session p50 {:.2} ms | attach, first byte p50 {:.2} ms",
        t.session_exec_on_lease.p50_ms, t.attach_first_byte.p50_ms
    ));
    output::line(&format!(
        "  {server:<10} API exec on lease p50 {:.2} ms | pooled raw {:.2} ms | keepalive {:.3} ms (p99 {:.3}) | fresh connection {:.1} ms | `mpool multipass exec` process {:.1} ms",
        t.api_exec_on_lease.p50_ms,
        t.pooled_connection_raw.p50_ms,
        t.keepalive_round_trip.p50_ms,
        t.keepalive_round_trip.p99_ms,
        t.fresh_connection.p50_ms,
        t.multipass_exec_process.p50_ms
    ));
    Ok(t)
}

/// `true` as a session (started detached in the VM, followed to its exit), `n` times; and the
/// time from an Attach call to the first byte of a session's output, `n` times.
async fn measure_sessions(
    c: &mut crate::cli::client::Client,
    lease: &str,
    n: usize,
) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    use mpool_api::proto::v1;
    let err = |e: tonic::Status| format!("session: {}", e.message());
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let req = v1::ExecRequest {
            lease_id: lease.into(),
            command: Some(v1::Command { argv: vec!["true".into()], ..Default::default() }),
            session: format!("bench-{i}"),
            ..Default::default()
        };
        let t = Instant::now();
        let mut s = c.exec(req).await.map_err(err)?.into_inner();
        let mut code = None;
        while let Some(ev) = s.message().await.map_err(err)? {
            if let Some(v1::exec_event::Event::Exit(x)) = ev.event {
                code = Some(x.code);
            }
        }
        if code != Some(0) {
            return Err(format!("`true` as a session exited {code:?}"));
        }
        if i >= 3 {
            sessions.push(t.elapsed());
        }
    }
    let mut first = Vec::with_capacity(n);
    for i in 0..n + 3 {
        let req = v1::AttachRequest { lease_id: lease.into(), session: "bench-0".into(), ..Default::default() };
        let t = Instant::now();
        let mut s = c.attach(req).await.map_err(err)?.into_inner();
        // `true` wrote nothing: the first byte of an attach is its exit.
        while let Some(ev) = s.message().await.map_err(err)? {
            if matches!(ev.event, Some(v1::exec_event::Event::Exit(_) | v1::exec_event::Event::Stdout(_))) {
                break;
            }
        }
        if i >= 3 {
            first.push(t.elapsed());
        }
    }
    Ok((sessions, first))
}

/// Runs scenario 4.
pub async fn run(ctx: &Ctx) -> Result<Report, String> {
    let mut report = Report::new("exec");
    let mut targets = Vec::new();
    match mpool_testkit::sshd::unavailable() {
        Some(why) => {
            output::line(&format!("  OpenSSH skipped: {why}"));
            report.note(format!("OpenSSH part skipped: {why}"));
        }
        None => {
            let sshd = Sshd::start_with(SshdOptions { log_level: "INFO".into() })?;
            targets.push(measure(ctx, "OpenSSH", Some(&sshd)).await?);
        }
    }
    targets.push(measure(ctx, "simulator", None).await?);
    for t in &targets {
        let ratio = t.fresh_connection.p50_ms / t.api_exec_on_lease.p50_ms.max(1e-9);
        report.row(
            Row::new(
                format!("exec `true` on a lease (API, pooled SSH), {}, p50", t.server),
                t.api_exec_on_lease.p50_ms,
                "ms",
            )
            .vs("fresh SSH connection per command", t.fresh_connection.p50_ms)
            .target(">= 10x", ratio >= 10.0),
        );
        report.row(
            Row::new(
                format!("exec `true` on a lease (API, pooled SSH), {}, p50", t.server),
                t.api_exec_on_lease.p50_ms,
                "ms",
            )
            .vs("`mpool multipass exec` process", t.multipass_exec_process.p50_ms),
        );
        report.row(
            Row::new(
                format!("exec `true` as a detached session (API), {}, p50", t.server),
                t.session_exec_on_lease.p50_ms,
                "ms",
            )
            .vs("a plain exec", t.api_exec_on_lease.p50_ms),
        );
        report.row(Row::new(
            format!("attach to a session, first event, {}, p50", t.server),
            t.attach_first_byte.p50_ms,
            "ms",
        ));
    }
    report.note(
        "A fresh connection pays TCP, a key exchange (curve25519), host-key and RSA-2048 client signatures and, on OpenSSH, \
         a forked and re-executed sshd per connection; the pooled path pays one channel open and the command. Both run \
         the command the same way, so the command's own cost (fork+exec of `true` by the server) is in both.",
    );
    report.detail("targets", &targets);
    Ok(report)
}
