//! Pure helpers for the API's textual amounts: Kubernetes memory/disk quantities ("4Gi",
//! "512Mi", "1.5G") and durations ("30s", "15m", "2h"). The regexes that the CRD schema enforces
//! live here too, so the schema and the parser agree.

use std::time::Duration;

/// Schema pattern of a memory or disk quantity: a plain number with an optional binary (Ki..Ei)
/// or decimal (k..E) suffix. Rejects "4GB", "-1Gi" and "4 Gi".
pub const QUANTITY_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
/// Schema pattern of a duration: a whole number of seconds, minutes, hours or days.
pub const DURATION_PATTERN: &str = r"^[0-9]{1,6}(s|m|h|d)$";

/// Why a quantity or duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity like 512Mi or 4Gi")]
    Malformed(String),
    #[error("{0:?} is too large")]
    Overflow(String),
    #[error("{0:?} is not a duration like 30s, 15m or 2h")]
    MalformedDuration(String),
}

const SUFFIXES: &[(&str, u64)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

/// Parses a quantity into bytes, rounding a fraction up to the next byte.
pub fn parse_bytes(q: &str) -> Result<u64, QuantityError> {
    let malformed = || QuantityError::Malformed(q.to_string());
    let (number, mult) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
        .unwrap_or((q, 1));
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (number.contains('.') && !digits(frac)) {
        return Err(malformed());
    }
    let overflow = || QuantityError::Overflow(q.to_string());
    let whole: u64 = int.parse().map_err(|_| overflow())?;
    let mut total = whole.checked_mul(mult).ok_or_else(overflow)?;
    if !frac.is_empty() {
        // fraction * mult, rounded up; limit precision to keep the arithmetic in u128
        let frac = &frac[..frac.len().min(18)];
        let num: u128 = frac.parse().map_err(|_| malformed())?;
        let den: u128 = 10u128.pow(frac.len() as u32);
        let part = (num * mult as u128).div_ceil(den);
        total = total
            .checked_add(u64::try_from(part).map_err(|_| overflow())?)
            .ok_or_else(overflow)?;
    }
    Ok(total)
}

/// Formats bytes as the shortest exact binary quantity ("4Gi", "1536Mi", "100").
pub fn format_bytes(bytes: u64) -> String {
    for (suffix, mult) in SUFFIXES[..6].iter().rev() {
        if bytes != 0 && bytes.is_multiple_of(*mult) {
            return format!("{}{}", bytes / mult, suffix);
        }
    }
    bytes.to_string()
}

/// Formats bytes for humans, rounded to one decimal ("3.9Gi"). Not for round-tripping.
pub fn format_bytes_approx(bytes: u64) -> String {
    let units = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{}{}", value as u64, units[unit])
    } else {
        format!("{:.1}{}", value, units[unit])
    }
}

/// Parses a duration such as "30s", "15m", "2h" or "7d".
pub fn parse_duration(d: &str) -> Result<Duration, QuantityError> {
    let bad = || QuantityError::MalformedDuration(d.to_string());
    let unit = d.chars().last().ok_or_else(bad)?;
    let n: u64 = d[..d.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => n,
        'm' => n.checked_mul(60).ok_or_else(bad)?,
        'h' => n.checked_mul(3600).ok_or_else(bad)?,
        'd' => n.checked_mul(86_400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

/// Formats a duration in the largest unit that divides it exactly ("90s", "15m", "2h").
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("4Gi"), Ok(4 << 30));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1k"), Ok(1000));
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn parses_fractions_rounding_up() {
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("0.5Ki"), Ok(512));
        assert_eq!(parse_bytes("0.1"), Ok(1));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for bad in [
            "4GB", "", "Gi", "-1Gi", "4 Gi", "1.Gi", ".5Gi", "4gi", "1e3",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert!(matches!(
            parse_bytes("16Ei"),
            Err(QuantityError::Overflow(_))
        ));
        assert!(matches!(
            parse_bytes("99999999999999999999999"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn format_round_trips() {
        for b in [
            0u64,
            1,
            1023,
            1024,
            4 << 30,
            1536 << 20,
            (1 << 40) + (1 << 20),
        ] {
            assert_eq!(parse_bytes(&format_bytes(b)), Ok(b));
        }
        assert_eq!(format_bytes(4 << 30), "4Gi");
        assert_eq!(format_bytes(1536 << 20), "1536Mi");
    }

    #[test]
    fn approx_for_humans() {
        assert_eq!(format_bytes_approx(4 << 30), "4Gi");
        assert_eq!(format_bytes_approx((4 << 30) - (100 << 20)), "3.9Gi");
        assert_eq!(format_bytes_approx(512), "512");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in [
            "",
            "s",
            "10",
            "10w",
            "-1s",
            "1.5h",
            "ü",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(900)), "15m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    }
}
