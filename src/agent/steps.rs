//! Helpers of the owner's operations that decide nothing themselves: request checks, the
//! target of a request, journal writes under the state-dir lock, fault hooks, confirm
//! commands, probes, `wall`. No state transitions live here.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::proof;
use super::protocol::{ApplyRequest, Response};
use super::state::{Owner, Shared};
use super::worker::Worker;
use crate::exit::Exit;
use crate::model::auto::MachineFacts;
use crate::model::{parse_policy, Format, Policy};
use crate::netns::{Target, TargetSpec};
use crate::probe::{self, Probe, ProbeResult};
use crate::txn::TxnRecord;

/// The tools a transaction may run, by absolute path (journaled, DESIGN §1).
pub const JOURNALED_TOOLS: &[&str] = &[
    "nft",
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "iptables-legacy-restore",
    "ip6tables-legacy-restore",
    "ipset",
    "conntrack",
];

/// Environment variable naming a fault point (test-only): the agent aborts there, as if killed
/// with SIGKILL at that step, so crash recovery can be tested at every step. `apply:fill-disk`
/// instead fills the state dir's file system right after PREPARED (a real ENOSPC for the
/// journal writes that follow) and goes on.
pub const FAULT_ENV: &str = crate::fault::FAULT_ENV;

/// The named points [`FAULT_ENV`] can stop the agent at.
pub const FAULT_POINTS: &[&str] = &[
    "apply:after-pin",
    "apply:after-prepared",
    "apply:after-apply",
    "apply:after-pending",
    "confirm:before-journal",
    "confirm:after-journal",
    "rollback:before-engine",
    "rollback:after-engine",
];

/// Aborts the process at `point` when [`FAULT_ENV`] names it.
pub fn fault(point: &str) {
    if crate::fault::fires(point) {
        tracing::error!("fault hook {point}: aborting");
        // No core file for a deliberate crash.
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
        std::process::abort();
    }
}

/// Test-only: with `CTGUARD_FAULT=apply:fill-disk`, fills the file system of `dir` with a
/// filler file (removed by the test), so the journal writes after this point meet ENOSPC.
pub fn fault_fill_disk(dir: &Path) {
    if !crate::fault::fires("apply:fill-disk") {
        return;
    }
    use std::io::Write;
    let path = dir.join("filler");
    let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) else { return };
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0u64;
    while f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    // Then byte by byte what is left of the last block.
    while f.write_all(&[0u8]).is_ok() {
        written += 1;
    }
    let _ = f.sync_all();
    tracing::error!("fault hook apply:fill-disk: wrote {written} bytes to {}", path.display());
}

/// Wall-clock seconds now.
pub fn now_wall() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The person behind requester `pid`: its login user (`/proc/PID/loginuid`, which
/// pam_loginuid sets per session and sudo keeps), else `SUDO_USER` from its environment.
pub fn person_of(pid: i32) -> Option<String> {
    let uid = std::fs::read_to_string(format!("/proc/{pid}/loginuid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|u| *u != u32::MAX);
    if let Some(u) = uid {
        return Some(
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
                .ok()
                .flatten()
                .map_or_else(|| format!("uid {u}"), |u| u.name),
        );
    }
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| kv.strip_prefix(b"SUDO_USER=")).map(|v| {
        // Shown to people: printable characters only.
        String::from_utf8_lossy(v).chars().filter(|c| !c.is_control()).take(64).collect::<String>() + " (SUDO_USER)"
    })
}

/// The journaled tool paths.
pub fn journaled_tools() -> std::collections::BTreeMap<String, String> {
    JOURNALED_TOOLS
        .iter()
        .filter_map(|t| crate::backend::exec::Tool::find(t).ok())
        .map(|t| (t.name, t.path.display().to_string()))
        .collect()
}

/// This machine's RAM, for `"auto"`.
pub fn ram_facts() -> MachineFacts {
    MachineFacts::with_ram(crate::sysctl::mem_total_bytes().unwrap_or(0))
}

/// The request's policy, validated (the built-in one when it carries none).
pub fn load_policy(a: &ApplyRequest) -> Result<Policy, Response> {
    let Some(text) = &a.policy_text else { return Ok(Policy::builtin()) };
    let format = match a.policy_format.as_deref() {
        Some("json") => Format::Json,
        _ => Format::Toml,
    };
    parse_policy(text, format).map_err(|errs| {
        Response::fail(Exit::BadInput, errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
    })
}

/// A resolved target: the open namespace, its label and the path a restarted agent reopens.
pub struct ResolvedTarget {
    /// The namespace.
    pub target: Target,
    /// `host`, the `--netns` argument, or the name of the caller's named namespace.
    pub label: String,
    /// Path recorded in the journal.
    pub path: String,
}

/// The target of a request: `--netns`, or the requester's own namespace (read while it is
/// connected). Opening never blocks (see [`Target::open`]).
pub fn resolve_target(netns: Option<&str>, peer_pid: Option<i32>) -> Result<ResolvedTarget, Response> {
    // `/proc/self/…` means the requester's, as it does for the CLI (never the agent's own).
    let own = netns.and_then(|n| {
        ["/proc/self/", "/proc/thread-self/"].iter().find_map(|p| n.strip_prefix(p)).map(|rest| (n, rest))
    });
    let (label, spec) = match (netns, own, peer_pid) {
        (Some(n), Some((_, rest)), Some(pid)) => {
            (n.to_string(), TargetSpec::Path(PathBuf::from(format!("/proc/{pid}/{rest}"))))
        }
        (Some(_), Some(_), None) => {
            return Err(Response::fail(Exit::BadInput, "--netns /proc/self/…: cannot tell the requester (no peer pid)"))
        }
        (Some(n), None, _) => match TargetSpec::parse(n) {
            Ok(s) => (n.to_string(), s),
            Err(e) => return Err(Response::fail(Exit::BadInput, e.to_string())),
        },
        (None, _, Some(pid)) => ("caller".to_string(), TargetSpec::Path(PathBuf::from(format!("/proc/{pid}/ns/net")))),
        (None, _, None) => {
            return Err(Response::fail(Exit::BadInput, "cannot tell the caller's namespace (no peer pid)"))
        }
    };
    let target = Target::open(&spec).map_err(|e| Response::fail(Exit::BadInput, e.to_string()))?;
    // The caller's namespace may be a named one (`ip netns exec NAME ctguard apply`): record
    // its name and path, which outlive the caller's pid and a pin hidden in a private mount
    // namespace.
    let (label, path) = match (label.as_str(), named_netns_of(target.id)) {
        ("caller", Some((name, path))) => (name, path),
        ("caller", None) if target.is_initial() => ("host".to_string(), target.path().display().to_string()),
        _ => (label, target.path().display().to_string()),
    };
    Ok(ResolvedTarget { target, label, path })
}

/// A name under /run/netns whose namespace is `id`, with its path.
pub fn named_netns_of(id: (u64, u64)) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(crate::netns::NETNS_RUN_DIR).ok()?.flatten().find_map(|e| {
        let m = std::fs::metadata(e.path()).ok()?;
        ((m.dev(), m.ino()) == id)
            .then(|| (e.file_name().to_string_lossy().into_owned(), e.path().display().to_string()))
    })
}

/// How long a journal write waits for the state-dir lock (held briefly by `ctguard recover`)
/// before writing anyway: the agent's record must not wait on another process.
const LOCK_WAIT: Duration = Duration::from_millis(500);

/// Writes `rec` crash-safely under the state-dir lock (every writer takes it: DESIGN §1).
/// On failure the error is remembered on the owner's current transaction and logged.
pub fn write_record(shared: &Shared, owner: Option<&Owner>, rec: &TxnRecord) -> Result<(), String> {
    let _lap = crate::timing::Lap::start("journal write");
    let start = std::time::Instant::now();
    let lock = loop {
        match shared.journal.try_lock() {
            Ok(l) => break Some(l),
            Err(crate::journal::JournalError::Busy { .. }) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!("journal lock: {e}; writing without it");
                break None;
            }
        }
    };
    let r = shared.journal.write(rec).map_err(|e| e.to_string());
    drop(lock);
    if let Some(o) = owner {
        let err = r.as_ref().err().cloned();
        o.update(rec.id.as_str(), |c| c.journal_error = err);
    }
    if let Err(e) = &r {
        tracing::error!(txid = rec.id.as_str(), "journal write failed: {e}");
    }
    r
}

/// `ctguard` with the run and state dirs this agent serves when they are not the defaults, so a
/// printed confirm command reaches this agent.
pub fn ctguard_invocation(shared: &Shared) -> String {
    let mut s = String::from("ctguard");
    if shared.opts.state_dir != Path::new("/var/lib/ctguard") {
        s.push_str(&format!(" --state-dir {}", shared.opts.state_dir.display()));
    }
    if shared.opts.run_dir != Path::new(super::client::UNIT_RUN_DIR) {
        s.push_str(&format!(" --run-dir {}", shared.opts.run_dir.display()));
    }
    s
}

/// The command that confirms `txid` from a new connection (or locally).
pub fn confirm_command(shared: &Shared, conn: Option<&proof::SshConn4>, txid: &str) -> String {
    let local = format!("{} confirm {txid}", ctguard_invocation(shared));
    match conn {
        Some(c) => c.new_connection_command(Some(txid)).replace(&format!("ctguard confirm {txid}"), &local),
        None => local,
    }
}

/// Each probe's timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// One round of probes on the target's worker.
pub async fn run_probes(worker: &Worker, probes: Vec<Probe>) -> Vec<ProbeResult> {
    match worker.call(move || probe::run_all(&probes, PROBE_TIMEOUT)).await {
        Ok(r) => r,
        Err(e) => vec![ProbeResult { probe: "worker".into(), ok: false, detail: e.to_string(), elapsed_ms: 0 }],
    }
}

/// The failed probes of a round, one line each.
pub fn failed_probes(results: &[ProbeResult]) -> Vec<String> {
    results.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.probe, r.detail)).collect()
}

/// Notifies logged-in users, Junos-style; best effort.
pub fn wall(message: &str) {
    if let Ok(tool) = crate::backend::exec::Tool::find("wall") {
        let _ = tool.run(&[message], None);
    }
}

/// The worker of a journaled transaction's target: through its pin (survives agent crashes),
/// else through the recorded path — each checked against the recorded device and inode.
pub fn worker_for_record(shared: &Shared, rec: &TxnRecord) -> Result<Worker, String> {
    let mut tried = Vec::new();
    for path in rec.target.pin.iter().chain(std::iter::once(&rec.target.path)) {
        match Target::open(&TargetSpec::Path(PathBuf::from(path))) {
            Ok(t) if t.id == (rec.target.dev, rec.target.ino) => return shared.worker(t),
            Ok(_) => tried.push(format!("{path} is another namespace now")),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(format!("the transaction's namespace is gone or unreachable: {}", tried.join("; ")))
}
