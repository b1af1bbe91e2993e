//! The duration format of config files and reports: `500ms`, `1s`, `15m`, `24h`, `7d`
//! (for `#[serde(with = "crate::duration_format")]`).

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?}: {e} (examples: 500ms, 1s, 15m, 24h, 7d)"
        ))
    })
}
