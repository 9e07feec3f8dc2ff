//! iptables documents of a policy transaction, built from saves (pure): the filter insertions
//! with the previous transaction's rules removed in the same table commit, ctguard's raw chains
//! (content, removal, restore), the deletion of a transaction's tagged rules and the put-back
//! of removed ones at their old place.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::live::fw::IptVariant;
use crate::live::iptables_save::{RuleView, SaveDump, SaveRule};
use crate::render::iptables::{spec_to_line, CHAIN_OUT, CHAIN_PRE, RAW_TABLE};

/// An iptables variant, as the undo record stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// iptables-nft.
    Nft,
    /// iptables-legacy.
    Legacy,
}

impl From<IptVariant> for Variant {
    fn from(v: IptVariant) -> Variant {
        match v {
            IptVariant::Nft => Variant::Nft,
            IptVariant::Legacy => Variant::Legacy,
        }
    }
}

impl From<Variant> for IptVariant {
    fn from(v: Variant) -> IptVariant {
        match v {
            Variant::Nft => IptVariant::Nft,
            Variant::Legacy => IptVariant::Legacy,
        }
    }
}

/// A save with `#` lines dropped and every `[pkts:bytes]` counter zeroed: two saves of an
/// unchanged ruleset compare equal.
pub fn normalize_save(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        out.push_str(&zero_counters(line));
        out.push('\n');
    }
    out
}

/// Replaces each `[N:M]` (digits) by `[0:0]`.
pub fn zero_counters(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        match after.find(']') {
            Some(j) if is_counter_pair(&after[..j]) => {
                out.push_str("[0:0]");
                rest = &after[j + 1..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_counter_pair(s: &str) -> bool {
    matches!(s.split_once(':'), Some((a, b)) if !a.is_empty() && !b.is_empty()
        && a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit()))
}

/// The comment of a saved rule.
pub fn comment(rule: &SaveRule) -> Option<String> {
    RuleView::from_args(&rule.args).comment
}

/// Rules of `table`/`chain` whose comment is `tag`, in order, with their 1-based index.
pub fn tagged<'a>(dump: &'a SaveDump, table: &str, chain: &str, tag: &str) -> Vec<(usize, &'a SaveRule)> {
    dump.chain(table, chain)
        .map(|c| {
            c.rules
                .iter()
                .enumerate()
                .filter(|(_, r)| comment(r).as_deref() == Some(tag))
                .map(|(i, r)| (i + 1, r))
                .collect()
        })
        .unwrap_or_default()
}

/// `-D CHAIN ARGS…` for a saved rule (the save's quoting is restore's).
pub fn delete_line(rule: &SaveRule) -> String {
    match rule.line.strip_prefix("-A ") {
        Some(rest) => format!("-D {rest}"),
        None => format!("-D {} {}", rule.chain, spec_to_line(&rule.args)),
    }
}

/// Merges per-table extra lines (put first, e.g. `-D` of the previous transaction's rules)
/// into restore text made of `*table … COMMIT` blocks; tables with only extra lines get a block
/// of their own.
pub fn merge_first(doc: &str, extra: &[(String, Vec<String>)]) -> String {
    let mut out = String::new();
    let mut done: Vec<&str> = Vec::new();
    for line in doc.lines() {
        out.push_str(line);
        out.push('\n');
        if let Some(t) = line.strip_prefix('*') {
            for (table, lines) in extra.iter().filter(|(x, _)| x == t) {
                done.push(table);
                for l in lines {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
    }
    for (table, lines) in extra {
        if done.contains(&table.as_str()) || lines.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        done.push(table);
    }
    out
}

/// ctguard's raw chains in one save, as the undo record keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawChains {
    /// Both `CTGUARD-PRE` and `CTGUARD-OUT` exist (either one counts).
    pub exist: bool,
    /// Their `-A` lines, `CTGUARD-PRE` first.
    pub lines: Vec<String>,
    /// Built-in chains holding a jump to one of them: (from, to), one per copy.
    pub jumps: Vec<(String, String)>,
}

/// Reads ctguard's raw chains from a save.
pub fn raw_chains(dump: &SaveDump) -> RawChains {
    let mut r = RawChains::default();
    for name in [CHAIN_PRE, CHAIN_OUT] {
        if let Some(c) = dump.chain(RAW_TABLE, name) {
            r.exist = true;
            r.lines.extend(c.rules.iter().map(|x| x.line.clone()));
        }
    }
    if let Some(t) = dump.table(RAW_TABLE) {
        for c in &t.chains {
            for rule in &c.rules {
                if let [j, to] = rule.args.as_slice() {
                    if (j == "-j" || j == "-g") && (to == CHAIN_PRE || to == CHAIN_OUT) {
                        r.jumps.push((c.name.clone(), to.clone()));
                    }
                }
            }
        }
    }
    r
}

/// Restore text that brings ctguard's raw chains from `now` back to `before`: the chains
/// declared (created or emptied) and refilled, or — when there were none — every jump to them
/// deleted and the chains removed. `None` when there is nothing to do.
pub fn raw_restore(before: &RawChains, now: &RawChains, jumps_added: &[(String, String)]) -> Option<String> {
    let mut s = format!("*{RAW_TABLE}\n");
    if before.exist {
        let jumps_back = before.jumps.iter().all(|j| now.jumps.contains(j));
        if now.exist && now.lines == before.lines && jumps_back && jumps_added.iter().all(|j| !now.jumps.contains(j)) {
            return None;
        }
        let _ = writeln!(s, ":{CHAIN_PRE} - [0:0]\n:{CHAIN_OUT} - [0:0]");
        for l in &before.lines {
            s.push_str(l);
            s.push('\n');
        }
        // Jumps this transaction added (one copy each, where still present).
        let mut left = now.jumps.clone();
        for j in jumps_added {
            if let Some(i) = left.iter().position(|x| x == j) {
                left.remove(i);
                let _ = writeln!(s, "-D {} -j {}", j.0, j.1);
            }
        }
        // Jumps that were there before and are gone now (a transaction that removed ctguard:
        // `apply --remove`), appended again as ctguard adds them.
        for j in &before.jumps {
            if let Some(i) = left.iter().position(|x| x == j) {
                left.remove(i);
            } else {
                let _ = writeln!(s, "-A {} -j {}", j.0, j.1);
            }
        }
    } else {
        if !now.exist {
            return None;
        }
        let _ = writeln!(s, ":{CHAIN_PRE} - [0:0]\n:{CHAIN_OUT} - [0:0]");
        for (from, to) in &now.jumps {
            let _ = writeln!(s, "-D {from} -j {to}");
        }
        let _ = writeln!(s, "-X {CHAIN_PRE}\n-X {CHAIN_OUT}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// The lines of one chain after deleting some of its rules: the simulated chain that put-back
/// inserts are positioned against.
pub struct ChainSim {
    lines: Vec<String>,
}

impl ChainSim {
    /// The chain `table`/`chain` of `dump`, without the rules `drop` says to drop.
    pub fn new(dump: &SaveDump, table: &str, chain: &str, drop: impl Fn(&SaveRule) -> bool) -> ChainSim {
        let lines = dump
            .chain(table, chain)
            .map(|c| c.rules.iter().filter(|r| !drop(r)).map(|r| r.line.clone()).collect())
            .unwrap_or_default();
        ChainSim { lines }
    }

    /// True when the chain holds exactly this `-A` line.
    pub fn contains(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    /// Inserts `line` before the first rule equal to `anchor` (else at `index`, clamped; else
    /// appended) and returns the restore command doing the same.
    pub fn insert(&mut self, chain: &str, line: &str, anchor: Option<&str>, index: usize) -> String {
        let spec = line.strip_prefix("-A ").and_then(|r| r.strip_prefix(chain)).map(str::trim_start).unwrap_or(line);
        let pos = match anchor {
            Some(a) => self.lines.iter().position(|l| l == a).or(Some(index.saturating_sub(1).min(self.lines.len()))),
            None => None,
        };
        match pos {
            Some(p) => {
                self.lines.insert(p, line.to_string());
                format!("-I {chain} {} {spec}", p + 1)
            }
            None => {
                self.lines.push(line.to_string());
                format!("-A {chain} {spec}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::iptables_save::parse;

    #[test]
    fn counters_and_comments_are_normalized() {
        let a = "# Generated by x on Mon\n*filter\n:INPUT DROP [12:3400]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let b = "# Generated by x on Tue\n*filter\n:INPUT DROP [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        assert_eq!(normalize_save(a), normalize_save(b));
        assert_eq!(zero_counters("-A X -m comment --comment \"[a:b]\""), "-A X -m comment --comment \"[a:b]\"");
    }

    #[test]
    fn merge_puts_extra_lines_first_and_adds_tables() {
        let doc = "*filter\n-I INPUT 3 -j ACCEPT\nCOMMIT\n";
        let m = merge_first(
            doc,
            &[("filter".into(), vec!["-D INPUT -j X".into()]), ("raw".into(), vec!["-D OUTPUT -j Y".into()])],
        );
        assert_eq!(m, "*filter\n-D INPUT -j X\n-I INPUT 3 -j ACCEPT\nCOMMIT\n*raw\n-D OUTPUT -j Y\nCOMMIT\n");
    }

    #[test]
    fn raw_restore_cases() {
        let d = parse("*raw\n:PREROUTING ACCEPT [0:0]\n:CTGUARD-PRE - [0:0]\n:CTGUARD-OUT - [0:0]\n-A PREROUTING -j CTGUARD-PRE\n-A CTGUARD-PRE -p udp -j CT --notrack\nCOMMIT\n").expect("parses");
        let now = raw_chains(&d);
        assert!(now.exist);
        assert_eq!(now.jumps, vec![("PREROUTING".to_string(), "CTGUARD-PRE".to_string())]);
        let gone = raw_restore(&RawChains::default(), &now, &[]).expect("something to do");
        assert!(gone.contains("-D PREROUTING -j CTGUARD-PRE\n-X CTGUARD-PRE\n-X CTGUARD-OUT\n"), "{gone}");
        assert!(raw_restore(&RawChains::default(), &RawChains::default(), &[]).is_none());
        assert!(raw_restore(&now, &now, &[]).is_none());
    }

    #[test]
    fn put_back_positions() {
        let d = parse("*filter\n:INPUT DROP [0:0]\n-A INPUT -m conntrack --ctstate ESTABLISHED -j ACCEPT\n-A INPUT -m comment --comment ctguard:b -j ACCEPT\n-A INPUT -p udp -j DROP\nCOMMIT\n").expect("parses");
        let mut sim = ChainSim::new(&d, "filter", "INPUT", |r| comment(r).as_deref() == Some("ctguard:b"));
        let a1 = "-A INPUT -m comment --comment ctguard:a -p udp -j ACCEPT";
        let cmd = sim.insert("INPUT", a1, Some("-A INPUT -p udp -j DROP"), 9);
        assert_eq!(cmd, "-I INPUT 2 -m comment --comment ctguard:a -p udp -j ACCEPT");
        assert!(sim.contains(a1));
        let cmd = sim.insert("INPUT", "-A INPUT -j LOG", None, 1);
        assert_eq!(cmd, "-A INPUT -j LOG");
    }
}
