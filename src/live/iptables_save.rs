//! Parser for `iptables-save` / `ip6tables-save` output (nft and legacy variants alike) and a
//! semantic view of one rule for the insertion planner. Pure.
//!
//! A dump is `*TABLE`, chain declarations `:NAME POLICY [pkts:bytes]` (policy `-` for user
//! chains), `-A CHAIN args…` rules (optionally prefixed by `[pkts:bytes]` when saved with
//! `-c`) and `COMMIT`. Lines starting with `#` are comments, except the warnings
//! iptables-nft prints on stdout (exit status 0) when a table holds things it cannot show —
//! ``# Table `filter' is incompatible, use 'nft' tool.`` and ``# Table `filter' contains
//! incompatible base-chains, use 'nft' tool to list them.`` — which are errors here: the dump
//! is incomplete and restoring it would lose rules.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use crate::model::{mask_v4, mask_v6, Prefix};

/// Why a dump cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaveParseError {
    /// iptables-nft reports a table (or base chain) it cannot represent. The line is shown with
    /// its control characters escaped (it is the dump's text, not ctguard's).
    #[error("line {line}: the dump is incomplete, iptables-nft says: {}", crate::exit::escape_for_terminal(.text))]
    Incompatible {
        /// 1-based line number.
        line: usize,
        /// The warning line as printed.
        text: String,
    },
    /// A line that is not part of the save format.
    #[error("line {line}: unexpected {what}: {text:?}")]
    Unexpected {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        what: &'static str,
        /// The line.
        text: String,
    },
    /// A quote was never closed.
    #[error("line {line}: unterminated quote")]
    UnterminatedQuote {
        /// 1-based line number.
        line: usize,
    },
    /// A table was still open at the end of the input.
    #[error("table {table:?} has no COMMIT")]
    MissingCommit {
        /// The table.
        table: String,
    },
}

/// A whole dump: the tables in the order printed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SaveDump {
    /// Tables in order.
    pub tables: Vec<SaveTable>,
}

/// One `*table … COMMIT` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveTable {
    /// Table name (`filter`, `raw`, `nat`, `mangle`, `security`).
    pub name: String,
    /// Chains in the order declared; a chain used by `-A` without a declaration is added.
    pub chains: Vec<SaveChain>,
}

/// One chain and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveChain {
    /// Chain name.
    pub name: String,
    /// `Some("ACCEPT")`/`Some("DROP")` for a built-in chain, `None` for a user chain (`-`)
    /// and for a chain that was never declared.
    pub policy: Option<String>,
    /// Rules in order.
    pub rules: Vec<SaveRule>,
}

/// One `-A` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveRule {
    /// The chain it was appended to.
    pub chain: String,
    /// The arguments after `-A CHAIN`, unquoted.
    pub args: Vec<String>,
    /// The line as printed (without a `[pkts:bytes]` prefix).
    pub line: String,
    /// 1-based line number in the dump.
    pub lineno: usize,
}

impl SaveDump {
    /// The table named `name`.
    pub fn table(&self, name: &str) -> Option<&SaveTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The chain `chain` of table `table`.
    pub fn chain(&self, table: &str, chain: &str) -> Option<&SaveChain> {
        self.table(table).and_then(|t| t.chain(chain))
    }
}

impl SaveTable {
    /// The chain named `name`.
    pub fn chain(&self, name: &str) -> Option<&SaveChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Every rule of the table, chain by chain.
    pub fn rules(&self) -> impl Iterator<Item = &SaveRule> {
        self.chains.iter().flat_map(|c| c.rules.iter())
    }

    fn chain_mut(&mut self, name: &str) -> &mut SaveChain {
        let i = match self.chains.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.chains.push(SaveChain { name: name.to_string(), policy: None, rules: Vec::new() });
                self.chains.len() - 1
            }
        };
        &mut self.chains[i]
    }
}

impl SaveChain {
    /// True for a built-in chain (it has a policy).
    pub fn is_builtin(&self) -> bool {
        self.policy.is_some()
    }
}

/// True for the warnings iptables-nft prints as `#` lines on stdout when a dump is incomplete.
pub fn is_incompatible_warning(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.starts_with('#') && (l.contains("incompatible") || l.contains("use 'nft' tool"))
}

/// The name a warning names (``# Table `nat' contains …`` → `nat`), if it names one.
fn incompatible_table(line: &str) -> Option<&str> {
    let rest = line.split_once('`')?.1;
    let name = rest.split_once('\'')?.0;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')).then_some(name)
}

/// The dump without the tables iptables-nft calls incompatible, and their names (DESIGN §1:
/// such a table is a native nft table with an iptables-like name — `table ip nat` written by
/// hand or by a distribution — read, planned and restored as nft, never through the iptables
/// tools). Its warning lines and any `*TABLE … COMMIT` block it printed for it go; a warning
/// that names no table is kept (so [`parse`] still refuses the dump). Pure.
pub fn without_incompatible(text: &str) -> (String, Vec<String>) {
    let tables: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| is_incompatible_warning(l))
        .filter_map(|l| incompatible_table(l).map(str::to_string))
        .collect();
    if tables.is_empty() {
        return (text.to_string(), tables);
    }
    let mut out = String::with_capacity(text.len());
    let mut skipping = false;
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r').trim();
        if is_incompatible_warning(line) && incompatible_table(line).is_some_and(|t| tables.iter().any(|x| x == t)) {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            skipping = tables.iter().any(|t| t == name.trim());
        }
        if !skipping {
            out.push_str(raw);
            out.push('\n');
        }
        if line == "COMMIT" {
            skipping = false;
        }
    }
    (out, tables)
}

/// Parses a dump. Comments are skipped; iptables-nft's "incompatible" warnings are errors.
pub fn parse(text: &str) -> Result<SaveDump, SaveParseError> {
    let mut dump = SaveDump::default();
    let mut open: Option<SaveTable> = None;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = raw.trim_end_matches('\r').trim();
        let unexpected = |what: &'static str| SaveParseError::Unexpected { line: lineno, what, text: raw.to_string() };
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            if is_incompatible_warning(line) {
                return Err(SaveParseError::Incompatible { line: lineno, text: line.to_string() });
            }
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if open.is_some() {
                return Err(unexpected("table start before COMMIT"));
            }
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(unexpected("table name"));
            }
            if dump.table(name).is_some() {
                return Err(unexpected("second block for the same table"));
            }
            open = Some(SaveTable { name: name.to_string(), chains: Vec::new() });
            continue;
        }
        let Some(table) = open.as_mut() else {
            return Err(unexpected("line outside a table"));
        };
        if line == "COMMIT" {
            if let Some(t) = open.take() {
                dump.tables.push(t);
            }
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(policy)) = (parts.next(), parts.next()) else {
                return Err(unexpected("chain declaration"));
            };
            if table.chain(name).is_some() {
                return Err(unexpected("chain declared twice"));
            }
            let policy = (policy != "-").then(|| policy.to_string());
            table.chains.push(SaveChain { name: name.to_string(), policy, rules: Vec::new() });
            continue;
        }
        // `[pkts:bytes] -A …` with `-c`.
        let body = match line.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((counters, after)) if is_counter_pair(counters) => after.trim_start(),
                _ => return Err(unexpected("counters")),
            },
            None => line,
        };
        let tokens = tokenize(body).map_err(|UnterminatedQuote| SaveParseError::UnterminatedQuote { line: lineno })?;
        match tokens.as_slice() {
            [a, chain, args @ ..] if a == "-A" => {
                let rule = SaveRule { chain: chain.clone(), args: args.to_vec(), line: body.to_string(), lineno };
                table.chain_mut(chain).rules.push(rule);
            }
            _ => return Err(unexpected("command (only -A appears in a save)")),
        }
    }
    if let Some(t) = open {
        return Err(SaveParseError::MissingCommit { table: t.name });
    }
    Ok(dump)
}

fn is_counter_pair(s: &str) -> bool {
    s.split_once(':')
        .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()))
}

/// A rule line whose double quote is never closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unterminated quote")]
pub struct UnterminatedQuote;

/// Splits one rule line into arguments the way iptables-restore does: whitespace separates;
/// `"…"` quotes (a quoted empty string is an empty argument); inside quotes a backslash makes
/// the next character literal; a closing quote ends the argument. Outside quotes a backslash
/// is an ordinary character.
pub fn tokenize(line: &str) -> Result<Vec<String>, UnterminatedQuote> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false; // current argument had quotes (so may be empty)
    let mut in_quote = false;
    let mut escaped = false;
    for c in line.chars() {
        if in_quote {
            if escaped {
                cur.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quote = false;
                out.push(std::mem::take(&mut cur));
                quoted = false;
            } else {
                cur.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                in_quote = true;
                quoted = true;
            }
            ' ' | '\t' | '\n' => {
                if !cur.is_empty() || quoted {
                    out.push(std::mem::take(&mut cur));
                    quoted = false;
                }
            }
            _ => cur.push(c),
        }
    }
    if in_quote {
        return Err(UnterminatedQuote);
    }
    if !cur.is_empty() || quoted {
        out.push(cur);
    }
    Ok(out)
}

/// A value with the `!` that may precede its option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neg<T> {
    /// True when the option was preceded by `!`.
    pub negated: bool,
    /// The value.
    pub value: T,
}

/// A rule's target: `-j NAME` or `-g NAME`, with the options after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRef {
    /// `ACCEPT`, `DROP`, `REJECT`, `RETURN`, `LOG`, `CT`, a user chain…
    pub name: String,
    /// True for `-g` (goto: no return to this chain).
    pub goto: bool,
    /// The target's own options (`--reject-with icmp-port-unreachable`, `--notrack`).
    pub args: Vec<String>,
}

/// What a rule matches, as far as the insertion planner needs it. Every option it does not
/// understand is listed in [`RuleView::unknown`]: a rule with any entry there may or may not
/// match a given flow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleView {
    /// `-p`: lower-case name (`tcp`, `udp`, `icmp`…; numbers 6 and 17 become `tcp`/`udp`);
    /// `None` for any (`-p all` / `-p 0` included).
    pub proto: Option<Neg<String>>,
    /// `-i` (a trailing `+` is a wildcard).
    pub in_iface: Option<Neg<String>>,
    /// `-o` (a trailing `+` is a wildcard).
    pub out_iface: Option<Neg<String>>,
    /// `-s`, host bits cleared.
    pub src: Option<Neg<Prefix>>,
    /// `-d`, host bits cleared.
    pub dst: Option<Neg<Prefix>>,
    /// Destination ports: `--dport`, `-m multiport --dports`.
    pub dports: Option<Neg<Vec<RangeInclusive<u16>>>>,
    /// Source ports: `--sport`, `-m multiport --sports`.
    pub sports: Option<Neg<Vec<RangeInclusive<u16>>>>,
    /// `-m multiport --ports`: source **or** destination port in the list.
    pub any_ports: Option<Neg<Vec<RangeInclusive<u16>>>>,
    /// `-m conntrack --ctstate` / `-m state --state`: upper-case state names.
    pub states: Option<Neg<BTreeSet<String>>>,
    /// `-m comment --comment`.
    pub comment: Option<String>,
    /// `-j` / `-g`; `None` for a rule with no target (counts only).
    pub target: Option<TargetRef>,
    /// Matches and options not understood, as written (`-m limit --limit 5/min`,
    /// `--tcp-flags FIN,SYN,RST,ACK SYN`, `-m set --match-set blk src`).
    pub unknown: Vec<String>,
}

impl RuleView {
    /// Reads a rule's arguments (after `-A CHAIN`).
    pub fn from_args(args: &[String]) -> RuleView {
        let mut v = RuleView::default();
        // Current `-m` module: None before any, Some(name) after `-m name`.
        let mut module: Option<String> = None;
        // Text of the current not-understood module, flushed to `unknown` when it ends.
        let mut unknown_module: Option<String> = None;
        let mut negate = false;
        let mut i = 0;
        let flush = |v: &mut RuleView, m: &mut Option<String>| {
            if let Some(t) = m.take() {
                v.unknown.push(t);
            }
        };
        while i < args.len() {
            let opt = args[i].as_str();
            i += 1;
            if opt == "!" {
                negate = true;
                continue;
            }
            // Values: the following arguments up to the next option or `!`.
            let start = i;
            while i < args.len() && !is_option(&args[i]) {
                i += 1;
            }
            let vals = &args[start..i];
            let neg = std::mem::take(&mut negate);
            let text = || {
                let mut t = if neg { format!("! {opt}") } else { opt.to_string() };
                for x in vals {
                    t.push(' ');
                    t.push_str(x);
                }
                t
            };
            let one = vals.first().filter(|_| vals.len() == 1);
            match opt {
                "-j" | "--jump" | "-g" | "--goto" => {
                    flush(&mut v, &mut unknown_module);
                    let Some(name) = one else {
                        v.unknown.push(text());
                        continue;
                    };
                    // Everything after the target belongs to it.
                    let rest = args[i..].to_vec();
                    i = args.len();
                    v.target = Some(TargetRef {
                        name: name.clone(),
                        goto: opt.starts_with("-g") || opt == "--goto",
                        args: rest,
                    });
                }
                "-m" | "--match" => {
                    flush(&mut v, &mut unknown_module);
                    let Some(name) = one else {
                        v.unknown.push(text());
                        module = None;
                        continue;
                    };
                    module = Some(name.clone());
                    if neg || !KNOWN_MODULES.contains(&name.as_str()) {
                        unknown_module = Some(text());
                    }
                }
                // Inside a module not understood, its options (all long) belong to it; the
                // short generic options end it.
                _ if unknown_module.is_some() && !matches!(opt, "-p" | "-s" | "-d" | "-i" | "-o") => {
                    if let Some(t) = unknown_module.as_mut() {
                        t.push(' ');
                        t.push_str(&text());
                    }
                }
                _ if unknown_module.is_some() => {
                    flush(&mut v, &mut unknown_module);
                    module = None;
                    // Re-read this option outside the module.
                    i = start - 1;
                    negate = neg;
                }
                "-p" | "--protocol" => match one {
                    Some(p) => {
                        let p = normalize_proto(p);
                        if p == "all" {
                            if neg {
                                v.unknown.push(text());
                            }
                        } else {
                            v.proto = Some(Neg { negated: neg, value: p });
                        }
                    }
                    None => v.unknown.push(text()),
                },
                "-i" | "--in-interface" => set_once(&mut v.in_iface, one.cloned(), neg, text(), &mut v.unknown),
                "-o" | "--out-interface" => set_once(&mut v.out_iface, one.cloned(), neg, text(), &mut v.unknown),
                "-s" | "--source" | "--src" => {
                    let p = one.and_then(|s| parse_prefix(s));
                    set_once(&mut v.src, p, neg, text(), &mut v.unknown);
                }
                "-d" | "--destination" | "--dst" => {
                    let p = one.and_then(|s| parse_prefix(s));
                    set_once(&mut v.dst, p, neg, text(), &mut v.unknown);
                }
                "--dport" | "--destination-port" | "--sport" | "--source-port"
                    if matches!(module.as_deref(), None | Some("tcp" | "udp" | "sctp" | "udplite" | "dccp")) =>
                {
                    let r = one.and_then(|s| parse_port_range(s)).map(|r| vec![r]);
                    let field = if opt.starts_with("--d") { &mut v.dports } else { &mut v.sports };
                    set_once(field, r, neg, text(), &mut v.unknown);
                }
                "--dports" | "--destination-ports" | "--sports" | "--source-ports" | "--ports"
                    if module.as_deref() == Some("multiport") =>
                {
                    let r = one.and_then(|s| parse_port_list(s));
                    let field = match opt {
                        "--ports" => &mut v.any_ports,
                        o if o.starts_with("--d") => &mut v.dports,
                        _ => &mut v.sports,
                    };
                    set_once(field, r, neg, text(), &mut v.unknown);
                }
                "--ctstate" if module.as_deref() == Some("conntrack") => {
                    let s = one.map(|s| parse_states(s));
                    set_once(&mut v.states, s, neg, text(), &mut v.unknown);
                }
                "--state" if module.as_deref() == Some("state") => {
                    let s = one.map(|s| parse_states(s));
                    set_once(&mut v.states, s, neg, text(), &mut v.unknown);
                }
                "--comment" if module.as_deref() == Some("comment") && !neg => match one {
                    Some(c) => v.comment = Some(c.clone()),
                    None => v.unknown.push(text()),
                },
                _ => v.unknown.push(text()),
            }
        }
        flush(&mut v, &mut unknown_module);
        if negate {
            v.unknown.push("!".to_string());
        }
        v
    }

    /// True when every option of the rule was understood.
    pub fn fully_understood(&self) -> bool {
        self.unknown.is_empty()
    }
}

/// Modules whose options [`RuleView`] reads (others go to `unknown` whole).
const KNOWN_MODULES: &[&str] = &["tcp", "udp", "sctp", "udplite", "dccp", "multiport", "conntrack", "state", "comment"];

fn is_option(s: &str) -> bool {
    s == "!" || (s.starts_with('-') && s.len() > 1 && !s[1..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Sets `field` once; a missing value, an unparsable one or a repeat goes to `unknown`.
fn set_once<T>(field: &mut Option<Neg<T>>, value: Option<T>, negated: bool, text: String, unknown: &mut Vec<String>) {
    match value {
        Some(value) if field.is_none() => *field = Some(Neg { negated, value }),
        _ => unknown.push(text),
    }
}

fn normalize_proto(p: &str) -> String {
    let p = p.to_ascii_lowercase();
    match p.as_str() {
        "6" => "tcp".into(),
        "17" => "udp".into(),
        "0" => "all".into(),
        _ => p,
    }
}

/// `ADDR`, `ADDR/LEN` or `ADDR/MASK` (contiguous masks only); host bits are cleared.
pub fn parse_prefix(s: &str) -> Option<Prefix> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => {
            let len = match len {
                None => 32,
                Some(l) if l.contains('.') => {
                    let m = u32::from(l.parse::<std::net::Ipv4Addr>().ok()?);
                    let n = m.leading_ones();
                    if m.checked_shl(n).unwrap_or(0) != 0 {
                        return None; // non-contiguous mask
                    }
                    n as u8
                }
                Some(l) => l.parse::<u8>().ok().filter(|l| *l <= 32)?,
            };
            Some(Prefix::V4(mask_v4(u32::from(a), len).into(), len))
        }
        IpAddr::V6(a) => {
            let len = match len {
                None => 128,
                Some(l) => l.parse::<u8>().ok().filter(|l| *l <= 128)?,
            };
            Some(Prefix::V6(mask_v6(u128::from(a), len).into(), len))
        }
    }
}

/// `N`, `A:B`, `:B` (0..=B) or `A:` (A..=65535), numbers only.
pub fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let num = |x: &str| x.parse::<u16>().ok();
    match s.split_once(':') {
        None => num(s).map(|p| p..=p),
        Some((a, b)) => {
            let lo = if a.is_empty() { 0 } else { num(a)? };
            let hi = if b.is_empty() { u16::MAX } else { num(b)? };
            (lo <= hi).then_some(lo..=hi)
        }
    }
}

/// A `multiport` list: `53,1000:2000`.
pub fn parse_port_list(s: &str) -> Option<Vec<RangeInclusive<u16>>> {
    s.split(',').map(parse_port_range).collect()
}

fn parse_states(s: &str) -> BTreeSet<String> {
    s.split(',').filter(|x| !x.is_empty()).map(|x| x.to_ascii_uppercase()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing (issue 14) found the "incompatible" warning line echoed raw into the error: a
    /// carriage return or an escape sequence in it reached the message.
    #[test]
    fn fuzz_incompatible_warning_with_control_characters_is_one_line() {
        let dump = "*filter\n# Table `filter' is incompatible\r\u{1b}[2J, use 'nft' tool.\nCOMMIT\n";
        let msg = parse(dump).expect_err("incompatible").to_string();
        assert_eq!(msg, "line 2: the dump is incomplete, iptables-nft says: # Table `filter' is incompatible\\r\\u{1b}[2J, use 'nft' tool.");
    }

    fn args(s: &str) -> Vec<String> {
        tokenize(s).expect("tokenizes")
    }

    #[test]
    fn tokenizer_quotes_and_escapes() {
        assert_eq!(
            args(r#"-m comment --comment "a \"q\" x\\y  z" -j ACCEPT"#),
            vec!["-m", "comment", "--comment", "a \"q\" x\\y  z", "-j", "ACCEPT"]
        );
        assert_eq!(args(r#"--comment "" -j X"#), vec!["--comment", "", "-j", "X"]);
        assert_eq!(args("a\\b  c\t d"), vec!["a\\b", "c", "d"]);
        assert_eq!(args(r#"--log-prefix "dropped: ""#), vec!["--log-prefix", "dropped: "]);
        assert!(tokenize(r#"--comment "open"#).is_err());
    }

    const REAL: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Nov 23 15:41:54 2026
*raw
:PREROUTING ACCEPT [12:3456]
:OUTPUT ACCEPT [7:890]
-A PREROUTING -p udp -m udp --dport 123 -j CT --notrack
COMMIT
# Completed on Mon Nov 23 15:41:54 2026
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Nov 23 15:41:54 2026
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
:f2b-sshd - [0:0]
-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -s 192.0.2.0/24 -p udp -m udp --dport 53 -j ACCEPT
-A INPUT -m limit --limit 5/min -j LOG --log-prefix "iptables denied: " --log-level 7
-A INPUT -j REJECT --reject-with icmp-port-unreachable
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
-A f2b-sshd -s 203.0.113.9/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -m set --match-set f2b-sshd-set src -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
COMMIT
# Completed on Mon Nov 23 15:41:54 2026
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon Nov 23 15:41:54 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p udp -m udp --dport 53 -j DNAT --to-destination 172.17.0.2:53
COMMIT
# Completed on Mon Nov 23 15:41:54 2026
"#;

    #[test]
    fn real_world_dump() {
        let d = parse(REAL).expect("parses");
        assert_eq!(d.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["raw", "filter", "nat"]);
        let f = d.table("filter").expect("filter");
        assert_eq!(f.chains.len(), 8);
        let input = f.chain("INPUT").expect("INPUT");
        assert_eq!(input.policy.as_deref(), Some("DROP"));
        assert!(input.is_builtin());
        assert_eq!(input.rules.len(), 8);
        assert_eq!(f.chain("f2b-sshd").expect("f2b").policy, None);
        assert_eq!(f.chain("f2b-sshd").expect("f2b").rules.len(), 3);
        assert_eq!(f.rules().count(), 22);
        let log = &input.rules[6];
        assert_eq!(
            log.args,
            vec![
                "-m",
                "limit",
                "--limit",
                "5/min",
                "-j",
                "LOG",
                "--log-prefix",
                "iptables denied: ",
                "--log-level",
                "7"
            ]
        );
        assert_eq!(log.line, "-A INPUT -m limit --limit 5/min -j LOG --log-prefix \"iptables denied: \" --log-level 7");
        assert_eq!(log.chain, "INPUT");
        let v = RuleView::from_args(&log.args);
        assert_eq!(v.unknown, vec!["-m limit --limit 5/min"]);
        let t = v.target.expect("target");
        assert_eq!((t.name.as_str(), t.goto), ("LOG", false));
        assert_eq!(t.args, vec!["--log-prefix", "iptables denied: ", "--log-level", "7"]);

        // fail2ban jump: multiport dports 22, tcp.
        let v = RuleView::from_args(&input.rules[0].args);
        assert_eq!(v.proto, Some(Neg { negated: false, value: "tcp".into() }));
        assert_eq!(v.dports, Some(Neg { negated: false, value: vec![22..=22] }));
        assert_eq!(v.target.as_ref().map(|t| t.name.as_str()), Some("f2b-sshd"));
        assert!(v.fully_understood());

        let v = RuleView::from_args(&input.rules[2].args);
        assert_eq!(v.states.expect("states").value.into_iter().collect::<Vec<_>>(), vec!["ESTABLISHED", "RELATED"]);

        let v = RuleView::from_args(&input.rules[5].args);
        assert_eq!(v.src, Some(Neg { negated: false, value: Prefix::V4([192, 0, 2, 0].into(), 24) }));
        assert_eq!(v.proto.expect("proto").value, "udp");

        let v = RuleView::from_args(&input.rules[7].args);
        assert!(v.fully_understood());
        assert_eq!(v.target.expect("t").args, vec!["--reject-with", "icmp-port-unreachable"]);

        let docker = &f.chain("DOCKER").expect("DOCKER").rules[0];
        let v = RuleView::from_args(&docker.args);
        assert_eq!(v.in_iface, Some(Neg { negated: true, value: "docker0".into() }));
        assert_eq!(v.out_iface, Some(Neg { negated: false, value: "docker0".into() }));
        assert_eq!(v.dst.expect("dst").value, Prefix::V4([172, 17, 0, 2].into(), 32));

        let f2b_set = &f.chain("f2b-sshd").expect("f2b").rules[1];
        assert_eq!(RuleView::from_args(&f2b_set.args).unknown, vec!["-m set --match-set f2b-sshd-set src"]);

        let nat = d.table("nat").expect("nat");
        let v = RuleView::from_args(&nat.chain("OUTPUT").expect("OUTPUT").rules[0].args);
        assert_eq!(v.dst, Some(Neg { negated: true, value: Prefix::V4([127, 0, 0, 0].into(), 8) }));
        assert_eq!(v.unknown, vec!["-m addrtype --dst-type LOCAL"]);
        assert_eq!(
            d.chain("raw", "PREROUTING").expect("raw").rules[0].args.last().map(String::as_str),
            Some("--notrack")
        );
    }

    #[test]
    fn native_tables_named_like_iptables_tables_are_left_to_nft() {
        // What iptables-nft-save 1.8.9 prints with a native `table ip filter` next to an
        // iptables-nft nat table (measured in a namespace).
        let text = "# Table `filter' contains incompatible base-chains, use 'nft' tool to list them.\n# Generated by iptables-nft-save v1.8.9 (nf_tables)\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n# Completed\n*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n";
        assert!(parse(text).is_err(), "the raw dump is refused");
        let (clean, tables) = without_incompatible(text);
        assert_eq!(tables, ["filter"]);
        let dump = parse(&clean).expect("the rest parses");
        assert!(dump.table("filter").is_none(), "{clean}");
        assert_eq!(dump.chain("nat", "POSTROUTING").map(|c| c.rules.len()), Some(1));
        // Nothing to strip: the text as it was.
        assert_eq!(without_incompatible("*nat\nCOMMIT\n"), ("*nat\nCOMMIT\n".to_string(), Vec::new()));
        // A warning that names no table still makes the dump unusable.
        let odd = "# some table is incompatible, use 'nft' tool.\n*nat\nCOMMIT\n";
        assert!(parse(&without_incompatible(odd).0).is_err());
    }

    #[test]
    fn incompatible_table_is_an_error() {
        for warning in [
            "# Table `filter' is incompatible, use 'nft' tool.",
            "# Table `filter' contains incompatible base-chains, use 'nft' tool to list them.",
        ] {
            let text = format!("# Generated by iptables-nft-save v1.8.9 (nf_tables)\n{warning}\n*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n");
            match parse(&text) {
                Err(SaveParseError::Incompatible { line: 2, text }) => assert_eq!(text, warning),
                other => panic!("{other:?}"),
            }
        }
        // The only stdout content when the table is incompatible:
        assert!(matches!(
            parse("# Table `filter' is incompatible, use 'nft' tool.\n"),
            Err(SaveParseError::Incompatible { .. })
        ));
    }

    #[test]
    fn malformed_dumps() {
        assert!(matches!(parse("*filter\n:INPUT ACCEPT [0:0]\n"), Err(SaveParseError::MissingCommit { .. })));
        assert!(matches!(parse("-A INPUT -j ACCEPT\n"), Err(SaveParseError::Unexpected { line: 1, .. })));
        assert!(matches!(
            parse("*filter\n-I INPUT 1 -j ACCEPT\nCOMMIT\n"),
            Err(SaveParseError::Unexpected { line: 2, .. })
        ));
        assert!(matches!(
            parse("*filter\n-A INPUT -m comment --comment \"x\nCOMMIT\n"),
            Err(SaveParseError::UnterminatedQuote { line: 2 })
        ));
        assert!(matches!(parse("*filter\nCOMMIT\n*filter\nCOMMIT\n"), Err(SaveParseError::Unexpected { line: 3, .. })));
        assert_eq!(parse("").expect("empty").tables.len(), 0);
    }

    #[test]
    fn counters_and_undeclared_chains() {
        let d =
            parse("*filter\n:INPUT ACCEPT [5:6]\n[1:2] -A INPUT -j ACCEPT\n-A X -j DROP\nCOMMIT\n").expect("parses");
        let t = d.table("filter").expect("filter");
        assert_eq!(t.chain("INPUT").expect("INPUT").rules[0].line, "-A INPUT -j ACCEPT");
        assert_eq!(t.chain("X").expect("X").policy, None);
    }

    #[test]
    fn negations_and_ports() {
        let v = RuleView::from_args(&args("! -s 10.0.0.5/8 ! -p udp -m multiport ! --dports 53,1000:2000 -m conntrack ! --ctstate NEW,untracked -g OTHER"));
        assert_eq!(v.src, Some(Neg { negated: true, value: Prefix::V4([10, 0, 0, 0].into(), 8) }));
        assert_eq!(v.proto, Some(Neg { negated: true, value: "udp".into() }));
        assert_eq!(v.dports, Some(Neg { negated: true, value: vec![53..=53, 1000..=2000] }));
        let st = v.states.clone().expect("states");
        assert!(st.negated && st.value.contains("UNTRACKED") && st.value.contains("NEW"));
        assert!(v.fully_understood());
        let t = v.target.expect("target");
        assert!(t.goto && t.name == "OTHER");

        let v = RuleView::from_args(&args("-p tcp --sport 1024: -m state --state ESTABLISHED -j ACCEPT"));
        assert_eq!(v.sports, Some(Neg { negated: false, value: vec![1024..=65535] }));
        assert!(v.states.expect("s").value.contains("ESTABLISHED"));

        let v = RuleView::from_args(&args(
            "-p udp -m udp ! --dport 53 -m multiport --sports 1,2 -m multiport --ports 5:6 -j DROP",
        ));
        assert_eq!(v.dports, Some(Neg { negated: true, value: vec![53..=53] }));
        assert_eq!(v.sports.expect("sports").value, vec![1..=1, 2..=2]);
        assert_eq!(v.any_ports.expect("ports").value, vec![5..=6]);

        let v = RuleView::from_args(&args("-s fd42::1/64 -d ::1/128 -p 17 -i eth+ -j ACCEPT"));
        assert_eq!(v.src.expect("src").value, Prefix::V6("fd42::".parse().expect("v6"), 64));
        assert_eq!(v.proto.expect("p").value, "udp");
        assert_eq!(v.in_iface.expect("iif").value, "eth+");

        let v = RuleView::from_args(&args("-s 10.0.0.0/255.255.0.0 -p all -j ACCEPT"));
        assert_eq!(v.src.expect("src").value, Prefix::V4([10, 0, 0, 0].into(), 16));
        assert_eq!(v.proto, None);
    }

    #[test]
    fn unknown_options_are_listed() {
        let v = RuleView::from_args(&args("-p tcp -m tcp --dport ssh --tcp-flags FIN,SYN,RST,ACK SYN -m recent --name x --rcheck -m comment --comment \"ctguard:tx\" -j DROP"));
        assert_eq!(v.unknown, vec!["--dport ssh", "--tcp-flags FIN,SYN,RST,ACK SYN", "-m recent --name x --rcheck"]);
        assert_eq!(v.comment.as_deref(), Some("ctguard:tx"));
        assert_eq!(v.dports, None);
        // A hostname or a non-contiguous mask cannot be evaluated.
        let v = RuleView::from_args(&args("-s example.org -d 10.0.0.0/255.0.255.0 -f -j ACCEPT"));
        assert_eq!(v.unknown, vec!["-s example.org", "-d 10.0.0.0/255.0.255.0", "-f"]);
        // `--dport` under a module that does not define it is not a port match.
        let v = RuleView::from_args(&args("-m conntrack --ctstate NEW --ctorigdstport 53 -j ACCEPT"));
        assert_eq!(v.unknown, vec!["--ctorigdstport 53"]);
        // A negated module (rare) is not understood.
        let v = RuleView::from_args(&args("-m comment --comment x -m addrtype ! --src-type LOCAL -j RETURN"));
        assert_eq!(v.unknown, vec!["-m addrtype ! --src-type LOCAL"]);
        // A generic option after a module not understood ends that module.
        let v = RuleView::from_args(&args("-m limit --limit 5/min ! -s 10.0.0.0/8 -j ACCEPT"));
        assert_eq!(v.unknown, vec!["-m limit --limit 5/min"]);
        assert_eq!(v.src, Some(Neg { negated: true, value: Prefix::V4([10, 0, 0, 0].into(), 8) }));
        // No target.
        assert_eq!(RuleView::from_args(&args("-p udp")).target, None);
    }
}
