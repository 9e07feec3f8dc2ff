//! A table's content as the kernel dumps it, for telling whether two namespaces hold the
//! same table without `nft list` (4.5 s for a 100k-rule iptables-nft table, against a few
//! hundred milliseconds of netlink dumps).
//!
//! The fingerprint keeps what makes the table behave: the table's flags; each chain's name,
//! hook, policy, type, flags and user data; each chain's rules in order — expressions, user
//! data (comments) and compat information. It leaves out what differs between two copies of
//! one ruleset: handles, use counts, and counters (a `counter` expression's values, a base
//! chain's counters). Equal bytes mean equal `nft list` output; unequal bytes may still list
//! the same (two encodings nft prints alike, e.g. tables written by different iptables-nft
//! versions), so a caller that finds a difference compares the listings as before.

use std::collections::BTreeMap;

use crate::backend::netlink::{dump_each_msg, nul_str, parse_attrs, put_attr as put, NetlinkError};
use crate::backend::nft_read::{
    NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE,
};

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
/// Chain attributes kept: hook, policy, type, flags, user data.
const CHAIN_KEPT: [u16; 5] = [4, 5, 7, 10, 12];
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
/// Rule attributes kept besides the expressions: compat, user data.
const RULE_KEPT: [u16; 2] = [5, 7];
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;

/// One table's fingerprint (see the module). Two are equal when the tables are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableFingerprint {
    /// The table's flags attribute, when it has one.
    pub flags: Option<Vec<u8>>,
    /// Per chain name: its definition and its rules in order.
    pub chains: BTreeMap<String, (Vec<u8>, Vec<Vec<u8>>)>,
}

impl TableFingerprint {
    /// The first difference from `other`, in words; `None` when equal.
    pub fn difference(&self, other: &TableFingerprint) -> Option<String> {
        if self.flags != other.flags {
            return Some("the table's flags differ".into());
        }
        for name in self.chains.keys().chain(other.chains.keys()) {
            match (self.chains.get(name), other.chains.get(name)) {
                (Some(_), None) | (None, Some(_)) => return Some(format!("chain {name} is in one table only")),
                (Some((a, _)), Some((b, _))) if a != b => return Some(format!("chain {name} is defined differently")),
                (Some((_, ra)), Some((_, rb))) if ra.len() != rb.len() => {
                    return Some(format!("chain {name} holds {} rules here, {} there", ra.len(), rb.len()))
                }
                (Some((_, ra)), Some((_, rb))) => {
                    if let Some(i) = ra.iter().zip(rb).position(|(x, y)| x != y) {
                        return Some(format!("rule {} of chain {name} differs", i + 1));
                    }
                }
                (None, None) => {}
            }
        }
        None
    }
}

impl TableFingerprint {
    /// A 64-bit digest of the whole fingerprint (FNV-1a over its bytes, each part
    /// length-prefixed), as 16 hex digits: stable across builds, so it can be journaled.
    pub fn digest(&self) -> String {
        let mut h = Fnv1a::new();
        let mut eat = |b: &[u8]| {
            h.eat(&(b.len() as u64).to_le_bytes());
            h.eat(b);
        };
        eat(self.flags.as_deref().unwrap_or(b"-"));
        for (name, (def, rules)) in &self.chains {
            eat(name.as_bytes());
            eat(def);
            eat(&(rules.len() as u64).to_le_bytes());
            for r in rules {
                eat(r);
            }
        }
        format!("{:016x}", h.0)
    }

    /// Each chain in name order with, for a base chain, its type, hook number, priority and
    /// policy (`None` when the chain has no policy attribute).
    pub fn chain_outline(&self) -> Vec<(String, Option<BaseChain>)> {
        self.chains.iter().map(|(name, (def, _))| (name.clone(), base_chain(def))).collect()
    }
}

/// 64-bit FNV-1a: a digest stable across builds and Rust versions (unlike `DefaultHasher`),
/// for values that are journaled or compared later.
pub(crate) struct Fnv1a(pub u64);

impl Fnv1a {
    pub fn new() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub fn eat(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// What a base chain hooks (see [`TableFingerprint::chain_outline`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    /// `filter`, `nat`, `route`.
    pub kind: String,
    /// The netfilter hook number.
    pub hook: u32,
    /// The priority.
    pub priority: i32,
    /// 1 accept, 0 drop.
    pub policy: Option<u32>,
}

fn be_u32(d: &[u8]) -> Option<u32> {
    d.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The base chain a chain definition (kept attributes) describes, if it has a hook. Pure.
fn base_chain(def: &[u8]) -> Option<BaseChain> {
    let attrs = parse_attrs(def);
    let hook = attrs.iter().find(|(t, _)| *t == 4).map(|(_, d)| parse_attrs(d))?;
    let num = hook.iter().find(|(t, _)| *t == 1).and_then(|(_, d)| be_u32(d))?;
    let priority = hook.iter().find(|(t, _)| *t == 2).and_then(|(_, d)| be_u32(d)).unwrap_or(0) as i32;
    let kind = attrs.iter().find(|(t, _)| *t == 7).map(|(_, d)| nul_str(d)).unwrap_or_default();
    let policy = attrs.iter().find(|(t, _)| *t == 5).and_then(|(_, d)| be_u32(d));
    Some(BaseChain { kind, hook: num, priority, policy })
}

/// True when table `family` `name` holds anything besides chains and rules — a set, a map, a
/// stateful object or a flowtable (`NFT_MSG_GETSET`, `GETOBJ`, `GETFLOWTABLE` dumps filtered by
/// the table). Read-only.
pub fn has_other_objects(family: &str, name: &str) -> Result<bool, NetlinkError> {
    const GETSET: u16 = 10;
    const GETOBJ: u16 = 19;
    const GETFLOWTABLE: u16 = 23;
    let nfproto = crate::render::nft_batch::nfproto_of(family)
        .ok_or_else(|| NetlinkError::Malformed(format!("unknown nft family {family:?}")))? as u8;
    let mut table_attr = name.as_bytes().to_vec();
    table_attr.push(0);
    let mut any = false;
    // The table attribute is type 1 in each of the three requests.
    for (msg, what) in [
        (GETSET, "GETSET (objects besides chains)"),
        (GETOBJ, "GETOBJ (objects besides chains)"),
        (GETFLOWTABLE, "GETFLOWTABLE (objects besides chains)"),
    ] {
        let intr = dump_each_msg(msg, nfproto, &[(1, &table_attr)], what, &mut |_, _| any = true)?;
        if intr {
            return Err(NetlinkError::Malformed("a dump was interrupted by a concurrent change".into()));
        }
        if any {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A rule's expressions with every `counter`'s values left out. Pure.
fn expressions_without_counters(list: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len());
    for (ty, elem) in parse_attrs(list) {
        if ty != NFTA_LIST_ELEM {
            put(&mut out, ty, elem);
            continue;
        }
        let attrs = parse_attrs(elem);
        let is_counter = attrs.iter().any(|(t, d)| *t == NFTA_EXPR_NAME && nul_str(d) == "counter");
        let mut e = Vec::with_capacity(elem.len());
        for (t, d) in attrs {
            if is_counter && t != NFTA_EXPR_NAME {
                continue;
            }
            put(&mut e, t, d);
        }
        put(&mut out, NFTA_LIST_ELEM, &e);
    }
    out
}

/// (chain name, the rule's kept bytes) of a rule message's attributes. Pure.
fn rule_key(attrs: &[(u16, &[u8])]) -> (String, Vec<u8>) {
    let mut chain = String::new();
    let mut out = Vec::new();
    for (t, d) in attrs {
        if *t == NFTA_RULE_CHAIN {
            chain = nul_str(d);
        } else if *t == NFTA_RULE_EXPRESSIONS {
            put(&mut out, *t, &expressions_without_counters(d));
        } else if RULE_KEPT.contains(t) {
            put(&mut out, *t, d);
        }
    }
    (chain, out)
}

/// Reads table `family` `name`'s fingerprint in the calling thread's namespace: three netlink
/// dumps (the tables, the chains, the table's rules). Read-only. A dump the kernel marks
/// interrupted by a concurrent change is an error (read again, or compare otherwise).
pub fn table_fingerprint(family: &str, name: &str) -> Result<TableFingerprint, NetlinkError> {
    let nfproto = crate::render::nft_batch::nfproto_of(family)
        .ok_or_else(|| NetlinkError::Malformed(format!("unknown nft family {family:?}")))? as u8;
    let interrupted = || NetlinkError::Malformed("a dump was interrupted by a concurrent change".into());
    let mut fp = TableFingerprint::default();
    let mut found = false;
    let intr = dump_each_msg(NFT_MSG_GETTABLE, nfproto, &[], "GETTABLE (fingerprint)", &mut |ty, payload| {
        if ty != NFT_MSG_NEWTABLE {
            return;
        }
        let attrs = parse_attrs(payload.get(4..).unwrap_or_default());
        if attrs.iter().any(|(t, d)| *t == NFTA_TABLE_NAME && nul_str(d) == name) {
            found = true;
            fp.flags = attrs.iter().find(|(t, _)| *t == NFTA_TABLE_FLAGS).map(|(_, d)| d.to_vec());
        }
    })?;
    if intr {
        return Err(interrupted());
    }
    if !found {
        return Ok(fp);
    }
    let intr = dump_each_msg(NFT_MSG_GETCHAIN, nfproto, &[], "GETCHAIN (fingerprint)", &mut |ty, payload| {
        if ty != NFT_MSG_NEWCHAIN {
            return;
        }
        let attrs = parse_attrs(payload.get(4..).unwrap_or_default());
        if !attrs.iter().any(|(t, d)| *t == NFTA_CHAIN_TABLE && nul_str(d) == name) {
            return;
        }
        let mut def = Vec::new();
        let mut chain = String::new();
        for (t, d) in &attrs {
            if *t == NFTA_CHAIN_NAME {
                chain = nul_str(d);
            } else if CHAIN_KEPT.contains(t) {
                put(&mut def, *t, d);
            }
        }
        fp.chains.entry(chain).or_default().0 = def;
    })?;
    if intr {
        return Err(interrupted());
    }
    let mut table_attr = name.as_bytes().to_vec();
    table_attr.push(0);
    let mut stray = false;
    let intr = dump_each_msg(
        NFT_MSG_GETRULE,
        nfproto,
        &[(NFTA_RULE_TABLE, &table_attr)],
        "GETRULE (fingerprint)",
        &mut |ty, payload| {
            if ty != NFT_MSG_NEWRULE {
                return;
            }
            let attrs = parse_attrs(payload.get(4..).unwrap_or_default());
            let (chain, rule) = rule_key(&attrs);
            match fp.chains.get_mut(&chain) {
                Some((_, rules)) => rules.push(rule),
                None => stray = true,
            }
        },
    )?;
    if intr || stray {
        return Err(interrupted());
    }
    Ok(fp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, d: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put(&mut v, ty, d);
        v
    }

    fn expr(name: &str, data: &[u8]) -> Vec<u8> {
        let mut e = attr(NFTA_EXPR_NAME, format!("{name}\0").as_bytes());
        e.extend(attr(2, data));
        attr(NFTA_LIST_ELEM, &e)
    }

    /// Two copies of a rule that differ only in their counter's values (and handle) have one
    /// fingerprint; any other difference shows.
    #[test]
    fn counters_and_handles_are_left_out_nothing_else() {
        let rule = |packets: u8, handle: u8, port: u8| {
            let mut exprs = expr("counter", &attr(2, &[packets; 8]));
            exprs.extend(expr("cmp", &attr(3, &[0, port])));
            let mut a = attr(NFTA_RULE_CHAIN, b"INPUT\0");
            a.extend(attr(3, &[handle; 8]));
            a.extend(attr(NFTA_RULE_EXPRESSIONS, &exprs));
            a.extend(attr(7, b"comment"));
            a
        };
        let key = |b: &[u8]| rule_key(&parse_attrs(b));
        assert_eq!(key(&rule(1, 5, 53)), key(&rule(9, 7, 53)));
        assert_eq!(key(&rule(1, 5, 53)).0, "INPUT");
        assert_ne!(key(&rule(1, 5, 53)), key(&rule(1, 5, 54)));
    }

    #[test]
    fn the_first_difference_is_named() {
        let mut a = TableFingerprint::default();
        a.chains.insert("INPUT".into(), (vec![1], vec![vec![1], vec![2]]));
        let mut b = a.clone();
        assert_eq!(a.difference(&b), None);
        b.chains.get_mut("INPUT").expect("chain").1[1] = vec![3];
        assert_eq!(a.difference(&b).as_deref(), Some("rule 2 of chain INPUT differs"));
        let mut b = a.clone();
        b.chains.insert("x".into(), (vec![], vec![]));
        assert_eq!(a.difference(&b).as_deref(), Some("chain x is in one table only"));
    }
}
