//! Soak benchmark (`cargo bench --bench soak`, as root; issue 11). Not a timed test: it drives
//! the release binary exactly as an operator does, many times over, and prints what the
//! detached agent holds on to — open descriptors, RSS, threads, namespace pins, journal size —
//! as one Markdown table per backend plus a one-line verdict. The source of the "Soak" section
//! of `BENCHMARKS.md`.
//!
//! Per backend (`nft`, `iptables-nft`, `iptables-legacy`), with its own scratch `--state-dir`
//! and `--run-dir` (so its own detached agent, started by the CLI) and a fresh network
//! namespace `ctg-soak-PID-N` (deleted on drop, also when a run fails) holding a usual stateful
//! firewall for that backend (nft: `integration/stateful.nft`; iptables: the same rules loaded
//! with `ip{,6}tables-{nft,legacy}-restore`), and a policy file selecting that backend with one
//! `[[notrack]]` entry (udp and tcp port 53):
//! 1. N × (`apply --netns NS --timeout 60s POLICY`, then `rollback TXID`); afterwards the
//!    ruleset listing (`nft list ruleset`, plus `ip{,6}tables-*-save` of the backend's variant)
//!    must be identical to the one before the loop;
//! 2. N × (`apply …`, then `confirm TXID`) (each apply replaces the previous committed policy).
//!
//! After every transaction no pin may be left under `RUN_DIR/ns`. Every `every` iterations
//! (100 by default) and at the end of each loop it samples the agent (pid from `ctguard --json
//! status`): `/proc/PID/fd` count (the least of three reads 100 ms apart), `VmRSS`, thread
//! count; the pins; the journal's bytes on disk (every file under `STATE_DIR/txn`) and its
//! record count; and the median wall time of the iterations since the previous sample. At the end: nothing pending, the agent stopped with
//! SIGTERM, the namespace deleted.
//!
//! A failed verb, a listing that differs, a leftover pin, a journal beyond its bound
//! (`journal::DEFAULT_KEEP` finished records), something still pending, or an agent that
//! changed pid mid-loop (it exited or crashed) makes the bench exit 1 with a message naming
//! it. Growing descriptors or RSS are reported in the verdict (they are measurements).
//!
//! Only `cargo bench` measures: it passes `--bench`. `cargo test --all-targets` (or
//! `--benches`) also runs this binary without `--bench`; then (unless `CTGUARD_BENCH=1`)
//! `main` prints "not run" and returns at once. Knobs: `CTGUARD_SOAK_N` (iterations per loop,
//! default 500), `CTGUARD_SOAK_BACKENDS=nft,iptables-nft,iptables-legacy`, `CTGUARD_BENCH_QUICK=1`
//! (N = 20), `CTGUARD_SOAK_EVERY` (sample interval; default 100, or N/4 when N < 200).

#[path = "common.rs"]
mod common;
use common::{exec, reap_stale_namespaces, BenchNs};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ctguard::journal::DEFAULT_KEEP;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Configuration

const BACKENDS: [&str; 3] = ["nft", "iptables-nft", "iptables-legacy"];

struct Config {
    n: usize,
    every: usize,
    backends: Vec<&'static str>,
    quick: bool,
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let quick = std::env::var("CTGUARD_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
        let n = match std::env::var("CTGUARD_SOAK_N") {
            Ok(v) => {
                v.trim().parse::<usize>().ok().filter(|&n| n > 0).ok_or(format!("CTGUARD_SOAK_N={v}: not a count"))?
            }
            Err(_) if quick => 20,
            Err(_) => 500,
        };
        let every = match std::env::var("CTGUARD_SOAK_EVERY") {
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("CTGUARD_SOAK_EVERY={v}: not a count"))?,
            Err(_) if n < 200 => (n / 4).max(1),
            Err(_) => 100,
        };
        let mut backends = Vec::new();
        match std::env::var("CTGUARD_SOAK_BACKENDS") {
            Ok(v) => {
                for b in v.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                    let known = BACKENDS.iter().find(|k| **k == b).ok_or(format!(
                        "CTGUARD_SOAK_BACKENDS: unknown backend {b:?} (one of {})",
                        BACKENDS.join(", ")
                    ))?;
                    if !backends.contains(known) {
                        backends.push(*known);
                    }
                }
            }
            Err(_) => backends.extend(BACKENDS),
        }
        if backends.is_empty() {
            return Err("CTGUARD_SOAK_BACKENDS selects no backend".into());
        }
        Ok(Config { n, every, backends, quick })
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

// ---------------------------------------------------------------------------------------------
// Tools and namespaces

/// A scratch directory, removed on drop (pins left by a failed run are unmounted first; only
/// paths inside it are touched).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else { return };
        for sub in entries.flatten() {
            if let Ok(dir) = std::fs::read_dir(sub.path().join("run").join("ns")) {
                for e in dir.flatten() {
                    let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("soak: removing {}: {e}", self.0.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The firewall in place, per backend

/// The iptables equivalent of `integration/stateful.nft` (v4 and v6 alike): policy drop,
/// established/related, loopback, DNS new, SSH new.
const STATEFUL_IPT: &str = "*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p tcp -m tcp --dport 53 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
";

const STATEFUL_NFT: &str = include_str!("../stateful.nft");

/// Loads the stateful firewall of `backend` in the calling thread's namespace.
fn load_firewall(backend: &str) -> Result<(), String> {
    match backend {
        "nft" => exec("nft", &["-f", "-"], Some(STATEFUL_NFT.as_bytes())).map(drop),
        "iptables-nft" | "iptables-legacy" => {
            let variant = backend.trim_start_matches("iptables-");
            exec(&format!("iptables-{variant}-restore"), &["-w"], Some(STATEFUL_IPT.as_bytes()))?;
            exec(&format!("ip6tables-{variant}-restore"), &["-w"], Some(STATEFUL_IPT.as_bytes())).map(drop)
        }
        other => Err(format!("unknown backend {other}")),
    }
}

/// Everything the backend could have changed, as text: `nft list ruleset` always, plus for the
/// iptables backends the v4 and v6 saves of that variant (without their timestamp comments).
fn listing(backend: &str) -> Result<String, String> {
    let mut s = String::from("# nft list ruleset\n");
    s.push_str(&exec("nft", &["list", "ruleset"], None)?);
    if let Some(variant) = backend.strip_prefix("iptables-") {
        for fam in ["iptables", "ip6tables"] {
            let tool = format!("{fam}-{variant}-save");
            s.push_str(&format!("# {tool}\n"));
            for l in exec(&tool, &[], None)?.lines().filter(|l| !l.starts_with('#')) {
                s.push_str(l);
                s.push('\n');
            }
        }
    }
    Ok(s)
}

/// `listing` without the iptables tables that hold nothing: only built-in chains, policy ACCEPT,
/// zero counters, no rule. The first legacy apply creates the `raw` tables (v4 and v6) and no
/// rollback can remove them: x_tables tables cannot be unregistered from user space (README,
/// "Differences the kernel makes unavoidable", 1). Also the names of the tables it dropped.
fn without_empty_tables(listing: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut dropped = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    let mut tool = "";
    for l in listing.lines() {
        if l.starts_with("# ") && l.ends_with("-save") {
            tool = l.trim_start_matches("# ");
        }
        if l.starts_with('*') {
            block.push(l);
            continue;
        }
        if block.is_empty() {
            out.push_str(l);
            out.push('\n');
            continue;
        }
        block.push(l);
        if l == "COMMIT" {
            let empty = block[1..block.len() - 1].iter().all(|c| {
                c.starts_with(':')
                    && c.ends_with(" ACCEPT [0:0]")
                    && c[1..].chars().all(|ch| {
                        ch.is_ascii_uppercase() || ch == ' ' || ch == '[' || ch == ']' || ch == ':' || ch == '0'
                    })
            });
            if empty {
                dropped.push(format!("{tool} {}", block[0]));
            } else {
                for b in &block {
                    out.push_str(b);
                    out.push('\n');
                }
            }
            block.clear();
        }
    }
    for b in &block {
        out.push_str(b);
        out.push('\n');
    }
    (out, dropped)
}

/// The lines only in `a` (`-`) and only in `b` (`+`), in order; enough to name a difference.
fn line_diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = Vec::new();
    for l in &la {
        if !lb.contains(l) {
            out.push(format!("- {l}"));
        }
    }
    for l in &lb {
        if !la.contains(l) {
            out.push(format!("+ {l}"));
        }
    }
    if out.is_empty() {
        out.push("(same lines, another order or count)".into());
    }
    out.truncate(40);
    out.join("\n")
}

fn policy_toml(backend: &str) -> String {
    format!(
        "# soak bench policy\nbackend = \"{backend}\"\n\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n"
    )
}

// ---------------------------------------------------------------------------------------------
// The release binary, as a user runs it

struct Cli {
    exe: PathBuf,
    state: PathBuf,
    run: PathBuf,
    /// The policy file every `apply` names.
    policy: PathBuf,
}

impl Cli {
    /// `ctguard --state-dir S --run-dir R --json ARGS`: the JSON answer when it exits 0, else
    /// an error with the exit code, stdout and stderr.
    fn cmd(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(&self.exe)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--run-dir")
            .arg(&self.run)
            .arg("--json")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "`ctguard {}` failed ({}): {} {}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_str(stdout.trim()).map_err(|e| {
            format!(
                "`ctguard {}` ({}): not JSON ({e}): {} {}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }

    fn apply(&self, ns: &str) -> Result<String, String> {
        let p = self.policy.to_string_lossy();
        let v = self.cmd(&["apply", "--netns", ns, "--timeout", "60s", &p])?;
        v["data"]["txid"].as_str().map(str::to_string).ok_or_else(|| format!("apply answered {v}"))
    }

    fn status(&self) -> Result<Value, String> {
        self.cmd(&["status"])
    }

    fn agent_pid(&self) -> Result<i32, String> {
        let v = self.status()?;
        v["agent_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| format!("status --json gave no agent_pid: {v}"))
    }

    fn pins(&self) -> usize {
        std::fs::read_dir(self.run.join("ns")).map(|d| d.flatten().count()).unwrap_or(0)
    }

    /// Bytes of every file under `STATE_DIR/txn` and the number of records (`*.json`).
    fn journal(&self) -> (u64, usize) {
        let (mut bytes, mut records) = (0, 0);
        if let Ok(dir) = std::fs::read_dir(self.state.join("txn")) {
            for e in dir.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        bytes += m.len();
                        if e.file_name().to_string_lossy().ends_with(".json") {
                            records += 1;
                        }
                    }
                }
            }
        }
        (bytes, records)
    }
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    match stat {
        Ok(s) => !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM to the agent `pid` (started by this bench through the CLI); waits up to 10 s.
fn stop_agent(pid: i32) -> Result<(), String> {
    if !alive(pid) {
        return Ok(());
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| format!("SIGTERM to agent {pid}: {e}"))?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if !alive(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("agent {pid} still running 10 s after SIGTERM"))
}

fn proc_status_kib(pid: i32, key: &str) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn count_dir(p: &str) -> Option<usize> {
    std::fs::read_dir(p).ok().map(|d| d.flatten().count())
}

// ---------------------------------------------------------------------------------------------
// The soak

#[derive(Clone)]
struct Sample {
    /// `rollback` or `confirm`.
    phase: &'static str,
    iteration: usize,
    fds: usize,
    rss_kib: u64,
    threads: usize,
    pins: usize,
    journal_bytes: u64,
    records: usize,
    /// Median wall time of one iteration (apply + rollback/confirm, both CLI runs) since the
    /// previous sample.
    median_ms: f64,
}

struct BackendResult {
    backend: &'static str,
    samples: Vec<Sample>,
    /// Median over every iteration of each loop.
    overall: Vec<(&'static str, usize, f64)>,
    errors: Vec<String>,
    notes: Vec<String>,
    took: Duration,
}

fn sample(cli: &Cli, pid: i32, phase: &'static str, iteration: usize, window: &[f64]) -> Result<Sample, String> {
    // The settled count: the least of three reads 100 ms apart, so a pipe of a tool the agent
    // runs at that moment (the legacy guard's poll, say) is not taken for a leak.
    let mut fds = usize::MAX;
    for k in 0..3 {
        if k > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        let n =
            count_dir(&format!("/proc/{pid}/fd")).ok_or(format!("agent {pid}: /proc/{pid}/fd unreadable (gone?)"))?;
        fds = fds.min(n);
    }
    let threads = count_dir(&format!("/proc/{pid}/task")).unwrap_or(0);
    let rss_kib = proc_status_kib(pid, "VmRSS:").ok_or(format!("agent {pid}: no VmRSS"))?;
    let (journal_bytes, records) = cli.journal();
    Ok(Sample {
        phase,
        iteration,
        fds,
        rss_kib,
        threads,
        pins: cli.pins(),
        journal_bytes,
        records,
        median_ms: median(window).unwrap_or(f64::NAN),
    })
}

/// One loop: `n` × (apply, then `finish` — `rollback` or `confirm`).
fn soak_loop(
    cfg: &Config,
    cli: &Cli,
    ns: &BenchNs,
    phase: &'static str,
    agent: &mut Option<i32>,
    mut after_first: Option<&mut Option<String>>,
    out: &mut BackendResult,
) -> Result<(), String> {
    let mut window = Vec::new();
    let mut all = Vec::new();
    for i in 1..=cfg.n {
        let t = Instant::now();
        let txid = cli.apply(&ns.name).map_err(|e| format!("{phase} loop, iteration {i}: apply: {e}"))?;
        cli.cmd(&[phase, &txid]).map_err(|e| format!("{phase} loop, iteration {i}: {phase} {txid}: {e}"))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        window.push(ms);
        all.push(ms);
        if i == 1 {
            if let Some(first) = after_first.as_deref_mut() {
                let backend = out.backend;
                *first = Some(ns.run(|| listing(backend))??);
            }
        }
        let pins = cli.pins();
        if pins != 0 {
            return Err(format!(
                "{phase} loop, iteration {i}: {pins} pin(s) left under {} after {phase} {txid}",
                cli.run.join("ns").display()
            ));
        }
        // The same agent throughout: one that exits or crashes mid-loop would hide a leak.
        let pid = match *agent {
            Some(p) if alive(p) => p,
            Some(p) => {
                let now = cli.agent_pid().unwrap_or(-1);
                return Err(format!(
                    "{phase} loop, iteration {i}: agent {p} is gone (now: {now}); see {}",
                    cli.run.join("agent.log").display()
                ));
            }
            None => {
                let p = cli.agent_pid()?;
                *agent = Some(p);
                p
            }
        };
        if i % cfg.every == 0 || i == cfg.n {
            let s = sample(cli, pid, phase, i, &window)?;
            eprintln!(
                "soak: {} {phase} {i}/{}: fds {} rss {} KiB threads {} pins {} journal {} B / {} records, median {:.1} ms",
                out.backend, cfg.n, s.fds, s.rss_kib, s.threads, s.pins, s.journal_bytes, s.records, s.median_ms
            );
            if s.records > DEFAULT_KEEP {
                out.samples.push(s.clone());
                return Err(format!(
                    "{phase} loop, iteration {i}: the journal holds {} records, more than its bound of {DEFAULT_KEEP} finished ones with nothing pending",
                    s.records
                ));
            }
            out.samples.push(s);
            window.clear();
        }
    }
    out.overall.push((phase, all.len(), median(&all).unwrap_or(f64::NAN)));
    Ok(())
}

fn soak_backend(cfg: &Config, backend: &'static str, exe: &Path, dir: &Path) -> BackendResult {
    let started = Instant::now();
    let mut out = BackendResult {
        backend,
        samples: Vec::new(),
        overall: Vec::new(),
        errors: Vec::new(),
        notes: Vec::new(),
        took: Duration::ZERO,
    };
    let cli =
        Cli { exe: exe.to_path_buf(), state: dir.join("state"), run: dir.join("run"), policy: dir.join("policy.toml") };
    let mut agent: Option<i32> = None;
    let res = (|| -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(&cli.policy, policy_toml(backend)).map_err(|e| format!("{}: {e}", cli.policy.display()))?;
        let ns = BenchNs::new("ctg-soak")?;
        let result = (|| -> Result<(), String> {
            ns.run(|| load_firewall(backend))??;
            let before = ns.run(|| listing(backend))??;
            let mut first = None;
            soak_loop(cfg, &cli, &ns, "rollback", &mut agent, Some(&mut first), &mut out)?;
            let after = ns.run(|| listing(backend))??;
            if after == before {
                out.notes.push(format!("ruleset after {} apply→rollback identical to before", cfg.n));
            } else {
                // The one difference the kernel imposes: empty legacy tables the first apply
                // created. Anything else, or a listing that still moved after iteration 1, fails.
                let (b, dropped_before) = without_empty_tables(&before);
                let (a, dropped_after) = without_empty_tables(&after);
                let created: Vec<&String> = dropped_after.iter().filter(|t| !dropped_before.contains(t)).collect();
                let known = backend == "iptables-legacy" && a == b && first.as_deref() == Some(after.as_str());
                if !known {
                    return Err(format!(
                        "after {} apply→rollback the ruleset differs from the one before the loop:\n{}",
                        cfg.n,
                        line_diff(&before, &after)
                    ));
                }
                out.notes.push(format!(
                    "ruleset after {} apply→rollback identical to before except the empty legacy table(s) {} that the first apply created (x_tables tables cannot be removed from user space), and identical to the one after iteration 1",
                    cfg.n,
                    created.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
                ));
            }
            soak_loop(cfg, &cli, &ns, "confirm", &mut agent, None, &mut out)?;
            let st = cli.status()?;
            let pending = st["pending"].as_array().map_or(0, Vec::len);
            if pending != 0 {
                return Err(format!("{pending} transaction(s) still pending at the end: {}", st["pending"]));
            }
            Ok(())
        })();
        // Whatever happened: nothing pending, agent stopped, then the namespace goes (drop).
        if result.is_err() {
            if let Ok(st) = cli.status() {
                for p in st["pending"].as_array().into_iter().flatten() {
                    if let Some(id) = p["id"].as_str() {
                        if let Err(e) = cli.cmd(&["rollback", id]) {
                            eprintln!("soak: cleanup rollback {id}: {e}");
                        }
                    }
                }
            }
        }
        let pid = agent.or_else(|| cli.agent_pid().ok());
        if let Some(pid) = pid {
            let stopped = stop_agent(pid);
            match (&result, stopped) {
                (Ok(()), Err(e)) => return Err(e),
                (_, Err(e)) => eprintln!("soak: {e}"),
                (_, Ok(())) => out.notes.push(format!("agent {pid} stopped with SIGTERM")),
            }
        }
        let pins = cli.pins();
        if result.is_ok() && pins != 0 {
            return Err(format!("{pins} pin(s) left under {} after the agent stopped", cli.run.join("ns").display()));
        }
        result
    })();
    if let Err(e) = res {
        eprintln!("soak: {backend}: FAILED: {e}");
        out.errors.push(e);
    }
    out.took = started.elapsed();
    out
}

// ---------------------------------------------------------------------------------------------
// Report

fn growth(first: u64, last: u64, slack: u64) -> String {
    let d = i128::from(last) - i128::from(first);
    if d <= i128::from(slack) {
        format!("flat ({first} → {last})")
    } else {
        format!("**growing** ({first} → {last}, +{d})")
    }
}

fn report(cfg: &Config, r: &BackendResult) -> String {
    let mut s = format!(
        "### {} ({} × apply→rollback, then {} × apply→confirm; {:.0} s)\n\n",
        r.backend,
        cfg.n,
        cfg.n,
        r.took.as_secs_f64()
    );
    s.push_str(
        "| loop | iteration | fds | RSS KiB | threads | pins | journal bytes | records | median ms/iteration |\n",
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for x in &r.samples {
        s.push_str(&format!(
            "| apply→{} | {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
            x.phase, x.iteration, x.fds, x.rss_kib, x.threads, x.pins, x.journal_bytes, x.records, x.median_ms
        ));
    }
    s.push('\n');
    let mut verdict = Vec::new();
    for phase in ["rollback", "confirm"] {
        let v: Vec<&Sample> = r.samples.iter().filter(|x| x.phase == phase).collect();
        let (Some(first), Some(last)) = (v.first(), v.last()) else { continue };
        // RSS: allocator noise up to 5 % or 256 KiB counts as flat.
        let slack = (first.rss_kib / 20).max(256);
        let mut line = format!(
            "apply→{phase} ({} → {}): fds {}, RSS KiB {}",
            first.iteration,
            last.iteration,
            growth(first.fds as u64, last.fds as u64, 0),
            growth(first.rss_kib, last.rss_kib, slack)
        );
        // Growth while the journal fills up to its bound is not a leak; what follows it is.
        if first.records < DEFAULT_KEEP {
            if let Some(full) = v.iter().find(|x| x.records >= DEFAULT_KEEP && x.iteration < last.iteration) {
                line.push_str(&format!(
                    "; from the journal's bound ({DEFAULT_KEEP} records, iteration {}) to {}: RSS KiB {}",
                    full.iteration,
                    last.iteration,
                    growth(full.rss_kib, last.rss_kib, (full.rss_kib / 20).max(256))
                ));
            }
        }
        verdict.push(line);
    }
    let iterations: usize = r.overall.iter().map(|(_, n, _)| n).sum();
    if r.errors.is_empty() {
        verdict.push(format!("pins 0 after each of {iterations} transactions"));
        let max_records = r.samples.iter().map(|x| x.records).max().unwrap_or(0);
        let max_bytes = r.samples.iter().map(|x| x.journal_bytes).max().unwrap_or(0);
        verdict.push(format!("journal bounded (at most {max_records} records ≤ {DEFAULT_KEEP}, {max_bytes} bytes)"));
    }
    for (phase, n, m) in &r.overall {
        verdict.push(format!("median {m:.1} ms per apply→{phase} over {n}"));
    }
    verdict.extend(r.notes.iter().cloned());
    let head = if r.errors.is_empty() { "**Verdict: ok.**" } else { "**Verdict: FAILED.**" };
    s.push_str(&format!("{head} {}.\n", verdict.join("; ")));
    for e in &r.errors {
        s.push_str(&format!("\n**Failure:** {e}\n"));
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !common::asked("soak", &args) {
        return;
    }
    let cfg = common::or_exit("soak", Config::from_env());
    reap_stale_namespaces("ctg-soak");
    let tmp = Scratch(std::env::temp_dir().join(format!("ctg-soak-{}", std::process::id())));
    if let Err(e) = std::fs::create_dir_all(&tmp.0) {
        eprintln!("soak: {}: {e}", tmp.0.display());
        std::process::exit(1);
    }
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_ctguard"));
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    let mut results = Vec::new();
    for backend in &cfg.backends {
        eprintln!("soak: {backend}: {} × apply→rollback, then {} × apply→confirm", cfg.n, cfg.n);
        results.push(soak_backend(&cfg, backend, &exe, &tmp.0.join(backend)));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!();
    println!(
        "ctguard soak bench: N = {}{}, sampled every {} iterations and at the end of each loop; binary {}",
        cfg.n,
        if cfg.quick { " (QUICK smoke run)" } else { "" },
        cfg.every,
        exe.display()
    );
    println!();
    for r in &results {
        print!("{}", report(&cfg, r));
        println!();
    }
    println!(
        "took {:.0} s; loadavg at the start: {}; at the end: {}",
        started.elapsed().as_secs_f64(),
        load_start.trim(),
        load.trim()
    );
    let failed: Vec<&str> = results.iter().filter(|r| !r.errors.is_empty()).map(|r| r.backend).collect();
    drop(tmp);
    if !failed.is_empty() {
        eprintln!("soak bench: FAILED for {}", failed.join(", "));
        std::process::exit(1);
    }
}
