//! Durations as people write them: `500ms`, `30s`, `5m`, `1h`, `2d`, or a bare number of seconds.

use crate::error::{Error, Result};
use std::time::Duration;

/// Parses a duration written like `500ms`, `30s`, `1.5s`, `5m`, `1h`, `2d`; a bare number is
/// seconds (SPEC §4).
///
/// ```
/// use std::time::Duration;
/// use fencelock::parse_duration;
/// assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
/// assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
/// assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
/// assert!(parse_duration("abc").is_err());
/// assert!(parse_duration("-1s").is_err());
/// ```
pub fn parse_duration(input: &str) -> Result<Duration> {
    let bad = |reason: &str| Error::BadDuration {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let text = input.trim();
    if text.is_empty() {
        return Err(bad("empty; write e.g. 500ms, 30s, 5m or 1h"));
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(bad(
            "expected a number followed by ms, s, m, h or d (e.g. 30s)",
        ));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| bad("not a number; write e.g. 500ms, 30s, 5m or 1h"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "us" | "µs" => 0.000_001,
        "m" | "min" | "mins" => 60.0,
        "h" | "hr" | "hrs" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(bad("unknown unit; use ms, s, m, h or d")),
    };
    let seconds = value * seconds_per_unit;
    // A century is far beyond any lock TTL or wait and keeps `Duration` arithmetic safe.
    if !seconds.is_finite() || seconds > 100.0 * 365.0 * 86_400.0 {
        return Err(bad("too large"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Formats a duration compactly for messages and tables (`1.5s`, `250ms`, `2m30s`).
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let tenths = ms / 100;
        if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        }
    } else {
        let secs = d.as_secs();
        let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
        match (h, m, s) {
            (0, m, 0) => format!("{m}m"),
            (0, m, s) => format!("{m}m{s}s"),
            (h, 0, 0) => format!("{h}h"),
            (h, m, _) => format!("{h}h{m}m"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        for (text, want) in [
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("2d", Duration::from_secs(172_800)),
            ("0", Duration::ZERO),
            (" 250ms ", Duration::from_millis(250)),
        ] {
            assert_eq!(parse_duration(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in [
            "",
            "abc",
            "s",
            "1.2.3s",
            "5 parsecs",
            "-5s",
            "1e9999",
            "99999999999d",
        ] {
            assert!(parse_duration(text).is_err(), "{text} was accepted");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(150)), "2m30s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    }
}
