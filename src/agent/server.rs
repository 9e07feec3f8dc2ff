//! The agent process (DESIGN §2–§3): the root-only socket, the signals, the idle exit, and
//! start-up (locks, descriptor limit, journal, recovery). Every state change is the owner's
//! ([`super::owner`]); this module only decodes requests and hands them over.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::engine::Engines;
use super::owner;
use super::protocol::{Envelope, Request, Response, MAX_REQUEST_BYTES, VERSION};
use super::rollback::schedule_idle_check;
use super::state::Shared;
use crate::exit::Exit;
use crate::journal::{self, Journal};

pub use super::steps::{FAULT_ENV, FAULT_POINTS, JOURNALED_TOOLS, PROBE_TIMEOUT};

pub use super::state::AgentOptions;

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
    /// Another agent serves this run dir or state dir (exit 4).
    #[error("another agent{} already serves {path}; this one exits", pid_text(*.pid))]
    AlreadyRunning {
        /// Its lock file.
        path: PathBuf,
        /// Its pid, when it wrote one.
        pid: Option<i32>,
    },
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

fn pid_text(pid: Option<i32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Setup { what, source }
}

/// Most clients served at once; more are answered "busy" at once and closed, so a flood of
/// connections can never take the descriptors a rollback needs.
pub const MAX_CLIENTS: usize = 64;

/// A client must send its whole request within this time (an idle connection is closed).
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the agent until SIGTERM/SIGINT (rolling back what is pending first) or, when
/// detached, until nothing is unfinished, no request is in flight and it has been idle for
/// `idle_exit`. One agent per run dir and per state dir.
pub fn run(opts: AgentOptions, engines: Engines) -> Result<(), AgentError> {
    join_initial_mount_namespace();
    create_private_dir(&opts.run_dir)?;
    let _run_lock = exclusive_lock(&opts.run_dir.join("agent.lock"))?;
    raise_nofile_limit();
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
    let _state_lock = exclusive_lock(&opts.state_dir.join("agent.lock"))?;
    let boot_id = journal::boot_id().map_err(setup("cannot read the boot id"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("cannot start the runtime"))?;
    let shared = Arc::new(Shared::new(opts, engines, journal, boot_id));
    rt.block_on(serve(shared))
}

/// An exclusive flock held for the agent's life, with our pid written in it.
fn exclusive_lock(path: &Path) -> Result<std::fs::File, AgentError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(setup(format!("cannot open {}", path.display())))?;
    // SAFETY: flock on a valid descriptor we own.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut s = String::new();
        let pid = f.read_to_string(&mut s).ok().and_then(|_| s.trim().parse().ok());
        return Err(AgentError::AlreadyRunning { path: path.to_path_buf(), pid });
    }
    let _ = f.set_len(0);
    let _ = f.write_all(format!("{}\n", std::process::id()).as_bytes());
    Ok(f)
}

/// Raises the soft descriptor limit to the hard one (at most 65,536): the client cap, not the
/// limit, bounds what clients can take.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(65_536);
        if want > soft {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
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

/// The run dir: created 0700 where missing, and refused (never chmodded through a symlink)
/// when another user could plant something in it (DESIGN §2 "Trust").
fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    super::client::create_private_run_dir(dir).map_err(setup(format!("run dir {}", dir.display())))
}

/// At most one log line a second for a repeating failure, with how many were suppressed.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn(&mut self, msg: &str) {
        if self.last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            tracing::warn!("{msg} ({} more like it suppressed)", self.suppressed);
        } else {
            tracing::warn!("{msg}");
        }
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

async fn serve(shared: Arc<Shared>) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let sock = super::client::socket_path(&shared.opts.run_dir);
    let _ = std::fs::remove_file(&sock); // stale: we hold the agent lock
    let listener = UnixListener::bind(&sock).map_err(setup(format!("cannot bind {}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(setup(format!("cannot restrict {}", sock.display())))?;
    tracing::info!(pid = std::process::id(), "agent listening on {}", sock.display());

    owner::recover(&shared).await;

    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    spawn_signal_thread(sig_tx)?;
    shared.touch();
    schedule_idle_check(&shared);
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let mut accept_log = RateLimitedLog { last: None, suppressed: 0 };
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(10);
                    shared.in_flight.fetch_add(1, Ordering::SeqCst);
                    shared.touch();
                    let s = shared.clone();
                    match clients.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(async move {
                                handle_connection(&s, stream).await;
                                drop(permit);
                                end_request(&s);
                            });
                        }
                        Err(_) => {
                            accept_log.warn(&format!("more than {MAX_CLIENTS} clients at once: refusing new ones"));
                            tokio::spawn(async move {
                                let r = Response::fail(
                                    Exit::Busy,
                                    format!("the agent is serving {MAX_CLIENTS} clients; try again"),
                                );
                                answer(stream, &r).await;
                                end_request(&s);
                            });
                        }
                    }
                }
                // Out of descriptors (or another transient failure): back off, log rarely. The
                // timers and rollbacks keep running meanwhile (the reserve is theirs).
                Err(e) => {
                    accept_log.warn(&format!("accept failed: {e}; backing off {} ms", backoff.as_millis()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
            Some(sig) = sig_rx.recv() => match sig {
                Signal::Stop(name) => {
                    tracing::warn!("{name} received: rolling back pending transactions before exit");
                    owner::stop_all(&shared).await;
                    break;
                }
                Signal::Confirm(pid) => owner::confirm_by_signal(&shared, pid).await,
            },
            _ = shared.idle.notified(), if shared.opts.detached => {
                if shared.quiet_for() >= shared.opts.idle_exit && shared.is_idle() {
                    tracing::info!("nothing unfinished and no client; detached agent exits");
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

fn end_request(shared: &Arc<Shared>) {
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    shared.touch();
    schedule_idle_check(shared);
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

async fn answer(stream: UnixStream, response: &Response) {
    let (_, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    let _ = tokio::time::timeout(Duration::from_secs(5), write.write_all(&out)).await;
}

/// One client: the peer is checked before a byte is read (root only), then one bounded
/// request line is read within [`REQUEST_READ_TIMEOUT`], handed to the owner, answered.
async fn handle_connection(shared: &Arc<Shared>, stream: UnixStream) {
    let peer = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("SO_PEERCRED failed: {e}");
            return;
        }
    };
    if peer.uid() != 0 {
        tracing::warn!(uid = peer.uid(), pid = ?peer.pid(), "refused a non-root client");
        let r = Response::fail(Exit::BadInput, "permission denied: the agent serves root only (run as root)");
        return answer(stream, &r).await;
    }
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    let read = match tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::debug!(pid = ?peer.pid(), "a client sent no request in time; closed");
            return;
        }
    };
    let response = match read {
        Ok(n) if n > MAX_REQUEST_BYTES => Response::fail(Exit::BadInput, "request too large"),
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Envelope>(&line) {
            Ok(env) if env.v != VERSION => {
                Response::fail(Exit::BadInput, format!("protocol version {} is not {VERSION}", env.v))
            }
            Ok(env) => {
                drop(line);
                dispatch(shared, env.request, peer.pid(), peer.uid()).await
            }
            Err(e) => Response::fail(
                Exit::BadInput,
                format!("malformed request: {}", crate::exit::escape_for_terminal(&e.to_string())),
            ),
        },
        Err(e) => Response::fail(Exit::BadInput, format!("cannot read the request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    drop((out, response));
    if super::state::take_release_after_answer() {
        drop(tokio::task::spawn_blocking(super::state::release_memory));
    }
}

async fn dispatch(shared: &Arc<Shared>, req: Request, peer_pid: Option<i32>, peer_uid: u32) -> Response {
    match req {
        Request::Ping => Response::ok(json!({"pid": std::process::id()})),
        Request::Status => owner::status(shared),
        Request::Apply(a) => owner::apply(shared, a, peer_pid, peer_uid).await,
        Request::Confirm { txid, netns } => owner::confirm(shared, txid.as_deref(), netns.as_deref(), peer_pid).await,
        Request::Extend { txid, by_secs, netns } => {
            owner::extend(shared, txid.as_deref(), netns.as_deref(), by_secs, peer_pid).await
        }
        Request::Rollback { txid, netns } => {
            owner::rollback_request(shared, txid.as_deref(), netns.as_deref(), peer_pid).await
        }
    }
}
