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
pub mod parse;
pub mod report;
pub mod sources;

use std::time::Duration;

pub use report::{Recommendation, Report};
pub use sources::Sources;

use crate::netns::{NetnsError, Target, TargetSpec};
use flows::DEFAULT_CAPACITY;
use report::{EntriesInfo, LogEvent, Memory, TableFullEvents, UdpTimeouts};
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

/// Turns observations into the report (pure).
pub fn analyze(target: TargetInfo, obs: Observations, bits: MachineBits, top: usize) -> Report {
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
    };
    let mut adv = advice::recommend(&inputs);

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
        adv.notes.push(format!(
            "the kernel log is host-wide, not this namespace's: of its {} \"table full\" events {} name this \
             namespace (netns {}), {} another one, {} none (nf_conntrack_max is host-wide too; each namespace's \
             count is compared with it)",
            here + unattributed + elsewhere,
            here,
            target.inode.map_or("?".to_string(), |i| i.to_string()),
            elsewhere,
            unattributed
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
