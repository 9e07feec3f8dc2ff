//! What the agent's guard of a committed policy asks of the backend (DESIGN §2 "Guard of
//! committed policies"): which of ctguard's objects are gone (a host firewall reload), and the
//! fail-safe that removes ctguard's NOTRACK objects when putting them back would widen access.
//! Reads are cheap (netlink table and chain dumps, one save per iptables variant and family);
//! the repair itself is an ordinary `prepare` + `apply` with the committed transaction's tag.

use super::{rollback, PolicyTxnError, PolicyUndo, RollbackReport, Variant};
use crate::backend::iptables as ipt_backend;
use crate::backend::netlink::{dump_chain_rules, list_tables};
use crate::model::Backend;
use crate::render::ipt_edit as ipt;
use crate::render::iptables::{IpFamily, CHAIN_OUT, CHAIN_PRE, RAW_TABLE};
use crate::render::nft_ir::TABLE_NAME;

fn family(v6: bool) -> IpFamily {
    if v6 {
        IpFamily::V6
    } else {
        IpFamily::V4
    }
}

/// The objects of the committed transaction `u` that are missing now, one line each (empty:
/// intact): `table inet ctguard` (nft backend), each tagged accept rule in its chain, and the
/// tagged raw chains with their jumps (iptables backends). Read-only.
pub fn missing(u: &PolicyUndo) -> Result<Vec<String>, PolicyTxnError> {
    let mut out = Vec::new();
    if u.backend == Backend::Nft {
        let tables = list_tables().map_err(|source| PolicyTxnError::RuleDump { chain: "(tables)".into(), source })?;
        if !tables.iter().any(|(f, n)| f == "inet" && n == TABLE_NAME) {
            out.push(format!("table inet {TABLE_NAME}"));
        }
    }
    for ins in &u.nft_insertions {
        // A chain (or table) that is gone dumps as empty.
        let present = dump_chain_rules(&ins.family, &ins.table, &ins.chain)
            .map_err(|source| PolicyTxnError::RuleDump {
                chain: format!("{} {} {}", ins.family, ins.table, ins.chain),
                source,
            })?
            .iter()
            .any(|r| r.comment.as_deref() == Some(u.tag.as_str()));
        if !present {
            out.push(format!("accept in {} {} {}: {}", ins.family, ins.table, ins.chain, ins.rule));
        }
    }
    let mut keys: Vec<(Variant, bool)> = Vec::new();
    for i in &u.ipt_insertions {
        keys.push((i.variant, i.v6));
    }
    for r in &u.raw {
        keys.push((r.variant, r.v6));
    }
    keys.sort_unstable();
    keys.dedup();
    for (variant, v6) in keys {
        let v = crate::live::fw::IptVariant::from(variant);
        let (_, dump) = ipt_backend::save_parsed(v, family(v6)).map_err(|e| PolicyTxnError::Iptables(Box::new(e)))?;
        for i in u.ipt_insertions.iter().filter(|i| i.variant == variant && i.v6 == v6) {
            if ipt::tagged(&dump, &i.table, &i.chain, &u.tag).is_empty() {
                out.push(format!("{} accept in {} {}: {}", v.tool(v6, ""), i.table, i.chain, i.spec.join(" ")));
            }
        }
        if u.raw.iter().any(|r| r.variant == variant && r.v6 == v6) {
            let raw = ipt::raw_chains(&dump);
            let tagged = [CHAIN_PRE, CHAIN_OUT].iter().any(|c| !ipt::tagged(&dump, RAW_TABLE, c, &u.tag).is_empty());
            if !raw.exist || !tagged || raw.jumps.is_empty() {
                out.push(format!("{} raw chains {CHAIN_PRE}/{CHAIN_OUT} and their jumps", v.tool(v6, "")));
            }
        }
    }
    Ok(out)
}

/// The fail-safe: removes ctguard's NOTRACK objects of the committed transaction `u` (its
/// table, its raw chains and jumps) and its accept rules, so the service runs tracked again;
/// sysctls stay as they are (a tracked service needs the larger table more, not less) and
/// nothing of an earlier transaction is put back. Idempotent.
pub fn degrade(u: &PolicyUndo) -> Result<RollbackReport, PolicyTxnError> {
    let mut d = u.clone();
    d.sysctls.clear();
    d.removed_previous.clear();
    // Delete ctguard's table, restore no earlier one.
    d.table =
        if u.backend == Backend::Nft || u.table.is_some() { Some(super::TableBefore { text: None }) } else { None };
    for r in &mut d.raw {
        r.before = ipt::RawChains::default();
        r.jumps_added = vec![("PREROUTING".into(), CHAIN_PRE.into()), ("OUTPUT".into(), CHAIN_OUT.into())];
    }
    rollback(&d)
}
