//! What `ctguard render` prints: the policy alone (no live state, so no insertions), in one
//! front end's syntax, with the sysctl writes as comments. Pure: the machine facts for
//! `"auto"` are an argument.

use std::fmt::Write as _;

use super::iptables::{notrack_rules, IpFamily};
use super::nft_ir::table_for;
use super::nft_script::table_block;
use crate::model::auto::{auto_conntrack_buckets, auto_conntrack_max, kernel_rounded_buckets, MachineFacts};
use crate::model::names::Tag;
use crate::model::{Backend, Policy, SysctlValue};

/// Output syntax of a rendered document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocFormat {
    /// nft script (`table inet ctguard { … }`).
    Nft,
    /// iptables-restore text for IPv4.
    Iptables,
    /// iptables-restore text for IPv6.
    Ip6tables,
}

impl DocFormat {
    /// The format a policy's `backend` implies when `--format` is not given.
    pub fn for_backend(b: Backend) -> DocFormat {
        match b {
            Backend::Auto | Backend::Nft => DocFormat::Nft,
            Backend::IptablesNft | Backend::IptablesLegacy => DocFormat::Iptables,
        }
    }
}

/// The sysctl writes as `(key, value, note)`; `"auto"` resolved from `facts` (without a live
/// value, so "never lowers" is applied later, by `plan`).
pub fn sysctl_writes(policy: &Policy, facts: MachineFacts) -> Vec<(String, u64, String)> {
    let max = match policy.sysctl.iter().find(|(k, _)| k.as_str() == "net.netfilter.nf_conntrack_max") {
        Some((_, SysctlValue::Int(n))) => *n,
        _ => auto_conntrack_max(facts, None),
    };
    policy
        .sysctl
        .iter()
        .map(|(k, v)| match v {
            SysctlValue::Int(n) if k.as_str() == "net.netfilter.nf_conntrack_buckets" => {
                let stored = kernel_rounded_buckets(*n, facts.page_size);
                let note = if stored == *n { String::new() } else { format!(" (the kernel rounds it up to {stored})") };
                (k.to_string(), *n, note)
            }
            SysctlValue::Int(n) => (k.to_string(), *n, String::new()),
            SysctlValue::Auto if k.as_str() == "net.netfilter.nf_conntrack_buckets" => (
                k.to_string(),
                auto_conntrack_buckets(facts, max, None),
                " (auto: = nf_conntrack_max, rounded as the kernel does)".to_string(),
            ),
            SysctlValue::Auto => (
                k.to_string(),
                auto_conntrack_max(facts, None),
                " (auto: RAM / 16384 / (bits / 32), power of two)".to_string(),
            ),
        })
        .collect()
}

/// The document `render` prints for `policy` in `format`, every rule tagged `tag`.
pub fn render_document(policy: &Policy, format: DocFormat, tag: &Tag, facts: MachineFacts) -> String {
    let mut s = String::new();
    match format {
        DocFormat::Nft => {
            let t = table_for(policy, tag);
            if t.is_empty() {
                s.push_str("# no [[notrack]] entries: ctguard creates no table\n");
            } else {
                s.push_str(&table_block(&t));
            }
        }
        DocFormat::Iptables | DocFormat::Ip6tables => {
            let fam = if format == DocFormat::Iptables { IpFamily::V4 } else { IpFamily::V6 };
            let r = notrack_rules(policy, fam, tag);
            if r.is_empty() {
                s.push_str("# no rules for this family\n");
            } else {
                s.push_str(&r.restore_text_with_jumps());
            }
        }
    }
    for (k, v, note) in sysctl_writes(policy, facts) {
        let _ = writeln!(s, "# sysctl {k} = {v}{note}");
    }
    s
}
