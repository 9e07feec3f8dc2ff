//! `ctguard plan` and the lint against real rulesets: each test loads a ruleset into its own
//! namespace and runs the real binary with `--netns`, asserting on the JSON, the findings and
//! the exit code (DESIGN §5, §7).

use std::process::Command;

use serde_json::Value;

use crate::harness::{Ns, STATEFUL};

struct PlanRun {
    code: i32,
    json: Value,
    stderr: String,
}

/// Runs `ctguard plan --json --netns NS [POLICY] [extra…]` with `policy` written to a file.
fn plan(ns: &Ns, policy: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> PlanRun {
    let dir = std::env::temp_dir().join(format!("ctguard-plan-{}-{}", std::process::id(), ns.name()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctguard"));
    cmd.args(["plan", "--json", "--netns", ns.name()]).args(extra).env_remove("SSH_CONNECTION");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(p) = policy {
        let path = dir.join("policy.toml");
        std::fs::write(&path, p).expect("write policy");
        cmd.arg(&path);
    }
    let out = cmd.output().expect("run ctguard");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The envelope's `data`: the report (kept when plan exits 2 or 3).
    let json = serde_json::from_str::<Value>(&stdout).map(|mut v| v["data"].take()).unwrap_or(Value::Null);
    PlanRun { code: out.status.code().unwrap_or(-1), json, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn codes(r: &PlanRun) -> Vec<(String, String)> {
    r.json["findings"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    (f["severity"].as_str().unwrap_or("").to_string(), f["code"].as_str().unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn has(r: &PlanRun, severity: &str, code: &str) -> bool {
    codes(r).iter().any(|(s, c)| s == severity && c == code)
}

#[test]
fn plan_check_works_in_a_namespace_and_is_idempotent_after_apply() {
    let ns = Ns::new("plan");
    ns.nft(STATEFUL);
    let before = ns.nft_list();
    let r = plan(&ns, None, &["--check"], &[]);
    assert_eq!(r.code, 0, "stderr: {}\n{}", r.stderr, r.json);
    assert_eq!(r.json["changed"], true);
    assert_eq!(r.json["check"]["ok"], true, "{}", r.json);
    let ins = r.json["insertions"].as_array().expect("insertions");
    // Only udp/53 is accepted while tracked; tcp/53 stays closed, so nothing opens it.
    assert_eq!(ins.len(), 1, "{}", r.json);
    assert_eq!(ins[0]["chain"], "nft inet host input");
    assert!(has(&r, "warning", "sysctl-skipped"), "{:?}", codes(&r));
    assert_eq!(ns.nft_list(), before, "plan --check changed the ruleset");

    // Apply what plan said (table + insertion): plan then reports nothing to change.
    let table =
        ctguard::render::nft_ir::table_for(&ctguard::model::Policy::builtin(), &ctguard::model::names::Tag::preview());
    ns.nft(&ctguard::render::nft_script::replace_script(&table));
    let live = ns.run(ctguard::backend::live::read).expect("live");
    let p = ctguard::render::planner::plan(
        &ctguard::model::Policy::builtin(),
        &live,
        &ctguard::model::names::Tag::preview(),
    );
    ns.nft(&p.nft_script());
    let again = plan(&ns, None, &[], &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.json["changed"], false, "{}", again.json);
}

#[test]
fn lint_blackhole_is_an_error_without_accept_untracked() {
    let ns = Ns::new("blackhole");
    ns.nft(STATEFUL);
    let r = plan(&ns, Some("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\naccept_untracked = false\n"), &[], &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(has(&r, "error", "blackhole"), "{:?}", codes(&r));
    assert!(r.json["insertions"].as_array().is_some_and(|a| a.is_empty()));
    assert!(r.stderr.contains("lint found"), "{}", r.stderr);
}

#[test]
fn lint_nat_bypass_for_nft_redirect_and_iptables_dnat() {
    let ns = Ns::new("nat");
    ns.nft("table ip nat2 {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  udp dport 53 redirect to :5300\n }\n}\n");
    let r = plan(&ns, None, &[], &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(has(&r, "error", "nat-bypass"), "{:?}", codes(&r));

    let legacy = Ns::new("natlegacy");
    legacy.exec(
        "iptables-legacy",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "192.0.2.1:53",
        ],
    );
    let r = plan(&legacy, None, &[], &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let f = r.json["findings"].as_array().expect("findings");
    assert!(
        f.iter().any(
            |f| f["code"] == "nat-bypass" && f["chain"].as_str().is_some_and(|c| c.contains("iptables-legacy nat"))
        ),
        "{f:?}"
    );
}

#[test]
fn lint_ssh_lockout_when_the_session_port_is_notracked() {
    let ns = Ns::new("ssh");
    ns.nft(STATEFUL);
    let policy = "[[notrack]]\nprotocols = [\"tcp\"]\nports = [22]\naccept_untracked = false\n";
    let env = [("SSH_CONNECTION", "198.18.0.2 50000 198.18.0.1 22")];
    let r = plan(&ns, Some(policy), &[], &env);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(has(&r, "error", "ssh-lockout"), "{:?}", codes(&r));
    // Same policy without an SSH session: still a blackhole, but no lockout finding.
    let r = plan(&ns, Some(policy), &[], &[]);
    assert!(!has(&r, "error", "ssh-lockout"), "{:?}", codes(&r));
}

#[test]
fn lint_warnings_invalid_drop_and_open_resolver() {
    let ns = Ns::new("warn");
    ns.nft(
        "table inet host {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state invalid drop
    ct state established,related accept
    ip saddr 10.0.0.0/8 udp dport 53 ct state new accept
  }
}
",
    );
    let r = plan(&ns, Some("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"), &["--check"], &[]);
    // Issue 12: the inserted accept carries the rule's source restriction, so nothing widens.
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.json);
    assert!(has(&r, "warning", "invalid-drop"), "{:?}", codes(&r));
    assert!(!has(&r, "error", "open-resolver"), "{:?}", codes(&r));
    let ins = r.json["insertions"].as_array().cloned().unwrap_or_default();
    assert!(
        ins.iter().any(|i| i["rule"]["nft"]
            .as_str()
            .unwrap_or("")
            .contains("ip saddr 10.0.0.0/8 udp dport 53 ct state untracked accept")),
        "{ins:?}"
    );
    assert_eq!(r.json["check"]["ok"], true, "{}", r.json);
    // A restriction the accept cannot repeat (an opaque match) is refused as widening.
    ns.nft("flush ruleset\ntable inet host {\n  chain input {\n    type filter hook input priority filter; policy drop;\n    ct state established,related accept\n    meta pkttype host udp dport 53 ct state new accept\n  }\n}\n");
    let r = plan(&ns, Some("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"), &[], &[]);
    assert_eq!(r.code, 3, "{}\n{}", r.stderr, r.json);
    assert!(has(&r, "error", "open-resolver"), "{:?}", codes(&r));
}

/// Issue 12: a blocklist that matches only NEW packets (`ct state new ip saddr X drop`) stops
/// applying once the flow is notracked: an error (`widens-access`), exit 3 without --force.
#[test]
fn a_blocklist_that_matches_only_tracked_packets_is_widening() {
    let ns = Ns::new("wide");
    ns.nft(
        "table inet host {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    ct state new ip saddr 198.51.100.0/24 drop
    udp dport 53 ct state new accept
  }
}
",
    );
    let r = plan(&ns, Some("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"), &[], &[]);
    assert_eq!(r.code, 3, "{}\n{}", r.stderr, r.json);
    assert!(has(&r, "error", "widens-access"), "{:?}", codes(&r));
    let f = r.json["findings"].as_array().cloned().unwrap_or_default();
    assert!(f.iter().any(|f| f["rule"].as_str().unwrap_or("").contains("198.51.100.0/24")), "{f:?}");
}

#[test]
fn plan_plans_iptables_insertions_and_checks_them_in_a_scratch_namespace() {
    let ns = Ns::new("iptplan");
    ns.exec_stdin(
        "iptables-legacy-restore",
        &[],
        "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT\nCOMMIT\n",
    );
    let before = ns.exec("iptables-legacy-save", &[]);
    let r = plan(&ns, Some("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"), &["--check"], &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.json);
    assert_eq!(r.json["check"]["ok"], true);
    let ins = r.json["insertions"].as_array().expect("insertions");
    assert!(ins.iter().any(|i| i["chain"] == "iptables-legacy filter INPUT"), "{ins:?}");
    let strip = |s: &str| s.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(strip(&ns.exec("iptables-legacy-save", &[])), strip(&before), "plan changed the target");
}

#[test]
fn explicit_host_only_sysctl_in_a_namespace_is_exit_2() {
    let ns = Ns::new("sysctl");
    let r = plan(&ns, Some("[sysctl]\n\"net.netfilter.nf_conntrack_max\" = 1048576\n"), &[], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("net.netfilter.nf_conntrack_max"), "{}", r.stderr);
    // A per-namespace key is fine.
    let r = plan(&ns, Some("[sysctl]\n\"net.netfilter.nf_conntrack_udp_timeout\" = 10\n"), &[], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["changed"], true);
}

#[test]
fn bad_netns_is_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .args(["plan", "--netns", "ctg-does-not-exist-0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_ctguard")).args(["plan", "--netns", "../x"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}
