//! Streaming reads of the nf_tables ruleset for `ctguard doctor` (issue 16): the rules as
//! [`crate::backend::nft_read::build`] models them, but each converted as its message arrives
//! (the set elements it looks up read on demand, an anonymous set's dropped after its rule)
//! and kept only when the caller's predicate says so; the raw messages and decoded expressions
//! are never held, so a read's memory is what the caller keeps, whatever the ruleset's size.
//! [`Reader::stream_into`] streams every table's rules or only chosen chains (`GETRULE` with
//! `NFTA_RULE_TABLE`/`NFTA_RULE_CHAIN`), and counts the rules that may notrack
//! ([`may_notrack`]). All passes of a [`Reader`] sit between the same two generation ids:
//! [`Reader::consistent`] says whether the snapshot held (no change, no `NLM_F_DUMP_INTR`).
//! Read-only; run it in the target's thread (`crate::netns::Target::run`).

use std::collections::{HashMap, HashSet};

use super::netlink::{self, NetlinkError};
use super::nft_read::{
    convert_rule, decode_chain, decode_elems, decode_rule, decode_set, decode_table, ifname_of, Expr, NotrackRules,
    RawChain, RawRule, RawSet, Sets, ANON_CHAIN,
};
use crate::live::fw::{FwChain, FwRule, FwTables, IptVariant, Owner, Verdict};
use crate::live::iptables_fw;
use crate::live::nft_json::NftRuleset;

// nf_tables message types (linux/netfilter/nf_tables.h), as the whole-ruleset reader names them.
use super::nft_read::{
    NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWTABLE,
};
/// `NFT_SET_ANONYMOUS`.
const SET_ANONYMOUS: u32 = 0x1;
/// iptables' tables in the order `iptables-nft-save` prints them, each with its built-in
/// chains in hook order.
const IPT_TABLES: [(&str, &[&str]); 5] = [
    ("mangle", &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]),
    ("security", &["INPUT", "FORWARD", "OUTPUT"]),
    ("raw", &["PREROUTING", "OUTPUT"]),
    ("filter", &["INPUT", "FORWARD", "OUTPUT"]),
    ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]),
];
/// How often a read is retried when the ruleset changed during it.
pub const MAX_ATTEMPTS: usize = 8;

/// Errors of a streamed read.
#[derive(Debug, thiserror::Error)]
pub enum NftStreamError {
    /// A dump failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A message of the dump could not be decoded.
    #[error("{0} reply not understood")]
    Malformed(&'static str),
    /// The ruleset kept changing while it was read.
    #[error("the nf_tables ruleset changed during each of {0} reads; no consistent snapshot")]
    Unstable(usize),
}

/// True when `rule` may notrack a packet: a `notrack` statement, or an x_tables compat target
/// `CT` (iptables-nft's `-j CT --notrack`, among other CT options) or `NOTRACK`. Errs on the
/// side of "may": a false "may" costs the doctor a full read, a false "not" a missed finding.
/// Pure.
pub fn may_notrack(rule: &RawRule) -> bool {
    rule.exprs.iter().any(|e| match e {
        Expr::Stmt { name, .. } => name == "notrack",
        Expr::XtTarget(t) => t.name == "CT" || t.name == "NOTRACK",
        _ => false,
    })
}

/// One GETRULE dump: family, attributes (type, NUL-terminated value), what it is for.
type RuleDump = (u8, Vec<(u16, Vec<u8>)>, &'static str);

/// (family, table, chain).
pub type ChainKey = (String, String, String);

/// One snapshot's tables, chains and set descriptions, and the rules streamed from it on
/// demand. Open it, stream, then ask [`Reader::consistent`]: when false, read again.
pub struct Reader {
    genid: u32,
    interrupted: bool,
    skip: Vec<(String, String)>,
    tables: Vec<(String, String)>,
    chains: Vec<RawChain>,
    bindings: HashSet<ChainKey>,
    sets: Vec<RawSet>,
    set_index: HashMap<ChainKey, usize>,
    loaded: HashSet<usize>,
    /// Rules looked at, over every pass.
    pub rules_seen: u64,
    /// Rules kept, over every pass.
    pub rules_kept: u64,
    /// Rules that may notrack ([`may_notrack`]; binding chains' included), over every pass.
    pub notrack_candidates: u64,
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn nfproto(family: &str) -> u8 {
    crate::render::nft_batch::nfproto_of(family).unwrap_or(0) as u8
}

impl Reader {
    /// Reads the generation id, then the tables, chains and set descriptions (no element).
    /// The rules of the tables in `skip` (family, name) are never streamed.
    pub fn open(skip: &[(String, String)]) -> Result<Reader, NftStreamError> {
        let genid = netlink::get_genid()?;
        let mut r = Reader {
            genid,
            interrupted: false,
            skip: skip.to_vec(),
            tables: Vec::new(),
            chains: Vec::new(),
            bindings: HashSet::new(),
            sets: Vec::new(),
            set_index: HashMap::new(),
            loaded: HashSet::new(),
            rules_seen: 0,
            rules_kept: 0,
            notrack_candidates: 0,
        };
        let mut bad: Option<&'static str> = None;
        let (tables, chains, sets) = (&mut r.tables, &mut r.chains, &mut r.sets);
        r.interrupted |= collect_decoded(
            NFT_MSG_GETTABLE,
            NFT_MSG_NEWTABLE,
            "GETTABLE (dump the tables)",
            "NEWTABLE",
            decode_table,
            tables,
            &mut bad,
        )?;
        r.interrupted |= collect_decoded(
            NFT_MSG_GETCHAIN,
            NFT_MSG_NEWCHAIN,
            "GETCHAIN (dump the chains)",
            "NEWCHAIN",
            decode_chain,
            chains,
            &mut bad,
        )?;
        r.interrupted |= collect_decoded(
            NFT_MSG_GETSET,
            NFT_MSG_NEWSET,
            "GETSET (dump the sets)",
            "NEWSET",
            decode_set,
            sets,
            &mut bad,
        )?;
        if let Some(what) = bad {
            return Err(NftStreamError::Malformed(what));
        }
        r.bindings = r
            .chains
            .iter()
            .filter(|c| c.binding)
            .map(|c| (c.family.clone(), c.table.clone(), c.name.clone()))
            .collect();
        r.set_index =
            r.sets.iter().enumerate().map(|(i, s)| ((s.family.clone(), s.table.clone(), s.name.clone()), i)).collect();
        Ok(r)
    }

    /// The tables and their chains without rules, in the order and shape
    /// [`crate::backend::nft_read::build`] gives them (binding chains left out).
    pub fn skeleton(&self) -> NftRuleset {
        let mut out = NftRuleset { tables: self.tables.clone(), fw: FwTables::default() };
        for (tf, tn) in &self.tables {
            for c in self.chains.iter().filter(|c| &c.family == tf && &c.table == tn && !c.binding) {
                out.fw.chains.push(super::nft_read::empty_chain(c));
            }
        }
        out
    }

    /// Reads the elements of set `i` (once).
    fn load_set(&mut self, i: usize) -> Result<(), NftStreamError> {
        if !self.loaded.insert(i) {
            return Ok(());
        }
        let s = &mut self.sets[i];
        let (table, name) = (nul(&s.table), nul(&s.name));
        let elems = &mut s.elems;
        self.interrupted |= netlink::dump_each_msg(
            NFT_MSG_GETSETELEM,
            nfproto(&s.family),
            &[(1, &table), (2, &name)],
            "GETSETELEM (dump a set)",
            &mut |ty, p| {
                if ty == NFT_MSG_NEWSETELEM {
                    elems.extend(decode_elems(p));
                }
            },
        )?;
        Ok(())
    }

    /// Converts one rule as `build` does (one neutral rule, or one per verdict map element),
    /// its sets' elements read first; an anonymous set's elements are dropped afterwards.
    fn convert(&mut self, r: &RawRule, index: usize) -> Result<Vec<FwRule>, NftStreamError> {
        let find = |set: &String| self.set_index.get(&(r.family.clone(), r.table.clone(), set.clone())).copied();
        // The sets it looks up, with their elements (as nft_read reads them); the sets its
        // statements name (meters, object maps), described only.
        let used: Vec<usize> = r
            .exprs
            .iter()
            .filter_map(|e| match e {
                Expr::Lookup { set, .. } => find(set),
                _ => None,
            })
            .collect();
        let named: Vec<usize> = r
            .exprs
            .iter()
            .filter_map(|e| match e {
                Expr::Stmt { meter_set: Some(set), .. } => find(set),
                _ => None,
            })
            .collect();
        for &i in &used {
            self.load_set(i)?;
        }
        let map: Sets<'_> = used
            .iter()
            .chain(&named)
            .map(|&i| &self.sets[i])
            .map(|s| ((s.family.as_str(), s.table.as_str(), s.name.as_str()), s))
            .collect();
        let mut out = convert_rule(r, &map, &ifname_of);
        drop(map);
        for rule in out.iter_mut() {
            if let Verdict::Jump(t) | Verdict::Goto(t) = &rule.verdict {
                if self.bindings.contains(&(r.family.clone(), r.table.clone(), t.clone())) {
                    rule.verdict = Verdict::Other(format!("{ANON_CHAIN} {t}"));
                }
            }
            rule.handle = Some(r.handle);
            rule.comment = r.comment.clone();
            rule.index = index;
        }
        for &i in &used {
            if self.sets[i].flags & SET_ANONYMOUS != 0 {
                self.sets[i].elems = Vec::new();
                self.loaded.remove(&i);
            }
        }
        Ok(out)
    }

    /// Streams the rules into the nft chains of `into` (found by owner and name): of every
    /// table but the skipped ones (`only` = `None`), or of the chains in `only` (one
    /// `GETRULE` dump each; the rules those chains held are replaced). A rule is kept when
    /// `keep(rule, notrack)` says so (`notrack`: it carries a `notrack` statement, and its key
    /// then goes into `notrack`); every rule counts for the indexes. Rules of binding chains
    /// are left out, as `build` does. With `ipt`, the rules of iptables-nft's tables are also
    /// printed into it as they pass ([`IptCapture`]).
    pub fn stream_into(
        &mut self,
        into: &mut FwTables,
        notrack: &mut NotrackRules,
        only: Option<&HashSet<ChainKey>>,
        keep: &mut dyn FnMut(&FwRule, bool) -> bool,
        mut ipt: Option<&mut IptCapture<'_>>,
    ) -> Result<(), NftStreamError> {
        let index: HashMap<ChainKey, usize> = into
            .chains
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match &c.owner {
                Owner::Nft { family, table } => Some(((family.clone(), table.clone(), c.name.clone()), i)),
                Owner::Iptables { .. } => None,
            })
            .collect();
        let mut requests: Vec<RuleDump> = Vec::new();
        match only {
            None if self.skip.is_empty() => requests.push((0, Vec::new(), "GETRULE (dump the rules)")),
            None => {
                for (family, name) in self.tables.iter().filter(|t| !self.skip.contains(t)) {
                    requests.push((nfproto(family), vec![(1, nul(name))], "GETRULE (dump a table's rules)"));
                }
            }
            Some(chains) => {
                for key in chains {
                    if let Some(&i) = index.get(key) {
                        into.chains[i].rules.clear();
                        requests.push((
                            nfproto(&key.0),
                            vec![(1, nul(&key.1)), (2, nul(&key.2))],
                            "GETRULE (dump one chain's rules)",
                        ));
                    }
                }
            }
        }
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for (family, attrs, what) in requests {
            let attrs: Vec<(u16, &[u8])> = attrs.iter().map(|(t, d)| (*t, d.as_slice())).collect();
            let mut failed: Option<NftStreamError> = None;
            // Each rule is converted as its message arrives (a set's elements, when first
            // looked up, are another dump on another socket meanwhile); nothing else is kept.
            let mut each = |ty: u16, p: &[u8]| {
                if ty != NFT_MSG_NEWRULE || failed.is_some() {
                    return;
                }
                let Some(r) = decode_rule(p) else {
                    failed = Some(NftStreamError::Malformed("NEWRULE"));
                    return;
                };
                self.rules_seen += 1;
                self.notrack_candidates += u64::from(may_notrack(&r));
                if let Some(c) = ipt.as_deref_mut() {
                    self.rules_kept += u64::from(c.take(&r));
                }
                let key = (r.family.clone(), r.table.clone(), r.chain.clone());
                if self.bindings.contains(&key) {
                    return;
                }
                let Some(&ci) = index.get(&key) else { return };
                let n = counts.entry(ci).or_insert(0);
                *n += 1;
                let idx = *n;
                let is_notrack = r.exprs.iter().any(|e| matches!(e, Expr::Stmt { name, .. } if name == "notrack"));
                if is_notrack {
                    notrack.insert((r.family.clone(), r.table.clone(), r.chain.clone(), r.handle));
                }
                match self.convert(&r, idx) {
                    Ok(rules) => {
                        for rule in rules {
                            if keep(&rule, is_notrack) {
                                self.rules_kept += 1;
                                into.chains[ci].rules.push(rule);
                            }
                        }
                    }
                    Err(e) => failed = Some(e),
                }
            };
            let interrupted = netlink::dump_each_msg(NFT_MSG_GETRULE, family, &attrs, what, &mut each)?;
            self.interrupted |= interrupted;
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The tables `iptables-nft-save` would print (`ip`/`ip6` tables with iptables' names), as
    /// empty chains in the order the save lists them ([`crate::live::iptables_fw::convert`]'s
    /// model: tables mangle, security, raw, filter, nat; IPv4 first; built-in chains in hook
    /// order, then user chains by name) — or `None` when one of them is not shaped as
    /// iptables-nft writes tables: a set, a binding chain, a base chain that is not one of the
    /// table's built-in chains or a built-in name that is not a base chain. Pure (reads
    /// nothing more).
    pub fn ipt_nft_layout(&self) -> Option<Vec<FwChain>> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let family = if v6 { "ip6" } else { "ip" };
            for (table, builtins) in IPT_TABLES {
                if !self.tables.iter().any(|(f, n)| f == family && n == table) {
                    continue;
                }
                if self.sets.iter().any(|s| s.family == family && s.table == table) {
                    return None;
                }
                let chains: Vec<&RawChain> =
                    self.chains.iter().filter(|c| c.family == family && c.table == table).collect();
                let mut users: Vec<&str> = Vec::new();
                for c in &chains {
                    let builtin = builtins.contains(&c.name.as_str());
                    if c.binding || builtin != c.hooknum.is_some() {
                        return None;
                    }
                    if !builtin {
                        users.push(&c.name);
                    }
                }
                users.sort_unstable();
                for name in builtins {
                    let Some(c) = chains.iter().find(|c| c.name == *name) else { continue };
                    let policy = match c.policy {
                        Some(1) => "ACCEPT",
                        Some(0) => "DROP",
                        _ => return None,
                    };
                    out.push(iptables_fw::empty_chain(IptVariant::Nft, v6, table, name, Some(policy)));
                }
                for name in users {
                    out.push(iptables_fw::empty_chain(IptVariant::Nft, v6, table, name, None));
                }
            }
        }
        Some(out)
    }

    /// Streams the rules of the iptables-nft chains `capture` holds (of every such table when
    /// `only` is `None`, else of the chains in `only`: family `ip`/`ip6`, table, chain; their
    /// rules are replaced) into it ([`IptCapture`]). Returns `false` when a rule cannot be
    /// printed: the caller reads the save instead.
    pub fn stream_ipt_nft(
        &mut self,
        capture: &mut IptCapture<'_>,
        only: Option<&HashSet<ChainKey>>,
    ) -> Result<bool, NftStreamError> {
        let mut requests: Vec<RuleDump> = Vec::new();
        match only {
            None => {
                for (family, table) in capture.tables() {
                    requests.push((nfproto(&family), vec![(1, nul(&table))], "GETRULE (dump an iptables-nft table)"));
                }
            }
            Some(chains) => {
                for key in chains {
                    if capture.clear(key) {
                        requests.push((
                            nfproto(&key.0),
                            vec![(1, nul(&key.1)), (2, nul(&key.2))],
                            "GETRULE (dump one iptables-nft chain)",
                        ));
                    }
                }
            }
        }
        for (family, attrs, what) in requests {
            let attrs: Vec<(u16, &[u8])> = attrs.iter().map(|(t, d)| (*t, d.as_slice())).collect();
            let mut malformed = false;
            let mut each = |ty: u16, p: &[u8]| {
                if ty != NFT_MSG_NEWRULE || malformed || !capture.printable {
                    return;
                }
                let Some(r) = decode_rule(p) else {
                    malformed = true;
                    return;
                };
                self.rules_seen += 1;
                self.rules_kept += u64::from(capture.take(&r));
            };
            let interrupted = netlink::dump_each_msg(NFT_MSG_GETRULE, family, &attrs, what, &mut each)?;
            self.interrupted |= interrupted;
            if malformed {
                return Err(NftStreamError::Malformed("NEWRULE"));
            }
            if !capture.printable {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// True when nothing changed since [`Reader::open`]: the generation id is the same and no
    /// dump was interrupted.
    pub fn consistent(&self) -> Result<bool, NftStreamError> {
        Ok(!self.interrupted && netlink::get_genid()? == self.genid)
    }
}

/// The rules of iptables-nft's tables gathered while rules stream ([`Reader::stream_into`],
/// [`Reader::stream_ipt_nft`]): each printed as `iptables-nft-save` prints it
/// ([`super::ipt_nft_rule::save_line`]), modelled from that line as a save's rule
/// ([`crate::live::iptables_fw::rule_from_line`]) and kept in its chain when `keep` says so;
/// every rule counts for the indexes. Once a rule cannot be printed, `printable` is false and
/// nothing more is taken (the caller reads the save instead).
pub struct IptCapture<'a> {
    /// The chains ([`Reader::ipt_nft_layout`]), filled.
    pub chains: FwTables,
    index: HashMap<ChainKey, usize>,
    counts: HashMap<usize, usize>,
    keep: &'a mut dyn FnMut(&FwRule) -> bool,
    /// False once a rule of these chains could not be printed.
    pub printable: bool,
}

impl<'a> IptCapture<'a> {
    /// A capture into `chains` (iptables-nft's, as [`Reader::ipt_nft_layout`] gives them).
    pub fn new(chains: Vec<FwChain>, keep: &'a mut dyn FnMut(&FwRule) -> bool) -> IptCapture<'a> {
        let index = chains
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.owner, Owner::Iptables { variant: IptVariant::Nft, .. }))
            .filter_map(|(i, c)| c.owner.nf_table().map(|(f, t)| ((f, t, c.name.clone()), i)))
            .collect();
        IptCapture { chains: FwTables { chains }, index, counts: HashMap::new(), keep, printable: true }
    }

    /// The (family, table) of its chains, sorted, each once.
    fn tables(&self) -> Vec<(String, String)> {
        let set: std::collections::BTreeSet<(String, String)> =
            self.index.keys().map(|(f, t, _)| (f.clone(), t.clone())).collect();
        set.into_iter().collect()
    }

    /// Empties chain `key` to read it again; false when it holds no such chain.
    fn clear(&mut self, key: &ChainKey) -> bool {
        let Some(&i) = self.index.get(key) else { return false };
        self.chains.chains[i].rules.clear();
        self.counts.remove(&i);
        true
    }

    /// Takes rule `r` when it is one of its chains'; true when it was kept.
    fn take(&mut self, r: &RawRule) -> bool {
        if !self.printable {
            return false;
        }
        let key = (r.family.clone(), r.table.clone(), r.chain.clone());
        let Some(&ci) = self.index.get(&key) else { return false };
        let n = self.counts.entry(ci).or_insert(0);
        *n += 1;
        let v6 = r.family == "ip6";
        let line = super::ipt_nft_rule::save_line(r, v6);
        let Some(rule) = line.and_then(|l| iptables_fw::rule_from_line(&l, *n, v6)) else {
            tracing::debug!(family = %r.family, table = %r.table, chain = %r.chain, handle = r.handle,
                "an iptables-nft rule not printed from netlink; the save is read instead");
            self.printable = false;
            return false;
        };
        if (self.keep)(&rule) {
            self.chains.chains[ci].rules.push(rule);
            return true;
        }
        false
    }
}

/// One whole-namespace dump of `get` (every family), each message of type `new` decoded with
/// `decode` into `out`; the first message `decode` refuses is named in `bad` (as `name`).
/// Returns whether the dump was interrupted. Read-only.
fn collect_decoded<T>(
    get: u16,
    new: u16,
    what: &'static str,
    name: &'static str,
    decode: fn(&[u8]) -> Option<T>,
    out: &mut Vec<T>,
    bad: &mut Option<&'static str>,
) -> Result<bool, NetlinkError> {
    netlink::dump_each_msg(get, 0, &[], what, &mut |ty, p| {
        if ty == new {
            match decode(p) {
                Some(v) => out.push(v),
                None => *bad = bad.or(Some(name)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nft_read::Xt;

    fn rule(exprs: Vec<Expr>) -> RawRule {
        RawRule {
            family: "ip".into(),
            table: "raw".into(),
            chain: "PREROUTING".into(),
            handle: 1,
            comment: None,
            exprs,
        }
    }

    fn stmt(name: &str) -> Expr {
        Expr::Stmt { name: name.into(), loads: None, uses: Vec::new(), kill_l4: false, meter_set: None }
    }

    #[test]
    fn notrack_statement_and_compat_targets_may_notrack() {
        assert!(may_notrack(&rule(vec![stmt("counter"), stmt("notrack")])));
        assert!(may_notrack(&rule(vec![Expr::XtTarget(Xt::named("CT"))])));
        assert!(may_notrack(&rule(vec![Expr::XtTarget(Xt::named("NOTRACK"))])));
        assert!(!may_notrack(&rule(vec![Expr::XtTarget(Xt::named("REJECT")), Expr::XtMatch(Xt::named("conntrack"))])));
        assert!(!may_notrack(&rule(vec![stmt("counter"), stmt("ct")])));
        assert!(!may_notrack(&rule(Vec::new())));
    }
}
