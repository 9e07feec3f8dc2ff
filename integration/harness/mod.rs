//! Real-kernel test harness: throw-away network namespaces, a veth pair between two of them,
//! UDP/TCP responders and a fast UDP query generator.
//!
//! Everything here is bounded: every tool runs with a timeout, every loop has a deadline, and
//! every namespace is removed on `Drop` (also when the test panics). Traffic only ever goes to
//! addresses inside the test's own namespaces (198.18.0.0/24, fd42::/64) or their loopback.
//! Tools are spawned from a thread that entered the namespace (`setns`), never through a shell.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ctguard::backend::exec::Tool;
use ctguard::netns::{Target, TargetSpec};

/// Longest any single tool invocation may run before it is killed and the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Server side of a [`Pair`].
pub const SRV4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Client side of a [`Pair`].
pub const CLI4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Server side of a [`Pair`], IPv6.
pub const SRV6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, 1);
/// Client side of a [`Pair`], IPv6.
pub const CLI6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, 2);
/// Name of the veth end in both namespaces of a [`Pair`].
pub const PAIR_IFACE: &str = "veth0";

/// Bytes read so far from a child's pipe by [`drain`].
pub type Captured = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// Reads `pipe` to its end on a thread, collecting everything; the buffer can be read at any
/// time (what a terminal showed so far, what a client logged so far).
pub fn drain(mut pipe: impl std::io::Read + Send + 'static) -> (Captured, std::thread::JoinHandle<()>) {
    let out: Captured = Default::default();
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.extend_from_slice(&buf[..n]);
            }
        }
    });
    (out, reader)
}

/// The text of [`Captured`] bytes.
pub fn captured_text(c: &Captured) -> String {
    c.lock().map(|s| String::from_utf8_lossy(&s).into_owned()).unwrap_or_default()
}

/// A usual stateful host firewall (policy drop, established accept, lo accept, udp/53 and
/// tcp/22 new accept, reject): the seeds' setup that NOTRACK alone blackholes.
pub const STATEFUL: &str = include_str!("../stateful.nft");
const SRV_MAC: &str = "02:c7:00:00:00:01";
const CLI_MAC: &str = "02:c7:00:00:00:02";

/// `nf_conntrack_count` of the calling thread's namespace.
const CT_COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";

// ---------------------------------------------------------------------------------------------
// Running tools

/// What a tool printed and how it exited.
#[derive(Debug)]
pub struct ToolOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl ToolOutput {
    /// True on exit status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

fn tool_path(tool: &str) -> PathBuf {
    if tool.starts_with('/') {
        return PathBuf::from(tool);
    }
    match Tool::find(tool) {
        Ok(t) => t.path,
        Err(e) => panic!("harness: {e}"),
    }
}

/// Runs `tool args…` in the calling thread's network namespace with `stdin`, killing it after
/// `timeout`. Never a shell. Errors only when the tool cannot be started or times out.
pub fn spawn_tool(tool: &str, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<ToolOutput, String> {
    let path = tool_path(tool);
    let cmd_text = format!("{} {}", tool, args.join(" "));
    let mut child = Command::new(&path)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd_text}: {e}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            // A tool that exits early closes its stdin; its exit status tells the real story.
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{cmd_text} timed out after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("waiting for {cmd_text}: {e}"));
            }
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let status = status?;
    Ok(ToolOutput { status, stdout, stderr })
}

/// Runs a tool in the calling thread's namespace; returns stdout or panics with stderr.
fn must(tool: &str, args: &[&str], stdin: Option<&[u8]>, where_: &str) -> String {
    match spawn_tool(tool, args, stdin, TOOL_TIMEOUT) {
        Ok(o) if o.success() => o.stdout,
        Ok(o) => panic!(
            "{tool} {} (in {where_}) failed ({}):\n{}{}",
            args.join(" "),
            o.status,
            o.stderr.trim_end(),
            stdin.map(|s| format!("\n--- stdin ---\n{}", numbered(&String::from_utf8_lossy(s)))).unwrap_or_default()
        ),
        Err(e) => panic!("{e} (in {where_})"),
    }
}

fn numbered(s: &str) -> String {
    let mut out = String::new();
    for (i, l) in s.lines().enumerate() {
        let _ = writeln!(out, "{:4} {l}", i + 1);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Namespaces

static NS_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A named network namespace (`/run/netns/ctg-LABEL-PID-N`) with `lo` up. Dropping it kills
/// every process inside and deletes it, also while the test unwinds from a panic.
#[derive(Debug)]
pub struct Ns {
    name: String,
    target: Option<Target>,
}

impl Ns {
    /// Creates a fresh namespace; `label` (lowercase letters, digits, '-') goes into its name.
    pub fn new(label: &str) -> Ns {
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
            .take(24)
            .collect();
        reap_stale_namespaces();
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ctg-{label}-{}-{n}", std::process::id());
        must("ip", &["netns", "add", &name], None, "the test's namespace");
        // From here on Drop removes it, whatever fails next.
        let mut ns = Ns { name, target: None };
        match Target::open(&TargetSpec::Named(ns.name.clone())) {
            Ok(t) => ns.target = Some(t),
            Err(e) => panic!("harness: cannot open namespace {}: {e}", ns.name),
        }
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name under `/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The opened namespace (for code that takes a [`Target`]).
    pub fn target(&self) -> &Target {
        match &self.target {
            Some(t) => t,
            None => panic!("harness: namespace {} is not open", self.name),
        }
    }

    /// Runs `f` on a thread that entered this namespace; sockets it creates belong to the
    /// namespace for their whole life. A panic in `f` fails the test.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match self.target().run(f) {
            Ok(v) => v,
            Err(e) => panic!("harness: in namespace {}: {e}", self.name),
        }
    }

    /// Runs a tool inside the namespace; returns its output whatever the exit status.
    pub fn try_exec(&self, tool: &str, args: &[&str], stdin: Option<&[u8]>) -> ToolOutput {
        match self.run(|| spawn_tool(tool, args, stdin, TOOL_TIMEOUT)) {
            Ok(o) => o,
            Err(e) => panic!("{e} (in {})", self.name),
        }
    }

    /// Runs a tool inside the namespace; returns stdout, or fails the test with its stderr.
    pub fn exec(&self, tool: &str, args: &[&str]) -> String {
        self.run(|| must(tool, args, None, &self.name))
    }

    /// Like [`Ns::exec`] with `stdin` fed to the tool.
    pub fn exec_stdin(&self, tool: &str, args: &[&str], stdin: &str) -> String {
        self.run(|| must(tool, args, Some(stdin.as_bytes()), &self.name))
    }

    /// Loads an nft script (`nft -f -`); fails the test (showing the numbered script) on error.
    pub fn nft(&self, script: &str) {
        self.exec_stdin("nft", &["-f", "-"], script);
    }

    /// `nft list ruleset`.
    pub fn nft_list(&self) -> String {
        self.exec("nft", &["list", "ruleset"])
    }

    /// Number of conntrack entries in this namespace (`nf_conntrack_count`).
    pub fn conntrack_count(&self) -> u64 {
        ensure_conntrack_loaded();
        let text = self.run(|| std::fs::read_to_string(CT_COUNT));
        match text {
            Ok(t) => match t.trim().parse() {
                Ok(n) => n,
                Err(e) => panic!("harness: {CT_COUNT} in {} is {t:?}: {e}", self.name),
            },
            Err(e) => panic!("harness: reading {CT_COUNT} in {}: {e}", self.name),
        }
    }

    /// Deletes every conntrack entry in this namespace (`conntrack -F`).
    pub fn conntrack_flush(&self) {
        self.exec("conntrack", &["-F"]);
    }

    /// Writes `/proc/sys/KEY` (dots as slashes) inside the namespace.
    pub fn sysctl_write(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        if let Err(e) = self.run(|| std::fs::write(&path, value)) {
            panic!("harness: writing {value} to {path} in {}: {e}", self.name);
        }
    }

    /// Pids of processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        ns_pids(&self.name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.target = None;
        remove_ns(&self.name);
    }
}

fn ns_pids(name: &str) -> Vec<i32> {
    match spawn_tool("ip", &["netns", "pids", name], None, TOOL_TIMEOUT) {
        Ok(o) => o.stdout.split_whitespace().filter_map(|p| p.parse().ok()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Kills every process in namespace `name` (never this test process) and deletes it.
fn remove_ns(name: &str) {
    let me = std::process::id() as i32;
    // A few rounds: a process may fork while being killed.
    for _ in 0..5 {
        let pids: Vec<i32> = ns_pids(name).into_iter().filter(|&p| p != me).collect();
        if pids.is_empty() {
            break;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match spawn_tool("ip", &["netns", "del", name], None, TOOL_TIMEOUT) {
        Ok(o) if o.success() => {}
        Ok(o) => eprintln!("harness: ip netns del {name} failed: {}", o.stderr.trim()),
        Err(e) => eprintln!("harness: {e}"),
    }
}

/// Once per test process: removes namespaces this harness left behind in runs that were killed
/// (`ctg-LABEL-PID-N` whose PID no longer exists). Namespaces of live processes are left alone.
fn reap_stale_namespaces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(o) = spawn_tool("ip", &["netns", "list"], None, TOOL_TIMEOUT) else { return };
        for name in o.stdout.lines().filter_map(|l| l.split_whitespace().next()) {
            if let Some(pid) = harness_ns_pid(name) {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    eprintln!("harness: removing {name}, left behind by a killed run");
                    remove_ns(name);
                }
            }
        }
    });
}

/// The creator's pid in a harness namespace name `ctg-LABEL-PID-N`.
fn harness_ns_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ctg-")?;
    let mut parts = rest.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let _label = parts.next()?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Host-wide conntrack settings (`nf_conntrack_max` is global, DESIGN §10): a test that lowers
/// them holds [`host_conntrack_exclusive`]; tests that need the default room to track thousands
/// of flows hold [`host_conntrack_shared`]. In-process (the kernel tests are one binary).
static HOST_CONNTRACK: RwLock<()> = RwLock::new(());

/// Shared hold on the host-wide conntrack settings (see [`HOST_CONNTRACK`]).
pub fn host_conntrack_shared() -> RwLockReadGuard<'static, ()> {
    HOST_CONNTRACK.read().unwrap_or_else(|p| p.into_inner())
}

/// Exclusive hold: take it before changing `nf_conntrack_max` and restore before dropping it.
pub fn host_conntrack_exclusive() -> RwLockWriteGuard<'static, ()> {
    HOST_CONNTRACK.write().unwrap_or_else(|p| p.into_inner())
}

/// Names listed by `ip netns list` (first word of each line).
pub fn netns_list() -> Vec<String> {
    must("ip", &["netns", "list"], None, "the initial namespace")
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Loads nf_conntrack once if `nf_conntrack_count` is missing (it is built in on most kernels).
fn ensure_conntrack_loaded() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if !std::path::Path::new(CT_COUNT).exists() {
            if let Err(e) = spawn_tool("modprobe", &["nf_conntrack"], None, TOOL_TIMEOUT) {
                eprintln!("harness: modprobe nf_conntrack: {e}");
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// A pair of namespaces on a veth link

/// Two namespaces joined by a veth pair (`veth0` in both): `srv` 198.18.0.1/24 + fd42::1/64,
/// `cli` 198.18.0.2/24 + fd42::2/64, permanent neighbour entries (no ARP/ND during a test),
/// no default route. Dropped `cli` first, then `srv`.
#[derive(Debug)]
pub struct Pair {
    /// The server (the host ctguard acts on).
    pub srv: Ns,
    /// The client.
    pub cli: Ns,
}

impl Pair {
    /// Builds the pair; `label` goes into both namespace names.
    pub fn new(label: &str) -> Pair {
        let srv = Ns::new(&format!("{label}-srv"));
        let cli = Ns::new(&format!("{label}-cli"));
        // Created directly in the two namespaces: nothing appears in the initial one.
        srv.exec(
            "ip",
            &[
                "link",
                "add",
                PAIR_IFACE,
                "address",
                SRV_MAC,
                "type",
                "veth",
                "peer",
                "name",
                PAIR_IFACE,
                "address",
                CLI_MAC,
                "netns",
                cli.name(),
            ],
        );
        let pair = Pair { srv, cli };
        for (ns, me4, me6, peer4, peer6, peer_mac) in
            [(&pair.srv, SRV4, SRV6, CLI4, CLI6, CLI_MAC), (&pair.cli, CLI4, CLI6, SRV4, SRV6, SRV_MAC)]
        {
            let (me4, me6, peer4, peer6) =
                (format!("{me4}/24"), format!("{me6}/64"), peer4.to_string(), peer6.to_string());
            ns.exec("ip", &["addr", "add", &me4, "dev", PAIR_IFACE]);
            ns.exec("ip", &["-6", "addr", "add", &me6, "dev", PAIR_IFACE, "nodad"]);
            ns.exec("ip", &["link", "set", PAIR_IFACE, "up"]);
            for peer in [&peer4, &peer6] {
                ns.exec("ip", &["neigh", "replace", peer, "lladdr", peer_mac, "dev", PAIR_IFACE, "nud", "permanent"]);
            }
        }
        pair.wait_link_up();
        pair
    }

    fn wait_link_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for ns in [&self.srv, &self.cli] {
            loop {
                let link = ns.exec("ip", &["-o", "link", "show", "dev", PAIR_IFACE]);
                let route6 = ns.exec("ip", &["-6", "route", "show", "fd42::/64"]);
                if link.contains("LOWER_UP") && link.contains("state UP") && !route6.trim().is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "harness: {PAIR_IFACE} in {} did not come up: {link}", ns.name());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responders

fn set_rcvbuf(sock: &impl AsRawFd, bytes: libc::c_int) {
    let fd = sock.as_raw_fd();
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let p = &bytes as *const libc::c_int as *const libc::c_void;
    // SAFETY: fd is an open socket owned by the caller; `p` points to a c_int of `len` bytes.
    let r = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, p, len) };
    if r != 0 {
        // SAFETY: as above.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, p, len) };
    }
}

/// A UDP echo server bound to ADDR:PORT inside a namespace: answers every datagram with the same
/// bytes. Stopped and joined on `Drop`.
#[derive(Debug)]
pub struct UdpResponder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    reply_errors: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl UdpResponder {
    /// Binds `addr` in `ns` and starts answering.
    pub fn start(ns: &Ns, addr: SocketAddr) -> UdpResponder {
        let sock = match ns.run(move || bind_retrying(|| UdpSocket::bind(addr))) {
            Ok(s) => s,
            Err(e) => panic!("harness: UDP bind {addr} in {}: {e}", ns.name()),
        };
        set_rcvbuf(&sock, 8 << 20);
        if let Err(e) = sock.set_read_timeout(Some(Duration::from_millis(25))) {
            panic!("harness: set_read_timeout: {e}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(AtomicU64::new(0));
        let reply_errors = Arc::new(AtomicU64::new(0));
        let (s, r, re) = (stop.clone(), replies.clone(), reply_errors.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                match sock.recv_from(&mut buf) {
                    // Counted before the send, so a client that has the reply always sees
                    // it counted (issue 10: a count read right after a reply raced the
                    // responder thread); taken back if the send fails.
                    Ok((n, peer)) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        if sock.send_to(&buf[..n], peer).is_err() {
                            // EPERM: the reply was dropped by netfilter (DESIGN §10).
                            r.fetch_sub(1, Ordering::SeqCst);
                            re.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        UdpResponder { addr, stop, replies, reply_errors, handle: Some(handle) }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replies sent so far. A reply the client has received is already counted.
    pub fn replies(&self) -> u64 {
        self.replies.load(Ordering::SeqCst)
    }

    /// Replies whose `sendto` failed (e.g. EPERM: dropped by the local output path).
    pub fn reply_errors(&self) -> u64 {
        self.reply_errors.load(Ordering::SeqCst)
    }
}

impl Drop for UdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A TCP listener inside a namespace that accepts every connection and closes it at once.
/// Stopped and joined on `Drop`.
#[derive(Debug)]
pub struct TcpResponder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl TcpResponder {
    /// Listens on `addr` in `ns`.
    pub fn start(ns: &Ns, addr: SocketAddr) -> TcpResponder {
        let l = match ns.run(move || bind_retrying(|| TcpListener::bind(addr))) {
            Ok(l) => l,
            Err(e) => panic!("harness: TCP listen {addr} in {}: {e}", ns.name()),
        };
        if let Err(e) = l.set_nonblocking(true) {
            panic!("harness: set_nonblocking: {e}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        drop(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        TcpResponder { addr, stop, accepted, handle: Some(handle) }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far. A client's connect completes before the accept is counted,
    /// so right after a connect this can still be one short: use [`TcpResponder::wait_accepted`]
    /// for "at least n", and [`TcpResponder::accepted_settled`] for an exact count.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The count once `n` connections were accepted (waiting at most `timeout`) and no further
    /// one arrived for `quiet`: an exact count that a late accept cannot move afterwards, and
    /// that also catches a connection that slipped through but was not counted yet.
    pub fn accepted_settled(&self, n: u64, timeout: Duration, quiet: Duration) -> u64 {
        let seen = self.wait_accepted(n, timeout);
        self.wait_accepted(seen + 1, quiet)
    }

    /// Waits (at most `timeout`) until `n` connections were accepted; returns the count then.
    /// A client's connect completes before the accept, so count only after waiting.
    pub fn wait_accepted(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.accepted() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.accepted()
    }
}

impl Drop for TcpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// True when a TCP connection from `ns` to `dst` completes within `timeout` (then closed).
pub fn tcp_connect(ns: &Ns, dst: SocketAddr, timeout: Duration) -> bool {
    ns.run(move || TcpStream::connect_timeout(&dst, timeout).is_ok())
}

// ---------------------------------------------------------------------------------------------
// Query generator

/// Outcome of [`udp_queries`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Answered {
    /// Queries handed to the kernel (`sendto` succeeded).
    pub sent: usize,
    /// Queries whose echo came back in time.
    pub answered: usize,
    /// Queries whose `sendto` failed (e.g. EPERM from a local drop); not counted in `sent`.
    pub send_errors: usize,
    /// Wall time taken.
    pub elapsed: Duration,
}

/// Sockets open at once.
pub const QUERY_WINDOW: usize = 1024;
/// How long a query waits for its answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_millis(300);

/// Sends `count` UDP queries from `ns` to `dst`, query `i` from its own socket bound to source
/// port `first_src_port + i` (so every query is a distinct flow), and counts the answers. Up to
/// [`QUERY_WINDOW`] queries are in flight; each waits at most [`REPLY_TIMEOUT`], so 5,000
/// unanswered queries take about 1.5 s.
pub fn udp_queries(ns: &Ns, dst: SocketAddr, count: usize, first_src_port: u16) -> Answered {
    ns.run(move || udp_queries_here(dst, count, first_src_port))
}

/// [`udp_queries`] from the source address `src` (one of `ns`'s addresses).
pub fn udp_queries_from(ns: &Ns, src: IpAddr, dst: SocketAddr, count: usize, first_src_port: u16) -> Answered {
    ns.run(move || udp_queries_bound(Some(src), dst, count, first_src_port))
}

/// [`udp_queries`] from the calling thread's namespace.
pub fn udp_queries_here(dst: SocketAddr, count: usize, first_src_port: u16) -> Answered {
    udp_queries_bound(None, dst, count, first_src_port)
}

fn udp_queries_bound(src: Option<IpAddr>, dst: SocketAddr, count: usize, first_src_port: u16) -> Answered {
    assert!(
        first_src_port as usize + count <= 65536 && first_src_port > 0,
        "harness: source ports {first_src_port}+{count} do not fit"
    );
    raise_nofile(QUERY_WINDOW as u64 + 256);
    let start = Instant::now();
    let bind_ip: IpAddr =
        src.unwrap_or(if dst.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() });
    // Hard bound, whatever happens: every query has its own deadline, this is a safety net.
    let hard_deadline = start + Duration::from_secs(10) + REPLY_TIMEOUT * (count / QUERY_WINDOW + 1) as u32;
    let mut res = Answered::default();
    let mut inflight: Vec<(UdpSocket, [u8; 12], Instant)> = Vec::with_capacity(QUERY_WINDOW);
    let mut next = 0usize;
    let mut buf = [0u8; 64];
    loop {
        while inflight.len() < QUERY_WINDOW && next < count {
            let port = (first_src_port as usize + next) as u16;
            let sock = match UdpSocket::bind(SocketAddr::new(bind_ip, port)) {
                Ok(s) => s,
                Err(e) => panic!("harness: binding source port {port}: {e}"),
            };
            if let Err(e) = sock.set_nonblocking(true) {
                panic!("harness: set_nonblocking: {e}");
            }
            let mut payload = *b"ctg-q-\0\0\0\0\0\0";
            payload[6..10].copy_from_slice(&(next as u32).to_be_bytes());
            payload[10..12].copy_from_slice(&port.to_be_bytes());
            match sock.send_to(&payload, dst) {
                Ok(_) => {
                    res.sent += 1;
                    inflight.push((sock, payload, Instant::now() + REPLY_TIMEOUT));
                }
                Err(_) => res.send_errors += 1,
            }
            next += 1;
        }
        if inflight.is_empty() && next >= count {
            break;
        }
        if Instant::now() >= hard_deadline {
            eprintln!("harness: udp_queries hit its hard deadline with {} in flight", inflight.len());
            break;
        }
        let now = Instant::now();
        let earliest = inflight.iter().map(|e| e.2).min().unwrap_or(now);
        let wait_ms = earliest.saturating_duration_since(now).as_millis().clamp(1, 20) as libc::c_int;
        let mut fds: Vec<libc::pollfd> = inflight
            .iter()
            .map(|(s, _, _)| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for open sockets.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        let now = Instant::now();
        if n <= 0 && now < earliest {
            continue;
        }
        let mut keep = Vec::with_capacity(inflight.len());
        for (entry, pfd) in inflight.drain(..).zip(fds.iter()) {
            if pfd.revents & libc::POLLIN != 0 {
                let mut got = false;
                // Drain the socket; only an exact echo counts.
                while let Ok((len, from)) = entry.0.recv_from(&mut buf) {
                    if from == dst && buf[..len] == entry.1 {
                        got = true;
                    }
                }
                if got {
                    res.answered += 1;
                    continue;
                }
            }
            if now < entry.2 {
                keep.push(entry);
            }
        }
        inflight = keep;
    }
    res.elapsed = start.elapsed();
    res
}

/// Raises the soft RLIMIT_NOFILE to at least `want` (bounded by the hard limit). Process-wide,
/// only ever raised, so concurrent tests cannot hurt each other.
pub fn raise_nofile(want: u64) {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `rl` is a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return;
    }
    if rl.rlim_cur >= want as libc::rlim_t {
        return;
    }
    // Leave room for the other tests of this process.
    let target = (want as libc::rlim_t * 8).min(rl.rlim_max);
    let new = libc::rlimit { rlim_cur: target, rlim_max: rl.rlim_max };
    // SAFETY: `new` is a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) };
}

/// Binds, retrying for up to a second while the address is in use: a socket this test just
/// closed can still be held for a moment by a child another test thread forked and has not
/// exec'd yet (close-on-exec only closes it at exec) — found as a rare "Address already in
/// use" when a test rebinds a port it released.
pub fn bind_retrying<T>(mut bind: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match bind() {
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// `SocketAddr` helper: `sa(SRV4, 53)`.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
pub mod dns;
pub mod sshd;
