//! `mpool status` over several hosts: every host is asked at once (ListPools), and one table
//! shows a row per host and pool, a total per pool, and the hosts that did not answer (or
//! `--json`: the same as data). It fails only when no host answers.

use std::collections::BTreeMap;
use std::process::ExitCode;

use mpool_api::proto::v1;
use serde_json::json;

use super::print::status_err;
use super::status::{StatusArgs, show};
use crate::fleet::{ASK_TIMEOUT, Fleet};

/// What one host answered: its pools, or why not.
type Answer = Result<Vec<v1::PoolInfo>, String>;

/// Runs `mpool status` over the fleet.
pub async fn status(fleet: &mut Fleet, a: StatusArgs) -> Result<ExitCode, String> {
    let json = a.json;
    show(&a, async || {
        let answers = ask(fleet).await;
        if answers.iter().all(|(_, a)| a.is_err()) {
            return Err(format!("no host answered:\n{}", silent(&answers)));
        }
        Ok(if json { as_json(&answers) } else { table(&answers) })
    })
    .await
}

/// Every host's pools (asked at once, each within [`ASK_TIMEOUT`]), by endpoint.
async fn ask(fleet: &mut Fleet) -> Vec<(String, Answer)> {
    let mut clients = Vec::new();
    for i in 0..fleet.endpoints().len() {
        clients.push(fleet.client(i).await);
    }
    let endpoints = fleet.endpoints().to_vec();
    let asks = clients.into_iter().map(|c| async move {
        let mut c = c.map_err(|m| m.message)?;
        match tokio::time::timeout(ASK_TIMEOUT, c.list_pools(v1::ListPoolsRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner().pools),
            Ok(Err(s)) => Err(status_err(s)),
            Err(_) => Err(format!("no answer within {}s", ASK_TIMEOUT.as_secs())),
        }
    });
    endpoints.into_iter().zip(futures::future::join_all(asks).await).collect()
}

/// The counts of a row: ready, coming, leased, waiting, max.
fn counts(p: &v1::PoolInfo) -> [u32; 5] {
    let leased = p.vms.get("leased").copied().unwrap_or(0);
    [p.ready, p.coming, leased, p.waiters, p.config.as_ref().map_or(0, |c| c.max_size)]
}

/// A line of the table; `note` (e.g. `draining`) at its end.
fn row(host: &str, pool: &str, c: [u32; 5], note: &str) -> String {
    let line = format!("{host:<20} {pool:<16} {:>6} {:>7} {:>7} {:>8} {:>5}", c[0], c[1], c[2], c[3], c[4]);
    if note.is_empty() { format!("{line}\n") } else { format!("{line}  {note}\n") }
}

/// The table: a row per host and pool, then a total per pool, then the silent hosts.
fn table(answers: &[(String, Answer)]) -> String {
    let mut out = format!(
        "{:<20} {:<16} {:>6} {:>7} {:>7} {:>8} {:>5}\n",
        "HOST", "POOL", "READY", "COMING", "LEASED", "WAITERS", "MAX"
    );
    let mut totals: BTreeMap<&str, [u32; 5]> = BTreeMap::new();
    for (_, answer) in answers {
        for p in answer.iter().flatten() {
            let c = counts(p);
            out.push_str(&row(&p.host, &p.name, c, if p.draining { "draining" } else { "" }));
            let t = totals.entry(&p.name).or_default();
            for (t, c) in t.iter_mut().zip(c) {
                *t = t.saturating_add(c);
            }
        }
    }
    for (pool, c) in &totals {
        out.push_str(&row("TOTAL", pool, *c, ""));
    }
    if answers.iter().any(|(_, a)| a.is_err()) {
        out.push_str(&format!("\nnot answering:\n{}", silent(answers)));
    }
    out
}

/// The hosts that did not answer, a line each.
fn silent(answers: &[(String, Answer)]) -> String {
    answers.iter().filter_map(|(e, a)| a.as_ref().err().map(|why| format!("  {e}: {why}\n"))).collect()
}

/// The same as JSON: `{"hosts": [{"endpoint", "host", "pools": [...]} or {"endpoint", "error"}],
/// "totals": [{"pool", "ready", "coming", "leased", "waiters", "max"}]}`.
fn as_json(answers: &[(String, Answer)]) -> String {
    let mut totals: BTreeMap<String, [u32; 5]> = BTreeMap::new();
    let hosts: Vec<_> = answers
        .iter()
        .map(|(endpoint, a)| match a {
            Err(e) => json!({"endpoint": endpoint, "error": e}),
            Ok(pools) => {
                let host = pools.first().map(|p| p.host.clone()).unwrap_or_default();
                let pools: Vec<_> = pools
                    .iter()
                    .map(|p| {
                        let c = counts(p);
                        let t = totals.entry(p.name.clone()).or_default();
                        for (t, c) in t.iter_mut().zip(c) {
                            *t = t.saturating_add(c);
                        }
                        json!({"name": p.name, "ready": c[0], "coming": c[1], "leased": c[2], "waiters": c[3],
                               "max": c[4], "draining": p.draining, "vms": p.vms, "daemon_ok": p.daemon_ok})
                    })
                    .collect();
                json!({"endpoint": endpoint, "host": host, "pools": pools})
            }
        })
        .collect();
    let totals: Vec<_> = totals
        .iter()
        .map(|(pool, c)| json!({"pool": pool, "ready": c[0], "coming": c[1], "leased": c[2], "waiters": c[3], "max": c[4]}))
        .collect();
    format!("{}\n", serde_json::to_string_pretty(&json!({"hosts": hosts, "totals": totals})).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(host: &str, name: &str, ready: u32, leased: u32, draining: bool) -> v1::PoolInfo {
        v1::PoolInfo {
            name: name.into(),
            host: host.into(),
            ready,
            coming: 1,
            draining,
            vms: [("leased".to_string(), leased)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn one_table_rows_per_host_totals_and_silent_hosts() {
        let answers = vec![
            ("unix:/a".to_string(), Ok(vec![pool("mp-1", "ci", 2, 1, false), pool("mp-1", "big", 0, 0, false)])),
            ("unix:/b".to_string(), Ok(vec![pool("mp-2", "ci", 3, 0, true)])),
            ("https://mp-3:7443".to_string(), Err("Unavailable: connection refused".to_string())),
        ];
        let t = table(&answers);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("HOST") && lines[0].contains("READY"), "{t}");
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(words(lines[1]), ["mp-1", "ci", "2", "1", "1", "0", "0"], "{t}");
        assert_eq!(words(lines[3]), ["mp-2", "ci", "3", "1", "0", "0", "0", "draining"], "{t}");
        assert!(lines.iter().any(|l| words(l) == ["TOTAL", "ci", "5", "2", "1", "0", "0"]), "{t}");
        assert!(t.contains("not answering:\n  https://mp-3:7443: Unavailable: connection refused"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&as_json(&answers)).unwrap();
        assert_eq!(j["hosts"][1]["host"], "mp-2");
        assert_eq!(j["hosts"][2]["error"], "Unavailable: connection refused");
        assert_eq!(j["totals"][1]["pool"], "ci");
        assert_eq!(j["totals"][1]["ready"], 5);
    }
}
