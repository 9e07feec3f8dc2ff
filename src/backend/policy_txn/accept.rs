//! The planner's nft accept rules as netlink messages (DESIGN §6 `accept_untracked`): the same
//! rule [`crate::render::planner::nft_accept_rule`] prints as text, built expression by
//! expression so it can ride in ctguard's one netlink batch next to `table inet ctguard`.
//!
//! | text | expressions |
//! | --- | --- |
//! | `meta nfproto ipv4` (inet only) | `meta load nfproto`, `cmp eq 2` |
//! | `iifname "eth0"` / `oifname …` | `meta load iifname`, `cmp eq` 16 bytes NUL-padded |
//! | `iifname { "a", "b" }` | `meta load iifname`, `lookup` in an anonymous `ifname` set |
//! | `iif "lo"` / `oif "lo"` | `meta load iif`/`oif`, `cmp eq 1` (loopback is ifindex 1 in every namespace) |
//! | `ip saddr 192.0.2.1` | [`meta nfproto` in inet], `payload load 4b @ network + 12`, `cmp eq` |
//! | `ip saddr 10.0.0.0/8` | …, `payload load`, `bitwise & mask`, `cmp eq` network |
//! | `ip saddr { … }` | …, `payload load`, `lookup` in an anonymous interval set |
//! | `udp dport 53` | `meta load l4proto`, `cmp eq 17`, `payload load 2b @ transport + 2`, `cmp eq` |
//! | `udp dport 1000-2000` | …, `cmp gte 1000`, `cmp lte 2000` |
//! | `udp dport { 53, 1000-2000 }` | …, `lookup` in an anonymous interval set |
//! | `ct state untracked` | `ct load state`, `bitwise & 0x40`, `cmp neq 0` |
//! | `accept`, `comment "…"` | `immediate accept`, rule userdata |
//!
//! A kernel test proves a rule built here lists exactly like the planner's text loaded by nft.

use nftnl::expr::{Bitwise, Cmp, CmpOp, Conntrack, Expression, Meta, Payload, Verdict};
use nftnl::nftnl_sys as sys;
use nftnl::Rule;

use crate::model::names::Tag;
use crate::model::{NotrackRule, PortRange, Prefix, Proto};
use crate::render::flow::Direction;
use crate::render::nft_batch::{BatchBuilder, BatchError, RulePosition};
use crate::render::nft_expr::{
    addr_payload, ifname_key, port_payload, Bytes, LookupByName, NFPROTO_IPV4, NFPROTO_IPV6,
};
use crate::render::nft_ir::{Elem, SetKind};

/// `ifindex` of the loopback device: 1 in every network namespace (`LOOPBACK_IFINDEX`).
pub const LOOPBACK_IFINDEX: u32 = 1;
/// `NF_CT_STATE_UNTRACKED_BIT` as `ct state` loads it.
const CT_STATE_UNTRACKED: u32 = 0x40;

/// One expression of an accept rule (`Rule::add_expr` needs one sized type).
enum AcceptExpr {
    Meta(Meta),
    Payload(Payload),
    Cmp(CmpOp, Bytes),
    Mask(Bytes),
    Lookup(LookupByName),
    CtState,
    Accept,
}

impl Expression for AcceptExpr {
    fn to_expr(&self, rule: &Rule) -> std::ptr::NonNull<sys::nftnl_expr> {
        match self {
            AcceptExpr::Meta(m) => m.to_expr(rule),
            AcceptExpr::Payload(p) => p.to_expr(rule),
            AcceptExpr::Cmp(op, b) => Cmp::new(*op, b.clone()).to_expr(rule),
            AcceptExpr::Mask(m) => Bitwise::new(m.clone(), Bytes(vec![0; m.0.len()])).to_expr(rule),
            AcceptExpr::Lookup(l) => l.to_expr(rule),
            AcceptExpr::CtState => Conntrack::State.to_expr(rule),
            AcceptExpr::Accept => Verdict::Accept.to_expr(rule),
        }
    }
}

/// Where and what: one planned nft accept insertion, in the terms of the policy.
pub struct AcceptSpec<'a> {
    /// nft family of the target table (`ip`, `ip6`, `inet`).
    pub family: &'a str,
    /// Target table.
    pub table: &'a str,
    /// Target chain.
    pub chain: &'a str,
    /// Before which rule, or appended.
    pub at: RulePosition,
    /// The `[[notrack]]` entry.
    pub entry: &'a NotrackRule,
    /// Protocol of this rule.
    pub proto: Proto,
    /// Flow direction at this hook.
    pub dir: Direction,
    /// Family restriction (None: both).
    pub v6: Option<bool>,
    /// The transaction tag (the rule's comment).
    pub tag: &'a Tag,
    /// Text for error messages (the planner's rule text).
    pub text: &'a str,
    /// Conditions carried beyond the entry's fields (the planner's `Insertion::extra`):
    /// single values (`==`/`!=`), ranges and non-negated sets of addresses, ports and
    /// interface names.
    pub extra: &'a [crate::live::fw::Cond],
}

/// Appends the anonymous sets and the rule for `spec` to `b`: the same rule
/// [`crate::render::planner::nft_accept_rule`] describes.
pub fn add_accept_rule(b: &mut BatchBuilder, spec: &AcceptSpec<'_>) -> Result<(), BatchError> {
    let inet = spec.family == "inet";
    let n = spec.entry;
    let v6 = spec.v6;
    let addrs: Vec<Prefix> =
        crate::render::flow::peers(n, spec.dir).iter().filter(|p| v6.is_none_or(|x| p.is_v6() == x)).copied().collect();
    let addr_v6 = v6 == Some(true);
    let mut e: Vec<AcceptExpr> = Vec::new();
    if inet && v6.is_some() && addrs.is_empty() {
        e.push(AcceptExpr::Meta(Meta::NfProto));
        e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(vec![if addr_v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }])));
    }
    let (iface, addr_source, port_source) = match spec.dir {
        Direction::Request => (Some((Meta::IifName, false)), true, false),
        Direction::Reply => (Some((Meta::OifName, false)), false, true),
        Direction::LoopbackRequest => (Some((Meta::Oif, true)), true, false),
        Direction::LoopbackReply => (Some((Meta::Iif, true)), false, true),
        Direction::Query => (Some((Meta::OifName, false)), false, false),
        Direction::Answer => (Some((Meta::IifName, false)), true, true),
    };
    match iface {
        Some((meta, true)) => {
            e.push(AcceptExpr::Meta(meta));
            e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(LOOPBACK_IFINDEX.to_ne_bytes().to_vec())));
        }
        Some((meta, false)) if !n.interfaces.is_empty() => {
            e.push(AcceptExpr::Meta(meta));
            if let [one] = n.interfaces.as_slice() {
                e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(ifname_key(one).to_vec())));
            } else {
                let elems: Vec<Elem> = n.interfaces.iter().cloned().map(Elem::Ifname).collect();
                e.push(anon_lookup(b, spec, SetKind::Ifname, elems)?);
            }
        }
        _ => {}
    }
    if !addrs.is_empty() {
        if inet {
            e.push(AcceptExpr::Meta(Meta::NfProto));
            e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(vec![if addr_v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }])));
        }
        e.push(AcceptExpr::Payload(addr_payload(addr_v6, addr_source)));
        if let [one] = addrs.as_slice() {
            let (net, mask) = prefix_bytes(one);
            if !one.is_host() {
                e.push(AcceptExpr::Mask(Bytes(mask)));
            }
            e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(net)));
        } else {
            let kind = if addr_v6 { SetKind::Ipv6 } else { SetKind::Ipv4 };
            let elems: Vec<Elem> = addrs.iter().copied().map(Elem::Prefix).collect();
            e.push(anon_lookup(b, spec, kind, elems)?);
        }
    }
    e.push(AcceptExpr::Meta(Meta::L4Proto));
    e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(vec![spec.proto.number()])));
    e.push(AcceptExpr::Payload(port_payload(spec.proto, port_source)));
    match n.ports.as_slice() {
        [p] if p.is_single() => e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(p.lo.to_be_bytes().to_vec()))),
        [PortRange { lo, hi }] => {
            e.push(AcceptExpr::Cmp(CmpOp::Gte, Bytes(lo.to_be_bytes().to_vec())));
            e.push(AcceptExpr::Cmp(CmpOp::Lte, Bytes(hi.to_be_bytes().to_vec())));
        }
        ports => {
            let elems: Vec<Elem> = ports.iter().copied().map(Elem::Port).collect();
            e.push(anon_lookup(b, spec, SetKind::Ports, elems)?);
        }
    }
    let mut have_nfproto = inet && (v6.is_some() && addrs.is_empty() || !addrs.is_empty());
    for c in spec.extra {
        extra_exprs(b, spec, c, &mut e, &mut have_nfproto)?;
    }
    e.push(AcceptExpr::CtState);
    e.push(AcceptExpr::Mask(Bytes(CT_STATE_UNTRACKED.to_ne_bytes().to_vec())));
    e.push(AcceptExpr::Cmp(CmpOp::Neq, Bytes(vec![0; 4])));
    e.push(AcceptExpr::Accept);
    let what = match spec.at {
        RulePosition::Before(h) => {
            format!("insert rule {} {} {} position {h} {}", spec.family, spec.table, spec.chain, spec.text)
        }
        RulePosition::Append => format!("add rule {} {} {} {}", spec.family, spec.table, spec.chain, spec.text),
    };
    b.insert_rule(spec.family, spec.table, spec.chain, spec.at, &e, spec.tag.as_str(), what)
}

/// The expressions of one carried condition, as nft compiles its text (the planner's
/// `nft_cond`): `ip daddr != 192.0.2.1`, `udp sport 1000-2000`, `iifname "eth0"`, …
fn extra_exprs(
    b: &mut BatchBuilder,
    spec: &AcceptSpec<'_>,
    c: &crate::live::fw::Cond,
    e: &mut Vec<AcceptExpr>,
    have_nfproto: &mut bool,
) -> Result<(), BatchError> {
    use crate::live::fw::Cond;
    let op = |neg: bool| if neg { CmpOp::Neq } else { CmpOp::Eq };
    match c {
        Cond::Named { name, inner } => {
            // The inner match's key, then a lookup in the table's own set by name.
            let (neg, v6) = match inner.as_ref() {
                Cond::Saddr { neg, prefixes } | Cond::Daddr { neg, prefixes } => {
                    let v6 = prefixes.first().map_or(spec.v6 == Some(true), Prefix::is_v6);
                    if spec.family == "inet" && !*have_nfproto {
                        e.push(AcceptExpr::Meta(Meta::NfProto));
                        e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(vec![if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }])));
                        *have_nfproto = true;
                    }
                    e.push(AcceptExpr::Payload(addr_payload(v6, matches!(inner.as_ref(), Cond::Saddr { .. }))));
                    (*neg, v6)
                }
                Cond::Dport { neg, .. } | Cond::Sport { neg, .. } => {
                    e.push(AcceptExpr::Payload(port_payload(spec.proto, matches!(inner.as_ref(), Cond::Sport { .. }))));
                    (*neg, false)
                }
                Cond::Iif { neg, .. } | Cond::Oif { neg, .. } => {
                    e.push(AcceptExpr::Meta(if matches!(inner.as_ref(), Cond::Iif { .. }) {
                        Meta::IifName
                    } else {
                        Meta::OifName
                    }));
                    (*neg, false)
                }
                _ => return Ok(()),
            };
            let _ = v6;
            let lookup = LookupByName::new(name, None).map_err(|source| BatchError::Nul {
                what: "set name",
                name: name.clone(),
                source,
            })?;
            e.push(AcceptExpr::Lookup(if neg { lookup.inverted() } else { lookup }));
        }
        Cond::Saddr { neg, prefixes } | Cond::Daddr { neg, prefixes } => {
            let v6 = prefixes.first().is_some_and(Prefix::is_v6);
            if spec.family == "inet" && !*have_nfproto {
                e.push(AcceptExpr::Meta(Meta::NfProto));
                e.push(AcceptExpr::Cmp(CmpOp::Eq, Bytes(vec![if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }])));
                *have_nfproto = true;
            }
            e.push(AcceptExpr::Payload(addr_payload(v6, matches!(c, Cond::Saddr { .. }))));
            match prefixes.as_slice() {
                [one] => {
                    let (net, mask) = prefix_bytes(one);
                    if !one.is_host() {
                        e.push(AcceptExpr::Mask(Bytes(mask)));
                    }
                    e.push(AcceptExpr::Cmp(op(*neg), Bytes(net)));
                }
                many => {
                    let kind = if v6 { SetKind::Ipv6 } else { SetKind::Ipv4 };
                    e.push(anon_lookup(b, spec, kind, many.iter().copied().map(Elem::Prefix).collect())?);
                }
            }
        }
        Cond::Dport { neg, ranges } | Cond::Sport { neg, ranges } => {
            e.push(AcceptExpr::Payload(port_payload(spec.proto, matches!(c, Cond::Sport { .. }))));
            match ranges.as_slice() {
                [p] if p.is_single() => e.push(AcceptExpr::Cmp(op(*neg), Bytes(p.lo.to_be_bytes().to_vec()))),
                [PortRange { lo, hi }] if !*neg => {
                    e.push(AcceptExpr::Cmp(CmpOp::Gte, Bytes(lo.to_be_bytes().to_vec())));
                    e.push(AcceptExpr::Cmp(CmpOp::Lte, Bytes(hi.to_be_bytes().to_vec())));
                }
                many => e.push(anon_lookup(b, spec, SetKind::Ports, many.iter().copied().map(Elem::Port).collect())?),
            }
        }
        Cond::Iif { neg, names } | Cond::Oif { neg, names } => {
            e.push(AcceptExpr::Meta(if matches!(c, Cond::Iif { .. }) { Meta::IifName } else { Meta::OifName }));
            let parsed: Vec<crate::model::names::IfName> =
                names.iter().filter_map(|n| crate::model::names::IfName::parse(n).ok()).collect();
            match parsed.as_slice() {
                [one] => e.push(AcceptExpr::Cmp(op(*neg), Bytes(ifname_key(one).to_vec()))),
                many => {
                    e.push(anon_lookup(b, spec, SetKind::Ifname, many.iter().cloned().map(Elem::Ifname).collect())?)
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn anon_lookup(
    b: &mut BatchBuilder,
    spec: &AcceptSpec<'_>,
    kind: SetKind,
    elems: Vec<Elem>,
) -> Result<AcceptExpr, BatchError> {
    let set = b.add_anonymous_set(spec.family, spec.table, kind, elems)?;
    let lookup = LookupByName::new(&set.name, Some(set.id)).map_err(|source| BatchError::Nul {
        what: "set name",
        name: set.name.clone(),
        source,
    })?;
    Ok(AcceptExpr::Lookup(lookup))
}

/// Network address and mask of a prefix, in network byte order.
fn prefix_bytes(p: &Prefix) -> (Vec<u8>, Vec<u8>) {
    match p {
        Prefix::V4(a, l) => {
            let mask = if *l == 0 { 0 } else { u32::MAX << (32 - u32::from(*l)) };
            (a.octets().to_vec(), mask.to_be_bytes().to_vec())
        }
        Prefix::V6(a, l) => {
            let mask = if *l == 0 { 0 } else { u128::MAX << (128 - u32::from(*l)) };
            (a.octets().to_vec(), mask.to_be_bytes().to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks() {
        let p = Prefix::V4(std::net::Ipv4Addr::new(10, 0, 0, 0), 8);
        assert_eq!(prefix_bytes(&p), (vec![10, 0, 0, 0], vec![255, 0, 0, 0]));
        let p = Prefix::V6("fd00::".parse().expect("addr"), 8);
        let (net, mask) = prefix_bytes(&p);
        assert_eq!(net[0], 0xfd);
        assert_eq!(mask[0], 0xff);
        assert!(mask[1..].iter().all(|b| *b == 0));
    }
}
