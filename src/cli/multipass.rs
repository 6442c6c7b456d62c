//! `mpool multipass <verb>`: talks to multipassd (or `mpool sim`) directly, with the multipass
//! CLI's own argument shapes. Human output by default, `--json` for scripts. Exit codes follow
//! the multipass CLI: 0 ok, 2 the command failed, 3 the daemon is unreachable; `exec` exits
//! with the remote command's code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::output;
use mpool_multipass::{
    Client, ClientIdentity, ClientOptions, DaemonAddress, Error, LaunchOptions, Names, PassphraseOrigin,
    ServerVerification,
};

/// `mpool multipass` flags.
#[derive(Args, Debug)]
pub struct MultipassArgs {
    /// Daemon address: `unix:PATH` or `HOST:PORT`. Default: $MULTIPASS_SERVER_ADDRESS, the snap
    /// socket, then /run/multipass_socket.
    #[arg(long, env = "MPOOL_DAEMON")]
    daemon: Option<String>,
    /// Verify the daemon against this root certificate (multipass_root_cert.pem).
    #[arg(long)]
    root_cert: Option<PathBuf>,
    /// Accept exactly this server certificate (e.g. the daemon's localhost.pem).
    #[arg(long, conflicts_with = "root_cert")]
    pin_cert: Option<PathBuf>,
    /// Do not verify the daemon's certificate (only for Multipass <= 1.15 with an unreadable cert).
    #[arg(long)]
    insecure_skip_verify: bool,
    /// Use mpool's own client certificate even if the multipass CLI's is readable.
    #[arg(long)]
    own_cert: bool,
    /// Authenticate with the passphrase in this file if the daemon does not trust us yet.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Talk to daemons outside 1.13-1.16 anyway.
    #[arg(long)]
    allow_untested_daemon: bool,
    /// Deadline of each daemon call, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// The daemon's version.
    Version,
    /// Instances (or snapshots).
    List {
        /// List snapshots instead.
        #[arg(long)]
        snapshots: bool,
    },
    /// Details of instances, with runtime information (CPUs, load, disk and memory usage,
    /// IPv4) as `multipass info` shows them.
    Info {
        /// Leave out runtime information (no SSH inside the daemon; those fields show `--`).
        #[arg(long)]
        no_runtime_information: bool,
        /// Instances.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Images and blueprints to launch: `find [REMOTE:][STRING]`.
    Find {
        /// Show only images.
        #[arg(long, conflicts_with = "only_blueprints")]
        only_images: bool,
        /// Show only blueprints.
        #[arg(long)]
        only_blueprints: bool,
        /// Show unsupported cloud images too.
        #[arg(long)]
        show_unsupported: bool,
        /// What to look for, `[remote:]string`.
        #[arg(default_value = "")]
        search: String,
    },
    /// Create and start an instance.
    Launch {
        /// Instance name.
        #[arg(short, long)]
        name: String,
        /// CPUs.
        #[arg(short, long, default_value_t = 0)]
        cpus: i32,
        /// Memory, e.g. 2G.
        #[arg(short, long, default_value = "")]
        memory: String,
        /// Disk, e.g. 10G.
        #[arg(short, long, default_value = "")]
        disk: String,
        /// cloud-init user data file.
        #[arg(long)]
        cloud_init: Option<PathBuf>,
        /// Seconds to wait for the instance (0: the daemon's 300).
        #[arg(long, default_value_t = 0)]
        launch_timeout: i32,
        /// Image, e.g. 24.04.
        #[arg(default_value = "")]
        image: String,
    },
    /// Start (or resume) instances.
    Start {
        /// Seconds to wait for the instances to come up (0: the daemon's 300).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..))]
        timeout: i32,
        /// Instances.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop instances.
    Stop {
        /// Kill instead of powering down (also stops suspended instances).
        #[arg(long)]
        force: bool,
        /// Instances.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Suspend instances.
    Suspend {
        /// Instances.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Reboot instances.
    Restart {
        /// Instances.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Snapshot a stopped instance.
    Snapshot {
        /// Instance.
        instance: String,
        /// Snapshot name (default: snapshotN).
        #[arg(short, long)]
        name: Option<String>,
        /// Comment.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Restore a stopped instance: `restore NAME.SNAPSHOT --destructive`.
    Restore {
        /// INSTANCE.SNAPSHOT
        target: String,
        /// Discard the current state without a safety snapshot.
        #[arg(short, long)]
        destructive: bool,
    },
    /// Clone a stopped instance: `clone SRC --name DST`.
    Clone {
        /// Source instance.
        source: String,
        /// Destination name.
        #[arg(short, long)]
        name: String,
    },
    /// Delete instances (or INSTANCE.SNAPSHOT snapshots).
    Delete {
        /// Release the instances for good.
        #[arg(short, long)]
        purge: bool,
        /// Instances or INSTANCE.SNAPSHOT.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Purge all deleted instances.
    Purge,
    /// Recover deleted instances.
    Recover {
        /// Instances.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Ask the daemon to trust this client.
    Authenticate {
        /// The daemon's passphrase (prefer --passphrase-file: arguments show in `ps`).
        passphrase: Option<String>,
    },
    /// SSH endpoint of a running instance.
    SshInfo {
        /// Instance.
        name: String,
    },
    /// Read a daemon setting (`local.passphrase` prints whether one is set: true/false).
    Get {
        /// Print an empty value as nothing instead of `<empty>`.
        #[arg(long)]
        raw: bool,
        /// Key, e.g. local.driver.
        key: String,
    },
    /// Write a daemon setting: `set KEY=VALUE` (the daemon restarts afterwards).
    Set {
        /// KEY=VALUE
        assignment: String,
    },
    /// Host resources.
    DaemonInfo,
    /// Run a command in a running instance over SSH: `exec NAME -- ARGV`.
    Exec {
        /// Instance.
        name: String,
        /// Working directory in the instance.
        #[arg(short = 'd', long)]
        working_directory: Option<String>,
        /// The command.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

/// Runs one verb.
pub async fn run(args: MultipassArgs, data_dir: PathBuf) -> ExitCode {
    match run_inner(args, data_dir).await {
        Ok(code) => code,
        Err(e) => {
            output::err_line(&format!("mpool multipass: {e}"));
            if e.is_unavailable() && !e.is_trust_problem() { ExitCode::from(3) } else { ExitCode::from(2) }
        }
    }
}

fn names(v: Vec<String>) -> Result<Names, Error> {
    Names::new(v)
}

fn split_snapshot(s: &str) -> Result<(&str, &str), Error> {
    s.split_once('.')
        .filter(|(i, n)| !i.is_empty() && !n.is_empty())
        .ok_or_else(|| Error::InvalidArgument(format!("{s:?}: expected INSTANCE.SNAPSHOT")))
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => output::line(&s),
        Err(e) => output::err_line(&format!("cannot encode JSON: {e}")),
    }
}

async fn run_inner(args: MultipassArgs, data_dir: PathBuf) -> Result<ExitCode, Error> {
    let mut opts = ClientOptions::new(data_dir);
    opts.address = args.daemon.as_deref().map(DaemonAddress::parse).transpose()?;
    opts.verification = match (&args.root_cert, &args.pin_cert, args.insecure_skip_verify) {
        (Some(p), _, _) => ServerVerification::RootCert(p.clone()),
        (_, Some(p), _) => ServerVerification::Pin(p.clone()),
        (_, _, true) => ServerVerification::InsecureSkipVerify,
        _ => ServerVerification::Auto,
    };
    if args.own_cert {
        opts.identity = ClientIdentity::Own;
    }
    if let Some(f) = &args.passphrase_file {
        opts.passphrase =
            Some(mpool_multipass::trust::read_passphrase_file(f, "--passphrase-file").map_err(Error::InvalidArgument)?);
        opts.passphrase_origin = Some(PassphraseOrigin::FlagFile(f.clone()));
    }
    if let Verb::Authenticate { passphrase: Some(p) } = &args.verb {
        opts.passphrase = Some(p.clone());
        opts.passphrase_origin = Some(PassphraseOrigin::Argument);
    }
    opts.allow_untested_daemon = args.allow_untested_daemon;
    opts.call_timeout = Duration::from_secs(args.timeout);
    let client = Client::connect(opts.clone()).await?;
    let json = args.json;
    let ok = |msg: String| {
        if json {
            print_json(&serde_json::json!({ "ok": true, "message": msg }));
        } else if !msg.is_empty() {
            output::line(&msg);
        }
        Ok(ExitCode::SUCCESS)
    };
    match args.verb {
        Verb::Version => {
            // Read while connecting: one call in all.
            let v = client.daemon_version_text().to_string();
            if json {
                print_json(&serde_json::json!({ "daemon": v, "mpool": env!("CARGO_PKG_VERSION") }));
            } else {
                output::line(&format!("multipassd  {v}\nmpool       {}", env!("CARGO_PKG_VERSION")));
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::List { snapshots: false } => {
            // Like the multipass CLI, ask for the addresses (the daemon collects them over SSH).
            let list = client.list_with_ipv4().await?;
            if json {
                print_json(&list);
            } else {
                output::text(&format_list(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::List { snapshots: true } => {
            let list = client.list_snapshots().await?;
            if json {
                print_json(&list);
            } else if list.is_empty() {
                output::line("No snapshots found.");
            } else {
                output::line(&format!("{:<24} {:<16} {:<16} Comment", "Instance", "Snapshot", "Parent"));
                for s in list {
                    let parent = if s.parent.is_empty() { "--".to_string() } else { s.parent };
                    output::line(&format!("{:<24} {:<16} {:<16} {}", s.instance, s.name, parent, s.comment));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Info { no_runtime_information, names: n } => {
            let n = names(n)?;
            let info =
                if no_runtime_information { client.info(&n).await? } else { client.info_with_runtime(&n).await? };
            if json {
                print_json(&info);
            } else {
                let blocks: Vec<String> = info.iter().map(format_info).collect();
                output::text(&blocks.join("\n"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Find { only_images, only_blueprints, show_unsupported, search } => {
            let found = client.find(&search, !only_blueprints, !only_images, show_unsupported).await?;
            if json {
                print_json(&found);
            } else {
                output::text(&format_find(&found, !only_blueprints, !only_images));
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Launch { name, cpus, memory, disk, cloud_init, launch_timeout, image } => {
            let cloud_init = match cloud_init {
                Some(f) => std::fs::read_to_string(&f)
                    .map_err(|e| Error::InvalidArgument(format!("--cloud-init {}: {e}", f.display())))?,
                None => String::new(),
            };
            let opts = LaunchOptions { name, image, cpus, memory, disk, cloud_init, timeout_secs: launch_timeout };
            let n = client.launch(&opts).await?;
            ok(format!("Launched: {n}"))
        }
        Verb::Start { timeout, names: n } => {
            client.start(&names(n)?, timeout).await?;
            ok(String::new())
        }
        Verb::Stop { force, names: n } => {
            client.stop(&names(n)?, force).await?;
            ok(String::new())
        }
        Verb::Suspend { names: n } => {
            client.suspend(&names(n)?).await?;
            ok(String::new())
        }
        Verb::Restart { names: n } => {
            client.restart(&names(n)?, 0).await?;
            ok(String::new())
        }
        Verb::Snapshot { instance, name, comment } => {
            let s = client.snapshot(&instance, name.as_deref(), &comment).await?;
            if json {
                print_json(&serde_json::json!({ "instance": instance, "snapshot": s }));
                Ok(ExitCode::SUCCESS)
            } else {
                ok(format!("Snapshot taken: {instance}.{s}"))
            }
        }
        Verb::Restore { target, destructive } => {
            let (i, s) = split_snapshot(&target)?;
            client.restore(i, s, destructive).await?;
            ok(format!("Snapshot restored: {i}.{s}"))
        }
        Verb::Clone { source, name } => {
            client.clone_instance(&source, &name).await?;
            ok(format!("Cloned from {source} to {name}."))
        }
        Verb::Delete { purge, names: n } => {
            let mut instances = Vec::new();
            for item in n {
                match item.split_once('.') {
                    Some((i, s)) => client.delete_snapshot(i, s).await?,
                    None => instances.push(item),
                }
            }
            if !instances.is_empty() {
                client.delete(&names(instances)?, purge).await?;
            }
            ok(String::new())
        }
        Verb::Purge => {
            let purged = client.purge().await?;
            ok(purged.join("\n"))
        }
        Verb::Recover { names: n } => {
            client.recover(&names(n)?).await?;
            ok(String::new())
        }
        Verb::Authenticate { .. } => {
            // connect() already authenticated with the passphrase if we were not trusted.
            ok("This client is trusted by multipassd.".into())
        }
        Verb::SshInfo { name } => {
            let info = client.ssh_info(&name).await?;
            if json {
                print_json(&info);
            } else {
                output::line(&format!("{}@{}:{}", info.username, info.host, info.port));
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Get { raw, key } => {
            let value = setting_text(&key, &client.get(&key).await?, raw);
            if json {
                print_json(&serde_json::json!({ "key": key, "value": value }));
            } else {
                output::line(&value);
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Set { assignment } => {
            let (k, v) = assignment
                .split_once('=')
                .ok_or_else(|| Error::InvalidArgument(format!("{assignment:?}: expected KEY=VALUE")))?;
            client.set(k, v).await?;
            ok(String::new())
        }
        Verb::DaemonInfo => {
            let d = client.daemon_info().await?;
            if json {
                print_json(&d);
            } else {
                output::line(&format!(
                    "CPUs:    {}\nMemory:  {} bytes\nSpace:   {} bytes",
                    d.cpus, d.memory, d.available_space
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Exec { name, working_directory, argv } => exec(&client, &name, working_directory, argv).await,
    }
}

/// A setting as the multipass CLI prints it: `local.passphrase` as whether one is set (the
/// daemon returns its hash), an empty value as `<empty>` unless `raw`.
fn setting_text(key: &str, value: &str, raw: bool) -> String {
    if key == "local.passphrase" {
        return if value.is_empty() { "false" } else { "true" }.into();
    }
    if value.is_empty() && !raw {
        return "<empty>".into();
    }
    value.to_string()
}

/// Bytes as the multipass CLI shows sizes (`MemorySize::human_readable`: one decimal, binary
/// units).
fn human_size(bytes: &str) -> Option<String> {
    let b: f64 = bytes.trim().parse().ok()?;
    for (unit, suffix) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        let q = b / unit as f64;
        if q >= 1.0 {
            return Some(format!("{q:.1}{suffix}"));
        }
    }
    Some(format!("{b}B"))
}

/// `USED out of TOTAL`, or `--` when either is unknown.
fn usage(used: &str, total: &str) -> String {
    match (human_size(used), human_size(total)) {
        (Some(u), Some(t)) if !used.is_empty() && !total.is_empty() => format!("{u} out of {t}"),
        _ => "--".into(),
    }
}

fn or_dashes(s: &str) -> &str {
    if s.is_empty() { "--" } else { s }
}

/// `list` as the multipass CLI prints it.
fn format_list(list: &[mpool_multipass::InstanceSummary]) -> String {
    if list.is_empty() {
        return "No instances found.\n".into();
    }
    let width = list.iter().map(|i| i.name.len() + 1).max().unwrap_or(0).max(24);
    let mut out = format!("{:<width$}{:<18}{:<17}{}\n", "Name", "State", "IPv4", "Image");
    for i in list {
        let image = if i.release.is_empty() { "Not Available".to_string() } else { format!("Ubuntu {}", i.release) };
        let ip = i.ipv4.first().map(String::as_str).unwrap_or("--");
        out.push_str(&format!("{:<width$}{:<18}{:<17}{}\n", i.name, title(i.state.as_str_name()), ip, image));
        for extra in i.ipv4.iter().skip(1) {
            out.push_str(&format!("{:<width$}{:<18}{}\n", "", "", extra));
        }
    }
    out
}

/// One instance of `info` as the multipass CLI prints it.
fn format_info(i: &mpool_multipass::InstanceInfo) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<16}{v}\n"));
    line("Name:", &i.name);
    line("State:", &title(i.state.as_str_name()));
    line("Snapshots:", &i.snapshots.to_string());
    line("IPv4:", i.ipv4.first().map(String::as_str).unwrap_or("--"));
    for extra in i.ipv4.iter().skip(1) {
        line("", extra);
    }
    line("Release:", or_dashes(&i.current_release));
    let hash = if i.image_hash.is_empty() {
        "Not Available".to_string()
    } else {
        let short: String = i.image_hash.chars().take(12).collect();
        if i.image_release.is_empty() { short } else { format!("{short} (Ubuntu {})", i.image_release) }
    };
    line("Image hash:", &hash);
    line("CPU(s):", or_dashes(&i.cpus));
    line("Load:", or_dashes(&i.load));
    line("Disk usage:", &usage(&i.disk_usage, &i.disk));
    line("Memory usage:", &usage(&i.memory_usage, &i.memory));
    line("Mounts:", "--");
    out
}

/// `find` as the multipass CLI prints it.
fn format_find(found: &mpool_multipass::FindResult, images: bool, blueprints: bool) -> String {
    let mut out = String::new();
    let mut table = |kind: &str, list: &[mpool_multipass::ImageEntry]| {
        out.push_str(&format!("{:<28}{:<18}{:<17}{}\n", kind, "Aliases", "Version", "Description"));
        for e in list {
            let name = e.aliases.first().map(|a| a.to_string()).unwrap_or_default();
            let aliases: Vec<&str> = e.aliases.iter().skip(1).map(|a| a.alias.as_str()).collect();
            let description = if e.os.is_empty() { e.release.clone() } else { format!("{} {}", e.os, e.release) };
            out.push_str(&format!("{:<28}{:<18}{:<17}{}\n", name, aliases.join(","), e.version, description));
        }
        out.push('\n');
    };
    if images {
        table("Image", &found.images);
    }
    if blueprints {
        table("Blueprint (deprecated)", &found.blueprints);
    }
    out
}

fn title(s: &str) -> String {
    let lower = s.to_lowercase().replace('_', " ");
    let mut c = lower.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// `exec`: ssh_info (starting the instance first if it is not running, as the multipass CLI
/// does), then one SSH connection streaming stdout/stderr; exits with the remote code.
async fn exec(client: &Client, name: &str, workdir: Option<String>, argv: Vec<String>) -> Result<ExitCode, Error> {
    let info = match client.ssh_info(name).await {
        Err(Error::Daemon { code: tonic::Code::Aborted, .. }) => {
            client.start(&Names::one(name), 0).await?;
            client.ssh_info(name).await?
        }
        other => other?,
    };
    let target = info.clone();
    let exec_err = |e: mpool_ssh::SshError| Error::InvalidArgument(format!("exec failed: {e}"));
    let conn = mpool_ssh::Connection::connect(&target, &mpool_ssh::SshOptions::default()).await.map_err(exec_err)?;
    let mut req = mpool_ssh::ExecRequest::argv(argv).stdin_stream(forward_stdin());
    if let Some(dir) = workdir {
        req = req.cwd(dir);
    }
    let mut handle = conn.exec(req).await.map_err(exec_err)?;
    let code = relay(&mut handle).await;
    conn.close().await;
    Ok(ExitCode::from(code))
}

/// Our stdin as it arrives, for the remote command (as `multipass exec` forwards it): read on
/// a thread of its own (a terminal may never reach EOF; the process exits without waiting for
/// it), closed at EOF or on a read error.
fn forward_stdin() -> tokio::sync::mpsc::Receiver<bytes::Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let chunk = bytes::Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                    if tx.blocking_send(chunk).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("reading stdin: {e}");
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot forward stdin: {e}");
    }
    rx
}

/// Copies an exec's output to our stdout/stderr as it arrives (a closed pipe ends `mpool`
/// quietly, see [`output`], and with it the connection and the remote command); returns the exit code to exit
/// with (128+N for a signal, as shells do; 255 when the connection was lost).
pub async fn relay(handle: &mut mpool_ssh::ExecHandle) -> u8 {
    while let Some(ev) = handle.next_event().await {
        match ev {
            mpool_ssh::ExecEvent::Stdout(b) => output::bytes(&b),
            mpool_ssh::ExecEvent::Stderr(b) => output::err_bytes(&b),
            mpool_ssh::ExecEvent::Exit { code: Some(c), .. } => {
                return u8::try_from(c).unwrap_or(255);
            }
            mpool_ssh::ExecEvent::Exit { signal: Some(s), .. } => return super::signal::exit_code(&s),
            mpool_ssh::ExecEvent::Exit { .. } => return 255,
        }
    }
    255
}
