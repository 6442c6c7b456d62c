//! Memory and disk sizes as multipass takes them (`512M`, `1.5G`, `10GiB`, plain bytes).

/// Parses a memory/disk size as multipass does: digits with an optional fraction and an
/// optional K/M/G/T unit (optionally followed by `iB` or `B`), case-insensitive; plain digits
/// are bytes. Returns bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let unit = unit.to_ascii_uppercase();
    let unit = unit.trim_end_matches("IB").trim_end_matches('B');
    let mult: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    if num.is_empty() || (unit.is_empty() && num.contains('.')) {
        return None;
    }
    Some((value * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_multipass() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1.5g"), Some(3 << 29));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        for bad in ["", "G", "1X", "1.5", "-1G"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
