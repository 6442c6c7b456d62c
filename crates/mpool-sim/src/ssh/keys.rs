//! The key material of the simulator's SSH side: the client key `ssh_info` hands out (one for
//! every instance, as with multipassd), the endpoints' shared host key, and each instance's
//! own host key, loaded from or generated into the state directory (mode 0600, written
//! atomically).
//!
//! It only reads, makes and writes keys (blocking file I/O and key generation: callers keep
//! it off the async threads); it must not serve connections or decide who may log in beyond
//! saying whether a public key is the client key.

use std::fmt;
use std::fs::{OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData, RsaKeypair};
use russh::keys::ssh_key::rand_core::{TryCryptoRng, TryRng};
use russh::keys::{PrivateKey, PublicKey};
use tracing::info;

/// Key material of the simulator's SSH side, persisted under a directory.
pub struct SshKeys {
    client_text: String,
    client_public: PublicKey,
    client_public_line: String,
    host_key: PrivateKey,
}

impl fmt::Debug for SshKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshKeys")
            .field("client_public", &self.client_public_line)
            .field("host_key", &self.host_key.public_key().algorithm())
            .finish_non_exhaustive()
    }
}

impl SshKeys {
    /// Loads or creates `<dir>/ssh-keys/id_rsa` (RSA 2048 client key; file mode 0600; the text
    /// clients receive in ssh_info) and `<dir>/ssh-keys/ssh_host_ed25519_key` (the endpoints'
    /// host key).
    ///
    /// An existing key file is used as it is (PEM or OpenSSH text); a missing one is generated
    /// (OpenSSH text) and written atomically with mode 0600. This blocks (file I/O, RSA key
    /// generation): call it before starting the runtime or via `spawn_blocking`.
    pub fn load_or_create(dir: &Path) -> io::Result<SshKeys> {
        let keys_dir = dir.join("ssh-keys");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&keys_dir)?;
        let (client_text, client_key) = load_or_generate(&keys_dir.join("id_rsa"), || {
            let pair = RsaKeypair::random(&mut KeyRng(rand::rng()), 2048).map_err(invalid_data)?;
            PrivateKey::new(KeypairData::from(pair), "mpool-sim").map_err(invalid_data)
        })?;
        let (_, host_key) = load_or_generate(&keys_dir.join("ssh_host_ed25519_key"), || {
            let pair = Ed25519Keypair::random(&mut KeyRng(rand::rng()));
            PrivateKey::new(KeypairData::from(pair), "mpool-sim-host").map_err(invalid_data)
        })?;
        let client_public = client_key.public_key().clone();
        let client_public_line = client_public.to_openssh().map_err(invalid_data)?;
        Ok(SshKeys { client_text, client_public, client_public_line, host_key })
    }

    /// The client private key file's verbatim text (what SSHInfo.priv_key_base64 carries).
    pub fn client_key_text(&self) -> &str {
        &self.client_text
    }

    /// The client public key in OpenSSH `authorized_keys` form (so tests can let a real sshd
    /// accept it).
    pub fn client_public_openssh(&self) -> String {
        self.client_public_line.clone()
    }

    /// Whether `key` is the client key.
    pub(super) fn is_client_key(&self, key: &PublicKey) -> bool {
        key.key_data() == self.client_public.key_data()
    }

    /// The host key every endpoint started without one of its own presents.
    pub(super) fn host_key(&self) -> &PrivateKey {
        &self.host_key
    }
}

/// Loads the Ed25519 host key at `path`, or generates one there (mode 0600): an instance's
/// own SSH host key, as a guest makes at its first boot. Blocks (file I/O).
pub(crate) fn instance_host_key(path: &Path) -> io::Result<PrivateKey> {
    let (_, key) = load_or_generate(path, || {
        let pair = Ed25519Keypair::random(&mut KeyRng(rand::rng()));
        PrivateKey::new(KeypairData::from(pair), "mpool-sim-instance").map_err(invalid_data)
    })?;
    Ok(key)
}

/// Adapts rand 0.9's thread RNG (a CSPRNG) to the rand_core 0.10 traits ssh-key wants.
struct KeyRng(rand::rngs::ThreadRng);

impl TryRng for KeyRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(rand::RngCore::next_u32(&mut self.0))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(rand::RngCore::next_u64(&mut self.0))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand::RngCore::fill_bytes(&mut self.0, dst);
        Ok(())
    }
}

impl TryCryptoRng for KeyRng {}

fn invalid_data(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads the private key at `path`, or generates one and writes it there (mode 0600).
fn load_or_generate(
    path: &Path,
    generate: impl FnOnce() -> io::Result<PrivateKey>,
) -> io::Result<(String, PrivateKey)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = russh::keys::decode_secret_key(&text, None)
                .map_err(|e| invalid_data(format!("{}: {e}", path.display())))?;
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode != 0o600 {
                std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
            }
            Ok((text, key))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = generate()?;
            let text = key.to_openssh(LineEnding::LF).map_err(invalid_data)?.to_string();
            write_private_file(path, &text)?;
            info!(path = %path.display(), "generated simulator ssh key");
            Ok((text, key))
        }
        Err(e) => Err(e),
    }
}

/// Writes `text` to `path` atomically (temporary file + rename) with mode 0600.
fn write_private_file(path: &Path, text: &str) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.set_permissions(Permissions::from_mode(0o600))?;
        io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SshKeys::load_or_create(dir.path()).unwrap();
        let id_rsa = dir.path().join("ssh-keys/id_rsa");
        let host = dir.path().join("ssh-keys/ssh_host_ed25519_key");
        assert_eq!(std::fs::read_to_string(&id_rsa).unwrap(), keys.client_key_text());
        for path in [&id_rsa, &host] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let key = russh::keys::decode_secret_key(keys.client_key_text(), None).unwrap();
        assert!(matches!(key.algorithm(), russh::keys::Algorithm::Rsa { .. }));
        assert!(keys.client_public_openssh().starts_with("ssh-rsa "));
        assert_eq!(keys.host_key.public_key().algorithm(), russh::keys::Algorithm::Ed25519);

        let again = SshKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(again.client_key_text(), keys.client_key_text());
        assert_eq!(again.client_public_openssh(), keys.client_public_openssh());
        assert_eq!(again.host_key.public_key().key_data(), keys.host_key.public_key().key_data());
    }

    #[test]
    fn corrupt_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("ssh-keys")).unwrap();
        std::fs::write(dir.path().join("ssh-keys/id_rsa"), "garbage").unwrap();
        let err = SshKeys::load_or_create(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
