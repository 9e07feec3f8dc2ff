//! Streaming reads of the nf_tables ruleset for `ctguard doctor` (issue 16): the rule dump is
//! decoded message by message as its datagrams arrive and only what the caller asks for is
//! kept, so the memory of a read does not grow with the number of rules.
//!
//! [`outline`] reads the tables and chains (small) and, of the rules, only whether any of them
//! may notrack ([`may_notrack`]): the doctor's NOTRACK analysis has nothing to find when none
//! does, whatever the ruleset's size. Every rule of every table is looked at (chains reached
//! only by a jump included), the tables iptables-nft owns too (their compat `CT`/`NOTRACK`
//! targets count). One consistent snapshot: the generation id is read before and after the
//! dumps and the read is repeated when it moved or a dump was interrupted (`NLM_F_DUMP_INTR`).
//! Read-only; run it in the target's thread (`crate::netns::Target::run`).

use super::netlink::{self, NetlinkError};
use super::nft_read::{decode_chain, decode_rule, decode_table, Expr, RawChain, RawRule};

// nf_tables message types (linux/netfilter/nf_tables.h).
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
/// How often a read is retried when the ruleset changed during it.
const MAX_ATTEMPTS: usize = 8;

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

/// The ruleset without its rules: what the doctor needs when no rule may notrack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outline {
    /// (family, name) of every table, in the kernel's order.
    pub tables: Vec<(String, String)>,
    /// Every chain (binding chains included, marked), in the kernel's order.
    pub chains: Vec<RawChain>,
    /// Rules looked at.
    pub rules: u64,
    /// Rules that may notrack ([`may_notrack`]).
    pub notrack_candidates: u64,
    /// The generation id of the snapshot.
    pub genid: u32,
}

/// True when `rule` may notrack a packet: a `notrack` statement, or an x_tables compat target
/// `CT` (iptables-nft's `-j CT --notrack`, among other CT options) or `NOTRACK`. Errs on the
/// side of "may": a false "may" costs the doctor a full read, a false "not" a missed finding.
/// Pure.
pub fn may_notrack(rule: &RawRule) -> bool {
    rule.exprs.iter().any(|e| match e {
        Expr::Stmt { name, .. } => name == "notrack",
        Expr::XtTarget(t) => t == "CT" || t == "NOTRACK",
        _ => false,
    })
}

/// One pass; `Ok(None)` when a dump was interrupted.
fn outline_once() -> Result<Option<Outline>, NftStreamError> {
    let mut out = Outline::default();
    let mut bad: Option<&'static str> = None;
    let mut interrupted = netlink::dump_each(NFT_MSG_GETTABLE, 0, &[], "GETTABLE (dump the tables)", &mut |ty, p| {
        if ty == NFT_MSG_NEWTABLE {
            match decode_table(p) {
                Some(t) => out.tables.push(t),
                None => bad = bad.or(Some("NEWTABLE")),
            }
        }
    })?;
    interrupted |= netlink::dump_each(NFT_MSG_GETCHAIN, 0, &[], "GETCHAIN (dump the chains)", &mut |ty, p| {
        if ty == NFT_MSG_NEWCHAIN {
            match decode_chain(p) {
                Some(c) => out.chains.push(c),
                None => bad = bad.or(Some("NEWCHAIN")),
            }
        }
    })?;
    let (mut rules, mut candidates) = (0u64, 0u64);
    interrupted |= netlink::dump_each(NFT_MSG_GETRULE, 0, &[], "GETRULE (dump the rules)", &mut |ty, p| {
        if ty == NFT_MSG_NEWRULE {
            match decode_rule(p) {
                Some(r) => {
                    rules += 1;
                    candidates += u64::from(may_notrack(&r));
                }
                None => bad = bad.or(Some("NEWRULE")),
            }
        }
    })?;
    if let Some(what) = bad {
        return Err(NftStreamError::Malformed(what));
    }
    out.rules = rules;
    out.notrack_candidates = candidates;
    Ok((!interrupted).then_some(out))
}

/// The tables and chains of the calling thread's namespace and whether any rule may notrack,
/// from one consistent snapshot (see the module's documentation). Memory: the tables and
/// chains, and one receive buffer; no rule is kept.
pub fn outline() -> Result<Outline, NftStreamError> {
    for _ in 0..MAX_ATTEMPTS {
        let before = netlink::get_genid()?;
        let lap = crate::timing::Lap::start("doctor: nft outline (streamed)");
        let Some(mut o) = outline_once()? else { continue };
        drop(lap);
        if netlink::get_genid()? != before {
            continue;
        }
        o.genid = before;
        return Ok(o);
    }
    Err(NftStreamError::Unstable(MAX_ATTEMPTS))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(may_notrack(&rule(vec![Expr::XtTarget("CT".into())])));
        assert!(may_notrack(&rule(vec![Expr::XtTarget("NOTRACK".into())])));
        assert!(!may_notrack(&rule(vec![Expr::XtTarget("REJECT".into()), Expr::XtMatch("conntrack".into())])));
        assert!(!may_notrack(&rule(vec![stmt("counter"), stmt("ct")])));
        assert!(!may_notrack(&rule(Vec::new())));
    }
}
