//! Several mpool hosts as one for a client: each host runs its own `mpool serve` (shared
//! nothing), and the client chooses among their endpoints. [`Fleet`] asks every host about the
//! pool (GetPool, answers kept [`VIEW_TTL`]), orders them ([`choice`]) and tries them in that
//! order; the lease it gets is known by a handle that names its host ([`handle`]).
//!
//! Which failures move on to the next host: UNAVAILABLE (the host is down, draining, or its
//! multipassd is), RESOURCE_EXHAUSTED (no VM within the wait), NOT_FOUND (no such pool there)
//! and a host that cannot be reached at all. Anything else (a bad argument, a refused token) is
//! the caller's to fix and is answered at once, as one host would.

pub mod choice;
pub mod handle;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mpool_api::client::{self, Client};
use mpool_api::proto::v1;
use tonic::Code;

use choice::{Attempt, Seen};

/// How long what the hosts said about a pool is used before asking again.
pub const VIEW_TTL: Duration = Duration::from_millis(1500);

/// How long a host gets to accept a connection or answer GetPool before it counts as silent.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// One host's failure while choosing: its endpoint and what went wrong.
#[derive(Clone, Debug)]
pub struct Miss {
    /// The host's endpoint.
    pub endpoint: String,
    /// The status it answered with (UNAVAILABLE when it could not be reached).
    pub code: Code,
    /// What it said.
    pub message: String,
}

/// Why no host gave what was asked.
#[derive(Clone, Debug)]
pub enum Failed {
    /// A host refused the request itself (a bad argument, a token): every host would.
    Refused(Miss),
    /// Every host was tried (or none could serve the pool); what each said.
    Exhausted {
        /// The pool.
        pool: String,
        /// The failures, in the order the hosts were tried.
        misses: Vec<Miss>,
    },
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Refused(m) => write!(f, "{:?}: {} (host {})", m.code, m.message, m.endpoint),
            Failed::Exhausted { pool, misses } if misses.is_empty() => {
                write!(f, "no host can lease from pool {pool:?}: each is draining or has no such pool")
            }
            Failed::Exhausted { pool, misses } => {
                write!(f, "no host leased a VM from pool {pool:?}:")?;
                for m in misses {
                    write!(f, "\n  {}: {:?}: {}", m.endpoint, m.code, m.message)?;
                }
                Ok(())
            }
        }
    }
}

/// Whether a failure moves on to the next host.
fn next_host(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted | Code::NotFound)
}

/// The hosts of a fleet, connected on first use.
pub struct Fleet {
    endpoints: Vec<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
    clients: Vec<Option<Client>>,
    views: HashMap<String, (Instant, Vec<Seen>)>,
    asked: usize,
}

impl Fleet {
    /// The hosts at `endpoints` (each `unix:PATH` or `http(s)://HOST:PORT`), with the same token
    /// and CA for all.
    pub fn new(endpoints: Vec<String>, token: Option<String>, ca: Option<PathBuf>) -> Fleet {
        let clients = endpoints.iter().map(|_| None).collect();
        Fleet { endpoints, token, ca, clients, views: HashMap::new(), asked: 0 }
    }

    /// How many times the hosts were asked about a pool (GetPool of each), cached views aside.
    pub fn asked(&self) -> usize {
        self.asked
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client of host `i`, connecting if need be (within [`ASK_TIMEOUT`]).
    pub async fn client(&mut self, i: usize) -> Result<Client, Miss> {
        let endpoint = self.endpoints.get(i).cloned().unwrap_or_default();
        if let Some(Some(c)) = self.clients.get(i) {
            return Ok(c.clone());
        }
        let connect = client::Connect { endpoint: endpoint.clone(), token: self.token.clone(), ca: self.ca.clone() };
        let c = match tokio::time::timeout(ASK_TIMEOUT, client::connect(&connect)).await {
            Ok(Ok(c)) => c,
            Ok(Err(message)) => return Err(Miss { endpoint, code: Code::Unavailable, message }),
            Err(_) => {
                let message = format!("no connection within {}s", ASK_TIMEOUT.as_secs());
                return Err(Miss { endpoint, code: Code::Unavailable, message });
            }
        };
        if let Some(slot) = self.clients.get_mut(i) {
            *slot = Some(c.clone());
        }
        Ok(c)
    }

    /// What every host says about `pool` (asked at once, each within [`ASK_TIMEOUT`]; kept
    /// for [`VIEW_TTL`]).
    pub async fn seen(&mut self, pool: &str) -> Vec<Seen> {
        if let Some((at, seen)) = self.views.get(pool)
            && at.elapsed() < VIEW_TTL
        {
            return seen.clone();
        }
        self.asked += 1;
        let mut clients = Vec::new();
        for i in 0..self.endpoints.len() {
            clients.push(self.client(i).await.ok());
        }
        let asks = clients.into_iter().map(|c| async move {
            let Some(mut c) = c else { return Seen::Silent };
            let ask = c.get_pool(v1::GetPoolRequest { pool: pool.to_string() });
            match tokio::time::timeout(ASK_TIMEOUT, ask).await {
                Ok(Ok(p)) => {
                    let p = p.into_inner();
                    Seen::Pool { ready: p.ready, coming: p.coming, waiting: p.waiters, draining: p.draining }
                }
                Ok(Err(s)) if matches!(s.code(), Code::NotFound | Code::PermissionDenied) => Seen::NoPool,
                _ => Seen::Silent,
            }
        });
        let seen = futures::future::join_all(asks).await;
        self.views.insert(pool.to_string(), (Instant::now(), seen.clone()));
        seen
    }

    /// Tries the hosts for `pool` in the order [`choice::plan`] gives, calling `call(client,
    /// wait)` on each until one succeeds: `wait` is zero for a host asked while it has a ready
    /// VM, else what is left of the caller's `wait` (`None`: the pool's default). After a host
    /// fails, the hosts are asked again (a fresh view) before the next try, so a host that just
    /// ran out of VMs is not waited on while another has one. Answers the index of the host that
    /// succeeded and what `call` returned.
    pub async fn choose<T, F, Fut>(
        &mut self,
        pool: &str,
        wait: Option<Duration>,
        mut call: F,
    ) -> Result<(usize, T), Failed>
    where
        F: FnMut(Client, Option<Duration>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let spread = rand::random::<u32>() as usize;
        let mut misses = Vec::new();
        // Hosts already asked without waiting, waited on, or found unreachable.
        let (mut asked, mut waited, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        // Once a wait ran out on one host, the others are only asked for a VM they have now.
        let mut wait_spent = false;
        loop {
            let seen = self.seen(pool).await;
            let next = choice::plan(&seen, spread)
                .into_iter()
                .find(|a| !gone.contains(&a.host) && !(if a.wait { &waited } else { &asked }).contains(&a.host));
            let Some(Attempt { host, wait: waits }) = next else { break };
            if waits { &mut waited } else { &mut asked }.push(host);
            let this_wait = match (waits, wait_spent, wait) {
                (false, _, _) | (true, true, _) => Some(Duration::ZERO),
                (true, false, Some(w)) => Some(w.saturating_sub(started.elapsed())),
                (true, false, None) => None,
            };
            let client = match self.client(host).await {
                Ok(c) => c,
                Err(miss) => {
                    gone.push(host);
                    misses.push(miss);
                    continue;
                }
            };
            match call(client, this_wait).await {
                Ok(t) => return Ok((host, t)),
                Err(s) => {
                    let miss =
                        Miss { endpoint: self.endpoints[host].clone(), code: s.code(), message: s.message().into() };
                    self.views.remove(pool);
                    if !next_host(s.code()) {
                        return Err(Failed::Refused(miss));
                    }
                    match s.code() {
                        Code::ResourceExhausted if waits => wait_spent = true,
                        Code::Unavailable | Code::NotFound => gone.push(host),
                        _ => {}
                    }
                    misses.push(miss);
                }
            }
        }
        Err(Failed::Exhausted { pool: pool.to_string(), misses })
    }
}
