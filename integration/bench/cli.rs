//! Whole-CLI benchmark (`cargo bench --bench cli`, as root; issue 16). Not a timed test: it
//! measures what the user waits for — the `ctguard` process from fork/exec to `wait4`, wall
//! time and peak RSS (`ru_maxrss`) — next to the bare tools doing the same job, in the same
//! throwaway namespace, alternating which goes first run by run. The source of the section
//! "What the user waits for" of `BENCHMARKS.md`.
//!
//! Per backend (`nft`, `iptables-nft`, `iptables-legacy`) and host size N (rules in the input
//! chain: a stateful chain with `ip saddr X drop` blocklist entries, some port accepts and the
//! DNS accepts the planner inserts before), in a fresh namespace `ctg-cli-PID-K`:
//! - `ctguard plan [POLICY]` vs `nft -c -f` of the same objects (the table ctguard would create
//!   and the accept insertions, taken from `plan --json`), or `ip{,6}tables-*-restore --test
//!   --noflush` of the same documents;
//! - `ctguard apply [POLICY]` (built-in policy; no confirm), agent **warm** (a foreground
//!   `ctguard agent` already running) and **cold** (no agent: the verb starts it), vs bare
//!   `nft -f` of those objects, or `ip{,6}tables-*-restore --noflush` of the raw chains, jumps
//!   and accepts;
//! - `ctguard rollback TXID` of that policy vs the bare undo (`delete table` + `delete rule …
//!   handle H`, or `-D`/`-F`/`-X` through `--noflush`);
//! - `ctguard apply --ruleset FILE` (warm and cold) vs `nft -f FILE` / `iptables-*-restore
//!   FILE`, and `ctguard rollback` of it vs the bare restore of the listing from before
//!   (`flush ruleset` + `nft list ruleset`, or the `-save` output).
//!
//! Every rollback, ctguard's and the bare one, is checked byte-identical to the listing taken
//! before the run (`nft list ruleset`; for the iptables backends `ip{,6}tables-*-save` without
//! comment lines plus `nft list tables`): a mismatch stops the bench with exit 1.
//!
//! The agent's own peak RSS is read too (`VmHWM`, reset with `clear_refs` 5 before each verb of
//! a warm agent); it does not include the `nft`/`iptables` processes the agent runs.
//!
//! Only `cargo bench` measures (it passes `--bench`). Knobs: `CTGUARD_BENCH_SIZES=1000,10000`
//! (default 1000,10000,50000,100000), `CTGUARD_BENCH_RUNS=N` (default 5, 3 at ≥ 50k, 2 at
//! ≥ 100k), `CTGUARD_BENCH_BACKENDS=nft,iptables-nft,iptables-legacy`,
//! `CTGUARD_BENCH_ONLY=plan,policy,ruleset,cold`, `CTGUARD_BENCH_QUICK=1` (1k, 2 runs).

#[path = "common.rs"]
mod common;
use common::{min_median, reap_stale_namespaces, timed_run, tool_path, BenchNs, Finished};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BACKENDS: [&str; 3] = ["nft", "iptables-nft", "iptables-legacy"];
/// The bare tools' tag, where ctguard's rules carry `ctguard:TXID`.
const BARE_TAG: &str = "ctguard:bare-00000000";

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    sizes: Vec<usize>,
    runs: Option<usize>,
    backends: Vec<&'static str>,
    only: Vec<String>,
    quick: bool,
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let quick = std::env::var("CTGUARD_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let sizes = match std::env::var("CTGUARD_BENCH_SIZES") {
            Ok(v) => v
                .split(',')
                .map(|s| {
                    let s = s.trim().to_ascii_lowercase();
                    let (num, mul) = match s.strip_suffix('k') {
                        Some(n) => (n.to_string(), 1000),
                        None => (s.clone(), 1),
                    };
                    num.parse::<usize>().ok().filter(|&n| n >= 10).map(|n| n * mul).ok_or(format!("size {s:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Err(_) if quick => vec![1000],
            Err(_) => vec![1000, 10_000, 50_000, 100_000],
        };
        let runs = match std::env::var("CTGUARD_BENCH_RUNS") {
            Ok(v) => Some(v.trim().parse::<usize>().ok().filter(|&n| n > 0).ok_or(format!("CTGUARD_BENCH_RUNS={v}"))?),
            Err(_) if quick => Some(2),
            Err(_) => None,
        };
        let mut backends = Vec::new();
        match std::env::var("CTGUARD_BENCH_BACKENDS") {
            Ok(v) => {
                for b in v.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                    let k = BACKENDS.iter().find(|k| **k == b).ok_or(format!("unknown backend {b:?}"))?;
                    backends.push(*k);
                }
            }
            Err(_) => backends.extend(BACKENDS),
        }
        let only = std::env::var("CTGUARD_BENCH_ONLY")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_else(|_| vec!["plan".into(), "policy".into(), "ruleset".into(), "cold".into()]);
        Ok(Config { sizes, runs, backends, only, quick })
    }

    fn runs_for(&self, size: usize) -> usize {
        self.runs.unwrap_or(if size >= 100_000 {
            2
        } else if size >= 50_000 {
            3
        } else {
            5
        })
    }

    fn wants(&self, s: &str) -> bool {
        self.only.iter().any(|o| o == s)
    }
}

// ---------------------------------------------------------------------------------------------
// Host rulesets

/// The `i`-th blocklist address (100.64.0.0/10 and up; `shift` moves the whole list).
fn addr(i: usize, shift: usize) -> String {
    let v = 0x6440_0001u32.wrapping_add((i + shift) as u32);
    format!("{}.{}.{}.{}", v >> 24, (v >> 16) & 255, (v >> 8) & 255, v & 255)
}

/// Port accepts after the blocklist (each `ct state new`).
const PORTS: [(&str, u16); 5] = [("tcp", 22), ("tcp", 80), ("tcp", 443), ("udp", 53), ("tcp", 53)];

/// `table inet host` with an input chain of exactly `n` rules: established/related, lo, the
/// blocklist, the port accepts, a counted drop; policy drop.
fn host_nft(n: usize, shift: usize) -> String {
    let fixed = 3 + PORTS.len();
    let mut s = String::with_capacity(n * 40);
    s.push_str("table inet host {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n");
    s.push_str("\t\tct state established,related accept\n\t\tiif \"lo\" accept\n");
    for i in 0..n.saturating_sub(fixed) {
        s.push_str(&format!("\t\tip saddr {} drop\n", addr(i, shift)));
    }
    for (p, port) in PORTS {
        s.push_str(&format!("\t\t{p} dport {port} ct state new accept\n"));
    }
    s.push_str("\t\tcounter packets 0 bytes 0 drop\n\t}\n}\n");
    s
}

/// The IPv4 filter table with `n` INPUT rules (policy DROP): the same shape as [`host_nft`].
fn host_ipt_filter(n: usize, shift: usize) -> String {
    let fixed = 2 + PORTS.len();
    let mut s = String::with_capacity(n * 40);
    s.push_str("*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s.push_str("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n");
    for i in 0..n.saturating_sub(fixed) {
        s.push_str(&format!("-A INPUT -s {}/32 -j DROP\n", addr(i, shift)));
    }
    for (p, port) in PORTS {
        s.push_str(&format!("-A INPUT -p {p} -m {p} --dport {port} -m conntrack --ctstate NEW -j ACCEPT\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// An empty raw table (a host that has one; it also lets the legacy rollback be exact: x_tables
/// tables cannot be removed from user space).
const RAW_EMPTY: &str = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

/// The small IPv6 stateful filter of the iptables hosts.
const V6_FILTER: &str = "*filter
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

fn variant(backend: &str) -> Option<&str> {
    backend.strip_prefix("iptables-")
}

/// The built-in policy with `backend` set (the iptables backends need it named; nft uses the
/// built-in policy itself, no file).
fn policy_toml(backend: &str) -> String {
    format!(
        "backend = \"{backend}\"\n\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n\n[sysctl]\n\"net.netfilter.nf_conntrack_max\" = \"auto\"\n\"net.netfilter.nf_conntrack_buckets\" = \"auto\"\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Processes

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

/// Runs a tool (untimed use) in the calling thread's namespace; stdout, or an error.
fn tool(scratch: &Path, name: &str, args: &[&str]) -> Result<String, String> {
    let f = timed_run(&tool_path(name)?, &strs(args), scratch)?;
    if f.ok() {
        Ok(f.stdout)
    } else {
        Err(format!("{name} {} failed ({}): {}", args.join(" "), f.code, f.stderr.trim()))
    }
}

/// A timed tool run that must succeed.
fn bare(scratch: &Path, name: &str, args: &[&str]) -> Result<Finished, String> {
    let f = timed_run(&tool_path(name)?, &strs(args), scratch)?;
    if f.ok() {
        Ok(f)
    } else {
        Err(format!("bare `{name} {}` failed ({}): {}", args.join(" "), f.code, f.stderr.trim()))
    }
}

/// Several processes one after another, counted as one step: times add up, RSS is the max.
fn sum(parts: Vec<Finished>) -> Finished {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or(Finished {
        secs: 0.0,
        maxrss_kib: 0,
        code: 0,
        stdout: String::new(),
        stderr: String::new(),
    });
    for p in it {
        acc.secs += p.secs;
        acc.maxrss_kib = acc.maxrss_kib.max(p.maxrss_kib);
        acc.code = acc.code.max(p.code);
    }
    acc
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')),
        Err(_) => false,
    }
}

fn is_ctguard(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ctguard")
}

fn hwm_kib(pid: i32) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resets the peak RSS of `pid` (`clear_refs` 5).
fn reset_hwm(pid: i32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn sigterm_wait(pid: i32) -> Result<(), String> {
    if !alive(pid) {
        return Ok(());
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if !alive(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("agent {pid} still running 30 s after SIGTERM"))
}

/// The CLI with its own state and run dirs, and the agents this bench started.
struct Cli {
    exe: PathBuf,
    state: PathBuf,
    run: PathBuf,
    scratch: PathBuf,
    /// A foreground `ctguard agent` (the warm agent).
    fg: Option<Child>,
}

impl Cli {
    fn args(&self, verb: &[&str]) -> Vec<String> {
        let mut a = vec![
            "--state-dir".to_string(),
            self.state.to_string_lossy().into_owned(),
            "--run-dir".to_string(),
            self.run.to_string_lossy().into_owned(),
            "--json".to_string(),
        ];
        a.extend(strs(verb));
        a
    }

    /// A timed CLI run (from the bench's own namespace; the target is `--netns`).
    fn run(&self, verb: &[&str]) -> Result<Finished, String> {
        timed_run(&self.exe, &self.args(verb), &self.scratch)
    }

    fn json(f: &Finished, what: &str) -> Result<Value, String> {
        if !f.ok() {
            return Err(format!("`ctguard {what}` exit {}: {} {}", f.code, f.stdout.trim(), f.stderr.trim()));
        }
        serde_json::from_str(f.stdout.trim()).map_err(|e| format!("`ctguard {what}`: not JSON ({e}): {}", f.stdout))
    }

    /// The pid in `RUN_DIR/agent.lock`, if that process is a live ctguard.
    fn locked_agent(&self) -> Option<i32> {
        let p = std::fs::read_to_string(self.run.join("agent.lock")).ok()?.trim().parse::<i32>().ok()?;
        (alive(p) && is_ctguard(p)).then_some(p)
    }

    /// Starts the warm agent (foreground, as a service manager runs it) and waits until it answers.
    fn start_warm(&mut self) -> Result<i32, String> {
        self.stop_agents()?;
        let log = std::fs::File::create(self.scratch.join("fg-agent.log")).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.exe)
            .args(["--state-dir", &self.state.to_string_lossy(), "--run-dir", &self.run.to_string_lossy(), "agent"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("ctguard agent: {e}"))?;
        let pid = child.id() as i32;
        self.fg = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if self.run.join("ctguard.sock").exists() {
                let st = self.run(&["status"])?;
                if st.ok() {
                    let v = Self::json(&st, "status")?;
                    if v["data"]["agent_pid"].as_i64() == Some(i64::from(pid)) {
                        return Ok(pid);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("the foreground agent did not answer within 10 s".into())
    }

    fn warm_pid(&self) -> Option<i32> {
        self.fg.as_ref().map(|c| c.id() as i32)
    }

    /// No agent left: the foreground one and a detached one the CLI started (nothing is
    /// pending when this is called; SIGTERM would roll back what is).
    fn stop_agents(&mut self) -> Result<(), String> {
        if let Some(mut c) = self.fg.take() {
            let pid = c.id() as i32;
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(format!("foreground agent {pid} ignored SIGTERM for 30 s"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(pid) = self.locked_agent() {
            sigterm_wait(pid)?;
        }
        Ok(())
    }

    /// Rolls back whatever is pending (cleanup after a failure).
    fn rollback_pending(&self) {
        let Ok(st) = self.run(&["status"]) else { return };
        let Ok(v) = Self::json(&st, "status") else { return };
        for p in v["data"]["pending"].as_array().into_iter().flatten() {
            if let Some(id) = p["id"].as_str() {
                match self.run(&["rollback", id]) {
                    Ok(f) if f.ok() => {}
                    Ok(f) => eprintln!("cli bench: cleanup rollback {id}: exit {}: {}", f.code, f.stderr.trim()),
                    Err(e) => eprintln!("cli bench: cleanup rollback {id}: {e}"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One backend at one size

/// What the bare tools run, built from `ctguard plan --json` (and `render` for iptables).
struct BareScripts {
    /// nft: the apply script. iptables: the IPv4 and IPv6 `--noflush` documents.
    apply: Vec<(String, PathBuf)>,
    /// iptables: the undo documents (nft's undo needs the handles: built after each apply).
    undo: Vec<(String, PathBuf)>,
    /// nft: (family, table, chain) of each insertion.
    chains: Vec<(String, String, String)>,
}

/// One measured pair.
#[derive(Clone)]
struct Pair {
    ctg: Finished,
    /// The agent's peak RSS during the verb (KiB), where known.
    agent_kib: Option<u64>,
    bare: Finished,
}

/// Per row: pairs, or the failure that stopped it.
#[derive(Default)]
struct Row {
    pairs: Vec<Pair>,
    failed: Option<String>,
}

struct Ctx<'a> {
    backend: &'static str,
    n: usize,
    ns: &'a BenchNs,
    cli: &'a mut Cli,
    dir: PathBuf,
    /// `POLICY` argument (none for nft: the built-in policy itself).
    policy: Option<String>,
    before: String,
    scripts: BareScripts,
    ruleset_file: PathBuf,
    ruleset_restore: PathBuf,
}

fn listing(scratch: &Path, backend: &str) -> Result<String, String> {
    match variant(backend) {
        None => tool(scratch, "nft", &["list", "ruleset"]),
        Some(v) => {
            let mut s = String::new();
            for fam in ["iptables", "ip6tables"] {
                let t = format!("{fam}-{v}-save");
                s.push_str(&format!("# {t}\n"));
                for l in tool(scratch, &t, &[])?.lines().filter(|l| !l.starts_with('#')) {
                    s.push_str(l);
                    s.push('\n');
                }
            }
            s.push_str("# nft list tables\n");
            s.push_str(&tool(scratch, "nft", &["list", "tables"])?);
            Ok(s)
        }
    }
}

fn first_diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    for i in 0..la.len().max(lb.len()) {
        let (x, y) = (la.get(i), lb.get(i));
        if x != y {
            return format!("line {}: before {:?}, after {:?} ({} vs {} lines)", i + 1, x, y, la.len(), lb.len());
        }
    }
    "same lines".into()
}

impl Ctx<'_> {
    fn in_ns<T: Send>(&self, f: impl FnOnce(&Path) -> Result<T, String> + Send) -> Result<T, String> {
        let d = self.dir.clone();
        self.ns.run(move || f(&d))?
    }

    /// Fails loudly unless the ruleset is byte-identical to the one before the run.
    fn check_identical(&self, after_what: &str) -> Result<(), String> {
        let backend = self.backend;
        let now = self.in_ns(|d| listing(d, backend))?;
        if now != self.before {
            return Err(format!(
                "ROLLBACK NOT EXACT: after {after_what} ({}, {} rules) the ruleset differs from before: {}",
                self.backend,
                self.n,
                first_diff(&self.before, &now)
            ));
        }
        Ok(())
    }

    fn policy_args<'b>(&'b self, verb: &[&'b str]) -> Vec<&'b str> {
        let mut v: Vec<&str> = verb.to_vec();
        if let Some(p) = &self.policy {
            v.push(p);
        }
        v
    }

    fn ctg_plan(&self) -> Result<Finished, String> {
        let args = self.policy_args(&["plan", "--netns", &self.ns.name]);
        let f = self.cli.run(&args)?;
        Cli::json(&f, "plan")?;
        Ok(f)
    }

    fn bare_check(&self) -> Result<Finished, String> {
        let backend = self.backend;
        let docs = self.scripts.apply.clone();
        self.in_ns(move |d| {
            let mut parts = Vec::new();
            for (t, p) in &docs {
                let p = p.to_string_lossy();
                parts.push(match variant(backend) {
                    None => bare(d, "nft", &["-c", "-f", &p])?,
                    Some(_) => bare(d, t, &["--test", "--noflush", &p])?,
                });
            }
            Ok(sum(parts))
        })
    }

    /// `ctguard apply`: (the run, the agent's peak RSS, txid).
    fn ctg_apply(&self, ruleset: bool, cold: bool) -> Result<(Finished, Option<u64>, String), String> {
        let warm = self.cli.warm_pid();
        if let Some(p) = warm {
            reset_hwm(p);
        }
        let rs = self.ruleset_file.to_string_lossy().into_owned();
        let args: Vec<&str> = if ruleset {
            vec!["apply", "--netns", &self.ns.name, "--timeout", "10m", "--ruleset", &rs]
        } else {
            self.policy_args(&["apply", "--netns", &self.ns.name, "--timeout", "10m"])
        };
        let f = self.cli.run(&args)?;
        let v = Cli::json(&f, &args.join(" "))?;
        let txid = v["data"]["txid"].as_str().ok_or(format!("apply answered {v}"))?.to_string();
        let agent = if cold { self.cli.locked_agent() } else { warm };
        Ok((f, agent.and_then(hwm_kib), txid))
    }

    fn ctg_rollback(&self, txid: &str) -> Result<(Finished, Option<u64>), String> {
        let agent = self.cli.warm_pid().or_else(|| self.cli.locked_agent());
        if let Some(p) = agent {
            reset_hwm(p);
        }
        let f = self.cli.run(&["rollback", txid])?;
        let v = Cli::json(&f, &format!("rollback {txid}"))?;
        if v["data"]["state"].as_str() != Some("ROLLED_BACK") {
            return Err(format!("rollback {txid} answered {v}"));
        }
        Ok((f, agent.and_then(hwm_kib)))
    }

    fn bare_apply(&self) -> Result<Finished, String> {
        let backend = self.backend;
        let docs = self.scripts.apply.clone();
        self.in_ns(move |d| {
            let mut parts = Vec::new();
            for (t, p) in &docs {
                let p = p.to_string_lossy();
                parts.push(match variant(backend) {
                    None => bare(d, "nft", &["-f", &p])?,
                    Some(_) => bare(d, t, &["-w", "10", "--noflush", &p])?,
                });
            }
            Ok(sum(parts))
        })
    }

    /// The bare undo. nft: the handles of the bare insertions are read over netlink first
    /// (untimed), then one `nft -f` deletes the table and those rules.
    fn bare_undo(&self) -> Result<Finished, String> {
        let backend = self.backend;
        let undo = self.scripts.undo.clone();
        let chains = self.scripts.chains.clone();
        self.in_ns(move |d| {
            if variant(backend).is_some() {
                let mut parts = Vec::new();
                for (t, p) in &undo {
                    parts.push(bare(d, t, &["-w", "10", "--noflush", &p.to_string_lossy()])?);
                }
                return Ok(sum(parts));
            }
            let mut script = String::from("delete table inet ctguard\n");
            let mut seen = Vec::new();
            for (fam, table, chain) in &chains {
                if seen.contains(&(fam, table, chain)) {
                    continue;
                }
                seen.push((fam, table, chain));
                let rules = ctguard::backend::netlink::dump_chain_rules(fam, table, chain)
                    .map_err(|e| format!("dump {fam} {table} {chain}: {e}"))?;
                for r in rules.iter().filter(|r| r.comment.as_deref() == Some(BARE_TAG)) {
                    script.push_str(&format!("delete rule {fam} {table} {chain} handle {}\n", r.handle));
                }
            }
            let p = d.join("bare-undo.nft");
            std::fs::write(&p, &script).map_err(|e| e.to_string())?;
            bare(d, "nft", &["-f", &p.to_string_lossy()])
        })
    }

    fn bare_ruleset_apply(&self) -> Result<Finished, String> {
        let backend = self.backend;
        let file = self.ruleset_file.clone();
        self.in_ns(move |d| match variant(backend) {
            None => bare(d, "nft", &["-f", &file.to_string_lossy()]),
            Some(v) => bare(d, &format!("iptables-{v}-restore"), &["-w", "10", &file.to_string_lossy()]),
        })
    }

    fn bare_ruleset_restore(&self) -> Result<Finished, String> {
        let backend = self.backend;
        let file = self.ruleset_restore.clone();
        let file6 = self.dir.join("restore.v6");
        self.in_ns(move |d| match variant(backend) {
            None => bare(d, "nft", &["-f", &file.to_string_lossy()]),
            Some(v) => Ok(sum(vec![
                bare(d, &format!("iptables-{v}-restore"), &["-w", "10", &file.to_string_lossy()])?,
                bare(d, &format!("ip6tables-{v}-restore"), &["-w", "10", &file6.to_string_lossy()])?,
            ])),
        })
    }
}

/// Builds the bare scripts from `plan --json` (nft: its `desired` table and insertions;
/// iptables: `render` documents plus the insertions).
fn bare_scripts(
    ctx_dir: &Path,
    backend: &str,
    plan: &Value,
    cli: &Cli,
    policy: Option<&str>,
) -> Result<BareScripts, String> {
    let data = &plan["data"];
    let ins = data["insertions"].as_array().ok_or(format!("plan --json has no insertions: {plan}"))?;
    if ins.is_empty() {
        return Err(format!("the plan inserts no accept: the host ruleset does not need one (bench setup): {plan}"));
    }
    let tag = |s: &str| s.replace("ctguard:preview", BARE_TAG);
    match variant(backend) {
        None => {
            let mut s = String::new();
            for l in data["objects"]["desired"].as_array().ok_or("plan --json: no objects.desired")? {
                s.push_str(&tag(l.as_str().unwrap_or_default()));
                s.push('\n');
            }
            let mut chains = Vec::new();
            for i in ins {
                let chain = i["chain"].as_str().unwrap_or_default();
                let parts: Vec<&str> = chain.split(' ').collect();
                let ["nft", fam, table, ch] = parts[..] else {
                    return Err(format!("unexpected insertion chain {chain:?}"));
                };
                let rule = tag(i["rule"]["nft"].as_str().ok_or(format!("insertion without nft rule: {i}"))?);
                match i["position"]["at"].as_str() {
                    Some("before") => {
                        let h = i["position"]["handle"].as_u64().ok_or(format!("insertion without handle: {i}"))?;
                        s.push_str(&format!("insert rule {fam} {table} {ch} position {h} {rule}\n"));
                    }
                    Some("append") => s.push_str(&format!("add rule {fam} {table} {ch} {rule}\n")),
                    other => return Err(format!("insertion position {other:?}: {i}")),
                }
                chains.push((fam.to_string(), table.to_string(), ch.to_string()));
            }
            let p = ctx_dir.join("bare-apply.nft");
            std::fs::write(&p, &s).map_err(|e| e.to_string())?;
            Ok(BareScripts { apply: vec![("nft".into(), p)], undo: Vec::new(), chains })
        }
        Some(v) => {
            let mut apply = Vec::new();
            let mut undo = Vec::new();
            for (fam, six) in [("iptables", false), ("ip6tables", true)] {
                let mut args = vec!["render", "--format", fam];
                if let Some(p) = policy {
                    args.push(p);
                }
                let r = cli.run(&args)?;
                let rj = Cli::json(&r, &format!("render --format {fam}"))?;
                let text = rj["data"]["text"].as_str().ok_or(format!("render --format {fam}: no text: {rj}"))?;
                // The raw block of the rendered document (rules, chains, jumps), with the bare tag.
                let raw: Vec<String> = text
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.starts_with('{') && !l.trim().is_empty())
                    .map(tag)
                    .collect();
                if raw.first().map(String::as_str) != Some("*raw") || raw.last().map(String::as_str) != Some("COMMIT") {
                    return Err(format!("render --format {fam}: unexpected document:\n{text}"));
                }
                let mut filter_add = Vec::new();
                let mut filter_del = Vec::new();
                for i in ins.iter().filter(|i| i["v6"].as_bool() == Some(six)) {
                    let chain = i["chain"].as_str().unwrap_or_default();
                    let parts: Vec<&str> = chain.split(' ').collect();
                    let [_, table, ch] = parts[..] else { return Err(format!("unexpected chain {chain:?}")) };
                    if table != "filter" {
                        return Err(format!("insertion into table {table}: not in this bench's shape"));
                    }
                    for rule in i["rule"]["iptables"].as_array().into_iter().flatten() {
                        let words: Vec<String> = rule
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|w| {
                                let w = tag(w.as_str().unwrap_or_default());
                                if w.contains(' ') || w.contains(':') && w.starts_with("ctguard") {
                                    format!("\"{w}\"")
                                } else {
                                    w
                                }
                            })
                            .collect();
                        let spec = words.join(" ");
                        match i["position"]["at"].as_str() {
                            Some("append") => filter_add.push(format!("-A {ch} {spec}")),
                            Some("before") => {
                                let idx = i["position"]["index"].as_u64().ok_or(format!("no index: {i}"))?;
                                filter_add.push(format!("-I {ch} {} {spec}", idx + 1));
                            }
                            other => return Err(format!("insertion position {other:?}: {i}")),
                        }
                        filter_del.push(format!("-D {ch} {spec}"));
                    }
                }
                let mut doc = String::new();
                if !filter_add.is_empty() {
                    doc.push_str(&format!("*filter\n{}\nCOMMIT\n", filter_add.join("\n")));
                }
                doc.push_str(&raw.join("\n"));
                doc.push('\n');
                let mut un = String::from("*raw\n");
                for l in &raw {
                    if let Some(j) = l.strip_prefix("-I ") {
                        // `-I PREROUTING 1 -j CTGUARD-PRE` → `-D PREROUTING -j CTGUARD-PRE`
                        let mut w = j.split_whitespace();
                        let (Some(ch), Some(_pos)) = (w.next(), w.next()) else { continue };
                        un.push_str(&format!("-D {ch} {}\n", w.collect::<Vec<_>>().join(" ")));
                    } else if let Some(j) = l.strip_prefix("-A ") {
                        let ch = j.split_whitespace().next().unwrap_or_default();
                        if !ch.starts_with("CTGUARD") {
                            un.push_str(&format!("-D {j}\n"));
                        }
                    }
                }
                for l in &raw {
                    if let Some(c) = l.strip_prefix(':') {
                        let ch = c.split_whitespace().next().unwrap_or_default();
                        un.push_str(&format!("-F {ch}\n-X {ch}\n"));
                    }
                }
                un.push_str("COMMIT\n");
                if !filter_del.is_empty() {
                    un.push_str(&format!("*filter\n{}\nCOMMIT\n", filter_del.join("\n")));
                }
                let t = format!("{fam}-{v}-restore");
                let pa = ctx_dir.join(format!("bare-apply.{fam}"));
                let pu = ctx_dir.join(format!("bare-undo.{fam}"));
                std::fs::write(&pa, &doc).map_err(|e| e.to_string())?;
                std::fs::write(&pu, &un).map_err(|e| e.to_string())?;
                apply.push((t.clone(), pa));
                undo.push((t, pu));
            }
            Ok(BareScripts { apply, undo, chains: Vec::new() })
        }
    }
}

type Rows = BTreeMap<&'static str, Row>;

/// A ctguard apply and its rollback, each with the agent's peak RSS.
type CtgRun = (Finished, Option<u64>, Finished, Option<u64>);

/// Runs `a` and `b` in the given order; returns both.
fn ordered<A, B>(
    ctg_first: bool,
    a: impl FnOnce() -> Result<A, String>,
    b: impl FnOnce() -> Result<B, String>,
) -> Result<(A, B), String> {
    if ctg_first {
        let x = a()?;
        Ok((x, b()?))
    } else {
        let y = b()?;
        Ok((a()?, y))
    }
}

/// Setup failures and ctguard failures are recorded in the row; a rollback that is not exact
/// (or a bare tool that fails) is returned as `Err` and stops the bench.
fn bench_size(cfg: &Config, backend: &'static str, n: usize, cli: &mut Cli, base: &Path) -> Result<Rows, String> {
    let mut rows: Rows = BTreeMap::new();
    let dir = base.join(format!("{backend}-{n}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let ns = BenchNs::new("ctg-cli")?;
    // Host ruleset.
    let setup = std::time::Instant::now();
    let (ruleset_text, policy) = {
        let d = dir.clone();
        match variant(backend) {
            None => {
                ns.run(|| {
                    let p = d.join("host.nft");
                    std::fs::write(&p, host_nft(n, 0)).map_err(|e| e.to_string())?;
                    tool(&d, "nft", &["-f", &p.to_string_lossy()]).map(drop)
                })??;
                (format!("flush ruleset\n{}", host_nft(n, 1)), None)
            }
            Some(v) => {
                ns.run(|| {
                    let p4 = d.join("host.v4");
                    let p6 = d.join("host.v6");
                    std::fs::write(&p4, format!("{RAW_EMPTY}{}", host_ipt_filter(n, 0))).map_err(|e| e.to_string())?;
                    std::fs::write(&p6, format!("{RAW_EMPTY}{V6_FILTER}")).map_err(|e| e.to_string())?;
                    tool(&d, &format!("iptables-{v}-restore"), &["-w", "10", &p4.to_string_lossy()])?;
                    tool(&d, &format!("ip6tables-{v}-restore"), &["-w", "10", &p6.to_string_lossy()]).map(drop)
                })??;
                let pol = dir.join("policy.toml");
                std::fs::write(&pol, policy_toml(backend)).map_err(|e| e.to_string())?;
                (host_ipt_filter(n, 1), Some(pol.to_string_lossy().into_owned()))
            }
        }
    };
    let before = {
        let d = dir.clone();
        ns.run(move || listing(&d, backend))??
    };
    eprintln!("cli bench: {backend} {n}: host loaded and listed in {:.1} s", setup.elapsed().as_secs_f64());
    let ruleset_file = dir.join(if variant(backend).is_some() { "ruleset.v4" } else { "ruleset.nft" });
    std::fs::write(&ruleset_file, &ruleset_text).map_err(|e| e.to_string())?;
    let ruleset_restore = dir.join("restore");
    let restore_text = match variant(backend) {
        None => format!("flush ruleset\n{before}"),
        Some(_) => {
            // The whole prior state, both families, as `-save` printed it: restoring only the
            // replaced table would recreate it after the others (another `nft list tables` order
            // for iptables-nft).
            let v6 = before.split("# ip6tables-").nth(1).unwrap_or_default();
            let v6: String =
                v6.lines().skip(1).take_while(|l| !l.starts_with("# nft")).map(|l| format!("{l}\n")).collect();
            std::fs::write(dir.join("restore.v6"), v6).map_err(|e| e.to_string())?;
            let v4 = before.split("# ip6tables-").next().unwrap_or_default();
            v4.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect()
        }
    };
    std::fs::write(&ruleset_restore, restore_text).map_err(|e| e.to_string())?;

    cli.start_warm()?;
    let plan = {
        let mut a = vec!["plan", "--netns", &ns.name];
        if let Some(p) = &policy {
            a.push(p);
        }
        let f = cli.run(&a)?;
        Cli::json(&f, "plan")?
    };
    let scripts = bare_scripts(&dir, backend, &plan, cli, policy.as_deref())?;
    let ctx = Ctx { backend, n, ns: &ns, cli, dir, policy, before, scripts, ruleset_file, ruleset_restore };
    let runs = cfg.runs_for(n);
    let result = (|| -> Result<(), String> {
        for r in 0..runs {
            let first = r % 2 == 0;
            eprintln!(
                "cli bench: {backend} {n}: run {}/{runs} ({} first)",
                r + 1,
                if first { "ctguard" } else { "bare" }
            );
            if ctx.cli.fg.is_none() {
                ctx.cli.start_warm()?;
            }
            if cfg.wants("plan") && rows.get("plan").is_none_or(|x| x.failed.is_none()) {
                let (c, b) = ordered(first, || Ok(ctx.ctg_plan()), || ctx.bare_check())?;
                let row = rows.entry("plan").or_default();
                match c {
                    Ok(c) => row.pairs.push(Pair { ctg: c, agent_kib: None, bare: b }),
                    Err(e) => row.failed = Some(e),
                }
            }
            if cfg.wants("policy") {
                policy_pair(&ctx, &mut rows, first, false, r == 0)?;
            }
            if cfg.wants("ruleset") {
                ruleset_pair(&ctx, &mut rows, first, false)?;
            }
            if cfg.wants("cold") {
                if cfg.wants("policy") {
                    ctx.cli.stop_agents()?;
                    policy_pair(&ctx, &mut rows, first, true, false)?;
                }
                if cfg.wants("ruleset") {
                    ctx.cli.stop_agents()?;
                    ruleset_pair(&ctx, &mut rows, first, true)?;
                }
                ctx.cli.stop_agents()?;
            }
        }
        Ok(())
    })();
    if result.is_err() {
        ctx.cli.rollback_pending();
    }
    let stopped = ctx.cli.stop_agents();
    result?;
    stopped?;
    drop(ns);
    Ok(rows)
}

/// Policy apply (warm or cold) + rollback against the bare apply + undo, each checked exact.
fn policy_pair(ctx: &Ctx<'_>, rows: &mut Rows, first: bool, cold: bool, same: bool) -> Result<(), String> {
    let apply_key = if cold { "apply (cold)" } else { "apply (warm)" };
    if rows.get(apply_key).is_some_and(|x| x.failed.is_some()) {
        return Ok(());
    }
    let ctx_ref = ctx;
    let ctg_after = std::cell::RefCell::new(None::<String>);
    let bare_after = std::cell::RefCell::new(None::<String>);
    let ctg = || -> Result<Result<CtgRun, String>, String> {
        let (a, akib, txid) = match ctx_ref.ctg_apply(false, cold) {
            Ok(x) => x,
            Err(e) => {
                // Nothing may have changed: check, then record the failure.
                ctx_ref.cli.rollback_pending();
                ctx_ref.check_identical("a failed ctguard apply")?;
                return Ok(Err(e));
            }
        };
        if same {
            let backend = ctx_ref.backend;
            let l = ctx_ref.in_ns(|d| listing(d, backend))?;
            *ctg_after.borrow_mut() = Some(l.replace(&format!("ctguard:{txid}"), BARE_TAG));
        }
        let (rb, rkib) = ctx_ref.ctg_rollback(&txid)?;
        ctx_ref.check_identical(&format!("ctguard rollback {txid}"))?;
        Ok(Ok((a, akib, rb, rkib)))
    };
    let bare = || -> Result<(Finished, Finished), String> {
        let a = ctx_ref.bare_apply()?;
        if same {
            let backend = ctx_ref.backend;
            *bare_after.borrow_mut() = Some(ctx_ref.in_ns(|d| listing(d, backend))?);
        }
        let u = ctx_ref.bare_undo()?;
        ctx_ref.check_identical("the bare undo")?;
        Ok((a, u))
    };
    let (c, (ba, bu)) = ordered(first, ctg, bare)?;
    if let (Some(x), Some(y)) = (ctg_after.into_inner(), bare_after.into_inner()) {
        // The bare tools must build exactly what ctguard built (tags aside), or the ratio
        // compares different work.
        if x != y {
            return Err(format!(
                "NOT THE SAME OBJECTS: the ruleset after the bare apply differs from the one after ctguard apply ({}, {} rules): {}",
                ctx.backend,
                ctx.n,
                first_diff(&x, &y)
            ));
        }
        eprintln!(
            "cli bench: {} {}: the bare apply built the same ruleset as ctguard apply (tags aside)",
            ctx.backend, ctx.n
        );
    }
    record(ctx, rows, apply_key, (!cold).then_some("policy rollback"), c, ba, bu);
    Ok(())
}

/// Ruleset apply (warm or cold) + rollback against bare apply + restore, each checked exact.
fn ruleset_pair(ctx: &Ctx<'_>, rows: &mut Rows, first: bool, cold: bool) -> Result<(), String> {
    let apply_key = if cold { "apply --ruleset (cold)" } else { "apply --ruleset (warm)" };
    if rows.get(apply_key).is_some_and(|x| x.failed.is_some()) {
        return Ok(());
    }
    let ctx_ref = ctx;
    let ctg = || -> Result<Result<CtgRun, String>, String> {
        let (a, akib, txid) = match ctx_ref.ctg_apply(true, cold) {
            Ok(x) => x,
            Err(e) => {
                ctx_ref.cli.rollback_pending();
                ctx_ref.check_identical("a failed ctguard apply --ruleset")?;
                return Ok(Err(e));
            }
        };
        let (rb, rkib) = ctx_ref.ctg_rollback(&txid)?;
        ctx_ref.check_identical(&format!("ctguard rollback {txid} (ruleset)"))?;
        Ok(Ok((a, akib, rb, rkib)))
    };
    let bare = || -> Result<(Finished, Finished), String> {
        let a = ctx_ref.bare_ruleset_apply()?;
        let u = ctx_ref.bare_ruleset_restore()?;
        ctx_ref.check_identical("the bare ruleset restore")?;
        Ok((a, u))
    };
    let (c, (ba, bu)) = ordered(first, ctg, bare)?;
    record(ctx, rows, apply_key, (!cold).then_some("ruleset rollback"), c, ba, bu);
    Ok(())
}

/// Files one paired run: the apply row and (warm runs) the rollback row, or the apply row's
/// failure (later runs of that row are skipped).
fn record(
    ctx: &Ctx<'_>,
    rows: &mut Rows,
    apply_key: &'static str,
    rollback_key: Option<&'static str>,
    c: Result<CtgRun, String>,
    ba: Finished,
    bu: Finished,
) {
    match c {
        Ok((a, akib, rb, rkib)) => {
            rows.entry(apply_key).or_default().pairs.push(Pair { ctg: a, agent_kib: akib, bare: ba });
            if let Some(k) = rollback_key {
                rows.entry(k).or_default().pairs.push(Pair { ctg: rb, agent_kib: rkib, bare: bu });
            }
        }
        Err(e) => {
            eprintln!("cli bench: {} {}: {apply_key} failed: {e}", ctx.backend, ctx.n);
            rows.entry(apply_key).or_default().failed = Some(e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

const ROW_ORDER: [&str; 7] = [
    "apply (warm)",
    "apply (cold)",
    "plan",
    "policy rollback",
    "apply --ruleset (warm)",
    "apply --ruleset (cold)",
    "ruleset rollback",
];

fn bare_name(row: &str, backend: &str) -> String {
    let v = variant(backend);
    match (row, v) {
        ("plan", None) => "`nft -c -f` same objects".into(),
        ("plan", Some(v)) => format!("`ip{{,6}}tables-{v}-restore --test --noflush`"),
        ("apply (warm)" | "apply (cold)", None) => "`nft -f` same table + inserts".into(),
        ("apply (warm)" | "apply (cold)", Some(v)) => format!("`ip{{,6}}tables-{v}-restore --noflush`"),
        ("policy rollback", None) => "`nft -f` delete table + rules".into(),
        ("policy rollback", Some(v)) => format!("`ip{{,6}}tables-{v}-restore --noflush` -D/-F/-X"),
        (_, None) if row.starts_with("apply --ruleset") => "`nft -f FILE`".into(),
        (_, Some(v)) if row.starts_with("apply --ruleset") => format!("`iptables-{v}-restore FILE`"),
        ("ruleset rollback", None) => "`nft -f` flush + prior listing".into(),
        ("ruleset rollback", Some(v)) => format!("`ip{{,6}}tables-{v}-restore` prior saves"),
        _ => "?".into(),
    }
}

fn goal(row: &str) -> Option<f64> {
    match row {
        "apply (warm)" | "apply (cold)" | "plan" => Some(1.5),
        "apply --ruleset (warm)" | "apply --ruleset (cold)" => Some(1.3),
        "ruleset rollback" | "policy rollback" => Some(1.2),
        _ => None,
    }
}

fn ms(s: f64) -> String {
    let m = s * 1000.0;
    if m >= 1000.0 {
        format!("{:.2} s", s)
    } else if m >= 100.0 {
        format!("{m:.0} ms")
    } else {
        format!("{m:.1} ms")
    }
}

fn mib(kib: f64) -> String {
    if kib.is_nan() {
        "–".into()
    } else {
        format!("{:.1}", kib / 1024.0)
    }
}

fn size_name(n: usize) -> String {
    if n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn report(backend: &str, results: &[(usize, Rows)]) -> String {
    let mut s = format!("### {backend}\n\n");
    s.push_str("| what the user runs | rules | runs | ctguard min / median | bare reference | bare min / median | ratio (median of paired) | goal | met | max RSS MiB: CLI / agent / bare |\n");
    s.push_str("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |\n");
    for row in ROW_ORDER {
        for (n, rows) in results {
            let Some(r) = rows.get(row) else { continue };
            let cmd = match row {
                "plan" => "`ctguard plan`",
                "policy rollback" => "`ctguard rollback` (policy)",
                "ruleset rollback" => "`ctguard rollback` (ruleset)",
                "apply (warm)" => "`ctguard apply`, agent warm",
                "apply (cold)" => "`ctguard apply`, agent cold",
                "apply --ruleset (warm)" => "`ctguard apply --ruleset`, agent warm",
                "apply --ruleset (cold)" => "`ctguard apply --ruleset`, agent cold",
                other => other,
            };
            if r.pairs.is_empty() {
                s.push_str(&format!(
                    "| {cmd} | {} | 0 | **fails**: {} | {} | | | | **no** | |\n",
                    size_name(*n),
                    r.failed.as_deref().unwrap_or("?").replace('|', "\\|").replace('\n', " "),
                    bare_name(row, backend)
                ));
                continue;
            }
            let c: Vec<f64> = r.pairs.iter().map(|p| p.ctg.secs).collect();
            let b: Vec<f64> = r.pairs.iter().map(|p| p.bare.secs).collect();
            let ratios: Vec<f64> = r.pairs.iter().map(|p| p.ctg.secs / p.bare.secs).collect();
            let (cmin, cmed) = min_median(&c);
            let (bmin, bmed) = min_median(&b);
            let (_, ratio) = min_median(&ratios);
            let (_, crss) = min_median(&r.pairs.iter().map(|p| p.ctg.maxrss_kib as f64).collect::<Vec<_>>());
            let arss: Vec<f64> = r.pairs.iter().filter_map(|p| p.agent_kib.map(|k| k as f64)).collect();
            let arss = arss.iter().copied().fold(f64::NAN, f64::max);
            let (_, brss) = min_median(&r.pairs.iter().map(|p| p.bare.maxrss_kib as f64).collect::<Vec<_>>());
            let g = goal(row);
            let met = match g {
                Some(g) if ratio <= g => "yes",
                Some(_) => "**no**",
                None => "",
            };
            s.push_str(&format!(
                "| {cmd} | {} | {} | {} / {} | {} | {} / {} | {:.2}× | {} | {met}{} | {} / {} / {} |\n",
                size_name(*n),
                r.pairs.len(),
                ms(cmin),
                ms(cmed),
                bare_name(row, backend),
                ms(bmin),
                ms(bmed),
                ratio,
                g.map(|g| format!("≤ {g}×")).unwrap_or_default(),
                r.failed.as_ref().map(|e| format!(" (then failed: {})", e.replace('|', "\\|"))).unwrap_or_default(),
                mib(crss),
                if row == "plan" { "–".into() } else { mib(arss) },
                mib(brss),
            ));
        }
    }
    s
}

/// A scratch directory (mode 0700: the state and run dirs must not be group/other-writable),
/// removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::read_dir(self.0.join("run").join("ns")) {
            for e in dir.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !common::asked("cli", &args) {
        return;
    }
    let cfg = common::or_exit("cli", Config::from_env());
    reap_stale_namespaces("ctg-cli");
    let base = Scratch(std::env::temp_dir().join(format!("ctg-cli-{}", std::process::id())));
    for d in ["", "state", "run", "tmp"] {
        let p = base.0.join(d);
        if let Err(e) = std::fs::create_dir_all(&p) {
            eprintln!("cli bench: {}: {e}", p.display());
            std::process::exit(1);
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700));
    }
    let mut cli = Cli {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_ctguard")),
        state: base.0.join("state"),
        run: base.0.join("run"),
        scratch: base.0.join("tmp"),
        fg: None,
    };
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    let mut out = String::new();
    let mut fatal = None;
    // Sizes outer, backends inner: a run cut short still has every backend at the small sizes.
    let mut results: Vec<(&'static str, Vec<(usize, Rows)>)> = cfg.backends.iter().map(|b| (*b, Vec::new())).collect();
    'all: for &n in &cfg.sizes {
        for (backend, res) in results.iter_mut() {
            eprintln!("cli bench: {backend}, {n} rules, {} runs", cfg.runs_for(n));
            let t = Instant::now();
            match bench_size(&cfg, backend, n, &mut cli, &base.0) {
                Ok(rows) => res.push((n, rows)),
                Err(e) => {
                    eprintln!("cli bench: {backend} {n}: FAILED: {e}");
                    fatal = Some(format!("{backend} {n}: {e}"));
                    let _ = cli.stop_agents();
                    break 'all;
                }
            }
            eprintln!("cli bench: {backend} {n}: {:.0} s\n{}", t.elapsed().as_secs_f64(), report(backend, res));
        }
    }
    for (backend, res) in &results {
        out.push_str(&report(backend, res));
        out.push('\n');
    }
    let _ = cli.stop_agents();
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!();
    println!("# ctguard whole-CLI bench{}", if cfg.quick { " (QUICK smoke run)" } else { "" });
    println!(
        "sizes {:?}; runs per size: {} (ctguard and the bare tool alternate which goes first); binary {}",
        cfg.sizes,
        cfg.sizes.iter().map(|&n| format!("{}: {}", size_name(n), cfg.runs_for(n))).collect::<Vec<_>>().join(", "),
        cli.exe.display()
    );
    println!();
    print!("{out}");
    println!(
        "took {:.0} s; loadavg at the start: {}; at the end: {}",
        started.elapsed().as_secs_f64(),
        load0.trim(),
        load1.trim()
    );
    drop(base);
    if let Some(e) = fatal {
        eprintln!("cli bench: FAILED: {e}");
        std::process::exit(1);
    }
}
