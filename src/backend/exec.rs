//! Running the netfilter tools: absolute paths found once, arguments as vectors (never a shell
//! command line), stdin from memory, stdout and stderr captured. The child inherits the calling
//! thread's network namespace, so call these inside `crate::netns::Target::run`.
//!
//! Every run is bounded: [`DEFAULT_TIMEOUT`] unless the caller passes its own
//! ([`Tool::run_timeout`], [`Tool::output_timeout`]). On expiry the child is killed (SIGKILL)
//! and reaped, and the run fails with [`ExecError::TimedOut`]. stdin is written and stdout and
//! stderr are read by helper threads, so a tool that prints tens of megabytes (a 100k-rule
//! listing) or stops reading its stdin never deadlocks the caller.
//!
//! The iptables tools wait for the xtables lock for a bounded time ([`xtables_wait_args`]:
//! `-w SECONDS`); a run that failed because another process held the lock is
//! [`ExecError::XtablesLocked`].

use std::cell::Cell;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Directories searched for tools, in order (root's usual PATH; independent of the caller's).
pub const TOOL_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"];

/// How long a tool may run before it is killed, unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The bound for tools that load or list a whole ruleset (a 100k-rule `nft -f` or restore).
pub const BULK_TIMEOUT: Duration = Duration::from_secs(300);

/// Seconds the iptables tools wait for the xtables lock (`-w SECONDS`) unless overridden on
/// the calling thread ([`with_xtables_wait`]).
pub const XTABLES_WAIT_SECS: u32 = 5;

thread_local! {
    static XTABLES_WAIT: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The xtables lock wait in seconds for tools started from this thread.
pub fn xtables_wait_secs() -> u32 {
    XTABLES_WAIT.with(Cell::get).unwrap_or(XTABLES_WAIT_SECS)
}

/// `["-w", "SECONDS"]` for the iptables tools (a bare `-w` would wait forever).
pub fn xtables_wait_args() -> [String; 2] {
    ["-w".to_string(), xtables_wait_secs().to_string()]
}

/// Runs `f` with the xtables lock wait of the tools it starts from this thread set to `secs`
/// (tests use a short wait so they hold the host-wide lock only briefly).
pub fn with_xtables_wait<T>(secs: u32, f: impl FnOnce() -> T) -> T {
    let old = XTABLES_WAIT.with(|w| w.replace(Some(secs)));
    struct Reset(Option<u32>);
    impl Drop for Reset {
        fn drop(&mut self) {
            XTABLES_WAIT.with(|w| w.set(self.0));
        }
    }
    let _reset = Reset(old);
    f()
}

/// True when a tool's stderr says another process holds the xtables lock.
pub fn is_xtables_lock_message(stderr: &str) -> bool {
    stderr.contains("holding the xtables lock") || stderr.contains("Can't lock /run/xtables.lock")
}

/// Errors running a tool.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The tool is not installed.
    #[error("{0} not found in {dirs}", dirs = TOOL_DIRS.join(":"))]
    NotFound(String),
    /// It could not be started.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// Absolute path of the tool.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        /// The command, for the message.
        cmd: String,
        /// Exit status text.
        status: String,
        /// Its stderr, trimmed to one line.
        stderr: String,
    },
    /// It did not finish in time: it was killed (SIGKILL) and reaped.
    #[error("{cmd} did not finish within {} s and was killed", fmt_secs(*.after))]
    TimedOut {
        /// The command, for the message.
        cmd: String,
        /// The limit it ran into.
        after: Duration,
    },
    /// An iptables tool gave up waiting for the xtables lock, held by another process.
    #[error("the xtables lock is held by another process (waited {waited_secs} s): {cmd} failed: {stderr}")]
    XtablesLocked {
        /// The command, for the message.
        cmd: String,
        /// The wait it was given (`-w SECONDS`).
        waited_secs: u32,
        /// Its stderr, trimmed to one line.
        stderr: String,
    },
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}", d.as_secs())
    } else {
        format!("{s:.3}")
    }
}

/// A tool with its absolute path (recorded in the journal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// Short name, e.g. `nft`.
    pub name: String,
    /// Absolute path.
    pub path: PathBuf,
}

impl Tool {
    /// Finds `name` in [`TOOL_DIRS`].
    pub fn find(name: &str) -> Result<Tool, ExecError> {
        TOOL_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .map(|path| Tool { name: name.to_string(), path })
            .ok_or_else(|| ExecError::NotFound(name.to_string()))
    }

    /// Runs the tool with `args` and optional `stdin`; returns stdout on exit 0. Bounded by
    /// [`DEFAULT_TIMEOUT`].
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, ExecError> {
        self.run_timeout(args, stdin, DEFAULT_TIMEOUT)
    }

    /// [`Tool::run`] with the caller's time limit.
    pub fn run_timeout(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<String, ExecError> {
        let out = self.output_timeout(args, stdin, timeout)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let cmd = self.cmd_text(args);
            if is_xtables_lock_message(&stderr) {
                Err(ExecError::XtablesLocked { cmd, waited_secs: wait_of(args), stderr: one_line(&stderr) })
            } else {
                Err(ExecError::Failed { cmd, status: out.status.to_string(), stderr: one_line(&stderr) })
            }
        }
    }

    /// Runs the tool and returns its raw output whatever the exit status. Bounded by
    /// [`DEFAULT_TIMEOUT`].
    pub fn output(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output, ExecError> {
        self.output_timeout(args, stdin, DEFAULT_TIMEOUT)
    }

    /// [`Tool::output`] with the caller's time limit: past it the child is killed with SIGKILL,
    /// reaped, and the run fails with [`ExecError::TimedOut`].
    pub fn output_timeout(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, ExecError> {
        let deadline = Instant::now() + timeout;
        let spawn_err = |source| ExecError::Spawn { path: self.path.clone(), source };
        let mut child = Command::new(&self.path)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C")
            .spawn()
            .map_err(spawn_err)?;
        let timed_out = || ExecError::TimedOut { cmd: self.cmd_text(args), after: timeout };
        let (tx, rx) = mpsc::channel::<(u8, Vec<u8>)>();
        let mut readers = 0;
        for (which, pipe) in [
            (1u8, child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
            (2u8, child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        ] {
            let Some(mut pipe) = pipe else { continue };
            let tx = tx.clone();
            readers += 1;
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send((which, buf));
            });
        }
        drop(tx);
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let data = data.to_vec();
            // A tool that exits early (or is killed) closes its stdin; its exit status tells
            // the real story. Written from a thread so a tool that does not read cannot block us.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        // The pipes close when the child exits (unless something it started keeps them open):
        // waiting on them first wakes us at its exit, where polling `try_wait` with growing naps
        // woke up to 20 ms late (about 10 ms a run on average; an apply runs several tools). The
        // same deadline bounds both waits.
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        for _ in 0..readers {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((1, b)) => stdout = b,
                Ok((_, b)) => stderr = b,
                Err(_) => {
                    kill_and_reap(&mut child);
                    return Err(timed_out());
                }
            }
        }
        let status = match wait_until(&mut child, deadline) {
            Ok(Some(s)) => s,
            Ok(None) => {
                kill_and_reap(&mut child);
                return Err(timed_out());
            }
            Err(source) => {
                kill_and_reap(&mut child);
                return Err(spawn_err(source));
            }
        };
        Ok(Output { status, stdout, stderr })
    }

    fn cmd_text(&self, args: &[&str]) -> String {
        let mut s = self.name.clone();
        for a in args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// The `-w SECONDS` value in `args` (the thread's setting when there is none).
fn wait_of(args: &[&str]) -> u32 {
    args.windows(2)
        .find(|w| matches!(w[0], "-w" | "--wait"))
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(xtables_wait_secs)
}

/// Waits for `child` until `deadline`: `Ok(None)` when it is still running then.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut nap = Duration::from_micros(500);
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

fn kill_and_reap(child: &mut Child) {
    // SIGKILL; an error means it already exited. wait() reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

/// Joins a tool's stderr into one line for an error message.
pub fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Tool {
        Tool::find(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The children of this process that are zombies (state `Z`).
    fn zombie_children() -> Vec<u32> {
        let me = std::process::id();
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else { return out };
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // pid (comm) state ppid ...
            let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
            let mut f = rest.split(' ');
            let (Some(state), Some(ppid)) = (f.next(), f.next()) else { continue };
            if state == "Z" && ppid.parse::<u32>().ok() == Some(me) {
                out.push(pid);
            }
        }
        out
    }

    #[test]
    fn a_tool_past_its_limit_is_killed_reaped_and_named() {
        let sleep = tool("sleep");
        let t = Instant::now();
        let r = sleep.run_timeout(&["10"], None, Duration::from_millis(200));
        let took = t.elapsed();
        match r {
            Err(ExecError::TimedOut { cmd, after }) => {
                assert_eq!(cmd, "sleep 10");
                assert_eq!(after, Duration::from_millis(200));
            }
            other => panic!("expected TimedOut, got {other:?}"),
        }
        assert!(took >= Duration::from_millis(200), "returned before the limit: {took:?}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
        let msg = ExecError::TimedOut { cmd: "sleep 10".into(), after: Duration::from_millis(200) }.to_string();
        assert_eq!(msg, "sleep 10 did not finish within 0.200 s and was killed");
        // Reaped: no zombie child of ours persists (other tests' children can be zombies for
        // the few milliseconds before their run reaps them: only a lasting one is a leak).
        let z0 = zombie_children();
        std::thread::sleep(Duration::from_millis(300));
        let lasting: Vec<u32> = zombie_children().into_iter().filter(|p| z0.contains(p)).collect();
        assert!(lasting.is_empty(), "zombie children: {lasting:?}");
    }

    #[test]
    fn a_tool_that_ignores_its_stdin_cannot_block_the_caller() {
        // sleep never reads stdin; 8 MiB cannot fit in a pipe buffer.
        let data = vec![b'x'; 8 << 20];
        let t = Instant::now();
        let r = tool("sleep").run_timeout(&["5"], Some(&data), Duration::from_millis(300));
        assert!(matches!(r, Err(ExecError::TimedOut { .. })), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    }

    #[test]
    fn large_output_and_large_input_pass_through_whole() {
        // 40 MiB through cat, both ways at once: a sequential write-then-read would deadlock.
        let data: Vec<u8> = (0..40u32 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        let out = tool("cat").output(&[], Some(&data)).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), data.len());
        assert!(out.stdout == data, "cat changed the data");
        assert!(out.stderr.is_empty());
    }

    #[test]
    fn stderr_and_status_are_kept() {
        let r = tool("ls").run(&["/nonexistent-ctguard-path"], None);
        match r {
            Err(ExecError::Failed { cmd, status, stderr }) => {
                assert_eq!(cmd, "ls /nonexistent-ctguard-path");
                assert!(status.contains('2'), "{status}");
                assert!(stderr.contains("No such file"), "{stderr}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn xtables_lock_messages_and_wait() {
        assert!(is_xtables_lock_message(
            "Can't lock /run/xtables.lock: Resource temporarily unavailable\nAnother app is currently holding the xtables lock. Stopped waiting after 2s.\n"
        ));
        assert!(!is_xtables_lock_message("iptables-restore: line 2 failed"));
        assert_eq!(xtables_wait_args(), ["-w".to_string(), XTABLES_WAIT_SECS.to_string()]);
        let inner = with_xtables_wait(1, || (xtables_wait_secs(), with_xtables_wait(2, xtables_wait_secs)));
        assert_eq!(inner, (1, 2));
        assert_eq!(xtables_wait_secs(), XTABLES_WAIT_SECS);
        assert_eq!(wait_of(&["-w", "7", "--noflush"]), 7);
        assert_eq!(wait_of(&["--noflush"]), XTABLES_WAIT_SECS);
        let e =
            ExecError::XtablesLocked { cmd: "iptables-legacy-restore -w 5".into(), waited_secs: 5, stderr: "x".into() };
        assert!(e.to_string().starts_with("the xtables lock is held by another process (waited 5 s)"), "{e}");
    }
}
