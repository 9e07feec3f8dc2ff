//! The validated policy (DESIGN §6). Every value here has passed [`super::validate`]: ports are
//! in range and merged, prefixes have no host bits, names are safe to put into a ruleset.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::names::{IfName, SysctlKey};

/// Which netfilter front end creates ctguard's NOTRACK objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// `nft` when it works on this machine, else iptables-nft, else iptables-legacy.
    Auto,
    /// `table inet ctguard` through one netlink batch.
    Nft,
    /// `CTGUARD-*` chains in the iptables-nft raw table.
    IptablesNft,
    /// `CTGUARD-*` chains in the legacy (x_tables) raw table.
    IptablesLegacy,
}

impl Backend {
    /// The name used in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
        }
    }
}

/// A transport protocol ctguard can notrack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Proto {
    /// Lower-case name as nft and iptables spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
    /// Parses `tcp` / `udp` (lower case only, as in the policy schema).
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range; `lo == hi` for a single port. Never contains port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    /// First port, inclusive.
    pub lo: u16,
    /// Last port, inclusive.
    pub hi: u16,
}

impl PortRange {
    /// A single port.
    pub fn single(p: u16) -> Self {
        PortRange { lo: p, hi: p }
    }
    /// True when `p` lies in the range.
    pub fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
    /// True when the range is one port.
    pub fn is_single(&self) -> bool {
        self.lo == self.hi
    }
    /// How many entries `iptables -m multiport` counts for this item (a range counts two).
    pub fn multiport_weight(&self) -> usize {
        if self.is_single() {
            1
        } else {
            2
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// An IPv4 or IPv6 network prefix with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Prefix {
    /// IPv4 network and prefix length (0..=32).
    V4(Ipv4Addr, u8),
    /// IPv6 network and prefix length (0..=128).
    V6(Ipv6Addr, u8),
}

impl Prefix {
    /// True for IPv6.
    pub fn is_v6(&self) -> bool {
        matches!(self, Prefix::V6(..))
    }
    /// Prefix length.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        match self {
            Prefix::V4(_, l) | Prefix::V6(_, l) => *l,
        }
    }
    /// True when the prefix is a single host (/32 or /128).
    pub fn is_host(&self) -> bool {
        match self {
            Prefix::V4(_, l) => *l == 32,
            Prefix::V6(_, l) => *l == 128,
        }
    }
    /// True when `other` lies entirely inside `self` (same family).
    pub fn covers(&self, other: &Prefix) -> bool {
        match (self, other) {
            (Prefix::V4(a, la), Prefix::V4(b, lb)) => la <= lb && mask_v4(u32::from(*b), *la) == u32::from(*a),
            (Prefix::V6(a, la), Prefix::V6(b, lb)) => la <= lb && mask_v6(u128::from(*b), *la) == u128::from(*a),
            _ => false,
        }
    }
    /// First and last address of the prefix as 128-bit integers (IPv4 in the low 32 bits).
    pub fn bounds(&self) -> (u128, u128) {
        match self {
            Prefix::V4(a, l) => {
                let lo = u32::from(*a);
                let span = if *l == 0 { u32::MAX } else { (1u32 << (32 - l)).wrapping_sub(1) };
                (lo as u128, (lo | span) as u128)
            }
            Prefix::V6(a, l) => {
                let lo = u128::from(*a);
                let span = if *l == 0 { u128::MAX } else { (1u128 << (128 - l)).wrapping_sub(1) };
                (lo, lo | span)
            }
        }
    }
}

/// Clears the host bits of an IPv4 address for a prefix length.
pub fn mask_v4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - len as u32))
    }
}

/// Clears the host bits of an IPv6 address for a prefix length.
pub fn mask_v6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - len as u32))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prefix::V4(a, 32) => write!(f, "{a}"),
            Prefix::V6(a, 128) => write!(f, "{a}"),
            Prefix::V4(a, l) => write!(f, "{a}/{l}"),
            Prefix::V6(a, l) => write!(f, "{a}/{l}"),
        }
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Which side of an entry's flows this host is on (DESIGN §6, client-side flows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// This host serves the ports: requests arrive to them, replies leave from them.
    Serving,
    /// This host queries upstreams on the ports: queries leave to them, answers arrive from
    /// them (only from the entry's `upstreams`).
    Querying,
    /// Both of the above.
    Both,
}

impl Side {
    /// The name used in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Serving => "serving",
            Side::Querying => "querying",
            Side::Both => "both",
        }
    }
}

/// One `[[notrack]]` entry: the flows that bypass conntrack, both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotrackRule {
    /// Sorted, de-duplicated, non-empty.
    pub protocols: Vec<Proto>,
    /// Sorted, merged (no overlaps or adjacency), non-empty.
    pub ports: Vec<PortRange>,
    /// Client prefixes; empty means any. Sorted, none covered by another.
    pub sources: Vec<Prefix>,
    /// Interface names; empty means all (loopback included). Sorted, de-duplicated.
    pub interfaces: Vec<IfName>,
    /// Which side of the flows this host is on.
    pub side: Side,
    /// Upstream prefixes of the querying flows (non-empty exactly when the entry queries).
    /// Sorted, none covered by another.
    pub upstreams: Vec<Prefix>,
    /// Only traffic addressed to this host (`fib daddr type local` / `addrtype LOCAL`).
    pub local_only: bool,
    /// Insert `ct state untracked accept` for these flows into filter chains that need it.
    pub accept_untracked: bool,
    /// Delete conntrack entries already open for these flows after apply.
    pub flush_existing: bool,
}

impl NotrackRule {
    /// IPv4 source prefixes.
    pub fn sources_v4(&self) -> impl Iterator<Item = &Prefix> {
        self.sources.iter().filter(|p| !p.is_v6())
    }
    /// IPv6 source prefixes.
    pub fn sources_v6(&self) -> impl Iterator<Item = &Prefix> {
        self.sources.iter().filter(|p| p.is_v6())
    }
    /// True when loopback traffic is covered: no interface list, or one naming `lo`.
    pub fn covers_loopback(&self) -> bool {
        self.interfaces.is_empty() || self.interfaces.iter().any(|i| i.as_str() == "lo")
    }
    /// True when this host serves the entry's ports (side `serving` or `both`).
    pub fn serves(&self) -> bool {
        self.side != Side::Querying
    }
    /// True when this host queries upstreams on the entry's ports (side `querying` or `both`).
    pub fn queries(&self) -> bool {
        self.side != Side::Serving
    }
    /// True when a packet of protocol `proto` to or from `port` is covered by the port list.
    pub fn has_port(&self, proto: Proto, port: u16) -> bool {
        self.protocols.contains(&proto) && self.ports.iter().any(|r| r.contains(port))
    }
}

/// A sysctl value: an integer, or `"auto"` where ctguard has a formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum SysctlValue {
    /// An explicit value.
    Int(u64),
    /// Derived from this machine (see [`super::auto`]).
    #[serde(serialize_with = "ser_auto")]
    Auto,
}

fn ser_auto<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("auto")
}

/// A validated policy. Construct with [`super::parse_policy`] or [`Policy::builtin`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Front end for ctguard's own NOTRACK objects.
    pub backend: Backend,
    /// Make the change survive reboot once COMMITTED.
    pub persist: bool,
    /// NOTRACK entries, in file order.
    pub notrack: Vec<NotrackRule>,
    /// `net.netfilter.*` keys and their values, sorted by key.
    pub sysctl: BTreeMap<SysctlKey, SysctlValue>,
}

/// The built-in policy exactly as DESIGN §6 shows it, in TOML.
pub const BUILTIN_POLICY_TOML: &str = r#"backend = "auto"
persist = false
[[notrack]]
protocols = ["udp", "tcp"]
ports = [53]
sources = []
interfaces = []
local_only = true
accept_untracked = true
flush_existing = false
[sysctl]
"net.netfilter.nf_conntrack_max" = "auto"
"net.netfilter.nf_conntrack_buckets" = "auto"
"#;

impl Policy {
    /// The built-in policy (DESIGN §6): udp+tcp port 53, local only, accept untracked, and both
    /// host-wide conntrack sysctls on `"auto"`.
    pub fn builtin() -> Policy {
        match super::parse_policy(BUILTIN_POLICY_TOML, super::Format::Toml) {
            Ok(p) => p,
            // The constant is covered by a unit test; reaching this is a build defect.
            Err(e) => panic!("built-in policy is invalid: {e:?}"),
        }
    }
}
