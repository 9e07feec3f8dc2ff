//! nftables expressions for `table inet ctguard`, as `nft` 1.0.6 generates them for the text
//! [`super::nft_script`] prints, implemented on nftnl 0.9.4's public [`Expression`] trait.
//!
//! nftnl 0.9.4 lacks `notrack` and `fib`, and its `Lookup` needs an `nftnl::set::Set` object;
//! ctguard's rules reference named sets by name (plus the set id when the set is created in the
//! same batch, as nft does). Those are built here through `nftnl::nftnl_sys`. Everything else
//! (meta, payload, cmp) reuses nftnl's own expressions, wrapped in one [`Expr`] enum because
//! `Rule::add_expr` takes a sized `impl Expression`.
//!
//! [`match_exprs`] translates one [`Match`] of the IR into the expression list `nft --debug=netlink`
//! shows for it (checked against nft 1.0.6 on kernel 6.18):
//!
//! | text | expressions |
//! | --- | --- |
//! | `iifname @s` | `meta load iifname => reg 1`, `lookup reg 1 set s` |
//! | `oifname "lo"` | `meta load oifname => reg 1`, `cmp eq reg 1` 16 bytes, NUL-padded |
//! | `ip saddr @s` | `meta load nfproto`, `cmp eq 2` (1 byte), `payload load 4b @ network + 12`, `lookup` |
//! | `ip6 daddr @s` | `meta load nfproto`, `cmp eq 10`, `payload load 16b @ network + 24`, `lookup` |
//! | `udp dport @s` | `meta load l4proto`, `cmp eq 17` (1 byte), `payload load 2b @ transport + 2`, `lookup` |
//! | `fib daddr type local` | `fib daddr type => reg 1`, `cmp eq reg 1 RTN_LOCAL` (4 bytes, host order) |
//! | `notrack` | `notrack` |
//!
//! Pure: builds libnftnl objects in memory only.

use std::borrow::Cow;
use std::ffi::CString;
use std::ptr::NonNull;

use nftnl::expr::{
    Cmp, CmpOp, Expression, Ipv4HeaderField, Ipv6HeaderField, Meta, NetworkHeaderField, Payload, TcpHeaderField,
    ToSlice, TransportHeaderField, UdpHeaderField,
};
use nftnl::nftnl_sys as sys;
use nftnl::Rule;

use super::nft_ir::Match;
use crate::model::names::{IfName, IFNAMSIZ};
use crate::model::Proto;

/// `NFTA_FIB_F_DADDR`: look up the destination address (`linux/netfilter/nf_tables.h`).
pub const NFTA_FIB_F_DADDR: u32 = 1 << 1;
/// `NFT_FIB_RESULT_ADDRTYPE`: the result is the address type (`RTN_*`).
pub const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
/// `RTN_LOCAL`: a local address (`linux/rtnetlink.h`).
pub const RTN_LOCAL: u32 = libc::RTN_LOCAL as u32;
/// `NFPROTO_IPV4` as `meta nfproto` loads it (one byte).
pub const NFPROTO_IPV4: u8 = libc::NFPROTO_IPV4 as u8;
/// `NFPROTO_IPV6` as `meta nfproto` loads it (one byte).
pub const NFPROTO_IPV6: u8 = libc::NFPROTO_IPV6 as u8;

/// Allocates an expression of libnftnl type `name`. A null return only happens when memory is
/// exhausted (every name used here exists in libnftnl ≥ 1.0.7); like nftnl itself, abort then.
fn alloc_expr(name: &std::ffi::CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is a valid NUL-terminated string; the result is checked for null.
    let ptr = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    match NonNull::new(ptr) {
        Some(p) => p,
        None => std::process::abort(),
    }
}

/// The `notrack` statement: the packet skips connection tracking. No attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notrack;

impl Expression for Notrack {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        alloc_expr(c"notrack")
    }
}

/// The `fib` expression: a FIB lookup whose `result` (e.g. [`NFT_FIB_RESULT_ADDRTYPE`]) is
/// loaded into register 1. `flags` are `NFTA_FIB_F_*` (e.g. [`NFTA_FIB_F_DADDR`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fib {
    /// `NFTA_FIB_F_*` bits: which address and restrictions the lookup uses.
    pub flags: u32,
    /// `NFT_FIB_RESULT_*`: what is loaded.
    pub result: u32,
}

impl Fib {
    /// `fib daddr type`: the address type of the destination address.
    pub const DADDR_TYPE: Fib = Fib { flags: NFTA_FIB_F_DADDR, result: NFT_FIB_RESULT_ADDRTYPE };
}

impl Expression for Fib {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"fib");
        // SAFETY: `expr` is a live fib expression; the attributes are fib attributes.
        unsafe {
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_FIB_DREG as u16, libc::NFT_REG_1 as u32);
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_FIB_RESULT as u16, self.result);
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_FIB_FLAGS as u16, self.flags);
        }
        expr
    }
}

/// `lookup reg 1 set NAME`: matches when register 1 is an element of the named set. `set_id`
/// is the batch-local id of a set created in the same batch (nft sends both; the kernel finds a
/// set by name first, by id for sets not yet visible under their name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupByName {
    set: CString,
    set_id: Option<u32>,
    invert: bool,
}

impl LookupByName {
    /// A lookup in the set `name`. Fails when `name` contains a NUL byte.
    pub fn new(name: &str, set_id: Option<u32>) -> Result<LookupByName, std::ffi::NulError> {
        Ok(LookupByName { set: CString::new(name)?, set_id, invert: false })
    }

    /// The same lookup, matching when the key is **not** in the set (`!= @name`).
    pub fn inverted(mut self) -> LookupByName {
        self.invert = true;
        self
    }
}

impl Expression for LookupByName {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"lookup");
        // SAFETY: `expr` is a live lookup expression; libnftnl copies the string.
        unsafe {
            sys::nftnl_expr_set_str(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SET as u16, self.set.as_ptr());
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SREG as u16, libc::NFT_REG_1 as u32);
            if let Some(id) = self.set_id {
                sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SET_ID as u16, id);
            }
            if self.invert {
                // NFT_LOOKUP_F_INV
                sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_FLAGS as u16, 1);
            }
        }
        expr
    }
}

/// Comparison data owned by the expression (nftnl's `ToSlice` is not implemented for `Vec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl ToSlice for Bytes {
    fn to_slice(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0)
    }
}

/// One expression of a ctguard rule. `Rule::add_expr` needs a sized type, hence one enum.
pub enum Expr {
    /// `meta load KEY => reg 1`.
    Meta(Meta),
    /// `payload load LEN @ BASE + OFFSET => reg 1`.
    Payload(Payload),
    /// `cmp eq reg 1 DATA`.
    CmpEq(Bytes),
    /// `lookup reg 1 set NAME`.
    Lookup(LookupByName),
    /// `fib … => reg 1`.
    Fib(Fib),
    /// `notrack`.
    Notrack,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expr::Meta(m) => write!(f, "Meta({})", m.to_raw_key()),
            Expr::Payload(_) => f.write_str("Payload"),
            Expr::CmpEq(b) => write!(f, "CmpEq({:?})", b.0),
            Expr::Lookup(l) => write!(f, "Lookup({:?}, {:?})", l.set, l.set_id),
            Expr::Fib(x) => write!(f, "{x:?}"),
            Expr::Notrack => f.write_str("Notrack"),
        }
    }
}

impl Expression for Expr {
    fn to_expr(&self, rule: &Rule) -> NonNull<sys::nftnl_expr> {
        match self {
            Expr::Meta(m) => m.to_expr(rule),
            Expr::Payload(p) => p.to_expr(rule),
            Expr::CmpEq(b) => Cmp::new(CmpOp::Eq, b.clone()).to_expr(rule),
            Expr::Lookup(l) => l.to_expr(rule),
            Expr::Fib(x) => x.to_expr(rule),
            Expr::Notrack => Notrack.to_expr(rule),
        }
    }
}

/// An interface name as `meta iifname`/`oifname` compares it: IFNAMSIZ bytes, NUL-padded (nft
/// compares all 16 bytes for an exact name).
pub fn ifname_key(name: &IfName) -> [u8; IFNAMSIZ] {
    let mut key = [0u8; IFNAMSIZ];
    let b = name.as_str().as_bytes();
    let n = b.len().min(IFNAMSIZ - 1);
    key[..n].copy_from_slice(&b[..n]);
    key
}

fn nfproto(v6: bool) -> [Expr; 2] {
    [Expr::Meta(Meta::NfProto), Expr::CmpEq(Bytes(vec![if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]))]
}

fn l4proto(proto: Proto) -> [Expr; 2] {
    [Expr::Meta(Meta::L4Proto), Expr::CmpEq(Bytes(vec![proto.number()]))]
}

/// The network-header field of an address match: source or destination, IPv4 or IPv6.
pub fn addr_payload(v6: bool, source: bool) -> Payload {
    Payload::Network(match (v6, source) {
        (false, true) => NetworkHeaderField::Ipv4(Ipv4HeaderField::Saddr),
        (false, false) => NetworkHeaderField::Ipv4(Ipv4HeaderField::Daddr),
        (true, true) => NetworkHeaderField::Ipv6(Ipv6HeaderField::Saddr),
        (true, false) => NetworkHeaderField::Ipv6(Ipv6HeaderField::Daddr),
    })
}

/// The transport-header field of a port match: source or destination, TCP or UDP.
pub fn port_payload(proto: Proto, source: bool) -> Payload {
    Payload::Transport(match (proto, source) {
        (Proto::Tcp, true) => TransportHeaderField::Tcp(TcpHeaderField::Sport),
        (Proto::Tcp, false) => TransportHeaderField::Tcp(TcpHeaderField::Dport),
        (Proto::Udp, true) => TransportHeaderField::Udp(UdpHeaderField::Sport),
        (Proto::Udp, false) => TransportHeaderField::Udp(UdpHeaderField::Dport),
    })
}

/// The expressions nft generates for `m` in an inet-family rule, in order. `set_id` gives the
/// batch-local id of a set created in the same batch (None: name only). Fails only when a set
/// name contains a NUL byte.
pub fn match_exprs(m: &Match, set_id: impl Fn(&str) -> Option<u32>) -> Result<Vec<Expr>, std::ffi::NulError> {
    let lookup =
        |set: &str| -> Result<Expr, std::ffi::NulError> { Ok(Expr::Lookup(LookupByName::new(set, set_id(set))?)) };
    let mut v = Vec::with_capacity(4);
    match m {
        Match::IifnameInSet(set) => {
            v.push(Expr::Meta(Meta::IifName));
            v.push(lookup(set)?);
        }
        Match::OifnameInSet(set) => {
            v.push(Expr::Meta(Meta::OifName));
            v.push(lookup(set)?);
        }
        Match::OifnameIs(name) => {
            v.push(Expr::Meta(Meta::OifName));
            v.push(Expr::CmpEq(Bytes(ifname_key(name).to_vec())));
        }
        Match::SaddrInSet { v6, set } | Match::DaddrInSet { v6, set } => {
            let source = matches!(m, Match::SaddrInSet { .. });
            v.extend(nfproto(*v6));
            v.push(Expr::Payload(addr_payload(*v6, source)));
            v.push(lookup(set)?);
        }
        Match::DportInSet { proto, set } | Match::SportInSet { proto, set } => {
            let source = matches!(m, Match::SportInSet { .. });
            v.extend(l4proto(*proto));
            v.push(Expr::Payload(port_payload(*proto, source)));
            v.push(lookup(set)?);
        }
        Match::FibDaddrLocal => {
            v.push(Expr::Fib(Fib::DADDR_TYPE));
            v.push(Expr::CmpEq(Bytes(RTN_LOCAL.to_ne_bytes().to_vec())));
        }
    }
    Ok(v)
}

/// The set names a match looks up (empty for `oifname "NAME"` and `fib`).
pub fn match_set(m: &Match) -> Option<&str> {
    match m {
        Match::IifnameInSet(s) | Match::OifnameInSet(s) => Some(s),
        Match::SaddrInSet { set, .. }
        | Match::DaddrInSet { set, .. }
        | Match::DportInSet { set, .. }
        | Match::SportInSet { set, .. } => Some(set),
        Match::OifnameIs(_) | Match::FibDaddrLocal => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oifname_is_padded_to_ifnamsiz() {
        let lo = IfName::parse("lo").expect("valid");
        let k = ifname_key(&lo);
        assert_eq!(&k[..3], b"lo\0");
        assert!(k[2..].iter().all(|b| *b == 0));
        let v = match_exprs(&Match::OifnameIs(lo), |_| None).expect("no NUL");
        assert!(matches!(&v[1], Expr::CmpEq(b) if b.0.len() == 16));
    }

    #[test]
    fn address_match_has_nfproto_dependency() {
        let v = match_exprs(&Match::SaddrInSet { v6: true, set: "src6_0".into() }, |_| Some(3)).expect("no NUL");
        assert_eq!(v.len(), 4);
        assert!(matches!(&v[1], Expr::CmpEq(b) if b.0 == vec![10]));
        assert!(matches!(&v[3], Expr::Lookup(l) if l.set_id == Some(3)));
    }

    #[test]
    fn fib_compares_rtn_local_in_host_order() {
        let v = match_exprs(&Match::FibDaddrLocal, |_| None).expect("no NUL");
        assert!(matches!(&v[0], Expr::Fib(f) if *f == Fib::DADDR_TYPE));
        assert!(matches!(&v[1], Expr::CmpEq(b) if b.0 == 2u32.to_ne_bytes().to_vec()));
    }

    #[test]
    fn nul_in_set_name_is_refused() {
        assert!(match_exprs(&Match::IifnameInSet("a\0b".into()), |_| None).is_err());
    }
}
