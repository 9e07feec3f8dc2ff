//! Operations against a real kernel: the boot sequence without systemd. A policy committed
//! with persistence is written to a temp root; a transaction is left pending; then a simulated
//! reboot (the agent killed, another boot id, a fresh namespace holding only the host's own
//! firewall) is followed by what the boot units run: `ctguard recover` (closes the pending
//! transaction, restores nothing) and `ctguard restore` (re-applies the persisted policy,
//! through the agent, committed at once; a second run does nothing).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use ctguard::journal::Journal;
use ctguard::model::{parse_policy, Format};
use ctguard::persist::{persist_committed, PersistPaths};
use ctguard::txn::TxnId;

use crate::harness::{Ns, STATEFUL};
use crate::txn_cli::{ok, wait_gone};

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One installation: its own state and run dirs (hence its own detached agent) and a temp root
/// standing in for `/` of persistence.
struct Inst {
    base: PathBuf,
    env: Vec<(String, String)>,
}

impl Inst {
    fn new() -> Inst {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("ctguard-ops-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("base dir");
        Inst { base, env: Vec::new() }
    }

    fn state(&self) -> PathBuf {
        self.base.join("state")
    }

    fn root(&self) -> PathBuf {
        self.base.join("root")
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
        cmd.arg("--state-dir")
            .arg(self.state())
            .arg("--run-dir")
            .arg(self.base.join("run"))
            .args(args)
            .env_remove("SSH_CONNECTION")
            .env_remove("JOURNAL_STREAM");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run ctguard")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        // What the verb reports: the envelope's `data`.
        super::txn_cli::envelope_of(&out, args)["data"].take()
    }

    fn agent_pid(&self) -> Option<i32> {
        self.json(&["status"])["agent_pid"].as_i64().map(|p| p as i32)
    }

    fn history_len(&self) -> usize {
        self.json(&["history"])["transactions"].as_array().map_or(0, Vec::len)
    }
}

impl Drop for Inst {
    fn drop(&mut self) {
        let v = self.json(&["status"]);
        for p in v["pending"].as_array().into_iter().flatten() {
            if let Some(id) = p["id"].as_str() {
                let _ = self.run(&["rollback", id]);
            }
        }
        if let Some(pid) = self.agent_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
            wait_gone(pid, Duration::from_secs(5));
        }
        for e in std::fs::read_dir(self.base.join("run/ns")).into_iter().flatten().flatten() {
            ctguard::netns::unpin(&e.path());
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// `apply --json` and the txid.
fn apply(inst: &Inst, ns: &Ns, extra: &[&str]) -> String {
    let mut args = vec!["--json", "apply", "--netns", ns.name()];
    args.extend_from_slice(extra);
    let out = inst.run(&args);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("apply json");
    v["data"]["txid"].as_str().expect("txid").to_string()
}

/// A ruleset with every `ctguard:TXID` tag replaced, so two transactions' results compare.
fn untagged(ruleset: &str) -> String {
    let mut out = String::new();
    for line in ruleset.lines() {
        let mut l = line.to_string();
        while let Some(i) = l.find("ctguard:2") {
            let end =
                l[i + 8..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).map_or(l.len(), |e| i + 8 + e);
            l.replace_range(i..end, "ctguard:TXID");
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn read_sysctl(ns: &Ns, key: &str) -> String {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.run(|| std::fs::read_to_string(&path)).unwrap_or_else(|e| panic!("{path}: {e}")).trim().to_string()
}

const POLICY: &str = r#"backend = "nft"
persist = true
[[notrack]]
protocols = ["udp", "tcp"]
ports = [53]
[sysctl]
"net.netfilter.nf_conntrack_udp_timeout" = 25
"#;

#[test]
fn boot_sequence_recover_then_restore_reapplies_the_persisted_policy() {
    let inst = Inst::new();
    let policy_file = inst.base.join("policy.toml");
    std::fs::write(&policy_file, POLICY).expect("policy");
    let policy_arg = policy_file.to_str().expect("utf8");

    // Before the reboot: a committed transaction with persistence...
    let ns = Ns::new("opsboot");
    ns.nft(STATEFUL);
    let committed = apply(&inst, &ns, &[policy_arg, "--timeout", "60s"]);
    ok(&inst.run(&["confirm", &committed]));
    let committed_ruleset = ns.nft_list();
    assert!(committed_ruleset.contains("table inet ctguard"), "{committed_ruleset}");
    assert_eq!(read_sysctl(&ns, "net.netfilter.nf_conntrack_udp_timeout"), "25");
    // ...persisted as the agent's confirm path does (the target is a namespace, so on_committed
    // itself would refuse: the files go to a temp root here).
    let rec =
        Journal::attach(&inst.state()).expect("journal").load(&TxnId::parse(&committed).expect("id")).expect("record");
    let paths = PersistPaths { state_dir: inst.root().join("var/lib/ctguard"), ..PersistPaths::under(&inst.root()) };
    let persisted = persist_committed(&rec, &paths, &|_| None).expect("persist").expect("the policy asks for it");
    assert!(persisted.warnings.is_empty(), "{:?}", persisted.warnings);
    let sysctl_d = std::fs::read_to_string(paths.sysctl_file()).expect("sysctl.d");
    assert!(sysctl_d.contains("net.netfilter.nf_conntrack_udp_timeout = 25"), "{sysctl_d}");
    let saved = std::fs::read_to_string(paths.committed_policy()).expect("committed policy");
    assert_eq!(parse_policy(&saved, Format::Toml).expect("parses"), parse_policy(POLICY, Format::Toml).expect("ok"));

    // ...and a transaction still pending when the host goes down.
    let pending = apply(&inst, &ns, &["--timeout", "600s"]);
    let pid = inst.agent_pid().expect("agent");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    assert!(wait_gone(pid, Duration::from_secs(5)));

    // The reboot: another boot id; the kernel holds what the host booted (its own firewall).
    let mut inst = inst;
    let boot = inst.base.join("boot_id");
    std::fs::write(&boot, "00000000-0000-0000-0000-00000000b007\n").expect("boot id");
    inst.env.push(("CTGUARD_BOOT_ID_FILE".into(), boot.display().to_string()));
    let fresh = Ns::new("opsboot2");
    fresh.nft(STATEFUL);
    let booted = fresh.nft_list();

    // ctguard-recover.service: closes the pending transaction, restores nothing.
    let v = inst.json(&["recover"]);
    assert_eq!(v["closed_by_reboot"], 1, "{v}");
    assert_eq!(inst.json(&["show", &pending])["outcome"], "rolled back: reboot (nothing restored)");
    assert_eq!(fresh.nft_list(), booted, "recover touched the booted firewall");

    // ctguard-restore.service: re-applies the persisted committed policy, confirmed at once.
    let saved_arg = paths.committed_policy().display().to_string();
    let v = inst.json(&["restore", "--netns", fresh.name(), "--policy-file", &saved_arg]);
    assert_eq!(v["changed"], true, "{v}");
    let restored = v["txid"].as_str().expect("txid").to_string();
    let shown = inst.json(&["show", &restored]);
    assert_eq!(shown["state"], "COMMITTED", "{shown}");
    assert_eq!(untagged(&fresh.nft_list()), untagged(&committed_ruleset), "the restored ruleset differs");
    assert_eq!(read_sysctl(&fresh, "net.netfilter.nf_conntrack_udp_timeout"), "25");
    assert!(inst.json(&["status"])["pending"].as_array().is_some_and(Vec::is_empty));

    // Idempotent: a second boot-time run finds the policy in place and does nothing.
    let before = inst.history_len();
    let v = inst.json(&["restore", "--netns", fresh.name(), "--policy-file", &saved_arg]);
    assert_eq!(v["changed"], false, "{v}");
    assert_eq!(inst.history_len(), before, "an idempotent restore must not create a transaction");
    let out = inst.run(&["restore", "--netns", fresh.name(), "--policy-file", &saved_arg]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already in place"));
}

#[test]
fn restore_is_idempotent_with_an_iptables_backend_and_reapplies_what_is_missing() {
    ctguard::backend::exec::Tool::find("iptables-nft-restore")
        .expect("iptables-nft-restore (integration/packages.txt)");
    let inst = Inst::new();
    let policy = POLICY.replace("backend = \"nft\"", "backend = \"iptables-nft\"");
    let file = inst.base.join("committed-policy.toml");
    std::fs::write(&file, &policy).expect("policy");
    let file_arg = file.to_str().expect("utf8");
    let ns = Ns::new("opsipt");
    ns.nft(STATEFUL);
    let id = apply(&inst, &ns, &[file_arg, "--timeout", "60s"]);
    ok(&inst.run(&["confirm", &id]));
    let v = inst.json(&["restore", "--netns", ns.name(), "--policy-file", file_arg]);
    assert_eq!(v["changed"], false, "a committed iptables-nft policy must count as in place: {v}");

    // Something removed ctguard's accept rule (a firewall reload, say): restore puts it back.
    let listing = ns.exec("nft", &["-a", "list", "chain", "inet", "host", "input"]);
    let handle = listing
        .lines()
        .find(|l| l.contains("ctguard:"))
        .and_then(|l| l.rsplit("# handle ").next())
        .map(str::trim)
        .expect("tagged accept rule")
        .to_string();
    ns.exec("nft", &["delete", "rule", "inet", "host", "input", "handle", &handle]);
    // The agent's guard of the committed policy races restore for it (issue 13): whichever
    // comes first puts the accept back; restore waits for a running repair instead of refusing.
    let v = inst.json(&["restore", "--netns", ns.name(), "--policy-file", file_arg]);
    if v["changed"] == true {
        let diffs = v["differences"].as_array().expect("differences");
        assert!(diffs.iter().any(|d| d.as_str().is_some_and(|s| s.contains("accept"))), "{v}");
    }
    assert!(ns.nft_list().contains("ct state untracked accept"), "the accept rule was not re-inserted");
    let v = inst.json(&["restore", "--netns", ns.name(), "--policy-file", file_arg]);
    assert_eq!(v["changed"], false, "{v}");
}
