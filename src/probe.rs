//! Connectivity probes (DESIGN §4): `tcp:HOST:PORT`, `udp-dns:HOST:PORT:NAME`, `icmp:HOST` and
//! `exec:CMD ARGS`, run by the agent on the target's worker thread while a transaction is
//! pending. A probe that passes proves that the host still reaches (or is reached by) what
//! matters through the new rules; any failure rolls the transaction back.
//!
//! - Everything runs in the **calling thread's** network namespace: sockets are created on the
//!   calling thread (or on threads it spawns, which inherit its namespace — verified by the
//!   kernel tests) and `exec:` children are forked from it.
//! - HOST is always an IP literal: nothing is resolved while a firewall change is pending.
//! - Every probe has a deadline and never blocks past it (an `exec:` child is killed with its
//!   whole process group).
//! - `exec:` never uses a shell: the command line is split into words (quotes and backslashes
//!   group and escape, nothing is expanded) and run by absolute path or a `PATH` lookup.

use std::fmt;
use std::io::{self, Read};
use std::net::{AddrParseError, IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
use serde::{Deserialize, Serialize};

/// The probe forms, for messages.
pub const FORMS: &str = "tcp:HOST:PORT, udp-dns:HOST:PORT:NAME, icmp:HOST or exec:CMD ARGS";

/// `PATH` used for `exec:` probes when the agent's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// At most this much of an `exec:` probe's stdout and stderr is kept (the rest is drained).
const EXEC_CAPTURE_MAX: usize = 64 * 1024;

/// After SIGKILL, how long an `exec:` probe waits for the child to be reaped before leaving
/// that to a background thread (a child stuck in uninterruptible sleep must not hold us).
const EXEC_REAP_GRACE: Duration = Duration::from_millis(200);

/// Errors parsing a probe spec. Each names the spec and the reason; callers map them to exit 2.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The spec does not have the shape of any probe (unknown kind, missing or extra parts).
    #[error("bad probe {spec:?}: {reason}")]
    Malformed {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// HOST is not an IP address literal.
    #[error(
        "bad probe {spec:?}: HOST {host:?} is not an IP address (HOST must be an IP literal: \
         nothing is resolved during a firewall change): {source}"
    )]
    Host {
        /// The spec as given.
        spec: String,
        /// The HOST part.
        host: String,
        /// The parser's complaint.
        #[source]
        source: AddrParseError,
    },
    /// PORT is not a number in 1-65535.
    #[error("bad probe {spec:?}: PORT {port:?} {reason}")]
    Port {
        /// The spec as given.
        spec: String,
        /// The PORT part.
        port: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// NAME is not a valid DNS name.
    #[error("bad probe {spec:?}: NAME {name:?} is not a valid DNS name: {reason}")]
    Name {
        /// The spec as given.
        spec: String,
        /// The NAME part.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The `exec:` command line is empty or cannot be split into words.
    #[error("bad probe {spec:?}: {reason}")]
    Exec {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
}

impl ProbeError {
    /// The spec the error is about.
    pub fn spec(&self) -> &str {
        match self {
            ProbeError::Malformed { spec, .. }
            | ProbeError::Host { spec, .. }
            | ProbeError::Port { spec, .. }
            | ProbeError::Name { spec, .. }
            | ProbeError::Exec { spec, .. } => spec,
        }
    }
}

/// One probe. Parse with [`Probe::parse`] (or `str::parse`); its [`Display`](fmt::Display) form
/// is canonical and parses back to the same probe (it is also its serde form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Probe {
    /// A TCP connect to HOST:PORT completes.
    Tcp {
        /// Destination address.
        host: IpAddr,
        /// Destination port.
        port: u16,
    },
    /// A DNS query (A record of `name`) sent to HOST:PORT over UDP gets a response.
    UdpDns {
        /// The DNS server's address.
        host: IpAddr,
        /// Its port (usually 53).
        port: u16,
        /// The name queried.
        name: String,
    },
    /// An ICMP (ICMPv6) echo request to HOST gets its echo reply.
    Icmp {
        /// Destination address.
        host: IpAddr,
    },
    /// A command exits 0 within the timeout.
    Exec {
        /// The command (absolute path or a name looked up in `PATH`) and its arguments.
        argv: Vec<String>,
    },
}

/// The outcome of one probe run (recorded in the journal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The probe, in its canonical spec form.
    pub probe: String,
    /// True when it passed.
    pub ok: bool,
    /// What happened, for humans: the peer's answer, the errno, the timeout, the exit status.
    pub detail: String,
    /// Wall time the probe took, in milliseconds.
    pub elapsed_ms: u64,
}

impl Probe {
    /// Parses `tcp:HOST:PORT`, `udp-dns:HOST:PORT:NAME`, `icmp:HOST` or `exec:CMD ARGS`.
    ///
    /// HOST is an IPv4 or IPv6 literal; an IPv6 HOST followed by `:PORT` goes in brackets
    /// (`tcp:[fd42::1]:22`; brackets are optional for `icmp:`). PORT is 1-65535. NAME is a DNS
    /// name: labels of 1-63 letters, digits and `-`, at most 253 characters, an optional
    /// trailing dot. `exec:` splits the rest into words without a shell: whitespace separates,
    /// `'…'` and `"…"` group (inside `"…"` a backslash escapes `"` and `\`), a backslash outside
    /// quotes escapes the next character, nothing is expanded. The command is an absolute path or
    /// a bare name looked up in `PATH` when the probe runs.
    pub fn parse(spec: &str) -> Result<Probe, ProbeError> {
        let malformed = |reason: String| ProbeError::Malformed { spec: spec.to_string(), reason };
        let s = spec.trim();
        if s.is_empty() {
            return Err(malformed(format!("empty; expected {FORMS}")));
        }
        let Some((kind, rest)) = s.split_once(':') else {
            return Err(malformed(format!("no KIND: prefix; expected {FORMS}")));
        };
        match kind {
            "tcp" => {
                let (host, after) = split_host(spec, rest, "tcp:HOST:PORT")?;
                let port = after_colon(spec, after, "PORT", "tcp:HOST:PORT")?;
                if port.contains(':') {
                    return Err(malformed("too many ':'-separated parts; expected tcp:HOST:PORT".to_string()));
                }
                Ok(Probe::Tcp { host, port: parse_port(spec, port)? })
            }
            "udp-dns" => {
                let form = "udp-dns:HOST:PORT:NAME";
                let (host, after) = split_host(spec, rest, form)?;
                let port_name = after_colon(spec, after, "PORT", form)?;
                let Some((port, name)) = port_name.split_once(':') else {
                    return Err(malformed(format!("missing NAME; expected {form}")));
                };
                let port = parse_port(spec, port)?;
                if let Err(reason) = check_dns_name(name) {
                    return Err(ProbeError::Name { spec: spec.to_string(), name: name.to_string(), reason });
                }
                Ok(Probe::UdpDns { host, port, name: name.to_string() })
            }
            "icmp" => {
                if rest.is_empty() {
                    return Err(malformed("missing HOST; expected icmp:HOST".to_string()));
                }
                let host = match rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                    Some(inner) => inner.parse::<Ipv6Addr>().map(IpAddr::V6),
                    None => rest.parse::<IpAddr>(),
                };
                match host {
                    Ok(host) => Ok(Probe::Icmp { host }),
                    Err(source) => Err(ProbeError::Host { spec: spec.to_string(), host: rest.to_string(), source }),
                }
            }
            "exec" => {
                let exec_err = |reason: String| ProbeError::Exec { spec: spec.to_string(), reason };
                let argv = split_words(rest).map_err(exec_err)?;
                let Some(cmd) = argv.first() else {
                    return Err(exec_err("exec: needs a command (exec:CMD ARGS)".to_string()));
                };
                if cmd.is_empty() {
                    return Err(exec_err("exec: the command is an empty word".to_string()));
                }
                if cmd.contains('/') && !cmd.starts_with('/') {
                    return Err(exec_err(format!(
                        "exec: command {cmd:?} must be an absolute path or a bare name looked up in PATH"
                    )));
                }
                if argv.iter().any(|w| w.contains('\0')) {
                    return Err(exec_err("exec: a word contains a NUL byte".to_string()));
                }
                Ok(Probe::Exec { argv })
            }
            "" => Err(malformed(format!("missing KIND before ':'; expected {FORMS}"))),
            other => {
                Err(malformed(format!("unknown probe kind {other:?}; expected tcp, udp-dns, icmp or exec ({FORMS})")))
            }
        }
    }

    /// The probe's kind as written in a spec: `tcp`, `udp-dns`, `icmp` or `exec`.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Tcp { .. } => "tcp",
            Probe::UdpDns { .. } => "udp-dns",
            Probe::Icmp { .. } => "icmp",
            Probe::Exec { .. } => "exec",
        }
    }

    /// The address the probe goes to (`None` for `exec:`).
    pub fn host(&self) -> Option<IpAddr> {
        match self {
            Probe::Tcp { host, .. } | Probe::UdpDns { host, .. } | Probe::Icmp { host } => Some(*host),
            Probe::Exec { .. } => None,
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp { host, port } => write!(f, "tcp:{}:{port}", HostFmt(*host)),
            Probe::UdpDns { host, port, name } => write!(f, "udp-dns:{}:{port}:{name}", HostFmt(*host)),
            Probe::Icmp { host } => write!(f, "icmp:{}", HostFmt(*host)),
            Probe::Exec { argv } => {
                f.write_str("exec:")?;
                for (i, w) in argv.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    f.write_str(&quote_word(w))?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for Probe {
    type Err = ProbeError;

    fn from_str(s: &str) -> Result<Probe, ProbeError> {
        Probe::parse(s)
    }
}

impl TryFrom<String> for Probe {
    type Error = ProbeError;

    fn try_from(s: String) -> Result<Probe, ProbeError> {
        Probe::parse(&s)
    }
}

impl From<Probe> for String {
    fn from(p: Probe) -> String {
        p.to_string()
    }
}

/// An address as HOST: IPv6 in brackets.
struct HostFmt(IpAddr);

impl fmt::Display for HostFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "[{a}]"),
        }
    }
}

/// Splits `HOST…` off `rest` (bracketed IPv6 or an IPv4 literal); returns the host and the
/// text after it.
fn split_host<'a>(spec: &str, rest: &'a str, form: &str) -> Result<(IpAddr, &'a str), ProbeError> {
    let malformed = |reason: String| ProbeError::Malformed { spec: spec.to_string(), reason };
    let host_err = |host: &str, source| ProbeError::Host { spec: spec.to_string(), host: host.to_string(), source };
    if let Some(inner_rest) = rest.strip_prefix('[') {
        let Some((inner, after)) = inner_rest.split_once(']') else {
            return Err(malformed(format!("'[' without ']' around HOST; expected {form}")));
        };
        return match inner.parse::<Ipv6Addr>() {
            Ok(a) => Ok((IpAddr::V6(a), after)),
            Err(source) => Err(host_err(inner, source)),
        };
    }
    let (host, after) = match rest.find(':') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if let Ok(a) = host.parse::<Ipv4Addr>() {
        return Ok((IpAddr::V4(a), after));
    }
    if rest.matches(':').count() >= 2 && host.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(malformed(format!("an IPv6 HOST goes in brackets, e.g. tcp:[fd42::1]:22; expected {form}")));
    }
    if host.is_empty() {
        return Err(malformed(format!("missing HOST; expected {form}")));
    }
    match host.parse::<IpAddr>() {
        Ok(a) => Ok((a, after)),
        Err(source) => Err(host_err(host, source)),
    }
}

/// Expects `:PART…` after HOST; returns `PART…`.
fn after_colon<'a>(spec: &str, after: &'a str, part: &str, form: &str) -> Result<&'a str, ProbeError> {
    let malformed = |reason: String| ProbeError::Malformed { spec: spec.to_string(), reason };
    if after.is_empty() {
        return Err(malformed(format!("missing {part}; expected {form}")));
    }
    after.strip_prefix(':').ok_or_else(|| malformed(format!("unexpected {after:?} after HOST; expected {form}")))
}

fn parse_port(spec: &str, port: &str) -> Result<u16, ProbeError> {
    let err = |reason| ProbeError::Port { spec: spec.to_string(), port: port.to_string(), reason };
    if port.is_empty() {
        return Err(err("is missing (1-65535)"));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("is not a number (1-65535)"));
    }
    match port.parse::<u64>() {
        Ok(0) => Err(err("is not a usable port (1-65535)")),
        Ok(n) => u16::try_from(n).map_err(|_| err("is out of range (1-65535)")),
        Err(_) => Err(err("is out of range (1-65535)")),
    }
}

/// Checks a DNS name: labels of 1-63 `[A-Za-z0-9-]`, at most 253 characters without the optional
/// trailing dot. Returns the reason when it is not one.
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_string());
    }
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err("the root '.' alone has no label to query".to_string());
    }
    if bare.len() > 253 {
        return Err(format!("it has {} characters (at most 253)", bare.len()));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (a leading dot or two dots in a row)".to_string());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} has {} characters (at most 63)", label.len()));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
            return Err(format!("label {label:?} contains {c:?} (labels are letters, digits and '-')"));
        }
    }
    Ok(())
}

/// Splits an `exec:` command line into words, without a shell (see [`Probe::parse`]).
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("exec: unterminated ' quote".to_string()),
                    }
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("exec: unterminated \" quote".to_string()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("exec: unterminated \" quote".to_string()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => cur.get_or_insert_with(String::new).push(c),
                None => return Err("exec: a trailing backslash escapes nothing".to_string()),
            },
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = cur.take() {
        words.push(w);
    }
    Ok(words)
}

/// Quotes a word so that [`split_words`] gives it back.
fn quote_word(w: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c);
    if !w.is_empty() && w.chars().all(plain) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------------
// Running

/// Runs one probe in the calling thread's network namespace; returns within `timeout` (plus a
/// few milliseconds of bookkeeping).
pub fn run(probe: &Probe, timeout: Duration) -> ProbeResult {
    let start = Instant::now();
    // A timeout too large for an Instant is as good as a year.
    let deadline = start.checked_add(timeout).unwrap_or_else(|| start + Duration::from_secs(365 * 86_400));
    let outcome = if timeout.is_zero() {
        Err("the probe timeout is 0".to_string())
    } else {
        match probe {
            Probe::Tcp { host, port } => run_tcp(SocketAddr::new(*host, *port), timeout),
            Probe::UdpDns { host, port, name } => run_dns(SocketAddr::new(*host, *port), name, deadline, timeout),
            Probe::Icmp { host } => run_icmp(*host, deadline, timeout),
            Probe::Exec { argv } => run_exec(argv, deadline, timeout),
        }
    };
    let (ok, detail) = match outcome {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    ProbeResult { probe: probe.to_string(), ok, detail, elapsed_ms: millis(start.elapsed()) }
}

/// Runs every probe, concurrently on scoped threads (a thread inherits the network namespace
/// of the thread that spawns it, so they all run in the caller's); results in the order given.
/// Returns within `timeout` plus bookkeeping.
pub fn run_all(probes: &[Probe], timeout: Duration) -> Vec<ProbeResult> {
    if probes.len() <= 1 {
        return probes.iter().map(|p| run(p, timeout)).collect();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| {
                let h = std::thread::Builder::new()
                    .name(format!("probe-{}", p.kind()))
                    .spawn_scoped(s, move || run(p, timeout));
                (p, h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(p, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| ProbeResult {
                    probe: p.to_string(),
                    ok: false,
                    detail: "the probe's thread panicked".to_string(),
                    elapsed_ms: 0,
                }),
                // No thread to be had: run it here.
                Err(_) => run(p, timeout),
            })
            .collect()
    })
}

/// True when the probe goes to this host itself, as seen from the calling thread's namespace:
/// loopback, the unspecified address, an address configured on one of its interfaces
/// (`getifaddrs`, netlink), or any other address the kernel treats as local (a `local` route:
/// binding to it succeeds). Such probes prove nothing about the network; `--auto-confirm`
/// refuses them. `exec:` probes are never considered local (nothing to tell).
pub fn aims_at_local_address(probe: &Probe) -> bool {
    match probe.host() {
        Some(host) => is_local_address(host),
        None => false,
    }
}

fn is_local_address(host: IpAddr) -> bool {
    let host = match host {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(host),
        v4 => v4,
    };
    if host.is_loopback() || host.is_unspecified() {
        return true;
    }
    let listed = local_interface_addresses();
    if let Ok(addrs) = &listed {
        if addrs.contains(&host) {
            return true;
        }
    }
    if host.is_multicast() {
        return false;
    }
    match bind_says_local(host) {
        Some(local) => local,
        // Neither source could tell: refuse rather than let a loopback probe confirm.
        None => listed.is_err(),
    }
}

/// Addresses on the interfaces of the calling thread's namespace (glibc's `getifaddrs` asks
/// the kernel over a netlink socket created on this thread).
pub(crate) fn local_interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success it holds a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` points to a sockaddr whose family says its real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Asks the kernel whether `host` is local here: binding a UDP socket to it succeeds only for
/// local addresses (`EADDRNOTAVAIL` otherwise) — unless `ip_nonlocal_bind` is on, then `None`.
fn bind_says_local(host: IpAddr) -> Option<bool> {
    let knob = match host {
        IpAddr::V4(_) => "/proc/sys/net/ipv4/ip_nonlocal_bind",
        IpAddr::V6(_) => "/proc/sys/net/ipv6/ip_nonlocal_bind",
    };
    // Per namespace; /proc/sys/net follows the reading thread's namespace.
    match std::fs::read_to_string(knob) {
        Ok(v) if v.trim() == "0" => {}
        _ => return None,
    }
    match UdpSocket::bind(SocketAddr::new(host, 0)) {
        Ok(_) => Some(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Some(false),
        // EINVAL: e.g. a link-local address without a scope (the interface list covers those).
        Err(_) => Some(false),
    }
}

type Outcome = Result<String, String>;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `ECONNREFUSED (Connection refused)` for an OS error, the error's text otherwise.
fn errno_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(raw) => {
            let errno = Errno::from_raw(raw);
            format!("{errno:?} ({})", errno.desc())
        }
        None => e.to_string(),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

fn run_tcp(addr: SocketAddr, timeout: Duration) -> Outcome {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => {
            let _ = s.shutdown(std::net::Shutdown::Both);
            Ok(format!("connected to {addr}"))
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            Err(format!("no answer from {addr} within {} ms (connect timed out)", millis(timeout)))
        }
        Err(e) => Err(format!("connect to {addr}: {}", errno_text(&e))),
    }
}

/// Waits on a socket until `deadline`, passing each datagram to `accept` until it returns
/// `Some`. Counts datagrams it rejected.
fn recv_until<T>(
    sock: &UdpSocket,
    deadline: Instant,
    buf: &mut [u8],
    mut accept: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T, (Option<io::Error>, usize)> {
    let mut ignored = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((None, ignored));
        }
        if let Err(e) = sock.set_read_timeout(Some(left)) {
            return Err((Some(e), ignored));
        }
        match sock.recv(buf) {
            Ok(n) => match buf.get(..n).and_then(&mut accept) {
                Some(v) => return Ok(v),
                None => ignored += 1,
            },
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err((Some(e), ignored)),
        }
    }
}

fn ignored_text(n: usize, what: &str) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} datagram(s) ignored: {what}")
    }
}

/// A 64-bit random value: std's SipHash with a randomly seeded key (per thread, then stepped
/// for every `RandomState`), over a process-wide counter. Enough for a DNS id and an ICMP
/// token; no extra crate.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

/// A DNS query for the A record of `name`: random id, RD set, one question.
fn dns_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    check_dns_name(name).map_err(|r| format!("NAME {name:?} is not a valid DNS name: {r}"))?;
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // QR=0, OPCODE=QUERY, RD=1
    q.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // ANCOUNT, NSCOUNT, ARCOUNT
    for label in name.strip_suffix('.').unwrap_or(name).split('.') {
        // check_dns_name bounds every label to 1-63 bytes.
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&1u16.to_be_bytes()); // QTYPE A
    q.extend_from_slice(&1u16.to_be_bytes()); // QCLASS IN
    Ok(q)
}

/// What a DNS response says, when `msg` is a response (QR set) to query `id`.
#[derive(Debug, PartialEq, Eq)]
struct DnsAnswer {
    rcode: u8,
    answers: u16,
}

fn dns_response(msg: &[u8], id: u16) -> Option<DnsAnswer> {
    let header = msg.get(..12)?;
    if u16::from_be_bytes([header[0], header[1]]) != id || header[2] & 0x80 == 0 {
        return None;
    }
    Some(DnsAnswer { rcode: header[3] & 0x0f, answers: u16::from_be_bytes([header[6], header[7]]) })
}

fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        _ => "RCODE?",
    }
}

fn run_dns(server: SocketAddr, name: &str, deadline: Instant, timeout: Duration) -> Outcome {
    let id = (random_u64() & 0xffff) as u16;
    let query = dns_query(id, name)?;
    let any: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(any).map_err(|e| format!("UDP socket: {}", errno_text(&e)))?;
    // Connected: only the server's datagrams arrive, and an ICMP port unreachable shows up.
    sock.connect(server).map_err(|e| format!("UDP connect to {server}: {}", errno_text(&e)))?;
    sock.send(&query).map_err(|e| format!("sending the query to {server}: {}", errno_text(&e)))?;
    let mut buf = [0u8; 4096];
    match recv_until(&sock, deadline, &mut buf, |m| dns_response(m, id)) {
        Ok(a) => Ok(format!(
            "DNS response from {server} for {name} A: rcode {} ({}), {} answer(s)",
            rcode_name(a.rcode),
            a.rcode,
            a.answers
        )),
        Err((None, ignored)) => Err(format!(
            "no DNS response from {server} within {} ms{}",
            millis(timeout),
            ignored_text(ignored, "not a response to this query (wrong id or QR not set)")
        )),
        Err((Some(e), ignored)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Err(format!(
            "{server}: {} (ICMP port unreachable: nothing listens there){}",
            errno_text(&e),
            ignored_text(ignored, "not a response to this query")
        )),
        Err((Some(e), ignored)) => Err(format!(
            "waiting for the DNS response from {server}: {}{}",
            errno_text(&e),
            ignored_text(ignored, "not a response to this query")
        )),
    }
}

/// Which kind of ICMP socket an echo went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IcmpSock {
    /// `SOCK_DGRAM` ping socket (`net.ipv4.ping_group_range` includes our gid).
    Ping,
    /// `SOCK_RAW` (CAP_NET_RAW), when ping sockets are not allowed.
    Raw,
}

impl IcmpSock {
    fn text(self) -> &'static str {
        match self {
            IcmpSock::Ping => "ping socket",
            IcmpSock::Raw => "raw socket",
        }
    }
}

/// An ICMP socket for `host`'s family: a ping socket when allowed, else a raw one.
fn icmp_socket(host: IpAddr) -> Result<(UdpSocket, IcmpSock), String> {
    let (family, proto) = match host {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6),
    };
    let ping = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, proto);
    let (fd, kind): (OwnedFd, IcmpSock) = match ping {
        Ok(fd) => (fd, IcmpSock::Ping),
        // EACCES: our gid is outside net.ipv4.ping_group_range (a fresh namespace has "1 0").
        Err(ping_err) => match socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, proto) {
            Ok(fd) => (fd, IcmpSock::Raw),
            Err(raw_err) => {
                return Err(format!(
                    "no ICMP socket: ping socket {ping_err:?} ({}; net.ipv4.ping_group_range), raw socket \
                     {raw_err:?} ({}; needs CAP_NET_RAW)",
                    ping_err.desc(),
                    raw_err.desc()
                ))
            }
        },
    };
    // A datagram-style socket: std's UdpSocket gives connect/send/recv/timeouts over any fd.
    Ok((UdpSocket::from(fd), kind))
}

/// Internet checksum (RFC 1071).
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Finds the ICMP message in what a socket received: raw IPv4 sockets deliver the IP header too.
fn icmp_payload(msg: &[u8], v4_raw: bool) -> Option<&[u8]> {
    if v4_raw {
        let ihl = usize::from(msg.first()? & 0x0f) * 4;
        msg.get(ihl..)
    } else {
        Some(msg)
    }
}

fn run_icmp(host: IpAddr, deadline: Instant, timeout: Duration) -> Outcome {
    let (sock, kind) = icmp_socket(host)?;
    sock.connect(SocketAddr::new(host, 0)).map_err(|e| format!("ICMP connect to {host}: {}", errno_text(&e)))?;
    let rnd = random_u64().to_be_bytes();
    let id = u16::from_be_bytes([rnd[0], rnd[1]]);
    let seq: u16 = 1;
    let (req_type, reply_type) = match host {
        IpAddr::V4(_) => (8u8, 0u8),
        IpAddr::V6(_) => (128u8, 129u8),
    };
    let mut payload = b"ctguard-probe:".to_vec();
    payload.extend_from_slice(&rnd);
    let mut req = vec![req_type, 0, 0, 0];
    req.extend_from_slice(&id.to_be_bytes());
    req.extend_from_slice(&seq.to_be_bytes());
    req.extend_from_slice(&payload);
    if host.is_ipv4() && kind == IcmpSock::Raw {
        // Ping sockets and ICMPv6 raw sockets get their checksum from the kernel.
        let c = inet_checksum(&req);
        req[2..4].copy_from_slice(&c.to_be_bytes());
    }
    let how = kind.text();
    sock.send(&req).map_err(|e| format!("sending the echo request to {host} ({how}): {}", errno_text(&e)))?;
    let v4_raw = host.is_ipv4() && kind == IcmpSock::Raw;
    let mut buf = [0u8; 2048];
    let matches = |m: &[u8]| -> Option<()> {
        let icmp = icmp_payload(m, v4_raw)?;
        let head = icmp.get(..8)?;
        let ok = head[0] == reply_type
            && head[1] == 0
            // A ping socket's id is its ident (the kernel demultiplexes by it): check ours on raw.
            && (kind == IcmpSock::Ping || u16::from_be_bytes([head[4], head[5]]) == id)
            && u16::from_be_bytes([head[6], head[7]]) == seq
            && icmp.get(8..) == Some(&payload[..]);
        ok.then_some(())
    };
    match recv_until(&sock, deadline, &mut buf, matches) {
        Ok(()) => Ok(format!("echo reply from {host} ({how})")),
        Err((None, ignored)) => Err(format!(
            "no echo reply from {host} within {} ms ({how}){}",
            millis(timeout),
            ignored_text(ignored, "not our echo reply")
        )),
        Err((Some(e), _)) => Err(format!("waiting for the echo reply from {host} ({how}): {}", errno_text(&e))),
    }
}

/// Finds `cmd` (a bare name) in `PATH`: an executable regular file.
fn which(cmd: &str) -> Result<PathBuf, String> {
    let path = std::env::var("PATH").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_PATH.to_string());
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(cmd))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or_else(|| format!("{cmd}: command not found in PATH ({path})"))
}

/// The first non-empty line of a command's output, at most 200 characters.
fn first_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    if line.chars().count() > 200 {
        Some(format!("{}…", line.chars().take(200).collect::<String>()))
    } else {
        Some(line.to_string())
    }
}

/// Kills the child's process group and reaps it, waiting at most [`EXEC_REAP_GRACE`]; a child
/// that does not die by then (uninterruptible sleep) is left to a background reaper thread.
fn kill_and_reap(mut child: Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The child leads its own process group (process_group(0)) and is not reaped yet, so
        // the id cannot have been reused.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = child.kill();
    let until = Instant::now() + EXEC_REAP_GRACE;
    while Instant::now() < until {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = std::thread::Builder::new().name("probe-reaper".to_string()).spawn(move || child.wait());
}

/// One of a child's output pipes while an `exec:` probe runs.
struct Pipe {
    fd: i32,
    reader: Box<dyn Read>,
    kept: Vec<u8>,
    eof: bool,
}

fn run_exec(argv: &[String], deadline: Instant, timeout: Duration) -> Outcome {
    let Some(cmd) = argv.first() else {
        return Err("exec: no command".to_string());
    };
    let path = if cmd.starts_with('/') { PathBuf::from(cmd) } else { which(cmd)? };
    let mut child = Command::new(&path)
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {}: {}", path.display(), errno_text(&e)))?;
    let mut pipes: Vec<Pipe> = Vec::with_capacity(2);
    if let Some(p) = child.stdout.take() {
        pipes.push(Pipe { fd: p.as_raw_fd(), reader: Box::new(p), kept: Vec::new(), eof: false });
    }
    if let Some(p) = child.stderr.take() {
        pipes.push(Pipe { fd: p.as_raw_fd(), reader: Box::new(p), kept: Vec::new(), eof: false });
    }
    let status = loop {
        // Exited? Then what it wrote is already in the pipes: drain without waiting.
        let exited = match child.try_wait() {
            Ok(s) => s,
            Err(e) => {
                kill_and_reap(child);
                return Err(format!("waiting for {}: {}", path.display(), errno_text(&e)));
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if exited.is_none() && left.is_zero() {
            kill_and_reap(child);
            return Err(format!("{} still running after {} ms: killed", path.display(), millis(timeout)));
        }
        let open: Vec<usize> = (0..pipes.len()).filter(|&i| !pipes[i].eof).collect();
        let wait_ms = if exited.is_some() {
            0
        } else {
            // Short slices: a grandchild may hold the pipes open after the child exits.
            libc::c_int::try_from(left.as_millis().clamp(1, 20)).unwrap_or(20)
        };
        let mut fds: Vec<libc::pollfd> =
            open.iter().map(|&i| libc::pollfd { fd: pipes[i].fd, events: libc::POLLIN, revents: 0 }).collect();
        let ready = if fds.is_empty() {
            if exited.is_none() {
                std::thread::sleep(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(1)));
            }
            0
        } else {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for pipes we own.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) }
        };
        if ready > 0 {
            for (pfd, &i) in fds.iter().zip(&open) {
                if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
                    continue;
                }
                let mut chunk = [0u8; 4096];
                let pipe = &mut pipes[i];
                match pipe.reader.read(&mut chunk) {
                    Ok(0) | Err(_) => pipe.eof = true,
                    Ok(n) => {
                        let room = EXEC_CAPTURE_MAX.saturating_sub(pipe.kept.len());
                        pipe.kept.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
        }
        if let Some(st) = exited {
            // Keep draining while data keeps coming, but not past the deadline (a grandchild
            // may write forever).
            if ready <= 0 || left.is_zero() {
                break st;
            }
        }
    };
    let out = pipes.first().and_then(|p| first_line(&p.kept));
    let err = pipes.get(1).and_then(|p| first_line(&p.kept));
    let said = match (out, err) {
        (Some(o), _) => format!(": {o}"),
        (None, Some(e)) => format!(": {e}"),
        (None, None) => String::new(),
    };
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(format!("exit 0{said}")),
        (Some(c), _) => Err(format!("exit {c}{said}")),
        (None, Some(sig)) => Err(format!("killed by signal {sig}{said}")),
        (None, None) => Err(format!("ended with {status}{said}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips() {
        for spec in [
            "tcp:198.18.0.1:22",
            "tcp:[fd42::1]:22",
            "udp-dns:198.18.0.1:53:example.org.",
            "udp-dns:[fd42::1]:5353:a-b.example",
            "icmp:198.18.0.1",
            "icmp:[fd42::1]",
            "exec:/bin/true",
            "exec:sh -c 'echo \"a b\"; exit 0' '' 'x'\\''y'",
        ] {
            let p = Probe::parse(spec).expect("parses");
            let again = Probe::parse(&p.to_string()).expect("display parses");
            assert_eq!(p, again, "{spec} -> {p}");
        }
    }

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"a  'b c' "d \" e" f\ g h'i'j """#).expect("splits"),
            ["a", "b c", "d \" e", "f g", "hij", ""]
        );
        assert!(split_words("'open").is_err());
        assert!(split_words("\"open").is_err());
        assert!(split_words("x\\").is_err());
    }

    #[test]
    fn dns_wire() {
        let q = dns_query(0xabcd, "a.bc.").expect("query");
        assert_eq!(q, [0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1]);
        // The query itself is not a response.
        assert_eq!(dns_response(&q, 0xabcd), None);
        let mut r = q.clone();
        r[2] |= 0x80;
        r[3] = 0x83;
        assert_eq!(dns_response(&r, 0xabcd), Some(DnsAnswer { rcode: 3, answers: 0 }));
        assert_eq!(dns_response(&r, 0xabce), None);
        assert_eq!(dns_response(&r[..11], 0xabcd), None);
    }

    #[test]
    fn checksum() {
        // Echo request id 0x1234 seq 1, no payload: 0800 0000 1234 0001 -> 0xe5ca.
        assert_eq!(inet_checksum(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]), 0xe5ca);
    }
}
