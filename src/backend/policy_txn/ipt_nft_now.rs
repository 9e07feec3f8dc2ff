//! What the kernel holds of the tables an iptables-nft rollback batch touches (`ipt_nft_undo`),
//! read over netlink: chains, the rules a `-D` names (printed as `iptables-nft-save` prints
//! them), a raw table's rules for its clean-up. Read-only.

use std::collections::BTreeMap;

use super::ipt_nft_undo::{nft_family, RawCleanup, RuleNow, TableNow, TableTakes, Take};
use super::IptNftHandle;
use crate::backend::ipt_nft_rule::save_line;
use crate::backend::netlink::{self, NetlinkError};
use crate::backend::nft_read::{decode_chain, decode_rule};
use crate::render::iptables::RAW_TABLE;

/// Why the kernel state could not be read for the batch.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    /// A dump failed.
    #[error("reading {what} over netlink")]
    Dump {
        /// What was read.
        what: String,
        /// The netlink error.
        #[source]
        source: NetlinkError,
    },
    /// The ruleset changed during a dump.
    #[error("{0} was interrupted by a concurrent change")]
    Interrupted(String),
}

/// Reads, over netlink, what `takes` and `cleanups` touch: per (family, table) its chains;
/// every rule of a raw table to clean up (one dump of that table); and in each chain a `-D`
/// names, the rules whose save line one of its `-D`s names (one dump per chain, decoded and
/// printed datagram by datagram as they arrive: the other rules of a 100k-rule chain are never
/// held). Read-only.
///
/// A chain whose wanted rules all have a hint in `hints` (apply's announced handles) is not
/// dumped: each hinted rule is read back by handle (one lookup, no dump) and counts only if it
/// still prints as the hint's line; if one does not, the chain is dumped after all.
pub(super) fn read_now(
    takes: &[TableTakes],
    cleanups: &[RawCleanup],
    hints: &[IptNftHandle],
) -> Result<BTreeMap<(bool, String), TableNow>, ReadError> {
    // Per (IPv6, table): whole table wanted; per chain, the save lines its `-D`s name.
    type Wanted = (bool, BTreeMap<String, Vec<String>>);
    let mut wanted: BTreeMap<(bool, String), Wanted> = BTreeMap::new();
    for block in takes {
        let entry = wanted.entry((block.v6, block.table.clone())).or_default();
        for t in &block.takes {
            if let Take::Rule { chain, line } = t {
                entry.1.entry(chain.clone()).or_default().push(line.clone());
            }
        }
    }
    for c in cleanups {
        wanted.entry((c.v6, RAW_TABLE.to_string())).or_default().0 = true;
    }
    let mut out = BTreeMap::new();
    for ((v6, table), (whole, chains)) in wanted {
        let fam = nft_family(v6);
        let nfproto = crate::render::nft_batch::nfproto_of(fam).unwrap_or(0) as u8;
        let tname = format!("{table}\0");
        let what = |x: &str| format!("{x} of table {fam} {table}");
        // One dump, each datagram's messages handed to `each` as they arrive.
        let dump = |msg: i32, attrs: &[(u16, &[u8])], x: &str, each: &mut dyn FnMut(Vec<netlink::DumpMsg>)| {
            let interrupted =
                netlink::dump_each(msg as u16, nfproto, attrs, "GETCHAIN/GETRULE (the rollback's tables)", each)
                    .map_err(|source| ReadError::Dump { what: what(x), source })?;
            if interrupted {
                return Err(ReadError::Interrupted(what(x)));
            }
            Ok(())
        };
        let mut now = TableNow::default();
        dump(libc::NFT_MSG_GETCHAIN, &[(1, tname.as_bytes())], "the chains", &mut |msgs| {
            for m in msgs {
                if let Some(c) = decode_chain(&m.payload).filter(|c| c.table == table) {
                    now.chains.push((c.name, None));
                }
            }
        })?;
        let add = |now: &mut TableNow, msgs: Vec<netlink::DumpMsg>, keep: &dyn Fn(&str, &Option<String>) -> bool| {
            for r in
                msgs.iter().filter(|m| m.ty == libc::NFT_MSG_NEWRULE as u16).filter_map(|m| decode_rule(&m.payload))
            {
                if r.table != table {
                    continue;
                }
                let line = save_line(&r, v6);
                if !keep(&r.chain, &line) {
                    continue;
                }
                if let Some((_, rules)) = now.chains.iter_mut().find(|(c, _)| *c == r.chain) {
                    rules.get_or_insert_with(Vec::new).push((r.handle, line));
                }
            }
        };
        if whole {
            dump(libc::NFT_MSG_GETRULE, &[(1, tname.as_bytes())], "the rules", &mut |msgs| {
                add(&mut now, msgs, &|_, _| true)
            })?;
        }
        for (chain, lines) in &chains {
            if whole || !now.chains.iter().any(|(c, _)| c == chain) {
                continue;
            }
            if let Some(rules) = hinted(v6, &table, chain, lines, hints)? {
                if let Some((_, r)) = now.chains.iter_mut().find(|(c, _)| c == chain) {
                    *r = Some(rules);
                }
                continue;
            }
            let cname = format!("{chain}\0");
            let wanted_line = |_: &str, l: &Option<String>| l.as_ref().is_some_and(|l| lines.contains(l));
            dump(
                libc::NFT_MSG_GETRULE,
                &[(1, tname.as_bytes()), (2, cname.as_bytes())],
                &format!("the rules of chain {chain}"),
                &mut |msgs| add(&mut now, msgs, &wanted_line),
            )?;
        }
        // Every chain whose rules were dumped has a list, empty or not.
        for (c, rules) in &mut now.chains {
            if whole || chains.contains_key(c) {
                rules.get_or_insert_with(Vec::new);
            }
        }
        out.insert((v6, table), now);
    }
    Ok(out)
}

/// The rules of `chain` whose save lines are `lines`, read back by the handles `hints` give for
/// them (one GETRULE each, no dump): `None` unless each line has a hint and each hinted rule
/// still exists and prints as its line.
fn hinted(
    v6: bool,
    table: &str,
    chain: &str,
    lines: &[String],
    hints: &[IptNftHandle],
) -> Result<Option<Vec<RuleNow>>, ReadError> {
    let fam = nft_family(v6);
    let mine: Vec<&IptNftHandle> = hints
        .iter()
        .filter(|h| h.v6 == v6 && h.table == table && h.chain == chain && lines.contains(&h.line))
        .collect();
    if lines.iter().any(|l| lines.iter().filter(|x| *x == l).count() > mine.iter().filter(|h| h.line == *l).count()) {
        return Ok(None);
    }
    let mut out = Vec::new();
    for h in mine {
        let payload = netlink::get_rule_payload(fam, table, chain, h.handle).map_err(|source| ReadError::Dump {
            what: format!("rule {} of chain {fam} {table} {chain}", h.handle),
            source,
        })?;
        let line = payload.as_deref().and_then(decode_rule).and_then(|r| save_line(&r, v6));
        if line.as_deref() != Some(h.line.as_str()) {
            return Ok(None);
        }
        out.push((h.handle, line));
    }
    Ok(Some(out))
}
