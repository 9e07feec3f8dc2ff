//! The doctor's report (pure): what was observed, what to change and why, what could not be
//! read. Serialises to the `--json` document (DESIGN §5, the doctor issue's keys) and renders
//! the node_exporter textfile format.

use std::fmt::Write as _;

use serde::Serialize;

use super::flows::{FlowGroup, FlowScan, Side};
use super::notrack::RuleRef;
use super::parse::DropCounters;

/// Something the doctor could not read; the report is partial, never an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    /// What it is (`nf_conntrack_count`, `kernel log`, …).
    pub what: String,
    /// The file or command.
    pub path: String,
    /// Why, one line.
    pub error: String,
}

/// One "table full, dropping packet" record of the kernel log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEvent {
    /// Inode of the namespace the kernel names (6.x); `null` when it names none.
    pub netns: Option<u64>,
    /// True when that is the target.
    pub in_target: bool,
    /// When, in seconds since boot (the kernel's printk clock).
    pub seconds_since_boot: f64,
    /// The same as UTC wall-clock time (RFC 3339), converted as `dmesg -T` does.
    pub time: Option<String>,
}

/// What the kernel log says about a full table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableFullEvents {
    /// "table full, dropping packet" records in the log buffer, all namespaces.
    pub count: u64,
    /// Those naming the target namespace (kernels that name it: 6.x).
    pub in_target: u64,
    /// Those naming another namespace.
    pub other_namespaces: u64,
    /// Those naming none (older kernels): they may come from any namespace.
    pub unattributed: u64,
    /// Inode of the target namespace, as the kernel names namespaces in the log.
    pub target_netns_inode: Option<u64>,
    /// Their times (the first and the latest ones when there are many).
    pub events: Vec<LogEvent>,
    /// Sum of `net_ratelimit: N callbacks suppressed`: messages the kernel did not print.
    pub ratelimit_suppressed: u64,
    /// What `ratelimit_suppressed` means.
    pub ratelimit_note: String,
    /// Always true: the kernel log is shared by every network namespace.
    pub host_wide: bool,
    /// The oldest record read (seconds since boot): events before it are gone from the buffer.
    pub log_since_seconds: Option<f64>,
    /// Records read.
    pub records: u64,
    /// Records overwritten by the kernel while they were read.
    pub lost: u64,
}

/// Memory the table costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Memory {
    /// `MemTotal`.
    pub ram_bytes: Option<u64>,
    /// Bytes per entry (slab object size of `nf_conntrack`).
    pub per_entry_bytes: Option<u64>,
    /// Entries at the current maximum plus the hash table (8 bytes a bucket): the worst case.
    pub current_max_bytes: Option<u64>,
    /// The same at the recommended maximum and buckets, when a raise is recommended.
    pub recommended_max_bytes: Option<u64>,
    /// What the RAM formula gives for this machine (DESIGN §6).
    pub ram_formula_max: Option<u64>,
}

/// How the entries were read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntriesInfo {
    /// The file or command they were streamed from.
    pub source: String,
    /// Seconds the read and aggregation took.
    pub seconds: f64,
    /// The scan's figures.
    #[serde(flatten)]
    pub scan: FlowScan,
}

/// The UDP timeouts of the target (per namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct UdpTimeouts {
    /// `nf_conntrack_udp_timeout` (seconds; one-shot and unanswered flows).
    pub udp_timeout: Option<u64>,
    /// `nf_conntrack_udp_timeout_stream` (seconds; flows seen both ways for a while).
    pub udp_timeout_stream: Option<u64>,
}

/// One counter of `/proc/net/stat/nf_conntrack`, total and over the sampling window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CounterRate {
    /// `drop`, `early_drop`, `insert_failed`, `invalid`, `found`, `insert`.
    pub counter: String,
    /// Since the namespace started (summed over CPUs).
    pub total: u64,
    /// Increase during the window.
    pub during_window: u64,
    /// The same per second.
    pub per_second: f64,
    /// When it last moved, in words: `during the window`, `never`, or `not during the window`
    /// with what else tells (the latest "table full" event for `drop`).
    pub last_moved: String,
}

/// What the counters did while the doctor watched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rates {
    /// Length of the window, seconds (the two samples' distance).
    pub window_seconds: f64,
    /// The counters.
    pub counters: Vec<CounterRate>,
}

impl Rates {
    /// The counter named `name`.
    pub fn get(&self, name: &str) -> Option<&CounterRate> {
        self.counters.iter().find(|c| c.counter == name)
    }
}

/// The NOTRACK rules found in the live ruleset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotrackRuleInfo {
    /// Where.
    pub notrack: RuleRef,
    /// The flow, in words.
    pub flow: String,
    /// `server` or `client` (or `?` for a rule without ports).
    pub direction: Side,
    /// ctguard's own.
    pub ctguard: bool,
    /// `prerouting` or `output`.
    pub hook: crate::live::fw::FwHook,
    /// Protocols.
    pub protocols: Vec<crate::model::Proto>,
    /// The service's ports (destination ports server-side in, source ports server-side out,
    /// the upstreams' port client-side).
    pub ports: Vec<crate::model::PortRange>,
    /// The remote side's prefixes the rule restricts to (clients server-side, upstreams
    /// client-side); empty: any.
    pub peers: Vec<crate::model::Prefix>,
    /// Interfaces the rule restricts to; empty: any.
    pub interfaces: Vec<String>,
}

/// A sysctl value a recommendation would write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SysctlSetting {
    /// The key.
    pub key: String,
    /// Its value now.
    pub current: Option<u64>,
    /// The value recommended.
    pub recommended: u64,
}

/// One recommendation, with its reason. Serialised with a `kind` tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Recommendation {
    /// Raise `nf_conntrack_max` (host-wide).
    RaiseConntrackMax {
        /// Why, with the figures.
        reason: String,
        /// The sysctl.
        key: String,
        /// Its value now.
        current: u64,
        /// The value recommended.
        recommended: u64,
        /// What the RAM formula gives.
        ram_formula: Option<u64>,
        /// Worst-case memory at the current maximum.
        memory_bytes_current: Option<u64>,
        /// Worst-case memory at the recommended one (entries and buckets).
        memory_bytes: Option<u64>,
        /// Only the initial network namespace can write it.
        host_only: bool,
        /// True when the target is the host, so `--emit-policy` includes it.
        applies_here: bool,
    },
    /// Raise `nf_conntrack_buckets` (host-wide).
    Buckets {
        /// Why.
        reason: String,
        /// The sysctl.
        key: String,
        /// Buckets now.
        current: u64,
        /// Buckets recommended, rounded as the kernel rounds them.
        recommended: u64,
        /// What the hash table then costs.
        memory_bytes: u64,
        /// Only the initial network namespace can write it.
        host_only: bool,
        /// True when the target is the host.
        applies_here: bool,
    },
    /// Shorter UDP timeouts (per namespace).
    UdpTimeouts {
        /// Why.
        reason: String,
        /// The values.
        sysctl: Vec<SysctlSetting>,
    },
    /// NOTRACK a dominant stateless UDP service this host serves.
    Notrack {
        /// Why.
        reason: String,
        /// Protocol name (`udp`).
        proto: String,
        /// Destination port.
        port: u16,
        /// Entries it holds now.
        entries: u64,
        /// Share of all entries (0..1).
        share: f64,
        /// The service is a known request/response one (DNS, NTP, …); `--emit-policy` includes
        /// only these and lists the others as comments.
        known_stateless: bool,
        /// What NOTRACK needs from the filter path.
        warning: String,
        /// Which side this host is on (`server`, or `local` for loopback clients of a local
        /// service, or `?` when the local addresses are unknown).
        direction: Side,
    },
    /// This host's own queries fill the table (a recursive resolver's upstream queries): the
    /// client side, which the policy schema cannot express yet.
    ClientFlows {
        /// Why.
        reason: String,
        /// Protocol name.
        proto: String,
        /// The upstreams' port.
        port: u16,
        /// Entries.
        entries: u64,
        /// Share of all entries.
        share: f64,
        /// The upstream addresses seen (at most 16).
        upstreams: Vec<String>,
    },
    /// `nf_conntrack_tcp_timeout_established` is long and idle ESTABLISHED entries dominate.
    TcpTimeout {
        /// Why.
        reason: String,
        /// The value.
        sysctl: SysctlSetting,
        /// ESTABLISHED entries idle for at least `idle_threshold_seconds`.
        idle_established: u64,
        /// All ESTABLISHED TCP entries.
        established: u64,
    },
    /// A NOTRACK rule whose untracked packets a filter chain drops: a blackhole.
    Blackhole {
        /// Why.
        reason: String,
        /// The fix.
        fix: String,
        /// The NOTRACK rule.
        notrack: RuleRef,
        /// The rule (or policy) that drops the untracked packets.
        dropped_by: RuleRef,
        /// Protocol name.
        proto: String,
        /// The flow, in words (`udp dport 53`).
        flow: String,
        /// Which side of the flow this host is on.
        direction: Side,
    },
    /// A NOTRACK rule without a destination port and an untracked accept that takes all of
    /// it: every local port is reachable from the notracked flow (seed 002).
    UntrackedOpen {
        /// Why.
        reason: String,
        /// The fix.
        fix: String,
        /// The NOTRACK rule.
        notrack: RuleRef,
        /// The rule that accepts the untracked packets whatever their destination port.
        accepted_by: RuleRef,
        /// Protocol name.
        proto: String,
        /// The flow, in words (`udp sport 53`).
        flow: String,
    },
    /// ctguard's NOTRACK objects are present but the accepts its policy needs are gone.
    CtguardDegraded {
        /// Why.
        reason: String,
        /// The fix.
        fix: String,
        /// Each blackholed flow: where it is notracked and where it is dropped.
        blackholes: Vec<String>,
    },
}

impl Recommendation {
    /// The `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Recommendation::RaiseConntrackMax { .. } => "raise_conntrack_max",
            Recommendation::Buckets { .. } => "buckets",
            Recommendation::UdpTimeouts { .. } => "udp_timeouts",
            Recommendation::Notrack { .. } => "notrack",
            Recommendation::ClientFlows { .. } => "client_flows",
            Recommendation::TcpTimeout { .. } => "tcp_timeout",
            Recommendation::Blackhole { .. } => "blackhole",
            Recommendation::UntrackedOpen { .. } => "untracked_open",
            Recommendation::CtguardDegraded { .. } => "ctguard_degraded",
        }
    }

    /// Every kind, in the order the report lists them.
    pub const KINDS: [&'static str; 9] = [
        "ctguard_degraded",
        "blackhole",
        "untracked_open",
        "raise_conntrack_max",
        "buckets",
        "udp_timeouts",
        "tcp_timeout",
        "notrack",
        "client_flows",
    ];

    /// The fix of a broken NOTRACK setup, if this is one.
    pub fn fix(&self) -> Option<&str> {
        match self {
            Recommendation::Blackhole { fix, .. }
            | Recommendation::UntrackedOpen { fix, .. }
            | Recommendation::CtguardDegraded { fix, .. } => Some(fix),
            _ => None,
        }
    }

    /// The reason, one paragraph.
    pub fn reason(&self) -> &str {
        match self {
            Recommendation::RaiseConntrackMax { reason, .. }
            | Recommendation::Buckets { reason, .. }
            | Recommendation::UdpTimeouts { reason, .. }
            | Recommendation::Notrack { reason, .. }
            | Recommendation::ClientFlows { reason, .. }
            | Recommendation::TcpTimeout { reason, .. }
            | Recommendation::Blackhole { reason, .. }
            | Recommendation::UntrackedOpen { reason, .. }
            | Recommendation::CtguardDegraded { reason, .. } => reason,
        }
    }
}

/// The whole diagnosis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The target, in words.
    pub target: String,
    /// The `--netns` argument, if any.
    pub netns: Option<String>,
    /// True when the target is the host (initial network namespace).
    pub initial_namespace: bool,
    /// `nf_conntrack_count` (this namespace).
    pub count: Option<u64>,
    /// `nf_conntrack_max` (host-wide; compared with each namespace's own count).
    pub max: Option<u64>,
    /// `nf_conntrack_buckets` (host-wide).
    pub buckets: Option<u64>,
    /// `count / max`.
    pub usage: Option<f64>,
    /// Drop counters of this namespace, summed over the CPUs (totals since it started).
    pub drops: Option<DropCounters>,
    /// The same counters over the sampling window (`--window`); `None` with `--window 0` or
    /// when they could not be read.
    pub rates: Option<Rates>,
    /// `nf_conntrack_tcp_timeout_established` (seconds).
    pub tcp_timeout_established: Option<u64>,
    /// The NOTRACK rules of the live ruleset (`None` when it could not be read).
    pub notrack_rules: Option<Vec<NotrackRuleInfo>>,
    /// Kernel log events (host-wide).
    pub table_full_events: Option<TableFullEvents>,
    /// Bytes per entry (slab object size).
    pub entry_bytes: Option<u64>,
    /// What the table costs.
    pub memory: Memory,
    /// How the entries were read.
    pub entries: Option<EntriesInfo>,
    /// The largest groups of entries, by (protocol, destination port, state), largest first.
    pub top_flows: Vec<FlowGroup>,
    /// UDP timeouts of the target.
    pub udp_timeouts: UdpTimeouts,
    /// What to change, each with its reason.
    pub recommendations: Vec<Recommendation>,
    /// Remarks that are not recommendations.
    pub notes: Vec<String>,
    /// What could not be read.
    pub unreadable: Vec<Unreadable>,
    /// True when something could not be read.
    pub partial: bool,
}

impl Report {
    /// The JSON document of `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Escapes a Prometheus label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

struct Prom {
    out: String,
    base: String,
}

impl Prom {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(self.out, "{name}{{{}{labels}}} {value}", self.base);
        }
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, value: Option<String>) {
        let samples: Vec<(String, String)> = value.into_iter().map(|v| (String::new(), v)).collect();
        self.metric(name, kind, help, &samples);
    }
}

/// The report in the node_exporter textfile format. Every sample carries `netns` (the
/// `--netns` argument, empty for the caller's own namespace); figures that could not be read
/// are left out. `now_unix` is the time of the run.
pub fn prometheus(r: &Report, now_unix: f64) -> String {
    let mut p = Prom { out: String::new(), base: format!("netns=\"{}\"", label(r.netns.as_deref().unwrap_or(""))) };
    let n = |v: Option<u64>| v.map(|v| v.to_string());
    p.one(
        "ctguard_conntrack_entries",
        "gauge",
        "Conntrack entries in the target namespace (nf_conntrack_count).",
        n(r.count),
    );
    p.one("ctguard_conntrack_max", "gauge", "nf_conntrack_max (host-wide limit per namespace).", n(r.max));
    p.one("ctguard_conntrack_buckets", "gauge", "nf_conntrack_buckets (host-wide).", n(r.buckets));
    p.one(
        "ctguard_conntrack_usage_ratio",
        "gauge",
        "nf_conntrack_count / nf_conntrack_max.",
        r.usage.map(|u| format!("{u}")),
    );
    if let Some(d) = &r.drops {
        p.one(
            "ctguard_conntrack_drop_total",
            "counter",
            "New entries refused because the table was full (dropped packets), summed over CPUs.",
            Some(d.drop.to_string()),
        );
        p.one(
            "ctguard_conntrack_early_drop_total",
            "counter",
            "Entries evicted to make room, summed over CPUs.",
            Some(d.early_drop.to_string()),
        );
        p.one(
            "ctguard_conntrack_insert_failed_total",
            "counter",
            "Entries that lost the insert race, summed over CPUs.",
            Some(d.insert_failed.to_string()),
        );
        p.one(
            "ctguard_conntrack_invalid_total",
            "counter",
            "Packets conntrack could not fit into a state (ct state invalid), summed over CPUs.",
            d.invalid.map(|v| v.to_string()),
        );
    }
    if let Some(t) = &r.table_full_events {
        p.one(
            "ctguard_conntrack_table_full_log_events",
            "gauge",
            "\"table full, dropping packet\" records in the kernel log buffer (host-wide).",
            Some(t.count.to_string()),
        );
        p.one("ctguard_kernel_net_ratelimit_suppressed", "gauge", "Sum of net_ratelimit callbacks suppressed in the kernel log (all rate-limited network messages, host-wide).", Some(t.ratelimit_suppressed.to_string()));
    }
    p.one(
        "ctguard_conntrack_entry_bytes",
        "gauge",
        "Bytes per conntrack entry (nf_conntrack slab object size).",
        n(r.entry_bytes),
    );
    p.one(
        "ctguard_conntrack_max_memory_bytes",
        "gauge",
        "Worst-case memory of the table at the current maximum, hash table included.",
        n(r.memory.current_max_bytes),
    );
    let flows: Vec<(String, String)> = r
        .top_flows
        .iter()
        .map(|g| {
            let port = g.port.map(|p| p.to_string()).unwrap_or_default();
            (
                format!(
                    ",proto=\"{}\",port=\"{}\",direction=\"{}\",state=\"{}\"",
                    label(&g.proto),
                    port,
                    g.direction.as_str(),
                    label(&g.state)
                ),
                g.count.to_string(),
            )
        })
        .collect();
    p.metric(
        "ctguard_conntrack_flow_entries",
        "gauge",
        "Entries of the largest (protocol, destination port, state) groups.",
        &flows,
    );
    if let Some(e) = &r.entries {
        p.one(
            "ctguard_doctor_scan_seconds",
            "gauge",
            "Seconds reading and grouping the entries took.",
            Some(format!("{}", e.seconds)),
        );
    }
    let mut kinds: Vec<(String, String)> = Vec::new();
    for k in Recommendation::KINDS {
        let c = r.recommendations.iter().filter(|x| x.kind() == k).count();
        kinds.push((format!(",kind=\"{k}\""), c.to_string()));
    }
    p.metric("ctguard_doctor_recommendations", "gauge", "Recommendations of the last run, by kind.", &kinds);
    p.one(
        "ctguard_doctor_unreadable_sources",
        "gauge",
        "Sources the last run could not read.",
        Some(r.unreadable.len().to_string()),
    );
    p.one(
        "ctguard_doctor_last_run_timestamp_seconds",
        "gauge",
        "When the doctor last ran (Unix time).",
        Some(format!("{now_unix:.3}")),
    );
    p.out
}

/// Formats Unix time as RFC 3339 UTC (`2026-03-21T12:34:56Z`).
pub fn rfc3339_utc(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let rem = unix_secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_774_096_496), "2026-03-21T12:34:56Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn label_escaping() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
