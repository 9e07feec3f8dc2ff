//! An iptables-nft rule as the kernel reports it over netlink, printed as the line
//! `iptables-nft-save` 1.8.9 prints for it — for the matches and targets ctguard's doctor
//! evaluates — so `ctguard doctor` reads iptables-nft's tables without running the save tool
//! (whose peak memory grows with the ruleset: 58 MiB at 100k rules even for `-t raw`).
//!
//! Understood: `-s`/`-d` (any prefix), `-i`/`-o` (exact or `+` wildcard), `-p` tcp, udp, icmp,
//! ipv6-icmp; `-m tcp`/`-m udp` ports and port ranges (native or compat), `-m multiport`
//! (revision 1), `-m conntrack --ctstate` and `-m state --state` (state only), `-m comment`,
//! `-m limit` (packets), `-m icmp`, `-m icmp6`, `-m hl`, `-m rt --rt-type`, `-m addrtype`, `-m
//! recent`, `-m mark`, `-m statistic`; the verdicts (ACCEPT, DROP, RETURN, jump, goto), `-j CT
//! --notrack`, `-j NOTRACK`, `-j REJECT` with the usual `--reject-with` types, `-j LOG` with a
//! prefix and level, `-j MARK`, and IPv4's `-j SNAT`, `-j DNAT`, `-j MASQUERADE`; each
//! negation iptables allows (ufw's, Docker's and kube-proxy's tables print so). Anything else —
//! another match or target, another option of these, an expression iptables-nft would not
//! write — gives `None`, and the caller reads the real save instead: the text is the tool's or
//! nothing. Pure.

use super::nft_read::{prefix_bits, Data, Expr, Limit, RawRule, Xt};
use crate::model::{mask_v4, mask_v6, Prefix};
use crate::render::iptables::{prefix_arg, spec_to_line};
use std::fmt::Write as _;

/// `NFT_META_IIFNAME`, `NFT_META_OIFNAME`, `NFT_META_L4PROTO`.
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_L4PROTO: u32 = 16;
/// `NFT_META_MARK`.
const META_MARK: u32 = 3;
/// `NFT_PAYLOAD_NETWORK_HEADER`, `NFT_PAYLOAD_TRANSPORT_HEADER`.
const NETWORK: u32 = 1;
const TRANSPORT: u32 = 2;
/// `NFT_CMP_EQ`, `NFT_CMP_NEQ` (and the same numbers for `range`).
const EQ: u32 = 0;
const NEQ: u32 = 1;
/// `NF_DROP`, `NF_ACCEPT`, `NFT_JUMP`, `NFT_GOTO`, `NFT_RETURN`.
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// What register 1 holds, loaded by the last expression.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reg {
    Empty,
    L4proto,
    Iifname,
    Oifname,
    /// A network-header field: offset, length, and the prefix mask's length when masked.
    Network {
        offset: u32,
        len: u32,
        masked: Option<u32>,
    },
    /// A transport port: destination (offset 2) or source (0).
    Port {
        dport: bool,
    },
    /// The packet mark, masked when the rule gives a mask.
    Mark {
        mask: Option<u32>,
    },
    /// Both ports, source then destination (iptables-nft loads them at once when a rule
    /// matches both, not negated).
    PortPair,
}

/// A rule's parts in the order the save prints them.
#[derive(Default)]
struct Parts {
    src: Option<(bool, Prefix)>,
    dst: Option<(bool, Prefix)>,
    iif: Option<(bool, String)>,
    oif: Option<(bool, String)>,
    proto: Option<(bool, u8)>,
    /// `-m tcp`/`-m udp`: its place among the matches, and each port option.
    ports_at: Option<usize>,
    sport: Option<(bool, String)>,
    dport: Option<(bool, String)>,
    /// The other matches, each as its arguments.
    matches: Vec<Vec<String>>,
    target: Option<Vec<String>>,
}

/// The save line (`-A CHAIN …`) of `rule`, a rule of an `ip` (`v6` false) or `ip6` table of
/// iptables-nft, or `None` when it holds anything not understood (module doc). Pure.
pub fn save_line(rule: &RawRule, v6: bool) -> Option<String> {
    if rule.comment.is_some() {
        return None;
    }
    let mut p = Parts::default();
    let mut reg = Reg::Empty;
    for e in &rule.exprs {
        // A load whose value nothing compared is not a rule iptables-nft writes.
        if reg != Reg::Empty && matches!(e, Expr::Meta { .. } | Expr::Payload { .. }) {
            return None;
        }
        match e {
            Expr::Meta { dreg: 1, key } => {
                reg = match *key {
                    META_L4PROTO => Reg::L4proto,
                    META_IIFNAME => Reg::Iifname,
                    META_OIFNAME => Reg::Oifname,
                    META_MARK => Reg::Mark { mask: None },
                    _ => return None,
                }
            }
            Expr::Payload { dreg: 1, base: NETWORK, offset, len } => {
                reg = Reg::Network { offset: *offset, len: *len, masked: None }
            }
            Expr::Payload { dreg: 1, base: TRANSPORT, offset, len: 2 } if *offset <= 2 && offset % 2 == 0 => {
                reg = Reg::Port { dport: *offset == 2 }
            }
            Expr::Payload { dreg: 1, base: TRANSPORT, offset: 0, len: 4 } => reg = Reg::PortPair,
            Expr::Bitwise { sreg: 1, dreg: 1, mask, xor, shift: false } if reg == (Reg::Mark { mask: None }) => {
                if xor.iter().any(|b| *b != 0) {
                    return None;
                }
                reg = Reg::Mark { mask: Some(ne32(mask, 0).filter(|_| mask.len() == 4)?) };
            }
            Expr::Bitwise { sreg: 1, dreg: 1, mask, xor, shift: false } => {
                let Reg::Network { offset, len, masked: None } = reg else { return None };
                if xor.iter().any(|b| *b != 0) || mask.len() != len as usize {
                    return None;
                }
                reg = Reg::Network { offset, len, masked: Some(prefix_bits(mask)?) };
            }
            Expr::Cmp { sreg: 1, op, data } if *op == EQ || *op == NEQ => {
                let neg = *op == NEQ;
                match reg {
                    Reg::L4proto if data.len() == 1 && p.proto.is_none() => p.proto = Some((neg, data[0])),
                    Reg::Iifname if p.iif.is_none() => p.iif = Some((neg, ifname(data)?)),
                    Reg::Oifname if p.oif.is_none() => p.oif = Some((neg, ifname(data)?)),
                    Reg::Network { offset, len, masked } => {
                        let (is_src, prefix) = address(v6, offset, len, masked, data)?;
                        let slot = if is_src { &mut p.src } else { &mut p.dst };
                        if slot.is_some() {
                            return None;
                        }
                        *slot = Some((neg, prefix));
                    }
                    Reg::Port { dport } => p.port(dport, neg, be16(data)?.to_string())?,
                    // libxt_mark: `0xMARK/0xMASK`, or `0xMARK` for the whole mark.
                    Reg::Mark { mask } => {
                        let mark = ne32(data, 0).filter(|_| data.len() == 4)?;
                        let value = match mask {
                            Some(m) if m != u32::MAX => format!("0x{mark:x}/0x{m:x}"),
                            _ => format!("0x{mark:x}"),
                        };
                        let mut args = vec!["-m".to_string(), "mark".into()];
                        opt_into(&mut args, neg, "--mark", value);
                        p.matches.push(args);
                    }
                    Reg::PortPair if !neg && data.len() == 4 => {
                        p.port(false, false, be16(&data[..2])?.to_string())?;
                        p.port(true, false, be16(&data[2..])?.to_string())?;
                    }
                    _ => return None,
                }
                reg = Reg::Empty;
            }
            Expr::Range { sreg: 1, op, from, to } if *op == EQ || *op == NEQ => {
                let Reg::Port { dport } = reg else { return None };
                p.port(dport, *op == NEQ, format!("{}:{}", be16(from)?, be16(to)?))?;
                reg = Reg::Empty;
            }
            Expr::Stmt { name, .. } if name == "counter" => {}
            Expr::Limit(l) => p.matches.push(limit(l)?),
            Expr::XtMatch(m) => {
                let args = compat_match(m, v6)?;
                p.matches.push(args);
            }
            Expr::XtTarget(t) if p.target.is_none() => p.target = Some(compat_target(t, v6)?),
            Expr::Immediate { dreg: 0, data: Data::Verdict(code, chain) } if p.target.is_none() => {
                p.target = Some(match (*code, chain) {
                    (NF_ACCEPT, None) => vec!["-j".into(), "ACCEPT".into()],
                    (NF_DROP, None) => vec!["-j".into(), "DROP".into()],
                    (NFT_RETURN, None) => vec!["-j".into(), "RETURN".into()],
                    (NFT_JUMP, Some(c)) => vec!["-j".into(), c.clone()],
                    (NFT_GOTO, Some(c)) => vec!["-g".into(), c.clone()],
                    _ => return None,
                });
            }
            _ => return None,
        }
    }
    if reg != Reg::Empty {
        return None;
    }
    p.line(&rule.chain)
}

impl Parts {
    /// Records a port option (`--sport`/`--dport`), once each; the `-m tcp`/`-m udp` match takes
    /// its place among the matches at the first.
    fn port(&mut self, dport: bool, neg: bool, value: String) -> Option<()> {
        let slot = if dport { &mut self.dport } else { &mut self.sport };
        if slot.is_some() {
            return None;
        }
        *slot = Some((neg, value));
        if self.ports_at.is_none() {
            self.ports_at = Some(self.matches.len());
        }
        Some(())
    }

    fn line(self, chain: &str) -> Option<String> {
        let mut args: Vec<String> = Vec::new();
        if let Some((neg, a)) = &self.src {
            opt_into(&mut args, *neg, "-s", prefix_arg(a));
        }
        if let Some((neg, a)) = &self.dst {
            opt_into(&mut args, *neg, "-d", prefix_arg(a));
        }
        if let Some((neg, i)) = &self.iif {
            opt_into(&mut args, *neg, "-i", i.clone());
        }
        if let Some((neg, o)) = &self.oif {
            opt_into(&mut args, *neg, "-o", o.clone());
        }
        let proto = match self.proto {
            Some((neg, n)) => {
                let name = proto_name(n)?;
                opt_into(&mut args, neg, "-p", name.into());
                Some((neg, name))
            }
            None => None,
        };
        let mut matches = self.matches;
        if let Some(at) = self.ports_at {
            // Ports need `-p tcp` or `-p udp`, not negated.
            let Some((false, name @ ("tcp" | "udp"))) = proto else { return None };
            let mut m = vec!["-m".to_string(), name.to_string()];
            for (o, v) in [("--sport", self.sport), ("--dport", self.dport)] {
                if let Some((neg, v)) = v {
                    opt_into(&mut m, neg, o, v);
                }
            }
            matches.insert(at, m);
        }
        // multiport needs a protocol with ports.
        if matches.iter().any(|m| m.get(1).is_some_and(|n| n == "multiport"))
            && !matches!(proto, Some((false, "tcp" | "udp")))
        {
            return None;
        }
        args.extend(matches.into_iter().flatten());
        args.extend(self.target.into_iter().flatten());
        Some(if args.is_empty() { format!("-A {chain}") } else { format!("-A {chain} {}", spec_to_line(&args)) })
    }
}

/// Appends `[!] NAME VALUE`.
fn opt_into(args: &mut Vec<String>, neg: bool, name: &str, value: String) {
    if neg {
        args.push("!".into());
    }
    args.push(name.into());
    args.push(value);
}

/// `-p`'s name for a protocol number, as the save prints it.
fn proto_name(n: u8) -> Option<&'static str> {
    match n {
        1 => Some("icmp"),
        6 => Some("tcp"),
        17 => Some("udp"),
        58 => Some("ipv6-icmp"),
        _ => None,
    }
}

fn be16(d: &[u8]) -> Option<u16> {
    (d.len() == 2).then(|| u16::from_be_bytes([d[0], d[1]]))
}

/// `-i`/`-o`'s argument from the bytes compared: the name and its NUL for an exact name, the
/// bytes alone for a `+` wildcard.
fn ifname(data: &[u8]) -> Option<String> {
    let (name, wildcard) = match data.split_last() {
        Some((0, name)) => (name, false),
        _ => (data, true),
    };
    if name.is_empty() || name.len() >= 16 || name.iter().any(|b| !b.is_ascii_graphic()) {
        return None;
    }
    let mut s = String::from_utf8(name.to_vec()).ok()?;
    if wildcard {
        s.push('+');
    }
    Some(s)
}

/// (source?, prefix) of a network-header comparison: IPv4 source at 12, destination at 16;
/// IPv6 at 8 and 24. iptables-nft loads only the prefix's bytes, masking the last when the
/// prefix ends inside a byte.
fn address(v6: bool, offset: u32, len: u32, masked: Option<u32>, data: &[u8]) -> Option<(bool, Prefix)> {
    let (size, src, dst) = if v6 { (16, 8, 24) } else { (4, 12, 16) };
    let is_src = match offset {
        o if o == src => true,
        o if o == dst => false,
        _ => return None,
    };
    if len == 0 || len > size || data.len() != len as usize {
        return None;
    }
    let bits = masked.unwrap_or(len * 8);
    let mut full = vec![0u8; size as usize];
    full[..data.len()].copy_from_slice(data);
    if bits > len * 8 {
        return None;
    }
    let prefix = if v6 {
        let a: [u8; 16] = full.try_into().ok()?;
        Prefix::V6(mask_v6(u128::from_be_bytes(a), bits as u8).into(), bits as u8)
    } else {
        let a: [u8; 4] = full.try_into().ok()?;
        Prefix::V4(mask_v4(u32::from_be_bytes(a), bits as u8).into(), bits as u8)
    };
    Some((is_src, prefix))
}

fn ne16(info: &[u8], at: usize) -> Option<u16> {
    info.get(at..at + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]))
}

fn ne32(info: &[u8], at: usize) -> Option<u32> {
    info.get(at..at + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// A NUL-terminated C string of `info` at `at..at+len`.
fn c_str(info: &[u8], at: usize, len: usize) -> Option<String> {
    let field = info.get(at..at + len)?;
    let end = field.iter().position(|b| *b == 0)?;
    String::from_utf8(field[..end].to_vec()).ok()
}

/// `XT_CONNTRACK_STATE`, `XT_CONNTRACK_STATE_ALIAS` (`-m state`).
const CONNTRACK_STATE: u16 = 1;
const CONNTRACK_STATE_ALIAS: u16 = 1 << 13;

/// The state names of an xt_conntrack state mask, in libxt_conntrack's order; `None` for a
/// bit it does not print.
fn states(mask: u16) -> Option<String> {
    const NAMES: [(u16, &str); 7] = [
        (1, "INVALID"),
        (8, "NEW"),
        (4, "RELATED"),
        (2, "ESTABLISHED"),
        (256, "UNTRACKED"),
        (64, "SNAT"),
        (128, "DNAT"),
    ];
    if mask == 0 || mask & !NAMES.iter().fold(0, |a, (b, _)| a | b) != 0 {
        return None;
    }
    Some(NAMES.iter().filter(|(b, _)| mask & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join(","))
}

/// A compat match's save arguments (`-m NAME …`).
fn compat_match(m: &Xt, v6: bool) -> Option<Vec<String>> {
    let info = &m.info;
    match (m.name.as_str(), m.rev) {
        // xt_conntrack_mtinfo1..3: flags at 146, inverted flags at 148, the state mask at
        // 150 (u8 in revision 1, u16 after).
        ("conntrack", 1..=3) => {
            let flags = ne16(info, 146)?;
            let invert = ne16(info, 148)?;
            let mask = if m.rev == 1 { u16::from(*info.get(150)?) } else { ne16(info, 150)? };
            if flags & !(CONNTRACK_STATE | CONNTRACK_STATE_ALIAS) != 0
                || flags & CONNTRACK_STATE == 0
                || invert & !CONNTRACK_STATE != 0
            {
                return None;
            }
            let (module, opt) =
                if flags & CONNTRACK_STATE_ALIAS != 0 { ("state", "--state") } else { ("conntrack", "--ctstate") };
            let mut args = vec!["-m".to_string(), module.into()];
            if invert & CONNTRACK_STATE != 0 {
                args.push("!".into());
            }
            args.push(opt.into());
            args.push(states(mask)?);
            Some(args)
        }
        // xt_multiport_v1: flags, count, ports[15], pflags[15], invert.
        ("multiport", 1) => {
            if info.len() < 48 {
                return None;
            }
            let (flags, count, invert) = (info[0], info[1] as usize, info[47]);
            if count == 0 || count > 15 || invert > 1 {
                return None;
            }
            let opt = match flags {
                0 => "--sports",
                1 => "--dports",
                2 => "--ports",
                _ => return None,
            };
            let mut list = String::new();
            let mut i = 0;
            while i < count {
                if i > 0 {
                    list.push(',');
                }
                let _ = write!(list, "{}", ne16(info, 2 + 2 * i)?);
                if info[32 + i] != 0 {
                    i += 1;
                    if i >= count {
                        return None;
                    }
                    let _ = write!(list, ":{}", ne16(info, 2 + 2 * i)?);
                }
                i += 1;
            }
            let mut args = vec!["-m".to_string(), "multiport".into()];
            if invert == 1 {
                args.push("!".into());
            }
            args.push(opt.into());
            args.push(list);
            Some(args)
        }
        ("comment", 0) => Some(vec!["-m".into(), "comment".into(), "--comment".into(), c_str(info, 0, 256)?]),
        ("addrtype", 1) => addrtype(info),
        ("udp" | "tcp", 0) => tcp_udp(&m.name, info),
        ("statistic", 0) => statistic(info),
        ("recent", 1) => recent(info, v6),
        ("icmp", 0) if !v6 => icmp(info, "icmp", "--icmp-type"),
        ("icmp6", 0) if v6 => icmp(info, "icmp6", "--icmpv6-type"),
        ("hl", 0) if v6 => {
            let (mode, limit) = (*info.first()?, *info.get(1)?);
            let (neg, opt) = match mode {
                0 => (false, "--hl-eq"),
                1 => (true, "--hl-eq"),
                2 => (false, "--hl-lt"),
                3 => (false, "--hl-gt"),
                _ => return None,
            };
            let mut args = vec!["-m".to_string(), "hl".into()];
            opt_into(&mut args, neg, opt, limit.to_string());
            Some(args)
        }
        // ip6t_rt: the type only (flags IP6T_RT_TYP, the default segments-left range, no
        // address).
        ("rt", 0) if v6 => {
            let (ty, sl_lo, sl_hi) = (ne32(info, 0)?, ne32(info, 4)?, ne32(info, 8)?);
            let (flags, inv, addrnr) = (*info.get(16)?, *info.get(17)?, *info.get(274)?);
            if flags != 1 || inv > 1 || (sl_lo, sl_hi) != (0, u32::MAX) || addrnr != 0 {
                return None;
            }
            let mut args = vec!["-m".to_string(), "rt".into()];
            opt_into(&mut args, inv == 1, "--rt-type", ty.to_string());
            Some(args)
        }
        _ => None,
    }
}

/// `XT_LIMIT_SCALE`, `XT_LIMIT_BURST` (the default burst, which the save leaves out).
const LIMIT_SCALE: u64 = 10_000;
const LIMIT_BURST: u32 = 5;

/// `-m limit`'s arguments for a native `limit` as iptables-nft reads it back (`avg = scale ×
/// unit / rate`) and libxt_limit prints it: the largest unit whose count is exact enough.
fn limit(l: &Limit) -> Option<Vec<String>> {
    if l.bytes || l.inv || l.rate == 0 {
        return None;
    }
    let avg = u32::try_from(LIMIT_SCALE.checked_mul(l.unit)? / l.rate).ok()?;
    if avg == 0 {
        return None;
    }
    const RATES: [(&str, u32); 4] =
        [("day", 10_000 * 24 * 60 * 60), ("hour", 10_000 * 60 * 60), ("min", 10_000 * 60), ("sec", 10_000)];
    let mut i = 1;
    while i < RATES.len() {
        let mult = RATES[i].1;
        if avg > mult || mult / avg < mult % avg {
            break;
        }
        i += 1;
    }
    let (name, mult) = RATES[i - 1];
    let mut args = vec!["-m".to_string(), "limit".into(), "--limit".into(), format!("{}/{name}", mult / avg)];
    if l.burst != LIMIT_BURST {
        args.push("--limit-burst".into());
        args.push(l.burst.to_string());
    }
    Some(args)
}

/// libxt_addrtype's type names, bit by bit.
const ADDRTYPES: [&str; 12] = [
    "UNSPEC",
    "UNICAST",
    "LOCAL",
    "BROADCAST",
    "ANYCAST",
    "MULTICAST",
    "BLACKHOLE",
    "UNREACHABLE",
    "PROHIBIT",
    "THROW",
    "NAT",
    "XRESOLVE",
];

/// `-m addrtype`'s arguments (xt_addrtype_info_v1: source and destination type masks, flags).
fn addrtype(info: &[u8]) -> Option<Vec<String>> {
    let (src, dst, flags) = (ne16(info, 0)?, ne16(info, 2)?, ne32(info, 4)?);
    if flags & !0xf != 0 || (src | dst) >> ADDRTYPES.len() != 0 || (src == 0 && dst == 0) {
        return None;
    }
    let names = |mask: u16| {
        ADDRTYPES
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut args = vec!["-m".to_string(), "addrtype".into()];
    for (mask, invert, opt) in [(src, 1, "--src-type"), (dst, 2, "--dst-type")] {
        if mask != 0 {
            opt_into(&mut args, flags & invert != 0, opt, names(mask));
        }
    }
    if flags & 4 != 0 {
        args.push("--limit-iface-in".into());
    }
    if flags & 8 != 0 {
        args.push("--limit-iface-out".into());
    }
    Some(args)
}

/// A compat `-m udp` / `-m tcp` (xt_udp, xt_tcp: source and destination port ranges, then
/// tcp's option and flags, the inverse flags): ports only, as libxt_udp / libxt_tcp save them.
fn tcp_udp(name: &str, info: &[u8]) -> Option<Vec<String>> {
    let (s0, s1, d0, d1) = (ne16(info, 0)?, ne16(info, 2)?, ne16(info, 4)?, ne16(info, 6)?);
    let invert = if name == "tcp" {
        let (option, flg_mask, flg_cmp) = (*info.get(8)?, *info.get(9)?, *info.get(10)?);
        if option != 0 || flg_mask != 0 || flg_cmp != 0 {
            return None;
        }
        *info.get(11)?
    } else {
        *info.get(8)?
    };
    if invert & !3 != 0 {
        return None;
    }
    let mut args = vec!["-m".to_string(), name.to_string()];
    for ((lo, hi), bit, opt) in [((s0, s1), 1, "--sport"), ((d0, d1), 2, "--dport")] {
        if (lo, hi) != (0, u16::MAX) {
            let v = if lo == hi { lo.to_string() } else { format!("{lo}:{hi}") };
            opt_into(&mut args, invert & bit != 0, opt, v);
        }
    }
    Some(args)
}

/// `-m statistic`'s arguments (xt_statistic_info: mode, flags, then the probability — of 2³¹ —
/// or every/packet), as libxt_statistic saves them.
fn statistic(info: &[u8]) -> Option<Vec<String>> {
    let (mode, flags) = (ne16(info, 0)?, ne16(info, 2)?);
    if flags & !1 != 0 {
        return None;
    }
    let invert = flags & 1 != 0;
    let mut args = vec!["-m".to_string(), "statistic".into(), "--mode".into()];
    match mode {
        0 => {
            args.push("random".into());
            let p = f64::from(ne32(info, 4)?) / f64::from(0x8000_0000u32);
            opt_into(&mut args, invert, "--probability", format!("{p:.11}"));
        }
        1 => {
            args.push("nth".into());
            let every = ne32(info, 4)?.checked_add(1)?;
            opt_into(&mut args, invert, "--every", every.to_string());
            args.extend(["--packet".to_string(), ne32(info, 8)?.to_string()]);
        }
        _ => return None,
    }
    Some(args)
}

/// `NF_NAT_RANGE_*` flags.
const NAT_MAP_IPS: u32 = 1;
const NAT_PROTO_SPECIFIED: u32 = 2;
const NAT_PROTO_RANDOM: u32 = 4;
const NAT_PERSISTENT: u32 = 8;
const NAT_PROTO_RANDOM_FULLY: u32 = 16;

/// An IPv4 NAT range as libxt_NAT prints it: `A[-B][:P[-Q]]` (address part when mapping
/// addresses, port part when given); `None` for flags it does not print so.
fn nat_range(flags: u32, min: [u8; 4], max: [u8; 4], pmin: u16, pmax: u16) -> Option<String> {
    if flags & !(NAT_MAP_IPS | NAT_PROTO_SPECIFIED | NAT_PROTO_RANDOM | NAT_PERSISTENT | NAT_PROTO_RANDOM_FULLY) != 0 {
        return None;
    }
    let mut out = String::new();
    if flags & NAT_MAP_IPS != 0 {
        let _ = write!(out, "{}", std::net::Ipv4Addr::from(min));
        if min != max {
            let _ = write!(out, "-{}", std::net::Ipv4Addr::from(max));
        }
    }
    if flags & NAT_PROTO_SPECIFIED != 0 {
        let _ = write!(out, ":{pmin}");
        if pmin != pmax {
            let _ = write!(out, "-{pmax}");
        }
    }
    Some(out)
}

/// The NAT flags' options, in libxt_NAT's order.
fn nat_flags(flags: u32, args: &mut Vec<String>) {
    for (bit, opt) in
        [(NAT_PROTO_RANDOM, "--random"), (NAT_PROTO_RANDOM_FULLY, "--random-fully"), (NAT_PERSISTENT, "--persistent")]
    {
        if flags & bit != 0 {
            args.push(opt.into());
        }
    }
}

fn addr4(info: &[u8], at: usize) -> Option<[u8; 4]> {
    info.get(at..at + 4)?.try_into().ok()
}

fn port_be(info: &[u8], at: usize) -> Option<u16> {
    be16(info.get(at..at + 2)?)
}

/// `-j SNAT`/`-j DNAT`/`-j MASQUERADE` of IPv4: revision 0's nf_nat_ipv4_multi_range_compat
/// (one range: flags, min and max address, min and max port) or revision 2's nf_nat_range2
/// (flags, min and max address of 16 bytes, min, max and base port; DNAT only here).
fn nat_target(name: &str, rev: u32, info: &[u8]) -> Option<Vec<String>> {
    let (flags, min, max, pmin, pmax) = match rev {
        0 => {
            if ne32(info, 0)? != 1 {
                return None;
            }
            (ne32(info, 4)?, addr4(info, 8)?, addr4(info, 12)?, port_be(info, 16)?, port_be(info, 18)?)
        }
        2 if name == "DNAT" => {
            // IPv4 addresses in the first 4 bytes of each nf_inet_addr; no port offset.
            (ne32(info, 0)?, addr4(info, 4)?, addr4(info, 20)?, port_be(info, 36)?, port_be(info, 38)?)
        }
        _ => return None,
    };
    let mut args = vec!["-j".to_string(), name.to_string()];
    match name {
        "MASQUERADE" => {
            if flags & NAT_MAP_IPS != 0 || flags & NAT_PERSISTENT != 0 {
                return None;
            }
            if flags & NAT_PROTO_SPECIFIED != 0 {
                let ports = if pmin == pmax { pmin.to_string() } else { format!("{pmin}-{pmax}") };
                args.extend(["--to-ports".to_string(), ports]);
            }
        }
        _ => {
            if flags & (NAT_MAP_IPS | NAT_PROTO_SPECIFIED) == 0 {
                return None;
            }
            let opt = if name == "SNAT" { "--to-source" } else { "--to-destination" };
            args.extend([opt.to_string(), nat_range(flags, min, max, pmin, pmax)?]);
        }
    }
    nat_flags(flags, &mut args);
    Some(args)
}

/// `-m recent`'s arguments (xt_recent_mtinfo_v1: seconds, hit count, the action flags, the
/// inverse flag, name[200], side, mask), in libxt_recent's order.
fn recent(info: &[u8], v6: bool) -> Option<Vec<String>> {
    let (seconds, hits) = (ne32(info, 0)?, ne32(info, 4)?);
    let (flags, invert) = (*info.get(8)?, *info.get(9)?);
    let name = c_str(info, 10, 200)?;
    let side = *info.get(210)?;
    let mask = info.get(212..228)?;
    if flags & !0x3f != 0
        || invert > 1
        || side > 1
        || i32::try_from(seconds | hits).is_err()
        || name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return None;
    }
    let mut args = vec!["-m".to_string(), "recent".into()];
    if invert == 1 {
        args.push("!".into());
    }
    for (bit, opt) in [(2, "--set"), (1, "--rcheck"), (4, "--update"), (8, "--remove")] {
        if flags & bit != 0 {
            args.push(opt.into());
        }
    }
    if seconds != 0 {
        args.extend(["--seconds".to_string(), seconds.to_string()]);
    }
    if flags & 32 != 0 {
        args.push("--reap".into());
    }
    if hits != 0 {
        args.extend(["--hitcount".to_string(), hits.to_string()]);
    }
    if flags & 16 != 0 {
        args.push("--rttl".into());
    }
    args.extend(["--name".to_string(), name]);
    let mask = if v6 {
        let a: [u8; 16] = mask.try_into().ok()?;
        std::net::Ipv6Addr::from(a).to_string()
    } else {
        std::net::Ipv4Addr::new(mask[0], mask[1], mask[2], mask[3]).to_string()
    };
    args.extend(["--mask".to_string(), mask]);
    args.push(if side == 0 { "--rsource" } else { "--rdest" }.into());
    Some(args)
}

/// `-m icmp`'s (`-m icmp6`'s) arguments: ipt_icmp (ip6t_icmp): type, code range, the
/// inverse flag; `any` is IPv4's only.
fn icmp(info: &[u8], module: &str, opt: &str) -> Option<Vec<String>> {
    let (ty, lo, hi, inv) = (*info.first()?, *info.get(1)?, *info.get(2)?, *info.get(3)?);
    if inv > 1 {
        return None;
    }
    let value = match (ty, lo, hi) {
        (0xff, 0, 0xff) if module == "icmp" => "any".to_string(),
        (0xff, _, _) => return None,
        (t, 0, 0xff) => t.to_string(),
        (t, c, d) if c == d => format!("{t}/{c}"),
        _ => return None,
    };
    let mut args = vec!["-m".to_string(), module.into()];
    opt_into(&mut args, inv == 1, opt, value);
    Some(args)
}

/// `XT_CT_NOTRACK`, `XT_CT_NOTRACK_ALIAS` (`-j NOTRACK`).
const CT_NOTRACK: u16 = 1;
const CT_NOTRACK_ALIAS: u16 = 2;

/// A compat target's save arguments (`-j NAME …`).
fn compat_target(t: &Xt, v6: bool) -> Option<Vec<String>> {
    let info = &t.info;
    match (t.name.as_str(), t.rev) {
        // xt_ct_target_info (revision 0) and _v1 (1, 2): flags, zone, ct and expectation
        // events, helper[16] (and timeout[32]): only a bare notrack is understood.
        ("CT", 0..=2) => {
            let flags = ne16(info, 0)?;
            let zone = ne16(info, 2)?;
            let events = (ne32(info, 4)?, ne32(info, 8)?);
            let helper = c_str(info, 12, 16)?;
            let timeout = if t.rev == 0 { String::new() } else { c_str(info, 28, 32)? };
            if flags & CT_NOTRACK == 0
                || flags & !(CT_NOTRACK | CT_NOTRACK_ALIAS) != 0
                || zone != 0
                || events != (0, 0)
                || !helper.is_empty()
                || !timeout.is_empty()
            {
                return None;
            }
            Some(if flags & CT_NOTRACK_ALIAS != 0 {
                vec!["-j".into(), "NOTRACK".into()]
            } else {
                vec!["-j".into(), "CT".into(), "--notrack".into()]
            })
        }
        // ipt_reject_info / ip6t_reject_info: the type, as libipt_REJECT / libip6t_REJECT
        // name it.
        // xt_log_info: level, flags, prefix[30]; a prefix and a level only.
        ("LOG", 0) => {
            let (level, flags) = (*info.first()?, *info.get(1)?);
            if flags != 0 || level > 7 {
                return None;
            }
            let mut args = vec!["-j".to_string(), "LOG".into()];
            let prefix = c_str(info, 2, 30)?;
            if !prefix.is_empty() {
                args.push("--log-prefix".into());
                args.push(prefix);
            }
            if level != 4 {
                args.push("--log-level".into());
                args.push(level.to_string());
            }
            Some(args)
        }
        // xt_mark_tginfo2: mark, mask; the save prints `--set-xmark` whatever was written.
        ("MARK", 2) => {
            let (mark, mask) = (ne32(info, 0)?, ne32(info, 4)?);
            Some(vec!["-j".into(), "MARK".into(), "--set-xmark".into(), format!("0x{mark:x}/0x{mask:x}")])
        }
        ("SNAT" | "DNAT" | "MASQUERADE", _) if !v6 => nat_target(&t.name, t.rev, info),
        ("REJECT", 0) => {
            let with = ne32(info, 0)?;
            let name = if v6 {
                match with {
                    0 => "icmp6-no-route",
                    1 => "icmp6-adm-prohibited",
                    3 => "icmp6-addr-unreachable",
                    4 => "icmp6-port-unreachable",
                    6 => "tcp-reset",
                    _ => return None,
                }
            } else {
                match with {
                    0 => "icmp-net-unreachable",
                    1 => "icmp-host-unreachable",
                    3 => "icmp-port-unreachable",
                    6 => "icmp-host-prohibited",
                    7 => "tcp-reset",
                    8 => "icmp-admin-prohibited",
                    _ => return None,
                }
            };
            Some(vec!["-j".into(), "REJECT".into(), "--reject-with".into(), name.into()])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nft_read::test_exprs::{cmp, meta, payload, st};

    fn rule(exprs: Vec<Expr>) -> RawRule {
        RawRule { family: "ip".into(), table: "filter".into(), chain: "INPUT".into(), handle: 1, comment: None, exprs }
    }
    fn verdict(code: i32, chain: Option<&str>) -> Expr {
        Expr::Immediate { dreg: 0, data: Data::Verdict(code, chain.map(str::to_string)) }
    }
    fn counter() -> Expr {
        st("counter", None)
    }
    /// xt_conntrack_mtinfo3 with the state flags (and alias) and mask set.
    fn conntrack(flags: u16, invert: u16, mask: u16) -> Xt {
        let mut info = vec![0u8; 168];
        info[146..148].copy_from_slice(&flags.to_ne_bytes());
        info[148..150].copy_from_slice(&invert.to_ne_bytes());
        info[150..152].copy_from_slice(&mask.to_ne_bytes());
        Xt { name: "conntrack".into(), rev: 3, info }
    }

    #[test]
    fn addresses_interfaces_and_ports_print_in_the_saves_order() {
        // iptables-nft's encoding of `-s 192.0.2.0/24 ! -d 198.51.100.7/32 -p udp -m udp
        // --sport 1:1023 --dport 53 -j ACCEPT` (nft --debug=netlink, nft 1.0.6).
        let r = rule(vec![
            meta(META_L4PROTO),
            cmp(EQ, &[17]),
            payload(NETWORK, 12, 3),
            cmp(EQ, &[192, 0, 2]),
            payload(NETWORK, 16, 4),
            cmp(NEQ, &[198, 51, 100, 7]),
            payload(TRANSPORT, 0, 2),
            Expr::Range { sreg: 1, op: EQ, from: vec![0, 1], to: vec![3, 255] },
            payload(TRANSPORT, 2, 2),
            cmp(EQ, &[0, 53]),
            counter(),
            verdict(NF_ACCEPT, None),
        ]);
        assert_eq!(
            save_line(&r, false).as_deref(),
            Some("-A INPUT -s 192.0.2.0/24 ! -d 198.51.100.7/32 -p udp -m udp --sport 1:1023 --dport 53 -j ACCEPT")
        );
        let masked = rule(vec![
            payload(NETWORK, 12, 4),
            Expr::Bitwise { sreg: 1, dreg: 1, mask: vec![255, 255, 255, 128], xor: vec![0; 4], shift: false },
            cmp(EQ, &[10, 1, 2, 128]),
            meta(META_IIFNAME),
            cmp(NEQ, b"eth"),
            meta(META_OIFNAME),
            cmp(EQ, b"lo\0"),
            verdict(NFT_GOTO, Some("f2b-sshd")),
        ]);
        assert_eq!(save_line(&masked, false).as_deref(), Some("-A INPUT -s 10.1.2.128/25 ! -i eth+ -o lo -g f2b-sshd"));
    }

    #[test]
    fn conntrack_state_and_notrack_compat_extensions() {
        let est = rule(vec![Expr::XtMatch(conntrack(CONNTRACK_STATE, 0, 4 | 2)), verdict(NF_ACCEPT, None)]);
        assert_eq!(
            save_line(&est, false).as_deref(),
            Some("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
        );
        let state = rule(vec![
            Expr::XtMatch(conntrack(CONNTRACK_STATE | CONNTRACK_STATE_ALIAS, CONNTRACK_STATE, 8 | 256)),
            verdict(NF_DROP, None),
        ]);
        assert_eq!(save_line(&state, false).as_deref(), Some("-A INPUT -m state ! --state NEW,UNTRACKED -j DROP"));
        let mut ct = vec![0u8; 72];
        ct[0..2].copy_from_slice(&CT_NOTRACK.to_ne_bytes());
        let notrack = rule(vec![
            meta(META_L4PROTO),
            cmp(EQ, &[17]),
            payload(TRANSPORT, 2, 2),
            cmp(EQ, &[0, 53]),
            Expr::XtTarget(Xt { name: "CT".into(), rev: 2, info: ct.clone() }),
        ]);
        assert_eq!(save_line(&notrack, false).as_deref(), Some("-A INPUT -p udp -m udp --dport 53 -j CT --notrack"));
        ct[0..2].copy_from_slice(&(CT_NOTRACK | CT_NOTRACK_ALIAS).to_ne_bytes());
        let alias = rule(vec![Expr::XtTarget(Xt { name: "CT".into(), rev: 2, info: ct.clone() })]);
        assert_eq!(save_line(&alias, true).as_deref(), Some("-A INPUT -j NOTRACK"));
        // A CT target with a zone is not a bare notrack: not understood.
        ct[2] = 1;
        assert_eq!(save_line(&rule(vec![Expr::XtTarget(Xt { name: "CT".into(), rev: 2, info: ct })]), false), None);
    }

    #[test]
    fn anything_not_understood_gives_none() {
        // Another conntrack option than the state (here --ctproto).
        assert_eq!(save_line(&rule(vec![Expr::XtMatch(conntrack(CONNTRACK_STATE | 2, 0, 8))]), false), None);
        // An unknown match, an nft-only statement, a loaded register never compared.
        assert_eq!(save_line(&rule(vec![Expr::XtMatch(Xt::named("limit"))]), false), None);
        assert_eq!(save_line(&rule(vec![st("log", None)]), false), None);
        assert_eq!(save_line(&rule(vec![meta(META_L4PROTO)]), false), None);
        // A load nothing compares before the next.
        assert_eq!(
            save_line(&rule(vec![meta(META_L4PROTO), payload(NETWORK, 12, 4), cmp(EQ, &[1, 2, 3, 4])]), false),
            None
        );
        // Ports without `-p tcp`/`-p udp`, and a rule with a comment in its user data.
        assert_eq!(save_line(&rule(vec![payload(TRANSPORT, 2, 2), cmp(EQ, &[0, 53])]), false), None);
        let mut commented = rule(vec![verdict(NF_ACCEPT, None)]);
        commented.comment = Some("by nft".into());
        assert_eq!(save_line(&commented, false), None);
        // A non-contiguous mask.
        let odd = rule(vec![
            payload(NETWORK, 12, 4),
            Expr::Bitwise { sreg: 1, dreg: 1, mask: vec![255, 0, 255, 0], xor: vec![0; 4], shift: false },
            cmp(EQ, &[10, 0, 2, 0]),
        ]);
        assert_eq!(save_line(&odd, false), None);
    }
}
