//! Value types that accept what operators write: `30s`, `250ms`, `1MiB`, or plain numbers.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A duration written as a humantime string (`"2s"`, `"250ms"`, `"1m 30s"`) or plain seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration such as `30s`, `250ms` or a number of seconds")
        })? {
            Raw::Int(s) => Ok(Seconds(Duration::from_secs(s))),
            Raw::Float(s) if s.is_finite() && s >= 0.0 => Ok(Seconds(Duration::from_secs_f64(s))),
            Raw::Float(s) => Err(serde::de::Error::custom(format!("invalid duration {s}"))),
            Raw::Text(t) => humantime::parse_duration(&t).map(Seconds).map_err(|e| {
                serde::de::Error::custom(format!("invalid duration `{t}`: {e} (write e.g. `30s` or `250ms`)"))
            }),
        }
    }
}

/// A size in bytes written as a number or with a unit (`64KiB`, `1MiB`, `1GiB`, `10MB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"16MiB"`-style text; binary (KiB) and decimal (kB) units are both understood.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 =
            num.parse().map_err(|_| format!("invalid size `{text}` (write e.g. `65536`, `64KiB` or `1MiB`)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "kb" => 1_000,
            "m" | "mib" => 1 << 20,
            "mb" => 1_000_000,
            "g" | "gib" => 1 << 30,
            "gb" => 1_000_000_000,
            other => return Err(format!("unknown size unit `{other}` in `{text}` (use B, KiB, MiB, GiB, kB, MB, GB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom("expected a size such as `65536` or `1MiB`"))? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("1MiB").unwrap().0, 1 << 20);
        assert_eq!(ByteSize::parse("64 KiB").unwrap().0, 64 << 10);
        assert_eq!(ByteSize::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(ByteSize::parse("123").unwrap().0, 123);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }
}
