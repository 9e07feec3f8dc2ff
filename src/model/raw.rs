//! The policy document as written, before validation: serde types that refuse unknown fields
//! and wrong types, with the field path of the first error (serde_path_to_error).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{Backend, Format, PolicyError};

fn yes() -> bool {
    true
}
fn auto_backend() -> Backend {
    Backend::Auto
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default = "auto_backend")]
    pub backend: Backend,
    #[serde(default)]
    pub persist: bool,
    #[serde(default)]
    pub notrack: Vec<RawNotrack>,
    #[serde(default)]
    pub sysctl: BTreeMap<String, RawScalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNotrack {
    pub protocols: Vec<String>,
    pub ports: Vec<RawScalar>,
    #[serde(default)]
    pub sources: Vec<String>,
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default = "yes")]
    pub local_only: bool,
    #[serde(default = "yes")]
    pub accept_untracked: bool,
    #[serde(default)]
    pub flush_existing: bool,
}

/// An integer or a string: ports (`53`, `"1000-2000"`) and sysctl values (`262144`, `"auto"`).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawScalar {
    Int(i128),
    Text(String),
}

impl<'de> Deserialize<'de> for RawScalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawScalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawScalar, E> {
                Ok(RawScalar::Int(v as i128))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawScalar, E> {
                Ok(RawScalar::Int(v as i128))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawScalar, E> {
                Ok(RawScalar::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Deserializes `text`; the first type or syntax error comes back with its field path.
pub(super) fn deserialize(text: &str, format: Format) -> Result<RawPolicy, PolicyError> {
    match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let r: Result<RawPolicy, _> = serde_path_to_error::deserialize(&mut de);
            match r {
                Ok(p) => {
                    de.end().map_err(|e| PolicyError { path: String::new(), reason: e.to_string() })?;
                    Ok(p)
                }
                Err(e) => Err(path_error(e.path().to_string(), e.inner().to_string())),
            }
        }
        Format::Toml => {
            let de = toml::Deserializer::parse(text).map_err(|e| PolicyError {
                path: String::new(),
                reason: one_line(&e.to_string()),
            })?;
            serde_path_to_error::deserialize(de)
                .map_err(|e| path_error(e.path().to_string(), e.inner().to_string()))
        }
    }
}

fn path_error(path: String, reason: String) -> PolicyError {
    let path = if path == "." { String::new() } else { path };
    PolicyError { path, reason: one_line(&reason) }
}

/// Collapses a multi-line parser message (toml shows a source excerpt) into one line.
fn one_line(s: &str) -> String {
    let is_excerpt = |l: &str| {
        let rest = l.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
        rest.starts_with('|') || rest.chars().all(|c| c == '^' || c == ' ')
    };
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty() && !is_excerpt(l)).collect();
    match lines.split_first() {
        Some((first, rest)) if first.starts_with("TOML parse error at ") && !rest.is_empty() => {
            format!("{} ({})", rest.join("; "), first.trim_start_matches("TOML parse error at "))
        }
        _ => lines.join("; "),
    }
}
