//! Checks of the caller's values at the edge, shared by every transport: required fields,
//! length caps on identifiers and free text, and duration ranges. Each refusal names the field
//! and says what to send instead, so no later step (deadlines, expiry times, SFTP paths) sees a
//! value it cannot handle.

use std::time::Duration;

use super::error::AppError;

/// Longest identifier a caller may send: pool, lease id, exec id, request id.
pub const MAX_ID: usize = 256;
/// Longest exec id (it names a running command in CancelExec).
pub const MAX_EXEC_ID: usize = 128;
/// Longest `holder` (free text shown in listings).
pub const MAX_HOLDER: usize = 256;
/// Longest path in the VM (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most bytes of environment (names and values together) per command.
pub const MAX_ENV: usize = 256 * 1024;
/// Most input or output files per Run.
pub const MAX_FILES: usize = 1000;

/// The longest duration a caller may send (ttl, wait, command timeout, ...): 366 days. Anything
/// above is refused at the edge, so no later arithmetic on it (deadlines, expiry times) can
/// overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Refuses an empty (or blank) required field, saying where its value comes from; then caps it
/// ([`MAX_PATH`] for paths, outputs included, [`MAX_ID`] for the rest).
pub fn required(field: &str, value: &str) -> Result<(), AppError> {
    if value.trim().is_empty() {
        let hint = match field {
            "pool" => "name a pool (ListPools or `mpool status` lists them)",
            "lease_id" => "pass the lease id that Acquire returned",
            "exec_id" => "pass the exec id from the Exec stream's `started` event",
            "path" | "inputs[].path" | "outputs[]" => {
                "give a path in the VM (absolute, or relative to the home directory)"
            }
            _ => "set it",
        };
        return Err(AppError::invalid_argument(format!("{field} is required: {hint}")));
    }
    let max = if field.ends_with("path") || field == "outputs[]" { MAX_PATH } else { MAX_ID };
    capped(field, value, max)
}

/// Refuses a free-text field longer than `max` bytes, naming the field and the limit.
pub fn capped(field: &str, value: &str, max: usize) -> Result<(), AppError> {
    if value.len() > max {
        let also = if field == "exec_id" { " (or omit it to get a generated one)" } else { "" };
        return Err(AppError::invalid_argument(format!(
            "{field} is {} bytes; the limit is {max} bytes: send a shorter {field}{also}",
            value.len()
        )));
    }
    Ok(())
}

/// A proto duration as a std one; negative or out-of-range values (above [`MAX_DURATION`]) are
/// refused naming the field and the allowed range.
pub fn duration(field: &str, d: Option<&crate::proto::Duration>) -> Result<Option<Duration>, AppError> {
    let Some(d) = d else { return Ok(None) };
    let max = MAX_DURATION.as_secs();
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(out_of_range(field, d));
    };
    if nanos >= 1_000_000_000 || seconds > max || (seconds == max && nanos != 0) {
        return Err(out_of_range(field, d));
    }
    Ok(Some(Duration::new(seconds, nanos)))
}

fn out_of_range(field: &str, d: &crate::proto::Duration) -> AppError {
    AppError::invalid_argument(format!(
        "{field} must be a non-negative duration of at most {}s (366 days), such as \"30s\" (got {}s {}ns)",
        MAX_DURATION.as_secs(),
        d.seconds,
        d.nanos
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::ErrorKind;

    #[test]
    fn durations_are_checked() {
        assert!(duration("ttl", Some(&crate::proto::Duration { seconds: -1, nanos: 0 })).is_err());
        assert_eq!(
            duration("ttl", Some(&crate::proto::Duration { seconds: 3, nanos: 5 })).unwrap(),
            Some(Duration::new(3, 5))
        );
        assert_eq!(duration("ttl", None).unwrap(), None);
        for (seconds, nanos) in [(i64::MAX, 0), (31_622_400, 1), (31_622_401, 0), (0, 1_000_000_000), (0, -1)] {
            let e = duration("command.timeout", Some(&crate::proto::Duration { seconds, nanos })).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.message().contains("command.timeout") && e.message().contains("31622400s"), "{}", e.message());
        }
        assert_eq!(
            duration("ttl", Some(&crate::proto::Duration { seconds: 31_622_400, nanos: 0 })).unwrap(),
            Some(MAX_DURATION)
        );
    }

    #[test]
    fn fields_are_required_and_capped() {
        let e = required("lease_id", " ").unwrap_err();
        assert_eq!(e.message(), "lease_id is required: pass the lease id that Acquire returned");
        assert!(required("path", &"p".repeat(MAX_PATH)).is_ok());
        assert!(required("pool", &"p".repeat(MAX_ID + 1)).is_err());
        // An output is a path: longer than an id is fine, up to the path limit.
        assert!(required("outputs[]", &"o".repeat(MAX_ID + 1)).is_ok());
        assert!(required("outputs[]", &"o".repeat(MAX_PATH + 1)).is_err());
        let e = capped("exec_id", &"x".repeat(MAX_EXEC_ID + 1), MAX_EXEC_ID).unwrap_err();
        assert!(e.message().ends_with("(or omit it to get a generated one)"), "{e}");
    }
}
