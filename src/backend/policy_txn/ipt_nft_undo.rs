//! The rollback of an iptables-nft policy transaction that only takes away, as **one**
//! nf_tables batch carrying the generation id of its read, instead of one
//! `iptables-nft-restore --noflush` per family and an `nft -f` for the raw table iptables-nft
//! created.
//!
//! The documents stay what they are (built from a fresh save, DESIGN §1: `-D` the jump, `-X`
//! the chain, `-D` each tagged rule by its exact spec); this module only carries them out
//! another way. Each `-D` names a rule by its save line: the rule is found by printing the
//! chain's rules as `iptables-nft-save` prints them (`ipt_nft_rule::save_line`) and deleted by handle; each
//! `-X` (after its `:CHAIN - [0:0]`) is a DELCHAIN, which takes the chain's rules with it.
//! Deleting writes nothing the iptables tools could not read back. A document with any other
//! line, a rule the printer cannot print, a rule not found: `None`, and the caller runs the
//! restores as before. Pure: what the kernel holds is read by `ipt_nft_now`.
//!
//! What it gains: both families, raw and filter, in one kernel transaction (no window between
//! tables or families, nothing half done when the kernel refuses); another writer's commit
//! since the read refuses the batch (`ERESTART`) and the rollback reads again; no process and
//! no rule cache per family; and the agent's kept socket does not wait, as each restore's exit
//! does, for the RCU grace period of nf_tables' deferred destruction.

use std::collections::BTreeMap;

use super::{IptDoc, RawBefore, Variant};
use crate::render::iptables::RAW_TABLE;
use crate::render::nft_batch::{BatchBuilder, BatchError};

/// One deletion a rollback document asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Take {
    /// `-D CHAIN …`: the first rule of `chain` whose save line is `line` (`-A CHAIN …`).
    Rule {
        /// The chain.
        chain: String,
        /// The rule's save line.
        line: String,
    },
    /// `-X CHAIN` (declared `:CHAIN - [0:0]` or flushed first): the chain with its rules,
    /// where it exists (declaring a missing chain and removing it is no change).
    Chain {
        /// The chain.
        chain: String,
    },
}

/// The deletions of one `*TABLE … COMMIT` block, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableTakes {
    /// IPv6 (`ip6` family) when true.
    pub v6: bool,
    /// The table (`raw`, `filter`).
    pub table: String,
    /// Its deletions.
    pub takes: Vec<Take>,
}

/// `docs` read as deletions only: each block made of `*TABLE`, `:CHAIN - [0:0]` and `-F CHAIN`
/// of chains the same block then removes with `-X CHAIN`, `-D CHAIN …`, `-X CHAIN`, `COMMIT`.
/// `None` when a document is not iptables-nft's or holds anything else (a chain declared and
/// kept is emptied, not deleted: not expressible here). Pure.
pub(super) fn takes_of(docs: &[&IptDoc]) -> Option<Vec<TableTakes>> {
    let mut out = Vec::new();
    for doc in docs {
        if doc.variant != Variant::Nft {
            return None;
        }
        let mut open: Option<(TableTakes, Vec<String>)> = None;
        for line in doc.text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
            if let Some(table) = line.strip_prefix('*') {
                if open.is_some() {
                    return None;
                }
                open = Some((TableTakes { v6: doc.v6, table: table.to_string(), takes: Vec::new() }, Vec::new()));
                continue;
            }
            let (block, emptied) = open.as_mut()?;
            if line == "COMMIT" {
                let removed = |c: &String| block.takes.iter().any(|t| matches!(t, Take::Chain { chain } if chain == c));
                if !emptied.iter().all(removed) {
                    return None;
                }
                out.push(open.take()?.0);
            } else if let Some(decl) = line.strip_prefix(':') {
                match decl.split_whitespace().collect::<Vec<_>>().as_slice() {
                    [chain, "-", _counters] => emptied.push((*chain).to_string()),
                    _ => return None,
                }
            } else if let Some(chain) = one_arg(line, "-F ") {
                emptied.push(chain.to_string());
            } else if let Some(chain) = one_arg(line, "-X ") {
                block.takes.push(Take::Chain { chain: chain.to_string() });
            } else if let Some(rest) = line.strip_prefix("-D ") {
                let chain = rest.split_whitespace().next()?;
                if rest.len() == chain.len() {
                    return None;
                }
                block.takes.push(Take::Rule { chain: chain.to_string(), line: format!("-A {rest}") });
            } else {
                return None;
            }
        }
        if open.is_some() {
            return None;
        }
    }
    Some(out)
}

/// The chain of `PREFIX CHAIN` when the line is exactly that.
fn one_arg<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(prefix)?;
    (!rest.is_empty() && !rest.contains(char::is_whitespace)).then_some(rest)
}

/// One nf_tables deletion, resolved against the objects the kernel holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Delete {
    /// DELRULE by handle.
    Rule { v6: bool, table: String, chain: String, handle: u64, line: String },
    /// DELCHAIN (with its rules).
    Chain { v6: bool, table: String, chain: String },
    /// DELTABLE (with everything in it).
    Table { v6: bool, table: String },
}

/// A rule as read: its handle and its save line (`None` when the printer cannot print it).
pub(super) type RuleNow = (u64, Option<String>);

/// What the kernel holds of one table the deletions touch: its chains in order; the rules of
/// the chains that were read, in order, each with its handle and its save line (`None` when the
/// printer cannot print it); a chain whose rules were not read has `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct TableNow {
    /// (chain, its rules when read).
    pub chains: Vec<(String, Option<Vec<RuleNow>>)>,
}

/// The raw table's clean-up of one family: iptables-nft creates `table ip|ip6 raw` and its
/// base chains on demand; those that did not exist before and are empty after the deletions
/// go too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawCleanup {
    /// IPv6 when true.
    pub v6: bool,
    /// nft had the table before the transaction.
    pub table_existed: bool,
    /// Its chains before the transaction.
    pub chains_before: Vec<String>,
}

impl RawCleanup {
    /// The clean-ups of `raw`'s iptables-nft entries.
    pub(super) fn of(raw: &[RawBefore]) -> Vec<RawCleanup> {
        raw.iter()
            .filter(|r| r.variant == Variant::Nft)
            .map(|r| RawCleanup {
                v6: r.v6,
                table_existed: r.nft_table_existed,
                chains_before: r.nft_chains_before.clone(),
            })
            .collect()
    }
}

/// The deletions of `takes` against `now` (keyed by IPv6 and table), then the raw clean-ups:
/// a table that did not exist before and holds no rule after the deletions is deleted; else
/// each chain of it that did not exist before and holds no rule after them. `None` when a rule
/// to delete is not there as its save line says (not printable, or not found): the restores
/// decide then. Pure.
pub(super) fn resolve(
    takes: &[TableTakes],
    now: &BTreeMap<(bool, String), TableNow>,
    cleanups: &[RawCleanup],
) -> Option<Vec<Delete>> {
    let mut out: Vec<Delete> = Vec::new();
    for block in takes {
        let table = now.get(&(block.v6, block.table.clone()));
        for take in &block.takes {
            match take {
                Take::Rule { chain, line } => {
                    let rules = table?.chains.iter().find(|(c, _)| c == chain)?.1.as_ref()?;
                    // Handles are unique per table only.
                    let taken = |h: u64| {
                        out.iter().any(|d| {
                            matches!(d, Delete::Rule { v6, table: t, handle, .. } if *v6 == block.v6 && *t == block.table && *handle == h)
                        })
                    };
                    let (handle, _) = rules.iter().find(|(h, l)| l.as_deref() == Some(line.as_str()) && !taken(*h))?;
                    out.push(Delete::Rule {
                        v6: block.v6,
                        table: block.table.clone(),
                        chain: chain.clone(),
                        handle: *handle,
                        line: line.clone(),
                    });
                }
                Take::Chain { chain } => {
                    let exists = table.is_some_and(|t| t.chains.iter().any(|(c, _)| c == chain));
                    let listed = out.iter().any(
                        |d| matches!(d, Delete::Chain { v6, table: t, chain: c } if *v6 == block.v6 && *t == block.table && c == chain),
                    );
                    if exists && !listed {
                        out.push(Delete::Chain { v6: block.v6, table: block.table.clone(), chain: chain.clone() });
                    }
                }
            }
        }
    }
    for c in cleanups {
        let Some(table) = now.get(&(c.v6, RAW_TABLE.to_string())) else { continue };
        let gone_chain = |name: &str| {
            out.iter().any(|d| matches!(d, Delete::Chain { v6, table: t, chain } if *v6 == c.v6 && t == RAW_TABLE && chain == name))
        };
        let gone_rule = |h: u64| {
            out.iter().any(|d| matches!(d, Delete::Rule { v6, table: t, handle, .. } if *v6 == c.v6 && t == RAW_TABLE && *handle == h))
        };
        // Chains left, and whether each holds a rule after the deletions (unread: assume so).
        let left: Vec<(&str, bool)> = table
            .chains
            .iter()
            .filter(|(name, _)| !gone_chain(name))
            .map(|(name, rules)| (name.as_str(), rules.as_ref().is_none_or(|r| r.iter().any(|(h, _)| !gone_rule(*h)))))
            .collect();
        if !c.table_existed {
            if left.iter().all(|(_, holds)| !holds) {
                out.push(Delete::Table { v6: c.v6, table: RAW_TABLE.to_string() });
            }
            continue;
        }
        for (name, holds) in left {
            if !holds && !c.chains_before.iter().any(|b| b == name) {
                out.push(Delete::Chain { v6: c.v6, table: RAW_TABLE.to_string(), chain: name.to_string() });
            }
        }
    }
    Some(out)
}

/// The deletions as one batch carrying `genid`; `None` when there is nothing to delete. Pure.
pub(super) fn batch(deletes: &[Delete], genid: u32) -> Result<Option<BatchBuilder>, BatchError> {
    let mut b = BatchBuilder::new(Some(genid));
    for d in deletes {
        match d {
            Delete::Rule { v6, table, chain, handle, line } => {
                let fam = nft_family(*v6);
                b.delete_rule(
                    fam,
                    table,
                    chain,
                    *handle,
                    format!("delete rule {fam} {table} {chain} handle {handle} ({line})"),
                )?
            }
            Delete::Chain { v6, table, chain } => b.delete_chain_in(nft_family(*v6), table, chain)?,
            Delete::Table { v6, table } => b.delete_table_in(nft_family(*v6), table)?,
        }
    }
    Ok((!b.is_empty()).then_some(b))
}

pub(super) fn nft_family(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(v6: bool, text: &str) -> IptDoc {
        IptDoc { variant: Variant::Nft, v6, text: text.to_string() }
    }

    const RAW_DOC: &str = "*raw\n:CTGUARD-PRE - [0:0]\n:CTGUARD-OUT - [0:0]\n-D PREROUTING -j CTGUARD-PRE\n-D OUTPUT -j CTGUARD-OUT\n-X CTGUARD-PRE\n-X CTGUARD-OUT\nCOMMIT\n";
    const ACCEPT: &str = "-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate UNTRACKED -m comment --comment \"ctguard:t1\" -j ACCEPT";

    fn rule(chain: &str, line: &str) -> Take {
        Take::Rule { chain: chain.into(), line: line.into() }
    }

    #[test]
    fn a_rollback_document_of_deletions_reads_as_its_deletions_in_order() {
        let filter = doc(true, &format!("*filter\n{}\nCOMMIT\n", ACCEPT.replacen("-A", "-D", 1)));
        let raw = doc(false, RAW_DOC);
        let takes = takes_of(&[&raw, &filter]).expect("deletions only");
        assert_eq!(
            takes,
            vec![
                TableTakes {
                    v6: false,
                    table: "raw".into(),
                    takes: vec![
                        rule("PREROUTING", "-A PREROUTING -j CTGUARD-PRE"),
                        rule("OUTPUT", "-A OUTPUT -j CTGUARD-OUT"),
                        Take::Chain { chain: "CTGUARD-PRE".into() },
                        Take::Chain { chain: "CTGUARD-OUT".into() },
                    ],
                },
                TableTakes { v6: true, table: "filter".into(), takes: vec![rule("INPUT", ACCEPT)] },
            ]
        );
    }

    #[test]
    fn a_document_that_adds_empties_or_is_legacy_is_left_to_the_restores() {
        for text in [
            // A chain declared (emptied) and kept: its rules put back after.
            "*raw\n:CTGUARD-PRE - [0:0]\n-A CTGUARD-PRE -p udp -j CT --notrack\nCOMMIT\n",
            "*raw\n:CTGUARD-PRE - [0:0]\nCOMMIT\n",
            "*raw\n-F CTGUARD-PRE\nCOMMIT\n",
            "*filter\n-I INPUT 3 -j ACCEPT\nCOMMIT\n",
            // A built-in chain's policy.
            "*filter\n:INPUT DROP [0:0]\nCOMMIT\n",
            // Unterminated, or a line outside a block.
            "*filter\n-D INPUT -j ACCEPT\n",
            "-D INPUT -j ACCEPT\n",
            "*filter\n-D INPUT\nCOMMIT\n",
            "*filter\n-X A B\nCOMMIT\n",
        ] {
            assert_eq!(takes_of(&[&doc(false, text)]), None, "{text}");
        }
        let legacy = IptDoc { variant: Variant::Legacy, v6: false, text: RAW_DOC.into() };
        assert_eq!(takes_of(&[&legacy]), None);
    }

    fn chain_now(name: &str, rules: &[(u64, Option<&str>)]) -> (String, Option<Vec<RuleNow>>) {
        (name.into(), Some(rules.iter().map(|(h, l)| (*h, l.map(str::to_string))).collect()))
    }

    #[test]
    fn deletions_resolve_to_the_first_matching_handles_and_a_created_raw_table_goes_whole() {
        let raw = doc(true, RAW_DOC);
        let filter = doc(
            true,
            &format!("*filter\n{}\n{}\nCOMMIT\n", ACCEPT.replacen("-A", "-D", 1), ACCEPT.replacen("-A", "-D", 1)),
        );
        let takes = takes_of(&[&raw, &filter]).expect("deletions only");
        let mut now = BTreeMap::new();
        now.insert(
            (true, "raw".to_string()),
            TableNow {
                chains: vec![
                    chain_now("PREROUTING", &[(4, Some("-A PREROUTING -j CTGUARD-PRE"))]),
                    chain_now("OUTPUT", &[(5, Some("-A OUTPUT -j CTGUARD-OUT"))]),
                    chain_now("CTGUARD-PRE", &[(6, Some("-A CTGUARD-PRE -p udp -j CT --notrack"))]),
                    chain_now("CTGUARD-OUT", &[(7, None)]),
                ],
            },
        );
        now.insert(
            (true, "filter".to_string()),
            TableNow {
                chains: vec![
                    chain_now(
                        "INPUT",
                        &[(10, Some("-A INPUT -j DROP")), (11, Some(ACCEPT)), (12, None), (13, Some(ACCEPT))],
                    ),
                    ("OUTPUT".into(), None),
                ],
            },
        );
        let created = [RawCleanup { v6: true, table_existed: false, chains_before: Vec::new() }];
        let deletes = resolve(&takes, &now, &created).expect("every rule found");
        let handles: Vec<u64> = deletes
            .iter()
            .filter_map(|d| if let Delete::Rule { handle, .. } = d { Some(*handle) } else { None })
            .collect();
        assert_eq!(handles, vec![4, 5, 11, 13], "each -D takes the first rule not yet taken");
        assert_eq!(deletes.last(), Some(&Delete::Table { v6: true, table: "raw".into() }));
        // The table existed with PREROUTING only: OUTPUT (created, now empty) goes, PREROUTING stays.
        let existed = [RawCleanup { v6: true, table_existed: true, chains_before: vec!["PREROUTING".into()] }];
        let deletes = resolve(&takes, &now, &existed).expect("every rule found");
        let chains: Vec<&str> = deletes
            .iter()
            .filter_map(|d| if let Delete::Chain { chain, .. } = d { Some(chain.as_str()) } else { None })
            .collect();
        assert_eq!(chains, vec!["CTGUARD-PRE", "CTGUARD-OUT", "OUTPUT"]);
        // A foreign rule left in the created table keeps it.
        let mut kept = now.clone();
        if let Some(t) = kept.get_mut(&(true, "raw".to_string())) {
            t.chains[0] = chain_now("PREROUTING", &[(4, Some("-A PREROUTING -j CTGUARD-PRE")), (8, None)]);
        }
        let deletes = resolve(&takes, &kept, &created).expect("every rule found");
        assert!(!deletes.iter().any(|d| matches!(d, Delete::Table { .. })), "{deletes:?}");
    }

    #[test]
    fn the_same_handle_in_both_families_is_two_rules() {
        // Handles are numbered per table: ip raw and ip6 raw both have a rule 4.
        let takes = takes_of(&[&doc(false, RAW_DOC), &doc(true, RAW_DOC)]).expect("deletions only");
        let mut now = BTreeMap::new();
        for v6 in [false, true] {
            now.insert(
                (v6, "raw".to_string()),
                TableNow {
                    chains: vec![
                        chain_now("PREROUTING", &[(4, Some("-A PREROUTING -j CTGUARD-PRE"))]),
                        chain_now("OUTPUT", &[(5, Some("-A OUTPUT -j CTGUARD-OUT"))]),
                        chain_now("CTGUARD-PRE", &[]),
                        chain_now("CTGUARD-OUT", &[]),
                    ],
                },
            );
        }
        let deletes = resolve(&takes, &now, &[]).expect("each family's jumps found");
        let rules: Vec<(bool, u64)> = deletes
            .iter()
            .filter_map(|d| if let Delete::Rule { v6, handle, .. } = d { Some((*v6, *handle)) } else { None })
            .collect();
        assert_eq!(rules, vec![(false, 4), (false, 5), (true, 4), (true, 5)]);
    }

    #[test]
    fn a_rule_not_found_as_its_save_line_leaves_the_rollback_to_the_restores() {
        let filter = doc(false, &format!("*filter\n{}\nCOMMIT\n", ACCEPT.replacen("-A", "-D", 1)));
        let takes = takes_of(&[&filter]).expect("deletions only");
        let mut now = BTreeMap::new();
        // Printed otherwise (or not at all): not found.
        now.insert(
            (false, "filter".to_string()),
            TableNow { chains: vec![chain_now("INPUT", &[(3, None), (4, Some("-A INPUT -j ACCEPT"))])] },
        );
        assert_eq!(resolve(&takes, &now, &[]), None);
        // The chain's rules not read, or the table missing.
        now.insert((false, "filter".to_string()), TableNow { chains: vec![("INPUT".into(), None)] });
        assert_eq!(resolve(&takes, &now, &[]), None);
        assert_eq!(resolve(&takes, &BTreeMap::new(), &[]), None);
    }

    #[test]
    fn a_chain_already_gone_is_skipped_and_the_batch_carries_the_generation_id() {
        let takes =
            takes_of(&[&doc(false, "*raw\n:CTGUARD-PRE - [0:0]\n-X CTGUARD-PRE\nCOMMIT\n")]).expect("deletions only");
        let mut now = BTreeMap::new();
        now.insert((false, "raw".to_string()), TableNow { chains: vec![chain_now("PREROUTING", &[])] });
        let deletes = resolve(&takes, &now, &[]).expect("nothing to find");
        assert!(deletes.is_empty(), "{deletes:?}");
        assert!(batch(&deletes, 7).expect("encodes").is_none(), "nothing to send");
        let d = [
            Delete::Rule {
                v6: false,
                table: "raw".into(),
                chain: "PREROUTING".into(),
                handle: 4,
                line: "-A PREROUTING -j CTGUARD-PRE".into(),
            },
            Delete::Chain { v6: false, table: "raw".into(), chain: "CTGUARD-PRE".into() },
            Delete::Table { v6: true, table: "raw".into() },
        ];
        let b = batch(&d, 7).expect("encodes").expect("something to send").finish();
        assert_eq!(b.genid(), Some(7));
        let what: Vec<&str> = b.messages().iter().map(|m| m.what.as_str()).collect();
        assert_eq!(
            what,
            vec![
                "batch begin (generation 7)",
                "delete rule ip raw PREROUTING handle 4 (-A PREROUTING -j CTGUARD-PRE)",
                "delete chain ip raw CTGUARD-PRE",
                "delete table ip6 raw",
                "batch end (commit)",
            ]
        );
    }
}
