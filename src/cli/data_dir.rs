//! Where mpool keeps its own files (its client certificate and key for multipassd): `--data-dir`
//! or `MPOOL_DATA_DIR`, else `$XDG_DATA_HOME/mpool`, else `~/.local/share/mpool`.

use std::path::PathBuf;

/// mpool's data dir: the flag/env, else `$XDG_DATA_HOME/mpool`, else `~/.local/share/mpool`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d;
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("mpool");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/mpool")
}
