//! Converts a parsed `iptables-save` dump into the neutral chain model of [`super::fw`]. Pure.

use super::fw::{ChainKind, Cond, FwChain, FwHook, FwRule, FwTables, IptVariant, Owner, Verdict};
use super::iptables_save::{RuleView, SaveDump};
use crate::model::PortRange;

/// The chains of `dump` (saved by `variant`, IPv6 when `v6`) in the neutral model.
pub fn convert(dump: &SaveDump, variant: IptVariant, v6: bool) -> FwTables {
    let mut out = FwTables::default();
    for t in &dump.tables {
        for c in &t.chains {
            let mut chain = empty_chain(variant, v6, &t.name, &c.name, c.policy.as_deref());
            chain.rules = c
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| rule_of(&RuleView::from_args(&r.args), r.line.clone(), i + 1, v6))
                .collect();
            out.chains.push(chain);
        }
    }
    out
}

/// Chain `name` of table `table` as [`convert`] models it, without its rules: `policy` as the
/// save declares it (`DROP`, `ACCEPT`; `None` for a user chain, `-` in the save).
pub fn empty_chain(variant: IptVariant, v6: bool, table: &str, name: &str, policy: Option<&str>) -> FwChain {
    let kind = match table {
        "filter" => ChainKind::Filter,
        "nat" => ChainKind::Nat,
        _ => ChainKind::Other,
    };
    FwChain {
        owner: Owner::Iptables { variant, v6, table: table.to_string() },
        name: name.to_string(),
        hook: if policy.is_some() { FwHook::parse(name) } else { None },
        kind,
        priority: 0,
        policy_accept: policy.map(|p| p != "DROP"),
        rules: Vec::new(),
    }
}

/// The rule at 1-based `index` of its chain as [`convert`] models it, from the save's line
/// `line` (`-A CHAIN …`); `None` when the line does not tokenize.
pub fn rule_from_line(line: &str, index: usize, v6: bool) -> Option<FwRule> {
    let tokens = super::iptables_save::tokenize(line).ok()?;
    let args = match tokens.first().map(String::as_str) {
        Some("-A") => tokens.get(2..)?,
        _ => return None,
    };
    Some(rule_of(&RuleView::from_args(args), line.to_string(), index, v6))
}

fn rule_of(view: &RuleView, line: String, index: usize, v6: bool) -> FwRule {
    let (conds, verdict) = conds_of(view, v6);
    FwRule { conds, verdict, handle: None, index, text: line, comment: view.comment.clone() }
}

fn ranges(v: &[std::ops::RangeInclusive<u16>]) -> Vec<PortRange> {
    v.iter().map(|r| PortRange { lo: *r.start(), hi: *r.end() }).collect()
}

fn conds_of(v: &RuleView, v6: bool) -> (Vec<Cond>, Verdict) {
    let mut c = Vec::new();
    c.push(Cond::Family { v6 });
    if let Some(p) = &v.proto {
        match p.value.as_str() {
            "tcp" => c.push(Cond::Proto { neg: p.negated, protos: vec![6] }),
            "udp" => c.push(Cond::Proto { neg: p.negated, protos: vec![17] }),
            other => c.push(Cond::Opaque(format!("-p {other}"))),
        }
    }
    let iface = |n: &super::iptables_save::Neg<String>| -> Option<Vec<String>> {
        (!n.value.ends_with('+')).then(|| vec![n.value.clone()])
    };
    if let Some(i) = &v.in_iface {
        match iface(i) {
            Some(names) => c.push(Cond::Iif { neg: i.negated, names }),
            None => c.push(Cond::Opaque(format!("-i {}", i.value))),
        }
    }
    if let Some(o) = &v.out_iface {
        match iface(o) {
            Some(names) => c.push(Cond::Oif { neg: o.negated, names }),
            None => c.push(Cond::Opaque(format!("-o {}", o.value))),
        }
    }
    if let Some(s) = &v.src {
        c.push(Cond::Saddr { neg: s.negated, prefixes: vec![s.value] });
    }
    if let Some(d) = &v.dst {
        c.push(Cond::Daddr { neg: d.negated, prefixes: vec![d.value] });
    }
    if let Some(p) = &v.dports {
        c.push(Cond::Dport { neg: p.negated, ranges: ranges(&p.value) });
    }
    if let Some(p) = &v.sports {
        c.push(Cond::Sport { neg: p.negated, ranges: ranges(&p.value) });
    }
    if v.any_ports.is_some() {
        c.push(Cond::Opaque("-m multiport --ports".into()));
    }
    if let Some(s) = &v.states {
        c.push(Cond::CtState { neg: s.negated, states: s.value.iter().map(|x| x.to_ascii_lowercase()).collect() });
    }
    for u in &v.unknown {
        c.push(Cond::Opaque(u.clone()));
    }
    let verdict = match &v.target {
        None => Verdict::Continue,
        Some(t) => match (t.name.as_str(), t.goto) {
            ("ACCEPT", _) => Verdict::Accept,
            ("DROP", _) => Verdict::Drop,
            ("REJECT", _) => Verdict::Reject,
            ("RETURN", _) => Verdict::Return,
            ("DNAT", _) => Verdict::Dnat,
            ("REDIRECT", _) => Verdict::Redirect,
            ("SNAT", _) => Verdict::Snat,
            ("MASQUERADE", _) => Verdict::Masquerade,
            ("LOG" | "NFLOG" | "MARK" | "CONNMARK" | "CT" | "NOTRACK" | "TCPMSS" | "CHECKSUM", _) => Verdict::Continue,
            (name, false) if is_user_chain(name) => Verdict::Jump(name.to_string()),
            (name, true) => Verdict::Goto(name.to_string()),
            (name, false) => Verdict::Other(name.to_string()),
        },
    };
    (c, verdict)
}

/// Targets are upper case by convention; user chains are anything not a known target name.
fn is_user_chain(name: &str) -> bool {
    !matches!(
        name,
        "QUEUE"
            | "NFQUEUE"
            | "TPROXY"
            | "SET"
            | "AUDIT"
            | "TEE"
            | "TRACE"
            | "SECMARK"
            | "CONNSECMARK"
            | "CLASSIFY"
            | "DSCP"
            | "TOS"
            | "TTL"
            | "HL"
            | "ULOG"
            | "IDLETIMER"
            | "LED"
            | "RATEEST"
            | "SYNPROXY"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::iptables_save::parse;

    #[test]
    fn filter_input_drop() {
        let d = parse("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:f2b - [0:0]\n-A INPUT -j f2b\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT\n-A f2b -s 192.0.2.0/24 -j REJECT\nCOMMIT\n").expect("parses");
        let t = convert(&d, IptVariant::Legacy, false);
        let owner = Owner::Iptables { variant: IptVariant::Legacy, v6: false, table: "filter".into() };
        let input = t.find(&owner, "INPUT").expect("INPUT");
        assert_eq!(input.policy_accept, Some(false));
        assert_eq!(input.hook, Some(FwHook::Input));
        assert_eq!(input.rules[0].verdict, Verdict::Jump("f2b".into()));
        assert!(input.rules[2].conds.contains(&Cond::Dport { neg: false, ranges: vec![PortRange::single(53)] }));
        assert!(input.rules[2].conds.contains(&Cond::CtState { neg: false, states: vec!["new".into()] }));
        assert_eq!(t.find(&owner, "f2b").expect("f2b").hook, None);
    }
}
