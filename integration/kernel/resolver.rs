//! Client-side flows (issue 15, DESIGN §6): a recursive resolver's own queries to its
//! upstream, behind a stateful firewall, with a `side = "querying"` policy applied through the
//! engine. Real packets in throw-away namespaces: srv is the resolver, cli holds the upstream
//! (198.18.0.2:53) and, on a second address outside the upstream prefixes, the spoofer.
//! Figures are printed with `eprintln!` (`-- --nocapture`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use crate::harness::{host_conntrack_shared, sa, udp_queries, Ns, Pair, UdpResponder, CLI4, SRV4, STATEFUL};
use crate::policy_txn::{app, assert_same, back, list, policy, prep, request};

/// The resolver's policy: its own queries to the upstream on udp/53, and their answers.
const QUERYING: &str = "backend = \"nft\"
[[notrack]]
protocols = [\"udp\"]
ports = [53]
side = \"querying\"
upstreams = [\"198.18.0.2/32\"]
";

/// An address on cli's side outside the upstream prefixes.
const SPOOF4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

/// Sends one datagram from `from` (bound in `sender`) to srv's `to`, and says whether the
/// listener bound there in `srv` received it.
fn reaches(srv: &Ns, sender: &Ns, from: SocketAddr, to: SocketAddr) -> bool {
    let listener = srv.run(move || UdpSocket::bind(to)).unwrap_or_else(|e| panic!("bind {to}: {e}"));
    listener.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let sock = sender
        .run(move || crate::harness::bind_retrying(|| UdpSocket::bind(from)))
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    sock.send_to(b"probe", to).unwrap_or_else(|e| panic!("send {from} -> {to}: {e}"));
    let mut buf = [0u8; 64];
    matches!(listener.recv_from(&mut buf), Ok((5, src)) if src == from)
}

#[test]
fn querying_policy_notracks_the_resolvers_own_queries_and_only_the_upstreams_answers() {
    let _host = host_conntrack_shared();
    let pair = Pair::new("resolver");
    pair.srv.nft(STATEFUL);
    pair.cli.exec("ip", &["addr", "add", &format!("{SPOOF4}/24"), "dev", "veth0"]);
    let upstream = UdpResponder::start(&pair.cli, sa(CLI4, 53));
    let p = policy(QUERYING);
    let before = list(&pair.srv, &[]);

    // Control: the resolver's queries are answered through the stateful firewall, tracked.
    pair.srv.conntrack_flush();
    let c0 = pair.srv.conntrack_count();
    let a = udp_queries(&pair.srv, sa(CLI4, 53), 500, 30000);
    let tracked = pair.srv.conntrack_count().saturating_sub(c0);
    eprintln!("resolver: before apply: answered {}/500, conntrack +{tracked}", a.answered);
    assert_eq!(a.answered, 500);
    assert!(tracked >= 490, "control: +{tracked}");
    // Control: a packet from source port 53 (any address) to a closed local port is dropped.
    assert!(!reaches(&pair.srv, &pair.cli, SocketAddr::new(IpAddr::V4(SPOOF4), 53), sa(SRV4, 9999)));

    let undo = app(&pair.srv, &prep(&pair.srv, &request(&p, "resolver-1", None)));
    let input = pair.srv.exec("nft", &["list", "chain", "inet", "host", "input"]);
    eprintln!("resolver: input chain after apply:\n{input}");
    let ours: Vec<&str> = input.lines().filter(|l| l.contains("ctguard:resolver-1")).collect();
    assert_eq!(ours.len(), 1, "{input}");
    assert!(ours[0].trim().starts_with("ip saddr 198.18.0.2 udp sport 53 ct state untracked accept"), "{input}");

    // Every query answered; the table gains < 1 % of the queries.
    pair.srv.conntrack_flush();
    let c0 = pair.srv.conntrack_count();
    let n = 2000;
    let a = udp_queries(&pair.srv, sa(CLI4, 53), n, 31000);
    let added = pair.srv.conntrack_count().saturating_sub(c0);
    eprintln!("resolver: after apply: answered {}/{n}, conntrack +{added}", a.answered);
    assert_eq!(a.answered, n);
    assert!((added as usize) * 100 < n, "conntrack +{added} for {n} queries");

    // Spoofing: source port 53 from outside the upstreams does not reach a local listener.
    assert!(
        !reaches(&pair.srv, &pair.cli, SocketAddr::new(IpAddr::V4(SPOOF4), 53), sa(SRV4, 9999)),
        "a packet from {SPOOF4}:53 reached a local listener on 9999"
    );
    // The residual the restriction leaves, shown so the probe above is known to work: the
    // upstream's own address with source port 53 does get in (spoofing it needs that address).
    drop(upstream);
    assert!(reaches(&pair.srv, &pair.cli, sa(CLI4, 53), sa(SRV4, 9998)), "the probe detects delivery");

    back(&pair.srv, &undo);
    assert_same(&before, &list(&pair.srv, &[]), "rollback restores the ruleset exactly");
    assert!(!reaches(&pair.srv, &pair.cli, sa(CLI4, 53), sa(SRV4, 9997)), "closed again after rollback");
    // Tracked again, and the answers still arrive.
    let _upstream = UdpResponder::start(&pair.cli, sa(CLI4, 53));
    pair.srv.conntrack_flush();
    let a = udp_queries(&pair.srv, sa(CLI4, 53), 100, 34000);
    assert_eq!(a.answered, 100);
    assert!(pair.srv.conntrack_count() >= 95);
}

/// `flush_existing` on a querying entry deletes exactly the resolver's own open queries to its
/// upstreams, and leaves the entries of the flows it serves (same port) alone.
#[test]
fn flush_existing_on_a_querying_entry_deletes_only_the_resolvers_own_queries() {
    let _host = host_conntrack_shared();
    let pair = Pair::new("resflush");
    pair.srv.nft(STATEFUL);
    let _upstream = UdpResponder::start(&pair.cli, sa(CLI4, 53));
    let _served = UdpResponder::start(&pair.srv, sa(SRV4, 53));
    pair.srv.conntrack_flush();
    let q = udp_queries(&pair.srv, sa(CLI4, 53), 50, 31000);
    let s = udp_queries(&pair.cli, sa(SRV4, 53), 50, 32000);
    assert_eq!((q.answered, s.answered), (50, 50));
    let count = |dst: Ipv4Addr| {
        let out = pair.srv.exec("conntrack", &["-L", "-p", "udp", "--orig-port-dst", "53", "-d", &dst.to_string()]);
        out.lines().filter(|l| l.starts_with("udp")).count()
    };
    assert_eq!((count(CLI4), count(SRV4)), (50, 50));
    let p = policy(&format!("{QUERYING}flush_existing = true\n"));
    let undo = app(&pair.srv, &prep(&pair.srv, &request(&p, "resflush-1", None)));
    eprintln!("resolver flush: queries left {}, served entries left {}", count(CLI4), count(SRV4));
    assert_eq!(count(CLI4), 0, "the resolver's own queries are flushed");
    assert_eq!(count(SRV4), 50, "the served entries stay: the querying entry does not notrack them");
    back(&pair.srv, &undo);
}

/// Issue 15's resolver test through the CLI, as an SRE would run it: `doctor` names the client
/// side, `doctor --emit-policy | ctguard apply -` keeps the table under 1 % of the queries while
/// every one is answered, a non-upstream packet from source port 53 reaches nothing, and
/// `doctor` after the fix recommends no client-side fix again.
#[test]
fn doctor_emit_policy_piped_into_apply_fixes_a_resolver() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let _host = host_conntrack_shared();
    let pair = Pair::new("resdoc");
    pair.srv.nft(STATEFUL);
    pair.cli.exec("ip", &["addr", "add", &format!("{SPOOF4}/24"), "dev", "veth0"]);
    let _upstream = UdpResponder::start(&pair.cli, sa(CLI4, 53));
    let ctg = crate::txn_cli::Ctg::new();
    pair.srv.conntrack_flush();
    let a = udp_queries(&pair.srv, sa(CLI4, 53), 2000, 33000);
    assert_eq!(a.answered, 2000);
    let d = ctg.json(&["--netns", pair.srv.name(), "doctor", "--window", "0"]);
    let recs = d["recommendations"].as_array().cloned().unwrap_or_default();
    assert!(recs.iter().any(|r| r["kind"] == "client_flows"), "doctor names the client side: {d}");
    let emitted = ctg.run(&["--netns", pair.srv.name(), "doctor", "--emit-policy", "--window", "0"]);
    let policy = String::from_utf8_lossy(&emitted.stdout).into_owned();
    assert!(policy.contains("side = \"querying\""), "{policy}");
    // `doctor --emit-policy | ctguard apply -`
    let mut child = Command::new(env!("CARGO_BIN_EXE_ctguard"))
        .arg("--state-dir")
        .arg(ctg.base.join("state"))
        .arg("--run-dir")
        .arg(ctg.base.join("run"))
        .args(["--json", "--netns", pair.srv.name(), "apply", "-", "--timeout", "60s"])
        .env_remove("SSH_CONNECTION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctguard apply -");
    child.stdin.take().expect("stdin").write_all(policy.as_bytes()).expect("write policy");
    let out = child.wait_with_output().expect("apply");
    crate::txn_cli::ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    crate::txn_cli::ok(&ctg.run(&["confirm", v["data"]["txid"].as_str().expect("txid")]));
    let c0 = pair.srv.conntrack_count();
    let a = udp_queries(&pair.srv, sa(CLI4, 53), 2000, 35000);
    let added = pair.srv.conntrack_count().saturating_sub(c0);
    eprintln!("resolver via doctor | apply -: answered {}/2000, conntrack +{added}", a.answered);
    assert_eq!(a.answered, 2000);
    assert!(added < 20, "conntrack +{added} for 2000 queries");
    assert!(!reaches(&pair.srv, &pair.cli, SocketAddr::new(IpAddr::V4(SPOOF4), 53), sa(SRV4, 9999)));
    let d = ctg.json(&["--netns", pair.srv.name(), "doctor", "--window", "0"]);
    let recs = d["recommendations"].as_array().cloned().unwrap_or_default();
    assert!(recs.iter().all(|r| r["kind"] != "client_flows"), "nothing new after the fix: {d}");
}
