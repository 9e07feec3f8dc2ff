//! A policy's NOTRACK part as `iptables-restore --noflush` text for one address family, and the
//! argument vectors of the `ct state untracked` accept rules (DESIGN §1, §6). Pure.
//!
//! The text only declares ctguard's own chains in `*raw` (`:CTGUARD-PRE - [0:0]` creates the
//! chain or empties it; `-N` would fail on re-apply) and appends rules to them. It never
//! declares or flushes a built-in chain, so loaded with `--noflush` it leaves every other rule
//! alone. The jumps from `PREROUTING`/`OUTPUT` are kept apart ([`Jump`]): the apply step adds
//! one only where `iptables -C` finds none.
//!
//! Rules are rendered in the order and spelling `iptables-save` prints them back (addresses
//! with their prefix length, `-s/-d -i/-o -p`, then the matches, comments quoted the way
//! `xtables_save_string` quotes them), so the `-A` lines of [`NotrackRules::restore_text`] are
//! byte-for-byte the lines a later `iptables-save` shows (measured on iptables 1.8.9, both
//! variants; checked by the kernel tests).

use std::fmt::Write as _;

use crate::model::names::{IfName, Tag};
use crate::model::{NotrackRule, Policy, PortRange, Prefix, Proto};

/// ctguard's chain in `raw` reached from `PREROUTING`.
pub const CHAIN_PRE: &str = "CTGUARD-PRE";
/// ctguard's chain in `raw` reached from `OUTPUT`.
pub const CHAIN_OUT: &str = "CTGUARD-OUT";
/// The table ctguard's NOTRACK chains live in.
pub const RAW_TABLE: &str = "raw";
/// Most ports one `-m multiport` match takes; a range counts two (kernel `XT_MULTI_PORTS`).
pub const MULTIPORT_MAX: usize = 15;

/// An address family, i.e. which tool set (`iptables*` or `ip6tables*`) a text is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4: `iptables`, `iptables-save`, `iptables-restore`.
    V4,
    /// IPv6: `ip6tables`, `ip6tables-save`, `ip6tables-restore`.
    V6,
}

impl IpFamily {
    /// Both families, IPv4 first (the order ctguard applies them in).
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// Prefix of the tool names: `iptables` or `ip6tables`.
    pub fn tool_prefix(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        }
    }

    /// True when `p` belongs to this family.
    pub fn contains(self, p: &Prefix) -> bool {
        p.is_v6() == (self == IpFamily::V6)
    }
}

/// Which side of the host a filter rule sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `INPUT` (and the input hook): matches destination port, source address, `-i`.
    Input,
    /// `OUTPUT`: matches source port, destination address, `-o`.
    Output,
}

/// One rule for a given chain, as `iptables` arguments after `-A CHAIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// Chain the rule is appended to.
    pub chain: String,
    /// Arguments after `-A CHAIN` (matches and target), one string per argument.
    pub args: Vec<String>,
}

impl RuleSpec {
    /// The `-A CHAIN …` line for iptables-restore, quoted as [`spec_to_line`] does.
    pub fn append_line(&self) -> String {
        format!("-A {} {}", self.chain, spec_to_line(&self.args))
    }
}

/// A jump from a built-in chain of `raw` to one of ctguard's chains: `-I FROM 1 -j TO`.
///
/// It carries no comment on purpose: the jump is identified by its target (a `CTGUARD-*`
/// chain only ctguard creates), so a re-apply under another transaction id finds it with
/// `-C` instead of adding a second one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    /// Table, always [`RAW_TABLE`].
    pub table: &'static str,
    /// Built-in chain the jump is inserted into (`PREROUTING` or `OUTPUT`).
    pub from: &'static str,
    /// ctguard's chain ([`CHAIN_PRE`] or [`CHAIN_OUT`]).
    pub to: &'static str,
}

impl Jump {
    /// The rule's arguments without the chain: `-j TO` (what `-C FROM`, `-D FROM` take).
    pub fn spec(&self) -> Vec<String> {
        vec!["-j".to_string(), self.to.to_string()]
    }

    /// The restore line inserting it first in its chain: `-I FROM 1 -j TO`.
    pub fn insert_line(&self) -> String {
        format!("-I {} 1 -j {}", self.from, self.to)
    }
}

/// ctguard's NOTRACK rules for one family: the two chains' contents plus the jumps to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotrackRules {
    /// The family the rules are for.
    pub family: IpFamily,
    /// Rules of [`CHAIN_PRE`] then [`CHAIN_OUT`], in order.
    pub rules: Vec<RuleSpec>,
    /// `PREROUTING → CTGUARD-PRE` and `OUTPUT → CTGUARD-OUT`.
    pub jumps: Vec<Jump>,
}

impl NotrackRules {
    /// True when the policy gives this family no rule (the chains would be empty).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rules of one chain, in order.
    pub fn chain_rules<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a RuleSpec> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }

    /// The `iptables-restore --noflush` text: `*raw`, both chains declared (created or
    /// emptied), their rules, then `jumps` (pass those `iptables -C` did not find; `&[]` for
    /// none, `&self.jumps` for all), `COMMIT`.
    pub fn restore_text(&self, jumps: &[Jump]) -> String {
        let mut s = format!("*{RAW_TABLE}\n:{CHAIN_PRE} - [0:0]\n:{CHAIN_OUT} - [0:0]\n");
        for r in &self.rules {
            s.push_str(&r.append_line());
            s.push('\n');
        }
        for j in jumps {
            s.push_str(&j.insert_line());
            s.push('\n');
        }
        s.push_str("COMMIT\n");
        s
    }

    /// [`Self::restore_text`] with every jump (for a namespace known to have none).
    pub fn restore_text_with_jumps(&self) -> String {
        self.restore_text(&self.jumps)
    }
}

/// The jumps ctguard needs in `raw`: `PREROUTING → CTGUARD-PRE`, `OUTPUT → CTGUARD-OUT`.
pub fn jumps() -> Vec<Jump> {
    vec![
        Jump { table: RAW_TABLE, from: "PREROUTING", to: CHAIN_PRE },
        Jump { table: RAW_TABLE, from: "OUTPUT", to: CHAIN_OUT },
    ]
}

/// Renders the NOTRACK rules of `policy` for `family`; every rule carries `tag` as comment.
///
/// Per entry, source prefix of the family (or any source when `sources` is empty; an entry
/// whose sources are all of the other family gives no rule here), protocol, interface (or
/// any) and `multiport` chunk of at most [`MULTIPORT_MAX`] ports:
/// - `CTGUARD-PRE`: `[-s SRC] [-i IF] -p P -m multiport --dports … [-m addrtype --dst-type
///   LOCAL] -m comment --comment TAG -j CT --notrack`;
/// - `CTGUARD-OUT`: `[-d SRC] [-o IF] -p P -m multiport --sports … -m comment … -j CT
///   --notrack`;
/// - and when the entry covers loopback, once per source/protocol/chunk in `CTGUARD-OUT`:
///   `[-s SRC] -o lo -p P -m multiport --dports …` (local queries are classified at output
///   before prerouting sees them, DESIGN §6).
pub fn notrack_rules(policy: &Policy, family: IpFamily, tag: &Tag) -> NotrackRules {
    let mut pre = Vec::new();
    let mut out = Vec::new();
    for n in &policy.notrack {
        if n.queries() {
            querying_rules(n, family, tag, &mut pre, &mut out);
        }
        if !n.serves() {
            continue;
        }
        for src in family_sources(n, family) {
            for &proto in &n.protocols {
                for chunk in multiport_chunks(&n.ports) {
                    for iface in iface_options(n) {
                        let mut a = Args::default();
                        a.addr("-s", src);
                        a.iface("-i", iface);
                        a.ports(proto, "--dports", &chunk);
                        if n.local_only {
                            a.push_all(&["-m", "addrtype", "--dst-type", "LOCAL"]);
                        }
                        a.notrack(tag);
                        pre.push(RuleSpec { chain: CHAIN_PRE.into(), args: a.0 });

                        let mut a = Args::default();
                        a.addr("-d", src);
                        a.iface("-o", iface);
                        a.ports(proto, "--sports", &chunk);
                        a.notrack(tag);
                        out.push(RuleSpec { chain: CHAIN_OUT.into(), args: a.0 });
                    }
                    if n.covers_loopback() {
                        let mut a = Args::default();
                        a.addr("-s", src);
                        a.push_all(&["-o", "lo"]);
                        a.ports(proto, "--dports", &chunk);
                        a.notrack(tag);
                        out.push(RuleSpec { chain: CHAIN_OUT.into(), args: a.0 });
                    }
                }
            }
        }
    }
    pre.extend(out);
    NotrackRules { family, rules: pre, jumps: jumps() }
}

/// The NOTRACK rules of a querying entry (side `querying`/`both`) for `family`, per upstream
/// prefix of the family, protocol, interface and `multiport` chunk:
/// - `CTGUARD-OUT`: `-d UP [-o IF] -p P -m multiport --dports … -j CT --notrack` (the queries);
/// - `CTGUARD-PRE`: `-s UP [-i IF] -p P -m multiport --sports … -m addrtype --dst-type LOCAL
///   -j CT --notrack` (the answers, to this host only).
fn querying_rules(n: &NotrackRule, family: IpFamily, tag: &Tag, pre: &mut Vec<RuleSpec>, out: &mut Vec<RuleSpec>) {
    for up in n.upstreams.iter().filter(|p| family.contains(p)) {
        for &proto in &n.protocols {
            for chunk in multiport_chunks(&n.ports) {
                for iface in iface_options(n) {
                    let mut a = Args::default();
                    a.addr("-d", Some(up));
                    a.iface("-o", iface);
                    a.ports(proto, "--dports", &chunk);
                    a.notrack(tag);
                    out.push(RuleSpec { chain: CHAIN_OUT.into(), args: a.0 });

                    let mut a = Args::default();
                    a.addr("-s", Some(up));
                    a.iface("-i", iface);
                    a.ports(proto, "--sports", &chunk);
                    a.push_all(&["-m", "addrtype", "--dst-type", "LOCAL"]);
                    a.notrack(tag);
                    pre.push(RuleSpec { chain: CHAIN_PRE.into(), args: a.0 });
                }
            }
        }
    }
}

/// The accept rules of a querying entry for one filter chain (the planner's query/answer
/// directions), as argument vectors without `-A/-I CHAIN`: [`Direction::Output`] (the queries)
/// `-d UP [-o IF] -p P -m multiport --dports …`, [`Direction::Input`] (the answers) `-s UP [-i
/// IF] -p P -m multiport --sports …`, then `-m conntrack --ctstate UNTRACKED -m comment
/// --comment TAG -j ACCEPT`. Always restricted to the upstream prefixes of the family (none:
/// empty), never a bare source-port accept.
pub fn accept_querying_specs(rule: &NotrackRule, family: IpFamily, dir: Direction, tag: &Tag) -> Vec<Vec<String>> {
    let mut specs = Vec::new();
    let (addr, ifopt, ports) = match dir {
        Direction::Output => ("-d", "-o", "--dports"),
        Direction::Input => ("-s", "-i", "--sports"),
    };
    for up in rule.upstreams.iter().filter(|p| family.contains(p)) {
        for &proto in &rule.protocols {
            for chunk in multiport_chunks(&rule.ports) {
                for iface in iface_options(rule) {
                    let mut a = Args::default();
                    a.addr(addr, Some(up));
                    a.iface(ifopt, iface);
                    a.ports(proto, ports, &chunk);
                    a.untracked_accept(tag);
                    specs.push(a.0);
                }
            }
        }
    }
    specs
}

/// The accept rules DESIGN §6 inserts into a filter chain for one NOTRACK entry, as argument
/// vectors without `-A/-I CHAIN`:
/// `[-s|-d SRC] [-i|-o IF] -p P -m multiport --dports|--sports … -m conntrack --ctstate
/// UNTRACKED -m comment --comment TAG -j ACCEPT`.
///
/// [`Direction::Input`] matches destination port, source address and `-i`;
/// [`Direction::Output`] source port, destination address and `-o`. With `loopback` the
/// reverse-direction pair on `lo` is returned instead (local client to local server): input
/// `-d SRC -i lo` + source port (the replies), output `-s SRC -o lo` + destination port (the
/// queries) — empty when the entry does not cover loopback. Empty as well when the entry's
/// sources are all of the other family.
pub fn accept_untracked_specs(
    rule: &NotrackRule,
    family: IpFamily,
    dir: Direction,
    loopback: bool,
    tag: &Tag,
) -> Vec<Vec<String>> {
    let mut specs = Vec::new();
    if loopback && !rule.covers_loopback() {
        return specs;
    }
    let lo = [None];
    let ifaces: Vec<Option<&IfName>> = if loopback { lo.to_vec() } else { iface_options(rule) };
    for src in family_sources(rule, family) {
        for &proto in &rule.protocols {
            for chunk in multiport_chunks(&rule.ports) {
                for &iface in &ifaces {
                    let mut a = Args::default();
                    // (address option, interface option, port option)
                    let (addr, ifopt, ports) = match (dir, loopback) {
                        (Direction::Input, false) => ("-s", "-i", "--dports"),
                        (Direction::Output, false) => ("-d", "-o", "--sports"),
                        (Direction::Input, true) => ("-d", "-i", "--sports"),
                        (Direction::Output, true) => ("-s", "-o", "--dports"),
                    };
                    a.addr(addr, src);
                    if loopback {
                        a.push_all(&[ifopt, "lo"]);
                    } else {
                        a.iface(ifopt, iface);
                    }
                    a.ports(proto, ports, &chunk);
                    a.untracked_accept(tag);
                    specs.push(a.0);
                }
            }
        }
    }
    specs
}

/// Splits a merged port list into `multiport` lists of at most [`MULTIPORT_MAX`] entries,
/// a range counting two. Order is kept.
pub fn multiport_chunks(ports: &[PortRange]) -> Vec<Vec<PortRange>> {
    let mut chunks: Vec<Vec<PortRange>> = Vec::new();
    let mut cur = Vec::new();
    let mut weight = 0;
    for p in ports {
        if weight + p.multiport_weight() > MULTIPORT_MAX {
            chunks.push(std::mem::take(&mut cur));
            weight = 0;
        }
        weight += p.multiport_weight();
        cur.push(*p);
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

/// A port list in `multiport` syntax: `53,1000:2000`.
pub fn multiport_list(ports: &[PortRange]) -> String {
    let mut s = String::new();
    for (i, p) in ports.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        if p.is_single() {
            let _ = write!(s, "{}", p.lo);
        } else {
            let _ = write!(s, "{}:{}", p.lo, p.hi);
        }
    }
    s
}

/// A prefix as `iptables-save` prints it: always with its length (`10.0.0.1/32`, `fd42::/64`).
pub fn prefix_arg(p: &Prefix) -> String {
    match p {
        Prefix::V4(a, l) => format!("{a}/{l}"),
        Prefix::V6(a, l) => format!("{a}/{l}"),
    }
}

/// Joins one rule's arguments into an iptables-restore line.
///
/// An argument is written bare when the restore tokenizer reads it back unchanged (non-empty,
/// no whitespace, no `"`, `'`, `\`, not starting with `#`); otherwise in double quotes with `"`,
/// `'` and `\` escaped by a backslash. The value of `--comment` and `--log-prefix` follows
/// `iptables-save`'s own rule (bare only when made of `[A-Za-z0-9_-]`), so rendered lines
/// match what a save prints.
pub fn spec_to_line(args: &[String]) -> String {
    let mut s = String::new();
    let mut prev: Option<&str> = None;
    for a in args {
        if !s.is_empty() {
            s.push(' ');
        }
        let save_style = matches!(prev, Some("--comment" | "--log-prefix" | "--nflog-prefix"));
        let bare = if save_style {
            !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        } else {
            !a.is_empty()
                && !a.starts_with('#')
                && !a.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\'))
        };
        if bare {
            s.push_str(a);
        } else {
            s.push('"');
            for c in a.chars() {
                if matches!(c, '"' | '\'' | '\\') {
                    s.push('\\');
                }
                s.push(c);
            }
            s.push('"');
        }
        prev = Some(a.as_str());
    }
    s
}

/// Source prefixes of `family` as options: `[None]` (any source) when the entry has no
/// sources, nothing when all its sources are of the other family.
fn family_sources(n: &NotrackRule, family: IpFamily) -> Vec<Option<&Prefix>> {
    if n.sources.is_empty() {
        vec![None]
    } else {
        n.sources.iter().filter(|p| family.contains(p)).map(Some).collect()
    }
}

/// `[None]` (any interface) or one option per listed interface.
fn iface_options(n: &NotrackRule) -> Vec<Option<&IfName>> {
    if n.interfaces.is_empty() {
        vec![None]
    } else {
        n.interfaces.iter().map(Some).collect()
    }
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push_all(&mut self, a: &[&str]) {
        self.0.extend(a.iter().map(|s| s.to_string()));
    }
    fn addr(&mut self, opt: &str, p: Option<&Prefix>) {
        if let Some(p) = p {
            self.0.push(opt.to_string());
            self.0.push(prefix_arg(p));
        }
    }
    fn iface(&mut self, opt: &str, i: Option<&IfName>) {
        if let Some(i) = i {
            self.push_all(&[opt, i.as_str()]);
        }
    }
    fn ports(&mut self, proto: Proto, opt: &str, chunk: &[PortRange]) {
        self.push_all(&["-p", proto.as_str(), "-m", "multiport", opt]);
        self.0.push(multiport_list(chunk));
    }
    /// `-m conntrack --ctstate UNTRACKED -m comment --comment TAG -j ACCEPT`: the tail of every
    /// accept ctguard inserts.
    fn untracked_accept(&mut self, tag: &Tag) {
        self.push_all(&["-m", "conntrack", "--ctstate", "UNTRACKED"]);
        self.push_all(&["-m", "comment", "--comment", tag.as_str(), "-j", "ACCEPT"]);
    }

    fn notrack(&mut self, tag: &Tag) {
        self.push_all(&["-m", "comment", "--comment", tag.as_str(), "-j", "CT", "--notrack"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_policy, Format};

    fn policy(body: &str) -> Policy {
        parse_policy(body, Format::Toml).expect("valid policy")
    }

    fn lines(r: &NotrackRules) -> Vec<String> {
        r.rules.iter().map(RuleSpec::append_line).collect()
    }

    const C: &str = "-m comment --comment \"ctguard:preview\"";

    #[test]
    fn builtin_policy_v4() {
        let r = notrack_rules(&Policy::builtin(), IpFamily::V4, &Tag::preview());
        let l = lines(&r);
        assert_eq!(
            l,
            vec![
                format!(
                    "-A CTGUARD-PRE -p tcp -m multiport --dports 53 -m addrtype --dst-type LOCAL {C} -j CT --notrack"
                ),
                format!(
                    "-A CTGUARD-PRE -p udp -m multiport --dports 53 -m addrtype --dst-type LOCAL {C} -j CT --notrack"
                ),
                format!("-A CTGUARD-OUT -p tcp -m multiport --sports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -o lo -p tcp -m multiport --dports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -p udp -m multiport --sports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -o lo -p udp -m multiport --dports 53 {C} -j CT --notrack"),
            ]
        );
        // Same rules for v6 when no sources restrict the family.
        assert_eq!(lines(&notrack_rules(&Policy::builtin(), IpFamily::V6, &Tag::preview())), l);
    }

    #[test]
    fn restore_text_declares_chains_and_optional_jumps() {
        let r = notrack_rules(&Policy::builtin(), IpFamily::V4, &Tag::preview());
        let t = r.restore_text(&[]);
        assert!(t.starts_with("*raw\n:CTGUARD-PRE - [0:0]\n:CTGUARD-OUT - [0:0]\n-A CTGUARD-PRE "), "{t}");
        assert!(t.ends_with("--notrack\nCOMMIT\n"), "{t}");
        assert!(!t.contains("-I "), "{t}");
        assert!(!t.contains("-N ") && !t.contains("-F") && !t.contains(":PREROUTING") && !t.contains(":OUTPUT"));
        let t = r.restore_text_with_jumps();
        assert!(t.ends_with("-I PREROUTING 1 -j CTGUARD-PRE\n-I OUTPUT 1 -j CTGUARD-OUT\nCOMMIT\n"), "{t}");
        let only_out = r.restore_text(&r.jumps[1..]);
        assert!(only_out.contains("-I OUTPUT 1 -j CTGUARD-OUT\n") && !only_out.contains("-I PREROUTING"));
        assert_eq!(r.jumps[0].spec(), vec!["-j", "CTGUARD-PRE"]);
        assert_eq!(r.jumps[1].from, "OUTPUT");
    }

    #[test]
    fn multiport_splits_at_fifteen_with_ranges_counting_two() {
        let singles: Vec<PortRange> = (1..=16).map(PortRange::single).collect();
        let c = multiport_chunks(&singles);
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![15, 1]);
        // 7 ranges (14) + 1 single = 15 fits; an 8th range does not.
        let mut v: Vec<PortRange> = (1..=7).map(|i| PortRange { lo: i * 10, hi: i * 10 + 1 }).collect();
        v.push(PortRange::single(100));
        assert_eq!(multiport_chunks(&v).len(), 1);
        let mut w: Vec<PortRange> = (1..=8).map(|i| PortRange { lo: i * 10, hi: i * 10 + 1 }).collect();
        w.push(PortRange::single(100));
        let c = multiport_chunks(&w);
        assert_eq!(c.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![7, 2]);
        for chunk in &c {
            assert!(chunk.iter().map(PortRange::multiport_weight).sum::<usize>() <= MULTIPORT_MAX);
        }
        // 14 singles then a range: the range starts a new chunk.
        let mut x: Vec<PortRange> = (1..=14).map(PortRange::single).collect();
        x.push(PortRange { lo: 100, hi: 200 });
        assert_eq!(multiport_chunks(&x).iter().map(Vec::len).collect::<Vec<_>>(), vec![14, 1]);
        assert_eq!(multiport_list(&[PortRange::single(53), PortRange { lo: 1000, hi: 2000 }]), "53,1000:2000");
    }

    #[test]
    fn split_ports_render_several_rules() {
        let ports: Vec<String> = (1..=20).map(|p| (p * 100).to_string()).collect();
        let p = policy(&format!(
            "[[notrack]]\nprotocols=[\"udp\"]\nports=[{}, \"5000-5010\"]\nlocal_only=false\ninterfaces=[\"eth0\"]\n",
            ports.join(",")
        ));
        let r = notrack_rules(&p, IpFamily::V4, &Tag::preview());
        let pre: Vec<_> = r.chain_rules(CHAIN_PRE).map(RuleSpec::append_line).collect();
        assert_eq!(
            pre,
            vec![
                format!("-A CTGUARD-PRE -i eth0 -p udp -m multiport --dports 100,200,300,400,500,600,700,800,900,1000,1100,1200,1300,1400,1500 {C} -j CT --notrack"),
                format!("-A CTGUARD-PRE -i eth0 -p udp -m multiport --dports 1600,1700,1800,1900,2000,5000:5010 {C} -j CT --notrack"),
            ]
        );
        // eth0 only: no loopback rule.
        assert_eq!(r.chain_rules(CHAIN_OUT).count(), 2);
        assert!(r.rules.iter().all(|x| !x.args.contains(&"lo".to_string())));
    }

    #[test]
    fn sources_are_per_family_and_per_prefix() {
        let p = policy(
            "[[notrack]]\nprotocols=[\"udp\"]\nports=[53]\nsources=[\"10.0.0.0/8\",\"192.0.2.7\",\"fd42::/64\"]\n",
        );
        let v4 = lines(&notrack_rules(&p, IpFamily::V4, &Tag::preview()));
        assert_eq!(
            v4,
            vec![
                format!("-A CTGUARD-PRE -s 10.0.0.0/8 -p udp -m multiport --dports 53 -m addrtype --dst-type LOCAL {C} -j CT --notrack"),
                format!("-A CTGUARD-PRE -s 192.0.2.7/32 -p udp -m multiport --dports 53 -m addrtype --dst-type LOCAL {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -d 10.0.0.0/8 -p udp -m multiport --sports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -s 10.0.0.0/8 -o lo -p udp -m multiport --dports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -d 192.0.2.7/32 -p udp -m multiport --sports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -s 192.0.2.7/32 -o lo -p udp -m multiport --dports 53 {C} -j CT --notrack"),
            ]
        );
        let v6 = lines(&notrack_rules(&p, IpFamily::V6, &Tag::preview()));
        assert_eq!(v6.len(), 3);
        assert!(v6[0].starts_with("-A CTGUARD-PRE -s fd42::/64 -p udp"), "{v6:?}");
        assert!(v6[1].starts_with("-A CTGUARD-OUT -d fd42::/64 -p udp"), "{v6:?}");
        assert!(v6[2].starts_with("-A CTGUARD-OUT -s fd42::/64 -o lo -p udp"), "{v6:?}");

        // Only v4 sources: the v6 family gets nothing at all (not "any source").
        let p = policy("[[notrack]]\nprotocols=[\"udp\"]\nports=[53]\nsources=[\"10.0.0.0/8\"]\n");
        let r6 = notrack_rules(&p, IpFamily::V6, &Tag::preview());
        assert!(r6.is_empty());
        assert_eq!(r6.restore_text(&[]), "*raw\n:CTGUARD-PRE - [0:0]\n:CTGUARD-OUT - [0:0]\nCOMMIT\n");
    }

    #[test]
    fn interfaces_one_rule_each_and_loopback_once() {
        let p =
            policy("[[notrack]]\nprotocols=[\"tcp\"]\nports=[53]\ninterfaces=[\"eth0\",\"lo\"]\nlocal_only=false\n");
        let l = lines(&notrack_rules(&p, IpFamily::V4, &Tag::preview()));
        assert_eq!(
            l,
            vec![
                format!("-A CTGUARD-PRE -i eth0 -p tcp -m multiport --dports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-PRE -i lo -p tcp -m multiport --dports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -o eth0 -p tcp -m multiport --sports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -o lo -p tcp -m multiport --sports 53 {C} -j CT --notrack"),
                format!("-A CTGUARD-OUT -o lo -p tcp -m multiport --dports 53 {C} -j CT --notrack"),
            ]
        );
    }

    #[test]
    fn accept_specs_both_directions_and_loopback() {
        let p = policy("[[notrack]]\nprotocols=[\"udp\"]\nports=[53,\"5300-5301\"]\nsources=[\"10.0.0.0/8\"]\n");
        let n = &p.notrack[0];
        let t = Tag::new("tx1").expect("tag");
        let j = |v: Vec<Vec<String>>| v.iter().map(|a| spec_to_line(a)).collect::<Vec<_>>();
        let tail = "-m conntrack --ctstate UNTRACKED -m comment --comment \"ctguard:tx1\" -j ACCEPT";
        assert_eq!(
            j(accept_untracked_specs(n, IpFamily::V4, Direction::Input, false, &t)),
            vec![format!("-s 10.0.0.0/8 -p udp -m multiport --dports 53,5300:5301 {tail}")]
        );
        assert_eq!(
            j(accept_untracked_specs(n, IpFamily::V4, Direction::Output, false, &t)),
            vec![format!("-d 10.0.0.0/8 -p udp -m multiport --sports 53,5300:5301 {tail}")]
        );
        assert_eq!(
            j(accept_untracked_specs(n, IpFamily::V4, Direction::Input, true, &t)),
            vec![format!("-d 10.0.0.0/8 -i lo -p udp -m multiport --sports 53,5300:5301 {tail}")]
        );
        assert_eq!(
            j(accept_untracked_specs(n, IpFamily::V4, Direction::Output, true, &t)),
            vec![format!("-s 10.0.0.0/8 -o lo -p udp -m multiport --dports 53,5300:5301 {tail}")]
        );
        assert!(accept_untracked_specs(n, IpFamily::V6, Direction::Input, false, &t).is_empty());

        let p = policy("[[notrack]]\nprotocols=[\"udp\",\"tcp\"]\nports=[53]\ninterfaces=[\"eth0\",\"eth1\"]\n");
        let n = &p.notrack[0];
        let v = accept_untracked_specs(n, IpFamily::V6, Direction::Input, false, &t);
        assert_eq!(v.len(), 4);
        assert_eq!(v[0][..6], ["-i", "eth0", "-p", "tcp", "-m", "multiport"]);
        assert!(accept_untracked_specs(n, IpFamily::V6, Direction::Input, true, &t).is_empty());
    }

    #[test]
    fn quoting() {
        let s = |v: &[&str]| spec_to_line(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["-m", "comment", "--comment", "plain"]), "-m comment --comment plain");
        assert_eq!(s(&["--comment", "ctguard:x"]), "--comment \"ctguard:x\"");
        assert_eq!(s(&["--comment", "a \"q\" x\\y"]), r#"--comment "a \"q\" x\\y""#);
        assert_eq!(s(&["--comment", ""]), "--comment \"\"");
        assert_eq!(s(&["--log-prefix", "dropped: "]), "--log-prefix \"dropped: \"");
        assert_eq!(s(&["-s", "10.0.0.0/8", "--dports", "53,1000:2000"]), "-s 10.0.0.0/8 --dports 53,1000:2000");
        assert_eq!(s(&["--foo", "it's"]), r#"--foo "it\'s""#);
        assert_eq!(s(&["--foo", "#x"]), "--foo \"#x\"");
        assert_eq!(s(&["--foo", "a\tb"]), "--foo \"a\tb\"");
    }

    #[test]
    fn quoting_round_trips_through_the_save_parser() {
        use crate::live::iptables_save::tokenize;
        for v in [
            vec!["-m", "comment", "--comment", "a \"q\" x\\y  z"],
            vec!["--comment", ""],
            vec!["--x", "it's", "--y", "#z", "w"],
        ] {
            let args: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            assert_eq!(tokenize(&spec_to_line(&args)).expect("tokenizes"), args);
        }
    }
}
