//! The one signal table of mpool: signal names as SSH carries them (RFC 4254 §6.10, without
//! "SIG") and their numbers, for the client (exit signals of remote commands) and the
//! simulator's SSH server (signals to deliver, exit signals to report).
//!
//! russh names twelve signals with [`Sig`] variants and every other one with
//! [`Sig::Custom`]; [`signal_name`] and [`sig_from_name`] translate between the two forms, so
//! a name means the same signal whichever form it arrives in.

use russh::Sig;

/// Every signal mpool knows by name: its SSH name and its number on this (Linux) host.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("SYS", libc::SIGSYS),
];

/// The signals russh has a variant for (every other name travels as [`Sig::Custom`]).
const RUSSH_VARIANTS: [Sig; 12] = [
    Sig::ABRT,
    Sig::ALRM,
    Sig::FPE,
    Sig::HUP,
    Sig::ILL,
    Sig::INT,
    Sig::KILL,
    Sig::PIPE,
    Sig::QUIT,
    Sig::SEGV,
    Sig::TERM,
    Sig::USR1,
];

/// The name of an SSH signal without "SIG" (`TERM`, `KILL`, ...).
pub fn signal_name(sig: &Sig) -> &str {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name.as_str(),
    }
}

/// The russh form of an SSH signal name: its variant if russh has one, else [`Sig::Custom`].
pub fn sig_from_name(name: &str) -> Sig {
    RUSSH_VARIANTS.into_iter().find(|s| signal_name(s) == name).unwrap_or_else(|| Sig::Custom(name.to_string()))
}

/// The number of an SSH signal name (`TERM`; `SIGTERM` is tolerated), if it is in [`SIGNALS`].
pub fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The SSH name of a signal number, if it is in [`SIGNALS`].
pub fn signal_name_of(number: i32) -> Option<&'static str> {
    SIGNALS.iter().find(|(_, s)| *s == number).map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_round_trip() {
        assert_eq!(signal_number("TERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("SIGKILL"), Some(libc::SIGKILL));
        assert_eq!(signal_number("NOPE"), None);
        assert_eq!(signal_name_of(libc::SIGTERM), Some("TERM"));
        assert_eq!(signal_name_of(libc::SIGUSR2), Some("USR2"));
        assert_eq!(signal_name_of(4242), None);
        assert!(matches!(sig_from_name("TERM"), Sig::TERM));
        assert!(matches!(sig_from_name("USR2"), Sig::Custom(ref n) if n == "USR2"));
        assert_eq!(signal_name(&Sig::INT), "INT");
        assert_eq!(signal_name(&Sig::Custom("WINCH".into())), "WINCH");
    }

    #[test]
    fn every_russh_variant_is_in_the_table_and_round_trips() {
        for sig in RUSSH_VARIANTS {
            let name = signal_name(&sig);
            assert!(signal_number(name).is_some(), "{name} is missing from SIGNALS");
            assert_eq!(signal_name(&sig_from_name(name)), name);
        }
        for (name, number) in SIGNALS {
            assert_eq!(signal_name_of(*number), Some(*name), "numbers are unique");
            assert_eq!(signal_name(&sig_from_name(name)), *name);
        }
    }
}
