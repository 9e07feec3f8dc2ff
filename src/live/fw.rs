//! A small, front-end-neutral model of filter chains: what the insertion planner and the lint
//! evaluate. nft JSON and iptables-save rules are both converted into it; anything a converter
//! does not understand becomes [`Cond::Opaque`] ("may or may not match"). Pure.

use std::fmt;

use crate::model::{PortRange, Prefix};

/// Which front end owns a chain, and so how ctguard may write into it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A native nftables table (`family` is `ip`, `ip6` or `inet`).
    Nft {
        /// nft family keyword.
        family: String,
        /// Table name.
        table: String,
    },
    /// An iptables table, through the given variant's tools.
    Iptables {
        /// `nft` or `legacy`.
        variant: IptVariant,
        /// IPv6 (`ip6tables`) when true.
        v6: bool,
        /// Table name (`filter`, `raw`, `nat`, …).
        table: String,
    },
}

impl Owner {
    /// The nf_tables (family, table) of an nft table or an iptables-nft one (`ip`/`ip6`);
    /// `None` for iptables-legacy, which nf_tables does not hold.
    pub fn nf_table(&self) -> Option<(String, String)> {
        match self {
            Owner::Nft { family, table } => Some((family.clone(), table.clone())),
            Owner::Iptables { variant: IptVariant::Nft, v6, table } => {
                Some((if *v6 { "ip6" } else { "ip" }.to_string(), table.clone()))
            }
            Owner::Iptables { variant: IptVariant::Legacy, .. } => None,
        }
    }
}

/// iptables variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptVariant {
    /// iptables-nft (x_tables rules stored in nf_tables).
    Nft,
    /// iptables-legacy (x_tables).
    Legacy,
}

impl IptVariant {
    /// Both variants.
    pub const ALL: [IptVariant; 2] = [IptVariant::Nft, IptVariant::Legacy];

    /// Suffix of the tool names (`iptables-nft-save`, `iptables-legacy-save`).
    pub fn as_str(self) -> &'static str {
        match self {
            IptVariant::Nft => "nft",
            IptVariant::Legacy => "legacy",
        }
    }

    /// The tool name for a family (`v6`) and `suffix` (`""`, `"-save"`, `"-restore"`), e.g.
    /// `ip6tables-legacy-restore`.
    pub fn tool(self, v6: bool, suffix: &str) -> String {
        format!("{}-{}{}", if v6 { "ip6tables" } else { "iptables" }, self.as_str(), suffix)
    }
}

impl Owner {
    /// Which address families packets in this owner's chains can have: (v4, v6).
    pub fn families(&self) -> (bool, bool) {
        match self {
            Owner::Nft { family, .. } => match family.as_str() {
                "ip" => (true, false),
                "ip6" => (false, true),
                "inet" => (true, true),
                _ => (false, false),
            },
            Owner::Iptables { v6, .. } => (!v6, *v6),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Nft { family, table } => write!(f, "nft {family} {table}"),
            Owner::Iptables { variant, v6, table } => {
                write!(f, "{}-{} {table}", if *v6 { "ip6tables" } else { "iptables" }, variant.as_str())
            }
        }
    }
}

/// Netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FwHook {
    /// prerouting
    Prerouting,
    /// input
    Input,
    /// forward
    Forward,
    /// output
    Output,
    /// postrouting
    Postrouting,
}

impl FwHook {
    /// Parses nft's hook name or an iptables built-in chain name.
    pub fn parse(s: &str) -> Option<FwHook> {
        Some(match s {
            "prerouting" | "PREROUTING" => FwHook::Prerouting,
            "input" | "INPUT" => FwHook::Input,
            "forward" | "FORWARD" => FwHook::Forward,
            "output" | "OUTPUT" => FwHook::Output,
            "postrouting" | "POSTROUTING" => FwHook::Postrouting,
            _ => return None,
        })
    }
}

/// Base chain type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainKind {
    /// filter
    Filter,
    /// nat
    Nat,
    /// route / mangle / raw / security and anything else
    Other,
}

/// A verdict or statement that ends (or not) evaluation of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// accept / ACCEPT
    Accept,
    /// drop / DROP
    Drop,
    /// reject / REJECT
    Reject,
    /// jump CHAIN / -j CHAIN
    Jump(String),
    /// goto CHAIN / -g CHAIN
    Goto(String),
    /// return / RETURN
    Return,
    /// dnat / DNAT
    Dnat,
    /// redirect / REDIRECT
    Redirect,
    /// snat / SNAT
    Snat,
    /// masquerade / MASQUERADE
    Masquerade,
    /// No verdict (counter, log, …): evaluation continues.
    Continue,
    /// Something else terminal or unknown (queue, TPROXY, …).
    Other(String),
}

/// One condition of a rule. `neg` inverts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// Layer-4 protocol number in the list.
    Proto {
        /// Negated.
        neg: bool,
        /// IP protocol numbers.
        protos: Vec<u8>,
    },
    /// Destination port in the ranges.
    Dport {
        /// Negated.
        neg: bool,
        /// Ranges.
        ranges: Vec<PortRange>,
    },
    /// Source port in the ranges.
    Sport {
        /// Negated.
        neg: bool,
        /// Ranges.
        ranges: Vec<PortRange>,
    },
    /// Source address in the prefixes (all of one family).
    Saddr {
        /// Negated.
        neg: bool,
        /// Prefixes.
        prefixes: Vec<Prefix>,
    },
    /// Destination address in the prefixes.
    Daddr {
        /// Negated.
        neg: bool,
        /// Prefixes.
        prefixes: Vec<Prefix>,
    },
    /// Packet family is IPv6 (true) or IPv4 (false).
    Family {
        /// IPv6 when true.
        v6: bool,
    },
    /// Input interface name in the list.
    Iif {
        /// Negated.
        neg: bool,
        /// Names.
        names: Vec<String>,
    },
    /// Output interface name in the list.
    Oif {
        /// Negated.
        neg: bool,
        /// Names.
        names: Vec<String>,
    },
    /// Conntrack state in the list (`new`, `established`, `related`, `invalid`, `untracked`).
    CtState {
        /// Negated.
        neg: bool,
        /// States, lower case.
        states: Vec<String>,
    },
    /// A lookup in a named set of the rule's own nft table (`ip saddr @trusted`): evaluated as
    /// `inner` (the set's elements as read), repeated by name in an inserted rule, so that
    /// later changes to the set apply to the inserted rule too.
    Named {
        /// The set's name (without `@`).
        name: String,
        /// The same match with the set's elements as read.
        inner: Box<Cond>,
    },
    /// Anything else; may or may not match. The text says what.
    Opaque(String),
}

/// A rule in the neutral model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwRule {
    /// All must hold.
    pub conds: Vec<Cond>,
    /// What happens when they do.
    pub verdict: Verdict,
    /// nft rule handle (a hint: DESIGN §1).
    pub handle: Option<u64>,
    /// 1-based position in its chain (iptables `-I CHAIN N`).
    pub index: usize,
    /// The rule as the operator knows it (nft text or iptables-save line), for findings.
    pub text: String,
    /// The rule's comment, if any.
    pub comment: Option<String>,
}

/// A chain in the neutral model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwChain {
    /// Owning table.
    pub owner: Owner,
    /// Chain name.
    pub name: String,
    /// Hook for base chains.
    pub hook: Option<FwHook>,
    /// Base chain type.
    pub kind: ChainKind,
    /// Priority (nft) — iptables chains get their table's standard priority.
    pub priority: i32,
    /// Base chain policy: true = accept. `None` for user chains.
    pub policy_accept: Option<bool>,
    /// Rules in order.
    pub rules: Vec<FwRule>,
}

impl FwChain {
    /// `OWNER CHAIN`, e.g. `nft inet host input`.
    pub fn label(&self) -> String {
        format!("{} {}", self.owner, self.name)
    }
}

/// A table's chains, so jumps can be followed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FwTables {
    /// Every chain of every table.
    pub chains: Vec<FwChain>,
}

impl FwTables {
    /// The chain `name` in `owner`'s table.
    pub fn find(&self, owner: &Owner, name: &str) -> Option<&FwChain> {
        self.chains.iter().find(|c| &c.owner == owner && c.name == name)
    }
    /// Base chains with the given type and hook.
    pub fn base_chains(&self, kind: ChainKind, hook: FwHook) -> impl Iterator<Item = &FwChain> {
        self.chains.iter().filter(move |c| c.kind == kind && c.hook == Some(hook))
    }
}
