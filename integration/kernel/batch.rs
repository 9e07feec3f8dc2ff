//! The netlink batch against the real kernel (`cargo test --test kernel batch`, as root).
//!
//! Every test does its work on a thread that first called `unshare(CLONE_NEWNET)`: a fresh
//! network namespace that dies with the thread. `nft` children spawned from that thread run in
//! it too. Each helper checks it is not in the initial namespace before touching anything, so
//! the host's ruleset is never read or changed.

use std::os::unix::fs::MetadataExt;

use ctguard::backend::exec::Tool;
use ctguard::backend::netlink::{check_batch, get_genid, send_batch, NetlinkError};
use ctguard::model::names::Tag;
use ctguard::model::{parse_policy, Format, Policy};
use ctguard::render::nft_batch::{encode, BatchBuilder, MsgKind};
use ctguard::render::nft_ir::{table_for, Match, RuleIr, TableIr};
use ctguard::render::nft_script::replace_script;
use nix::sched::{unshare, CloneFlags};

/// Runs `f` on a new thread inside a fresh, empty network namespace.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (these tests need root)");
            assert!(!in_initial_netns(), "refusing to work in the initial network namespace");
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// True unless this thread is in a namespace of its own: one that is neither the process's
/// (the main thread never unshares) nor, where readable, PID 1's.
fn in_initial_netns() -> bool {
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let me = id("/proc/thread-self/ns/net").expect("own netns");
    let process = id("/proc/self/ns/net").expect("process netns");
    me == process || id("/proc/1/ns/net").is_ok_and(|init| init == me)
}

fn nft(args: &[&str], stdin: Option<&str>) -> String {
    assert!(!in_initial_netns(), "nft must not run in the initial namespace here");
    let tool = Tool::find("nft").expect("nft installed");
    match tool.run(args, stdin.map(str::as_bytes)) {
        Ok(out) => out,
        Err(e) => panic!("nft {args:?}: {e}"),
    }
}

fn list_ctguard() -> String {
    nft(&["list", "table", "inet", "ctguard"], None)
}

/// What the kernel holds, as `nft --debug=netlink` dumps it: every rule's expressions, every
/// set's flags, key and elements (with their flags and userdata). The kernel walks a hash set
/// (`ifname`) in an order that changes from load to load (nft against nft too), so each run of
/// element lines is sorted; nothing else is touched.
fn dump_ctguard() -> String {
    let raw = nft(&["--debug=netlink", "list", "table", "inet", "ctguard"], None);
    let mut out = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    for line in raw.lines() {
        if line.starts_with("\telement ") {
            run.push(line);
            continue;
        }
        run.sort_unstable();
        out.append(&mut run);
        out.push(line);
    }
    run.sort_unstable();
    out.append(&mut run);
    out.join("\n")
}

fn tables() -> String {
    nft(&["list", "tables"], None)
}

fn policy(toml: &str) -> Policy {
    match parse_policy(toml, Format::Toml) {
        Ok(p) => p,
        Err(e) => panic!("test policy does not parse: {e:?}\n{toml}"),
    }
}

fn table(p: &Policy) -> TableIr {
    table_for(p, &Tag::new("test-1").expect("valid tag"))
}

/// The policies whose listings must agree (name, policy).
fn policies() -> Vec<(&'static str, Policy)> {
    let many_ports: Vec<String> = (0..400u32)
        .map(|i| (3000 + 3 * i).to_string())
        .chain((0..20u32).map(|i| format!("\"{}-{}\"", 10000 + 100 * i, 10000 + 100 * i + 50)))
        .collect();
    // 8000 non-adjacent hosts: 16001 interval elements, a batch of about 320 KB (more than the
    // default socket send buffer) whose elements span several NEWSETELEM messages.
    let many_sources: Vec<String> =
        (0..8000u32).map(|i| format!("\"10.{}.{}.{}\"", i / 16384, (i / 128) % 128, 2 * (i % 128))).collect();
    vec![
        ("builtin", Policy::builtin()),
        (
            "tcp+udp several ports",
            policy("[[notrack]]\nprotocols = [\"tcp\", \"udp\"]\nports = [22, 53, 80, 443, 8080]\n"),
        ),
        ("ranges", policy("[[notrack]]\nprotocols = [\"udp\"]\nports = [53, \"1000-2000\", \"60000-65535\"]\n")),
        ("interfaces", policy("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\ninterfaces = [\"eth0\", \"lo\"]\n")),
        (
            "interfaces without lo",
            policy("[[notrack]]\nprotocols = [\"tcp\"]\nports = [53]\ninterfaces = [\"eth0\", \"br-lan\", \"wg0\"]\n"),
        ),
        (
            "sources v4+v6",
            policy(
                "[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n\
                 sources = [\"192.0.2.0/24\", \"198.51.100.7\", \"2001:db8::/32\"]\n",
            ),
        ),
        (
            "sources reaching the end of the address space",
            policy(
                "[[notrack]]\nprotocols = [\"udp\"]\nports = [\"1-65535\"]\n\
                 sources = [\"0.0.0.0/0\", \"fd42::1\", \"ff00::/8\"]\n",
            ),
        ),
        (
            "400 ports and 20 ranges",
            policy(&format!("[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [{}]\n", many_ports.join(", "))),
        ),
        (
            "8000 sources",
            policy(&format!(
                "[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nsources = [{}]\n",
                many_sources.join(", ")
            )),
        ),
        ("local_only = false", policy("[[notrack]]\nprotocols = [\"udp\"]\nports = [123]\nlocal_only = false\n")),
        (
            "two entries",
            policy(
                "[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n\
                 [[notrack]]\nprotocols = [\"udp\"]\nports = [\"5060-5070\"]\nsources = [\"10.0.0.0/8\"]\n\
                 interfaces = [\"eth1\"]\nlocal_only = false\n",
            ),
        ),
    ]
}

#[test]
fn batch_and_script_give_the_same_listing() {
    for (name, p) in policies() {
        let t = table(&p);
        assert!(!t.is_empty(), "{name}: policy yields a table");
        let script = replace_script(&t);
        let (via_nft, dump_nft) = in_fresh_netns(|| {
            nft(&["-f", "-"], Some(&script));
            (list_ctguard(), dump_ctguard())
        });
        let batch = encode(&t, None).unwrap_or_else(|e| panic!("{name}: encode: {e}"));
        if name == "8000 sources" {
            assert!(batch.as_bytes().len() > 212_992, "{} bytes", batch.as_bytes().len());
            let parts = batch.messages().iter().filter(|m| m.kind == MsgKind::NewSetElem).count();
            assert!(parts > 1, "{parts} element messages");
        }
        let (via_batch, dump_batch) = in_fresh_netns(|| {
            send_batch(&batch).unwrap_or_else(|e| panic!("{name}: send_batch: {e}"));
            (list_ctguard(), dump_ctguard())
        });
        assert_eq!(via_batch, via_nft, "{name}: listings differ\n--- script:\n{script}");
        assert_eq!(dump_batch, dump_nft, "{name}: kernel objects differ");
        if std::env::var_os("CTGUARD_SHOW_LISTINGS").is_some() {
            eprintln!("=== {name}\n{via_batch}\n{dump_batch}");
        }
        // And the listing is the script's table block: the script round-trips.
        assert!(via_nft.contains("notrack comment \"ctguard:test-1\""), "{name}: {via_nft}");
    }
}

#[test]
fn batch_applied_twice_replaces_and_empty_batch_removes() {
    let t = table(&policy(
        "[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53, \"1000-2000\"]\nsources = [\"192.0.2.0/24\"]\n",
    ));
    let batch = encode(&t, None).expect("encodes");
    let empty = encode(&table(&policy("backend = \"nft\"\n")), None).expect("encodes");
    assert!(empty.messages().iter().all(|m| !matches!(m.kind, MsgKind::NewSet | MsgKind::NewRule)));
    in_fresh_netns(|| {
        // The empty batch works on a namespace without the table too (declare, then delete).
        send_batch(&empty).expect("empty batch on an empty namespace");
        assert_eq!(tables(), "");
        send_batch(&batch).expect("first apply");
        let once = list_ctguard();
        send_batch(&batch).expect("second apply");
        assert_eq!(list_ctguard(), once, "re-applying replaces: one copy");
        assert_eq!(tables(), "table inet ctguard\n");
        let ruleset = nft(&["list", "ruleset"], None);
        assert_eq!(ruleset.matches("chain prerouting").count(), 1, "{ruleset}");
        assert_eq!(ruleset.matches("set ports_0").count(), 1, "{ruleset}");
        send_batch(&empty).expect("removal");
        assert_eq!(tables(), "", "the empty table's batch removes ctguard's table");
    });
}

#[test]
fn batch_leaves_other_tables_alone() {
    let t = table(&Policy::builtin());
    in_fresh_netns(|| {
        nft(
            &["-f", "-"],
            Some("table ip other {\n\tchain c {\n\t\ttype filter hook input priority 0; policy accept;\n\t}\n}\n"),
        );
        let other = nft(&["list", "table", "ip", "other"], None);
        send_batch(&encode(&t, None).expect("encodes")).expect("apply");
        send_batch(&encode(&table(&policy("backend = \"nft\"\n")), None).expect("encodes")).expect("remove");
        assert_eq!(nft(&["list", "table", "ip", "other"], None), other);
        assert_eq!(tables(), "table ip other\n");
    });
}

#[test]
fn batch_with_stale_genid_is_refused_whole_and_fresh_one_applies() {
    let t = table(&Policy::builtin());
    in_fresh_netns(|| {
        let g0 = get_genid().expect("genid");
        nft(&["add", "table", "ip", "other"], None);
        let g1 = get_genid().expect("genid");
        assert_ne!(g0, g1, "a commit moves the generation id");
        let stale = encode(&t, Some(g0)).expect("encodes");
        match send_batch(&stale) {
            Err(NetlinkError::GenerationChanged { genid, .. }) => assert_eq!(genid, Some(g0)),
            other => panic!("expected GenerationChanged, got {other:?}"),
        }
        assert_eq!(tables(), "table ip other\n", "nothing of the stale batch was applied");
        assert_eq!(get_genid().expect("genid"), g1, "a refused batch does not move the id");
        send_batch(&encode(&t, Some(g1)).expect("encodes")).expect("fresh genid applies");
        assert!(list_ctguard().contains("chain prerouting"));
        let g2 = get_genid().expect("genid");
        assert_ne!(g2, g1, "our own commit moves the id too");
    });
}

/// The encoder's messages for `t` (declare, delete, recreate), unfinished.
fn builder_for(t: &TableIr, genid: Option<u32>) -> BatchBuilder {
    let mut b = BatchBuilder::new(genid);
    b.add_table(&t.name).expect("ok");
    b.delete_table(&t.name).expect("ok");
    b.add_table(&t.name).expect("ok");
    for s in &t.sets {
        b.add_set(&t.name, s).expect("ok");
    }
    for c in &t.chains {
        b.add_chain(&t.name, c).expect("ok");
    }
    for c in &t.chains {
        for (i, r) in c.rules.iter().enumerate() {
            b.add_rule(&t.name, &c.name, i + 1, r).expect("ok");
        }
    }
    b
}

/// [`builder_for`] `t`, with one more rule at the end that looks up a set the table does not
/// have: the kernel refuses that last message.
fn builder_with_bad_last_rule(t: &TableIr) -> BatchBuilder {
    let mut b = builder_for(t, None);
    let bad = RuleIr {
        matches: vec![Match::DportInSet { proto: ctguard::model::Proto::Udp, set: "no_such_set".into() }],
        comment: "ctguard:test-1".into(),
    };
    b.add_rule(&t.name, "output", 99, &bad).expect("ok");
    b
}

/// The encoder's batch for `t`, but with one more rule at the end that looks up a set the
/// table does not have: the kernel refuses that last message.
fn batch_with_bad_last_rule(t: &TableIr) -> ctguard::render::nft_batch::BatchBuffer {
    builder_with_bad_last_rule(t).finish()
}

/// Regression (issue 16: `apply` ran `nft -c` of a text script standing in for its batch, 95 ms
/// of a 10k-rule apply): the batch itself without BATCH_END is the kernel check. It is judged
/// message by message like the commit, refused the same way, and never applied.
#[test]
fn check_batch_is_judged_like_the_commit_and_never_applied() {
    let t = table(&Policy::builtin());
    in_fresh_netns(|| {
        let g = get_genid().expect("genid");
        let bad = builder_with_bad_last_rule(&t).finish_check();
        assert!(!bad.commits());
        let bad_seq = bad.messages().last().expect("messages").seq;
        match check_batch(&bad) {
            Err(NetlinkError::Refused { seq, what, source, .. }) => {
                assert_eq!(seq, bad_seq, "the bad rule is named: {what}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{source}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        assert_eq!(tables(), "", "a refused check applies nothing");
        assert_eq!(get_genid().expect("genid"), g, "a refused check commits nothing");

        check_batch(&builder_for(&t, Some(g)).finish_check()).expect("a good check passes");
        assert_eq!(tables(), "", "a passed check applies nothing either");
        assert_eq!(get_genid().expect("genid"), g, "a passed check commits nothing");

        // Not interchangeable with the commit.
        assert!(matches!(send_batch(&builder_for(&t, None).finish_check()), Err(NetlinkError::Malformed(_))));
        assert!(matches!(check_batch(&builder_for(&t, None).finish()), Err(NetlinkError::Malformed(_))));
        assert_eq!(tables(), "");

        // A stale generation id is refused as such, as by the commit.
        nft(&["add", "table", "ip", "other"], None);
        match check_batch(&builder_for(&t, Some(g)).finish_check()) {
            Err(NetlinkError::GenerationChanged { genid, .. }) => assert_eq!(genid, Some(g)),
            other => panic!("expected GenerationChanged, got {other:?}"),
        }
        let g1 = get_genid().expect("genid");
        send_batch(&builder_for(&t, Some(g1)).finish()).expect("the same messages commit");
        assert!(list_ctguard().contains("chain prerouting"));
    });
}

/// Issue 16 (each kernel check costs the kernel an RCU grace period in its abort path): the
/// apply's check batch also carries the rollback's deletes, by the batch-local ids of the rules
/// it inserts. The kernel must honour the id — a DELRULE naming a chain without handle or id
/// flushes the chain, which would make such a check pass whatever it claims — so deleting the
/// same inserted rule twice is refused at the second delete, and a check of insert + delete
/// leaves the host chain as it was.
#[test]
fn check_batch_deletes_inserted_rules_by_their_batch_local_id() {
    use ctguard::render::nft_batch::RulePosition;
    use ctguard::render::nft_expr::Expr;
    in_fresh_netns(|| {
        nft(
            &["-f", "-"],
            Some("table inet host {\n chain input {\n type filter hook input priority 0; policy accept;\n tcp dport 22 accept\n tcp dport 80 accept\n }\n}\n"),
        );
        let host_before = nft(&["-a", "list", "table", "inet", "host"], None);
        let g = get_genid().expect("genid");
        let build = || {
            let mut b = BatchBuilder::new(Some(g));
            b.insert_rule("inet", "host", "input", RulePosition::Append, &[Expr::Notrack], "ctguard:a", "a".into())
                .expect("insert a");
            b.insert_rule("inet", "host", "input", RulePosition::Append, &[Expr::Notrack], "ctguard:b", "b".into())
                .expect("insert b");
            b
        };
        // Insert two, delete both by id: accepted, nothing applied.
        let mut b = build();
        let ins = b.inserted().to_vec();
        for r in &ins {
            b.delete_inserted_rule(r).expect("delete by id");
        }
        check_batch(&b.finish_check()).expect("insert then delete by id passes the check");
        assert_eq!(get_genid().expect("genid"), g, "a check commits nothing");
        assert_eq!(nft(&["-a", "list", "table", "inet", "host"], None), host_before);

        // The second delete of the same id is refused, naming it: the kernel looked the id up
        // (a chain flush would have passed).
        let mut b = build();
        let ins = b.inserted().to_vec();
        b.delete_inserted_rule(&ins[0]).expect("first delete");
        b.delete_inserted_rule(&ins[0]).expect("second delete (encoded)");
        let twice = b.finish_check();
        let second = twice.messages().last().expect("messages").seq;
        match check_batch(&twice) {
            Err(NetlinkError::Refused { seq, what, source, .. }) => {
                assert_eq!(seq, second, "the second delete is named: {what}");
                assert!(what.contains("id 1"), "{what}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{source}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        // And the host's own rules were never at stake: committing insert + delete by id
        // leaves the chain exactly as it was (one generation later).
        let mut b = build();
        let ins = b.inserted().to_vec();
        for r in &ins {
            b.delete_inserted_rule(r).expect("delete by id");
        }
        send_batch(&b.finish()).expect("commits");
        assert_eq!(get_genid().expect("genid"), g.wrapping_add(1));
        let after = nft(&["-a", "list", "table", "inet", "host"], None);
        assert_eq!(after, host_before, "the host chain is untouched: no flush");
    });
}

#[test]
fn batch_whose_last_message_is_bad_is_refused_whole() {
    let t = table(&Policy::builtin());
    let bad = batch_with_bad_last_rule(&t);
    let msgs = bad.messages();
    let bad_seq = msgs[msgs.len() - 2].seq;
    let check = |r: Result<(), NetlinkError>| match r {
        Err(NetlinkError::Refused { seq, what, source, .. }) => {
            assert_eq!(seq, bad_seq, "the last rule is named: {what}");
            assert!(what.contains("add rule inet ctguard output (rule 99"), "{what}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{source}");
        }
        other => panic!("expected Refused, got {other:?}"),
    };
    // In an empty namespace: nothing at all afterwards.
    in_fresh_netns(|| {
        check(send_batch(&bad));
        assert_eq!(tables(), "", "no table after a refused batch");
    });
    // Over an applied table: the table is untouched (its DELTABLE was rolled back too).
    in_fresh_netns(|| {
        let other = table(&policy("[[notrack]]\nprotocols = [\"tcp\"]\nports = [8053]\n"));
        send_batch(&encode(&other, None).expect("encodes")).expect("apply");
        let before = list_ctguard();
        let g = get_genid().expect("genid");
        check(send_batch(&bad));
        assert_eq!(list_ctguard(), before, "the previous table survives a refused batch");
        assert_eq!(get_genid().expect("genid"), g, "nothing committed");
    });
}

/// The generation id of the calling thread's namespace read on a brand-new thread (which opens
/// a socket of its own there): what a kept socket must agree with.
fn genid_on_a_fresh_thread() -> u32 {
    std::thread::scope(|s| s.spawn(|| get_genid().expect("genid")).join().expect("thread"))
}

/// Issue 16 (closing a NETLINK_NETFILTER socket waits for the last commit's deferred
/// destruction, an RCU grace period): the generation id is read on a socket the thread keeps,
/// and the socket a commit went out on is closed on another thread. A kept socket must follow
/// its thread into another namespace (never answer for the one it was opened in), and commits
/// in quick succession — each closing its socket later — must each land, in order.
#[test]
fn kept_genid_socket_follows_its_thread_and_quick_commits_all_land() {
    let t = table(&Policy::builtin());
    in_fresh_netns(|| {
        let g0 = get_genid().expect("genid");
        assert_eq!(g0, genid_on_a_fresh_thread());
        // Five commits back to back, each read back at once on the kept socket.
        for i in 1..=5u32 {
            send_batch(&encode(&t, Some(get_genid().expect("genid"))).expect("encodes")).expect("commit");
            assert_eq!(get_genid().expect("genid"), g0.wrapping_add(i), "commit {i} is visible at once");
        }
        assert!(list_ctguard().contains("chain prerouting"));
        let here = genid_on_a_fresh_thread();
        assert_eq!(get_genid().expect("genid"), here);
        // Into another fresh namespace on the same thread: the kept socket is not reused.
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare");
        assert!(!in_initial_netns());
        assert_eq!(tables(), "", "a new namespace");
        let there = genid_on_a_fresh_thread();
        assert_eq!(get_genid().expect("genid"), there, "the generation id of the namespace the thread is in now");
        nft(&["add", "table", "ip", "moved"], None);
        assert_eq!(get_genid().expect("genid"), there.wrapping_add(1));
    });
}

/// [`BatchBuilder::create_table`] (a fresh apply's table, issue 16) is refused whole when the
/// table exists, even by a batch without a generation id: nothing is added to another writer's
/// `table inet ctguard`.
#[test]
fn created_table_is_refused_over_an_existing_one() {
    let t = table(&Policy::builtin());
    in_fresh_netns(|| {
        let build = || {
            let mut b = BatchBuilder::new(None);
            b.create_table(&t).expect("encodes");
            b.finish()
        };
        send_batch(&build()).expect("created in an empty namespace");
        let first = list_ctguard();
        assert!(first.contains("chain prerouting"));
        match send_batch(&build()) {
            Err(NetlinkError::Refused { source, what, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EEXIST), "{what}: {source}");
            }
            other => panic!("expected EEXIST, got {other:?}"),
        }
        assert_eq!(list_ctguard(), first, "nothing appended");
    });
}
