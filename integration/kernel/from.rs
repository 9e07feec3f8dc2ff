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
