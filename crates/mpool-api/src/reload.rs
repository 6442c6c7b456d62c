//! Live reconfiguration of a running `mpool serve` (SIGHUP or the admin RPC `Reload`): the
//! config file is read and validated again; a file that fails validation is refused with the
//! same file/line/key errors and the running config stays. Applied in place: the pools (added,
//! changed, removed: see `Engine::reconfigure`), the tokens file (every later call is checked
//! against the new tokens) and the TLS certificate and key (every later handshake presents the
//! new certificate; connections already open keep theirs). What cannot change in place is
//! named in the report, and still needs a restart.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use mpool_config::{Config, PoolConfig};
use mpool_engine::Engine;
use mpool_metrics::Metrics;

use crate::auth::Tokens;
use crate::server::Credentials;

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// What changed, in a few words each.
    pub applied: Vec<String>,
    /// Changes in the file that take a restart (the running setting stays).
    pub needs_restart: Vec<String>,
}

/// Re-reads the config of a running `mpool serve` and applies what it can.
pub struct Reloader {
    path: Option<PathBuf>,
    running: Mutex<Config>,
    creds: OnceLock<Credentials>,
    engine: Engine,
    metrics: Metrics,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader for a serve started from `running`, read from `path` (`None`: the config did
    /// not come from a file, so there is nothing to reload).
    pub fn new(path: Option<PathBuf>, running: Config, engine: Engine, metrics: Metrics) -> Reloader {
        Reloader {
            path,
            running: Mutex::new(running),
            creds: OnceLock::new(),
            engine,
            metrics,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// The live credentials the listeners serve with (set once they are bound).
    pub fn set_credentials(&self, creds: Credentials) {
        let _ = self.creds.set(creds);
    }

    /// Reads the file again and applies it; `Err` with the reason when the file is not valid
    /// (nothing is applied then) or there is no file.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let _one = self.busy.lock().await;
        let Some(path) = self.path.clone() else {
            return Err("this mpool serve was not started from a config file; nothing to reload".into());
        };
        // Reading files and parsing certificates blocks: off the async workers.
        let fresh = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| format!("reading the config did not finish: {e}"))?
            .map_err(|e| format!("the config file is not valid, the running config stays:\n{e}"))?;
        let old_pools = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pools.clone();
        // A few small files (tokens, certificate, key), read at a reload only.
        let mut report = self.credentials(&fresh)?;
        if old_pools != fresh.pools {
            self.engine.reconfigure(fresh.pools.clone()).await.map_err(|e| e.to_string())?;
            self.metrics.set_pools(fresh.pools.iter().map(|p| p.name.clone()));
            report.applied.extend(pool_changes(&old_pools, &fresh.pools));
            self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pools = fresh.pools.clone();
        }
        tracing::info!(applied = ?report.applied, needs_restart = ?report.needs_restart, "config reloaded");
        Ok(report)
    }

    /// Applies the credentials of `fresh` and lists what else changed that needs a restart.
    fn credentials(&self, fresh: &Config) -> Result<ReloadReport, String> {
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let creds = self.creds.get().cloned().unwrap_or_default();
        let (old, new) = (&running.api, &fresh.api);
        let mut report = ReloadReport::default();

        // Load everything first, apply after: a bad certificate must not leave new tokens in
        // place beside the old certificate.
        let tokens = match (&creds.tokens, &new.tokens_file) {
            (Some(_), Some(p)) => Some(Tokens::load(p)?),
            _ => None,
        };
        let cert = match (&creds.cert, &new.tls_cert, &new.tls_key) {
            (Some(_), Some(c), Some(k)) => Some((c, crate::credentials::certified_key(c, k)?)),
            _ => None,
        };
        if let (Some(live), Some(tokens)) = (&creds.tokens, tokens) {
            let n = tokens.len();
            live.replace(tokens);
            report.applied.push(format!("tokens: {n} from {}", display(&new.tokens_file)));
        }
        if let (Some(live), Some((c, fresh))) = (&creds.cert, cert) {
            live.replace(fresh);
            report.applied.push(format!("TLS certificate: {}", c.display()));
        }
        let restart = |what: &str, changed: bool, report: &mut ReloadReport| {
            if changed {
                report.needs_restart.push(what.to_string());
            }
        };
        restart(
            "[api] tokens_file turned on or off",
            old.tokens_file.is_some() != new.tokens_file.is_some(),
            &mut report,
        );
        restart("[api] tls_cert turned on or off", old.tls_cert.is_some() != new.tls_cert.is_some(), &mut report);
        restart("[api] client_ca", old.client_ca != new.client_ca, &mut report);
        restart(
            "[api] listen, http_listen, metrics_listen",
            old.listen != new.listen || old.http_listen != new.http_listen || old.metrics_listen != new.metrics_listen,
            &mut report,
        );
        restart("[daemon]", running.daemon != fresh.daemon, &mut report);
        restart("[store]", running.store != fresh.store, &mut report);
        restart("[engine]", running.engine != fresh.engine, &mut report);
        restart("[isolation]", running.isolation != fresh.isolation, &mut report);
        // The running config is what runs: only what was applied changes in it.
        if creds.tokens.is_some() && fresh.api.tokens_file.is_some() {
            running.api.tokens_file = fresh.api.tokens_file.clone();
        }
        if creds.cert.is_some() && fresh.api.tls_cert.is_some() && fresh.api.tls_key.is_some() {
            (running.api.tls_cert, running.api.tls_key) = (fresh.api.tls_cert.clone(), fresh.api.tls_key.clone());
        }
        Ok(report)
    }
}

/// The pools added, changed (resized in place when only sizes changed, else rotating when what
/// shapes a VM changed) and removed, in words.
fn pool_changes(old: &[PoolConfig], new: &[PoolConfig]) -> Vec<String> {
    use mpool_core::pool::resize::{Change, change};
    let mut out = Vec::new();
    for p in new {
        match old.iter().find(|o| o.name == p.name) {
            None => out.push(format!("pool {}: added", p.name)),
            Some(o) if matches!(change(o, p), Change::InPlace(_)) => out.push(format!(
                "pool {}: changed; its VMs are resized in place (idle ones now, leased ones at release)",
                p.name
            )),
            Some(o) if o.generation_key() != p.generation_key() => out
                .push(format!("pool {}: changed; its VMs are rebuilt (idle ones now, leased ones at release)", p.name)),
            Some(o) if o != p => out.push(format!("pool {}: changed", p.name)),
            Some(_) => {}
        }
    }
    for o in old.iter().filter(|o| !new.iter().any(|p| p.name == o.name)) {
        out.push(format!("pool {}: removed; it drains (leases run to their end, idle VMs are deleted)", o.name));
    }
    out
}

fn display(p: &Option<PathBuf>) -> String {
    p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}
