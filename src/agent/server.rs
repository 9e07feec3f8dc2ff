//! The agent (DESIGN §2–§3): owns every dead-man timer, serves the CLI on a root-only socket,
//! journals each step before its effect, recovers unfinished transactions on start, and rolls
//! back pending ones when stopped by SIGTERM/SIGINT.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use super::engine::{ApplyInput, Engines};
use super::protocol::{ApplyRequest, Envelope, Request, Response, MAX_REQUEST_BYTES, VERSION};
use super::worker::Worker;
use crate::exit::Exit;
use crate::journal::{self, Journal};
use crate::lint::SshConn;
use crate::model::auto::MachineFacts;
use crate::model::names::Tag;
use crate::model::{parse_policy, Format, Policy};
use crate::netns::{unpin, Target, TargetSpec};
use crate::probe::{self, Probe, ProbeResult};
use crate::txn::{self, Deadline, Kind, Reason, Recovery, Requester, State, TargetRecord, TxnId, TxnRecord};
use super::proof;
use serde_json::Value;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Socket, lock, pins and log live here.
    pub run_dir: PathBuf,
    /// The journal.
    pub state_dir: PathBuf,
    /// Started by the CLI: exits once nothing is pending and no client came for `idle_exit`.
    pub detached: bool,
    /// See `detached`.
    pub idle_exit: Duration,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Setting up the run dir, lock or socket failed.
    #[error("{what}: {source}")]
    Setup {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Setup { what, source }
}

/// Environment variable naming a fault point (test-only): the agent aborts there, as if killed
/// with SIGKILL at that step, so crash recovery can be tested at every step.
pub const FAULT_ENV: &str = "CTGUARD_FAULT";

/// The named points [`FAULT_ENV`] can stop the agent at.
pub const FAULT_POINTS: &[&str] = &[
    "apply:after-prepared",
    "apply:after-apply",
    "apply:after-pending",
    "confirm:before-journal",
    "confirm:after-journal",
    "rollback:before-engine",
    "rollback:after-engine",
];

fn fault(point: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|p| p == point) {
        tracing::error!("fault hook {point}: aborting");
        // No core file for a deliberate crash.
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
        std::process::abort();
    }
}

fn now_wall() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

struct Shared {
    opts: AgentOptions,
    engines: Engines,
    journal: Journal,
    boot_id: String,
    inner: Mutex<Inner>,
    /// Woken (after `idle_exit`) when a request or a transaction ended: a detached agent then
    /// checks whether it may exit. No periodic wake-ups.
    idle: tokio::sync::Notify,
}

/// Asks the main loop to check for idleness once `idle_exit` has passed.
fn schedule_idle_check(shared: &Arc<Shared>) {
    if !shared.opts.detached {
        return;
    }
    let s = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(s.opts.idle_exit).await;
        s.idle.notify_one();
    });
}

#[derive(Default)]
struct Inner {
    workers: HashMap<(u64, u64), Worker>,
    timers: HashMap<String, tokio::task::AbortHandle>,
    last_activity: Option<Instant>,
}

/// Runs the agent until SIGTERM/SIGINT (rolling back what is pending first) or, when
/// detached, until nothing is pending and it has been idle for `idle_exit`.
pub fn run(opts: AgentOptions, engines: Engines) -> Result<(), AgentError> {
    join_initial_mount_namespace();
    create_private_dir(&opts.run_dir)?;
    let lock_path = opts.run_dir.join("agent.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(setup(format!("cannot open {}", lock_path.display())))?;
    // SAFETY: flock on a valid descriptor we own.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock_file), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        tracing::info!("another agent holds {}; exiting", lock_path.display());
        return Ok(());
    }
    if opts.detached {
        // The kernel's OOM killer must not take the process that owns the rollback.
        let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    }
    // A full or read-only state dir must not keep the agent from rolling back what is
    // pending: fall back to the journal as it is (each apply checks for room itself).
    let journal = match Journal::open(&opts.state_dir) {
        Ok(j) => j,
        Err(e @ (crate::journal::JournalError::NoSpace { .. } | crate::journal::JournalError::NotWritable { .. })) => {
            tracing::error!("{e}; serving recovery and rollbacks only until there is room");
            Journal::attach(&opts.state_dir)?
        }
        Err(e) => return Err(e.into()),
    };
    let boot_id = journal::boot_id().map_err(setup("cannot read the boot id"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("cannot start the runtime"))?;
    let shared = Arc::new(Shared {
        opts,
        engines,
        journal,
        boot_id,
        inner: Mutex::new(Inner::default()),
        idle: tokio::sync::Notify::new(),
    });
    let result = rt.block_on(serve(shared));
    drop(lock_file);
    result
}

/// A process started under `ip netns exec` lives in a private mount namespace, where the
/// namespace pins would be invisible to a later agent; join PID 1's when allowed.
fn join_initial_mount_namespace() {
    match std::fs::File::open("/proc/1/ns/mnt") {
        Ok(f) => {
            if let Err(e) = nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNS) {
                tracing::warn!("cannot join the initial mount namespace: {e}");
            }
        }
        Err(e) => tracing::warn!("cannot open /proc/1/ns/mnt ({e}); staying in this mount namespace"),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(setup(format!("cannot create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(setup(format!("cannot restrict {}", dir.display())))
}

async fn serve(shared: Arc<Shared>) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let sock = super::client::socket_path(&shared.opts.run_dir);
    let _ = std::fs::remove_file(&sock); // stale: we hold the agent lock
    let listener = UnixListener::bind(&sock).map_err(setup(format!("cannot bind {}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(setup(format!("cannot restrict {}", sock.display())))?;
    tracing::info!(pid = std::process::id(), "agent listening on {}", sock.display());

    recover(&shared).await;

    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    spawn_signal_thread(sig_tx)?;
    shared.inner.lock().await.last_activity = Some(Instant::now());
    schedule_idle_check(&shared);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let s = shared.clone();
                    tokio::spawn(async move { handle_connection(s, stream).await });
                }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            Some(sig) = sig_rx.recv() => match sig {
                Signal::Stop(name) => {
                    tracing::warn!("{name} received: rolling back pending transactions before exit");
                    stop_all(&shared).await;
                    break;
                }
                Signal::Confirm(pid) => confirm_by_signal(&shared, pid).await,
            },
            _ = shared.idle.notified(), if shared.opts.detached => {
                let inner = shared.inner.lock().await;
                let quiet = inner.last_activity.is_some_and(|t| t.elapsed() >= shared.opts.idle_exit);
                drop(inner);
                if quiet && unfinished(&shared).is_empty() {
                    tracing::info!("nothing pending; detached agent exits");
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

enum Signal {
    Stop(&'static str),
    Confirm(Option<i32>),
}

/// signal-hook on a plain thread: SIGHUP is caught and ignored (an agent that inherited a
/// terminal must survive its loss), SIGTERM/SIGINT stop, SIGUSR1 confirms.
fn spawn_signal_thread(tx: tokio::sync::mpsc::UnboundedSender<Signal>) -> Result<(), AgentError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    use signal_hook::iterator::exfiltrator::WithOrigin;
    use signal_hook::iterator::SignalsInfo;
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGHUP, SIGINT, SIGTERM, SIGUSR1])
        .map_err(setup("cannot install signal handlers"))?;
    std::thread::Builder::new()
        .name("ctguard-signals".into())
        .spawn(move || {
            for info in signals.forever() {
                let sent = match info.signal {
                    SIGHUP => {
                        tracing::info!("SIGHUP ignored");
                        continue;
                    }
                    SIGTERM => tx.send(Signal::Stop("SIGTERM")),
                    SIGINT => tx.send(Signal::Stop("SIGINT")),
                    SIGUSR1 => tx.send(Signal::Confirm(info.process.map(|p| p.pid))),
                    _ => continue,
                };
                if sent.is_err() {
                    break;
                }
            }
        })
        .map_err(setup("cannot start the signal thread"))?;
    Ok(())
}

fn unfinished(shared: &Shared) -> Vec<TxnRecord> {
    match shared.journal.unfinished() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("cannot read the journal: {e}");
            Vec::new()
        }
    }
}

async fn handle_connection(shared: Arc<Shared>, stream: UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("SO_PEERCRED failed: {e}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    // Read the request first (bounded) so the client can always read the answer.
    let read = reader.read_line(&mut line).await;
    let response = if peer.uid() != 0 {
        tracing::warn!(uid = peer.uid(), pid = ?peer.pid(), "refused a non-root client");
        Response::fail(Exit::BadInput, "permission denied: the agent serves root only")
    } else {
        match read {
            Ok(n) if n > MAX_REQUEST_BYTES => Response::fail(Exit::BadInput, "request too large"),
            Ok(0) => return,
            Ok(_) => match serde_json::from_str::<Envelope>(&line) {
                Ok(env) if env.v != VERSION => {
                    Response::fail(Exit::BadInput, format!("protocol version {} is not {VERSION}", env.v))
                }
                Ok(env) => {
                    shared.inner.lock().await.last_activity = Some(Instant::now());
                    let r = dispatch(&shared, env.request, peer.pid(), peer.uid()).await;
                    shared.inner.lock().await.last_activity = Some(Instant::now());
                    r
                }
                Err(e) => Response::fail(Exit::BadInput, format!("malformed request: {e}")),
            },
            Err(e) => Response::fail(Exit::BadInput, format!("cannot read the request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    schedule_idle_check(&shared);
}

async fn dispatch(shared: &Arc<Shared>, req: Request, peer_pid: Option<i32>, peer_uid: u32) -> Response {
    match req {
        Request::Ping => Response::ok(json!({"pid": std::process::id()})),
        Request::Apply(a) => apply(shared, a, peer_pid, peer_uid).await,
        Request::Confirm { txid } => confirm(shared, txid.as_deref(), peer_pid).await,
        Request::Extend { txid, by_secs } => extend(shared, txid.as_deref(), by_secs).await,
        Request::Rollback { txid } => rollback_request(shared, txid.as_deref()).await,
    }
}

/// The worker for a target, started on first use.
async fn worker_for(shared: &Shared, target: Target) -> Result<Worker, Response> {
    let id = target.id;
    let mut inner = shared.inner.lock().await;
    if let Some(w) = inner.workers.get(&id) {
        return Ok(w.clone());
    }
    let w = Worker::spawn(target, format!("ctguard-ns-{}", id.1))
        .map_err(|e| Response::fail(Exit::Internal, format!("cannot enter the target: {e}")))?;
    inner.workers.insert(id, w.clone());
    Ok(w)
}

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

fn journaled_tools() -> std::collections::BTreeMap<String, String> {
    JOURNALED_TOOLS
        .iter()
        .filter_map(|t| crate::backend::exec::Tool::find(t).ok())
        .map(|t| (t.name, t.path.display().to_string()))
        .collect()
}

fn ram_facts() -> MachineFacts {
    MachineFacts::with_ram(crate::sysctl::mem_total_bytes().unwrap_or(0))
}

fn load_policy(a: &ApplyRequest) -> Result<Policy, Response> {
    let Some(text) = &a.policy_text else { return Ok(Policy::builtin()) };
    let format = match a.policy_format.as_deref() {
        Some("json") => Format::Json,
        _ => Format::Toml,
    };
    parse_policy(text, format).map_err(|errs| {
        Response::fail(Exit::BadInput, errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
    })
}

async fn apply(shared: &Arc<Shared>, a: ApplyRequest, peer_pid: Option<i32>, peer_uid: u32) -> Response {
    let policy = match load_policy(&a) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if a.timeout_secs == 0 || Duration::from_secs(a.timeout_secs) > crate::duration::MAX_DURATION {
        return Response::fail(Exit::BadInput, "timeout: must be between 1 s and 7 days");
    }
    let probes = match a.options.probes.iter().map(|p| Probe::parse(p)).collect::<Result<Vec<_>, _>>() {
        Ok(p) => p,
        Err(e) => return Response::fail(Exit::BadInput, format!("--probe: {e}")),
    };
    if a.options.auto_confirm && probes.is_empty() {
        return Response::fail(Exit::BadInput, "--auto-confirm needs at least one --probe");
    }
    if a.options.probe_interval_secs == Some(0) {
        return Response::fail(Exit::BadInput, "--probe-interval: must be positive");
    }
    // Who asks, over which SSH connection (DESIGN §4). A requester under sshd whose connection
    // cannot be identified is refused, never taken for a local shell.
    let origin = if a.options.allow_same_connection {
        None
    } else {
        match peer_pid.map(proof::origin_of) {
            Some(Ok(o)) => Some(o),
            Some(Err(e)) => {
                return Response::fail(
                    Exit::BadInput,
                    format!("cannot identify your SSH connection ({e}); retry, or pass --allow-same-connection"),
                )
            }
            None => return Response::fail(Exit::BadInput, "cannot identify the requester (no peer pid)"),
        }
    };
    // The target: --netns, or the requester's own namespace (read while it is connected).
    let (label, spec) = match &a.netns {
        Some(n) => match TargetSpec::parse(n) {
            Ok(s) => (n.clone(), s),
            Err(e) => return Response::fail(Exit::BadInput, e.to_string()),
        },
        None => match peer_pid {
            Some(pid) => ("caller".to_string(), TargetSpec::Path(PathBuf::from(format!("/proc/{pid}/ns/net")))),
            None => return Response::fail(Exit::BadInput, "cannot tell the caller's namespace (no peer pid)"),
        },
    };
    let target = match Target::open(&spec) {
        Ok(t) => t,
        Err(e) => return Response::fail(Exit::BadInput, e.to_string()),
    };
    // The caller's namespace may be a named one (`ip netns exec NAME ctguard apply`): record
    // its name and path, which outlive the caller's pid and a pin hidden in a private mount
    // namespace.
    let (label, target_path) = match (label.as_str(), named_netns_of(target.id)) {
        ("caller", Some((name, path))) => (name, path),
        ("caller", None) if target.is_initial() => ("host".to_string(), target.path().display().to_string()),
        _ => (label, target.path().display().to_string()),
    };
    let id = target.id;
    // Persistence describes the host's boot: a namespace has none. (A policy file saying
    // `persist = true` applied to a namespace — `ctguard restore` re-applying the saved one —
    // is applied, and its commit reports that nothing was persisted.)
    if a.options.persist && !target.is_initial() {
        return Response::fail(Exit::BadInput, "--persist: only the host's own namespace boots from /etc");
    }
    // One pending transaction per target.
    if let Some(p) = unfinished(shared).into_iter().find(|r| (r.target.dev, r.target.ino) == id) {
        let left = p.seconds_left(journal::boottime_ns()).unwrap_or(0);
        return Response {
            v: VERSION,
            exit: Exit::Busy.code(),
            error: Some(format!("transaction {} is {} on this target ({left} s left)", p.id, p.state.name())),
            data: json!({"pending": p.id.as_str(), "seconds_left": left}),
        };
    }
    if let Err(e) = shared.journal.check_room() {
        return Response::fail(Exit::BadInput, format!("state dir: {e}"));
    }
    let txid = match shared.journal.fresh_id(now_wall()) {
        Ok(id) => id,
        Err(e) => return Response::fail(Exit::Internal, e.to_string()),
    };
    let tag = match Tag::new(txid.as_str()) {
        Ok(t) => t,
        Err(e) => return Response::fail(Exit::Internal, e),
    };
    let pin = shared.opts.run_dir.join("ns").join(txid.as_str());
    if let Err(e) = target.pin(&pin) {
        return Response::fail(Exit::BadInput, format!("cannot pin the target namespace: {e}"));
    }
    let worker = match worker_for(shared, target).await {
        Ok(w) => w,
        Err(r) => {
            unpin(&pin);
            return r;
        }
    };
    if a.options.auto_confirm {
        let p2 = probes.clone();
        let local = worker.call(move || p2.iter().filter(|p| probe::aims_at_local_address(p)).map(|p| p.to_string()).collect::<Vec<_>>()).await;
        match local {
            Ok(l) if l.is_empty() => {}
            Ok(l) => {
                unpin(&pin);
                return Response::fail(
                    Exit::BadInput,
                    format!("--auto-confirm: {} aim(s) at the target's own addresses; over loopback they prove nothing", l.join(", ")),
                );
            }
            Err(e) => {
                unpin(&pin);
                return Response::fail(Exit::Internal, e.to_string());
            }
        }
    }
    let kind = if a.ruleset.is_some() { Kind::Ruleset } else { Kind::Policy };
    let previous_undo = if kind == Kind::Policy { last_committed(shared, id).map(|r| r.undo) } else { None };
    let input = ApplyInput {
        policy: policy.clone(),
        ruleset: a.ruleset.clone(),
        tag,
        force: a.force,
        ssh: origin
            .as_ref()
            .and_then(|o| o.conn().map(|c| c.lint_conn()))
            .or_else(|| a.ssh.as_deref().and_then(SshConn::from_env_value)),
        previous_undo,
        facts: ram_facts(),
    };
    let engine = shared.engines.of(kind);
    let prepared = match worker.call(move || engine.prepare(&input)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            unpin(&pin);
            return Response::fail(e.exit, e.message);
        }
        Err(e) => {
            unpin(&pin);
            return Response::fail(Exit::Internal, e.to_string());
        }
    };
    let warnings = prepared.warnings();
    let target_rec = TargetRecord {
        label: label.clone(),
        path: target_path,
        pin: Some(pin.display().to_string()),
        dev: id.0,
        ino: id.1,
    };
    let ssh = origin.as_ref().and_then(|o| o.conn().map(|c| c.to_env_value())).or_else(|| a.ssh.clone());
    let requester = Requester { uid: peer_uid, pid: peer_pid.unwrap_or(0), ssh, origin: origin.clone() };
    let mut rec = TxnRecord::new(txid.clone(), kind, target_rec, requester, shared.boot_id.clone(), now_wall());
    match &a.ruleset {
        Some(r) => rec.ruleset = Some(r.text.clone()),
        None => rec.policy = serde_json::to_value(&policy).ok(),
    }
    rec.before = Some(prepared.before());
    rec.undo = prepared.planned_undo();
    rec.tools = journaled_tools();
    rec.options = a.options.clone();
    rec.genid_before = rec.undo.get("genid_before").and_then(serde_json::Value::as_u64).map(|g| g as u32);
    if let Err(e) = shared.journal.write(&rec) {
        unpin(&pin);
        return Response::fail(Exit::BadInput, format!("journal: {e}"));
    }
    fault("apply:after-prepared");
    // The change. From here on, every failure rolls back.
    let undo = match worker.call(move || prepared.apply()).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return fail_and_roll_back(shared, &worker, rec, e.exit, e.message).await,
        Err(e) => return fail_and_roll_back(shared, &worker, rec, Exit::Internal, e.to_string()).await,
    };
    fault("apply:after-apply");
    rec.undo = undo.clone();
    rec.genid_after = undo.get("genid_after").and_then(serde_json::Value::as_u64).map(|g| g as u32);
    let engine = shared.engines.of(kind);
    let undo2 = undo.clone();
    match worker.call(move || engine.check_rollback(&undo2)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let msg = format!("the rollback does not pass the kernel check, so the change is undone: {e}");
            return fail_and_roll_back(shared, &worker, rec, Exit::Refused, msg).await;
        }
        Err(e) => return fail_and_roll_back(shared, &worker, rec, Exit::Internal, e.to_string()).await,
    }
    let engine = shared.engines.of(kind);
    let undo3 = undo.clone();
    rec.after = worker.call(move || engine.listing(&undo3)).await.ok().and_then(Result::ok);
    let now_bt = journal::boottime_ns();
    let deadline_bt = now_bt + a.timeout_secs * 1_000_000_000;
    let deadline = Deadline { boottime_ns: deadline_bt, boot_id: shared.boot_id.clone(), wall_unix: now_wall() + a.timeout_secs };
    if let Err(e) = rec.to_pending(deadline, now_wall()) {
        return fail_and_roll_back(shared, &worker, rec, Exit::Internal, e.to_string()).await;
    }
    if let Err(e) = shared.journal.write(&rec) {
        return fail_and_roll_back(shared, &worker, rec, Exit::Internal, format!("journal: {e}")).await;
    }
    fault("apply:after-pending");
    arm_timer(shared, txid.as_str().to_string(), deadline_bt).await;
    tracing::info!(txid = txid.as_str(), target = %label, "applied; pending for {} s", a.timeout_secs);
    // The command that confirms: from a new connection when the proof applies.
    let confirm_cmd = confirm_command(shared, origin.as_ref().and_then(|o| o.conn()), txid.as_str());
    let mut probe_results = Value::Null;
    let mut state = "PENDING";
    // A ruleset that changed no listing is committed at once (DESIGN §8): nothing to guard.
    let noop = kind == Kind::Ruleset && rec.before.is_some() && rec.before == rec.after;
    if noop {
        let r = commit(shared, rec.clone(), "no-op: applying the ruleset changed no listing; committed at once").await;
        if r.exit != 0 {
            return r;
        }
        state = "COMMITTED";
    } else if !probes.is_empty() {
        // The first round: apply answers only after it (exit 5 if it rolled back).
        let results = run_probes(&worker, probes.clone()).await;
        probe_results = json!(results);
        let failed: Vec<String> = results.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.probe, r.detail)).collect();
        if !failed.is_empty() {
            cancel_timer(shared, txid.as_str()).await;
            let detail = failed.join("; ");
            return match do_rollback(shared, &worker, &mut rec, Reason::ProbeFailed(detail.clone())).await {
                Ok(()) => Response {
                    v: VERSION,
                    exit: Exit::RolledBack.code(),
                    error: Some(format!("probe failed, rolled back: {detail}")),
                    data: json!({"txid": txid.as_str(), "probes": probe_results}),
                },
                Err(e) => Response::fail(Exit::RollbackFailed, format!("probe failed ({detail}); then the rollback failed: {e}")),
            };
        }
        rec.note(now_wall(), format!("first probe round passed ({} probes)", results.len()));
        let _ = shared.journal.write(&rec);
        if a.options.auto_confirm {
            let r = commit(shared, rec.clone(), "auto-confirmed: every probe passed").await;
            if r.exit != 0 {
                return r;
            }
            state = "COMMITTED";
        } else if let Some(every) = a.options.probe_interval_secs {
            spawn_probe_rounds(shared.clone(), worker.clone(), txid.clone(), probes, Duration::from_secs(every));
        }
    }
    Response::ok(json!({
        "state": state,
        "noop": noop,
        "probes": probe_results,
        "needs_new_connection": origin.as_ref().is_some_and(|o| o.conn().is_some()),
        "txid": txid.as_str(),
        "target": label,
        "deadline": txn::format_rfc3339(now_wall() + a.timeout_secs),
        "seconds_left": a.timeout_secs,
        "confirm": confirm_cmd,
        "warnings": warnings,
    }))
}

/// `ctguard` with the run and state dirs this agent serves when they are not the defaults, so a
/// printed confirm command reaches this agent.
fn ctguard_invocation(shared: &Shared) -> String {
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
fn confirm_command(shared: &Shared, conn: Option<&proof::SshConn4>, txid: &str) -> String {
    let local = format!("{} confirm {txid}", ctguard_invocation(shared));
    match conn {
        Some(c) => proof::ConfirmRefusal { conn: *c }
            .new_connection_command(Some(txid))
            .replace(&format!("ctguard confirm {txid}"), &local),
        None => local,
    }
}

/// Each probe's timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

async fn run_probes(worker: &Worker, probes: Vec<Probe>) -> Vec<ProbeResult> {
    match worker.call(move || probe::run_all(&probes, PROBE_TIMEOUT)).await {
        Ok(r) => r,
        Err(e) => vec![ProbeResult { probe: "worker".into(), ok: false, detail: e.to_string(), elapsed_ms: 0 }],
    }
}

/// `--probe-interval`: repeats the probes until the transaction is no longer pending; any
/// failure rolls back at once.
fn spawn_probe_rounds(shared: Arc<Shared>, worker: Worker, txid: TxnId, probes: Vec<Probe>, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Ok(mut rec) = shared.journal.load(&txid) else { return };
            if rec.state != State::Pending {
                return;
            }
            let results = run_probes(&worker, probes.clone()).await;
            let failed: Vec<String> = results.iter().filter(|r| !r.ok).map(|r| format!("{}: {}", r.probe, r.detail)).collect();
            // The state may have changed while the probes ran.
            let Ok(fresh) = shared.journal.load(&txid) else { return };
            if fresh.state != State::Pending {
                return;
            }
            if !failed.is_empty() {
                tracing::warn!(txid = txid.as_str(), "probe failed: {}; rolling back", failed.join("; "));
                cancel_timer(&shared, txid.as_str()).await;
                let _ = do_rollback(&shared, &worker, &mut rec, Reason::ProbeFailed(failed.join("; "))).await;
                return;
            }
        }
    });
}

/// The latest COMMITTED policy transaction on a target (the one a new apply replaces).
fn last_committed(shared: &Shared, id: (u64, u64)) -> Option<TxnRecord> {
    let all = shared.journal.list().ok()?;
    all.into_iter()
        .rev()
        .find(|r| (r.target.dev, r.target.ino) == id && r.kind == Kind::Policy)
        .filter(|r| r.state == State::Committed)
}

async fn fail_and_roll_back(shared: &Arc<Shared>, worker: &Worker, mut rec: TxnRecord, exit: Exit, msg: String) -> Response {
    tracing::error!(txid = rec.id.as_str(), "{msg}; rolling back");
    match do_rollback(shared, worker, &mut rec, Reason::ApplyFailed(msg.clone())).await {
        Ok(()) => Response::fail(exit, format!("{msg} (rolled back)")),
        Err(e) => Response::fail(Exit::RollbackFailed, format!("{msg}; then the rollback failed: {e}")),
    }
}

/// Rolls back `rec` on `worker` and journals the outcome; on failure schedules a retry.
async fn do_rollback(shared: &Arc<Shared>, worker: &Worker, rec: &mut TxnRecord, reason: Reason) -> Result<(), String> {
    let engine = shared.engines.of(rec.kind);
    let undo = rec.undo.clone();
    let after = rec.after.clone();
    fault("rollback:before-engine");
    let result = match worker.call(move || engine.rollback_report(&undo, after.as_deref())).await {
        Ok(r) => r.map_err(|e| e.message),
        Err(e) => Err(e.to_string()),
    };
    fault("rollback:after-engine");
    match result {
        Ok(report) => {
            // What the rollback found and overwrote (a ruleset transaction's drift) joins the
            // undo record, journaled with the outcome below.
            if let (serde_json::Value::Object(extra), Some(undo)) = (report, rec.undo.as_object_mut()) {
                undo.extend(extra);
            }
            let is_host = rec.target.label == "host";
            let _ = rec.to_rolled_back(reason.clone(), now_wall());
            if let Err(e) = shared.journal.write(rec) {
                tracing::error!("journal: {e}");
            }
            if let Some(p) = &rec.target.pin {
                unpin(Path::new(p));
            }
            let _ = shared.journal.prune(journal::DEFAULT_KEEP);
            schedule_idle_check(shared);
            tracing::warn!(txid = rec.id.as_str(), "rolled back ({reason})");
            if is_host && reason == Reason::Deadline {
                wall(&format!("ctguard: transaction {} not confirmed; automatic rollback complete", rec.id));
            }
            Ok(())
        }
        Err(e) => {
            let _ = rec.to_rollback_failed(e.clone(), now_wall());
            if let Err(je) = shared.journal.write(rec) {
                tracing::error!("journal: {je}");
            }
            let attempts = match &rec.state {
                State::RollbackFailed { attempts, .. } => *attempts,
                _ => 1,
            };
            tracing::error!(txid = rec.id.as_str(), "ROLLBACK FAILED (attempt {attempts}): {e} — operator needed");
            let delay = txn::retry_delay(attempts);
            let s = shared.clone();
            let id = rec.id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                retry_rollback(s, id).await;
            });
            Err(e)
        }
    }
}

fn retry_rollback(shared: Arc<Shared>, id: TxnId) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let Ok(mut rec) = shared.journal.load(&id) else { return };
        if !matches!(rec.state, State::RollbackFailed { .. }) {
            return;
        }
        if let Ok(w) = worker_for_record(&shared, &rec).await {
            let _ = do_rollback(&shared, &w, &mut rec, Reason::Recovered).await;
        }
    })
}

/// Notifies logged-in users, Junos-style; best effort.
fn wall(message: &str) {
    if let Ok(tool) = crate::backend::exec::Tool::find("wall") {
        let _ = tool.run(&[message], None);
    }
}

async fn arm_timer(shared: &Arc<Shared>, txid: String, deadline_bt: u64) {
    let s = shared.clone();
    let id = txid.clone();
    let handle = tokio::spawn(async move {
        if let Err(e) = super::timer::sleep_until_boottime(deadline_bt).await {
            tracing::error!("timerfd failed ({e}); rolling back now");
        }
        deadline_fired(s, id).await;
    });
    let mut inner = shared.inner.lock().await;
    if let Some(old) = inner.timers.insert(txid, handle.abort_handle()) {
        old.abort();
    }
}

async fn deadline_fired(shared: Arc<Shared>, txid: String) {
    let Ok(id) = TxnId::parse(&txid) else { return };
    let Ok(mut rec) = shared.journal.load(&id) else { return };
    shared.inner.lock().await.timers.remove(&txid);
    if rec.state != State::Pending {
        return;
    }
    tracing::warn!(txid = %txid, "deadline reached without confirmation; rolling back");
    match worker_for_record(&shared, &rec).await {
        Ok(w) => {
            let _ = do_rollback(&shared, &w, &mut rec, Reason::Deadline).await;
        }
        Err(e) => {
            let _ = rec.to_rollback_failed(e.clone(), now_wall());
            let _ = shared.journal.write(&rec);
            tracing::error!(txid = %txid, "ROLLBACK FAILED: {e}");
        }
    }
}

/// A name under /run/netns whose namespace is `id`, with its path.
fn named_netns_of(id: (u64, u64)) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(crate::netns::NETNS_RUN_DIR).ok()?.flatten().find_map(|e| {
        let m = std::fs::metadata(e.path()).ok()?;
        ((m.dev(), m.ino()) == id).then(|| (e.file_name().to_string_lossy().into_owned(), e.path().display().to_string()))
    })
}

/// The worker of a journaled transaction's target: through its pin (survives agent crashes),
/// else through the recorded path — each checked against the recorded device and inode.
async fn worker_for_record(shared: &Shared, rec: &TxnRecord) -> Result<Worker, String> {
    let mut tried = Vec::new();
    for path in rec.target.pin.iter().chain(std::iter::once(&rec.target.path)) {
        match Target::open(&TargetSpec::Path(PathBuf::from(path))) {
            Ok(t) if t.id == (rec.target.dev, rec.target.ino) => {
                return worker_for(shared, t).await.map_err(|r| r.error.unwrap_or_default());
            }
            Ok(_) => tried.push(format!("{path} is another namespace now")),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(format!("the transaction's namespace is gone or unreachable: {}", tried.join("; ")))
}

/// Finds the transaction a confirm/extend/rollback names, or the single unfinished one.
fn pick(shared: &Shared, txid: Option<&str>) -> Result<TxnRecord, Response> {
    match txid {
        Some(t) => {
            let id = TxnId::parse(t).map_err(|e| Response::fail(Exit::BadInput, e.to_string()))?;
            shared.journal.load(&id).map_err(|e| Response::fail(Exit::BadInput, e.to_string()))
        }
        None => {
            let mut pending: Vec<TxnRecord> = unfinished(shared);
            match pending.len() {
                0 => Err(Response::fail(Exit::BadInput, "no transaction is pending")),
                1 => Ok(pending.remove(0)),
                n => Err(Response::fail(Exit::BadInput, format!("{n} transactions are pending; name one"))),
            }
        }
    }
}

async fn cancel_timer(shared: &Shared, txid: &str) {
    if let Some(h) = shared.inner.lock().await.timers.remove(txid) {
        h.abort();
    }
}

async fn confirm(shared: &Arc<Shared>, txid: Option<&str>, peer_pid: Option<i32>) -> Response {
    let rec = match pick(shared, txid) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match &rec.state {
        State::Committed => return Response::ok(json!({"txid": rec.id.as_str(), "state": "COMMITTED", "note": "already committed"})),
        State::RolledBack { reason } => {
            return Response::fail(Exit::RolledBack, format!("transaction {} was already rolled back ({reason})", rec.id))
        }
        State::RollbackFailed { .. } => {
            return Response::fail(Exit::RollbackFailed, format!("transaction {}: rollback failed; state unknown", rec.id))
        }
        State::Prepared => return Response::fail(Exit::BadInput, format!("transaction {} is still being applied", rec.id)),
        State::Pending => {}
    }
    // The proof of a new connection (DESIGN §4).
    let mut note = "confirmed".to_string();
    if !rec.options.allow_same_connection {
        let confirming = match peer_pid.map(proof::origin_of) {
            Some(Ok(o)) => o,
            Some(Err(e)) => {
                return Response::fail(Exit::ConfirmRefused, format!("confirm refused: cannot identify its SSH connection ({e})"))
            }
            None => return Response::fail(Exit::ConfirmRefused, "confirm refused: the sender is gone"),
        };
        if let Some(applied) = &rec.requester.origin {
            if let Err(refusal) = proof::check_confirm(applied, &confirming) {
                return Response::fail(
                    Exit::ConfirmRefused,
                    format!(
                        "confirm refused: it came over the same SSH connection as the apply ({}); confirm from a NEW connection: {}",
                        refusal.conn,
                        confirm_command(shared, Some(&refusal.conn), rec.id.as_str())
                    ),
                );
            }
        }
        note = format!("confirmed from {confirming}");
    }
    commit(shared, rec, &note).await
}

/// PENDING → COMMITTED: cancel the timer, journal, persist when asked, unpin.
async fn commit(shared: &Arc<Shared>, mut rec: TxnRecord, note: &str) -> Response {
    cancel_timer(shared, rec.id.as_str()).await;
    fault("confirm:before-journal");
    rec.note(now_wall(), note);
    if let Err(e) = rec.to_committed(now_wall()) {
        return Response::fail(Exit::Internal, e.to_string());
    }
    if let Err(e) = shared.journal.write(&rec) {
        // Not journaled: keep the dead-man timer (safety first).
        if let Some(d) = &rec.deadline {
            arm_timer(shared, rec.id.as_str().to_string(), d.boottime_ns).await;
        }
        return Response::fail(Exit::Internal, format!("journal: {e}"));
    }
    fault("confirm:after-journal");
    let mut persist_note = Value::Null;
    if crate::persist::wants_persist(&rec) {
        let paths = crate::persist::PersistPaths::detect(Path::new("/"), shared.journal.state_dir());
        match crate::persist::on_committed(&rec, &paths) {
            Ok(Some(written)) => {
                persist_note = serde_json::to_value(&written).unwrap_or(Value::Null);
                if let Some(u) = rec.undo.as_object_mut() {
                    u.insert("persisted".into(), persist_note.clone());
                }
                if let Err(e) = shared.journal.write(&rec) {
                    tracing::error!("journal: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(txid = rec.id.as_str(), "committed, but persisting failed: {e}");
                persist_note = json!({"error": e.to_string()});
            }
        }
    }
    if let Some(p) = &rec.target.pin {
        unpin(Path::new(p));
    }
    let _ = shared.journal.prune(journal::DEFAULT_KEEP);
    schedule_idle_check(shared);
    tracing::info!(txid = rec.id.as_str(), "{note}");
    Response::ok(json!({"txid": rec.id.as_str(), "state": "COMMITTED", "persisted": persist_note}))
}

async fn extend(shared: &Arc<Shared>, txid: Option<&str>, by_secs: u64) -> Response {
    let mut rec = match pick(shared, txid) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match &rec.state {
        State::Pending => {}
        State::RolledBack { reason } => {
            return Response::fail(Exit::RolledBack, format!("transaction {} was already rolled back ({reason})", rec.id))
        }
        s => return Response::fail(Exit::BadInput, format!("transaction {} is {}, not pending", rec.id, s.name())),
    }
    let Some(old) = rec.deadline.clone() else { return Response::fail(Exit::Internal, "pending without a deadline") };
    let by_ns = by_secs.saturating_mul(1_000_000_000);
    let new = Deadline { boottime_ns: old.boottime_ns + by_ns, boot_id: old.boot_id.clone(), wall_unix: old.wall_unix + by_secs };
    if let Err(e) = rec.extend(new.clone(), now_wall()) {
        return Response::fail(Exit::BadInput, e.to_string());
    }
    if let Err(e) = shared.journal.write(&rec) {
        return Response::fail(Exit::Internal, format!("journal: {e}"));
    }
    arm_timer(shared, rec.id.as_str().to_string(), new.boottime_ns).await;
    let left = rec.seconds_left(journal::boottime_ns()).unwrap_or(0);
    Response::ok(json!({"txid": rec.id.as_str(), "deadline": txn::format_rfc3339(new.wall_unix), "seconds_left": left}))
}

async fn rollback_request(shared: &Arc<Shared>, txid: Option<&str>) -> Response {
    let mut rec = match pick(shared, txid) {
        Ok(r) => r,
        Err(r) => return r,
    };
    match &rec.state {
        State::Pending | State::Prepared | State::RollbackFailed { .. } => {}
        State::RolledBack { reason } => {
            return Response::ok(json!({"txid": rec.id.as_str(), "state": "ROLLED_BACK", "note": format!("already rolled back ({reason})")}))
        }
        State::Committed => {
            return Response::fail(Exit::BadInput, format!("transaction {} is committed; apply a new policy to change it", rec.id))
        }
    }
    cancel_timer(shared, rec.id.as_str()).await;
    let worker = match worker_for_record(shared, &rec).await {
        Ok(w) => w,
        Err(e) => return Response::fail(Exit::RollbackFailed, e),
    };
    match do_rollback(shared, &worker, &mut rec, Reason::Cancelled).await {
        Ok(()) => Response::ok(json!({"txid": rec.id.as_str(), "state": "ROLLED_BACK"})),
        Err(e) => Response::fail(Exit::RollbackFailed, format!("rollback of {} failed: {e}", rec.id)),
    }
}

async fn confirm_by_signal(shared: &Arc<Shared>, pid: Option<i32>) {
    let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    if !alive {
        tracing::warn!("SIGUSR1 from a sender that is gone ({pid:?}): refused");
        return;
    }
    let r = confirm(shared, None, pid).await;
    match r.error {
        None => tracing::info!("SIGUSR1 from pid {pid:?} confirmed the pending transaction"),
        Some(e) => tracing::warn!("SIGUSR1 from pid {pid:?} refused: {e}"),
    }
}

/// SIGTERM/SIGINT: roll back everything unfinished before exit.
async fn stop_all(shared: &Arc<Shared>) {
    for mut rec in unfinished(shared) {
        cancel_timer(shared, rec.id.as_str()).await;
        match worker_for_record(shared, &rec).await {
            Ok(w) => {
                let _ = do_rollback(shared, &w, &mut rec, Reason::AgentStopping).await;
            }
            Err(e) => tracing::error!(txid = rec.id.as_str(), "cannot reach the target to roll back: {e}"),
        }
    }
}

/// Journal recovery on start (DESIGN §2).
async fn recover(shared: &Arc<Shared>) {
    let now = journal::boottime_ns();
    for mut rec in unfinished(shared) {
        match txn::recovery_action(&rec, &shared.boot_id, now) {
            Recovery::Nothing => {}
            Recovery::CloseRebooted => {
                let _ = rec.to_rolled_back(Reason::Reboot, now_wall());
                let _ = shared.journal.write(&rec);
                if let Some(p) = &rec.target.pin {
                    unpin(Path::new(p));
                }
                tracing::warn!(txid = rec.id.as_str(), "closed: the host rebooted (nothing restored)");
            }
            Recovery::Rearm { remaining_ns } => {
                tracing::warn!(txid = rec.id.as_str(), "re-armed: {} s left", remaining_ns / 1_000_000_000);
                if let Some(d) = &rec.deadline {
                    arm_timer(shared, rec.id.as_str().to_string(), d.boottime_ns).await;
                }
            }
            Recovery::RollBackNow | Recovery::RetryRollback => {
                tracing::warn!(txid = rec.id.as_str(), "found {} at start: rolling back", rec.state.name());
                match worker_for_record(shared, &rec).await {
                    Ok(w) => {
                        let _ = do_rollback(shared, &w, &mut rec, Reason::Recovered).await;
                    }
                    Err(e) => {
                        let _ = rec.to_rollback_failed(e.clone(), now_wall());
                        let _ = shared.journal.write(&rec);
                        tracing::error!(txid = rec.id.as_str(), "ROLLBACK FAILED: {e}");
                    }
                }
            }
        }
    }
}
