//! Legal ranges for numbers, durations and sizes, and the checks that apply them. Every
//! numeric key of the schema is checked against its range at load and on every reload (see
//! `load::validate`). A value outside its range is refused with its key, the range and the
//! value written, rather than being clamped or left to fail later.
//!
//! Upper bounds matter as much as lower ones: a duration added to `Instant::now()` or
//! multiplied by a count panics on overflow, and a rate turned into a wait
//! (`Duration::from_secs_f64`) panics on infinity. Keeping every value in a sane range here is
//! what keeps a reload from being able to crash a worker.

use std::time::Duration;

/// A refused value: the key and what is wrong with it.
pub(super) type Invalid = (String, String);

pub(super) const MS: Duration = Duration::from_millis(1);
pub(super) const SECOND: Duration = Duration::from_secs(1);
pub(super) const MINUTE: Duration = Duration::from_secs(60);
pub(super) const HOUR: Duration = Duration::from_secs(3600);
pub(super) const DAY: Duration = Duration::from_secs(86_400);

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;

/// A duration in `min..=max`.
pub(super) fn duration(key: &str, value: Duration, min: Duration, max: Duration) -> Result<(), Invalid> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err((key.into(), format!("must be between {} and {}, got {}", show(min), show(max), show(value))))
}

/// A duration that is 0 (off) or in `min..=max`.
pub(super) fn duration_or_off(key: &str, value: Duration, min: Duration, max: Duration) -> Result<(), Invalid> {
    if value.is_zero() || (min..=max).contains(&value) {
        return Ok(());
    }
    Err((key.into(), format!("must be 0 (off) or between {} and {}, got {}", show(min), show(max), show(value))))
}

/// A size in bytes in `min..=max`.
pub(super) fn size(key: &str, value: u64, min: u64, max: u64) -> Result<(), Invalid> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err((key.into(), format!("must be between {} and {}, got {}", bytes(min), bytes(max), bytes(value))))
}

/// A size that is 0 (off) or in `min..=max`.
pub(super) fn size_or_off(key: &str, value: u64, min: u64, max: u64) -> Result<(), Invalid> {
    if value == 0 || (min..=max).contains(&value) {
        return Ok(());
    }
    Err((key.into(), format!("must be 0 (off) or between {} and {}, got {}", bytes(min), bytes(max), bytes(value))))
}

/// A count in `min..=max`.
pub(super) fn count(key: &str, value: u64, min: u64, max: u64) -> Result<(), Invalid> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err((key.into(), format!("must be {min}..={max}, got {value}")))
}

/// A count that is 0 (off) or in `min..=max`.
pub(super) fn count_or_off(key: &str, value: u64, min: u64, max: u64) -> Result<(), Invalid> {
    if value == 0 || (min..=max).contains(&value) {
        return Ok(());
    }
    Err((key.into(), format!("must be 0 (off) or {min}..={max}, got {value}")))
}

/// A rate (per second, fractional) in `min..=max`; NaN and infinities are never in range.
pub(super) fn rate(key: &str, value: f64, min: f64, max: f64) -> Result<(), Invalid> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err((key.into(), format!("must be between {min} and {max} per second, got {value}")))
}

/// Adds why a range is what it is (a protocol limit) to a refusal.
pub(super) fn because(result: Result<(), Invalid>, why: &str) -> Result<(), Invalid> {
    result.map_err(|(key, problem)| (key, format!("{problem} ({why})")))
}

/// `100ms`, `10m`, `1d`: the largest unit that divides the duration, as written in the file.
fn show(d: Duration) -> String {
    let units = [(DAY, "d"), (HOUR, "h"), (MINUTE, "m"), (SECOND, "s"), (MS, "ms")];
    if d.is_zero() {
        return "0s".into();
    }
    match units.iter().find(|(unit, _)| d.as_nanos().is_multiple_of(unit.as_nanos())) {
        Some((unit, name)) => format!("{}{name}", d.as_nanos() / unit.as_nanos()),
        None => humantime::format_duration(d).to_string(),
    }
}

/// `64KiB`, `1GiB`, or plain bytes when no binary unit divides the value.
fn bytes(n: u64) -> String {
    match n {
        0 => "0".into(),
        1 => "1 byte".into(),
        n if n.is_multiple_of(GIB) => format!("{}GiB", n / GIB),
        n if n.is_multiple_of(MIB) => format!("{}MiB", n / MIB),
        n if n.is_multiple_of(KIB) => format!("{}KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_show_the_range_and_the_value_as_written() {
        let (key, problem) = duration("timeouts.connect", Duration::ZERO, MS, 10 * MINUTE).unwrap_err();
        assert_eq!((key.as_str(), problem.as_str()), ("timeouts.connect", "must be between 1ms and 10m, got 0s"));
        let (_, problem) = duration("k", 1500 * MS, 2 * SECOND, DAY).unwrap_err();
        assert_eq!(problem, "must be between 2s and 1d, got 1500ms");
        let (_, problem) = duration_or_off("k", 5 * MS, 100 * MS, HOUR).unwrap_err();
        assert_eq!(problem, "must be 0 (off) or between 100ms and 1h, got 5ms");
        assert!(duration_or_off("k", Duration::ZERO, 100 * MS, HOUR).is_ok());
        let (_, problem) = size("k", 4 * GIB, 65_535, (1 << 31) - 1).unwrap_err();
        assert_eq!(problem, "must be between 65535 bytes and 2147483647 bytes, got 4GiB");
        let (_, problem) = size_or_off("k", 2 * GIB, 1, GIB).unwrap_err();
        assert_eq!(problem, "must be 0 (off) or between 1 byte and 1GiB, got 2GiB");
        assert_eq!(count("k", 0, 1, 100).unwrap_err().1, "must be 1..=100, got 0");
        assert!(count_or_off("k", 0, 1, 100).is_ok());
        assert!(rate("k", f64::NAN, 0.001, 1e9).is_err());
        assert!(rate("k", f64::INFINITY, 0.001, 1e9).is_err());
        assert!(rate("k", 0.5, 0.001, 1e9).is_ok());
        let (_, problem) = because(count("k", 7, 0, 6), "QUIC-LB").unwrap_err();
        assert_eq!(problem, "must be 0..=6, got 7 (QUIC-LB)");
    }
}
