//! Helpers every benchmark binary shares (`#[path = "common.rs"] mod common;`): running a tool
//! by its absolute path, and throwaway network namespaces named `PREFIX-PID-N` that are deleted
//! on drop and reaped when a killed run left them.
#![allow(dead_code)] // each bench uses part of it

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ctguard::backend::exec::Tool;
use ctguard::netns::{Target, TargetSpec};

/// Runs `tool args` (absolute path from ctguard's tool search, never a shell) in the calling
/// thread's network namespace; stdout, or the failure with stderr.
pub fn exec(tool: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, String> {
    let t = Tool::find(tool).map_err(|e| e.to_string())?;
    let out = t.output(args, stdin).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

static NS_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A network namespace `PREFIX-PID-N` a bench created; `lo` up. Deleted on drop.
pub struct BenchNs {
    /// Its name under /run/netns.
    pub name: String,
    target: Option<Target>,
}

impl BenchNs {
    /// Creates `PREFIX-PID-N`.
    pub fn new(prefix: &str) -> Result<BenchNs, String> {
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        exec("ip", &["netns", "add", &name], None)?;
        // From here on Drop removes it.
        let mut ns = BenchNs { name, target: None };
        ns.target = Some(Target::open(&TargetSpec::Named(ns.name.clone())).map_err(|e| e.to_string())?);
        ns.run(|| exec("ip", &["link", "set", "lo", "up"], None))??;
        Ok(ns)
    }

    /// Runs `f` inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        let t = self.target.as_ref().ok_or_else(|| format!("namespace {} is not open", self.name))?;
        t.run(f).map_err(|e| format!("in namespace {}: {e}", self.name))
    }
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        self.target = None;
        if let Err(e) = exec("ip", &["netns", "del", &self.name], None) {
            eprintln!("bench: removing namespace {}: {e}", self.name);
        }
    }
}

/// Deletes `PREFIX-PID-N` namespaces left by runs that were killed (their PID is gone).
pub fn reap_stale_namespaces(prefix: &str) {
    let Ok(list) = exec("ip", &["netns", "list"], None) else { return };
    let lead = format!("{prefix}-");
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(&lead) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: removing {name}, left by a killed run");
            let _ = exec("ip", &["netns", "del", name], None);
        }
    }
}

/// One finished process: wall time from fork/exec to `wait4`, its peak RSS (`ru_maxrss` of the
/// child and the children it waited for), exit code, and what it printed.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Seconds from just before the spawn to `wait4` returning.
    pub secs: f64,
    /// `ru_maxrss` from `wait4`, KiB.
    pub maxrss_kib: u64,
    /// Exit code, or 128 + signal.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Finished {
    /// Exit 0.
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs `program args` (an absolute path, never a shell) in the calling thread's network
/// namespace, stdin from /dev/null, stdout and stderr into files under `scratch` (no pipe to
/// drain while timing), and waits for it with `wait4`. Times fork/exec to exit.
pub fn timed_run(program: &Path, args: &[String], scratch: &Path) -> Result<Finished, String> {
    use std::process::{Command, Stdio};
    use std::time::Instant;
    let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("run-{n}.out"));
    let err_path = scratch.join(format!("run-{n}.err"));
    let out = std::fs::File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
    let err = std::fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("{}: {e}", program.display()))?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; both pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4 {}: {e}", program.display()));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(child); // already reaped by wait4
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok(Finished { secs, maxrss_kib: u64::try_from(ru.ru_maxrss).unwrap_or(0), code, stdout, stderr })
}

/// The absolute path of `tool` (ctguard's tool search).
pub fn tool_path(tool: &str) -> Result<std::path::PathBuf, String> {
    Tool::find(tool).map(|t| t.path).map_err(|e| e.to_string())
}

/// Minimum and median of `v` (`NaN` when empty).
pub fn min_median(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (s[0], med)
}

/// Whether this bench was asked for (`cargo bench` passes `--bench`; `CTGUARD_BENCH=1` too):
/// `cargo test --all-targets` also runs bench binaries, which then only say how to run them.
/// Exits 1 when asked without root (namespaces and netfilter need it).
pub fn asked(name: &str, args: &[String]) -> bool {
    let asked = args.iter().any(|a| a == "--bench") || std::env::var("CTGUARD_BENCH").is_ok_and(|v| v == "1");
    if !asked {
        println!("{name} bench: not run (use `cargo bench --bench {name}`, as root)");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("{name} bench: needs root (network namespaces, netfilter)");
        std::process::exit(1);
    }
    true
}

/// The bench's configuration, or exit 2 with `NAME bench: ERROR` (a bad knob is bad input).
pub fn or_exit<T>(name: &str, r: Result<T, String>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{name} bench: {e}");
            std::process::exit(2);
        }
    }
}
