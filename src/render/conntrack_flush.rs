//! `flush_existing` (DESIGN §6): the `conntrack -D` argument vectors that delete the entries
//! already open for a policy's flows, and warnings for entries too large to flush. Pure.

use crate::model::{Policy, Prefix};

/// Most ports of one `[[notrack]]` entry `flush_existing` deletes one by one; larger entries are
/// skipped with a warning.
pub const FLUSH_MAX_PORTS: usize = 256;

/// `conntrack -D` argument vectors for the entries with `flush_existing` (both families, one
/// per protocol, port and source prefix), and warnings for entries too large to flush.
pub fn flush_commands(policy: &Policy, local: &[std::net::IpAddr]) -> (Vec<Vec<String>>, Vec<String>) {
    let mut cmds = Vec::new();
    let mut warnings = Vec::new();
    for (i, n) in policy.notrack.iter().enumerate() {
        if !n.flush_existing {
            continue;
        }
        let count: usize = n.ports.iter().map(|r| usize::from(r.hi - r.lo) + 1).sum();
        if count > FLUSH_MAX_PORTS {
            warnings.push(format!(
                "notrack[{i}].flush_existing: {count} ports is more than {FLUSH_MAX_PORTS}; existing entries were not flushed"
            ));
            continue;
        }
        if n.queries() {
            cmds.extend(querying_flush_commands(n, local));
        }
        if !n.serves() {
            continue;
        }
        for (fam, v6) in [("ipv4", false), ("ipv6", true)] {
            let srcs: Vec<&Prefix> = n.sources.iter().filter(|p| p.is_v6() == v6).collect();
            if !n.sources.is_empty() && srcs.is_empty() {
                continue;
            }
            let src_args: Vec<Vec<String>> =
                if srcs.is_empty() { vec![Vec::new()] } else { srcs.iter().map(|p| source_args(p)).collect() };
            // Served by this host (`local_only`): the original destination is one of the
            // target's own addresses, so this host's own queries to that port (a resolver's
            // upstream queries, whose answers must still find their entry) are never deleted.
            let dst_args: Vec<Vec<String>> = if n.local_only {
                let mine: Vec<Vec<String>> =
                    local.iter().filter(|a| a.is_ipv6() == v6).map(|a| vec!["-d".into(), a.to_string()]).collect();
                if mine.is_empty() {
                    continue;
                }
                mine
            } else {
                vec![Vec::new()]
            };
            for proto in &n.protocols {
                for r in &n.ports {
                    for port in r.lo..=r.hi {
                        for s in &src_args {
                            for d in &dst_args {
                                let mut a: Vec<String> = ["-D", "-f", fam, "-p", proto.as_str(), "--orig-port-dst"]
                                    .iter()
                                    .map(|x| x.to_string())
                                    .collect();
                                a.push(port.to_string());
                                a.extend(s.iter().cloned());
                                a.extend(d.iter().cloned());
                                cmds.push(a);
                            }
                        }
                    }
                }
            }
        }
    }
    (cmds, warnings)
}

/// `conntrack -D` argument vectors for the entries of a querying entry's flows: this host's own
/// queries (original source one of its addresses) to an upstream (original destination in
/// `upstreams`) on the entry's ports — nothing else.
fn querying_flush_commands(n: &crate::model::NotrackRule, local: &[std::net::IpAddr]) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    for (fam, v6) in [("ipv4", false), ("ipv6", true)] {
        let mine: Vec<&std::net::IpAddr> = local.iter().filter(|a| a.is_ipv6() == v6).collect();
        for up in n.upstreams.iter().filter(|p| p.is_v6() == v6) {
            let dst: Vec<String> = source_args(up)
                .into_iter()
                .map(|a| match a.as_str() {
                    "-s" => "-d".to_string(),
                    "--mask-src" => "--mask-dst".to_string(),
                    _ => a,
                })
                .collect();
            for proto in &n.protocols {
                for r in &n.ports {
                    for port in r.lo..=r.hi {
                        for me in &mine {
                            let mut a: Vec<String> = ["-D", "-f", fam, "-p", proto.as_str(), "--orig-port-dst"]
                                .iter()
                                .map(|x| x.to_string())
                                .collect();
                            a.push(port.to_string());
                            a.extend(dst.iter().cloned());
                            a.extend(["-s".to_string(), me.to_string()]);
                            cmds.push(a);
                        }
                    }
                }
            }
        }
    }
    cmds
}

fn source_args(p: &Prefix) -> Vec<String> {
    match p {
        Prefix::V4(a, l) => {
            let m = crate::model::mask_v4(u32::MAX, *l);
            vec!["-s".into(), a.to_string(), "--mask-src".into(), std::net::Ipv4Addr::from(m).to_string()]
        }
        Prefix::V6(a, l) => {
            let m = crate::model::mask_v6(u128::MAX, *l);
            vec!["-s".into(), a.to_string(), "--mask-src".into(), std::net::Ipv6Addr::from(m).to_string()]
        }
    }
}
