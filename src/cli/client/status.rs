//! `mpool status [--json] [--watch [--interval D]]`: the pools and how many of their VMs are in
//! each state, as a table followed by the leases held (or the pools as JSON); with `--watch`,
//! the same picture again every `--interval` until Ctrl-C: redrawn in place on a terminal, as
//! successive snapshots separated by a blank line otherwise.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;

use mpool_api::proto::v1;

use super::print::status_err;
use super::{Client, output};

/// `mpool status` flags.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show it again every --interval until Ctrl-C (redrawn in place on a terminal; otherwise
    /// successive snapshots separated by a blank line).
    #[arg(long)]
    watch: bool,
    /// How often --watch refreshes, e.g. 500ms, 2s, 1m (at least 100ms).
    #[arg(long, default_value = "2s", value_parser = interval, requires = "watch")]
    interval: Duration,
}

/// The shortest `--interval`: each refresh is two API calls.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Parses `--interval`.
fn interval(s: &str) -> Result<Duration, String> {
    let d = mpool_config::parse_duration(s)?;
    if d < MIN_INTERVAL {
        return Err(format!("{s:?} is too short; refresh at most every {}ms", MIN_INTERVAL.as_millis()));
    }
    Ok(d)
}

/// The states with a column of their own; the others add up in OTHER.
const KNOWN: [&str; 5] = ["hot", "warm", "leased", "resetting", "provisioning"];

/// The widest a holder is shown in the leases table (`mpool leases` shows it whole).
const HOLDER_WIDTH: usize = 32;

/// ANSI: cursor home, then clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// Runs `mpool status`.
pub async fn run(client: &mut Client, a: StatusArgs) -> Result<ExitCode, String> {
    let json = a.json;
    show(&a, async || picture(client, json).await).await
}

/// Shows what `picture` makes once, or with `--watch` again every `--interval` until Ctrl-C.
pub async fn show(
    a: &StatusArgs,
    mut picture: impl AsyncFnMut() -> Result<String, String>,
) -> Result<ExitCode, String> {
    if !a.watch {
        output::text(&picture().await?);
        return Ok(ExitCode::SUCCESS);
    }
    let terminal = std::io::stdout().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticks = tokio::time::interval(a.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        let frame = tokio::select! {
            _ = &mut ctrl_c => break,
            frame = async {
                ticks.tick().await;
                picture().await
            } => frame?,
        };
        // One write per frame, so a terminal never shows half of one.
        match (terminal, n) {
            (true, _) => output::text(&format!("{CLEAR}{frame}")),
            (false, 0) => output::text(&frame),
            (false, _) => output::text(&format!("\n{frame}")),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `mpool status` prints: the pools' table and the leases held, or the pools as JSON.
async fn picture(client: &mut Client, json: bool) -> Result<String, String> {
    let pools = client.list_pools(v1::ListPoolsRequest {}).await.map_err(status_err)?.into_inner().pools;
    if json {
        let v: Vec<_> = pools
            .iter()
            .map(|p| {
                serde_json::json!({"name": p.name, "vms": p.vms, "waiters": p.waiters, "leases": p.leases, "daemon_ok": p.daemon_ok, "isolation": p.isolation, "isolation_detail": p.isolation_detail,
                    "ready": p.ready, "coming": p.coming, "host": p.host, "draining": p.draining})
            })
            .collect();
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()));
    }
    let leases = client
        .list_leases(v1::ListLeasesRequest { pool: String::new() })
        .await
        .map_err(status_err)?
        .into_inner()
        .leases;
    let mut out = format!(
        "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}\n",
        "POOL", "HOT", "WARM", "LEASED", "RESETTING", "PROVISIONING", "OTHER", "WAITERS", "MAX"
    );
    for p in &pools {
        out.push_str(&row(p));
        out.push('\n');
    }
    out.push_str(&isolation_line(&pools));
    if let Some(p) = pools.first().filter(|p| p.draining) {
        out.push_str(&format!("host {} is draining (mpool drain): it takes no new leases\n", p.host));
    }
    for p in pools.iter().filter(|p| !p.held_back.is_empty()) {
        out.push_str(&format!("HELD BACK {}: {}\n", p.name, p.held_back));
    }
    if let Some(h) = pools.first().and_then(|p| p.host_capacity.as_ref()) {
        out.push_str(&format!("{}\n", host_line(h)));
    }
    for p in pools.iter().filter(|p| p.image_bytes > 0 || p.disk_used_bytes > 0) {
        let gib = |b: u64| format!("{:.1}G", b as f64 / f64::from(1u32 << 30));
        out.push_str(&format!(
            "DISK {}: {} of VM files on the host's data volume, {} used in its guests (when last measured)\n",
            p.name,
            gib(p.image_bytes),
            gib(p.disk_used_bytes)
        ));
    }
    if !leases.is_empty() {
        let now = SystemTime::now();
        out.push_str(&format!(
            "\n{:<20} {:<16} {:<20} {:<HOLDER_WIDTH$} {:>9}\n",
            "LEASE", "POOL", "VM", "HOLDER", "EXPIRES"
        ));
        for l in &leases {
            out.push_str(&format!(
                "{:<20} {:<16} {:<20} {:<HOLDER_WIDTH$} {:>9}\n",
                l.id,
                l.pool,
                l.vm,
                shown(&l.holder),
                expires_in(l.expires_at.as_ref(), now)
            ));
        }
    }
    Ok(out)
}

/// The host's capacity in one line: `HOST 8 CPUs, 31.3G memory, disk 12.5G free of 100.0G`.
fn host_line(h: &v1::HostCapacity) -> String {
    let gib = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.1}G", b as f64 / f64::from(1u32 << 30)));
    let cpus = h.cpus.map_or("?".to_string(), |c| c.to_string());
    format!(
        "HOST {cpus} CPUs, {} memory, disk {} free of {}",
        gib(h.memory_bytes),
        gib(h.disk_free_bytes),
        gib(h.disk_total_bytes)
    )
}

/// A pool's line of the table.
fn row(p: &v1::PoolInfo) -> String {
    let get = |k: &str| p.vms.get(k).copied().unwrap_or(0);
    let other: u32 = p.vms.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())).map(|(_, v)| v).sum();
    let max = p.config.as_ref().map(|c| c.max_size).unwrap_or(0);
    format!(
        "{:<16} {:>5} {:>5} {:>7} {:>10} {:>13} {:>6} {:>8} {:>7}",
        p.name,
        get("hot"),
        get("warm"),
        get("leased"),
        get("resetting"),
        get("provisioning"),
        other,
        p.waiters,
        max
    )
}

/// The host's isolation as the probe last measured it (the same for every pool), with what it
/// found; a pool that requires isolation refuses leases unless it says "isolated".
fn isolation_line(pools: &[v1::PoolInfo]) -> String {
    let Some(p) = pools.first() else { return String::new() };
    let requiring = pools.iter().any(|p| p.config.as_ref().is_some_and(|c| c.require_isolation));
    let state = if p.isolation.is_empty() { "unknown" } else { p.isolation.as_str() };
    let mark = if state == "isolated" || !requiring { "" } else { " (pools with require_isolation refuse leases)" };
    format!("isolation: {state}{mark}: {}\n", shown_line(&p.isolation_detail))
}

/// Server text on one line, with control characters escaped.
fn shown_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// A holder as the table shows it: control characters escaped (a holder is whatever a caller
/// sent; it must not drive the terminal), cut to [`HOLDER_WIDTH`] characters.
fn shown(holder: &str) -> String {
    let clean = shown_line(holder);
    if clean.chars().count() <= HOLDER_WIDTH {
        return clean;
    }
    let mut cut: String = clean.chars().take(HOLDER_WIDTH - 1).collect();
    cut.push('…');
    cut
}

/// How long until `expires` (`1h02m`, `4m05s`, `12s`), `expired`, or `-` when unknown.
fn expires_in(expires: Option<&mpool_api::proto::Timestamp>, now: SystemTime) -> String {
    let Some(t) = expires.and_then(|t| SystemTime::try_from(*t).ok()) else { return "-".into() };
    let Ok(left) = t.duration_since(now) else { return "expired".into() };
    let s = left.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_checked() {
        assert_eq!(interval("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(interval("2s"), Ok(Duration::from_secs(2)));
        for bad in ["0", "50ms", "1.5s", "soon", ""] {
            assert!(interval(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn holders_cannot_drive_the_terminal() {
        assert_eq!(shown("ci-bot"), "ci-bot");
        assert_eq!(shown("a\x1b[2Jb\n"), "a\\u{1b}[2Jb\\n");
        let long = shown(&"h".repeat(300));
        assert_eq!((long.chars().count(), long.ends_with('…')), (HOLDER_WIDTH, true));
    }

    #[test]
    fn time_left_reads_at_a_glance() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |secs: i64| mpool_api::proto::Timestamp { seconds: 1_000_000 + secs, nanos: 0 };
        assert_eq!(expires_in(Some(&at(12)), now), "12s");
        assert_eq!(expires_in(Some(&at(245)), now), "4m05s");
        assert_eq!(expires_in(Some(&at(3720)), now), "1h02m");
        assert_eq!(expires_in(Some(&at(-1)), now), "expired");
        assert_eq!(expires_in(None, now), "-");
    }
}
