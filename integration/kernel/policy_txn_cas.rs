//! Generation-id compare-and-swap and bounded waits of policy transactions against the real
//! kernel (`cargo test --test kernel policy_txn_cas`, as root): another writer's change
//! injected between ctguard's read and its commit (the test-only fault points of
//! `ctguard::fault`, active on the test's namespace thread only) is refused with a retryable
//! error and nothing of ctguard's left behind, a rollback raced the same way reads again and
//! succeeds, and a held xtables lock fails a legacy apply and rollback in bounded time with a
//! clear message, then they succeed once it is free. Each test has its own namespace.

use std::time::{Duration, Instant};

use ctguard::agent::engine::{ApplyInput, Engine, EngineError, Undo};
use ctguard::agent::policy_engine::PolicyEngine;
use ctguard::backend::exec::with_xtables_wait;
use ctguard::backend::netlink::get_genid;
use ctguard::backend::policy_txn::{apply, rollback, PolicyTxnError};
use ctguard::exit::Exit;
use ctguard::fault::{inject, FOREIGN_TABLE};
use ctguard::model::names::Tag;

use crate::harness::Ns;
use crate::policy_txn::{app, assert_same, back, chain, facts, list, policy, prep, request, HOST_FW, LEGACY_FW, UDP53};

/// Removes the injected foreign table (so the listing can be compared with the one before)
/// and fails the test when it is not there: the injection must have happened.
fn drop_foreign(ns: &Ns) {
    let listed = ns.exec("nft", &["list", "tables"]);
    assert!(listed.contains(FOREIGN_TABLE), "the foreign change was not injected: {listed}");
    ns.exec("nft", &["delete", "table", "ip", FOREIGN_TABLE]);
}

fn input(toml: &str, id: &str) -> ApplyInput {
    ApplyInput {
        policy: policy(toml),
        ruleset: None,
        tag: Tag::new(id).unwrap_or_else(|e| panic!("{e}")),
        force: false,
        ssh: None,
        previous_undo: None,
        facts: facts(),
    }
}

/// prepare + apply through the agent's engine, with `point` firing once on the namespace thread.
fn engine_apply_with(ns: &Ns, point: &str, inp: &ApplyInput) -> (Result<Undo, EngineError>, usize) {
    ns.run(|| inject(point, 1, || PolicyEngine.prepare(inp).and_then(|p| p.apply())))
}

#[test]
fn a_foreign_change_after_the_read_is_refused_as_retryable_with_nothing_applied() {
    let ns = Ns::new("cas-prepare");
    ns.nft(HOST_FW);
    let before = list(&ns, &[]);
    let inp = input(UDP53, "cas-p1");
    let (res, fired) = engine_apply_with(&ns, "prepare:foreign-change", &inp);
    assert_eq!(fired, 1);
    let err = res.err().unwrap_or_else(|| panic!("an apply planned on a stale read must be refused"));
    eprintln!("policy_txn_cas: prepare:foreign-change: {}", err.message);
    assert!(err.retry, "a generation-id conflict is retryable: {err:?}");
    assert_eq!(err.exit, Exit::Refused, "{err:?}");
    assert!(err.message.contains("changed since it was read"), "{}", err.message);
    drop_foreign(&ns);
    assert_same(&before, &list(&ns, &[]), "nothing of ctguard's is applied");

    // Re-read and re-plan: the retry goes through, and rolls back exactly.
    let p = prep(&ns, &request(&policy(UDP53), "cas-p2", None));
    let u = app(&ns, &p);
    assert!(list(&ns, &[]).contains("ctguard:cas-p2"));
    back(&ns, &u);
    assert_same(&before, &list(&ns, &[]), "rolled back");
}

#[test]
fn a_foreign_change_before_the_batch_is_refused_by_the_kernel_as_retryable() {
    let ns = Ns::new("cas-batch");
    ns.nft(HOST_FW);
    let before = list(&ns, &[]);
    let prepared = prep(&ns, &request(&policy(UDP53), "cas-b1", None));
    let (res, fired) = ns.run(|| inject("apply:foreign-change", 1, || apply(&prepared)));
    assert_eq!(fired, 1);
    let err = res.err().unwrap_or_else(|| panic!("a batch on a moved generation id must be refused"));
    eprintln!("policy_txn_cas: apply:foreign-change (nft): {}", chain(&err));
    assert!(matches!(err, PolicyTxnError::GenerationChanged { .. }), "{}", chain(&err));
    assert!(err.retryable());
    assert_eq!(err.exit(), Exit::Refused);
    drop_foreign(&ns);
    assert_same(&before, &list(&ns, &[]), "nothing of ctguard's is applied");
}

/// Regression (issue 16: a fresh apply now creates `table inet ctguard` instead of declaring,
/// deleting and recreating it, so its commit leaves nf_tables nothing to destroy): another
/// writer that creates a `table inet ctguard` of its own between ctguard's read (which found
/// none) and the commit never gets ctguard's chains and rules added to it — the commit is
/// refused (the generation id moved; the table's NEWTABLE is exclusive besides) and the other
/// writer's table is left exactly as it was.
#[test]
fn a_ctguard_table_created_after_the_read_is_never_appended_to() {
    let ns = Ns::new("cas-create");
    ns.nft(HOST_FW);
    let prepared = prep(&ns, &request(&policy(UDP53), "cas-c1", None));
    let theirs = "table inet ctguard {\n\tchain mine {\n\t\tcounter packets 0 bytes 0\n\t}\n}\n";
    ns.nft(theirs);
    let before = list(&ns, &[]);
    let err = ns
        .run(|| apply(&prepared))
        .err()
        .unwrap_or_else(|| panic!("a commit over a table created since must be refused"));
    eprintln!("policy_txn_cas: table created since the read: {}", chain(&err));
    assert!(err.retryable(), "{}", chain(&err));
    assert_same(&before, &list(&ns, &[]), "the other writer's table is untouched, nothing of ctguard's applied");
    let listed = ns.exec("nft", &["list", "table", "inet", "ctguard"]);
    assert!(listed.contains("chain mine") && !listed.contains("prerouting"), "{listed}");
}

#[test]
fn a_generation_moved_past_ctguards_own_iptables_nft_step_undoes_it_and_is_retryable() {
    let ns = Ns::new("cas-iptnft");
    ns.nft(HOST_FW);
    // An iptables-nft filter table that drops by default: ctguard inserts its accept rule there
    // with iptables-nft-restore (its own commit, moving the generation id by one) before the
    // nft batch.
    ns.exec_stdin("iptables-nft-restore", &["-w"], LEGACY_FW);
    let before = list(&ns, &[]);
    let mut inp = input(UDP53, "cas-i1");
    let (res, fired) = engine_apply_with(&ns, "apply:foreign-change", &inp);
    assert_eq!(fired, 1);
    let err = res.err().unwrap_or_else(|| panic!("a foreign change during apply must be refused"));
    eprintln!("policy_txn_cas: apply:foreign-change (iptables-nft step): {}", err.message);
    assert!(err.retry, "{err:?}");
    assert_eq!(err.exit, Exit::Refused, "{err:?}");
    assert!(
        err.message.contains("another writer changed the ruleset")
            && err.message.contains("moved by 2, ctguard's own commits account for 1")
            && err.message.contains("what this attempt applied was rolled back"),
        "{}",
        err.message
    );
    drop_foreign(&ns);
    assert_same(&before, &list(&ns, &[]), "the iptables-nft insertion is undone, nothing else applied");

    // The retry (re-read, re-plan) goes through, and rolls back exactly.
    inp.tag = Tag::new("cas-i2").unwrap_or_else(|e| panic!("{e}"));
    let undo = ns
        .run(|| PolicyEngine.prepare(&inp).and_then(|p| p.apply()))
        .unwrap_or_else(|e| panic!("retry: {}", e.message));
    let after = list(&ns, &[]);
    assert!(after.contains("ctguard:cas-i2") && after.contains("-A INPUT"), "{after}");
    ns.run(|| PolicyEngine.rollback(&undo)).unwrap_or_else(|e| panic!("rollback: {}", e.message));
    assert_same(&before, &list(&ns, &[]), "rolled back");
}

#[test]
fn a_rollback_raced_between_its_read_and_its_batch_reads_again_and_succeeds() {
    let ns = Ns::new("cas-rollback");
    ns.nft(HOST_FW);
    let before = list(&ns, &[]);
    let a = policy(UDP53);
    let b = policy("backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53, 5353]\n");
    let undo_a = app(&ns, &prep(&ns, &request(&a, "cas-r-a", None)));
    let after_a = list(&ns, &[]);
    // B replaces A: its rollback puts A's table and accept rule back (nft -f), then deletes B's
    // tagged rules in a batch guarded by the generation id of their read.
    let undo_b = app(&ns, &prep(&ns, &request(&b, "cas-r-b", Some(undo_a.clone()))));
    assert!(!undo_b.removed_previous.is_empty());
    for (u, expected, what) in [(&undo_b, &after_a, "B rolled back: A exactly"), (&undo_a, &before, "A rolled back")] {
        let (res, fired) = ns.run(|| inject("rollback:foreign-change", 1, || rollback(u)));
        assert_eq!(fired, 1, "{what}: the fault point must fire once");
        let report = res.unwrap_or_else(|e| panic!("{what}: {}", chain(&e)));
        eprintln!("policy_txn_cas: {what}: {:?}", report.warnings);
        assert!(
            report.warnings.iter().any(|w| w.contains("between the rollback's read and its batch; read again")),
            "{what}: the first batch must have been refused and the read redone: {:?}",
            report.warnings
        );
        drop_foreign(&ns);
        assert_same(expected, &list(&ns, &[]), what);
    }
}

/// An iptables-nft host: the stateful filter in both families, a raw table in IPv4 only (so
/// apply creates `table ip6 raw` and the rollback must remove it again).
fn iptables_nft_host(ns: &Ns) {
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    ns.exec_stdin("iptables-nft-restore", &["-w"], &format!("{LEGACY_FW}{raw}"));
    ns.exec_stdin("ip6tables-nft-restore", &["-w"], LEGACY_FW);
}

const IPT_NFT_UDP_TCP_53: &str =
    "backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n";

#[test]
fn an_iptables_nft_rollback_is_one_kernel_transaction_for_both_families_and_tables() {
    let ns = Ns::new("cas-ipt-one");
    iptables_nft_host(&ns);
    let before = list(&ns, &[]);
    let undo = app(&ns, &prep(&ns, &request(&policy(IPT_NFT_UDP_TCP_53), "cas-ipt-one", None)));
    assert!(undo.ipt_insertions.iter().any(|i| i.v6) && undo.ipt_insertions.iter().any(|i| !i.v6), "{undo:?}");
    let genid = || ns.run(get_genid).unwrap_or_else(|e| panic!("genid: {e}"));
    let g0 = genid();
    let report = ns.run(|| rollback(&undo)).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
    // The restores took one commit per family (and an `nft -f` for the ip6 raw table
    // iptables-nft created): at least three generations.
    assert_eq!(genid().wrapping_sub(g0), 1, "one nf_tables commit: {:?}", report.warnings);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_same(&before, &list(&ns, &[]), "rolled back: both families, raw and filter, the created ip6 raw table gone");
}

#[test]
fn an_iptables_nft_rollback_raced_between_its_read_and_its_batch_reads_again_and_succeeds() {
    let ns = Ns::new("cas-ipt-race");
    iptables_nft_host(&ns);
    let before = list(&ns, &[]);
    let undo = app(&ns, &prep(&ns, &request(&policy(IPT_NFT_UDP_TCP_53), "cas-ipt-race", None)));
    let (res, fired) = ns.run(|| inject("rollback:foreign-change", 1, || rollback(&undo)));
    assert_eq!(fired, 1, "the fault point must fire once");
    let report = res.unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
    assert!(
        report.warnings.iter().any(|w| w.contains("between the rollback's read and its batch; read again")),
        "the first batch must have been refused and the read redone: {:?}",
        report.warnings
    );
    drop_foreign(&ns);
    assert_same(&before, &list(&ns, &[]), "rolled back after the race");
}

#[test]
fn an_iptables_nft_apply_keeps_the_handles_the_kernel_announced_for_its_rules() {
    let ns = Ns::new("cas-ipt-hints");
    iptables_nft_host(&ns);
    let undo = app(&ns, &prep(&ns, &request(&policy(IPT_NFT_UDP_TCP_53), "cas-ipt-hints", None)));
    let hints = &undo.ipt_nft_handles;
    assert_eq!(hints.len(), undo.ipt_insertions.len(), "one per inserted rule: {hints:?}");
    for h in hints {
        let fam = if h.v6 { "ip6" } else { "ip" };
        assert!(h.line.contains("--comment \"ctguard:cas-ipt-hints\""), "{h:?}");
        let listed = ns.exec("nft", &["-a", "list", "chain", fam, &h.table, &h.chain]);
        let at = listed
            .lines()
            .find(|l| l.trim_end().ends_with(&format!("# handle {}", h.handle)))
            .unwrap_or_else(|| panic!("handle {} not in {fam} {} {}:\n{listed}", h.handle, h.table, h.chain));
        // (nft does not print an iptables comment match; ctguard's are the only untracked accepts.)
        assert!(
            at.contains("ct state untracked") && at.contains("dport 53"),
            "the handle is an accept of ctguard's: {at}"
        );
    }
    back(&ns, &undo);
}

#[test]
fn a_stale_handle_hint_never_deletes_another_rule() {
    let ns = Ns::new("cas-ipt-stale");
    iptables_nft_host(&ns);
    let before = list(&ns, &[]);
    let mut undo = app(&ns, &prep(&ns, &request(&policy(IPT_NFT_UDP_TCP_53), "cas-ipt-stale", None)));
    // Point each IPv4 hint at the host's own `-i lo -j ACCEPT` rule (what a handle reused after a
    // table was recreated could do).
    let listed = ns.exec("nft", &["-a", "list", "chain", "ip", "filter", "INPUT"]);
    let lo: u64 = listed
        .lines()
        .find(|l| l.contains("iifname \"lo\""))
        .and_then(|l| l.rsplit("# handle ").next())
        .and_then(|h| h.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lo rule with a handle:\n{listed}"));
    let mut pointed = 0;
    for h in undo.ipt_nft_handles.iter_mut().filter(|h| !h.v6) {
        h.handle = lo;
        pointed += 1;
    }
    assert!(pointed > 0, "IPv4 hints to point elsewhere: {:?}", undo.ipt_nft_handles);
    let report = ns.run(|| rollback(&undo)).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_same(&before, &list(&ns, &[]), "the lo rule kept, ctguard's rules found by reading their chain");
}

/// Holds the host-wide legacy xtables lock (`/run/xtables.lock`, flock) as another
/// iptables-legacy process would, until dropped.
struct XtablesLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl XtablesLock {
    fn take() -> XtablesLock {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open("/run/xtables.lock")
            .unwrap_or_else(|e| panic!("open /run/xtables.lock: {e}"));
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive) {
            Ok(l) => XtablesLock(l),
            Err((_, e)) => panic!("flock /run/xtables.lock: {e}"),
        }
    }
}

#[test]
fn a_held_xtables_lock_fails_legacy_apply_and_rollback_in_bounded_time_then_they_succeed() {
    // ctguard's tools wait 1 s here (5 s by default): the lock, host-wide, is held only about
    // 3 s at a time, less than the default wait of the other tests' legacy steps running meanwhile.
    const WAIT: u32 = 1;
    let ns = Ns::new("xtlock");
    // Legacy raw tables exist before: one created by the apply could not be removed (README,
    // known differences).
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    ns.exec_stdin("iptables-legacy-restore", &["-w"], &format!("{LEGACY_FW}{raw}"));
    ns.exec_stdin("ip6tables-legacy-restore", &["-w"], raw);
    let p = policy("backend = \"iptables-legacy\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n");
    let before = list(&ns, &[]);

    // Apply while the lock is held: refused within the bound, nothing left applied.
    let prepared = prep(&ns, &request(&p, "xtl-1", None));
    assert!(!prepared.ipt_filter.is_empty() && !prepared.ipt_raw.is_empty());
    let lock = XtablesLock::take();
    let t = Instant::now();
    let res = ns.run(|| with_xtables_wait(WAIT, || apply(&prepared)));
    let took = t.elapsed();
    drop(lock);
    let err = res.err().unwrap_or_else(|| panic!("a legacy apply cannot get a held lock"));
    let text = chain(&err);
    eprintln!("policy_txn_cas: apply under a held xtables lock ({} ms): {text}", took.as_millis());
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(text.contains("the xtables lock is held by another process (waited 1 s)"), "{text}");
    assert_eq!(err.exit(), Exit::Refused, "{text}");
    assert_same(&before, &list(&ns, &[]), "nothing applied");

    // Applied with the lock free; the rollback while it is held fails within the bound, with
    // the message the agent reports (exit 7), and succeeds once it is free.
    let undo = app(&ns, &prep(&ns, &request(&p, "xtl-2", None)));
    let applied = list(&ns, &[]);
    assert!(applied.contains("ctguard:xtl-2") && applied.contains("CTGUARD-PRE"), "{applied}");
    let undo_json = Undo::Policy(Box::new(undo.clone()));
    let lock = XtablesLock::take();
    let t = Instant::now();
    let res = ns.run(|| with_xtables_wait(WAIT, || PolicyEngine.rollback(&undo_json)));
    let took = t.elapsed();
    drop(lock);
    let err = res.err().unwrap_or_else(|| panic!("a legacy rollback cannot get a held lock"));
    eprintln!("policy_txn_cas: rollback under a held xtables lock ({} ms): {}", took.as_millis(), err.message);
    // Three restores (raw chains of both families, filter rules), each waiting WAIT seconds.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(err.message.contains("the xtables lock is held by another process (waited 1 s)"), "{}", err.message);
    assert_eq!(err.exit, Exit::RollbackFailed);
    assert!(!err.retry);
    assert!(list(&ns, &[]).contains("ctguard:xtl-2"), "the rollback could not run");
    ns.run(|| PolicyEngine.rollback(&undo_json)).unwrap_or_else(|e| panic!("rollback, lock free: {}", e.message));
    assert_same(&before, &list(&ns, &[]), "rolled back once the lock is free");
}

/// What the rollback's one restore per family rests on (issue 16: each family's raw and
/// filter documents go in one `--noflush` restore when the nft steps between them have nothing
/// to do): a restore stops at the first table it cannot commit, so a raw step the kernel
/// refuses (here `-X` of a chain another rule still jumps to) never reaches the filter section
/// after it — ctguard's accepts stay while its NOTRACK rules do. The tools themselves, on
/// iptables-nft and iptables-legacy, both families.
#[test]
fn a_restore_that_fails_in_raw_never_reaches_the_filter_section_after_it() {
    for variant in ["nft", "legacy"] {
        for v6 in [false, true] {
            let ns = Ns::new("rawfail");
            let tool = format!("{}-{variant}", if v6 { "ip6tables" } else { "iptables" });
            let setup = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CTGUARD-PRE - [0:0]\n\
                         -A PREROUTING -j CTGUARD-PRE\n-A OUTPUT -j CTGUARD-PRE\nCOMMIT\n\
                         *filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                         -A INPUT -p udp -m udp --dport 53 -m comment --comment ctguard:x -j ACCEPT\nCOMMIT\n";
            ns.exec_stdin(&format!("{tool}-restore"), &["-w"], setup);
            // The rollback's raw step misses the foreign jump in OUTPUT: `-X` is refused.
            let doc = "*raw\n-D PREROUTING -j CTGUARD-PRE\n-X CTGUARD-PRE\nCOMMIT\n\
                       *filter\n-D INPUT -p udp -m udp --dport 53 -m comment --comment ctguard:x -j ACCEPT\nCOMMIT\n";
            let out = ns.run(|| {
                ctguard::backend::exec::Tool::find(&format!("{tool}-restore"))
                    .unwrap_or_else(|e| panic!("{e}"))
                    .run(&["-w", "--noflush"], Some(doc.as_bytes()))
            });
            eprintln!("policy_txn_cas: {tool}-restore, raw refused: {out:?}");
            assert!(out.is_err(), "{tool}: -X of a chain still jumped to is refused");
            let save = ns.exec(&format!("{tool}-save"), &[]);
            assert!(
                save.contains("ctguard:x"),
                "{tool}: the filter section after the refused raw one never ran:\n{save}"
            );
            assert!(
                save.contains("-A PREROUTING -j CTGUARD-PRE"),
                "{tool}: the refused raw section changed nothing:\n{save}"
            );
        }
    }
}
