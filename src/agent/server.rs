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

use super::apply::apply;
pub use super::apply::{JOURNALED_TOOLS, PROBE_TIMEOUT};
use super::decide::{confirm, confirm_by_signal, extend, rollback_request};
use super::engine::Engines;
use super::lifecycle::{recover, stop_all};
use super::protocol::{Envelope, Request, Response, MAX_REQUEST_BYTES, VERSION};
use super::worker::Worker;
use crate::exit::Exit;
use crate::journal::{self, Journal};
use crate::netns::Target;
use crate::txn::TxnRecord;

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

pub(super) fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
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

pub(super) fn fault(point: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|p| p == point) {
        tracing::error!("fault hook {point}: aborting");
        // No core file for a deliberate crash.
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
        std::process::abort();
    }
}

pub(super) fn now_wall() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(super) struct Shared {
    pub(super) opts: AgentOptions,
    pub(super) engines: Engines,
    pub(super) journal: Journal,
    pub(super) boot_id: String,
    pub(super) inner: Mutex<Inner>,
    /// Woken (after `idle_exit`) when a request or a transaction ended: a detached agent then
    /// checks whether it may exit. No periodic wake-ups.
    pub(super) idle: tokio::sync::Notify,
}

/// Asks the main loop to check for idleness once `idle_exit` has passed.
pub(super) fn schedule_idle_check(shared: &Arc<Shared>) {
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
pub(super) struct Inner {
    pub(super) workers: HashMap<(u64, u64), Worker>,
    pub(super) timers: HashMap<String, tokio::task::AbortHandle>,
    pub(super) last_activity: Option<Instant>,
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
pub(super) fn join_initial_mount_namespace() {
    match std::fs::File::open("/proc/1/ns/mnt") {
        Ok(f) => {
            if let Err(e) = nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNS) {
                tracing::warn!("cannot join the initial mount namespace: {e}");
            }
        }
        Err(e) => tracing::warn!("cannot open /proc/1/ns/mnt ({e}); staying in this mount namespace"),
    }
}

pub(super) fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(setup(format!("cannot create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(setup(format!("cannot restrict {}", dir.display())))
}

pub(super) async fn serve(shared: Arc<Shared>) -> Result<(), AgentError> {
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

pub(super) enum Signal {
    Stop(&'static str),
    Confirm(Option<i32>),
}

/// signal-hook on a plain thread: SIGHUP is caught and ignored (an agent that inherited a
/// terminal must survive its loss), SIGTERM/SIGINT stop, SIGUSR1 confirms.
pub(super) fn spawn_signal_thread(tx: tokio::sync::mpsc::UnboundedSender<Signal>) -> Result<(), AgentError> {
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

pub(super) fn unfinished(shared: &Shared) -> Vec<TxnRecord> {
    match shared.journal.unfinished() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("cannot read the journal: {e}");
            Vec::new()
        }
    }
}

pub(super) async fn handle_connection(shared: Arc<Shared>, stream: UnixStream) {
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

pub(super) async fn dispatch(shared: &Arc<Shared>, req: Request, peer_pid: Option<i32>, peer_uid: u32) -> Response {
    match req {
        Request::Ping => Response::ok(json!({"pid": std::process::id()})),
        Request::Apply(a) => apply(shared, a, peer_pid, peer_uid).await,
        Request::Confirm { txid } => confirm(shared, txid.as_deref(), peer_pid).await,
        Request::Extend { txid, by_secs } => extend(shared, txid.as_deref(), by_secs).await,
        Request::Rollback { txid } => rollback_request(shared, txid.as_deref()).await,
    }
}

/// The worker for a target, started on first use.
pub(super) async fn worker_for(shared: &Shared, target: Target) -> Result<Worker, Response> {
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
