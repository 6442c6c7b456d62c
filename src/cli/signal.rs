//! The exit code of a remote command that a signal ended, as shells report it: 128 + the
//! signal's POSIX number. `mpool exec`, `mpool run` and `mpool multipass exec` exit with it.

/// `128 + N` for the signal named `name` as SSH names it (`TERM`, `KILL`, ...); 255 for a
/// signal not in the table.
pub fn exit_code(name: &str) -> u8 {
    128u8.saturating_add(number(name))
}

/// POSIX signal numbers of the common signals (127 for any other).
fn number(name: &str) -> u8 {
    match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ABRT" => 6,
        "KILL" => 9,
        "SEGV" => 11,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => 127,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signals_exit_as_shells_report_them() {
        assert_eq!(super::exit_code("TERM"), 143);
        assert_eq!(super::exit_code("KILL"), 137);
        assert_eq!(super::exit_code("NOPE"), 255);
    }
}
