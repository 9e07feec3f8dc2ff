//! iptables backend against the real kernel, both variants (nft, legacy) and both families.
//!
//! Isolation: every test body runs on its own thread that first calls
//! `unshare(CLONE_NEWNET)`; the namespace is fresh and disappears with the thread. The initial
//! namespace's firewall is never read or written (checked before each body runs).

use std::os::unix::fs::MetadataExt;

use ctguard::backend::exec::Tool;
use ctguard::backend::iptables::{
    check_rule, ipset_save, missing_jumps, restore, save, save_parsed, scratch_check, IptablesError, Variant,
};
use ctguard::live::iptables_save::{parse, SaveDump};
use ctguard::model::names::Tag;
use ctguard::model::{parse_policy, Format, Policy};
use ctguard::render::iptables::{
    accept_untracked_specs, notrack_rules, spec_to_line, Direction, IpFamily, NotrackRules, CHAIN_OUT, CHAIN_PRE,
    RAW_TABLE,
};

/// Runs `f` on a new thread inside a fresh network namespace; panics propagate.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let id = || std::fs::metadata("/proc/thread-self/ns/net").map(|m| (m.dev(), m.ino())).expect("ns inode");
    let outer = id();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            assert_ne!(id(), outer, "still in the caller's namespace");
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> String {
    let t = Tool::find(tool).expect("tool installed");
    match t.run(args, stdin.map(str::as_bytes)) {
        Ok(out) => out,
        Err(e) => panic!("{tool} {args:?}: {e}"),
    }
}

/// Someone else's firewall: filter INPUT policy DROP with an ssh accept and a LOG rule, an
/// ipset-based blocklist, and raw rules of its own.
const BASE: &str = r#"*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:blocklist - [0:0]
-A INPUT -j blocklist
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -m limit --limit 5/min -j LOG --log-prefix "dropped: "
-A blocklist -m set --match-set blk src -j DROP
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 123 -j CT --notrack
-A OUTPUT -j ACCEPT
COMMIT
"#;

fn ipsets(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "create blk hash:net family inet\nadd blk 203.0.113.0/24\n",
        IpFamily::V6 => "create blk hash:net family inet6\nadd blk 2001:db8::/32\n",
    }
}

/// The target namespace's starting state (calling thread's namespace).
fn setup_base(variant: Variant, family: IpFamily) -> SaveDump {
    run("ipset", &["restore"], Some(ipsets(family)));
    restore(variant, family, BASE, false).expect("base rules load");
    let (_, dump) = save_parsed(variant, family).expect("save");
    assert_eq!(dump.chain("filter", "INPUT").expect("INPUT").policy.as_deref(), Some("DROP"));
    dump
}

fn test_policy() -> Policy {
    let singles: Vec<String> = (7001..=7031).step_by(2).map(|p| p.to_string()).collect();
    parse_policy(
        &format!(
            r#"
[[notrack]]
protocols = ["udp", "tcp"]
ports = [53, "6000-6010", {}]
sources = ["198.18.0.0/15", "192.0.2.1", "fd42::/64"]
interfaces = ["veth0", "lo"]
local_only = true
[[notrack]]
protocols = ["udp"]
ports = [5353]
local_only = false
"#,
            singles.join(", ")
        ),
        Format::Toml,
    )
    .expect("valid policy")
}

/// Applies `r` the way the apply step does: jumps only where `-C` finds none. Returns how many
/// jumps were added.
fn apply(variant: Variant, family: IpFamily, r: &NotrackRules) -> usize {
    let missing = missing_jumps(variant, family, &r.jumps).expect("missing jumps");
    restore(variant, family, &r.restore_text(&missing), true).expect("noflush restore");
    for j in &r.jumps {
        assert!(check_rule(variant, family, j.table, j.from, &j.spec()).expect("-C"), "jump {j:?} present");
    }
    missing.len()
}

fn lines(d: &SaveDump, table: &str, chain: &str) -> Vec<String> {
    d.chain(table, chain).map(|c| c.rules.iter().map(|r| r.line.clone()).collect()).unwrap_or_default()
}

/// Every table, chain, policy and rule of `before` is in `after`, in order; the only
/// differences allowed are ctguard's chains in raw and one jump at the top of PREROUTING and
/// OUTPUT.
fn assert_preserved(before: &SaveDump, after: &SaveDump) {
    for t in &before.tables {
        let at = after.table(&t.name).unwrap_or_else(|| panic!("table {} gone", t.name));
        for c in &t.chains {
            let ac = at.chain(&c.name).unwrap_or_else(|| panic!("chain {} {} gone", t.name, c.name));
            assert_eq!(ac.policy, c.policy, "{} {}", t.name, c.name);
            let mut got = lines(after, &t.name, &c.name);
            let want = lines(before, &t.name, &c.name);
            let jump = match (t.name.as_str(), c.name.as_str()) {
                ("raw", "PREROUTING") => Some(format!("-A PREROUTING -j {CHAIN_PRE}")),
                ("raw", "OUTPUT") => Some(format!("-A OUTPUT -j {CHAIN_OUT}")),
                _ => None,
            };
            if let Some(j) = jump {
                assert_eq!(got.first(), Some(&j), "{} {}: jump first", t.name, c.name);
                assert_eq!(got.iter().filter(|l| **l == j).count(), 1, "one jump only");
                got.remove(0);
            }
            assert_eq!(got, want, "{} {} unchanged", t.name, c.name);
        }
        for ac in &at.chains {
            assert!(
                t.chain(&ac.name).is_some() || (t.name == "raw" && ac.name.starts_with("CTGUARD-")),
                "unexpected chain {} {}",
                t.name,
                ac.name
            );
        }
    }
}

fn rendered(r: &NotrackRules, chain: &str) -> Vec<String> {
    r.chain_rules(chain).map(|x| x.append_line()).collect()
}

fn apply_keeps_foreign_rules(variant: Variant, family: IpFamily) {
    in_fresh_netns(|| {
        let before = setup_base(variant, family);
        let policy = test_policy();
        let r = notrack_rules(&policy, family, &Tag::new("t1").expect("tag"));
        assert!(!r.is_empty());

        // First apply: both jumps missing, both added.
        assert_eq!(apply(variant, family, &r), 2);
        let (text1, after1) = save_parsed(variant, family).expect("save");
        assert_preserved(&before, &after1);
        // ctguard's chains hold exactly the rendered rules, byte for byte as save prints them.
        assert_eq!(lines(&after1, RAW_TABLE, CHAIN_PRE), rendered(&r, CHAIN_PRE), "\n{text1}");
        assert_eq!(lines(&after1, RAW_TABLE, CHAIN_OUT), rendered(&r, CHAIN_OUT), "\n{text1}");
        assert_eq!(after1.chain(RAW_TABLE, CHAIN_PRE).expect("chain").policy, None);

        // Second apply: nothing new (no duplicate rules, no second jump).
        assert_eq!(apply(variant, family, &r), 0);
        let after2 = parse(&save(variant, family).expect("save")).expect("parse");
        assert_eq!(after2, after1, "re-apply is idempotent");

        // A different policy under another transaction replaces the chains' contents.
        let r2 = notrack_rules(&Policy::builtin(), family, &Tag::new("t2").expect("tag"));
        assert_eq!(apply(variant, family, &r2), 0);
        let after3 = parse(&save(variant, family).expect("save")).expect("parse");
        assert_preserved(&before, &after3);
        assert_eq!(lines(&after3, RAW_TABLE, CHAIN_PRE), rendered(&r2, CHAIN_PRE));
        assert_eq!(lines(&after3, RAW_TABLE, CHAIN_OUT), rendered(&r2, CHAIN_OUT));

        // The accept rules of DESIGN §6, inserted into filter INPUT/OUTPUT, print back the same.
        let tag = Tag::new("t2").expect("tag");
        let n = &policy.notrack[0];
        let mut text = String::from("*filter\n");
        let mut specs = Vec::new();
        for (chain, dir, lo) in [
            ("INPUT", Direction::Input, false),
            ("OUTPUT", Direction::Output, false),
            ("INPUT", Direction::Input, true),
            ("OUTPUT", Direction::Output, true),
        ] {
            for spec in accept_untracked_specs(n, family, dir, lo, &tag) {
                assert!(!check_rule(variant, family, "filter", chain, &spec).expect("-C"));
                text.push_str(&format!("-A {chain} {}\n", spec_to_line(&spec)));
                specs.push((chain, spec));
            }
        }
        text.push_str("COMMIT\n");
        assert!(!specs.is_empty());
        restore(variant, family, &text, true).expect("accepts load");
        let after4 = parse(&save(variant, family).expect("save")).expect("parse");
        for (chain, spec) in &specs {
            assert!(check_rule(variant, family, "filter", chain, spec).expect("-C"), "{spec:?}");
            let line = format!("-A {chain} {}", spec_to_line(spec));
            assert!(lines(&after4, "filter", chain).contains(&line), "{line} not in save");
        }
        // A jump to a chain that does not exist is a usage error (exit 2), not "absent".
        let bad = vec!["-j".to_string(), "NO-SUCH-CHAIN".to_string()];
        assert!(matches!(check_rule(variant, family, "filter", "INPUT", &bad), Err(IptablesError::Check { .. })));
        eprintln!("{variant:?} {family:?}: raw after apply:\n{}", lines(&after1, RAW_TABLE, CHAIN_PRE).join("\n"));
    })
}

fn scratch_checks(variant: Variant, family: IpFamily) {
    in_fresh_netns(|| {
        let before_dump = setup_base(variant, family);
        let live = save(variant, family).expect("save");
        let sets = ipset_save().expect("ipset save");
        assert!(sets.contains("create blk "), "{sets}");
        let r = notrack_rules(&test_policy(), family, &Tag::new("t1").expect("tag"));
        let good = r.restore_text_with_jumps();

        // Good: the candidate on top of the live rules, the live blocklist's ipset recreated.
        scratch_check(variant, family, &live, Some(&sets), &good).expect("good candidate passes");
        // A candidate using the live ipset passes too.
        let uses_set = "*filter\n-I INPUT 1 -m set --match-set blk src -j DROP\nCOMMIT\n";
        scratch_check(variant, family, &live, Some(&sets), uses_set).expect("ipset candidate passes");
        // Without the ipsets the live dump itself cannot load: it is the recreation that works.
        let e = scratch_check(variant, family, &live, None, &good).expect_err("no ipsets");
        assert!(matches!(e, IptablesError::ScratchLive { .. }), "{e:?}");

        let bad_ports =
            "*raw\n:CTGUARD-PRE - [0:0]\n-A CTGUARD-PRE -p udp -m multiport --dports 0:0:0 -j CT --notrack\nCOMMIT\n";
        let no_set = "*filter\n-I INPUT 1 -m set --match-set nosuch src -j DROP\nCOMMIT\n";
        // Passes `--test` (userspace only); only the kernel refuses CT outside raw.
        let kernel_only = "*filter\n:CTGUARD-PRE - [0:0]\n-A CTGUARD-PRE -p udp -j CT --notrack\nCOMMIT\n";
        let restore_tool = variant.tool(family == IpFamily::V6, "-restore");
        run(&restore_tool, &["-w", "--test", "--noflush"], Some(kernel_only));
        for bad in [bad_ports, no_set, kernel_only] {
            match scratch_check(variant, family, &live, Some(&sets), bad) {
                Err(IptablesError::Rejected { source, .. }) => {
                    eprintln!("{variant:?} {family:?} rejected: {source}")
                }
                other => panic!("bad candidate {bad:?}: {other:?}"),
            }
        }
        // The real target is unchanged: same rules, same sets, no CTGUARD chain.
        let after = parse(&save(variant, family).expect("save")).expect("parse");
        assert_eq!(after, before_dump);
        assert!(after.chain(RAW_TABLE, CHAIN_PRE).is_none());
        assert_eq!(ipset_save().expect("ipset save"), sets);
    })
}

macro_rules! per_variant_family {
    ($($name:ident: $f:ident, $v:expr, $fam:expr;)*) => {$(
        #[test]
        fn $name() {
            $f($v, $fam)
        }
    )*};
}

per_variant_family! {
    apply_nft_v4: apply_keeps_foreign_rules, Variant::Nft, IpFamily::V4;
    apply_nft_v6: apply_keeps_foreign_rules, Variant::Nft, IpFamily::V6;
    apply_legacy_v4: apply_keeps_foreign_rules, Variant::Legacy, IpFamily::V4;
    apply_legacy_v6: apply_keeps_foreign_rules, Variant::Legacy, IpFamily::V6;
    scratch_nft_v4: scratch_checks, Variant::Nft, IpFamily::V4;
    scratch_nft_v6: scratch_checks, Variant::Nft, IpFamily::V6;
    scratch_legacy_v4: scratch_checks, Variant::Legacy, IpFamily::V4;
    scratch_legacy_v6: scratch_checks, Variant::Legacy, IpFamily::V6;
}

/// iptables-nft prints "table … is incompatible" on stdout and exits 0 when a native nft rule
/// sits in its table. Such a table is nft's (DESIGN §1, corrected by issue 12): `save` leaves
/// it out, so the iptables tools never restore a partial copy of it, and nft's JSON reads it.
#[test]
fn incompatible_nft_table_is_left_to_nft() {
    in_fresh_netns(|| {
        restore(Variant::Nft, IpFamily::V4, "*filter\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n", true)
            .expect("load");
        assert!(save(Variant::Nft, IpFamily::V4).is_ok());
        run("nft", &["add", "rule", "ip", "filter", "INPUT", "fib", "daddr", "type", "local", "counter"], None);
        let raw = run("iptables-nft-save", &[], None);
        assert!(raw.contains("incompatible"), "{raw}");
        match save(Variant::Nft, IpFamily::V4) {
            Ok(text) => assert!(!text.contains("*filter") && !text.contains("incompatible"), "{text}"),
            other => panic!("{other:?}"),
        }
        // The legacy side of the same namespace is unaffected.
        assert!(save(Variant::Legacy, IpFamily::V4).is_ok());
    })
}

/// Regression (issue 16: every policy apply loaded the whole live save into a scratch
/// namespace, twice): the scratch check on `render::ipt_edit::scratch_base` gives the kernel's
/// verdict the whole save gives, for what ctguard's documents do — inserts at a place, deletes
/// by exact text, ctguard's chains declared, flushed and removed — including the refusals.
#[test]
fn scratch_base_gives_the_verdict_of_the_whole_save() {
    use ctguard::render::ipt_edit::scratch_base;
    for variant in [Variant::Nft, Variant::Legacy] {
        in_fresh_netns(|| {
            let family = IpFamily::V4;
            setup_base(variant, family);
            // A bigger INPUT (a blocklist of 300) and ctguard's raw chain with its jump.
            let mut more = String::from("*filter\n");
            for i in 0..300 {
                more.push_str(&format!("-A INPUT -s 100.64.{}.{}/32 -j DROP\n", i / 256, i % 256));
            }
            more.push_str("-A INPUT -p udp -m udp --dport 53 -m comment --comment \"ctguard:old\" -j ACCEPT\nCOMMIT\n");
            more.push_str("*raw\n:CTGUARD-PRE - [0:0]\n-A CTGUARD-PRE -p udp -m udp --dport 53 -j CT --notrack\n-I PREROUTING 1 -j CTGUARD-PRE\nCOMMIT\n");
            restore(variant, family, &more, true).expect("more rules load");
            let live = save(variant, family).expect("save");
            let sets = ipset_save().expect("ipset save");
            let docs: [(&str, bool); 8] = [
                ("*filter\n-I INPUT 300 -p udp -m udp --dport 53 -m comment --comment ctguard:new -j ACCEPT\nCOMMIT\n", true),
                // INPUT holds 304 rules: 305 is the end, 306 is past it.
                ("*filter\n-I INPUT 305 -p udp -m udp --dport 53 -j ACCEPT\nCOMMIT\n", true),
                ("*filter\n-I INPUT 306 -p udp -m udp --dport 53 -j ACCEPT\nCOMMIT\n", false),
                ("*filter\n-D INPUT -p udp -m udp --dport 53 -m comment --comment \"ctguard:old\" -j ACCEPT\nCOMMIT\n", true),
                ("*filter\n-D INPUT -p udp -m udp --dport 54 -j ACCEPT\nCOMMIT\n", false),
                ("*filter\n-I blocklist 1 -m set --match-set blk src -j ACCEPT\nCOMMIT\n", true),
                ("*raw\n-D PREROUTING -j CTGUARD-PRE\n-F CTGUARD-PRE\n-X CTGUARD-PRE\nCOMMIT\n", true),
                // The jump is still there: the chain cannot go.
                ("*raw\n-F CTGUARD-PRE\n-X CTGUARD-PRE\nCOMMIT\n", false),
            ];
            for (doc, ok) in docs {
                let whole = scratch_check(variant, family, &live, Some(&sets), doc);
                let (base, small_doc) = scratch_base(&live, doc);
                // A -D of a rule not in the save as written takes the whole table (by design).
                if !doc.contains("--dport 54") {
                    assert!(base.lines().count() < 40, "the base holds what the document refers to:\n{base}");
                }
                let small = scratch_check(variant, family, &base, Some(&sets), &small_doc);
                assert_eq!(whole.is_ok(), ok, "{variant:?} whole save, {doc}: {whole:?}");
                assert_eq!(small.is_ok(), ok, "{variant:?} scratch base, {doc}: {small:?}\n{base}{small_doc}");
                // A refusal names the document, not the live rules (one run for both, apart
                // again only to tell which).
                for r in [&whole, &small] {
                    assert!(ok || matches!(r, Err(IptablesError::Rejected { .. })), "{variant:?} {doc}: {r:?}");
                }
            }
        });
    }
}

/// Regression (issue 16: four saves per read even on an nft-only host): a save is skipped only
/// when the tool would print nothing — checked against the tools in each state.
#[test]
fn saves_are_skipped_only_when_they_would_be_empty() {
    use ctguard::backend::live::save_would_be_empty;
    use ctguard::backend::nft_read::tables;
    in_fresh_netns(|| {
        let check = |when: &str| {
            let t = tables().expect("tables");
            for variant in [Variant::Nft, Variant::Legacy] {
                for v6 in [false, true] {
                    let name = variant.tool(v6, "-save");
                    let out = run(&name, &[], None);
                    let printed = out.lines().any(|l| !l.starts_with('#') && !l.trim().is_empty());
                    let skipped = save_would_be_empty(variant, v6, Some(&t));
                    assert!(!(skipped && printed), "{when}: {name} skipped but prints:\n{out}");
                }
            }
            t
        };
        let t = check("empty namespace");
        assert!(save_would_be_empty(Variant::Nft, false, Some(&t)), "no ip table: iptables-nft-save skipped");
        run("nft", &["add", "table", "inet", "host"], None);
        check("an inet table only");
        run("iptables-nft", &["-A", "INPUT", "-j", "ACCEPT"], None);
        let t = check("iptables-nft filter v4");
        assert!(!save_would_be_empty(Variant::Nft, false, Some(&t)));
        assert!(save_would_be_empty(Variant::Nft, true, Some(&t)), "no ip6 table yet");
        run("ip6tables-legacy", &["-A", "INPUT", "-j", "ACCEPT"], None);
        check("legacy v6");
        assert!(!save_would_be_empty(Variant::Legacy, true, Some(&t)));
        run("nft", &["add", "table", "ip6", "foo"], None);
        check("a native ip6 table (iptables-nft-save prints nothing for it)");
    });
}

/// The shared saves never outlive their window: after `share_saves(false)` a save reads the
/// tool again, and while sharing an iptables-nft save is taken again once the generation id
/// moved (legacy ones are shared as they are: the window is apply's listing → rollback check).
#[test]
fn shared_saves_end_with_their_window_and_follow_the_generation_id() {
    use ctguard::backend::iptables::share_saves;
    in_fresh_netns(|| {
        let family = IpFamily::V4;
        share_saves(true);
        for variant in [Variant::Nft, Variant::Legacy] {
            restore(variant, family, "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n", true).expect("load");
            let first = save(variant, family).expect("save");
            restore(variant, family, "*filter\n-A INPUT -j DROP\nCOMMIT\n", true).expect("load");
            let second = save(variant, family).expect("save");
            match variant {
                Variant::Nft => assert_ne!(first, second, "the generation id moved: read again"),
                Variant::Legacy => assert_eq!(first, second, "legacy: shared within the window"),
            }
        }
        share_saves(false);
        let after = save(Variant::Legacy, family).expect("save");
        assert!(after.contains("-A INPUT -j DROP"), "after the window a save is read again:\n{after}");
    });
}
