//! Proof of a new connection (DESIGN §4) against a real OpenSSH server: `srv` runs sshd (its own
//! host key and authorized key in a temp dir), `cli` runs the ssh client; over ssh a `sleep`
//! with a unique argument stands for ctguard, and the test identifies its origin from `/proc`
//! the way the agent does (`agent::proof::origin_of`), checked against the client's own socket.
//!
//! Facts are printed with `eprintln!` (`cargo test --test kernel proof -- --nocapture`).

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ctguard::agent::proof::{
    check_confirm, environ_var, origin_of, parse_proc_net_tcp, parse_ssh_connection, same_connection, socket_inode,
    Origin, ProofError, RefusalReason, SshConn4, Via, TCP_ESTABLISHED,
};

use crate::harness::sshd::{argv_of, descendants, ssh, ssh_spawn, wait_process, Sshd, SshdOptions};
use crate::harness::{sa, Pair, CLI4, CLI6, SRV4, SRV6};

const WAIT: Duration = Duration::from_secs(10);

/// The parts of an SSH origin; fails the test on anything else.
fn ssh_parts(o: &Origin) -> (SshConn4, Option<i32>, Via) {
    match o {
        Origin::Ssh { conn, sshd_pid, via, .. } => (*conn, *sshd_pid, *via),
        Origin::Local { .. } => panic!("expected an SSH origin, got {o}"),
    }
}

fn origin(pid: i32) -> Origin {
    match origin_of(pid) {
        Ok(o) => o,
        Err(e) => panic!("origin_of({pid}): {e}"),
    }
}

fn title(pid: i32) -> String {
    argv_of(pid).join(" ").trim_end().to_string()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim_end().to_string()
}

fn ppid(pid: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().nth(1)).and_then(|p| p.parse().ok()).unwrap_or(0)
}

/// `pid ← parent ← …` up to the first sshd listener or init, for the record.
fn chain(pid: i32) -> String {
    let mut out = Vec::new();
    let mut p = pid;
    while p > 1 && out.len() < 12 {
        out.push(format!("{p} {:?} [{}]", title(p), comm(p)));
        if title(p).contains("[listener]") {
            break;
        }
        p = ppid(p);
    }
    out.join(" <- ")
}

fn has_sshd_ancestor(pid: i32) -> bool {
    let mut p = ppid(pid);
    let mut n = 0;
    while p > 1 && n < 4096 {
        if matches!(comm(p).as_str(), "sshd" | "sshd-session") {
            return true;
        }
        p = ppid(p);
        n += 1;
    }
    false
}

fn ssh_connection_env(pid: i32) -> Option<SshConn4> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    environ_var(&raw, "SSH_CONNECTION").map(|v| match parse_ssh_connection(&v) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    })
}

/// Established TCP connections of process `pid` (from its own namespace's tables).
fn established(pid: i32) -> Vec<SshConn4> {
    let mut inodes = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Some(i) = std::fs::read_link(e.path()).ok().and_then(|l| socket_inode(&l.to_string_lossy())) {
                inodes.push(i);
            }
        }
    }
    let mut out = Vec::new();
    for f in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
        let table = match parse_proc_net_tcp(&text) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        for e in table {
            if e.state == TCP_ESTABLISHED && inodes.contains(&e.inode) {
                out.push(SshConn4 { client: e.local, server: e.remote });
            }
        }
    }
    out
}

/// The ssh client's view of its connection to `server`: (its local address, the server).
fn client_side(client_pid: i32, server: SocketAddr) -> Vec<SshConn4> {
    established(client_pid).into_iter().filter(|c| c.server == server).collect()
}

/// Checks an origin found over ssh against the client's own socket and the sshd process tree.
fn check_ssh_origin(o: &Origin, sshd: &Sshd, client_pid: i32, client_ip: IpAddr) -> (SshConn4, i32) {
    let (conn, sshd_pid, via) = ssh_parts(o);
    assert_eq!(via, Via::Ancestry, "{o}");
    assert_eq!(conn.server, sshd.addr(), "{o}");
    assert_eq!(conn.client.ip(), client_ip, "{o}");
    assert!(conn.client.port() >= 1024, "{o}");
    assert_eq!(client_side(client_pid, conn.server), vec![conn], "the client's own socket disagrees with {o}");
    let Some(sshd_pid) = sshd_pid else { panic!("no sshd pid in {o}") };
    assert!(descendants(sshd.pid()).contains(&sshd_pid), "{sshd_pid} is not below the test's sshd");
    (conn, sshd_pid)
}

#[test]
fn proof_origin_over_ssh_with_and_without_pty() {
    let pair = Pair::new("proof-pty");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    eprintln!("proof: listener {} {:?}", sshd.pid(), title(sshd.pid()));
    for (tty, secs) in [(false, "3601"), (true, "3602")] {
        let client = ssh_spawn(&pair.cli, &sshd, &[], &["sleep", secs], tty);
        let pid = wait_process(&pair.srv, &["sleep", secs], WAIT);
        let o = origin(pid);
        let (conn, sshd_pid) = check_ssh_origin(&o, &sshd, client.pid(), CLI4.into());
        let t = title(sshd_pid);
        if tty {
            assert!(t.starts_with("sshd: root@pts/") || t.starts_with("sshd-session: root@pts/"), "{t:?}");
        } else {
            assert!(t == "sshd: root@notty" || t == "sshd-session: root@notty", "{t:?}");
        }
        // Untouched environment: SSH_CONNECTION agrees with the socket.
        assert_eq!(ssh_connection_env(pid), Some(conn));
        // Which processes of the connection hold its socket (root login: no [priv] split).
        let holders: Vec<String> = std::iter::once(sshd.pid())
            .chain(descendants(sshd.pid()))
            .filter(|&p| established(p).contains(&SshConn4 { client: conn.server, server: conn.client }))
            .map(|p| format!("{p} {:?}", title(p)))
            .collect();
        eprintln!("proof: tty={tty}: {}\nproof:   origin {o}; socket held by {holders:?}", chain(pid));
        assert_eq!(holders, vec![format!("{sshd_pid} {t:?}")]);
    }
}

#[test]
fn proof_stripped_environment_still_identified() {
    let pair = Pair::new("proof-envi");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    // What sudo and Ansible `become` do to SSH_CONNECTION.
    let client = ssh_spawn(&pair.cli, &sshd, &[], &["env", "-i", "sleep", "3611"], false);
    let pid = wait_process(&pair.srv, &["sleep", "3611"], WAIT);
    assert_eq!(ssh_connection_env(pid), None);
    let o = origin(pid);
    check_ssh_origin(&o, &sshd, client.pid(), CLI4.into());
    eprintln!("proof: env -i: {} -> {o}", chain(pid));
}

/// A detached process keeps `SSH_CONNECTION`: recorded as an unverified claim (`Via::Env`), which
/// is no evidence for a confirm.
#[test]
fn proof_detached_process_claims_by_environment() {
    let pair = Pair::new("proof-setsid");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    // Daemonised: reparented away from sshd, environment kept (it holds the session's pipes,
    // so the connection stays up).
    let client = ssh_spawn(&pair.cli, &sshd, &[], &["setsid", "-f", "sleep", "3621"], false);
    let pid = wait_process(&pair.srv, &["sleep", "3621"], WAIT);
    let deadline = Instant::now() + WAIT;
    while has_sshd_ancestor(pid) {
        assert!(Instant::now() < deadline, "sleep {pid} stays under sshd: {}", chain(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = origin(pid);
    let (conn, sshd_pid, via) = ssh_parts(&o);
    assert_eq!((via, sshd_pid), (Via::Env, None), "{o}");
    assert_eq!(conn.server, sshd.addr());
    assert_eq!(client_side(client.pid(), conn.server), vec![conn]);
    assert_eq!(o.verified_conn(), None, "{o}");
    assert!(o.to_string().contains("UNVERIFIED SSH_CONNECTION claim"), "{o}");
    eprintln!("proof: setsid -f: {} -> {o}", chain(pid));
}

/// A process started by the test, detached and with an empty environment: Local.
fn detached_local(pair: &Pair, secs: &str) -> i32 {
    let status = pair.srv.run(|| {
        Command::new("/usr/bin/setsid")
            .args(["-f", "sleep", secs])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    });
    assert!(matches!(status, Ok(s) if s.success()), "setsid: {status:?}");
    wait_process(&pair.srv, &["sleep", secs], WAIT)
}

#[test]
fn proof_same_and_different_connections() {
    let pair = Pair::new("proof-conf");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    // Connection 1 runs two processes (timeout and its sleep); connection 2 one.
    let c1 = ssh_spawn(&pair.cli, &sshd, &[], &["timeout", "120", "sleep", "3631"], false);
    let c2 = ssh_spawn(&pair.cli, &sshd, &[], &["sleep", "3632"], true);
    let p1a = wait_process(&pair.srv, &["timeout", "120", "sleep", "3631"], WAIT);
    let p1b = wait_process(&pair.srv, &["sleep", "3631"], WAIT);
    let p2 = wait_process(&pair.srv, &["sleep", "3632"], WAIT);
    let (o1a, o1b, o2) = (origin(p1a), origin(p1b), origin(p2));
    check_ssh_origin(&o1a, &sshd, c1.pid(), CLI4.into());
    check_ssh_origin(&o2, &sshd, c2.pid(), CLI4.into());
    assert!(same_connection(&o1a, &o1b), "{o1a} vs {o1b}");
    assert!(!same_connection(&o1b, &o2), "{o1b} vs {o2}");

    // A confirm over the connection that applied: refused, pointing at a new connection.
    let refusal = match check_confirm(&o1a, &o1b) {
        Err(r) => r,
        Ok(()) => panic!("same-connection confirm accepted"),
    };
    let msg = refusal.to_string();
    eprintln!("proof: refusal: {msg}");
    assert!(msg.contains("same SSH connection") && msg.contains("NEW connection"), "{msg}");
    assert!(msg.contains("`ssh -o ControlPath=none 198.18.0.1 ctguard confirm`"), "{msg}");
    // From another connection: accepted.
    assert_eq!(check_confirm(&o1a, &o2), Ok(()));
    // A local process (no sshd ancestor) does not confirm a change applied over SSH.
    let local_pid = detached_local(&pair, "3639");
    let local = origin(local_pid);
    assert!(matches!(local, Origin::Local { .. }), "{local}: {}", chain(local_pid));
    let refused = check_confirm(&o1a, &local).map_err(|r| r.reason);
    assert!(matches!(refused, Err(RefusalReason::NoIdentifier | RefusalReason::NotOverSsh)), "{refused:?}");
    assert!(!same_connection(&local, &local));
    // … but confirms a local apply, as before.
    assert_eq!(check_confirm(&local, &local), Ok(()));
    assert_eq!(check_confirm(&local, &o2), Ok(()));
}

#[test]
fn proof_multiplexed_session_is_the_same_connection() {
    let pair = Pair::new("proof-mux");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    let ctl = sshd.dir().join("mux");
    let ctl_opt = format!("ControlPath={}", ctl.display());
    let master = ssh_spawn(
        &pair.cli,
        &sshd,
        &["-o", "ControlMaster=yes", "-o", &ctl_opt, "-o", "ControlPersist=no"],
        &["sleep", "3641"],
        false,
    );
    let pm = wait_process(&pair.srv, &["sleep", "3641"], WAIT);
    let deadline = Instant::now() + WAIT;
    while !ctl.exists() {
        assert!(Instant::now() < deadline, "no control socket: {}", master.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let _second = ssh_spawn(&pair.cli, &sshd, &["-o", "ControlMaster=no", "-o", &ctl_opt], &["sleep", "3642"], false);
    let ps = wait_process(&pair.srv, &["sleep", "3642"], WAIT);
    let (om, os) = (origin(pm), origin(ps));
    check_ssh_origin(&om, &sshd, master.pid(), CLI4.into());
    eprintln!("proof: ControlMaster: {}\nproof:   and {}", chain(pm), chain(ps));
    assert!(same_connection(&om, &os), "{om} vs {os}");
    assert!(check_confirm(&om, &os).is_err());
    // Without multiplexing: a new connection.
    let _third = ssh_spawn(&pair.cli, &sshd, &["-o", "ControlPath=none"], &["sleep", "3643"], false);
    let pt = wait_process(&pair.srv, &["sleep", "3643"], WAIT);
    assert_eq!(check_confirm(&om, &origin(pt)), Ok(()));
}

#[test]
fn proof_forwarded_connections_do_not_confuse_it() {
    let pair = Pair::new("proof-fwd");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    // -L: the session process opens a TCP connection to srv's own sshd for each forwarded one.
    let fwd = "127.0.0.1:10022:198.18.0.1:22";
    let client = ssh_spawn(&pair.cli, &sshd, &["-L", fwd], &["sleep", "3651"], false);
    let pid = wait_process(&pair.srv, &["sleep", "3651"], WAIT);
    let before = origin(pid);
    let (conn, sshd_pid) = check_ssh_origin(&before, &sshd, client.pid(), CLI4.into());
    let deadline = Instant::now() + WAIT;
    let _stream = loop {
        if let Ok(s) = pair.cli.run(|| TcpStream::connect_timeout(&sa(std::net::Ipv4Addr::LOCALHOST, 10022), WAIT)) {
            break s;
        }
        assert!(Instant::now() < deadline, "the -L listener never came up: {}", client.stderr());
        std::thread::sleep(Duration::from_millis(20));
    };
    while established(sshd_pid).len() < 2 {
        assert!(Instant::now() < deadline, "sshd {sshd_pid} opened no forwarded connection");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("proof: -L: sshd {sshd_pid} holds {:?}", established(sshd_pid));
    let after = origin(pid);
    assert_eq!(ssh_parts(&after).0, conn, "{after}");
}

#[test]
fn proof_ipv6_and_another_port() {
    let pair = Pair::new("proof-v6");
    let sshd = Sshd::start(&pair.srv, SRV6.into(), 2222);
    let client = ssh_spawn(&pair.cli, &sshd, &[], &["sleep", "3661"], false);
    let pid = wait_process(&pair.srv, &["sleep", "3661"], WAIT);
    let o = origin(pid);
    let (conn, _) = check_ssh_origin(&o, &sshd, client.pid(), CLI6.into());
    assert_eq!(conn.server, sa(SRV6, 2222));
    let msg = match check_confirm(&o, &o) {
        Err(r) => r.to_string(),
        Ok(()) => panic!("same-connection confirm accepted"),
    };
    assert!(msg.contains("`ssh -o ControlPath=none -p 2222 fd42::1 ctguard confirm`"), "{msg}");
    // A real exchange over the same server, for good measure.
    let out = ssh(&pair.cli, &sshd, &["echo", "ok"], false);
    assert!(out.success() && out.stdout.trim() == "ok", "{out:?}");
    eprintln!("proof: IPv6: {o}");
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SYS_PTRACE: u32 = 19;

/// Runs `f` on a thread whose effective set lacks CAP_SYS_PTRACE (capabilities are per thread).
fn without_cap_sys_ptrace<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut hdr = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
            let mut data = [CapData::default(); 2];
            // SAFETY: hdr and data are valid capget/capset arguments for version 3 (two structs).
            let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr as *mut CapHeader, data.as_mut_ptr()) };
            assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
            data[0].effective &= !(1 << CAP_SYS_PTRACE);
            // SAFETY: as above; only this thread's effective set changes.
            let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
            assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

#[test]
fn proof_unreadable_sshd_is_refused_not_local() {
    let pair = Pair::new("proof-cap");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    let _client = ssh_spawn(&pair.cli, &sshd, &[], &["env", "-i", "sleep", "3671"], false);
    let pid = wait_process(&pair.srv, &["sleep", "3671"], WAIT);
    let (_, sshd_pid, _) = ssh_parts(&origin(pid));
    let Some(sshd_pid) = sshd_pid else { panic!("no sshd pid") };
    // OpenSSH marks the session non-dumpable: its fds need CAP_SYS_PTRACE even for root.
    let status = std::fs::read_to_string(format!("/proc/{sshd_pid}/status")).unwrap_or_default();
    let res = without_cap_sys_ptrace(|| {
        let fd = std::fs::read_link(format!("/proc/{sshd_pid}/fd/0")).map_err(|e| e.to_string());
        (fd, origin_of(pid))
    });
    eprintln!("proof: without CAP_SYS_PTRACE: readlink /proc/{sshd_pid}/fd/0 → {:?}; origin → {:?}", res.0, res.1);
    assert!(res.0.is_err(), "sshd {sshd_pid} is dumpable? {status}");
    match res.1 {
        Err(ProofError::UnidentifiedSsh { pid: p, reason }) => {
            assert_eq!(p, pid);
            assert!(reason.contains(&format!("sshd {sshd_pid}")), "{reason}");
        }
        other => panic!("expected UnidentifiedSsh, got {other:?}"),
    }
}

/// `UsePAM yes` (Debian's `/etc/pam.d/sshd` with `pam_loginuid`): every connection gets its own
/// audit session id; a double fork out of the sshd tree keeps it, so a detached process of the
/// applying connection is recognised by it.
#[test]
fn proof_pam_audit_session_per_connection_survives_a_double_fork() {
    let pair = Pair::new("proof-pam");
    let opts = SshdOptions { use_pam: true, ..Default::default() };
    let sshd = Sshd::start_with(&pair.srv, SRV4.into(), 22, &opts);
    let c1 =
        ssh_spawn(&pair.cli, &sshd, &[], &["(env -i sleep 3683 </dev/null >/dev/null 2>&1 &); exec sleep 3681"], false);
    let c2 = ssh_spawn(&pair.cli, &sshd, &[], &["sleep", "3682"], false);
    let p1 = wait_process(&pair.srv, &["sleep", "3681"], WAIT);
    let p2 = wait_process(&pair.srv, &["sleep", "3682"], WAIT);
    let pd = wait_process(&pair.srv, &["sleep", "3683"], WAIT);
    let deadline = Instant::now() + WAIT;
    while has_sshd_ancestor(pd) {
        assert!(Instant::now() < deadline, "sleep {pd} stays under sshd: {}", chain(pd));
        std::thread::sleep(Duration::from_millis(10));
    }
    let raw = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/sessionid")).unwrap_or_default();
    eprintln!(
        "proof: PAM: sessionid listener {} conn1 {} conn2 {} detached {} (chain {})",
        raw(sshd.pid()),
        raw(p1),
        raw(p2),
        raw(pd),
        chain(pd)
    );
    let (o1, o2, od) = (origin(p1), origin(p2), origin(pd));
    check_ssh_origin(&o1, &sshd, c1.pid(), CLI4.into());
    check_ssh_origin(&o2, &sshd, c2.pid(), CLI4.into());
    eprintln!("proof: PAM: {o1}\nproof:   {o2}\nproof:   detached: {od}");
    let (s1, s2) = (o1.session().audit_session, o2.session().audit_session);
    assert!(s1.is_some() && s2.is_some(), "pam_loginuid set no audit session id: {o1} / {o2}\n{}", sshd.log());
    assert_ne!(s1, s2, "two connections, one audit session");
    assert_eq!(s1.map(|s| s.to_string()), Some(raw(p1).trim().to_string()));
    assert_eq!(o1.session().login_uid, Some(0));
    assert!(matches!(od, Origin::Local { .. }), "{od}");
    assert_eq!(od.session().audit_session, s1, "the double fork lost its audit session: {od}");
    // The detached process is refused by its audit session; the other connection confirms.
    let refused = check_confirm(&o1, &od).map_err(|r| r.reason);
    assert_eq!(refused, Err(RefusalReason::SameAuditSession(s1.unwrap_or_default())));
    assert_eq!(check_confirm(&o1, &o2), Ok(()));
}

/// `UsePAM no` (the harness default): no per-connection audit session; the listener's (inherited
/// from whoever started sshd) is dropped, the connection alone identifies.
#[test]
fn proof_without_pam_no_audit_session_is_taken_from_the_listener() {
    let pair = Pair::new("proof-nopam");
    let sshd = Sshd::start(&pair.srv, SRV4.into(), 22);
    let c = ssh_spawn(&pair.cli, &sshd, &[], &["sleep", "3691"], false);
    let p = wait_process(&pair.srv, &["sleep", "3691"], WAIT);
    let o = origin(p);
    check_ssh_origin(&o, &sshd, c.pid(), CLI4.into());
    let listener = std::fs::read_to_string(format!("/proc/{}/sessionid", sshd.pid())).unwrap_or_default();
    let mine = std::fs::read_to_string(format!("/proc/{p}/sessionid")).unwrap_or_default();
    eprintln!("proof: no PAM: sessionid listener {listener:?}, connection {mine:?}: {o}");
    assert_eq!(listener, mine, "without PAM the connection inherits the listener's audit session");
    assert_eq!(o.session().audit_session, None, "{o}");
    assert_eq!(o.session().scope, None, "{o}");
}
