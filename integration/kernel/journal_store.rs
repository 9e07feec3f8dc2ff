//! The journal that stays small (issue 16): a ruleset transaction's large parts are stored
//! apart as compressed, content-addressed snapshots; the record is the index; a record of the
//! previous format (everything inline) still rolls back; a damaged snapshot makes its record
//! damaged — listed by `status`, never acted on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use super::txn_cli::{ok, wait_gone, Ctg};
use crate::harness::{Ns, STATEFUL};

/// A table `inet NAME` with `n` drop rules from `first` on (large enough for its texts to be
/// stored apart).
fn blocklist(name: &str, first: usize, n: usize) -> String {
    let mut text = format!("table inet {name} {{\n\tchain input {{\n");
    text.push_str("\t\ttype filter hook input priority filter - 10; policy accept;\n");
    for i in first..first + n {
        text.push_str(&format!("\t\tip saddr 10.{}.{}.{} counter drop\n", (i >> 16) & 255, (i >> 8) & 255, i & 255));
    }
    text.push_str("\t}\n}\n");
    text
}

/// The namespace gets a large prior ruleset (the base and a 2000-rule `inet old` table); the
/// returned file replaces it with the base and `n` rules in `inet blocklist`.
fn big_setup(ctg: &Ctg, ns: &Ns, n: usize) -> PathBuf {
    ns.nft(STATEFUL);
    ns.nft(&blocklist("old", 100_000, 2000));
    std::fs::create_dir_all(&ctg.base).expect("base");
    let file = ctg.base.join("big.nft");
    std::fs::write(&file, format!("flush ruleset\n{STATEFUL}{}", blocklist("blocklist", 0, n))).expect("write ruleset");
    file
}

fn record_path(ctg: &Ctg, id: &str) -> PathBuf {
    ctg.base.join("state").join("txn").join(format!("{id}.json"))
}

fn snapshot_dir(ctg: &Ctg) -> PathBuf {
    ctg.base.join("state").join("snapshots")
}

fn snapshot_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "zst"))
        .collect();
    v.sort();
    v
}

fn kill_agent(ctg: &Ctg) {
    let pid = ctg.signal_agent(Signal::SIGKILL);
    assert!(wait_gone(pid, Duration::from_secs(5)), "the agent did not die");
}

#[test]
fn a_large_ruleset_transaction_is_stored_apart_and_rolls_back_exactly() {
    let ns = Ns::new("jstore");
    let ctg = Ctg::new();
    let file = big_setup(&ctg, &ns, 3000);
    let before = ns.nft_list();
    let (out, id) = ctg.apply(&ns, &["--timeout", "60s", "--ruleset", file.to_str().expect("utf8")]);
    ok(&out);
    let applied = ns.nft_list();
    assert!(applied.contains("table inet blocklist"), "{applied}");
    // The record is the index: small, referring to its snapshots, which are compressed.
    let rec_bytes = std::fs::read(record_path(&ctg, &id)).expect("record");
    let rec: Value = serde_json::from_slice(&rec_bytes).expect("record json");
    eprintln!("record file: {} bytes; snapshots: {}", rec_bytes.len(), rec["snapshots"]);
    assert!(rec_bytes.len() < 16 << 10, "the record holds {} bytes", rec_bytes.len());
    assert_eq!(rec["version"], 2, "{rec}");
    assert!(rec["ruleset"].is_null() && rec["before"].is_null() && rec["after"].is_null(), "{rec}");
    let refs = rec["snapshots"].as_object().expect("snapshots");
    for part in ["/ruleset", "/before", "/after", "/undo/snapshot/state/nft/1/text"] {
        assert!(refs.contains_key(part), "{part} is not stored apart: {refs:?}");
    }
    let files = snapshot_files(&snapshot_dir(&ctg));
    assert!(!files.is_empty());
    let stored: u64 = files.iter().map(|f| std::fs::metadata(f).expect("meta").len()).sum();
    let raw: u64 = refs.values().map(|r| r["bytes"].as_u64().unwrap_or(0)).sum();
    eprintln!("snapshots: {} files, {stored} bytes for {raw} bytes of parts", files.len());
    assert!(stored * 4 < raw, "compressed {stored} of {raw}");
    // The index verbs work from it; `show` reads the snapshots for its diff.
    let st = ctg.json(&["status"]);
    assert_eq!(st["pending"][0]["id"].as_str(), Some(id.as_str()), "{st}");
    assert!(st["damaged"].as_array().is_none_or(Vec::is_empty), "{st}");
    let hist = ctg.json(&["history"]);
    assert_eq!(hist["transactions"][0]["id"].as_str(), Some(id.as_str()), "{hist}");
    let show = ctg.json(&["show", &id]);
    let diff = show["diff"].as_array().expect("diff");
    assert!(diff.iter().any(|l| l.as_str().unwrap_or("").contains("10.0.7.208")), "{show}");
    // The rollback reads the snapshot back and restores byte for byte.
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ns.nft_list(), before, "the ruleset differs after the rollback");
    // The same file again: its texts are stored already (one file each, shared).
    let (out, id2) = ctg.apply(&ns, &["--timeout", "60s", "--ruleset", file.to_str().expect("utf8")]);
    ok(&out);
    ok(&ctg.run(&["rollback", &id2]));
    let rec2: Value = serde_json::from_slice(&std::fs::read(record_path(&ctg, &id2)).expect("r")).expect("json");
    assert_eq!(rec2["snapshots"]["/ruleset"], rec["snapshots"]["/ruleset"], "one ruleset file, shared");
    assert_eq!(rec2["snapshots"]["/before"], rec["snapshots"]["/before"], "one listing, shared");
    assert_eq!(ns.nft_list(), before);
}

#[test]
fn a_pending_transaction_in_the_previous_format_survives_the_upgrade() {
    let ns = Ns::new("jupgrade");
    let ctg = Ctg::new();
    let file = big_setup(&ctg, &ns, 2000);
    let before = ns.nft_list();
    let (out, id) = ctg.apply(&ns, &["--timeout", "120s", "--ruleset", file.to_str().expect("utf8")]);
    ok(&out);
    let applied = ns.nft_list();
    kill_agent(&ctg);
    // Rewrite the pending record as an older ctguard wrote it: version 1, everything inline,
    // no snapshot directory.
    let j = ctguard::journal::Journal::attach(&ctg.base.join("state")).expect("journal");
    let whole = j.load(&ctguard::txn::TxnId::parse(&id).expect("id")).expect("whole record");
    let mut v = serde_json::to_value(&whole).expect("json");
    v["version"] = 1.into();
    assert!(v.get("snapshots").is_none());
    assert!(v["undo"]["snapshot"]["state"]["nft"].to_string().contains("10.1.134.160"), "the snapshot is inline");
    let path = record_path(&ctg, &id);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).expect("bytes")).expect("write old record");
    std::fs::remove_dir_all(snapshot_dir(&ctg)).expect("remove snapshots");
    assert_eq!(ns.nft_list(), applied);
    // A new agent (this build) recovers it: still pending, then rolled back exactly.
    let st = ctg.json(&["status"]);
    assert_eq!(st["pending"][0]["id"].as_str(), Some(id.as_str()), "{st}");
    assert!(st["damaged"].as_array().is_none_or(Vec::is_empty), "{st}");
    ok(&ctg.run(&["rollback", &id]));
    assert_eq!(ctg.state(&id), "ROLLED_BACK");
    assert_eq!(ns.nft_list(), before, "the old record did not restore the prior ruleset");
    // Its final record is in the new shape.
    let after: Value = serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("json");
    assert_eq!(after["version"], 2, "{after}");
    assert!(!snapshot_files(&snapshot_dir(&ctg)).is_empty());
}

#[test]
fn a_damaged_snapshot_is_listed_and_never_acted_on() {
    for damage in ["missing", "other bytes"] {
        let ns = Ns::new("jdamage");
        let ctg = Ctg::new();
        let file = big_setup(&ctg, &ns, 2000);
        let (out, id) = ctg.apply(&ns, &["--timeout", "3s", "--ruleset", file.to_str().expect("utf8")]);
        ok(&out);
        let applied = ns.nft_list();
        kill_agent(&ctg);
        // The snapshot a rollback would restore the prior tables from.
        let rec: Value = serde_json::from_slice(&std::fs::read(record_path(&ctg, &id)).expect("r")).expect("json");
        let (pointer, r) = rec["snapshots"]
            .as_object()
            .expect("snapshots")
            .iter()
            .find(|(p, _)| p.starts_with("/undo/snapshot/state/"))
            .map(|(p, r)| (p.clone(), r.clone()))
            .expect("a snapshot of the prior state");
        let snap = snapshot_dir(&ctg).join(format!("{}.zst", r["sha256"].as_str().expect("sha")));
        let good = std::fs::read(&snap).expect("snapshot");
        match damage {
            "missing" => std::fs::remove_file(&snap).expect("rm"),
            // Same size, other bytes: only the hash can tell.
            _ => std::fs::write(&snap, vec![0x28u8; good.len()]).expect("overwrite"),
        }
        let st = ctg.json(&["status"]);
        eprintln!("{damage}: status {st}");
        assert!(st["pending"].as_array().is_none_or(Vec::is_empty), "{damage}: {st}");
        let damaged = st["damaged"].to_string();
        assert!(damaged.contains(&id) && damaged.contains(&pointer), "{damage}: {st}");
        // Past the deadline, with an agent asked to roll back: nothing is restored from it.
        let _ = ctg.run(&["rollback"]);
        std::thread::sleep(Duration::from_secs(4));
        assert_eq!(ns.nft_list(), applied, "{damage}: a damaged record was acted on");
        let show = ctg.run(&["show", &id]);
        assert!(!show.status.success(), "{damage}: show of a damaged record succeeded");
        // Tidy: the snapshot back, so the cleanup rolls it back.
        std::fs::write(&snap, &good).expect("restore snapshot");
        if let Some(pid) = ctg.agent_pid() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
            assert!(wait_gone(pid, Duration::from_secs(5)));
        }
    }
}
