//! Issue 13: committed means kept. A committed policy behind a firewalld-style table survives
//! the host firewall's reload (the guard puts its accepts back, `REPAIRED`), and a reload that
//! turns the needed insertion into a lint error makes it fail safe (`DEGRADED`: NOTRACK
//! removed, the service answered tracked). Real packets, throwaway namespaces.

use std::process::Command;
use std::time::{Duration, Instant};

use super::txn_cli::{ok, Ctg};
use crate::harness::{udp_queries, Pair, UdpResponder, SRV4};

/// firewalld's layout: a verdict map on `ct state`, a jump into the zone dispatch, a goto into
/// the zone, the service accepted there, a final reject.
const FIREWALLD: &str = include_str!("../firewalld.nft");

/// What `firewall-cmd --reload` (or `systemctl reload nftables`) does to it: one transaction
/// deleting and recreating the table — ctguard's accept inside it is gone.
fn reload(pair: &Pair, extra: &str) {
    pair.srv.nft(&format!("delete table inet firewalld\n{FIREWALLD}{extra}"));
}

fn answered(pair: &Pair, n: usize, port: u16) -> usize {
    udp_queries(&pair.cli, (SRV4, 53).into(), n, port).answered
}

/// Waits until `f` holds (polling every 5 ms), returning how long it took.
fn until(limit: Duration, what: &str, f: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// True when the firewalld table holds ctguard's accept (tagged `tag`).
fn accept_in_firewalld(pair: &Pair, tag: &str) -> bool {
    let l = pair.srv.nft_list();
    let start = l.find("table inet firewalld").unwrap_or(l.len());
    let end = l[start..].find("\ntable ").map_or(l.len(), |e| start + e);
    l[start..end].contains(tag)
}

fn committed_policy(pair: &Pair, ctg: &Ctg) -> String {
    pair.srv.nft(FIREWALLD);
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "60s"]);
    ok(&out);
    ok(&ctg.run(&["confirm", &id]));
    id
}

#[test]
fn a_firewall_reload_is_repaired_and_dns_keeps_being_answered() {
    let pair = Pair::new("guard-rl");
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let ctg = Ctg::new();
    let id = committed_policy(&pair, &ctg);
    let tag = format!("ctguard:{id}");
    assert_eq!(answered(&pair, 300, 20000), 300, "committed: answered");
    let st = ctg.json(&["status"]);
    assert_eq!(st["committed"][0]["state"], "intact", "{st}");
    assert!(
        accept_in_firewalld(&pair, &tag),
        "the committed accept is in the firewalld table: {}",
        pair.srv.nft_list()
    );
    // The reload: ctguard's accept is gone, its NOTRACK stays.
    let t0 = Instant::now();
    reload(&pair, "");
    let gap = until(Duration::from_secs(2), "the accept back after the reload", || accept_in_firewalld(&pair, &tag));
    eprintln!(
        "firewalld-style reload: ctguard's accept back {gap:?} after the reload (nft -f returned after {:?})",
        t0.elapsed() - gap
    );
    assert_eq!(answered(&pair, 300, 21000), 300, "after the reload and the repair: answered");
    until(Duration::from_secs(2), "status says repaired", || {
        ctg.json(&["status"])["committed"][0]["state"] == "repaired"
    });
    let st = ctg.json(&["status"]);
    eprintln!("status after the repair: {}", st["committed"]);
    assert_eq!(st["committed"][0]["id"], id.as_str(), "{st}");
    let show = ctg.json(&["show", &id]);
    let events = show["events"].to_string();
    assert!(events.contains("REPAIRED") && events.contains("missing: accept in inet firewalld"), "{show}");
    // A second reload is repaired again; the record stays COMMITTED.
    reload(&pair, "");
    until(Duration::from_secs(2), "the accept back after a second reload", || accept_in_firewalld(&pair, &tag));
    until(Duration::from_secs(2), "two repairs", || ctg.json(&["status"])["committed"][0]["repairs"] == 2);
    assert_eq!(ctg.state(&id), "COMMITTED");
    // The agent stays for the guard (detached agents exit only when nothing is guarded).
    std::thread::sleep(Duration::from_secs(3));
    assert!(ctg.agent_pid().is_some(), "the agent left a committed policy unguarded");
}

#[test]
fn a_reload_that_makes_the_insertion_a_lint_error_degrades_to_tracked() {
    let pair = Pair::new("guard-dg");
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let ctg = Ctg::new();
    let id = committed_policy(&pair, &ctg);
    assert_eq!(answered(&pair, 100, 22000), 100);
    // The reload brings a redirect on port 53: untracked packets skip NAT, so putting the
    // NOTRACK policy back would be a lint error (nat-bypass). The guard fails safe.
    let nat = "table inet redirects {\n  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    udp dport 53 redirect to :53\n  }\n}\n";
    reload(&pair, nat);
    let gone = || !pair.srv.nft_list().contains("table inet ctguard");
    let start = Instant::now();
    while !gone() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !gone() {
        let log = std::fs::read_to_string(ctg.base.join("run").join("agent.log")).unwrap_or_default();
        panic!("ctguard's NOTRACK not removed within 3 s: {}\n{}\n{log}", ctg.json(&["status"]), pair.srv.nft_list());
    }
    let st = ctg.json(&["status"]);
    eprintln!("status after the degrading reload: {}", st["committed"]);
    assert_eq!(st["committed"][0]["state"], "degraded", "{st}");
    assert!(st["committed"][0]["reason"].as_str().unwrap_or("").contains("--force"), "{st}");
    assert_eq!(answered(&pair, 100, 23000), 100, "degraded: the service answers tracked");
    let show = ctg.json(&["show", &id]);
    assert!(show["events"].to_string().contains("DEGRADED"), "{show}");
    // It stays degraded (no flapping) until an operator acts.
    reload(&pair, "");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!pair.srv.nft_list().contains("table inet ctguard"));
    assert_eq!(ctg.json(&["status"])["committed"][0]["state"], "degraded");
}

#[test]
fn a_repair_that_fails_fails_safe_instead_of_blackholing() {
    let pair = Pair::new("guard-fs");
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let mut ctg = Ctg::new();
    // The agent this test starts fails every repair (test-only fault point).
    ctg.env.push((ctguard::agent::server::FAULT_ENV.into(), "guard:repair-fails".into()));
    let _id = committed_policy(&pair, &ctg);
    // Whatever keeps the repair from working, NOTRACK without its accept is a blackhole: the
    // guard removes the NOTRACK at once.
    reload(&pair, "");
    until(Duration::from_secs(3), "NOTRACK removed", || !pair.srv.nft_list().contains("table inet ctguard"));
    let st = ctg.json(&["status"]);
    eprintln!("status after a reload the repair could not handle: {}", st["committed"]);
    assert_eq!(st["committed"][0]["state"], "degraded", "{st}");
    assert!(st["committed"][0]["reason"].as_str().unwrap_or("").contains("injected repair failure"), "{st}");
    assert_eq!(answered(&pair, 100, 24000), 100, "degraded: the service answers tracked");
}

/// A reload that adds a native `table ip nat` (named like iptables' table) with a redirect on
/// the notracked port: readable now (issue 12), and the lint refuses the re-insertion, so the
/// guard degrades.
#[test]
fn a_reload_bringing_a_native_ip_nat_redirect_degrades() {
    let pair = Pair::new("guard-nn");
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let ctg = Ctg::new();
    let _id = committed_policy(&pair, &ctg);
    let nat = "table ip nat {\n  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    udp dport 53 redirect to :53\n  }\n}\n";
    reload(&pair, nat);
    until(Duration::from_secs(3), "NOTRACK removed", || !pair.srv.nft_list().contains("table inet ctguard"));
    let st = ctg.json(&["status"]);
    assert_eq!(st["committed"][0]["state"], "degraded", "{st}");
    assert!(st["committed"][0]["reason"].as_str().unwrap_or("").contains("nat-bypass"), "{st}");
    assert_eq!(answered(&pair, 100, 24500), 100, "degraded: the service answers tracked");
}

/// The iptables backends: the host reloads its whole filter table with `iptables-restore`.
fn iptables_reload_is_repaired(variant: &str) {
    let pair = Pair::new(&format!("guard-{variant}"));
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let restore = format!("iptables-{variant}-restore");
    let filter = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A INPUT -i lo -j ACCEPT\n-A INPUT -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n";
    let raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    pair.srv.exec_stdin(&restore, &["-w"], &format!("{filter}{raw}"));
    let ctg = Ctg::new();
    std::fs::create_dir_all(&ctg.base).expect("base");
    let policy = ctg.base.join("p.toml");
    std::fs::write(
        &policy,
        format!("backend = \"iptables-{variant}\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"),
    )
    .expect("policy");
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "60s", policy.to_str().expect("utf8")]);
    ok(&out);
    ok(&ctg.run(&["confirm", &id]));
    let save = || pair.srv.exec(&format!("iptables-{variant}-save"), &["-t", "filter"]);
    assert!(save().contains(&id), "{}", save());
    assert_eq!(answered(&pair, 100, 25000), 100);
    // The host's firewall service restores its filter table: ctguard's accept is gone.
    pair.srv.exec_stdin(&restore, &["-w"], filter);
    let gap = until(Duration::from_secs(2), "the accept back after iptables-restore", || save().contains(&id));
    eprintln!("iptables-{variant}: ctguard's accept back {gap:?} after the filter table was restored");
    assert_eq!(answered(&pair, 100, 26000), 100, "answered again");
    // The kernel shows the accept a moment before the guard has journaled the repair.
    until(Duration::from_secs(2), "status says repaired", || {
        ctg.json(&["status"])["committed"][0]["state"] == "repaired"
    });
}

#[test]
fn an_iptables_nft_filter_reload_is_repaired() {
    iptables_reload_is_repaired("nft");
}

#[test]
fn an_iptables_legacy_filter_reload_is_repaired_by_the_poll() {
    iptables_reload_is_repaired("legacy");
}

/// The reload restricts the service under a condition an inserted rule cannot repeat (an
/// opaque match, `meta pkttype host`): putting ctguard's unrestricted accept back would widen
/// access (an open resolver), so the guard removes its NOTRACK instead and the service runs
/// tracked, still restricted.
#[test]
fn a_reload_that_would_make_the_insertion_widen_access_degrades_instead() {
    let pair = Pair::new("guard-wd");
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let ctg = Ctg::new();
    let _id = committed_policy(&pair, &ctg);
    let restricted =
        FIREWALLD.replace("udp dport 53 ct state new accept", "meta pkttype host udp dport 53 ct state new accept");
    assert_ne!(restricted, FIREWALLD);
    pair.srv.nft(&format!("delete table inet firewalld\n{restricted}"));
    until(Duration::from_secs(3), "NOTRACK removed", || !pair.srv.nft_list().contains("table inet ctguard"));
    let st = ctg.json(&["status"]);
    eprintln!("status after a reload that restricts the source: {}", st["committed"]);
    assert_eq!(st["committed"][0]["state"], "degraded", "{st}");
    assert!(st["committed"][0]["reason"].as_str().unwrap_or("").contains("open-resolver"), "{st}");
    // The allowed client is answered (tracked); nothing was widened.
    assert_eq!(answered(&pair, 100, 27000), 100);
    // `doctor` names the degraded policy and the way back.
    let d = ctg.json(&["--netns", pair.srv.name(), "doctor", "--window", "0"]);
    let recs = d["recommendations"].as_array().cloned().unwrap_or_default();
    let found = recs.iter().find(|r| r["kind"] == "ctguard_degraded");
    assert!(found.is_some_and(|r| r["fix"].as_str().unwrap_or("").contains("apply --from")), "{d}");
}

/// Issue 12: the reload restricts the service to one source (the client, 198.18.0.2): the
/// guard puts the accept back carrying the same source restriction — repaired, not degraded,
/// the client answered untracked and nothing widened.
#[test]
fn a_reload_that_restricts_the_source_is_repaired_with_the_restriction() {
    let pair = Pair::new("guard-rs");
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let ctg = Ctg::new();
    let id = committed_policy(&pair, &ctg);
    let restricted =
        FIREWALLD.replace("udp dport 53 ct state new accept", "ip saddr 198.18.0.2 udp dport 53 ct state new accept");
    assert_ne!(restricted, FIREWALLD);
    pair.srv.nft(&format!("delete table inet firewalld\n{restricted}"));
    until(Duration::from_secs(3), "the restricted accept back", || {
        pair.srv.nft_list().lines().any(|l| l.contains(&id) && l.contains("ip saddr 198.18.0.2 udp dport 53"))
    });
    until(Duration::from_secs(3), "status says repaired", || {
        ctg.json(&["status"])["committed"][0]["state"] == "repaired"
    });
    assert!(pair.srv.nft_list().contains("table inet ctguard"));
    assert_eq!(answered(&pair, 100, 27500), 100);
}

/// ufw, where it is installed: its own configuration copied into a private mount namespace
/// (the host's /etc/ufw is never written), enabled in the test's network namespace with DNS
/// allowed; ctguard's committed policy with the iptables-nft backend; `ufw reload` → DNS still
/// answered, the guard intact or repaired, never degraded.
#[test]
fn a_ufw_reload_keeps_the_committed_policy() {
    assert!(
        std::path::Path::new("/usr/sbin/ufw").exists(),
        "ufw is not installed: integration/packages.txt installs it"
    );
    let host_conf = std::fs::read("/etc/ufw/ufw.conf").expect("/etc/ufw/ufw.conf");
    let pair = Pair::new("guard-ufw");
    let _dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let tmp = std::env::temp_dir().join(format!("ctguard-ufw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("tmp");
    let conf = tmp.join("ufw");
    let st = Command::new("cp").args(["-a", "/etc/ufw"]).arg(&conf).status().expect("cp");
    assert!(st.success());
    std::fs::write(conf.join("sysctl.conf"), "").expect("sysctl.conf"); // no sysctl writes
                                                                        // One ufw command in the private mount namespace, in the server's network namespace.
    let ufw = |args: &str| {
        let script =
            format!("mount --bind {} /etc/ufw && ip netns exec {} ufw {args}", conf.display(), pair.srv.name());
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .expect("unshare");
        assert!(out.status.success(), "ufw {args}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ufw("--force enable");
    ufw("allow 53/udp");
    ufw("allow 22/tcp");
    let ctg = Ctg::new();
    std::fs::create_dir_all(&ctg.base).expect("base");
    let policy = ctg.base.join("p.toml");
    std::fs::write(&policy, "backend = \"iptables-nft\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n")
        .expect("policy");
    let (out, id) = ctg.apply(&pair.srv, &["--timeout", "60s", policy.to_str().expect("utf8")]);
    ok(&out);
    ok(&ctg.run(&["confirm", &id]));
    assert_eq!(answered(&pair, 100, 28000), 100);
    let t0 = Instant::now();
    ufw("reload");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(answered(&pair, 100, 29000), 100, "after ufw reload");
    let st = ctg.json(&["status"]);
    eprintln!("ufw reload: 100/100 answered when checked {:?} after it; guard {}", t0.elapsed(), st["committed"]);
    assert!(st["committed"][0]["state"] == "intact" || st["committed"][0]["state"] == "repaired", "{st}");
    let _ = std::fs::remove_dir_all(&tmp);
    // The host's own ufw configuration was never touched.
    assert_eq!(std::fs::read("/etc/ufw/ufw.conf").expect("ufw.conf"), host_conf, "the host's /etc/ufw changed");
}
