//! `table inet ctguard` as ONE nf_tables netlink batch: the bytes [`crate::backend::netlink`]
//! sends, equivalent to [`super::nft_script::replace_script`] loaded with `nft -f` (a kernel
//! test proves both give the same `nft list table inet ctguard`). Pure: no sockets.
//!
//! The batch is built message by message with nftnl's `NlMsg::write` (or libnftnl directly
//! for what nftnl 0.9.4 cannot express) into our own buffer instead of `nftnl::Batch`, so that
//! the BATCH_BEGIN message can carry `NFNL_BATCH_GENID`: the kernel then refuses the whole
//! batch with `ERESTART` if the ruleset changed since the generation id was read (DESIGN §1).
//!
//! Layout, as nft 1.0.6 sends `replace_script` (checked with `nft --debug=netlink` and strace):
//!
//! ```text
//! BATCH_BEGIN [NFNL_BATCH_GENID]
//! NEWTABLE inet ctguard      (declares it: a no-op when present)
//! DELTABLE inet ctguard
//! NEWTABLE inet ctguard      ┐
//! NEWSET, NEWSETELEM…        │ only when the table is not empty
//! NEWCHAIN (base chains)     │
//! NEWRULE…                   ┘
//! BATCH_END
//! ```
//!
//! Message flags are those nft sends plus `NLM_F_ACK` on every message, batch begin and end
//! included, so the kernel acknowledges each one; sequence numbers are consecutive from
//! [`FIRST_SEQ`]. (nft sends the sets after the chains; the order inside one transaction does not
//! change the result.)
//!
//! Set details that make `nft list` print the batch exactly like the script:
//! - key type / length as nft: `inet_service` 13/2, `ipv4_addr` 7/4, `ipv6_addr` 8/16,
//!   `ifname` 41/16; `flags interval` for ports and prefixes; set userdata
//!   `NFTNL_UDATA_SET_KEYBYTEORDER` = big endian (2) for ports and addresses, host (1) for ifname.
//! - interval elements as nft 1.0.6 sends them: an `INTERVAL_END` element at key 0 when the
//!   first range does not start at 0, then per range its start and `hi + 1` flagged
//!   `NFT_SET_ELEM_INTERVAL_END`; a range that reaches the top of the key space has no end
//!   element and carries element userdata `NFTNL_UDATA_SET_ELEM_FLAGS` =
//!   `NFTNL_SET_ELEM_F_INTERVAL_OPEN`.
//! - `ifname` elements are 16 bytes, NUL-padded; no flags.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::{Chain, ChainType, MsgType, NlMsg, ProtoFamily, Rule, Table};

use super::nft_expr::{ifname_key, match_exprs, match_set, Notrack};
use super::nft_ir::{ChainIr, Elem, Hook, RuleIr, SetIr, SetKind, TableIr};
use super::nft_script::rule_text;
use crate::model::Prefix;

/// `NFNL_SUBSYS_NFTABLES`.
pub const NFNL_SUBSYS_NFTABLES: u16 = libc::NFNL_SUBSYS_NFTABLES as u16;
/// `NFNL_MSG_BATCH_BEGIN`.
pub const NFNL_MSG_BATCH_BEGIN: u16 = libc::NFNL_MSG_BATCH_BEGIN as u16;
/// `NFNL_MSG_BATCH_END`.
pub const NFNL_MSG_BATCH_END: u16 = libc::NFNL_MSG_BATCH_END as u16;
/// `NFNL_BATCH_GENID`: attribute of BATCH_BEGIN, u32 in network byte order.
pub const NFNL_BATCH_GENID: u16 = libc::NFNL_BATCH_GENID as u16;
/// Sequence number of the BATCH_BEGIN message; each further message takes the next one.
pub const FIRST_SEQ: u32 = 1;

const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
const NLM_F_APPEND: u16 = libc::NLM_F_APPEND as u16;
const NLM_F_EXCL: u16 = libc::NLM_F_EXCL as u16;
/// `NLM_F_ECHO`: the kernel sends the committed object back to the sender (after the commit).
pub const NLM_F_ECHO: u16 = libc::NLM_F_ECHO as u16;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// `NFTNL_UDATA_SET_KEYBYTEORDER` (set userdata TLV type).
const UDATA_SET_KEYBYTEORDER: u8 = 0;
/// `NFTNL_UDATA_SET_ELEM_FLAGS` (element userdata TLV type).
const UDATA_SET_ELEM_FLAGS: u8 = 1;
/// `NFTNL_SET_ELEM_F_INTERVAL_OPEN`: the interval extends to the end of the key space.
const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
/// nft's `BYTEORDER_HOST_ENDIAN`.
const BYTEORDER_HOST_ENDIAN: u32 = 1;
/// nft's `BYTEORDER_BIG_ENDIAN`.
const BYTEORDER_BIG_ENDIAN: u32 = 2;

/// What a message of the batch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    /// `NFNL_MSG_BATCH_BEGIN`.
    BatchBegin,
    /// `NFT_MSG_NEWTABLE`.
    NewTable,
    /// `NFT_MSG_DELTABLE`.
    DelTable,
    /// `NFT_MSG_NEWSET`.
    NewSet,
    /// `NFT_MSG_NEWSETELEM`.
    NewSetElem,
    /// `NFT_MSG_NEWCHAIN`.
    NewChain,
    /// `NFT_MSG_NEWRULE`.
    NewRule,
    /// `NFT_MSG_NEWRULE` without `NLM_F_APPEND`: with `NFTA_RULE_POSITION` the rule goes just
    /// before the rule of that handle (an insert, not an append).
    InsertRule,
    /// `NFT_MSG_DELRULE` (by handle).
    DelRule,
    /// `NFT_MSG_DELCHAIN` (by name; the kernel deletes the chain's rules with it).
    DelChain,
    /// `NFNL_MSG_BATCH_END`.
    BatchEnd,
}

impl MsgKind {
    /// The `nlmsg_type` of such a message.
    pub fn nlmsg_type(self) -> u16 {
        let nft = |t: i32| (NFNL_SUBSYS_NFTABLES << 8) | t as u16;
        match self {
            MsgKind::BatchBegin => NFNL_MSG_BATCH_BEGIN,
            MsgKind::NewTable => nft(libc::NFT_MSG_NEWTABLE),
            MsgKind::DelTable => nft(libc::NFT_MSG_DELTABLE),
            MsgKind::NewSet => nft(libc::NFT_MSG_NEWSET),
            MsgKind::NewSetElem => nft(libc::NFT_MSG_NEWSETELEM),
            MsgKind::NewChain => nft(libc::NFT_MSG_NEWCHAIN),
            MsgKind::NewRule | MsgKind::InsertRule => nft(libc::NFT_MSG_NEWRULE),
            MsgKind::DelRule => nft(libc::NFT_MSG_DELRULE),
            MsgKind::DelChain => nft(libc::NFT_MSG_DELCHAIN),
            MsgKind::BatchEnd => NFNL_MSG_BATCH_END,
        }
    }

    /// The `nlmsg_flags` this encoder gives it: nft 1.0.6's, plus `NLM_F_ACK`.
    pub fn nlmsg_flags(self) -> u16 {
        NLM_F_REQUEST
            | NLM_F_ACK
            | match self {
                MsgKind::NewSet | MsgKind::NewSetElem | MsgKind::NewChain | MsgKind::InsertRule => NLM_F_CREATE,
                MsgKind::NewRule => NLM_F_CREATE | NLM_F_APPEND,
                _ => 0,
            }
    }
}

/// One message of a [`BatchBuffer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMsg {
    /// Its `nlmsg_seq`; the kernel's ACK or error carries it.
    pub seq: u32,
    /// What it does.
    pub kind: MsgKind,
    /// Byte offset in [`BatchBuffer::as_bytes`].
    pub offset: usize,
    /// Its `nlmsg_len`.
    pub len: usize,
    /// Human description for error messages, e.g. `add set inet ctguard ports_0`.
    pub what: String,
    /// `NLM_F_ECHO` is set on it: after the commit the kernel sends the object back (for a
    /// rule: with its handle), with this message's sequence number.
    pub echo: bool,
}

/// The bytes of one netlink batch (BATCH_BEGIN … BATCH_END), ready for one `sendto` on a
/// NETLINK_NETFILTER socket, with a description of every message for error reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchBuffer {
    bytes: Vec<u8>,
    msgs: Vec<BatchMsg>,
    genid: Option<u32>,
}

impl BatchBuffer {
    /// The whole batch, messages back to back (each 4-byte aligned).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Every message in order, BATCH_BEGIN first and BATCH_END last.
    pub fn messages(&self) -> &[BatchMsg] {
        &self.msgs
    }
    /// The message with sequence number `seq`.
    pub fn message(&self, seq: u32) -> Option<&BatchMsg> {
        self.msgs.iter().find(|m| m.seq == seq)
    }
    /// The generation id carried by BATCH_BEGIN, if any.
    pub fn genid(&self) -> Option<u32> {
        self.genid
    }
    /// True for a batch that commits (it ends with BATCH_END); false for a check batch
    /// ([`BatchBuilder::finish_check`]).
    pub fn commits(&self) -> bool {
        self.msgs.last().is_some_and(|m| m.kind == MsgKind::BatchEnd)
    }
}

/// Name nft gives an anonymous set in a batch; the kernel replaces `%d` at commit.
pub const ANON_SET_NAME: &str = "__set%d";

/// An anonymous set written into a batch: what a lookup of it must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonSet {
    /// `__set%d`.
    pub name: String,
    /// Batch-local set id (`NFTA_SET_ID` / `NFTA_LOOKUP_SET_ID`).
    pub id: u32,
}

/// Where [`BatchBuilder::insert_rule`] puts a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulePosition {
    /// Just before the rule with this handle.
    Before(u64),
    /// At the end of the chain.
    Append,
}

/// The `NFPROTO_*` number of an nft family keyword ctguard writes into (`ip`, `ip6`, `inet`).
pub fn nfproto_of(family: &str) -> Option<u16> {
    proto_family_of(family).map(|f| f as u16)
}

fn proto_family_of(family: &str) -> Option<ProtoFamily> {
    match family {
        "ip" => Some(ProtoFamily::Ipv4),
        "ip6" => Some(ProtoFamily::Ipv6),
        "inet" => Some(ProtoFamily::Inet),
        _ => None,
    }
}

/// Why a table cannot be encoded. Nothing is sent in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A rule looks up a set the table does not declare.
    #[error("rule {rule} of chain {chain} looks up set @{set}, which table {table} does not declare")]
    UnknownSet {
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
        /// 1-based rule position in the chain.
        rule: usize,
        /// The missing set.
        set: String,
    },
    /// An element does not fit the set's type.
    #[error("set {set} of type {kind} cannot hold element {element}")]
    ElementKind {
        /// Set name.
        set: String,
        /// Its type keyword.
        kind: &'static str,
        /// The element as nft prints it.
        element: String,
    },
    /// Two elements of a set overlap (or repeat): the kernel would refuse the batch.
    #[error("set {set}: element {element} overlaps or repeats an earlier one")]
    Overlap {
        /// Set name.
        set: String,
        /// The element as nft prints it.
        element: String,
    },
    /// A name contains a NUL byte.
    #[error("{what} {name:?} contains a NUL byte")]
    Nul {
        /// What kind of name.
        what: &'static str,
        /// The name.
        name: String,
        /// The conversion error.
        #[source]
        source: std::ffi::NulError,
    },
    /// A rule comment is longer than libnftnl's comment buffer.
    #[error("rule {rule} of chain {chain}: comment of {len} bytes is too long")]
    CommentTooLong {
        /// Chain name.
        chain: String,
        /// 1-based rule position.
        rule: usize,
        /// Comment length in bytes.
        len: usize,
    },
    /// A table family ctguard does not write into (only `ip`, `ip6`, `inet`).
    #[error("nft family {0:?} is not one ctguard writes rules into")]
    Family(String),
    /// A message came out larger than any netlink message can be.
    #[error("{what}: message of {len} bytes exceeds the netlink limit")]
    TooLarge {
        /// The message.
        what: String,
        /// Its length.
        len: usize,
    },
    /// A delete by batch-local id names no rule this batch inserted.
    #[error("chain {chain}: no rule with batch-local id {id} was inserted in this batch")]
    UnknownRuleId {
        /// Chain name.
        chain: String,
        /// The id.
        id: u32,
    },
    /// An attribute could not be appended to a message (no message, or one that does not end
    /// the buffer): a bug in the builder, refused rather than sent.
    #[error("{what}: cannot append an attribute to it")]
    Append {
        /// The message.
        what: String,
    },
}

/// Encodes `table` as one batch equivalent to `replace_script(table)`: declare, delete and
/// recreate `table inet <name>` with its sets, elements, base chains and rules (an empty table
/// only removes it). With `genid` the kernel applies the batch only if the ruleset generation is
/// still `genid`. Pure and deterministic; the table is checked first (every looked-up set
/// declared, elements of the right type, no overlaps), so an `Ok` batch fails in the kernel only
/// for reasons the kernel alone knows.
pub fn encode(table: &TableIr, genid: Option<u32>) -> Result<BatchBuffer, BatchError> {
    let mut b = BatchBuilder::new(genid);
    b.replace_table(table)?;
    Ok(b.finish())
}

fn check(table: &TableIr) -> Result<(), BatchError> {
    for set in &table.sets {
        set_elements(set)?;
    }
    for chain in &table.chains {
        for (i, rule) in chain.rules.iter().enumerate() {
            for m in &rule.matches {
                if let Some(s) = match_set(m) {
                    if !table.sets.iter().any(|x| x.name == s) {
                        return Err(BatchError::UnknownSet {
                            table: table.name.clone(),
                            chain: chain.name.clone(),
                            rule: i + 1,
                            set: s.to_string(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

fn cstring(what: &'static str, name: &str) -> Result<CString, BatchError> {
    CString::new(name).map_err(|source| BatchError::Nul { what, name: name.to_string(), source })
}

/// Scratch space for one message: `nft_nlmsg_maxsize()` bytes, 8-byte aligned for `nlmsghdr`.
struct Scratch(Vec<u64>);

impl Scratch {
    fn new() -> Scratch {
        let bytes = nftnl::nft_nlmsg_maxsize() as usize;
        Scratch(vec![0u64; bytes.div_ceil(8)])
    }
    fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
    fn capacity(&self) -> usize {
        self.0.len() * 8
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: a u64 slice viewed as bytes: same allocation, 8× the length, no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 8) }
    }
    fn clear(&mut self, len: usize) {
        let words = len.div_ceil(8).min(self.0.len());
        self.0[..words].fill(0);
    }
}

/// libnftnl set with its elements; freed on drop.
struct RawSet(NonNull<sys::nftnl_set>);

impl Drop for RawSet {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_set_alloc and freed only here (frees its elements too).
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) }
    }
}

/// libnftnl table object; freed on drop.
struct RawTable(NonNull<sys::nftnl_table>);

impl Drop for RawTable {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_table_alloc and freed only here.
        unsafe { sys::nftnl_table_free(self.0.as_ptr()) }
    }
}

fn non_null<T>(p: *mut T) -> NonNull<T> {
    // libnftnl allocators return null only when memory is exhausted; abort like nftnl does.
    match NonNull::new(p) {
        Some(p) => p,
        None => std::process::abort(),
    }
}

/// One set element as sent: key bytes, `NFTA_SET_ELEM_FLAGS`, element userdata.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ElemSpec {
    key: Vec<u8>,
    flags: u32,
    udata: Option<Vec<u8>>,
}

fn udata_u32(ty: u8, v: u32) -> Vec<u8> {
    let mut b = vec![ty, 4];
    b.extend_from_slice(&v.to_ne_bytes());
    b
}

/// Key type number, key length and nft's key byte order for a set kind.
fn key_spec(kind: SetKind) -> (u32, u32, u32) {
    match kind {
        SetKind::Ports => (13, 2, BYTEORDER_BIG_ENDIAN),
        SetKind::Ipv4 => (7, 4, BYTEORDER_BIG_ENDIAN),
        SetKind::Ipv6 => (8, 16, BYTEORDER_BIG_ENDIAN),
        SetKind::Ifname => (41, 16, BYTEORDER_HOST_ENDIAN),
    }
}

/// The elements nft 1.0.6 sends for `set`.
fn set_elements(set: &SetIr) -> Result<Vec<ElemSpec>, BatchError> {
    let elem_text = |e: &Elem| super::nft_script::elem(e);
    let wrong =
        |e: &Elem| BatchError::ElementKind { set: set.name.clone(), kind: set.kind.type_name(), element: elem_text(e) };
    if set.kind == SetKind::Ifname {
        let mut out: Vec<ElemSpec> = Vec::with_capacity(set.elements.len());
        for e in &set.elements {
            let Elem::Ifname(n) = e else {
                return Err(wrong(e));
            };
            let key = ifname_key(n).to_vec();
            if out.iter().any(|o| o.key == key) {
                return Err(BatchError::Overlap { set: set.name.clone(), element: elem_text(e) });
            }
            out.push(ElemSpec { key, flags: 0, udata: None });
        }
        return Ok(out);
    }
    let width = key_spec(set.kind).1 as usize;
    let max: u128 = if width == 16 { u128::MAX } else { (1u128 << (8 * width)) - 1 };
    let mut ranges: Vec<(u128, u128, &Elem)> = Vec::with_capacity(set.elements.len());
    for e in &set.elements {
        let r = match (set.kind, e) {
            (SetKind::Ports, Elem::Port(p)) => (u128::from(p.lo), u128::from(p.hi)),
            (SetKind::Ipv4, Elem::Prefix(p @ Prefix::V4(..))) => p.bounds(),
            (SetKind::Ipv6, Elem::Prefix(p @ Prefix::V6(..))) => p.bounds(),
            _ => return Err(wrong(e)),
        };
        if r.0 > r.1 {
            return Err(wrong(e));
        }
        ranges.push((r.0, r.1, e));
    }
    ranges.sort_by_key(|r| (r.0, r.1));
    let key = |v: u128| v.to_be_bytes()[16 - width..].to_vec();
    let mut out = Vec::with_capacity(2 * ranges.len() + 1);
    if ranges.first().is_some_and(|r| r.0 != 0) {
        out.push(ElemSpec { key: key(0), flags: libc::NFT_SET_ELEM_INTERVAL_END as u32, udata: None });
    }
    let mut prev_hi: Option<u128> = None;
    for (lo, hi, e) in ranges {
        if prev_hi.is_some_and(|p| lo <= p) {
            return Err(BatchError::Overlap { set: set.name.clone(), element: elem_text(e) });
        }
        prev_hi = Some(hi);
        if hi == max {
            out.push(ElemSpec {
                key: key(lo),
                flags: 0,
                udata: Some(udata_u32(UDATA_SET_ELEM_FLAGS, SET_ELEM_F_INTERVAL_OPEN)),
            });
        } else {
            out.push(ElemSpec { key: key(lo), flags: 0, udata: None });
            out.push(ElemSpec { key: key(hi + 1), flags: libc::NFT_SET_ELEM_INTERVAL_END as u32, udata: None });
        }
    }
    Ok(out)
}

/// Builds a batch message by message. [`encode`] is the normal entry point; the builder is
/// public so tests (and later the transaction code) can assemble other batches — e.g. one whose
/// last message the kernel must refuse. All objects are family `inet`. Pure.
pub struct BatchBuilder {
    bytes: Vec<u8>,
    msgs: Vec<BatchMsg>,
    genid: Option<u32>,
    next_seq: u32,
    next_set_id: u32,
    set_ids: HashMap<(String, String), u32>,
    scratch: Scratch,
    echo_inserts: bool,
    /// The rules [`BatchBuilder::insert_rule`] wrote, with the batch-local id each carries.
    inserted: Vec<InsertedRule>,
}

/// A rule [`BatchBuilder::insert_rule`] wrote: where, its comment, and the batch-local rule id
/// (`NFTA_RULE_ID`) a later message of the same batch can name it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertedRule {
    /// nft family (`ip`, `ip6`, `inet`).
    pub family: String,
    /// Table name.
    pub table: String,
    /// Chain name.
    pub chain: String,
    /// The rule's comment.
    pub comment: String,
    /// Its batch-local id (1, 2, … in the order written).
    pub id: u32,
}

/// `NFTA_RULE_ID` (`enum nft_rule_attributes`): a rule's batch-local id, big-endian u32.
const NFTA_RULE_ID: u16 = 9;

impl BatchBuilder {
    /// Starts a batch: writes BATCH_BEGIN (with `NFNL_BATCH_GENID` when `genid` is Some).
    pub fn new(genid: Option<u32>) -> BatchBuilder {
        let mut b = BatchBuilder {
            bytes: Vec::with_capacity(4096),
            msgs: Vec::new(),
            genid,
            next_seq: FIRST_SEQ,
            next_set_id: 1,
            set_ids: HashMap::new(),
            scratch: Scratch::new(),
            echo_inserts: false,
            inserted: Vec::new(),
        };
        let attr = genid.map(|g| {
            let mut a = Vec::with_capacity(8);
            a.extend_from_slice(&8u16.to_ne_bytes());
            a.extend_from_slice(&NFNL_BATCH_GENID.to_ne_bytes());
            a.extend_from_slice(&g.to_be_bytes());
            a
        });
        let what = match genid {
            Some(g) => format!("batch begin (generation {g})"),
            None => "batch begin".to_string(),
        };
        b.push_control(MsgKind::BatchBegin, attr.as_deref().unwrap_or(&[]), what);
        b
    }

    /// BATCH_BEGIN / BATCH_END: nlmsghdr, nfgenmsg (AF_UNSPEC, v0, res_id = NFTABLES), attrs.
    fn push_control(&mut self, kind: MsgKind, attrs: &[u8], what: String) {
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
        let seq = self.take_seq();
        let offset = self.bytes.len();
        self.bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.nlmsg_type().to_ne_bytes());
        self.bytes.extend_from_slice(&kind.nlmsg_flags().to_ne_bytes());
        self.bytes.extend_from_slice(&seq.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes());
        self.bytes.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
        self.bytes.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        self.bytes.extend_from_slice(attrs);
        self.pad();
        self.msgs.push(BatchMsg { seq, kind, offset, len, what, echo: false });
    }

    /// From now on, rules written with [`BatchBuilder::insert_rule`] carry `NLM_F_ECHO` (on
    /// when `on`): the kernel sends each committed rule back with its handle
    /// ([`crate::backend::netlink::send_batch_echoed`] collects them).
    pub fn echo_inserts(&mut self, on: bool) {
        self.echo_inserts = on;
    }

    fn take_seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        s
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }

    /// Writes one message with `write(scratch, seq)`, then sets the flags of `kind` and appends
    /// it. `write` must produce a complete message at the start of the scratch buffer.
    fn push_written(
        &mut self,
        kind: MsgKind,
        what: String,
        write: impl FnOnce(*mut c_void, u32),
    ) -> Result<(), BatchError> {
        self.push_written_echo(kind, what, false, write)
    }

    /// [`BatchBuilder::push_written`], with `NLM_F_ECHO` added when `echo`.
    fn push_written_echo(
        &mut self,
        kind: MsgKind,
        what: String,
        echo: bool,
        write: impl FnOnce(*mut c_void, u32),
    ) -> Result<(), BatchError> {
        let seq = self.take_seq();
        write(self.scratch.ptr(), seq);
        let s = self.scratch.bytes();
        let len = u32::from_ne_bytes([s[0], s[1], s[2], s[3]]) as usize;
        if len < NLMSG_HDRLEN || len > self.scratch.capacity() || len > u32::MAX as usize {
            return Err(BatchError::TooLarge { what, len });
        }
        let offset = self.bytes.len();
        self.bytes.extend_from_slice(&s[..len]);
        let flags = kind.nlmsg_flags() | if echo { NLM_F_ECHO } else { 0 };
        self.bytes[offset + 6..offset + 8].copy_from_slice(&flags.to_ne_bytes());
        self.pad();
        self.scratch.clear(len);
        self.msgs.push(BatchMsg { seq, kind, offset, len, what, echo });
        Ok(())
    }

    fn table_msg(&mut self, kind: MsgKind, name: &str) -> Result<(), BatchError> {
        self.table_msg_in(kind, "inet", name)
    }

    /// NEWTABLE or DELTABLE `name` of nft family `family` (`ip`, `ip6`, `inet`).
    fn table_msg_in(&mut self, kind: MsgKind, family: &str, name: &str) -> Result<(), BatchError> {
        let pf = nfproto_of(family).ok_or_else(|| BatchError::Family(family.to_string()))?;
        let cname = cstring("table name", name)?;
        let verb = if kind == MsgKind::DelTable { "delete" } else { "add" };
        let t = RawTable(non_null(unsafe { sys::nftnl_table_alloc() }));
        // SAFETY: `t` is a live table object; libnftnl copies the string.
        unsafe {
            sys::nftnl_table_set_u32(t.0.as_ptr(), sys::NFTNL_TABLE_FAMILY as u16, u32::from(pf));
            sys::nftnl_table_set_str(t.0.as_ptr(), sys::NFTNL_TABLE_NAME as u16, cname.as_ptr());
            if kind == MsgKind::NewTable {
                // nft sends NFTA_TABLE_FLAGS 0 when it declares a table, nothing when deleting.
                sys::nftnl_table_set_u32(t.0.as_ptr(), sys::NFTNL_TABLE_FLAGS as u16, 0);
            }
        }
        let ty = kind.nlmsg_type() & 0xff;
        self.push_written(kind, format!("{verb} table {family} {name}"), |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a table message is tiny.
            unsafe {
                let nlh = sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), ty, pf, 0, seq);
                sys::nftnl_table_nlmsg_build_payload(nlh, t.0.as_ptr());
            }
        })
    }

    /// The messages of [`encode`] without the batch frame: declare, delete and recreate
    /// `table inet <name>` with its sets, elements, base chains and rules (an empty table only
    /// removes it). The table is checked first, as [`encode`] does, so only a name with a NUL
    /// byte or an oversized message can fail later — discard the builder after any error.
    pub fn replace_table(&mut self, table: &TableIr) -> Result<(), BatchError> {
        check(table)?;
        self.add_table(&table.name)?;
        self.delete_table(&table.name)?;
        self.table_contents(table, false)
    }

    /// [`BatchBuilder::replace_table`] without the declare-and-delete: creates `table inet
    /// <name>` with its sets, elements, chains and rules, for a table the caller read as absent
    /// (its commit must carry the generation id of that read: a table another writer created
    /// since makes the kernel refuse the batch, never get ctguard's objects added to it). A
    /// commit that only adds leaves nf_tables nothing to destroy later, so closing its socket
    /// does not wait for an RCU grace period; the delete of a replace does. An empty table
    /// writes nothing.
    pub fn create_table(&mut self, table: &TableIr) -> Result<(), BatchError> {
        check(table)?;
        self.table_contents(table, true)
    }

    /// The table's messages; with `exclusive` its NEWTABLE carries `NLM_F_EXCL` (the kernel
    /// refuses it, `EEXIST`, when the table exists).
    fn table_contents(&mut self, table: &TableIr, exclusive: bool) -> Result<(), BatchError> {
        if !table.is_empty() {
            self.add_table(&table.name)?;
            if exclusive {
                self.add_flags_to_last(NLM_F_EXCL);
            }
            for set in &table.sets {
                self.add_set(&table.name, set)?;
            }
            for chain in &table.chains {
                self.add_chain(&table.name, chain)?;
            }
            for chain in &table.chains {
                for (i, rule) in chain.rules.iter().enumerate() {
                    self.add_rule(&table.name, &chain.name, i + 1, rule)?;
                }
            }
        }
        Ok(())
    }

    /// NEWTABLE inet `name` (flags 0): creates the table, or is a no-op when it exists.
    pub fn add_table(&mut self, name: &str) -> Result<(), BatchError> {
        self.table_msg(MsgKind::NewTable, name)
    }

    /// DELTABLE inet `name`: deletes the table and everything in it (fails if absent).
    pub fn delete_table(&mut self, name: &str) -> Result<(), BatchError> {
        self.table_msg(MsgKind::DelTable, name)
    }

    /// NEWSET for `set` in `table`, then its elements (NEWSETELEM, split like nft into messages
    /// whose element list fits a netlink attribute). The set gets the next batch-local set id,
    /// which later rules' lookups carry.
    pub fn add_set(&mut self, table: &str, set: &SetIr) -> Result<(), BatchError> {
        let id = self.next_set_id;
        self.next_set_id += 1;
        self.set_ids.insert((table.to_string(), set.name.clone()), id);
        let flags = if set.kind.is_interval() { libc::NFT_SET_INTERVAL as u32 } else { 0 };
        let flags_text = if set.kind.is_interval() { ", flags interval" } else { "" };
        let what = format!("add set inet {table} {} ({}{flags_text})", set.name, set.kind.type_name());
        self.set_messages(libc::NFPROTO_INET as u16, table, &set.name, set, flags, id, None, what)
    }

    /// NEWSET of an anonymous constant set (`{ a, b }` inside a rule, as nft creates one) in
    /// `table` of nft family `family` (`ip`, `ip6`, `inet`), then its elements. Ports and
    /// prefixes get `flags interval`. Returns the name and batch-local id a lookup must carry
    /// (the kernel names the set `__setN` at commit).
    pub fn add_anonymous_set(
        &mut self,
        family: &str,
        table: &str,
        kind: SetKind,
        elements: Vec<Elem>,
    ) -> Result<AnonSet, BatchError> {
        let nfproto = nfproto_of(family).ok_or_else(|| BatchError::Family(family.to_string()))?;
        let set = SetIr { name: ANON_SET_NAME.to_string(), kind, elements };
        let elems = set_elements(&set)?;
        let id = self.next_set_id;
        self.next_set_id += 1;
        let mut flags = (libc::NFT_SET_ANONYMOUS | libc::NFT_SET_CONSTANT) as u32;
        if kind.is_interval() {
            flags |= libc::NFT_SET_INTERVAL as u32;
        }
        let what = format!("add anonymous set (id {id}, {}) to {family} {table}", kind.type_name());
        self.set_messages(nfproto, table, ANON_SET_NAME, &set, flags, id, Some(elems.len() as u32), what)?;
        Ok(AnonSet { name: ANON_SET_NAME.to_string(), id })
    }

    #[allow(clippy::too_many_arguments)]
    fn set_messages(
        &mut self,
        nfproto: u16,
        table: &str,
        name: &str,
        set: &SetIr,
        flags: u32,
        id: u32,
        desc_size: Option<u32>,
        what: String,
    ) -> Result<(), BatchError> {
        let elems = set_elements(set)?;
        let ctable = cstring("table name", table)?;
        let cname = cstring("set name", name)?;
        let (key_type, key_len, byteorder) = key_spec(set.kind);
        let udata = udata_u32(UDATA_SET_KEYBYTEORDER, byteorder);
        let s = RawSet(non_null(unsafe { sys::nftnl_set_alloc() }));
        let p = s.0.as_ptr();
        // SAFETY: `p` is a live set; libnftnl copies strings and data; each element is handed
        // over to the set (nftnl_set_elem_add), which frees it with the set.
        unsafe {
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FAMILY as u16, u32::from(nfproto));
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_TABLE as u16, ctable.as_ptr());
            sys::nftnl_set_set_str(p, sys::NFTNL_SET_NAME as u16, cname.as_ptr());
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, flags);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, key_type);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, key_len);
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, id);
            if let Some(size) = desc_size {
                sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DESC_SIZE as u16, size);
            }
            sys::nftnl_set_set_data(p, sys::NFTNL_SET_USERDATA as u16, udata.as_ptr().cast(), udata.len() as u32);
            for e in &elems {
                let el = non_null(sys::nftnl_set_elem_alloc()).as_ptr();
                sys::nftnl_set_elem_set(el, sys::NFTNL_SET_ELEM_KEY as u16, e.key.as_ptr().cast(), e.key.len() as u32);
                if e.flags != 0 {
                    sys::nftnl_set_elem_set_u32(el, sys::NFTNL_SET_ELEM_FLAGS as u16, e.flags);
                }
                if let Some(u) = &e.udata {
                    sys::nftnl_set_elem_set(el, sys::NFTNL_SET_ELEM_USERDATA as u16, u.as_ptr().cast(), u.len() as u32);
                }
                sys::nftnl_set_elem_add(p, el);
            }
        }
        let set_ty = MsgKind::NewSet.nlmsg_type() & 0xff;
        self.push_written(MsgKind::NewSet, what.clone(), |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a set message is small.
            unsafe {
                let nlh = sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), set_ty, nfproto, 0, seq);
                sys::nftnl_set_nlmsg_build_payload(nlh, p);
            }
        })?;
        if elems.is_empty() {
            return Ok(());
        }
        // SAFETY: the iterator borrows the live set `s` and is destroyed before it.
        let iter = non_null(unsafe { sys::nftnl_set_elems_iter_create(p) });
        struct IterGuard(NonNull<sys::nftnl_set_elems_iter>);
        impl Drop for IterGuard {
            fn drop(&mut self) {
                // SAFETY: created by nftnl_set_elems_iter_create, destroyed only here.
                unsafe { sys::nftnl_set_elems_iter_destroy(self.0.as_ptr()) }
            }
        }
        let iter = IterGuard(iter);
        let elem_ty = MsgKind::NewSetElem.nlmsg_type() & 0xff;
        let mut part = 1;
        loop {
            let mut more = 0;
            self.push_written(MsgKind::NewSetElem, format!("{what}: elements (part {part})"), |buf, seq| {
                // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; libnftnl stops
                // adding elements before the element list attribute overflows 64 KiB.
                unsafe {
                    let nlh = sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), elem_ty, nfproto, 0, seq);
                    more = sys::nftnl_set_elems_nlmsg_build_payload_iter(nlh, iter.0.as_ptr());
                }
            })?;
            if more <= 0 {
                break;
            }
            part += 1;
        }
        drop(iter);
        drop(s);
        Ok(())
    }

    /// A rule of expressions `exprs` (any nftnl [`Expression`]s, in order) with `comment` as
    /// nft's userdata comment, put into `chain` of `table` (nft family `family`): just before
    /// the rule with handle `h` for [`RulePosition::Before`] (`NFTA_RULE_POSITION`, no
    /// `NLM_F_APPEND`), at the end for [`RulePosition::Append`]. `what` describes it in errors.
    /// A position whose rule is gone makes the kernel refuse the whole batch (`ENOENT`).
    #[allow(clippy::too_many_arguments)]
    pub fn insert_rule<E: Expression>(
        &mut self,
        family: &str,
        table: &str,
        chain: &str,
        at: RulePosition,
        exprs: &[E],
        comment: &str,
        what: String,
    ) -> Result<(), BatchError> {
        let pf = proto_family_of(family).ok_or_else(|| BatchError::Family(family.to_string()))?;
        let t = Table::new(cstring("table name", table)?, pf);
        let c = Chain::new(cstring("chain name", chain)?, &t);
        let mut r = Rule::new(&c);
        for e in exprs {
            r.add_expr(e);
        }
        r.set_comment(cstring("rule comment", comment)?).map_err(|_| BatchError::CommentTooLong {
            chain: chain.to_string(),
            rule: 0,
            len: comment.len(),
        })?;
        let kind = match at {
            RulePosition::Before(h) => {
                r.set_position(h);
                MsgKind::InsertRule
            }
            RulePosition::Append => MsgKind::NewRule,
        };
        let echo = self.echo_inserts;
        self.push_written_echo(kind, what, echo, |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a rule message is small.
            unsafe { r.write(buf, seq, MsgType::Add) }
        })?;
        let id = self.inserted.len() as u32 + 1;
        self.append_u32_attr(NFTA_RULE_ID, id)?;
        self.inserted.push(InsertedRule {
            family: family.to_string(),
            table: table.to_string(),
            chain: chain.to_string(),
            comment: comment.to_string(),
            id,
        });
        Ok(())
    }

    /// The rules [`BatchBuilder::insert_rule`] wrote so far, in order, with their batch-local ids.
    pub fn inserted(&self) -> &[InsertedRule] {
        &self.inserted
    }

    /// DELRULE of a rule inserted earlier in **this** batch, named by its batch-local id
    /// ([`InsertedRule::id`], `NFTA_RULE_ID`) — a rule without a handle yet: how a check batch
    /// proves that the rollback's deletes would be accepted after the insertions. The kernel
    /// refuses the batch (`ENOENT`) when no rule of `chain` added in this batch has that id.
    /// (A DELRULE naming a chain but neither a handle nor an id would flush the chain: the id
    /// is appended and checked here, never left out.)
    pub fn delete_inserted_rule(&mut self, rule: &InsertedRule) -> Result<(), BatchError> {
        let InsertedRule { family, table, chain, id, .. } = rule;
        if !self.inserted.iter().any(|r| r == rule) {
            return Err(BatchError::UnknownRuleId { chain: chain.clone(), id: *id });
        }
        let pf = proto_family_of(family).ok_or_else(|| BatchError::Family(family.to_string()))?;
        let t = Table::new(cstring("table name", table)?, pf);
        let c = Chain::new(cstring("chain name", chain)?, &t);
        let r = Rule::new(&c);
        let what = format!("delete rule {family} {table} {chain} id {id} (inserted above, {})", rule.comment);
        self.push_written(MsgKind::DelRule, what, |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a rule message is small.
            unsafe { r.write(buf, seq, MsgType::Del) }
        })?;
        self.append_u32_attr(NFTA_RULE_ID, *id)
    }

    /// ORs `flags` into the netlink header flags of the last message written.
    fn add_flags_to_last(&mut self, flags: u16) {
        if let Some(last) = self.msgs.last() {
            let at = last.offset + 6;
            let now = u16::from_ne_bytes([self.bytes[at], self.bytes[at + 1]]) | flags;
            self.bytes[at..at + 2].copy_from_slice(&now.to_ne_bytes());
        }
    }

    /// Appends the attribute `ty` = `value` (big-endian u32) to the last message written and
    /// grows its length. nftnl pads every attribute it writes, so the message ends at the end
    /// of the buffer; anything else is refused rather than guessed at.
    fn append_u32_attr(&mut self, ty: u16, value: u32) -> Result<(), BatchError> {
        let Some(last) = self.msgs.last_mut() else {
            return Err(BatchError::Append { what: "the batch (no message yet)".into() });
        };
        let new_len = last.len + 8;
        if last.offset + last.len != self.bytes.len() || last.len % 4 != 0 {
            return Err(BatchError::Append { what: last.what.clone() });
        }
        if new_len > u32::MAX as usize {
            return Err(BatchError::TooLarge { what: last.what.clone(), len: new_len });
        }
        self.bytes.extend_from_slice(&8u16.to_ne_bytes());
        self.bytes.extend_from_slice(&ty.to_ne_bytes());
        self.bytes.extend_from_slice(&value.to_be_bytes());
        last.len = new_len;
        let at = last.offset;
        self.bytes[at..at + 4].copy_from_slice(&(new_len as u32).to_ne_bytes());
        Ok(())
    }

    /// DELRULE: the rule with `handle` in `chain` of `table` (nft family `family`). The kernel
    /// refuses the whole batch (`ENOENT`) when no such rule exists.
    pub fn delete_rule(
        &mut self,
        family: &str,
        table: &str,
        chain: &str,
        handle: u64,
        what: String,
    ) -> Result<(), BatchError> {
        let pf = proto_family_of(family).ok_or_else(|| BatchError::Family(family.to_string()))?;
        let t = Table::new(cstring("table name", table)?, pf);
        let c = Chain::new(cstring("chain name", chain)?, &t);
        let mut r = Rule::new(&c);
        r.set_handle(handle);
        self.push_written(MsgKind::DelRule, what, |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a rule message is small.
            unsafe { r.write(buf, seq, MsgType::Del) }
        })
    }

    /// DELTABLE: `table` of nft family `family` (`ip`, `ip6`, `inet`) and everything in it.
    /// The kernel refuses the whole batch (`ENOENT`) when no such table exists.
    pub fn delete_table_in(&mut self, family: &str, table: &str) -> Result<(), BatchError> {
        self.table_msg_in(MsgKind::DelTable, family, table)
    }

    /// DELCHAIN: `chain` of `table` (nft family `family`) with every rule in it. The kernel
    /// refuses the whole batch when no such chain exists (`ENOENT`) or a rule outside it still
    /// jumps to it (`EBUSY`).
    pub fn delete_chain_in(&mut self, family: &str, table: &str, chain: &str) -> Result<(), BatchError> {
        let pf = proto_family_of(family).ok_or_else(|| BatchError::Family(family.to_string()))?;
        let t = Table::new(cstring("table name", table)?, pf);
        let c = Chain::new(cstring("chain name", chain)?, &t);
        self.push_written(MsgKind::DelChain, format!("delete chain {family} {table} {chain}"), |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a chain message is small.
            unsafe { c.write(buf, seq, MsgType::Del) }
        })
    }

    /// True when nothing but BATCH_BEGIN was written yet.
    pub fn is_empty(&self) -> bool {
        self.msgs.len() <= 1
    }

    /// NEWCHAIN: the base chain `chain` in `table` (type filter, its hook and priority, policy
    /// accept). Rules are added separately with [`BatchBuilder::add_rule`].
    pub fn add_chain(&mut self, table: &str, chain: &ChainIr) -> Result<(), BatchError> {
        let t = Table::new(cstring("table name", table)?, ProtoFamily::Inet);
        let mut c = Chain::new(cstring("chain name", &chain.name)?, &t);
        let hook = match chain.hook {
            Hook::Prerouting => nftnl::Hook::PreRouting,
            Hook::Output => nftnl::Hook::Out,
        };
        c.set_hook(hook, chain.priority);
        c.set_type(ChainType::Filter);
        c.set_policy(nftnl::Policy::Accept);
        let what = format!(
            "add chain inet {table} {} (type filter hook {} priority {}; policy accept)",
            chain.name,
            chain.hook.as_str(),
            chain.priority
        );
        self.push_written(MsgKind::NewChain, what, |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a chain message is small.
            unsafe { c.write(buf, seq, MsgType::Add) }
        })
    }

    /// NEWRULE appended to `chain` in `table`: the rule's matches, `notrack`, and its comment
    /// as nft's userdata comment. Looked-up sets added earlier in this batch are referenced by
    /// name and batch-local id, others by name only (the kernel refuses an unknown one).
    /// `position` (1-based) is only used in descriptions.
    pub fn add_rule(&mut self, table: &str, chain: &str, position: usize, rule: &RuleIr) -> Result<(), BatchError> {
        let t = Table::new(cstring("table name", table)?, ProtoFamily::Inet);
        let c = Chain::new(cstring("chain name", chain)?, &t);
        let mut r = Rule::new(&c);
        for m in &rule.matches {
            let exprs = match_exprs(m, |s| self.set_ids.get(&(table.to_string(), s.to_string())).copied()).map_err(
                |source| BatchError::Nul {
                    what: "set name",
                    name: match_set(m).unwrap_or_default().to_string(),
                    source,
                },
            )?;
            for e in &exprs {
                r.add_expr(e);
            }
        }
        r.add_expr(&Notrack);
        let comment = cstring("rule comment", &rule.comment)?;
        r.set_comment(comment).map_err(|_| BatchError::CommentTooLong {
            chain: chain.to_string(),
            rule: position,
            len: rule.comment.len(),
        })?;
        let what = format!("add rule inet {table} {chain} (rule {position}: {})", rule_text(rule));
        self.push_written(MsgKind::NewRule, what, |buf, seq| {
            // SAFETY: `buf` has room for nft_nlmsg_maxsize() bytes; a rule message is small.
            unsafe { r.write(buf, seq, MsgType::Add) }
        })
    }

    /// Writes BATCH_END and returns the batch.
    pub fn finish(mut self) -> BatchBuffer {
        self.push_control(MsgKind::BatchEnd, &[], "batch end (commit)".to_string());
        BatchBuffer { bytes: self.bytes, msgs: self.msgs, genid: self.genid }
    }

    /// The batch without BATCH_END: a **check** batch. nf_tables processes every message of a
    /// batch that does not end with BATCH_END, then aborts it, validating the tables as a commit
    /// would (`NFNL_ABORT_VALIDATE`): the kernel's verdict on exactly these messages, with
    /// nothing applied — what `nft -c` does. Send it with
    /// [`crate::backend::netlink::check_batch`].
    pub fn finish_check(self) -> BatchBuffer {
        BatchBuffer { bytes: self.bytes, msgs: self.msgs, genid: self.genid }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::names::Tag;
    use crate::model::{parse_policy, Format, Policy};
    use crate::render::nft_ir::table_for;

    /// A parsed netlink message header plus its payload.
    struct Msg {
        len: usize,
        ty: u16,
        flags: u16,
        seq: u32,
        payload: Vec<u8>,
    }

    /// Walks the buffer as a sequence of netlink messages; fails on any inconsistency.
    fn walk(b: &[u8]) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < b.len() {
            assert!(off + NLMSG_HDRLEN <= b.len(), "truncated header at {off}");
            let u32at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let u16at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
            let len = u32at(off) as usize;
            assert!(len >= NLMSG_HDRLEN + NFGENMSG_LEN && off + len <= b.len(), "bad length {len} at {off}");
            assert_eq!(u32at(off + 12), 0, "pid must be 0");
            out.push(Msg {
                len,
                ty: u16at(off + 4),
                flags: u16at(off + 6),
                seq: u32at(off + 8),
                payload: b[off + NLMSG_HDRLEN..off + len].to_vec(),
            });
            off += len.next_multiple_of(4);
        }
        assert_eq!(off, b.len());
        out
    }

    /// Attributes of a message payload after the nfgenmsg header: (type, data).
    fn attrs(p: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut v = Vec::new();
        let mut off = NFGENMSG_LEN;
        while off + 4 <= p.len() {
            let len = u16::from_ne_bytes([p[off], p[off + 1]]) as usize;
            let ty = u16::from_ne_bytes([p[off + 2], p[off + 3]]) & 0x3fff;
            assert!(len >= 4 && off + len <= p.len());
            v.push((ty, p[off + 4..off + len].to_vec()));
            off += len.next_multiple_of(4);
        }
        v
    }

    fn policy(toml: &str) -> Policy {
        match parse_policy(toml, Format::Toml) {
            Ok(p) => p,
            Err(e) => panic!("bad test policy: {e:?}"),
        }
    }

    fn kinds(b: &BatchBuffer) -> Vec<MsgKind> {
        b.messages().iter().map(|m| m.kind).collect()
    }

    #[test]
    fn builtin_batch_order_flags_and_seqs() {
        let t = table_for(&Policy::builtin(), &Tag::preview());
        let b = encode(&t, None).expect("encodes");
        let msgs = walk(b.as_bytes());
        use MsgKind::*;
        // builtin: one port set; prerouting udp+tcp, output udp+tcp sport and lo dport.
        assert_eq!(
            kinds(&b),
            vec![
                BatchBegin, NewTable, DelTable, NewTable, NewSet, NewSetElem, NewChain, NewChain, NewRule, NewRule,
                NewRule, NewRule, NewRule, NewRule, BatchEnd
            ]
        );
        assert_eq!(msgs.len(), b.messages().len());
        for (i, (m, d)) in msgs.iter().zip(b.messages()).enumerate() {
            assert_eq!(m.seq, FIRST_SEQ + i as u32, "consecutive sequence numbers");
            assert_eq!(m.seq, d.seq);
            assert_eq!(m.ty, d.kind.nlmsg_type());
            assert_eq!(m.len, d.len);
            assert_ne!(m.flags & NLM_F_ACK, 0, "{} lacks NLM_F_ACK", d.what);
            assert_ne!(m.flags & NLM_F_REQUEST, 0);
            assert_eq!(m.flags, d.kind.nlmsg_flags());
        }
        // Batch begin/end address the nftables subsystem; no genid attribute unless asked.
        assert_eq!(msgs[0].ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(&msgs[0].payload[2..4], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
        assert!(attrs(&msgs[0].payload).is_empty());
        assert_eq!(msgs[msgs.len() - 1].ty, NFNL_MSG_BATCH_END);
        // Object messages are family inet.
        assert!(msgs[1..msgs.len() - 1].iter().all(|m| m.payload[0] == libc::NFPROTO_INET as u8));
        let flags = |k: MsgKind| msgs[kinds(&b).iter().position(|x| *x == k).expect("present")].flags;
        assert_eq!(flags(NewRule) & (NLM_F_CREATE | NLM_F_APPEND), NLM_F_CREATE | NLM_F_APPEND);
        assert_eq!(flags(NewChain) & NLM_F_CREATE, NLM_F_CREATE);
        assert_eq!(flags(NewTable) & (NLM_F_CREATE | libc::NLM_F_EXCL as u16), 0);
    }

    #[test]
    fn genid_attribute_only_when_asked() {
        let t = table_for(&Policy::builtin(), &Tag::preview());
        let b = encode(&t, Some(0x0102_0304)).expect("encodes");
        assert_eq!(b.genid(), Some(0x0102_0304));
        let msgs = walk(b.as_bytes());
        let a = attrs(&msgs[0].payload);
        assert_eq!(a, vec![(NFNL_BATCH_GENID, vec![1, 2, 3, 4])], "u32 in network byte order");
        assert!(msgs[1..].iter().all(|m| m.ty != NFNL_MSG_BATCH_BEGIN));
        let plain = encode(&t, None).expect("encodes");
        assert_eq!(plain.as_bytes().len() + 8, b.as_bytes().len());
    }

    #[test]
    fn empty_table_only_removes() {
        let p = policy("backend = \"nft\"\n");
        let t = table_for(&p, &Tag::preview());
        assert!(t.is_empty());
        let b = encode(&t, None).expect("encodes");
        use MsgKind::*;
        assert_eq!(kinds(&b), vec![BatchBegin, NewTable, DelTable, BatchEnd]);
        walk(b.as_bytes());
    }

    #[test]
    fn interval_elements_like_nft() {
        let set = |elements, kind| SetIr { name: "s".into(), kind, elements };
        let port = |lo, hi| Elem::Port(crate::model::PortRange { lo, hi });
        let end = libc::NFT_SET_ELEM_INTERVAL_END as u32;
        let e = |key: &[u8], flags| ElemSpec { key: key.to_vec(), flags, udata: None };
        // { 53, 1000-2000 }: 0 end, 53, 54 end, 1000, 2001 end (what nft 1.0.6 sends).
        let v = set_elements(&set(vec![port(53, 53), port(1000, 2000)], SetKind::Ports)).expect("ok");
        assert_eq!(v, vec![e(&[0, 0], end), e(&[0, 53], 0), e(&[0, 54], end), e(&[3, 232], 0), e(&[7, 209], end)]);
        // A range reaching 65535 has no end element and is flagged interval-open.
        let v = set_elements(&set(vec![port(1, 10), port(65535, 65535)], SetKind::Ports)).expect("ok");
        assert_eq!(v.len(), 4);
        assert_eq!(v[3].key, vec![0xff, 0xff]);
        assert_eq!(v[3].udata, Some(udata_u32(UDATA_SET_ELEM_FLAGS, SET_ELEM_F_INTERVAL_OPEN)));
        assert_eq!(udata_u32(1, 1), [vec![1u8, 4], 1u32.to_ne_bytes().to_vec()].concat());
        // Starting at 0: no leading end element.
        let pre = crate::model::Prefix::V4(std::net::Ipv4Addr::new(0, 0, 0, 0), 1);
        let v = set_elements(&set(vec![Elem::Prefix(pre)], SetKind::Ipv4)).expect("ok");
        assert_eq!(v, vec![e(&[0, 0, 0, 0], 0), e(&[128, 0, 0, 0], end)]);
        // Overlaps and wrong element kinds are refused.
        assert!(matches!(
            set_elements(&set(vec![port(1, 10), port(5, 6)], SetKind::Ports)),
            Err(BatchError::Overlap { .. })
        ));
        assert!(matches!(
            set_elements(&set(vec![Elem::Prefix(pre)], SetKind::Ipv6)),
            Err(BatchError::ElementKind { .. })
        ));
    }

    #[test]
    fn set_message_carries_interval_flag_key_and_byteorder() {
        let p = policy(
            "[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nsources = [\"192.0.2.0/24\"]\ninterfaces = [\"eth0\"]\n",
        );
        let b = encode(&table_for(&p, &Tag::preview()), None).expect("encodes");
        let msgs = walk(b.as_bytes());
        let sets: Vec<_> =
            msgs.iter().filter(|m| m.ty == MsgKind::NewSet.nlmsg_type()).map(|m| attrs(&m.payload)).collect();
        assert_eq!(sets.len(), 3);
        let get = |a: &Vec<(u16, Vec<u8>)>, t: u16| a.iter().find(|x| x.0 == t).map(|x| x.1.clone());
        let be32 = |v: u32| Some(v.to_be_bytes().to_vec());
        // NFTA_SET_FLAGS=3, KEY_TYPE=4, KEY_LEN=5, ID=10, USERDATA=13.
        assert_eq!(get(&sets[0], 3), be32(libc::NFT_SET_INTERVAL as u32));
        assert_eq!(get(&sets[0], 4), be32(13));
        assert_eq!(get(&sets[0], 5), be32(2));
        assert_eq!(get(&sets[0], 10), be32(1));
        let mut ud = vec![0u8, 4];
        ud.extend_from_slice(&2u32.to_ne_bytes());
        assert_eq!(get(&sets[0], 13), Some(ud));
        assert_eq!(get(&sets[1], 4), be32(7));
        assert_eq!(get(&sets[2], 3), be32(0));
        assert_eq!(get(&sets[2], 4), be32(41));
        assert_eq!(get(&sets[2], 5), be32(16));
    }

    #[test]
    fn unknown_set_is_refused_by_encode_but_buildable_by_hand() {
        let mut t = table_for(&Policy::builtin(), &Tag::preview());
        t.sets.clear();
        t.sets.push(SetIr { name: "other".into(), kind: SetKind::Ports, elements: vec![] });
        assert!(matches!(encode(&t, None), Err(BatchError::UnknownSet { .. })));
        let mut b = BatchBuilder::new(Some(7));
        b.add_table("ctguard").expect("ok");
        b.add_rule("ctguard", "prerouting", 1, &t.chains[0].rules[0]).expect("ok");
        let buf = b.finish();
        assert_eq!(walk(buf.as_bytes()).len(), 4);
    }

    #[test]
    fn insert_delete_and_anonymous_set_messages() {
        use crate::render::nft_expr::Expr;
        let mut b = BatchBuilder::new(Some(3));
        b.delete_rule("inet", "host", "input", 7, "del".into()).expect("ok");
        let set = b
            .add_anonymous_set("ip", "h4", SetKind::Ports, vec![Elem::Port(crate::model::PortRange::single(53))])
            .expect("ok");
        assert_eq!(set.name, ANON_SET_NAME);
        b.insert_rule("ip", "h4", "in4", RulePosition::Before(9), &[Expr::Notrack], "ctguard:t", "ins".into())
            .expect("ok");
        b.insert_rule("ip6", "h6", "in6", RulePosition::Append, &[Expr::Notrack], "ctguard:t", "add".into())
            .expect("ok");
        assert!(matches!(
            b.insert_rule("bridge", "b", "c", RulePosition::Append, &[Expr::Notrack], "x", "x".into()),
            Err(BatchError::Family(_))
        ));
        let buf = b.finish();
        use MsgKind::*;
        assert_eq!(kinds(&buf), vec![BatchBegin, DelRule, NewSet, NewSetElem, InsertRule, NewRule, BatchEnd]);
        let msgs = walk(buf.as_bytes());
        let get = |a: &Vec<(u16, Vec<u8>)>, t: u16| a.iter().find(|x| x.0 == t).map(|x| x.1.clone());
        // DELRULE carries the handle (NFTA_RULE_HANDLE = 3), flags REQUEST|ACK only.
        assert_eq!(msgs[1].flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(get(&attrs(&msgs[1].payload), 3), Some(7u64.to_be_bytes().to_vec()));
        // The anonymous set: family ip, flags anonymous|constant|interval, a size.
        assert_eq!(msgs[2].payload[0], libc::NFPROTO_IPV4 as u8);
        let sa = attrs(&msgs[2].payload);
        let flags = (libc::NFT_SET_ANONYMOUS | libc::NFT_SET_CONSTANT | libc::NFT_SET_INTERVAL) as u32;
        assert_eq!(get(&sa, 3), Some(flags.to_be_bytes().to_vec()));
        // The insert: no APPEND, NFTA_RULE_POSITION (6) = 9; the append: APPEND, no position.
        assert_eq!(msgs[4].flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(get(&attrs(&msgs[4].payload), 6), Some(9u64.to_be_bytes().to_vec()));
        assert_eq!(msgs[5].flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND);
        assert_eq!(get(&attrs(&msgs[5].payload), 6), None);
        assert_eq!(msgs[5].payload[0], libc::NFPROTO_IPV6 as u8);
    }

    #[test]
    fn create_table_writes_no_delete_and_an_exclusive_newtable() {
        let t = table_for(&Policy::builtin(), &Tag::preview());
        let mut b = BatchBuilder::new(Some(1));
        b.create_table(&t).expect("ok");
        let created = b.finish();
        let mut b = BatchBuilder::new(Some(1));
        b.replace_table(&t).expect("ok");
        let replaced = b.finish();
        use MsgKind::*;
        let k = kinds(&created);
        assert!(!k.contains(&DelTable), "{k:?}");
        // The same messages as a replace, without its leading declare and delete.
        assert_eq!(&kinds(&replaced)[3..], &k[1..]);
        let msgs = walk(created.as_bytes());
        assert_eq!(msgs[1].flags & NLM_F_EXCL, NLM_F_EXCL, "the NEWTABLE is exclusive");
        assert!(msgs[2..].iter().all(|m| m.flags & NLM_F_EXCL == 0), "only the table");
        let r = walk(replaced.as_bytes());
        assert!(r.iter().all(|m| m.flags & NLM_F_EXCL == 0), "a replace declares without EXCL");
    }

    #[test]
    fn inserted_rules_carry_batch_local_ids_and_are_deleted_by_them() {
        use crate::render::nft_expr::Expr;
        let mut b = BatchBuilder::new(None);
        b.insert_rule("ip", "h4", "in4", RulePosition::Before(9), &[Expr::Notrack], "ctguard:t", "ins".into())
            .expect("ok");
        b.echo_inserts(true);
        b.insert_rule("inet", "h", "c", RulePosition::Append, &[Expr::Notrack], "ctguard:t", "add".into()).expect("ok");
        let inserted = b.inserted().to_vec();
        assert_eq!(inserted.iter().map(|r| (r.chain.as_str(), r.id)).collect::<Vec<_>>(), vec![("in4", 1), ("c", 2)]);
        assert_eq!(inserted[1].comment, "ctguard:t");
        b.delete_inserted_rule(&inserted[1]).expect("ok");
        b.delete_inserted_rule(&inserted[0]).expect("ok");
        // An id this batch never gave out is refused here, not sent (it would flush nothing,
        // but a DELRULE without an id must never be written).
        let stranger = InsertedRule { id: 7, ..inserted[0].clone() };
        assert!(matches!(b.delete_inserted_rule(&stranger), Err(BatchError::UnknownRuleId { id: 7, .. })));
        let buf = b.finish_check();
        use MsgKind::*;
        assert_eq!(kinds(&buf), vec![BatchBegin, InsertRule, NewRule, DelRule, DelRule]);
        let msgs = walk(buf.as_bytes());
        let get = |a: &Vec<(u16, Vec<u8>)>, t: u16| a.iter().find(|x| x.0 == t).map(|x| x.1.clone());
        // Every rule message: NFTA_RULE_ID (9); the inserts keep their position and echo flags.
        for (i, id) in [(1usize, 1u32), (2, 2), (3, 2), (4, 1)] {
            assert_eq!(get(&attrs(&msgs[i].payload), 9), Some(id.to_be_bytes().to_vec()), "message {i}");
        }
        assert_eq!(get(&attrs(&msgs[1].payload), 6), Some(9u64.to_be_bytes().to_vec()));
        assert_eq!(msgs[2].flags & NLM_F_ECHO, NLM_F_ECHO);
        // The deletes: table and chain, the id, never a handle; family from the insert.
        for (i, table, chain) in [(3usize, "h", "c"), (4, "h4", "in4")] {
            let a = attrs(&msgs[i].payload);
            assert_eq!(get(&a, 1), Some(format!("{table}\0").into_bytes()));
            assert_eq!(get(&a, 2), Some(format!("{chain}\0").into_bytes()));
            assert_eq!(get(&a, 3), None, "a delete by id carries no handle");
            assert_eq!(msgs[i].flags, NLM_F_REQUEST | NLM_F_ACK);
        }
        assert_eq!(msgs[4].payload[0], libc::NFPROTO_IPV4 as u8);
        // Lengths stay consistent after the appended attributes (walk checks every one).
        assert_eq!(msgs.iter().map(|m| m.len.next_multiple_of(4)).sum::<usize>(), buf.as_bytes().len());
    }

    #[test]
    fn echoed_inserts_carry_nlm_f_echo() {
        use crate::render::nft_expr::Expr;
        let mut b = BatchBuilder::new(None);
        b.insert_rule("inet", "h", "c", RulePosition::Append, &[Expr::Notrack], "ctguard:t", "plain".into())
            .expect("ok");
        b.echo_inserts(true);
        b.insert_rule("inet", "h", "c", RulePosition::Before(4), &[Expr::Notrack], "ctguard:t", "echo".into())
            .expect("ok");
        b.delete_rule("inet", "h", "c", 7, "del".into()).expect("ok");
        let buf = b.finish();
        let msgs = walk(buf.as_bytes());
        let echo: Vec<bool> = buf.messages().iter().map(|m| m.echo).collect();
        assert_eq!(echo, vec![false, false, true, false, false]);
        for (m, d) in msgs.iter().zip(buf.messages()) {
            let expected = d.kind.nlmsg_flags() | if d.echo { NLM_F_ECHO } else { 0 };
            assert_eq!(m.flags, expected, "{}", d.what);
        }
    }

    #[test]
    fn large_sets_split_into_several_element_messages() {
        let ports: Vec<String> = (1..=30000u32).step_by(2).map(|p| p.to_string()).collect();
        let p = policy(&format!("[[notrack]]\nprotocols = [\"udp\"]\nports = [{}]\n", ports.join(",")));
        let b = encode(&table_for(&p, &Tag::preview()), None).expect("encodes");
        let n = b.messages().iter().filter(|m| m.kind == MsgKind::NewSetElem).count();
        assert!(n >= 2, "{n} element messages");
        for m in walk(b.as_bytes()) {
            assert!(m.len <= nftnl::nft_nlmsg_maxsize() as usize);
        }
    }
}
