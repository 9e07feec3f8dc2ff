//! nf_tables change notifications (`NFNLGRP_NFTABLES`), what `nft monitor` reads: the guard of
//! a committed policy wakes on them instead of polling. Covers native nft and iptables-nft
//! (both are nf_tables); iptables-legacy has no notifications (the guard polls it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_NETFILTER: i32 = 12;
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
const NLMSG_HDRLEN: usize = 16;

/// nf_tables message types that change what ctguard guards: tables, chains, rules and sets
/// (set elements — fail2ban bans — and generation messages are ignored).
const RELEVANT: &[u16] = &[
    0,  // NFT_MSG_NEWTABLE
    2,  // NFT_MSG_DELTABLE
    3,  // NFT_MSG_NEWCHAIN
    5,  // NFT_MSG_DELCHAIN
    6,  // NFT_MSG_NEWRULE
    8,  // NFT_MSG_DELRULE
    9,  // NFT_MSG_NEWSET
    11, // NFT_MSG_DELSET
];

/// A non-blocking netlink socket subscribed to nf_tables notifications of the network
/// namespace of the thread that opened it. Closing it (drop) unsubscribes.
#[derive(Debug)]
pub struct NftMonitor {
    fd: OwnedFd,
}

impl NftMonitor {
    /// Subscribes in the calling thread's network namespace. Needs CAP_NET_ADMIN.
    pub fn open() -> io::Result<NftMonitor> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let raw = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, NETLINK_NETFILTER)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl zeroed is valid (pid 0: the kernel assigns one).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: bind with a valid sockaddr_nl of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(sa).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let group = NFNLGRP_NFTABLES;
        // SAFETY: setsockopt with a u32 option value.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                std::ptr::addr_of!(group).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NftMonitor { fd })
    }

    /// Reads every queued notification without blocking; true when one of them changed
    /// tables, chains, rules or sets. A lost notification (`ENOBUFS`: the queue overflowed)
    /// counts as a change.
    pub fn drain(&self) -> io::Result<bool> {
        let mut relevant = false;
        let lost = self.each_datagram(|d| relevant |= any_relevant(d))?;
        Ok(relevant || lost)
    }

    /// Hands each queued datagram to `each`, without blocking, until none is left; true when
    /// one was lost (`ENOBUFS`: the queue overflowed).
    fn each_datagram(&self, mut each: impl FnMut(&[u8])) -> io::Result<bool> {
        let mut buf = vec![0u8; 64 << 10];
        let mut lost = false;
        loop {
            // SAFETY: recv into a buffer we own, of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(lost),
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        lost = true;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Ok(lost);
            }
            each(&buf[..n as usize]);
        }
    }

    /// Reads every queued notification without blocking: the nf_tables messages, each as its
    /// `NFT_MSG_*` type and its payload (nfgenmsg + attributes), in the kernel's order; `None`
    /// when one was lost (`ENOBUFS`: the queue overflowed), as the list is then incomplete.
    pub fn messages(&self) -> io::Result<Option<Vec<NftMessage>>> {
        let mut out = Vec::new();
        let lost = self.each_datagram(|d| out.extend(nftables_messages(d)))?;
        Ok((!lost).then_some(out))
    }
}

/// One nf_tables notification: its `NFT_MSG_*` type and its payload (nfgenmsg + attributes).
pub type NftMessage = (u16, Vec<u8>);

/// The nf_tables messages of the netlink datagram `buf`: (`NFT_MSG_*` type, payload). Pure.
pub fn nftables_messages(buf: &[u8]) -> Vec<NftMessage> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        if ty >> 8 == NFNL_SUBSYS_NFTABLES {
            out.push((ty & 0xff, buf[off + NLMSG_HDRLEN..off + len].to_vec()));
        }
        off += (len + 3) & !3;
    }
    out
}

impl AsRawFd for NftMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// True when the netlink datagram `buf` holds a relevant nf_tables notification. Pure.
pub fn any_relevant(buf: &[u8]) -> bool {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN {
            return false;
        }
        if ty >> 8 == NFNL_SUBSYS_NFTABLES && RELEVANT.contains(&(ty & 0xff)) {
            return true;
        }
        off += (len + 3) & !3;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&20u32.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&[0u8; 14]);
        v
    }

    #[test]
    fn messages_are_split_with_their_payloads_and_other_subsystems_dropped() {
        let sub = NFNL_SUBSYS_NFTABLES << 8;
        let mut two = msg(sub | 6);
        two.extend(msg((1 << 8) | 6));
        two.extend(msg(sub | 8));
        let got = nftables_messages(&two);
        assert_eq!(got, vec![(6, vec![0u8; 4]), (8, vec![0u8; 4])]);
        let mut cut = msg(sub | 6);
        cut.truncate(18);
        assert!(nftables_messages(&cut).is_empty(), "a message cut short is not read");
    }

    #[test]
    fn only_table_chain_rule_and_set_changes_count() {
        let sub = NFNL_SUBSYS_NFTABLES << 8;
        assert!(any_relevant(&msg(sub | 6)), "NEWRULE");
        assert!(any_relevant(&msg(sub | 2)), "DELTABLE");
        assert!(!any_relevant(&msg(sub | 12)), "NEWSETELEM: a fail2ban ban");
        assert!(!any_relevant(&msg(sub | 15)), "NEWGEN");
        assert!(!any_relevant(&msg((1 << 8) | 6)), "another subsystem");
        let mut two = msg(sub | 15);
        two.extend(msg(sub | 8));
        assert!(any_relevant(&two), "the second message of a datagram counts");
        assert!(!any_relevant(&[1, 2, 3]), "truncated");
    }
}
