//! Wall-clock instants on the wire.
//!
//! Cores never read a clock: drivers pass `now` in. Persisted and transmitted instants are
//! wall-clock milliseconds since the Unix epoch, so they survive reboots and mean the same thing
//! on both sides of a link.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since 1970-01-01T00:00:00Z.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// Converts a `SystemTime` (a driver reads the clock; cores receive the result).
    pub fn from_system(t: SystemTime) -> Self {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Self(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }

    pub fn saturating_add(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    pub fn saturating_sub(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// How long after `earlier` this instant is; zero if it is not after.
    pub fn since(self, earlier: UnixMillis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Parses an RFC 3339 instant such as `2026-11-27T10:00:00Z`.
    pub fn parse_rfc3339(s: &str) -> Result<Self, String> {
        humantime::parse_rfc3339_weak(s)
            .map(Self::from_system)
            .map_err(|e| {
                format!("{s:?} is not an RFC 3339 time such as 2026-11-27T10:00:00Z ({e})")
            })
    }
}

impl fmt::Display for UnixMillis {
    /// RFC 3339 in UTC, to the second.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.to_system()))
    }
}

/// Parses a duration such as `90s`, `15m`, `1h 30m` or `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as \"30s\", \"15m\" or \"1h\" ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_to_the_second() {
        let t = UnixMillis::parse_rfc3339("2026-11-27T10:00:00Z").unwrap();
        assert_eq!(t, UnixMillis(1_795_773_600_000));
        assert_eq!(t.to_string(), "2026-11-27T10:00:00Z");
        assert!(
            UnixMillis::parse_rfc3339("yesterday")
                .unwrap_err()
                .contains("\"yesterday\"")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").unwrap_err().contains("\"soon\""));
    }
}
