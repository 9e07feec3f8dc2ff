//! Parsers for what the kernel shows about conntrack (pure: text in, figures out).
//!
//! - `/proc/net/stat/nf_conntrack`: a header naming the columns, then one line per CPU of
//!   8-digit hex counters; drop, early_drop and insert_failed are per CPU and summed here
//!   (`entries` is the namespace's count repeated on every line and is never summed).
//! - `/proc/slabinfo` (version 2.x): the `nf_conntrack` cache's object size, what one entry costs.
//! - `/dev/kmsg` records: `PRIO,SEQ,USEC,FLAGS[,…];TEXT`, continuation lines (` KEY=VALUE`)
//!   after them. "table full[ in netns N], dropping packet" events are kept with their times
//!   and namespace (6.x names it by inode); the kernel's
//!   `net_ratelimit: N callbacks suppressed` lines are summed separately, as they are shared by
//!   every rate-limited network message.
//! - conntrack entries, one per line, as `/proc/net/nf_conntrack` and `conntrack -L [-o
//!   extended]` print them.

use serde::Serialize;

/// Errors parsing a kernel file.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The file is empty or has no header line.
    #[error("no header line")]
    NoHeader,
    /// A column the parser needs is not in the header.
    #[error("the header has no {0:?} column")]
    MissingColumn(&'static str),
    /// A line has another number of fields than the header.
    #[error("line {line}: {got} fields, the header has {expected}")]
    FieldCount {
        /// 1-based line number.
        line: usize,
        /// Fields in the header.
        expected: usize,
        /// Fields on the line.
        got: usize,
    },
    /// A counter is not a number.
    #[error("line {line}: {value:?} is not a number")]
    BadNumber {
        /// 1-based line number.
        line: usize,
        /// The field.
        value: String,
        /// Why.
        #[source]
        source: std::num::ParseIntError,
    },
    /// `/proc/slabinfo` of a version this parser does not know.
    #[error("unknown slabinfo format {0:?}")]
    SlabinfoVersion(String),
}

/// The per-namespace drop counters of `/proc/net/stat/nf_conntrack`, summed over the CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DropCounters {
    /// New entries refused for lack of room (the table was full and early drop freed nothing):
    /// each is a dropped packet.
    pub drop: u64,
    /// Entries evicted to make room (not-yet-assured entries of the same hash chains).
    pub early_drop: u64,
    /// Entries that lost the insert race (two packets of one new flow at once, classically the
    /// parallel A/AAAA queries of a resolver over UDP); the packet may be dropped.
    pub insert_failed: u64,
    /// Packets conntrack could not fit into a state (TCP out of window, bad ICMP errors,
    /// malformed headers): `ct state invalid`; `None` when the kernel has no such column.
    pub invalid: Option<u64>,
    /// Lookups that found an existing entry (`None` when the column is missing).
    pub found: Option<u64>,
    /// Entries inserted (`None` when the column is missing).
    pub insert: Option<u64>,
    /// How many CPU lines were summed.
    pub cpus: usize,
}

impl DropCounters {
    /// `self - earlier`, counter by counter (0 where a counter went backwards: the namespace
    /// was recreated between the samples).
    pub fn since(&self, earlier: &DropCounters) -> DropCounters {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let o = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b)),
            _ => None,
        };
        DropCounters {
            drop: d(self.drop, earlier.drop),
            early_drop: d(self.early_drop, earlier.early_drop),
            insert_failed: d(self.insert_failed, earlier.insert_failed),
            invalid: o(self.invalid, earlier.invalid),
            found: o(self.found, earlier.found),
            insert: o(self.insert, earlier.insert),
            cpus: self.cpus,
        }
    }

    /// True when a counter that means trouble (drop, early_drop, insert_failed, invalid) is
    /// above zero.
    pub fn any_trouble(&self) -> bool {
        self.drop > 0 || self.early_drop > 0 || self.insert_failed > 0 || self.invalid.unwrap_or(0) > 0
    }
}

/// Parses `/proc/net/stat/nf_conntrack`.
pub fn parse_stat(text: &str) -> Result<DropCounters, ParseError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or(ParseError::NoHeader)?;
    let cols: Vec<&str> = header.split_whitespace().collect();
    let col = |name: &'static str| cols.iter().position(|c| *c == name).ok_or(ParseError::MissingColumn(name));
    let (i_drop, i_early, i_failed) = (col("drop")?, col("early_drop")?, col("insert_failed")?);
    let opt_col = |name: &str| cols.iter().position(|c| *c == name);
    let (i_invalid, i_found, i_insert) = (opt_col("invalid"), opt_col("found"), opt_col("insert"));
    let mut out = DropCounters {
        invalid: i_invalid.map(|_| 0),
        found: i_found.map(|_| 0),
        insert: i_insert.map(|_| 0),
        ..DropCounters::default()
    };
    for (n, line) in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != cols.len() {
            return Err(ParseError::FieldCount { line: n + 1, expected: cols.len(), got: fields.len() });
        }
        let hex = |i: usize| {
            u64::from_str_radix(fields[i], 16).map_err(|source| ParseError::BadNumber {
                line: n + 1,
                value: fields[i].to_string(),
                source,
            })
        };
        out.drop += hex(i_drop)?;
        out.early_drop += hex(i_early)?;
        out.insert_failed += hex(i_failed)?;
        for (i, slot) in [(i_invalid, &mut out.invalid), (i_found, &mut out.found), (i_insert, &mut out.insert)] {
            if let (Some(i), Some(v)) = (i, slot.as_mut()) {
                *v += hex(i)?;
            }
        }
        out.cpus += 1;
    }
    Ok(out)
}

/// The object size of slab cache `cache` in `/proc/slabinfo`; `Ok(None)` when the cache is not
/// listed (module not loaded).
pub fn parse_slab_object_size(text: &str, cache: &str) -> Result<Option<u64>, ParseError> {
    let mut lines = text.lines().enumerate();
    let (_, first) = lines.next().ok_or(ParseError::NoHeader)?;
    if !first.starts_with("slabinfo - version: 2.") {
        return Err(ParseError::SlabinfoVersion(first.chars().take(40).collect()));
    }
    for (n, line) in lines {
        let mut f = line.split_whitespace();
        if f.next() != Some(cache) {
            continue;
        }
        // name active_objs num_objs objsize objperslab pagesperslab : …
        let value = f.nth(2).unwrap_or("");
        return value.parse::<u64>().map(Some).map_err(|source| ParseError::BadNumber {
            line: n + 1,
            value: value.to_string(),
            source,
        });
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Kernel log

/// One `/dev/kmsg` record header with its text (continuation lines are not part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsgRecord<'a> {
    /// Syslog level (0 emerg … 7 debug).
    pub level: u8,
    /// Sequence number.
    pub seq: u64,
    /// Microseconds since boot (the kernel's printk clock).
    pub usec: u64,
    /// The message, escaped as the kernel escapes it (`\x0a` for a newline).
    pub text: &'a str,
}

/// Parses a record line `PRIO,SEQ,USEC,FLAGS[,…];TEXT`; `None` for continuation lines (they
/// start with a space) and anything else that is not a record.
pub fn parse_kmsg_record(line: &str) -> Option<KmsgRecord<'_>> {
    if line.starts_with(' ') {
        return None;
    }
    let (head, text) = line.split_once(';')?;
    let mut f = head.split(',');
    let prio: u32 = f.next()?.parse().ok()?;
    let seq: u64 = f.next()?.parse().ok()?;
    let usec: u64 = f.next()?.parse().ok()?;
    Some(KmsgRecord { level: (prio & 7) as u8, seq, usec, text: text.trim_end_matches(['\n', '\r']) })
}

/// Recognises conntrack's "table full" message: `nf_conntrack: table full, dropping packet`
/// (older kernels) or `nf_conntrack: table full in netns N, dropping packet` (6.x, N the
/// namespace's inode), both prefixed once more by the module name on recent kernels.
/// Returns `Some(netns)` for such a record (`netns` when the kernel names it).
pub fn parse_table_full(text: &str) -> Option<Option<u64>> {
    if !text.contains("nf_conntrack") || !text.ends_with("dropping packet") {
        return None;
    }
    let rest = &text[text.find("table full")? + "table full".len()..];
    if rest.starts_with(", dropping packet") {
        return Some(None);
    }
    let n = rest.strip_prefix(" in netns ")?.split(',').next()?;
    Some(Some(n.trim().parse().ok()?))
}

/// `N` of a `net_ratelimit: N callbacks suppressed` line.
pub fn parse_ratelimit_suppressed(text: &str) -> Option<u64> {
    let rest = text.split("net_ratelimit: ").nth(1)?;
    let (n, tail) = rest.split_once(' ')?;
    if !tail.starts_with("callbacks suppressed") {
        return None;
    }
    n.parse().ok()
}

/// Most table-full events whose times a [`KmsgScan`] keeps (the first and the latest ones);
/// all are counted.
pub const KEPT_EVENTS: usize = 64;

/// Most namespaces [`KmsgScan::table_full_by_netns`] tells apart.
pub const MAX_NETNS_TRACKED: usize = 1024;

/// One table-full record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull {
    /// µs since boot.
    pub usec: u64,
    /// The namespace's inode, when the kernel names it.
    pub netns: Option<u64>,
}

/// What the kernel log says about conntrack, accumulated record by record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KmsgScan {
    /// Records read.
    pub records: u64,
    /// Records the kernel overwrote while we read (EPIPE).
    pub lost: u64,
    /// Lines that were neither a record nor a continuation.
    pub unparsed: u64,
    /// "table full … dropping packet" records.
    pub table_full: u64,
    /// Table-full records per namespace inode, for kernels that name it (at most
    /// [`MAX_NETNS_TRACKED`] namespaces; further ones count under inode 0).
    pub table_full_by_netns: std::collections::BTreeMap<u64, u64>,
    /// The first [`KEPT_EVENTS`]/2 table-full events …
    pub first_events: Vec<TableFull>,
    /// … and the latest ones (oldest first), at most [`KEPT_EVENTS`]/2.
    pub last_events: std::collections::VecDeque<TableFull>,
    /// Sum of `net_ratelimit: N callbacks suppressed`.
    pub ratelimit_suppressed: u64,
    /// How many such lines.
    pub ratelimit_lines: u64,
    /// Time (µs since boot) of the oldest record read: the log covers the time since then.
    pub oldest_usec: Option<u64>,
    /// Time (µs since boot) of the newest record read.
    pub newest_usec: Option<u64>,
    /// True when reading stopped at a limit before the end of the log.
    pub truncated: bool,
}

impl KmsgScan {
    /// Feeds one line of `/dev/kmsg` output (a record or a continuation line).
    pub fn push_line(&mut self, line: &str) {
        if line.trim().is_empty() || line.starts_with(' ') {
            return;
        }
        let Some(rec) = parse_kmsg_record(line) else {
            self.unparsed += 1;
            return;
        };
        self.records += 1;
        self.oldest_usec = Some(self.oldest_usec.map_or(rec.usec, |o| o.min(rec.usec)));
        self.newest_usec = Some(self.newest_usec.map_or(rec.usec, |o| o.max(rec.usec)));
        if let Some(netns) = parse_table_full(rec.text) {
            self.table_full += 1;
            if let Some(ino) = netns {
                let key = if self.table_full_by_netns.len() < MAX_NETNS_TRACKED
                    || self.table_full_by_netns.contains_key(&ino)
                {
                    ino
                } else {
                    0
                };
                *self.table_full_by_netns.entry(key).or_insert(0) += 1;
            }
            let ev = TableFull { usec: rec.usec, netns };
            if self.first_events.len() < KEPT_EVENTS / 2 {
                self.first_events.push(ev);
            } else {
                if self.last_events.len() == KEPT_EVENTS / 2 {
                    self.last_events.pop_front();
                }
                self.last_events.push_back(ev);
            }
        } else if let Some(n) = parse_ratelimit_suppressed(rec.text) {
            self.ratelimit_suppressed += n;
            self.ratelimit_lines += 1;
        }
    }

    /// The kept events in order.
    pub fn events(&self) -> Vec<TableFull> {
        self.first_events.iter().chain(self.last_events.iter()).copied().collect()
    }

    /// Table-full records that name namespace `inode`.
    pub fn table_full_in(&self, inode: u64) -> u64 {
        self.table_full_by_netns.get(&inode).copied().unwrap_or(0)
    }

    /// Table-full records that name no namespace (older kernels).
    pub fn table_full_unattributed(&self) -> u64 {
        self.table_full - self.table_full_by_netns.values().sum::<u64>()
    }
}

// ---------------------------------------------------------------------------------------------
// Conntrack entries

/// The fields of one conntrack entry that the flow summary needs; borrowed from the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtEntry<'a> {
    /// Layer-4 protocol name as the kernel prints it (`tcp`, `udp`, `icmp`, `unknown`, …).
    pub proto_name: &'a str,
    /// Layer-4 protocol number.
    pub proto: u8,
    /// The protocol's own state (TCP, SCTP, DCCP), when it has one.
    pub state: Option<&'a str>,
    /// Destination port of the original direction (the service), for protocols with ports.
    pub dport: Option<u16>,
    /// `[UNREPLIED]`: nothing seen in the reply direction yet.
    pub unreplied: bool,
    /// `[ASSURED]`: will not be early-dropped.
    pub assured: bool,
    /// The reply tuple is not the mirror of the original one: NAT (DNAT, redirect or SNAT).
    pub nat: bool,
    /// Source address of the original direction, as printed.
    pub src: &'a str,
    /// Destination address of the original direction, as printed.
    pub dst: &'a str,
    /// Seconds left before the entry expires.
    pub timeout: u64,
}

impl CtEntry<'_> {
    /// The state shown in the flow summary: the protocol's state, or for protocols without one
    /// `UNREPLIED`, `ASSURED` or `REPLIED` from the entry's flags.
    pub fn state_label(&self) -> &str {
        match self.state {
            Some(s) => s,
            None if self.unreplied => "UNREPLIED",
            None if self.assured => "ASSURED",
            None => "REPLIED",
        }
    }
}

#[derive(Default)]
struct Tuple<'a> {
    src: Option<&'a str>,
    dst: Option<&'a str>,
    sport: Option<&'a str>,
    dport: Option<&'a str>,
}

/// Parses one entry line of `/proc/net/nf_conntrack` (`ipv4 2 udp 17 29 src=… …`) or of
/// `conntrack -L` (with `-o extended` the same, without it the first two fields are absent).
/// `None` when the line is not an entry.
pub fn parse_entry(line: &str) -> Option<CtEntry<'_>> {
    let mut it = line.split_ascii_whitespace();
    let mut name = it.next()?;
    if name == "ipv4" || name == "ipv6" {
        it.next()?.parse::<u16>().ok()?;
        name = it.next()?;
    }
    let proto: u8 = it.next()?.parse().ok()?;
    // Seconds left; conntrack-tools prints it too.
    let timeout = it.next()?.parse::<u64>().ok()?;
    let mut entry = CtEntry {
        proto_name: name,
        proto,
        state: None,
        dport: None,
        unreplied: false,
        assured: false,
        nat: false,
        src: "",
        dst: "",
        timeout,
    };
    let mut tuples: [Tuple<'_>; 2] = Default::default();
    let mut idx: Option<usize> = None;
    for tok in it {
        if let Some((k, v)) = tok.split_once('=') {
            if k == "src" {
                idx = Some(idx.map_or(0, |i| i + 1));
            }
            let Some(t) = idx.and_then(|i| tuples.get_mut(i)) else { continue };
            match k {
                "src" => t.src = Some(v),
                "dst" => t.dst = Some(v),
                "sport" => t.sport = Some(v),
                "dport" => t.dport = Some(v),
                _ => {}
            }
        } else if tok == "[UNREPLIED]" {
            entry.unreplied = true;
        } else if tok == "[ASSURED]" {
            entry.assured = true;
        } else if idx.is_none() && !tok.starts_with('[') && entry.state.is_none() {
            entry.state = Some(tok);
        }
    }
    let [orig, reply] = &tuples;
    entry.src = orig.src?;
    entry.dst = orig.dst.unwrap_or("");
    entry.dport = match orig.dport {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    if reply.src.is_some() {
        entry.nat =
            reply.src != orig.dst || reply.dst != orig.src || reply.sport != orig.dport || reply.dport != orig.sport;
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000006  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000004 00000001 0000000a 00000002 00000000  00000000 00000000 00000000 00000000
00000006  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000002 000000f0 00000000 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn stat_sums_per_cpu_hex() {
        let d = parse_stat(STAT).expect("parses");
        assert_eq!(
            d,
            DropCounters {
                drop: 0x0a + 0xf0,
                early_drop: 2,
                insert_failed: 3,
                invalid: Some(0),
                found: Some(0),
                insert: Some(4),
                cpus: 2
            }
        );
        let later = DropCounters { drop: 0x0a + 0xf0 + 5, invalid: Some(7), ..d };
        let delta = later.since(&d);
        assert_eq!((delta.drop, delta.invalid, delta.insert, delta.early_drop), (5, Some(7), Some(0), 0));
        assert!(delta.any_trouble() && !d.since(&d).any_trouble());
    }

    #[test]
    fn stat_errors() {
        assert!(matches!(parse_stat(""), Err(ParseError::NoHeader)));
        assert!(matches!(parse_stat("entries found\n1 2\n"), Err(ParseError::MissingColumn("drop"))));
        let short = "entries drop early_drop insert_failed\n1 2 3\n";
        assert!(matches!(parse_stat(short), Err(ParseError::FieldCount { line: 2, expected: 4, got: 3 })));
        let bad = "entries drop early_drop insert_failed\n1 2 zz 4\n";
        let e = parse_stat(bad).expect_err("bad hex");
        assert!(matches!(e, ParseError::BadNumber { line: 2, .. }));
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn slabinfo_object_size() {
        let text = "slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>
nf_conntrack_expect      0      0    208   19    1 : tunables    0    0    0 : slabdata      0      0      0
nf_conntrack         192    256    256   16    1 : tunables    0    0    0 : slabdata     16     16      0
";
        assert_eq!(parse_slab_object_size(text, "nf_conntrack").expect("parses"), Some(256));
        assert_eq!(parse_slab_object_size(text, "nope").expect("parses"), None);
        assert!(parse_slab_object_size("slabinfo - version: 1.0\n", "x").is_err());
    }

    #[test]
    fn kmsg_records_and_events() {
        let r = parse_kmsg_record("4,1234,5000000,-;nf_conntrack: nf_conntrack: table full, dropping packet\n")
            .expect("record");
        assert_eq!((r.level, r.seq, r.usec), (4, 1234, 5_000_000));
        assert!(r.text.ends_with("dropping packet"));
        assert_eq!(parse_kmsg_record(" SUBSYSTEM=net"), None);
        assert_eq!(parse_ratelimit_suppressed("net_ratelimit: 1234 callbacks suppressed"), Some(1234));
        assert_eq!(parse_table_full("nf_conntrack: nf_conntrack: table full, dropping packet"), Some(None));
        assert_eq!(
            parse_table_full("nf_conntrack: table full in netns 4026532247, dropping packet"),
            Some(Some(4026532247))
        );
        assert_eq!(parse_table_full("nf_conntrack: expectation table full"), None);
        assert_eq!(parse_table_full("nf_conntrack: table full in netns x, dropping packet"), None);
        assert_eq!(parse_ratelimit_suppressed("net_ratelimit: x callbacks suppressed"), None);

        let mut s = KmsgScan::default();
        for line in [
            "6,1,100,-;Linux version 6.18",
            " SUBSYSTEM=cpu",
            "12,2,200,-;nf_conntrack: nf_conntrack: table full, dropping packet",
            "4,3,300,-;net_ratelimit: 57 callbacks suppressed",
            "4,4,400,c;nf_conntrack: table full, dropping packet",
            "4,7,700,-;nf_conntrack: nf_conntrack: table full in netns 4026532247, dropping packet",
            "4,5,500,-;nf_conntrack: expectation table full",
            "garbage",
            "4,6,600,-;net_ratelimit: 3 callbacks suppressed",
        ] {
            s.push_line(line);
        }
        assert_eq!(s.table_full, 3);
        let ev: Vec<(u64, Option<u64>)> = s.events().iter().map(|e| (e.usec, e.netns)).collect();
        assert_eq!(ev, vec![(200, None), (400, None), (700, Some(4026532247))]);
        assert_eq!((s.table_full_in(4026532247), s.table_full_in(1), s.table_full_unattributed()), (1, 0, 2));
        assert_eq!((s.ratelimit_suppressed, s.ratelimit_lines), (60, 2));
        assert_eq!((s.records, s.unparsed), (7, 1));
        assert_eq!((s.oldest_usec, s.newest_usec), (Some(100), Some(700)));
    }

    #[test]
    fn kmsg_keeps_first_and_latest_events() {
        let mut s = KmsgScan::default();
        for i in 0..1000u64 {
            s.push_line(&format!("4,{i},{i},-;nf_conntrack: table full, dropping packet"));
        }
        assert_eq!(s.table_full, 1000);
        let t: Vec<u64> = s.events().iter().map(|e| e.usec).collect();
        assert_eq!(t.len(), KEPT_EVENTS);
        assert_eq!(t[0], 0);
        assert_eq!(t[KEPT_EVENTS - 1], 999);
        assert!(t.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn entries_from_proc_and_conntrack_tool() {
        let udp = parse_entry("ipv4     2 udp      17 99 src=10.0.0.1 dst=10.0.0.2 sport=4001 dport=53 src=10.0.0.2 dst=10.0.0.1 sport=53 dport=4001 [ASSURED] mark=0 zone=0 use=2").expect("udp");
        assert_eq!(
            (udp.proto_name, udp.proto, udp.dport, udp.state_label(), udp.nat),
            ("udp", 17, Some(53), "ASSURED", false)
        );
        let tcp = parse_entry("tcp      6 99 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=4000 dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=4000 [ASSURED] mark=0 use=1").expect("tcp");
        assert_eq!((tcp.proto, tcp.dport, tcp.state_label()), (6, Some(80), "ESTABLISHED"));
        let v6 = parse_entry("ipv6     10 udp      17 100 src=fd00:0000:0000:0000:0000:0000:0000:0001 dst=fd00:0000:0000:0000:0000:0000:0000:0002 sport=4003 dport=123 [UNREPLIED] src=fd00:0000:0000:0000:0000:0000:0000:0002 dst=fd00:0000:0000:0000:0000:0000:0000:0001 sport=123 dport=4003 mark=0 zone=0 use=2").expect("v6");
        assert_eq!((v6.dport, v6.state_label(), v6.nat), (Some(123), "UNREPLIED", false));
        let icmp = parse_entry("ipv4     2 icmp     1 99 src=10.0.0.1 dst=10.0.0.2 type=8 code=0 id=77 [UNREPLIED] src=10.0.0.2 dst=10.0.0.1 type=0 code=0 id=77 mark=0 use=1").expect("icmp");
        assert_eq!((icmp.proto_name, icmp.dport, icmp.nat), ("icmp", None, false));
        let dnat = parse_entry("ipv4     2 udp      17 99 src=10.0.0.1 dst=10.0.0.2 sport=4002 dport=53 [UNREPLIED] src=10.0.0.9 dst=10.0.0.1 sport=5353 dport=4002 mark=0 use=1").expect("dnat");
        assert!(dnat.nat);
        let replied = parse_entry(
            "udp 17 20 src=1.1.1.1 dst=2.2.2.2 sport=1 dport=53 src=2.2.2.2 dst=1.1.1.1 sport=53 dport=1 mark=0 use=1",
        )
        .expect("replied");
        assert_eq!(replied.state_label(), "REPLIED");
        let gre = parse_entry("ipv4 2 gre 47 179 timeout=180, stream_timeout=180 src=1.1.1.1 dst=2.2.2.2 srckey=0x0 dstkey=0x0 src=2.2.2.2 dst=1.1.1.1 srckey=0x0 dstkey=0x0 [ASSURED] use=1").expect("gre");
        assert_eq!((gre.proto, gre.dport, gre.state_label()), (47, None, "ASSURED"));
        for bad in [
            "",
            "conntrack v1.4.7 (conntrack-tools): 6 flow entries have been shown.",
            "ipv4 2 udp",
            "udp 17 x src=1",
            "udp 17 5 dport=1",
            "udp 17 5 src=1 dport=99999",
        ] {
            assert_eq!(parse_entry(bad), None, "{bad:?}");
        }
    }
}
