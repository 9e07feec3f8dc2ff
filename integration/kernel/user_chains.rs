//! Issue 12 with real packets: host firewalls no one here wrote keep their blocklists, source
//! restrictions and rate limits after ctguard's NOTRACK, on every backend where the layout
//! applies. Each test: a server and a client namespace; the client has an allowed address
//! (198.18.0.2) and a blocked one (198.18.0.3); DNS-like UDP to port 53 before, while the
//! transaction is pending, and after its rollback.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Output;

use super::txn_cli::{ok, Ctg};
use crate::harness::{udp_queries_from, Pair, UdpResponder, CLI4, PAIR_IFACE, SRV4};

const BLOCKED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

/// The RHEL layout with a blocklist at the top of the user chain (`-I RH-Firewall-1-INPUT 1`).
const RHEL: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:RH-Firewall-1-INPUT - [0:0]
-A INPUT -j RH-Firewall-1-INPUT
-A FORWARD -j RH-Firewall-1-INPUT
-A RH-Firewall-1-INPUT -s 198.18.0.3/32 -j DROP
-A RH-Firewall-1-INPUT -i lo -j ACCEPT
-A RH-Firewall-1-INPUT -p icmp -m icmp --icmp-type any -j ACCEPT
-A RH-Firewall-1-INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A RH-Firewall-1-INPUT -p udp -m state --state NEW -m udp --dport 53 -j ACCEPT
-A RH-Firewall-1-INPUT -p tcp -m state --state NEW -m tcp --dport 22 -j ACCEPT
-A RH-Firewall-1-INPUT -j REJECT --reject-with icmp-host-prohibited
COMMIT
";

/// An nft base chain that jumps to a user chain starting with a blocklist.
const NFT_JUMP: &str = "table inet host {
  chain host_in {
    ip saddr 198.18.0.3 drop
    udp dport 53 ct state new accept
  }
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif \"lo\" accept
    jump host_in
  }
}
";

/// The service open to one source only.
const NFT_ONE_SOURCE: &str = "table inet host {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif \"lo\" accept
    ip saddr 198.18.0.2 udp dport 53 ct state new accept
  }
}
";

/// The same restriction through iptables.
const IPT_ONE_SOURCE: &str = "*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -s 198.18.0.2/32 -p udp -m udp --dport 53 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
";

/// What `ufw limit 53/udp` writes (ufw 0.36, iptables 1.8.9), the chains that matter.
const UFW_LIMIT: &str = "*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:ufw-user-input - [0:0]
:ufw-user-limit - [0:0]
:ufw-user-limit-accept - [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -i lo -j ACCEPT
-A INPUT -j ufw-user-input
-A ufw-user-input -p udp -m udp --dport 53 -m conntrack --ctstate NEW -m recent --set --name DEFAULT --mask 255.255.255.255 --rsource
-A ufw-user-input -p udp -m udp --dport 53 -m conntrack --ctstate NEW -m recent --update --seconds 30 --hitcount 6 --name DEFAULT --mask 255.255.255.255 --rsource -j ufw-user-limit
-A ufw-user-input -p udp -m udp --dport 53 -j ufw-user-limit-accept
-A ufw-user-limit -m limit --limit 3/min -j LOG --log-prefix \"[UFW LIMIT BLOCK] \"
-A ufw-user-limit -j REJECT --reject-with icmp-port-unreachable
-A ufw-user-limit-accept -j ACCEPT
COMMIT
";

/// A `*-save` of the filter table without comments and with counters zeroed.
fn save_listing(ns: &crate::harness::Ns, tool: &str) -> String {
    ns.exec(tool, &["-t", "filter"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Setup {
    pair: Pair,
    _dns: UdpResponder,
    ctg: Ctg,
}

fn setup(label: &str) -> Setup {
    let pair = Pair::new(label);
    pair.cli.exec("ip", &["addr", "add", &format!("{BLOCKED}/24"), "dev", PAIR_IFACE]);
    let dns = UdpResponder::start(&pair.srv, (SRV4, 53).into());
    let ctg = Ctg::new();
    std::fs::create_dir_all(&ctg.base).expect("base");
    Setup { pair, _dns: dns, ctg }
}

impl Setup {
    /// Answers to `n` queries from `src`, and the server's conntrack entries they added.
    fn queries(&self, src: Ipv4Addr, n: usize, port: u16) -> (usize, u64) {
        let before = self.pair.srv.conntrack_count();
        let a = udp_queries_from(&self.pair.cli, IpAddr::V4(src), (SRV4, 53).into(), n, port).answered;
        (a, self.pair.srv.conntrack_count().saturating_sub(before))
    }

    fn policy(&self, backend: &str) -> String {
        let p = self.ctg.base.join(format!("{backend}.toml"));
        std::fs::write(&p, format!("backend = \"{backend}\"\n[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\n"))
            .expect("policy");
        p.to_string_lossy().into_owned()
    }

    fn apply(&self, backend: &str) -> (Output, String) {
        let p = self.policy(backend);
        self.ctg.apply(&self.pair.srv, &["--timeout", "60s", &p])
    }
}

/// Before, pending and after: the allowed client answered (untracked while pending: +0
/// conntrack entries), the blocked one never.
fn blocklist_holds(s: &Setup, backend: &str, listing: impl Fn() -> String) {
    let before = listing();
    let (a, _) = s.queries(CLI4, 50, 20000);
    assert_eq!(a, 50, "allowed client before apply");
    assert_eq!(s.queries(BLOCKED, 50, 21000).0, 0, "blocked client before apply");
    let (out, id) = s.apply(backend);
    ok(&out);
    s.pair.srv.conntrack_flush();
    let (a, added) = s.queries(CLI4, 100, 22000);
    assert_eq!(a, 100, "allowed client answered while pending\n{}", listing());
    assert_eq!(added, 0, "the allowed client's queries are untracked");
    assert_eq!(s.queries(BLOCKED, 100, 23000).0, 0, "blocked client still blocked\n{}", listing());
    ok(&s.ctg.run(&["rollback", &id]));
    assert_eq!(listing(), before, "rollback gives the ruleset back");
    assert_eq!(s.queries(BLOCKED, 50, 24000).0, 0);
    assert_eq!(s.queries(CLI4, 50, 25000).0, 50);
}

fn rhel(variant: &str) {
    let s = setup(&format!("uc-rhel-{}", &variant[..3]));
    let restore = format!("iptables-{variant}-restore");
    s.pair.srv.exec_stdin(&restore, &["-w"], RHEL);
    let save = format!("iptables-{variant}-save");
    let listing = || save_listing(&s.pair.srv, &save);
    blocklist_holds(&s, &format!("iptables-{variant}"), listing);
}

#[test]
fn rhel_user_chain_blocklist_holds_with_iptables_nft() {
    rhel("nft");
}

#[test]
fn rhel_user_chain_blocklist_holds_with_iptables_legacy() {
    rhel("legacy");
}

#[test]
fn nft_jump_blocklist_holds() {
    let s = setup("uc-jump");
    s.pair.srv.nft(NFT_JUMP);
    blocklist_holds(&s, "nft", || s.pair.srv.nft_list());
}

/// Both restricted layouts: planned without `--force`, the accept carries the source, the
/// other source stays refused.
fn one_source(s: &Setup, backend: &str, listing: impl Fn() -> String) {
    let before = listing();
    assert_eq!(s.queries(CLI4, 50, 30000).0, 50);
    assert_eq!(s.queries(BLOCKED, 50, 31000).0, 0);
    let (out, id) = s.apply(backend);
    ok(&out);
    assert!(listing().contains("198.18.0.2"), "{}", listing());
    s.pair.srv.conntrack_flush();
    let (a, added) = s.queries(CLI4, 100, 32000);
    assert_eq!((a, added), (100, 0), "the allowed source, untracked");
    assert_eq!(s.queries(BLOCKED, 100, 33000).0, 0, "the other source still refused\n{}", listing());
    ok(&s.ctg.run(&["rollback", &id]));
    assert_eq!(listing(), before);
}

#[test]
fn a_source_restricted_service_stays_restricted_with_nft() {
    let s = setup("uc-src-nft");
    s.pair.srv.nft(NFT_ONE_SOURCE);
    one_source(&s, "nft", || s.pair.srv.nft_list());
}

#[test]
fn a_source_restricted_service_stays_restricted_with_iptables_nft() {
    let s = setup("uc-src-ipn");
    s.pair.srv.exec_stdin("iptables-nft-restore", &["-w"], IPT_ONE_SOURCE);
    one_source(&s, "iptables-nft", || save_listing(&s.pair.srv, "iptables-nft-save"));
}

#[test]
fn a_source_restricted_service_stays_restricted_with_iptables_legacy() {
    let s = setup("uc-src-ipl");
    s.pair.srv.exec_stdin("iptables-legacy-restore", &["-w"], IPT_ONE_SOURCE);
    one_source(&s, "iptables-legacy", || save_listing(&s.pair.srv, "iptables-legacy-save"));
}

/// `ufw limit`: nothing to insert, the service answered, and both apply and plan say the rate
/// limit stops applying (`lost-effect`, naming the `recent --update` rule).
#[test]
fn ufw_limit_is_named_as_a_lost_effect() {
    let s = setup("uc-ufw");
    s.pair.srv.exec_stdin("iptables-nft-restore", &["-w"], UFW_LIMIT);
    let p = s.policy("iptables-nft");
    let plan = s.ctg.json(&["--netns", s.pair.srv.name(), "plan", &p]);
    let findings = plan["findings"].as_array().cloned().unwrap_or_default();
    let lost: Vec<&serde_json::Value> = findings.iter().filter(|f| f["code"] == "lost-effect").collect();
    assert!(lost.iter().any(|f| f["rule"].as_str().unwrap_or("").contains("--update")), "{findings:?}");
    assert!(lost.iter().all(|f| f["severity"] == "warning"), "{findings:?}");
    assert!(plan["insertions"].as_array().is_some_and(|a| a.is_empty()), "{plan}");
    // Tracked, the limit holds: at most 6 new flows from one source in 30 s.
    let (limited, _) = s.queries(CLI4, 20, 33000);
    assert!(limited <= 6, "the rate limit applies while tracked: {limited} of 20 answered");
    let (out, id) = s.apply("iptables-nft");
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let warned = v.to_string().contains("lost-effect") || stderr.contains("lost-effect");
    assert!(warned, "apply names the lost rate limit: {v} {stderr}");
    s.pair.srv.conntrack_flush();
    // Untracked, the limit is gone (what the warning says): all answered.
    let (a, added) = s.queries(CLI4, 20, 34000);
    assert_eq!((a, added), (20, 0));
    ok(&s.ctg.run(&["rollback", &id]));
}

/// An allowlist in a named set: the inserted accept refers to the set by name, so taking a
/// client out of the set later refuses it untracked too (an inline copy would keep it open).
#[test]
fn a_named_allowlist_is_carried_by_reference() {
    let s = setup("uc-set");
    s.pair.srv.nft(
        "table inet host {
  set trusted {
    type ipv4_addr
    elements = { 198.18.0.2, 198.18.0.3 }
  }
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif \"lo\" accept
    ip saddr @trusted udp dport 53 ct state new accept
  }
}
",
    );
    let (out, id) = s.apply("nft");
    ok(&out);
    let listing = s.pair.srv.nft_list();
    assert!(
        listing
            .lines()
            .any(|l| l.contains(&id) && l.contains("ip saddr @trusted") && l.contains("ct state untracked accept")),
        "{listing}"
    );
    s.pair.srv.conntrack_flush();
    assert_eq!(s.queries(BLOCKED, 50, 40000), (50, 0), "in the set: answered, untracked");
    s.pair.srv.exec("nft", &["delete", "element", "inet", "host", "trusted", "{ 198.18.0.3 }"]);
    assert_eq!(s.queries(BLOCKED, 50, 41000).0, 0, "out of the set: refused");
    assert_eq!(s.queries(CLI4, 50, 42000), (50, 0));
    ok(&s.ctg.run(&["rollback", &id]));
}
