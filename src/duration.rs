//! Durations as the CLI takes them (DESIGN §5): `90`, `90s`, `5m`, `1h`. Pure.

use std::time::Duration;

/// Longest duration ctguard accepts for a deadline (one week).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Parses `N`, `Ns`, `Nm` or `Nh` (N a positive integer); at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?} is not a duration (use 90, 90s, 5m or 1h)")),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (use 90, 90s, 5m or 1h)"))?;
    if n == 0 {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    let d = Duration::from_secs(n.saturating_mul(mult));
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than the limit of 7 days"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1000h").is_err());
    }
}
