//! The transaction verbs: `apply`, `confirm`, `extend`, `rollback` talk to the agent (started
//! detached when none answers); `status`, `history`, `show` read the journal; `agent` and
//! `recover` run the agent's side.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::args::{AgentArgs, ApplyArgs, Global, RulesetFormat, ShowArgs, TxidArgs};
use crate::agent::client::{self, ClientError};
use crate::agent::engine::RulesetInput;
use crate::agent::protocol::{ApplyRequest, Request, Response};
use crate::agent::server::{self, AgentOptions};
use crate::exit::{Exit, Failure};
use crate::journal::{self, Journal};
use crate::txn::{self, TxnId};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn client_failure(e: ClientError) -> Vec<Failure> {
    let exit = match e {
        ClientError::Untrusted(_) => Exit::BadInput,
        _ => Exit::AgentUnreachable,
    };
    vec![Failure::new(exit, e.to_string())]
}

/// Turns an agent answer into the CLI's exit code and output.
fn finish(global: &Global, r: Response, text: impl FnOnce(&Value) -> String) -> Result<Exit, Vec<Failure>> {
    if global.json {
        // The envelope is printed by `cli::main` with this exit code and error.
        super::print_json(&r.data);
    }
    if r.exit != 0 {
        let exit = Exit::from_code(r.exit);
        return Err(vec![Failure::new(exit, r.error.unwrap_or_else(|| "failed".into()))]);
    }
    if !global.json {
        print!("{}", text(&r.data));
    }
    Ok(Exit::Ok)
}

/// Sends a request to the agent, starting one first when none answers (exit 6 when that fails).
pub(super) fn ask(global: &Global, req: Request) -> Result<Response, Vec<Failure>> {
    client::ensure_agent(&global.run_dir, &global.state_dir).map_err(client_failure)?;
    client::request(&global.run_dir, req, REQUEST_TIMEOUT).map_err(client_failure)
}

/// Reads a `--ruleset` file once (a file, a pipe, or `-` for stdin; size-limited; the same
/// file-type checks as a policy) and settles its format (`apply` and `plan --ruleset`).
pub(super) fn load_ruleset(path: &str, format: Option<RulesetFormat>) -> Result<RulesetInput, Vec<Failure>> {
    let bytes = super::input::read_once("--ruleset", path, MAX_RULESET_BYTES).map_err(|f| vec![f])?;
    let text = String::from_utf8(bytes).map_err(|e| {
        vec![Failure::bad_input(format!(
            "--ruleset {path}: not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))]
    })?;
    let looks_iptables = text.lines().any(|l| l.starts_with('*')) && text.lines().any(|l| l.trim() == "COMMIT");
    let format = match format {
        Some(RulesetFormat::Nft) => "nft",
        Some(RulesetFormat::Iptables) => "iptables",
        Some(RulesetFormat::Ip6tables) => "ip6tables",
        None if looks_iptables => "iptables",
        None => "nft",
    };
    Ok(RulesetInput { text, format: format.to_string() })
}

/// What `apply --from TXID` re-applies.
struct FromCommitted {
    /// The policy as TOML (policy transactions).
    policy_toml: Option<String>,
    /// The ruleset (ruleset transactions).
    ruleset: Option<RulesetInput>,
    /// The transaction's target, as recorded.
    target_path: String,
}

/// Reads what TXID committed from the journal: exit 2 for an unknown id or one that did not
/// commit, or a target that is gone.
fn from_committed(global: &Global, txid: &str) -> Result<FromCommitted, Vec<Failure>> {
    use std::os::unix::fs::MetadataExt;
    let bad = |m: String| vec![Failure::bad_input(m)];
    let id = TxnId::parse(txid).map_err(|e| bad(format!("--from: {e}")))?;
    let rec = open_journal(global)?.load(&id).map_err(|e| bad(format!("--from: {e}")))?;
    if rec.state != txn::State::Committed {
        return Err(bad(format!("--from {txid}: it is {}, not committed", rec.state.outcome())));
    }
    if global.netns.is_none()
        && !std::fs::metadata(&rec.target.path).is_ok_and(|m| (m.dev(), m.ino()) == (rec.target.dev, rec.target.ino))
    {
        return Err(bad(format!(
            "--from {txid}: its target {} ({}) is gone; name one with --netns",
            rec.target.label, rec.target.path
        )));
    }
    let (policy_toml, ruleset) = match rec.kind {
        txn::Kind::Policy => {
            let v = rec.policy.as_ref().ok_or_else(|| bad(format!("--from {txid}: the record holds no policy")))?;
            let policy = crate::persist::policy_from_record(v).map_err(|e| bad(format!("--from {txid}: {e}")))?;
            let text = crate::persist::policy_toml(&policy, &format!("# re-applied from {txid}\n"))
                .map_err(|e| bad(format!("--from {txid}: {e}")))?;
            (Some(text), None)
        }
        txn::Kind::Ruleset => {
            let text = rec.ruleset.clone().ok_or_else(|| bad(format!("--from {txid}: the record holds no ruleset")))?;
            let format = if looks_like_iptables(&text) { "iptables" } else { "nft" };
            (None, Some(RulesetInput { text, format: format.into() }))
        }
    };
    Ok(FromCommitted { policy_toml, ruleset, target_path: rec.target.path.clone() })
}

fn looks_like_iptables(text: &str) -> bool {
    text.lines().any(|l| l.starts_with('*')) && text.lines().any(|l| l.trim() == "COMMIT")
}

/// Largest ruleset file ctguard reads (64 MiB).
pub const MAX_RULESET_BYTES: usize = 64 << 20;

pub(super) fn apply(a: &ApplyArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    // Validate locally first: bad input never reaches the agent. The policy is read once and
    // exactly the bytes validated here are sent (a second read of a pipe would be empty).
    if let Some(c) = &a.comment {
        crate::agent::protocol::check_comment(c).map_err(|e| vec![Failure::bad_input(e)])?;
    }
    let from = a.from.as_deref().map(|t| from_committed(global, t)).transpose()?;
    let loaded = match &from {
        Some(_) => super::LoadedPolicy { policy: crate::model::Policy::builtin(), source: None },
        None => super::load_policy(a.policy.as_deref())?,
    };
    // `--from`: the committed transaction's own target unless --netns names one.
    let netns = match (&from, &global.netns) {
        (Some(f), None) => Some(f.target_path.clone()),
        _ => super::netns_for_agent(global)?,
    };
    let ruleset = match &from {
        Some(f) => f.ruleset.clone(),
        None => a.ruleset.as_deref().map(|p| load_ruleset(p, a.format)).transpose()?,
    };
    for p in &a.probe {
        crate::probe::Probe::parse(p).map_err(|e| vec![Failure::bad_input(format!("--probe: {e}"))])?;
    }
    let probe_interval = a
        .probe_interval
        .as_deref()
        .map(crate::duration::parse_duration)
        .transpose()
        .map_err(|e| vec![Failure::bad_input(format!("--probe-interval: {e}"))])?;
    // Precondition: the journal can be written, with room (the agent checks again).
    Journal::open(&global.state_dir)
        .and_then(|j| j.check_room())
        .map_err(|e| vec![Failure::bad_input(format!("state dir: {e}"))])?;
    let timeout =
        crate::duration::parse_duration(&a.timeout).map_err(|e| vec![Failure::bad_input(format!("--timeout: {e}"))])?;
    let (policy_text, policy_format) = match (loaded.source, &from) {
        (_, Some(f)) => (f.policy_toml.clone(), f.policy_toml.as_ref().map(|_| "toml".to_string())),
        (None, None) => (None, None),
        (Some(src), None) => {
            let fmt = src.format_name().to_string();
            (Some(src.text), Some(fmt))
        }
    };
    // The namespace as the CLI sees it: the agent refuses to act if the path it is handed
    // resolves to another one there.
    let netns_id = netns.as_deref().and_then(|n| {
        use std::os::unix::fs::MetadataExt;
        crate::netns::TargetSpec::parse(n)
            .ok()
            .and_then(|s| std::fs::metadata(s.path()).ok())
            .map(|m| (m.dev(), m.ino()))
    });
    let req = Request::Apply(ApplyRequest {
        policy_text,
        policy_format,
        netns,
        netns_id,
        comment: a.comment.clone(),
        from: a.from.clone(),
        timeout_secs: timeout.as_secs(),
        force: a.force,
        ssh: std::env::var("SSH_CONNECTION").ok(),
        ruleset,
        options: txn::TxnOptions {
            allow_same_connection: a.allow_same_connection,
            probes: a.probe.clone(),
            probe_interval_secs: probe_interval.map(|d| d.as_secs()),
            auto_confirm: a.auto_confirm,
            persist: a.persist,
            remove: a.remove,
        },
    });
    let r = ask(global, req)?;
    let data = r.data.clone();
    let exit = finish(global, r, |d| {
        if d["noop"].as_bool().unwrap_or(false) {
            return format!(
                "applied {} on {}: it changed nothing, so it is committed at once.\n",
                d["txid"].as_str().unwrap_or("?"),
                d["target"].as_str().unwrap_or("?")
            );
        }
        if d["state"] == "COMMITTED" {
            return format!(
                "applied {} on {} and committed: every probe passed (--auto-confirm).\n",
                d["txid"].as_str().unwrap_or("?"),
                d["target"].as_str().unwrap_or("?")
            );
        }
        let how = if d["needs_new_connection"].as_bool().unwrap_or(false) {
            "Confirm from a NEW connection"
        } else {
            "Confirm with"
        };
        let mut s = format!(
            "applied {} on {}; pending until {} ({} s).\n{how}: {}\nWithout it, the change is rolled back automatically.\n",
            d["txid"].as_str().unwrap_or("?"),
            d["target"].as_str().unwrap_or("?"),
            d["deadline"].as_str().unwrap_or("?"),
            d["seconds_left"],
            d["confirm"].as_str().unwrap_or("ctguard confirm")
        );
        for w in d["warnings"].as_array().into_iter().flatten() {
            s.push_str(&format!("warning: {}\n", w.as_str().unwrap_or("")));
        }
        s
    })?;
    if a.wait && data["state"] == "PENDING" {
        return wait_for_outcome(global, &data);
    }
    Ok(exit)
}

/// `apply --wait`: a countdown in the `netplan try` style. With the new-connection proof on it
/// waits for a confirm from a new connection; Ctrl-C rolls back now; Enter confirms only where
/// the proof is off. A lost terminal changes nothing: the agent's deadline stands.
fn wait_for_outcome(global: &Global, data: &Value) -> Result<Exit, Vec<Failure>> {
    use std::io::{IsTerminal, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let txid = data["txid"].as_str().unwrap_or_default().to_string();
    let id = TxnId::parse(&txid).map_err(|e| vec![Failure::internal(e.to_string())])?;
    let proof_on = data["needs_new_connection"].as_bool().unwrap_or(false);
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())
        .map_err(|e| vec![Failure::internal(format!("cannot catch Ctrl-C: {e}"))])?;
    let (enter_tx, enter_rx) = std::sync::mpsc::channel();
    if proof_on {
        eprintln!("waiting for the confirmation from a NEW connection: {}", data["confirm"].as_str().unwrap_or(""));
        eprintln!("Ctrl-C rolls back now.");
    } else {
        eprintln!("press Enter to confirm, Ctrl-C to roll back now.");
        std::thread::spawn(move || {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                let _ = enter_tx.send(());
            }
        });
    }
    let tty = std::io::stderr().is_terminal();
    // Ends the countdown line on a tty (carriage return, erase line) before a final message.
    let end_line = || {
        if tty {
            eprint!("\r\x1b[2K");
        }
    };
    let journal = open_journal(global)?;
    let mut last_print = None::<std::time::Instant>;
    loop {
        if interrupted.load(Ordering::SeqCst) {
            end_line();
            let r = ask(global, Request::Rollback { txid: Some(txid.clone()), netns: None })?;
            return match r.exit {
                0 => Err(vec![Failure::new(Exit::RolledBack, format!("{txid} rolled back (Ctrl-C)"))]),
                c => Err(vec![Failure::new(Exit::from_code(c), r.error.unwrap_or_default())]),
            };
        }
        if enter_rx.try_recv().is_ok() {
            end_line();
            let r = ask(global, Request::Confirm { txid: Some(txid.clone()), netns: None })?;
            return finish(global, r, |d| format!("{} committed\n", d["txid"].as_str().unwrap_or("?")));
        }
        // Only its state: the index entry, no snapshot read.
        let rec = journal.load_entry(&id).map_err(|e| vec![Failure::internal(e.to_string())])?;
        match &rec.state {
            txn::State::Committed => {
                end_line();
                eprintln!("{txid} committed");
                return Ok(Exit::Ok);
            }
            txn::State::RolledBack { reason } => {
                end_line();
                return Err(vec![Failure::new(Exit::RolledBack, format!("{txid} rolled back ({reason})"))]);
            }
            txn::State::RollbackFailed { error, .. } => {
                end_line();
                return Err(vec![Failure::new(Exit::RollbackFailed, format!("{txid}: rollback failed: {error}"))]);
            }
            _ => {}
        }
        if last_print.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let left = rec.seconds_left(journal::boottime_ns()).unwrap_or(0);
            if tty {
                eprint!("\r{left:>5} s left before the automatic rollback ");
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{left} s left before the automatic rollback");
            }
            last_print = Some(std::time::Instant::now());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn txid_arg(t: &Option<String>) -> Result<Option<String>, Vec<Failure>> {
    match t {
        Some(t) => {
            TxnId::parse(t).map(|id| Some(id.as_str().to_string())).map_err(|e| vec![Failure::bad_input(e.to_string())])
        }
        None => Ok(None),
    }
}

pub(super) fn confirm(a: &TxidArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let r = ask(global, Request::Confirm { txid: txid_arg(&a.txid)?, netns: super::netns_for_agent(global)? })?;
    finish(global, r, |d| format!("{} committed\n", d["txid"].as_str().unwrap_or("?")))
}

pub(super) fn extend(a: &TxidArgs, by: &str, global: &Global) -> Result<Exit, Vec<Failure>> {
    let by = crate::duration::parse_duration(by).map_err(|e| vec![Failure::bad_input(format!("--by: {e}"))])?;
    let r = ask(
        global,
        Request::Extend { txid: txid_arg(&a.txid)?, by_secs: by.as_secs(), netns: super::netns_for_agent(global)? },
    )?;
    finish(global, r, |d| {
        format!(
            "{} now pending until {} ({} s)\n",
            d["txid"].as_str().unwrap_or("?"),
            d["deadline"].as_str().unwrap_or("?"),
            d["seconds_left"]
        )
    })
}

pub(super) fn rollback(a: &TxidArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let r = ask(global, Request::Rollback { txid: txid_arg(&a.txid)?, netns: super::netns_for_agent(global)? })?;
    finish(global, r, |d| format!("{} rolled back\n", d["txid"].as_str().unwrap_or("?")))
}

/// The journal for reading (no room needed: `status` and `history` must work on a full disk).
fn open_journal(global: &Global) -> Result<Journal, Vec<Failure>> {
    Journal::attach(&global.state_dir).map_err(|e| vec![Failure::bad_input(e.to_string())])
}

/// Starts an agent when the journal holds unfinished work and none answers (DESIGN §2: a
/// killed agent is restarted by the next CLI verb, whatever it is). Quiet when there is no
/// journal yet.
pub(super) fn revive_agent_if_needed(global: &Global) {
    let Ok(j) = Journal::attach(&global.state_dir) else { return };
    // The cheapest read (no snapshot looked at): a damaged record only starts an agent that
    // reports it.
    let records = j.list_entries().unwrap_or_default();
    revive_agent_for(global, &records);
}

/// [`revive_agent_if_needed`] with the records the verb read anyway (`status`, `history`: the
/// journal is read once).
fn revive_agent_for(global: &Global, records: &[txn::TxnRecord]) {
    // A namespace pin left by a crash is work for an agent too: it removes it at start.
    let leftover_pins = std::fs::read_dir(global.run_dir.join("ns")).is_ok_and(|mut d| d.next().is_some());
    let unfinished = records.iter().any(|r| !r.state.is_finished());
    if (leftover_pins || unfinished || guarded_exists(records)) && !client::is_running(&global.run_dir) {
        if let Err(e) = client::ensure_agent(&global.run_dir, &global.state_dir) {
            eprintln!(
                "ctguard: warning: unfinished transactions and no agent: {}",
                crate::exit::escape_for_terminal(&e.to_string())
            );
        }
    }
}

/// True when a policy committed in this boot is to be guarded on a target that still exists:
/// the agent must run to keep it in place (DESIGN §2).
fn guarded_exists(records: &[txn::TxnRecord]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(boot) = journal::boot_id() else { return false };
    records.iter().filter(|r| r.state == txn::State::Committed && r.kind == txn::Kind::Policy && r.boot_id == boot).any(
        |r| {
            std::fs::metadata(&r.target.path).is_ok_and(|m| (m.dev(), m.ino()) == (r.target.dev, r.target.ino))
                && crate::agent::guarded_record(records, (r.target.dev, r.target.ino), &boot)
                    .is_some_and(|g| g.id == r.id)
        },
    )
}

fn conntrack_usage() -> Value {
    let read = |k: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/netfilter/{k}")).ok().and_then(|s| s.trim().parse::<u64>().ok())
    };
    json!({"count": read("nf_conntrack_count"), "max": read("nf_conntrack_max")})
}

/// `status`: unfinished transactions from the journal, overlaid with the agent's in-memory
/// view when an agent answers (its phase — applying, rolling back, rollback owed — and the
/// transactions whose journal file is damaged or could not be written); damaged journal files
/// are listed, never taken for "nothing pending".
pub(super) fn status(global: &Global) -> Result<Exit, Vec<Failure>> {
    let j = open_journal(global)?;
    let now = journal::boottime_ns();
    // The index: no snapshot of a finished record is read (those of a pending one are checked).
    let scan = j.scan_index().map_err(|e| vec![Failure::internal(e.to_string())])?;
    revive_agent_for(global, &scan.records);
    let mut pending: Vec<Value> =
        scan.records.iter().filter(|r| !r.state.is_finished()).map(|r| txn::status_entry(r, now)).collect();
    let damaged: Vec<String> = scan.skipped.iter().map(|e| e.to_string()).collect();
    let agent = client::request(&global.run_dir, Request::Status, Duration::from_secs(2)).ok();
    if let Some(a) = &agent {
        for t in a.data["transactions"].as_array().into_iter().flatten() {
            match pending.iter_mut().find(|p| p["id"] == t["id"]) {
                Some(p) => *p = t.clone(),
                None => pending.push(t.clone()),
            }
        }
    }
    pending.retain(|p| global.netns.as_deref().is_none_or(|n| p["target"] == n));
    let mut committed: Vec<Value> =
        agent.as_ref().and_then(|a| a.data["committed"].as_array().cloned()).unwrap_or_default();
    committed.retain(|p| global.netns.as_deref().is_none_or(|n| p["target"] == n));
    let usage = conntrack_usage();
    if global.json {
        let agent_pid = agent.as_ref().map(|r| r.data["pid"].clone());
        super::print_json(&json!({
            "pending": pending,
            "committed": committed,
            "damaged": damaged,
            "conntrack": usage,
            "agent_pid": agent_pid
        }));
        return Ok(Exit::Ok);
    }
    for d in &damaged {
        println!("DAMAGED journal file: {d}");
    }
    if pending.is_empty() {
        println!("no pending transaction");
    }
    for p in &pending {
        let phase = p["phase"].as_str().map(|ph| format!(" ({ph})")).unwrap_or_default();
        println!(
            "{}  {}{phase}  target {}  deadline {}  {} s left  requested by pid {}",
            p["id"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["target"].as_str().unwrap_or("?"),
            p["deadline"].as_str().unwrap_or("-"),
            p["seconds_left"],
            p["requester"]["pid"]
        );
        if let Some(c) = p["comment"].as_str() {
            println!("    comment: {c}");
        }
        if let Some(e) = p["rollback_error"].as_str() {
            println!("    rollback failed {} time(s), retrying: {e}", p["rollback_attempts"]);
        }
        if let Some(e) = p["journal_error"].as_str() {
            println!("    journal: {e}");
        }
    }
    for c in &committed {
        let detail = match c["state"].as_str() {
            Some("repaired") => format!(
                " ({} repair(s), last {} after {} ms)",
                c["repairs"],
                c["last_repair"].as_str().unwrap_or("?"),
                c["last_gap_ms"]
            ),
            Some("degraded") => {
                format!(" since {}: {}", c["since"].as_str().unwrap_or("?"), c["reason"].as_str().unwrap_or("?"))
            }
            _ => String::new(),
        };
        println!(
            "committed {}  target {}  guarded: {}{detail}",
            c["id"].as_str().unwrap_or("?"),
            c["target"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?")
        );
        if let Some(e) = c["error"].as_str() {
            println!("    guard: {e}");
        }
    }
    if let (Some(c), Some(m)) = (usage["count"].as_u64(), usage["max"].as_u64()) {
        println!("conntrack (this namespace): {c} of {m} entries");
    }
    Ok(Exit::Ok)
}

/// The order of `history`: by creation (wall-clock seconds, all a record holds), then within
/// one second by the record file's modification time in nanoseconds, then by id. Transactions
/// created in the same second are nearly always one after the other on one target (one pending
/// transaction per target): the first was finished, its record written for the last time,
/// before the second began — an order the random suffix of the id does not give.
fn in_order_of_events(j: &Journal, records: &mut [txn::TxnRecord]) {
    use std::os::unix::fs::MetadataExt;
    let mtime_ns = |r: &txn::TxnRecord| {
        std::fs::symlink_metadata(j.record_path(&r.id))
            .map(|m| i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()))
            .unwrap_or(i128::MAX)
    };
    let first_event = |r: &txn::TxnRecord| r.events.first().map_or(r.created_wall, |e| e.wall_unix);
    records
        .sort_by_cached_key(|r| (r.created_wall, r.created_ns, first_event(r), mtime_ns(r), r.id.as_str().to_string()));
}

pub(super) fn history(global: &Global) -> Result<Exit, Vec<Failure>> {
    let j = open_journal(global)?;
    let mut all = j.list().map_err(|e| vec![Failure::internal(e.to_string())])?;
    revive_agent_for(global, &all);
    in_order_of_events(&j, &mut all);
    let list: Vec<Value> = all
        .iter()
        .filter(|r| global.netns.as_deref().is_none_or(|n| r.target.label == n))
        .map(txn::history_entry)
        .collect();
    if global.json {
        super::print_json(&json!({"transactions": list}));
        return Ok(Exit::Ok);
    }
    if list.is_empty() {
        println!("no transactions");
    }
    for t in &list {
        let who = t["requester"]["person"].as_str().map(|p| format!("  by {p}")).unwrap_or_default();
        let why = t["comment"].as_str().map(|c| format!("  \"{c}\"")).unwrap_or_default();
        println!(
            "{}  {}  {:<7}  target {}  {}{who}{why}",
            t["started"].as_str().unwrap_or("?"),
            t["id"].as_str().unwrap_or("?"),
            t["kind"].as_str().unwrap_or("?"),
            t["target"].as_str().unwrap_or("?"),
            t["outcome"].as_str().unwrap_or("?")
        );
    }
    Ok(Exit::Ok)
}

pub(super) fn show(a: &ShowArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let id = TxnId::parse(&a.txid).map_err(|e| vec![Failure::bad_input(e.to_string())])?;
    let j = open_journal(global)?;
    let rec = j.load(&id).map_err(|e| vec![Failure::bad_input(e.to_string())])?;
    let lines =
        |s: &Option<String>| -> Vec<String> { s.as_deref().unwrap_or("").lines().map(str::to_string).collect() };
    let diff = super::plan::diff_lines(&lines(&rec.before), &lines(&rec.after));
    let changed: Vec<&String> = diff.iter().filter(|l| !l.starts_with("  ")).collect();
    if global.json {
        let mut v = txn::history_entry(&rec);
        v["requester"] = json!(rec.requester);
        v["comment"] = json!(rec.comment);
        v["diff"] = json!(changed);
        v["policy"] = rec.policy.clone().unwrap_or(Value::Null);
        v["drift"] = rec.undo.get("drift").cloned().unwrap_or(Value::Null);
        v["persisted"] = rec.undo.get("persisted").cloned().unwrap_or(Value::Null);
        super::print_json(&v);
        return Ok(Exit::Ok);
    }
    println!("transaction {} ({}) on {}", rec.id, rec.kind, rec.target.label);
    println!("state:     {}", rec.state.outcome());
    println!(
        "requester: uid {} pid {}{}{}",
        rec.requester.uid,
        rec.requester.pid,
        rec.requester.person.as_deref().map(|p| format!(" ({p})")).unwrap_or_default(),
        rec.requester.ssh.as_deref().map(|s| format!(" ssh {s}")).unwrap_or_default()
    );
    if let Some(c) = &rec.comment {
        println!("comment:   {c}");
    }
    println!("events:");
    for e in &rec.events {
        println!("  {}  {:<15} {}", txn::format_rfc3339(e.wall_unix), e.state, e.note);
    }
    println!("diff (before -> after apply):");
    for l in changed {
        println!("  {l}");
    }
    if let Some(p) =
        rec.undo.get("persisted").and_then(|v| serde_json::from_value::<crate::persist::PersistRecord>(v.clone()).ok())
    {
        println!("persisted:");
        for l in p.describe() {
            println!("  {l}");
        }
    }
    // Ruleset transactions: what others changed during the window (overwritten by the rollback).
    if let Some(drift) = rec.undo.get("drift").and_then(Value::as_array).filter(|d| !d.is_empty()) {
        println!("changed by others while pending:");
        for d in drift {
            let verb = if d["overwritten"].as_bool().unwrap_or(false) { "overwritten" } else { "kept" };
            println!("  {} ({verb}):", d["section"].as_str().unwrap_or("?"));
            for l in d["diff"].as_array().into_iter().flatten() {
                println!("    {}", l.as_str().unwrap_or(""));
            }
        }
    }
    Ok(Exit::Ok)
}

pub(super) fn agent(a: &AgentArgs, global: &Global) -> Result<Exit, Vec<Failure>> {
    let opts = AgentOptions {
        run_dir: global.run_dir.clone(),
        state_dir: global.state_dir.clone(),
        detached: a.detached,
        idle_exit: Duration::from_secs(2),
    };
    let engines = crate::agent::engine::Engines {
        policy: Arc::new(crate::agent::policy_engine::PolicyEngine),
        ruleset: Arc::new(crate::agent::ruleset_engine::RulesetEngine),
    };
    match server::run(opts, engines) {
        Ok(()) => Ok(Exit::Ok),
        Err(e @ server::AgentError::AlreadyRunning { .. }) => Err(vec![Failure::new(Exit::Busy, e.to_string())]),
        Err(e) => Err(vec![Failure::bad_input(e.to_string())]),
    }
}

/// Journal recovery alone (the boot unit): transactions of another boot are closed without
/// restoring anything; anything else unfinished is handed to an agent, which recovers it.
pub(super) fn recover(global: &Global) -> Result<Exit, Vec<Failure>> {
    let j = open_journal(global)?;
    let boot = journal::boot_id().map_err(|e| vec![Failure::internal(format!("boot id: {e}"))])?;
    let mut closed = 0;
    let mut left = 0;
    // Every journal writer holds the state-dir lock for its read-modify-write (DESIGN §1).
    let _lock =
        if j.state_dir().is_dir() { Some(j.lock().map_err(|e| vec![Failure::internal(e.to_string())])?) } else { None };
    for mut rec in j.unfinished().map_err(|e| vec![Failure::internal(e.to_string())])? {
        match txn::recovery_action(&rec, &boot, journal::boottime_ns()) {
            txn::Recovery::CloseRebooted => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                rec.to_rolled_back(txn::Reason::Reboot, now).map_err(|e| vec![Failure::internal(e.to_string())])?;
                j.write(&rec).map_err(|e| vec![Failure::internal(e.to_string())])?;
                if let Some(p) = &rec.target.pin {
                    crate::netns::unpin(std::path::Path::new(p));
                }
                closed += 1;
            }
            txn::Recovery::Nothing => {}
            _ => left += 1,
        }
    }
    drop(_lock);
    if left > 0 {
        client::ensure_agent(&global.run_dir, &global.state_dir).map_err(client_failure)?;
    }
    if global.json {
        super::print_json(&json!({"closed_by_reboot": closed, "handed_to_agent": left}));
    } else {
        println!("recover: {closed} closed (rebooted, nothing restored), {left} handed to the agent");
    }
    Ok(Exit::Ok)
}
