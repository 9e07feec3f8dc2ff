//! Parser for `nft -j list ruleset` into the neutral model of [`super::fw`]. Pure.
//!
//! Only what the planner and the lint need is interpreted: l4proto, ports, addresses, interface
//! names, ct state and verdicts. Every other expression becomes [`Cond::Opaque`], so a rule that
//! uses it "may" match (the planner never assumes more than it knows).

use std::collections::HashMap;
use std::net::IpAddr;

use serde_json::Value;

use super::fw::{ChainKind, Cond, FwChain, FwHook, FwRule, FwTables, Owner, Verdict};
use crate::model::{PortRange, Prefix};

/// Errors reading nft's JSON.
#[derive(Debug, thiserror::Error)]
pub enum NftJsonError {
    /// Not JSON, or not the shape nft prints.
    #[error("nft JSON output is not understood: {0}")]
    Shape(String),
}

/// What the live nft ruleset holds, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftRuleset {
    /// Every (family, table) present, in listing order.
    pub tables: Vec<(String, String)>,
    /// Chains in the neutral model.
    pub fw: FwTables,
}

impl NftRuleset {
    /// True when `table FAMILY NAME` exists.
    pub fn has_table(&self, family: &str, name: &str) -> bool {
        self.tables.iter().any(|(f, n)| f == family && n == name)
    }
}

type SetKey = (String, String, String);

/// Parses the output of `nft -j list ruleset`.
pub fn parse(text: &str) -> Result<NftRuleset, NftJsonError> {
    if text.trim().is_empty() {
        return Ok(NftRuleset::default());
    }
    let doc: Value = serde_json::from_str(text).map_err(|e| NftJsonError::Shape(e.to_string()))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| NftJsonError::Shape("no \"nftables\" array".into()))?;
    let mut out = NftRuleset::default();
    let mut sets: HashMap<SetKey, Vec<Value>> = HashMap::new();
    let mut chain_index: HashMap<(String, String, String), usize> = HashMap::new();
    for item in items {
        if let Some(t) = item.get("table") {
            out.tables.push((str_of(t, "family"), str_of(t, "name")));
        } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
            let elems = s.get("elem").and_then(Value::as_array).cloned().unwrap_or_default();
            sets.insert((str_of(s, "family"), str_of(s, "table"), str_of(s, "name")), elems);
        } else if let Some(c) = item.get("chain") {
            let (family, table, name) = (str_of(c, "family"), str_of(c, "table"), str_of(c, "name"));
            let hook = c.get("hook").and_then(Value::as_str).and_then(FwHook::parse);
            let kind = match c.get("type").and_then(Value::as_str) {
                Some("filter") => ChainKind::Filter,
                Some("nat") => ChainKind::Nat,
                _ => ChainKind::Other,
            };
            let policy_accept = hook.map(|_| c.get("policy").and_then(Value::as_str) != Some("drop"));
            chain_index.insert((family.clone(), table.clone(), name.clone()), out.fw.chains.len());
            out.fw.chains.push(FwChain {
                owner: Owner::Nft { family, table },
                name,
                hook,
                kind,
                priority: c.get("prio").and_then(Value::as_i64).unwrap_or(0) as i32,
                policy_accept,
                rules: Vec::new(),
            });
        } else if let Some(r) = item.get("rule") {
            let key = (str_of(r, "family"), str_of(r, "table"), str_of(r, "chain"));
            let Some(&ci) = chain_index.get(&key) else { continue };
            let ctx = Ctx { sets: &sets, family: &key.0, table: &key.1 };
            let exprs = r.get("expr").and_then(Value::as_array).cloned().unwrap_or_default();
            let chain = &mut out.fw.chains[ci];
            // The nft rule's position; a verdict map's elements share it.
            let index = chain.rules.last().map_or(0, |r: &FwRule| r.index) + 1;
            for mut rule in convert_rule(&exprs, &ctx) {
                rule.handle = r.get("handle").and_then(Value::as_u64);
                rule.comment = r.get("comment").and_then(Value::as_str).map(str::to_string);
                rule.index = index;
                chain.rules.push(rule);
            }
        }
    }
    Ok(out)
}

fn str_of(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

struct Ctx<'a> {
    sets: &'a HashMap<SetKey, Vec<Value>>,
    family: &'a str,
    table: &'a str,
}

impl Ctx<'_> {
    /// The values a right-hand side stands for: inline set, named set, or a single value.
    fn values(&self, right: &Value) -> Option<Vec<Value>> {
        match right {
            Value::String(s) if s.starts_with('@') => {
                self.sets.get(&(self.family.to_string(), self.table.to_string(), s[1..].to_string())).cloned()
            }
            Value::Array(a) => Some(a.clone()),
            Value::Object(o) if o.contains_key("set") => o.get("set").and_then(Value::as_array).cloned(),
            v => Some(vec![v.clone()]),
        }
    }
}

/// One nft rule as neutral rules: one, or one per element of a verdict map (`ct state vmap {
/// established : accept, invalid : drop }` is two rules, each with its key as a condition, in
/// the map's order — the keys of a vmap are disjoint, so order does not change the result).
fn convert_rule(exprs: &[Value], ctx: &Ctx<'_>) -> Vec<FwRule> {
    let mut conds = Vec::new();
    let mut verdict = Verdict::Continue;
    let mut words = Vec::new();
    let mut vmap: Option<&Value> = None;
    for e in exprs {
        let Some((name, body)) = e.as_object().and_then(|o| o.iter().next()) else { continue };
        match name.as_str() {
            "vmap" => vmap = Some(body),
            "match" => {
                let c = convert_match(body, ctx);
                words.push(match_text(body));
                conds.extend(c);
            }
            "accept" => verdict = Verdict::Accept,
            "drop" => verdict = Verdict::Drop,
            "reject" => verdict = Verdict::Reject,
            "return" => verdict = Verdict::Return,
            "jump" => verdict = Verdict::Jump(str_of(body, "target")),
            "goto" => verdict = Verdict::Goto(str_of(body, "target")),
            "dnat" => verdict = Verdict::Dnat,
            "snat" => verdict = Verdict::Snat,
            "redirect" => verdict = Verdict::Redirect,
            "masquerade" => verdict = Verdict::Masquerade,
            "queue" => verdict = Verdict::Other("queue".into()),
            "counter" | "log" | "comment" | "notrack" | "mangle" | "set" | "ct helper" => {}
            "xt" => match (body.get("type").and_then(Value::as_str), body.get("name").and_then(Value::as_str)) {
                (Some("match"), Some("comment")) => {}
                (Some("match"), Some(m)) => conds.push(Cond::Opaque(format!("xt match {m}"))),
                (Some("target"), Some("REJECT")) => verdict = Verdict::Reject,
                (Some("target"), Some("LOG")) => {}
                (Some("target"), Some(t)) => verdict = Verdict::Other(format!("xt target {t}")),
                _ => conds.push(Cond::Opaque("xt".into())),
            },
            // limit, quota, numgen, meter, … act as conditions we cannot evaluate.
            other => conds.push(Cond::Opaque(other.to_string())),
        }
        if name != "match" {
            words.push(name.clone());
        }
    }
    let text = words.join(" ");
    let Some(map) = vmap else {
        return vec![FwRule { conds, verdict, handle: None, index: 0, text, comment: None }];
    };
    let key = map.get("key").cloned().unwrap_or(Value::Null);
    let elems = map.get("data").and_then(|d| ctx.values(d)).unwrap_or_default();
    let mut out = Vec::new();
    for el in elems {
        let (Some(k), Some(v)) = (el.get(0), el.get(1)) else { continue };
        let m = serde_json::json!({ "op": "==", "left": key, "right": k });
        let mut c = conds.clone();
        c.extend(convert_match(&m, ctx));
        let Some((vname, vbody)) = v.as_object().and_then(|o| o.iter().next()) else { continue };
        let verdict = match vname.as_str() {
            "accept" => Verdict::Accept,
            "drop" => Verdict::Drop,
            "reject" => Verdict::Reject,
            "return" => Verdict::Return,
            "continue" => Verdict::Continue,
            "jump" => Verdict::Jump(str_of(vbody, "target")),
            "goto" => Verdict::Goto(str_of(vbody, "target")),
            other => Verdict::Other(other.to_string()),
        };
        let elem_text = format!("{} : {}", rhs_text(k), vname);
        let text = format!("{text} {} vmap {{ {elem_text} }}", lhs_text(&key)).trim().to_string();
        out.push(FwRule { conds: c, verdict, handle: None, index: 0, text, comment: None });
    }
    if out.is_empty() {
        // A map that cannot be read: it may do anything.
        out.push(FwRule { conds, verdict: Verdict::Other("vmap".into()), handle: None, index: 0, text, comment: None });
    }
    out
}

/// A short text of a match for findings: `udp dport 53`, `ct state new`.
fn match_text(m: &Value) -> String {
    let left = m.get("left").map(lhs_text).unwrap_or_default();
    let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
    let right = m.get("right").map(rhs_text).unwrap_or_default();
    match op {
        "==" | "in" => format!("{left} {right}"),
        op => format!("{left} {op} {right}"),
    }
}

fn lhs_text(l: &Value) -> String {
    if let Some(p) = l.get("payload") {
        format!("{} {}", str_of(p, "protocol"), str_of(p, "field"))
    } else if let Some(m) = l.get("meta") {
        format!("meta {}", str_of(m, "key"))
    } else if let Some(c) = l.get("ct") {
        format!("ct {}", str_of(c, "key"))
    } else {
        l.to_string()
    }
}

fn rhs_text(r: &Value) -> String {
    match r {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => a.iter().map(rhs_text).collect::<Vec<_>>().join(","),
        Value::Object(o) => {
            if let Some(s) = o.get("set").and_then(Value::as_array) {
                format!("{{ {} }}", s.iter().map(rhs_text).collect::<Vec<_>>().join(", "))
            } else if let Some(Value::Array(r)) = o.get("range") {
                r.iter().map(rhs_text).collect::<Vec<_>>().join("-")
            } else if let Some(p) = o.get("prefix") {
                format!("{}/{}", str_of(p, "addr"), p.get("len").map(Value::to_string).unwrap_or_default())
            } else {
                r.to_string()
            }
        }
        other => other.to_string(),
    }
}

/// [`convert_match_values`], with a lookup in a named set (`ip saddr @trusted`) kept by name
/// ([`Cond::Named`]) around the condition its elements give.
fn convert_match(m: &Value, ctx: &Ctx<'_>) -> Vec<Cond> {
    let conds = convert_match_values(m, ctx);
    let Some(name) = m.get("right").and_then(Value::as_str).and_then(|r| r.strip_prefix('@')) else { return conds };
    conds
        .into_iter()
        .map(|c| match c {
            Cond::Saddr { .. }
            | Cond::Daddr { .. }
            | Cond::Dport { .. }
            | Cond::Sport { .. }
            | Cond::Iif { .. }
            | Cond::Oif { .. } => Cond::Named { name: name.to_string(), inner: Box::new(c) },
            other => other,
        })
        .collect()
}

fn convert_match_values(m: &Value, ctx: &Ctx<'_>) -> Vec<Cond> {
    let opaque = || vec![Cond::Opaque(match_text(m))];
    let neg = match m.get("op").and_then(Value::as_str).unwrap_or("==") {
        "==" | "in" => false,
        "!=" => true,
        _ => return opaque(),
    };
    let (Some(left), Some(right)) = (m.get("left"), m.get("right")) else { return opaque() };
    if let Some(p) = left.get("payload") {
        let proto = str_of(p, "protocol");
        let field = str_of(p, "field");
        match (proto.as_str(), field.as_str()) {
            ("udp" | "tcp" | "th" | "sctp" | "udplite" | "dccp", "dport" | "sport") => {
                let Some(ranges) = ctx.values(right).and_then(|v| ports(&v)) else { return opaque() };
                let mut out = Vec::new();
                if let Some(n) = proto_number(&proto) {
                    out.push(Cond::Proto { neg: false, protos: vec![n] });
                }
                out.push(if field == "dport" { Cond::Dport { neg, ranges } } else { Cond::Sport { neg, ranges } });
                out
            }
            ("ip" | "ip6", "saddr" | "daddr") => {
                let v6 = proto == "ip6";
                let Some(prefixes) = ctx.values(right).and_then(|v| prefixes(&v)) else {
                    return vec![Cond::Family { v6 }, Cond::Opaque(match_text(m))];
                };
                let c = if field == "saddr" { Cond::Saddr { neg, prefixes } } else { Cond::Daddr { neg, prefixes } };
                vec![Cond::Family { v6 }, c]
            }
            ("ip" | "ip6", _) => vec![Cond::Family { v6: proto == "ip6" }, Cond::Opaque(match_text(m))],
            _ => opaque(),
        }
    } else if let Some(meta) = left.get("meta") {
        let key = str_of(meta, "key");
        let vals = ctx.values(right).unwrap_or_default();
        match key.as_str() {
            "l4proto" => match vals
                .iter()
                .map(|v| v.as_str().and_then(proto_number).or_else(|| v.as_u64().map(|n| n as u8)))
                .collect::<Option<Vec<u8>>>()
            {
                Some(protos) => vec![Cond::Proto { neg, protos }],
                None => opaque(),
            },
            "nfproto" | "protocol" => {
                let fams: Vec<&str> = vals.iter().filter_map(Value::as_str).collect();
                match (fams.as_slice(), neg) {
                    (["ipv4"] | ["ip"], false) | (["ipv6"] | ["ip6"], true) => vec![Cond::Family { v6: false }],
                    (["ipv6"] | ["ip6"], false) | (["ipv4"] | ["ip"], true) => vec![Cond::Family { v6: true }],
                    _ => opaque(),
                }
            }
            "iif" | "iifname" | "oif" | "oifname" => {
                match vals.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<String>>>() {
                    Some(names) if !names.iter().any(|n| n.contains('*')) => {
                        if key.starts_with('i') {
                            vec![Cond::Iif { neg, names }]
                        } else {
                            vec![Cond::Oif { neg, names }]
                        }
                    }
                    _ => opaque(),
                }
            }
            _ => opaque(),
        }
    } else if left.get("ct").is_some_and(|c| str_of(c, "key") == "state") {
        let vals = ctx.values(right).unwrap_or_default();
        match vals.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<String>>>() {
            Some(states) => vec![Cond::CtState { neg, states }],
            None => opaque(),
        }
    } else {
        opaque()
    }
}

fn proto_number(s: &str) -> Option<u8> {
    Some(match s {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" | "ipv6-icmp" => 58,
        "sctp" => 132,
        "udplite" => 136,
        "dccp" => 33,
        _ => return None,
    })
}

fn ports(vals: &[Value]) -> Option<Vec<PortRange>> {
    vals.iter()
        .map(|v| match v {
            Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()).map(PortRange::single),
            Value::Object(o) => {
                let r = o.get("range")?.as_array()?;
                let lo = u16::try_from(r.first()?.as_u64()?).ok()?;
                let hi = u16::try_from(r.get(1)?.as_u64()?).ok()?;
                Some(PortRange { lo, hi })
            }
            _ => None,
        })
        .collect()
}

fn prefixes(vals: &[Value]) -> Option<Vec<Prefix>> {
    vals.iter()
        .map(|v| match v {
            Value::String(s) => match s.parse::<IpAddr>().ok()? {
                IpAddr::V4(a) => Some(Prefix::V4(a, 32)),
                IpAddr::V6(a) => Some(Prefix::V6(a, 128)),
            },
            Value::Object(o) => {
                let p = o.get("prefix")?;
                let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
                match p.get("addr")?.as_str()?.parse::<IpAddr>().ok()? {
                    IpAddr::V4(a) => Some(Prefix::V4(a, len)),
                    IpAddr::V6(a) => Some(Prefix::V6(a, len)),
                }
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/fixtures/live/nft_host.json");

    /// Verdict maps become one rule per element, each with its key as a condition; a named map
    /// is read from its `map` item.
    #[test]
    fn verdict_maps_are_rules_per_element() {
        let doc = r#"{"nftables": [
          {"table": {"family": "inet", "name": "t", "handle": 1}},
          {"map": {"family": "inet", "name": "m", "table": "t", "type": "ipv4_addr", "handle": 2, "map": "verdict",
                   "elem": [["10.0.0.1", {"drop": null}]]}},
          {"chain": {"family": "inet", "table": "t", "name": "c", "handle": 3}},
          {"chain": {"family": "inet", "table": "t", "name": "input", "handle": 4, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
          {"rule": {"family": "inet", "table": "t", "chain": "input", "handle": 5, "expr": [
            {"vmap": {"key": {"ct": {"key": "state"}}, "data": {"set": [["established", {"accept": null}], ["invalid", {"drop": null}]]}}}]}},
          {"rule": {"family": "inet", "table": "t", "chain": "input", "handle": 6, "expr": [
            {"vmap": {"key": {"meta": {"key": "l4proto"}}, "data": {"set": [["udp", {"jump": {"target": "c"}}]]}}}]}},
          {"rule": {"family": "inet", "table": "t", "chain": "input", "handle": 7, "expr": [
            {"vmap": {"key": {"payload": {"protocol": "ip", "field": "saddr"}}, "data": "@m"}}]}}
        ]}"#;
        let r = parse(doc).expect("parses");
        let input = r.fw.find(&Owner::Nft { family: "inet".into(), table: "t".into() }, "input").expect("input");
        assert_eq!(input.rules.len(), 4, "{:#?}", input.rules);
        assert_eq!(input.rules[0].conds, vec![Cond::CtState { neg: false, states: vec!["established".into()] }]);
        assert_eq!(input.rules[0].verdict, Verdict::Accept);
        assert_eq!(input.rules[1].verdict, Verdict::Drop);
        assert_eq!((input.rules[0].handle, input.rules[1].handle), (Some(5), Some(5)));
        assert_eq!(input.rules[2].verdict, Verdict::Jump("c".into()));
        assert_eq!(input.rules[2].conds, vec![Cond::Proto { neg: false, protos: vec![17] }]);
        assert_eq!(input.rules[3].verdict, Verdict::Drop);
        assert!(input.rules[3].conds.iter().any(|c| matches!(c, Cond::Saddr { .. })), "{:?}", input.rules[3].conds);
        assert_eq!(input.rules.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1, 1, 2, 3]);
    }

    #[test]
    fn parses_a_real_listing() {
        let r = parse(SAMPLE).expect("parses");
        assert!(r.has_table("inet", "host"));
        let input =
            r.fw.find(&Owner::Nft { family: "inet".into(), table: "host".into() }, "input").expect("input chain");
        assert_eq!(input.hook, Some(FwHook::Input));
        assert_eq!(input.policy_accept, Some(false));
        // ip saddr @bl drop: the named set resolves to its prefix, kept by name.
        let inner = Cond::Saddr { neg: false, prefixes: vec![Prefix::V4("10.9.0.0".parse().expect("addr"), 16)] };
        assert!(input.rules[0].conds.contains(&Cond::Named { name: "bl".into(), inner: Box::new(inner) }));
        assert_eq!(input.rules[0].verdict, Verdict::Drop);
        // udp dport 53 ct state new accept
        let r4 = &input.rules[4];
        assert_eq!(r4.conds[0], Cond::Proto { neg: false, protos: vec![17] });
        assert_eq!(r4.conds[1], Cond::Dport { neg: false, ranges: vec![PortRange::single(53)] });
        assert_eq!(r4.conds[2], Cond::CtState { neg: false, states: vec!["new".into()] });
        assert_eq!(r4.text, "udp dport 53 ct state new accept");
        // iptables-nft's compat comment match is ignored, not opaque.
        let ipt = r.fw.find(&Owner::Nft { family: "ip".into(), table: "filter".into() }, "INPUT").expect("INPUT");
        assert!(!ipt.rules[0].conds.iter().any(|c| matches!(c, Cond::Opaque(_))));
    }

    #[test]
    fn empty_and_bad_input() {
        assert_eq!(parse("").expect("empty"), NftRuleset::default());
        assert!(parse("{").is_err());
        assert!(parse("{\"x\":1}").is_err());
    }
}
