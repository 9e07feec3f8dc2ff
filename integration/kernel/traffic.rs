//! Traffic tests: real packets through real netfilter in throw-away namespaces prove that
//! ctguard's rendered NOTRACK policy keeps DNS out of conntrack, that it can fail (controls
//! without the policy and on a port outside it), and the "seeds' trap": NOTRACK behind a
//! stateful host firewall blackholes DNS unless ctguard inserts its accept.
//!
//! Every figure is printed with `eprintln!` (`cargo test --test kernel traffic -- --nocapture`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;

use ctguard::live::LiveState;
use ctguard::model::names::Tag;
use ctguard::model::{parse_policy, Format, Policy};
use ctguard::render::iptables::{notrack_rules, IpFamily, CHAIN_OUT, CHAIN_PRE, RAW_TABLE as RAW};
use ctguard::render::{nft_ir, nft_script, planner};

use crate::harness::{
    host_conntrack_shared, netns_list, sa, tcp_connect, udp_queries, Answered, Ns, Pair, TcpResponder, UdpResponder,
    REPLY_TIMEOUT, SRV4, SRV6,
};

/// A host firewall that accepts everything but uses ct, so the namespace tracks (DESIGN §10: a
/// new namespace tracks nothing until some rule uses ct).
const HOST_TRACKING: &str = "table inet host {
	chain input {
		type filter hook input priority 0; policy accept;
		ct state established,related accept
	}
}
";

/// The usual stateful host firewall of the seeds: drop by default, DNS and SSH accepted as new.
const HOST_STATEFUL: &str = "table inet host {
	chain input {
		type filter hook input priority 0; policy drop;
		ct state established,related accept
		iif lo accept
		udp dport 53 ct state new accept
		tcp dport 22 ct state new accept
	}
	chain output {
		type filter hook output priority 0; policy accept;
	}
}
";

/// Most conntrack entries a policy-covered phase may add (stray ND/MLD and the like).
const HANDFUL: u64 = 10;

/// ctguard's nft script for `policy`, as `apply` would load it (preview tag).
fn ctguard_script(policy: &Policy) -> String {
    let t = nft_ir::table_for(policy, &Tag::preview());
    nft_script::replace_script(&t)
}

fn load_policy(ns: &Ns, policy: &Policy) {
    ns.nft(&ctguard_script(policy));
    let listed = ns.nft_list();
    assert!(listed.contains("table inet ctguard"), "ctguard's table is not loaded:\n{listed}");
}

/// One measured phase: flush srv's conntrack table, send `n` queries from `from` to `dst`,
/// report how many were answered and how many entries srv's table gained.
fn phase(what: &str, srv: &Ns, from: &Ns, dst: SocketAddr, n: usize, first_port: u16) -> (Answered, u64) {
    srv.conntrack_flush();
    let before = srv.conntrack_count();
    let a = udp_queries(from, dst, n, first_port);
    let after = srv.conntrack_count();
    let added = after.saturating_sub(before);
    eprintln!(
        "traffic: {what:<48} dst {dst:<18} sent {:>5}  answered {:>5}  conntrack +{added:<5} ({} ms{})",
        a.sent,
        a.answered,
        a.elapsed.as_millis(),
        if a.send_errors > 0 { format!(", {} send errors", a.send_errors) } else { String::new() }
    );
    (a, added)
}

/// A few queries until all are answered (at most 5 rounds), from source ports no phase uses:
/// the namespace's first tracked packets of a family set conntrack up for it, which on a
/// loaded machine once stalled the first 1000-query window past its reply timeout (490 of
/// 1000 lost in a control phase). The phases measure steady state, not that set-up.
fn warm_up(from: &Ns, dst: SocketAddr) {
    for round in 0..5u16 {
        if udp_queries(from, dst, 8, 64000 + round * 8).answered == 8 {
            return;
        }
    }
    panic!("{dst}: no round of 8 warm-up queries was answered in full");
}

/// At least 98 % of `n`: "the count rises by ~n".
fn most_of(n: usize) -> u64 {
    (n - n / 50) as u64
}

// ---------------------------------------------------------------------------------------------
// 1. NOTRACK works, v4 and v6

fn notrack_works(label: &str, srv_ip: std::net::IpAddr, n: usize) {
    let _host = host_conntrack_shared();
    let pair = Pair::new(label);
    pair.srv.nft(HOST_TRACKING);
    let _r53 = UdpResponder::start(&pair.srv, sa(srv_ip, 53));
    let _r5353 = UdpResponder::start(&pair.srv, sa(srv_ip, 5353));
    warm_up(&pair.cli, sa(srv_ip, 53));

    let (a, added) = phase("no policy, :53 (control)", &pair.srv, &pair.cli, sa(srv_ip, 53), n, 20000);
    assert_eq!((a.sent, a.answered), (n, n), "without a policy every query is answered");
    assert!(added >= most_of(n), "without a policy each query is tracked: +{added} for {n}");

    load_policy(&pair.srv, &Policy::builtin());

    let (a, added) = phase("built-in policy, :53", &pair.srv, &pair.cli, sa(srv_ip, 53), n, 20000);
    assert_eq!((a.sent, a.answered), (n, n), "NOTRACK must not lose queries");
    assert!(added <= HANDFUL, "NOTRACK'd queries were tracked: +{added} for {n}");

    let (a, added) =
        phase("built-in policy, :5353 (outside the policy)", &pair.srv, &pair.cli, sa(srv_ip, 5353), n, 30000);
    assert_eq!((a.sent, a.answered), (n, n));
    assert!(added >= most_of(n), "a port outside the policy must stay tracked: +{added} for {n}");
}

#[test]
fn notrack_works_v4() {
    notrack_works("nt4", SRV4.into(), 5000);
}

#[test]
fn notrack_works_v6() {
    notrack_works("nt6", SRV6.into(), 1000);
}

// ---------------------------------------------------------------------------------------------
// 2. Queries from the host to itself stay untracked (loopback is classified at output)

#[test]
fn local_queries_stay_untracked() {
    let _host = host_conntrack_shared();
    const N: usize = 1000;
    let pair = Pair::new("local");
    let srv = &pair.srv;
    srv.nft(HOST_TRACKING);
    let targets = [sa(SRV4, 53), sa([127, 0, 0, 1], 53), sa(std::net::Ipv6Addr::LOCALHOST, 53), sa(SRV6, 53)];
    let _responders: Vec<UdpResponder> = targets.iter().map(|&a| UdpResponder::start(srv, a)).collect();

    for (i, &dst) in targets.iter().enumerate() {
        let (a, added) = phase("local, no policy (control)", srv, srv, dst, N, 20000 + (i * N) as u16);
        assert_eq!(a.answered, N, "{dst}: without a policy every local query is answered");
        assert!(added >= most_of(N), "{dst}: without a policy local queries are tracked: +{added}");
    }
    load_policy(srv, &Policy::builtin());
    for (i, &dst) in targets.iter().enumerate() {
        let (a, added) = phase("local, built-in policy", srv, srv, dst, N, 20000 + (i * N) as u16);
        assert_eq!(a.answered, N, "{dst}: NOTRACK must not lose local queries");
        assert!(added <= HANDFUL, "{dst}: local queries were tracked: +{added} for {N}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. The seeds' trap: NOTRACK behind a stateful firewall blackholes DNS without the accept

/// The built-in flows (udp+tcp 53, local only) with `accept_untracked = false`.
const NOTRACK_ONLY: &str = r#"
[[notrack]]
protocols = ["udp", "tcp"]
ports = [53]
local_only = true
accept_untracked = false
"#;

/// srv's live state as the planner sees it.
/// srv's live state as ctguard reads it: nft JSON and every iptables dump, from inside srv.
fn live_state(srv: &Ns) -> LiveState {
    match srv.run(ctguard::backend::live::read) {
        Ok(live) => live,
        Err(e) => panic!("reading srv's live state: {e}"),
    }
}

/// Makes srv's stateful host firewall accept the untracked flows of `policy` the way ctguard
/// does: the insertion planner run on srv's live ruleset, its nft script loaded. Returns the
/// script.
fn insert_accept_untracked(srv: &Ns, policy: &Policy) -> String {
    let plan = planner::plan(policy, &live_state(srv), &Tag::preview());
    let script = plan.nft_script();
    assert!(!script.trim().is_empty(), "the planner inserts nothing: {plan:#?}");
    srv.nft(&script);
    script
}

#[test]
fn seeds_trap_needs_the_accept() {
    let _host = host_conntrack_shared();
    const N: usize = 300;
    let pair = Pair::new("trap");
    pair.srv.nft(HOST_STATEFUL);
    let _r53 = UdpResponder::start(&pair.srv, sa(SRV4, 53));
    let dst = sa(SRV4, 53);
    // TCP: the host firewall accepts 22 and not 53; ctguard must not change either (its
    // accept goes only where the host accepted the flow while tracked).
    let t53 = TcpResponder::start(&pair.srv, sa(SRV4, 53));
    let t22 = TcpResponder::start(&pair.srv, sa(SRV4, 22));
    let tcp_unchanged = |what: &str| {
        let c22 = tcp_connect(&pair.cli, sa(SRV4, 22), Duration::from_millis(300));
        let c53 = tcp_connect(&pair.cli, sa(SRV4, 53), Duration::from_millis(300));
        let word = |ok| if ok { "connects" } else { "blocked" };
        eprintln!("traffic: {what:<48} tcp :22 {}, tcp :53 {}", word(c22), word(c53));
        assert!(c22, "{what}: tcp/22, accepted by the host firewall, must connect");
        assert!(!c53, "{what}: tcp/53, closed by the host firewall, must stay closed");
    };

    let (a, _) = phase("stateful firewall, no policy", &pair.srv, &pair.cli, dst, N, 20000);
    assert_eq!(a.answered, N, "the stateful firewall answers DNS on its own");
    tcp_unchanged("stateful firewall, no policy");

    let policy = match parse_policy(NOTRACK_ONLY, Format::Toml) {
        Ok(p) => p,
        Err(e) => panic!("test policy: {e:?}"),
    };
    assert!(!policy.notrack[0].accept_untracked);
    load_policy(&pair.srv, &policy);
    let (a, _) = phase("stateful firewall + NOTRACK alone (the trap)", &pair.srv, &pair.cli, dst, N, 20000);
    assert_eq!(a.answered, 0, "NOTRACK alone behind `ct state new accept` must blackhole DNS");
    tcp_unchanged("stateful firewall + NOTRACK alone (the trap)");

    // The planner must see the blackhole the traffic just showed.
    let plan = planner::plan(&policy, &live_state(&pair.srv), &Tag::preview());
    let holes: Vec<String> = plan
        .decisions
        .iter()
        .filter(|d| d.blackholes())
        .map(|d| format!("{} {:?} {:?} v6={:?}", d.chain, d.proto, d.direction, d.v6))
        .collect();
    eprintln!(
        "traffic: planner, accept_untracked = false: blackholes in {holes:?}, {} insertions",
        plan.insertions.len()
    );
    assert!(!holes.is_empty(), "the planner does not report the blackhole: {plan:#?}");
    assert!(plan.insertions.is_empty(), "accept_untracked = false must insert nothing");

    let mut with_accept = policy.clone();
    with_accept.notrack[0].accept_untracked = true;
    let script = insert_accept_untracked(&pair.srv, &with_accept);
    eprintln!("traffic: planner inserted:\n{}", script.trim_end());
    let (a, added) = phase("stateful firewall + NOTRACK + planner's accept", &pair.srv, &pair.cli, dst, N, 20000);
    assert_eq!(a.answered, N, "with the untracked accept every query is answered again");
    assert!(added <= HANDFUL, "still untracked: +{added}");
    tcp_unchanged("stateful firewall + NOTRACK + planner's accept");
    let accepted = (
        t22.accepted_settled(3, Duration::from_secs(1), Duration::from_millis(200)),
        t53.accepted_settled(0, Duration::ZERO, Duration::from_millis(200)),
    );
    assert_eq!(accepted, (3, 0), "TCP connections accepted on :22 and :53");
    // Local queries (iif lo accept in the host firewall) keep working too.
    let _lo = UdpResponder::start(&pair.srv, sa([127, 0, 0, 1], 53));
    let (a, added) =
        phase("stateful firewall + NOTRACK + accept, local", &pair.srv, &pair.srv, sa([127, 0, 0, 1], 53), N, 40000);
    assert_eq!(a.answered, N);
    assert!(added <= HANDFUL, "still untracked: +{added}");
}

// ---------------------------------------------------------------------------------------------
// 4. The same through iptables (nft and legacy variants), beside rules that must survive

/// What the host already had: a tracking accept (so the namespace tracks), ssh, and a NOTRACK
/// of its own in raw for another port. Written the way `iptables-save` prints them.
const EXISTING_IPT: &str = "*raw
-A PREROUTING -p udp -m udp --dport 6000 -j CT --notrack
COMMIT
*filter
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
";

/// The `-A` lines of an `iptables-save` dump by (table, chain), each list in order (the dump
/// sorts user chains by name, so only the order within a chain means anything).
type SavedRules = BTreeMap<(String, String), Vec<String>>;

fn saved_rules(save: &str) -> SavedRules {
    let mut out = SavedRules::new();
    let mut table = String::new();
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(rest) = l.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default().to_string();
            out.entry((table.clone(), chain)).or_default().push(l.to_string());
        }
    }
    out
}

/// True when every chain of `sub` has its lines in `all`'s chain, in the same relative order.
fn contains_in_order(all: &SavedRules, sub: &SavedRules) -> bool {
    sub.iter().all(|(k, lines)| {
        let mut it = all.get(k).map(|v| v.iter()).into_iter().flatten();
        lines.iter().all(|l| it.any(|a| a == l))
    })
}

fn iptables_notrack_works(variant: &str) {
    let _host = host_conntrack_shared();
    const N4: usize = 5000;
    const N6: usize = 1000;
    let pair = Pair::new(&format!("ipt-{variant}"));
    let srv = &pair.srv;
    // Only the legacy tools take the global xtables lock; wait for it instead of failing.
    let wait: &[&str] = if variant == "legacy" { &["--wait=10"] } else { &[] };
    let tools = |fam: IpFamily| {
        (format!("{}-{variant}-restore", fam.tool_prefix()), format!("{}-{variant}-save", fam.tool_prefix()))
    };
    let mut before = Vec::new();
    for fam in IpFamily::ALL {
        let (restore, save) = tools(fam);
        srv.exec_stdin(&restore, wait, EXISTING_IPT);
        before.push(saved_rules(&srv.exec(&save, &[])));
    }
    let _r = [sa(SRV4, 53), sa(SRV4, 5353), sa(SRV6, 53), sa(SRV6, 5353)].map(|a| UdpResponder::start(srv, a));

    let label = format!("iptables-{variant}, no policy, :53 (control)");
    let (a, added) = phase(&label, srv, &pair.cli, sa(SRV4, 53), N4, 20000);
    assert_eq!(a.answered, N4);
    assert!(added >= most_of(N4), "the iptables host firewall must track: +{added}");

    let mut rendered = Vec::new();
    for fam in IpFamily::ALL {
        let (restore, _) = tools(fam);
        let rules = notrack_rules(&Policy::builtin(), fam, &Tag::preview());
        let mut args = vec!["--noflush"];
        args.extend_from_slice(wait);
        srv.exec_stdin(&restore, &args, &rules.restore_text_with_jumps());
        rendered.push(rules);
    }

    for (ip, n, port) in [(SRV4.into(), N4, 20000u16), (SRV6.into(), N6, 40000)] {
        let ip: std::net::IpAddr = ip;
        let label = format!("iptables-{variant}, built-in policy, :53");
        let (a, added) = phase(&label, srv, &pair.cli, sa(ip, 53), n, port);
        assert_eq!((a.sent, a.answered), (n, n), "NOTRACK through iptables-{variant} must not lose queries");
        assert!(added <= HANDFUL, "iptables-{variant}: NOTRACK'd queries were tracked: +{added} for {n}");
        let label = format!("iptables-{variant}, built-in policy, :5353 (control)");
        let (a, added) = phase(&label, srv, &pair.cli, sa(ip, 5353), n, port);
        assert_eq!((a.sent, a.answered), (n, n));
        assert!(added >= most_of(n), "iptables-{variant}: :5353 must stay tracked: +{added} for {n}");
    }

    for (i, fam) in IpFamily::ALL.into_iter().enumerate() {
        let (_, save) = tools(fam);
        let after_text = srv.exec(&save, &[]);
        let after = saved_rules(&after_text);
        assert!(
            contains_in_order(&after, &before[i]),
            "{fam:?}: rules that existed before ctguard did not survive in order:\nbefore: {:#?}\nafter:\n{after_text}",
            before[i]
        );
        let mut ours = SavedRules::new();
        for j in &rendered[i].jumps {
            ours.entry((j.table.to_string(), j.from.to_string()))
                .or_default()
                .push(format!("-A {} -j {}", j.from, j.to));
        }
        for r in &rendered[i].rules {
            ours.entry((RAW.to_string(), r.chain.clone())).or_default().push(r.append_line());
        }
        assert!(
            contains_in_order(&after, &ours),
            "{fam:?}: ctguard's rules do not read back as rendered:\n{ours:#?}\n{after_text}"
        );
        // The jumps come first in PREROUTING/OUTPUT, ctguard's chains hold exactly its rules.
        for j in &rendered[i].jumps {
            let first = after.get(&(j.table.to_string(), j.from.to_string())).and_then(|v| v.first());
            assert_eq!(first, Some(&format!("-A {} -j {}", j.from, j.to)), "{fam:?}: jump is not first");
        }
        for chain in [CHAIN_PRE, CHAIN_OUT] {
            let k = (RAW.to_string(), chain.to_string());
            assert_eq!(after.get(&k), ours.get(&k), "{fam:?}: {chain} holds other rules");
        }
        eprintln!(
            "traffic: iptables-{variant} {fam:?}: {} existing rules survived in order, {} ctguard rules + {} jumps read back as rendered",
            before[i].values().map(Vec::len).sum::<usize>(),
            rendered[i].rules.len(),
            rendered[i].jumps.len()
        );
    }
}

#[test]
fn iptables_nft_notrack_works() {
    iptables_notrack_works("nft");
}

#[test]
fn iptables_legacy_notrack_works() {
    iptables_notrack_works("legacy");
}

// ---------------------------------------------------------------------------------------------
// Harness self-test

/// A namespace created in a test that panics is gone afterwards, and so is the process in it.
#[test]
fn harness_removes_namespace_after_panic() {
    let name = Mutex::new(String::new());
    let child: Mutex<Option<std::process::Child>> = Mutex::new(None);
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let ns = Ns::new("panic");
        *name.lock().expect("lock") = ns.name().to_string();
        assert!(netns_list().iter().any(|l| l == ns.name()), "namespace was not created");
        let c = ns.run(|| std::process::Command::new("/bin/sleep").arg("600").spawn().expect("spawn sleep"));
        *child.lock().expect("lock") = Some(c);
        assert!(!ns.pids().is_empty(), "sleep is not in the namespace");
        panic!("deliberate panic inside a test holding {}", ns.name());
    }));
    assert!(r.is_err());
    let name = name.into_inner().expect("lock");
    assert!(name.starts_with("ctg-panic-"), "{name}");
    let left = netns_list();
    assert!(!left.contains(&name), "{name} survived the panic: {left:?}");
    let mut c = child.into_inner().expect("lock").expect("sleep was started");
    // Killed by Ns::drop, so this returns at once (and reaps it).
    let st = c.wait().expect("wait sleep");
    assert!(!st.success(), "sleep was not killed: {st}");
    eprintln!("traffic: harness self-test: {name} removed after a panic, its process ended ({st})");
}

/// Unanswered queries cost one reply timeout per window, not one per query.
#[test]
fn harness_unanswered_queries_are_fast() {
    const N: usize = 5000;
    let pair = Pair::new("silent");
    // Nothing listens on the discard port: every query goes unanswered.
    let a = udp_queries(&pair.cli, sa(SRV4, 9), N, 20000);
    eprintln!(
        "traffic: harness self-test: {N} unanswered queries: sent {} answered {} in {} ms",
        a.sent,
        a.answered,
        a.elapsed.as_millis()
    );
    assert_eq!((a.sent, a.answered), (N, 0));
    assert!(a.elapsed < REPLY_TIMEOUT * 12, "too slow: {:?}", a.elapsed);
}
