//! The daemon scheduler. multipassd runs stop, suspend, snapshot, restore, clone and delete on its
//! main thread: while one runs, every other call waits, `list` included. So mpool sends its
//! daemon calls through here:
//! - at most one daemon-blocking operation is in flight; the others queue by priority
//!   (acquire path > release > background reset > provisioning > cleanup), FIFO within a priority;
//! - non-blocking calls (start, launch, list, ssh_info) go out at once, so an acquire's resume
//!   waits for at most the one blocking operation already running, never for a queue of them;
//! - operations on one instance never overlap;
//! - while a caller's VM wakes ([`Scheduler::hold`]), no new blocking operation starts: the
//!   resume's clock sync and `ssh_info` take the daemon's lock too, and each would otherwise
//!   wait for another blocking operation started meanwhile.
//!
//! With `priorities` off it is plain FIFO (for measuring what the priorities buy).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Why a daemon call is made; lower runs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// A caller is waiting for this VM right now.
    Acquire = 0,
    /// Resetting a VM that a waiting caller needs.
    Release = 1,
    /// Background resets and parking.
    Reset = 2,
    /// Provisioning, scale-down, rotation, health.
    Provision = 3,
    /// Cleanup (`mpool gc`): purging our deleted instances, deleting stray snapshots.
    Cleanup = 4,
}

/// Daemon operations, by whether they hold multipassd's main thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Holds the daemon for its whole duration.
    Blocking,
    /// Takes the daemon only briefly (start, launch, list, info, ssh_info).
    Quick,
}

struct Waiting {
    priority: Priority,
    seq: u64,
    instance: String,
    op: Op,
    go: oneshot::Sender<Permit>,
}

#[derive(Default)]
struct State {
    queue: Vec<Waiting>,
    blocking_in_flight: bool,
    busy: HashSet<String>,
    seq: u64,
    /// Wakes for waiting callers in progress.
    holds: usize,
}

/// The scheduler; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    state: Arc<Mutex<State>>,
    priorities: bool,
}

/// The right to run one operation; dropping it lets the next one go.
pub struct Permit {
    state: Arc<Mutex<State>>,
    instance: String,
    op: Op,
    priorities: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let released = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            st.busy.remove(&self.instance);
            if self.op == Op::Blocking {
                st.blocking_in_flight = false;
            }
            dispatch(&self.state, &mut st, self.priorities)
        };
        drop(released);
    }
}

/// Keeps new daemon-blocking operations (below acquire priority) from starting while it lives.
pub struct Hold {
    state: Arc<Mutex<State>>,
    priorities: bool,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let released = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            st.holds = st.holds.saturating_sub(1);
            dispatch(&self.state, &mut st, self.priorities)
        };
        drop(released);
    }
}

/// Hands out permits to every waiting operation that may run now. Returns permits whose
/// caller went away, to be dropped after the lock is released.
fn dispatch(shared: &Arc<Mutex<State>>, st: &mut State, priorities: bool) -> Vec<Permit> {
    let mut orphans = Vec::new();
    if priorities {
        st.queue.sort_by_key(|w| (w.priority, w.seq));
    } else {
        st.queue.sort_by_key(|w| w.seq);
    }
    let mut i = 0;
    while i < st.queue.len() {
        let w = &st.queue[i];
        let held = priorities && st.holds > 0 && w.priority != Priority::Acquire;
        let runnable = !st.busy.contains(&w.instance) && (w.op == Op::Quick || (!st.blocking_in_flight && !held));
        if !runnable {
            // Without priorities, a blocked head blocks everything behind it (plain FIFO).
            if !priorities {
                break;
            }
            i += 1;
            continue;
        }
        let w = st.queue.remove(i);
        if w.go.is_closed() {
            continue;
        }
        st.busy.insert(w.instance.clone());
        if w.op == Op::Blocking {
            st.blocking_in_flight = true;
        }
        let permit = Permit { state: shared.clone(), instance: w.instance, op: w.op, priorities };
        if let Err(p) = w.go.send(permit) {
            orphans.push(p);
        }
    }
    orphans
}

impl Scheduler {
    /// A scheduler; `priorities` false makes it FIFO.
    pub fn new(priorities: bool) -> Scheduler {
        Scheduler { state: Arc::new(Mutex::new(State::default())), priorities }
    }

    /// Waits for this operation's turn.
    pub async fn permit(&self, priority: Priority, instance: &str, op: Op) -> Permit {
        let (tx, rx) = oneshot::channel();
        let orphans = {
            let mut st = match self.state.lock() {
                Ok(st) => st,
                Err(poisoned) => poisoned.into_inner(),
            };
            st.seq += 1;
            let seq = st.seq;
            st.queue.push(Waiting { priority, seq, instance: instance.to_string(), op, go: tx });
            dispatch(&self.state, &mut st, self.priorities)
        };
        drop(orphans);
        match rx.await {
            Ok(p) => p,
            // The sender is only dropped after sending; unreachable, but never panic: run now.
            Err(_) => Permit {
                state: self.state.clone(),
                instance: String::new(),
                op: Op::Quick,
                priorities: self.priorities,
            },
        }
    }

    /// Holds back new blocking operations (not the one in flight) until the returned guard is
    /// dropped: for a caller's wake, so its resume and `ssh_info` find the daemon's lock free.
    /// No effect without priorities.
    pub fn hold(&self) -> Hold {
        if self.priorities {
            let mut st = match self.state.lock() {
                Ok(st) => st,
                Err(poisoned) => poisoned.into_inner(),
            };
            st.holds += 1;
        }
        Hold { state: self.state.clone(), priorities: self.priorities }
    }

    /// Runs `fut` when its turn comes.
    pub async fn run<T>(&self, priority: Priority, instance: &str, op: Op, fut: impl Future<Output = T>) -> T {
        let _permit = self.permit(priority, instance, op).await;
        fut.await
    }

    /// Operations waiting for their turn (for status and metrics).
    pub fn queued(&self) -> usize {
        self.state.lock().map(|s| s.queue.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    /// Runs a blocking op that holds until `release` fires, recording its start in `log`.
    fn spawn_op(
        s: &Scheduler,
        log: &Arc<StdMutex<Vec<String>>>,
        name: &str,
        prio: Priority,
        op: Op,
    ) -> (tokio::task::JoinHandle<()>, oneshot::Sender<()>) {
        let (release, hold) = oneshot::channel::<()>();
        let (s, log, name) = (s.clone(), log.clone(), name.to_string());
        let h = tokio::spawn(async move {
            let _p = s.permit(prio, &name, op).await;
            log.lock().unwrap().push(name);
            let _ = hold.await;
        });
        (h, release)
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_blocking_op_at_a_time_highest_priority_next() {
        let s = Scheduler::new(true);
        let log = Arc::new(StdMutex::new(Vec::new()));
        let (a, ra) = spawn_op(&s, &log, "a", Priority::Provision, Op::Blocking);
        settle().await;
        let (b, rb) = spawn_op(&s, &log, "b", Priority::Provision, Op::Blocking);
        let (c, rc) = spawn_op(&s, &log, "c", Priority::Reset, Op::Blocking);
        let (d, rd) = spawn_op(&s, &log, "d", Priority::Acquire, Op::Blocking);
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["a"], "only one blocking op in flight");
        assert_eq!(s.queued(), 3);
        ra.send(()).unwrap();
        a.await.unwrap();
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["a", "d"], "the acquire-path op jumps the queue");
        rd.send(()).unwrap();
        d.await.unwrap();
        settle().await;
        rc.send(()).unwrap();
        c.await.unwrap();
        settle().await;
        rb.send(()).unwrap();
        b.await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["a", "d", "c", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn quick_ops_do_not_wait_for_blocking_ones() {
        let s = Scheduler::new(true);
        let log = Arc::new(StdMutex::new(Vec::new()));
        let (_a, _ra) = spawn_op(&s, &log, "a", Priority::Provision, Op::Blocking);
        let (_b, _rb) = spawn_op(&s, &log, "b", Priority::Provision, Op::Blocking);
        settle().await;
        let (q, rq) = spawn_op(&s, &log, "q", Priority::Acquire, Op::Quick);
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["a", "q"]);
        rq.send(()).unwrap();
        q.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn one_instance_never_has_two_ops_at_once() {
        let s = Scheduler::new(true);
        let log = Arc::new(StdMutex::new(Vec::new()));
        let (a, ra) = spawn_op(&s, &log, "vm", Priority::Provision, Op::Quick);
        settle().await;
        let (b, rb) = spawn_op(&s, &log, "vm", Priority::Acquire, Op::Quick);
        settle().await;
        assert_eq!(log.lock().unwrap().len(), 1, "the second op on vm waits");
        ra.send(()).unwrap();
        a.await.unwrap();
        settle().await;
        assert_eq!(log.lock().unwrap().len(), 2);
        rb.send(()).unwrap();
        b.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn without_priorities_it_is_fifo() {
        let s = Scheduler::new(false);
        let log = Arc::new(StdMutex::new(Vec::new()));
        let (a, ra) = spawn_op(&s, &log, "a", Priority::Provision, Op::Blocking);
        settle().await;
        let (b, rb) = spawn_op(&s, &log, "b", Priority::Provision, Op::Blocking);
        let (d, rd) = spawn_op(&s, &log, "d", Priority::Acquire, Op::Blocking);
        settle().await;
        ra.send(()).unwrap();
        a.await.unwrap();
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["a", "b"], "FIFO: no jumping");
        rb.send(()).unwrap();
        b.await.unwrap();
        rd.send(()).unwrap();
        d.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_keeps_new_blocking_ops_back_but_not_quick_ones() {
        let s = Scheduler::new(true);
        let log = Arc::new(StdMutex::new(Vec::new()));
        let hold = s.hold();
        let (b, rb) = spawn_op(&s, &log, "b", Priority::Reset, Op::Blocking);
        let (q, rq) = spawn_op(&s, &log, "q", Priority::Acquire, Op::Quick);
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["q"], "the blocking op waits for the hold");
        drop(hold);
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["q", "b"]);
        rq.send(()).unwrap();
        rb.send(()).unwrap();
        q.await.unwrap();
        b.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_wait_does_not_leak_the_slot() {
        let s = Scheduler::new(true);
        let log = Arc::new(StdMutex::new(Vec::new()));
        let (a, ra) = spawn_op(&s, &log, "a", Priority::Provision, Op::Blocking);
        settle().await;
        let (b, _rb) = spawn_op(&s, &log, "b", Priority::Provision, Op::Blocking);
        settle().await;
        b.abort();
        settle().await;
        ra.send(()).unwrap();
        a.await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), s.permit(Priority::Provision, "c", Op::Blocking)).await;
        assert!(got.is_ok(), "the slot was handed on");
    }
}
