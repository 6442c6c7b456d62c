//! A real OpenSSH `sshd` on 127.0.0.1 for tests and benchmarks.
//!
//! [`Sshd::start`] generates an ed25519 host key and an RSA client key (PEM) with `ssh-keygen`
//! in a temp dir, writes an `sshd_config` for a free port that only lets the current user in
//! with that key, starts `/usr/sbin/sshd -D -e` (log in `sshd.log`) and waits until it listens.
//! Dropping it kills the listener. [`Sshd::connections`] counts server-side connections from the
//! log. Panics on setup failures (test code).
//!
//! Sessions get an empty private `HOME` (`SetEnv HOME=...`): bash sources `~/.bashrc` for
//! commands run over SSH, and a developer's or CI account's dotfiles (pyenv init and the like
//! can cost 100+ ms per command) would distort tests and the benchmark. A fresh Ubuntu VM's
//! `.bashrc` returns at once for non-interactive shells, which this reproduces.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mpool_ssh::SshTarget;

const SSHD: &str = "/usr/sbin/sshd";
/// The external sftp-server, as on Ubuntu guests; `internal-sftp` where it is missing.
fn sftp_server() -> &'static str {
    const EXTERNAL: &str = "/usr/lib/openssh/sftp-server";
    if Path::new(EXTERNAL).exists() { EXTERNAL } else { "internal-sftp" }
}

/// A running sshd and its files.
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    user: String,
    client_key: String,
    host_key_serial: u32,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local addr").port()
}

/// Runs `ssh-keygen` for a new unencrypted key; returns the private key path.
fn keygen(dir: &Path, name: &str, kind: &str, format: Option<&str>) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", name, "-f"]).arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    if let Some(format) = format {
        cmd.args(["-m", format]);
    }
    run(&mut cmd);
    path
}

impl Sshd {
    /// Starts an sshd on a free port.
    pub fn start() -> Sshd {
        let dir = tempfile::Builder::new().prefix("mpool-sshd-").tempdir().expect("temp dir");
        let user = run(Command::new("id").arg("-un"));
        let key_path = keygen(dir.path(), "client_rsa", "rsa", Some("PEM"));
        let client_key = fs::read_to_string(&key_path).expect("reading client key");
        fs::copy(key_path.with_extension("pub"), dir.path().join("authorized_keys")).expect("writing authorized_keys");
        let mut sshd = Sshd { dir, port: 0, child: None, user, client_key, host_key_serial: 0 };
        // A free port can be taken between probing and binding; try a few.
        for _ in 0..5 {
            sshd.port = free_port();
            sshd.new_host_key();
            if sshd.launch() {
                return sshd;
            }
        }
        panic!("sshd did not start; log:\n{}", sshd.log());
    }

    fn new_host_key(&mut self) {
        self.host_key_serial += 1;
        keygen(self.dir.path(), &format!("host_ed25519_{}", self.host_key_serial), "ed25519", None);
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("sshd_config")
    }

    /// The log file (sshd's stderr, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// Writes the config and starts sshd; false if it could not listen.
    fn launch(&mut self) -> bool {
        let dir = self.dir.path();
        let config = format!(
            "ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {dir}/host_ed25519_{serial}\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             StrictModes no\n\
             UsePAM no\n\
             PidFile none\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             LogLevel VERBOSE\n\
             AllowUsers {user}\n\
             Subsystem sftp {sftp}\n\
             SetEnv HOME={dir}/home\n",
            port = self.port,
            dir = dir.display(),
            serial = self.host_key_serial,
            user = self.user,
            sftp = sftp_server(),
        );
        fs::write(self.config_path(), config).expect("writing sshd_config");
        fs::create_dir_all(dir.join("home")).expect("creating the session HOME");
        if run(Command::new("id").arg("-u")) == "0" && !Path::new("/run/sshd").exists() {
            fs::create_dir_all("/run/sshd").expect("creating /run/sshd");
        }
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("opening sshd log");
        let log_len = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0) as usize;
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning /usr/sbin/sshd");
        // Wait for "Server listening" (not by connecting: that would count as a connection).
        let ready = format!("Server listening on 127.0.0.1 port {}.", self.port);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log();
            if log.get(log_len..).is_some_and(|new| new.contains(&ready)) {
                self.child = Some(child);
                return true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sshd did not report listening within 15 s; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts the listener on the same port with a freshly generated host key. Connections
    /// made before keep running (their sshd processes are separate).
    pub fn restart_with_new_host_key(&mut self) {
        self.stop();
        self.new_host_key();
        assert!(self.launch(), "sshd did not restart on port {}; log:\n{}", self.port, self.log());
    }

    /// Generates another client key and authorizes it; returns the private key text.
    /// `kind`: `rsa` or `ed25519`; `format`: `None` (OpenSSH), `Some("PEM")`, `Some("PKCS8")`.
    pub fn authorize_new_key(&self, kind: &str, format: Option<&str>) -> String {
        let name = format!("client_{kind}_{}", format.unwrap_or("openssh").to_lowercase());
        let path = keygen(self.dir.path(), &name, kind, format);
        let public = fs::read_to_string(path.with_extension("pub")).expect("reading public key");
        let mut keys = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .expect("opening authorized_keys");
        keys.write_all(public.as_bytes()).expect("appending to authorized_keys");
        fs::read_to_string(path).expect("reading private key")
    }

    /// Authorizes a public key given as an `authorized_keys` line.
    pub fn authorize_public(&self, line: &str) {
        let mut keys = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .expect("opening authorized_keys");
        keys.write_all(format!("{}\n", line.trim()).as_bytes()).expect("appending to authorized_keys");
    }

    /// Generates a client key that is NOT authorized; returns the private key text.
    pub fn unauthorized_key(&self) -> String {
        let path = keygen(self.dir.path(), "stranger_ed25519", "ed25519", None);
        fs::read_to_string(path).expect("reading private key")
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The login user (the current user).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The authorized RSA client key, PEM (PKCS#1) text.
    pub fn client_key(&self) -> &str {
        &self.client_key
    }

    /// A scratch directory (absolute) inside the temp dir; the "remote" side can use it too,
    /// as the server runs on this machine.
    pub fn scratch_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("scratch");
        fs::create_dir_all(&dir).expect("creating scratch dir");
        dir
    }

    /// Target for the current user with the RSA key.
    pub fn target(&self) -> SshTarget {
        SshTarget {
            host: "127.0.0.1".into(),
            port: self.port,
            username: self.user.clone(),
            private_key: self.client_key.clone(),
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// TCP connections the server accepted so far ("Connection from" lines, logged before the
    /// server's SSH banner, so a connection that finished its handshake is always counted).
    pub fn connections(&self) -> usize {
        count_connections(&self.log_path())
    }

    /// Successful logins so far ("Accepted publickey" lines).
    pub fn accepted_logins(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// A thread-safe closure returning [`Sshd::connections`].
    pub fn connection_counter(&self) -> Arc<dyn Fn() -> usize + Send + Sync> {
        let path = self.log_path();
        Arc::new(move || count_connections(&path))
    }
}

fn count_connections(log: &Path) -> usize {
    fs::read_to_string(log).unwrap_or_default().matches("Connection from").count()
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}
