//! How `mpool multipass` reaches the daemon: its address, how its certificate is verified,
//! which client certificate we present, the passphrase to authenticate with if the daemon does
//! not trust us yet, and the deadline of each call.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use mpool_multipass::{
    Client, ClientIdentity, ClientOptions, DaemonAddress, Error, PassphraseOrigin, ServerVerification,
};

/// The flags that say how to reach the daemon.
#[derive(Args, Debug)]
pub struct ConnectArgs {
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
}

/// Connects (and authenticates, if the daemon does not trust us yet) as the flags say;
/// `passphrase` is `authenticate`'s argument, which wins over `--passphrase-file`.
pub async fn connect(args: &ConnectArgs, passphrase: Option<String>, data_dir: PathBuf) -> Result<Client, Error> {
    Client::connect(options(args, passphrase, data_dir)?).await
}

fn options(args: &ConnectArgs, passphrase: Option<String>, data_dir: PathBuf) -> Result<ClientOptions, Error> {
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
    if let Some(p) = passphrase {
        opts.passphrase = Some(p);
        opts.passphrase_origin = Some(PassphraseOrigin::Argument);
    }
    opts.allow_untested_daemon = args.allow_untested_daemon;
    opts.call_timeout = Duration::from_secs(args.timeout);
    Ok(opts)
}
