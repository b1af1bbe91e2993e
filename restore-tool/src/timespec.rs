//! Reading the times an operator types: `--time` and `--tz`.
//!
//! Accepted `--time` forms:
//!
//! - RFC 3339 with an offset: `2026-11-23T13:30:00Z`, `2026-11-23T15:30:00.250+02:00`
//!   (a space instead of the `T` works too);
//! - a local date and time without an offset: `2026-11-23 13:30:00` (or with `T`, with or
//!   without fractional seconds), read as UTC unless `--tz` gives a fixed offset;
//! - a time relative to now: `90s ago`, `15m ago`, `2h ago`, `1d ago`, `1h30m ago`
//!   (units: s, m, h, d, w and their long forms).
//!
//! `--tz` takes `UTC`, `Z` or a fixed offset: `+02:00`, `-0530`, `+2`. Named zones
//! (`Europe/Berlin`) are not supported: they need a time-zone database, and a local time in a
//! daylight-saving change is ambiguous, which a restore must never guess about.

use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Examples shown with every error about a time.
pub const TIME_EXAMPLES: &str = "accepted forms: 2026-11-23T13:30:00Z or \
     2026-11-23T15:30:00+02:00 (RFC 3339), \"2026-11-23 13:30:00\" (UTC, or the offset given \
     with --tz), \"15m ago\", \"2h ago\", \"90s ago\", \"1h30m ago\"";

/// A `--time` or `--tz` value that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {what} {input:?}: {reason}; {examples}")]
pub struct TimeSpecError {
    /// `--time` or `--tz`.
    pub what: &'static str,
    pub input: String,
    pub reason: String,
    pub examples: &'static str,
}

fn time_err(input: &str, reason: impl Into<String>) -> TimeSpecError {
    TimeSpecError {
        what: "--time",
        input: input.to_owned(),
        reason: reason.into(),
        examples: TIME_EXAMPLES,
    }
}

fn tz_err(input: &str, reason: impl Into<String>) -> TimeSpecError {
    TimeSpecError {
        what: "--tz",
        input: input.to_owned(),
        reason: reason.into(),
        examples: "accepted forms: UTC, Z, +02:00, -05:30, +0200, +2",
    }
}

/// Reads a `--time` value. `tz` applies to times written without an offset; `now` anchors
/// relative times. The result is in UTC.
pub fn parse_time(
    input: &str,
    tz: UtcOffset,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, TimeSpecError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(time_err(input, "it is empty"));
    }
    let lower = s.to_ascii_lowercase();
    if let Some(rest) = lower.strip_suffix("ago") {
        let d = parse_relative(input, rest.trim())?;
        return now
            .checked_sub(d)
            .map(|t| t.to_offset(UtcOffset::UTC))
            .ok_or_else(|| time_err(input, "it is too far in the past"));
    }
    if lower.starts_with(|c: char| c.is_ascii_digit())
        && lower.ends_with(|c: char| c.is_ascii_alphabetic())
        && lower
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '.')
    {
        return Err(time_err(
            input,
            "a relative time must end with \"ago\", such as \"15m ago\"",
        ));
    }
    parse_absolute(input, s, tz)
}

/// Reads a `--tz` value: UTC or a fixed offset.
pub fn parse_tz(input: &str) -> Result<UtcOffset, TimeSpecError> {
    let s = input.trim();
    if s.eq_ignore_ascii_case("utc") || s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("gmt")
    {
        return Ok(UtcOffset::UTC);
    }
    if s.contains('/') || s.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(tz_err(
            input,
            "named time zones are not supported (they need a time-zone database, and local \
             times in a daylight-saving change are ambiguous); give the fixed offset that was in \
             effect, or a time with an offset",
        ));
    }
    parse_offset(s).ok_or_else(|| tz_err(input, "not an offset from UTC"))
}

/// `+HH:MM`, `-HHMM`, `+HH`, `+H`.
fn parse_offset(s: &str) -> Option<UtcOffset> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1i8, &s[1..]),
        b'-' => (-1i8, &s[1..]),
        _ => return None,
    };
    let (h, m) = if let Some((h, m)) = rest.split_once(':') {
        (h, m)
    } else if rest.len() == 4 {
        rest.split_at(2)
    } else {
        (rest, "0")
    };
    if h.is_empty() || h.len() > 2 || m.is_empty() || m.len() > 2 {
        return None;
    }
    if !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: i8 = h.parse().ok()?;
    let m: i8 = m.parse().ok()?;
    if h > 23 || m > 59 {
        return None;
    }
    UtcOffset::from_hms(sign * h, sign * m, 0).ok()
}

fn parse_relative(input: &str, s: &str) -> Result<Duration, TimeSpecError> {
    if s.is_empty() {
        return Err(time_err(
            input,
            "\"ago\" needs an amount before it, such as \"15m ago\"",
        ));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(time_err(
                input,
                format!("expected a whole number at {rest:?}"),
            ));
        }
        let n: i64 = rest[..digits]
            .parse()
            .map_err(|_| time_err(input, "the number is too large"))?;
        rest = rest[digits..].trim_start();
        if rest.starts_with(['.', ',']) {
            return Err(time_err(
                input,
                "amounts must be whole numbers; write \"90m ago\" instead of \"1.5h ago\"",
            ));
        }
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..letters];
        let secs_per_unit: i64 = match unit {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 7 * 86_400,
            "" => {
                return Err(time_err(
                    input,
                    format!("{n} has no unit; use s, m, h, d or w (\"{n}m ago\")"),
                ));
            }
            other => {
                return Err(time_err(
                    input,
                    format!("unknown unit {other:?}; use s, m, h, d or w"),
                ));
            }
        };
        let secs = n
            .checked_mul(secs_per_unit)
            .ok_or_else(|| time_err(input, "the amount is too large"))?;
        total = total
            .checked_add(Duration::seconds(secs))
            .ok_or_else(|| time_err(input, "the amount is too large"))?;
        rest = rest[letters..].trim_start();
    }
    Ok(total)
}

/// A little cursor over ASCII digits and separators.
struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize) -> Option<u32> {
        let end = self.at.checked_add(n)?;
        let part = self.s.get(self.at..end)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.at = end;
        Some(part.iter().fold(0, |v, d| v * 10 + u32::from(d - b'0')))
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn rest(&self) -> &[u8] {
        &self.s[self.at..]
    }
}

fn parse_absolute(input: &str, s: &str, tz: UtcOffset) -> Result<OffsetDateTime, TimeSpecError> {
    let mut c = Cursor {
        s: s.as_bytes(),
        at: 0,
    };
    let shape = "expected YYYY-MM-DD HH:MM:SS";
    let year = c.digits(4).ok_or_else(|| time_err(input, shape))?;
    let ok = c.eat(b'-');
    let month = c.digits(2).filter(|_| ok);
    let ok = c.eat(b'-');
    let day = c.digits(2).filter(|_| ok);
    let (Some(month), Some(day)) = (month, day) else {
        return Err(time_err(input, shape));
    };
    if c.rest().is_empty() {
        return Err(time_err(
            input,
            "a date alone is ambiguous; add the time of day, such as \"2026-11-23 00:00:00\"",
        ));
    }
    if !(c.eat(b'T') || c.eat(b't') || c.eat(b' ')) {
        return Err(time_err(
            input,
            "expected 'T' or a space between date and time",
        ));
    }
    let hour = c.digits(2);
    let ok = c.eat(b':');
    let minute = c.digits(2).filter(|_| ok);
    let ok = c.eat(b':');
    let second = c.digits(2).filter(|_| ok);
    let (Some(hour), Some(minute), Some(second)) = (hour, minute, second) else {
        return Err(time_err(input, "expected the time of day as HH:MM:SS"));
    };
    let mut nanos = 0u32;
    if c.eat(b'.') || c.eat(b',') {
        let digits = c.rest().iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return Err(time_err(input, "fractional seconds need 1 to 9 digits"));
        }
        let frac = c.digits(digits).expect("counted digits");
        nanos = frac * 10u32.pow(9 - digits as u32);
    }
    let offset = match c.peek() {
        None => tz,
        Some(b'Z' | b'z') => {
            c.at += 1;
            UtcOffset::UTC
        }
        Some(b'+' | b'-') => {
            let text = std::str::from_utf8(c.rest()).unwrap_or("");
            let off = parse_offset(text).ok_or_else(|| {
                time_err(input, format!("{text:?} is not an offset such as +02:00"))
            })?;
            c.at = c.s.len();
            off
        }
        Some(b' ') => {
            return Err(time_err(
                input,
                "unexpected text after the time; time zone names are not supported, give an \
                 offset such as +02:00 or use --tz",
            ));
        }
        Some(_) => return Err(time_err(input, "unexpected text after the time")),
    };
    if !c.rest().is_empty() {
        return Err(time_err(input, "unexpected text after the offset"));
    }
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or_else(|| time_err(input, format!("month {month} does not exist")))?;
    let date = Date::from_calendar_date(year as i32, month, day as u8).map_err(|_| {
        time_err(
            input,
            format!("{year:04}-{:02}-{day:02} is not a date", month as u8),
        )
    })?;
    let time =
        Time::from_hms_nano(hour as u8, minute as u8, second as u8, nanos).map_err(|_| {
            time_err(
                input,
                format!("{hour:02}:{minute:02}:{second:02} is not a time of day"),
            )
        })?;
    Ok(PrimitiveDateTime::new(date, time)
        .assume_offset(offset)
        .to_offset(UtcOffset::UTC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-23 14:00:00 UTC);

    fn t(s: &str) -> OffsetDateTime {
        parse_time(s, UtcOffset::UTC, NOW).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn rfc3339_with_offsets() {
        assert_eq!(
            t("2026-11-23T13:30:00Z"),
            datetime!(2026-11-23 13:30:00 UTC)
        );
        assert_eq!(
            t("2026-11-23t13:30:00z"),
            datetime!(2026-11-23 13:30:00 UTC)
        );
        assert_eq!(
            t("2026-11-23T15:30:00.250+02:00"),
            datetime!(2026-11-23 13:30:00.25 UTC)
        );
        assert_eq!(
            t("2026-11-23 08:00:00-0530"),
            datetime!(2026-11-23 13:30:00 UTC)
        );
        assert_eq!(
            t("2026-11-23T13:30:00.123456789Z"),
            datetime!(2026-11-23 13:30:00.123456789 UTC)
        );
    }

    #[test]
    fn naive_times_use_utc_or_the_given_offset() {
        assert_eq!(t("2026-11-23 13:30:00"), datetime!(2026-11-23 13:30:00 UTC));
        assert_eq!(
            t("2026-11-23T13:30:00.5"),
            datetime!(2026-11-23 13:30:00.5 UTC)
        );
        let plus2 = parse_tz("+02:00").unwrap();
        assert_eq!(
            parse_time("2026-11-23 15:30:00", plus2, NOW).unwrap(),
            datetime!(2026-11-23 13:30:00 UTC)
        );
        // An explicit offset wins over --tz.
        assert_eq!(
            parse_time("2026-11-23T13:30:00Z", plus2, NOW).unwrap(),
            datetime!(2026-11-23 13:30:00 UTC)
        );
    }

    #[test]
    fn relative_times() {
        assert_eq!(t("15m ago"), datetime!(2026-11-23 13:45:00 UTC));
        assert_eq!(t("2h ago"), datetime!(2026-11-23 12:00:00 UTC));
        assert_eq!(t("90s ago"), datetime!(2026-11-23 13:58:30 UTC));
        assert_eq!(t("1h30m ago"), datetime!(2026-11-23 12:30:00 UTC));
        assert_eq!(t("1 day ago"), datetime!(2026-11-22 14:00:00 UTC));
        assert_eq!(t("  3 minutes AGO "), datetime!(2026-11-23 13:57:00 UTC));
    }

    #[test]
    fn malformed_times_say_what_is_wrong_and_show_examples() {
        for (input, needle) in [
            ("", "empty"),
            ("yesterday", "expected YYYY-MM-DD"),
            ("15m", "must end with \"ago\""),
            ("ago", "needs an amount"),
            ("15 ago", "has no unit"),
            ("15y ago", "unknown unit"),
            ("1.5h ago", "whole numbers"),
            ("2026-11-23", "date alone"),
            ("2026-13-01 00:00:00", "month 13"),
            ("2026-02-30 00:00:00", "is not a date"),
            ("2026-11-23 25:00:00", "not a time of day"),
            ("2026-11-23 13:30", "HH:MM:SS"),
            ("2026-11-23 13:30:00 CET", "time zone names"),
            ("2026-11-23T13:30:00+2:0:0", "not an offset"),
            ("2026/11/23 13:30:00", "expected YYYY-MM-DD"),
        ] {
            let e = parse_time(input, UtcOffset::UTC, NOW).expect_err(input);
            let msg = e.to_string();
            assert!(msg.contains(needle), "{input:?}: {msg}");
            assert!(msg.contains("15m ago") && msg.contains("RFC 3339"), "{msg}");
        }
    }

    #[test]
    fn time_zones() {
        assert_eq!(parse_tz("UTC").unwrap(), UtcOffset::UTC);
        assert_eq!(parse_tz("z").unwrap(), UtcOffset::UTC);
        assert_eq!(
            parse_tz("+02:00").unwrap(),
            UtcOffset::from_hms(2, 0, 0).unwrap()
        );
        assert_eq!(
            parse_tz("-0530").unwrap(),
            UtcOffset::from_hms(-5, -30, 0).unwrap()
        );
        assert_eq!(
            parse_tz("+2").unwrap(),
            UtcOffset::from_hms(2, 0, 0).unwrap()
        );
        let e = parse_tz("Europe/Berlin").unwrap_err().to_string();
        assert!(e.contains("named time zones are not supported"), "{e}");
        assert!(parse_tz("CET").is_err());
        assert!(parse_tz("+25:00").is_err());
        assert!(parse_tz("02:00").is_err());
    }
}
