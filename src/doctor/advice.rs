//! Recommendations and the policy that applies them (pure).
//!
//! - **raise `nf_conntrack_max`** when the table is under pressure (≥ 80 % full, refused or
//!   evicted entries, "table full" in the kernel log): to the RAM formula (DESIGN §6), or to
//!   twice the current count rounded up to a power of two when that is more, with the memory
//!   it costs;
//! - **buckets** equal to the maximum (the kernel's ratio since 5.15) when they are fewer;
//! - **shorter UDP timeouts** when UDP fills the table;
//! - **NOTRACK** for the dominant stateless UDP services (DNS above all), never for NATed
//!   flows, always with the warning that the filter path must accept UNTRACKED.
//!
//! [`emit_policy`] writes them as a policy file for `ctguard plan`/`apply` in the same target:
//! outside the initial namespace the host-only sysctls are left out, and the file says so.

use std::fmt::Write as _;

use super::flows::FlowScan;
use super::parse::DropCounters;
use super::report::{Recommendation, Report, SysctlSetting};
use crate::model::auto::{conntrack_max_for_ram, kernel_rounded_buckets};

/// Usage from which the table counts as under pressure.
pub const PRESSURE_USAGE: f64 = 0.8;
/// Fewest entries a UDP port must hold for a NOTRACK recommendation.
pub const NOTRACK_MIN_ENTRIES: u64 = 100;
/// Smallest share of all entries a UDP port must hold for a NOTRACK recommendation.
pub const NOTRACK_MIN_SHARE: f64 = 0.10;
/// Most ports recommended for NOTRACK.
pub const MAX_NOTRACK_PORTS: usize = 8;
/// Recommended `nf_conntrack_udp_timeout` (kernel default 30).
pub const UDP_TIMEOUT: u64 = 10;
/// Recommended `nf_conntrack_udp_timeout_stream` (kernel default 120).
pub const UDP_TIMEOUT_STREAM: u64 = 60;
/// Bytes per hash bucket (`struct hlist_nulls_head`).
pub const BUCKET_BYTES: u64 = 8;

/// UDP services known to be stateless request/response ones, where NOTRACK is safe once the
/// filter path accepts UNTRACKED.
pub const KNOWN_STATELESS_UDP: &[(u16, &str)] = &[
    (53, "DNS"),
    (123, "NTP"),
    (161, "SNMP"),
    (162, "SNMP traps"),
    (514, "syslog"),
    (1812, "RADIUS"),
    (1813, "RADIUS accounting"),
];

const KEY_MAX: &str = "net.netfilter.nf_conntrack_max";
const KEY_BUCKETS: &str = "net.netfilter.nf_conntrack_buckets";
const KEY_UDP: &str = "net.netfilter.nf_conntrack_udp_timeout";
const KEY_UDP_STREAM: &str = "net.netfilter.nf_conntrack_udp_timeout_stream";

/// What untracked packets need; attached to every NOTRACK recommendation.
pub const UNTRACKED_WARNING: &str = "untracked packets are `ct state untracked`: a stateful filter that accepts only \
established/related and new flows drops them, so the filter path must accept UNTRACKED for exactly these flows \
(the policy's accept_untracked = true inserts that accept; `ctguard plan` shows where). Untracked packets also skip \
NAT, and ICMP errors about them are INVALID";

/// The figures the recommendations are made from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The target is the host.
    pub initial: bool,
    /// `nf_conntrack_count`.
    pub count: Option<u64>,
    /// `nf_conntrack_max`.
    pub max: Option<u64>,
    /// `nf_conntrack_buckets`.
    pub buckets: Option<u64>,
    /// Drop counters.
    pub drops: Option<&'a DropCounters>,
    /// "table full" events in the kernel log naming the target namespace.
    pub table_full_here: u64,
    /// … naming no namespace (older kernels): they may come from any.
    pub table_full_unattributed: u64,
    /// … naming another namespace.
    pub table_full_elsewhere: u64,
    /// `MemTotal`.
    pub ram_bytes: Option<u64>,
    /// Bytes per entry.
    pub entry_bytes: Option<u64>,
    /// The flow summary.
    pub flows: Option<&'a FlowScan>,
    /// `nf_conntrack_udp_timeout`.
    pub udp_timeout: Option<u64>,
    /// `nf_conntrack_udp_timeout_stream`.
    pub udp_timeout_stream: Option<u64>,
    /// Pointer width (64 on x86_64).
    pub pointer_bits: u32,
    /// Page size (buckets round to `page_size / 8`).
    pub page_size: u64,
}

/// Recommendations plus notes, and the worst-case memory at the recommended maximum.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Advice {
    /// What to change.
    pub recommendations: Vec<Recommendation>,
    /// Remarks.
    pub notes: Vec<String>,
    /// Memory at the recommended maximum (entries and buckets), when a raise is recommended.
    pub recommended_max_bytes: Option<u64>,
    /// What the RAM formula gives.
    pub ram_formula_max: Option<u64>,
}

/// Thousands separators: `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in binary units: `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn pct(x: f64) -> String {
    let p = x * 100.0;
    if p > 0.0 && p < 0.1 {
        "<0.1%".to_string()
    } else {
        format!("{p:.1}%")
    }
}

/// Worst-case bytes of a table with `max` entries of `entry_bytes` and `buckets` buckets.
pub fn table_bytes(max: u64, entry_bytes: u64, buckets: u64) -> u64 {
    max.saturating_mul(entry_bytes).saturating_add(buckets.saturating_mul(BUCKET_BYTES))
}

/// Makes the recommendations.
pub fn recommend(i: &Inputs<'_>) -> Advice {
    let mut a = Advice::default();
    let ram_formula = i.ram_bytes.map(|r| conntrack_max_for_ram(r, i.pointer_bits));
    a.ram_formula_max = ram_formula;
    let host_only_note =
        "only the host (initial network namespace) can write it: apply it there, it holds for every namespace";

    // Pressure.
    let mut pressure: Vec<String> = Vec::new();
    let usage = match (i.count, i.max) {
        (Some(c), Some(m)) if m > 0 => Some(c as f64 / m as f64),
        _ => None,
    };
    if let (Some(u), Some(c), Some(m)) = (usage, i.count, i.max) {
        if u >= PRESSURE_USAGE {
            pressure.push(format!("the table is {} full ({} of {})", pct(u), thousands(c), thousands(m)));
        }
    }
    if let Some(d) = i.drops {
        if d.drop > 0 {
            pressure
                .push(format!("the kernel refused {} new entries for lack of room (drop counter)", thousands(d.drop)));
        }
        if d.early_drop > 0 {
            pressure.push(format!("it evicted {} entries to make room (early_drop)", thousands(d.early_drop)));
        }
        if d.insert_failed > 0 {
            a.notes.push(format!(
                "insert_failed = {}: packets of one new flow raced to create its entry (classically the parallel \
                 A/AAAA queries of a resolver over UDP); a bigger table does not help, NOTRACK for the flows does",
                thousands(d.insert_failed)
            ));
        }
    }
    let full_all = i.table_full_here + i.table_full_unattributed + i.table_full_elsewhere;
    let event_words =
        |n: u64| format!("{} \"table full, dropping packet\" event{}", thousands(n), if n == 1 { "" } else { "s" });
    if i.initial && full_all > 0 {
        let others = if i.table_full_elsewhere > 0 {
            format!(" ({} in other namespaces: the limit is host-wide)", thousands(i.table_full_elsewhere))
        } else {
            String::new()
        };
        pressure.push(format!("the kernel log holds {}{others}", event_words(full_all)));
    } else if !i.initial {
        if i.table_full_here > 0 {
            pressure.push(format!("the kernel log holds {} naming this namespace", event_words(i.table_full_here)));
        }
        if i.table_full_unattributed > 0 {
            pressure.push(format!(
                "the kernel log holds {} (the log is host-wide: they may come from another namespace)",
                event_words(i.table_full_unattributed)
            ));
        }
        if i.table_full_elsewhere > 0 {
            a.notes.push(format!(
                "the kernel log holds {} of other namespaces, none of this one",
                event_words(i.table_full_elsewhere)
            ));
        }
    }

    // Raise the maximum.
    let mut target_max = i.max;
    if let (false, Some(max)) = (pressure.is_empty(), i.max) {
        let needed = i.count.map_or(0, |c| c.saturating_mul(2).max(1).next_power_of_two());
        let recommended = ram_formula.unwrap_or(0).max(needed);
        if recommended > max {
            target_max = Some(recommended);
            let rec_buckets = kernel_rounded_buckets(recommended, i.page_size).max(i.buckets.unwrap_or(0));
            let mem = i.entry_bytes.map(|e| table_bytes(recommended, e, rec_buckets));
            let mem_now = match (i.entry_bytes, i.buckets) {
                (Some(e), Some(b)) => Some(table_bytes(max, e, b)),
                _ => None,
            };
            a.recommended_max_bytes = mem;
            let mut reason =
                format!("{}: raise nf_conntrack_max from {} to {recommended}", pressure.join("; "), thousands(max));
            match (ram_formula, i.ram_bytes) {
                (Some(f), Some(ram)) if f >= needed => {
                    let _ = write!(
                        reason,
                        " (the RAM formula: {} RAM / 16384 / ({}/32), rounded down to a power of two)",
                        human_bytes(ram),
                        i.pointer_bits
                    );
                }
                (Some(f), _) => {
                    let _ = write!(
                        reason,
                        " (twice the current count, rounded up to a power of two: above the RAM formula's {f}, \
                         so make sure the memory is there)"
                    );
                }
                (None, _) => {
                    let _ =
                        write!(reason, " (twice the current count, rounded up to a power of two; MemTotal unknown)");
                }
            }
            if let (Some(e), Some(m)) = (i.entry_bytes, mem) {
                let _ = write!(
                    reason,
                    "; a full table then costs up to {} ({e} bytes an entry, hash table included), against {} now",
                    human_bytes(m),
                    mem_now.map_or("an unknown amount".to_string(), human_bytes)
                );
            }
            if !i.initial {
                let _ = write!(reason, "; {host_only_note}");
            }
            a.recommendations.push(Recommendation::RaiseConntrackMax {
                reason,
                key: KEY_MAX.to_string(),
                current: max,
                recommended,
                ram_formula,
                memory_bytes_current: mem_now,
                memory_bytes: mem,
                host_only: true,
                applies_here: i.initial,
            });
        } else {
            a.notes.push(format!(
                "{}, but nf_conntrack_max ({}) is already at least the RAM formula{} and twice the current count: \
                 look at what fills the table rather than raising it further",
                pressure.join("; "),
                thousands(max),
                ram_formula.map(|f| format!(" ({})", thousands(f))).unwrap_or_default()
            ));
        }
    }

    // Buckets.
    if let (Some(b), Some(tm)) = (i.buckets, target_max) {
        let want = kernel_rounded_buckets(tm, i.page_size);
        if b < tm && b < want && b > 0 {
            let mut reason = format!(
                "with {} entries allowed and {} buckets a full table has hash chains of {:.1} entries on average; \
                 since 5.15 the kernel's default is one bucket per entry: set nf_conntrack_buckets to {want} \
                 (the kernel rounds to a multiple of {}), {} of hash table",
                thousands(tm),
                thousands(b),
                tm as f64 / b as f64,
                i.page_size / BUCKET_BYTES,
                human_bytes(want * BUCKET_BYTES)
            );
            if !i.initial {
                let _ = write!(reason, "; {host_only_note}");
            }
            a.recommendations.push(Recommendation::Buckets {
                reason,
                key: KEY_BUCKETS.to_string(),
                current: b,
                recommended: want,
                memory_bytes: want * BUCKET_BYTES,
                host_only: true,
                applies_here: i.initial,
            });
        }
    }

    // NOTRACK for the dominant stateless UDP services.
    let mut notrack = Vec::new();
    if let Some(f) = i.flows.filter(|f| f.scanned > 0) {
        for t in f.port_totals() {
            let Some(port) = t.port else { continue };
            if t.proto_number != 17 || t.count < NOTRACK_MIN_ENTRIES {
                continue;
            }
            let share = t.count as f64 / f.scanned as f64;
            if share < NOTRACK_MIN_SHARE {
                continue;
            }
            if t.nat * 100 > t.count {
                a.notes.push(format!(
                    "udp/{port} holds {} entries ({}), but {} of them are NATed: untracked packets skip NAT, so \
                     NOTRACK would break them",
                    thousands(t.count),
                    pct(share),
                    thousands(t.nat)
                ));
                continue;
            }
            if notrack.len() >= MAX_NOTRACK_PORTS {
                break;
            }
            let service = KNOWN_STATELESS_UDP.iter().find(|(p, _)| *p == port).map(|(_, s)| *s);
            let what = match service {
                Some(s) => format!("{s} is a stateless request/response service: conntrack buys it nothing"),
                None => "if the service is request/response and not NATed, conntrack buys it nothing \
                         (check before applying; --emit-policy leaves it as a comment)"
                    .to_string(),
            };
            let reason = format!(
                "udp/{port} holds {} of {} entries ({}); {what}, and a flood of queries fills the table; NOTRACK it \
                 in the raw table (both directions)",
                thousands(t.count),
                thousands(f.scanned),
                pct(share)
            );
            notrack.push(Recommendation::Notrack {
                reason,
                proto: "udp".to_string(),
                port,
                entries: t.count,
                share,
                known_stateless: service.is_some(),
                warning: UNTRACKED_WARNING.to_string(),
            });
        }
    }

    // Shorter UDP timeouts.
    if let Some(f) = i.flows.filter(|f| f.scanned > 0) {
        let udp = f.proto_total("udp");
        let share = udp as f64 / f.scanned as f64;
        let mut settings = Vec::new();
        if let Some(t) = i.udp_timeout.filter(|t| *t > UDP_TIMEOUT) {
            settings.push(SysctlSetting { key: KEY_UDP.to_string(), current: Some(t), recommended: UDP_TIMEOUT });
        }
        if let Some(t) = i.udp_timeout_stream.filter(|t| *t > UDP_TIMEOUT_STREAM) {
            settings.push(SysctlSetting {
                key: KEY_UDP_STREAM.to_string(),
                current: Some(t),
                recommended: UDP_TIMEOUT_STREAM,
            });
        }
        // Only under load: an idle table full of UDP entries costs nothing.
        let loaded = !pressure.is_empty() || usage.is_some_and(|u| u >= 0.5);
        let busy = loaded && share >= 0.3;
        if busy && !settings.is_empty() {
            let now: Vec<String> =
                settings.iter().map(|s| format!("{} = {}", short(&s.key), s.current.unwrap_or(0))).collect();
            let reason = format!(
                "UDP holds {} of {} entries ({}); a one-shot or unanswered UDP flow stays for nf_conntrack_udp_timeout \
                 and a two-way one for nf_conntrack_udp_timeout_stream ({} now): {UDP_TIMEOUT} s and \
                 {UDP_TIMEOUT_STREAM} s free the room sooner (per namespace)",
                thousands(udp),
                thousands(f.scanned),
                pct(share),
                now.join(", ")
            );
            a.recommendations.push(Recommendation::UdpTimeouts { reason, sysctl: settings });
        }
    }
    a.recommendations.extend(notrack);
    a
}

fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// How `plan`/`apply` name the target on their command line.
fn netns_flag(r: &Report) -> String {
    match &r.netns {
        Some(n) => format!(" --netns {n}"),
        None => String::new(),
    }
}

/// A ready policy file (TOML) for the target that applies the recommendations. Outside the
/// initial namespace host-only sysctls are left out with a comment saying so.
pub fn emit_policy(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# ctguard policy written by `ctguard doctor --emit-policy` for {}.", r.target);
    let _ = writeln!(s, "# Review it, then: ctguard plan --check{0} FILE; ctguard apply{0} FILE", netns_flag(r));
    if !r.unreadable.is_empty() {
        let what: Vec<&str> = r.unreadable.iter().map(|u| u.what.as_str()).collect();
        let _ = writeln!(s, "# The diagnosis was partial (could not read: {}):", what.join(", "));
        let _ = writeln!(s, "# recommendations that need those figures may be missing.");
    }
    let _ = writeln!(s, "backend = \"auto\"");
    let _ = writeln!(s, "persist = false");

    let notracks: Vec<(u16, u64, f64, bool)> = r
        .recommendations
        .iter()
        .filter_map(|x| match x {
            Recommendation::Notrack { port, entries, share, known_stateless, .. } => {
                Some((*port, *entries, *share, *known_stateless))
            }
            _ => None,
        })
        .collect();
    let included: Vec<&(u16, u64, f64, bool)> = notracks.iter().filter(|n| n.3).collect();
    let left: Vec<&(u16, u64, f64, bool)> = notracks.iter().filter(|n| !n.3).collect();
    if !included.is_empty() {
        let _ = writeln!(s);
        for (port, entries, share, _) in &included {
            let _ = writeln!(s, "# udp/{port}: {} entries ({} of the table).", thousands(*entries), pct(*share));
        }
        let _ = writeln!(s, "# Untracked packets are `ct state untracked`: a stateful filter drops them unless it");
        let _ = writeln!(s, "# accepts UNTRACKED for exactly these flows; accept_untracked = true inserts that accept");
        let _ = writeln!(s, "# where a filter chain needs it (`ctguard plan` lists where). They also skip NAT.");
        let _ = writeln!(s, "# local_only = true covers traffic addressed to this host only (not forwarded flows);");
        let _ =
            writeln!(s, "# flush_existing = true deletes the entries these flows hold now, freeing the room at once.");
        let _ = writeln!(s, "[[notrack]]");
        let _ = writeln!(s, "protocols = [\"udp\"]");
        let ports: Vec<String> = included.iter().map(|n| n.0.to_string()).collect();
        let _ = writeln!(s, "ports = [{}]", ports.join(", "));
        let _ = writeln!(s, "sources = []");
        let _ = writeln!(s, "interfaces = []");
        let _ = writeln!(s, "local_only = true");
        let _ = writeln!(s, "accept_untracked = true");
        let _ = writeln!(s, "flush_existing = true");
    }
    if !left.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "# Also dominant, left out: ctguard cannot tell whether these services are stateless");
        let _ = writeln!(s, "# request/response ones. Add a [[notrack]] entry for a port if it is (and is not NATed):");
        for (port, entries, share, _) in &left {
            let _ = writeln!(s, "#   udp/{port}: {} entries ({})", thousands(*entries), pct(*share));
        }
    }

    let mut here: Vec<(String, u64)> = Vec::new();
    let mut host_only: Vec<(String, u64)> = Vec::new();
    for x in &r.recommendations {
        match x {
            Recommendation::RaiseConntrackMax { key, recommended, .. }
            | Recommendation::Buckets { key, recommended, .. } => {
                if r.initial_namespace {
                    here.push((key.clone(), *recommended));
                } else {
                    host_only.push((key.clone(), *recommended));
                }
            }
            Recommendation::UdpTimeouts { sysctl, .. } => {
                here.extend(sysctl.iter().map(|t| (t.key.clone(), t.recommended)));
            }
            Recommendation::Notrack { .. } => {}
        }
    }
    if !here.is_empty() || !host_only.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "[sysctl]");
        for (k, v) in &here {
            let _ = writeln!(s, "\"{k}\" = {v}");
        }
        if !host_only.is_empty() {
            let _ = writeln!(s, "# Left out: this target is not the host, and only the initial network namespace can");
            let _ = writeln!(s, "# write these host-wide sysctls. Apply them on the host:");
            for (k, v) in &host_only {
                let _ = writeln!(s, "#   \"{k}\" = {v}");
            }
        }
    }
    if notracks.is_empty() && here.is_empty() && host_only.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "# Nothing to change: the doctor made no recommendation for this target.");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::flows::FlowAggregator;
    use crate::doctor::report::{Memory, UdpTimeouts};
    use crate::model::{parse_policy, Format};

    fn scan(lines: &[(u16, &str, u64, bool)]) -> FlowScan {
        let mut agg = FlowAggregator::default();
        for &(port, proto, n, nat) in lines {
            for i in 0..n {
                let sport = 1024 + i % 60000;
                let reply_src = if nat { "10.9.9.9" } else { "198.18.0.1" };
                let (num, state) = if proto == "tcp" { (6, "TIME_WAIT ") } else { (17, "") };
                agg.push_line(&format!(
                    "ipv4 2 {proto} {num} 20 {state}src=198.18.0.2 dst=198.18.0.1 sport={sport} dport={port} src={reply_src} dst=198.18.0.2 sport={port} dport={sport} mark=0 use=1"
                ));
            }
        }
        agg.finish()
    }

    fn inputs<'a>(flows: &'a FlowScan, drops: &'a DropCounters, initial: bool) -> Inputs<'a> {
        Inputs {
            initial,
            count: Some(flows.scanned),
            max: Some(262_144),
            buckets: Some(262_144),
            drops: Some(drops),
            table_full_here: 0,
            table_full_unattributed: 0,
            table_full_elsewhere: 0,
            ram_bytes: Some(24 << 30),
            entry_bytes: Some(256),
            flows: Some(flows),
            udp_timeout: Some(30),
            udp_timeout_stream: Some(120),
            pointer_bits: 64,
            page_size: 4096,
        }
    }

    fn report(initial: bool, a: Advice) -> Report {
        Report {
            target: "network namespace /run/netns/x".into(),
            netns: Some("x".into()),
            initial_namespace: initial,
            count: None,
            max: None,
            buckets: None,
            usage: None,
            drops: None,
            table_full_events: None,
            entry_bytes: None,
            memory: Memory::default(),
            entries: None,
            top_flows: Vec::new(),
            udp_timeouts: UdpTimeouts::default(),
            recommendations: a.recommendations,
            notes: a.notes,
            unreadable: Vec::new(),
            partial: false,
        }
    }

    #[test]
    fn dns_flood_without_pressure_gets_notrack_only() {
        let f = scan(&[(53, "udp", 3000, false), (8080, "tcp", 200, false)]);
        let d = DropCounters::default();
        let a = recommend(&inputs(&f, &d, false));
        let kinds: Vec<&str> = a.recommendations.iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, ["notrack"]);
        match &a.recommendations[0] {
            Recommendation::Notrack { port, entries, known_stateless, warning, .. } => {
                assert_eq!((*port, *entries, *known_stateless), (53, 3000, true));
                assert!(warning.contains("UNTRACKED"));
            }
            other => panic!("{other:?}"),
        }
        let text = emit_policy(&report(false, a));
        let p = parse_policy(&text, Format::Toml).expect("the emitted policy is valid");
        assert_eq!(p.notrack.len(), 1);
        assert!(p.notrack[0].has_port(crate::model::Proto::Udp, 53));
        assert!(!p.notrack[0].has_port(crate::model::Proto::Tcp, 53));
        assert!(p.notrack[0].accept_untracked);
        assert!(p.sysctl.is_empty());
    }

    #[test]
    fn full_table_in_a_namespace_leaves_host_only_sysctls_out() {
        let f = scan(&[(53, "udp", 900, false), (4000, "udp", 150, false)]);
        let d = DropCounters { drop: 500, early_drop: 3, insert_failed: 2, cpus: 2 };
        let mut i = inputs(&f, &d, false);
        i.max = Some(1000);
        i.count = Some(1000);
        i.table_full_unattributed = 7;
        let a = recommend(&i);
        let kinds: Vec<&str> = a.recommendations.iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, ["raise_conntrack_max", "buckets", "udp_timeouts", "notrack", "notrack"]);
        match &a.recommendations[0] {
            Recommendation::RaiseConntrackMax { recommended, reason, applies_here, memory_bytes, .. } => {
                // 24 GiB / 16384 / 2 = 786432 -> 524288.
                assert_eq!(*recommended, 524_288);
                assert!(reason.contains("524288"), "{reason}");
                assert!(reason.contains("another namespace"), "{reason}");
                assert!(reason.contains("initial network namespace"), "{reason}");
                assert!(!applies_here);
                assert_eq!(*memory_bytes, Some(524_288 * 256 + 524_288 * 8));
            }
            other => panic!("{other:?}"),
        }
        assert!(a.notes.iter().any(|n| n.contains("insert_failed")));
        let text = emit_policy(&report(false, a));
        let p = parse_policy(&text, Format::Toml).expect("valid");
        assert!(p.sysctl.keys().all(|k| !k.is_host_only()), "{text}");
        assert!(text.contains("#   \"net.netfilter.nf_conntrack_max\" = 524288"), "{text}");
        assert!(text.contains("only the initial network namespace"), "{text}");
        assert_eq!(p.sysctl.len(), 2, "udp timeouts stay: {text}");
        // udp/4000 is not a known stateless service: a comment only.
        assert!(text.contains("#   udp/4000"), "{text}");
        assert_eq!(p.notrack[0].ports.len(), 1);
    }

    #[test]
    fn host_target_gets_host_only_sysctls() {
        let f = scan(&[(53, "udp", 900, false)]);
        let d = DropCounters { drop: 5, ..Default::default() };
        let mut i = inputs(&f, &d, true);
        i.max = Some(2048);
        i.buckets = Some(1024);
        let a = recommend(&i);
        let text = emit_policy(&report(true, a));
        let p = parse_policy(&text, Format::Toml).expect("valid");
        let keys: Vec<&str> = p.sysctl.keys().map(|k| k.as_str()).collect();
        assert!(keys.contains(&"net.netfilter.nf_conntrack_max"), "{text}");
        assert!(keys.contains(&"net.netfilter.nf_conntrack_buckets"), "{text}");
    }

    #[test]
    fn natted_flows_are_not_notracked() {
        let f = scan(&[(53, "udp", 1000, true)]);
        let d = DropCounters::default();
        let a = recommend(&inputs(&f, &d, true));
        assert!(a.recommendations.is_empty(), "{:?}", a.recommendations);
        assert!(a.notes.iter().any(|n| n.contains("NATed")));
        let text = emit_policy(&report(true, a));
        assert!(text.contains("Nothing to change"));
        parse_policy(&text, Format::Toml).expect("valid");
    }

    #[test]
    fn pressure_but_max_already_high_is_a_note() {
        let f = scan(&[(80, "tcp", 200, false)]);
        let d = DropCounters { drop: 9, ..Default::default() };
        let mut i = inputs(&f, &d, true);
        i.max = Some(4_000_000);
        i.buckets = Some(4_000_000);
        let a = recommend(&i);
        assert!(a.recommendations.is_empty());
        assert!(a.notes.iter().any(|n| n.contains("already at least the RAM formula")), "{:?}", a.notes);
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(pct(0.0001), "<0.1%");
    }
}
