//! Validation of a [`RawPolicy`] into a [`Policy`]: every problem is collected with its field
//! path; lists are normalised (sorted, merged) so renderers never see overlaps.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::names::{IfName, SysctlKey};
use super::raw::{RawNotrack, RawPolicy, RawScalar};
use super::{NotrackRule, Policy, PolicyError, PortRange, Prefix, Proto, Side, SysctlValue};

/// Most `[[notrack]]` entries a policy may hold.
pub const MAX_NOTRACK_ENTRIES: usize = 64;
/// Most items in one `sources` list.
pub const MAX_SOURCES: usize = 16384;
/// Most items in one `interfaces` list.
pub const MAX_INTERFACES: usize = 256;

/// Sysctls that accept `"auto"`.
pub const AUTO_SYSCTLS: &[&str] = &["net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_buckets"];

struct Errors(Vec<PolicyError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(PolicyError { path: path.into(), reason: reason.into() });
    }
}

pub(super) fn validate(raw: RawPolicy) -> Result<Policy, Vec<PolicyError>> {
    let mut errs = Errors(Vec::new());
    if raw.notrack.len() > MAX_NOTRACK_ENTRIES {
        errs.push("notrack", format!("{} entries, more than the limit of {MAX_NOTRACK_ENTRIES}", raw.notrack.len()));
    }
    let notrack: Vec<NotrackRule> =
        raw.notrack.iter().enumerate().map(|(i, n)| notrack_rule(&format!("notrack[{i}]"), n, &mut errs)).collect();
    let mut sysctl = BTreeMap::new();
    for (k, v) in &raw.sysctl {
        let path = format!("sysctl.\"{}\"", k.escape_debug());
        let key = match SysctlKey::parse(k) {
            Ok(key) => key,
            Err(reason) => {
                errs.push(path, reason);
                continue;
            }
        };
        let value = match v {
            RawScalar::Int(n) if (0..=i64::MAX as i128).contains(n) => SysctlValue::Int(*n as u64),
            RawScalar::Int(n) => {
                errs.push(path, format!("{n} is not a valid value (0 to {})", i64::MAX));
                continue;
            }
            RawScalar::Text(t) if t == "auto" => {
                if !AUTO_SYSCTLS.contains(&k.as_str()) {
                    errs.push(path, "\"auto\" has no formula for this key; give an integer");
                    continue;
                }
                SysctlValue::Auto
            }
            RawScalar::Text(t) => {
                errs.push(path, format!("{:?} is not an integer or \"auto\"", t));
                continue;
            }
        };
        sysctl.insert(key, value);
    }
    if errs.0.is_empty() {
        Ok(Policy { backend: raw.backend, persist: raw.persist, notrack, sysctl })
    } else {
        Err(errs.0)
    }
}

fn notrack_rule(path: &str, n: &RawNotrack, errs: &mut Errors) -> NotrackRule {
    let mut protocols = Vec::new();
    if n.protocols.is_empty() {
        errs.push(format!("{path}.protocols"), "must list at least one protocol (\"udp\", \"tcp\")");
    }
    for (j, p) in n.protocols.iter().enumerate() {
        match Proto::parse(p) {
            Some(p) => protocols.push(p),
            None => errs.push(
                format!("{path}.protocols[{j}]"),
                format!("{p:?} is not a supported protocol (\"udp\" or \"tcp\")"),
            ),
        }
    }
    protocols.sort();
    protocols.dedup();

    let mut ports = Vec::new();
    if n.ports.is_empty() {
        errs.push(format!("{path}.ports"), "must list at least one port");
    }
    for (j, p) in n.ports.iter().enumerate() {
        match port_range(p) {
            Ok(r) => ports.push(r),
            Err(reason) => errs.push(format!("{path}.ports[{j}]"), reason),
        }
    }

    let sources = prefix_list(&format!("{path}.sources"), &n.sources, errs);
    let upstreams = prefix_list(&format!("{path}.upstreams"), &n.upstreams, errs);
    match n.side {
        Side::Serving if !n.upstreams.is_empty() => errs.push(
            format!("{path}.upstreams"),
            "only a querying entry has upstreams; set side = \"querying\" or \"both\" (or remove upstreams)",
        ),
        Side::Querying | Side::Both if n.upstreams.is_empty() => errs.push(
            format!("{path}.upstreams"),
            format!(
                "side = \"{}\" needs the upstream prefixes this host queries: the answers arrive untracked, and \
                 accepting them by source port alone would let any packet with that source port (spoofed from \
                 anywhere) reach every local port; list the upstreams (e.g. upstreams = [\"192.0.2.53/32\"])",
                n.side.as_str()
            ),
        ),
        Side::Querying if !n.sources.is_empty() => errs.push(
            format!("{path}.sources"),
            "sources restrict the clients of a served flow; a querying entry restricts its peers with upstreams \
             (use side = \"both\" to serve too)",
        ),
        _ => {}
    }

    let mut interfaces = Vec::new();
    if n.interfaces.len() > MAX_INTERFACES {
        errs.push(format!("{path}.interfaces"), format!("more than {MAX_INTERFACES} names"));
    }
    for (j, s) in n.interfaces.iter().enumerate().take(MAX_INTERFACES + 1) {
        match IfName::parse(s) {
            Ok(i) => interfaces.push(i),
            Err(reason) => errs.push(format!("{path}.interfaces[{j}]"), reason),
        }
    }
    interfaces.sort();
    interfaces.dedup();

    NotrackRule {
        protocols,
        ports: merge_ports(ports),
        sources: minimal_prefixes(sources),
        interfaces,
        side: n.side,
        upstreams: minimal_prefixes(upstreams),
        local_only: n.local_only,
        accept_untracked: n.accept_untracked,
        flush_existing: n.flush_existing,
    }
}

/// Parses a prefix list (`sources`, `upstreams`), each error at `path[j]`.
fn prefix_list(path: &str, items: &[String], errs: &mut Errors) -> Vec<Prefix> {
    let mut out = Vec::new();
    if items.len() > MAX_SOURCES {
        errs.push(path, format!("more than {MAX_SOURCES} prefixes"));
    }
    for (j, s) in items.iter().enumerate().take(MAX_SOURCES + 1) {
        match parse_prefix(s) {
            Ok(p) => out.push(p),
            Err(reason) => errs.push(format!("{path}[{j}]"), reason),
        }
    }
    out
}

fn port_number(n: i128) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("{n} is not a port (1-65535)"))
    }
}

fn port_range(p: &RawScalar) -> Result<PortRange, String> {
    match p {
        RawScalar::Int(n) => port_number(*n).map(PortRange::single),
        RawScalar::Text(t) => {
            let parse = |s: &str| -> Result<u16, String> {
                if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{t:?} is not a port or a \"first-last\" range"));
                }
                port_number(s.parse::<i128>().map_err(|e| e.to_string())?)
            };
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => {
                    let p = parse(t)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("{t:?} is an empty range (first port after last)"));
            }
            Ok(PortRange { lo, hi })
        }
    }
}

/// Sorts ranges and merges overlapping or adjacent ones, so interval sets load without
/// conflicts and `multiport` lists are as short as possible.
pub fn merge_ports(mut ports: Vec<PortRange>) -> Vec<PortRange> {
    ports.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ports.len());
    for r in ports {
        match out.last_mut() {
            Some(last) if r.lo as u32 <= last.hi as u32 + 1 => last.hi = last.hi.max(r.hi),
            _ => out.push(r),
        }
    }
    out
}

/// Sorts prefixes and drops those covered by another, so interval sets have no overlaps.
pub fn minimal_prefixes(mut v: Vec<Prefix>) -> Vec<Prefix> {
    v.sort_by_key(|p| (p.is_v6(), p.len()));
    let mut out: Vec<Prefix> = Vec::new();
    for p in v {
        if !out.iter().any(|q| q.covers(&p)) {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Parses `ADDR` or `ADDR/LEN`; refuses host bits set (names the network meant).
pub fn parse_prefix(s: &str) -> Result<Prefix, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => {
            if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{s:?} has a bad prefix length"));
            }
            (a, Some(l.parse::<u8>().map_err(|_| format!("{s:?} has a bad prefix length"))?))
        }
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))?;
    match ip {
        IpAddr::V4(a) => {
            let len = len.unwrap_or(32);
            if len > 32 {
                return Err(format!("{s:?}: prefix length {len} is longer than 32"));
            }
            let net = super::mask_v4(u32::from(a), len);
            if net != u32::from(a) {
                return Err(format!("{s:?} has host bits set (did you mean {}/{len}?)", std::net::Ipv4Addr::from(net)));
            }
            Ok(Prefix::V4(a, len))
        }
        IpAddr::V6(a) => {
            let len = len.unwrap_or(128);
            if len > 128 {
                return Err(format!("{s:?}: prefix length {len} is longer than 128"));
            }
            let net = super::mask_v6(u128::from(a), len);
            if net != u128::from(a) {
                return Err(format!("{s:?} has host bits set (did you mean {}/{len}?)", std::net::Ipv6Addr::from(net)));
            }
            Ok(Prefix::V6(a, len))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_policy, Format, Policy};
    use super::*;

    fn errs(toml: &str) -> Vec<String> {
        match parse_policy(toml, Format::Toml) {
            Ok(p) => panic!("expected errors, got {p:?}"),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn builtin_policy_is_exactly_the_design() {
        let p = Policy::builtin();
        assert_eq!(p.backend, super::super::Backend::Auto);
        assert!(!p.persist);
        assert_eq!(p.notrack.len(), 1);
        let n = &p.notrack[0];
        assert_eq!(n.protocols, vec![Proto::Tcp, Proto::Udp]);
        assert_eq!(n.ports, vec![PortRange::single(53)]);
        assert!(n.sources.is_empty() && n.interfaces.is_empty());
        assert!(n.local_only && n.accept_untracked && !n.flush_existing);
        assert_eq!(p.sysctl.len(), 2);
        assert!(p.sysctl.values().all(|v| *v == SysctlValue::Auto));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let e = errs(
            r#"
[[notrack]]
protocols = ["udp", "icmp"]
ports = [53, "1000-2000", 70000, "9-3"]
sources = ["10.0.0.1/8", "fd42::/64", "nope"]
interfaces = ["eth0", "x\" accept"]
"#,
        );
        assert!(
            e.contains(
                &"notrack[0].protocols[1]: \"icmp\" is not a supported protocol (\"udp\" or \"tcp\")".to_string()
            ),
            "{e:?}"
        );
        assert!(e.contains(&"notrack[0].ports[2]: 70000 is not a port (1-65535)".to_string()), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("notrack[0].ports[3]: \"9-3\" is an empty range")), "{e:?}");
        assert!(
            e.iter()
                .any(|m| m
                    .starts_with("notrack[0].sources[0]: \"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)")),
            "{e:?}"
        );
        assert!(e.iter().any(|m| m.starts_with("notrack[0].sources[2]:")), "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("notrack[0].interfaces[1]:")), "{e:?}");
        assert_eq!(e.len(), 6, "{e:?}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = errs("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nlocal_only = \"yes\"\n");
        assert!(e[0].starts_with("notrack[0].local_only:"), "{e:?}");
        let e = errs("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\ncolour = 1\n");
        assert!(e[0].starts_with("notrack[0].colour: unknown field `colour`"), "{e:?}");
        let e = errs("backend = \"pf\"\n");
        assert!(e[0].starts_with("backend:"), "{e:?}");
    }

    #[test]
    fn empty_lists_are_errors() {
        let e = errs("[[notrack]]\nprotocols = []\nports = []\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("notrack[0].protocols:"));
        assert!(e[1].starts_with("notrack[0].ports:"));
    }

    #[test]
    fn json_is_accepted_and_strict() {
        let p = parse_policy(r#"{"notrack":[{"protocols":["udp"],"ports":[53,"5300-5310"]}]}"#, Format::Json)
            .expect("valid");
        assert_eq!(p.notrack[0].ports.len(), 2);
        let e = parse_policy(r#"{"notrack":[{"protocols":["udp"],"ports":[53.5]}]}"#, Format::Json)
            .expect_err("float port");
        assert!(e[0].path.starts_with("notrack[0].ports[0]"), "{e:?}");
    }

    #[test]
    fn querying_entries_need_upstreams() {
        let e = errs("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nside = \"querying\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("notrack[0].upstreams: side = \"querying\" needs the upstream prefixes"), "{e:?}");
        assert!(e[0].contains("any packet with that source port"), "{e:?}");
        let e = errs("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nside = \"both\"\nupstreams = []\n");
        assert!(e[0].starts_with("notrack[0].upstreams: side = \"both\""), "{e:?}");
        let e = errs("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nupstreams = [\"192.0.2.0/24\"]\n");
        assert!(e[0].starts_with("notrack[0].upstreams: only a querying entry"), "{e:?}");
        let e = errs("[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nside = \"client\"\n");
        assert!(e[0].starts_with("notrack[0].side:"), "{e:?}");
        let e = errs(
            "[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nside = \"querying\"\nupstreams = [\"192.0.2.1/24\", \"x\"]\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("notrack[0].upstreams[0]: \"192.0.2.1/24\" has host bits set"), "{e:?}");
        assert!(e[1].starts_with("notrack[0].upstreams[1]:"), "{e:?}");
        let p = parse_policy(
            "[[notrack]]\nprotocols = [\"udp\"]\nports = [53]\nside = \"both\"\nupstreams = [\"2001:db8::/32\", \"192.0.2.0/24\", \"192.0.2.53\"]\n",
            Format::Toml,
        )
        .expect("valid");
        let n = &p.notrack[0];
        assert!(n.serves() && n.queries());
        assert_eq!(n.upstreams.len(), 2);
        assert!(Policy::builtin().notrack[0].serves() && !Policy::builtin().notrack[0].queries());
    }

    #[test]
    fn sysctl_values() {
        let e = errs("[sysctl]\n\"net.netfilter.nf_conntrack_udp_timeout\" = \"auto\"\n\"net.netfilter.nf_conntrack_max\" = -5\n\"net.ipv4.ip_forward\" = 1\n");
        assert_eq!(e.len(), 3, "{e:?}");
    }

    #[test]
    fn ports_merge_and_prefixes_minimise() {
        assert_eq!(
            merge_ports(vec![
                PortRange::single(54),
                PortRange { lo: 50, hi: 53 },
                PortRange::single(80),
                PortRange { lo: 79, hi: 79 }
            ]),
            vec![PortRange { lo: 50, hi: 54 }, PortRange { lo: 79, hi: 80 }]
        );
        let v = minimal_prefixes(vec![
            parse_prefix("10.1.0.0/16").expect("ok"),
            parse_prefix("10.0.0.0/8").expect("ok"),
            parse_prefix("fd42::1").expect("ok"),
        ]);
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn huge_documents_are_refused_before_parsing() {
        let big = "#".repeat(super::super::MAX_POLICY_BYTES + 1);
        let e = errs(&big);
        assert!(e[0].contains("byte limit"), "{e:?}");
    }
}
