//! `ctguard plan --ruleset FILE` (DESIGN §5) against real namespaces: the diff against the live
//! state, the kernel check and the ssh-lockout lint, with the exit codes `apply --ruleset`
//! gives on the same inputs, and nothing changed in the target (compared byte for byte).

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use super::txn_cli::{envelope_of, Ctg};
use crate::harness::{Ns, STATEFUL};

/// The SSH connection the tests claim (`SSH_CONNECTION`): a client on the pair's subnet to
/// port 22, which [`STATEFUL`] accepts.
const SSH: &str = "198.18.0.2 50022 198.18.0.1 22";

/// Everything a ruleset transaction may touch, as the tools print it: `nft list ruleset` and
/// every save of both variants and families (their `#` comment lines carry a date).
fn firewall(ns: &Ns) -> String {
    let mut out = ns.nft_list();
    for tool in ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"] {
        out.push_str(&format!("## {tool}\n"));
        for l in ns.exec(tool, &[]).lines().filter(|l| !l.starts_with('#')) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Writes `text` into the installation's file directory; returns the path.
fn file(ctg: &Ctg, name: &str, text: &[u8]) -> PathBuf {
    let dir = ctg.base.join("files");
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// `ctguard [--json] plan --netns NS --ruleset FILE extra…` with `env`.
fn plan(ctg: &Ctg, ns: &Ns, f: &str, extra: &[&str], env: &[(&str, &str)], json: bool) -> Output {
    let mut args = Vec::new();
    if json {
        args.push("--json");
    }
    args.extend_from_slice(&["plan", "--netns", ns.name(), "--ruleset", f]);
    args.extend_from_slice(extra);
    ctg.run_env(&args, env)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// True when this test itself runs under an SSH connection (an sshd among its ancestors): then
/// plan and apply see that connection even with `SSH_CONNECTION` removed, and the cases
/// "without SSH" cannot be had; they are compared between plan and apply only.
fn tests_run_over_ssh() -> bool {
    ctguard::agent::proof::origin_of(std::process::id() as i32).is_ok_and(|o| o.conn().is_some())
}

/// No agent was asked or started, and no journal was written: `plan --ruleset` needs neither.
fn no_agent_no_journal(ctg: &Ctg) {
    assert!(!ctg.base.join("run/ctguard.sock").exists(), "plan --ruleset started an agent");
    assert!(!ctg.base.join("state").exists(), "plan --ruleset wrote a state dir");
}

#[test]
fn plan_ruleset_nft_shows_the_diff_and_changes_nothing() {
    let ns = Ns::new("prs-nft");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let f = file(&ctg, "add.nft", b"add rule inet host input udp dport 9999 drop\ndelete table inet nosuch\n");
    // A file the kernel refuses as a whole (the table it deletes does not exist): exit 3.
    let before = firewall(&ns);
    let out = plan(&ctg, &ns, s(&f), &[], &[], false);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(firewall(&ns), before);

    let f = file(&ctg, "add.nft", b"add rule inet host input udp dport 9999 drop\n");
    let out = plan(&ctg, &ns, s(&f), &[], &[], true);
    let v = envelope_of(&out, &["plan", "--ruleset"]);
    assert_eq!(v["exit"], 0, "{v}");
    let d = &v["data"];
    assert_eq!(d["kind"], "ruleset");
    assert_eq!(d["format"], "nft");
    assert_eq!(d["changed"], true);
    assert_eq!(d["check"]["ok"], true);
    assert_eq!(d["lint"], if tests_run_over_ssh() { "evaluated" } else { "no-ssh" }, "{d}");
    let diff: Vec<&str> = d["diff"].as_array().expect("diff").iter().filter_map(Value::as_str).collect();
    let added: Vec<&&str> = diff.iter().filter(|l| l.starts_with("+ ")).collect();
    let removed: Vec<&&str> = diff.iter().filter(|l| l.starts_with("- ")).collect();
    assert_eq!(added.len(), 1, "{diff:#?}");
    assert!(added[0].trim_start_matches("+ ").trim() == "udp dport 9999 drop", "{diff:#?}");
    assert!(removed.is_empty(), "{diff:#?}");
    // Context: the rule goes at the end of `inet host input`, after `reject`.
    assert!(diff.iter().any(|l| l.trim() == "reject"), "{diff:#?}");
    assert_eq!(firewall(&ns), before, "plan --ruleset changed the target");

    // The text form shows the same line and says it changes something.
    let out = plan(&ctg, &ns, s(&f), &[], &[], false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("+         udp dport 9999 drop") && text.contains("changed: yes"), "{text}");
    assert!(text.contains("kernel check: ok"), "{text}");

    // A whole-ruleset file equal to what is loaded: nothing changes.
    let same = file(&ctg, "same.nft", format!("flush ruleset\n{STATEFUL}").as_bytes());
    let v = envelope_of(&plan(&ctg, &ns, s(&same), &[], &[], true), &["plan"]);
    assert_eq!(v["data"]["changed"], false, "{v}");
    assert_eq!(v["data"]["diff"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(firewall(&ns), before, "plan --ruleset changed the target");
    no_agent_no_journal(&ctg);
}

/// An iptables dump is planned with the variant `apply` would use: iptables-nft where its
/// tables are in use (or nothing is), iptables-legacy where only legacy tables are; IPv6 with
/// `--format ip6tables`. The diff names the rule under the right save.
#[test]
fn plan_ruleset_iptables_through_iptables_nft_and_iptables_legacy() {
    const BASE: &str = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n";
    const DUMP: &str = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n-A INPUT -p udp -m udp --dport 53 -j ACCEPT\nCOMMIT\n";
    let ctg = Ctg::new();
    let f = file(&ctg, "rules", DUMP.as_bytes());
    for (variant, v6) in [("nft", false), ("legacy", false), ("nft", true), ("legacy", true)] {
        let ns = Ns::new(&format!("prs-{variant}"));
        let restore = format!("{}-{variant}-restore", if v6 { "ip6tables" } else { "iptables" });
        ns.exec_stdin(&restore, &[], BASE);
        let before = firewall(&ns);
        let mut extra = vec![];
        if v6 {
            extra.extend_from_slice(&["--format", "ip6tables"]);
        }
        let out = plan(&ctg, &ns, s(&f), &extra, &[], true);
        let v = envelope_of(&out, &["plan", &restore]);
        assert_eq!(v["exit"], 0, "{restore}: {v}");
        let d = &v["data"];
        assert_eq!(d["format"], "iptables", "{d}");
        assert_eq!(d["family"], if v6 { "ipv6" } else { "ipv4" }, "{d}");
        assert_eq!(d["restore_tool"], restore, "{d}");
        let diff: Vec<&str> = d["diff"].as_array().expect("diff").iter().filter_map(Value::as_str).collect();
        let added: Vec<&&str> = diff.iter().filter(|l| l.starts_with("+ ")).collect();
        // The save shows the new rule (an iptables-nft table is shown by its save, not listed
        // by nft as well: issue 16).
        assert!(added.contains(&&"+ -A INPUT -p udp -m udp --dport 53 -j ACCEPT"), "{restore}: {diff:#?}");
        assert!(added.iter().all(|l| l.contains("dport 53")), "{restore}: {diff:#?}");
        assert_eq!(added.len(), 1, "{restore}: {diff:#?}");
        assert!(diff.iter().all(|l| !l.starts_with("- ")), "{restore}: {diff:#?}");
        let warnings = d["warnings"].to_string();
        assert!(warnings.contains(&format!("applied as {} with {restore}", if v6 { "IPv6" } else { "IPv4" })), "{d}");
        assert_eq!(firewall(&ns), before, "{restore}: plan --ruleset changed the target");

        // A dump the kernel refuses: exit 3, the error names the line.
        let bad = file(&ctg, "bad.rules", DUMP.replace("--dport 53", "--dportx 53").as_bytes());
        let out = plan(&ctg, &ns, s(&bad), &extra, &[], false);
        assert_eq!(out.status.code(), Some(3), "{restore}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("line: 7") && err.contains("--dportx"), "{restore}: {err}");
        assert_eq!(firewall(&ns), before, "{restore}: plan --ruleset changed the target");
    }
    no_agent_no_journal(&ctg);
}

#[test]
fn plan_ruleset_kernel_refusal_is_exit_3_and_names_the_line() {
    let ns = Ns::new("prs-refuse");
    ns.nft(STATEFUL);
    let before = firewall(&ns);
    let ctg = Ctg::new();
    let f = file(&ctg, "bad.nft", b"table inet t {\n  chain c {\n    udp dport 53 acceptx\n  }\n}\n");
    let out = plan(&ctg, &ns, s(&f), &[], &[], false);
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("ctguard: error: the kernel refuses the ruleset file"), "{err}");
    assert!(err.contains(":3:") && err.contains("acceptx"), "names line 3: {err}");
    let v = envelope_of(&plan(&ctg, &ns, s(&f), &[], &[], true), &["plan"]);
    assert_eq!(v["exit"], 3);
    assert_eq!(v["data"]["check"]["ok"], false, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| e.contains(":3:")), "{v}");
    assert_eq!(firewall(&ns), before);
    no_agent_no_journal(&ctg);
}

/// Over SSH, a ruleset that would drop the client's connection is a lint error: exit 3 naming
/// `ssh-lockout`, as `apply` refuses it; with `--force` exit 0 and the finding is kept (apply
/// proceeds past it).
#[test]
fn plan_ruleset_ssh_lockout_is_exit_3_unless_forced() {
    let ns = Ns::new("prs-ssh");
    ns.nft(STATEFUL);
    let before = firewall(&ns);
    let ctg = Ctg::new();
    let f = file(&ctg, "lock.nft", b"insert rule inet host input ip saddr 198.18.0.0/24 drop\n");
    let env = [("SSH_CONNECTION", SSH)];
    let out = plan(&ctg, &ns, s(&f), &[], &env, false);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("[ssh-lockout]") && err.contains("without --force"), "{err}");
    let v = envelope_of(&plan(&ctg, &ns, s(&f), &[], &env, true), &["plan"]);
    assert_eq!(v["exit"], 3);
    assert_eq!(v["data"]["lint"], "evaluated");
    assert!(v["data"]["errors"].as_u64() >= Some(1), "{v}");
    assert!(v["data"]["findings"].as_array().expect("findings").iter().all(|f| f["code"] == "ssh-lockout"), "{v}");

    let v = envelope_of(&plan(&ctg, &ns, s(&f), &["--force"], &env, true), &["plan", "--force"]);
    assert_eq!(v["exit"], 0, "{v}");
    assert!(v["data"]["findings"].as_array().is_some_and(|a| a.iter().any(|f| f["code"] == "ssh-lockout")), "{v}");
    assert!(v["data"]["warnings"].to_string().contains("forced past: error [ssh-lockout]"), "{v}");

    // Without an SSH connection there is nobody to lock out.
    if !tests_run_over_ssh() {
        let v = envelope_of(&plan(&ctg, &ns, s(&f), &[], &[], true), &["plan"]);
        assert_eq!(v["exit"], 0, "{v}");
        assert_eq!(v["data"]["lint"], "no-ssh");
    }
    // The same client, a rule that leaves port 22 alone: clean.
    let ok = file(&ctg, "ok.nft", b"insert rule inet host input ip saddr 198.18.0.0/24 udp dport 9999 drop\n");
    let v = envelope_of(&plan(&ctg, &ns, s(&ok), &[], &env, true), &["plan"]);
    assert_eq!(v["exit"], 0, "{v}");
    assert_eq!(v["data"]["findings"], serde_json::json!([]), "{v}");
    assert_eq!(firewall(&ns), before);
    no_agent_no_journal(&ctg);
}

#[test]
fn plan_ruleset_bad_inputs_are_exit_2_with_one_line() {
    let ns = Ns::new("prs-bad");
    ns.nft(STATEFUL);
    let before = firewall(&ns);
    let ctg = Ctg::new();
    let good = file(&ctg, "good.nft", b"add rule inet host input udp dport 9999 drop\n");
    let not_utf8 = file(&ctg, "bin.nft", b"add rule inet host input \xff\xfe drop\n");
    let mixed = file(
        &ctg,
        "mixed.rules",
        b"*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 10.0.0.1 -j ACCEPT\n-A INPUT -s 2001:db8::1 -j ACCEPT\nCOMMIT\n",
    );
    let missing = ctg.base.join("files/missing.nft");
    let dir = ctg.base.join("files");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("missing file", vec!["plan", "--netns", ns.name(), "--ruleset", s(&missing)], "missing.nft"),
        ("a directory", vec!["plan", "--netns", ns.name(), "--ruleset", s(&dir)], "--ruleset"),
        ("not UTF-8", vec!["plan", "--netns", ns.name(), "--ruleset", s(&not_utf8)], "not UTF-8"),
        ("unknown format", vec!["plan", "--netns", ns.name(), "--ruleset", s(&good), "--format", "xml"], "'xml'"),
        ("format without ruleset", vec!["plan", "--netns", ns.name(), "--format", "nft"], "--ruleset"),
        ("force without ruleset", vec!["plan", "--netns", ns.name(), "--force"], "--ruleset"),
        ("ruleset and a policy", vec!["plan", "--netns", ns.name(), "--ruleset", s(&good), "p.toml"], "cannot be used"),
        ("mixed families", vec!["plan", "--netns", ns.name(), "--ruleset", s(&mixed)], "mixes IPv4"),
        ("no such namespace", vec!["plan", "--netns", "ctg-no-such-ns-0", "--ruleset", s(&good)], "ctg-no-such-ns-0"),
    ];
    for (what, args, needle) in cases {
        let out = ctg.run(&args);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(err.starts_with("ctguard: error: ") && err.contains(needle), "{what}: {err}");
        assert!(out.stdout.is_empty(), "{what}: {}", String::from_utf8_lossy(&out.stdout));
        // Under --json: the one envelope, exit 2.
        let mut j = vec!["--json"];
        j.extend_from_slice(&args);
        let v = envelope_of(&ctg.run(&j), &j);
        assert_eq!(v["exit"], 2, "{what}: {v}");
    }
    assert_eq!(firewall(&ns), before);
    no_agent_no_journal(&ctg);
}

/// One case of [`plan_and_apply_ruleset_give_the_same_verdict`].
struct Case {
    name: &'static str,
    /// Loaded into the namespace first: (restore tool or `nft`, text).
    setup: &'static [(&'static str, &'static str)],
    /// The file (`None`: a path that does not exist).
    file: Option<&'static str>,
    extra: &'static [&'static str],
    ssh: bool,
    /// The exit code both must give.
    exit: i32,
}

const LEGACY_BASE: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT\nCOMMIT\n";
const DUMP_OK: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -p udp -m udp --dport 9999 -j DROP\nCOMMIT\n";
const DUMP_LOCKOUT: &str =
    "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n";

const CASES: &[Case] = &[
    Case {
        name: "nft ok",
        setup: &[("nft", STATEFUL)],
        file: Some("add rule inet host input udp dport 9999 drop\n"),
        extra: &[],
        ssh: false,
        exit: 0,
    },
    Case {
        name: "nft ok over ssh",
        setup: &[("nft", STATEFUL)],
        file: Some("add rule inet host input udp dport 9999 drop\n"),
        extra: &[],
        ssh: true,
        exit: 0,
    },
    Case {
        name: "nft refused by the kernel",
        setup: &[("nft", STATEFUL)],
        file: Some("add rule inet host input udp dport 9999 dropx\n"),
        extra: &[],
        ssh: false,
        exit: 3,
    },
    Case {
        name: "nft ssh-lockout",
        setup: &[("nft", STATEFUL)],
        file: Some("insert rule inet host input drop\n"),
        extra: &[],
        ssh: true,
        exit: 3,
    },
    Case {
        name: "nft ssh-lockout forced",
        setup: &[("nft", STATEFUL)],
        file: Some("insert rule inet host input drop\n"),
        extra: &["--force"],
        ssh: true,
        exit: 0,
    },
    Case {
        name: "nft ssh-lockout without ssh",
        setup: &[("nft", STATEFUL)],
        file: Some("insert rule inet host input drop\n"),
        extra: &[],
        ssh: false,
        exit: 0,
    },
    Case { name: "iptables-nft dump ok", setup: &[], file: Some(DUMP_OK), extra: &[], ssh: false, exit: 0 },
    Case {
        name: "iptables-legacy dump ok",
        setup: &[("iptables-legacy-restore", LEGACY_BASE)],
        file: Some(DUMP_OK),
        extra: &["--format", "iptables"],
        ssh: true,
        exit: 0,
    },
    Case { name: "iptables dump ssh-lockout", setup: &[], file: Some(DUMP_LOCKOUT), extra: &[], ssh: true, exit: 3 },
    Case {
        name: "iptables-legacy dump ssh-lockout forced",
        setup: &[("iptables-legacy-restore", LEGACY_BASE)],
        file: Some(DUMP_LOCKOUT),
        extra: &["--force"],
        ssh: true,
        exit: 0,
    },
    Case {
        name: "iptables dump given as nft",
        setup: &[],
        file: Some(DUMP_OK),
        extra: &["--format", "nft"],
        ssh: false,
        exit: 3,
    },
    Case {
        name: "mixed families",
        setup: &[],
        file: Some("*filter\n-A INPUT -s 10.0.0.1 -j ACCEPT\n-A INPUT -s 2001:db8::1 -j ACCEPT\nCOMMIT\n"),
        extra: &[],
        ssh: false,
        exit: 2,
    },
    Case { name: "missing file", setup: &[], file: None, extra: &[], ssh: false, exit: 2 },
];

/// `plan --ruleset` and `apply --ruleset` on the same inputs give the same exit code (they
/// share one preparation); where apply succeeds, its rollback brings the namespace back.
#[test]
fn plan_and_apply_ruleset_give_the_same_verdict() {
    let ctg = Ctg::new();
    let over_ssh = tests_run_over_ssh();
    for (i, c) in CASES.iter().enumerate() {
        let ns = Ns::new(&format!("prs-same-{i}"));
        for (tool, text) in c.setup {
            match *tool {
                "nft" => ns.nft(text),
                t => {
                    ns.exec_stdin(t, &[], text);
                }
            }
        }
        let before = firewall(&ns);
        let path = match c.file {
            Some(t) => file(&ctg, &format!("case{i}"), t.as_bytes()),
            None => ctg.base.join("files/does-not-exist"),
        };
        let env: Vec<(&str, &str)> = if c.ssh { vec![("SSH_CONNECTION", SSH)] } else { vec![] };
        let p = plan(&ctg, &ns, s(&path), c.extra, &env, false);
        if c.ssh || !over_ssh {
            assert_eq!(p.status.code(), Some(c.exit), "{}: plan: {}", c.name, stderr(&p));
        }
        assert_eq!(firewall(&ns), before, "{}: plan changed the target", c.name);
        let mut args = vec!["--json", "apply", "--netns", ns.name(), "--timeout", "60s", "--ruleset", s(&path)];
        args.extend_from_slice(c.extra);
        let a = ctg.run_env(&args, &env);
        assert_eq!(a.status.code(), p.status.code(), "{}: apply: {}\nplan: {}", c.name, stderr(&a), stderr(&p));
        if a.status.code() != Some(0) {
            // Both say the same: one line, the same text (the lint's errors after "without
            // --force: ", where plan says what apply would do).
            let (pe, ae) = (stderr(&p), stderr(&a));
            assert_eq!(pe.lines().count(), 1, "{}: {pe}", c.name);
            let errors = |e: &str| e.split_once("without --force: ").map(|(_, r)| r.to_string());
            if pe.contains("lint found") {
                assert!(pe.contains("[ssh-lockout]"), "{}: {pe}", c.name);
                assert_eq!(errors(&pe), errors(&ae), "{}:\nplan:  {pe}\napply: {ae}", c.name);
            } else {
                assert_eq!(pe, ae, "{}", c.name);
            }
            assert_eq!(firewall(&ns), before, "{}: a refused apply changed the target", c.name);
            continue;
        }
        let v = envelope_of(&a, &args);
        let id = v["data"]["txid"].as_str().expect("txid").to_string();
        if v["data"]["state"] == "PENDING" {
            let out = ctg.run(&["rollback", &id]);
            assert_eq!(out.status.code(), Some(0), "{}: rollback: {}", c.name, stderr(&out));
            assert_eq!(firewall(&ns), before, "{}: rollback", c.name);
        }
    }
}

/// A transaction pending on the target: `apply --ruleset` is refused with exit 4 before it
/// reads anything, and `plan --ruleset` says the same (from the journal, without the agent).
#[test]
fn plan_ruleset_while_a_transaction_is_pending_is_exit_4_as_apply() {
    let ns = Ns::new("prs-busy");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    let f = file(&ctg, "add.nft", b"add rule inet host input udp dport 9999 drop\n");
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let during = firewall(&ns);
    let p = plan(&ctg, &ns, s(&f), &[], &[], false);
    assert_eq!(p.status.code(), Some(4), "{}", stderr(&p));
    let err = stderr(&p);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&id) && err.contains("pending"), "{err}");
    let a = ctg.run(&["apply", "--netns", ns.name(), "--ruleset", s(&f)]);
    assert_eq!(a.status.code(), Some(4), "{}", stderr(&a));
    assert!(stderr(&a).contains(&id), "{}", stderr(&a));
    assert_eq!(firewall(&ns), during);
    let out = ctg.run(&["rollback", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Once it ended, both go ahead.
    let p = plan(&ctg, &ns, s(&f), &[], &[], false);
    assert_eq!(p.status.code(), Some(0), "{}", stderr(&p));
}
