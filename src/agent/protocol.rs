//! The agent's socket protocol (DESIGN §2): one JSON object per line each way, versioned. The
//! CLI validates input before sending; the agent validates again (it trusts no client).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Protocol version; a request with another version is refused (exit 2).
pub const VERSION: u32 = 1;

/// Largest request line the agent reads (rulesets are at most 64 MiB; JSON escaping adds some).
pub const MAX_REQUEST_BYTES: usize = 96 << 20;

/// A request, with its version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// [`VERSION`].
    pub v: u32,
    /// The operation.
    #[serde(flatten)]
    pub request: Request,
}

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
// One short-lived request per connection: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Is the agent there? Answers with its pid.
    Ping,
    /// Start a policy transaction.
    Apply(ApplyRequest),
    /// Confirm a pending transaction (the single one — of `netns` when given — when `txid` is
    /// absent).
    Confirm {
        /// Transaction id.
        txid: Option<String>,
        /// `--netns`: picks that target's transaction when `txid` is absent.
        #[serde(default)]
        netns: Option<String>,
    },
    /// Move a pending transaction's deadline later (at most [`MAX_EXTEND_SECS`] from now).
    Extend {
        /// Transaction id.
        txid: Option<String>,
        /// Seconds to add to the current deadline.
        by_secs: u64,
        /// `--netns`, as for `Confirm`.
        #[serde(default)]
        netns: Option<String>,
    },
    /// Roll a pending transaction back now; answers when the rollback is complete.
    Rollback {
        /// Transaction id.
        txid: Option<String>,
        /// `--netns`, as for `Confirm`.
        #[serde(default)]
        netns: Option<String>,
    },
    /// What the agent holds in memory: every unfinished transaction and its phase.
    Status,
}

/// Longest `--comment`.
pub const MAX_COMMENT_CHARS: usize = 200;

/// Checks a `--comment`: one line of printable text, at most [`MAX_COMMENT_CHARS`] characters.
pub fn check_comment(c: &str) -> Result<(), String> {
    if c.chars().count() > MAX_COMMENT_CHARS {
        return Err(format!("--comment: longer than {MAX_COMMENT_CHARS} characters"));
    }
    if c.chars().any(char::is_control) {
        return Err("--comment: control characters (a newline, an escape) are not allowed".into());
    }
    Ok(())
}

/// Latest deadline `extend` may set, counted from now (7 days, the `--timeout` maximum).
pub const MAX_EXTEND_SECS: u64 = 7 * 24 * 3600;

/// `apply` parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// Policy document; `None` = the built-in policy.
    pub policy_text: Option<String>,
    /// `"toml"` or `"json"`.
    pub policy_format: Option<String>,
    /// `--netns`; `None` = the caller's network namespace.
    pub netns: Option<String>,
    /// The namespace `netns` named for the CLI (device, inode): the agent refuses a path that
    /// resolves to another namespace for it.
    #[serde(default)]
    pub netns_id: Option<(u64, u64)>,
    /// Dead-man timeout in seconds.
    pub timeout_secs: u64,
    /// Apply despite lint errors.
    pub force: bool,
    /// The requester's `SSH_CONNECTION`, if any (the lint's lockout check).
    pub ssh: Option<String>,
    /// A ruleset transaction instead of a policy one.
    #[serde(default)]
    pub ruleset: Option<crate::agent::engine::RulesetInput>,
    /// Why (`--comment`): one line, at most [`MAX_COMMENT_CHARS`] characters.
    #[serde(default)]
    pub comment: Option<String>,
    /// `--from TXID`: the committed transaction whose content this one re-applies.
    #[serde(default)]
    pub from: Option<String>,
    /// Proof, probes and persistence options (journaled as they are).
    #[serde(flatten)]
    pub options: crate::txn::TxnOptions,
}

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// [`VERSION`].
    pub v: u32,
    /// The exit code the CLI must return (DESIGN §5).
    pub exit: i32,
    /// One-line error, when `exit != 0`.
    #[serde(default)]
    pub error: Option<String>,
    /// Verb-specific data.
    #[serde(default)]
    pub data: Value,
}

impl Response {
    /// A success with data.
    pub fn ok(data: Value) -> Response {
        Response { v: VERSION, exit: 0, error: None, data }
    }
    /// A failure.
    pub fn fail(exit: crate::exit::Exit, error: impl Into<String>) -> Response {
        Response { v: VERSION, exit: exit.code(), error: Some(error.into()), data: Value::Null }
    }
}
