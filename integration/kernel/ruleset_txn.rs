//! Ruleset transactions against the real kernel (DESIGN §1), driven through `RulesetEngine`
//! exactly as the agent drives it (prepare → planned undo → apply → check_rollback →
//! rollback), each inside its own throw-away namespace.
//!
//! The property: on a rich firewall — nft tables of five families with named sets, maps,
//! verdict maps, counters, quotas, limits and a ct helper, iptables-nft and iptables-legacy
//! rules side by side in both families, an ipset used by a legacy rule — applying a ruleset
//! file and rolling it back gives back `nft list ruleset`, the four iptables saves and
//! `ipset save` exactly. Counters are compared too: the rollback restores their snapshot
//! values and nothing sends traffic after the snapshot. The only values masked are set
//! element expiry timers (`expires …`), which run down with time.

use std::net::UdpSocket;
use std::time::Instant;

use ctguard::agent::engine::{ApplyInput, Engine, RulesetInput, Undo};
use ctguard::agent::ruleset_engine::RulesetEngine;
use ctguard::exit::Exit;
use ctguard::model::auto::MachineFacts;
use ctguard::model::names::Tag;
use ctguard::model::Policy;
use ctguard::snapshot::UndoRecord;

use crate::harness::Ns;

/// Native nft tables: inet, ip, ip6, netdev, bridge; sets (interval, dynamic, timeout),
/// maps, a verdict map, named counter, quota, limit, a ct helper.
const RICH_NFT: &str = r#"table inet rich {
	set allowed4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/8, 198.18.0.0/24 }; }
	set allowed6 { type ipv6_addr; flags interval; elements = { fd42::/64 }; }
	set recent { type ipv4_addr; size 65535; flags dynamic,timeout; timeout 1h; }
	set temp { type ipv4_addr; flags timeout; elements = { 192.0.2.7 timeout 2h }; }
	map portv { type inet_service : verdict; elements = { 22 : accept, 53 : jump dns }; }
	map marks { type ipv4_addr : mark; elements = { 10.1.1.1 : 0x10 }; }
	counter c_dns { }
	quota q_bulk { over 100 mbytes; }
	limit l_icmp { rate 10/second burst 5 packets; }
	ct helper ftp_std { type "ftp" protocol tcp; l3proto inet; }
	chain dns { counter name "c_dns" accept; }
	chain input {
		type filter hook input priority 10; policy accept;
		ct state established,related accept
		tcp dport vmap @portv
		ip saddr @allowed4 counter accept
		ip6 saddr @allowed6 counter accept
		meta l4proto icmp limit name "l_icmp" accept
		tcp dport 21 ct helper set "ftp_std"
		update @recent { ip saddr }
		meta mark set ip saddr map @marks
		udp dport 9 counter quota 1 mbytes
		quota name "q_bulk" drop
		udp dport 4000-4010 limit rate over 100/second drop
	}
}
table ip natv4 {
	chain post { type nat hook postrouting priority srcnat; policy accept; oifname "lo" masquerade; }
}
table ip6 v6only {
	set bl6 { type ipv6_addr; elements = { 2001:db8::1 }; }
	chain out { type filter hook output priority 0; policy accept; ip6 daddr @bl6 counter drop; }
}
table netdev ing {
	chain lo_in { type filter hook ingress device "lo" priority 0; policy accept; counter; }
}
table bridge br {
	chain brfwd { type filter hook forward priority 0; policy accept; ether type arp accept; }
}
"#;

const IPT_NFT_V4: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:blk - [0:0]
-A INPUT -j blk
-A INPUT -p tcp -m tcp --dport 2222 -m comment --comment "ssh alt" -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p udp -m udp --dport 9 -j ACCEPT
-A blk -s 203.0.113.0/24 -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 5353 -j REDIRECT --to-ports 53
COMMIT
"#;

const IPT_NFT_V6: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -s 2001:db8::/32 -m limit --limit 5/min -j LOG --log-prefix "v6: "
-A INPUT -p udp -m udp --dport 9 -j ACCEPT
COMMIT
"#;

const LEGACY_V4: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:legacy-chain - [0:0]
-A INPUT -m set --match-set blocklist src -j DROP
-A INPUT -j legacy-chain
-A legacy-chain -p udp -m udp --dport 9 -j ACCEPT
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 123 -j CT --notrack
COMMIT
"#;

const LEGACY_V6: &str = r#"*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 9 -j MARK --set-xmark 0x7/0xffffffff
COMMIT
"#;

const IPSETS: &str = "create blocklist hash:net family inet hashsize 1024 maxelem 65536\nadd blocklist 192.0.2.0/24\nadd blocklist 198.51.100.0/24\n";

/// Loads the rich firewall into `ns`, natives first (the order a host boots in: its nft
/// configuration, then iptables users), and sends traffic so counters are not zero.
fn setup_rich(ns: &Ns) {
    ns.exec_stdin("ipset", &["restore"], IPSETS);
    ns.nft(RICH_NFT);
    ns.exec_stdin("iptables-nft-restore", &["-w"], IPT_NFT_V4);
    ns.exec_stdin("ip6tables-nft-restore", &["-w"], IPT_NFT_V6);
    ns.exec_stdin("iptables-legacy-restore", &["-w"], LEGACY_V4);
    ns.exec_stdin("ip6tables-legacy-restore", &["-w"], LEGACY_V6);
    traffic(ns);
}

/// A few datagrams to the discard port over loopback, both families.
fn traffic(ns: &Ns) {
    ns.run(|| {
        for (bind, to) in [("127.0.0.1:0", "127.0.0.1:9"), ("[::1]:0", "[::1]:9")] {
            let s = UdpSocket::bind(bind).expect("bind");
            for _ in 0..3 {
                let _ = s.send_to(b"ctguard", to);
            }
        }
    });
}

/// Everything the property compares, as the tools print it (counters included).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fw {
    parts: Vec<(String, String)>,
}

const SAVES: [&str; 4] = ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"];

/// `nft list ruleset`, the four saves with counters (`-c`), `ipset save`; comment lines
/// (timestamps) and element expiry timers removed, and the rule counters of ip6tables-nft
/// zeroed: `ip6tables-nft-restore` 1.8.9 ignores `-c` (and `-c N M` in a rule), so those
/// restart from zero — measured, the IPv4 tool and both legacy tools restore them.
fn capture(ns: &Ns) -> Fw {
    let mut parts = vec![("nft list ruleset".to_string(), mask_ip6_filter_counters(&mask_expires(&ns.nft_list())))];
    for tool in SAVES {
        let text = ns.exec(tool, &["-c"]);
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (tool, l.strip_prefix('[').and_then(|r| r.split_once("] -A "))) {
                ("ip6tables-nft-save", Some((_, rule))) => format!("[0:0] -A {rule}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        parts.push((tool.to_string(), text));
    }
    parts.push(("ipset save".to_string(), ns.exec("ipset", &["save"])));
    Fw { parts }
}

fn mask_expires(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let toks: Vec<&str> = line.split(' ').collect();
        let mut words: Vec<String> = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            if toks[i] == "expires" && i + 1 < toks.len() {
                // `expires 1h59m58s,` → keep only the separator.
                let next = toks[i + 1];
                let core = next.trim_end_matches([',', '}']);
                if let Some(last) = words.last_mut() {
                    last.push_str(&next[core.len()..]);
                }
                i += 2;
                continue;
            }
            words.push(toks[i].to_string());
            i += 1;
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

/// Zeroes `counter packets N bytes M` inside the iptables-nft tables of family ip6.
fn mask_ip6_filter_counters(text: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("table ") {
            inside = ["table ip6 filter {", "table ip6 nat {", "table ip6 mangle {", "table ip6 raw {"].contains(&line);
        }
        if inside {
            let toks: Vec<&str> = line.split(' ').collect();
            let mut w: Vec<String> = Vec::new();
            let mut i = 0;
            while i < toks.len() {
                if (toks[i] == "packets" || toks[i] == "bytes") && i + 1 < toks.len() {
                    w.push(toks[i].to_string());
                    w.push("0".to_string());
                    i += 2;
                } else {
                    w.push(toks[i].to_string());
                    i += 1;
                }
            }
            out.push_str(&w.join(" "));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Fails with a per-part diff when `a` and `b` differ.
fn assert_same(what: &str, a: &Fw, b: &Fw) {
    let mut msg = String::new();
    for ((name, x), (_, y)) in a.parts.iter().zip(&b.parts) {
        if x != y {
            msg.push_str(&format!("--- {name} differs:\n"));
            for l in ctguard::snapshot::changed_lines(x, y) {
                msg.push_str(&format!("    {l}\n"));
            }
        }
    }
    assert!(msg.is_empty(), "{what}:\n{msg}");
}

fn input(text: &str, format: &str) -> ApplyInput {
    ApplyInput {
        policy: Policy::builtin(),
        ruleset: Some(RulesetInput { text: text.to_string(), format: format.to_string() }),
        tag: Tag::new("ruleset-test").expect("tag"),
        force: false,
        ssh: None,
        previous_undo: None,
        facts: MachineFacts::with_ram(1 << 30),
    }
}

struct Applied {
    planned: Undo,
    undo: Undo,
    /// The listing right after the apply (what the agent journals as `after`).
    after: String,
    warnings: Vec<String>,
    before_listing: String,
}

/// prepare → planned undo → apply → check_rollback → listing, inside `ns`, as the agent
/// runs them, timing each phase.
fn apply(ns: &Ns, text: &str, format: &str) -> Applied {
    let engine = RulesetEngine;
    let inp = input(text, format);
    ns.run(|| {
        let t0 = Instant::now();
        let p = match engine.prepare(&inp) {
            Ok(p) => p,
            Err(e) => panic!("prepare: exit {:?}: {}", e.exit, e.message),
        };
        let t1 = Instant::now();
        let planned = p.planned_undo();
        let warnings = p.warnings();
        let before_listing = p.before();
        let undo = match p.apply() {
            Ok(u) => u,
            Err(e) => panic!("apply: exit {:?}: {}", e.exit, e.message),
        };
        let t2 = Instant::now();
        let genid = ctguard::backend::netlink::get_genid().expect("genid");
        if let Err(e) = engine.check_rollback(&undo) {
            panic!("check_rollback: {}", e.message);
        }
        let t3 = Instant::now();
        let after = match engine.listing(&undo) {
            Ok(l) => l,
            Err(e) => panic!("listing: {}", e.message),
        };
        // `nft -c` and the reads commit nothing: the id stays at the apply's, so the rollback
        // knows nobody else touched nf_tables while it is unchanged.
        assert_eq!(ctguard::backend::netlink::get_genid().expect("genid"), genid, "check and listing commit nothing");
        eprintln!(
            "timing: prepare {:?}, apply {:?}, check_rollback {:?}, listing {:?}",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t3.elapsed()
        );
        Applied { planned, undo, after, warnings, before_listing }
    })
}

/// Rolls back with the drift measured against `after` (as the agent does).
fn rollback(ns: &Ns, undo: &Undo, after: Option<&str>) -> Vec<ctguard::snapshot::DriftSection> {
    let engine = RulesetEngine;
    ns.run(|| {
        let t = Instant::now();
        let r = engine.rollback_with_drift(undo, after);
        eprintln!("timing: rollback {:?}", t.elapsed());
        match r {
            Ok(d) => d,
            Err(e) => panic!("rollback: exit {:?}: {}", e.exit, e.message),
        }
    })
}

fn record(v: &Undo) -> UndoRecord {
    match v {
        Undo::Ruleset(r) => (**r).clone(),
        Undo::Policy(_) => panic!("a policy undo from the ruleset engine"),
    }
}

/// Changes many things at once: deletes a native table and an iptables-nft table, adds
/// elements, rules, chains, a new table, and writes a native rule into iptables-nft's filter.
const CHANGE_NFT: &str = r#"delete table ip6 v6only
delete table ip nat
add element inet rich allowed4 { 192.0.2.0/24 }
add rule inet rich input tcp dport 8080 accept
add chain inet rich extra
table inet newtab {
	set s { type inet_service; elements = { 1, 2, 3 }; }
	chain c { type filter hook output priority 5; policy accept; udp dport @s counter drop; }
}
add rule ip filter blk ip saddr 198.51.100.0/24 drop
"#;

#[test]
fn nft_ruleset_rolls_back_exactly() {
    let ns = Ns::new("rs-nft");
    setup_rich(&ns);
    let before = capture(&ns);
    let a = apply(&ns, CHANGE_NFT, "nft");
    let rec = record(&a.undo);
    let info = rec.apply.as_ref().expect("apply info");
    eprintln!("apply info: {info:?}");
    assert!(!info.concurrent, "nothing else committed: {info:?}");
    assert_eq!((rec.genid_before, rec.genid_after), (rec.snapshot.state.genid, info.genid_after), "journaled ids");
    assert_eq!(info.genid_after, info.genid_before.map(|g| g + 1), "nft -f is one commit");
    assert_eq!(record(&a.planned).snapshot, rec.snapshot, "PREPARED already journals the snapshot");
    // The route of each table.
    let ipt: Vec<String> = rec.snapshot.iptables_nft.iter().map(|t| t.to_string()).collect();
    assert_eq!(ipt, vec!["ip filter", "ip nat", "ip6 filter"]);
    // The rollback lists tables over netlink: the same as `nft list tables`.
    let listed: Vec<String> = ns.exec("nft", &["list", "tables"]).lines().map(str::to_string).collect();
    let dumped: Vec<String> = ns
        .run(ctguard::backend::ruleset_txn::current_tables)
        .expect("netlink table dump")
        .iter()
        .map(|t| format!("table {t}"))
        .collect();
    assert_eq!(listed, dumped);
    let during = capture(&ns);
    assert!(during.parts[0].1.contains("table inet newtab") && !during.parts[0].1.contains("table ip6 v6only"));
    assert!(a.before_listing.starts_with("## nft list ruleset\ntable inet rich {"));
    let drift = rollback(&ns, &a.undo, Some(&a.after));
    assert!(drift.is_empty(), "nobody else changed anything: {drift:?}");
    assert_same("after rollback", &before, &capture(&ns));
    // Twice = once.
    let drift = rollback(&ns, &a.undo, Some(&a.after));
    assert!(drift.is_empty(), "{drift:?}");
    assert_same("after a second rollback", &before, &capture(&ns));
}

#[test]
fn flush_ruleset_script_rolls_back_exactly() {
    let ns = Ns::new("rs-flush");
    setup_rich(&ns);
    let before = capture(&ns);
    let a = apply(
        &ns,
        "flush ruleset\ntable inet only { chain c { type filter hook input priority 0; policy drop; }; }\n",
        "",
    );
    assert_eq!(record(&a.undo).apply.map(|i| i.format), Some(ctguard::snapshot::RulesetFormat::Nft));
    let during = capture(&ns);
    assert!(!during.parts[0].1.contains("table ip filter"), "flush ruleset removed iptables-nft's tables too");
    rollback(&ns, &a.undo, Some(&a.after));
    assert_same("after rollback", &before, &capture(&ns));
}

/// An iptables-restore dump (IPv4, detected) changing iptables-nft's filter and creating
/// mangle; then an IPv6 dump. With both variants in use the dump goes to iptables-nft.
#[test]
fn iptables_dump_rolls_back_exactly() {
    let ns = Ns::new("rs-ipt");
    setup_rich(&ns);
    let before = capture(&ns);
    let v4 = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:new - [0:0]\n-A INPUT -i lo -j ACCEPT\n-A INPUT -j new\n-A new -s 198.18.0.0/24 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j MARK --set-mark 1\nCOMMIT\n";
    let a = apply(&ns, v4, "");
    let rec = record(&a.undo);
    let info = rec.apply.clone().expect("apply info");
    assert_eq!(info.format, ctguard::snapshot::RulesetFormat::Iptables);
    assert_eq!(info.family, Some(ctguard::snapshot::Family::V4));
    assert_eq!(info.variant, Some(ctguard::live::fw::IptVariant::Nft));
    eprintln!("apply info: {info:?}");
    assert!(!info.concurrent, "{info:?}");
    assert!(a.warnings.iter().any(|w| w.contains("both iptables-legacy and iptables-nft")), "{:?}", a.warnings);
    let during = ns.exec("iptables-nft-save", &[]);
    assert!(during.contains("*mangle") && during.contains("-A new -s 198.18.0.0/24"), "{during}");
    rollback(&ns, &a.undo, Some(&a.after));
    assert_same("after the IPv4 rollback", &before, &capture(&ns));

    let v6 = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -s 2001:db8::/32 -j DROP\nCOMMIT\n*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p udp -m udp --dport 53 -j CT --notrack\nCOMMIT\n";
    let a = apply(&ns, v6, "iptables");
    let info = record(&a.undo).apply.expect("apply info");
    assert_eq!(info.family, Some(ctguard::snapshot::Family::V6));
    assert!(!info.concurrent, "{info:?}");
    assert!(ns.exec("ip6tables-nft-save", &[]).contains("*raw"));
    rollback(&ns, &a.undo, Some(&a.after));
    assert_same("after the IPv6 rollback", &before, &capture(&ns));
}

/// Someone else changes things during the window (an nft rule, a native chain in
/// iptables-nft's filter, a legacy rule, an ipset element): the rollback overwrites the rule
/// changes — safety first — and reports each in the drift; ipset contents are kept.
#[test]
fn changes_by_others_are_overwritten_and_reported() {
    let ns = Ns::new("rs-drift");
    setup_rich(&ns);
    let before = capture(&ns);
    let a = apply(&ns, "add rule inet rich input tcp dport 8080 accept\n", "nft");
    ns.nft("add rule inet rich input udp dport 9999 drop\nadd chain ip filter sneaky\n");
    ns.exec("iptables-legacy", &["-w", "-A", "INPUT", "-s", "192.0.2.99", "-j", "DROP"]);
    ns.exec("ipset", &["add", "blocklist", "203.0.113.5"]);
    let drift = rollback(&ns, &a.undo, Some(&a.after));
    let sections: Vec<&str> = drift.iter().map(|d| d.section.as_str()).collect();
    assert!(sections.contains(&"nft table inet rich"), "{drift:?}");
    assert!(sections.contains(&"nft table ip filter"), "{drift:?}");
    assert!(sections.contains(&"iptables-legacy-save filter"), "{drift:?}");
    let rich = drift.iter().find(|d| d.section == "nft table inet rich").expect("rich");
    assert!(rich.diff.iter().any(|l| l.starts_with('+') && l.contains("udp dport 9999 drop")), "{rich:?}");
    assert!(!rich.diff.iter().any(|l| l.contains("8080")), "ctguard's own change is not drift: {rich:?}");
    let legacy = drift.iter().find(|d| d.section == "iptables-legacy-save filter").expect("legacy");
    assert!(legacy.diff.iter().any(|l| l == "+ -A INPUT -s 192.0.2.99/32 -j DROP"), "{legacy:?}");
    let set = drift.iter().find(|d| d.section == "ipset blocklist").expect("ipset drift");
    assert!(!set.overwritten && set.diff == vec!["+ add blocklist 203.0.113.5".to_string()], "{set:?}");
    assert!(drift.iter().filter(|d| d.section != "ipset blocklist").all(|d| d.overwritten));
    // Rules are back exactly; the ipset keeps the element added meanwhile (runtime data).
    let after = capture(&ns);
    assert_same("after rollback", &Fw { parts: before.parts[..5].to_vec() }, &Fw { parts: after.parts[..5].to_vec() });
    assert!(after.parts[5].1.contains("add blocklist 203.0.113.5"));
    // The engine's report for the agent (a second rollback): only what is still not the snapshot.
    let report = ns.run(|| RulesetEngine.rollback_report(&a.undo, Some(&a.after))).expect("report");
    let report = serde_json::json!({"drift": report.drift});
    let sections: Vec<&str> = report["drift"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["section"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(sections, vec!["ipset blocklist"], "a second rollback finds only the kept ipset element: {report}");
}

/// A crash mid-apply: the agent rolls back from the PREPARED record alone.
#[test]
fn planned_undo_alone_restores() {
    let ns = Ns::new("rs-crash");
    setup_rich(&ns);
    let before = capture(&ns);
    let a = apply(&ns, CHANGE_NFT, "nft");
    assert!(record(&a.planned).apply.is_none());
    let drift = rollback(&ns, &a.planned, None);
    assert!(drift.is_empty());
    assert_same("after rollback from the planned undo", &before, &capture(&ns));
}

/// Bad files are refused by the kernel check (exit 3) with nothing changed, before the apply —
/// by the agent's preparation and by `plan`'s.
#[test]
fn bad_ruleset_is_refused_with_nothing_changed() {
    let ns = Ns::new("rs-bad");
    setup_rich(&ns);
    let before = capture(&ns);
    let engine = RulesetEngine;
    for (text, format) in [
        // Parses, but the kernel refuses: a jump to a chain that does not exist.
        ("add table inet x\nadd chain inet x c\nadd rule inet x c jump nowhere\n", "nft"),
        ("table inet rich {\n\tchain input {\n\t\tip saddr @nosuchset drop\n\t}\n}\n", "nft"),
        // A set that does not exist; and a target in a table that does not allow it.
        ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m set --match-set nosuchset src -j DROP\nCOMMIT\n", "iptables"),
        ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DNAT --to-destination 10.0.0.1\nCOMMIT\n", "iptables"),
    ] {
        let inp = input(text, format);
        // The agent: refused before anything is committed (the generation id does not move).
        let r = ns.run(|| {
            let g = ctguard::backend::netlink::get_genid().expect("genid");
            let r = engine.prepare(&inp).and_then(|p| p.apply()).map(|_| ());
            (r, g == ctguard::backend::netlink::get_genid().expect("genid"))
        });
        match r {
            (Ok(()), _) => panic!("accepted: {text}"),
            (Err(e), unmoved) => {
                assert_eq!(e.exit, Exit::Refused, "{text}: {}", e.message);
                assert!(unmoved, "a refused file committed something: {text}");
            }
        }
        assert_same("after a refused file", &before, &capture(&ns));
        // `plan --ruleset` applies nothing: its preparation checks the file itself.
        let opts = ctguard::backend::ruleset_txn::PrepareOptions::default();
        let r = ns.run(|| ctguard::backend::ruleset_txn::prepare(text, format, opts).map(|_| ()));
        match r {
            Ok(()) => panic!("plan accepted: {text}"),
            Err(e) => assert_eq!(e.exit(), Exit::Refused, "{text}: {e}"),
        }
        assert_same("after a refused plan", &before, &capture(&ns));
    }
    // A dump of two tables is not one commit (each COMMIT is its own): a bad second table is
    // still refused before anything is applied, the first table included.
    let two = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p udp -j NOTRACK\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DNAT --to-destination 10.0.0.1\nCOMMIT\n";
    let r = ns.run(|| engine.prepare(&input(two, "iptables")).map(|_| ()));
    assert!(matches!(r, Err(ref e) if e.exit == Exit::Refused), "two tables: {:?}", r.err());
    assert_same("after a refused two-table dump", &before, &capture(&ns));
    let r = ns.run(|| {
        engine.prepare(&input("*filter\n-A INPUT -s 10.0.0.1 -d ::1 -j DROP\nCOMMIT\n", "iptables")).map(|_| ())
    });
    assert!(matches!(r, Err(ref e) if e.exit == Exit::BadInput), "mixed families: {:?}", r.err());
}

/// A target that uses only legacy tables gets an iptables dump through iptables-legacy. A
/// legacy table the dump creates cannot be removed: after rollback it is there, empty — the
/// one difference the kernel makes unavoidable.
#[test]
fn legacy_only_target() {
    let ns = Ns::new("rs-legacy");
    ns.exec_stdin("ipset", &["restore"], IPSETS);
    ns.exec_stdin("iptables-legacy-restore", &["-w"], LEGACY_V4);
    traffic(&ns);
    let before = capture(&ns);
    let dump = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -p udp -m udp --dport 5353 -j REDIRECT --to-ports 53\nCOMMIT\n";
    let a = apply(&ns, dump, "iptables");
    let info = record(&a.undo).apply.expect("apply info");
    assert_eq!(info.variant, Some(ctguard::live::fw::IptVariant::Legacy));
    assert_eq!(info.genid_before, info.genid_after, "legacy tools do not touch nf_tables");
    assert!(ns.exec("iptables-legacy-save", &[]).contains("--to-ports 53"));
    assert!(ns.nft_list().trim().is_empty(), "nothing went to nf_tables");
    rollback(&ns, &a.undo, Some(&a.after));
    let after = capture(&ns);
    let mut expected = before.clone();
    // The emptied nat table stays (listed first: the kernel lists legacy tables newest first).
    for (name, text) in expected.parts.iter_mut() {
        if name == "iptables-legacy-save" {
            let now = &after.parts.iter().find(|(n, _)| n == name).expect("part").1;
            assert!(now.contains("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"), "{now}");
            let nat = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";
            *text = now.replace(nat, "");
            assert_eq!(
                *text,
                before.parts.iter().find(|(n, _)| n == name).expect("part").1,
                "apart from the empty nat table"
            );
            *text = now.clone();
        }
    }
    assert_same("after rollback (legacy)", &expected, &after);
}

/// Where iptables-nft tables were created before native ones, the rollback recreates the
/// native tables first (one `nft -f`) and the iptables-nft tables after (their restore
/// replaces each table): `nft list ruleset` then lists the same tables with the same content
/// in another order — a difference of listing order only (base chains of equal hook and
/// priority in different tables also re-register in that order).
#[test]
fn table_order_is_the_only_difference_when_iptables_nft_came_first() {
    let ns = Ns::new("rs-order");
    ns.exec_stdin("iptables-nft-restore", &["-w"], IPT_NFT_V4);
    ns.nft("table inet late { chain c { type filter hook input priority 0; policy accept; counter; }; }\n");
    let before = capture(&ns);
    let a = apply(&ns, "add rule inet late c udp dport 1 drop\n", "nft");
    rollback(&ns, &a.undo, Some(&a.after));
    let after = capture(&ns);
    let tables = |fw: &Fw| -> Vec<String> { fw.parts[0].1.split_inclusive("\n}\n").map(str::to_string).collect() };
    let (mut x, mut y) = (tables(&before), tables(&after));
    assert_ne!(x, y, "the order changed");
    assert!(y[0].starts_with("table inet late {"), "native tables first: {y:?}");
    x.sort();
    y.sort();
    assert_eq!(x, y, "same tables, same content");
    assert_eq!(before.parts[1..], after.parts[1..]);
}

/// Phase timings on 10k-rule rulesets (not a timed test: `--ignored --nocapture` prints them).
/// The target holds a 10k-rule table; the file adds another. Compared with bare `nft -f` of
/// the same file and of the rollback's work (delete both tables, recreate the first).
#[test]
#[ignore]
fn ruleset_10k_phase_timings() {
    let big = |name: &str| {
        let mut s = format!("table inet {name} {{\n\tset ports {{ type inet_service; elements = {{ 1-1000 }}; flags interval; }}\n\tchain c {{\n\t\ttype filter hook input priority 0; policy accept;\n");
        for i in 0..10_000u32 {
            s.push_str(&format!("\t\tip saddr 10.{}.{}.0/24 tcp dport @ports counter accept\n", i / 256, i % 256));
        }
        s.push_str("\t}\n}\n");
        s
    };
    let ns = Ns::new("rs-10k");
    ns.nft(&big("base"));
    let file = big("added");
    let engine = RulesetEngine;
    let inp = input(&file, "nft");
    let (prep, app, chk, list, rb) = ns.run(|| {
        let t0 = Instant::now();
        let p = engine.prepare(&inp).map_err(|e| e.message).expect("prepare");
        let t1 = Instant::now();
        let undo = p.apply().map_err(|e| e.message).expect("apply");
        let t2 = Instant::now();
        engine.check_rollback(&undo).map_err(|e| e.message).expect("check");
        let t3 = Instant::now();
        let after = engine.listing(&undo).map_err(|e| e.message).expect("listing");
        let t4 = Instant::now();
        engine.rollback_report(&undo, Some(&after)).map_err(|e| e.message).expect("rollback");
        (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4.elapsed())
    });
    let bare = |script: &str| {
        let t = Instant::now();
        ns.nft(script);
        t.elapsed()
    };
    let bare_apply = bare(&file);
    let bare_restore = bare(&format!("delete table inet added\ndelete table inet base\n{}", big("base")));
    eprintln!(
        "10k: prepare {prep:?}, apply {app:?} (bare nft -f {bare_apply:?}), check_rollback {chk:?}, listing {list:?}, \
         rollback {rb:?} (bare restore {bare_restore:?})"
    );
}

/// The requester's SSH connection, as the agent derives it.
fn ssh_conn() -> ctguard::lint::SshConn {
    ctguard::lint::SshConn { client: "198.18.0.2".parse().expect("address"), server_port: 22 }
}

/// Prepares `text` with the requester's SSH connection known: the ruleset lint (DESIGN §1/§7).
fn prepare_with_ssh(ns: &Ns, text: &str, format: &str, force: bool) -> Result<Vec<String>, (Exit, String)> {
    let mut inp = input(text, format);
    inp.ssh = Some(ssh_conn());
    inp.force = force;
    ns.run(|| RulesetEngine.prepare(&inp).map(|p| p.warnings()).map_err(|e| (e.exit, e.message)))
}

const DROP_ALL_INPUT: &str =
    "flush ruleset\ntable inet lockout {\n  chain input {\n    type filter hook input priority filter; policy drop;\n  }\n}\n";

/// A ruleset whose result drops the requester's SSH connection is refused (exit 3) with
/// nothing changed, unless forced (then it is a warning); one that lets tcp/22 in (new and
/// established) is no finding; an iptables dump with INPUT DROP and no port-22 accept is
/// refused too.
#[test]
fn ssh_lockout_lint_refuses_a_ruleset_that_blocks_the_requester() {
    let ns = Ns::new("rs-lockout");
    ns.nft(include_str!("../stateful.nft"));
    let before = capture(&ns);

    let (exit, msg) = prepare_with_ssh(&ns, DROP_ALL_INPUT, "nft", false).expect_err("refused");
    eprintln!("refused: {msg}");
    assert_eq!(exit, Exit::Refused, "{msg}");
    assert!(msg.contains("ssh-lockout") && msg.contains("nft inet lockout input") && msg.contains("force"), "{msg}");
    assert_same("after the refusal", &before, &capture(&ns));

    let warnings = prepare_with_ssh(&ns, DROP_ALL_INPUT, "nft", true).expect("forced");
    assert!(warnings.iter().any(|w| w.starts_with("forced past: error [ssh-lockout]")), "{warnings:?}");
    assert_same("after a prepare", &before, &capture(&ns));

    // The existing firewall plus a file that adds an unrelated rule: SSH still gets in.
    let warnings = prepare_with_ssh(&ns, "add rule inet host input udp dport 9999 drop\n", "nft", false).expect("ok");
    assert!(!warnings.iter().any(|w| w.contains("ssh-lockout")), "{warnings:?}");
    // A whole new ruleset that accepts tcp/22 (new and established) before dropping the rest.
    let accepts = "flush ruleset\ntable inet only {\n  chain input {\n    type filter hook input priority filter; policy drop;\n    ct state established,related accept\n    tcp dport 22 accept\n  }\n}\n";
    let warnings = prepare_with_ssh(&ns, accepts, "nft", false).expect("ok");
    assert!(!warnings.iter().any(|w| w.contains("ssh-lockout")), "{warnings:?}");
    // The existing firewall's ssh accept removed by the file: only the result counts.
    let (exit, msg) =
        prepare_with_ssh(&ns, "delete rule inet host input handle 5\n", "nft", false).expect_err("refused");
    assert_eq!(exit, Exit::Refused, "{msg}");

    let dump = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT\nCOMMIT\n";
    let (exit, msg) = prepare_with_ssh(&ns, dump, "iptables", false).expect_err("refused");
    eprintln!("refused: {msg}");
    assert_eq!(exit, Exit::Refused, "{msg}");
    assert!(msg.contains("ssh-lockout") && msg.contains("filter INPUT"), "{msg}");
    let ok = dump.replace("--dport 80", "--dport 22");
    let warnings = prepare_with_ssh(&ns, &ok, "iptables", false).expect("ok");
    assert!(!warnings.iter().any(|w| w.contains("ssh-lockout")), "{warnings:?}");
    assert_same("after every prepare", &before, &capture(&ns));
}

/// The lint builds the result from the rich firewall (every family, sets, ipsets, both
/// iptables variants) and from rules bound to an interface of the target: it evaluates it (no
/// "could not evaluate" warning), finds nothing to refuse, and changes nothing.
#[test]
fn ssh_lockout_lint_evaluates_a_rich_result() {
    let ns = Ns::new("rs-lint-rich");
    setup_rich(&ns);
    ns.exec("ip", &["link", "add", "eth9", "type", "veth", "peer", "name", "eth9p"]);
    ns.nft("table inet dev { chain c { type filter hook input priority 20; policy accept; iif \"eth9\" counter accept; }; }\n");
    let before = capture(&ns);
    let warnings = prepare_with_ssh(&ns, CHANGE_NFT, "nft", false).expect("prepared");
    assert!(!warnings.iter().any(|w| w.contains("ssh-lockout")), "{warnings:?}");
    let warnings = prepare_with_ssh(&ns, "add rule inet dev c oif \"eth9\" drop\n", "nft", false).expect("prepared");
    assert!(!warnings.iter().any(|w| w.contains("ssh-lockout")), "{warnings:?}");
    // Appended after the opaque `tcp dport vmap @portv` it would be a "maybe"; first, it is sure.
    let (exit, msg) = prepare_with_ssh(&ns, "insert rule inet rich input ip saddr 198.18.0.2 drop\n", "nft", false)
        .expect_err("refused");
    assert_eq!(exit, Exit::Refused, "{msg}");
    assert!(msg.contains("nft inet rich input") && msg.contains("ip saddr 198.18.0.2 drop"), "{msg}");
    assert_same("after the prepares", &before, &capture(&ns));
}

/// Regression (issue 16, the file's kernel check now runs beside the snapshot): a bad file —
/// an nft script and an iptables dump — is still refused through the agent with exit 3 and one
/// line, nothing applied and no transaction journaled (refused before PREPARED).
#[test]
fn regression_concurrent_file_check_refuses_with_nothing_applied_or_journaled() {
    use crate::txn_cli::Ctg;
    let ns = Ns::new("rs-ccheck");
    setup_rich(&ns);
    let before = capture(&ns);
    let ctg = Ctg::new();
    let dir = ctg.base.join("files");
    std::fs::create_dir_all(&dir).expect("dir");
    for (name, text, format) in [
        ("bad.nft", "add table inet x\nadd chain inet x c\nadd rule inet x c jump nowhere\n", "nft"),
        ("bad.rules", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DNAT --to-destination 10.0.0.1\nCOMMIT\n", "iptables"),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, text).expect("write");
        let out = ctg.run(&[
            "apply",
            "--netns",
            ns.name(),
            "--timeout",
            "60s",
            "--ruleset",
            file.to_str().expect("utf8"),
            "--format",
            format,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{format}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{format}: one line: {stderr}");
        assert!(stderr.contains("kernel refuses the"), "{format}: names the refusal: {stderr}");
        assert_same(&format!("after a refused {format} file"), &before, &capture(&ns));
        let h = ctg.json(&["history"]);
        assert_eq!(h["transactions"].as_array().map(Vec::len), Some(0), "{format}: a transaction was journaled: {h}");
    }
}

/// Regression (issue 16): the file's check runs beside the snapshot, so another writer can
/// commit between the check and the snapshot. A file valid only before that change (`create
/// table` of the table the change adds) must still be refused before anything is applied: the
/// check saw another generation than the snapshot, so it is run again. Without the fault the
/// same file is accepted (the test can tell).
#[test]
fn regression_a_foreign_change_right_after_the_concurrent_file_check_is_checked_again() {
    use ctguard::backend::ruleset_txn::FAULT_AFTER_FILE_CHECK;
    let ns = Ns::new("rs-cfault");
    ns.nft("table inet keep {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t}\n}\n");
    let file = format!("create table ip {}\n", ctguard::fault::FOREIGN_TABLE);
    let engine = RulesetEngine;
    let inp = input(&file, "nft");
    let accepted = ns.run(|| engine.prepare(&inp).map(|_| ()));
    assert!(accepted.is_ok(), "the file is valid before the change: {:?}", accepted.err().map(|e| e.message));
    let (r, fired, moved) = ns.run(|| {
        let g = ctguard::backend::netlink::get_genid().expect("genid");
        let (r, fired) = ctguard::fault::inject(FAULT_AFTER_FILE_CHECK, 1, || engine.prepare(&inp).map(|_| ()));
        (r, fired, ctguard::backend::netlink::get_genid().expect("genid").wrapping_sub(g))
    });
    assert_eq!(fired, 1, "the fault point was not reached");
    match r {
        Ok(()) => panic!("a file the kernel refuses after the foreign change was accepted"),
        Err(e) => {
            assert_eq!(e.exit, Exit::Refused, "{}", e.message);
            assert!(e.message.contains("kernel refuses the ruleset file"), "{}", e.message);
        }
    }
    assert_eq!(moved, 1, "only the foreign change committed");
    let list = ns.nft_list();
    assert!(list.contains(ctguard::fault::FOREIGN_TABLE) && list.contains("table inet keep"), "{list}");
}

/// Regression (issue 16): the rollback's deletes are kernel-checked beside the listing right
/// after the apply ([`Prepared::apply_listed`]), and the agent's `check_rollback` skips the
/// check only while the generation id is the one that check passed at. Shown with a snapshot
/// whose restore script the kernel refuses: skipped at that id, refused once another commit
/// moved it. The listing returned is the listing.
#[test]
fn regression_the_rollback_check_is_skipped_only_at_the_generation_id_it_passed_at() {
    let ns = Ns::new("rs-lcheck");
    setup_rich(&ns);
    let engine = RulesetEngine;
    let inp = input(CHANGE_NFT, "nft");
    let (undo, listed, g) = ns.run(|| {
        let p = engine.prepare(&inp).unwrap_or_else(|e| panic!("prepare: {}", e.message));
        let (undo, listed) = p.apply_listed().unwrap_or_else(|e| panic!("apply: {}", e.message));
        (undo, listed, ctguard::backend::netlink::get_genid().expect("genid"))
    });
    let mut rec = record(&undo);
    assert_eq!(rec.deletes_checked_at, Some(g), "the deletes check beside the listing passed at the apply's id");
    assert_eq!(rec.genid_after, Some(g));
    let listing = ns.run(|| engine.listing(&undo)).unwrap_or_else(|e| panic!("listing: {}", e.message));
    assert_eq!(listed.as_deref(), Some(listing.as_str()), "the listing beside the check is the listing");
    // A restore script the kernel refuses (a jump to a chain that does not exist), checked whole.
    let good = rec.clone();
    rec.restore_checked = false;
    for t in rec.snapshot.state.nft.iter_mut().filter(|t| t.name == "rich") {
        t.text = t.text.replacen("chain input {\n", "chain input {\n\t\tjump nowhere\n", 1);
    }
    let bad_undo = Undo::Ruleset(Box::new(rec));
    assert!(ns.run(|| engine.check_rollback(&bad_undo)).is_ok(), "skipped at the id it passed at");
    ns.nft("add table ip moved\n");
    match ns.run(|| engine.check_rollback(&bad_undo)) {
        Ok(()) => panic!("the check was skipped after another commit moved the generation id"),
        Err(e) => assert_eq!(e.exit, Exit::Refused, "{}", e.message),
    }
    rollback(&ns, &Undo::Ruleset(Box::new(good)), None);
}

/// Issue 16 (`nft list` of a 100k-rule iptables-nft table takes 4.5 s): the scratch proof of a
/// ruleset snapshot compares kernel fingerprints first. An iptables-nft table restored from its
/// save (`-c`) in another namespace has the live table's fingerprint — counters aside, so a
/// zeroing of them changes nothing — and any change to its rules shows.
#[test]
fn an_iptables_nft_table_restored_from_its_save_has_the_live_fingerprint() {
    use ctguard::backend::nft_fingerprint::table_fingerprint;
    let live = Ns::new("rs-fp-live");
    let copy = Ns::new("rs-fp-copy");
    let dump = "*filter\n:INPUT DROP [7:700]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:blocklist - [0:0]\n[3:300] -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -j blocklist\n-A INPUT -p udp -m multiport --dports 53,5353 -m comment --comment \"dns in\" -j ACCEPT\n[9:900] -A blocklist -s 198.51.100.0/24 -j DROP\nCOMMIT\n";
    live.exec_stdin("iptables-nft-restore", &["-w", "-c"], dump);
    let save = live.exec("iptables-nft-save", &["-c"]);
    copy.exec_stdin("iptables-nft-restore", &["-w", "-c"], &save);
    let print = |ns: &Ns| ns.run(|| table_fingerprint("ip", "filter")).unwrap_or_else(|e| panic!("fingerprint: {e}"));
    let a = print(&live);
    assert_eq!(a.chains.len(), 4, "{a:?}");
    assert_eq!(a.chains["INPUT"].1.len(), 4);
    assert_eq!(a.difference(&print(&copy)), None);
    copy.exec("iptables-nft", &["-w", "-Z"]);
    assert_eq!(a.difference(&print(&copy)), None, "counters are left out");
    copy.exec("iptables-nft", &["-w", "-R", "blocklist", "1", "-s", "198.51.100.0/25", "-j", "DROP"]);
    assert_eq!(a.difference(&print(&copy)).as_deref(), Some("rule 1 of chain blocklist differs"));
    copy.nft("add rule ip filter INPUT tcp dport 9 accept\n");
    assert_eq!(a.difference(&print(&copy)).as_deref(), Some("chain INPUT holds 4 rules here, 5 there"));
    assert!(print(&copy).chains.contains_key("blocklist"));
    assert_eq!(
        live.run(|| table_fingerprint("ip", "nosuch")).map(|f| f.chains.len()).ok(),
        Some(0),
        "a missing table has an empty fingerprint"
    );
}

/// Issue 16 (`nft list` of a 100k-rule iptables-nft table takes 4.5 s, three times per ruleset
/// apply): an iptables-nft table its save lists is read as a stub — its chains and kernel
/// fingerprint, shown by the save — and never listed by nft; a native table with an iptables
/// name (the save calls it incompatible), an iptables-nft table holding a native set, and every
/// other table are listed by nft as before. The snapshot proves the stub's table restorable
/// by comparing fingerprints.
#[test]
fn iptables_nft_tables_are_read_by_their_save_and_fingerprint_not_by_nft() {
    let ns = Ns::new("rs-stub");
    setup_rich(&ns);
    ns.nft("table ip security {\n\tchain pre {\n\t\ttype filter hook input priority 50; policy accept;\n\t\ttcp dport 8080 accept\n\t}\n}\n");
    ns.exec("ip6tables-nft", &["-w", "-t", "mangle", "-A", "PREROUTING", "-j", "ACCEPT"]);
    ns.nft("add set ip6 mangle natives { type ipv6_addr; }\n");
    let st = ns.run(ctguard::backend::ruleset_txn::read_state).unwrap_or_else(|e| panic!("read_state: {e}"));
    let table = |f: &str, n: &str| {
        st.nft.iter().find(|t| t.family == f && t.name == n).unwrap_or_else(|| panic!("{f} {n} read: {:?}", st.nft))
    };
    let filter = table("ip", "filter");
    assert!(filter.stub_digest().is_some(), "iptables-nft's filter is a stub:\n{}", filter.text);
    assert!(filter.text.contains("\tchain INPUT {\n\t\ttype filter hook input"), "{}", filter.text);
    assert!(table("ip6", "filter").stub_digest().is_some());
    for (f, n, what) in [
        ("ip", "security", "a native table with an iptables name"),
        ("ip6", "mangle", "a native set inside"),
        ("inet", "rich", "a native table"),
    ] {
        let t = table(f, n);
        assert!(t.stub_digest().is_none() && t.text.contains("chain"), "{what}: listed by nft:\n{}", t.text);
    }
    // The same table, twice: the same stub.
    let again = ns.run(ctguard::backend::ruleset_txn::read_state).unwrap_or_else(|e| panic!("{e}"));
    let stubs = |s: &ctguard::snapshot::FwState| {
        s.nft.iter().filter(|t| t.stub_digest().is_some()).cloned().collect::<Vec<_>>()
    };
    assert_eq!(stubs(&again), stubs(&st));
    assert_eq!(stubs(&st).len(), 3, "ip filter, ip nat, ip6 filter");
    // The snapshot proves the stubs restorable (fingerprints equal in a scratch namespace).
    let snap = ns
        .run(ctguard::backend::ruleset_txn::take_snapshot)
        .unwrap_or_else(|e| panic!("snapshot: {}", ctguard::backend::policy_txn::chain_text(&e)));
    assert!(snap.is_iptables_nft(&filter.id()), "{:?}", snap.iptables_nft);
    // (Rollbacks through stubs: every rich-firewall test above, whose iptables-nft tables are
    // now read so.)
}

/// A stub that its save does not give back exactly — a native `meta mark` rule in
/// iptables-nft's chain, which iptables-nft-save shows as `-m mark` and a restore writes as a
/// compat match — fails the fingerprint proof and then the listing one, and is read again
/// with nft (never restored from the stub): it is restored natively, and the rollback is exact.
#[test]
fn a_stub_its_save_does_not_give_back_is_listed_and_restored_natively() {
    let ns = Ns::new("rs-stub-relist");
    ns.exec_stdin(
        "iptables-nft-restore",
        &["-w"],
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n",
    );
    ns.nft("add rule ip filter INPUT meta mark 0x1 accept\n");
    let st = ns.run(ctguard::backend::ruleset_txn::read_state).unwrap_or_else(|e| panic!("read_state: {e}"));
    let id = ctguard::snapshot::TableId { family: "ip".into(), name: "filter".into() };
    assert!(st.table(&id).and_then(|t| t.stub_digest()).is_some(), "read as a stub: {:?}", st.nft);
    let snap = ns
        .run(ctguard::backend::ruleset_txn::take_snapshot)
        .unwrap_or_else(|e| panic!("snapshot: {}", ctguard::backend::policy_txn::chain_text(&e)));
    let t = snap.state.table(&id).expect("filter");
    assert!(t.stub_digest().is_none() && t.text.contains("meta mark 0x00000001 accept"), "listed again:\n{}", t.text);
    assert!(!snap.is_iptables_nft(&id), "restored natively: {:?}", snap.iptables_nft);
    let before = capture(&ns);
    let a = apply(&ns, "flush ruleset\n", "nft");
    rollback(&ns, &a.undo, Some(&a.after));
    assert_same("after the rollback", &before, &capture(&ns));
}
