//! Probes (`ctguard::probe`, DESIGN §4) against real sockets between two namespaces: tcp, a
//! hand-written DNS responder, ICMP/ICMPv6 echo (ping socket and raw fallback), exec with kill
//! at the timeout, the spec parser, local-address detection, and the namespace facts they rely
//! on (threads inherit the spawning thread's namespace; a fresh namespace disables ping sockets).

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use ctguard::probe::{aims_at_local_address, run, run_all, Probe, ProbeResult};

use crate::harness::dns::DnsServer;
use crate::harness::{sa, spawn_tool, Ns, Pair, TcpResponder, UdpResponder, CLI4, CLI6, SRV4, SRV6};

/// Timeout of probes expected to fail by silence.
const SHORT: Duration = Duration::from_millis(300);
/// Timeout of probes expected to pass (they return as soon as they do).
const LONG: Duration = Duration::from_secs(3);

fn probe(spec: &str) -> Probe {
    match Probe::parse(spec) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn run_in(ns: &Ns, spec: &str, timeout: Duration) -> ProbeResult {
    let p = probe(spec);
    let r = ns.run(|| run(&p, timeout));
    eprintln!("probe in {}: {r:?}", ns.name());
    r
}

fn assert_ok(r: &ProbeResult) {
    assert!(r.ok, "expected {} to pass: {r:?}", r.probe);
}

/// Failed, with `needle` in the detail.
fn assert_fails(r: &ProbeResult, needle: &str) {
    assert!(!r.ok, "expected {} to fail: {r:?}", r.probe);
    assert!(r.detail.contains(needle), "detail of {} lacks {needle:?}: {r:?}", r.probe);
}

/// Failed after about `timeout`: not sooner, and not much later.
fn assert_times_out(r: &ProbeResult, timeout: Duration) {
    let ms = timeout.as_millis() as u64;
    assert!(!r.ok, "expected {} to fail: {r:?}", r.probe);
    assert!(
        r.elapsed_ms + 5 >= ms && r.elapsed_ms < ms + 700,
        "{} took {} ms, timeout {ms} ms: {r:?}",
        r.probe,
        r.elapsed_ms
    );
}

/// An nft script that adds a rule dropping `what` on input (to `table inet probe_t`).
fn input_drop(what: &str) -> String {
    format!(
        "table inet probe_t {{\n  chain input {{\n    type filter hook input priority 0;\n  }}\n}}\n\
         add rule inet probe_t input {what} drop\n"
    )
}

/// Inode of the calling thread's network namespace.
fn my_netns() -> u64 {
    match std::fs::metadata("/proc/thread-self/ns/net") {
        Ok(m) => m.ino(),
        Err(e) => panic!("/proc/thread-self/ns/net: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Facts

/// A thread spawned by a thread that entered a namespace with `setns` starts in that namespace
/// (clone copies the creating task's nsproxy), also two levels down and as a scoped thread, and
/// so does a process it forks. `run_all` relies on this to run probes concurrently.
#[test]
fn threads_inherit_the_spawning_threads_netns() {
    let ns = Ns::new("probe-thr");
    let want = ns.target().id.1;
    let outside = my_netns();
    assert_ne!(outside, want);
    let (me, child, grandchild, scoped, proc_link) = ns.run(|| {
        let me = my_netns();
        let (child, grandchild) = std::thread::spawn(|| {
            let gc = std::thread::spawn(my_netns).join().unwrap_or(0);
            (my_netns(), gc)
        })
        .join()
        .unwrap_or_default();
        let scoped = std::thread::scope(|s| s.spawn(my_netns).join().unwrap_or(0));
        let link = std::thread::spawn(|| spawn_tool("readlink", &["/proc/self/ns/net"], None, LONG))
            .join()
            .map(|r| r.map(|o| o.stdout.trim().to_string()));
        (me, child, grandchild, scoped, link)
    });
    assert_eq!((me, child, grandchild, scoped), (want, want, want, want));
    assert!(matches!(&proc_link, Ok(Ok(l)) if *l == format!("net:[{want}]")), "{proc_link:?}");
    // The test thread itself never moved.
    assert_eq!(my_netns(), outside);
    eprintln!("netns {want}: entered thread, its child, grandchild, scoped thread and a forked process all in it");
}

/// A fresh namespace has `net.ipv4.ping_group_range` = "1 0" (ping sockets disabled for every
/// gid, root included): the icmp probe falls back to a raw socket; with the range opened to gid
/// 0 it uses a ping socket. The sysctl covers ICMPv6 ping sockets too.
#[test]
fn icmp_ping_socket_or_raw_fallback() {
    let pair = Pair::new("probe-pgr");
    let range = pair.cli.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range"));
    let range: Vec<String> = match range {
        Ok(r) => r.split_whitespace().map(str::to_string).collect(),
        Err(e) => panic!("ping_group_range: {e}"),
    };
    eprintln!("fresh namespace: net.ipv4.ping_group_range = {range:?}");
    assert_eq!(range, ["1", "0"]);
    for spec in [format!("icmp:{SRV4}"), format!("icmp:[{SRV6}]")] {
        let r = run_in(&pair.cli, &spec, LONG);
        assert_ok(&r);
        assert!(r.detail.contains("raw socket"), "{r:?}");
    }
    pair.cli.sysctl_write("net.ipv4.ping_group_range", "0 0");
    for spec in [format!("icmp:{SRV4}"), format!("icmp:[{SRV6}]")] {
        let r = run_in(&pair.cli, &spec, LONG);
        assert_ok(&r);
        assert!(r.detail.contains("ping socket"), "{r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// tcp

#[test]
fn tcp_connect_refused_and_dropped() {
    let pair = Pair::new("probe-tcp");
    let _l4 = TcpResponder::start(&pair.srv, sa(SRV4, 2222));
    let l6 = TcpResponder::start(&pair.srv, sa(SRV6, 2222));
    assert_ok(&run_in(&pair.cli, &format!("tcp:{SRV4}:2222"), LONG));
    assert_ok(&run_in(&pair.cli, &format!("tcp:[{SRV6}]:2222"), LONG));
    assert_eq!(l6.wait_accepted(1, LONG), 1);

    // Closed port: RST at once.
    let r = run_in(&pair.cli, &format!("tcp:{SRV4}:2223"), SHORT);
    assert_fails(&r, "ECONNREFUSED");
    assert!(r.elapsed_ms < 200, "{r:?}");
    assert_fails(&run_in(&pair.cli, &format!("tcp:[{SRV6}]:2223"), SHORT), "ECONNREFUSED");

    // SYN dropped: fails at the timeout.
    let _l = TcpResponder::start(&pair.srv, sa(SRV4, 2224));
    pair.srv.nft(&input_drop("tcp dport 2224"));
    for spec in [format!("tcp:{SRV4}:2224"), format!("tcp:[{SRV6}]:2224")] {
        let r = run_in(&pair.cli, &spec, SHORT);
        assert_times_out(&r, SHORT);
        assert_fails(&r, "within 300 ms");
    }
}

// ---------------------------------------------------------------------------------------------
// udp-dns

#[test]
fn udp_dns_answer_drop_echo_and_closed() {
    let pair = Pair::new("probe-dns");
    let dns4 = DnsServer::start(&pair.srv, sa(SRV4, 53));
    let _dns6 = DnsServer::start(&pair.srv, sa(SRV6, 53));
    let r = run_in(&pair.cli, &format!("udp-dns:{SRV4}:53:example.org"), LONG);
    assert_ok(&r);
    assert!(r.detail.contains("NOERROR") && r.detail.contains("1 answer"), "{r:?}");
    assert_eq!(dns4.answered(), 1);
    let r = run_in(&pair.cli, &format!("udp-dns:[{SRV6}]:53:example.org."), LONG);
    assert_ok(&r);
    // Any rcode proves reachability; it is reported.
    let r = run_in(&pair.cli, &format!("udp-dns:{SRV4}:53:nxdomain.example"), LONG);
    assert_ok(&r);
    assert!(r.detail.contains("NXDOMAIN"), "{r:?}");

    // Dropped by srv: fails at the timeout.
    let _dropped = DnsServer::start(&pair.srv, sa(SRV4, 5353));
    pair.srv.nft(&input_drop("udp dport 5353"));
    let r = run_in(&pair.cli, &format!("udp-dns:{SRV4}:5353:example.org"), SHORT);
    assert_times_out(&r, SHORT);
    assert_fails(&r, "no DNS response");

    // An echo (the query back, QR clear) is no DNS answer.
    let echo = UdpResponder::start(&pair.srv, sa(SRV4, 5354));
    let r = run_in(&pair.cli, &format!("udp-dns:{SRV4}:5354:example.org"), SHORT);
    assert_times_out(&r, SHORT);
    assert_fails(&r, "1 datagram(s) ignored");
    assert_eq!(echo.replies(), 1);

    // Nothing listening: ICMP port unreachable, at once.
    let r = run_in(&pair.cli, &format!("udp-dns:{SRV4}:5355:example.org"), SHORT);
    assert_fails(&r, "ECONNREFUSED");
    assert!(r.elapsed_ms < 200, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// icmp

#[test]
fn icmp_both_ways_and_dropped() {
    let pair = Pair::new("probe-icmp");
    for (ns, v4, v6) in [(&pair.cli, SRV4, SRV6), (&pair.srv, CLI4, CLI6)] {
        assert_ok(&run_in(ns, &format!("icmp:{v4}"), LONG));
        assert_ok(&run_in(ns, &format!("icmp:[{v6}]"), LONG));
        assert_ok(&run_in(ns, &format!("icmp:{v6}"), LONG));
    }
    pair.srv.nft(&input_drop("icmp type echo-request"));
    pair.srv.nft(&input_drop("icmpv6 type echo-request"));
    for spec in [format!("icmp:{SRV4}"), format!("icmp:[{SRV6}]")] {
        let r = run_in(&pair.cli, &spec, SHORT);
        assert_times_out(&r, SHORT);
        assert_fails(&r, "no echo reply");
    }
    // The other direction is untouched (srv's output and cli's input accept).
    assert_ok(&run_in(&pair.srv, &format!("icmp:{CLI4}"), LONG));
}

// ---------------------------------------------------------------------------------------------
// exec

/// Pids whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[test]
fn exec_exit_status_timeout_and_missing() {
    let ns = Ns::new("probe-exec");
    let r = run_in(&ns, "exec:true", LONG);
    assert_ok(&r);
    assert_eq!(r.detail, "exit 0");
    assert_fails(&run_in(&ns, "exec:false", LONG), "exit 1");
    let r = run_in(&ns, "exec:echo hello   'big world'", LONG);
    assert_ok(&r);
    assert_eq!(r.detail, "exit 0: hello big world");
    assert_fails(&run_in(&ns, "exec:sh -c 'echo oops >&2; exit 3'", LONG), "exit 3: oops");

    // Runs in the calling thread's namespace.
    let r = run_in(&ns, "exec:/usr/bin/readlink /proc/self/ns/net", LONG);
    assert_ok(&r);
    assert_eq!(r.detail, format!("exit 0: net:[{}]", ns.target().id.1));

    // Killed at the timeout, with its whole process group (sh and its sleep).
    let r = run_in(&ns, "exec:sleep 5.4321", SHORT);
    assert_times_out(&r, SHORT);
    assert_fails(&r, "killed");
    let r = run_in(&ns, "exec:sh -c 'sleep 6.4321; true'", SHORT);
    assert_times_out(&r, SHORT);
    assert_fails(&r, "killed");
    let deadline = Instant::now() + Duration::from_secs(1);
    while !(pids_running(&["sleep", "5.4321"]).is_empty() && pids_running(&["sleep", "6.4321"]).is_empty()) {
        assert!(Instant::now() < deadline, "a timed-out probe's process survived");
        std::thread::sleep(Duration::from_millis(10));
    }

    let r = run_in(&ns, "exec:ctguard-no-such-command --x", LONG);
    assert_fails(&r, "ctguard-no-such-command: command not found in PATH");
    let r = run_in(&ns, "exec:/nonexistent/ctguard-probe", LONG);
    assert_fails(&r, "cannot run /nonexistent/ctguard-probe: ENOENT");
}

// ---------------------------------------------------------------------------------------------
// Concurrency

/// `run_all` runs the probes concurrently in the caller's namespace: three that time out take
/// one timeout, not three; results come back in order.
#[test]
fn run_all_concurrent_in_callers_netns() {
    let pair = Pair::new("probe-all");
    let _l = TcpResponder::start(&pair.srv, sa(SRV4, 2222));
    let _dns = DnsServer::start(&pair.srv, sa(SRV4, 53));
    pair.srv.nft(&input_drop("tcp dport 2224"));
    let probes: Vec<Probe> = [
        format!("tcp:{SRV4}:2222"),
        format!("tcp:{SRV4}:2224"),
        format!("udp-dns:{SRV4}:53:example.org"),
        format!("icmp:[{SRV6}]"),
        "exec:sleep 5".to_string(),
        format!("udp-dns:{SRV4}:5356:example.org"),
        "exec:readlink /proc/self/ns/net".to_string(),
        format!("icmp:{SRV4}"),
    ]
    .iter()
    .map(|s| probe(s))
    .collect();
    let timeout = Duration::from_millis(400);
    let start = Instant::now();
    let results = pair.cli.run(|| run_all(&probes, timeout));
    let took = start.elapsed();
    for r in &results {
        eprintln!("{r:?}");
    }
    let oks: Vec<bool> = results.iter().map(|r| r.ok).collect();
    assert_eq!(oks, [true, false, true, true, false, false, true, true]);
    for (r, p) in results.iter().zip(&probes) {
        assert_eq!(r.probe, p.to_string());
    }
    assert_eq!(results[6].detail, format!("exit 0: net:[{}]", pair.cli.target().id.1));
    assert!(took < Duration::from_millis(1000), "run_all took {took:?}: not concurrent?");
    // Sequentially the two silent ones alone take 2 × 400 ms.
    assert!(took >= timeout, "{took:?}");
}

// ---------------------------------------------------------------------------------------------
// Parsing (no kernel needed)

#[test]
fn parse_all_forms() {
    use std::net::IpAddr;
    let v4: IpAddr = SRV4.into();
    let v6: IpAddr = SRV6.into();
    let cases: Vec<(&str, Probe)> = vec![
        ("tcp:198.18.0.1:22", Probe::Tcp { host: v4, port: 22 }),
        ("tcp:[fd42::1]:22", Probe::Tcp { host: v6, port: 22 }),
        ("tcp:[::ffff:198.18.0.1]:65535", Probe::Tcp { host: "::ffff:198.18.0.1".parse().expect("ip"), port: 65535 }),
        ("udp-dns:198.18.0.1:53:example.org", Probe::UdpDns { host: v4, port: 53, name: "example.org".into() }),
        ("udp-dns:[fd42::1]:5353:Ex-1.ORG.", Probe::UdpDns { host: v6, port: 5353, name: "Ex-1.ORG.".into() }),
        ("icmp:198.18.0.1", Probe::Icmp { host: v4 }),
        ("icmp:fd42::1", Probe::Icmp { host: v6 }),
        ("icmp:[fd42::1]", Probe::Icmp { host: v6 }),
        (" exec:/bin/true ", Probe::Exec { argv: vec!["/bin/true".into()] }),
        (
            "exec:sh -c 'exit 0'  \"a \\\"b\\\"\" c\\ d",
            Probe::Exec { argv: vec!["sh".into(), "-c".into(), "exit 0".into(), "a \"b\"".into(), "c d".into()] },
        ),
    ];
    for (spec, want) in cases {
        let got = match Probe::parse(spec) {
            Ok(p) => p,
            Err(e) => panic!("{spec}: {e}"),
        };
        assert_eq!(got, want, "{spec}");
        // The canonical form parses back, and is the serde form.
        assert_eq!(Probe::parse(&got.to_string()).ok(), Some(got.clone()), "{got}");
        let json = serde_json::to_string(&got).expect("serialize");
        assert_eq!(serde_json::from_str::<Probe>(&json).ok(), Some(got));
    }
    assert_eq!(probe("tcp:[fd42::1]:22").to_string(), "tcp:[fd42::1]:22");
    assert_eq!(probe("icmp:fd42::1").to_string(), "icmp:[fd42::1]");
    assert!(serde_json::from_str::<Probe>("\"tcp:localhost:22\"").is_err());
}

#[test]
fn parse_refuses_bad_specs_with_reason() {
    let bad: &[(&str, &str)] = &[
        ("", "empty"),
        ("tcp", "no KIND: prefix"),
        ("http:198.18.0.1:80", "unknown probe kind \"http\""),
        (":198.18.0.1", "missing KIND"),
        ("tcp:localhost:22", "HOST \"localhost\" is not an IP address"),
        ("tcp:srv.example.org:22", "must be an IP literal"),
        ("tcp:198.18.0.1", "missing PORT"),
        ("tcp::22", "missing HOST"),
        ("tcp:198.18.0.1:0", "PORT \"0\" is not a usable port"),
        ("tcp:198.18.0.1:70000", "PORT \"70000\" is out of range"),
        ("tcp:198.18.0.1:ssh", "PORT \"ssh\" is not a number"),
        ("tcp:198.18.0.1:", "PORT \"\" is missing"),
        ("tcp:198.18.0.1:22:x", "too many"),
        ("tcp:fd42::1:22", "IPv6 HOST goes in brackets"),
        ("tcp:[fd42::1:22", "'[' without ']'"),
        ("tcp:[198.18.0.1]:22", "HOST \"198.18.0.1\" is not an IP address"),
        ("tcp:[fd42::1]22", "unexpected \"22\" after HOST"),
        ("udp-dns:198.18.0.1:53", "missing NAME"),
        ("udp-dns:198.18.0.1:53:", "NAME \"\" is not a valid DNS name: it is empty"),
        ("udp-dns:198.18.0.1:53:.", "root"),
        ("udp-dns:198.18.0.1:53:a..b", "empty label"),
        ("udp-dns:198.18.0.1:53:a_b.example", "label \"a_b\" contains '_'"),
        ("udp-dns:198.18.0.1:53:bad label", "contains ' '"),
        ("udp-dns:[fd42::1]:53:x:y", "contains ':'"),
        ("udp-dns:198.18.0.1:0:example.org", "PORT \"0\""),
        ("icmp:", "missing HOST"),
        ("icmp:gateway", "HOST \"gateway\" is not an IP address"),
        ("exec:", "needs a command"),
        ("exec:   ", "needs a command"),
        ("exec:'' x", "empty word"),
        ("exec:./probe.sh", "absolute path or a bare name"),
        ("exec:sh -c 'unterminated", "unterminated ' quote"),
        ("exec:x\\", "trailing backslash"),
    ];
    let long_label = format!("udp-dns:198.18.0.1:53:{}.example", "a".repeat(64));
    let long_name = format!("udp-dns:198.18.0.1:53:{}", ["abcdefghi"; 26].join("."));
    let extra = [(long_label.as_str(), "has 64 characters (at most 63)"), (long_name.as_str(), "(at most 253)")];
    for (spec, reason) in bad.iter().chain(extra.iter()) {
        match Probe::parse(spec) {
            Ok(p) => panic!("{spec:?} parsed as {p:?}"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(&format!("{spec:?}")), "error does not name the spec: {text}");
                assert!(text.contains(reason), "error for {spec:?} lacks {reason:?}: {text}");
                assert_eq!(e.spec(), *spec);
            }
        }
    }
    // 253 characters exactly is fine (and with the trailing dot too).
    let name = format!("{}.{}", ["abcdefghi"; 24].join("."), "a".repeat(13));
    assert_eq!(name.len(), 253);
    assert!(Probe::parse(&format!("udp-dns:198.18.0.1:53:{name}.")).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Local addresses

#[test]
fn local_addresses_seen_from_the_namespace() {
    let pair = Pair::new("probe-local");
    // An AnyIP route: every address in it is local to srv without being on an interface.
    pair.srv.exec("ip", &["route", "add", "local", "198.19.7.0/24", "dev", "lo"]);
    let local_in_srv = [
        "tcp:127.0.0.1:22".to_string(),
        "icmp:127.9.9.9".to_string(),
        "tcp:[::1]:22".to_string(),
        "tcp:0.0.0.0:22".to_string(),
        format!("icmp:{SRV4}"),
        format!("udp-dns:[{SRV6}]:53:example.org"),
        format!("tcp:[::ffff:{SRV4}]:22"),
        "icmp:198.19.7.9".to_string(),
    ];
    let remote_from_srv =
        [format!("tcp:{CLI4}:22"), format!("icmp:[{CLI6}]"), "icmp:198.18.0.77".to_string(), "exec:true".to_string()];
    let srv_view: Vec<(String, bool)> = pair.srv.run(|| {
        local_in_srv.iter().chain(&remote_from_srv).map(|s| (s.clone(), aims_at_local_address(&probe(s)))).collect()
    });
    for (spec, local) in &srv_view {
        let want = local_in_srv.contains(spec);
        assert_eq!(*local, want, "in srv, {spec} local = {local}");
    }
    // From cli, srv's addresses (and the AnyIP range) are remote; its own and loopback are not.
    let cli_view: Vec<(String, bool)> = pair.cli.run(|| {
        [
            format!("icmp:{SRV4}"),
            format!("icmp:[{SRV6}]"),
            "icmp:198.19.7.9".into(),
            format!("icmp:{CLI4}"),
            "icmp:::1".into(),
        ]
        .into_iter()
        .map(|s| {
            let l = aims_at_local_address(&probe(&s));
            (s, l)
        })
        .collect()
    });
    let want_cli = [false, false, false, true, true];
    for ((spec, local), want) in cli_view.iter().zip(want_cli) {
        assert_eq!(*local, want, "in cli, {spec} local = {local}");
    }
}
