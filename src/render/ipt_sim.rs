//! What `iptables-nft-save` prints after ctguard's own `iptables-nft-restore --noflush`
//! documents, computed from the save taken before them (pure).
//!
//! At 100k rules a save of an iptables-nft table takes about a second, almost all of it the
//! kernel's rule dump. When the nf_tables generation id proves that only ctguard's own
//! restores committed since a save (see `policy_txn::apply`), the save after them is that save
//! with the documents' commands carried out — which this module does, for the commands
//! ctguard's documents use, the way iptables-nft 1.8 prints the result: tables in the tool's
//! order (`mangle`, `security`, `raw`, `filter`, `nat`), built-in chains first in the order
//! the save had them, user chains by name, then every chain's rules; a new table with all its
//! built-in chains (policy `ACCEPT`); a rule line with `-s`, `-d`, `-i`, `-o`, `-p` first, in
//! that order, addresses with their prefix length and masked, `--comment` quoted as the save
//! quotes it.
//!
//! Anything this does not model exactly gives `None` (the caller then reads a real save):
//! a command other than `-A`, `-I`, `-D`, `-F CHAIN`, `-X CHAIN`, `-N`, a user chain
//! declaration; a chain or rule the command needs that is not there (the real restore would
//! have failed); a table other than `filter` and `raw` to create; a built-in option after a
//! match, a protocol by number, more than one address in `-s`/`-d`.

use crate::live::iptables_save::{parse_prefix, tokenize};
use crate::render::iptables::{prefix_arg, spec_to_line};

/// The order in which `iptables-nft-save` prints its tables.
const TABLE_ORDER: [&str; 5] = ["mangle", "security", "raw", "filter", "nat"];

/// The built-in chains of the tables ctguard may create, in hook order (both families).
fn builtins_of(table: &str) -> Option<&'static [&'static str]> {
    match table {
        "filter" => Some(&["INPUT", "FORWARD", "OUTPUT"]),
        "raw" => Some(&["PREROUTING", "OUTPUT"]),
        _ => None,
    }
}

struct Chain {
    name: String,
    /// `ACCEPT [0:0]`, `DROP [12:34]`, `- [0:0]`: what follows `:NAME ` in the save.
    decl: String,
    builtin: bool,
    /// Each rule's `-A NAME …` line as the save prints it.
    rules: Vec<String>,
}

struct Table {
    name: String,
    chains: Vec<Chain>,
}

impl Table {
    fn chain_mut(&mut self, name: &str) -> Option<&mut Chain> {
        self.chains.iter_mut().find(|c| c.name == name)
    }

    /// Adds a user chain where the save lists it: after the built-in chains, by name.
    fn add_user_chain(&mut self, name: &str) {
        let at = self.chains.iter().position(|c| !c.builtin && c.name.as_str() > name).unwrap_or(self.chains.len());
        self.chains
            .insert(at, Chain { name: name.to_string(), decl: "- [0:0]".into(), builtin: false, rules: Vec::new() });
    }
}

fn rank(table: &str) -> Option<usize> {
    TABLE_ORDER.iter().position(|t| *t == table)
}

/// Parses a save (comments and blank lines skipped); `None` on anything else than tables,
/// chain declarations, `-A` lines of declared chains and `COMMIT`.
fn parse(save: &str) -> Option<Vec<Table>> {
    let mut tables: Vec<Table> = Vec::new();
    let mut open = false;
    for line in save.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table { name: name.trim().to_string(), chains: Vec::new() });
            open = true;
            continue;
        }
        if line == "COMMIT" {
            open = false;
            continue;
        }
        let t = tables.last_mut().filter(|_| open)?;
        if let Some(decl) = line.strip_prefix(':') {
            let (name, rest) = decl.split_once(' ')?;
            let builtin = !rest.starts_with('-');
            t.chains.push(Chain { name: name.to_string(), decl: rest.to_string(), builtin, rules: Vec::new() });
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next()?;
            t.chain_mut(chain)?.rules.push(line.to_string());
        } else {
            return None;
        }
    }
    Some(tables)
}

fn print(tables: &[Table]) -> String {
    let mut s = String::new();
    for t in tables {
        s.push('*');
        s.push_str(&t.name);
        s.push('\n');
        for c in &t.chains {
            s.push(':');
            s.push_str(&c.name);
            s.push(' ');
            s.push_str(&c.decl);
            s.push('\n');
        }
        for c in &t.chains {
            for r in &c.rules {
                s.push_str(r);
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// The `-A CHAIN …` line `iptables-nft-save` prints for the rule `args` (see the module);
/// `None` when not modelled. Pure.
pub fn save_line(chain: &str, args: &[String]) -> Option<String> {
    // (option, negated, value) of the built-in matches, in the save's order.
    const ORDER: [&str; 5] = ["-s", "-d", "-i", "-o", "-p"];
    let mut builtin: Vec<(usize, bool, String)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let neg = args[i] == "!";
        let opt = if neg { args.get(i + 1)? } else { &args[i] };
        let Some(rank) = ORDER.iter().position(|o| o == opt) else { break };
        let value = args.get(i + 1 + usize::from(neg))?;
        let value = match opt.as_str() {
            "-s" | "-d" => prefix_arg(&parse_prefix(value)?),
            "-p" if value.chars().all(|c| c.is_ascii_alphabetic()) => value.to_ascii_lowercase(),
            "-p" => return None,
            _ => value.clone(),
        };
        if builtin.iter().any(|(r, _, _)| *r == rank) {
            return None;
        }
        builtin.push((rank, neg, value));
        i += 2 + usize::from(neg);
    }
    let rest = &args[i..];
    // A built-in option among the matches would move in the save: not modelled.
    if rest.iter().any(|a| ORDER.contains(&a.as_str()) || a.starts_with("--source") || a.starts_with("--destination")) {
        return None;
    }
    builtin.sort_by_key(|(r, _, _)| *r);
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    for (r, neg, v) in builtin {
        if neg {
            out.push("!".into());
        }
        out.push(ORDER[r].into());
        out.push(v);
    }
    out.extend(rest.iter().cloned());
    Some(if out.is_empty() { format!("-A {chain}") } else { format!("-A {chain} {}", spec_to_line(&out)) })
}

/// The save `save` after `iptables-nft-restore --noflush` loaded `doc`, as `iptables-nft-save`
/// prints it (without its `#` lines); `None` when the documents use anything this module does
/// not model exactly (see the module). Pure.
pub fn after_restore(save: &str, doc: &str) -> Option<String> {
    let mut tables = parse(save)?;
    let mut cur: Option<usize> = None;
    for line in doc.lines().map(str::trim_end) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            let name = name.trim();
            cur = Some(match tables.iter().position(|t| t.name == name) {
                Some(i) => i,
                None => {
                    let builtins = builtins_of(name)?;
                    let r = rank(name)?;
                    let mut at = tables.len();
                    for (i, t) in tables.iter().enumerate() {
                        if rank(&t.name)? > r {
                            at = at.min(i);
                        }
                    }
                    let chains = builtins
                        .iter()
                        .map(|b| Chain {
                            name: (*b).into(),
                            decl: "ACCEPT [0:0]".into(),
                            builtin: true,
                            rules: Vec::new(),
                        })
                        .collect();
                    tables.insert(at, Table { name: name.to_string(), chains });
                    at
                }
            });
            continue;
        }
        if line == "COMMIT" {
            cur = None;
            continue;
        }
        let t = &mut tables[cur?];
        if let Some(decl) = line.strip_prefix(':') {
            let (name, rest) = decl.split_once(' ')?;
            if !rest.starts_with('-') {
                return None;
            }
            match t.chain_mut(name) {
                Some(c) if c.builtin => return None,
                Some(c) => c.rules.clear(),
                None => t.add_user_chain(name),
            }
            continue;
        }
        let words = tokenize(line).ok()?;
        let (cmd, chain) = (words.first()?.as_str(), words.get(1)?.clone());
        let args = &words[2..];
        match cmd {
            "-A" => {
                let l = save_line(&chain, args)?;
                t.chain_mut(&chain)?.rules.push(l);
            }
            "-I" => {
                let (at, spec) = match args.first().and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => (n.checked_sub(1)?, &args[1..]),
                    None => (0, args),
                };
                let l = save_line(&chain, spec)?;
                let c = t.chain_mut(&chain)?;
                if at > c.rules.len() {
                    return None;
                }
                c.rules.insert(at, l);
            }
            "-D" => {
                let c_rules = &mut t.chain_mut(&chain)?.rules;
                match args {
                    [n] if n.parse::<usize>().is_ok() => {
                        let at = n.parse::<usize>().ok()?.checked_sub(1)?;
                        if at >= c_rules.len() {
                            return None;
                        }
                        c_rules.remove(at);
                    }
                    spec => {
                        let l = save_line(&chain, spec)?;
                        let at = c_rules.iter().position(|r| *r == l)?;
                        c_rules.remove(at);
                    }
                }
            }
            "-F" if args.is_empty() => t.chain_mut(&chain)?.rules.clear(),
            "-N" if args.is_empty() => {
                if t.chain_mut(&chain).is_some() {
                    return None;
                }
                t.add_user_chain(&chain);
            }
            "-X" if args.is_empty() => {
                let referenced = t.chains.iter().flat_map(|c| c.rules.iter()).any(|r| {
                    let w: Vec<&str> = r.split_whitespace().collect();
                    w.windows(2).any(|p| (p[0] == "-j" || p[0] == "-g") && p[1] == chain)
                });
                let at = t.chains.iter().position(|c| c.name == chain)?;
                if referenced || t.chains[at].builtin || !t.chains[at].rules.is_empty() {
                    return None;
                }
                t.chains.remove(at);
            }
            _ => return None,
        }
    }
    if cur.is_some() {
        return None;
    }
    Some(print(&tables))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables)\n*filter\n:INPUT DROP [12:345]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:zeta - [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -s 100.64.0.1/32 -j DROP\n-A zeta -j RETURN\nCOMMIT\n# Completed\n";

    /// The case measured against iptables-nft 1.8.9 (`iptables-nft-save` after the restore):
    /// a raw table created with both built-in chains, before `filter`; user chains by name;
    /// the insert at its place; `-s` given its prefix length; the comment quoted.
    #[test]
    fn a_new_raw_table_and_an_insert_print_as_the_save_does() {
        let doc = "*raw\n:CTGUARD-PRE - [0:0]\n:CTGUARD-OUT - [0:0]\n-A CTGUARD-PRE -p udp -m multiport --dports 53 -m comment --comment \"ctguard:X\" -j CT --notrack\n-I PREROUTING 1 -j CTGUARD-PRE\n-I OUTPUT 1 -j CTGUARD-OUT\nCOMMIT\n*filter\n:alpha - [0:0]\n-I INPUT 3 -p udp -s 10.0.0.1 -m multiport --dports 53 -m conntrack --ctstate UNTRACKED -m comment --comment ctguard:X -j ACCEPT\nCOMMIT\n";
        let after = after_restore(BEFORE, doc).expect("modelled");
        assert_eq!(
            after,
            "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CTGUARD-OUT - [0:0]\n:CTGUARD-PRE - [0:0]\n-A PREROUTING -j CTGUARD-PRE\n-A OUTPUT -j CTGUARD-OUT\n-A CTGUARD-PRE -p udp -m multiport --dports 53 -m comment --comment \"ctguard:X\" -j CT --notrack\nCOMMIT\n*filter\n:INPUT DROP [12:345]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:alpha - [0:0]\n:zeta - [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -s 10.0.0.1/32 -p udp -m multiport --dports 53 -m conntrack --ctstate UNTRACKED -m comment --comment \"ctguard:X\" -j ACCEPT\n-A INPUT -s 100.64.0.1/32 -j DROP\n-A zeta -j RETURN\nCOMMIT\n"
        );
        // Deleting what was added (by spec, as the rollback does) gives the save back.
        let undo = "*filter\n-D INPUT -s 10.0.0.1/32 -p udp -m multiport --dports 53 -m conntrack --ctstate UNTRACKED -m comment --comment \"ctguard:X\" -j ACCEPT\n-X alpha\nCOMMIT\n";
        let back = after_restore(&after, undo).expect("modelled");
        assert_eq!(
            back.split("*filter\n").nth(1),
            BEFORE.split("*filter\n").nth(1).map(|s| s.replace("# Completed\n", "")).as_deref()
        );
    }

    #[test]
    fn a_declared_user_chain_is_emptied() {
        let after =
            after_restore(BEFORE, "*filter\n:zeta - [0:0]\n-A zeta -p tcp -j ACCEPT\nCOMMIT\n").expect("modelled");
        assert!(after.contains("-A zeta -p tcp -j ACCEPT\nCOMMIT\n") && !after.contains("RETURN"), "{after}");
    }

    /// Whatever the real restore would refuse, or this module does not print exactly, is not
    /// guessed.
    #[test]
    fn what_is_not_modelled_gives_none() {
        for doc in [
            "*filter\n-I INPUT 5 -j ACCEPT\nCOMMIT\n",      // past the end
            "*filter\n-D INPUT -p tcp -j ACCEPT\nCOMMIT\n", // not there
            "*filter\n-A nochain -j ACCEPT\nCOMMIT\n",      // no such chain
            "*filter\n-X zeta\nCOMMIT\n",                   // not empty
            "*filter\n-X INPUT\nCOMMIT\n",                  // built-in
            "*filter\n-P INPUT ACCEPT\nCOMMIT\n",           // a command not modelled
            "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",       // a built-in's policy
            "*nat\n-A PREROUTING -j ACCEPT\nCOMMIT\n",      // a table not modelled
            "*filter\n-A INPUT -m comment --comment x -p udp -j ACCEPT\nCOMMIT\n", // -p after a match
            "*filter\n-A INPUT -p 17 -j ACCEPT\nCOMMIT\n",  // a protocol by number
            "*filter\n-A INPUT -s 10.0.0.1,10.0.0.2 -j ACCEPT\nCOMMIT\n", // two rules in the save
            "*filter\n-A INPUT -j ACCEPT\n",                // no COMMIT
        ] {
            assert_eq!(after_restore(BEFORE, doc), None, "{doc}");
        }
        assert_eq!(after_restore("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n", ""), None, "a rule of an undeclared chain");
    }

    #[test]
    fn builtin_options_take_the_save_order_and_form() {
        let w = |s: &str| tokenize(s).expect("tokenizes");
        assert_eq!(
            save_line("FORWARD", &w("-p TCP -i eth0 -o lo -d 1.2.3.4/8 ! -s 5.6.7.8 -m tcp --dport 5 -j ACCEPT"))
                .as_deref(),
            Some("-A FORWARD ! -s 5.6.7.8/32 -d 1.0.0.0/8 -i eth0 -o lo -p tcp -m tcp --dport 5 -j ACCEPT")
        );
        assert_eq!(
            save_line("INPUT", &w("-s 2001:DB8:0:0::1/64 -d fe80::1 -p udp -j ACCEPT")).as_deref(),
            Some("-A INPUT -s 2001:db8::/64 -d fe80::1/128 -p udp -j ACCEPT")
        );
        assert_eq!(save_line("X", &[]).as_deref(), Some("-A X"));
    }
}
