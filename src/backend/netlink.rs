//! nf_tables over netlink, in the calling thread's network namespace (run it on the target's
//! thread, `crate::netns::Target::run`): send one batch built by
//! [`crate::render::nft_batch`] and prove it committed; read the ruleset generation id.
//!
//! How a batch's outcome is read (kernel 6.18, measured; DESIGN §1, §10): every message carries
//! `NLM_F_ACK`, and the kernel queues all replies while it processes the `sendto`, so they are
//! waiting when it returns.
//! - Committed: every message ACKs 0 and BATCH_END ACKs 0. The BATCH_END ACK is the proof
//!   (kernels ≥ 6.10 acknowledge it only after the commit); earlier ACKs 0 prove nothing, as in
//!   a failed batch the messages before the failing one still ACK 0.
//! - A message refused (e.g. a lookup of a missing set): that message's reply carries the
//!   errno, the whole batch is aborted, BATCH_END gets no ACK 0.
//! - A stale `NFNL_BATCH_GENID`: BATCH_BEGIN alone is answered, with `ERESTART`; nothing ran.
//! - Kernels before 6.10 ignore `NLM_F_ACK` on BATCH_BEGIN/END; there a commit failure is
//!   reported against BATCH_BEGIN and no error anywhere with every message ACKed 0 means
//!   committed (not testable on this machine's 6.18 kernel).

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::render::nft_batch::{BatchBuffer, MsgKind, FIRST_SEQ, NFNL_SUBSYS_NFTABLES};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
/// `NETLINK_CAP_ACK` (linux/netlink.h): error replies carry only the request's header.
const NETLINK_CAP_ACK: libc::c_int = 10;
/// `NETLINK_EXT_ACK`: error replies may carry a message and the offending attribute.
const NETLINK_EXT_ACK: libc::c_int = 11;
/// `NLM_F_CAPPED` in an error reply: the request was not echoed beyond its header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` in an error reply: extended ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: a NUL-terminated error text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `NFT_MSG_NEWGEN`, the reply to `NFT_MSG_GETGEN`.
const NFT_MSG_NEWGEN: u16 = 15;
/// `NFTA_GEN_ID`: u32, network byte order.
const NFTA_GEN_ID: u16 = 1;
/// `NFT_MSG_NEWRULE`: an echoed rule, or one rule of a GETRULE dump.
const NFT_MSG_NEWRULE: u16 = 6;
/// `NFT_MSG_GETRULE`.
const NFT_MSG_GETRULE: u16 = 7;
/// `NFTA_RULE_TABLE`, `_CHAIN` (NUL-terminated strings), `_HANDLE` (u64, network byte order),
/// `_USERDATA` (nftnl udata TLVs).
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_USERDATA: u16 = 7;
/// `NFTNL_UDATA_RULE_COMMENT`: the comment TLV in a rule's userdata (NUL-terminated).
const UDATA_RULE_COMMENT: u8 = 0;
/// `NLMSG_DONE`: the end of a dump.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_DUMP_INTR`: the dump was interrupted by a change (inconsistent).
const NLM_F_DUMP_INTR: u16 = 0x10;

#[cfg(any(target_arch = "mips", target_arch = "mips64", target_arch = "mips32r6", target_arch = "mips64r6"))]
const SO_SNDBUFFORCE: libc::c_int = 31;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_SNDBUFFORCE: libc::c_int = 0x100a;
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const SO_SNDBUFFORCE: libc::c_int = 32;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_RCVBUFFORCE: libc::c_int = 0x100b;
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_RCVBUFFORCE: libc::c_int = 33;

/// How long to wait for replies that have not arrived. The kernel answers while it processes
/// the send, so this only bounds a kernel that does not answer at all.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer for one datagram: an error reply echoes at most a 64 KiB request.
const RECV_BUF_BYTES: usize = 128 * 1024;

/// Errors talking nf_tables over netlink.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The NETLINK_NETFILTER socket could not be opened or bound.
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(#[source] io::Error),
    /// Sending failed: the kernel saw none of the batch (or not all of it, which it refuses).
    #[error("sending {len} bytes to nf_tables failed: {source}")]
    Send {
        /// Bytes that were to be sent.
        len: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the replies failed; whether the batch committed is unknown.
    #[error("reading nf_tables replies failed ({0}); whether the batch committed is unknown")]
    Recv(#[source] io::Error),
    /// The receive buffer overflowed and replies were lost (`ENOBUFS`); whether the batch
    /// committed is unknown: read the ruleset back.
    #[error("nf_tables replies were lost ({0}); whether the batch committed is unknown")]
    AcksLost(#[source] io::Error),
    /// The ruleset generation changed since `genid` was read: the kernel refused the whole
    /// batch (`ERESTART`) and applied nothing. Re-read the state and the id, rebuild, retry.
    #[error("the ruleset changed since generation {} was read ({source}); the kernel applied nothing", .genid.map(|g| g.to_string()).unwrap_or_else(|| "?".into()))]
    GenerationChanged {
        /// The generation id the batch carried.
        genid: Option<u32>,
        /// The kernel's error (`ERESTART`).
        #[source]
        source: io::Error,
    },
    /// The kernel refused a message; the whole batch was aborted and nothing was applied.
    #[error("the kernel refused message {seq} ({what}): {source}{ext}{more}; nothing was applied",
        ext = .ext.as_deref().map(|e| format!(": {e}")).unwrap_or_default(),
        more = if *.others > 0 { format!(" (and {} later message(s))", .others) } else { String::new() })]
    Refused {
        /// Sequence number of the first refused message.
        seq: u32,
        /// What that message does.
        what: String,
        /// The kernel's extended-ack text, if it gave one.
        ext: Option<String>,
        /// How many further messages were refused too.
        others: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// No error came back, but neither did the proof of the commit (the BATCH_END ACK, or on
    /// kernels before 6.10 the ACK of every message). The outcome is unknown: read it back.
    #[error(
        "no proof that the batch committed: {missing} of {expected} acknowledgements missing (first: {first_missing})"
    )]
    Unconfirmed {
        /// Acknowledgements expected.
        expected: usize,
        /// How many did not arrive.
        missing: usize,
        /// Description of the first message without one.
        first_missing: String,
    },
    /// A request other than a batch (e.g. GETGEN) failed.
    #[error("nf_tables refused {what}: {source}")]
    Query {
        /// The request.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The kernel's reply could not be parsed.
    #[error("malformed nf_tables reply: {0}")]
    Malformed(String),
}

/// A NETLINK_NETFILTER socket in the calling thread's namespace, set up for reading acks.
struct NfSocket {
    sock: mnl::Socket,
    portid: u32,
    buf: Vec<u64>,
}

fn setsockopt_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: `val` lives across the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One reply message: header fields and payload.
struct Reply {
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    payload: Vec<u8>,
}

fn u32_ne(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn u16_ne(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

/// Splits a datagram into netlink messages.
fn parse_replies(data: &[u8]) -> Result<Vec<Reply>, NetlinkError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= data.len() {
        let bad = || NetlinkError::Malformed(format!("truncated message at byte {off}"));
        let len = u32_ne(data, off).ok_or_else(bad)? as usize;
        if len < NLMSG_HDRLEN || off + len > data.len() {
            return Err(NetlinkError::Malformed(format!("message length {len} at byte {off}")));
        }
        out.push(Reply {
            ty: u16_ne(data, off + 4).ok_or_else(bad)?,
            flags: u16_ne(data, off + 6).ok_or_else(bad)?,
            seq: u32_ne(data, off + 8).ok_or_else(bad)?,
            pid: u32_ne(data, off + 12).ok_or_else(bad)?,
            payload: data[off + NLMSG_HDRLEN..off + len].to_vec(),
        });
        off += len.next_multiple_of(4);
    }
    Ok(out)
}

/// Netlink attributes in `b`: (type without flag bits, data).
pub(crate) fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        v.push((ty, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    v
}

/// An `NLMSG_ERROR` reply: 0 for an ACK, else a negative errno, plus extended-ack text.
fn parse_error(r: &Reply) -> Result<(i32, Option<String>), NetlinkError> {
    let code = u32_ne(&r.payload, 0).ok_or_else(|| NetlinkError::Malformed("short NLMSG_ERROR".into()))? as i32;
    let mut ext = None;
    if r.flags & NLM_F_ACK_TLVS != 0 {
        // nlmsgerr = error code + the request's header (+ its payload unless capped).
        let orig_len = if r.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            u32_ne(&r.payload, 4).map(|l| l as usize).unwrap_or(NLMSG_HDRLEN)
        };
        let start = (4 + orig_len).next_multiple_of(4);
        if let Some(tlvs) = r.payload.get(start..) {
            ext = parse_attrs(tlvs)
                .into_iter()
                .find(|(t, _)| *t == NLMSGERR_ATTR_MSG)
                .map(|(_, d)| String::from_utf8_lossy(d.split(|b| *b == 0).next().unwrap_or_default()).into_owned());
        }
    }
    Ok((code, ext))
}

impl NfSocket {
    fn open() -> Result<NfSocket, NetlinkError> {
        let sock = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NetlinkError::Socket)?;
        let fd = sock.as_raw_fd();
        // libmnl opens without SOCK_CLOEXEC: no tool ctguard runs inherits the socket (one
        // stays open per thread, see `with_thread_socket`).
        // SAFETY: fcntl on a descriptor `sock` owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // Best effort: without CAP_ACK error replies echo the request (the buffer fits them);
        // without EXT_ACK there is no error text.
        let _ = setsockopt_int(fd, libc::SOL_NETLINK, NETLINK_CAP_ACK, 1);
        let _ = setsockopt_int(fd, libc::SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let portid = sock.portid();
        Ok(NfSocket { sock, portid, buf: vec![0u64; RECV_BUF_BYTES / 8] })
    }

    /// Raises a socket buffer to at least `bytes` (the FORCE option needs CAP_NET_ADMIN and
    /// ignores `rmem_max`/`wmem_max`; fall back to the plain one).
    fn raise_buffer(&self, force: libc::c_int, plain: libc::c_int, bytes: usize) {
        let fd = self.sock.as_raw_fd();
        let v = bytes.min(i32::MAX as usize) as libc::c_int;
        if setsockopt_int(fd, libc::SOL_SOCKET, force, v).is_err() {
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, v);
        }
    }

    fn send(&self, bytes: &[u8]) -> Result<(), NetlinkError> {
        let n = self.sock.send(bytes).map_err(|source| NetlinkError::Send { len: bytes.len(), source })?;
        if n != bytes.len() {
            return Err(NetlinkError::Send {
                len: bytes.len(),
                source: io::Error::other(format!("only {n} bytes were sent")),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for a datagram and returns its messages addressed to us; `None`
    /// when nothing arrived in time.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<Reply>>, NetlinkError> {
        let fd = self.sock.as_raw_fd();
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        loop {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Recv(e));
            }
            if r == 0 {
                return Ok(None);
            }
            break;
        }
        let cap = self.buf.len() * 8;
        // SAFETY: the buffer is valid for `cap` bytes and 8-byte aligned.
        let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), cap, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Some(Vec::new())),
                Some(libc::ENOBUFS) => Err(NetlinkError::AcksLost(e)),
                _ => Err(NetlinkError::Recv(e)),
            };
        }
        let n = n as usize;
        if n > cap {
            return Err(NetlinkError::Malformed(format!("{n}-byte reply does not fit {cap} bytes")));
        }
        // SAFETY: the first `n` bytes were written by recv; u64 storage viewed as bytes.
        let data = unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), n) };
        let msgs = parse_replies(data)?.into_iter().filter(|r| r.pid == self.portid || r.pid == 0).collect();
        Ok(Some(msgs))
    }
}

/// True when the running kernel acknowledges BATCH_BEGIN/END (`NLM_F_ACK` honoured since 6.10).
/// When the release cannot be read, assume it does (then a missing BATCH_END ACK is reported
/// as unconfirmed rather than taken as success).
fn kernel_acks_batch_end() -> bool {
    let Ok(rel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    let mut it = rel.trim().split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 10),
        _ => true,
    }
}

/// A rule as nf_tables reports it: echoed after a commit (`NLM_F_ECHO`) or one entry of a
/// GETRULE dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    /// Sequence number of the message that carried it (for an echo: the request's).
    pub seq: u32,
    /// nft family keyword (`inet`, `ip`, …).
    pub family: String,
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// The kernel's handle (unique in its table until the table is recreated).
    pub handle: u64,
    /// The comment nft keeps in the rule's userdata, if any.
    pub comment: Option<String>,
}

/// Appends attribute `(ty, data)` to `out` in netlink layout: length, type, data, padding to 4
/// bytes. Pure.
pub(crate) fn put_attr(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
    out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

pub(crate) fn nul_str(d: &[u8]) -> String {
    String::from_utf8_lossy(d.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

/// The comment TLV (`NFTNL_UDATA_RULE_COMMENT`) of a rule's userdata: `type u8, len u8, value`.
pub(crate) fn udata_comment(mut b: &[u8]) -> Option<String> {
    while b.len() >= 2 {
        let (ty, len) = (b[0], b[1] as usize);
        let v = b.get(2..2 + len)?;
        if ty == UDATA_RULE_COMMENT {
            return Some(nul_str(v));
        }
        b = &b[2 + len..];
    }
    None
}

/// Parses a NEWRULE message (nfgenmsg + attributes).
fn parse_rule(r: &Reply) -> Result<RuleInfo, NetlinkError> {
    let family = r
        .payload
        .first()
        .copied()
        .and_then(nft_family_name)
        .ok_or_else(|| NetlinkError::Malformed("NEWRULE of an unknown family".into()))?;
    let (mut table, mut chain, mut handle, mut comment) = (None, None, None, None);
    for (t, d) in parse_attrs(r.payload.get(4..).unwrap_or_default()) {
        match t {
            NFTA_RULE_TABLE => table = Some(nul_str(d)),
            NFTA_RULE_CHAIN => chain = Some(nul_str(d)),
            NFTA_RULE_HANDLE if d.len() == 8 => {
                handle = Some(u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]))
            }
            NFTA_RULE_USERDATA => comment = udata_comment(d),
            _ => {}
        }
    }
    match (table, chain, handle) {
        (Some(table), Some(chain), Some(handle)) => {
            Ok(RuleInfo { seq: r.seq, family: family.to_string(), table, chain, handle, comment })
        }
        _ => Err(NetlinkError::Malformed("NEWRULE without table, chain or handle".into())),
    }
}

/// Sends `batch` on a fresh NETLINK_NETFILTER socket in the calling thread's network namespace
/// and returns once the kernel has proved the commit.
///
/// Guarantees: **atomic** — nf_tables applies the whole batch as one transaction or nothing
/// (every error variant except [`NetlinkError::Recv`], [`NetlinkError::AcksLost`],
/// [`NetlinkError::Malformed`] and [`NetlinkError::Unconfirmed`] means nothing was applied;
/// those four mean the outcome is unknown and must be read back). `Ok` only when the BATCH_END ACK (kernel ≥ 6.10) arrived with
/// no error before it. A batch carrying a generation id that is no longer current fails with
/// [`NetlinkError::GenerationChanged`] — retry after re-reading. Idempotent when the batch is,
/// as [`crate::render::nft_batch::encode`]'s are (declare, delete, recreate the table): sending
/// one twice leaves one copy. Blocks at most about 10 s waiting for replies.
pub fn send_batch(batch: &BatchBuffer) -> Result<(), NetlinkError> {
    send_batch_echoed(batch).map(|_| ())
}

/// [`send_batch`], returning the rules the kernel echoed after the commit for the messages
/// that carry `NLM_F_ECHO` ([`crate::render::nft_batch::BatchBuilder::echo_inserts`]), in
/// batch order, each with its handle and comment.
///
/// Guarantees: those of [`send_batch`]. The echoes are read from the same socket as the ACKs
/// (the kernel queues them during the commit, before the BATCH_END ACK); one that did not
/// arrive is simply missing from the result (read the rule back by tag then).
pub fn send_batch_echoed(batch: &BatchBuffer) -> Result<Vec<RuleInfo>, NetlinkError> {
    if !batch.commits() {
        return Err(NetlinkError::Malformed("a check batch (no BATCH_END) sent as a commit".into()));
    }
    exchange(batch)
}

/// The kernel's verdict on a check batch ([`crate::render::nft_batch::BatchBuilder::finish_check`]:
/// no BATCH_END), in the calling thread's network namespace: nf_tables runs every message, then
/// aborts the batch and validates the tables as a commit would (`nft -c` works the same way).
///
/// Guarantees: changes nothing (a batch without BATCH_END is never committed). `Ok` when every
/// message was ACKed 0; the first refused message otherwise ([`NetlinkError::Refused`], with
/// the kernel's extended ACK text), [`NetlinkError::GenerationChanged`] for a stale generation
/// id the batch carries. Exactly the bytes the commit would send, but for BATCH_END — not a
/// text script standing in for them.
pub fn check_batch(batch: &BatchBuffer) -> Result<(), NetlinkError> {
    if batch.commits() {
        return Err(NetlinkError::Malformed("a committing batch given to the check".into()));
    }
    exchange(batch).map(|_| ())
}

/// Sends `batch` and reads what the replies prove: for a committing batch the commit
/// ([`send_batch_echoed`]), for a check batch that every message was accepted.
fn exchange(batch: &BatchBuffer) -> Result<Vec<RuleInfo>, NetlinkError> {
    let check = !batch.commits();
    let mut s = NfSocket::open()?;
    let bytes = batch.as_bytes();
    let msgs = batch.messages();
    // sendmsg refuses datagrams larger than sk_sndbuf (the kernel doubles the value set);
    // each reply occupies about 1 KiB of receive buffer until read.
    if bytes.len() > 64 * 1024 {
        s.raise_buffer(SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes.len() + 4096);
    }
    let echo_seqs: std::collections::HashSet<u32> = msgs.iter().filter(|m| m.echo).map(|m| m.seq).collect();
    // An echoed rule (expressions and all) takes a few KiB more until read.
    if msgs.len() > 128 || echo_seqs.len() > 16 {
        s.raise_buffer(SO_RCVBUFFORCE, libc::SO_RCVBUF, msgs.len() * 1024 + echo_seqs.len() * 4096);
    }
    s.send(bytes)?;
    let mut echoed: Vec<RuleInfo> = Vec::new();

    let ends_acked = kernel_acks_batch_end();
    let begin_seq = FIRST_SEQ;
    let end_seq = msgs.last().map(|m| m.seq).unwrap_or(begin_seq);
    // Error code per sequence number, once its reply arrived.
    let mut got: std::collections::HashMap<u32, (i32, Option<String>)> = std::collections::HashMap::new();
    // A check batch is aborted, never committed: its BATCH_BEGIN is answered only with an
    // error (a stale generation id); each other message with its ACK.
    let expected: Vec<u32> = msgs
        .iter()
        .filter(|m| {
            let control = matches!(m.kind, MsgKind::BatchBegin | MsgKind::BatchEnd);
            !control || (ends_acked && !check)
        })
        .map(|m| m.seq)
        .collect();
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let conclusive = got.get(&begin_seq).is_some_and(|(c, _)| *c != 0)
            || got.contains_key(&end_seq)
            || expected.iter().all(|q| got.contains_key(q))
            || (got.values().any(|(c, _)| *c != 0)
                && msgs
                    .iter()
                    .filter(|m| !matches!(m.kind, MsgKind::BatchBegin | MsgKind::BatchEnd))
                    .all(|m| got.contains_key(&m.seq)));
        // Once conclusive, only drain what is already queued.
        let wait = if conclusive { Duration::ZERO } else { deadline.saturating_duration_since(Instant::now()) };
        let Some(replies) = s.recv(wait)? else { break };
        for r in &replies {
            if r.ty == NLMSG_ERROR {
                let (code, ext) = parse_error(r)?;
                got.entry(r.seq).or_insert((code, ext));
            } else if r.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE && echo_seqs.contains(&r.seq) {
                echoed.push(parse_rule(r)?);
            }
        }
    }
    if !check {
        close_later(s);
    }
    outcome(batch, &got, &expected, ends_acked && !check)?;
    echoed.sort_by_key(|r| r.seq.wrapping_sub(FIRST_SEQ));
    Ok(echoed)
}

/// Decides what the replies prove.
fn outcome(
    batch: &BatchBuffer,
    got: &std::collections::HashMap<u32, (i32, Option<String>)>,
    expected: &[u32],
    ends_acked: bool,
) -> Result<(), NetlinkError> {
    let msgs = batch.messages();
    let what = |seq: u32| batch.message(seq).map(|m| m.what.clone()).unwrap_or_else(|| format!("message {seq}"));
    let errno = |code: i32| io::Error::from_raw_os_error(code.saturating_neg());
    if let Some((code, ext)) = got.get(&FIRST_SEQ).filter(|(c, _)| *c != 0) {
        if code.saturating_neg() == libc::ERESTART {
            return Err(NetlinkError::GenerationChanged { genid: batch.genid(), source: errno(*code) });
        }
        // A failed commit is reported against the first message (BATCH_BEGIN).
        return Err(NetlinkError::Refused {
            seq: FIRST_SEQ,
            what: format!("{}: the batch as a whole", what(FIRST_SEQ)),
            ext: ext.clone(),
            others: 0,
            source: errno(*code),
        });
    }
    let mut errors: Vec<(u32, i32, Option<String>)> =
        got.iter().filter(|(_, (c, _))| *c != 0).map(|(s, (c, e))| (*s, *c, e.clone())).collect();
    errors.sort_by_key(|e| e.0.wrapping_sub(FIRST_SEQ));
    if let Some((seq, code, ext)) = errors.first() {
        return Err(NetlinkError::Refused {
            seq: *seq,
            what: what(*seq),
            ext: ext.clone(),
            others: errors.len() - 1,
            source: errno(*code),
        });
    }
    let end_seq = msgs.last().map(|m| m.seq).unwrap_or(FIRST_SEQ);
    let proved = if ends_acked { got.contains_key(&end_seq) } else { expected.iter().all(|q| got.contains_key(q)) };
    if proved {
        return Ok(());
    }
    let missing: Vec<u32> = expected.iter().copied().filter(|q| !got.contains_key(q)).collect();
    Err(NetlinkError::Unconfirmed {
        expected: expected.len(),
        missing: missing.len(),
        first_missing: missing.first().map(|q| what(*q)).unwrap_or_else(|| what(end_seq)),
    })
}

/// Reads the nf_tables ruleset generation id of the calling thread's network namespace
/// (`NFT_MSG_GETGEN` → `NFTA_GEN_ID`).
///
/// Guarantees: read-only, idempotent. The id changes with every committed nf_tables
/// transaction (from any tool: nft, iptables-nft, ctguard); a batch carrying it
/// ([`crate::render::nft_batch::encode`]`(…, Some(id))`) is refused if another commit happened
/// in between.
pub fn get_genid() -> Result<u32, NetlinkError> {
    // A socket kept open on this thread (see `with_thread_socket`); a fresh one when that fails,
    // so a broken cached socket costs one retry, never a wrong answer.
    match with_thread_socket(genid_on) {
        Ok(g) => Ok(g),
        Err(_) => genid_on(&mut NfSocket::open()?, FIRST_SEQ),
    }
}

/// GETGEN on `s` with sequence number `seq`; replies to other sequence numbers (left over on a
/// reused socket) are skipped.
fn genid_on(s: &mut NfSocket, seq: u32) -> Result<u32, NetlinkError> {
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + 4);
    req.extend_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_GETGEN as u16).to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    s.send(&req)?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut genid = None;
    loop {
        let Some(replies) = s.recv(deadline.saturating_duration_since(Instant::now()))? else {
            return Err(NetlinkError::Query {
                what: "GETGEN (read the ruleset generation id)",
                source: io::Error::from(io::ErrorKind::TimedOut),
            });
        };
        for r in replies.iter().filter(|r| r.seq == seq) {
            if r.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                let attrs = parse_attrs(r.payload.get(4..).unwrap_or_default());
                genid = attrs
                    .iter()
                    .find(|(t, d)| *t == NFTA_GEN_ID && d.len() == 4)
                    .map(|(_, d)| u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
            } else if r.ty == NLMSG_ERROR {
                let (code, _) = parse_error(r)?;
                if code != 0 {
                    return Err(NetlinkError::Query {
                        what: "GETGEN (read the ruleset generation id)",
                        source: io::Error::from_raw_os_error(code.saturating_neg()),
                    });
                }
                return genid.ok_or_else(|| NetlinkError::Malformed("GETGEN reply without NFTA_GEN_ID".into()));
            }
        }
    }
}

/// A kept socket: the namespace it was opened in (device, inode), the socket, the next
/// sequence number.
type KeptSocket = ((u64, u64), NfSocket, u32);

thread_local! {
    /// This thread's kept NETLINK_NETFILTER socket.
    static THREAD_SOCKET: std::cell::RefCell<Option<KeptSocket>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` on a NETLINK_NETFILTER socket kept open on the calling thread for its current
/// network namespace (opened on first use, and again when the thread moved to another
/// namespace), with a sequence number no earlier request on it used. A socket `f` fails on is
/// dropped, not kept.
///
/// Why keep one: closing a NETLINK_NETFILTER socket makes nf_tables finish the deferred
/// destruction of the last commit first (`nft_rcv_nl_event` flushes its destroy work, which
/// waits for an RCU grace period: 10–15 ms here). A short query on a fresh socket right after a
/// commit — the generation id apply and the rollback check read — would wait for it.
///
/// A kept socket holds its namespace: a thread that leaves a namespace for good releases the
/// socket at its next use (or its exit). ctguard's namespace workers never leave theirs.
fn with_thread_socket<T>(f: impl FnOnce(&mut NfSocket, u32) -> Result<T, NetlinkError>) -> Result<T, NetlinkError> {
    let ns = crate::netns::current_id().unwrap_or((0, 0));
    let kept = THREAD_SOCKET.with(|k| k.borrow_mut().take());
    let (mut sock, seq) = match kept {
        Some((id, sock, seq)) if id == ns => (sock, seq),
        // Another namespace's socket: dropped here (this thread left that namespace).
        _ => (NfSocket::open()?, FIRST_SEQ),
    };
    let r = f(&mut sock, seq);
    if r.is_ok() {
        let next = seq.wrapping_add(1).max(FIRST_SEQ);
        THREAD_SOCKET.with(|k| *k.borrow_mut() = Some((ns, sock, next)));
    }
    r
}

/// Every nf_tables socket is closed without waiting: its last reference goes on a thread of
/// its own. Closing a NETLINK_NETFILTER socket waits while a commit that deleted something
/// has its deferred destruction pending (an RCU grace period, 10–15 ms here; see
/// [`with_thread_socket`]) — a commit's own socket, and any socket closed just after such a
/// commit, also another process's: the first dump of the next transaction waited 6.6 ms
/// measured. Nothing ctguard does next depends on the close. Inline when no thread can be
/// started.
impl Drop for NfSocket {
    fn drop(&mut self) {
        // The socket object cannot cross threads; its file can. A duplicate descriptor keeps
        // the file open, so the close of the original (by `mnl::Socket`'s drop, right after
        // this) returns at once; the duplicate is the last reference.
        // SAFETY: a close-on-exec duplicate of a descriptor `self` owns, owned by `last` alone.
        let dup = unsafe { libc::fcntl(self.sock.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return;
        }
        // SAFETY: `dup` is a fresh descriptor nothing else owns.
        let last = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        // If no thread starts, the closure (and `last` with it) is dropped here: closed inline.
        let _ = std::thread::Builder::new().name("ctguard-nl-close".into()).spawn(move || drop(last));
    }
}

/// Closes a socket a commit was sent on without waiting (see [`NfSocket`]'s `Drop`).
fn close_later(s: NfSocket) {
    drop(s);
}

/// nft family keyword of an `NFPROTO_*` value, as `nft list tables` prints it.
pub(crate) fn nft_family_name(f: u8) -> Option<&'static str> {
    match f {
        1 => Some("inet"),
        2 => Some("ip"),
        3 => Some("arp"),
        5 => Some("netdev"),
        7 => Some("bridge"),
        10 => Some("ip6"),
        _ => None,
    }
}

/// Lists the nf_tables tables of the calling thread's network namespace as (family keyword,
/// name), in the kernel's order (`NFT_MSG_GETTABLE` dump). Read-only. Guarantees the same
/// tables as `nft list tables` at one instant, without nft's full-cache fetch (which costs as
/// much as `nft list ruleset`: 0.5 s with 20k rules, measured).
pub fn list_tables() -> Result<Vec<(String, String)>, NetlinkError> {
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFT_MSG_NEWTABLE: u16 = 0;
    const NFTA_TABLE_NAME: u16 = 1;
    let query = |source: io::Error| NetlinkError::Query { what: "GETTABLE (list the nf_tables tables)", source };
    let mut s = NfSocket::open()?;
    let seq = FIRST_SEQ;
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + 4);
    req.extend_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    s.send(&req)?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut out = Vec::new();
    loop {
        let Some(replies) = s.recv(deadline.saturating_duration_since(Instant::now()))? else {
            return Err(query(io::Error::from(io::ErrorKind::TimedOut)));
        };
        for r in replies.iter().filter(|r| r.seq == seq) {
            if r.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
                let family = r.payload.first().copied().and_then(nft_family_name);
                let name = parse_attrs(r.payload.get(4..).unwrap_or_default())
                    .into_iter()
                    .find(|(t, _)| *t == NFTA_TABLE_NAME)
                    .map(|(_, d)| {
                        String::from_utf8_lossy(d.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
                    });
                match (family, name) {
                    (Some(f), Some(n)) => out.push((f.to_string(), n)),
                    _ => return Err(NetlinkError::Malformed("GETTABLE reply without a known family or a name".into())),
                }
            } else if r.ty == NLMSG_DONE {
                return Ok(out);
            } else if r.ty == NLMSG_ERROR {
                let (code, _) = parse_error(r)?;
                if code != 0 {
                    return Err(query(io::Error::from_raw_os_error(code.saturating_neg())));
                }
            }
        }
    }
}

/// The rules of one chain (`NFT_MSG_GETRULE` dump filtered in the kernel by
/// `NFTA_RULE_TABLE` + `NFTA_RULE_CHAIN`), in chain order, with handles and comments. A table
/// or chain that does not exist gives an empty list. Read-only; costs the kernel's dump of
/// that chain only, not of the ruleset (no `nft` process, no cache load).
///
/// Guarantees: one consistent read — a dump the kernel marks interrupted by a concurrent
/// change (`NLM_F_DUMP_INTR`) is an error. To act on what it found, read the generation id
/// ([`get_genid`]) before it and let the batch carry that id.
pub fn dump_chain_rules(family: &str, table: &str, chain: &str) -> Result<Vec<RuleInfo>, NetlinkError> {
    const WHAT: &str = "GETRULE (dump one chain's rules)";
    let query = |source: io::Error| NetlinkError::Query { what: WHAT, source };
    let seq = FIRST_SEQ;
    let req = getrule_request(family, table, chain, None, seq).map_err(query)?;
    let mut s = NfSocket::open()?;
    s.send(&req)?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut out = Vec::new();
    loop {
        let Some(replies) = s.recv(deadline.saturating_duration_since(Instant::now()))? else {
            return Err(query(io::Error::from(io::ErrorKind::TimedOut)));
        };
        for r in replies.iter().filter(|r| r.seq == seq) {
            if r.flags & NLM_F_DUMP_INTR != 0 {
                return Err(query(io::Error::other("the dump was interrupted by a concurrent change")));
            }
            if r.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE {
                out.push(parse_rule(r)?);
            } else if r.ty == NLMSG_DONE {
                let code = u32_ne(&r.payload, 0).map(|c| c as i32).unwrap_or(0);
                if code < 0 && code.saturating_neg() != libc::ENOENT {
                    return Err(query(io::Error::from_raw_os_error(code.saturating_neg())));
                }
                return Ok(out);
            } else if r.ty == NLMSG_ERROR {
                let (code, _) = parse_error(r)?;
                if code.saturating_neg() == libc::ENOENT {
                    return Ok(Vec::new());
                }
                if code != 0 {
                    return Err(query(io::Error::from_raw_os_error(code.saturating_neg())));
                }
            }
        }
    }
}

/// One message of a dump: its type (without the subsystem byte) and its payload (nfgenmsg +
/// attributes).
pub(crate) struct DumpMsg {
    /// `NFT_MSG_*` type.
    pub ty: u16,
    /// nfgenmsg + attributes.
    pub payload: Vec<u8>,
}

/// The outcome of one nf_tables dump request.
pub(crate) struct Dump {
    /// The messages, in the kernel's order.
    pub msgs: Vec<DumpMsg>,
    /// True when any message carried `NLM_F_DUMP_INTR`: the ruleset changed during the dump and
    /// the result may be inconsistent (read again).
    pub interrupted: bool,
}

/// Runs one `NLM_F_DUMP` request of nf_tables message type `msg` for `family` (`NFPROTO_*`,
/// 0 = every family) with the given attributes (type, data; strings NUL-terminated by the
/// caller) on a fresh socket in the calling thread's namespace, and collects every reply up to
/// `NLMSG_DONE`. A dump that ends with `ENOENT` (no such table or set) is empty. Read-only.
/// Blocks at most about 10 s between datagrams.
pub(crate) fn dump(msg: u16, family: u8, attrs: &[(u16, &[u8])], what: &'static str) -> Result<Dump, NetlinkError> {
    let mut msgs = Vec::new();
    let interrupted = dump_each(msg, family, attrs, what, &mut |batch| msgs.extend(batch))?;
    Ok(Dump { msgs, interrupted })
}

/// [`dump`], handing the messages of each datagram to `each` as it arrives instead of
/// collecting them (a caller on another thread can decode while the kernel still dumps).
/// Returns whether any message carried `NLM_F_DUMP_INTR` (see [`Dump::interrupted`]).
pub(crate) fn dump_each(
    msg: u16,
    family: u8,
    attrs: &[(u16, &[u8])],
    what: &'static str,
    each: &mut dyn FnMut(Vec<DumpMsg>),
) -> Result<bool, NetlinkError> {
    let query = |source: io::Error| NetlinkError::Query { what, source };
    let seq = FIRST_SEQ;
    let mut req = Vec::with_capacity(64);
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[family, 0, 0, 0]);
    for (ty, d) in attrs {
        req.extend_from_slice(&((4 + d.len()) as u16).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(d);
        while req.len() % 4 != 0 {
            req.push(0);
        }
    }
    let total = req.len() as u32;
    req[0..4].copy_from_slice(&total.to_ne_bytes());
    let mut s = NfSocket::open()?;
    // A big ruleset arrives in many datagrams; a larger buffer saves wake-ups, not data (a
    // dump is paced by our reads).
    s.raise_buffer(SO_RCVBUFFORCE, libc::SO_RCVBUF, 1 << 20);
    s.send(&req)?;
    let mut interrupted = false;
    loop {
        let Some(replies) = s.recv(REPLY_TIMEOUT)? else {
            return Err(query(io::Error::from(io::ErrorKind::TimedOut)));
        };
        let mut batch = Vec::with_capacity(replies.len());
        let mut done = None;
        for r in replies.into_iter().filter(|r| r.seq == seq) {
            if r.flags & NLM_F_DUMP_INTR != 0 {
                interrupted = true;
            }
            if r.ty == NLMSG_DONE {
                let code = u32_ne(&r.payload, 0).map(|c| c as i32).unwrap_or(0);
                if code < 0 && code.saturating_neg() != libc::ENOENT {
                    return Err(query(io::Error::from_raw_os_error(code.saturating_neg())));
                }
                done = Some(());
                break;
            } else if r.ty == NLMSG_ERROR {
                let (code, _) = parse_error(&r)?;
                if code.saturating_neg() == libc::ENOENT {
                    done = Some(());
                    break;
                }
                if code != 0 {
                    return Err(query(io::Error::from_raw_os_error(code.saturating_neg())));
                }
            } else if r.ty >> 8 == NFNL_SUBSYS_NFTABLES {
                batch.push(DumpMsg { ty: r.ty & 0xff, payload: r.payload });
            }
        }
        if !batch.is_empty() {
            each(batch);
        }
        if done.is_some() {
            return Ok(interrupted);
        }
    }
}

/// [`dump_each`], one message at a time: `each` gets every nf_tables message (type without the
/// subsystem byte, nfgenmsg + attributes) as its datagram arrives, and nothing is kept, so a
/// dump of any size reads in one receive buffer. Returns true when any message carried
/// `NLM_F_DUMP_INTR` (the ruleset changed during the dump: read again). Same requests, errors
/// and time limit as [`dump`]. Read-only.
pub(crate) fn dump_each_msg(
    msg: u16,
    family: u8,
    attrs: &[(u16, &[u8])],
    what: &'static str,
    each: &mut dyn FnMut(u16, &[u8]),
) -> Result<bool, NetlinkError> {
    dump_each(msg, family, attrs, what, &mut |batch| {
        for m in batch {
            each(m.ty, &m.payload);
        }
    })
}

/// A GETRULE request for `chain` of `table`: a dump of the chain (`NLM_F_DUMP`) without
/// `handle`, else the one rule with that handle (`NLM_F_ACK`).
fn getrule_request(family: &str, table: &str, chain: &str, handle: Option<u64>, seq: u32) -> io::Result<Vec<u8>> {
    let nfproto = crate::render::nft_batch::nfproto_of(family)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("unknown nft family {family:?}")))?;
    let flags = match handle {
        None => libc::NLM_F_REQUEST | libc::NLM_F_DUMP,
        Some(_) => libc::NLM_F_REQUEST | libc::NLM_F_ACK,
    };
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + 4 + 2 * 36 + 12);
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE).to_ne_bytes());
    req.extend_from_slice(&(flags as u16).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[nfproto as u8, 0, 0, 0]);
    let mut attr = |ty: u16, d: &[u8]| {
        req.extend_from_slice(&((4 + d.len()) as u16).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(d);
        while req.len() % 4 != 0 {
            req.push(0);
        }
    };
    for (ty, v) in [(NFTA_RULE_TABLE, table), (NFTA_RULE_CHAIN, chain)] {
        if v.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("NUL byte in {v:?}")));
        }
        let mut d = v.as_bytes().to_vec();
        d.push(0);
        attr(ty, &d);
    }
    if let Some(h) = handle {
        attr(NFTA_RULE_HANDLE, &h.to_be_bytes());
    }
    let total = req.len() as u32;
    req[0..4].copy_from_slice(&total.to_ne_bytes());
    Ok(req)
}

/// The rule with `handle` in `chain` of `table` (`NFT_MSG_GETRULE` without a dump: the kernel
/// looks the handle up and serializes that rule only), `None` when no such rule, chain or
/// table exists. Read-only. A handle is unique in its table only until the table is
/// recreated: check what comes back (its comment) before acting on it.
pub fn get_rule(family: &str, table: &str, chain: &str, handle: u64) -> Result<Option<RuleInfo>, NetlinkError> {
    get_rule_reply(family, table, chain, handle)?.map(|r| parse_rule(&r)).transpose()
}

/// [`get_rule`], the rule's NEWRULE payload (nfgenmsg + attributes) as the kernel sent it, for
/// [`crate::backend::nft_read::decode_rule`]. Read-only.
pub fn get_rule_payload(family: &str, table: &str, chain: &str, handle: u64) -> Result<Option<Vec<u8>>, NetlinkError> {
    Ok(get_rule_reply(family, table, chain, handle)?.map(|r| r.payload))
}

fn get_rule_reply(family: &str, table: &str, chain: &str, handle: u64) -> Result<Option<Reply>, NetlinkError> {
    const WHAT: &str = "GETRULE (read one rule by handle)";
    let query = |source: io::Error| NetlinkError::Query { what: WHAT, source };
    let seq = FIRST_SEQ;
    let req = getrule_request(family, table, chain, Some(handle), seq).map_err(query)?;
    let mut s = NfSocket::open()?;
    s.send(&req)?;
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut found = None;
    loop {
        let Some(replies) = s.recv(deadline.saturating_duration_since(Instant::now()))? else {
            return Err(query(io::Error::from(io::ErrorKind::TimedOut)));
        };
        for r in replies.into_iter().filter(|r| r.seq == seq) {
            if r.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE {
                found = Some(r);
            } else if r.ty == NLMSG_ERROR {
                let (code, _) = parse_error(&r)?;
                return match code.saturating_neg() {
                    0 => Ok(found),
                    libc::ENOENT => Ok(None),
                    e => Err(query(io::Error::from_raw_os_error(e))),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u32, code: i32, tlv_msg: Option<&str>) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&code.to_ne_bytes());
        // Capped echo of a request header.
        payload.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
        let mut flags = NLM_F_CAPPED;
        if let Some(m) = tlv_msg {
            flags |= NLM_F_ACK_TLVS;
            let len = 4 + m.len() + 1;
            payload.extend_from_slice(&(len as u16).to_ne_bytes());
            payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            payload.extend_from_slice(m.as_bytes());
            payload.push(0);
            while payload.len() % 4 != 0 {
                payload.push(0);
            }
        }
        let mut b = Vec::new();
        b.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&7u32.to_ne_bytes());
        b.extend_from_slice(&payload);
        b
    }

    #[test]
    fn parses_acks_and_extended_messages() {
        let mut d = ack(3, 0, None);
        d.extend(ack(4, -2, Some("Could not process rule")));
        let r = parse_replies(&d).expect("parses");
        assert_eq!(r.len(), 2);
        assert_eq!(parse_error(&r[0]).expect("ok"), (0, None));
        assert_eq!(parse_error(&r[1]).expect("ok"), (-2, Some("Could not process rule".into())));
        assert!(parse_replies(&d[..d.len() - 1]).is_err());
    }

    fn batch() -> BatchBuffer {
        use crate::model::{names::Tag, Policy};
        let t = crate::render::nft_ir::table_for(&Policy::builtin(), &Tag::preview());
        match crate::render::nft_batch::encode(&t, Some(9)) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn outcome_rules() {
        let b = batch();
        let all: Vec<u32> = b.messages().iter().map(|m| m.seq).collect();
        let end = *all.last().expect("non-empty");
        let ok = |s: &[u32]| s.iter().map(|q| (*q, (0, None))).collect::<std::collections::HashMap<_, _>>();
        assert!(outcome(&b, &ok(&all), &all, true).is_ok());
        // Without the batch-end ACK nothing is proved.
        let no_end = ok(&all[..all.len() - 1]);
        assert!(matches!(outcome(&b, &no_end, &all, true), Err(NetlinkError::Unconfirmed { .. })));
        // Stale generation.
        let mut g = std::collections::HashMap::new();
        g.insert(FIRST_SEQ, (-libc::ERESTART, None));
        assert!(matches!(outcome(&b, &g, &all, true), Err(NetlinkError::GenerationChanged { genid: Some(9), .. })));
        // A refused rule, earlier messages ACK 0: refused, naming the rule.
        let mut f = ok(&all[..all.len() - 2]);
        f.insert(end - 1, (-libc::ENOENT, None));
        match outcome(&b, &f, &all, true) {
            Err(NetlinkError::Refused { seq, what, .. }) => {
                assert_eq!(seq, end - 1);
                assert!(what.contains("add rule"), "{what}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_a_newrule_with_handle_and_comment() {
        let attr = put_attr;
        let mut p = vec![libc::NFPROTO_INET as u8, 0, 0, 7];
        attr(&mut p, NFTA_RULE_TABLE, b"host\0");
        attr(&mut p, NFTA_RULE_CHAIN, b"input\0");
        attr(&mut p, NFTA_RULE_HANDLE, &42u64.to_be_bytes());
        attr(&mut p, 4 | 0x8000, &[0u8; 8]);
        // userdata: an unknown TLV, then the comment.
        let mut ud = vec![9u8, 1, 0xff, UDATA_RULE_COMMENT, 10];
        ud.extend_from_slice(b"ctguard:x\0");
        attr(&mut p, NFTA_RULE_USERDATA, &ud);
        let r = Reply { ty: (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE, flags: 0, seq: 5, pid: 0, payload: p };
        let info = parse_rule(&r).expect("parses");
        assert_eq!(
            info,
            RuleInfo {
                seq: 5,
                family: "inet".into(),
                table: "host".into(),
                chain: "input".into(),
                handle: 42,
                comment: Some("ctguard:x".into()),
            }
        );
        let mut short = r;
        short.payload.truncate(4);
        assert!(parse_rule(&short).is_err());
        assert_eq!(udata_comment(&[UDATA_RULE_COMMENT, 5, b'a']), None, "truncated TLV");
    }

    #[test]
    fn error_texts_name_the_message() {
        let e = NetlinkError::Refused {
            seq: 5,
            what: "add rule inet ctguard output".into(),
            ext: None,
            others: 1,
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        let s = e.to_string();
        assert!(s.contains("message 5 (add rule inet ctguard output)"), "{s}");
        assert!(s.contains("and 1 later"), "{s}");
    }
}
