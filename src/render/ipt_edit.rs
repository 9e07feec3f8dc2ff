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

/// What a scratch namespace must hold for the kernel's verdict on `doc` (an iptables-restore
/// document with `--noflush`) as if loaded on top of `live` (a save of the target), without
/// loading the whole save (the check took two restores of a 10k-rule dump per apply): per
/// table `doc` touches, every chain of `live` declared with its policy, ctguard's chains with
/// their rules, the rules that jump to them, and each rule a `-D` line of `doc` deletes; and
/// `doc` with each `-I CHAIN N` into a chain the base holds only in part renumbered to `-I CHAIN
/// 1` — only when `N` is a valid place in the live chain (at most one past its last rule), so
/// an insert that fails live fails here too. Returns (base, document).
///
/// Exactness: the verdict is the same as on the whole save for what these documents do
/// (declare, flush and delete ctguard's chains, add and delete rules by their exact text,
/// insert at a place). When a `-D` line's rule is not in `live` as written, the whole live
/// table goes into the base (the previous behaviour). Pure.
pub fn scratch_base(live: &str, doc: &str) -> (String, String) {
    struct Table<'a> {
        name: &'a str,
        decls: Vec<&'a str>,
        rules: Vec<&'a str>,
    }
    let mut tables: Vec<Table<'_>> = Vec::new();
    for line in live.lines().map(str::trim_end).filter(|l| !l.starts_with('#') && !l.is_empty()) {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table { name: name.trim(), decls: Vec::new(), rules: Vec::new() });
        } else if let Some(t) = tables.last_mut() {
            if line.starts_with(':') {
                t.decls.push(line);
            } else if line.starts_with("-A ") {
                t.rules.push(line);
            }
        }
    }
    let chain_of = |rule: &str| rule.split_whitespace().nth(1).unwrap_or_default().to_string();
    let ours = |rule: &str| {
        let mut w = rule.split_whitespace();
        let chain = w.nth(1).unwrap_or_default();
        let mut jumps_ours = false;
        while let Some(x) = w.next() {
            if (x == "-j" || x == "-g") && w.next().is_some_and(|t| t.starts_with("CTGUARD")) {
                jumps_ours = true;
            }
        }
        chain.starts_with("CTGUARD") || jumps_ours
    };
    let mut base = String::new();
    // Chains the base holds only in part, with the number of rules the live chain has.
    let mut partial: Vec<(String, String, usize)> = Vec::new();
    let mut table = String::new();
    let mut done: Vec<String> = Vec::new();
    for line in doc.lines() {
        let Some(name) = line.strip_prefix('*').map(str::trim) else { continue };
        table = name.to_string();
        if done.contains(&table) {
            continue;
        }
        done.push(table.clone());
        let Some(t) = tables.iter().find(|t| t.name == name) else { continue };
        // Rules the document itself adds (its `-D` of them needs nothing from the live table:
        // a rollback document checked after the apply's, in one run).
        let added: Vec<String> = table_lines(doc, name).filter_map(added_line).collect();
        let deletes: Vec<String> = table_lines(doc, name)
            .filter_map(|l| l.strip_prefix("-D ").map(|r| format!("-A {r}")))
            .filter(|l| l.split_whitespace().nth(2).is_some_and(|w| w.starts_with('-')))
            .filter(|l| !added.contains(l))
            .collect();
        let whole = deletes.iter().any(|d| !t.rules.contains(&d.as_str()));
        let _ = writeln!(base, "*{name}");
        for d in &t.decls {
            let _ = writeln!(base, "{}", zero_counters(d));
        }
        let mut kept = 0usize;
        for r in &t.rules {
            if whole || ours(r) || deletes.iter().any(|d| d == r) {
                let _ = writeln!(base, "{r}");
                kept += 1;
            }
        }
        base.push_str("COMMIT\n");
        if kept < t.rules.len() {
            let mut counts: Vec<(String, usize)> = Vec::new();
            for r in &t.rules {
                let c = chain_of(r);
                match counts.iter_mut().find(|(x, _)| *x == c) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((c, 1)),
                }
            }
            for (c, n) in counts {
                if !c.starts_with("CTGUARD") {
                    partial.push((name.to_string(), c, n));
                }
            }
        }
    }
    let _ = table;
    // The document, with inserts into partly held chains renumbered where valid live.
    let mut out = String::new();
    let mut cur = String::new();
    for line in doc.lines() {
        if let Some(name) = line.strip_prefix('*') {
            cur = name.trim().to_string();
        }
        let mut w = line.split_whitespace();
        let renumbered = match (w.next(), w.next(), w.next().and_then(|n| n.parse::<usize>().ok())) {
            (Some("-I"), Some(chain), Some(n)) if n > 1 => {
                let live_len = partial.iter().find(|(t, c, _)| *t == cur && c == chain).map(|(_, _, len)| *len);
                match live_len {
                    Some(len) if n <= len + 1 => Some(format!("-I {chain} 1 {}", w.collect::<Vec<_>>().join(" "))),
                    _ => None,
                }
            }
            _ => None,
        };
        out.push_str(renumbered.as_deref().unwrap_or(line));
        out.push('\n');
    }
    (base, out)
}

/// `base` (a [`scratch_base`]) without its declarations of built-in chains (`:INPUT DROP
/// [0:0]`; a user chain's policy is `-`, and its declaration stays). For an iptables-nft
/// scratch check: iptables-nft creates a table's built-in chains when a rule first needs them,
/// while a declared policy is an update of the chain that leaves nf_tables something to destroy
/// after the commit, and every later commit's socket close waits for that (an RCU grace
/// period: 11–15 ms per table here). A chain's policy never changes the kernel's verdict on a
/// rule. Pure.
pub fn without_builtin_policies(base: &str) -> String {
    let mut out = String::with_capacity(base.len());
    for line in base.lines() {
        let builtin =
            line.strip_prefix(':').and_then(|d| d.split_whitespace().nth(1)).is_some_and(|policy| policy != "-");
        if !builtin {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The part of a save a rollback's documents are built from when nothing is put back: every
/// table's declarations, the whole `raw` table (ctguard's chains and the jumps to them) and
/// the rules whose line contains `tag` (a superset of those carrying it as their comment).
/// Parsing it instead of the whole save spares a 100k-rule chain's parse. Pure.
pub fn reduce_save(save: &str, tag: &str) -> String {
    let mut out = String::new();
    let mut table = "";
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
        }
        let keep = !line.starts_with("-A ") || table == RAW_TABLE || line.contains(tag);
        if keep && !line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The `-A` line a save prints for the rule an `-A`/`-I` line of a document adds (as
/// [`crate::render::ipt_sim::save_line`] models it; else the line with `-I CHAIN [N]` written
/// as `-A CHAIN`). Pure.
fn added_line(line: &str) -> Option<String> {
    let words = crate::live::iptables_save::tokenize(line).ok()?;
    let (cmd, chain) = (words.first()?.as_str(), words.get(1)?);
    let spec = match cmd {
        "-A" => &words[2..],
        "-I" if words.get(2).is_some_and(|n| n.parse::<usize>().is_ok()) => &words[3..],
        "-I" => &words[2..],
        _ => return None,
    };
    crate::render::ipt_sim::save_line(chain, spec)
        .or_else(|| Some(format!("-A {chain} {}", crate::render::iptables::spec_to_line(spec))))
}

/// Table `name`'s block of a save (`*name` … `COMMIT`), or nothing when it has none. Pure.
pub fn table_block(save: &str, name: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            inside = t.trim() == name;
        }
        if inside {
            out.push_str(l);
            out.push('\n');
            if l.trim() == "COMMIT" {
                inside = false;
            }
        }
    }
    out
}

/// The lines of table `name`'s sections in an iptables-restore document.
fn table_lines<'a>(doc: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let mut inside = false;
    doc.lines().filter(move |l| {
        if let Some(t) = l.strip_prefix('*') {
            inside = t.trim() == name;
            return false;
        }
        if *l == "COMMIT" {
            inside = false;
            return false;
        }
        inside
    })
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

    const LIVE: &str = "# Generated by iptables-save\n*filter\n:INPUT DROP [12:345]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:host_in - [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -s 100.64.0.1/32 -j DROP\n-A INPUT -s 100.64.0.2/32 -j DROP\n-A INPUT -j host_in\n-A INPUT -p udp -m udp --dport 53 -m comment --comment \"ctguard:old\" -j ACCEPT\n-A host_in -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CTGUARD-PRE - [0:0]\n-A PREROUTING -j CTGUARD-PRE\n-A CTGUARD-PRE -p udp -m udp --dport 53 -j CT --notrack\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j REDIRECT --to-ports 8080\nCOMMIT\n";

    #[test]
    fn an_iptables_nft_scratch_base_declares_user_chains_only() {
        let base = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CTGUARD-PRE - [0:0]\nCOMMIT\n*filter\n:INPUT DROP [0:0]\n:f2b-sshd - [0:0]\n-A INPUT -j f2b-sshd\nCOMMIT\n";
        assert_eq!(
            without_builtin_policies(base),
            "*raw\n:CTGUARD-PRE - [0:0]\nCOMMIT\n*filter\n:f2b-sshd - [0:0]\n-A INPUT -j f2b-sshd\nCOMMIT\n"
        );
    }

    /// Regression (issue 16): the scratch check loaded the whole live save under a document of
    /// a few lines. The base holds the chains, ctguard's rules and jumps, the rules deleted.
    #[test]
    fn scratch_base_holds_what_the_document_refers_to() {
        let doc = "*filter\n-D INPUT -p udp -m udp --dport 53 -m comment --comment \"ctguard:old\" -j ACCEPT\n-I INPUT 4 -p udp --dport 53 -m comment --comment ctguard:new -j ACCEPT\n-I host_in 1 -j ACCEPT\nCOMMIT\n*raw\n-D PREROUTING -j CTGUARD-PRE\n-F CTGUARD-PRE\n-X CTGUARD-PRE\nCOMMIT\n";
        let (base, out) = scratch_base(LIVE, doc);
        assert_eq!(
            base,
            "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:host_in - [0:0]\n-A INPUT -p udp -m udp --dport 53 -m comment --comment \"ctguard:old\" -j ACCEPT\nCOMMIT\n*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CTGUARD-PRE - [0:0]\n-A PREROUTING -j CTGUARD-PRE\n-A CTGUARD-PRE -p udp -m udp --dport 53 -j CT --notrack\nCOMMIT\n"
        );
        // INPUT has 5 rules live, 1 in the base: its insert at 4 becomes 1; host_in's at 1 stays.
        assert!(out.contains("\n-I INPUT 1 -p udp --dport 53 -m comment --comment ctguard:new -j ACCEPT\n"), "{out}");
        assert!(out.contains("\n-I host_in 1 -j ACCEPT\n"), "{out}");
        assert!(!base.contains("*nat"), "a table the document does not touch stays out");
    }

    /// An insert past the end of the live chain stays as it is, so it fails in the scratch
    /// namespace as it would live; a `-D` of a rule not in the save as written loads the whole
    /// live table (the previous behaviour).
    #[test]
    fn scratch_base_keeps_what_would_fail_live_failing() {
        let (_, out) = scratch_base(LIVE, "*filter\n-I INPUT 7 -j ACCEPT\nCOMMIT\n");
        assert!(out.contains("-I INPUT 7 -j ACCEPT"), "{out}");
        let (_, out) = scratch_base(LIVE, "*filter\n-I INPUT 6 -j ACCEPT\nCOMMIT\n");
        assert!(out.contains("-I INPUT 1 -j ACCEPT"), "{out}");
        let (base, _) = scratch_base(LIVE, "*filter\n-D INPUT -p udp --dport 53 -j ACCEPT\nCOMMIT\n");
        assert!(base.contains("-A INPUT -s 100.64.0.2/32 -j DROP\n-A INPUT -j host_in\n"), "{base}");
    }

    #[test]
    fn a_reduced_save_keeps_the_raw_table_declarations_and_the_tagged_rules() {
        let r = reduce_save(LIVE, "ctguard:old");
        assert_eq!(
            r,
            "*filter\n:INPUT DROP [12:345]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:host_in - [0:0]\n-A INPUT -p udp -m udp --dport 53 -m comment --comment \"ctguard:old\" -j ACCEPT\nCOMMIT\n*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CTGUARD-PRE - [0:0]\n-A PREROUTING -j CTGUARD-PRE\n-A CTGUARD-PRE -p udp -m udp --dport 53 -j CT --notrack\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"
        );
        let full = parse(LIVE).expect("parses");
        let reduced = parse(&r).expect("parses");
        assert_eq!(raw_chains(&full), raw_chains(&reduced));
        let lines = |d: &SaveDump| {
            tagged(d, "filter", "INPUT", "ctguard:old").iter().map(|(_, r)| r.line.clone()).collect::<Vec<_>>()
        };
        assert_eq!(lines(&full), lines(&reduced));
    }

    /// A rollback document checked in the same run as the apply's: its `-D` of a rule the
    /// apply's `-I` adds needs no live rule (the base stays small).
    #[test]
    fn scratch_base_does_not_load_the_table_for_a_delete_of_what_the_document_adds() {
        let doc = "*filter\n-I INPUT 4 -p udp -m multiport --dports 53 -m comment --comment ctguard:new -j ACCEPT\nCOMMIT\n*filter\n-D INPUT -p udp -m multiport --dports 53 -m comment --comment \"ctguard:new\" -j ACCEPT\nCOMMIT\n";
        let (base, _) = scratch_base(LIVE, doc);
        assert!(!base.contains("100.64.0.2"), "{base}");
        let (base, _) =
            scratch_base(LIVE, "*filter\n-D INPUT -p udp -m comment --comment ctguard:other -j ACCEPT\nCOMMIT\n");
        assert!(base.contains("100.64.0.2"), "a delete of a rule nobody adds still loads the table: {base}");
    }

    #[test]
    fn table_block_is_that_table_only() {
        assert_eq!(
            table_block(LIVE, "raw"),
            "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CTGUARD-PRE - [0:0]\n-A PREROUTING -j CTGUARD-PRE\n-A CTGUARD-PRE -p udp -m udp --dport 53 -j CT --notrack\nCOMMIT\n"
        );
        assert_eq!(table_block(LIVE, "mangle"), "");
    }
}
