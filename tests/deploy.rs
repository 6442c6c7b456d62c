//! `deploy/`: the systemd unit has the directives the install relies on (dedicated user,
//! hardening, state and runtime directories, the serve command) and agrees with the example
//! config on where things live; the example config loads; the isolation unit runs as root after
//! multipassd, applies the rules and undoes them on stop. (`systemd-analyze verify` needs
//! systemd, which CI does not run; this is a static check.)
use std::collections::HashMap;
use std::path::Path;

fn unit() -> HashMap<String, Vec<String>> {
    unit_file("deploy/mpool.service")
}

fn unit_file(path: &str) -> HashMap<String, Vec<String>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).expect(path);
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_string();
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {line:?}"));
        keys.entry(format!("{section}.{k}")).or_default().push(v.to_string());
    }
    keys
}

#[test]
fn the_isolation_unit_applies_the_rules_as_root_after_multipassd_and_undoes_them_on_stop() {
    let u = unit_file("deploy/mpool-isolation.service");
    let one = |k: &str| -> &str {
        let v = u.get(k).unwrap_or_else(|| panic!("{k} is missing"));
        assert_eq!(v.len(), 1, "{k} set once: {v:?}");
        &v[0]
    };
    assert!(!u.contains_key("Service.User"), "nft needs root");
    assert_eq!(one("Service.Type"), "oneshot");
    assert_eq!(one("Service.RemainAfterExit"), "yes");
    assert!(one("Unit.After").split_whitespace().any(|x| x == "snap.multipass.multipassd.service"));
    assert_eq!(
        one("Service.ExecStart"),
        "/bin/bash -o pipefail -c '/usr/local/bin/mpool isolation rules --config /etc/mpool/mpool.toml | /usr/sbin/nft -f -'"
    );
    assert_eq!(
        one("Service.ExecStop"),
        "/bin/bash -o pipefail -c '/usr/local/bin/mpool isolation rules --undo | /usr/sbin/nft -f -'"
    );
    assert_eq!(one("Install.WantedBy"), "multi-user.target");
}

#[test]
fn the_unit_runs_mpool_serve_as_a_hardened_dedicated_user() {
    let u = unit();
    let one = |k: &str| -> &str {
        let v = u.get(k).unwrap_or_else(|| panic!("{k} is missing"));
        assert_eq!(v.len(), 1, "{k} set once: {v:?}");
        &v[0]
    };
    assert_eq!(one("Service.ExecStart"), "/usr/local/bin/mpool serve --config /etc/mpool/mpool.toml");
    for (k, v) in [
        ("Service.User", "mpool"),
        ("Service.Group", "mpool"),
        ("Service.NoNewPrivileges", "yes"),
        ("Service.ProtectSystem", "strict"),
        ("Service.ProtectHome", "yes"),
        ("Service.PrivateTmp", "yes"),
        ("Service.StateDirectory", "mpool"),
        ("Service.RuntimeDirectory", "mpool"),
        ("Service.Restart", "on-failure"),
        ("Install.WantedBy", "multi-user.target"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    assert!(
        u.get("Service.ExecStartPre").is_some_and(|v| v.iter().any(|c| c.ends_with("--check"))),
        "the config is checked first"
    );
    assert!(!u.contains_key("Service.PrivateNetwork"), "mpool needs the network to reach its VMs");
}

#[test]
fn the_example_config_uses_the_units_directories() {
    let cfg = mpool_config::Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mpool.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    // RuntimeDirectory=mpool is /run/mpool; StateDirectory=mpool is /var/lib/mpool.
    assert!(cfg.api.listen.iter().any(|l| l.to_string() == "unix:/run/mpool/mpool.sock"), "{:?}", cfg.api.listen);
    assert!(cfg.store.path.starts_with("/var/lib/mpool"), "{}", cfg.store.path.display());
    assert!(cfg.daemon.data_dir.as_ref().is_some_and(|d| d.starts_with("/var/lib/mpool")), "{:?}", cfg.daemon.data_dir);
    assert_eq!(
        mpool::cli::client::DEFAULT_ENDPOINT,
        "unix:/run/mpool/mpool.sock",
        "the CLI's default endpoint is the unit's socket"
    );
}
