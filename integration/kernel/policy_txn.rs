//! Policy transactions against the real kernel (`cargo test --test kernel policy_txn`, as
//! root): prepare / apply / check_rollback / rollback of `ctguard::backend::policy_txn` in
//! namespaces the tests create. Each test has its own namespace(s); nothing touches the
//! initial one. Figures are printed with `eprintln!` (`-- --nocapture`).

use std::time::Instant;

use ctguard::backend::policy_txn::{
    after_listing, apply, check_rollback, listing, nft_rollback_already_checked, prepare, rollback, scope_listing,
    PolicyRequest, PolicyTxnError, PolicyUndo, Prepared,
};
use ctguard::exit::Exit;
use ctguard::model::auto::MachineFacts;
use ctguard::model::names::{SysctlKey, Tag};
use ctguard::model::{parse_policy, Format, Policy};

use crate::harness::{host_conntrack_shared, sa, udp_queries, Ns, Pair, UdpResponder, CLI4, SRV4, SRV6};

/// A stateful host firewall: drop by default, an explicit catch-all drop at the end (the
/// accept must land just before it), DNS and SSH accepted as new, loopback accepted.
pub(crate) const HOST_FW: &str = include_str!("../stateful-catchall.nft");

/// Most conntrack entries a notracked phase may add (stray ND/MLD and the like).
const HANDFUL: u64 = 10;

pub(crate) fn policy(toml: &str) -> Policy {
    match parse_policy(toml, Format::Toml) {
        Ok(p) => p,
        Err(e) => panic!("test policy does not parse: {e:?}\n{toml}"),
    }
}

pub(crate) const UDP53: &str = "backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n";

pub(crate) fn facts() -> MachineFacts {
    MachineFacts::with_ram(ctguard::sysctl::mem_total_bytes().unwrap_or(8 << 30))
}

pub(crate) fn request(p: &Policy, id: &str, previous: Option<PolicyUndo>) -> PolicyRequest {
    PolicyRequest {
        policy: p.clone(),
        tag: Tag::new(id).unwrap_or_else(|e| panic!("{e}")),
        force: false,
        ssh: None,
        previous,
    }
}

fn keys(p: &Policy) -> Vec<SysctlKey> {
    p.sysctl.keys().cloned().collect()
}

pub(crate) fn list(ns: &Ns, keys: &[SysctlKey]) -> String {
    ns.run(|| listing(keys)).unwrap_or_else(|e| panic!("listing: {e}"))
}

/// Prepares `req`; also proves the journal's `before`, taken from the snapshot, equal to a
/// fresh [`scope_listing`] of the target.
pub(crate) fn prep(ns: &Ns, req: &PolicyRequest) -> Prepared {
    let t = Instant::now();
    let p = ns.run(|| prepare(req, facts())).unwrap_or_else(|e| panic!("prepare {}: {}", req.tag, chain(&e)));
    eprintln!("policy_txn: prepare {} took {} ms", req.tag, t.elapsed().as_millis());
    let read = ns.run(|| scope_listing(&p.undo_record(), p.scope_keys())).unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(p.before, read, "the before listing from the snapshot differs from a fresh read");
    p
}

/// Applies `p`; also proves the journal's `after`, known from the commit, equal to a fresh
/// [`scope_listing`] (issue 16: no second read of the chains after apply).
pub(crate) fn app(ns: &Ns, p: &Prepared) -> PolicyUndo {
    let t = Instant::now();
    let u = ns.run(|| apply(p)).unwrap_or_else(|e| panic!("apply {}: {}", p.request.tag, chain(&e)));
    eprintln!("policy_txn: apply {} took {} ms", p.request.tag, t.elapsed().as_millis());
    let known = ns.run(|| after_listing(p, &u)).unwrap_or_else(|e| panic!("after_listing: {}", chain(&e)));
    let read = ns.run(|| scope_listing(&u, p.scope_keys())).unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(known, read, "the after listing known from the commit differs from a fresh read");
    u
}

/// Prepares and applies `p` tagged `id` on the calling thread — call it inside [`Ns::run`], and
/// check or roll back on that same thread, as the agent's worker does (what the commit proved is
/// kept per thread).
fn apply_here(p: &Policy, id: &str, previous: Option<PolicyUndo>) -> PolicyUndo {
    let prepared =
        prepare(&request(p, id, previous), facts()).unwrap_or_else(|e| panic!("prepare {id}: {}", chain(&e)));
    apply(&prepared).unwrap_or_else(|e| panic!("apply {id}: {}", chain(&e)))
}

/// Checks and runs the rollback of `u` on the calling thread (inside [`Ns::run`], the thread
/// that applied it: what the apply proved is kept per thread).
fn back_here(u: &PolicyUndo) {
    check_rollback(u).unwrap_or_else(|e| panic!("check_rollback {}: {}", u.tag, chain(&e)));
    rollback(u).unwrap_or_else(|e| panic!("rollback {}: {}", u.tag, chain(&e)));
}

pub(crate) fn back(ns: &Ns, u: &PolicyUndo) {
    ns.run(|| check_rollback(u)).unwrap_or_else(|e| panic!("check_rollback {}: {}", u.tag, chain(&e)));
    let t = Instant::now();
    ns.run(|| rollback(u)).unwrap_or_else(|e| panic!("rollback {}: {}", u.tag, chain(&e)));
    eprintln!("policy_txn: rollback {} took {} ms", u.tag, t.elapsed().as_millis());
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(" <- ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The line-level difference of two listings, for assertion messages.
pub(crate) fn diff(a: &str, b: &str) -> String {
    let la: Vec<&str> = a.lines().collect();
    let lb: Vec<&str> = b.lines().collect();
    let mut out = String::new();
    for l in &la {
        if !lb.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &lb {
        if !la.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    out
}

pub(crate) fn assert_same(before: &str, after: &str, what: &str) {
    assert!(before == after, "{what}: listings differ\n{}\n--- full after:\n{after}", diff(before, after));
}

/// `nft -a list chain` lines of a chain, trimmed.
fn chain_lines(ns: &Ns, family: &str, table: &str, chain: &str) -> Vec<String> {
    ns.exec("nft", &["-a", "list", "chain", family, table, chain]).lines().map(|l| l.trim().to_string()).collect()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn apply_then_rollback_behind_a_stateful_host_firewall() {
    let _host = host_conntrack_shared();
    let pair = Pair::new("ptx-basic");
    pair.srv.nft(HOST_FW);
    let _r53 = UdpResponder::start(&pair.srv, sa(SRV4, 53));
    let _r53v6 = UdpResponder::start(&pair.srv, sa(SRV6, 53));
    let p = Policy::builtin();
    let before = list(&pair.srv, &keys(&p));

    // Control: answered and tracked.
    pair.srv.conntrack_flush();
    let c0 = pair.srv.conntrack_count();
    let a = udp_queries(&pair.cli, sa(SRV4, 53), 300, 20000);
    let tracked = pair.srv.conntrack_count().saturating_sub(c0);
    eprintln!("policy_txn: before apply: answered {}/300, conntrack +{tracked}", a.answered);
    assert_eq!(a.answered, 300);
    assert!(tracked >= 290, "control: +{tracked}");

    let req = request(&p, "ptx-basic-1", None);
    let prepared = prep(&pair.srv, &req);
    assert_same(&before, &list(&pair.srv, &keys(&p)), "prepare changes nothing");
    // The journal's before: ctguard's scope only (none of its objects yet), no full listing.
    assert!(!prepared.before.contains("table inet host"), "{}", prepared.before);
    assert!(prepared.before.contains("### sysctl"), "{}", prepared.before);
    assert!(
        prepared.warnings.iter().any(|w| w.contains("nf_conntrack_max skipped")),
        "host-only auto sysctls are skipped in a namespace: {:?}",
        prepared.warnings
    );
    let undo = app(&pair.srv, &prepared);
    assert!(undo.genid_after.is_some());
    assert_eq!(undo.nft_insertions.len(), 1, "{undo:#?}");
    assert!(undo.nft_insertions[0].handle.is_some(), "handle read back: {undo:#?}");

    let after = list(&pair.srv, &keys(&p));
    assert!(after.contains("table inet ctguard {"), "{after}");
    let lines = chain_lines(&pair.srv, "inet", "host", "input");
    let ours = lines.iter().position(|l| l.contains("comment \"ctguard:ptx-basic-1\"")).expect("accept rule inserted");
    let drop = lines.iter().position(|l| l.starts_with("counter packets")).expect("drop rule");
    assert_eq!(ours + 1, drop, "the accept sits just before the dropping rule:\n{}", lines.join("\n"));
    assert!(lines[ours].starts_with("udp dport 53 ct state untracked accept"), "{}", lines[ours]);

    // Traffic: answered, not tracked.
    pair.srv.conntrack_flush();
    let c0 = pair.srv.conntrack_count();
    let a = udp_queries(&pair.cli, sa(SRV4, 53), 300, 21000);
    let a6 = udp_queries(&pair.cli, sa(SRV6, 53), 300, 22000);
    let added = pair.srv.conntrack_count().saturating_sub(c0);
    eprintln!("policy_txn: after apply: answered v4 {}/300 v6 {}/300, conntrack +{added}", a.answered, a6.answered);
    assert_eq!((a.answered, a6.answered), (300, 300));
    assert!(added <= HANDFUL, "notracked queries were tracked: +{added}");

    back(&pair.srv, &undo);
    assert_same(&before, &list(&pair.srv, &keys(&p)), "rollback restores the state exactly");
    // Tracked again.
    pair.srv.conntrack_flush();
    let a = udp_queries(&pair.cli, sa(SRV4, 53), 100, 23000);
    assert_eq!(a.answered, 100);
    assert!(pair.srv.conntrack_count() >= 95);
}

#[test]
fn rules_others_add_during_the_window_survive_rollback() {
    let ns = Ns::new("ptx-others");
    ns.nft(HOST_FW);
    let p = policy(UDP53);
    let before = list(&ns, &[]);
    let undo = app(&ns, &prep(&ns, &request(&p, "ptx-others-1", None)));
    // Others: a native nft rule in the host table, an iptables-nft rule, a legacy one.
    ns.exec("nft", &["insert", "rule", "inet", "host", "input", "tcp", "dport", "2222", "accept"]);
    ns.exec("iptables-nft", &["-w", "-A", "INPUT", "-p", "tcp", "--dport", "2223", "-j", "ACCEPT"]);
    ns.exec("iptables-legacy", &["-w", "-A", "INPUT", "-p", "tcp", "--dport", "2224", "-j", "ACCEPT"]);
    let with_others = list(&ns, &[]);
    back(&ns, &undo);
    let after = list(&ns, &[]);
    assert!(!after.contains("ctguard"), "ctguard's objects are gone:\n{after}");
    for needle in ["tcp dport 2222 accept", "--dport 2223 -j ACCEPT", "--dport 2224 -j ACCEPT"] {
        assert!(after.contains(needle), "{needle} survives rollback:\n{after}");
    }
    // Exactly: the state before plus the others' changes.
    let expected: Vec<&str> = with_others.lines().filter(|l| !l.contains("ctguard")).collect();
    let got: Vec<&str> = after.lines().collect();
    assert_eq!(
        got.iter().filter(|l| !expected.contains(l)).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "nothing but ctguard's objects went:\n{}",
        diff(&with_others, &after)
    );
    assert!(before.lines().count() < after.lines().count());
}

/// A legacy iptables host firewall next to the nft one, so a re-apply moves rules of both.
pub(crate) const LEGACY_FW: &str = "*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p udp -m udp --dport 5353 -m conntrack --ctstate NEW -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
";

#[test]
fn reapply_replaces_the_committed_policy_and_its_rollback_restores_it() {
    let ns = Ns::new("ptx-reapply");
    ns.nft(HOST_FW);
    ns.nft("add rule inet host input udp dport 5353 ct state new accept\n");
    ns.exec_stdin("iptables-legacy-restore", &["-w"], LEGACY_FW);
    let a = policy(UDP53);
    let b = policy("backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53, 5353]\nsources = [\"198.18.0.0/24\", \"fd42::/64\"]\n");
    let before = list(&ns, &[]);
    let undo_a = app(&ns, &prep(&ns, &request(&a, "ptx-a", None)));
    assert!(!undo_a.ipt_insertions.is_empty(), "legacy INPUT gets an insertion too: {undo_a:#?}");
    let after_a = list(&ns, &[]);
    assert!(after_a.contains("ctguard:ptx-a"));

    let prepared_b = prep(&ns, &request(&b, "ptx-b", Some(undo_a.clone())));
    assert_eq!(
        prepared_b.plan.insertions.iter().filter(|i| i.chain.contains("inet host")).count(),
        2,
        "B is planned as if A's rules were not there (v4 and v6 sources apart): {:#?}",
        prepared_b.plan.insertions
    );
    let undo_b = app(&ns, &prepared_b);
    assert!(!undo_b.removed_previous.is_empty());
    let after_b = list(&ns, &[]);
    assert!(!after_b.contains("ctguard:ptx-a"), "A's rules are replaced:\n{after_b}");
    assert!(after_b.contains("ctguard:ptx-b"), "{after_b}");
    assert!(after_b.contains("198.18.0.0/24"), "{after_b}");
    assert_eq!(after_b.matches("table inet ctguard {").count(), 1);

    back(&ns, &undo_b);
    assert_same(&after_a, &list(&ns, &[]), "rolling back B restores A exactly");
    back(&ns, &undo_a);
    assert_same(&before, &list(&ns, &[]), "and rolling back A the state before");
}

fn iptables_backend(variant: &str) {
    let ns = Ns::new(&format!("ptx-ipt-{variant}"));
    let restore = format!("iptables-{variant}-restore");
    let restore6 = format!("ip6tables-{variant}-restore");
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -p tcp -m tcp --dport 9999 -j CT --notrack\nCOMMIT\n";
    ns.exec_stdin(&restore, &["-w"], &format!("{LEGACY_FW}{raw}"));
    // IPv6: a filter table and (legacy only) a raw table, so both exist before; iptables-nft's
    // missing ip6 raw table is created by apply and removed again by rollback.
    let fw6 = LEGACY_FW.replace("-i lo -j ACCEPT", "-i lo -j ACCEPT\n-A INPUT -p ipv6-icmp -j ACCEPT");
    let doc6 = if variant == "legacy" { format!("{fw6}{raw}") } else { fw6 };
    ns.exec_stdin(&restore6, &["-w"], &doc6);
    let p = policy(&format!(
        "backend = \"iptables-{variant}\"\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n"
    ));
    let before = list(&ns, &[]);
    let prepared = prep(&ns, &request(&p, &format!("ptx-{variant}"), None));
    assert_same(&before, &list(&ns, &[]), "prepare changes nothing");
    let undo = app(&ns, &prepared);
    let after = list(&ns, &[]);
    let save = ns.exec(&format!("iptables-{variant}-save"), &[]);
    let save6 = ns.exec(&format!("ip6tables-{variant}-save"), &[]);
    for (s, had_raw) in [(&save, true), (&save6, variant == "legacy")] {
        assert!(s.contains("-A PREROUTING -j CTGUARD-PRE"), "{s}");
        assert!(s.contains("-A OUTPUT -j CTGUARD-OUT"), "{s}");
        assert!(!had_raw || s.contains("--dport 9999 -j CT --notrack"), "existing raw rules stay: {s}");
        assert!(
            s.contains(&format!("--ctstate UNTRACKED -m comment --comment \"ctguard:ptx-{variant}\" -j ACCEPT")),
            "{s}"
        );
    }
    assert!(!after.contains("table inet ctguard"), "no nft table with an iptables backend");
    back(&ns, &undo);
    assert_same(&before, &list(&ns, &[]), &format!("iptables-{variant}: rollback restores every save exactly"));
    // Re-apply over nothing, then a second rollback: idempotent.
    back(&ns, &undo);
    assert_same(&before, &list(&ns, &[]), "a second rollback changes nothing");
}

#[test]
fn iptables_nft_backend_applies_and_rolls_back_exactly() {
    iptables_backend("nft");
}

#[test]
fn iptables_legacy_backend_applies_and_rolls_back_exactly() {
    iptables_backend("legacy");
}

#[test]
fn stale_generation_is_refused_with_nothing_applied() {
    let ns = Ns::new("ptx-stale");
    ns.nft(HOST_FW);
    let p = policy(UDP53);
    let prepared = prep(&ns, &request(&p, "ptx-stale-1", None));
    ns.exec("nft", &["add", "table", "ip", "someone-else"]);
    let before = list(&ns, &[]);
    let err = ns.run(|| apply(&prepared)).err().unwrap_or_else(|| panic!("a stale apply must be refused"));
    eprintln!("policy_txn: stale apply: {}", chain(&err));
    assert_eq!(err.exit(), Exit::Refused, "{err}");
    assert_same(&before, &list(&ns, &[]), "nothing applied");

    // iptables-legacy changes do not move the generation id: the save comparison catches them.
    let ns = Ns::new("ptx-stale-legacy");
    ns.exec_stdin("iptables-legacy-restore", &["-w"], LEGACY_FW);
    let prepared = prep(&ns, &request(&p, "ptx-stale-2", None));
    assert!(!prepared.ipt_filter.is_empty());
    ns.exec("iptables-legacy", &["-w", "-I", "INPUT", "1", "-s", "192.0.2.9", "-j", "DROP"]);
    let before = list(&ns, &[]);
    let err = ns.run(|| apply(&prepared)).err().unwrap_or_else(|| panic!("a stale apply must be refused"));
    assert!(matches!(err, PolicyTxnError::Stale(_)), "{err}");
    assert_eq!(err.exit(), Exit::Refused);
    assert_same(&before, &list(&ns, &[]), "nothing applied");
}

#[test]
fn lint_error_refuses_unless_forced() {
    let ns = Ns::new("ptx-lint");
    ns.nft(HOST_FW);
    let p = policy("backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\naccept_untracked = false\n");
    let before = list(&ns, &[]);
    let mut req = request(&p, "ptx-lint-1", None);
    let err = ns.run(|| prepare(&req, facts())).err().unwrap_or_else(|| panic!("a blackhole must be refused"));
    assert!(matches!(err, PolicyTxnError::Lint(_)), "{err}");
    assert_eq!(err.exit(), Exit::Refused);
    assert!(err.to_string().contains("blackhole"), "{err}");
    assert_same(&before, &list(&ns, &[]), "nothing changed");
    req.force = true;
    let prepared = prep(&ns, &req);
    assert!(prepared.warnings.iter().any(|w| w.contains("blackhole")), "{:?}", prepared.warnings);
    let undo = app(&ns, &prepared);
    assert!(list(&ns, &[]).contains("table inet ctguard"));
    assert!(undo.nft_insertions.is_empty(), "accept_untracked = false inserts nothing");
    back(&ns, &undo);
    assert_same(&before, &list(&ns, &[]), "rollback");
}

#[test]
fn sysctls_host_only_refused_per_namespace_written_and_restored() {
    let ns = Ns::new("ptx-sysctl");
    ns.nft(HOST_FW);
    let _ = ns.conntrack_count(); // nf_conntrack loaded, so its sysctls exist
    let host_only = policy("backend = \"nft\"\n[sysctl]\n\"net.netfilter.nf_conntrack_max\" = 1000000\n");
    let before = list(&ns, &keys(&host_only));
    let err = ns
        .run(|| prepare(&request(&host_only, "ptx-sys-1", None), facts()))
        .err()
        .unwrap_or_else(|| panic!("an explicit host-only sysctl must be refused in a namespace"));
    assert_eq!(err.exit(), Exit::BadInput, "{err}");
    assert!(err.to_string().contains("net.netfilter.nf_conntrack_max"), "names the key: {err}");
    assert_same(&before, &list(&ns, &keys(&host_only)), "nothing changed");

    let key = "net.netfilter.nf_conntrack_udp_timeout";
    let p = policy(&format!(
        "backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n[sysctl]\n\"{key}\" = 17\n"
    ));
    let k = keys(&p);
    let before = list(&ns, &k);
    let old = ns.run(|| std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))).expect("readable");
    assert_ne!(old.trim(), "17");
    let undo = app(&ns, &prep(&ns, &request(&p, "ptx-sys-2", None)));
    assert_eq!(undo.sysctls.len(), 1, "{undo:#?}");
    let now = ns.run(|| std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))).expect("readable");
    assert_eq!(now.trim(), "17");
    back(&ns, &undo);
    assert_same(&before, &list(&ns, &k), "sysctl restored");
}

#[test]
fn rollback_is_idempotent_and_survives_objects_already_gone() {
    let ns = Ns::new("ptx-idem");
    ns.nft(HOST_FW);
    let p = policy(UDP53);
    let before = list(&ns, &[]);
    let undo = app(&ns, &prep(&ns, &request(&p, "ptx-idem-1", None)));
    back(&ns, &undo);
    let once = list(&ns, &[]);
    assert_same(&before, &once, "once");
    back(&ns, &undo);
    assert_same(&once, &list(&ns, &[]), "twice = once");

    // Someone deleted ctguard's table (and then the host's whole table) meanwhile.
    let undo = app(&ns, &prep(&ns, &request(&p, "ptx-idem-2", None)));
    ns.exec("nft", &["delete", "table", "inet", "ctguard"]);
    back(&ns, &undo);
    assert_same(&before, &list(&ns, &[]), "a table already gone counts as rolled back");
    let undo = app(&ns, &prep(&ns, &request(&p, "ptx-idem-3", None)));
    ns.exec("nft", &["delete", "table", "inet", "host"]);
    back(&ns, &undo);
    let after = list(&ns, &[]);
    assert!(!after.contains("ctguard"), "{after}");
}

/// The batch (what apply sends) and the `nft -f` script (what `nft -c` checked) give the same
/// ruleset, for accept rules of every shape and tables of every family.
#[test]
fn batch_and_checked_script_give_the_same_ruleset() {
    let hosts = [
        ("inet", HOST_FW.to_string()),
        (
            "ip",
            "table ip h4 {\n\tchain in4 {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tct state established accept\n\t\tudp dport { 53, 1000-2000 } ct state new accept\n\t\ttcp dport 53 ct state new accept\n\t}\n}\n".to_string(),
        ),
        (
            "ip6",
            "table ip6 h6 {\n\tchain in6 {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tct state established accept\n\t\tudp dport 53 ct state new accept\n\t\tudp dport 1000-2000 ct state new accept\n\t\treject\n\t}\n}\n".to_string(),
        ),
    ];
    let hosts = {
        let mut h = hosts.to_vec();
        // Restrictions the accept must carry beyond the entry's fields (issue 12): a negated
        // interface, a destination address, a negated IPv6 destination.
        h.push((
            "inet",
            "table inet h5 {\n\tchain in5 {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tct state established accept\n\t\tiifname != \"eth9\" ip daddr 192.0.2.53 udp dport 53 ct state new accept\n\t\tip6 daddr != fd00::1 udp dport { 53, 1000-2000 } ct state new accept\n\t}\n}\n".to_string(),
        ));
        // Named sets of the table, repeated by reference (one negated).
        h.push((
            "inet",
            "table inet h6 {\n\tset trusted {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 198.18.0.0/24, 192.0.2.1 }\n\t}\n\n\tset blocked6 {\n\t\ttype ipv6_addr\n\t\telements = { fd00::66 }\n\t}\n\n\tchain in6 {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tct state established accept\n\t\tip saddr @trusted udp dport 53 ct state new accept\n\t\tip6 saddr != @blocked6 udp dport 53 ct state new accept\n\t}\n}\n".to_string(),
        ));
        h
    };
    let policies = [
        UDP53.to_string(),
        "backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53, \"1000-2000\"]\nsources = [\"198.18.0.0/24\", \"192.0.2.1\", \"fd42::/64\", \"2001:db8::/33\"]\ninterfaces = [\"veth0\", \"eth1\"]\n".to_string(),
        "backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [\"1000-2000\"]\nsources = [\"10.0.0.0/9\"]\ninterfaces = [\"veth0\"]\n".to_string(),
        "backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nsources = [\"fd42::1\"]\n".to_string(),
    ];
    let mut checked = 0;
    for (fam, fw) in &hosts {
        for (i, text) in policies.iter().enumerate() {
            let p = policy(text);
            let via_batch = Ns::new("ptx-eq-batch");
            let via_script = Ns::new("ptx-eq-script");
            // Interface names are matched by name: they need not exist.
            for ns in [&via_batch, &via_script] {
                ns.nft(fw);
            }
            let req = request(&p, "ptx-eq", None);
            let prepared = prep(&via_batch, &req);
            let n = prepared.plan.insertions.len();
            app(&via_batch, &prepared);
            via_script.nft(&prepared.nft_script);
            let (a, b) = (via_batch.nft_list(), via_script.nft_list());
            assert!(
                a == b,
                "{fam} host, policy {i}: batch and script differ\n{}\n--- script:\n{}",
                diff(&b, &a),
                prepared.nft_script
            );
            eprintln!("policy_txn: {fam} host, policy {i}: {n} insertion(s), batch == script");
            checked += n;
        }
    }
    assert!(checked >= 8, "enough accept rules compared: {checked}");
}

#[test]
fn flush_existing_deletes_only_the_policys_entries() {
    let _host = host_conntrack_shared();
    let pair = Pair::new("ptx-flush");
    pair.srv.nft(HOST_FW);
    pair.srv.nft("insert rule inet host input udp dport 5353 ct state new accept\n");
    let _r53 = UdpResponder::start(&pair.srv, sa(SRV4, 53));
    let _r5353 = UdpResponder::start(&pair.srv, sa(SRV4, 5353));
    // The server is also a resolver: its own queries to an upstream (the client's :53).
    let _upstream = UdpResponder::start(&pair.cli, sa(CLI4, 53));
    pair.srv.conntrack_flush();
    let a = udp_queries(&pair.cli, sa(SRV4, 53), 100, 24000);
    let b = udp_queries(&pair.cli, sa(SRV4, 5353), 100, 25000);
    let c = udp_queries(&pair.srv, sa(CLI4, 53), 20, 26000);
    assert_eq!((a.answered, b.answered, c.answered), (100, 100, 20));
    let tracked = pair.srv.conntrack_count();
    assert!(tracked >= 215, "{tracked}");
    let p = policy("backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nflush_existing = true\n");
    let prepared = prep(&pair.srv, &request(&p, "ptx-flush-1", None));
    assert!(
        prepared.flush.iter().all(|c| c.iter().any(|a| a == "-d")),
        "every conntrack -D names one of this host's addresses as the original destination: {:?}",
        prepared.flush
    );
    let undo = app(&pair.srv, &prepared);
    assert!(undo.warnings.is_empty(), "{:?}", undo.warnings);
    let left = pair.srv.conntrack_count();
    let served = pair.srv.exec("conntrack", &["-L", "-p", "udp", "--orig-port-dst", "53", "-d", &SRV4.to_string()]);
    let queried = pair.srv.exec("conntrack", &["-L", "-p", "udp", "--orig-port-dst", "53", "-d", &CLI4.to_string()]);
    eprintln!("policy_txn: flush_existing: {tracked} entries before, {left} after");
    assert_eq!(served.lines().filter(|l| l.starts_with("udp")).count(), 0, "{served}");
    // Regression (issue 15): the resolver's own upstream queries were deleted (20 of 20).
    assert_eq!(queried.lines().filter(|l| l.starts_with("udp")).count(), 20, "the host's own queries stay: {queried}");
    assert!((115..=125).contains(&left), "the :5353 entries and the upstream queries stay: {left}");
    back(&pair.srv, &undo);
}

#[test]
fn a_failing_step_undoes_every_earlier_step() {
    let ns = Ns::new("ptx-fail");
    ns.nft(HOST_FW);
    ns.exec_stdin("iptables-legacy-restore", &["-w"], LEGACY_FW);
    let key = "net.netfilter.nf_conntrack_udp_timeout";
    let _ = ns.conntrack_count();
    let p = policy(&format!(
        "backend = \"nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n[sysctl]\n\"{key}\" = 19\n"
    ));
    let k = keys(&p);
    let before = list(&ns, &k);
    let mut prepared = prep(&ns, &request(&p, "ptx-fail-1", None));
    assert!(!prepared.ipt_filter.is_empty() && !prepared.nft_script.is_empty());
    // A raw document the kernel refuses: the filter insertions and the nft batch went in
    // before it, and must come out again.
    prepared.ipt_raw.push(ctguard::backend::policy_txn::IptDoc {
        variant: ctguard::backend::policy_txn::Variant::Nft,
        v6: true,
        text: "*filter\n-A NO-SUCH-CHAIN -j ACCEPT\nCOMMIT\n".into(),
    });
    let err = ns.run(|| apply(&prepared)).err().unwrap_or_else(|| panic!("the bad step must fail"));
    eprintln!("policy_txn: failing step: {}", chain(&err));
    assert!(matches!(err, PolicyTxnError::ApplyFailed { .. }), "{err}");
    assert_eq!(err.exit(), Exit::Refused);
    assert_same(&before, &list(&ns, &k), "everything applied before the failing step is undone");
}

/// On an iptables backend (nothing for nft to do), apply runs each family's filter and raw
/// documents in one restore, filter first. A raw section the kernel refuses comes after the
/// filter section committed: the accepts it inserted come out again, on both variants.
fn a_refused_raw_section_after_its_filter_section_is_undone(variant: &str) {
    let ns = Ns::new(&format!("ptx-merge-{variant}"));
    // A raw table of the host's own: an x_tables table, once created, cannot be removed.
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    ns.exec_stdin(&format!("iptables-{variant}-restore"), &["-w"], &format!("{LEGACY_FW}{raw}"));
    let p = policy(&format!("backend = \"iptables-{variant}\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"));
    let before = list(&ns, &[]);
    let mut prepared = prep(&ns, &request(&p, &format!("ptx-merge-{variant}"), None));
    assert!(prepared.ipt_filter.iter().any(|d| !d.v6), "an IPv4 filter insertion to undo");
    use ctguard::backend::policy_txn::Variant;
    let v = if variant == "nft" { Variant::Nft } else { Variant::Legacy };
    prepared.ipt_raw.push(ctguard::backend::policy_txn::IptDoc {
        variant: v,
        v6: false,
        text: "*raw\n-A NO-SUCH-CHAIN -j ACCEPT\nCOMMIT\n".into(),
    });
    let err = ns.run(|| apply(&prepared)).err().unwrap_or_else(|| panic!("the bad raw section must fail"));
    let text = chain(&err);
    eprintln!("policy_txn: merged restore: {text}");
    assert!(text.contains("filter insertions, then raw chains"), "one restore per family: {text}");
    assert_eq!(err.exit(), Exit::Refused);
    assert_same(&before, &list(&ns, &[]), "the filter section's accepts are undone");
}

#[test]
fn a_refused_raw_section_after_its_filter_section_is_undone_iptables_nft() {
    a_refused_raw_section_after_its_filter_section_is_undone("nft");
}

#[test]
fn a_refused_raw_section_after_its_filter_section_is_undone_iptables_legacy() {
    a_refused_raw_section_after_its_filter_section_is_undone("legacy");
}

#[test]
fn nft_backend_beside_an_iptables_nft_filter_table() {
    let ns = Ns::new("ptx-iptnft");
    ns.exec_stdin("iptables-nft-restore", &["-w"], LEGACY_FW);
    let p = policy(UDP53);
    let before = list(&ns, &[]);
    let prepared = prep(&ns, &request(&p, "ptx-iptnft-1", None));
    assert!(
        prepared.ipt_filter.iter().any(|d| d.variant == ctguard::backend::policy_txn::Variant::Nft),
        "the iptables-nft INPUT chain gets its accept through iptables-nft-restore"
    );
    assert!(!prepared.nft_script.contains(" ip filter "), "no native nft rule into the iptables-nft table");
    let undo = app(&ns, &prepared);
    assert!(
        !undo.warnings.iter().any(|w| w.contains("generation moved")),
        "one generation per iptables-nft table commit: {:?}",
        undo.warnings
    );
    eprintln!("policy_txn: genid {} -> {:?}", undo.genid_before, undo.genid_after);
    let save = ns.exec("iptables-nft-save", &[]);
    assert!(save.contains("ctguard:ptx-iptnft-1"), "{save}");
    assert!(list(&ns, &[]).contains("table inet ctguard {"));
    back(&ns, &undo);
    assert_same(&before, &list(&ns, &[]), "rollback");
}

#[test]
fn reapply_across_backends_restores_each_committed_state() {
    let ns = Ns::new("ptx-switch");
    ns.nft(HOST_FW);
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -p tcp -m tcp --dport 9999 -j CT --notrack\nCOMMIT\n";
    ns.exec_stdin("iptables-legacy-restore", &["-w"], &format!("{LEGACY_FW}{raw}"));
    ns.exec_stdin("ip6tables-legacy-restore", &["-w"], raw);
    let nft_a = policy(UDP53);
    let legacy = |ports: &str| {
        policy(&format!(
            "backend = \"iptables-legacy\"\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [{ports}]\n"
        ))
    };
    let before = list(&ns, &[]);
    let undo_a = app(&ns, &prep(&ns, &request(&nft_a, "ptx-sw-a", None)));
    let after_a = list(&ns, &[]);

    // nft -> iptables-legacy: the table goes, the raw chains come.
    let undo_b = app(&ns, &prep(&ns, &request(&legacy("53"), "ptx-sw-b", Some(undo_a.clone()))));
    let after_b = list(&ns, &[]);
    assert!(!after_b.contains("table inet ctguard"), "{after_b}");
    assert!(!after_b.contains("ctguard:ptx-sw-a"), "{after_b}");
    assert!(after_b.contains("-A CTGUARD-PRE"), "{after_b}");
    back(&ns, &undo_b);
    assert_same(&after_a, &list(&ns, &[]), "rolling back the switch restores the nft policy");

    // iptables-legacy over iptables-legacy: the raw chains are rewritten in place.
    let undo_c = app(&ns, &prep(&ns, &request(&legacy("53"), "ptx-sw-c", Some(undo_a.clone()))));
    let after_c = list(&ns, &[]);
    let undo_d = app(&ns, &prep(&ns, &request(&legacy("53, 853"), "ptx-sw-d", Some(undo_c.clone()))));
    let after_d = list(&ns, &[]);
    assert!(after_d.contains("--dports 53,853"), "{after_d}");
    assert!(!after_d.contains("ctguard:ptx-sw-c"), "{after_d}");
    assert_eq!(after_d.matches("-A PREROUTING -j CTGUARD-PRE").count(), 2, "one jump per family:\n{after_d}");
    back(&ns, &undo_d);
    assert_same(&after_c, &list(&ns, &[]), "rolling back D restores C");
    back(&ns, &undo_c);
    assert_same(&after_a, &list(&ns, &[]), "rolling back C restores A");
    back(&ns, &undo_a);
    assert_same(&before, &list(&ns, &[]), "rolling back A restores the start");
}

/// (handle, comment) of every rule line of `nft -a list chain`, in chain order.
fn listed_handles(ns: &Ns, family: &str, table: &str, chain: &str) -> Vec<(u64, Option<String>)> {
    chain_lines(ns, family, table, chain)
        .iter()
        .filter_map(|l| {
            let h = l.rsplit_once("# handle ").and_then(|(_, h)| h.trim().parse().ok())?;
            if l.starts_with("chain ") || l.starts_with("type ") {
                return None;
            }
            let comment = l.split_once("comment \"").and_then(|(_, r)| r.split_once('"')).map(|(c, _)| c.to_string());
            Some((h, comment))
        })
        .collect()
}

#[test]
fn echoed_handles_and_chain_dumps_match_the_nft_listing() {
    use ctguard::backend::netlink::{dump_chain_rules, get_rule, send_batch_echoed};
    use ctguard::render::nft_batch::{BatchBuilder, RulePosition};
    use ctguard::render::nft_expr::Expr;

    let ns = Ns::new("ptx-echo");
    ns.nft(HOST_FW);
    let p = policy(UDP53);
    let before = list(&ns, &keys(&p));

    // A raw batch: two echoed inserts (one before the catch-all drop, one appended) and one
    // that is not echoed.
    let drop = listed_handles(&ns, "inet", "host", "input").last().map(|x| x.0).expect("the drop rule");
    let mut b = BatchBuilder::new(None);
    b.echo_inserts(true);
    b.insert_rule("inet", "host", "input", RulePosition::Before(drop), &[Expr::Notrack], "echo:a", "a".into())
        .expect("encodes");
    b.insert_rule("inet", "host", "input", RulePosition::Append, &[Expr::Notrack], "echo:b", "b".into())
        .expect("encodes");
    b.echo_inserts(false);
    b.insert_rule("inet", "host", "input", RulePosition::Append, &[Expr::Notrack], "echo:c", "c".into())
        .expect("encodes");
    let echoed = ns.run(|| send_batch_echoed(&b.finish())).unwrap_or_else(|e| panic!("send: {e}"));
    let listed = listed_handles(&ns, "inet", "host", "input");
    let handle_of = |c: &str| listed.iter().find(|x| x.1.as_deref() == Some(c)).map(|x| x.0);
    assert_eq!(echoed.len(), 2, "{echoed:#?}");
    for (r, c) in echoed.iter().zip(["echo:a", "echo:b"]) {
        assert_eq!((r.family.as_str(), r.table.as_str(), r.chain.as_str()), ("inet", "host", "input"));
        assert_eq!(r.comment.as_deref(), Some(c));
        assert_eq!(Some(r.handle), handle_of(c), "echoed handle of {c} vs nft -a list:\n{listed:?}");
    }

    // The chain dump gives the listing's handles and comments, in order.
    let dumped = ns.run(|| dump_chain_rules("inet", "host", "input")).unwrap_or_else(|e| panic!("dump: {e}"));
    let dumped: Vec<(u64, Option<String>)> = dumped.into_iter().map(|r| (r.handle, r.comment)).collect();
    assert_eq!(dumped, listed);
    for (t, c) in [("nope", "input"), ("host", "nope")] {
        let d = ns.run(|| dump_chain_rules("inet", t, c)).unwrap_or_else(|e| panic!("dump {t} {c}: {e}"));
        assert!(d.is_empty(), "{d:?}");
    }
    ns.nft(&format!(
        "delete rule inet host input handle {}\ndelete rule inet host input handle {}\ndelete rule inet host input handle {}\n",
        handle_of("echo:a").unwrap_or_default(),
        handle_of("echo:b").unwrap_or_default(),
        handle_of("echo:c").unwrap_or_default()
    ));
    assert_same(&before, &list(&ns, &keys(&p)), "raw rules removed");

    // apply: the handles it records are the ones nft lists for the tagged rules.
    let undo = app(&ns, &prep(&ns, &request(&p, "ptx-echo-1", None)));
    let listed = listed_handles(&ns, "inet", "host", "input");
    let mut tagged: Vec<u64> =
        listed.iter().filter(|x| x.1.as_deref() == Some("ctguard:ptx-echo-1")).map(|x| x.0).collect();
    let mut recorded: Vec<u64> = undo.nft_insertions.iter().filter_map(|i| i.handle).collect();
    assert_eq!(recorded.len(), undo.nft_insertions.len(), "{undo:#?}");
    tagged.sort_unstable();
    recorded.sort_unstable();
    assert!(!tagged.is_empty());
    assert_eq!(recorded, tagged);
    assert!(undo.warnings.is_empty(), "{:?}", undo.warnings);

    // One rule by handle; a missing handle, chain or table is None.
    let got = ns.run(|| get_rule("inet", "host", "input", recorded[0])).unwrap_or_else(|e| panic!("get: {e}"));
    assert_eq!(got.map(|r| (r.handle, r.comment)), Some((recorded[0], Some("ctguard:ptx-echo-1".to_string()))));
    for (t, c, h) in [("host", "input", 999_999), ("host", "nope", recorded[0]), ("nope", "input", recorded[0])] {
        let got = ns.run(|| get_rule("inet", t, c, h)).unwrap_or_else(|e| panic!("get {t} {c} {h}: {e}"));
        assert!(got.is_none(), "{got:?}");
    }

    // A rule someone else adds meanwhile survives the netlink rollback, even when the recorded
    // handle points at it (a stale hint: the tag decides, the chain is dumped); the state is
    // restored.
    ns.nft("add rule inet host input tcp dport 8080 accept comment \"other\"\n");
    let other = listed_handles(&ns, "inet", "host", "input")
        .iter()
        .find(|x| x.1.as_deref() == Some("other"))
        .map(|x| x.0)
        .expect("other rule");
    let mut stale = undo.clone();
    for i in stale.nft_insertions.iter_mut() {
        i.handle = Some(other);
    }
    back(&ns, &stale);
    let after = listed_handles(&ns, "inet", "host", "input");
    assert!(after.iter().any(|x| x.1.as_deref() == Some("other")), "{after:?}");
    assert!(!after.iter().any(|x| x.1.as_deref() == Some("ctguard:ptx-echo-1")), "{after:?}");
    let other = after.iter().find(|x| x.1.as_deref() == Some("other")).map(|x| x.0).unwrap_or_default();
    ns.nft(&format!("delete rule inet host input handle {other}\n"));
    assert_same(&before, &list(&ns, &keys(&p)), "rollback restores the state exactly");
}

/// Regression (issue 16: the rollback reuses the iptables-nft documents its check built, while
/// the generation id shows nothing committed since): a foreign change after the check — a
/// second jump into ctguard's raw chain, which the checked documents do not delete — makes the
/// rollback build them again, and it still removes the chain and restores the saves exactly.
#[test]
fn iptables_nft_rollback_rebuilds_checked_documents_after_a_foreign_change() {
    let ns = Ns::new("ptx-ipt-docs");
    ns.exec_stdin("iptables-nft-restore", &["-w"], LEGACY_FW);
    let p = policy("backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n");
    let before = list(&ns, &[]);
    let prepared = prep(&ns, &request(&p, "ptx-docs", None));
    let undo = app(&ns, &prepared);
    // On one thread, as the agent's worker does (the checked documents are kept per thread).
    ns.run(|| {
        check_rollback(&undo).unwrap_or_else(|e| panic!("check_rollback: {}", chain(&e)));
        // Someone else jumps to ctguard's chain too (their change moves the generation id).
        let ipt = ctguard::backend::exec::Tool::find("iptables-nft").expect("iptables-nft");
        ipt.run(&["-w", "5", "-t", "raw", "-A", "OUTPUT", "-j", "CTGUARD-PRE"], None).expect("foreign jump");
        rollback(&undo).unwrap_or_else(|e| panic!("rollback after a foreign jump: {}", chain(&e)));
    });
    let save = ns.exec("iptables-nft-save", &["-t", "raw"]);
    assert!(!save.contains("CTGUARD"), "ctguard's raw chains and every jump to them are gone:\n{save}");
    assert_same(&before, &list(&ns, &[]), "the rollback restores every save exactly");
}

/// The normalized save of `tool` in the calling thread's namespace.
fn save_here(tool: &str) -> String {
    let t = ctguard::backend::exec::Tool::find(tool).unwrap_or_else(|e| panic!("{tool}: {e}"));
    let text = t.run(&[], None).unwrap_or_else(|e| panic!("{tool}: {e}"));
    ctguard::render::ipt_edit::normalize_save(&ctguard::live::iptables_save::without_incompatible(&text).0)
}

/// The save computed after apply for each family, checked against the tool's.
fn assert_computed_saves_are_the_tools(what: &str) {
    use ctguard::backend::iptables::{seeded_save, Variant};
    use ctguard::render::iptables::IpFamily;
    for (family, tool) in [(IpFamily::V4, "iptables-nft-save"), (IpFamily::V6, "ip6tables-nft-save")] {
        let computed = seeded_save(Variant::Nft, family)
            .unwrap_or_else(|| panic!("{what}: no computed {tool} output (the save would be read again)"));
        assert_same(
            &save_here(tool),
            &ctguard::render::ipt_edit::normalize_save(&computed),
            &format!("{what}: {tool}"),
        );
    }
}

/// Issue 16 (an iptables-nft save of a 100k-rule table takes about a second, most of it the
/// kernel's dump): when the generation id proves ctguard's own restores and batch the only
/// commits since the snapshot, the save after apply is computed from the snapshot's, not read
/// again — and is the tool's, line for line: a first apply (creating the IPv6 raw table and
/// ctguard's chains), a re-apply that deletes the first one's rules in the same commit and
/// empties ctguard's chains, and the rollbacks after them still exact.
#[test]
fn the_save_after_an_iptables_nft_apply_is_computed_and_is_the_tools() {
    let ns = Ns::new("ptx-ipt-seed");
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -p tcp -m tcp --dport 9999 -j CT --notrack\nCOMMIT\n";
    ns.exec_stdin("iptables-nft-restore", &["-w"], &format!("{LEGACY_FW}{raw}"));
    ns.exec_stdin("ip6tables-nft-restore", &["-w"], LEGACY_FW);
    let a = policy("backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n");
    let b = policy(
        "backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53, 5353]\nsources = [\"192.0.2.0/24\", \"2001:db8::/32\"]\ninterfaces = [\"eth0\"]\n",
    );
    let before = list(&ns, &[]);
    ns.run(|| {
        let ua = apply_here(&a, "ptx-seed-a", None);
        assert_computed_saves_are_the_tools("first apply");
        let ub = apply_here(&b, "ptx-seed-b", Some(ua.clone()));
        assert_computed_saves_are_the_tools("re-apply");
        back_here(&ub);
        back_here(&ua);
    });
    assert_same(&before, &list(&ns, &[]), "both rollbacks restore every save exactly");
}

/// The computed save is never taken when another writer committed during apply: an
/// iptables-nft rule added to the raw table after ctguard's last restore (the generation id
/// moved once more than ctguard's own commits) is in the journal's `after`, read from the tool.
#[test]
fn a_foreign_iptables_commit_during_apply_is_never_hidden_by_a_computed_save() {
    use ctguard::backend::iptables::{seeded_save, Variant};
    use ctguard::fault::{inject, FOREIGN_IPT_SOURCE};
    use ctguard::render::iptables::IpFamily;
    let ns = Ns::new("ptx-ipt-noseed");
    ns.exec_stdin("iptables-nft-restore", &["-w"], LEGACY_FW);
    let p = policy("backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n");
    ns.run(|| {
        let prepared = prepare(&request(&p, "ptx-noseed", None), facts()).unwrap_or_else(|e| panic!("{}", chain(&e)));
        let (res, fired) = inject("apply:after-iptables", 1, || apply(&prepared));
        assert_eq!(fired, 1, "the fault point fired");
        let u = res.unwrap_or_else(|e| panic!("apply: {}", chain(&e)));
        assert_eq!(seeded_save(Variant::Nft, IpFamily::V4), None, "no computed save after a foreign commit");
        let after = after_listing(&prepared, &u).unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert!(after.contains(FOREIGN_IPT_SOURCE), "the foreign raw rule is in the listing after apply:\n{after}");
        let fresh = scope_listing(&u, prepared.scope_keys()).unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(after, fresh);
        back_here(&u);
    });
    let save = ns.exec("iptables-nft-save", &["-t", "raw"]);
    assert!(
        save.contains(FOREIGN_IPT_SOURCE) && !save.contains("CTGUARD"),
        "the foreign rule survives the rollback:\n{save}"
    );
}

/// Issue 16 (each iptables scratch check is a scratch namespace and a restore run: 35 ms of a
/// 1k-rule iptables-nft apply went to the rollback's): `prepare` checks the rollback's
/// documents — built from the saves the apply will leave, simulated — in the scratch run of
/// the apply's own, and `check_rollback` after the apply runs no scratch check of its own
/// while its documents come from saves that read the same. After another writer's change to
/// the raw table it checks again, and the rollback is exact either way. On one thread, as the
/// agent's worker runs them.
#[test]
fn the_iptables_rollback_is_checked_with_the_apply_and_not_again() {
    use ctguard::backend::policy_txn::{scratch_checks_run, scratch_rollback_batches_run};
    let ns = Ns::new("ptx-ipt-onecheck");
    // (A raw table of the host's own: the one the foreign rule goes into stays either way.)
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    ns.exec_stdin("iptables-nft-restore", &["-w"], &format!("{LEGACY_FW}{raw}"));
    ns.exec_stdin("ip6tables-nft-restore", &["-w"], LEGACY_FW);
    let p = policy("backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\", \"tcp\"]\nports = [53]\n");
    let before = list(&ns, &[]);
    ns.run(|| {
        let n = scratch_checks_run();
        let m = scratch_rollback_batches_run();
        let ua = apply_here(&p, "ptx-one-a", None);
        assert_eq!(scratch_checks_run() - n, 1, "prepare: one scratch run");
        assert_eq!(scratch_rollback_batches_run() - m, 2, "the rollback checked as the batch it runs, per family");
        check_rollback(&ua).unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(scratch_checks_run() - n, 1, "the rollback was checked with the apply");
        rollback(&ua).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
        // Another writer's raw rule after the apply: the rollback's documents are checked again.
        let ub = apply_here(&p, "ptx-one-b", None);
        let ipt = ctguard::backend::exec::Tool::find("iptables-nft").expect("iptables-nft");
        ipt.run(&["-w", "5", "-t", "raw", "-A", "PREROUTING", "-s", "192.0.2.7/32", "-j", "ACCEPT"], None)
            .expect("foreign rule");
        let n = scratch_checks_run();
        check_rollback(&ub).unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(scratch_checks_run() - n, 1, "checked again");
        rollback(&ub).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
        ipt.run(&["-w", "5", "-t", "raw", "-D", "PREROUTING", "-s", "192.0.2.7/32", "-j", "ACCEPT"], None)
            .expect("foreign rule removed");
    });
    assert_same(&before, &list(&ns, &[]), "both rollbacks are exact");
}

/// An iptables-nft rollback is checked as the one nf_tables batch it sends: another writer's
/// rule that jumps to ctguard's raw chain with a match of its own (the rollback deletes only the
/// bare jumps) makes the kernel refuse that batch's DELCHAIN in the scratch namespace, and the
/// check says so; without it, the check passes and the rollback is exact.
#[test]
fn an_iptables_nft_rollback_batch_the_kernel_would_refuse_fails_its_check() {
    let ns = Ns::new("ptx-ipt-refuse");
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    ns.exec_stdin("iptables-nft-restore", &["-w"], &format!("{LEGACY_FW}{raw}"));
    let p = policy("backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n");
    let before = list(&ns, &[]);
    let foreign = ["-w", "5", "-t", "raw", "-A", "PREROUTING", "-s", "192.0.2.8/32", "-j", "CTGUARD-PRE"];
    ns.run(|| {
        let u = apply_here(&p, "ptx-refuse", None);
        let ipt = ctguard::backend::exec::Tool::find("iptables-nft").expect("iptables-nft");
        ipt.run(&foreign, None).expect("foreign jump");
        let err = check_rollback(&u).err().unwrap_or_else(|| panic!("a rollback the kernel refuses passed its check"));
        let text = chain(&err);
        assert!(text.contains("the kernel refuses the rollback's batch in a scratch namespace"), "{text}");
        let mut undo = foreign;
        undo[4] = "-D";
        ipt.run(&undo, None).expect("foreign jump removed");
        check_rollback(&u).unwrap_or_else(|e| panic!("check_rollback: {}", chain(&e)));
        rollback(&u).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
    });
    assert_same(&before, &list(&ns, &[]), "rolled back exactly");
}

/// Issue 16 (every kernel check costs the kernel an RCU grace period: 10–16 ms even for a tiny
/// batch): the check batch of `prepare` carries the rollback's deletes after the apply's
/// messages, so the rollback check after the commit does not send them again — but only while
/// the commit provably applied to the checked state and nothing committed since. On one thread,
/// as the agent's worker runs apply and check_rollback: proven right after the commit; no
/// longer after a foreign commit (then the full check runs and the rollback is still exact);
/// never for a rollback that puts a previous table back (that one is checked with `nft -c` of
/// its whole script after the commit).
#[test]
fn rollback_deletes_checked_before_the_commit_are_not_checked_again() {
    let ns = Ns::new("ptx-merged-check");
    ns.nft(HOST_FW);
    let p = policy(UDP53);
    let before = list(&ns, &[]);
    let nft = |args: &[&str]| {
        let t = ctguard::backend::exec::Tool::find("nft").expect("nft");
        t.run(args, None).unwrap_or_else(|e| panic!("nft {args:?}: {e}"));
    };
    // Proven right after the commit; the check then passes without sending it again.
    let u1 = ns.run(|| {
        let u = apply_here(&p, "ptx-merged-1", None);
        assert!(!u.nft_insertions.is_empty() && u.table.is_some(), "the policy inserts accepts and creates the table");
        assert!(nft_rollback_already_checked(&u), "the check batch carried the rollback's deletes");
        check_rollback(&u).unwrap_or_else(|e| panic!("check_rollback: {}", chain(&e)));
        assert!(nft_rollback_already_checked(&u), "a check commits nothing: the proof still holds");
        // The rollback on the same thread deletes by the handles the commit echoed, and its
        // own commit ends the proof.
        rollback(&u).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
        assert!(!nft_rollback_already_checked(&u), "the rollback's commit ends the proof");
        u
    });
    assert!(!u1.nft_insertions.is_empty());
    assert_same(&before, &list(&ns, &[]), "rolled back exactly");

    // A foreign commit after ours: the proof no longer holds; the full check runs and passes.
    let u2 = ns.run(|| {
        let u = apply_here(&p, "ptx-merged-2", None);
        assert!(nft_rollback_already_checked(&u));
        nft(&["add", "table", "ip", "foreign"]);
        assert!(!nft_rollback_already_checked(&u), "a foreign commit ends the proof");
        check_rollback(&u).unwrap_or_else(|e| panic!("check_rollback after a foreign commit: {}", chain(&e)));
        u
    });
    ns.run(|| rollback(&u2)).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
    ns.exec("nft", &["delete", "table", "ip", "foreign"]);
    assert_same(&before, &list(&ns, &[]), "rolled back exactly after the full check");

    // Another transaction's proof is not this one's, and a re-apply over a committed policy
    // (its rollback puts the previous table back) is never proven before its commit.
    let committed = app(&ns, &prep(&ns, &request(&p, "ptx-merged-3", None)));
    ns.run(|| {
        let u = apply_here(&p, "ptx-merged-4", Some(committed.clone()));
        assert!(!nft_rollback_already_checked(&u), "a rollback that puts a table back is checked after the commit");
        assert!(!nft_rollback_already_checked(&committed), "the proof names its own transaction only");
        check_rollback(&u).unwrap_or_else(|e| panic!("check_rollback of the re-apply: {}", chain(&e)));
        rollback(&u).unwrap_or_else(|e| panic!("rollback of the re-apply: {}", chain(&e)));
    });
    back(&ns, &committed);
    assert_same(&before, &list(&ns, &[]), "every transaction rolled back exactly");
}

/// Issue 16 (the rollback deletes by the handles the commit echoed while nothing has committed
/// since, instead of reading each rule back): handles are reused when a table is recreated, so
/// after another commit they are not trusted. Here another writer replaces the host table with
/// one whose rules get the very handles ctguard's accepts had: the rollback, on the same thread
/// as the apply, must find by tag that nothing of ctguard's is left in that chain and delete
/// none of the other writer's rules.
#[test]
fn echoed_handles_are_not_trusted_after_another_commit() {
    let ns = Ns::new("ptx-stale-handles");
    ns.nft(HOST_FW);
    let p = policy(UDP53);
    let (u, theirs) = ns.run(|| {
        let u = apply_here(&p, "ptx-stale-1", None);
        let ins = u.nft_insertions.iter().find(|i| i.table != "ctguard").expect("an accept outside ctguard's table");
        let (family, table, chain_name) = (ins.family.clone(), ins.table.clone(), ins.chain.clone());
        let top = u.nft_insertions.iter().filter_map(|i| i.handle).max().expect("echoed handles");
        // Another writer: the host table again, its chain filled with counter rules up to and
        // past the handles ctguard's accepts had.
        let mut script = format!("delete table {family} {table}\ntable {family} {table} {{\n\tchain {chain_name} {{\n");
        for _ in 0..top + 2 {
            script.push_str("\t\tcounter\n");
        }
        script.push_str("\t}\n}\n");
        let nft = ctguard::backend::exec::Tool::find("nft").expect("nft");
        nft.run(&["-f", "-"], Some(script.as_bytes())).unwrap_or_else(|e| panic!("the other writer's table: {e}"));
        assert!(!nft_rollback_already_checked(&u), "another commit ends the proof");
        let theirs = nft.run(&["-a", "list", "table", &family, &table], None).expect("list");
        rollback(&u).unwrap_or_else(|e| panic!("rollback: {}", chain(&e)));
        let after = nft.run(&["-a", "list", "table", &family, &table], None).expect("list");
        assert_eq!(after, theirs, "the other writer's rules, at ctguard's old handles, survive the rollback");
        (u, theirs)
    });
    assert!(!u.nft_insertions.is_empty() && theirs.contains("counter"));
    let listed = ns.exec("nft", &["list", "ruleset"]);
    assert!(!listed.contains("ctguard"), "ctguard's table is gone:\n{listed}");
}
