//! `ctguard doctor`: why packets drop, and the policy that fixes it (DESIGN §5).
//!
//! In the target network namespace (DESIGN §3) it reads the conntrack count against the
//! maximum and the buckets, the drop counters, the "table full" events of the kernel log, the
//! memory an entry costs, and what fills the table (entries grouped by protocol, destination
//! port and state, streamed with bounded memory); then it recommends, each with its reason.
//!
//! Pure analysis ([`parse`], [`flows`], [`advice`], [`report`], [`analyze`]) is kept apart from
//! the side effects ([`sources`]: `/proc` under a configurable root, `/dev/kmsg`, the
//! `conntrack` tool, the textfile). Whatever cannot be read makes the report partial, never an
//! error.

pub mod advice;
pub mod flows;
pub mod notrack;
pub mod parse;
pub mod report;
pub mod sources;

use std::time::Duration;

pub use report::{Recommendation, Report};
pub use sources::Sources;

use crate::netns::{NetnsError, Target, TargetSpec};
use flows::DEFAULT_CAPACITY;
use report::{CounterRate, EntriesInfo, LogEvent, Memory, Rates, TableFullEvents, UdpTimeouts};
use sources::Observations;

/// Errors of a diagnosis: only the target itself can fail it.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// The namespace could not be opened or entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// `--netns` names nothing usable.
    #[error("--netns: {0}")]
    BadTarget(#[source] NetnsError),
}

/// Inode number of the initial network namespace (`PROC_NET_INIT_INO`, fixed by the kernel
/// since 3.8): recognises the host where `/proc/1/ns/net` cannot be read (a confined PID 1).
pub const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;

/// Default number of groups in `top_flows`.
pub const DEFAULT_TOP: usize = 10;

/// What to read and how much to show.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to read from.
    pub sources: Sources,
    /// Groups in `top_flows`.
    pub top: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { sources: Sources::system(), top: DEFAULT_TOP }
    }
}

/// How the target is described and labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// In words, for the report.
    pub label: String,
    /// The `--netns` argument, if any.
    pub netns: Option<String>,
    /// True for the host (initial network namespace).
    pub initial: bool,
    /// Inode of the namespace (how the kernel log names it).
    pub inode: Option<u64>,
}

/// Facts about the machine the analysis needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineBits {
    /// Pointer width (64 on x86_64).
    pub pointer_bits: u32,
    /// Page size in bytes.
    pub page_size: u64,
}

impl MachineBits {
    /// This build and this machine.
    pub fn here() -> Self {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096);
        MachineBits { pointer_bits: usize::BITS, page_size: page.max(512) as u64 }
    }
}

/// Diagnoses the namespace `netns` names (`None`: the caller's own). Reading happens on a
/// thread inside the target; the caller's own namespace is read in place, without `setns`, so
/// an unprivileged user gets what the files allow.
pub fn diagnose(netns: Option<&str>, opts: &Options) -> Result<Report, DoctorError> {
    let spec = match netns {
        Some(s) => TargetSpec::parse(s).map_err(DoctorError::BadTarget)?,
        None => TargetSpec::Current,
    };
    let target = Target::open(&spec).map_err(DoctorError::BadTarget)?;
    let initial = target.is_initial() || target.id.1 == PROC_NET_INIT_INO;
    let label = match &spec {
        TargetSpec::Current if initial => "the host (initial network namespace)".to_string(),
        TargetSpec::Current => "the caller's network namespace".to_string(),
        _ if initial => format!("network namespace {} (the host's)", target.path().display()),
        _ => format!("network namespace {}", target.path().display()),
    };
    let capacity = DEFAULT_CAPACITY.max(opts.top.saturating_mul(16));
    let obs = match spec {
        TargetSpec::Current => sources::collect(&opts.sources, capacity),
        _ => target.run(|| sources::collect(&opts.sources, capacity))?,
    };
    let info = TargetInfo { label, netns: netns.map(str::to_string), initial, inode: Some(target.id.1) };
    Ok(analyze(info, obs, MachineBits::here(), opts.top))
}

/// The counters over the window, each with when it last moved (pure).
pub fn rates(obs: &Observations, target_inode: Option<u64>) -> Option<Rates> {
    let (first, took) = obs.drops_first.as_ref()?;
    let last = obs.drops.as_ref()?;
    let d = last.since(first);
    let w = took.as_secs_f64().max(0.001);
    // The latest "table full" event naming the target (or no namespace, older kernels).
    let latest_full = obs
        .kmsg
        .as_ref()
        .and_then(|k| k.events().iter().filter(|e| e.netns.is_none() || e.netns == target_inode).map(|e| e.usec).max());
    let mut counters = Vec::new();
    let rows = [
        ("drop", Some(last.drop), Some(d.drop)),
        ("early_drop", Some(last.early_drop), Some(d.early_drop)),
        ("insert_failed", Some(last.insert_failed), Some(d.insert_failed)),
        ("invalid", last.invalid, d.invalid),
        ("found", last.found, d.found),
        ("insert", last.insert, d.insert),
    ];
    for (name, total, during) in rows {
        let (Some(total), Some(during)) = (total, during) else { continue };
        let last_moved = if during > 0 {
            "during the window".to_string()
        } else if total == 0 {
            "never: 0 since the namespace started".to_string()
        } else {
            match (name, latest_full, obs.now_mono_usec) {
                ("drop", Some(u), Some(now)) if now >= u => format!(
                    "not during the window; the latest \"table full\" event for this namespace in the kernel log is \
                     {} s old",
                    (now - u) / 1_000_000
                ),
                _ => "not during the window (earlier; the kernel keeps no time for this counter)".to_string(),
            }
        };
        counters.push(CounterRate {
            counter: name.to_string(),
            total,
            during_window: during,
            per_second: during as f64 / w,
            last_moved,
        });
    }
    Some(Rates { window_seconds: w, counters })
}

/// Turns observations into the report (pure).
pub fn analyze(target: TargetInfo, obs: Observations, bits: MachineBits, top: usize) -> Report {
    let rates = rates(&obs, target.inode);
    let usage = match (obs.count, obs.max) {
        (Some(c), Some(m)) if m > 0 => Some(c as f64 / m as f64),
        _ => None,
    };
    let flows = obs.flows.as_ref().map(|(f, _, _)| f);
    let (here, unattributed, elsewhere) = match &obs.kmsg {
        Some(k) => {
            let here = target.inode.map_or(0, |i| k.table_full_in(i));
            let un = k.table_full_unattributed();
            (here, un, k.table_full - here - un)
        }
        None => (0, 0, 0),
    };
    let inputs = advice::Inputs {
        initial: target.initial,
        count: obs.count,
        max: obs.max,
        buckets: obs.buckets,
        drops: obs.drops.as_ref(),
        table_full_here: here,
        table_full_unattributed: unattributed,
        table_full_elsewhere: elsewhere,
        ram_bytes: obs.ram_bytes,
        entry_bytes: obs.entry_bytes,
        flows,
        udp_timeout: obs.udp_timeout,
        udp_timeout_stream: obs.udp_timeout_stream,
        pointer_bits: bits.pointer_bits,
        page_size: bits.page_size,
        rates: rates.as_ref(),
        tcp_timeout_established: obs.tcp_timeout_established,
    };
    let mut adv = advice::recommend(&inputs);

    // Broken NOTRACK setups, ctguard's or hand-made: first, they blackhole or open services.
    let notrack_rules = obs.firewall.as_ref().map(|fw| {
        let found = notrack::notrack_flows(fw);
        let findings = notrack::check(fw, &found);
        let recs = advice::broken_setups(&findings, flows);
        if !found.is_empty() && findings.is_empty() {
            adv.notes.push(format!(
                "{} NOTRACK rule{} in the live ruleset; the filter chains accept {} untracked packets",
                found.len(),
                if found.len() == 1 { "" } else { "s" },
                if found.len() == 1 { "its" } else { "their" }
            ));
        }
        if fw.ctguard_present() && !found.iter().any(|f| f.ctguard) {
            adv.notes
                .push("ctguard's table or raw chains exist but hold no NOTRACK rule: see `ctguard status`".to_string());
        }
        let mut all = recs;
        all.append(&mut adv.recommendations);
        adv.recommendations = all;
        found.iter().map(notrack::NotrackFlow::info).collect::<Vec<_>>()
    });

    let to_event = |e: parse::TableFull| LogEvent {
        netns: e.netns,
        in_target: e.netns.is_some() && e.netns == target.inode,
        seconds_since_boot: e.usec as f64 / 1e6,
        time: obs.boot_unix_usec.map(|b| report::rfc3339_utc((b + e.usec as i64) / 1_000_000)),
    };
    let table_full_events = obs.kmsg.as_ref().map(|k| TableFullEvents {
        count: k.table_full,
        in_target: here,
        other_namespaces: elsewhere,
        unattributed,
        target_netns_inode: target.inode,
        events: k.events().into_iter().map(to_event).collect(),
        ratelimit_suppressed: k.ratelimit_suppressed,
        ratelimit_note: "net_ratelimit: N callbacks suppressed counts every rate-limited network message the kernel \
                         did not print (table-full ones among them), not only conntrack's"
            .to_string(),
        host_wide: true,
        log_since_seconds: k.oldest_usec.map(|u| u as f64 / 1e6),
        records: k.records,
        lost: k.lost,
    });
    if obs.kmsg.is_some() && !target.initial {
        let all = here + unattributed + elsewhere;
        let split = if all == 0 {
            "it holds no \"table full\" event".to_string()
        } else {
            format!(
                "of its {all} \"table full\" events, {here} name this namespace (netns {}), {elsewhere} name other \
                 namespaces and {unattributed} name no namespace (kernels before 6.x name none)",
                target.inode.map_or("?".to_string(), |i| i.to_string())
            )
        };
        adv.notes.push(format!(
            "the kernel log is host-wide, not this namespace's: {split}; nf_conntrack_max is host-wide too (each \
             namespace's count is compared with it)"
        ));
    }
    if let Some(k) = obs.kmsg.as_ref().filter(|k| k.truncated) {
        adv.notes.push(format!("the kernel log was read only in part ({} records)", k.records));
    }
    if let Some((f, _, _)) = &obs.flows {
        if !f.exact {
            adv.notes.push(format!(
                "more than {} distinct (protocol, port, state) groups: top_flows counts are lower bounds, at most {} \
                 below the truth",
                f.capacity, f.max_error
            ));
        }
    }
    let memory = Memory {
        ram_bytes: obs.ram_bytes,
        per_entry_bytes: obs.entry_bytes,
        current_max_bytes: match (obs.max, obs.entry_bytes, obs.buckets) {
            (Some(m), Some(e), Some(b)) => Some(advice::table_bytes(m, e, b)),
            _ => None,
        },
        recommended_max_bytes: adv.recommended_max_bytes,
        ram_formula_max: adv.ram_formula_max,
    };
    let top_flows = flows.map(|f| f.top(top).to_vec()).unwrap_or_default();
    let entries = obs.flows.map(|(scan, source, took): (flows::FlowScan, String, Duration)| EntriesInfo {
        source,
        seconds: took.as_secs_f64(),
        scan,
    });
    let partial = !obs.unreadable.is_empty();
    Report {
        target: target.label,
        netns: target.netns,
        initial_namespace: target.initial,
        count: obs.count,
        max: obs.max,
        buckets: obs.buckets,
        usage,
        drops: obs.drops,
        rates,
        tcp_timeout_established: obs.tcp_timeout_established,
        notrack_rules,
        table_full_events,
        entry_bytes: obs.entry_bytes,
        memory,
        entries,
        top_flows,
        udp_timeouts: UdpTimeouts { udp_timeout: obs.udp_timeout, udp_timeout_stream: obs.udp_timeout_stream },
        recommendations: adv.recommendations,
        notes: adv.notes,
        unreadable: obs.unreadable,
        partial,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_root_report_is_partial_and_serialises() {
        let root = std::env::temp_dir().join(format!("ctguard-doctor-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("dir");
        let obs = sources::collect(&Sources::fake(&root, Some(root.join("kmsg"))), 64);
        let info = TargetInfo { label: "fake".into(), netns: None, initial: false, inode: None };
        let r = analyze(info, obs, MachineBits { pointer_bits: 64, page_size: 4096 }, 10);
        assert!(r.partial);
        let j = r.to_json();
        for k in [
            "count",
            "max",
            "buckets",
            "usage",
            "drops",
            "table_full_events",
            "entry_bytes",
            "top_flows",
            "recommendations",
            "unreadable",
        ] {
            assert!(j.get(k).is_some(), "key {k} missing: {j}");
        }
        assert!(j["count"].is_null());
        assert!(j["unreadable"].as_array().is_some_and(|a| a.len() >= 6), "{j}");
        let prom = report::prometheus(&r, 0.0);
        assert!(prom.contains("ctguard_doctor_unreadable_sources{netns=\"\"}"), "{prom}");
        assert!(!prom.contains("ctguard_conntrack_entries"), "unknown figures are left out: {prom}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
