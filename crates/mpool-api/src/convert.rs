//! Conversions between the engine/SSH world and `mpool.v1` messages and statuses: durations,
//! timestamps, leases, and one gRPC status per failure with a message a person can act on.

use std::time::{Duration, UNIX_EPOCH};

use tonic::{Code, Status};

use crate::proto::v1;
use mpool_core::store::LeaseRecord;
use mpool_engine::{EngineError, LeaseInfo, Served};
use mpool_ssh::SshError;

/// The longest duration a caller may send (ttl, wait, command timeout, ...): 366 days. Anything
/// above is refused at the edge, so no later arithmetic on it (deadlines, expiry times) can
/// overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A proto duration as a std one; negative or out-of-range values (above [`MAX_DURATION`]) are
/// INVALID_ARGUMENT naming the field and the allowed range.
pub fn duration(field: &str, d: Option<&prost_types::Duration>) -> Result<Option<Duration>, Status> {
    let Some(d) = d else { return Ok(None) };
    let max = MAX_DURATION.as_secs();
    let valid = (0..1_000_000_000).contains(&d.nanos)
        && u64::try_from(d.seconds).is_ok_and(|s| s < max || (s == max && d.nanos == 0));
    if !valid {
        return Err(Status::invalid_argument(format!(
            "{field} must be a non-negative duration of at most {max}s (366 days), such as \"30s\" (got {}s {}ns)",
            d.seconds, d.nanos
        )));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

/// A std duration as a proto one.
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs().min(i64::MAX as u64) as i64, nanos: d.subsec_nanos() as i32 }
}

/// Unix milliseconds as a proto timestamp.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    prost_types::Timestamp::from(t)
}

/// How a lease was served, as the proto enum.
pub fn served(s: Served) -> v1::Served {
    match s {
        Served::Hot => v1::Served::Hot,
        Served::Warm => v1::Served::Warm,
        Served::Cold => v1::Served::Cold,
        Served::Repeat => v1::Served::Repeat,
    }
}

/// A lease record as the proto message.
pub fn lease_record(r: &LeaseRecord) -> v1::Lease {
    v1::Lease {
        id: r.id.clone(),
        pool: r.pool.clone(),
        vm: r.vm.clone(),
        holder: r.holder.clone(),
        request_id: r.request_id.clone().unwrap_or_default(),
        granted_at: Some(timestamp(r.granted_ms)),
        expires_at: Some(timestamp(r.expires_ms)),
        served: v1::Served::Unspecified as i32,
        waited: None,
    }
}

/// A granted lease as the proto message.
pub fn lease(info: &LeaseInfo) -> v1::Lease {
    v1::Lease {
        served: served(info.served) as i32,
        waited: Some(proto_duration(info.waited)),
        ..lease_record(&info.record)
    }
}

/// The gRPC code of an engine error's kind.
pub fn code(kind: mpool_engine::ErrorKind) -> tonic::Code {
    use mpool_engine::ErrorKind as K;
    use tonic::Code;
    match kind {
        K::NotFound => Code::NotFound,
        K::FailedPrecondition => Code::FailedPrecondition,
        K::PermissionDenied => Code::PermissionDenied,
        K::ResourceExhausted => Code::ResourceExhausted,
        K::AlreadyExists => Code::AlreadyExists,
        K::Unavailable => Code::Unavailable,
        K::InvalidArgument => Code::InvalidArgument,
    }
}

/// The status for an engine error, with a message that says what to do.
pub fn engine_status(e: EngineError) -> Status {
    let message = match &e {
        EngineError::UnknownLease(_) => {
            format!("{e}: acquire a new lease (ListLeases shows the leases you hold)")
        }
        EngineError::NotOwner(id) => format!(
            "lease {id} belongs to another client: only the token that acquired it (or an admin token) may use it; \
             acquire your own lease"
        ),
        _ => e.to_string(),
    };
    Status::new(code(e.kind()), message)
}

/// The status for an SSH error during a call on a lease.
pub fn ssh_status(e: SshError) -> Status {
    let code = match &e {
        SshError::Unreachable { .. }
        | SshError::Timeout { .. }
        | SshError::ConnectionLost { .. }
        | SshError::Closed { .. }
        | SshError::ChannelRefused { .. }
        | SshError::Handshake { .. } => Code::Unavailable,
        SshError::InvalidRequest(_) | SshError::PathEscapesBase { .. } => Code::InvalidArgument,
        SshError::NoSuchFile { .. } => Code::NotFound,
        SshError::PermissionDenied { .. } => Code::PermissionDenied,
        SshError::DiskFull { .. } => Code::ResourceExhausted,
        SshError::AuthRefused { .. } | SshError::InvalidKey { .. } | SshError::HostKeyMismatch { .. } => {
            Code::FailedPrecondition
        }
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// Splits a byte stream into valid UTF-8 strings without breaking multi-byte characters across
/// chunks (an incomplete tail waits for the next chunk; invalid bytes become U+FFFD).
#[derive(Default)]
pub struct Utf8Chunks {
    carry: Vec<u8>,
}

impl Utf8Chunks {
    /// Feeds bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.carry.extend_from_slice(bytes);
        let cut = match std::str::from_utf8(&self.carry) {
            Ok(_) => self.carry.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.carry.len(),
        };
        let rest = self.carry.split_off(cut);
        let text = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry = rest;
        text
    }

    /// Whatever is left (an incomplete character at the very end).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_survive_chunk_boundaries() {
        let text = "héllo wörld ✓";
        let bytes = text.as_bytes();
        let mut c = Utf8Chunks::default();
        let mut out = String::new();
        for b in bytes.chunks(1) {
            out.push_str(&c.push(b));
        }
        out.push_str(&c.finish());
        assert_eq!(out, text);
        let mut c = Utf8Chunks::default();
        assert_eq!(c.push(&[0x66, 0xff, 0x67]), "f\u{fffd}g");
    }

    #[test]
    fn durations_are_checked() {
        assert!(duration("ttl", Some(&prost_types::Duration { seconds: -1, nanos: 0 })).is_err());
        assert_eq!(
            duration("ttl", Some(&prost_types::Duration { seconds: 3, nanos: 5 })).unwrap(),
            Some(Duration::new(3, 5))
        );
        assert_eq!(duration("ttl", None).unwrap(), None);
        for (seconds, nanos) in [(i64::MAX, 0), (31_622_400, 1), (31_622_401, 0), (0, 1_000_000_000), (0, -1)] {
            let e = duration("command.timeout", Some(&prost_types::Duration { seconds, nanos })).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().contains("command.timeout") && e.message().contains("31622400s"), "{}", e.message());
        }
        assert_eq!(
            duration("ttl", Some(&prost_types::Duration { seconds: 31_622_400, nanos: 0 })).unwrap(),
            Some(MAX_DURATION)
        );
    }
}
