//! `table inet ctguard` as nft script text, laid out the way `nft list table inet ctguard`
//! prints it, so the script is both what `render` shows and what `nft -f` loads. Pure.

use std::fmt::Write as _;

use super::nft_ir::{ChainIr, Elem, Match, RuleIr, SetIr, TableIr};

/// The table block alone (`table inet ctguard { … }`). Loading it with `nft -f` adds to an
/// existing table; use [`replace_script`] to replace one atomically.
pub fn table_block(t: &TableIr) -> String {
    let mut s = format!("table inet {} {{\n", t.name);
    let mut first = true;
    for set in &t.sets {
        if !first {
            s.push('\n');
        }
        first = false;
        set_block(&mut s, set);
    }
    for chain in &t.chains {
        if !first {
            s.push('\n');
        }
        first = false;
        chain_block(&mut s, chain);
    }
    s.push_str("}\n");
    s
}

/// One `nft -f` transaction that replaces `table inet ctguard` whether or not it exists:
/// declare it (a no-op when present), delete it, create it afresh. With an empty table IR the
/// result only removes ctguard's table.
pub fn replace_script(t: &TableIr) -> String {
    let mut s = format!("table inet {0}\ndelete table inet {0}\n", t.name);
    if !t.is_empty() {
        s.push_str(&table_block(t));
    }
    s
}

fn set_block(s: &mut String, set: &SetIr) {
    let _ = writeln!(s, "\tset {} {{", set.name);
    let _ = writeln!(s, "\t\ttype {}", set.kind.type_name());
    if set.kind.is_interval() {
        s.push_str("\t\tflags interval\n");
    }
    let elems: Vec<String> = set.elements.iter().map(elem).collect();
    let _ = writeln!(s, "\t\telements = {{ {} }}", elems.join(", "));
    s.push_str("\t}\n");
}

/// An element as nft prints it.
pub fn elem(e: &Elem) -> String {
    match e {
        Elem::Port(r) => r.to_string(),
        Elem::Prefix(p) => p.to_string(),
        Elem::Ifname(n) => format!("\"{n}\""),
    }
}

fn chain_block(s: &mut String, c: &ChainIr) {
    let _ = writeln!(s, "\tchain {} {{", c.name);
    let _ =
        writeln!(s, "\t\ttype filter hook {} priority {}; policy accept;", c.hook.as_str(), priority_name(c.priority));
    for r in &c.rules {
        let _ = writeln!(s, "\t\t{}", rule_text(r));
    }
    s.push_str("\t}\n");
}

/// nft prints well-known priorities by name.
fn priority_name(p: i32) -> String {
    match p {
        -300 => "raw".into(),
        -150 => "mangle".into(),
        0 => "filter".into(),
        n => n.to_string(),
    }
}

/// A rule's statement text, as `nft list` prints it.
pub fn rule_text(r: &RuleIr) -> String {
    let mut parts: Vec<String> = r.matches.iter().map(match_text).collect();
    parts.push("notrack".into());
    parts.push(format!("comment \"{}\"", r.comment));
    parts.join(" ")
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "ip6"
    } else {
        "ip"
    }
}

fn match_text(m: &Match) -> String {
    match m {
        Match::IifnameInSet(set) => format!("iifname @{set}"),
        Match::OifnameInSet(set) => format!("oifname @{set}"),
        Match::OifnameIs(n) => format!("oifname \"{n}\""),
        Match::SaddrInSet { v6, set } => format!("{} saddr @{set}", family(*v6)),
        Match::DaddrInSet { v6, set } => format!("{} daddr @{set}", family(*v6)),
        Match::DportInSet { proto, set } => format!("{proto} dport @{set}"),
        Match::SportInSet { proto, set } => format!("{proto} sport @{set}"),
        Match::FibDaddrLocal => "fib daddr type local".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{names::Tag, Policy};
    use crate::render::nft_ir::table_for;

    #[test]
    fn builtin_renders_both_directions() {
        let t = table_for(&Policy::builtin(), &Tag::preview());
        let s = table_block(&t);
        println!("{s}");
        assert!(s.contains("udp dport @ports_0 fib daddr type local notrack"));
        assert!(s.contains("udp sport @ports_0 notrack"));
        assert!(s.contains("oifname \"lo\" udp dport @ports_0 notrack"));
    }
}
