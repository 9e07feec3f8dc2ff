//! Transaction benchmark (`cargo bench --bench transactions`, as root). Not a timed test: it
//! measures and prints one Markdown table of medians and ratios, the source of
//! `BENCHMARKS.md`. Goals (issue 3): apply ≤ 1.10× bare `nft -f`, rollback ≤ 1.10× bare
//! restore, deadline slip ≤ 50 ms, idle agent RSS ≤ 10 MiB.
//!
//! What it measures, each phase on its own, every run in a fresh network namespace it creates
//! (`ctg-bench-PID-N`, deleted on drop, also when a run fails; nothing touches the host's
//! firewall):
//! 1. policy transactions (`backend::policy_txn`) behind a host ruleset of 1k and 10k rules
//!    (named sets, a drop policy and a final drop, so an insertion is planned): prepare, apply,
//!    verify (`listing`), check_rollback, rollback — against bare `nft -f` of the same content
//!    (`replace_script(table_for(..))` + the plan's `nft_script()`) and of its restore, run in
//!    the same namespace in alternating order;
//! 2. ruleset transactions (`agent::ruleset_engine::RulesetEngine`): an nft file of 1k/10k rules
//!    (named sets) against bare `nft -f` of the file and of the prior ruleset, and an
//!    iptables-restore dump of 1k/10k rules against bare `iptables-nft-restore`;
//! 3. deadline slip through the release binary and its detached agent: `apply --timeout 2s`,
//!    then the agent log's "deadline reached" (rollback starts) and "rolled back" lines against
//!    the journaled CLOCK_BOOTTIME deadline;
//! 4. the idle agent with one transaction pending: VmRSS, and context switches over 3 s.
//!
//! Only `cargo bench` measures: it passes `--bench`. `cargo test --all-targets` (or `--benches`)
//! also runs this binary, without `--bench`; then (unless `CTGUARD_BENCH=1`) `main` prints
//! "not run" and returns at once. A plain `cargo test` does not build it. `CTGUARD_BENCH_QUICK=1` is a smoke run (1k only,
//! two runs, two slips); `CTGUARD_BENCH_RUNS=N` sets the number of runs,
//! `CTGUARD_BENCH_SIZES=1000,10000` the rule counts, `CTGUARD_BENCH_ONLY=policy,ruleset,slip,rss`
//! the sections.

#[path = "common.rs"]
mod common;
use common::{exec, reap_stale_namespaces, BenchNs};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ctguard::agent::engine::{ApplyInput, Engine, RulesetInput};
use ctguard::agent::ruleset_engine::RulesetEngine;
use ctguard::backend::policy_txn::{apply, check_rollback, listing, prepare, rollback, PolicyRequest};
use ctguard::model::auto::MachineFacts;
use ctguard::model::names::Tag;
use ctguard::model::Policy;
use ctguard::render::nft_ir::table_for;
use ctguard::render::nft_script::replace_script;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    runs: usize,
    sizes: Vec<usize>,
    slips: usize,
    quick: bool,
    /// Sections to run (`CTGUARD_BENCH_ONLY=policy,ruleset,slip,rss`; all by default).
    sections: Vec<String>,
}

impl Config {
    fn runs_section(&self, name: &str) -> bool {
        self.sections.iter().any(|s| s == name)
    }
}

impl Config {
    fn from_env() -> Config {
        let quick = std::env::var("CTGUARD_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
        let runs = std::env::var("CTGUARD_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).filter(|&n: &usize| n > 0);
        let sizes: Option<Vec<usize>> = std::env::var("CTGUARD_BENCH_SIZES")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).filter(|&n| n >= 10).collect());
        let sections = std::env::var("CTGUARD_BENCH_ONLY").unwrap_or_default();
        let only = |name: &str| sections.is_empty() || sections.split(',').any(|x| x.trim() == name);
        let mut c = if quick {
            Config { runs: runs.unwrap_or(2), sizes: vec![1000], slips: 2, quick, sections: Vec::new() }
        } else {
            Config {
                runs: runs.unwrap_or(7),
                sizes: vec![1000, 10000],
                slips: runs.unwrap_or(7),
                quick,
                sections: Vec::new(),
            }
        };
        if let Some(s) = sizes.filter(|s| !s.is_empty()) {
            c.sizes = s;
        }
        c.sections = ["policy", "ruleset", "slip", "rss"].into_iter().filter(|n| only(n)).map(str::to_string).collect();
        c
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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

/// `exec` with `stdin`, timed.
fn timed_exec_stdin(tool: &str, args: &[&str], stdin: &[u8]) -> Result<f64, String> {
    let t = Instant::now();
    exec(tool, args, Some(stdin))?;
    Ok(ms(t.elapsed()))
}

/// `exec`, timed.
fn timed_exec(tool: &str, args: &[&str]) -> Result<f64, String> {
    let t = Instant::now();
    exec(tool, args, None)?;
    Ok(ms(t.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// Rulesets

/// The host firewall the policy transactions insert into: `table inet host`, an input chain of
/// `n` rules (named sets only; DNS accepted as `ct state new`), policy drop and a final counted
/// drop: the planner inserts ctguard's `ct state untracked` accepts before it.
fn host_ruleset(n: usize) -> String {
    let mut s = String::from(
        "table inet host {\n\tset trusted4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.0.0.0/8, 192.168.0.0/16 }\n\t}\n\
         \tset trusted6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00::/8 }\n\t}\n\
         \tset blocked4 {\n\t\ttype ipv4_addr\n\t\telements = { 203.0.113.1, 203.0.113.2 }\n\t}\n\
         \tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\
         \t\tct state established,related accept\n\t\tiif \"lo\" accept\n",
    );
    for i in 0..n.saturating_sub(5) {
        let port = 1024 + i;
        let _ = match i % 3 {
            0 => writeln!(s, "\t\tip saddr @trusted4 tcp dport {port} ct state new accept"),
            1 => writeln!(s, "\t\tip6 saddr @trusted6 tcp dport {port} ct state new accept"),
            _ => writeln!(s, "\t\tip saddr @blocked4 tcp dport {port} drop"),
        };
    }
    // DNS accepted as new: what the planner protects once port 53 is untracked.
    s.push_str("\t\tudp dport 53 ct state new accept\n\t\ttcp dport 53 ct state new accept\n");
    s.push_str("\t\tcounter packets 0 bytes 0 drop\n\t}\n}\n");
    s
}

/// What a ruleset transaction finds before (small, so the restore is cheap and comparable).
const PRIOR_NFT: &str = include_str!("../stateful-catchall.nft");

/// An `nft -f` file replacing the whole ruleset with one of `n` rules (named sets).
fn nft_ruleset_file(n: usize) -> String {
    let mut s = String::from(
        "flush ruleset\ntable inet fw {\n\tset trusted4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.0.0.0/8, 192.168.0.0/16 }\n\t}\n\
         \tset trusted6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00::/8 }\n\t}\n\
         \tset web {\n\t\ttype inet_service\n\t\telements = { 80, 443, 8080 }\n\t}\n\
         \tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\
         \t\tct state established,related accept\n\t\tiif \"lo\" accept\n",
    );
    for i in 0..n.saturating_sub(3) {
        let port = 1024 + i;
        let _ = match i % 3 {
            0 => writeln!(s, "\t\tip saddr @trusted4 tcp dport {port} ct state new accept"),
            1 => writeln!(s, "\t\tip6 saddr @trusted6 udp dport {port} accept"),
            _ => writeln!(s, "\t\tip saddr @trusted4 tcp dport @web ip dscp {} accept", i % 64),
        };
    }
    s.push_str("\t\tcounter drop\n\t}\n}\n");
    s
}

/// What an iptables ruleset transaction finds before: a small iptables-nft filter table.
const PRIOR_IPT: &str = "*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
";

/// An iptables-restore dump of `n` rules in `filter`.
fn ipt_dump(n: usize) -> String {
    let mut s = String::from(
        "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n",
    );
    for i in 0..n.saturating_sub(3) {
        let port = 1024 + i;
        let (a, b) = ((i / 250) % 250, i % 250);
        let _ = match i % 2 {
            0 => writeln!(
                s,
                "-A INPUT -s 10.{a}.{b}.0/24 -p tcp -m tcp --dport {port} -m conntrack --ctstate NEW -j ACCEPT"
            ),
            _ => writeln!(s, "-A INPUT -s 10.{a}.{b}.0/24 -p udp -m udp --dport {port} -j ACCEPT"),
        };
    }
    s.push_str("-A INPUT -j DROP\nCOMMIT\n");
    s
}

/// `iptables-nft-save` without its `#` comment lines (the dump's timestamp).
fn ipt_nft_save() -> Result<String, String> {
    Ok(exec("iptables-nft-save", &[], None)?
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Results

/// One row of the table (cells as printed).
struct Row {
    phase: String,
    size: String,
    ours: String,
    reference: String,
    bare: String,
    ratio: String,
    goal: String,
    met: String,
}

impl Row {
    /// A timed phase: medians, their ratio and, with a goal, whether the ratio meets it.
    fn timing(phase: &str, size: usize, ours: &[f64], reference: &str, bare: &[f64], goal: Option<f64>) -> Row {
        let (o, b) = (median(ours), median(bare));
        // Paired: each run's ctguard time over the bare time measured next to it in the same
        // namespace, so load from elsewhere that changes between runs cancels out.
        let ratio = if !ours.is_empty() && ours.len() == bare.len() && bare.iter().all(|&x| x > 0.0) {
            let r: Vec<f64> = ours.iter().zip(bare).map(|(a, b)| a / b).collect();
            median(&r)
        } else {
            match (o, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            }
        };
        let met = match (goal, ratio) {
            (Some(g), Some(x)) if x <= g => "yes".to_string(),
            (Some(_), Some(_)) => "**no**".to_string(),
            _ => String::new(),
        };
        Row {
            phase: phase.into(),
            size: size_label(size),
            ours: fmt_ms(o),
            reference: reference.into(),
            bare: fmt_ms(b),
            ratio: ratio.map_or("—".into(), |x| format!("{x:.2}×")),
            goal: goal.map_or("—".into(), |g| format!("≤ {g:.2}×")),
            met,
        }
    }

    /// A measured value with an absolute goal.
    fn value(phase: &str, size: &str, ours: String, goal: &str, met: String) -> Row {
        Row {
            phase: phase.into(),
            size: size.into(),
            ours,
            reference: "—".into(),
            bare: "—".into(),
            ratio: "—".into(),
            goal: goal.into(),
            met,
        }
    }

    fn note(mut self, note: &str) -> Row {
        if !note.is_empty() {
            self.met = if self.met.is_empty() { note.to_string() } else { format!("{}; {note}", self.met) };
        }
        self
    }
}

fn size_label(n: usize) -> String {
    if n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 100.0 => format!("{x:.0} ms"),
        Some(x) => format!("{x:.1} ms"),
        None => "—".into(),
    }
}

fn print_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| phase | rules | ctguard (median) | bare reference | bare (median) | ratio | goal | met / notes |\n");
    s.push_str("| --- | --- | ---: | --- | ---: | ---: | --- | --- |\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.phase, r.size, r.ours, r.reference, r.bare, r.ratio, r.goal, r.met
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// 1. Policy transactions

#[derive(Default)]
struct PolicySamples {
    load: Vec<f64>,
    prepare: Vec<f64>,
    apply: Vec<f64>,
    verify: Vec<f64>,
    check: Vec<f64>,
    rollback: Vec<f64>,
    bare_check: Vec<f64>,
    bare_apply: Vec<f64>,
    bare_list: Vec<f64>,
    bare_check_restore: Vec<f64>,
    bare_restore: Vec<f64>,
    list_a: Vec<f64>,
    list_j: Vec<f64>,
    mismatches: usize,
}

fn facts() -> MachineFacts {
    MachineFacts::with_ram(ctguard::sysctl::mem_total_bytes().unwrap_or(8 << 30))
}

/// (family, table, chain, handle) of every rule commented `tag` outside `table inet ctguard`.
fn tagged_rules(tag: &str) -> Result<Vec<(String, String, String, u64)>, String> {
    let text = exec("nft", &["-a", "list", "ruleset"], None)?;
    let (mut family, mut table, mut chain) = (String::new(), String::new(), String::new());
    let mut out = Vec::new();
    let needle = format!("comment \"{tag}\"");
    for l in text.lines().map(str::trim) {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["table", f, t, ..] => (family, table) = (f.to_string(), t.to_string()),
            ["chain", c, ..] => chain = c.to_string(),
            _ if l.contains(&needle) && table != "ctguard" => {
                if let Some(h) = l.rsplit_once("# handle ").and_then(|(_, h)| h.trim().parse().ok()) {
                    out.push((family.clone(), table.clone(), chain.clone(), h));
                }
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(format!("no rule tagged {tag} outside table inet ctguard"));
    }
    Ok(out)
}

/// One policy run in `ns` (host ruleset loaded); ctguard first when `ours_first`.
fn policy_run(tmp: &Path, size: usize, run: usize, ours_first: bool, s: &mut PolicySamples) -> Result<(), String> {
    let policy = Policy::builtin();
    let req = |id: &str| -> Result<PolicyRequest, String> {
        Ok(PolicyRequest { policy: policy.clone(), tag: Tag::new(id)?, force: false, ssh: None, previous: None })
    };
    let before = listing(&[]).map_err(|e| chain(&e))?;

    // Bare nft: the same content ctguard applies, and its restore.
    let bare = |s: &mut PolicySamples, plan_script: &str, tag: &Tag| -> Result<(), String> {
        let script = format!("{}{}", replace_script(&table_for(&policy, tag)), plan_script);
        let apply_file = tmp.join(format!("policy-apply-{size}-{run}.nft"));
        std::fs::write(&apply_file, &script).map_err(|e| e.to_string())?;
        let f = apply_file.display().to_string();
        s.bare_check.push(timed_exec("nft", &["-c", "-f", &f])?);
        s.bare_apply.push(timed_exec("nft", &["-f", &f])?);
        s.bare_list.push(timed_exec("nft", &["list", "ruleset"])?);
        // ctguard's rollback script, for the rules as bare nft left them: the table
        // deleted, every tagged rule deleted by the handle a listing gives.
        let mut restore = String::from("table inet ctguard\ndelete table inet ctguard\n");
        for (family, table, chain, handle) in tagged_rules(tag.as_str())? {
            let _ = writeln!(restore, "delete rule {family} {table} {chain} handle {handle}");
        }
        let restore_file = tmp.join(format!("policy-restore-{size}-{run}.nft"));
        std::fs::write(&restore_file, &restore).map_err(|e| e.to_string())?;
        let rf = restore_file.display().to_string();
        s.bare_check_restore.push(timed_exec("nft", &["-c", "-f", &rf])?);
        s.bare_restore.push(timed_exec("nft", &["-f", &rf])?);
        let after = listing(&[]).map_err(|e| chain(&e))?;
        if after != before {
            s.mismatches += 1;
            eprintln!("bench: bare restore did not give the prior listing back ({size} rules, run {run})");
        }
        Ok(())
    };

    let ours = |s: &mut PolicySamples, id: &str| -> Result<String, String> {
        let r = req(id)?;
        let t = Instant::now();
        let p = prepare(&r, facts()).map_err(|e| chain(&e))?;
        s.prepare.push(ms(t.elapsed()));
        let plan_script = p.plan.nft_script();
        let expected = format!("{}{}", replace_script(&table_for(&policy, &r.tag)), plan_script);
        if p.nft_script != expected {
            return Err(format!(
                "prepared nft_script differs from replace_script + plan:\n{}\n---\n{expected}",
                p.nft_script
            ));
        }
        if plan_script.is_empty() {
            return Err("the planner planned no insertion into inet host input".into());
        }
        let t = Instant::now();
        let undo = apply(&p).map_err(|e| chain(&e))?;
        s.apply.push(ms(t.elapsed()));
        if undo.nft_insertions.is_empty() || undo.nft_insertions.iter().any(|i| i.handle.is_none()) {
            return Err(format!("apply: insertions without handles: {:?}", undo.nft_insertions));
        }
        let t = Instant::now();
        let _after = listing(&[]).map_err(|e| chain(&e))?;
        s.verify.push(ms(t.elapsed()));
        let t = Instant::now();
        check_rollback(&undo).map_err(|e| chain(&e))?;
        s.check.push(ms(t.elapsed()));
        let t = Instant::now();
        rollback(&undo).map_err(|e| chain(&e))?;
        s.rollback.push(ms(t.elapsed()));
        let after = listing(&[]).map_err(|e| chain(&e))?;
        if after != before {
            s.mismatches += 1;
            eprintln!("bench: ctguard rollback did not give the prior listing back ({size} rules, run {run})");
        }
        Ok(plan_script)
    };

    if ours_first {
        // The plan's rules carry ctguard's tag (gone again after its rollback).
        let id = format!("bench-p{size}-{run}");
        let plan_script = ours(s, &id)?;
        bare(s, &plan_script, &Tag::new(&id)?)?;
    } else {
        // The plan first (untimed: a prepare changes nothing), then bare, then ctguard.
        let r = req(&format!("bench-p{size}-{run}-bare"))?;
        let p = prepare(&r, facts()).map_err(|e| chain(&e))?;
        bare(s, &p.plan.nft_script(), &r.tag)?;
        ours(s, &format!("bench-p{size}-{run}"))?;
    }
    // Where ctguard's time goes: the listings it reads besides the netlink batch.
    s.list_a.push(timed_exec("nft", &["-a", "list", "ruleset"])?);
    s.list_j.push(timed_exec("nft", &["-j", "list", "ruleset"])?);
    Ok(())
}

fn bench_policy(cfg: &Config, tmp: &Path, rows: &mut Vec<Row>) {
    for &size in &cfg.sizes {
        let mut s = PolicySamples::default();
        let mut error = None;
        let host = host_ruleset(size);
        let host_file = tmp.join(format!("host-{size}.nft"));
        if let Err(e) = std::fs::write(&host_file, &host) {
            error = Some(e.to_string());
        }
        for run in 0..cfg.runs {
            if error.is_some() {
                break;
            }
            eprintln!("bench: policy transaction, {size} host rules, run {}/{}", run + 1, cfg.runs);
            let res = BenchNs::new("ctg-bench").and_then(|ns| {
                ns.run(|| -> Result<(), String> {
                    let f = host_file.display().to_string();
                    s.load.push(timed_exec("nft", &["-f", &f])?);
                    policy_run(tmp, size, run, run % 2 == 0, &mut s)
                })?
            });
            if let Err(e) = res {
                eprintln!("bench: policy run failed: {e}");
                error = Some(e);
            }
        }
        let note = match (&error, s.mismatches) {
            (Some(e), _) => format!("failed: {}", first_line(e)),
            (None, 0) => String::new(),
            (None, n) => format!("{n} listing mismatch(es) after rollback"),
        };
        rows.push(
            Row::timing(
                "policy: prepare (snapshot, plan, lint, checks)",
                size,
                &s.prepare,
                "`nft -c -f` same script",
                &s.bare_check,
                None,
            )
            .note(&note),
        );
        rows.push(Row::timing("policy: apply", size, &s.apply, "`nft -f` same script", &s.bare_apply, Some(1.10)));
        rows.push(Row::timing("policy: verify (`listing`)", size, &s.verify, "`nft list ruleset`", &s.bare_list, None));
        rows.push(Row::timing(
            "policy: check rollback",
            size,
            &s.check,
            "`nft -c -f` restore",
            &s.bare_check_restore,
            None,
        ));
        rows.push(Row::timing("policy: rollback", size, &s.rollback, "`nft -f` restore", &s.bare_restore, Some(1.10)));
        rows.push(
            Row::timing("(component) `nft -a list ruleset`", size, &s.list_a, "—", &[], None)
                .note("read by prepare; by apply only when a handle was not echoed; by (check) rollback only to put a previous transaction's rules back"),
        );
        rows.push(
            Row::timing("(component) `nft -j list ruleset`", size, &s.list_j, "—", &[], None)
                .note("read by prepare; by (check) rollback only to put a previous transaction's rules back"),
        );
        rows.push(Row::timing("(setup) load host ruleset, `nft -f`", size, &s.load, "—", &[], None));
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.len() > 160 {
        format!("{}…", &l[..l.char_indices().nth(160).map_or(l.len(), |(i, _)| i)])
    } else {
        l.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Ruleset transactions

#[derive(Default)]
struct RulesetSamples {
    snapshot: Vec<f64>,
    apply: Vec<f64>,
    verify: Vec<f64>,
    check: Vec<f64>,
    rollback: Vec<f64>,
    bare_check: Vec<f64>,
    bare_apply: Vec<f64>,
    bare_restore: Vec<f64>,
    mismatches: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RsKind {
    Nft,
    Iptables,
}

/// The prior state as comparable text.
fn rs_state(kind: RsKind) -> Result<String, String> {
    match kind {
        RsKind::Nft => exec("nft", &["list", "ruleset"], None),
        RsKind::Iptables => Ok(format!("{}{}", exec("nft", &["list", "tables"], None)?, ipt_nft_save()?)),
    }
}

/// Fails unless the ruleset file of `size` rules is in place (untimed).
fn applied_check(kind: RsKind, size: usize) -> Result<(), String> {
    let n = match kind {
        RsKind::Nft => exec("nft", &["list", "chain", "inet", "fw", "input"], None)?
            .lines()
            .filter(|l| l.trim_end().ends_with("accept") || l.trim_end().ends_with("drop"))
            .count(),
        RsKind::Iptables => ipt_nft_save()?.lines().filter(|l| l.starts_with("-A INPUT")).count(),
    };
    if n + 1 < size {
        return Err(format!("after apply {n} rules are in place, not {size}"));
    }
    Ok(())
}

fn ruleset_run(
    kind: RsKind,
    file: &Path,
    text: &str,
    size: usize,
    run: usize,
    ours_first: bool,
    s: &mut RulesetSamples,
) -> Result<(), String> {
    let f = file.display().to_string();
    // Prior state.
    let prior_file = file.with_extension("prior");
    match kind {
        RsKind::Nft => {
            std::fs::write(&prior_file, PRIOR_NFT).map_err(|e| e.to_string())?;
            exec("nft", &["-f", &prior_file.display().to_string()], None)?;
        }
        RsKind::Iptables => {
            exec("iptables-nft-restore", &["-w"], Some(PRIOR_IPT.as_bytes()))?;
        }
    }
    let before = rs_state(kind)?;
    // The bare restore: what the prior state's own save gives back.
    let restore_file = file.with_extension("restore");
    let restore = match kind {
        RsKind::Nft => format!("flush ruleset\n{}", exec("nft", &["list", "ruleset"], None)?),
        RsKind::Iptables => ipt_nft_save()?,
    };
    std::fs::write(&restore_file, &restore).map_err(|e| e.to_string())?;
    let rf = restore_file.display().to_string();

    let bare = |s: &mut RulesetSamples| -> Result<(), String> {
        match kind {
            RsKind::Nft => {
                s.bare_check.push(timed_exec("nft", &["-c", "-f", &f])?);
                s.bare_apply.push(timed_exec("nft", &["-f", &f])?);
                applied_check(kind, size)?;
                s.bare_restore.push(timed_exec("nft", &["-f", &rf])?);
            }
            RsKind::Iptables => {
                // On stdin: `-w FILE` would read FILE as the wait time.
                s.bare_check.push(timed_exec_stdin("iptables-nft-restore", &["-w", "--test"], text.as_bytes())?);
                s.bare_apply.push(timed_exec_stdin("iptables-nft-restore", &["-w"], text.as_bytes())?);
                applied_check(kind, size)?;
                s.bare_restore.push(timed_exec_stdin("iptables-nft-restore", &["-w"], restore.as_bytes())?);
            }
        }
        if rs_state(kind)? != before {
            s.mismatches += 1;
            eprintln!("bench: bare restore did not give the prior state back ({size} rules, run {run})");
        }
        Ok(())
    };
    let ours = |s: &mut RulesetSamples| -> Result<(), String> {
        let engine = RulesetEngine;
        let input = ApplyInput {
            policy: Policy::builtin(),
            ruleset: Some(RulesetInput {
                text: text.to_string(),
                format: if kind == RsKind::Nft { "nft" } else { "iptables" }.into(),
            }),
            tag: Tag::new(&format!("bench-r{size}-{run}"))?,
            force: false,
            ssh: None,
            previous_undo: None,
            facts: facts(),
        };
        let err = |e: ctguard::agent::engine::EngineError| format!("{} (exit {:?})", e.message, e.exit);
        let t = Instant::now();
        let p = engine.prepare(&input).map_err(err)?;
        s.snapshot.push(ms(t.elapsed()));
        let t = Instant::now();
        let undo = p.apply().map_err(err)?;
        s.apply.push(ms(t.elapsed()));
        applied_check(kind, size)?;
        let t = Instant::now();
        engine.listing(&undo).map_err(err)?;
        s.verify.push(ms(t.elapsed()));
        let t = Instant::now();
        engine.check_rollback(&undo).map_err(err)?;
        s.check.push(ms(t.elapsed()));
        let t = Instant::now();
        engine.rollback(&undo).map_err(err)?;
        s.rollback.push(ms(t.elapsed()));
        if rs_state(kind)? != before {
            s.mismatches += 1;
            eprintln!("bench: ctguard rollback did not give the prior state back ({size} rules, run {run})");
        }
        Ok(())
    };
    if ours_first {
        ours(s)?;
        bare(s)
    } else {
        bare(s)?;
        ours(s)
    }
}

fn bench_ruleset(cfg: &Config, tmp: &Path, rows: &mut Vec<Row>) {
    for kind in [RsKind::Nft, RsKind::Iptables] {
        for &size in &cfg.sizes {
            let (label, text, ext) = match kind {
                RsKind::Nft => ("ruleset nft", nft_ruleset_file(size), "nft"),
                RsKind::Iptables => ("ruleset iptables", ipt_dump(size), "rules"),
            };
            let file = tmp.join(format!("ruleset-{size}.{ext}"));
            let mut s = RulesetSamples::default();
            let mut error = std::fs::write(&file, &text).err().map(|e| e.to_string());
            for run in 0..cfg.runs {
                if error.is_some() {
                    break;
                }
                eprintln!("bench: {label}, {size} rules, run {}/{}", run + 1, cfg.runs);
                let res = BenchNs::new("ctg-bench")
                    .and_then(|ns| ns.run(|| ruleset_run(kind, &file, &text, size, run, run % 2 == 0, &mut s))?);
                if let Err(e) = res {
                    eprintln!("bench: {label} run failed: {e}");
                    error = Some(e);
                }
            }
            let (apply_ref, restore_ref, check_ref) = match kind {
                RsKind::Nft => ("`nft -f` the file", "`nft -f` prior ruleset", "`nft -c -f` the file"),
                RsKind::Iptables => (
                    "`iptables-nft-restore` the dump",
                    "`iptables-nft-restore` prior save",
                    "`iptables-nft-restore --test`",
                ),
            };
            if let Some(e) = &error {
                if s.apply.is_empty() {
                    rows.push(
                        Row::timing(&format!("{label}: all phases"), size, &[], apply_ref, &s.bare_apply, None)
                            .note(&format!("not measured (ruleset engine not available: {})", first_line(e))),
                    );
                    continue;
                }
            }
            let note = match (&error, s.mismatches) {
                (Some(e), _) => format!("failed: {}", first_line(e)),
                (None, 0) => String::new(),
                (None, n) => format!("{n} state mismatch(es) after rollback"),
            };
            rows.push(
                Row::timing(&format!("{label}: snapshot (prepare)"), size, &s.snapshot, check_ref, &s.bare_check, None)
                    .note(&note),
            );
            rows.push(Row::timing(&format!("{label}: apply"), size, &s.apply, apply_ref, &s.bare_apply, Some(1.10)));
            rows.push(Row::timing(&format!("{label}: verify (`listing`)"), size, &s.verify, "—", &[], None));
            rows.push(Row::timing(&format!("{label}: check rollback"), size, &s.check, "—", &[], None));
            rows.push(Row::timing(
                &format!("{label}: rollback"),
                size,
                &s.rollback,
                restore_ref,
                &s.bare_restore,
                Some(1.10),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3 and 4. The real binary and its detached agent

struct Cli {
    exe: PathBuf,
    state: PathBuf,
    run: PathBuf,
}

impl Cli {
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
        serde_json::from_str(stdout.trim()).map_err(|e| {
            format!(
                "ctguard {} ({}): not JSON ({e}): {} {}",
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }

    fn apply(&self, ns: &str, timeout: &str) -> Result<String, String> {
        let v = self.cmd(&["apply", "--netns", ns, "--timeout", timeout])?;
        v["data"]["txid"].as_str().map(str::to_string).ok_or_else(|| format!("apply answered {v}"))
    }

    fn record(&self, txid: &str) -> Result<Value, String> {
        let p = self.state.join("txn").join(format!("{txid}.json"));
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
    }

    fn agent_pid(&self) -> Option<i32> {
        let v = self.cmd(&["status"]).ok()?;
        v["data"]["agent_pid"].as_i64().and_then(|p| i32::try_from(p).ok())
    }

    /// Waits for the agent `pid` (started by this bench through the CLI) to exit; SIGTERM after
    /// `wait` (it rolls back anything pending first), then waits again.
    fn wait_agent_exit(&self, pid: i32, wait: Duration) -> String {
        let gone = |d: Duration| {
            let t = Instant::now();
            while t.elapsed() < d {
                if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        };
        if gone(wait) {
            return "exited by itself".into();
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        if gone(Duration::from_secs(10)) {
            format!("did not exit within {} s; stopped with SIGTERM", wait.as_secs())
        } else {
            format!("agent {pid} still running after SIGTERM")
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .unwrap_or(false)
}

/// CLOCK_REALTIME − CLOCK_BOOTTIME in nanoseconds (both host-wide).
fn realtime_minus_boottime() -> Result<i128, String> {
    use nix::time::{clock_gettime, ClockId};
    let ns = |c| clock_gettime(c).map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()));
    let r0 = ns(ClockId::CLOCK_REALTIME).map_err(|e| e.to_string())?;
    let b = ns(ClockId::CLOCK_BOOTTIME).map_err(|e| e.to_string())?;
    let r1 = ns(ClockId::CLOCK_REALTIME).map_err(|e| e.to_string())?;
    Ok((r0 + r1) / 2 - b)
}

/// `2026-01-02T03:04:05.123456Z` (tracing-subscriber's timer) → Unix nanoseconds.
fn parse_rfc3339_ns(s: &str) -> Option<i128> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
    let nanos: i128 = format!("{digits:0<9}")[..9].parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(i128::from(days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000_000 + nanos)
}

/// The first agent-log line mentioning `txid` and `needle`: its time in Unix nanoseconds.
fn log_time(log: &str, txid: &str, needle: &str) -> Option<i128> {
    log.lines()
        .filter(|l| l.contains(txid) && l.contains(needle))
        .find_map(|l| parse_rfc3339_ns(l.split_whitespace().next()?))
}

fn bench_slip(cfg: &Config, cli: &Cli, rows: &mut Vec<Row>) {
    let mut start = Vec::new();
    let mut done = Vec::new();
    let mut error = None;
    for run in 0..cfg.slips {
        eprintln!("bench: deadline slip, run {}/{}", run + 1, cfg.slips);
        let res = (|| -> Result<(f64, f64), String> {
            let ns = BenchNs::new("ctg-bench")?;
            ns.run(|| exec("nft", &["-f", "-"], Some(PRIOR_NFT.as_bytes())))??;
            let txid = cli.apply(&ns.name, "2s")?;
            let rec = cli.record(&txid)?;
            let deadline_bt =
                rec["deadline"]["boottime_ns"].as_u64().ok_or_else(|| format!("no deadline in {txid}"))?;
            let deadline = i128::from(deadline_bt) + realtime_minus_boottime()?;
            // Poll the journal file (no socket traffic to the agent meanwhile).
            let t = Instant::now();
            loop {
                let state = cli.record(&txid).map(|r| r["state"].clone()).unwrap_or(Value::Null);
                let s = state.to_string();
                if s.contains("rolled_back") || s.contains("ROLLED_BACK") || s.contains("RolledBack") {
                    break;
                }
                if t.elapsed() > Duration::from_secs(60) {
                    return Err(format!("{txid} not rolled back 60 s after apply (state {s})"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // The journal says ROLLED_BACK just before the agent logs it.
            let t = Instant::now();
            loop {
                let log = std::fs::read_to_string(cli.run.join("agent.log")).map_err(|e| e.to_string())?;
                let fired = log_time(&log, &txid, "deadline reached");
                let rolled = log_time(&log, &txid, "rolled back");
                if let (Some(f), Some(r)) = (fired, rolled) {
                    return Ok(((f - deadline) as f64 / 1e6, (r - deadline) as f64 / 1e6));
                }
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(format!(
                        "agent.log lacks the {} line for {txid}",
                        if fired.is_none() { "'deadline reached'" } else { "'rolled back'" }
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })();
        match res {
            Ok((a, b)) => {
                eprintln!("bench: slip {a:.1} ms to rollback start, {b:.1} ms to rolled back");
                start.push(a);
                done.push(b);
            }
            Err(e) => {
                eprintln!("bench: slip run failed: {e}");
                error = Some(e);
                break;
            }
        }
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if v.is_empty() {
            String::new()
        } else {
            format!("min {lo:.1}, max {hi:.1} ms over {} runs", v.len())
        }
    };
    let m = median(&start);
    let met = match (&error, m) {
        (Some(e), _) => format!("failed: {}", first_line(e)),
        (None, Some(x)) => format!("{}; {}", if x <= 50.0 { "yes" } else { "**no**" }, spread(&start)),
        (None, None) => String::new(),
    };
    rows.push(Row::value("deadline slip: deadline → rollback starts", "builtin policy", fmt_ms(m), "≤ 50 ms", met));
    rows.push(Row::value(
        "deadline → rolled back (complete)",
        "builtin policy",
        fmt_ms(median(&done)),
        "—",
        spread(&done),
    ));
}

/// Per-thread (comm, voluntary, nonvoluntary) context switches of `pid`.
fn ctxt_switches(pid: i32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for e in dir.flatten() {
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let field = |k: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
                .unwrap_or_default()
        };
        let name = format!("{}/{}", field("Name:"), e.file_name().to_string_lossy());
        out.push((
            name,
            field("voluntary_ctxt_switches:").parse().unwrap_or(0),
            field("nonvoluntary_ctxt_switches:").parse().unwrap_or(0),
        ));
    }
    out.sort();
    out
}

fn status_kib(pid: i32, key: &str) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The idle agent, measured.
struct Idle {
    rss_kib: u64,
    hwm_kib: u64,
    switches: u64,
    detail: String,
}

fn bench_rss(cli: &Cli, rows: &mut Vec<Row>) {
    eprintln!("bench: idle agent RSS and wake-ups (one pending transaction)");
    let res = (|| -> Result<Idle, String> {
        let ns = BenchNs::new("ctg-bench")?;
        ns.run(|| exec("nft", &["-f", "-"], Some(PRIOR_NFT.as_bytes())))??;
        let txid = cli.apply(&ns.name, "10m")?;
        let result = (|| -> Result<Idle, String> {
            let pid = cli.agent_pid().ok_or("status --json gave no agent_pid")?;
            // Past the idle check the status request scheduled (2 s after the last activity).
            std::thread::sleep(Duration::from_secs(4));
            let c0 = ctxt_switches(pid);
            std::thread::sleep(Duration::from_secs(3));
            let c1 = ctxt_switches(pid);
            let rss_kib = status_kib(pid, "VmRSS:").ok_or("no VmRSS")?;
            let hwm_kib = status_kib(pid, "VmHWM:").unwrap_or(0);
            let mut woke = Vec::new();
            let mut switches = 0;
            for (name, v1, n1) in &c1 {
                let (v0, n0) = c0.iter().find(|(n, _, _)| n == name).map_or((0, 0), |(_, v, n)| (*v, *n));
                let d = (v1 + n1).saturating_sub(v0 + n0);
                if d > 0 {
                    switches += d;
                    woke.push(format!("{name} +{d}"));
                }
            }
            let detail = if woke.is_empty() {
                format!("voluntary+nonvoluntary ctxt switches unchanged in all {} threads", c1.len())
            } else {
                format!("switches in {} threads: {}", c1.len(), woke.join(", "))
            };
            Ok(Idle { rss_kib, hwm_kib, switches, detail })
        })();
        // Roll back and let the agent exit, whatever happened above.
        let pid = cli.agent_pid();
        if let Err(e) = cli.cmd(&["rollback", &txid]) {
            eprintln!("bench: rollback {txid}: {e}");
        }
        if let Some(pid) = pid {
            eprintln!("bench: agent {pid}: {}", cli.wait_agent_exit(pid, Duration::from_secs(20)));
        }
        result
    })();
    match res {
        Ok(m) => {
            rows.push(Row::value(
                "agent RSS idle, 1 pending (VmRSS)",
                "builtin policy",
                format!("{:.1} MiB", m.rss_kib as f64 / 1024.0),
                "≤ 10 MiB",
                format!(
                    "{}; peak (VmHWM) {:.1} MiB",
                    if m.rss_kib <= 10 * 1024 { "yes" } else { "**no**" },
                    m.hwm_kib as f64 / 1024.0
                ),
            ));
            rows.push(Row::value(
                "agent wake-ups idle (3 s window)",
                "builtin policy",
                m.switches.to_string(),
                "none",
                format!("{}; {}", if m.switches == 0 { "yes" } else { "**no**" }, m.detail),
            ));
        }
        Err(e) => rows.push(Row::value(
            "agent RSS idle, 1 pending (VmRSS)",
            "builtin policy",
            "—".into(),
            "≤ 10 MiB",
            format!("failed: {}", first_line(&e)),
        )),
    }
}

// ---------------------------------------------------------------------------------------------

/// A scratch directory under the temp dir, removed on drop (pins left by a failed run are
/// unmounted first; only paths inside it are touched).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::read_dir(self.0.join("run").join("ns")) {
            for e in dir.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("bench: removing {}: {e}", self.0.display());
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !common::asked("transactions", &args) {
        return;
    }
    let cfg = Config::from_env();
    reap_stale_namespaces("ctg-bench");
    let tmp = Scratch(std::env::temp_dir().join(format!("ctg-bench-{}", std::process::id())));
    if let Err(e) = std::fs::create_dir_all(&tmp.0) {
        eprintln!("bench: {}: {e}", tmp.0.display());
        std::process::exit(1);
    }
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    let mut rows = Vec::new();
    if cfg.runs_section("policy") {
        bench_policy(&cfg, &tmp.0, &mut rows);
    }
    if cfg.runs_section("ruleset") {
        bench_ruleset(&cfg, &tmp.0, &mut rows);
    }

    let cli =
        Cli { exe: PathBuf::from(env!("CARGO_BIN_EXE_ctguard")), state: tmp.0.join("state"), run: tmp.0.join("run") };
    if cfg.runs_section("slip") {
        bench_slip(&cfg, &cli, &mut rows);
        // A fresh agent for the RSS: let the slip runs' agent exit first.
        if let Some(pid) = cli.agent_pid() {
            eprintln!("bench: slip agent {pid}: {}", cli.wait_agent_exit(pid, Duration::from_secs(20)));
        }
    }
    if cfg.runs_section("rss") {
        let rss_cli = Cli { exe: cli.exe.clone(), state: tmp.0.join("state-rss"), run: tmp.0.join("run-rss") };
        bench_rss(&rss_cli, &mut rows);
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!();
    println!(
        "ctguard transactions bench: {} run(s) per row{}, medians; ratio = median over runs of ctguard / bare in the same namespace; binary {}",
        cfg.runs,
        if cfg.quick { " (QUICK smoke run)" } else { "" },
        cli.exe.display()
    );
    println!();
    print!("{}", print_table(&rows));
    println!();
    println!(
        "took {:.0} s; loadavg at the start: {}; at the end: {}",
        started.elapsed().as_secs_f64(),
        load_start.trim(),
        load.trim()
    );
}
