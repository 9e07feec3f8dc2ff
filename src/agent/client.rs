//! The CLI side of the agent socket: send one request, read one answer; start a detached agent
//! when none answers (DESIGN §2).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::protocol::{Envelope, Request, Response, VERSION};

/// Socket file name under the run dir.
pub const SOCKET_NAME: &str = "ctguard.sock";
/// Log of a detached agent, under the run dir.
pub const LOG_NAME: &str = "agent.log";

/// Errors talking to the agent (exit 6 unless said otherwise).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent answers on the socket.
    #[error("agent unreachable at {path}: {source}")]
    Unreachable {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The run dir (or a parent) could be planted by another user (exit 2).
    #[error(transparent)]
    Untrusted(#[from] crate::trust::TrustError),
    /// The socket is served by another user than root (exit 6): nothing was sent.
    #[error("{path} is served by uid {uid} (pid {pid}), not root: refusing to talk to it")]
    NotRoot {
        /// Socket path.
        path: PathBuf,
        /// The server's uid.
        uid: u32,
        /// The server's pid.
        pid: i32,
    },
    /// The agent answered something that is not a response.
    #[error("agent sent a malformed answer: {0}")]
    Malformed(String),
    /// Starting an agent failed.
    #[error("cannot start the agent: {0}")]
    Start(String),
}

/// `$RUN_DIR/ctguard.sock`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

/// Sends `request` and waits up to `timeout` for the answer.
pub fn request(run_dir: &Path, request: Request, timeout: Duration) -> Result<Response, ClientError> {
    crate::trust::check_private_dir(run_dir)?;
    let path = socket_path(run_dir);
    let unreachable = |source| ClientError::Unreachable { path: path.clone(), source };
    let mut stream = UnixStream::connect(&path).map_err(unreachable)?;
    // Nothing is sent to a socket that root does not serve (a planted socket in a run dir).
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| unreachable(std::io::Error::from(e)))?;
    if cred.uid() != 0 {
        return Err(ClientError::NotRoot { path: path.clone(), uid: cred.uid(), pid: cred.pid() });
    }
    stream.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    let mut line =
        serde_json::to_vec(&Envelope { v: VERSION, request }).map_err(|e| ClientError::Malformed(e.to_string()))?;
    line.push(b'\n');
    // The agent may answer (a refusal) before reading the request and close: read its answer
    // even when the write fails.
    let written = stream.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        written.map_err(unreachable)?;
    }
    read.map_err(unreachable)?;
    if answer.is_empty() {
        return Err(unreachable(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection",
        )));
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Malformed(format!("{e}: {}", answer.trim())))
}

/// True when an agent answers a ping.
pub fn is_running(run_dir: &Path) -> bool {
    request(run_dir, Request::Ping, Duration::from_secs(2)).is_ok()
}

/// Makes sure an agent serves `run_dir`: pings, and if none answers starts one detached —
/// new session, no inherited descriptors (an inherited pipe would make `ssh host ctguard
/// apply` hang), stdio to `$RUN_DIR/agent.log` — then waits up to 10 s for it to answer.
pub fn ensure_agent(run_dir: &Path, state_dir: &Path) -> Result<(), ClientError> {
    match request(run_dir, Request::Ping, Duration::from_secs(2)) {
        Ok(_) => return Ok(()),
        // Someone else serves the socket, or the run dir is not trusted: never start an agent
        // over it.
        Err(e @ (ClientError::NotRoot { .. } | ClientError::Untrusted(_))) => return Err(e),
        Err(_) => {}
    }
    if start_systemd_unit(run_dir) {
        return wait_for_agent(run_dir);
    }
    crate::trust::check_private_dir(run_dir)?;
    create_private_run_dir(run_dir).map_err(|e| ClientError::Start(format!("{}: {e}", run_dir.display())))?;
    let log = crate::trust::open_append_nofollow(&run_dir.join(LOG_NAME))
        .map_err(|e| ClientError::Start(format!("{}: {e}", run_dir.join(LOG_NAME).display())))?;
    let log2 = log.try_clone().map_err(|e| ClientError::Start(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| ClientError::Start(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg("--detached")
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    // SAFETY: only async-signal-safe calls (setsid, close_range) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Close every inherited descriptor above stdio (SSH session pipes included).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| ClientError::Start(e.to_string()))?;
    wait_for_agent(run_dir)
}

/// Creates `dir` (mode 0700) where missing and checks, without following a symlink, that it
/// is a root-owned directory no one else can write. Idempotent.
pub fn create_private_run_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    crate::trust::check_private_dir(dir)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))
}

/// Run dir the systemd unit serves.
pub const UNIT_RUN_DIR: &str = "/run/ctguard";
/// The agent's unit.
pub const UNIT: &str = "ctguard.service";

/// When systemd is PID 1 and `ctguard.service` is installed (and the default run dir is in
/// use), starts the unit: the agent then lives outside the SSH session's cgroup, safe from
/// logind's KillUserProcesses. False when that does not apply or fails.
fn start_systemd_unit(run_dir: &Path) -> bool {
    if run_dir != Path::new(UNIT_RUN_DIR) || !Path::new("/run/systemd/system").is_dir() {
        return false;
    }
    let Ok(systemctl) = crate::backend::exec::Tool::find("systemctl") else { return false };
    if systemctl.run(&["cat", UNIT], None).is_err() {
        return false;
    }
    match systemctl.run(&["start", UNIT], None) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("systemctl start {UNIT} failed ({e}); starting a detached agent instead");
            false
        }
    }
}

/// Waits up to 10 s for the agent just started to answer, asking again after 1, 2, 4 … ms (at
/// most 50 ms apart): it usually answers within a few milliseconds, and a fixed 50 ms poll
/// made every cold start wait for the next poll.
fn wait_for_agent(run_dir: &Path) -> Result<(), ClientError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    while start.elapsed() < Duration::from_secs(10) {
        if is_running(run_dir) {
            return Ok(());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Err(ClientError::Start(format!("the agent did not answer within 10 s; see {}", run_dir.join(LOG_NAME).display())))
}
