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

use super::flows::{FlowScan, Side, ORPHAN_IDLE_SECONDS};
use super::notrack::{Finding, NotrackFlow};
use super::parse::DropCounters;
use super::report::{Rates, Recommendation, Report, SysctlSetting};
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
/// Recommended `nf_conntrack_tcp_timeout_established` where idle entries dominate (kernel
/// default 432000, five days).
pub const TCP_TIMEOUT_ESTABLISHED: u64 = 3600;
/// Smallest share of the table idle ESTABLISHED entries must hold for the TCP advice.
pub const TCP_IDLE_MIN_SHARE: f64 = 0.3;

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
const KEY_TCP_ESTABLISHED: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";

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
    /// The counters over the sampling window; `None`: only totals (recommendations then rest
    /// on cumulative counters, and say so).
    pub rates: Option<&'a Rates>,
    /// `nf_conntrack_tcp_timeout_established`.
    pub tcp_timeout_established: Option<u64>,
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

/// The one number format of the doctor's text (screen, reasons, notes, policy comments): plain
/// digits, no separators — the form sysctl, nft and the policy file take, so a figure can be
/// copied as it is.
pub fn num(n: u64) -> String {
    n.to_string()
}

/// A rate with one decimal (`12.5`), or `<0.1` when it is above zero but smaller.
pub fn rate(per_second: f64) -> String {
    if per_second > 0.0 && per_second < 0.05 {
        "<0.1".to_string()
    } else {
        format!("{per_second:.1}")
    }
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
            pressure.push(format!("the table is {} full ({} of {})", pct(u), num(c), num(m)));
        }
    }
    match (i.rates, i.drops) {
        (Some(r), _) => {
            let w = r.window_seconds;
            let moved = |name: &str| r.get(name).filter(|c| c.during_window > 0);
            if let Some(c) = moved("drop") {
                pressure.push(format!(
                    "the kernel refused {} new entries for lack of room during the {w:.1} s window ({}/s)",
                    num(c.during_window),
                    rate(c.per_second)
                ));
            }
            if let Some(c) = moved("early_drop") {
                pressure.push(format!(
                    "it evicted {} entries to make room during the {w:.1} s window ({}/s)",
                    num(c.during_window),
                    rate(c.per_second)
                ));
            }
            if let Some(c) = moved("insert_failed") {
                a.notes.push(format!(
                    "insert_failed moved by {} during the {w:.1} s window ({}/s): packets of one new flow raced to \
                     create its entry (classically the parallel A/AAAA queries of a resolver over UDP); a bigger table \
                     does not help, NOTRACK for the flows does",
                    num(c.during_window),
                    rate(c.per_second)
                ));
            }
            if let Some(c) = moved("invalid") {
                a.notes.push(format!(
                    "invalid moved by {} during the {w:.1} s window ({}/s, {} since the namespace started): packets \
                     conntrack could not fit into a state (TCP segments outside the window, ICMP errors about flows it \
                     does not track — untracked ones included —, bad headers); a `ct state invalid drop` rule drops \
                     them; `sysctl net.netfilter.nf_conntrack_log_invalid=255` logs why",
                    num(c.during_window),
                    rate(c.per_second),
                    num(c.total)
                ));
            }
            let past: Vec<String> = r
                .counters
                .iter()
                .filter(|c| matches!(c.counter.as_str(), "drop" | "early_drop" | "insert_failed" | "invalid"))
                .filter(|c| c.total > 0 && c.during_window == 0)
                .map(|c| format!("{} {} ({})", c.counter, num(c.total), c.last_moved))
                .collect();
            if !past.is_empty() {
                a.notes.push(format!(
                    "cumulative counters that did not move during the {w:.1} s window: {}; they tell the past, not \
                     what happens now, so no recommendation rests on them",
                    past.join(", ")
                ));
            }
        }
        (None, Some(d)) => {
            let cum = "cumulative since the namespace started: --window measures what moves now";
            if d.drop > 0 {
                pressure.push(format!(
                    "the kernel refused {} new entries for lack of room (drop counter, {cum})",
                    num(d.drop)
                ));
            }
            if d.early_drop > 0 {
                pressure.push(format!("it evicted {} entries to make room (early_drop, {cum})", num(d.early_drop)));
            }
            if d.insert_failed > 0 {
                a.notes.push(format!(
                    "insert_failed = {} ({cum}): packets of one new flow raced to create its entry (classically the \
                     parallel A/AAAA queries of a resolver over UDP); a bigger table does not help, NOTRACK for the \
                     flows does",
                    num(d.insert_failed)
                ));
            }
            if let Some(v) = d.invalid.filter(|v| *v > 0) {
                a.notes.push(format!(
                    "invalid = {} ({cum}): packets conntrack could not fit into a state; a `ct state invalid drop` \
                     rule drops them",
                    num(v)
                ));
            }
        }
        (None, None) => {}
    }
    let full_all = i.table_full_here + i.table_full_unattributed + i.table_full_elsewhere;
    let event_words =
        |n: u64| format!("{} \"table full, dropping packet\" event{}", num(n), if n == 1 { "" } else { "s" });
    // With a window the drop counter says whether the table is full now; the log is history.
    if i.rates.is_none() {
        if i.initial && full_all > 0 {
            let others = if i.table_full_elsewhere > 0 {
                format!(" ({} in other namespaces: the limit is host-wide)", num(i.table_full_elsewhere))
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
                    "the kernel log holds {} naming no namespace (the log is host-wide: they may come from another \
                     one)",
                    event_words(i.table_full_unattributed)
                ));
            }
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
                format!("{}: raise nf_conntrack_max from {} to {recommended}", pressure.join("; "), num(max));
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
                num(max),
                ram_formula.map(|f| format!(" ({})", num(f))).unwrap_or_default()
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
                num(tm),
                num(b),
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
        // Per UDP port and side: what this host serves (server, or local clients of a local
        // service: the policy's NOTRACK covers loopback), what it queries (client), the rest.
        let mut served: Vec<(u16, u64, u64, Side)> = Vec::new();
        let mut queried: Vec<(u16, u64)> = Vec::new();
        for t in f.port_totals() {
            let Some(port) = t.port else { continue };
            if t.proto_number != 17 {
                continue;
            }
            match t.direction {
                Side::Client => match queried.iter_mut().find(|q| q.0 == port) {
                    Some(q) => q.1 += t.count,
                    None => queried.push((port, t.count)),
                },
                Side::Forwarded => {
                    let share = t.count as f64 / f.scanned as f64;
                    if t.count >= NOTRACK_MIN_ENTRIES && share >= NOTRACK_MIN_SHARE {
                        a.notes.push(format!(
                            "udp/{port} holds {} forwarded entries ({}): neither end is this host, so the policy's \
                             local_only NOTRACK does not cover them (NOTRACK them where they are served)",
                            num(t.count),
                            pct(share)
                        ));
                    }
                }
                side => match served.iter_mut().find(|q| q.0 == port) {
                    Some(q) => {
                        q.1 += t.count;
                        q.2 += t.nat;
                        if q.3 == Side::Local {
                            q.3 = side;
                        }
                    }
                    None => served.push((port, t.count, t.nat, side)),
                },
            }
        }
        served.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        queried.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (port, count, nat, side) in served {
            if count < NOTRACK_MIN_ENTRIES {
                continue;
            }
            let share = count as f64 / f.scanned as f64;
            if share < NOTRACK_MIN_SHARE {
                continue;
            }
            if nat * 100 > count {
                a.notes.push(format!(
                    "udp/{port} holds {} entries ({}), but {} of them are NATed: untracked packets skip NAT, so \
                     NOTRACK would break them",
                    num(count),
                    pct(share),
                    num(nat)
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
            let who = match side {
                Side::Server => "queries this host serves",
                Side::Local => "local queries to a service on this host",
                _ => "entries (the local addresses are unknown, so the side is too)",
            };
            let reason = format!(
                "udp/{port} holds {} of {} entries ({}), {who}; {what}, and a flood of queries fills the table; \
                 NOTRACK it in the raw table (both directions)",
                num(count),
                num(f.scanned),
                pct(share)
            );
            notrack.push(Recommendation::Notrack {
                reason,
                proto: "udp".to_string(),
                port,
                entries: count,
                share,
                known_stateless: service.is_some(),
                warning: UNTRACKED_WARNING.to_string(),
                direction: side,
            });
        }
        for (port, count) in queried {
            let share = count as f64 / f.scanned as f64;
            if count < NOTRACK_MIN_ENTRIES || share < NOTRACK_MIN_SHARE || notrack.len() >= MAX_NOTRACK_PORTS {
                continue;
            }
            let ups = f.upstreams_of("udp", port);
            let list = ups.map(|u| u.addresses.clone()).unwrap_or_default();
            let more = ups.is_some_and(|u| u.more);
            let reason = format!(
                "udp/{port} holds {} of {} entries ({}), this host's own queries (the client side: the original \
                 source is a local address) to {} upstream{}{}{}; NOTRACK for them must notrack output by \
                 destination port and prerouting by source port, and the replies' untracked accept must be restricted \
                 to the upstreams (else every local port opens to source port {port}); the policy schema has no \
                 querying entry yet, so --emit-policy lists the upstreams as a comment instead of an entry",
                num(count),
                num(f.scanned),
                pct(share),
                list.len(),
                if list.len() == 1 { "" } else { "s" },
                if list.is_empty() { String::new() } else { format!(" ({})", list.join(", ")) },
                if more { ", and more" } else { "" }
            );
            notrack.push(Recommendation::ClientFlows {
                reason,
                proto: "udp".to_string(),
                port,
                entries: count,
                share,
                upstreams: list,
            });
        }
    }

    // Idle ESTABLISHED TCP entries (orphans: the peer went away without FIN or RST) at the
    // five-day default timeout.
    if let (Some(f), Some(t)) = (i.flows.filter(|f| f.scanned > 0), i.tcp_timeout_established) {
        let idle = f.tcp_established_idle;
        let share = idle as f64 / f.scanned as f64;
        if t > TCP_TIMEOUT_ESTABLISHED && idle >= NOTRACK_MIN_ENTRIES && share >= TCP_IDLE_MIN_SHARE {
            let reason = format!(
                "{} of {} entries ({}) are ESTABLISHED TCP connections that saw no packet for at least {} s (idle = \
                 nf_conntrack_tcp_timeout_established − seconds left; {} ESTABLISHED in all): orphans whose peer went \
                 away without FIN or RST hold their entry for nf_conntrack_tcp_timeout_established = {t} s ({:.1} \
                 days); lower it to {TCP_TIMEOUT_ESTABLISHED} (per namespace; kube-proxy uses 86400). A connection \
                 idle for longer without keepalives gets a new entry from its next packet, which a stateful filter \
                 sees as new",
                num(idle),
                num(f.scanned),
                pct(share),
                ORPHAN_IDLE_SECONDS,
                num(f.tcp_established),
                t as f64 / 86400.0
            );
            a.recommendations.push(Recommendation::TcpTimeout {
                reason,
                sysctl: SysctlSetting {
                    key: KEY_TCP_ESTABLISHED.to_string(),
                    current: Some(t),
                    recommended: TCP_TIMEOUT_ESTABLISHED,
                },
                idle_established: idle,
                established: f.tcp_established,
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
                num(udp),
                num(f.scanned),
                pct(share),
                now.join(", ")
            );
            a.recommendations.push(Recommendation::UdpTimeouts { reason, sysctl: settings });
        }
    }
    a.recommendations.extend(notrack);
    a
}

/// The recommendations for broken NOTRACK setups (issue 13), from the findings of
/// [`super::notrack::check`]: a blackhole of a hand-made rule each, an open port range each,
/// and one for ctguard's own policy when its accepts are gone. `scan` names upstreams seen.
pub fn broken_setups(findings: &[Finding], scan: Option<&FlowScan>) -> Vec<Recommendation> {
    let mut out = Vec::new();
    let mut degraded: Vec<String> = Vec::new();
    let side_words = |n: &NotrackFlow| match n.side {
        Side::Server => "flows this host serves",
        Side::Client => "this host's own queries and their replies",
        _ => "flows",
    };
    for f in findings {
        match f {
            Finding::Blackhole { notrack, chain, dropped_by, .. } if notrack.ctguard => {
                degraded.push(format!(
                    "{} {} notracked by `{}` ({}), dropped untracked by `{}` in {chain}",
                    notrack.describe(),
                    notrack.hook_word(),
                    notrack.at.rule,
                    notrack.at.chain,
                    dropped_by.rule
                ));
            }
            Finding::Blackhole { notrack, proto, chain, dropped_by, fix_command } => {
                let reason = format!(
                    "the NOTRACK rule `{}` ({}) notracks {} ({}), and {chain} drops these untracked \
                     packets at `{}` while it accepts them tracked: the {proto} service gets no traffic through \
                     (a NOTRACK without its UNTRACKED accept)",
                    notrack.at.rule,
                    notrack.at.chain,
                    notrack.describe(),
                    side_words(notrack),
                    dropped_by.rule
                );
                let fix = format!(
                    "accept exactly these untracked packets just before that rule: `{fix_command}`; or replace the \
                     hand-made NOTRACK by ctguard's policy (`ctguard doctor --emit-policy`), which inserts that \
                     accept, tagged, and puts it back after a firewall reload"
                );
                out.push(Recommendation::Blackhole {
                    reason,
                    fix,
                    notrack: notrack.at.clone(),
                    dropped_by: dropped_by.clone(),
                    proto: proto.to_string(),
                    flow: notrack.describe(),
                    direction: notrack.side,
                });
            }
            Finding::Open { notrack, proto, accepted_by } => {
                let sport = if notrack.sports.is_empty() {
                    "any source port".to_string()
                } else {
                    format!(
                        "source port {}",
                        notrack.sports.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                    )
                };
                let from = if notrack.saddr.is_empty() {
                    "from any address".to_string()
                } else {
                    format!("from {}", notrack.saddr.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
                };
                let reason = format!(
                    "any local port is reachable from {sport}: the NOTRACK rule `{}` ({}) notracks {proto} packets \
                     by source port without a destination port ({}), and `{}` ({}) accepts every untracked packet \
                     whatever its destination port; so a {proto} packet {from} with {sport} reaches every local \
                     listener, and its source port is the sender's choice",
                    notrack.at.rule,
                    notrack.at.chain,
                    notrack.describe(),
                    accepted_by.rule,
                    accepted_by.chain
                );
                let port = notrack.sports.first().map(|p| p.lo);
                let ups = match (scan, port) {
                    (Some(s), Some(p)) => s.upstreams_of(proto.as_str(), p).map(|u| u.addresses.join(", ")),
                    _ => None,
                };
                let fix = format!(
                    "restrict the untracked accept (and the NOTRACK) to the upstream servers and this flow, e.g. \
                     `-s UPSTREAM -p {proto} --sport {} -m conntrack --ctstate UNTRACKED -j ACCEPT` in place of `{}`{}; \
                     or remove both rules and let conntrack track the queries (ctguard's policy has no querying \
                     entry yet)",
                    port.map_or("PORT".to_string(), |p| p.to_string()),
                    accepted_by.rule,
                    ups.map(|u| format!(" (upstreams seen in the table: {u})")).unwrap_or_default()
                );
                out.push(Recommendation::UntrackedOpen {
                    reason,
                    fix,
                    notrack: notrack.at.clone(),
                    accepted_by: accepted_by.clone(),
                    proto: proto.to_string(),
                    flow: notrack.describe(),
                });
            }
        }
    }
    if !degraded.is_empty() {
        let reason = format!(
            "ctguard's policy is degraded: its NOTRACK objects are in place but the accepts it inserted are gone (a \
             firewall reload?), so {} blackholed: {}",
            if degraded.len() == 1 { "this flow is".to_string() } else { format!("{} flows are", degraded.len()) },
            degraded.join("; ")
        );
        let fix = "see `ctguard status` (the agent's guard puts the accepts back while it runs, or removes the \
                   NOTRACK when that would widen access); re-apply the committed policy with `ctguard apply --from \
                   TXID` (the id in `ctguard status` / `ctguard history`), or remove it with `ctguard apply --remove`"
            .to_string();
        out.insert(0, Recommendation::CtguardDegraded { reason, fix, blackholes: degraded });
    }
    out
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
    // Hand-made server-side NOTRACK rules: the entries that replace them (grouped by the
    // clients and interfaces they are restricted to).
    type Group = (Vec<String>, Vec<String>, Vec<crate::model::Proto>, Vec<crate::model::PortRange>, Vec<String>);
    let mut handmade: Vec<Group> = Vec::new();
    let mut client_rules: Vec<&super::report::NotrackRuleInfo> = Vec::new();
    for n in r.notrack_rules.iter().flatten().filter(|n| !n.ctguard) {
        if n.direction == Side::Client {
            client_rules.push(n);
            continue;
        }
        if n.direction != Side::Server
            || n.ports.is_empty()
            || n.interfaces.iter().all(|i| i == "lo") && !n.interfaces.is_empty()
        {
            continue;
        }
        let peers: Vec<String> = n.peers.iter().map(ToString::to_string).collect();
        let key = (peers, n.interfaces.clone());
        let g = match handmade.iter_mut().find(|g| g.0 == key.0 && g.1 == key.1) {
            Some(g) => g,
            None => {
                handmade.push((key.0, key.1, Vec::new(), Vec::new(), Vec::new()));
                handmade.last_mut().expect("just pushed")
            }
        };
        for p in &n.protocols {
            if !g.2.contains(p) {
                g.2.push(*p);
            }
        }
        for p in &n.ports {
            if !g.3.contains(p) {
                g.3.push(*p);
            }
        }
        g.4.push(format!("`{}` ({})", n.notrack.rule, n.notrack.chain));
    }
    let covered = |port: u16| {
        handmade.iter().any(|g| g.2.contains(&crate::model::Proto::Udp) && g.3.iter().any(|r| r.contains(port)))
    };
    let included: Vec<&(u16, u64, f64, bool)> = notracks.iter().filter(|n| n.3 && !covered(n.0)).collect();
    let left: Vec<&(u16, u64, f64, bool)> = notracks.iter().filter(|n| !n.3 && !covered(n.0)).collect();
    for (peers, ifaces, mut protos, mut ports, rules) in handmade {
        protos.sort();
        ports.sort();
        let q = |v: &[String]| v.iter().map(|x| format!("\"{x}\"")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(s);
        let _ = writeln!(s, "# Replaces the hand-made NOTRACK rules (server side: flows this host serves):");
        for rule in &rules {
            let _ = writeln!(s, "#   {rule}");
        }
        let _ = writeln!(s, "# with the accept for their untracked packets where a filter chain needs it. After");
        let _ = writeln!(
            s,
            "# `ctguard apply` and `confirm`, delete the hand-made rules (and any blanket UNTRACKED accept)."
        );
        let _ = writeln!(s, "[[notrack]]");
        let _ = writeln!(s, "protocols = [{}]", q(&protos.iter().map(|p| p.to_string()).collect::<Vec<_>>()));
        let _ = writeln!(s, "ports = [{}]", q(&ports.iter().map(|p| p.to_string()).collect::<Vec<_>>()));
        let _ = writeln!(s, "sources = [{}]", q(&peers));
        let _ = writeln!(s, "interfaces = [{}]", q(&ifaces));
        let _ = writeln!(s, "local_only = true");
        let _ = writeln!(s, "accept_untracked = true");
        let _ = writeln!(s, "flush_existing = false");
    }
    if !included.is_empty() {
        let _ = writeln!(s);
        for (port, entries, share, _) in &included {
            let _ = writeln!(
                s,
                "# udp/{port}: {} entries ({} of the table), served by this host.",
                num(*entries),
                pct(*share)
            );
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
            let _ = writeln!(s, "#   udp/{port}: {} entries ({})", num(*entries), pct(*share));
        }
    }

    let clients: Vec<(&str, u16, u64, &[String])> = r
        .recommendations
        .iter()
        .filter_map(|x| match x {
            Recommendation::ClientFlows { proto, port, entries, upstreams, .. } => {
                Some((proto.as_str(), *port, *entries, upstreams.as_slice()))
            }
            _ => None,
        })
        .collect();
    // Client side: this host's own queries to upstreams fill the table. A querying entry
    // notracks them both ways; its untracked accept for the answers carries the upstream
    // prefixes (an accept by source port alone would open every local port to spoofed packets).
    for (proto, port, entries, ups) in clients.iter().filter(|c| !c.3.is_empty()) {
        let q = |v: &[String]| v.iter().map(|x| format!("\"{x}\"")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "# {proto}/{port}: {} entries are this host's own queries (a resolver's upstream queries);",
            num(*entries)
        );
        let _ = writeln!(s, "# their answers are accepted untracked only from these upstreams. Add any upstream");
        let _ = writeln!(s, "# not seen during the diagnosis before applying.");
        let _ = writeln!(s, "[[notrack]]");
        let _ = writeln!(s, "protocols = [\"{proto}\"]");
        let _ = writeln!(s, "ports = [{port}]");
        let _ = writeln!(s, "side = \"querying\"");
        let _ = writeln!(s, "upstreams = [{}]", q(ups));
        let _ = writeln!(s, "accept_untracked = true");
        let _ = writeln!(s, "flush_existing = true");
    }
    let unknown: Vec<&(&str, u16, u64, &[String])> = clients.iter().filter(|c| c.3.is_empty()).collect();
    if !unknown.is_empty() || !client_rules.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "# Client-side flows written as comments only (no upstream addresses to restrict to):");
        for (proto, port, entries, _) in &unknown {
            let _ = writeln!(
                s,
                "#   {proto}/{port}: {} entries of this host's queries; upstreams seen: none recorded",
                num(*entries)
            );
        }
        for n in &client_rules {
            let peers: Vec<String> = n.peers.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                s,
                "#   hand-made `{}` ({}): {}; upstreams it names: {}",
                n.notrack.rule,
                n.notrack.chain,
                n.flow,
                if peers.is_empty() { "none (any address)".to_string() } else { peers.join(", ") }
            );
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
            Recommendation::TcpTimeout { sysctl, .. } => here.push((sysctl.key.clone(), sysctl.recommended)),
            _ => {}
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
    if notracks.is_empty() && here.is_empty() && host_only.is_empty() && !s.contains("[[notrack]]") {
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
            rates: None,
            tcp_timeout_established: Some(432_000),
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
            rates: None,
            tcp_timeout_established: None,
            notrack_rules: None,
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
        let d = DropCounters { drop: 500, early_drop: 3, insert_failed: 2, cpus: 2, ..Default::default() };
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
                assert!(reason.contains("may come from another one"), "{reason}");
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

    fn rates(drop: (u64, u64), insert_failed: (u64, u64), invalid: (u64, u64)) -> Rates {
        let row = |name: &str, (total, during): (u64, u64)| crate::doctor::report::CounterRate {
            counter: name.to_string(),
            total,
            during_window: during,
            per_second: during as f64 / 2.0,
            last_moved: if during > 0 { "during the window".into() } else { "not during the window".into() },
        };
        Rates {
            window_seconds: 2.0,
            counters: vec![
                row("drop", drop),
                row("early_drop", (0, 0)),
                row("insert_failed", insert_failed),
                row("invalid", invalid),
            ],
        }
    }

    #[test]
    fn rates_not_totals() {
        let f = scan(&[(80, "tcp", 200, false)]);
        let d = DropCounters { drop: 5000, insert_failed: 40, invalid: Some(9), ..Default::default() };
        let mut i = inputs(&f, &d, true);
        i.max = Some(2048);
        i.buckets = Some(2048);
        // Old drops, nothing moving now: no raise, and a note that says why.
        let quiet = rates((5000, 0), (40, 0), (9, 0));
        i.rates = Some(&quiet);
        let a = recommend(&i);
        assert!(a.recommendations.is_empty(), "{:?}", a.recommendations);
        let note = a.notes.iter().find(|n| n.contains("did not move")).expect("a note about past counters");
        assert!(
            note.contains("drop 5000") && note.contains("insert_failed 40") && note.contains("invalid 9"),
            "{note}"
        );
        // Drops moving now: the raise, with the rate.
        let busy = rates((5000, 300), (40, 4), (9, 20));
        i.rates = Some(&busy);
        let a = recommend(&i);
        let kinds: Vec<&str> = a.recommendations.iter().map(|r| r.kind()).collect();
        assert_eq!(kinds[0], "raise_conntrack_max", "{kinds:?}");
        assert!(
            a.recommendations[0].reason().contains("300 new entries")
                && a.recommendations[0].reason().contains("150.0/s")
        );
        assert!(a.notes.iter().any(|n| n.starts_with("insert_failed moved by 4")), "{:?}", a.notes);
        assert!(a.notes.iter().any(|n| n.starts_with("invalid moved by 20")), "{:?}", a.notes);
    }

    fn scan_sides(server: u64, client: u64, idle_tcp: u64) -> FlowScan {
        use crate::doctor::flows::LocalAddrs;
        let locals = LocalAddrs::parse(Some("Local:\n  |-- 198.18.0.1\n     /32 host LOCAL\n"), None);
        let mut agg = FlowAggregator::default().with_locals(locals).with_tcp_timeout_established(Some(432_000));
        for i in 0..server {
            agg.push_line(&format!("ipv4 2 udp 17 20 src=198.18.0.2 dst=198.18.0.1 sport={} dport=53 src=198.18.0.1 dst=198.18.0.2 sport=53 dport={} mark=0 use=1", 1024 + i, 1024 + i));
        }
        for i in 0..client {
            let up = if i % 2 == 0 { "192.0.2.53" } else { "192.0.2.54" };
            agg.push_line(&format!("ipv4 2 udp 17 20 src=198.18.0.1 dst={up} sport={} dport=53 src={up} dst=198.18.0.1 sport=53 dport={} mark=0 use=1", 1024 + i, 1024 + i));
        }
        for i in 0..idle_tcp {
            agg.push_line(&format!("ipv4 2 tcp 6 400000 ESTABLISHED src=198.18.0.2 dst=198.18.0.1 sport={} dport=5432 src=198.18.0.1 dst=198.18.0.2 sport=5432 dport={} [ASSURED] mark=0 use=1", 1024 + i, 1024 + i));
        }
        agg.finish()
    }

    #[test]
    fn directions_tell_served_from_queried() {
        let f = scan_sides(300, 2000, 0);
        let sides: Vec<(Option<u16>, Side, u64)> = f.top(5).iter().map(|g| (g.port, g.direction, g.count)).collect();
        assert_eq!(sides, vec![(Some(53), Side::Client, 2000), (Some(53), Side::Server, 300)]);
        assert_eq!(
            f.upstreams_of("udp", 53).map(|u| u.addresses.clone()),
            Some(vec!["192.0.2.53".into(), "192.0.2.54".into()])
        );
        let d = DropCounters::default();
        let a = recommend(&inputs(&f, &d, false));
        let kinds: Vec<&str> = a.recommendations.iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, ["notrack", "client_flows"], "{:?}", a.recommendations);
        assert!(a.recommendations[1].reason().contains("192.0.2.53, 192.0.2.54"));
        let text = emit_policy(&report(false, a));
        let p = parse_policy(&text, Format::Toml).expect("valid");
        // The served flows, and the resolver's own queries as a querying entry restricted to
        // the upstreams seen.
        assert_eq!(p.notrack.len(), 2, "{text}");
        assert!(
            text.contains("side = \"querying\"") && text.contains("upstreams = [\"192.0.2.53\", \"192.0.2.54\"]"),
            "{text}"
        );
        // Only the resolver's own queries: no server-side entry at all.
        let f = scan_sides(0, 2000, 0);
        let a = recommend(&inputs(&f, &d, false));
        assert!(a.recommendations.iter().all(|r| r.kind() != "notrack"), "{:?}", a.recommendations);
        let text = emit_policy(&report(false, a));
        let p = parse_policy(&text, Format::Toml).expect("valid");
        assert!(p.notrack.iter().all(|n| !n.serves() && n.queries()), "{text}");
    }

    #[test]
    fn idle_established_entries_get_the_tcp_timeout_advice() {
        let f = scan_sides(0, 0, 500);
        assert_eq!((f.tcp_established, f.tcp_established_idle), (500, 500));
        let d = DropCounters::default();
        let a = recommend(&inputs(&f, &d, false));
        match a.recommendations.as_slice() {
            [Recommendation::TcpTimeout { sysctl, idle_established, .. }] => {
                assert_eq!((sysctl.current, sysctl.recommended, *idle_established), (Some(432_000), 3600, 500));
            }
            other => panic!("{other:?}"),
        }
        let text = emit_policy(&report(false, a));
        let p = parse_policy(&text, Format::Toml).expect("valid");
        assert_eq!(p.sysctl.len(), 1, "{text}");
        // Fresh connections (timeout near the maximum) are not orphans.
        let mut agg = FlowAggregator::default().with_tcp_timeout_established(Some(432_000));
        agg.push_line("ipv4 2 tcp 6 431990 ESTABLISHED src=198.18.0.2 dst=198.18.0.1 sport=1 dport=5432 src=198.18.0.1 dst=198.18.0.2 sport=5432 dport=1 [ASSURED] mark=0 use=1");
        assert_eq!(agg.finish().tcp_established_idle, 0);
    }

    #[test]
    fn handmade_setup_is_replaced_by_the_emitted_policy() {
        use crate::doctor::notrack::{check, notrack_flows, Firewall};
        let text = "*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -s 10.0.0.0/8 -p udp -m udp --dport 53 -j NOTRACK
-A OUTPUT -d 10.0.0.0/8 -p udp -m udp --sport 53 -j NOTRACK
-A PREROUTING -p udp -m udp --sport 123 -j NOTRACK
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p udp -m udp --dport 53 -m state --state NEW -j ACCEPT
COMMIT
";
        let fw =
            Firewall::parse(None, &[(crate::live::fw::IptVariant::Legacy, false, text.to_string())]).expect("parses");
        let flows = notrack_flows(&fw);
        let recs = broken_setups(&check(&fw, &flows), None);
        let kinds: Vec<&str> = recs.iter().map(|r| r.kind()).collect();
        // udp/53 from 10/8 is dropped untracked; sport 123 replies are dropped too.
        assert_eq!(kinds, ["blackhole", "blackhole"], "{recs:#?}");
        assert!(recs[0].reason().contains("-A PREROUTING -s 10.0.0.0/8 -p udp -m udp --dport 53 -j NOTRACK"));
        assert!(recs[0].reason().contains("the chain's policy (drop)"), "{}", recs[0].reason());
        assert!(recs[0].fix().is_some_and(|f| f.contains("iptables-legacy -A INPUT -s 10.0.0.0/8 -p udp -m multiport --dports 53 -m conntrack --ctstate UNTRACKED -j ACCEPT")), "{:?}", recs[0].fix());
        let mut r = report(true, Advice { recommendations: recs, ..Default::default() });
        r.notrack_rules = Some(flows.iter().map(|f| f.info()).collect());
        let policy = emit_policy(&r);
        let p = parse_policy(&policy, Format::Toml).expect("valid");
        assert_eq!(p.notrack.len(), 1, "{policy}");
        assert_eq!(p.notrack[0].sources.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.0/8"]);
        assert!(p.notrack[0].has_port(crate::model::Proto::Udp, 53) && p.notrack[0].accept_untracked);
        assert!(policy.contains("Replaces the hand-made NOTRACK rules"), "{policy}");
        assert!(policy.contains("hand-made `-A PREROUTING -p udp -m udp --sport 123 -j NOTRACK`"), "{policy}");
    }

    #[test]
    fn number_formats() {
        assert_eq!(num(0), "0");
        assert_eq!(num(999), "999");
        assert_eq!(num(1000), "1000");
        assert_eq!(num(1_234_567), "1234567");
        assert_eq!(rate(0.01), "<0.1");
        assert_eq!(rate(12.25), "12.2");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(pct(0.0001), "<0.1%");
    }
}
