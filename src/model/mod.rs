//! The policy model (DESIGN §6): parsing TOML/JSON, validation with field paths, the built-in
//! policy and the `"auto"` formulas. Pure: no file, no kernel.

pub mod auto;
pub mod names;
mod policy;
mod raw;
mod validate;
pub use validate::parse_prefix;

pub use policy::*;

use std::fmt;

/// Largest policy file ctguard reads (1 MiB); larger input is refused before parsing.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

/// Serialization format of a policy document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML (the default).
    Toml,
    /// JSON (what Ansible passes).
    Json,
}

impl Format {
    /// `.json` files and documents starting with `{` are JSON; everything else is TOML.
    pub fn detect(path: Option<&str>, text: &str) -> Format {
        if path.is_some_and(|p| p.ends_with(".json")) || text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Toml
        }
    }
}

/// One problem found in a policy: where (a field path such as `notrack[0].ports[2]`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Field path; empty for the document as a whole.
    pub path: String,
    /// Reason, one line.
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "policy: {}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Parses and validates a policy. Returns every problem found (syntax and type errors stop at
/// the first one, as the parser cannot go on; validation errors are all collected).
pub fn parse_policy(text: &str, format: Format) -> Result<Policy, Vec<PolicyError>> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(vec![PolicyError {
            path: String::new(),
            reason: format!("document is {} bytes, more than the {} byte limit", text.len(), MAX_POLICY_BYTES),
        }]);
    }
    let raw = raw::deserialize(text, format).map_err(|e| vec![e])?;
    validate::validate(raw)
}
