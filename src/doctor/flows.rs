//! What fills the conntrack table: entries grouped by (protocol, destination port, state),
//! counted in one streaming pass with bounded memory (pure).
//!
//! Entries are read line by line and never stored. Groups are kept in a table of at most
//! `2 × capacity` counters; when it fills up, the batched Misra–Gries step subtracts the
//! (capacity+1)-th largest count from every counter and drops those that reach zero. While the
//! number of distinct groups stays within the capacity (the normal case: a few protocols,
//! ports and states) the counts are exact; past it they are lower bounds, each at most
//! [`FlowScan::max_error`] below the truth, and every group holding more than
//! `entries / (capacity + 1)` entries is still reported. Memory is a function of the capacity
//! alone, so a million entries cost what a thousand do.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::BufRead;
use std::net::IpAddr;

use serde::Serialize;

use super::parse::{parse_entry, CtEntry};

/// Default number of groups tracked exactly (at most twice as many counters exist at once).
pub const DEFAULT_CAPACITY: usize = 8192;
/// Most distinct state names interned; further ones are counted as `OTHER`.
const MAX_STATES: usize = 64;
/// Longest line read; longer ones are skipped (counted as unparsed) without being buffered.
pub const MAX_LINE: usize = 4096;
/// Client-side (protocol, port) groups whose upstream addresses are collected.
pub const MAX_UPSTREAM_GROUPS: usize = 32;
/// Upstream addresses kept per client-side group.
pub const MAX_UPSTREAMS: usize = 16;
/// An ESTABLISHED TCP entry that saw no packet for this long counts as idle (an orphan when
/// its peer is gone): idle = `nf_conntrack_tcp_timeout_established` − seconds left.
pub const ORPHAN_IDLE_SECONDS: u64 = 3600;

/// Which side of a flow this host is on, from the original direction's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The original destination is a local address: this host serves the flow.
    Server,
    /// The original source is a local address: this host queried (its own outbound flow).
    Client,
    /// Both ends are local addresses (loopback or the host talking to itself).
    Local,
    /// Neither end is local: forwarded (or NATed on the way).
    Forwarded,
    /// The local addresses could not be read.
    Unknown,
}

impl Side {
    const ALL: [Side; 5] = [Side::Server, Side::Client, Side::Local, Side::Forwarded, Side::Unknown];

    /// The name shown (`server`, `client`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
            Side::Local => "local",
            Side::Forwarded => "forwarded",
            Side::Unknown => "?",
        }
    }

    fn index(self) -> u64 {
        Side::ALL.iter().position(|s| *s == self).unwrap_or(4) as u64
    }

    fn from_index(i: u64) -> Side {
        Side::ALL.get(i as usize).copied().unwrap_or(Side::Unknown)
    }
}

/// The target's own addresses (IPv4 from `fib_trie`'s local routes, IPv6 from `if_inet6`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    /// The addresses; empty with `known = false` when they could not be read.
    pub addrs: HashSet<IpAddr>,
    /// True when they were read.
    pub known: bool,
}

impl LocalAddrs {
    /// From the texts of `/proc/net/fib_trie` and `/proc/net/if_inet6` (either may be absent).
    pub fn parse(fib_trie: Option<&str>, if_inet6: Option<&str>) -> LocalAddrs {
        let mut out = LocalAddrs { addrs: HashSet::new(), known: fib_trie.is_some() || if_inet6.is_some() };
        if let Some(t) = fib_trie {
            let mut last: Option<IpAddr> = None;
            for line in t.lines() {
                let l = line.trim_start_matches([' ', '|', '+', '-', '`']).trim();
                if let Ok(a) = l.parse::<IpAddr>() {
                    last = Some(a);
                } else if l.starts_with("/32 host LOCAL") {
                    if let Some(a) = last {
                        out.addrs.insert(a);
                    }
                }
            }
        }
        if let Some(t) = if_inet6 {
            for line in t.lines() {
                let Some(hex) = line.split_whitespace().next() else { continue };
                if let Ok(n) = u128::from_str_radix(hex, 16) {
                    if hex.len() == 32 {
                        out.addrs.insert(IpAddr::V6(n.into()));
                    }
                }
            }
        }
        out
    }

    /// The side of a flow from its original source and destination as printed.
    pub fn side(&self, src: &str, dst: &str) -> Side {
        if !self.known {
            return Side::Unknown;
        }
        let local = |s: &str| s.parse::<IpAddr>().is_ok_and(|a| a.is_loopback() || self.addrs.contains(&a));
        match (local(src), local(dst)) {
            (false, true) => Side::Server,
            (true, false) => Side::Client,
            (true, true) => Side::Local,
            (false, false) => Side::Forwarded,
        }
    }
}

/// Addresses this host queried on one (protocol, destination port): its upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstreams {
    /// Protocol name.
    pub proto: String,
    /// Destination port of the queries.
    pub port: u16,
    /// Entries of this host's queries seen.
    pub entries: u64,
    /// The upstream addresses, sorted (at most [`MAX_UPSTREAMS`]).
    pub addresses: Vec<String>,
    /// True when there were more than those.
    pub more: bool,
}

/// One group of the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowGroup {
    /// Protocol name (`udp`, `tcp`, `icmp`, …).
    pub proto: String,
    /// Protocol number.
    pub proto_number: u8,
    /// Destination port of the original direction; `null` for protocols without ports.
    pub port: Option<u16>,
    /// Which side this host is on: `server` (the original destination is local), `client`
    /// (the original source is), `local`, `forwarded`, or `?` when unknown.
    pub direction: Side,
    /// Protocol state (`ESTABLISHED`, `TIME_WAIT`, …) or, for protocols without one,
    /// `UNREPLIED` / `REPLIED` / `ASSURED`.
    pub state: String,
    /// Entries in the group (a lower bound when the scan was not exact).
    pub count: u64,
    /// How many of them are NATed (reply tuple not the mirror of the original one).
    pub nat: u64,
}

/// Entries of one protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProtoCount {
    /// Protocol name.
    pub proto: String,
    /// Entries.
    pub count: u64,
}

/// All states of one (protocol, port), summed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortTotal {
    /// Protocol name.
    pub proto: String,
    /// Protocol number.
    pub proto_number: u8,
    /// Destination port; `None` for protocols without ports.
    pub port: Option<u16>,
    /// Which side this host is on.
    pub direction: Side,
    /// Entries.
    pub count: u64,
    /// NATed entries among them.
    pub nat: u64,
}

/// The result of a scan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowScan {
    /// Entry lines read.
    pub scanned: u64,
    /// Lines that were not entries (or too long).
    pub unparsed: u64,
    /// True when every count is exact.
    pub exact: bool,
    /// How far below the truth any count may be (0 when exact).
    pub max_error: u64,
    /// Groups tracked exactly (the summary's capacity).
    pub capacity: usize,
    /// Most counters held at once during the scan (at most `2 × capacity`).
    pub peak_groups: usize,
    /// Every surviving group, largest first (ties: protocol, port, state).
    #[serde(skip)]
    pub groups: Vec<FlowGroup>,
    /// Entries per protocol (exact), largest first.
    pub per_proto: Vec<ProtoCount>,
    /// Entries per side (exact).
    pub per_direction: Vec<DirectionCount>,
    /// The upstreams of this host's own queries, per (protocol, port), largest first.
    pub upstreams: Vec<Upstreams>,
    /// ESTABLISHED TCP entries (exact).
    pub tcp_established: u64,
    /// Those that saw no packet for [`ORPHAN_IDLE_SECONDS`] or longer (needs the timeout).
    pub tcp_established_idle: u64,
    /// The idle threshold used, seconds.
    pub idle_threshold_seconds: u64,
}

/// Entries on one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionCount {
    /// The side.
    pub direction: Side,
    /// Entries.
    pub count: u64,
}

impl FlowScan {
    /// The `n` largest groups.
    pub fn top(&self, n: usize) -> &[FlowGroup] {
        &self.groups[..n.min(self.groups.len())]
    }

    /// Exact entry count of protocol `proto` (by name).
    pub fn proto_total(&self, proto: &str) -> u64 {
        self.per_proto.iter().find(|p| p.proto == proto).map_or(0, |p| p.count)
    }

    /// Groups summed over their states: one row per (protocol, port, side), largest first.
    pub fn port_totals(&self) -> Vec<PortTotal> {
        let mut map: HashMap<(u8, Option<u16>, Side), PortTotal> = HashMap::new();
        for g in &self.groups {
            let t = map.entry((g.proto_number, g.port, g.direction)).or_insert_with(|| PortTotal {
                proto: g.proto.clone(),
                proto_number: g.proto_number,
                port: g.port,
                direction: g.direction,
                count: 0,
                nat: 0,
            });
            t.count += g.count;
            t.nat += g.nat;
        }
        let mut v: Vec<PortTotal> = map.into_values().collect();
        v.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(a.proto_number.cmp(&b.proto_number))
                .then(a.port.cmp(&b.port))
                .then(a.direction.cmp(&b.direction))
        });
        v
    }

    /// The upstreams of this host's queries to `proto`/`port`, if any were seen.
    pub fn upstreams_of(&self, proto: &str, port: u16) -> Option<&Upstreams> {
        self.upstreams.iter().find(|u| u.proto == proto && u.port == port)
    }
}

/// Key packed into 64 bits: protocol (8), has-port (1), port (16), side (3), state index (7).
fn pack(proto: u8, port: Option<u16>, side: Side, state: u8) -> u64 {
    let (has, p) = match port {
        Some(p) => (1u64, u64::from(p)),
        None => (0, 0),
    };
    (u64::from(proto) << 27) | (has << 26) | (p << 10) | (side.index() << 7) | u64::from(state & 0x7f)
}

fn unpack(k: u64) -> (u8, Option<u16>, Side, u8) {
    let proto = (k >> 27) as u8;
    let port = if (k >> 26) & 1 == 1 { Some(((k >> 10) & 0xffff) as u16) } else { None };
    (proto, port, Side::from_index((k >> 7) & 0x7), (k & 0x7f) as u8)
}

/// A multiplicative hasher for the packed `u32` keys (they are not attacker-chosen beyond the
/// fixed key space, and the table is bounded).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    count: u64,
    nat: u64,
}

/// The streaming aggregator. Feed it lines ([`FlowAggregator::push_line`]) or parsed entries,
/// then [`FlowAggregator::finish`].
#[derive(Debug)]
pub struct FlowAggregator {
    capacity: usize,
    counters: HashMap<u64, Counter, BuildHasherDefault<KeyHasher>>,
    locals: LocalAddrs,
    side_totals: [u64; 5],
    upstreams: HashMap<(u8, u16), (u64, Vec<IpAddr>, bool)>,
    tcp_timeout_established: Option<u64>,
    tcp_established: u64,
    tcp_idle: u64,
    states: Vec<String>,
    proto_names: Vec<Option<String>>,
    proto_totals: Vec<u64>,
    scanned: u64,
    unparsed: u64,
    max_error: u64,
    peak: usize,
}

impl Default for FlowAggregator {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl FlowAggregator {
    /// An aggregator that keeps `capacity` groups exactly (at least 16).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(16);
        FlowAggregator {
            capacity,
            counters: HashMap::with_capacity_and_hasher(2 * capacity + 1, BuildHasherDefault::default()),
            locals: LocalAddrs::default(),
            side_totals: [0; 5],
            upstreams: HashMap::new(),
            tcp_timeout_established: None,
            tcp_established: 0,
            tcp_idle: 0,
            states: Vec::new(),
            proto_names: vec![None; 256],
            proto_totals: vec![0; 256],
            scanned: 0,
            unparsed: 0,
            max_error: 0,
            peak: 0,
        }
    }

    /// Tells sides apart with the target's own addresses.
    pub fn with_locals(mut self, locals: LocalAddrs) -> Self {
        self.locals = locals;
        self
    }

    /// Counts idle ESTABLISHED TCP entries against this `nf_conntrack_tcp_timeout_established`.
    pub fn with_tcp_timeout_established(mut self, t: Option<u64>) -> Self {
        self.tcp_timeout_established = t;
        self
    }

    /// Counters held right now (never more than `2 × capacity`).
    pub fn held(&self) -> usize {
        self.counters.len()
    }

    /// Parses and counts one line; anything that is not an entry is counted as unparsed.
    pub fn push_line(&mut self, line: &str) {
        match parse_entry(line) {
            Some(e) => self.add(&e),
            None if line.trim().is_empty() => {}
            None => self.unparsed += 1,
        }
    }

    /// Counts one line that was too long to read (or not text).
    pub fn push_unparsed(&mut self) {
        self.unparsed += 1;
    }

    fn state_index(&mut self, s: &str) -> u8 {
        if let Some(i) = self.states.iter().position(|x| x == s) {
            return i as u8;
        }
        if self.states.len() < MAX_STATES - 1 {
            self.states.push(s.to_string());
            return (self.states.len() - 1) as u8;
        }
        match self.states.iter().position(|x| x == "OTHER") {
            Some(i) => i as u8,
            None => {
                self.states.push("OTHER".to_string());
                (self.states.len() - 1) as u8
            }
        }
    }

    /// Counts one entry.
    pub fn add(&mut self, e: &CtEntry<'_>) {
        self.scanned += 1;
        let p = usize::from(e.proto);
        self.proto_totals[p] += 1;
        if self.proto_names[p].is_none() {
            self.proto_names[p] = Some(e.proto_name.to_string());
        }
        let state = self.state_index(e.state_label());
        let side = self.locals.side(e.src, e.dst);
        self.side_totals[side.index() as usize] += 1;
        if let (Side::Client, Some(port)) = (side, e.dport) {
            let full = self.upstreams.len() >= MAX_UPSTREAM_GROUPS;
            if let Some(u) = match self.upstreams.get_mut(&(e.proto, port)) {
                Some(u) => Some(u),
                None if full => None,
                None => Some(self.upstreams.entry((e.proto, port)).or_default()),
            } {
                u.0 += 1;
                if let Ok(a) = e.dst.parse::<IpAddr>() {
                    if !u.1.contains(&a) {
                        if u.1.len() < MAX_UPSTREAMS {
                            u.1.push(a);
                        } else {
                            u.2 = true;
                        }
                    }
                }
            }
        }
        if e.proto == 6 && e.state == Some("ESTABLISHED") {
            self.tcp_established += 1;
            if let Some(t) = self.tcp_timeout_established {
                if t.saturating_sub(e.timeout) >= ORPHAN_IDLE_SECONDS {
                    self.tcp_idle += 1;
                }
            }
        }
        let c = self.counters.entry(pack(e.proto, e.dport, side, state)).or_default();
        c.count += 1;
        if e.nat {
            c.nat += 1;
        }
        if self.counters.len() > self.peak {
            self.peak = self.counters.len();
        }
        if self.counters.len() >= 2 * self.capacity {
            self.shrink();
        }
    }

    /// The batched Misra–Gries step: subtract the (capacity+1)-th largest count from every
    /// counter, drop those that reach zero. At most `capacity` counters survive.
    fn shrink(&mut self) {
        let mut counts: Vec<u64> = self.counters.values().map(|c| c.count).collect();
        let k = self.capacity;
        let (_, nth, _) = counts.select_nth_unstable_by(k, |a, b| b.cmp(a));
        let d = *nth;
        self.counters.retain(|_, c| {
            c.count = c.count.saturating_sub(d);
            c.nat = c.nat.min(c.count);
            c.count > 0
        });
        self.max_error += d;
    }

    /// The summary: groups sorted largest first.
    pub fn finish(self) -> FlowScan {
        let name = |p: u8| self.proto_names[usize::from(p)].clone().unwrap_or_else(|| format!("proto-{p}"));
        let mut groups: Vec<FlowGroup> = self
            .counters
            .iter()
            .map(|(&k, c)| {
                let (proto, port, side, s) = unpack(k);
                FlowGroup {
                    proto: name(proto),
                    proto_number: proto,
                    port,
                    direction: side,
                    state: self.states.get(usize::from(s)).cloned().unwrap_or_default(),
                    count: c.count,
                    nat: c.nat,
                }
            })
            .collect();
        groups.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(a.proto_number.cmp(&b.proto_number))
                .then(a.port.cmp(&b.port))
                .then(a.direction.cmp(&b.direction))
                .then(a.state.cmp(&b.state))
        });
        let mut per_proto: Vec<ProtoCount> = (0..=255u8)
            .filter(|&p| self.proto_totals[usize::from(p)] > 0)
            .map(|p| ProtoCount { proto: name(p), count: self.proto_totals[usize::from(p)] })
            .collect();
        per_proto.sort_by(|a, b| b.count.cmp(&a.count).then(a.proto.cmp(&b.proto)));
        let per_direction = Side::ALL
            .iter()
            .zip(self.side_totals)
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| DirectionCount { direction: *s, count: n })
            .collect();
        let mut upstreams: Vec<Upstreams> = self
            .upstreams
            .iter()
            .map(|(&(p, port), (n, addrs, more))| {
                let mut a = addrs.clone();
                a.sort();
                Upstreams {
                    proto: name(p),
                    port,
                    entries: *n,
                    addresses: a.iter().map(ToString::to_string).collect(),
                    more: *more,
                }
            })
            .collect();
        upstreams.sort_by(|a, b| b.entries.cmp(&a.entries).then(a.proto.cmp(&b.proto)).then(a.port.cmp(&b.port)));
        FlowScan {
            scanned: self.scanned,
            unparsed: self.unparsed,
            exact: self.max_error == 0,
            max_error: self.max_error,
            capacity: self.capacity,
            peak_groups: self.peak,
            groups,
            per_proto,
            per_direction,
            upstreams,
            tcp_established: self.tcp_established,
            tcp_established_idle: self.tcp_idle,
            idle_threshold_seconds: ORPHAN_IDLE_SECONDS,
        }
    }
}

/// Reads `r` line by line into `agg`: one reused buffer, lines longer than [`MAX_LINE`] are
/// skipped without being buffered whole. Returns the I/O error that stopped it, if any.
pub fn aggregate_reader<R: BufRead>(mut r: R, agg: &mut FlowAggregator) -> std::io::Result<()> {
    let mut line: Vec<u8> = Vec::with_capacity(512);
    loop {
        line.clear();
        let mut too_long = false;
        // Like read_until, but bounded.
        loop {
            let buf = match r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                break;
            }
            let (used, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if !too_long && line.len() + used <= MAX_LINE {
                line.extend_from_slice(&buf[..used]);
            } else {
                too_long = true;
                line.clear();
            }
            r.consume(used);
            if done {
                break;
            }
        }
        if too_long {
            agg.push_unparsed();
            continue;
        }
        if line.is_empty() {
            return Ok(());
        }
        match std::str::from_utf8(&line) {
            Ok(s) => agg.push_line(s),
            Err(_) => agg.push_unparsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(sport: u32, dport: u16, replied: bool) -> String {
        let flag = if replied { "" } else { "[UNREPLIED] " };
        format!(
            "ipv4     2 udp      17 29 src=198.18.0.2 dst=198.18.0.1 sport={sport} dport={dport} {flag}src=198.18.0.1 dst=198.18.0.2 sport={dport} dport={sport} mark=0 zone=0 use=2\n"
        )
    }

    fn tcp(sport: u32, dport: u16, state: &str) -> String {
        format!(
            "ipv4     2 tcp      6 117 {state} src=198.18.0.2 dst=198.18.0.1 sport={sport} dport={dport} src=198.18.0.1 dst=198.18.0.2 sport={dport} dport={sport} [ASSURED] mark=0 zone=0 use=2\n"
        )
    }

    #[test]
    fn groups_sorted_and_exact() {
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(&udp(20000 + i, 53, true));
        }
        for i in 0..20 {
            text.push_str(&udp(30000 + i, 53, false));
        }
        for i in 0..40 {
            text.push_str(&tcp(40000 + i, 8080, "TIME_WAIT"));
        }
        text.push_str("not an entry\n\n");
        let mut agg = FlowAggregator::default();
        aggregate_reader(text.as_bytes(), &mut agg).expect("read");
        let s = agg.finish();
        assert!(s.exact);
        assert_eq!((s.scanned, s.unparsed), (360, 1));
        let top: Vec<(&str, Option<u16>, &str, u64)> =
            s.top(10).iter().map(|g| (g.proto.as_str(), g.port, g.state.as_str(), g.count)).collect();
        assert_eq!(
            top,
            vec![
                ("udp", Some(53), "REPLIED", 300),
                ("tcp", Some(8080), "TIME_WAIT", 40),
                ("udp", Some(53), "UNREPLIED", 20)
            ]
        );
        let totals = s.port_totals();
        assert_eq!((totals[0].proto.as_str(), totals[0].port, totals[0].count), ("udp", Some(53), 320));
        assert_eq!(s.proto_total("udp"), 320);
        assert_eq!(s.proto_total("tcp"), 40);
        assert_eq!(s.per_proto[0], ProtoCount { proto: "udp".to_string(), count: 320 });
    }

    #[test]
    fn memory_is_bounded_and_heavy_hitters_survive() {
        // 200,000 entries over 20,000 distinct groups with a capacity of 64: never more than
        // 128 counters, and the three heavy groups come out on top within the error bound.
        let mut agg = FlowAggregator::new(64);
        let heavy = [(53u16, 50_000u64), (123, 30_000), (443, 20_000)];
        let mut n = 0u64;
        for (port, count) in heavy {
            for i in 0..count {
                agg.push_line(&udp((i % 60000) as u32 + 1, port, true));
                n += 1;
                // Interleave the noise so the heavy groups are not all first.
                if i % 2 == 0 {
                    let p = 1000 + (n % 20_000) as u16;
                    agg.push_line(&tcp(1, p, if n % 3 == 0 { "ESTABLISHED" } else { "TIME_WAIT" }));
                }
                assert!(agg.held() <= 128);
            }
        }
        let s = agg.finish();
        assert!(!s.exact);
        assert!(s.peak_groups <= 128);
        assert_eq!(s.scanned, 150_000);
        let top = s.top(3);
        for (g, (port, count)) in top.iter().zip(heavy) {
            assert_eq!(g.port, Some(port));
            assert!(g.count <= count && g.count + s.max_error >= count, "{g:?} vs {count}, error {}", s.max_error);
        }
        // The bound of the algorithm: error ≤ entries / (capacity + 1).
        assert!(s.max_error <= s.scanned / 65, "{}", s.max_error);
    }

    /// Entries made on demand, a few bytes at a time: the table is never in memory as a whole.
    struct LazyTable {
        next: u32,
        total: u32,
        pending: Vec<u8>,
        /// Most bytes one `read` was asked for.
        widest_read: usize,
    }

    impl std::io::Read for LazyTable {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.widest_read = self.widest_read.max(buf.len());
            if self.pending.is_empty() && self.next < self.total {
                let i = self.next;
                self.next += 1;
                let line =
                    if i % 4 == 0 { tcp(i, 1000 + (i % 5000) as u16, "ESTABLISHED") } else { udp(i, 53, i % 3 == 0) };
                self.pending = line.into_bytes();
            }
            // Short reads on purpose: lines arrive split across reads.
            let n = self.pending.len().min(buf.len()).min(97);
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn the_reader_is_aggregated_as_a_stream_in_bounded_memory() {
        // 300,000 entries (about 45 MB as text), produced as they are read: the aggregator sees
        // each line once, through a 4 KiB buffer, and holds at most 2 × capacity counters.
        let total = 300_000;
        let mut table = LazyTable { next: 0, total, pending: Vec::new(), widest_read: 0 };
        let mut agg = FlowAggregator::new(64);
        aggregate_reader(std::io::BufReader::with_capacity(4096, &mut table), &mut agg).expect("read");
        assert_eq!(table.next, total);
        assert!(table.widest_read <= 4096, "{}", table.widest_read);
        let s = agg.finish();
        assert_eq!((s.scanned, s.unparsed), (u64::from(total), 0));
        assert!(s.peak_groups <= 128, "{}", s.peak_groups);
        assert_eq!((s.groups[0].proto.as_str(), s.groups[0].port), ("udp", Some(53)));
    }

    #[test]
    fn long_and_binary_lines_are_skipped() {
        let mut text = Vec::new();
        text.extend_from_slice(udp(1, 53, true).as_bytes());
        text.extend(std::iter::repeat_n(b'x', MAX_LINE * 3));
        text.push(b'\n');
        text.extend_from_slice(&[0xff, 0xfe, b'\n']);
        text.extend_from_slice(udp(2, 53, true).trim_end().as_bytes());
        let mut agg = FlowAggregator::default();
        aggregate_reader(&text[..], &mut agg).expect("read");
        let s = agg.finish();
        assert_eq!((s.scanned, s.unparsed), (2, 2));
    }

    #[test]
    fn many_states_fold_into_other() {
        let mut agg = FlowAggregator::new(1024);
        for i in 0..100 {
            agg.push_line(&tcp(1, 80, &format!("S{i}")));
        }
        let s = agg.finish();
        assert_eq!(s.scanned, 100);
        assert!(s.groups.iter().any(|g| g.state == "OTHER"));
        assert!(s.groups.len() <= MAX_STATES);
    }

    /// How long 100k entries take (printed; run with `--nocapture`). No timed assertion.
    #[test]
    fn aggregate_100k_entries_timing() {
        let mut text = String::with_capacity(100_000 * 190);
        for i in 0..100_000u32 {
            match i % 10 {
                0..=6 => text.push_str(&udp(1024 + i % 60000, 53, i % 7 != 0)),
                7 | 8 => {
                    text.push_str(&tcp(1024 + i % 60000, 443, if i % 2 == 0 { "ESTABLISHED" } else { "TIME_WAIT" }))
                }
                _ => text.push_str(&udp(1024 + i % 60000, 1024 + (i % 5000) as u16, false)),
            }
        }
        let start = std::time::Instant::now();
        let mut agg = FlowAggregator::default();
        aggregate_reader(std::io::BufReader::new(text.as_bytes()), &mut agg).expect("read");
        let s = agg.finish();
        let took = start.elapsed();
        assert_eq!(s.scanned, 100_000);
        eprintln!(
            "doctor: aggregated {} entries ({} MB of text, {} groups, peak {} counters) in {:.1} ms ({} build)",
            s.scanned,
            text.len() / 1_000_000,
            s.groups.len(),
            s.peak_groups,
            took.as_secs_f64() * 1000.0,
            if cfg!(debug_assertions) { "debug" } else { "release" }
        );
    }
}
