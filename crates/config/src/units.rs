//! Human units in configuration: sizes ("64MiB") and durations ("5s").

use std::time::Duration;

/// Parses `"<integer><unit>"` with units B, KB, KiB, MB, MiB, GB, GiB (or a
/// bare number of bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{s:?} is not a size; accepted: an integer with a unit B, KiB, MiB, GiB, KB, MB or GB, such as \"64MiB\""
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// Parses `"<integer><unit>"` with units ms, s, m, h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{s:?} is not a duration; accepted: an integer with a unit ms, s, m or h, such as \"500ms\" or \"5s\""
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    };
    ms.map(Duration::from_millis).ok_or_else(bad)
}
