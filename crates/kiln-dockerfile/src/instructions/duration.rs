//! Go `time.ParseDuration`, for HEALTHCHECK intervals: a sequence of decimal numbers with units
//! (`ns`, `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`), optionally signed, such as `1m30s` or `1.5h`.

use std::time::Duration;

/// Why a duration string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    #[error(
        "invalid duration `{0}`: expected a number with a unit such as `30s`, `1m30s` or `500ms`"
    )]
    Invalid(String),
    #[error("invalid duration `{0}`: missing unit (use `s`, `m`, `h`, `ms`, `us` or `ns`)")]
    MissingUnit(String),
    #[error(
        "invalid duration `{input}`: unknown unit `{unit}` (use `s`, `m`, `h`, `ms`, `us` or `ns`)"
    )]
    UnknownUnit { input: String, unit: String },
    #[error("invalid duration `{0}`: too large")]
    Overflow(String),
}

/// A parsed Go duration: nanoseconds, possibly negative.
pub fn parse_go_duration(input: &str) -> Result<i128, DurationError> {
    let invalid = || DurationError::Invalid(input.to_owned());
    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        let mut rest = rest;
        let mut frac_part = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = rest.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(rest.len());
        let (unit, tail) = rest.split_at(unit_len);
        if unit.is_empty() {
            return Err(DurationError::MissingUnit(input.to_owned()));
        }
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    input: input.to_owned(),
                    unit: unit.to_owned(),
                });
            }
        };
        let overflow = || DurationError::Overflow(input.to_owned());
        let whole: i128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse::<i128>().map_err(|_| overflow())?
        };
        let mut value = whole.checked_mul(scale).ok_or_else(overflow)?;
        if !frac_part.is_empty() {
            // Like Go: fraction digits until overflow, scaled in floating point.
            let mut frac: u64 = 0;
            let mut denom: f64 = 1.0;
            for d in frac_part.bytes() {
                if frac > (i64::MAX as u64) / 10 {
                    break;
                }
                let next = frac * 10 + u64::from(d - b'0');
                if next > 1 << 63 {
                    break;
                }
                frac = next;
                denom *= 10.0;
            }
            #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
            let extra = (frac as f64 * (scale as f64 / denom)) as i128;
            value += extra;
        }
        total = total.checked_add(value).ok_or_else(overflow)?;
        if total > i128::from(i64::MAX) {
            return Err(overflow());
        }
        s = tail;
    }
    Ok(if negative { -total } else { total })
}

/// Converts a non-negative nanosecond count to a [`Duration`].
pub fn to_duration(nanos: i128) -> Duration {
    let n = u64::try_from(nanos.max(0)).unwrap_or(u64::MAX);
    Duration::from_nanos(n)
}

/// Formats a duration the way Go's `time.Duration.String` does (`1m30s`, `500ms`, `0s`).
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000_000_000 {
        let (unit, div) = if nanos < 1_000 {
            ("ns", 1)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", trim_fraction(nanos, div));
    }
    let total_secs = nanos / 1_000_000_000;
    let h = total_secs / 3600;
    let m = (total_secs % 3600) / 60;
    let s_nanos = nanos - (h * 3600 + m * 60) * 1_000_000_000;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", trim_fraction(s_nanos, 1_000_000_000)));
    out
}

fn trim_fraction(value: u128, div: u128) -> String {
    let whole = value / div;
    let frac = value % div;
    if frac == 0 {
        return whole.to_string();
    }
    let width = div.to_string().len() - 1;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_go() {
        for (input, want) in [
            ("0", 0_i128),
            ("5s", 5_000_000_000),
            ("30s", 30_000_000_000),
            ("1478s", 1_478_000_000_000),
            ("-5s", -5_000_000_000),
            ("+5s", 5_000_000_000),
            ("-0", 0),
            ("5.0s", 5_000_000_000),
            ("5.6s", 5_600_000_000),
            ("5.s", 5_000_000_000),
            (".5s", 500_000_000),
            ("1.004s", 1_004_000_000),
            ("100.00100s", 100_001_000_000),
            ("10ns", 10),
            ("11us", 11_000),
            ("12µs", 12_000),
            ("12μs", 12_000),
            ("13ms", 13_000_000),
            ("14s", 14_000_000_000),
            ("15m", 900_000_000_000),
            ("16h", 57_600_000_000_000),
            ("3h30m", 12_600_000_000_000),
            ("10.5s4m", 250_500_000_000),
            ("-2m3.4s", -123_400_000_000),
            ("1h2m3s4ms5us6ns", 3_723_004_005_006),
            ("39h9m14.425s", 140_954_425_000_000),
            ("0.3333333333333333333h", 1_200_000_000_000),
        ] {
            assert_eq!(parse_go_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_like_go() {
        for input in ["", "3", "-", "s", ".", "-.", ".s", "+.s", "1d", "3000000h", "1.5x"] {
            assert!(parse_go_duration(input).is_err(), "{input}");
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
    }
}
