//! A real OpenSSH `sshd` on 127.0.0.1, for the tests (`tests/ssh.rs`) and `mpool bench exec`.
//!
//! [`Sshd::start`] generates an ed25519 host key and an RSA client key (PEM) with `ssh-keygen`
//! in a temp dir, writes an `sshd_config` for a free port that only lets the current user in
//! with that key, starts `/usr/sbin/sshd -D -e` (log in `sshd.log`) and waits until it listens.
//! Dropping it kills the listener. [`Sshd::connections`] counts server-side connections from the
//! log (which takes `LogLevel VERBOSE`, the default of [`SshdOptions`]).
//!
//! Sessions get an empty private `HOME` (`SetEnv HOME=...`): bash sources `~/.bashrc` for
//! commands run over SSH, and a developer's or CI account's dotfiles (pyenv init and the like
//! can cost 100+ ms per command) would distort tests and the benchmark. A fresh Ubuntu VM's
//! `.bashrc` returns at once for non-interactive shells, which this reproduces. SFTP starts in
//! that home too (`sftp-server -d`), as it starts in the login's home on a VM: relative paths
//! mean the same file to a command and to SFTP.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mpool_core::types::SshEndpoint;

use crate::{Error, Result, free_port, wait};

/// Where sshd is expected.
pub const SSHD: &str = "/usr/sbin/sshd";

/// The external sftp-server, as on Ubuntu guests; `internal-sftp` where it is missing.
fn sftp_server() -> &'static str {
    const EXTERNAL: &str = "/usr/lib/openssh/sftp-server";
    if Path::new(EXTERNAL).exists() { EXTERNAL } else { "internal-sftp" }
}

/// Why OpenSSH cannot be used here, if it cannot (`None`: it can).
pub fn unavailable() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!("{SSHD} is missing (apt-get install openssh-server)"));
    }
    if Command::new("ssh-keygen").arg("-?").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        return Some("ssh-keygen is missing (apt-get install openssh-client)".into());
    }
    None
}

/// How an [`Sshd`] is started.
#[derive(Clone, Debug)]
pub struct SshdOptions {
    /// sshd's `LogLevel`: `VERBOSE` (default) logs the "Connection from" lines
    /// [`Sshd::connections`] counts; the exec benchmark uses `INFO`.
    pub log_level: String,
}

impl Default for SshdOptions {
    fn default() -> SshdOptions {
        SshdOptions { log_level: "VERBOSE".into() }
    }
}

/// A running sshd and its files.
pub struct Sshd {
    dir: tempfile::TempDir,
    options: SshdOptions,
    port: u16,
    child: Option<Child>,
    user: String,
    client_key: String,
    host_key_serial: u32,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| Error::new(format!("running {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::new(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs `ssh-keygen` for a new unencrypted key; returns the private key path.
fn keygen(dir: &Path, name: &str, kind: &str, format: Option<&str>) -> Result<PathBuf> {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", name, "-f"]).arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    if let Some(format) = format {
        cmd.args(["-m", format]);
    }
    run(&mut cmd)?;
    Ok(path)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::new(format!("reading {}: {e}", path.display())))
}

impl Sshd {
    /// Starts an sshd on a free port with the default options.
    pub fn start() -> Result<Sshd> {
        Sshd::start_with(SshdOptions::default())
    }

    /// Starts an sshd on a free port.
    pub fn start_with(options: SshdOptions) -> Result<Sshd> {
        let dir = tempfile::Builder::new().prefix("mpool-sshd-").tempdir()?;
        let user = run(Command::new("id").arg("-un"))?;
        let key_path = keygen(dir.path(), "client_rsa", "rsa", Some("PEM"))?;
        let client_key = read(&key_path)?;
        fs::copy(key_path.with_extension("pub"), dir.path().join("authorized_keys"))
            .map_err(|e| Error::new(format!("writing authorized_keys: {e}")))?;
        fs::create_dir_all(dir.path().join("home"))?;
        fs::create_dir_all(dir.path().join("scratch"))?;
        if run(Command::new("id").arg("-u"))? == "0" && !Path::new("/run/sshd").exists() {
            fs::create_dir_all("/run/sshd").map_err(|e| Error::new(format!("creating /run/sshd: {e}")))?;
        }
        let mut sshd = Sshd { dir, options, port: 0, child: None, user, client_key, host_key_serial: 0 };
        // A free port can be taken between probing and binding; try a few.
        for _ in 0..5 {
            sshd.port = free_port()?;
            sshd.new_host_key()?;
            if sshd.launch()? {
                return Ok(sshd);
            }
        }
        Err(Error::new(format!("sshd did not start; log:\n{}", sshd.log())))
    }

    fn new_host_key(&mut self) -> Result<()> {
        self.host_key_serial += 1;
        keygen(self.dir.path(), &format!("host_ed25519_{}", self.host_key_serial), "ed25519", None)?;
        Ok(())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("sshd_config")
    }

    /// The log file (sshd's stderr, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// Writes the config and starts sshd; `Ok(false)` if it exited (its port was taken).
    fn launch(&mut self) -> Result<bool> {
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
             LogLevel {level}\n\
             AllowUsers {user}\n\
             Subsystem sftp {sftp} -d {dir}/home\n\
             SetEnv HOME={dir}/home\n",
            port = self.port,
            dir = dir.display(),
            serial = self.host_key_serial,
            level = self.options.log_level,
            user = self.user,
            sftp = sftp_server(),
        );
        fs::write(self.config_path(), config).map_err(|e| Error::new(format!("writing sshd_config: {e}")))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| Error::new(format!("opening the sshd log: {e}")))?;
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
            .map_err(|e| Error::new(format!("spawning {SSHD}: {e}")))?;
        // Wait for "Server listening" (not by connecting: that would count as a connection).
        let ready = format!("Server listening on 127.0.0.1 port {}.", self.port);
        let listening =
            wait(format!("sshd listens on port {}", self.port), Duration::from_secs(15)).until_blocking(|| {
                if self.log().get(log_len..).is_some_and(|new| new.contains(&ready)) {
                    return Some(true);
                }
                matches!(child.try_wait(), Ok(Some(_))).then_some(false)
            });
        match listening {
            Ok(true) => {
                self.child = Some(child);
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("log:\n{}\n", self.log())))
            }
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
    pub fn restart_with_new_host_key(&mut self) -> Result<()> {
        self.stop();
        self.new_host_key()?;
        if self.launch()? {
            Ok(())
        } else {
            Err(Error::new(format!("sshd did not restart on port {}; log:\n{}", self.port, self.log())))
        }
    }

    fn append_authorized(&self, line: &str) -> Result<()> {
        let mut keys = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .map_err(|e| Error::new(format!("opening authorized_keys: {e}")))?;
        keys.write_all(format!("{}\n", line.trim()).as_bytes())
            .map_err(|e| Error::new(format!("appending to authorized_keys: {e}")))
    }

    /// Generates another client key and authorizes it; returns the private key text.
    /// `kind`: `rsa` or `ed25519`; `format`: `None` (OpenSSH), `Some("PEM")`, `Some("PKCS8")`.
    pub fn authorize_new_key(&self, kind: &str, format: Option<&str>) -> Result<String> {
        let name = format!("client_{kind}_{}", format.unwrap_or("openssh").to_lowercase());
        let path = keygen(self.dir.path(), &name, kind, format)?;
        self.append_authorized(&read(&path.with_extension("pub"))?)?;
        read(&path)
    }

    /// Authorizes a public key given as an `authorized_keys` line.
    pub fn authorize_public(&self, line: &str) -> Result<()> {
        self.append_authorized(line)
    }

    /// Authorizes the client key of the simulator whose state dir is `state_dir` (the key its
    /// `ssh_info` hands out), creating the key if the simulator has not yet: with the
    /// simulator's `ssh_target` pointing here, its "VMs" are this server.
    pub fn authorize_sim_key(&self, state_dir: &Path) -> Result<()> {
        let keys = mpool_sim::ssh::SshKeys::load_or_create(state_dir)
            .map_err(|e| Error::new(format!("the simulator's SSH keys in {}: {e}", state_dir.display())))?;
        self.authorize_public(&keys.client_public_openssh())
    }

    /// Generates a client key that is NOT authorized; returns the private key text.
    pub fn unauthorized_key(&self) -> Result<String> {
        read(&keygen(self.dir.path(), "stranger_ed25519", "ed25519", None)?)
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
        self.dir.path().join("scratch")
    }

    /// Where to log in: the current user with the RSA key.
    pub fn target(&self) -> SshEndpoint {
        SshEndpoint {
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
