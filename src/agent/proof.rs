//! Proof of a new connection (DESIGN §4): who is asking, over which SSH connection, from which
//! login session.
//!
//! The agent identifies every apply and confirm from the requester's process ancestry and from
//! what the kernel recorded about its login — never from what the requester says about itself:
//!
//! 1. Walk the ancestry of the peer pid (`/proc/PID/stat`: comm and ppid) to the nearest
//!    `sshd` or `sshd-session` (OpenSSH ≥ 9.8) process. If it is a per-connection process
//!    (title `sshd: user@pts/0`, `sshd: user@notty`, `sshd: user [priv]`, or the same with
//!    `sshd-session:`), that process holds the connection's TCP socket; the `[priv]` monitor
//!    above it holds the same socket. Any other nearest sshd (the listener, a pre-auth process,
//!    an unrecognised title) means "under sshd but not identifiable": refused.
//! 2. Read that process's fds (`/proc/SSHD/fd/*` → `socket:[INODE]`; sshd session processes
//!    are non-dumpable, so this needs CAP_SYS_PTRACE) and look the inodes up in
//!    `/proc/SSHD/net/tcp` and `tcp6` — the tables of *its* network namespace.
//! 3. Which socket: the ESTABLISHED TCP sockets that process holds. When it holds more than one
//!    (port forwarding: `-L` opens outgoing connections, `-R` accepts connections, all held by
//!    the session process), keep those also held by the `[priv]` monitor of the same connection
//!    (it never forwards), then those whose local port is one the sshd listener ancestor
//!    listens on. Exactly one must remain; otherwise the requester is refused
//!    ([`ProofError::UnidentifiedSsh`]).
//! 4. The login session of the requester ([`LoginSession`]), whatever its ancestry: the audit
//!    session id (`/proc/PID/sessionid`, given a fresh value per connection by `pam_loginuid`
//!    and inherited across fork, `setsid`, double fork and reparenting to init), the login uid
//!    (`/proc/PID/loginuid`, display only) and the systemd session scope (`session-N.scope` in
//!    `/proc/PID/cgroup`, where systemd-logind runs). A value equal to the sshd listener's own
//!    is inherited from whoever started sshd, not set per connection: it is dropped.
//! 5. `SSH_CONNECTION` in the environment is never evidence (inherited, strippable, spoofable).
//!    Only when there is no sshd ancestor, a well-formed one is recorded as an *unverified
//!    claim* ([`Via::Env`]): at apply it makes the proof stricter for that transaction (its
//!    confirm must come over a verified new SSH connection, not the claimed one); a confirm
//!    carrying one is treated as not over SSH.
//!
//! The decision ([`decide_confirm`]): a transaction applied by a local shell (no SSH at all)
//! may be confirmed by anyone the agent accepts. One applied over SSH is confirmed only by a
//! requester that carries an identifier, differs from the apply by EVERY identifier both have
//! (connection 4-tuple, audit session id, session scope), runs under a verified SSH connection
//! (a detached process, a cron or `at` job, a multiplexer's pane is not one), and whose client
//! address is not loopback or one of the target's own addresses (`ssh localhost` from inside the
//! old session is a new connection that proves nothing about the outside path).
//!
//! Parsing (`/proc/PID/stat`, cmdline, environ, sessionid, loginuid, cgroup, `/proc/net/tcp[6]`)
//! and the decisions are pure functions over parsed inputs; [`origin_of`] only adds the reads of
//! `/proc`.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// Longest ancestry walked (a loop guard; real chains are a few dozen at most).
const MAX_DEPTH: usize = 4096;

/// `st` value of an ESTABLISHED socket in `/proc/net/tcp`.
pub const TCP_ESTABLISHED: u8 = 0x01;
/// `st` value of a LISTEN socket in `/proc/net/tcp`.
pub const TCP_LISTEN: u8 = 0x0A;
/// `/proc/PID/sessionid` and `/proc/PID/loginuid` of a process no login ever touched.
pub const AUDIT_UNSET: u32 = u32::MAX;

/// Errors identifying a requester. Every error means "refuse": a confirm whose origin cannot
/// be established is never accepted.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// The requester has an sshd ancestor but its connection cannot be identified. Never
    /// treated as a local shell.
    #[error("process {pid} runs under sshd but its SSH connection cannot be identified ({reason}); refused")]
    UnidentifiedSsh {
        /// The requester.
        pid: i32,
        /// What went wrong.
        reason: String,
    },
    /// The requester no longer exists.
    #[error("process {pid} is gone")]
    ProcGone {
        /// The requester.
        pid: i32,
    },
    /// An ancestor exited while the ancestry was walked (the chain changed under us).
    #[error("ancestor {ancestor} of process {pid} exited while its ancestry was read")]
    AncestorGone {
        /// The requester.
        pid: i32,
        /// The ancestor that vanished.
        ancestor: i32,
    },
    /// A `/proc` file of the requester or of an ancestor could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file or `SSH_CONNECTION` value did not have the expected shape.
    #[error("malformed {what}: {text:?}")]
    Malformed {
        /// Which kind of input.
        what: &'static str,
        /// The offending text (shortened).
        text: String,
    },
}

pub use crate::origin::{LoginSession, Origin, SshConn4, Via};

/// Why a confirm was refused: what the decision rested on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalReason {
    /// The same SSH connection (4-tuple) as the apply ([`ConfirmRefusal::conn`]).
    SameConnection,
    /// The same audit session id as the apply: a process of the applying login, however
    /// detached.
    SameAuditSession(u32),
    /// The same systemd session scope as the apply.
    SameScope(String),
    /// No identifier at all (no sshd ancestor, no audit session id, no session scope).
    NoIdentifier,
    /// Not under a verified SSH connection (no sshd ancestor) while the apply came over SSH.
    NotOverSsh,
    /// A new SSH connection, but its client address is loopback or one of the target's own.
    Loopback(IpAddr),
}

impl RefusalReason {
    /// A short name of the identifier or rule, for logs and tests: `connection`,
    /// `audit-session`, `scope`, `no-identifier`, `not-over-ssh`, `loopback`.
    pub fn key(&self) -> &'static str {
        match self {
            RefusalReason::SameConnection => "connection",
            RefusalReason::SameAuditSession(_) => "audit-session",
            RefusalReason::SameScope(_) => "scope",
            RefusalReason::NoIdentifier => "no-identifier",
            RefusalReason::NotOverSsh => "not-over-ssh",
            RefusalReason::Loopback(_) => "loopback",
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::SameConnection => f.write_str(
                "it came over the same SSH connection as the apply; an old session proves nothing about new connections",
            ),
            RefusalReason::SameAuditSession(s) => write!(
                f,
                "it runs in the same login session as the apply (audit session {s}): a process of the applying \
                 connection, detached or not, proves nothing about new connections"
            ),
            RefusalReason::SameScope(s) => {
                write!(f, "it runs in the same systemd login session as the apply ({})", escape(s))
            }
            RefusalReason::NoIdentifier => f.write_str(
                "it carries no identifier of a connection or login session (no sshd ancestor, no audit session id, \
                 no session scope): nothing shows it comes from a new connection",
            ),
            RefusalReason::NotOverSsh => f.write_str(
                "it does not run under an SSH connection (no sshd ancestor; SSH_CONNECTION is no evidence) and the \
                 change was applied over SSH: only a new SSH connection proves the way in still works",
            ),
            RefusalReason::Loopback(ip) => write!(
                f,
                "its SSH client address {ip} is over loopback / from this host: proves nothing about the outside path"
            ),
        }
    }
}

/// A confirm refused by the proof of a new connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "confirm refused: {}. Confirm from a NEW connection, e.g. `{}` (a shared ControlMaster \
     connection counts as the same one)",
    self.why(),
    self.new_connection_command(None)
)]
pub struct ConfirmRefusal {
    /// The connection the apply came over (verified or claimed): where to connect anew.
    pub conn: SshConn4,
    /// What the refusal rests on.
    pub reason: RefusalReason,
}

impl ConfirmRefusal {
    /// The command that confirms from a new connection (see [`SshConn4::new_connection_command`]).
    pub fn new_connection_command(&self, txid: Option<&str>) -> String {
        self.conn.new_connection_command(txid)
    }

    /// What the refusal rests on, in words (the connection named when it is the same one).
    pub fn why(&self) -> String {
        match self.reason {
            RefusalReason::SameConnection => format!(
                "it came over the same SSH connection as the apply ({}); an old session proves nothing about new \
                 connections",
                self.conn
            ),
            _ => self.reason.to_string(),
        }
    }
}

/// What an accepted confirm rested on, for the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// One line: which identifiers differ, or why no proof was needed.
    pub basis: String,
}

impl fmt::Display for Accepted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.basis)
    }
}

/// True when both come over the same SSH connection, verified or claimed (two local origins are
/// not a connection).
pub fn same_connection(a: &Origin, b: &Origin) -> bool {
    matches!((a.conn(), b.conn()), (Some(x), Some(y)) if x == y)
}

/// True when `ip` is loopback, unspecified, or one of `local_addrs` (IPv4-mapped IPv6 compared
/// as IPv4).
pub fn is_local_client(ip: IpAddr, local_addrs: &[IpAddr]) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified() || local_addrs.iter().any(|a| a.to_canonical() == ip)
}

/// The proof of a new connection (see the module doc), with the target's own addresses
/// (`local_addrs`, from [`local_addresses`] run in the target's namespace). Loopback and the
/// confirming connection's own server address count as local even with an empty list.
pub fn decide_confirm(
    applied: &Origin,
    confirming: &Origin,
    local_addrs: &[IpAddr],
) -> Result<Accepted, ConfirmRefusal> {
    let Origin::Ssh { conn: applied_conn, .. } = applied else {
        return Ok(Accepted { basis: "the apply did not come over SSH: no new connection needed".into() });
    };
    let refuse = |reason| Err(ConfirmRefusal { conn: *applied_conn, reason });
    let (a, c) = (applied.session(), confirming.session());
    let c_conn = confirming.verified_conn();
    if c_conn.is_none() && !c.identifies() {
        return refuse(RefusalReason::NoIdentifier);
    }
    let mut differs = Vec::new();
    if let Some(cc) = c_conn {
        if cc == applied_conn {
            return refuse(RefusalReason::SameConnection);
        }
        differs.push(format!("connection {cc} vs {applied_conn}"));
    }
    if let (Some(x), Some(y)) = (a.audit_session, c.audit_session) {
        if x == y {
            return refuse(RefusalReason::SameAuditSession(y));
        }
        differs.push(format!("audit session {y} vs {x}"));
    }
    if let (Some(x), Some(y)) = (&a.scope, &c.scope) {
        if x == y {
            return refuse(RefusalReason::SameScope(y.clone()));
        }
        differs.push(format!("scope {} vs {}", escape(y), escape(x)));
    }
    let Some(cc) = c_conn else { return refuse(RefusalReason::NotOverSsh) };
    let client = cc.client.ip().to_canonical();
    if is_local_client(client, local_addrs) || client == cc.server.ip().to_canonical() {
        return refuse(RefusalReason::Loopback(client));
    }
    Ok(Accepted {
        basis: format!(
            "a new SSH connection from {client}, not one of the target's addresses; differs from the apply by {}",
            differs.join(", ")
        ),
    })
}

/// [`decide_confirm`] without the target's address list (loopback and the connection's own
/// server address are still refused): `Ok` when the confirm proves a new connection.
pub fn check_confirm(applied: &Origin, confirming: &Origin) -> Result<(), ConfirmRefusal> {
    decide_confirm(applied, confirming, &[]).map(|_| ())
}

/// The addresses configured on the interfaces of the calling thread's network namespace
/// (`getifaddrs`, which asks the kernel over a netlink socket created on this thread): call it
/// on the target's worker thread. Empty when they cannot be read (loopback and the connection's
/// own server address are still recognised by [`decide_confirm`]).
pub fn local_addresses() -> Vec<IpAddr> {
    match crate::probe::local_interface_addresses() {
        Ok(a) => a.into_iter().map(|ip| ip.to_canonical()).collect(),
        Err(e) => {
            tracing::warn!("cannot list this namespace's addresses: {e}");
            Vec::new()
        }
    }
}

/// `s` with control characters and non-ASCII escaped (values read from `/proc` end up in
/// messages and the journal).
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| if c.is_ascii_graphic() || c == ' ' { vec![c] } else { c.escape_default().collect() })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Pure parsing

/// What `/proc/PID/stat` says about a process (the fields used here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// `comm` (at most 15 bytes).
    pub comm: String,
    /// Parent pid (0 for the top of a pid namespace).
    pub ppid: i32,
    /// Start time in clock ticks since boot (identity against pid reuse).
    pub starttime: u64,
}

/// Parses `/proc/PID/stat`. The comm is between the first `(` and the LAST `)`: it may hold
/// spaces and parentheses.
pub fn parse_stat(text: &str) -> Result<Stat, ProofError> {
    let bad = || ProofError::Malformed { what: "/proc/PID/stat", text: shorten(text) };
    let open = text.find('(').ok_or_else(bad)?;
    let close = text.rfind(')').ok_or_else(bad)?;
    if close < open {
        return Err(bad());
    }
    let comm = text[open + 1..close].to_string();
    // After ") ": state(3) ppid(4) … starttime(22); index 0 here is field 3.
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ppid = rest.get(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let starttime = rest.get(19).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok(Stat { comm, ppid, starttime })
}

/// `/proc/PID/cmdline` as one line: NULs become spaces, trailing padding is trimmed (sshd's
/// `setproctitle` overwrites argv and pads with spaces or NULs).
pub fn parse_cmdline(raw: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(raw).chars().map(|c| if c == '\0' { ' ' } else { c }).collect();
    s.trim_end().to_string()
}

/// The value of `name` in a `/proc/PID/environ` block (NUL-separated `KEY=VALUE`).
pub fn environ_var(raw: &[u8], name: &str) -> Option<String> {
    raw.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// Parses `SSH_CONNECTION` (`client_ip client_port server_ip server_port`); IPv6 addresses come
/// without brackets, a `%scope` suffix is dropped, IPv4-mapped IPv6 becomes IPv4.
pub fn parse_ssh_connection(value: &str) -> Result<SshConn4, ProofError> {
    let bad = || ProofError::Malformed { what: "SSH_CONNECTION", text: shorten(value) };
    let f: Vec<&str> = value.split_whitespace().collect();
    if f.len() != 4 {
        return Err(bad());
    }
    let ip = |s: &str| -> Option<IpAddr> {
        let s = s.split('%').next().unwrap_or(s);
        s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
    };
    let port = |s: &str| s.parse::<u16>().ok();
    let client = SocketAddr::new(ip(f[0]).ok_or_else(bad)?, port(f[1]).ok_or_else(bad)?);
    let server = SocketAddr::new(ip(f[2]).ok_or_else(bad)?, port(f[3]).ok_or_else(bad)?);
    Ok(SshConn4 { client, server })
}

/// The inode of a `/proc/PID/fd/N` link target `socket:[INODE]`; `None` for anything else.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// One line of `/proc/net/tcp` or `tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local address and port (IPv4-mapped IPv6 shown as IPv4).
    pub local: SocketAddr,
    /// Remote address and port.
    pub remote: SocketAddr,
    /// State (`st`): [`TCP_ESTABLISHED`], [`TCP_LISTEN`], …
    pub state: u8,
    /// Socket inode (0 for sockets no longer attached to a file, e.g. TIME_WAIT).
    pub inode: u64,
}

/// Parses an address field `HEX:PORT`. The kernel prints each 32-bit word of the address in
/// network byte order as a native-endian `%08X`, and the port in host order.
fn parse_tcp_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses one data line of `/proc/net/tcp` or `tcp6` (`sl local rem st … uid timeout inode …`).
pub fn parse_tcp_line(line: &str) -> Result<TcpEntry, ProofError> {
    let bad = || ProofError::Malformed { what: "/proc/net/tcp line", text: shorten(line) };
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 || !f[0].ends_with(':') {
        return Err(bad());
    }
    let local = parse_tcp_addr(f[1]).ok_or_else(bad)?;
    let remote = parse_tcp_addr(f[2]).ok_or_else(bad)?;
    let state = u8::from_str_radix(f[3], 16).map_err(|_| bad())?;
    let inode = f[9].parse().map_err(|_| bad())?;
    Ok(TcpEntry { local, remote, state, inode })
}

/// Parses a whole `/proc/net/tcp` or `tcp6` file (the header line is skipped).
pub fn parse_proc_net_tcp(text: &str) -> Result<Vec<TcpEntry>, ProofError> {
    text.lines().skip(1).filter(|l| !l.trim().is_empty()).map(parse_tcp_line).collect()
}

/// Parses `/proc/PID/sessionid` (decimal, no newline): `None` when unset ([`AUDIT_UNSET`]).
pub fn parse_sessionid(text: &str) -> Result<Option<u32>, ProofError> {
    parse_audit_id(text, "/proc/PID/sessionid")
}

/// Parses `/proc/PID/loginuid` (decimal, no newline): `None` when unset ([`AUDIT_UNSET`]).
pub fn parse_loginuid(text: &str) -> Result<Option<u32>, ProofError> {
    parse_audit_id(text, "/proc/PID/loginuid")
}

fn parse_audit_id(text: &str, what: &'static str) -> Result<Option<u32>, ProofError> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProofError::Malformed { what, text: shorten(text) });
    }
    match t.parse::<u32>() {
        Ok(AUDIT_UNSET) => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(_) => Err(ProofError::Malformed { what, text: shorten(text) }),
    }
}

/// The systemd login session scope in a `/proc/PID/cgroup` text (`ID:CONTROLLERS:PATH` lines):
/// the path up to and including its `session-N.scope` component, from the unified (`0::`)
/// hierarchy, else from the v1 `name=systemd` one. `None` when the process is in no session
/// scope (a system service, a user manager's unit, no systemd).
pub fn session_scope(cgroup: &str) -> Option<String> {
    let scope_of = |path: &str| -> Option<String> {
        let mut out = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            out.push('/');
            out.push_str(comp);
            let id = comp.strip_prefix("session-").and_then(|r| r.strip_suffix(".scope"));
            if id.is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric())) {
                return Some(out);
            }
        }
        None
    };
    let line_path = |want: &dyn Fn(&str, &str) -> bool| {
        cgroup.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, ctl, path) = (f.next()?, f.next()?, f.next()?);
            want(id, ctl).then_some(path)
        })
    };
    line_path(&|id, ctl| id == "0" && ctl.is_empty())
        .and_then(scope_of)
        .or_else(|| line_path(&|_, ctl| ctl == "name=systemd").and_then(scope_of))
}

fn shorten(s: &str) -> String {
    s.chars().take(200).collect()
}

// ---------------------------------------------------------------------------------------------
// Pure decisions

/// What an sshd process is, from its comm and title.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshdRole {
    /// The listener (`sshd: /usr/sbin/sshd -D [listener] …`).
    Listener,
    /// The privileged monitor of one connection (`sshd: user [priv]`), holding its socket.
    Monitor,
    /// The session process of one connection (`sshd: user@pts/0`, `sshd: user@notty`).
    Session,
    /// Anything else (pre-auth `[net]`, an unrecognised title).
    Other,
}

/// True for the comm of an sshd process: `sshd`, or `sshd-session` (OpenSSH ≥ 9.8).
pub fn is_sshd_comm(comm: &str) -> bool {
    comm == "sshd" || comm == "sshd-session"
}

/// Classifies an sshd process by its title (`/proc/PID/cmdline`, see [`parse_cmdline`]).
pub fn classify_sshd(cmdline: &str) -> SshdRole {
    let Some(rest) = cmdline.strip_prefix("sshd: ").or_else(|| cmdline.strip_prefix("sshd-session: ")) else {
        // `/usr/sbin/sshd -D …` before it set a title, `sshd -i`, …
        return SshdRole::Other;
    };
    let rest = rest.trim();
    if rest.starts_with('/') || rest.contains("[listener]") {
        SshdRole::Listener
    } else if let Some(user) = rest.strip_suffix("[priv]") {
        if user.trim().is_empty() || user.trim() == "unknown" {
            SshdRole::Other
        } else {
            SshdRole::Monitor
        }
    } else if rest.ends_with(']') {
        // `[net]`, `[preauth]`, `[accepted]`: not an authenticated connection.
        SshdRole::Other
    } else if let Some((user, tty)) = rest.rsplit_once('@') {
        if user.is_empty() || tty.is_empty() || tty.contains(' ') {
            SshdRole::Other
        } else {
            SshdRole::Session
        }
    } else {
        SshdRole::Other
    }
}

/// One process of an ancestry chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ancestor {
    /// Its pid.
    pub pid: i32,
    /// `/proc/PID/stat`.
    pub stat: Stat,
    /// Its title, read only for sshd processes (empty otherwise).
    pub cmdline: String,
}

/// Where the ancestry leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshdAncestry {
    /// No sshd process among the ancestors.
    None,
    /// The connection's sshd processes.
    Connection {
        /// The per-connection sshd processes, nearest first (`sshd: user@…`, then the
        /// `[priv]` monitor when there is one).
        holders: Vec<i32>,
        /// The sshd listener above them, when it is an ancestor.
        listener: Option<i32>,
    },
    /// An sshd ancestor that is not a per-connection process: why.
    Unidentified(String),
}

/// Finds the connection's sshd processes in an ancestry chain (nearest first, the requester
/// itself at index 0).
pub fn sshd_ancestry(chain: &[Ancestor]) -> SshdAncestry {
    let Some(first) = chain.iter().position(|a| is_sshd_comm(&a.stat.comm)) else {
        return SshdAncestry::None;
    };
    let nearest = &chain[first];
    match classify_sshd(&nearest.cmdline) {
        SshdRole::Session | SshdRole::Monitor => {}
        role => {
            return SshdAncestry::Unidentified(format!(
                "its nearest sshd ancestor {} ({:?}) is {} rather than a per-connection process",
                nearest.pid,
                nearest.cmdline,
                match role {
                    SshdRole::Listener => "the listener",
                    _ => "not recognised",
                }
            ))
        }
    }
    let mut holders = vec![nearest.pid];
    let mut listener = None;
    for a in &chain[first + 1..] {
        if !is_sshd_comm(&a.stat.comm) {
            break;
        }
        match classify_sshd(&a.cmdline) {
            SshdRole::Monitor | SshdRole::Session => holders.push(a.pid),
            SshdRole::Listener => {
                listener = Some(a.pid);
                break;
            }
            SshdRole::Other => break,
        }
    }
    SshdAncestry::Connection { holders, listener }
}

/// Socket inodes held by one process, or why they could not be read.
pub type Held = Result<BTreeSet<u64>, String>;

/// Picks the connection's socket (see the module doc, step 3): the ESTABLISHED TCP sockets held
/// by `holders[0]`, narrowed by the other holders and by the listener's ports when more than
/// one. `tcp` is the table of holders\[0\]'s namespace (`tcp` and `tcp6` together).
pub fn pick_connection(holders: &[(i32, Held)], listener: Option<&Held>, tcp: &[TcpEntry]) -> Result<SshConn4, String> {
    let Some((nearest, held)) = holders.first() else {
        return Err("no sshd process".to_string());
    };
    let held = held.as_ref().map_err(|e| format!("cannot read the fds of sshd {nearest}: {e}"))?;
    let mut cands: Vec<&TcpEntry> =
        tcp.iter().filter(|e| e.state == TCP_ESTABLISHED && e.inode != 0 && held.contains(&e.inode)).collect();
    if cands.is_empty() {
        return Err(format!("sshd {nearest} holds no ESTABLISHED TCP socket"));
    }
    for (pid, other) in &holders[1..] {
        if cands.len() <= 1 {
            break;
        }
        // A monitor whose fds cannot be read narrows nothing; the next rule may.
        if let Ok(other) = other {
            let kept: Vec<&TcpEntry> = cands.iter().copied().filter(|e| other.contains(&e.inode)).collect();
            if kept.is_empty() {
                return Err(format!("sshd {nearest} and sshd {pid} share no TCP socket"));
            }
            cands = kept;
        }
    }
    if cands.len() > 1 {
        if let Some(Ok(lheld)) = listener {
            let ports: BTreeSet<(IpAddr, u16)> = tcp
                .iter()
                .filter(|e| e.state == TCP_LISTEN && lheld.contains(&e.inode))
                .map(|e| (e.local.ip(), e.local.port()))
                .collect();
            cands.retain(|e| {
                ports.iter().any(|(ip, port)| *port == e.local.port() && (ip.is_unspecified() || *ip == e.local.ip()))
            });
        }
    }
    match cands.as_slice() {
        [one] => Ok(SshConn4 { client: one.remote, server: one.local }),
        [] => Err(format!("none of the TCP connections of sshd {nearest} is on a port its listener listens on")),
        many => Err(format!(
            "sshd {nearest} holds {} candidate connections ({})",
            many.len(),
            many.iter().map(|e| format!("{} -> {}", e.remote, e.local)).collect::<Vec<_>>().join(", ")
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading /proc

/// Where [`origin_of`] reads process data; the real one is `/proc`, tests inject their own.
trait ProcSource {
    fn stat(&self, pid: i32) -> io::Result<String>;
    fn cmdline(&self, pid: i32) -> io::Result<Vec<u8>>;
    fn environ(&self, pid: i32) -> io::Result<Vec<u8>>;
    /// Targets of `/proc/PID/fd/*` links (fds closed while listing are skipped).
    fn fd_links(&self, pid: i32) -> io::Result<Vec<String>>;
    /// `/proc/PID/net/tcp` and `tcp6` (a missing `tcp6` is empty).
    fn net_tcp(&self, pid: i32) -> io::Result<(String, String)>;
    /// A small text file of the process: `sessionid`, `loginuid`, `cgroup`.
    fn text(&self, pid: i32, file: &str) -> io::Result<String>;
}

struct RealProc;

impl ProcSource for RealProc {
    fn stat(&self, pid: i32) -> io::Result<String> {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
    }

    fn cmdline(&self, pid: i32) -> io::Result<Vec<u8>> {
        std::fs::read(format!("/proc/{pid}/cmdline"))
    }

    fn environ(&self, pid: i32) -> io::Result<Vec<u8>> {
        std::fs::read(format!("/proc/{pid}/environ"))
    }

    fn fd_links(&self, pid: i32) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for ent in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            let ent = ent?;
            match std::fs::read_link(ent.path()) {
                Ok(t) => out.push(t.to_string_lossy().into_owned()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn net_tcp(&self, pid: i32) -> io::Result<(String, String)> {
        let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
        let tcp6 = match std::fs::read_to_string(format!("/proc/{pid}/net/tcp6")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok((tcp, tcp6))
    }

    fn text(&self, pid: i32, file: &str) -> io::Result<String> {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
    }
}

/// Identifies where process `pid` comes from (see the module doc). The agent runs as root with
/// CAP_SYS_PTRACE (sshd session processes are non-dumpable). Any error means "refuse".
pub fn origin_of(pid: i32) -> Result<Origin, ProofError> {
    origin_with(&RealProc, pid)
}

fn read_err(pid: i32, file: &str, source: io::Error) -> ProofError {
    ProofError::Read { path: PathBuf::from(format!("/proc/{pid}/{file}")), source }
}

fn gone(e: &io::Error) -> bool {
    // ESRCH: the process died between open and read.
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

fn ancestry(src: &dyn ProcSource, pid: i32) -> Result<Vec<Ancestor>, ProofError> {
    let mut chain: Vec<Ancestor> = Vec::new();
    let mut cur = pid;
    while cur > 0 && chain.len() < MAX_DEPTH {
        let text = match src.stat(cur) {
            Ok(t) => t,
            Err(e) if gone(&e) && cur == pid => return Err(ProofError::ProcGone { pid }),
            Err(e) if gone(&e) => return Err(ProofError::AncestorGone { pid, ancestor: cur }),
            Err(e) => return Err(read_err(cur, "stat", e)),
        };
        let stat = parse_stat(&text)?;
        let cmdline = if is_sshd_comm(&stat.comm) {
            match src.cmdline(cur) {
                Ok(raw) => parse_cmdline(&raw),
                Err(e) if gone(&e) => return Err(ProofError::AncestorGone { pid, ancestor: cur }),
                // An sshd ancestor whose title cannot be read: under sshd, unidentifiable.
                Err(e) => {
                    let reason = format!("cannot read the title of sshd ancestor {cur}: {e}");
                    return Err(ProofError::UnidentifiedSsh { pid, reason });
                }
            }
        } else {
            String::new()
        };
        let ppid = stat.ppid;
        chain.push(Ancestor { pid: cur, stat, cmdline });
        if ppid == cur || chain.iter().any(|a| a.pid == ppid) {
            break;
        }
        cur = ppid;
    }
    Ok(chain)
}

fn held_sockets(src: &dyn ProcSource, pid: i32) -> Held {
    match src.fd_links(pid) {
        Ok(links) => Ok(links.iter().filter_map(|l| socket_inode(l)).collect()),
        Err(e) => Err(e.to_string()),
    }
}

/// The login session of `pid` (see [`LoginSession`]). A file that does not exist while the
/// process does (a kernel without audit syscall support) is "unknown"; any other failure is an
/// error (refuse).
fn login_session(src: &dyn ProcSource, pid: i32) -> Result<LoginSession, ProofError> {
    let read = |file: &str| -> Result<Option<String>, ProofError> {
        match src.text(pid, file) {
            Ok(t) => Ok(Some(t)),
            Err(e) if gone(&e) => match src.stat(pid) {
                Ok(_) => Ok(None),
                Err(_) => Err(ProofError::ProcGone { pid }),
            },
            Err(e) => Err(read_err(pid, file, e)),
        }
    };
    let audit_session = read("sessionid")?.map(|t| parse_sessionid(&t)).transpose()?.flatten();
    let login_uid = read("loginuid")?.map(|t| parse_loginuid(&t)).transpose()?.flatten();
    let scope = read("cgroup")?.and_then(|t| session_scope(&t));
    Ok(LoginSession { audit_session, login_uid, scope })
}

/// Drops the identifiers `session` shares with the sshd listener `listener`: those were
/// inherited from whoever started sshd (`UsePAM no`, or sshd started by hand from a login),
/// not set per connection.
fn without_listeners(src: &dyn ProcSource, mut session: LoginSession, listener: Option<i32>) -> LoginSession {
    let Some(l) = listener else { return session };
    let Ok(ls) = login_session(src, l) else { return session };
    if session.audit_session.is_some() && session.audit_session == ls.audit_session {
        session.audit_session = None;
    }
    if session.scope.is_some() && session.scope == ls.scope {
        session.scope = None;
    }
    session
}

fn origin_with(src: &dyn ProcSource, pid: i32) -> Result<Origin, ProofError> {
    let chain = ancestry(src, pid)?;
    let unidentified = |reason: String| ProofError::UnidentifiedSsh { pid, reason };
    let session = login_session(src, pid)?;
    // Still the process the ancestry saw (no pid reuse while its session was read).
    let before = chain.first().map(|a| a.stat.starttime);
    let now = src.stat(pid).ok().and_then(|t| parse_stat(&t).ok()).map(|s| s.starttime);
    if before != now {
        return Err(ProofError::ProcGone { pid });
    }
    match sshd_ancestry(&chain) {
        SshdAncestry::Unidentified(reason) => Err(unidentified(reason)),
        SshdAncestry::Connection { holders, listener } => {
            let nearest = holders[0];
            let (tcp, tcp6) = src
                .net_tcp(nearest)
                .map_err(|e| unidentified(format!("cannot read the TCP table of sshd {nearest}: {e}")))?;
            let mut table = parse_proc_net_tcp(&tcp).map_err(|e| unidentified(e.to_string()))?;
            table.extend(parse_proc_net_tcp(&tcp6).map_err(|e| unidentified(e.to_string()))?);
            let held: Vec<(i32, Held)> = holders.iter().map(|&h| (h, held_sockets(src, h))).collect();
            let lheld = listener.map(|l| held_sockets(src, l));
            let conn = pick_connection(&held, lheld.as_ref(), &table).map_err(unidentified)?;
            // The sshd still is the process the ancestry saw (no pid reuse in between).
            let before = chain.iter().find(|a| a.pid == nearest).map(|a| a.stat.starttime);
            let now = src.stat(nearest).ok().and_then(|t| parse_stat(&t).ok()).map(|s| s.starttime);
            if before.is_none() || before != now {
                return Err(unidentified(format!("sshd {nearest} exited while its sockets were read")));
            }
            let session = without_listeners(src, session, listener);
            Ok(Origin::Ssh { conn, sshd_pid: Some(nearest), via: Via::Ancestry, session })
        }
        SshdAncestry::None => {
            // SSH_CONNECTION: an unverified claim, recorded (see the module doc), never evidence.
            let raw = match src.environ(pid) {
                Ok(r) => r,
                Err(e) if gone(&e) => return Err(ProofError::ProcGone { pid }),
                Err(e) => return Err(read_err(pid, "environ", e)),
            };
            match environ_var(&raw, "SSH_CONNECTION") {
                None => Ok(Origin::Local { session }),
                Some(v) => match parse_ssh_connection(&v) {
                    Ok(conn) => Ok(Origin::Ssh { conn, sshd_pid: None, via: Via::Env, session }),
                    Err(e) => Err(unidentified(format!("no sshd ancestor and {e}"))),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("ok")
    }

    fn conn(c: &str, s: &str) -> SshConn4 {
        SshConn4 { client: sa(c), server: sa(s) }
    }

    // Captured on this host (Debian 12, OpenSSH 9.2p1, kernel 6.18) from a namespace's sshd.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 010012C6:08AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2160403 1 00000000f77ea82e 100 0 0 10 0
   1: 010012C6:08AE 020012C6:E57A 01 00000000:00000000 02:000AFBDC 00000000     0        0 2160464 2 00000000e7bf2f82 20 4 18 21 -1
   2: 010012C6:08AE 020012C6:E570 01 00000000:00000000 02:000AFBDC 00000000     0        0 2160457 2 0000000014601258 20 4 18 21 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 000042FD000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0
   1: 000042FD000000000000000001000000:0016 000042FD000000000000000002000000:D431 01 00000000:00000000 02:00000000 00000000     0        0 556 2 0000000000000000 20 4 18 21 -1
   2: 0000000000000000FFFF00000100007F:0016 0000000000000000FFFF00000100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 557 1 0000000000000000 20 4 18 21 -1
";

    #[test]
    fn tcp_tables_parse() {
        let t = parse_proc_net_tcp(TCP).expect("ok");
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0],
            TcpEntry { local: sa("198.18.0.1:2222"), remote: sa("0.0.0.0:0"), state: TCP_LISTEN, inode: 2160403 }
        );
        assert_eq!(t[1].remote, sa("198.18.0.2:58746"));
        assert_eq!(t[1].state, TCP_ESTABLISHED);
        assert_eq!(t[1].inode, 2160464);
        let t6 = parse_proc_net_tcp(TCP6).expect("ok");
        assert_eq!(t6[0].local, sa("[fd42::1]:22"));
        assert_eq!(t6[1].remote, sa("[fd42::2]:54321"));
        // IPv4-mapped addresses of a dual-stack listener come out as IPv4.
        assert_eq!(t6[2].local, sa("127.0.0.1:22"));
        assert_eq!(t6[2].remote, sa("127.0.0.1:40000"));
        assert!(parse_tcp_line("   0: 0100:08AE 00000000:0000 0A 0 0 0 0 0 1").is_err());
        assert!(parse_tcp_line("garbage").is_err());
        assert!(parse_proc_net_tcp("header only\n").expect("ok").is_empty());
    }

    #[test]
    fn stat_cmdline_environ_parse() {
        let s = parse_stat("12485 (sleep) S 12451 12485 12485 0 -1 4194560 96 0 0 0 0 0 0 0 20 0 1 0 98765 5459968 222 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0").expect("ok");
        assert_eq!(s, Stat { comm: "sleep".into(), ppid: 12451, starttime: 98765 });
        let s = parse_stat("7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 42 0").expect("ok");
        assert_eq!((s.comm.as_str(), s.ppid, s.starttime), ("a) b (c)", 1, 42));
        assert!(parse_stat("7 (x) R").is_err());
        assert!(parse_stat("nonsense").is_err());

        assert_eq!(parse_cmdline(b"sshd: root@notty\0\0\0"), "sshd: root@notty");
        assert_eq!(parse_cmdline(b"sshd: ctgtest [priv]                          "), "sshd: ctgtest [priv]");
        assert_eq!(parse_cmdline(b"sleep\x0030\0"), "sleep 30");

        let env = b"PATH=/bin\0SSH_CONNECTION=198.18.0.2 58726 198.18.0.1 2222\0X==y\0";
        assert_eq!(environ_var(env, "SSH_CONNECTION").as_deref(), Some("198.18.0.2 58726 198.18.0.1 2222"));
        assert_eq!(environ_var(env, "X").as_deref(), Some("=y"));
        assert_eq!(environ_var(env, "SSH"), None);
        assert_eq!(environ_var(b"", "SSH_CONNECTION"), None);

        assert_eq!(socket_inode("socket:[2160453]"), Some(2160453));
        assert_eq!(socket_inode("pipe:[2160493]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn ssh_connection_parses() {
        let c = parse_ssh_connection("198.18.0.2 58726 198.18.0.1 2222").expect("ok");
        assert_eq!(c, conn("198.18.0.2:58726", "198.18.0.1:2222"));
        assert_eq!(c.to_env_value(), "198.18.0.2 58726 198.18.0.1 2222");
        let c = parse_ssh_connection("fe80::2%veth0 40000 fe80::1%veth0 22").expect("ok");
        assert_eq!(c, conn("[fe80::2]:40000", "[fe80::1]:22"));
        let c = parse_ssh_connection("::ffff:10.0.0.2 1 ::ffff:10.0.0.1 22").expect("ok");
        assert_eq!(c, conn("10.0.0.2:1", "10.0.0.1:22"));
        for bad in ["", "1.2.3.4 1 5.6.7.8", "1.2.3.4 x 5.6.7.8 22", "host 1 5.6.7.8 22", "1.2.3.4 1 5.6.7.8 70000"] {
            assert!(parse_ssh_connection(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sshd_titles_classify() {
        use SshdRole::*;
        for (t, r) in [
            ("sshd: /usr/sbin/sshd -D -e -f /tmp/x/sshd_config [listener] 0 of 10-100 startups", Listener),
            ("sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups", Listener),
            ("sshd: root@notty", Session),
            ("sshd: root@pts/0", Session),
            ("sshd: ctgtest [priv]", Monitor),
            ("sshd: ctgtest@pts/1", Session),
            ("sshd-session: alice [priv]", Monitor),
            ("sshd-session: alice@pts/3", Session),
            ("sshd-session: alice@notty", Session),
            ("sshd: unknown [priv]", Other),
            ("sshd: alice [net]", Other),
            ("sshd: 198.18.0.2 [preauth]", Other),
            ("/usr/sbin/sshd -D", Other),
            ("sshd -i", Other),
            ("sshd: weird", Other),
        ] {
            assert_eq!(classify_sshd(t), r, "{t}");
        }
        assert!(is_sshd_comm("sshd") && is_sshd_comm("sshd-session") && !is_sshd_comm("ssh"));
    }

    fn anc(pid: i32, ppid: i32, comm: &str, cmdline: &str) -> Ancestor {
        Ancestor { pid, stat: Stat { comm: comm.into(), ppid, starttime: pid as u64 }, cmdline: cmdline.into() }
    }

    #[test]
    fn ancestry_finds_the_connection() {
        let listener = anc(100, 1, "sshd", "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups");
        // Root login (no privsep split after auth), measured on OpenSSH 9.2.
        let chain = [anc(300, 200, "sleep", ""), anc(200, 100, "sshd", "sshd: root@notty"), listener.clone()];
        assert_eq!(sshd_ancestry(&chain), SshdAncestry::Connection { holders: vec![200], listener: Some(100) });
        // Unprivileged user: [priv] monitor above the session.
        let chain = [
            anc(400, 310, "ctguard", ""),
            anc(310, 300, "sudo", ""),
            anc(300, 210, "bash", ""),
            anc(210, 200, "sshd-session", "sshd-session: alice@pts/0"),
            anc(200, 100, "sshd-session", "sshd-session: alice [priv]"),
            listener.clone(),
            anc(1, 0, "systemd", ""),
        ];
        assert_eq!(sshd_ancestry(&chain), SshdAncestry::Connection { holders: vec![210, 200], listener: Some(100) });
        // The listener restarted: sessions reparented to init.
        let chain = [anc(300, 200, "bash", ""), anc(200, 1, "sshd", "sshd: root@pts/0"), anc(1, 0, "init", "")];
        assert_eq!(sshd_ancestry(&chain), SshdAncestry::Connection { holders: vec![200], listener: None });
        // No sshd at all.
        let chain = [anc(300, 1, "bash", ""), anc(1, 0, "init", "")];
        assert_eq!(sshd_ancestry(&chain), SshdAncestry::None);
        // The nearest sshd is the listener or an unknown title: refused.
        let chain = [anc(300, 100, "bash", ""), listener];
        assert!(matches!(sshd_ancestry(&chain), SshdAncestry::Unidentified(r) if r.contains("listener")));
        let chain = [anc(300, 200, "bash", ""), anc(200, 1, "sshd", "/usr/sbin/sshd -i")];
        assert!(matches!(sshd_ancestry(&chain), SshdAncestry::Unidentified(_)));
    }

    fn est(local: &str, remote: &str, inode: u64) -> TcpEntry {
        TcpEntry { local: sa(local), remote: sa(remote), state: TCP_ESTABLISHED, inode }
    }

    fn lis(local: &str, inode: u64) -> TcpEntry {
        TcpEntry { local: sa(local), remote: sa("0.0.0.0:0"), state: TCP_LISTEN, inode }
    }

    fn set(v: &[u64]) -> Held {
        Ok(v.iter().copied().collect())
    }

    #[test]
    fn connection_socket_is_picked() {
        let table = [
            lis("0.0.0.0:22", 1),
            est("10.0.0.1:22", "10.0.0.9:40000", 2),
            // `-L` forwarding: an outgoing connection held by the session process.
            est("10.0.0.1:51000", "10.0.0.1:22", 3),
            // The other end of that forwarded connection, held by another session.
            est("10.0.0.1:22", "10.0.0.1:51000", 4),
            // `-R` forwarding: a listener and an accepted connection held by the session.
            lis("127.0.0.1:8080", 5),
            est("127.0.0.1:8080", "127.0.0.1:33000", 6),
            TcpEntry { local: sa("10.0.0.1:22"), remote: sa("10.0.0.8:1"), state: 0x06, inode: 0 },
        ];
        let want = conn("10.0.0.9:40000", "10.0.0.1:22");
        // Plain: one established socket.
        assert_eq!(pick_connection(&[(200, set(&[2, 77]))], None, &table), Ok(want));
        // Forwardings (root: no monitor) → the listener's port decides.
        let listener = set(&[1]);
        assert_eq!(pick_connection(&[(200, set(&[2, 3, 5, 6]))], Some(&listener), &table), Ok(want));
        // Forwardings without a known listener → ambiguous → refused.
        let e = pick_connection(&[(200, set(&[2, 3, 6]))], None, &table).expect_err("refused");
        assert!(e.contains("3 candidate"), "{e}");
        // The monitor (it never forwards) decides.
        assert_eq!(pick_connection(&[(210, set(&[2, 3, 6])), (200, set(&[2, 88]))], None, &table), Ok(want));
        // A monitor whose fds cannot be read narrows nothing; the listener still decides.
        let denied: Held = Err("Permission denied".into());
        assert_eq!(pick_connection(&[(210, set(&[2, 3])), (200, denied.clone())], Some(&listener), &table), Ok(want));
        // The session's fds cannot be read (no CAP_SYS_PTRACE): refused.
        let e = pick_connection(&[(200, denied)], Some(&listener), &table).expect_err("refused");
        assert!(e.contains("cannot read the fds of sshd 200"), "{e}");
        // No established socket at all.
        assert!(pick_connection(&[(200, set(&[1, 99]))], None, &table).is_err());
        // IPv6, and a listener bound to one address only.
        let t6 = [
            lis("[fd42::1]:22", 10),
            est("[fd42::1]:22", "[fd42::2]:5000", 11),
            est("[fd42::1]:600", "[fd42::3]:22", 12),
        ];
        assert_eq!(
            pick_connection(&[(200, set(&[11, 12]))], Some(&set(&[10])), &t6),
            Ok(conn("[fd42::2]:5000", "[fd42::1]:22"))
        );
    }

    #[derive(Default)]
    struct FakeProc {
        stat: HashMap<i32, String>,
        /// Served from the second read of a pid's stat on (a process replaced meanwhile).
        restat: HashMap<i32, String>,
        reads: std::cell::RefCell<HashMap<i32, usize>>,
        environ_denied: bool,
        cmdline: HashMap<i32, Vec<u8>>,
        environ: HashMap<i32, Vec<u8>>,
        fds: HashMap<i32, io::Result<Vec<String>>>,
        tcp: HashMap<i32, (String, String)>,
        /// `(pid, file)` → contents of `sessionid`, `loginuid`, `cgroup` (missing: ENOENT).
        files: HashMap<(i32, &'static str), String>,
    }

    fn enoent() -> io::Error {
        io::Error::from(io::ErrorKind::NotFound)
    }

    fn copy(r: &io::Result<Vec<String>>) -> io::Result<Vec<String>> {
        match r {
            Ok(v) => Ok(v.clone()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    impl ProcSource for FakeProc {
        fn stat(&self, pid: i32) -> io::Result<String> {
            let mut reads = self.reads.borrow_mut();
            let n = reads.entry(pid).or_insert(0);
            *n += 1;
            match self.restat.get(&pid) {
                Some(s) if *n > 1 => Ok(s.clone()),
                _ => self.stat.get(&pid).cloned().ok_or_else(enoent),
            }
        }
        fn cmdline(&self, pid: i32) -> io::Result<Vec<u8>> {
            self.cmdline.get(&pid).cloned().ok_or_else(enoent)
        }
        fn environ(&self, pid: i32) -> io::Result<Vec<u8>> {
            if self.environ_denied {
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
            self.environ.get(&pid).cloned().ok_or_else(enoent)
        }
        fn fd_links(&self, pid: i32) -> io::Result<Vec<String>> {
            self.fds.get(&pid).map(copy).unwrap_or_else(|| Err(enoent()))
        }
        fn net_tcp(&self, pid: i32) -> io::Result<(String, String)> {
            self.tcp.get(&pid).cloned().ok_or_else(enoent)
        }
        fn text(&self, pid: i32, file: &str) -> io::Result<String> {
            self.files.iter().find(|((p, f), _)| *p == pid && *f == file).map(|(_, t)| t.clone()).ok_or_else(enoent)
        }
    }

    impl FakeProc {
        fn proc(&mut self, pid: i32, ppid: i32, comm: &str, cmdline: &str) {
            self.stat
                .insert(pid, format!("{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {} 0", pid * 10));
            self.cmdline.insert(pid, cmdline.as_bytes().to_vec());
            self.environ.insert(pid, Vec::new());
        }

        /// init(1) → listener(100) → sshd: root@pts/0 (200) → bash(300) → sudo(310) → ctguard(400)
        fn ssh_tree() -> FakeProc {
            let mut p = FakeProc::default();
            p.proc(1, 0, "init", "/sbin/init");
            p.proc(100, 1, "sshd", "sshd: /usr/sbin/sshd -D -e -f /x/sshd_config [listener] 0 of 10-100 startups ");
            p.proc(200, 100, "sshd", "sshd: root@pts/0\0\0\0");
            p.proc(300, 200, "bash", "-bash");
            p.proc(310, 300, "sudo", "sudo ctguard confirm");
            p.proc(400, 310, "ctguard", "ctguard confirm");
            p.fds.insert(100, Ok(vec!["/dev/null".into(), "socket:[2160403]".into()]));
            p.fds.insert(200, Ok(vec!["socket:[2160457]".into(), "socket:[474]".into(), "pipe:[9]".into()]));
            p.tcp.insert(200, (TCP.into(), String::new()));
            // sudo stripped the environment.
            p.environ.insert(400, b"PATH=/usr/bin\0".to_vec());
            p
        }
    }

    #[test]
    fn origin_by_ancestry_and_refusals() {
        let p = FakeProc::ssh_tree();
        let o = origin_with(&p, 400).expect("ok");
        let want = conn("198.18.0.2:58736", "198.18.0.1:2222");
        assert_eq!(o, Origin::Ssh { conn: want, sshd_pid: Some(200), via: Via::Ancestry, session: Default::default() });
        assert_eq!(o.to_string(), "ssh 198.18.0.2:58736 -> 198.18.0.1:2222 (sshd pid 200, via Ancestry)");

        // The sshd's fds cannot be read (CAP_SYS_PTRACE missing): refused, never Local.
        let mut p = FakeProc::ssh_tree();
        p.fds.insert(200, Err(io::Error::from(io::ErrorKind::PermissionDenied)));
        match origin_with(&p, 400) {
            Err(ProofError::UnidentifiedSsh { pid: 400, reason }) => {
                assert!(reason.contains("fds of sshd 200"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // A misleading SSH_CONNECTION does not help a requester under sshd.
        let mut p = FakeProc::ssh_tree();
        p.fds.insert(200, Err(io::Error::from(io::ErrorKind::PermissionDenied)));
        p.environ.insert(400, b"SSH_CONNECTION=1.2.3.4 1 5.6.7.8 22\0".to_vec());
        assert!(matches!(origin_with(&p, 400), Err(ProofError::UnidentifiedSsh { .. })));
        // Its TCP table cannot be read.
        let mut p = FakeProc::ssh_tree();
        p.tcp.remove(&200);
        assert!(matches!(origin_with(&p, 400), Err(ProofError::UnidentifiedSsh { .. })));
        // The socket is not in the table (another namespace's table, a closed connection).
        let mut p = FakeProc::ssh_tree();
        p.fds.insert(200, Ok(vec!["socket:[999]".into()]));
        assert!(matches!(origin_with(&p, 400), Err(ProofError::UnidentifiedSsh { .. })));
        // Directly under the listener: refused.
        let mut p = FakeProc::ssh_tree();
        p.proc(300, 100, "bash", "-bash");
        assert!(matches!(origin_with(&p, 400), Err(ProofError::UnidentifiedSsh { .. })));
        // The sshd exited and its pid was reused while its sockets were read.
        let mut p = FakeProc::ssh_tree();
        p.restat.insert(200, "200 (sshd) S 100 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 0".into());
        match origin_with(&p, 400) {
            Err(ProofError::UnidentifiedSsh { reason, .. }) => assert!(reason.contains("exited"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn origin_by_environment_and_local() {
        // No sshd ancestor (daemonised, reparented to init), SSH_CONNECTION kept.
        let mut p = FakeProc::default();
        p.proc(1, 0, "init", "/sbin/init");
        p.proc(500, 1, "sleep", "sleep 30");
        p.environ.insert(500, b"A=b\0SSH_CONNECTION=198.18.0.2 40000 198.18.0.1 22\0".to_vec());
        let o = origin_with(&p, 500).expect("ok");
        let claim = conn("198.18.0.2:40000", "198.18.0.1:22");
        assert_eq!(o, Origin::Ssh { conn: claim, sshd_pid: None, via: Via::Env, session: Default::default() });
        // Recorded as a claim, clearly marked, never as a verified connection.
        assert_eq!(o.verified_conn(), None);
        assert!(o.to_string().starts_with("local, no sshd ancestor (UNVERIFIED SSH_CONNECTION claim: "), "{o}");
        // A malformed one is refused rather than ignored.
        p.environ.insert(500, b"SSH_CONNECTION=garbage\0".to_vec());
        assert!(matches!(origin_with(&p, 500), Err(ProofError::UnidentifiedSsh { .. })));
        // Neither: local.
        p.environ.insert(500, b"TERM=linux\0".to_vec());
        assert_eq!(origin_with(&p, 500).expect("ok"), Origin::local());
        // The requester is gone; an ancestor vanished mid-walk.
        assert!(matches!(origin_with(&p, 999), Err(ProofError::ProcGone { pid: 999 })));
        p.proc(600, 550, "bash", "bash");
        assert!(matches!(origin_with(&p, 600), Err(ProofError::AncestorGone { pid: 600, ancestor: 550 })));
        // environ unreadable: an error, not Local.
        let mut p = FakeProc::default();
        p.proc(700, 0, "bash", "bash");
        p.environ_denied = true;
        assert!(matches!(origin_with(&p, 700), Err(ProofError::Read { .. })));
    }

    fn sess(audit: Option<u32>, scope: Option<&str>) -> LoginSession {
        LoginSession { audit_session: audit, login_uid: audit.map(|_| 0), scope: scope.map(str::to_string) }
    }

    fn ssh_o(client: &str, server: &str, session: LoginSession) -> Origin {
        Origin::Ssh { conn: conn(client, server), sshd_pid: Some(200), via: Via::Ancestry, session }
    }

    #[test]
    fn audit_ids_and_session_scope_parse() {
        assert_eq!(parse_sessionid("4294967295").ok(), Some(None));
        assert_eq!(parse_sessionid("42").ok(), Some(Some(42)));
        assert_eq!(parse_sessionid("42\n").ok(), Some(Some(42)));
        assert_eq!(parse_sessionid("0").ok(), Some(Some(0)));
        assert_eq!(parse_loginuid("0").ok(), Some(Some(0)));
        assert_eq!(parse_loginuid("1000").ok(), Some(Some(1000)));
        assert_eq!(parse_loginuid("4294967295").ok(), Some(None));
        for bad in ["", "\n", "-1", "x", "4294967296", "1 2", "+5", "0x10"] {
            assert!(parse_sessionid(bad).is_err(), "{bad:?}");
            assert!(parse_loginuid(bad).is_err(), "{bad:?}");
        }
        let scope = |t: &str| session_scope(t);
        // cgroup v2.
        assert_eq!(
            scope("0::/user.slice/user-0.slice/session-42.scope\n").as_deref(),
            Some("/user.slice/user-0.slice/session-42.scope")
        );
        // v1 / hybrid: the unified line may be "/" while name=systemd has the scope.
        let v1 = "12:pids:/user.slice/user-1000.slice/session-c3.scope\n\
                  1:name=systemd:/user.slice/user-1000.slice/session-c3.scope\n0::/\n";
        assert_eq!(scope(v1).as_deref(), Some("/user.slice/user-1000.slice/session-c3.scope"));
        // A sub-cgroup below the scope: the scope.
        assert_eq!(
            scope("0::/user.slice/user-0.slice/session-7.scope/payload\n").as_deref(),
            Some("/user.slice/user-0.slice/session-7.scope")
        );
        // No login session: a system service, a user manager's unit, a container, no systemd.
        for none in [
            "0::/system.slice/ssh.service\n",
            "0::/system.slice/cron.service\n",
            "0::/user.slice/user-0.slice/user@0.service/app.slice/run-u5.scope\n",
            "0::/machine.slice/session-.scope\n",
            "0::/x/session-1.scopes\n",
            "0::/x/session-1/2.scope\n",
            "0::/\n",
            "",
            "garbage",
            // Captured in this sandbox (no systemd): cgroup v1 with an empty name=systemd.
            "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/1dc0f13bf8605d59418b5dc30b5efd15\n0::/\n",
        ] {
            assert_eq!(scope(none), None, "{none:?}");
        }
    }

    #[test]
    fn origin_records_the_login_session() {
        // UsePAM yes: pam_loginuid gave the connection audit session 7; the listener has none.
        let scope7 = "/user.slice/user-0.slice/session-7.scope";
        let mut p = FakeProc::ssh_tree();
        p.files.insert((400, "sessionid"), "7".into());
        p.files.insert((400, "loginuid"), "0".into());
        p.files.insert((400, "cgroup"), format!("0::{scope7}\n"));
        p.files.insert((100, "sessionid"), "4294967295".into());
        p.files.insert((100, "cgroup"), "0::/system.slice/ssh.service\n".into());
        let o = origin_with(&p, 400).expect("ok");
        assert_eq!(o.session(), &sess(Some(7), Some(scope7)));
        assert_eq!(
            o.to_string(),
            format!(
                "ssh 198.18.0.2:58736 -> 198.18.0.1:2222 (sshd pid 200, via Ancestry; audit session 7, login uid 0, \
                 scope {scope7})"
            )
        );
        // UsePAM no, sshd started by hand from a login session: the connection inherits the
        // listener's audit session and scope, which identify no connection: dropped.
        let mut p = FakeProc::ssh_tree();
        for pid in [100, 400] {
            p.files.insert((pid, "sessionid"), "3".into());
            p.files.insert((pid, "loginuid"), "0".into());
            p.files.insert((pid, "cgroup"), "0::/user.slice/user-0.slice/session-3.scope\n".into());
        }
        let o = origin_with(&p, 400).expect("ok");
        assert_eq!(o.session(), &LoginSession { audit_session: None, login_uid: Some(0), scope: None });
        // A double fork (`env -i`, `env -u SSH_CONNECTION`): reparented to init, the session kept.
        let mut p = FakeProc::default();
        p.proc(1, 0, "init", "/sbin/init");
        p.proc(500, 1, "ctguard", "ctguard confirm");
        p.files.insert((500, "sessionid"), "7".into());
        let o = origin_with(&p, 500).expect("ok");
        assert_eq!(o, Origin::Local { session: LoginSession { audit_session: Some(7), ..Default::default() } });
        assert_eq!(o.to_string(), "local (no sshd ancestor; audit session 7)");
        // A spoofed SSH_CONNECTION: an unverified claim, the session kept.
        p.environ.insert(500, b"SSH_CONNECTION=203.0.113.9 4242 198.18.0.1 22\0".to_vec());
        let o = origin_with(&p, 500).expect("ok");
        assert_eq!(o.verified_conn(), None);
        assert_eq!(o.session().audit_session, Some(7));
        assert_eq!(
            o.to_string(),
            "local, no sshd ancestor (UNVERIFIED SSH_CONNECTION claim: 203.0.113.9:4242 -> 198.18.0.1:22, via Env; \
             audit session 7)"
        );
        // A malformed sessionid is refused rather than ignored.
        p.files.insert((500, "sessionid"), "garbage".into());
        assert!(matches!(origin_with(&p, 500), Err(ProofError::Malformed { .. })));
        // The requester was replaced (pid reuse) while its session was read: gone.
        let mut p = FakeProc::ssh_tree();
        p.restat.insert(400, "400 (ctguard) S 310 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 0".into());
        assert!(matches!(origin_with(&p, 400), Err(ProofError::ProcGone { pid: 400 })));
    }

    #[test]
    fn confirm_proof() {
        use RefusalReason::*;
        let applied_conn = conn("198.18.0.2:40000", "198.18.0.1:22");
        let a = ssh_o("198.18.0.2:40000", "198.18.0.1:22", sess(Some(5), Some("/u/session-5.scope")));
        let addrs: Vec<IpAddr> = ["198.18.0.1", "10.9.9.9", "fd42::1"].iter().map(|s| s.parse().expect("ok")).collect();
        let reason = |c: &Origin| decide_confirm(&a, c, &addrs).expect_err("refused").reason;
        // The applying connection itself (a shell of it, sudo, a ControlMaster session).
        assert_eq!(reason(&a), SameConnection);
        // A double fork with `env -i` / `env -u SSH_CONNECTION`: same audit session.
        let detached = Origin::Local { session: sess(Some(5), None) };
        assert_eq!(reason(&detached), SameAuditSession(5));
        // … with a spoofed SSH_CONNECTION: no evidence; same audit session.
        let spoofed = Origin::Ssh {
            conn: conn("203.0.113.9:4242", "198.18.0.1:22"),
            sshd_pid: None,
            via: Via::Env,
            session: sess(Some(5), None),
        };
        assert_eq!(reason(&spoofed), SameAuditSession(5));
        // The same systemd session scope.
        let same_scope = Origin::Local { session: sess(None, Some("/u/session-5.scope")) };
        assert_eq!(reason(&same_scope), SameScope("/u/session-5.scope".into()));
        // Without pam_loginuid a detached process carries nothing: no identifier.
        assert_eq!(reason(&Origin::local()), NoIdentifier);
        let spoofed_bare = Origin::Ssh {
            conn: conn("203.0.113.9:4242", "198.18.0.1:22"),
            sshd_pid: None,
            via: Via::Env,
            session: LoginSession::default(),
        };
        assert_eq!(reason(&spoofed_bare), NoIdentifier);
        // Another login session, not over SSH (a cron or `at` job started from the applying
        // session, a multiplexer's pane): refused.
        assert_eq!(reason(&Origin::Local { session: sess(Some(9), Some("/u/session-9.scope")) }), NotOverSsh);
        // A new connection in the same audit session (a forged one): refused.
        assert_eq!(reason(&ssh_o("198.18.0.2:40002", "198.18.0.1:22", sess(Some(5), None))), SameAuditSession(5));
        // `ssh localhost`, `ssh <own address>` from inside the session: a new connection over
        // loopback, refused even though every identifier differs.
        for client in
            ["127.0.0.1:50000", "127.0.0.2:50000", "[::1]:50000", "198.18.0.1:50000", "10.9.9.9:50000", "[fd42::1]:1"]
        {
            let o = ssh_o(client, "198.18.0.1:22", sess(Some(8), Some("/u/session-8.scope")));
            assert_eq!(reason(&o), Loopback(sa(client).ip()), "{client}");
        }
        // The confirming connection's own server address and loopback, even without the list.
        let to_self = ssh_o("198.18.0.7:5", "198.18.0.7:22", sess(Some(8), None));
        assert_eq!(check_confirm(&a, &to_self).map_err(|r| r.reason), Err(Loopback(sa("198.18.0.7:5").ip())));
        let lo = ssh_o("127.0.0.1:5", "127.0.0.1:22", LoginSession::default());
        assert_eq!(check_confirm(&a, &lo).map_err(|r| r.reason), Err(Loopback(sa("127.0.0.1:5").ip())));
        // A genuinely new connection from outside.
        let new = ssh_o("198.18.0.2:40002", "198.18.0.1:22", sess(Some(8), Some("/u/session-8.scope")));
        let ok = decide_confirm(&a, &new, &addrs).expect("accepted");
        assert_eq!(
            ok.basis,
            "a new SSH connection from 198.18.0.2, not one of the target's addresses; differs from the apply by \
             connection 198.18.0.2:40002 -> 198.18.0.1:22 vs 198.18.0.2:40000 -> 198.18.0.1:22, audit session 8 vs 5, \
             scope /u/session-8.scope vs /u/session-5.scope"
        );
        assert_eq!(check_confirm(&a, &new), Ok(()));
        // UsePAM no: connections only.
        let a0 = ssh_o("198.18.0.2:40000", "198.18.0.1:22", LoginSession::default());
        let new0 = ssh_o("198.18.0.2:40002", "198.18.0.1:22", LoginSession::default());
        assert!(decide_confirm(&a0, &new0, &addrs).is_ok());
        assert_eq!(reason_of(&a0, &a0), SameConnection);
        assert_eq!(reason_of(&a0, &Origin::local()), NoIdentifier);
        // Only one side knows its audit session: the connection decides.
        assert!(decide_confirm(&a, &new0, &addrs).is_ok());
        assert!(decide_confirm(&a0, &new, &addrs).is_ok());
        // Applied from a detached process that claimed SSH_CONNECTION (`nohup ctguard apply &`):
        // the claim makes it stricter — over the claimed connection, or not over SSH: refused.
        let a_env = Origin::Ssh { conn: applied_conn, sshd_pid: None, via: Via::Env, session: sess(Some(5), None) };
        assert_eq!(reason_of(&a_env, &ssh_o("198.18.0.2:40000", "198.18.0.1:22", Default::default())), SameConnection);
        assert_eq!(reason_of(&a_env, &detached), SameAuditSession(5));
        assert!(decide_confirm(&a_env, &new, &addrs).is_ok());
        // A local apply is confirmed locally, as before, by anything.
        for l in [Origin::local(), Origin::Local { session: sess(Some(5), None) }] {
            for c in [&Origin::local(), &detached, &a, &spoofed, &new] {
                let ok = decide_confirm(&l, c, &addrs).expect("accepted");
                assert!(ok.basis.contains("did not come over SSH"), "{ok}");
            }
        }
        // Messages: the reason and the command for a new connection.
        let msg = decide_confirm(&a, &a, &addrs).expect_err("refused").to_string();
        assert!(msg.contains("same SSH connection") && msg.contains("NEW connection"), "{msg}");
        assert!(msg.contains("`ssh -o ControlPath=none 198.18.0.1 ctguard confirm`"), "{msg}");
        let msg = decide_confirm(&a, &detached, &addrs).expect_err("refused").to_string();
        assert!(msg.contains("same login session as the apply (audit session 5)"), "{msg}");
        let lo_msg = check_confirm(&a, &lo).expect_err("refused").to_string();
        assert!(lo_msg.contains("127.0.0.1 is over loopback / from this host: proves nothing about the outside path"));
        let e = decide_confirm(&a, &a, &addrs).expect_err("refused");
        assert_eq!(e.new_connection_command(Some("t1")), "ssh -o ControlPath=none 198.18.0.1 ctguard confirm t1");
        let e6 = ConfirmRefusal { conn: conn("[fd42::2]:1", "[fd42::1]:2222"), reason: NoIdentifier };
        assert_eq!(e6.new_connection_command(None), "ssh -o ControlPath=none -p 2222 fd42::1 ctguard confirm");
        assert_eq!(
            [SameConnection, SameAuditSession(1), SameScope(String::new()), NoIdentifier, NotOverSsh].map(|r| r.key()),
            ["connection", "audit-session", "scope", "no-identifier", "not-over-ssh"]
        );
        // same_connection: verified or claimed.
        assert!(same_connection(&a, &a) && same_connection(&a, &a_env));
        assert!(!same_connection(&a, &new) && !same_connection(&a, &Origin::local()));
        assert!(!same_connection(&Origin::local(), &Origin::local()));
        assert_eq!(a.conn().map(|c| c.lint_conn().server_port), Some(22));
        // Escaped in messages.
        let odd = Origin::Local { session: sess(None, Some("/u/session-1.scope\n\x1b[2J")) };
        assert!(!odd.to_string().contains('\n') && !odd.to_string().contains('\x1b'), "{odd}");
    }

    fn reason_of(applied: &Origin, confirming: &Origin) -> RefusalReason {
        decide_confirm(applied, confirming, &[]).expect_err("refused").reason
    }

    #[test]
    fn origins_serialise_and_old_records_still_load() {
        let a = ssh_o("198.18.0.2:40000", "198.18.0.1:22", sess(Some(5), Some("/u/session-5.scope")));
        let j = serde_json::to_string(&a).expect("ok");
        assert_eq!(serde_json::from_str::<Origin>(&j).expect("ok"), a);
        assert!(j.contains(r#""session":{"audit_session":5,"login_uid":0,"scope":"/u/session-5.scope"}"#), "{j}");
        assert_eq!(serde_json::to_string(&Origin::local()).expect("ok"), r#"{"kind":"local"}"#);
        let l = Origin::Local { session: sess(Some(3), None) };
        assert_eq!(serde_json::from_str::<Origin>(&serde_json::to_string(&l).expect("ok")).expect("ok"), l);
        // Records written before sessions were recorded.
        let old = r#"{"kind":"ssh","conn":{"client":"198.18.0.2:40000","server":"198.18.0.1:22"},"sshd_pid":200,"via":"ancestry"}"#;
        let want = ssh_o("198.18.0.2:40000", "198.18.0.1:22", LoginSession::default());
        assert_eq!(serde_json::from_str::<Origin>(old).expect("ok"), want);
        let old_env = r#"{"kind":"ssh","conn":{"client":"198.18.0.2:40000","server":"198.18.0.1:22"},"sshd_pid":null,"via":"env"}"#;
        assert_eq!(serde_json::from_str::<Origin>(old_env).expect("ok").verified_conn(), None);
        assert_eq!(serde_json::from_str::<Origin>(r#"{"kind":"local"}"#).expect("ok"), Origin::local());
        let r: crate::txn::Requester =
            serde_json::from_str(&format!(r#"{{"uid":0,"pid":1,"ssh":null,"origin":{old}}}"#)).expect("ok");
        assert_eq!(r.origin, Some(want));
    }
}
