//! Real rulesets no one on this project wrote (`../shared/corpus`, see its README): the nftables
//! project's test dumps and the saves of a real ufw. For every dump that loads in a fresh
//! namespace: `plan` of the built-in policy (and of the policy with the nft backend, and with the
//! iptables backend of an iptables dump) succeeds or names the lint error [`EXPECTED`] lists;
//! `apply` (with `--force` only where an error is expected) then `rollback` gives back the
//! identical ruleset (byte for byte, counters zeroed); and the built-in policy's flows — DNS over
//! UDP and TCP to port 53, IPv4 and IPv6, from a peer namespace over a veth pair — are answered
//! during the pending transaction and after the rollback exactly where they were before.
//!
//! Dumps run in parallel, each in its own pair of namespaces. The tally is printed (run with
//! `--nocapture` to see it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::txn_cli::Ctg;
use crate::harness::{sa, tcp_connect, udp_queries, Ns, Pair, TcpResponder, UdpResponder, SRV4, SRV6};

/// The lint errors each dump is expected to give, per backend (`"*"`: every backend planned
/// for it), with the reason. A dump and backend not listed must plan clean (exit 0). Update
/// this table when the planner or the lint changes what is right for a ruleset: a changed
/// result fails the test, naming the dump and what it gave.
///
/// At the time of writing every dump that loads plans clean with every backend (the tally
/// prints the findings per dump). A row looks like:
/// `Expected { dump: "ufw-allow.v4 (iptables-nft)", backend: "*", errors: &["open-resolver"],
/// reason: "the accept would take every source where ufw allows one prefix" },`
const EXPECTED: &[Expected] = &[];

/// One row of [`EXPECTED`].
struct Expected {
    /// The dump's name (file name; ufw ones with their loader: `ufw-allow.v4 (iptables-nft)`).
    dump: &'static str,
    /// The backend planned: `auto` (the built-in policy), `nft`, `iptables-nft`,
    /// `iptables-legacy`, or `*` for all.
    backend: &'static str,
    /// The lint error codes, sorted.
    errors: &'static [&'static str],
    /// Why that is right for this ruleset (one line).
    #[allow(dead_code)]
    reason: &'static str,
}

/// Parallel workers (each its own namespaces and its own ctguard installation and agent).
const WORKERS: usize = 3;
/// UDP queries per flow check (all answered, or none).
const QUERIES: usize = 3;
/// How long a TCP connect may take before it counts as not answered.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(400);

/// Where the corpus is: `../shared/corpus` from the project root.
fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus")
}

/// How a dump is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loader {
    /// `nft -f`.
    Nft,
    /// `{ip,ip6}tables-{nft,legacy}-restore`.
    Ipt { v6: bool, legacy: bool },
}

impl Loader {
    fn tool(self, suffix: &str) -> String {
        match self {
            Loader::Nft => "nft".into(),
            Loader::Ipt { v6, legacy } => format!(
                "{}-{}-{suffix}",
                if v6 { "ip6tables" } else { "iptables" },
                if legacy { "legacy" } else { "nft" }
            ),
        }
    }
    /// The iptables backend of an iptables dump.
    fn ipt_backend(self) -> Option<&'static str> {
        match self {
            Loader::Nft => None,
            Loader::Ipt { legacy: false, .. } => Some("iptables-nft"),
            Loader::Ipt { legacy: true, .. } => Some("iptables-legacy"),
        }
    }
}

struct Dump {
    name: String,
    loader: Loader,
    text: String,
}

/// Every dump of the corpus, sorted; the ufw saves once per variant.
fn dumps() -> Vec<Dump> {
    let dir = corpus_dir();
    let mut out = Vec::new();
    let nft_dir = dir.join("nft-tests");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&nft_dir)
        .unwrap_or_else(|e| panic!("corpus: {}: {e}", nft_dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "nft"))
        .collect();
    names.sort();
    for p in names {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("corpus: {}: {e}", p.display()));
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push(Dump { name, loader: Loader::Nft, text });
    }
    for (file, v6) in [("ufw-allow.v4", false), ("ufw-allow.v6", true)] {
        let p = dir.join("ufw").join(file);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("corpus: {}: {e}", p.display()));
        for legacy in [false, true] {
            let loader = Loader::Ipt { v6, legacy };
            out.push(Dump {
                name: format!("{file} ({})", loader.ipt_backend().unwrap_or("")),
                loader,
                text: text.clone(),
            });
        }
    }
    out
}

/// Zeroes what traffic and time change in a listing: `packets N bytes M` (nft counters),
/// `[N:M]` (iptables counters), and `expires D` of set elements that packets added (a
/// countdown: `expires 1h` becomes `expires 59m59s944ms` while nothing changes); drops the
/// saves' `#` comment lines (they carry a date).
fn zero_counters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let toks: Vec<&str> = line.split(' ').collect();
        let mut i = 0;
        let mut words: Vec<String> = Vec::with_capacity(toks.len());
        while i < toks.len() {
            let num = |s: Option<&&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
            if (toks[i] == "packets" || toks[i] == "bytes") && num(toks.get(i + 1)) {
                words.push(toks[i].to_string());
                words.push("0".into());
                i += 2;
                continue;
            }
            if toks[i] == "expires" && toks.get(i + 1).is_some_and(|t| t.starts_with(|c: char| c.is_ascii_digit())) {
                // `expires 59m59s944ms,` keeps the separator that followed it.
                let t = toks[i + 1];
                let tail: String = t.chars().rev().take_while(|c| matches!(c, ',' | '}')).collect();
                words.push(format!("expires -{tail}"));
                i += 2;
                continue;
            }
            let t = toks[i];
            let is_counter = t.starts_with('[')
                && t.ends_with(']')
                && t[1..t.len() - 1].split_once(':').is_some_and(|(a, b)| {
                    !a.is_empty() && !b.is_empty() && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
                });
            words.push(if is_counter { "[0:0]".to_string() } else { t.to_string() });
            i += 1;
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// `listing` without the iptables-legacy tables that hold nothing: only built-in chains, each
/// with policy ACCEPT and no rule. The kernel cannot remove an x_tables table from a namespace
/// once it exists (ctguard's iptables-legacy backend creates `raw`; its rollback empties it), so
/// such a table after the rollback is the one difference a legacy rollback cannot avoid; it
/// filters nothing. Returns the listing and the tables dropped.
fn without_empty_legacy_tables(listing: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut dropped = Vec::new();
    let mut in_legacy = false;
    let mut block: Vec<&str> = Vec::new();
    for line in listing.lines() {
        if line.starts_with("## ") {
            in_legacy = line.contains("-legacy-save");
        }
        if in_legacy && line.starts_with('*') {
            block.push(line);
            continue;
        }
        if !block.is_empty() {
            block.push(line);
            if line == "COMMIT" {
                let empty = block[1..block.len() - 1].iter().all(|l| {
                    l.strip_prefix(':').is_some_and(|c| {
                        let mut w = c.split(' ');
                        let name = w.next().unwrap_or_default();
                        name.chars().all(|ch| ch.is_ascii_uppercase()) && w.next() == Some("ACCEPT")
                    })
                });
                if empty {
                    dropped.push(block[0].to_string());
                } else {
                    for l in &block {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
                block.clear();
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    for l in &block {
        out.push_str(l);
        out.push('\n');
    }
    (out, dropped)
}

/// The ruleset as the tools print it, counters zeroed: `nft list ruleset`, and for an
/// iptables dump its save.
fn listing(ns: &Ns, loader: Loader) -> String {
    let mut out = zero_counters(&ns.nft_list());
    if let Loader::Ipt { .. } = loader {
        out.push_str(&format!("## {}\n", loader.tool("save")));
        out.push_str(&zero_counters(&ns.exec(&loader.tool("save"), &[])));
    }
    out
}

/// Answered or not, per flow: UDP/53 and TCP/53 over IPv4 and IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Flows([bool; 4]);

const FLOW_NAMES: [&str; 4] = ["udp4", "tcp4", "udp6", "tcp6"];

impl Flows {
    fn count(self) -> usize {
        self.0.iter().filter(|a| **a).count()
    }
}

impl std::fmt::Display for Flows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> =
            FLOW_NAMES.iter().zip(self.0).map(|(n, a)| format!("{n}:{}", if a { "yes" } else { "no" })).collect();
        f.write_str(&parts.join(" "))
    }
}

/// One flow from the client namespace: UDP (all of [`QUERIES`] answered, none, or an error
/// for a partial answer) from fresh source ports `first..`, or a TCP connect.
fn one_flow(pair: &Pair, i: usize, first: u16) -> Result<bool, String> {
    let (udp, ip): (bool, std::net::IpAddr) = match i {
        0 => (true, SRV4.into()),
        1 => (false, SRV4.into()),
        2 => (true, SRV6.into()),
        _ => (false, SRV6.into()),
    };
    let dst = sa(ip, 53);
    if !udp {
        return Ok(tcp_connect(&pair.cli, dst, CONNECT_TIMEOUT));
    }
    match udp_queries(&pair.cli, dst, QUERIES, first).answered {
        0 => Ok(false),
        n if n == QUERIES => Ok(true),
        n => Err(format!("{}: {n} of {QUERIES} UDP queries answered", FLOW_NAMES[i])),
    }
}

/// Sends the flows from the client namespace; `phase` picks fresh UDP source ports (no
/// conntrack entry of an earlier phase can answer for them). A result that is partial, or that
/// differs from `expect`, is measured once more (fresh ports again) before it counts: a
/// difference must not be a late answer on a loaded machine. A partial answer twice is an error.
fn flows(pair: &Pair, phase: u16, expect: Option<Flows>) -> Result<Flows, String> {
    let mut f = Flows::default();
    for i in 0..4 {
        let first = 20000 + phase * 200 + i as u16 * 10;
        let r = match one_flow(pair, i, first) {
            Ok(a) if expect.is_none_or(|e| e.0[i] == a) => Ok(a),
            _ => one_flow(pair, i, first + 100),
        };
        f.0[i] = r?;
    }
    Ok(f)
}

/// What one dump gave.
#[derive(Debug, Default)]
struct Outcome {
    loaded: bool,
    skip_reason: Option<String>,
    /// Per backend planned: the lint error codes (sorted) and warning codes.
    plans: Vec<(String, Vec<String>, Vec<String>)>,
    /// Per backend applied: rolled back identical.
    applied: Vec<(String, bool)>,
    before: Flows,
    during: Vec<Flows>,
    after: Vec<Flows>,
    problems: Vec<String>,
    /// `plan --ruleset` of the dump over itself: exit 0, nothing changes.
    ruleset_self_plan: bool,
    /// Empty iptables-legacy tables the rollback left (see [`without_empty_legacy_tables`]).
    empty_legacy_left: Vec<String>,
}

fn expected_errors(dump: &str, backend: &str) -> Vec<String> {
    let mut v: Vec<String> = EXPECTED
        .iter()
        .filter(|e| e.dump == dump && (e.backend == backend || e.backend == "*"))
        .flat_map(|e| e.errors.iter().map(|c| c.to_string()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The policy file for `backend` (`auto`: none, the built-in policy): the built-in policy's
/// flows with that backend (no sysctls: host-only ones are refused in a namespace when named).
fn policy_file(ctg: &Ctg, backend: &str) -> Option<String> {
    if backend == "auto" {
        return None;
    }
    let dir = ctg.base.join("policies");
    std::fs::create_dir_all(&dir).expect("policy dir");
    let p = dir.join(format!("{backend}.toml"));
    let text = format!("backend = \"{backend}\"\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n");
    std::fs::write(&p, text).expect("write policy");
    Some(p.to_string_lossy().into_owned())
}

fn run_dump(ctg: &Ctg, idx: usize, d: &Dump) -> Outcome {
    let mut o = Outcome::default();
    let pair = Pair::new(&format!("corpus-{idx}"));
    let load = match d.loader {
        Loader::Nft => pair.srv.try_exec("nft", &["-f", "-"], Some(d.text.as_bytes())),
        l => pair.srv.try_exec(&l.tool("restore"), &[], Some(d.text.as_bytes())),
    };
    if !load.success() {
        o.skip_reason = Some(load.stderr.lines().next().unwrap_or("refused").to_string());
        return o;
    }
    o.loaded = true;
    // `plan --ruleset` of the dump over itself (an nft dump after `flush ruleset`, an iptables
    // dump replacing its own tables): the kernel takes it and nothing changes. Before any
    // traffic: packets add elements to dynamic sets, which the file would then remove.
    let loaded = listing(&pair.srv, d.loader);
    let (text, format) = match d.loader {
        Loader::Nft => (format!("flush ruleset\n{}", d.text), "nft"),
        Loader::Ipt { v6, .. } => (d.text.clone(), if v6 { "ip6tables" } else { "iptables" }),
    };
    let dir = ctg.base.join("rulesets");
    std::fs::create_dir_all(&dir).expect("ruleset dir");
    let path = dir.join(format!("dump-{idx}"));
    std::fs::write(&path, &text).expect("write ruleset");
    let path = path.to_string_lossy().into_owned();
    let out = ctg.run(&["--json", "plan", "--netns", pair.srv.name(), "--ruleset", &path, "--format", format]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if out.status.code() != Some(0) || v["data"]["changed"] != false {
        let diff: Vec<&str> = v["data"]["diff"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).filter(|l| !l.starts_with("  ")).take(8).collect())
            .unwrap_or_default();
        o.problems.push(format!(
            "plan --ruleset of the dump over itself: exit {:?}, changed {}: {} {}",
            out.status.code(),
            v["data"]["changed"],
            String::from_utf8_lossy(&out.stderr).trim(),
            diff.join(" | ")
        ));
    } else {
        o.ruleset_self_plan = true;
    }
    if listing(&pair.srv, d.loader) != loaded {
        o.problems.push("plan --ruleset changed the target".into());
    }
    let _udp4 = UdpResponder::start(&pair.srv, sa(SRV4, 53));
    let _udp6 = UdpResponder::start(&pair.srv, sa(SRV6, 53));
    let _tcp4 = TcpResponder::start(&pair.srv, sa(SRV4, 53));
    let _tcp6 = TcpResponder::start(&pair.srv, sa(SRV6, 53));
    o.before = match flows(&pair, 0, None) {
        Ok(f) => f,
        Err(e) => {
            o.problems.push(format!("before: {e}"));
            return o;
        }
    };
    let before = listing(&pair.srv, d.loader);

    let mut backends = vec!["auto", "nft"];
    backends.extend(d.loader.ipt_backend());
    let mut force_for: BTreeMap<&str, bool> = BTreeMap::new();
    for backend in &backends {
        let mut args = vec!["--json", "plan", "--check", "--netns", pair.srv.name()];
        let pf = policy_file(ctg, backend);
        if let Some(p) = &pf {
            args.push(p);
        }
        let out = ctg.run(&args);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let code = out.status.code().unwrap_or(-1);
        let findings = v["data"]["findings"].as_array().cloned().unwrap_or_default();
        let of = |sev: &str| {
            let mut c: Vec<String> = findings
                .iter()
                .filter(|f| f["severity"] == sev)
                .filter_map(|f| f["code"].as_str().map(str::to_string))
                .collect();
            c.sort();
            c.dedup();
            c
        };
        let (errors, warnings) = (of("error"), of("warning"));
        let want = expected_errors(&d.name, backend);
        let err_line = String::from_utf8_lossy(&out.stderr).trim().to_string();
        match code {
            0 if errors.is_empty() => {}
            3 if !errors.is_empty() => {}
            _ => o.problems.push(format!("plan ({backend}): exit {code}: {err_line}")),
        }
        if errors != want {
            o.problems.push(format!("plan ({backend}): lint errors {errors:?}, expected {want:?}: {err_line}"));
        }
        force_for.insert(backend, !errors.is_empty());
        o.plans.push((backend.to_string(), errors, warnings));
    }

    // Apply and roll back: the built-in policy, and the iptables backend of an iptables dump
    // (the explicit nft backend is what `auto` resolves to here: planned, not applied twice).
    let mut applied_backends = vec!["auto"];
    applied_backends.extend(d.loader.ipt_backend());
    for (k, backend) in applied_backends.into_iter().enumerate() {
        let mut args = vec!["--timeout", "120s"];
        if force_for.get(backend).copied().unwrap_or(false) {
            args.push("--force");
        }
        let pf = policy_file(ctg, backend);
        if let Some(p) = &pf {
            args.push(p);
        }
        let (out, id) = ctg.apply(&pair.srv, &args);
        if out.status.code() != Some(0) || id.is_empty() {
            o.problems.push(format!(
                "apply ({backend}): exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            o.applied.push((backend.to_string(), false));
            continue;
        }
        // ctguard's objects are in place while the flows are measured.
        let during = listing(&pair.srv, d.loader);
        if !during.contains("ctguard") {
            o.problems.push(format!("apply ({backend}): no ctguard object in the listing while pending"));
        }
        match flows(&pair, 1 + 2 * k as u16, Some(o.before)) {
            Ok(f) => o.during.push(f),
            Err(e) => o.problems.push(format!("during ({backend}): {e}")),
        }
        let rb = ctg.run(&["rollback", &id]);
        if rb.status.code() != Some(0) {
            o.problems.push(format!(
                "rollback ({backend}): exit {:?}: {}",
                rb.status.code(),
                String::from_utf8_lossy(&rb.stderr).trim()
            ));
        }
        let now = listing(&pair.srv, d.loader);
        let mut identical = now == before;
        if !identical && matches!(d.loader, Loader::Ipt { legacy: true, .. }) {
            let (a, _) = without_empty_legacy_tables(&before);
            let (b, left) = without_empty_legacy_tables(&now);
            if a == b {
                o.empty_legacy_left.extend(left);
                identical = true;
            }
        }
        if !identical {
            let a: Vec<String> = before.lines().map(str::to_string).collect();
            let b: Vec<String> = now.lines().map(str::to_string).collect();
            let changed: Vec<String> =
                ctguard::diff::diff_lines(&a, &b).into_iter().filter(|l| !l.starts_with("  ")).take(12).collect();
            o.problems.push(format!("rollback ({backend}): not the identical ruleset: {}", changed.join(" | ")));
        }
        o.applied.push((backend.to_string(), identical));
        match flows(&pair, 2 + 2 * k as u16, Some(o.before)) {
            Ok(f) => o.after.push(f),
            Err(e) => o.problems.push(format!("after ({backend}): {e}")),
        }
    }
    for (phase, fs) in [("during the pending transaction", &o.during), ("after the rollback", &o.after)] {
        for f in fs.iter() {
            if *f != o.before {
                o.problems.push(format!("flows {phase}: {f}; before: {}", o.before));
            }
        }
    }
    o
}

#[test]
fn corpus_rulesets_plan_apply_roll_back_and_keep_their_flows() {
    let start = Instant::now();
    let dumps = dumps();
    assert!(dumps.len() >= 80, "corpus: only {} dumps in {}", dumps.len(), corpus_dir().display());
    for e in EXPECTED {
        assert!(dumps.iter().any(|d| d.name == e.dump), "EXPECTED names a dump that is not in the corpus: {}", e.dump);
    }
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                let ctg = Ctg::new();
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(d) = dumps.get(i) else { break };
                    let t = Instant::now();
                    let o = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_dump(&ctg, i, d)))
                        .unwrap_or_else(|p| {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            Outcome { problems: vec![format!("panicked: {msg}")], ..Outcome::default() }
                        });
                    eprintln!("corpus: {} in {:?}", d.name, t.elapsed());
                    results.lock().unwrap_or_else(|p| p.into_inner()).push((i, o));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(i, _)| *i);

    // The tally.
    let loaded = results.iter().filter(|(_, o)| o.loaded).count();
    let skipped: Vec<String> = results
        .iter()
        .filter_map(|(i, o)| o.skip_reason.as_ref().map(|r| format!("{} ({r})", dumps[*i].name)))
        .collect();
    let plans: Vec<&(String, Vec<String>, Vec<String>)> = results.iter().flat_map(|(_, o)| &o.plans).collect();
    let clean = plans.iter().filter(|p| p.1.is_empty()).count();
    let mut by_code: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &plans {
        for c in &p.1 {
            *by_code.entry(c.as_str()).or_default() += 1;
        }
    }
    let mut warn_codes: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &plans {
        for c in &p.2 {
            *warn_codes.entry(c.as_str()).or_default() += 1;
        }
    }
    let applied: Vec<&(String, bool)> = results.iter().flat_map(|(_, o)| &o.applied).collect();
    let identical = applied.iter().filter(|a| a.1).count();
    let loaded_flows: Vec<&Outcome> = results.iter().map(|(_, o)| o).filter(|o| o.loaded).collect();
    let before: usize = loaded_flows.iter().map(|o| o.before.count() * o.during.len().max(1)).sum();
    let during: usize = loaded_flows.iter().flat_map(|o| &o.during).map(|f| f.count()).sum();
    let after: usize = loaded_flows.iter().flat_map(|o| &o.after).map(|f| f.count()).sum();
    let total_flows: usize = loaded_flows.iter().map(|o| 4 * o.during.len().max(1)).sum();
    eprintln!("corpus tally ({:?}):", start.elapsed());
    eprintln!("  dumps: {}, loaded: {loaded}, skipped (the kernel refuses them): {}", dumps.len(), skipped.len());
    for s in &skipped {
        eprintln!("    skipped: {s}");
    }
    eprintln!("  plans: {}, clean: {clean}, with lint errors: {}", plans.len(), plans.len() - clean);
    eprintln!("  lint errors by code: {by_code:?}; warnings by code: {warn_codes:?}");
    let self_plans = results.iter().filter(|(_, o)| o.ruleset_self_plan).count();
    eprintln!("  plan --ruleset of the dump over itself, exit 0 and no change: {self_plans}");
    let legacy_left: usize = results.iter().map(|(_, o)| o.empty_legacy_left.len()).sum();
    eprintln!(
        "  applied: {}, rolled back identical: {identical} (of which {legacy_left} with an empty iptables-legacy table the kernel cannot remove)",
        applied.len()
    );
    eprintln!(
        "  flows answered (4 flows x {} applies = {total_flows}; before counted once per apply): before {before}, during {during}, after {after}",
        applied.len()
    );
    // Per dump: what is not the common case (every flow answered, no finding but the
    // built-in policy's skipped host-only sysctls).
    eprintln!("  per dump (others: every flow answered before, no finding but sysctl-skipped):");
    for (i, o) in &results {
        if !o.loaded {
            continue;
        }
        let findings: Vec<String> = o
            .plans
            .iter()
            .filter(|p| !p.1.is_empty() || p.2.iter().any(|w| w != "sysctl-skipped"))
            .map(|p| format!("{}: errors {:?} warnings {:?}", p.0, p.1, p.2))
            .collect();
        if !findings.is_empty() || o.before.count() != 4 {
            eprintln!("    {}: flows before {}; {}", dumps[*i].name, o.before, findings.join("; "));
        }
    }
    let problems: Vec<String> = results
        .iter()
        .flat_map(|(i, o)| {
            let name = &dumps[*i].name;
            o.problems.iter().map(move |p| format!("{name}: {p}"))
        })
        .collect();
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
    assert!(loaded >= 70, "only {loaded} dumps loaded: {skipped:?}");
    assert_eq!(applied.len(), identical);
}
