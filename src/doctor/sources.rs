//! Side effects of the doctor: reading `/proc` (under a configurable root, so tests can use a
//! fake one), `/dev/kmsg` without blocking, the conntrack entries as a stream, and writing the
//! Prometheus textfile atomically. Call [`collect`] on a thread inside the target namespace
//! (`crate::netns::Target::run`): it reads `/proc/thread-self/net/...` and `/proc/sys/net`,
//! which show the calling thread's namespace (DESIGN §3).
//!
//! Nothing here fails the diagnosis: whatever cannot be read is listed in
//! [`Observations::unreadable`] and the rest goes on.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::flows::{aggregate_reader, FlowAggregator, FlowScan, LocalAddrs};
use super::notrack::Firewall;
use super::parse::{self, DropCounters, KmsgScan, ParseError};
use super::report::Unreadable;
use crate::backend::exec::{one_line, ExecError, Tool};

/// Errors reading one source or writing the textfile.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but not understood.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ParseError,
    },
    /// A sysctl holds something that is not an integer.
    #[error("{path}: {value:?} is not an integer")]
    NotInteger {
        /// The file.
        path: PathBuf,
        /// What it held.
        value: String,
    },
    /// The `conntrack` tool could not be used.
    #[error(transparent)]
    Tool(#[from] ExecError),
    /// The `conntrack` tool ran too long and was killed.
    #[error("conntrack -L was killed after {0:?}")]
    Timeout(Duration),
    /// The slab cache is not listed.
    #[error("{path}: no nf_conntrack cache listed (module not loaded, or the cache is merged)")]
    NoSlab {
        /// The file.
        path: PathBuf,
    },
}

/// Default sampling window of the counters (`--window`).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(2);

/// Where the doctor reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// Root of the proc file system (`/proc`).
    pub proc_root: PathBuf,
    /// The kernel log device (`/dev/kmsg`); `None` to skip the log.
    pub kmsg: Option<PathBuf>,
    /// Fall back to `conntrack -L -o extended` when the entries file cannot be read.
    pub conntrack_tool: bool,
    /// Most kernel log records read (the buffer is bounded anyway; a chatty kernel is not).
    pub kmsg_max_records: u64,
    /// Longest the kernel log and the `conntrack` tool may take each.
    pub time_limit: Duration,
    /// How long the counters are watched (two samples this far apart); zero: one sample.
    pub window: Duration,
    /// Read the live ruleset (nf_tables over netlink, the iptables dumps) for NOTRACK rules.
    pub firewall: bool,
}

impl Sources {
    /// The real system: `/proc`, `/dev/kmsg`, the `conntrack` tool as fallback.
    pub fn system() -> Self {
        Sources {
            proc_root: PathBuf::from("/proc"),
            kmsg: Some(PathBuf::from("/dev/kmsg")),
            conntrack_tool: true,
            kmsg_max_records: 1_000_000,
            time_limit: Duration::from_secs(120),
            window: DEFAULT_WINDOW,
            firewall: true,
        }
    }

    /// A fake root (tests): every file under `root`, the log at `kmsg`, no tool.
    pub fn fake(root: &Path, kmsg: Option<PathBuf>) -> Self {
        Sources {
            proc_root: root.to_path_buf(),
            kmsg,
            conntrack_tool: false,
            window: Duration::ZERO,
            firewall: false,
            ..Sources::system()
        }
    }

    fn sysctl_path(&self, name: &str) -> PathBuf {
        self.proc_root.join("sys/net/netfilter").join(name)
    }

    /// `…/thread-self/net/REL`: the calling thread's namespace.
    fn net_path(&self, rel: &str) -> PathBuf {
        self.proc_root.join("thread-self/net").join(rel)
    }
}

/// Everything read from the target, before analysis.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// `nf_conntrack_count`.
    pub count: Option<u64>,
    /// `nf_conntrack_max`.
    pub max: Option<u64>,
    /// `nf_conntrack_buckets`.
    pub buckets: Option<u64>,
    /// `nf_conntrack_udp_timeout`.
    pub udp_timeout: Option<u64>,
    /// `nf_conntrack_udp_timeout_stream`.
    pub udp_timeout_stream: Option<u64>,
    /// Drop counters (the last sample).
    pub drops: Option<DropCounters>,
    /// The first sample and how long before the last one it was taken (`None` without a
    /// window).
    pub drops_first: Option<(DropCounters, Duration)>,
    /// `nf_conntrack_tcp_timeout_established`.
    pub tcp_timeout_established: Option<u64>,
    /// The target's own addresses.
    pub locals: LocalAddrs,
    /// The live ruleset, when read.
    pub firewall: Option<Firewall>,
    /// CLOCK_MONOTONIC now, µs (the kernel log's clock), to say how long ago an event was.
    pub now_mono_usec: Option<u64>,
    /// The kernel log.
    pub kmsg: Option<KmsgScan>,
    /// Slab object size.
    pub entry_bytes: Option<u64>,
    /// `MemTotal`.
    pub ram_bytes: Option<u64>,
    /// The entries, summarised, with where they came from and how long it took.
    pub flows: Option<(FlowScan, String, Duration)>,
    /// Unix time of boot in µs (realtime − CLOCK_BOOTTIME), for the log's times.
    pub boot_unix_usec: Option<i64>,
    /// What could not be read.
    pub unreadable: Vec<Unreadable>,
}

impl Observations {
    fn failed(&mut self, what: &str, path: &Path, e: &SourceError) {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            let t = s.to_string();
            if !msg.contains(&t) {
                msg.push_str(": ");
                msg.push_str(&t);
            }
            src = s.source();
        }
        self.unreadable.push(Unreadable { what: what.to_string(), path: path.display().to_string(), error: msg });
    }
}

fn read_text(path: &Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path).map_err(|source| SourceError::Io { path: path.to_path_buf(), source })
}

fn read_u64(path: &Path) -> Result<u64, SourceError> {
    let t = read_text(path)?;
    let v = t.trim();
    v.parse().map_err(|_| SourceError::NotInteger { path: path.to_path_buf(), value: v.chars().take(40).collect() })
}

fn sysctl(src: &Sources, o: &mut Observations, name: &str) -> Option<u64> {
    let path = src.sysctl_path(name);
    match read_u64(&path) {
        Ok(v) => Some(v),
        Err(e) => {
            o.failed(name, &path, &e);
            None
        }
    }
}

fn read_stat(src: &Sources) -> (PathBuf, Result<DropCounters, SourceError>) {
    let stat = src.net_path("stat/nf_conntrack");
    let r = read_text(&stat)
        .and_then(|t| parse::parse_stat(&t).map_err(|source| SourceError::Parse { path: stat.clone(), source }));
    (stat, r)
}

/// Reads what the NOTRACK analysis needs of the live ruleset of the calling thread's namespace,
/// streamed: the iptables-legacy saves line by line keeping only what may notrack
/// ([`outline_keeps`]), then over netlink the rules of the chains a NOTRACK can act from
/// (prerouting and output, and where they jump), keeping the rules that notrack or jump
/// ([`read_streamed`]; one consistent snapshot, repeated when the ruleset changed). When no
/// rule may notrack, that is all — bounded memory and time at any ruleset size. Otherwise the
/// iptables chains (iptables-nft's printed from netlink as its save prints them, else read
/// from the saves) and the filter chains the check evaluates, pruned to the rules that may
/// match its flows. With `CTGUARD_NFT_READ=json`, or without `nft` installed, the previous
/// reader: `nft -j list ruleset` (when nft is installed) parsed, and every save. The dumps'
/// texts are not kept.
pub fn read_firewall() -> Result<Firewall, String> {
    use crate::backend::live;
    let _lap = crate::timing::Lap::start("doctor: firewall");
    let without_text = |mut dumps: Vec<crate::live::IptDump>| {
        dumps.iter_mut().for_each(|d| d.text = String::new());
        dumps
    };
    let nft = Tool::find("nft").ok();
    if nft.is_none() || live::nft_read_json() {
        let json = match nft {
            Some(t) => Some(t.run(&["-j", "list", "ruleset"], None).map_err(|e| e.to_string())?),
            None => None,
        };
        let dumps = without_text(live::read_saves(None).map_err(|e| e.to_string())?);
        return Firewall::from_json(json.as_deref(), dumps);
    }
    let mut legacy = legacy_outlines(Some(RAW))?;
    for _ in 0..crate::backend::nft_stream::MAX_ATTEMPTS {
        if let Some(fw) = read_streamed(&mut legacy)? {
            return Ok(fw);
        }
    }
    Err(crate::backend::nft_stream::NftStreamError::Unstable(crate::backend::nft_stream::MAX_ATTEMPTS).to_string())
}

/// One attempt of the streamed, pruned read ([`read_firewall`]); `None` when the ruleset
/// changed during it.
///
/// 1. The chains a NOTRACK can act from — the base chains at prerouting and output and the
///    chains they jump or go to, transitively — are streamed chain by chain, keeping the rules
///    that notrack or jump (the NOTRACK rules and the paths to them, `notrack::notrack_flows`);
///    the rules of iptables-nft's tables among them are also printed as its save prints them
///    (`nft_stream::IptCapture`). When no rule there may notrack (`nft_stream::may_notrack`)
///    nor in the legacy outlines, that is all: no other rule is read.
/// 2. Otherwise the iptables chains: iptables-nft's as printed (the legacy saves read in full
///    beside them), or — when one of its rules holds what the printer does not know — every
///    save in full (iptables-nft's tables from its save, as `crate::backend::live::read` does).
/// 3. The filter chains `notrack::check` may evaluate (the input and output base chains and
///    the chains they reach, found as their rules arrive) are streamed, keeping the rules that
///    may match one of the flows it evaluates (`notrack::evaluated_flows`; the evaluator skips
///    any other) or jump; iptables-nft's as printed.
///
/// Each chain is read at most twice, a big input chain once. Everything between the same two
/// generation ids.
fn read_streamed(legacy: &mut LegacyOutlines) -> Result<Option<Firewall>, String> {
    use super::notrack::iptables_rule_notracks;
    use crate::backend::nft_stream::{ChainKey, IptCapture};
    use crate::live::fw::{FwHook, FwRule, IptVariant, Owner};
    let _lap = crate::timing::Lap::start("doctor: nft rules (streamed, pruned)");
    let mut reader = crate::backend::nft_stream::Reader::open(&[]).map_err(|e| e.to_string())?;
    let mut nft = reader.skeleton();
    let mut notrack = crate::backend::nft_read::NotrackRules::new();
    let mut ipt_keep = |r: &FwRule| iptables_rule_notracks(r) || jumps(r);
    let mut capture = reader.ipt_nft_layout().map(|chains| IptCapture::new(chains, &mut ipt_keep));
    // 1. From the prerouting and output base chains, following the jumps kept.
    let mut done: HashSet<ChainKey> = HashSet::new();
    loop {
        let todo: HashSet<ChainKey> = nft
            .fw
            .chains
            .iter()
            .filter(|c| matches!(c.hook, Some(FwHook::Prerouting | FwHook::Output)))
            .flat_map(|c| reached_from(&nft.fw, c))
            .filter(|k| !done.contains(k))
            .collect();
        if todo.is_empty() {
            break;
        }
        reader
            .stream_into(&mut nft.fw, &mut notrack, Some(&todo), &mut |r, nt| nt || jumps(r), capture.as_mut())
            .map_err(|e| e.to_string())?;
        done.extend(todo);
    }
    let raw_chains = legacy.dumps.iter().flat_map(|d| d.fw.chains.iter().cloned()).collect::<Vec<_>>();
    let fw = Firewall::from_parts(nft, &[], raw_chains, notrack);
    if reader.notrack_candidates == 0 && !fw.any_notrack_rule() {
        tracing::debug!(seen = reader.rules_seen, kept = reader.rules_kept, "doctor: no rule may notrack");
        return Ok(reader.consistent().map_err(|e| e.to_string())?.then_some(fw));
    }
    // Something may notrack: the legacy filter chains its flows meet are found from the
    // outlines of every legacy table (until now only `raw`'s, the one table a NOTRACK can be in).
    if legacy.only.is_some() {
        *legacy = legacy_outlines(None)?;
    }
    let legacy_chains = || legacy.dumps.iter().flat_map(|d| d.fw.chains.iter().cloned()).collect::<Vec<_>>();
    // Tests only: another writer's change between this read and the next (the generation id
    // must make the read start again).
    crate::fault::foreign_nft_script(crate::fault::DOCTOR_BETWEEN_READS);
    // 2. Something may notrack: the iptables chains, and the nft part without the tables
    // iptables-nft owns (their chains come from its save, or from netlink printed as the save
    // prints them).
    let Firewall { tables, nft_notrack, .. } = fw;
    let nft = crate::live::nft_json::NftRuleset {
        tables: reader.skeleton().tables,
        fw: crate::live::fw::FwTables {
            chains: tables.chains.into_iter().filter(|c| matches!(c.owner, Owner::Nft { .. })).collect(),
        },
    };
    if let Some(printed) = capture.filter(|c| c.printable).map(|c| c.chains.chains) {
        // The legacy chains as the outlines hold them (NOTRACK rules and jumps); step 3 reads
        // the evaluated ones again.
        let skip = crate::backend::live::ipt_nft_tables_of(&printed);
        let mut ipt = printed;
        ipt.extend(legacy_chains());
        let mut fw = Firewall::from_parts(nft.clone(), &skip, ipt, nft_notrack.clone());
        // 3., iptables-nft's chains printed.
        if evaluated_chains(&mut reader, &mut fw, true)? {
            tracing::debug!(seen = reader.rules_seen, kept = reader.rules_kept, "doctor: nft rules streamed");
            return Ok(reader.consistent().map_err(|e| e.to_string())?.then_some(fw));
        }
    }
    tracing::debug!("doctor: iptables-nft's tables read from its save");
    let dumps =
        crate::backend::live::read_saves_of(Some(&nft.tables), &[IptVariant::Nft]).map_err(|e| e.to_string())?;
    let skip = crate::backend::live::ipt_nft_tables(&dumps);
    let mut ipt: Vec<_> = dumps.into_iter().flat_map(|d| d.fw.chains).collect();
    ipt.extend(legacy_chains());
    let mut fw = Firewall::from_parts(nft, &skip, ipt, nft_notrack);
    // 3., iptables-nft's chains from its save (whole).
    evaluated_chains(&mut reader, &mut fw, false)?;
    tracing::debug!(seen = reader.rules_seen, kept = reader.rules_kept, "doctor: nft rules streamed");
    Ok(reader.consistent().map_err(|e| e.to_string())?.then_some(fw))
}

/// True for a rule that jumps or goes to a chain (kept: the paths between chains).
fn jumps(r: &crate::live::fw::FwRule) -> bool {
    use crate::live::fw::Verdict;
    matches!(r.verdict, Verdict::Jump(_) | Verdict::Goto(_))
}

/// Chain `c` of the nft part of `fw` and the chains its rules (as held) jump or go to,
/// transitively: their (family, table, chain) keys.
fn reached_from(fw: &crate::live::fw::FwTables, c: &crate::live::fw::FwChain) -> Vec<(String, String, String)> {
    use crate::live::fw::{Owner, Verdict};
    let mut out = Vec::new();
    let mut todo = vec![c];
    while let Some(c) = todo.pop() {
        let Owner::Nft { family, table } = &c.owner else { continue };
        let key = (family.clone(), table.clone(), c.name.clone());
        if out.contains(&key) {
            continue;
        }
        out.push(key);
        for r in &c.rules {
            if let Verdict::Jump(name) | Verdict::Goto(name) = &r.verdict {
                if let Some(sub) = fw.find(&c.owner, name) {
                    todo.push(sub);
                }
            }
        }
    }
    out
}

/// Step 3 of [`read_streamed`]: with NOTRACK flows in `fw`, streams the filter chains the check
/// may evaluate — nft's, iptables-legacy's (its saves read again, [`legacy_evaluated`]), and
/// iptables-nft's when `ipt_printed` (else they came whole from its save) — as they are found (a chain's jumps lead to the next), keeping the rules that may
/// match an evaluated flow, notrack or jump. False when an iptables-nft rule cannot be printed
/// (the caller reads the saves instead).
fn evaluated_chains(
    reader: &mut crate::backend::nft_stream::Reader,
    fw: &mut Firewall,
    ipt_printed: bool,
) -> Result<bool, String> {
    use super::notrack::{evaluated_flows, filter_chains_reached, iptables_rule_notracks, notrack_flows};
    use crate::backend::nft_stream::{ChainKey, IptCapture};
    use crate::live::fw::{FwRule, IptVariant, Owner};
    use crate::render::flow::{rule_matches, Tri};
    let flows = notrack_flows(fw);
    if flows.is_empty() {
        return Ok(true);
    }
    let eval = evaluated_flows(&flows);
    let keep = |r: &FwRule| jumps(r) || eval.iter().any(|f| rule_matches(r, f) != Tri::No);
    let mut done: HashSet<ChainKey> = HashSet::new();
    loop {
        let todo: HashSet<ChainKey> = filter_chains_reached(fw).into_iter().filter(|k| !done.contains(k)).collect();
        if todo.is_empty() {
            break;
        }
        let mut again = crate::backend::nft_read::NotrackRules::new();
        reader
            .stream_into(&mut fw.tables, &mut again, Some(&todo), &mut |r, nt| nt || keep(r), None)
            .map_err(|e| e.to_string())?;
        fw.nft_notrack.extend(again);
        done.extend(todo);
    }
    legacy_evaluated(fw, &|r: &FwRule| iptables_rule_notracks(r) || keep(r))?;
    if !ipt_printed {
        return Ok(true);
    }
    // iptables-nft's chains (they follow the nft ones, before the legacy ones).
    let mut done: HashSet<ChainKey> = HashSet::new();
    loop {
        let todo: HashSet<ChainKey> =
            super::notrack::ipt_nft_filter_chains_reached(fw).into_iter().filter(|k| !done.contains(k)).collect();
        if todo.is_empty() {
            return Ok(true);
        }
        let mut rest = fw.iptables_chains();
        let at = rest.iter().position(|c| !matches!(c.owner, Owner::Iptables { variant: IptVariant::Nft, .. }));
        let legacy_rest = rest.split_off(at.unwrap_or(rest.len()));
        let mut ipt_keep = |r: &FwRule| iptables_rule_notracks(r) || keep(r);
        let mut capture = IptCapture::new(rest, &mut ipt_keep);
        let printed = reader.stream_ipt_nft(&mut capture, Some(&todo)).map_err(|e| e.to_string())?;
        fw.tables.chains.extend(capture.chains.chains);
        fw.tables.chains.extend(legacy_rest);
        if !printed {
            return Ok(false);
        }
        done.extend(todo);
    }
}

fn mono_usec() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    Some(t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
}

/// Reads everything (call inside the target's thread). `capacity` bounds the flow summary.
/// With a window the drop counters are sampled first and again at the end, the window after
/// the first sample (the other reads happen in between).
pub fn collect(src: &Sources, capacity: usize) -> Observations {
    let mut o = Observations::default();
    let first = (!src.window.is_zero()).then(|| (read_stat(src).1.ok(), Instant::now()));
    o.count = sysctl(src, &mut o, "nf_conntrack_count");
    o.max = sysctl(src, &mut o, "nf_conntrack_max");
    o.buckets = sysctl(src, &mut o, "nf_conntrack_buckets");
    o.udp_timeout = sysctl(src, &mut o, "nf_conntrack_udp_timeout");
    o.udp_timeout_stream = sysctl(src, &mut o, "nf_conntrack_udp_timeout_stream");
    o.tcp_timeout_established = sysctl(src, &mut o, "nf_conntrack_tcp_timeout_established");

    let (trie, inet6) = (src.net_path("fib_trie"), src.net_path("if_inet6"));
    let (t4, t6) = (read_text(&trie), read_text(&inet6));
    if let (Err(e), Err(_)) = (&t4, &t6) {
        o.failed("local addresses", &trie, e);
    }
    o.locals = LocalAddrs::parse(t4.as_deref().ok(), t6.as_deref().ok());

    if src.firewall {
        match read_firewall() {
            Ok(f) => o.firewall = Some(f),
            Err(e) => o.unreadable.push(Unreadable {
                what: "firewall ruleset".into(),
                path: if crate::backend::live::nft_read_json() {
                    "nft -j list ruleset; iptables-*-save".into()
                } else {
                    "nf_tables over netlink; iptables-*-save".into()
                },
                error: e,
            }),
        }
    }

    let slab = src.proc_root.join("slabinfo");
    let size = read_text(&slab).and_then(|t| {
        parse::parse_slab_object_size(&t, "nf_conntrack")
            .map_err(|source| SourceError::Parse { path: slab.clone(), source })?
            .ok_or_else(|| SourceError::NoSlab { path: slab.clone() })
    });
    match size {
        Ok(s) => o.entry_bytes = Some(s),
        Err(e) => o.failed("entry size", &slab, &e),
    }

    let meminfo = src.proc_root.join("meminfo");
    match read_text(&meminfo) {
        Ok(t) => match crate::sysctl::parse_mem_total(&t) {
            Some(r) => o.ram_bytes = Some(r),
            None => o.unreadable.push(Unreadable {
                what: "MemTotal".into(),
                path: meminfo.display().to_string(),
                error: "no MemTotal line".into(),
            }),
        },
        Err(e) => o.failed("MemTotal", &meminfo, &e),
    }

    if let Some(kmsg) = &src.kmsg {
        match read_kmsg(kmsg, src.kmsg_max_records, src.time_limit) {
            Ok(s) => o.kmsg = Some(s),
            Err(e) => o.failed("kernel log", kmsg, &e),
        }
    }
    o.boot_unix_usec = boot_unix_usec();

    let entries = src.net_path("nf_conntrack");
    let start = Instant::now();
    let mut agg = FlowAggregator::new(capacity)
        .with_locals(o.locals.clone())
        .with_tcp_timeout_established(o.tcp_timeout_established);
    match File::open(&entries) {
        Ok(f) => match aggregate_reader(BufReader::with_capacity(64 * 1024, f), &mut agg) {
            Ok(()) => o.flows = Some((agg.finish(), entries.display().to_string(), start.elapsed())),
            Err(source) => o.failed("conntrack entries", &entries, &SourceError::Io { path: entries.clone(), source }),
        },
        Err(source) => {
            let proc_err = SourceError::Io { path: entries.clone(), source };
            if src.conntrack_tool {
                match stream_conntrack_tool(&mut agg, src.time_limit) {
                    Ok(cmd) => o.flows = Some((agg.finish(), cmd, start.elapsed())),
                    Err(e) => {
                        o.failed("conntrack entries", &entries, &proc_err);
                        o.failed("conntrack entries", Path::new("conntrack -L -o extended"), &e);
                    }
                }
            } else {
                o.failed("conntrack entries", &entries, &proc_err);
            }
        }
    }

    if let Some((s0, t0)) = first {
        let left = src.window.saturating_sub(t0.elapsed());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
        if let Some(s0) = s0 {
            o.drops_first = Some((s0, t0.elapsed()));
        }
    }
    let (stat, last) = read_stat(src);
    match last {
        Ok(d) => o.drops = Some(d),
        Err(e) => o.failed("drop counters", &stat, &e),
    }
    o.now_mono_usec = mono_usec();
    o
}

/// Reads the kernel log from its oldest record until there is nothing more to read (EAGAIN),
/// without blocking. Records the kernel overwrites meanwhile (EPIPE) are counted and skipped.
pub fn read_kmsg(path: &Path, max_records: u64, limit: Duration) -> Result<KmsgScan, SourceError> {
    let io = |source| SourceError::Io { path: path.to_path_buf(), source };
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io)?;
    // One read of /dev/kmsg returns one whole record; a record is at most ~8 KiB with its
    // dictionary (CONSOLE_LOG_MAX), so a 16 KiB buffer never splits one.
    let mut r = BufReader::with_capacity(16 * 1024, f);
    let mut scan = KmsgScan::default();
    let mut line = Vec::with_capacity(1024);
    let deadline = Instant::now() + limit;
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => scan.push_line(&String::from_utf8_lossy(&line)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                scan.lost += 1;
                continue;
            }
            Err(e) => return Err(io(e)),
        }
        if scan.records >= max_records || Instant::now() >= deadline {
            scan.truncated = true;
            break;
        }
    }
    Ok(scan)
}

/// Unix time of boot in µs, as `dmesg -T` computes it (realtime − CLOCK_BOOTTIME).
fn boot_unix_usec() -> Option<i64> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
    let up = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let up_us = up.tv_sec() * 1_000_000 + up.tv_nsec() / 1000;
    Some(now.as_micros() as i64 - up_us)
}

/// Streams `conntrack -L -o extended` (run in the calling thread's namespace) into `agg`,
/// killing it after `limit`. Returns the command line read from.
fn stream_conntrack_tool(agg: &mut FlowAggregator, limit: Duration) -> Result<String, SourceError> {
    let tool = Tool::find("conntrack")?;
    let args = ["-L", "-o", "extended"];
    stream_stdout(&tool, &args, limit, |out| aggregate_reader(out, agg)).map_err(|e| match e {
        SourceError::Tool(ExecError::TimedOut { .. }) => SourceError::Timeout(limit),
        e => e,
    })?;
    Ok(format!("{} {}", tool.path.display(), args.join(" ")))
}

/// Runs `tool` with `args` (an argument vector, `LC_ALL=C`, in the calling thread's namespace)
/// and hands its stdout to `read` as a stream (64 KiB buffered): the output is never held
/// whole. Killed after `limit` ([`ExecError::TimedOut`]); a non-zero exit is
/// [`ExecError::Failed`] with the first 64 KiB of stderr.
fn stream_stdout<T>(
    tool: &Tool,
    args: &[&str],
    limit: Duration,
    read: impl FnOnce(&mut dyn BufRead) -> std::io::Result<T>,
) -> Result<T, SourceError> {
    let spawn_err = |source| ExecError::Spawn { path: tool.path.clone(), source };
    let mut child = Command::new(&tool.path)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (read_result, stderr_text, timed_out) = std::thread::scope(|s| {
        // The child is reaped only after this scope, so its pid cannot be reused meanwhile.
        let watchdog = s.spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(limit) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                return true;
            }
            false
        });
        let err_reader = s.spawn(move || {
            let mut buf = Vec::new();
            if let Some(e) = stderr {
                let _ = e.take(64 * 1024).read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        });
        let res = match stdout {
            Some(out) => read(&mut BufReader::with_capacity(64 * 1024, out)),
            None => Err(std::io::Error::other("no stdout")),
        };
        let _ = done_tx.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        (res, err_reader.join().unwrap_or_default(), timed_out)
    });
    let status = child.wait().map_err(spawn_err)?;
    let cmd = format!("{} {}", tool.name, args.join(" ")).trim_end().to_string();
    if timed_out {
        return Err(SourceError::Tool(ExecError::TimedOut { cmd, after: limit }));
    }
    if !status.success() {
        return Err(SourceError::Tool(ExecError::Failed {
            cmd,
            status: status.to_string(),
            stderr: one_line(&stderr_text),
        }));
    }
    read_result.map_err(|source| SourceError::Io { path: tool.path.clone(), source })
}

/// True for a line of an iptables save the doctor keeps when it reads only what may notrack:
/// everything but rules (`*table`, `:chain`, `COMMIT`, comments and warnings), and the rules
/// that may notrack (`-j NOTRACK`, `-j CT --notrack`; any mention errs on the side of "may").
/// Pure.
pub fn outline_keeps(line: &str) -> bool {
    let l = line.trim_start();
    !l.starts_with("-A ") || l.contains("NOTRACK") || l.contains("--notrack")
}

/// The one x_tables table the kernel lets `NOTRACK` and `CT` in (`xt_CT`: `.table = "raw"`).
const RAW: &str = "raw";

/// iptables-legacy's outlines ([`legacy_outlines`]) and the one table they are of (`None`: all).
struct LegacyOutlines {
    dumps: Vec<crate::live::IptDump>,
    only: Option<&'static str>,
}

/// The dump of every installed iptables-legacy save tool (x_tables, invisible to netlink) —
/// of table `only` alone when given — with only the lines [`outline_keeps`] and the rules that
/// jump or go to a chain (the paths to the NOTRACK rules): streamed, so a 100k-rule table is
/// never held. Reading `raw` alone never runs a save tool over a big filter table (its peak
/// is the whole table's).
fn legacy_outlines(only: Option<&'static str>) -> Result<LegacyOutlines, String> {
    let dumps = legacy_streamed(only, &mut |_, _, line, rule| {
        outline_keeps(line) || (may_jump(line) && rule().is_some_and(|r| jumps(&r)))
    })?;
    Ok(LegacyOutlines { dumps, only })
}

/// False for a save line whose target is one of the built-in targets (most rules): only the
/// others may jump to a chain, and only those are modelled to know.
fn may_jump(line: &str) -> bool {
    const BUILTIN: [&str; 14] = [
        "ACCEPT",
        "DROP",
        "RETURN",
        "REJECT",
        "LOG",
        "NFLOG",
        "NOTRACK",
        "CT",
        "MARK",
        "CONNMARK",
        "DNAT",
        "SNAT",
        "MASQUERADE",
        "TCPMSS",
    ];
    if line.contains(" -g ") {
        return true;
    }
    match line.rsplit_once(" -j ") {
        Some((_, target)) => !BUILTIN.contains(&target.split_whitespace().next().unwrap_or_default()),
        None => false,
    }
}

/// What [`legacy_streamed`] asks of each rule: (IPv6, (table, chain), the save's line, the rule
/// modelled on demand) → keep it.
type LegacyKeep<'a> = dyn FnMut(bool, (&str, &str), &str, &dyn Fn() -> Option<crate::live::fw::FwRule>) -> bool + 'a;

/// Every installed iptables-legacy save tool's dump (of table `only` alone, `-t`, when given
/// and the family has it: the tool never runs for a table the kernel lists not, which would
/// create it), streamed line by line: the non-rule lines, and the rules
/// `keep(IPv6, (table, chain), line, rule)` says (`rule()`: the line modelled as the save's
/// rule, its index that in the whole chain). The dumps as `crate::backend::live::read_saves`
/// gives them, less the rules left out.
fn legacy_streamed(only: Option<&str>, keep: &mut LegacyKeep<'_>) -> Result<Vec<crate::live::IptDump>, String> {
    use crate::backend::live::{save_would_be_empty, SAVE_TOOLS};
    use crate::live::fw::IptVariant;
    use crate::live::{iptables_fw, iptables_save};
    use std::collections::HashMap;
    let mut out = Vec::new();
    for &(name, variant, v6) in SAVE_TOOLS.iter().filter(|t| t.1 == IptVariant::Legacy) {
        let Ok(tool) = Tool::find(name) else { continue };
        if save_would_be_empty(variant, v6, None) {
            continue;
        }
        let args: Vec<&str> = match only {
            Some(t) => match crate::backend::live::legacy_table_names(v6) {
                Ok(names) if !names.iter().any(|n| n == t) => continue,
                Ok(_) => vec!["-t", t],
                Err(_) => Vec::new(),
            },
            None => Vec::new(),
        };
        let mut kept = String::new();
        // Each kept rule's index in its whole chain, in order, by (table, chain).
        let mut indexes: HashMap<(String, String), Vec<usize>> = HashMap::new();
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        let mut table = String::new();
        stream_stdout(&tool, &args, crate::backend::exec::DEFAULT_TIMEOUT, |r| {
            let mut line = Vec::with_capacity(256);
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line)? == 0 {
                    return Ok(());
                }
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\n');
                if let Some(t) = text.strip_prefix('*') {
                    table = t.trim().to_string();
                }
                let chain = text.strip_prefix("-A ").and_then(|rest| rest.split_whitespace().next());
                let keep_it = match chain {
                    None => true,
                    Some(chain) => {
                        let key = (table.clone(), chain.to_string());
                        let n = counts.entry(key.clone()).or_insert(0);
                        *n += 1;
                        let index = *n;
                        let k = keep(v6, (&table, chain), text, &|| iptables_fw::rule_from_line(text, index, v6));
                        if k {
                            indexes.entry(key).or_default().push(index);
                        }
                        k
                    }
                };
                if keep_it {
                    kept.push_str(text);
                    kept.push('\n');
                }
            }
        })
        .map_err(|e| e.to_string())?;
        let rules: usize = counts.values().sum();
        tracing::debug!(tool = name, table = only.unwrap_or("all"), rules, "doctor: iptables-legacy save streamed");
        let (text, _) = iptables_save::without_incompatible(&kept);
        let dump = iptables_save::parse(&text).map_err(|e| format!("{name}: {e}"))?;
        let mut fw = iptables_fw::convert(&dump, variant, v6);
        for c in &mut fw.chains {
            let crate::live::fw::Owner::Iptables { table, .. } = &c.owner else { continue };
            if let Some(ix) = indexes.get(&(table.clone(), c.name.clone())) {
                for (r, i) in c.rules.iter_mut().zip(ix) {
                    r.index = *i;
                }
            }
        }
        out.push(crate::live::IptDump { variant, v6, fw, text: String::new() });
    }
    Ok(out)
}

/// Step 3 for iptables-legacy (see [`evaluated_chains`]): the saves read again, keeping in the
/// filter chains the check may evaluate the rules `keep` says and elsewhere the NOTRACK rules
/// and jumps ([`legacy_outlines`]); `fw`'s legacy chains replaced by them. Nothing when no
/// legacy chain is evaluated.
fn legacy_evaluated(fw: &mut Firewall, keep: &dyn Fn(&crate::live::fw::FwRule) -> bool) -> Result<(), String> {
    use crate::live::fw::{IptVariant, Owner};
    let reached = super::notrack::legacy_filter_chains_reached(fw);
    if reached.is_empty() {
        return Ok(());
    }
    let dumps = legacy_streamed(None, &mut |v6, (table, chain), line, rule| {
        let evaluated = reached.contains(&(v6, table.to_string(), chain.to_string()));
        outline_keeps(line)
            || ((evaluated || may_jump(line)) && rule().is_some_and(|r| jumps(&r) || (evaluated && keep(&r))))
    })?;
    let kept: usize = dumps.iter().flat_map(|d| &d.fw.chains).map(|c| c.rules.len()).sum();
    tracing::debug!(kept, chains = reached.len(), "doctor: iptables-legacy's evaluated chains read again");
    fw.tables.chains.retain(|c| !matches!(c.owner, Owner::Iptables { variant: IptVariant::Legacy, .. }));
    fw.tables.chains.extend(dumps.into_iter().flat_map(|d| d.fw.chains));
    Ok(())
}

/// Writes `text` to `path` atomically: a temporary file in the same directory, flushed to disk,
/// mode 0644 (node_exporter reads it as another user), then renamed over `path`.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), SourceError> {
    let io = |source| SourceError::Io { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.ctguard-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ctguard-doctor-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn empty_fake_root_gives_a_partial_report() {
        let root = tempdir("empty");
        let o = collect(&Sources::fake(&root, Some(root.join("no-kmsg"))), 64);
        assert!(o.count.is_none() && o.drops.is_none() && o.kmsg.is_none() && o.flows.is_none());
        let whats: Vec<&str> = o.unreadable.iter().map(|u| u.what.as_str()).collect();
        for w in
            ["nf_conntrack_count", "nf_conntrack_max", "drop counters", "entry size", "kernel log", "conntrack entries"]
        {
            assert!(whats.contains(&w), "{w} missing from {whats:?}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn fake_root_with_files() {
        let root = tempdir("full");
        let nf = root.join("sys/net/netfilter");
        std::fs::create_dir_all(&nf).expect("dir");
        for (k, v) in
            [("nf_conntrack_count", "2\n"), ("nf_conntrack_max", "1024\n"), ("nf_conntrack_buckets", "junk\n")]
        {
            std::fs::write(nf.join(k), v).expect("write");
        }
        std::fs::create_dir_all(root.join("thread-self/net/stat")).expect("dir");
        std::fs::write(
            root.join("thread-self/net/stat/nf_conntrack"),
            "entries drop early_drop insert_failed\n00000002 00000010 00000000 00000001\n00000002 00000001 00000000 00000000\n",
        )
        .expect("write");
        std::fs::write(
            root.join("thread-self/net/nf_conntrack"),
            "ipv4 2 udp 17 20 src=1.1.1.1 dst=2.2.2.2 sport=1 dport=53 src=2.2.2.2 dst=1.1.1.1 sport=53 dport=1 mark=0 use=1\n",
        )
        .expect("write");
        std::fs::write(root.join("kmsg"), "4,1,1000000,-;nf_conntrack: table full, dropping packet\n4,2,2000000,-;net_ratelimit: 9 callbacks suppressed\n").expect("write");
        let o = collect(&Sources::fake(&root, Some(root.join("kmsg"))), 64);
        assert_eq!((o.count, o.max, o.buckets), (Some(2), Some(1024), None));
        assert!(o.unreadable.iter().any(|u| u.what == "nf_conntrack_buckets" && u.error.contains("not an integer")));
        assert_eq!(o.drops.map(|d| (d.drop, d.insert_failed, d.cpus)), Some((0x11, 1, 2)));
        let k = o.kmsg.expect("log read");
        assert_eq!((k.table_full, k.ratelimit_suppressed), (1, 9));
        let (f, source, _) = o.flows.expect("flows");
        assert_eq!(f.scanned, 1);
        assert!(source.ends_with("thread-self/net/nf_conntrack"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn outline_keeps_what_may_notrack_and_every_non_rule_line() {
        for kept in [
            "*raw",
            ":PREROUTING ACCEPT [0:0]",
            ":DNS - [0:0]",
            "COMMIT",
            "# Warning: iptables-legacy tables present",
            "-A DNS -p udp -m udp --dport 53 -j NOTRACK",
            "-A PREROUTING -p udp -m udp --sport 123 -j CT --notrack",
        ] {
            assert!(outline_keeps(kept), "{kept}");
        }
        for left in ["-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT", "-A PREROUTING -j DNS", "-A OUTPUT -j CT --zone 1"]
        {
            assert!(!outline_keeps(left), "{left}");
        }
    }

    #[test]
    fn only_rules_whose_target_is_no_built_in_one_may_jump() {
        for jumps in
            ["-A INPUT -j f2b-sshd", "-A INPUT -p tcp -g DNS", "-A INPUT -m comment --comment \"-j ACCEPT\" -j x"]
        {
            assert!(may_jump(jumps), "{jumps}");
        }
        for stays in [
            "-A INPUT -s 10.0.0.1/32 -j DROP",
            "-A INPUT -j LOG --log-prefix x",
            "-A INPUT -p tcp",
            "-A X -j CT --notrack",
        ] {
            assert!(!may_jump(stays), "{stays}");
        }
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempdir("atomic");
        let p = d.join("ctguard.prom");
        write_atomic(&p, "a 1\n").expect("write");
        write_atomic(&p, "a 2\n").expect("rewrite");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(&d).expect("dir").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        assert!(write_atomic(&d.join("missing/x.prom"), "x").is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
