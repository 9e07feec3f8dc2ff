//! Issue 13: return to any committed state (`apply --from TXID`) and who and why (`--comment`,
//! the person behind the uid).

use super::txn_cli::{ok, Ctg};
use crate::harness::{Ns, STATEFUL};

/// The listing with transaction tags blanked (two transactions of the same content differ
/// only there).
fn untagged(listing: &str) -> String {
    listing
        .lines()
        .map(|l| match l.find("ctguard:") {
            Some(i) => format!("{}ctguard:TXID{}", &l[..i], &l[(i + 28).min(l.len())..]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn apply_from_returns_to_an_earlier_committed_policy_and_its_rollback_to_the_later_one() {
    let ns = Ns::new("from-pol");
    ns.nft(STATEFUL);
    let mut ctg = Ctg::new();
    ctg.env.push(("SUDO_USER".into(), "alice".into()));
    std::fs::create_dir_all(&ctg.base).expect("base");
    let (out, a) = ctg.apply(&ns, &["--timeout", "60s", "--comment", "first: DNS notrack"]);
    ok(&out);
    ok(&ctg.run(&["confirm", &a]));
    let after_a = ns.nft_list();
    let b_file = ctg.base.join("b.toml");
    std::fs::write(&b_file, "[[notrack]]\nprotocols = [\"udp\"]\nports = [5353]\n").expect("policy");
    let (out, b) = ctg.apply(&ns, &["--timeout", "60s", b_file.to_str().expect("utf8")]);
    ok(&out);
    ok(&ctg.run(&["confirm", &b]));
    let after_b = ns.nft_list();
    assert!(after_b.contains("5353"));
    let plan = ctg.json(&["--netns", ns.name(), "plan", "--from", &a]);
    assert_eq!(plan["changed"], true, "{plan}");
    // Back to A, dead-man protected: the rollback gives B back exactly.
    let out = ctg.run(&["--json", "apply", "--from", &a, "--timeout", "60s"]);
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let c = v["data"]["txid"].as_str().expect("txid").to_string();
    assert_eq!(untagged(&ns.nft_list()), untagged(&after_a), "--from {a} is not A's state");
    ok(&ctg.run(&["rollback", &c]));
    assert_eq!(ns.nft_list(), after_b, "the rollback of --from is not B's state");
    // Again, confirmed this time: A's content committed anew.
    let out = ctg.run(&["--json", "apply", "--from", &a, "--timeout", "60s"]);
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let d = v["data"]["txid"].as_str().expect("txid").to_string();
    ok(&ctg.run(&["confirm", &d]));
    assert_eq!(untagged(&ns.nft_list()), untagged(&after_a));
    // Who and why.
    let h = ctg.json(&["history"]);
    let first = h["transactions"].as_array().expect("list").iter().find(|t| t["id"] == a.as_str()).expect("A").clone();
    assert_eq!(first["comment"], "first: DNS notrack", "{first}");
    assert_eq!(first["requester"]["person"], "alice (SUDO_USER)", "{first}");
    let show = ctg.json(&["show", &d]);
    assert_eq!(show["comment"], format!("re-applies what {a} committed"), "{show}");
    let text = String::from_utf8_lossy(&ctg.run(&["show", &a]).stdout).into_owned();
    assert!(text.contains("comment:   first: DNS notrack") && text.contains("(alice (SUDO_USER))"), "{text}");
}

#[test]
fn apply_from_a_committed_ruleset_and_bad_uses() {
    let ns = Ns::new("from-rs");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    std::fs::create_dir_all(&ctg.base).expect("base");
    let file = ctg.base.join("r.nft");
    std::fs::write(&file, format!("flush ruleset\n{STATEFUL}table inet extra {{\n}}\n")).expect("write");
    let (out, r) = ctg.apply(&ns, &["--timeout", "60s", "--ruleset", file.to_str().expect("utf8")]);
    ok(&out);
    ok(&ctg.run(&["confirm", &r]));
    let committed = ns.nft_list();
    ns.nft("delete table inet extra\n");
    let out = ctg.run(&["--json", "apply", "--from", &r, "--timeout", "60s"]);
    ok(&out);
    assert_eq!(ns.nft_list(), committed, "--from a ruleset transaction restores what it committed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    ok(&ctg.run(&["rollback", v["data"]["txid"].as_str().expect("txid")]));
    // Refused, nothing changed: an unknown id, a transaction that did not commit, a comment
    // with a newline.
    let before = ns.nft_list();
    let out = ctg.run(&["apply", "--from", "20261204-000000-abcd"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let rolled = v["data"]["txid"].as_str().expect("txid");
    let out = ctg.run(&["apply", "--from", rolled]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not committed"), "{out:?}");
    let out = ctg.run(&["apply", "--netns", ns.name(), "--comment", "two\nlines"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(ns.nft_list(), before);
}

const TIMEOUT_KEY: &str = "net/netfilter/nf_conntrack_udp_timeout";

fn udp_timeout(ns: &Ns) -> String {
    ns.exec("cat", &[&format!("/proc/sys/{TIMEOUT_KEY}")]).trim().to_string()
}

/// The target's firewall as its backend sees it: nft's listing, and for iptables-nft the raw
/// tables through `iptables-nft-save` (nft lists chains of a restored iptables-nft table in
/// another order; the iptables view is the contract there, README "Ruleset transactions").
fn firewall(ns: &Ns, backend: &str) -> String {
    let nft = ns.nft_list();
    if backend == "nft" {
        return nft;
    }
    let mut out = String::new();
    let mut skip = false;
    for l in nft.lines() {
        if l.starts_with("table ") {
            skip = l.starts_with("table ip raw") || l.starts_with("table ip6 raw");
        }
        if !skip {
            out.push_str(l);
            out.push('\n');
        }
    }
    for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
        for l in ns.exec(tool, &["-t", "raw"]).lines().filter(|l| !l.starts_with('#')) {
            out.push_str(&l.replace(|c: char| c.is_ascii_digit(), "0"));
            out.push('\n');
        }
    }
    out
}

/// `apply --remove` after two committed policies: the host ruleset and the sysctl are what they
/// were before ctguard's first commit; its rollback gives the last committed state back.
fn remove_round_trip(backend: &str) {
    let ns = Ns::new(&format!("rm-{backend}"));
    ns.nft(STATEFUL);
    let before = (firewall(&ns, backend), udp_timeout(&ns));
    let ctg = Ctg::new();
    std::fs::create_dir_all(&ctg.base).expect("base");
    let policy = |name: &str, port: u16, timeout: u32| {
        let f = ctg.base.join(name);
        std::fs::write(
            &f,
            format!("backend = \"{backend}\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [{port}]\n[sysctl]\n\"net.netfilter.nf_conntrack_udp_timeout\" = {timeout}\n"),
        )
        .expect("policy");
        f.display().to_string()
    };
    for (file, port, t) in [("a.toml", 53, 10), ("b.toml", 5353, 5)] {
        let (out, id) = ctg.apply(&ns, &["--timeout", "60s", &policy(file, port, t)]);
        ok(&out);
        ok(&ctg.run(&["confirm", &id]));
    }
    let after_b = (firewall(&ns, backend), udp_timeout(&ns));
    assert_eq!(after_b.1, "5");
    // `plan --remove` shows it, changes nothing.
    let plan = ctg.json(&["--netns", ns.name(), "plan", "--remove"]);
    assert_eq!(plan["changed"], true, "{plan}");
    assert_eq!((firewall(&ns, backend), udp_timeout(&ns)), after_b);
    let (out, r) = ctg.apply(&ns, &["--remove", "--timeout", "60s"]);
    ok(&out);
    assert_eq!(
        (firewall(&ns, backend), udp_timeout(&ns)),
        before,
        "{backend}: --remove is not the state before ctguard"
    );
    ok(&ctg.run(&["rollback", &r]));
    assert_eq!((firewall(&ns, backend), udp_timeout(&ns)), after_b, "{backend}: the rollback of --remove");
    let (out, r) = ctg.apply(&ns, &["--remove", "--timeout", "60s"]);
    ok(&out);
    ok(&ctg.run(&["confirm", &r]));
    assert_eq!((firewall(&ns, backend), udp_timeout(&ns)), before);
    let st = ctg.json(&["status"]);
    assert!(st["committed"].as_array().is_none_or(Vec::is_empty), "nothing is guarded after --remove: {st}");
    // Nothing committed any more: a second --remove has nothing to remove.
    let out = ctg.run(&["apply", "--netns", ns.name(), "--remove"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn apply_remove_round_trips_with_nft() {
    remove_round_trip("nft");
}

#[test]
fn apply_remove_round_trips_with_iptables_nft() {
    remove_round_trip("iptables-nft");
}

/// Issue 12 (one planning core): `plan` runs apply's preparation, so it shows the removal of
/// the committed transaction's accepts that an apply of another policy performs, and its
/// kernel check passes on the same documents apply then applies.
#[test]
fn plan_shows_the_removal_of_the_committed_accepts_that_apply_performs() {
    let ns = Ns::new("plan-rm");
    ns.nft(STATEFUL);
    let ctg = Ctg::new();
    std::fs::create_dir_all(&ctg.base).expect("base");
    let (out, a) = ctg.apply(&ns, &["--timeout", "60s"]);
    ok(&out);
    ok(&ctg.run(&["confirm", &a]));
    assert!(ns.nft_list().contains(&a), "the committed accepts carry {a}");
    let b_file = ctg.base.join("b.toml");
    std::fs::write(&b_file, "[[notrack]]\nprotocols = [\"udp\"]\nports = [53, 5353]\n").expect("policy");
    let b_path = b_file.to_str().expect("utf8");
    let plan = ctg.json(&["--netns", ns.name(), "plan", "--check", b_path]);
    let removals = plan["removals"].as_array().cloned().unwrap_or_default();
    assert!(!removals.is_empty(), "{plan}");
    assert!(removals.iter().all(|r| r.as_str().unwrap_or("").contains(&a)), "{removals:?}");
    assert_eq!(plan["check"]["ok"], true, "{plan}");
    let text = String::from_utf8_lossy(&ctg.run(&["--netns", ns.name(), "plan", b_path]).stdout).into_owned();
    assert!(text.lines().any(|l| l.trim_start().starts_with("- ") && l.contains(&a)), "{text}");
    // The apply does what the plan said: the committed accepts go, the new ones come.
    let (out, b) = ctg.apply(&ns, &["--timeout", "60s", b_path]);
    ok(&out);
    let listing = ns.nft_list();
    assert!(!listing.contains(&a) && listing.contains(&b), "{listing}");
    ok(&ctg.run(&["rollback", &b]));
    assert!(ns.nft_list().contains(&a), "rolled back to the committed accepts");
}

/// The committed policy planned again: its accepts are re-planned identically, so nothing
/// changes (`changed: false`, what Ansible's idempotence rests on), on nft and iptables-nft.
#[test]
fn plan_of_the_committed_policy_changes_nothing() {
    for backend in ["nft", "iptables-nft"] {
        let ns = Ns::new("plan-same");
        ns.nft(STATEFUL);
        let ctg = Ctg::new();
        std::fs::create_dir_all(&ctg.base).expect("base");
        let p = ctg.base.join("p.toml");
        std::fs::write(&p, format!("backend = \"{backend}\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"))
            .expect("policy");
        let p = p.to_str().expect("utf8");
        let (out, id) = ctg.apply(&ns, &["--timeout", "60s", p]);
        ok(&out);
        ok(&ctg.run(&["confirm", &id]));
        let plan = ctg.json(&["--netns", ns.name(), "plan", "--check", p]);
        assert_eq!(plan["changed"], false, "{backend}: {plan}");
        assert_eq!(plan["accepts_unchanged"], true, "{backend}: {plan}");
        assert!(!plan["removals"].as_array().is_some_and(|a| a.is_empty()), "{backend}: {plan}");
        let text = String::from_utf8_lossy(&ctg.run(&["--netns", ns.name(), "plan", p]).stdout).into_owned();
        assert!(text.contains("in place: the committed transaction's"), "{text}");
    }
}
