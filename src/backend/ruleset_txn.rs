//! Side effects of ruleset transactions (DESIGN §1): reading the whole firewall of the calling
//! thread's network namespace, proving each table's restore route in a scratch namespace,
//! kernel-checking and applying a ruleset file, and restoring a [`Snapshot`]. The pure parts
//! (restore documents, listing, drift) are in [`crate::snapshot`].
//!
//! Every tool runs by absolute path with an argument vector ([`Tool`]), never through a shell.
//! Call these inside `crate::netns::Target::run` (the agent's target thread) so they act on
//! the target; scratch checks run on a thread of their own in a fresh namespace and never
//! enter or change the target.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backend::exec::{xtables_wait_args, ExecError, Tool, BULK_TIMEOUT};
use crate::backend::iptables::{self, IptablesError};
use crate::backend::netlink::{self, NetlinkError};
use crate::backend::nft_fingerprint;
use crate::exit::Exit;
use crate::live::fw::IptVariant;
use crate::render::iptables::IpFamily;
use crate::snapshot::{
    self, ApplyInfo, DriftSection, Family, FwState, NftTable, RulesetFormat, SaveText, Snapshot, SnapshotError,
    TableId, SAVE_ORDER, SNAPSHOT_VERSION,
};

/// How many times a snapshot is re-read when the generation id moved while it was read.
pub const SNAPSHOT_ATTEMPTS: usize = 5;
/// How many times the rollback's `nft -f` is redone when another commit raced it.
pub const RESTORE_ATTEMPTS: usize = 3;

/// Errors of ruleset transactions, each with the exit code it maps to ([`RulesetTxnError::exit`]).
#[derive(Debug, thiserror::Error)]
pub enum RulesetTxnError {
    /// A required tool is missing (precondition, exit 2).
    #[error("a required tool is missing")]
    MissingTool(#[source] ExecError),
    /// Reading the live state failed.
    #[error("reading the firewall: {what}")]
    Read {
        /// Which read.
        what: String,
        /// The tool failure.
        #[source]
        source: ExecError,
    },
    /// The generation id or the table list could not be read over netlink.
    #[error("reading nf_tables over netlink")]
    Genid(#[source] NetlinkError),
    /// The pure logic refused (unparsable listing, unrestorable table, bad format).
    #[error("snapshot")]
    Snapshot(#[source] SnapshotError),
    /// The ruleset kept changing while it was read.
    #[error("the nf_tables ruleset kept changing while it was read ({0} attempts); nothing changed")]
    Unstable(usize),
    /// The ruleset file does not pass the kernel check (`nft -c -f`).
    #[error("the kernel refuses the ruleset file (nft -c); nothing changed")]
    CandidateRefused(#[source] ExecError),
    /// The iptables dump does not load in a scratch namespace.
    #[error("the kernel refuses the iptables dump (scratch namespace); nothing changed")]
    CandidateIptRefused(#[source] IptablesError),
    /// The restore script does not pass the kernel check.
    #[error("the rollback script does not pass the kernel check (nft -c)")]
    RestoreRefused(#[source] ExecError),
    /// A scratch-namespace step failed.
    #[error("scratch namespace: {what}")]
    Scratch {
        /// The step.
        what: String,
        /// The tool failure.
        #[source]
        source: ExecError,
    },
    /// The scratch namespace could not be created.
    #[error("cannot create a scratch network namespace")]
    Unshare(#[source] nix::Error),
    /// The scratch thread panicked.
    #[error("the scratch-namespace thread panicked")]
    ScratchPanicked,
    /// The thread reading `nft list ruleset` panicked.
    #[error("the thread reading nft list ruleset panicked")]
    ReadPanicked,
    /// A helper thread panicked (which one).
    #[error("the thread {0} panicked")]
    Panicked(&'static str),
    /// Reading the firewall a scratch namespace holds failed.
    #[error("scratch namespace: reading the result")]
    ScratchRead(#[source] crate::backend::live::LiveError),
    /// Applying the ruleset file failed.
    #[error("applying the ruleset file failed")]
    Apply(#[source] ExecError),
    /// Applying the iptables dump failed.
    #[error("applying the iptables dump failed")]
    ApplyIpt(#[source] IptablesError),
    /// The lint found errors in the result and `--force` was not given (DESIGN §7).
    #[error("lint found {} error(s); refused without --force: {}", .0.len(), .0.join("; "))]
    Lint(Vec<String>),
    /// A rollback step failed.
    #[error("rollback step `{step}` failed")]
    Restore {
        /// The step (tool name).
        step: String,
        /// The tool failure.
        #[source]
        source: ExecError,
    },
}

impl RulesetTxnError {
    /// The DESIGN §5 exit code: 2 for a missing tool or bad input, 3 for a refusal (nothing
    /// changed — a failed apply is rolled back by the agent), 1 for other failures.
    pub fn exit(&self) -> Exit {
        match self {
            RulesetTxnError::MissingTool(_) => Exit::BadInput,
            RulesetTxnError::Snapshot(SnapshotError::Format(_) | SnapshotError::MixedFamilies { .. }) => Exit::BadInput,
            RulesetTxnError::Snapshot(_)
            | RulesetTxnError::Unstable(_)
            | RulesetTxnError::CandidateRefused(_)
            | RulesetTxnError::CandidateIptRefused(_)
            | RulesetTxnError::RestoreRefused(_)
            | RulesetTxnError::Apply(_)
            | RulesetTxnError::ApplyIpt(_)
            | RulesetTxnError::Lint(_)
            | RulesetTxnError::Scratch { .. } => Exit::Refused,
            _ => Exit::Internal,
        }
    }
}

/// The whole error chain on one line (`outer: inner: …`).
pub fn chain_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn nft() -> Result<Tool, RulesetTxnError> {
    Tool::find("nft").map_err(RulesetTxnError::MissingTool)
}

/// Absolute paths of the tools a ruleset transaction uses here (for the journal); `nft` is
/// required (exit 2 without it), the others are used when installed.
pub fn tools() -> Result<BTreeMap<String, String>, RulesetTxnError> {
    let mut out = BTreeMap::new();
    let n = nft()?;
    out.insert(n.name, n.path.display().to_string());
    let mut names = vec!["ipset".to_string()];
    for (v, v6) in SAVE_ORDER {
        names.push(v.tool(v6, "-save"));
        names.push(v.tool(v6, "-restore"));
    }
    for name in names {
        if let Ok(t) = Tool::find(&name) {
            out.insert(t.name, t.path.display().to_string());
        }
    }
    Ok(out)
}

fn genid() -> Result<u32, RulesetTxnError> {
    netlink::get_genid().map_err(RulesetTxnError::Genid)
}

// ---------------------------------------------------------------------------------------------
// Reading

/// `nft list table FAMILY NAME` (nft fetches only that table; its kernel dump walks only that
/// table's rules), split as [`snapshot::split_nft_tables`] splits a listing;
/// `None` when the table is gone (removed since it was seen: the caller's generation id
/// check then reads again).
fn list_nft_table(id: &TableId) -> Result<Option<NftTable>, RulesetTxnError> {
    match nft_list(&["list", "table", &id.family, &id.name]) {
        Ok(mut tables) => Ok(tables.pop().filter(|t| t.id() == *id)),
        Err(RulesetTxnError::Read { source: ExecError::Failed { stderr, .. }, .. })
            if stderr.contains("No such file or directory") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `nft list table` of each of `ids`, two at a time (issue 16: the kernel's rule dump walks
/// every rule it dumped before for each datagram, so one `nft list ruleset` of two 100k-rule
/// tables took 13.6 s where the two tables, each listed alone, take about 1.4 s each); in the
/// order given, a table gone meanwhile left out.
fn list_nft_tables(ids: &[TableId]) -> Result<Vec<NftTable>, RulesetTxnError> {
    const AT_ONCE: usize = 2;
    let mut out: Vec<Option<NftTable>> = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(AT_ONCE) {
        let listed: Vec<Result<Option<NftTable>, RulesetTxnError>> = std::thread::scope(|s| {
            // Threads started here are in this thread's namespace.
            let hs: Vec<_> = chunk.iter().map(|id| s.spawn(move || list_nft_table(id))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or(Err(RulesetTxnError::ReadPanicked))).collect()
        });
        for l in listed {
            out.push(l?);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// An nft listing command's tables, with the tables nft says hold compat expressions.
fn nft_list(args: &[&str]) -> Result<Vec<NftTable>, RulesetTxnError> {
    let what = format!("nft {}", args.join(" "));
    let out = nft()?.output(args, None).map_err(|source| RulesetTxnError::Read { what: what.clone(), source })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(RulesetTxnError::Read {
            what: what.clone(),
            source: ExecError::Failed {
                cmd: what,
                status: out.status.to_string(),
                stderr: crate::backend::exec::one_line(&stderr),
            },
        });
    }
    let mut tables =
        snapshot::split_nft_tables(&String::from_utf8_lossy(&out.stdout)).map_err(RulesetTxnError::Snapshot)?;
    let xt = snapshot::xt_tables(&stderr);
    for t in &mut tables {
        t.xt = xt.contains(&t.id());
    }
    Ok(tables)
}

/// The installed saves of `which` (variant, v6), read with `-c`; a legacy save of a family
/// without x_tables table is not run ([`crate::backend::live::save_would_be_empty`]). With `nft` (the nf_tables
/// tables, read in the same generation), an iptables-nft save of a
/// family with no table is not run: iptables-nft lists only tables of the `ip` (`ip6`)
/// nf_tables family, so it would print nothing.
fn read_saves(which: &[(IptVariant, bool)], nft: Option<&[TableId]>) -> Result<Vec<SaveText>, RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: iptables saves");
    let tables: Option<Vec<(String, String)>> =
        nft.map(|t| t.iter().map(|t| (t.family.clone(), t.name.clone())).collect());
    let mut out = Vec::new();
    for &(variant, v6) in which {
        let name = variant.tool(v6, "-save");
        let Ok(t) = Tool::find(&name) else { continue };
        if crate::backend::live::save_would_be_empty(variant, v6, tables.as_deref()) {
            out.push(SaveText { variant, v6, text: String::new() });
            continue;
        }
        let text = t.run(&["-c"], None).map_err(|source| RulesetTxnError::Read { what: name.clone(), source })?;
        out.push(SaveText { variant, v6, text });
    }
    Ok(out)
}

fn read_ipsets() -> Result<Option<String>, RulesetTxnError> {
    let Ok(t) = Tool::find("ipset") else { return Ok(None) };
    t.run(&["save"], None).map(Some).map_err(|source| RulesetTxnError::Read { what: "ipset save".into(), source })
}

/// Reads the whole firewall of the calling thread's namespace: the nf_tables tables (listed by
/// nft, or as stubs for iptables-nft's own, see [`read_nft_and_saves`]), every installed
/// iptables save (`-c`, both variants and families; "incompatible" warnings kept as text,
/// judged later; an iptables-nft save of a family without nf_tables table not run) and `ipset
/// save`, with the generation id read before. The nft side and `ipset save` run on threads of
/// their own (in the same namespace) while the saves run. Read-only.
pub fn read_state() -> Result<FwState, RulesetTxnError> {
    let genid = Some(genid()?);
    let (read, ipsets) = std::thread::scope(|s| {
        // A new thread starts in the namespace of the thread that creates it.
        let h = s.spawn(read_ipsets);
        let read = read_nft_and_saves(&SAVE_ORDER);
        (read, h.join())
    });
    let (nft, saves) = read?;
    let ipsets = ipsets.map_err(|_| RulesetTxnError::ReadPanicked)??;
    Ok(FwState { genid, nft, saves, ipsets })
}

/// The nf_tables tables and the saves `which`, read together (issue 16: `nft list` of a
/// 100k-rule iptables-nft table takes 4.5 s). An `ip`/`ip6` table with an iptables name that
/// its family's iptables-nft save lists (no "incompatible" warning) and that holds nothing but
/// chains is shown by that save and an [`NftTable::stub`] carrying its kernel fingerprint; every
/// other table is listed by nft, one `nft list table` each ([`list_nft_tables`]), beside the
/// saves and the fingerprints. Read-only.
fn read_nft_and_saves(which: &[(IptVariant, bool)]) -> Result<(Vec<NftTable>, Vec<SaveText>), RulesetTxnError> {
    let tables = current_tables()?;
    let maybe_ipt =
        |t: &TableId| matches!(t.family.as_str(), "ip" | "ip6") && snapshot::IPTABLES_TABLES.contains(&t.name.as_str());
    let (other, saves) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let _lap = crate::timing::Lap::start("ruleset: nft list table, fingerprints");
            let mut prints = BTreeMap::new();
            for t in tables.iter().filter(|t| maybe_ipt(t)) {
                let fp = match nft_fingerprint::has_other_objects(&t.family, &t.name) {
                    Ok(false) => nft_fingerprint::table_fingerprint(&t.family, &t.name).ok(),
                    _ => None,
                };
                prints.insert(t.clone(), fp);
            }
            let others: Vec<TableId> = tables.iter().filter(|t| !maybe_ipt(t)).cloned().collect();
            Ok::<_, RulesetTxnError>((list_nft_tables(&others)?, prints))
        });
        let saves = read_saves(which, Some(&tables));
        (h.join(), saves)
    });
    let (mut listed, prints) = other.map_err(|_| RulesetTxnError::ReadPanicked)??;
    let saves = saves?;
    let splits: Vec<(bool, snapshot::SaveSplit)> =
        saves.iter().filter(|s| s.variant == IptVariant::Nft).map(|s| (s.v6, snapshot::split_save(&s.text))).collect();
    let shown_by_save = |t: &TableId| {
        let v6 = t.family == "ip6";
        splits
            .iter()
            .any(|(f, split)| *f == v6 && split.block(&t.name).is_some() && !split.incompatible.contains_key(&t.name))
    };
    let mut nft = Vec::with_capacity(tables.len());
    for t in &tables {
        match prints.get(t) {
            Some(Some(fp)) if shown_by_save(t) => nft.push(NftTable::stub(t, fp)),
            Some(_) => nft.extend(list_nft_table(t)?),
            None => {
                if let Some(i) = listed.iter().position(|l| l.id() == *t) {
                    nft.push(listed.remove(i));
                }
            }
        }
    }
    Ok((nft, saves))
}

/// The current nft tables, in kernel order (a netlink dump: `nft list tables` fetches the
/// whole ruleset first).
pub fn current_tables() -> Result<Vec<TableId>, RulesetTxnError> {
    let tables = netlink::list_tables().map_err(RulesetTxnError::Genid)?;
    Ok(tables.into_iter().map(|(family, name)| TableId { family, name }).collect())
}

// ---------------------------------------------------------------------------------------------
// Snapshot

/// Takes a [`Snapshot`] of the calling thread's namespace: the state read between two equal
/// generation ids (re-read up to [`SNAPSHOT_ATTEMPTS`] times, then [`RulesetTxnError::Unstable`]),
/// each `ip`/`ip6` table iptables-nft lists proven in a scratch namespace to come back exactly
/// from `iptables-nft-restore -c` (else it is native, if nft can restore it), and the legacy
/// saves proven to load. Refuses (exit 3) a table no route restores exactly: compat (xt)
/// expressions that iptables-nft-save does not represent faithfully. Changes nothing.
pub fn take_snapshot() -> Result<Snapshot, RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: snapshot");
    classify(read_stable_state()?)
}

/// The first part of [`take_snapshot`]: [`read_state`] between two equal generation ids
/// (re-read up to [`SNAPSHOT_ATTEMPTS`] times, then [`RulesetTxnError::Unstable`]), its
/// `genid` set to that id; no table classified yet. Read-only.
fn read_stable_state() -> Result<FwState, RulesetTxnError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = genid()?;
        let mut st = read_state()?;
        let after = genid()?;
        if before == after {
            st.genid = Some(before);
            return Ok(st);
        }
        tracing::debug!(before, after, attempt, "generation id moved while reading the snapshot; re-reading");
        if attempt >= SNAPSHOT_ATTEMPTS {
            return Err(RulesetTxnError::Unstable(attempt));
        }
        std::thread::sleep(Duration::from_millis(20 * attempt as u64));
    }
}

/// Decides each table's restore route (see [`take_snapshot`]).
fn classify(state: FwState) -> Result<Snapshot, RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: snapshot: scratch proof");
    let mut state = state;
    let candidates = snapshot::ipt_nft_candidates(&state);
    let proven = scratch_prove(&state, &candidates)?;
    // A table read as a stub that its save does not give back exactly is restored natively
    // (or refused): it needs its real listing, as it was when the state was read.
    for i in 0..state.nft.len() {
        let id = state.nft[i].id();
        if state.nft[i].stub_digest().is_some() && !matches!(proven.get(&id), Some(Ok(()))) {
            match listed_at(&state, &id)? {
                Some(real) => state.nft[i] = real,
                None => return Err(RulesetTxnError::Unstable(1)),
            }
        }
    }
    let mut iptables_nft = Vec::new();
    for t in &state.nft {
        let id = t.id();
        match proven.get(&id) {
            Some(Ok(())) => iptables_nft.push(id),
            Some(Err(why)) if t.xt => {
                return Err(RulesetTxnError::Snapshot(SnapshotError::Unrestorable {
                    family: t.family.clone(),
                    name: t.name.clone(),
                    why: format!("it holds iptables compat expressions nft cannot load, and iptables-nft-save does not give it back exactly ({why})"),
                }))
            }
            _ if t.xt => {
                return Err(RulesetTxnError::Snapshot(SnapshotError::Unrestorable {
                    family: t.family.clone(),
                    name: t.name.clone(),
                    why: "it holds iptables compat expressions nft cannot load, and iptables-nft-save does not list it as compatible (ebtables-nft/arptables-nft tables and native objects in an iptables-nft table are not supported)".into(),
                }))
            }
            Some(Err(why)) => tracing::debug!(table = %id, "restored natively: {why}"),
            None => {}
        }
    }
    Ok(Snapshot { version: SNAPSHOT_VERSION, state, iptables_nft })
}

/// Runs `f` on a new thread in a fresh network namespace that disappears with it.
fn in_scratch<T: Send>(f: impl FnOnce() -> Result<T, RulesetTxnError> + Send) -> Result<T, RulesetTxnError> {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(RulesetTxnError::Unshare)?;
            f()
        });
        h.join().map_err(|_| RulesetTxnError::ScratchPanicked)?
    })
}

/// In a scratch namespace with the target's ipsets recreated: restores each candidate table
/// alone with `iptables-nft-restore -c` and compares its `nft list` with the live one (chain
/// order aside), and loads each legacy save. Returns per candidate `Ok` (exact) or why not.
fn scratch_prove(
    state: &FwState,
    candidates: &[TableId],
) -> Result<BTreeMap<TableId, Result<(), String>>, RulesetTxnError> {
    let legacy: Vec<(String, &str)> = [false, true]
        .into_iter()
        .filter_map(|v6| state.save(IptVariant::Legacy, v6))
        .filter(|s| !snapshot::split_save(&s.text).blocks.is_empty())
        .map(|s| (s.variant.tool(s.v6, "-restore"), s.text.as_str()))
        .collect();
    if candidates.is_empty() && legacy.is_empty() {
        return Ok(BTreeMap::new());
    }
    let ipsets = state.ipsets.as_deref().filter(|s| !s.trim().is_empty());
    let ipset_tool = match ipsets {
        Some(_) => Some(Tool::find("ipset").map_err(RulesetTxnError::MissingTool)?),
        None => None,
    };
    let mut restore_tools = BTreeMap::new();
    for name in candidates
        .iter()
        .map(|c| IptVariant::Nft.tool(c.family == "ip6", "-restore"))
        .chain(legacy.iter().map(|(n, _)| n.clone()))
    {
        let t = Tool::find(&name).map_err(RulesetTxnError::MissingTool)?;
        restore_tools.insert(name, t);
    }
    let nft_tool = nft()?;
    let wait = xtables_wait_args();
    let (mut out, relist) = in_scratch(|| {
        if let (Some(t), Some(text)) = (&ipset_tool, ipsets) {
            t.run(&["restore"], Some(text.as_bytes())).map_err(|source| RulesetTxnError::Scratch {
                what: "recreating the ipsets (ipset restore)".into(),
                source,
            })?;
        }
        let mut out = BTreeMap::new();
        for id in candidates {
            let name = IptVariant::Nft.tool(id.family == "ip6", "-restore");
            let docs = snapshot::ipt_nft_restore_docs(state, std::slice::from_ref(id));
            let result = match (restore_tools.get(&name), docs.first()) {
                (Some(t), Some((_, doc))) => t
                    .run_timeout(&ipt_restore_args(&wait), Some(doc.as_bytes()), BULK_TIMEOUT)
                    .map(|_| ())
                    .map_err(|e| chain_text(&e)),
                _ => Err("no restore document".to_string()),
            };
            out.insert(id.clone(), result);
        }
        // A table read as a stub (its fingerprint): byte-equal here, nft would list it the
        // same. Anything else is compared as nft lists it.
        let mut to_list = Vec::new();
        for (id, result) in out.iter_mut() {
            if result.is_err() {
                continue;
            }
            let live = state.table(id).and_then(NftTable::stub_digest);
            let same = live.is_some_and(|d| {
                nft_fingerprint::table_fingerprint(&id.family, &id.name).is_ok_and(|here| here.digest() == d)
            });
            if !same {
                to_list.push(id.clone());
            }
        }
        // (The listing here of stubs whose fingerprint differs, compared with the live
        // table's once back in the target's namespace.)
        let mut relist: BTreeMap<TableId, Option<String>> = BTreeMap::new();
        if !to_list.is_empty() {
            let listed = nft_tool
                .run(&["list", "ruleset"], None)
                .map_err(|source| RulesetTxnError::Scratch { what: "nft list ruleset".into(), source })?;
            let scratch = snapshot::split_nft_tables(&listed).map_err(RulesetTxnError::Snapshot)?;
            for (id, result) in out.iter_mut() {
                if result.is_err() || !to_list.contains(id) {
                    continue;
                }
                let back = scratch.iter().find(|t| t.id() == *id).map(|t| t.text.as_str());
                match state.table(id) {
                    Some(t) if t.stub_digest().is_some() => {
                        relist.insert(id.clone(), back.map(str::to_string));
                    }
                    live => *result = same_listing(live.map(|t| t.text.as_str()), back),
                }
            }
        }
        for (name, text) in &legacy {
            if let Some(t) = restore_tools.get(name) {
                t.run_timeout(&ipt_restore_args(&wait), Some(text.as_bytes()), BULK_TIMEOUT).map_err(|source| {
                    RulesetTxnError::Scratch { what: format!("the live {name} save does not load back"), source }
                })?;
            }
        }
        Ok((out, relist))
    })?;
    for (id, back) in relist {
        let live = listed_at(state, &id)?;
        out.insert(id, same_listing(live.as_ref().map(|t| t.text.as_str()), back.as_deref()));
    }
    Ok(out)
}

/// `Ok` when two `nft list` blocks of one table hold the same items (order aside), else what
/// differs.
fn same_listing(live: Option<&str>, back: Option<&str>) -> Result<(), String> {
    if live.map(snapshot::table_items) == back.map(snapshot::table_items) {
        return Ok(());
    }
    let a = live.map(snapshot::normalize_nft).unwrap_or_default();
    let b = back.map(snapshot::normalize_nft).unwrap_or_default();
    Err(format!("restored, it lists differently: {}", snapshot::changed_lines(&a, &b).join(" | ")))
}

/// `nft list table` of `id` in the calling thread's namespace, as it was when `state` was read
/// (the generation id unchanged around the listing), for a table `state` holds as a stub.
/// [`RulesetTxnError::Unstable`] when the ruleset changed since (the caller reads again).
fn listed_at(state: &FwState, id: &TableId) -> Result<Option<NftTable>, RulesetTxnError> {
    let before = genid()?;
    let listed = list_nft_table(id)?;
    if Some(before) != state.genid || genid()? != before {
        return Err(RulesetTxnError::Unstable(1));
    }
    Ok(listed)
}

// ---------------------------------------------------------------------------------------------
// Checks

/// `nft -c -f -` of `script` in the calling thread's namespace: the kernel validates the whole
/// transaction and aborts it. Changes nothing.
pub fn nft_check(script: &str) -> Result<(), ExecError> {
    let t = Tool::find("nft")?;
    t.run(&["-c", "-f", "-"], Some(script.as_bytes())).map(|_| ())
}

/// A ruleset file, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The file's text.
    pub text: String,
    /// Its format.
    pub format: RulesetFormat,
    /// Family of a dump.
    pub family: Option<Family>,
    /// Variant a dump is restored with.
    pub variant: Option<IptVariant>,
}

fn ip_family(f: Family) -> IpFamily {
    match f {
        Family::V4 => IpFamily::V4,
        Family::V6 => IpFamily::V6,
    }
}

/// Kernel-checks the ruleset file without changing the target: an nft script with `nft -c -f`
/// in the target; an iptables dump by loading it into a scratch namespace (with the ipsets of
/// `snapshot` recreated there) with the variant's restore tool.
pub fn check_candidate(c: &Candidate, snapshot: &Snapshot) -> Result<(), RulesetTxnError> {
    check_file(c, snapshot.state.ipsets.as_deref())
}

/// [`check_candidate`] with the ipsets to recreate for an iptables dump given directly (the
/// target's `ipset save`; an nft script ignores them).
fn check_file(c: &Candidate, ipsets: Option<&str>) -> Result<(), RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: check the file");
    match (c.format, c.family) {
        (RulesetFormat::Nft, _) => nft_check(&c.text).map_err(RulesetTxnError::CandidateRefused),
        (RulesetFormat::Iptables, family) => {
            let family = ip_family(family.unwrap_or(Family::V4));
            let variant = c.variant.unwrap_or(IptVariant::Nft);
            iptables::scratch_check(variant, family, "", ipsets, &c.text).map_err(RulesetTxnError::CandidateIptRefused)
        }
    }
}

/// Test-only fault point ([`crate::fault`]): another writer's nft change lands right after the
/// concurrent kernel check of an nft file and before the generation id that closes it is read
/// (so the check saw the ruleset before the change, and the snapshot may see it after).
pub const FAULT_AFTER_FILE_CHECK: &str = "ruleset-prepare:foreign-change-after-file-check";

/// [`check_file`] between two reads of the generation id: `(before, after)`; equal ids mean
/// the check saw exactly the ruleset of that generation. With `fault`, the foreign change of
/// [`FAULT_AFTER_FILE_CHECK`] is injected after the check (tests only).
fn check_file_between_genids(c: &Candidate, fault: bool) -> Result<(u32, u32), RulesetTxnError> {
    let before = genid()?;
    check_file(c, None)?;
    if fault {
        crate::fault::inject(FAULT_AFTER_FILE_CHECK, 1, || crate::fault::foreign_change(FAULT_AFTER_FILE_CHECK));
    }
    Ok((before, genid()?))
}

/// A [`take_snapshot`] of `state` (read first when `None`), and apart from it the result of
/// [`check_restore`] of that snapshot (the caller reports a refused file before a refused
/// restore script, as when the file was checked first).
fn snapshot_then_check_restore(
    state: Option<FwState>,
) -> Result<(Snapshot, Result<(), RulesetTxnError>), RulesetTxnError> {
    let snap = {
        let _lap = crate::timing::Lap::start("ruleset: snapshot");
        classify(match state {
            Some(s) => s,
            None => read_stable_state()?,
        })?
    };
    let restore = check_restore(&snap);
    Ok((snap, restore))
}

/// Kernel-checks the rollback of `snapshot` against the calling thread's namespace as it is
/// now: `nft -c -f` of the restore script built from the current tables. (The iptables
/// documents were proven when the snapshot was taken.) Changes nothing.
pub fn check_restore(snapshot: &Snapshot) -> Result<(), RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: check the restore script");
    let script = snapshot::nft_restore_script(snapshot, &current_tables()?);
    if script.is_empty() {
        return Ok(());
    }
    nft_check(&script).map_err(RulesetTxnError::RestoreRefused)
}

/// The kernel check of the rollback right after the apply, given the one [`check_restore`]
/// made before it (`checked_before`, [`crate::snapshot::UndoRecord::restore_checked`]): only
/// the deletes of the tables present now ([`snapshot::nft_delete_script`]), `nft -c`. The
/// snapshot's native tables need no second check: they were proven to load once every
/// native table present before the apply was deleted in the same transaction, and loading
/// them depends on no native table (the script deletes them all first) — only on the
/// iptables-nft tables, which the nft script leaves alone either way. Without
/// `checked_before`, the whole [`check_restore`]. Changes nothing.
pub fn check_restore_after_apply(snapshot: &Snapshot, checked_before: bool) -> Result<(), RulesetTxnError> {
    check_restore_after_apply_at(snapshot, checked_before).map(drop)
}

/// [`check_restore_after_apply`], returning the generation id the check saw when it was read
/// equal right before and after it (`None` otherwise: another commit landed meanwhile). Changes
/// nothing.
pub fn check_restore_after_apply_at(snapshot: &Snapshot, checked_before: bool) -> Result<Option<u32>, RulesetTxnError> {
    let before = genid()?;
    if !checked_before {
        check_restore(snapshot)?;
    } else {
        let _lap = crate::timing::Lap::start("ruleset: check the restore deletes");
        let script = snapshot::nft_delete_script(snapshot, &current_tables()?);
        if !script.is_empty() {
            nft_check(&script).map_err(RulesetTxnError::RestoreRefused)?;
        }
    }
    let after = genid()?;
    Ok((before == after).then_some(after))
}

/// Names of the calling thread's namespace's network interfaces other than `lo`, from
/// `ip -o link show` (empty when `ip` is missing or fails).
fn interface_names() -> Vec<String> {
    let Ok(ip) = Tool::find("ip") else { return Vec::new() };
    let Ok(text) = ip.run(&["-o", "link", "show"], None) else { return Vec::new() };
    text.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| !n.is_empty() && n != "lo")
        .collect()
}

/// What the target's firewall would be after applying a ruleset file, built in a scratch
/// namespace ([`scratch_result`]).
#[derive(Debug)]
pub struct ScratchResult {
    /// The result, read with [`crate::backend::live::read`] (what the lint evaluates).
    pub live: crate::live::LiveState,
    /// [`listing`] of the scratch namespace with the snapshot restored, before the file.
    pub before: String,
    /// [`listing`] of the scratch namespace after the file was applied on top.
    pub after: String,
}

impl ScratchResult {
    /// The line diff of the listing before → after ([`crate::diff::diff_lines`]: `  ` kept,
    /// `- ` removed, `+ ` added), on [`canonical_lines`]: set elements one a line, sorted (nft
    /// lists a set's elements in the order they were added, and a restored snapshot adds them
    /// in listing order). Both sides were built the same way in the same namespace, so every
    /// changed line is the file's doing (not an artefact of restoring the live state).
    pub fn diff(&self) -> Vec<String> {
        crate::diff::diff_lines(&canonical_lines(&self.before), &canonical_lines(&self.after))
    }
}

/// The lines of a listing with every `elements = { … }` of a set or map (on one line or
/// wrapped over several) written as `elements = {`, one element a line (indented one tab
/// more), sorted, and `}`: the same elements give the same lines whatever order nft lists them
/// in. Elements are split at the commas outside quotes, braces, brackets and parentheses.
/// The fingerprint line of a table shown by its iptables-nft save ([`NftTable::stub`]) is left
/// out: the save's own lines show what changed. Every other line is kept as it is. Pure.
pub fn canonical_lines(listing: &str) -> Vec<String> {
    /// The elements of `body` (after `elements = {`) and the text after its closing brace;
    /// `None` while the brace is not closed yet.
    fn split(body: &str) -> Option<(Vec<String>, String)> {
        let (mut depth, mut quoted, mut cur, mut elems) = (0usize, false, String::new(), Vec::new());
        for (i, c) in body.char_indices() {
            match c {
                '"' => quoted = !quoted,
                _ if quoted => {}
                '{' | '(' | '[' => depth += 1,
                '}' if depth == 0 => {
                    elems.push(std::mem::take(&mut cur));
                    let elems = elems.into_iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
                    return Some((elems, body[i + 1..].trim().to_string()));
                }
                '}' | ')' | ']' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    elems.push(std::mem::take(&mut cur));
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        None
    }
    let mut out = Vec::new();
    let mut lines = listing.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with(snapshot::STUB_MARK) {
            continue;
        }
        let Some(rest) = trimmed.strip_prefix("elements = {") else {
            out.push(line.to_string());
            continue;
        };
        let indent = &line[..line.len() - trimmed.len()];
        let mut body = rest.to_string();
        let mut taken = vec![line.to_string()];
        let split_body = loop {
            if let Some(r) = split(&body) {
                break Some(r);
            }
            match lines.next() {
                Some(l) => {
                    body.push(' ');
                    body.push_str(l.trim());
                    taken.push(l.to_string());
                }
                None => break None,
            }
        };
        let Some((mut elems, after)) = split_body else {
            // Unclosed (not a listing nft printed): kept as it was.
            out.extend(taken);
            continue;
        };
        elems.sort();
        out.push(format!("{indent}elements = {{"));
        out.extend(elems.into_iter().map(|e| format!("{indent}\t{e}")));
        out.push(format!("{indent}}}{}{after}", if after.is_empty() { "" } else { " " }));
    }
    out
}

/// What the target's firewall would be after applying `c`, read without changing the target
/// (for the lint, DESIGN §7, and `plan --ruleset`'s diff): in a scratch namespace holding
/// stand-in interfaces (dummy, else veth) named like the target's (rules and base chains bound
/// to a device load only when it exists), `snapshot` is restored exactly as a rollback
/// restores it, `c` is applied on top exactly as [`apply`] applies it, and the result is read
/// back with [`crate::backend::live::read`] and listed before and after the file.
pub fn scratch_result(c: &Candidate, snapshot: &Snapshot) -> Result<ScratchResult, RulesetTxnError> {
    let ifaces = interface_names();
    let ip = Tool::find("ip").ok();
    in_scratch(|| {
        if let Some(ip) = &ip {
            // A dummy where the kernel has the module, else one end of a veth pair.
            for (i, name) in ifaces.iter().enumerate() {
                let peer = format!("ctgscratch{i}");
                let made = ip
                    .run(&["link", "add", name, "type", "dummy"], None)
                    .or_else(|_| ip.run(&["link", "add", name, "type", "veth", "peer", "name", &peer], None));
                if let Err(e) = made {
                    tracing::debug!(interface = %name, "no stand-in interface in the scratch namespace: {e}");
                }
            }
        }
        restore(snapshot, None, None)?;
        let before = listing()?;
        apply(c)?;
        let after = listing()?;
        let live = crate::backend::live::read().map_err(RulesetTxnError::ScratchRead)?;
        Ok(ScratchResult { live, before, after })
    })
}

// ---------------------------------------------------------------------------------------------
// Preparation: one function for `apply --ruleset` and `plan --ruleset`

/// How [`prepare`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrepareOptions {
    /// The requester's SSH connection: the result is linted for `ssh-lockout` (DESIGN §1/§7).
    pub ssh: Option<crate::lint::SshConn>,
    /// Lint errors become warnings (`--force`).
    pub force: bool,
    /// Build the result in a scratch namespace even without `ssh`, for its diff (`plan`).
    /// It never changes the verdict: the lint needs `ssh`.
    pub diff: bool,
}

/// A ruleset transaction decided before anything changes: what [`prepare`] found. The agent
/// applies [`RulesetPlan::candidate`] and keeps [`RulesetPlan::snapshot`] for the rollback;
/// `plan --ruleset` prints it. Both take the verdict from [`RulesetPlan::verdict`].
#[derive(Debug)]
pub struct RulesetPlan {
    /// Absolute paths of the tools used ([`tools`]).
    pub tools: BTreeMap<String, String>,
    /// The snapshot of the target, proven restorable, its rollback kernel-checked.
    pub snapshot: Snapshot,
    /// The file, resolved (format, family, variant), kernel-checked.
    pub candidate: Candidate,
    /// The lint's findings on the result (empty when no SSH connection is known).
    pub findings: Vec<crate::lint::Finding>,
    /// Warnings that are not findings (the variant chosen, a lint that could not run).
    pub notes: Vec<String>,
    /// The result in a scratch namespace, when it was built (with `ssh` or `diff`); the error
    /// text when building it failed (the lint then warns and the dead-man timer guards).
    pub result: Option<Result<ScratchResult, String>>,
    /// `--force` was given.
    pub force: bool,
}

impl RulesetPlan {
    /// The verdict `apply --ruleset` acts on and `plan --ruleset` reports: `Err` (exit 3,
    /// [`RulesetTxnError::Lint`]) when the lint found errors and `--force` was not given;
    /// otherwise the warnings to show (notes, findings — errors as `forced past: …` —, how an
    /// iptables dump is applied). Pure.
    pub fn verdict(&self) -> Result<Vec<String>, RulesetTxnError> {
        use crate::lint::Severity;
        let errors: Vec<String> =
            self.findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.to_string()).collect();
        if !errors.is_empty() && !self.force {
            return Err(RulesetTxnError::Lint(errors));
        }
        let mut warnings = self.notes.clone();
        for f in &self.findings {
            warnings.push(match f.severity {
                Severity::Error => format!("forced past: {f}"),
                Severity::Warning => f.to_string(),
            });
        }
        let c = &self.candidate;
        if let (Some(v), Some(f)) = (c.variant, c.family) {
            warnings.push(format!(
                "the iptables dump is applied as {} with {}",
                if f.is_v6() { "IPv6" } else { "IPv4" },
                v.tool(f.is_v6(), "-restore")
            ));
        }
        if c.variant == Some(IptVariant::Legacy) {
            warnings.push(
                "legacy iptables tables the dump creates cannot be removed by the rollback: they are left empty".into(),
            );
        }
        Ok(warnings)
    }
}

/// Prepares a ruleset transaction in the calling thread's namespace without changing it — the
/// one preparation of `apply --ruleset` (the agent's engine) and `plan --ruleset` (the CLI),
/// so they cannot disagree. In order, each failure refusing with its exit code
/// ([`RulesetTxnError::exit`]): the tools (`nft` required, exit 2); the file's format and
/// family (`format` `""` detects it; exit 2); a [`take_snapshot`] (exit 3 when the live state
/// cannot be restored exactly); the iptables variant ([`snapshot::choose_variant`]); the
/// kernel check of the file ([`check_candidate`], exit 3) and of the rollback
/// ([`check_restore`], exit 3); then, with `ssh` (or `diff`), the result built in a scratch
/// namespace ([`scratch_result`]) and, with `ssh`, linted ([`crate::lint::ssh_lockout_of_ruleset`]).
/// Lint errors do not fail here: [`RulesetPlan::verdict`] decides.
pub fn prepare(text: &str, format: &str, opts: PrepareOptions) -> Result<RulesetPlan, RulesetTxnError> {
    let tools = tools()?;
    let (format, family) = snapshot::resolve_format(format, text).map_err(RulesetTxnError::Snapshot)?;
    let mut notes = Vec::new();
    let mut candidate = Candidate { text: text.to_string(), format, family, variant: None };
    let snap = match format {
        RulesetFormat::Nft => {
            // The file's check needs nothing from the snapshot: it runs on a thread of its own
            // (in the target, like every thread this one starts) beside the snapshot and the
            // restore script's check.
            let fault = crate::fault::fires(FAULT_AFTER_FILE_CHECK);
            let (snap, checked) = std::thread::scope(|s| {
                let h = s.spawn(|| check_file_between_genids(&candidate, fault));
                let snap = snapshot_then_check_restore(None);
                (snap, h.join())
            });
            let (snap, restore) = snap?;
            let (before, after) = checked.map_err(|_| RulesetTxnError::Panicked("checking the ruleset file"))??;
            if before != after || snap.state.genid != Some(after) {
                // Another writer committed while the file was checked: the check saw another
                // ruleset than the snapshot's. Again, against the ruleset now.
                tracing::debug!(before, after, snapshot = ?snap.state.genid, "the ruleset moved around the file's check; checking it again");
                check_candidate(&candidate, &snap)?;
            }
            restore?;
            snap
        }
        RulesetFormat::Iptables => {
            // The dump is checked in a scratch namespace (only the target's ipsets needed) beside
            // the proof of the snapshot's tables, with the variant the proof's candidates give;
            // the proof can only take candidates away, and when that changes the variant the
            // dump is checked again with the right one.
            let state = read_stable_state()?;
            let (guess, _) = snapshot::choose_variant_of(&state, &snapshot::ipt_nft_candidates(&state));
            let guessed = Candidate { variant: Some(guess), ..candidate.clone() };
            let ipsets = state.ipsets.clone();
            let (snap, checked) = std::thread::scope(|s| {
                let h = s.spawn(|| check_file(&guessed, ipsets.as_deref()));
                let snap = snapshot_then_check_restore(Some(state));
                (snap, h.join())
            });
            let (snap, restore) = snap?;
            let checked = checked.map_err(|_| RulesetTxnError::Panicked("checking the ruleset file"))?;
            let (v, w) = snapshot::choose_variant(&snap);
            notes.extend(w);
            candidate.variant = Some(v);
            if v == guess {
                checked?;
            } else {
                tracing::debug!(?guess, chosen = ?v, "the proof changed the iptables variant; checking the dump again");
                check_candidate(&candidate, &snap)?;
            }
            restore?;
            snap
        }
    };
    let mut findings = Vec::new();
    let result =
        (opts.ssh.is_some() || opts.diff).then(|| scratch_result(&candidate, &snap).map_err(|e| chain_text(&e)));
    if let Some(ssh) = opts.ssh {
        match &result {
            Some(Ok(r)) => findings = crate::lint::ssh_lockout_of_ruleset(&r.live.chains(), ssh),
            Some(Err(e)) => {
                let msg = format!(
                    "the ssh-lockout lint could not evaluate the result ({e}); only the dead-man timer guards your SSH connection"
                );
                tracing::warn!("{msg}");
                notes.push(msg);
            }
            None => {}
        }
    }
    Ok(RulesetPlan { tools, snapshot: snap, candidate, findings, notes, result, force: opts.force })
}

// ---------------------------------------------------------------------------------------------
// Apply

/// Applies the ruleset file in the calling thread's namespace: an nft script as one `nft -f`
/// transaction; an iptables dump with `VARIANT-restore -w SECONDS` (tables in the dump replaced, each
/// committed on its own; others untouched). The generation id is read around it; `concurrent`
/// is set when it moved by more than the apply's own commits (nft -f: 1; iptables-nft: one
/// per table, measured). Reads nothing else: the state after is the agent's listing.
pub fn apply(c: &Candidate) -> Result<ApplyInfo, RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: apply");
    let before = genid()?;
    let own_commits: u32 = match (c.format, c.family) {
        (RulesetFormat::Nft, _) => {
            nft()?.run_timeout(&["-f", "-"], Some(c.text.as_bytes()), BULK_TIMEOUT).map_err(RulesetTxnError::Apply)?;
            1
        }
        (RulesetFormat::Iptables, family) => {
            let family = family.unwrap_or(Family::V4);
            let variant = c.variant.unwrap_or(IptVariant::Nft);
            iptables::restore(variant, ip_family(family), &c.text, false).map_err(RulesetTxnError::ApplyIpt)?;
            match variant {
                IptVariant::Nft => snapshot::split_save(&c.text).blocks.len() as u32,
                IptVariant::Legacy => 0,
            }
        }
    };
    let after = genid()?;
    let concurrent = after.wrapping_sub(before) > own_commits;
    if concurrent {
        tracing::warn!(before, after, own_commits, "another nf_tables commit happened during the apply");
    }
    let info = ApplyInfo {
        format: c.format,
        family: c.family,
        variant: c.variant,
        genid_before: Some(before),
        genid_after: Some(after),
        concurrent,
        resnapshot: false,
    };
    Ok(info)
}

// ---------------------------------------------------------------------------------------------
// Restore

/// What a rollback did and found.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct RestoreReport {
    /// What others changed during the window ([`snapshot::overwritten`]: what ctguard applied →
    /// what was there before the rollback, where that is not the snapshot already); the
    /// rollback overwrites it. Empty when nobody changed anything, or when the apply never
    /// completed (no record of what it applied).
    pub drift: Vec<DriftSection>,
    /// The rollback's `nft -f` was redone because another commit raced it.
    pub raced: bool,
    /// Steps run, in order (tool names).
    pub steps: Vec<String>,
}

/// `iptables-*-restore -w SECONDS -c` (a bounded wait for the xtables lock), from `wait`
/// ([`xtables_wait_args`] of the thread that asked).
fn ipt_restore_args(wait: &[String; 2]) -> [&str; 3] {
    [wait[0].as_str(), wait[1].as_str(), "-c"]
}

fn restore_with(step: &str, args: &[&str], doc: &str) -> Result<(), RulesetTxnError> {
    let t = Tool::find(step).map_err(RulesetTxnError::MissingTool)?;
    t.run_timeout(args, Some(doc.as_bytes()), BULK_TIMEOUT)
        .map(|_| ())
        .map_err(|source| RulesetTxnError::Restore { step: step.into(), source })
}

/// Restores `snapshot` in the calling thread's namespace (DESIGN §1), idempotently:
/// 1. the ipsets the snapshot's rules reference that are missing now are recreated from the
///    snapshot (existing sets are left alone);
/// 2. one `nft -f`: `delete table` for every table present now except those restored by
///    iptables-nft, then the snapshot's native tables — redone (up to [`RESTORE_ATTEMPTS`])
///    when the generation id shows another commit raced it;
/// 3. `iptables-nft-restore -w SECONDS -c` of the snapshot's iptables-nft tables (each replaced
///    atomically; tables not in the snapshot were deleted in step 2);
/// 4. `iptables-legacy-restore -w SECONDS -c` per family: the snapshot's tables, and tables created
///    since emptied (a legacy table cannot be removed).
///
/// Counters come back to their snapshot values (except ip6tables-nft's, which its restore
/// ignores). With `applied` (the state right after the apply, e.g. read back from the agent's
/// listing) and `genid_after` (the generation id right after the apply), what others changed
/// since is returned as drift ([`snapshot::overwritten`]); the nft side is read only when the
/// generation id moved since the apply. Everything the drift needs is read before step 1 (the
/// legacy saves and `ipset save` side by side); the drift itself is computed on a thread while
/// the steps run.
pub fn restore(
    snapshot: &Snapshot,
    applied: Option<&FwState>,
    genid_after: Option<u32>,
) -> Result<RestoreReport, RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: restore");
    let g0 = genid()?;
    // The legacy saves of both families and `ipset save`, each on a thread (in this namespace).
    let (legacy_now, ipsets_now) = std::thread::scope(|s| {
        let v6 = s.spawn(|| read_saves(&[(IptVariant::Legacy, true)], None));
        let ipsets = s.spawn(read_ipsets);
        let v4 = read_saves(&[(IptVariant::Legacy, false)], None);
        join_reads(v4, v6.join(), ipsets.join())
    })?;
    // Everything the drift needs is read now, before anything changes; the diff itself (pure)
    // is computed on a thread while the rollback runs.
    let now = match applied {
        Some(a) => {
            let (nft, ipt_nft) = if genid_after == Some(g0) {
                (a.nft.clone(), a.saves.iter().filter(|s| s.variant == IptVariant::Nft).cloned().collect())
            } else {
                read_nft_and_saves(&[(IptVariant::Nft, false), (IptVariant::Nft, true)])?
            };
            let mut saves: Vec<SaveText> = ipt_nft;
            saves.extend(legacy_now.iter().cloned());
            Some(FwState { genid: Some(g0), nft, saves, ipsets: ipsets_now.clone() })
        }
        None => None,
    };
    let (drift, done) = std::thread::scope(|s| {
        let drift = s.spawn(|| match (applied, &now) {
            (Some(applied), Some(now)) => {
                let _lap = crate::timing::Lap::start("ruleset: restore: drift");
                snapshot::overwritten(&snapshot.state, applied, now)
            }
            _ => Vec::new(),
        });
        let done = restore_steps(snapshot, &legacy_now, ipsets_now.as_deref());
        (drift.join(), done)
    });
    let mut report = done?;
    report.drift = drift.map_err(|_| RulesetTxnError::Panicked("computing the drift"))?;
    for d in &report.drift {
        let fate = if d.overwritten { "the rollback overwrites it" } else { "kept (ipset contents are not restored)" };
        tracing::warn!(section = %d.section, "changed by someone else during the window; {fate}: {}", d.diff.join(" | "));
    }
    Ok(report)
}

type Joined<T> = std::thread::Result<Result<T, RulesetTxnError>>;

/// The reads at the start of [`restore`], joined: the legacy saves (IPv4, IPv6) and `ipset save`.
fn join_reads(
    v4: Result<Vec<SaveText>, RulesetTxnError>,
    v6: Joined<Vec<SaveText>>,
    ipsets: Joined<Option<String>>,
) -> Result<(Vec<SaveText>, Option<String>), RulesetTxnError> {
    let mut saves = v4?;
    saves.extend(v6.map_err(|_| RulesetTxnError::ReadPanicked)??);
    let ipsets = ipsets.map_err(|_| RulesetTxnError::ReadPanicked)??;
    Ok((saves, ipsets))
}

/// The changing part of [`restore`] (its steps 1–4), given the legacy saves and the ipsets read
/// before it; the report without drift.
fn restore_steps(
    snapshot: &Snapshot,
    legacy_now: &[SaveText],
    ipsets_now: Option<&str>,
) -> Result<RestoreReport, RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: restore: steps");
    let mut report = RestoreReport::default();
    let wait = xtables_wait_args();
    // 1. ipsets the snapshot's rules need.
    if let Some(text) = snapshot::missing_ipsets_restore(&snapshot.state, ipsets_now.unwrap_or_default()) {
        restore_with("ipset", &["-exist", "restore"], &text)?;
        report.steps.push("ipset".into());
    }
    // 2. nft-native tables, one transaction.
    for attempt in 1..=RESTORE_ATTEMPTS {
        let before = genid()?;
        let script = snapshot::nft_restore_script(snapshot, &current_tables()?);
        if script.is_empty() {
            break;
        }
        restore_with("nft", &["-f", "-"], &script)?;
        report.steps.push("nft".into());
        let after = genid()?;
        if after.wrapping_sub(before) <= 1 {
            break;
        }
        report.raced = true;
        tracing::warn!(before, after, attempt, "another nf_tables commit raced the rollback's nft -f; redoing it");
    }
    // 3. iptables-nft tables, in the snapshot's order.
    for (v6, doc) in snapshot::ipt_nft_restore_docs(&snapshot.state, &snapshot.iptables_nft) {
        let step = IptVariant::Nft.tool(v6, "-restore");
        restore_with(&step, &ipt_restore_args(&wait), &doc)?;
        report.steps.push(step);
    }
    // 4. legacy tables.
    for v6 in [false, true] {
        let snap = snapshot.state.save(IptVariant::Legacy, v6).map(|s| s.text.as_str());
        let now = legacy_now.iter().find(|s| s.v6 == v6).map(|s| s.text.as_str());
        if let Some(doc) = snapshot::legacy_restore_doc(snap, now).map_err(RulesetTxnError::Snapshot)? {
            let step = IptVariant::Legacy.tool(v6, "-restore");
            restore_with(&step, &ipt_restore_args(&wait), &doc)?;
            report.steps.push(step);
        }
    }
    Ok(report)
}

/// The listing of the calling thread's namespace now ([`snapshot::listing`]): `nft list
/// ruleset`, every installed save and `ipset save`, counters zeroed. Read-only.
pub fn listing() -> Result<String, RulesetTxnError> {
    let _lap = crate::timing::Lap::start("ruleset: listing");
    Ok(snapshot::listing(&read_state()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lint::{Finding, Severity};

    fn plan(format: RulesetFormat, variant: Option<IptVariant>, findings: Vec<Finding>, force: bool) -> RulesetPlan {
        let family = variant.map(|_| Family::V4);
        RulesetPlan {
            tools: BTreeMap::new(),
            snapshot: Snapshot { version: SNAPSHOT_VERSION, state: FwState::default(), iptables_nft: Vec::new() },
            candidate: Candidate { text: String::new(), format, family, variant },
            findings,
            notes: vec!["a note".into()],
            result: None,
            force,
        }
    }

    fn finding(severity: Severity) -> Finding {
        Finding {
            severity,
            code: "ssh-lockout",
            chain: Some("nft inet t input".into()),
            rule: None,
            message: "m".into(),
        }
    }

    #[test]
    fn verdict_refuses_lint_errors_unless_forced_and_lists_every_warning() {
        let p = plan(RulesetFormat::Nft, None, vec![finding(Severity::Error), finding(Severity::Warning)], false);
        match p.verdict() {
            Err(e @ RulesetTxnError::Lint(_)) => {
                assert_eq!(e.exit(), Exit::Refused);
                assert!(
                    e.to_string().starts_with("lint found 1 error(s); refused without --force: error [ssh-lockout]"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        let p = plan(RulesetFormat::Nft, None, vec![finding(Severity::Error), finding(Severity::Warning)], true);
        let w = p.verdict().expect("forced");
        assert_eq!(w[0], "a note");
        assert!(w[1].starts_with("forced past: error [ssh-lockout]"), "{w:?}");
        assert!(w[2].starts_with("warning [ssh-lockout]"), "{w:?}");
        assert_eq!(w.len(), 3);
        // Warnings alone never refuse; an iptables dump says how it is applied.
        let p = plan(RulesetFormat::Iptables, Some(IptVariant::Legacy), vec![finding(Severity::Warning)], false);
        let w = p.verdict().expect("warnings only");
        assert!(w.iter().any(|l| l == "the iptables dump is applied as IPv4 with iptables-legacy-restore"), "{w:?}");
        assert!(w.iter().any(|l| l.starts_with("legacy iptables tables the dump creates")), "{w:?}");
    }

    #[test]
    fn set_elements_are_one_a_line_and_sorted_whatever_their_order() {
        let a =
            "table ip t {\n\tset s {\n\t\ttype tcp_flag\n\t\telements = { fin | ack, syn,\n\t\t\t     rst }\n\t}\n}\n";
        let b = "table ip t {\n\tset s {\n\t\ttype tcp_flag\n\t\telements = { syn, rst, fin | ack }\n\t}\n}\n";
        assert_eq!(canonical_lines(a), canonical_lines(b));
        assert_eq!(
            canonical_lines(b),
            [
                "table ip t {",
                "\tset s {",
                "\t\ttype tcp_flag",
                "\t\telements = {",
                "\t\t\tfin | ack",
                "\t\t\trst",
                "\t\t\tsyn",
                "\t\t}",
                "\t}",
                "}"
            ]
        );
        // Commas inside quotes and braces do not split an element; other lines stay as they are.
        let c = "\t\telements = { 1.1.1.1 comment \"a, b\", 2.2.2.2 : 3.3.3.3 }\n\t\tudp dport { 1, 2 } accept\n";
        assert_eq!(
            canonical_lines(c),
            [
                "\t\telements = {",
                "\t\t\t1.1.1.1 comment \"a, b\"",
                "\t\t\t2.2.2.2 : 3.3.3.3",
                "\t\t}",
                "\t\tudp dport { 1, 2 } accept"
            ]
        );
        // A different element is a different line.
        assert_ne!(canonical_lines(b), canonical_lines(&b.replace("rst", "psh")));
        // Unclosed: kept.
        assert_eq!(canonical_lines("\t\telements = { 1, 2\n"), ["\t\telements = { 1, 2"]);
    }
}
