//! The task behind an [`super::ExecHandle`]: forwards channel output as events with
//! back-pressure, enforces the timeout and cancellation, and kills the remote process group
//! (see the [`super::exec`] module docs for the mechanism).

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::Instant;

use super::connection::{Connection, TaskGuard};
use super::error::SshError;
use super::exec::{ExecEvent, Stdin};

/// Why streaming stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    TimedOut,
}

/// Everything the streaming task owns.
pub(super) struct ExecTask {
    pub(super) conn: Connection,
    pub(super) read: ChannelReadHalf,
    pub(super) write: ChannelWriteHalf<Msg>,
    pub(super) early: VecDeque<ChannelMsg>,
    pub(super) tx: mpsc::Sender<ExecEvent>,
    pub(super) cancel: watch::Receiver<bool>,
    pub(super) deadline: Option<Instant>,
    pub(super) started: Instant,
    pub(super) marker: PidMarker,
    pub(super) code: Option<u32>,
    pub(super) signal: Option<String>,
    /// Stops the task when the connection closes.
    pub(super) guard: TaskGuard,
    /// The channel slot, released when the task ends.
    pub(super) _permit: OwnedSemaphorePermit,
}

impl ExecTask {
    /// Streams until the end, then sends the `Exit` event.
    pub(super) async fn run(mut self, stdin: Stdin) {
        let stop = self.stream(stdin).await;
        let leftover = match stop {
            None => self.marker.finish(),
            Some(stop) => {
                self.kill().await;
                tracing::debug!(addr = self.conn.addr(), ?stop, "remote command stopped");
                Bytes::new()
            }
        };
        // The channel is done: free its slot (and let `Connection::close` proceed) before
        // waiting for the consumer to take the last events.
        let ExecTask { tx, code, signal, started, guard, _permit, .. } = self;
        drop((guard, _permit));
        let exit = ExecEvent::Exit {
            code,
            signal,
            duration: started.elapsed(),
            timed_out: stop == Some(Stop::TimedOut),
            cancelled: stop == Some(Stop::Cancelled),
        };
        if !leftover.is_empty() {
            let _ = tx.send(ExecEvent::Stderr(leftover)).await;
        }
        let _ = tx.send(exit).await;
    }

    /// Forwards output until the channel closes, or until cancel/timeout/consumer gone.
    async fn stream(&mut self, stdin: Stdin) -> Option<Stop> {
        let ExecTask { write, read, early, tx, cancel, deadline, marker, code, signal, guard, .. } = self;
        let write: &ChannelWriteHalf<Msg> = write;
        let stdin = async move {
            match stdin {
                Stdin::None => {}
                Stdin::Bytes(data) => {
                    let _ = write.data_bytes(data).await;
                }
                Stdin::Stream(mut chunks) => {
                    while let Some(data) = chunks.recv().await {
                        if write.data_bytes(data).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = write.eof().await;
        };
        let mut stdin = std::pin::pin!(stdin);
        let mut stdin_done = false;
        let deadline = *deadline;
        let timer = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let mut timer = std::pin::pin!(timer);
        let mut permit = None;
        loop {
            tokio::select! {
                biased;
                _ = cancel.wait_for(|c| *c) => return Some(Stop::Cancelled),
                _ = guard.closing.wait_for(|c| *c) => return Some(Stop::Cancelled),
                _ = &mut timer => return Some(Stop::TimedOut),
                _ = &mut stdin, if !stdin_done => stdin_done = true,
                // Back-pressure: take a slot in the consumer's queue before reading the channel.
                p = tx.reserve(), if permit.is_none() => match p {
                    Ok(p) => permit = Some(p),
                    Err(_) => return Some(Stop::Cancelled), // handle dropped
                },
                msg = next_msg(early, read), if permit.is_some() => {
                    let event = match msg {
                        None | Some(ChannelMsg::Close) => break,
                        Some(ChannelMsg::Data { data }) => Some(ExecEvent::Stdout(data)),
                        Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                            let data = marker.filter(data);
                            (!data.is_empty()).then_some(ExecEvent::Stderr(data))
                        }
                        other => {
                            record(code, signal, other);
                            None
                        }
                    };
                    if let Some(event) = event
                        && let Some(p) = permit.take()
                    {
                        p.send(event);
                    }
                }
            }
        }
        None
    }

    /// Stops the remote command: `signal TERM`, then start the process-group kill on a second
    /// channel, then wait for the channel to close (closing it ourselves after a deadline).
    /// Output arriving meanwhile is read (so the connection keeps flowing) and discarded.
    async fn kill(&mut self) {
        let _ = self.write.signal(Sig::TERM).await;
        let grace = self.conn.options().kill_grace;
        let mut killer: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        let mut kill_started = false;
        let mut channel_closed = false;
        // If the PID is unknown or the kill cannot start, give up waiting at this point.
        let mut close_by = Instant::now() + grace + Duration::from_secs(10);
        loop {
            if !kill_started && let Some(pid) = self.marker.pid() {
                kill_started = true;
                killer = Some(Box::pin(start_group_kill(self.conn.clone(), pid, grace)));
            }
            if !kill_started && !self.marker.searching() {
                // No PID marker (a server that does not run our wrapper): only the signal
                // request and the close are left.
                close_by = close_by.min(Instant::now() + grace);
            }
            if channel_closed && killer.is_none() {
                return;
            }
            tokio::select! {
                msg = next_msg(&mut self.early, &mut self.read), if !channel_closed => match msg {
                    // Keep going until the kill has started: the group may outlive the channel.
                    None | Some(ChannelMsg::Close) => channel_closed = true,
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                        let _ = self.marker.filter(data);
                    }
                    other => record(&mut self.code, &mut self.signal, other),
                },
                _ = async {
                    match killer.as_mut() {
                        Some(k) => k.await,
                        None => std::future::pending().await,
                    }
                } => {
                    killer = None;
                    // TERM is sent; KILL follows after the grace period.
                    close_by = close_by.min(Instant::now() + grace + Duration::from_secs(2));
                }
                _ = tokio::time::sleep_until(close_by) => {
                    if !channel_closed {
                        let _ = self.write.close().await;
                    }
                    return;
                }
            }
        }
    }
}

/// Notes exit status and signal.
fn record(code: &mut Option<u32>, signal: &mut Option<String>, msg: Option<ChannelMsg>) {
    match msg {
        Some(ChannelMsg::ExitStatus { exit_status }) => *code = Some(exit_status),
        Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
            *signal = Some(crate::signal::signal_name(&signal_name).to_string())
        }
        _ => {}
    }
}

/// The next channel message, replaying those that arrived before the exec reply first.
async fn next_msg(early: &mut VecDeque<ChannelMsg>, read: &mut ChannelReadHalf) -> Option<ChannelMsg> {
    match early.pop_front() {
        Some(msg) => Some(msg),
        None => read.wait().await,
    }
}

/// Starts, on a new channel, a script that sends TERM to process group `pgid`, waits up to
/// `grace` for it to go away and then sends KILL. Returns once the server runs the script; the
/// script finishes on its own (sshd does not stop it when its channel goes away).
async fn start_group_kill(conn: Connection, pgid: u32, grace: Duration) {
    let rounds = (grace.as_millis() / 100).max(1);
    let script = format!(
        "p={pgid}; kill -s TERM -- -$p 2>/dev/null || exit 0; i=0; \
         while [ $i -lt {rounds} ] && kill -s 0 -- -$p 2>/dev/null; do sleep 0.1; i=$((i+1)); done; \
         kill -s KILL -- -$p 2>/dev/null; exit 0"
    );
    let start = async {
        let mut channel = conn.open_control_channel().await?;
        channel.exec(true, script.into_bytes()).await.map_err(|e| SshError::from_russh(conn.addr(), "exec", e))?;
        let _ = channel.eof().await;
        loop {
            match channel.wait().await {
                Some(ChannelMsg::Success) => return Ok(()),
                Some(ChannelMsg::Failure) => {
                    return Err(SshError::ChannelRefused {
                        what: "the kill command".into(),
                        detail: "the server answered failure".into(),
                    });
                }
                Some(_) => {}
                None => {
                    return Err(SshError::ConnectionLost {
                        addr: conn.addr().to_string(),
                        detail: "the kill channel closed".into(),
                    });
                }
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), start).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(addr = conn.addr(), pgid, "killing remote command: {e}"),
        Err(_) => tracing::warn!(addr = conn.addr(), pgid, "killing remote command timed out"),
    }
}

/// Finds and strips the `mpool-exec-<id> <pid>` line the wrapper prints first on stderr.
///
/// Lines before it (noise from the login shell's startup files) are passed through; after 8 KiB
/// without the marker, the search stops and everything passes through.
pub(super) struct PidMarker {
    prefix: String,
    state: MarkerState,
}

enum MarkerState {
    Searching(Vec<u8>),
    Found(u32),
    Absent,
}

const MARKER_SEARCH_LIMIT: usize = 8 * 1024;

impl PidMarker {
    pub(super) fn new(id: &str) -> PidMarker {
        PidMarker { prefix: format!("mpool-exec-{id} "), state: MarkerState::Searching(Vec::new()) }
    }

    fn pid(&self) -> Option<u32> {
        match self.state {
            MarkerState::Found(pid) => Some(pid),
            _ => None,
        }
    }

    fn searching(&self) -> bool {
        matches!(self.state, MarkerState::Searching(_))
    }

    /// Takes stderr data; returns what the consumer should see.
    fn filter(&mut self, data: Bytes) -> Bytes {
        let MarkerState::Searching(buf) = &mut self.state else {
            return data;
        };
        buf.extend_from_slice(&data);
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + nl];
            if let Some(pid) = line
                .strip_prefix(self.prefix.as_bytes())
                .and_then(|rest| std::str::from_utf8(rest).ok())
                .and_then(|rest| rest.parse::<u32>().ok())
                .filter(|pid| *pid > 1)
            // never `kill -- -1` (everything) or `-0` (ourselves)
            {
                let mut out = buf[..start].to_vec();
                out.extend_from_slice(&buf[start + nl + 1..]);
                self.state = MarkerState::Found(pid);
                return Bytes::from(out);
            }
            start += nl + 1;
        }
        if buf.len() > MARKER_SEARCH_LIMIT {
            return self.finish();
        }
        Bytes::new()
    }

    /// Ends the search; returns held-back data.
    fn finish(&mut self) -> Bytes {
        match std::mem::replace(&mut self.state, MarkerState::Absent) {
            MarkerState::Searching(buf) => Bytes::from(buf),
            found @ MarkerState::Found(_) => {
                self.state = found;
                Bytes::new()
            }
            MarkerState::Absent => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_stripped_even_when_split() {
        let mut m = PidMarker::new("ab");
        assert_eq!(m.filter(Bytes::from_static(b"mpool-exec-a")), Bytes::new());
        assert_eq!(m.filter(Bytes::from_static(b"b 4242\nerr1\n")), Bytes::from_static(b"err1\n"));
        assert_eq!(m.pid(), Some(4242));
        assert_eq!(m.filter(Bytes::from_static(b"mpool-exec-ab 1\n")), "mpool-exec-ab 1\n");
    }

    #[test]
    fn noise_before_the_marker_passes_through() {
        let mut m = PidMarker::new("ab");
        assert_eq!(m.filter(Bytes::from_static(b"motd\nmpool-exec-ab 7\nx")), "motd\nx");
        assert_eq!(m.pid(), Some(7));
    }

    #[test]
    fn missing_marker_gives_up_and_flushes() {
        let mut m = PidMarker::new("ab");
        assert_eq!(m.filter(Bytes::from_static(b"partial")), Bytes::new());
        assert_eq!(m.finish(), "partial");
        assert_eq!(m.pid(), None);
        let mut m = PidMarker::new("ab");
        let big = Bytes::from(vec![b'x'; MARKER_SEARCH_LIMIT + 1]);
        assert_eq!(m.filter(big.clone()), big);
        assert!(!m.searching());
    }
}
