//! A real OpenSSH `sshd` on 127.0.0.1 for the exec benchmark (the reusable part of the test
//! suite's `tests/common/sshd.rs`, returning errors instead of panicking).
//!
//! It generates an ed25519 host key and an RSA client key with `ssh-keygen` in a temp dir,
//! writes an `sshd_config` for a free port that only lets the current user in by key, starts
//! `/usr/sbin/sshd -D -e` and waits until it listens. Sessions get an empty private `HOME`, so
//! the account's dotfiles (which can cost 100+ ms per command) do not distort the figures; a
//! fresh Ubuntu VM's `.bashrc` returns at once for non-interactive shells, which this
//! reproduces. Dropping it stops the listener.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mpool_ssh::SshTarget;

/// Where sshd is expected.
pub const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd.
pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    client_key: String,
    child: Option<Child>,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn keygen(dir: &Path, name: &str, kind: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", name, "-f"]).arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048", "-m", "PEM"]);
    }
    run(&mut cmd)?;
    Ok(path)
}

/// Why OpenSSH cannot be used here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!("{SSHD} is missing (apt-get install openssh-server)"));
    }
    if Command::new("ssh-keygen").arg("-?").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        return Some("ssh-keygen is missing (apt-get install openssh-client)".into());
    }
    None
}

impl Sshd {
    /// Starts an sshd on a free loopback port.
    pub fn start() -> Result<Sshd, String> {
        let dir = tempfile::Builder::new().prefix("mpool-bench-sshd-").tempdir().map_err(|e| e.to_string())?;
        let user = run(Command::new("id").arg("-un"))?;
        let key = keygen(dir.path(), "client_rsa", "rsa")?;
        let client_key = std::fs::read_to_string(&key).map_err(|e| e.to_string())?;
        std::fs::copy(key.with_extension("pub"), dir.path().join("authorized_keys")).map_err(|e| e.to_string())?;
        keygen(dir.path(), "host_ed25519", "ed25519")?;
        std::fs::create_dir_all(dir.path().join("home")).map_err(|e| e.to_string())?;
        if run(Command::new("id").arg("-u"))? == "0" && !Path::new("/run/sshd").exists() {
            std::fs::create_dir_all("/run/sshd").map_err(|e| format!("/run/sshd: {e}"))?;
        }
        let mut s = Sshd { dir, port: 0, user, client_key, child: None };
        for _ in 0..5 {
            s.port = super::stack::free_port()?;
            if s.launch()? {
                return Ok(s);
            }
        }
        Err(format!("sshd did not start; log:\n{}", s.log()))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sshd.log")
    }

    /// sshd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn launch(&mut self) -> Result<bool, String> {
        let dir = self.dir.path();
        let sftp = if Path::new("/usr/lib/openssh/sftp-server").exists() {
            "/usr/lib/openssh/sftp-server"
        } else {
            "internal-sftp"
        };
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {dir}/host_ed25519\nAuthorizedKeysFile {dir}/authorized_keys\n\
             StrictModes no\nUsePAM no\nPidFile none\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nLogLevel INFO\nAllowUsers {user}\nSubsystem sftp {sftp}\nSetEnv HOME={dir}/home\n",
            port = self.port,
            dir = dir.display(),
            user = self.user,
        );
        let cfg = dir.join("sshd_config");
        std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).map_err(|e| e.to_string())?;
        let before = self.log().len();
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{SSHD}: {e}"))?;
        let ready = format!("Server listening on 127.0.0.1 port {}.", self.port);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.log().get(before..).is_some_and(|new| new.contains(&ready)) {
                self.child = Some(child);
                return Ok(true);
            }
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(false);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("sshd did not listen within 15 s; log:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The login user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Authorizes a public key (an `authorized_keys` line).
    pub fn authorize_public(&self, line: &str) -> Result<(), String> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .map_err(|e| e.to_string())?;
        f.write_all(format!("{}\n", line.trim()).as_bytes()).map_err(|e| e.to_string())
    }

    /// The current user with the authorized RSA key.
    pub fn target(&self) -> SshTarget {
        SshTarget {
            host: "127.0.0.1".into(),
            port: self.port,
            username: self.user.clone(),
            private_key: self.client_key.clone(),
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
