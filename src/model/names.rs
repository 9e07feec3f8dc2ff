//! Names that reach a ruleset or a path, validated so no string can inject a statement.
//!
//! Each type can only be built through its `parse` function, which follows the kernel's rule
//! and then narrows it to characters that need no quoting in nft or iptables-restore text.

use std::fmt;

use serde::Serialize;

/// Kernel `IFNAMSIZ`, including the terminating NUL.
pub const IFNAMSIZ: usize = 16;

/// Longest comment nft and the xt `comment` match accept (`XT_MAX_COMMENT_LEN` is 256 incl. NUL;
/// nft's `NFT_USERDATA_MAXLEN` is larger). ctguard's tags are far shorter.
pub const MAX_COMMENT_LEN: usize = 255;

/// A network interface name, valid by the kernel's `dev_valid_name` and free of characters that
/// would need quoting (`"`, `\`, `*` wildcards, whitespace, control characters).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct IfName(String);

impl IfName {
    /// Validates `s`. The kernel allows 1..=15 bytes, not `.` or `..`, no `/`, `:` or
    /// whitespace; ctguard further allows only `[A-Za-z0-9_.@+-]`.
    pub fn parse(s: &str) -> Result<IfName, String> {
        if s.is_empty() {
            return Err("an interface name cannot be empty".into());
        }
        if s.len() >= IFNAMSIZ {
            return Err(format!(
                "{:?} is {} bytes, longer than the kernel's limit of {} (IFNAMSIZ)",
                s,
                s.len(),
                IFNAMSIZ - 1
            ));
        }
        if s == "." || s == ".." {
            return Err(format!("{s:?} is not a valid interface name"));
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || "_.@+-".contains(*c))) {
            return Err(format!("{s:?} contains {c:?}; interface names may use only letters, digits and _ . @ + -"));
        }
        Ok(IfName(s.to_string()))
    }
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `net.netfilter.*` sysctl key; maps to a file under `/proc/sys/net/netfilter/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct SysctlKey(String);

/// Sysctls that only the initial network namespace can write (DESIGN §10).
pub const HOST_ONLY_SYSCTLS: &[&str] =
    &["net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_buckets", "net.netfilter.nf_conntrack_expect_max"];

impl SysctlKey {
    /// Accepts `net.netfilter.` followed by one or more `[a-z0-9_]` components joined by dots.
    /// Seed-era names (`net.ipv4.netfilter.ip_conntrack_max`, `net.nf_conntrack_max`, any
    /// `ip_conntrack_*`) are refused with the current name to use.
    pub fn parse(s: &str) -> Result<SysctlKey, String> {
        if let Some(current) = current_name_of_old_sysctl(s) {
            return Err(format!(
                "{s:?} is an old conntrack sysctl name; did you mean {current:?}? (ctguard takes the \
                 net.netfilter.nf_conntrack_* names)"
            ));
        }
        let Some(rest) = s.strip_prefix("net.netfilter.") else {
            return Err(format!("{s:?} is not a net.netfilter.* key"));
        };
        if rest.is_empty()
            || rest.split('.').any(|part| {
                part.is_empty() || !part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
        {
            return Err(format!("{s:?} is not a sysctl name (lower-case letters, digits and _ between dots)"));
        }
        if s.len() > 128 {
            return Err(format!("{s:?} is too long for a sysctl name"));
        }
        Ok(SysctlKey(s.to_string()))
    }
    /// The dotted key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Path relative to `/proc/sys`, e.g. `net/netfilter/nf_conntrack_max`.
    pub fn proc_path(&self) -> String {
        self.0.replace('.', "/")
    }
    /// True for the keys only the initial network namespace can write.
    pub fn is_host_only(&self) -> bool {
        HOST_ONLY_SYSCTLS.contains(&self.0.as_str())
    }
}

/// The `net.netfilter.nf_conntrack_*` name for an old or alias name of a conntrack sysctl:
/// `ip_conntrack_*` (kernels before 2.6.15, and the seeds' `net.ipv4.netfilter.*`), the
/// `net.nf_conntrack_max` alias, `*_hashsize` (the module parameter, `nf_conntrack_buckets` as
/// a sysctl). `None` for a current name and for anything else.
fn current_name_of_old_sysctl(s: &str) -> Option<String> {
    let last = s.rsplit('.').next()?;
    let rest = last.strip_prefix("ip_conntrack_").or_else(|| last.strip_prefix("nf_conntrack_"))?;
    if rest.is_empty() || !s.starts_with("net.") {
        return None;
    }
    let rest = match rest {
        "hashsize" | "htable_size" => "buckets",
        r => r,
    };
    let current = format!("net.netfilter.nf_conntrack_{rest}");
    (current != s).then_some(current)
}

impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tag ctguard puts in the comment of every rule it creates: `ctguard:TXID`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Tag(String);

/// Prefix of every tag.
pub const TAG_PREFIX: &str = "ctguard:";

impl Tag {
    /// Builds `ctguard:ID`; `id` must be 1..=64 of `[A-Za-z0-9-]`.
    pub fn new(id: &str) -> Result<Tag, String> {
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("{id:?} is not a transaction id (1-64 of A-Z a-z 0-9 -)"));
        }
        Ok(Tag(format!("{TAG_PREFIX}{id}")))
    }
    /// The tag used where no transaction exists yet (`render`, `plan`).
    pub fn preview() -> Tag {
        Tag(format!("{TAG_PREFIX}preview"))
    }
    /// The full comment text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// True when `comment` is a ctguard tag (any transaction).
    pub fn is_ctguard_comment(comment: &str) -> bool {
        comment.starts_with(TAG_PREFIX)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Replaces every `ctguard:ID` tag in `line` by `ctguard:preview`, so listings of different
/// transactions (and `render`'s preview) compare equal when only the tag differs.
pub fn normalize_tags(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find(TAG_PREFIX) {
        let after = &rest[i + TAG_PREFIX.len()..];
        let id_len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(after.len());
        out.push_str(&rest[..i]);
        out.push_str(Tag::preview().as_str());
        rest = &after[id_len..];
    }
    out.push_str(rest);
    out
}

/// Validates a set or chain name ctguard generates: `[a-z][a-z0-9_]{0,30}`.
pub fn check_object_name(s: &str) -> Result<(), String> {
    let mut chars = s.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !ok_first || s.len() > 31 || !s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err(format!("{s:?} is not a valid object name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        assert!(IfName::parse("eth0").is_ok());
        assert!(IfName::parse("lo").is_ok());
        assert!(IfName::parse("veth-a.100").is_ok());
        assert!(IfName::parse("123456789012345").is_ok());
        assert!(IfName::parse("1234567890123456").is_err());
        assert!(IfName::parse("").is_err());
        assert!(IfName::parse("..").is_err());
        assert!(IfName::parse("eth0\" accept").is_err());
        assert!(IfName::parse("a/b").is_err());
        assert!(IfName::parse("eth*").is_err());
        assert!(IfName::parse("eth0;").is_err());
        assert!(IfName::parse("ethé").is_err());
    }

    #[test]
    fn sysctl_key_rules() {
        let k = SysctlKey::parse("net.netfilter.nf_conntrack_udp_timeout").expect("valid");
        assert_eq!(k.proc_path(), "net/netfilter/nf_conntrack_udp_timeout");
        assert!(!k.is_host_only());
        assert!(SysctlKey::parse("net.netfilter.nf_conntrack_max").expect("valid").is_host_only());
        assert!(SysctlKey::parse("net.ipv4.ip_forward").is_err());
        assert!(SysctlKey::parse("net.netfilter.../x").is_err());
        assert!(SysctlKey::parse("net.netfilter.").is_err());
        assert!(SysctlKey::parse("net.netfilter.a/b").is_err());
    }

    #[test]
    fn seed_era_sysctl_names_get_a_did_you_mean() {
        for (old, new) in [
            ("net.ipv4.netfilter.ip_conntrack_max", "net.netfilter.nf_conntrack_max"),
            ("net.nf_conntrack_max", "net.netfilter.nf_conntrack_max"),
            ("net.ipv4.netfilter.ip_conntrack_udp_timeout", "net.netfilter.nf_conntrack_udp_timeout"),
            (
                "net.ipv4.netfilter.ip_conntrack_tcp_timeout_established",
                "net.netfilter.nf_conntrack_tcp_timeout_established",
            ),
            ("net.ipv4.ip_conntrack_max", "net.netfilter.nf_conntrack_max"),
            ("net.netfilter.ip_conntrack_max", "net.netfilter.nf_conntrack_max"),
            ("net.ipv4.netfilter.ip_conntrack_buckets", "net.netfilter.nf_conntrack_buckets"),
            ("net.netfilter.nf_conntrack_hashsize", "net.netfilter.nf_conntrack_buckets"),
        ] {
            let e = SysctlKey::parse(old).expect_err(old);
            assert!(e.contains(&format!("did you mean \"{new}\"?")), "{old}: {e}");
        }
        assert!(SysctlKey::parse("net.netfilter.nf_conntrack_max").is_ok());
        let e = SysctlKey::parse("net.ipv4.ip_forward").expect_err("not netfilter");
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn tags() {
        assert_eq!(Tag::new("abc-1").expect("valid").as_str(), "ctguard:abc-1");
        assert!(Tag::new("a b").is_err());
        assert!(Tag::new("x\"").is_err());
        assert!(Tag::is_ctguard_comment("ctguard:preview"));
    }
}
