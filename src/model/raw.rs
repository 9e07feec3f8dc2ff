//! The policy document as written, before validation: serde types that refuse unknown fields
//! and wrong types, with the field path of the first error (serde_path_to_error).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{Backend, Format, PolicyError, Side};
use crate::exit::escape_for_terminal;

fn yes() -> bool {
    true
}
fn serving() -> Side {
    Side::Serving
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
    #[serde(default, deserialize_with = "unique_keys")]
    pub sysctl: BTreeMap<String, RawScalar>,
}

/// A map that refuses a key given twice (serde_json would keep the last one silently; TOML
/// refuses such documents on its own).
fn unique_keys<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, RawScalar>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, RawScalar>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of sysctl keys")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, RawScalar>()? {
                if out.insert(k.clone(), v).is_some() {
                    return Err(de::Error::custom(format!("key {k:?} is given twice")));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
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
    #[serde(default = "serving")]
    pub side: Side,
    #[serde(default)]
    pub upstreams: Vec<String>,
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

/// serde's derived structs also accept a sequence of field values in order; a policy must
/// name its fields, so the document and every `[[notrack]]` entry must be tables/objects.
fn check_shape(top_is_list: bool, entries: Option<Vec<bool>>) -> Result<(), PolicyError> {
    let err = |path: String| PolicyError { path, reason: "must be a table (named fields), not a list".into() };
    if top_is_list {
        return Err(err(String::new()));
    }
    if let Some(i) = entries.and_then(|e| e.iter().position(|is_list| *is_list)) {
        return Err(err(format!("notrack[{i}]")));
    }
    Ok(())
}

/// Deserializes `text`; the first type or syntax error comes back with its field path.
pub(super) fn deserialize(text: &str, format: Format) -> Result<RawPolicy, PolicyError> {
    // Documents that do not even parse as plain values get the typed parser's error, which
    // carries the field path.
    match format {
        Format::Json => {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
                let entries =
                    v.get("notrack").and_then(|n| n.as_array()).map(|a| a.iter().map(|e| e.is_array()).collect());
                check_shape(v.is_array(), entries)?;
            }
        }
        Format::Toml => {
            if let Ok(v) = toml::from_str::<toml::Table>(text) {
                let entries =
                    v.get("notrack").and_then(|n| n.as_array()).map(|a| a.iter().map(|e| e.is_array()).collect());
                check_shape(false, entries)?;
            }
        }
    }
    deserialize_checked(text, format)
}

fn deserialize_checked(text: &str, format: Format) -> Result<RawPolicy, PolicyError> {
    match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            let r: Result<RawPolicy, _> = serde_path_to_error::deserialize(&mut de);
            match r {
                Ok(p) => {
                    de.end().map_err(|e| PolicyError { path: String::new(), reason: one_line(&e.to_string()) })?;
                    Ok(p)
                }
                // serde_json's messages are one line, but may echo a key holding newlines.
                Err(e) => {
                    Err(path_error(e.path().to_string(), escape_for_terminal(&e.inner().to_string()).into_owned()))
                }
            }
        }
        Format::Toml => {
            let de = toml::Deserializer::parse(text)
                .map_err(|e| PolicyError { path: String::new(), reason: one_line(&e.to_string()) })?;
            serde_path_to_error::deserialize(de).map_err(|e| path_error(e.path().to_string(), e.inner().to_string()))
        }
    }
}

fn path_error(path: String, reason: String) -> PolicyError {
    let path = if path == "." { String::new() } else { path };
    // serde_path_to_error joins map keys with dots; a sysctl key has dots of its own, so quote
    // it the way validation errors do: sysctl."net.netfilter.nf_conntrack_max".
    let path = match path.strip_prefix("sysctl.") {
        Some(key) => format!("sysctl.\"{key}\""),
        None => path,
    };
    PolicyError { path: escape_for_terminal(&path).into_owned(), reason: one_line(&reason) }
}

/// Collapses a multi-line parser message (toml shows a source excerpt) into one line, with the
/// control characters of the input it echoes (a key, the excerpt) escaped.
fn one_line(s: &str) -> String {
    escape_for_terminal(&collapse(s)).into_owned()
}

fn collapse(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::super::{parse_policy, Format};

    /// Fuzzing (issue 14) found serde's "unknown field" message echoing a key with a carriage
    /// return (a JSON `\r` escape) raw, in the path and the reason: both must stay one line.
    #[test]
    fn fuzz_unknown_key_with_control_characters_is_one_line() {
        let json = "{\"notrack\": [{\"protocols\": [\"udp\"], \"po\\r\\nrts\\u001b[2J\": [53]}]}";
        let toml = "[[notrack]]\nprotocols = [\"udp\"]\n\"po\\r\\nrts\\u001b[2J\" = [53]\n";
        for (text, format) in [(json, Format::Json), (toml, Format::Toml)] {
            let errs = parse_policy(text, format).expect_err("unknown field");
            assert_eq!(errs.len(), 1, "{errs:?}");
            let shown = errs[0].to_string();
            assert!(!shown.chars().any(char::is_control), "{format:?}: {shown:?}");
            if format == Format::Json {
                assert!(shown.contains("unknown field `po\\r\\nrts\\u{1b}[2J`"), "{shown:?}");
            }
        }
    }
}
