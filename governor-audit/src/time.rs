//! RFC 3339 timestamps, through jiff: "now, in UTC" for the log, and the
//! inverse for readers rebuilding history.

use std::time::SystemTime;

use jiff::Timestamp;

/// Formats `t` as RFC 3339 in UTC with millisecond precision, e.g.
/// `2026-05-01T12:34:56.789Z`. Times before 1970 (a badly wrong clock) are
/// clamped to the epoch rather than failing an append.
pub fn format_rfc3339_millis(t: SystemTime) -> String {
    let ts = Timestamp::try_from(t)
        .ok()
        .filter(|ts| *ts >= Timestamp::UNIX_EPOCH)
        .unwrap_or(Timestamp::UNIX_EPOCH);
    format!("{ts:.3}")
}

/// Parses an RFC 3339 timestamp (`Z` or a `±HH:MM` offset, optional
/// fraction). Returns `None` for anything else or for times before 1970.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    // jiff also takes ISO 8601 forms RFC 3339 doesn't (a bare date, no
    // seconds); the log writes the full form, so insist on it.
    let b = s.as_bytes();
    if b.len() < 20 || b.get(16) != Some(&b':') {
        return None;
    }
    let ts: Timestamp = s.parse().ok()?;
    if ts < Timestamp::UNIX_EPOCH {
        return None;
    }
    SystemTime::try_from(ts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn known_instants() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(format_rfc3339_millis(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(
            format_rfc3339_millis(UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn round_trip_and_offsets() {
        for ms in [
            0u64,
            1,
            86_399_999,
            951_782_400_000,
            1_700_000_000_123,
            4_102_444_800_000,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse_rfc3339(&format_rfc3339_millis(t)), Some(t), "{ms}");
        }
        let a = parse_rfc3339("2023-11-14T23:13:20.5+01:00");
        let b = parse_rfc3339("2023-11-14T22:13:20.500Z");
        assert!(a.is_some());
        assert_eq!(a, b);
        for bad in [
            "",
            "2023-11-14",
            "2023-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20Zx",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
