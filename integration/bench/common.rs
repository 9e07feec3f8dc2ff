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
