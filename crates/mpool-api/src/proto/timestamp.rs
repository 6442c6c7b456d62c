//! `google.protobuf.Timestamp` for `mpool.v1`, with its proto3 JSON form: RFC 3339 in UTC with
//! a `Z` and 0, 3, 6 or 9 fractional digits (`"2025-01-02T03:04:05.250Z"`), as prost-types
//! formats and parses it. (pbjson-types' own Timestamp writes `+00:00`, which the mapping does
//! not allow.)

use std::fmt;
use std::str::FromStr;

/// A point in time: seconds and nanoseconds since the Unix epoch (the well-known type's wire
/// format, field for field).
#[derive(Clone, Copy, PartialEq, Eq, Hash, prost::Message)]
pub struct Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second, 0 to 999,999,999.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl From<prost_types::Timestamp> for Timestamp {
    fn from(t: prost_types::Timestamp) -> Timestamp {
        Timestamp { seconds: t.seconds, nanos: t.nanos }
    }
}

impl From<Timestamp> for prost_types::Timestamp {
    fn from(t: Timestamp) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds: t.seconds, nanos: t.nanos }
    }
}

impl TryFrom<Timestamp> for std::time::SystemTime {
    type Error = prost_types::TimestampError;

    fn try_from(t: Timestamp) -> Result<Self, Self::Error> {
        std::time::SystemTime::try_from(prost_types::Timestamp::from(t))
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Timestamp {
        prost_types::Timestamp::from(t).into()
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC, e.g. `2025-01-02T03:04:05Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        prost_types::Timestamp::from(*self).fmt(f)
    }
}

impl FromStr for Timestamp {
    type Err = prost_types::TimestampError;

    /// Parses RFC 3339 (any offset; kept as the instant it names).
    fn from_str(s: &str) -> Result<Timestamp, Self::Err> {
        prost_types::Timestamp::from_str(s).map(Timestamp::from)
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(|_| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 timestamp")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_rfc3339_in_utc_with_a_z() {
        let t = Timestamp { seconds: 1_735_787_045, nanos: 250_000_000 };
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(text, "\"2025-01-02T03:04:05.250Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&text).unwrap(), t);
        assert_eq!(serde_json::from_str::<Timestamp>("\"2025-01-02T04:04:05.250+01:00\"").unwrap(), t);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
        let wire = prost::Message::encode_to_vec(&t);
        assert_eq!(wire, prost::Message::encode_to_vec(&prost_types::Timestamp::from(t)));
    }
}
