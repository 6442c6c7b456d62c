//! Detached exec sessions end to end against `mpool serve` + `mpool sim` (the simulator runs
//! every command of a VM for real, under a supervisor that keeps everything they start): a
//! caller killed mid-command attaches again and gets everything and the real exit code; so
//! does one after `kill -9` of `mpool serve` (the command was not interrupted); two attachers
//! see the same bytes; output above the cap is dropped in the middle with a marker; CancelExec
//! kills a process that left the session's process group; a session nobody follows is killed at
//! the pool's `max_ttl`; ListSessions; the CLI's `exec --detach` and `attach`.
mod common;

use std::time::Duration;

use common::MPOOL;
use mpool_api::client::Client;
use mpool_api::proto::v1;
use mpool_testkit::api::acquire;
use mpool_testkit::{Stack, StackOptions, eventually};
use v1::exec_event::Event;

const POOL: &str = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 2\n";

fn sh(line: &str) -> Option<v1::Command> {
    Some(v1::Command { argv: vec!["sh".into(), "-c".into(), line.into()], ..Default::default() })
}

/// Everything an exec/attach stream said.
#[derive(Default, Debug)]
struct Seen {
    started: String,
    stdout: String,
    stderr: String,
    replayed_stdout: String,
    dropped: Vec<v1::Dropped>,
    exit: Option<v1::ExitStatus>,
    last_offset: u64,
}

async fn collect(s: tonic::Streaming<v1::ExecEvent>) -> Seen {
    collect_rest(s, Seen::default()).await
}

/// What is left of a stream, added to what was seen of it.
async fn collect_rest(mut s: tonic::Streaming<v1::ExecEvent>, mut seen: Seen) -> Seen {
    while let Some(ev) = s.message().await.expect("stream") {
        seen.record(ev);
    }
    seen
}

/// Reads a stream until its stdout holds `text`.
async fn read_until(s: &mut tonic::Streaming<v1::ExecEvent>, seen: &mut Seen, text: &str) {
    while !seen.stdout.contains(text) {
        let ev = s.message().await.expect("stream").unwrap_or_else(|| panic!("the stream ended before {text:?}"));
        seen.record(ev);
    }
}

impl Seen {
    fn record(&mut self, ev: v1::ExecEvent) {
        match ev.event {
            Some(Event::Started(id)) => self.started = id,
            Some(Event::Stdout(t)) => {
                if ev.replayed {
                    self.replayed_stdout.push_str(&t);
                }
                self.stdout.push_str(&t);
                self.last_offset = ev.offset;
            }
            Some(Event::Stderr(t)) => self.stderr.push_str(&t),
            Some(Event::Dropped(d)) => self.dropped.push(d),
            Some(Event::Exit(x)) => self.exit = Some(x),
            None => {}
        }
    }
}

async fn attach(c: &mut Client, lease: &str, session: &str) -> Seen {
    let req = v1::AttachRequest { lease_id: lease.into(), session: session.into(), ..Default::default() };
    collect(c.attach(req).await.expect("attach").into_inner()).await
}

async fn run(c: &mut Client, lease: &str, line: &str) -> String {
    let req = v1::ExecRequest { lease_id: lease.into(), command: sh(line), ..Default::default() };
    let seen = collect(c.exec(req).await.expect("exec").into_inner()).await;
    assert_eq!(seen.exit.as_ref().map(|x| x.code), Some(0), "{line}: {seen:?}");
    seen.stdout
}

/// A command that prints `first`, waits for the file `go` in the home directory, then prints
/// `second` and exits 7.
const WAITS_FOR_GO: &str = "echo first; echo oops >&2; while [ ! -e go ]; do sleep 0.05; done; echo second; exit 7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_went_away_attaches_again_and_two_attachers_see_the_same_bytes() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "sessions").await.expect("acquire");
    let req = v1::ExecRequest {
        lease_id: lease.id.clone(),
        command: sh(WAITS_FOR_GO),
        session: "job".into(),
        on_disconnect: v1::OnDisconnect::Keep as i32,
        ..Default::default()
    };
    let mut s = c.exec(req.clone()).await.expect("exec").into_inner();
    // The caller reads until `first` arrives, then goes away mid-command.
    let mut got = String::new();
    while !got.contains("first") {
        match s.message().await.expect("stream").and_then(|e| e.event) {
            Some(Event::Stdout(t)) => got.push_str(&t),
            Some(Event::Exit(x)) => panic!("the command ended early: {x:?}"),
            Some(_) => {}
            None => panic!("the stream ended before `first`"),
        }
    }
    drop(s);
    // Starting the same session again is refused: it exists (and is not run twice).
    let reserved = v1::ExecRequest { session: "run".into(), ..req.clone() };
    let e = c.exec(req).await.expect_err("a second start of the session");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    // `run` is a Run's command: an Exec may not take the id (its exit would pass for the Run's).
    let e = c.exec(reserved).await.expect_err("an Exec session named run");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    let listed = c.list_sessions(v1::ListSessionsRequest { lease_id: lease.id.clone() }).await.unwrap().into_inner();
    let job = listed.sessions.iter().find(|s| s.id == "job").expect("the session is listed");
    assert_eq!(job.state, v1::SessionState::Running as i32, "{listed:?}");
    assert_eq!(job.stdout_bytes, 6, "{listed:?}");

    // Two attachers follow it (each has had the replay of `first`); then the command is let go on.
    let mut followers = Vec::new();
    for _ in 0..2 {
        let req = v1::AttachRequest { lease_id: lease.id.clone(), session: "job".into(), ..Default::default() };
        let mut s = c.attach(req).await.expect("attach").into_inner();
        let mut seen = Seen::default();
        read_until(&mut s, &mut seen, "first").await;
        followers.push(tokio::spawn(collect_rest(s, seen)));
    }
    run(&mut c, &lease.id, "touch go").await;
    let (a1, a2) = (followers.remove(0).await.unwrap(), followers.remove(0).await.unwrap());
    for a in [&a1, &a2] {
        assert_eq!(a.started, "job");
        assert_eq!(a.stdout, "first\nsecond\n", "{a:?}");
        assert_eq!(a.stderr, "oops\n", "{a:?}");
        assert_eq!(a.replayed_stdout, "first\n", "what was written before the attach is marked replayed: {a:?}");
        assert_eq!(a.exit.as_ref().map(|x| (x.code, x.cancelled)), Some((7, false)), "{a:?}");
        assert_eq!(a.last_offset, 13, "{a:?}");
    }
    // After the end, an attach replays everything and the exit code again; from an offset, the rest.
    let late = attach(&mut c, &lease.id, "job").await;
    assert_eq!((late.stdout.as_str(), late.exit.map(|x| x.code)), ("first\nsecond\n", Some(7)));
    let req =
        v1::AttachRequest { lease_id: lease.id.clone(), session: "job".into(), stdout_offset: 6, stderr_offset: 5 };
    let rest = collect(c.attach(req).await.unwrap().into_inner()).await;
    assert_eq!((rest.stdout.as_str(), rest.stderr.as_str()), ("second\n", ""), "{rest:?}");
    let listed = c.list_sessions(v1::ListSessionsRequest { lease_id: lease.id.clone() }).await.unwrap().into_inner();
    let job = &listed.sessions[0];
    assert_eq!(
        (job.state, job.stdout_bytes, job.stderr_bytes, job.exit.as_ref().map(|x| x.code)),
        (v1::SessionState::Exited as i32, 13, 5, Some(7)),
        "{listed:?}"
    );
    // Another owner's token sees nothing of it.
    let mut other = stack.tcp_client(Some("other-token")).await;
    let e = other
        .attach(v1::AttachRequest { lease_id: lease.id.clone(), session: "job".into(), ..Default::default() })
        .await
        .expect_err("another owner's attach");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let missing = c
        .attach(v1::AttachRequest { lease_id: lease.id.clone(), session: "nope".into(), ..Default::default() })
        .await
        .expect_err("no such session");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
}

/// A stack serving `pool` (pool `ci`), a lease of it, and session `id` running
/// [`WAITS_FOR_GO`] detached on it.
async fn detached_session(pool: &str, id: &str) -> (Stack, Client, v1::Lease) {
    let stack = Stack::start(StackOptions::tests(MPOOL, pool)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", id).await.expect("acquire");
    let req = v1::ExecRequest {
        lease_id: lease.id.clone(),
        command: sh(WAITS_FOR_GO),
        session: id.into(),
        detach: true,
        ..Default::default()
    };
    let started = collect(c.exec(req).await.expect("exec").into_inner()).await;
    assert_eq!((started.started.as_str(), started.exit.is_none()), (id, true), "{started:?}");
    (stack, c, lease)
}

/// When lease `id` expires (unix seconds), if it is live.
async fn expiry(c: Client, id: String) -> Option<i64> {
    let leases = c.clone().list_leases(v1::ListLeasesRequest::default()).await.ok()?.into_inner().leases;
    leases.into_iter().find(|l| l.id == id)?.expires_at.map(|t| t.seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_kill_9_of_mpool_serve() {
    let pool = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 2\ndefault_ttl = \"20s\"\n";
    let (mut stack, c, lease) = detached_session(pool, "build").await;
    let before = expiry(c.clone(), lease.id.clone()).await.expect("the lease's expiry");
    stack.kill_serve();
    stack.start_serve().await.expect("mpool serve starts again");
    let mut c = stack.client().await;
    // The command was not interrupted: it still waits for `go`, then finishes.
    let listed = eventually("the lease is served again", Duration::from_secs(30), || {
        let mut c = c.clone();
        let id = lease.id.clone();
        async move { c.list_sessions(v1::ListSessionsRequest { lease_id: id }).await.ok().map(|r| r.into_inner()) }
    })
    .await;
    assert_eq!(listed.sessions.first().map(|s| s.state), Some(v1::SessionState::Running as i32), "{listed:?}");
    // The restarted server found the session and keeps its lease alive (it renews the 20 s TTL
    // the lease would otherwise expire by).
    mpool_testkit::wait("the lease is renewed for its running session", Duration::from_secs(40))
        .until(|| {
            let (c, id) = (c.clone(), lease.id.clone());
            async move { expiry(c, id).await.filter(|e| *e > before) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; serve's log:\n{}", stack.log()));
    run(&mut c, &lease.id, "touch go").await;
    let a = attach(&mut c, &lease.id, "build").await;
    assert_eq!((a.stdout.as_str(), a.exit.map(|x| x.code)), ("first\nsecond\n", Some(7)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_running_sessions_lease_is_held_until_its_vm_can_be_reached() {
    // One VM: once it is leased nothing else is provisioned, so no daemon call is in flight
    // when mpool is killed (a hung `ssh_info` holds the daemon's main thread, as multipassd's).
    let pool = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 1\ndefault_ttl = \"3s\"\n";
    let (mut stack, _, lease) = detached_session(pool, "slow").await;
    // mpool restarts while the daemon cannot tell it the VM's SSH endpoint.
    stack.kill_serve();
    stack.sim().daemon().set_hang("ssh_info", true);
    stack.start_serve().await.expect("mpool serve starts again");
    let c = stack.client().await;
    let expires = eventually("the restarted mpool knows the lease", Duration::from_secs(30), || {
        expiry(c.clone(), lease.id.clone())
    })
    .await;
    // Its 3 s TTL passes: the lease is held for the running session all the same.
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    tokio::time::sleep(Duration::from_secs(u64::try_from(expires - now() + 2).unwrap_or(0))).await;
    assert!(
        expiry(c.clone(), lease.id.clone()).await.is_some(),
        "the lease of a running session expired while mpool could not reach its VM; serve's log:\n{}",
        stack.log()
    );
    // Once the daemon answers, the watch reaches the VM and renews the lease; the command
    // finishes as if nothing happened.
    stack.sim().daemon().set_hang("ssh_info", false);
    eventually("the lease is renewed for its running session", Duration::from_secs(30), || {
        let (c, id) = (c.clone(), lease.id.clone());
        async move { expiry(c, id).await.filter(|e| *e > expires) }
    })
    .await;
    let mut c = c;
    run(&mut c, &lease.id, "touch go").await;
    let a = attach(&mut c, &lease.id, "slow").await;
    assert_eq!((a.stdout.as_str(), a.exit.map(|x| x.code)), ("first\nsecond\n", Some(7)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_over_the_cap_is_dropped_in_the_middle_with_a_marker() {
    let mut opts = StackOptions::tests(MPOOL, POOL);
    opts.api_toml = "session_output_cap = \"32K\"".into();
    let stack = Stack::start(opts).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "loud").await.expect("acquire");
    // 1 MB of numbered lines: "00000\n" ... 6 bytes each.
    let req = v1::ExecRequest {
        lease_id: lease.id.clone(),
        command: sh("seq -f %05g 0 174761 | head -c 1048576"),
        session: "loud".into(),
        ..Default::default()
    };
    // A caller that follows live gets every byte it kept up with; whatever it missed is
    // reported where it was dropped: the offsets add up either way.
    let live = collect(c.exec(req).await.expect("exec").into_inner()).await;
    assert_eq!(live.exit.as_ref().map(|x| x.code), Some(0), "{:?}", live.exit);
    let missed: u64 = live.dropped.iter().map(|d| d.to - d.from).sum();
    assert_eq!(live.stdout.len() as u64 + missed, 1048576, "{:?}", live.dropped);
    // Attached after the end: the first 16 KiB, a marker, the last 16-20 KiB (4 segments of
    // 4 KiB each side, plus the one that was being written).
    let seen = attach(&mut c, &lease.id, "loud").await;
    assert_eq!(seen.exit.as_ref().map(|x| x.code), Some(0), "{:?}", seen.exit);
    assert_eq!(seen.dropped.len(), 1, "{:?}", seen.dropped);
    let d = &seen.dropped[0];
    assert_eq!((d.stream.as_str(), d.from), ("stdout", 16384), "{d:?}");
    assert!(d.to >= 1048576 - 20480 && d.to <= 1048576 - 16384, "{d:?}");
    assert_eq!(seen.stdout.len() as u64, 16384 + (1048576 - d.to), "{} bytes", seen.stdout.len());
    let all: String = (0..174762).map(|i| format!("{i:05}\n")).collect();
    let all = &all[..1048576];
    let to = usize::try_from(d.to).unwrap();
    assert!(seen.stdout == format!("{}{}", &all[..16384], &all[to..]), "the head and the tail, byte for byte");
    assert_eq!(seen.last_offset, 1048576);
    // The VM keeps no more than the cap (plus the segment being written).
    let kept = run(&mut c, &lease.id, "du -sb .mpool/sessions/loud/out | cut -f1").await;
    let kept: u64 = kept.trim().parse().expect("a number");
    assert!(kept <= 9 * 4096 + 4096, "{kept} bytes kept in the VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_a_process_that_left_the_sessions_process_group() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "cancel").await.expect("acquire");
    let req = v1::ExecRequest {
        lease_id: lease.id.clone(),
        command: sh("setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' & nohup sleep 1000 >/dev/null 2>&1 & \
                     echo $! > nohup.pid; wait"),
        session: "tree".into(),
        detach: true,
        ..Default::default()
    };
    collect(c.exec(req).await.expect("exec").into_inner()).await;
    let pids = eventually("both pids are written", Duration::from_secs(20), || {
        let mut c = c.clone();
        let id = lease.id.clone();
        async move {
            let out = run(&mut c, &id, "cat escaped.pid nohup.pid 2>/dev/null || true").await;
            (out.lines().count() == 2).then_some(out)
        }
    })
    .await;
    let alive = format!(
        "for p in {}; do kill -0 $p 2>/dev/null && echo alive; done; true",
        pids.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    assert_eq!(run(&mut c, &lease.id, &alive).await, "alive\nalive\n");
    let r = c
        .cancel_exec(v1::CancelExecRequest { lease_id: lease.id.clone(), exec_id: "tree".into() })
        .await
        .expect("cancel")
        .into_inner();
    assert!(r.cancelled, "serve's log:\n{}", stack.log());
    assert_eq!(run(&mut c, &lease.id, &alive).await, "", "both escaped processes were killed");
    let a = attach(&mut c, &lease.id, "tree").await;
    let x = a.exit.expect("an exit status");
    assert!(x.cancelled, "{x:?}");
    // Nothing runs any more: a second cancel finds nothing.
    let r = c
        .cancel_exec(v1::CancelExecRequest { lease_id: lease.id.clone(), exec_id: "tree".into() })
        .await
        .expect("cancel")
        .into_inner();
    assert!(!r.cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_nobody_follows_is_killed_at_the_pools_max_ttl() {
    let pool = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 2\ndefault_ttl = \"2s\"\nmax_ttl = \"4s\"\n";
    let stack = Stack::start(StackOptions::tests(MPOOL, pool)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "forever").await.expect("acquire");
    let req =
        v1::ExecRequest { lease_id: lease.id.clone(), command: sh("sleep 1000"), detach: true, ..Default::default() };
    let started = collect(c.exec(req).await.expect("exec").into_inner()).await;
    assert!(started.started.starts_with("s-"), "a generated session id: {started:?}");
    // The session outlives the lease's 2 s TTL (it keeps the lease alive) but not max_ttl.
    eventually("the lease ends at max_ttl", Duration::from_secs(30), || {
        let mut c = c.clone();
        let id = lease.id.clone();
        async move {
            let r = c.renew(v1::RenewRequest { lease_id: id, ..Default::default() }).await;
            r.err().map(|e| e.code())
        }
    })
    .await;
    assert!(stack.log().contains("max_ttl with sessions running"), "{}", stack.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_detaches_and_attaches() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "cli").await.expect("acquire");
    let endpoint = format!("unix:{}", stack.socket.display());
    let cli = |args: &[&str]| {
        std::process::Command::new(MPOOL)
            .args(["--endpoint", &endpoint])
            .args(args)
            .env_remove("MPOOL_TOKEN")
            .output()
            .expect("mpool runs")
    };
    let out = cli(&["exec", &lease.id, "--detach", "--", "sh", "-c", "echo hello; exit 3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("s-"), "{id}");
    let out = cli(&["attach", &lease.id, &id]);
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(3), "hello\n"));
    let out = cli(&["sessions", &lease.id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&id) && text.contains("exited"), "{text}");
}

fn keep_run(rid: &str, line: &str) -> v1::RunRequest {
    v1::RunRequest {
        pool: "ci".into(),
        holder: "keep-run".into(),
        request_id: rid.into(),
        command: sh(line),
        inputs: vec![v1::InputFile { path: "in.txt".into(), text: "input\n".into(), ..Default::default() }],
        outputs: vec!["out.txt".into()],
        on_disconnect: v1::OnDisconnect::Keep as i32,
        ..Default::default()
    }
}

/// Everything a Run stream said: the lease, stdout (and what of it was replayed), dropped
/// events, output bytes, the result.
#[derive(Default, Debug)]
struct RunSeen {
    lease: Option<v1::Lease>,
    stdout: String,
    replayed: String,
    output: Vec<u8>,
    result: Option<v1::RunResult>,
}

async fn collect_run(mut s: tonic::Streaming<v1::RunEvent>, seen: &mut RunSeen) {
    while let Some(ev) = s.message().await.expect("run stream") {
        seen.record(ev);
    }
}

impl RunSeen {
    fn record(&mut self, ev: v1::RunEvent) {
        use v1::run_event::Event as R;
        match ev.event {
            Some(R::Lease(l)) => self.lease = Some(l),
            Some(R::Stdout(t)) => {
                if ev.replayed {
                    self.replayed.push_str(&t);
                }
                self.stdout.push_str(&t);
            }
            Some(R::Output(o)) => self.output.extend_from_slice(&o.data),
            Some(R::Result(r)) => self.result = Some(r),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_run_whose_caller_was_cut_is_finished_by_its_retry_with_one_execution() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    // Counts its executions in `runs`, waits for `go`, writes an output, exits 5.
    let line = "echo ran >> runs; echo started; while [ ! -e go ]; do sleep 0.05; done; \
                cat in.txt runs > out.txt; echo finished; exit 5";
    let mut first = c.run(futures::stream::iter([keep_run("task-1-attempt-0", line)])).await.unwrap().into_inner();
    let lease = match first.message().await.unwrap().and_then(|e| e.event) {
        Some(v1::run_event::Event::Lease(l)) => l,
        other => panic!("expected the lease first, got {other:?}"),
    };
    match first.message().await.unwrap().and_then(|e| e.event) {
        Some(v1::run_event::Event::Stdout(t)) => assert_eq!(t, "started\n"),
        other => panic!("expected the command's first output, got {other:?}"),
    }
    // The worker dies: its stream is cut mid-command.
    drop(first);
    drop(c);
    // The resubmitted attempt (same request id) attaches instead of running it again.
    let mut c = stack.client().await;
    let mut retry = c.run(futures::stream::iter([keep_run("task-1-attempt-0", line)])).await.unwrap().into_inner();
    // The retry follows the command (it has had the replay of `started`); then it is let go on.
    let mut seen = RunSeen::default();
    while !seen.stdout.contains("started") {
        seen.record(retry.message().await.expect("run stream").expect("the retry's stream ended before `started`"));
    }
    let collecting = tokio::spawn(async move {
        collect_run(retry, &mut seen).await;
        seen
    });
    let mut c2 = stack.client().await;
    run(&mut c2, &lease.id, "touch go").await;
    let seen = collecting.await.unwrap();
    assert_eq!(seen.lease.as_ref().map(|l| l.id.as_str()), Some(lease.id.as_str()), "{seen:?}");
    assert_eq!(seen.stdout, "started\nfinished\n", "{seen:?}");
    assert_eq!(seen.replayed, "started\n", "what the first attempt saw is marked replayed: {seen:?}");
    assert_eq!(seen.output, b"input\nran\n", "the output of one execution (`runs` has one line): {seen:?}");
    let result = seen.result.expect("a result");
    assert_eq!(result.exit.as_ref().map(|x| x.code), Some(5), "{result:?}");
    // A later retry gets the recorded result without running anything.
    let mut again = RunSeen::default();
    let s = c.run(futures::stream::iter([keep_run("task-1-attempt-0", line)])).await.unwrap().into_inner();
    collect_run(s, &mut again).await;
    assert_eq!(again.result.and_then(|r| r.exit).map(|x| x.code), Some(5));
    assert_eq!(again.stdout, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_run_nobody_came_back_for_keeps_its_exit_status_after_its_lease_expired() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    // It writes while it waits, so the server sees its caller gone at the next line.
    let line = "echo started; while [ ! -e go ]; do echo tick; sleep 0.05; done; exit 4";
    let short = || v1::RunRequest {
        ttl: Some(mpool_api::proto::Duration { seconds: 3, nanos: 0 }),
        ..keep_run("lonely", line)
    };
    let mut first = c.run(futures::stream::iter([short()])).await.unwrap().into_inner();
    let lease = match first.message().await.unwrap().and_then(|e| e.event) {
        Some(v1::run_event::Event::Lease(l)) => l,
        other => panic!("expected the lease first, got {other:?}"),
    };
    let _ = first.message().await.unwrap();
    // The caller goes away for good (the server saw it); the command ends; nobody retries
    // while the lease lives.
    drop(first);
    eventually("the server sees the Run's caller gone", Duration::from_secs(30), || {
        let log = stack.log();
        async move { log.contains("the Run's caller went away").then_some(()) }
    })
    .await;
    run(&mut c, &lease.id, "touch go").await;
    eventually("the lease expires", Duration::from_secs(60), || {
        let mut c = c.clone();
        let id = lease.id.clone();
        async move {
            let leases = c.list_leases(v1::ListLeasesRequest::default()).await.ok()?.into_inner().leases;
            (!leases.iter().any(|l| l.id == id)).then_some(())
        }
    })
    .await;
    // A late retry gets the exit status the command ended with, without running it again.
    let mut late = RunSeen::default();
    let s = c.run(futures::stream::iter([short()])).await.expect("the late retry").into_inner();
    collect_run(s, &mut late).await;
    let result = late.result.expect("a result");
    assert_eq!(result.exit.as_ref().map(|x| x.code), Some(4), "{result:?}");
    assert_eq!(result.served, v1::Served::Repeat as i32, "{result:?}");
    assert_eq!(late.stdout, "", "nothing ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_keep_run_kills_its_command() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let mut s =
        c.run(futures::stream::iter([keep_run("cancel-me", "echo started; sleep 1000")])).await.unwrap().into_inner();
    let lease = match s.message().await.unwrap().and_then(|e| e.event) {
        Some(v1::run_event::Event::Lease(l)) => l,
        other => panic!("expected the lease first, got {other:?}"),
    };
    match s.message().await.unwrap().and_then(|e| e.event) {
        Some(v1::run_event::Event::Stdout(t)) => assert_eq!(t, "started\n"),
        other => panic!("expected the command's first output, got {other:?}; serve's log:\n{}", stack.log()),
    }
    let r = c
        .cancel_exec(v1::CancelExecRequest { lease_id: lease.id.clone(), exec_id: "run".into() })
        .await
        .expect("cancel")
        .into_inner();
    if !r.cancelled {
        let mut rest = Vec::new();
        loop {
            match s.message().await {
                Ok(Some(ev)) => rest.push(format!("{ev:?}")),
                Ok(None) => break,
                Err(e) => {
                    rest.push(format!("error {e:?}"));
                    break;
                }
            }
        }
        panic!(
            "the cancel found nothing to cancel; the Run's stream went on with {rest:?}; serve's log:\n{}",
            stack.log()
        );
    }
    let mut seen = RunSeen::default();
    collect_run(s, &mut seen).await;
    let exit = seen.result.and_then(|r| r.exit).expect("an exit status");
    assert!(exit.cancelled, "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_starts_lists_and_attaches_as_json_lines() {
    use tokio::io::AsyncReadExt;
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let token = Some(stack.token.as_str());
    let lease = stack.http("POST", "/v1/pools/ci/leases", token, Some(&serde_json::json!({"holder": "http"}))).await;
    assert_eq!(lease.status, 200, "{:?}", lease.json);
    let id = lease.json["id"].as_str().expect("a lease id").to_string();
    let body = serde_json::json!({"command": {"argv": ["sh", "-c", "echo one; echo two >&2; exit 4"]}, "detach": true});
    let started = stack.http("POST", &format!("/v1/leases/{id}/exec"), token, Some(&body)).await;
    assert_eq!(started.status, 200, "{:?}", started.json);
    assert_eq!(started.json["detached"], true, "{:?}", started.json);
    let session = started.json["session"].as_str().expect("a session id").to_string();
    // Attach: one JSON event per line, as they happen, ending with the exit.
    let mut s = stack
        .http_send(
            "POST",
            &format!("/v1/leases/{id}/sessions/{session}/attach"),
            token,
            Some(&serde_json::json!({})),
            true,
        )
        .await;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok();
    let answer = mpool_testkit::http::parse_http(&raw).expect("an HTTP answer");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(answer.header("transfer-encoding"), Some("chunked"), "streamed, not collected");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    let body = dechunk(&raw[split..]);
    let lines: Vec<serde_json::Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.first().and_then(|l| l["started"].as_str()), Some(session.as_str()), "{lines:?}");
    let stdout: String = lines.iter().filter_map(|l| l["stdout"].as_str()).collect();
    let stderr: String = lines.iter().filter_map(|l| l["stderr"].as_str()).collect();
    assert_eq!((stdout.as_str(), stderr.as_str()), ("one\n", "two\n"), "{lines:?}");
    assert_eq!(lines.last().map(|l| l["exit"]["code"].clone()), Some(serde_json::json!(4)), "{lines:?}");
    let listed = stack.http("GET", &format!("/v1/leases/{id}/sessions"), token, None).await;
    assert_eq!(listed.json["sessions"][0]["id"].as_str(), Some(session.as_str()), "{:?}", listed.json);
    assert_eq!(listed.json["sessions"][0]["state"].as_str(), Some("SESSION_STATE_EXITED"), "{:?}", listed.json);
    let missing = stack.http("GET", "/v1/leases/nope/sessions", token, None).await;
    assert_eq!(missing.status, 404, "{:?}", missing.json);
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let line = std::str::from_utf8(&raw[..eol]).expect("a size line");
        let size = usize::from_str_radix(line.trim(), 16).expect("a hex size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 2 + size + 2..];
    }
}

/// A process's `VmRSS` or `VmHWM` in bytes, from `/proc/PID/status`.
fn vm_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB");
    kb * 1024
}

/// Follows a session to its end, counting what it got: (bytes of stdout, bytes dropped, exit code).
async fn drain(c: &mut Client, lease: &str, session: &str) -> (u64, u64, i32) {
    let req = v1::AttachRequest { lease_id: lease.into(), session: session.into(), ..Default::default() };
    let mut s = c.attach(req).await.expect("attach").into_inner();
    let (mut got, mut dropped, mut code) = (0u64, 0u64, -2);
    while let Some(ev) = s.message().await.expect("stream") {
        match ev.event {
            Some(Event::Stdout(t)) => got += t.len() as u64,
            Some(Event::Dropped(d)) => dropped += d.to - d.from,
            Some(Event::Exit(x)) => code = x.code,
            _ => {}
        }
    }
    (got, dropped, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_memory_stays_flat_while_a_session_writes_200_mb_to_two_attachers() {
    let stack = Stack::start(StackOptions::tests(MPOOL, POOL)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let lease = acquire(&mut c, "ci", "memory").await.expect("acquire");
    let start = |session: &str, bytes: u64| v1::ExecRequest {
        lease_id: lease.id.clone(),
        command: sh(&format!("head -c {bytes} /dev/zero | tr '\\0' x")),
        session: session.into(),
        detach: true,
        ..Default::default()
    };
    // A warm-up with the same paths (two attachers), so what is measured is growth, not first use.
    collect(c.exec(start("warm", 4 << 20)).await.expect("exec").into_inner()).await;
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (l1, l2) = (lease.id.clone(), lease.id.clone());
    let w = tokio::spawn(async move { drain(&mut c1, &l1, "warm").await });
    drain(&mut c2, &l2, "warm").await;
    w.await.unwrap();

    let pid = stack.serve_pid().expect("mpool serve runs as a process");
    // Resets the peak (VmHWM) to the current RSS (Linux: "5" > /proc/PID/clear_refs).
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|e| panic!("resetting the peak RSS of mpool serve needs /proc/PID/clear_refs: {e}"));
    let before = vm_bytes(pid, "VmRSS:");
    const TOTAL: u64 = 200 << 20;
    collect(c.exec(start("loud", TOTAL)).await.expect("exec").into_inner()).await;
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (l1, l2) = (lease.id.clone(), lease.id.clone());
    let a1 = tokio::spawn(async move { drain(&mut c1, &l1, "loud").await });
    let a2 = tokio::spawn(async move { drain(&mut c2, &l2, "loud").await });
    for a in [a1.await.unwrap(), a2.await.unwrap()] {
        assert_eq!(a.2, 0, "{a:?}");
        assert_eq!(a.0 + a.1, TOTAL, "every byte was either sent or reported dropped: {a:?}");
        assert!(a.0 >= 8 << 20, "at least the cap was sent: {a:?}");
    }
    let peak = vm_bytes(pid, "VmHWM:");
    let grew = peak.saturating_sub(before);
    eprintln!("mpool serve RSS {before} bytes before, peak {peak} while 200 MB went to two attachers (+{grew})");
    assert!(grew < 5 << 20, "serve's RSS grew by {grew} bytes (before {before}, peak {peak})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_lease_of_the_vm_sees_no_session_of_the_last() {
    let pool = "[[pools]]\nname = \"ci\"\nmin_ready = 1\nmax_size = 1\n";
    let stack = Stack::start(StackOptions::tests(MPOOL, pool)).await.expect("stack starts");
    stack.wait_idle("ci", 1).await;
    let mut c = stack.client().await;
    let first = acquire(&mut c, "ci", "first").await.expect("acquire");
    let req = v1::ExecRequest {
        lease_id: first.id.clone(),
        command: sh("echo secret; sleep 1001"),
        session: "mine".into(),
        detach: true,
        ..Default::default()
    };
    collect(c.exec(req).await.expect("exec").into_inner()).await;
    c.release(v1::ReleaseRequest { lease_id: first.id.clone() }).await.expect("release");
    stack.wait_idle("ci", 1).await;
    let second = acquire(&mut c, "ci", "second").await.expect("acquire");
    assert_eq!(second.vm, first.vm, "the same VM, reset");
    let listed = c.list_sessions(v1::ListSessionsRequest { lease_id: second.id.clone() }).await.unwrap().into_inner();
    assert!(listed.sessions.is_empty(), "{listed:?}");
    let e = c
        .attach(v1::AttachRequest { lease_id: second.id.clone(), session: "mine".into(), ..Default::default() })
        .await
        .expect_err("the last lease's session is gone");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert_eq!(run(&mut c, &second.id, "pgrep -f 'slee[p] 1001' || true").await, "", "its command is gone too");
}
