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

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::BufRead;

use serde::Serialize;

use super::parse::{parse_entry, CtEntry};

/// Default number of groups tracked exactly (at most twice as many counters exist at once).
pub const DEFAULT_CAPACITY: usize = 8192;
/// Most distinct state names interned; further ones are counted as `OTHER`.
const MAX_STATES: usize = 64;
/// Longest line read; longer ones are skipped (counted as unparsed) without being buffered.
pub const MAX_LINE: usize = 4096;

/// One group of the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowGroup {
    /// Protocol name (`udp`, `tcp`, `icmp`, …).
    pub proto: String,
    /// Protocol number.
    pub proto_number: u8,
    /// Destination port of the original direction; `null` for protocols without ports.
    pub port: Option<u16>,
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

    /// Groups summed over their states: one row per (protocol, port), largest first.
    pub fn port_totals(&self) -> Vec<PortTotal> {
        let mut map: HashMap<(u8, Option<u16>), PortTotal> = HashMap::new();
        for g in &self.groups {
            let t = map.entry((g.proto_number, g.port)).or_insert_with(|| PortTotal {
                proto: g.proto.clone(),
                proto_number: g.proto_number,
                port: g.port,
                count: 0,
                nat: 0,
            });
            t.count += g.count;
            t.nat += g.nat;
        }
        let mut v: Vec<PortTotal> = map.into_values().collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.proto_number.cmp(&b.proto_number)).then(a.port.cmp(&b.port)));
        v
    }
}

/// Key packed into 32 bits: protocol (8), has-port (1), port (16), state index (7).
fn pack(proto: u8, port: Option<u16>, state: u8) -> u32 {
    let (has, p) = match port {
        Some(p) => (1u32, u32::from(p)),
        None => (0, 0),
    };
    (u32::from(proto) << 24) | (has << 23) | (p << 7) | u32::from(state & 0x7f)
}

fn unpack(k: u32) -> (u8, Option<u16>, u8) {
    let proto = (k >> 24) as u8;
    let port = if (k >> 23) & 1 == 1 { Some(((k >> 7) & 0xffff) as u16) } else { None };
    (proto, port, (k & 0x7f) as u8)
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
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
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
    counters: HashMap<u32, Counter, BuildHasherDefault<KeyHasher>>,
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
            states: Vec::new(),
            proto_names: vec![None; 256],
            proto_totals: vec![0; 256],
            scanned: 0,
            unparsed: 0,
            max_error: 0,
            peak: 0,
        }
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
        let c = self.counters.entry(pack(e.proto, e.dport, state)).or_default();
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
                let (proto, port, s) = unpack(k);
                FlowGroup {
                    proto: name(proto),
                    proto_number: proto,
                    port,
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
                .then(a.state.cmp(&b.state))
        });
        let mut per_proto: Vec<ProtoCount> = (0..=255u8)
            .filter(|&p| self.proto_totals[usize::from(p)] > 0)
            .map(|p| ProtoCount { proto: name(p), count: self.proto_totals[usize::from(p)] })
            .collect();
        per_proto.sort_by(|a, b| b.count.cmp(&a.count).then(a.proto.cmp(&b.proto)));
        FlowScan {
            scanned: self.scanned,
            unparsed: self.unparsed,
            exact: self.max_error == 0,
            max_error: self.max_error,
            capacity: self.capacity,
            peak_groups: self.peak,
            groups,
            per_proto,
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
