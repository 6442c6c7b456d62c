//! Conversions from the engine's world to `mpool.v1` messages: durations, timestamps, leases
//! and how they were served. (Checks of the caller's values are the application's:
//! [`crate::app::validate`]; statuses are the gRPC service's: `crate::errors`.)

use std::time::{Duration, UNIX_EPOCH};

use crate::proto::{self, v1};
use mpool_core::store::LeaseRecord;
use mpool_engine::{LeaseInfo, Served};

/// A std duration as a proto one.
pub fn proto_duration(d: Duration) -> proto::Duration {
    proto::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Unix milliseconds as a proto timestamp.
pub fn timestamp(ms: u64) -> proto::Timestamp {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    proto::Timestamp::from(t)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_convert_without_overflow() {
        assert_eq!(proto_duration(Duration::new(3, 5)), proto::Duration { seconds: 3, nanos: 5 });
        assert_eq!(proto_duration(Duration::MAX).seconds, i64::MAX);
    }
}
