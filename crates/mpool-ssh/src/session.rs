//! Detached sessions: a command that runs in the VM on its own, not tied to the SSH channel
//! that started it, with its output and exit status kept in the VM where any later caller (or
//! mpool after a restart) reads them back.
//!
//! Layout in the guest, under `~/.mpool/sessions/<id>/`:
//! - `meta`: JSON [`Meta`] (the command's description, the output layout, the timeout);
//! - `cmd`, `stdin`, `run`: the command line, its stdin, and the runner script;
//! - `out/`, `err/`: each stream cut by GNU `split` into segments `sNNNNNNNN` of
//!   [`Layout::segment`] bytes: segment `k` holds bytes `[k*segment, (k+1)*segment)`, so an
//!   offset names a file and a position in it. The first [`Layout::head`] segments are kept for
//!   good; of the rest only the last [`Layout::keep`] complete ones and the one being written
//!   (each segment's `split --filter` deletes the one `keep` places before it). The guest keeps
//!   at most `(head + keep + 1) * segment` bytes per stream, whatever the command writes.
//! - `exit` (the exit status as the shell saw it, then when the command started and ended,
//!   guest clock in ms; written when it ends), `done` (after both streams were flushed),
//!   `cancelled` or `timed_out` (written by [`kill_script`] before it kills).
//!
//! The command runs under `setsid` (its own session), started by a launcher that returns at
//! once, so neither the SSH channel closing nor mpool going away touches it. Every process of
//! the command inherits `MPOOL_SESSION=<id>`; [`kill_script`] finds them by it in
//! `/proc/*/environ`, so `setsid`, `nohup` and double forks do not escape a cancel (a process
//! that clears its environment does; the VM's reset ends everything anyway).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::SshError;
use super::files::RemoteFs;
use super::quote;

/// The sessions' directory, relative to the user's home (SFTP paths are).
pub const ROOT: &str = ".mpool/sessions";
/// Longest session id.
pub const MAX_ID: usize = 64;
/// Exit code of the launcher when the session's directory already exists.
pub const EXISTS: i32 = 17;

/// Whether `id` is a valid session id: 1-64 of letters, digits, `.`, `_`, `-`, not starting
/// with `.` (it names a directory in the guest).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How a stream is cut into segments and which are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Bytes per segment.
    pub segment: u64,
    /// Segments kept from the start.
    pub head: u64,
    /// Complete segments kept at the end (plus the one being written).
    pub keep: u64,
}

impl Layout {
    /// The layout that keeps about `cap` bytes per stream: half from the start, half from the
    /// end, in eighths (at least 4 KiB per segment).
    pub fn for_cap(cap: u64) -> Layout {
        Layout { segment: (cap / 8).max(4096), head: 4, keep: 4 }
    }

    /// The segment holding `offset` and the position in it.
    pub fn locate(&self, offset: u64) -> (u64, u64) {
        (offset / self.segment, offset % self.segment)
    }
}

/// What a session's `meta` file says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The session id.
    pub id: String,
    /// The command, described for people (shortened).
    pub command: String,
    /// How its output is kept.
    pub layout: Layout,
    /// When mpool started it (its host's clock, unix ms).
    pub started_ms: u64,
    /// Its timeout, ms (0: none).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Whether it keeps running when its caller goes away (else the caller's going away
    /// cancels it).
    #[serde(default)]
    pub keep: bool,
}

/// One of a session's two streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Out,
    /// stderr.
    Err,
}

impl Stream {
    /// Its directory in the session's.
    fn dir(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
        }
    }

    /// Its name as the API says it.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Out => "stdout",
            Stream::Err => "stderr",
        }
    }
}

/// The script (for `bash -s`) that creates the session's directory, writes its files and
/// starts the runner detached, printing `started`; it exits [`EXISTS`] when a session with this
/// id exists already. Files are written with shell builtins (quoted text), so starting a
/// session costs `mkdir`, `setsid` and the runner's own processes.
pub fn launch_script(meta: &Meta, command_line: &str, stdin: &[u8]) -> Result<String, SshError> {
    if !valid_id(&meta.id) {
        return Err(SshError::InvalidRequest(format!(
            "session id {:?} must be 1-{MAX_ID} letters, digits, '.', '_' or '-' (not starting with '.')",
            meta.id
        )));
    }
    let meta_json = serde_json::to_string(meta).map_err(|e| SshError::InvalidRequest(format!("session meta: {e}")))?;
    let stdin_file = if stdin.is_empty() {
        ": > \"$d/stdin\"".to_string()
    } else {
        format!("printf '%s' {} | base64 -d > \"$d/stdin\"", base64_text(stdin))
    };
    let runner = runner_script(&meta.id, meta.layout);
    Ok(format!(
        r#"d="$HOME/{ROOT}/{id}"
[ -d "$HOME/{ROOT}" ] || mkdir -p "$HOME/{ROOT}" || exit 1
mkdir "$d" 2>/dev/null || {{ echo "session {id} exists" >&2; exit {EXISTS}; }}
mkdir "$d/out" "$d/err" || exit 1
printf '%s\n' {cmd} > "$d/cmd" || exit 1
printf '%s\n' {meta} > "$d/meta" || exit 1
{stdin_file} || exit 1
printf '%s' {runner} > "$d/run" || exit 1
setsid -f bash "$d/run" </dev/null >/dev/null 2>&1 || exit 1
echo started
"#,
        id = meta.id,
        cmd = quote::quote(command_line),
        meta = quote::quote(&meta_json),
        runner = quote::quote(&runner),
    ))
}

/// Base64 in one word.
fn base64_text(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The runner: starts both stream writers, runs the command with `MPOOL_SESSION` (the id) and
/// `MPOOL_SESSION_DIR` (the session's directory: the marker a kill looks for, unique on the
/// host even where VMs share one, as the simulator's do) set, records its status (`exit`: the
/// status, then when it started and ended, guest ms), waits for the writers, marks the session
/// done. Clocks come from bash's `$EPOCHREALTIME` (no process). The command starts only if the
/// runner makes the directory `claim` first; a kill that made it first keeps the command from
/// ever starting: its status is 143, as a `TERM` would have made it.
fn runner_script(id: &str, layout: Layout) -> String {
    let (seg, head, keep) = (layout.segment, layout.head, layout.keep);
    format!(
        r#"d="$HOME/{ROOT}/{id}"
ms() {{ local t=${{EPOCHREALTIME/[.,]/}}; echo ${{t:0:-3}}; }}
start=$(ms)
w() {{
  cd "$d/$1" && SHELL=/bin/bash exec split -a 8 -d -b {seg} --filter='cat > "$FILE"; n=$((10#${{FILE#s}})); k=$((n - {keep})); if [ $k -ge {head} ]; then rm -f "s$(printf %08d $k)"; fi' - s
}}
exec 3> >(w out)
p1=$!
exec 4> >(w err)
p2=$!
cd "$HOME"
if mkdir "$d/claim" 2>/dev/null; then
  MPOOL_SESSION={id} MPOOL_SESSION_DIR="$d" bash -c "$(<"$d/cmd")" <"$d/stdin" >&3 2>&4 3>&- 4>&-
  rc=$?
else
  for i in {{1..40}}; do {{ [ -e "$d/cancelled" ] || [ -e "$d/timed_out" ]; }} && break; sleep 0.05; done
  rc=143
fi
echo "$rc $start $(ms)" > "$d/exit.tmp"
mv "$d/exit.tmp" "$d/exit"
exec 3>&- 4>&-
wait $p1 $p2 2>/dev/null
: > "$d/done"
"#
    )
}

/// Why a session is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// CancelExec, or its caller went away.
    Cancelled,
    /// Its timeout passed.
    TimedOut,
}

/// The script (for `bash -s`) that kills every process of session `id`: `TERM`, then `KILL`
/// after `grace_ms` to the ones left, round after round until none is left. Prints `killed`
/// (after `signalled` once the first signal went out: the VM may be reset under the script as
/// soon as its command died), or `ended` when nothing ran any more, or `missing`. When no process carries the session's
/// marker and there is no `exit` yet, the runner is between its start and the command's, or
/// between the command's end and `exit`: whoever makes the directory `claim` first decides. A
/// kill that makes it keeps the command from starting (`killed`); one that finds it made waits
/// (up to about 5 s) for the command's processes (killed as any others) or its `exit` (`ended`:
/// it finished on its own, and is not marked).
pub fn kill_script(id: &str, reason: KillReason, grace_ms: u64) -> String {
    let mark = match reason {
        KillReason::Cancelled => "cancelled",
        KillReason::TimedOut => "timed_out",
    };
    let rounds = grace_ms.div_ceil(100).max(1);
    format!(
        r#"d="$HOME/{ROOT}/{id}"
[ -d "$d" ] || {{ echo missing; exit 0; }}
m="MPOOL_SESSION_DIR=$d"
grep -q MPOOL_SESSION_DIR "$d/run" 2>/dev/null || m="MPOOL_SESSION={id}"
pids() {{ grep -lzxF "$m" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3; }}
p=$(pids)
if [ -z "$p" ]; then
  [ -e "$d/exit" ] && {{ echo ended; exit 0; }}
  if mkdir "$d/claim" 2>/dev/null; then : > "$d/{mark}"; echo killed; exit 0; fi
  for i in $(seq 1 100); do [ -e "$d/exit" ] && {{ echo ended; exit 0; }}; p=$(pids); [ -n "$p" ] && break; sleep 0.05; done
  [ -z "$p" ] && {{ echo ended; exit 0; }}
fi
[ -e "$d/exit" ] || : > "$d/{mark}"
kill -TERM $p 2>/dev/null
echo signalled
for i in $(seq 1 {rounds}); do p=$(pids); [ -z "$p" ] && break; sleep 0.1; done
for i in $(seq 1 50); do p=$(pids); [ -z "$p" ] && break; kill -KILL $p 2>/dev/null; sleep 0.02; done
echo killed
"#
    )
}

/// A session's state as its files say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The exit status as the shell saw it (128+N for signal N), once the command ended.
    pub code: Option<i32>,
    /// Both streams were flushed after the exit: nothing more will be written.
    pub done: bool,
    /// Killed by a cancel.
    pub cancelled: bool,
    /// Killed because its timeout passed.
    pub timed_out: bool,
    /// The command's wall time (guest clock), once it ended.
    pub duration_ms: Option<u64>,
}

/// What reading a stream at an offset found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Bytes from the offset.
    Data(Vec<u8>),
    /// The bytes from the offset up to `to` were not kept: go on there.
    Gap {
        /// The first offset kept after the gap.
        to: u64,
    },
    /// Nothing there yet.
    Nothing,
}

/// What reading a session needs of the guest's files: [`RemoteFs`] (SFTP), or a model in tests.
pub trait GuestFiles: Send + Sync {
    /// Up to `max` bytes of `path` from `offset`; `None` when it does not exist.
    fn read_at(
        &self,
        path: &str,
        offset: u64,
        max: usize,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, SshError>> + Send;
    /// Names and sizes of the regular files in `dir`; `None` when it does not exist.
    fn list(&self, dir: &str)
    -> impl std::future::Future<Output = Result<Option<Vec<(String, u64)>>, SshError>> + Send;
}

impl GuestFiles for RemoteFs {
    async fn read_at(&self, path: &str, offset: u64, max: usize) -> Result<Option<Vec<u8>>, SshError> {
        RemoteFs::read_at(self, path, offset, max).await
    }

    async fn list(&self, dir: &str) -> Result<Option<Vec<(String, u64)>>, SshError> {
        RemoteFs::list(self, dir).await
    }
}

/// Reads one session's files over an SFTP session.
pub struct SessionFiles<F: GuestFiles = RemoteFs> {
    fs: Arc<F>,
    dir: String,
    /// The session's meta file.
    pub meta: Meta,
}

impl SessionFiles<RemoteFs> {
    /// The ids of every session on the VM.
    pub async fn ids(fs: &RemoteFs) -> Result<Vec<String>, SshError> {
        let mut ids: Vec<String> =
            fs.dirs(ROOT).await?.unwrap_or_default().into_iter().filter(|i| valid_id(i)).collect();
        ids.sort();
        Ok(ids)
    }
}

impl<F: GuestFiles> SessionFiles<F> {
    /// The session `id`, or `None` when the lease's VM has no such session (or its meta file
    /// is not written yet).
    pub async fn open(fs: &Arc<F>, id: &str) -> Result<Option<SessionFiles<F>>, SshError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let dir = format!("{ROOT}/{id}");
        let Some(raw) = fs.read_at(&format!("{dir}/meta"), 0, 64 * 1024).await? else {
            return Ok(None);
        };
        let Ok(meta) = serde_json::from_slice::<Meta>(&raw) else {
            return Ok(None);
        };
        Ok(Some(SessionFiles { fs: fs.clone(), dir, meta }))
    }

    /// The session's state.
    pub async fn status(&self) -> Result<Status, SshError> {
        let files: Vec<String> =
            self.fs.list(&self.dir).await?.unwrap_or_default().into_iter().map(|(n, _)| n).collect();
        let has = |n: &str| files.iter().any(|f| f == n);
        let (mut code, mut duration_ms) = (None, None);
        if has("exit") {
            let raw = self.fs.read_at(&format!("{}/exit", self.dir), 0, 128).await?.unwrap_or_default();
            let words: Vec<u64> =
                String::from_utf8_lossy(&raw).split_whitespace().filter_map(|w| w.parse().ok()).collect();
            if let [rc, start, end] = words[..] {
                code = i32::try_from(rc).ok();
                duration_ms = Some(end.saturating_sub(start));
            }
        }
        Ok(Status { code, done: has("done"), cancelled: has("cancelled"), timed_out: has("timed_out"), duration_ms })
    }

    /// Up to `max` bytes of `stream` from `offset`.
    pub async fn read(&self, stream: Stream, offset: u64, max: usize) -> Result<Read, SshError> {
        let layout = self.meta.layout;
        let (seg, pos) = layout.locate(offset);
        let room = usize::try_from(layout.segment - pos).unwrap_or(usize::MAX).min(max);
        let path = format!("{}/{}/s{seg:08}", self.dir, stream.dir());
        match self.fs.read_at(&path, pos, room).await? {
            Some(data) if !data.is_empty() => Ok(Read::Data(data)),
            Some(_) => Ok(Read::Nothing),
            None => {
                let later = self.segments(stream).await?.into_iter().map(|(i, _)| i).filter(|i| *i > seg).min();
                Ok(match later {
                    Some(i) => Read::Gap { to: i.saturating_mul(layout.segment) },
                    None => Read::Nothing,
                })
            }
        }
    }

    /// The bytes written to `stream` so far (dropped ones included).
    pub async fn written(&self, stream: Stream) -> Result<u64, SshError> {
        let last = self.segments(stream).await?.into_iter().max_by_key(|(i, _)| *i);
        Ok(last.map(|(i, size)| i.saturating_mul(self.meta.layout.segment).saturating_add(size)).unwrap_or(0))
    }

    /// The segments of `stream` there are: index and size.
    async fn segments(&self, stream: Stream) -> Result<Vec<(u64, u64)>, SshError> {
        let files = self.fs.list(&format!("{}/{}", self.dir, stream.dir())).await?.unwrap_or_default();
        Ok(files.into_iter().filter_map(|(n, size)| Some((n.strip_prefix('s')?.parse().ok()?, size))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        for ok in ["run", "a.b_c-1", &"x".repeat(64)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"x".repeat(65), "a\nb"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_cap_is_cut_in_eighths() {
        let l = Layout::for_cap(8 << 20);
        assert_eq!(l.segment, 1 << 20);
        assert_eq!((l.head + l.keep) * l.segment, 8 << 20);
        assert_eq!(l.locate(3 * (1 << 20) + 5), (3, 5));
        assert_eq!(Layout::for_cap(10).segment, 4096);
    }

    #[test]
    fn the_launcher_refuses_bad_ids_and_keeps_text_verbatim() {
        let meta = |id: &str| Meta {
            id: id.into(),
            command: "c".into(),
            layout: Layout::for_cap(1 << 20),
            started_ms: 1,
            timeout_ms: 0,
            keep: true,
        };
        assert!(launch_script(&meta("../x"), "true", b"").is_err());
        let line = "echo 'it''s' \"$HOME\"";
        let s = launch_script(&meta("job-1"), line, b"\x00\x01").unwrap();
        assert!(s.contains(&quote::quote(line)), "{s}");
        assert!(s.contains("setsid -f bash"), "{s}");
        // The stdin bytes travel as base64.
        assert!(s.contains("printf '%s' AAE= | base64 -d"), "{s}");
    }

    #[test]
    fn the_kill_script_finds_processes_by_the_session_marker() {
        let s = kill_script("job-1", KillReason::TimedOut, 2000);
        assert!(s.contains("MPOOL_SESSION_DIR=$d") && s.contains("MPOOL_SESSION=job-1"), "{s}");
        assert!(s.contains("timed_out") && s.contains("seq 1 20"), "{s}");
    }

    /// The session scripts run by a local bash with `home` as `$HOME`, as a guest runs them.
    mod local {
        use super::*;
        use std::path::{Path, PathBuf};
        use std::process::{Command, Stdio};

        fn meta(id: &str) -> Meta {
            Meta {
                id: id.into(),
                command: String::new(),
                layout: Layout::for_cap(1 << 20),
                started_ms: 0,
                timeout_ms: 0,
                keep: true,
            }
        }

        /// `bash -s` with `script` on stdin, `home` as `$HOME` and `path_first` (when given)
        /// ahead of `$PATH`.
        fn bash(home: &Path, script: &str, path_first: Option<&Path>) -> std::process::Child {
            use std::io::Write;
            let mut cmd = Command::new("bash");
            cmd.arg("-s").env("HOME", home).stdin(Stdio::piped()).stdout(Stdio::piped());
            if let Some(dir) = path_first {
                cmd.env("PATH", format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default()));
            }
            let mut child = cmd.spawn().expect("bash runs (the session scripts need it)");
            child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
            child
        }

        fn output(child: std::process::Child) -> String {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        }

        /// Waits (bounded) until `path` exists.
        fn until_exists(path: &Path) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !path.exists() {
                assert!(std::time::Instant::now() < deadline, "{} never appeared", path.display());
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }

        /// Waits (bounded) until `path` holds a line; returns it.
        fn written(path: &Path) -> String {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                if text.ends_with('\n') {
                    return text.trim().to_string();
                }
                assert!(std::time::Instant::now() < deadline, "{} was never written", path.display());
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }

        /// Whether process `pid` runs (a zombie does not).
        fn alive(pid: &str) -> bool {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        }

        fn dir(home: &Path, id: &str) -> PathBuf {
            home.join(ROOT).join(id)
        }

        /// Launches session `id` running `line` with a `setsid` that starts nothing: the
        /// session exists, its runner has not started. Returns its directory.
        fn launched_not_started(home: &Path, id: &str, line: &str) -> PathBuf {
            let stubs = tempfile::tempdir().unwrap();
            let stub = stubs.path().join("setsid");
            std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
            let mut perm = std::fs::metadata(&stub).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            std::fs::set_permissions(&stub, perm).unwrap();
            let launch = launch_script(&meta(id), line, b"").unwrap();
            assert_eq!(output(bash(home, &launch, Some(stubs.path()))).trim(), "started");
            let d = dir(home, id);
            assert!(!d.join("exit").exists());
            d
        }

        /// Runs the session's runner in the foreground.
        fn run_runner(home: &Path, d: &Path) {
            let runner = Command::new("bash").arg(d.join("run")).env("HOME", home).status().unwrap();
            assert!(runner.success());
        }

        #[test]
        fn a_cancel_before_the_command_started_keeps_it_from_starting() {
            let home = tempfile::tempdir().unwrap();
            let d = launched_not_started(home.path(), "early", "touch ran");
            // The cancel claims the session before its runner: done at once...
            let kill = bash(home.path(), &kill_script("early", KillReason::Cancelled, 200), None);
            assert_eq!(output(kill).trim(), "killed");
            assert!(d.join("cancelled").exists());
            // ...and the runner, starting now, never runs the command.
            run_runner(home.path(), &d);
            assert!(!home.path().join("ran").exists(), "the cancelled command ran");
            let exit = std::fs::read_to_string(d.join("exit")).unwrap();
            assert!(exit.starts_with("143 "), "{exit}");
            assert!(d.join("done").exists());
        }

        #[test]
        fn a_cancel_that_finds_the_command_claimed_but_gone_says_ended_and_marks_nothing() {
            let home = tempfile::tempdir().unwrap();
            let d = launched_not_started(home.path(), "quick", "exit 3");
            // The runner claimed the command and it ended; its `exit` is not written yet.
            std::fs::create_dir(d.join("claim")).unwrap();
            let kill = bash(home.path(), &kill_script("quick", KillReason::Cancelled, 200), None);
            std::fs::write(d.join("exit"), "3 1 2\n").unwrap();
            assert_eq!(output(kill).trim(), "ended", "it finished on its own");
            assert!(!d.join("cancelled").exists(), "a command that finished on its own is not marked cancelled");
        }

        #[test]
        fn a_cancel_kills_a_running_command_and_what_it_left_in_the_background() {
            let home = tempfile::tempdir().unwrap();
            let line = "setsid sleep 1000 & echo $! > bg; echo $$ > fg; sleep 1000";
            let launch = launch_script(&meta("busy"), line, b"").unwrap();
            assert_eq!(output(bash(home.path(), &launch, None)).trim(), "started");
            let (bg, fg) = (written(&home.path().join("bg")), written(&home.path().join("fg")));
            let kill = bash(home.path(), &kill_script("busy", KillReason::Cancelled, 200), None);
            assert_eq!(output(kill), "signalled\nkilled\n");
            let d = dir(home.path(), "busy");
            until_exists(&d.join("done"));
            for p in [bg, fg] {
                assert!(!alive(&p), "process {p} of the session is still there");
            }
            let exit = std::fs::read_to_string(d.join("exit")).unwrap();
            assert!(exit.starts_with("143 "), "{exit}");
            assert!(d.join("cancelled").exists());
            // A second cancel finds nothing left to kill.
            let again = bash(home.path(), &kill_script("busy", KillReason::Cancelled, 200), None);
            assert_eq!(output(again).trim(), "ended");
        }
    }

    /// The guest's files as a map, for the reader's property test.
    #[derive(Default)]
    struct MemFs(std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>);

    impl GuestFiles for MemFs {
        async fn read_at(&self, path: &str, offset: u64, max: usize) -> Result<Option<Vec<u8>>, SshError> {
            let files = self.0.lock().unwrap();
            Ok(files.get(path).map(|data| {
                let from = usize::try_from(offset).unwrap().min(data.len());
                data[from..(from + max).min(data.len())].to_vec()
            }))
        }

        async fn list(&self, dir: &str) -> Result<Option<Vec<(String, u64)>>, SshError> {
            let files = self.0.lock().unwrap();
            let prefix = format!("{dir}/");
            Ok(Some(
                files
                    .iter()
                    .filter_map(|(p, d)| Some((p.strip_prefix(&prefix)?.to_string(), d.len() as u64)))
                    .filter(|(n, _)| !n.contains('/'))
                    .collect(),
            ))
        }
    }

    /// The stream writer as the runner's `split --filter` behaves: bytes fill segment after
    /// segment; when segment n is complete, segment n-keep is deleted unless it is in the head.
    fn write(fs: &MemFs, layout: Layout, written: &mut Vec<u8>, data: &[u8]) {
        let mut files = fs.0.lock().unwrap();
        for b in data {
            let (seg, _) = layout.locate(written.len() as u64);
            files.entry(format!("{ROOT}/p/out/s{seg:08}")).or_default().push(*b);
            written.push(*b);
            if (written.len() as u64).is_multiple_of(layout.segment)
                && let Some(k) = seg.checked_sub(layout.keep).filter(|k| *k >= layout.head)
            {
                files.remove(&format!("{ROOT}/p/out/s{k:08}"));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

        /// Whatever the interleaving of writes and reads: every byte read is the byte written at
        /// that offset, a gap never covers the head, only skips bytes that were deleted, and the
        /// reader ends at the stream's end with read + dropped = written.
        #[test]
        fn a_reader_gets_every_kept_byte_and_accounts_for_the_rest(
            steps in proptest::collection::vec((0usize..40, 1usize..30), 1..60),
            segment in 4u64..12,
        ) {
            let layout = Layout { segment, head: 2, keep: 2 };
            let fs = Arc::new(MemFs::default());
            let meta = Meta { id: "p".into(), command: String::new(), layout, started_ms: 0, timeout_ms: 0, keep: true };
            fs.0.lock().unwrap().insert(format!("{ROOT}/p/meta"), serde_json::to_vec(&meta).unwrap());
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let files = SessionFiles::open(&fs, "p").await.unwrap().unwrap();
                let (mut written, mut off, mut got, mut dropped) = (Vec::new(), 0u64, 0u64, 0u64);
                let mut n = 0u8;
                let read_once = |off: &mut u64, got: &mut u64, dropped: &mut u64, written: &[u8], r: Read| -> bool {
                    match r {
                        Read::Nothing => false,
                        Read::Data(bytes) => {
                            let at = usize::try_from(*off).unwrap();
                            assert_eq!(&written[at..at + bytes.len()], &bytes[..], "bytes at offset {at}");
                            *off += bytes.len() as u64;
                            *got += bytes.len() as u64;
                            true
                        }
                        Read::Gap { to } => {
                            assert!(to > *off, "a gap moves forward: {} -> {to}", *off);
                            let exists = |k: u64| fs.0.lock().unwrap().contains_key(&format!("{ROOT}/p/out/s{k:08}"));
                            assert!(
                                (*off / layout.segment..to.div_ceil(layout.segment)).all(|k| !exists(k)),
                                "a gap only skips deleted segments: {} -> {to}", *off
                            );
                            assert!(to.is_multiple_of(layout.segment) && exists(to / layout.segment), "a gap ends at a kept segment's start: {to}");
                            assert!(*off >= layout.head * layout.segment, "the head is never dropped: gap at {}", *off);
                            *dropped += to - *off;
                            *off = to;
                            true
                        }
                    }
                };
                for (write_len, read_len) in steps {
                    let data: Vec<u8> = (0..write_len).map(|_| { n = n.wrapping_add(1); n }).collect();
                    write(&fs, layout, &mut written, &data);
                    let r = files.read(Stream::Out, off, read_len).await.unwrap();
                    read_once(&mut off, &mut got, &mut dropped, &written, r);
                }
                loop {
                    let r = files.read(Stream::Out, off, 7).await.unwrap();
                    if !read_once(&mut off, &mut got, &mut dropped, &written, r) {
                        break;
                    }
                }
                assert_eq!(off, written.len() as u64, "the reader ends at the end");
                assert_eq!(got + dropped, written.len() as u64);
                assert_eq!(files.written(Stream::Out).await.unwrap(), written.len() as u64);
                // What the guest keeps is bounded by the layout.
                let kept: usize = fs.0.lock().unwrap().iter().filter(|(p, _)| p.contains("/out/")).map(|(_, d)| d.len()).sum();
                assert!(kept as u64 <= (layout.head + layout.keep + 1) * layout.segment, "{kept} bytes kept");
            });
        }
    }
}
