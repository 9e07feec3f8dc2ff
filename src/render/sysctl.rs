//! The sysctl writes a policy asks for, resolved against the live values (pure): `"auto"`
//! through [`crate::model::auto`], host-only keys skipped outside the initial namespace when
//! they were `"auto"` (the built-in policy), refused when they were explicit.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::auto::{self, MachineFacts};
use crate::model::names::SysctlKey;
use crate::model::{Policy, SysctlValue};

/// What the live system says about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LiveSysctl {
    /// Current value; `None` when the key does not exist in the target.
    pub value: Option<u64>,
    /// Whether the target lets ctguard write it.
    pub writable: bool,
}

/// One planned sysctl change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SysctlChange {
    /// Key.
    pub key: SysctlKey,
    /// Live value.
    pub old: Option<u64>,
    /// Value to write.
    pub new: u64,
    /// True when writing `new` leaves the kernel as it is (buckets compared as rounded).
    pub unchanged: bool,
    /// Set when the key is skipped, with the reason (then nothing is written).
    pub skipped: Option<String>,
}

/// A key that cannot be applied at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlProblem {
    /// Key.
    pub key: SysctlKey,
    /// Reason, one line.
    pub reason: String,
}

/// Resolves every sysctl of `policy` against `live` (keyed by [`SysctlKey`]).
pub fn plan_sysctls(
    policy: &Policy,
    live: &BTreeMap<SysctlKey, LiveSysctl>,
    facts: MachineFacts,
) -> (Vec<SysctlChange>, Vec<SysctlProblem>) {
    let mut changes = Vec::new();
    let mut problems = Vec::new();
    let get = |k: &str| live.iter().find(|(key, _)| key.as_str() == k).map(|(_, v)| *v).unwrap_or_default();
    let max_key = "net.netfilter.nf_conntrack_max";
    let target_max = match policy.sysctl.iter().find(|(k, _)| k.as_str() == max_key) {
        Some((_, SysctlValue::Int(n))) => *n,
        _ => auto::auto_conntrack_max(facts, get(max_key).value),
    };
    for (key, value) in &policy.sysctl {
        let l = get(key.as_str());
        let is_buckets = key.as_str() == "net.netfilter.nf_conntrack_buckets";
        let new = match value {
            SysctlValue::Int(n) => *n,
            SysctlValue::Auto if is_buckets => auto::auto_conntrack_buckets(facts, target_max, l.value),
            SysctlValue::Auto => auto::auto_conntrack_max(facts, l.value),
        };
        let unchanged = match l.value {
            Some(old) if is_buckets => auto::buckets_equal(new, old, facts.page_size),
            Some(old) => old == new,
            None => false,
        };
        let missing = l.value.is_none();
        let blocked = !l.writable && !unchanged;
        let skipped = if missing || blocked {
            let why = if missing { "does not exist in the target" } else { "is read-only in the target" };
            let why = if key.is_host_only() && !missing {
                format!("{why} (only the initial network namespace can write it)")
            } else {
                why.to_string()
            };
            if *value == SysctlValue::Auto {
                Some(why)
            } else {
                problems.push(SysctlProblem { key: key.clone(), reason: why });
                None
            }
        } else {
            None
        };
        changes.push(SysctlChange { key: key.clone(), old: l.value, new, unchanged, skipped });
    }
    (changes, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_policy, Format};

    fn key(s: &str) -> SysctlKey {
        SysctlKey::parse(s).expect("key")
    }

    #[test]
    fn builtin_in_a_namespace_skips_with_reason() {
        let p = Policy::builtin();
        let mut live = BTreeMap::new();
        live.insert(key("net.netfilter.nf_conntrack_max"), LiveSysctl { value: Some(262144), writable: false });
        live.insert(key("net.netfilter.nf_conntrack_buckets"), LiveSysctl { value: Some(262144), writable: false });
        let (c, problems) = plan_sysctls(&p, &live, MachineFacts::with_ram(24 << 30));
        assert!(problems.is_empty());
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.skipped.as_deref().is_some_and(|s| s.contains("initial network namespace"))));
        // 24 GiB -> 524288 for both, above the live 262144.
        assert!(c.iter().all(|c| c.new == 524_288));
    }

    #[test]
    fn explicit_values_that_cannot_be_written_are_problems() {
        let p = parse_policy("[sysctl]\n\"net.netfilter.nf_conntrack_max\" = 1000000\n", Format::Toml).expect("valid");
        let mut live = BTreeMap::new();
        live.insert(key("net.netfilter.nf_conntrack_max"), LiveSysctl { value: Some(262144), writable: false });
        let (_, problems) = plan_sysctls(&p, &live, MachineFacts::with_ram(1 << 30));
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn buckets_compare_rounded() {
        let p =
            parse_policy("[sysctl]\n\"net.netfilter.nf_conntrack_buckets\" = 300001\n", Format::Toml).expect("valid");
        let mut live = BTreeMap::new();
        live.insert(key("net.netfilter.nf_conntrack_buckets"), LiveSysctl { value: Some(300_032), writable: true });
        let (c, _) = plan_sysctls(&p, &live, MachineFacts::with_ram(1 << 30));
        assert!(c[0].unchanged);
    }
}
