//! Guard benchmark (issue 13; `cargo bench --bench guard`, as root). Not a timed test: it
//! measures and prints a Markdown table for BENCHMARKS.md.
//!
//! 1. The gap from a host firewall reload to ctguard's accept back in place: a committed
//!    built-in policy behind a firewalld-style table; the table is deleted and recreated in one
//!    `nft -f` (what `firewall-cmd --reload` does) `CTGUARD_GUARD_RELOADS` times (default 20);
//!    the gap is measured from `nft -f` returning to the tagged accept listed again (polled
//!    every 2 ms), next to the bare `nft -f` reload itself.
//! 2. The idle cost of the guard with 1 and 20 guarded targets: the agent's context switches
//!    (wake-ups) over 30 s, scaled to a minute, and its VmRSS.
//!
//! Every namespace is `ctg-gbench-PID-N`, deleted on drop; nothing touches the host firewall.
//! Only `cargo bench` (which passes `--bench`) measures; a plain build prints "not run".

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// firewalld's layout (the kernel guard tests use the same file).
const FIREWALLD: &str = include_str!("../firewalld.nft");

struct Ns(String);

impl Ns {
    fn new(n: usize) -> Result<Ns, String> {
        let name = format!("ctg-gbench-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name], None)?;
        Ok(Ns(name))
    }
    fn nft(&self, script: &str) -> Result<String, String> {
        run("ip", &["netns", "exec", &self.0, "nft", "-f", "-"], Some(script))
    }
    fn list_firewalld(&self) -> Result<String, String> {
        run("ip", &["netns", "exec", &self.0, "nft", "list", "table", "inet", "firewalld"], None)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0], None);
    }
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let mut c = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{tool}: {e}"))?;
    if let (Some(s), Some(mut p)) = (stdin, c.stdin.take()) {
        p.write_all(s.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = c.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Cli {
    exe: PathBuf,
    base: PathBuf,
}

impl Cli {
    fn json(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(&self.exe)
            .arg("--state-dir")
            .arg(self.base.join("state"))
            .arg("--run-dir")
            .arg(self.base.join("run"))
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("ctguard {}: {e}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))?;
        if !out.status.success() {
            return Err(format!("ctguard {}: {v}", args.join(" ")));
        }
        // The one envelope, where the verb has it.
        Ok(if v.get("data").is_some() && v.get("exit").is_some() { v["data"].clone() } else { v })
    }
    fn commit(&self, ns: &Ns) -> Result<String, String> {
        let v = self.json(&["apply", "--netns", &ns.0, "--timeout", "60s"])?;
        let id = v["txid"].as_str().ok_or_else(|| format!("apply: {v}"))?.to_string();
        self.json(&["confirm", &id])?;
        Ok(id)
    }
    fn agent_pid(&self) -> Option<i32> {
        self.json(&["status"]).ok()?["agent_pid"].as_i64().map(|p| p as i32)
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn status_field(pid: i32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

fn switches(pid: i32) -> Option<u64> {
    // Every thread of the agent (worker threads, the signal thread, the runtime).
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = std::fs::read_to_string(t.path().join("status")).ok()?;
        for key in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
            total += s.lines().find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn gap_bench(base: &Path, reloads: usize, rows: &mut Vec<String>) -> Result<(), String> {
    let cli = Cli { exe: PathBuf::from(env!("CARGO_BIN_EXE_ctguard")), base: base.join("gap") };
    let ns = Ns::new(0)?;
    ns.nft(FIREWALLD)?;
    let id = cli.commit(&ns)?;
    let tag = format!("ctguard:{id}");
    let (mut bare, mut gaps) = (Vec::new(), Vec::new());
    for _ in 0..reloads {
        let t0 = Instant::now();
        ns.nft(&format!("delete table inet firewalld\n{FIREWALLD}"))?;
        let reload = t0.elapsed();
        let t1 = Instant::now();
        loop {
            if ns.list_firewalld()?.contains(&tag) {
                break;
            }
            if t1.elapsed() > Duration::from_secs(5) {
                return Err("the accept did not come back within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        bare.push(reload.as_secs_f64() * 1000.0);
        gaps.push(t1.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(200));
    }
    let max = gaps.iter().copied().fold(0.0, f64::max);
    rows.push(format!(
        "| reload → accept back (nft, firewalld-style, {reloads} reloads) | median {:.1} ms, max {max:.1} ms | bare `nft -f` reload {:.1} ms |",
        median(&mut gaps),
        median(&mut bare)
    ));
    Ok(())
}

fn idle_bench(base: &Path, targets: usize, window: Duration, rows: &mut Vec<String>) -> Result<(), String> {
    let cli = Cli { exe: PathBuf::from(env!("CARGO_BIN_EXE_ctguard")), base: base.join(format!("idle{targets}")) };
    let mut nss = Vec::new();
    for i in 0..targets {
        let ns = Ns::new(100 + targets * 10 + i)?;
        ns.nft(FIREWALLD)?;
        cli.commit(&ns)?;
        nss.push(ns);
    }
    let pid = cli.agent_pid().ok_or("no agent")?;
    std::thread::sleep(Duration::from_secs(2));
    let s0 = switches(pid).ok_or("agent gone")?;
    std::thread::sleep(window);
    let s1 = switches(pid).ok_or("agent gone")?;
    let rss = status_field(pid, "VmRSS:").unwrap_or(0);
    let per_min = (s1 - s0) as f64 * 60.0 / window.as_secs_f64();
    rows.push(format!(
        "| idle guard, {targets} committed target(s) | {per_min:.1} wake-ups/min (context switches, all threads) | RSS {:.1} MiB |",
        rss as f64 / 1024.0
    ));
    drop(nss);
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("guard bench: not run (use `cargo bench --bench guard`, as root)");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("guard bench: needs root");
        std::process::exit(1);
    }
    let quick = std::env::var("CTGUARD_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let reloads =
        std::env::var("CTGUARD_GUARD_RELOADS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 3 } else { 20 });
    let window = Duration::from_secs(if quick { 5 } else { 30 });
    let base = std::env::temp_dir().join(format!("ctg-gbench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&base);
    let mut rows = vec!["| what | ctguard | reference |".to_string(), "| --- | --- | --- |".to_string()];
    let mut failed = false;
    if let Err(e) = gap_bench(&base, reloads, &mut rows) {
        eprintln!("guard bench: gap: {e}");
        failed = true;
    }
    for n in [1, 20] {
        if let Err(e) = idle_bench(&base, n, window, &mut rows) {
            eprintln!("guard bench: idle {n}: {e}");
            failed = true;
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    println!("{}", rows.join("\n"));
    if failed {
        std::process::exit(1);
    }
}
